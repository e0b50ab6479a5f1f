//! The control group's rules and state: what `SetNode`, `RemoveNode`,
//! `SetDrain`, `SuspendDomain`, `SetShardReplicas`, `SetShapingAction`,
//! `Suppress`, `Unsuppress` and the sending API's `PutApiKey`,
//! `RevokeApiKey`, `PutTemplate`, `PutBatch`, `PurgeBatches` change in group 0's
//! tree (applied by the Raft state machine through
//! [`crate::raft::apply::Apply`]), and [`ControlState`], a typed read of it.
//!
//! Keys (in the control group's state machine tree): `n/<node id>` a node's
//! gRPC address, `r/<node id>` a removed node, `d/<node id>` a drained
//! node, `p/<shard>` a shard's replica set, `s/<domain>` a suspension
//! `(until, reason)`, `a/<shaping key>` an automatic shaping action,
//! `x/<scope>\0<address>` a suppression (scope empty: global), and the
//! sending API's records: `k/<key id>` an [`ApiKey`], `t/<tenant>\0<name>`
//! a [`StoredTemplate`], `b/<batch id>` a [`Batch`], `i/<tenant>\0<key>`
//! the batch id holding an idempotency key. Node ids and shards big-endian.

// Rules answer in openraft's StorageError, as the state machine does
// (raft/mod.rs): boxing it would only add conversions.
#![allow(clippy::result_large_err)]

use crate::raft::apply::{write_error, ApplyCtx};
use crate::raft::gate::{Membership, PeerDirectory};
use crate::raft::{GroupId, NodeId, Request, Response, StorageError};
use tern_model::api::{ApiKey, Batch, StoredTemplate};
use tern_model::shaping::{AutoAction, Suppression, SuppressionKey};

pub const NODE_PREFIX: &[u8] = b"n/";
pub const PLACEMENT_PREFIX: &[u8] = b"p/";
pub const DRAIN_PREFIX: &[u8] = b"d/";
pub const SUSPEND_PREFIX: &[u8] = b"s/";
/// Tombstones of removed node ids (ids are never reused).
pub const REMOVED_PREFIX: &[u8] = b"r/";
pub const ACTION_PREFIX: &[u8] = b"a/";
pub const SUPPRESS_PREFIX: &[u8] = b"x/";
pub const API_KEY_PREFIX: &[u8] = b"k/";
pub const TEMPLATE_PREFIX: &[u8] = b"t/";
pub const BATCH_PREFIX: &[u8] = b"b/";
pub const IDEMPOTENCY_PREFIX: &[u8] = b"i/";
/// `c/<space>\0<key>`: cluster-shared records of a feature (`PutShared`).
pub const SHARED_PREFIX: &[u8] = b"c/";

pub fn shared_key(space: &str, key: &str) -> Vec<u8> {
    pair_key(SHARED_PREFIX, space, key)
}

/// `<prefix><a>\0<b>`: the tenant-scoped keys (a tenant holds no NUL).
fn pair_key(prefix: &[u8], a: &str, b: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(prefix.len() + a.len() + 1 + b.len());
    key.extend_from_slice(prefix);
    key.extend_from_slice(a.as_bytes());
    key.push(0);
    key.extend_from_slice(b.as_bytes());
    key
}

pub fn api_key_key(id: &str) -> Vec<u8> {
    [API_KEY_PREFIX, id.as_bytes()].concat()
}

pub fn template_key(tenant: &str, name: &str) -> Vec<u8> {
    pair_key(TEMPLATE_PREFIX, tenant, name)
}

pub fn batch_key(id: &str) -> Vec<u8> {
    [BATCH_PREFIX, id.as_bytes()].concat()
}

