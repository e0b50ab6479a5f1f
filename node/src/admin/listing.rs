//! Cluster-wide reads of the queue: which member reads which shard (its
//! leader when it answers), `queue list` pages merged in queue id order
//! across shards and members, `queue show` of a message wherever it is, and
//! queue operations written to a shard's leader on whichever node holds it.
//!
//! Paging: a page is the `limit` smallest queue ids after the cursor among
//! every selected message of the cluster; each member returns its own
//! smallest `limit` (a k-way merge over its shards, each read from the
//! cursor on), and the node asked keeps the smallest `limit` of those. A
//! selection of any size is walked completely, page by page.

use std::collections::{BTreeMap, BTreeSet};

use tern_proto::admin::*;
use tonic::Status;

use super::select::Selection;
use super::{internal, message_info, Admin, PEER_QUERY_TIMEOUT};
use crate::queue::message::MessageRecord;
use crate::raft::NodeId;

/// Messages per page when the request gives no limit.
pub const DEFAULT_PAGE: usize = 1000;
/// The largest page a request may ask for.
pub const MAX_PAGE: usize = 10_000;
/// The most ids one queue operation request may carry.
pub const MAX_OP_IDS: usize = 10_000;

/// Which member reads which shards, and what could not be read.
pub(crate) struct Assignment {
    pub by_node: BTreeMap<NodeId, BTreeSet<u64>>,
    pub missing: Vec<u64>,
    pub unreachable: Vec<NodeId>,
}

fn selection(req: &QueueListRequest) -> Result<Selection, Status> {
    Selection::new(
        &req.ids,
        &req.domain,
        &req.sender,
        req.older_than_secs,
        req.newer_than_secs,
        &req.state,
        &req.reply_class,
    )
}

impl Admin {
    /// Each shard read once: by its leader when that answers (the freshest
    /// copy), else by this node or another replica.
    pub(crate) async fn assign_shards(&self) -> Assignment {
        let (rows, unreachable) = self.cluster.all_shards().await;
        let local: BTreeSet<u64> = self.groups.shards().iter().map(|g| g.id).collect();
        let nodes = self.cluster.nodes();
        let up = |n: &u64| *n != 0 && nodes.contains_key(n) && !unreachable.contains(n);
        let mut by_node: BTreeMap<NodeId, BTreeSet<u64>> = BTreeMap::new();
        let mut missing = Vec::new();
        for (shard, row) in &rows {
            let holder = if up(&row.leader) && (row.leader != self.node_id || local.contains(shard)) {
                Some(row.leader)
            } else if local.contains(shard) {
                Some(self.node_id)
            } else {
                row.voters.iter().copied().find(|v| *v != self.node_id && up(v))
            };
            match holder {
                Some(n) => {
                    by_node.entry(n).or_default().insert(*shard);
                }
                None => missing.push(*shard),
            }
        }
        Assignment {
            by_node,
            missing,
            unreachable,
        }
    }

