//! Back-pressure of the API: the node's in-flight calls and request bytes
//! (semaphores, taken before a body is read) and each key's message rate
//! (a token bucket per key on this node). Over a limit: 429 with
//! Retry-After, never a queue of waiting bodies in memory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::http::StatusCode;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::problem::Problem;

/// Bytes are counted in KiB so that a `u32` permit count covers any body.
const UNIT: u64 = 1024;

/// The node's limits, shared by every call.
pub struct Limits {
    requests: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    byte_units: u64,
    rates: Mutex<HashMap<String, Bucket>>,
}

/// What a running call holds; released when dropped.
#[derive(Debug)]
pub struct InFlight {
    _request: OwnedSemaphorePermit,
    _bytes: Vec<OwnedSemaphorePermit>,
}

impl InFlight {
    /// Holds `bytes` (the composed messages of the call, whose size is
    /// known only after rendering) instead of the request body's.
    pub fn hold_instead(&mut self, limits: &Limits, bytes: u64) -> Result<(), Problem> {
        self._bytes.clear();
        self._bytes.push(limits.take_bytes(bytes)?);
        Ok(())
    }
}

impl Limits {
    pub fn new(max_requests: usize, max_bytes: u64) -> Limits {
        let byte_units = max_bytes.div_ceil(UNIT).min(Semaphore::MAX_PERMITS as u64);
        Limits {
            requests: Arc::new(Semaphore::new(max_requests)),
            bytes: Arc::new(Semaphore::new(byte_units as usize)),
            byte_units,
            rates: Mutex::default(),
        }
    }

    /// A call that will read up to `bytes` of body: 429 when the node is
    /// already busy with as many calls or bytes as it allows.
    pub fn admit(&self, bytes: u64) -> Result<InFlight, Problem> {
        let request = Arc::clone(&self.requests)
            .try_acquire_owned()
            .map_err(|_| busy("too many API calls in progress on this node"))?;
        let bytes = self.take_bytes(bytes)?;
        Ok(InFlight {
            _request: request,
            _bytes: vec![bytes],
        })
    }

    fn take_bytes(&self, bytes: u64) -> Result<OwnedSemaphorePermit, Problem> {
        let units = bytes.div_ceil(UNIT).max(1);
        if units > self.byte_units {
            return Err(Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload-too-large",
                "Payload too large",
                format!(
                    "the call needs {bytes} bytes, more than [api] max_in_flight_bytes ({})",
                    self.byte_units * UNIT
                ),
            ));
        }
        let units = u32::try_from(units).map_err(|_| busy("request too large for this node's budget"))?;
        Arc::clone(&self.bytes)
            .try_acquire_many_owned(units)
            .map_err(|_| busy("too many request bytes in progress on this node"))
    }

    /// Takes `messages` from the key's bucket (`rate` per second, 0: no
    /// limit). The bucket holds one second of rate; a call larger than
    /// that passes when the bucket is full and leaves it in debt, so later
    /// calls wait until the average is back under the rate.
    pub fn take_rate(&self, key_id: &str, rate: u32, messages: usize) -> Result<(), Problem> {
        self.take_rate_at(key_id, rate, messages, Instant::now())
    }

    fn take_rate_at(&self, key_id: &str, rate: u32, messages: usize, now: Instant) -> Result<(), Problem> {
        if rate == 0 {
            return Ok(());
        }
        let rate = f64::from(rate);
        let mut rates = self.rates.lock().unwrap_or_else(|p| p.into_inner());
        // Idle keys' buckets are full: forget them rather than grow forever.
        if rates.len() > 10_000 {
            rates.retain(|_, b| b.level(rate, now) < rate);
        }
        let bucket = rates
            .entry(key_id.to_owned())
            .or_insert(Bucket { tokens: rate, at: now });
        let tokens = bucket.level(rate, now);
        let needed = (messages as f64).min(rate);
        if tokens + 1e-9 < needed {
            let wait = ((needed - tokens) / rate).ceil().max(1.0) as u64;
            bucket.tokens = tokens;
            bucket.at = now;
            return Err(busy(&format!(
                "this API key may send {rate} messages per second; retry in {wait} s"
            ))
            .with_retry_after(wait));
        }
        bucket.tokens = tokens - messages as f64;
        bucket.at = now;
        Ok(())
    }
}

/// One key's tokens at an instant (refilled at `rate` per second up to `rate`).
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn level(&self, rate: f64, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        (self.tokens + elapsed * rate).min(rate)
    }
}

fn busy(detail: &str) -> Problem {
    Problem::new(
        StatusCode::TOO_MANY_REQUESTS,
        "too-many-requests",
        "Too many requests",
        detail,
    )
    .with_retry_after(1)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_key_gets_its_rate_and_waits_after_a_burst() {
        let limits = Limits::new(4, 1 << 20);
        let t0 = Instant::now();
        assert!(limits.take_rate_at("k", 2, 1, t0).is_ok());
        assert!(limits.take_rate_at("k", 2, 1, t0).is_ok());
        let refused = limits.take_rate_at("k", 2, 1, t0).unwrap_err();
        assert_eq!(refused.status, 429);
        assert_eq!(refused.retry_after, Some(1));
        assert!(limits.take_rate_at("k", 2, 1, t0 + Duration::from_millis(500)).is_ok());
        // Another key has its own bucket; rate 0 has none.
        assert!(limits.take_rate_at("other", 2, 2, t0).is_ok());
        assert!(limits.take_rate_at("free", 0, 1_000_000, t0).is_ok());
    }

    #[test]
    fn a_call_larger_than_the_rate_passes_on_a_full_bucket_and_leaves_debt() {
        let limits = Limits::new(4, 1 << 20);
        let t0 = Instant::now();
        assert!(limits.take_rate_at("k", 10, 100, t0).is_ok());
        // 90 messages of debt: 10 s before a full second of rate is back.
        let refused = limits
            .take_rate_at("k", 10, 1, t0 + Duration::from_secs(5))
            .unwrap_err();
        assert_eq!(refused.retry_after, Some(5));
        assert!(limits.take_rate_at("k", 10, 10, t0 + Duration::from_secs(10)).is_ok());
    }

    #[test]
    fn in_flight_calls_and_bytes_are_bounded() {
        let limits = Limits::new(2, 10 * 1024);
        let a = limits.admit(4 * 1024).unwrap();
        let _b = limits.admit(4 * 1024).unwrap();
        assert_eq!(limits.admit(1).unwrap_err().status, 429, "third call");
        drop(a);
        assert_eq!(limits.admit(7 * 1024).unwrap_err().status, 429, "bytes left: 6 KiB");
        let c = limits.admit(2 * 1024).unwrap();
        drop(c);
        assert_eq!(limits.admit(11 * 1024).unwrap_err().status, 413, "more than the budget");
    }
}
