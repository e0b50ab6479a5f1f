//! MTA-STS (RFC 8461) for outbound mail: the `_mta-sts` TXT record, the
//! policy fetched over verified HTTPS, a bounded per-node cache refreshed in
//! the background, and what a policy does to a destination.
//!
//! Rules followed:
//! - The TXT record (`v=STSv1; id=...`) is looked up for every plan (hickory
//!   caches it by TTL); an `id` different from the cached policy's, or no
//!   cached policy, fetches `https://mta-sts.<domain>/.well-known/mta-sts.txt`
//!   (port `[mta_sts] policy_port`, 443 outside tests). No redirects: only a
//!   200 counts. Body at most `max_policy_size`.
//! - A failed fetch, or no TXT record, keeps using an unexpired cached
//!   policy (5.1); with none, the domain has no policy (a failed fetch is
//!   remembered for [`FAILED_FETCH_TTL`] so one dead policy host costs one
//!   fetch per period, not one per message).
//! - `enforce`: only MX hosts matching an `mx` pattern are used (none left:
//!   the recipients defer with `4.7.5`), and TLS is verified against the MX
//!   host name. `testing`: TLS is verified first; a failure is recorded for
//!   TLS-RPT and the session goes on opportunistically. `none`: no effect.
//! - Every TLS negotiation under a policy is recorded for TLS-RPT.
//! - An explicit `[[tls_policy]]` (or `require_tls_domains`) for the domain
//!   wins: MTA-STS is then not looked up. `[[route]]` destinations are not
//!   subject to MTA-STS (the route is the operator's choice of host).
//! - The cache is per node, in memory: a policy is small, refetching it
//!   after a restart costs one HTTPS request per domain, and a fetch from each
//!   node also checks each node's view of the policy host.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tern_config::{MtaStsConfig, TlsPolicies};

use super::client::{verification_failure, ClientConfig, ConnectError, Connection, Endpoint, Protocol, TlsPolicy};
use super::resolve::{MxHost, MxResolver, ResolveError};
use crate::reports::tls::{Failure, FailureType, PolicyKind, TlsOutcome, TlsRecorder};

/// RFC 8461 3.2: `max_age` is at most a year.
pub const MAX_AGE_LIMIT: u64 = 31_557_600;
/// How long a failed fetch (with no cached policy) is remembered.
pub const FAILED_FETCH_TTL: Duration = Duration::from_secs(300);
/// How often the background task looks for policies near expiry.
const REFRESH_EVERY: Duration = Duration::from_secs(60);
/// Policies expiring within this time (or a tenth of their `max_age`,
/// if shorter) are refetched in the background.
const REFRESH_BEFORE: Duration = Duration::from_secs(86_400);
/// Most refreshes per background round, so a huge cache cannot flood.
const REFRESH_BATCH: usize = 100;

/// A policy's `mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Enforce,
    Testing,
    None,
}

/// A parsed policy (RFC 8461 3.2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// The `id` of the TXT record it was fetched for.
    pub id: String,
    pub mode: Mode,
    /// `mx` patterns, lowercase (`*.example.net` matches one leftmost label).
    pub mx: Vec<String>,
    pub max_age: Duration,
    /// The policy text by line, as TLS-RPT reports it.
    pub lines: Vec<String>,
}

impl Policy {
    /// Parses a policy body; `Err` says what is wrong (sts-policy-invalid).
    pub fn parse(id: &str, text: &str) -> Result<Policy, String> {
        let mut version = None;
        let mut mode = None;
        let mut max_age = None;
        let mut mx = Vec::new();
        let mut lines = Vec::new();
        for line in text.lines() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() {
                continue;
            }
            lines.push(line.to_owned());
            let Some((key, value)) = line.split_once(':') else {
                return Err(format!("line without a colon: {line:?}"));
            };
            let value = value.trim();
            match key.trim() {
                "version" => version = Some(value.to_owned()),
                "mode" => {
                    mode = Some(match value {
                        "enforce" => Mode::Enforce,
                        "testing" => Mode::Testing,
                        "none" => Mode::None,
                        other => return Err(format!("unknown mode {other:?}")),
                    })
                }
                "max_age" => {
                    let secs: u64 = value
                        .parse()
                        .ok()
                        .filter(|_| value.len() <= 10 && value.bytes().all(|b| b.is_ascii_digit()))
                        .ok_or_else(|| format!("max_age {value:?} is not a number"))?;
                    max_age = Some(secs.min(MAX_AGE_LIMIT));
                }
                "mx" if !value.is_empty() => mx.push(value.trim_end_matches('.').to_ascii_lowercase()),
                // Unknown keys are ignored (3.2, extensions).
                _ => {}
            }
        }
        if version.as_deref() != Some("STSv1") {
            return Err("version is not STSv1".into());
        }
        let mode = mode.ok_or("no mode")?;
        let max_age = max_age.ok_or("no max_age")?;
        if mode != Mode::None && mx.is_empty() {
            return Err("no mx pattern".into());
        }
        Ok(Policy {
            id: id.to_owned(),
            mode,
            mx,
            max_age: Duration::from_secs(max_age),
            lines,
        })
    }

    /// Whether MX host `host` matches one of the policy's `mx` patterns (3.4).
    pub fn matches(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.mx.iter().any(|pattern| match pattern.strip_prefix("*.") {
            Some(parent) => host
                .split_once('.')
                .is_some_and(|(label, rest)| !label.is_empty() && rest == parent),
            None => *pattern == host,
        })
    }
}

