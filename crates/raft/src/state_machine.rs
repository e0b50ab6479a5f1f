//! The state machine of one group, kept in the sled tree `g{N}/sm`.
//!
//! Keys: `a` last applied log id, `b` last membership, `m/<queue id>` a
//! queued message record, `n/<node id>` a node's gRPC address (control
//! group), `p/<shard>` a shard's replica set (control group), `c` the last
//! checkpoint. Applies write their other keys at once, key by key and not
//! flushed; message records and the applied id wait in memory
//! ([`Unwritten`]) until the next write-back (every checkpoint). Checkpoints
//! (below) bound what openraft re-applies from the log after a crash, and
//! every request is idempotent.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StoredMembership,
};

pub use super::apply::SmEvent;
use super::apply::{Apply, ApplyCtx, Records, Writes};
use super::snapshot::{self, Frame, SnapshotFile};
use super::{io_err, Entry, GroupId, LogId, NodeId, Response, StorageError, TypeConfig};
use crate::Durability;
use tern_model::record::MessageRecord;
use tern_store::wal::{Kind, Wal};

type Membership = StoredMembership<NodeId, openraft::BasicNode>;
type Meta = SnapshotMeta<NodeId, openraft::BasicNode>;

const APPLIED: &[u8] = b"a";
/// The applied log id up to which this tree is known to be on disk.
const CHECKPOINT: &[u8] = b"c";
const MEMBERSHIP: &[u8] = b"b";
pub const MESSAGE_PREFIX: &[u8] = b"m/";

pub fn message_key(id: &str) -> Vec<u8> {
    [MESSAGE_PREFIX, id.as_bytes()].concat()
}

/// The message record stored as `value` under `key` (`m/<queue id>`).
pub fn decode_message(key: &[u8], value: &[u8]) -> bincode::Result<MessageRecord> {
    let id = key.strip_prefix(MESSAGE_PREFIX).unwrap_or(key);
    let id = std::str::from_utf8(id).map_err(|e| Box::new(bincode::ErrorKind::Custom(format!("queue id: {e}"))))?;
    MessageRecord::from_stored(id, value)
}

/// State machine of one group; clones share the same tree.
#[derive(Clone)]
pub struct StateMachine {
    group: GroupId,
    tree: sled::Tree,
    wal: Arc<Wal>,
    durability: Arc<Durability>,
    /// Applied state when the snapshot builder was made (in order with applies).
    pending: Option<(Option<LogId>, Membership)>,
    /// The first `get_current_snapshot` (openraft's start-up) has been answered.
    started: bool,
    /// The last checkpoint written, and the last one on disk (shared by clones).
    checkpoint: Arc<std::sync::Mutex<Checkpoint>>,
    /// Where apply events go (the shard's scheduler), if anywhere, and
    /// whether it wants them now (only while it leads: on a follower each
    /// event would wake the actor's thread just to be dropped).
    events: Option<(tokio::sync::mpsc::UnboundedSender<SmEvent>, Arc<AtomicBool>)>,
    /// Queued messages (`tern_queue_messages`): counted at open and after a
    /// snapshot is installed, then kept by apply.
    messages: Arc<AtomicI64>,
    /// Applied changes not yet in the tree (shared by clones).
    unwritten: Arc<std::sync::Mutex<Unwritten>>,
    /// One write-back (or snapshot install) at a time.
    writing_back: Arc<tokio::sync::Mutex<()>>,
    /// What the group's requests mean (the node's queue and control rules).
    rules: Arc<dyn Apply>,
    /// Tests: an install fails (as a crash would stop it) after this many batches.
    /// Tests: an install stops (as a crash would) after this many batches.
    #[cfg(any(test, feature = "test-hooks"))]
    pub crash_install_after: Option<usize>,
}

/// Message records applied since the last write-back, and the applied id.
///
/// Applies put records here instead of in sled, and
/// [`StateMachine::write_back`] writes them every checkpoint: a message
/// queued and delivered between two checkpoints never reaches sled, and one
/// deferred at its first attempt is written once, not twice. sled is
/// log-structured: whatever it writes, its segment cleaner later moves the
/// live part of, and with a million messages queued most of what it moved
/// was live records. Writing less is what keeps a large queue cheap. Until a
/// checkpoint covers them these changes are in the Raft log, which is
/// re-applied from the checkpoint after a crash.
#[derive(Default)]
struct Unwritten {
    /// Changed since the last write-back began; `None` is a removal.
    records: HashMap<String, Option<MessageRecord>>,
    /// Taken by the write-back in progress, read until they are in the tree.
    writing: Arc<HashMap<String, Option<MessageRecord>>>,
    /// The last applied log id (the tree's `a` is the one last written back).
    applied: Option<LogId>,
    /// The applied id in the tree.
    applied_written: Option<LogId>,
}

