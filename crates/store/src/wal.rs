//! The node's write-ahead log: one append-only stream of segment files
//! holding every Raft group's log entries, the message bodies they carry,
//! and each group's vote, commit and purge marks.
//!
//! One stream for the whole node means one `fdatasync` makes a group commit
//! of any number of groups durable (no sled flush on the write path).
//!
//! Record: `[len: u32 LE][crc32: u32 LE][kind: u8][group: u64 LE][payload]`,
//! `len` the payload length, the checksum over kind, group and payload.
//! A body is written once, as its own record, and found again by its
//! [`BodyLoc`] from the log entry and from the state machine's message
//! record. Replay at open rebuilds each group's index (log index → record).
//!
//! Segments are never appended to after a restart, and each new segment
//! starts with the current vote, commit and purge marks of every group, so
//! older segments are needed only for the entries and bodies in them.
//!
//! Invariants that make a crash (or a power cut) recoverable:
//! - A segment is fsynced whole, ending in its [`Kind::End`] record, before
//!   the next one is created; so only the newest segment can end in a torn
//!   write. At open a torn tail there is cut off, durably, before anything
//!   new is written; a record that fails its checksum in any other segment
//!   is damage, and the node refuses to start ([`Damaged`]).
//! - At open every segment is fsynced before replay is relied on: writes of
//!   a crashed process may still be only in the page cache.
//! - An fsync error poisons the log ([`Poisoned`]): the kernel may have
//!   dropped the pages it could not write, so no later sync proves them.
//!
//! Segments are recycled: a segment nothing needs any more is kept (up to
//! [`MAX_SPARES`]) and renamed to become a later one, so that writes land in
//! blocks the file system already allocated and `fdatasync` has no metadata
//! to commit (on ext4 an append makes every sync a journal commit as well).
//! A recycled file still holds its old records past the new ones, so the
//! checksum covers the segment's number: an old record fails it and ends
//! replay. A segment starts with a [`Kind::Segment`] record (which tells
//! this format from the first one, whose checksum has no segment number)
//! and a rotated one ends with [`Kind::End`].

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::Read as _;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::error::OpenError;

pub use tern_model::defaults::LOG_SEGMENT_BYTES as SEGMENT_BYTES;
/// Segments kept for reuse instead of being deleted.
pub const MAX_SPARES: usize = 2;
const HEADER: usize = 4 + 4 + 1 + 8;
/// A segment is filled with zeros this far ahead of its records (a spare
/// already is). A record written over blocks already on disk costs its sync
/// only the data; an append also makes ext4 write the inode (the new size)
/// and the block maps, each waited for in turn (bench/RESULTS.md).
const PREALLOC: u64 = 1 << 20;

pub type GroupId = u64;

/// What a record holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Kind {
    /// A message body.
    Body = 1,
    /// `[index: u64 LE]` + a bincode log entry (bodies by location).
    Entry = 2,
    /// `[index: u64 LE]`: entries from here on are gone.
    Truncate = 3,
    /// `[index: u64 LE]` + the bincode purged log id: entries up to here are gone.
    Purge = 4,
    /// The bincode vote.
    Vote = 5,
    /// The bincode committed log id.
    Committed = 6,
    /// `[segment: u64 LE]`: the first record of a segment in this format.
    Segment = 7,
    /// Nothing follows in this segment (a recycled file's old records may).
    End = 8,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Body,
            2 => Kind::Entry,
            3 => Kind::Truncate,
            4 => Kind::Purge,
            5 => Kind::Vote,
            6 => Kind::Committed,
            7 => Kind::Segment,
            8 => Kind::End,
            _ => return None,
        })
    }

    /// Marks re-written at the start of every segment.
    const MARKS: [Kind; 3] = [Kind::Vote, Kind::Committed, Kind::Purge];
}

pub use tern_model::BodyLoc;

/// One group's log: the record of each entry from `first` on.
#[derive(Debug, Default)]
pub struct GroupIndex {
    first: u64,
    locs: VecDeque<BodyLoc>,
}

impl GroupIndex {
    /// Index after the last entry.
    pub fn next(&self) -> u64 {
        self.first + self.locs.len() as u64
    }

    pub fn first(&self) -> u64 {
        self.first
    }

    pub fn is_empty(&self) -> bool {
        self.locs.is_empty()
    }

    pub fn get(&self, index: u64) -> Option<BodyLoc> {
        let i = index.checked_sub(self.first)?;
        self.locs.get(usize::try_from(i).ok()?).copied()
    }

    /// Records entry `index`, replacing it and everything after it if the
    /// log already went that far; a gap starts the log afresh.
    pub fn place(&mut self, index: u64, loc: BodyLoc) {
        if self.locs.is_empty() || index <= self.first || index > self.next() {
            self.locs.clear();
            self.first = index;
        } else if index < self.next() {
            self.truncate_from(index);
        }
        self.locs.push_back(loc);
    }

    /// Forgets entries from `index` on.
    pub fn truncate_from(&mut self, index: u64) {
        let keep = index.saturating_sub(self.first);
        self.locs.truncate(usize::try_from(keep).unwrap_or(usize::MAX));
    }

    /// Forgets entries up to `index`.
    pub fn purge_to(&mut self, index: u64) {
        while !self.locs.is_empty() && self.first <= index {
            self.locs.pop_front();
            self.first += 1;
        }
        if self.locs.is_empty() {
            self.first = self.first.max(index.saturating_add(1));
        }
    }
}

/// What replay found for one group.
#[derive(Debug, Default)]
pub struct Replayed {
    pub index: GroupIndex,
    /// Latest payload of each mark.
    pub vote: Option<Vec<u8>>,
    pub committed: Option<Vec<u8>>,
    pub purged: Option<Vec<u8>>,
}

