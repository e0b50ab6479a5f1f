//! Test harness: runs a real `ternd` process in a temp dir on loopback
//! ports, waits for its `ready` line, keeps its logs (printed when a test
//! fails), and kills it on drop. Also a minimal SMTP client for load.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const TERND: &str = env!("CARGO_BIN_EXE_ternd");
/// `ternctl` is the `ternctl` package's binary: it sits next to `ternd` in
/// the target directory (env `TERNCTL` overrides). Building it is not this
/// package's job: `cargo build --workspace --all-targets` (or `cargo build
/// -p ternctl`) first; a missing binary panics saying so.
pub const TERNCTL: &Ternctl = &Ternctl;

pub struct Ternctl;

impl AsRef<std::ffi::OsStr> for Ternctl {
    fn as_ref(&self) -> &std::ffi::OsStr {
        static PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
        PATH.get_or_init(|| {
            let path = std::env::var_os("TERNCTL").map(PathBuf::from).unwrap_or_else(|| {
                std::path::Path::new(TERND)
                    .with_file_name("ternctl")
                    .with_extension(std::env::consts::EXE_EXTENSION)
            });
            assert!(
                path.is_file(),
                "ternctl not found at {}: build it first (`cargo build -p ternctl`, or \
                 `cargo build --workspace --all-targets`), or set TERNCTL",
                path.display()
            );
            path
        })
        .as_os_str()
    }
}

/// Multi-node tests run one at a time: several clusters at once on two
/// cores would starve each other's Raft timers.
pub fn cluster_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// A free loopback TCP port for a listener that binds it later (below the
/// ephemeral range; see `cluster_tests::free_port`).
pub fn free_port() -> u16 {
    cluster_tests::free_port().expect("a free port in 20000..32000")
}

/// A loopback port where connections are refused for as long as this lives:
/// bound (without SO_REUSEADDR) but not listening, so no other process on
/// the machine can start listening on it mid-test. A port that is merely
/// free may be taken by another test run's listener that accepts and never
/// greets, and delivery then waits out the 5-minute greeting timeout.
pub struct ClosedPort {
    pub port: u16,
    _socket: tokio::net::TcpSocket,
}

pub fn closed_port() -> ClosedPort {
    for _ in 0..100 {
        let port = free_port();
        let socket = tokio::net::TcpSocket::new_v4().expect("TCP socket");
        if socket.bind(SocketAddr::from(([127, 0, 0, 1], port))).is_ok() {
            return ClosedPort { port, _socket: socket };
        }
    }
    panic!("no loopback port could be reserved")
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
pub fn test_pki() -> &'static cluster_tests::pki::TestPki {
    static PKI: std::sync::OnceLock<cluster_tests::pki::TestPki> = std::sync::OnceLock::new();
    PKI.get_or_init(|| cluster_tests::pki::TestPki::new(std::path::Path::new(TERNCTL)).expect("ternctl cert"))
}

/// `[cluster]` TLS lines for node `id` with its certificate from [`test_pki`]
/// (for nodes started another way; set `ternctl_env` from `test_pki()` too).
pub fn cluster_tls(id: u64) -> String {
    test_pki().cluster_toml(id).expect("node certificate")
}

