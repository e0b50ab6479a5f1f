//! The gRPC AdminService spoken by `ternctl`: node and cluster status and
//! read-only queue queries (summary, list, show).
//!
//! `status` (shard list), `queue summary`, `queue list` and `queue show`
//! are cluster-wide: the node asked gathers every member's part
//! (`local_only` requests between nodes, bounded) and names the members
//! that did not answer. A queue operation on ids of one shard (`shard` set,
//! what ternctl sends) is written to that shard's leader wherever it is;
//! one by filters alone acts on the shards this node hosts (listing.rs).
//! Membership operations run on the control-group leader (forwarded there).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use tern_proto::admin::admin_service_server::AdminService;
use tern_proto::admin::*;

pub mod apikey;
pub mod audit;
pub mod authz;
pub mod listing;
pub mod select;
pub mod shaping;
pub mod suppression;
pub mod webhook;
pub use crate::cluster;
use crate::pki::Role;
use tonic::{Request, Response, Status};

use crate::cluster::control::NODE_PREFIX;
use crate::queue::message::MessageRecord;
use crate::raft::groups::{GroupHandle, Groups};
use crate::raft::{NodeId, CONTROL_GROUP};

pub struct Admin {
    pub node_id: NodeId,
    pub hostname: String,
    pub groups: Arc<Groups>,
    pub cluster: Arc<cluster::Cluster>,
    /// Queue ids for the reports `queue bounce` sends.
    pub ids: Arc<crate::queue::IdGen>,
    /// This node's delivery analytics.
    pub stats: Arc<crate::queue::stats::Stats>,
    /// Free space of the data directory: no writes or campaigns while full.
    pub space: Arc<crate::storage::space::DiskSpace>,
    /// Who may call what (operator roles); see authz.rs.
    pub authz: Arc<authz::Authz>,
    /// Delivery, for `shaping show` (next hops, rules, this node's limiters).
    pub delivery: Arc<crate::delivery::Delivery>,
    /// `[[webhook]]` names and what the outbox dispatch saw (`webhook status`).
    pub webhooks: (crate::outbox::dispatch::Names, crate::outbox::dispatch::Status),
    /// The node's config reload (`ternctl config reload`), once the listeners exist.
    pub reload: Arc<std::sync::OnceLock<Arc<crate::reload::Reloader>>>,
}

/// The reply every recipient gets from `ternctl queue bounce`.
const ADMIN_BOUNCE_REPLY: &str = "550 5.7.1 Message bounced by the administrator";
/// How long `queue bounce` waits for deliveries in flight of the messages it bounces.
const BOUNCE_CLAIM_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
/// Messages per Raft write for queue operations.
const OP_BATCH: usize = 500;

/// How long the node asked waits for each other member's part of a
/// cluster-wide query before reporting it unreachable.
const PEER_QUERY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// How long a domain suspend/resume made through a follower waits to see
/// its write applied locally before answering.
const SUSPENSION_APPLY_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

/// Every message record of one shard, in id (arrival) order.
fn records(group: &GroupHandle) -> impl Iterator<Item = Result<MessageRecord, Status>> {
    group.sm.messages().map(|r| r.map_err(internal))
}

fn message_info(shard: u64, r: &MessageRecord) -> MessageInfo {
    let e = &r.envelope;
    MessageInfo {
        id: r.id.clone(),
        shard,
        reverse_path: e.reverse_path.clone(),
        recipients: e
            .recipients
            .iter()
            .zip(&r.rcpt_state)
            .map(|(rc, st)| RecipientInfo {
                address: rc.address.clone(),
                status: st.status.as_str().to_owned(),
                notify: notify_text(&rc.notify),
                orcpt: rc.orcpt.clone().unwrap_or_default(),
                last_reply: st.last_reply.clone(),
            })
            .collect(),
        size: r.size,
        received_at: r.received_at,
        attempts: r.attempts,
        next_attempt: r.next_attempt,
        ret: match e.ret {
            Some(crate::envelope::Ret::Full) => "FULL".into(),
            Some(crate::envelope::Ret::Hdrs) => "HDRS".into(),
            None => String::new(),
        },
        envid: e.envid.clone().unwrap_or_default(),
        body_type: format!("{:?}", e.body_type),
        smtputf8: e.smtputf8,
        helo: e.helo.clone(),
        client_ip: e.client_ip.clone(),
        held: r.held,
    }
}

/// Adds one node's summary of its shards to `into`.
fn merge_summary(into: &mut QueueSummaryReply, part: QueueSummaryReply) {
    into.messages += part.messages;
    into.recipients += part.recipients;
    into.bytes += part.bytes;
    into.oldest_age_secs = into.oldest_age_secs.max(part.oldest_age_secs);
    for d in part.domains {
        match into.domains.iter_mut().find(|x| x.domain == d.domain) {
            Some(x) => {
                x.messages += d.messages;
                x.recipients += d.recipients;
                x.held += d.held;
                x.oldest_age_secs = x.oldest_age_secs.max(d.oldest_age_secs);
                if x.last_error.is_empty() {
                    x.last_error = d.last_error;
                }
            }
            None => into.domains.push(d),
        }
    }
    into.domains.sort_by(|a, b| a.domain.cmp(&b.domain));
}

fn notify_text(n: &crate::envelope::Notify) -> String {
    if !n.given {
        return String::new();
    }
    if n.never {
        return "NEVER".into();
    }
    let mut parts = Vec::new();
    for (on, name) in [(n.success, "SUCCESS"), (n.failure, "FAILURE"), (n.delay, "DELAY")] {
        if on {
            parts.push(name);
        }
    }
    parts.join(",")
}

impl Admin {
    /// Writes through a group's leader: here if this node leads it, else
    /// passed to the leader as a typed peer operation.
    async fn write(&self, group: &GroupHandle, op: tern_model::peer::Operation) -> Result<(), Status> {
        if group.leader() == Some(self.node_id) {
            let request = op
                .into_request()
                .ok_or_else(|| Status::internal("operation without a request"))?;
            group
                .raft
                .client_write(request)
                .await
                .map(|_| ())
                .map_err(|e| Status::unavailable(format!("write to group {} failed: {e}", group.id)))
        } else {
            self.cluster
                .peers
                .operate(group, &op)
                .await
                .map(|_| ())
                .map_err(|e| Status::unavailable(e.to_string()))
        }
    }

