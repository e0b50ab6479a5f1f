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
//!
//! Order of durability (docs/design.md, "The durability contract"): log
//! and bodies first, then the state that points at them (sled's blob files
//! and their directory, then sled's data file), and a checkpoint only after
//! that (tern-raft's state machine). Any fsync error is fail-stop: the
//! kernel may have dropped the pages it could not write and marked them
//! clean, so nothing written before it may ever count as durable; the
//! process exits with [`EXIT_STORAGE_FAILURE`] and a supervisor's restart
//! replays the log.

//!
//! # Layout
//! - this file: [`Durability`] (the sled `Db`, the log, the flusher thread
//!   and group commit), [`Flushed`] (what a log append hands the flusher),
//!   [`sync_dir`].
//! - [`wal`]: the write-ahead log, its format and invariants.
//! - [`space`]: free space of the data directory, and holding writes while full.
//! - [`failpoint`]: crash points armed by tests through the environment.
//! - [`metrics`]: the flusher's prometheus-client metrics.
//! - [`error`]: [`OpenError`] and [`FlushError`].
//! - [`seam`]: [`Store`], the trait the Raft log store and state machines
//!   need, implemented here by [`Durability`].
//!
//! No Raft here: the Raft crate hands its flush callback in through
//! [`Flushed`].

pub mod error;
pub mod failpoint;
pub mod metrics;
pub mod seam;
pub mod space;
pub mod wal;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};

pub use error::{FlushError, OpenError};
pub use metrics::StorageMetrics;
pub use seam::Store;
pub use tern_model::BodyLoc;

/// Exit code of a node stopped by a failed fsync (sysexits' EX_IOERR).
pub const EXIT_STORAGE_FAILURE: i32 = 74;

/// What a failed fsync does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnSyncError {
    /// Log it and end the process ([`EXIT_STORAGE_FAILURE`]): the node's
    /// behaviour.
    Exit,
    /// Only fail this and every later flush (in-process tests).
    Fail,
}

/// What waits for the next durable flush of the log: a log append's
/// completion, called on the flusher thread with the flush's result. The
/// Raft crate implements it for openraft's callback; a type parameter of
/// [`Durability`], so an append costs no allocation for it.
pub trait Flushed: Send + 'static {
    /// The log is on disk up to (at least) the append this stands for, or
    /// the flush failed.
    fn flushed(self, result: Result<(), FlushError>);
}

/// A [`Durability`] whose appends wait through [`Durability::flush`] only.
pub enum NoCallback {}

impl Flushed for NoCallback {
    fn flushed(self, _: Result<(), FlushError>) {
        match self {}
    }
}

/// A completion waiting for the next durable flush of the log.
enum Job<F> {
    Log(F),
    Waiter(tokio::sync::oneshot::Sender<Result<(), FlushError>>),
}

/// What the flusher thread needs; separate so that dropping [`Durability`]
/// closes the channel and ends the thread.
struct Syncer {
    db: sled::Db,
    db_file: File,
    sled_dir: PathBuf,
    /// sled's `blobs/` directory and the blob files already synced.
    blobs: Mutex<Blobs>,
    wal: Arc<wal::Wal>,
    metrics: StorageMetrics,
    on_error: OnSyncError,
    /// A state flush failed (sled's files are poisoned like the log).
    state_failed: std::sync::atomic::AtomicBool,
}

/// sled 0.34 writes any item over about 128 KiB (a message record with many
/// recipients, say) to a file of its own under `blobs/`, and never fsyncs
/// those files nor that directory. Tern does, before each state flush.
struct Blobs {
    dir: PathBuf,
    synced: std::collections::HashSet<std::ffi::OsString>,
}

