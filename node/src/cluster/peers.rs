//! Node-to-node calls: one lazily connected channel per peer, the admin and
//! peer-service clients over it, and the writes passed on to a group's
//! leader on another node (forwarded enqueues, operators' operations).
//!
//! This is what the SMTP write path ([`crate::queue::QueueFront`]) uses to
//! reach a shard leader elsewhere; it knows nothing of placement decisions.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tern_proto::admin::admin_service_client::AdminServiceClient;
use tern_proto::peer::peer_service_client::PeerServiceClient;
use tonic::transport::Channel;

use super::{records, ClusterError};
use crate::raft::groups::{GroupHandle, Groups};
use crate::raft::{GroupId, NewMessage, NodeId};
use tern_model::peer::Operation;

/// Pause before a forwarded enqueue is retried (lets a new leader be known).
const FORWARD_RETRY_PAUSE: Duration = Duration::from_millis(300);
/// Longest a forwarded enqueue is retried while its shard elects a leader.
const FORWARD_RETRY_WINDOW: Duration = Duration::from_secs(5);

/// A forward that failed on the way (transport) or because the leader
/// changed; not one the leader timed out on (the client has waited enough).
fn retryable(status: &tonic::Status) -> bool {
    let timed_out = status.metadata().contains_key(tern_model::peer::WRITE_TIMED_OUT)
        // A peer of the previous release says it only in the text.
        || status.message().ends_with(" timed out");
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
    ) && !timed_out
}

fn op_name(op: &Operation) -> &'static str {
    match op {
        Operation::Queue { .. } => "queue operation",
        Operation::Bounce { .. } => "queue bounce",
        Operation::Drain { .. } => "drain",
        Operation::Suspend { .. } => "domain suspension",
        Operation::MemberAdd { .. } => "member add",
        Operation::MemberRemove { .. } => "member remove",
        Operation::ShapingAction { .. } => "shaping action",
        Operation::Suppress { .. } => "suppression add",
        Operation::Unsuppress { .. } => "suppression remove",
        Operation::ApiKey { .. } => "api key",
        Operation::RevokeApiKey { .. } => "api key revoke",
        Operation::Template { .. } => "template",
        Operation::Batch { .. } => "api batch",
        Operation::PutShared { .. } => "shared records",
        Operation::DeleteShared { .. } => "shared records removal",
        Operation::Outcomes { .. } => "delivery outcomes",
        Operation::ShardAdd { .. } | Operation::ShardAddOnce { .. } => "shard add",
    }
}

/// How long one member may take to answer a ping or a local status query.
pub(super) const PEER_TIMEOUT: Duration = Duration::from_millis(1500);

/// The RPC side of the cluster: channels to peers and forwarded writes.
pub struct Peers {
    node_id: NodeId,
    groups: Arc<Groups>,
    tls: Option<crate::raft::tls::ClusterTls>,
    /// `[cluster] peer_addresses`.
    overrides: BTreeMap<NodeId, String>,
    /// One lazily connected channel per peer address (admin and peer clients share it).
    channels: Mutex<HashMap<(String, Option<NodeId>), Channel>>,
}

impl Peers {
    pub fn new(
        node_id: NodeId,
        groups: Arc<Groups>,
        tls: Option<crate::raft::tls::ClusterTls>,
        overrides: BTreeMap<NodeId, String>,
    ) -> Peers {
        Peers {
            node_id,
            groups,
            tls,
            overrides,
            channels: Mutex::new(HashMap::new()),
        }
    }

    /// Pings every other member at once (bounded); returns those that answered.
    pub async fn ping_all(&self, nodes: &BTreeMap<NodeId, String>) -> BTreeSet<NodeId> {
        let pings = nodes.iter().filter(|(id, _)| **id != self.node_id).map(|(id, addr)| {
            let client = self.peer(*id, &self.dial(*id, addr.clone()));
            async move {
                let mut client = client.ok()?;
                let ping = client.ping(tern_proto::peer::PingRequest {});
                matches!(tokio::time::timeout(PEER_TIMEOUT, ping).await, Ok(Ok(_))).then_some(*id)
            }
        });
        let mut out: BTreeSet<NodeId> = futures::future::join_all(pings).await.into_iter().flatten().collect();
        out.insert(self.node_id);
        out
    }

