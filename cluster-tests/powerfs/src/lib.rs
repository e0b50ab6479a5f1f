//! A FUSE pass-through file system that loses what was never made durable,
//! the way LazyFS (used by Jepsen) does, so that a test can cut the power
//! under a process and see only what it fsynced.
//!
//! # The model
//!
//! Everything lives in a backing directory; the mount shows it. Two kinds of
//! change are held back until they are made durable:
//!
//! * **File data.** A write goes to an in-memory overlay of 4 KiB pages over
//!   the backing file, plus the file's pending size (writes that extend it,
//!   truncates through `setattr` or `O_TRUNC`). Reads see the overlay. Only
//!   `fsync`/`fdatasync` of that file writes its overlay (and size) to the
//!   backing file and fsyncs it. `sync_file_range`, `syncfs` and `close` make
//!   nothing durable.
//! * **Directory entries.** `create`/`mknod`/`mkdir`, `unlink`/`rmdir` and
//!   `rename` happen at once in the backing directory, and each is recorded
//!   in one undo log, tagged with its directory (for a rename: the
//!   destination's directory). An unlinked or replaced entry is moved into a
//!   hidden trash (`.powerfs-trash/` at the backing root, invisible in the
//!   mount) rather than deleted. `fsync` of a directory makes its entries
//!   durable: they leave the undo log and their trash is deleted for real.
//!
//! A **power cut** ([`Control::cut`]) drops every file's overlay, then undoes
//! the undo log newest first: created entries are removed (a created
//! directory with everything in it), renames are moved back (and a replaced
//! target restored), unlinked entries come back from the trash. With `tear`,
//! before the overlay is dropped, the oldest unsynced write of each file that
//! crosses a 4 KiB boundary (one FUSE write request, at most `max_write`
//! bytes) is kept up to a boundary chosen at random inside it and written to
//! the backing file: a torn write. Writes within one 4 KiB page are taken as
//! atomic (dropped whole), so files whose unsynced writes are all small are
//! not torn.
//!
//! Not modelled: hard links and symlinks (refused with `EPERM`), extended
//! attributes (`ENOSYS`), `fallocate` (`ENOSYS`, so callers fall back to
//! writes), `RENAME_EXCHANGE` (`EINVAL`); metadata (mode, owner, times) is
//! passed through and is always durable. An undo that fails (for example
//! because a later durable rename moved the entry away) is skipped and
//! counted in `undo_errors`. Stopping the daemon is not a power cut: unsynced
//! data is lost, directory changes stay, and the next start empties the
//! trash.
//!
//! `settle` ([`Control::settle`]) is the opposite of a cut: it makes every
//! overlay and directory change durable, as the kernel's periodic writeback
//! would given a few seconds. Tests use it only to look past a known missing
//! fsync (it hides that defect).
//!
//! The kernel page cache never holds file data: every open is answered with
//! `FOPEN_DIRECT_IO`, the writeback cache is not requested, and attributes
//! and entries are cached for zero seconds, so after a cut the kernel sees
//! the backing state at once.

pub mod mount;

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirEntryExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use rand::Rng;

/// Page size of the overlay and granularity of torn writes.
pub const PAGE: u64 = 4096;
/// Name of the hidden trash directory at the backing root.
pub const TRASH: &str = ".powerfs-trash";
/// Attributes and entries are never cached by the kernel (see module doc).
const TTL: Duration = Duration::ZERO;

/// Counts returned by a power cut.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CutReport {
    /// Bytes written since the last fsync of their file, now gone.
    pub dropped_bytes: u64,
    /// Write requests dropped.
    pub dropped_writes: u64,
    /// Files whose oldest unsynced write was kept in part.
    pub torn_files: u64,
    /// Directory changes undone.
    pub undone_entries: u64,
    /// Undo steps that failed and were skipped.
    pub undo_errors: u64,
}

impl std::fmt::Display for CutReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "dropped_bytes={} dropped_writes={} torn_files={} undone_entries={} undo_errors={}",
            self.dropped_bytes, self.dropped_writes, self.torn_files, self.undone_entries, self.undo_errors
        )
    }
}

