//! Write batching per shard. openraft 0.9 appends each client write to the
//! log as its own command and waits for that append to be durable before it
//! runs the next, so concurrent writes to one group cost one fsync each, in
//! series. Here concurrent messages for one shard wait while earlier writes
//! are in flight and then go as one `EnqueueMany` entry: one append, one
//! fsync, one AppendEntries per follower and one apply for all of them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot, Semaphore};

use super::WRITE_TIMEOUT;
use crate::raft::groups::GroupHandle;
use crate::raft::{GroupId, NewMessage, Raft, Request};

/// Writes of one shard in flight at once: the next batch is appended while
/// the previous one is being replicated and applied.
const IN_FLIGHT: usize = 2;
/// Bounds of one batch: a follower's AppendEntries carries about 1 MiB of
/// bodies, and a batch is one entry.
const MAX_MESSAGES: usize = 64;
const MAX_BYTES: usize = 1 << 20;

struct Pending {
    raft: Raft,
    message: NewMessage,
    done: oneshot::Sender<Result<(), String>>,
}

struct Batcher {
    tx: mpsc::UnboundedSender<Pending>,
    /// Messages submitted and not answered yet (queued or in flight).
    load: Arc<AtomicUsize>,
}

/// One batcher task per shard this node has written to.
#[derive(Default)]
pub struct Batchers {
    shards: Mutex<HashMap<GroupId, Batcher>>,
}

impl Batchers {
    /// Messages waiting or in flight for `shard`.
    pub fn load(&self, shard: GroupId) -> usize {
        let shards = self.shards.lock().expect("batchers lock");
        shards.get(&shard).map_or(0, |b| b.load.load(Ordering::Relaxed))
    }

    /// Writes `message` to `shard` (led here) with whatever else is waiting;
    /// Ok once the entry is applied, i.e. committed on a majority.
    pub async fn write(&self, shard: &GroupHandle, message: NewMessage) -> Result<(), String> {
        let (done, answer) = oneshot::channel();
        let pending = Pending {
            raft: shard.raft.clone(),
            message,
            done,
        };
        let load = {
            let mut shards = self.shards.lock().expect("batchers lock");
            let batcher = shards.entry(shard.id).or_insert_with(Batcher::start);
            let pending = match batcher.tx.send(pending) {
                Ok(()) => None,
                Err(mpsc::error::SendError(p)) => Some(p), // task gone (runtime shutting down)
            };
            if let Some(p) = pending {
                *batcher = Batcher::start();
                if batcher.tx.send(p).is_err() {
                    return Err("queue writer stopped".into());
                }
            }
            batcher.load.fetch_add(1, Ordering::Relaxed);
            Arc::clone(&batcher.load)
        };
        let result = match tokio::time::timeout(WRITE_TIMEOUT, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err("queue writer stopped".into()),
            Err(_) => Err(format!("not committed within {WRITE_TIMEOUT:?}")),
        };
        load.fetch_sub(1, Ordering::Relaxed);
        result
    }
}

impl Batcher {
    fn start() -> Batcher {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(rx));
        Batcher {
            tx,
            load: Arc::default(),
        }
    }
}

async fn run(mut rx: mpsc::UnboundedReceiver<Pending>) {
    let permits = Arc::new(Semaphore::new(IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        // Wait for a free slot before collecting: what arrives meanwhile
        // joins this batch.
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            return;
        };
        let raft = first.raft.clone();
        let mut bytes = first.message.body.bytes.len();
        let mut batch = vec![first];
        while batch.len() < MAX_MESSAGES && bytes < MAX_BYTES {
            match rx.try_recv() {
                Ok(p) => {
                    bytes += p.message.body.bytes.len();
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        tokio::spawn(async move {
            let (mut messages, dones): (Vec<_>, Vec<_>) = batch.into_iter().map(|p| (p.message, p.done)).unzip();
            let request = match messages.len() {
                1 => {
                    let m = messages.remove(0);
                    Request::Enqueue {
                        record: m.record,
                        body: m.body,
                    }
                }
                _ => Request::EnqueueMany { messages },
            };
            let result = match tokio::time::timeout(WRITE_TIMEOUT, raft.client_write(request)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("not committed within {WRITE_TIMEOUT:?}")),
            };
            for done in dones {
                let _ = done.send(result.clone());
            }
            drop(permit);
        });
    }
}
