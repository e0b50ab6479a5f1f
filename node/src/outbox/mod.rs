//! Durable webhook events: every group's apply writes the events of what it
//! commits into the group's outbox (`produce`), the group's leader posts
//! them to each `[[webhook]]`, signed (`sign`), and acknowledges what an
//! endpoint took through Raft (`dispatch`), so that a new leader goes on
//! where the old one stopped. Delivery is at least once; event ids are
//! stable (`evt_<group>_<index>_<n>`); order holds within a group.
//!
//! Keys in a group's tree: `o/<index:016x>/<n:04x>` an event (bincode
//! [`OutboxEvent`]), `oc/<endpoint>` an endpoint's cursor (the last outbox
//! key it took), `od/<endpoint>\0<event id>` a dead letter (the event).
//!
//! Layout: `produce.rs` (apply side, no I/O), `sign.rs` (Standard Webhooks
//! signature), `dispatch.rs` (leader side: read, filter, post, ack),
//! `status.rs` (what `ternctl webhook status` shows).

pub mod dispatch;
pub mod produce;
pub mod sign;
pub mod status;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde_json::json;
use tern_model::api::{Batch, EventKind, OutboxEvent};

/// Whether this node's applies write events to the outbox (some
/// `[[webhook]]` configured), shared by the apply rules and the batch
/// writers; a config reload turns it on or off. Without webhooks nothing
/// is written: no endpoint would ever acknowledge, and so trim, it.
#[derive(Clone, Debug, Default)]
pub struct Switch(Arc<AtomicBool>);

impl Switch {
    pub fn new(on: bool) -> Switch {
        Switch(Arc::new(AtomicBool::new(on)))
    }

    pub fn is_on(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    pub fn set(&self, on: bool) {
        self.0.store(on, Ordering::Relaxed);
    }
}

pub const OUTBOX_PREFIX: &[u8] = b"o/";
pub const CURSOR_PREFIX: &[u8] = b"oc/";
pub const DEAD_PREFIX: &[u8] = b"od/";

/// Version of the event objects' schema (docs/events.md).
pub const SCHEMA_VERSION: u32 = 1;

/// Key of an endpoint's cursor.
pub fn cursor_key(endpoint: &str) -> Vec<u8> {
    [CURSOR_PREFIX, endpoint.as_bytes()].concat()
}

/// Key of a dead-lettered event of an endpoint.
pub fn dead_key(endpoint: &str, event_id: &str) -> Vec<u8> {
    [DEAD_PREFIX, endpoint.as_bytes(), b"\0", event_id.as_bytes()].concat()
}

/// Prefix of an endpoint's dead letters.
pub fn dead_prefix(endpoint: &str) -> Vec<u8> {
    [DEAD_PREFIX, endpoint.as_bytes(), b"\0"].concat()
}

/// `(index, n)` of an outbox key `o/<index:016x>/<n:04x>`.
pub fn parse_outbox_key(key: &[u8]) -> Option<(u64, u32)> {
    let rest = std::str::from_utf8(key.strip_prefix(OUTBOX_PREFIX)?).ok()?;
    let (index, n) = rest.split_once('/')?;
    if index.len() != 16 || n.len() != 4 {
        return None;
    }
    Some((u64::from_str_radix(index, 16).ok()?, u32::from_str_radix(n, 16).ok()?))
}

/// What an event's batch tells about it (from the control group's `b/` record).
#[derive(Clone, Debug, Default)]
pub struct BatchInfo {
    pub tenant: String,
    pub tags: Vec<String>,
    pub metadata: std::collections::BTreeMap<String, String>,
    pub campaign: Option<String>,
}

impl From<Batch> for BatchInfo {
    fn from(b: Batch) -> BatchInfo {
        BatchInfo {
            tenant: b.tenant,
            tags: b.tags,
            metadata: b.metadata,
            campaign: b.campaign,
        }
    }
}

/// The event as posted: one JSON object of docs/events.md's schema.
pub fn render(
    id: &str,
    group: u64,
    event: &OutboxEvent,
    batch: Option<&BatchInfo>,
    classifier: &crate::bounce::Classifier,
) -> serde_json::Value {
    let timestamp = chrono::DateTime::from_timestamp_millis(event.at)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let class = match event.kind {
        EventKind::Bounced | EventKind::Deferred | EventKind::Expired => {
            Some(classifier.classify(&event.reply).as_str().to_owned())
        }
        EventKind::Suppressed => Some("suppressed".to_owned()),
        EventKind::Complaint => Some("complaint".to_owned()),
        _ => None,
    };
    let empty = BatchInfo::default();
    let b = batch.unwrap_or(&empty);
    json!({
        "id": id,
        "type": event.kind.as_str(),
        "version": SCHEMA_VERSION,
        "timestamp": timestamp,
        "msg_id": event.msg_id,
        "recipient": event.rcpt,
        "from": event.from,
        "reply": event.reply,
        "attempts": event.attempts,
        "batch_id": event.batch,
        "tenant": batch.map(|b| b.tenant.clone()),
        "tags": b.tags,
        "metadata": b.metadata,
        "campaign": b.campaign,
        "class": class,
        "shard": group,
    })
}

#[cfg(test)]
mod tests;
