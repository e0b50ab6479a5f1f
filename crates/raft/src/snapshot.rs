//! Snapshot files: the stream a leader sends a lagging replica, written to
//! and read from a file in the node's data directory so that neither side
//! ever holds the whole snapshot in memory (a million queued messages are
//! gigabytes of bodies).
//!
//! Format (version [`VERSION`]):
//!
//! ```text
//! header  := MAGIC (8 bytes) version: u32 LE  meta_len: u32 LE  meta (bincode SnapshotMeta)
//! frame   := tag: u8  len: u32 LE  crc32: u32 LE  payload (len bytes)
//!            the checksum covers the tag and the payload
//! tag 1   Kv:      bincode (key, value), a state machine key other than a message
//! tag 2   Message: record_len: u32 LE, bincode MessageRecord, then the body bytes
//! tag 3   End:     frames: u64 LE, messages: u64 LE (counts before this frame)
//! ```
//!
//! Frames come in the state machine tree's key order; nothing may follow
//! `End`. A file with another magic or version is refused with an error that
//! says so (a rolling upgrade, see docs/design.md), never decoded as
//! something else.
//!
//! Files live in `<data_dir>/snapshots/`: `g<N>-<seq>.build` (being built on
//! a leader; unlinked as soon as it is opened, so a crash leaves nothing),
//! `g<N>-<seq>.part` (being received; removed when dropped) and
//! `g<N>.install` (the redo record of an install in progress, see
//! `StateMachine::install_snapshot`). Leftovers of a crash are removed when
//! the group opens.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};

use super::{GroupId, NodeId};
use tern_model::record::MessageRecord;

pub type Meta = openraft::SnapshotMeta<NodeId, openraft::BasicNode>;

/// First bytes of every snapshot file. As the length prefix of the format
/// before it (a bincode `Vec`), it is absurdly large, so an older node fails
/// to decode it instead of misreading it.
pub const MAGIC: &[u8; 8] = b"TERNSNAP";
/// The format written and the only one read.
pub const VERSION: u32 = 2;
/// Largest frame accepted: a corrupt length must not allocate gigabytes.
const MAX_FRAME: u32 = 1 << 30;
const FRAME_HEADER: usize = 1 + 4 + 4;

const TAG_KV: u8 = 1;
const TAG_MESSAGE: u8 = 2;
const TAG_END: u8 = 3;

/// Unique names for files of this process.
static SEQ: AtomicU64 = AtomicU64::new(0);

/// The directory snapshot files live in.
pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("snapshots")
}

/// The redo record of `group`'s install in progress.
pub fn install_path(data_dir: &Path, group: GroupId) -> PathBuf {
    dir(data_dir).join(format!("g{group}.install"))
}

fn temp_path(data_dir: &Path, group: GroupId, suffix: &str) -> PathBuf {
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    dir(data_dir).join(format!("g{group}-{seq}.{suffix}"))
}

/// Removes `group`'s snapshot files left by a crash (not its redo record).
pub fn remove_leftovers(data_dir: &Path, group: GroupId) -> std::io::Result<()> {
    let prefix = format!("g{group}-");
    let entries = match std::fs::read_dir(dir(data_dir)) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(&prefix) && (name.ends_with(".build") || name.ends_with(".part")) {
            tracing::info!(group, file = %name, "removing a snapshot file left by a crash");
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// openraft's `SnapshotData`: a snapshot file, read and written in chunks.
///
/// A file being received is removed when this is dropped, unless an
/// install took it over ([`SnapshotFile::take_path`]).
#[derive(Debug)]
pub struct SnapshotFile {
    file: tokio::fs::File,
    /// The file's name while it has one this value owns.
    path: Option<PathBuf>,
    /// Whether the first bytes written were checked against the format.
    checked: bool,
}

impl SnapshotFile {
    /// An empty file with no name (the meta-only snapshot openraft asks for
    /// at start-up, and what `build_snapshot` returns).
    pub fn empty(data_dir: &Path, group: GroupId) -> std::io::Result<SnapshotFile> {
        let (file, path) = create(data_dir, group, "build")?;
        std::fs::remove_file(&path)?;
        Ok(SnapshotFile::unnamed(file))
    }

    /// A file with no name, already written (a snapshot built on a leader).
    pub fn unnamed(file: std::fs::File) -> SnapshotFile {
        SnapshotFile {
            file: tokio::fs::File::from_std(file),
            path: None,
            checked: true,
        }
    }

    /// A new named file that chunks from a leader are written to.
    pub fn receiving(data_dir: &Path, group: GroupId) -> std::io::Result<SnapshotFile> {
        let (file, path) = create(data_dir, group, "part")?;
        Ok(SnapshotFile {
            file: tokio::fs::File::from_std(file),
            path: Some(path),
            checked: false,
        })
    }

    /// The file's name, which the caller now owns (and removes).
    pub fn take_path(&mut self) -> Option<PathBuf> {
        self.path.take()
    }
}

impl Drop for SnapshotFile {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::debug!(file = %path.display(), error = %e, "cannot remove a snapshot file");
            }
        }
    }
}