    /// Where to dial a node: its `peer_addresses` override, else `advertised`.
    pub fn dial(&self, node: NodeId, advertised: String) -> String {
        self.overrides.get(&node).cloned().unwrap_or(advertised)
    }

    /// The channel to a peer address (one lazily connected channel each).
    /// With cluster TLS the server must prove to be node `node` (any node when None).
    fn channel(&self, addr: &str, node: Option<NodeId>) -> Result<Channel, tonic::Status> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        let key = (addr.to_owned(), node);
        if let Some(c) = channels.get(&key) {
            return Ok(c.clone());
        }
        let endpoint = crate::raft::tls::endpoint(addr)
            .map_err(tonic::Status::invalid_argument)?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(90));
        let channel = crate::raft::tls::lazy_channel(endpoint, self.tls.as_ref(), node);
        channels.insert(key, channel.clone());
        Ok(channel)
    }

    /// An admin client for another node (an operator's call passed on to
    /// the control leader).
    pub fn client(&self, addr: &str) -> Result<AdminServiceClient<Channel>, tonic::Status> {
        Ok(AdminServiceClient::new(self.channel(addr, None)?)
            .max_decoding_message_size(crate::raft::network::MAX_GRPC_MESSAGE)
            .max_encoding_message_size(crate::raft::network::MAX_GRPC_MESSAGE))
    }

    /// A peer-service client for node `node` at `addr`.
    pub fn peer(&self, node: NodeId, addr: &str) -> Result<PeerServiceClient<Channel>, tonic::Status> {
        Ok(PeerServiceClient::new(self.channel(addr, Some(node))?)
            .max_decoding_message_size(crate::raft::network::MAX_GRPC_MESSAGE)
            .max_encoding_message_size(crate::raft::network::MAX_GRPC_MESSAGE))
    }

    /// The address of a group's leader as this node knows it.
    pub fn leader_addr(&self, group: &GroupHandle) -> Option<(NodeId, String)> {
        let m = group.raft.metrics().borrow().clone();
        let leader = m.current_leader?;
        let addr = m
            .membership_config
            .nodes()
            .find(|(id, _)| **id == leader)
            .map(|(_, n)| n.addr.clone())
            .or_else(|| records::nodes(&self.groups).get(&leader).cloned())?;
        Some((leader, self.dial(leader, addr)))
    }

    /// Writes a new message through `group`'s leader on another node.
    ///
    /// A forward that fails in transport (connection lost, leader gone) is
    /// sent once more, to the group's leader as then known, with the same
    /// queue id: if the first attempt did commit, the state machine ignores
    /// the second while the message is still queued, so no duplicate.
    pub async fn forward_enqueue(&self, group: &GroupHandle, message: &NewMessage) -> Result<(), ClusterError> {
        // An election (a leader that stepped down, a placement change) takes
        // one election timeout or a few under load: the client is kept
        // waiting that long rather than told 451 at once.
        let deadline = tokio::time::Instant::now() + FORWARD_RETRY_WINDOW;
        loop {
            let Some((leader, addr)) = self.leader_addr(group) else {
                if tokio::time::Instant::now() + FORWARD_RETRY_PAUSE > deadline {
                    return Err(ClusterError::NoLeader);
                }
                tokio::time::sleep(FORWARD_RETRY_PAUSE).await;
                continue;
            };
            match self.enqueue_status(leader, &addr, group.id, message, true).await {
                Ok(()) => return Ok(()),
                Err(status) if retryable(&status) && tokio::time::Instant::now() + FORWARD_RETRY_PAUSE <= deadline => {
                    tracing::info!(group = group.id, error = %status.message(), "forwarded enqueue retried");
                    tokio::time::sleep(FORWARD_RETRY_PAUSE).await;
                }
                Err(status) => return Err(ClusterError::forward(&addr, &status)),
            }
        }
    }

    /// Sends a new message for `group` to node `node` at `addr`; with `hop`
    /// false that node passes it on to the group's leader if it is not the
    /// leader itself.
    async fn enqueue_status(
        &self,
        node: NodeId,
        addr: &str,
        group: GroupId,
        message: &NewMessage,
        hop: bool,
    ) -> Result<(), tonic::Status> {
        let payload = tern_model::peer::encode(message).map_err(tonic::Status::internal)?;
        let mut client = self.peer(node, addr)?;
        client
            .enqueue(tern_proto::peer::EnqueueRequest {
                group_id: group,
                message: payload,
                hop,
            })
            .await
            .map(|_| ())
    }

    /// A node holding no replica of any shard (more nodes than replicas)
    /// sends its message to a replica of some shard, which passes it to
    /// that shard's leader.
    pub async fn forward_enqueue_anywhere(&self, turn: usize, message: &NewMessage) -> Result<GroupId, ClusterError> {
        let placement = records::routable_placement(&self.groups);
        if placement.is_empty() {
            return Err(ClusterError::NoPlacement);
        }
        let nodes = records::nodes(&self.groups);
        let (shard, replicas) = &placement[turn % placement.len()];
        let mut last = ClusterError::NoReplicaReachable;
        for node in replicas {
            let Some(addr) = nodes.get(node).cloned() else { continue };
            let addr = self.dial(*node, addr);
            match self.enqueue_status(*node, &addr, *shard, message, false).await {
                Ok(()) => return Ok(*shard),
                Err(e) => last = ClusterError::forward(&addr, &e),
            }
        }
        Err(last)
    }

    /// Makes an operator's write through `group`'s leader on another node;
    /// how many messages it affected.
    pub async fn operate(&self, group: &GroupHandle, op: &Operation) -> Result<u64, ClusterError> {
        self.operate_status(group, op)
            .await
            .map(|r| r.affected)
            .map_err(|e| ClusterError::Operation {
                op: op_name(op),
                message: e.message().to_owned(),
            })
    }

    /// As [`Peers::operate`], with the leader's reply or status as it answered.
    pub async fn operate_status(
        &self,
        group: &GroupHandle,
        op: &Operation,
    ) -> Result<tern_proto::peer::OperationReply, tonic::Status> {
        let (leader, addr) = self
            .leader_addr(group)
            .ok_or_else(|| tonic::Status::unavailable(format!("group {} has no known leader; try again", group.id)))?;
        let payload = tern_model::peer::encode(op).map_err(tonic::Status::internal)?;
        let mut client = self.peer(leader, &addr)?;
        client
            .operation(tern_proto::peer::OperationRequest {
                group_id: group.id,
                operation: payload,
            })
            .await
            .map(tonic::Response::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_transport_and_leader_change_failures_are_retried() {
        assert!(retryable(&tonic::Status::unavailable("transport error")));
        assert!(retryable(&tonic::Status::unavailable(
            "write to group 3 failed: has to forward request to: Some(2)"
        )));
        assert!(!retryable(&tonic::Status::unavailable("write to group 3 timed out")));
        assert!(!retryable(&tonic::Status::not_found("group 3 not hosted here")));
        assert!(!retryable(&tonic::Status::invalid_argument("bad request")));
    }

    #[test]
    fn a_write_the_leader_gave_up_waiting_for_is_not_retried_whatever_its_text() {
        let mut status = tonic::Status::unavailable("write to group 3: no answer in time");
        assert!(retryable(&status));
        status.metadata_mut().insert(
            tern_model::peer::WRITE_TIMED_OUT,
            tonic::metadata::MetadataValue::from_static("1"),
        );
        assert!(!retryable(&status));
    }
}
