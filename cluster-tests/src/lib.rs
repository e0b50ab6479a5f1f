//! Failover harness for Tern clusters: real `ternd` processes
//! ([`process`]), one TCP proxy per ordered pair of nodes so links can be cut
//! without root ([`proxy`]), cluster formation and inspection through
//! `ternctl` ([`cluster`]), a mail sink that records every delivery
//! ([`sink`]), a load generator that records every SMTP reply ([`load`]) and
//! the zero-loss / duplicate / resume checks ([`check`]). [`target::Target`]
//! is what fault injection needs from a cluster, started here or already
//! running ([`external`], driven through local processes found by port).
//!
//! The single-node end-to-end tests stay in `node/tests/e2e`; the tests of
//! this crate (`tests/failover/main.rs`) and the `tern-chaos` binary use this
//! library. See docs/failover-testing.md.

pub mod check;
pub mod cluster;
pub mod external;
pub mod load;
pub mod pki;
pub mod process;
pub mod proxy;
pub mod sink;
pub mod target;

use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// A free loopback TCP port for a listener that binds it later.
///
/// Taken from 20000..32000, below Linux's ephemeral range (32768..60999):
/// a port released after `bind(0)` can be handed to any outgoing connection
/// before the node binds it (CI saw exactly that). Each process walks its
/// own pid-derived sequence and checks the port is free right now.
pub fn free_port() -> anyhow::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 20000;
    const SPAN: u32 = 12000;
    let base = std::process::id().wrapping_mul(7919) % SPAN;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOW + (base + n) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("no free port in {LOW}..{}", LOW + SPAN)
}

/// Polls `cond` every 50 ms until it holds; `Err` naming `what` after `deadline`.
pub fn wait_until(deadline: Duration, what: &str, mut cond: impl FnMut() -> bool) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        if cond() {
            return Ok(start.elapsed());
        }
        if start.elapsed() > deadline {
            anyhow::bail!("timed out after {deadline:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Where the workspace's `target/debug` directory is (`CARGO_TARGET_DIR`
/// when set at run time, else `<workspace>/target`).
fn target_debug_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("debug")
}

/// Path of a workspace binary (`ternd`, `ternctl`): the environment variable
/// `env_var` (`TERND`, `TERNCTL`) if set, else `<workspace>/target/debug/NAME`.
/// Building it is the caller's job; a missing binary is a clear error.
pub fn binary(name: &str, env_var: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os(env_var)
        .map(PathBuf::from)
        .unwrap_or_else(|| target_debug_dir().join(name));
    anyhow::ensure!(
        path.is_file(),
        "{name} not found at {} (build it first: `cargo build --workspace --bins`, or set {env_var})",
        path.display()
    );
    Ok(path)
}

/// `ternd`'s path (env `TERND` or `<workspace>/target/debug/ternd`).
pub fn ternd_path() -> anyhow::Result<PathBuf> {
    binary("ternd", "TERND")
}

/// `tern-powerfs`'s path (env `TERN_POWERFS` or
/// `<workspace>/target/debug/tern-powerfs`; `cargo build -p tern-powerfs`).
pub fn powerfs_path() -> anyhow::Result<PathBuf> {
    binary("tern-powerfs", "TERN_POWERFS")
}

/// `ternctl`'s path (env `TERNCTL` or `<workspace>/target/debug/ternctl`).
pub fn ternctl_path() -> anyhow::Result<PathBuf> {
    binary("ternctl", "TERNCTL")
}
