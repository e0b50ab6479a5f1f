//! Tern's configuration: TOML parsed into a raw form (serde,
//! `deny_unknown_fields`, every default written once here), then validated
//! into [`Config`]. Plain data: the node reads key files, binds listeners and
//! starts clients from it; `ternctl` uses it to check what it prints.
//!
//! Every key is documented in docs/configuration.md.
//!
//! # Layout
//! - this file: [`Config`] and its parts, [`ConfigError`], [`parse_duration`].
//! - [`dkim`]: `[[dkim]]` entries (what to sign, with which key file).
//! - [`tls_policy`]: `[[tls_policy]]`, outbound TLS levels per domain.
//! - [`backoff`]: `[[backoff]]`, automatic actions from remote replies, and the shipped defaults.
//! - [`egress`]: `[[source]]`, `[[pool]]`, `[[pool_rule]]`: egress addresses, pools, warm-up.
//! - [`shaping`]: `[[shaping]]`, delivery limits per destination.
//! - [`owned`]: the sender addresses an SMTP AUTH user may use (`[auth] senders`).
//! - [`secret`]: argon2 password hashes (users file, `[[admin_token]]`).
//! - [`keygen`]: new DKIM key pairs (`ternctl dkim generate`).
//! - [`fbl`]: `[fbl]`, the addresses that receive feedback-loop reports.
//! - [`api`]: `[api]`, the sending API's limits.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

pub mod api;
pub mod arc;
pub mod backoff;
pub mod bounce;
pub mod dane;
pub mod dkim;
pub mod dnsbl;
pub mod egress;
pub mod fbl;
pub mod filter;
pub mod keygen;
pub mod mta_sts;
pub mod owned;
pub mod reports;
pub mod secret;
pub mod shaping;
pub mod tls_policy;
pub use api::ApiConfig;
pub use arc::{ArcConfig, ArcSealScope};
pub use backoff::{BackoffAction, BackoffRule, BackoffScope, CodeMatch};
pub use bounce::{ClassRule, SuppressionConfig, SuppressionScope};
pub use dane::DaneConfig;
pub use dkim::{Canonicalization, DkimAlgorithm, DkimKeyConfig, RSA_MAX_BITS, RSA_MIN_BITS};
pub use dnsbl::{DnsblConfig, GreylistConfig};
pub use fbl::{FblConfig, FblScope};
pub use filter::{ApplyTo, FilterConfig, FilterKind, OnError};
pub use mta_sts::MtaStsConfig;
pub use owned::{NotOwnable, Owned};
pub use reports::{DmarcReportsConfig, TlsRptConfig};
pub use secret::hash_password;
pub use tls_policy::{TlsLevel, TlsPolicies, TlsPolicyEntry};

/// Errors found while reading or validating configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Parse(String),
    #[error("invalid value for {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    node: RawNode,
    #[serde(default)]
    listen: RawListen,
    #[serde(default)]
    tls: RawTls,
    #[serde(default)]
    cluster: RawCluster,
    #[serde(default)]
    policy: RawPolicy,
    #[serde(default)]
    smtp: RawSmtp,
    #[serde(default)]
    dns: RawDns,
    #[serde(default)]
    delivery: RawDelivery,
    #[serde(default)]
    local: RawLocal,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    auth: RawAuth,
    #[serde(default)]
    inbound: RawInbound,
    #[serde(default)]
    route: Vec<RawRoute>,
    #[serde(default)]
    webhook: Vec<RawWebhook>,
    #[serde(default)]
    dkim: Vec<dkim::RawDkim>,
    #[serde(default)]
    tls_policy: Vec<tls_policy::RawTlsPolicy>,
    #[serde(default)]
    backoff: Vec<backoff::RawBackoff>,
    #[serde(default)]
    source: Vec<egress::RawSource>,
    #[serde(default)]
    pool: Vec<egress::RawPool>,
    #[serde(default)]
    pool_rule: Vec<egress::RawPoolRule>,
    #[serde(default)]
    admin_token: Vec<RawAdminToken>,
    #[serde(default)]
    fbl: fbl::RawFbl,
    #[serde(default)]
    api: api::RawApi,
    #[serde(default)]
    mta_sts: mta_sts::RawMtaSts,
    #[serde(default)]
    dane: dane::RawDane,
    #[serde(default)]
    tls_rpt: reports::RawTlsRpt,
    #[serde(default)]
    dmarc_reports: reports::RawDmarcReports,
    #[serde(default)]
    filter: Vec<filter::RawFilter>,
    #[serde(default)]
    dnsbl: dnsbl::RawDnsbl,
    #[serde(default)]
    greylist: dnsbl::RawGreylist,
    #[serde(default)]
    arc: arc::RawArc,
    #[serde(default)]
    bounce_class: Vec<bounce::RawBounceClass>,
    #[serde(default)]
    suppression: bounce::RawSuppression,
    #[serde(default)]
    shaping: Vec<shaping::RawShaping>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdminToken {
    name: String,
    role: String,
    hash: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebhook {
    url: String,
    events: Option<Vec<String>>,
    batch_size: Option<usize>,
    flush_interval: Option<String>,
    max_queue: Option<usize>,
    timeout: Option<String>,
    headers: Option<std::collections::BTreeMap<String, String>>,
    name: Option<String>,
    secret: Option<String>,
    tenant: Option<String>,
    retry_for: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    users_file: Option<PathBuf>,
    senders: Option<std::collections::BTreeMap<String, Vec<String>>>,
    max_failures: Option<u32>,
    failure_window: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDns {
    nameservers: Option<Vec<String>>,
    timeout_secs: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDelivery {
    smtp_port: Option<u16>,
    retry_schedule: Option<Vec<String>>,
    max_age: Option<String>,
    delay_notice_after: Option<String>,
    max_connections_per_site: Option<usize>,
    messages_per_connection: Option<usize>,
    connection_idle_secs: Option<u64>,
    require_tls_domains: Option<Vec<String>>,
    tls_ca_file: Option<PathBuf>,
    helo_name: Option<String>,
    connect_timeout_secs: Option<u64>,
    scheduler_tick_ms: Option<u64>,
    backoff_defaults: Option<bool>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLocal {
    lmtp: Option<String>,
    maildir: Option<String>,
    verify_recipients: Option<bool>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawInbound {
    enabled: Option<bool>,
    dmarc_policy: Option<String>,
    spf_fail: Option<String>,
    timeout_secs: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    domain: String,
    to: OneOrMany,
    protocol: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// `[[route]]`: a domain (or `*`) pinned to next hops, bypassing MX lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Lowercase domain, or `*` for every domain without a more specific route.
    pub domain: String,
    /// `host:port` next hops, tried in order.
    pub to: Vec<String>,
    /// Speak LMTP instead of SMTP to these hops.
    pub lmtp: bool,
}

/// `[[webhook]]`: an HTTP endpoint that gets event log lines as JSON arrays.
#[derive(Debug, Clone)]
pub struct Webhook {
    /// `http://` or `https://` URL the batches are POSTed to.
    pub url: http::Uri,
    /// Event types to post (names from docs/events.md); every type by default.
    pub events: Vec<String>,
    /// Most events in one POST.
    pub batch_size: usize,
    /// Longest time an event waits for its batch to fill.
    pub flush_interval: Duration,
    /// Events kept in memory (waiting or being retried); the oldest go first.
    pub max_queue: usize,
    /// Limit for one POST, from connecting to the response.
    pub timeout: Duration,
    /// Extra request headers (e.g. Authorization); values are marked
    /// sensitive, so that Debug output does not show them.
    pub headers: http::HeaderMap,
    /// The endpoint's name in the outbox (cursor `oc/<name>`, dead letters,
    /// `ternctl webhook status`); default derived from the URL.
    pub name: String,
    /// `whsec_<base64>`: the key POSTs are signed with (Standard Webhooks);
    /// `None`: unsigned.
    pub secret: Option<WebhookSecret>,
    /// Only this tenant's message events (API messages of its keys); `None`: all.
    pub tenant: Option<String>,
    /// How long a message event is retried before it is dead-lettered.
    pub retry_for: Duration,
}

/// A webhook signing key (the bytes after `whsec_`, base64-decoded); Debug
/// does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookSecret(pub Vec<u8>);

impl std::fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookSecret(..)")
    }
}

/// The default name of a webhook: its URL without scheme and query, with
/// characters other than `[A-Za-z0-9._-]` as `_` (stable while the URL is).
pub fn webhook_name_of(url: &http::Uri) -> String {
    let text = format!("{}{}", url.authority().map_or("", |a| a.as_str()), url.path());
    let mut name: String = text
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    name.truncate(64);
    name
}

fn is_webhook_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Where mail for `local_domains` goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalDelivery {
    /// An LMTP server: `host:port`, or a unix socket path (`unix:/path` or `/path`).
    Lmtp(String),
    /// A Maildir per user; `{domain}` and `{user}` are replaced.
    Maildir(String),
    /// No local delivery configured: local recipients are deferred.
    None,
}

/// `[cluster] tls_cert, tls_key, tls_ca, tls_server_name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterTlsFiles {
    /// This node's certificate chain (PEM), used as server and as client.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The cluster CA (PEM): peers and ternctl must present a certificate it signed.
    pub ca: PathBuf,
    /// The DNS name every node certificate carries (nodes are dialled by address).
    pub server_name: String,
}

/// One `[[admin_token]]`: a bearer token for `ternctl` (docs/security.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminToken {
    /// Who the token stands for in audit events and refusals (unique).
    pub name: String,
    pub role: tern_pki::Role,
    /// An argon2 PHC string of the secret (`ternd hash-password`).
    pub hash: String,
}

/// `[auth]`: SMTP AUTH on the submission listeners.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpAuthConfig {
    /// The users file (`username:argon2-hash[:addresses]`), re-read when it changes.
    pub users_file: Option<PathBuf>,
    /// Extra sender addresses per user, keyed by lower-cased user name.
    pub senders: std::collections::BTreeMap<String, Vec<Owned>>,
    /// Failures per client IP or user name within `failure_window` before `454`.
    pub max_failures: u32,
    pub failure_window: Duration,
}

