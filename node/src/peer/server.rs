//! The `PeerService` handlers: what one node asks another, every call
//! admitted by the [`PeerGate`] first.

use std::collections::BTreeSet;
use std::sync::Arc;

use tern_proto::admin::{
    MemberListReply, NodeStats, QueueListReply, QueueListRequest, QueueShowReply, QueueShowRequest, QueueSummaryReply,
    StatsReply, StatusReply,
};
use tern_proto::peer::peer_service_server::PeerService;
use tern_proto::peer::*;
use tonic::{Request, Response, Status};

use super::{decode_strict, Operation};
use crate::admin::Admin;
use crate::raft::gate::PeerGate;
use crate::raft::groups::GroupHandle;
use crate::raft::{NewMessage, CONTROL_GROUP};

pub struct PeerServer {
    pub admin: Arc<Admin>,
    pub gate: Arc<PeerGate>,
}

impl PeerServer {
    fn group(&self, id: u64) -> Result<GroupHandle, Status> {
        self.admin
            .groups
            .get(id)
            .ok_or_else(|| Status::not_found(format!("group {id} is not hosted on node {}", self.admin.node_id)))
    }

    fn writable(&self) -> Result<(), Status> {
        if self.admin.space.is_full() {
            // Leadership is being handed over; the sender's client retries.
            return Err(Status::unavailable(format!(
                "node {} cannot take writes: {}",
                self.admin.node_id,
                self.admin.space.reason()
            )));
        }
        Ok(())
    }

    /// Writes `request` to `group` here, bounded: a leader cut off from its
    /// majority never commits, and the SMTP client must hear 451 rather
    /// than wait for ever.
    /// `shard add` forwarded to this node as the control leader.
    async fn shard_add(&self, count: u32, request_id: Option<&str>) -> Result<Response<OperationReply>, Status> {
        let ids = self.admin.add_shards_here(count, request_id).await?;
        Ok(Response::new(OperationReply {
            affected: ids.len() as u64,
            detail: ids.iter().map(u64::to_string).collect::<Vec<_>>().join(","),
        }))
    }

    async fn client_write(&self, group: &GroupHandle, request: crate::raft::Request) -> Result<(), Status> {
        match tokio::time::timeout(crate::queue::WRITE_TIMEOUT, group.raft.client_write(request)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(Status::unavailable(format!("write to group {} failed: {e}", group.id))),
            Err(_) => {
                // Same code and text as before (older peers read the text);
                // the metadata says it to peers of this release.
                let mut status = Status::unavailable(format!("write to group {} timed out", group.id));
                status.metadata_mut().insert(
                    tern_model::peer::WRITE_TIMED_OUT,
                    tonic::metadata::MetadataValue::from_static("1"),
                );
                Err(status)
            }
        }
    }
}

/// A forwarded message is one the sender accepted: a record that matches
/// its body and has recipients, and no body location (that is the
/// receiving log store's to assign).
fn check_message(m: &NewMessage) -> Result<(), String> {
    let r = &m.record;
    if r.id.is_empty() || r.id.len() > 128 {
        return Err("a message id of 1-128 characters is required".into());
    }
    if r.envelope.recipients.is_empty() || r.envelope.recipients.len() != r.rcpt_state.len() {
        return Err(format!(
            "message {}: {} recipients with {} recipient states",
            r.id,
            r.envelope.recipients.len(),
            r.rcpt_state.len()
        ));
    }
    if r.rcpt_state.iter().any(|s| s.status.is_final()) {
        return Err(format!("message {}: a new message has no final recipients", r.id));
    }
    if r.size != m.body.bytes.len() as u64 || r.body.is_some() || m.body.loc.is_some() {
        return Err(format!("message {}: record and body do not match", r.id));
    }
    Ok(())
}

