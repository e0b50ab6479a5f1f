//! Inbound authentication checks (the MX role), with mail-auth over DNS:
//! SPF (RFC 7208) of the HELO and MAIL FROM identities, every DKIM
//! signature, the ARC chain, DMARC (RFC 7489) with SPF/DKIM alignment, and
//! iprev. The results go into one `Authentication-Results` field (RFC 8601)
//! plus `Received-SPF`, both prepended above our `Received` field; incoming
//! `Authentication-Results` fields that claim our host name are removed.
//!
//! Only mail from clients that did not authenticate and are outside
//! `[policy] relay_networks` is checked, once, at the end of DATA. DMARC
//! `p=reject` refuses the message, `p=quarantine` marks it with
//! `X-Tern-Quarantine: dmarc` (see [`verdict`] for every rule); a DNS
//! temperror that could change the outcome gets a 4xx, never a 5xx.
//!
//! mail-auth is async over hickory; the whole check runs on a blocking
//! thread (message parsing, body hashes and RSA are CPU work proportional
//! to the message) that drives the DNS futures on the runtime's reactor,
//! bounded by `[inbound] timeout_secs`.

pub mod headers;
pub mod verdict;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use mail_auth::common::headers::HeaderWriter as _;
use mail_auth::common::parse::TxtRecordParser as _;
use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::dmarc::{Dmarc, Policy};
use mail_auth::hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use mail_auth::hickory_resolver::proto::rr::RData;
use mail_auth::{
    AuthenticatedMessage, AuthenticationResults, DkimResult, DmarcOutput, DmarcResult, IprevResult,
    MessageAuthenticator, ReceivedSpf, SpfOutput, SpfResult,
};
use rand::Rng as _;
use tracing::{info, warn};

use super::spf;
use crate::config::Config;
use crate::envelope::Envelope;
use tern_smtp::reply::Reply;
use verdict::{DmarcFinding, DmarcOutcome, Findings, Pct, Rules, Verdict};

/// DNS answers hickory keeps between messages (TTLs honoured); mail-auth's
/// own parsed-record caches are not used.
const DNS_CACHE_ENTRIES: u64 = 4096;

/// Tries per DNS query and server, as for delivery's resolver.
const DNS_ATTEMPTS: usize = 2;

/// A mail-auth authenticator over `nameservers` (UDP, TCP on truncation),
/// or the system's resolv.conf when the list is empty.
pub fn authenticator(nameservers: &[SocketAddr], timeout: Duration) -> anyhow::Result<MessageAuthenticator> {
    let (config, mut opts) = if nameservers.is_empty() {
        mail_auth::hickory_resolver::system_conf::read_system_conf()
            .context("cannot read the system resolver configuration")?
    } else {
        let servers = nameservers
            .iter()
            .map(|addr| {
                let mut server = NameServerConfig::udp_and_tcp(addr.ip());
                for connection in &mut server.connections {
                    connection.port = addr.port();
                }
                server
            })
            .collect();
        (ResolverConfig::from_name_servers(servers), ResolverOpts::default())
    };
    opts.timeout = timeout;
    opts.attempts = DNS_ATTEMPTS;
    opts.cache_size = DNS_CACHE_ENTRIES;
    opts.use_hosts_file = ResolveHosts::Never;
    MessageAuthenticator::new(config, opts).context("cannot build the DNS resolver for inbound checks")
}

/// SPF `check_host()` of the HELO identity (RFC 7208 2.3); `none` for an
/// address literal or a name that is not a domain.
pub async fn spf_helo(auth: &MessageAuthenticator, ip: IpAddr, helo: &str, hostname: &str) -> SpfOutput {
    if !is_spf_domain(helo) {
        return SpfOutput::new(helo.to_owned()).with_result(SpfResult::None);
    }
    let sender = format!("postmaster@{helo}");
    let params = spf::Params {
        ip,
        helo,
        sender: &sender,
        receiver: hostname,
    };
    spf::check_host(auth.resolver(), &params, helo).await
}

