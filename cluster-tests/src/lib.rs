//! Failover harness for Tern clusters, built on `tern-testkit` (the one
//! `ternd` process harness, free ports, waits, the test PKI): cluster
//! members ([`process`]), one TCP proxy per ordered pair of nodes so links can be cut
//! without root ([`proxy`]), cluster formation and inspection through
//! `ternctl` ([`cluster`]), a mail sink that records every delivery
//! ([`sink`]), a load generator that records every SMTP reply ([`load`]) and
//! the zero-loss / duplicate / resume checks ([`check`]). [`target::Target`]
//! is what fault injection needs from a cluster, started here or already
//! running ([`external`], driven through local processes found by port).
//!
//! The single-node end-to-end tests stay in `node/tests/e2e`; the tests of
//! this crate (`tests/failover/main.rs`) and the `tern-chaos` binary use this
//! library. See docs/failover-testing.md.

pub mod check;
pub mod cluster;
pub mod external;
pub mod load;
pub mod process;
pub mod proxy;
pub mod sink;
pub mod target;
