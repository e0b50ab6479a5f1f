//! Real SMTP/LMTP servers for tests, on loopback and a free port: Postfix's
//! `smtp-sink`, Python's `aiosmtpd` (with STARTTLS, certificate made by the
//! `openssl` CLI) and a private Dovecot LMTP instance. Each is killed when
//! its handle is dropped.
//!
//! A missing program makes [`require`] return false so the test can skip,
//! unless `TERN_REQUIRE_PEERS=1` (set it in CI), which turns that into a
//! failure.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

pub use crate::ports::free_port;

/// How long a peer may take to start answering.
const START_DEADLINE: Duration = Duration::from_secs(15);

/// True if `program` can be run; false (with a note) to skip the test,
/// panics instead when `TERN_REQUIRE_PEERS=1`.
pub fn require(program: &str) -> bool {
    let found = if program.contains('/') {
        Path::new(program).exists()
    } else {
        std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(program).exists()))
            .unwrap_or(false)
    };
    if !found {
        if std::env::var("TERN_REQUIRE_PEERS").as_deref() == Ok("1") {
            panic!("{program} is required (TERN_REQUIRE_PEERS=1) but not installed");
        }
        eprintln!("skipping: {program} not installed");
    }
    found
}

fn is_root() -> bool {
    fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// Polls `cond` until it is true (true) or `deadline` passes (false).
fn wait_until(deadline: Duration, cond: impl FnMut() -> bool) -> bool {
    crate::wait_until(deadline, "a test peer", cond).is_ok()
}

/// A running peer process with its scratch directory.
pub struct Peer {
    child: Child,
    pub addr: SocketAddr,
    pub dir: TempDir,
    /// SIGTERM instead of SIGKILL (Dovecot's master must stop its children).
    graceful: bool,
}

impl Peer {
    /// Starts `make(port)` on free ports until one answers with a 220
    /// banner; retries when the port was taken meanwhile.
    fn spawn(dir: TempDir, graceful: bool, mut make: impl FnMut(u16, &Path) -> Command) -> Peer {
        Self::spawn_at(
            dir,
            graceful,
            || SocketAddr::from(([127, 0, 0, 1], free_port())),
            |addr, dir| make(addr.port(), dir),
        )
    }

    /// As [`Peer::spawn`], listening where `pick` says (a fixed address, or
    /// a new free port per try).
    fn spawn_at(
        mut dir: TempDir,
        graceful: bool,
        mut pick: impl FnMut() -> SocketAddr,
        mut make: impl FnMut(SocketAddr, &Path) -> Command,
    ) -> Peer {
        for _ in 0..5 {
            let addr = pick();
            let port = addr.port();
            let log = fs::File::create(dir.path().join(format!("peer-{port}.log"))).unwrap();
            let child = make(addr, dir.path())
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap();
            let mut peer = Peer {
                child,
                addr,
                dir,
                graceful,
            };
            let mut exited = false;
            let up = wait_until(START_DEADLINE, || {
                exited = matches!(peer.child.try_wait(), Ok(Some(_)));
                exited || banner(addr)
            });
            if up && !exited {
                return peer;
            }
            let log = fs::read_to_string(peer.dir.path().join(format!("peer-{port}.log"))).unwrap_or_default();
            eprintln!("peer on port {port} did not start (exited: {exited}): {log}");
            peer.stop();
            dir = std::mem::replace(&mut peer.dir, TempDir::new().unwrap());
        }
        panic!("could not start test peer");
    }

    fn stop(&mut self) {
        if self.graceful {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(self.child.id().to_string())
                .status();
            if wait_until(Duration::from_secs(10), || matches!(self.child.try_wait(), Ok(Some(_)))) {
                return;
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The peer's stdout/stderr so far (for assertion messages).
    pub fn log(&self) -> String {
        let mut all = String::new();
        for e in fs::read_dir(self.dir.path()).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".log") {
                all.push_str(&fs::read_to_string(e.path()).unwrap_or_default());
            }
        }
        all
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Connects and reads until a line starting with `220` (the peer is ready).
fn banner(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut buf = [0u8; 512];
    let mut got = Vec::new();
    while !got.contains(&b'\n') {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    let ok = got.starts_with(b"220");
    // Be polite so the peer does not log a lost connection.
    let _ = std::io::Write::write_all(&mut s, b"QUIT\r\n");
    ok
}

/// A directory every user can write to (peers drop privileges).
fn open_dir() -> TempDir {
    let dir = TempDir::new().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
    dir
}

/// Files directly in `dir` (non-recursive), sorted.
pub fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).filter(|p| p.is_file()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// Postfix `smtp-sink` with extra `args` (e.g. `-L`, `-N`, `-p`, `-r RCPT`,
/// `-f RCPT`: 5xx at RCPT), dumping each transaction to a file in
/// [`SmtpSink::dumps_dir`] (envelope lines, then the message).
pub struct SmtpSink {
    pub peer: Peer,
    /// Where it listens (`peer.addr`).
    pub addr: SocketAddr,
}

pub const SMTP_SINK: &str = "/usr/sbin/smtp-sink";

impl SmtpSink {
    /// On a free port.
    pub fn start(args: &[&str]) -> SmtpSink {
        Self::start_at(None, args)
    }

    /// On `port` (e.g. one a node's route already names).
    pub fn start_on(port: u16, args: &[&str]) -> SmtpSink {
        Self::start_at(Some(port), args)
    }

    fn start_at(port: Option<u16>, args: &[&str]) -> SmtpSink {
        let dir = open_dir();
        let dumps = dir.path().join("dumps");
        fs::create_dir(&dumps).unwrap();
        fs::set_permissions(&dumps, fs::Permissions::from_mode(0o777)).unwrap();
        let pick = || SocketAddr::from(([127, 0, 0, 1], port.unwrap_or_else(free_port)));
        let peer = Peer::spawn_at(dir, false, pick, |addr, dir| {
            let mut c = Command::new(SMTP_SINK);
            if is_root() {
                c.args(["-u", "nobody"]);
            }
            c.arg("-d").arg(dir.join("dumps/%M."));
            c.args(args).arg(addr.to_string()).arg("100");
            c
        });
        SmtpSink { addr: peer.addr, peer }
    }

    pub fn dumps_dir(&self) -> PathBuf {
        self.peer.dir.path().join("dumps")
    }

    /// Contents of the dump files once there are `n` of them.
    pub fn wait_dumps(&self, n: usize) -> Vec<String> {
        let dir = self.dumps_dir();
        let ok = wait_until(Duration::from_secs(10), || files_in(&dir).len() >= n);
        assert!(ok, "expected {n} dumps, have {:?}", files_in(&dir));
        files_in(&dir)
            .iter()
            .map(|p| String::from_utf8_lossy(&fs::read(p).unwrap()).into_owned())
            .collect()
    }

    /// Every message dumped so far.
    ///
    /// smtp-sink creates a dump file when the transaction starts and writes
    /// it as data arrives, so a file still being written (empty, or changed
    /// in the last 200 ms) is waited for, up to 5 s, before anything is read.
    pub fn messages(&self) -> Vec<String> {
        let settled = |e: &fs::DirEntry| {
            e.metadata().is_ok_and(|m| {
                m.len() > 0
                    && m.modified()
                        .is_ok_and(|t| t.elapsed().unwrap_or_default() >= Duration::from_millis(200))
            })
        };
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            let entries: Vec<_> = fs::read_dir(self.dumps_dir())
                .map(|d| d.flatten().collect())
                .unwrap_or_default();
            if entries.iter().all(settled) || Instant::now() >= end {
                return entries
                    .iter()
                    .filter_map(|e| fs::read(e.path()).ok())
                    .map(|text| String::from_utf8_lossy(&text).into_owned())
                    .collect();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// `aiosmtpd` delivering into a Maildir at `maildir()`; STARTTLS with a
/// throwaway self-signed certificate if `tls`, SMTPUTF8 if `smtputf8`.
pub struct Aiosmtpd {
    pub peer: Peer,
}

impl Aiosmtpd {
    pub fn available() -> bool {
        let ok = require("python3") && require("openssl");
        let module = ok
            && Command::new("python3")
                .args(["-c", "import aiosmtpd"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
        if ok && !module {
            if std::env::var("TERN_REQUIRE_PEERS").as_deref() == Ok("1") {
                panic!("python module aiosmtpd is required (TERN_REQUIRE_PEERS=1)");
            }
            eprintln!("skipping: python module aiosmtpd not installed");
        }
        module
    }

    pub fn start(tls: bool, smtputf8: bool) -> Aiosmtpd {
        let dir = open_dir();
        let cert = if tls {
            let st = Command::new("openssl")
                .args([
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:prime256v1",
                    "-nodes",
                ])
                .args(["-days", "2", "-subj", "/CN=mx.example.test"])
                .arg("-keyout")
                .arg(dir.path().join("key.pem"))
                .arg("-out")
                .arg(dir.path().join("cert.pem"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .unwrap();
            assert!(st.success(), "openssl failed");
            Some((dir.path().join("cert.pem"), dir.path().join("key.pem")))
        } else {
            None
        };
        Self::spawn(dir, cert, smtputf8)
    }

    /// STARTTLS with the given certificate chain and key (e.g. from a [`TestCa`]).
    pub fn start_with_cert(cert: &Path, key: &Path) -> Aiosmtpd {
        Self::start_with_cert_at(cert, key, None)
    }

    /// As [`Aiosmtpd::start_with_cert`], on `addr` if given (e.g. another
    /// loopback address with the port of a first peer, for a second MX).
    pub fn start_with_cert_at(cert: &Path, key: &Path, addr: Option<SocketAddr>) -> Aiosmtpd {
        let dir = open_dir();
        fs::copy(cert, dir.path().join("cert.pem")).unwrap();
        fs::copy(key, dir.path().join("key.pem")).unwrap();
        let cert = Some((dir.path().join("cert.pem"), dir.path().join("key.pem")));
        Self::spawn_at(dir, cert, false, addr)
    }

    fn spawn(dir: TempDir, cert: Option<(PathBuf, PathBuf)>, smtputf8: bool) -> Aiosmtpd {
        Self::spawn_at(dir, cert, smtputf8, None)
    }

    fn spawn_at(dir: TempDir, cert: Option<(PathBuf, PathBuf)>, smtputf8: bool, at: Option<SocketAddr>) -> Aiosmtpd {
        let pick = || at.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], free_port())));
        let peer = Peer::spawn_at(dir, false, pick, |addr, dir| {
            let mut c = Command::new("python3");
            c.args(["-m", "aiosmtpd", "-n", "-l"]).arg(addr.to_string());
            if let Some((cert, key)) = &cert {
                c.arg("--tlscert").arg(cert);
                c.arg("--tlskey").arg(key);
            }
            if smtputf8 {
                c.arg("--smtputf8");
            }
            c.args(["-c", "aiosmtpd.handlers.Mailbox"]).arg(dir.join("Maildir"));
            c
        });
        Aiosmtpd { peer }
    }

    /// Messages delivered so far.
    pub fn messages(&self) -> Vec<Vec<u8>> {
        let dir = self.peer.dir.path().join("Maildir/new");
        files_in(&dir).iter().filter_map(|p| fs::read(p).ok()).collect()
    }

    /// Delivered messages, once there are `n`.
    pub fn wait_messages(&self, n: usize) -> Vec<Vec<u8>> {
        let dir = self.peer.dir.path().join("Maildir/new");
        let ok = wait_until(Duration::from_secs(10), || files_in(&dir).len() >= n);
        assert!(ok, "expected {n} messages; log: {}", self.peer.log());
        files_in(&dir).iter().map(|p| fs::read(p).unwrap()).collect()
    }
}

/// A throwaway certificate authority made with the `openssl` CLI: a CA
/// certificate (`ca.pem`) and server certificates it signs.
pub struct TestCa {
    pub dir: TempDir,
    /// The CA certificate (PEM), to trust as a root.
    pub cert: PathBuf,
    key: PathBuf,
}

fn openssl(args: &[&str], dir: &Path) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const EC_KEY: [&str; 4] = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];

impl TestCa {
    pub fn new(cn: &str) -> TestCa {
        let dir = open_dir();
        let subj = format!("/CN={cn}");
        let mut args = vec!["req", "-x509", "-nodes", "-days", "2", "-subj", &subj];
        args.extend(EC_KEY);
        args.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        openssl(&args, dir.path());
        TestCa {
            cert: dir.path().join("ca.pem"),
            key: dir.path().join("ca.key"),
            dir,
        }
    }

    /// A server certificate for `dns_names` (the first is also the CN),
    /// valid for a day; files `LABEL.pem` and `LABEL.key` in the CA's dir.
    pub fn issue(&self, label: &str, dns_names: &[&str]) -> (PathBuf, PathBuf) {
        let dir = self.dir.path();
        let (cert, key, csr, ext) = (
            format!("{label}.pem"),
            format!("{label}.key"),
            format!("{label}.csr"),
            format!("{label}.ext"),
        );
        let sans: Vec<String> = dns_names.iter().map(|n| format!("DNS:{n}")).collect();
        fs::write(
            dir.join(&ext),
            format!(
                "subjectAltName={}\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
                sans.join(",")
            ),
        )
        .unwrap();
        let subj = format!("/CN={}", dns_names.first().copied().unwrap_or(label));
        let mut args = vec!["req", "-new", "-nodes", "-subj", &subj];
        args.extend(EC_KEY);
        args.extend(["-keyout", &key, "-out", &csr]);
        openssl(&args, dir);
        let (ca_cert, ca_key) = (self.cert.display().to_string(), self.key.display().to_string());
        openssl(
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca_cert,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-days",
                "1",
                "-extfile",
                &ext,
                "-out",
                &cert,
            ],
            dir,
        );
        (dir.join(cert), dir.join(key))
    }
}

/// `aiosmtpd` keeping each message exactly as received (CRLF, after
/// dot-unstuffing) in `DIR/msg-NNNN.eml`: for checks of the bytes on the
/// wire, such as DKIM signatures, which a Maildir handler would re-serialize.
/// Check [`Aiosmtpd::available`] first.
pub struct ExactSink {
    pub peer: Peer,
}

const EXACT_SINK_HANDLER: &str = r#"import os

class Handler:
    def __init__(self, directory):
        self.directory = directory
        self.count = 0

    @classmethod
    def from_cli(cls, parser, *args):
        return cls(args[0])

    async def handle_DATA(self, server, session, envelope):
        self.count += 1
        # Written beside the directory, then renamed in: readers see whole files only.
        tmp = os.path.join(os.path.dirname(self.directory), "msg-%04d.tmp" % self.count)
        with open(tmp, "wb") as f:
            f.write(envelope.original_content)
        os.rename(tmp, os.path.join(self.directory, "msg-%04d.eml" % self.count))
        return "250 2.0.0 kept"
"#;

impl ExactSink {
    pub fn start() -> ExactSink {
        let dir = open_dir();
        fs::write(dir.path().join("exactsink.py"), EXACT_SINK_HANDLER).unwrap();
        fs::create_dir(dir.path().join("messages")).unwrap();
        let peer = Peer::spawn(dir, false, |port, dir| {
            let mut c = Command::new("python3");
            c.env("PYTHONPATH", dir)
                .args(["-m", "aiosmtpd", "-n", "-l"])
                .arg(format!("127.0.0.1:{port}"))
                .args(["-c", "exactsink.Handler"])
                .arg(dir.join("messages"));
            c
        });
        ExactSink { peer }
    }

    /// The messages received, in order, once there are `n`.
    pub fn wait_messages(&self, n: usize) -> Vec<Vec<u8>> {
        let dir = self.peer.dir.path().join("messages");
        let ok = wait_until(Duration::from_secs(30), || files_in(&dir).len() >= n);
        assert!(ok, "expected {n} messages; log: {}", self.peer.log());
        files_in(&dir).iter().map(|p| fs::read(p).unwrap()).collect()
    }
}

/// `aiosmtpd` refusing some recipients as Postfix does for an unknown
/// user (`550 5.1.1 <a@b>: Recipient address rejected: User unknown in
/// virtual mailbox table`), accepting the others, and recording every
/// RCPT it was sent. Check [`Aiosmtpd::available`] first.
pub struct RefusingSink {
    pub peer: Peer,
}

const REFUSING_SINK_HANDLER: &str = r#"import os

class Handler:
    def __init__(self, directory, refused):
        self.directory = directory
        self.refused = {a.lower() for a in refused.split(",") if a}
        self.count = 0

    @classmethod
    def from_cli(cls, parser, *args):
        return cls(args[0], args[1])

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        with open(os.path.join(self.directory, "rcpts.log"), "a") as f:
            f.write(address + "\n")
        if address.lower() in self.refused:
            return "550 5.1.1 <%s>: Recipient address rejected: User unknown in virtual mailbox table" % address
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server, session, envelope):
        self.count += 1
        tmp = os.path.join(self.directory, "msg-%04d.tmp" % self.count)
        with open(tmp, "wb") as f:
            f.write(envelope.original_content)
        os.rename(tmp, os.path.join(self.directory, "msg-%04d.eml" % self.count))
        return "250 2.0.0 kept"
"#;

impl RefusingSink {
    pub fn start(refused: &[&str]) -> RefusingSink {
        let dir = open_dir();
        fs::write(dir.path().join("refusingsink.py"), REFUSING_SINK_HANDLER).unwrap();
        fs::create_dir(dir.path().join("messages")).unwrap();
        let refused = refused.join(",");
        let peer = Peer::spawn(dir, false, |port, dir| {
            let mut c = Command::new("python3");
            c.env("PYTHONPATH", dir)
                .args(["-m", "aiosmtpd", "-n", "-l"])
                .arg(format!("127.0.0.1:{port}"))
                .args(["-c", "refusingsink.Handler"])
                .arg(dir.join("messages"))
                .arg(&refused);
            c
        });
        RefusingSink { peer }
    }

    /// Every RCPT address it was sent, in order.
    pub fn rcpts(&self) -> Vec<String> {
        fs::read_to_string(self.peer.dir.path().join("messages/rcpts.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// The messages it accepted so far.
    pub fn messages(&self) -> Vec<Vec<u8>> {
        let dir = self.peer.dir.path().join("messages");
        files_in(&dir)
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "eml"))
            .filter_map(|p| fs::read(p).ok())
            .collect()
    }
}

/// A private Dovecot LMTP instance on 127.0.0.1 and on the Unix socket
/// `socket()`. `users` (full addresses) exist; others get `550 5.1.1`.
/// Needs root (it delivers as the `mail` user).
pub struct Dovecot {
    pub peer: Peer,
}

impl Dovecot {
    pub fn available() -> bool {
        if !require("dovecot") {
            return false;
        }
        if !is_root() {
            if std::env::var("TERN_REQUIRE_PEERS").as_deref() == Ok("1") {
                panic!("Dovecot tests need root (TERN_REQUIRE_PEERS=1)");
            }
            eprintln!("skipping: Dovecot tests need root");
            return false;
        }
        true
    }

    pub fn start(users: &[&str]) -> Dovecot {
        let dir = open_dir();
        let d = dir.path().to_path_buf();
        let mail = d.join("mail");
        fs::create_dir(&mail).unwrap();
        fs::set_permissions(&mail, fs::Permissions::from_mode(0o777)).unwrap();
        let list: String = users.iter().map(|u| format!("{u}::::::\n")).collect();
        fs::write(d.join("users"), list).unwrap();
        let peer = Peer::spawn(dir, true, |port, _| {
            let conf = format!(
                r#"protocols = lmtp
listen = 127.0.0.1
base_dir = {d}/run
state_dir = {d}/run/state
instance_name = tern-test-lmtp-{pid}-{port}
log_path = {d}/dovecot.log
ssl = no
default_login_user = dovenull
default_internal_user = dovecot
first_valid_uid = 8
mail_location = maildir:{d}/mail/%d/%n/Maildir
passdb {{
  driver = static
  args = nopassword=y
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {d}/users
  default_fields = uid=mail gid=mail home={d}/mail/%d/%n
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {port}
  }}
  unix_listener lmtp {{
    mode = 0666
  }}
}}
"#,
                d = d.display(),
                pid = std::process::id(),
            );
            let file = d.join("dovecot.conf");
            fs::write(&file, conf).unwrap();
            let mut c = Command::new("dovecot");
            c.arg("-F").arg("-c").arg(file);
            c
        });
        Dovecot { peer }
    }

    /// The LMTP Unix socket.
    pub fn socket(&self) -> PathBuf {
        self.peer.dir.path().join("run/lmtp")
    }

    /// Messages in the Maildir `new/` of `user@domain`, once there are `n`.
    pub fn wait_messages(&self, user: &str, n: usize) -> Vec<Vec<u8>> {
        let (local, domain) = user.split_once('@').unwrap();
        let dir = self.peer.dir.path().join(format!("mail/{domain}/{local}/Maildir/new"));
        let ok = wait_until(Duration::from_secs(10), || files_in(&dir).len() >= n);
        let log = fs::read_to_string(self.peer.dir.path().join("dovecot.log")).unwrap_or_default();
        assert!(ok, "expected {n} messages in {}; log: {log}", dir.display());
        files_in(&dir).iter().map(|p| fs::read(p).unwrap()).collect()
    }
}
