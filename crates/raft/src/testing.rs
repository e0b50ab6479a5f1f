//! Test helpers (unit tests here and, with the `test-hooks` feature, the
//! node's suite of its queue rules): one group's log store and state
//! machine over a data directory.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;

use crate::apply::Apply;
use crate::log_store::LogStore;
use crate::state_machine::StateMachine;
use crate::Durability;

/// Group 1's log store and state machine in `dir`, applying with `rules`.
pub async fn open(dir: &Path, rules: Arc<dyn Apply>) -> (LogStore, StateMachine) {
    open_with(Durability::open(dir).unwrap(), rules).await
}

/// Opens again what the last test step dropped: sled's and the flusher's
/// threads release the database lock shortly after the drop.
pub async fn reopen(dir: &Path, rules: Arc<dyn Apply>) -> (LogStore, StateMachine) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match Durability::open(dir) {
            Ok(d) => break open_with(d, rules).await,
            Err(e) => assert!(std::time::Instant::now() < deadline, "{e:#}"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Group 1 over an opened `durability`.
pub async fn open_with(durability: Arc<Durability>, rules: Arc<dyn Apply>) -> (LogStore, StateMachine) {
    let log = LogStore::open(Arc::clone(&durability), 1).unwrap();
    let sm = StateMachine::open(Arc::clone(&durability), 1, rules).await.unwrap();
    durability.wal().enable_reclaim();
    (log, sm)
}
