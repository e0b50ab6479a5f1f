//! The controller loop, once a second on every node: on the control-group
//! leader, ping the members, complete the placement, then move one replica
//! or one leadership towards balance; on every shard leader, move the
//! group's membership towards its placement (add_learner, wait until caught
//! up, change_membership; one change at a time per shard).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use openraft::{BasicNode, ChangeMembers};

use super::membership::CATCH_UP;
use super::placement::{
    leaving_leader_target, membership_step, placement_repairs, rebalance_steps, MembershipStep, RebalanceStep,
};
use super::shards::{first_home, ShardRecord, ShardState, RETIRE_GRACE_SECS, SPACE};
use super::{Cluster, ClusterError};
use crate::raft::groups::GroupHandle;
use crate::raft::{GroupId, NodeId, Request};

/// Membership changes this node, as a shard leader, has under way.
#[derive(Default)]
pub(super) struct Reconciling {
    /// Shards whose membership change is under way here.
    under_way: HashSet<GroupId>,
    /// Shards whose leadership this node, leaving them, tried to hand over.
    handed_over: HashSet<GroupId>,
}

impl Cluster {
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
                if let Err(e) = self.place_added().await {
                    tracing::warn!(error = %e, "placing added shards");
                }
                match self.place().await {
                    Err(e) => tracing::warn!(error = %e, "placement"),
                    Ok(true) => {}
                    Ok(false) => {
                        // Placement is complete: retire what is empty, spread
                        // replicas, then leaders, from every member's view of
                        // its shards.
                        let (rows, unreachable) = self.all_shards().await;
                        if let Err(e) = self.retire_empty(&rows).await {
                            tracing::warn!(error = %e, "retiring shards");
                        }
                        match self.rebalance(&rows, &unreachable).await {
                            Err(e) => tracing::warn!(error = %e, "rebalancing"),
                            Ok(true) => {}
                            Ok(false) => self.balance_leaders(&rows, &unreachable).await,
                        }
                    }
                }
            }
            self.open_added().await;
            self.close_retired().await;
            self.reconcile();
        }
    }

    /// Placement controller: every shard at min(replicas, live nodes)
    /// copies, spread evenly; replicas on nodes that left, or that have been
    /// dead for `dead_after`, are replaced by live nodes when there are any.
    /// True when it changed a placement.
    async fn place(&self) -> Result<bool, ClusterError> {
        let dead = self.dead_nodes();
        let members: BTreeSet<NodeId> = self.nodes().keys().copied().collect();
        if members.is_empty() {
            return Ok(false);
        }
        let placement = self.placement();
        let records = self.shard_records();
        // Once the operator set the count (`cluster set replicas`), shards
        // grow one replica at a time, at rest (see `rebalance`); before,
        // every short shard grows at once (bootstrap, joins) as it always did.
        let grow_all = super::records::cluster_replicas(&self.groups).is_none();
        // A shard being added stays on the node creating it until it leads.
        let adding = |shard| records.get(&shard).is_some_and(|r| r.state == ShardState::Adding);
        let changes = placement_repairs(&placement, &members, &dead, self.want_replicas(), grow_all, adding);
        let control = self.control().ok_or(ClusterError::NoControlGroup)?;
        let changed = !changes.is_empty();
        for (shard, next) in changes {
            tracing::info!(shard, from = ?placement.get(&shard), to = ?next, dead = ?dead, "placement change");
            control
                .raft
                .client_write(Request::SetShardReplicas { shard, replicas: next })
                .await
                .map_err(ClusterError::raft)?;
        }
        Ok(changed)
    }

    /// Moves replicas from the most to the least loaded member when their
    /// replica counts differ by more than one (e.g. after a node joins a
    /// cluster whose shards are all at full strength). Only with every
    /// member reachable; by default one move in the whole cluster at a time,
    /// every shard at rest in between (voters = placement, no joint config,
    /// a leader); up to `rebalance_moves` shards at once when the operator
    /// set it (`placement::rebalance_steps`). A shard never loses its
    /// majority: its leader adds the new replica as a learner, waits for it
    /// to catch up, then swaps it in. True when it started something.
    async fn rebalance(
        &self,
        rows: &BTreeMap<GroupId, tern_proto::admin::ShardStatus>,
        unreachable: &[NodeId],
    ) -> Result<bool, ClusterError> {
        let members: BTreeSet<NodeId> = self.nodes().keys().copied().collect();
        let all_reachable = unreachable.is_empty() && members.is_subset(&self.reachable());
        let placement = self.placement();
        // A shard being added stays where it is created until it is active.
        let records = self.shard_records();
        let adding = |shard| records.get(&shard).is_some_and(|r| r.state == ShardState::Adding);
        let want = self.want_replicas();
        let moves = self.rebalance_moves();
        let steps = rebalance_steps(&placement, rows, &members, all_reachable, want, adding, moves);
        let started = !steps.is_empty();
        for step in steps {
            let (shard, next) = match step {
                // Fewer or more replicas wanted (`cluster set replicas`): one
                // replica of one shard at a time, the cluster at rest in between.
                RebalanceStep::Resize { shard, replicas } => {
                    tracing::info!(shard, to = ?replicas, want = want.min(members.len()), "changing a shard's replica count");
                    (shard, replicas)
                }
                RebalanceStep::HandOver { shard, from, to } => {
                    // The leader hands over first rather than remove itself.
                    if let Some(target) = to {
                        tracing::info!(shard, from, to = target, "moving shard leader before a replica move");
                        if let Err(e) = self.hand_over(shard, from, target, super::leader::Move::Balance).await {
                            tracing::debug!(shard, target, error = %e, "leader move");
                        }
                    }
                    continue;
                }
                RebalanceStep::Move {
                    shard,
                    from,
                    to,
                    replicas,
                } => {
                    tracing::info!(shard, from, to, moves, "rebalancing a replica");
                    (shard, replicas)
                }
            };
            self.control()
                .ok_or(ClusterError::NoControlGroup)?
                .raft
                .client_write(Request::SetShardReplicas { shard, replicas: next })
                .await
                .map_err(ClusterError::raft)?;
        }
        Ok(started)
    }

    /// `ternctl shard add`, on the control leader: records the next `count`
    /// shard ids as being added; the controller's `place_added` places
    /// them. The new ids. With a request id, a call the cluster has seen
    /// returns that call's ids and adds nothing.
    pub async fn add_shards(&self, count: u32, request_id: Option<&str>) -> Result<Vec<GroupId>, ClusterError> {
        use super::shards;
        if let Some(id) = request_id {
            shards::check_request_id(id).map_err(ClusterError::Refused)?;
        }
        let _one_at_a_time = self.adding.lock().await;
        let control = self.control().ok_or(ClusterError::NoControlGroup)?;
        // Everything committed before, applied here: a leader elected just
        // now must see the ids (and the request) its predecessor recorded.
        control.raft.ensure_linearizable().await.map_err(ClusterError::raft)?;
        if let Some(id) = request_id {
            let earlier = super::control::ControlState::new(control.sm.tree())
                .shared(shards::SPACE, &shards::request_key(id))
                .and_then(|v| bincode::deserialize::<Vec<GroupId>>(&v).ok());
            if let Some(ids) = shards::repeated_add(earlier, count).map_err(ClusterError::Refused)? {
                tracing::info!(shards = ?ids, request = id, "shard add repeated: nothing added");
                return Ok(ids);
            }
        }
        let records = self.shard_records();
        let ids = shards::next_shard_ids(super::records::placed_ids(&self.groups), &records, count)
            .map_err(ClusterError::Refused)?;
        let record = ShardRecord {
            state: ShardState::Adding,
            since: chrono::Utc::now().timestamp(),
        };
        let value = bincode::serialize(&record).map_err(|e| ClusterError::Refused(e.to_string()))?;
        let mut entries: Vec<(String, Vec<u8>)> =
            ids.iter().map(|id| (shards::state_key(*id), value.clone())).collect();
        if let Some(id) = request_id {
            let added = bincode::serialize(&ids).map_err(|e| ClusterError::Refused(e.to_string()))?;
            entries.push((shards::request_key(id), added));
        }
        control
            .raft
            .client_write(Request::PutShared {
                space: SPACE.into(),
                entries,
            })
            .await
            .map_err(ClusterError::raft)?;
        // Placed by the controller's next tick (only that task places, so
        // a shard never gets two first homes).
        tracing::info!(shards = ?ids, "shards added");
        Ok(ids)
    }

    /// Control leader: a shard being added and not placed yet starts on
    /// the least loaded live member (one replica; topped up once it leads).
    async fn place_added(&self) -> Result<(), ClusterError> {
        let records = self.shard_records();
        let mut placement = self.placement();
        let members: BTreeSet<NodeId> = self.nodes().keys().copied().collect();
        let dead = self.dead_nodes();
        for (shard, record) in &records {
            if record.state != ShardState::Adding || placement.contains_key(shard) {
                continue;
            }
            let Some(home) = first_home(&placement, &members, &dead) else {
                return Err(ClusterError::NoPlacement);
            };
            tracing::info!(shard, node = home, "placing a new shard");
            self.control()
                .ok_or(ClusterError::NoControlGroup)?
                .raft
                .client_write(Request::SetShardReplicas {
                    shard: *shard,
                    replicas: vec![home],
                })
                .await
                .map_err(ClusterError::raft)?;
            placement.insert(*shard, vec![home]);
        }
        Ok(())
    }

    /// Every node: a shard being added and placed on this node alone is
    /// created and initialised here (this node its only voter); once this
    /// node leads it, its record goes (it is active: new mail goes to it).
    /// Only while the record says `Adding`, so that a group that exists
    /// elsewhere is never initialised afresh.
    async fn open_added(&self) {
        let records = self.shard_records();
        let placement = self.placement();
        let Some(host) = self.host.get() else { return };
        for (shard, record) in records {
            if record.state != ShardState::Adding {
                continue;
            }
            let placed_here_alone = placement.get(&shard) == Some(&vec![self.node_id]);
            let group = match self.groups.get(shard) {
                Some(g) => g,
                None if !placed_here_alone => continue,
                None => match host.ensure(shard).await {
                    Ok(g) => g,
                    Err(e) => {
                        tracing::warn!(shard, error = %e, "cannot create an added shard");
                        continue;
                    }
                },
            };
            if group.leader() == Some(self.node_id) {
                let done = self
                    .control_writer()
                    .write(tern_model::peer::Operation::DeleteShared {
                        space: SPACE.into(),
                        keys: vec![super::shards::state_key(shard)],
                        prefixes: Vec::new(),
                    })
                    .await;
                match done {
                    Ok(()) => tracing::info!(shard, "added shard is active"),
                    Err(e) => tracing::debug!(shard, error = %e, "marking an added shard active"),
                }
                continue;
            }
            if !placed_here_alone {
                continue;
            }
            let Some(addr) = self.nodes().get(&self.node_id).cloned() else {
                continue;
            };
            let me = BTreeMap::from([(self.node_id, BasicNode::new(addr))]);
            // Already initialised (an earlier tick): openraft refuses, harmlessly.
            if let Err(e) = group.raft.initialize(me).await {
                tracing::debug!(shard, error = %e, "initialize");
            }
        }
    }

    /// Control leader: a shard retiring for [`RETIRE_GRACE_SECS`] whose
    /// leader reports no queued message and an empty outbox is retired: its
    /// placement emptied, so that its replicas close it.
    async fn retire_empty(&self, rows: &BTreeMap<GroupId, tern_proto::admin::ShardStatus>) -> Result<(), ClusterError> {
        let now = chrono::Utc::now().timestamp();
        for (shard, record) in self.shard_records() {
            if record.state != ShardState::Retiring || now - record.since < RETIRE_GRACE_SECS {
                continue;
            }
            let Some(row) = rows.get(&shard) else { continue };
            if row.leader == 0 || row.queued_messages > 0 || !row.outbox_empty {
                continue;
            }
            let retired = ShardRecord {
                state: ShardState::Retired,
                since: now,
            };
            let value = bincode::serialize(&retired).map_err(|e| ClusterError::Refused(e.to_string()))?;
            let control = self.control().ok_or(ClusterError::NoControlGroup)?;
            control
                .raft
                .client_write(Request::PutShared {
                    space: SPACE.into(),
                    entries: vec![(super::shards::state_key(shard), value)],
                })
                .await
                .map_err(ClusterError::raft)?;
            control
                .raft
                .client_write(Request::SetShardReplicas {
                    shard,
                    replicas: Vec::new(),
                })
                .await
                .map_err(ClusterError::raft)?;
            tracing::info!(shard, "shard retired: its replicas close it");
        }
        Ok(())
    }

    /// Every node: closes its replica of a retired shard and deletes its
    /// data, once that replica holds no message and no outbox event (a
    /// message that got in late is delivered first: the replicas holding it
    /// keep the group open). Also deletes what a crash or an earlier
    /// release left on disk of a retired shard closed here before.
    async fn close_retired(&self) {
        let records = self.shard_records();
        let Some(host) = self.host.get() else { return };
        for (shard, record) in &records {
            if record.state != ShardState::Retired || self.groups.get(*shard).is_some() {
                continue;
            }
            if let Err(e) = host.forget(*shard).await {
                tracing::warn!(shard, error = %e, "cannot delete a retired shard's leftover data");
            }
        }
        for g in self.groups.shards() {
            if records.get(&g.id).map(|r| r.state) != Some(ShardState::Retired) {
                continue;
            }
            let outbox_empty = g.sm.tree().scan_prefix(crate::outbox::OUTBOX_PREFIX).next().is_none();
            if g.sm.message_count() > 0 || !outbox_empty {
                tracing::warn!(
                    shard = g.id,
                    messages = g.sm.message_count(),
                    "a retired shard still holds mail: kept open"
                );
                continue;
            }
            if let Err(e) = host.destroy(g.id).await {
                tracing::warn!(shard = g.id, error = %e, "cannot close a retired shard");
            }
        }
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
                .under_way
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
                    .under_way
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
    ) -> Result<(), ClusterError> {
        let first_try = self
            .reconciling
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .handed_over
            .insert(group.id);
        if !desired.contains(&self.node_id) && first_try {
            // A leader leaving the group first asks the most caught-up
            // replica that stays to take over and make the change. If it
            // is still leader next time (the election went back to it), it
            // makes the change itself and steps down once it is committed.
            let m = group.raft.metrics().borrow().clone();
            let target = leaving_leader_target(desired, voters, |n| crate::raft::groups::matched_index(&m, n));
            if let Some(target) = target {
                tracing::info!(
                    shard = group.id,
                    to = target,
                    "leaving the shard: moving its leadership first"
                );
                self.hand_over(group.id, self.node_id, target, super::leader::Move::Needed)
                    .await?;
                return Ok(());
            }
        }
        self.reconciling
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .handed_over
            .remove(&group.id);
        // New replicas one by one, each from fresh metrics.
        let mut done = BTreeSet::new();
        loop {
            let (step, matched, last) = {
                let m = group.raft.metrics().borrow().clone();
                let learners: BTreeSet<NodeId> = m.membership_config.membership().learner_ids().collect();
                let matched = |n: NodeId| crate::raft::groups::matched_index(&m, n);
                let last = m.last_log_index.unwrap_or(0);
                let learner = |n: NodeId| learners.contains(&n).then(|| matched(n));
                let step = membership_step(desired, voters, &done, learner, last);
                let node = match step {
                    MembershipStep::CaughtUp(n) | MembershipStep::AddLearner(n) | MembershipStep::Behind(n) => n,
                    MembershipStep::Promote => 0,
                };
                (step, matched(node), last)
            };
            let node = match step {
                MembershipStep::Promote => break,
                MembershipStep::CaughtUp(n) | MembershipStep::AddLearner(n) | MembershipStep::Behind(n) => n,
            };
            let addr = nodes.get(&node).ok_or(ClusterError::NoAddress(node))?;
            match step {
                MembershipStep::Behind(n) => {
                    return Err(ClusterError::NotYet(format!(
                        "node {n} is still catching up (at {matched} of {last})"
                    )));
                }
                MembershipStep::AddLearner(n) => {
                    let add = group.raft.add_learner(n, BasicNode::new(addr), true);
                    match tokio::time::timeout(CATCH_UP, add).await {
                        Err(_) => return Err(ClusterError::NotYet(format!("node {n} did not catch up"))),
                        Ok(r) => r.map_err(ClusterError::raft)?,
                    };
                }
                MembershipStep::CaughtUp(_) | MembershipStep::Promote => {}
            }
            done.insert(node);
        }
        group
            .raft
            .change_membership(ChangeMembers::ReplaceAllVoters(desired.clone()), false)
            .await
            .map_err(ClusterError::raft)?;
        tracing::info!(shard = group.id, replicas = ?desired, "shard replicas changed");
        Ok(())
    }
}
