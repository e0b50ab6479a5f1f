//! Webhooks (`[[webhook]]`): event log lines POSTed to HTTP endpoints as
//! JSON arrays, for the node's own events ([`TAP_TYPES`]: `admin`,
//! `shaping`). Message events (received, delivered, bounced, ...) come from
//! the groups' durable outboxes instead (`crate::outbox`), never from here.
//!
//! The events are the `tern::event` log lines of docs/events.md. An
//! [`EventTap`] is a tracing layer that formats each of them with the same
//! JSON formatter as `[log] format = "json"` (whatever the log format and
//! `RUST_LOG` are) and hands the line to every webhook that wants its type
//! with `try_send`: emitting an event never waits for a webhook. Each
//! webhook has its own task that batches the lines ([`batch::Batcher`]) and
//! posts them ([`client::Poster`]), retrying a failed batch with backoff
//! while new events wait, up to `max_queue`.
//!
//! Layout: `batch.rs` (queue, batches, backoff: no I/O), `client.rs` (the
//! HTTP client), this file (the tap and the tasks).

pub mod batch;
pub mod client;

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures::future::OptionFuture;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

use crate::config::Webhook;
use crate::metrics::{WebhookCounters, WebhookMetrics};
use batch::Batcher;
use client::Poster;

/// The tracing target of event log lines.
pub const EVENT_TARGET: &str = "tern::event";

pub use tern_model::events::EVENT_TYPES;

/// The event types this tap posts; the others are message events, posted
/// from the outbox (exactly once per event id, not once per node's log).
pub const TAP_TYPES: &[&str] = &["admin", "shaping"];

/// How long a stopping node tries to post what its webhooks still hold.
pub const FINAL_FLUSH: Duration = Duration::from_secs(2);

/// Most lines waiting in the hand-off buffer between the tap and a
/// webhook's task (which moves them into its own queue at once).
const HANDOFF: usize = 1024;

/// Event types as bits, in [`EVENT_TYPES`] order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct EventSet(u32);

impl EventSet {
    fn of(names: &[String]) -> EventSet {
        EventSet(names.iter().filter_map(|n| index(n)).fold(0, |bits, i| bits | (1 << i)))
    }

    /// The types of `names` the tap posts.
    fn tapped(names: &[String]) -> EventSet {
        let names: Vec<String> = names
            .iter()
            .filter(|n| TAP_TYPES.contains(&n.as_str()))
            .cloned()
            .collect();
        EventSet::of(&names)
    }

    fn contains(self, i: usize) -> bool {
        self.0 & (1 << i) != 0
    }
}

fn index(event: &str) -> Option<usize> {
    EVENT_TYPES.iter().position(|e| *e == event)
}

/// One webhook's end of the tap.
struct Inlet {
    events: EventSet,
    tx: mpsc::Sender<Arc<str>>,
    counters: WebhookCounters,
}

/// Takes event log lines from tracing to the webhooks' tasks. Install
/// [`EventTap::layer`] in the subscriber at start, before the webhooks
/// exist; [`start`] connects them later, a config reload replaces them.
/// Without webhooks the layer formats nothing.
#[derive(Clone, Default)]
pub struct EventTap {
    inlets: Arc<ArcSwap<Vec<Inlet>>>,
    /// Whether [`EventTap::layer`] was called, to warn when webhooks are
    /// configured but nothing feeds them.
    layered: Arc<AtomicBool>,
}

impl EventTap {
    /// A tracing layer that formats `tern::event` lines as the JSON log
    /// does and hands them to the webhooks. It has its own filter, so
    /// `RUST_LOG` does not change what the webhooks get.
    pub fn layer<S>(&self) -> impl Layer<S> + Send + Sync + 'static
    where
        S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    {
        self.layered.store(true, Ordering::Relaxed);
        let targets = tracing_subscriber::filter::Targets::new().with_target(EVENT_TARGET, tracing::Level::INFO);
        let callsites = targets.clone();
        let inlets = Arc::clone(&self.inlets);
        // Asked per event line: while no webhook is configured (none yet,
        // or a reload removed them all) the line is not even formatted.
        let filter = tracing_subscriber::filter::dynamic_filter_fn(move |meta, _| {
            targets.would_enable(meta.target(), meta.level()) && !inlets.load().is_empty()
        })
        .with_callsite_filter(move |meta| {
            if callsites.would_enable(meta.target(), meta.level()) {
                tracing::subscriber::Interest::sometimes()
            } else {
                tracing::subscriber::Interest::never()
            }
        });
        tracing_subscriber::fmt::layer()
            .json()
            .with_ansi(false)
            .with_writer(self.clone())
            .with_filter(filter)
    }