/// What a `status` command reports.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Status {
    /// Files with unsynced data.
    pub dirty_files: u64,
    /// Unsynced bytes written (sum of write sizes).
    pub dirty_bytes: u64,
    /// Directory changes not yet durable.
    pub pending_entries: u64,
    /// Power cuts so far.
    pub cuts: u64,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "dirty_files={} dirty_bytes={} pending_entries={} cuts={}",
            self.dirty_files, self.dirty_bytes, self.pending_entries, self.cuts
        )
    }
}

/// A directory change that a power cut undoes unless its directory was fsynced.
#[derive(Debug)]
enum DirOp {
    Created {
        dir: u64,
        path: PathBuf,
    },
    Removed {
        dir: u64,
        path: PathBuf,
        trash: PathBuf,
    },
    Renamed {
        dir: u64,
        from: PathBuf,
        to: PathBuf,
        replaced: Option<PathBuf>,
    },
}

impl DirOp {
    fn dir(&self) -> u64 {
        match self {
            DirOp::Created { dir, .. } | DirOp::Removed { dir, .. } | DirOp::Renamed { dir, .. } => *dir,
        }
    }
}

/// A known inode: where it is in the backing directory now.
#[derive(Debug)]
struct Node {
    /// Path relative to the backing root.
    path: PathBuf,
    /// Backing inode number, to forget the mapping when the entry dies.
    backing_ino: u64,
}

/// Unsynced state of one regular file.
#[derive(Debug)]
struct Overlay {
    file: Arc<File>,
    /// Size of the backing file (only this process changes it).
    backing_len: u64,
    /// Backing bytes at or past this offset are stale (a truncate cut them).
    low: u64,
    /// Logical size the mount shows.
    size: u64,
    /// Full pages that differ from the backing file.
    pages: BTreeMap<u64, Box<[u8]>>,
    /// Oldest unsynced write that crosses a 4 KiB boundary, for a torn write at a cut.
    first_write: Option<(u64, Vec<u8>)>,
    dirty_bytes: u64,
    dirty_writes: u64,
    /// Open handles; the backing fd is closed when this is 0 and nothing is dirty.
    opens: u64,
}

impl Overlay {
    fn new(file: File) -> io::Result<Overlay> {
        let len = file.metadata()?.len();
        Ok(Overlay {
            file: Arc::new(file),
            backing_len: len,
            low: len,
            size: len,
            pages: BTreeMap::new(),
            first_write: None,
            dirty_bytes: 0,
            dirty_writes: 0,
            opens: 0,
        })
    }

    fn is_dirty(&self) -> bool {
        !self.pages.is_empty() || self.size != self.backing_len || self.low != self.backing_len
    }

    /// Reads `buf.len()` bytes at `offset` as the backing file holds them,
    /// with zeros past the valid backing range.
    fn read_backing(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        buf.fill(0);
        let valid = self.low.min(self.backing_len);
        if offset >= valid {
            return Ok(());
        }
        let n = ((valid - offset) as usize).min(buf.len());
        let mut done = 0;
        while done < n {
            let r = self.file.read_at(&mut buf[done..n], offset + done as u64)?;
            if r == 0 {
                break;
            }
            done += r;
        }
        Ok(())
    }

    fn read(&self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        if offset >= self.size {
            return Ok(Vec::new());
        }
        let end = (offset + u64::from(len)).min(self.size);
        let mut buf = vec![0u8; (end - offset) as usize];
        self.read_backing(offset, &mut buf)?;
        for (&page, data) in self.pages.range(offset / PAGE..=(end - 1) / PAGE) {
            let start = page * PAGE;
            let from = start.max(offset);
            let to = (start + PAGE).min(end);
            buf[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&data[(from - start) as usize..(to - start) as usize]);
        }
        Ok(buf)
    }

