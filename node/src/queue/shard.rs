//! The QueueShard actor: one per shard replica on this node. While this node
//! leads the shard it keeps the shard's schedule, hands due messages to
//! delivery, turns results into per-recipient outcomes (with retries, expiry
//! and bounces) and writes them back through the shard's Raft group in
//! batches. When it stops leading, it stops dispatching; a new leader
//! resumes from the replicated state.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use openraft::metrics::RaftServerMetrics;
use openraft::ServerState;
use tokio_stream::wrappers::{UnboundedReceiverStream, WatchStream};
use tokio_stream::StreamExt as _;

use super::lease::Lease;
use super::message::{MessageRecord, RcptStatus};
use super::outcome;
use super::schedule::{Clock, RetryPolicy, Schedule};
use super::IdGen;
use crate::delivery::fence::Fence;
use crate::delivery::{Delivery, LoadedMessage, RcptAttempt};
use crate::dsn;

use crate::metrics::Metrics;
use crate::raft::groups::GroupHandle;
use crate::raft::state_machine::SmEvent;
use crate::raft::{NewMessage, NodeId, OutcomeUpdate};

/// Most messages of one shard in delivery at once (bounds memory).
const MAX_IN_FLIGHT: usize = 2000;
/// Most outcomes in one Raft write.
const MAX_BATCH: usize = 512;
/// How long outcomes this node could not write (it lost leadership
/// between the delivery and the write) wait for the shard's next leader.
/// After that the messages are delivered again, as before this existed.
const ORPHAN_TTL: Duration = Duration::from_secs(30);

/// Settings the shard actors share.
pub struct ShardSettings {
    pub node: NodeId,
    pub hostname: String,
    pub tick: Duration,
    /// Outcome and DSN counters; Raft leader-change counters for the group host.
    pub metrics: Arc<Metrics>,
    /// Delivery analytics for `ternctl stats`.
    pub stats: Arc<super::stats::Stats>,
    /// Unix seconds for due times, retries and expiry.
    pub clock: Arc<dyn Clock>,
    /// The per-shard write batchers, shared with the SMTP side
    /// ([`super::QueueFront`]): outcomes ride in the same entries as new mail.
    pub batchers: Arc<super::batch::Batchers>,
    /// Passes outcomes this node decided but could no longer write to the
    /// shard's new leader; set once the cluster side is up.
    pub peers: std::sync::OnceLock<Arc<crate::cluster::peers::Peers>>,
}

/// Outcomes (with their reports) that a write refused because this node
/// had stopped leading: for the next leader, which may be this node again.
struct Orphans {
    batches: Vec<(Vec<OutcomeUpdate>, Vec<NewMessage>)>,
    /// Unix seconds of the first refused write; dropped after [`ORPHAN_TTL`].
    since: i64,
}

pub struct QueueShard {
    group: GroupHandle,
    settings: Arc<ShardSettings>,
    delivery: Arc<Delivery>,
    ids: Arc<IdGen>,
    events: Option<tokio::sync::mpsc::UnboundedReceiver<SmEvent>>,
    /// Tells the state machine to send events: set while leading or loading.
    events_wanted: Arc<AtomicBool>,
    /// Term in which this node leads and has loaded the queue.
    leader_term: Option<u64>,
    loading_term: Option<u64>,
    schedule: Schedule,
    /// Outcomes waiting to be written, each with the reports it causes: they
    /// go in the same Raft entry, so a crash never commits a report without
    /// its outcome (the retry would report again) nor the reverse.
    pending: Vec<(OutcomeUpdate, Vec<NewMessage>)>,
    writing: bool,
    /// When a quorum last confirmed this node's leadership: checked before
    /// dispatch and before the end of every delivery's data.
    lease: Arc<Lease>,
    confirming: bool,
    /// See [`Orphans`]; shared with the take-over task, which writes them first.
    orphans: Arc<std::sync::Mutex<Option<Orphans>>>,
    forwarding: bool,
    /// The next scheduler tick, and whether it comes at the leader's pace.
    tick: Option<(actix::SpawnHandle, bool)>,
}

