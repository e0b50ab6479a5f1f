//! The control group's rules and state: what `SetNode`, `RemoveNode`,
//! `SetDrain`, `SuspendDomain`, `SetShardReplicas`, `SetShapingAction`,
//! `Suppress` and `Unsuppress` change in group 0's
//! tree (applied by the Raft state machine through
//! [`crate::raft::apply::Apply`]), and [`ControlState`], a typed read of it.
//!
//! Keys (in the control group's state machine tree): `n/<node id>` a node's
//! gRPC address, `r/<node id>` a removed node, `d/<node id>` a drained
//! node, `p/<shard>` a shard's replica set, `s/<domain>` a suspension
//! `(until, reason)`, `a/<shaping key>` an automatic shaping action,
//! `x/<scope>\0<address>` a suppression (scope empty: global). Node ids
//! and shards big-endian.

// Rules answer in openraft's StorageError, as the state machine does
// (raft/mod.rs): boxing it would only add conversions.
#![allow(clippy::result_large_err)]

use crate::raft::apply::{write_error, ApplyCtx};
use crate::raft::gate::{Membership, PeerDirectory};
use crate::raft::{GroupId, NodeId, Request, Response, StorageError};
use tern_model::shaping::{AutoAction, Suppression, SuppressionKey};

pub const NODE_PREFIX: &[u8] = b"n/";
pub const PLACEMENT_PREFIX: &[u8] = b"p/";
pub const DRAIN_PREFIX: &[u8] = b"d/";
pub const SUSPEND_PREFIX: &[u8] = b"s/";
/// Tombstones of removed node ids (ids are never reused).
pub const REMOVED_PREFIX: &[u8] = b"r/";
pub const ACTION_PREFIX: &[u8] = b"a/";
pub const SUPPRESS_PREFIX: &[u8] = b"x/";

/// The key of a suppression entry: `x/<scope>\0<address>`.
pub fn suppression_key(scope: &str, address: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(SUPPRESS_PREFIX.len() + scope.len() + 1 + address.len());
    key.extend_from_slice(SUPPRESS_PREFIX);
    key.extend_from_slice(scope.as_bytes());
    key.push(0);
    key.extend_from_slice(address.as_bytes());
    key
}

/// The peer gate's reading of the control group's keys.
#[derive(Clone, Copy, Debug, Default)]
pub struct Directory;

impl PeerDirectory for Directory {
    fn membership(&self, tree: &sled::Tree, id: NodeId) -> Membership {
        let key = |prefix: &[u8]| [prefix, &id.to_be_bytes()].concat();
        if tree.get(key(NODE_PREFIX)).ok().flatten().is_some() {
            return Membership::Member;
        }
        if tree.get(key(REMOVED_PREFIX)).ok().flatten().is_some() {
            return Membership::Removed;
        }
        if tree.scan_prefix(NODE_PREFIX).next().is_none() {
            return Membership::NotJoined;
        }
        Membership::Unknown
    }

    fn placement(&self, tree: &sled::Tree, group: GroupId) -> Vec<NodeId> {
        let key = [PLACEMENT_PREFIX, &group.to_be_bytes()].concat();
        match tree.get(&key) {
            Ok(Some(v)) => bincode::deserialize(&v).unwrap_or_default(),
            _ => Vec::new(),
        }
    }
}

