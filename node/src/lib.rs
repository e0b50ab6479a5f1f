//! Tern node: an SMTP server in front of a Raft-replicated, sharded queue.
//!
//! # Layout
//! The protocol, data, storage and Raft layers are crates below this one
//! (docs/design.md, "Layers and crates"); this crate is the node's runtime.
//! - [`app`]: the composition root: config -> storage -> Raft groups ->
//!   listeners, and the hooks that tie the crates to the node's rules.
//! - [`smtp`]: the SMTP listener (limits, PROXY, TLS) driving `tern-smtp`'s session.
//! - [`submission`]: SMTP AUTH credentials for the submission listeners.
//! - [`auth`]: message checks and signing before queueing (SPF, DKIM, DMARC, ARC).
//! - [`queue`]: the accept side, the shard actor, the outcome decision, the
//!   queue's Raft rules (`queue/apply.rs`), the shard writers.
//! - [`backoff`]: `[[backoff]]` rules turning remote replies into automatic
//!   shaping actions held in the control group, and their effect on delivery.
//! - [`delivery`]: routing, MX resolution, site actors, the SMTP/LMTP client,
//!   egress sources, pools and warm-up (`delivery/egress.rs`).
//! - [`shaping`]: `[[shaping]]` rules and the cluster-wide rate and connection limits.
//! - [`bounce`]: bounce classes and the suppression list (checks, automatic additions).
//! - [`fbl`]: feedback-loop (ARF) reports taken at `[fbl]` addresses.
//! - [`dsn`]: RFC 3464 delivery status notifications (bounces).
//! - [`cluster`]: the control group's rules and the cluster controller
//!   (placement, reconciliation, leader moves, peer calls and forwarding).
//! - [`peer`]: the `PeerService` server (node-to-node calls other than Raft).
//! - [`admin`]: the gRPC AdminService used by `ternctl` (authorisation, audit).
//! - [`http`]: health endpoints and Prometheus metrics.
//! - [`console`]: the web console on the HTTP listener (`/console`).
//! - [`metrics`]: the metrics registry and the counters the parts share (a leaf).
//! - [`outbox`]: durable webhook events: produced in every group's apply,
//!   posted signed by the group's leader, acknowledged through Raft.
//! - [`webhook`]: event log lines POSTed to HTTP endpoints (`[[webhook]]`).
//! - [`tls_reload`]: TLS certificates that follow their files (and SIGHUP).
//! - [`reload`]: configuration reload (SIGHUP, `ternctl config reload`) and `ternd check-config`.
//! - [`raft`], [`storage`], [`config`], [`pki`], [`envelope`]: the crates
//!   `tern-raft`, `tern-store`, `tern-config`, `tern-pki` and `tern-model`'s
//!   envelope under the names the node's modules use.

pub mod admin;
pub mod api;
pub mod app;
pub mod auth;
pub mod backoff;
pub mod bounce;
pub mod cluster;
pub mod config;
pub mod console;
pub mod delivery;
pub mod disk_guard;
pub mod dsn;
pub mod fbl;
pub mod filter;
pub use tern_model::envelope;
pub mod http;
pub mod lifecycle;
pub mod metrics;
pub mod outbox;
pub mod peer;
pub use tern_pki as pki;
pub mod queue;
pub mod raft;
pub mod reload;
pub mod reports;
pub mod shaping;
pub mod smtp;
pub mod storage;
pub mod submission;
pub mod tls_reload;
pub mod webhook;
