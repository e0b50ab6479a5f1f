//! Egress sources, pools and warm-up: which local address (and EHLO name)
//! a message leaves from.
//!
//! - A message's pool comes from its record and body alone (its
//!   `X-Tern-Pool` header, else the first `[[pool_rule]]` matching its sender
//!   domain or submitting user, else `default`), so every node that delivers
//!   it picks the same pool; the queue record is unchanged.
//! - Within the pool a source is chosen per destination by smooth weighted
//!   round-robin (nginx's: over any run of picks each source gets its share
//!   of the weights, interleaved), on this node, skipping sources whose
//!   address family cannot reach the destination and sources at their
//!   warm-up cap for the destination's scope today.
//! - Warm-up: a schedule caps messages per UTC day per source per
//!   destination scope (`RcptAttempt::scope`). Each node counts the
//!   messages it delivered, in memory (a restart forgets the day's count),
//!   and is held to `ceil(cap × share)` where share is the fraction of queue
//!   shards it leads ([`crate::cluster::Share::fraction`]): the cluster as a
//!   whole delivers about the cap, at most one more per node. A message is
//!   counted when its attempt is handed out and given back when nothing of
//!   it was delivered, so concurrent attempts never overshoot the cap.
//! - With no `[[pool]]` nothing here runs: no bind, the node's `helo_name`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use super::client::{ClientConfig, Endpoint};
use crate::config::egress::{Egress as EgressConfig, PoolChoice, POOL_HEADER};

const DAY: i64 = 86_400;
/// Counters of past days are dropped once the map holds this many.
const COUNTERS_PRUNE_AT: usize = 10_000;

/// Warm-up counts: (source name, scope) -> (unix day, messages).
type Counted = HashMap<(String, String), (i64, u64)>;

/// Pools, their sources' client settings, round-robin and warm-up state.
pub struct Egress {
    config: EgressConfig,
    /// Per source: the base client settings with its bind address and EHLO name.
    clients: Vec<Arc<ClientConfig>>,
    /// Smooth weighted round-robin state: per pool, per member, current weight.
    current: Mutex<Vec<Vec<i64>>>,
    /// Messages counted today per (source name, scope), with the unix day
    /// counted; shared with the `Egress` a config reload makes
    /// ([`Egress::reconfigured`]), so warm-up goes on where it was.
    counted: Arc<Mutex<Counted>>,
}

/// A source chosen for one destination.
#[derive(Debug)]
pub struct Choice {
    pub source: usize,
    pub name: String,
    /// Counted against a warm-up cap: give it back ([`Egress::give_back`])
    /// when nothing was delivered.
    pub counted: Option<(usize, String, i64)>,
}

/// Why no source of the pool was used.
#[derive(Debug, PartialEq, Eq)]
pub enum NoSource {
    /// Every source that can reach the destination is at its warm-up cap
    /// for today: hold the mail until `until` (the next UTC day).
    Capped { until: i64, reply: String },
    /// No source has the address family of any endpoint.
    Unreachable { reply: String },
}

impl Egress {
    /// `None` when no `[[pool]]` is configured.
    pub fn new(config: &EgressConfig, base: &ClientConfig) -> Option<Egress> {
        if config.is_empty() {
            return None;
        }
        let clients = config
            .sources
            .iter()
            .map(|s| {
                Arc::new(ClientConfig {
                    helo_name: s.ehlo.clone().unwrap_or_else(|| base.helo_name.clone()),
                    bind: Some(s.address),
                    ..base.clone()
                })
            })
            .collect();
        let current = config.pools.iter().map(|p| vec![0; p.members.len()]).collect();
        Some(Egress {
            config: config.clone(),
            clients,
            current: Mutex::new(current),
            counted: Arc::default(),
        })
    }