    /// `ternctl queue bounce` of `ids` in `group`, decided on the shard's
    /// leader: a follower's replica may not have the latest outcomes yet, and
    /// only the leader knows which messages are being delivered. There each
    /// message is claimed from delivery first (waiting for an attempt in
    /// flight to commit its outcome), so it gets one outcome, delivered or
    /// bounced, and at most one report. Returns how many messages had a
    /// recipient bounced.
    pub(crate) async fn bounce_on_leader(
        &self,
        group: &GroupHandle,
        ids: Vec<String>,
        forwarded: bool,
        now: i64,
    ) -> Result<u64, Status> {
        if group.leader() != Some(self.node_id) {
            if forwarded {
                return Err(Status::unavailable(format!(
                    "not the leader of shard {} any more; try again",
                    group.id
                )));
            }
            tracing::debug!(
                shard = group.id,
                n = ids.len(),
                "queue bounce passed to the shard leader"
            );
            return self
                .cluster
                .peers
                .operate(group, &tern_model::peer::Operation::Bounce { ids })
                .await
                .map_err(|e| Status::unavailable(e.to_string()));
        }
        // Everything committed before is applied here before we read.
        group
            .raft
            .ensure_linearizable()
            .await
            .map_err(|e| Status::unavailable(format!("shard {}: {e}", group.id)))?;
        let deadline = tokio::time::Instant::now() + BOUNCE_CLAIM_WAIT;
        let mut affected = 0u64;
        let mut busy = Vec::new();
        for chunk in ids.chunks(OP_BATCH) {
            let mut claimed = Vec::with_capacity(chunk.len());
            for id in chunk {
                if group.handover.claim_by(id, deadline).await {
                    claimed.push(id.as_str());
                } else {
                    busy.push(id.as_str());
                }
            }
            let result = self.write_bounces(group, &claimed, now).await;
            for id in &claimed {
                group.handover.release(id);
            }
            affected += result?;
        }
        if !busy.is_empty() {
            // Left to the delivery under way (not counted as affected).
            tracing::warn!(
                shard = group.id,
                n = busy.len(),
                first = busy[0],
                wait_secs = BOUNCE_CLAIM_WAIT.as_secs(),
                "queue bounce: messages still being delivered were not bounced; run the bounce again"
            );
        }
        Ok(affected)
    }

    /// Bounces the pending recipients of `ids` (claimed: nothing delivers
    /// them meanwhile) as the leader's state has them now.
    async fn write_bounces(&self, group: &GroupHandle, ids: &[&str], now: i64) -> Result<u64, Status> {
        let mut updates = Vec::new();
        let mut reports = Vec::new();
        for id in ids {
            let Some(record) = group.sm.message(id).map_err(internal)? else {
                continue; // delivered (or removed) meanwhile
            };
            if record.rcpt_state.iter().all(|s| s.status.is_final()) {
                continue;
            }
            let body = match &record.body {
                Some(loc) => group.sm.wal().read(loc).map_err(internal)?,
                None => Vec::new(),
            };
            let message = crate::delivery::LoadedMessage { record, body };
            let (update, dsn) =
                crate::queue::ops::admin_bounce(&self.hostname, self.ids.next(), &message, ADMIN_BOUNCE_REPLY, now);
            updates.push(update);
            reports.push(dsn);
        }
        if updates.is_empty() {
            return Ok(0);
        }
        let n = updates.len() as u64;
        group
            .raft
            .client_write(crate::raft::Request::Bounce { updates, reports })
            .await
            .map_err(|e| Status::unavailable(format!("write to group {} failed: {e}", group.id)))?;
        Ok(n)
    }

    fn suspensions(&self, now: i64) -> Vec<DomainSuspension> {
        let Some(control) = self.groups.get(CONTROL_GROUP) else {
            return Vec::new();
        };
        control
            .sm
            .tree()
            .scan_prefix(crate::cluster::control::SUSPEND_PREFIX)
            .flatten()
            .filter_map(|(k, v)| {
                let domain = String::from_utf8_lossy(&k[crate::cluster::control::SUSPEND_PREFIX.len()..]).into_owned();
                let (until, reason): (i64, String) = bincode::deserialize(&v).ok()?;
                (until > now).then_some(DomainSuspension { domain, until, reason })
            })
            .collect()
    }

    async fn set_suspension(&self, domain: &str, until: i64, reason: String) -> Result<Response<DomainReply>, Status> {
        let domain = domain.trim().trim_end_matches('.').to_ascii_lowercase();
        if domain.is_empty() || domain.contains(char::is_whitespace) {
            return Err(Status::invalid_argument("give a domain"));
        }
        let control = self
            .cluster
            .control()
            .ok_or_else(|| Status::unavailable("no control group here"))?;
        let key = [crate::cluster::control::SUSPEND_PREFIX, domain.as_bytes()].concat();
        self.write(&control, tern_model::peer::Operation::Suspend { domain, until, reason })
            .await?;
        // A write forwarded to the control leader is applied here only when
        // the next append brings the commit index: wait for it (bounded), or
        // the reply would still show the old state.
        let applied = || match control.sm.tree().get(&key) {
            Ok(Some(v)) => bincode::deserialize::<(i64, String)>(&v).is_ok_and(|(u, _)| u == until),
            Ok(None) => until == 0,
            Err(_) => true,
        };
        let deadline = tokio::time::Instant::now() + SUSPENSION_APPLY_WAIT;
        while !applied() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let now = chrono::Utc::now().timestamp();
        Ok(Response::new(DomainReply {
            suspended: self.suspensions(now),
        }))
    }

    /// The suppression list's replica here and its writer.
    fn suppression_access(&self) -> Result<(crate::cluster::control::ControlState, cluster::ControlWriter), Status> {
        let control = self
            .cluster
            .control()
            .ok_or_else(|| Status::unavailable("no control group here"))?;
        Ok((
            crate::cluster::control::ControlState::new(control.sm.tree()),
            self.cluster.control_writer(),
        ))
    }

    /// The control group when its leader is another node (membership
    /// changes run there, passed on as peer operations); `None` when this
    /// node leads it.
    fn control_elsewhere(&self) -> Result<Option<GroupHandle>, Status> {
        let control = self
            .cluster
            .control()
            .ok_or_else(|| Status::unavailable("no control group here"))?;
        if control.leader() == Some(self.node_id) {
            return Ok(None);
        }
        Ok(Some(control))
    }

    /// `shard add` on the control leader (this node): the new shard ids.
    pub(crate) async fn add_shards_here(&self, count: u32, request_id: Option<&str>) -> Result<Vec<u64>, Status> {
        self.cluster.add_shards(count, request_id).await.map_err(|e| match e {
            cluster::ClusterError::Refused(m) => Status::invalid_argument(m),
            other => Status::unavailable(other.to_string()),
        })
    }

