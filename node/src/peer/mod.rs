//! Node-to-node calls other than Raft: the `PeerService` server, who may
//! call it (and the Raft service), and the typed writes one node asks
//! another to make.
//!
//! Layout:
//! - `raft/gate.rs` (shared with the Raft service): peer authentication.
//!   With cluster TLS every peer RPC must carry a node certificate
//!   (`tern://node/<id>`) of a current member whose id matches the id the
//!   request claims.
//! - `server.rs`: the `PeerService` handlers (enqueue, operations,
//!   elections, pings, local parts of cluster-wide queries).
//!
//! A forwarded write is never a raw state-machine request: an enqueue
//! carries one [`NewMessage`](crate::raft::NewMessage) and an operator's
//! write one [`Operation`] (both in `tern_model`); the receiver validates it and builds the Raft
//! request itself.

pub mod server;

pub use tern_model::peer::*;
