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
    /// Deferred and bounced recipients by bounce class
    /// ([`crate::bounce::Class`] names). Last, so that a node without it
    /// reads a newer node's window (bincode ignores trailing bytes) and
    /// [`Window::decode`] reads an older node's.
    pub by_class: BTreeMap<String, Counts>,
}

/// A window as nodes before bounce classes sent it.
#[derive(Deserialize)]
struct WindowV1 {
    by_domain: BTreeMap<String, Counts>,
    by_relay: BTreeMap<String, Counts>,
    reasons: BTreeMap<(String, String), Reason>,
    time_in_queue: Vec<u32>,
}

impl Window {
    /// Reads a window another node sent (bincode), from this version or
    /// from one before `by_class` (then empty).
    pub fn decode(bytes: &[u8]) -> Result<Window, bincode::Error> {
        bincode::deserialize(bytes).or_else(|e| {
            let v1: WindowV1 = bincode::deserialize(bytes).map_err(|_| e)?;
            Ok(Window {
                by_domain: v1.by_domain,
                by_relay: v1.by_relay,
                reasons: v1.reasons,
                time_in_queue: v1.time_in_queue,
                by_class: BTreeMap::new(),
            })
        })
    }

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
        for (k, c) in other.by_class {
            self.by_class.entry(k).or_default().add(&c);
        }
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The window as nodes before bounce classes serialize it.
    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct Old {
        by_domain: BTreeMap<String, Counts>,
        by_relay: BTreeMap<String, Counts>,
        reasons: BTreeMap<(String, String), Reason>,
        time_in_queue: Vec<u32>,
    }

    #[test]
    fn windows_cross_versions_both_ways() {
        let mut new = Window::default();
        new.by_domain.insert(
            "a.test".into(),
            Counts {
                bounced: 2,
                ..Counts::default()
            },
        );
        new.by_class.insert(
            "invalid_recipient".into(),
            Counts {
                bounced: 2,
                ..Counts::default()
            },
        );
        new.time_in_queue.push(7);
        // An older node reads a newer node's window.
        let old: Old = bincode::deserialize(&bincode::serialize(&new).unwrap()).unwrap();
        assert_eq!(old.by_domain, new.by_domain);
        assert_eq!(old.time_in_queue, [7]);
        // A newer node reads an older node's window.
        let back = Window::decode(&bincode::serialize(&old).unwrap()).unwrap();
        assert_eq!(back.by_domain, new.by_domain);
        assert!(back.by_class.is_empty());
        assert_eq!(Window::decode(&bincode::serialize(&new).unwrap()).unwrap(), new);
        assert!(Window::decode(b"\x01").is_err());
    }
}
