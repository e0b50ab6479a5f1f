//! Rate limiting by GCRA (the generic cell rate algorithm: a token bucket
//! kept as one "theoretical arrival time"), with reservations of future
//! slots: a message that cannot go now is given the next free slot and the
//! slot is taken for it, so held messages come back spread out, one per
//! interval, instead of all at the same second.
//!
//! Times are unix seconds as `f64`; the caller passes the clock, so the
//! limiter is tested with a fake one.

use tern_config::shaping::Rate;

/// One node's part of a cluster-wide rate: `rate × fraction`, with a burst
/// of one second's worth of that part, at least one message.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pace {
    /// Seconds between two messages.
    pub interval: f64,
    /// Messages that may go back to back.
    pub burst: f64,
}

impl Pace {
    /// This node's pace for a cluster-wide `rate` when it holds `fraction`
    /// of the cluster's delivery (0 < fraction ≤ 1; a smaller value counts
    /// as `min_fraction`, the share of one shard).
    pub fn share_of(rate: Rate, fraction: f64, min_fraction: f64) -> Pace {
        let fraction = fraction.clamp(min_fraction.max(1e-6), 1.0);
        let per_second = rate.per_second() * fraction;
        Pace {
            interval: 1.0 / per_second,
            burst: per_second.floor().max(1.0),
        }
    }
}

/// A GCRA bucket.
#[derive(Clone, Debug, Default)]
pub struct Gcra {
    /// The theoretical arrival time of the next message at the steady rate.
    tat: f64,
}

impl Gcra {
    /// The earliest time at or after `now` a message conforms to `pace`.
    pub fn earliest(&self, now: f64, pace: Pace) -> f64 {
        let at = self.tat - (pace.burst - 1.0) * pace.interval;
        // Within a microsecond is now (sums of intervals round).
        if at <= now + 1e-6 {
            now
        } else {
            at
        }
    }

    /// Takes the slot at `at` (from [`Gcra::earliest`], or later).
    pub fn take(&mut self, at: f64, pace: Pace) {
        self.tat = self.tat.max(at) + pace.interval;
    }

    /// Takes the earliest slot and returns it.
    pub fn reserve(&mut self, now: f64, pace: Pace) -> f64 {
        let at = self.earliest(now, pace);
        self.take(at, pace);
        at
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn rate(count: u64, per_secs: u64) -> Rate {
        Rate { count, per_secs }
    }

    /// Sends greedily at every instant of a fake clock stepping by `step`
    /// and counts what goes by each second.
    fn sent_by(pace: Pace, until: f64, step: f64) -> Vec<(f64, usize)> {
        let mut g = Gcra::default();
        let mut sent = Vec::new();
        let mut now = 1000.0;
        let mut n = 0;
        while now < 1000.0 + until {
            while g.earliest(now, pace) <= now {
                g.take(now, pace);
                n += 1;
            }
            sent.push((now - 1000.0, n));
            now += step;
        }
        sent
    }

    #[test]
    fn a_node_sends_its_share_with_a_burst_of_one_second() {
        // 60/min over three nodes leading 6, 5 and 5 of 16 shards.
        let mut total_by_end = 0;
        for led in [6.0, 5.0, 5.0] {
            let pace = Pace::share_of(rate(60, 60), led / 16.0, 1.0 / 16.0);
            assert_eq!(pace.burst, 1.0);
            let sent = sent_by(pace, 60.0, 0.01);
            for &(t, n) in &sent {
                assert!(n as f64 <= 1.0 + t * led / 16.0 + 1e-9, "{led}: {n} by {t}");
            }
            total_by_end += sent.last().unwrap().1;
        }
        // The whole cluster: 60/min plus one message per node.
        assert!((58..=63).contains(&total_by_end), "{total_by_end}");

        // A fast rate bursts one second's worth.
        let pace = Pace::share_of(rate(600, 60), 1.0, 1.0);
        assert_eq!(pace.burst, 10.0);
        let sent = sent_by(pace, 10.0, 0.001);
        assert_eq!(sent[0].1, 10);
        assert!(sent.last().unwrap().1 <= 10 + 100);
    }

    #[test]
    fn reservations_spread_held_messages_one_interval_apart() {
        let pace = Pace::share_of(rate(30, 60), 1.0, 1.0);
        let mut g = Gcra::default();
        let now = 5000.0;
        let slots: Vec<f64> = (0..5).map(|_| g.reserve(now, pace)).collect();
        assert_eq!(slots, [5000.0, 5002.0, 5004.0, 5006.0, 5008.0]);
        // A message that comes later than the reserved slots gets the next one.
        assert_eq!(g.reserve(5003.0, pace), 5010.0);
        // After a quiet spell the bucket is full again (burst 1).
        assert_eq!(g.reserve(6000.0, pace), 6000.0);
    }

    #[test]
    fn a_node_with_no_share_yet_counts_as_one_shard() {
        let pace = Pace::share_of(rate(16, 1), 0.0, 1.0 / 16.0);
        assert!((pace.interval - 1.0).abs() < 1e-9);
        let pace = Pace::share_of(rate(16, 1), 0.5, 1.0 / 16.0);
        assert!((pace.interval - 0.125).abs() < 1e-9);
        assert_eq!(pace.burst, 8.0);
    }
}
