//! Planned hand-over of a shard's leadership without duplicate deliveries.
//!
//! The shard leader (the node's queue shard actor) claims a message here for
//! as long as its delivery (or an administrator's bounce) is under way and
//! its outcome is not committed through Raft. A planned hand-over (move
//! leader, drain, balancer, replica move, member remove, SIGTERM) first
//! pauses dispatch, then waits until nothing is claimed, and only then lets
//! another replica be elected: the new leader finds every outcome the old
//! one produced and sends nothing twice. The wait is bounded by
//! `[cluster] handover_timeout_secs`; past it the hand-over goes on anyway
//! (counted in `tern_shard_handover_timeouts`), and what was still in flight
//! may be delivered twice (at-least-once, as after a crash).

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::sync::watch;
use tokio::time::Instant;

/// One per shard replica on this node.
#[derive(Debug)]
pub struct HandOver {
    /// Messages whose outcome is being produced or written right now.
    claimed: Mutex<HashSet<String>>,
    /// Bumped at every release, so waiters look again.
    released: watch::Sender<u64>,
    /// Dispatch of new deliveries is paused until then (a hand-over).
    paused_until: Mutex<Option<Instant>>,
    /// Longest wait for in-flight outcomes before a hand-over goes on.
    timeout: Duration,
    /// Hand-overs that went on with deliveries still in flight.
    timeouts: Counter,
    /// Hand-overs prepared (quiet or not).
    prepared: Counter,
}

impl Default for HandOver {
    fn default() -> Self {
        HandOver::new(Duration::from_secs(10), Counter::default(), Counter::default())
    }
}

impl HandOver {
    pub fn new(timeout: Duration, prepared: Counter, timeouts: Counter) -> HandOver {
        HandOver {
            claimed: Mutex::new(HashSet::new()),
            released: watch::Sender::new(0),
            paused_until: Mutex::new(None),
            timeout,
            timeouts,
            prepared,
        }
    }

    /// Claims `id` unless it is claimed already.
    pub fn claim(&self, id: &str) -> bool {
        self.lock().insert(id.to_owned())
    }

    pub fn release(&self, id: &str) {
        let removed = self.lock().remove(id);
        if removed {
            self.released.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    pub fn is_claimed(&self, id: &str) -> bool {
        self.lock().contains(id)
    }

    /// Messages claimed now.
    pub fn in_flight(&self) -> usize {
        self.lock().len()
    }

    /// Forgets every claim (leadership lost: nothing here can commit any more).
    pub fn clear(&self) {
        self.lock().clear();
        self.released.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Claims `id`, waiting (until `deadline`) while a delivery holds it.
    pub async fn claim_by(&self, id: &str, deadline: Instant) -> bool {
        let mut rx = self.released.subscribe();
        // Bounded by the deadline; each turn follows a release.
        loop {
            rx.borrow_and_update();
            if self.claim(id) {
                return true;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                _ => return false,
            }
        }
    }

    /// Whether dispatch is paused for a hand-over.
    pub fn paused(&self) -> bool {
        self.paused_lock().is_some_and(|until| Instant::now() < until)
    }

    /// Dispatch goes on (a new leadership term starts).
    pub fn resume(&self) {
        *self.paused_lock() = None;
    }

    /// Pauses dispatch, waits up to the hand-over timeout until every
    /// claimed outcome is committed, and keeps dispatch paused for `for_`
    /// after that (the election), or until [`HandOver::resume`]. False when
    /// it gave up waiting (counted and logged).
    pub async fn quiesce(&self, shard: u64, for_: Duration) -> bool {
        self.prepared.inc();
        *self.paused_lock() = Some(Instant::now() + self.timeout + for_);
        let quiet = self.wait_quiet(shard).await;
        // A hand-over that does not happen pauses this leader no longer than that.
        *self.paused_lock() = Some(Instant::now() + for_);
        quiet
    }

    async fn wait_quiet(&self, shard: u64) -> bool {
        let started = Instant::now();
        let deadline = started + self.timeout;
        let mut rx = self.released.subscribe();
        // Bounded by the deadline; each turn follows a release.
        loop {
            rx.borrow_and_update();
            let left = self.in_flight();
            if left == 0 {
                tracing::info!(
                    shard,
                    waited_ms = started.elapsed().as_millis() as u64,
                    "hand-over: in-flight outcomes committed"
                );
                return true;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                _ => {
                    self.timeouts.inc();
                    tracing::warn!(
                        shard,
                        in_flight = left,
                        timeout_secs = self.timeout.as_secs(),
                        "hand-over: in-flight deliveries not finished in time; handing over anyway (they may be delivered twice)"
                    );
                    return false;
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.claimed.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn paused_lock(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.paused_until.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn quiesce_waits_for_claims_then_gives_up_at_the_timeout() {
        let timeouts = Counter::default();
        let h = Arc::new(HandOver::new(
            Duration::from_secs(2),
            Counter::default(),
            timeouts.clone(),
        ));
        assert!(h.quiesce(1, Duration::from_secs(1)).await, "nothing in flight");
        assert!(h.paused());
        h.resume();
        assert!(!h.paused());

        assert!(h.claim("a"));
        assert!(!h.claim("a"));
        let releaser = Arc::clone(&h);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            releaser.release("a");
        });
        let started = Instant::now();
        assert!(h.quiesce(1, Duration::from_secs(1)).await);
        assert!(started.elapsed() >= Duration::from_millis(500));
        assert_eq!(timeouts.get(), 0);

        assert!(h.claim("b"));
        assert!(!h.quiesce(1, Duration::from_secs(1)).await, "b never finishes");
        assert_eq!(timeouts.get(), 1);
        // Paused past the wait, so no new delivery starts before the election.
        assert!(h.paused());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(!h.paused());
    }

    #[tokio::test(start_paused = true)]
    async fn a_claim_waits_for_the_delivery_holding_it() {
        let h = Arc::new(HandOver::default());
        assert!(h.claim("m"));
        let releaser = Arc::clone(&h);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            releaser.release("m");
        });
        assert!(h.claim_by("m", Instant::now() + Duration::from_secs(5)).await);
        assert!(h.is_claimed("m"));
        assert!(!h.claim_by("m", Instant::now() + Duration::from_secs(1)).await);
    }
}