/// A follower's tick: it only forwards outcomes left from a lost
/// leadership. At the leader's 100 ms, 1,000 follower replicas per node
/// cost 10,000 wake-ups a second doing nothing.
const FOLLOWER_TICK: Duration = Duration::from_secs(1);

impl QueueShard {
    pub fn new(
        group: GroupHandle,
        settings: Arc<ShardSettings>,
        delivery: Arc<Delivery>,
        ids: Arc<IdGen>,
        events: tokio::sync::mpsc::UnboundedReceiver<SmEvent>,
        events_wanted: Arc<AtomicBool>,
    ) -> QueueShard {
        let raft = group.raft.clone();
        let server = group.raft.server_metrics();
        let node = settings.node;
        let lease = Arc::new(Lease::new(
            Box::new(move || {
                let raft = raft.clone();
                Box::pin(async move { raft.ensure_linearizable().await.is_ok() })
            }),
            // Read at every check: a lost leadership fences at once.
            Box::new(move || {
                let m = server.borrow();
                (m.state == ServerState::Leader && m.current_leader == Some(node))
                    .then(|| m.vote.leader_id().get_term())
            }),
        ));
        QueueShard {
            group,
            settings,
            delivery,
            ids,
            events: Some(events),
            events_wanted,
            leader_term: None,
            loading_term: None,
            schedule: Schedule::default(),
            pending: Vec::new(),
            writing: false,
            lease,
            confirming: false,
            orphans: Arc::default(),
            forwarding: false,
            tick: None,
        }
    }

    /// Schedules the next tick: every `delivery.scheduler_tick_ms` while this
    /// node leads (or is taking over), every [`FOLLOWER_TICK`] otherwise.
    fn arm_tick(&mut self, ctx: &mut Context<Self>) {
        let leading = self.leader_term.is_some()
            || self.loading_term.is_some()
            || self.group.raft.server_metrics().borrow().state == ServerState::Leader;
        let every = if leading { self.settings.tick } else { FOLLOWER_TICK };
        let handle = ctx.run_later(every, |act, ctx| {
            act.tick = None;
            <Self as Handler<Tick>>::handle(act, Tick, ctx);
            act.arm_tick(ctx);
        });
        self.tick = Some((handle, leading));
    }

    fn now(&self) -> i64 {
        self.settings.clock.now()
    }

    fn load_record(&self, id: &str) -> Option<MessageRecord> {
        self.group.sm.message(id).ok()?
    }

    /// Dispatches due mail only while a quorum has recently confirmed this
    /// node's leadership: a leader that was frozen (SIGSTOP, a long GC or VM
    /// pause) and wakes up must not deliver what a new leader now delivers.
    /// One quorum round per lease at most, not one per message, and none
    /// while nothing is due: a shard holding only deferred mail would
    /// otherwise ask its followers twice a second for nothing.
    fn confirm_then_dispatch(&mut self, ctx: &mut Context<Self>) {
        if self.leader_term.is_none() || self.group.handover.paused() || !self.schedule.has_due(self.now()) {
            return;
        }
        if self.lease.fresh() {
            self.dispatch(ctx);
            return;
        }
        if self.confirming {
            return;
        }
        self.confirming = true;
        let lease = Arc::clone(&self.lease);
        let fut = async move { lease.holds().await };
        ctx.spawn(fut.into_actor(self).map(move |held, act, ctx| {
            act.confirming = false;
            if held {
                act.dispatch(ctx);
            } else {
                tracing::info!(shard = act.group.id, "leadership not confirmed; not delivering");
            }
        }));
    }