/// The SPF result of the envelope: the MAIL FROM identity (RFC 7208 2.4),
/// or the HELO identity for the null reverse-path. This is the result the
/// RFC 7208 test suite describes, and the one DMARC aligns.
pub async fn spf_envelope(
    auth: &MessageAuthenticator,
    ip: IpAddr,
    helo: &str,
    mail_from: &str,
    hostname: &str,
) -> SpfOutput {
    if mail_from.is_empty() {
        return spf_helo(auth, ip, helo, hostname).await;
    }
    let domain = mail_from.rsplit_once('@').map_or(helo, |(_, d)| d);
    if !is_spf_domain(domain) {
        return SpfOutput::new(domain.to_owned()).with_result(SpfResult::None);
    }
    let params = spf::Params {
        ip,
        helo,
        sender: mail_from,
        receiver: hostname,
    };
    spf::check_host(auth.resolver(), &params, domain).await
}

/// RFC 7208 4.3: a malformed domain (empty or over-long label, not
/// multi-label, an address literal) gets `none` without any lookup.
fn is_spf_domain(domain: &str) -> bool {
    let domain = domain.strip_suffix('.').unwrap_or(domain);
    let labels = domain.split('.');
    domain.len() <= 253
        && !domain.starts_with('[')
        && domain.parse::<IpAddr>().is_err()
        && labels.clone().count() >= 2
        && labels.clone().all(|l| (1..=63).contains(&l.len()))
}

/// The inbound checks of one node (cheap to clone).
#[derive(Clone)]
pub struct Checker {
    inner: Arc<Inner>,
}

struct Inner {
    authenticator: MessageAuthenticator,
    /// Our authserv-id (`[node] hostname`).
    hostname: String,
    /// Clients in these networks are trusted and not checked (a reload
    /// builds a new checker).
    relay_networks: Vec<ipnet::IpNet>,
    rules: Rules,
    timeout: Duration,
    /// ARC sealing of forwarded mail (`[arc]`), see [`super::arc`].
    arc: Option<super::arc::Sealer>,
    /// DMARC aggregate reports: each evaluation is counted here.
    dmarc_reports: std::sync::OnceLock<Arc<crate::reports::dmarc::DmarcRecorder>>,
}

impl std::fmt::Debug for Checker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checker")
            .field("hostname", &self.inner.hostname)
            .field("rules", &self.inner.rules)
            .field("timeout", &self.inner.timeout)
            .finish_non_exhaustive()
    }
}

/// Who sent the message, as the checks see it.
struct Identity {
    ip: IpAddr,
    helo: String,
    mail_from: String,
    /// Add an ARC set (the sealer is on and the message is forwarded).
    seal: bool,
}

/// The results of one check, before the decision.
struct Report {
    findings: Findings,
    /// `Authentication-Results` and `Received-SPF`, CRLF-terminated.
    fields: String,
    /// One word per method, for the log line.
    summary: Summary,
    /// Our ARC set, CRLF-terminated, when the message is sealed.
    arc_set: Option<String>,
    /// For DMARC aggregate reports (disposition set once decided).
    dmarc_evaluation: Option<crate::reports::dmarc::Evaluation>,
}

#[derive(Default)]
struct Summary {
    spf_helo: String,
    spf_mailfrom: String,
    dkim: String,
    arc: String,
    dmarc: String,
    iprev: String,
}

impl Checker {
    /// The checker `[inbound]` asks for, or `None` when it is disabled.
    pub fn from_config(config: &Config) -> anyhow::Result<Option<Checker>> {
        Checker::from_config_reusing(config, None)
    }

    /// [`Checker::from_config`], asking DNS through `resolver` when given (a
    /// reload keeps the running checker's resolver and its cache; `[dns]`
    /// needs a restart anyway).
    pub fn from_config_reusing(
        config: &Config,
        resolver: Option<MessageAuthenticator>,
    ) -> anyhow::Result<Option<Checker>> {
        if !config.inbound.enabled {
            return Ok(None);
        }
        let authenticator = match resolver {
            Some(resolver) => resolver,
            None => authenticator(&config.dns_nameservers, config.dns_timeout)?,
        };
        Ok(Some(
            Checker::new(
                authenticator,
                config.hostname.clone(),
                config.relay_networks.clone(),
                Rules {
                    dmarc_policy: config.inbound.dmarc_policy,
                    spf_fail: config.inbound.spf_fail,
                },
                config.inbound.timeout,
            )
            .with_arc_sealer(super::arc::Sealer::from_config(config)?),
        ))
    }

