//! The node's queue rules over tern-raft's log store and state machine:
//! batched enqueues, outcomes, bounces, write-back, checkpoints, space and
//! snapshots. (openraft's own suite and the sideloading checks run in
//! tern-raft, crates/raft/src/storage_suite.rs.)

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use openraft::storage::{RaftLogStorageExt, RaftStateMachine};
use openraft::{Entry, EntryPayload, LogId, RaftLogReader};

use crate::queue::message::MessageRecord;
use crate::raft::log_store::LogStore;
use crate::raft::state_machine::StateMachine;
use crate::raft::Durability;
use crate::raft::{Body, Request, TypeConfig};

async fn open(dir: &std::path::Path) -> (LogStore, StateMachine) {
    crate::raft::testing::open(dir, Arc::new(QueueRules)).await
}

async fn reopen(dir: &std::path::Path) -> (LogStore, StateMachine) {
    crate::raft::testing::reopen(dir, Arc::new(QueueRules)).await
}

async fn open_with(durability: Arc<Durability>) -> (LogStore, StateMachine) {
    crate::raft::testing::open_with(durability, Arc::new(QueueRules)).await
}

pub(crate) fn enqueue_entry(index: u64, id: &str, body: &[u8]) -> Entry<TypeConfig> {
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

/// Several messages in one entry (concurrent sessions batched): each body is
/// sideloaded, each message queued, and a replay adds none twice.
#[tokio::test]
async fn batched_enqueue_queues_every_message_once() {
    use crate::raft::NewMessage;
    let dir = tempfile::tempdir().unwrap();
    let (mut log, mut sm) = open(dir.path()).await;
    let message = |id: &str, body: &[u8]| NewMessage {
        record: Box::new(MessageRecord::new(id.into(), Default::default(), body.len() as u64, 0)),
        body: Body {
            bytes: body.to_vec(),
            loc: None,
        },
    };
    let entry = Entry {
        log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), 1),
        payload: EntryPayload::Normal(Request::EnqueueMany {
            messages: vec![
                message("A", b"first\r\n"),
                message("B", b"second\r\n"),
                message("C", &[b'c'; 5000]),
            ],
        }),
    };
    log.blocking_append([entry]).await.unwrap();
    match &log.reader().try_get_log_entries(1..2).await.unwrap()[0].payload {
        EntryPayload::Normal(Request::EnqueueMany { messages }) => {
            assert_eq!(messages.len(), 3);
            assert_eq!(messages[1].body.bytes, b"second\r\n");
        }
        other => panic!("unexpected {other:?}"),
    }
    let read = log.try_get_log_entries(1..2).await.unwrap();
    assert!(sm.apply(read).await.unwrap()[0].changed);
    assert_eq!(sm.message_count(), 3);
    for (id, body) in [("A", b"first\r\n".to_vec()), ("C", vec![b'c'; 5000])] {
        let record = sm.message(id).unwrap().unwrap();
        assert_eq!(sm.wal().read(&record.body.unwrap()).unwrap(), body);
    }
    let again = log.try_get_log_entries(1..2).await.unwrap();
    assert!(!sm.apply(again).await.unwrap()[0].changed, "a replay changes nothing");
    assert_eq!(sm.message_count(), 3);
}

