//! DNS block lists (RFC 5782): asks each `[dnsbl]` zone about a client
//! address and adds up what they say.
//!
//! - The query name is the address reversed (IPv4 `d.c.b.a`, IPv6 its 32
//!   nibbles, lowest first) under the zone, fully qualified.
//! - Only A answers in 127.0.0.0/8 count (RFC 5782 2.1); a zone that
//!   answers elsewhere (a hijacked or expired list) is ignored. With
//!   `codes`, only those answers count.
//! - A zone whose query fails or times out counts as not listing the
//!   client: the list fails open, and the failure is logged and counted.
//! - Verdicts are cached on this node only, until the shortest DNS TTL of
//!   the answers, at most `cache_ttl`; verdicts with a failed zone are not
//!   cached. They are not shared in the cluster: each node asks its own
//!   resolver, which caches as well.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::proto::ProtoErrorKind;
use hickory_resolver::TokioResolver;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::config::dnsbl::{DnsblZone, ZoneAction};
use crate::config::DnsblConfig;
use crate::metrics::ScreenMetrics;

/// Client addresses whose verdict is cached, at most.
const CACHE_MAX: usize = 50_000;

/// What the lists say about one client address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// The zones that list the client.
    pub listed_by: Vec<String>,
    /// Sum of their scores.
    pub score: u32,
    /// Refused: a `reject` zone lists it, or the score reached `reject_score`.
    pub reject: bool,
}

impl Verdict {
    /// `554 5.7.1` text naming the lists.
    pub fn reply_text(&self, client: IpAddr) -> String {
        format!(
            "Service unavailable; client [{client}] blocked using {}",
            self.listed_by.join(", ")
        )
    }
}

/// One zone's answer.
enum ZoneAnswer {
    Listed { until: Instant },
    NotListed { until: Instant },
    Failed(String),
}

/// The block lists of a node. Cheap to share behind an `Arc`.
pub struct Dnsbl {
    config: DnsblConfig,
    dns: TokioResolver,
    cache: Mutex<HashMap<IpAddr, (Instant, Verdict)>>,
    metrics: ScreenMetrics,
}

impl std::fmt::Debug for Dnsbl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dnsbl")
            .field("zones", &self.config.zones.len())
            .finish_non_exhaustive()
    }
}

/// The query name of `ip` under `zone` (RFC 5782 2.1 and 2.4), fully qualified.
pub fn query_name(ip: IpAddr, zone: &str) -> String {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            format!("{d}.{c}.{b}.{a}.{zone}.")
        }
        IpAddr::V6(v6) => {
            let mut name = String::with_capacity(64 + zone.len() + 1);
            for byte in v6.octets().iter().rev() {
                name.push(hex_digit(byte & 0x0f));
                name.push('.');
                name.push(hex_digit(byte >> 4));
                name.push('.');
            }
            name.push_str(zone);
            name.push('.');
            name
        }
    }
}

fn hex_digit(n: u8) -> char {
    char::from_digit(u32::from(n), 16).unwrap_or('0')
}

impl Dnsbl {
    /// A resolver on `nameservers` (the system's when empty).
    pub fn new(config: DnsblConfig, nameservers: &[SocketAddr], metrics: ScreenMetrics) -> anyhow::Result<Dnsbl> {
        let (resolver_config, mut opts) = if nameservers.is_empty() {
            hickory_resolver::system_conf::read_system_conf()
                .map_err(|e| anyhow::anyhow!("dnsbl: cannot read system resolver configuration: {e}"))?
        } else {
            let mut c = ResolverConfig::new();
            for addr in nameservers {
                c.add_name_server(NameServerConfig::new(*addr, Protocol::Udp));
                c.add_name_server(NameServerConfig::new(*addr, Protocol::Tcp));
            }
            (c, ResolverOpts::default())
        };
        // The whole check is bounded by `timeout`; one try per server fits in it.
        opts.timeout = config.timeout;
        opts.attempts = 1;
        opts.use_hosts_file = ResolveHosts::Never;
        opts.cache_size = 4096;
        let dns = TokioResolver::builder_with_config(resolver_config, TokioConnectionProvider::default())
            .with_options(opts)
            .build();
        Ok(Dnsbl {
            config,
            dns,
            cache: Mutex::new(HashMap::new()),
            metrics,
        })
    }

    /// `[dnsbl]` as this screen was built with.
    pub fn config(&self) -> &DnsblConfig {
        &self.config
    }

    /// Whether `ip` is never checked (`[dnsbl] exempt`).
    pub fn exempt(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.config.exempt.iter().any(|n| n.contains(&ip))
    }