    /// Hands every due message to delivery, up to the in-flight bound.
    fn dispatch(&mut self, ctx: &mut Context<Self>) {
        // A planned hand-over is waiting for what is in flight: start nothing new.
        if self.leader_term.is_none() || self.group.handover.paused() {
            return;
        }
        let handover = Arc::clone(&self.group.handover);
        let room = MAX_IN_FLIGHT.saturating_sub(handover.in_flight());
        let now = self.now();
        for id in self.schedule.pop_due(now, room) {
            if !handover.claim(&id) {
                // Its outcome is being written (or an operator bounces it); look again shortly.
                self.schedule.insert(&id, now + 1);
                continue;
            }
            let Some(record) = self.load_record(&id) else {
                handover.release(&id);
                continue;
            };
            // A held message, or a stale entry of one that moved later (its
            // new time has its own entry): see schedule.rs.
            if record.held || record.next_attempt > now {
                handover.release(&id);
                continue;
            }
            let body = match record.body.as_ref().map(|loc| self.group.sm.wal().read(loc)) {
                Some(Ok(b)) => b,
                other => {
                    tracing::error!(msg_id = %id, shard = self.group.id, error = ?other.and_then(|r| r.err()), "cannot read queued body");
                    handover.release(&id);
                    self.schedule.insert(&id, now + 60);
                    continue;
                }
            };
            let message = Arc::new(LoadedMessage { record, body });
            let delivery = Arc::clone(&self.delivery);
            let fence: Arc<dyn Fence> = self.lease.clone();
            let fut = async move {
                let attempts = delivery.attempt(Arc::clone(&message), Some(fence)).await;
                (message, attempts)
            };
            ctx.spawn(fut.into_actor(self).map(|(message, attempts), act, ctx| {
                <Self as Handler<AttemptFinished>>::handle(act, AttemptFinished { message, attempts }, ctx)
            }));
        }
    }

    /// Turns one attempt's results into an outcome update (and bounces):
    /// decided by [`outcome::decide`], the effects (metrics, stats, the
    /// event log, the reports) made here.
    fn on_attempt(&mut self, message: &LoadedMessage, attempts: Vec<RcptAttempt>) {
        let now = self.now();
        let record = &message.record;
        let jitter = rand::random::<f64>() * 2.0 - 1.0;
        // The retry rules in force now (a config reload changes them):
        // they set the next attempt of this one's deferrals.
        let config = self.delivery.config();
        let retry = RetryPolicy {
            schedule: config.retry_schedule.clone(),
            max_age: config.max_age,
        };
        let rules = outcome::Rules {
            retry: &retry,
            delay_notice_after: config.delay_notice_after,
            classifier: self.delivery.classifier(),
        };
        let decision = match outcome::decide(record, attempts, now, jitter, rules) {
            outcome::Verdict::Fenced => {
                self.group.handover.release(&record.id);
                if self.leader_term.is_some() {
                    self.schedule.insert(&record.id, now + 1);
                }
                return;
            }
            outcome::Verdict::Decided(decision) => decision,
        };
        for j in &decision.judged {
            self.settings.metrics.queue.recipient(j.outcome, &j.domain);
            let class = j.class.map(|c| c.as_str()).unwrap_or("");
            if let Some(c) = j.class {
                self.settings.metrics.queue.failure(c, j.outcome);
                if j.outcome == crate::metrics::Outcome::Failed && !j.attempt.suppressed {
                    if let Some(rcpt) = record.envelope.recipients.get(j.attempt.index) {
                        self.delivery
                            .hard_bounce(&record.envelope.reverse_path, &rcpt.address, c, &j.reply, now);
                    }
                }
            }
            log_event(j.event, record, &j.attempt, &j.reply, class, record.attempts + 1, now);
            self.settings.stats.record(
                now,
                &j.domain,
                j.attempt.remote_host.as_deref().unwrap_or(""),
                match j.status {
                    RcptStatus::Delivered => super::stats::Outcome::Delivered,
                    RcptStatus::Failed => super::stats::Outcome::Bounced,
                    _ => super::stats::Outcome::Deferred,
                },
                &j.reply,
                class,
                now - record.received_at,
            );
        }
        let mut bounces = Vec::new();
        for (kind, rcpts) in decision.reports {
            self.queue_dsn(&mut bounces, message, kind, rcpts, now);
        }
        self.pending.push((decision.update, bounces));
    }