/// Spool segments are deleted once no queued message and no unpurged log
/// entry points into them, and never the one being written.
#[tokio::test]
async fn final_messages_free_their_log_segments() {
    use crate::envelope::{Envelope, Recipient};
    use crate::queue::message::RcptStatus;
    use crate::raft::{OutcomeUpdate, RcptResult};
    use openraft::storage::RaftLogStorage;

    let dir = tempfile::tempdir().unwrap();
    let durability = Durability::open_with(
        dir.path(),
        Default::default(),
        1024,
        crate::storage::DEFAULT_CACHE_BYTES,
        crate::storage::OnSyncError::Fail,
    )
    .unwrap();
    let wal = Arc::clone(durability.wal());
    let (mut log, mut sm) = open_with(Arc::clone(&durability)).await;
    let envelope = Envelope {
        recipients: vec![Recipient {
            address: "r@example.test".into(),
            notify: Default::default(),
            orcpt: None,
        }],
        ..Envelope::default()
    };
    // One append per message: each fills a segment of its own (plus the one opened at start).
    for (i, id) in ["A", "B", "C", "D"].iter().enumerate() {
        let mut e = enqueue_entry(i as u64 + 1, id, &[b'x'; 900]);
        if let EntryPayload::Normal(Request::Enqueue { record, .. }) = &mut e.payload {
            record.envelope = envelope.clone();
            record.rcpt_state = vec![Default::default()];
        }
        log.blocking_append([e]).await.unwrap();
    }
    sm.apply(log.try_get_log_entries(1..5).await.unwrap()).await.unwrap();
    assert_eq!(wal.segment_files(), 4);
    assert_eq!(sm.message_count(), 4);

    let done = |id: &str| OutcomeUpdate {
        id: id.into(),
        results: vec![RcptResult {
            index: 0,
            status: RcptStatus::Delivered,
            reply: "250 ok".into(),
        }],
        attempts: 1,
        next_attempt: 0,
        delay_notified: false,
    };
    let outcomes = Entry {
        log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), 5),
        payload: EntryPayload::Normal(Request::Outcomes {
            updates: vec![done("A"), done("B"), done("D")],
            bounces: Vec::new(),
        }),
    };
    log.blocking_append([outcomes.clone()]).await.unwrap();
    sm.apply([outcomes]).await.unwrap();
    assert_eq!(sm.message_count(), 1, "A, B and D are final");
    // Still referenced by unpurged log entries.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert_eq!(wal.segment_files(), 5, "the outcome started a fifth segment");

    log.purge(LogId::new(openraft::CommittedLeaderId::new(1, 1), 5))
        .await
        .unwrap();
    // Nothing goes before the removals are written back and flushed ...
    assert_eq!(wal.segment_files(), 5);
    // ... which the checkpointer does every second (Host::checkpoint_all).
    let doomed = durability.take_reclaimable();
    sm.write_back().await.unwrap();
    durability.flush_all().await.unwrap();
    durability.retire(doomed);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    // A and B go; C is still queued; D's goes too (the outcome is in the fifth, being written).
    while wal.segment_files() != 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} segments left",
            wal.segment_files()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let record = sm.message("C").unwrap().unwrap();
    assert_eq!(sm.wal().read(&record.body.unwrap()).unwrap(), vec![b'x'; 900]);
}

/// A lagging follower gets the queue as applied at the moment it is asked
/// for, bodies included; building a snapshot copies nothing.
#[tokio::test]
async fn snapshot_carries_queued_messages_and_bodies() {
    use openraft::RaftSnapshotBuilder;

    let leader_dir = tempfile::tempdir().unwrap();
    let (mut log, mut sm) = open(leader_dir.path()).await;
    // openraft's start-up call: meta only.
    assert!(
        sm.get_current_snapshot().await.unwrap().is_none(),
        "nothing applied yet"
    );
    let big = vec![b'y'; 200 * 1024];
    log.blocking_append(vec![enqueue_entry(1, "A", b"a\r\n"), enqueue_entry(2, "B", &big)])
        .await
        .unwrap();
    sm.apply(log.try_get_log_entries(1..3).await.unwrap()).await.unwrap();
    let mut built = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    assert_eq!(built.meta.last_log_id.map(|l| l.index), Some(2));
    let size = tokio::io::AsyncSeekExt::seek(&mut *built.snapshot, std::io::SeekFrom::End(0))
        .await
        .unwrap();
    assert_eq!(size, 0, "building copies nothing");

    let current = sm.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta.last_log_id, built.meta.last_log_id);
    let follower_dir = tempfile::tempdir().unwrap();
    let (_log, mut follower) = open(follower_dir.path()).await;
    follower
        .install_snapshot(&current.meta, current.snapshot)
        .await
        .unwrap();
    assert_eq!(follower.message_count(), 2);
    assert_eq!(follower.applied_state().await.unwrap().0, built.meta.last_log_id);
    let record = follower.message("B").unwrap().unwrap();
    assert_eq!(follower.wal().read(&record.body.unwrap()).unwrap(), big);
}