impl Unwritten {
    /// `Some(record or removal)` if `id` changed since the tree was written.
    fn get(&self, id: &str) -> Option<&Option<MessageRecord>> {
        self.records.get(id).or_else(|| self.writing.get(id))
    }

    /// Every unwritten change, the newer one where both generations have one.
    fn all(&self) -> BTreeMap<String, Option<MessageRecord>> {
        let mut out: BTreeMap<_, _> = self.writing.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        out.extend(self.records.iter().map(|(k, v)| (k.clone(), v.clone())));
        out
    }
}

/// A group's checkpoint marks.
#[derive(Debug, Default)]
struct Checkpoint {
    /// The checkpoint key in the tree (written, maybe not on disk yet).
    written: Option<LogId>,
    /// The checkpoint on disk after everything it covers: the log is never
    /// purged past it ([`PurgeFloor`]).
    durable: Option<LogId>,
}

/// How far a group's log may be purged: its durable checkpoint. Shared by
/// the state machine (which moves it) and the log store (which obeys it).
#[derive(Clone, Debug)]
pub struct PurgeFloor(Arc<std::sync::Mutex<Checkpoint>>);

impl PurgeFloor {
    /// The durable checkpoint: entries after it are needed to rebuild the state.
    pub fn get(&self) -> Option<LogId> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).durable
    }
}

/// Body bytes written to the log in one batch while installing a snapshot:
/// what the install holds in memory at a time.
const INSTALL_BATCH_BYTES: usize = 8 << 20;
/// Messages in one install batch, however small their bodies.
const INSTALL_BATCH_MESSAGES: usize = 4096;

/// One batch of an install, read from the snapshot file.
struct InstallBatch {
    /// Keys and values for the tree; message bodies are in the log already.
    items: Vec<(Vec<u8>, Vec<u8>)>,
    messages: i64,
    /// The snapshot's end was reached.
    done: bool,
}

type SnapshotReader = snapshot::Reader<std::io::BufReader<std::fs::File>>;

impl StateMachine {
    pub async fn open(
        durability: Arc<Durability>,
        group: GroupId,
        rules: Arc<dyn Apply>,
    ) -> anyhow::Result<StateMachine> {
        use anyhow::Context as _;
        let tree = durability.db().open_tree(format!("g{group}/sm"))?;
        // Snapshot files of earlier versions: snapshots are made on demand now.
        let _ = std::fs::remove_file(durability.data_dir().join("snapshots").join(format!("g{group}.snap")));
        let sm = StateMachine {
            group,
            tree,
            wal: Arc::clone(durability.wal()),
            durability,
            pending: None,
            started: false,
            checkpoint: Arc::default(),
            events: None,
            messages: Arc::new(AtomicI64::new(0)),
            unwritten: Arc::default(),
            writing_back: Arc::default(),
            rules,
            #[cfg(any(test, feature = "test-hooks"))]
            crash_install_after: None,
        };
        snapshot::remove_leftovers(sm.durability.data_dir(), group)
            .with_context(|| format!("removing snapshot files of group {group}"))?;
        let redo = snapshot::install_path(sm.durability.data_dir(), group);
        if redo.exists() {
            tracing::warn!(group, file = %redo.display(), "finishing a snapshot install that a crash interrupted");
            sm.install_from(&redo, None, false).await.with_context(|| {
                format!(
                    "finishing the snapshot install of group {group} from {}",
                    redo.display()
                )
            })?;
        }
        sm.roll_back_to_checkpoint()?;
        {
            let applied = sm.written_applied()?;
            let mut u = sm.lock_unwritten();
            u.applied = applied;
            u.applied_written = applied;
        }
        let live = sm.count_messages()?;
        sm.wal.add_live(live);
        Ok(sm)
    }

    /// Counts queued messages, and returns how many bodies are in each log segment.
    fn count_messages(&self) -> anyhow::Result<std::collections::HashMap<u64, i64>> {
        let mut live = std::collections::HashMap::new();
        let mut messages = 0;
        for record in self.messages() {
            let record = record?;
            messages += 1;
            if let Some(loc) = record.body {
                *live.entry(loc.segment).or_insert(0) += 1;
            }
        }
        self.messages.store(messages, Ordering::Relaxed);
        Ok(live)
    }

