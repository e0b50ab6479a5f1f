//! The leader side of the outbox: for every group this node leads and every
//! `[[webhook]]`, a task reads the outbox after the endpoint's cursor, keeps
//! the events the endpoint wants (types, tenant), POSTs them as one signed
//! JSON array, and on 2xx proposes `EventsAck` (the cursor moves, dead
//! letters are kept, what every endpoint took is trimmed). A failed POST is
//! retried (the same batch, the same `webhook-id`) with backoff from 1 s
//! doubling to 10 min; events older than `retry_for` go to dead letters.
//! A task ends when its node no longer leads the group; the supervisor
//! starts one again when it leads once more.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use hyper::header::{HeaderMap, HeaderValue};
use tern_model::api::{event_id, Batch, EventKind, OutboxEvent};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Webhook;
use crate::metrics::WebhookMetrics;
use crate::raft::groups::{GroupHandle, Groups};
use crate::raft::{GroupId, NodeId, Request, CONTROL_GROUP};
use crate::webhook::client::{PostError, Poster};

use super::{cursor_key, parse_outbox_key, render, BatchInfo, OUTBOX_PREFIX};

/// First retry delay after a failed POST; it doubles with each failure.
pub const BACKOFF_FIRST: Duration = Duration::from_secs(1);
/// Longest retry delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(600);
/// How often an idle task looks for new events, and the supervisor for
/// groups it newly leads.
const POLL: Duration = Duration::from_millis(200);
/// Most outbox records one read looks at (filtered-out ones included).
const SCAN_LIMIT: usize = 5_000;
/// How long an event waits for its API batch's record to reach this
/// node's replica of the control group (then it is posted without it).
const BATCH_WAIT_MS: i64 = 60_000;

/// How often the pending gauge is counted (a scan of the outbox).
const GAUGE_EVERY: Duration = Duration::from_secs(5);
/// Batch records remembered per task (tenant, tags... of recent batches).
const BATCH_CACHE: usize = 10_000;

/// One endpoint as the dispatcher uses it.
struct Endpoint {
    hook: Webhook,
    poster: Poster,
    /// Outbox event kinds it wants.
    kinds: Vec<EventKind>,
}

/// The outbox event kinds named by `events` (`failed`, the log's name,
/// stands for `bounced`).
pub fn wanted_kinds(events: &[String]) -> Vec<EventKind> {
    use EventKind::*;
    [
        Received, Queued, Delivered, Deferred, Bounced, Expired, Suppressed, Cancelled, Complaint,
    ]
    .into_iter()
    .filter(|k| {
        events
            .iter()
            .any(|e| e == k.as_str() || (*k == Bounced && e == "failed"))
    })
    .collect()
}

/// What the tasks last saw, for `ternctl webhook status`.
#[derive(Clone, Debug, Default)]
pub struct TaskState {
    /// The last POST error, and when (unix seconds); cleared by a 2xx.
    pub last_error: Option<(String, i64)>,
    /// Events posted by this node for the pair.
    pub posted: u64,
}

/// The dispatcher's shared view, by (group, endpoint name).
#[derive(Clone, Default)]
pub struct Status(Arc<Mutex<BTreeMap<(GroupId, String), TaskState>>>);

impl Status {
    fn update(&self, group: GroupId, name: &str, f: impl FnOnce(&mut TaskState)) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(map.entry((group, name.to_owned())).or_default());
    }

    /// The state of `(group, endpoint)` as this node saw it.
    pub fn get(&self, group: GroupId, name: &str) -> TaskState {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&(group, name.to_owned())).cloned().unwrap_or_default()
    }
}

/// What every task shares.
struct Shared {
    node: NodeId,
    groups: Arc<Groups>,
    endpoints: Vec<Endpoint>,
    classifier: crate::bounce::Classifier,
    metrics: WebhookMetrics,
    status: Status,
}

/// The `[[webhook]]` names in force, for `ternctl webhook status`.
pub type Names = Arc<ArcSwap<Vec<String>>>;

