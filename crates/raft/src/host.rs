//! Opens the Raft groups this node hosts, and creates a group on demand
//! when a peer first replicates it here (a new replica placed on this node),
//! telling the node through [`GroupHooks`] (which starts the shard's queue
//! actor: the node's business, not Raft's).

use std::sync::Arc;

use anyhow::Context as _;

use super::apply::Apply;
use super::groups::{GroupHandle, Groups};
use super::log_store::LogStore;
use super::network::{Network, Peers};
use super::state_machine::StateMachine;
use super::{GroupId, NodeId, Raft};
use crate::Durability;

/// Highest group id a peer may create here.
const MAX_GROUP: GroupId = 4096;
const LOCAL_GROUPS: &[u8] = b"groups";

/// The apply events of one group's state machine, for whoever acts on them.
pub struct GroupEvents {
    pub rx: tokio::sync::mpsc::UnboundedReceiver<super::state_machine::SmEvent>,
    /// Set by the receiver while it wants events.
    pub wanted: Arc<std::sync::atomic::AtomicBool>,
}

/// What the node does with the groups a [`GroupHost`] opens; called once per
/// group open (not on the message path). The node's implementation starts a
/// shard's queue actor.
pub trait GroupHooks: Send + Sync + 'static {
    /// The hand-over state of the group `group` about to open.
    fn handover(&self, group: GroupId) -> Arc<crate::handover::HandOver>;
    /// Counter of the leader changes seen in `group`.
    fn leader_changes(&self, group: GroupId) -> prometheus_client::metrics::counter::Counter;
    /// `group` is open (not yet listed in [`GroupHost::groups`]); `events` are
    /// its state machine's apply events.
    fn opened(&self, group: &GroupHandle, events: GroupEvents);
    /// The node is shutting down: drop what `opened` started.
    fn shutdown(&self);
}

/// What a [`GroupHost`] needs of the node's configuration.
#[derive(Clone, Debug)]
pub struct HostSettings {
    pub node_id: NodeId,
    /// Shard groups 1..=shards at bootstrap (shards added later have a
    /// placement in the control group).
    pub shards: u32,
    /// `node.log_keep_mb`: write-ahead log a group's Raft log may hold.
    pub log_keep_bytes: u64,
    /// Peers' gRPC addresses known from the configuration.
    pub peer_addresses: std::collections::BTreeMap<NodeId, String>,
}

/// The groups recorded as hosted in the node's `local` tree (also read
/// offline, by `ternd recover`).
pub fn recorded_groups(local: &sled::Tree) -> anyhow::Result<Vec<GroupId>> {
    Ok(match local.get(LOCAL_GROUPS)? {
        Some(v) => bincode::deserialize(&v).context("reading hosted groups")?,
        None => Vec::new(),
    })
}

pub struct GroupHost {
    pub settings: HostSettings,
    pub durability: Arc<Durability>,
    pub peers: Arc<Peers>,
    pub raft_config: Arc<openraft::Config>,
    pub groups: Arc<Groups>,
    pub local: sled::Tree,
    hooks: Arc<dyn GroupHooks>,
    /// What every group's requests mean.
    rules: Arc<dyn Apply>,
    /// Serialises group creation (and deletion).
    creating: tokio::sync::Mutex<()>,
    /// Groups whose data this process deleted or looked for ([`GroupHost::forget`]).
    forgotten: std::sync::Mutex<std::collections::HashSet<GroupId>>,
}

impl GroupHost {
    pub fn new(
        settings: HostSettings,
        durability: Arc<Durability>,
        raft_config: Arc<openraft::Config>,
        local: sled::Tree,
        hooks: Arc<dyn GroupHooks>,
        rules: Arc<dyn Apply>,
        tls: Option<super::tls::ClusterTls>,
    ) -> GroupHost {
        let peer_addresses = settings.peer_addresses.clone();
        GroupHost {
            settings,
            durability,
            peers: Arc::new(Peers::new(tls, peer_addresses)),
            raft_config,
            groups: Arc::new(Groups::default()),
            local,
            hooks,
            rules,
            creating: tokio::sync::Mutex::new(()),
            forgotten: Default::default(),
        }
    }

