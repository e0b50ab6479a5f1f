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
    #[error("{name} not found (looked in: {searched}); build it first, e.g. `cargo build --release --bins` (or `cargo build --bins` for debug), or set {env_var} to its path")]
    MissingBinary {
        name: String,
        /// The paths looked at, in order.
        searched: String,
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
/// else the first of these that holds it:
/// 1. the running executable's own directory (`tern-chaos` run from
///    `target/release/` finds `target/release/ternd`, as does an install
///    that puts them side by side),
/// 2. the profile directory of a test binary (it runs from
///    `target/<profile>/deps/`),
/// 3. `CARGO_TARGET_DIR` (at run time) or the workspace's `target/`, profile
///    `debug`, then `release`.
///
/// Building it is the caller's job; the error names every place looked at.
pub fn try_bin(name: &str) -> Result<PathBuf> {
    let env_var = name.to_uppercase().replace('-', "_");
    if let Some(path) = std::env::var_os(&env_var) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(Error::MissingBinary {
                name: name.to_owned(),
                searched: path.display().to_string(),
                env_var,
            })
        };
    }
    locate(name, &search_dirs(), env_var)
}

/// The first of `dirs` holding a file `name`.
fn locate(name: &str, dirs: &[PathBuf], env_var: String) -> Result<PathBuf> {
    let candidates: Vec<PathBuf> = dirs.iter().map(|d| d.join(name)).collect();
    match candidates.iter().find(|p| p.is_file()) {
        Some(path) => Ok(path.clone()),
        None => Err(Error::MissingBinary {
            name: name.to_owned(),
            searched: candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            env_var,
        }),
    }
}

/// Where [`try_bin`] looks, in order, without duplicates.
fn search_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(PathBuf::from)) {
        if dir.ends_with("deps") {
            if let Some(profile) = dir.parent() {
                dirs.push(profile.to_owned());
            }
        }
        dirs.insert(0, dir);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    dirs.push(target.join("debug"));
    dirs.push(target.join("release"));
    let mut unique: Vec<PathBuf> = Vec::new();
    for d in dirs {
        if !unique.contains(&d) {
            unique.push(d);
        }
    }
    unique
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `cargo run --release -p cluster-tests --bin tern-chaos` runs from
    /// `target/release/`: the binaries beside it come first, before the
    /// workspace's `target/debug`.
    #[test]
    fn the_running_executables_directory_comes_first() {
        let exe = std::env::current_exe().expect("current exe");
        let own = exe.parent().expect("exe dir");
        let dirs = search_dirs();
        assert_eq!(dirs[0], own, "{dirs:?}");
        assert!(dirs.iter().any(|d| d.ends_with("debug")), "{dirs:?}");
        assert!(dirs.iter().any(|d| d.ends_with("release")), "{dirs:?}");

        let beside = tempfile::tempdir().expect("tempdir");
        let fallback = tempfile::tempdir().expect("tempdir");
        let dirs = [beside.path().to_owned(), fallback.path().to_owned()];
        std::fs::write(fallback.path().join("ternd"), b"").expect("write");
        let found = locate("ternd", &dirs, "TERND".into()).expect("found in the fallback");
        assert_eq!(found, fallback.path().join("ternd"));
        std::fs::write(beside.path().join("ternd"), b"").expect("write");
        let found = locate("ternd", &dirs, "TERND".into()).expect("found beside");
        assert_eq!(found, beside.path().join("ternd"));
    }

    #[test]
    fn a_missing_binary_names_its_path_and_variable() {
        let e = try_bin("tern-no-such-binary").expect_err("missing");
        let text = e.to_string();
        assert!(matches!(e, Error::MissingBinary { .. }), "{e:?}");
        assert!(text.contains("TERN_NO_SUCH_BINARY"), "{text}");
        assert!(text.contains("tern-no-such-binary"), "{text}");
    }
}
