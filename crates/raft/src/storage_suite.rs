//! openraft's own storage test suite run against the log store (over the
//! node's write-ahead log) and the sled state machine, plus Tern-specific
//! checks of body sideloading. Requests are applied by [`EnqueueOnly`], the
//! least of the node's queue rules these need; the node's suite
//! (node/src/raft/storage_suite.rs) runs its rules over the same mechanics.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{Entry, EntryPayload, LogId, RaftLogReader};

use super::apply::{Apply, ApplyCtx};
use super::log_store::LogStore;
use super::state_machine::StateMachine;
use super::{Body, Request, Response, StorageError, TypeConfig};
use crate::Durability;
use tern_model::record::MessageRecord;

/// Queues what `Enqueue` carries (as the node's queue rules do: the body
/// sideloaded once, the record staged, the message counted); every other
/// request changes nothing.
struct EnqueueOnly;

impl Apply for EnqueueOnly {
    fn apply(&self, ctx: &mut ApplyCtx<'_>, request: Request) -> Result<Response, StorageError> {
        let Request::Enqueue { record, body } = request else {
            return Ok(Response { changed: false });
        };
        let changed = ctx.stage_new(record, body)?;
        ctx.count(i64::from(changed));
        Ok(Response { changed })
    }
}

struct Builder;

async fn open(dir: &std::path::Path) -> (LogStore, StateMachine) {
    crate::testing::open(dir, Arc::new(EnqueueOnly)).await
}

async fn reopen(dir: &std::path::Path) -> (LogStore, StateMachine) {
    crate::testing::reopen(dir, Arc::new(EnqueueOnly)).await
}

async fn open_with(durability: Arc<Durability>) -> (LogStore, StateMachine) {
    crate::testing::open_with(durability, Arc::new(EnqueueOnly)).await
}

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError> {
        let dir = tempfile::tempdir().unwrap();
        let (log, sm) = open(dir.path()).await;
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    Suite::test_all(Builder).unwrap();
}

fn enqueue_entry(index: u64, id: &str, body: &[u8]) -> Entry<TypeConfig> {
    let record = MessageRecord::new(id.into(), Default::default(), body.len() as u64, 0);
    Entry {
        log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(Request::Enqueue {
            record: Box::new(record),
            body: Body {
                bytes: body.to_vec(),
                loc: None,
            },
        }),
    }
}

/// Bodies are written once to the write-ahead log, read back from the log, reused
/// by the state machine, and survive reopening the store.
#[tokio::test]
async fn bodies_are_sideloaded_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let big = vec![b'x'; 300 * 1024];
    {
        let (mut log, mut sm) = open(dir.path()).await;
        let entries = vec![enqueue_entry(1, "A", b"hello\r\n"), enqueue_entry(2, "B", &big)];
        log.blocking_append(entries).await.unwrap();
        let read = log.try_get_log_entries(1..3).await.unwrap();
        let responses = sm.apply(read).await.unwrap();
        assert!(responses.iter().all(|r| r.changed));
        // Applying the same entry again (replay after a crash) is a no-op.
        let again = log.try_get_log_entries(1..2).await.unwrap();
        assert!(!sm.apply(again).await.unwrap()[0].changed);
        assert_eq!(sm.message_count(), 2);
        // As the checkpointer (or a clean stop) does.
        sm.write_back().await.unwrap();
    }
    let (mut log, sm) = reopen(dir.path()).await;
    assert_eq!(sm.message_count(), 2, "counted again at open");
    // Replication reads bodies back; applying needs only where they are.
    let entries = log.reader().try_get_log_entries(1..3).await.unwrap();
    match &entries[1].payload {
        EntryPayload::Normal(Request::Enqueue { body, .. }) => assert_eq!(body.bytes, big),
        other => panic!("unexpected {other:?}"),
    }
    let entries = log.try_get_log_entries(1..3).await.unwrap();
    match &entries[1].payload {
        EntryPayload::Normal(Request::Enqueue { body, .. }) => assert!(body.bytes.is_empty() && body.loc.is_some()),
        other => panic!("unexpected {other:?}"),
    }
    let record = sm.message("B").unwrap().unwrap();
    assert_eq!(sm.wal().read(&record.body.unwrap()).unwrap(), big);
    // Bodies stay out of sled: no blob files.
    let blobs = std::fs::read_dir(dir.path().join("sled/blobs")).unwrap().count();
    assert_eq!(blobs, 0, "sled wrote blob files");
}

