//! Node-wide SMTP resource limits shared by every SMTP and submission
//! listener: concurrent sessions per client address ([`IpLimiter`]), new
//! connections per client address and time ([`ConnectionRate`]) and the
//! budget of message content held in memory by sessions ([`MemoryBudget`]).
//!
//! The session and memory limits hand out guards that give their share back on drop, so a session
//! that ends in any way (reply, error, disconnect, panic) releases it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::metrics::SmtpMetrics;
/// A share of the [`MemoryBudget`], given back on drop.
pub use tern_smtp::Reservation;

/// The key a client address is limited under: an IPv4 address (also when
/// seen as `::ffff:a.b.c.d`), or an IPv6 address's /64, since one IPv6
/// client usually holds a whole /64 and could otherwise take a slot per address.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) if !v6.is_loopback() => {
            let mut octets = v6.octets();
            octets[8..].fill(0);
            IpAddr::V6(octets.into())
        }
        other => other,
    }
}

/// Counts open sessions per client address; `try_acquire` refuses the one
/// beyond `max`.
#[derive(Debug)]
pub struct IpLimiter {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl IpLimiter {
    pub fn new(max: usize) -> Arc<IpLimiter> {
        Arc::new(IpLimiter {
            max,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for one session from `ip`, or `None` when `ip` already holds
    /// `max` sessions (keyed by [`client_key`]).
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        let ip = client_key(ip);
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            limiter: Arc::clone(self),
            ip,
        })
    }

    /// The most sessions one address may hold.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Sessions open from `ip` now.
    pub fn open(&self, ip: IpAddr) -> usize {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.get(&client_key(ip)).copied().unwrap_or(0)
    }
}

/// One session's place in its address's count.
#[derive(Debug)]
pub struct IpSlot {
    limiter: Arc<IpLimiter>,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut open = self.limiter.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Addresses whose connection rate is tracked at once; beyond it (after
/// forgetting those back at a full allowance) new addresses are not limited,
/// so that a flood of distinct addresses cannot grow the table without bound.
const MAX_TRACKED: usize = 65_536;

/// New connections per client address: a token bucket per address that
/// holds `count` connections and refills at `count` per `per`.
#[derive(Debug)]
pub struct ConnectionRate {
    count: u32,
    per: Duration,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl ConnectionRate {
    pub fn new(count: u32, per: Duration) -> Arc<ConnectionRate> {
        Arc::new(ConnectionRate {
            count,
            per,
            buckets: Mutex::new(HashMap::new()),
        })
    }

    /// `count/per` for logs.
    pub fn describe(&self) -> String {
        format!("{}/{}s", self.count, self.per.as_secs())
    }

    /// Whether a new connection from `ip` at `now` is within the rate (and
    /// counts it if so).
    pub fn allow(&self, ip: IpAddr, now: Instant) -> bool {
        let ip = client_key(ip);
        let full = f64::from(self.count);
        let per_sec = full / self.per.as_secs_f64().max(1e-3);
        let refill = |b: &Bucket| (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * per_sec).min(full);
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if !buckets.contains_key(&ip) && buckets.len() >= MAX_TRACKED {
            buckets.retain(|_, b| refill(b) < full);
            if buckets.len() >= MAX_TRACKED {
                return true;
            }
        }
        let b = buckets.entry(ip).or_insert(Bucket { tokens: full, at: now });
        let tokens = refill(b);
        let allowed = tokens >= 1.0;
        *b = Bucket {
            tokens: if allowed { tokens - 1.0 } else { tokens },
            at: now,
        };
        allowed
    }
}

/// Bytes of message content that sessions may hold in memory at once,
/// across the node. Sessions take a [`Reservation`] before they buffer
/// content and grow it as the buffer grows.
#[derive(Debug)]
pub struct MemoryBudget {
    capacity: u64,
    used: AtomicU64,
    metrics: SmtpMetrics,
}

impl MemoryBudget {
    pub fn new(capacity: u64, metrics: SmtpMetrics) -> Arc<MemoryBudget> {
        Arc::new(MemoryBudget {
            capacity,
            used: AtomicU64::new(0),
            metrics,
        })
    }

    /// Bytes reserved now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// Reserves `bytes`, or `None` when the budget cannot cover them.
    pub fn try_reserve(self: &Arc<Self>, bytes: u64) -> Option<Reservation> {
        Reservation::try_new(Arc::clone(self) as Arc<dyn tern_smtp::MemoryBudget>, bytes)
    }
}

impl tern_smtp::MemoryBudget for MemoryBudget {
    fn take(&self, bytes: u64) -> bool {
        let ok = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|&total| total <= self.capacity)
            })
            .is_ok();
        if ok {
            self.metrics.memory_reserved(bytes as i64);
        }
        ok
    }