    /// Seals forwarded mail with `sealer` (only before the checker is shared).
    pub fn with_arc_sealer(mut self, sealer: Option<super::arc::Sealer>) -> Checker {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.arc = sealer;
        }
        self
    }

    pub fn new(
        authenticator: MessageAuthenticator,
        hostname: String,
        relay_networks: Vec<ipnet::IpNet>,
        rules: Rules,
        timeout: Duration,
    ) -> Checker {
        Checker {
            inner: Arc::new(Inner {
                authenticator,
                hostname,
                relay_networks,
                rules,
                timeout,
                arc: None,
                dmarc_reports: std::sync::OnceLock::new(),
            }),
        }
    }

    /// The DNS resolver of the checks, for [`Checker::from_config_reusing`].
    pub fn resolver(&self) -> MessageAuthenticator {
        self.inner.authenticator.clone()
    }

    /// Counts every DMARC evaluation in `recorder` (`[dmarc_reports]`).
    pub fn record_dmarc(&self, recorder: Arc<crate::reports::dmarc::DmarcRecorder>) {
        let _ = self.inner.dmarc_reports.set(recorder);
    }

    /// The client address to check, or `None` for trusted mail: an
    /// authenticated session or a client in `relay_networks`.
    pub fn client_to_check(&self, envelope: &Envelope) -> Option<IpAddr> {
        if envelope.auth_user.is_some() {
            return None;
        }
        let Ok(ip) = envelope.client_ip.parse::<IpAddr>() else {
            warn!(client = %envelope.client_ip, "inbound checks skipped: client address is not an IP address");
            return None;
        };
        let ip = ip.to_canonical();
        (!self.inner.relay_networks.iter().any(|n| n.contains(&ip))).then_some(ip)
    }

    /// Checks an untrusted message: the bytes to queue (with our header
    /// fields on top) or the reply that refuses or defers it.
    pub async fn check(&self, envelope: &Envelope, body: Vec<u8>) -> Result<Vec<u8>, Reply> {
        let Some(ip) = self.client_to_check(envelope) else {
            return Ok(body);
        };
        let identity = Identity {
            ip,
            helo: envelope.helo.clone(),
            mail_from: envelope.reverse_path.clone(),
            seal: self.inner.arc.as_ref().is_some_and(|a| a.wants(envelope)),
        };
        let inner = Arc::clone(&self.inner);
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || inner.run(&handle, &identity, body))
            .await
            .unwrap_or_else(|e| {
                warn!(client = %ip, error = %e, "inbound checks failed");
                Err(Reply::new(
                    451,
                    "4.3.0",
                    "Local error while checking the message; try again later",
                ))
            })
    }
}