/// Entries just appended are read back from memory: the same entry, with
/// its bodies for the log reader and without for apply; a truncation and a
/// new append at the same index, and a purge, are seen at once.
#[tokio::test]
async fn recent_entries_read_back_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _sm) = open(dir.path()).await;
    let body_of = |e: &Entry<TypeConfig>| match &e.payload {
        EntryPayload::Normal(Request::Enqueue { body, .. }) => body.clone(),
        other => panic!("unexpected {other:?}"),
    };
    let entries: Vec<_> = (1..=4)
        .map(|i| enqueue_entry(i, &format!("m{i}"), format!("body {i}").as_bytes()))
        .collect();
    log.blocking_append(entries).await.unwrap();
    let read = log.reader().try_get_log_entries(1..5).await.unwrap();
    assert_eq!(read.len(), 4);
    assert_eq!(body_of(&read[2]).bytes, b"body 3");
    assert!(body_of(&read[2]).loc.is_some());
    assert!(body_of(&log.try_get_log_entries(3..4).await.unwrap()[0])
        .bytes
        .is_empty());

    log.truncate(read[2].log_id).await.unwrap();
    log.blocking_append(vec![enqueue_entry(3, "n3", b"new 3")])
        .await
        .unwrap();
    let read = log.reader().try_get_log_entries(1..10).await.unwrap();
    assert_eq!(read.len(), 3, "entry 4 is gone");
    assert_eq!(body_of(&read[2]).bytes, b"new 3");

    log.purge(read[1].log_id).await.unwrap();
    let read = log.reader().try_get_log_entries(1..10).await.unwrap();
    assert_eq!(read.iter().map(|e| e.log_id.index).collect::<Vec<_>>(), vec![3]);

    // What is read from memory equals what is read from the log.
    let (reopened, _sm2) = {
        drop(log);
        drop(_sm);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match Durability::open(dir.path()) {
                Ok(d) => break open_with(d).await,
                Err(e) => assert!(std::time::Instant::now() < deadline, "{e:#}"),
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    assert_eq!(reopened.reader().try_get_log_entries(1..10).await.unwrap(), read);
}

/// A group closed for good (a retired shard) purges its whole log: the
/// segments that held only its entries are reclaimed, and the log stays
/// empty when the node opens again.
#[tokio::test]
async fn a_forgotten_log_frees_its_segments_and_stays_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let body = vec![b'y'; 2048];
    {
        let durability = Durability::open_with(
            dir.path(),
            tern_store::StorageMetrics::default(),
            8192,
            tern_store::DEFAULT_CACHE_BYTES,
            tern_store::OnSyncError::Fail,
        )
        .unwrap();
        let (mut log, _sm) = open_with(Arc::clone(&durability)).await;
        // One append each: a segment fills up between writes, not within one.
        for i in 1..=40 {
            log.blocking_append([enqueue_entry(i, &format!("m{i}"), &body)])
                .await
                .unwrap();
        }
        durability.flush_all().await.unwrap();
        let before = durability.wal().segment_files();
        assert!(before >= 8, "the entries span several segments: {before}");
        assert!(durability.take_reclaimable().is_empty(), "nothing is purged yet");

        log.forget_all().await.unwrap();
        durability.flush_all().await.unwrap();
        let doomed = durability.take_reclaimable();
        // (The purge record may have opened a new segment: then all go.)
        assert!(
            doomed.len() >= before - 1,
            "every closed segment goes: {doomed:?} of {before}"
        );
        durability.retire(doomed);
        assert_eq!(durability.wal().segment_files(), 1, "the segment being written stays");
        // Redone (after a crash, say): nothing more to write.
        log.forget_all().await.unwrap();
    }
    let (mut log, _sm) = reopen(dir.path()).await;
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id.map(|l| l.index), Some(40));
    assert_eq!(state.last_log_id.map(|l| l.index), Some(40));
    assert!(log.try_get_log_entries(1..41).await.unwrap().is_empty());
}
