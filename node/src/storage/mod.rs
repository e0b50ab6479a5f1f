//! Durable storage for one node: the write-ahead log (every group's Raft
//! log and the message bodies, see [`wal`]), one sled `Db` for the state
//! machines, and the flusher that makes writes really durable.
//!
//! Group commit: every log append of every group hands its completion to
//! one flusher thread, which takes all that are waiting, makes them durable
//! with one `fdatasync` of the log, then completes them all. sled is not on
//! that path: state machines are re-applied from the log after a crash
//! (from their last checkpoint), and are flushed (sled flush, then
//! `fdatasync` of sled's data file, because sled 0.34's flush ends in
//! `sync_file_range`) only for a checkpoint (once a second), before the log
//! is purged behind them, and before log segments are deleted. That flush
//! runs on a blocking thread of its own, not the flusher's: it takes
//! milliseconds, and every log append arriving meanwhile would wait for it.

pub mod space;
pub mod wal;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};

use openraft::storage::LogFlushed;

use crate::metrics::StorageMetrics;
use crate::raft::TypeConfig;

/// A completion waiting for the next durable flush of the log.
enum Job {
    Log(LogFlushed<TypeConfig>),
    Waiter(tokio::sync::oneshot::Sender<Result<(), String>>),
}

/// What the flusher thread needs; separate so that dropping [`Durability`]
/// closes the channel and ends the thread.
struct Syncer {
    db: sled::Db,
    db_file: File,
    wal: Arc<wal::Wal>,
    metrics: StorageMetrics,
}

/// sled's cache unless configured (`node.state_cache_mb`). A queue whose
/// records outgrow it accepts mail more slowly (bench/RESULTS.md).
pub const DEFAULT_CACHE_BYTES: u64 = 256 << 20;

/// The node's sled database plus the group-commit flusher.
pub struct Durability {
    syncer: Arc<Syncer>,
    tx: Mutex<mpsc::Sender<Job>>,
    data_dir: PathBuf,
    /// Free space of `data_dir`: the log store holds appends back while full.
    space: Arc<space::DiskSpace>,
}

impl Durability {
    /// Opens (or creates) the node's storage under `data_dir`.
    pub fn open(data_dir: &Path) -> anyhow::Result<Arc<Durability>> {
        Self::open_with(
            data_dir,
            StorageMetrics::default(),
            wal::SEGMENT_BYTES,
            DEFAULT_CACHE_BYTES,
        )
    }

    /// As [`Durability::open`], with the flusher observing into `metrics`,
    /// log segments of `segment_bytes` and `cache_bytes` of sled cache
    /// (`node.state_cache_mb`).
    pub fn open_with(
        data_dir: &Path,
        metrics: StorageMetrics,
        segment_bytes: u64,
        cache_bytes: u64,
    ) -> anyhow::Result<Arc<Durability>> {
        use anyhow::Context as _;
        let sled_dir = data_dir.join("sled");
        std::fs::create_dir_all(&sled_dir).with_context(|| format!("creating {}", sled_dir.display()))?;
        let db = sled::Config::new()
            .path(&sled_dir)
            .mode(sled::Mode::HighThroughput)
            .cache_capacity(cache_bytes)
            // No flusher thread of sled's own: Tern flushes sled itself at
            // every checkpoint, and that thread also spent up to half its
            // time rewriting live pages into fresh segments, which after a
            // large fill kept an idle node busy for minutes. sled still
            // cleans one page on every write while it has segments to clean.
            .flush_every_ms(None)
            .open()
            .with_context(|| format!("opening sled database in {}", sled_dir.display()))?;
        let db_file = File::open(sled_dir.join("db")).context("opening sled data file for fdatasync")?;
        let wal = Arc::new(wal::Wal::open(&data_dir.join("wal"), segment_bytes)?);
        let (tx, rx) = mpsc::channel();
        let syncer = Arc::new(Syncer {
            db,
            db_file,
            wal,
            metrics,
        });
        let flusher = Arc::clone(&syncer);
        let durability = Arc::new(Durability {
            syncer,
            tx: Mutex::new(tx),
            data_dir: data_dir.to_owned(),
            space: Arc::new(space::DiskSpace::new(data_dir)),
        });
        std::thread::Builder::new()
            .name("tern-flusher".into())
            .spawn(move || flusher.run(rx))
            .context("starting flusher thread")?;
        Ok(durability)
    }