/// Applies A and checkpoints, applies B (written back to the tree or not),
/// then drops everything and opens the store again: it is back at the
/// checkpoint, with B in the tree only if it was written back. (Dropping
/// flushes sled, so this checks the roll-back logic, not durability; the
/// crash tests kill a child process: node/tests/e2e/durability.rs and the
/// power cuts of cluster-tests.)
async fn crash_after_a_checkpoint(dir: &std::path::Path, write_back_b: bool) -> (LogStore, StateMachine) {
    {
        let (mut log, mut sm) = open(dir).await;
        log.blocking_append(vec![enqueue_entry(1, "A", b"a"), enqueue_entry(2, "B", b"b")])
            .await
            .unwrap();
        sm.apply(log.try_get_log_entries(1..2).await.unwrap()).await.unwrap();
        let applied = sm.write_back().await.unwrap();
        sm.write_checkpoint(applied).unwrap();
        sm.apply(log.try_get_log_entries(2..3).await.unwrap()).await.unwrap();
        if write_back_b {
            sm.write_back().await.unwrap();
        }
        assert_eq!(sm.applied_state().await.unwrap().0.map(|l| l.index), Some(2));
        assert_eq!(sm.message_count(), 2);
    }
    let (log, mut sm) = reopen(dir).await;
    assert_eq!(
        sm.applied_state().await.unwrap().0.map(|l| l.index),
        Some(1),
        "back to the checkpoint"
    );
    (log, sm)
}

/// Writes are not flushed; at open the applied id goes back to the last
/// checkpoint (written after a full flush) and the log is re-applied from
/// there, which changes nothing already there.
#[tokio::test]
async fn open_rolls_back_to_the_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, mut sm) = crash_after_a_checkpoint(dir.path(), true).await;
    assert_eq!(sm.message_count(), 2);
    let again = sm.apply(log.try_get_log_entries(2..3).await.unwrap()).await.unwrap();
    assert!(!again[0].changed, "B was already there");
    assert_eq!(sm.message_count(), 2);
}

/// Applied message records wait in memory, where every reader sees them,
/// until a write-back puts them in the tree; removals too.
#[tokio::test]
async fn applied_records_are_written_back_in_one_go() {
    use crate::raft::state_machine::MESSAGE_PREFIX;

    let dir = tempfile::tempdir().unwrap();
    let (mut log, mut sm) = open(dir.path()).await;
    let entries: Vec<_> = ["A", "B", "C"]
        .iter()
        .enumerate()
        .map(|(i, id)| enqueue_entry(i as u64 + 1, id, id.as_bytes()))
        .collect();
    log.blocking_append(entries).await.unwrap();
    sm.apply(log.try_get_log_entries(1..3).await.unwrap()).await.unwrap();
    let in_tree = |sm: &StateMachine| sm.tree().scan_prefix(MESSAGE_PREFIX).count();
    let listed = |sm: &StateMachine| sm.messages().map(|r| r.unwrap().id).collect::<Vec<_>>();
    assert_eq!(in_tree(&sm), 0, "nothing written yet");
    assert_eq!(listed(&sm), ["A", "B"]);
    assert!(sm.message("B").unwrap().is_some());

    assert_eq!(sm.write_back().await.unwrap().map(|l| l.index), Some(2));
    assert_eq!(in_tree(&sm), 2);
    assert_eq!(sm.written_applied().unwrap().map(|l| l.index), Some(2));

    // C arrives and A is deleted: the tree still has A, no reader does.
    let delete_a = Entry {
        log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), 4),
        payload: EntryPayload::Normal(Request::QueueOp {
            action: crate::raft::QueueAction::Delete,
            ids: vec!["A".into()],
        }),
    };
    log.blocking_append([delete_a]).await.unwrap();
    sm.apply(log.try_get_log_entries(3..5).await.unwrap()).await.unwrap();
    assert_eq!(listed(&sm), ["B", "C"]);
    assert!(sm.message("A").unwrap().is_none());
    assert_eq!(sm.message_count(), 2);
    assert_eq!(in_tree(&sm), 2, "A and B, as written back");

    sm.write_back().await.unwrap();
    let ids: Vec<_> = sm
        .tree()
        .scan_prefix(MESSAGE_PREFIX)
        .map(|r| r.unwrap().0.to_vec())
        .collect();
    assert_eq!(ids, [b"m/B".to_vec(), b"m/C".to_vec()]);
    assert_eq!(listed(&sm), ["B", "C"]);
}

