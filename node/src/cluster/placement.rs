//! Placement rules: pure functions the controller applies to the control
//! group's records (which nodes vote in group 0, which replica moves next,
//! who takes a drained node's leaderships, when a cluster is at rest), and
//! the controller's decisions built from them: what the placement controller
//! repairs, the rebalancer's and the leader balancer's next step, and a
//! shard leader's next membership step. No I/O here: everything is decided
//! from the maps passed in, so the controller loop (`reconcile.rs`,
//! `leader.rs`) and the simulation (`sim.rs`) run the same decisions.

use std::collections::{BTreeMap, BTreeSet};

use super::shards::{grow_step, shrink_step};
use crate::raft::{GroupId, NodeId};

/// Control-group voters at most; further nodes stay learners of group 0.
pub const MAX_CONTROL_VOTERS: usize = 5;

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
    rebalance_move_among(placement, members, leaders, |_| true)
}

/// [`rebalance_move`] choosing only among the shards `movable` accepts
/// (every shard still counts towards the load): the simulation's model of
/// several moves at once, each on a shard at rest.
pub fn rebalance_move_among(
    placement: &BTreeMap<GroupId, Vec<NodeId>>,
    members: &BTreeSet<NodeId>,
    leaders: &BTreeMap<GroupId, NodeId>,
    movable: impl Fn(GroupId) -> bool,
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
            .filter(|(shard, r)| r.contains(&from) && !r.contains(&to) && movable(**shard))
            .map(|(shard, _)| *shard)
            .collect();
        candidates.sort_by_key(|shard| leaders.get(shard) == Some(&from));
        if let Some(shard) = candidates.first() {
            return Some((*shard, from, to));
        }
    }
    None
}

/// The leader balancer's next move, as (shard, from, to), when some node
/// leads more than `share`. `count`: leaderships of the nodes that may lead
/// (the others are never a source or a target). A direct move goes from an
/// overloaded node (busiest first) to the replica of one of its shards
/// leading the fewest, when that one then leads fewer than the giver did.
/// When no overloaded node has one (every other replica of its shards leads
/// just one less, as happens once nodes outnumber replicas), the move goes
/// to such a replica that will itself have a direct move (A 3 -> B 2, then
/// B 3 -> C 1); without it A would stay above its share for good. That move
/// leaves the sum of squared counts as it was, and the direct move it
/// enables lowers it, so the balancer settles.
pub fn leader_move(
    leaders: &BTreeMap<GroupId, NodeId>,
    placement: &BTreeMap<GroupId, Vec<NodeId>>,
    count: &BTreeMap<NodeId, usize>,
    share: usize,
) -> Option<(GroupId, NodeId, NodeId)> {
    let mut overloaded: Vec<(NodeId, usize)> = count
        .iter()
        .filter(|(_, c)| **c > share)
        .map(|(n, c)| (*n, *c))
        .collect();
    overloaded.sort_by_key(|(n, c)| std::cmp::Reverse((*c, *n)));
    // The replica of `shard` other than `from` leading the fewest under `count`.
    let fewest = |count: &BTreeMap<NodeId, usize>, shard: GroupId, from: NodeId| {
        placement
            .get(&shard)?
            .iter()
            .filter(|n| **n != from)
            .filter_map(|n| Some((*n, *count.get(n)?)))
            .min_by_key(|(n, c)| (*c, *n))
    };
    let direct = |count: &BTreeMap<NodeId, usize>, from: NodeId, most: usize| {
        leaders.iter().filter(|(_, l)| **l == from).find_map(|(shard, _)| {
            fewest(count, *shard, from)
                .filter(|(_, c)| c + 1 < most)
                .map(|(to, _)| (*shard, to))
        })
    };
    for (from, most) in &overloaded {
        if let Some((shard, to)) = direct(count, *from, *most) {
            return Some((shard, *from, to));
        }
    }
    for (from, most) in &overloaded {
        for (shard, _) in leaders.iter().filter(|(_, l)| **l == *from) {
            let Some(replicas) = placement.get(shard) else { continue };
            for to in replicas.iter().filter(|n| **n != *from) {
                if count.get(to).is_none_or(|c| c + 1 != *most) {
                    continue;
                }
                let mut after = count.clone();
                after.insert(*from, most - 1);
                after.insert(*to, *most);
                let mut moved = leaders.clone();
                moved.insert(*shard, *to);
                let onward = moved
                    .iter()
                    .filter(|(_, l)| **l == *to)
                    .any(|(s, _)| fewest(&after, *s, *to).is_some_and(|(_, c)| c + 1 < *most));
                if onward {
                    return Some((*shard, *from, *to));
                }
            }
        }
    }
    None
}

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

