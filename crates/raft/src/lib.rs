//! tern-raft: Tern's multi-group Raft plumbing. openraft type configuration
//! (the replicated [`Request`] is `tern_model::request::Request`), the log
//! store over tern-store's write-ahead log, snapshot files, the state machine
//! mechanics (which call an [`apply::Apply`] for what a request means: the
//! node's queue and control rules), the gRPC network and service, the router
//! that maps a group id to its local `Raft`, the peer gate and cluster TLS.
//! Groups are opened by [`host::GroupHost`], which tells the node through
//! [`host::GroupHooks`].
//!
//! Group 0 is the control group (membership, shard placement); groups
//! 1..=S are queue shards. The control group's keys are the node's schema:
//! the gate reads them through [`gate::PeerDirectory`].
//!
//! # Layout
//!
//! - this file: [`TypeConfig`], [`Durability`] (tern-store with openraft's
//!   flush callback), [`raft_config`], type aliases.
//! - [`apply`]: the [`apply::Apply`] seam and [`apply::ApplyCtx`].
//! - [`state_machine`]: staging, write-back, checkpoints, snapshot build and
//!   install; [`state_machine::SmEvent`]s for the shard's scheduler.
//! - [`log_store`]: openraft's log storage over the write-ahead log (bodies
//!   sideloaded).
//! - [`snapshot`]: the snapshot file format.
//! - [`network`] / [`service`]: the Raft gRPC client and server.
//! - [`groups`] / [`host`]: the group router and the host that opens groups.
//! - [`recover`]: unsafe recovery of a group whose majority is lost for good.
//! - [`quiet`]: idle shards stop their heartbeats; one liveness per peer
//!   vouches for them.
//! - [`handover`]: claims of in-flight work for a planned leader hand-over.
//! - [`gate`]: who may make peer RPCs ([`gate::PeerRefusals`] counts refusals).
//! - [`tls`]: cluster mTLS material, reloadable.

// openraft's StorageError is what its storage traits return; boxing it here
// would only add conversions.
#![allow(clippy::result_large_err)]

pub mod apply;
pub mod gate;
pub mod groups;
pub mod handover;
pub mod host;
pub mod log_store;
pub mod network;
pub mod quiet;
pub mod recover;
pub mod service;
pub mod snapshot;
pub mod state_machine;
#[cfg(test)]
mod storage_suite;
#[cfg(any(test, feature = "test-hooks"))]
pub mod testing;
pub mod tls;

pub use tern_model::request::{Body, NewMessage, OutcomeUpdate, QueueAction, RcptResult, Request, Response};
pub use tern_model::{GroupId, NodeId, CONTROL_GROUP};

openraft::declare_raft_types!(
    /// Tern's Raft type configuration, shared by every group.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = snapshot::SnapshotFile,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The node's storage with openraft's append completion as its flush
/// callback.
pub type Durability = tern_store::Durability<LogFlushed>;

/// openraft's "the append is on disk" callback, handed to the group commit.
pub struct LogFlushed(pub openraft::storage::LogFlushed<TypeConfig>);

impl tern_store::Flushed for LogFlushed {
    fn flushed(self, result: Result<(), tern_store::FlushError>) {
        self.0.log_io_completed(result.map_err(std::io::Error::other));
    }
}

pub type Raft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type StorageError = openraft::StorageError<NodeId>;

/// Bytes of snapshot per InstallSnapshot RPC.
pub const SNAPSHOT_CHUNK_BYTES: u64 = 3 * 1024 * 1024;

/// openraft's election timeout ceiling, which is also its leader lease: a
/// voter that heard from its leader this recently refuses another
/// candidate's vote, and so does a leader elected this recently.
pub const LEADER_LEASE: std::time::Duration = std::time::Duration::from_millis(2000);

/// Raft timing suited to many groups per node (ARCHITECTURE.md).
pub fn raft_config() -> Result<std::sync::Arc<openraft::Config>, openraft::ConfigError> {
    let config = openraft::Config {
        cluster_name: "tern".into(),
        heartbeat_interval: 200,
        election_timeout_min: 1000,
        election_timeout_max: LEADER_LEASE.as_millis() as u64,
        max_payload_entries: 256,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(20_000),
        max_in_snapshot_log_to_keep: 1_000,
        // Snapshots travel in chunks of this size (well under the gRPC
        // message limit, network::MAX_GRPC_MESSAGE).
        snapshot_max_chunk_size: SNAPSHOT_CHUNK_BYTES,
        // Per chunk, and the last chunk's RPC lasts the follower's whole
        // install (bodies written and synced in batches): at openraft's
        // 200 ms a large snapshot timed out and was rebuilt and resent. Not
        // longer: a hung RPC to a partitioned peer holds its catch-up.
        install_snapshot_timeout: 60_000,
        ..Default::default()
    };
    Ok(std::sync::Arc::new(config.validate()?))
}

/// Storage error helpers: every sled/io failure becomes an openraft StorageError.
pub(crate) fn io_err(
    subject: openraft::ErrorSubject<NodeId>,
    verb: openraft::ErrorVerb,
    e: impl std::fmt::Display,
) -> StorageError {
    openraft::StorageIOError::new(subject, verb, openraft::AnyError::error(e.to_string())).into()
}