struct Active {
    seq: u64,
    file: Arc<File>,
    size: u64,
    /// The file is written (zeros, or a spare's old records) up to here.
    allocated: u64,
    /// Zeros go no further than this (the segment size), unless a record does.
    limit: u64,
}

impl Active {
    /// Writes zeros past the records so that the file holds `end` bytes and
    /// up to [`PREALLOC`] more, before records are written there.
    fn allocate(&mut self, end: u64) -> std::io::Result<()> {
        if end <= self.allocated {
            return Ok(());
        }
        static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
        let target = (end.div_ceil(PREALLOC) * PREALLOC + PREALLOC).min(self.limit.max(end));
        // Never over records already written.
        let mut at = self.allocated.max(self.size);
        while at < target {
            let n = (target - at).min(ZEROS.len() as u64);
            self.file.write_all_at(&ZEROS[..n as usize], at)?;
            at += n;
        }
        self.allocated = target;
        Ok(())
    }
}

struct Inner {
    active: Active,
    open: HashMap<u64, Arc<File>>,
    /// Queued messages whose body is in each segment (state machines).
    live: HashMap<u64, i64>,
    /// Per segment, the highest log index each group has an entry (or a
    /// truncation of one) in.
    log_max: HashMap<u64, HashMap<GroupId, u64>>,
    /// Per group, entries up to here are purged.
    purged: HashMap<GroupId, u64>,
    /// Latest mark payloads, re-written at the start of each segment.
    marks: BTreeMap<(GroupId, Kind), Vec<u8>>,
    /// Replay results not yet taken by their group's log store.
    replayed: HashMap<GroupId, Replayed>,
    /// Reclaiming waits until every state machine has counted its references.
    reclaim_enabled: bool,
    /// A reference was dropped since the last look for reclaimable segments.
    changed: bool,
    /// Segment files on disk.
    segments: std::collections::BTreeSet<u64>,
    /// Segments in the first format (checksums without the segment number):
    /// read with the old checksum, and deleted, never recycled.
    legacy: std::collections::BTreeSet<u64>,
    /// Retired segment files waiting to be reused.
    spares: Vec<PathBuf>,
}

/// The node's write-ahead log.
pub struct Wal {
    dir: PathBuf,
    segment_bytes: u64,
    inner: Mutex<Inner>,
    /// Segment files written since the last sync.
    dirty: Mutex<Vec<Arc<File>>>,
    /// Everything before this [`position`] is on disk.
    synced: std::sync::atomic::AtomicU64,
    /// An fsync failed: after that the kernel may have dropped the dirty
    /// pages and marked them clean, so no later sync proves anything.
    failed: std::sync::atomic::AtomicBool,
    /// Tests: the next fsync fails as if the disk had.
    #[cfg(test)]
    fail_next_sync: std::sync::atomic::AtomicBool,
}

pub use crate::error::Damaged;

/// An fsync of the log failed earlier: nothing written since the last good
/// sync may ever count as durable.
#[derive(Debug, thiserror::Error)]
#[error("an earlier fsync of the write-ahead log failed; the log is not durable (fail-stop)")]
pub struct Poisoned;

/// A point in the log as one number (segment, then offset), for comparing.
fn position(segment: u64, offset: u64) -> u64 {
    (segment << 40) | offset.min((1 << 40) - 1)
}

/// A record's checksum over kind and group (`head`) and payload; `segment`
/// is `None` for the first format, which did not cover it.
fn checksum(segment: Option<u64>, head: &[u8], payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    if let Some(seq) = segment {
        hasher.update(&seq.to_le_bytes());
    }
    hasher.update(head);
    hasher.update(payload);
    hasher.finalize()
}

/// Records being added in one write (one `pwrite`).
pub struct Batch {
    seq: u64,
    base: u64,
    buf: Vec<u8>,
    /// Log indexes this batch refers to, by group (see [`Batch::refer`]).
    refs: Vec<(GroupId, u64)>,
    /// Marks written, remembered once the write succeeds.
    marks: Vec<((GroupId, Kind), Vec<u8>)>,
}

impl Batch {
    fn new(seq: u64, base: u64) -> Batch {
        Batch {
            seq,
            base,
            buf: Vec::new(),
            refs: Vec::new(),
            marks: Vec::new(),
        }
    }

    /// Adds a record; its location is final once the write succeeds.
    pub fn push(&mut self, kind: Kind, group: GroupId, payload: &[u8]) -> std::io::Result<BodyLoc> {
        let len = u32::try_from(payload.len()).map_err(|_| std::io::Error::other("record larger than 4 GiB"))?;
        let offset = self.base + self.buf.len() as u64;
        let mut head = [0u8; 9];
        head[0] = kind as u8;
        head[1..].copy_from_slice(&group.to_le_bytes());
        let crc = checksum(Some(self.seq), &head, payload);
        self.buf.reserve(HEADER + payload.len());
        self.buf.extend_from_slice(&len.to_le_bytes());
        self.buf.extend_from_slice(&crc.to_le_bytes());
        self.buf.push(kind as u8);
        self.buf.extend_from_slice(&group.to_le_bytes());
        self.buf.extend_from_slice(payload);
        if Kind::MARKS.contains(&kind) {
            self.marks.push(((group, kind), payload.to_vec()));
        }
        Ok(BodyLoc {
            segment: self.seq,
            offset,
            len,
            crc,
        })
    }

    /// Notes that `group`'s log reaches `index` in this segment, so the
    /// segment stays until the group purges that far.
    pub fn refer(&mut self, group: GroupId, index: u64) {
        self.refs.push((group, index));
    }

    /// Writes the records at the end of `inner`'s active segment and
    /// remembers what they refer to.
    fn commit(self, inner: &mut Inner) -> std::io::Result<()> {
        inner.active.allocate(inner.active.size + self.buf.len() as u64)?;
        inner.active.file.write_all_at(&self.buf, inner.active.size)?;
        inner.active.size += self.buf.len() as u64;
        let segment = inner.log_max.entry(self.seq).or_default();
        for (group, index) in self.refs {
            let max = segment.entry(group).or_default();
            *max = (*max).max(index);
        }
        inner.marks.extend(self.marks);
        Ok(())
    }
}

