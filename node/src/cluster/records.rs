//! What the cluster reads from this node's replica of the control group:
//! members (node id -> gRPC address), removed and drained nodes, and shard
//! placement (shard -> desired replicas), shard states and the replica
//! count. Read-only; the control group's
//! apply rules write these keys.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::control::{ControlState, DRAIN_PREFIX, NODE_PREFIX, PLACEMENT_PREFIX, REMOVED_PREFIX};
use super::shards::{self, ShardRecord};
use crate::raft::groups::Groups;
use crate::raft::{GroupId, NodeId, CONTROL_GROUP};

/// Node id -> gRPC address, from this node's replica of the control group.
pub fn nodes(groups: &Groups) -> BTreeMap<NodeId, String> {
    let mut out = BTreeMap::new();
    if let Some(control) = groups.get(CONTROL_GROUP) {
        for (k, v) in control.sm.tree().scan_prefix(NODE_PREFIX).flatten() {
            if let Ok(id) = <[u8; 8]>::try_from(&k[NODE_PREFIX.len()..]) {
                out.insert(u64::from_be_bytes(id), String::from_utf8_lossy(&v).into_owned());
            }
        }
    }
    out
}

/// Ids of removed nodes (never to be reused).
pub fn removed(groups: &Groups) -> BTreeSet<NodeId> {
    node_set(groups, REMOVED_PREFIX)
}

/// Nodes marked drained (they lead no shard).
pub fn drained(groups: &Groups) -> BTreeSet<NodeId> {
    node_set(groups, DRAIN_PREFIX)
}

/// Node ids recorded in the control state under `prefix` (big-endian keys).
fn node_set(groups: &Groups, prefix: &[u8]) -> BTreeSet<NodeId> {
    let mut out = BTreeSet::new();
    if let Some(control) = groups.get(CONTROL_GROUP) {
        for (k, _) in control.sm.tree().scan_prefix(prefix).flatten() {
            if let Ok(id) = <[u8; 8]>::try_from(&k[prefix.len()..]) {
                out.insert(u64::from_be_bytes(id));
            }
        }
    }
    out
}

/// Shard -> desired replicas (a retired shard's empty placement left out).
pub fn placement(groups: &Groups) -> BTreeMap<GroupId, Vec<NodeId>> {
    let mut out = BTreeMap::new();
    if let Some(control) = groups.get(CONTROL_GROUP) {
        for (k, v) in control.sm.tree().scan_prefix(PLACEMENT_PREFIX).flatten() {
            if let (Ok(id), Ok(replicas)) = (
                <[u8; 8]>::try_from(&k[PLACEMENT_PREFIX.len()..]),
                bincode::deserialize::<Vec<NodeId>>(&v),
            ) {
                if !replicas.is_empty() {
                    out.insert(u64::from_be_bytes(id), replicas);
                }
            }
        }
    }
    out
}

/// The placed shards new mail may go to (not being added, retiring or
/// retired), in id order.
pub fn routable_placement(groups: &Groups) -> Vec<(GroupId, Vec<NodeId>)> {
    let records = shard_records(groups);
    placement(groups)
        .into_iter()
        .filter(|(shard, _)| shards::routable(&records, *shard))
        .collect()
}

/// Every shard id ever placed (retired ones too): new ids go after them.
pub fn placed_ids(groups: &Groups) -> Vec<GroupId> {
    let mut out = Vec::new();
    if let Some(control) = groups.get(CONTROL_GROUP) {
        for (k, _) in control.sm.tree().scan_prefix(PLACEMENT_PREFIX).flatten() {
            if let Ok(id) = <[u8; 8]>::try_from(&k[PLACEMENT_PREFIX.len()..]) {
                out.push(u64::from_be_bytes(id));
            }
        }
    }
    out
}

/// Shards added, retiring or retired (see [`super::shards`]); a shard not
/// listed is active.
pub fn shard_records(groups: &Groups) -> BTreeMap<GroupId, ShardRecord> {
    let Some(control) = groups.get(CONTROL_GROUP) else {
        return BTreeMap::new();
    };
    let state = ControlState::new(control.sm.tree());
    state
        .shared_scan(shards::SPACE, shards::STATE_PREFIX, shards::MAX_SHARD as usize * 2)
        .into_iter()
        .filter_map(|(k, v)| Some((shards::parse_state_key(&k)?, bincode::deserialize(&v).ok()?)))
        .collect()
}

/// [`shard_records`] read again only when the control replica has applied
/// a new entry: new mail asks for them per message, and they change only
/// with `ternctl shard add|retire`.
#[derive(Default)]
pub struct ShardRecordsCache {
    cached: std::sync::Mutex<Option<(Option<crate::raft::LogId>, SharedRecords)>>,
}

type SharedRecords = Arc<BTreeMap<GroupId, ShardRecord>>;

impl ShardRecordsCache {
    pub fn get(&self, groups: &Groups) -> Arc<BTreeMap<GroupId, ShardRecord>> {
        let Some(control) = groups.get(CONTROL_GROUP) else {
            return Arc::default();
        };
        // Read before the records: what is read is at least this new.
        let applied = control.raft.metrics().borrow().last_applied;
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, records)) = cached.as_ref() {
            if *at == applied {
                return Arc::clone(records);
            }
        }
        let records = Arc::new(shard_records(groups));
        *cached = Some((applied, Arc::clone(&records)));
        records
    }
}

/// A cluster setting of `ternctl cluster set` (a `u32` under `key`), if set.
fn cluster_setting(groups: &Groups, key: &str) -> Option<u32> {
    let control = groups.get(CONTROL_GROUP)?;
    let v = ControlState::new(control.sm.tree()).shared(shards::SPACE, key)?;
    bincode::deserialize(&v).ok()
}

/// The cluster's replica count (`ternctl cluster set replicas`), if set.
pub fn cluster_replicas(groups: &Groups) -> Option<u32> {
    cluster_setting(groups, shards::REPLICAS_KEY)
}

/// Shards the rebalancer moves at once (`ternctl cluster set rebalance_moves`), if set.
pub fn cluster_rebalance_moves(groups: &Groups) -> Option<u32> {
    cluster_setting(groups, shards::REBALANCE_MOVES_KEY)
}

/// Whether new mail may go to `shard` (not being added, retiring or retired).
pub fn routable(groups: &Groups, shard: GroupId) -> bool {
    let Some(control) = groups.get(CONTROL_GROUP) else {
        return true;
    };
    ControlState::new(control.sm.tree())
        .shared(shards::SPACE, &shards::state_key(shard))
        .is_none()
}

/// The queue shards `node` leads, of all queue shards (placement from the
/// control group, or the groups hosted here before it is known).
pub fn share(groups: &Groups, node: NodeId) -> super::Share {
    let placed = placement(groups);
    let hosted = groups.shards();
    let led = hosted.iter().filter(|h| h.leader() == Some(node)).count();
    let shards = placed.len().max(hosted.len());
    super::Share { led, shards }
}
