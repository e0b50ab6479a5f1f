//! The queue: where accepted messages go. A message is written to a shard
//! this node leads (no forwarding hop), through the shard's Raft group;
//! the SMTP session answers 250 only once the entry is applied.
//!
//! Delivery scheduling (the QueueShard actor) plugs in on the leader side
//! of each shard and reads the same records.

pub mod apply;
#[cfg(test)]
mod apply_suite;
pub mod batch;
pub mod handover;
pub mod lease;
pub use tern_model::record as message;
pub mod ops;
pub mod outcome;
pub mod schedule;
pub mod shard;
pub mod stats;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use message::MessageRecord;

use crate::envelope::Envelope;
use crate::raft::groups::GroupHandle;
use crate::raft::groups::Groups;
use crate::raft::{Body, NewMessage, NodeId};
use crate::smtp::{EnqueueError, Enqueuer, Reply};

/// How long a queue write may take before the client gets 451: a shard
/// leader cut off from its majority keeps leading but never commits.
pub const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Writes a replicated shard takes before new ones go to another shard.
const FILL: usize = 8;

/// Unique queue ids: milliseconds since the epoch, node id and a counter,
/// in fixed-width hex so they sort by arrival time.
pub struct IdGen {
    node: NodeId,
    seq: AtomicU64,
}

impl IdGen {
    pub fn new(node: NodeId) -> IdGen {
        IdGen {
            node,
            seq: AtomicU64::new(u64::from(rand::random::<u16>())),
        }
    }

    pub fn next(&self) -> String {
        let ms = chrono::Utc::now().timestamp_millis().max(0) as u64;
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        format!(
            "{:011X}{:04X}{:05X}",
            ms & 0xFFF_FFFF_FFFF,
            self.node & 0xFFFF,
            seq & 0xF_FFFF
        )
    }
}

/// The accept side of the queue, used by SMTP sessions.
pub struct QueueFront {
    node: NodeId,
    groups: Arc<Groups>,
    ids: Arc<IdGen>,
    next_shard: AtomicUsize,
    batchers: Arc<batch::Batchers>,
    /// For RCPT-time verification of local recipients.
    delivery: Arc<crate::delivery::Delivery>,
    /// For forwarding to a shard leader on another node.
    peers: Arc<crate::cluster::Peers>,
    /// Free space of the data directory: no new mail while the disk is full.
    space: Arc<crate::storage::space::DiskSpace>,
    /// `[fbl]`: feedback reports are taken here, before queueing (swapped
    /// by a config reload).
    fbl: arc_swap::ArcSwapOption<crate::fbl::Fbl>,
    /// The control group's shard records (added, retiring, retired).
    shard_records: crate::cluster::records::ShardRecordsCache,
}

impl QueueFront {
    pub fn new(
        node: NodeId,
        groups: Arc<Groups>,
        ids: Arc<IdGen>,
        delivery: Arc<crate::delivery::Delivery>,
        peers: Arc<crate::cluster::Peers>,
        batchers: Arc<batch::Batchers>,
        space: Arc<crate::storage::space::DiskSpace>,
    ) -> QueueFront {
        QueueFront {
            node,
            groups,
            ids,
            delivery,
            peers,
            next_shard: AtomicUsize::new(0),
            batchers,
            space,
            fbl: arc_swap::ArcSwapOption::empty(),
            shard_records: Default::default(),
        }
    }

    /// Takes feedback reports sent to the `[fbl]` addresses (see [`crate::fbl`]).
    pub fn with_fbl(self, fbl: Option<crate::fbl::Fbl>) -> QueueFront {
        self.set_fbl(fbl);
        self
    }

    /// `[fbl]` after a config reload: messages whose DATA ends from now on.
    pub fn set_fbl(&self, fbl: Option<crate::fbl::Fbl>) {
        self.fbl.store(fbl.map(Arc::new));
    }

    /// Writes a message to a shard this node leads (no forwarding hop), or
    /// else forwards it to a shard leader elsewhere; Ok once applied, which
    /// in a cluster means committed on a majority of the shard's replicas.
    pub async fn submit(&self, id: String, envelope: Envelope, body: Vec<u8>) -> Result<(), EnqueueError> {
        self.submit_at(id, envelope, body, 0).await
    }

