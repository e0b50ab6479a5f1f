//! The SMTP server: accepts mail from the network (RFC 5321 with PIPELINING,
//! SIZE, 8BITMIME, SMTPUTF8, ENHANCEDSTATUSCODES, CHUNKING/BINARYMIME, DSN,
//! STARTTLS and, on submission listeners, AUTH) and hands each accepted
//! message to an [`Enqueuer`], answering `250` only once the message is
//! durably queued.
//!
//! Layout: [`command`] parses command lines, [`reply`] formats replies,
//! [`data`] decodes DATA content (dot-unstuffing, smuggling protection),
//! [`sasl`] decodes AUTH exchanges, [`proxy`] parses PROXY protocol
//! headers, [`limits`] holds the node-wide per-address, rate and memory
//! limits, [`session`] is the sans-IO protocol state machine, and [`server`]
//! owns the sockets, timeouts, TLS, resource limits and shutdown.

pub mod command;
pub mod data;
#[doc(hidden)]
pub mod fuzzing;
pub mod limits;
pub mod proxy;
pub mod reply;
pub mod sasl;
pub mod server;
pub mod session;

pub use reply::Reply;
pub use server::{serve, EnqueueError, Enqueuer, RelayPolicy, SmtpConfig, TlsInfo};
