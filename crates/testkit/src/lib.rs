//! Tern's test kit: the plumbing every test of real processes needs, once.
//!
//! Tests drive `ternd` and `ternctl` as binaries (this crate never links the
//! node), on loopback ports, and wait on conditions with deadlines, never on
//! bare sleeps.
//!
//! # Layout
//! - [`ternd`]: one harness for a real `ternd` process (single node or a
//!   member of a cluster): start with a config file (or none), wait for
//!   `ready`, read the `listening` lines, kill / stop / pause / resume,
//!   logs, and `ternctl` calls bounded in time.
//! - [`config`]: config files for a cluster member and a single node.
//! - [`pki`]: a test cluster's certificates, made with `ternctl cert`.
//! - [`peers`]: real SMTP/LMTP peers (`smtp-sink` dumping each message to
//!   a file, `aiosmtpd`, Dovecot) and
//!   a throwaway certificate authority (openssl).
//! - [`dns`]: a `dnsmasq` DNS server and a SERVFAIL server.
//! - [`smtp`]: a blocking SMTP client and reply reader.
//! - [`ports`]: free loopback ports, and ports that refuse connections.
//! - [`wait`]: `wait_until` / `wait_for` with deadlines.
//! - [`bin()`]: where a workspace binary is.

pub mod config;
pub mod dns;
pub mod peers;
pub mod pki;
pub mod ports;
pub mod smtp;
pub mod ternd;
pub mod wait;

use std::path::PathBuf;
use std::time::Duration;

pub use ports::{closed_port, free_port, free_udp_tcp_port, ClosedPort};
pub use wait::{wait_for, wait_until};

/// What can go wrong in the kit (the callers are tests: they print it).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("timed out after {deadline:?} waiting for {what}")]
    Timeout { what: String, deadline: Duration },
    #[error("{name} not found at {path} (build it first, e.g. `cargo build --workspace --bins`, or set {env_var})")]
    MissingBinary {
        name: String,
        path: PathBuf,
        env_var: String,
    },
    #[error("{name} exited before ready: {status}\n{logs}")]
    ExitedBeforeReady {
        name: String,
        status: std::process::ExitStatus,
        logs: String,
    },
    /// A command ran and failed (its stderr), or the process was in the wrong state.
    #[error("{0}")]
    Failed(String),
}

impl Error {
    /// An I/O error with what was being done.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Path of a workspace binary (`ternd`, `ternctl`, `tern-powerfs`, ...).
///
/// Panics with a clear message when it is missing (see [`try_bin`]).
pub fn bin(name: &str) -> PathBuf {
    try_bin(name).unwrap_or_else(|e| panic!("{e}"))
}

/// Path of a workspace binary: the environment variable named after it
/// (`TERND`, `TERNCTL`, `TERN_POWERFS`: upper case, `-` as `_`) if set,
/// else the directory of the running test binary's profile (a test binary
/// runs from `target/<profile>/deps/`), else `CARGO_TARGET_DIR` (at run
/// time) or the workspace's `target/`, profile `debug`. Building it is the
/// caller's job.
pub fn try_bin(name: &str) -> Result<PathBuf> {
    let env_var = name.to_uppercase().replace('-', "_");
    let path = match std::env::var_os(&env_var) {
        Some(p) => PathBuf::from(p),
        None => profile_dir().join(name),
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::MissingBinary {
            name: name.to_owned(),
            path,
            env_var,
        })
    }
}

/// `target/<profile>` of the running executable when it sits in one
/// (`.../deps/` for test binaries, the profile dir for binaries), else the
/// workspace's `target/debug`.
fn profile_dir() -> PathBuf {
    if let Some(dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(PathBuf::from)) {
        let dir = if dir.ends_with("deps") {
            dir.parent().map(PathBuf::from).unwrap_or(dir)
        } else {
            dir
        };
        if dir.join("ternd").is_file() || dir.join("ternctl").is_file() {
            return dir;
        }
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    target.join("debug")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_binary_names_its_path_and_variable() {
        let e = try_bin("tern-no-such-binary").expect_err("missing");
        let text = e.to_string();
        assert!(matches!(e, Error::MissingBinary { .. }), "{e:?}");
        assert!(text.contains("TERN_NO_SUCH_BINARY"), "{text}");
        assert!(text.contains("tern-no-such-binary"), "{text}");
    }
}