/// How long a replaced supervisor may take to stop its tasks before the
/// new one starts anyway (a task waits at most 10 s for an ack).
const REPLACE_WAIT: Duration = Duration::from_secs(15);

/// The node's outbox dispatch: one supervisor for the webhooks in force,
/// replaced whole by a config reload.
pub struct Dispatcher {
    node: NodeId,
    groups: Arc<Groups>,
    classifier: crate::bounce::Classifier,
    metrics: WebhookMetrics,
    status: Status,
    names: Names,
    /// The node's stop.
    stop: watch::Receiver<bool>,
    /// The supervisor of the webhooks in force.
    current: Mutex<Option<Generation>>,
}

/// One supervisor and its own stop.
struct Generation {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Dispatcher {
    /// A dispatcher with no webhooks yet ([`Dispatcher::set`] starts them);
    /// everything it runs ends with `stop`.
    pub fn new(
        node: NodeId,
        groups: Arc<Groups>,
        classifier: crate::bounce::Classifier,
        metrics: WebhookMetrics,
        status: Status,
        names: Names,
        stop: watch::Receiver<bool>,
    ) -> Dispatcher {
        Dispatcher {
            node,
            groups,
            classifier,
            metrics,
            status,
            names,
            stop,
            current: Mutex::new(None),
        }
    }