impl Wal {
    /// Opens the log in `dir`, replaying every segment, and starts a new one.
    pub fn open(dir: &Path, segment_bytes: u64) -> Result<Wal, OpenError> {
        std::fs::create_dir_all(dir).map_err(|e| OpenError::io("creating", dir, e))?;
        let mut segments = Vec::new();
        let listing = |e| OpenError::io("listing", dir, e);
        for entry in std::fs::read_dir(dir).map_err(listing)? {
            let name = entry.map_err(listing)?.file_name();
            let name = name.to_string_lossy();
            if let Some(hex) = name.strip_suffix(".seg") {
                if let Ok(n) = u64::from_str_radix(hex, 16) {
                    segments.push(n);
                }
            }
        }
        segments.sort_unstable();
        let mut spares = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(listing)? {
            let path = entry.map_err(listing)?.path();
            if path.extension().is_some_and(|e| e == "spare") {
                if spares.len() < MAX_SPARES {
                    spares.push(path);
                } else {
                    std::fs::remove_file(&path).map_err(|e| OpenError::io("removing", &path, e))?;
                }
            }
        }
        let mut state = ReplayState::default();
        let mut legacy = std::collections::BTreeSet::new();
        let mut last = 0;
        for (i, &seq) in segments.iter().enumerate() {
            let path = segment_path(dir, seq);
            last = seq;
            // A crash of the process leaves its unsynced writes in the page
            // cache, where replay sees them: made durable before anything
            // read here is relied on (a follower's ack, a purge).
            File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(|e| OpenError::io("syncing", &path, e))?;
            let replay = replay_segment(&path, seq, &mut state).map_err(|e| OpenError::io("replaying", &path, e))?;
            if replay.legacy {
                legacy.insert(seq);
            }
            if let Some(good_len) = replay.cut {
                if i + 1 != segments.len() {
                    // A segment is synced whole (with its End record) before
                    // the next one is started, so only the last can end in a
                    // torn write: this is damage, and what follows it cannot
                    // be trusted to be a log at all.
                    return Err(Damaged { path, offset: good_len }.into());
                }
                // The torn tail of the last segment (or zeros, or the old
                // records of a recycled file): nothing past it was ever
                // acknowledged. Cut durably, before any new segment exists,
                // so that a later crash cannot bring the tail back behind it.
                tracing::info!(segment = %path.display(), at = good_len, "write-ahead log ends here; truncating");
                let file = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|e| OpenError::io("opening", &path, e))?;
                file.set_len(good_len)
                    .and_then(|()| file.sync_all())
                    .map_err(|e| OpenError::io("truncating", &path, e))?;
            }
        }
        let seq = last + 1;
        let active = new_segment(dir, seq, &mut spares, segment_bytes)
            .map_err(|e| OpenError::io("starting a segment in", dir, e))?;
        let open = HashMap::from([(seq, Arc::clone(&active.file))]);
        let mut known: std::collections::BTreeSet<u64> = segments.into_iter().filter(|s| *s <= last).collect();
        known.insert(seq);
        let wal = Wal {
            dir: dir.to_owned(),
            segment_bytes,
            inner: Mutex::new(Inner {
                active,
                open,
                live: HashMap::new(),
                log_max: state.log_max,
                purged: state.purged,
                marks: state.marks,
                replayed: state.replayed,
                reclaim_enabled: false,
                changed: true,
                segments: known,
                legacy,
                spares,
            }),
            dirty: Mutex::new(Vec::new()),
            synced: std::sync::atomic::AtomicU64::new(position(seq, 0)),
            failed: std::sync::atomic::AtomicBool::new(false),
            #[cfg(test)]
            fail_next_sync: std::sync::atomic::AtomicBool::new(false),
        };
        {
            let mut inner = wal.lock();
            wal.write_marks(&mut inner)
                .map_err(|e| OpenError::io("writing the marks in", dir, e))?;
        }
        Ok(wal)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What replay found for `group` (empty for a new group); once per group.
    pub fn take_replayed(&self, group: GroupId) -> Replayed {
        self.lock().replayed.remove(&group).unwrap_or_default()
    }

    /// Appends the records `f` adds, in one write; durable after the next sync.
    pub fn write<T>(&self, f: impl FnOnce(&mut Batch) -> std::io::Result<T>) -> std::io::Result<T> {
        let mut inner = self.lock();
        if inner.active.size >= self.segment_bytes {
            self.rotate(&mut inner)?;
        }
        let mut batch = Batch::new(inner.active.seq, inner.active.size);
        let out = f(&mut batch)?;
        batch.commit(&mut inner)?;
        // Under the lock, so that a sync that sees the new size syncs the file.
        self.mark_dirty(Arc::clone(&inner.active.file));
        Ok(out)
    }

    /// Appends one record on its own.
    pub fn write_one(&self, kind: Kind, group: GroupId, payload: &[u8]) -> std::io::Result<BodyLoc> {
        self.write(|b| b.push(kind, group, payload))
    }

    fn rotate(&self, inner: &mut Inner) -> std::io::Result<()> {
        // Replay stops here, not at the old records of a recycled file.
        let before_end = inner.active.size;
        let mut end = Batch::new(inner.active.seq, inner.active.size);
        end.push(Kind::End, 0, &[])?;
        end.commit(inner)?;
        // Whole on disk before the next segment exists: then only the last
        // segment can end in a torn write, and damage anywhere else is
        // told apart from a crash (see `Wal::open`).
        self.sync_file(&inner.active.file)?;
        let seq = inner.active.seq + 1;
        let active = match new_segment(&self.dir, seq, &mut inner.spares, self.segment_bytes) {
            Ok(active) => active,
            Err(e) => {
                // Go on in this segment (a retried write lands over the End
                // record), or records written after it would not replay.
                inner.active.size = before_end;
                return Err(e);
            }
        };
        inner.open.insert(seq, Arc::clone(&active.file));
        inner.segments.insert(seq);
        inner.changed = true;
        inner.active = active;
        self.write_marks(inner)
    }

