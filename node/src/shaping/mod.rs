//! Shaping: cluster-wide delivery limits per destination (`[[shaping]]`,
//! docs/deliverability.md "Shaping").
//!
//! - [`Shaper::classify`] names a destination's scope (`mx:<suffix>` when an
//!   `mx_suffix` rule matched, else `domain:<domain>`; `<source>|<scope>`
//!   with an egress source) and merges the matching rules' limits.
//! - [`Shaper::admit`] decides whether one message may go to that scope now:
//!   the rule's `rate` (lowered by an automatic `throttle` action in force),
//!   and `domain_rate` within an `mx:` scope, each held to this node's
//!   share. A message that may not go is given a reserved future slot
//!   (see [`limiter`]) and is not attempted; the queue brings it back then.
//! - [`Shaper::connections`] gives the site actor this node's part of
//!   `max_connections`, `messages_per_connection` and a [`ConnPacer`] for
//!   `connection_rate`.
//!
//! A limit is for the whole cluster: this node's share is the fraction of the
//! queue shards it leads (mail is spread over shards by message id), read
//! from the cluster at most once a second.
//!
//! Without rule limits and without a throttle action the path is one rule
//! match and one string for the scope: no lock, no allocation beyond that.

pub mod limiter;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tern_config::shaping::{Rate, ShapingLimits, ShapingRules};
use tern_model::shaping::{ActionKind, AutoAction};

use crate::cluster::writer::{ControlWriter, Share};
use limiter::{Gcra, Pace};

/// How often this node's share is read again from the cluster.
const SHARE_REFRESH: Duration = Duration::from_secs(1);
/// A reservation not claimed this long after its slot is dropped (the
/// message went elsewhere, e.g. its shard moved to another node).
const RESERVATION_GRACE: f64 = 120.0;

/// A destination as shaping sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    /// The scope key (`mx:.google.com`, `domain:example.com`,
    /// `ip1|mx:.google.com`).
    pub scope: String,
    /// The recipient domain (for `domain_rate`).
    pub domain: String,
    /// The matching rules' limits, merged.
    pub limits: ShapingLimits,
    /// The scope comes from a rule (an `mx_suffix` or a rule naming the
    /// domain): it may be a metric label.
    pub ruled: bool,
}

/// May a message go to a destination now?
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    Go,
    /// Not now: held until `until` (unix seconds), with the deferral reply.
    Hold {
        until: i64,
        reply: String,
    },
}

/// This node's part of a scope's connection limits.
#[derive(Clone)]
pub struct ConnLimits {
    /// Concurrent connections on this node: max(1, floor(limit × share)).
    pub max_connections: Option<usize>,
    pub messages_per_connection: Option<usize>,
    /// Paces new connections (`connection_rate`).
    pub pacer: Option<Arc<ConnPacer>>,
}

/// Spaces new connections of one scope on this node.
pub struct ConnPacer {
    bucket: Mutex<(Gcra, Pace)>,
    rate: Rate,
}

impl ConnPacer {
    /// Reserves the next connection slot when it comes within `max`: how
    /// long to wait for it. `Err(slot)`: not that soon (nothing reserved);
    /// the unix time of the next slot, for holding the message until then.
    pub fn reserve_within(&self, max: Duration) -> Result<Duration, i64> {
        let now = unix_now();
        let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        let pace = b.1;
        let at = b.0.earliest(now, pace);
        if at - now > max.as_secs_f64() {
            return Err(at.ceil() as i64);
        }
        b.0.take(at, pace);
        Ok(Duration::from_secs_f64((at - now).max(0.0)))
    }

    /// The cluster-wide rate this pacer holds its share of.
    pub fn rate(&self) -> Rate {
        self.rate
    }
}

/// Per-scope limiter state on this node.
#[derive(Default)]
struct ScopeState {
    rate: Gcra,
    /// `domain_rate` buckets within an `mx:` scope, by recipient domain.
    domains: HashMap<String, Gcra>,
    /// Slots reserved for held messages, by queue id.
    reserved: HashMap<String, f64>,
    last_purge: f64,
    pacer: Option<Arc<ConnPacer>>,
}

/// The node's shaping state. The rules come from the config; the rest is
/// runtime state that a reload of the rules keeps ([`Shaper::with_rules`]).
pub struct Shaper {
    rules: ShapingRules,
    /// Some rule names an egress source (checked once per chosen source).
    source_rules: bool,
    writer: Arc<OnceLock<ControlWriter>>,
    share: Arc<Mutex<Option<(Instant, Share)>>>,
    /// Limiters and reservations per scope: a scope whose rule changed
    /// keeps its slots; the new rate paces from the next message.
    scopes: Arc<Mutex<HashMap<String, ScopeState>>>,
}