    /// Messages in this group's queue (as applied on this replica).
    pub fn message_count(&self) -> u64 {
        self.messages.load(Ordering::Relaxed).max(0) as u64
    }

    /// The tree, for read-only queries by the admin service.
    pub fn tree(&self) -> sled::Tree {
        self.tree.clone()
    }

    /// Where message bodies are read from.
    pub fn group(&self) -> GroupId {
        self.group
    }

    pub fn wal(&self) -> Arc<Wal> {
        Arc::clone(&self.wal)
    }

    fn read<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StorageError> {
        let err = |e: &dyn std::fmt::Display| io_err(ErrorSubject::StateMachine, ErrorVerb::Read, e);
        match self.tree.get(key).map_err(|e| err(&e))? {
            None => Ok(None),
            Some(v) => bincode::deserialize(&v).map(Some).map_err(|e| err(&e)),
        }
    }

    fn lock_unwritten(&self) -> std::sync::MutexGuard<'_, Unwritten> {
        self.unwritten.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every queued message, in id (arrival) order, as applied on this
    /// replica: the tree's records with the unwritten changes over them.
    pub fn messages(&self) -> impl Iterator<Item = anyhow::Result<MessageRecord>> {
        self.messages_after("")
    }

    /// As [`StateMachine::messages`], from the first id after `after`
    /// (exclusive; "" for all): a page of a long listing starts where the
    /// last one ended instead of scanning the queue from its start.
    pub fn messages_after(&self, after: &str) -> impl Iterator<Item = anyhow::Result<MessageRecord>> {
        let mut unwritten = self.lock_unwritten().all();
        if !after.is_empty() {
            unwritten = unwritten.split_off(&format!("{after}\0"));
        }
        let mut unwritten = unwritten.into_iter().peekable();
        let start = if after.is_empty() {
            MESSAGE_PREFIX.to_vec()
        } else {
            [message_key(after).as_slice(), &[0u8]].concat()
        };
        let mut tree = self
            .tree
            .range(start..)
            .take_while(|r| r.as_ref().map_or(true, |(k, _)| k.starts_with(MESSAGE_PREFIX)))
            .peekable();
        std::iter::from_fn(move || loop {
            let tree_key = match tree.peek() {
                Some(Ok((k, _))) => Some(k.clone()),
                Some(Err(_)) => return tree.next().and_then(|r| r.err()).map(|e| Err(e.into())),
                None => None,
            };
            let tree_id = tree_key
                .as_ref()
                .map(|k| k.get(MESSAGE_PREFIX.len()..).unwrap_or_default());
            let unwritten_first = match (unwritten.peek(), tree_id) {
                (None, None) => return None,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (Some((id, _)), Some(t)) => id.as_bytes() <= t,
            };
            if !unwritten_first {
                let (k, v) = tree.next()?.ok()?;
                return Some(decode_message(&k, &v).map_err(Into::into));
            }
            let (id, change) = unwritten.next()?;
            if tree_id == Some(id.as_bytes()) {
                tree.next(); // superseded by the unwritten change
            }
            if let Some(record) = change {
                return Some(Ok(record));
            }
        })
    }

    /// When the oldest queued message arrived (unix seconds), as applied
    /// on this replica. Queue ids start with their arrival time, so the
    /// tree's first record not removed since is its oldest.
    pub fn oldest_received_at(&self) -> Option<i64> {
        let u = self.lock_unwritten();
        let unwritten = [&u.records, &*u.writing]
            .into_iter()
            .flat_map(|m| m.values().flatten())
            .map(|r| r.received_at)
            .min();
        let written = self
            .tree
            .scan_prefix(MESSAGE_PREFIX)
            .filter_map(Result::ok)
            .find(|(k, _)| {
                let id = std::str::from_utf8(k.get(MESSAGE_PREFIX.len()..).unwrap_or_default()).unwrap_or_default();
                !matches!(u.get(id), Some(None))
            })
            .and_then(|(k, v)| decode_message(&k, &v).ok())
            .map(|r| r.received_at);
        unwritten.into_iter().chain(written).min()
    }

    /// The queued message `id`, as applied on this replica.
    pub fn message(&self, id: &str) -> Result<Option<MessageRecord>, StorageError> {
        let err = |e: &dyn std::fmt::Display| io_err(ErrorSubject::StateMachine, ErrorVerb::Read, e);
        if let Some(change) = self.lock_unwritten().get(id) {
            return Ok(change.clone());
        }
        match self.tree.get(message_key(id)).map_err(|e| err(&e))? {
            None => Ok(None),
            Some(v) => MessageRecord::from_stored(id, &v).map(Some).map_err(|e| err(&e)),
        }
    }