/// Parses a `_mta-sts` TXT record: the `id`, or `None` when it is not an
/// STSv1 record or is malformed (3.1).
pub fn parse_txt(txt: &str) -> Option<String> {
    let mut fields = txt.split(';').map(str::trim).filter(|f| !f.is_empty());
    if fields.next()? != "v=STSv1" {
        return None;
    }
    let id = fields.find_map(|f| f.strip_prefix("id="))?.trim();
    (!id.is_empty() && id.len() <= 32 && id.bytes().all(|b| b.is_ascii_alphanumeric())).then(|| id.to_owned())
}

/// A policy in force for one destination, handed to the site actor with
/// its jobs so that each connection is checked and recorded.
#[derive(Debug)]
pub struct Applied {
    pub domain: String,
    pub policy: Arc<Policy>,
    recorder: Arc<TlsRecorder>,
}

impl Applied {
    /// Whether MX host `host` may receive the mail (for DANE, which wins
    /// over MTA-STS for hosts with usable TLSA records).
    pub fn allows_mx(&self, host: &str) -> bool {
        self.policy.mode != Mode::Enforce || self.policy.matches(host)
    }

    /// Whether the policy makes verified TLS a must (`enforce`).
    pub fn requires_verified_tls(&self) -> bool {
        self.policy.mode == Mode::Enforce
    }

    /// Part of the site key: destinations under a policy never share a
    /// connection with others.
    pub fn tag(&self) -> &'static str {
        match self.policy.mode {
            Mode::Enforce => "+sts",
            _ => "+sts-testing",
        }
    }

    fn report_kind(&self) -> PolicyKind {
        PolicyKind::Sts {
            policy: self.policy.lines.clone(),
            mx: self.policy.mx.clone(),
        }
    }

    fn record(&self, endpoint: &Endpoint, failure: Option<(FailureType, String)>) {
        let (host, ip) = match endpoint {
            Endpoint::Tcp { host, addr } => (Some(host.clone()), Some(addr.ip())),
            Endpoint::Unix(_) => (None, None),
        };
        if let Some((result_type, reason)) = &failure {
            tracing::info!(
                domain = %self.domain,
                mx = host.as_deref().unwrap_or(""),
                result_type = result_type.as_str(),
                reason = %reason,
                mode = ?self.policy.mode,
                "MTA-STS: TLS failure under the policy"
            );
        }
        self.recorder.record(TlsOutcome {
            policy_domain: self.domain.clone(),
            policy: self.report_kind(),
            failure: failure.map(|(result_type, reason)| Failure {
                result_type,
                sending_mta_ip: None,
                receiving_mx_hostname: host,
                receiving_ip: ip,
                reason,
            }),
        });
    }

    /// Connects to `endpoint` with `tls` (verify with the MX host name) and
    /// records the outcome. Under `testing`, a TLS failure goes on
    /// opportunistically (the caller's clear-text fallback still applies).
    pub async fn connect(
        &self,
        endpoint: &Endpoint,
        protocol: Protocol,
        tls: TlsPolicy,
        client: &ClientConfig,
    ) -> Result<Connection, ConnectError> {
        match Connection::connect(endpoint, protocol, tls, client).await {
            Ok(c) => {
                self.record(endpoint, None);
                Ok(c)
            }
            Err(e) => {
                let Some(failure) = tls_failure(&e) else { return Err(e) };
                self.record(endpoint, Some(failure));
                if self.policy.mode == Mode::Enforce {
                    return Err(ConnectError::Temporary(format!(
                        "MTA-STS policy of {}: {e}",
                        self.domain
                    )));
                }
                Connection::connect(endpoint, protocol, TlsPolicy::Opportunistic, client).await
            }
        }
    }
}

