//! The cluster controller: node and placement records in the control group,
//! the placement controller (on the control-group leader), per-shard
//! membership reconciliation (on each shard leader), leader moves and
//! balancing, and node-to-node calls (forwarded writes, elections).
//!
//! Placement is declarative: the control group holds each shard's desired
//! replica set; every shard leader moves its group's membership towards it
//! with add_learner (blocking until caught up) then change_membership.
//!
//! # Layout
//! - [`control`]: the control group's rules (what its requests do) and its typed state.
//! - [`records`]: what the control group's replica here says (members, placement, drained, removed).
//! - [`placement`]: pure placement rules (control voters, the next replica move, drain targets), tested.
//! - [`reconcile`]: the controller loop (placement, rebalancing, shard membership changes).
//! - [`leader`]: stepping aside, hand-overs, operator leader moves, leader balancing.
//! - [`membership`]: adding and removing members.
//! - [`peers`]: channels and clients to other nodes, forwarded enqueues and operations
//!   (the only part the SMTP write path uses).
//! - [`status`]: member liveness (pings) and shard status gathered from every member.
//! - [`shards`]: shards added and retired online, the replica count: records and pure rules, tested.
//! - `sim` (tests only): a deterministic simulation of the control plane driven by [`placement`]'s decisions.
//! - [`recover`]: `ternd recover`, unsafe recovery after a majority is lost for good.
//! - [`writer`]: control-group writes from delivery and the queue, and this node's delivery share.
//!
//! The admin service calls into this module; nothing here names `admin`.

pub mod control;
pub mod error;
pub mod leader;
pub mod membership;
pub mod peers;
pub mod placement;
pub mod reconcile;
pub mod records;
pub mod recover;
pub mod shards;
#[cfg(test)]
mod sim;
pub mod status;
pub mod writer;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use error::ClusterError;
pub use leader::{step_aside_for, Move, STEP_ASIDE};
pub use membership::removed_id_error;
pub use peers::Peers;
pub use placement::{control_voters, drain_target, merge_shard_rows, rebalance_move, MAX_CONTROL_VOTERS};
pub use status::REACHABLE_WITHIN;
pub use writer::{ControlWriter, Share};

use crate::raft::groups::{GroupHandle, Groups};
use crate::raft::{GroupId, NodeId, CONTROL_GROUP};

/// The cluster controller of this node. Its state is grouped by job: one
/// mutex each for liveness (control leader), membership changes under way
/// (shard leader), and drained shards' hand-overs (control leader); the
/// channels to peers live in [`Peers`].
pub struct Cluster {
    pub node_id: NodeId,
    /// `[cluster] replicas`: desired replicas per shard (capped by the
    /// number of nodes) until `ternctl cluster set replicas` records one.
    pub replicas: usize,
    /// Opens and closes this node's groups (a shard added or retired online).
    host: std::sync::OnceLock<Arc<crate::raft::host::GroupHost>>,
    /// Serialises `shard add` on the control leader (ids come from a read).
    adding: tokio::sync::Mutex<()>,
    pub groups: Arc<Groups>,
    /// Channels and clients to other nodes; forwarded writes.
    pub peers: Arc<Peers>,
    /// `[cluster] dead_node_after_secs`: a node unreachable this long loses its replicas.
    dead_after: Duration,
    /// When members last answered the control leader's pings.
    liveness: Mutex<status::Liveness>,
    /// Shard membership changes under way here.
    reconciling: Mutex<reconcile::Reconciling>,
    /// The last replica each drained shard's leadership was handed to, and when.
    drain_tries: Mutex<leader::DrainTries>,
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
            peers: Arc::new(Peers::new(node_id, Arc::clone(&groups), tls, overrides)),
            dead_after,
            liveness: Mutex::new(status::Liveness::default()),
            reconciling: Mutex::new(reconcile::Reconciling::default()),
            drain_tries: Mutex::new(HashMap::new()),
            host: std::sync::OnceLock::new(),
            adding: tokio::sync::Mutex::new(()),
            node_id,
            replicas,
            groups,
        }
    }

    /// The group host, so that the controller can create a shard added
    /// online and close a retired one (set once, at start).
    pub fn set_host(&self, host: Arc<crate::raft::host::GroupHost>) {
        let _ = self.host.set(host);
    }

    /// Desired replicas per shard: the cluster's setting, else this node's
    /// `[cluster] replicas`.
    pub fn want_replicas(&self) -> usize {
        records::cluster_replicas(&self.groups).map_or(self.replicas, |r| r as usize)
    }

    /// Shards the rebalancer moves at once (`ternctl cluster set rebalance_moves`).
    pub fn rebalance_moves(&self) -> usize {
        records::cluster_rebalance_moves(&self.groups).unwrap_or(shards::DEFAULT_REBALANCE_MOVES) as usize
    }

    /// Shards added, retiring or retired (a shard not listed is active).
    pub fn shard_records(&self) -> BTreeMap<GroupId, shards::ShardRecord> {
        records::shard_records(&self.groups)
    }

    /// The forwarding side, for the SMTP write path.
    pub fn peers(&self) -> Arc<Peers> {
        Arc::clone(&self.peers)
    }

    pub fn control(&self) -> Option<GroupHandle> {
        self.groups.get(CONTROL_GROUP)
    }

    /// Node id -> gRPC address, from this node's replica of the control group.
    pub fn nodes(&self) -> BTreeMap<NodeId, String> {
        records::nodes(&self.groups)
    }

    /// Ids of removed nodes (never to be reused).
    pub fn removed(&self) -> BTreeSet<NodeId> {
        records::removed(&self.groups)
    }

    /// Nodes marked drained (they lead no shard).
    pub fn drained(&self) -> BTreeSet<NodeId> {
        records::drained(&self.groups)
    }

    /// Shard -> desired replicas.
    pub fn placement(&self) -> BTreeMap<GroupId, Vec<NodeId>> {
        records::placement(&self.groups)
    }

    /// A handle that writes to the control group from any part of the node.
    pub fn control_writer(&self) -> ControlWriter {
        ControlWriter::new(self.node_id, Arc::clone(&self.groups), Arc::clone(&self.peers))
    }
}
