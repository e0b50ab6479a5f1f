//! The configuration lives in the `tern-config` crate; this path keeps
//! `crate::config::Config` and its parts where the node's code names them.

pub use tern_config::*;
