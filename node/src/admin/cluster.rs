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
use tonic::transport::Channel;

use crate::raft::groups::{GroupHandle, Groups};
use crate::raft::state_machine::{DRAIN_PREFIX, NODE_PREFIX, PLACEMENT_PREFIX};
use crate::raft::{GroupId, NodeId, Request, CONTROL_GROUP};

/// Control-group voters at most; further nodes stay learners of group 0.
pub const MAX_CONTROL_VOTERS: usize = 5;
/// How long a new replica may take to catch up before the change is retried.
const CATCH_UP: Duration = Duration::from_secs(60);

pub struct Cluster {
    pub node_id: NodeId,
    /// Desired replicas per shard (capped by the number of nodes).
    pub replicas: usize,
    pub groups: Arc<Groups>,
    clients: Mutex<HashMap<String, AdminServiceClient<Channel>>>,
    /// Shards whose membership change is under way here.
    reconciling: Mutex<HashSet<GroupId>>,
    tls: Option<crate::raft::tls::ClusterTls>,
    /// `[cluster] peer_addresses`.
    overrides: BTreeMap<NodeId, String>,
    /// `[cluster] dead_node_after_secs`: a node unreachable this long loses its replicas.
    dead_after: Duration,
    /// When each node last answered the control leader's ping.
    last_seen: Mutex<HashMap<NodeId, std::time::Instant>>,
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
            node_id,
            replicas,
            groups,
            clients: Mutex::new(HashMap::new()),
            reconciling: Mutex::new(HashSet::new()),
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

    /// Nodes marked drained (they lead no shard).
    pub fn drained(&self) -> BTreeSet<NodeId> {
        let mut out = BTreeSet::new();
        if let Some(control) = self.control() {
            for (k, _) in control.sm.tree().scan_prefix(DRAIN_PREFIX).flatten() {
                if let Ok(id) = <[u8; 8]>::try_from(&k[DRAIN_PREFIX.len()..]) {
                    out.insert(u64::from_be_bytes(id));
                }
            }
        }
        out
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
            return Err(
                "this node leads the control group: ask another node to remove it, or move the leadership".into(),
            );
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
            let member = self.groups.shards().iter().any(|g| {
                g.raft
                    .metrics()
                    .borrow()
                    .membership_config
                    .membership()
                    .voter_ids()
                    .any(|v| v == id)
            });
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
            let mut next: BTreeSet<NodeId> = voters.iter().copied().filter(|v| *v != id).collect();
            // Keep up to five voters: promote a learner in its place.
            if let Some(l) = membership.learner_ids().find(|l| *l != id && !next.contains(l)) {
                if next.len() < MAX_CONTROL_VOTERS {
                    next.insert(l);
                }
            }
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

    /// An admin client for a peer (one lazily connected channel each).
    pub fn client(&self, addr: &str) -> Result<AdminServiceClient<Channel>, tonic::Status> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(addr) {
            return Ok(c.clone());
        }
        let channel = crate::raft::tls::endpoint(addr, self.tls.as_ref())
            .map_err(tonic::Status::invalid_argument)?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(90))
            .connect_lazy();
        let client = AdminServiceClient::new(channel)
            .max_decoding_message_size(crate::raft::network::MAX_GRPC_MESSAGE)
            .max_encoding_message_size(crate::raft::network::MAX_GRPC_MESSAGE);
        clients.insert(addr.to_owned(), client.clone());
        Ok(client)
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

    /// Writes `request` through `group`'s leader on another node.
    pub async fn forward(&self, group: &GroupHandle, request: &Request) -> Result<(), String> {
        let (_, addr) = self.leader_addr(group).ok_or("no known leader")?;
        self.forward_to(&addr, group.id, request, true).await
    }

    /// Sends a write for `group` to the node at `addr`; with `hop` false that
    /// node passes it on to the group's leader if it is not the leader itself.
    pub async fn forward_to(&self, addr: &str, group: GroupId, request: &Request, hop: bool) -> Result<(), String> {
        let payload = bincode::serialize(request).map_err(|e| e.to_string())?;
        let mut client = self.client(addr).map_err(|e| e.to_string())?;
        client
            .forward(tern_proto::admin::ForwardRequest {
                group_id: group,
                payload,
                hop,
            })
            .await
            .map(|_| ())
            .map_err(|e| format!("forward to {addr}: {}", e.message()))
    }

