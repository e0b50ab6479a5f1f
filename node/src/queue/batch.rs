//! Write batching per shard. openraft 0.9 appends each client write to the
//! log as its own command and waits for that append to be durable before it
//! runs the next, so concurrent writes to one group cost one fsync each, in
//! series. Here concurrent messages for one shard wait while earlier writes
//! are in flight and then go as one `EnqueueMany` entry: one append, one
//! fsync, one AppendEntries per follower and one apply for all of them.
//!
//! The shard leader's delivery outcomes (from the QueueShard actor) take the
//! same path: outcomes and the messages accepted meanwhile go as one
//! `Outcomes` entry, its new messages after the bounces. Not with the
//! durable event outbox (`[[webhook]]`): it must tell new mail (a `received`
//! event) from the bounces (none), and an `Outcomes` entry does not say
//! which is which, so there a batch holds new mail or outcomes, not both.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot, Semaphore};

use super::WRITE_TIMEOUT;
use crate::raft::groups::GroupHandle;
use crate::raft::{GroupId, NewMessage, OutcomeUpdate, Raft, Request};

/// Writes of one shard in flight at once. A single-replica shard appends the
/// next batch while the previous one is applied. A replicated shard has one
/// write in flight: what arrives meanwhile waits for the round to the
/// followers and goes as one entry. Each entry costs three fsyncs and four
/// RPCs, so on a busy machine bigger batches beat overlapped rounds (10 KiB
/// at 10 sessions over three nodes: 7-15 % more messages per second and
/// 9-14 % less CPU per message than with two in flight, bench/RESULTS.md).
const IN_FLIGHT_SINGLE: usize = 2;
const IN_FLIGHT_REPLICATED: usize = 1;
/// Bounds of one batch: a follower's AppendEntries carries about 1 MiB of
/// bodies, and a batch is one entry.
const MAX_MESSAGES: usize = 64;
const MAX_BYTES: usize = 1 << 20;

/// What a writer hands to a shard's batcher.
enum Work {
    Message(NewMessage),
    /// Results of delivery attempts with the bounces they cause.
    Outcomes {
        updates: Vec<OutcomeUpdate>,
        bounces: Vec<NewMessage>,
    },
}

impl Work {
    fn body_bytes(&self) -> usize {
        match self {
            Work::Message(m) => m.body.bytes.len(),
            Work::Outcomes { bounces, .. } => bounces.iter().map(|b| b.body.bytes.len()).sum(),
        }
    }
}

struct Pending {
    raft: Raft,
    work: Work,
    done: oneshot::Sender<Result<(), WriteError>>,
}

/// Writes waiting for one shard's writer at most. Far above what the
/// sessions and the shard actor have outstanding (a batch takes 64); when
/// it is full, writers wait for room (backpressure), nothing is dropped.
pub const WRITER_INBOX: usize = 4096;

/// The handle of one shard's writer task: its bounded inbox and its load.
/// The task is owned by [`Batchers`]: it ends when the handle is replaced
/// or dropped (its inbox closes), and a writer that died (a panic) is
/// started again on the next write, with a warning and a count.
struct Writer {
    tx: mpsc::Sender<Pending>,
    /// Messages submitted and not answered yet (queued or in flight).
    load: Arc<AtomicUsize>,
    in_flight: usize,
    task: tokio::task::JoinHandle<()>,
}

/// One writer task per shard this node has written to.
#[derive(Default)]
pub struct Batchers {
    shards: Mutex<HashMap<GroupId, Writer>>,
    /// Counts writers started again after they died.
    restarts: crate::metrics::Restarts,
    /// New mail may share an `Outcomes` entry only while the event outbox is off.
    outbox: crate::outbox::Switch,
}

impl Batchers {
    /// Messages waiting or in flight for `shard`.
    pub fn load(&self, shard: GroupId) -> usize {
        let shards = self.shards.lock().expect("batchers lock");
        shards.get(&shard).map_or(0, |b| b.load.load(Ordering::Relaxed))
    }

    /// Batchers that count restarted writers in `restarts`; new mail may
    /// go in the same entry as delivery outcomes while `outbox` is off (see
    /// the module docs).
    pub fn new(restarts: crate::metrics::Restarts, outbox: crate::outbox::Switch) -> Batchers {
        Batchers {
            shards: Mutex::default(),
            restarts,
            outbox,
        }
    }