    fn queue_dsn(
        &self,
        out: &mut Vec<NewMessage>,
        message: &LoadedMessage,
        kind: dsn::DsnKind,
        rcpts: Vec<dsn::RecipientReport>,
        now: i64,
    ) {
        let record = &message.record;
        // A bounce never causes another bounce.
        if rcpts.is_empty() || record.envelope.reverse_path.is_empty() || dsn::is_dsn(&message.body) {
            return;
        }
        self.settings.metrics.queue.dsn(match kind {
            dsn::DsnKind::Failure => "failure",
            dsn::DsnKind::Delay => "delay",
            dsn::DsnKind::Success => "success",
        });
        let id = self.ids.next();
        if let Some(dsn) = super::ops::make_dsn(&self.settings.hostname, id, message, kind, rcpts, now) {
            out.push(dsn);
        }
    }

    /// Writes collected outcomes through Raft: one write for many.
    fn flush(&mut self, ctx: &mut Context<Self>) {
        if self.writing || self.pending.is_empty() {
            return;
        }
        let (updates, bounces) = take_batch(&mut self.pending, MAX_BATCH);
        let ids: Vec<String> = updates.iter().map(|u| u.id.clone()).collect();
        let group = self.group.clone();
        let batchers = Arc::clone(&self.settings.batchers);
        self.writing = true;
        // Kept in case leadership moved before the write: the next leader
        // needs them (a single-replica shard keeps its leader: no copy).
        let spare = self.group.replicated().then(|| (updates.clone(), bounces.clone()));
        let fut = async move { batchers.write_outcomes(&group, updates, bounces).await };
        ctx.spawn(fut.into_actor(self).map(move |result, act, ctx| {
            act.writing = false;
            let retry_at = act.now() + 5;
            for id in &ids {
                act.group.handover.release(id);
            }
            if let (Err(super::batch::WriteError::NotLeader), Some(batch)) = (&result, spare) {
                // Delivered (or failed) here, not recorded: without this the
                // new leader delivers the same messages again.
                tracing::info!(shard = act.group.id, n = ids.len(), "outcome write refused: no longer the leader; passing the outcomes to the next one");
                let now = act.now();
                act.orphans
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert(Orphans { batches: Vec::new(), since: now })
                    .batches
                    .push(batch);
                act.rehome(ctx);
                return;
            }
            if let Err(e) = result {
                tracing::warn!(shard = act.group.id, error = %e, n = ids.len(), "outcome write failed; will retry delivery");
                if act.leader_term.is_some() {
                    for id in ids {
                        act.schedule.insert(&id, retry_at);
                    }
                }
            }
        }));
    }

