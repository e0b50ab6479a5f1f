//! The sending API (`/api/v1/` on the HTTP listener; docs/api.md).
//!
//! Layout: `compose.rs` (request → messages: templates, MIME, schedule; no
//! I/O), `template.rs` (minijinja, bounded), `mime.rs` (checks and
//! mail-builder), `openapi.rs` (the OpenAPI document), `problem.rs`
//! (RFC 9457 errors).

pub mod compose;
pub mod keys;
pub mod mime;
pub mod openapi;
pub mod problem;
pub mod purge;
pub mod status;
pub mod template;