    /// Starts the active segment with every group's current marks.
    fn write_marks(&self, inner: &mut Inner) -> std::io::Result<()> {
        let mut batch = Batch::new(inner.active.seq, inner.active.size);
        batch.push(Kind::Segment, 0, &inner.active.seq.to_le_bytes())?;
        for ((group, kind), payload) in &inner.marks {
            batch.push(*kind, *group, payload)?;
        }
        batch.marks.clear();
        batch.commit(inner)?;
        self.mark_dirty(Arc::clone(&inner.active.file));
        Ok(())
    }

    fn mark_dirty(&self, file: Arc<File>) {
        let mut dirty = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
        if !dirty.iter().any(|f| Arc::ptr_eq(f, &file)) {
            dirty.push(file);
        }
    }

    /// Makes everything written so far durable (the group commit's fsync).
    /// Fail-stop: after one failure every later call fails too.
    pub fn sync(&self) -> std::io::Result<()> {
        if self.failed() {
            return Err(std::io::Error::other(Poisoned));
        }
        let upto = {
            let inner = self.lock();
            position(inner.active.seq, inner.active.size)
        };
        let dirty = std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|p| p.into_inner()));
        for file in dirty {
            self.sync_file(&file)?;
        }
        self.synced.fetch_max(upto, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// `fdatasync` of one segment, or the error that poisons the log.
    fn sync_file(&self, file: &File) -> std::io::Result<()> {
        use std::sync::atomic::Ordering;
        if self.failed.load(Ordering::Acquire) {
            return Err(std::io::Error::other(Poisoned));
        }
        #[cfg(test)]
        let injected = self.fail_next_sync.swap(false, Ordering::AcqRel);
        #[cfg(not(test))]
        let injected = false;
        let injected =
            injected || (super::failpoint::is_armed("fsync-eio-on-file") && self.dir.join("fail-fsync").exists());
        let result = if injected {
            Err(std::io::Error::from_raw_os_error(libc::EIO))
        } else {
            file.sync_data()
        };
        if let Err(e) = result {
            self.failed.store(true, Ordering::Release);
            return Err(e);
        }
        Ok(())
    }

    /// Whether an fsync has failed (the log is poisoned).
    pub fn failed(&self) -> bool {
        self.failed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether the record at `loc` is on disk yet.
    pub fn is_durable(&self, loc: &BodyLoc) -> bool {
        let end = loc.offset + HEADER as u64 + u64::from(loc.len);
        position(loc.segment, end) <= self.synced.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Reads a record's payload and checks it against its location.
    pub fn read(&self, loc: &BodyLoc) -> std::io::Result<Vec<u8>> {
        let (file, legacy) = {
            let mut inner = self.lock();
            let legacy = inner.legacy.contains(&loc.segment);
            let file = match inner.open.get(&loc.segment) {
                Some(f) => Arc::clone(f),
                None => {
                    let f = Arc::new(File::open(segment_path(&self.dir, loc.segment))?);
                    inner.open.insert(loc.segment, Arc::clone(&f));
                    f
                }
            };
            (file, legacy)
        };
        let mut buf = vec![0u8; HEADER + loc.len as usize];
        file.read_exact_at(&mut buf, loc.offset)?;
        let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
        let crc = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
        let segment = (!legacy).then_some(loc.segment);
        if len != loc.len || crc != loc.crc || checksum(segment, &buf[8..HEADER], &buf[HEADER..]) != crc {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "write-ahead log record at {}:{} fails its checksum",
                    loc.segment, loc.offset
                ),
            ));
        }
        Ok(buf.split_off(HEADER))
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

/// Space reclamation. A segment is deleted once it is not the one being
/// written, no queued message's body is in it, and every group has purged
/// the entries it has there. The caller removes the files only after a
/// durable flush of the log and the state machines (see
/// [`super::Durability::reclaim`]).
impl Wal {
    /// References of one state machine, counted at its open.
    pub fn add_live(&self, live: HashMap<u64, i64>) {
        let mut inner = self.lock();
        for (seg, n) in live {
            *inner.live.entry(seg).or_default() += n;
        }
    }

    /// Every state machine on this node has counted its references.
    pub fn enable_reclaim(&self) {
        let mut inner = self.lock();
        inner.reclaim_enabled = true;
        inner.changed = true;
    }

    /// A message record now points into `segment`.
    pub fn retain(&self, segment: u64) {
        *self.lock().live.entry(segment).or_default() += 1;
    }

    /// A message record pointing into `segment` is gone.
    pub fn release(&self, segment: u64) {
        let mut inner = self.lock();
        *inner.live.entry(segment).or_default() -= 1;
        inner.changed = true;
    }

    /// `group`'s log entries up to `index` are purged.
    pub fn log_purged(&self, group: GroupId, index: u64) {
        let mut inner = self.lock();
        let p = inner.purged.entry(group).or_default();
        *p = (*p).max(index);
        inner.changed = true;
    }

    /// Segments that can go, forgotten here; [`Wal::retire`] each once the
    /// changes that freed them are on disk.
    pub(crate) fn take_reclaimable(&self) -> Vec<u64> {
        let mut inner = self.lock();
        if !inner.reclaim_enabled || !std::mem::take(&mut inner.changed) {
            return Vec::new();
        }
        let active = inner.active.seq;
        let doomed: Vec<u64> = inner
            .segments
            .iter()
            .copied()
            .filter(|seg| *seg < active && inner.live.get(seg).copied().unwrap_or(0) <= 0)
            .filter(|seg| {
                inner.log_max.get(seg).is_none_or(|groups| {
                    groups
                        .iter()
                        .all(|(g, max)| inner.purged.get(g).is_some_and(|p| max <= p))
                })
            })
            .collect();
        for seg in &doomed {
            inner.live.remove(seg);
            inner.log_max.remove(seg);
            inner.open.remove(seg);
            inner.segments.remove(seg);
        }
        doomed
    }

    /// Keeps a reclaimed segment's file as a spare for a later segment, or
    /// deletes it when there are spares enough (and always in the first
    /// format, whose records a later segment could not tell from its own).
    pub(crate) fn retire(&self, seq: u64) -> std::io::Result<()> {
        let path = segment_path(&self.dir, seq);
        let mut inner = self.lock();
        if inner.legacy.remove(&seq) || inner.spares.len() >= MAX_SPARES {
            drop(inner);
            return std::fs::remove_file(&path);
        }
        let spare = path.with_extension("spare");
        std::fs::rename(&path, &spare)?;
        inner.spares.push(spare);
        Ok(())
    }

    /// Spare segment files (for tests and metrics).
    pub fn spare_files(&self) -> usize {
        self.lock().spares.len()
    }

    /// The groups whose unpurged log entries hold closed segments other
    /// than the newest `keep`, each with the index to purge to so that they
    /// no longer do; and how many closed segments hold unpurged entries at
    /// all (segments held only by queued bodies do not count).
    pub fn log_pins(&self, keep: usize) -> (BTreeMap<GroupId, u64>, usize) {
        let inner = self.lock();
        let unpurged = |seg: &u64| {
            inner
                .log_max
                .get(seg)
                .into_iter()
                .flatten()
                .filter(|(group, max)| inner.purged.get(group).is_none_or(|p| *max > p))
        };
        let closed: Vec<u64> = inner.segments.range(..inner.active.seq).copied().collect();
        let mut pins = BTreeMap::new();
        for seg in &closed[..closed.len().saturating_sub(keep)] {
            for (group, max) in unpurged(seg) {
                let pin = pins.entry(*group).or_insert(0);
                *pin = (*pin).max(*max);
            }
        }
        let held = closed.iter().filter(|seg| unpurged(seg).next().is_some()).count();
        (pins, held)
    }

    /// The size of a segment.
    pub fn segment_bytes(&self) -> u64 {
        self.segment_bytes
    }
}

#[derive(Default)]
struct ReplayState {
    replayed: HashMap<GroupId, Replayed>,
    log_max: HashMap<u64, HashMap<GroupId, u64>>,
    purged: HashMap<GroupId, u64>,
    marks: BTreeMap<(GroupId, Kind), Vec<u8>>,
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:016x}.seg"))
}