    /// One formatted line (with its newline) to every webhook that wants its type.
    fn dispatch(&self, formatted: &[u8]) {
        let inlets = self.inlets.load();
        let Ok(line) = std::str::from_utf8(formatted.strip_suffix(b"\n").unwrap_or(formatted)) else {
            return;
        };
        #[derive(serde::Deserialize)]
        struct Fields<'a> {
            #[serde(borrow)]
            event: &'a str,
        }
        #[derive(serde::Deserialize)]
        struct Probe<'a> {
            #[serde(borrow)]
            fields: Fields<'a>,
        }
        let Some(kind) = serde_json::from_str::<Probe>(line)
            .ok()
            .and_then(|p| index(p.fields.event))
        else {
            return;
        };
        let mut shared: Option<Arc<str>> = None;
        for inlet in inlets.iter().filter(|i| i.events.contains(kind)) {
            let line = Arc::clone(shared.get_or_insert_with(|| Arc::from(line)));
            match inlet.tx.try_send(line) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    inlet.counters.dropped_buffer.inc();
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    inlet.counters.dropped_shutdown.inc();
                }
            }
        }
    }
}

impl<'a> MakeWriter<'a> for EventTap {
    type Writer = TapWriter<'a>;

    fn make_writer(&'a self) -> TapWriter<'a> {
        TapWriter {
            tap: self,
            line: Vec::new(),
        }
    }
}

/// Collects one formatted event (the fmt layer writes it whole, then drops
/// the writer) and dispatches it when dropped.
pub struct TapWriter<'a> {
    tap: &'a EventTap,
    line: Vec<u8>,
}

impl Write for TapWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.line.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for TapWriter<'_> {
    fn drop(&mut self) {
        if !self.line.is_empty() {
            self.tap.dispatch(&self.line);
        }
    }
}

/// The running webhook tasks.
pub struct Webhooks {
    tap: EventTap,
    metrics: WebhookMetrics,
    /// The tasks of the webhooks in force; a reload replaces them.
    running: Mutex<Running>,
}

/// One set of webhook tasks and their stop.
struct Running {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Stops the tasks after one last attempt (bounded by [`FINAL_FLUSH`])
    /// to post what they hold.
    async fn shutdown(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            // The task bounds its own flush; this bounds a task that hangs.
            let _ = tokio::time::timeout(FINAL_FLUSH + Duration::from_secs(1), task).await;
        }
    }
}

/// The label of a webhook in metrics and logs: its URL without the query,
/// which may carry a token.
pub fn url_label(url: &hyper::Uri) -> String {
    format!(
        "{}://{}{}",
        url.scheme_str().unwrap_or(""),
        url.authority().map_or("", |a| a.as_str()),
        url.path()
    )
}

/// Starts one task per configured webhook and connects it to `tap`.
/// Call it once; [`Webhooks::replace`] changes the set later.
pub fn start(hooks: &[Webhook], tap: &EventTap, metrics: &WebhookMetrics) -> anyhow::Result<Webhooks> {
    if !hooks.is_empty() && !tap.layered.load(Ordering::Relaxed) {
        tracing::warn!("webhooks are configured but no event tap is installed: they will get no events");
    }
    let (running, inlets) = spawn(hooks, metrics)?;
    tap.inlets.store(Arc::new(inlets));
    Ok(Webhooks {
        tap: tap.clone(),
        metrics: metrics.clone(),
        running: Mutex::new(running),
    })
}

/// A task per webhook in `hooks`, and the tap's ends of them.
fn spawn(hooks: &[Webhook], metrics: &WebhookMetrics) -> anyhow::Result<(Running, Vec<Inlet>)> {
    let (stop, stop_rx) = watch::channel(false);
    let mut inlets = Vec::new();
    let mut tasks = Vec::new();
    if !hooks.is_empty() {
        let tls = client::tls_config()?;
        for hook in hooks {
            let label = url_label(&hook.url);
            let counters = metrics.for_url(&label);
            let (tx, rx) = mpsc::channel(hook.max_queue.clamp(1, HANDOFF));
            let poster = Poster::new(tls.clone(), hook.url.clone(), hook.headers.clone(), hook.timeout);
            let batcher = Batcher::new(hook.batch_size, hook.max_queue, hook.flush_interval);
            tracing::info!(url = %label, events = ?hook.events, "webhook started");
            tasks.push(tokio::spawn(run(
                label,
                batcher,
                poster,
                rx,
                stop_rx.clone(),
                counters.clone(),
            )));
            inlets.push(Inlet {
                events: EventSet::tapped(&hook.events),
                tx,
                counters,
            });
        }
    }
    Ok((Running { stop, tasks }, inlets))
}