    /// Sends apply events (new, rescheduled, removed messages) to the
    /// shard's scheduler while `wanted` is set.
    pub fn set_events(&mut self, tx: tokio::sync::mpsc::UnboundedSender<SmEvent>, wanted: Arc<AtomicBool>) {
        self.events = Some((tx, wanted));
    }

    /// A message record as of the entries applied so far in this run.
    /// Writes the tree (written back up to `meta`'s applied id) to a new
    /// snapshot file, message by message with its body read from the log:
    /// memory use is one record and one body, whatever the queue's size.
    /// Returns the file at its start, the messages and the bytes written.
    fn write_snapshot_file(&self, meta: &Meta) -> anyhow::Result<(std::fs::File, u64, u64)> {
        use anyhow::Context as _;
        use std::io::Seek as _;
        let file = snapshot::build_file(self.durability.data_dir(), self.group).context("creating a snapshot file")?;
        let mut out = snapshot::Writer::new(std::io::BufWriter::with_capacity(1 << 20, file), meta)?;
        for item in self.tree.iter() {
            let (k, v) = item?;
            if [APPLIED, MEMBERSHIP, CHECKPOINT].contains(&k.as_ref()) {
                continue; // the meta says these
            }
            if k.starts_with(MESSAGE_PREFIX) {
                let record =
                    decode_message(&k, &v).with_context(|| format!("decoding {}", String::from_utf8_lossy(&k)))?;
                let body = match &record.body {
                    Some(loc) => self
                        .wal
                        .read(loc)
                        .with_context(|| format!("reading the body of {}", record.id))?,
                    None => Vec::new(),
                };
                out.message(&record, &body)?;
            } else {
                out.kv(&k, &v)?;
            }
        }
        let (out, messages) = out.finish()?;
        let mut file = out.into_inner().map_err(|e| e.into_error())?;
        let bytes = file.stream_position()?;
        file.rewind()?;
        Ok((file, messages, bytes))
    }

    /// Reads the next batch of a snapshot being installed and writes its
    /// bodies to the log (not yet synced); returns the tree items that go
    /// with them.
    fn read_install_batch(
        &self,
        mut reader: SnapshotReader,
        live: bool,
    ) -> anyhow::Result<(SnapshotReader, InstallBatch)> {
        let mut items = Vec::new();
        let mut messages = Vec::new();
        let mut bytes = 0usize;
        let mut done = false;
        while bytes < INSTALL_BATCH_BYTES && messages.len() < INSTALL_BATCH_MESSAGES {
            match reader.next_frame()? {
                None => {
                    done = true;
                    break;
                }
                Some(Frame::Kv(k, v)) => {
                    anyhow::ensure!(
                        ![APPLIED, MEMBERSHIP, CHECKPOINT].contains(&k.as_slice()) && !k.starts_with(MESSAGE_PREFIX),
                        "snapshot carries key {:?} as a plain key",
                        String::from_utf8_lossy(&k)
                    );
                    items.push((k, v));
                }
                Some(Frame::Message(record, body)) => {
                    bytes += body.len();
                    messages.push((record, body));
                }
            }
        }
        let group = self.group;
        if !messages.is_empty() {
            self.wal.write(|b| {
                for (record, body) in &mut messages {
                    record.body = Some(b.push(Kind::Body, group, body)?);
                }
                Ok(())
            })?;
        }
        let count = messages.len() as i64;
        for (record, _) in messages {
            if let (true, Some(loc)) = (live, record.body) {
                // Counted now: a checkpoint may look for free segments at any time.
                self.wal.retain(loc.segment);
            }
            items.push((message_key(&record.id), record.to_stored()?));
        }
        Ok((
            reader,
            InstallBatch {
                items,
                messages: count,
                done,
            },
        ))
    }

