//! Raft transport client: openraft's RPCs for any group over the peer's one
//! gRPC service, with one cached (lazily connecting, reconnecting) channel
//! per peer shared by every group.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::BasicNode;
use tern_proto::raft::raft_service_client::RaftServiceClient;
use tern_proto::raft::RaftRequest;
use tonic::transport::Channel;

use super::{GroupId, NodeId, TypeConfig};

/// Largest gRPC message between nodes: a full AppendEntries of big mail.
pub const MAX_GRPC_MESSAGE: usize = 512 * 1024 * 1024;

/// Body bytes sent in one AppendEntries before the rest is left for the next
/// one. openraft caps a payload by entry count only (256), and times the
/// whole RPC, follower fsync included, against the heartbeat interval: 256
/// large messages in one request would time out and be resent forever.
const APPEND_BYTE_BUDGET: usize = 1024 * 1024;

/// How recent a follower's Success must be for an AppendEntries without
/// entries to be answered from it instead of sent (see [`Acked`]).
const ACK_REUSE: std::time::Duration = std::time::Duration::from_millis(10);

/// The last AppendEntries a follower answered Success to: when it was sent,
/// under which vote, and the last log id it then held.
///
/// openraft 0.9 follows every commit with an AppendEntries without entries
/// that only tells followers the new commit index: for a write, two of the
/// four RPCs to the followers. Such a request whose vote and previous log
/// id are those of a Success sent within [`ACK_REUSE`] has its answer
/// already (the follower's log is durable and only a higher vote truncates
/// it), so it is answered here; the follower learns the commit index with
/// the next entries or the next real heartbeat (every 200 ms at most). The
/// answer counts as a quorum contact up to [`ACK_REUSE`] later than the real
/// one, well inside the margin between the shard lease (queue/lease.rs, 500
/// ms) and the election timeout (1000 ms).
#[derive(Clone, Copy)]
struct Acked {
    sent: std::time::Instant,
    vote: openraft::Vote<NodeId>,
    last: Option<super::LogId>,
}

impl Acked {
    /// Whether this Success already answers `rpc`: no entries, the same
    /// vote and last log id, sent within [`ACK_REUSE`].
    fn answers(&self, rpc: &AppendEntriesRequest<TypeConfig>) -> bool {
        rpc.entries.is_empty()
            && self.vote == rpc.vote
            && self.last == rpc.prev_log_id
            && self.sent.elapsed() < ACK_REUSE
    }
}

/// How many leading entries of `entries` fit in [`APPEND_BYTE_BUDGET`]
/// (always at least one, so a single huge message still goes through).
fn entries_within_budget(entries: &mut [super::Entry]) -> usize {
    let mut total = 0usize;
    for (i, entry) in entries.iter_mut().enumerate() {
        if let openraft::EntryPayload::Normal(request) = &mut entry.payload {
            total += request.bodies_mut().iter().map(|b| b.bytes.len()).sum::<usize>();
        }
        if total > APPEND_BYTE_BUDGET && i > 0 {
            return i;
        }
    }
    entries.len()
}

/// One channel per peer, shared by all groups on this node.
pub struct Peers {
    channels: Mutex<HashMap<NodeId, (String, Channel)>>,
    /// Mutual TLS for cluster traffic, if configured.
    tls: Option<super::tls::ClusterTls>,
    /// `[cluster] peer_addresses`: where to dial a peer instead of its advertised address.
    overrides: std::collections::BTreeMap<NodeId, String>,
}

impl Peers {
    pub fn new(tls: Option<super::tls::ClusterTls>, overrides: std::collections::BTreeMap<NodeId, String>) -> Peers {
        Peers {
            channels: Mutex::new(HashMap::new()),
            tls,
            overrides,
        }
    }

    /// The Raft service of `target` (at `advertised` unless overridden).
    pub fn client(&self, target: NodeId, advertised: &str) -> Result<RaftServiceClient<Channel>, String> {
        self.channel(target, advertised).map(|ch| {
            RaftServiceClient::new(ch)
                .max_decoding_message_size(MAX_GRPC_MESSAGE)
                .max_encoding_message_size(MAX_GRPC_MESSAGE)
        })
    }