impl Inner {
    /// The whole check on a blocking thread; DNS runs on `handle`'s reactor.
    fn run(&self, handle: &tokio::runtime::Handle, id: &Identity, body: Vec<u8>) -> Result<Vec<u8>, Reply> {
        let started = Instant::now();
        let report = handle.block_on(async { tokio::time::timeout(self.timeout, self.evaluate(id, &body)).await });
        let report = report.unwrap_or_else(|_| Report {
            findings: Findings::timed_out(),
            fields: format!(
                "Authentication-Results: {}; none (checks timed out after {}s)\r\n",
                self.hostname,
                self.timeout.as_secs()
            ),
            summary: Summary {
                dmarc: "timeout".into(),
                ..Summary::default()
            },
            arc_set: None,
            dmarc_evaluation: None,
        });
        let sample = rand::thread_rng().gen_range(0..100u8);
        let verdict = verdict::decide(self.rules, &report.findings, sample);
        let s = &report.summary;
        info!(
            client = %id.ip,
            helo = %id.helo,
            mail_from = %id.mail_from,
            spf_helo = %s.spf_helo,
            spf_mailfrom = %s.spf_mailfrom,
            dkim = %s.dkim,
            arc = %s.arc,
            dmarc = %s.dmarc,
            from_domain = %report.findings.dmarc.domain,
            iprev = %s.iprev,
            arc_sealed = report.arc_set.is_some(),
            verdict = %verdict_word(&verdict),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "inbound checks"
        );
        if let (Some(recorder), Some(mut e)) = (self.dmarc_reports.get(), report.dmarc_evaluation) {
            e.row.disposition = match verdict {
                Verdict::Reject(_) => "reject",
                Verdict::Quarantine => "quarantine",
                _ => "none",
            }
            .into();
            if !matches!(verdict, Verdict::Defer(_)) {
                recorder.record(e);
            }
        }
        // The ARC set goes on top: it seals the results below it.
        let mut top = report.arc_set.unwrap_or_default();
        top.push_str(&report.fields);
        match verdict {
            Verdict::Reject(reply) | Verdict::Defer(reply) => return Err(reply),
            Verdict::Quarantine => top.push_str("X-Tern-Quarantine: dmarc\r\n"),
            Verdict::Accept => {}
        }
        let forged = headers::forged_results(&body, &self.hostname);
        Ok(headers::rebuild(top.as_bytes(), &body, &forged))
    }

    async fn evaluate(&self, id: &Identity, body: &[u8]) -> Report {
        let auth = &self.authenticator;
        let host = self.hostname.as_str();
        let (ip, helo, mail_from) = (id.ip, id.helo.as_str(), id.mail_from.as_str());
        // Our Received field is on top, so only an empty input has no header.
        let message = AuthenticatedMessage::parse(body).unwrap_or_default();
        let (helo_spf, mail_from_spf, dkim, arc, iprev) = tokio::join!(
            spf_helo(auth, ip, helo, host),
            async {
                match mail_from.is_empty() {
                    true => None,
                    false => Some(spf_envelope(auth, ip, helo, mail_from, host).await),
                }
            },
            auth.verify_dkim(&message),
            auth.verify_arc(&message),
            auth.verify_iprev(ip),
        );
        let envelope_spf = mail_from_spf.as_ref().unwrap_or(&helo_spf);
        let spf_domain = match mail_from.rsplit_once('@') {
            Some((_, domain)) => domain,
            None => helo,
        };
        let dmarc = auth
            .verify_dmarc(DmarcParameters::new(&message, &dkim, spf_domain, envelope_spf))
            .await;
        let finding = self.dmarc_finding(&dmarc).await;

        // Authentication-Results, method by method (RFC 8601 2.7).
        let tail = |ar: AuthenticationResults<'_>| ar.to_string().get(host.len()..).unwrap_or_default().to_owned();
        let mut ar = AuthenticationResults::new(host).with_spf_ehlo_result(&helo_spf, ip, helo);
        if let Some(spf) = &mail_from_spf {
            ar = ar.with_spf_mailfrom_result(spf, ip, mail_from, helo);
        }
        let mut results = ar.to_string();
        if dkim.is_empty() {
            results.push_str(";\r\n\tdkim=none");
        } else {
            results.push_str(&tail(
                AuthenticationResults::new(host).with_dkim_results(&dkim, message.from()),
            ));
        }
        results.push_str(&tail(AuthenticationResults::new(host).with_arc_result(&arc, ip)));
        if dmarc.domain().is_empty() {
            results.push_str(";\r\n\tdmarc=none");
        } else {
            results.push_str(&tail(AuthenticationResults::new(host).with_dmarc_result(&dmarc)));
        }
        results.push_str(&tail(AuthenticationResults::new(host).with_iprev_result(&iprev, ip)));
        let received_spf = ReceivedSpf::new(envelope_spf, ip, helo, mail_from, host).to_header();
        let arc_set = match (&self.arc, id.seal) {
            (Some(sealer), true) => {
                // The same results, for ARC-Authentication-Results.
                let mut aar = AuthenticationResults::new(&sealer.authserv_id).with_spf_ehlo_result(&helo_spf, ip, helo);
                if let Some(spf) = &mail_from_spf {
                    aar = aar.with_spf_mailfrom_result(spf, ip, mail_from, helo);
                }
                let aar = aar
                    .with_dkim_results(&dkim, message.from())
                    .with_arc_result(&arc, ip)
                    .with_dmarc_result(&dmarc)
                    .with_iprev_result(&iprev, ip);
                sealer.seal(&message, &aar, &arc)
            }
            _ => None,
        };
        let pct = match finding.pct {
            Pct::Known(n) => n,
            Pct::Unknown => 100,
        };
        let dmarc_evaluation = self.dmarc_reports.get().and_then(|_| {
            crate::reports::dmarc::evaluation(ip, mail_from, helo, envelope_spf, &dkim, &dmarc, "none", pct)
        });

        Report {
            findings: Findings {
                spf: envelope_spf.result(),
                dmarc: finding,
            },
            fields: format!("Authentication-Results: {results}\r\n{received_spf}"),
            summary: Summary {
                spf_helo: spf_word(helo_spf.result()).into(),
                spf_mailfrom: mail_from_spf.as_ref().map_or("-", |s| spf_word(s.result())).into(),
                dkim: match dkim.is_empty() {
                    true => "none".into(),
                    false => dkim.iter().map(|d| dkim_word(d.result())).collect::<Vec<_>>().join(","),
                },
                arc: dkim_word(arc.result()).into(),
                dmarc: dmarc_word(&dmarc.result()).into(),
                iprev: iprev_word(iprev.result()).into(),
            },
            arc_set,
            dmarc_evaluation,
        }
    }

