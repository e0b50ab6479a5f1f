//! Deliverability state the control group holds for the whole cluster:
//! automatic shaping actions (decided by `[[backoff]]` rules from remote
//! replies) and the suppression list. Every node reads them from its
//! replica of the control group, so a limit or a suppression applies on
//! every node, survives restarts, and expires on its own (readers ignore
//! what has expired).

use serde::{Deserialize, Serialize};

use crate::NodeId;

/// What an automatic action does to the mail of its scope.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionKind {
    /// No delivery attempt to the scope until the action expires.
    Suspend,
    /// At most `count` messages per `per_secs` seconds to the scope (the
    /// whole cluster) until the action expires.
    Throttle { count: u64, per_secs: u64 },
    /// What is queued for the scope fails (bounces) instead of being tried.
    Bounce,
}

/// An automatic shaping action in force for one scope (a shaping key such
/// as `mx:.google.com`, optionally prefixed by an egress source).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutoAction {
    pub kind: ActionKind,
    /// Unix seconds when it was decided.
    pub since: i64,
    /// Unix seconds when it expires.
    pub until: i64,
    /// The rule that fired (its name, or `backoff[N]`).
    pub rule: String,
    /// Why: the remote reply that triggered it.
    pub reason: String,
    /// The node that saw the reply.
    pub node: NodeId,
}

impl AutoAction {
    /// Still in force at `now` (unix seconds).
    pub fn in_force(&self, now: i64) -> bool {
        self.until > now
    }
}

/// A recipient no mail is attempted to. `scope` is `""` for the global
/// list, else a sender domain (a tenant's own list).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suppression {
    pub scope: String,
    /// The recipient address, lowercased.
    pub address: String,
    /// Why (a bounce class such as `invalid_recipient`, `complaint`, `manual`).
    pub class: String,
    /// Free text: the reply, the complaint's source, the operator's reason.
    pub reason: String,
    /// Unix seconds when it was added.
    pub added: i64,
    /// Unix seconds when it lapses; 0: never.
    pub expires: i64,
}

impl Suppression {
    /// In force at `now` (unix seconds).
    pub fn in_force(&self, now: i64) -> bool {
        self.expires == 0 || self.expires > now
    }
}

/// Names one suppression entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SuppressionKey {
    pub scope: String,
    pub address: String,
}

/// Entries one suppression request may carry (imports are written in
/// batches of this size).
pub const MAX_SUPPRESSIONS_PER_WRITE: usize = 5_000;