    /// The egress of a reloaded `config`: today's warm-up counts carry
    /// over by source name, and the round-robin position of each pool whose
    /// members are the same. `None` when no `[[pool]]` is left.
    pub fn reconfigured(&self, config: &EgressConfig, base: &ClientConfig) -> Option<Egress> {
        let mut next = Egress::new(config, base)?;
        next.counted = Arc::clone(&self.counted);
        let old = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let members = |c: &EgressConfig, pool: usize| -> Vec<(String, u32)> {
            c.pools[pool]
                .members
                .iter()
                .map(|&(s, w)| (c.sources[s].name.clone(), w))
                .collect()
        };
        let current = next.current.get_mut().unwrap_or_else(|e| e.into_inner());
        for (pool, p) in config.pools.iter().enumerate() {
            let Some(was) = self.config.pools.iter().position(|o| o.name == p.name) else {
                continue;
            };
            if members(&self.config, was) == members(config, pool) {
                if let (Some(to), Some(from)) = (current.get_mut(pool), old.get(was)) {
                    to.clone_from(from);
                }
            }
        }
        drop(old);
        Some(next)
    }

    pub fn config(&self) -> &EgressConfig {
        &self.config
    }

    /// The client settings of source `source`.
    pub fn client(&self, source: usize) -> &Arc<ClientConfig> {
        &self.clients[source]
    }

    /// The pool of a message (see the module doc); a header naming no pool
    /// is logged and ignored.
    pub fn pool_for(&self, msg_id: &str, body: &[u8], sender_domain: &str, auth_user: Option<&str>) -> PoolChoice {
        let header = super::headers::header_value(body, POOL_HEADER);
        let mut unknown = None;
        let choice = self
            .config
            .choose(header.as_deref(), sender_domain, auth_user, &mut unknown);
        if let Some(name) = unknown {
            tracing::warn!(
                msg_id,
                pool = name,
                "{POOL_HEADER} names no [[pool]]; using the rules or the default pool"
            );
        }
        choice
    }

    /// A source of `pool` for mail to `scope` through `endpoints`, counted
    /// against its warm-up cap; `share` is this node's fraction of the
    /// cluster's delivery, asked only when a cap applies.
    pub fn choose(
        &self,
        pool: usize,
        scope: &str,
        endpoints: &[Endpoint],
        now: i64,
        share: impl FnOnce() -> f64,
    ) -> Result<Choice, NoSource> {
        self.choose_except(pool, scope, endpoints, now, share, &|_| false)
    }

    /// As [`Egress::choose`], never choosing a source `skip` names (one an
    /// automatic action suspends for this scope); `Unreachable` when every
    /// source is skipped or of the wrong address family.
    pub fn choose_except(
        &self,
        pool: usize,
        scope: &str,
        endpoints: &[Endpoint],
        now: i64,
        share: impl FnOnce() -> f64,
        skip: &dyn Fn(&str) -> bool,
    ) -> Result<Choice, NoSource> {
        let Some(p) = self.config.pools.get(pool) else {
            return Err(NoSource::Unreachable {
                reply: "451 4.3.0 no such egress pool".into(),
            });
        };
        let today = now.div_euclid(DAY);
        let reachable = |source: usize| {
            let address = self.config.sources[source].address;
            endpoints.iter().any(|e| match e {
                Endpoint::Tcp { addr, .. } => addr.is_ipv4() == address.is_ipv4(),
                Endpoint::Unix(_) => false,
            })
        };
        let mut eligible: Vec<bool> = p
            .members
            .iter()
            .map(|&(s, _)| reachable(s) && !skip(&self.config.sources[s].name))
            .collect();
        if !eligible.iter().any(|&e| e) {
            return Err(NoSource::Unreachable {
                reply: format!(
                    "451 4.4.1 no source of pool {} has the address family of {scope}'s hosts",
                    p.name
                ),
            });
        }
        let mut counted = self.counted.lock().unwrap_or_else(|e| e.into_inner());
        let mut share = Some(share);
        let mut fraction = 1.0;
        let mut caps: Vec<Option<u64>> = vec![None; p.members.len()];
        for (i, &(source, _)) in p.members.iter().enumerate() {
            if !eligible[i] {
                continue;
            }
            let Some(cap) = self.config.warmup(pool, source).and_then(|w| w.cap(today)) else {
                continue;
            };
            if let Some(f) = share.take() {
                fraction = f();
            }
            let cap = node_cap(cap, fraction);
            caps[i] = Some(cap);
            let used = used_today(&counted, &self.config.sources[source].name, scope, today);
            if used >= cap {
                eligible[i] = false;
            }
        }
        if !eligible.iter().any(|&e| e) {
            let until = (today + 1) * DAY;
            let cap = caps.iter().flatten().max().copied().unwrap_or(0);
            return Err(NoSource::Capped {
                until,
                reply: format!(
                    "451 4.7.0 warm-up: every source of pool {} reached today's cap for {scope} ({cap} on this node); \
                     held until the next UTC day",
                    p.name
                ),
            });
        }
        let i = {
            let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
            let weights: Vec<u32> = p.members.iter().map(|&(_, w)| w).collect();
            smooth_weighted(&mut current[pool], &weights, &eligible)
        };
        let source = p.members[i].0;
        let mut count = None;
        if caps[i].is_some() {
            if counted.len() >= COUNTERS_PRUNE_AT {
                counted.retain(|_, (day, _)| *day == today);
            }
            let entry = counted
                .entry((self.config.sources[source].name.clone(), scope.to_owned()))
                .or_insert((today, 0));
            if entry.0 != today {
                *entry = (today, 0);
            }
            entry.1 += 1;
            count = Some((source, scope.to_owned(), today));
        }
        Ok(Choice {
            source,
            name: self.config.sources[source].name.clone(),
            counted: count,
        })
    }

