//! The SMTP server: accepts mail from the network (RFC 5321 with PIPELINING,
//! SIZE, 8BITMIME, SMTPUTF8, ENHANCEDSTATUSCODES, CHUNKING/BINARYMIME, DSN,
//! STARTTLS and, on submission listeners, AUTH) and hands each accepted
//! message to an [`Enqueuer`], answering `250` only once the message is
//! durably queued.
//!
//! Layout: the protocol itself (commands, replies, DATA decoding, SASL,
//! PROXY headers and the sans-IO session) is the `tern-smtp` crate,
//! re-exported here under its old paths; [`limits`] holds the node-wide
//! per-address, rate and memory limits, [`proxy`] reads a PROXY header off a
//! socket, and [`server`] owns the sockets, timeouts, TLS, resource limits
//! and shutdown, and turns its settings into the session's.

pub use tern_smtp::{command, data, fuzzing, reply, sasl, session};
pub mod dnsbl;
pub mod greylist;
pub mod limits;
pub mod proxy;
pub mod screen;
pub mod server;

pub use reply::Reply;
pub use server::{serve, serve_reloadable, EnqueueError, Enqueuer, RelayPolicy, SmtpConfig, TlsInfo};
