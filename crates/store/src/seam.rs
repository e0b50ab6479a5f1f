//! [`Store`]: what the Raft log store and the state machines need from the
//! node's storage, as a trait, so that a simulated disk (dropping unsynced
//! writes on command) or another engine can be put behind them and measured
//! against the sled + write-ahead-log implementation, [`Durability`].
//!
//! Callers are generic over it (static dispatch): nothing on the per-message
//! path becomes a virtual call or an allocation.

use std::future::Future;

use crate::wal::{Batch, GroupId, Kind};
use crate::{BodyLoc, Durability, FlushError, Flushed};

/// A node's storage as the Raft layer uses it: appends of log records and
/// bodies, reads of bodies, durability (group commit), and the reference
/// counts that free the log behind delivered messages.
pub trait Store: Send + Sync + 'static {
    /// What an append hands [`Store::flush_then`].
    type Flushed: Flushed;

    /// Appends records (entries, bodies, marks) as one batch, not yet durable.
    fn append<T>(&self, records: impl FnOnce(&mut Batch) -> std::io::Result<T>) -> std::io::Result<T>;
    /// Appends one record (a body a state machine received without a location).
    fn append_one(&self, kind: Kind, group: GroupId, payload: &[u8]) -> std::io::Result<BodyLoc>;
    /// Reads the record at `loc`.
    fn read(&self, loc: &BodyLoc) -> std::io::Result<Vec<u8>>;
    /// Whether `loc` is covered by a durable flush.
    fn is_durable(&self, loc: &BodyLoc) -> bool;
    /// A queued message's body holds the segment `segment`.
    fn retain(&self, segment: u64);
    /// A message holding `segment` is final.
    fn release(&self, segment: u64);
    /// Calls `callback` once everything appended so far is durable.
    fn flush_then(&self, callback: Self::Flushed);
    /// Waits until everything appended so far is durable.
    fn flush(&self) -> impl Future<Output = Result<(), FlushError>> + Send;
    /// Waits until every state write so far is durable (not the log).
    fn flush_state(&self) -> impl Future<Output = Result<(), FlushError>> + Send;
}

impl<F: Flushed> Store for Durability<F> {
    type Flushed = F;

    fn append<T>(&self, records: impl FnOnce(&mut Batch) -> std::io::Result<T>) -> std::io::Result<T> {
        self.wal().write(records)
    }

    fn append_one(&self, kind: Kind, group: GroupId, payload: &[u8]) -> std::io::Result<BodyLoc> {
        self.wal().write_one(kind, group, payload)
    }

    fn read(&self, loc: &BodyLoc) -> std::io::Result<Vec<u8>> {
        self.wal().read(loc)
    }

    fn is_durable(&self, loc: &BodyLoc) -> bool {
        self.wal().is_durable(loc)
    }

    fn retain(&self, segment: u64) {
        self.wal().retain(segment)
    }

    fn release(&self, segment: u64) {
        self.wal().release(segment)
    }

    fn flush_then(&self, callback: F) {
        Durability::flush_then(self, callback)
    }

    fn flush(&self) -> impl Future<Output = Result<(), FlushError>> + Send {
        Durability::flush(self)
    }

    fn flush_state(&self) -> impl Future<Output = Result<(), FlushError>> + Send {
        Durability::flush_state(self)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A body written through the trait is durable after a flush and reads back.
    async fn body_round_trip(store: &impl Store) {
        let loc = store.append_one(Kind::Body, 1, b"body").unwrap();
        store.retain(loc.segment);
        store.flush().await.unwrap();
        assert!(store.is_durable(&loc));
        assert_eq!(store.read(&loc).unwrap(), b"body");
        store.release(loc.segment);
        store.flush_state().await.unwrap();
    }

    #[tokio::test]
    async fn durability_serves_as_a_store() {
        let dir = tempfile::tempdir().unwrap();
        let durability = Durability::<crate::NoCallback>::open(dir.path()).unwrap();
        body_round_trip(&*durability).await;
    }
}
