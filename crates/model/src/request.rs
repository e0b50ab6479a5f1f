//! What a Raft group replicates: the requests proposed to a group and what
//! applying one answers. The encoding (bincode of these enums) is the Raft
//! log's format: add variants only at the end.

use serde::{Deserialize, Serialize};

use crate::record::MessageRecord;
use crate::{BodyLoc, GroupId, NodeId};

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
    /// Control group: an automatic shaping action for a shaping scope
    /// (`None` lifts it before it expires).
    SetShapingAction {
        key: String,
        action: Option<crate::shaping::AutoAction>,
    },
    /// Control group: recipients added to the suppression list (an entry
    /// already there is replaced).
    Suppress { entries: Vec<crate::shaping::Suppression> },
    /// Control group: recipients removed from the suppression list.
    Unsuppress {
        entries: Vec<crate::shaping::SuppressionKey>,
    },
    /// Control group: an API key created or replaced (by id).
    PutApiKey { key: crate::api::ApiKey },
    /// Control group: an API key revoked at unix seconds `at`.
    RevokeApiKey { id: String, at: i64 },
    /// Control group: a stored template of a tenant (`None` deletes it).
    PutTemplate {
        tenant: String,
        name: String,
        template: Option<crate::api::StoredTemplate>,
    },
    /// Control group: an API call's batch record. With an idempotency key
    /// that another batch of the tenant already holds, nothing changes
    /// (`changed` false): the caller answers with that batch's ids.
    PutBatch { batch: Box<crate::api::Batch> },
    /// Any group, proposed by its leader: webhook `endpoint` has taken the
    /// group's outbox events up to key `upto` (inclusive); `dead` keys are
    /// moved to the endpoint's dead letters; outbox keys up to `trim`
    /// (inclusive, the lowest cursor of all endpoints) are removed.
    EventsAck {
        endpoint: String,
        upto: String,
        dead: Vec<String>,
        trim: String,
    },
    /// Queue shard, proposed by its leader: final-status records of API
    /// messages (`f/<queue id>`) with ids sorting before `before` are removed.
    PurgeFinal { before: String },
    /// Control group, proposed by its leader: batch records created before
    /// unix seconds `before` and their idempotency keys are removed.
    PurgeBatches { before: i64 },
    /// Control group: small cluster-shared records of a feature (`space`,
    /// e.g. `greylist`, `report`): each `(key, value)` inserted or replaced.
    PutShared {
        space: String,
        entries: Vec<(String, Vec<u8>)>,
    },
    /// Control group: shared records of `space` removed: each of `keys`, and
    /// every key starting with one of `prefixes`.
    DeleteShared {
        space: String,
        keys: Vec<String>,
        prefixes: Vec<String>,
    },
}

/// Most entries (keys plus prefixes) one `PutShared`/`DeleteShared` carries.
pub const MAX_SHARED_PER_WRITE: usize = 5_000;
/// Most bytes of values one `PutShared` carries.
pub const MAX_SHARED_BYTES_PER_WRITE: usize = 4 << 20;

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
    pub status: crate::record::RcptStatus,
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
            | Request::SuspendDomain { .. }
            | Request::SetShapingAction { .. }
            | Request::Suppress { .. }
            | Request::Unsuppress { .. }
            | Request::PutApiKey { .. }
            | Request::RevokeApiKey { .. }
            | Request::PutTemplate { .. }
            | Request::PutBatch { .. }
            | Request::EventsAck { .. }
            | Request::PurgeFinal { .. }
            | Request::PurgeBatches { .. }
            | Request::PutShared { .. }
            | Request::DeleteShared { .. } => Vec::new(),
        }
    }
}

/// What applying a request returns to the proposer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// False when the request was a no-op (e.g. a duplicate enqueue).
    pub changed: bool,
}
