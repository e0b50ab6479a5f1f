//! `[[source]]`, `[[pool]]` and `[[pool_rule]]`: the local addresses mail
//! leaves from, the weighted pools that group them, which pool a message
//! uses, and warm-up schedules, validated here.
//!
//! With no `[[pool]]` the [`Egress`] is empty and delivery binds nothing
//! and says the node's `helo_name`, exactly as without this feature.

use std::net::IpAddr;

use serde::Deserialize;

use crate::ConfigError;

/// The pool used when no rule picks another.
pub const DEFAULT_POOL: &str = "default";

/// The header that names a message's pool (removed before sending).
pub const POOL_HEADER: &str = "X-Tern-Pool";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSource {
    name: String,
    address: String,
    ehlo: Option<String>,
    max_connections: Option<usize>,
    warmup: Option<RawWarmup>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPool {
    name: String,
    sources: Vec<String>,
    warmup: Option<RawWarmup>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPoolRule {
    pool: String,
    sender_domain: Option<String>,
    auth_user: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWarmup {
    start: String,
    schedule: Vec<u64>,
}

/// A local address mail leaves from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    pub name: String,
    /// Bound before connecting; only endpoints of its family are reached from it.
    pub address: IpAddr,
    /// The EHLO name said from this address; `None`: `[delivery] helo_name`.
    pub ehlo: Option<String>,
    /// Concurrent connections from it per destination site; `None`:
    /// `[delivery] max_connections_per_site`.
    pub max_connections: Option<usize>,
    /// Its own warm-up schedule; overrides its pool's.
    pub warmup: Option<Warmup>,
}

/// A weighted set of sources.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pool {
    pub name: String,
    /// Index into [`Egress::sources`] and weight (at least 1).
    pub members: Vec<(usize, u32)>,
    /// The warm-up schedule of its sources (unless a source has its own).
    pub warmup: Option<Warmup>,
}

/// Picks a pool for messages from a sender domain and/or a submitting user
/// (every key given must match).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolRule {
    /// Index into [`Egress::pools`].
    pub pool: usize,
    /// Lowercase domain of the reverse-path.
    pub sender_domain: Option<String>,
    /// The SASL user that submitted the message (exact).
    pub auth_user: Option<String>,
}

/// Messages per UTC day per destination scope, growing day by day.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warmup {
    /// Day 1 of the schedule, in days since 1970-01-01 (UTC).
    pub start_day: i64,
    /// The cap of day 1, 2, ...; after the last day, no cap.
    pub schedule: Vec<u64>,
}

impl Warmup {
    /// The schedule's day (1-based) on unix day `today`; days before the
    /// start count as day 1.
    pub fn day(&self, today: i64) -> i64 {
        (today - self.start_day + 1).max(1)
    }

    /// The cap on unix day `today`, `None` once the schedule is over.
    pub fn cap(&self, today: i64) -> Option<u64> {
        let day = usize::try_from(self.day(today)).ok()?;
        self.schedule.get(day - 1).copied()
    }
}

/// Every source, pool and pool rule.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Egress {
    pub sources: Vec<Source>,
    pub pools: Vec<Pool>,
    pub rules: Vec<PoolRule>,
}

/// How a message's pool was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolChoice {
    /// Index into [`Egress::pools`].
    Pool(usize),
    /// No rule matched and there is no `default` pool: as without pools.
    None,
}

impl Egress {
    /// True when no `[[pool]]` is configured: delivery is as without pools.
    pub fn is_empty(&self) -> bool {
        self.pools.is_empty()
    }

    /// The pool named `name` (case-insensitive).
    pub fn pool(&self, name: &str) -> Option<usize> {
        self.pools.iter().position(|p| p.name.eq_ignore_ascii_case(name))
    }

    /// The pool of a message: the one its `X-Tern-Pool` header names (when
    /// it names one; `unknown` is set to the name otherwise), else the first
    /// matching rule, else `default`.
    pub fn choose<'h>(
        &self,
        header: Option<&'h str>,
        sender_domain: &str,
        auth_user: Option<&str>,
        unknown: &mut Option<&'h str>,
    ) -> PoolChoice {
        if let Some(name) = header.map(str::trim).filter(|n| !n.is_empty()) {
            match self.pool(name) {
                Some(i) => return PoolChoice::Pool(i),
                None => *unknown = Some(name),
            }
        }
        let matching = self.rules.iter().find(|r| {
            r.sender_domain
                .as_deref()
                .is_none_or(|d| d.eq_ignore_ascii_case(sender_domain))
                && r.auth_user.as_deref().is_none_or(|u| Some(u) == auth_user)
        });
        match matching {
            Some(r) => PoolChoice::Pool(r.pool),
            None => self.pool(DEFAULT_POOL).map_or(PoolChoice::None, PoolChoice::Pool),
        }
    }

    /// The warm-up schedule that holds `source` in `pool`.
    pub fn warmup(&self, pool: usize, source: usize) -> Option<&Warmup> {
        self.sources
            .get(source)
            .and_then(|s| s.warmup.as_ref())
            .or_else(|| self.pools.get(pool).and_then(|p| p.warmup.as_ref()))
    }
}

