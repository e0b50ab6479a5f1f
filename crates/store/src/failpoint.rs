//! Crash points for tests below the process level: a test arms one by
//! name in the environment variable `TERN_FAILPOINTS` (comma-separated)
//! and the node aborts there, like SIGKILL at that exact instant (no
//! destructor runs, so nothing sled buffers in memory is flushed). Unset,
//! each check is one load of a flag read once at start.
//!
//! Points:
//! - `abort-after-purge`: right after a Raft log purge is on disk.
//! - `no-checkpointer`: the once-a-second checkpoints do not run, so the
//!   only checkpoints are those of snapshots (the state of a node whose
//!   checkpointer has not caught up).
//! - `fsync-eio-on-file`: fsyncs of the log fail with EIO while a file
//!   named `fail-fsync` exists in the log's directory (`DATA_DIR/wal`).

use std::sync::OnceLock;

fn armed() -> &'static Vec<String> {
    static ARMED: OnceLock<Vec<String>> = OnceLock::new();
    ARMED.get_or_init(|| {
        std::env::var("TERN_FAILPOINTS")
            .map(|v| {
                v.split(',')
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    })
}

/// Whether the point `name` is armed.
pub fn is_armed(name: &str) -> bool {
    armed().iter().any(|p| p == name)
}

/// Aborts the process at point `name` (the caller checked [`is_armed`]).
pub fn abort(name: &str) -> ! {
    eprintln!("ternd: failpoint {name} reached; aborting");
    std::process::abort()
}