/// Polls `cond` until it holds or `deadline` passes.
pub fn wait_for(deadline: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    while !cond() {
        assert!(Instant::now() < end, "timed out after {deadline:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub struct Node {
    /// Keeps the node's directory alive for the test's duration.
    _dir: tempfile::TempDir,
    pub config: PathBuf,
    child: Option<Child>,
    stdout: Arc<Mutex<Vec<String>>>,
    logs: Arc<Mutex<Vec<String>>>,
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
        Self::start_full(id, bootstrap, "", listen, extra)
    }

    /// A bootstrapping single node with `node_keys` added to its `[node]` table.
    pub fn start_with_node_keys(node_keys: &str, extra: &str) -> Node {
        Self::start_full(1, true, node_keys, "", extra)
    }

    /// As [`Node::start_node`], with `node_keys` added to its `[node]` table.
    pub fn start_node_with_keys(id: u64, bootstrap: bool, node_keys: &str, extra: &str) -> Node {
        Self::start_full(id, bootstrap, node_keys, "", extra)
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

    fn start_full(id: u64, bootstrap: bool, node_keys: &str, listen: &str, extra: &str) -> Node {
        Self::start_in(id, bootstrap, None, node_keys, listen, extra)
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
        let grpc = free_port();
        let config = dir.path().join("tern.toml");
        let data = data_dir.map_or_else(|| dir.path().join("data"), std::path::Path::to_owned);
        // `listen` may name its own gRPC address (e.g. a wildcard one).
        let grpc = if listen.contains("grpc =") {
            String::new()
        } else {
            format!("grpc = \"127.0.0.1:{grpc}\"\n")
        };
        let toml = format!(
            "[node]\nid = {id}\nhostname = \"mx{id}.tern.test\"\ndata_dir = \"{}\"\n{node_keys}\n\n[listen]\nsmtp = [\"127.0.0.1:0\"]\n{grpc}http = \"127.0.0.1:0\"\n{listen}\n\n[cluster]\nbootstrap = {bootstrap}\n\n{extra}\n",
            data.display()
        );
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
        let mut node = Node {
            _dir: dir,
            config,
            child: None,
            stdout: Arc::default(),
            logs: Arc::default(),
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
        self._dir.path()
    }

    /// Starts the process (again) and waits for `ready`.
    pub fn spawn(&mut self) {
        self.stdout.lock().expect("lock").clear();
        let mut cmd = Command::new(TERND);
        if self.config.as_os_str().is_empty() {
            cmd.current_dir(self._dir.path());
        } else {
            cmd.arg("--config").arg(&self.config);
        }
        let mut child = cmd
            .env("RUST_LOG", "info,openraft=warn")
            .envs(self.ternd_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ternd");
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        let (lines, logs) = (Arc::clone(&self.stdout), Arc::clone(&self.logs));
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                lines.lock().expect("lock").push(line);
            }
        });
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                logs.lock().expect("lock").push(line);
            }
        });
        self.child = Some(child);
        let stdout = Arc::clone(&self.stdout);
        let mut exited = None;
        wait_for(Duration::from_secs(60), "ternd ready", || {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    exited = Some(status);
                    return true;
                }
            }
            stdout.lock().expect("lock").iter().any(|l| l == "ready")
        });
        if let Some(status) = exited {
            panic!("ternd exited before ready: {status}\n{}", self.logs());
        }
        for line in self.stdout.lock().expect("lock").iter() {
            if let Some(rest) = line.strip_prefix("listening ") {
                let (kind, addr) = rest.split_once('=').expect("listening line");
                let addr: SocketAddr = addr.parse().expect("listening addr");
                match kind {
                    "smtp" => self.smtp = addr,
                    "submission" => self.submission = addr,
                    "submissions" => self.submissions = addr,
                    "grpc" => self.grpc = addr,
                    "http" => self.http = addr,
                    _ => {}
                }
            }
        }
    }

    /// Whether the process has exited (as a supervisor would notice).
    pub fn exited(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => !matches!(c.try_wait(), Ok(None)),
            None => true,
        }
    }

    /// The running ternd's process id (e.g. to read /proc/PID/status).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().expect("lock").clone()
    }

    pub fn logs(&self) -> String {
        self.logs.lock().expect("lock").join("\n")
    }

    /// SIGKILL, as a crash or power loss would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits (bounded) for the process to exit by itself; `None` if it is
    /// still running at `deadline` (it is left running).
    pub fn wait_exit(&mut self, deadline: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + deadline;
        while Instant::now() < end {
            let c = self.child.as_mut()?;
            if let Some(status) = c.try_wait().expect("wait") {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Sends a signal (STOP, CONT, ...) without waiting.
    pub fn send_signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let ok = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .expect("kill");
        assert!(ok.success(), "kill -{signal} {pid}");
    }

    /// Sends a signal and waits (bounded) for the process to exit.
    pub fn signal_and_wait(&mut self, signal: &str, deadline: Duration) -> ExitStatus {
        let mut c = self.child.take().expect("running");
        let ok = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(c.id().to_string())
            .status()
            .expect("kill");
        assert!(ok.success());
        let end = Instant::now() + deadline;
        loop {
            if let Some(status) = c.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > end {
                let _ = c.kill();
                panic!(
                    "ternd did not exit within {deadline:?} after SIG{signal}\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs ternctl against this node.
    pub fn ternctl(&self, args: &[&str]) -> Output {
        Command::new(TERNCTL)
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

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- ternd log ----\n{}\n---- end ternd log ----", self.logs());
        }
    }
}

/// A small blocking SMTP client, enough to drive load and check replies.
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

pub struct Client {
    stream: BufReader<TcpStream>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> std::io::Result<Client> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut c = Client {
            stream: BufReader::new(stream),
        };
        let greeting = c.read_reply()?;
        if !greeting.starts_with("220") {
            return Err(std::io::Error::other(format!("greeting: {greeting}")));
        }
        Ok(c)
    }

    /// Reads one (possibly multi-line) reply, returned with its lines joined by '\n'.
    pub fn read_reply(&mut self) -> std::io::Result<String> {
        cluster_tests::load::read_reply(&mut self.stream)
    }

    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.get_mut().write_all(bytes)
    }

    pub fn command(&mut self, line: &str) -> std::io::Result<String> {
        self.send_raw(format!("{line}\r\n").as_bytes())?;
        self.read_reply()
    }

    /// One whole transaction; returns the queue id from the final 250.
    pub fn send_mail(&mut self, from: &str, to: &[&str], body: &str) -> std::io::Result<String> {
        let expect = |reply: String, code: &str| {
            if reply.starts_with(code) {
                Ok(reply)
            } else {
                Err(std::io::Error::other(reply))
            }
        };
        expect(self.command(&format!("MAIL FROM:<{from}>"))?, "250")?;
        for rcpt in to {
            expect(self.command(&format!("RCPT TO:<{rcpt}>"))?, "250")?;
        }
        expect(self.command("DATA")?, "354")?;
        self.send_raw(body.as_bytes())?;
        let reply = expect(self.command(".")?, "250")?;
        reply
            .rsplit(' ')
            .next()
            .map(str::to_owned)
            .ok_or_else(|| std::io::Error::other("no queue id"))
    }

    /// Reads whatever the server sends until it closes the connection.
    pub fn read_to_end(&mut self) -> String {
        let mut s = String::new();
        let _ = self.stream.read_to_string(&mut s);
        s
    }
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

/// A message body with a unique Message-ID.
pub fn body(id: &str, size: usize) -> String {
    let mut b = format!(
        "From: <sender@tern.test>\r\nTo: <rcpt@example.test>\r\nSubject: test {id}\r\nMessage-ID: <{id}@tern.test>\r\n\r\n"
    );
    while b.len() < size {
        b.push_str("The quick brown fox jumps over the lazy dog 0123456789.\r\n");
    }
    b
}

/// Postfix's smtp-sink on a free loopback port, dumping each message to a
/// file; stopped on drop.
pub struct SmtpSink {
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    child: Child,
}

impl SmtpSink {
    /// `extra` are smtp-sink options such as `["-f", "RCPT"]` (5xx at RCPT).
    pub fn start(extra: &[&str]) -> SmtpSink {
        Self::start_on(free_port(), extra)
    }

    pub fn start_on(port: u16, extra: &[&str]) -> SmtpSink {
        let dir = tempfile::tempdir().expect("tempdir");
        // smtp-sink drops to `nobody`, which must be able to write the dumps.
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777)).expect("chmod");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let child = Command::new("smtp-sink")
            .args(["-u", "nobody", "-d"])
            .arg(format!("{}/%M.", dir.path().display()))
            .args(extra)
            .arg(addr.to_string())
            .arg("100")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("smtp-sink is installed by cluster-tests/run-all.sh");
        wait_for(Duration::from_secs(10), "smtp-sink listening", || {
            TcpStream::connect(addr).is_ok()
        });
        SmtpSink { addr, dir, child }
    }

    /// Every message dumped so far (envelope lines, then the message).
    ///
    /// smtp-sink creates a dump file when the transaction starts and writes
    /// it as data arrives, so a file still being written (empty, or changed
    /// in the last 200 ms) is waited for, up to 5 s, before anything is read.
    pub fn messages(&self) -> Vec<String> {
        let settled = |e: &std::fs::DirEntry| {
            e.metadata().is_ok_and(|m| {
                m.len() > 0
                    && m.modified()
                        .is_ok_and(|t| t.elapsed().unwrap_or_default() >= Duration::from_millis(200))
            })
        };
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            let entries: Vec<_> = std::fs::read_dir(self.dir.path())
                .map(|d| d.flatten().collect())
                .unwrap_or_default();
            if entries.iter().all(settled) || Instant::now() >= end {
                return entries
                    .iter()
                    .filter_map(|e| std::fs::read(e.path()).ok())
                    .map(|text| String::from_utf8_lossy(&text).into_owned())
                    .collect();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ternd hash-password` with the password on stdin.
pub fn hash_password(password: &str) -> String {
    use std::io::Write as _;
    let mut child = Command::new(TERND)
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