impl Blobs {
    /// fsyncs every blob file not synced yet, then the directory if any was
    /// new. Files gone since (sled removes blobs it no longer needs) are
    /// forgotten.
    fn sync(&mut self) -> std::io::Result<usize> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let mut present = std::collections::HashSet::new();
        let mut new = 0;
        for entry in entries {
            let name = entry?.file_name();
            if !self.synced.contains(&name) {
                match File::open(self.dir.join(&name)) {
                    Ok(f) => f.sync_all()?,
                    // Removed by sled meanwhile.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
                new += 1;
            }
            present.insert(name);
        }
        if new > 0 {
            sync_dir(&self.dir)?;
        }
        self.synced = present;
        Ok(new)
    }
}

pub use tern_model::defaults::STATE_CACHE_BYTES as DEFAULT_CACHE_BYTES;

/// The node's sled database plus the group-commit flusher; `F` is what a
/// log append hands [`Durability::flush_then`].
pub struct Durability<F: Flushed = NoCallback> {
    syncer: Arc<Syncer>,
    tx: Mutex<mpsc::Sender<Job<F>>>,
    data_dir: PathBuf,
    /// Free space of `data_dir`: the log store holds appends back while full.
    space: Arc<space::DiskSpace>,
}

impl<F: Flushed> Durability<F> {
    /// Opens (or creates) the node's storage under `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Arc<Self>, OpenError> {
        Self::open_with(
            data_dir,
            StorageMetrics::default(),
            wal::SEGMENT_BYTES,
            DEFAULT_CACHE_BYTES,
            OnSyncError::Fail,
        )
    }

    /// As [`Durability::open`], with the flusher observing into `metrics`,
    /// log segments of `segment_bytes` and `cache_bytes` of sled cache
    /// (`node.state_cache_mb`), and `on_error` deciding what a failed
    /// fsync does.
    pub fn open_with(
        data_dir: &Path,
        metrics: StorageMetrics,
        segment_bytes: u64,
        cache_bytes: u64,
        on_error: OnSyncError,
    ) -> Result<Arc<Self>, OpenError> {
        let sled_dir = data_dir.join("sled");
        std::fs::create_dir_all(&sled_dir).map_err(|e| OpenError::io("creating", &sled_dir, e))?;
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
            .map_err(|source| OpenError::Sled {
                dir: sled_dir.clone(),
                source,
            })?;
        let db_file = File::open(sled_dir.join("db"))
            .map_err(|e| OpenError::io("opening sled data file for fdatasync", &sled_dir.join("db"), e))?;
        let wal = Arc::new(wal::Wal::open(&data_dir.join("wal"), segment_bytes)?);
        // The directories' own entries (and sled's files in its directory),
        // or a power cut soon after the first start takes them back.
        let mut dirs = vec![sled_dir.clone(), data_dir.to_owned()];
        dirs.extend(
            data_dir
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .map(Path::to_path_buf),
        );
        for dir in &dirs {
            sync_dir(dir).map_err(|e| OpenError::io("syncing directory", dir, e))?;
        }
        let (tx, rx) = mpsc::channel();
        let syncer = Arc::new(Syncer {
            db,
            db_file,
            sled_dir: sled_dir.clone(),
            blobs: Mutex::new(Blobs {
                dir: sled_dir.join("blobs"),
                synced: Default::default(),
            }),
            wal,
            metrics,
            on_error,
            state_failed: Default::default(),
        });
        // What a crashed process left in the page cache (and sled's own
        // recovery wrote) is read as the state below: on disk first, so
        // that a checkpoint read now is one a power cut cannot take back.
        syncer.sync_state().map_err(OpenError::StartSync)?;
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
            .map_err(OpenError::Flusher)?;
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
    pub fn flush_then(&self, callback: F) {
        self.send(Job::Log(callback));
    }

    /// Waits until everything written to the log so far is on disk.
    pub async fn flush(&self) -> Result<(), FlushError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(Job::Waiter(tx));
        rx.await.map_err(|_| FlushError::Stopped)?
    }

    /// Waits until the log and every state machine write so far are on disk:
    /// the log (and the bodies in it) first, then the state pointing at it.
    pub async fn flush_all(&self) -> Result<(), FlushError> {
        self.flush().await?;
        self.flush_state().await
    }

    /// Waits until every state machine write so far is on disk (sled's blob
    /// files, its directory, then its data file); not the log.
    pub async fn flush_state(&self) -> Result<(), FlushError> {
        let syncer = Arc::clone(&self.syncer);
        tokio::task::spawn_blocking(move || syncer.sync_state())
            .await
            .map_err(|e| FlushError::Task(e.to_string()))?
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
        if doomed.is_empty() {
            return;
        }
        for seq in doomed {
            match self.wal().retire(seq) {
                Ok(()) => tracing::debug!(segment = seq, "log segment reclaimed"),
                Err(e) => tracing::warn!(segment = seq, error = %e, "cannot retire log segment"),
            }
        }
        // Not needed for safety (a segment brought back by a crash holds
        // only purged entries), but spares and deletions then stay done.
        if let Err(e) = sync_dir(&self.data_dir.join("wal")) {
            tracing::warn!(error = %e, "cannot sync the log directory");
        }
    }

    fn send(&self, job: Job<F>) {
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(mpsc::SendError(job)) = tx.send(job) {
            complete(job, Err(FlushError::Stopped));
        }
    }
}

