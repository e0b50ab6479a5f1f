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
//!
//! The admin service calls into this module; nothing here names `admin`.

pub mod control;
pub mod leader;
pub mod membership;
pub mod peers;
pub mod placement;
pub mod reconcile;
pub mod records;
pub mod status;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use leader::{step_aside_for, STEP_ASIDE};
pub use membership::removed_id_error;
pub use peers::Peers;
pub use placement::{control_voters, drain_target, merge_shard_rows, rebalance_move, MAX_CONTROL_VOTERS};
pub use status::REACHABLE_WITHIN;

use crate::raft::groups::{GroupHandle, Groups};
use crate::raft::{GroupId, NodeId, CONTROL_GROUP};

/// Why a cluster operation did not happen. The messages are the ones
/// operators read (ternctl prints them); callers match on the kind.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    #[error("control group not hosted here")]
    ControlNotHosted,
    /// The controller runs without a control group replica.
    #[error("no control group")]
    NoControlGroup,
    #[error("group not hosted here")]
    GroupNotHosted,
    #[error("unknown node")]
    UnknownNode,
    #[error("no address for node {0}")]
    NoAddress(NodeId),
    #[error("no known leader")]
    NoLeader,
    #[error("no shard placement known")]
    NoPlacement,
    #[error("no replica reachable")]
    NoReplicaReachable,
    /// The request cannot be done as asked (the message says why).
    #[error("{0}")]
    Refused(String),
    /// Not done within its bound; may succeed when tried again.
    #[error("{0}")]
    NotYet(String),
    /// A Raft write or membership change failed.
    #[error("{0}")]
    Raft(String),
    /// A peer answered with an error, or could not be reached.
    #[error("{0}")]
    Peer(String),
    /// A forwarded enqueue failed at `addr`.
    #[error("forward to {addr}: {message}")]
    Forward { addr: String, message: String },
    /// An operator's write passed to a group leader failed.
    #[error("{op}: {message}")]
    Operation { op: &'static str, message: String },
}

impl ClusterError {
    pub(crate) fn raft(e: impl std::fmt::Display) -> ClusterError {
        ClusterError::Raft(e.to_string())
    }

    pub(crate) fn peer(status: tonic::Status) -> ClusterError {
        ClusterError::Peer(status.message().to_owned())
    }

    pub(crate) fn forward(addr: &str, status: &tonic::Status) -> ClusterError {
        ClusterError::Forward {
            addr: addr.to_owned(),
            message: status.message().to_owned(),
        }
    }
}

/// The cluster controller of this node. Its state is grouped by job: one
/// mutex each for liveness (control leader), membership changes under way
/// (shard leader), and drained shards' hand-overs (control leader); the
/// channels to peers live in [`Peers`].
pub struct Cluster {
    pub node_id: NodeId,
    /// Desired replicas per shard (capped by the number of nodes).
    pub replicas: usize,
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
            node_id,
            replicas,
            groups,
        }
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
        ControlWriter {
            node_id: self.node_id,
            groups: Arc::clone(&self.groups),
            peers: Arc::clone(&self.peers),
        }
    }
}

/// Writes control-group records (automatic shaping actions, suppressions)
/// from delivery and the queue: on this node when it leads the control
/// group, else through the leader as a peer [`tern_model::peer::Operation`].
#[derive(Clone)]
pub struct ControlWriter {
    node_id: NodeId,
    groups: Arc<Groups>,
    peers: Arc<Peers>,
}

impl ControlWriter {
    /// Writes `op` to the control group; `Ok` once committed (by the
    /// leader; this node's replica may apply it a moment later).
    pub async fn write(&self, op: tern_model::peer::Operation) -> Result<(), ClusterError> {
        let control = self.groups.get(CONTROL_GROUP).ok_or(ClusterError::ControlNotHosted)?;
        op.fits(CONTROL_GROUP).map_err(ClusterError::Refused)?;
        if control.leader() == Some(self.node_id) {
            let request = op
                .into_request()
                .ok_or_else(|| ClusterError::Refused("not a control-group record".into()))?;
            control.raft.client_write(request).await.map_err(ClusterError::raft)?;
            Ok(())
        } else {
            self.peers.operate(&control, &op).await.map(|_| ())
        }
    }

    /// Whether this node leads the control group now.
    pub fn leads_control(&self) -> bool {
        self.groups
            .get(CONTROL_GROUP)
            .is_some_and(|c| c.leader() == Some(self.node_id))
    }

    /// This node's share of the cluster's delivery: the shards it leads
    /// and the shards in all. Mail is spread over shards by message, so a
    /// node leading `led` of `shards` shards holds about `led / shards` of
    /// the queued mail for every destination; cluster-wide limits are
    /// divided in that proportion.
    pub fn share(&self) -> Share {
        records::share(&self.groups, self.node_id)
    }
}

/// This node's part of the cluster's delivery (see [`ControlWriter::share`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Share {
    /// Queue shards this node leads now.
    pub led: usize,
    /// Queue shards in the cluster (placed, or hosted here before placement is known).
    pub shards: usize,
}

impl Share {
    /// `led / shards`, 1 when nothing is known (a single node).
    pub fn fraction(self) -> f64 {
        if self.shards == 0 {
            1.0
        } else {
            self.led as f64 / self.shards as f64
        }
    }
}
