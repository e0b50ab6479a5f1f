//! Cluster coordination: node and placement records in the control group,
//! the placement controller (on the control-group leader), per-shard
//! membership reconciliation (on each shard leader), leader balancing, and
//! node-to-node calls (forwarded writes, elections).
//!
//! Placement is declarative: the control group holds each shard's desired
//! replica set; every shard leader moves its group's membership towards it
//! with add_learner (blocking until caught up) then change_membership.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::{BasicNode, ChangeMembers};
use tern_proto::admin::admin_service_client::AdminServiceClient;
use tern_proto::peer::peer_service_client::PeerServiceClient;
use tonic::transport::Channel;

use crate::peer::Operation;
use crate::raft::groups::{GroupHandle, Groups};
use crate::raft::state_machine::{DRAIN_PREFIX, NODE_PREFIX, PLACEMENT_PREFIX, REMOVED_PREFIX};
use crate::raft::{GroupId, NewMessage, NodeId, Request, CONTROL_GROUP};

/// How long a leader handing over does not campaign (two election timeouts
/// at the default timers: the new leader's election completes meanwhile).
pub const STEP_ASIDE: Duration = Duration::from_secs(5);

/// This node prepares to hand `group` over: it stops campaigning for it,
/// and while it leads a queue shard it stops dispatching deliveries and
/// waits (up to `[cluster] handover_timeout_secs`) until the outcomes of
/// those in flight are committed, so that the next leader sends none of
/// them again. Campaigning resumes [`STEP_ASIDE`] after that, so that the
/// leadership does not come straight back. False when the wait timed out.
/// Runs as its own task: a caller that gives up (an RPC deadline) does not
/// leave the group unable to campaign.
pub async fn step_aside_for(group: &GroupHandle) -> bool {
    let g = group.clone();
    let task = tokio::spawn(async move {
        g.raft.runtime_config().elect(false);
        let leading = g.raft.metrics().borrow().state == openraft::ServerState::Leader;
        let quiet = if leading && g.id != CONTROL_GROUP {
            g.handover.quiesce(g.id, STEP_ASIDE).await
        } else {
            true
        };
        let raft = g.raft.clone();
        tokio::spawn(async move {
            tokio::time::sleep(STEP_ASIDE).await;
            raft.runtime_config().elect(true);
        });
        quiet
    });
    task.await.unwrap_or(false)
}

/// Pause before a forwarded enqueue is retried (lets a new leader be known).
const FORWARD_RETRY_PAUSE: Duration = Duration::from_millis(300);

/// A forward that failed on the way (transport) or because the leader
/// changed; not one the leader timed out on (the client has waited enough).
fn retryable(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
    ) && !status.message().contains("timed out")
}

fn op_name(op: &Operation) -> &'static str {
    match op {
        Operation::Queue { .. } => "queue operation",
        Operation::Bounce { .. } => "queue bounce",
        Operation::Drain { .. } => "drain",
        Operation::Suspend { .. } => "domain suspension",
        Operation::MemberAdd { .. } => "member add",
        Operation::MemberRemove { .. } => "member remove",
    }
}

/// Why `member add` refuses a removed node's id.
pub fn removed_id_error(id: NodeId) -> String {
    format!(
        "node id {id} belonged to a node removed from this cluster and is never reused: \
         give the new node a fresh [node] id (and an empty data directory)"
    )
}

/// Control-group voters at most; further nodes stay learners of group 0.
pub const MAX_CONTROL_VOTERS: usize = 5;
/// How long a new replica may take to catch up before the change is retried.
const CATCH_UP: Duration = Duration::from_secs(60);
/// Entries a learner may lag behind the leader's log and count as caught up.
const LEARNER_SLACK: u64 = 1000;
/// A member that answered the control leader's ping this recently is reachable.
pub const REACHABLE_WITHIN: Duration = Duration::from_secs(3);
/// How long one member may take to answer a ping or a local status query.
const PEER_TIMEOUT: Duration = Duration::from_millis(1500);

/// The control group's voters: current voters that are still members,
/// topped up (lowest ids first) to [`MAX_CONTROL_VOTERS`]; the other
/// members are learners.
pub fn control_voters(current: &BTreeSet<NodeId>, members: &BTreeSet<NodeId>) -> BTreeSet<NodeId> {
    let mut out: BTreeSet<NodeId> = current
        .intersection(members)
        .copied()
        .take(MAX_CONTROL_VOTERS)
        .collect();
    for m in members {
        if out.len() >= MAX_CONTROL_VOTERS {
            break;
        }
        out.insert(*m);
    }
    out
}

/// One rebalancing step: when replicas per node differ by more than one,
/// a shard on the most loaded node that the least loaded one does not hold,
/// as (shard, from, to). Every member counts, holding replicas or not.
/// Shards `from` does not lead are preferred (`leaders`: shard -> leader),
/// so that a move rarely needs a leader to hand over first.
pub fn rebalance_move(
    placement: &BTreeMap<GroupId, Vec<NodeId>>,
    members: &BTreeSet<NodeId>,
    leaders: &BTreeMap<GroupId, NodeId>,
) -> Option<(GroupId, NodeId, NodeId)> {
    let mut load: BTreeMap<NodeId, usize> = members.iter().map(|n| (*n, 0)).collect();
    for replicas in placement.values() {
        for n in replicas {
            if let Some(l) = load.get_mut(n) {
                *l += 1;
            }
        }
    }
    let (&to, &least) = load.iter().min_by_key(|(n, l)| (**l, **n))?;
    // Most loaded first; ties broken towards the highest id (deterministic).
    let mut sources: Vec<(NodeId, usize)> = load.iter().map(|(n, l)| (*n, *l)).collect();
    sources.sort_by_key(|(n, l)| std::cmp::Reverse((*l, *n)));
    for (from, most) in sources {
        if most <= least + 1 {
            break;
        }
        let mut candidates: Vec<GroupId> = placement
            .iter()
            .filter(|(_, r)| r.contains(&from) && !r.contains(&to))
            .map(|(shard, _)| *shard)
            .collect();
        candidates.sort_by_key(|shard| leaders.get(shard) == Some(&from));
        if let Some(shard) = candidates.first() {
            return Some((*shard, from, to));
        }
    }
    None
}