/// `[inbound]`: authentication checks (SPF, DKIM, ARC, DMARC, iprev) of mail
/// from clients that are neither authenticated nor in `relay_networks`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundConfig {
    pub enabled: bool,
    pub dmarc_policy: DmarcPolicyMode,
    pub spf_fail: SpfFailAction,
    /// Bound on all checks of one message; running out counts as a DNS temperror.
    pub timeout: Duration,
}

/// `inbound.dmarc_policy`: whether a failing message gets the policy its
/// domain publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmarcPolicyMode {
    /// p=reject refuses, p=quarantine marks the message.
    Enforce,
    /// Results are only recorded in Authentication-Results.
    Monitor,
}

/// `inbound.spf_fail`: what an SPF `fail` (`-all`) does by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpfFailAction {
    /// Recorded only; DMARC decides.
    Header,
    /// `550 5.7.23`.
    Reject,
}

/// `[smtp]` resource limits against clients that hold sessions, slots or
/// memory (docs/security.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpLimits {
    /// Concurrent sessions per client address across all SMTP listeners.
    pub max_connections_per_ip: usize,
    /// New connections per client address: `count` per `per`; `None`: unlimited.
    pub max_connection_rate_per_ip: Option<(u32, Duration)>,
    /// Whole-session deadline.
    pub max_session: Duration,
    /// Bytes per second a client must sustain during DATA/BDAT (0: off).
    pub min_data_rate: u64,
    /// Bound on the STARTTLS or implicit TLS handshake.
    pub tls_handshake: Duration,
    /// NOOP, RSET, VRFY, HELP, HELO and EHLO allowed between two messages.
    pub max_junk_commands: u32,
    /// Node-wide bytes of message content sessions may hold in memory.
    pub memory_budget_bytes: u64,
    /// Trusted proxies whose connections must start with a PROXY header.
    pub proxy_protocol_from: Vec<IpNet>,
}

/// Largest accepted `policy.max_message_size` (1 GiB).
pub const MAX_MESSAGE_SIZE_BOUND: u64 = 1 << 30;
/// Largest accepted `policy.max_recipients`.
pub const MAX_RECIPIENTS_BOUND: usize = 100_000;

/// `value` for `key`, or an error naming the key when outside `range`.
fn within<T>(key: &'static str, value: T, range: std::ops::RangeInclusive<T>) -> Result<T, ConfigError>
where
    T: PartialOrd + std::fmt::Display,
{
    if range.contains(&value) {
        Ok(value)
    } else {
        Err(ConfigError::Invalid {
            key,
            reason: format!("{value} is outside {}..={}", range.start(), range.end()),
        })
    }
}

/// A rate that does not parse (`smtp.max_connection_rate_per_ip`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RateError {
    #[error("{0:?} is not a rate like 60/min (a count per s, min or h)")]
    NotARate(String),
    #[error("{0:?}: the count must be 1 to 1000000")]
    CountOutOfRange(String),
}

/// Parses a rate like `60/min`: a count of 1 to 1000000 per `s`, `min` or `h`.
pub fn parse_rate(s: &str) -> Result<(u32, Duration), RateError> {
    let bad = || RateError::NotARate(s.to_owned());
    let (count, unit) = s.trim().split_once('/').ok_or_else(bad)?;
    let count: u32 = count.trim().parse().map_err(|_| bad())?;
    let per = match unit.trim() {
        "s" => Duration::from_secs(1),
        "m" | "min" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        _ => return Err(bad()),
    };
    if !(1..=1_000_000).contains(&count) {
        return Err(RateError::CountOutOfRange(s.to_owned()));
    }
    Ok((count, per))
}

/// Validates the `[smtp]` resource limits; `max_message_size` must fit the memory budget.
fn smtp_limits(raw: &RawSmtp, max_message_size: u64) -> Result<SmtpLimits, ConfigError> {
    let max_connections_per_ip = raw.max_connections_per_ip.unwrap_or(20);
    if max_connections_per_ip == 0 {
        return Err(ConfigError::Invalid {
            key: "smtp.max_connections_per_ip",
            reason: "must be at least 1 (0 would refuse every client)".into(),
        });
    }
    let max_connections_per_ip = within("smtp.max_connections_per_ip", max_connections_per_ip, 1..=100_000)?;
    let max_session = within(
        "smtp.max_session_secs",
        raw.max_session_secs.unwrap_or(600),
        10..=86_400,
    )?;
    let min_data_rate = within("smtp.min_data_rate", raw.min_data_rate.unwrap_or(1024), 0..=1 << 30)?;
    let tls_handshake = within("smtp.tls_handshake_secs", raw.tls_handshake_secs.unwrap_or(10), 1..=300)?;
    let max_junk_commands = within(
        "smtp.max_junk_commands",
        raw.max_junk_commands.unwrap_or(100),
        1..=100_000,
    )?;
    let memory_budget_mb = within(
        "smtp.memory_budget_mb",
        raw.memory_budget_mb.unwrap_or(512),
        1..=1 << 20,
    )?;
    let memory_budget_bytes = memory_budget_mb << 20;
    if memory_budget_bytes < max_message_size {
        return Err(ConfigError::Invalid {
            key: "smtp.memory_budget_mb",
            reason: format!(
                "{memory_budget_mb} MiB cannot hold one message of policy.max_message_size ({max_message_size} bytes)"
            ),
        });
    }
    let max_connection_rate_per_ip = raw
        .max_connection_rate_per_ip
        .as_deref()
        .map(parse_rate)
        .transpose()
        .map_err(invalid("smtp.max_connection_rate_per_ip"))?;
    Ok(SmtpLimits {
        max_connections_per_ip,
        max_connection_rate_per_ip,
        max_session: Duration::from_secs(max_session),
        min_data_rate,
        tls_handshake: Duration::from_secs(tls_handshake),
        max_junk_commands,
        memory_budget_bytes,
        proxy_protocol_from: raw.proxy_protocol_from.clone().unwrap_or_default(),
    })
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// A duration that does not parse; the message names what is expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DurationError {
    #[error("{0:?} is not a duration like 30s, 5m, 2h or 5d")]
    NotADuration(String),
    #[error("{0:?}: unknown unit (use s, m, h or d)")]
    UnknownUnit(String),
}

/// Parses `30s`, `5m`, `2h`, `5d` (or a bare number of seconds).
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| DurationError::NotADuration(s.to_owned()))?;
    let mult = match unit.trim() {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(DurationError::UnknownUnit(s.to_owned())),
    };
    Ok(Duration::from_secs(n.saturating_mul(mult)))
}