#[tonic::async_trait]
impl PeerService for PeerServer {
    async fn enqueue(&self, request: Request<EnqueueRequest>) -> Result<Response<EnqueueReply>, Status> {
        let sender = self.gate.admit(&request, "Enqueue", None)?;
        let req = request.into_inner();
        if req.group_id == CONTROL_GROUP {
            return Err(Status::invalid_argument(
                "Enqueue: mail is written to queue shards, not to the control group",
            ));
        }
        let group = self.group(req.group_id)?;
        // A retired shard is being closed: a sender that has not seen it yet
        // tries again (elsewhere) rather than leave mail in it.
        let retired = crate::cluster::records::shard_records(&self.admin.cluster.groups)
            .get(&group.id)
            .is_some_and(|r| r.state == crate::cluster::shards::ShardState::Retired);
        if retired {
            return Err(Status::unavailable(format!("Enqueue: shard {} is retired", group.id)));
        }
        let message: NewMessage = decode_strict(&req.message)
            .map_err(|e| Status::invalid_argument(format!("Enqueue: the payload is not one new message: {e}")))?;
        check_message(&message).map_err(|e| Status::invalid_argument(format!("Enqueue: {e}")))?;
        self.writable()?;
        if !req.hop && group.leader().is_some_and(|l| l != self.admin.node_id) {
            // From a node without a replica: one more hop, to the leader.
            self.admin
                .cluster
                .peers
                .forward_enqueue(&group, &message)
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
            return Ok(Response::new(EnqueueReply {}));
        }
        tracing::debug!(shard = group.id, from = ?sender, msg_id = %message.record.id, "forwarded enqueue");
        let request = crate::raft::Request::Enqueue {
            record: message.record,
            body: message.body,
        };
        self.client_write(&group, request).await?;
        Ok(Response::new(EnqueueReply {}))
    }

    async fn operation(&self, request: Request<OperationRequest>) -> Result<Response<OperationReply>, Status> {
        let sender = self.gate.admit(&request, "Operation", None)?;
        let req = request.into_inner();
        let op: Operation = decode_strict(&req.operation)
            .map_err(|e| Status::invalid_argument(format!("Operation: the payload is not an operation: {e}")))?;
        op.fits(req.group_id)
            .map_err(|e| Status::invalid_argument(format!("Operation: {e}")))?;
        let group = self.group(req.group_id)?;
        if let Operation::Drain { node, .. } = &op {
            if !self.admin.cluster.nodes().contains_key(node) {
                return Err(Status::not_found(format!("node {node} is not a member")));
            }
        }
        if let Operation::Outcomes { updates, bounces } = &op {
            for b in bounces {
                check_message(b).map_err(|e| Status::invalid_argument(format!("Operation: {e}")))?;
            }
            // Not the operation itself: the reports carry whole messages.
            tracing::info!(group = group.id, from = ?sender, outcomes = updates.len(), reports = bounces.len(), "outcomes from the shard's former leader");
        } else {
            tracing::info!(group = group.id, from = ?sender, operation = ?op, "operation from a peer");
        }
        if let Operation::Bounce { ids } = op {
            let now = chrono::Utc::now().timestamp();
            let affected = self.admin.bounce_on_leader(&group, ids, true, now).await?;
            return Ok(Response::new(OperationReply {
                affected,
                detail: String::new(),
            }));
        }
        if group.leader() != Some(self.admin.node_id) {
            return Err(Status::unavailable(format!(
                "node {} is not the leader of group {}; try again",
                self.admin.node_id, group.id
            )));
        }
        match op {
            Operation::MemberAdd { id, addr } => {
                if id == 0 || addr.is_empty() {
                    return Err(Status::invalid_argument(
                        "member add needs an id (at least 1) and an address",
                    ));
                }
                let reply = self.admin.add_member_here(id, &addr).await?;
                return Ok(Response::new(OperationReply {
                    affected: 0,
                    detail: reply.role,
                }));
            }
            Operation::MemberRemove { id, force } => {
                self.admin.remove_member_here(id, force).await?;
                return Ok(Response::new(OperationReply::default()));
            }
            Operation::ShardAdd { count } => return self.shard_add(count, None).await,
            Operation::ShardAddOnce { count, request_id } => return self.shard_add(count, Some(&request_id)).await,
            _ => {}
        }
        self.writable()?;
        let affected = match &op {
            Operation::Queue { ids, .. } => ids.len() as u64,
            _ => 1,
        };
        let write = op
            .into_request()
            .ok_or_else(|| Status::internal("operation without a request"))?;
        self.client_write(&group, write).await?;
        Ok(Response::new(OperationReply {
            affected,
            detail: String::new(),
        }))
    }