    /// One page of the selected messages of this node's shards (those in
    /// `req.shards` when given), in queue id order.
    pub(crate) fn local_list(&self, req: &QueueListRequest) -> Result<QueueListReply, Status> {
        let select = selection(req)?;
        let limit = page_limit(req.limit);
        let now = chrono::Utc::now().timestamp();
        let only: BTreeSet<u64> = req.shards.iter().copied().collect();
        let groups: Vec<_> = self
            .groups
            .shards()
            .into_iter()
            .filter(|g| only.is_empty() || only.contains(&g.id))
            .collect();
        let info = |shard: u64, r: &MessageRecord| {
            if req.ids_only {
                MessageInfo {
                    id: r.id.clone(),
                    shard,
                    received_at: r.received_at,
                    held: r.held,
                    ..MessageInfo::default()
                }
            } else {
                message_info(shard, r)
            }
        };
        let mut found: Vec<MessageInfo> = Vec::new();
        if let Some(ids) = select.ids() {
            // Point lookups: a few ids out of a large queue.
            for g in &groups {
                for id in ids {
                    if id.as_str() <= req.after.as_str() && !req.after.is_empty() {
                        continue;
                    }
                    if let Some(r) = g.sm.message(id).map_err(internal)? {
                        if select.matches(&r, now) {
                            found.push(info(g.id, &r));
                        }
                    }
                }
            }
            found.sort_by(|a, b| a.id.cmp(&b.id));
            let truncated = found.len() > limit;
            found.truncate(limit);
            return Ok(page(found, truncated));
        }
        // A k-way merge: each shard read from the cursor on, only as far as
        // the page needs.
        type Cursor<'a> = (u64, Box<dyn Iterator<Item = anyhow::Result<MessageRecord>> + 'a>);
        let select = &select;
        let mut cursors: Vec<Cursor<'_>> = groups
            .iter()
            .map(|g| {
                let it =
                    g.sm.messages_after(&req.after)
                        .filter(move |r| r.as_ref().map_or(true, |r| select.matches(r, now)));
                let it: Box<dyn Iterator<Item = anyhow::Result<MessageRecord>> + '_> = Box::new(it);
                (g.id, it)
            })
            .collect();
        let mut heads: Vec<Option<MessageRecord>> = Vec::with_capacity(cursors.len());
        for (_, it) in cursors.iter_mut() {
            heads.push(it.next().transpose().map_err(internal)?);
        }
        let mut truncated = false;
        loop {
            let best = heads
                .iter()
                .enumerate()
                .filter_map(|(i, h)| h.as_ref().map(|r| (i, &r.id)))
                .min_by(|a, b| a.1.cmp(b.1))
                .map(|(i, _)| i);
            let Some(b) = best else { break };
            if found.len() == limit {
                truncated = true;
                break;
            }
            if let Some(r) = heads[b].take() {
                found.push(info(cursors[b].0, &r));
            }
            heads[b] = cursors[b].1.next().transpose().map_err(internal)?;
        }
        Ok(page(found, truncated))
    }
}

fn page_limit(limit: u32) -> usize {
    if limit == 0 {
        DEFAULT_PAGE
    } else {
        (limit as usize).min(MAX_PAGE)
    }
}

fn page(messages: Vec<MessageInfo>, truncated: bool) -> QueueListReply {
    let next = if truncated {
        messages.last().map(|m| m.id.clone()).unwrap_or_default()
    } else {
        String::new()
    };
    QueueListReply {
        messages,
        truncated,
        next,
        unreachable: Vec::new(),
        missing_shards: Vec::new(),
    }
}

impl Admin {
    /// A page of the cluster's selected messages: each member's page of the
    /// shards it was assigned, merged.
    pub(crate) async fn cluster_list(&self, req: QueueListRequest) -> Result<QueueListReply, Status> {
        selection(&req)?;
        let limit = page_limit(req.limit);
        let Assignment {
            mut by_node,
            mut missing,
            mut unreachable,
        } = self.assign_shards().await;
        let mut parts: Vec<QueueListReply> = Vec::new();
        if let Some(only) = by_node.remove(&self.node_id) {
            parts.push(self.local_list(&QueueListRequest {
                shards: only.into_iter().collect(),
                ..req.clone()
            })?);
        }
        let nodes = self.cluster.nodes();
        let asks = by_node.into_iter().map(|(node, only)| {
            let client = nodes.get(&node).map(|addr| {
                self.cluster
                    .peers
                    .peer(node, &self.cluster.peers.dial(node, addr.clone()))
            });
            let ask = QueueListRequest {
                shards: only.iter().copied().collect(),
                local_only: true,
                ..req.clone()
            };
            async move {
                let answer = async {
                    let mut client = client?.ok()?;
                    match tokio::time::timeout(PEER_QUERY_TIMEOUT, client.local_queue_list(ask)).await {
                        Ok(Ok(r)) => Some(Ok(r.into_inner())),
                        // A bad filter is the same error on every node.
                        Ok(Err(e)) if e.code() == tonic::Code::InvalidArgument => Some(Err(e)),
                        _ => None,
                    }
                }
                .await;
                (node, only, answer)
            }
        });
        for (node, only, answer) in futures::future::join_all(asks).await {
            match answer {
                Some(Ok(part)) => parts.push(part),
                Some(Err(e)) => return Err(e),
                None => {
                    unreachable.push(node);
                    missing.extend(only);
                }
            }
        }
        let mut truncated = parts.iter().any(|p| p.truncated);
        let mut messages: Vec<MessageInfo> = parts.into_iter().flat_map(|p| p.messages).collect();
        messages.sort_by(|a, b| a.id.cmp(&b.id));
        messages.dedup_by(|a, b| a.id == b.id);
        if messages.len() > limit {
            messages.truncate(limit);
            truncated = true;
        }
        let mut reply = page(messages, truncated);
        unreachable.sort_unstable();
        unreachable.dedup();
        missing.sort_unstable();
        reply.unreachable = unreachable;
        reply.missing_shards = missing;
        Ok(reply)
    }

