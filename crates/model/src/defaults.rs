//! Storage sizes that both the configuration (as defaults of `[node]` keys)
//! and the storage code (when opened without a configuration, in tests)
//! use: written once here, below both.

/// A write-ahead log segment is closed and a new one started once it is past
/// this size (`node.log_segment_mb`).
pub const LOG_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;

/// sled's cache unless configured (`node.state_cache_mb`). A queue whose
/// records outgrow it accepts mail more slowly (bench/RESULTS.md).
pub const STATE_CACHE_BYTES: u64 = 256 << 20;