/// Entries a learner may lag behind the leader's log and count as caught up.
pub const LEARNER_SLACK: u64 = 1000;

/// The placement controller's repairs, as (shard, new replicas) in shard
/// order: replicas on nodes that left are dropped, a replica on a long-dead
/// node moves to the least loaded live member the shard lacks (when there
/// is one), and with `grow_all` a short shard grows to `want` (capped by
/// the members) the same way. Shards `skip` names (being added) stay put.
pub fn placement_repairs(
    placement: &BTreeMap<GroupId, Vec<NodeId>>,
    members: &BTreeSet<NodeId>,
    dead: &BTreeSet<NodeId>,
    want: usize,
    grow_all: bool,
    skip: impl Fn(GroupId) -> bool,
) -> Vec<(GroupId, Vec<NodeId>)> {
    let mut changes = Vec::new();
    if members.is_empty() {
        return changes;
    }
    let want = want.min(members.len());
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
    for (shard, current) in placement {
        if skip(*shard) {
            continue;
        }
        let mut next: Vec<NodeId> = current.iter().copied().filter(|n| members.contains(n)).collect();
        for i in 0..next.len() {
            if dead.contains(&next[i]) {
                if let Some(spare) = pick(&load, &next) {
                    next[i] = spare;
                    *load.entry(spare).or_default() += 1;
                }
            }
        }
        while grow_all && next.len() < want {
            let Some(n) = pick(&load, &next) else { break };
            next.push(n);
            *load.entry(n).or_default() += 1;
        }
        if &next != current {
            changes.push((*shard, next));
        }
    }
    changes
}

/// The rebalancer's next step (see [`rebalance_step`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RebalanceStep {
    /// `cluster set replicas`: one shard gains or loses one replica.
    Resize { shard: GroupId, replicas: Vec<NodeId> },
    /// The replica to move leads the shard: it hands over to `to` first
    /// (None: the shard has no other replica, and the step waits).
    HandOver {
        shard: GroupId,
        from: NodeId,
        to: Option<NodeId>,
    },
    /// One replica moves from `from` to `to`; `replicas` is the new set.
    Move {
        shard: GroupId,
        from: NodeId,
        to: NodeId,
        replicas: Vec<NodeId>,
    },
}

/// What the rebalancer does next, or None when the replica count is as
/// wanted and replicas per member differ by at most one. Only with every
/// member reachable and every shard at rest (`rows`), so one change is in
/// flight in the whole cluster and a shard never loses its majority.
/// Shards `skip` names (being added) stay where they were created.
pub fn rebalance_step(
    placement: &BTreeMap<GroupId, Vec<NodeId>>,
    rows: &BTreeMap<GroupId, tern_proto::admin::ShardStatus>,
    members: &BTreeSet<NodeId>,
    all_reachable: bool,
    want: usize,
    skip: impl Fn(GroupId) -> bool,
) -> Option<RebalanceStep> {
    if !all_reachable || !at_rest(placement, rows) {
        return None;
    }
    let leaders: BTreeMap<GroupId, NodeId> = rows.iter().map(|(s, r)| (*s, r.leader)).collect();
    let placement: BTreeMap<GroupId, Vec<NodeId>> = placement
        .iter()
        .filter(|(shard, _)| !skip(**shard))
        .map(|(shard, r)| (*shard, r.clone()))
        .collect();
    let want = want.min(members.len());
    let resize = shrink_step(&placement, &leaders, want).or_else(|| grow_step(&placement, members, want));
    if let Some((shard, replicas)) = resize {
        return Some(RebalanceStep::Resize { shard, replicas });
    }
    let (shard, from, to) = rebalance_move(&placement, members, &leaders)?;
    let current = placement.get(&shard).cloned().unwrap_or_default();
    if leaders.get(&shard) == Some(&from) {
        let to = current.iter().find(|n| **n != from).copied();
        return Some(RebalanceStep::HandOver { shard, from, to });
    }
    let replicas = current.iter().map(|n| if *n == from { to } else { *n }).collect();
    Some(RebalanceStep::Move {
        shard,
        from,
        to,
        replicas,
    })
}