    /// Groups recorded as hosted here.
    pub fn recorded(&self) -> anyhow::Result<Vec<GroupId>> {
        recorded_groups(&self.local)
    }

    async fn record(&self, id: GroupId) -> anyhow::Result<()> {
        let mut ids = self.recorded()?;
        if !ids.contains(&id) {
            ids.push(id);
            ids.sort_unstable();
            self.local.insert(LOCAL_GROUPS, bincode::serialize(&ids)?)?;
            // A hosted group must be opened (and its bodies counted) at every start.
            self.durability.flush_all().await?;
        }
        Ok(())
    }

    /// The local replica of a group, opened (or created) if needed.
    pub async fn ensure(&self, id: GroupId) -> anyhow::Result<GroupHandle> {
        if let Some(g) = self.groups.get(id) {
            return Ok(g);
        }
        anyhow::ensure!(id <= MAX_GROUP, "group {id} is out of range");
        let _guard = self.creating.lock().await;
        if let Some(g) = self.groups.get(id) {
            return Ok(g);
        }
        self.record(id).await?;
        let mut log = LogStore::open(Arc::clone(&self.durability), id)?;
        let mut sm = StateMachine::open(Arc::clone(&self.durability), id, Arc::clone(&self.rules)).await?;
        log.set_purge_floor(sm.purge_floor());
        let (events_tx, events_rx) = tokio::sync::mpsc::unbounded_channel();
        let events_wanted = Arc::new(std::sync::atomic::AtomicBool::new(false));
        sm.set_events(events_tx, Arc::clone(&events_wanted));
        let network = Network {
            group: id,
            peers: Arc::clone(&self.peers),
        };
        let log_handle = log.clone();
        let raft = Raft::new(
            self.settings.node_id,
            Arc::clone(&self.raft_config),
            network,
            log,
            sm.clone(),
        )
        .await
        .with_context(|| format!("starting raft group {id}"))?;
        let leading_since = super::groups::LeadingSince::default();
        watch_leader_changes(
            id,
            self.settings.node_id,
            &raft,
            self.hooks.leader_changes(id),
            Arc::clone(&leading_since),
        );
        let handover = self.hooks.handover(id);
        let handle = GroupHandle {
            id,
            raft,
            sm,
            handover,
            holds: Arc::default(),
            log: log_handle,
            leading_since,
        };
        self.hooks.opened(
            &handle,
            GroupEvents {
                rx: events_rx,
                wanted: events_wanted,
            },
        );
        self.groups.insert(handle.clone());
        tracing::debug!(group = id, "raft group open");
        Ok(handle)
    }

    /// Closes the local replica of `id` for good and deletes its data (a
    /// retired shard: its id is never reused and its placement is empty, so
    /// no peer can make it here again). In this order, each step safe to
    /// redo after a crash ([`GroupHost::forget`]): no longer recorded as
    /// hosted (durable), Raft stopped, state written back, then its log
    /// purged (its segments reclaimed by the next checkpoint), its state
    /// cleared and its snapshot files removed.
    pub async fn destroy(&self, id: GroupId) -> anyhow::Result<()> {
        let handle = self.groups.get(id);
        self.close(id).await?;
        let _guard = self.creating.lock().await;
        if let Some(g) = handle {
            g.sm.write_back().await.map_err(|e| anyhow::anyhow!("{e}"))?;
            g.log.forget_all().await?;
            // Cleared, not dropped: the shard's actor may still hold the
            // tree, and sled's handles of a dropped tree are not usable.
            g.sm.tree().clear()?;
        }
        super::snapshot::remove_leftovers(self.durability.data_dir(), id)?;
        let _ = std::fs::remove_file(super::snapshot::install_path(self.durability.data_dir(), id));
        self.forgotten.lock().unwrap_or_else(|p| p.into_inner()).insert(id);
        tracing::info!(group = id, "raft group's data deleted");
        Ok(())
    }

