//! The sending API (`/api/v1/` on the HTTP listener; docs/api.md).
//!
//! Layout: `compose.rs` (request → messages: templates, MIME, schedule; no
//! I/O), `problem.rs` (RFC 9457 errors).

pub mod compose;
pub mod keys;
pub mod problem;
pub mod purge;
pub mod status;