/// Whether `shard` is at rest in `rows`: led, not joint, its voters its placement.
fn shard_at_rest(shard: GroupId, placed: &[NodeId], rows: &BTreeMap<GroupId, tern_proto::admin::ShardStatus>) -> bool {
    rows.get(&shard).is_some_and(|r| {
        r.leader != 0
            && !r.joint
            && r.voters.iter().copied().collect::<BTreeSet<_>>() == placed.iter().copied().collect::<BTreeSet<_>>()
    })
}

/// What the rebalancer starts now with up to `moves` shards changing at once
/// (`ternctl cluster set rebalance_moves`). With 1, [`rebalance_step`]: one
/// step, the whole cluster at rest. With more, a replica move (or the
/// hand-over before it) starts on a shard at rest while fewer than `moves`
/// shards are under way. Each shard still has at most one change in flight
/// (one replica swapped through a learner), so each keeps its majority as
/// with one move; what grows is the catch-up traffic at once. Replica count
/// changes (`Resize`) still go one at a time with the cluster at rest.
pub fn rebalance_steps(
    placement: &BTreeMap<GroupId, Vec<NodeId>>,
    rows: &BTreeMap<GroupId, tern_proto::admin::ShardStatus>,
    members: &BTreeSet<NodeId>,
    all_reachable: bool,
    want: usize,
    skip: impl Fn(GroupId) -> bool,
    moves: usize,
) -> Vec<RebalanceStep> {
    if moves <= 1 || !all_reachable {
        return rebalance_step(placement, rows, members, all_reachable, want, skip)
            .into_iter()
            .collect();
    }
    if at_rest(placement, rows) {
        if let Some(step @ RebalanceStep::Resize { .. }) =
            rebalance_step(placement, rows, members, all_reachable, want, &skip)
        {
            return vec![step];
        }
    }
    let leaders: BTreeMap<GroupId, NodeId> = rows.iter().map(|(s, r)| (*s, r.leader)).collect();
    let mut placement: BTreeMap<GroupId, Vec<NodeId>> = placement
        .iter()
        .filter(|(shard, _)| !skip(**shard))
        .map(|(shard, r)| (*shard, r.clone()))
        .collect();
    let want = want.min(members.len());
    if shrink_step(&placement, &leaders, want)
        .or_else(|| grow_step(&placement, members, want))
        .is_some()
    {
        // A replica count change waits for the cluster at rest.
        return Vec::new();
    }
    let busy: BTreeSet<GroupId> = placement
        .iter()
        .filter(|(shard, placed)| !shard_at_rest(**shard, placed, rows))
        .map(|(shard, _)| *shard)
        .collect();
    let mut steps = Vec::new();
    let mut touched = BTreeSet::new();
    while busy.len() + steps.len() < moves {
        let movable = |shard| !busy.contains(&shard) && !touched.contains(&shard);
        let Some((shard, from, to)) = rebalance_move_among(&placement, members, &leaders, movable) else {
            break;
        };
        touched.insert(shard);
        let current = placement.get(&shard).cloned().unwrap_or_default();
        if leaders.get(&shard) == Some(&from) {
            let to = current.iter().find(|n| **n != from).copied();
            steps.push(RebalanceStep::HandOver { shard, from, to });
            continue;
        }
        let replicas: Vec<NodeId> = current.iter().map(|n| if *n == from { to } else { *n }).collect();
        placement.insert(shard, replicas.clone());
        steps.push(RebalanceStep::Move {
            shard,
            from,
            to,
            replicas,
        });
    }
    steps
}

/// A leadership to move: `drain` when it leaves a drained node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaderMove {
    pub shard: GroupId,
    pub from: NodeId,
    pub to: NodeId,
    pub drain: bool,
}