    fn channel(&self, target: NodeId, advertised: &str) -> Result<Channel, String> {
        let addr = self.overrides.get(&target).map(String::as_str).unwrap_or(advertised);
        let mut map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((a, ch)) = map.get(&target) {
            if a == addr {
                return Ok(ch.clone());
            }
        }
        let endpoint = super::tls::endpoint(addr)?.connect_timeout(std::time::Duration::from_secs(2));
        let channel = super::tls::lazy_channel(endpoint, self.tls.as_ref(), Some(target));
        map.insert(target, (addr.to_owned(), channel.clone()));
        Ok(channel)
    }
}

/// The network factory of one group.
#[derive(Clone)]
pub struct Network {
    pub group: GroupId,
    pub peers: Arc<Peers>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient {
        PeerClient {
            group: self.group,
            target,
            client: self.peers.client(target, &node.addr),
            acked: None,
        }
    }
}

/// A group's connection to one peer.
pub struct PeerClient {
    group: GroupId,
    target: NodeId,
    client: Result<RaftServiceClient<Channel>, String>,
    acked: Option<Acked>,
}

type RpcResult<T, E> = Result<T, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>;

impl PeerClient {
    async fn call<Req, Resp, E>(&mut self, kind: RpcKind, req: &Req) -> RpcResult<Resp, E>
    where
        Req: serde::Serialize,
        Resp: serde::de::DeserializeOwned,
        E: std::error::Error + serde::de::DeserializeOwned,
    {
        let client = match &mut self.client {
            Ok(c) => c,
            Err(e) => {
                return Err(RPCError::Unreachable(Unreachable::new(&std::io::Error::other(
                    e.clone(),
                ))))
            }
        };
        let payload = bincode::serialize(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let request = RaftRequest {
            group_id: self.group,
            payload,
        };
        let reply = match kind {
            RpcKind::Append => client.append_entries(request).await,
            RpcKind::Vote => client.vote(request).await,
            RpcKind::Snapshot => client.install_snapshot(request).await,
        }
        .map_err(|status| match status.code() {
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
                RPCError::Unreachable(Unreachable::new(&status))
            }
            _ => RPCError::Network(NetworkError::new(&status)),
        })?;
        let result: Result<Resp, RaftError<NodeId, E>> =
            bincode::deserialize(&reply.into_inner().payload).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

/// An InstallSnapshot request as sent: openraft's own, with its data
/// encoded as bytes (one copy) instead of element by element (about 40 ns a
/// byte in a debug build: seconds per 3 MiB chunk). bincode writes both as
/// a u64 length and the bytes, so the wire format is the same.
#[derive(serde::Serialize)]
struct ChunkOut<'a> {
    vote: &'a openraft::Vote<NodeId>,
    meta: &'a super::snapshot::Meta,
    offset: u64,
    #[serde(with = "serde_bytes")]
    data: &'a [u8],
    done: bool,
}

/// [`ChunkOut`] as received.
#[derive(serde::Deserialize)]
pub struct ChunkIn {
    vote: openraft::Vote<NodeId>,
    meta: super::snapshot::Meta,
    offset: u64,
    #[serde(with = "serde_bytes")]
    data: Vec<u8>,
    done: bool,
}

impl ChunkIn {
    /// The node sending it, as it claims (its leader vote).
    pub fn leader(&self) -> NodeId {
        self.vote.leader_id().node_id
    }
}

impl From<ChunkIn> for InstallSnapshotRequest<TypeConfig> {
    fn from(c: ChunkIn) -> Self {
        InstallSnapshotRequest {
            vote: c.vote,
            meta: c.meta,
            offset: c.offset,
            data: c.data,
            done: c.done,
        }
    }
}

#[derive(Clone, Copy)]
enum RpcKind {
    Append,
    Vote,
    Snapshot,
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>, openraft::error::Infallible> {
        if self.acked.is_some_and(|a| a.answers(&rpc)) {
            return Ok(AppendEntriesResponse::Success);
        }
        let sent = std::time::Instant::now();
        let keep = entries_within_budget(&mut rpc.entries);
        let partial = keep < rpc.entries.len();
        // Send a prefix; the follower commits only up to what it received
        // (min(leader_commit, accepted)), and PartialSuccess makes the
        // leader send the rest next.
        rpc.entries.truncate(keep);
        let last = rpc.entries.last().map(|e| e.log_id).or(rpc.prev_log_id);
        let reply = self.call(RpcKind::Append, &rpc).await;
        self.acked = match &reply {
            Ok(AppendEntriesResponse::Success) => Some(Acked {
                sent,
                vote: rpc.vote,
                last,
            }),
            _ => None,
        };
        match reply? {
            AppendEntriesResponse::Success if partial => Ok(AppendEntriesResponse::PartialSuccess(last)),
            other => Ok(other),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        let chunk = ChunkOut {
            vote: &rpc.vote,
            meta: &rpc.meta,
            offset: rpc.offset,
            data: &rpc.data,
            done: rpc.done,
        };
        self.call(RpcKind::Snapshot, &chunk).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>, openraft::error::Infallible> {
        self.call(RpcKind::Vote, &rpc).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Body, Request};

    fn enqueue_entry(index: u64, id: &str, body: &[u8]) -> crate::Entry {
        let record = tern_model::record::MessageRecord::new(id.into(), Default::default(), body.len() as u64, 0);
        crate::Entry {
            log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
            payload: openraft::EntryPayload::Normal(Request::Enqueue {
                record: Box::new(record),
                body: Body {
                    bytes: body.to_vec(),
                    loc: None,
                },
            }),
        }
    }

    #[test]
    fn only_a_fresh_commit_only_request_is_answered_from_the_last_success() {
        let leader = |term| openraft::Vote::new_committed(term, 1);
        let log_id = |index| openraft::LogId::new(openraft::CommittedLeaderId::new(2, 1), index);
        let request = |term, prev, entries| AppendEntriesRequest::<TypeConfig> {
            vote: leader(term),
            prev_log_id: Some(log_id(prev)),
            entries,
            leader_commit: Some(log_id(prev)),
        };
        let acked = Acked {
            sent: std::time::Instant::now(),
            vote: leader(2),
            last: Some(log_id(7)),
        };
        assert!(acked.answers(&request(2, 7, Vec::new())), "commit index only");
        assert!(
            !acked.answers(&request(2, 7, vec![enqueue_entry(8, "A", b"x")])),
            "entries"
        );
        assert!(!acked.answers(&request(2, 6, Vec::new())), "another log id");
        assert!(!acked.answers(&request(3, 7, Vec::new())), "a new vote");
        let old = Acked {
            sent: std::time::Instant::now() - ACK_REUSE,
            ..acked
        };
        assert!(!old.answers(&request(2, 7, Vec::new())), "too old");
    }

    #[test]
    #[allow(clippy::unwrap_used)]
    fn a_snapshot_chunk_has_openraft_s_own_encoding() {
        let rpc = InstallSnapshotRequest::<TypeConfig> {
            vote: openraft::Vote::new_committed(2, 1),
            meta: Default::default(),
            offset: 7,
            data: vec![1, 2, 3, 250],
            done: true,
        };
        let chunk = ChunkOut {
            vote: &rpc.vote,
            meta: &rpc.meta,
            offset: rpc.offset,
            data: &rpc.data,
            done: rpc.done,
        };
        let ours = bincode::serialize(&chunk).unwrap();
        assert_eq!(ours, bincode::serialize(&rpc).unwrap());
        let back: InstallSnapshotRequest<TypeConfig> = bincode::deserialize::<ChunkIn>(&ours).unwrap().into();
        assert_eq!(back, rpc);
    }

    #[test]
    fn append_payload_is_cut_by_body_bytes_but_never_empty() {
        let big = vec![b'x'; 400 * 1024];
        let mut entries: Vec<_> = (1..=5).map(|i| enqueue_entry(i, &format!("M{i}"), &big)).collect();
        // 400 KiB each: two fit in 1 MiB, the third would exceed it.
        assert_eq!(entries_within_budget(&mut entries), 2);
        let mut huge = vec![enqueue_entry(1, "H", &vec![b'x'; 3 * 1024 * 1024])];
        assert_eq!(entries_within_budget(&mut huge), 1);
        let mut small: Vec<_> = (1..=10).map(|i| enqueue_entry(i, &format!("S{i}"), b"hi")).collect();
        assert_eq!(entries_within_budget(&mut small), 10);
    }
}