    /// `member add` on the control leader (this node).
    pub(crate) async fn add_member_here(&self, id: NodeId, addr: &str) -> Result<MemberAddReply, Status> {
        if self.cluster.removed().contains(&id) {
            return Err(Status::failed_precondition(cluster::removed_id_error(id)));
        }
        if self.cluster.nodes().get(&id).is_some_and(|a| a != addr) {
            return Err(Status::already_exists(format!(
                "node {id} is already a member with another address; ids are never reused"
            )));
        }
        self.check_identity(id, addr).await?;
        let role = self
            .cluster
            .add_member(id, addr)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(MemberAddReply { role: role.into() })
    }

    /// The node at `addr` must say it is node `id` (its `[node] id`): a
    /// typo in either would otherwise make a member no node answers for, or
    /// give one node two ids. With cluster TLS its certificate must name
    /// `id` as well.
    async fn check_identity(&self, id: NodeId, addr: &str) -> Result<(), Status> {
        let mut client = self
            .cluster
            .peers
            .peer(id, &self.cluster.peers.dial(id, addr.to_owned()))?;
        let ping = client.ping(tern_proto::peer::PingRequest {});
        let answer = match tokio::time::timeout(PEER_QUERY_TIMEOUT, ping).await {
            Ok(Ok(r)) => r.into_inner().node_id,
            Ok(Err(e)) => {
                return Err(Status::failed_precondition(format!(
                    "cannot check that the node at {addr} is node {id}: {}",
                    e.message()
                )))
            }
            Err(_) => {
                return Err(Status::failed_precondition(format!(
                    "cannot check that the node at {addr} is node {id}: no answer within {PEER_QUERY_TIMEOUT:?}; start it (without bootstrap) first"
                )))
            }
        };
        if answer != id {
            return Err(Status::failed_precondition(format!(
                "the node at {addr} is node {answer} (its [node] id), not node {id}"
            )));
        }
        Ok(())
    }

    /// `member remove` on the control leader (this node); when it removes
    /// itself, the control leadership moves first and the new leader removes it.
    pub(crate) async fn remove_member_here(&self, id: NodeId, force: bool) -> Result<(), Status> {
        if id == self.node_id {
            self.cluster
                .move_control_leader()
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
            let control = self
                .control_elsewhere()?
                .ok_or_else(|| Status::unavailable("the control leadership did not move"))?;
            return self
                .cluster
                .peers
                .operate_status(&control, &tern_model::peer::Operation::MemberRemove { id, force })
                .await
                .map(|_| ());
        }
        // Asked now: a control leader elected moments ago has no pings yet.
        let reachable = self.cluster.peers.ping_all(&self.cluster.nodes()).await;
        self.cluster
            .remove_member(id, force, &reachable)
            .await
            .map_err(|e| Status::failed_precondition(e.to_string()))
    }

    /// Queue summary of the shards this node hosts (only those in `only`
    /// when it is not empty).
    pub(crate) fn local_summary(&self, only: &BTreeSet<u64>) -> Result<QueueSummaryReply, Status> {
        let now = chrono::Utc::now().timestamp();
        let mut reply = QueueSummaryReply::default();
        #[derive(Default)]
        struct PerDomain {
            messages: u64,
            recipients: u64,
            oldest: Option<i64>,
            /// (received_at, reply) of the newest message with a deferral reply.
            last_error: Option<(i64, String)>,
            held: u64,
        }
        let mut domains: BTreeMap<String, PerDomain> = BTreeMap::new();
        let mut oldest = now;
        for g in self.groups.shards() {
            if !only.is_empty() && !only.contains(&g.id) {
                continue;
            }
            for record in records(&g) {
                let record = record?;
                reply.messages += 1;
                reply.bytes += record.size;
                oldest = oldest.min(record.received_at);
                let mut seen = std::collections::BTreeSet::new();
                for (rcpt, state) in record.envelope.recipients.iter().zip(&record.rcpt_state) {
                    if state.status.is_final() {
                        continue;
                    }
                    reply.recipients += 1;
                    let domain = crate::envelope::Envelope::domain_of(&rcpt.address);
                    let d = domains.entry(domain.clone()).or_default();
                    d.recipients += 1;
                    if !state.last_reply.is_empty()
                        && d.last_error.as_ref().is_none_or(|(t, _)| *t <= record.received_at)
                    {
                        d.last_error = Some((record.received_at, state.last_reply.clone()));
                    }
                    if seen.insert(domain) {
                        d.messages += 1;
                        d.held += u64::from(record.held);
                        d.oldest = Some(d.oldest.map_or(record.received_at, |o| o.min(record.received_at)));
                    }
                }
            }
        }
        reply.oldest_age_secs = (now - oldest).max(0) as u64;
        reply.domains = domains
            .into_iter()
            .map(|(domain, d)| DomainCount {
                domain,
                messages: d.messages,
                recipients: d.recipients,
                oldest_age_secs: d.oldest.map(|o| (now - o).max(0) as u64).unwrap_or(0),
                last_error: d.last_error.map(|(_, e)| e).unwrap_or_default(),
                held: d.held,
            })
            .collect();
        Ok(reply)
    }

    /// Message `id` as this node's replicas have it (`message` absent: not here).
    pub(crate) fn local_show(&self, id: &str, with_body: bool) -> Result<QueueShowReply, Status> {
        for g in self.groups.shards() {
            if let Some(record) = g.sm.message(id).map_err(internal)? {
                let body = match (&record.body, with_body) {
                    (Some(loc), true) => g.sm.wal().read(loc).map_err(internal)?,
                    _ => Vec::new(),
                };
                return Ok(QueueShowReply {
                    message: Some(message_info(g.id, &record)),
                    body,
                });
            }
        }
        Ok(QueueShowReply::default())
    }

    /// This node's own view: members and the shards it hosts.
    pub(crate) fn local_status(&self) -> Result<StatusReply, Status> {
        let (members, control_leader) = self.members()?;
        let shards = self.cluster.local_shards();
        Ok(StatusReply {
            node_id: self.node_id,
            hostname: self.hostname.clone(),
            members,
            queued_messages: shards.iter().map(|s| s.queued_messages).sum(),
            shards,
            control_leader,
            version: env!("CARGO_PKG_VERSION").into(),
            unreachable: Vec::new(),
            replicas: self.cluster.want_replicas() as u32,
            rebalance_moves: self.cluster.rebalance_moves() as u32,
        })
    }