    fn page_mut(&mut self, page: u64, whole: bool) -> io::Result<&mut Box<[u8]>> {
        if !self.pages.contains_key(&page) {
            let mut data = vec![0u8; PAGE as usize].into_boxed_slice();
            if !whole {
                self.read_backing(page * PAGE, &mut data)?;
                // Bytes past the logical size read as zeros even if the backing has them.
                if self.size < (page + 1) * PAGE {
                    let keep = self.size.saturating_sub(page * PAGE) as usize;
                    data[keep..].fill(0);
                }
            }
            self.pages.insert(page, data);
        }
        self.pages
            .get_mut(&page)
            .ok_or_else(|| io::Error::other("page vanished"))
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let end = offset + data.len() as u64;
        for page in offset / PAGE..=(end - 1) / PAGE {
            let start = page * PAGE;
            let from = start.max(offset);
            let to = (start + PAGE).min(end);
            let whole = from == start && to == start + PAGE;
            let buf = self.page_mut(page, whole)?;
            buf[(from - start) as usize..(to - start) as usize]
                .copy_from_slice(&data[(from - offset) as usize..(to - offset) as usize]);
        }
        self.size = self.size.max(end);
        // Only a write that crosses a 4 KiB boundary can be torn (a page is
        // taken as written whole or not at all).
        if self.first_write.is_none() && offset / PAGE != (end - 1) / PAGE {
            self.first_write = Some((offset, data.to_vec()));
        }
        self.dirty_bytes += data.len() as u64;
        self.dirty_writes += 1;
        Ok(())
    }

    fn truncate(&mut self, size: u64) -> io::Result<()> {
        if size < self.size {
            let first_gone = size.div_ceil(PAGE);
            self.pages.retain(|&p, _| p < first_gone);
            if !size.is_multiple_of(PAGE) {
                let page = size / PAGE;
                let cut = (size % PAGE) as usize;
                self.page_mut(page, false)?[cut..].fill(0);
            }
            self.low = self.low.min(size);
        }
        self.size = size;
        self.dirty_writes += 1;
        Ok(())
    }

    /// Makes the overlay durable: size first, then pages, then fsync.
    fn sync(&mut self, datasync: bool) -> io::Result<()> {
        if self.low < self.backing_len {
            self.file.set_len(self.low)?;
        }
        if self.size != self.low.min(self.backing_len) {
            self.file.set_len(self.size)?;
        }
        for (&page, data) in &self.pages {
            let start = page * PAGE;
            if start >= self.size {
                continue;
            }
            let n = (self.size - start).min(PAGE) as usize;
            self.file.write_all_at(&data[..n], start)?;
        }
        if datasync {
            self.file.sync_data()?;
        } else {
            self.file.sync_all()?;
        }
        self.pages.clear();
        self.backing_len = self.size;
        self.low = self.size;
        self.first_write = None;
        self.dirty_bytes = 0;
        self.dirty_writes = 0;
        Ok(())
    }

    /// Writes a random 4 KiB-aligned prefix of the oldest unsynced write to
    /// the backing file. Returns whether anything was kept.
    fn tear(&mut self) -> io::Result<bool> {
        let Some((offset, data)) = self.first_write.take() else {
            return Ok(false);
        };
        let end = offset + data.len() as u64;
        let first = (offset / PAGE + 1) * PAGE;
        if first >= end {
            return Ok(false);
        }
        let last = (end - 1) / PAGE * PAGE;
        let boundaries = (last - first) / PAGE + 1;
        let cut = first + rand::thread_rng().gen_range(0..boundaries) * PAGE;
        self.file.write_all_at(&data[..(cut - offset) as usize], offset)?;
        self.file.sync_all()?;
        Ok(true)
    }
}

/// Everything the file system knows, behind one lock.
#[derive(Debug)]
struct State {
    root: PathBuf,
    nodes: HashMap<u64, Node>,
    by_backing: HashMap<u64, u64>,
    next_ino: u64,
    overlays: HashMap<u64, Overlay>,
    undo: Vec<DirOp>,
    trash_seq: u64,
    cuts: u64,
}

fn errno(e: &io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc_eio()))
}

const fn libc_eio() -> i32 {
    5
}

fn kind_of(ft: fs::FileType) -> FileType {
    FileType::from_std(ft).unwrap_or(FileType::RegularFile)
}

