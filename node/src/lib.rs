//! Tern node: an SMTP server in front of a Raft-replicated, sharded queue.
//!
//! # Layout
//! - [`config`]: TOML into a validated [`config::Config`].
//! - [`smtp`]: the SMTP server (sans-IO session, codec, listener).
//! - [`submission`]: SMTP AUTH credentials for the submission listeners.
//! - [`queue`]: message records and the accept side of the queue.
//! - [`delivery`]: routing, MX resolution, delivery actors, SMTP/LMTP client.
//! - [`dsn`]: RFC 3464 delivery status notifications (bounces).
//! - [`raft`]: openraft types, sled log store, state machine, gRPC transport.
//! - [`storage`]: (the crate `tern-store`) the write-ahead log (Raft logs and bodies), the sled database of the state machines and the group-commit flusher.
//! - [`cluster`]: the control group's rules and state.
//! - [`admin`]: the gRPC admin service used by `ternctl`.
//! - [`http`]: health endpoints and Prometheus metrics.
//! - [`metrics`]: the metrics registry and the counters the parts share.
//! - [`auth`]: message checks and signing before queueing (SPF, DKIM, DMARC, ARC).
//! - [`webhook`]: event log lines POSTed to HTTP endpoints (`[[webhook]]`).
//! - [`tls_reload`]: TLS certificates that follow their files (and SIGHUP).
//! - [`app`]: wiring of all of the above into a running node.

pub mod admin;
pub mod app;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod delivery;
pub mod disk_guard;
pub mod dsn;
pub use tern_model::envelope;
pub mod http;
pub mod lifecycle;
pub mod metrics;
pub mod peer;
pub use tern_pki as pki;
pub mod queue;
pub mod raft;
pub mod smtp;
pub mod storage;
pub mod submission;
pub mod tls_reload;
pub mod webhook;