    /// Deletes what is left on disk of a group closed for good before a
    /// crash or a restart (see [`GroupHost::destroy`]): its log purged and
    /// its state dropped. Never for a group open or recorded as hosted here.
    /// Once per group and process; whether it found anything to delete.
    pub async fn forget(&self, id: GroupId) -> anyhow::Result<bool> {
        let _guard = self.creating.lock().await;
        if self.groups.get(id).is_some() || self.recorded()?.contains(&id) {
            return Ok(false);
        }
        if !self.forgotten.lock().unwrap_or_else(|p| p.into_inner()).insert(id) {
            return Ok(false);
        }
        let name = format!("g{id}/sm");
        let db = self.durability.db();
        let had_state = db.tree_names().iter().any(|n| n.as_ref() == name.as_bytes());
        let log = LogStore::open(Arc::clone(&self.durability), id)?;
        let had_log = log.last_index().is_some();
        log.forget_all().await?;
        if had_state {
            // No handle of this tree exists: the group was not opened since the start.
            db.drop_tree(name.as_bytes())?;
        }
        super::snapshot::remove_leftovers(self.durability.data_dir(), id)?;
        if had_state || had_log {
            tracing::info!(group = id, "leftover data of a closed raft group deleted");
        }
        Ok(had_state || had_log)
    }

    /// Closes the local replica of `id` for good: no longer recorded as
    /// hosted, so it is not opened at the next start, and its Raft stopped.
    pub async fn close(&self, id: GroupId) -> anyhow::Result<()> {
        let _guard = self.creating.lock().await;
        let mut ids = self.recorded()?;
        if ids.contains(&id) {
            ids.retain(|g| *g != id);
            self.local.insert(LOCAL_GROUPS, bincode::serialize(&ids)?)?;
            self.durability.flush_all().await?;
        }
        if let Some(g) = self.groups.remove(id) {
            g.raft
                .shutdown()
                .await
                .with_context(|| format!("stopping raft group {id}"))?;
        }
        tracing::info!(group = id, "raft group closed");
        Ok(())
    }

