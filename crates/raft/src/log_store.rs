//! The Raft log of one group, in the node's write-ahead log (see
//! [`tern_store::wal`]): each entry is a record, each body it carries a
//! record of its own written in the same `pwrite` ("sideloading": the
//! state machine keeps the body's location instead of a second copy).
//! The index from log index to record is kept in memory, rebuilt by replay.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, RaftLogReader, Vote};

use super::state_machine::PurgeFloor;
use super::{io_err, Entry, GroupId, LogId, NodeId, StorageError, TypeConfig};
use crate::Durability;
use tern_store::wal::{BodyLoc, GroupIndex, Kind, Wal};

/// Body bytes of the entries appended last that are kept in memory.
const RECENT_BYTES: usize = 512 << 10;

/// What the log store keeps in memory.
struct State {
    index: GroupIndex,
    last: Option<LogId>,
    purged: Option<LogId>,
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId>,
    /// The entries appended last, consecutive, with their bodies: openraft
    /// reads an entry back within milliseconds of appending it (to send it
    /// to each follower, and to apply it), and this spares those reads of
    /// the log, each a `pread`, a checksum and a decode.
    recent: VecDeque<Recent>,
    recent_bytes: usize,
}

/// A recently appended entry (bodies by location) and its bodies' bytes.
struct Recent {
    entry: Entry,
    bodies: Vec<Vec<u8>>,
}

impl State {
    fn cached(&self, index: u64, with_bodies: bool) -> Option<Entry> {
        let first = self.recent.front()?.entry.log_id.index;
        let r = self.recent.get(usize::try_from(index.checked_sub(first)?).ok()?)?;
        let mut entry = r.entry.clone();
        if let (true, EntryPayload::Normal(request)) = (with_bodies, &mut entry.payload) {
            for (body, bytes) in request.bodies_mut().into_iter().zip(&r.bodies) {
                body.bytes = bytes.clone();
            }
        }
        Some(entry)
    }

    /// Forgets cached entries from `index` on.
    fn forget_from(&mut self, index: u64) {
        while self.recent.back().is_some_and(|r| r.entry.log_id.index >= index) {
            self.pop_recent(false);
        }
    }

    /// Forgets cached entries up to `index`.
    fn forget_to(&mut self, index: u64) {
        while self.recent.front().is_some_and(|r| r.entry.log_id.index <= index) {
            self.pop_recent(true);
        }
    }

    fn pop_recent(&mut self, front: bool) {
        let r = if front {
            self.recent.pop_front()
        } else {
            self.recent.pop_back()
        };
        if let Some(r) = r {
            self.recent_bytes -= r.bodies.iter().map(Vec::len).sum::<usize>();
        }
    }

    fn remember(&mut self, entry: Entry, bodies: Vec<Vec<u8>>) {
        let index = entry.log_id.index;
        self.forget_from(index);
        if self.recent.back().is_some_and(|r| r.entry.log_id.index + 1 != index) {
            self.forget_from(0);
        }
        self.recent_bytes += bodies.iter().map(Vec::len).sum::<usize>();
        self.recent.push_back(Recent { entry, bodies });
        while self.recent_bytes > RECENT_BYTES && self.recent.len() > 1 {
            self.pop_recent(true);
        }
    }
}

/// Log storage of one group; cheap to clone (the clone is the log reader).
#[derive(Clone)]
pub struct LogStore {
    group: GroupId,
    wal: Arc<Wal>,
    durability: Arc<Durability>,
    state: Arc<Mutex<State>>,
    /// Whether reads load bodies back. openraft applies entries read from
    /// the store itself, and applying needs only each body's location;
    /// replication reads through the log reader, which loads them.
    bodies: bool,
    /// The state machine's durable checkpoint: no purge goes past it, or a
    /// crash could leave a state older than the log's first entry.
    floor: Option<PurgeFloor>,
}

fn decode<T: serde::de::DeserializeOwned>(bytes: Option<Vec<u8>>) -> anyhow::Result<Option<T>> {
    Ok(match bytes {
        Some(b) => Some(bincode::deserialize(&b)?),
        None => None,
    })
}

impl LogStore {
    pub fn open(durability: Arc<Durability>, group: GroupId) -> anyhow::Result<LogStore> {
        let wal = Arc::clone(durability.wal());
        let replayed = wal.take_replayed(group);
        let purged: Option<LogId> = decode(replayed.purged.map(|p| p.get(8..).unwrap_or_default().to_vec()))?;
        let store = LogStore {
            group,
            wal,
            durability,
            state: Arc::new(Mutex::new(State {
                index: replayed.index,
                last: purged,
                purged,
                vote: decode(replayed.vote)?,
                committed: decode::<Option<LogId>>(replayed.committed)?.flatten(),
                recent: VecDeque::new(),
                recent_bytes: 0,
            })),
            bodies: false,
            floor: None,
        };
        if let Some(last) = store.last_index() {
            let entry = store.read_entry(last).map_err(|e| anyhow::anyhow!("{e}"))?;
            store.lock().last = Some(entry.log_id);
        }
        Ok(store)
    }