/// The leader balancer's next move, with the cluster at rest: a drained
/// node's leadership first (to [`drain_target`]; `tried`: the replica a
/// recent hand-over of that shard went to), then [`leader_move`] over the
/// nodes that may lead (not drained, not `unreachable`), each up to an even
/// share.
pub fn next_leader_move(
    placement: &BTreeMap<GroupId, Vec<NodeId>>,
    rows: &BTreeMap<GroupId, tern_proto::admin::ShardStatus>,
    nodes: &BTreeSet<NodeId>,
    drained: &BTreeSet<NodeId>,
    unreachable: &[NodeId],
    tried: impl Fn(GroupId) -> Option<NodeId>,
) -> Option<LeaderMove> {
    if nodes.len() < 2 || !at_rest(placement, rows) {
        return None;
    }
    let leaders: BTreeMap<GroupId, NodeId> = rows.iter().map(|(s, r)| (*s, r.leader)).collect();
    let may_lead = |n: NodeId| !drained.contains(&n) && !unreachable.contains(&n);
    let eligible: Vec<NodeId> = nodes.iter().copied().filter(|n| may_lead(*n)).collect();
    if eligible.is_empty() {
        return None;
    }
    let mut count: BTreeMap<NodeId, usize> = eligible.iter().map(|n| (*n, 0)).collect();
    for l in leaders.values() {
        if let Some(c) = count.get_mut(l) {
            *c += 1;
        }
    }
    for (shard, leader) in &leaders {
        if !drained.contains(leader) {
            continue;
        }
        let target = placement
            .get(shard)
            .and_then(|r| drain_target(r, may_lead, &count, tried(*shard)));
        if let Some(to) = target {
            return Some(LeaderMove {
                shard: *shard,
                from: *leader,
                to,
                drain: true,
            });
        }
    }
    let share = leaders.len().div_ceil(eligible.len());
    let (shard, from, to) = leader_move(&leaders, placement, &count, share)?;
    Some(LeaderMove {
        shard,
        from,
        to,
        drain: false,
    })
}

/// The replica a shard leader that is leaving the shard asks to take over
/// first: a voter that stays, the most caught up (`matched`), lowest id on
/// ties.
pub fn leaving_leader_target(
    desired: &BTreeSet<NodeId>,
    voters: &BTreeSet<NodeId>,
    matched: impl Fn(NodeId) -> u64,
) -> Option<NodeId> {
    desired
        .iter()
        .filter(|n| voters.contains(n))
        .max_by_key(|n| (matched(**n), std::cmp::Reverse(**n)))
        .copied()
}

/// A shard leader's next step towards its placement (see [`membership_step`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MembershipStep {
    /// This new replica is a learner that has caught up: nothing more for it.
    CaughtUp(NodeId),
    /// This new replica is added as a learner (the call returns once it
    /// has caught up).
    AddLearner(NodeId),
    /// This new replica, a learner, is still catching up: try again later.
    Behind(NodeId),
    /// Every new replica is a caught-up learner: the voters become the
    /// placement in one joint-consensus change.
    Promote,
}

/// A shard leader's next step from `voters` towards `desired`: new
/// replicas, in id order, are added as learners and waited for; then the
/// voters are replaced at once. `done`: new replicas already dealt with in
/// this try; `learner(n)`: n's matched log index when it is a learner;
/// `last`: the leader's last log index.
pub fn membership_step(
    desired: &BTreeSet<NodeId>,
    voters: &BTreeSet<NodeId>,
    done: &BTreeSet<NodeId>,
    learner: impl Fn(NodeId) -> Option<u64>,
    last: u64,
) -> MembershipStep {
    for n in desired.difference(voters) {
        if done.contains(n) {
            continue;
        }
        // A learner added by an earlier try may still be catching up (a
        // large queue's snapshot takes minutes): adding it again would
        // restart its replication, snapshot and all.
        return match learner(*n) {
            Some(matched) if matched + LEARNER_SLACK < last => MembershipStep::Behind(*n),
            Some(_) => MembershipStep::CaughtUp(*n),
            None => MembershipStep::AddLearner(*n),
        };
    }
    MembershipStep::Promote
}

