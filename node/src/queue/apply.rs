//! The queue shard's rules: what `Enqueue`, `EnqueueMany`, `Outcomes`,
//! `Bounce` and `QueueOp` change in a shard group's state, applied by the
//! Raft state machine through [`crate::raft::apply::Apply`].
//!
//! An API message (envid `b_...`, auth user `apikey:...`) leaves a final
//! status `f/<id>` behind when it leaves the queue, so that its status can
//! still be read and an idempotent retry does not queue it again;
//! `PurgeFinal` removes old ones.

// Rules answer in openraft's StorageError, as the state machine does
// (raft/mod.rs): boxing it would only add conversions.
#![allow(clippy::result_large_err)]

use crate::raft::apply::{write_error, ApplyCtx};
use crate::raft::state_machine::SmEvent;
use crate::raft::{Body, OutcomeUpdate, QueueAction, Request, Response, StorageError};
use tern_model::api::{final_key, FinalStatus};
use tern_model::record::MessageRecord;

/// Applies a queue request; gives `request` back when it is not one.
pub fn apply(ctx: &mut ApplyCtx<'_>, request: Request) -> Result<Result<Response, Request>, StorageError> {
    Ok(Ok(match request {
        Request::Enqueue { record, body } => {
            let changed = stage_new_unless_final(ctx, record, body)?;
            ctx.count(i64::from(changed));
            Response { changed }
        }
        Request::EnqueueMany { messages } => {
            let mut changed = false;
            for m in messages {
                let new = stage_new_unless_final(ctx, m.record, m.body)?;
                ctx.count(i64::from(new));
                changed |= new;
            }
            Response { changed }
        }
        Request::Outcomes { updates, bounces } => {
            for update in updates {
                stage_outcome(ctx, update, false)?;
            }
            for b in bounces {
                let new = ctx.stage_new(b.record, b.body)?;
                ctx.count(i64::from(new));
            }
            Response { changed: true }
        }
        Request::Bounce { updates, reports } => {
            let mut changed = false;
            let mut reports = reports.into_iter();
            for update in updates {
                let report = reports.next().flatten();
                // A report only for recipients this entry really failed.
                if stage_outcome(ctx, update, true)? {
                    changed = true;
                    if let Some(r) = report {
                        let new = ctx.stage_new(r.record, r.body)?;
                        ctx.count(i64::from(new));
                    }
                }
            }
            Response { changed }
        }
        Request::QueueOp { action, ids } => {
            for id in ids {
                let Some(mut record) = ctx.message(&id)? else {
                    continue;
                };
                match action {
                    QueueAction::Hold => {
                        record.held = true;
                        ctx.event(SmEvent::Removed { id: id.clone() });
                    }
                    QueueAction::Release | QueueAction::Retry => {
                        if action == QueueAction::Release {
                            record.held = false;
                        }
                        record.next_attempt = 0;
                        if !record.held {
                            ctx.event(SmEvent::Scheduled { id: id.clone(), due: 0 });
                        }
                    }
                    QueueAction::Delete => {
                        record_final(ctx, &record)?;
                        if let Some(loc) = record.body {
                            ctx.wal().release(loc.segment);
                        }
                        ctx.event(SmEvent::Removed { id: id.clone() });
                        ctx.stage(id, None);
                        ctx.count(-1);
                        continue;
                    }
                }
                ctx.stage(id, Some(record));
            }
            Response { changed: true }
        }
        Request::PurgeFinal { before } => purge_final(ctx, &before)?,
        other => return Ok(Err(other)),
    }))
}

/// Applies one message's outcome update. A recipient already final
/// (delivered, or failed and reported) keeps its state: outcomes decided
/// on a stale view, or replayed, never turn a delivery into a bounce or
/// the reverse. With `only_if_changed` (a bounce) a record that the
/// update does not change is left as it is. True when a recipient changed.
fn stage_outcome(ctx: &mut ApplyCtx<'_>, update: OutcomeUpdate, only_if_changed: bool) -> Result<bool, StorageError> {
    let Some(mut record) = ctx.message(&update.id)? else {
        return Ok(false); // already final and removed: a replay
    };
    let mut changed = false;
    for r in &update.results {
        if let Some(state) = record.rcpt_state.get_mut(r.index as usize) {
            if state.status.is_final() {
                continue;
            }
            changed |= state.status != r.status;
            state.status = r.status;
            state.last_reply.clone_from(&r.reply);
        }
    }
    if only_if_changed && !changed {
        return Ok(false);
    }
    record.attempts = update.attempts;
    record.next_attempt = update.next_attempt;
    record.delay_notified = update.delay_notified;
    if record.rcpt_state.iter().all(|s| s.status.is_final()) {
        record_final(ctx, &record)?;
        if let Some(loc) = record.body {
            ctx.wal().release(loc.segment);
        }
        ctx.event(SmEvent::Removed { id: update.id.clone() });
        ctx.stage(update.id, None);
        ctx.count(-1);
    } else {
        // A message held meanwhile stays out of the schedule.
        ctx.event(if record.held {
            SmEvent::Removed { id: update.id.clone() }
        } else {
            SmEvent::Scheduled {
                id: update.id.clone(),
                due: record.next_attempt,
            }
        });
        ctx.stage(update.id, Some(record));
    }
    Ok(changed)
}

/// Sent through the API: its envelope names its batch and key.
fn is_api_message(record: &MessageRecord) -> bool {
    let env = &record.envelope;
    env.envid.as_deref().is_some_and(|e| e.starts_with("b_"))
        && env.auth_user.as_deref().is_some_and(|u| u.starts_with("apikey:"))
}

/// `stage_new`, except for an API message that already left the queue: an
/// idempotent retry after its delivery must not send it twice.
fn stage_new_unless_final(
    ctx: &mut ApplyCtx<'_>,
    record: Box<MessageRecord>,
    body: Body,
) -> Result<bool, StorageError> {
    if is_api_message(&record) && ctx.get_latest(&final_key(&record.id))?.is_some() {
        return Ok(false);
    }
    ctx.stage_new(record, body)
}

/// Writes the final status of an API message leaving the queue; recipients
/// not final yet (a delete) are `cancelled`.
fn record_final(ctx: &mut ApplyCtx<'_>, record: &MessageRecord) -> Result<(), StorageError> {
    if !is_api_message(record) {
        return Ok(());
    }
    let rcpts = record
        .envelope
        .recipients
        .iter()
        .zip(&record.rcpt_state)
        .map(|(r, s)| {
            let state = if s.status.is_final() {
                s.status.as_str()
            } else {
                "cancelled"
            };
            (r.address.clone(), state.to_owned(), s.last_reply.clone())
        })
        .collect();
    let status = FinalStatus {
        rcpts,
        batch: record.envelope.envid.clone(),
        attempts: record.attempts,
        at: chrono::Utc::now().timestamp(),
    };
    let value = bincode::serialize(&status).map_err(|e| write_error(&e))?;
    ctx.insert(final_key(&record.id), value);
    Ok(())
}

/// Removes final statuses of ids sorting before `before` (ids start with
/// their time, so: older ones).
fn purge_final(ctx: &mut ApplyCtx<'_>, before: &str) -> Result<Response, StorageError> {
    let end = final_key(before);
    let mut old = Vec::new();
    for item in ctx.scan_prefix(b"f/") {
        let (k, _) = item.map_err(|e| write_error(&e))?;
        if k.as_ref() >= end.as_slice() {
            break;
        }
        old.push(k);
    }
    let changed = !old.is_empty();
    for k in old {
        ctx.remove(k);
    }
    Ok(Response { changed })
}
