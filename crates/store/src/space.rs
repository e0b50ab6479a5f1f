//! Free space on the file system of `data_dir`, and whether the node is
//! "disk full": free space below the low-water mark (`node.min_free_mb`),
//! or a write failed with `ENOSPC`/`EDQUOT`. It stays full until free space
//! is back above the mark plus a hysteresis margin, and, after a failed
//! write, for at least [`TRIP_HOLD`].
//!
//! The space below the mark is the reserve: what is already in the log is
//! applied into it, a vote fits in it, and a restart (a new log segment,
//! sled's files) starts in it. While full the log store holds new entries
//! back rather than failing them (a failed append stops a Raft group for
//! good); everything above this module (SMTP, forwarding, elections,
//! `/readyz`) reads [`DiskSpace::is_full`].

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a failed write keeps the node full even if `statvfs` shows room
/// (quotas, or space taken back by the file system a moment later).
pub const TRIP_HOLD: Duration = Duration::from_secs(5);

/// Whether an I/O error means the file system (or quota) is out of space.
pub fn is_out_of_space(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
        || e.kind() == std::io::ErrorKind::StorageFull
        || e.kind() == std::io::ErrorKind::QuotaExceeded
}

/// Bytes available to unprivileged writers on the file system of `path`.
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    fs2::available_space(path)
}

/// The disk-space state of one node's data directory.
pub struct DiskSpace {
    dir: PathBuf,
    /// Below this many free bytes the node is full (0: only failed writes trip it).
    min_free: AtomicU64,
    full: AtomicBool,
    free: AtomicU64,
    /// Why the node is full, for `/readyz` and the logs.
    reason: Mutex<String>,
    tripped_at: Mutex<Option<Instant>>,
    /// Tells waiters (held-back log appends) that the state changed.
    changed: tokio::sync::watch::Sender<bool>,
    /// The node is stopping: held-back writes stop waiting (and fail).
    stopping: AtomicBool,
}

impl DiskSpace {
    pub fn new(dir: &Path) -> DiskSpace {
        DiskSpace {
            dir: dir.to_owned(),
            min_free: AtomicU64::new(0),
            full: AtomicBool::new(false),
            free: AtomicU64::new(u64::MAX),
            reason: Mutex::new(String::new()),
            tripped_at: Mutex::new(None),
            changed: tokio::sync::watch::channel(false).0,
            stopping: AtomicBool::new(false),
        }
    }

    /// Sets the low-water mark (`node.min_free_mb`).
    pub fn set_min_free(&self, bytes: u64) {
        self.min_free.store(bytes, Ordering::Relaxed);
    }

    pub fn min_free(&self) -> u64 {
        self.min_free.load(Ordering::Relaxed)
    }

    /// Free space must be back above this to leave the full state.
    pub fn resume_free(&self) -> u64 {
        let min = self.min_free();
        min.saturating_add((min / 4).max(1 << 20))
    }

    pub fn is_full(&self) -> bool {
        self.full.load(Ordering::Acquire)
    }

    /// Free bytes at the last check.
    pub fn free(&self) -> u64 {
        self.free.load(Ordering::Relaxed)
    }

    /// Why the node is full (empty when it is not).
    pub fn reason(&self) -> String {
        self.reason.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Reads the free space and updates the state; returns whether full.
    pub fn check(&self) -> bool {
        let free = match (free_bytes(&self.dir), fs2::total_space(&self.dir)) {
            // A file system that reports no size at all (some FUSE file
            // systems answer statfs with zeros) cannot be measured: only
            // failed writes trip it.
            (Ok(f), Ok(0)) => {
                let full = self.observe(u64::MAX);
                self.free.store(f, Ordering::Relaxed);
                return full;
            }
            (Ok(f), _) => f,
            (Err(e), _) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot read free disk space");
                return self.is_full();
            }
        };
        self.observe(free)
    }

    /// The state transition for `free` bytes free (separate for tests).
    fn observe(&self, free: u64) -> bool {
        self.free.store(free, Ordering::Relaxed);
        let min = self.min_free();
        if self.is_full() {
            let held = self
                .tripped_at
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some_and(|t| t.elapsed() < TRIP_HOLD);
            if free >= self.resume_free() && !held {
                self.set(false, String::new());
                tracing::info!(
                    free_bytes = free,
                    min_free_bytes = min,
                    "disk space is back: accepting writes again"
                );
            }
        } else if free < min {
            let reason = format!("disk full: {free} bytes free, below node.min_free_mb ({min} bytes)");
            tracing::error!(
                free_bytes = free,
                min_free_bytes = min,
                "disk full: refusing new mail until space is freed"
            );
            self.set(true, reason);
        }
        self.is_full()
    }

    /// A write failed with `e`: if it is out of space, the node is full now.
    /// Returns whether it was.
    pub fn trip(&self, e: &std::io::Error) -> bool {
        if !is_out_of_space(e) {
            return false;
        }
        *self.tripped_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        if !self.is_full() {
            tracing::error!(error = %e, "disk full: a write failed; refusing new mail until space is freed");
            self.set(true, format!("disk full: a write failed: {e}"));
        }
        true
    }

    fn set(&self, full: bool, reason: String) {
        *self.reason.lock().unwrap_or_else(|p| p.into_inner()) = reason;
        self.full.store(full, Ordering::Release);
        self.changed.send_replace(full);
    }

    /// Resolves once the node is not full (at once if it is not), or is
    /// stopping ([`DiskSpace::stop_waiting`]).
    pub async fn wait_writable(&self) {
        let mut rx = self.changed.subscribe();
        // A dropped sender cannot happen while `self` lives.
        let _ = rx.wait_for(|_| !self.is_full() || self.is_stopping()).await;
    }

    /// The node is stopping: writes held back for space give up, so that
    /// their Raft groups can shut down (what they wrote was not
    /// acknowledged; the log is replayed at the next start).
    pub fn stop_waiting(&self) {
        self.stopping.store(true, Ordering::Release);
        self.changed.send_modify(|_| {});
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn full_below_the_mark_and_back_only_above_the_margin() {
        let s = DiskSpace::new(Path::new("/"));
        s.set_min_free(100 << 20);
        assert!(!s.observe(200 << 20));
        assert!(s.observe(99 << 20), "below the mark");
        assert!(s.reason().contains("disk full"));
        assert!(s.observe(110 << 20), "hysteresis: not yet");
        assert!(!s.observe(126 << 20), "above mark + 25%");
        assert!(s.reason().is_empty());
    }

    #[test]
    fn an_out_of_space_write_trips_and_holds() {
        let s = DiskSpace::new(Path::new("/"));
        assert!(!s.trip(&std::io::Error::from_raw_os_error(libc::EIO)));
        assert!(!s.is_full());
        assert!(s.trip(&std::io::Error::from_raw_os_error(libc::ENOSPC)));
        assert!(s.is_full());
        assert!(s.observe(u64::MAX / 2), "held for TRIP_HOLD after a failed write");
    }

    #[test]
    fn free_bytes_of_a_real_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert!(free_bytes(dir.path()).unwrap() > 0);
    }

    #[tokio::test]
    async fn waiters_wake_when_space_returns() {
        let s = std::sync::Arc::new(DiskSpace::new(Path::new("/")));
        s.set_min_free(10);
        s.observe(5);
        let w = tokio::spawn({
            let s = std::sync::Arc::clone(&s);
            async move { s.wait_writable().await }
        });
        tokio::task::yield_now().await;
        assert!(!w.is_finished());
        s.observe(1 << 30);
        tokio::time::timeout(Duration::from_secs(5), w).await.unwrap().unwrap();
    }
}