    /// Replaces the state with the snapshot in `redo` (a durable file that
    /// stays until the install is complete, so that a crash part way is
    /// finished at the next open from the same file). Durability goes in
    /// the order a crash at any point needs:
    ///
    /// 1. each batch of bodies is written to the log and synced before the
    ///    records that point at them go into the tree (sled may be flushed
    ///    by any other group's checkpoint at any moment);
    /// 2. records, membership and applied id are flushed;
    /// 3. only then the checkpoint is written and flushed;
    /// 4. the redo file is removed.
    ///
    /// `live`: at run time, keep the log's per-segment body counts (at
    /// open they are counted afterwards).
    async fn install_from(&self, redo: &std::path::Path, expect: Option<&Meta>, live: bool) -> anyhow::Result<()> {
        use anyhow::Context as _;
        let started = std::time::Instant::now();
        // No write-back may put an old record back under the new state.
        let _one = self.writing_back.lock().await;
        let file = std::fs::File::open(redo).with_context(|| format!("opening {}", redo.display()))?;
        let (mut reader, meta) = snapshot::Reader::new(std::io::BufReader::with_capacity(1 << 20, file))?;
        if let Some(expect) = expect {
            anyhow::ensure!(
                meta.last_log_id == expect.last_log_id && meta.snapshot_id == expect.snapshot_id,
                "snapshot file holds {} but {} was sent",
                meta.snapshot_id,
                expect.snapshot_id
            );
        }
        // Segments holding the bodies of the records replaced: freed once
        // the new state is durable.
        let mut released: HashMap<u64, i64> = HashMap::new();
        if live {
            for record in self.messages() {
                if let Some(loc) = record?.body {
                    *released.entry(loc.segment).or_insert(0) += 1;
                }
            }
        }
        self.lock_unwritten().records.clear();
        let tree = self.tree.clone();
        tokio::task::spawn_blocking(move || tree.clear()).await??;
        let mut messages = 0i64;
        let mut batches = 0usize;
        loop {
            #[cfg(any(test, feature = "test-hooks"))]
            if self.crash_install_after == Some(batches) {
                anyhow::bail!("test: install stopped after {batches} batches");
            }
            let sm = self.clone();
            let (r, batch) = tokio::task::spawn_blocking(move || sm.read_install_batch(reader, live)).await??;
            reader = r;
            batches += 1;
            if batch.messages > 0 {
                // 1. The bodies are on disk before anything points at them.
                self.durability.flush().await?;
            }
            messages += batch.messages;
            let tree = self.tree.clone();
            tokio::task::spawn_blocking(move || {
                for (k, v) in batch.items {
                    tree.insert(k, v)?;
                }
                sled::Result::Ok(())
            })
            .await??;
            if batch.done {
                break;
            }
        }
        self.tree
            .insert(MEMBERSHIP, bincode::serialize(&meta.last_membership)?)?;
        self.tree.insert(APPLIED, bincode::serialize(&meta.last_log_id)?)?;
        // 2. The state, durable.
        self.durability.flush_all().await?;
        {
            let mut mark = self.checkpoint.lock().unwrap_or_else(|p| p.into_inner());
            self.tree.insert(CHECKPOINT, bincode::serialize(&meta.last_log_id)?)?;
            mark.written = meta.last_log_id;
            mark.durable = mark.durable.min(meta.last_log_id);
            let mut u = self.lock_unwritten();
            u.records.clear();
            u.applied = meta.last_log_id;
            u.applied_written = meta.last_log_id;
        }
        // 3. The checkpoint, durable.
        self.durability.flush_state().await?;
        self.checkpoint_durable(meta.last_log_id);
        // 4. Nothing to finish at the next open.
        std::fs::remove_file(redo).with_context(|| format!("removing {}", redo.display()))?;
        tern_store::sync_dir(&snapshot::dir(self.durability.data_dir()))?;
        self.messages.store(messages, Ordering::Relaxed);
        for (segment, n) in released {
            for _ in 0..n {
                self.wal.release(segment);
            }
        }
        tracing::info!(
            group = self.group,
            snapshot = %meta.snapshot_id,
            messages,
            batches,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "snapshot installed"
        );
        Ok(())
    }
}

impl StateMachine {
    fn snapshot_meta(&self, applied: Option<LogId>, membership: Membership) -> Meta {
        let snapshot_id = match &applied {
            Some(l) => format!("g{}-{}-{}", self.group, l.leader_id.term, l.index),
            None => format!("g{}-empty", self.group),
        };
        Meta {
            last_log_id: applied,
            last_membership: membership,
            snapshot_id,
        }
    }
}

/// Checkpoints. Applies are written key by key without a flush, so after a
/// crash the tree may hold any part of what was applied since its last
/// flush. A checkpoint is an applied id written only after a full flush
/// that covered every write up to it; at open the tree's applied id is put
/// back to the checkpoint and openraft re-applies the log from there (every
/// request is idempotent, and the log is never purged past a checkpoint).
impl StateMachine {
    /// The applied id as written so far (every key up to it is written).
    pub fn written_applied(&self) -> Result<Option<LogId>, StorageError> {
        Ok(self.read::<Option<LogId>>(APPLIED)?.flatten())
    }