impl State {
    fn abs(&self, rel: &Path) -> PathBuf {
        self.root.join(rel)
    }

    fn path_of(&self, ino: u64) -> Result<PathBuf, Errno> {
        self.nodes.get(&ino).map(|n| n.path.clone()).ok_or(Errno::ENOENT)
    }

    fn child(&self, parent: u64, name: &OsStr) -> Result<PathBuf, Errno> {
        if parent == INodeNo::ROOT.0 && name == TRASH {
            return Err(Errno::ENOENT);
        }
        Ok(self.path_of(parent)?.join(name))
    }

    /// The FUSE inode for a backing inode found at `rel`; refreshes its path.
    fn intern(&mut self, backing_ino: u64, rel: PathBuf) -> u64 {
        if rel.as_os_str().is_empty() {
            return INodeNo::ROOT.0;
        }
        let ino = match self.by_backing.get(&backing_ino) {
            Some(&ino) => ino,
            None => {
                let ino = self.next_ino;
                self.next_ino += 1;
                self.by_backing.insert(backing_ino, ino);
                ino
            }
        };
        self.nodes.insert(ino, Node { path: rel, backing_ino });
        ino
    }

    fn attr(&mut self, rel: PathBuf) -> io::Result<FileAttr> {
        let md = fs::symlink_metadata(self.abs(&rel))?;
        let ino = self.intern(md.ino(), rel);
        let mut size = md.len();
        if let Some(o) = self.overlays.get(&ino) {
            size = o.size;
        }
        let time = |s: i64, ns: i64| {
            if s >= 0 {
                SystemTime::UNIX_EPOCH + Duration::new(s as u64, ns as u32)
            } else {
                SystemTime::UNIX_EPOCH
            }
        };
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: time(md.atime(), md.atime_nsec()),
            mtime: time(md.mtime(), md.mtime_nsec()),
            ctime: time(md.ctime(), md.ctime_nsec()),
            crtime: SystemTime::UNIX_EPOCH,
            kind: kind_of(md.file_type()),
            perm: (md.mode() & 0o7777) as u16,
            nlink: md.nlink() as u32,
            uid: md.uid(),
            gid: md.gid(),
            rdev: md.rdev() as u32,
            blksize: PAGE as u32,
            flags: 0,
        })
    }

    fn overlay(&mut self, ino: u64) -> io::Result<&mut Overlay> {
        if !self.overlays.contains_key(&ino) {
            let path = self.path_of(ino).map_err(|_| io::Error::from_raw_os_error(2))?;
            let abs = self.abs(&path);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&abs)
                .or_else(|_| File::open(&abs))?;
            self.overlays.insert(ino, Overlay::new(file)?);
        }
        self.overlays
            .get_mut(&ino)
            .ok_or_else(|| io::Error::other("overlay vanished"))
    }

    /// Forgets every inode at or under `rel` (its entry is gone for real).
    fn forget_under(&mut self, rel: &Path) {
        let gone: Vec<u64> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.path.starts_with(rel))
            .map(|(&i, _)| i)
            .collect();
        for ino in gone {
            if let Some(n) = self.nodes.remove(&ino) {
                self.by_backing.remove(&n.backing_ino);
            }
            self.overlays.remove(&ino);
        }
    }

    /// Follows a move of `from` to `to` in the inode table.
    fn repath(&mut self, from: &Path, to: &Path) {
        for n in self.nodes.values_mut() {
            if let Ok(rest) = n.path.strip_prefix(from) {
                n.path = if rest.as_os_str().is_empty() {
                    to.to_path_buf()
                } else {
                    to.join(rest)
                };
            }
        }
    }

    fn trash_path(&mut self) -> PathBuf {
        self.trash_seq += 1;
        Path::new(TRASH).join(format!("{}", self.trash_seq))
    }

    /// Moves `rel` into the trash (an unlink that a cut can undo).
    fn move_to_trash(&mut self, rel: &Path) -> io::Result<PathBuf> {
        let trash = self.trash_path();
        fs::rename(self.abs(rel), self.abs(&trash))?;
        self.repath(rel, &trash);
        Ok(trash)
    }

    fn delete(&mut self, rel: &Path) -> io::Result<()> {
        let abs = self.abs(rel);
        let md = fs::symlink_metadata(&abs)?;
        self.forget_under(rel);
        if md.is_dir() {
            fs::remove_dir_all(abs)
        } else {
            fs::remove_file(abs)
        }
    }

    /// Makes the directory entries of `dir` durable.
    fn sync_dir(&mut self, dir: u64) -> io::Result<()> {
        let path = self.path_of(dir).map_err(|_| io::Error::from_raw_os_error(2))?;
        File::open(self.abs(&path))?.sync_all()?;
        let (durable, pending): (Vec<DirOp>, Vec<DirOp>) = std::mem::take(&mut self.undo)
            .into_iter()
            .partition(|op| op.dir() == dir);
        tracing::trace!(path = %path.display(), durable = durable.len(), "fsyncdir");
        self.undo = pending;
        for op in durable {
            let trash = match op {
                DirOp::Removed { trash, .. } => Some(trash),
                DirOp::Renamed { replaced, .. } => replaced,
                DirOp::Created { .. } => None,
            };
            if let Some(trash) = trash {
                if let Err(e) = self.delete(&trash) {
                    tracing::warn!(path = %trash.display(), error = %e, "could not empty trash entry");
                }
            }
        }
        Ok(())
    }

    fn cut(&mut self, tear: bool) -> CutReport {
        let mut report = CutReport::default();
        let overlays: Vec<(u64, Overlay)> = self.overlays.drain().collect();
        for (ino, mut o) in overlays {
            if o.is_dirty() {
                let path = self
                    .nodes
                    .get(&ino)
                    .map(|n| n.path.display().to_string())
                    .unwrap_or_default();
                tracing::debug!(
                    path,
                    bytes = o.dirty_bytes,
                    writes = o.dirty_writes,
                    size = o.size,
                    durable_size = o.backing_len,
                    "dropped"
                );
            }
            if tear {
                match o.tear() {
                    Ok(true) => report.torn_files += 1,
                    Ok(false) => {}
                    Err(e) => tracing::warn!(ino, error = %e, "torn write failed"),
                }
            }
            report.dropped_bytes += o.dirty_bytes;
            report.dropped_writes += o.dirty_writes;
        }
        let undo = std::mem::take(&mut self.undo);
        for op in undo.into_iter().rev() {
            report.undone_entries += 1;
            let result = match &op {
                DirOp::Created { path, .. } => self.delete(path),
                DirOp::Removed { path, trash, .. } => {
                    fs::rename(self.abs(trash), self.abs(path)).map(|()| self.repath(trash, path))
                }
                DirOp::Renamed { from, to, replaced, .. } => fs::rename(self.abs(to), self.abs(from)).and_then(|()| {
                    self.repath(to, from);
                    match replaced {
                        Some(t) => fs::rename(self.abs(t), self.abs(to)).map(|()| self.repath(t, to)),
                        None => Ok(()),
                    }
                }),
            };
            tracing::debug!(op = ?op, ok = result.is_ok(), "undone");
            if let Err(e) = result {
                report.undo_errors += 1;
                tracing::warn!(op = ?op, error = %e, "undo failed");
            }
        }
        self.cuts += 1;
        report
    }

    /// Makes everything durable, as the kernel's periodic writeback would
    /// given time: every overlay written and fsynced, every directory change
    /// kept (trash emptied). Returns how many files and entries it settled.
    fn settle(&mut self) -> io::Result<(u64, u64)> {
        let mut files = 0;
        for o in self.overlays.values_mut() {
            if o.is_dirty() {
                o.sync(false)?;
                files += 1;
            }
        }
        let undo = std::mem::take(&mut self.undo);
        let entries = undo.len() as u64;
        for op in undo {
            let trash = match op {
                DirOp::Removed { trash, .. } => Some(trash),
                DirOp::Renamed { replaced, .. } => replaced,
                DirOp::Created { .. } => None,
            };
            if let Some(trash) = trash {
                let _ = self.delete(&trash);
            }
        }
        nix::unistd::sync();
        Ok((files, entries))
    }

    fn status(&self) -> Status {
        Status {
            dirty_files: self.overlays.values().filter(|o| o.is_dirty()).count() as u64,
            dirty_bytes: self.overlays.values().map(|o| o.dirty_bytes).sum(),
            pending_entries: self.undo.len() as u64,
            cuts: self.cuts,
        }
    }
}