    pub fn db(&self) -> &sled::Db {
        &self.syncer.db
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn wal(&self) -> &Arc<wal::Wal> {
        &self.syncer.wal
    }

    pub fn space(&self) -> &Arc<space::DiskSpace> {
        &self.space
    }

    /// Completes `callback` once everything written so far is on disk.
    pub fn flush_then(&self, callback: LogFlushed<TypeConfig>) {
        self.send(Job::Log(callback));
    }

    /// Waits until everything written to the log so far is on disk.
    pub async fn flush(&self) -> Result<(), String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(Job::Waiter(tx));
        rx.await.map_err(|_| "flusher stopped".to_string())?
    }

    /// Waits until the log and every state machine write so far are on disk.
    pub async fn flush_all(&self) -> Result<(), String> {
        let syncer = Arc::clone(&self.syncer);
        tokio::task::spawn_blocking(move || syncer.sync_state())
            .await
            .map_err(|e| format!("sled flush: {e}"))??;
        self.flush().await
    }

    /// Log segments nothing needs any more, forgotten by the log: the
    /// caller [`Durability::retire`]s them once the removals and purges
    /// that freed them are on disk (after a crash nothing may point into a
    /// deleted segment). State machines hold removals in memory until their
    /// write-back, so the caller writes every one back, then flushes.
    pub fn take_reclaimable(&self) -> Vec<u64> {
        self.wal().take_reclaimable()
    }

    /// Deletes (or keeps as spares) segments from [`Durability::take_reclaimable`]
    /// after a full flush that followed it.
    pub fn retire(&self, doomed: Vec<u64>) {
        for seq in doomed {
            match self.wal().retire(seq) {
                Ok(()) => tracing::debug!(segment = seq, "log segment reclaimed"),
                Err(e) => tracing::warn!(segment = seq, error = %e, "cannot retire log segment"),
            }
        }
    }

    fn send(&self, job: Job) {
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(mpsc::SendError(job)) = tx.send(job) {
            complete(job, Err("flusher stopped".into()));
        }
    }
}

impl Syncer {
    fn run(&self, rx: mpsc::Receiver<Job>) {
        while let Ok(first) = rx.recv() {
            let mut jobs = vec![first];
            jobs.extend(rx.try_iter());
            let started = std::time::Instant::now();
            let result = self.wal.sync().map_err(|e| format!("fdatasync log: {e}"));
            self.metrics.commit(started.elapsed().as_secs_f64(), jobs.len());
            if let Err(e) = &result {
                tracing::error!(error = %e, "durable flush failed");
            }
            tracing::trace!(
                batch = jobs.len(),
                elapsed_us = started.elapsed().as_micros() as u64,
                "group commit"
            );
            for job in jobs {
                complete(job, result.clone());
            }
        }
    }

    /// Makes every sled write so far durable.
    fn sync_state(&self) -> Result<(), String> {
        self.db.flush().map_err(|e| format!("sled flush: {e}"))?;
        self.db_file.sync_data().map_err(|e| format!("fdatasync sled: {e}"))
    }
}

fn complete(job: Job, result: Result<(), String>) {
    match job {
        Job::Log(cb) => cb.log_io_completed(result.map_err(std::io::Error::other)),
        Job::Waiter(tx) => {
            let _ = tx.send(result);
        }
    }
}

/// fsyncs a directory so that a file just created in it survives power loss.
pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}