    /// Passes orphaned outcomes to the shard's leader on another node, once
    /// one is known; drops them after [`ORPHAN_TTL`]. When this node leads
    /// again, its take-over writes them before it loads the queue.
    fn rehome(&mut self, ctx: &mut Context<Self>) {
        if self.forwarding {
            return;
        }
        let now = self.now();
        let batches = {
            let mut slot = self.orphans.lock().unwrap_or_else(|p| p.into_inner());
            let Some(o) = slot.as_ref() else { return };
            if now - o.since > ORPHAN_TTL.as_secs() as i64 {
                let n: usize = o.batches.iter().map(|b| b.0.len()).sum();
                tracing::warn!(
                    shard = self.group.id,
                    n,
                    "no leader took the outcomes in time; those messages will be delivered again"
                );
                *slot = None;
                return;
            }
            let leader = self.group.raft.metrics().borrow().current_leader;
            match leader {
                Some(l) if l != self.settings.node => {}
                _ => return, // none yet, or this node: its take-over writes them
            }
            if self.settings.peers.get().is_none() {
                return;
            }
            slot.take().map(|o| o.batches).unwrap_or_default()
        };
        let Some(peers) = self.settings.peers.get().cloned() else {
            return;
        };
        self.forwarding = true;
        let group = self.group.clone();
        let fut = async move {
            let mut failed = Vec::new();
            for (updates, bounces) in batches {
                let n = updates.len();
                let op = tern_model::peer::Operation::Outcomes { updates, bounces };
                match peers.operate(&group, &op).await {
                    Ok(_) => tracing::info!(shard = group.id, n, "outcomes written through the new leader"),
                    Err(e) => {
                        tracing::warn!(shard = group.id, n, error = %e, "outcomes not passed to the new leader; trying again");
                        if let tern_model::peer::Operation::Outcomes { updates, bounces } = op {
                            failed.push((updates, bounces));
                        }
                    }
                }
            }
            failed
        };
        ctx.spawn(fut.into_actor(self).map(move |failed, act, ctx| {
            act.forwarding = false;
            if failed.is_empty() {
                return;
            }
            let now = act.now();
            act.orphans
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert(Orphans {
                    batches: Vec::new(),
                    since: now,
                })
                .batches
                .extend(failed);
            // Again shortly (bounded by ORPHAN_TTL), not only on the next metrics change.
            ctx.run_later(Duration::from_millis(300), |act, ctx| act.rehome(ctx));
        }));
    }

    fn on_metrics(&mut self, m: &RaftServerMetrics<NodeId, openraft::BasicNode>, ctx: &mut Context<Self>) {
        let leading = m.state == ServerState::Leader && m.current_leader == Some(self.settings.node);
        let current_term = m.vote.leader_id().get_term();
        if !leading {
            if self.leader_term.take().is_some() {
                tracing::info!(shard = self.group.id, "no longer shard leader; delivery stops here");
            }
            self.loading_term = None;
            self.events_wanted.store(false, Ordering::SeqCst);
            self.schedule.clear();
            self.lease.revoke();
            self.rehome(ctx);
            return;
        }
        if self.leader_term == Some(current_term) || self.loading_term == Some(current_term) {
            return;
        }
        self.loading_term = Some(current_term);
        // A follower's slow tick: the leader's pace from now on.
        if let Some((handle, false)) = self.tick {
            ctx.cancel_future(handle);
            self.arm_tick(ctx);
        }
        // Before the scan: what is applied from now on comes as events too.
        self.events_wanted.store(true, Ordering::SeqCst);
        let term = current_term;
        let group = self.group.clone();
        let orphans = Arc::clone(&self.orphans);
        let batchers = Arc::clone(&self.settings.batchers);
        let fut = async move {
            // Outcomes this node decided as the previous leader first, so
            // that the load below does not schedule what was delivered.
            let taken = orphans.lock().unwrap_or_else(|p| p.into_inner()).take();
            for (updates, bounces) in taken.map(|o| o.batches).unwrap_or_default() {
                let n = updates.len();
                match batchers.write_outcomes(&group, updates, bounces).await {
                    Ok(()) => tracing::info!(shard = group.id, n, "outcomes of the previous term written"),
                    Err(e) => {
                        tracing::warn!(shard = group.id, n, error = %e, "outcomes of the previous term not written; those messages will be delivered again")
                    }
                }
            }
            // One quorum round per leadership, not per message.
            group.raft.ensure_linearizable().await.map_err(|e| e.to_string())?;
            let mut due = Vec::new();
            // A read error ends the load (retried); a record that does not
            // decode is skipped, as before, or the shard would never deliver.
            for record in group.sm.messages() {
                let r = match record {
                    Ok(r) => r,
                    Err(e) if e.downcast_ref::<sled::Error>().is_some() => return Err(e.to_string()),
                    Err(e) => {
                        tracing::warn!(shard = group.id, error = %e, "skipping a queued record that does not decode");
                        continue;
                    }
                };
                if !r.held {
                    due.push((r.id, r.next_attempt));
                }
            }
            Ok::<_, String>(due)
        };
        ctx.spawn(fut.into_actor(self).map(move |result, act, _| {
            if act.loading_term != Some(term) {
                return;
            }
            act.loading_term = None;
            match result {
                Ok(due) => {
                    tracing::debug!(
                        shard = act.group.id,
                        term,
                        pending = due.len(),
                        "shard leader: resuming delivery"
                    );
                    for (id, at) in due {
                        act.schedule.insert(&id, at);
                    }
                    act.leader_term = Some(term);
                    // A hand-over that did not happen (this node won again) pauses no longer.
                    act.group.handover.resume();
                }
                Err(e) => {
                    act.events_wanted.store(act.leader_term.is_some(), Ordering::SeqCst);
                    tracing::warn!(shard = act.group.id, error = %e, "could not take over shard");
                }
            }
        }));
    }
}