/// Applies a control request; gives `request` back when it is not one.
pub fn apply(ctx: &mut ApplyCtx<'_>, request: Request) -> Result<Result<Response, Request>, StorageError> {
    Ok(Ok(match request {
        Request::SetNode { id, addr } => {
            // A removed id stays removed (checked before the write too).
            let removed = ctx.contains_key(&[REMOVED_PREFIX, &id.to_be_bytes()].concat())?;
            if !removed {
                ctx.insert([NODE_PREFIX, &id.to_be_bytes()].concat(), addr.into_bytes());
            }
            Response { changed: !removed }
        }
        Request::SuspendDomain { domain, until, reason } => {
            let key = [SUSPEND_PREFIX, domain.as_bytes()].concat();
            if until == 0 {
                ctx.remove(key);
            } else {
                ctx.insert(key, bincode::serialize(&(until, reason)).map_err(|e| write_error(&e))?);
            }
            Response { changed: true }
        }
        Request::RemoveNode { id } => {
            ctx.remove([NODE_PREFIX, &id.to_be_bytes()].concat());
            ctx.remove([DRAIN_PREFIX, &id.to_be_bytes()].concat());
            ctx.insert([REMOVED_PREFIX, &id.to_be_bytes()].concat(), vec![1u8]);
            Response { changed: true }
        }
        Request::SetDrain { id, drained } => {
            let key = [DRAIN_PREFIX, &id.to_be_bytes()].concat();
            if drained {
                ctx.insert(key, vec![1u8]);
            } else {
                ctx.remove(key);
            }
            Response { changed: true }
        }
        Request::SetShardReplicas { shard, replicas } => {
            let value = bincode::serialize(&replicas).map_err(|e| write_error(&e))?;
            ctx.insert([PLACEMENT_PREFIX, &shard.to_be_bytes()].concat(), value);
            Response { changed: true }
        }
        Request::SetShapingAction { key, action } => {
            let key = [ACTION_PREFIX, key.as_bytes()].concat();
            match action {
                Some(action) => ctx.insert(key, bincode::serialize(&action).map_err(|e| write_error(&e))?),
                None => ctx.remove(key),
            }
            Response { changed: true }
        }
        Request::Suppress { entries } => {
            for entry in entries {
                let key = suppression_key(&entry.scope, &entry.address);
                ctx.insert(key, bincode::serialize(&entry).map_err(|e| write_error(&e))?);
            }
            Response { changed: true }
        }
        Request::Unsuppress { entries } => {
            for entry in entries {
                ctx.remove(suppression_key(&entry.scope, &entry.address));
            }
            Response { changed: true }
        }
        other => return Ok(Err(other)),
    }))
}

/// A typed read of the control group's state (as applied on this node).
#[derive(Clone)]
pub struct ControlState {
    tree: sled::Tree,
}

/// An operator's suspension of deliveries to a domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Suspension {
    /// Unix seconds it lasts until.
    pub until: i64,
    pub reason: String,
}

impl ControlState {
    /// The state in the control group's state machine tree.
    pub fn new(tree: sled::Tree) -> ControlState {
        ControlState { tree }
    }

    /// The suspension of `domain`, if one was set (it may have expired);
    /// `None` too when it cannot be read.
    pub fn suspension(&self, domain: &str) -> Option<Suspension> {
        let key = [SUSPEND_PREFIX, domain.as_bytes()].concat();
        let v = self.tree.get(key).ok()??;
        let (until, reason): (i64, String) = bincode::deserialize(&v).ok()?;
        Some(Suspension { until, reason })
    }

    /// The automatic shaping action recorded for `key`, if any (it may
    /// have expired: see [`AutoAction::in_force`]).
    pub fn action(&self, key: &str) -> Option<AutoAction> {
        let v = self.tree.get([ACTION_PREFIX, key.as_bytes()].concat()).ok()??;
        bincode::deserialize(&v).ok()
    }

    /// Every automatic shaping action in force at `now`, by key.
    pub fn actions(&self, now: i64) -> Vec<(String, AutoAction)> {
        self.tree
            .scan_prefix(ACTION_PREFIX)
            .flatten()
            .filter_map(|(k, v)| {
                let key = String::from_utf8_lossy(&k[ACTION_PREFIX.len()..]).into_owned();
                let action: AutoAction = bincode::deserialize(&v).ok()?;
                action.in_force(now).then_some((key, action))
            })
            .collect()
    }

    /// The suppression in force at `now` for mail from a sender of
    /// `sender_domain` to `address` (lowercased): the global list first,
    /// then the sender domain's own.
    pub fn suppressed(&self, sender_domain: &str, address: &str, now: i64) -> Option<Suppression> {
        ["", sender_domain]
            .iter()
            .filter_map(|scope| self.suppression(scope, address))
            .find(|s| s.in_force(now))
    }

    /// The entry for `address` in `scope` (in force or not).
    pub fn suppression(&self, scope: &str, address: &str) -> Option<Suppression> {
        let v = self.tree.get(suppression_key(scope, address)).ok()??;
        bincode::deserialize(&v).ok()
    }

