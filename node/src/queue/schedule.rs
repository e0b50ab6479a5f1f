//! When each pending message is due, and when a deferred one comes back.
//!
//! The schedule is ordered by due time, so a scheduler tick costs
//! O(log n) per message that is due and nothing for those that are not: a
//! million deferred messages do not slow down the tick.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

/// Pending messages of one shard by due time (unix seconds).
#[derive(Default)]
pub struct Schedule {
    by_due: BTreeSet<(i64, Key)>,
    due_of: HashMap<Key, i64>,
}

/// A message id as the schedule holds it: inline when it fits (every id
/// that [`super::IdGen`] makes does), so a million deferred messages are not
/// two million small long-lived heap blocks. Those fill the allocator's
/// pages for small sizes with holes, and every short-lived allocation of
/// that size then lands in cold memory: measurably slower accepts.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Key {
    Inline { len: u8, bytes: [u8; INLINE] },
    Heap(Box<str>),
}

const INLINE: usize = 22;

impl Key {
    fn new(id: &str) -> Key {
        let mut bytes = [0u8; INLINE];
        match bytes.get_mut(..id.len()) {
            Some(head) => {
                head.copy_from_slice(id.as_bytes());
                Key::Inline {
                    len: id.len() as u8,
                    bytes,
                }
            }
            None => Key::Heap(id.into()),
        }
    }

    fn as_str(&self) -> &str {
        match self {
            // Made from a whole &str, so always valid UTF-8.
            Key::Inline { len, bytes } => std::str::from_utf8(&bytes[..usize::from(*len)]).unwrap_or_default(),
            Key::Heap(s) => s,
        }
    }
}

impl Schedule {
    /// Adds or moves a message.
    pub fn insert(&mut self, id: &str, due: i64) {
        let key = Key::new(id);
        if let Some(old) = self.due_of.insert(key.clone(), due) {
            self.by_due.remove(&(old, key.clone()));
        }
        self.by_due.insert((due, key));
    }

    pub fn remove(&mut self, id: &str) {
        let key = Key::new(id);
        if let Some(old) = self.due_of.remove(&key) {
            self.by_due.remove(&(old, key));
        }
    }

    /// Whether a message is due at or before `now`.
    pub fn has_due(&self, now: i64) -> bool {
        self.by_due.first().is_some_and(|(due, _)| *due <= now)
    }

    /// Takes up to `max` messages due at or before `now`, earliest first.
    pub fn pop_due(&mut self, now: i64, max: usize) -> Vec<String> {
        let mut out = Vec::new();
        while out.len() < max {
            let Some((due, _)) = self.by_due.first() else { break };
            if *due > now {
                break;
            }
            if let Some((_, key)) = self.by_due.pop_first() {
                self.due_of.remove(&key);
                out.push(key.as_str().to_owned());
            }
        }
        out
    }

    pub fn len(&self) -> usize {
        self.due_of.len()
    }

    pub fn is_empty(&self) -> bool {
        self.due_of.is_empty()
    }

    pub fn clear(&mut self) {
        self.by_due.clear();
        self.due_of.clear();
    }
}

/// Unix seconds for scheduling; injected so that tests can run the
/// schedule on tokio's paused clock.
pub trait Clock: Send + Sync {
    fn now(&self) -> i64;
}

/// The wall clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> i64 {
        chrono::Utc::now().timestamp()
    }
}

/// `epoch` plus the time tokio has seen pass (paused time in tests).
#[cfg(test)]
pub struct TokioClock {
    pub epoch: i64,
    pub start: tokio::time::Instant,
}

#[cfg(test)]
impl Clock for TokioClock {
    fn now(&self) -> i64 {
        self.epoch + self.start.elapsed().as_secs() as i64
    }
}

/// `[delivery] retry_schedule` and `max_age`.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Delay after the 1st, 2nd, ... attempt; the last one repeats.
    pub schedule: Vec<Duration>,
    pub max_age: Duration,
}

