//! Body spool: per-group append-only segment files holding message bodies.
//!
//! Each record is `[len: u32 LE][crc32: u32 LE][bytes]`. Bodies are written
//! once, by the log store, and referenced by [`BodyLoc`] from both the log
//! entry and the state machine's message record. Writes are made durable by
//! the node's flusher (group commit), not here.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::Durability;

/// A segment is closed and a new one started past this size.
const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
const HEADER: u64 = 8;

/// Where one body lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BodyLoc {
    pub segment: u64,
    pub offset: u64,
    pub len: u32,
    pub crc: u32,
}

struct Active {
    seq: u64,
    file: Arc<File>,
    size: u64,
}

struct Inner {
    active: Option<Active>,
    open: HashMap<u64, Arc<File>>,
    /// Queued messages whose body is in each segment (state machine).
    live: HashMap<u64, i64>,
    /// Highest log index whose entry has a body in each segment (log store).
    log_max: HashMap<u64, u64>,
    /// Log entries up to here are purged.
    purged: u64,
    /// Reclaiming waits until both the state machine and the log store have
    /// counted their references after a start.
    counted_sm: bool,
    counted_log: bool,
}

/// The spool of one Raft group.
pub struct Spool {
    dir: PathBuf,
    /// Segment size at which a new one is started.
    segment_bytes: u64,
    durability: Arc<Durability>,
    inner: Mutex<Inner>,
}

impl Spool {
    pub fn open(durability: Arc<Durability>, group: u64) -> std::io::Result<Spool> {
        let dir = durability.data_dir().join("spool").join(format!("g{group}"));
        std::fs::create_dir_all(&dir)?;
        Ok(Spool {
            dir,
            segment_bytes: SEGMENT_BYTES,
            durability,
            inner: Mutex::new(Inner {
                active: None,
                open: HashMap::new(),
                live: HashMap::new(),
                log_max: HashMap::new(),
                purged: 0,
                counted_sm: false,
                counted_log: false,
            }),
        })
    }

    /// Smaller segments, for tests of reclamation.
    pub fn with_segment_bytes(mut self, bytes: u64) -> Spool {
        self.segment_bytes = bytes;
        self
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:016x}.seg"))
    }

    /// Highest existing segment number, so a restart never appends into a
    /// segment whose tail may hold a torn write.
    fn last_segment(&self) -> std::io::Result<u64> {
        let mut last = 0;
        for entry in std::fs::read_dir(&self.dir)? {
            let name = entry?.file_name();
            let name = name.to_string_lossy();
            if let Some(hex) = name.strip_suffix(".seg") {
                if let Ok(n) = u64::from_str_radix(hex, 16) {
                    last = last.max(n);
                }
            }
        }
        Ok(last)
    }

    /// Appends a body; durable after the next flush of the node's flusher.
    pub fn append(&self, bytes: &[u8]) -> std::io::Result<BodyLoc> {
        let len = u32::try_from(bytes.len()).map_err(|_| std::io::Error::other("body larger than 4 GiB"))?;
        let crc = crc32fast::hash(bytes);
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let need_new = match &inner.active {
            None => true,
            Some(a) => a.size + HEADER + u64::from(len) > self.segment_bytes && a.size > 0,
        };
        if need_new {
            let seq = match &inner.active {
                Some(a) => a.seq + 1,
                None => self.last_segment()? + 1,
            };
            let file = Arc::new(
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(self.path(seq))?,
            );
            super::sync_dir(&self.dir)?;
            inner.open.insert(seq, Arc::clone(&file));
            inner.active = Some(Active { seq, file, size: 0 });
        }
        let active = inner
            .active
            .as_mut()
            .ok_or_else(|| std::io::Error::other("no active segment"))?;
        let offset = active.size;
        let mut record = Vec::with_capacity(HEADER as usize + bytes.len());
        record.extend_from_slice(&len.to_le_bytes());
        record.extend_from_slice(&crc.to_le_bytes());
        record.extend_from_slice(bytes);
        active.file.write_all_at(&record, offset)?;
        active.size += record.len() as u64;
        let loc = BodyLoc {
            segment: active.seq,
            offset,
            len,
            crc,
        };
        self.durability.mark_dirty(&active.file);
        Ok(loc)
    }

    /// Reads and checks a body.
    pub fn read(&self, loc: &BodyLoc) -> std::io::Result<Vec<u8>> {
        let file = {
            let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            match inner.open.get(&loc.segment) {
                Some(f) => Arc::clone(f),
                None => {
                    let f = Arc::new(File::open(self.path(loc.segment))?);
                    inner.open.insert(loc.segment, Arc::clone(&f));
                    f
                }
            }
        };
        let mut buf = vec![0u8; HEADER as usize + loc.len as usize];
        file.read_exact_at(&mut buf, loc.offset)?;
        let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
        let crc = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
        let body = buf.split_off(HEADER as usize);
        if len != loc.len || crc != loc.crc || crc32fast::hash(&body) != crc {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("spool record at {}:{} fails its checksum", loc.segment, loc.offset),
            ));
        }
        Ok(body)
    }
}

