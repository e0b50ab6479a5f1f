//! The router from a group id to this node's `Raft` instance of it, and
//! the per-group handles other parts of the node need.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use super::state_machine::StateMachine;
use super::{GroupId, NodeId, Raft};

/// One group hosted on this node.
#[derive(Clone)]
pub struct GroupHandle {
    pub id: GroupId,
    pub raft: Raft,
    /// Read access to the group's state machine (for queries).
    pub sm: StateMachine,
    /// Deliveries in flight while this node leads, for a planned hand-over
    /// that must wait for their outcomes (queue shards; unused in group 0).
    pub handover: std::sync::Arc<crate::handover::HandOver>,
    /// Why this replica must not campaign now (see [`Hold`]).
    pub holds: Arc<std::sync::Mutex<u8>>,
    /// The group's log (shared with its Raft), to purge it once the group
    /// is closed for good.
    pub(crate) log: super::log_store::LogStore,
    /// Since when this node has led the group (None: it does not).
    pub(crate) leading_since: LeadingSince,
}

/// When this node last became a group's leader, if it leads it.
pub type LeadingSince = Arc<std::sync::Mutex<Option<tokio::time::Instant>>>;

/// A reason for a replica not to start elections. Several can hold at once
/// (a full disk during a planned hand-over); elections resume only when
/// none does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hold {
    /// The disk is full: this node must not lead (disk_guard).
    DiskFull = 1,
    /// A planned hand-over: leadership must not come straight back.
    StepAside = 2,
}

impl GroupHandle {
    /// Sets or clears one reason not to campaign; openraft's election timer
    /// runs only while no reason holds.
    pub fn hold_elections(&self, why: Hold, on: bool) {
        let mut holds = self.holds.lock().unwrap_or_else(|p| p.into_inner());
        if on {
            *holds |= why as u8;
        } else {
            *holds &= !(why as u8);
        }
        self.raft.runtime_config().elect(*holds == 0);
    }

    /// How long this node has led the group; None when it does not lead it.
    pub fn leading_for(&self) -> Option<std::time::Duration> {
        let since = *self.leading_since.lock().unwrap_or_else(|p| p.into_inner());
        since.map(|t| t.elapsed())
    }

    /// The leader this node currently knows of; none once the group has
    /// stopped on an error (its last metrics still name a leader, and mail
    /// routed to it would wait for ever).
    pub fn leader(&self) -> Option<NodeId> {
        let m = self.raft.metrics();
        let m = m.borrow();
        if m.running_state.is_err() {
            return None;
        }
        m.current_leader
    }

    /// Why the group stopped, if it did (a storage error: fatal for it).
    pub fn failure(&self) -> Option<String> {
        match &self.raft.metrics().borrow().running_state {
            Err(openraft::error::Fatal::Stopped) | Ok(()) => None,
            Err(e) => Some(e.to_string()),
        }
    }

    /// Whether `node` is one of the group's current voters.
    pub fn is_voter(&self, node: NodeId) -> bool {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == node)
    }

    /// More than one voter: a write costs a round trip to followers.
    pub fn replicated(&self) -> bool {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .nth(1)
            .is_some()
    }

    /// The group's current voters.
    pub fn voters(&self) -> std::collections::BTreeSet<NodeId> {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect()
    }
}

/// All groups hosted on this node.
#[derive(Default)]
pub struct Groups {
    map: RwLock<BTreeMap<GroupId, GroupHandle>>,
}

impl Groups {
    pub fn insert(&self, handle: GroupHandle) {
        self.map
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(handle.id, handle);
    }

    /// Takes a group out (it is being closed).
    pub fn remove(&self, id: GroupId) -> Option<GroupHandle> {
        self.map.write().unwrap_or_else(|p| p.into_inner()).remove(&id)
    }

    pub fn get(&self, id: GroupId) -> Option<GroupHandle> {
        self.map.read().unwrap_or_else(|p| p.into_inner()).get(&id).cloned()
    }

    /// Every hosted group, in id order.
    pub fn all(&self) -> Vec<GroupHandle> {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Hosted shard groups (every group but the control group).
    pub fn shards(&self) -> Vec<GroupHandle> {
        self.all()
            .into_iter()
            .filter(|g| g.id != super::CONTROL_GROUP)
            .collect()
    }
}

pub type SharedGroups = Arc<Groups>;

/// How far the log of `node` is known to match the leader's, from a metrics
/// snapshot (0 when unknown or not leader).
pub fn matched_index(m: &openraft::RaftMetrics<NodeId, openraft::BasicNode>, node: NodeId) -> u64 {
    m.replication
        .as_ref()
        .and_then(|r| r.get(&node).cloned().flatten())
        .map(|l| l.index)
        .unwrap_or(0)
}
