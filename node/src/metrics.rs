//! Prometheus metrics (`GET /metrics` on the HTTP listener), with the
//! `prometheus-client` crate. Every metric is listed in docs/metrics.md.
//!
//! One [`Metrics`] per node owns the registry. Its parts are cheap clones
//! of the same atomics, handed to the code that counts:
//! [`SmtpMetrics`] in the SMTP listener's settings, [`QueueMetrics`] to the
//! shard actors, [`DeliveryMetrics`] to the site workers, [`StorageMetrics`]
//! to the flusher thread, [`WebhookMetrics`] to the webhook tasks. Each part's `Default` is a detached set (not in
//! any registry), so code under test needs no registry.
//!
//! Counters on the SMTP accept path and the Raft apply path are plain
//! atomic increments: labelled counters there are looked up once, when the
//! metrics are made. Values that are cheap to read when scraped (Raft state
//! per group, queue depth, oldest message, bytes on disk) are read then, in
//! [`Metrics::encode`].

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// One group's values read at scrape time.
#[derive(Clone, Copy, Debug, Default)]
pub struct GroupSample {
    pub group: u64,
    pub term: u64,
    /// This node leads the group.
    pub leading: bool,
    pub last_log_index: u64,
    pub last_applied: u64,
    pub purged_index: u64,
    /// A queue shard's messages and the oldest one's arrival (unix
    /// seconds); `None` for the control group.
    pub queue: Option<(u64, Option<i64>)>,
}

/// Whatever hosts Raft groups, read at scrape time: the Raft layer
/// implements it, so that metrics (a leaf) names no Raft type.
pub trait GroupGauges {
    /// Calls `each` with every hosted group's values, as seen by `node`.
    fn sample(&self, node: u64, each: &mut dyn FnMut(GroupSample));
}

impl<T: GroupGauges + ?Sized> GroupGauges for Arc<T> {
    fn sample(&self, node: u64, each: &mut dyn FnMut(GroupSample)) {
        (**self).sample(node, each)
    }
}

/// No groups (tests).
impl GroupGauges for () {
    fn sample(&self, _: u64, _: &mut dyn FnMut(GroupSample)) {}
}