    fn members(&self) -> Result<(Vec<Member>, u64), Status> {
        let control = self
            .groups
            .get(CONTROL_GROUP)
            .ok_or_else(|| Status::unavailable("control group not hosted here"))?;
        let metrics = control.raft.metrics().borrow().clone();
        let leader = metrics.current_leader.unwrap_or(0);
        let voters: Vec<NodeId> = metrics.membership_config.membership().voter_ids().collect();
        let mut members = Vec::new();
        for item in control.sm.tree().scan_prefix(NODE_PREFIX) {
            let (k, v) = item.map_err(internal)?;
            let id = u64::from_be_bytes(k[NODE_PREFIX.len()..].try_into().map_err(internal)?);
            members.push(Member {
                id,
                addr: String::from_utf8_lossy(&v).into_owned(),
                role: if voters.contains(&id) { "voter" } else { "learner" }.into(),
                is_control_leader: id == leader,
            });
        }
        Ok((members, leader))
    }
}

#[tonic::async_trait]
impl AdminService for Admin {
    async fn status(&self, request: Request<StatusRequest>) -> Result<Response<StatusReply>, Status> {
        self.authz.check(&request, Role::Viewer).await?;
        let (members, control_leader) = self.members()?;
        // Cluster-wide unless asked for this node's view only (between nodes).
        let (shards, unreachable) = if request.into_inner().local_only {
            (self.cluster.local_shards(), Vec::new())
        } else {
            let (mut merged, unreachable) = self.cluster.all_shards().await;
            // Retired shards are hosted nowhere: listed from their records.
            for (shard, record) in self.cluster.shard_records() {
                merged.entry(shard).or_insert_with(|| tern_proto::admin::ShardStatus {
                    shard,
                    state: record.state.as_str().into(),
                    ..Default::default()
                });
            }
            (merged.into_values().collect(), unreachable)
        };
        let total = shards.iter().map(|s| s.queued_messages).sum();
        Ok(Response::new(StatusReply {
            replicas: self.cluster.want_replicas() as u32,
            rebalance_moves: self.cluster.rebalance_moves() as u32,
            unreachable,
            node_id: self.node_id,
            hostname: self.hostname.clone(),
            members,
            shards,
            queued_messages: total,
            control_leader,
            version: env!("CARGO_PKG_VERSION").into(),
        }))
    }

    async fn queue_summary(
        &self,
        request: Request<QueueSummaryRequest>,
    ) -> Result<Response<QueueSummaryReply>, Status> {
        self.authz.check(&request, Role::Viewer).await?;
        let req = request.into_inner();
        if req.local_only {
            let only: BTreeSet<u64> = req.shards.into_iter().collect();
            return self.local_summary(&only).map(Response::new);
        }
        // Each shard is counted once, by its leader when that answers (the
        // freshest copy), else by this node or another replica.
        let listing::Assignment {
            by_node: mut assigned,
            mut missing,
            mut unreachable,
        } = self.assign_shards().await;
        let nodes = self.cluster.nodes();
        let mut reply = match assigned.remove(&self.node_id) {
            Some(only) => self.local_summary(&only)?,
            None => QueueSummaryReply::default(),
        };
        let asks = assigned.into_iter().map(|(node, only)| {
            let client = nodes.get(&node).map(|addr| self.cluster.peers.peer(node, addr));
            async move {
                let answer = async {
                    let mut client = client?.ok()?;
                    let ask = client.local_queue_summary(tern_proto::peer::LocalQueueSummaryRequest {
                        shards: only.iter().copied().collect(),
                    });
                    match tokio::time::timeout(PEER_QUERY_TIMEOUT, ask).await {
                        Ok(Ok(r)) => Some(r.into_inner()),
                        _ => None,
                    }
                }
                .await;
                (node, only, answer)
            }
        });
        for (node, only, answer) in futures::future::join_all(asks).await {
            match answer {
                Some(part) => merge_summary(&mut reply, part),
                None => {
                    unreachable.push(node);
                    missing.extend(only);
                }
            }
        }
        unreachable.sort_unstable();
        unreachable.dedup();
        missing.sort_unstable();
        reply.unreachable = unreachable;
        reply.missing_shards = missing;
        Ok(Response::new(reply))
    }

    async fn queue_list(&self, request: Request<QueueListRequest>) -> Result<Response<QueueListReply>, Status> {
        self.authz.check(&request, Role::Viewer).await?;
        let req = request.into_inner();
        if req.local_only {
            return self.local_list(&req).map(Response::new);
        }
        self.cluster_list(req).await.map(Response::new)
    }

    async fn queue_show(&self, request: Request<QueueShowRequest>) -> Result<Response<QueueShowReply>, Status> {
        // Reading mail content needs an operator, and is audited.
        let audit = if request.get_ref().with_body {
            let selection = format!("id={}", request.get_ref().id);
            Some(
                self.authz
                    .check_change(&request, Role::Operator, "queue show --body", selection)
                    .await?,
            )
        } else {
            self.authz.check(&request, Role::Viewer).await?;
            None
        };
        let req = request.into_inner();
        let result = async {
            let here = self.local_show(&req.id, req.with_body)?;
            if here.message.is_some() {
                return Ok(Response::new(here));
            }
            if !req.local_only {
                if let Some(found) = self.show_elsewhere(&req).await? {
                    return Ok(Response::new(found));
                }
            }
            Err(Status::not_found(format!("no queued message with id {}", req.id)))
        }
        .await;
        match audit {
            Some(audit) => audit.finish(result, |_| 1),
            None => result,
        }
    }

    async fn member_add(&self, request: Request<MemberAddRequest>) -> Result<Response<MemberAddReply>, Status> {
        let selection = format!("id={} addr={}", request.get_ref().id, request.get_ref().addr);
        let audit = self
            .authz
            .check_change(&request, Role::Admin, "member add", selection)
            .await?;
        let req = request.into_inner();
        let result = async {
            if req.id == 0 || req.addr.is_empty() {
                return Err(Status::invalid_argument("need --id (at least 1) and --addr HOST:PORT"));
            }
            if let Some(control) = self.control_elsewhere()? {
                let op = tern_model::peer::Operation::MemberAdd {
                    id: req.id,
                    addr: req.addr,
                };
                let reply = self.cluster.peers.operate_status(&control, &op).await?;
                return Ok(Response::new(MemberAddReply { role: reply.detail }));
            }
            self.add_member_here(req.id, &req.addr).await.map(Response::new)
        }
        .await;
        audit.finish(result, |_| 0)
    }

