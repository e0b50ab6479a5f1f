//! Who may make peer RPCs (Raft and `PeerService`).
//!
//! With cluster TLS a caller must present a node certificate
//! (`tern://node/<id>`, verified against the cluster CA by the TLS layer)
//! whose id is a member in this node's replica of the control group, and,
//! where the request claims a node id (the Raft leader of an
//! AppendEntries or InstallSnapshot, the candidate of a Vote), the same
//! id. Refusals are `permission_denied`, except a node this node does not
//! know yet, which is `unavailable`: control replicas lag, so a node just
//! added may call before its record is applied here, and the caller
//! retries. A node whose control replica holds no member at all has not
//! joined yet (it is being added) and admits any node certificate: it must
//! hear from the control leader to learn the members.
//!
//! Without cluster TLS (loopback, or `[cluster] insecure = true`) there is
//! no identity to check and every call is admitted.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tonic::Status;

use super::groups::Groups;
use super::{GroupId, NodeId, CONTROL_GROUP};
use tern_pki::{peer_identity, CertIdentity};

/// The `reason` label of [`PeerRefusals`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerReasonLabel {
    reason: &'static str,
}

/// Peer RPCs refused (`tern_peer_refused_total{reason}`, registered by the
/// node's metrics): a caller without a node certificate, with an
/// operator's, of a node that is not a member, claiming another node's id,
/// or asking for a group not placed here.
#[derive(Clone, Debug, Default)]
pub struct PeerRefusals(pub Family<PeerReasonLabel, Counter>);

impl PeerRefusals {
    pub fn inc(&self, reason: &'static str) {
        self.0.get_or_create(&PeerReasonLabel { reason }).inc();
    }

    /// How many were refused for `reason` (tests).
    pub fn get(&self, reason: &'static str) -> u64 {
        self.0.get_or_create(&PeerReasonLabel { reason }).get()
    }
}

/// What the gate and the Raft service read in the control group's replica
/// (`control`: its state machine's tree). The keys are the control group's
/// schema, which the node owns; it implements this over them.
pub trait PeerDirectory: Send + Sync + 'static {
    /// What the replica says of node `id`.
    fn membership(&self, control: &sled::Tree, id: NodeId) -> Membership;
    /// The nodes the placement of `group` names (empty: none or unreadable).
    fn placement(&self, control: &sled::Tree, group: GroupId) -> Vec<NodeId>;
}

/// At most one warning per this interval (the rest are logged at debug).
const WARN_EVERY: Duration = Duration::from_secs(1);

pub struct PeerGate {
    /// Cluster TLS is on: callers have certificates to check.
    tls: bool,
    groups: Arc<Groups>,
    directory: Arc<dyn PeerDirectory>,
    pub refused: PeerRefusals,
    last_warning: Mutex<Option<Instant>>,
}

impl PeerGate {
    pub fn new(tls: bool, groups: Arc<Groups>, directory: Arc<dyn PeerDirectory>, refused: PeerRefusals) -> PeerGate {
        PeerGate {
            tls,
            groups,
            directory,
            refused,
            last_warning: Mutex::new(None),
        }
    }

    /// Admits the caller of `rpc`, returning its node id (None without
    /// TLS). `claimed`: the node id the request speaks for, if any.
    pub fn admit<T>(
        &self,
        request: &tonic::Request<T>,
        rpc: &str,
        claimed: Option<NodeId>,
    ) -> Result<Option<NodeId>, Status> {
        if !self.tls {
            return Ok(None);
        }
        let id = match peer_identity(request) {
            Ok(Some(CertIdentity::Node(id))) => id,
            Ok(Some(client @ CertIdentity::Client { .. })) => {
                return Err(self.refuse(
                    "operator_certificate",
                    Status::permission_denied(format!(
                        "{rpc}: {client} is an operator certificate; peer RPCs take a node certificate"
                    )),
                ))
            }
            Ok(None) => {
                return Err(self.refuse(
                    "no_certificate",
                    Status::permission_denied(format!("{rpc}: peer RPCs need a node certificate (tern://node/<id>)")),
                ))
            }
            Err(e) => {
                return Err(self.refuse(
                    "bad_certificate",
                    Status::permission_denied(format!("{rpc}: certificate names no node: {e}")),
                ))
            }
        };
        if let Some(claimed) = claimed {
            self.check_claim(rpc, Some(id), claimed)?;
        }
        match self.membership(id) {
            Membership::Member | Membership::NotJoined => Ok(Some(id)),
            Membership::Removed => Err(self.refuse(
                "removed_node",
                Status::permission_denied(format!("{rpc}: node {id} was removed from this cluster")),
            )),
            Membership::Unknown => Err(self.refuse(
                "unknown_node",
                Status::unavailable(format!(
                    "{rpc}: node {id} (from its certificate) is not a member as far as this node knows; \
                     retry if it is being added"
                )),
            )),
        }
    }

    /// The node id a request claims (read from its payload, after
    /// [`PeerGate::admit`] let the caller in) must be the certificate's.
    pub fn check_claim(&self, rpc: &str, certified: Option<NodeId>, claimed: NodeId) -> Result<(), Status> {
        match certified {
            Some(id) if id != claimed => Err(self.refuse(
                "forged_id",
                Status::permission_denied(format!(
                    "{rpc}: the certificate names node {id} but the request claims node {claimed}"
                )),
            )),
            _ => Ok(()),
        }
    }

    fn membership(&self, id: NodeId) -> Membership {
        let Some(control) = self.groups.get(CONTROL_GROUP) else {
            return Membership::NotJoined;
        };
        self.directory.membership(&control.sm.tree(), id)
    }

    /// The nodes the control replica `control` places `group` on.
    pub fn placement(&self, control: &sled::Tree, group: GroupId) -> Vec<NodeId> {
        self.directory.placement(control, group)
    }

    pub fn refuse(&self, reason: &'static str, status: Status) -> Status {
        self.refused.inc(reason);
        let now = Instant::now();
        let mut last = self.last_warning.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|t| now.duration_since(t) >= WARN_EVERY) {
            *last = Some(now);
            tracing::warn!(reason, error = %status.message(), "peer RPC refused");
        } else {
            tracing::debug!(reason, error = %status.message(), "peer RPC refused");
        }
        status
    }
}

/// A node as this node's control replica knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Membership {
    Member,
    Removed,
    /// Not in this node's control replica (maybe not applied yet).
    Unknown,
    /// This node knows no members at all: it is being added.
    NotJoined,
}
