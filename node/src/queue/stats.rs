//! Delivery analytics kept on each node: per-minute buckets (24 h) of
//! outcomes by destination domain and relay, the top deferral and bounce
//! reasons, and time in queue of final deliveries. `ternctl stats` asks one
//! node, which merges every member's buckets.

use std::collections::VecDeque;
use std::sync::Mutex;

const MINUTES_KEPT: usize = 24 * 60;
/// Time-in-queue samples kept per minute (enough for percentiles).
const SAMPLES_PER_MINUTE: usize = 2000;
/// Distinct keys per minute before they are folded into "other".
const KEYS_PER_MINUTE: usize = 500;

pub use tern_model::stats::{Counts, Reason, Window};

struct Minute {
    at: i64,
    window: Window,
    keys: usize,
}

/// The outcome of one recipient, for [`Stats::record`].
pub enum Outcome {
    Delivered,
    Deferred,
    Bounced,
}

#[derive(Default)]
pub struct Stats {
    minutes: Mutex<VecDeque<Minute>>,
}

/// "451 4.4.1 connect to ..." -> "451 4.4.1": reasons group by their codes.
fn reason_key(reply: &str) -> String {
    let mut parts = reply.split_whitespace();
    let code = parts.next().unwrap_or("");
    match parts.next() {
        Some(e) if e.split('.').count() == 3 && e.chars().all(|c| c.is_ascii_digit() || c == '.') => {
            format!("{code} {e}")
        }
        _ => code.to_owned(),
    }
}

impl Stats {
    /// One recipient's outcome; `class` is the bounce class of a deferral
    /// or bounce (`""` when delivered).
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &self,
        now: i64,
        domain: &str,
        relay: &str,
        outcome: Outcome,
        reply: &str,
        class: &str,
        time_in_queue: i64,
    ) {
        let minute = now - now.rem_euclid(60);
        let mut minutes = self.minutes.lock().unwrap_or_else(|p| p.into_inner());
        if minutes.back().is_none_or(|m| m.at != minute) {
            minutes.push_back(Minute {
                at: minute,
                window: Window::default(),
                keys: 0,
            });
            while minutes.len() > MINUTES_KEPT {
                minutes.pop_front();
            }
        }
        let Some(m) = minutes.back_mut() else { return };
        let (domain, relay) = if m.keys >= KEYS_PER_MINUTE {
            ("other", "other")
        } else {
            (domain, relay)
        };
        if !m.window.by_domain.contains_key(domain) {
            m.keys += 1;
        }
        let counts = |c: &mut Counts| match outcome {
            Outcome::Delivered => c.delivered += 1,
            Outcome::Deferred => c.deferred += 1,
            Outcome::Bounced => c.bounced += 1,
        };
        counts(m.window.by_domain.entry(domain.to_owned()).or_default());
        if !relay.is_empty() {
            counts(m.window.by_relay.entry(relay.to_owned()).or_default());
        }
        let kind = match outcome {
            Outcome::Deferred => Some("deferred"),
            Outcome::Bounced => Some("bounced"),
            Outcome::Delivered => None,
        };
        if kind.is_some() && !class.is_empty() {
            // Classes are a fixed set: no folding needed.
            counts(m.window.by_class.entry(class.to_owned()).or_default());
        }
        if let Some(kind) = kind {
            if m.window.reasons.len() < KEYS_PER_MINUTE {
                let r = m
                    .window
                    .reasons
                    .entry((kind.to_owned(), reason_key(reply)))
                    .or_default();
                r.count += 1;
                reply.clone_into(&mut r.last_reply);
            }
        }
        if !matches!(outcome, Outcome::Deferred) && m.window.time_in_queue.len() < SAMPLES_PER_MINUTE {
            m.window
                .time_in_queue
                .push(time_in_queue.clamp(0, u32::MAX as i64) as u32);
        }
    }

    /// Everything recorded in the last `since_secs` seconds.
    pub fn window(&self, now: i64, since_secs: i64) -> Window {
        let from = now - since_secs;
        let minutes = self.minutes.lock().unwrap_or_else(|p| p.into_inner());
        let mut w = Window::default();
        for m in minutes.iter().filter(|m| m.at + 60 > from) {
            w.merge(m.window.clone());
        }
        w
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn counts_reasons_and_percentiles_over_a_window() {
        let s = Stats::default();
        let t = 1_000_000;
        s.record(t - 7200, "old.test", "mx", Outcome::Delivered, "250 ok", "", 1);
        for i in 0..10 {
            s.record(t, "a.test", "mx.a.test", Outcome::Delivered, "250 2.0.0 ok", "", i);
        }
        s.record(
            t,
            "a.test",
            "mx.a.test",
            Outcome::Deferred,
            "451 4.4.1 connect failed: x",
            "routing",
            0,
        );
        s.record(
            t,
            "b.test",
            "mx.b.test",
            Outcome::Deferred,
            "451 4.4.1 connect failed: y",
            "routing",
            0,
        );
        s.record(
            t,
            "b.test",
            "mx.b.test",
            Outcome::Bounced,
            "550 5.1.1 no such user",
            "invalid_recipient",
            30,
        );
        let mut w = s.window(t, 3600);
        assert_eq!(
            w.total(),
            Counts {
                delivered: 10,
                deferred: 2,
                bounced: 1
            }
        );
        assert_eq!(w.by_domain["b.test"].bounced, 1);
        assert_eq!(w.by_class["routing"].deferred, 2);
        assert_eq!(w.by_class["invalid_recipient"].bounced, 1);
        let r = &w.reasons[&("deferred".to_owned(), "451 4.4.1".to_owned())];
        assert_eq!((r.count, r.last_reply.as_str()), (2, "451 4.4.1 connect failed: y"));
        assert_eq!(w.percentile(0.0), Some(0));
        assert_eq!(w.percentile(100.0), Some(30));
        let mut other = s.window(t, 3600);
        other.merge(s.window(t, 3600));
        assert_eq!(other.total().delivered, 20);
        assert_eq!(s.window(t, 3 * 3600).total().delivered, 11);
    }
}