    /// A counted message was not delivered after all.
    pub fn give_back(&self, counted: (usize, String, i64)) {
        let (source, scope, day) = counted;
        let Some(name) = self.config.sources.get(source).map(|s| s.name.clone()) else {
            return;
        };
        let mut map = self.counted.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = map.get_mut(&(name, scope)) {
            if entry.0 == day {
                entry.1 = entry.1.saturating_sub(1);
            }
        }
    }

    /// Every pool with its sources, weights and warm-up progress today.
    pub fn status(&self, now: i64, fraction: f64) -> Vec<PoolStatus> {
        let today = now.div_euclid(DAY);
        let counted = self.counted.lock().unwrap_or_else(|e| e.into_inner());
        self.config
            .pools
            .iter()
            .enumerate()
            .map(|(pool, p)| PoolStatus {
                name: p.name.clone(),
                sources: p
                    .members
                    .iter()
                    .map(|&(source, weight)| {
                        let s = &self.config.sources[source];
                        let warmup = self.config.warmup(pool, source).map(|w| {
                            let cap = w.cap(today);
                            let mut used: Vec<(String, u64)> = counted
                                .iter()
                                .filter(|((src, _), (day, n))| *src == s.name && *day == today && *n > 0)
                                .map(|((_, scope), (_, n))| (scope.clone(), *n))
                                .collect();
                            used.sort();
                            WarmupStatus {
                                start_day: w.start_day,
                                day: w.day(today),
                                days: w.schedule.len(),
                                cap,
                                node_cap: cap.map(|c| node_cap(c, fraction)),
                                used,
                            }
                        });
                        SourceStatus {
                            name: s.name.clone(),
                            address: s.address,
                            ehlo: self.clients[source].helo_name.clone(),
                            weight,
                            warmup,
                        }
                    })
                    .collect(),
            })
            .collect()
    }
}

/// A pool as `ternctl pool show` prints it.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolStatus {
    pub name: String,
    pub sources: Vec<SourceStatus>,
}

impl PoolStatus {
    /// As `ternctl pool show` receives it.
    pub fn into_proto(self) -> tern_proto::admin::PoolInfo {
        use tern_proto::admin::{PoolInfo, PoolScopeUse, PoolSource};
        PoolInfo {
            name: self.name,
            sources: self
                .sources
                .into_iter()
                .map(|s| {
                    let mut source = PoolSource {
                        name: s.name,
                        address: s.address.to_string(),
                        ehlo: s.ehlo,
                        weight: s.weight,
                        ..PoolSource::default()
                    };
                    if let Some(w) = s.warmup {
                        source.warmup = true;
                        source.warmup_start = date(w.start_day);
                        source.day = w.day;
                        source.days = w.days as u64;
                        source.cap = w.cap;
                        source.node_cap = w.node_cap;
                        source.used = w
                            .used
                            .into_iter()
                            .map(|(scope, used)| PoolScopeUse { scope, used })
                            .collect();
                    }
                    source
                })
                .collect(),
        }
    }
}