/// Content type of [`Metrics::encode`]'s output (OpenMetrics text).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of [`prometheus_text`]'s output (the classic text format).
pub const CONTENT_TYPE_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Distinct recipient domains that get their own `destination` label;
/// later ones are counted under `other`.
pub const MAX_DESTINATIONS: usize = 100;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabel {
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
    destination: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

/// An egress `[[source]]` or `[[pool]]` name: configured, so bounded.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EgressLabel {
    name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TlsLabel {
    tls: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// A failure's bounce class (a fixed set: tern-model's `bounce::Class`)
/// and the recipient outcome (`deferred`, `failed`, `expired`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    class: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabel {
    pub group: u64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShardLabel {
    shard: u64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PartLabel {
    part: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UrlLabel {
    url: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    url: String,
    reason: &'static str,
}

/// One counter per value of a fixed label set, each looked up once (the
/// family is what gets registered).
#[derive(Clone, Debug)]
struct FixedCounters<L, const N: usize> {
    family: Family<L, Counter>,
    counters: [Counter; N],
}

impl<L, const N: usize> FixedCounters<L, N>
where
    L: Clone + std::hash::Hash + Eq,
{
    fn new(labels: [L; N]) -> Self {
        let family = Family::<L, Counter>::default();
        let counters = labels.map(|l| family.get_or_create(&l).clone());
        FixedCounters { family, counters }
    }
}

/// Counters by reply class: 2xx, 3xx, 4xx, 5xx.
#[derive(Clone, Debug)]
struct ByClass(FixedCounters<ClassLabel, 4>);

impl Default for ByClass {
    fn default() -> Self {
        ByClass(FixedCounters::new(
            ["2xx", "3xx", "4xx", "5xx"].map(|class| ClassLabel { class }),
        ))
    }
}

impl ByClass {
    fn inc(&self, code: u16) {
        let i = usize::from(code / 100).clamp(2, 5) - 2;
        self.0.counters[i].inc();
    }
}

/// Peer RPCs refused (`tern_peer_refused_total{reason}`), counted by the
/// peer gate of `tern-raft`.
pub use tern_raft::gate::PeerRefusals;

/// How an SMTP AUTH attempt ended (`tern_smtp_auth_total{result}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthResult {
    Ok,
    /// Wrong user name or password.
    Failed,
    /// Refused unchecked after too many failures.
    RateLimited,
    /// The check could not be run.
    Error,
}

/// Counters by [`AuthResult`].
#[derive(Clone, Debug)]
struct ByAuthResult(FixedCounters<ResultLabel, 4>);

impl Default for ByAuthResult {
    fn default() -> Self {
        ByAuthResult(FixedCounters::new(
            ["ok", "failed", "rate_limited", "error"].map(|result| ResultLabel { result }),
        ))
    }
}

/// How an operator's call to the admin service was judged
/// (`tern_admin_auth_total{result}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminAuthResult {
    /// A credential was accepted (or the loopback default applied).
    Ok,
    /// No credential, a wrong token or a refused certificate.
    Unauthenticated,
    /// Refused unchecked after too many wrong tokens from the address.
    RateLimited,
    /// Authenticated, but the role does not allow the call.
    Denied,
}

/// Configuration reloads (SIGHUP, `ternctl config reload`).
#[derive(Clone, Debug)]
pub struct ReloadMetrics {
    /// `tern_config_reload_total{result="ok|error"}`.
    total: FixedCounters<ResultLabel, 2>,
    /// `tern_config_last_reload_success_timestamp_seconds`: set at start too,
    /// so a file changed after it and never loaded shows.
    last_success: Gauge,
}

impl Default for ReloadMetrics {
    fn default() -> Self {
        ReloadMetrics {
            total: FixedCounters::new(["ok", "error"].map(|result| ResultLabel { result })),
            last_success: Gauge::default(),
        }
    }
}

impl ReloadMetrics {
    /// The configuration in force was (re)loaded now.
    pub fn loaded(&self) {
        self.last_success.set(chrono::Utc::now().timestamp());
    }

    pub fn succeeded(&self) {
        self.total.counters[0].inc();
        self.loaded();
    }

    pub fn failed(&self) {
        self.total.counters[1].inc();
    }

    fn register(&self, r: &mut Registry) {
        r.register(
            "tern_config_reload",
            "Configuration reloads (SIGHUP or ternctl config reload), by result; an error keeps the running configuration",
            self.total.family.clone(),
        );
        r.register(
            "tern_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful configuration load (start or reload)",
            self.last_success.clone(),
        );
    }
}

/// The admin service's metrics.
#[derive(Clone, Debug)]
pub struct AdminMetrics {
    auth: FixedCounters<ResultLabel, 4>,
}

impl Default for AdminMetrics {
    fn default() -> Self {
        AdminMetrics {
            auth: FixedCounters::new(
                ["ok", "unauthenticated", "rate_limited", "denied"].map(|result| ResultLabel { result }),
            ),
        }
    }
}

impl AdminMetrics {
    pub fn auth(&self, result: AdminAuthResult) {
        let i = match result {
            AdminAuthResult::Ok => 0,
            AdminAuthResult::Unauthenticated => 1,
            AdminAuthResult::RateLimited => 2,
            AdminAuthResult::Denied => 3,
        };
        self.auth.counters[i].inc();
    }

    fn register(&self, r: &mut Registry) {
        r.register(
            "tern_admin_auth",
            "Operator calls to the admin service, by how their credential and role were judged",
            self.auth.family.clone(),
        );
    }
}

/// The SMTP listener's metrics.
#[derive(Clone, Debug, Default)]
pub struct SmtpMetrics {
    sessions_open: Gauge,
    sessions: Counter,
    replies: ByClass,
    transaction_replies: ByClass,
    messages_received: Counter,
    received_bytes: Counter,
    auth: ByAuthResult,
    queueing_seconds: QueueingSeconds,
    /// Bytes of message content sessions hold under `[smtp] memory_budget_mb`.
    memory_reserved: Gauge,
    limited: ByLimit,
}

/// A resource limit that refused or ended a session or a message
/// (`tern_smtp_limited_total{limit}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// `max_connections_per_ip`: the connection got 421 4.7.0.
    PerIp,
    /// `max_session_secs`: the session got 421 4.4.2.
    SessionTime,
    /// `min_data_rate`: the session got 421 4.4.2.
    DataRate,
    /// `max_junk_commands`: the session got 421 4.7.0.
    JunkCommands,
    /// `memory_budget_mb`: DATA or BDAT got 452 4.3.1.
    MemoryBudget,
    /// `tls_handshake_secs`: the handshake did not finish in time.
    TlsHandshake,
    /// A missing or malformed PROXY header from a trusted proxy.
    ProxyHeader,
    /// `max_connection_rate_per_ip`: the connection got 421 4.7.0.
    ConnectionRate,
}

const LIMITS: [&str; 8] = [
    "per_ip",
    "session_time",
    "data_rate",
    "junk_commands",
    "memory_budget",
    "tls_handshake",
    "proxy_header",
    "connection_rate",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabel {
    limit: &'static str,
}

/// Counters by [`Limit`].
#[derive(Clone, Debug)]
struct ByLimit(FixedCounters<LimitLabel, 8>);

impl Default for ByLimit {
    fn default() -> Self {
        ByLimit(FixedCounters::new(LIMITS.map(|limit| LimitLabel { limit })))
    }
}

/// Buckets of `tern_smtp_queueing_duration_seconds`: 100 µs .. about 2.3 s,
/// a factor of √2 apart, fine enough to read a p99 against a 20 ms goal.
#[derive(Clone, Debug)]
struct QueueingSeconds(Histogram);

impl Default for QueueingSeconds {
    fn default() -> Self {
        QueueingSeconds(Histogram::new(exponential_buckets(
            0.0001,
            std::f64::consts::SQRT_2,
            30,
        )))
    }
}

impl SmtpMetrics {
    /// A connection was accepted; the session counts as open until the
    /// returned guard is dropped.
    pub fn session_started(&self) -> SessionGuard {
        self.sessions.inc();
        self.sessions_open.inc();
        SessionGuard(self.sessions_open.clone())
    }

    /// Any reply written to a client.
    pub fn reply(&self, code: u16) {
        self.replies.inc(code);
    }

    /// The final reply to a message (the enqueue result after DATA/BDAT LAST).
    pub fn transaction_reply(&self, code: u16) {
        self.transaction_replies.inc(code);
    }

    /// A message was queued (answered 250); `bytes` as queued.
    pub fn message_received(&self, bytes: usize) {
        self.messages_received.inc();
        self.received_bytes.inc_by(bytes as u64);
    }

    /// The time from the end of a message's data to its final reply being
    /// ready (content checks, queueing, replication), whatever the reply.
    pub fn queueing_time(&self, seconds: f64) {
        self.queueing_seconds.0.observe(seconds);
    }

    /// One SMTP AUTH attempt that reached a verdict.
    pub fn auth(&self, result: AuthResult) {
        let i = match result {
            AuthResult::Ok => 0,
            AuthResult::Failed => 1,
            AuthResult::RateLimited => 2,
            AuthResult::Error => 3,
        };
        self.auth.0.counters[i].inc();
    }

    /// A resource limit refused a connection, a command or a message.
    pub fn limited(&self, limit: Limit) {
        self.limited.0.counters[limit as usize].inc();
    }

    /// `delta` bytes were reserved (positive) or released (negative) from
    /// the memory budget.
    pub fn memory_reserved(&self, delta: i64) {
        self.memory_reserved.inc_by(delta);
    }

    fn register(&self, r: &mut Registry) {
        r.register(
            "tern_smtp_memory_reserved_bytes",
            "Bytes of message content SMTP sessions hold in memory under [smtp] memory_budget_mb",
            self.memory_reserved.clone(),
        );
        r.register(
            "tern_smtp_limited",
            "Connections, sessions and messages refused or ended by an SMTP resource limit, by limit",
            self.limited.0.family.clone(),
        );
        r.register(
            "tern_smtp_auth",
            "SMTP AUTH attempts on the submission listeners, by result",
            self.auth.0.family.clone(),
        );
        r.register(
            "tern_smtp_sessions_open",
            "SMTP sessions currently open",
            self.sessions_open.clone(),
        );
        r.register("tern_smtp_sessions", "SMTP connections accepted", self.sessions.clone());
        r.register(
            "tern_smtp_replies",
            "SMTP replies sent to clients, by class",
            self.replies.0.family.clone(),
        );
        r.register(
            "tern_smtp_transaction_replies",
            "Final replies to messages (the queueing result after DATA or BDAT LAST), by class",
            self.transaction_replies.0.family.clone(),
        );
        r.register(
            "tern_smtp_messages_received",
            "Messages accepted and queued (answered 250)",
            self.messages_received.clone(),
        );
        r.register(
            "tern_smtp_received_bytes",
            "Bytes of the messages accepted and queued (with our Received header)",
            self.received_bytes.clone(),
        );
        r.register(
            "tern_smtp_queueing_duration_seconds",
            "Time from the end of a message's data to its final reply (content checks, queueing and replication: the server's share of the 250's latency)",
            self.queueing_seconds.0.clone(),
        );
    }
}

/// Decrements `tern_smtp_sessions_open` when the session ends, however it ends.
pub struct SessionGuard(Gauge);

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What happened to one recipient in one delivery attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    Deferred,
    /// Failed permanently (5xx or unroutable).
    Failed,
    /// Still deferred when `delivery.max_age` ran out: failed as expired.
    Expired,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Deferred => "deferred",
            Outcome::Failed => "failed",
            Outcome::Expired => "expired",
        }
    }
}