    /// The DMARC result as the decision needs it, with pct= read back for
    /// a failing message whose policy is not none.
    async fn dmarc_finding(&self, dmarc: &DmarcOutput) -> DmarcFinding {
        let result = match dmarc.result() {
            DmarcResult::Pass => DmarcOutcome::Pass,
            DmarcResult::Fail(_) => DmarcOutcome::Fail,
            DmarcResult::TempError(_) => DmarcOutcome::TempError,
            DmarcResult::PermError(_) => DmarcOutcome::PermError,
            DmarcResult::None => DmarcOutcome::None,
        };
        let record = dmarc.dmarc_record();
        let policy = match record {
            Some(_) => Some(dmarc.policy()),
            // No record because the lookup failed: the policy is unknown.
            None if result == DmarcOutcome::TempError => None,
            None => Some(Policy::None),
        };
        let pct = match (record, policy) {
            // t=y (DMARCbis) already lowered the policy and replaces pct=.
            (Some(record), Some(Policy::Reject | Policy::Quarantine)) if result == DmarcOutcome::Fail && !record.t => {
                self.pct_of_record(dmarc.domain(), record).await
            }
            _ => Pct::Known(100),
        };
        DmarcFinding {
            domain: dmarc.domain().to_owned(),
            result,
            policy,
            pct,
        }
    }

    /// pct= of the DMARC record mail-auth applied (mail-auth implements
    /// DMARCbis, which dropped pct=): the first `_dmarc` TXT record, from
    /// the From domain up towards the root, that parses to the same record.
    async fn pct_of_record(&self, from_domain: &str, applied: &Dmarc) -> Pct {
        let resolver = self.authenticator.resolver();
        let mut domain = from_domain.trim_end_matches('.');
        loop {
            match resolver.txt_lookup(format!("_dmarc.{domain}.")).await {
                Ok(lookup) => {
                    for record in lookup.answers() {
                        let RData::TXT(txt) = &record.data else {
                            continue;
                        };
                        let text: Vec<u8> = txt.txt_data.iter().flat_map(|s| s.iter().copied()).collect();
                        if Dmarc::parse(&text).is_ok_and(|d| d == *applied) {
                            return Pct::Known(verdict::pct_of(&String::from_utf8_lossy(&text)));
                        }
                    }
                }
                Err(e) if e.is_no_records_found() => {}
                Err(_) => return Pct::Unknown,
            }
            match domain.split_once('.') {
                Some((_, parent)) if !parent.is_empty() => domain = parent,
                _ => return Pct::Known(100),
            }
        }
    }
}

