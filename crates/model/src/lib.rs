//! Tern's data model: the values that Raft replicates, that nodes send each
//! other and that `ternctl` reads. Plain data with serde; no I/O, no runtime.
//!
//! Every crate above may depend on this one; it depends on none of Tern's.
//!
//! # Layout
//! - [`envelope`]: the SMTP envelope of an accepted message.
//! - [`record`]: a queued message, its recipients' states and its stored form.
//! - [`request`]: what a group replicates (the Raft log's entries) and answers.
//! - [`stats`]: delivery analytics windows, mergeable across nodes.
//! - [`events`]: the names of event log lines.
//! - [`peer`]: operations one node asks another to write, and peer payload framing.
//! - [`shaping`]: automatic shaping actions and the suppression list (control group).
//! - [`bounce`]: bounce classes.
//! - [`api`]: the sending API's keys, templates and batches, and the durable event outbox.
//! - [`defaults`]: storage sizes the configuration and the storage code share.

pub mod api;
pub mod bounce;
pub mod defaults;
pub mod envelope;
pub mod events;
pub mod peer;
pub mod record;
pub mod request;
pub mod shaping;
pub mod stats;

use serde::{Deserialize, Serialize};

pub type NodeId = u64;
pub type GroupId = u64;
/// The control group's id; shard groups are 1..=shards.
pub const CONTROL_GROUP: GroupId = 0;

/// Where one record (a body, or a log entry) lives in a node's write-ahead log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BodyLoc {
    pub segment: u64,
    pub offset: u64,
    /// Payload length.
    pub len: u32,
    pub crc: u32,
}