/// Starts segment `seq` (of `limit` bytes) in a spare file if there is one,
/// else a new file.
fn new_segment(dir: &Path, seq: u64, spares: &mut Vec<PathBuf>, limit: u64) -> std::io::Result<Active> {
    let path = segment_path(dir, seq);
    let mut file = None;
    while file.is_none() {
        let Some(spare) = spares.pop() else { break };
        match std::fs::rename(&spare, &path).and_then(|()| OpenOptions::new().read(true).write(true).open(&path)) {
            Ok(f) => file = Some(f),
            Err(e) => tracing::warn!(spare = %spare.display(), error = %e, "cannot reuse a spare log segment"),
        }
    }
    let file = match file {
        Some(f) => f,
        None => OpenOptions::new().read(true).write(true).create_new(true).open(&path)?,
    };
    super::sync_dir(dir)?;
    Ok(Active {
        seq,
        allocated: file.metadata()?.len(),
        file: Arc::new(file),
        size: 0,
        limit,
    })
}

fn index_of(payload: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(payload.get(..8)?.try_into().ok()?))
}

/// What replaying one segment found.
struct SegmentReplay {
    /// The length of the good prefix, if a record after it fails its
    /// checks (a torn write, or a recycled file's old records).
    cut: Option<u64>,
    /// Written in the first format.
    legacy: bool,
}

/// Replays one segment into `state`.
fn replay_segment(path: &Path, seq: u64, state: &mut ReplayState) -> std::io::Result<SegmentReplay> {
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    let mut offset = 0u64;
    let mut header = [0u8; HEADER];
    let mut payload = Vec::new();
    // Known from the first record: `Kind::Segment` in this format, or a
    // record whose checksum has no segment number.
    let mut legacy = None;
    let cut = |offset, legacy: Option<bool>| SegmentReplay {
        cut: Some(offset),
        legacy: legacy.unwrap_or(false),
    };
    while offset < size {
        if offset + HEADER as u64 > size || reader.read_exact(&mut header).is_err() {
            return Ok(cut(offset, legacy));
        }
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let end = offset + HEADER as u64 + u64::from(len);
        if end > size {
            return Ok(cut(offset, legacy));
        }
        payload.resize(len as usize, 0);
        reader.read_exact(&mut payload)?;
        let kind = Kind::from_u8(header[8]);
        let format = legacy.unwrap_or_else(|| kind != Some(Kind::Segment));
        let Some(kind) = kind.filter(|_| checksum((!format).then_some(seq), &header[8..], &payload) == crc) else {
            return Ok(cut(offset, legacy));
        };
        legacy = Some(format);
        match kind {
            Kind::Segment => {
                offset = end;
                continue;
            }
            Kind::End => break,
            _ => {}
        }
        let mut g = [0u8; 8];
        g.copy_from_slice(&header[9..17]);
        let group = u64::from_le_bytes(g);
        let loc = BodyLoc {
            segment: seq,
            offset,
            len,
            crc,
        };
        state.apply(seq, kind, group, loc, &payload);
        offset = end;
    }
    Ok(SegmentReplay {
        cut: None,
        legacy: legacy.unwrap_or(false),
    })
}