fn invalid(key: &'static str, reason: String) -> ConfigError {
    ConfigError::Invalid { key, reason }
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// `YYYY-MM-DD` as days since 1970-01-01.
pub fn parse_date(s: &str) -> Option<i64> {
    let mut parts = s.trim().splitn(3, '-');
    let y: i64 = parts.next()?.parse().ok()?;
    let m: i64 = parts.next()?.parse().ok()?;
    let d: i64 = parts.next()?.parse().ok()?;
    if !(1970..=9999).contains(&y) || !(1..=12).contains(&m) {
        return None;
    }
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let month_days = [31, if leap { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    let in_month = month_days.get(usize::try_from(m - 1).ok()?)?;
    if d < 1 || d > *in_month {
        return None;
    }
    Some(days_from_civil(y, m, d))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn warmup(raw: Option<RawWarmup>, key: &'static str) -> Result<Option<Warmup>, ConfigError> {
    let Some(raw) = raw else { return Ok(None) };
    let start_day = parse_date(&raw.start)
        .ok_or_else(|| invalid(key, format!("start {:?} is not a date (YYYY-MM-DD)", raw.start)))?;
    if raw.schedule.is_empty() {
        return Err(invalid(
            key,
            "schedule is empty (give messages per day for day 1, 2, ...)".into(),
        ));
    }
    Ok(Some(Warmup {
        start_day,
        schedule: raw.schedule,
    }))
}

pub(super) fn validate(
    raw_sources: Vec<RawSource>,
    raw_pools: Vec<RawPool>,
    raw_rules: Vec<RawPoolRule>,
) -> Result<Egress, ConfigError> {
    let mut sources: Vec<Source> = Vec::with_capacity(raw_sources.len());
    for s in raw_sources {
        if !is_name(&s.name) {
            return Err(invalid(
                "source.name",
                format!("{:?} is not a name (letters, digits, '-', '_', '.')", s.name),
            ));
        }
        if sources.iter().any(|o| o.name == s.name) {
            return Err(invalid("source.name", format!("{:?} is defined twice", s.name)));
        }
        let address: IpAddr = s.address.trim().parse().map_err(|_| {
            invalid(
                "source.address",
                format!("{:?} of source {} is not an IPv4 or IPv6 address", s.address, s.name),
            )
        })?;
        if address.is_unspecified() || address.is_multicast() {
            return Err(invalid(
                "source.address",
                format!("{address} of source {} is not a unicast address", s.name),
            ));
        }
        let ehlo = match s.ehlo.map(|e| e.trim().to_owned()) {
            Some(e) if e.is_empty() || e.contains(|c: char| c.is_whitespace() || c.is_control()) => {
                return Err(invalid(
                    "source.ehlo",
                    format!("{e:?} of source {} is not a host name", s.name),
                ))
            }
            other => other,
        };
        if s.max_connections.is_some_and(|n| !(1..=10_000).contains(&n)) {
            return Err(invalid(
                "source.max_connections",
                format!("source {}: must be 1 to 10000", s.name),
            ));
        }
        sources.push(Source {
            max_connections: s.max_connections,
            warmup: warmup(s.warmup, "source.warmup")?,
            name: s.name,
            address,
            ehlo,
        });
    }
    let mut pools: Vec<Pool> = Vec::with_capacity(raw_pools.len());
    for p in raw_pools {
        if !is_name(&p.name) {
            return Err(invalid(
                "pool.name",
                format!("{:?} is not a name (letters, digits, '-', '_', '.')", p.name),
            ));
        }
        if pools.iter().any(|o| o.name.eq_ignore_ascii_case(&p.name)) {
            return Err(invalid("pool.name", format!("{:?} is defined twice", p.name)));
        }
        if p.sources.is_empty() {
            return Err(invalid("pool.sources", format!("pool {} has no source", p.name)));
        }
        let mut members: Vec<(usize, u32)> = Vec::with_capacity(p.sources.len());
        for entry in &p.sources {
            let (name, weight) = match entry.split_once(':') {
                // An IPv6 literal is not a source name; names have no ':'.
                Some((n, w)) => (
                    n.trim(),
                    w.trim()
                        .parse::<u32>()
                        .ok()
                        .filter(|w| (1..=1000).contains(w))
                        .ok_or_else(|| {
                            invalid(
                                "pool.sources",
                                format!(
                                    "{entry:?} in pool {}: the weight must be a whole number 1 to 1000",
                                    p.name
                                ),
                            )
                        })?,
                ),
                None => (entry.trim(), 1),
            };
            let index = sources.iter().position(|s| s.name == name).ok_or_else(|| {
                invalid(
                    "pool.sources",
                    format!("pool {} names source {name:?}, which no [[source]] defines", p.name),
                )
            })?;
            if members.iter().any(|(i, _)| *i == index) {
                return Err(invalid(
                    "pool.sources",
                    format!("pool {} names source {name} twice", p.name),
                ));
            }
            members.push((index, weight));
        }
        pools.push(Pool {
            warmup: warmup(p.warmup, "pool.warmup")?,
            name: p.name,
            members,
        });
    }
    let mut rules = Vec::with_capacity(raw_rules.len());
    for r in raw_rules {
        let pool = pools
            .iter()
            .position(|p| p.name.eq_ignore_ascii_case(&r.pool))
            .ok_or_else(|| invalid("pool_rule.pool", format!("{:?} is not a [[pool]]", r.pool)))?;
        if r.sender_domain.is_none() && r.auth_user.is_none() {
            return Err(invalid(
                "pool_rule",
                format!("the rule for pool {} needs sender_domain or auth_user", r.pool),
            ));
        }
        rules.push(PoolRule {
            pool,
            sender_domain: r
                .sender_domain
                .map(|d| d.trim().trim_end_matches('.').to_ascii_lowercase()),
            auth_user: r.auth_user,
        });
    }
    Ok(Egress { sources, pools, rules })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use crate::Config;

    const MIN: &str = "[node]\nid = 1\n";

    const TWO: &str = "[[source]]\nname = \"a\"\naddress = \"127.0.0.2\"\nehlo = \"a.example.test\"\n\
        [[source]]\nname = \"b\"\naddress = \"::1\"\nmax_connections = 4\n\
        [[pool]]\nname = \"default\"\nsources = [\"a:3\", \"b\"]\n\
        [[pool]]\nname = \"bulk\"\nsources = [\"b\"]\nwarmup = { start = \"2026-12-01\", schedule = [5, 10] }\n\
        [[pool_rule]]\npool = \"bulk\"\nsender_domain = \"News.Example.test\"\n\
        [[pool_rule]]\npool = \"bulk\"\nauth_user = \"mailer\"\n";

    fn egress(extra: &str) -> Result<super::Egress, String> {
        Config::from_toml(&format!("{MIN}{extra}"))
            .map(|c| c.egress)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn sources_pools_and_rules() {
        let e = egress(TWO).unwrap();
        assert_eq!(e.sources.len(), 2);
        assert_eq!(e.sources[0].ehlo.as_deref(), Some("a.example.test"));
        assert_eq!(e.sources[1].address, "::1".parse::<std::net::IpAddr>().unwrap());
        assert_eq!(
            (e.sources[0].max_connections, e.sources[1].max_connections),
            (None, Some(4))
        );
        assert_eq!(e.pools[0].members, vec![(0, 3), (1, 1)]);
        let w = e.pools[1].warmup.as_ref().unwrap();
        assert_eq!(w.start_day, super::parse_date("2026-12-01").unwrap());
        assert_eq!(e.warmup(1, 1), Some(w));
        assert_eq!(e.warmup(0, 0), None);
        assert!(egress("").unwrap().is_empty());
    }

    #[test]
    fn choice_by_header_rule_and_default() {
        use super::PoolChoice::Pool;
        let e = egress(TWO).unwrap();
        let mut unknown = None;
        assert_eq!(e.choose(None, "other.test", None, &mut unknown), Pool(0));
        assert_eq!(e.choose(None, "news.example.test", None, &mut unknown), Pool(1));
        assert_eq!(e.choose(None, "other.test", Some("mailer"), &mut unknown), Pool(1));
        assert_eq!(e.choose(Some(" Bulk "), "other.test", None, &mut unknown), Pool(1));
        assert_eq!(unknown, None);
        // An unknown pool in the header: the rules, then default, and it is reported.
        assert_eq!(e.choose(Some("nosuch"), "other.test", None, &mut unknown), Pool(0));
        assert_eq!(unknown, Some("nosuch"));
        // No default pool: unmatched mail goes as without pools.
        let e =
            egress("[[source]]\nname = \"a\"\naddress = \"127.0.0.2\"\n[[pool]]\nname = \"x\"\nsources = [\"a\"]\n")
                .unwrap();
        assert_eq!(e.choose(None, "other.test", None, &mut None), super::PoolChoice::None);
    }

    #[test]
    fn warmup_days_and_caps() {
        let w = super::Warmup {
            start_day: 100,
            schedule: vec![5, 10],
        };
        assert_eq!((w.day(90), w.cap(90)), (1, Some(5)));
        assert_eq!((w.day(100), w.cap(100)), (1, Some(5)));
        assert_eq!((w.day(101), w.cap(101)), (2, Some(10)));
        assert_eq!((w.day(102), w.cap(102)), (3, None));
        assert_eq!(super::parse_date("1970-01-01"), Some(0));
        assert_eq!(super::parse_date("2000-03-01"), Some(11_017));
        assert_eq!(super::parse_date("2024-02-29"), Some(19_782));
        assert_eq!(super::parse_date("2023-02-29"), None);
        assert_eq!(super::parse_date("2026-13-01"), None);
        assert_eq!(super::parse_date("tomorrow"), None);
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("[[source]]\nname = \"a\"\naddress = \"nope\"\n", "source.address"),
            ("[[source]]\nname = \"a b\"\naddress = \"127.0.0.2\"\n", "source.name"),
            (
                "[[source]]\nname = \"a\"\naddress = \"127.0.0.2\"\n[[source]]\nname = \"a\"\naddress = \"127.0.0.3\"\n",
                "source.name",
            ),
            ("[[source]]\nname = \"a\"\naddress = \"0.0.0.0\"\n", "source.address"),
            ("[[source]]\nname = \"a\"\naddress = \"127.0.0.2\"\nmax_connections = 0\n", "source.max_connections"),
            ("[[source]]\nname = \"a\"\naddress = \"127.0.0.2\"\nehlo = \"a b\"\n", "source.ehlo"),
            ("[[pool]]\nname = \"p\"\nsources = [\"x\"]\n", "pool.sources"),
            ("[[pool]]\nname = \"p\"\nsources = []\n", "pool.sources"),
            (
                "[[source]]\nname = \"a\"\naddress = \"127.0.0.2\"\n[[pool]]\nname = \"p\"\nsources = [\"a:0\"]\n",
                "pool.sources",
            ),
            (
                "[[source]]\nname = \"a\"\naddress = \"127.0.0.2\"\n[[pool]]\nname = \"p\"\nsources = [\"a:x\"]\n",
                "pool.sources",
            ),
            (
                "[[source]]\nname = \"a\"\naddress = \"127.0.0.2\"\n[[pool]]\nname = \"p\"\nsources = [\"a\"]\n\
                 warmup = { start = \"2026-02-30\", schedule = [1] }\n",
                "pool.warmup",
            ),
            (
                "[[source]]\nname = \"a\"\naddress = \"127.0.0.2\"\n[[pool]]\nname = \"p\"\nsources = [\"a\"]\n\
                 warmup = { start = \"2026-02-01\", schedule = [] }\n",
                "pool.warmup",
            ),
            ("[[pool_rule]]\npool = \"p\"\nsender_domain = \"x.test\"\n", "pool_rule.pool"),
            (
                "[[source]]\nname = \"a\"\naddress = \"127.0.0.2\"\n[[pool]]\nname = \"p\"\nsources = [\"a\"]\n\
                 [[pool_rule]]\npool = \"p\"\n",
                "pool_rule",
            ),
        ];
        for (toml, key) in cases {
            let e = egress(toml).unwrap_err();
            assert!(e.starts_with(&format!("invalid value for {key}:")), "{toml}: {e}");
        }
        // DKIM may not sign the header delivery removes.
        let e = egress(
            "[[dkim]]\ndomain = \"x.test\"\nselector = \"s\"\nalgorithm = \"rsa-sha256\"\nprivate_key = \"/k\"\n\
             headers = [\"From\", \"x-tern-pool\"]\n",
        )
        .unwrap_err();
        assert!(
            e.starts_with("invalid value for dkim.headers:") && e.contains("cannot be signed"),
            "{e}"
        );
        assert!(egress("[[pool]]\nname = \"p\"\nsources = [\"a\"]\nbogus = 1\n")
            .unwrap_err()
            .contains("bogus"));
    }
}