    /// What the lists say about `ip`, from cache or DNS; never longer than `timeout`.
    pub async fn check(&self, ip: IpAddr) -> Verdict {
        let ip = ip.to_canonical();
        let now = Instant::now();
        if let Some((until, verdict)) = self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(&ip) {
            if *until > now {
                self.metrics.dnsbl_lookup("cached");
                return verdict.clone();
            }
        }
        let mut queries = JoinSet::new();
        for (index, zone) in self.config.zones.iter().enumerate() {
            let dns = self.dns.clone();
            let zone = zone.clone();
            queries.spawn(async move { (index, ask(&dns, ip, &zone).await) });
        }
        let mut answers: Vec<Option<ZoneAnswer>> = self.config.zones.iter().map(|_| None).collect();
        let deadline = tokio::time::Instant::now() + self.config.timeout;
        loop {
            match tokio::time::timeout_at(deadline, queries.join_next()).await {
                Ok(Some(Ok((index, answer)))) => {
                    if let Some(slot) = answers.get_mut(index) {
                        *slot = Some(answer);
                    }
                }
                Ok(Some(Err(e))) => warn!(error = %e, "dnsbl query task failed"),
                Ok(None) => break,
                Err(_) => {
                    queries.abort_all();
                    break;
                }
            }
        }
        let mut verdict = Verdict::default();
        let mut until = now + self.config.cache_ttl;
        let mut complete = true;
        for (zone, answer) in self.config.zones.iter().zip(answers) {
            match answer {
                Some(ZoneAnswer::Listed { until: u }) => {
                    until = until.min(u);
                    self.metrics.dnsbl_listed(&zone.zone);
                    verdict.listed_by.push(zone.zone.clone());
                    verdict.score = verdict.score.saturating_add(zone.score);
                    verdict.reject |= zone.action == ZoneAction::Reject;
                }
                Some(ZoneAnswer::NotListed { until: u }) => until = until.min(u),
                Some(ZoneAnswer::Failed(why)) => {
                    complete = false;
                    self.metrics.dnsbl_lookup("failed");
                    info!(client = %ip, zone = %zone.zone, error = %why, "dnsbl query failed; zone ignored (fail open)");
                }
                None => {
                    complete = false;
                    self.metrics.dnsbl_lookup("timeout");
                    info!(client = %ip, zone = %zone.zone, timeout = ?self.config.timeout, "dnsbl query timed out; zone ignored (fail open)");
                }
            }
        }
        verdict.reject |= verdict.score >= self.config.reject_score;
        self.metrics.dnsbl_lookup(if verdict.listed_by.is_empty() {
            "clean"
        } else {
            "listed"
        });
        debug!(client = %ip, listed_by = ?verdict.listed_by, score = verdict.score, reject = verdict.reject, "dnsbl verdict");
        if complete && until > now {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if cache.len() >= CACHE_MAX {
                cache.retain(|_, (u, _)| *u > now);
                if cache.len() >= CACHE_MAX {
                    cache.clear();
                }
            }
            cache.insert(ip, (until, verdict.clone()));
        }
        verdict
    }
}

/// One zone's answer about `ip`.
async fn ask(dns: &TokioResolver, ip: IpAddr, zone: &DnsblZone) -> ZoneAnswer {
    let name = query_name(ip, &zone.zone);
    let negative = Instant::now() + Duration::from_secs(300);
    match dns.lookup(name.as_str(), RecordType::A).await {
        Ok(lookup) => {
            let answers: Vec<Ipv4Addr> = lookup
                .iter()
                .filter_map(|r| match r {
                    RData::A(a) => Some(a.0),
                    _ => None,
                })
                .collect();
            let listed = answers
                .iter()
                .filter(|a| a.octets()[0] == 127)
                .any(|a| zone.codes.is_empty() || zone.codes.contains(a));
            if answers.iter().any(|a| a.octets()[0] != 127) {
                warn!(zone = %zone.zone, ?answers, "dnsbl answer outside 127.0.0.0/8 ignored (RFC 5782)");
            }
            let until = lookup.valid_until();
            if listed {
                ZoneAnswer::Listed { until }
            } else {
                ZoneAnswer::NotListed { until }
            }
        }
        Err(e) => match e.proto().map(|p| p.kind()) {
            Some(ProtoErrorKind::NoRecordsFound { response_code, .. })
                if matches!(*response_code, ResponseCode::NXDomain | ResponseCode::NoError) =>
            {
                ZoneAnswer::NotListed { until: negative }
            }
            _ => ZoneAnswer::Failed(e.to_string()),
        },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn query_names_follow_rfc_5782() {
        assert_eq!(
            query_name("192.0.2.99".parse().unwrap(), "bl.test"),
            "99.2.0.192.bl.test."
        );
        // RFC 5782 2.4's example.
        assert_eq!(
            query_name("2001:db8:1:2:3:4:567:89ab".parse().unwrap(), "ugly.example.com"),
            "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.ugly.example.com."
        );
        // A v4-mapped client is asked about as IPv4.
        assert_eq!(
            query_name("::ffff:127.0.0.2".parse().unwrap(), "bl.test"),
            "2.0.0.127.bl.test."
        );
    }
}