/// The RFC 8460 failure type of a failed connection, when it failed at TLS.
fn tls_failure(e: &ConnectError) -> Option<(FailureType, String)> {
    let text = e.to_string();
    let kind = if text.contains("does not offer STARTTLS") || text.contains("refused STARTTLS") {
        FailureType::StarttlsNotSupported
    } else if text.contains("certificate name mismatch") {
        FailureType::CertificateHostMismatch
    } else if text.contains("certificate expired") {
        FailureType::CertificateExpired
    } else if text.contains("not signed by a trusted root") || text.contains("self-signed") {
        FailureType::CertificateNotTrusted
    } else if text.contains("TLS verification failed") || text.contains("TLS handshake") {
        FailureType::ValidationFailure
    } else {
        return None;
    };
    Some((kind, text))
}

/// What MTA-STS makes of one destination.
pub enum Decision {
    /// No policy applies.
    None,
    /// Under a policy (enforce or testing); the MX list was filtered.
    Apply(Arc<Applied>),
    /// `enforce` and no MX host matches: the reply to defer with.
    Refuse(String),
}

#[derive(Clone)]
struct Entry {
    /// The last valid policy, and when it expires.
    policy: Option<(Arc<Policy>, Instant)>,
    /// A fetch failed and no policy was cached: until when to not retry,
    /// the TXT id it was for, and the failure.
    failed: Option<(Instant, String)>,
}

/// The node's MTA-STS state. Cheap to clone.
#[derive(Clone)]
pub struct MtaSts {
    inner: Arc<Inner>,
}

struct Inner {
    config: MtaStsConfig,
    resolver: MxResolver,
    https: Arc<rustls::ClientConfig>,
    cache: Mutex<HashMap<String, Entry>>,
    recorder: Arc<TlsRecorder>,
    refresher: OnceLock<()>,
}

/// Why a fetch failed (RFC 8460 types).
#[derive(Debug)]
pub struct FetchError {
    pub kind: FailureType,
    pub reason: String,
}

