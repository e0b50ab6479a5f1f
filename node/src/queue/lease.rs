//! The shard leader's lease: when a quorum last confirmed this node's
//! leadership of a shard. Dispatch and the end of every delivery check it
//! (see [`crate::delivery::fence`]); a fresh lease costs nothing, a stale
//! one costs one quorum round shared by every caller waiting at that time.

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::delivery::fence::Fence;

/// How long a confirmation counts. Well under the 1000 ms minimum election
/// timeout (raft/mod.rs): followers elect no new leader within the election
/// timeout after the heartbeat round that confirmed us, so while the lease
/// is fresh no other node leads the shard.
pub const LEASE: Duration = Duration::from_millis(500);
/// Longest wait for a confirmation at the end of a delivery.
const CONFIRM_TIMEOUT: Duration = Duration::from_millis(300);

type Confirm = Box<dyn Fn() -> Pin<Box<dyn Future<Output = bool> + Send>> + Send + Sync>;
/// The term in which this node leads the shard now, as Raft last said
/// (openraft's server state), or `None` when it does not lead.
type Leading = Box<dyn Fn() -> Option<u64> + Send + Sync>;

pub struct Lease {
    /// Start of the last successful confirmation (the quorum answered after
    /// it), with the term it confirmed.
    confirmed: Mutex<Option<(Instant, u64)>>,
    /// One confirmation at a time; the others wait for its result.
    gate: tokio::sync::Mutex<()>,
    confirm: Confirm,
    leading: Leading,
}

impl Lease {
    /// `confirm` asks a quorum (openraft's `ensure_linearizable`); `leading`
    /// reads Raft's current state, so that a lost leadership revokes the
    /// lease at once, not only once it has aged out.
    pub fn new(confirm: Confirm, leading: Leading) -> Lease {
        Lease {
            confirmed: Mutex::new(None),
            gate: tokio::sync::Mutex::new(()),
            confirm,
            leading,
        }
    }

    /// Confirmed within [`LEASE`] (a monotonic clock, so a pause of the
    /// whole process ages it too), in the term this node still leads.
    pub fn fresh(&self) -> bool {
        let confirmed = *self.confirmed.lock().unwrap_or_else(|p| p.into_inner());
        let Some((at, term)) = confirmed else { return false };
        if (self.leading)() != Some(term) {
            self.revoke();
            return false;
        }
        at.elapsed() < LEASE
    }

    /// Forgets the confirmation (leadership lost).
    pub fn revoke(&self) {
        *self.confirmed.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Fresh, or confirmed again now (at most one quorum round at a time).
    pub async fn holds(&self) -> bool {
        if self.fresh() {
            return true;
        }
        let _gate = self.gate.lock().await;
        if self.fresh() {
            return true;
        }
        let Some(term) = (self.leading)() else { return false };
        let started = Instant::now();
        let ok = tokio::time::timeout(CONFIRM_TIMEOUT, (self.confirm)())
            .await
            .unwrap_or(false);
        // Leadership lost (or a new term) during the round: not ours to use.
        if !ok || (self.leading)() != Some(term) {
            return false;
        }
        let mut confirmed = self.confirmed.lock().unwrap_or_else(|p| p.into_inner());
        if confirmed.is_none_or(|(t, _)| t < started) {
            *confirmed = Some((started, term));
        }
        // A pause during the round makes even a success too old to use.
        started.elapsed() < LEASE
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("fresh", &self.fresh()).finish()
    }
}

impl Fence for Lease {
    fn holds(&self) -> Pin<Box<dyn Future<Output = bool> + Send + '_>> {
        Box::pin(Lease::holds(self))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    /// A lease whose quorum answers `answer` after `delay`, counting rounds.
    fn lease(answer: bool, delay: Duration) -> (Arc<Lease>, Arc<AtomicUsize>) {
        let (l, rounds, _) = lease_in_term(answer, delay);
        (l, rounds)
    }

    /// The same, with the term this node leads in (0: not leading).
    fn lease_in_term(answer: bool, delay: Duration) -> (Arc<Lease>, Arc<AtomicUsize>, Arc<AtomicU64>) {
        let rounds = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&rounds);
        let term = Arc::new(AtomicU64::new(1));
        let leading = Arc::clone(&term);
        let lease = Lease::new(
            Box::new(move || {
                counter.fetch_add(1, Ordering::SeqCst);
                Box::pin(async move {
                    tokio::time::sleep(delay).await;
                    answer
                })
            }),
            Box::new(move || Some(leading.load(Ordering::SeqCst)).filter(|t| *t != 0)),
        );
        (Arc::new(lease), rounds, term)
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_leadership_revokes_the_lease_at_once() {
        let (l, rounds, term) = lease_in_term(true, Duration::from_millis(5));
        assert!(l.holds().await);
        assert!(l.fresh());
        // Raft says this node follows now: no delivery may start or end,
        // well inside the lease's time.
        term.store(0, Ordering::SeqCst);
        assert!(!l.fresh());
        assert!(!l.holds().await);
        assert_eq!(rounds.load(Ordering::SeqCst), 1, "no quorum round while not leading");
        // Leading again in a later term: the old confirmation does not count.
        term.store(2, Ordering::SeqCst);
        assert!(!l.fresh());
        assert!(l.holds().await);
        assert_eq!(rounds.load(Ordering::SeqCst), 2);
        term.store(3, Ordering::SeqCst);
        assert!(!l.fresh());
    }

    #[tokio::test(start_paused = true)]
    async fn a_fresh_lease_costs_no_quorum_round() {
        let (l, rounds) = lease(true, Duration::from_millis(5));
        assert!(!l.fresh());
        // Many deliveries ending together share one round.
        let checks: Vec<_> = (0..50)
            .map(|_| {
                let l = Arc::clone(&l);
                tokio::spawn(async move { l.holds().await })
            })
            .collect();
        for c in checks {
            assert!(c.await.unwrap());
        }
        assert_eq!(rounds.load(Ordering::SeqCst), 1);
        tokio::time::advance(Duration::from_millis(400)).await;
        assert!(l.holds().await);
        assert_eq!(rounds.load(Ordering::SeqCst), 1);
        // Stale after LEASE: confirmed again.
        tokio::time::advance(Duration::from_millis(200)).await;
        assert!(!l.fresh());
        assert!(l.holds().await);
        assert_eq!(rounds.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_paused_leader_is_fenced() {
        let (l, _) = lease(true, Duration::from_millis(5));
        assert!(l.holds().await);
        // Frozen for 10 s: its old confirmation is worthless.
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(!l.fresh());
        let (deposed, rounds) = lease(false, Duration::from_millis(5));
        assert!(!deposed.holds().await);
        assert_eq!(rounds.load(Ordering::SeqCst), 1);
        // A quorum that does not answer in time: fenced too.
        let (silent, _) = lease(true, Duration::from_secs(5));
        assert!(!silent.holds().await);
        assert!(!silent.fresh());
        l.revoke();
        assert!(!l.fresh());
    }
}