/// An error for `key` whose reason is `e`'s message.
fn invalid<E: std::fmt::Display>(key: &'static str) -> impl Fn(E) -> ConfigError {
    move |e| ConfigError::Invalid {
        key,
        reason: e.to_string(),
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawNode {
    id: Option<u64>,
    hostname: Option<String>,
    data_dir: Option<PathBuf>,
    state_cache_mb: Option<u64>,
    worker_threads: Option<usize>,
    log_segment_mb: Option<u64>,
    log_keep_mb: Option<u64>,
    min_free_mb: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawListen {
    smtp: Option<Vec<SocketAddr>>,
    submission: Option<Vec<SocketAddr>>,
    submissions: Option<Vec<SocketAddr>>,
    grpc: Option<SocketAddr>,
    http: Option<SocketAddr>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    bootstrap: Option<bool>,
    shards: Option<u32>,
    replicas: Option<u32>,
    advertise_grpc: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_ca: Option<PathBuf>,
    tls_server_name: Option<String>,
    insecure: Option<bool>,
    peer_addresses: Option<std::collections::BTreeMap<String, String>>,
    dead_node_after_secs: Option<u64>,
    handover_timeout_secs: Option<u64>,
    quiesce_idle_groups: Option<bool>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    relay_networks: Option<Vec<IpNet>>,
    local_domains: Option<Vec<String>>,
    relay_domains: Option<Vec<String>>,
    max_message_size: Option<u64>,
    max_recipients: Option<usize>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSmtp {
    max_connections: Option<usize>,
    command_timeout_secs: Option<u64>,
    data_timeout_secs: Option<u64>,
    max_errors: Option<u32>,
    max_connections_per_ip: Option<usize>,
    max_connection_rate_per_ip: Option<String>,
    max_session_secs: Option<u64>,
    min_data_rate: Option<u64>,
    tls_handshake_secs: Option<u64>,
    max_junk_commands: Option<u32>,
    memory_budget_mb: Option<u64>,
    proxy_protocol_from: Option<Vec<IpNet>>,
}

/// Validated node configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Unique, never reused node id (Raft node id).
    pub node_id: u64,
    /// Our name in the SMTP banner, EHLO and Received headers.
    pub hostname: String,
    pub data_dir: PathBuf,
    /// Memory for the cache of the queue-state database (sled), bytes.
    pub state_cache_bytes: u64,
    /// Threads of the async runtime (SMTP, Raft, delivery); None: one per CPU.
    pub worker_threads: Option<usize>,
    /// Size of one write-ahead log segment file, bytes.
    pub log_segment_bytes: u64,
    /// Write-ahead log kept behind the newest entries before Raft logs are
    /// purged to free it, bytes (a whole number of segments, at least one).
    pub log_keep_bytes: u64,
    /// Below this much free space on `data_dir`'s file system the node is
    /// "disk full" (new mail gets 452 4.3.1, it leads no shard), bytes.
    pub min_free_bytes: u64,
    pub listen_smtp: Vec<SocketAddr>,
    /// Submission with STARTTLS (port 587): AUTH required before MAIL.
    pub listen_submission: Vec<SocketAddr>,
    /// Submission with implicit TLS (port 465).
    pub listen_submissions: Vec<SocketAddr>,
    pub smtp_auth: SmtpAuthConfig,
    pub listen_grpc: SocketAddr,
    pub listen_http: SocketAddr,
    /// Address other nodes use to reach our gRPC port (defaults to listen.grpc).
    pub advertise_grpc: String,
    /// Mutual TLS for cluster gRPC (Raft and admin), if configured.
    pub cluster_tls: Option<ClusterTlsFiles>,
    /// `[cluster] insecure`: plaintext gRPC on a non-loopback address was
    /// asked for explicitly (warned about at every start).
    pub cluster_insecure: bool,
    /// How this node dials given peers, overriding their advertised address
    /// (split-horizon networks; the failover harness puts proxies here).
    pub peer_addresses: std::collections::BTreeMap<u64, String>,
    /// A member unreachable this long has its shard replicas moved to live nodes.
    pub dead_node_after: Duration,
    /// `[cluster] handover_timeout_secs`: longest wait of a planned hand-over
    /// for the shard's in-flight delivery outcomes.
    pub handover_timeout: Duration,
    /// `[cluster] quiesce_idle_groups`: an idle shard's leader stops its
    /// heartbeats while its node vouches for it once per peer.
    pub quiesce_idle_groups: bool,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Initialise a new cluster on first start if this node has no state.
    pub bootstrap: bool,
    /// Number of shard groups (fixed at bootstrap).
    pub shards: u32,
    /// Replicas per shard (capped by the number of nodes).
    pub replicas: u32,
    pub relay_networks: Vec<IpNet>,
    pub local_domains: Vec<String>,
    pub relay_domains: Vec<String>,
    pub max_message_size: u64,
    pub max_recipients: usize,
    pub max_connections: usize,
    pub command_timeout: Duration,
    pub data_timeout: Duration,
    pub max_errors: u32,
    /// `[smtp]` resource limits (docs/security.md, "SMTP resource limits").
    pub smtp_limits: SmtpLimits,
    /// `[dns] nameservers` as socket addresses; empty means the system resolver.
    pub dns_nameservers: Vec<SocketAddr>,
    pub dns_timeout: Duration,
    pub routes: Vec<Route>,
    pub smtp_port: u16,
    pub retry_schedule: Vec<Duration>,
    pub max_age: Duration,
    pub delay_notice_after: Option<Duration>,
    pub max_connections_per_site: usize,
    pub messages_per_connection: usize,
    /// How long a delivery connection waits for the next message once its
    /// site's queue is empty (0: close at once).
    pub connection_idle: Duration,
    /// `[[tls_policy]]` and `[delivery] require_tls_domains`: outbound TLS
    /// level per recipient domain.
    pub tls_policies: TlsPolicies,
    /// `[[backoff]]` rules, then the shipped defaults unless
    /// `[delivery] backoff_defaults = false`: first match wins.
    pub backoff: Vec<BackoffRule>,
    /// `[delivery] tls_ca_file`: PEM roots trusted for `verify` besides the
    /// system's.
    pub tls_ca_file: Option<PathBuf>,
    pub helo_name: String,
    /// `[[source]]`, `[[pool]]`, `[[pool_rule]]`: egress addresses and warm-up.
    pub egress: egress::Egress,
    pub connect_timeout: Duration,
    pub scheduler_tick: Duration,
    pub local_delivery: LocalDelivery,
    pub verify_recipients: bool,
    pub log_format: LogFormat,
    pub webhooks: Vec<Webhook>,
    /// `[[dkim]]` signing keys (loaded from their files at start).
    pub dkim: Vec<DkimKeyConfig>,
    pub inbound: InboundConfig,
    /// `[[admin_token]]`: operator bearer tokens.
    pub admin_tokens: Vec<AdminToken>,
    /// `[fbl]`: feedback-loop report addresses and what a complaint does.
    pub fbl: FblConfig,
    /// `[api]`: the sending API (`/api/v1/`) on the HTTP listener.
    pub api: ApiConfig,
    /// `[mta_sts]`: MTA-STS policies of recipient domains.
    pub mta_sts: MtaStsConfig,
    /// `[dane]`: DANE (TLSA) for MX hosts.
    pub dane: DaneConfig,
    /// `[tls_rpt]`: TLS-RPT recording and reports.
    pub tls_rpt: TlsRptConfig,
    /// `[dmarc_reports]`: DMARC aggregate reports.
    pub dmarc_reports: DmarcReportsConfig,
    /// `[[filter]]`: content filters at the end of DATA, in order.
    pub filters: Vec<FilterConfig>,
    /// `[dnsbl]`: DNS block lists.
    pub dnsbl: DnsblConfig,
    /// `[greylist]`: greylisting.
    pub greylist: GreylistConfig,
    /// `[arc]`: ARC sealing of forwarded mail.
    pub arc: ArcConfig,
    /// `[[bounce_class]]`: the operator's classification rules (checked
    /// before the shipped table).
    pub bounce_classes: Vec<ClassRule>,
    /// `[suppression]`: automatic additions to the suppression list.
    pub suppression: SuppressionConfig,
    /// `[[shaping]]` after the built-in grouping rules.
    pub shaping: shaping::ShapingRules,
}

/// A domain name as config keys take it: dot-separated labels of ASCII
/// letters, digits, `-` and `_` (1-63 bytes each, 253 in all).
pub fn is_domain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

pub const DEFAULT_SMTP: &str = "127.0.0.1:2525";
pub const DEFAULT_GRPC: &str = "127.0.0.1:7070";
pub const DEFAULT_HTTP: &str = "127.0.0.1:8080";
pub const DEFAULT_MAX_MESSAGE_SIZE: u64 = 36_700_160;
pub const DEFAULT_MAX_RECIPIENTS: usize = 1000;

/// `node.data_dir` when not set (relative to the working directory).
pub const DEFAULT_DATA_DIR: &str = "tern-data";
/// The embedded default's only local domain (RFC 6761: `localhost` names
/// this machine), so that a newcomer's first message lands somewhere to
/// look at: `tern-data/maildir/localhost/<user>/new/`.
pub const DEFAULT_LOCAL_DOMAIN: &str = "localhost";

impl Config {
    /// The embedded default: a single-node cluster bootstrapped on first
    /// start, delivering mail for `localhost` to Maildirs under the data
    /// dir. Local delivery opens no relay: mail to other domains still
    /// needs a client in `relay_networks` (loopback), as with a file.
    pub fn embedded_default() -> Result<Config, ConfigError> {
        let mut raw = RawConfig::default();
        raw.policy.local_domains = Some(vec![DEFAULT_LOCAL_DOMAIN.to_owned()]);
        raw.local.maildir = Some(format!("{DEFAULT_DATA_DIR}/maildir/{{domain}}/{{user}}"));
        Self::from_raw(raw, true)
    }

    /// Reads and validates a TOML file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse(msg) => ConfigError::Parse(format!("{}: {msg}", path.display())),
            other => other,
        })
    }

    /// Parses TOML text (a config file's content).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        Self::from_raw(raw, false)
    }

    fn from_raw(raw: RawConfig, default_bootstrap: bool) -> Result<Config, ConfigError> {
        let parse = |s: &str| -> SocketAddr { s.parse().unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0))) };
        let node_id = raw.node.id.unwrap_or(1);
        if node_id == 0 {
            return Err(ConfigError::Invalid {
                key: "node.id",
                reason: "must be at least 1".into(),
            });
        }
        let hostname = raw.node.hostname.unwrap_or_else(default_hostname);
        if hostname.is_empty() || hostname.contains(char::is_whitespace) {
            return Err(ConfigError::Invalid {
                key: "node.hostname",
                reason: format!("{hostname:?} is not a host name"),
            });
        }
        let listen_smtp = raw.listen.smtp.unwrap_or_else(|| vec![parse(DEFAULT_SMTP)]);
        let listen_grpc = raw.listen.grpc.unwrap_or_else(|| parse(DEFAULT_GRPC));
        let listen_http = raw.listen.http.unwrap_or_else(|| parse(DEFAULT_HTTP));
        if raw.tls.cert.is_some() != raw.tls.key.is_some() {
            return Err(ConfigError::Invalid {
                key: "tls",
                reason: "cert and key must be given together".into(),
            });
        }
        let listen_submission = raw.listen.submission.unwrap_or_default();
        let listen_submissions = raw.listen.submissions.unwrap_or_default();
        let smtp_auth = auth_config(raw.auth)?;
        for (key, addrs) in [
            ("listen.submission", &listen_submission),
            ("listen.submissions", &listen_submissions),
        ] {
            if addrs.is_empty() {
                continue;
            }
            if raw.tls.cert.is_none() {
                return Err(ConfigError::Invalid {
                    key,
                    reason: "submission needs TLS: set [tls] cert and key".into(),
                });
            }
            if smtp_auth.users_file.is_none() {
                return Err(ConfigError::Invalid {
                    key,
                    reason: "submission needs users: set [auth] users_file".into(),
                });
            }
        }
        let state_cache_mb = raw
            .node
            .state_cache_mb
            .unwrap_or(tern_model::defaults::STATE_CACHE_BYTES >> 20);
        if !(16..=1 << 20).contains(&state_cache_mb) {
            return Err(ConfigError::Invalid {
                key: "node.state_cache_mb",
                reason: format!("{state_cache_mb} is outside 16..=1048576"),
            });
        }
        let worker_threads = match raw.node.worker_threads {
            Some(n) if !(1..=1024).contains(&n) => {
                return Err(ConfigError::Invalid {
                    key: "node.worker_threads",
                    reason: format!("{n} is outside 1..=1024"),
                })
            }
            n => n,
        };
        let log_segment_mb = raw
            .node
            .log_segment_mb
            .unwrap_or(tern_model::defaults::LOG_SEGMENT_BYTES >> 20);
        if !(1..=1024).contains(&log_segment_mb) {
            return Err(ConfigError::Invalid {
                key: "node.log_segment_mb",
                reason: format!("{log_segment_mb} is outside 1..=1024"),
            });
        }
        let log_keep_mb = raw.node.log_keep_mb.unwrap_or(256);
        if log_keep_mb < log_segment_mb {
            return Err(ConfigError::Invalid {
                key: "node.log_keep_mb",
                reason: format!("{log_keep_mb} is less than one segment (node.log_segment_mb = {log_segment_mb})"),
            });
        }
        // Two segments: what a restart and the state of what is logged need.
        let min_free_mb = raw.node.min_free_mb.unwrap_or(2 * log_segment_mb);
        if min_free_mb > 1 << 20 {
            return Err(ConfigError::Invalid {
                key: "node.min_free_mb",
                reason: format!("{min_free_mb} is above 1048576"),
            });
        }
        let shards = raw.cluster.shards.unwrap_or(16);
        if !(1..=4096).contains(&shards) {
            return Err(ConfigError::Invalid {
                key: "cluster.shards",
                reason: format!("{shards} is outside 1..=4096"),
            });
        }
        let replicas = raw.cluster.replicas.unwrap_or(3);
        if !(1..=7).contains(&replicas) {
            return Err(ConfigError::Invalid {
                key: "cluster.replicas",
                reason: format!("{replicas} is outside 1..=7"),
            });
        }
        let max_recipients = raw.policy.max_recipients.unwrap_or(DEFAULT_MAX_RECIPIENTS);
        if max_recipients < 100 {
            return Err(ConfigError::Invalid {
                key: "policy.max_recipients",
                reason: "RFC 5321 4.5.3.1.8 requires at least 100".into(),
            });
        }
        let max_recipients = within("policy.max_recipients", max_recipients, 100..=MAX_RECIPIENTS_BOUND)?;
        let max_message_size = raw.policy.max_message_size.unwrap_or(DEFAULT_MAX_MESSAGE_SIZE);
        if max_message_size < 1024 {
            return Err(ConfigError::Invalid {
                key: "policy.max_message_size",
                reason: "must be at least 1024 bytes".into(),
            });
        }
        let max_message_size = within(
            "policy.max_message_size",
            max_message_size,
            1024..=MAX_MESSAGE_SIZE_BOUND,
        )?;
        let smtp_limits = smtp_limits(&raw.smtp, max_message_size)?;
        let lower = |v: Option<Vec<String>>| -> Vec<String> {
            v.unwrap_or_default()
                .into_iter()
                .map(|d| d.trim().trim_end_matches('.').to_ascii_lowercase())
                .collect()
        };
        let relay_networks = raw.policy.relay_networks.unwrap_or_else(|| {
            ["127.0.0.0/8", "::1/128"]
                .iter()
                .filter_map(|n| n.parse().ok())
                .collect()
        });
        let secs = |v: Option<u64>, d: u64, key: &'static str| -> Result<Duration, ConfigError> {
            let s = v.unwrap_or(d);
            if s == 0 {
                return Err(ConfigError::Invalid {
                    key,
                    reason: "must be at least 1 second".into(),
                });
            }
            Ok(Duration::from_secs(s))
        };
        let dns_nameservers = raw
            .dns
            .nameservers
            .unwrap_or_default()
            .iter()
            .map(|n| {
                n.parse::<SocketAddr>()
                    .or_else(|_| n.parse::<std::net::IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                    .map_err(|_| format!("{n:?} is not an IP address or IP:port"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(invalid("dns.nameservers"))?;
        let retry_schedule = match raw.delivery.retry_schedule {
            None => ["5m", "10m", "30m", "1h", "2h", "4h"]
                .iter()
                .map(|d| parse_duration(d))
                .collect::<Result<Vec<_>, _>>(),
            Some(list) => list.iter().map(|d| parse_duration(d)).collect(),
        }
        .map_err(invalid("delivery.retry_schedule"))?;
        if retry_schedule.is_empty() || retry_schedule.iter().any(|d| d.is_zero()) {
            return Err(ConfigError::Invalid {
                key: "delivery.retry_schedule",
                reason: "needs at least one duration, each at least 1s".into(),
            });
        }
        let max_age =
            parse_duration(raw.delivery.max_age.as_deref().unwrap_or("5d")).map_err(invalid("delivery.max_age"))?;
        let delay_notice_after = raw
            .delivery
            .delay_notice_after
            .as_deref()
            .map(parse_duration)
            .transpose()
            .map_err(invalid("delivery.delay_notice_after"))?;
        let mut routes = Vec::new();
        for r in raw.route {
            let to = match r.to {
                OneOrMany::One(s) => vec![s],
                OneOrMany::Many(v) => v,
            };
            if to.is_empty() {
                return Err(ConfigError::Invalid {
                    key: "route.to",
                    reason: format!("route for {} has no next hop", r.domain),
                });
            }
            let lmtp = match r.protocol.as_deref() {
                None | Some("smtp") => false,
                Some("lmtp") => true,
                Some(other) => {
                    return Err(ConfigError::Invalid {
                        key: "route.protocol",
                        reason: format!("{other:?} is not smtp or lmtp"),
                    })
                }
            };
            routes.push(Route {
                domain: r.domain.trim().trim_end_matches('.').to_ascii_lowercase(),
                to,
                lmtp,
            });
        }
        let local_delivery = match (raw.local.lmtp, raw.local.maildir) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::Invalid {
                    key: "local",
                    reason: "set lmtp or maildir, not both".into(),
                })
            }
            (Some(l), None) => LocalDelivery::Lmtp(l),
            (None, Some(m)) => LocalDelivery::Maildir(m),
            (None, None) => LocalDelivery::None,
        };
        let cluster_tls = match (raw.cluster.tls_cert, raw.cluster.tls_key, raw.cluster.tls_ca) {
            (None, None, None) => None,
            (Some(cert), Some(key), Some(ca)) => Some(ClusterTlsFiles {
                cert,
                key,
                ca,
                server_name: raw.cluster.tls_server_name.unwrap_or_else(|| "tern-cluster".into()),
            }),
            _ => {
                return Err(ConfigError::Invalid {
                    key: "cluster.tls_cert",
                    reason: "tls_cert, tls_key and tls_ca must be given together".into(),
                })
            }
        };
        let cluster_insecure = raw.cluster.insecure.unwrap_or(false);
        if cluster_tls.is_none() && !listen_grpc.ip().is_loopback() && !cluster_insecure {
            return Err(ConfigError::Invalid {
                key: "cluster.insecure",
                reason: format!(
                    "listen.grpc {listen_grpc} is not a loopback address and [cluster] has no tls_cert/tls_key/tls_ca: \
                     anyone who reaches that port could read and change the queue. Configure cluster TLS \
                     (`ternctl cert` makes the files; see docs/cluster.md), listen on loopback, or set \
                     [cluster] insecure = true if the network is private and you accept the risk"
                ),
            });
        }
        let mut peer_addresses = std::collections::BTreeMap::new();
        for (id, addr) in raw.cluster.peer_addresses.unwrap_or_default() {
            let id: u64 = id.parse().map_err(|_| ConfigError::Invalid {
                key: "cluster.peer_addresses",
                reason: format!("{id:?} is not a node id"),
            })?;
            peer_addresses.insert(id, addr);
        }
        let log_format = match raw.log.format.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(ConfigError::Invalid {
                    key: "log.format",
                    reason: format!("{other:?} is not text or json"),
                })
            }
        };
        let webhooks = raw.webhook.into_iter().map(webhook).collect::<Result<Vec<_>, _>>()?;
        // Names key the outbox cursors: two endpoints sharing one would share a cursor.
        if let Some(dup) = webhooks
            .iter()
            .enumerate()
            .find(|(i, w)| webhooks[..*i].iter().any(|o| o.name == w.name))
        {
            return Err(ConfigError::Invalid {
                key: "webhook.name",
                reason: format!("{:?} names two webhooks (give each its own name)", dup.1.name),
            });
        }
        let inbound = InboundConfig {
            enabled: raw.inbound.enabled.unwrap_or(true),
            dmarc_policy: match raw.inbound.dmarc_policy.as_deref() {
                None | Some("enforce") => DmarcPolicyMode::Enforce,
                Some("monitor") => DmarcPolicyMode::Monitor,
                Some(other) => {
                    return Err(ConfigError::Invalid {
                        key: "inbound.dmarc_policy",
                        reason: format!("{other:?} is not enforce or monitor"),
                    })
                }
            },
            spf_fail: match raw.inbound.spf_fail.as_deref() {
                None | Some("header") => SpfFailAction::Header,
                Some("reject") => SpfFailAction::Reject,
                Some(other) => {
                    return Err(ConfigError::Invalid {
                        key: "inbound.spf_fail",
                        reason: format!("{other:?} is not header or reject"),
                    })
                }
            },
            timeout: secs(raw.inbound.timeout_secs, 20, "inbound.timeout_secs")?,
        };
        let local_domains = lower(raw.policy.local_domains);
        let relay_domains = lower(raw.policy.relay_domains);
        let fbl = fbl::validate(raw.fbl, &local_domains.iter().chain(&relay_domains).collect::<Vec<_>>())?;
        let api = api::validate(raw.api, max_age)?;
        Ok(Config {
            mta_sts: mta_sts::validate(raw.mta_sts)?,
            dane: dane::validate(raw.dane)?,
            tls_rpt: reports::validate_tls_rpt(raw.tls_rpt)?,
            dmarc_reports: reports::validate_dmarc(raw.dmarc_reports)?,
            filters: filter::validate(raw.filter)?,
            dnsbl: dnsbl::validate_dnsbl(raw.dnsbl)?,
            greylist: dnsbl::validate_greylist(raw.greylist)?,
            arc: arc::validate(raw.arc)?,
            fbl,
            api,
            webhooks,
            dkim: dkim::validate(raw.dkim)?,
            inbound,
            cluster_tls,
            cluster_insecure,
            peer_addresses,
            dead_node_after: secs(raw.cluster.dead_node_after_secs, 300, "cluster.dead_node_after_secs")?,
            handover_timeout: match secs(raw.cluster.handover_timeout_secs, 30, "cluster.handover_timeout_secs")? {
                // The node moving a leadership waits for this inside a 90 s RPC.
                t if t > Duration::from_secs(60) => {
                    return Err(ConfigError::Invalid {
                        key: "cluster.handover_timeout_secs",
                        reason: "must be at most 60 seconds".into(),
                    })
                }
                t => t,
            },
            quiesce_idle_groups: raw.cluster.quiesce_idle_groups.unwrap_or(false),
            dns_nameservers,
            dns_timeout: secs(raw.dns.timeout_secs, 5, "dns.timeout_secs")?,
            routes,
            smtp_port: raw.delivery.smtp_port.unwrap_or(25),
            retry_schedule,
            max_age,
            delay_notice_after,
            max_connections_per_site: within(
                "delivery.max_connections_per_site",
                raw.delivery.max_connections_per_site.unwrap_or(20),
                1..=10_000,
            )?,
            messages_per_connection: within(
                "delivery.messages_per_connection",
                raw.delivery.messages_per_connection.unwrap_or(100),
                1..=100_000,
            )?,
            connection_idle: match raw.delivery.connection_idle_secs.unwrap_or(2) {
                s if s > 300 => {
                    return Err(ConfigError::Invalid {
                        key: "delivery.connection_idle_secs",
                        reason: "must be at most 300 seconds (servers may close idle sessions after 5 minutes)".into(),
                    })
                }
                s => Duration::from_secs(s),
            },
            bounce_classes: bounce::class_rules(raw.bounce_class)?,
            suppression: bounce::suppression(raw.suppression)?,
            tls_policies: tls_policy::validate(raw.tls_policy, lower(raw.delivery.require_tls_domains))?,
            backoff: backoff::validate(raw.backoff, raw.delivery.backoff_defaults.unwrap_or(true))?,
            tls_ca_file: raw.delivery.tls_ca_file,
            helo_name: raw.delivery.helo_name.unwrap_or_else(|| hostname.clone()),
            egress: egress::validate(raw.source, raw.pool, raw.pool_rule)?,
            connect_timeout: secs(raw.delivery.connect_timeout_secs, 30, "delivery.connect_timeout_secs")?,
            scheduler_tick: Duration::from_millis(within(
                "delivery.scheduler_tick_ms",
                raw.delivery.scheduler_tick_ms.unwrap_or(100),
                10..=10_000,
            )?),
            verify_recipients: raw.local.verify_recipients.unwrap_or(false),
            local_delivery,
            log_format,
            node_id,
            hostname,
            data_dir: raw.node.data_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            state_cache_bytes: state_cache_mb << 20,
            worker_threads,
            log_segment_bytes: log_segment_mb << 20,
            log_keep_bytes: log_keep_mb << 20,
            min_free_bytes: min_free_mb << 20,
            advertise_grpc: raw.cluster.advertise_grpc.unwrap_or_else(|| listen_grpc.to_string()),
            admin_tokens: admin_tokens(raw.admin_token)?,
            shaping: shaping::validate(raw.shaping)?,
            listen_smtp,
            listen_submission,
            listen_submissions,
            smtp_auth,
            listen_grpc,
            listen_http,
            tls_cert: raw.tls.cert,
            tls_key: raw.tls.key,
            bootstrap: raw.cluster.bootstrap.unwrap_or(default_bootstrap),
            shards,
            replicas,
            relay_networks,
            local_domains,
            relay_domains,
            max_message_size,
            max_recipients,
            max_connections: within(
                "smtp.max_connections",
                raw.smtp.max_connections.unwrap_or(1000),
                1..=1_000_000,
            )?,
            command_timeout: Duration::from_secs(within(
                "smtp.command_timeout_secs",
                raw.smtp.command_timeout_secs.unwrap_or(300),
                1..=3600,
            )?),
            data_timeout: Duration::from_secs(within(
                "smtp.data_timeout_secs",
                raw.smtp.data_timeout_secs.unwrap_or(180),
                1..=3600,
            )?),
            max_errors: within("smtp.max_errors", raw.smtp.max_errors.unwrap_or(10), 1..=1000)?,
            smtp_limits,
        })
    }
}

