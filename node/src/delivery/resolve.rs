//! Destination resolution: turns a recipient domain into its delivery
//! [`Site`], the MX hosts by preference, each with its addresses.
//!
//! The rules followed (RFC 5321 section 5.1, RFC 7505):
//! - MX hosts are ordered by preference; hosts of equal preference are
//!   shuffled on every call, to spread load as 5.1 asks.
//! - A domain without MX records but with addresses has an implicit MX of
//!   preference 0 naming the domain itself.
//! - A CNAME at the domain (or at an MX host) is followed by hickory.
//! - A single MX whose exchange is the root (`.`) is a null MX: the domain
//!   accepts no mail ([`ResolveError::NullMx`], permanent).
//! - An MX host whose name has no address is skipped; if every host failed
//!   only temporarily the whole lookup is [`ResolveError::Temporary`].
//! - Address literals (`[192.0.2.1]`, `[IPv6:2001:db8::1]`) resolve to
//!   themselves without DNS.
//!
//! Every name is queried fully qualified, so the resolv.conf search list
//! never turns `example.com` into `example.com.corp.internal`.
//!
//! Caching: hickory caches each record with its TTL; on top of that the
//! assembled [`Site`] is cached until its shortest TTL (capped at
//! [`MAX_SITE_TTL`]) and permanent failures for
//! [`ResolverConfig::negative_ttl`]. Temporary failures are not cached.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig as HickoryConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::proto::ProtoErrorKind;
use hickory_resolver::{Name, TokioResolver};
use rand::seq::SliceRandom;
use serde::Deserialize;
use tokio::task::JoinSet;
use tracing::{debug, info};

/// Upper bound on how long an assembled [`Site`] is cached, whatever the TTLs.
pub const MAX_SITE_TTL: Duration = Duration::from_secs(3600);

/// At most this many MX hosts (the most preferred) are resolved per domain;
/// more is a misconfiguration or an amplification attempt.
pub const MAX_MX_HOSTS: usize = 16;

/// Entries in the site cache before it is purged of expired entries (and
/// cleared outright if still full).
const SITE_CACHE_MAX: usize = 10_000;

/// Records held by hickory's own cache.
const RECORD_CACHE_SIZE: usize = 4096;

/// Which address families to return for each host, in which order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IpOrder {
    /// AAAA addresses, then A addresses.
    #[default]
    Ipv6First,
    /// A addresses, then AAAA addresses.
    Ipv4First,
    /// A addresses only (hosts without IPv6 connectivity).
    Ipv4Only,
    /// AAAA addresses only.
    Ipv6Only,
}

impl IpOrder {
    fn families(self) -> &'static [RecordType] {
        match self {
            IpOrder::Ipv6First => &[RecordType::AAAA, RecordType::A],
            IpOrder::Ipv4First => &[RecordType::A, RecordType::AAAA],
            IpOrder::Ipv4Only => &[RecordType::A],
            IpOrder::Ipv6Only => &[RecordType::AAAA],
        }
    }
}

/// How to reach DNS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolverConfig {
    /// Recursive resolvers to ask (UDP, then TCP on truncation); empty means
    /// the system's (resolv.conf).
    pub nameservers: Vec<SocketAddr>,
    /// Timeout of one query to one server.
    pub timeout: Duration,
    /// Tries per query before giving up.
    pub attempts: usize,
    /// Address families per host and their order.
    pub ip_order: IpOrder,
    /// How long permanent failures (NXDOMAIN, null MX, no address) are
    /// remembered; zero disables negative caching.
    pub negative_ttl: Duration,
}

impl Default for ResolverConfig {
    fn default() -> Self {
        ResolverConfig {
            nameservers: Vec::new(),
            timeout: Duration::from_secs(5),
            attempts: 2,
            ip_order: IpOrder::default(),
            negative_ttl: Duration::from_secs(60),
        }
    }
}

/// Why a domain has no usable delivery site.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ResolveError {
    /// The domain publishes a null MX (RFC 7505): it accepts no mail.
    #[error("{0} has a null MX and accepts no mail")]
    NullMx(String),
    /// NXDOMAIN (or a syntactically impossible domain).
    #[error("domain {0} does not exist")]
    NoSuchDomain(String),
    /// The domain exists but neither it nor any MX host has an address.
    #[error("no usable address for {0}")]
    NoAddress(String),
    /// SERVFAIL, REFUSED, timeout, network error: try again later.
    #[error("temporary DNS failure: {0}")]
    Temporary(String),
    /// The resolver could not be set up (unreadable resolv.conf); only
    /// returned by [`MxResolver::new`].
    #[error("resolver configuration: {0}")]
    Config(String),
}

