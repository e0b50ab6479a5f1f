//! What opening the storage and flushing it can fail with.

use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The node's storage could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// A file or directory operation on `path` failed.
    #[error("{action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A segment of the write-ahead log is damaged before its end.
    #[error(transparent)]
    Damaged(#[from] Damaged),
    /// sled refused to open its database.
    #[error("opening sled database in {}", dir.display())]
    Sled {
        dir: PathBuf,
        #[source]
        source: sled::Error,
    },
    /// The start-up sync of the state database failed.
    #[error("syncing the state database at start")]
    StartSync(#[source] FlushError),
    /// The flusher thread could not be started.
    #[error("starting flusher thread")]
    Flusher(#[source] std::io::Error),
}

impl OpenError {
    pub(crate) fn io(action: &'static str, path: &Path, source: std::io::Error) -> OpenError {
        OpenError::Io {
            action,
            path: path.to_owned(),
            source,
        }
    }
}

/// A flush did not make the writes durable. Cloned to every completion of
/// one group commit, hence the `Arc`s.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FlushError {
    /// The `fdatasync` of the write-ahead log failed (or an earlier one did).
    #[error("fdatasync log: {0}")]
    Log(#[source] Arc<std::io::Error>),
    /// A step of making the state database durable failed.
    #[error("{step}: {source}")]
    State {
        step: &'static str,
        #[source]
        source: Arc<std::io::Error>,
    },
    /// sled's own flush failed.
    #[error("sled flush: {0}")]
    SledFlush(#[source] Arc<sled::Error>),
    /// An earlier sync of the state database failed: fail-stop.
    #[error("an earlier fsync of the state database failed (fail-stop)")]
    StateFailedEarlier,
    /// The flusher thread is gone.
    #[error("flusher stopped")]
    Stopped,
    /// The blocking task that flushed the state panicked or was cancelled.
    #[error("sled flush: {0}")]
    Task(String),
}

/// A record that fails its checksum before the end of the log.
#[derive(Debug, thiserror::Error)]
#[error(
    "write-ahead log segment {} is damaged at offset {offset} and later segments exist; \
     this node's log cannot be trusted. Remove this node's data directory and add the node \
     back as a new member (docs/operations.md, \"A damaged write-ahead log\")",
    path.display()
)]
pub struct Damaged {
    pub path: PathBuf,
    pub offset: u64,
}