    /// [`QueueFront::submit`] for a message the shard must not deliver
    /// before `not_before` (unix seconds, 0 = now): it becomes the record's
    /// `next_attempt`, which is replicated, so a new shard leader keeps the hold.
    pub async fn submit_at(
        &self,
        id: String,
        mut envelope: Envelope,
        body: Vec<u8>,
        not_before: i64,
    ) -> Result<(), EnqueueError> {
        if let Some(reply) = self.refusal() {
            // The disk filled during the transaction.
            return Err(EnqueueError::Rejected(reply));
        }
        if let Some(fbl) = self.fbl.load_full() {
            if envelope.recipients.iter().any(|r| fbl.is_report_address(&r.address)) {
                fbl.receive(&id, &envelope, &body).await?;
                if !fbl.keep() {
                    // Consumed: only the message's other recipients are queued.
                    envelope.recipients.retain(|r| !fbl.is_report_address(&r.address));
                    if envelope.recipients.is_empty() {
                        return Ok(());
                    }
                }
            }
        }
        let shards = self.routable_shards();
        let led: Vec<_> = shards.iter().filter(|g| g.leader() == Some(self.node)).collect();
        let received_at = chrono::Utc::now().timestamp();
        let received = Received::of(&envelope, &body);
        let mut record = MessageRecord::new(id.clone(), envelope, body.len() as u64, received_at);
        record.next_attempt = not_before.max(0);
        let turn = self.next_shard.fetch_add(1, Ordering::Relaxed);
        if !led.is_empty() {
            let shard = self.pick(&led, turn);
            let message = NewMessage {
                record: Box::new(record),
                body: Body { bytes: body, loc: None },
            };
            // The shard may have lost its leader or its majority mid-write: the
            // entry may or may not commit, so the client must retry (never 250).
            // A copy to forward if leadership moves; a single-replica shard
            // (one node, the benchmark's case) keeps its leader, so no copy.
            let spare = shard.replicated().then(|| message.clone());
            match self.batchers.write(shard, message).await {
                Ok(()) => {
                    received.log(&id, shard.id, false);
                    return Ok(());
                }
                // Leadership moved before the entry was appended (an election,
                // a leader hand-over): nothing was written, so the message
                // goes to a shard's current leader below instead of a 451.
                Err(batch::WriteError::NotLeader) if let Some(message) = spare => {
                    tracing::info!(msg_id = %id, shard = shard.id, "no longer the shard's leader: forwarding");
                    return self.forward(&id, &received, turn, message).await;
                }
                Err(failure) => {
                    tracing::warn!(msg_id = %id, shard = shard.id, error = %failure, "enqueue failed");
                    return Err(EnqueueError::Temporary("queue write failed, try again later".into()));
                }
            }
        }
        let message = NewMessage {
            record: Box::new(record),
            body: Body { bytes: body, loc: None },
        };
        self.forward(&id, &received, turn, message).await
    }

    /// Sends a new message to the leader of a shard this node replicates,
    /// or through any replica when it holds none.
    async fn forward(
        &self,
        id: &str,
        received: &Received,
        turn: usize,
        message: NewMessage,
    ) -> Result<(), EnqueueError> {
        let shards = self.routable_shards();
        // No shard led here: forward to the leader of one we replicate.
        let with_leader: Vec<_> = shards.iter().filter(|g| g.leader().is_some()).collect();
        if with_leader.is_empty() {
            // No replica here at all (more nodes than replicas): via any replica.
            return match self.peers.forward_enqueue_anywhere(turn, &message).await {
                Ok(shard) => {
                    received.log(id, shard, true);
                    Ok(())
                }
                Err(e) => {
                    tracing::warn!(msg_id = %id, error = %e, "forwarded enqueue failed");
                    Err(EnqueueError::Temporary(
                        "no queue shard available, try again later".into(),
                    ))
                }
            };
        }
        let shard = with_leader[turn % with_leader.len()];
        match self.peers.forward_enqueue(shard, &message).await {
            Ok(()) => {
                received.log(id, shard.id, true);
                Ok(())
            }
            Err(e) => {
                tracing::warn!(msg_id = %id, shard = shard.id, error = %e, "forwarded enqueue failed");
                Err(EnqueueError::Temporary("queue write failed, try again later".into()))
            }
        }
    }
}