impl ResolveError {
    /// Whether retrying cannot help: the message should bounce.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            ResolveError::NullMx(_) | ResolveError::NoSuchDomain(_) | ResolveError::NoAddress(_)
        )
    }

    /// RFC 3463 enhanced status code and human text, for DSNs and logs.
    pub fn status(&self) -> (&'static str, String) {
        match self {
            // RFC 7505 section 4.2.
            ResolveError::NullMx(d) => ("5.1.10", format!("Recipient address has null MX ({d})")),
            ResolveError::NoSuchDomain(d) => ("5.1.2", format!("Domain {d} does not exist")),
            ResolveError::NoAddress(d) => ("5.4.4", format!("Unable to route: no address for {d}")),
            ResolveError::Temporary(why) => ("4.4.3", format!("Directory server failure: {why}")),
            ResolveError::Config(why) => ("4.4.3", format!("Resolver misconfigured: {why}")),
        }
    }
}

/// One MX host and its addresses, in [`IpOrder`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct MxHost {
    /// Lowercase ASCII (A-label), no trailing dot; for an address literal,
    /// the literal with its brackets.
    pub name: String,
    pub preference: u16,
    pub addrs: Vec<IpAddr>,
}

/// Where mail for a domain goes.
#[derive(Clone, Debug)]
pub struct Site {
    /// By preference, shuffled within a preference; never empty.
    pub hosts: Vec<MxHost>,
    /// When this answer goes stale and should be resolved again.
    pub ttl_expires: Instant,
}

impl Site {
    /// A stable key naming the site: the sorted, deduplicated MX host names
    /// joined by commas, so domains hosted on the same MXes share one
    /// delivery actor. For an implicit MX it is the domain itself.
    pub fn key(&self) -> String {
        let mut names: Vec<&str> = self.hosts.iter().map(|h| h.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        names.join(",")
    }

    /// Shuffles hosts of equal preference; `hosts` must be sorted by preference.
    fn shuffle_equal_preferences(&mut self) {
        let mut rng = rand::thread_rng();
        for group in self.hosts.chunk_by_mut(|a, b| a.preference == b.preference) {
            group.shuffle(&mut rng);
        }
    }
}

/// Resolves domains to [`Site`]s. Cheap to clone; clones share caches.
#[derive(Clone)]
pub struct MxResolver {
    inner: Arc<Inner>,
}

struct Inner {
    dns: TokioResolver,
    ip_order: IpOrder,
    negative_ttl: Duration,
    sites: Mutex<HashMap<String, CachedSite>>,
}

struct CachedSite {
    result: Result<Site, ResolveError>,
    expires: Instant,
}

impl std::fmt::Debug for MxResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MxResolver")
            .field("ip_order", &self.inner.ip_order)
            .finish_non_exhaustive()
    }
}

/// What one DNS query said.
enum Answer<T> {
    Found(T),
    /// The name exists but has no record of this type (NOERROR, empty).
    NoData,
    NxDomain,
    Failed(String),
}

fn classify(
    result: Result<hickory_resolver::lookup::Lookup, hickory_resolver::ResolveError>,
) -> Answer<hickory_resolver::lookup::Lookup> {
    match result {
        Ok(lookup) => Answer::Found(lookup),
        Err(e) => match e.proto().map(|p| p.kind()) {
            // hickory reports SERVFAIL and REFUSED as "no records" too; only
            // NXDOMAIN and an empty NOERROR are answers about the name.
            Some(ProtoErrorKind::NoRecordsFound { response_code, .. }) => match *response_code {
                ResponseCode::NXDomain => Answer::NxDomain,
                ResponseCode::NoError => Answer::NoData,
                code => Answer::Failed(format!("server answered {code}")),
            },
            _ => Answer::Failed(e.to_string()),
        },
    }
}

/// The addresses of one host name.
struct HostAddrs {
    addrs: Vec<IpAddr>,
    expires: Option<Instant>,
    /// Set when some family failed temporarily (the other may have answered).
    temp_failure: Option<String>,
    nxdomain: bool,
}

