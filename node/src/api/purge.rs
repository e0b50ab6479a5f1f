//! Forgets what the sending API keeps for `GET` once it is older than
//! `[api] status_retention`: every few minutes each shard this node leads
//! drops the final statuses of older messages (`PurgeFinal`), and the
//! control group's leader the older batch records (`PurgeBatches`).

use std::sync::Arc;
use std::time::Duration;

use tern_model::api::final_key;

use crate::cluster::control::BATCH_PREFIX;
use crate::raft::groups::{GroupHandle, Groups};
use crate::raft::{NodeId, Request, CONTROL_GROUP};

/// Time between rounds (plus up to a minute of jitter, so that the
/// leaders of a cluster do not all write at once).
const INTERVAL: Duration = Duration::from_secs(600);
const JITTER_MS: u64 = 60_000;

/// Runs rounds until `stop` changes.
pub async fn run(groups: Arc<Groups>, node: NodeId, retention: Duration, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        let wait = INTERVAL + Duration::from_millis(rand::random::<u64>() % JITTER_MS);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
        let now_ms = chrono::Utc::now().timestamp_millis();
        let cutoff_ms = now_ms.saturating_sub(i64::try_from(retention.as_millis()).unwrap_or(i64::MAX));
        for g in groups.all().into_iter().filter(|g| g.leader() == Some(node)) {
            if let Some(request) = purge_request(&g, cutoff_ms) {
                if let Err(e) = g.raft.client_write(request).await {
                    tracing::warn!(group = g.id, error = %e, "api status purge not written; next round retries");
                }
            }
        }
    }
}

/// The purge `g` needs for records older than unix milliseconds
/// `cutoff_ms`, if it holds any.
fn purge_request(g: &GroupHandle, cutoff_ms: i64) -> Option<Request> {
    let tree = g.sm.tree();
    if g.id == CONTROL_GROUP {
        let before = cutoff_ms.div_euclid(1000);
        let any = tree
            .scan_prefix(BATCH_PREFIX)
            .flatten()
            .any(|(_, v)| bincode::deserialize::<tern_model::api::Batch>(&v).map_or(true, |b| b.created < before));
        return any.then_some(Request::PurgeBatches { before });
    }
    let before = id_before(cutoff_ms);
    let (oldest, _) = tree.scan_prefix(b"f/").flatten().next()?;
    (oldest.as_ref() < final_key(&before).as_slice()).then_some(Request::PurgeFinal { before })
}

/// The smallest queue id made at unix milliseconds `ms` (ids start with
/// their time as 11 upper-case hex digits: see `queue::IdGen`).
pub fn id_before(ms: i64) -> String {
    format!("{:011X}", (ms.max(0) as u64) & 0xFFF_FFFF_FFFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cutoff_id_sorts_between_older_and_newer_ids() {
        let ids = crate::queue::IdGen::new(3);
        let before = id_before(chrono::Utc::now().timestamp_millis() - 1);
        let id = ids.next();
        assert!(before.as_str() < id.as_str(), "{before} < {id}");
        let after = id_before(chrono::Utc::now().timestamp_millis() + 1);
        assert!(id.as_str() < after.as_str(), "{id} < {after}");
    }
}