/// Space reclamation. A segment is deleted once it is not the one being
/// written, no queued message's body is in it, and every log entry that
/// carried a body into it has been purged. The files are removed only after
/// the next durable flush, so the removal of the last record and the log
/// purge are on disk first: after a crash nothing can point into a deleted
/// segment.
impl Spool {
    /// The state machine's references, counted once at start.
    pub fn set_live(&self, live: HashMap<u64, i64>) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.live = live;
        inner.counted_sm = true;
    }

    /// The log store's references and purge point, counted once at start.
    pub fn set_log_refs(&self, log_max: HashMap<u64, u64>, purged: u64) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.log_max = log_max;
        inner.purged = purged;
        inner.counted_log = true;
    }

    /// A message record now points into `segment`.
    pub fn retain(&self, segment: u64) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        *inner.live.entry(segment).or_default() += 1;
    }

    /// A message record pointing into `segment` is gone.
    pub fn release(&self, segment: u64) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        *inner.live.entry(segment).or_default() -= 1;
    }

    /// The log entry at `index` has its body in `segment`.
    pub fn logged(&self, segment: u64, index: u64) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let max = inner.log_max.entry(segment).or_default();
        *max = (*max).max(index);
    }

    /// Log entries up to `index` are purged.
    pub fn log_purged(&self, index: u64) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.purged = inner.purged.max(index);
    }

    /// Segments that can go, forgotten here; see [`Spool::reclaim`].
    fn take_reclaimable(&self) -> Vec<PathBuf> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if !(inner.counted_sm && inner.counted_log) {
            return Vec::new();
        }
        let active = inner.active.as_ref().map(|a| a.seq);
        let purged = inner.purged;
        let mut segments: Vec<u64> = inner.live.keys().chain(inner.log_max.keys()).copied().collect();
        segments.sort_unstable();
        segments.dedup();
        let mut out = Vec::new();
        for seg in segments {
            let live = inner.live.get(&seg).copied().unwrap_or(0);
            let logged = inner.log_max.get(&seg).copied().unwrap_or(0);
            if Some(seg) != active && live <= 0 && logged <= purged {
                inner.live.remove(&seg);
                inner.log_max.remove(&seg);
                inner.open.remove(&seg);
                out.push(self.path(seg));
            }
        }
        out
    }

    /// Deletes reclaimable segments after the next durable flush.
    pub fn reclaim(&self) {
        let doomed = self.take_reclaimable();
        if doomed.is_empty() {
            return;
        }
        let durability = Arc::clone(&self.durability);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            if durability.flush().await.is_err() {
                return;
            }
            for path in doomed {
                match std::fs::remove_file(&path) {
                    Ok(()) => tracing::debug!(segment = %path.display(), "spool segment reclaimed"),
                    Err(e) => tracing::warn!(segment = %path.display(), error = %e, "cannot remove spool segment"),
                }
            }
        });
    }

    /// Number of segment files on disk (for tests and metrics).
    pub fn segment_files(&self) -> usize {
        std::fs::read_dir(&self.dir)
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".seg"))
                    .count()
            })
            .unwrap_or(0)
    }
}
