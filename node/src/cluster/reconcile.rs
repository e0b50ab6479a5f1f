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
use super::placement::{at_rest, rebalance_move};
use super::{Cluster, ClusterError};
use crate::raft::groups::GroupHandle;
use crate::raft::{GroupId, NodeId, Request};

/// Entries a learner may lag behind the leader's log and count as caught up.
const LEARNER_SLACK: u64 = 1000;

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

    /// Placement controller: every shard at min(replicas, live nodes)
    /// copies, spread evenly; replicas on nodes that left, or that have been
    /// dead for `dead_after`, are replaced by live nodes when there are any.
    /// True when it changed a placement.
    async fn place(&self) -> Result<bool, ClusterError> {
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
        let control = self.control().ok_or(ClusterError::NoControlGroup)?;
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
                    .map_err(ClusterError::raft)?;
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
    ) -> Result<bool, ClusterError> {
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
            .ok_or(ClusterError::NoControlGroup)?
            .raft
            .client_write(Request::SetShardReplicas { shard, replicas: next })
            .await
            .map_err(ClusterError::raft)?;
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
        self.reconciling
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .handed_over
            .remove(&group.id);
        for n in desired.difference(voters) {
            let addr = nodes.get(n).ok_or(ClusterError::NoAddress(*n))?;
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
                    return Err(ClusterError::NotYet(format!(
                        "node {n} is still catching up (at {matched} of {last})"
                    )));
                }
                continue;
            }
            let add = group.raft.add_learner(*n, BasicNode::new(addr), true);
            match tokio::time::timeout(CATCH_UP, add).await {
                Err(_) => return Err(ClusterError::NotYet(format!("node {n} did not catch up"))),
                Ok(r) => r.map_err(ClusterError::raft)?,
            };
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
