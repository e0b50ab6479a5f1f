//! Real `ternd` processes: each in its own temp data dir with a TOML config
//! written here, started and restarted with the same config and data, logs
//! (stderr) kept with a `[nN]` prefix and printed when a test fails, killed
//! on drop. Faults: SIGKILL, SIGSTOP/SIGCONT, and a power cut when the data
//! dir is on its own `tern-powerfs` mount ([`Node::spawn_on_powerfs`]).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;

/// Everything that goes into a node's config file.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub id: u64,
    /// Create the cluster (node 1 only).
    pub bootstrap: bool,
    /// This node's own gRPC address (listened on and advertised).
    pub grpc: SocketAddr,
    pub shards: u32,
    /// `[cluster] peer_addresses`: how this node dials the others (the proxies).
    pub peer_addresses: BTreeMap<u64, SocketAddr>,
    /// Where all mail goes (`[[route]] domain = "*"`).
    pub route_to: SocketAddr,
    /// `[delivery] retry_schedule`, e.g. `["1s"]`.
    pub retry_schedule: Vec<String>,
    /// Extra TOML appended at the end (new sections only).
    pub extra: String,
    /// Extra `key = value` lines for the `[node]` section (e.g. `log_segment_mb = 1`).
    pub node_extra: String,
    /// `[cluster]` TLS lines (`tls_cert`, `tls_key`, `tls_ca`), empty for plaintext.
    pub cluster_tls: String,
    /// Environment for this node's ternctl calls (`TERN_TLS_*`: the harness's admin client certificate).
    pub ternctl_env: Vec<(String, String)>,
}

impl NodeConfig {
    pub fn hostname(&self) -> String {
        format!("mx{}.tern.test", self.id)
    }

    pub fn to_toml(&self, data_dir: &std::path::Path) -> String {
        let peers: Vec<String> = self
            .peer_addresses
            .iter()
            .map(|(id, addr)| format!("\"{id}\" = \"{addr}\""))
            .collect();
        let retry: Vec<String> = self.retry_schedule.iter().map(|r| format!("\"{r}\"")).collect();
        format!(
            "[node]\nid = {id}\nhostname = \"{host}\"\ndata_dir = \"{data}\"\n{node_extra}\n\n\
             [listen]\nsmtp = [\"127.0.0.1:0\"]\ngrpc = \"{grpc}\"\nhttp = \"127.0.0.1:0\"\n\n\
             [cluster]\nbootstrap = {bootstrap}\nshards = {shards}\nadvertise_grpc = \"{grpc}\"\n\
             peer_addresses = {{ {peers} }}\n{cluster_tls}\n\
             [delivery]\nretry_schedule = [{retry}]\n\n\
             [[route]]\ndomain = \"*\"\nto = \"{route}\"\n\n{extra}\n",
            id = self.id,
            host = self.hostname(),
            data = data_dir.display(),
            grpc = self.grpc,
            bootstrap = self.bootstrap,
            shards = self.shards,
            peers = peers.join(", "),
            retry = retry.join(", "),
            route = self.route_to,
            extra = self.extra,
            node_extra = self.node_extra,
            cluster_tls = self.cluster_tls,
        )
    }
}

/// What the harness last did to the process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Running,
    /// SIGSTOPped.
    Paused,
    /// SIGKILLed (or never started / exited).
    Down,
}

