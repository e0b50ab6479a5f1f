//! Shards added and retired online, and the cluster's replica count
//! (`ternctl shard add|retire`, `ternctl cluster set replicas`): the
//! records and the pure rules over them. No I/O here.
//!
//! The records live in the control group as shared records of the space
//! [`SPACE`] (`PutShared`/`DeleteShared`, which every release applies), so
//! a node of an earlier release stores them and ignores them rather than
//! failing to apply an entry it cannot read:
//! - `state/<shard, 20 digits>`: a [`ShardRecord`]. A shard without one is
//!   active (every shard made at bootstrap; an added one once it has led).
//! - `replicas`: the replica count (`u32`, bincode); without it, each node's
//!   `[cluster] replicas`.
//! - `rebalance_moves`: shards the rebalancer moves at once (`u32`,
//!   bincode); without it, [`DEFAULT_REBALANCE_MOVES`].
//! - `request/<id>`: the shards a `shard add` with that request id added
//!   (`Vec<u64>`, bincode), written with their state records, so that a
//!   repeat of the call returns them instead of adding more.
//!
//! A shard's life: `Adding` (recorded; the controller places it on one
//! node, which creates the group and leads it) -> active (record deleted;
//! new mail goes to it, the placement controller tops it up) -> `Retiring`
//! (no new mail; it still delivers and retries its queue) -> `Retired` (its
//! queue and outbox were empty for [`RETIRE_GRACE_SECS`]; placement empty,
//! every replica closes the group once its own copy holds nothing).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::raft::{GroupId, NodeId};

/// The shared-record space of these records.
pub const SPACE: &str = "shards";
/// Key of the cluster's replica count.
pub const REPLICAS_KEY: &str = "replicas";
/// Prefix of the shard state records.
pub const STATE_PREFIX: &str = "state/";
/// Key of the rebalancer's moves at once (`u32`, bincode); without it,
/// [`DEFAULT_REBALANCE_MOVES`].
pub const REBALANCE_MOVES_KEY: &str = "rebalance_moves";
/// Shards the rebalancer moves at once unless `cluster set rebalance_moves`
/// says otherwise: one, the cluster at rest in between.
pub const DEFAULT_REBALANCE_MOVES: u32 = 1;
/// Most shards `cluster set rebalance_moves` lets move at once.
pub const MAX_REBALANCE_MOVES: u32 = 64;
/// Prefix of the `shard add` request records.
pub const REQUEST_PREFIX: &str = "request/";
/// Longest `shard add` request id.
pub const MAX_REQUEST_ID: usize = 64;
/// Shards one `shard add` may create.
pub const MAX_ADD: u32 = 256;
/// Highest shard id (a peer creates no group above it; see tern-raft's host).
pub const MAX_SHARD: GroupId = 4096;
/// How long a retiring shard must have been retiring, and empty, before
/// its group is removed: longer than a forwarded write may be in flight
/// (every node stops routing to it once it applies the record).
pub const RETIRE_GRACE_SECS: i64 = 30;

/// Where a shard is in its life (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShardState {
    Adding,
    Retiring,
    Retired,
}

impl ShardState {
    pub fn as_str(self) -> &'static str {
        match self {
            ShardState::Adding => "adding",
            ShardState::Retiring => "retiring",
            ShardState::Retired => "retired",
        }
    }
}

/// A shard's state record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRecord {
    pub state: ShardState,
    /// Unix seconds the shard entered `state`.
    pub since: i64,
}

/// The shared-record key of `shard`'s state (zero-padded: key order is id order).
pub fn state_key(shard: GroupId) -> String {
    format!("{STATE_PREFIX}{shard:020}")
}

/// The shard a state key names.
pub fn parse_state_key(key: &str) -> Option<GroupId> {
    key.strip_prefix(STATE_PREFIX)?.parse().ok()
}

/// The shared-record key of a `shard add` request id.
pub fn request_key(request_id: &str) -> String {
    format!("{REQUEST_PREFIX}{request_id}")
}

