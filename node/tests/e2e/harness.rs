//! The end-to-end tests' view of the test kit: a single [`Node`] with a
//! config written from TOML snippets and a panicking API, built on
//! `tern_testkit::ternd::Ternd` (the one process harness), plus the kit's
//! SMTP client, sink, ports and waits re-exported for the topic files.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use tern_testkit::config::SingleNode;
pub use tern_testkit::peers::SmtpSink;
pub use tern_testkit::smtp::{body, Client};
use tern_testkit::ternd::Ternd;
pub use tern_testkit::{closed_port, free_port, wait_for};

/// The `ternd` binary of this build (see `tern_testkit::bin`).
pub fn ternd_bin() -> PathBuf {
    tern_testkit::bin("ternd")
}

/// The `ternctl` binary of this build.
pub fn ternctl_bin() -> PathBuf {
    tern_testkit::bin("ternctl")
}

/// Multi-node tests run one at a time: several clusters at once on two
/// cores would starve each other's Raft timers.
pub fn cluster_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// Config that keeps accepted mail in the queue: delivery goes to a
/// loopback port nobody listens on, and is retried only after an hour.
pub fn hold_mail() -> String {
    let closed = closed_port();
    let port = closed.port;
    // Reserved for the rest of the test process.
    std::mem::forget(closed);
    format!("[[route]]\ndomain = \"*\"\nto = \"127.0.0.1:{port}\"\n\n[delivery]\nretry_schedule = [\"1h\"]\n")
}

/// The test process's cluster certificates, made once with `ternctl cert`.
pub fn test_pki() -> &'static tern_testkit::pki::TestPki {
    static PKI: std::sync::OnceLock<tern_testkit::pki::TestPki> = std::sync::OnceLock::new();
    PKI.get_or_init(|| tern_testkit::pki::TestPki::with_workspace_ternctl().expect("ternctl cert"))
}

/// `[cluster]` TLS lines for node `id` with its certificate from [`test_pki`]
/// (for nodes started another way; set `ternctl_env` from `test_pki()` too).
pub fn cluster_tls(id: u64) -> String {
    test_pki().cluster_toml(id).expect("node certificate")
}

/// How long a start may take to print `ready`.
const READY_DEADLINE: Duration = Duration::from_secs(60);

pub struct Node {
    /// The process; declared first so it is killed before its directory goes.
    ternd: Ternd,
    /// Keeps the node's directory alive for the test's duration.
    dir: tempfile::TempDir,
    pub smtp: SocketAddr,
    /// `[listen] submission` (STARTTLS + AUTH), when configured.
    pub submission: SocketAddr,
    /// `[listen] submissions` (implicit TLS + AUTH), when configured.
    pub submissions: SocketAddr,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    /// Environment for ternctl (e.g. TERN_TLS_* for a mutual-TLS cluster).
    pub ternctl_env: Vec<(String, String)>,
    /// Environment for ternd at its next [`Node::spawn`] (e.g. TERN_FAILPOINTS).
    pub ternd_env: Vec<(String, String)>,
}

impl Node {
    /// Starts a bootstrapping single node; `extra` is appended to its TOML.
    pub fn start(extra: &str) -> Node {
        Self::start_node(1, true, extra)
    }

    /// Starts node `id`; without `bootstrap` it waits to be added to a cluster.
    pub fn start_node(id: u64, bootstrap: bool, extra: &str) -> Node {
        Self::start_with_listen(id, bootstrap, "", extra)
    }

    /// Node `id` of a multi-node cluster, secured as in production: its
    /// certificate from `ternctl cert` (one CA for the test process, see
    /// [`test_pki`]) in `[cluster]`, and ternctl presenting the harness's
    /// admin client certificate. `extra` as for [`Node::start_node`].
    pub fn cluster_node(id: u64, bootstrap: bool, extra: &str) -> Node {
        Self::cluster_node_with_keys(id, bootstrap, "", extra)
    }

    /// As [`Node::cluster_node`], with `node_keys` added to its `[node]` table.
    pub fn cluster_node_with_keys(id: u64, bootstrap: bool, node_keys: &str, extra: &str) -> Node {
        let mut node = Self::start_node_with_keys(id, bootstrap, node_keys, &format!("{}{extra}", cluster_tls(id)));
        node.ternctl_env = test_pki().ternctl_env();
        node
    }

    /// As [`Node::start_node`], with `listen` added to the `[listen]` table
    /// (e.g. `submission = ["127.0.0.1:0"]`).
    pub fn start_with_listen(id: u64, bootstrap: bool, listen: &str, extra: &str) -> Node {
        Self::start_in(id, bootstrap, None, "", listen, extra)
    }

    /// A bootstrapping single node with `node_keys` added to its `[node]` table.
    pub fn start_with_node_keys(node_keys: &str, extra: &str) -> Node {
        Self::start_in(1, true, None, node_keys, "", extra)
    }

    /// As [`Node::start_node`], with `node_keys` added to its `[node]` table.
    pub fn start_node_with_keys(id: u64, bootstrap: bool, node_keys: &str, extra: &str) -> Node {
        Self::start_in(id, bootstrap, None, node_keys, "", extra)
    }

    /// As [`Node::start_node_with_keys`], with `data_dir` as the node's data
    /// directory (e.g. on a small file system of the test's own).
    pub fn start_on_data_dir(
        id: u64,
        bootstrap: bool,
        data_dir: &std::path::Path,
        node_keys: &str,
        extra: &str,
    ) -> Node {
        Self::start_in(id, bootstrap, Some(data_dir), node_keys, "", extra)
    }