/// The oldest `max` outcomes and exactly the reports they cause.
fn take_batch(
    pending: &mut Vec<(OutcomeUpdate, Vec<NewMessage>)>,
    max: usize,
) -> (Vec<OutcomeUpdate>, Vec<NewMessage>) {
    let take = pending.len().min(max);
    let mut updates = Vec::with_capacity(take);
    let mut bounces = Vec::new();
    for (update, reports) in pending.drain(..take) {
        updates.push(update);
        bounces.extend(reports);
    }
    (updates, bounces)
}

/// One structured line per delivery event (docs/events.md).
/// `class` is the bounce class of a failure or deferral (empty when delivered).
fn log_event(event: &str, record: &MessageRecord, a: &RcptAttempt, reply: &str, class: &str, attempt: u32, now: i64) {
    let rcpt = record
        .envelope
        .recipients
        .get(a.index)
        .map(|r| r.address.as_str())
        .unwrap_or("");
    tracing::info!(
        target: "tern::event",
        event,
        msg_id = %record.id,
        message_id = %a.message_id,
        from = %record.envelope.reverse_path,
        rcpt,
        relay = a.remote_host.as_deref().unwrap_or(""),
        ip = a.remote_ip.as_deref().unwrap_or(""),
        tls = a.tls.as_deref().unwrap_or("none"),
        source = a.source.as_deref().unwrap_or(""),
        attempt,
        delay_secs = now - record.received_at,
        reply,
        class,
        "delivery"
    );
}

/// What drives a shard actor, as typed messages. Its own sources deliver
/// them in-context (the state machine's apply events and the Raft server
/// metrics as streams, the tick as a timer, delivery attempts as futures it
/// spawned); anyone holding its `Addr` may send them too, through the
/// bounded mailbox ([`SHARD_MAILBOX`]) with `send().await`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Applied(pub SmEvent);

/// The group's vote, state, leader or membership changed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct LeadershipChanged(pub RaftServerMetrics<NodeId, openraft::BasicNode>);

/// The scheduler tick: retry a failed take-over, flush outcomes, dispatch due mail.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Tick;

/// One delivery attempt of a message ended with these per-recipient results.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AttemptFinished {
    pub message: Arc<LoadedMessage>,
    pub attempts: Vec<RcptAttempt>,
}

/// Messages waiting in a shard actor's mailbox at most.
pub const SHARD_MAILBOX: usize = 1024;

impl Actor for QueueShard {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(SHARD_MAILBOX);
        if let Some(rx) = self.events.take() {
            ctx.add_stream(UnboundedReceiverStream::new(rx).map(Applied));
        }
        // Server metrics change only with vote, state, leader or membership;
        // the full metrics change with every append, commit and apply.
        ctx.add_stream(WatchStream::new(self.group.raft.server_metrics()).map(LeadershipChanged));
        self.arm_tick(ctx);
    }
}

