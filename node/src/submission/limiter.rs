//! Failed-authentication limits: after `max_failures` failures within
//! `window`, from one client IP or for one user name, further attempts are
//! refused without a password check until the oldest of those failures is
//! older than the window (a sliding window).
//!
//! Memory is bounded: each key keeps at most `max_failures` timestamps, and
//! each table at most [`MAX_KEYS`] keys; when full, expired keys go first,
//! then the key whose last failure is oldest.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Keys tracked per table (client IPs, user names).
pub const MAX_KEYS: usize = 10_000;

/// Recent failures per key.
#[derive(Debug)]
struct Table<K> {
    map: HashMap<K, VecDeque<Instant>>,
    cap: usize,
}

impl<K: Hash + Eq + Clone> Table<K> {
    fn new(cap: usize) -> Self {
        Table {
            map: HashMap::new(),
            cap,
        }
    }

    /// Failures of `key` within `window` before `now`.
    fn count(&mut self, key: &K, now: Instant, window: Duration) -> usize {
        let Some(times) = self.map.get_mut(key) else {
            return 0;
        };
        while times.front().is_some_and(|t| now.duration_since(*t) >= window) {
            times.pop_front();
        }
        if times.is_empty() {
            self.map.remove(key);
            return 0;
        }
        times.len()
    }

    fn record(&mut self, key: K, now: Instant, window: Duration, keep: usize) {
        if !self.map.contains_key(&key) && self.map.len() >= self.cap {
            self.map
                .retain(|_, t| t.back().is_some_and(|last| now.duration_since(*last) < window));
            if self.map.len() >= self.cap {
                let oldest = self
                    .map
                    .iter()
                    .min_by_key(|(_, t)| t.back().copied())
                    .map(|(k, _)| k.clone());
                if let Some(k) = oldest {
                    self.map.remove(&k);
                }
            }
        }
        let times = self.map.entry(key).or_default();
        times.push_back(now);
        while times.len() > keep {
            times.pop_front();
        }
    }
}

/// Failure counts per client IP and per user name.
#[derive(Debug)]
pub struct FailureLimiter {
    max_failures: usize,
    window: Duration,
    ips: Mutex<Table<IpAddr>>,
    users: Mutex<Table<String>>,
}

impl FailureLimiter {
    pub fn new(max_failures: u32, window: Duration) -> Self {
        Self::with_cap(max_failures, window, MAX_KEYS)
    }

    fn with_cap(max_failures: u32, window: Duration, cap: usize) -> Self {
        FailureLimiter {
            max_failures: (max_failures as usize).max(1),
            window,
            ips: Mutex::new(Table::new(cap)),
            users: Mutex::new(Table::new(cap)),
        }
    }

    /// True if `ip` or `user` (lower-cased) has reached the limit.
    pub fn blocked(&self, ip: IpAddr, user: &str, now: Instant) -> bool {
        let ip = ip.to_canonical();
        let user = user.to_ascii_lowercase();
        let by_ip = lock(&self.ips).count(&ip, now, self.window);
        let by_user = lock(&self.users).count(&user, now, self.window);
        by_ip >= self.max_failures || by_user >= self.max_failures
    }

    /// Counts one failed attempt against both keys.
    pub fn record_failure(&self, ip: IpAddr, user: &str, now: Instant) {
        let (window, keep) = (self.window, self.max_failures);
        lock(&self.ips).record(ip.to_canonical(), now, window, keep);
        lock(&self.users).record(user.to_ascii_lowercase(), now, window, keep);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn blocks_by_ip_and_by_user_within_the_window() {
        let l = FailureLimiter::new(3, 15 * MIN);
        let t0 = Instant::now();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "::ffff:192.0.2.2".parse().unwrap();
        for i in 0..2 {
            l.record_failure(a, "alice", t0 + i * MIN);
        }
        assert!(!l.blocked(a, "x", t0 + 2 * MIN));
        l.record_failure(a, "Bob", t0 + 2 * MIN);
        // The IP is blocked for every user; alice (2 failures) elsewhere is not.
        assert!(l.blocked(a, "carol", t0 + 3 * MIN));
        assert!(!l.blocked(b, "alice", t0 + 3 * MIN));
        l.record_failure(b, "ALICE", t0 + 3 * MIN);
        assert!(!l.blocked("192.0.2.2".parse().unwrap(), "dave", t0 + 3 * MIN));
        assert!(l.blocked("192.0.2.9".parse().unwrap(), "alice", t0 + 3 * MIN));
        // Sliding: the IP's first failure leaves the window at 15 min.
        assert!(l.blocked(a, "x", t0 + 15 * MIN - Duration::from_secs(1)));
        assert!(!l.blocked(a, "x", t0 + 15 * MIN));
        assert!(!l.blocked("192.0.2.9".parse().unwrap(), "alice", t0 + 16 * MIN));
    }

    #[test]
    fn memory_is_bounded_and_oldest_goes_first() {
        let l = FailureLimiter::with_cap(1, 15 * MIN, 3);
        let t0 = Instant::now();
        for i in 1..=4u8 {
            let ip = IpAddr::from([10, 0, 0, i]);
            l.record_failure(ip, &format!("u{i}"), t0 + u32::from(i) * Duration::from_secs(1));
        }
        let ips = lock(&l.ips);
        assert_eq!(ips.map.len(), 3);
        assert!(!ips.map.contains_key(&IpAddr::from([10, 0, 0, 1])));
        drop(ips);
        assert!(l.blocked(IpAddr::from([10, 0, 0, 4]), "x", t0 + MIN));
        assert!(!l.blocked(IpAddr::from([10, 0, 0, 1]), "x", t0 + MIN));
        // Each key keeps at most max_failures timestamps.
        for _ in 0..100 {
            l.record_failure(IpAddr::from([10, 0, 0, 4]), "u4", t0 + MIN);
        }
        assert_eq!(lock(&l.ips).map[&IpAddr::from([10, 0, 0, 4])].len(), 1);
    }
}