/// Days since 1970-01-01 as `YYYY-MM-DD`.
fn date(day: i64) -> String {
    chrono::DateTime::from_timestamp(day.saturating_mul(DAY), 0)
        .map(|t| t.format("%Y-%m-%d").to_string())
        .unwrap_or_default()
}

#[derive(Clone, Debug, PartialEq)]
pub struct SourceStatus {
    pub name: String,
    pub address: IpAddr,
    pub ehlo: String,
    pub weight: u32,
    pub warmup: Option<WarmupStatus>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct WarmupStatus {
    /// Day 1, in days since 1970-01-01.
    pub start_day: i64,
    /// Today's day of the schedule (1-based).
    pub day: i64,
    /// Days in the schedule.
    pub days: usize,
    /// Today's cluster-wide cap per scope; `None`: the schedule is over.
    pub cap: Option<u64>,
    /// This node's part of it.
    pub node_cap: Option<u64>,
    /// Messages this node delivered today per scope.
    pub used: Vec<(String, u64)>,
}

/// This node's part of a cluster-wide cap: rounded up, so a node that
/// leads any shard may send at least one.
fn node_cap(cap: u64, fraction: f64) -> u64 {
    let fraction = if fraction.is_finite() {
        fraction.clamp(0.0, 1.0)
    } else {
        1.0
    };
    (cap as f64 * fraction).ceil() as u64
}

fn used_today(counted: &Counted, source: &str, scope: &str, today: i64) -> u64 {
    counted
        .get(&(source.to_owned(), scope.to_owned()))
        .filter(|(day, _)| *day == today)
        .map_or(0, |(_, n)| *n)
}

/// Smooth weighted round-robin over the `eligible` members: each gains its
/// weight, the largest current weight wins and pays the total back.
/// Callers pass at least one eligible member; with none it returns 0.
fn smooth_weighted(current: &mut [i64], weights: &[u32], eligible: &[bool]) -> usize {
    let mut total = 0i64;
    let mut best: Option<usize> = None;
    for i in 0..weights.len() {
        if !eligible.get(i).copied().unwrap_or(false) {
            continue;
        }
        let w = i64::from(weights[i]);
        current[i] += w;
        total += w;
        if best.is_none_or(|b| current[i] > current[b]) {
            best = Some(i);
        }
    }
    let best = best.unwrap_or(0);
    if let Some(c) = current.get_mut(best) {
        *c -= total;
    }
    best
}

/// The message with its `X-Tern-Pool` header field(s) removed from the
/// header section; `None` when it has none (nothing to copy).
pub fn strip_pool_header(body: &[u8]) -> Option<Vec<u8>> {
    let end = body
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(body.len(), |p| p + 2);
    let name = POOL_HEADER.as_bytes();
    let is_pool_field = |line: &[u8]| {
        line.len() > name.len() && line[..name.len()].eq_ignore_ascii_case(name) && {
            let rest = &line[name.len()..];
            let colon = rest.iter().position(|&b| b != b' ' && b != b'\t');
            colon.is_some_and(|c| rest[c] == b':')
        }
    };
    let mut out: Option<Vec<u8>> = None;
    let mut start = 0;
    let mut skipping = false;
    while start < end {
        let line_end = body[start..end]
            .windows(2)
            .position(|w| w == b"\r\n")
            .map_or(end, |p| start + p + 2);
        let line = &body[start..line_end];
        let continuation = matches!(line.first(), Some(b' ' | b'\t'));
        if !continuation {
            skipping = is_pool_field(line);
        }
        if skipping {
            if out.is_none() {
                out = Some(body[..start].to_vec());
            }
        } else if let Some(o) = out.as_mut() {
            o.extend_from_slice(line);
        }
        start = line_end;
    }
    let mut out = out?;
    out.extend_from_slice(&body[end..]);
    Some(out)
}

/// Shared handle used by delivery and the admin service.
pub type SharedEgress = Option<Arc<Egress>>;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::config::Config;

    fn egress(toml: &str) -> Egress {
        let c = Config::from_toml(&format!("[node]\nid = 1\n{toml}")).unwrap();
        Egress::new(&c.egress, &ClientConfig::default()).unwrap()
    }

    fn v4() -> Vec<Endpoint> {
        vec![Endpoint::Tcp {
            host: "mx.test".into(),
            addr: "127.0.0.1:25".parse().unwrap(),
        }]
    }