impl Handler<Tick> for QueueShard {
    type Result = ();

    fn handle(&mut self, _: Tick, ctx: &mut Context<Self>) {
        // A take-over that failed (no quorum yet: the whole cluster
        // restarting) is tried again; the server metrics need not change.
        if self.leader_term.is_none() && self.loading_term.is_none() {
            let m = self.group.raft.server_metrics().borrow().clone();
            if m.state == ServerState::Leader {
                self.on_metrics(&m, ctx);
            }
        }
        self.flush(ctx);
        self.confirm_then_dispatch(ctx);
    }
}

impl Handler<Applied> for QueueShard {
    type Result = ();

    fn handle(&mut self, Applied(event): Applied, _: &mut Context<Self>) {
        if self.leader_term.is_none() && self.loading_term.is_none() {
            return;
        }
        match event {
            SmEvent::Scheduled { id, due } => self.schedule.insert(&id, due),
            // Its entry stays until due; dispatch then finds no record (or a
            // held one) and drops it. No id-to-entry map to find it sooner.
            SmEvent::Removed { .. } => {}
        }
    }
}

impl Handler<LeadershipChanged> for QueueShard {
    type Result = ();

    fn handle(&mut self, LeadershipChanged(m): LeadershipChanged, ctx: &mut Context<Self>) {
        self.on_metrics(&m, ctx);
    }
}

impl Handler<AttemptFinished> for QueueShard {
    type Result = ();

    fn handle(&mut self, done: AttemptFinished, _: &mut Context<Self>) {
        self.on_attempt(&done.message, done.attempts);
    }
}

impl StreamHandler<Applied> for QueueShard {
    fn handle(&mut self, event: Applied, ctx: &mut Context<Self>) {
        <Self as Handler<Applied>>::handle(self, event, ctx);
    }

    fn finished(&mut self, _: &mut Context<Self>) {}
}

impl StreamHandler<LeadershipChanged> for QueueShard {
    fn handle(&mut self, m: LeadershipChanged, ctx: &mut Context<Self>) {
        <Self as Handler<LeadershipChanged>>::handle(self, m, ctx);
    }

    fn finished(&mut self, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(n: usize) -> Vec<(OutcomeUpdate, Vec<NewMessage>)> {
        (0..n)
            .map(|i| {
                let update = OutcomeUpdate {
                    id: format!("m{i}"),
                    results: Vec::new(),
                    attempts: 1,
                    next_attempt: 0,
                    delay_notified: false,
                };
                // Every other outcome causes a report naming its message.
                let reports = (i % 2 == 0)
                    .then(|| NewMessage {
                        record: Box::new(MessageRecord::new(
                            format!("report-of-m{i}"),
                            crate::envelope::Envelope::default(),
                            0,
                            0,
                        )),
                        body: crate::raft::Body {
                            bytes: Vec::new(),
                            loc: None,
                        },
                    })
                    .into_iter()
                    .collect();
                (update, reports)
            })
            .collect()
    }

    #[test]
    fn a_batch_carries_exactly_the_reports_of_its_outcomes() {
        let mut queue = pending(1200);
        let mut seen_updates = 0;
        let mut batches = 0;
        while !queue.is_empty() {
            let (updates, bounces) = take_batch(&mut queue, MAX_BATCH);
            assert!(updates.len() <= MAX_BATCH);
            let expected: Vec<String> = updates
                .iter()
                .filter(|u| u.id[1..].parse::<usize>().is_ok_and(|i| i % 2 == 0))
                .map(|u| format!("report-of-{}", u.id))
                .collect();
            let got: Vec<String> = bounces.iter().map(|b| b.record.id.clone()).collect();
            assert_eq!(got, expected, "batch {batches}");
            seen_updates += updates.len();
            batches += 1;
        }
        assert_eq!((seen_updates, batches), (1200, 3));
    }
}