impl ReplayState {
    fn refer(&mut self, seq: u64, group: GroupId, index: u64) {
        let max = self.log_max.entry(seq).or_default().entry(group).or_default();
        *max = (*max).max(index);
    }

    fn apply(&mut self, seq: u64, kind: Kind, group: GroupId, loc: BodyLoc, payload: &[u8]) {
        if Kind::MARKS.contains(&kind) {
            self.marks.insert((group, kind), payload.to_vec());
        }
        let g = self.replayed.entry(group).or_default();
        match kind {
            Kind::Body => {}
            Kind::Entry => {
                if let Some(index) = index_of(payload) {
                    g.index.place(index, loc);
                    self.refer(seq, group, index);
                }
            }
            Kind::Truncate => {
                if let Some(index) = index_of(payload) {
                    let last = g.index.next().saturating_sub(1);
                    g.index.truncate_from(index);
                    self.refer(seq, group, last);
                }
            }
            Kind::Purge => {
                if let Some(index) = index_of(payload) {
                    g.index.purge_to(index);
                    g.purged = Some(payload.to_vec());
                    let p = self.purged.entry(group).or_default();
                    *p = (*p).max(index);
                }
            }
            Kind::Vote => g.vote = Some(payload.to_vec()),
            Kind::Committed => g.committed = Some(payload.to_vec()),
            Kind::Segment | Kind::End => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn entry(index: u64, body: &[u8]) -> Vec<u8> {
        [&index.to_le_bytes()[..], body].concat()
    }

    #[test]
    fn replay_rebuilds_indexes_marks_and_truncations() {
        let dir = tempfile::tempdir().unwrap();
        let locs = {
            let wal = Wal::open(dir.path(), SEGMENT_BYTES).unwrap();
            let mut locs = Vec::new();
            for i in 1..=5 {
                locs.push(wal.write_one(Kind::Entry, 7, &entry(i, b"old")).unwrap());
            }
            wal.write_one(Kind::Entry, 8, &entry(1, b"other")).unwrap();
            wal.write_one(Kind::Truncate, 7, &3u64.to_le_bytes()).unwrap();
            locs.truncate(2);
            locs.push(wal.write_one(Kind::Entry, 7, &entry(3, b"new")).unwrap());
            wal.write_one(Kind::Vote, 7, b"v1").unwrap();
            wal.write_one(Kind::Vote, 7, b"v2").unwrap();
            wal.write_one(Kind::Purge, 7, &entry(1, b"p")).unwrap();
            wal.sync().unwrap();
            locs
        };
        let wal = Wal::open(dir.path(), SEGMENT_BYTES).unwrap();
        let g = wal.take_replayed(7);
        assert_eq!((g.index.first(), g.index.next()), (2, 4), "1 purged, 4 and 5 truncated");
        assert_eq!(g.index.get(2), Some(locs[1]));
        assert_eq!(g.index.get(3), Some(locs[2]));
        assert_eq!(wal.read(&locs[2]).unwrap(), entry(3, b"new"));
        assert_eq!(g.vote.as_deref(), Some(&b"v2"[..]));
        assert_eq!(g.purged.as_deref(), Some(&entry(1, b"p")[..]));
        assert_eq!(wal.take_replayed(8).index.next(), 2);
    }

    #[test]
    fn records_are_durable_only_after_a_sync() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path(), 64).unwrap();
        let first = wal.write_one(Kind::Body, 1, &[b'a'; 100]).unwrap();
        assert!(!wal.is_durable(&first));
        wal.sync().unwrap();
        assert!(wal.is_durable(&first));
        // The next write starts a new segment (past 64 bytes).
        let second = wal.write_one(Kind::Body, 1, b"b").unwrap();
        assert_eq!(second.segment, first.segment + 1);
        assert!(!wal.is_durable(&second));
        wal.sync().unwrap();
        assert!(wal.is_durable(&second));
    }

    #[test]
    fn torn_tail_is_cut_and_later_writes_replay() {
        let dir = tempfile::tempdir().unwrap();
        let torn = {
            let wal = Wal::open(dir.path(), SEGMENT_BYTES).unwrap();
            wal.write_one(Kind::Entry, 1, &entry(1, b"kept")).unwrap();
            let torn = wal.write_one(Kind::Entry, 1, &entry(2, b"torn")).unwrap();
            wal.sync().unwrap();
            torn
        };
        // Cut the last record's payload short, as a crash mid-write would.
        let seg = segment_path(dir.path(), 1);
        OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(torn.offset + HEADER as u64 + u64::from(torn.len) - 2)
            .unwrap();
        {
            let wal = Wal::open(dir.path(), SEGMENT_BYTES).unwrap();
            assert_eq!(wal.take_replayed(1).index.next(), 2, "only entry 1 survives");
            wal.write_one(Kind::Entry, 1, &entry(2, b"again")).unwrap();
            wal.sync().unwrap();
        }
        let wal = Wal::open(dir.path(), SEGMENT_BYTES).unwrap();
        let g = wal.take_replayed(1);
        assert_eq!(g.index.next(), 3);
        assert_eq!(wal.read(&g.index.get(2).unwrap()).unwrap(), entry(2, b"again"));
    }

