//! The sending API's cluster state (control group) and the durable event
//! outbox (every group): API keys, stored templates, batches with their
//! idempotency keys, and the events a group's apply produces for webhooks.
//!
//! Plain data: the node's `api` module serves it over HTTP, `cluster/control.rs`
//! stores it, `outbox` posts the events.

use serde::{Deserialize, Serialize};

use crate::GroupId;

/// Most queue ids one batch record (one API call) may hold.
pub const MAX_BATCH_MESSAGES: usize = 10_000;

/// What an API key may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Scope {
    /// `POST /api/v1/messages[/raw]`, `GET`/`DELETE` of its own messages and batches.
    Send,
    /// `GET /api/v1/templates/...`.
    TemplatesRead,
    /// `PUT`/`DELETE /api/v1/templates/...`.
    TemplatesWrite,
}

impl Scope {
    pub const ALL: [Scope; 3] = [Scope::Send, Scope::TemplatesRead, Scope::TemplatesWrite];

    /// The name `ternctl apikey create --scope` takes and lists show.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Send => "send",
            Scope::TemplatesRead => "templates:read",
            Scope::TemplatesWrite => "templates:write",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

/// An API key as the control group keeps it: never the secret, only its
/// SHA-256 (keys are 256-bit random, so a fast hash is enough; a slow
/// password hash would cost every request).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey {
    /// Public part of the key (`tern_<id>_<secret>`), the lookup key.
    pub id: String,
    /// Operator's name for it (`--name`), unique among live keys.
    pub name: String,
    /// SHA-256 of the whole key string.
    #[serde(with = "serde_bytes")]
    pub hash: Vec<u8>,
    pub scopes: Vec<Scope>,
    /// The tenant its messages, templates, batches and events belong to
    /// (`""`: the default tenant).
    pub tenant: String,
    /// Messages per second this key may inject (0: no limit of its own).
    pub rate: u32,
    /// Unix seconds.
    pub created: i64,
    /// Unix seconds when revoked (a revoked key is kept for the listing).
    pub revoked: Option<i64>,
}

/// A stored template (`PUT /api/v1/templates/NAME`): minijinja sources.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredTemplate {
    pub subject: String,
    pub text: Option<String>,
    pub html: Option<String>,
    /// Unix seconds of the last change.
    pub updated: i64,
}

/// One API call's messages, kept so that the batch can be cancelled and an
/// idempotent retry answered with the same ids.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    /// `b_` and 26 lowercase base32 characters. Every message of the batch
    /// carries it as its envelope's `envid` (so bounces name it too), and
    /// `auth_user` = `apikey:<key name>`.
    pub id: String,
    pub tenant: String,
    /// The key that sent it (its id).
    pub key_id: String,
    /// The client's `Idempotency-Key`, if any (unique per tenant).
    pub idempotency_key: Option<String>,
    /// SHA-256 of the request body: a retry with the same key and another
    /// body is refused (422) rather than answered with the first ids.
    #[serde(with = "serde_bytes")]
    pub request_hash: Vec<u8>,
    /// Queue ids and the shard each is written to, in request order. The
    /// record is written before the messages: an idempotent retry writes
    /// them again by id, which the shards ignore for ids they hold or have
    /// finished (`f/<id>`).
    pub messages: Vec<(String, GroupId)>,
    /// Tags and metadata of the request, echoed in its webhook events.
    pub tags: Vec<String>,
    pub metadata: std::collections::BTreeMap<String, String>,
    /// The campaign id of the request, if any.
    pub campaign: Option<String>,
    /// Unix seconds.
    pub created: i64,
    /// Unix seconds of `send_at`, if scheduled.
    pub send_at: Option<i64>,
}

/// What happened, as a durable event (docs/events.md, "Webhook events").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    Received,
    Queued,
    Delivered,
    Deferred,
    Bounced,
    Expired,
    Suppressed,
    Cancelled,
    Complaint,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Received => "received",
            EventKind::Queued => "queued",
            EventKind::Delivered => "delivered",
            EventKind::Deferred => "deferred",
            EventKind::Bounced => "bounced",
            EventKind::Expired => "expired",
            EventKind::Suppressed => "suppressed",
            EventKind::Cancelled => "cancelled",
            EventKind::Complaint => "complaint",
        }
    }
}

/// One event in a group's outbox, written by that group's apply on every
/// replica (so a new leader posts what the old one had not), under key
/// `o/<log index:016x>/<n:04x>`. Its id is `<group>-<log index>-<n>`:
/// the same on every replica and every retry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEvent {
    pub kind: EventKind,
    /// Queue id.
    pub msg_id: String,
    /// The recipient, for per-recipient events.
    pub rcpt: Option<String>,
    /// Reverse-path.
    pub from: String,
    /// The remote reply or the reason.
    pub reply: String,
    /// Delivery attempts so far.
    pub attempts: u32,
    /// The API batch the message belongs to, if sent by the API.
    pub batch: Option<String>,
    /// Unix milliseconds as applied on the replica that wrote it.
    pub at: i64,
}

/// Outbox key of event `n` of the entry at `index`.
pub fn outbox_key(index: u64, n: u32) -> Vec<u8> {
    format!("o/{index:016x}/{n:04x}").into_bytes()
}

/// Stable event id of event `n` of the entry at `index` of `group`.
pub fn event_id(group: GroupId, index: u64, n: u32) -> String {
    format!("evt_{group}_{index}_{n}")
}

/// What became of an API message once it left the queue, kept under
/// `f/<queue id>` in its shard for `GET /api/v1/messages/ID` until purged
/// (`[api] status_retention`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalStatus {
    /// Per recipient, in envelope order: address, state
    /// (`delivered`, `failed`, `cancelled`), last reply.
    pub rcpts: Vec<(String, String, String)>,
    pub batch: Option<String>,
    /// Delivery attempts made.
    pub attempts: u32,
    /// Unix seconds when it became final.
    pub at: i64,
}

/// Key of a message's final-status record in its shard's tree.
pub fn final_key(id: &str) -> Vec<u8> {
    format!("f/{id}").into_bytes()
}