    /// A node holding no replica of any shard (more nodes than replicas)
    /// sends its write to a replica of some shard, which passes it to that
    /// shard's leader.
    pub async fn forward_anywhere(&self, turn: usize, request: &Request) -> Result<GroupId, String> {
        let placement: Vec<(GroupId, Vec<NodeId>)> = self.placement().into_iter().collect();
        if placement.is_empty() {
            return Err("no shard placement known".into());
        }
        let nodes = self.nodes();
        let (shard, replicas) = &placement[turn % placement.len()];
        let mut last = String::from("no replica reachable");
        for node in replicas {
            let Some(addr) = nodes.get(node).cloned() else { continue };
            match self.forward_to(&self.dial(*node, addr), *shard, request, false).await {
                Ok(()) => return Ok(*shard),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Adds a node: recorded in the control group, added as a learner of
    /// group 0, caught up, then promoted while there are fewer than five
    /// voters. Must run on the control-group leader.
    pub async fn add_member(&self, id: NodeId, addr: &str) -> Result<&'static str, String> {
        let control = self.control().ok_or("control group not hosted here")?;
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
        if voters.len() >= MAX_CONTROL_VOTERS {
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
                if let Err(e) = self.place().await {
                    tracing::warn!(error = %e, "placement");
                }
                self.balance_leaders().await;
            }
            self.reconcile();
        }
    }

    /// Pings every member (control leader only), to tell long-dead nodes.
    async fn ping_members(&self) {
        let now = std::time::Instant::now();
        let nodes = self.nodes();
        let mut answered = Vec::new();
        for (id, addr) in nodes.iter() {
            if *id == self.node_id {
                answered.push(*id);
                continue;
            }
            let Ok(mut client) = self.client(&self.dial(*id, addr.clone())) else {
                continue;
            };
            let ping = client.ping(tern_proto::admin::PingRequest {});
            if matches!(tokio::time::timeout(Duration::from_millis(500), ping).await, Ok(Ok(_))) {
                answered.push(*id);
            }
        }
        let mut seen = self.last_seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.retain(|id, _| nodes.contains_key(id));
        for id in nodes.keys() {
            // A node first seen now counts as alive from now.
            seen.entry(*id).or_insert(now);
        }
        for id in answered {
            seen.insert(id, now);
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
    async fn place(&self) -> Result<(), String> {
        let dead = self.dead_nodes();
        let members: Vec<NodeId> = self.nodes().keys().copied().collect();
        if members.is_empty() {
            return Ok(());
        }
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
            }
        }
        Ok(())
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
        for n in desired.difference(voters) {
            let addr = nodes.get(n).ok_or_else(|| format!("no address for node {n}"))?;
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
    async fn balance_leaders(&self) {
        let placement = self.placement();
        let nodes: Vec<NodeId> = self.nodes().keys().copied().collect();
        if nodes.len() < 2 {
            return;
        }
        let mut leaders: BTreeMap<GroupId, NodeId> = BTreeMap::new();
        for g in self.groups.shards() {
            let m = g.raft.metrics().borrow().clone();
            let voters: BTreeSet<NodeId> = m.membership_config.membership().voter_ids().collect();
            let joint = m.membership_config.membership().get_joint_config().len() > 1;
            let settled = !joint
                && placement
                    .get(&g.id)
                    .is_some_and(|p| p.iter().copied().collect::<BTreeSet<_>>() == voters);
            match m.current_leader {
                Some(l) if settled => {
                    leaders.insert(g.id, l);
                }
                // Only balance a cluster at rest.
                _ => return,
            }
        }
        let drained = self.drained();
        let eligible: Vec<NodeId> = nodes.iter().copied().filter(|n| !drained.contains(n)).collect();
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
            let target = placement.get(shard).and_then(|r| {
                r.iter()
                    .filter(|n| !drained.contains(n))
                    .min_by_key(|n| (count.get(n).copied().unwrap_or(0), **n))
                    .copied()
            });
            if let Some(target) = target {
                tracing::info!(shard, from = leader, to = target, "draining shard leader");
                if let Err(e) = self.elect_on(target, *shard).await {
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
                .filter(|n| **n != busiest && !drained.contains(n))
                .min_by_key(|n| (count.get(n).copied().unwrap_or(0), **n))
            else {
                continue;
            };
            if count.get(&target).copied().unwrap_or(0) + 1 >= most {
                continue;
            }
            tracing::info!(shard, from = busiest, to = target, "moving shard leader");
            if let Err(e) = self.elect_on(target, *shard).await {
                tracing::debug!(shard, target, error = %e, "leader move");
            }
            return;
        }
    }

    /// Asks `node` to campaign for `group` (openraft 0.9 has no leader transfer).
    pub async fn elect_on(&self, node: NodeId, group: GroupId) -> Result<(), String> {
        if node == self.node_id {
            let g = self.groups.get(group).ok_or("group not hosted here")?;
            return g.raft.trigger().elect().await.map_err(|e| e.to_string());
        }
        let addr = self.nodes().get(&node).cloned().ok_or("unknown node")?;
        let addr = self.dial(node, addr);
        let mut client = self.client(&addr).map_err(|e| e.to_string())?;
        client
            .elect(tern_proto::admin::ElectRequest { group_id: group })
            .await
            .map(|_| ())
            .map_err(|e| e.message().to_owned())
    }
}
