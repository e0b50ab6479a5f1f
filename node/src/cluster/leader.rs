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
///
/// Refused (Err, nothing held) while this node has led the group for less
/// than [`YOUNG_LEADER`]: openraft's leader lease would then refuse the
/// target's vote, as would the other voters', so the hand-over would only
/// leave the shard without a leader until this node campaigns again. A
/// leader balancer that asks again at once can fall into step with those
/// elections for minutes (seen with quiet groups after a restart).
///
/// With `caught_up`, also refused while that replica (the one to campaign)
/// does not hold this leader's last log entry: it could not win (a restarted
/// node, say, in its first second back).
pub async fn step_aside_for(group: &GroupHandle, caught_up: Option<NodeId>) -> Result<bool, String> {
    if let Some(target) = caught_up.filter(|_| group.leading_for().is_some()) {
        let (matched, last) = {
            let m = group.raft.metrics();
            let m = m.borrow();
            (
                crate::raft::groups::matched_index(&m, target),
                m.last_log_index.unwrap_or(0),
            )
        };
        if matched < last {
            return Err(format!(
                "node {target} has not caught up with shard {}'s leader (it holds entry {matched} of {last})",
                group.id
            ));
        }
    }
    if let Some(led) = group.leading_for().filter(|led| *led < YOUNG_LEADER) {
        return Err(format!(
            "shard {} got this leader {} ms ago; a hand-over waits until it has led for {} ms",
            group.id,
            led.as_millis(),
            YOUNG_LEADER.as_millis()
        ));
    }
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
    Ok(task.await.unwrap_or(false))
}

/// Why a leadership moves (see [`Cluster::hand_over`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Move {
    /// Evening out leaders or replicas: may wait for a better moment.
    Balance,
    /// A drain, a shutdown, an operator's move, a leader leaving its shard.
    Needed,
}

/// A leader this new refuses to step aside (see [`step_aside_for`]): its
/// lease, and a margin for the followers' heartbeats of its first term.
pub const YOUNG_LEADER: Duration = Duration::from_millis(crate::raft::LEADER_LEASE.as_millis() as u64 + 1000);

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
        match self
            .hand_over(shard, from, to, if drain { Move::Needed } else { Move::Balance })
            .await
        {
            Ok(()) => {}
            Err(ClusterError::Refused(reason)) => {
                // Not tried: the leader is too new to hand over yet.
                self.drain_tries
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&shard);
                tracing::debug!(shard, target = to, reason, "leader move put off");
            }
            Err(e) => tracing::debug!(shard, target = to, error = %e, "leader move"),
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
            if let Err(e) = self.hand_over(CONTROL_GROUP, self.node_id, target, Move::Needed).await {
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
            match self.hand_over(group, leader.unwrap_or(0), node, Move::Needed).await {
                // The leader is too new to hand over yet: ask again shortly.
                Err(ClusterError::Refused(reason)) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(group, node, reason, "leader move waits");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                other => other?,
            }
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
    /// for a few seconds (see [`step_aside_for`]), then `to` campaigns. The
    /// other voters refuse its vote inside their lease, but `from`, whose
    /// own lease ran out (it refuses to step aside sooner), grants it.
    /// Refused (`ClusterError::Refused`) while `from` is too new a leader.
    ///
    /// `Move::Balance` (a move that can wait) is also refused while `to`
    /// lacks the leader's last entry; `Move::Needed` (a drain, a shutdown, a
    /// leader leaving the shard) is not, as before.
    pub async fn hand_over(&self, group: GroupId, from: NodeId, to: NodeId, kind: Move) -> Result<(), ClusterError> {
        if from != 0 && from != to {
            let caught_up = (kind == Move::Balance).then_some(to);
            match self.step_aside_on(from, group, caught_up).await {
                Ok(()) => {}
                // The leader refused (too new to hand over): `to` would lose.
                Err(ClusterError::Refused(reason)) => {
                    tracing::debug!(group, from, to, reason, "hand-over put off");
                    return Err(ClusterError::Refused(reason));
                }
                Err(e) => tracing::debug!(group, from, error = %e, "step aside"),
            }
        }
        self.elect_on(to, group).await
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
                    let mut result = self.hand_over(g.id, self.node_id, target, Move::Needed).await;
                    if let Err(ClusterError::Refused(_)) = result {
                        // Led for too short a time: once more when it is not.
                        tokio::time::sleep(YOUNG_LEADER).await;
                        result = self.hand_over(g.id, self.node_id, target, Move::Needed).await;
                    }
                    match result {
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

    /// Asks `node`, leading `group`, to stop campaigning for it for
    /// [`STEP_ASIDE`] ([`step_aside_for`]).
    async fn step_aside_on(&self, node: NodeId, group: GroupId, caught_up: Option<NodeId>) -> Result<(), ClusterError> {
        if node == self.node_id {
            let g = self.groups.get(group).ok_or(ClusterError::GroupNotHosted)?;
            step_aside_for(&g, caught_up).await.map_err(ClusterError::Refused)?;
            return Ok(());
        }
        self.elect_rpc(node, group, true, caught_up.unwrap_or(0)).await
    }

    /// Asks `node` to campaign for `group`.
    async fn elect_on(&self, node: NodeId, group: GroupId) -> Result<(), ClusterError> {
        if node == self.node_id {
            let g = self.groups.get(group).ok_or(ClusterError::GroupNotHosted)?;
            return g.raft.trigger().elect().await.map_err(ClusterError::raft);
        }
        self.elect_rpc(node, group, false, 0).await
    }

    async fn elect_rpc(
        &self,
        node: NodeId,
        group: GroupId,
        step_aside: bool,
        caught_up: NodeId,
    ) -> Result<(), ClusterError> {
        let addr = self.nodes().get(&node).cloned().ok_or(ClusterError::UnknownNode)?;
        let addr = self.peers.dial(node, addr);
        let mut client = self.peers.peer(node, &addr).map_err(ClusterError::peer)?;
        client
            .elect(tern_proto::peer::ElectRequest {
                group_id: group,
                step_aside,
                caught_up,
            })
            .await
            .map(|_| ())
            .map_err(|status| match status.code() {
                // A step aside refused by a leader too new to hand over.
                tonic::Code::FailedPrecondition if step_aside => ClusterError::Refused(status.message().to_owned()),
                _ => ClusterError::peer(status),
            })
    }
}