    /// Writes `message` to `shard` (led here) with whatever else is waiting;
    /// Ok once the entry is applied, i.e. committed on a majority.
    pub async fn write(&self, shard: &GroupHandle, message: NewMessage) -> Result<(), WriteError> {
        self.submit(shard, Work::Message(message)).await
    }

    /// Writes delivery outcomes and their bounces to `shard` (led here) in
    /// one entry with whatever else is waiting; Ok once applied.
    pub async fn write_outcomes(
        &self,
        shard: &GroupHandle,
        updates: Vec<OutcomeUpdate>,
        bounces: Vec<NewMessage>,
    ) -> Result<(), WriteError> {
        self.submit(shard, Work::Outcomes { updates, bounces }).await
    }

    /// The inbox and load of `shard`'s writer, started (again) when there
    /// is none, the replica count changed, or the last one died.
    fn writer(&self, shard: &GroupHandle) -> (mpsc::Sender<Pending>, Arc<AtomicUsize>) {
        let mut shards = self.shards.lock().expect("batchers lock");
        let in_flight = if shard.replicated() {
            IN_FLIGHT_REPLICATED
        } else {
            IN_FLIGHT_SINGLE
        };
        let outbox = &self.outbox;
        let writer = shards
            .entry(shard.id)
            .or_insert_with(|| Writer::start(in_flight, outbox.clone()));
        if writer.in_flight != in_flight {
            // Replicas added or removed: a new task (the old one ends
            // once it has written what it holds).
            *writer = Writer::start(in_flight, outbox.clone());
        } else if writer.task.is_finished() {
            // Its inbox is open while the handle lives: it ended by a panic.
            tracing::warn!(shard = shard.id, "queue writer died; started again");
            self.restarts.inc("queue_writer");
            *writer = Writer::start(in_flight, outbox.clone());
        }
        (writer.tx.clone(), Arc::clone(&writer.load))
    }

    async fn submit(&self, shard: &GroupHandle, work: Work) -> Result<(), WriteError> {
        let (done, answer) = oneshot::channel();
        let pending = Pending {
            raft: shard.raft.clone(),
            work,
            done,
        };
        let (tx, load) = self.writer(shard);
        load.fetch_add(1, Ordering::Relaxed);
        let result = async {
            if let Err(mpsc::error::SendError(p)) = tx.send(pending).await {
                // Task gone (runtime shutting down, or it died): once more.
                let (tx, _) = self.writer(shard);
                tx.send(p).await.map_err(|_| WriteError::Stopped)?;
            }
            match tokio::time::timeout(WRITE_TIMEOUT, answer).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(WriteError::Stopped),
                Err(_) => Err(WriteError::Timeout(WRITE_TIMEOUT)),
            }
        }
        .await;
        load.fetch_sub(1, Ordering::Relaxed);
        result
    }
}

/// Why a queue write did not commit. The entry may or may not commit
/// later: the client must not be told 250.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
    #[error("queue writer stopped")]
    Stopped,
    #[error("not committed within {0:?}")]
    Timeout(std::time::Duration),
    /// Raft refused or failed the write (shutting down, storage error).
    #[error("{0}")]
    Raft(String),
    /// This node was not the leader: nothing was appended, so the message
    /// may go to another shard without risk of a duplicate.
    #[error("not the shard's leader")]
    NotLeader,
}

impl Writer {
    fn start(in_flight: usize, outbox: crate::outbox::Switch) -> Writer {
        let (tx, rx) = mpsc::channel(WRITER_INBOX);
        let task = tokio::spawn(run(rx, in_flight, outbox));
        Writer {
            tx,
            load: Arc::default(),
            in_flight,
            task,
        }
    }
}

/// Whether `next` may join a batch that starts with `first`.
fn joins(mix: bool, first: &Work, next: &Work) -> bool {
    mix || matches!(
        (first, next),
        (Work::Message(_), Work::Message(_)) | (Work::Outcomes { .. }, Work::Outcomes { .. })
    )
}

