//! What `ternctl webhook status` shows of one group's outbox for one
//! endpoint, read from the group's tree as applied on this node (every
//! replica holds the same outbox; the last error is known only where the
//! group is led).

use tern_model::api::OutboxEvent;

use super::{cursor_key, dead_prefix, parse_outbox_key, OUTBOX_PREFIX};

/// An endpoint's backlog in one group.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Backlog {
    /// Events after the endpoint's cursor (wanted or not).
    pub pending: u64,
    /// Unix milliseconds of the oldest of them (`None`: nothing pending).
    pub oldest_at: Option<i64>,
    /// Dead letters kept.
    pub dead: u64,
}

/// One dead letter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    pub id: String,
    pub event: OutboxEvent,
}

/// The backlog of `endpoint` in `tree` (a group's state machine tree).
pub fn backlog(tree: &sled::Tree, endpoint: &str) -> Backlog {
    let cursor = tree
        .get(cursor_key(endpoint))
        .ok()
        .flatten()
        .map(|c| c.to_vec())
        .unwrap_or_default();
    let start = if cursor.is_empty() {
        OUTBOX_PREFIX.to_vec()
    } else {
        [cursor.as_slice(), b"\0"].concat()
    };
    let mut b = Backlog::default();
    for (k, v) in tree
        .range(start..)
        .map_while(Result::ok)
        .take_while(|(k, _)| k.starts_with(OUTBOX_PREFIX))
    {
        if parse_outbox_key(&k).is_none() {
            continue;
        }
        if b.oldest_at.is_none() {
            b.oldest_at = bincode::deserialize::<OutboxEvent>(&v).ok().map(|e| e.at);
        }
        b.pending += 1;
    }
    b.dead = tree.scan_prefix(dead_prefix(endpoint)).count() as u64;
    b
}

/// Up to `limit` dead letters of `endpoint`, in key order.
pub fn dead_letters(tree: &sled::Tree, endpoint: &str, limit: usize) -> Vec<DeadLetter> {
    let prefix = dead_prefix(endpoint);
    tree.scan_prefix(&prefix)
        .map_while(Result::ok)
        .filter_map(|(k, v)| {
            let id = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            let event = bincode::deserialize(&v).ok()?;
            Some(DeadLetter { id, event })
        })
        .take(limit)
        .collect()
}