impl RetryPolicy {
    /// Unix seconds of the next attempt after `attempts` attempts, with
    /// ±10% jitter (`jitter` in -1.0..=1.0) so that deferred mail does not
    /// come back in one wave.
    pub fn next_attempt(&self, attempts: u32, now: i64, jitter: f64) -> i64 {
        let i = (attempts.max(1) as usize - 1).min(self.schedule.len().saturating_sub(1));
        let base = self
            .schedule
            .get(i)
            .copied()
            .unwrap_or(Duration::from_secs(300))
            .as_secs_f64();
        let delay = (base * (1.0 + 0.1 * jitter.clamp(-1.0, 1.0))).round().max(1.0);
        now + delay as i64
    }

    /// A message older than `max_age` is not retried: deferrals become failures.
    pub fn expired(&self, received_at: i64, now: i64) -> bool {
        now.saturating_sub(received_at) >= self.max_age.as_secs() as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pops_only_what_is_due_in_order() {
        let mut s = Schedule::default();
        s.insert("late", 100);
        s.insert("early", 10);
        s.insert("now", 0);
        assert!(s.has_due(0) && !Schedule::default().has_due(50));
        assert_eq!(s.pop_due(50, 10), vec!["now", "early"]);
        assert!(!s.has_due(50), "only the late one is left");
        assert_eq!(s.len(), 1);
        s.insert("late", 40); // moved earlier
        assert_eq!(s.pop_due(50, 10), vec!["late"]);
        assert!(s.is_empty());
    }

    #[test]
    fn pop_is_bounded_and_remove_works() {
        let mut s = Schedule::default();
        for i in 0..10 {
            s.insert(&format!("m{i}"), i);
        }
        s.remove("m0");
        assert_eq!(s.pop_due(100, 3), vec!["m1", "m2", "m3"]);
        assert_eq!(s.len(), 6);
    }

    #[test]
    fn ids_of_any_length_come_back_as_they_went_in() {
        let mut s = Schedule::default();
        let ids = [
            "",
            "x",
            "0123456789ABCDEF012345",
            "0123456789ABCDEF0123456",
            "ü-and-a-much-longer-id-than-fits-inline",
        ];
        for (due, id) in ids.iter().enumerate() {
            s.insert(id, due as i64);
        }
        s.insert(ids[3], 0); // a heap-held id moves like an inline one
        s.remove(ids[4]);
        assert_eq!(s.len(), 4);
        assert_eq!(s.pop_due(10, 10), vec![ids[0], ids[3], ids[1], ids[2]]);
    }

    #[test]
    fn a_million_deferred_do_not_cost_a_tick() {
        let mut s = Schedule::default();
        for i in 0..1_000_000 {
            s.insert(&format!("d{i}"), 1_000_000 + i);
        }
        // A tick with nothing due looks at one entry only.
        assert!(s.pop_due(10, 1000).is_empty());
        assert_eq!(s.len(), 1_000_000);
    }

    #[test]
    fn retry_schedule_steps_then_repeats_with_bounded_jitter() {
        let p = RetryPolicy {
            schedule: vec![
                Duration::from_secs(300),
                Duration::from_secs(600),
                Duration::from_secs(1800),
            ],
            max_age: Duration::from_secs(5 * 86400),
        };
        assert_eq!(p.next_attempt(1, 0, 0.0), 300);
        assert_eq!(p.next_attempt(2, 0, 0.0), 600);
        assert_eq!(p.next_attempt(3, 0, 0.0), 1800);
        assert_eq!(p.next_attempt(9, 0, 0.0), 1800);
        assert_eq!(p.next_attempt(1, 1000, 1.0), 1330);
        assert_eq!(p.next_attempt(1, 1000, -1.0), 1270);
        assert!(!p.expired(0, 5 * 86400 - 1));
        assert!(p.expired(0, 5 * 86400));
    }
}
