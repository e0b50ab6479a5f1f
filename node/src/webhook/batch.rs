//! The sans-IO core of one webhook: its bounded queue of event lines, the
//! batch being posted (kept and retried as it is until the endpoint takes
//! it), when the next POST is due, and the retry delays.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

/// First retry delay after a failed POST; it doubles with each failure.
pub const BACKOFF_FIRST: Duration = Duration::from_secs(1);
/// Longest retry delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// One POST's body: a JSON array of event lines.
#[derive(Clone, Debug)]
pub struct Batch {
    /// Number of events in `body`.
    pub events: usize,
    pub body: Bytes,
}

/// Queue and batch state of one webhook.
#[derive(Debug)]
pub struct Batcher {
    batch_size: usize,
    max_queue: usize,
    flush_interval: Duration,
    /// Event lines not yet in a batch, oldest first, with their arrival time.
    pending: VecDeque<(Instant, Arc<str>)>,
    /// The batch being posted or waiting for its retry.
    batch: Option<Batch>,
    /// Failed POSTs of `batch` in a row.
    failures: u32,
    /// When `batch` may be posted again after a failure.
    retry_at: Option<Instant>,
}

impl Batcher {
    /// `max_queue` must be at least `batch_size` (the configuration checks it).
    pub fn new(batch_size: usize, max_queue: usize, flush_interval: Duration) -> Batcher {
        let batch_size = batch_size.max(1);
        Batcher {
            batch_size,
            max_queue: max_queue.max(batch_size),
            flush_interval,
            pending: VecDeque::new(),
            batch: None,
            failures: 0,
            retry_at: None,
        }
    }

    /// Queues an event line; returns how many of the oldest waiting lines
    /// were dropped to stay within `max_queue` (the batch being retried
    /// is kept whole).
    pub fn push(&mut self, line: Arc<str>, now: Instant) -> usize {
        self.pending.push_back((now, line));
        let mut dropped = 0;
        while self.len() > self.max_queue && self.pending.pop_front().is_some() {
            dropped += 1;
        }
        dropped
    }

    /// Events held: waiting, plus those in the current batch.
    pub fn len(&self) -> usize {
        self.pending.len() + self.batch.as_ref().map_or(0, |b| b.events)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// When the next POST should start (assuming none is in flight): the
    /// retry time of a failed batch; now for a full batch; else when the
    /// oldest waiting event has waited `flush_interval`. `None`: nothing to post.
    pub fn next_due(&self) -> Option<Instant> {
        if self.batch.is_some() {
            return self.retry_at;
        }
        let (first, _) = self.pending.front()?;
        if self.pending.len() >= self.batch_size {
            return Some(*first);
        }
        Some(*first + self.flush_interval)
    }

    /// The batch to post: the current one again, else the next up to
    /// `batch_size` waiting events as a JSON array.
    pub fn batch(&mut self) -> Option<Batch> {
        if let Some(b) = &self.batch {
            return Some(b.clone());
        }
        if self.pending.is_empty() {
            return None;
        }
        let n = self.pending.len().min(self.batch_size);
        let lines: Vec<Arc<str>> = self.pending.drain(..n).map(|(_, line)| line).collect();
        let mut body = Vec::with_capacity(lines.iter().map(|l| l.len() + 1).sum::<usize>() + 1);
        body.push(b'[');
        for (i, line) in lines.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(line.as_bytes());
        }
        body.push(b']');
        let batch = Batch {
            events: n,
            body: Bytes::from(body),
        };
        self.batch = Some(batch.clone());
        Some(batch)
    }

    /// The endpoint took the current batch: returns its number of events.
    pub fn delivered(&mut self) -> usize {
        self.failures = 0;
        self.retry_at = None;
        self.batch.take().map_or(0, |b| b.events)
    }

    /// The current batch failed: it is retried after the returned delay.
    /// `jitter` in [0, 1) (a random number) spreads retries of many nodes.
    pub fn failed(&mut self, now: Instant, jitter: f64) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let delay = backoff(self.failures, jitter);
        self.retry_at = Some(now + delay);
        delay
    }
}