impl QueueFront {
    /// The shards hosted here that new mail may go to: not being added,
    /// retiring or retired (`ternctl shard add|retire`).
    fn routable_shards(&self) -> Vec<GroupHandle> {
        let records = self.shard_records.get(&self.groups);
        let mut shards = self.groups.shards();
        shards.retain(|g| crate::cluster::shards::routable(&records, g.id));
        shards
    }

    /// The led shard for the next message. Replicated shards: one that
    /// already has writes waiting or in flight (fewer than [`FILL`]) so that
    /// they share a batch and its AppendEntries, else an idle one in turn,
    /// the least loaded when all are busy. Single-replica shards in turn:
    /// there an entry costs no round trip, and spreading writes over the
    /// groups runs them in parallel (measured in bench/RESULTS.md).
    fn pick<'a>(&self, led: &[&'a GroupHandle], turn: usize) -> &'a GroupHandle {
        if !led.iter().any(|g| g.replicated()) {
            return led[turn % led.len()];
        }
        let fill = FILL;
        let load: Vec<usize> = led.iter().map(|g| self.batchers.load(g.id)).collect();
        let n = led.len();
        let order = (0..n).map(|i| (turn + i) % n);
        let i = order
            .clone()
            .find(|&i| (1..fill).contains(&load[i]))
            .or_else(|| order.clone().find(|&i| load[i] == 0))
            .or_else(|| order.min_by_key(|&i| load[i]))
            .expect("led is not empty");
        led[i]
    }
}

/// Most messages in one `EnqueueMany` entry of an API batch.
const BATCH_CHUNK_MESSAGES: usize = 500;
/// Most body bytes in one `EnqueueMany` entry of an API batch (a chunk
/// holds at least one message whatever its size).
const BATCH_CHUNK_BYTES: usize = 4 << 20;
/// Entries of one API batch in flight to one led shard at once.
const BATCH_CHUNKS_IN_FLIGHT: usize = 4;
/// Messages of one API batch forwarded to other nodes at once.
const BATCH_FORWARDS_IN_FLIGHT: usize = 16;

/// Why a batch of API messages was not (entirely) written; the caller
/// answers 503 and the client retries with the same ids.
#[derive(Debug, thiserror::Error)]
pub enum BatchWriteError {
    #[error("the disk is full")]
    DiskFull,
    #[error("no queue shard has a leader")]
    NoShard,
    #[error("writing to shard {shard}: {reason}")]
    Write {
        shard: crate::raft::GroupId,
        reason: String,
    },
}

impl QueueFront {
    /// The shard for each of `n` new messages: the shards this node leads
    /// in turn (no forwarding hop), else the shards with a leader elsewhere,
    /// else (no replica here) the placed shards, reached through a replica.
    pub fn choose_shards(&self, n: usize) -> Result<Vec<crate::raft::GroupId>, BatchWriteError> {
        if self.space.is_full() {
            return Err(BatchWriteError::DiskFull);
        }
        let shards = self.routable_shards();
        let led: Vec<_> = shards
            .iter()
            .filter(|g| g.leader() == Some(self.node))
            .map(|g| g.id)
            .collect();
        let candidates = if !led.is_empty() {
            led
        } else {
            let with_leader: Vec<_> = shards.iter().filter(|g| g.leader().is_some()).map(|g| g.id).collect();
            if with_leader.is_empty() {
                crate::cluster::records::routable_placement(&self.groups)
                    .into_iter()
                    .map(|(shard, _)| shard)
                    .collect()
            } else {
                with_leader
            }
        };
        if candidates.is_empty() {
            return Err(BatchWriteError::NoShard);
        }
        let turn = self.next_shard.fetch_add(n, Ordering::Relaxed);
        Ok((0..n).map(|i| candidates[(turn + i) % candidates.len()]).collect())
    }