pub fn idempotency_key(tenant: &str, key: &str) -> Vec<u8> {
    pair_key(IDEMPOTENCY_PREFIX, tenant, key)
}

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
        Request::PutApiKey { key } => {
            ctx.insert(api_key_key(&key.id), encode(&key)?);
            Response { changed: true }
        }
        Request::RevokeApiKey { id, at } => {
            let stored = ctx.get_latest(&api_key_key(&id))?;
            let key = stored.and_then(|v| bincode::deserialize::<ApiKey>(&v).ok());
            // The first revocation's time stays (a replay changes nothing).
            match key {
                Some(mut key) if key.revoked.is_none() => {
                    key.revoked = Some(at);
                    ctx.insert(api_key_key(&id), encode(&key)?);
                    Response { changed: true }
                }
                _ => Response { changed: false },
            }
        }
        Request::PutTemplate { tenant, name, template } => {
            let key = template_key(&tenant, &name);
            match template {
                Some(t) => ctx.insert(key, encode(&t)?),
                None => ctx.remove(key),
            }
            Response { changed: true }
        }
        Request::PutBatch { batch } => put_batch(ctx, &batch)?,
        Request::PurgeBatches { before } => purge_batches(ctx, before)?,
        Request::PutShared { space, entries } => {
            for (key, value) in entries {
                ctx.insert(shared_key(&space, &key), value);
            }
            Response { changed: true }
        }
        // A prefix sees the records of earlier runs (not a `PutShared` of
        // this same run): features delete what they wrote well before.
        Request::DeleteShared { space, keys, prefixes } => {
            for key in keys {
                ctx.remove(shared_key(&space, &key));
            }
            for prefix in prefixes {
                let mut doomed = Vec::new();
                for item in ctx.scan_prefix(&shared_key(&space, &prefix)) {
                    doomed.push(item.map_err(|e| write_error(&e))?.0);
                }
                for k in doomed {
                    ctx.remove(k);
                }
            }
            Response { changed: true }
        }
        other => return Ok(Err(other)),
    }))
}

fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, StorageError> {
    bincode::serialize(value).map_err(|e| write_error(&e))
}

/// A batch record, unless its idempotency key is held by another batch of
/// the tenant (then nothing changes: the caller answers with that batch).
fn put_batch(ctx: &mut ApplyCtx<'_>, batch: &Batch) -> Result<Response, StorageError> {
    if let Some(idem) = &batch.idempotency_key {
        let ikey = idempotency_key(&batch.tenant, idem);
        if let Some(holder) = ctx.get_latest(&ikey)? {
            if holder.as_ref() != batch.id.as_bytes() {
                return Ok(Response { changed: false });
            }
        }
        ctx.insert(ikey, batch.id.as_bytes().to_vec());
    }
    ctx.insert(batch_key(&batch.id), encode(batch)?);
    Ok(Response { changed: true })
}

