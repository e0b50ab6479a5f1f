//! Raft wiring: openraft type configuration, the requests every group
//! replicates, the sled log store, the state machines, the gRPC network and
//! the router that maps a group id to its local `Raft`.
//!
//! Group 0 is the control group (membership, shard placement); groups
//! 1..=S are queue shards.

// openraft's StorageError is what its storage traits return; boxing it here
// would only add conversions.
#![allow(clippy::result_large_err)]

pub mod gate;
pub mod groups;
pub mod host;
pub mod log_store;
pub mod network;
pub mod service;
pub mod snapshot;
pub mod state_machine;
#[cfg(test)]
mod storage_suite;
pub mod tls;

use serde::{Deserialize, Serialize};

use crate::queue::message::MessageRecord;
use crate::storage::wal::BodyLoc;

pub type NodeId = u64;
pub type GroupId = u64;
/// The control group's id; shard groups are 1..=shards.
pub const CONTROL_GROUP: GroupId = 0;

openraft::declare_raft_types!(
    /// Tern's Raft type configuration, shared by every group.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = snapshot::SnapshotFile,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type StorageError = openraft::StorageError<NodeId>;

/// A message body as carried in a Raft entry.
///
/// On the wire (and in memory) it holds the bytes. The log store writes the
/// bytes once into the write-ahead log and keeps only `loc` in the entry
/// ("sideloading"); the state machine then reuses that location instead of
/// writing the body a second time.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Body {
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
    pub loc: Option<BodyLoc>,
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Body({} bytes, loc={:?})", self.bytes.len(), self.loc)
    }
}

/// What a group replicates. Queue shards take `Enqueue`; the control group
/// takes the membership and placement records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// A newly accepted message; 250 is sent once this is applied.
    Enqueue { record: Box<MessageRecord>, body: Body },
    /// Control group: a node and the gRPC address peers reach it at.
    SetNode { id: NodeId, addr: String },
    /// Control group: the replica set of a shard.
    SetShardReplicas { shard: GroupId, replicas: Vec<NodeId> },
    /// Control group: a node leaves the cluster (its replicas are moved).
    RemoveNode { id: NodeId },
    /// Control group: a drained node leads no shard (maintenance).
    SetDrain { id: NodeId, drained: bool },
    /// An operator's action on queued messages of this shard.
    QueueOp { action: QueueAction, ids: Vec<String> },
    /// Control group: deliveries to `domain` wait until `until` (unix
    /// seconds; 0 resumes them).
    SuspendDomain { domain: String, until: i64, reason: String },
    /// Results of delivery attempts, batched so that many outcomes cost one
    /// Raft write, with the bounces they cause (written atomically with them).
    Outcomes {
        updates: Vec<OutcomeUpdate>,
        bounces: Vec<NewMessage>,
    },
    /// Several newly accepted messages in one entry: concurrent sessions
    /// writing to the same shard share one log append (one fsync), one
    /// AppendEntries and one apply.
    EnqueueMany { messages: Vec<NewMessage> },
    /// The administrator's bounce, decided on the shard leader: each update
    /// with the report it causes (`reports[i]` belongs to `updates[i]`).
    /// Applying it skips recipients already final and stages a report only
    /// when its update changed one, so a bounce that lost a race with a
    /// delivery sends nothing. (Last variant: the encoding of the others in
    /// existing logs is unchanged.)
    Bounce {
        updates: Vec<OutcomeUpdate>,
        reports: Vec<Option<NewMessage>>,
    },
}

/// What `ternctl queue hold|release|delete|retry` does to a message.
/// (`bounce` is written as an outcome with its report.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum QueueAction {
    /// Keep it queued but never deliver it until released.
    Hold,
    /// Undo a hold; due at once.
    Release,
    /// Remove it without delivery or report.
    Delete,
    /// Due at once, whatever its retry schedule said.
    Retry,
}

/// A message created by the queue itself (a DSN), carried with its body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewMessage {
    pub record: Box<MessageRecord>,
    pub body: Body,
}

/// The new state of one message after an attempt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutcomeUpdate {
    pub id: String,
    /// Recipients whose state changed, by index into the envelope.
    pub results: Vec<RcptResult>,
    /// Attempts made so far (absolute, so a replayed update is harmless).
    pub attempts: u32,
    /// Unix seconds of the next attempt for what is still pending.
    pub next_attempt: i64,
    pub delay_notified: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RcptResult {
    pub index: u32,
    pub status: crate::queue::message::RcptStatus,
    pub reply: String,
}

impl Request {
    /// Every message body this request carries (sideloaded by the log store).
    pub fn bodies_mut(&mut self) -> Vec<&mut Body> {
        match self {
            Request::Enqueue { body, .. } => vec![body],
            Request::Outcomes { bounces, .. } => bounces.iter_mut().map(|b| &mut b.body).collect(),
            Request::EnqueueMany { messages } => messages.iter_mut().map(|m| &mut m.body).collect(),
            Request::Bounce { reports, .. } => reports.iter_mut().flatten().map(|b| &mut b.body).collect(),
            Request::SetNode { .. }
            | Request::SetShardReplicas { .. }
            | Request::RemoveNode { .. }
            | Request::SetDrain { .. }
            | Request::QueueOp { .. }
            | Request::SuspendDomain { .. } => Vec::new(),
        }
    }
}

/// What applying a request returns to the proposer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// False when the request was a no-op (e.g. a duplicate enqueue).
    pub changed: bool,
}

/// Bytes of snapshot per InstallSnapshot RPC.
pub const SNAPSHOT_CHUNK_BYTES: u64 = 3 * 1024 * 1024;

/// Raft timing suited to many groups per node (ARCHITECTURE.md).
pub fn raft_config() -> anyhow::Result<std::sync::Arc<openraft::Config>> {
    let config = openraft::Config {
        cluster_name: "tern".into(),
        heartbeat_interval: 200,
        election_timeout_min: 1000,
        election_timeout_max: 2000,
        max_payload_entries: 256,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(20_000),
        max_in_snapshot_log_to_keep: 1_000,
        // Snapshots travel in chunks of this size (well under the gRPC
        // message limit, network::MAX_GRPC_MESSAGE).
        snapshot_max_chunk_size: SNAPSHOT_CHUNK_BYTES,
        // Per chunk, and the last chunk's RPC lasts the follower's whole
        // install (bodies written and synced in batches): at openraft's
        // 200 ms a large snapshot timed out and was rebuilt and resent. Not
        // longer: a hung RPC to a partitioned peer holds its catch-up.
        install_snapshot_timeout: 60_000,
        ..Default::default()
    };
    Ok(std::sync::Arc::new(config.validate()?))
}

/// Storage error helpers: every sled/io failure becomes an openraft StorageError.
pub(crate) fn io_err(
    subject: openraft::ErrorSubject<NodeId>,
    verb: openraft::ErrorVerb,
    e: impl std::fmt::Display,
) -> StorageError {
    openraft::StorageIOError::new(subject, verb, openraft::AnyError::error(e.to_string())).into()
}
