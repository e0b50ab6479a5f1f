//! Producing durable events in a group's apply, on every replica: what an
//! entry changes (new messages, recipients' outcomes, deletions, complaint
//! suppressions) becomes outbox records `o/<index>/<n>`, deterministic in
//! the log index, so that every replica holds the same events and a
//! re-applied entry writes the same keys again. And the apply of
//! `EventsAck`: cursor, dead letters, trim.
//!
//! Events are computed from the state before the entry and the request
//! (the queue's rules are not changed): a recipient already final gets no
//! event, as `queue/apply.rs` leaves it unchanged.

// Rules answer in openraft's StorageError, as the state machine does.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, HashSet};

use tern_model::api::{outbox_key, EventKind, OutboxEvent};
use tern_model::record::{MessageRecord, RcptStatus};

use crate::raft::apply::{write_error, ApplyCtx};
use crate::raft::{OutcomeUpdate, QueueAction, Request, StorageError};

use super::{cursor_key, dead_key, parse_outbox_key, OUTBOX_PREFIX};

/// The reply text outcome.rs gives a recipient it stopped retrying.
const EXPIRED_MARK: &str = "(gave up: message older than";
/// The reply text bounce/suppress.rs gives a suppressed recipient.
const SUPPRESSED_PREFIX: &str = "550 5.7.1 recipient suppressed";
/// The suppression class of an FBL complaint (fbl::COMPLAINT_CLASS).
const COMPLAINT_CLASS: &str = crate::fbl::COMPLAINT_CLASS;

/// The events one entry produces, computed before it is applied and
/// written (with [`Pending::write`]) once it applied without error.
#[derive(Debug, Default)]
pub struct Pending {
    events: Vec<OutboxEvent>,
}

