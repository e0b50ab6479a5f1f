//! The hand-over state lives in the crate `tern-raft` (a group's planned
//! leadership hand-over); this module keeps the old path working.

pub use tern_raft::handover::*;
