//! Tern's SMTP protocol, sans I/O: bytes in, replies and decisions out. The
//! server session and the delivery client both live here, over one [`Reply`]
//! type; the node owns the sockets, timers, TLS and queue, and drives these
//! state machines. Nothing here does I/O, spawns or waits, so all of it is
//! tested with byte vectors and fuzzed (node/fuzz calls [`fuzzing`]).
//!
//! # Layout
//! - [`reply`]: the SMTP reply (code, enhanced status, text lines).
//! - [`command`]: parses server-side command lines (RFC 5321, ESMTP parameters).
//! - [`data`]: decodes DATA content (dot-unstuffing, smuggling protection).
//! - [`sasl`]: decodes AUTH PLAIN and LOGIN exchanges.
//! - [`future_release`]: HOLDFOR/HOLDUNTIL and the FUTURERELEASE keyword
//!   (RFC 4865) of submission listeners.
//! - [`proxy`]: parses PROXY protocol v1/v2 headers.
//! - [`policy`]: what the node tells a session: its settings, the relay
//!   policy, and the memory-budget and limit hooks the node implements.
//! - [`session`]: the server session state machine and its [`session::Output`].
//! - [`client`]: the delivery client's half: reading replies, EHLO
//!   capabilities, MAIL/RCPT parameters, DATA encoding, outcomes.
//! - [`transaction`]: one outbound transaction: the envelope commands, the
//!   pipelining batches, and replies to per-recipient outcomes (LMTP too).
//! - [`fuzzing`]: the checks the fuzz targets run (also replayed by tests).

pub mod client;
pub mod command;
pub mod data;
pub mod future_release;
#[doc(hidden)]
pub mod fuzzing;
pub mod policy;
pub mod proxy;
pub mod reply;
pub mod sasl;
pub mod session;
pub mod transaction;

pub use policy::{Limit, LimitObserver, MemoryBudget, RelayPolicy, Reservation, SessionConfig};
pub use reply::Reply;
pub use session::{AuthUser, AuthVerdict, EnqueueError, Senders, TlsInfo};

pub(crate) use tern_model::envelope;
