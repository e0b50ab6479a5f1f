//! The Raft log of one group in sled, with bodies sideloaded into the
//! group's spool (see [`crate::storage`]).
//!
//! Trees: `g{N}/log` maps the big-endian index to the bincode entry (body
//! bytes replaced by their spool location); `g{N}/meta` holds the vote, the
//! committed log id and the last purged log id.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, RaftLogReader, Vote};

use super::{io_err, Entry, GroupId, LogId, NodeId, StorageError, TypeConfig};
use crate::storage::spool::Spool;
use crate::storage::Durability;

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const PURGED: &[u8] = b"purged";

/// Log storage of one group; cheap to clone (the clone is the log reader).
#[derive(Clone)]
pub struct LogStore {
    log: sled::Tree,
    meta: sled::Tree,
    spool: Arc<Spool>,
    durability: Arc<Durability>,
}

impl LogStore {
    pub fn open(durability: Arc<Durability>, spool: Arc<Spool>, group: GroupId) -> anyhow::Result<LogStore> {
        let db = durability.db();
        let store = LogStore {
            log: db.open_tree(format!("g{group}/log"))?,
            meta: db.open_tree(format!("g{group}/meta"))?,
            spool,
            durability,
        };
        store.count_spool_refs()?;
        Ok(store)
    }

    /// Tells the spool which segments the log still points into.
    fn count_spool_refs(&self) -> anyhow::Result<()> {
        let mut log_max = std::collections::HashMap::new();
        for item in self.log.iter() {
            let (_, v) = item?;
            let mut entry: Entry = bincode::deserialize(&v)?;
            if let EntryPayload::Normal(request) = &mut entry.payload {
                for body in request.bodies_mut() {
                    if let Some(loc) = body.loc {
                        let max = log_max.entry(loc.segment).or_insert(0);
                        *max = (*max).max(entry.log_id.index);
                    }
                }
            }
        }
        let purged: Option<LogId> = self.get_meta(PURGED).map_err(|e| anyhow::anyhow!("{e}"))?;
        self.spool.set_log_refs(log_max, purged.map(|l| l.index).unwrap_or(0));
        Ok(())
    }

    fn get_meta<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StorageError> {
        let read = |e: &dyn std::fmt::Display| io_err(ErrorSubject::Store, ErrorVerb::Read, e);
        match self.meta.get(key).map_err(|e| read(&e))? {
            None => Ok(None),
            Some(v) => bincode::deserialize(&v).map(Some).map_err(|e| read(&e)),
        }
    }

    fn put_meta<T: serde::Serialize>(&self, key: &[u8], value: &T) -> Result<(), StorageError> {
        let write = |e: &dyn std::fmt::Display| io_err(ErrorSubject::Store, ErrorVerb::Write, e);
        let bytes = bincode::serialize(value).map_err(|e| write(&e))?;
        self.meta.insert(key, bytes).map_err(|e| write(&e))?;
        Ok(())
    }

    /// Decodes a stored entry and loads its body back from the spool.
    fn decode(&self, bytes: &[u8]) -> Result<Entry, StorageError> {
        let mut entry: Entry =
            bincode::deserialize(bytes).map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
        let log_id = entry.log_id;
        if let EntryPayload::Normal(request) = &mut entry.payload {
            for body in request.bodies_mut() {
                if let Some(loc) = body.loc {
                    body.bytes = self
                        .spool
                        .read(&loc)
                        .map_err(|e| io_err(ErrorSubject::Log(log_id), ErrorVerb::Read, e))?;
                }
            }
        }
        Ok(entry)
    }

    fn last_entry_id(&self) -> Result<Option<LogId>, StorageError> {
        match self
            .log
            .last()
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?
        {
            None => Ok(None),
            Some((_, v)) => Ok(Some(self.decode_header(&v)?)),
        }
    }

    fn decode_header(&self, bytes: &[u8]) -> Result<LogId, StorageError> {
        // The log id is the entry's first field, so bincode can decode just it.
        bincode::deserialize::<LogId>(bytes).map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))
    }
}

fn key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&e) => Bound::Included(key(e)),
            Bound::Excluded(&e) => Bound::Excluded(key(e)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let mut out = Vec::new();
        for item in self.log.range((Bound::Included(key(start)), end)) {
            let (_, v) = item.map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
            out.push(self.decode(&v)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id: Option<LogId> = self.get_meta(PURGED)?;
        let last_log_id = self.last_entry_id()?.or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        self.put_meta(VOTE, vote)?;
        self.durability
            .flush()
            .await
            .map_err(|e| io_err(ErrorSubject::Vote, ErrorVerb::Write, e))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.get_meta(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Made durable by the next group commit; losing it only means
        // re-deriving the commit index from the log after a crash.
        self.put_meta(COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.get_meta::<Option<LogId>>(COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = sled::Batch::default();
        for mut entry in entries {
            let log_id = entry.log_id;
            if let EntryPayload::Normal(request) = &mut entry.payload {
                for body in request.bodies_mut() {
                    let loc = self
                        .spool
                        .append(&body.bytes)
                        .map_err(|e| io_err(ErrorSubject::Log(log_id), ErrorVerb::Write, e))?;
                    self.spool.logged(loc.segment, log_id.index);
                    body.loc = Some(loc);
                    body.bytes = Vec::new();
                }
            }
            let bytes =
                bincode::serialize(&entry).map_err(|e| io_err(ErrorSubject::Log(log_id), ErrorVerb::Write, e))?;
            batch.insert(&key(log_id.index), bytes);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Write, e))?;
        self.durability.flush_then(callback);
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        for item in self.log.range(key(log_id.index)..) {
            let (k, _) = item.map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
            batch.remove(k);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.put_meta(PURGED, &log_id)?;
        let mut batch = sled::Batch::default();
        for item in self.log.range(..=key(log_id.index)) {
            let (k, _) = item.map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
            batch.remove(k);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Delete, e))?;
        self.spool.log_purged(log_id.index);
        self.spool.reclaim();
        Ok(())
    }
}