/// After a crash, what was applied but not written back is applied again
/// from the log (from the last checkpoint).
#[tokio::test]
async fn an_apply_lost_before_its_write_back_is_applied_again() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, mut sm) = crash_after_a_checkpoint(dir.path(), false).await;
    assert_eq!(sm.message_count(), 1, "B was never written");
    let again = sm.apply(log.try_get_log_entries(2..3).await.unwrap()).await.unwrap();
    assert!(again[0].changed, "B is queued again");
    assert_eq!(sm.messages().map(|r| r.unwrap().id).collect::<Vec<_>>(), ["A", "B"]);
}

/// A log append that fails for lack of space waits for space instead of
/// returning the error (which would stop the Raft group for good), and
/// lands whole once space is back. Mounts a tmpfs: tests run as root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_without_space_waits_for_space_then_lands() {
    struct Tmpfs(tempfile::TempDir);
    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.0.path())
                .status();
        }
    }
    let mnt = Tmpfs(tempfile::tempdir().unwrap());
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
        .arg(mnt.0.path())
        .status()
        .unwrap();
    assert!(mounted.success(), "mount tmpfs (tests run as root)");
    let durability = Durability::open_with(
        &mnt.0.path().join("data"),
        crate::metrics::StorageMetrics::default(),
        1 << 20,
        16 << 20,
        crate::storage::OnSyncError::Fail,
    )
    .unwrap();
    let (mut log, _sm) = open_with(Arc::clone(&durability)).await;
    log.blocking_append(vec![enqueue_entry(1, "A", b"a\r\n")])
        .await
        .unwrap();
    // Everything left goes to a file of the test's.
    let filler = mnt.0.path().join("filler");
    {
        use std::io::Write as _;
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 64 << 10];
        for _ in 0..1024 {
            if f.write_all(&chunk).is_err() {
                break;
            }
        }
    }
    let space = Arc::clone(durability.space());
    assert!(!space.is_full(), "no mark set: only a failed write trips it");
    // Larger than the zeros the segment has written ahead: needs new blocks.
    let big = vec![b'z'; 1536 << 10];
    let expected = big.clone();
    let append = tokio::spawn(async move {
        log.blocking_append(vec![enqueue_entry(2, "B", &big)])
            .await
            .map(|()| log)
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !space.is_full() {
        assert!(std::time::Instant::now() < deadline, "the failed write did not trip");
        if append.is_finished() {
            let ended = append.await.unwrap().map(|_| ());
            panic!("the append ended instead of waiting: {ended:?}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(!append.is_finished(), "held back while full");
    std::fs::remove_file(&filler).unwrap();
    // What the node's disk guard does once a second.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !append.is_finished() {
        assert!(std::time::Instant::now() < deadline, "the append did not resume");
        space.check();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let log = append.await.unwrap().unwrap();
    let mut reader = log.reader();
    let entries = reader.try_get_log_entries(1..3).await.unwrap();
    assert_eq!(entries.len(), 2);
    let EntryPayload::Normal(Request::Enqueue { body, .. }) = &entries[1].payload else {
        panic!("not an enqueue: {:?}", entries[1].payload);
    };
    assert!(body.bytes == expected, "the held-back body landed whole");
}

/// An administrator's bounce that lost a race with a delivery: recipients
/// already final keep their outcome, and the report is staged only when the
/// bounce changed a recipient, so no DSN for delivered mail and none twice.
/// Delivery outcomes never overwrite a final recipient either.
#[tokio::test]
async fn a_bounce_changes_only_pending_recipients_and_reports_only_what_it_changed() {
    use crate::envelope::{Envelope, Recipient};
    use crate::queue::message::RcptStatus;
    use crate::raft::{NewMessage, OutcomeUpdate, RcptResult};

    let dir = tempfile::tempdir().unwrap();
    let (_log, mut sm) = open(dir.path()).await;
    let rcpt = |a: &str| Recipient {
        address: a.into(),
        notify: Default::default(),
        orcpt: None,
    };
    let mut index = 0;
    let mut entry = |payload: Request| {
        index += 1;
        Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(payload),
        }
    };
    let message = |id: &str, n: usize| {
        let mut record = MessageRecord::new(
            id.into(),
            Envelope {
                reverse_path: "s@example.test".into(),
                recipients: (0..n).map(|i| rcpt(&format!("r{i}@example.test"))).collect(),
                ..Envelope::default()
            },
            3,
            0,
        );
        record.rcpt_state = vec![Default::default(); n];
        NewMessage {
            record: Box::new(record),
            body: Body {
                bytes: b"x\r\n".to_vec(),
                loc: None,
            },
        }
    };
    let result = |index: u32, status: RcptStatus| RcptResult {
        index,
        status,
        reply: format!("{status:?}"),
    };
    let update = |id: &str, results: Vec<RcptResult>| OutcomeUpdate {
        id: id.into(),
        results,
        attempts: 1,
        next_attempt: 0,
        delay_notified: false,
    };
    let report = |id: &str| Some(message(id, 1));
    let status = |sm: &StateMachine, id: &str| -> Option<Vec<RcptStatus>> {
        sm.message(id)
            .unwrap()
            .map(|r| r.rcpt_state.iter().map(|s| s.status).collect())
    };

    let new = entry(Request::EnqueueMany {
        messages: vec![message("A", 2), message("B", 1), message("C", 2)],
    });
    sm.apply([new]).await.unwrap();
    // A's first recipient and all of B delivered before the bounce is applied.
    let delivered = entry(Request::Outcomes {
        updates: vec![
            update("A", vec![result(0, RcptStatus::Delivered)]),
            update("B", vec![result(0, RcptStatus::Delivered)]),
        ],
        bounces: Vec::new(),
    });
    sm.apply([delivered]).await.unwrap();
    assert_eq!(status(&sm, "B"), None, "B is final");

    // A bounce decided on a view where nothing was delivered yet.
    let stale = entry(Request::Bounce {
        updates: vec![
            update("A", vec![result(0, RcptStatus::Failed), result(1, RcptStatus::Failed)]),
            update("B", vec![result(0, RcptStatus::Failed)]),
        ],
        reports: vec![report("DSN-A"), report("DSN-B")],
    });
    assert!(sm.apply([stale]).await.unwrap()[0].changed);
    assert!(
        sm.message("DSN-A").unwrap().is_some(),
        "A's second recipient was bounced"
    );
    assert!(sm.message("DSN-B").unwrap().is_none(), "no report for delivered mail");
    assert_eq!(status(&sm, "A"), None, "A is final: one delivered, one bounced");

    // The same bounce again (a retry): nothing changes, no second report.
    let again = entry(Request::Bounce {
        updates: vec![update("C", vec![result(0, RcptStatus::Failed)])],
        reports: vec![report("DSN-C1")],
    });
    sm.apply([again]).await.unwrap();
    let twice = entry(Request::Bounce {
        updates: vec![update("C", vec![result(0, RcptStatus::Failed)])],
        reports: vec![report("DSN-C2")],
    });
    assert!(!sm.apply([twice]).await.unwrap()[0].changed);
    assert!(sm.message("DSN-C1").unwrap().is_some());
    assert!(sm.message("DSN-C2").unwrap().is_none(), "one report per bounce");

    // A delivery outcome arriving after the bounce leaves the bounced recipient failed.
    let late = entry(Request::Outcomes {
        updates: vec![update(
            "C",
            vec![result(0, RcptStatus::Delivered), result(1, RcptStatus::Deferred)],
        )],
        bounces: Vec::new(),
    });
    sm.apply([late]).await.unwrap();
    assert_eq!(status(&sm, "C"), Some(vec![RcptStatus::Failed, RcptStatus::Deferred]));
}

/// A leader with `count` queued messages of `size` bytes each (bodies
/// differ), and its current snapshot, as a lagging follower is sent it.
async fn leader_with_queue(
    dir: &std::path::Path,
    count: u64,
    size: usize,
) -> (LogStore, StateMachine, openraft::Snapshot<TypeConfig>) {
    let (mut log, mut sm) = open(dir).await;
    assert!(sm.get_current_snapshot().await.unwrap().is_none(), "start-up call");
    let entries: Vec<_> = (1..=count)
        .map(|i| enqueue_entry(i, &format!("M{i:05}"), &body_of_message(i, size)))
        .collect();
    log.blocking_append(entries).await.unwrap();
    sm.apply(log.try_get_log_entries(1..count + 1).await.unwrap())
        .await
        .unwrap();
    let snapshot = sm.get_current_snapshot().await.unwrap().unwrap();
    (log, sm, snapshot)
}

fn body_of_message(i: u64, size: usize) -> Vec<u8> {
    let mut body = vec![b'a' + (i % 26) as u8; size];
    body[..8].copy_from_slice(&i.to_le_bytes());
    body
}

/// Moves `snapshot` to `follower` the way openraft's chunked transport
/// does: chunk by chunk into the file `begin_receiving_snapshot` gives.
async fn send_in_chunks(
    mut snapshot: openraft::Snapshot<TypeConfig>,
    follower: &mut StateMachine,
    chunk: usize,
) -> (
    openraft::SnapshotMeta<u64, openraft::BasicNode>,
    Box<crate::raft::snapshot::SnapshotFile>,
) {
    use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
    let mut received = follower.begin_receiving_snapshot().await.unwrap();
    snapshot.snapshot.rewind().await.unwrap();
    let mut buf = vec![0u8; chunk];
    let mut chunks = 0;
    loop {
        let n = snapshot.snapshot.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        received.write_all(&buf[..n]).await.unwrap();
        chunks += 1;
    }
    received.shutdown().await.unwrap();
    assert!(chunks > 3, "{chunks} chunks");
    (snapshot.meta, received)
}

fn snapshot_files(dir: &std::path::Path) -> Vec<String> {
    match std::fs::read_dir(dir.join("snapshots")) {
        Ok(d) => d
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// A snapshot bigger than one install batch and many chunks is installed,
/// and after reopening the store from disk every message and its body are
/// there; no snapshot file is left behind on either side.
#[tokio::test]
async fn a_large_snapshot_is_installed_in_batches_and_survives_reopen() {
    const COUNT: u64 = 60;
    const SIZE: usize = 200 * 1024; // 12 MB: two install batches
    let leader_dir = tempfile::tempdir().unwrap();
    let (_log, _leader, snapshot) = leader_with_queue(leader_dir.path(), COUNT, SIZE).await;
    let meta = snapshot.meta.clone();
    let follower_dir = tempfile::tempdir().unwrap();
    {
        let (_log, mut follower) = open(follower_dir.path()).await;
        // Something queued before, replaced by the snapshot.
        follower.apply([enqueue_entry(1, "OLD", b"old")]).await.unwrap();
        let (meta, received) = send_in_chunks(snapshot, &mut follower, 1 << 20).await;
        follower.install_snapshot(&meta, received).await.unwrap();
        assert_eq!(follower.message_count(), COUNT);
        assert!(follower.message("OLD").unwrap().is_none());
    }
    assert!(
        snapshot_files(leader_dir.path()).is_empty(),
        "{:?}",
        snapshot_files(leader_dir.path())
    );
    assert!(
        snapshot_files(follower_dir.path()).is_empty(),
        "{:?}",
        snapshot_files(follower_dir.path())
    );
    let (_log, mut follower) = reopen(follower_dir.path()).await;
    assert_eq!(follower.applied_state().await.unwrap().0, meta.last_log_id);
    assert_eq!(follower.message_count(), COUNT);
    let ids: Vec<_> = follower.messages().map(|r| r.unwrap().id).collect();
    assert_eq!(ids.len() as u64, COUNT);
    for (i, id) in (1..=COUNT).zip(&ids) {
        assert_eq!(id, &format!("M{i:05}"));
        let record = follower.message(id).unwrap().unwrap();
        assert_eq!(
            follower.wal().read(&record.body.unwrap()).unwrap(),
            body_of_message(i, SIZE),
            "{id}"
        );
    }
}

/// An install stopped part way (here after its first batch; a crash) is
/// finished from its redo file when the store opens again: the queue is
/// the snapshot's, whole, and leftover snapshot files are removed.
#[tokio::test]
async fn an_install_cut_short_is_finished_at_the_next_open() {
    const COUNT: u64 = 60;
    const SIZE: usize = 200 * 1024;
    let leader_dir = tempfile::tempdir().unwrap();
    let (_log, _leader, snapshot) = leader_with_queue(leader_dir.path(), COUNT, SIZE).await;
    let meta = snapshot.meta.clone();
    let follower_dir = tempfile::tempdir().unwrap();
    {
        let (_log, mut follower) = open(follower_dir.path()).await;
        follower.crash_install_after = Some(1);
        let (meta, received) = send_in_chunks(snapshot, &mut follower, 1 << 20).await;
        let err = follower.install_snapshot(&meta, received).await.unwrap_err();
        assert!(err.to_string().contains("stopped after 1"), "{err}");
        assert!(follower.message_count() < COUNT);
    }
    assert_eq!(snapshot_files(follower_dir.path()), ["g1.install"]);
    // Files of a build and a transfer a crash interrupted.
    for name in ["g1-7.part", "g1-8.build"] {
        std::fs::write(follower_dir.path().join("snapshots").join(name), b"x").unwrap();
    }
    let (_log, mut follower) = reopen(follower_dir.path()).await;
    assert!(
        snapshot_files(follower_dir.path()).is_empty(),
        "{:?}",
        snapshot_files(follower_dir.path())
    );
    assert_eq!(follower.applied_state().await.unwrap().0, meta.last_log_id);
    assert_eq!(follower.message_count(), COUNT);
    for i in 1..=COUNT {
        let record = follower.message(&format!("M{i:05}")).unwrap().unwrap();
        assert_eq!(
            follower.wal().read(&record.body.unwrap()).unwrap(),
            body_of_message(i, SIZE)
        );
    }
}

/// Defect 3 of issue 21: while a snapshot is installed, no message record
/// reaches the tree before its body is synced in the log (sled may be
/// flushed by another group's checkpoint at any moment, so a record in the
/// tree may be on disk at once). Every record inserted is checked, as it is
/// inserted, by a subscriber of the tree.
#[tokio::test]
async fn an_installed_record_never_points_at_an_unsynced_body() {
    use crate::raft::state_machine::{decode_message, MESSAGE_PREFIX};
    let leader_dir = tempfile::tempdir().unwrap();
    let (_log, _leader, snapshot) = leader_with_queue(leader_dir.path(), 60, 200 * 1024).await;
    let follower_dir = tempfile::tempdir().unwrap();
    let (_log, mut follower) = open(follower_dir.path()).await;
    let mut events = follower.tree().watch_prefix(MESSAGE_PREFIX);
    let wal = follower.wal();
    let checker = std::thread::spawn(move || {
        let (mut inserted, mut unsynced) = (0, Vec::new());
        // Ends when no insert came for a second (the install is over).
        while let Ok(event) = events.next_timeout(std::time::Duration::from_secs(1)) {
            if let sled::Event::Insert { key, value } = event {
                let record = decode_message(&key, &value).unwrap();
                inserted += 1;
                if !wal.is_durable(&record.body.unwrap()) {
                    unsynced.push(record.id);
                }
            }
        }
        (inserted, unsynced)
    });
    let (meta, received) = send_in_chunks(snapshot, &mut follower, 1 << 20).await;
    follower.install_snapshot(&meta, received).await.unwrap();
    let (inserted, unsynced) = checker.join().unwrap();
    assert_eq!(inserted, 60);
    assert!(
        unsynced.is_empty(),
        "records in the tree before their bodies were synced: {unsynced:?}"
    );
}

/// An API message leaves its final status (`f/<id>`) when it leaves the
/// queue, delivered or deleted (what was pending: cancelled); an idempotent
/// retry of it afterwards queues nothing; other mail leaves none; and
/// `PurgeFinal` removes the statuses of older ids.
#[tokio::test]
async fn api_messages_leave_a_final_status_and_are_not_queued_again() {
    use crate::envelope::{Envelope, Recipient};
    use crate::queue::message::RcptStatus;
    use crate::raft::{OutcomeUpdate, QueueAction, RcptResult};
    use tern_model::api::{final_key, FinalStatus};

    let dir = tempfile::tempdir().unwrap();
    let (mut log, mut sm) = open(dir.path()).await;
    let rcpt = |address: &str| Recipient {
        address: address.into(),
        notify: Default::default(),
        orcpt: None,
    };
    let api = Envelope {
        reverse_path: "app@example.org".into(),
        recipients: vec![rcpt("a@example.net"), rcpt("b@example.net")],
        envid: Some("b_batch1".into()),
        auth_user: Some("apikey:ci".into()),
        helo: "api".into(),
        ..Envelope::default()
    };
    // The same shape from SMTP: an ENVID and an AUTH user, but not a key.
    let smtp = Envelope {
        auth_user: Some("alice".into()),
        ..api.clone()
    };
    let enqueue = |index: u64, id: &str, envelope: &Envelope| {
        let mut e = enqueue_entry(index, id, b"Subject: x\r\n\r\nx\r\n");
        if let EntryPayload::Normal(Request::Enqueue { record, .. }) = &mut e.payload {
            record.envelope = envelope.clone();
            record.rcpt_state = vec![Default::default(); envelope.recipients.len()];
        }
        e
    };
    let normal = |index: u64, request: Request| Entry {
        log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(request),
    };
    let result = |index: u32, status: RcptStatus, reply: &str| RcptResult {
        index,
        status,
        reply: reply.into(),
    };
    let entries = vec![
        enqueue(1, "0001-A", &api),
        enqueue(2, "0001-S", &smtp),
        enqueue(3, "0002-C", &api),
        normal(
            4,
            Request::Outcomes {
                updates: ["0001-A", "0001-S"]
                    .into_iter()
                    .map(|id| OutcomeUpdate {
                        id: id.into(),
                        results: vec![
                            result(0, RcptStatus::Delivered, "250 ok"),
                            result(1, RcptStatus::Failed, "550 5.1.1 no such user"),
                        ],
                        attempts: 1,
                        next_attempt: 0,
                        delay_notified: false,
                    })
                    .collect(),
                bounces: Vec::new(),
            },
        ),
        normal(
            5,
            Request::Outcomes {
                updates: vec![OutcomeUpdate {
                    id: "0002-C".into(),
                    results: vec![result(1, RcptStatus::Deferred, "451 later")],
                    attempts: 1,
                    next_attempt: 9_999_999_999,
                    delay_notified: false,
                }],
                bounces: Vec::new(),
            },
        ),
        normal(
            6,
            Request::QueueOp {
                action: QueueAction::Delete,
                ids: vec!["0002-C".into()],
            },
        ),
        // The client's retry of the call, in the same run and in a later one.
        enqueue(7, "0001-A", &api),
    ];
    log.blocking_append(entries).await.unwrap();
    let responses = sm.apply(log.try_get_log_entries(1..8).await.unwrap()).await.unwrap();
    assert!(!responses[6].changed, "a retry in the run that finished it");
    log.blocking_append([enqueue(8, "0001-A", &api)]).await.unwrap();
    let responses = sm.apply(log.try_get_log_entries(8..9).await.unwrap()).await.unwrap();
    assert!(!responses[0].changed, "a retry after it was delivered queues nothing");
    assert_eq!(sm.message_count(), 0);
    assert!(sm.message("0001-A").unwrap().is_none());

    let tree = sm.tree();
    let status = |id: &str| -> Option<FinalStatus> {
        let v = tree.get(final_key(id)).unwrap()?;
        Some(bincode::deserialize(&v).unwrap())
    };
    let a = status("0001-A").unwrap();
    assert_eq!(
        a.rcpts,
        [
            ("a@example.net".into(), "delivered".into(), "250 ok".into()),
            ("b@example.net".into(), "failed".into(), "550 5.1.1 no such user".into()),
        ]
    );
    assert_eq!(a.batch.as_deref(), Some("b_batch1"));
    assert_eq!(a.attempts, 1);
    let c = status("0002-C").unwrap();
    let states: Vec<&str> = c.rcpts.iter().map(|r| r.1.as_str()).collect();
    assert_eq!(states, ["cancelled", "cancelled"], "deleted before any delivery");
    assert!(status("0001-S").is_none(), "mail not sent through the API leaves none");

    log.blocking_append([normal(9, Request::PurgeFinal { before: "0002".into() })])
        .await
        .unwrap();
    let responses = sm.apply(log.try_get_log_entries(9..10).await.unwrap()).await.unwrap();
    assert!(responses[0].changed);
    assert!(status("0001-A").is_none(), "older than the purge's id");
    assert!(status("0002-C").is_some());
}

/// The queue shard's rules alone (what a shard group applies).
struct QueueRules;

impl crate::raft::apply::Apply for QueueRules {
    fn apply(
        &self,
        ctx: &mut crate::raft::apply::ApplyCtx<'_>,
        request: crate::raft::Request,
    ) -> Result<crate::raft::Response, crate::raft::StorageError> {
        match super::apply::apply(ctx, request)? {
            Ok(response) => Ok(response),
            Err(request) => Err(crate::raft::apply::write_error(&format_args!(
                "not a queue request: {request:?}"
            ))),
        }
    }
}