impl MtaSts {
    pub fn new(
        config: MtaStsConfig,
        resolver: MxResolver,
        roots: rustls::RootCertStore,
        recorder: Arc<TlsRecorder>,
    ) -> anyhow::Result<MtaSts> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut https = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        https.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(MtaSts {
            inner: Arc::new(Inner {
                config,
                resolver,
                https: Arc::new(https),
                cache: Mutex::new(HashMap::new()),
                recorder,
                refresher: OnceLock::new(),
            }),
        })
    }

    /// The same cache under a reloaded `[mta_sts]` or new trusted roots:
    /// policies fetched stay in force until they expire (RFC 8461 5.1);
    /// failed fetches are forgotten (they may have been the old roots').
    pub fn reconfigured(&self, config: MtaStsConfig, roots: rustls::RootCertStore) -> anyhow::Result<MtaSts> {
        let next = MtaSts::new(
            config,
            self.inner.resolver.clone(),
            roots,
            Arc::clone(&self.inner.recorder),
        )?;
        let kept: HashMap<String, Entry> = self
            .inner
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, e)| e.policy.is_some())
            .map(|(d, e)| {
                (
                    d.clone(),
                    Entry {
                        failed: None,
                        ..e.clone()
                    },
                )
            })
            .collect();
        *next.inner.cache.lock().unwrap_or_else(|p| p.into_inner()) = kept;
        Ok(next)
    }

    /// Applies `domain`'s policy to its MX hosts (filtered in place under
    /// `enforce`), unless `[[tls_policy]]` names the domain.
    pub async fn decide(&self, domain: &str, explicit: &TlsPolicies, hosts: &mut Vec<MxHost>) -> Decision {
        if has_explicit_policy(explicit, domain) || domain.starts_with('[') {
            return Decision::None;
        }
        self.start_refresher();
        let Some(policy) = self.policy(domain).await else {
            return Decision::None;
        };
        let applied = Arc::new(Applied {
            domain: domain.to_owned(),
            policy,
            recorder: Arc::clone(&self.inner.recorder),
        });
        match applied.policy.mode {
            Mode::None => Decision::None,
            Mode::Testing => {
                for h in hosts.iter().filter(|h| !applied.policy.matches(&h.name)) {
                    tracing::info!(%domain, mx = %h.name, "MTA-STS testing: MX host does not match the policy");
                }
                Decision::Apply(applied)
            }
            Mode::Enforce => {
                let before = hosts.len();
                hosts.retain(|h| applied.policy.matches(&h.name));
                if hosts.is_empty() {
                    tracing::warn!(%domain, mx_hosts = before, "MTA-STS enforce: no MX host matches the policy");
                    return Decision::Refuse(format!(
                        "451 4.7.5 MTA-STS policy of {domain}: none of its {before} MX hosts matches the policy's mx patterns"
                    ));
                }
                Decision::Apply(applied)
            }
        }
    }

    /// The policy in force for `domain`, fetching it when the TXT id changed.
    pub async fn policy(&self, domain: &str) -> Option<Arc<Policy>> {
        let now = Instant::now();
        let cached = self.cached(domain, now);
        let id = match self.inner.resolver.txt(&format!("_mta-sts.{domain}")).await {
            Ok(Some(records)) => {
                let ids: Vec<String> = records
                    .iter()
                    .filter(|r| r.trim_start().starts_with("v=STSv1"))
                    .filter_map(|r| parse_txt(r))
                    .collect();
                // More than one STSv1 record counts as none (3.1).
                match ids.as_slice() {
                    [id] => id.clone(),
                    _ => return cached,
                }
            }
            Ok(None) => return cached,
            Err(e) => {
                tracing::debug!(%domain, error = %e, "MTA-STS TXT lookup failed");
                return cached;
            }
        };
        if let Some(p) = cached.as_ref().filter(|p| p.id == id) {
            return Some(Arc::clone(p));
        }
        if self.recently_failed(domain, &id, now) {
            return cached;
        }
        match self.fetch(domain, &id).await {
            Ok(policy) => {
                tracing::info!(%domain, id = %policy.id, mode = ?policy.mode, max_age = policy.max_age.as_secs(), "MTA-STS policy fetched");
                let policy = Arc::new(policy);
                self.store(domain, Some(Arc::clone(&policy)), None);
                Some(policy)
            }
            Err(e) => {
                tracing::warn!(%domain, result_type = e.kind.as_str(), reason = %e.reason, "MTA-STS policy fetch failed");
                if cached.is_none() {
                    // Reported although no policy applies: the domain asked for one.
                    self.inner.recorder.record(TlsOutcome {
                        policy_domain: domain.to_owned(),
                        policy: PolicyKind::Sts {
                            policy: Vec::new(),
                            mx: Vec::new(),
                        },
                        failure: Some(Failure {
                            result_type: e.kind,
                            sending_mta_ip: None,
                            receiving_mx_hostname: None,
                            receiving_ip: None,
                            reason: e.reason.clone(),
                        }),
                    });
                }
                self.store(domain, None, Some(id));
                cached
            }
        }
    }

    fn cached(&self, domain: &str, now: Instant) -> Option<Arc<Policy>> {
        let cache = self.inner.cache.lock().unwrap_or_else(|p| p.into_inner());
        let (policy, expires) = cache.get(domain)?.policy.as_ref()?;
        (*expires > now).then(|| Arc::clone(policy))
    }

    fn recently_failed(&self, domain: &str, id: &str, now: Instant) -> bool {
        let cache = self.inner.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .get(domain)
            .and_then(|e| e.failed.as_ref())
            .is_some_and(|(until, failed_id)| *until > now && failed_id == id)
    }

    /// Stores a fetched policy, or a failure (keeping an older policy).
    fn store(&self, domain: &str, policy: Option<Arc<Policy>>, failed_id: Option<String>) {
        let now = Instant::now();
        let mut cache = self.inner.cache.lock().unwrap_or_else(|p| p.into_inner());
        if !cache.contains_key(domain) && cache.len() >= self.inner.config.cache_size {
            cache.retain(|_, e| e.policy.as_ref().is_some_and(|(_, exp)| *exp > now));
            if cache.len() >= self.inner.config.cache_size {
                // Still full of live policies: drop the one expiring first.
                let first = cache
                    .iter()
                    .filter_map(|(d, e)| e.policy.as_ref().map(|(_, exp)| (*exp, d.clone())))
                    .min();
                if let Some((_, d)) = first {
                    cache.remove(&d);
                }
            }
        }
        let entry = cache.entry(domain.to_owned()).or_insert(Entry {
            policy: None,
            failed: None,
        });
        match policy {
            Some(p) => {
                let expires = now + p.max_age;
                entry.policy = Some((p, expires));
                entry.failed = None;
            }
            None => entry.failed = failed_id.map(|id| (now + FAILED_FETCH_TTL, id)),
        }
    }

    /// Fetches and parses the policy of `domain` (3.3).
    pub async fn fetch(&self, domain: &str, id: &str) -> Result<Policy, FetchError> {
        let timeout = self.inner.config.fetch_timeout;
        match tokio::time::timeout(timeout, self.fetch_text(domain)).await {
            Ok(Ok(text)) => Policy::parse(id, &text).map_err(|reason| FetchError {
                kind: FailureType::StsPolicyInvalid,
                reason,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(FetchError {
                kind: FailureType::StsPolicyFetchError,
                reason: format!("timed out after {}s", timeout.as_secs()),
            }),
        }
    }

    async fn fetch_text(&self, domain: &str) -> Result<String, FetchError> {
        let fetch_error = |reason: String| FetchError {
            kind: FailureType::StsPolicyFetchError,
            reason,
        };
        let host = format!("mta-sts.{domain}");
        let port = self.inner.config.policy_port;
        let addrs = self
            .inner
            .resolver
            .host_addresses(&host)
            .await
            .map_err(|e: ResolveError| fetch_error(e.to_string()))?;
        let mut last = format!("{host}: no address");
        let mut stream = None;
        for ip in addrs.iter().take(4) {
            match tokio::net::TcpStream::connect((*ip, port)).await {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = format!("connect to {ip}:{port}: {e}"),
            }
        }
        let stream = stream.ok_or_else(|| fetch_error(last))?;
        let name = ServerName::try_from(host.clone()).map_err(|e| fetch_error(format!("{host}: {e}")))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::clone(&self.inner.https))
            .connect(name, stream)
            .await
            .map_err(|e| match verification_failure(&e) {
                Some(reason) => FetchError {
                    kind: FailureType::StsWebpkiInvalid,
                    reason: format!("{host}: {reason}"),
                },
                None => fetch_error(format!("TLS with {host}: {e}")),
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| fetch_error(format!("HTTP with {host}: {e}")))?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let request = hyper::Request::get("/.well-known/mta-sts.txt")
            .header(hyper::header::HOST, host.as_str())
            .header(hyper::header::USER_AGENT, "tern-mta-sts")
            .body(Empty::<Bytes>::new())
            .map_err(|e| fetch_error(e.to_string()))?;
        let result = async {
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| fetch_error(format!("HTTP with {host}: {e}")))?;
            // 3.3: no redirects; only 200 is a policy.
            if response.status() != hyper::StatusCode::OK {
                return Err(fetch_error(format!("{host} answered HTTP {}", response.status())));
            }
            let content_type = response
                .headers()
                .get(hyper::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_ascii_lowercase();
            if !content_type.starts_with("text/plain") {
                return Err(FetchError {
                    kind: FailureType::StsPolicyInvalid,
                    reason: format!("{host}: media type {content_type:?} is not text/plain"),
                });
            }
            let limit = self.inner.config.max_policy_size;
            let body = Limited::new(response.into_body(), limit)
                .collect()
                .await
                .map_err(|e| FetchError {
                    kind: FailureType::StsPolicyInvalid,
                    reason: format!("{host}: policy body: {e} (limit {limit} bytes)"),
                })?
                .to_bytes();
            String::from_utf8(body.to_vec()).map_err(|_| FetchError {
                kind: FailureType::StsPolicyInvalid,
                reason: format!("{host}: policy is not UTF-8"),
            })
        }
        .await;
        driver.abort();
        result
    }

    /// Starts the background refresh once (on the runtime of the first plan).
    fn start_refresher(&self) {
        if self.inner.refresher.set(()).is_err() {
            return;
        }
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(REFRESH_EVERY);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                MtaSts { inner }.refresh_round().await;
            }
        });
    }

    /// Refetches policies near expiry: a domain whose TXT record or policy
    /// host is briefly gone keeps its protection (RFC 8461 10.2).
    async fn refresh_round(&self) {
        let now = Instant::now();
        let due: Vec<String> = {
            let cache = self.inner.cache.lock().unwrap_or_else(|p| p.into_inner());
            cache
                .iter()
                .filter_map(|(d, e)| {
                    let (p, expires) = e.policy.as_ref()?;
                    let before = REFRESH_BEFORE.min(p.max_age / 10);
                    (*expires > now && *expires <= now + before).then(|| d.clone())
                })
                .take(REFRESH_BATCH)
                .collect()
        };
        for domain in due {
            let id = match self.inner.resolver.txt(&format!("_mta-sts.{domain}")).await {
                Ok(Some(records)) => records.iter().find_map(|r| parse_txt(r)),
                _ => None,
            };
            // Without a TXT record the cached policy's id is refetched: the
            // policy host may still serve it.
            let id = match id.or_else(|| self.cached(&domain, now).map(|p| p.id.clone())) {
                Some(id) => id,
                None => continue,
            };
            match self.fetch(&domain, &id).await {
                Ok(policy) => {
                    tracing::debug!(%domain, id = %policy.id, "MTA-STS policy refreshed");
                    self.store(&domain, Some(Arc::new(policy)), None);
                }
                Err(e) => tracing::info!(%domain, reason = %e.reason, "MTA-STS refresh failed; cached policy kept"),
            }
        }
    }
}

