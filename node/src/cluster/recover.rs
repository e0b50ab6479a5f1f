//! `ternd recover`: rebuilds a working cluster from the survivors' data after
//! a majority of nodes is lost for good (docs/operations.md, "Unsafe
//! recovery"). Run offline, with the node stopped, on each surviving node
//! that is kept. Every group hosted here whose membership names a kept node
//! gets the kept members as its voters ([`crate::raft::recover`]); the
//! control group also forgets the lost nodes (`RemoveNode`) and drops them
//! from every shard's placement, so the placement controller re-replicates
//! onto the kept nodes. Shards with no replica on a kept node are lost:
//! reported, with nothing to recover them from.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use anyhow::Context as _;

use super::control::{NODE_PREFIX, PLACEMENT_PREFIX};
use crate::config::Config;
use crate::raft::log_store::LogStore;
use crate::raft::recover::{force_membership, Forced};
use crate::raft::state_machine::StateMachine;
use crate::raft::{Durability, GroupId, NodeId, Request, CONTROL_GROUP};

/// What a recovery did (or, as a dry run, would do).
#[derive(Debug, Default)]
pub struct Report {
    /// Groups rewritten, with their queued messages on this replica.
    pub groups: Vec<(Forced, u64)>,
    /// Groups hosted here that name no kept member (left alone).
    pub untouched: Vec<GroupId>,
    /// Members recorded in the control group that are not kept (removed).
    pub removed: Vec<NodeId>,
    /// Shards whose placement names no kept node: their messages are lost.
    pub lost_shards: Vec<GroupId>,
}

/// Reads the `u64` after `prefix` in a control-group key.
fn id_after(key: &[u8], prefix: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.get(prefix.len()..)?.try_into().ok()?))
}

/// Recovers this node's groups to the members in `keep` (which must hold
/// this node). With `dry_run` nothing is written.
pub async fn recover(config: &Config, keep: &BTreeSet<NodeId>, dry_run: bool) -> anyhow::Result<Report> {
    anyhow::ensure!(
        keep.contains(&config.node_id),
        "--keep-members must include this node ({})",
        config.node_id
    );
    let metrics = crate::metrics::Metrics::new();
    let durability = Durability::open_with(
        &config.data_dir,
        metrics.storage.clone(),
        config.log_segment_bytes,
        config.state_cache_bytes,
        crate::storage::OnSyncError::Exit,
    )
    .with_context(|| {
        format!(
            "opening {} (is the node still running? stop it first)",
            config.data_dir.display()
        )
    })?;
    let local = durability.db().open_tree("local")?;
    let hosted = crate::raft::host::recorded_groups(&local)?;
    anyhow::ensure!(
        hosted.contains(&CONTROL_GROUP),
        "{} holds no control group: is it a Tern data directory?",
        config.data_dir.display()
    );
    let rules: Arc<dyn crate::raft::apply::Apply> = Arc::new(crate::app::Rules {
        outbox: crate::outbox::Switch::new(!config.webhooks.is_empty()),
    });
    let mut report = Report::default();
    for group in hosted {
        let mut log = LogStore::open(Arc::clone(&durability), group)?;
        let mut sm = StateMachine::open(Arc::clone(&durability), group, Arc::clone(&rules)).await?;
        let mut then = Vec::new();
        if group == CONTROL_GROUP {
            let tree = sm.tree();
            let nodes: BTreeSet<NodeId> = tree
                .scan_prefix(NODE_PREFIX)
                .flatten()
                .filter_map(|(k, _)| id_after(&k, NODE_PREFIX))
                .collect();
            for id in nodes.iter().filter(|n| !keep.contains(n)) {
                report.removed.push(*id);
                then.push(Request::RemoveNode { id: *id });
            }
            let placement: BTreeMap<GroupId, Vec<NodeId>> = tree
                .scan_prefix(PLACEMENT_PREFIX)
                .flatten()
                .filter_map(|(k, v)| Some((id_after(&k, PLACEMENT_PREFIX)?, bincode::deserialize(&v).ok()?)))
                .collect();
            // A retired shard's placement is empty: nothing of it to lose.
            for (shard, replicas) in placement.into_iter().filter(|(_, r)| !r.is_empty()) {
                let kept: Vec<NodeId> = replicas.iter().copied().filter(|n| keep.contains(n)).collect();
                if kept.is_empty() {
                    report.lost_shards.push(shard);
                }
                if kept.len() != replicas.len() {
                    then.push(Request::SetShardReplicas { shard, replicas: kept });
                }
            }
        }
        let queued = if group == CONTROL_GROUP { 0 } else { sm.message_count() };
        match force_membership(&mut log, &mut sm, group, config.node_id, keep, then, dry_run).await? {
            Some(forced) => report.groups.push((forced, queued)),
            None => report.untouched.push(group),
        }
    }
    if !dry_run {
        durability.flush_all().await.context("flushing the data directory")?;
    }
    Ok(report)
}