/// Removes batch records created before `before` (unix seconds) and the
/// idempotency keys they hold.
fn purge_batches(ctx: &mut ApplyCtx<'_>, before: i64) -> Result<Response, StorageError> {
    let mut old = Vec::new();
    for item in ctx.scan_prefix(BATCH_PREFIX) {
        let (k, v) = item.map_err(|e| write_error(&e))?;
        // An unreadable record cannot be answered from either: drop it too.
        match bincode::deserialize::<Batch>(&v) {
            Ok(b) if b.created >= before => {}
            Ok(b) => old.push((k, Some(b))),
            Err(_) => old.push((k, None)),
        }
    }
    let changed = !old.is_empty();
    for (k, batch) in old {
        if let Some(b) = batch {
            if let Some(idem) = &b.idempotency_key {
                let ikey = idempotency_key(&b.tenant, idem);
                if ctx.get(&ikey)?.is_some_and(|holder| holder.as_ref() == b.id.as_bytes()) {
                    ctx.remove(ikey);
                }
            }
        }
        ctx.remove(k);
    }
    Ok(Response { changed })
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

    fn read<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> Option<T> {
        let v = self.tree.get(key).ok()??;
        bincode::deserialize(&v).ok()
    }

    /// The API key with public id `id` (revoked ones too).
    pub fn api_key(&self, id: &str) -> Option<ApiKey> {
        self.read(&api_key_key(id))
    }

    /// Every API key, revoked ones too, in id order.
    pub fn api_keys(&self) -> Vec<ApiKey> {
        self.tree
            .scan_prefix(API_KEY_PREFIX)
            .flatten()
            .filter_map(|(_, v)| bincode::deserialize(&v).ok())
            .collect()
    }

    /// The live (not revoked) API key named `name`, if any.
    pub fn live_api_key_named(&self, name: &str) -> Option<ApiKey> {
        self.api_keys()
            .into_iter()
            .find(|k| k.revoked.is_none() && k.name == name)
    }

    /// The stored template `name` of `tenant`.
    pub fn template(&self, tenant: &str, name: &str) -> Option<StoredTemplate> {
        self.read(&template_key(tenant, name))
    }

    /// Every stored template of `tenant`, by name.
    pub fn templates(&self, tenant: &str) -> Vec<(String, StoredTemplate)> {
        let prefix = pair_key(TEMPLATE_PREFIX, tenant, "");
        self.tree
            .scan_prefix(&prefix)
            .flatten()
            .filter_map(|(k, v)| {
                let name = std::str::from_utf8(k.get(prefix.len()..)?).ok()?.to_owned();
                Some((name, bincode::deserialize(&v).ok()?))
            })
            .collect()
    }

    /// The shared record `key` of `space` (`PutShared`).
    pub fn shared(&self, space: &str, key: &str) -> Option<Vec<u8>> {
        self.tree.get(shared_key(space, key)).ok().flatten().map(|v| v.to_vec())
    }

    /// The shared records of `space` whose keys start with `prefix`, in key
    /// order, at most `limit` of them.
    pub fn shared_scan(&self, space: &str, prefix: &str, limit: usize) -> Vec<(String, Vec<u8>)> {
        let base = shared_key(space, "");
        self.tree
            .scan_prefix(shared_key(space, prefix))
            .flatten()
            .filter_map(|(k, v)| Some((std::str::from_utf8(k.get(base.len()..)?).ok()?.to_owned(), v.to_vec())))
            .take(limit)
            .collect()
    }

    /// The batch record `id`.
    pub fn batch(&self, id: &str) -> Option<Batch> {
        self.read(&batch_key(id))
    }

    /// The batch of `tenant` holding idempotency key `key`.
    pub fn batch_by_idempotency(&self, tenant: &str, key: &str) -> Option<Batch> {
        let id = self.tree.get(idempotency_key(tenant, key)).ok()??;
        self.batch(std::str::from_utf8(&id).ok()?)
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

    fn batch(id: &str, tenant: &str, idem: Option<&str>, created: i64) -> Batch {
        Batch {
            id: id.into(),
            tenant: tenant.into(),
            key_id: "0123456789abcdef".into(),
            idempotency_key: idem.map(Into::into),
            request_hash: vec![1, 2, 3],
            messages: vec![(format!("{id}-m1"), 1)],
            created,
            ..Default::default()
        }
    }

    /// The sending API's records: keys replaced and revoked, templates per
    /// tenant and deleted, batches with an idempotency key held by the first
    /// batch id only (also against an entry earlier in the same run), and
    /// old batches purged with their keys.
    #[tokio::test]
    async fn api_records_round_trip_through_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, mut sm) = crate::raft::testing::open(dir.path(), Arc::new(crate::app::Rules::default())).await;
        let key = ApiKey {
            id: "0123456789abcdef".into(),
            name: "ci".into(),
            hash: vec![7; 32],
            scopes: vec![tern_model::api::Scope::Send],
            tenant: "acme".into(),
            rate: 10,
            created: 100,
            revoked: None,
        };
        let template = |subject: &str| StoredTemplate {
            subject: subject.into(),
            text: Some("Dear {{ name }}".into()),
            html: None,
            updated: 100,
        };
        let put_t = |tenant: &str, name: &str, t: Option<StoredTemplate>| Request::PutTemplate {
            tenant: tenant.into(),
            name: name.into(),
            template: t,
        };
        let requests = vec![
            Request::PutApiKey { key: key.clone() },
            Request::RevokeApiKey {
                id: key.id.clone(),
                at: 200,
            },
            Request::RevokeApiKey {
                id: key.id.clone(),
                at: 300,
            },
            Request::RevokeApiKey {
                id: "ffffffffffffffff".into(),
                at: 300,
            },
            put_t("acme", "welcome", Some(template("Hi"))),
            put_t("acme", "bye", Some(template("Bye"))),
            put_t("acme2", "other", Some(template("Other"))),
            put_t("acme", "bye", None),
            Request::PutBatch {
                batch: Box::new(batch("b_one", "acme", Some("k1"), 100)),
            },
            // Same key, another batch id, same run: refused.
            Request::PutBatch {
                batch: Box::new(batch("b_two", "acme", Some("k1"), 100)),
            },
            // The same key in another tenant is another key.
            Request::PutBatch {
                batch: Box::new(batch("b_three", "other", Some("k1"), 500)),
            },
        ];
        let n = requests.len() as u64;
        let entries: Vec<_> = requests
            .into_iter()
            .enumerate()
            .map(|(i, r)| entry(i as u64 + 1, r))
            .collect();
        log.blocking_append(entries).await.unwrap();
        let read = log.try_get_log_entries(1..n + 1).await.unwrap();
        let responses = sm.apply(read).await.unwrap();
        let changed: Vec<bool> = responses.iter().map(|r| r.changed).collect();
        assert_eq!(
            changed,
            [true, true, false, false, true, true, true, true, true, false, true],
            "a second revocation, an unknown key and a held idempotency key change nothing"
        );

        let state = ControlState::new(sm.tree());
        let stored = state.api_key(&key.id).unwrap();
        assert_eq!(stored.revoked, Some(200), "the first revocation's time stays");
        assert_eq!(state.api_keys().len(), 1);
        assert!(state.live_api_key_named("ci").is_none(), "revoked");
        assert_eq!(state.template("acme", "welcome"), Some(template("Hi")));
        assert_eq!(state.template("acme2", "welcome"), None, "templates are per tenant");
        let names: Vec<String> = state.templates("acme").into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["welcome"], "bye was deleted; acme2's is not acme's");
        assert_eq!(state.batch_by_idempotency("acme", "k1").unwrap().id, "b_one");
        assert_eq!(state.batch_by_idempotency("other", "k1").unwrap().id, "b_three");
        assert!(state.batch("b_two").is_none());

        // The same batch id again (a retry of the same call) replaces it.
        let mut again = batch("b_one", "acme", Some("k1"), 100);
        again.tags = vec!["retry".into()];
        let later = vec![
            entry(n + 1, Request::PutBatch { batch: Box::new(again) }),
            entry(n + 2, Request::PurgeBatches { before: 200 }),
        ];
        log.blocking_append(later).await.unwrap();
        let read = log.try_get_log_entries(n + 1..n + 2).await.unwrap();
        assert!(sm.apply(read).await.unwrap()[0].changed);
        assert_eq!(state.batch("b_one").unwrap().tags, ["retry"]);
        let read = log.try_get_log_entries(n + 2..n + 3).await.unwrap();
        assert!(sm.apply(read).await.unwrap()[0].changed);
        assert!(state.batch("b_one").is_none(), "created before the purge's time");
        assert!(state.batch_by_idempotency("acme", "k1").is_none());
        assert!(state.batch("b_three").is_some(), "newer");
        assert!(state.batch_by_idempotency("other", "k1").is_some());
    }
}
