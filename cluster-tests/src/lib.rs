//! Failover harness for Tern clusters (grows with the multi-node work).
//!
//! Today the single-node end-to-end tests live in `node/tests/e2e` (they need
//! the `ternd` binary of that package); this crate will hold the multi-node
//! harness: real `ternd` processes, a controlled mail sink, fault injection
//! (SIGKILL, SIGSTOP, partitions) and zero-loss checks.
