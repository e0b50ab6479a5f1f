//! Generated protocol types and gRPC stubs for Tern.
//!
//! - [`raft`]: the node-to-node Raft transport (all groups over one service).
//! - [`admin`]: the operator admin service spoken by `ternctl`.

#[allow(clippy::all, clippy::pedantic, clippy::unwrap_used)]
pub mod raft {
    tonic::include_proto!("tern.raft");
}

#[allow(clippy::all, clippy::pedantic, clippy::unwrap_used)]
pub mod admin {
    tonic::include_proto!("tern.admin");
}