/// The shard actors' metrics (counted on the shard leader that delivers).
#[derive(Clone, Debug, Default)]
pub struct QueueMetrics {
    recipients: Family<OutcomeLabels, Counter>,
    /// Domains that have their own label (at most [`MAX_DESTINATIONS`]).
    destinations: Arc<Mutex<HashSet<String>>>,
    dsns: Family<KindLabel, Counter>,
    /// Failed, deferred and expired recipients by bounce class.
    failures: Family<FailureLabels, Counter>,
    /// Planned hand-overs of a shard this node led, and those that went on
    /// with deliveries still in flight (docs/operations.md).
    pub handovers: Counter,
    pub handover_timeouts: Counter,
}

impl QueueMetrics {
    /// One recipient's outcome; `domain` is the recipient's domain.
    pub fn recipient(&self, outcome: Outcome, domain: &str) {
        let destination = self.destination(domain);
        self.recipients
            .get_or_create(&OutcomeLabels {
                outcome: outcome.as_str(),
                destination,
            })
            .inc();
    }

    /// A recipient failed, was deferred or expired with a reply of `class`.
    pub fn failure(&self, class: tern_model::bounce::Class, outcome: Outcome) {
        self.failures
            .get_or_create(&FailureLabels {
                class: class.as_str(),
                outcome: outcome.as_str(),
            })
            .inc();
    }

    /// A delivery status notification was queued; `kind` is `failure`,
    /// `delay` or `success`.
    pub fn dsn(&self, kind: &'static str) {
        self.dsns.get_or_create(&KindLabel { kind }).inc();
    }

    /// The label for `domain`: itself while fewer than MAX_DESTINATIONS
    /// domains have been seen, else `other`.
    fn destination(&self, domain: &str) -> String {
        let plain = !domain.is_empty()
            && domain.len() <= 253
            && domain
                .chars()
                .all(|c| c.is_alphanumeric() || matches!(c, '.' | '-' | '_' | '[' | ']' | ':'));
        if !plain {
            return "other".into();
        }
        let mut seen = self.destinations.lock().unwrap_or_else(|p| p.into_inner());
        if seen.contains(domain) {
            return domain.to_owned();
        }
        if seen.len() < MAX_DESTINATIONS {
            seen.insert(domain.to_owned());
            return domain.to_owned();
        }
        "other".into()
    }

    fn register(&self, r: &mut Registry) {
        r.register(
            "tern_queue_recipients",
            "Recipient outcomes of delivery attempts (delivered, deferred, failed, expired), by recipient domain",
            self.recipients.clone(),
        );
        r.register(
            "tern_delivery_failures",
            "Recipients deferred, failed or expired, by bounce class (docs/deliverability.md)",
            self.failures.clone(),
        );
        r.register(
            "tern_dsn_generated",
            "Delivery status notifications queued, by kind",
            self.dsns.clone(),
        );
        r.register(
            "tern_shard_handovers",
            "Planned hand-overs of a shard this node led (move-leader, drain, balancer, replica moves, SIGTERM)",
            self.handovers.clone(),
        );
        r.register(
            "tern_shard_handover_timeouts",
            "Planned hand-overs that went on before every in-flight delivery's outcome was committed \
             ([cluster] handover_timeout_secs); those deliveries may be repeated by the new leader",
            self.handover_timeouts.clone(),
        );
    }
}

