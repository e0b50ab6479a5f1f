//! Generated protocol types and gRPC stubs for Tern.
//!
//! - [`raft`]: the node-to-node Raft transport (all groups over one service).
//! - [`admin`]: the operator admin service spoken by `ternctl`.
//! - [`peer`]: node-to-node calls other than Raft (forwarded writes,
//!   elections, pings, the local parts of cluster-wide queries).

#[allow(clippy::all, clippy::pedantic, clippy::unwrap_used)]
pub mod raft {
    tonic::include_proto!("tern.raft");
}

#[allow(clippy::all, clippy::pedantic, clippy::unwrap_used)]
pub mod admin {
    tonic::include_proto!("tern.admin");
}

#[allow(clippy::all, clippy::pedantic, clippy::unwrap_used)]
pub mod peer {
    tonic::include_proto!("tern.peer");
}