fn verdict_word(v: &Verdict) -> String {
    match v {
        Verdict::Accept => "accept".into(),
        Verdict::Quarantine => "quarantine".into(),
        Verdict::Reject(r) | Verdict::Defer(r) => r.code.to_string(),
    }
}

fn spf_word(r: SpfResult) -> &'static str {
    match r {
        SpfResult::Pass => "pass",
        SpfResult::Fail => "fail",
        SpfResult::SoftFail => "softfail",
        SpfResult::Neutral => "neutral",
        SpfResult::TempError => "temperror",
        SpfResult::PermError => "permerror",
        SpfResult::None => "none",
    }
}

fn dkim_word(r: &DkimResult) -> &'static str {
    match r {
        DkimResult::Pass => "pass",
        DkimResult::Neutral(_) => "neutral",
        DkimResult::Fail(_) => "fail",
        DkimResult::PermError(_) => "permerror",
        DkimResult::TempError(_) => "temperror",
        DkimResult::None => "none",
    }
}

fn dmarc_word(r: &DmarcResult) -> &'static str {
    match r {
        DmarcResult::Pass => "pass",
        DmarcResult::Fail(_) => "fail",
        DmarcResult::TempError(_) => "temperror",
        DmarcResult::PermError(_) => "permerror",
        DmarcResult::None => "none",
    }
}

