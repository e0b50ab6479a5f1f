//! The flusher's metrics: prometheus-client values made here and handed to
//! [`crate::Durability::open_with`]; the node registers them with its
//! registry ([`StorageMetrics::register`]). `Default` is a detached set.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// The group-commit flusher's metrics.
#[derive(Clone, Debug)]
pub struct StorageMetrics {
    fsync_seconds: Histogram,
    batch_size: Histogram,
    sync_failures: Counter,
}

impl Default for StorageMetrics {
    fn default() -> Self {
        StorageMetrics {
            // 50 µs .. 3.3 s.
            fsync_seconds: Histogram::new(exponential_buckets(0.00005, 2.0, 17)),
            // 1 .. 4096 completions.
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 13)),
            sync_failures: Counter::default(),
        }
    }
}

impl StorageMetrics {
    /// One durable flush of `batch` waiting completions took `seconds`.
    pub fn commit(&self, seconds: f64, batch: usize) {
        self.fsync_seconds.observe(seconds);
        self.batch_size.observe(batch as f64);
    }

    /// An fsync of the log or the state failed (fail-stop follows).
    pub fn sync_failed(&self) {
        self.sync_failures.inc();
    }

    /// Adds these metrics to the node's registry.
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "tern_storage_fsync_failures",
            "Failed fsyncs of the write-ahead log or the state database (a node stops at the first)",
            self.sync_failures.clone(),
        );
        r.register(
            "tern_storage_fsync_duration_seconds",
            "Time of one group commit (fdatasync of the write-ahead log; sled flush and fdatasync too when a snapshot or reclaim asks)",
            self.fsync_seconds.clone(),
        );
        r.register(
            "tern_storage_commit_batch_size",
            "Completions (log appends and other waiters) made durable by one group commit",
            self.batch_size.clone(),
        );
    }
}