    async fn member_list(&self, request: Request<MemberListRequest>) -> Result<Response<MemberListReply>, Status> {
        self.authz.check(&request, Role::Viewer).await?;
        let control = self
            .cluster
            .control()
            .ok_or_else(|| Status::unavailable("no control group here"))?;
        if control.leader() != Some(self.node_id) {
            // Reachability and lag are known to the control-group leader.
            if let Some((leader, addr)) = self.cluster.peers.leader_addr(&control) {
                let mut client = self.cluster.peers.peer(leader, &addr)?;
                if let Ok(reply) = client.members(tern_proto::peer::MembersRequest {}).await {
                    return Ok(reply);
                }
            }
        }
        self.members_here(&control).await.map(Response::new)
    }

    async fn shard_add(&self, request: Request<ShardAddRequest>) -> Result<Response<ShardAddReply>, Status> {
        let selection = match request.get_ref().request_id.as_str() {
            "" => format!("count={}", request.get_ref().count),
            id => format!("count={} request_id={id}", request.get_ref().count),
        };
        let audit = self
            .authz
            .check_change(&request, Role::Admin, "shard add", selection)
            .await?;
        let ShardAddRequest { count, request_id } = request.into_inner();
        let request_id = (!request_id.is_empty()).then_some(request_id);
        let result = async {
            // Checked here too, so that a bad N or id never travels.
            cluster::shards::next_shard_ids([], &Default::default(), count).map_err(Status::invalid_argument)?;
            if let Some(id) = &request_id {
                cluster::shards::check_request_id(id).map_err(Status::invalid_argument)?;
            }
            if let Some(control) = self.control_elsewhere()? {
                let op = match &request_id {
                    // The earlier operation, so that a control leader of
                    // the previous release still reads a call without an id.
                    None => tern_model::peer::Operation::ShardAdd { count },
                    Some(id) => tern_model::peer::Operation::ShardAddOnce {
                        count,
                        request_id: id.clone(),
                    },
                };
                let reply = self.cluster.peers.operate_status(&control, &op).await?;
                let shards = reply.detail.split(',').filter_map(|s| s.parse().ok()).collect();
                return Ok(Response::new(ShardAddReply { shards }));
            }
            let shards = self.add_shards_here(count, request_id.as_deref()).await?;
            Ok(Response::new(ShardAddReply { shards }))
        }
        .await;
        audit.finish(result, |r| r.get_ref().shards.len() as u64)
    }

    async fn shard_retire(&self, request: Request<ShardRetireRequest>) -> Result<Response<ShardRetireReply>, Status> {
        let selection = format!("shard={}", request.get_ref().shard);
        let audit = self
            .authz
            .check_change(&request, Role::Admin, "shard retire", selection)
            .await?;
        let shard = request.into_inner().shard;
        let result = async {
            cluster::shards::check_retire(&self.cluster.placement(), &self.cluster.shard_records(), shard)
                .map_err(Status::failed_precondition)?;
            let record = cluster::shards::ShardRecord {
                state: cluster::shards::ShardState::Retiring,
                since: chrono::Utc::now().timestamp(),
            };
            let value = bincode::serialize(&record).map_err(|e| Status::internal(e.to_string()))?;
            let control = self
                .cluster
                .control()
                .ok_or_else(|| Status::unavailable("no control group here"))?;
            self.write(
                &control,
                tern_model::peer::Operation::PutShared {
                    space: cluster::shards::SPACE.into(),
                    entries: vec![(cluster::shards::state_key(shard), value)],
                },
            )
            .await?;
            Ok(Response::new(ShardRetireReply {}))
        }
        .await;
        audit.finish(result, |_| 1)
    }

    async fn cluster_set(&self, request: Request<ClusterSetRequest>) -> Result<Response<ClusterSetReply>, Status> {
        let selection = format!("{}={}", request.get_ref().key, request.get_ref().value);
        let audit = self
            .authz
            .check_change(&request, Role::Admin, "cluster set", selection)
            .await?;
        let req = request.into_inner();
        let result = async {
            let number = |what: &str| -> Result<u32, Status> {
                req.value
                    .trim()
                    .parse()
                    .map_err(|_| Status::invalid_argument(format!("{what}: {:?} is not a number", req.value)))
            };
            let (key, value) = match req.key.as_str() {
                "replicas" => {
                    let replicas = number("replicas")?;
                    cluster::shards::check_replicas(replicas, self.cluster.nodes().len())
                        .map_err(Status::invalid_argument)?;
                    (cluster::shards::REPLICAS_KEY, replicas)
                }
                "rebalance_moves" => {
                    let moves = number("rebalance_moves")?;
                    cluster::shards::check_rebalance_moves(moves).map_err(Status::invalid_argument)?;
                    (cluster::shards::REBALANCE_MOVES_KEY, moves)
                }
                other => {
                    return Err(Status::invalid_argument(format!(
                        "cluster set: unknown setting {other:?} (settings: replicas, rebalance_moves)"
                    )))
                }
            };
            let value = bincode::serialize(&value).map_err(|e| Status::internal(e.to_string()))?;
            let control = self
                .cluster
                .control()
                .ok_or_else(|| Status::unavailable("no control group here"))?;
            self.write(
                &control,
                tern_model::peer::Operation::PutShared {
                    space: cluster::shards::SPACE.into(),
                    entries: vec![(key.into(), value)],
                },
            )
            .await?;
            Ok(Response::new(ClusterSetReply {}))
        }
        .await;
        audit.finish(result, |_| 1)
    }

    async fn move_leader(&self, request: Request<MoveLeaderRequest>) -> Result<Response<MoveLeaderReply>, Status> {
        let selection = format!("shard={} node={}", request.get_ref().shard, request.get_ref().node);
        let audit = self
            .authz
            .check_change(&request, Role::Admin, "move leader", selection)
            .await?;
        let req = request.into_inner();
        let result = async {
            let replicas: Vec<NodeId> = if req.shard == CONTROL_GROUP {
                // The control group's leader moves among its voters.
                let control = self
                    .cluster
                    .control()
                    .ok_or_else(|| Status::unavailable("no control group here"))?;
                control.voters().into_iter().collect()
            } else {
                self.cluster.placement().get(&req.shard).cloned().unwrap_or_default()
            };
            if !replicas.contains(&req.node) {
                return Err(Status::failed_precondition(format!(
                    "node {} holds no replica of shard {} (replicas: {replicas:?})",
                    req.node, req.shard
                )));
            }
            self.cluster
                .move_leader(req.shard, req.node)
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
            Ok(Response::new(MoveLeaderReply {}))
        }
        .await;
        audit.finish(result, |_| 0)
    }