    fn v6() -> Vec<Endpoint> {
        vec![Endpoint::Tcp {
            host: "mx.test".into(),
            addr: "[::1]:25".parse().unwrap(),
        }]
    }

    const POOL: &str = "[[source]]\nname = \"a\"\naddress = \"127.0.0.2\"\nehlo = \"a.test\"\n\
        [[source]]\nname = \"b\"\naddress = \"127.0.0.3\"\n\
        [[source]]\nname = \"six\"\naddress = \"::1\"\n\
        [[pool]]\nname = \"default\"\nsources = [\"a:3\", \"b:1\", \"six\"]\n";

    #[test]
    fn a_skipped_source_is_never_chosen_and_skipping_all_is_unreachable() {
        let e = egress(POOL);
        for _ in 0..8 {
            let c = e
                .choose_except(0, "domain:x.test", &v4(), 0, || 1.0, &|n: &str| n == "a")
                .unwrap();
            assert_ne!(c.name, "a");
        }
        assert!(matches!(
            e.choose_except(0, "domain:x.test", &v4(), 0, || 1.0, &|_: &str| true),
            Err(NoSource::Unreachable { .. })
        ));
    }

    #[test]
    fn weighted_choice_follows_the_weights_and_interleaves() {
        let e = egress(POOL);
        let picks: Vec<String> = (0..8)
            .map(|_| e.choose(0, "domain:x.test", &v4(), 0, || 1.0).unwrap().name)
            .collect();
        assert_eq!(picks.iter().filter(|n| *n == "a").count(), 6);
        assert_eq!(picks.iter().filter(|n| *n == "b").count(), 2);
        // Smooth: never all of a's turns in a row.
        assert_eq!(&picks[..4], ["a", "a", "b", "a"]);
        // The IPv6 source only for IPv6 hosts, the IPv4 ones never there.
        for _ in 0..3 {
            assert_eq!(e.choose(0, "domain:x.test", &v6(), 0, || 1.0).unwrap().name, "six");
        }
        assert_eq!(e.client(0).helo_name, "a.test");
        assert_eq!(e.client(1).helo_name, "localhost");
        assert_eq!(e.client(2).bind, Some("::1".parse().unwrap()));
    }