/// A drained shard still led by the drained node this long after its
/// leadership was handed to a replica is handed to another one next.
const DRAIN_RETRY: Duration = Duration::from_secs(30);

/// The replica to hand a drained node's leadership of a shard to: among
/// `replicas` that may lead, the one leading fewest (`count`), but not
/// `tried`, the target of a recent hand-over that did not stick, while
/// another can. (A replica still catching up cannot win; asked again and
/// again, its campaigns only unseated the drained leader, who won back.)
pub fn drain_target(
    replicas: &[NodeId],
    may_lead: impl Fn(NodeId) -> bool,
    count: &BTreeMap<NodeId, usize>,
    tried: Option<NodeId>,
) -> Option<NodeId> {
    let candidates: Vec<NodeId> = replicas.iter().copied().filter(|n| may_lead(*n)).collect();
    let key = |n: &NodeId| (count.get(n).copied().unwrap_or(0), *n);
    let fresh = candidates.iter().copied().filter(|n| Some(*n) != tried).min_by_key(key);
    fresh.or_else(|| candidates.iter().copied().min_by_key(key))
}

/// Every placed shard is settled: a leader, no joint config, and its voters
/// are its placement.
fn at_rest(
    placement: &BTreeMap<GroupId, Vec<NodeId>>,
    rows: &BTreeMap<GroupId, tern_proto::admin::ShardStatus>,
) -> bool {
    placement.iter().all(|(shard, p)| {
        rows.get(shard).is_some_and(|r| {
            r.leader != 0
                && !r.joint
                && r.voters.iter().copied().collect::<BTreeSet<_>>() == p.iter().copied().collect::<BTreeSet<_>>()
        })
    })
}

/// A shard as gathered from every member: the shard leader's own row when
/// it answered, else the row with the highest term and applied index.
pub fn merge_shard_rows(
    rows: impl IntoIterator<Item = (NodeId, tern_proto::admin::ShardStatus)>,
) -> BTreeMap<GroupId, tern_proto::admin::ShardStatus> {
    let mut best: BTreeMap<GroupId, (bool, tern_proto::admin::ShardStatus)> = BTreeMap::new();
    for (from, row) in rows {
        let own = row.leader == from && from != 0;
        let better = match best.get(&row.shard) {
            None => true,
            Some((b_own, b)) => (own, row.term, row.applied_index) > (*b_own, b.term, b.applied_index),
        };
        if better {
            best.insert(row.shard, (own, row));
        }
    }
    best.into_iter().map(|(k, (_, r))| (k, r)).collect()
}

pub struct Cluster {
    pub node_id: NodeId,
    /// Desired replicas per shard (capped by the number of nodes).
    pub replicas: usize,
    pub groups: Arc<Groups>,
    /// One lazily connected channel per peer address (admin and peer clients share it).
    channels: Mutex<HashMap<(String, Option<NodeId>), Channel>>,
    /// Shards whose membership change is under way here.
    reconciling: Mutex<HashSet<GroupId>>,
    /// Shards whose leadership this node, leaving them, tried to hand over.
    handed_over: Mutex<HashSet<GroupId>>,
    /// The last replica each drained shard's leadership was handed to, and when.
    drain_tries: Mutex<HashMap<GroupId, (NodeId, std::time::Instant)>>,
    tls: Option<crate::raft::tls::ClusterTls>,
    /// `[cluster] peer_addresses`.
    overrides: BTreeMap<NodeId, String>,
    /// `[cluster] dead_node_after_secs`: a node unreachable this long loses its replicas.
    dead_after: Duration,
    /// When each node last answered the control leader's ping.
    last_seen: Mutex<HashMap<NodeId, std::time::Instant>>,
    /// When each node last actually answered (no grace for newly seen nodes).
    last_answer: Mutex<HashMap<NodeId, std::time::Instant>>,
}

impl Cluster {
    pub fn new(
        node_id: NodeId,
        replicas: usize,
        groups: Arc<Groups>,
        tls: Option<crate::raft::tls::ClusterTls>,
        overrides: BTreeMap<NodeId, String>,
        dead_after: Duration,
    ) -> Cluster {
        Cluster {
            overrides,
            dead_after,
            last_seen: Mutex::new(HashMap::new()),
            last_answer: Mutex::new(HashMap::new()),
            node_id,
            replicas,
            groups,
            channels: Mutex::new(HashMap::new()),
            reconciling: Mutex::new(HashSet::new()),
            handed_over: Mutex::new(HashSet::new()),
            drain_tries: Mutex::new(HashMap::new()),
            tls,
        }
    }

    pub fn control(&self) -> Option<GroupHandle> {
        self.groups.get(CONTROL_GROUP)
    }

    /// Node id -> gRPC address, from this node's replica of the control group.
    pub fn nodes(&self) -> BTreeMap<NodeId, String> {
        let mut out = BTreeMap::new();
        if let Some(control) = self.control() {
            for (k, v) in control.sm.tree().scan_prefix(NODE_PREFIX).flatten() {
                if let Ok(id) = <[u8; 8]>::try_from(&k[NODE_PREFIX.len()..]) {
                    out.insert(u64::from_be_bytes(id), String::from_utf8_lossy(&v).into_owned());
                }
            }
        }
        out
    }

    /// Ids of removed nodes (never to be reused).
    pub fn removed(&self) -> BTreeSet<NodeId> {
        self.node_set(REMOVED_PREFIX)
    }

