//! Why a cluster operation did not happen.

use crate::raft::NodeId;

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
