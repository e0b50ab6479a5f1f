//! Raft transport server: receives every group's RPCs on the node's gRPC
//! port and hands each to the named group's local `Raft`.

use std::sync::Arc;

use tern_proto::raft::raft_service_server::RaftService;
use tern_proto::raft::{RaftReply, RaftRequest};
use tonic::{Request, Response, Status};

use super::host::GroupHost;
use super::Raft;

pub struct RaftServer {
    pub host: Arc<GroupHost>,
}

impl RaftServer {
    /// The group's local replica; a peer replicating a group we do not have
    /// yet means it was placed here, so it is created.
    async fn raft(&self, group: u64) -> Result<Raft, Status> {
        self.host
            .ensure(group)
            .await
            .map(|g| g.raft)
            .map_err(|e| Status::unavailable(format!("group {group}: {e:#}")))
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
        let req = request.into_inner();
        let raft = self.raft(req.group_id).await?;
        encode(&raft.append_entries(decode(&req)?).await)
    }

    async fn vote(&self, request: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let req = request.into_inner();
        let raft = self.raft(req.group_id).await?;
        encode(&raft.vote(decode(&req)?).await)
    }

    async fn install_snapshot(&self, request: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let req = request.into_inner();
        let raft = self.raft(req.group_id).await?;
        let chunk: super::network::ChunkIn = decode(&req)?;
        encode(&raft.install_snapshot(chunk.into()).await)
    }
}
