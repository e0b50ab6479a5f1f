//! Failover scenarios on real `ternd` clusters (see docs/failover-testing.md).
//! Needs `target/debug/ternd` and `ternctl` (`cargo build -p tern-node -p ternctl`) and
//! Postfix's smtp-sink (in PATH or /usr/sbin). Scenarios run one at a time
//! (a process-wide lock): several clusters on two cores would starve each
//! other's Raft timers.
#![allow(clippy::unwrap_used)]

mod chaos;
mod common;
mod failover_time;
mod kill;
mod membership;
mod partition;
mod pause;
mod planned;
mod power_cut;
mod recover;
mod restart;
mod scheduled;
mod seven;