    /// Node ids recorded in the control state under `prefix` (big-endian keys).
    fn node_set(&self, prefix: &[u8]) -> BTreeSet<NodeId> {
        let mut out = BTreeSet::new();
        if let Some(control) = self.control() {
            for (k, _) in control.sm.tree().scan_prefix(prefix).flatten() {
                if let Ok(id) = <[u8; 8]>::try_from(&k[prefix.len()..]) {
                    out.insert(u64::from_be_bytes(id));
                }
            }
        }
        out
    }

    /// Members that answered the control leader's ping within
    /// [`REACHABLE_WITHIN`] (meaningful on the control leader, which pings),
    /// and this node.
    pub fn reachable(&self) -> BTreeSet<NodeId> {
        let seen = self.last_answer.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: BTreeSet<NodeId> = seen
            .iter()
            .filter(|(_, t)| t.elapsed() < REACHABLE_WITHIN)
            .map(|(id, _)| *id)
            .collect();
        out.insert(self.node_id);
        out
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

    /// The shards this node hosts, as it sees them.
    pub fn local_shards(&self) -> Vec<tern_proto::admin::ShardStatus> {
        let placement = self.placement();
        self.groups
            .shards()
            .iter()
            .map(|g| {
                let m = g.raft.metrics().borrow().clone();
                tern_proto::admin::ShardStatus {
                    shard: g.id,
                    leader: m.current_leader.unwrap_or(0),
                    replicas: placement.get(&g.id).cloned().unwrap_or_default(),
                    applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
                    queued_messages: g.sm.message_count(),
                    term: m.current_term,
                    voters: m.membership_config.membership().voter_ids().collect(),
                    joint: m.membership_config.membership().get_joint_config().len() > 1,
                }
            })
            .collect()
    }

    /// Every shard, gathered from every member (each asked at once, bounded),
    /// merged with [`merge_shard_rows`]; and the members that did not answer.
    pub async fn all_shards(&self) -> (BTreeMap<GroupId, tern_proto::admin::ShardStatus>, Vec<NodeId>) {
        let nodes = self.nodes();
        let asks = nodes.iter().filter(|(id, _)| **id != self.node_id).map(|(id, addr)| {
            let client = self.peer(*id, &self.dial(*id, addr.clone()));
            async move {
                let answer = async {
                    let mut client = client.ok()?;
                    let ask = client.local_status(tern_proto::peer::LocalStatusRequest {});
                    match tokio::time::timeout(PEER_TIMEOUT, ask).await {
                        Ok(Ok(r)) => Some(r.into_inner()),
                        _ => None,
                    }
                }
                .await;
                (*id, answer)
            }
        });
        let mut rows: Vec<(NodeId, tern_proto::admin::ShardStatus)> =
            self.local_shards().into_iter().map(|r| (self.node_id, r)).collect();
        let mut unreachable = Vec::new();
        for (id, answer) in futures::future::join_all(asks).await {
            match answer {
                Some(reply) => rows.extend(reply.shards.into_iter().map(|r| (reply.node_id, r))),
                None => unreachable.push(id),
            }
        }
        let mut merged = merge_shard_rows(rows);
        // Placement is the control group's: the freshest copy is this node's
        // own when it is the control leader, and at worst a little behind.
        let placement = self.placement();
        for (shard, row) in merged.iter_mut() {
            if let Some(p) = placement.get(shard) {
                row.replicas = p.clone();
            }
        }
        (merged, unreachable)
    }

    /// Nodes marked drained (they lead no shard).
    pub fn drained(&self) -> BTreeSet<NodeId> {
        self.node_set(DRAIN_PREFIX)
    }

    /// Removes a node: its replicas are moved elsewhere first (placement
    /// drops it, shard leaders change membership), then it leaves the
    /// control group. Refuses, unless `force`, when a shard would be left
    /// without a reachable majority. Must run on the control-group leader.
    pub async fn remove_member(&self, id: NodeId, force: bool, reachable: &BTreeSet<NodeId>) -> Result<(), String> {
        let control = self.control().ok_or("control group not hosted here")?;
        if !self.nodes().contains_key(&id) {
            return Err(format!("node {id} is not a member"));
        }
        if id == self.node_id {
            // The caller moves the control leadership away first.
            return Err("this node leads the control group; move its leadership first".into());
        }
        if !force {
            for (shard, replicas) in self.placement() {
                let rest: Vec<_> = replicas.iter().filter(|n| **n != id).collect();
                let live = rest.iter().filter(|n| reachable.contains(n)).count();
                if replicas.contains(&id) && live * 2 <= replicas.len() {
                    return Err(format!(
                        "removing node {id} would leave shard {shard} without a reachable majority \
                         (replicas {replicas:?}); use --force to remove it anyway"
                    ));
                }
            }
        }
        control
            .raft
            .client_write(Request::RemoveNode { id })
            .await
            .map_err(|e| e.to_string())?;
        // Wait for the placement controller and shard leaders to move its replicas.
        let deadline = tokio::time::Instant::now() + CATCH_UP;
        loop {
            let placed = self.placement().values().any(|r| r.contains(&id));
            let member = self.groups.shards().iter().any(|g| g.is_voter(id));
            if !placed && !member {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                if force {
                    break;
                }
                return Err(format!(
                    "node {id}'s replicas were not moved within {CATCH_UP:?}; try again"
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let membership = control.raft.metrics().borrow().membership_config.membership().clone();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        if voters.contains(&id) {
            // Keep up to five voters: a learner is promoted in its place.
            let rest: BTreeSet<NodeId> = voters
                .iter()
                .copied()
                .chain(membership.learner_ids())
                .filter(|n| *n != id)
                .collect();
            let next = control_voters(&voters, &rest);
            control
                .raft
                .change_membership(ChangeMembers::ReplaceAllVoters(next), false)
                .await
                .map_err(|e| e.to_string())?;
        } else {
            control
                .raft
                .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
                .await
                .map_err(|e| e.to_string())?;
        }
        tracing::info!(node = id, "member removed");
        Ok(())
    }

    /// Shard -> desired replicas.
    pub fn placement(&self) -> BTreeMap<GroupId, Vec<NodeId>> {
        let mut out = BTreeMap::new();
        if let Some(control) = self.control() {
            for (k, v) in control.sm.tree().scan_prefix(PLACEMENT_PREFIX).flatten() {
                if let (Ok(id), Ok(replicas)) = (
                    <[u8; 8]>::try_from(&k[PLACEMENT_PREFIX.len()..]),
                    bincode::deserialize::<Vec<NodeId>>(&v),
                ) {
                    out.insert(u64::from_be_bytes(id), replicas);
                }
            }
        }
        out
    }

    /// Where to dial a node: its `peer_addresses` override, else `advertised`.
    fn dial(&self, node: NodeId, advertised: String) -> String {
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
            .or_else(|| self.nodes().get(&leader).cloned())?;
        Some((leader, self.dial(leader, addr)))
    }

    /// Writes a new message through `group`'s leader on another node.
    ///
    /// A forward that fails in transport (connection lost, leader gone) is
    /// sent once more, to the group's leader as then known, with the same
    /// queue id: if the first attempt did commit, the state machine ignores
    /// the second while the message is still queued, so no duplicate.
    pub async fn forward_enqueue(&self, group: &GroupHandle, message: &NewMessage) -> Result<(), String> {
        let (leader, addr) = self.leader_addr(group).ok_or("no known leader")?;
        match self.enqueue_status(leader, &addr, group.id, message, true).await {
            Ok(()) => Ok(()),
            Err(status) if retryable(&status) => {
                tracing::info!(group = group.id, error = %status.message(), "forwarded enqueue retried once");
                tokio::time::sleep(FORWARD_RETRY_PAUSE).await;
                let (leader, addr) = self.leader_addr(group).ok_or("no known leader")?;
                self.enqueue_status(leader, &addr, group.id, message, true)
                    .await
                    .map_err(|e| format!("forward to {addr}: {}", e.message()))
            }
            Err(status) => Err(format!("forward to {addr}: {}", status.message())),
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
        let payload = crate::peer::encode(message).map_err(tonic::Status::internal)?;
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
    pub async fn forward_enqueue_anywhere(&self, turn: usize, message: &NewMessage) -> Result<GroupId, String> {
        let placement: Vec<(GroupId, Vec<NodeId>)> = self.placement().into_iter().collect();
        if placement.is_empty() {
            return Err("no shard placement known".into());
        }
        let nodes = self.nodes();
        let (shard, replicas) = &placement[turn % placement.len()];
        let mut last = String::from("no replica reachable");
        for node in replicas {
            let Some(addr) = nodes.get(node).cloned() else { continue };
            let addr = self.dial(*node, addr);
            match self.enqueue_status(*node, &addr, *shard, message, false).await {
                Ok(()) => return Ok(*shard),
                Err(e) => last = format!("forward to {addr}: {}", e.message()),
            }
        }
        Err(last)
    }

    /// Makes an operator's write through `group`'s leader on another node;
    /// how many messages it affected.
    pub async fn operate(&self, group: &GroupHandle, op: &Operation) -> Result<u64, String> {
        self.operate_status(group, op)
            .await
            .map(|r| r.affected)
            .map_err(|e| format!("{}: {}", op_name(op), e.message()))
    }

    /// As [`Cluster::operate`], with the leader's reply or status as it answered.
    pub async fn operate_status(
        &self,
        group: &GroupHandle,
        op: &Operation,
    ) -> Result<tern_proto::peer::OperationReply, tonic::Status> {
        let (leader, addr) = self
            .leader_addr(group)
            .ok_or_else(|| tonic::Status::unavailable(format!("group {} has no known leader; try again", group.id)))?;
        let payload = crate::peer::encode(op).map_err(tonic::Status::internal)?;
        let mut client = self.peer(leader, &addr)?;
        client
            .operation(tern_proto::peer::OperationRequest {
                group_id: group.id,
                operation: payload,
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// Adds a node: recorded in the control group, added as a learner of
    /// group 0, caught up, then promoted while there are fewer than five
    /// voters. Must run on the control-group leader.
    pub async fn add_member(&self, id: NodeId, addr: &str) -> Result<&'static str, String> {
        let control = self.control().ok_or("control group not hosted here")?;
        if self.removed().contains(&id) {
            return Err(removed_id_error(id));
        }
        control
            .raft
            .client_write(Request::SetNode {
                id,
                addr: addr.to_owned(),
            })
            .await
            .map_err(|e| e.to_string())?;
        let add = control.raft.add_learner(id, BasicNode::new(addr), true);
        match tokio::time::timeout(CATCH_UP, add).await {
            Err(_) => return Err(format!("node {id} at {addr} did not catch up within {CATCH_UP:?}")),
            Ok(Err(e)) => return Err(e.to_string()),
            Ok(Ok(_)) => {}
        }
        let voters = control.voters();
        if voters.contains(&id) {
            return Ok("voter");
        }
        let membership = control.raft.metrics().borrow().membership_config.membership().clone();
        let members: BTreeSet<NodeId> = membership.voter_ids().chain(membership.learner_ids()).collect();
        if !control_voters(&voters, &members).contains(&id) {
            return Ok("learner");
        }
        control
            .raft
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), true)
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(node = id, %addr, "member added");
        Ok("voter")
    }

    /// Runs the controllers until `stop`.
    pub async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_millis(1000));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let leads_control = self.control().is_some_and(|c| c.leader() == Some(self.node_id));
            if leads_control {
                self.ping_members().await;
                match self.place().await {
                    Err(e) => tracing::warn!(error = %e, "placement"),
                    Ok(true) => {}
                    Ok(false) => {
                        // Placement is complete: spread replicas, then leaders,
                        // from every member's view of its shards.
                        let (rows, unreachable) = self.all_shards().await;
                        match self.rebalance(&rows, &unreachable).await {
                            Err(e) => tracing::warn!(error = %e, "rebalancing"),
                            Ok(true) => {}
                            Ok(false) => self.balance_leaders(&rows, &unreachable).await,
                        }
                    }
                }
            }
            self.reconcile();
        }
    }

    /// Pings every member (control leader only), to tell long-dead nodes.
    async fn ping_members(&self) {
        let nodes = self.nodes();
        let answered = self.ping_all(&nodes).await;
        let now = std::time::Instant::now();
        let mut seen = self.last_seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.retain(|id, _| nodes.contains_key(id));
        for id in nodes.keys() {
            // A node first seen now counts as alive from now.
            seen.entry(*id).or_insert(now);
        }
        for id in &answered {
            seen.insert(*id, now);
        }
        drop(seen);
        let mut last = self.last_answer.lock().unwrap_or_else(|p| p.into_inner());
        last.retain(|id, _| nodes.contains_key(id));
        for id in answered {
            last.insert(id, now);
        }
    }

    /// Nodes that have not answered for `dead_after`.
    fn dead_nodes(&self) -> BTreeSet<NodeId> {
        let seen = self.last_seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.iter()
            .filter(|(_, t)| t.elapsed() >= self.dead_after)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Placement controller: every shard at min(replicas, live nodes)
    /// copies, spread evenly; replicas on nodes that left, or that have been
    /// dead for `dead_after`, are replaced by live nodes when there are any.
    /// True when it changed a placement.
    async fn place(&self) -> Result<bool, String> {
        let dead = self.dead_nodes();
        let members: Vec<NodeId> = self.nodes().keys().copied().collect();
        if members.is_empty() {
            return Ok(false);
        }
        let mut changed = false;
        let placement = self.placement();
        let want = self.replicas.min(members.len());
        // Replicas per live node, to pick the least loaded.
        let mut load: BTreeMap<NodeId, usize> = members.iter().filter(|n| !dead.contains(n)).map(|n| (*n, 0)).collect();
        for replicas in placement.values() {
            for n in replicas {
                if let Some(l) = load.get_mut(n) {
                    *l += 1;
                }
            }
        }
        let pick = |load: &BTreeMap<NodeId, usize>, next: &[NodeId]| {
            load.iter()
                .filter(|(n, _)| !next.contains(n))
                .min_by_key(|(n, l)| (**l, **n))
                .map(|(n, _)| *n)
        };
        let control = self.control().ok_or("no control group")?;
        for (shard, current) in &placement {
            // Nodes that left are dropped.
            let mut next: Vec<NodeId> = current.iter().copied().filter(|n| members.contains(n)).collect();
            // A long-dead replica moves to a live node, when there is one to take it.
            for i in 0..next.len() {
                if dead.contains(&next[i]) {
                    if let Some(spare) = pick(&load, &next) {
                        next[i] = spare;
                        *load.entry(spare).or_default() += 1;
                    }
                }
            }
            while next.len() < want {
                let Some(n) = pick(&load, &next) else { break };
                next.push(n);
                *load.entry(n).or_default() += 1;
            }
            if &next != current {
                tracing::info!(shard, from = ?current, to = ?next, dead = ?dead, "placement change");
                control
                    .raft
                    .client_write(Request::SetShardReplicas {
                        shard: *shard,
                        replicas: next,
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                changed = true;
            }
        }
        Ok(changed)
    }

    /// Moves one replica from the most to the least loaded member when their
    /// replica counts differ by more than one (e.g. after a node joins a
    /// cluster whose shards are all at full strength). Only with every
    /// member reachable and every shard at rest (voters = placement, no
    /// joint config, a leader), so one move is in flight at a time and a
    /// shard never loses its majority: the shard leader adds the new replica
    /// as a learner, waits for it to catch up, then swaps it in. True when
    /// it did something.
    async fn rebalance(
        &self,
        rows: &BTreeMap<GroupId, tern_proto::admin::ShardStatus>,
        unreachable: &[NodeId],
    ) -> Result<bool, String> {
        let members: BTreeSet<NodeId> = self.nodes().keys().copied().collect();
        let reachable = self.reachable();
        if !unreachable.is_empty() || !members.is_subset(&reachable) {
            return Ok(false);
        }
        let placement = self.placement();
        if !at_rest(&placement, rows) {
            return Ok(false);
        }
        let leaders: BTreeMap<GroupId, NodeId> = rows.iter().map(|(s, r)| (*s, r.leader)).collect();
        let Some((shard, from, to)) = rebalance_move(&placement, &members, &leaders) else {
            return Ok(false);
        };
        let current = placement.get(&shard).cloned().unwrap_or_default();
        if leaders.get(&shard) == Some(&from) {
            // The leader hands over first rather than remove itself.
            if let Some(&target) = current.iter().find(|n| **n != from) {
                tracing::info!(shard, from, to = target, "moving shard leader before a replica move");
                if let Err(e) = self.hand_over(shard, from, target).await {
                    tracing::debug!(shard, target, error = %e, "leader move");
                }
            }
            return Ok(true);
        }
        let next: Vec<NodeId> = current.iter().map(|n| if *n == from { to } else { *n }).collect();
        tracing::info!(shard, from, to, "rebalancing a replica");
        self.control()
            .ok_or("no control group")?
            .raft
            .client_write(Request::SetShardReplicas { shard, replicas: next })
            .await
            .map_err(|e| e.to_string())?;
        Ok(true)
    }

    /// On each shard this node leads: move the group's membership towards
    /// its placement (one change at a time per shard).
    fn reconcile(self: &Arc<Self>) {
        let placement = self.placement();
        let nodes = self.nodes();
        for group in self.groups.shards() {
            if group.leader() != Some(self.node_id) {
                continue;
            }
            let Some(desired) = placement.get(&group.id) else {
                continue;
            };
            let desired: BTreeSet<NodeId> = desired.iter().copied().collect();
            let voters: BTreeSet<NodeId> = group
                .raft
                .metrics()
                .borrow()
                .membership_config
                .membership()
                .voter_ids()
                .collect();
            if desired.is_empty() || desired == voters {
                continue;
            }
            if !self
                .reconciling
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(group.id)
            {
                continue;
            }
            let this = Arc::clone(self);
            let nodes = nodes.clone();
            tokio::spawn(async move {
                let result = this.change_replicas(&group, &desired, &voters, &nodes).await;
                if let Err(e) = result {
                    tracing::warn!(shard = group.id, error = %e, "replica change not done yet");
                }
                this.reconciling
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&group.id);
            });
        }
    }

    async fn change_replicas(
        &self,
        group: &GroupHandle,
        desired: &BTreeSet<NodeId>,
        voters: &BTreeSet<NodeId>,
        nodes: &BTreeMap<NodeId, String>,
    ) -> Result<(), String> {
        let first_try = self
            .handed_over
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(group.id);
        if !desired.contains(&self.node_id) && first_try {
            // A leader leaving the group first asks the most caught-up
            // replica that stays to take over and make the change. If it
            // is still leader next time (the election went back to it), it
            // makes the change itself and steps down once it is committed.
            let m = group.raft.metrics().borrow().clone();
            let matched = |n: &NodeId| crate::raft::groups::matched_index(&m, *n);
            let target = desired
                .iter()
                .filter(|n| voters.contains(n))
                .max_by_key(|n| (matched(n), std::cmp::Reverse(**n)))
                .copied();
            if let Some(target) = target {
                tracing::info!(
                    shard = group.id,
                    to = target,
                    "leaving the shard: moving its leadership first"
                );
                self.hand_over(group.id, self.node_id, target).await?;
                return Ok(());
            }
        }
        self.handed_over
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&group.id);
        for n in desired.difference(voters) {
            let addr = nodes.get(n).ok_or_else(|| format!("no address for node {n}"))?;
            // A learner added by an earlier try may still be catching up
            // (a large queue's snapshot takes minutes): adding it again
            // restarted its replication, snapshot and all, every try.
            let (learner, matched, last) = {
                let m = group.raft.metrics().borrow().clone();
                let learner = m.membership_config.membership().learner_ids().any(|l| l == *n);
                let matched = crate::raft::groups::matched_index(&m, *n);
                (learner, matched, m.last_log_index.unwrap_or(0))
            };
            if learner {
                if matched + LEARNER_SLACK < last {
                    return Err(format!("node {n} is still catching up (at {matched} of {last})"));
                }
                continue;
            }
            let add = group.raft.add_learner(*n, BasicNode::new(addr), true);
            match tokio::time::timeout(CATCH_UP, add).await {
                Err(_) => return Err(format!("node {n} did not catch up")),
                Ok(r) => r.map_err(|e| e.to_string())?,
            };
        }
        group
            .raft
            .change_membership(ChangeMembers::ReplaceAllVoters(desired.clone()), false)
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(shard = group.id, replicas = ?desired, "shard replicas changed");
        Ok(())
    }

    /// Spreads shard leaderships: a node leading more than its share hands
    /// one shard per tick to the replica leading the fewest.
    async fn balance_leaders(&self, rows: &BTreeMap<GroupId, tern_proto::admin::ShardStatus>, unreachable: &[NodeId]) {
        let placement = self.placement();
        let nodes: Vec<NodeId> = self.nodes().keys().copied().collect();
        // Only balance a cluster at rest; members that do not answer lead
        // nothing new (and do not count towards the share).
        if nodes.len() < 2 || !at_rest(&placement, rows) {
            return;
        }
        let leaders: BTreeMap<GroupId, NodeId> = rows.iter().map(|(s, r)| (*s, r.leader)).collect();
        let drained = self.drained();
        let eligible: Vec<NodeId> = nodes
            .iter()
            .copied()
            .filter(|n| !drained.contains(n) && !unreachable.contains(n))
            .collect();
        if eligible.is_empty() {
            return;
        }
        let mut count: BTreeMap<NodeId, usize> = eligible.iter().map(|n| (*n, 0)).collect();
        for l in leaders.values() {
            if count.contains_key(l) {
                *count.entry(*l).or_default() += 1;
            }
        }
        // A drained node hands over its leaderships first.
        for (shard, leader) in &leaders {
            if !drained.contains(leader) {
                continue;
            }
            let target = {
                let mut tries = self.drain_tries.lock().unwrap_or_else(|p| p.into_inner());
                let tried = tries
                    .get(shard)
                    .filter(|(_, at)| at.elapsed() < DRAIN_RETRY)
                    .map(|(n, _)| *n);
                let may_lead = |n: NodeId| !drained.contains(&n) && !unreachable.contains(&n);
                let target = placement
                    .get(shard)
                    .and_then(|r| drain_target(r, may_lead, &count, tried));
                if let Some(t) = target {
                    tries.insert(*shard, (t, std::time::Instant::now()));
                }
                target
            };
            if let Some(target) = target {
                tracing::info!(shard, from = leader, to = target, "draining shard leader");
                if let Err(e) = self.hand_over(*shard, *leader, target).await {
                    tracing::debug!(shard, target, error = %e, "leader move");
                }
                return;
            }
        }
        let share = leaders.len().div_ceil(eligible.len());
        let Some((&busiest, &most)) = count.iter().max_by_key(|(n, c)| (**c, **n)) else {
            return;
        };
        if most <= share {
            return;
        }
        for (shard, leader) in &leaders {
            if *leader != busiest {
                continue;
            }
            let Some(replicas) = placement.get(shard) else { continue };
            let Some(&target) = replicas
                .iter()
                .filter(|n| **n != busiest && !drained.contains(n) && !unreachable.contains(n))
                .min_by_key(|n| (count.get(n).copied().unwrap_or(0), **n))
            else {
                continue;
            };
            if count.get(&target).copied().unwrap_or(0) + 1 >= most {
                continue;
            }
            tracing::info!(shard, from = busiest, to = target, "moving shard leader");
            if let Err(e) = self.hand_over(*shard, busiest, target).await {
                tracing::debug!(shard, target, error = %e, "leader move");
            }
            return;
        }
    }

    /// Hands the control-group leadership from this node to another
    /// reachable voter (the most caught up), by asking it to campaign;
    /// bounded, retried while the old lease runs out.
    pub async fn move_control_leader(&self) -> Result<NodeId, String> {
        let control = self.control().ok_or("control group not hosted here")?;
        let reachable = self.ping_all(&self.nodes()).await;
        let m = control.raft.metrics().borrow().clone();
        let matched = |n: &NodeId| crate::raft::groups::matched_index(&m, *n);
        let Some(target) = m
            .membership_config
            .membership()
            .voter_ids()
            .filter(|v| *v != self.node_id && reachable.contains(v))
            .max_by_key(|v| (matched(v), std::cmp::Reverse(*v)))
        else {
            return Err("no other reachable control-group voter to hand the control leadership to".into());
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Err(e) = self.hand_over(CONTROL_GROUP, self.node_id, target).await {
                tracing::debug!(target, error = %e, "control leader move");
            }
            let attempt = tokio::time::Instant::now() + Duration::from_secs(3);
            while tokio::time::Instant::now() < attempt {
                if let Some(l) = control.leader() {
                    if l != self.node_id {
                        tracing::info!(to = l, "control leadership moved");
                        return Ok(l);
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if tokio::time::Instant::now() > deadline {
                return Err(format!(
                    "node {target} did not take over the control group in time; try again"
                ));
            }
        }
    }

    /// The leader of `group` as known here (control group) or as gathered
    /// from the members (queue shards, which this node may not host).
    async fn current_leader(&self, group: GroupId) -> Option<NodeId> {
        if group == CONTROL_GROUP {
            return self.control().and_then(|c| c.leader());
        }
        let (rows, _) = self.all_shards().await;
        rows.get(&group).map(|r| r.leader).filter(|l| *l != 0)
    }

    /// Makes `node` the leader of `group` (an operator's move): it
    /// campaigns, and campaigns again every 3 s while it has not won (a
    /// vote inside the old leader's lease may be refused, and the election
    /// that follows may go to another replica); bounded.
    pub async fn move_leader(&self, group: GroupId, node: NodeId) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let leader = self.current_leader(group).await;
            if leader == Some(node) {
                return Ok(());
            }
            self.hand_over(group, leader.unwrap_or(0), node).await?;
            let attempt = tokio::time::Instant::now() + Duration::from_secs(3);
            while tokio::time::Instant::now() < attempt {
                tokio::time::sleep(Duration::from_millis(250)).await;
                if self.current_leader(group).await == Some(node) {
                    return Ok(());
                }
            }
            if tokio::time::Instant::now() > deadline {
                return Err(format!(
                    "node {node} did not win the leadership of group {group} within 20 s; try again"
                ));
            }
        }
    }

    /// Moves `group`'s leadership from `from` (0: unknown) to `to`. openraft
    /// 0.9 has no leader transfer: `from` stops dispatching, waits for the
    /// outcomes of its deliveries in flight to commit and stops campaigning
    /// for a few seconds (see [`step_aside_for`]), then `to` campaigns. Its
    /// first vote is refused inside the leader lease but makes `from` step
    /// down; `to` (or another replica, never `from`) wins the election that
    /// follows.
    pub async fn hand_over(&self, group: GroupId, from: NodeId, to: NodeId) -> Result<(), String> {
        if from != 0 && from != to {
            if let Err(e) = self.elect_on(from, group, true).await {
                tracing::debug!(group, from, error = %e, "step aside");
            }
        }
        self.elect_on(to, group, false).await
    }

    /// Before this node stops (SIGTERM): hands every group it leads over to
    /// another voter of that group, each after its in-flight deliveries'
    /// outcomes are committed, then waits (bounded) until it leads none.
    /// Returns the groups it still leads.
    pub async fn hand_over_all(&self, wait: Duration) -> Vec<GroupId> {
        let led: Vec<GroupHandle> = self
            .groups
            .all()
            .into_iter()
            .filter(|g| g.leader() == Some(self.node_id))
            .collect();
        let moves = led.iter().map(|g| {
            let targets: Vec<NodeId> = g
                .raft
                .metrics()
                .borrow()
                .membership_config
                .membership()
                .voter_ids()
                .filter(|v| *v != self.node_id)
                .collect();
            async move {
                // The next voter when one cannot be reached.
                for target in targets {
                    match self.hand_over(g.id, self.node_id, target).await {
                        Ok(()) => return,
                        Err(e) => tracing::warn!(group = g.id, target, error = %e, "shutdown: hand-over failed"),
                    }
                }
            }
        });
        futures::future::join_all(moves).await;
        let deadline = tokio::time::Instant::now() + wait;
        // Bounded: ends at the deadline.
        loop {
            let still: Vec<GroupId> = led
                .iter()
                .filter(|g| g.leader() == Some(self.node_id))
                .map(|g| g.id)
                .collect();
            if still.is_empty() || tokio::time::Instant::now() >= deadline {
                if !still.is_empty() {
                    tracing::warn!(groups = ?still, "shutdown: still leading after the hand-over");
                }
                return still;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Asks `node` to campaign for `group`, or with `step_aside` to stop
    /// campaigning for it for [`STEP_ASIDE`].
    async fn elect_on(&self, node: NodeId, group: GroupId, step_aside: bool) -> Result<(), String> {
        if node == self.node_id {
            let g = self.groups.get(group).ok_or("group not hosted here")?;
            if step_aside {
                step_aside_for(&g).await;
                return Ok(());
            }
            return g.raft.trigger().elect().await.map_err(|e| e.to_string());
        }
        let addr = self.nodes().get(&node).cloned().ok_or("unknown node")?;
        let addr = self.dial(node, addr);
        let mut client = self.peer(node, &addr).map_err(|e| e.to_string())?;
        client
            .elect(tern_proto::peer::ElectRequest {
                group_id: group,
                step_aside,
            })
            .await
            .map(|_| ())
            .map_err(|e| e.message().to_owned())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tern_proto::admin::ShardStatus;

    fn set(ids: &[NodeId]) -> BTreeSet<NodeId> {
        ids.iter().copied().collect()
    }

    #[test]
    fn control_group_keeps_at_most_five_voters() {
        let mut voters = BTreeSet::new();
        let mut members = BTreeSet::new();
        for id in 1..=7 {
            members.insert(id);
            voters = control_voters(&voters, &members);
        }
        assert_eq!(voters, set(&[1, 2, 3, 4, 5]));
        let learners: BTreeSet<NodeId> = members.difference(&voters).copied().collect();
        assert_eq!(learners, set(&[6, 7]));
        // A voter leaves: the lowest learner takes its place, the others stay.
        members.remove(&2);
        voters = control_voters(&voters, &members);
        assert_eq!(voters, set(&[1, 3, 4, 5, 6]));
        // Existing voters are kept even when a lower id joins later.
        let voters = control_voters(&set(&[4, 5, 6, 7, 8]), &set(&[1, 4, 5, 6, 7, 8]));
        assert_eq!(voters, set(&[4, 5, 6, 7, 8]));
        // Fewer than five members: all vote.
        assert_eq!(control_voters(&set(&[1]), &set(&[1, 2, 3])), set(&[1, 2, 3]));
    }

    #[test]
    fn a_drain_hands_over_to_another_replica_when_the_last_one_did_not_win() {
        let count: BTreeMap<NodeId, usize> = [(1, 3), (2, 0)].into_iter().collect();
        let may_lead = |n: NodeId| n != 3;
        // First: the replica leading fewest.
        assert_eq!(drain_target(&[1, 2, 3], may_lead, &count, None), Some(2));
        // It did not win (still catching up): the next one.
        assert_eq!(drain_target(&[1, 2, 3], may_lead, &count, Some(2)), Some(1));
        // The only one left is asked again.
        assert_eq!(drain_target(&[2, 3], may_lead, &count, Some(2)), Some(2));
        assert_eq!(drain_target(&[3], may_lead, &count, None), None);
    }

    #[test]
    fn rebalancing_fills_a_new_node_one_replica_at_a_time() {
        let mut placement: BTreeMap<GroupId, Vec<NodeId>> = (1..=4).map(|s| (s, vec![1, 2, 3])).collect();
        let members = set(&[1, 2, 3, 4]);
        let leaders: BTreeMap<GroupId, NodeId> = BTreeMap::from([(1, 3), (2, 1), (3, 2), (4, 1)]);
        let mut moves = 0;
        while let Some((shard, from, to)) = rebalance_move(&placement, &members, &leaders) {
            assert_eq!(to, 4);
            let r = placement.get_mut(&shard).unwrap();
            assert!(r.contains(&from) && !r.contains(&to));
            for n in r.iter_mut() {
                if *n == from {
                    *n = to;
                }
            }
            moves += 1;
            assert!(moves <= 4, "{placement:?}");
        }
        assert_eq!(moves, 3);
        let mut load: BTreeMap<NodeId, usize> = BTreeMap::new();
        for r in placement.values() {
            assert_eq!(r.len(), 3);
            for n in r {
                *load.entry(*n).or_default() += 1;
            }
        }
        let (min, max) = (load.values().min().unwrap(), load.values().max().unwrap());
        assert!(max - min <= 1, "{load:?}");
        assert_eq!(load[&4], 3, "{load:?}");
    }

    #[test]
    fn rebalancing_prefers_shards_the_source_does_not_lead() {
        let placement: BTreeMap<GroupId, Vec<NodeId>> = BTreeMap::from([(1, vec![1, 2]), (2, vec![1, 3])]);
        let leaders = BTreeMap::from([(1, 1), (2, 3)]);
        assert_eq!(
            rebalance_move(&placement, &set(&[1, 2, 3, 4]), &leaders),
            Some((2, 1, 4))
        );
        // Balanced within one: nothing to do.
        let placement: BTreeMap<GroupId, Vec<NodeId>> = BTreeMap::from([(1, vec![1, 2]), (2, vec![3, 4])]);
        assert_eq!(rebalance_move(&placement, &set(&[1, 2, 3, 4]), &leaders), None);
    }

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
    fn merged_shard_rows_prefer_the_leaders_own_row() {
        let row = |shard, leader, term, applied| ShardStatus {
            shard,
            leader,
            term,
            applied_index: applied,
            ..ShardStatus::default()
        };
        let merged = merge_shard_rows([
            // Node 2's idle copy of shard 1 (removed from it) is behind.
            (2, row(1, 2, 3, 10)),
            (1, row(1, 3, 5, 40)),
            (3, row(1, 3, 5, 38)),
            (1, row(2, 1, 2, 7)),
            (2, row(2, 1, 2, 9)),
        ]);
        assert_eq!(merged.len(), 2);
        assert_eq!((merged[&1].leader, merged[&1].applied_index), (3, 38));
        assert_eq!((merged[&2].leader, merged[&2].applied_index), (1, 7));
    }
}
