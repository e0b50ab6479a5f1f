//! The seam between Raft's state machine mechanics and the rules of what a
//! request means: [`StateMachine`](super::state_machine::StateMachine)
//! stages, writes back, checkpoints and snapshots; an [`Apply`] (the node's
//! queue and control rules) decides what each replicated [`Request`] changes,
//! through an [`ApplyCtx`].

use std::collections::BTreeMap;

use openraft::{ErrorSubject, ErrorVerb};

use super::{io_err, Body, GroupId, Request, Response, StorageError};
use tern_model::record::MessageRecord;
use tern_store::wal::{Kind, Wal};

/// The rules of a group's requests: called once per applied entry, in log
/// order, with the changes of the run of entries being applied so far.
/// Every request must be idempotent (the log is re-applied from the last
/// checkpoint after a crash).
pub trait Apply: Send + Sync + 'static {
    fn apply(&self, ctx: &mut ApplyCtx<'_>, request: Request) -> Result<Response, StorageError>;
}

/// What applying one request may read and change: message records (staged
/// in memory, written back at the next checkpoint), other keys of the
/// group's tree (written when the run of entries ends), apply events for
/// the shard's scheduler, and the count of queued messages.
pub struct ApplyCtx<'a> {
    pub(super) sm: &'a dyn Records,
    pub(super) staged: &'a mut BTreeMap<String, Option<MessageRecord>>,
    pub(super) events: &'a mut Vec<SmEvent>,
    pub(super) added: &'a mut i64,
    pub(super) batch: &'a mut Writes,
    /// Log index of the entry being applied.
    pub(super) index: u64,
}

impl ApplyCtx<'_> {
    /// The group applying.
    pub fn group(&self) -> GroupId {
        self.sm.group()
    }

    /// Log index of the entry being applied: the same on every replica,
    /// so keys derived from it (the event outbox's) are too.
    pub fn index(&self) -> u64 {
        self.index
    }

    /// The node's write-ahead log (bodies: written, retained, released).
    pub fn wal(&self) -> &Wal {
        self.sm.wal()
    }

    /// A message record as this run has left it (`None`: absent or removed).
    pub fn message(&self, id: &str) -> Result<Option<MessageRecord>, StorageError> {
        if let Some(r) = self.staged.get(id) {
            return Ok(r.clone());
        }
        self.sm.message(id)
    }

    /// Whether `id` was staged by this run (even as a removal) or is stored.
    pub fn knows_message(&self, id: &str) -> Result<bool, StorageError> {
        Ok(self.staged.contains_key(id) || self.sm.message(id)?.is_some())
    }

    /// Stages a new message with its body unless its id exists (a retried
    /// proposal is a no-op): the body the log store sideloaded is reused,
    /// else written once to the log here. True when it was new.
    pub fn stage_new(&mut self, mut record: Box<MessageRecord>, body: Body) -> Result<bool, StorageError> {
        if self.knows_message(&record.id)? {
            return Ok(false);
        }
        let loc = match body.loc {
            Some(loc) => loc,
            None => self
                .wal()
                .write_one(Kind::Body, self.group(), &body.bytes)
                .map_err(|e| write_error(&e))?,
        };
        self.wal().retain(loc.segment);
        record.body = Some(loc);
        self.event(SmEvent::Scheduled {
            id: record.id.clone(),
            due: record.next_attempt,
        });
        self.stage(record.id.clone(), Some(*record));
        Ok(true)
    }

    /// Stages a message record (`None` removes it).
    pub fn stage(&mut self, id: String, record: Option<MessageRecord>) {
        self.staged.insert(id, record);
    }

    /// An event for the shard's scheduler, sent once the run is applied.
    pub fn event(&mut self, event: SmEvent) {
        self.events.push(event);
    }

    /// Messages added (or, negative, removed) in the group.
    pub fn count(&mut self, delta: i64) {
        *self.added += delta;
    }

    /// Whether the tree holds `key` (as written before this run).
    pub fn contains_key(&self, key: &[u8]) -> Result<bool, StorageError> {
        self.sm.tree().contains_key(key).map_err(|e| write_error(&e))
    }

    /// The value of `key` as written before this run (changes this run
    /// staged with [`ApplyCtx::insert`] are not seen).
    pub fn get(&self, key: &[u8]) -> Result<Option<sled::IVec>, StorageError> {
        self.sm.tree().get(key).map_err(|e| write_error(&e))
    }

    /// The value of `key` with this run's own writes seen (a check-then-write
    /// rule, e.g. one idempotency key per batch, must see an earlier entry
    /// of the same run).
    pub fn get_latest(&self, key: &[u8]) -> Result<Option<sled::IVec>, StorageError> {
        match self.batch.latest(key) {
            Some(value) => Ok(value.cloned()),
            None => self.get(key),
        }
    }

    /// Keys with `prefix` as written before this run, in order.
    pub fn scan_prefix(&self, prefix: &[u8]) -> sled::Iter {
        self.sm.tree().scan_prefix(prefix)
    }

    /// Sets `key` when the run ends.
    pub fn insert(&mut self, key: impl Into<sled::IVec>, value: impl Into<sled::IVec>) {
        self.batch.insert(key, value);
    }

    /// Removes `key` when the run ends.
    pub fn remove(&mut self, key: impl Into<sled::IVec>) {
        self.batch.remove(key);
    }
}

/// What the context reads of the state machine applying (implemented by
/// [`StateMachine`](super::state_machine::StateMachine)): the records as
/// written back, the group's tree and the node's log.
pub(crate) trait Records: Sync {
    fn group(&self) -> GroupId;
    fn wal(&self) -> &Wal;
    fn tree(&self) -> &sled::Tree;
    fn message(&self, id: &str) -> Result<Option<MessageRecord>, StorageError>;
}

/// What applying entries changed, for the shard's scheduler.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SmEvent {
    /// A message is pending, due at unix seconds `due` (0: now).
    Scheduled { id: String, due: i64 },
    /// A message is final and gone from the queue.
    Removed { id: String },
}

/// Writes of one apply, made one key at a time in order (see `apply`).
#[derive(Default)]
pub struct Writes(Vec<(sled::IVec, Option<sled::IVec>)>);

impl Writes {
    pub(crate) fn insert(&mut self, key: impl Into<sled::IVec>, value: impl Into<sled::IVec>) {
        self.0.push((key.into(), Some(value.into())));
    }

    pub(crate) fn remove(&mut self, key: impl Into<sled::IVec>) {
        self.0.push((key.into(), None));
    }

    /// This run's last write of `key`: `Some(None)` removed, `None` untouched.
    fn latest(&self, key: &[u8]) -> Option<Option<&sled::IVec>> {
        self.0.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_ref())
    }

    pub(crate) fn write(self, tree: &sled::Tree) -> sled::Result<()> {
        for (k, v) in self.0 {
            match v {
                Some(v) => tree.insert(k, v)?,
                None => tree.remove(k)?,
            };
        }
        Ok(())
    }
}

/// A failure to apply, as openraft's storage error.
pub fn write_error(e: &dyn std::fmt::Display) -> StorageError {
    io_err(ErrorSubject::StateMachine, ErrorVerb::Write, e)
}