pub struct Node {
    pub config: NodeConfig,
    /// The power-cut file system under `data_dir`, if any. Declared before
    /// `dir` so it is unmounted (on drop) before the temp dir is removed.
    power: Option<tern_powerfs::mount::PowerMount>,
    /// Keeps the node's directory alive for the node's lifetime.
    dir: tempfile::TempDir,
    config_path: PathBuf,
    child: Option<Child>,
    state: State,
    stdout: Arc<Mutex<Vec<String>>>,
    logs: Arc<Mutex<Vec<String>>>,
    /// From the last `listening smtp=` line (changes at each restart: port 0).
    pub smtp: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
    ternd: PathBuf,
    ternctl: PathBuf,
    /// Print the logs on drop when the thread is panicking (tests).
    pub print_logs_on_panic: bool,
    starts: u32,
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
            let binary = crate::powerfs_path()?;
            Some(
                tern_powerfs::mount::PowerMount::mount(&binary, &dir.path().join("backing"), &dir.path().join("data"))
                    .with_context(|| format!("mounting powerfs for node {}", config.id))?,
            )
        } else {
            None
        };
        let mut node = Node {
            config,
            power,
            dir,
            config_path,
            child: None,
            state: State::Down,
            stdout: Arc::default(),
            logs: Arc::default(),
            smtp: None,
            http: None,
            ternd: crate::ternd_path()?,
            ternctl: crate::ternctl_path()?,
            print_logs_on_panic: true,
            starts: 0,
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
        self.state
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts the process (again, same config and data dir) without waiting.
    pub fn start(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.child.is_none(), "node {} is already running", self.id());
        self.stdout.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.smtp = None;
        self.http = None;
        self.starts += 1;
        let prefix = format!("[n{}#{}] ", self.id(), self.starts);
        let mut child = Command::new(&self.ternd)
            .arg("--config")
            .arg(&self.config_path)
            .env("RUST_LOG", "info,openraft=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {}", self.ternd.display()))?;
        let out = child.stdout.take().context("stdout")?;
        let err = child.stderr.take().context("stderr")?;
        let (lines, logs) = (Arc::clone(&self.stdout), Arc::clone(&self.logs));
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                lines.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                logs.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(format!("{prefix}{line}"));
            }
        });
        self.child = Some(child);
        self.state = State::Running;
        Ok(())
    }

    /// Waits (bounded) for the `ready` line and reads the `listening` lines.
    pub fn wait_ready(&mut self, deadline: Duration) -> anyhow::Result<()> {
        let end = Instant::now() + deadline;
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    self.child = None;
                    self.state = State::Down;
                    anyhow::bail!("ternd {} exited before ready: {status}\n{}", self.id(), self.logs());
                }
            } else {
                anyhow::bail!("ternd {} is not running", self.id());
            }
            let lines = self.stdout.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if lines.iter().any(|l| l == "ready") {
                for line in &lines {
                    if let Some((kind, addr)) = line.strip_prefix("listening ").and_then(|r| r.split_once('=')) {
                        let addr: SocketAddr = addr.parse().with_context(|| format!("listening line {line}"))?;
                        match kind {
                            "smtp" => self.smtp = Some(addr),
                            "http" => self.http = Some(addr),
                            "grpc" => {
                                anyhow::ensure!(addr == self.grpc(), "grpc on {addr}, configured {}", self.grpc())
                            }
                            _ => {}
                        }
                    }
                }
                anyhow::ensure!(self.smtp.is_some(), "node {}: no `listening smtp=` line", self.id());
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < end,
                "node {} not ready after {deadline:?}\n{}",
                self.id(),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, as a crash or power loss would (waits for the exit).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.state = State::Down;
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
        if self.child.is_none() {
            return Ok(true);
        }
        self.signal("TERM")?;
        let end = std::time::Instant::now() + deadline;
        let mut clean = false;
        // Bounded by the deadline.
        while std::time::Instant::now() < end {
            if let Some(c) = self.child.as_mut() {
                if c.try_wait()?.is_some() {
                    clean = true;
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
        Ok(clean)
    }

    /// Kills (SIGKILL) and starts again with the same config and data dir,
    /// waiting for `ready`.
    pub fn restart(&mut self, deadline: Duration) -> anyhow::Result<()> {
        self.kill();
        self.start()?;
        self.wait_ready(deadline)
    }

    fn signal(&self, sig: &str) -> anyhow::Result<()> {
        let pid = self.child.as_ref().context("not running")?.id();
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()?;
        anyhow::ensure!(st.success(), "kill -{sig} {pid} failed");
        Ok(())
    }

    /// SIGSTOP: the process freezes (sockets stay open, nothing answers).
    pub fn pause(&mut self) -> anyhow::Result<()> {
        self.signal("STOP")?;
        self.state = State::Paused;
        Ok(())
    }

    /// SIGCONT after [`Node::pause`].
    pub fn resume(&mut self) -> anyhow::Result<()> {
        self.signal("CONT")?;
        self.state = State::Running;
        Ok(())
    }

    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Every stderr line since the first start, prefixed `[nID#START]`.
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap_or_else(|p| p.into_inner()).join("\n")
    }

    /// Runs ternctl against this node's own gRPC address, killed after `deadline`
    /// (a paused node never answers).
    pub fn ternctl(&self, args: &[&str], deadline: Duration) -> anyhow::Result<Output> {
        run_bounded(
            Command::new(&self.ternctl)
                .arg("--endpoint")
                .arg(self.grpc().to_string())
                .args(args)
                .envs(self.config.ternctl_env.iter().map(|(k, v)| (k, v))),
            deadline,
        )
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

impl Drop for Node {
    fn drop(&mut self) {
        if self.state == State::Paused {
            let _ = self.signal("CONT");
        }
        self.kill();
        if self.print_logs_on_panic && std::thread::panicking() {
            eprintln!(
                "---- ternd {} log ----\n{}\n---- end ternd {} log ----",
                self.id(),
                self.logs(),
                self.id()
            );
        }
    }
}

/// Runs a command with its output captured; killed after `deadline`.
pub fn run_bounded(cmd: &mut Command, deadline: Duration) -> anyhow::Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    let mut out = child.stdout.take().context("stdout")?;
    let mut err = child.stderr.take().context("stderr")?;
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut out, &mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut err, &mut v);
        v
    });
    let end = Instant::now() + deadline;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("{cmd:?} did not finish within {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ok(Output {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    })
}
