//! The queue shard's rules: what `Enqueue`, `EnqueueMany`, `Outcomes`,
//! `Bounce` and `QueueOp` change in a shard group's state, applied by the
//! Raft state machine through [`crate::raft::apply::Apply`].

// Rules answer in openraft's StorageError, as the state machine does
// (raft/mod.rs): boxing it would only add conversions.
#![allow(clippy::result_large_err)]

use crate::raft::apply::ApplyCtx;
use crate::raft::state_machine::SmEvent;
use crate::raft::{OutcomeUpdate, QueueAction, Request, Response, StorageError};

/// Applies a queue request; gives `request` back when it is not one.
pub fn apply(ctx: &mut ApplyCtx<'_>, request: Request) -> Result<Result<Response, Request>, StorageError> {
    Ok(Ok(match request {
        Request::Enqueue { record, body } => {
            let changed = ctx.stage_new(record, body)?;
            ctx.count(i64::from(changed));
            Response { changed }
        }
        Request::EnqueueMany { messages } => {
            let mut changed = false;
            for m in messages {
                let new = ctx.stage_new(m.record, m.body)?;
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
