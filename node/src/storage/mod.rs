//! The node's storage lives in the crate `tern-store`; this module keeps the
//! old paths (`crate::storage::space`, `crate::storage::wal`, ...) working.

pub use tern_store::*;