    fn give(&self, bytes: u64) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
        self.metrics.memory_reserved(-(bytes as i64));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn per_ip_slots_are_counted_and_given_back() {
        let limiter = IpLimiter::new(2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let one = limiter.try_acquire(a).unwrap();
        let two = limiter.try_acquire(mapped).unwrap();
        assert!(
            limiter.try_acquire(a).is_none(),
            "a third session from the same address"
        );
        let other = limiter.try_acquire(b).unwrap();
        assert_eq!((limiter.open(a), limiter.open(b)), (2, 1));
        drop(one);
        let again = limiter.try_acquire(a).unwrap();
        drop((two, again, other));
        assert_eq!(limiter.open(a), 0);
        assert!(limiter.open.lock().unwrap().is_empty());
    }

    #[test]
    fn an_ipv6_slash_64_counts_as_one_client() {
        let limiter = IpLimiter::new(1);
        let one = limiter.try_acquire("2001:db8:1:2::1".parse().unwrap()).unwrap();
        assert!(limiter.try_acquire("2001:db8:1:2:ffff::9".parse().unwrap()).is_none());
        let other_net = limiter.try_acquire("2001:db8:1:3::1".parse().unwrap());
        assert!(other_net.is_some());
        drop(one);
    }

    #[test]
    fn connection_rate_is_a_bucket_per_address() {
        let rate = ConnectionRate::new(3, Duration::from_secs(60));
        let t0 = Instant::now();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "2001:db8::1".parse().unwrap();
        assert!((0..3).all(|_| rate.allow(a, t0)));
        assert!(!rate.allow(a, t0), "a fourth within the minute");
        assert!(!rate.allow("::ffff:192.0.2.1".parse().unwrap(), t0));
        assert!(rate.allow(b, t0), "another address has its own allowance");
        assert!(!rate.allow(a, t0 + Duration::from_secs(19)));
        assert!(rate.allow(a, t0 + Duration::from_secs(20)), "one back every 20 s");
        assert!(!rate.allow(a, t0 + Duration::from_secs(21)));
        // Refused attempts do not push the refill back.
        assert!(rate.allow(a, t0 + Duration::from_secs(40)));
    }

    #[test]
    fn connection_rate_table_is_bounded() {
        let rate = ConnectionRate::new(1, Duration::from_secs(3600));
        let t0 = Instant::now();
        for i in 0..MAX_TRACKED as u32 {
            assert!(rate.allow(IpAddr::from(i.to_be_bytes()), t0));
        }
        // The table is full of addresses still short of their allowance: new ones pass untracked.
        let new: IpAddr = "198.51.100.1".parse().unwrap();
        assert!(rate.allow(new, t0) && rate.allow(new, t0));
        assert_eq!(rate.buckets.lock().unwrap().len(), MAX_TRACKED);
        assert!(
            !rate.allow(IpAddr::from(7u32.to_be_bytes()), t0),
            "tracked ones stay limited"
        );
    }

    #[test]
    fn budget_reserves_grows_and_releases() {
        let budget = MemoryBudget::new(100, SmtpMetrics::default());
        let mut r = budget.try_reserve(60).unwrap();
        assert!(budget.try_reserve(41).is_none());
        let small = budget.try_reserve(40).unwrap();
        assert!(!r.grow_to(61), "over the budget");
        assert_eq!((r.bytes(), budget.used()), (60, 100));
        drop(small);
        assert!(r.grow_to(100));
        assert!(r.grow_to(50), "shrinking is a no-op");
        assert_eq!(budget.used(), 100);
        drop(r);
        assert_eq!(budget.used(), 0);
    }
}