    /// Purges every entry this log holds, for a group this node has closed
    /// for good (a retired shard): its log segments can then be reclaimed.
    /// Only once its Raft has stopped; nothing reads the log afterwards.
    pub async fn forget_all(&self) -> anyhow::Result<()> {
        let (last, purged) = {
            let state = self.lock();
            (state.last, state.purged)
        };
        let Some(last) = last else { return Ok(()) };
        if purged >= Some(last) {
            return Ok(());
        }
        self.write_mark(Kind::Purge, &last.index.to_le_bytes(), &last)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        {
            let mut state = self.lock();
            state.index.purge_to(last.index);
            state.forget_to(last.index);
            state.purged = Some(last);
        }
        self.wal.log_purged(self.group, last.index);
        Ok(())
    }

    /// Limits purges to the state machine's durable checkpoint.
    pub fn set_purge_floor(&mut self, floor: PurgeFloor) {
        self.floor = Some(floor);
    }

    /// A clone that reads entries with their bodies (for replication).
    pub fn reader(&self) -> LogStore {
        LogStore {
            bodies: true,
            ..self.clone()
        }
    }

    /// Index of the last entry held, if any.
    pub(crate) fn last_index(&self) -> Option<u64> {
        let state = self.lock();
        (!state.index.is_empty()).then(|| state.index.next() - 1)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn loc(&self, index: u64) -> Result<BodyLoc, StorageError> {
        self.lock().index.get(index).ok_or_else(|| {
            io_err(
                ErrorSubject::Logs,
                ErrorVerb::Read,
                format!("group {} has no log entry {index}", self.group),
            )
        })
    }

    /// Reads entry `index`, and for the log reader its bodies too.
    fn read_entry(&self, index: u64) -> Result<Entry, StorageError> {
        if let Some(entry) = self.lock().cached(index, self.bodies) {
            return Ok(entry);
        }
        let read = |e: &dyn std::fmt::Display| io_err(ErrorSubject::Logs, ErrorVerb::Read, e);
        let record = self.wal.read(&self.loc(index)?).map_err(|e| read(&e))?;
        let mut entry: Entry = bincode::deserialize(record.get(8..).unwrap_or_default()).map_err(|e| read(&e))?;
        let log_id = entry.log_id;
        if let (true, EntryPayload::Normal(request)) = (self.bodies, &mut entry.payload) {
            for body in request.bodies_mut() {
                if let Some(loc) = body.loc {
                    body.bytes = self
                        .wal
                        .read(&loc)
                        .map_err(|e| io_err(ErrorSubject::Log(log_id), ErrorVerb::Read, e))?;
                }
            }
        }
        Ok(entry)
    }

    async fn write_mark<T: serde::Serialize>(&self, kind: Kind, prefix: &[u8], value: &T) -> Result<(), StorageError> {
        let write = |e: &dyn std::fmt::Display| io_err(ErrorSubject::Store, ErrorVerb::Write, e);
        let bytes = bincode::serialize(value).map_err(|e| write(&e))?;
        let record = [prefix, &bytes].concat();
        self.write_holding_back(|| self.wal.write_one(kind, self.group, &record))
            .await
            .map_err(|e| write(&e))?;
        Ok(())
    }

    /// Runs a log write, retrying it once space is back when it fails for
    /// lack of space: an error returned to openraft stops the group for
    /// good, while a late write only delays it (the group's other replicas
    /// go on without this one). A write that failed wrote nothing the log
    /// counts: the next one starts where it started.
    async fn write_holding_back<T>(&self, mut write: impl FnMut() -> std::io::Result<T>) -> std::io::Result<T> {
        let space = self.durability.space();
        let mut held = false;
        loop {
            match write() {
                Err(e) if space.trip(&e) && !space.is_stopping() => {
                    if !held {
                        tracing::warn!(group = self.group, error = %e, "log write held back until disk space is freed");
                        held = true;
                    }
                    space.wait_writable().await;
                }
                other => {
                    if held {
                        tracing::info!(group = self.group, "held-back log write done");
                    }
                    return other;
                }
            }
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let (first, next) = {
            let state = self.lock();
            (state.index.first(), state.index.next())
        };
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        }
        .max(first);
        let end = match range.end_bound() {
            Bound::Included(&e) => e.saturating_add(1),
            Bound::Excluded(&e) => e,
            Bound::Unbounded => u64::MAX,
        }
        .min(next);
        (start..end).map(|i| self.read_entry(i)).collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let state = self.lock();
        Ok(LogState {
            last_purged_log_id: state.purged,
            last_log_id: state.last.or(state.purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.reader()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        self.write_mark(Kind::Vote, &[], vote).await?;
        self.lock().vote = Some(*vote);
        self.durability
            .flush()
            .await
            .map_err(|e| io_err(ErrorSubject::Vote, ErrorVerb::Write, e))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        Ok(self.lock().vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Made durable by the next group commit; losing it only means
        // re-deriving the commit index from the log after a crash.
        if self.lock().committed == committed {
            return Ok(());
        }
        self.write_mark(Kind::Committed, &[], &committed).await?;
        self.lock().committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.lock().committed)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let group = self.group;
        // Bodies out of their entries first, so that a write that failed for
        // lack of space can be made again from the same input.
        let mut input: Vec<(Entry, Vec<Vec<u8>>)> = Vec::new();
        for mut entry in entries {
            let mut bodies = Vec::new();
            if let EntryPayload::Normal(request) = &mut entry.payload {
                for body in request.bodies_mut() {
                    bodies.push(std::mem::take(&mut body.bytes));
                }
            }
            input.push((entry, bodies));
        }
        // While the disk is full, new entries wait rather than eat the
        // reserve that applying what is already logged (sled) needs.
        let space = Arc::clone(self.durability.space());
        if space.is_full() {
            tracing::warn!(group, "log append held back: disk full");
            space.wait_writable().await;
        }
        let mut written = Vec::new();
        let result = self
            .write_holding_back(|| {
                written.clear();
                self.wal.write(|batch| {
                    for (entry, bodies) in &mut input {
                        let log_id = entry.log_id;
                        if let EntryPayload::Normal(request) = &mut entry.payload {
                            for (body, bytes) in request.bodies_mut().into_iter().zip(bodies.iter()) {
                                body.loc = Some(batch.push(Kind::Body, group, bytes)?);
                            }
                        }
                        let mut payload = log_id.index.to_le_bytes().to_vec();
                        bincode::serialize_into(&mut payload, &*entry).map_err(std::io::Error::other)?;
                        let loc = batch.push(Kind::Entry, group, &payload)?;
                        batch.refer(group, log_id.index);
                        written.push(loc);
                    }
                    Ok(())
                })
            })
            .await;
        result.map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Write, e))?;
        {
            let mut state = self.lock();
            for (loc, (entry, bodies)) in written.into_iter().zip(input) {
                state.index.place(entry.log_id.index, loc);
                state.last = Some(entry.log_id);
                state.remember(entry, bodies);
            }
        }
        self.durability.flush_then(crate::LogFlushed(callback));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let err = |e: &dyn std::fmt::Display| io_err(ErrorSubject::Logs, ErrorVerb::Delete, e);
        let group = self.group;
        let last = self.lock().index.next().saturating_sub(1);
        self.write_holding_back(|| {
            self.wal.write(|batch| {
                batch.push(Kind::Truncate, group, &log_id.index.to_le_bytes())?;
                // The truncated entries may sit in older segments: keep this
                // record until they are purged, or a replay would revive them.
                batch.refer(group, last);
                Ok(())
            })
        })
        .await
        .map_err(|e| err(&e))?;
        {
            let mut state = self.lock();
            state.index.truncate_from(log_id.index);
            state.forget_from(log_id.index);
            state.last = state.purged;
        }
        if let Some(i) = self.last_index() {
            let entry = self.read_entry(i)?;
            self.lock().last = Some(entry.log_id);
        }
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // openraft purges only behind a snapshot, and a snapshot's id is a
        // durable checkpoint; this keeps that true whatever calls purge.
        let log_id = match self.floor.as_ref().map(PurgeFloor::get) {
            Some(floor) if floor.is_none_or(|f| f.index < log_id.index) => {
                tracing::error!(group = self.group, requested = %log_id, ?floor, "purge past the durable checkpoint held back");
                match floor {
                    Some(f) if self.lock().purged.is_none_or(|p| p.index < f.index) => f,
                    _ => return Ok(()),
                }
            }
            _ => log_id,
        };
        self.write_mark(Kind::Purge, &log_id.index.to_le_bytes(), &log_id)
            .await?;
        {
            let mut state = self.lock();
            state.index.purge_to(log_id.index);
            state.forget_to(log_id.index);
            state.purged = Some(log_id);
            if state.index.is_empty() {
                state.last = state.last.max(Some(log_id));
            }
        }
        // The checkpointer reclaims the segments this frees.
        self.wal.log_purged(self.group, log_id.index);
        if tern_store::failpoint::is_armed("abort-after-purge") {
            let _ = self.durability.flush().await;
            tern_store::failpoint::abort("abort-after-purge");
        }
        Ok(())
    }
}
