//! Leader moves: stepping aside before a hand-over, asking a replica to
//! campaign (openraft 0.9 has no leader transfer), an operator's move, the
//! hand-over of everything at shutdown, and the controller's leader
//! balancing (drained nodes first, then an even share per node).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use super::placement::{next_leader_move, LeaderMove};
use super::{Cluster, ClusterError};
use crate::raft::groups::{GroupHandle, Hold};
use crate::raft::{GroupId, NodeId, CONTROL_GROUP};

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
        g.hold_elections(Hold::StepAside, true);
        let leading = g.raft.metrics().borrow().state == openraft::ServerState::Leader;
        let quiet = if leading && g.id != CONTROL_GROUP {
            g.handover.quiesce(g.id, STEP_ASIDE).await
        } else {
            true
        };
        let resume = g.clone();
        tokio::spawn(async move {
            tokio::time::sleep(STEP_ASIDE).await;
            resume.hold_elections(Hold::StepAside, false);
        });
        quiet
    });
    task.await.unwrap_or(false)
}

/// A drained shard still led by the drained node this long after its
/// leadership was handed to a replica is handed to another one next.
const DRAIN_RETRY: Duration = Duration::from_secs(30);

/// The last replica each drained shard's leadership was handed to, and when.
pub(super) type DrainTries = HashMap<GroupId, (NodeId, Instant)>;

impl Cluster {
    /// Spreads shard leaderships: a node leading more than its share hands
    /// one shard per tick to the replica leading the fewest.
    pub(super) async fn balance_leaders(
        &self,
        rows: &BTreeMap<GroupId, tern_proto::admin::ShardStatus>,
        unreachable: &[NodeId],
    ) {
        let placement = self.placement();
        let nodes: BTreeSet<NodeId> = self.nodes().keys().copied().collect();
        let drained = self.drained();
        let next = {
            let mut tries = self.drain_tries.lock().unwrap_or_else(|p| p.into_inner());
            let tried = |shard| {
                tries
                    .get(&shard)
                    .filter(|(_, at)| at.elapsed() < DRAIN_RETRY)
                    .map(|(n, _)| *n)
            };
            let next = next_leader_move(&placement, rows, &nodes, &drained, unreachable, tried);
            if let Some(m) = next.filter(|m| m.drain) {
                tries.insert(m.shard, (m.to, Instant::now()));
            }
            next
        };
        let Some(LeaderMove { shard, from, to, drain }) = next else {
            return;
        };
        if drain {
            tracing::info!(shard, from, to, "draining shard leader");
        } else {
            tracing::info!(shard, from, to, "moving shard leader");
        }
        if let Err(e) = self.hand_over(shard, from, to).await {
            tracing::debug!(shard, target = to, error = %e, "leader move");
        }
    }

    /// Hands the control-group leadership from this node to another
    /// reachable voter (the most caught up), by asking it to campaign;
    /// bounded, retried while the old lease runs out.
    pub async fn move_control_leader(&self) -> Result<NodeId, ClusterError> {
        let control = self.control().ok_or(ClusterError::ControlNotHosted)?;
        let reachable = self.peers.ping_all(&self.nodes()).await;
        let m = control.raft.metrics().borrow().clone();
        let matched = |n: &NodeId| crate::raft::groups::matched_index(&m, *n);
        let Some(target) = m
            .membership_config
            .membership()
            .voter_ids()
            .filter(|v| *v != self.node_id && reachable.contains(v))
            .max_by_key(|v| (matched(v), std::cmp::Reverse(*v)))
        else {
            return Err(ClusterError::Refused(
                "no other reachable control-group voter to hand the control leadership to".into(),
            ));
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
                return Err(ClusterError::NotYet(format!(
                    "node {target} did not take over the control group in time; try again"
                )));
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
    pub async fn move_leader(&self, group: GroupId, node: NodeId) -> Result<(), ClusterError> {
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
                return Err(ClusterError::NotYet(format!(
                    "node {node} did not win the leadership of group {group} within 20 s; try again"
                )));
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
    pub async fn hand_over(&self, group: GroupId, from: NodeId, to: NodeId) -> Result<(), ClusterError> {
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
    async fn elect_on(&self, node: NodeId, group: GroupId, step_aside: bool) -> Result<(), ClusterError> {
        if node == self.node_id {
            let g = self.groups.get(group).ok_or(ClusterError::GroupNotHosted)?;
            if step_aside {
                step_aside_for(&g).await;
                return Ok(());
            }
            return g.raft.trigger().elect().await.map_err(ClusterError::raft);
        }
        let addr = self.nodes().get(&node).cloned().ok_or(ClusterError::UnknownNode)?;
        let addr = self.peers.dial(node, addr);
        let mut client = self.peers.peer(node, &addr).map_err(ClusterError::peer)?;
        client
            .elect(tern_proto::peer::ElectRequest {
                group_id: group,
                step_aside,
            })
            .await
            .map(|_| ())
            .map_err(ClusterError::peer)
    }
}
