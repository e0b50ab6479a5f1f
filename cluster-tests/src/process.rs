//! A cluster member: a [`tern_testkit::ternd::Ternd`] with its config
//! ([`NodeConfig`], written in its own temp dir), restarted with the same
//! config and data, its log lines prefixed `[nN#START]`. Faults: SIGKILL,
//! SIGSTOP/SIGCONT, and a power cut when the data dir is on its own
//! `tern-powerfs` mount ([`Node::spawn_on_powerfs`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use anyhow::Context;
pub use tern_testkit::config::NodeConfig;
use tern_testkit::ternd::Ternd;
pub use tern_testkit::ternd::{run_bounded, State};

pub struct Node {
    pub config: NodeConfig,
    /// The process. Declared before `power` so it is killed (on drop) before
    /// the file system under its data dir is unmounted.
    ternd: Ternd,
    /// The power-cut file system under `data_dir`, if any. Declared before
    /// `dir` so it is unmounted (on drop) before the temp dir is removed.
    power: Option<tern_powerfs::mount::PowerMount>,
    /// Keeps the node's directory alive for the node's lifetime.
    dir: tempfile::TempDir,
    /// From the last `listening smtp=` line (changes at each restart: port 0).
    pub smtp: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
}

impl Node {
    /// Writes the config and starts the process; does not wait for `ready`
    /// (see [`Node::wait_ready`]).
    pub fn spawn(config: NodeConfig) -> anyhow::Result<Node> {
        Node::spawn_with(config, false)
    }

    /// Like [`Node::spawn`], with the data dir on its own `tern-powerfs`
    /// mount (backing dir `backing/` beside it), so [`Node::power_cut`] can
    /// drop what the node never fsynced.
    pub fn spawn_on_powerfs(config: NodeConfig) -> anyhow::Result<Node> {
        Node::spawn_with(config, true)
    }

