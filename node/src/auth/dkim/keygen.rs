//! New DKIM key pairs: in `tern-config` (`ternctl dkim generate` uses them
//! without the node); re-exported where the node's tests name them.

pub use tern_config::keygen::*;