/// The site workers' metrics.
#[derive(Clone, Debug)]
pub struct DeliveryMetrics {
    attempt_seconds: Family<ResultLabel, Histogram, fn() -> Histogram>,
    attempt_ok: Histogram,
    attempt_error: Histogram,
    connections: Family<TlsLabel, Counter>,
    tls_yes: Counter,
    tls_no: Counter,
    /// Site actors started again after they died (shared with [`Metrics::restarts`]).
    restarts: Restarts,
    /// Recipients held back by shaping, by rule scope (`other` for the rest).
    shaping_held: Family<ScopeLabel, Counter>,
    /// Messages handed to each egress source (per destination scope).
    egress_messages: Family<EgressLabel, Counter>,
    /// Recipients held back because every source of a pool was at its warm-up cap.
    warmup_held: Family<EgressLabel, Counter>,
    /// Automatic suppression entries: `added`, `dropped` (queue full),
    /// `write_failed`.
    suppressions: Family<ResultLabel, Counter>,
    /// `tern_shaping_actions{action}`: automatic actions in force in this
    /// node's replica of the control group.
    shaping_actions: Family<ActionLabel, Gauge>,
    /// `tern_shaping_actions_recorded_total`: actions this node recorded.
    shaping_recorded: Counter,
    /// `tern_backoff_recipients_total{action}`: recipients held back or
    /// bounced by an action in force, on this node.
    backoff_recipients: Family<ActionLabel, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabel {
    action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScopeLabel {
    scope: String,
}

fn attempt_histogram() -> Histogram {
    // 5 ms .. 41 s.
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

impl Default for DeliveryMetrics {
    fn default() -> Self {
        let attempt_seconds: Family<ResultLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(attempt_histogram);
        let attempt_ok = attempt_seconds.get_or_create(&ResultLabel { result: "ok" }).clone();
        let attempt_error = attempt_seconds.get_or_create(&ResultLabel { result: "error" }).clone();
        let connections = Family::<TlsLabel, Counter>::default();
        let tls_yes = connections.get_or_create(&TlsLabel { tls: "yes" }).clone();
        let tls_no = connections.get_or_create(&TlsLabel { tls: "no" }).clone();
        DeliveryMetrics {
            attempt_seconds,
            attempt_ok,
            attempt_error,
            connections,
            tls_yes,
            tls_no,
            restarts: Restarts::default(),
            suppressions: Family::default(),
            shaping_actions: Family::default(),
            shaping_recorded: Counter::default(),
            backoff_recipients: Family::default(),
            egress_messages: Family::default(),
            warmup_held: Family::default(),
            shaping_held: Family::default(),
        }
    }
}

impl DeliveryMetrics {
    /// A site actor died and was started again.
    pub fn actor_restarted(&self, actor: &'static str) {
        self.restarts.inc(actor);
    }

    /// `n` automatic suppression entries had `result` (`added`,
    /// `dropped`, `write_failed`).
    pub fn suppression(&self, result: &'static str, n: u64) {
        self.suppressions.get_or_create(&ResultLabel { result }).inc_by(n);
    }

    /// One site transaction (connecting first if needed) took `seconds`;
    /// `ok` unless no connection could be made or it broke.
    pub fn attempt(&self, seconds: f64, ok: bool) {
        if ok {
            self.attempt_ok.observe(seconds);
        } else {
            self.attempt_error.observe(seconds);
        }
    }

    /// The automatic shaping actions in force, by kind.
    pub fn shaping_actions(&self, suspend: i64, throttle: i64, bounce: i64) {
        for (action, n) in [("suspend", suspend), ("throttle", throttle), ("bounce", bounce)] {
            self.shaping_actions.get_or_create(&ActionLabel { action }).set(n);
        }
    }

    /// This node recorded an automatic shaping action.
    pub fn shaping_action_recorded(&self) {
        self.shaping_recorded.inc();
    }

    /// `n` recipients held back (`suspend`) or bounced (`bounce`) by an action.
    pub fn backoff_recipients(&self, action: &'static str, n: u64) {
        self.backoff_recipients.get_or_create(&ActionLabel { action }).inc_by(n);
    }

    /// A message to one destination scope handed to egress source `source`.
    pub fn egress_message(&self, source: &str) {
        self.egress_messages
            .get_or_create(&EgressLabel {
                name: source.to_owned(),
            })
            .inc();
    }

    /// `recipients` held back by pool `pool`'s warm-up caps.
    pub fn warmup_held(&self, pool: &str, recipients: usize) {
        self.warmup_held
            .get_or_create(&EgressLabel { name: pool.to_owned() })
            .inc_by(recipients as u64);
    }

    /// `n` recipients held back by shaping in `scope` (a rule's scope, or
    /// `other`: the label stays bounded by the configured rules).
    pub fn shaping_held(&self, scope: &str, n: usize) {
        self.shaping_held
            .get_or_create(&ScopeLabel {
                scope: scope.to_owned(),
            })
            .inc_by(n as u64);
    }

    /// A new outbound connection, with or without TLS.
    pub fn connection(&self, tls: bool) {
        if tls {
            self.tls_yes.inc();
        } else {
            self.tls_no.inc();
        }
    }

    fn register(&self, r: &mut Registry) {
        r.register(
            "tern_delivery_attempt_duration_seconds",
            "Time of one site transaction (including connecting when a new connection was needed)",
            self.attempt_seconds.clone(),
        );
        r.register(
            "tern_delivery_connections",
            "Outbound SMTP/LMTP connections made, by whether TLS is in use",
            self.connections.clone(),
        );
        r.register(
            "tern_suppression_writes",
            "Automatic suppression-list entries after hard bounces: added, dropped (queue full), write_failed",
            self.suppressions.clone(),
        );
        r.register(
            "tern_shaping_actions",
            "Automatic shaping actions ([[backoff]]) in force in this node's replica of the control group, by action",
            self.shaping_actions.clone(),
        );
        r.register(
            "tern_shaping_actions_recorded",
            "Automatic shaping actions this node recorded in the control group (a remote reply matched a [[backoff]] rule)",
            self.shaping_recorded.clone(),
        );
        r.register(
            "tern_backoff_recipients",
            "Recipients not attempted because an automatic action was in force for their destination, by action (suspend: held back; bounce: failed)",
            self.backoff_recipients.clone(),
        );
        r.register(
            "tern_egress_messages",
            "Messages (per destination scope) handed to each egress source",
            self.egress_messages.clone(),
        );
        r.register(
            "tern_egress_warmup_held",
            "Recipients held back until the next UTC day because every source of the pool was at its warm-up cap",
            self.warmup_held.clone(),
        );
        r.register(
            "tern_shaping_held",
            "Recipients not attempted because their destination had no shaping slot free, by scope",
            self.shaping_held.clone(),
        );
    }
}

/// The group-commit flusher's metrics (they live with the flusher, in tern-store).
pub use tern_store::StorageMetrics;

/// The webhooks' metrics, labelled by URL: the configured list, so bounded.
#[derive(Clone, Debug, Default)]
pub struct WebhookMetrics {
    posted: Family<UrlLabel, Counter>,
    dropped: Family<DropLabels, Counter>,
    failures: Family<UrlLabel, Counter>,
    queued: Family<UrlLabel, Gauge>,
    /// Durable events not yet taken, by endpoint name and group (set by the group's leader).
    outbox_pending: Family<EndpointGroupLabels, Gauge>,
    /// Durable events moved to dead letters, by endpoint name.
    dead_letters: Family<EndpointLabel, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointGroupLabels {
    endpoint: String,
    group: u64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabel {
    endpoint: String,
}

/// One webhook's counters, looked up once when its task starts.
#[derive(Clone, Debug, Default)]
pub struct WebhookCounters {
    /// Events in batches the endpoint answered 2xx.
    pub posted: Counter,
    /// Events dropped because the hand-off buffer to the task was full.
    pub dropped_buffer: Counter,
    /// Oldest events dropped to keep within `max_queue`.
    pub dropped_queue: Counter,
    /// Events not posted when the node stopped.
    pub dropped_shutdown: Counter,
    /// POSTs that failed (connection error, timeout or a non-2xx answer).
    pub failures: Counter,
    /// Events held in memory now (waiting, or in the batch being retried).
    pub queued: Gauge,
}

impl WebhookMetrics {
    /// The counters of the webhook labelled `url` (created at 0, so that
    /// every configured webhook shows up before its first event).
    pub fn for_url(&self, url: &str) -> WebhookCounters {
        let label = UrlLabel { url: url.to_owned() };
        let dropped = |reason| {
            self.dropped
                .get_or_create(&DropLabels {
                    url: url.to_owned(),
                    reason,
                })
                .clone()
        };
        WebhookCounters {
            posted: self.posted.get_or_create(&label).clone(),
            dropped_buffer: dropped("buffer"),
            dropped_queue: dropped("queue"),
            dropped_shutdown: dropped("shutdown"),
            failures: self.failures.get_or_create(&label).clone(),
            queued: self.queued.get_or_create(&label).clone(),
        }
    }

    /// `tern_webhook_outbox_pending{endpoint, group}`.
    pub fn outbox_pending(&self, endpoint: &str, group: u64) -> Gauge {
        self.outbox_pending
            .get_or_create(&EndpointGroupLabels {
                endpoint: endpoint.to_owned(),
                group,
            })
            .clone()
    }

    /// `tern_webhook_dead_letters_total{endpoint}`.
    pub fn dead_letters(&self, endpoint: &str) -> Counter {
        self.dead_letters
            .get_or_create(&EndpointLabel {
                endpoint: endpoint.to_owned(),
            })
            .clone()
    }

    fn register(&self, r: &mut Registry) {
        r.register(
            "tern_webhook_outbox_pending",
            "Durable events in a group's outbox a webhook endpoint has not taken yet (counted by the group's leader every 5 s)",
            self.outbox_pending.clone(),
        );
        r.register(
            "tern_webhook_dead_letters",
            "Durable events a webhook endpoint did not take within its retry_for, kept as dead letters",
            self.dead_letters.clone(),
        );
        r.register(
            "tern_webhook_events_posted",
            "Events posted to a webhook (in batches it answered with 2xx)",
            self.posted.clone(),
        );
        r.register(
            "tern_webhook_events_dropped",
            "Events a webhook never got, by reason (buffer, queue, shutdown)",
            self.dropped.clone(),
        );
        r.register(
            "tern_webhook_post_failures",
            "POSTs to a webhook that failed (connection error, timeout, non-2xx answer) and are retried",
            self.failures.clone(),
        );
        r.register(
            "tern_webhook_queued_events",
            "Events held in memory for a webhook (waiting, or in the batch being retried)",
            self.queued.clone(),
        );
    }
}

/// Raft metrics per group; all but the leader changes are read at scrape time.
#[derive(Clone, Debug, Default)]
struct RaftGauges {
    term: Family<GroupLabel, Gauge>,
    is_leader: Family<GroupLabel, Gauge>,
    last_log_index: Family<GroupLabel, Gauge>,
    last_applied: Family<GroupLabel, Gauge>,
    purged_index: Family<GroupLabel, Gauge>,
    leader_changes: Family<GroupLabel, Counter>,
}

/// Gauges read at scrape time.
/// Free space of `data_dir`, set once a second by the disk-full guard.
#[derive(Clone, Debug, Default)]
pub struct DiskGauges {
    full: Gauge,
    free_bytes: Gauge,
}

impl DiskGauges {
    pub fn set(&self, full: bool, free_bytes: u64) {
        self.full.set(i64::from(full));
        self.free_bytes.set(i64::try_from(free_bytes).unwrap_or(i64::MAX));
    }
}

#[derive(Clone, Debug, Default)]
struct ScrapeGauges {
    queue_messages: Family<ShardLabel, Gauge>,
    oldest_age: Family<ShardLabel, Gauge>,
    disk_bytes: Family<PartLabel, Gauge>,
}

/// `tern_filter_verdicts_total{filter, verdict}`.
#[derive(Clone, Debug, Default)]
pub struct FilterMetrics(Family<FilterLabels, Counter>);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FilterLabels {
    filter: String,
    verdict: &'static str,
}

impl FilterMetrics {
    fn register(&self, r: &mut Registry) {
        r.register(
            "tern_filter_verdicts",
            "Messages asked of a content filter, by filter name and verdict (accept, reject, tempfail, discard, error, skipped)",
            self.0.clone(),
        );
    }

    pub fn count(&self, filter: &str, verdict: &'static str) {
        self.0
            .get_or_create(&FilterLabels {
                filter: filter.to_owned(),
                verdict,
            })
            .inc();
    }
}

/// The node's metrics and their registry.
pub struct Metrics {
    registry: Registry,
    pub smtp: SmtpMetrics,
    pub queue: QueueMetrics,
    pub delivery: DeliveryMetrics,
    pub storage: StorageMetrics,
    pub webhook: WebhookMetrics,
    pub admin: AdminMetrics,
    pub disk: DiskGauges,
    /// `tern_tls_reload_errors_total`: certificate files that changed but
    /// did not load (the previous certificate stays).
    pub tls_reload_errors: Counter,
    pub peer_refused: PeerRefusals,
    /// `tern_raft_quiet_leading_groups`, `tern_raft_quiet_following_groups`.
    pub quiet: tern_raft::quiet::QuietGauges,
    /// `tern_api_requests_total`, `tern_api_messages_total` (the sending API).
    pub api: ApiMetrics,
    raft: RaftGauges,
    scrape: ScrapeGauges,
    /// `tern_actor_restarts_total{actor}` (see [`Restarts`]).
    pub restarts: Restarts,
    /// `tern_fbl_reports_total{result}`, `tern_suppressions{class}`.
    pub fbl: FblMetrics,
    /// `tern_filter_verdicts_total{filter, verdict}` (content filters).
    pub filters: FilterMetrics,
    /// `tern_dnsbl_*_total`, `tern_greylist_total{outcome}`.
    pub screen: ScreenMetrics,
    /// `tern_config_reload_total{result}`, `tern_config_last_reload_success_timestamp_seconds`.
    pub reload: ReloadMetrics,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let smtp = SmtpMetrics::default();
        let queue = QueueMetrics::default();
        let restarts = Restarts::default();
        let delivery = DeliveryMetrics {
            restarts: restarts.clone(),
            ..DeliveryMetrics::default()
        };
        let storage = StorageMetrics::default();
        let webhook = WebhookMetrics::default();
        let admin = AdminMetrics::default();
        let raft = RaftGauges::default();
        let scrape = ScrapeGauges::default();
        let disk = DiskGauges::default();
        let tls_reload_errors = Counter::default();
        smtp.register(&mut registry);
        queue.register(&mut registry);
        delivery.register(&mut registry);
        storage.register(&mut registry);
        webhook.register(&mut registry);
        admin.register(&mut registry);
        let fbl = FblMetrics::default();
        fbl.register(&mut registry);
        let filters = FilterMetrics::default();
        filters.register(&mut registry);
        let screen = ScreenMetrics::default();
        screen.register(&mut registry);
        let reload = ReloadMetrics::default();
        reload.register(&mut registry);
        let peer_refused = PeerRefusals::default();
        let quiet = tern_raft::quiet::QuietGauges::default();
        let api = ApiMetrics::default();
        api.register(&mut registry);
        let r = &mut registry;
        r.register(
            "tern_actor_restarts",
            "Actors and owned tasks (site actors, queue writers) started again after they died",
            restarts.0.clone(),
        );
        r.register(
            "tern_peer_refused",
            "Peer RPCs (Raft, forwarding, elections, gathering) refused, by reason",
            peer_refused.0.clone(),
        );
        r.register(
            "tern_raft_quiet_leading_groups",
            "Shards led here that are idle and send no heartbeats (this node's liveness vouches for them)",
            quiet.leading.clone(),
        );
        r.register(
            "tern_raft_quiet_following_groups",
            "Shard replicas here that hold their elections on their leader node's liveness",
            quiet.following.clone(),
        );
        r.register("tern_raft_term", "Current Raft term, per group", raft.term.clone());
        r.register(
            "tern_raft_is_leader",
            "1 if this node leads the group, else 0",
            raft.is_leader.clone(),
        );
        r.register(
            "tern_raft_last_log_index",
            "Index of the last entry in this node's log of the group",
            raft.last_log_index.clone(),
        );
        r.register(
            "tern_raft_last_applied",
            "Index of the last entry applied to this node's state machine of the group",
            raft.last_applied.clone(),
        );
        r.register(
            "tern_raft_purged_index",
            "Index of the last entry purged from this node's log of the group (0: none); a replica that needs an older one catches up by snapshot",
            raft.purged_index.clone(),
        );
        r.register(
            "tern_raft_leader_changes",
            "Times this node saw the group's leader change to another node (the first leader included)",
            raft.leader_changes.clone(),
        );
        r.register(
            "tern_queue_messages",
            "Messages in the queue of each shard this node replicates",
            scrape.queue_messages.clone(),
        );
        r.register(
            "tern_queue_oldest_message_age_seconds",
            "Age of the oldest queued message of each shard this node replicates (0 when empty)",
            scrape.oldest_age.clone(),
        );
        r.register(
            "tern_storage_disk_bytes",
            "Bytes allocated on disk under data_dir, by part (sled, wal, snapshots, other)",
            scrape.disk_bytes.clone(),
        );
        r.register(
            "tern_disk_full",
            "1 while the node is disk full (free space below node.min_free_mb, or a write failed for lack of space), else 0",
            disk.full.clone(),
        );
        r.register(
            "tern_tls_reload_errors",
            "Reloads of the SMTP listeners' TLS certificate and key that failed (the previous certificate stays in use)",
            tls_reload_errors.clone(),
        );
        r.register(
            "tern_disk_free_bytes",
            "Bytes available on the file system of data_dir, read once a second",
            disk.free_bytes.clone(),
        );
        Metrics {
            registry,
            reload,
            api,
            fbl,
            filters,
            screen,
            restarts,
            peer_refused,
            quiet,
            disk,
            tls_reload_errors,
            smtp,
            queue,
            delivery,
            storage,
            webhook,
            admin,
            raft,
            scrape,
        }
    }

    /// The counter of leader changes of one group (for its watcher task).
    pub fn leader_changes(&self, group: u64) -> Counter {
        self.raft.leader_changes.get_or_create(&GroupLabel { group }).clone()
    }

    /// Reads the scrape-time values from `groups` and `data_dir`, then
    /// returns every metric in OpenMetrics text. Blocking (sled and file
    /// system reads): call it off the async workers.
    pub fn encode(&self, node: u64, groups: &impl GroupGauges, data_dir: &Path) -> String {
        self.collect(node, groups, data_dir);
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        out
    }

    fn collect(&self, node: u64, groups: &impl GroupGauges, data_dir: &Path) {
        let now = chrono::Utc::now().timestamp();
        groups.sample(node, &mut |g| {
            let label = GroupLabel { group: g.group };
            self.raft.term.get_or_create(&label).set(g.term as i64);
            self.raft.is_leader.get_or_create(&label).set(i64::from(g.leading));
            self.raft
                .last_log_index
                .get_or_create(&label)
                .set(g.last_log_index as i64);
            self.raft.last_applied.get_or_create(&label).set(g.last_applied as i64);
            self.raft.purged_index.get_or_create(&label).set(g.purged_index as i64);
            let Some((messages, oldest_received_at)) = g.queue else {
                return;
            };
            let shard = ShardLabel { shard: g.group };
            self.scrape.queue_messages.get_or_create(&shard).set(messages as i64);
            let oldest = oldest_received_at.map_or(0, |at| (now - at).max(0));
            self.scrape.oldest_age.get_or_create(&shard).set(oldest);
        });
        for (part, bytes) in disk_usage(data_dir) {
            self.scrape
                .disk_bytes
                .get_or_create(&PartLabel { part })
                .set(bytes as i64);
        }
    }
}

/// OpenMetrics text (as [`Metrics::encode`] makes it) in the classic
/// Prometheus text format 0.0.4, for scrapers that do not ask for
/// OpenMetrics: a counter's family is named with its `_total` suffix, and
/// there is no `# EOF` or `# UNIT` line. Everything else is the same.
pub fn prometheus_text(openmetrics: &str) -> String {
    let counters: HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 64 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "].into_iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let name = rest.split(' ').next()?;
            counters.contains(name).then(|| (p, name, &rest[name.len()..]))
        });
        match meta {
            Some((prefix, name, rest)) => {
                out.push_str(prefix);
                out.push_str(name);
                out.push_str("_total");
                out.push_str(rest);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// Bytes allocated under `data_dir` by part: its top-level `sled`, `wal`
/// and `snapshots` directories, and everything else.
fn disk_usage(data_dir: &Path) -> [(&'static str, u64); 4] {
    let mut parts = [("sled", 0), ("wal", 0), ("snapshots", 0), ("other", 0)];
    let Ok(entries) = std::fs::read_dir(data_dir) else {
        return parts;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let i = parts
            .iter()
            .position(|(p, _)| name.to_str() == Some(*p))
            .unwrap_or(parts.len() - 1);
        parts[i].1 += tree_bytes(&e.path(), 0);
    }
    parts
}

/// Allocated bytes of a file, or of every file below a directory.
fn tree_bytes(path: &Path, depth: usize) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.blocks() * 512;
    }
    if depth > 8 {
        return 0;
    }
    std::fs::read_dir(path)
        .map(|entries| entries.flatten().map(|e| tree_bytes(&e.path(), depth + 1)).sum())
        .unwrap_or(0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn encoded(m: &Metrics) -> String {
        let dir = tempfile::tempdir().unwrap();
        m.encode(1, &(), dir.path())
    }

    #[test]
    fn counters_show_up_with_their_labels() {
        let m = Metrics::new();
        let _open = m.smtp.session_started();
        m.smtp.reply(220);
        m.smtp.reply(354);
        m.smtp.transaction_reply(250);
        m.smtp.transaction_reply(451);
        m.smtp.message_received(1000);
        m.queue.recipient(Outcome::Delivered, "example.test");
        m.queue.recipient(Outcome::Expired, "example.test");
        m.queue.dsn("failure");
        m.delivery.connection(false);
        m.delivery.attempt(0.02, true);
        m.storage.commit(0.001, 3);
        let hook = m.webhook.for_url("https://hooks.example.test/tern");
        hook.posted.inc_by(7);
        hook.dropped_queue.inc();
        hook.failures.inc();
        let text = encoded(&m);
        for line in [
            "tern_smtp_sessions_open 1",
            "tern_smtp_sessions_total 1",
            "tern_smtp_replies_total{class=\"2xx\"} 1",
            "tern_smtp_replies_total{class=\"3xx\"} 1",
            "tern_smtp_transaction_replies_total{class=\"2xx\"} 1",
            "tern_smtp_transaction_replies_total{class=\"4xx\"} 1",
            "tern_smtp_transaction_replies_total{class=\"5xx\"} 0",
            "tern_smtp_messages_received_total 1",
            "tern_smtp_received_bytes_total 1000",
            "tern_queue_recipients_total{outcome=\"delivered\",destination=\"example.test\"} 1",
            "tern_queue_recipients_total{outcome=\"expired\",destination=\"example.test\"} 1",
            "tern_dsn_generated_total{kind=\"failure\"} 1",
            "tern_delivery_connections_total{tls=\"no\"} 1",
            "tern_delivery_connections_total{tls=\"yes\"} 0",
            "tern_delivery_attempt_duration_seconds_count{result=\"ok\"} 1",
            "tern_storage_fsync_duration_seconds_count 1",
            "tern_storage_commit_batch_size_sum 3.0",
            "tern_webhook_events_posted_total{url=\"https://hooks.example.test/tern\"} 7",
            "tern_webhook_events_dropped_total{url=\"https://hooks.example.test/tern\",reason=\"queue\"} 1",
            "tern_webhook_events_dropped_total{url=\"https://hooks.example.test/tern\",reason=\"buffer\"} 0",
            "tern_webhook_post_failures_total{url=\"https://hooks.example.test/tern\"} 1",
            "tern_webhook_queued_events{url=\"https://hooks.example.test/tern\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
        let classic = prometheus_text(&text);
        for line in [
            "# TYPE tern_smtp_sessions_total counter",
            "# HELP tern_smtp_sessions_total SMTP connections accepted.",
            "tern_smtp_sessions_total 1",
            "# TYPE tern_smtp_sessions_open gauge",
            "# TYPE tern_storage_fsync_duration_seconds histogram",
        ] {
            assert!(classic.lines().any(|l| l == line), "missing {line:?} in\n{classic}");
        }
        assert!(!classic.contains("# EOF") && !classic.contains("# TYPE tern_smtp_sessions counter"));
        drop(_open);
        assert!(encoded(&m).lines().any(|l| l == "tern_smtp_sessions_open 0"));
    }

    #[test]
    fn destinations_are_capped() {
        let q = QueueMetrics::default();
        for i in 0..MAX_DESTINATIONS {
            assert_eq!(q.destination(&format!("d{i}.test")), format!("d{i}.test"));
        }
        assert_eq!(q.destination("late.test"), "other");
        assert_eq!(q.destination("d7.test"), "d7.test");
        assert_eq!(q.destination("bad\"name"), "other");
        assert_eq!(q.destination(""), "other");
    }

    #[test]
    fn disk_usage_by_part() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("wal")).unwrap();
        std::fs::write(dir.path().join("wal/1.seg"), vec![1u8; 10_000]).unwrap();
        std::fs::write(dir.path().join("stray"), vec![1u8; 5000]).unwrap();
        let usage = disk_usage(dir.path());
        assert!(usage[1].1 >= 10_000, "{usage:?}");
        assert_eq!(usage[0].1, 0);
        assert!(usage[3].1 >= 4096, "{usage:?}");
    }
}

// ---- Supervision: actors and owned tasks started again after they died ----

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActorLabel {
    actor: &'static str,
}

/// `tern_actor_restarts_total{actor}`: a site actor or a queue writer that
/// died (a panic, an unexpected stop) and was started again.
#[derive(Clone, Debug, Default)]
pub struct Restarts(Family<ActorLabel, Counter>);

impl Restarts {
    pub fn inc(&self, actor: &'static str) {
        self.0.get_or_create(&ActorLabel { actor }).inc();
    }
}

/// Counts the suppression list's entries in force by class (given once the
/// control group is open; the metrics do not read it themselves).
pub type SuppressionCounter = Box<dyn Fn() -> std::collections::BTreeMap<String, i64> + Send + Sync>;

/// `tern_fbl_reports_total{result}` and the `tern_suppressions{class}` gauge.
#[derive(Clone, Default)]
pub struct FblMetrics {
    reports: Family<ResultLabel, Counter>,
    counter: Arc<std::sync::OnceLock<SuppressionCounter>>,
}

impl std::fmt::Debug for FblMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FblMetrics").finish_non_exhaustive()
    }
}

impl FblMetrics {
    /// One feedback report had `result`.
    pub fn count(&self, result: &'static str) {
        self.reports.get_or_create(&ResultLabel { result }).inc();
    }

    /// Gives the suppression gauge its way to count the list.
    pub fn set_counter(&self, counter: SuppressionCounter) {
        let _ = self.counter.set(counter);
    }

    pub fn register(&self, r: &mut Registry) {
        for result in ["complaint", "malformed", "no_recipient", "untrusted", "failed"] {
            let _ = self.reports.get_or_create(&ResultLabel { result });
        }
        r.register(
            "tern_fbl_reports",
            "Feedback-loop reports received, by result (complaint, malformed, no_recipient, untrusted: reporter not in fbl.reporters, failed: not recorded, answered 451)",
            self.reports.clone(),
        );
        r.register_collector(Box::new(SuppressionGauge {
            counter: Arc::clone(&self.counter),
            cache: std::sync::Mutex::new(None),
        }));
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SuppressionClassLabel {
    class: String,
}

/// How long one count of a long suppression list serves scrapes: counting
/// walks the whole list, which may hold millions of entries.
const SUPPRESSION_COUNT_TTL: std::time::Duration = std::time::Duration::from_secs(60);
/// A count that took less than this is not kept (a short list is counted
/// at every scrape, exactly).
const SUPPRESSION_COUNT_CHEAP: std::time::Duration = std::time::Duration::from_millis(50);

/// Counts kept from a long count: when, and the counts.
type CountCache = Option<(std::time::Instant, std::collections::BTreeMap<String, i64>)>;

/// Entries of the suppression list in force, by class, counted from this
/// node's replica of the control group (a long list at most once a minute).
struct SuppressionGauge {
    counter: Arc<std::sync::OnceLock<SuppressionCounter>>,
    cache: std::sync::Mutex<CountCache>,
}

impl std::fmt::Debug for SuppressionGauge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SuppressionGauge").finish_non_exhaustive()
    }
}

impl prometheus_client::collector::Collector for SuppressionGauge {
    fn encode(&self, mut encoder: prometheus_client::encoding::DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric as _;
        let Some(counter) = self.counter.get() else {
            return Ok(());
        };
        let counts = {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            match cache.as_ref() {
                Some((at, counts)) if at.elapsed() < SUPPRESSION_COUNT_TTL => counts.clone(),
                _ => {
                    let started = std::time::Instant::now();
                    let counts = counter();
                    *cache = (started.elapsed() >= SUPPRESSION_COUNT_CHEAP).then(|| (started, counts.clone()));
                    counts
                }
            }
        };
        let family = Family::<SuppressionClassLabel, Gauge>::default();
        for (class, n) in counts {
            family.get_or_create(&SuppressionClassLabel { class }).set(n);
        }
        let metric = encoder.encode_descriptor(
            "tern_suppressions",
            "Entries of the suppression list in force, by class, in this node's replica of the control group (counted at most once a minute)",
            None,
            family.metric_type(),
        )?;
        family.encode(metric)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApiRequestLabels {
    endpoint: String,
    status: u16,
}

/// The sending API (`/api/v1/`): calls by route and answer, and messages queued.
#[derive(Clone, Debug, Default)]
pub struct ApiMetrics {
    requests: Family<ApiRequestLabels, Counter>,
    messages: Counter,
}

impl ApiMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "tern_api_requests",
            "Calls of the sending API, by route template (e.g. /api/v1/messages/{id}) and HTTP status",
            self.requests.clone(),
        );
        registry.register(
            "tern_api_messages",
            "Messages queued through the sending API (an idempotent replay counts none)",
            self.messages.clone(),
        );
    }

    /// One answered call; `endpoint` is the route template, never the raw path.
    pub fn request(&self, endpoint: &str, status: u16) {
        self.requests
            .get_or_create(&ApiRequestLabels {
                endpoint: endpoint.to_owned(),
                status,
            })
            .inc();
    }

    pub fn messages(&self, n: u64) {
        self.messages.inc_by(n);
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ZoneLabel {
    zone: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

/// RCPT-time screening (`smtp::screen`): DNS block lists and greylisting.
#[derive(Clone, Debug, Default)]
pub struct ScreenMetrics {
    dnsbl_lookups: Family<ResultLabel, Counter>,
    dnsbl_listed: Family<ZoneLabel, Counter>,
    dnsbl_rejections: Family<ZoneLabel, Counter>,
    greylist: Family<OutcomeLabel, Counter>,
}

impl ScreenMetrics {
    /// One client check (clean, listed, cached) or one zone that failed or timed out.
    pub fn dnsbl_lookup(&self, result: &'static str) {
        self.dnsbl_lookups.get_or_create(&ResultLabel { result }).inc();
    }

    /// `zone` listed a client.
    pub fn dnsbl_listed(&self, zone: &str) {
        self.dnsbl_listed
            .get_or_create(&ZoneLabel { zone: zone.to_owned() })
            .inc();
    }

    /// A recipient was refused with `zone` among the lists naming the client.
    pub fn dnsbl_rejection(&self, zone: &str) {
        self.dnsbl_rejections
            .get_or_create(&ZoneLabel { zone: zone.to_owned() })
            .inc();
    }

    /// One greylisting decision (new, early, limited, passed, known, unavailable) or a dropped write.
    pub fn greylist(&self, outcome: &'static str) {
        self.greylist.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    pub fn register(&self, r: &mut Registry) {
        r.register(
            "tern_dnsbl_lookups",
            "DNS block list checks of client addresses, by result (clean, listed, cached; failed and timeout count zones that did not answer: the check fails open)",
            self.dnsbl_lookups.clone(),
        );
        r.register(
            "tern_dnsbl_listed",
            "Client addresses found on a DNS block list, by zone",
            self.dnsbl_listed.clone(),
        );
        r.register(
            "tern_dnsbl_rejections",
            "Recipients refused (554 5.7.1) because the client is on DNS block lists, by zone",
            self.dnsbl_rejections.clone(),
        );
        r.register(
            "tern_greylist",
            "Greylisting decisions by outcome (new, early, limited: 451 4.7.1; passed, known, unavailable: accepted; dropped: a triplet write that did not fit the queue)",
            self.greylist.clone(),
        );
    }
}
