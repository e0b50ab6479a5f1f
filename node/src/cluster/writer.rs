//! Writes to the control group from parts of the node other than the
//! controller (automatic shaping actions, suppressions), and this node's
//! share of the cluster's delivery.

use std::sync::Arc;

use super::error::ClusterError;
use super::peers::Peers;
use crate::raft::groups::Groups;
use crate::raft::{NodeId, CONTROL_GROUP};

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
    pub fn new(node_id: NodeId, groups: Arc<Groups>, peers: Arc<Peers>) -> ControlWriter {
        ControlWriter { node_id, groups, peers }
    }

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
        super::records::share(&self.groups, self.node_id)
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