fn create(data_dir: &Path, group: GroupId, suffix: &str) -> std::io::Result<(std::fs::File, PathBuf)> {
    std::fs::create_dir_all(dir(data_dir))?;
    let path = temp_path(data_dir, group, suffix);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    Ok((file, path))
}

/// Opens a new file for a leader to build a snapshot in; it has no name
/// (nothing to clean up after a crash) and is removed when closed.
pub fn build_file(data_dir: &Path, group: GroupId) -> std::io::Result<std::fs::File> {
    let (file, path) = create(data_dir, group, "build")?;
    std::fs::remove_file(&path)?;
    Ok(file)
}

impl AsyncRead for SnapshotFile {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.file).poll_read(cx, buf)
    }
}

impl AsyncWrite for SnapshotFile {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        // Refuse a format this node does not know at the first chunk, so
        // the leader hears why before sending gigabytes.
        if !self.checked && buf.len() >= MAGIC.len() + 4 {
            check_version(buf)?;
            self.checked = true;
        }
        Pin::new(&mut self.file).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.file).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.file).poll_shutdown(cx)
    }
}

impl AsyncSeek for SnapshotFile {
    fn start_seek(mut self: Pin<&mut Self>, position: std::io::SeekFrom) -> std::io::Result<()> {
        Pin::new(&mut self.file).start_seek(position)
    }

    fn poll_complete(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<u64>> {
        Pin::new(&mut self.file).poll_complete(cx)
    }
}

fn invalid(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

/// Checks the magic and version at the start of `head`.
fn check_version(head: &[u8]) -> std::io::Result<()> {
    if head.get(..MAGIC.len()) != Some(&MAGIC[..]) {
        return Err(invalid(
            "snapshot is not in a format this node knows (no TERNSNAP header: \
             sent by a node of an older version? see the upgrade notes in docs/design.md)"
                .into(),
        ));
    }
    let mut v = [0u8; 4];
    v.copy_from_slice(head.get(MAGIC.len()..MAGIC.len() + 4).unwrap_or(&[0; 4]));
    let version = u32::from_le_bytes(v);
    if version != VERSION {
        return Err(invalid(format!(
            "snapshot format version {version} is not known to this node (it reads version {VERSION}); \
             upgrade every node to the same release"
        )));
    }
    Ok(())
}

/// One frame of a snapshot as read back.
pub enum Frame {
    Kv(Vec<u8>, Vec<u8>),
    Message(Box<MessageRecord>, Vec<u8>),
}

/// Writes a snapshot frame by frame.
pub struct Writer<W: Write> {
    out: W,
    frames: u64,
    messages: u64,
}

impl<W: Write> Writer<W> {
    pub fn new(mut out: W, meta: &Meta) -> std::io::Result<Writer<W>> {
        let meta = bincode::serialize(meta).map_err(std::io::Error::other)?;
        out.write_all(MAGIC)?;
        out.write_all(&VERSION.to_le_bytes())?;
        out.write_all(&len32(meta.len())?.to_le_bytes())?;
        out.write_all(&meta)?;
        Ok(Writer {
            out,
            frames: 0,
            messages: 0,
        })
    }

    fn frame(&mut self, tag: u8, parts: &[&[u8]]) -> std::io::Result<()> {
        let len = len32(parts.iter().map(|p| p.len()).sum())?;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&[tag]);
        for p in parts {
            crc.update(p);
        }
        self.out.write_all(&[tag])?;
        self.out.write_all(&len.to_le_bytes())?;
        self.out.write_all(&crc.finalize().to_le_bytes())?;
        for p in parts {
            self.out.write_all(p)?;
        }
        self.frames += 1;
        Ok(())
    }

    pub fn kv(&mut self, key: &[u8], value: &[u8]) -> std::io::Result<()> {
        let payload = bincode::serialize(&(key, value)).map_err(std::io::Error::other)?;
        self.frame(TAG_KV, &[&payload])
    }

    pub fn message(&mut self, record: &MessageRecord, body: &[u8]) -> std::io::Result<()> {
        let record = bincode::serialize(record).map_err(std::io::Error::other)?;
        let record_len = len32(record.len())?.to_le_bytes();
        self.frame(TAG_MESSAGE, &[&record_len, &record, body])?;
        self.messages += 1;
        Ok(())
    }

    /// Writes the end frame and returns the output and the messages written.
    pub fn finish(mut self) -> std::io::Result<(W, u64)> {
        let mut counts = [0u8; 16];
        counts[..8].copy_from_slice(&self.frames.to_le_bytes());
        counts[8..].copy_from_slice(&self.messages.to_le_bytes());
        self.frame(TAG_END, &[&counts])?;
        self.out.flush()?;
        Ok((self.out, self.messages))
    }
}

fn len32(n: usize) -> std::io::Result<u32> {
    u32::try_from(n)
        .ok()
        .filter(|&n| n <= MAX_FRAME)
        .ok_or_else(|| invalid(format!("snapshot frame of {n} bytes is too large")))
}

/// Reads a snapshot frame by frame.
pub struct Reader<R: Read> {
    input: R,
    frames: u64,
    messages: u64,
    ended: bool,
}

impl<R: Read> Reader<R> {
    /// Reads and checks the header; returns the meta it names.
    pub fn new(mut input: R) -> std::io::Result<(Reader<R>, Meta)> {
        let mut head = [0u8; 16];
        input
            .read_exact(&mut head)
            .map_err(|e| invalid(format!("snapshot header: {e}")))?;
        check_version(&head)?;
        let meta_len = u32::from_le_bytes([head[12], head[13], head[14], head[15]]);
        if meta_len > MAX_FRAME {
            return Err(invalid(format!("snapshot header names {meta_len} bytes of meta")));
        }
        let mut meta = vec![0u8; meta_len as usize];
        input
            .read_exact(&mut meta)
            .map_err(|e| invalid(format!("snapshot meta: {e}")))?;
        let meta: Meta = bincode::deserialize(&meta).map_err(|e| invalid(format!("snapshot meta: {e}")))?;
        let reader = Reader {
            input,
            frames: 0,
            messages: 0,
            ended: false,
        };
        Ok((reader, meta))
    }