/// Checks a `shard add` request id: 1 to [`MAX_REQUEST_ID`] characters of
/// A-Z, a-z, 0-9, `-` and `_` (it becomes part of a record key).
pub fn check_request_id(request_id: &str) -> Result<(), String> {
    let ok = !request_id.is_empty()
        && request_id.len() <= MAX_REQUEST_ID
        && request_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "shard add: a request id is 1 to {MAX_REQUEST_ID} of A-Z a-z 0-9 - _, not {request_id:?}"
        ))
    }
}

/// What a `shard add` of `count` does given the shards an earlier call
/// with the same request id added (`earlier`): nothing new and those ids
/// again, or a refusal when that call asked for another count (a request
/// id reused by mistake must not pass for a repeat).
pub fn repeated_add(earlier: Option<Vec<GroupId>>, count: u32) -> Result<Option<Vec<GroupId>>, String> {
    match earlier {
        None => Ok(None),
        Some(ids) if ids.len() == count as usize => Ok(Some(ids)),
        Some(ids) => Err(format!(
            "shard add: this request id already added {} shards ({ids:?}), not {count}",
            ids.len()
        )),
    }
}

/// The ids `count` new shards get: after the highest shard ever placed or
/// recorded (retired ids are never reused).
pub fn next_shard_ids(
    placed: impl IntoIterator<Item = GroupId>,
    records: &BTreeMap<GroupId, ShardRecord>,
    count: u32,
) -> Result<Vec<GroupId>, String> {
    if count == 0 || count > MAX_ADD {
        return Err(format!("shard add: N must be 1 to {MAX_ADD}, not {count}"));
    }
    let highest = placed.into_iter().chain(records.keys().copied()).max().unwrap_or(0);
    let last = highest + u64::from(count);
    if last > MAX_SHARD {
        return Err(format!(
            "shard add: shards would reach {last}, above the limit of {MAX_SHARD}"
        ));
    }
    Ok((highest + 1..=last).collect())
}

/// Whether new mail may go to `shard`: it has no state record (active).
pub fn routable(records: &BTreeMap<GroupId, ShardRecord>, shard: GroupId) -> bool {
    !records.contains_key(&shard)
}

/// Checks a `shard retire` of `shard`: it is placed and active, and another
/// active shard stays to take new mail.
pub fn check_retire(
    placement: &BTreeMap<GroupId, Vec<NodeId>>,
    records: &BTreeMap<GroupId, ShardRecord>,
    shard: GroupId,
) -> Result<(), String> {
    if let Some(r) = records.get(&shard) {
        return Err(format!("shard {shard} is {} already", r.state.as_str()));
    }
    if !placement.contains_key(&shard) {
        return Err(format!("shard {shard} does not exist"));
    }
    let others = placement
        .keys()
        .filter(|s| **s != shard && routable(records, **s))
        .count();
    if others == 0 {
        return Err(format!(
            "shard {shard} is the last active shard: new mail needs one (shard add first)"
        ));
    }
    Ok(())
}

/// Checks `cluster set replicas R`: 1 <= R <= members.
pub fn check_replicas(replicas: u32, members: usize) -> Result<(), String> {
    if replicas == 0 || replicas as usize > members {
        return Err(format!(
            "replicas must be between 1 and the number of members ({members}), not {replicas}"
        ));
    }
    Ok(())
}

/// Checks `cluster set rebalance_moves N`: 1 <= N <= [`MAX_REBALANCE_MOVES`].
pub fn check_rebalance_moves(moves: u32) -> Result<(), String> {
    if moves == 0 || moves > MAX_REBALANCE_MOVES {
        return Err(format!(
            "rebalance_moves must be between 1 and {MAX_REBALANCE_MOVES}, not {moves}"
        ));
    }
    Ok(())
}

/// One step down towards `want` replicas: the first shard holding more,
/// and the replica to drop, the one on the most loaded node (ties: the
/// highest id) that does not lead it. None when no shard holds more than
/// `want` (or the only candidate leads, which it then hands over first).
pub fn shrink_step(
    placement: &BTreeMap<GroupId, Vec<NodeId>>,
    leaders: &BTreeMap<GroupId, NodeId>,
    want: usize,
) -> Option<(GroupId, Vec<NodeId>)> {
    let mut load: BTreeMap<NodeId, usize> = BTreeMap::new();
    for replicas in placement.values() {
        for n in replicas {
            *load.entry(*n).or_default() += 1;
        }
    }
    for (shard, replicas) in placement {
        if replicas.len() <= want.max(1) {
            continue;
        }
        let leader = leaders.get(shard).copied();
        let drop = replicas
            .iter()
            .copied()
            .filter(|n| Some(*n) != leader)
            .max_by_key(|n| (load.get(n).copied().unwrap_or(0), *n))?;
        let next = replicas.iter().copied().filter(|n| *n != drop).collect();
        return Some((*shard, next));
    }
    None
}

