//! Placement rules: pure functions the controller applies to the control
//! group's records (which nodes vote in group 0, which replica moves next,
//! who takes a drained node's leaderships, when a cluster is at rest).
//! No I/O here: everything is decided from the maps passed in.

use std::collections::{BTreeMap, BTreeSet};

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