    /// Writes entries `from..=to` of group 3 (one segment each at 64-byte
    /// segments), purges them and retires what can go.
    #[test]
    fn segments_are_filled_ahead_with_zeros_that_end_replay() {
        let dir = tempfile::tempdir().unwrap();
        let seg = segment_path(dir.path(), 1);
        let file_len = || std::fs::metadata(&seg).unwrap().len();
        let mut locs = Vec::new();
        {
            let wal = Wal::open(dir.path(), SEGMENT_BYTES).unwrap();
            locs.push(wal.write_one(Kind::Entry, 1, &entry(1, b"small")).unwrap());
            let end = locs[0].offset + HEADER as u64 + u64::from(locs[0].len);
            assert!(
                file_len() >= end + PREALLOC,
                "{} bytes for a {end}-byte log",
                file_len()
            );
            // A record past the zeros: they are extended first, never over records.
            let big = vec![b'x'; (PREALLOC + PREALLOC / 2) as usize];
            locs.push(wal.write_one(Kind::Entry, 1, &entry(2, &big)).unwrap());
            locs.push(wal.write_one(Kind::Entry, 1, &entry(3, b"after")).unwrap());
            let end = locs[2].offset + HEADER as u64 + u64::from(locs[2].len);
            assert!(file_len() > end, "zeros ahead");
            assert_eq!(file_len() % PREALLOC, 0);
            assert_eq!(wal.read(&locs[0]).unwrap(), entry(1, b"small"));
            assert_eq!(wal.read(&locs[1]).unwrap(), entry(2, &big));
            wal.sync().unwrap();
        }
        // After a crash the zeros are where the log ends.
        {
            let wal = Wal::open(dir.path(), SEGMENT_BYTES).unwrap();
            let g = wal.take_replayed(1);
            assert_eq!(g.index.next(), 4);
            assert_eq!(wal.read(&g.index.get(3).unwrap()).unwrap(), entry(3, b"after"));
            wal.write_one(Kind::Entry, 1, &entry(4, b"next")).unwrap();
            wal.sync().unwrap();
        }
        let wal = Wal::open(dir.path(), SEGMENT_BYTES).unwrap();
        assert_eq!(wal.take_replayed(1).index.next(), 5);
    }

    #[test]
    fn damage_before_the_last_segment_stops_the_open() {
        let dir = tempfile::tempdir().unwrap();
        let damaged = {
            let wal = Wal::open(dir.path(), 64).unwrap();
            let first = wal.write_one(Kind::Entry, 1, &entry(1, &[b'a'; 80])).unwrap();
            // Past 64 bytes: the next write rotates to a new segment.
            wal.write_one(Kind::Entry, 1, &entry(2, &[b'b'; 80])).unwrap();
            wal.sync().unwrap();
            first
        };
        // Flip a payload byte of a record in the older segment.
        let seg = segment_path(dir.path(), damaged.segment);
        let mut bytes = std::fs::read(&seg).unwrap();
        bytes[(damaged.offset + HEADER as u64 + 9) as usize] ^= 0xff;
        std::fs::write(&seg, bytes).unwrap();
        let Err(err) = Wal::open(dir.path(), 64) else {
            panic!("a damaged log opened");
        };
        let OpenError::Damaged(damaged) = &err else {
            panic!("not a Damaged error: {err}");
        };
        assert_eq!(damaged.path, seg);
        assert!(err.to_string().contains("data directory"), "{err}");
        assert_eq!(files_ending(dir.path(), ".corrupt"), 0, "nothing renamed or cut");
    }