    /// Up to `limit` entries in key order (scope, then address) after the
    /// entry `after` (exclusive; `None` from the start), expired ones included.
    pub fn suppressions(&self, after: Option<&SuppressionKey>, limit: usize) -> Vec<Suppression> {
        let start = match after {
            Some(k) => {
                let mut key = suppression_key(&k.scope, &k.address);
                key.push(0);
                key
            }
            None => SUPPRESS_PREFIX.to_vec(),
        };
        self.tree
            .range(start..)
            .flatten()
            .take_while(|(k, _)| k.starts_with(SUPPRESS_PREFIX))
            .filter_map(|(_, v)| bincode::deserialize(&v).ok())
            .take(limit)
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use openraft::storage::{RaftLogStorageExt, RaftStateMachine};
    use openraft::{Entry, EntryPayload, LogId, RaftLogReader};
    use std::sync::Arc;

    use super::*;
    use tern_model::shaping::ActionKind;

    fn entry(index: u64, request: Request) -> Entry<crate::raft::TypeConfig> {
        Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(request),
        }
    }

    fn suppression(scope: &str, address: &str, expires: i64) -> Suppression {
        Suppression {
            scope: scope.into(),
            address: address.into(),
            class: "invalid_recipient".into(),
            reason: "550 5.1.1 no such user".into(),
            added: 100,
            expires,
        }
    }

    /// Actions and suppressions written through the control group read back
    /// typed, survive a restart (the state machine's tree), expire by reading
    /// and are removed again.
    #[tokio::test]
    async fn shaping_actions_and_suppressions_round_trip_through_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, mut sm) = crate::raft::testing::open(dir.path(), Arc::new(crate::app::Rules::default())).await;
        let action = AutoAction {
            kind: ActionKind::Throttle {
                count: 10,
                per_secs: 60,
            },
            since: 100,
            until: 400,
            rule: "backoff[0]".into(),
            reason: "421 4.7.28 slow down".into(),
            node: 2,
        };
        let requests = vec![
            Request::SetShapingAction {
                key: "mx:.google.com".into(),
                action: Some(action.clone()),
            },
            Request::Suppress {
                entries: vec![
                    suppression("", "gone@example.test", 0),
                    suppression("sender.test", "tenant@example.test", 0),
                    suppression("", "lapsed@example.test", 150),
                ],
            },
        ];
        let entries: Vec<_> = requests
            .into_iter()
            .enumerate()
            .map(|(i, r)| entry(i as u64 + 1, r))
            .collect();
        log.blocking_append(entries).await.unwrap();
        let read = log.try_get_log_entries(1..3).await.unwrap();
        sm.apply(read).await.unwrap();

        let state = ControlState::new(sm.tree());
        assert_eq!(state.action("mx:.google.com"), Some(action.clone()));
        assert_eq!(state.actions(200).len(), 1);
        assert!(state.actions(400).is_empty(), "expired at its until");
        assert!(
            state.suppressed("other.test", "gone@example.test", 200).is_some(),
            "global"
        );
        assert!(state.suppressed("sender.test", "tenant@example.test", 200).is_some());
        assert!(
            state.suppressed("other.test", "tenant@example.test", 200).is_none(),
            "a tenant's list is its own"
        );
        assert!(state.suppressed("", "lapsed@example.test", 120).is_some());
        assert!(state.suppressed("", "lapsed@example.test", 151).is_none(), "expired");
        let all = state.suppressions(None, 10);
        assert_eq!(all.len(), 3);
        let page = state.suppressions(
            Some(&SuppressionKey {
                scope: all[0].scope.clone(),
                address: all[0].address.clone(),
            }),
            10,
        );
        assert_eq!(page, all[1..].to_vec(), "paging resumes after the given entry");

        let lift = vec![
            entry(
                3,
                Request::SetShapingAction {
                    key: "mx:.google.com".into(),
                    action: None,
                },
            ),
            entry(
                4,
                Request::Unsuppress {
                    entries: vec![SuppressionKey {
                        scope: String::new(),
                        address: "gone@example.test".into(),
                    }],
                },
            ),
        ];
        log.blocking_append(lift).await.unwrap();
        let read = log.try_get_log_entries(3..5).await.unwrap();
        sm.apply(read).await.unwrap();
        assert_eq!(state.action("mx:.google.com"), None);
        assert!(state.suppression("", "gone@example.test").is_none());
        assert_eq!(state.suppressions(None, 10).len(), 2);
    }
}