    /// `queue show` of a message this node does not hold: every other
    /// member asked at once; the first that has it answers.
    pub(crate) async fn show_elsewhere(&self, req: &QueueShowRequest) -> Result<Option<QueueShowReply>, Status> {
        let nodes = self.cluster.nodes();
        let asks = nodes.iter().filter(|(id, _)| **id != self.node_id).map(|(id, addr)| {
            let client = self
                .cluster
                .peers
                .peer(*id, &self.cluster.peers.dial(*id, addr.clone()));
            let ask = QueueShowRequest {
                local_only: true,
                ..req.clone()
            };
            async move {
                let mut client = client.ok()?;
                match tokio::time::timeout(PEER_QUERY_TIMEOUT, client.local_queue_show(ask)).await {
                    Ok(Ok(r)) => Some(r.into_inner()),
                    _ => None,
                }
            }
        });
        let found = futures::future::join_all(asks).await;
        Ok(found.into_iter().flatten().find(|r| r.message.is_some()))
    }

    /// A queue operation on `ids`, all in `shard`, written to the shard's
    /// leader: here, through this node's replica, or through a node holding
    /// a replica (which refuses unless it leads). Returns how many messages
    /// were affected.
    pub(crate) async fn op_on_shard(
        &self,
        shard: u64,
        action: Option<crate::raft::QueueAction>,
        ids: Vec<String>,
        on_leader: bool,
    ) -> Result<u64, Status> {
        use tern_model::peer::Operation;
        if ids.len() > MAX_OP_IDS {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_OP_IDS} ids per request (got {})",
                ids.len()
            )));
        }
        if let Some(group) = self.groups.get(shard).filter(|g| g.id != crate::raft::CONTROL_GROUP) {
            let now = chrono::Utc::now().timestamp();
            let Some(action) = action else {
                return self.bounce_on_leader(&group, ids, on_leader, now).await;
            };
            // Only what this replica holds counts (a replica a moment behind
            // may miss a message just queued: the leader would have it).
            let mut present = Vec::with_capacity(ids.len());
            for id in ids {
                if group.sm.message(&id).map_err(internal)?.is_some() {
                    present.push(id);
                }
            }
            if present.is_empty() {
                return Ok(0);
            }
            let n = present.len() as u64;
            self.write(&group, Operation::Queue { action, ids: present }).await?;
            return Ok(n);
        }
        if shard == crate::raft::CONTROL_GROUP {
            return Err(Status::invalid_argument(
                "shard 0 is the control group, not a queue shard",
            ));
        }
        let op = match action {
            Some(action) => Operation::Queue { action, ids },
            None => Operation::Bounce { ids },
        };
        let payload = tern_model::peer::encode(&op).map_err(internal)?;
        let replicas = self.cluster.placement().get(&shard).cloned().unwrap_or_default();
        if replicas.is_empty() {
            return Err(Status::not_found(format!("shard {shard} is not placed on any member")));
        }
        let nodes = self.cluster.nodes();
        let mut last = Status::unavailable(format!("no replica of shard {shard} answered"));
        for node in replicas {
            let Some(addr) = nodes.get(&node) else { continue };
            let mut client = self
                .cluster
                .peers
                .peer(node, &self.cluster.peers.dial(node, addr.clone()))?;
            let ask = client.operation(tern_proto::peer::OperationRequest {
                group_id: shard,
                operation: payload.clone(),
            });
            match ask.await {
                Ok(r) => return Ok(r.into_inner().affected),
                // Not the leader, unreachable, or not (yet, or any more)
                // hosting it as placement says: the next replica.
                Err(e)
                    if matches!(
                        e.code(),
                        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::NotFound
                    ) =>
                {
                    last = e
                }
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }
}
