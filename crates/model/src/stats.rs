//! Delivery analytics as they travel between nodes and to `ternctl stats`:
//! outcome counts and mergeable time windows.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Outcome counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub delivered: u64,
    pub deferred: u64,
    pub bounced: u64,
}

impl Counts {
    pub fn add(&mut self, o: &Counts) {
        self.delivered += o.delivered;
        self.deferred += o.deferred;
        self.bounced += o.bounced;
    }
}

/// One reason: how often, and the last full reply.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reason {
    pub count: u64,
    pub last_reply: String,
}

/// What one node saw in a time window: mergeable across nodes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    pub by_domain: BTreeMap<String, Counts>,
    pub by_relay: BTreeMap<String, Counts>,
    /// ("deferred" | "bounced", reply code + enhanced code) -> reason.
    pub reasons: BTreeMap<(String, String), Reason>,
    /// Seconds from reception to final delivery or bounce.
    pub time_in_queue: Vec<u32>,
}

impl Window {
    pub fn merge(&mut self, other: Window) {
        for (k, c) in other.by_domain {
            self.by_domain.entry(k).or_default().add(&c);
        }
        for (k, c) in other.by_relay {
            self.by_relay.entry(k).or_default().add(&c);
        }
        for (k, r) in other.reasons {
            let e = self.reasons.entry(k).or_default();
            e.count += r.count;
            e.last_reply = r.last_reply;
        }
        self.time_in_queue.extend(other.time_in_queue);
    }

    pub fn total(&self) -> Counts {
        let mut t = Counts::default();
        for c in self.by_domain.values() {
            t.add(c);
        }
        t
    }

    /// The p-th percentile (0..=100) of time in queue, in seconds.
    pub fn percentile(&mut self, p: f64) -> Option<u32> {
        if self.time_in_queue.is_empty() {
            return None;
        }
        self.time_in_queue.sort_unstable();
        let i = ((p / 100.0) * (self.time_in_queue.len() - 1) as f64).round() as usize;
        self.time_in_queue.get(i).copied()
    }
}