impl Syncer {
    fn run<F: Flushed>(&self, rx: mpsc::Receiver<Job<F>>) {
        while let Ok(first) = rx.recv() {
            let mut jobs = vec![first];
            jobs.extend(rx.try_iter());
            let started = std::time::Instant::now();
            let result = self.wal.sync().map_err(|e| FlushError::Log(Arc::new(e)));
            self.metrics.commit(started.elapsed().as_secs_f64(), jobs.len());
            if let Err(e) = &result {
                self.failed(e);
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

    /// Makes every sled write so far durable: blob files (they exist from
    /// the insert that made them) before the flush that makes the pages
    /// pointing at them durable, again after it for any the flush wrote,
    /// then the data file (sled 0.34's flush ends in `sync_file_range`).
    fn sync_state(&self) -> Result<(), FlushError> {
        use std::sync::atomic::Ordering;
        if self.state_failed.load(Ordering::Acquire) {
            return Err(FlushError::StateFailedEarlier);
        }
        let state = |step: &'static str| {
            move |e: std::io::Error| FlushError::State {
                step,
                source: Arc::new(e),
            }
        };
        let result = (|| {
            let mut blobs = self.blobs.lock().unwrap_or_else(|p| p.into_inner());
            blobs.sync().map_err(state("fsync sled blobs"))?;
            self.db.flush().map_err(|e| FlushError::SledFlush(Arc::new(e)))?;
            blobs.sync().map_err(state("fsync sled blobs"))?;
            self.db_file.sync_data().map_err(state("fdatasync sled"))?;
            // sled renames its own snapshot files into place and never syncs
            // the directory.
            sync_dir(&self.sled_dir).map_err(state("fsync sled directory"))
        })();
        if let Err(e) = &result {
            self.state_failed.store(true, Ordering::Release);
            self.failed(e);
        }
        result
    }

    /// An fsync failed: counted, logged and, for a node, the end.
    fn failed(&self, error: &FlushError) {
        self.metrics.sync_failed();
        tracing::error!(error = %error, "fsync failed: nothing written since the last good sync can be trusted to be on disk");
        if self.on_error == OnSyncError::Exit {
            eprintln!("ternd: fsync failed ({error}); stopping (fail-stop, exit code {EXIT_STORAGE_FAILURE})");
            std::process::exit(EXIT_STORAGE_FAILURE);
        }
    }
}

fn complete<F: Flushed>(job: Job<F>, result: Result<(), FlushError>) {
    match job {
        Job::Log(cb) => cb.flushed(result),
        Job::Waiter(tx) => {
            let _ = tx.send(result);
        }
    }
}

/// fsyncs a directory so that a file just created in it survives power loss.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}