/// A share known with certainty (tests, or a node with no cluster yet).
pub fn fraction_of(share: Share) -> (f64, f64) {
    let min = if share.shards == 0 {
        1.0
    } else {
        1.0 / share.shards as f64
    };
    (share.fraction(), min)
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl Shaper {
    pub fn new(rules: ShapingRules) -> Shaper {
        Shaper {
            source_rules: rules.rules.iter().any(|r| r.source.is_some()),
            rules,
            writer: Arc::default(),
            share: Arc::default(),
            scopes: Arc::default(),
        }
    }

    /// New `rules` over the same limiters, reservations, share and writer
    /// (a config reload: shaping goes on where it was).
    pub fn with_rules(&self, rules: ShapingRules) -> Shaper {
        Shaper {
            source_rules: rules.rules.iter().any(|r| r.source.is_some()),
            rules,
            writer: Arc::clone(&self.writer),
            share: Arc::clone(&self.share),
            scopes: Arc::clone(&self.scopes),
        }
    }

    /// Gives the shaper the cluster's view of this node's share.
    pub fn set_writer(&self, writer: ControlWriter) {
        let _ = self.writer.set(writer);
    }

    pub fn rules(&self) -> &ShapingRules {
        &self.rules
    }

    /// Whether some `[[shaping]]` rule names an egress source.
    pub fn has_source_rules(&self) -> bool {
        self.source_rules
    }

    /// This node's share, read at most once per [`SHARE_REFRESH`]; the whole
    /// delivery (1 of 1) before the cluster is up.
    pub fn share(&self) -> Share {
        let Some(writer) = self.writer.get() else {
            return Share { led: 1, shards: 1 };
        };
        let mut cached = self.share.lock().unwrap_or_else(|p| p.into_inner());
        match *cached {
            Some((at, share)) if at.elapsed() < SHARE_REFRESH => share,
            _ => {
                let share = writer.share();
                *cached = Some((Instant::now(), share));
                share
            }
        }
    }

    /// The scope and limits of mail for `domain` (lowercase) whose next hops
    /// are `hosts`, sent from `source` (an egress source name, if any).
    pub fn classify(&self, domain: &str, hosts: &[&str], source: Option<&str>) -> Destination {
        let m = self.rules.matching(domain, hosts, source);
        let (scope, ruled) = match m.mx_suffix {
            Some(suffix) => (format!("mx:{suffix}"), true),
            None => (format!("domain:{domain}"), m.rules.iter().any(|r| r.domain.is_some())),
        };
        let scope = match source {
            Some(s) => format!("{s}|{scope}"),
            None => scope,
        };
        Destination {
            scope,
            domain: domain.to_owned(),
            limits: m.limits,
            ruled,
        }
    }

    /// The limits of the rules that name `source`, for mail to `dest`
    /// (already classified without a source) leaving from that source, as
    /// their own scope `<source>|<scope>`; `None` when no such rule limits
    /// it. Only source rules count here: a destination's own limits are
    /// held once, in its destination scope, whatever the source.
    pub fn for_source(&self, dest: &Destination, hosts: &[&str], source: &str) -> Option<Destination> {
        let limits = self
            .rules
            .rules
            .iter()
            .filter(|r| r.source.is_some() && r.matches(&dest.domain, hosts, Some(source)))
            .fold(tern_config::shaping::ShapingLimits::default(), |l, r| {
                l.merged(&r.limits)
            });
        (!limits.is_empty()).then(|| Destination {
            scope: format!("{source}|{}", dest.scope),
            domain: dest.domain.clone(),
            limits,
            ruled: false,
        })
    }

    /// The message rate in force for `dest`: the rule's, lowered by a
    /// `throttle` action in force (`action`, read from the control group).
    pub fn effective_rate(dest: &Destination, action: Option<&AutoAction>, now: i64) -> Option<Rate> {
        let throttle = action.filter(|a| a.in_force(now)).and_then(|a| match a.kind {
            ActionKind::Throttle { count, per_secs } if count > 0 && per_secs > 0 => Some(Rate { count, per_secs }),
            _ => None,
        });
        match (dest.limits.rate, throttle) {
            (Some(r), Some(t)) => Some(r.min(t)),
            (r, t) => r.or(t),
        }
    }

    /// Whether message `queue_id` may go to `dest` now (see the module doc).
    pub fn admit(&self, dest: &Destination, queue_id: &str, action: Option<&AutoAction>) -> Admission {
        let now = unix_now();
        let rate = Self::effective_rate(dest, action, now as i64);
        let domain_rate = dest.limits.domain_rate.filter(|_| dest.scope.contains("mx:"));
        if rate.is_none() && domain_rate.is_none() {
            return Admission::Go;
        }
        let (fraction, min) = fraction_of(self.share());
        self.admit_at(dest, queue_id, rate, domain_rate, fraction, min, now)
    }

    #[allow(clippy::too_many_arguments)]
    fn admit_at(
        &self,
        dest: &Destination,
        queue_id: &str,
        rate: Option<Rate>,
        domain_rate: Option<Rate>,
        fraction: f64,
        min_fraction: f64,
        now: f64,
    ) -> Admission {
        let mut scopes = self.scopes.lock().unwrap_or_else(|p| p.into_inner());
        let state = scopes.entry(dest.scope.clone()).or_default();
        if now - state.last_purge > 10.0 {
            state.reserved.retain(|_, slot| *slot > now - RESERVATION_GRACE);
            state.last_purge = now;
        }
        let hold = |slot: f64, rate: Rate| Admission::Hold {
            until: slot.ceil() as i64,
            reply: format!(
                "451 4.7.0 held by shaping: rate {rate} for {} (this node's share {:.2})",
                dest.scope, fraction
            ),
        };
        let shown = rate.or(domain_rate).unwrap_or(Rate { count: 1, per_secs: 1 });
        // A message back for the slot reserved for it.
        if let Some(&slot) = state.reserved.get(queue_id) {
            if slot <= now + 0.5 {
                state.reserved.remove(queue_id);
                return Admission::Go;
            }
            return hold(slot, shown);
        }
        let pace = rate.map(|r| Pace::share_of(r, fraction, min_fraction));
        let dpace = domain_rate.map(|r| Pace::share_of(r, fraction, min_fraction));
        let by_rate = pace.map_or(now, |p| state.rate.earliest(now, p));
        let by_domain = dpace.map_or(now, |p| {
            state.domains.entry(dest.domain.clone()).or_default().earliest(now, p)
        });
        let at = by_rate.max(by_domain);
        // Each bucket gives its own earliest slot (the message goes at the
        // later one: never earlier than a slot it holds), so a domain's
        // wait does not push the provider's other domains back.
        if let Some(p) = pace {
            state.rate.take(by_rate, p);
        }
        if let Some(p) = dpace {
            state.domains.entry(dest.domain.clone()).or_default().take(by_domain, p);
        }
        if at <= now {
            return Admission::Go;
        }
        state.reserved.insert(queue_id.to_owned(), at);
        let shown = match domain_rate {
            Some(d) if by_domain > by_rate => d,
            _ => shown,
        };
        hold(at, shown)
    }

    /// This node's part of `dest`'s connection limits (`None`: no rule
    /// limits connections; the site's defaults apply).
    pub fn connections(&self, dest: &Destination) -> Option<ConnLimits> {
        let l = &dest.limits;
        if l.max_connections.is_none() && l.messages_per_connection.is_none() && l.connection_rate.is_none() {
            return None;
        }
        let (fraction, min) = fraction_of(self.share());
        let fraction = fraction.max(min);
        let pacer = l.connection_rate.map(|r| {
            let pace = Pace::share_of(r, fraction, min);
            let mut scopes = self.scopes.lock().unwrap_or_else(|p| p.into_inner());
            let state = scopes.entry(dest.scope.clone()).or_default();
            if state.pacer.as_ref().is_some_and(|p| p.rate != r) {
                state.pacer = None;
            }
            let pacer = state.pacer.get_or_insert_with(|| {
                Arc::new(ConnPacer {
                    bucket: Mutex::new((Gcra::default(), pace)),
                    rate: r,
                })
            });
            pacer.bucket.lock().unwrap_or_else(|p| p.into_inner()).1 = pace;
            Arc::clone(pacer)
        });
        Some(ConnLimits {
            max_connections: l.max_connections.map(|n| node_connections(n, fraction)),
            messages_per_connection: l.messages_per_connection.map(|n| n as usize),
            pacer,
        })
    }
}

/// This node's part of a cluster-wide connection limit: max(1, floor(n × fraction)).
pub fn node_connections(limit: u32, fraction: f64) -> usize {
    ((limit as f64 * fraction).floor() as usize).max(1)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn shaper(toml_rules: &str) -> Shaper {
        let config = tern_config::Config::from_toml(toml_rules).unwrap();
        Shaper::new(config.shaping)
    }

    fn throttle(count: u64, per_secs: u64, until: i64) -> AutoAction {
        AutoAction {
            kind: ActionKind::Throttle { count, per_secs },
            since: 0,
            until,
            rule: "backoff[0]".into(),
            reason: "421 4.7.28 slow down".into(),
            node: 1,
        }
    }

    #[test]
    fn scopes_name_the_provider_or_the_domain() {
        let s = shaper("[[shaping]]\nmx_suffix = \".prov.test\"\nrate = \"60/min\"\n");
        let a = s.classify("a.test", &["mx1.a.prov.test"], None);
        let b = s.classify("b.test", &["mx1.b.prov.test"], None);
        assert_eq!(a.scope, "mx:.prov.test");
        assert_eq!(a.scope, b.scope);
        assert!(a.ruled);
        let c = s.classify("c.test", &["mx.c.test"], Some("ip1"));
        assert_eq!(c.scope, "ip1|domain:c.test");
        assert!(!c.ruled && c.limits.is_empty());
        let g = s.classify("gmail.com", &["gmail-smtp-in.l.google.com"], None);
        assert_eq!(g.scope, "mx:.google.com", "built-in grouping");
    }

    #[test]
    fn held_messages_get_spread_slots_and_go_when_they_come_back() {
        let s = shaper("[[shaping]]\ndomain = \"a.test\"\nrate = \"30/min\"\n");
        let d = s.classify("a.test", &[], None);
        let rate = d.limits.rate;
        let now = 10_000.0;
        assert_eq!(s.admit_at(&d, "m0", rate, None, 1.0, 1.0, now), Admission::Go);
        let mut untils = Vec::new();
        for i in 1..4 {
            match s.admit_at(&d, &format!("m{i}"), rate, None, 1.0, 1.0, now) {
                Admission::Hold { until, reply } => {
                    assert!(
                        reply.starts_with("451 4.7.0 held by shaping: rate 30/min for domain:a.test"),
                        "{reply}"
                    );
                    untils.push(until);
                }
                Admission::Go => panic!("m{i} went"),
            }
        }
        assert_eq!(untils, [10_002, 10_004, 10_006]);
        // Early (e.g. an operator's retry): held again for the same slot, no new one taken.
        assert_eq!(
            s.admit_at(&d, "m2", rate, None, 1.0, 1.0, now + 1.0),
            Admission::Hold {
                until: 10_004,
                reply: "451 4.7.0 held by shaping: rate 30/min for domain:a.test (this node's share 1.00)".into()
            }
        );
        assert_eq!(s.admit_at(&d, "m1", rate, None, 1.0, 1.0, 10_002.0), Admission::Go);
        assert!(matches!(
            s.admit_at(&d, "m9", rate, None, 1.0, 1.0, 10_002.0),
            Admission::Hold { until: 10_008, .. }
        ));
    }

    /// New rules (a reload) over the same limiter: reserved slots stay
    /// and the next message is paced by the new rate after the old slots.
    #[test]
    fn new_rules_keep_the_limiters_and_reservations() {
        let s = shaper("[[shaping]]\ndomain = \"a.test\"\nrate = \"30/min\"\n");
        let d = s.classify("a.test", &[], None);
        let now = 10_000.0;
        assert_eq!(s.admit_at(&d, "m0", d.limits.rate, None, 1.0, 1.0, now), Admission::Go);
        assert!(matches!(
            s.admit_at(&d, "m1", d.limits.rate, None, 1.0, 1.0, now),
            Admission::Hold { until: 10_002, .. }
        ));
        let config = tern_config::Config::from_toml("[[shaping]]\ndomain = \"a.test\"\nrate = \"6/min\"\n").unwrap();
        let next = s.with_rules(config.shaping);
        let d = next.classify("a.test", &[], None);
        assert_eq!(d.limits.rate, Some(Rate { count: 6, per_secs: 60 }));
        // m1 keeps its slot; m2 waits its turn at the new pace after it.
        assert!(matches!(
            next.admit_at(&d, "m1", d.limits.rate, None, 1.0, 1.0, now),
            Admission::Hold { until: 10_002, .. }
        ));
        match next.admit_at(&d, "m2", d.limits.rate, None, 1.0, 1.0, now) {
            Admission::Hold { until, .. } => assert!(until > 10_002, "{until}"),
            Admission::Go => panic!("m2 went"),
        }
        assert_eq!(
            next.admit_at(&d, "m1", d.limits.rate, None, 1.0, 1.0, 10_002.0),
            Admission::Go
        );
    }

    #[test]
    fn shares_divide_the_rate_and_a_throttle_lowers_it() {
        let s = shaper("[[shaping]]\ndomain = \"a.test\"\nrate = \"60/min\"\n");
        let d = s.classify("a.test", &[], None);
        // A node leading a quarter of the shards: one message every 4 s.
        let now = 20_000.0;
        assert_eq!(
            s.admit_at(&d, "x0", d.limits.rate, None, 0.25, 1.0 / 16.0, now),
            Admission::Go
        );
        assert!(matches!(
            s.admit_at(&d, "x1", d.limits.rate, None, 0.25, 1.0 / 16.0, now),
            Admission::Hold { until: 20_004, .. }
        ));
        // A throttle in force lowers the rule's rate, an expired one does not.
        let t = throttle(6, 60, 100);
        assert_eq!(
            Shaper::effective_rate(&d, Some(&t), 50),
            Some(Rate { count: 6, per_secs: 60 })
        );
        assert_eq!(
            Shaper::effective_rate(&d, Some(&t), 100),
            Some(Rate {
                count: 60,
                per_secs: 60
            })
        );
        // A throttle applies to a scope no rule limits.
        let free = s.classify("b.test", &[], None);
        assert_eq!(
            Shaper::effective_rate(&free, Some(&t), 50),
            Some(Rate { count: 6, per_secs: 60 })
        );
        assert_eq!(Shaper::effective_rate(&free, None, 50), None);
        // A faster throttle does not raise the rule's rate.
        let fast = throttle(600, 60, 100);
        assert_eq!(
            Shaper::effective_rate(&d, Some(&fast), 50),
            Some(Rate {
                count: 60,
                per_secs: 60
            })
        );
    }

    #[test]
    fn a_domain_rate_caps_each_domain_within_the_provider() {
        let s = shaper("[[shaping]]\nmx_suffix = \".prov.test\"\nrate = \"60/s\"\ndomain_rate = \"1/min\"\n");
        let a = s.classify("a.test", &["mx1.prov.test"], None);
        let b = s.classify("b.test", &["mx1.prov.test"], None);
        let now = 30_000.0;
        let (r, dr) = (a.limits.rate, a.limits.domain_rate);
        assert_eq!(s.admit_at(&a, "a0", r, dr, 1.0, 1.0, now), Admission::Go);
        assert_eq!(s.admit_at(&b, "b0", r, dr, 1.0, 1.0, now), Admission::Go);
        match s.admit_at(&a, "a1", r, dr, 1.0, 1.0, now) {
            Admission::Hold { until, reply } => {
                assert_eq!(until, 30_060);
                assert!(reply.contains("rate 1/min for mx:.prov.test"), "{reply}");
            }
            Admission::Go => panic!("a1 went"),
        }
        // a's wait does not hold back another domain at the provider.
        let c = s.classify("c.test", &["mx1.prov.test"], None);
        assert_eq!(s.admit_at(&c, "c0", r, dr, 1.0, 1.0, now), Admission::Go);
    }

    #[test]
    fn connections_are_this_nodes_part_at_least_one() {
        assert_eq!(node_connections(10, 6.0 / 16.0), 3);
        assert_eq!(node_connections(2, 5.0 / 16.0), 1);
        assert_eq!(node_connections(4, 1.0), 4);
        let s = shaper("[[shaping]]\nmax_connections = 4\nmessages_per_connection = 7\n");
        let c = s.connections(&s.classify("x.test", &[], None)).unwrap();
        assert_eq!((c.max_connections, c.messages_per_connection), (Some(4), Some(7)));
        assert!(c.pacer.is_none());
        // connection_rate: a near slot is waited for, a far one is not taken.
        let s = shaper("[[shaping]]\nconnection_rate = \"1/min\"\n");
        let pacer = s.connections(&s.classify("x.test", &[], None)).unwrap().pacer.unwrap();
        assert!(pacer.reserve_within(Duration::from_secs(5)).unwrap() < Duration::from_millis(10));
        let later = pacer.reserve_within(Duration::from_secs(5)).unwrap_err();
        let now = unix_now() as i64;
        assert!((now + 58..=now + 61).contains(&later), "{later} vs {now}");
        assert_eq!(
            pacer.reserve_within(Duration::from_secs(5)).unwrap_err(),
            later,
            "nothing was taken"
        );
        let plain = Shaper::new(ShapingRules::default());
        assert!(plain.connections(&plain.classify("x.test", &[], None)).is_none());
    }
}