    /// Dispatches to `hooks` from now on (call on the runtime). The old
    /// supervisor stops first and is waited for, so that two tasks never
    /// post a group's events to one endpoint at once; cursors are kept in
    /// the groups by endpoint name, so a kept endpoint goes on where it
    /// stopped (an event posted but not yet acknowledged is posted again).
    pub fn set(&self, hooks: &[Webhook]) -> anyhow::Result<()> {
        let endpoints = endpoints(hooks)?;
        self.names
            .store(Arc::new(hooks.iter().map(|h| h.name.clone()).collect()));
        let shared = Arc::new(Shared {
            node: self.node,
            groups: Arc::clone(&self.groups),
            endpoints,
            classifier: self.classifier.clone(),
            metrics: self.metrics.clone(),
            status: self.status.clone(),
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        let node_stop = self.stop.clone();
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let previous = current.take();
        let task = tokio::spawn(async move {
            if let Some(previous) = previous {
                let _ = previous.stop.send(true);
                let _ = tokio::time::timeout(REPLACE_WAIT, previous.task).await;
            }
            if !shared.endpoints.is_empty() {
                supervise(shared, stop_rx, node_stop).await;
            }
        });
        *current = Some(Generation { stop: stop_tx, task });
        Ok(())
    }

    /// Waits for the supervisor to end (after the node's stop).
    pub async fn join(&self) {
        let current = self.current.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(generation) = current {
            let _ = generation.task.await;
        }
    }
}

fn endpoints(hooks: &[Webhook]) -> anyhow::Result<Vec<Endpoint>> {
    if hooks.is_empty() {
        return Ok(Vec::new());
    }
    let tls = crate::webhook::client::tls_config()?;
    Ok(hooks
        .iter()
        .map(|hook| {
            if hook.secret.is_none() {
                tracing::warn!(endpoint = %hook.name, "webhook has no secret: its POSTs are not signed");
            }
            Endpoint {
                poster: Poster::new(tls.clone(), hook.url.clone(), hook.headers.clone(), hook.timeout),
                kinds: wanted_kinds(&hook.events),
                hook: hook.clone(),
            }
        })
        .collect())
}

/// Starts a task per (led group, endpoint) that has none running, until
/// this supervisor is replaced (`replaced`) or the node stops.
async fn supervise(shared: Arc<Shared>, mut replaced: watch::Receiver<bool>, mut node_stop: watch::Receiver<bool>) {
    let (tasks_stop, stop) = watch::channel(false);
    let mut running: HashMap<(GroupId, usize), JoinHandle<()>> = HashMap::new();
    loop {
        running.retain(|_, task| !task.is_finished());
        for g in shared.groups.all() {
            if g.leader() != Some(shared.node) {
                continue;
            }
            for i in 0..shared.endpoints.len() {
                running
                    .entry((g.id, i))
                    .or_insert_with(|| tokio::spawn(run(Arc::clone(&shared), g.clone(), i, stop.clone())));
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = replaced.wait_for(|s| *s) => break,
            _ = node_stop.wait_for(|s| *s) => break,
        }
    }
    let _ = tasks_stop.send(true);
    for (_, task) in running {
        let _ = tokio::time::timeout(Duration::from_secs(3), task).await;
    }
}

/// A batch read from the outbox, kept as it is until the endpoint takes it.
#[derive(Debug)]
struct Prepared {
    /// The last outbox key it covers (filtered-out records included).
    upto: Vec<u8>,
    /// Kept events: key, event id, event.
    events: Vec<(Vec<u8>, String, OutboxEvent)>,
    /// The JSON array posted.
    body: Bytes,
    /// `webhook-id`: the first and last event ids.
    id: String,
}

/// One endpoint for one group, while this node leads it.
async fn run(shared: Arc<Shared>, group: GroupHandle, endpoint: usize, mut stop: watch::Receiver<bool>) {
    let ep = &shared.endpoints[endpoint];
    let name = ep.hook.name.as_str();
    let tree = group.sm.tree();
    let counters = shared.metrics.for_url(&crate::webhook::url_label(&ep.hook.url));
    let pending_gauge = shared.metrics.outbox_pending(name, group.id);
    let dead_counter = shared.metrics.dead_letters(name);
    let mut cursor: Vec<u8> = tree
        .get(cursor_key(name))
        .ok()
        .flatten()
        .map(|v| v.to_vec())
        .unwrap_or_default();
    let mut batches: HashMap<String, Option<BatchInfo>> = HashMap::new();
    let mut prepared: Option<Prepared> = None;
    let mut failures: u32 = 0;
    let mut wait = Duration::ZERO;
    let mut gauge_at = tokio::time::Instant::now() - GAUGE_EVERY;
    tracing::debug!(group = group.id, endpoint = %name, cursor = %String::from_utf8_lossy(&cursor), "webhook dispatch started");
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if group.leader() != Some(shared.node) {
            tracing::debug!(group = group.id, endpoint = %name, "webhook dispatch stopped: not the leader");
            return;
        }
        wait = POLL;
        if gauge_at.elapsed() >= GAUGE_EVERY {
            pending_gauge.set(count_after(&tree, &cursor) as i64);
            gauge_at = tokio::time::Instant::now();
        }
        let batch = match prepared.take() {
            Some(b) => b,
            None => {
                // Only entries whose apply has returned: an apply writes its
                // run's outbox keys one by one, and a scan running beside it
                // could see a later key before an earlier one and move the
                // cursor past the earlier (openraft publishes last_applied
                // once the apply is done).
                let applied = group.raft.metrics().borrow().last_applied.map_or(0, |l| l.index);
                let Some(b) = read(&shared, &tree, group.id, ep, &cursor, applied, &mut batches) else {
                    continue;
                };
                b
            }
        };
        if batch.events.is_empty() {
            // Nothing this endpoint wants: only the cursor moves.
            if ack(&shared, &group, name, &batch.upto, Vec::new()).await {
                cursor = batch.upto;
                wait = Duration::ZERO;
            }
            continue;
        }
        let now = chrono::Utc::now();
        let mut headers = HeaderMap::new();
        let header = |v: &str| HeaderValue::from_str(v).ok();
        if let Some(v) = header(&batch.id) {
            headers.insert("webhook-id", v);
        }
        if let Some(v) = header(&now.timestamp().to_string()) {
            headers.insert("webhook-timestamp", v);
        }
        if let Some(secret) = &ep.hook.secret {
            let sig = super::sign::signature(&secret.0, &batch.id, now.timestamp(), &batch.body);
            if let Some(v) = header(&sig) {
                headers.insert("webhook-signature", v);
            }
        }
        let result: Result<(), PostError> = tokio::select! {
            r = ep.poster.post_with(batch.body.clone(), headers) => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        match result {
            Ok(()) => {
                failures = 0;
                let n = batch.events.len() as u64;
                tracing::debug!(
                    group = group.id,
                    endpoint = %name,
                    id = %batch.id,
                    upto = %String::from_utf8_lossy(&batch.upto),
                    events = n,
                    "webhook posted"
                );
                if ack(&shared, &group, name, &batch.upto, Vec::new()).await {
                    counters.posted.inc_by(n);
                    shared.status.update(group.id, name, |s| {
                        s.posted += n;
                        s.last_error = None;
                    });
                    cursor = batch.upto;
                    wait = Duration::ZERO;
                } else {
                    // Posted but not acknowledged: posted again (at least once).
                    prepared = Some(batch);
                }
            }
            Err(error) => {
                counters.failures.inc();
                failures = failures.saturating_add(1);
                wait = backoff(failures);
                tracing::warn!(group = group.id, endpoint = %name, %error, retry_in = ?wait, "webhook post failed");
                shared.status.update(group.id, name, |s| {
                    s.last_error = Some((error.to_string(), now.timestamp()));
                });
                let too_old = now.timestamp_millis() - i64::try_from(ep.hook.retry_for.as_millis()).unwrap_or(i64::MAX);
                let dead: Vec<&(Vec<u8>, String, OutboxEvent)> =
                    batch.events.iter().take_while(|(_, _, e)| e.at < too_old).collect();
                if dead.is_empty() {
                    prepared = Some(batch);
                    continue;
                }
                // The too old events leave; the rest is read again after them.
                let upto = if dead.len() == batch.events.len() {
                    batch.upto.clone()
                } else {
                    dead[dead.len() - 1].0.clone()
                };
                let keys: Vec<String> = dead
                    .iter()
                    .map(|(k, _, _)| String::from_utf8_lossy(k).into_owned())
                    .collect();
                let n = keys.len() as u64;
                tracing::warn!(group = group.id, endpoint = %name, events = n, "webhook events older than retry_for dead-lettered");
                if ack(&shared, &group, name, &upto, keys).await {
                    dead_counter.inc_by(n);
                    cursor = upto;
                    failures = 0;
                    wait = Duration::ZERO;
                } else {
                    prepared = Some(batch);
                }
            }
        }
    }
}

/// The retry delay after `failures` failed POSTs in a row.
pub fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(20);
    BACKOFF_FIRST.saturating_mul(1u32 << exp).min(BACKOFF_MAX)
}

/// Outbox records after `cursor`.
fn count_after(tree: &sled::Tree, cursor: &[u8]) -> usize {
    after(tree, cursor).count()
}

fn after<'t>(tree: &'t sled::Tree, cursor: &[u8]) -> impl Iterator<Item = (sled::IVec, sled::IVec)> + 't {
    let start: Vec<u8> = if cursor.is_empty() {
        OUTBOX_PREFIX.to_vec()
    } else {
        [cursor, b"\0"].concat()
    };
    tree.range(start..)
        .map_while(Result::ok)
        .take_while(|(k, _)| k.starts_with(OUTBOX_PREFIX))
}

/// The next batch after `cursor`: up to `batch_size` wanted events; `None`
/// when the outbox holds nothing after it.
fn read(
    shared: &Shared,
    tree: &sled::Tree,
    group: GroupId,
    ep: &Endpoint,
    cursor: &[u8],
    applied: u64,
    batches: &mut HashMap<String, Option<BatchInfo>>,
) -> Option<Prepared> {
    let mut upto = None;
    let mut events = Vec::new();
    let mut rendered = Vec::new();
    let now = chrono::Utc::now().timestamp_millis();
    for (key, value) in after(tree, cursor).take(SCAN_LIMIT) {
        let Some((index, n)) = parse_outbox_key(&key) else {
            upto = Some(key.to_vec());
            continue;
        };
        if index > applied {
            break; // its entry's apply may still be writing the run's keys
        }
        let Ok(event) = bincode::deserialize::<OutboxEvent>(&value) else {
            tracing::warn!(group, key = %String::from_utf8_lossy(&key), "unreadable outbox record skipped");
            upto = Some(key.to_vec());
            continue;
        };
        if !ep.kinds.contains(&event.kind) {
            upto = Some(key.to_vec());
            continue;
        }
        let info = event.batch.as_ref().and_then(|b| batch_info(shared, batches, b));
        if event.batch.is_some() && info.is_none() && now - event.at < BATCH_WAIT_MS {
            // The batch record is written before its messages, but this
            // node's replica of the control group may not have applied it
            // yet: wait for it rather than post without tenant and tags
            // (or skip it for a tenant's endpoint).
            break;
        }
        upto = Some(key.to_vec());
        if let Some(tenant) = &ep.hook.tenant {
            if info.as_ref().map(|i| &i.tenant) != Some(tenant) {
                continue;
            }
        }
        let id = event_id(group, index, n);
        rendered.push(render(&id, group, &event, info.as_ref(), &shared.classifier));
        events.push((key.to_vec(), id, event));
        if events.len() >= ep.hook.batch_size {
            break;
        }
    }
    let upto = upto?;
    let id = match (events.first(), events.last()) {
        (Some(first), Some(last)) => format!("{}-{}", first.1, last.1),
        _ => String::new(),
    };
    let body = Bytes::from(serde_json::to_vec(&rendered).unwrap_or_default());
    Some(Prepared { upto, events, body, id })
}

/// A batch's tenant, tags... from the control group (cached).
fn batch_info(shared: &Shared, cache: &mut HashMap<String, Option<BatchInfo>>, id: &str) -> Option<BatchInfo> {
    if let Some(info) = cache.get(id) {
        return info.clone();
    }
    let control = shared.groups.get(CONTROL_GROUP)?;
    let info = control
        .sm
        .tree()
        .get(format!("b/{id}"))
        .ok()
        .flatten()
        .and_then(|v| bincode::deserialize::<Batch>(&v).ok())
        .map(BatchInfo::from);
    if cache.len() >= BATCH_CACHE {
        cache.clear();
    }
    // Not yet applied here: asked again next time rather than remembered.
    if info.is_some() {
        cache.insert(id.to_owned(), info.clone());
    }
    info
}

/// Proposes the endpoint's ack; true once committed.
async fn ack(shared: &Shared, group: &GroupHandle, name: &str, upto: &[u8], dead: Vec<String>) -> bool {
    let upto = String::from_utf8_lossy(upto).into_owned();
    let tree = group.sm.tree();
    // Trim to the lowest cursor of every endpoint; one without a cursor yet
    // has taken nothing.
    let mut trim: Option<String> = None;
    for ep in &shared.endpoints {
        let c = if ep.hook.name == name {
            Some(upto.clone())
        } else {
            tree.get(cursor_key(&ep.hook.name))
                .ok()
                .flatten()
                .map(|v| String::from_utf8_lossy(&v).into_owned())
        };
        let c = c.unwrap_or_default();
        trim = Some(match trim {
            Some(t) if t <= c => t,
            _ => c,
        });
    }
    let request = Request::EventsAck {
        endpoint: name.to_owned(),
        upto,
        dead,
        trim: trim.unwrap_or_default(),
    };
    match tokio::time::timeout(Duration::from_secs(10), group.raft.client_write(request)).await {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => {
            tracing::debug!(group = group.id, endpoint = %name, error = %e, "webhook ack not committed");
            false
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_a_second_to_ten_minutes() {
        let d: Vec<u64> = [1, 2, 3, 10, 11, 40].iter().map(|&f| backoff(f).as_secs()).collect();
        assert_eq!(d, [1, 2, 4, 512, 600, 600]);
    }

    #[test]
    fn failed_stands_for_bounced() {
        let kinds = wanted_kinds(&["failed".into(), "queued".into(), "admin".into()]);
        assert_eq!(kinds, [EventKind::Queued, EventKind::Bounced]);
    }
}
