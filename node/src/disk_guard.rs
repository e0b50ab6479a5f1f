//! The disk-full guard: once a second it reads the free space of
//! `data_dir` ([`DiskSpace::check`]), publishes it as metrics, and acts on
//! the state. While the disk is full this node campaigns in no group and
//! hands the leadership of every group it leads to the most caught-up other
//! voter, so that the other replicas take the shards' mail; when space is
//! back it campaigns again. (SMTP, forwarded writes and `/readyz` read the
//! state themselves.)
//!
//! It also watches for a group whose Raft core stopped on an error (a
//! storage failure other than lack of space): such a group never serves
//! again in this process, so the guard returns an error and the node exits
//! for its supervisor to restart it (the log is replayed at start).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cluster::Cluster;
use crate::metrics::Metrics;
use crate::raft::groups::{matched_index, GroupHandle, Groups, Hold};
use crate::raft::{GroupId, NodeId};
use crate::storage::space::DiskSpace;

/// How often the free space is read.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// A leadership hand-over that did not stick is tried again after this.
const HAND_OVER_RETRY: Duration = Duration::from_secs(3);

/// Storage this process cannot use any more; it should exit (and be
/// restarted by its supervisor, which replays the log).
#[derive(Debug, thiserror::Error)]
pub enum StorageFailed {
    #[error("raft group {group} stopped: {reason}")]
    Group { group: GroupId, reason: String },
    /// sled keeps the first write error for good (its "global error").
    #[error("the state database failed a write while the disk was full: {0}")]
    StateDb(String),
}

pub struct DiskGuard {
    pub node_id: NodeId,
    pub space: Arc<DiskSpace>,
    pub groups: Arc<Groups>,
    pub cluster: Arc<Cluster>,
    pub metrics: Arc<Metrics>,
    /// The state database, probed once space is back (see [`DiskGuard::run`]).
    pub db: sled::Db,
}

impl DiskGuard {
    /// Runs until `stop`; returns an error when a group, or the state
    /// database, has failed. (sled fails every later write once one failed
    /// for lack of space, so when space is back the guard flushes it once:
    /// if that fails, only a restart recovers.)
    pub async fn run(self, mut stop: tokio::sync::watch::Receiver<bool>) -> Result<(), StorageFailed> {
        let mut tick = tokio::time::interval(CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut was_full = false;
        let mut tried: HashMap<GroupId, Instant> = HashMap::new();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return Ok(()),
            }
            let space = Arc::clone(&self.space);
            let full = tokio::task::spawn_blocking(move || space.check())
                .await
                .unwrap_or_else(|_| self.space.is_full());
            self.metrics.disk.set(full, self.space.free());
            for g in self.groups.all() {
                if let Some(reason) = g.failure() {
                    tracing::error!(group = g.id, reason = %reason, "raft group stopped on an error; exiting so that a restart replays the log");
                    return Err(StorageFailed::Group { group: g.id, reason });
                }
            }
            if full {
                self.step_down(&mut tried);
            } else if was_full {
                let db = self.db.clone();
                let flushed = tokio::task::spawn_blocking(move || db.flush().map(|_| ()))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()));
                if let Err(e) = flushed {
                    tracing::error!(error = %e, "the state database failed a write while the disk was full; exiting so that a restart recovers it");
                    return Err(StorageFailed::StateDb(e));
                }
                for g in self.groups.all() {
                    g.hold_elections(Hold::DiskFull, false);
                }
                tried.clear();
                tracing::info!("disk space is back: campaigning again");
            }
            was_full = full;
        }
    }

    /// No campaigns here, and every leadership handed to another voter.
    fn step_down(&self, tried: &mut HashMap<GroupId, Instant>) {
        for g in self.groups.all() {
            // Every tick: an operator's step-aside re-enables it after a while.
            g.hold_elections(Hold::DiskFull, true);
            if g.leader() != Some(self.node_id) {
                continue;
            }
            if tried.get(&g.id).is_some_and(|t| t.elapsed() < HAND_OVER_RETRY) {
                continue;
            }
            let Some(target) = hand_over_target(&g, self.node_id) else {
                continue;
            };
            tried.insert(g.id, Instant::now());
            tracing::warn!(
                group = g.id,
                to = target,
                "disk full: handing the group's leadership over"
            );
            let cluster = Arc::clone(&self.cluster);
            let (group, from) = (g.id, self.node_id);
            tokio::spawn(async move {
                if let Err(e) = cluster
                    .hand_over(group, from, target, crate::cluster::Move::Needed)
                    .await
                {
                    tracing::warn!(group, to = target, error = %e, "disk full: leadership hand-over failed; retrying");
                }
            });
        }
    }
}

/// The most caught-up other voter of `g` (led here), if there is one.
fn hand_over_target(g: &GroupHandle, me: NodeId) -> Option<NodeId> {
    let m = g.raft.metrics().borrow().clone();
    m.membership_config
        .membership()
        .voter_ids()
        .filter(|v| *v != me)
        .max_by_key(|v| (matched_index(&m, *v), std::cmp::Reverse(*v)))
}