impl Webhooks {
    /// Puts `hooks` in force (a config reload; call on the runtime): new
    /// event lines go to their tasks at once; the old tasks post what they
    /// hold, as at shutdown, in the background.
    pub fn replace(&self, hooks: &[Webhook]) -> anyhow::Result<()> {
        let (running, inlets) = spawn(hooks, &self.metrics)?;
        self.tap.inlets.store(Arc::new(inlets));
        let old = std::mem::replace(&mut *self.running.lock().unwrap_or_else(|p| p.into_inner()), running);
        tokio::spawn(old.shutdown());
        Ok(())
    }

    /// Stops the tasks after one last attempt (bounded by [`FINAL_FLUSH`])
    /// to post what they hold.
    pub async fn shutdown(&self) {
        self.tap.inlets.store(Arc::default());
        let (stop, _) = watch::channel(false);
        let idle = Running {
            stop,
            tasks: Vec::new(),
        };
        let running = std::mem::replace(&mut *self.running.lock().unwrap_or_else(|p| p.into_inner()), idle);
        running.shutdown().await;
    }
}

type Post = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), client::PostError>> + Send>>;

/// One webhook: moves lines from the hand-off buffer into the batcher,
/// posts a batch when one is due, one at a time, and retries failures.
async fn run(
    url: String,
    mut batcher: Batcher,
    poster: Poster,
    mut rx: mpsc::Receiver<Arc<str>>,
    mut stop: watch::Receiver<bool>,
    counters: WebhookCounters,
) {
    let mut in_flight: Option<Post> = None;
    loop {
        counters.queued.set(batcher.len() as i64);
        let due = if in_flight.is_some() { None } else { batcher.next_due() };
        tokio::select! {
            line = rx.recv() => match line {
                Some(line) => {
                    let dropped = batcher.push(line, tokio::time::Instant::now());
                    counters.dropped_queue.inc_by(dropped as u64);
                }
                None => break,
            },
            Some(result) = OptionFuture::from(in_flight.as_mut()) => {
                in_flight = None;
                match result {
                    Ok(()) => {
                        counters.posted.inc_by(batcher.delivered() as u64);
                    }
                    Err(error) => {
                        counters.failures.inc();
                        let retry_in = batcher.failed(tokio::time::Instant::now(), rand::random());
                        tracing::warn!(url = %url, %error, ?retry_in, held = batcher.len(), "webhook post failed");
                    }
                }
            }
            _ = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {
                if let Some(batch) = batcher.batch() {
                    in_flight = Some(Box::pin(poster.post(batch.body)));
                }
            }
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    // Stopping: what arrived meanwhile, then one try at everything held.
    while let Ok(line) = rx.try_recv() {
        counters
            .dropped_queue
            .inc_by(batcher.push(line, tokio::time::Instant::now()) as u64);
    }
    rx.close();
    let flush = async {
        if let Some(post) = in_flight.take() {
            post.await?;
            counters.posted.inc_by(batcher.delivered() as u64);
        }
        while let Some(batch) = batcher.batch() {
            poster.post(batch.body).await?;
            counters.posted.inc_by(batcher.delivered() as u64);
        }
        Ok::<(), client::PostError>(())
    };
    let outcome = tokio::time::timeout(FINAL_FLUSH, flush).await;
    counters.queued.set(batcher.len() as i64);
    if !batcher.is_empty() {
        counters.dropped_shutdown.inc_by(batcher.len() as u64);
        let error = match outcome {
            Ok(Err(e)) => e.to_string(),
            _ => format!("not posted within {FINAL_FLUSH:?}"),
        };
        tracing::warn!(url = %url, %error, lost = batcher.len(), "webhook: events not posted at shutdown");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt as _;

    fn tap_with(events: &[&str]) -> (EventTap, mpsc::Receiver<Arc<str>>, WebhookCounters) {
        let tap = EventTap::default();
        let (tx, rx) = mpsc::channel(2);
        let counters = WebhookCounters::default();
        let names: Vec<String> = events.iter().map(|e| (*e).to_owned()).collect();
        tap.inlets.store(Arc::new(vec![Inlet {
            events: EventSet::of(&names),
            tx,
            counters: counters.clone(),
        }]));
        (tap, rx, counters)
    }

    /// The tap's lines are the JSON log's lines, filtered by event type,
    /// and a full hand-off buffer drops (and counts) instead of waiting.
    #[test]
    fn the_tap_hands_over_json_log_lines_without_waiting() {
        let (tap, mut rx, counters) = tap_with(&["delivered"]);
        let log = tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::sink)
            .with_filter(tracing_subscriber::filter::LevelFilter::WARN);
        let subscriber = tracing_subscriber::registry().with(log).with(tap.layer());
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(target: "tern::event", event = "received", msg_id = "A1", shard = 3, "queued");
            tracing::info!(target: "tern::event", event = "delivered", msg_id = "A1", rcpt = "b@x.test", attempt = 1, "delivery");
            tracing::info!(target: "tern::other", event = "delivered", msg_id = "A2", "not an event line");
            tracing::info!(target: "tern::event", event = "delivered", msg_id = "A3", "delivery");
            tracing::info!(target: "tern::event", event = "delivered", msg_id = "A4", "delivery");
        });
        let first: serde_json::Value = serde_json::from_str(&rx.try_recv().unwrap()).unwrap();
        assert_eq!(first["target"], "tern::event");
        assert_eq!(first["level"], "INFO");
        assert!(first["timestamp"].is_string());
        assert_eq!(
            first["fields"],
            serde_json::json!({"message": "delivery", "event": "delivered", "msg_id": "A1", "rcpt": "b@x.test", "attempt": 1})
        );
        let second: serde_json::Value = serde_json::from_str(&rx.try_recv().unwrap()).unwrap();
        assert_eq!(second["fields"]["msg_id"], "A3");
        assert!(rx.try_recv().is_err());
        assert_eq!(counters.dropped_buffer.get(), 1);
    }

    #[test]
    fn url_labels_leave_out_the_query() {
        let url: hyper::Uri = "https://hooks.example.test:8443/t/x?token=secret".parse().unwrap();
        assert_eq!(url_label(&url), "https://hooks.example.test:8443/t/x");
    }

    /// A webhook task posts to a real loopback HTTP server: a 500 is
    /// retried with the same batch, events that came meanwhile follow.
    #[tokio::test]
    async fn a_task_retries_a_failed_batch_then_posts_the_rest() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (bodies_tx, mut bodies) = mpsc::unbounded_channel::<(String, String)>();
        // Answers 500 to the first request, 200 to the others; one request per connection.
        tokio::spawn(async move {
            for n in 0.. {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = Vec::new();
                let body = loop {
                    let mut chunk = [0u8; 4096];
                    let k = s.read(&mut chunk).await.unwrap();
                    assert!(k > 0, "request cut short");
                    buf.extend_from_slice(&chunk[..k]);
                    let text = String::from_utf8_lossy(&buf).into_owned();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len: usize = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length: ")
                                    .map(str::to_owned)
                            })
                            .unwrap()
                            .parse()
                            .unwrap();
                        if body.len() >= len {
                            break (head.to_owned(), body.to_owned());
                        }
                    }
                };
                bodies_tx.send(body).unwrap();
                let status = if n == 0 { "500 Internal Server Error" } else { "200 OK" };
                let answer = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                s.write_all(answer.as_bytes()).await.unwrap();
            }
        });
        let url: hyper::Uri = format!("http://{addr}/hook").parse().unwrap();
        let mut headers = hyper::HeaderMap::new();
        headers.insert("authorization", "Bearer t0ken".parse().unwrap());
        let poster = Poster::new(client::tls_config().unwrap(), url, headers, Duration::from_secs(5));
        let (tx, rx) = mpsc::channel(16);
        let (stop, stop_rx) = watch::channel(false);
        let counters = WebhookCounters::default();
        let task = tokio::spawn(run(
            "test".into(),
            Batcher::new(2, 100, Duration::from_secs(1)),
            poster,
            rx,
            stop_rx,
            counters.clone(),
        ));
        for i in 0..3 {
            tx.send(Arc::from(format!("{{\"n\":{i}}}"))).await.unwrap();
        }
        async fn next(bodies: &mut mpsc::UnboundedReceiver<(String, String)>) -> (String, String) {
            tokio::time::timeout(Duration::from_secs(10), bodies.recv())
                .await
                .unwrap()
                .unwrap()
        }
        let (head, first) = next(&mut bodies).await;
        assert_eq!(first, r#"[{"n":0},{"n":1}]"#);
        assert!(head.starts_with("POST /hook HTTP/1.1\r\n"), "{head}");
        for h in ["content-type: application/json", "authorization: Bearer t0ken"] {
            assert!(
                head.to_ascii_lowercase().contains(&h.to_ascii_lowercase()),
                "{h} missing: {head}"
            );
        }
        tx.send(Arc::from("{\"n\":3}")).await.unwrap();
        // The retry, about a second later, carries the same batch.
        let (_, again) = next(&mut bodies).await;
        assert_eq!(again, first);
        let (_, rest) = next(&mut bodies).await;
        assert_eq!(rest, r#"[{"n":2},{"n":3}]"#);
        let end = tokio::time::Instant::now() + Duration::from_secs(5);
        while counters.posted.get() < 4 {
            assert!(
                tokio::time::Instant::now() < end,
                "the answer to the last post was not counted"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!((counters.posted.get(), counters.failures.get()), (4, 1));
        // An event still waiting at stop goes out in the final flush.
        tx.send(Arc::from("{\"n\":4}")).await.unwrap();
        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
        let (_, last) = next(&mut bodies).await;
        assert_eq!(last, r#"[{"n":4}]"#);
        assert_eq!((counters.posted.get(), counters.dropped_shutdown.get()), (5, 0));
    }
}