async fn run(mut rx: mpsc::Receiver<Pending>, in_flight: usize, outbox: crate::outbox::Switch) {
    let permits = Arc::new(Semaphore::new(in_flight));
    // A write of the other kind that ended the last batch: the next one's first.
    let mut carry: Option<Pending> = None;
    loop {
        let first = match carry.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        // Wait for a free slot before collecting: what arrives meanwhile
        // joins this batch.
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            return;
        };
        let raft = first.raft.clone();
        // Read per batch: a config reload may turn the outbox on or off.
        let mix = !outbox.is_on();
        let mut bytes = first.work.body_bytes();
        let mut batch = vec![first];
        while batch.len() < MAX_MESSAGES && bytes < MAX_BYTES {
            match rx.try_recv() {
                Ok(p) if joins(mix, &batch[0].work, &p.work) => {
                    bytes += p.work.body_bytes();
                    batch.push(p);
                }
                Ok(p) => {
                    carry = Some(p);
                    break;
                }
                Err(_) => break,
            }
        }
        tokio::spawn(async move {
            let (works, dones): (Vec<_>, Vec<_>) = batch.into_iter().map(|p| (p.work, p.done)).unzip();
            let request = request_of(works);
            let result = match tokio::time::timeout(WRITE_TIMEOUT, raft.client_write(request)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(openraft::error::RaftError::APIError(openraft::error::ClientWriteError::ForwardToLeader(
                    _,
                )))) => Err(WriteError::NotLeader),
                Ok(Err(e)) => Err(WriteError::Raft(e.to_string())),
                Err(_) => Err(WriteError::Timeout(WRITE_TIMEOUT)),
            };
            for done in dones {
                let _ = done.send(result.clone());
            }
            drop(permit);
        });
    }
}

/// One entry for a batch: `Enqueue` for one message, `EnqueueMany` for
/// several, `Outcomes` when delivery outcomes are among them (applying it
/// adds its bounces and then the new messages, each once, like the others).
fn request_of(works: Vec<Work>) -> Request {
    let mut messages = Vec::new();
    let mut outcomes: Option<(Vec<OutcomeUpdate>, Vec<NewMessage>)> = None;
    for work in works {
        match work {
            Work::Message(m) => messages.push(m),
            Work::Outcomes { updates, bounces } => {
                let (u, b) = outcomes.get_or_insert_with(Default::default);
                u.extend(updates);
                b.extend(bounces);
            }
        }
    }
    match outcomes {
        Some((updates, mut bounces)) => {
            bounces.extend(messages);
            Request::Outcomes { updates, bounces }
        }
        None if messages.len() == 1 => {
            let m = messages.remove(0);
            Request::Enqueue {
                record: m.record,
                body: m.body,
            }
        }
        None => Request::EnqueueMany { messages },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::message::MessageRecord;
    use crate::raft::Body;

    fn message(id: &str) -> Work {
        Work::Message(NewMessage {
            record: Box::new(MessageRecord::new(id.into(), Default::default(), 2, 0)),
            body: Body {
                bytes: b"x\n".to_vec(),
                loc: None,
            },
        })
    }

    fn outcome(id: &str, bounce: Option<&str>) -> Work {
        let update = OutcomeUpdate {
            id: id.into(),
            results: Vec::new(),
            attempts: 1,
            next_attempt: 0,
            delay_notified: false,
        };
        let bounces = bounce
            .map(|b| match message(b) {
                Work::Message(m) => m,
                Work::Outcomes { .. } => unreachable!(),
            })
            .into_iter()
            .collect();
        Work::Outcomes {
            updates: vec![update],
            bounces,
        }
    }

    fn ids(messages: &[NewMessage]) -> Vec<&str> {
        messages.iter().map(|m| m.record.id.as_str()).collect()
    }

    #[test]
    fn new_mail_alone_is_an_enqueue() {
        assert!(matches!(request_of(vec![message("A")]), Request::Enqueue { record, .. } if record.id == "A"));
        match request_of(vec![message("A"), message("B")]) {
            Request::EnqueueMany { messages } => assert_eq!(ids(&messages), ["A", "B"]),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn without_mixing_new_mail_and_outcomes_go_in_separate_batches() {
        let (m, o) = (message("A"), outcome("OLD", None));
        assert!(joins(true, &m, &o) && joins(true, &o, &m));
        assert!(!joins(false, &m, &o) && !joins(false, &o, &m));
        assert!(joins(false, &m, &message("B")) && joins(false, &o, &outcome("OLD2", None)));
    }

    #[test]
    fn outcomes_carry_the_new_mail_that_waited_with_them() {
        let works = vec![
            message("A"),
            outcome("OLD1", Some("BOUNCE1")),
            message("B"),
            outcome("OLD2", None),
        ];
        match request_of(works) {
            Request::Outcomes { updates, bounces } => {
                let updated: Vec<_> = updates.iter().map(|u| u.id.as_str()).collect();
                assert_eq!(updated, ["OLD1", "OLD2"]);
                assert_eq!(ids(&bounces), ["BOUNCE1", "A", "B"]);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