/// The file system handed to fuser.
pub struct PowerFs {
    state: Arc<Mutex<State>>,
}

/// Commands to a mounted [`PowerFs`] from another thread.
#[derive(Clone)]
pub struct Control {
    state: Arc<Mutex<State>>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panic in one FUSE handler must not wedge the others.
    state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Control {
    /// Simulates a power cut: drops unsynced data, undoes non-durable entries.
    pub fn cut(&self, tear: bool) -> CutReport {
        lock(&self.state).cut(tear)
    }

    /// Makes everything durable now (not a power cut: the opposite). Returns
    /// (files synced, directory entries kept).
    pub fn settle(&self) -> io::Result<(u64, u64)> {
        lock(&self.state).settle()
    }

    /// Counts what a cut would drop now.
    pub fn status(&self) -> Status {
        lock(&self.state).status()
    }
}

impl PowerFs {
    /// A file system over `backing`; empties a trash left by an earlier run.
    pub fn new(backing: &Path) -> io::Result<(PowerFs, Control)> {
        let root = backing.canonicalize()?;
        let trash = root.join(TRASH);
        if trash.exists() {
            fs::remove_dir_all(&trash)?;
        }
        fs::create_dir(&trash)?;
        File::open(&root)?.sync_all()?;
        let md = fs::metadata(&root)?;
        let mut nodes = HashMap::new();
        nodes.insert(
            INodeNo::ROOT.0,
            Node {
                path: PathBuf::new(),
                backing_ino: md.ino(),
            },
        );
        let state = State {
            root,
            nodes,
            by_backing: HashMap::new(),
            next_ino: INodeNo::ROOT.0 + 1,
            overlays: HashMap::new(),
            undo: Vec::new(),
            trash_seq: 0,
            cuts: 0,
        };
        let state = Arc::new(Mutex::new(state));
        Ok((PowerFs { state: state.clone() }, Control { state }))
    }