    fn start_in(
        id: u64,
        bootstrap: bool,
        data_dir: Option<&std::path::Path>,
        node_keys: &str,
        listen: &str,
        extra: &str,
    ) -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("tern.toml");
        let data = data_dir.map_or_else(|| dir.path().join("data"), std::path::Path::to_owned);
        let toml = SingleNode {
            id,
            bootstrap,
            grpc_port: free_port(),
            node_keys,
            listen,
            extra,
        }
        .to_toml(&data);
        std::fs::write(&config, toml).expect("write config");
        Self::spawned(dir, config)
    }

    /// Runs `ternd` with no arguments (the embedded default: fixed loopback
    /// ports, data in ./tern-data) in a fresh directory, as a newcomer would.
    pub fn start_embedded_default() -> Node {
        Self::spawned(tempfile::tempdir().expect("tempdir"), PathBuf::new())
    }

    /// A node run with the config file at `config` (written by the test), started.
    pub fn start_config(config: PathBuf) -> Node {
        Self::spawned(tempfile::tempdir().expect("tempdir"), config)
    }

    /// A node in `dir` run with `config` (empty: no arguments, in `dir`), started.
    fn spawned(dir: tempfile::TempDir, config: PathBuf) -> Node {
        let unset: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let ternd = if config.as_os_str().is_empty() {
            Ternd::embedded_default(dir.path())
        } else {
            Ternd::with_config(&config)
        }
        .unwrap_or_else(|e| panic!("{e}"));
        let mut node = Node {
            ternd,
            dir,
            smtp: unset,
            submission: unset,
            submissions: unset,
            grpc: unset,
            http: unset,
            ternctl_env: Vec::new(),
            ternd_env: Vec::new(),
        };
        node.spawn();
        node
    }

    /// The node's own directory (the working directory of an embedded-default node).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Starts the process (again) and waits for `ready`.
    pub fn spawn(&mut self) {
        self.ternd.env.clone_from(&self.ternd_env);
        self.ternd.start().unwrap_or_else(|e| panic!("spawn ternd: {e}"));
        self.ternd.wait_ready(READY_DEADLINE).unwrap_or_else(|e| panic!("{e}"));
        let t = &self.ternd;
        for (kind, field) in [
            ("smtp", &mut self.smtp),
            ("submission", &mut self.submission),
            ("submissions", &mut self.submissions),
            ("grpc", &mut self.grpc),
            ("http", &mut self.http),
        ] {
            if let Some(addr) = t.listening(kind) {
                *field = addr;
            }
        }
    }

    /// Whether the process has exited (as a supervisor would notice).
    pub fn exited(&mut self) -> bool {
        self.ternd.exited()
    }

    /// The running ternd's process id (e.g. to read /proc/PID/status).
    pub fn pid(&self) -> Option<u32> {
        self.ternd.pid()
    }

    pub fn stdout_lines(&self) -> Vec<String> {
        self.ternd.stdout_lines()
    }

    pub fn logs(&self) -> String {
        self.ternd.logs()
    }

    /// SIGKILL, as a crash or power loss would.
    pub fn kill(&mut self) {
        self.ternd.kill();
    }

    /// Waits (bounded) for the process to exit by itself; `None` if it is
    /// still running at `deadline` (it is left running).
    pub fn wait_exit(&mut self, deadline: Duration) -> Option<ExitStatus> {
        self.ternd.wait_exit(deadline)
    }

    /// Sends a signal (STOP, CONT, ...) without waiting.
    pub fn send_signal(&self, signal: &str) {
        self.ternd.signal(signal).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Sends a signal and waits (bounded) for the process to exit.
    pub fn signal_and_wait(&mut self, signal: &str, deadline: Duration) -> ExitStatus {
        self.ternd
            .signal_and_wait(signal, deadline)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs ternctl against this node.
    pub fn ternctl(&self, args: &[&str]) -> Output {
        Command::new(ternctl_bin())
            .arg("--endpoint")
            .arg(self.grpc.to_string())
            .args(args)
            .envs(self.ternctl_env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .expect("run ternctl")
    }

    /// Runs `ternctl ... -o json` and parses the output.
    pub fn ternctl_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let out = self.ternctl(&all);
        assert!(
            out.status.success(),
            "ternctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("ternctl json")
    }

    /// Ids of every queued message.
    pub fn queued_ids(&self) -> std::collections::BTreeSet<String> {
        let v = self.ternctl_json(&["queue", "list", "--limit", "1000000"]);
        v["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .map(|m| m["id"].as_str().expect("id").to_owned())
            .collect()
    }
}

/// Asserts that every message in `acked` (queue ids from 250 replies) is
/// queued on `node`; `what` names the moment in the failure. Returns the
/// queued ids.
pub fn assert_all_queued(
    node: &Node,
    acked: &std::collections::BTreeSet<String>,
    what: &str,
) -> std::collections::BTreeSet<String> {
    let queued = node.queued_ids();
    let lost: Vec<_> = acked.difference(&queued).collect();
    assert!(
        lost.is_empty(),
        "{what}: {} of {} acknowledged messages lost: {lost:?}",
        lost.len(),
        acked.len()
    );
    queued
}

/// A self-signed certificate and key for `cn`, made with the openssl CLI
/// in `dir`; returns (cert, key) paths.
pub fn self_signed_cert(dir: &std::path::Path, cn: &str) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"])
        .arg("-subj")
        .arg(format!("/CN={cn}"))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl is installed by cluster-tests/run-all.sh");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    (cert, key)
}

/// `ternd hash-password` with the password on stdin.
pub fn hash_password(password: &str) -> String {
    use std::io::Write as _;
    let mut child = Command::new(ternd_bin())
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ternd");
    writeln!(child.stdin.take().expect("stdin"), "{password}").expect("write password");
    let out = child.wait_with_output().expect("ternd hash-password");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let hash = String::from_utf8(out.stdout).expect("utf-8").trim().to_owned();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    hash
}