impl MxResolver {
    /// Builds a resolver; reads resolv.conf when `config.nameservers` is empty.
    pub fn new(config: &ResolverConfig) -> Result<MxResolver, ResolveError> {
        let (hickory_config, mut opts) = if config.nameservers.is_empty() {
            hickory_resolver::system_conf::read_system_conf()
                .map_err(|e| ResolveError::Config(format!("cannot read system resolver configuration: {e}")))?
        } else {
            let mut c = HickoryConfig::new();
            for addr in &config.nameservers {
                c.add_name_server(NameServerConfig::new(*addr, Protocol::Udp));
                c.add_name_server(NameServerConfig::new(*addr, Protocol::Tcp));
            }
            (c, ResolverOpts::default())
        };
        opts.timeout = config.timeout;
        opts.attempts = config.attempts.max(1);
        opts.cache_size = RECORD_CACHE_SIZE;
        // Mail routing follows DNS only; /etc/hosts entries are for local programs.
        opts.use_hosts_file = ResolveHosts::Never;
        // Large MX sets; truncation still falls back to TCP.
        opts.edns0 = true;
        let dns = TokioResolver::builder_with_config(hickory_config, TokioConnectionProvider::default())
            .with_options(opts)
            .build();
        Ok(MxResolver {
            inner: Arc::new(Inner {
                dns,
                ip_order: config.ip_order,
                negative_ttl: config.negative_ttl,
                sites: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The delivery site of `domain` (see the module docs for the rules).
    ///
    /// Addresses of each host are in [`ResolverConfig::ip_order`] order
    /// (AAAA then A by default). Hosts of equal preference come in a fresh
    /// random order on each call, even from cache.
    pub async fn resolve_site(&self, domain: &str) -> Result<Site, ResolveError> {
        let domain = normalize_domain(domain);
        if domain.starts_with('[') {
            return address_literal(&domain);
        }
        if let Some(cached) = self.cached(&domain) {
            debug!(%domain, "site from cache");
            return cached.map(|mut site| {
                site.shuffle_equal_preferences();
                site
            });
        }
        let result = self.resolve_uncached(&domain).await;
        match &result {
            Ok(site) => debug!(%domain, key = %site.key(), hosts = site.hosts.len(), "resolved site"),
            Err(e) => debug!(%domain, error = %e, "site resolution failed"),
        }
        self.store(&domain, &result);
        result.map(|mut site| {
            site.shuffle_equal_preferences();
            site
        })
    }

    fn cached(&self, domain: &str) -> Option<Result<Site, ResolveError>> {
        let sites = self.inner.sites.lock().unwrap_or_else(|p| p.into_inner());
        let entry = sites.get(domain)?;
        (entry.expires > Instant::now()).then(|| entry.result.clone())
    }

    fn store(&self, domain: &str, result: &Result<Site, ResolveError>) {
        let now = Instant::now();
        let expires = match result {
            Ok(site) => site.ttl_expires,
            Err(e) if e.is_permanent() => now + self.inner.negative_ttl,
            Err(_) => return,
        };
        if expires <= now {
            return;
        }
        let mut sites = self.inner.sites.lock().unwrap_or_else(|p| p.into_inner());
        if sites.len() >= SITE_CACHE_MAX {
            sites.retain(|_, e| e.expires > now);
            if sites.len() >= SITE_CACHE_MAX {
                sites.clear();
            }
        }
        sites.insert(
            domain.to_owned(),
            CachedSite {
                result: result.clone(),
                expires,
            },
        );
    }

    async fn resolve_uncached(&self, domain: &str) -> Result<Site, ResolveError> {
        let name = fqdn(domain).ok_or_else(|| ResolveError::NoSuchDomain(domain.to_owned()))?;
        let now = Instant::now();
        let cap = now + MAX_SITE_TTL;
        let mx = match classify(self.inner.dns.lookup(name.clone(), RecordType::MX).await) {
            Answer::Found(lookup) => {
                let records: Vec<(u16, Name)> = lookup
                    .iter()
                    .filter_map(|r| match r {
                        RData::MX(mx) => Some((mx.preference(), mx.exchange().clone())),
                        _ => None,
                    })
                    .collect();
                // A CNAME chain ending in a name without MX can come back as
                // an answer holding only the CNAME.
                if records.is_empty() {
                    None
                } else {
                    Some((records, lookup.valid_until()))
                }
            }
            Answer::NoData => None,
            Answer::NxDomain => return Err(ResolveError::NoSuchDomain(domain.to_owned())),
            Answer::Failed(why) => return Err(ResolveError::Temporary(format!("MX lookup for {domain}: {why}"))),
        };

        let Some((records, mx_expires)) = mx else {
            // RFC 5321 5.1: no MX, so the domain itself is the implicit MX.
            let host = host_name(&name);
            let found = self.host_addrs(name).await;
            if found.addrs.is_empty() {
                return Err(match found.temp_failure {
                    Some(why) => ResolveError::Temporary(format!("address lookup for {domain}: {why}")),
                    None => ResolveError::NoAddress(domain.to_owned()),
                });
            }
            let mut expires = found.expires.unwrap_or(now).min(cap);
            if found.temp_failure.is_some() {
                // One family failed; look again soon.
                expires = expires.min(now + self.inner.negative_ttl);
            }
            return Ok(Site {
                hosts: vec![MxHost {
                    name: host,
                    preference: 0,
                    addrs: found.addrs,
                }],
                ttl_expires: expires,
            });
        };

        if records.len() == 1 && records[0].1.is_root() {
            return Err(ResolveError::NullMx(domain.to_owned()));
        }
        // Only the most preferred entry per name counts; a stray null MX next
        // to real ones (forbidden by RFC 7505) is ignored.
        let mut best: HashMap<String, u16> = HashMap::new();
        for (preference, exchange) in &records {
            if exchange.is_root() {
                info!(%domain, "null MX mixed with other MX records; ignoring it");
                continue;
            }
            let host = host_name(exchange);
            let entry = best.entry(host).or_insert(*preference);
            *entry = (*entry).min(*preference);
        }
        let mut hosts: Vec<(u16, String)> = best.into_iter().map(|(n, p)| (p, n)).collect();
        hosts.sort();
        if hosts.len() > MAX_MX_HOSTS {
            info!(%domain, count = hosts.len(), kept = MAX_MX_HOSTS, "too many MX hosts; keeping the most preferred");
            hosts.truncate(MAX_MX_HOSTS);
        }

        // Resolve all hosts at once: one slow host must not delay the others.
        let mut tasks = JoinSet::new();
        for (index, (_, host)) in hosts.iter().enumerate() {
            let this = self.clone();
            let host = host.clone();
            tasks.spawn(async move {
                let found = match fqdn(&host) {
                    Some(name) => this.host_addrs(name).await,
                    None => HostAddrs {
                        addrs: Vec::new(),
                        expires: None,
                        temp_failure: None,
                        nxdomain: true,
                    },
                };
                (index, found)
            });
        }
        let mut found: Vec<Option<HostAddrs>> = hosts.iter().map(|_| None).collect();
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((index, addrs)) => found[index] = Some(addrs),
                Err(e) => return Err(ResolveError::Temporary(format!("address lookup task failed: {e}"))),
            }
        }

        let mut expires = mx_expires.min(cap);
        let mut site_hosts = Vec::with_capacity(hosts.len());
        let mut temp_failures = Vec::new();
        for ((preference, host), addrs) in hosts.into_iter().zip(found) {
            let Some(addrs) = addrs else { continue };
            if let Some(why) = &addrs.temp_failure {
                temp_failures.push(format!("{host}: {why}"));
                // Come back soon for the host that failed.
                expires = expires.min(now + self.inner.negative_ttl);
            }
            if addrs.addrs.is_empty() {
                if addrs.temp_failure.is_none() {
                    let reason = if addrs.nxdomain { "no such host" } else { "no address" };
                    info!(%domain, mx = %host, reason, "skipping MX host");
                }
                continue;
            }
            if let Some(e) = addrs.expires {
                expires = expires.min(e);
            }
            site_hosts.push(MxHost {
                name: host,
                preference,
                addrs: addrs.addrs,
            });
        }
        if !temp_failures.is_empty() {
            info!(%domain, failures = %temp_failures.join("; "), "MX host address lookups failed");
        }
        if site_hosts.is_empty() {
            return Err(if temp_failures.is_empty() {
                ResolveError::NoAddress(domain.to_owned())
            } else {
                ResolveError::Temporary(format!("no MX host of {domain} resolved: {}", temp_failures.join("; ")))
            });
        }
        Ok(Site {
            hosts: site_hosts,
            ttl_expires: expires,
        })
    }

    /// Addresses of a configured host (a `[[route]]` hop or the LMTP
    /// server): an IP literal as is, `localhost` as loopback (RFC 6761; the
    /// hosts file is not read), else A/AAAA from the configured servers.
    pub async fn host_addresses(&self, host: &str) -> Result<Vec<IpAddr>, ResolveError> {
        let host = normalize_domain(host.trim_matches(['[', ']']));
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        if host == "localhost" {
            return Ok(vec![IpAddr::from([127, 0, 0, 1]), IpAddr::from(Ipv6Addr::LOCALHOST)]);
        }
        let name = fqdn(&host).ok_or_else(|| ResolveError::NoSuchDomain(host.clone()))?;
        let found = self.host_addrs(name).await;
        if !found.addrs.is_empty() {
            return Ok(found.addrs);
        }
        Err(match found.temp_failure {
            Some(why) => ResolveError::Temporary(format!("address lookup for {host}: {why}")),
            None if found.nxdomain => ResolveError::NoSuchDomain(host),
            None => ResolveError::NoAddress(host),
        })
    }

    /// The TXT strings at `name` (each record's strings joined): `Ok(None)`
    /// when the name has none or does not exist, `Err` on a temporary failure.
    pub async fn txt(&self, name: &str) -> Result<Option<Vec<String>>, ResolveError> {
        let fq = fqdn(&normalize_domain(name)).ok_or_else(|| ResolveError::NoSuchDomain(name.to_owned()))?;
        match classify(self.inner.dns.lookup(fq, RecordType::TXT).await) {
            Answer::Found(lookup) => Ok(Some(
                lookup
                    .iter()
                    .filter_map(|r| match r {
                        RData::TXT(txt) => Some(
                            txt.txt_data()
                                .iter()
                                .map(|part| String::from_utf8_lossy(part))
                                .collect::<String>(),
                        ),
                        _ => None,
                    })
                    .collect(),
            )),
            Answer::NoData | Answer::NxDomain => Ok(None),
            Answer::Failed(why) => Err(ResolveError::Temporary(format!("TXT lookup for {name}: {why}"))),
        }
    }

    /// A and/or AAAA for one name, queried concurrently, in `ip_order`.
    async fn host_addrs(&self, name: Name) -> HostAddrs {
        let families = self.inner.ip_order.families();
        let first = self.inner.dns.lookup(name.clone(), families[0]);
        let answers = match families.get(1) {
            Some(second) => {
                let (a, b) = tokio::join!(first, self.inner.dns.lookup(name, *second));
                vec![a, b]
            }
            None => vec![first.await],
        };
        let mut out = HostAddrs {
            addrs: Vec::new(),
            expires: None,
            temp_failure: None,
            nxdomain: false,
        };
        for answer in answers {
            match classify(answer) {
                Answer::Found(lookup) => {
                    for rdata in lookup.iter() {
                        let ip = match rdata {
                            RData::A(a) => IpAddr::V4(a.0),
                            RData::AAAA(a) => IpAddr::V6(a.0),
                            _ => continue,
                        };
                        if usable(ip) && !out.addrs.contains(&ip) {
                            out.addrs.push(ip);
                        }
                    }
                    let until = lookup.valid_until();
                    out.expires = Some(out.expires.map_or(until, |e| e.min(until)));
                }
                Answer::NoData => {}
                Answer::NxDomain => out.nxdomain = true,
                Answer::Failed(why) => out.temp_failure = Some(why),
            }
        }
        out
    }
}

/// Addresses no connection can go to (a "null route" MX pointing at 0.0.0.0).
fn usable(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !(v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast()),
        IpAddr::V6(v6) => !(v6.is_unspecified() || v6.is_multicast()),
    }
}

/// Lowercase, without surrounding whitespace or one trailing dot.
fn normalize_domain(domain: &str) -> String {
    let d = domain.trim();
    let d = d.strip_suffix('.').unwrap_or(d);
    d.to_lowercase()
}

/// The fully-qualified name for a domain (IDNA-encoded), or None if it cannot
/// be a DNS name.
fn fqdn(domain: &str) -> Option<Name> {
    if domain.is_empty() {
        return None;
    }
    let mut name = Name::from_utf8(domain).ok()?;
    name.set_fqdn(true);
    Some(name)
}

/// How a DNS name is shown in a [`MxHost`]: lowercase ASCII, no trailing dot.
fn host_name(name: &Name) -> String {
    let ascii = name.to_ascii();
    ascii.strip_suffix('.').unwrap_or(&ascii).to_ascii_lowercase()
}

/// `[192.0.2.1]` or `[IPv6:2001:db8::1]` (RFC 5321 4.1.3) as a one-host site.
fn address_literal(literal: &str) -> Result<Site, ResolveError> {
    let invalid = || ResolveError::NoSuchDomain(literal.to_owned());
    let inner = literal
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .ok_or_else(invalid)?;
    let ip = match inner.strip_prefix("ipv6:") {
        Some(v6) => IpAddr::V6(v6.parse::<Ipv6Addr>().map_err(|_| invalid())?),
        None => IpAddr::V4(inner.parse().map_err(|_| invalid())?),
    };
    if !usable(ip) {
        return Err(ResolveError::NoAddress(literal.to_owned()));
    }
    Ok(Site {
        hosts: vec![MxHost {
            name: literal.to_owned(),
            preference: 0,
            addrs: vec![ip],
        }],
        ttl_expires: Instant::now() + MAX_SITE_TTL,
    })
}

/// Parses a route target: `host`, `host:port`, `[v6]`, `[v6]:port`,
/// `1.2.3.4`, `1.2.3.4:port` (a bare IPv6 address without brackets is also
/// accepted, without a port). The host comes back lowercase, without
/// brackets or a trailing dot.
pub fn parse_host_port(s: &str, default_port: u16) -> Result<(String, u16), BadHostPort> {
    let s = s.trim();
    let bad = |problem| BadHostPort {
        input: s.to_owned(),
        problem,
    };
    let parse_port = |p: &str| {
        p.parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad(HostPortProblem::Port))
    };
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (v6, after) = rest
            .split_once(']')
            .ok_or_else(|| bad(HostPortProblem::UnclosedBracket))?;
        v6.parse::<Ipv6Addr>().map_err(|_| bad(HostPortProblem::Ipv6))?;
        let port = match after {
            "" => default_port,
            _ => parse_port(
                after
                    .strip_prefix(':')
                    .ok_or_else(|| bad(HostPortProblem::AfterBracket))?,
            )?,
        };
        (v6.to_owned(), port)
    } else if s.parse::<Ipv6Addr>().is_ok() {
        (s.to_owned(), default_port)
    } else {
        match s.split_once(':') {
            Some((host, port)) => (host.to_owned(), parse_port(port)?),
            None => (s.to_owned(), default_port),
        }
    };
    if host.parse::<Ipv6Addr>().is_ok() {
        return Ok((host.to_ascii_lowercase(), port));
    }
    let host = host.strip_suffix('.').unwrap_or(&host).to_ascii_lowercase();
    let valid = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if !valid {
        return Err(bad(HostPortProblem::Host));
    }
    Ok((host, port))
}