    fn st(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn new_entry(
        &self,
        parent: INodeNo,
        name: &OsStr,
        make: impl FnOnce(&Path) -> io::Result<()>,
    ) -> Result<FileAttr, Errno> {
        let mut st = self.st();
        let rel = st.child(parent.0, name)?;
        let abs = st.abs(&rel);
        if fs::symlink_metadata(&abs).is_ok() {
            return Err(Errno::EEXIST);
        }
        make(&abs).map_err(|e| errno(&e))?;
        st.undo.push(DirOp::Created {
            dir: parent.0,
            path: rel.clone(),
        });
        st.attr(rel).map_err(|e| errno(&e))
    }

    fn remove(&self, parent: INodeNo, name: &OsStr, dir: bool) -> Result<(), Errno> {
        let mut st = self.st();
        let rel = st.child(parent.0, name)?;
        let abs = st.abs(&rel);
        let md = fs::symlink_metadata(&abs).map_err(|e| errno(&e))?;
        if dir != md.is_dir() {
            return Err(if dir { Errno::ENOTDIR } else { Errno::EISDIR });
        }
        if dir && fs::read_dir(&abs).map_err(|e| errno(&e))?.next().is_some() {
            return Err(Errno::ENOTEMPTY);
        }
        let trash = st.move_to_trash(&rel).map_err(|e| errno(&e))?;
        st.undo.push(DirOp::Removed {
            dir: parent.0,
            path: rel,
            trash,
        });
        Ok(())
    }
}

impl Filesystem for PowerFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Larger write requests mean fewer round trips; the kernel caps it.
        let _ = config.set_max_write(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let mut st = self.st();
        match st
            .child(parent.0, name)
            .and_then(|rel| st.attr(rel).map_err(|e| errno(&e)))
        {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let mut st = self.st();
        match st.path_of(ino.0).and_then(|rel| st.attr(rel).map_err(|e| errno(&e))) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut st = self.st();
        let result = (|| -> Result<FileAttr, Errno> {
            let rel = st.path_of(ino.0)?;
            let abs = st.abs(&rel);
            if let Some(mode) = mode {
                fs::set_permissions(&abs, fs::Permissions::from_mode(mode & 0o7777)).map_err(|e| errno(&e))?;
            }
            if uid.is_some() || gid.is_some() {
                std::os::unix::fs::lchown(&abs, uid, gid).map_err(|e| errno(&e))?;
            }
            if let Some(size) = size {
                st.overlay(ino.0)
                    .and_then(|o| o.truncate(size))
                    .map_err(|e| errno(&e))?;
            }
            if atime.is_some() || mtime.is_some() {
                let when = |t: TimeOrNow| match t {
                    TimeOrNow::SpecificTime(t) => t,
                    TimeOrNow::Now => SystemTime::now(),
                };
                let mut times = fs::FileTimes::new();
                if let Some(t) = atime {
                    times = times.set_accessed(when(t));
                }
                if let Some(t) = mtime {
                    times = times.set_modified(when(t));
                }
                if let Ok(f) = File::open(&abs) {
                    let _ = f.set_times(times);
                }
            }
            st.attr(rel).map_err(|e| errno(&e))
        })();
        match result {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & 0o170000 != 0o100000 {
            return reply.error(Errno::EPERM);
        }
        let made = self.new_entry(parent, name, |abs| {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode & !umask & 0o7777)
                .open(abs)
                .map(|_| ())
        });
        match made {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let made = self.new_entry(parent, name, |abs| {
            fs::create_dir(abs)?;
            fs::set_permissions(abs, fs::Permissions::from_mode(mode & !umask & 0o7777))
        });
        match made {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.remove(parent, name, false) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.remove(parent, name, true) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mut st = self.st();
        let result = (|| -> Result<(), Errno> {
            if flags.contains(RenameFlags::RENAME_EXCHANGE) {
                return Err(Errno::EINVAL);
            }
            let from = st.child(parent.0, name)?;
            let to = st.child(newparent.0, newname)?;
            let from_md = fs::symlink_metadata(st.abs(&from)).map_err(|e| errno(&e))?;
            if from == to {
                return Ok(());
            }
            let mut replaced = None;
            if let Ok(md) = fs::symlink_metadata(st.abs(&to)) {
                if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                    return Err(Errno::EEXIST);
                }
                if md.is_dir() != from_md.is_dir() {
                    return Err(if md.is_dir() { Errno::EISDIR } else { Errno::ENOTDIR });
                }
                if md.is_dir() && fs::read_dir(st.abs(&to)).map_err(|e| errno(&e))?.next().is_some() {
                    return Err(Errno::ENOTEMPTY);
                }
                replaced = Some(st.move_to_trash(&to).map_err(|e| errno(&e))?);
            }
            if let Err(e) = fs::rename(st.abs(&from), st.abs(&to)) {
                if let Some(t) = &replaced {
                    let _ = fs::rename(st.abs(t), st.abs(&to)).map(|()| st.repath(t, &to));
                }
                return Err(errno(&e));
            }
            st.repath(&from, &to);
            st.undo.push(DirOp::Renamed {
                dir: newparent.0,
                from,
                to,
                replaced,
            });
            Ok(())
        })();
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn link(&self, _req: &Request, _ino: INodeNo, _newparent: INodeNo, _newname: &OsStr, reply: ReplyEntry) {
        reply.error(Errno::EPERM);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let mut st = self.st();
        let result = st.overlay(ino.0).and_then(|o| {
            o.opens += 1;
            if flags.0 & nix::fcntl::OFlag::O_TRUNC.bits() != 0 {
                o.truncate(0)?;
            }
            Ok(())
        });
        match result {
            Ok(()) => reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mut st = self.st();
        let result = (|| -> Result<FileAttr, Errno> {
            let rel = st.child(parent.0, name)?;
            let abs = st.abs(&rel);
            let existed = fs::symlink_metadata(&abs).is_ok();
            if existed && flags & nix::fcntl::OFlag::O_EXCL.bits() != 0 {
                return Err(Errno::EEXIST);
            }
            if !existed {
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(mode & !umask & 0o7777)
                    .open(&abs)
                    .map_err(|e| errno(&e))?;
                st.undo.push(DirOp::Created {
                    dir: parent.0,
                    path: rel.clone(),
                });
            }
            tracing::trace!(path = %rel.display(), existed, "create");
            let attr = st.attr(rel).map_err(|e| errno(&e))?;
            let o = st.overlay(attr.ino.0).map_err(|e| errno(&e))?;
            o.opens += 1;
            if existed && flags & nix::fcntl::OFlag::O_TRUNC.bits() != 0 {
                o.truncate(0).map_err(|e| errno(&e))?;
            }
            Ok(FileAttr { size: o.size, ..attr })
        })();
        match result {
            Ok(attr) => reply.created(&TTL, &attr, Generation(0), FileHandle(0), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let mut st = self.st();
        match st.overlay(ino.0).and_then(|o| o.read(offset, size)) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut st = self.st();
        let result = st.overlay(ino.0).and_then(|o| {
            let at = if flags.0 & nix::fcntl::OFlag::O_APPEND.bits() != 0 {
                o.size
            } else {
                offset
            };
            o.write(at, data)
        });
        match result {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: fuser::LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let mut st = self.st();
        if let Some(o) = st.overlays.get_mut(&ino.0) {
            o.opens = o.opens.saturating_sub(1);
            if o.opens == 0 && !o.is_dirty() {
                st.overlays.remove(&ino.0);
            }
        }
        reply.ok();
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        let mut st = self.st();
        tracing::trace!(path = ?st.path_of(ino.0).ok(), datasync, "fsync");
        match st.overlay(ino.0).and_then(|o| o.sync(datasync)) {
            Ok(()) => reply.ok(),
            Err(e) => {
                tracing::warn!(ino = ino.0, error = %e, "fsync of backing file failed");
                reply.error(errno(&e))
            }
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let mut st = self.st();
        let result = (|| -> Result<Vec<(u64, FileType, std::ffi::OsString)>, Errno> {
            let rel = st.path_of(ino.0)?;
            let mut entries = vec![
                (ino.0, FileType::Directory, ".".into()),
                (INodeNo::ROOT.0, FileType::Directory, "..".into()),
            ];
            let mut found = Vec::new();
            for e in fs::read_dir(st.abs(&rel)).map_err(|e| errno(&e))? {
                let e = e.map_err(|e| errno(&e))?;
                if ino == INodeNo::ROOT && e.file_name() == TRASH {
                    continue;
                }
                let kind = e.file_type().map(kind_of).unwrap_or(FileType::RegularFile);
                found.push((e.ino(), kind, e.file_name()));
            }
            found.sort_by(|a, b| a.2.cmp(&b.2));
            for (bino, kind, name) in found {
                let child = st.intern(bino, rel.join(&name));
                entries.push((child, kind, name));
            }
            Ok(entries)
        })();
        match result {
            Ok(entries) => {
                for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
                    if reply.add(INodeNo(ino), (i + 1) as u64, kind, name) {
                        break;
                    }
                }
                reply.ok()
            }
            Err(e) => reply.error(e),
        }
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        match self.st().sync_dir(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let root = self.st().root.clone();
        match nix::sys::statvfs::statvfs(&root) {
            Ok(s) => reply.statfs(
                s.blocks(),
                s.blocks_free(),
                s.blocks_available(),
                s.files(),
                s.files_free(),
                s.block_size() as u32,
                s.name_max() as u32,
                s.fragment_size() as u32,
            ),
            Err(e) => reply.error(Errno::from_i32(e as i32)),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }
}