    #[test]
    fn unreachable_family_is_an_ordinary_deferral() {
        let e = egress(
            "[[source]]\nname = \"six\"\naddress = \"::1\"\n[[pool]]\nname = \"default\"\nsources = [\"six\"]\n",
        );
        match e.choose(0, "domain:x.test", &v4(), 0, || 1.0) {
            Err(NoSource::Unreachable { reply }) => assert!(reply.starts_with("451 4.4.1"), "{reply}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn warmup_caps_per_scope_and_day_and_gives_back() {
        // 1970-01-01 is day 1: cap 2, then 3, then none.
        let e = egress(
            "[[source]]\nname = \"a\"\naddress = \"127.0.0.2\"\n[[source]]\nname = \"b\"\naddress = \"127.0.0.3\"\n\
             warmup = { start = \"1970-01-01\", schedule = [1] }\n\
             [[pool]]\nname = \"default\"\nsources = [\"a\", \"b\"]\n\
             warmup = { start = \"1970-01-01\", schedule = [2, 3] }\n",
        );
        let scope = "domain:x.test";
        let mut names = Vec::new();
        for _ in 0..3 {
            names.push(e.choose(0, scope, &v4(), 10, || 1.0).unwrap().name);
        }
        names.sort();
        // a: the pool's cap 2; b: its own cap 1.
        assert_eq!(names, ["a", "a", "b"]);
        let held = e.choose(0, scope, &v4(), 10, || 1.0).unwrap_err();
        assert!(
            matches!(&held, NoSource::Capped { until: DAY, reply } if reply.contains("warm-up")),
            "{held:?}"
        );
        // Another scope has its own budget.
        assert!(e.choose(0, "domain:y.test", &v4(), 10, || 1.0).is_ok());
        // An attempt that delivered nothing gives its count back.
        let c = e.choose(0, "domain:z.test", &v4(), 10, || 1.0).unwrap();
        let c2 = e.choose(0, "domain:z.test", &v4(), 10, || 1.0).unwrap();
        let c3 = e.choose(0, "domain:z.test", &v4(), 10, || 1.0).unwrap();
        assert!(e.choose(0, "domain:z.test", &v4(), 10, || 1.0).is_err());
        e.give_back(c.counted.unwrap());
        drop((c2, c3));
        assert!(e.choose(0, "domain:z.test", &v4(), 10, || 1.0).is_ok());
        // Day 2: a may send 3, b is past its schedule (no cap).
        let day2 = DAY + 5;
        let n = (0..20)
            .filter(|_| e.choose(0, scope, &v4(), day2, || 1.0).is_ok_and(|c| c.name == "a"))
            .count();
        assert_eq!(n, 3);
        // Half the shards: half the cap, rounded up.
        let status = e.status(day2, 1.0);
        let a = status[0].sources[0].warmup.as_ref().unwrap();
        assert_eq!(
            (a.day, a.cap, a.used.clone()),
            (2, Some(3), vec![(scope.to_owned(), 3)])
        );
        assert_eq!(status[0].sources[1].warmup.as_ref().unwrap().cap, None);
        assert_eq!(node_cap(3, 0.5), 2);
        assert_eq!(node_cap(5, 1.0), 5);
        assert_eq!(node_cap(5, 0.0), 0);
    }

    /// A reload that reorders the sources and adds one keeps today's
    /// warm-up counts by source name, and a give-back to the old egress
    /// still counts.
    #[test]
    fn a_reconfigured_egress_keeps_the_warmup_counts_by_source_name() {
        let e = egress(
            "[[source]]\nname = \"a\"\naddress = \"127.0.0.2\"\n\
             [[pool]]\nname = \"default\"\nsources = [\"a\"]\n\
             warmup = { start = \"1970-01-01\", schedule = [2] }\n",
        );
        let scope = "domain:x.test";
        let first = e.choose(0, scope, &v4(), 10, || 1.0).unwrap();
        e.choose(0, scope, &v4(), 10, || 1.0).unwrap();
        let c = Config::from_toml(
            "[node]\nid = 1\n[[source]]\nname = \"new\"\naddress = \"127.0.0.4\"\n\
             [[source]]\nname = \"a\"\naddress = \"127.0.0.2\"\nehlo = \"a2.test\"\n\
             [[pool]]\nname = \"default\"\nsources = [\"a\", \"new\"]\n\
             warmup = { start = \"1970-01-01\", schedule = [2] }\n",
        )
        .unwrap();
        let next = e.reconfigured(&c.egress, &ClientConfig::default()).unwrap();
        assert_eq!(next.client(1).helo_name, "a2.test");
        // a is at its cap: only the new source is left.
        for _ in 0..2 {
            assert_eq!(next.choose(0, scope, &v4(), 10, || 1.0).unwrap().name, "new");
        }
        assert!(next.choose(0, scope, &v4(), 10, || 1.0).is_err());
        // The old egress's attempt delivered nothing: a gets a slot back.
        e.give_back(first.counted.unwrap());
        assert_eq!(next.choose(0, scope, &v4(), 10, || 1.0).unwrap().name, "a");
        // No pools left: no egress.
        let none = Config::from_toml("[node]\nid = 1\n").unwrap();
        assert!(next.reconfigured(&none.egress, &ClientConfig::default()).is_none());
    }

    #[test]
    fn pool_header_is_stripped_with_its_continuations() {
        let body = b"From: a@x.test\r\nX-Tern-Pool: bulk\r\n  more\r\nx-tern-pool : two\r\nSubject: s\r\n\r\nX-Tern-Pool: body\r\n";
        let out = strip_pool_header(body).unwrap();
        assert_eq!(out, b"From: a@x.test\r\nSubject: s\r\n\r\nX-Tern-Pool: body\r\n");
        assert!(strip_pool_header(b"From: a@x.test\r\nX-Tern-Pooled: no\r\n\r\nX-Tern-Pool: x\r\n").is_none());
        assert_eq!(
            strip_pool_header(b"X-Tern-Pool: a\r\nFrom: b\r\n\r\n").unwrap(),
            b"From: b\r\n\r\n"
        );
    }
}