/// Every placed shard is settled: a leader, no joint config, and its voters
/// are its placement.
pub(super) fn at_rest(
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

    /// Applies `leader_move` until it stops; the final counts.
    fn balance(
        leaders: &mut BTreeMap<GroupId, NodeId>,
        placement: &BTreeMap<GroupId, Vec<NodeId>>,
        nodes: &[NodeId],
    ) -> BTreeMap<NodeId, usize> {
        let share = leaders.len().div_ceil(nodes.len());
        for _ in 0..100 {
            let mut count: BTreeMap<NodeId, usize> = nodes.iter().map(|n| (*n, 0)).collect();
            for l in leaders.values() {
                *count.get_mut(l).unwrap() += 1;
            }
            let Some((shard, from, to)) = leader_move(leaders, placement, &count, share) else {
                return count;
            };
            assert_eq!(leaders[&shard], from);
            assert!(placement[&shard].contains(&to));
            leaders.insert(shard, to);
        }
        panic!("the balancer does not settle: {leaders:?}");
    }

    #[test]
    fn leaders_spread_through_a_middle_node_when_no_direct_move_helps() {
        // 3 replicas on 4 nodes, 4 shards: node 1 leads 2, node 4 none, and
        // node 4 holds no replica of node 1's shards; node 2 holds both.
        let placement: BTreeMap<GroupId, Vec<NodeId>> = BTreeMap::from([
            (1, vec![1, 2, 3]),
            (2, vec![1, 2, 3]),
            (3, vec![2, 3, 4]),
            (4, vec![2, 3, 4]),
        ]);
        let mut leaders = BTreeMap::from([(1, 1), (2, 1), (3, 2), (4, 3)]);
        let count: BTreeMap<NodeId, usize> = BTreeMap::from([(1, 2), (2, 1), (3, 1), (4, 0)]);
        // No replica of shards 1 and 2 leads fewer than 1: through node 2 or 3.
        assert_eq!(leader_move(&leaders, &placement, &count, 1), Some((1, 1, 2)));
        let count = balance(&mut leaders, &placement, &[1, 2, 3, 4]);
        assert!(count.values().all(|c| *c == 1), "{count:?} {leaders:?}");
    }

    #[test]
    fn leaders_spread_over_seven_nodes() {
        // 14 shards of 3 replicas over 7 nodes, every leadership on one
        // replica of a few nodes: the balancer ends with 2 each.
        let placement: BTreeMap<GroupId, Vec<NodeId>> = (1..=14u64)
            .map(|s| (s, vec![(s - 1) % 7 + 1, s % 7 + 1, (s + 2) % 7 + 1]))
            .collect();
        let mut leaders: BTreeMap<GroupId, NodeId> = placement.iter().map(|(s, r)| (*s, r[0].min(r[1]))).collect();
        let count = balance(&mut leaders, &placement, &[1, 2, 3, 4, 5, 6, 7]);
        assert!(count.values().all(|c| *c == 2), "{count:?} {leaders:?}");
        // Balanced: nothing to do.
        assert_eq!(leader_move(&leaders, &placement, &count, 2), None);
    }

    /// A shard at rest as `all_shards` reports it.
    fn rest_row(shard: GroupId, leader: NodeId, voters: &[NodeId]) -> ShardStatus {
        ShardStatus {
            shard,
            leader,
            voters: voters.to_vec(),
            ..ShardStatus::default()
        }
    }

    #[test]
    fn repairs_drop_left_nodes_replace_dead_ones_and_grow_short_shards() {
        let placement: BTreeMap<GroupId, Vec<NodeId>> =
            BTreeMap::from([(1, vec![1, 2, 3]), (2, vec![1, 2, 4]), (3, vec![2, 3, 4]), (4, vec![1])]);
        // Node 4 is dead, node 3 left, node 5 is new and empty.
        let members = set(&[1, 2, 4, 5]);
        let dead = set(&[4]);
        let changes = placement_repairs(&placement, &members, &dead, 3, true, |_| false);
        assert_eq!(
            changes,
            vec![
                (1, vec![1, 2, 5]),
                (2, vec![1, 2, 5]),
                (3, vec![2, 5, 1]),
                (4, vec![1, 2, 5]),
            ]
        );
        // Without growth a short shard stays short; a skipped shard stays put.
        let changes = placement_repairs(&placement, &members, &dead, 3, false, |s| s == 2);
        assert_eq!(changes, vec![(1, vec![1, 2]), (3, vec![2, 5])]);
        // A dead node with no live spare keeps its place.
        let small = BTreeMap::from([(1, vec![1, 2, 3])]);
        assert!(placement_repairs(&small, &set(&[1, 2, 3]), &set(&[3]), 3, true, |_| false).is_empty());
        assert!(placement_repairs(&small, &BTreeSet::new(), &BTreeSet::new(), 3, true, |_| false).is_empty());
    }

    #[test]
    fn the_rebalancer_waits_for_rest_and_hands_over_before_moving_a_leader() {
        let placement: BTreeMap<GroupId, Vec<NodeId>> = (1..=4).map(|s| (s, vec![1, 2, 3])).collect();
        let members = set(&[1, 2, 3, 4]);
        let mut rows: BTreeMap<GroupId, ShardStatus> = (1..=4).map(|s| (s, rest_row(s, 1, &[1, 2, 3]))).collect();
        // Node 4 is empty; of the equally loaded sources the highest id
        // goes first: node 3, which leads no shard.
        assert_eq!(
            rebalance_step(&placement, &rows, &members, true, 3, |_| false),
            Some(RebalanceStep::Move {
                shard: 1,
                from: 3,
                to: 4,
                replicas: vec![1, 2, 4]
            })
        );
        // Not while a member does not answer, nor while a shard is not at rest.
        assert_eq!(rebalance_step(&placement, &rows, &members, false, 3, |_| false), None);
        rows.get_mut(&2).unwrap().joint = true;
        assert_eq!(rebalance_step(&placement, &rows, &members, true, 3, |_| false), None);
        rows.get_mut(&2).unwrap().joint = false;
        // Node 3 leads every shard: it hands over first, to another replica.
        for r in rows.values_mut() {
            r.leader = 3;
        }
        assert_eq!(
            rebalance_step(&placement, &rows, &members, true, 3, |_| false),
            Some(RebalanceStep::HandOver {
                shard: 1,
                from: 3,
                to: Some(1)
            })
        );
        // Fewer replicas wanted: a resize comes first, never dropping the leader.
        assert_eq!(
            rebalance_step(&placement, &rows, &members, true, 2, |_| false),
            Some(RebalanceStep::Resize {
                shard: 1,
                replicas: vec![1, 3]
            })
        );
    }

    #[test]
    fn several_moves_start_on_shards_at_rest_up_to_the_setting() {
        // 8 shards on nodes 1-3, node 4 empty: it should get 6 replicas.
        let placement: BTreeMap<GroupId, Vec<NodeId>> = (1..=8).map(|s| (s, vec![1, 2, 3])).collect();
        let members = set(&[1, 2, 3, 4]);
        let mut rows: BTreeMap<GroupId, ShardStatus> = (1..=8).map(|s| (s, rest_row(s, 1, &[1, 2, 3]))).collect();
        // One at a time: exactly the single step.
        assert_eq!(
            rebalance_steps(&placement, &rows, &members, true, 3, |_| false, 1),
            rebalance_step(&placement, &rows, &members, true, 3, |_| false)
                .into_iter()
                .collect::<Vec<_>>()
        );
        let moved = |steps: &[RebalanceStep]| -> Vec<GroupId> {
            steps
                .iter()
                .map(|s| match s {
                    RebalanceStep::Move {
                        shard, to, replicas, ..
                    } => {
                        assert_eq!(*to, 4);
                        assert!(replicas.contains(&4) && replicas.len() == 3, "{replicas:?}");
                        *shard
                    }
                    // A source that leads the shard hands it over first.
                    RebalanceStep::HandOver { shard, from, to } => {
                        assert!(to.is_some_and(|t| t != *from));
                        *shard
                    }
                    other => panic!("unexpected {other:?}"),
                })
                .collect()
        };
        let steps = rebalance_steps(&placement, &rows, &members, true, 3, |_| false, 4);
        let shards = moved(&steps);
        assert_eq!(shards.len(), 4, "{steps:?}");
        assert_eq!(shards.iter().collect::<BTreeSet<_>>().len(), 4, "one move per shard");
        // Two shards under way count against the four.
        let mut placement2 = placement.clone();
        for shard in [1, 2] {
            placement2.insert(shard, vec![1, 2, 4]);
            rows.get_mut(&shard).unwrap().voters = vec![1, 2, 3, 4];
        }
        let steps = rebalance_steps(&placement2, &rows, &members, true, 3, |_| false, 4);
        let shards = moved(&steps);
        assert_eq!(shards.len(), 2, "{steps:?}");
        assert!(shards.iter().all(|s| *s > 2), "never a shard under way: {shards:?}");
        // Balanced once node 4 holds its share: nothing more.
        let sets = [vec![1, 2, 3], vec![1, 2, 4], vec![1, 3, 4], vec![2, 3, 4]];
        let balanced: BTreeMap<GroupId, Vec<NodeId>> = (1..=8).map(|s| (s, sets[(s as usize) % 4].clone())).collect();
        let rest: BTreeMap<GroupId, ShardStatus> = balanced.iter().map(|(s, r)| (*s, rest_row(*s, r[0], r))).collect();
        assert_eq!(
            rebalance_steps(&balanced, &rest, &members, true, 3, |_| false, 4),
            vec![]
        );
        // Not while a member does not answer; a replica count change waits
        // for the whole cluster at rest and goes alone.
        assert_eq!(
            rebalance_steps(&placement2, &rows, &members, false, 3, |_| false, 4),
            vec![]
        );
        assert_eq!(
            rebalance_steps(&placement2, &rows, &members, true, 4, |_| false, 4),
            vec![]
        );
        let at_rest: BTreeMap<GroupId, ShardStatus> = (1..=8).map(|s| (s, rest_row(s, 1, &[1, 2, 3]))).collect();
        assert!(matches!(
            rebalance_steps(&placement, &at_rest, &members, true, 4, |_| false, 4).as_slice(),
            [RebalanceStep::Resize { .. }]
        ));
    }

    #[test]
    fn a_drained_leader_moves_before_the_balancer_evens_out() {
        let placement: BTreeMap<GroupId, Vec<NodeId>> = (1..=4).map(|s| (s, vec![1, 2, 3])).collect();
        let nodes = set(&[1, 2, 3]);
        let mut rows: BTreeMap<GroupId, ShardStatus> = (1..=4).map(|s| (s, rest_row(s, 1, &[1, 2, 3]))).collect();
        rows.get_mut(&4).unwrap().leader = 2;
        let drained = set(&[2]);
        let mv = next_leader_move(&placement, &rows, &nodes, &drained, &[], |_| None);
        assert_eq!(
            mv,
            Some(LeaderMove {
                shard: 4,
                from: 2,
                to: 3,
                drain: true
            })
        );
        // The last target did not win: the next replica.
        let mv = next_leader_move(&placement, &rows, &nodes, &drained, &[], |_| Some(3));
        assert_eq!(mv.map(|m| m.to), Some(1));
        // Nothing drained: node 1 leads 3 of 4, more than its share of 2.
        let mv = next_leader_move(&placement, &rows, &nodes, &BTreeSet::new(), &[], |_| None);
        assert_eq!(
            mv,
            Some(LeaderMove {
                shard: 1,
                from: 1,
                to: 3,
                drain: false
            })
        );
        // Unreachable nodes take nothing; a cluster not at rest is left alone.
        let mv = next_leader_move(&placement, &rows, &nodes, &BTreeSet::new(), &[3], |_| None);
        assert_eq!(mv.map(|m| m.to), Some(2));
        rows.get_mut(&1).unwrap().leader = 0;
        assert_eq!(
            next_leader_move(&placement, &rows, &nodes, &drained, &[], |_| None),
            None
        );
    }

    #[test]
    fn a_shard_leader_adds_learners_one_by_one_then_swaps_the_voters() {
        let desired = set(&[1, 4, 5]);
        let voters = set(&[1, 2, 3]);
        let last = 5_000;
        let mut done = BTreeSet::new();
        // Neither is a learner yet: node 4 is added first.
        assert_eq!(
            membership_step(&desired, &voters, &done, |_| None, last),
            MembershipStep::AddLearner(4)
        );
        done.insert(4);
        // Node 5, added by an earlier try, is still catching up.
        let lagging = |n| (n == 5).then_some(last - LEARNER_SLACK - 1);
        assert_eq!(
            membership_step(&desired, &voters, &done, lagging, last),
            MembershipStep::Behind(5)
        );
        let close = |n| (n == 5).then_some(last - LEARNER_SLACK);
        assert_eq!(
            membership_step(&desired, &voters, &done, close, last),
            MembershipStep::CaughtUp(5)
        );
        done.insert(5);
        assert_eq!(
            membership_step(&desired, &voters, &done, close, last),
            MembershipStep::Promote
        );
        // A leader leaving hands over to the most caught-up voter that stays.
        let matched = |n| [0, 10, 30, 30, 50][n as usize];
        assert_eq!(
            leaving_leader_target(&set(&[2, 3, 4]), &set(&[1, 2, 3]), matched),
            Some(2)
        );
        assert_eq!(
            leaving_leader_target(&set(&[1, 2, 3]), &set(&[1, 2, 3]), matched),
            Some(2)
        );
        assert_eq!(leaving_leader_target(&set(&[4]), &set(&[1, 2, 3]), matched), None);
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