    /// Writes the messages of one API call, each to the shard chosen for
    /// it: `EnqueueMany` entries of at most 500 messages / 4 MiB, several in
    /// flight, on shards led here; one forward per message to a leader
    /// elsewhere. Ok once every message is committed. Writing the same ids
    /// again (a retry) is harmless: shards ignore ids they hold or finished.
    pub async fn write_batch(&self, messages: Vec<(crate::raft::GroupId, NewMessage)>) -> Result<(), BatchWriteError> {
        use futures::{StreamExt as _, TryStreamExt as _};
        if self.space.is_full() {
            return Err(BatchWriteError::DiskFull);
        }
        let mut by_shard: std::collections::BTreeMap<crate::raft::GroupId, Vec<NewMessage>> = Default::default();
        for (shard, message) in messages {
            by_shard.entry(shard).or_default().push(message);
        }
        let mut local_chunks = Vec::new();
        let mut forwards = Vec::new();
        for (shard, messages) in by_shard {
            match self.groups.get(shard) {
                Some(g) if g.leader() == Some(self.node) => {
                    for chunk in chunks(messages) {
                        local_chunks.push((g.clone(), chunk));
                    }
                }
                handle => forwards.extend(messages.into_iter().map(|m| (shard, handle.clone(), m))),
            }
        }
        let local = futures::stream::iter(local_chunks)
            .map(|(g, chunk)| async move {
                let write = g
                    .raft
                    .client_write(crate::raft::Request::EnqueueMany { messages: chunk });
                match tokio::time::timeout(WRITE_TIMEOUT, write).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(BatchWriteError::Write {
                        shard: g.id,
                        reason: e.to_string(),
                    }),
                    Err(_) => Err(BatchWriteError::Write {
                        shard: g.id,
                        reason: "no commit in time".into(),
                    }),
                }
            })
            .buffer_unordered(BATCH_CHUNKS_IN_FLIGHT)
            .try_collect::<()>();
        let placement: Vec<crate::raft::GroupId> = crate::cluster::records::routable_placement(&self.groups)
            .into_iter()
            .map(|(shard, _)| shard)
            .collect();
        let remote = futures::stream::iter(forwards)
            .map(|(shard, handle, message)| {
                let placement = &placement;
                async move {
                    let result = match &handle {
                        Some(g) => self.peers.forward_enqueue(g, &message).await,
                        // No replica here: through a replica of that shard
                        // (forward_enqueue_anywhere picks placement[turn]).
                        None => match placement.iter().position(|&s| s == shard) {
                            Some(turn) => self.peers.forward_enqueue_anywhere(turn, &message).await.map(|_| ()),
                            None => Err(crate::cluster::ClusterError::NoPlacement),
                        },
                    };
                    result.map_err(|e| BatchWriteError::Write {
                        shard,
                        reason: e.to_string(),
                    })
                }
            })
            .buffer_unordered(BATCH_FORWARDS_IN_FLIGHT)
            .try_collect::<()>();
        futures::try_join!(local, remote).map(|_| ())
    }
}

/// Splits one shard's messages into `EnqueueMany` entries.
fn chunks(messages: Vec<NewMessage>) -> Vec<Vec<NewMessage>> {
    let mut out: Vec<Vec<NewMessage>> = Vec::new();
    let mut bytes = 0;
    for m in messages {
        let size = m.body.bytes.len();
        match out.last_mut() {
            Some(last) if last.len() < BATCH_CHUNK_MESSAGES && bytes + size <= BATCH_CHUNK_BYTES => {
                bytes += size;
                last.push(m);
            }
            _ => {
                bytes = size;
                out.push(vec![m]);
            }
        }
    }
    out
}

impl Enqueuer for QueueFront {
    fn next_id(&self) -> String {
        self.ids.next()
    }

    fn enqueue(
        &self,
        id: String,
        envelope: Envelope,
        body: Vec<u8>,
    ) -> impl std::future::Future<Output = Result<(), EnqueueError>> + Send {
        self.submit(id, envelope, body)
    }