fn iprev_word(r: &IprevResult) -> &'static str {
    match r {
        IprevResult::Pass => "pass",
        IprevResult::Fail(_) => "fail",
        IprevResult::TempError(_) => "temperror",
        IprevResult::PermError(_) => "permerror",
        IprevResult::None => "none",
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::config::{DmarcPolicyMode, SpfFailAction};
    use crate::delivery::testdns::{DnsServer, ServfailServer};

    const ZONE: &str = r#"
txt-record=sender.test,"v=spf1 ip4:127.0.0.1 -all"
txt-record=_dmarc.sender.test,"v=DMARC1; p=reject"
txt-record=client.sender.test,"v=spf1 a -all"
host-record=client.sender.test,127.0.0.1
ptr-record=1.0.0.127.in-addr.arpa,client.sender.test
txt-record=spoof.test,"v=spf1 ip4:192.0.2.1 -all"
txt-record=_dmarc.spoof.test,"v=DMARC1; p=reject"
txt-record=quar.test,"v=spf1 -all"
txt-record=_dmarc.quar.test,"v=DMARC1; p=quarantine"
txt-record=sample.test,"v=spf1 -all"
txt-record=_dmarc.sample.test,"v=DMARC1; p=reject; pct=0"
txt-record=_dmarc.sp.test,"v=DMARC1; p=reject; sp=none"
txt-record=_dmarc.sp2.test,"v=DMARC1; p=none; sp=reject"
txt-record=broken.test,"v=spf1 a:mail.broken.123 -all"
txt-record=_dmarc.broken.test,"v=DMARC1; p=reject"
"#;

    const ENFORCE: Rules = Rules {
        dmarc_policy: DmarcPolicyMode::Enforce,
        spf_fail: SpfFailAction::Header,
    };

    fn checker(dns: SocketAddr, rules: Rules, timeout: Duration) -> Checker {
        let auth = authenticator(&[dns], Duration::from_secs(1)).unwrap();
        Checker::new(
            auth,
            "mx.test".into(),
            vec!["192.0.2.0/24".parse().unwrap()],
            rules,
            timeout,
        )
    }

    fn envelope(mail_from: &str) -> Envelope {
        Envelope {
            reverse_path: mail_from.into(),
            helo: "client.sender.test".into(),
            client_ip: "127.0.0.1".into(),
            ..Envelope::default()
        }
    }

    fn message(from: &str) -> Vec<u8> {
        format!(
            "Received: from client.sender.test ([127.0.0.1])\r\n\tby mx.test (Tern) with ESMTP id Q1\r\n\
             Authentication-Results: mx.test; dmarc=pass\r\n\
             Authentication-Results: elsewhere.test; dmarc=pass\r\n\
             From: <{from}>\r\nSubject: t\r\n\r\nhello\r\n"
        )
        .into_bytes()
    }

    /// The header fields we added (everything above our Received field).
    fn added(out: &[u8]) -> String {
        let text = String::from_utf8_lossy(out);
        text[..text.find("Received: ").unwrap()].to_owned()
    }

    #[tokio::test]
    async fn aligned_spf_passes_and_forged_results_go() {
        let dns = DnsServer::start(ZONE);
        let c = checker(dns.addr, ENFORCE, Duration::from_secs(10));
        let out = c
            .check(&envelope("a@sender.test"), message("a@sender.test"))
            .await
            .unwrap();
        let top = added(&out);
        assert!(
            top.starts_with("Authentication-Results: mx.test;\r\n\tspf=pass"),
            "{top}"
        );
        for want in [
            "smtp.helo=client.sender.test",
            "smtp.mailfrom=a@sender.test",
            "dkim=none",
            "arc=none",
            "dmarc=pass header.from=sender.test policy.dmarc=reject",
            "iprev=pass policy.iprev=127.0.0.1",
            "\r\nReceived-SPF: pass",
        ] {
            assert!(top.contains(want), "{want:?} missing in {top}");
        }
        assert_eq!(top.matches("spf=pass").count(), 2, "{top}");
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.matches("Authentication-Results: mx.test").count(), 1, "{text}");
        assert!(text.contains("Authentication-Results: elsewhere.test; dmarc=pass\r\n"));
        assert!(text.ends_with("From: <a@sender.test>\r\nSubject: t\r\n\r\nhello\r\n"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn published_policies_are_applied() {
        let dns = DnsServer::start(ZONE);
        let c = checker(dns.addr, ENFORCE, Duration::from_secs(10));
        let err = c
            .check(&envelope("x@spoof.test"), message("x@spoof.test"))
            .await
            .unwrap_err();
        assert_eq!((err.code, err.enhanced.as_deref()), (550, Some("5.7.1")));
        assert_eq!(err.text(), "Message rejected: DMARC policy of spoof.test");
        // SPF passes for the envelope, but the From domain is not aligned.
        let err = c
            .check(&envelope("a@sender.test"), message("ceo@spoof.test"))
            .await
            .unwrap_err();
        assert_eq!(err.code, 550);

        let out = c.check(&envelope("x@quar.test"), message("x@quar.test")).await.unwrap();
        let top = added(&out);
        assert!(top.ends_with("X-Tern-Quarantine: dmarc\r\n"), "{top}");
        assert!(top.contains("dmarc=fail"), "{top}");
        // pct=0: outside the sample, reject becomes quarantine.
        let top = added(
            &c.check(&envelope("x@sample.test"), message("x@sample.test"))
                .await
                .unwrap(),
        );
        assert!(top.contains("X-Tern-Quarantine: dmarc"), "{top}");
        // sp= governs subdomains.
        let top = added(
            &c.check(&envelope("x@news.sp.test"), message("x@news.sp.test"))
                .await
                .unwrap(),
        );
        assert!(top.contains("dmarc=fail") && !top.contains("Quarantine"), "{top}");
        let err = c
            .check(&envelope("x@news.sp2.test"), message("x@news.sp2.test"))
            .await
            .unwrap_err();
        assert_eq!(err.text(), "Message rejected: DMARC policy of news.sp2.test");
        // A broken SPF record is a permanent error: p=reject refuses with
        // 550 (not a 451 that would make the sender retry for days).
        let err = c
            .check(&envelope("x@broken.test"), message("x@broken.test"))
            .await
            .unwrap_err();
        assert_eq!((err.code, err.enhanced.as_deref()), (550, Some("5.7.1")), "{err:?}");
        // The null sender is checked with the HELO identity.
        let top = added(&c.check(&envelope(""), message("a@sender.test")).await.unwrap());
        assert!(
            top.contains("spf=pass") && top.contains("smtp.helo=client.sender.test"),
            "{top}"
        );
        assert!(!top.contains("smtp.mailfrom"), "{top}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn monitor_records_and_spf_reject_refuses() {
        let dns = DnsServer::start(ZONE);
        let monitor = Rules {
            dmarc_policy: DmarcPolicyMode::Monitor,
            spf_fail: SpfFailAction::Header,
        };
        let c = checker(dns.addr, monitor, Duration::from_secs(10));
        let top = added(
            &c.check(&envelope("x@spoof.test"), message("x@spoof.test"))
                .await
                .unwrap(),
        );
        assert!(top.contains("spf=fail") && top.contains("dmarc=fail"), "{top}");
        assert!(!top.contains("Quarantine"), "{top}");

        let strict = Rules {
            dmarc_policy: DmarcPolicyMode::Monitor,
            spf_fail: SpfFailAction::Reject,
        };
        let c = checker(dns.addr, strict, Duration::from_secs(10));
        let err = c
            .check(&envelope("x@quar.test"), message("a@sender.test"))
            .await
            .unwrap_err();
        assert_eq!((err.code, err.enhanced.as_deref()), (550, Some("5.7.23")));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn trusted_clients_are_not_checked() {
        // A server that never answers: a lookup would take the whole timeout.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let c = checker(silent.local_addr().unwrap(), ENFORCE, Duration::from_secs(30));
        let started = Instant::now();
        let mut trusted = envelope("x@spoof.test");
        trusted.client_ip = "192.0.2.7".into();
        assert_eq!(
            c.check(&trusted, message("x@spoof.test")).await.unwrap(),
            message("x@spoof.test")
        );
        let mut authenticated = envelope("x@spoof.test");
        authenticated.auth_user = Some("alice".into());
        assert_eq!(
            c.check(&authenticated, message("x@spoof.test")).await.unwrap(),
            message("x@spoof.test")
        );
        let mut mapped = envelope("x@spoof.test");
        mapped.client_ip = "::ffff:192.0.2.8".into();
        assert!(c.client_to_check(&mapped).is_none());
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dns_failures_defer_and_never_reject() {
        let servfail = ServfailServer::start().await;
        let c = checker(servfail.addr, ENFORCE, Duration::from_secs(10));
        let err = c
            .check(&envelope("x@spoof.test"), message("x@spoof.test"))
            .await
            .unwrap_err();
        assert_eq!((err.code, err.enhanced.as_deref()), (451, Some("4.7.0")), "{err:?}");

        // No answer at all: the check runs out of time.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let c = checker(silent.local_addr().unwrap(), ENFORCE, Duration::from_secs(2));
        let started = Instant::now();
        let err = c
            .check(&envelope("x@spoof.test"), message("x@spoof.test"))
            .await
            .unwrap_err();
        assert_eq!((err.code, err.enhanced.as_deref()), (451, Some("4.7.0")), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
        // Monitor mode accepts and says the checks did not finish.
        let monitor = Rules {
            dmarc_policy: DmarcPolicyMode::Monitor,
            spf_fail: SpfFailAction::Header,
        };
        let c = checker(silent.local_addr().unwrap(), monitor, Duration::from_secs(1));
        let top = added(
            &c.check(&envelope("x@spoof.test"), message("x@spoof.test"))
                .await
                .unwrap(),
        );
        assert_eq!(
            top,
            "Authentication-Results: mx.test; none (checks timed out after 1s)\r\n"
        );
    }

    #[tokio::test]
    async fn spf_of_malformed_domains_is_none() {
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let auth = authenticator(&[silent.local_addr().unwrap()], Duration::from_secs(1)).unwrap();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let out = spf_envelope(&auth, ip, "[192.0.2.1]", "", "mx.test").await;
        assert_eq!(out.result(), SpfResult::None);
        for mail_from in ["a@[192.0.2.1]", "a@x..test", "a@single", "a@192.0.2.1"] {
            let out = spf_envelope(&auth, ip, "x", mail_from, "mx.test").await;
            assert_eq!(out.result(), SpfResult::None, "{mail_from}");
        }
        assert!(is_spf_domain("mail.example.com.") && is_spf_domain("a-b.x"));
    }
}