    async fn member_remove(
        &self,
        request: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveReply>, Status> {
        let selection = format!("id={} force={}", request.get_ref().id, request.get_ref().force);
        let audit = self
            .authz
            .check_change(&request, Role::Admin, "member remove", selection)
            .await?;
        let req = request.into_inner();
        let result = async {
            if let Some(control) = self.control_elsewhere()? {
                let op = tern_model::peer::Operation::MemberRemove {
                    id: req.id,
                    force: req.force,
                };
                self.cluster.peers.operate_status(&control, &op).await?;
                return Ok(Response::new(MemberRemoveReply {}));
            }
            self.remove_member_here(req.id, req.force).await?;
            Ok(Response::new(MemberRemoveReply {}))
        }
        .await;
        audit.finish(result, |_| 0)
    }

    async fn drain(&self, request: Request<DrainRequest>) -> Result<Response<DrainReply>, Status> {
        let action = if request.get_ref().drained {
            "node drain"
        } else {
            "node undrain"
        };
        let selection = format!("node={}", request.get_ref().id);
        let audit = self
            .authz
            .check_change(&request, Role::Operator, action, selection)
            .await?;
        let req = request.into_inner();
        let result = async {
            if !self.cluster.nodes().contains_key(&req.id) {
                return Err(Status::not_found(format!("node {} is not a member", req.id)));
            }
            let control = self
                .cluster
                .control()
                .ok_or_else(|| Status::unavailable("no control group here"))?;
            self.write(
                &control,
                tern_model::peer::Operation::Drain {
                    node: req.id,
                    drained: req.drained,
                },
            )
            .await?;
            Ok(Response::new(DrainReply {}))
        }
        .await;
        audit.finish(result, |_| 0)
    }

    async fn queue_op(&self, request: Request<QueueOpRequest>) -> Result<Response<QueueOpReply>, Status> {
        let r = request.get_ref();
        let action = match r.op.as_str() {
            "hold" => "queue hold",
            "release" => "queue release",
            "delete" => "queue delete",
            "retry" => "queue retry",
            "bounce" => "queue bounce",
            _ => "queue (unknown operation)",
        };
        let mut selection = audit::queue_selection(&r.ids, &r.domain, &r.sender, r.older_than_secs);
        for (k, v) in [
            (
                "newer_than",
                (r.newer_than_secs > 0).then(|| format!("{}s", r.newer_than_secs)),
            ),
            ("state", (!r.state.is_empty()).then(|| r.state.clone())),
            (
                "reply_class",
                (!r.reply_class.is_empty()).then(|| r.reply_class.clone()),
            ),
            ("shard", (r.shard > 0).then(|| r.shard.to_string())),
        ] {
            if let Some(v) = v {
                selection.push_str(&format!(" {k}={v}"));
            }
        }
        if r.dry_run {
            selection.push_str(" dry_run");
        }
        let audit = self
            .authz
            .check_change(&request, Role::Operator, action, selection)
            .await?;
        let result = async {
            use crate::raft::QueueAction;
            let req = request.into_inner();
            let action = match req.op.as_str() {
                "hold" => Some(QueueAction::Hold),
                "release" => Some(QueueAction::Release),
                "delete" => Some(QueueAction::Delete),
                "retry" => Some(QueueAction::Retry),
                "bounce" => None,
                other => return Err(Status::invalid_argument(format!("unknown queue operation {other:?}"))),
            };
            let select = select::Selection::new(
                &req.ids,
                &req.domain,
                &req.sender,
                req.older_than_secs,
                req.newer_than_secs,
                &req.state,
                &req.reply_class,
            )?;
            if select.is_empty() {
                return Err(Status::invalid_argument(
                    "give message ids, or at least one of --domain, --sender, --older-than, --newer-than, --state, --reply-class",
                ));
            }
            if req.shard != 0 && !req.dry_run {
                if req.ids.is_empty() {
                    return Err(Status::invalid_argument("an operation on a shard needs its message ids"));
                }
                let affected = self.op_on_shard(req.shard, action, req.ids, req.on_leader).await?;
                tracing::info!(op = %req.op, shard = req.shard, affected, "queue operation");
                return Ok(Response::new(QueueOpReply {
                    matched: affected,
                    affected,
                    ids: Vec::new(),
                }));
            }
            let now = chrono::Utc::now().timestamp();
            let matches = |r: &MessageRecord| select.matches(r, now);
            let mut selected: Vec<(GroupHandle, Vec<MessageRecord>)> = Vec::new();
            let mut matched = 0u64;
            for g in self.groups.shards() {
                let mut found = Vec::new();
                for record in records(&g) {
                    let record = record?;
                    if matches(&record) {
                        found.push(record);
                    }
                }
                matched += found.len() as u64;
                if !found.is_empty() {
                    selected.push((g, found));
                }
            }
            if req.dry_run {
                let ids = selected
                    .iter()
                    .flat_map(|(_, recs)| recs.iter().map(|r| r.id.clone()))
                    .take(100_000)
                    .collect();
                return Ok(Response::new(QueueOpReply {
                    matched,
                    affected: 0,
                    ids,
                }));
            }
            let mut affected = 0u64;
            for (group, recs) in selected {
                let Some(action) = action else {
                    let ids: Vec<String> = recs.into_iter().map(|r| r.id).collect();
                    affected += self.bounce_on_leader(&group, ids, req.on_leader, now).await?;
                    continue;
                };
                for chunk in recs.chunks(OP_BATCH) {
                    let op = tern_model::peer::Operation::Queue {
                        action,
                        ids: chunk.iter().map(|r| r.id.clone()).collect(),
                    };
                    self.write(&group, op).await?;
                    affected += chunk.len() as u64;
                }
            }
            tracing::info!(op = %req.op, matched, affected, "queue operation");
            Ok(Response::new(QueueOpReply {
                matched,
                affected,
                ids: Vec::new(),
            }))
        }
        .await;
        audit.finish(result, |r| r.get_ref().affected)
    }

    async fn domain_suspend(&self, request: Request<DomainSuspendRequest>) -> Result<Response<DomainReply>, Status> {
        let r = request.get_ref();
        let selection = format!(
            "domain={} duration={}s reason={:?}",
            r.domain, r.duration_secs, r.reason
        );
        let audit = self
            .authz
            .check_change(&request, Role::Operator, "domain suspend", selection)
            .await?;
        let req = request.into_inner();
        let result = async {
            let until = if req.duration_secs == 0 {
                i64::MAX / 2
            } else {
                chrono::Utc::now().timestamp() + req.duration_secs.min(10 * 365 * 86400) as i64
            };
            self.set_suspension(&req.domain, until, req.reason).await
        }
        .await;
        audit.finish(result, |_| 0)
    }

    async fn domain_resume(&self, request: Request<DomainResumeRequest>) -> Result<Response<DomainReply>, Status> {
        let selection = format!("domain={}", request.get_ref().domain);
        let audit = self
            .authz
            .check_change(&request, Role::Operator, "domain resume", selection)
            .await?;
        let result = self
            .set_suspension(&request.into_inner().domain, 0, String::new())
            .await;
        audit.finish(result, |_| 0)
    }

    async fn shaping_clear(
        &self,
        request: Request<ShapingClearRequest>,
    ) -> Result<Response<ShapingClearReply>, Status> {
        let selection = format!("scope={}", request.get_ref().scope);
        let audit = self
            .authz
            .check_change(&request, Role::Operator, "shaping clear", selection)
            .await?;
        let scope = request.into_inner().scope.trim().to_owned();
        let result = async {
            if scope.is_empty() {
                return Err(Status::invalid_argument(
                    "give the action's scope, as its shaping event names it (domain:example.com, mx:.google.com)",
                ));
            }
            let control = self
                .cluster
                .control()
                .ok_or_else(|| Status::unavailable("no control group here"))?;
            let state = crate::cluster::control::ControlState::new(control.sm.tree());
            let now = chrono::Utc::now().timestamp();
            let Some(action) = state.action(&scope).filter(|a| a.in_force(now)) else {
                return Err(Status::not_found(format!("no automatic action in force for {scope}")));
            };
            self.write(
                &control,
                tern_model::peer::Operation::ShapingAction {
                    key: scope.clone(),
                    action: None,
                },
            )
            .await?;
            Ok(Response::new(ShapingClearReply {
                scope,
                action: crate::backoff::action_name(&action.kind).to_owned(),
                until: action.until,
                rule: action.rule,
                reason: action.reason,
            }))
        }
        .await;
        audit.finish(result, |_| 0)
    }

    async fn domain_list(&self, request: Request<DomainListRequest>) -> Result<Response<DomainReply>, Status> {
        self.authz.check(&request, Role::Viewer).await?;
        let now = chrono::Utc::now().timestamp();
        Ok(Response::new(DomainReply {
            suspended: self.suspensions(now),
        }))
    }

    async fn suppression_add(
        &self,
        request: Request<SuppressionAddRequest>,
    ) -> Result<Response<SuppressionChangeReply>, Status> {
        let r = request.get_ref();
        let selection = match r.entries.as_slice() {
            [one] => format!("address={} scope={:?} class={}", one.address, one.scope, one.class),
            many => format!("{} entries", many.len()),
        };
        let audit = self
            .authz
            .check_change(&request, Role::Operator, "suppression add", selection)
            .await?;
        let result = async {
            let now = chrono::Utc::now().timestamp();
            let entries = suppression::validate_entries(request.into_inner().entries, now)?;
            let (control, writer) = self.suppression_access()?;
            let last = entries.last().cloned();
            let n = crate::bounce::suppress::suppress(&writer, entries)
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
            if let Some(last) = last {
                suppression::wait_applied(|| control.suppression(&last.scope, &last.address).as_ref() == Some(&last))
                    .await;
            }
            Ok(Response::new(SuppressionChangeReply { affected: n as u64 }))
        }
        .await;
        audit.finish(result, |r| r.get_ref().affected)
    }

    async fn suppression_remove(
        &self,
        request: Request<SuppressionRemoveRequest>,
    ) -> Result<Response<SuppressionChangeReply>, Status> {
        let r = request.get_ref();
        let selection = match r.keys.as_slice() {
            [one] => format!("address={} scope={:?}", one.address, one.scope),
            many => format!("{} entries", many.len()),
        };
        let audit = self
            .authz
            .check_change(&request, Role::Operator, "suppression remove", selection)
            .await?;
        let result = async {
            let keys = suppression::validate_keys(request.into_inner().keys)?;
            let (control, writer) = self.suppression_access()?;
            let present = keys
                .iter()
                .filter(|k| control.suppression(&k.scope, &k.address).is_some())
                .count();
            let last = keys.last().cloned();
            crate::bounce::suppress::unsuppress(&writer, keys)
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
            if let Some(last) = last {
                suppression::wait_applied(|| control.suppression(&last.scope, &last.address).is_none()).await;
            }
            Ok(Response::new(SuppressionChangeReply {
                affected: present as u64,
            }))
        }
        .await;
        audit.finish(result, |r| r.get_ref().affected)
    }

    async fn suppression_list(
        &self,
        request: Request<SuppressionListRequest>,
    ) -> Result<Response<SuppressionListReply>, Status> {
        self.authz.check(&request, Role::Viewer).await?;
        let (control, _) = self.suppression_access()?;
        let now = chrono::Utc::now().timestamp();
        Ok(Response::new(suppression::list(&control, request.get_ref(), now)))
    }

    async fn pool_show(&self, request: Request<PoolShowRequest>) -> Result<Response<PoolShowReply>, Status> {
        self.authz.check(&request, Role::Viewer).await?;
        let now = chrono::Utc::now().timestamp();
        let share = crate::cluster::records::share(&self.groups, self.node_id).fraction();
        // The pools in force (a config reload may have changed them).
        let pools = self.delivery.egress().map_or_else(Vec::new, |e| e.status(now, share));
        Ok(Response::new(PoolShowReply {
            node: self.node_id,
            share,
            pools: pools
                .into_iter()
                .map(crate::delivery::egress::PoolStatus::into_proto)
                .collect(),
        }))
    }

    async fn api_key_create(
        &self,
        request: Request<ApiKeyCreateRequest>,
    ) -> Result<Response<ApiKeyCreateReply>, Status> {
        let selection = apikey::create_selection(request.get_ref());
        let audit = self
            .authz
            .check_change(&request, Role::Admin, "apikey create", selection)
            .await?;
        let result = async {
            let (control, writer) = self.suppression_access()?;
            let now = chrono::Utc::now().timestamp();
            apikey::create(&control, &writer, request.into_inner(), now)
                .await
                .map(Response::new)
        }
        .await;
        audit.finish(result, |_| 1)
    }

    async fn api_key_list(&self, request: Request<ApiKeyListRequest>) -> Result<Response<ApiKeyListReply>, Status> {
        self.authz.check(&request, Role::Viewer).await?;
        let (control, _) = self.suppression_access()?;
        Ok(Response::new(apikey::list(&control)))
    }

    async fn api_key_revoke(
        &self,
        request: Request<ApiKeyRevokeRequest>,
    ) -> Result<Response<ApiKeyRevokeReply>, Status> {
        let selection = format!("key={}", request.get_ref().key);
        let audit = self
            .authz
            .check_change(&request, Role::Admin, "apikey revoke", selection)
            .await?;
        let result = async {
            let (control, writer) = self.suppression_access()?;
            let now = chrono::Utc::now().timestamp();
            apikey::revoke(&control, &writer, request.into_inner(), now)
                .await
                .map(Response::new)
        }
        .await;
        audit.finish(result, |_| 1)
    }

    async fn config_reload(
        &self,
        request: Request<ConfigReloadRequest>,
    ) -> Result<Response<ConfigReloadReply>, Status> {
        let audit = self
            .authz
            .check_change(&request, Role::Admin, "config reload", String::new())
            .await?;
        let result = async {
            let reloader = self
                .reload
                .get()
                .cloned()
                .ok_or_else(|| Status::unavailable("the node is still starting; try again"))?;
            // File reads and key parsing: off the async workers.
            let outcome = tokio::task::spawn_blocking(move || reloader.reload(crate::reload::Trigger::Admin))
                .await
                .map_err(|e| Status::internal(format!("reload task: {e}")))?;
            match outcome {
                Ok(o) => Ok(Response::new(ConfigReloadReply {
                    node_id: self.node_id,
                    path: o.path.display().to_string(),
                    applied: o.diff.applied.iter().map(|k| (*k).to_owned()).collect(),
                    restart_needed: o.diff.restart_needed.iter().map(|k| (*k).to_owned()).collect(),
                })),
                Err(e @ crate::reload::ReloadError::NoFile) => Err(Status::failed_precondition(e.to_string())),
                Err(e) => Err(Status::invalid_argument(format!("node {}: {e}", self.node_id))),
            }
        }
        .await;
        audit.finish(result, |_| 0)
    }

    async fn webhook_status(
        &self,
        request: Request<WebhookStatusRequest>,
    ) -> Result<Response<WebhookStatusReply>, Status> {
        self.authz.check(&request, Role::Viewer).await?;
        let (names, seen) = &self.webhooks;
        let names = names.load_full();
        let mut reply = webhook::status(&self.groups, &names, seen, request.get_ref());
        reply.answered_by = self.node_id;
        Ok(Response::new(reply))
    }

    async fn shaping_show(&self, request: Request<ShapingShowRequest>) -> Result<Response<ShapingShowReply>, Status> {
        self.authz.check(&request, Role::Viewer).await?;
        let domain = request
            .into_inner()
            .domain
            .trim()
            .trim_end_matches('.')
            .to_ascii_lowercase();
        if domain.is_empty()
            || domain.len() > 253
            || !domain
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
        {
            return Err(Status::invalid_argument(format!("{domain:?} is not a domain name")));
        }
        Ok(Response::new(
            shaping::show(&self.delivery, &self.groups, self.node_id, &domain).await,
        ))
    }

    async fn stats(&self, request: Request<StatsRequest>) -> Result<Response<StatsReply>, Status> {
        self.authz.check(&request, Role::Viewer).await?;
        let req = request.into_inner();
        let since = req.since_secs.clamp(60, 24 * 3600) as i64;
        let now = chrono::Utc::now().timestamp();
        let local = self.stats.window(now, since);
        let mut reply = StatsReply {
            nodes: vec![NodeStats {
                node: self.node_id,
                window: bincode::serialize(&local).map_err(internal)?,
            }],
            unreachable: Vec::new(),
        };
        if req.local_only {
            return Ok(Response::new(reply));
        }
        // Combined across the cluster by the node asked.
        for (id, addr) in self.cluster.nodes() {
            if id == self.node_id {
                continue;
            }
            let answer = match self.cluster.peers.peer(id, &addr) {
                Ok(mut c) => c
                    .local_stats(tern_proto::peer::LocalStatsRequest {
                        since_secs: req.since_secs,
                    })
                    .await
                    .ok(),
                Err(_) => None,
            };
            match answer {
                Some(r) => reply.nodes.extend(r.into_inner().nodes),
                None => reply.unreachable.push(id),
            }
        }
        Ok(Response::new(reply))
    }
}

impl Admin {
    /// `member list` as this node sees it (the control leader's view is the
    /// one with reachability and lag).
    pub(crate) async fn members_here(&self, control: &GroupHandle) -> Result<MemberListReply, Status> {
        let m = control.raft.metrics().borrow().clone();
        let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
        let last = m.last_log_index.unwrap_or(0);
        // Reachability comes from the control leader's pings (replication
        // progress never goes backwards, so a dead node would look fine);
        // a node that is not the leader, answering because the leader did
        // not, pings the members itself.
        let reachable = if m.current_leader == Some(self.node_id) {
            self.cluster.reachable()
        } else {
            self.cluster.peers.ping_all(&self.cluster.nodes()).await
        };
        let placement = self.cluster.placement();
        let mut led: BTreeMap<NodeId, u64> = BTreeMap::new();
        let (rows, _) = self.cluster.all_shards().await;
        for row in rows.values() {
            if row.leader != 0 {
                *led.entry(row.leader).or_default() += 1;
            }
        }
        let members = self
            .cluster
            .nodes()
            .into_iter()
            .map(|(id, addr)| {
                let matched = if id == self.node_id {
                    Some(last)
                } else {
                    m.replication
                        .as_ref()
                        .and_then(|r| r.get(&id).cloned())
                        .flatten()
                        .map(|l| l.index)
                };
                let lag = matched.map(|i| last.saturating_sub(i)).unwrap_or(last);
                MemberInfo {
                    id,
                    addr,
                    role: if voters.contains(&id) { "voter" } else { "learner" }.into(),
                    is_control_leader: m.current_leader == Some(id),
                    reachable: reachable.contains(&id),
                    lag,
                    shards_led: led.get(&id).copied().unwrap_or(0),
                    replicas: placement.values().filter(|r| r.contains(&id)).count() as u64,
                }
            })
            .collect();
        Ok(MemberListReply { members })
    }
}