    #[test]
    fn a_newest_segment_that_lost_everything_is_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let first = {
            let wal = Wal::open(dir.path(), 64).unwrap();
            let first = wal.write_one(Kind::Entry, 1, &entry(1, &[b'a'; 80])).unwrap();
            // Rotates: the old segment is synced whole first.
            wal.write_one(Kind::Entry, 1, &entry(2, &[b'b'; 80])).unwrap();
            first
        };
        // A power cut before the new segment's first sync: its file exists
        // (its directory entry was synced) but holds nothing.
        std::fs::write(segment_path(dir.path(), first.segment + 1), b"").unwrap();
        let wal = Wal::open(dir.path(), 64).unwrap();
        assert_eq!(
            wal.take_replayed(1).index.next(),
            2,
            "entry 1 stays, 2 was never synced"
        );
    }

    #[test]
    fn a_failed_fsync_poisons_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path(), SEGMENT_BYTES).unwrap();
        let loc = wal.write_one(Kind::Body, 1, b"lost?").unwrap();
        wal.fail_next_sync.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(wal.sync().is_err());
        assert!(wal.failed());
        // The disk works again, but the kernel may have dropped the pages
        // it failed to write: nothing before the failure counts.
        assert!(wal.sync().is_err(), "a later sync does not succeed");
        assert!(!wal.is_durable(&loc));
        let later = wal.write_one(Kind::Body, 1, b"later").unwrap();
        assert!(wal.sync().is_err());
        assert!(!wal.is_durable(&later));
    }

    fn fill_and_reclaim(wal: &Wal, from: u64, to: u64) {
        for i in from..=to {
            wal.write_one(Kind::Entry, 3, &entry(i, &[b'x'; 200])).unwrap();
        }
        wal.write_one(Kind::Purge, 3, &entry(to, b"p")).unwrap();
        wal.log_purged(3, to);
        wal.sync().unwrap();
        for seq in wal.take_reclaimable() {
            wal.retire(seq).unwrap();
        }
    }

    /// Files in `dir` whose name ends with `suffix`.
    fn files_ending(dir: &Path, suffix: &str) -> usize {
        std::fs::read_dir(dir)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(suffix))
            .count()
    }

    #[test]
    fn recycled_segments_replay_only_their_own_records() {
        let dir = tempfile::tempdir().unwrap();
        let kept = {
            let wal = Wal::open(dir.path(), 64).unwrap();
            wal.enable_reclaim();
            fill_and_reclaim(&wal, 1, 6);
            assert_eq!(wal.spare_files(), MAX_SPARES, "two kept, the rest deleted");
            assert_eq!(files_ending(dir.path(), ".spare"), MAX_SPARES);
            // Short records now go into the recycled (longer) files.
            let mut kept = Vec::new();
            for i in 7..=8 {
                kept.push(wal.write_one(Kind::Entry, 3, &entry(i, b"new")).unwrap());
            }
            assert!(wal.spare_files() < MAX_SPARES, "spares reused");
            wal.sync().unwrap();
            kept
        };
        let wal = Wal::open(dir.path(), 64).unwrap();
        let g = wal.take_replayed(3);
        assert_eq!(
            (g.index.first(), g.index.next()),
            (7, 9),
            "old records in recycled files are not replayed"
        );
        assert_eq!(g.index.get(7), Some(kept[0]));
        assert_eq!(wal.read(&kept[1]).unwrap(), entry(8, b"new"));
        assert_eq!(files_ending(dir.path(), ".corrupt"), 0, "no segment was set aside");
    }

    #[test]
    fn log_pins_name_the_groups_holding_old_segments() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path(), 64).unwrap();
        // One entry per segment (64-byte segments): 1 and 2 of group 3, 1
        // of group 4, then a body that a queued message keeps.
        let append = |group: GroupId, index: u64| {
            wal.write(|b| {
                b.push(Kind::Entry, group, &entry(index, &[b'x'; 80]))?;
                b.refer(group, index);
                Ok(())
            })
            .unwrap()
        };
        append(3, 1);
        append(3, 2);
        append(4, 1);
        let body = wal.write_one(Kind::Body, 3, &[b'b'; 80]).unwrap();
        wal.retain(body.segment);
        append(3, 3);
        let (pins, held) = wal.log_pins(1);
        assert_eq!(
            pins,
            BTreeMap::from([(3, 2), (4, 1)]),
            "all but the newest closed segment"
        );
        assert_eq!(held, 3, "the body's segment holds no entry");
        wal.log_purged(3, 3);
        wal.log_purged(4, 1);
        assert_eq!(wal.log_pins(0), (BTreeMap::new(), 0), "a kept body does not pin logs");
    }

    #[test]
    fn spare_files_on_disk_are_the_spares_kept() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path(), 64).unwrap();
        wal.enable_reclaim();
        for round in 0..6 {
            fill_and_reclaim(&wal, round * 5 + 1, round * 5 + 5);
            let on_disk = files_ending(dir.path(), ".spare");
            assert_eq!(on_disk, wal.spare_files(), "round {round}");
            assert!(on_disk <= MAX_SPARES);
        }
    }

    #[test]
    fn a_recycled_files_old_records_fail_their_checksum() {
        let dir = tempfile::tempdir().unwrap();
        // Segment 5 in a file that held segment 2, whose records follow on
        // at a record boundary.
        let mut new = Batch::new(5, 0);
        new.push(Kind::Segment, 0, &5u64.to_le_bytes()).unwrap();
        new.push(Kind::Entry, 3, &entry(10, b"new")).unwrap();
        let mut old = Batch::new(2, new.buf.len() as u64);
        old.push(Kind::Entry, 3, &entry(11, b"old")).unwrap();
        old.push(Kind::Entry, 3, &entry(12, b"old")).unwrap();
        std::fs::write(segment_path(dir.path(), 5), [new.buf, old.buf].concat()).unwrap();
        let wal = Wal::open(dir.path(), SEGMENT_BYTES).unwrap();
        let g = wal.take_replayed(3);
        assert_eq!((g.index.first(), g.index.next()), (10, 11));
    }

    #[test]
    fn first_format_segments_are_read_and_never_recycled() {
        let dir = tempfile::tempdir().unwrap();
        // A segment as the first format wrote it: checksums without the
        // segment number, no Segment record.
        let body = b"old body".to_vec();
        let mut file = Vec::new();
        let mut record = |kind: Kind, group: u64, payload: &[u8]| {
            let offset = file.len() as u64;
            let mut head = [0u8; 9];
            head[0] = kind as u8;
            head[1..].copy_from_slice(&group.to_le_bytes());
            let crc = checksum(None, &head, payload);
            file.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            file.extend_from_slice(&crc.to_le_bytes());
            file.extend_from_slice(&head);
            file.extend_from_slice(payload);
            BodyLoc {
                segment: 1,
                offset,
                len: payload.len() as u32,
                crc,
            }
        };
        record(Kind::Vote, 3, b"vote");
        let loc = record(Kind::Body, 3, &body);
        record(Kind::Entry, 3, &entry(1, b"e"));
        std::fs::write(segment_path(dir.path(), 1), &file).unwrap();

        let wal = Wal::open(dir.path(), 64).unwrap();
        let g = wal.take_replayed(3);
        assert_eq!(g.vote.as_deref(), Some(&b"vote"[..]));
        assert_eq!(g.index.next(), 2);
        assert_eq!(wal.read(&loc).unwrap(), body);
        wal.enable_reclaim();
        fill_and_reclaim(&wal, 2, 3);
        assert!(!segment_path(dir.path(), 1).exists());
        assert!(
            !dir.path().join("0000000000000001.spare").exists(),
            "a first-format segment is deleted, not kept"
        );
    }

    #[test]
    fn marks_survive_reclaiming_old_segments() {
        let dir = tempfile::tempdir().unwrap();
        {
            let wal = Wal::open(dir.path(), 64).unwrap();
            wal.write_one(Kind::Vote, 3, b"vote").unwrap();
            for i in 1..=4 {
                wal.write_one(Kind::Entry, 3, &entry(i, &[b'x'; 80])).unwrap();
            }
            wal.write_one(Kind::Purge, 3, &entry(4, b"p")).unwrap();
            wal.log_purged(3, 4);
            wal.enable_reclaim();
            wal.sync().unwrap();
            let doomed = wal.take_reclaimable();
            assert!(!doomed.is_empty());
            for seq in doomed {
                wal.retire(seq).unwrap();
            }
        }
        let wal = Wal::open(dir.path(), 64).unwrap();
        let g = wal.take_replayed(3);
        assert_eq!(g.vote.as_deref(), Some(&b"vote"[..]));
        assert!(g.index.is_empty());
        assert_eq!(g.index.next(), 5);
    }
}