/// `[[admin_token]]` entries: unique names, a role, an argon2 PHC hash.
fn admin_tokens(raw: Vec<RawAdminToken>) -> Result<Vec<AdminToken>, ConfigError> {
    let mut tokens: Vec<AdminToken> = Vec::with_capacity(raw.len());
    for t in raw {
        tern_pki::check_client_name(&t.name).map_err(|e| ConfigError::Invalid {
            key: "admin_token.name",
            reason: e.to_string(),
        })?;
        if tokens.iter().any(|x| x.name == t.name) {
            return Err(ConfigError::Invalid {
                key: "admin_token.name",
                reason: format!("{:?} is given twice", t.name),
            });
        }
        let role: tern_pki::Role = t.role.parse().map_err(|e: tern_pki::PkiError| ConfigError::Invalid {
            key: "admin_token.role",
            reason: format!("token {:?}: {e}", t.name),
        })?;
        let hash = t.hash.trim().to_owned();
        let parsed = argon2::password_hash::PasswordHash::new(&hash).map_err(|e| ConfigError::Invalid {
            key: "admin_token.hash",
            reason: format!(
                "token {:?}: not a PHC string ({e}); make one with `ternd hash-password`",
                t.name
            ),
        })?;
        if !["argon2id", "argon2i", "argon2d"].contains(&parsed.algorithm.as_str()) {
            return Err(ConfigError::Invalid {
                key: "admin_token.hash",
                reason: format!(
                    "token {:?}: {} hashes are not supported; make one with `ternd hash-password`",
                    t.name, parsed.algorithm
                ),
            });
        }
        tokens.push(AdminToken {
            name: t.name,
            role,
            hash,
        });
    }
    Ok(tokens)
}