/// Delay before retry number `failures` (from 1): 1 s doubling up to 5 min,
/// scaled down by up to a quarter by `jitter` in [0, 1).
pub fn backoff(failures: u32, jitter: f64) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    let nominal = BACKOFF_FIRST.saturating_mul(1 << doublings).min(BACKOFF_MAX);
    nominal.mul_f64(1.0 - 0.25 * jitter.clamp(0.0, 1.0))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn line(i: usize) -> Arc<str> {
        Arc::from(format!("{{\"n\":{i}}}"))
    }

    fn numbers(batch: &Batch) -> Vec<u64> {
        let v: serde_json::Value = serde_json::from_slice(&batch.body).unwrap();
        v.as_array().unwrap().iter().map(|e| e["n"].as_u64().unwrap()).collect()
    }

    #[test]
    fn a_full_batch_is_due_at_once_a_partial_one_after_the_interval() {
        let t0 = Instant::now();
        let mut b = Batcher::new(3, 100, Duration::from_secs(1));
        assert_eq!(b.next_due(), None);
        b.push(line(0), t0);
        b.push(line(1), t0 + Duration::from_millis(300));
        assert_eq!(b.next_due(), Some(t0 + Duration::from_secs(1)));
        b.push(line(2), t0 + Duration::from_millis(500));
        b.push(line(3), t0 + Duration::from_millis(600));
        assert_eq!(b.next_due(), Some(t0));
        let first = b.batch().unwrap();
        assert_eq!((first.events, numbers(&first)), (3, vec![0, 1, 2]));
        // In flight: nothing else is due, and asking again gives the same batch.
        assert_eq!(b.len(), 4);
        assert_eq!(b.batch().unwrap().body, first.body);
        assert_eq!(b.delivered(), 3);
        assert_eq!(b.next_due(), Some(t0 + Duration::from_millis(1600)));
        assert_eq!(numbers(&b.batch().unwrap()), vec![3]);
        assert_eq!(b.delivered(), 1);
        assert!(b.is_empty() && b.batch().is_none());
    }

    #[test]
    fn a_failed_batch_is_retried_whole_while_new_events_wait() {
        let t0 = Instant::now();
        let mut b = Batcher::new(2, 10, Duration::from_secs(1));
        for i in 0..3 {
            b.push(line(i), t0);
        }
        let first = b.batch().unwrap();
        assert_eq!(b.failed(t0, 0.0), Duration::from_secs(1));
        assert_eq!(b.next_due(), Some(t0 + Duration::from_secs(1)));
        b.push(line(3), t0);
        b.push(line(4), t0);
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(b.failed(t1, 0.0), Duration::from_secs(2));
        assert_eq!(b.next_due(), Some(t1 + Duration::from_secs(2)));
        let again = b.batch().unwrap();
        assert_eq!(again.body, first.body);
        assert_eq!(b.delivered(), 2);
        // The backlog goes out next, at once, in order.
        assert_eq!(b.next_due(), Some(t0));
        assert_eq!(numbers(&b.batch().unwrap()), vec![2, 3]);
        // Success resets the backoff.
        assert_eq!(b.failed(t1, 0.0), Duration::from_secs(1));
    }

    #[test]
    fn over_max_queue_the_oldest_waiting_events_are_dropped() {
        let t0 = Instant::now();
        let mut b = Batcher::new(2, 4, Duration::from_secs(1));
        for i in 0..4 {
            assert_eq!(b.push(line(i), t0), 0);
        }
        let stuck = b.batch().unwrap();
        b.failed(t0, 0.5);
        assert_eq!(b.push(line(4), t0), 1);
        assert_eq!(b.push(line(5), t0), 1);
        assert_eq!(b.len(), 4);
        // The batch being retried is kept; 2 and 3 made room for 4 and 5.
        assert_eq!(b.batch().unwrap().body, stuck.body);
        b.delivered();
        assert_eq!(numbers(&b.batch().unwrap()), vec![4, 5]);
    }

    #[test]
    fn backoff_doubles_to_five_minutes_with_jitter_below_nominal() {
        let secs: Vec<u64> = (1..=12).map(|n| backoff(n, 0.0).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert_eq!(backoff(u32::MAX, 0.0), BACKOFF_MAX);
        assert_eq!(backoff(3, 0.999_999).as_millis(), 3000);
        for n in 1..20 {
            let d = backoff(n, rand::random());
            assert!(d <= BACKOFF_MAX && d >= backoff(n, 0.0).mul_f64(0.75), "{d:?}");
        }
    }
}