    fn enqueue_at(
        &self,
        id: String,
        envelope: Envelope,
        body: Vec<u8>,
        not_before: i64,
    ) -> impl std::future::Future<Output = Result<(), EnqueueError>> + Send {
        self.submit_at(id, envelope, body, not_before)
    }

    fn refusal(&self) -> Option<Reply> {
        self.space.is_full().then(disk_full_reply)
    }

    fn verify_recipient(&self, address: String) -> impl std::future::Future<Output = Result<(), Reply>> + Send {
        let delivery = Arc::clone(&self.delivery);
        // Report addresses need no mailbox: the node takes their mail itself.
        let report_address = self
            .fbl
            .load()
            .as_deref()
            .is_some_and(|f| f.is_report_address(&address) && !f.keep());
        async move {
            if report_address {
                return Ok(());
            }
            match delivery.verify_local(&address).await {
                Ok(()) => Ok(()),
                // The MDA's own words, under our codes: 550 5.1.1 unknown, 450 4.1.1 unsure.
                Err(reply) if reply.starts_with('5') => Err(Reply::new(550, "5.1.1", format!("<{address}>: {reply}"))),
                Err(reply) => {
                    tracing::warn!(rcpt = %address, reply = %reply, "recipient verification unavailable");
                    Err(Reply::new(
                        450,
                        "4.1.1",
                        format!("<{address}>: recipient verification unavailable"),
                    ))
                }
            }
        }
    }
}

/// The reply to new mail while this node's disk is full (RFC 3463 4.3.1:
/// mail system full); the client retries later, or another MX.
pub fn disk_full_reply() -> Reply {
    Reply::new(452, "4.3.1", "Insufficient system storage, try again later")
}

/// What the `received` event tells (docs/events.md), taken before the
/// envelope and body move into the Raft request.
struct Received {
    message_id: String,
    from: String,
    rcpts: usize,
    size: usize,
    /// The SMTP client's address (behind a trusted proxy: the one its PROXY header named).
    client_ip: String,
}

impl Received {
    fn of(envelope: &Envelope, body: &[u8]) -> Received {
        Received {
            message_id: crate::delivery::header_value(body, "message-id").unwrap_or_default(),
            from: envelope.reverse_path.clone(),
            rcpts: envelope.recipients.len(),
            size: body.len(),
            client_ip: envelope.client_ip.clone(),
        }
    }

    fn log(&self, id: &str, shard: crate::raft::GroupId, forwarded: bool) {
        tracing::info!(
            target: "tern::event",
            event = "received",
            msg_id = %id,
            message_id = %self.message_id,
            from = %self.from,
            rcpts = self.rcpts,
            size = self.size,
            client_ip = %self.client_ip,
            shard,
            forwarded,
            "queued"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(size: usize) -> NewMessage {
        NewMessage {
            record: Box::new(MessageRecord::new("x".into(), Envelope::default(), size as u64, 0)),
            body: Body {
                bytes: vec![b'a'; size],
                loc: None,
            },
        }
    }

    #[test]
    fn batch_chunks_hold_at_most_500_messages_or_4_mib() {
        let sizes: Vec<usize> = chunks((0..1201).map(|_| message(10)).collect())
            .iter()
            .map(Vec::len)
            .collect();
        assert_eq!(sizes, vec![500, 500, 201]);
        let big = chunks((0..5).map(|_| message(1_500_000)).collect());
        assert_eq!(big.iter().map(Vec::len).collect::<Vec<_>>(), vec![2, 2, 1]);
        // A message larger than a chunk still gets one of its own.
        assert_eq!(chunks(vec![message(5 << 20), message(1)]).len(), 2);
    }

    #[test]
    fn ids_are_unique_and_fixed_width() {
        let g = IdGen::new(7);
        let ids: std::collections::HashSet<String> = (0..10_000).map(|_| g.next()).collect();
        assert_eq!(ids.len(), 10_000);
        assert!(ids
            .iter()
            .all(|id| id.len() == 20 && id.chars().all(|c| c.is_ascii_hexdigit())));
    }
}
