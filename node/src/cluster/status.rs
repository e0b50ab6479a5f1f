//! What the cluster looks like from here: which members answer (the
//! control leader pings them every tick), and every shard's status gathered
//! from every member.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Instant;

use super::peers::PEER_TIMEOUT;
use super::placement::merge_shard_rows;
use super::Cluster;
use crate::raft::{GroupId, NodeId};

/// A member that answered the control leader's ping this recently is reachable.
pub const REACHABLE_WITHIN: std::time::Duration = std::time::Duration::from_secs(3);

/// When members last answered the control leader's pings.
#[derive(Default)]
pub(super) struct Liveness {
    /// When each node last answered (a node first seen counts as alive from then).
    last_seen: HashMap<NodeId, Instant>,
    /// When each node last actually answered (no grace for newly seen nodes).
    last_answer: HashMap<NodeId, Instant>,
}

impl Cluster {
    /// Members that answered the control leader's ping within
    /// [`REACHABLE_WITHIN`] (meaningful on the control leader, which pings),
    /// and this node.
    pub fn reachable(&self) -> BTreeSet<NodeId> {
        let liveness = self.liveness.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: BTreeSet<NodeId> = liveness
            .last_answer
            .iter()
            .filter(|(_, t)| t.elapsed() < REACHABLE_WITHIN)
            .map(|(id, _)| *id)
            .collect();
        out.insert(self.node_id);
        out
    }

    /// Pings every member (control leader only), to tell long-dead nodes.
    pub(super) async fn ping_members(&self) {
        let nodes = self.nodes();
        let answered = self.peers.ping_all(&nodes).await;
        let now = Instant::now();
        let mut liveness = self.liveness.lock().unwrap_or_else(|p| p.into_inner());
        let seen = &mut liveness.last_seen;
        seen.retain(|id, _| nodes.contains_key(id));
        for id in nodes.keys() {
            // A node first seen now counts as alive from now.
            seen.entry(*id).or_insert(now);
        }
        for id in &answered {
            seen.insert(*id, now);
        }
        let last = &mut liveness.last_answer;
        last.retain(|id, _| nodes.contains_key(id));
        for id in answered {
            last.insert(id, now);
        }
    }

    /// Nodes that have not answered for `dead_after`.
    pub(super) fn dead_nodes(&self) -> BTreeSet<NodeId> {
        let liveness = self.liveness.lock().unwrap_or_else(|p| p.into_inner());
        liveness
            .last_seen
            .iter()
            .filter(|(_, t)| t.elapsed() >= self.dead_after)
            .map(|(id, _)| *id)
            .collect()
    }

    /// The shards this node hosts, as it sees them.
    pub fn local_shards(&self) -> Vec<tern_proto::admin::ShardStatus> {
        let placement = self.placement();
        let records = self.shard_records();
        self.groups
            .shards()
            .iter()
            .map(|g| {
                let m = g.raft.metrics().borrow().clone();
                tern_proto::admin::ShardStatus {
                    state: shard_state(&records, g.id).into(),
                    outbox_empty: g.sm.tree().scan_prefix(crate::outbox::OUTBOX_PREFIX).next().is_none(),
                    shard: g.id,
                    leader: m.current_leader.unwrap_or(0),
                    replicas: placement.get(&g.id).cloned().unwrap_or_default(),
                    applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
                    queued_messages: g.sm.message_count(),
                    term: m.current_term,
                    voters: m.membership_config.membership().voter_ids().collect(),
                    joint: m.membership_config.membership().get_joint_config().len() > 1,
                }
            })
            .collect()
    }

    /// Every shard, gathered from every member (each asked at once, bounded),
    /// merged with [`merge_shard_rows`]; and the members that did not answer.
    pub async fn all_shards(&self) -> (BTreeMap<GroupId, tern_proto::admin::ShardStatus>, Vec<NodeId>) {
        let nodes = self.nodes();
        let asks = nodes.iter().filter(|(id, _)| **id != self.node_id).map(|(id, addr)| {
            let client = self.peers.peer(*id, &self.peers.dial(*id, addr.clone()));
            async move {
                let answer = async {
                    let mut client = client.ok()?;
                    let ask = client.local_status(tern_proto::peer::LocalStatusRequest {});
                    match tokio::time::timeout(PEER_TIMEOUT, ask).await {
                        Ok(Ok(r)) => Some(r.into_inner()),
                        _ => None,
                    }
                }
                .await;
                (*id, answer)
            }
        });
        let mut rows: Vec<(NodeId, tern_proto::admin::ShardStatus)> =
            self.local_shards().into_iter().map(|r| (self.node_id, r)).collect();
        let mut unreachable = Vec::new();
        for (id, answer) in futures::future::join_all(asks).await {
            match answer {
                Some(reply) => rows.extend(reply.shards.into_iter().map(|r| (reply.node_id, r))),
                None => unreachable.push(id),
            }
        }
        let mut merged = merge_shard_rows(rows);
        // Placement is the control group's: the freshest copy is this node's
        // own when it is the control leader, and at worst a little behind.
        let placement = self.placement();
        let records = self.shard_records();
        for (shard, row) in merged.iter_mut() {
            if let Some(p) = placement.get(shard) {
                row.replicas = p.clone();
            }
            row.state = shard_state(&records, *shard).into();
        }
        (merged, unreachable)
    }
}

/// A shard's state as `ternctl shard list` names it.
pub fn shard_state(records: &BTreeMap<GroupId, super::shards::ShardRecord>, shard: GroupId) -> &'static str {
    records.get(&shard).map_or("active", |r| r.state.as_str())
}