/// One step up towards `want` replicas: the first shard holding fewer,
/// with the member holding the fewest replicas (ties: lowest id) that it
/// lacks added. None when every shard holds `want` (or no member can
/// take one).
pub fn grow_step(
    placement: &BTreeMap<GroupId, Vec<NodeId>>,
    members: &BTreeSet<NodeId>,
    want: usize,
) -> Option<(GroupId, Vec<NodeId>)> {
    let mut load: BTreeMap<NodeId, usize> = members.iter().map(|n| (*n, 0)).collect();
    for replicas in placement.values() {
        for n in replicas {
            if let Some(l) = load.get_mut(n) {
                *l += 1;
            }
        }
    }
    for (shard, replicas) in placement {
        if replicas.len() >= want {
            continue;
        }
        let Some((&to, _)) = load
            .iter()
            .filter(|(n, _)| !replicas.contains(n))
            .min_by_key(|(n, l)| (**l, **n))
        else {
            continue;
        };
        let mut next = replicas.clone();
        next.push(to);
        return Some((*shard, next));
    }
    None
}

/// The node a new shard starts on: the member holding the fewest replicas
/// (ties: lowest id), not `dead`.
pub fn first_home(
    placement: &BTreeMap<GroupId, Vec<NodeId>>,
    members: &BTreeSet<NodeId>,
    dead: &BTreeSet<NodeId>,
) -> Option<NodeId> {
    let mut load: BTreeMap<NodeId, usize> = members.iter().filter(|n| !dead.contains(n)).map(|n| (*n, 0)).collect();
    for replicas in placement.values() {
        for n in replicas {
            if let Some(l) = load.get_mut(n) {
                *l += 1;
            }
        }
    }
    load.into_iter().min_by_key(|(n, l)| (*l, *n)).map(|(n, _)| n)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn rec(state: ShardState) -> ShardRecord {
        ShardRecord { state, since: 100 }
    }

    #[test]
    fn added_shards_continue_after_the_highest_id_ever_used() {
        let records = BTreeMap::from([(9, rec(ShardState::Retired))]);
        assert_eq!(next_shard_ids([1, 2, 3], &BTreeMap::new(), 2).unwrap(), [4, 5]);
        assert_eq!(
            next_shard_ids([1, 2, 3], &records, 1).unwrap(),
            [10],
            "a retired id is not reused"
        );
        assert!(next_shard_ids([1], &records, 0).is_err());
        assert!(next_shard_ids([1], &records, MAX_ADD + 1).is_err());
        assert!(next_shard_ids([MAX_SHARD - 1], &BTreeMap::new(), 2).is_err());
        assert_eq!(
            next_shard_ids([MAX_SHARD - 1], &BTreeMap::new(), 1).unwrap(),
            [MAX_SHARD]
        );
    }

    #[test]
    fn state_keys_round_trip_in_id_order() {
        assert_eq!(parse_state_key(&state_key(17)), Some(17));
        assert!(state_key(9) < state_key(10));
        assert_eq!(parse_state_key("state/x"), None);
        assert_eq!(parse_state_key("replicas"), None);
    }

    #[test]
    fn retiring_needs_an_active_shard_that_stays() {
        let placement: BTreeMap<GroupId, Vec<NodeId>> = (1..=3).map(|s| (s, vec![1])).collect();
        let mut records = BTreeMap::new();
        assert!(check_retire(&placement, &records, 2).is_ok());
        assert!(check_retire(&placement, &records, 7).is_err(), "no such shard");
        records.insert(2, rec(ShardState::Retiring));
        assert!(!routable(&records, 2));
        assert!(routable(&records, 1));
        assert!(check_retire(&placement, &records, 2)
            .unwrap_err()
            .contains("retiring already"));
        records.insert(3, rec(ShardState::Adding));
        let e = check_retire(&placement, &records, 1).unwrap_err();
        assert!(e.contains("last active shard"), "{e}");
    }

    #[test]
    fn replicas_must_fit_the_members() {
        assert!(check_replicas(0, 3).is_err());
        assert!(check_replicas(4, 3).is_err());
        assert!(check_replicas(1, 3).is_ok());
        assert!(check_replicas(3, 3).is_ok());
    }

    #[test]
    fn shrinking_drops_one_replica_of_one_shard_never_the_leader() {
        let mut placement: BTreeMap<GroupId, Vec<NodeId>> = (1..=4).map(|s| (s, vec![1, 2, 3])).collect();
        let leaders: BTreeMap<GroupId, NodeId> = BTreeMap::from([(1, 3), (2, 2), (3, 1), (4, 3)]);
        let mut steps = 0;
        while let Some((shard, next)) = shrink_step(&placement, &leaders, 2) {
            assert_eq!(next.len(), 2);
            assert!(next.contains(&leaders[&shard]), "the leader stays");
            placement.insert(shard, next);
            steps += 1;
            assert!(steps <= 4);
        }
        assert_eq!(steps, 4);
        let mut load: BTreeMap<NodeId, usize> = BTreeMap::new();
        for r in placement.values() {
            for n in r {
                *load.entry(*n).or_default() += 1;
            }
        }
        let (min, max) = (load.values().min().unwrap(), load.values().max().unwrap());
        assert!(max - min <= 1, "spread: {load:?}");
        assert_eq!(shrink_step(&placement, &leaders, 2), None);
        // Down to one: the leader is the replica that stays.
        let (shard, next) = shrink_step(&placement, &leaders, 1).unwrap();
        assert_eq!(next, [leaders[&shard]]);
    }

    #[test]
    fn growing_adds_one_replica_of_one_shard_on_the_least_loaded_member() {
        let mut placement: BTreeMap<GroupId, Vec<NodeId>> =
            BTreeMap::from([(1, vec![1, 2]), (2, vec![2, 3]), (3, vec![1, 3])]);
        let members: BTreeSet<NodeId> = [1, 2, 3].into();
        assert_eq!(grow_step(&placement, &members, 3), Some((1, vec![1, 2, 3])));
        let mut steps = 0;
        while let Some((shard, next)) = grow_step(&placement, &members, 3) {
            placement.insert(shard, next);
            steps += 1;
            assert!(steps <= 3);
        }
        assert_eq!(steps, 3);
        assert!(placement.values().all(|r| r.len() == 3));
        // More wanted than members: nothing to add once every member holds it.
        assert_eq!(grow_step(&placement, &members, 4), None);
    }

    #[test]
    fn a_new_shard_starts_on_the_least_loaded_live_member() {
        let placement: BTreeMap<GroupId, Vec<NodeId>> = BTreeMap::from([(1, vec![1, 2]), (2, vec![1, 3])]);
        let members: BTreeSet<NodeId> = [1, 2, 3, 4].into();
        assert_eq!(first_home(&placement, &members, &BTreeSet::new()), Some(4));
        assert_eq!(first_home(&placement, &members, &[4].into()), Some(2));
        assert_eq!(first_home(&placement, &BTreeSet::new(), &BTreeSet::new()), None);
    }

    #[test]
    fn a_repeated_shard_add_returns_the_first_calls_shards() {
        assert!(check_request_id("ternctl-0f3a_9").is_ok());
        for bad in ["", "a/b", "a b", "é", &"x".repeat(MAX_REQUEST_ID + 1)] {
            assert!(check_request_id(bad).is_err(), "{bad:?}");
        }
        assert_eq!(repeated_add(None, 2), Ok(None));
        assert_eq!(repeated_add(Some(vec![9, 10]), 2), Ok(Some(vec![9, 10])));
        let e = repeated_add(Some(vec![9, 10]), 3).unwrap_err();
        assert!(e.contains("already added 2 shards"), "{e}");
        assert_eq!(request_key("abc"), "request/abc");
        assert_eq!(parse_state_key(&request_key("abc")), None, "not a shard state record");
    }
}