    /// Writes back every state machine's unwritten changes and checkpoints
    /// those that applied something since their last checkpoint, in the
    /// order of the durability contract: log and bodies, then the state
    /// (one flush for all groups), then the checkpoints (one more flush),
    /// and only then may the log be purged behind them. This bounds how
    /// much of the log a node re-applies after a crash. Log segments freed
    /// before the write-backs are reclaimed after the flush.
    pub async fn checkpoint_all(&self) {
        // Not while the disk is full (read afresh): a sled write that fails
        // for lack of space breaks sled for good (its global error), while
        // a checkpoint put off only means more log to re-apply.
        if self.durability.space().check() {
            tracing::debug!("checkpoint put off: disk full");
            return;
        }
        let doomed = self.durability.take_reclaimable();
        let mut marks = Vec::new();
        let mut failed = false;
        for g in self.groups.all() {
            match g.sm.write_back().await {
                Ok(applied) if g.sm.behind_checkpoint(applied) => marks.push((g.sm, applied)),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(group = g.id, error = %e, "cannot write back the applied state");
                    failed = true;
                }
            }
        }
        if marks.is_empty() && doomed.is_empty() {
            return;
        }
        if let Err(e) = self.durability.flush_all().await {
            tracing::warn!(error = %e, "checkpoint flush failed");
            return;
        }
        // A removal that freed one of these may be in the write-back that failed.
        if !failed {
            self.durability.retire(doomed);
        }
        marks.retain(|(sm, applied)| match sm.write_checkpoint(*applied) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "cannot write a checkpoint");
                false
            }
        });
        if marks.is_empty() {
            return;
        }
        if let Err(e) = self.durability.flush_state().await {
            tracing::warn!(error = %e, "checkpoint flush failed");
            return;
        }
        for (sm, applied) in marks {
            sm.checkpoint_durable(applied);
        }
    }

    /// Purges Raft logs whose entries hold write-ahead log segments beyond
    /// `node.log_keep_mb`, so that those segments can be recycled. Purging
    /// needs a snapshot at least that far (here a checkpoint, so cheap); a
    /// leader purges no further than every follower has replicated, unless
    /// the log is past four times the limit (a follower that far behind
    /// catches up by snapshot). Without this a group purged only every
    /// 20,000 entries, and a quiet group (the control group) held its
    /// segments for good: gigabytes of log for an empty queue.
    pub async fn purge_for_log_space(&self) {
        let wal = self.durability.wal();
        let keep = usize::try_from(self.settings.log_keep_bytes / wal.segment_bytes().max(1))
            .unwrap_or(usize::MAX)
            .max(1);
        let (pins, held) = wal.log_pins(keep);
        // Counted without segments held only by queued bodies: a large
        // deferred queue must not make a leader cut off its followers.
        let hard = held > keep.saturating_mul(4);
        for (id, wanted) in pins {
            let Some(g) = self.groups.get(id) else {
                continue;
            };
            let (snapshot, replicated) = {
                let m = g.raft.metrics();
                let m = m.borrow();
                let replicated = m
                    .replication
                    .as_ref()
                    .map(|r| r.values().map(|l| l.map_or(0, |l| l.index)).min().unwrap_or(0));
                (m.snapshot.map(|s| s.index), replicated)
            };
            let upto = match replicated {
                Some(r) if !hard => wanted.min(r),
                _ => wanted,
            };
            if upto == 0 {
                continue;
            }
            if snapshot < Some(upto) {
                // Purging stops at the snapshot: the next round goes on.
                let _ = g.raft.trigger().snapshot().await;
            }
            if let Err(e) = g.raft.trigger().purge_log(upto).await {
                tracing::debug!(group = id, error = %e, "cannot purge the log");
            }
        }
    }

    /// Runs [`GroupHost::checkpoint_all`] and
    /// [`GroupHost::purge_for_log_space`] every `every` until aborted.
    pub fn spawn_checkpointer(self: &Arc<Self>, every: std::time::Duration) -> tokio::task::JoinHandle<()> {
        let host = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if !tern_store::failpoint::is_armed("no-checkpointer") {
                    host.checkpoint_all().await;
                }
                host.purge_for_log_space().await;
            }
        })
    }

    /// Stops every group's Raft (shutdown).
    pub async fn shutdown(&self) {
        self.hooks.shutdown();
        for g in self.groups.all() {
            if let Err(e) = g.raft.shutdown().await {
                tracing::warn!(group = g.id, error = %e, "raft shutdown");
            }
        }
    }
}

/// Counts `tern_raft_leader_changes` for one group: each time the leader this
/// node knows of becomes a node other than the last one it knew of. Watches
/// openraft's server metrics, which change only with vote, state, leader or
/// membership (not with every append). Ends when the group shuts down.
/// Counts the group's leader changes, and keeps when this node became its
/// leader (`since`).
fn watch_leader_changes(
    group: GroupId,
    me: NodeId,
    raft: &Raft,
    changes: prometheus_client::metrics::counter::Counter,
    since: super::groups::LeadingSince,
) {
    let mut server = raft.server_metrics();
    tokio::spawn(async move {
        let mut last = None;
        loop {
            let (leader, state, vote) = {
                let m = server.borrow_and_update();
                (m.current_leader, m.state, m.vote)
            };
            // Every role change of every group, for tracing elections (debug).
            tracing::debug!(group, ?state, %vote, ?leader, "raft group state");
            {
                let leading = state == openraft::ServerState::Leader && leader == Some(me);
                let mut since = since.lock().unwrap_or_else(|p| p.into_inner());
                match (leading, *since) {
                    (true, None) => *since = Some(tokio::time::Instant::now()),
                    (false, Some(_)) => *since = None,
                    _ => {}
                }
            }
            if leader.is_some() && leader != last {
                changes.inc();
                last = leader;
            }
            if server.changed().await.is_err() {
                break;
            }
        }
    });
}