    /// Writes the unwritten records, then the applied id they go with, to
    /// the tree (not flushed), and returns that applied id: what a
    /// checkpoint covers once everything written so far is flushed.
    pub async fn write_back(&self) -> Result<Option<LogId>, StorageError> {
        let err = |e: &dyn std::fmt::Display| io_err(ErrorSubject::StateMachine, ErrorVerb::Write, e);
        let _one = self.writing_back.lock().await;
        let (records, applied) = {
            let mut u = self.lock_unwritten();
            if u.records.is_empty() && u.applied == u.applied_written {
                return Ok(u.applied);
            }
            u.writing = Arc::new(std::mem::take(&mut u.records));
            (Arc::clone(&u.writing), u.applied)
        };
        // A follower may apply entries before its own log write is synced;
        // sled must not hold a record pointing at a body that a crash could
        // still take away (sled flushes by itself every half second).
        let unsynced = records
            .values()
            .flatten()
            .filter_map(|r| r.body.as_ref())
            .any(|loc| !self.wal.is_durable(loc));
        let mut written = if unsynced {
            self.durability.flush().await.map_err(|e| e.to_string())
        } else {
            Ok(())
        };
        if written.is_ok() {
            // Thousands of sled writes: off the runtime's worker threads,
            // where they would hold up SMTP sessions.
            let sm = self.clone();
            written = tokio::task::spawn_blocking(move || sm.write_records(&records, applied))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()));
        }
        let mut u = self.lock_unwritten();
        let writing = std::mem::take(&mut u.writing);
        match written {
            Ok(()) => {
                u.applied_written = applied;
                Ok(applied)
            }
            Err(e) => {
                // Back to unwritten, under the changes made since.
                let newer = std::mem::take(&mut u.records);
                u.records = Arc::unwrap_or_clone(writing);
                u.records.extend(newer);
                Err(err(&e))
            }
        }
    }

    fn write_records(
        &self,
        records: &HashMap<String, Option<MessageRecord>>,
        applied: Option<LogId>,
    ) -> anyhow::Result<()> {
        // In id order: ids start with their arrival time, so neighbours
        // share sled's leaves.
        let mut records: Vec<_> = records.iter().collect();
        records.sort_unstable_by(|a, b| a.0.cmp(b.0));
        for (id, record) in records {
            match record {
                Some(r) => self.tree.insert(message_key(id), r.to_stored()?)?,
                None => self.tree.remove(message_key(id))?,
            };
        }
        self.tree.insert(APPLIED, bincode::serialize(&applied)?)?;
        Ok(())
    }

    /// Writes `applied` as the checkpoint (not flushed): the caller has
    /// flushed everything written up to it, and flushes the state again
    /// before [`StateMachine::checkpoint_durable`]. Never moves it back.
    pub fn write_checkpoint(&self, applied: Option<LogId>) -> Result<(), StorageError> {
        let err = |e: &dyn std::fmt::Display| io_err(ErrorSubject::StateMachine, ErrorVerb::Write, e);
        // Held across the write, so that an installed snapshot's checkpoint
        // is never overwritten by an older one written concurrently.
        let mut mark = self.checkpoint.lock().unwrap_or_else(|p| p.into_inner());
        if applied <= mark.written {
            return Ok(());
        }
        self.tree
            .insert(CHECKPOINT, bincode::serialize(&applied).map_err(|e| err(&e))?)
            .map_err(|e| err(&e))?;
        mark.written = applied;
        Ok(())
    }

    /// A state flush that began after [`StateMachine::write_checkpoint`]
    /// of `applied` succeeded: the log may now be purged up to it.
    pub fn checkpoint_durable(&self, applied: Option<LogId>) {
        let mut mark = self.checkpoint.lock().unwrap_or_else(|p| p.into_inner());
        debug_assert!(applied <= mark.written, "a checkpoint durable before it was written");
        mark.durable = mark.durable.max(applied.min(mark.written));
    }

    /// The log store's limit on purges.
    pub fn purge_floor(&self) -> PurgeFloor {
        PurgeFloor(Arc::clone(&self.checkpoint))
    }

    /// Whether `applied` is past the last checkpoint written.
    pub fn behind_checkpoint(&self, applied: Option<LogId>) -> bool {
        applied > self.checkpoint.lock().unwrap_or_else(|p| p.into_inner()).written
    }

    /// Puts the applied id back to the last checkpoint (at open).
    fn roll_back_to_checkpoint(&self) -> anyhow::Result<()> {
        let checkpoint: Option<LogId> = match self.tree.get(CHECKPOINT)? {
            Some(v) => bincode::deserialize(&v)?,
            None => None,
        };
        let applied = self.written_applied().map_err(|e| anyhow::anyhow!("{e}"))?;
        if applied != checkpoint {
            tracing::info!(
                group = self.group,
                ?applied,
                ?checkpoint,
                "re-applying the log from the last checkpoint"
            );
            match checkpoint {
                Some(_) => self.tree.insert(APPLIED, bincode::serialize(&checkpoint)?)?,
                None => self.tree.remove(APPLIED)?,
            };
        }
        // Read after the start-up sync of the state (storage::Durability::open).
        *self.checkpoint.lock().unwrap_or_else(|p| p.into_inner()) = Checkpoint {
            written: checkpoint,
            durable: checkpoint,
        };
        Ok(())
    }
}

