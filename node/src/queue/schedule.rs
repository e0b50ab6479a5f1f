//! When each pending message is due, and when a deferred one comes back.
//!
//! The schedule is ordered by due time, so a scheduler tick costs
//! O(log n) per message that is due and nothing for those that are not: a
//! million deferred messages do not slow down the tick.
//!
//! Its memory is the node's memory per queued message: a deferred queue of
//! ten million is ten million entries. Entries are grouped by due second,
//! and an id made by [`super::IdGen`] is held as its 10 bytes, so an entry
//! costs about 10-20 bytes (with a few thousand messages deferred each
//! second, each second's group is one allocation). There is no second map
//! from id to due time: an entry is never looked up by id. Moving a message
//! adds an entry at its new time and leaves the old one, and a removal
//! leaves its entry: the dispatcher, which reads the message's record before
//! delivering anyway, drops an entry whose record is gone, held, or due
//! later than the entry says (that later time has its own entry). Stale
//! entries go when they come due.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::time::Duration;

/// Pending messages of one shard by due time (unix seconds).
#[derive(Default)]
pub struct Schedule {
    by_due: BTreeMap<i64, Second>,
    /// Entries, stale ones included.
    len: usize,
}

/// The entries due in one second, first in first out.
#[derive(Default)]
struct Second {
    /// Ids as [`super::IdGen`] makes them (20 upper-case hex digits), as
    /// their 80 bits: every id this node or its peers make.
    packed: VecDeque<[u8; 10]>,
    /// Any other id (an older format, an imported message): few.
    other: VecDeque<Box<str>>,
}

/// Hex digits in an id [`super::IdGen`] makes.
const ID_DIGITS: usize = 20;

/// The 80 bits of an id made by [`super::IdGen`], if it is one.
fn pack_id(id: &str) -> Option<[u8; 10]> {
    if id.len() != ID_DIGITS || !id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'A'..=b'F')) {
        return None;
    }
    let bits = u128::from_str_radix(id, 16).ok()?.to_be_bytes();
    let mut out = [0u8; 10];
    out.copy_from_slice(&bits[6..]);
    Some(out)
}

fn unpack_id(packed: [u8; 10]) -> String {
    let mut bits = [0u8; 16];
    bits[6..].copy_from_slice(&packed);
    format!("{:020X}", u128::from_be_bytes(bits))
}

impl Second {
    fn pop(&mut self) -> Option<String> {
        self.packed
            .pop_front()
            .map(unpack_id)
            .or_else(|| self.other.pop_front().map(String::from))
    }

    fn is_empty(&self) -> bool {
        self.packed.is_empty() && self.other.is_empty()
    }
}

impl Schedule {
    /// Adds a message at `due`; an earlier entry of the same message stays
    /// (see the module doc).
    pub fn insert(&mut self, id: &str, due: i64) {
        let second = self.by_due.entry(due).or_default();
        match pack_id(id) {
            Some(packed) => second.packed.push_back(packed),
            None => second.other.push_back(id.into()),
        }
        self.len += 1;
    }

    /// Whether an entry is due at or before `now`.
    pub fn has_due(&self, now: i64) -> bool {
        self.by_due.first_key_value().is_some_and(|(due, _)| *due <= now)
    }

    /// Takes up to `max` distinct messages due at or before `now`, earliest
    /// first. The caller checks each against its record (the module doc).
    pub fn pop_due(&mut self, now: i64, max: usize) -> Vec<String> {
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        while out.len() < max {
            let Some(mut first) = self.by_due.first_entry() else {
                break;
            };
            if *first.key() > now {
                break;
            }
            let second = first.get_mut();
            while out.len() < max {
                let Some(id) = second.pop() else { break };
                self.len -= 1;
                // Two entries of one message both due: one delivery.
                if seen.insert(id.clone()) {
                    out.push(id);
                }
            }
            if second.is_empty() {
                first.remove();
            }
        }
        out
    }

    /// Entries, stale ones included.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn clear(&mut self) {
        self.by_due.clear();
        self.len = 0;
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
        s.insert("late", 40); // moved earlier: its entry at 100 stays, stale
        assert_eq!(s.pop_due(50, 10), vec!["late"]);
        assert_eq!(
            s.pop_due(100, 10),
            vec!["late"],
            "the stale entry, for the dispatcher to drop"
        );
        assert!(s.is_empty());
    }

    #[test]
    fn pop_is_bounded() {
        let mut s = Schedule::default();
        for i in 0..10 {
            s.insert(&format!("m{i}"), i);
        }
        assert_eq!(s.pop_due(100, 3), vec!["m0", "m1", "m2"]);
        assert_eq!(s.len(), 7);
    }

    #[test]
    fn ids_of_any_length_come_back_as_they_went_in() {
        let mut s = Schedule::default();
        let ids = [
            "",
            "x",
            "0123456789ABCDEF0123",  // IdGen's form: packed
            "0123456789abcdef0123",  // lower case: kept as it is
            "0123456789ABCDEF01234", // one digit more
            "ü-and-a-much-longer-id-than-fits-inline",
        ];
        for (due, id) in ids.iter().enumerate() {
            s.insert(id, due as i64);
        }
        assert_eq!(s.by_due.values().map(|d| d.packed.len()).sum::<usize>(), 1);
        assert_eq!(s.pop_due(10, 10), ids);
    }

    #[test]
    fn ids_made_by_idgen_are_packed_and_come_back_by_due_then_in_order() {
        let ids = super::super::IdGen::new(7);
        let made: Vec<String> = (0..100).map(|_| ids.next()).collect();
        let mut s = Schedule::default();
        // Inserted latest due first; within a second, in the order made.
        for chunk in made.chunks(10).rev() {
            for id in chunk {
                let i = made.iter().position(|m| m == id).unwrap_or_default();
                s.insert(id, 1_000 + i as i64 / 10);
            }
        }
        s.insert("odd-one", 1_005);
        assert_eq!(s.by_due.values().map(|d| d.packed.len()).sum::<usize>(), 100);
        // Within one second the packed ids come first.
        let mut want: Vec<String> = made[..60].to_vec();
        want.push("odd-one".into());
        want.extend(made[60..].iter().cloned());
        assert_eq!(s.pop_due(2_000, 1_000), want);
        assert!(s.is_empty());
    }

    #[test]
    fn a_bounded_pop_resumes_inside_a_second() {
        let mut s = Schedule::default();
        let made: Vec<String> = (0..5u32).map(|i| format!("{i:020X}")).collect();
        for id in &made {
            s.insert(id, 7);
        }
        assert_eq!(s.pop_due(7, 2), made[..2]);
        assert_eq!(s.len(), 3);
        assert_eq!(s.pop_due(7, 10), made[2..]);
        assert!(s.is_empty() && s.by_due.is_empty());
    }

    #[test]
    fn a_message_with_two_due_entries_is_handed_out_once() {
        let mut s = Schedule::default();
        let id = "0000000000000000000A";
        s.insert(id, 5);
        s.insert(id, 8);
        s.insert("short", 5);
        s.insert("short", 6);
        assert_eq!(s.pop_due(10, 10), vec![id, "short"]);
        assert!(s.is_empty());
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