/// Wall clock millis at apply (differs per replica by milliseconds; the
/// event id does not).
fn now_millis() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Whether a new message came in by the API (batch id as ENVID, key as
/// AUTH user) rather than by SMTP.
pub fn is_api_message(record: &MessageRecord) -> bool {
    let e = &record.envelope;
    e.envid.as_deref().is_some_and(|id| id.starts_with("b_"))
        && e.auth_user.as_deref().is_some_and(|u| u.starts_with("apikey:"))
}

/// The API batch of a message, if it is an API message.
fn batch_of(record: &MessageRecord) -> Option<String> {
    is_api_message(record).then(|| record.envelope.envid.clone()).flatten()
}

/// The event kind of a recipient's new status and reply.
pub fn kind_of(status: RcptStatus, reply: &str) -> Option<EventKind> {
    match status {
        RcptStatus::Queued => None,
        RcptStatus::Delivered => Some(EventKind::Delivered),
        RcptStatus::Deferred => Some(EventKind::Deferred),
        RcptStatus::Failed if reply.starts_with(SUPPRESSED_PREFIX) => Some(EventKind::Suppressed),
        RcptStatus::Failed if reply.contains(EXPIRED_MARK) => Some(EventKind::Expired),
        RcptStatus::Failed => Some(EventKind::Bounced),
    }
}

impl Pending {
    /// The events `request` will produce, from the state before it.
    pub fn before(ctx: &ApplyCtx<'_>, request: &Request) -> Result<Pending, StorageError> {
        let mut p = Pending::default();
        match request {
            Request::Enqueue { record, .. } => p.received(ctx, std::iter::once(&**record))?,
            Request::EnqueueMany { messages } => p.received(ctx, messages.iter().map(|m| &*m.record))?,
            // Its new messages are bounces (no event): with the outbox on,
            // the queue's batcher keeps new mail out of `Outcomes` entries.
            Request::Outcomes { updates, .. } => p.outcomes(ctx, updates, false)?,
            Request::Bounce { updates, .. } => p.outcomes(ctx, updates, true)?,
            Request::QueueOp {
                action: QueueAction::Delete,
                ids,
            } => {
                let mut seen = HashSet::new();
                for id in ids {
                    if !seen.insert(id) {
                        continue;
                    }
                    let Some(record) = ctx.message(id)? else { continue };
                    for (i, state) in record.rcpt_state.iter().enumerate() {
                        if !state.status.is_final() {
                            p.push(&record, EventKind::Cancelled, i, "cancelled".into());
                        }
                    }
                }
            }
            Request::Suppress { entries } => {
                for entry in entries.iter().filter(|e| e.class == COMPLAINT_CLASS) {
                    p.events.push(OutboxEvent {
                        kind: EventKind::Complaint,
                        msg_id: String::new(),
                        rcpt: Some(entry.address.clone()),
                        from: String::new(),
                        reply: entry.reason.clone(),
                        attempts: 0,
                        batch: None,
                        at: 0,
                    });
                }
            }
            _ => {}
        }
        Ok(p)
    }

    fn received<'r>(
        &mut self,
        ctx: &ApplyCtx<'_>,
        records: impl Iterator<Item = &'r MessageRecord>,
    ) -> Result<(), StorageError> {
        let mut seen = HashSet::new();
        for record in records {
            if !seen.insert(record.id.as_str()) || ctx.knows_message(&record.id)? {
                continue; // a retried proposal: stage_new ignores it
            }
            let kind = if is_api_message(record) {
                EventKind::Queued
            } else {
                EventKind::Received
            };
            // One event per recipient for API messages (the API's unit),
            // one per message for SMTP (as the log's `received`).
            if kind == EventKind::Queued {
                for i in 0..record.envelope.recipients.len() {
                    self.push(record, kind, i, String::new());
                }
            } else {
                self.events.push(OutboxEvent {
                    kind,
                    msg_id: record.id.clone(),
                    rcpt: None,
                    from: record.envelope.reverse_path.clone(),
                    reply: String::new(),
                    attempts: 0,
                    batch: None,
                    at: 0,
                });
            }
        }
        Ok(())
    }

    /// Mirrors queue/apply.rs's `stage_outcome`: a final recipient keeps
    /// its state; with `only_if_changed` (a bounce) only changes count.
    fn outcomes(
        &mut self,
        ctx: &ApplyCtx<'_>,
        updates: &[OutcomeUpdate],
        only_if_changed: bool,
    ) -> Result<(), StorageError> {
        // Records as earlier updates of this entry leave them.
        let mut current: BTreeMap<&str, Option<MessageRecord>> = BTreeMap::new();
        for update in updates {
            let record = match current.get(update.id.as_str()) {
                Some(r) => r.clone(),
                None => ctx.message(&update.id)?,
            };
            let Some(mut record) = record else { continue };
            let mut changes = Vec::new();
            for r in &update.results {
                let Some(state) = record.rcpt_state.get_mut(r.index as usize) else {
                    continue;
                };
                if state.status.is_final() {
                    continue;
                }
                let changed = state.status != r.status;
                state.status = r.status;
                state.last_reply.clone_from(&r.reply);
                if !only_if_changed || changed {
                    changes.push((r.index as usize, r.status, r.reply.clone()));
                }
            }
            if only_if_changed && changes.is_empty() {
                continue;
            }
            record.attempts = update.attempts;
            for (i, status, reply) in changes {
                if let Some(kind) = kind_of(status, &reply) {
                    self.push(&record, kind, i, reply);
                }
            }
            let gone = record.rcpt_state.iter().all(|s| s.status.is_final());
            current.insert(update.id.as_str(), (!gone).then_some(record));
        }
        Ok(())
    }

    fn push(&mut self, record: &MessageRecord, kind: EventKind, rcpt: usize, reply: String) {
        self.events.push(OutboxEvent {
            kind,
            msg_id: record.id.clone(),
            rcpt: record.envelope.recipients.get(rcpt).map(|r| r.address.clone()),
            from: record.envelope.reverse_path.clone(),
            reply,
            attempts: record.attempts,
            batch: batch_of(record),
            at: 0,
        });
    }

    /// The events, in order (tests).
    pub fn events(&self) -> &[OutboxEvent] {
        &self.events
    }

    /// Writes the events under the entry's index.
    pub fn write(self, ctx: &mut ApplyCtx<'_>) -> Result<(), StorageError> {
        let at = now_millis();
        let index = ctx.index();
        for (n, mut event) in self.events.into_iter().enumerate() {
            event.at = at;
            let n = u32::try_from(n).map_err(|e| write_error(&e))?;
            let value = bincode::serialize(&event).map_err(|e| write_error(&e))?;
            tracing::debug!(group = ctx.group(), index, n, kind = event.kind.as_str(), msg = %event.msg_id, "outbox event");
            ctx.insert(outbox_key(index, n), value);
        }
        Ok(())
    }
}

/// Applies `EventsAck`: the endpoint's cursor moves to `upto`, the `dead`
/// events are copied to its dead letters, and outbox records up to `trim`
/// are removed (every endpoint has taken them).
pub fn ack(
    ctx: &mut ApplyCtx<'_>,
    endpoint: &str,
    upto: &str,
    dead: &[String],
    trim: &str,
) -> Result<(), StorageError> {
    let group = ctx.group();
    tracing::debug!(group, endpoint, upto, trim, dead = dead.len(), "outbox ack applied");
    for key in dead {
        let Some((index, n)) = parse_outbox_key(key.as_bytes()) else {
            continue;
        };
        if let Some(value) = ctx.get(key.as_bytes())? {
            let id = tern_model::api::event_id(group, index, n);
            ctx.insert(dead_key(endpoint, &id), value);
        }
    }
    // A cursor never moves back (an ack from a deposed leader, replayed late).
    let cursor = cursor_key(endpoint);
    let behind = ctx.get(&cursor)?.is_some_and(|c| c.as_ref() > upto.as_bytes());
    if !behind {
        ctx.insert(cursor, upto.as_bytes().to_vec());
    }
    if !trim.is_empty() {
        let old: Vec<sled::IVec> = ctx
            .scan_prefix(OUTBOX_PREFIX)
            .keys()
            .map_while(|k| k.ok())
            .take_while(|k| k.as_ref() <= trim.as_bytes())
            .collect();
        for k in old {
            ctx.remove(k);
        }
    }
    Ok(())
}
