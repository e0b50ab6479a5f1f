//! Raft transport server: receives every group's RPCs on the node's gRPC
//! port and hands each to the named group's local `Raft`.
//!
//! Every RPC is admitted by the [`PeerGate`] first (before its payload is
//! decoded), then checked against the node id it claims (the leader of an
//! AppendEntries or InstallSnapshot, the candidate of a Vote). A group this node does not host yet is created
//! only when the control group's placement puts this node in it.

use std::sync::Arc;

use tern_proto::raft::raft_service_server::RaftService;
use tern_proto::raft::{LivenessReply, LivenessRequest, RaftReply, RaftRequest};
use tonic::{Request, Response, Status};

use super::gate::PeerGate;
use super::host::GroupHost;
use super::{NodeId, Raft, CONTROL_GROUP};
use crate::gate::PeerRefusals;

pub struct RaftServer {
    pub host: Arc<GroupHost>,
    pub gate: Arc<PeerGate>,
    pub refused: PeerRefusals,
    /// Answers peers' liveness for their quiet groups.
    pub quiet: Arc<super::quiet::Quiet>,
}

impl RaftServer {
    /// The group's local replica; created if the control group's placement
    /// puts it on this node (a new replica being caught up).
    async fn raft(&self, group: u64) -> Result<Raft, Status> {
        if let Some(g) = self.host.groups.get(group) {
            return Ok(g.raft);
        }
        self.placed_here(group)?;
        self.host
            .ensure(group)
            .await
            .map(|g| g.raft)
            .map_err(|e| Status::unavailable(format!("group {group}: {e:#}")))
    }

    /// Whether this node may create `group`: a queue shard of this cluster
    /// whose placement, in the local control replica, names this node.
    fn placed_here(&self, group: u64) -> Result<(), Status> {
        let me = self.host.settings.node_id;
        let shards = u64::from(self.host.settings.shards);
        let refuse = |status: Status| self.gate.refuse("group_not_placed", status);
        if group == CONTROL_GROUP {
            // Opened at every start: only missing while this node stops.
            return Err(Status::unavailable("the control group is not open here"));
        }
        let control = self
            .host
            .groups
            .get(CONTROL_GROUP)
            .ok_or_else(|| Status::unavailable("the control group is not open here"))?;
        let replicas: Vec<NodeId> = self.gate.placement(&control.sm.tree(), group);
        // Shards added online are above the bootstrap count: a placement
        // record says they exist.
        if group > shards && replicas.is_empty() {
            return Err(refuse(Status::not_found(format!(
                "group {group} does not exist: this cluster has shards 1..={shards} and no placement for it"
            ))));
        }
        if replicas.contains(&me) {
            return Ok(());
        }
        // The placement may be committed on the control leader and not yet
        // applied here: retryable while this replica has entries to apply.
        let m = control.raft.metrics().borrow().clone();
        let behind = m.last_applied.map(|l| l.index) < m.last_log_index;
        let message = format!(
            "group {group} is not placed on node {me} (placement here: {replicas:?}, control applied up to {})",
            m.last_applied.map(|l| l.index).unwrap_or(0)
        );
        if behind {
            // Most likely the race, not a stranger: not counted as a refusal.
            tracing::debug!(group, error = %message, "group creation waits for placement");
            return Err(Status::unavailable(message));
        }
        Err(refuse(Status::failed_precondition(message)))
    }
}

fn decode<T: serde::de::DeserializeOwned>(req: &RaftRequest) -> Result<T, Status> {
    bincode::deserialize(&req.payload).map_err(|e| Status::invalid_argument(format!("bad raft payload: {e}")))
}

fn encode<T: serde::Serialize>(value: &T) -> Result<Response<RaftReply>, Status> {
    let payload = bincode::serialize(value).map_err(|e| Status::internal(e.to_string()))?;
    Ok(Response::new(RaftReply { payload }))
}

#[tonic::async_trait]
impl RaftService for RaftServer {
    async fn append_entries(&self, request: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        // The certificate first: nothing is decoded for a stranger.
        let node = self.gate.admit(&request, "AppendEntries", None)?;
        let rpc: openraft::raft::AppendEntriesRequest<super::TypeConfig> = decode(request.get_ref())?;
        self.gate
            .check_claim("AppendEntries", node, rpc.vote.leader_id().node_id)?;
        let raft = self.raft(request.get_ref().group_id).await?;
        encode(&raft.append_entries(rpc).await)
    }

    async fn vote(&self, request: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let node = self.gate.admit(&request, "Vote", None)?;
        let rpc: openraft::raft::VoteRequest<NodeId> = decode(request.get_ref())?;
        self.gate.check_claim("Vote", node, rpc.vote.leader_id().node_id)?;
        let raft = self.raft(request.get_ref().group_id).await?;
        encode(&raft.vote(rpc).await)
    }

    async fn install_snapshot(&self, request: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let node = self.gate.admit(&request, "InstallSnapshot", None)?;
        let chunk: super::network::ChunkIn = decode(request.get_ref())?;
        self.gate.check_claim("InstallSnapshot", node, chunk.leader())?;
        let raft = self.raft(request.get_ref().group_id).await?;
        encode(&raft.install_snapshot(chunk.into()).await)
    }

    async fn liveness(&self, request: Request<LivenessRequest>) -> Result<Response<LivenessReply>, Status> {
        let node = self.gate.admit(&request, "Liveness", None)?;
        let request = request.into_inner();
        self.gate.check_claim("Liveness", node, request.from)?;
        let quiet = self.quiet.vouched(request.from, &request.groups).await;
        Ok(Response::new(LivenessReply { quiet }))
    }
}