/// A route target [`parse_host_port`] cannot use.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{problem} in {input:?}")]
pub struct BadHostPort {
    /// The target as written (trimmed).
    pub input: String,
    pub problem: HostPortProblem,
}

/// What is wrong with a route target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HostPortProblem {
    #[error("invalid port")]
    Port,
    #[error("unclosed '['")]
    UnclosedBracket,
    #[error("invalid IPv6 address")]
    Ipv6,
    #[error("junk after ']'")]
    AfterBracket,
    #[error("invalid host")]
    Host,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::delivery::testdns::{DnsServer, ServfailServer};

    fn config(server: &DnsServer) -> ResolverConfig {
        ResolverConfig {
            nameservers: vec![server.addr],
            timeout: Duration::from_secs(2),
            attempts: 1,
            ..ResolverConfig::default()
        }
    }

    const ZONE: &str = "\
mx-host=example.test,mx1.example.test,10
mx-host=example.test,mx2.example.test,20
host-record=mx1.example.test,127.0.0.1
host-record=mx2.example.test,127.0.0.2,::1
mx-host=other.test,mx2.example.test,5
mx-host=other.test,mx1.example.test,50
mx-host=nullmx.test,.,0
host-record=implicit.test,127.0.0.3
cname=alias.test,implicit.test
mx-host=dangling.test,nowhere.dangling.test,10
mx-host=dangling.test,mx1.example.test,20
mx-host=allbad.test,nowhere.allbad.test,10
host-record=v6only.test,::2
mx-host=equal.test,a.equal.test,10
mx-host=equal.test,b.equal.test,10
mx-host=equal.test,c.equal.test,10
mx-host=equal.test,last.equal.test,20
host-record=a.equal.test,127.0.1.1
host-record=b.equal.test,127.0.1.2
host-record=c.equal.test,127.0.1.3
host-record=last.equal.test,127.0.1.4
cname=mxalias.test,example.test
cname=mxcname.example.test,mx1.example.test
mx-host=viacname.test,mxcname.example.test,10
mx-host=xn--bcher-kva.test,mx1.example.test,10
host-record=xn--caf-dma.test,127.0.0.5
txt-record=noaddr.test,\"only text\"
";

    fn names(site: &Site) -> Vec<&str> {
        site.hosts.iter().map(|h| h.name.as_str()).collect()
    }

    #[tokio::test]
    async fn mx_hosts_by_preference_with_addresses() {
        let server = DnsServer::start(ZONE);
        let r = MxResolver::new(&config(&server)).unwrap();
        let site = r.resolve_site("Example.TEST.").await.unwrap();
        assert_eq!(names(&site), ["mx1.example.test", "mx2.example.test"]);
        assert_eq!(site.hosts[0].preference, 10);
        assert_eq!(site.hosts[0].addrs, [IpAddr::from([127, 0, 0, 1])]);
        // IPv6 first by default.
        assert_eq!(
            site.hosts[1].addrs,
            ["::1".parse::<IpAddr>().unwrap(), IpAddr::from([127, 0, 0, 2])]
        );
        assert_eq!(site.key(), "mx1.example.test,mx2.example.test");
    }

    #[tokio::test]
    async fn ip_order_is_configurable() {
        let server = DnsServer::start(ZONE);
        for (order, want) in [
            (IpOrder::Ipv4First, vec!["127.0.0.2", "::1"]),
            (IpOrder::Ipv4Only, vec!["127.0.0.2"]),
            (IpOrder::Ipv6Only, vec!["::1"]),
        ] {
            let r = MxResolver::new(&ResolverConfig {
                ip_order: order,
                ..config(&server)
            })
            .unwrap();
            let site = r.resolve_site("example.test").await.unwrap();
            let mx2 = site.hosts.iter().find(|h| h.name == "mx2.example.test").unwrap();
            let want: Vec<IpAddr> = want.iter().map(|a| a.parse().unwrap()).collect();
            assert_eq!(mx2.addrs, want, "{order:?}");
        }
    }

    #[tokio::test]
    async fn equal_preferences_are_shuffled() {
        let server = DnsServer::start(ZONE);
        let r = MxResolver::new(&config(&server)).unwrap();
        let mut firsts = std::collections::HashSet::new();
        for _ in 0..200 {
            let site = r.resolve_site("equal.test").await.unwrap();
            let n = names(&site);
            assert_eq!(n.len(), 4);
            assert_eq!(n[3], "last.equal.test");
            let mut top: Vec<&str> = n[..3].to_vec();
            firsts.insert(top[0].to_owned());
            top.sort();
            assert_eq!(top, ["a.equal.test", "b.equal.test", "c.equal.test"]);
            if firsts.len() == 3 {
                break;
            }
        }
        // 200 tries of a fair 1-in-3 shuffle: missing one is ~1e-35 likely.
        assert_eq!(firsts.len(), 3, "saw only {firsts:?} first");
    }

    #[tokio::test]
    async fn implicit_mx_and_cname() {
        let server = DnsServer::start(ZONE);
        let r = MxResolver::new(&config(&server)).unwrap();
        let site = r.resolve_site("implicit.test").await.unwrap();
        assert_eq!(
            site.hosts,
            [MxHost {
                name: "implicit.test".into(),
                preference: 0,
                addrs: vec![[127, 0, 0, 3].into()]
            }]
        );
        assert_eq!(site.key(), "implicit.test");

        let site = r.resolve_site("alias.test").await.unwrap();
        assert_eq!(
            site.hosts,
            [MxHost {
                name: "alias.test".into(),
                preference: 0,
                addrs: vec![[127, 0, 0, 3].into()]
            }]
        );
    }

    #[tokio::test]
    async fn cnames_are_followed() {
        let server = DnsServer::start(ZONE);
        let r = MxResolver::new(&config(&server)).unwrap();
        // A CNAME at a domain that has MX records: the target's MXes.
        let site = r.resolve_site("mxalias.test").await.unwrap();
        assert_eq!(names(&site), ["mx1.example.test", "mx2.example.test"]);
        // An MX exchange that is an alias (RFC 2181 forbids it; it happens).
        let site = r.resolve_site("viacname.test").await.unwrap();
        assert_eq!(names(&site), ["mxcname.example.test"]);
        assert_eq!(site.hosts[0].addrs, [IpAddr::from([127, 0, 0, 1])]);
    }

    #[tokio::test]
    async fn internationalized_domains_use_a_labels() {
        let server = DnsServer::start(ZONE);
        let r = MxResolver::new(&config(&server)).unwrap();
        let site = r.resolve_site("Bücher.test").await.unwrap();
        assert_eq!(site.key(), "mx1.example.test");
        let site = r.resolve_site("café.test").await.unwrap();
        assert_eq!(site.key(), "xn--caf-dma.test");
        assert_eq!(site.hosts[0].addrs, [IpAddr::from([127, 0, 0, 5])]);
    }

    #[tokio::test]
    async fn ipv6_only_implicit_mx() {
        let server = DnsServer::start(ZONE);
        let r = MxResolver::new(&config(&server)).unwrap();
        let site = r.resolve_site("v6only.test").await.unwrap();
        assert_eq!(site.hosts[0].addrs, ["::2".parse::<IpAddr>().unwrap()]);
    }

    #[tokio::test]
    async fn permanent_failures() {
        let server = DnsServer::start(ZONE);
        let r = MxResolver::new(&config(&server)).unwrap();

        let e = r.resolve_site("nullmx.test").await.unwrap_err();
        assert_eq!(e, ResolveError::NullMx("nullmx.test".into()));
        assert!(e.is_permanent());
        assert_eq!(e.status().0, "5.1.10");

        let e = r.resolve_site("missing.test").await.unwrap_err();
        assert_eq!(e, ResolveError::NoSuchDomain("missing.test".into()));
        assert_eq!(e.status().0, "5.1.2");

        let e = r.resolve_site("noaddr.test").await.unwrap_err();
        assert_eq!(e, ResolveError::NoAddress("noaddr.test".into()));

        let e = r.resolve_site("allbad.test").await.unwrap_err();
        assert_eq!(e, ResolveError::NoAddress("allbad.test".into()));

        let e = r.resolve_site("bad..name").await.unwrap_err();
        assert!(e.is_permanent(), "{e:?}");

        // Cached negative answers come back the same.
        assert_eq!(
            r.resolve_site("missing.test").await.unwrap_err(),
            ResolveError::NoSuchDomain("missing.test".into())
        );
    }

    #[tokio::test]
    async fn mx_without_address_is_skipped() {
        let server = DnsServer::start(ZONE);
        let r = MxResolver::new(&config(&server)).unwrap();
        let site = r.resolve_site("dangling.test").await.unwrap();
        assert_eq!(names(&site), ["mx1.example.test"]);
        assert_eq!(site.hosts[0].preference, 20);
    }

    #[tokio::test]
    async fn shared_mx_hosts_share_a_key() {
        let server = DnsServer::start(ZONE);
        let r = MxResolver::new(&config(&server)).unwrap();
        let a = r.resolve_site("example.test").await.unwrap();
        let b = r.resolve_site("other.test").await.unwrap();
        assert_eq!(a.key(), b.key());
        // Preferences are per domain, so the order differs.
        assert_eq!(names(&b), ["mx2.example.test", "mx1.example.test"]);
        assert_ne!(a.key(), r.resolve_site("implicit.test").await.unwrap().key());
    }

    #[tokio::test]
    async fn servfail_and_refused_are_temporary() {
        let upstream = ServfailServer::start().await;
        let r = MxResolver::new(&ResolverConfig {
            nameservers: vec![upstream.addr],
            ..ResolverConfig::default()
        })
        .unwrap();
        let e = r.resolve_site("example.test").await.unwrap_err();
        assert!(
            matches!(&e, ResolveError::Temporary(why) if why.contains("Server Failure")),
            "{e:?}"
        );
        assert!(!e.is_permanent());
        assert_eq!(e.status().0, "4.4.3");
        // Temporary failures are not cached.
        assert!(r.inner.sites.lock().unwrap().is_empty());

        // dnsmasq has no upstream for names outside .test: REFUSED.
        let server = DnsServer::start(ZONE);
        let r = MxResolver::new(&config(&server)).unwrap();
        let e = r.resolve_site("example.org").await.unwrap_err();
        assert!(
            matches!(&e, ResolveError::Temporary(why) if why.contains("Refused")),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn mx_hosts_failing_temporarily() {
        let upstream = ServfailServer::start().await;
        let zone = format!(
            "{ZONE}server=/fail.test/127.0.0.1#{}\n\
             mx-host=tempmx.test,mx.fail.test,10\n\
             mx-host=halfmx.test,mx.fail.test,10\n\
             mx-host=halfmx.test,mx1.example.test,20\n\
             local-ttl=300\n",
            upstream.addr.port()
        );
        let server = DnsServer::start(&zone);
        let r = MxResolver::new(&config(&server)).unwrap();

        // The only MX host cannot be resolved for now: retry later, not bounce.
        let e = r.resolve_site("tempmx.test").await.unwrap_err();
        assert!(matches!(e, ResolveError::Temporary(_)), "{e:?}");

        // One host fails, the other is used, and the site expires soon so the
        // failed host gets another chance.
        let site = r.resolve_site("halfmx.test").await.unwrap();
        assert_eq!(names(&site), ["mx1.example.test"]);
        assert!(site.ttl_expires <= Instant::now() + ResolverConfig::default().negative_ttl);
    }

    #[tokio::test]
    async fn sites_are_cached_with_their_ttl() {
        let server = DnsServer::start(&format!("{ZONE}local-ttl=300\n"));
        let r = MxResolver::new(&config(&server)).unwrap();
        let before = Instant::now();
        let site = r.resolve_site("equal.test").await.unwrap();
        assert!(site.ttl_expires > before + Duration::from_secs(200));
        assert!(site.ttl_expires <= Instant::now() + Duration::from_secs(300));
        assert!(r.resolve_site("missing.test").await.unwrap_err().is_permanent());
        let clone = r.clone();
        drop(server);
        // Served from cache (shared by clones) with the server gone, still
        // shuffled among equal preferences.
        let again = clone.resolve_site("equal.test").await.unwrap();
        assert_eq!(again.key(), site.key());
        assert_eq!(again.ttl_expires, site.ttl_expires);
        assert_eq!(
            clone.resolve_site("missing.test").await.unwrap_err(),
            ResolveError::NoSuchDomain("missing.test".into())
        );
    }

    #[tokio::test]
    async fn unresponsive_server_is_temporary() {
        // A bound socket that never answers: every query times out.
        let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let cfg = ResolverConfig {
            nameservers: vec![silent.local_addr().unwrap()],
            timeout: Duration::from_millis(200),
            attempts: 1,
            ..ResolverConfig::default()
        };
        let r = MxResolver::new(&cfg).unwrap();
        let started = Instant::now();
        let e = tokio::time::timeout(Duration::from_secs(20), r.resolve_site("example.test"))
            .await
            .unwrap();
        assert!(matches!(e, Err(ResolveError::Temporary(_))), "{e:?}");
        assert!(started.elapsed() < Duration::from_secs(20));
    }

    #[tokio::test]
    async fn address_literals_skip_dns() {
        let r = MxResolver::new(&ResolverConfig {
            nameservers: vec!["127.0.0.1:9".parse().unwrap()],
            ..Default::default()
        })
        .unwrap();
        let site = r.resolve_site("[192.0.2.7]").await.unwrap();
        assert_eq!(site.hosts[0].addrs, [IpAddr::from([192, 0, 2, 7])]);
        assert_eq!(site.key(), "[192.0.2.7]");
        let site = r.resolve_site("[IPv6:2001:DB8::1]").await.unwrap();
        assert_eq!(site.hosts[0].addrs, ["2001:db8::1".parse::<IpAddr>().unwrap()]);
        assert_eq!(site.hosts[0].name, "[ipv6:2001:db8::1]");
        assert!(r.resolve_site("[999.1.1.1]").await.unwrap_err().is_permanent());
        assert!(r.resolve_site("[0.0.0.0]").await.unwrap_err().is_permanent());
    }

    #[test]
    fn host_port_forms() {
        assert_eq!(parse_host_port("mx.Example.com", 25), Ok(("mx.example.com".into(), 25)));
        assert_eq!(
            parse_host_port("mx.example.com.:2525", 25),
            Ok(("mx.example.com".into(), 2525))
        );
        assert_eq!(parse_host_port("1.2.3.4:587", 25), Ok(("1.2.3.4".into(), 587)));
        assert_eq!(parse_host_port("1.2.3.4", 25), Ok(("1.2.3.4".into(), 25)));
        assert_eq!(parse_host_port("[2001:db8::1]:26", 25), Ok(("2001:db8::1".into(), 26)));
        assert_eq!(parse_host_port("[::1]", 25), Ok(("::1".into(), 25)));
        assert_eq!(parse_host_port("::1", 25), Ok(("::1".into(), 25)));
        for bad in [
            "",
            ":25",
            "host:",
            "host:0",
            "host:70000",
            "host:x",
            "[::1",
            "[nope]:25",
            "[::1]25",
            "a..b",
            "a b",
            "h:1:2",
        ] {
            assert!(parse_host_port(bad, 25).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn error_status() {
        assert!(!ResolveError::Temporary("x".into()).is_permanent());
        assert_eq!(ResolveError::NoAddress("d".into()).status().0, "5.4.4");
        assert_eq!(ResolveError::Config("x".into()).status().0, "4.4.3");
    }

    #[test]
    fn system_configuration() {
        // Only construction: the machine's resolvers may be unreachable.
        if std::path::Path::new("/etc/resolv.conf").exists() {
            MxResolver::new(&ResolverConfig::default()).unwrap();
        }
    }

    #[test]
    fn resolver_is_send_sync_clone() {
        fn check<T: Send + Sync + Clone + 'static>() {}
        check::<MxResolver>();
    }
}