/// A snapshot here is the state machine's own sled tree: "building" one
/// makes that tree durable up to the applied index (so the log may be
/// purged behind it) and copies nothing. The bytes a lagging follower needs
/// are made on demand by `get_current_snapshot`, from the state as applied
/// at that moment. (Copying the whole queue every 20,000 entries made the
/// cost of a snapshot grow with the queue.)
impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let (applied, membership) = match self.pending.take() {
            Some(p) => p,
            None => self.applied_state().await?,
        };
        let err = |e: &dyn std::fmt::Display| io_err(ErrorSubject::StateMachine, ErrorVerb::Write, e);
        self.write_back().await?;
        // Bodies and log, then the state pointing at them ...
        self.durability.flush_all().await.map_err(|e| err(&e))?;
        // ... then the checkpoint, on disk before openraft learns of this
        // snapshot and purges the log behind it.
        self.write_checkpoint(applied)?;
        self.durability.flush_state().await.map_err(|e| err(&e))?;
        self.checkpoint_durable(applied);
        let empty = SnapshotFile::empty(self.durability.data_dir(), self.group)
            .map_err(|e| io_err(ErrorSubject::StateMachine, ErrorVerb::Write, e))?;
        Ok(Snapshot {
            meta: self.snapshot_meta(applied, membership),
            snapshot: Box::new(empty),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, Membership), StorageError> {
        let applied = self.lock_unwritten().applied;
        let membership = self.read::<Membership>(MEMBERSHIP)?.unwrap_or_default();
        Ok((applied, membership))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let err = |e: &dyn std::fmt::Display| io_err(ErrorSubject::StateMachine, ErrorVerb::Write, e);
        let mut batch = Writes::default();
        let mut responses = Vec::new();
        let mut last: Option<LogId> = None;
        // Message records changed by this run of entries, written at the end.
        let mut staged: BTreeMap<String, Option<MessageRecord>> = BTreeMap::new();
        let mut events = Vec::new();
        // Messages added minus removed by this run (for `message_count`).
        let mut added: i64 = 0;
        for entry in entries {
            last = Some(entry.log_id);
            let response = match entry.payload {
                EntryPayload::Blank => Response::default(),
                EntryPayload::Membership(m) => {
                    let stored = Membership::new(Some(entry.log_id), m);
                    batch.insert(MEMBERSHIP, bincode::serialize(&stored).map_err(|e| err(&e))?);
                    Response { changed: true }
                }
                EntryPayload::Normal(request) => {
                    let mut ctx = ApplyCtx {
                        sm: self,
                        staged: &mut staged,
                        events: &mut events,
                        added: &mut added,
                        batch: &mut batch,
                        index: entry.log_id.index,
                    };
                    self.rules.apply(&mut ctx, request)?
                }
            };
            responses.push(response);
        }
        if last.is_some() {
            // Other keys one write per key: a sled batch would seal sled's
            // IO buffer twice (two jobs for its IO thread pool) per apply.
            // A crash may keep part of this run; the start-up rolls back to
            // the last checkpoint and re-applies from there.
            batch.write(&self.tree).map_err(|e| err(&e))?;
            let mut unwritten = self.lock_unwritten();
            unwritten.records.extend(staged);
            unwritten.applied = last;
            self.messages.fetch_add(added, Ordering::Relaxed);
        }
        if let Some((tx, _)) = self.events.as_ref().filter(|(_, wanted)| wanted.load(Ordering::SeqCst)) {
            for e in events {
                let _ = tx.send(e);
            }
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        // Called in order with `apply`: the state to make durable.
        let mut builder = self.clone();
        builder.pending = self.applied_state().await.ok();
        builder
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotFile>, StorageError> {
        let file = SnapshotFile::receiving(self.durability.data_dir(), self.group)
            .map_err(|e| io_err(ErrorSubject::Snapshot(None), ErrorVerb::Write, e))?;
        Ok(Box::new(file))
    }

    async fn install_snapshot(&mut self, meta: &Meta, mut snapshot: Box<SnapshotFile>) -> Result<(), StorageError> {
        use tokio::io::{AsyncSeekExt as _, AsyncWriteExt as _};
        let err =
            |e: &dyn std::fmt::Display| io_err(ErrorSubject::Snapshot(Some(meta.signature())), ErrorVerb::Write, e);
        let data_dir = self.durability.data_dir().to_owned();
        snapshot.flush().await.map_err(|e| err(&e))?;
        let received = match snapshot.take_path() {
            Some(path) => path,
            None => {
                // Handed over whole (not received by chunks): copy it to a
                // file of its own first.
                let mut copy = SnapshotFile::receiving(&data_dir, self.group).map_err(|e| err(&e))?;
                snapshot.rewind().await.map_err(|e| err(&e))?;
                tokio::io::copy(&mut *snapshot, &mut copy).await.map_err(|e| err(&e))?;
                copy.flush().await.map_err(|e| err(&e))?;
                copy.take_path().ok_or_else(|| err(&"snapshot copy has no name"))?
            }
        };
        drop(snapshot);
        // The received file becomes the install's redo record: on disk,
        // under its final name, before the tree is touched.
        let redo = snapshot::install_path(&data_dir, self.group);
        let named = redo.clone();
        tokio::task::spawn_blocking(move || {
            let moved = std::fs::File::open(&received)
                .and_then(|f| f.sync_all())
                .and_then(|()| std::fs::rename(&received, &named))
                .and_then(|()| tern_store::sync_dir(&snapshot::dir(&data_dir)));
            if moved.is_err() {
                let _ = std::fs::remove_file(&received);
            }
            moved
        })
        .await
        .map_err(|e| err(&e))?
        .map_err(|e| err(&e))?;
        self.install_from(&redo, Some(meta), true)
            .await
            .map_err(|e| err(&format!("installing snapshot {}: {e:#}", meta.snapshot_id)))
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let err = |e: &dyn std::fmt::Display| io_err(ErrorSubject::StateMachine, ErrorVerb::Read, e);
        let first = !std::mem::replace(&mut self.started, true);
        let (applied, membership) = self.applied_state().await?;
        if applied.is_none() {
            return Ok(None);
        }
        // openraft's start-up asks only for the snapshot's id: no bytes yet.
        if first {
            let empty = SnapshotFile::empty(self.durability.data_dir(), self.group).map_err(|e| err(&e))?;
            return Ok(Some(Snapshot {
                meta: self.snapshot_meta(applied, membership),
                snapshot: Box::new(empty),
            }));
        }
        // On the state machine's task, in order with applies: consistent
        // (no apply runs until this returns).
        self.write_back().await?;
        let applied = self.read::<Option<LogId>>(APPLIED)?.flatten();
        let membership = self.read::<Membership>(MEMBERSHIP)?.unwrap_or_default();
        let meta = self.snapshot_meta(applied, membership);
        let started = std::time::Instant::now();
        let (sm, m) = (self.clone(), meta.clone());
        let (file, messages, bytes) = tokio::task::spawn_blocking(move || sm.write_snapshot_file(&m))
            .await
            .map_err(|e| err(&e))?
            .map_err(|e| err(&format!("building snapshot {}: {e:#}", meta.snapshot_id)))?;
        tracing::info!(
            group = self.group,
            snapshot = %meta.snapshot_id,
            messages,
            bytes,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "snapshot built for a lagging replica"
        );
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(SnapshotFile::unnamed(file)),
        }))
    }
}

impl Records for StateMachine {
    fn group(&self) -> GroupId {
        self.group
    }

    fn wal(&self) -> &Wal {
        &self.wal
    }

    fn tree(&self) -> &sled::Tree {
        &self.tree
    }

    fn message(&self, id: &str) -> Result<Option<MessageRecord>, StorageError> {
        StateMachine::message(self, id)
    }
}