fn auth_config(raw: RawAuth) -> Result<SmtpAuthConfig, ConfigError> {
    let max_failures = raw.max_failures.unwrap_or(5);
    if max_failures == 0 {
        return Err(ConfigError::Invalid {
            key: "auth.max_failures",
            reason: "must be at least 1".into(),
        });
    }
    let failure_window =
        parse_duration(raw.failure_window.as_deref().unwrap_or("15m")).map_err(invalid("auth.failure_window"))?;
    if failure_window.is_zero() {
        return Err(ConfigError::Invalid {
            key: "auth.failure_window",
            reason: "must be at least 1s".into(),
        });
    }
    let mut senders = std::collections::BTreeMap::new();
    for (user, list) in raw.senders.unwrap_or_default() {
        let owned = list
            .iter()
            .map(|a| Owned::parse(a))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ConfigError::Invalid {
                key: "auth.senders",
                reason: format!("user {user}: {e}"),
            })?;
        senders
            .entry(user.to_ascii_lowercase())
            .or_insert_with(Vec::new)
            .extend(owned);
    }
    Ok(SmtpAuthConfig {
        users_file: raw.users_file,
        senders,
        max_failures,
        failure_window,
    })
}

/// Validates one `[[webhook]]`.
fn webhook(raw: RawWebhook) -> Result<Webhook, ConfigError> {
    let url: http::Uri = raw
        .url
        .parse()
        .map_err(|e| format!("{:?} is not a URL: {e}", raw.url))
        .map_err(invalid("webhook.url"))?;
    if !matches!(url.scheme_str(), Some("http" | "https")) || url.host().is_none_or(str::is_empty) {
        return Err(ConfigError::Invalid {
            key: "webhook.url",
            reason: format!("{:?} is not an http:// or https:// URL with a host", raw.url),
        });
    }
    if url.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(ConfigError::Invalid {
            key: "webhook.url",
            reason: format!("{:?}: put credentials in headers, not in the URL", raw.url),
        });
    }
    let events = match raw.events {
        None => tern_model::events::EVENT_TYPES
            .iter()
            .map(|e| (*e).to_owned())
            .collect(),
        Some(list) => {
            if let Some(bad) = list
                .iter()
                .find(|e| !tern_model::events::EVENT_TYPES.contains(&e.as_str()))
            {
                return Err(ConfigError::Invalid {
                    key: "webhook.events",
                    reason: format!(
                        "{bad:?} is not an event type ({})",
                        tern_model::events::EVENT_TYPES.join(", ")
                    ),
                });
            }
            if list.is_empty() {
                return Err(ConfigError::Invalid {
                    key: "webhook.events",
                    reason: "name at least one event type, or leave it out for all".into(),
                });
            }
            list
        }
    };
    let batch_size = raw.batch_size.unwrap_or(100);
    let max_queue = raw.max_queue.unwrap_or(10_000);
    if batch_size == 0 || batch_size > max_queue {
        return Err(ConfigError::Invalid {
            key: "webhook.batch_size",
            reason: format!("{batch_size} is not within 1..=max_queue ({max_queue})"),
        });
    }
    let flush_interval =
        parse_duration(raw.flush_interval.as_deref().unwrap_or("1s")).map_err(invalid("webhook.flush_interval"))?;
    let timeout = parse_duration(raw.timeout.as_deref().unwrap_or("10s")).map_err(invalid("webhook.timeout"))?;
    for (key, d) in [("webhook.flush_interval", flush_interval), ("webhook.timeout", timeout)] {
        if d.is_zero() {
            return Err(ConfigError::Invalid {
                key,
                reason: "must be at least 1s".into(),
            });
        }
    }
    let mut headers = http::HeaderMap::new();
    for (name, value) in raw.headers.unwrap_or_default() {
        let name = http::header::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("{name:?} is not a header name"))
            .map_err(invalid("webhook.headers"))?;
        if matches!(
            name.as_str(),
            "host" | "content-type" | "content-length" | "transfer-encoding"
        ) {
            return Err(ConfigError::Invalid {
                key: "webhook.headers",
                reason: format!("{name} is set by Tern"),
            });
        }
        let mut value = http::header::HeaderValue::from_str(&value)
            .map_err(|_| format!("the value of {name} is not a valid header value"))
            .map_err(invalid("webhook.headers"))?;
        value.set_sensitive(true);
        headers.insert(name, value);
    }
    let name = raw.name.unwrap_or_else(|| webhook_name_of(&url));
    if !is_webhook_name(&name) {
        return Err(ConfigError::Invalid {
            key: "webhook.name",
            reason: format!("{name:?}: 1 to 64 characters of A-Z a-z 0-9 . _ -"),
        });
    }
    let secret = match raw.secret {
        None => None,
        Some(s) => {
            use base64::Engine as _;
            let bytes = s
                .strip_prefix("whsec_")
                .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                .filter(|b| (24..=64).contains(&b.len()))
                .ok_or_else(|| ConfigError::Invalid {
                    key: "webhook.secret",
                    reason: "must be whsec_ and the standard base64 of 24 to 64 random bytes".into(),
                })?;
            Some(WebhookSecret(bytes))
        }
    };
    let retry_for = parse_duration(raw.retry_for.as_deref().unwrap_or("3d")).map_err(invalid("webhook.retry_for"))?;
    if retry_for < Duration::from_secs(1) {
        return Err(ConfigError::Invalid {
            key: "webhook.retry_for",
            reason: "must be at least 1s".into(),
        });
    }
    Ok(Webhook {
        url,
        events,
        batch_size,
        flush_interval,
        max_queue,
        timeout,
        headers,
        name,
        secret,
        tenant: raw.tenant,
        retry_for,
    })
}