/// The message asks, with `TLS-Required: No` (RFC 8689 5), that recipient
/// domains' TLS policies (MTA-STS) be ignored for it; the operator's own
/// `[[tls_policy]]` still applies.
pub fn tls_optional(message: &[u8]) -> bool {
    super::header_value(message, "tls-required").is_some_and(|v| v.trim().eq_ignore_ascii_case("no"))
}

/// Whether `[[tls_policy]]` or `require_tls_domains` names `domain`.
pub fn has_explicit_policy(policies: &TlsPolicies, domain: &str) -> bool {
    policies.require_tls_domains.iter().any(|d| d == domain)
        || policies
            .entries
            .iter()
            .any(|e| e.domain == domain || (e.domain.starts_with('.') && domain.ends_with(e.domain.as_str())))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn policies_parse() {
        let p = Policy::parse(
            "abc",
            "version: STSv1\r\nmode: enforce\r\nmx: mx1.example.com\r\nmx: *.example.net\r\nmax_age: 604800\r\n",
        )
        .unwrap();
        assert_eq!(p.mode, Mode::Enforce);
        assert_eq!(p.mx, ["mx1.example.com", "*.example.net"]);
        assert_eq!(p.max_age, Duration::from_secs(604_800));
        assert!(p.matches("MX1.example.com."));
        assert!(p.matches("a.example.net"));
        assert!(!p.matches("a.b.example.net"), "a wildcard is one label");
        assert!(!p.matches("example.net"));
        assert!(!p.matches("mx2.example.com"));
        assert!(Policy::parse("x", "version: STSv1\nmode: testing\nmax_age: 9999999999\nmx: a.b\n").is_ok());
        assert!(
            Policy::parse("x", "version: STSv1\nmode: testing\nmax_age: 99999999999\nmx: a.b\n").is_err(),
            "1*10DIGIT"
        );
        assert_eq!(
            Policy::parse("x", "version: STSv1\nmode: none\nmax_age: 8640000000\n")
                .unwrap()
                .max_age,
            Duration::from_secs(MAX_AGE_LIMIT)
        );
        for bad in [
            "version: STSv2\nmode: enforce\nmx: a\nmax_age: 1\n",
            "version: STSv1\nmode: strict\nmx: a\nmax_age: 1\n",
            "version: STSv1\nmode: enforce\nmax_age: 1\n",
            "version: STSv1\nmode: enforce\nmx: a\n",
            "version: STSv1\nmode: enforce\nmx: a\nmax_age: -1\n",
            "<html>not a policy</html>",
        ] {
            assert!(Policy::parse("x", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tls_required_no_is_read_from_the_header() {
        assert!(tls_optional(b"Subject: x\r\nTLS-Required:  No \r\n\r\nbody\r\n"));
        assert!(!tls_optional(b"Subject: x\r\n\r\nTLS-Required: No\r\n"));
        assert!(!tls_optional(b"TLS-Required: Yes\r\n\r\n"));
    }

    #[test]
    fn txt_records_parse() {
        assert_eq!(
            parse_txt("v=STSv1; id=20160831085700Z;").as_deref(),
            Some("20160831085700Z")
        );
        assert_eq!(parse_txt("v=STSv1;id=abc").as_deref(), Some("abc"));
        assert_eq!(parse_txt("v=STSv2; id=abc"), None);
        assert_eq!(parse_txt("v=STSv1; id=a-b"), None);
        assert_eq!(parse_txt("v=STSv1;"), None);
    }
}