    fn spawn_with(config: NodeConfig, powerfs: bool) -> anyhow::Result<Node> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("tern-n{}-", config.id))
            .tempdir()?;
        let config_path = dir.path().join("tern.toml");
        std::fs::write(&config_path, config.to_toml(&dir.path().join("data")))?;
        let power = if powerfs {
            let binary = tern_testkit::try_bin("tern-powerfs")?;
            Some(
                tern_powerfs::mount::PowerMount::mount(&binary, &dir.path().join("backing"), &dir.path().join("data"))
                    .with_context(|| format!("mounting powerfs for node {}", config.id))?,
            )
        } else {
            None
        };
        // Checked here so a missing ternctl fails at start, not at the first call.
        tern_testkit::try_bin("ternctl")?;
        let ternd = Ternd::with_config(&config_path)?.labelled(&format!("n{}", config.id), true);
        let mut node = Node {
            config,
            ternd,
            power,
            dir,
            smtp: None,
            http: None,
        };
        node.start()?;
        Ok(node)
    }

    pub fn id(&self) -> u64 {
        self.config.id
    }

    pub fn grpc(&self) -> SocketAddr {
        self.config.grpc
    }

    pub fn state(&self) -> State {
        self.ternd.state()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Print the logs on drop when the thread is panicking (tests; on by default).
    pub fn print_logs_on_panic(&mut self, on: bool) {
        self.ternd.print_logs_on_panic = on;
    }

    /// Starts the process (again, same config and data dir) without waiting.
    pub fn start(&mut self) -> anyhow::Result<()> {
        self.smtp = None;
        self.http = None;
        self.ternd.start()?;
        Ok(())
    }

    /// Waits (bounded) for the `ready` line and reads the `listening` lines.
    pub fn wait_ready(&mut self, deadline: Duration) -> anyhow::Result<()> {
        self.ternd.wait_ready(deadline)?;
        self.smtp = self.ternd.listening("smtp");
        self.http = self.ternd.listening("http");
        if let Some(addr) = self.ternd.listening("grpc") {
            anyhow::ensure!(addr == self.grpc(), "grpc on {addr}, configured {}", self.grpc());
        }
        anyhow::ensure!(self.smtp.is_some(), "node {}: no `listening smtp=` line", self.id());
        Ok(())
    }

    /// The address of a `listening KIND=` line of the current run (e.g.
    /// `submission`); `None` before `ready` or when not configured.
    pub fn listening(&self, kind: &str) -> Option<SocketAddr> {
        self.ternd.listening(kind)
    }

    /// SIGKILL, as a crash or power loss would (waits for the exit).
    pub fn kill(&mut self) {
        self.ternd.kill();
        self.smtp = None;
    }

    /// A power cut: SIGKILL, then everything the node wrote and never
    /// fsynced is dropped from its data dir (directory entries not made
    /// durable are undone); `tear` keeps a 4 KiB-aligned prefix of each
    /// file's oldest unsynced write. The node stays down (see [`Node::start`]).
    /// Returns the file system's counters (`dropped_bytes`, `undone_entries`...).
    pub fn power_cut(&mut self, tear: bool) -> anyhow::Result<tern_powerfs::mount::Counters> {
        self.kill();
        let id = self.id();
        let power = self
            .power
            .as_mut()
            .with_context(|| format!("node {id} is not on powerfs (Options::power_fs)"))?;
        power.cut(tear).with_context(|| format!("power cut of node {id}"))
    }

    /// Makes everything the node wrote durable now, as the kernel's writeback
    /// would given time (hides missing fsyncs; see tern_powerfs's doc).
    pub fn settle_fs(&mut self) -> anyhow::Result<tern_powerfs::mount::Counters> {
        let id = self.id();
        self.power
            .as_mut()
            .with_context(|| format!("node {id} is not on powerfs"))?
            .settle()
    }

    /// What a power cut would drop now (`dirty_files`, `dirty_bytes`, `pending_entries`).
    pub fn fs_status(&mut self) -> anyhow::Result<tern_powerfs::mount::Counters> {
        let id = self.id();
        self.power
            .as_mut()
            .with_context(|| format!("node {id} is not on powerfs"))?
            .status()
    }

    /// Whether the data dir is on a `tern-powerfs` mount.
    pub fn on_powerfs(&self) -> bool {
        self.power.is_some()
    }

    /// SIGTERM, an orderly stop (systemd's, a rolling restart's), waiting
    /// up to `deadline` for the exit, then SIGKILL. False when it had to kill.
    pub fn terminate(&mut self, deadline: Duration) -> anyhow::Result<bool> {
        let clean = self.ternd.terminate(deadline)?;
        self.smtp = None;
        Ok(clean)
    }

    /// Kills (SIGKILL) and starts again with the same config and data dir,
    /// waiting for `ready`.
    pub fn restart(&mut self, deadline: Duration) -> anyhow::Result<()> {
        self.kill();
        self.start()?;
        self.wait_ready(deadline)
    }

    /// SIGSTOP: the process freezes (sockets stay open, nothing answers).
    pub fn pause(&mut self) -> anyhow::Result<()> {
        Ok(self.ternd.pause()?)
    }

    /// SIGCONT after [`Node::pause`].
    pub fn resume(&mut self) -> anyhow::Result<()> {
        Ok(self.ternd.resume()?)
    }

    pub fn stdout_lines(&self) -> Vec<String> {
        self.ternd.stdout_lines()
    }

    /// Every stderr line since the first start, prefixed `[nID#START]`.
    pub fn logs(&self) -> String {
        self.ternd.logs()
    }

    /// Runs ternctl against this node's own gRPC address, killed after `deadline`
    /// (a paused node never answers).
    pub fn ternctl(&self, args: &[&str], deadline: Duration) -> anyhow::Result<Output> {
        Ok(tern_testkit::ternd::ternctl(
            self.grpc(),
            args,
            &self.config.ternctl_env,
            deadline,
        )?)
    }

    /// `ternctl ARGS -o json`, parsed; an error when ternctl fails.
    pub fn ternctl_json(&self, args: &[&str], deadline: Duration) -> anyhow::Result<serde_json::Value> {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let out = self.ternctl(&all, deadline)?;
        anyhow::ensure!(
            out.status.success(),
            "ternctl {args:?} on node {}: {}",
            self.id(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        serde_json::from_slice(&out.stdout).context("ternctl json")
    }
}