    /// The next frame, `None` after a well-formed end; a file cut short or
    /// damaged is an error.
    pub fn next_frame(&mut self) -> std::io::Result<Option<Frame>> {
        if self.ended {
            return Ok(None);
        }
        let at = self.frames;
        let mut head = [0u8; FRAME_HEADER];
        self.input
            .read_exact(&mut head)
            .map_err(|e| invalid(format!("snapshot frame {at}: {e} (file cut short?)")))?;
        let tag = head[0];
        let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]);
        let crc = u32::from_le_bytes([head[5], head[6], head[7], head[8]]);
        if len > MAX_FRAME {
            return Err(invalid(format!("snapshot frame {at} claims {len} bytes")));
        }
        let mut payload = vec![0u8; len as usize];
        self.input
            .read_exact(&mut payload)
            .map_err(|e| invalid(format!("snapshot frame {at}: {e} (file cut short?)")))?;
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&[tag]);
        hasher.update(&payload);
        if hasher.finalize() != crc {
            return Err(invalid(format!("snapshot frame {at} fails its checksum")));
        }
        let frame = match tag {
            TAG_KV => {
                let (k, v): (Vec<u8>, Vec<u8>) =
                    bincode::deserialize(&payload).map_err(|e| invalid(format!("snapshot frame {at}: {e}")))?;
                Frame::Kv(k, v)
            }
            TAG_MESSAGE => {
                let record_len = payload
                    .get(..4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
                    .ok_or_else(|| invalid(format!("snapshot frame {at}: message too short")))?;
                let record = payload
                    .get(4..4 + record_len)
                    .ok_or_else(|| invalid(format!("snapshot frame {at}: record past the frame")))?;
                let record: MessageRecord =
                    bincode::deserialize(record).map_err(|e| invalid(format!("snapshot frame {at}: {e}")))?;
                let body = payload.split_off(4 + record_len);
                self.messages += 1;
                Frame::Message(Box::new(record), body)
            }
            TAG_END => {
                let count = |i: usize| {
                    payload
                        .get(i..i + 8)
                        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
                };
                if count(0) != Some(self.frames) || count(8) != Some(self.messages) {
                    return Err(invalid(format!(
                        "snapshot ends after {} frames and {} messages, but says {:?} and {:?}",
                        self.frames,
                        self.messages,
                        count(0),
                        count(8)
                    )));
                }
                let mut rest = [0u8; 1];
                if self.input.read(&mut rest)? != 0 {
                    return Err(invalid("snapshot has bytes after its end".into()));
                }
                self.ended = true;
                return Ok(None);
            }
            other => return Err(invalid(format!("snapshot frame {at} has unknown tag {other}"))),
        };
        self.frames += 1;
        Ok(Some(frame))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn meta() -> Meta {
        Meta {
            last_log_id: Some(openraft::LogId::new(openraft::CommittedLeaderId::new(3, 1), 42)),
            last_membership: Default::default(),
            snapshot_id: "g1-3-42".into(),
        }
    }

    fn sample() -> Vec<u8> {
        let mut w = Writer::new(Vec::new(), &meta()).unwrap();
        w.kv(b"n/x", b"addr").unwrap();
        let record = MessageRecord::new("Q1".into(), Default::default(), 5, 0);
        w.message(&record, b"hello").unwrap();
        w.finish().unwrap().0
    }

    #[test]
    fn frames_come_back_in_order_and_the_end_is_checked() {
        let bytes = sample();
        let (mut r, m) = Reader::new(&bytes[..]).unwrap();
        assert_eq!(m, meta());
        assert!(matches!(r.next_frame().unwrap(), Some(Frame::Kv(k, v)) if k == b"n/x" && v == b"addr"));
        match r.next_frame().unwrap() {
            Some(Frame::Message(rec, body)) => {
                assert_eq!(rec.id, "Q1");
                assert_eq!(body, b"hello");
            }
            _ => panic!("expected a message"),
        }
        assert!(r.next_frame().unwrap().is_none());
        assert!(r.next_frame().unwrap().is_none());
    }

    #[test]
    fn a_cut_damaged_or_foreign_snapshot_is_refused() {
        let bytes = sample();
        // Cut anywhere before the end frame is complete.
        for cut in [bytes.len() - 1, bytes.len() - 20, 30] {
            let result = Reader::new(&bytes[..cut]).and_then(|(mut r, _)| {
                while r.next_frame()?.is_some() {}
                Ok(())
            });
            assert!(result.is_err(), "cut at {cut}");
        }
        let mut damaged = bytes.clone();
        let last = damaged.len() - 30;
        damaged[last] ^= 0xff;
        let (mut r, _) = Reader::new(&damaged[..]).unwrap();
        let err = std::iter::from_fn(|| match r.next_frame() {
            Ok(Some(_)) => Some(None),
            Ok(None) => None,
            Err(e) => Some(Some(e)),
        })
        .flatten()
        .next()
        .expect("damage found");
        assert!(err.to_string().contains("checksum"), "{err}");

        let mut other_version = bytes.clone();
        other_version[8] = 9;
        let err = Reader::new(&other_version[..]).err().unwrap();
        assert!(err.to_string().contains("version 9"), "{err}");
        // The format before this one: a bare bincode structure.
        let old = bincode::serialize(&(Vec::<(Vec<u8>, Vec<u8>)>::new(), 0u64)).unwrap();
        let err = Reader::new(&old[..]).err().unwrap();
        assert!(err.to_string().contains("format"), "{err}");
    }

    /// A receiver refuses a foreign format at the first chunk, before the
    /// rest is sent; the file being received is removed when dropped.
    #[tokio::test]
    async fn the_first_chunk_of_a_foreign_format_is_refused() {
        use tokio::io::AsyncWriteExt;
        let dir = tempfile::tempdir().unwrap();
        let mut ok = SnapshotFile::receiving(dir.path(), 3).unwrap();
        ok.write_all(&sample()).await.unwrap();
        let mut foreign = SnapshotFile::receiving(dir.path(), 3).unwrap();
        let old = bincode::serialize(&(vec![(b"k".to_vec(), b"v".to_vec())], 0u64)).unwrap();
        let err = foreign.write_all(&old).await.unwrap_err();
        assert!(err.to_string().contains("older version"), "{err}");
        assert_eq!(std::fs::read_dir(super::dir(dir.path())).unwrap().count(), 2);
        drop((ok, foreign));
        assert_eq!(std::fs::read_dir(super::dir(dir.path())).unwrap().count(), 0);
    }
}