    async fn elect(&self, request: Request<ElectRequest>) -> Result<Response<ElectReply>, Status> {
        self.gate.admit(&request, "Elect", None)?;
        let ElectRequest {
            group_id,
            step_aside,
            caught_up,
        } = request.into_inner();
        let g = self.group(group_id)?;
        if step_aside {
            crate::cluster::step_aside_for(&g, (caught_up != 0).then_some(caught_up))
                .await
                .map_err(Status::failed_precondition)?;
            return Ok(Response::new(ElectReply {}));
        }
        if self.admin.space.is_full() {
            return Err(Status::failed_precondition(format!(
                "node {} does not campaign: {}",
                self.admin.node_id,
                self.admin.space.reason()
            )));
        }
        {
            let m = g.raft.metrics();
            let m = m.borrow();
            tracing::debug!(group = group_id, vote = %m.vote, last_log = ?m.last_log_index, state = ?m.state, "campaigning on a hand-over");
        }
        g.raft
            .trigger()
            .elect()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(ElectReply {}))
    }

    async fn ping(&self, request: Request<PingRequest>) -> Result<Response<PingReply>, Status> {
        self.gate.admit(&request, "Ping", None)?;
        Ok(Response::new(PingReply {
            node_id: self.admin.node_id,
        }))
    }

    async fn members(&self, request: Request<MembersRequest>) -> Result<Response<MemberListReply>, Status> {
        self.gate.admit(&request, "Members", None)?;
        let control = self
            .admin
            .cluster
            .control()
            .ok_or_else(|| Status::unavailable("no control group here"))?;
        Ok(Response::new(self.admin.members_here(&control).await?))
    }

    async fn local_status(&self, request: Request<LocalStatusRequest>) -> Result<Response<StatusReply>, Status> {
        self.gate.admit(&request, "LocalStatus", None)?;
        Ok(Response::new(self.admin.local_status()?))
    }

    async fn local_queue_summary(
        &self,
        request: Request<LocalQueueSummaryRequest>,
    ) -> Result<Response<QueueSummaryReply>, Status> {
        self.gate.admit(&request, "LocalQueueSummary", None)?;
        let only: BTreeSet<u64> = request.into_inner().shards.into_iter().collect();
        self.admin.local_summary(&only).map(Response::new)
    }

    async fn local_stats(&self, request: Request<LocalStatsRequest>) -> Result<Response<StatsReply>, Status> {
        self.gate.admit(&request, "LocalStats", None)?;
        let since = request.into_inner().since_secs.clamp(60, 24 * 3600) as i64;
        let now = chrono::Utc::now().timestamp();
        let window = self.admin.stats.window(now, since);
        Ok(Response::new(StatsReply {
            nodes: vec![NodeStats {
                node: self.admin.node_id,
                window: bincode::serialize(&window).map_err(|e| Status::internal(e.to_string()))?,
            }],
            unreachable: Vec::new(),
        }))
    }

    async fn local_queue_list(&self, request: Request<QueueListRequest>) -> Result<Response<QueueListReply>, Status> {
        self.gate.admit(&request, "LocalQueueList", None)?;
        self.admin.local_list(request.get_ref()).map(Response::new)
    }

    async fn local_queue_show(&self, request: Request<QueueShowRequest>) -> Result<Response<QueueShowReply>, Status> {
        self.gate.admit(&request, "LocalQueueShow", None)?;
        let req = request.into_inner();
        self.admin.local_show(&req.id, req.with_body).map(Response::new)
    }
}