fn default_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    #[test]
    fn embedded_default_delivers_localhost_to_a_maildir_under_the_data_dir() {
        let c = Config::embedded_default().unwrap();
        assert_eq!(c.local_domains, vec!["localhost"]);
        assert!(c.relay_domains.is_empty());
        assert_eq!(
            c.local_delivery,
            LocalDelivery::Maildir("tern-data/maildir/{domain}/{user}".into())
        );
        assert_eq!(c.data_dir, PathBuf::from("tern-data"));
        // A config file keeps its own defaults: no local domain, no Maildir.
        let file = Config::from_toml("").unwrap();
        assert!(file.local_domains.is_empty());
        assert_eq!(file.local_delivery, LocalDelivery::None);
    }

    #[test]
    fn embedded_default_is_single_node_bootstrap() {
        let c = Config::embedded_default().unwrap();
        assert!(c.bootstrap);
        assert_eq!(c.listen_smtp, vec![DEFAULT_SMTP.parse().unwrap()]);
        assert_eq!(c.listen_grpc.to_string(), DEFAULT_GRPC);
        assert_eq!(c.shards, 16);
        assert_eq!(c.state_cache_bytes, 256 << 20);
        assert_eq!(c.worker_threads, None);
        assert_eq!((c.log_segment_bytes, c.log_keep_bytes), (64 << 20, 256 << 20));
        assert!(c.inbound.enabled);
        assert_eq!(c.inbound.dmarc_policy, DmarcPolicyMode::Enforce);
        assert_eq!(c.inbound.spf_fail, SpfFailAction::Header);
        assert_eq!(c.inbound.timeout, Duration::from_secs(20));
        assert!(c
            .relay_networks
            .iter()
            .any(|n| n.contains(&"127.0.0.1".parse::<IpAddr>().unwrap())));
        assert!(c
            .relay_networks
            .iter()
            .any(|n| n.contains(&"::1".parse::<IpAddr>().unwrap())));
        assert!(!c
            .relay_networks
            .iter()
            .any(|n| n.contains(&"10.0.0.1".parse::<IpAddr>().unwrap())));
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::from_toml("[policy]\nmax_recipents = 5\n").unwrap_err();
        assert!(err.to_string().contains("max_recipents"), "{err}");
        let err = Config::from_toml("[nodes]\nid = 5\n").unwrap_err();
        assert!(err.to_string().contains("nodes"), "{err}");
    }

    #[test]
    fn handover_timeout_defaults_to_30s_and_stays_within_an_rpc() {
        let c = Config::from_toml("[node]\nid = 3\n").unwrap();
        assert_eq!(c.handover_timeout, Duration::from_secs(30));
        let c = Config::from_toml("[cluster]\nhandover_timeout_secs = 60\n").unwrap();
        assert_eq!(c.handover_timeout, Duration::from_secs(60));
        for bad in [0, 61] {
            let err = Config::from_toml(&format!("[cluster]\nhandover_timeout_secs = {bad}\n")).unwrap_err();
            assert!(err.to_string().contains("handover_timeout_secs"), "{err}");
        }
    }

    #[test]
    fn plaintext_grpc_off_loopback_needs_insecure() {
        let err = Config::from_toml("[listen]\ngrpc = \"0.0.0.0:7070\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cluster.insecure") && err.contains("0.0.0.0:7070"),
            "{err}"
        );
        let c = Config::from_toml("[listen]\ngrpc = \"0.0.0.0:7070\"\n[cluster]\ninsecure = true\n").unwrap();
        assert!(c.cluster_insecure);
        assert!(!Config::from_toml("").unwrap().cluster_insecure);
    }

    #[test]
    fn file_defaults_do_not_bootstrap() {
        let c = Config::from_toml("[node]\nid = 3\n").unwrap();
        assert!(!c.bootstrap);
        assert_eq!(c.node_id, 3);
    }

    #[test]
    fn limits_are_validated() {
        assert!(Config::from_toml("[policy]\nmax_recipients = 10\n").is_err());
        assert!(Config::from_toml("[cluster]\nshards = 0\n").is_err());
        assert!(Config::from_toml("[node]\nstate_cache_mb = 8\n").is_err());
        assert!(Config::from_toml("[node]\nworker_threads = 0\n").is_err());
        let c = Config::from_toml("[node]\nworker_threads = 1\n").unwrap();
        assert_eq!(c.worker_threads, Some(1));
        let c = Config::from_toml("[node]\nstate_cache_mb = 2048\n").unwrap();
        assert_eq!(c.state_cache_bytes, 2048 << 20);
        assert!(Config::from_toml("[node]\nlog_segment_mb = 0\n").is_err());
        assert!(Config::from_toml("[node]\nlog_segment_mb = 16\nlog_keep_mb = 8\n").is_err());
        let c = Config::from_toml("[node]\nlog_segment_mb = 4\nlog_keep_mb = 16\n").unwrap();
        assert_eq!((c.log_segment_bytes, c.log_keep_bytes), (4 << 20, 16 << 20));
        assert!(Config::from_toml("[inbound]\ndmarc_policy = \"reject\"\n").is_err());
        assert!(Config::from_toml("[inbound]\nspf_fail = \"softfail\"\n").is_err());
        assert!(Config::from_toml("[inbound]\ntimeout_secs = 0\n").is_err());
        let c = Config::from_toml("[inbound]\ndmarc_policy = \"monitor\"\nspf_fail = \"reject\"\n").unwrap();
        assert_eq!(c.inbound.dmarc_policy, DmarcPolicyMode::Monitor);
        assert_eq!(c.inbound.spf_fail, SpfFailAction::Reject);
        assert!(Config::from_toml("[tls]\ncert = \"a.pem\"\n").is_err());
        assert!(Config::from_toml("[cluster]\ntls_cert = \"a.pem\"\ntls_key = \"k.pem\"\n").is_err());
        let c = Config::from_toml("[cluster]\ntls_cert = \"a\"\ntls_key = \"k\"\ntls_ca = \"c\"\n").unwrap();
        assert_eq!(c.cluster_tls.unwrap().server_name, "tern-cluster");
        let c = Config::from_toml("[cluster]\npeer_addresses = { \"2\" = \"127.0.0.1:9\" }\n").unwrap();
        assert_eq!(c.peer_addresses.get(&2).map(String::as_str), Some("127.0.0.1:9"));
        assert!(Config::from_toml("[cluster]\npeer_addresses = { \"x\" = \"a:1\" }\n").is_err());
        let c = Config::from_toml("[policy]\nlocal_domains = [\"Example.TEST.\"]\nrelay_networks=[\"192.0.2.0/24\"]\n")
            .unwrap();
        assert_eq!(c.local_domains, vec!["example.test"]);
        assert_eq!(c.relay_networks.len(), 1);
    }

    #[test]
    fn smtp_limits_have_defaults_and_bounds() {
        let c = Config::from_toml("[node]\nid = 1\n").unwrap();
        let l = &c.smtp_limits;
        assert_eq!(l.max_connections_per_ip, 20);
        assert_eq!(l.max_session, Duration::from_secs(600));
        assert_eq!(l.min_data_rate, 1024);
        assert_eq!(l.tls_handshake, Duration::from_secs(10));
        assert_eq!(l.max_junk_commands, 100);
        assert_eq!(l.memory_budget_bytes, 512 << 20);
        assert!(l.proxy_protocol_from.is_empty());
        assert_eq!(l.max_connection_rate_per_ip, None);
        let c = Config::from_toml("[smtp]\nmax_connection_rate_per_ip = \"60/min\"\n").unwrap();
        assert_eq!(
            c.smtp_limits.max_connection_rate_per_ip,
            Some((60, Duration::from_secs(60)))
        );
        let c = Config::from_toml("[smtp]\nmax_connection_rate_per_ip = \"5/s\"\n").unwrap();
        assert_eq!(
            c.smtp_limits.max_connection_rate_per_ip,
            Some((5, Duration::from_secs(1)))
        );
        let c = Config::from_toml(
            "[smtp]\nmax_connections_per_ip = 3\nmax_session_secs = 60\nmin_data_rate = 0\ntls_handshake_secs = 5\n\
             max_junk_commands = 7\nmemory_budget_mb = 64\nproxy_protocol_from = [\"10.0.0.0/8\", \"::1/128\"]\n\
             [policy]\nmax_message_size = 10485760\n",
        )
        .unwrap();
        let l = &c.smtp_limits;
        assert_eq!(
            (l.max_connections_per_ip, l.min_data_rate, l.max_junk_commands),
            (3, 0, 7)
        );
        assert_eq!(
            (l.max_session, l.tls_handshake),
            (Duration::from_secs(60), Duration::from_secs(5))
        );
        assert_eq!(l.memory_budget_bytes, 64 << 20);
        assert_eq!(l.proxy_protocol_from.len(), 2);
        for (bad, needle) in [
            (
                "[smtp]\nmax_connections_per_ip = 0",
                "smtp.max_connections_per_ip: must be at least 1",
            ),
            ("[smtp]\nmax_connections_per_ip = 100001", "smtp.max_connections_per_ip"),
            (
                "[smtp]\nmax_connection_rate_per_ip = \"60\"",
                "smtp.max_connection_rate_per_ip",
            ),
            ("[smtp]\nmax_connection_rate_per_ip = \"0/min\"", "the count must be 1"),
            ("[smtp]\nmax_connection_rate_per_ip = \"60/day\"", "60/day"),
            (
                "[smtp]\nmax_session_secs = 5",
                "smtp.max_session_secs: 5 is outside 10..=86400",
            ),
            ("[smtp]\ntls_handshake_secs = 0", "smtp.tls_handshake_secs"),
            ("[smtp]\nmax_junk_commands = 0", "smtp.max_junk_commands"),
            ("[smtp]\nmemory_budget_mb = 0", "smtp.memory_budget_mb"),
            ("[smtp]\nmemory_budget_mb = 16", "policy.max_message_size"),
            (
                "[smtp]\nproxy_protocol_from = [\"10.0.0.300/8\"]",
                "proxy_protocol_from",
            ),
            (
                "[smtp]\nmax_connections = 0",
                "smtp.max_connections: 0 is outside 1..=1000000",
            ),
            ("[smtp]\nmax_errors = 0", "smtp.max_errors"),
            ("[smtp]\ncommand_timeout_secs = 3601", "smtp.command_timeout_secs"),
            ("[smtp]\ndata_timeout_secs = 0", "smtp.data_timeout_secs"),
            (
                "[policy]\nmax_message_size = 1073741825",
                "policy.max_message_size: 1073741825 is outside",
            ),
            ("[policy]\nmax_recipients = 100001", "policy.max_recipients"),
            (
                "[delivery]\nscheduler_tick_ms = 5",
                "delivery.scheduler_tick_ms: 5 is outside 10..=10000",
            ),
            ("[delivery]\nscheduler_tick_ms = 10001", "delivery.scheduler_tick_ms"),
            (
                "[delivery]\nmax_connections_per_site = 0",
                "delivery.max_connections_per_site",
            ),
            (
                "[delivery]\nmessages_per_connection = 0",
                "delivery.messages_per_connection",
            ),
        ] {
            let err = Config::from_toml(bad).unwrap_err().to_string();
            assert!(err.contains(needle), "{bad}: {err}");
        }
        // The bounds themselves are accepted.
        let c = Config::from_toml(
            "[policy]\nmax_message_size = 1073741824\nmax_recipients = 100000\n[smtp]\nmemory_budget_mb = 1024\n\
             [delivery]\nscheduler_tick_ms = 10\n",
        )
        .unwrap();
        assert_eq!(c.max_message_size, 1 << 30);
        assert_eq!(c.scheduler_tick, Duration::from_millis(10));
    }

    #[test]
    fn submission_listeners_need_tls_and_users() {
        let c = Config::from_toml("[node]\nid = 1\n").unwrap();
        assert!(c.listen_submission.is_empty() && c.listen_submissions.is_empty());
        assert_eq!(c.smtp_auth.max_failures, 5);
        assert_eq!(c.smtp_auth.failure_window, Duration::from_secs(900));
        let err = Config::from_toml("[listen]\nsubmission = [\"127.0.0.1:587\"]\n").unwrap_err();
        assert!(err.to_string().contains("listen.submission:"), "{err}");
        assert!(err.to_string().contains("[tls]"), "{err}");
        let tls = "[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n";
        let err = Config::from_toml(&format!("[listen]\nsubmissions = [\"127.0.0.1:465\"]\n{tls}")).unwrap_err();
        assert!(err.to_string().contains("listen.submissions:"), "{err}");
        assert!(err.to_string().contains("users_file"), "{err}");
        let c = Config::from_toml(&format!(
            "[listen]\nsubmission = [\"127.0.0.1:587\"]\nsubmissions = [\"127.0.0.1:465\"]\n{tls}\
             [auth]\nusers_file = \"users\"\nmax_failures = 3\nfailure_window = \"2m\"\n\
             senders = {{ Alice = [\"alice@Example.com\", \"@team.example\"] }}\n"
        ))
        .unwrap();
        assert_eq!(c.listen_submission.len(), 1);
        assert_eq!(c.listen_submissions.len(), 1);
        assert_eq!(c.smtp_auth.max_failures, 3);
        assert_eq!(c.smtp_auth.failure_window, Duration::from_secs(120));
        assert_eq!(c.smtp_auth.senders["alice"].len(), 2);
        for (bad, key) in [
            ("[auth]\nmax_failures = 0\n", "auth.max_failures"),
            ("[auth]\nfailure_window = \"soon\"\n", "auth.failure_window"),
            ("[auth]\nsenders = { a = [\"nodomain\"] }\n", "auth.senders"),
            ("[auth]\nusers = \"x\"\n", "users"),
        ] {
            let err = Config::from_toml(bad).unwrap_err();
            assert!(err.to_string().contains(key), "{bad}: {err}");
        }
    }

    #[test]
    fn webhooks_are_validated() {
        let c = Config::from_toml("[[webhook]]\nurl = \"https://hooks.example.test/tern?k=1\"\n").unwrap();
        let w = &c.webhooks[0];
        assert_eq!(w.events, tern_model::events::EVENT_TYPES);
        assert_eq!((w.batch_size, w.max_queue), (100, 10_000));
        assert_eq!(
            (w.flush_interval, w.timeout),
            (Duration::from_secs(1), Duration::from_secs(10))
        );
        let c = Config::from_toml(
            "[[webhook]]\nurl = \"http://127.0.0.1:9/e\"\nevents = [\"delivered\", \"failed\"]\nbatch_size = 5\nmax_queue = 5\nflush_interval = \"2s\"\ntimeout = \"1m\"\nheaders = { Authorization = \"Bearer s3cret\" }\n",
        )
        .unwrap();
        let w = &c.webhooks[0];
        assert_eq!(w.events, ["delivered", "failed"]);
        assert_eq!(w.timeout, Duration::from_secs(60));
        assert_eq!(w.headers["authorization"], "Bearer s3cret");
        assert!(
            !format!("{c:?}").contains("s3cret"),
            "a header value shows in Debug output"
        );
        for (toml, needle) in [
            ("url = \"ftp://x.test/\"", "ftp://x.test/"),
            ("url = \"not a url\"", "not a url"),
            ("url = \"/relative\"", "/relative"),
            ("url = \"https://u:p@x.test/\"", "credentials"),
            (
                "url = \"http://x.test/\"\nevents = [\"delivered\", \"deliverd\"]",
                "\"deliverd\"",
            ),
            ("url = \"http://x.test/\"\nevents = []", "at least one"),
            ("url = \"http://x.test/\"\nbatch_size = 0", "batch_size"),
            ("url = \"http://x.test/\"\nbatch_size = 11\nmax_queue = 10", "max_queue"),
            ("url = \"http://x.test/\"\nflush_interval = \"0s\"", "flush_interval"),
            ("url = \"http://x.test/\"\ntimeout = \"soon\"", "soon"),
            (
                "url = \"http://x.test/\"\nheaders = { \"Bad Name\" = \"x\" }",
                "Bad Name",
            ),
            (
                "url = \"http://x.test/\"\nheaders = { Content-Type = \"text/plain\" }",
                "content-type",
            ),
            ("url = \"http://x.test/\"\nretries = 3", "retries"),
            ("url = \"http://x.test/\"\nname = \"a b\"", "webhook.name"),
            ("url = \"http://x.test/\"\nsecret = \"s3cret\"", "whsec_"),
            ("url = \"http://x.test/\"\nsecret = \"whsec_c2hvcnQ=\"", "24 to 64"),
            ("url = \"http://x.test/\"\nretry_for = \"0s\"", "retry_for"),
        ] {
            let err = Config::from_toml(&format!("[[webhook]]\n{toml}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{toml}: {err}");
        }
    }

    /// The durable events' keys: a stable default name, a decoded secret
    /// that Debug does not show, a tenant, retry_for; names are unique.
    #[test]
    fn webhook_outbox_keys() {
        let c = Config::from_toml("[[webhook]]\nurl = \"https://hooks.example.test:8443/t/x?k=1\"\n").unwrap();
        let w = &c.webhooks[0];
        assert_eq!(w.name, "hooks.example.test_8443_t_x");
        assert_eq!((w.secret.clone(), w.tenant.clone()), (None, None));
        assert_eq!(w.retry_for, Duration::from_secs(3 * 86400));
        let c = Config::from_toml(
            "[[webhook]]\nurl = \"http://x.test/\"\nname = \"crm\"\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\ntenant = \"acme\"\nretry_for = \"1d\"\n",
        )
        .unwrap();
        let w = &c.webhooks[0];
        assert_eq!(w.name, "crm");
        assert_eq!(w.secret.as_ref().map(|s| s.0.len()), Some(24));
        assert!(!format!("{w:?}").contains("MfKQ"), "{w:?}");
        assert_eq!(w.tenant.as_deref(), Some("acme"));
        assert_eq!(w.retry_for, Duration::from_secs(86400));
        let err = Config::from_toml(
            "[[webhook]]\nurl = \"http://x.test/a\"\nname = \"n\"\n\n[[webhook]]\nurl = \"http://x.test/b\"\nname = \"n\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("names two webhooks"), "{err}");
    }

    /// The shipped example and the one in the configuration reference parse.
    #[test]
    fn documented_examples_are_valid() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        Config::from_file(&root.join("deploy/tern.toml")).unwrap();
        let doc = std::fs::read_to_string(root.join("docs/configuration.md")).unwrap();
        let start = doc.find("```toml\n").unwrap() + "```toml\n".len();
        let end = start + doc[start..].find("```").unwrap();
        let c = Config::from_toml(&doc[start..end]).unwrap();
        assert_eq!(c.hostname, "mx1.example.com");
    }

    #[test]
    fn admin_tokens_are_checked_and_errors_name_the_key() {
        let h = "$argon2id$v=19$m=19456,t=2,p=1$4Mqyj09Zgz1dBFQP/ZhD5Q$lI3h6PJ1PNh9RHNz92pcgSWPDHK5BXSD8E7kBOYspIg";
        let c = Config::from_toml(&format!(
            "[[admin_token]]\nname = \"ops\"\nrole = \"operator\"\nhash = \"{h}\"\n"
        ))
        .unwrap();
        assert_eq!(c.admin_tokens.len(), 1);
        assert_eq!(c.admin_tokens[0].role, tern_pki::Role::Operator);
        assert!(Config::embedded_default().unwrap().admin_tokens.is_empty());
        for (entry, key, why) in [
            (
                format!("name = \"a b\"\nrole = \"admin\"\nhash = \"{h}\""),
                "admin_token.name",
                "bad client name",
            ),
            (
                format!("name = \"\"\nrole = \"admin\"\nhash = \"{h}\""),
                "admin_token.name",
                "bad client name",
            ),
            (
                format!("name = \"{}\"\nrole = \"admin\"\nhash = \"{h}\"", "x".repeat(65)),
                "admin_token.name",
                "1-64",
            ),
            (
                format!("name = \"a\"\nrole = \"root\"\nhash = \"{h}\""),
                "admin_token.role",
                "unknown role",
            ),
            (
                "name = \"a\"\nrole = \"admin\"\nhash = \"secret\"".to_owned(),
                "admin_token.hash",
                "PHC",
            ),
            (
                "name = \"a\"\nrole = \"admin\"\nhash = \"$pbkdf2-sha256$i=1000$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA\""
                    .to_owned(),
                "admin_token.hash",
                "not supported",
            ),
        ] {
            let err = Config::from_toml(&format!("[[admin_token]]\n{entry}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key) && err.contains(why), "{entry}: {err}");
        }
        let twice = format!("[[admin_token]]\nname = \"a\"\nrole = \"admin\"\nhash = \"{h}\"\n").repeat(2);
        let err = Config::from_toml(&twice).unwrap_err().to_string();
        assert!(err.contains("admin_token.name") && err.contains("twice"), "{err}");
    }
}
