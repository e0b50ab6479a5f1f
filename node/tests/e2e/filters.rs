//! Content filters end to end (`[[filter]]`, docs/filters.md): ternd is the
//! MX for example.test (Maildir delivery) with `relay_networks = []`, so
//! the loopback client is untrusted and filtered. The filters are real:
//! clamd with a one-line local signature database (the EICAR md5), and
//! rspamd (its normal worker for `/checkv2`, its proxy worker in milter mode
//! for the milter client), each started here with its own config on free
//! loopback ports.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::harness::*;

/// The EICAR test file (68 octets), which every antivirus detects.
const EICAR: &str = r"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";

/// rspamd's built-in test patterns (with `enable_test_patterns`): the
/// first letter picks the action.
fn gtube(letter: char) -> String {
    format!("{letter}JS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X")
}

/// A filter process, stopped (SIGTERM, then SIGKILL) when dropped.
struct Daemon {
    child: Child,
    /// Keeps the config, database and log until the process is gone.
    _dir: tempfile::TempDir,
    log: PathBuf,
}

impl Daemon {
    fn spawn(mut command: Command, dir: tempfile::TempDir) -> Daemon {
        let log = dir.path().join("daemon.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = command
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        Daemon { child, _dir: dir, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `ready` holds; panics with the log if the process exits
    /// or the deadline passes.
    fn wait_ready(&mut self, deadline: Duration, what: &str, mut ready: impl FnMut() -> bool) {
        let mut exited = false;
        let result = tern_testkit::wait_until(deadline, what, || {
            exited = matches!(self.child.try_wait(), Ok(Some(_)));
            exited || ready()
        });
        assert!(result.is_ok() && !exited, "{what} did not start: {}", self.log());
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let stopped = tern_testkit::wait_until(Duration::from_secs(10), "filter stopped", || {
            matches!(self.child.try_wait(), Ok(Some(_)))
        });
        if stopped.is_err() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// clamd on a free loopback port with only the EICAR md5 as signature.
fn start_clamd() -> (Daemon, SocketAddr) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    std::fs::create_dir(&db).unwrap();
    std::fs::write(
        db.join("local.hdb"),
        "44d88612fea8a8f36de82e1278abb02f:68:Eicar-Test-Signature.local\n",
    )
    .unwrap();
    let port = free_port();
    let config = dir.path().join("clamd.conf");
    std::fs::write(
        &config,
        format!(
            "Foreground yes\nDatabaseDirectory {}\nTCPSocket {port}\nTCPAddr 127.0.0.1\n\
             PidFile {}/clamd.pid\nLocalSocket {}/clamd.sock\n",
            db.display(),
            dir.path().display(),
            dir.path().display()
        ),
    )
    .unwrap();
    let mut command = Command::new("clamd");
    command
        .arg("--foreground")
        .arg(format!("--config-file={}", config.display()));
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut daemon = Daemon::spawn(command, dir);
    daemon.wait_ready(Duration::from_secs(60), "clamd", || ping(addr, b"zPING\0", b"PONG"));
    (daemon, addr)
}

/// rspamd with its normal worker (HTTP) and its proxy worker in milter
/// mode on free ports. The compiled regexp cache is kept under the target
/// directory: the first start compiles it (about 30 s), later ones reuse it.
fn start_rspamd() -> (Daemon, SocketAddr, SocketAddr) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("rspamd-hs-cache");
    std::fs::create_dir_all(&cache).unwrap();
    for sub in ["local", "db", "run"] {
        std::fs::create_dir(d.join(sub)).unwrap();
    }
    let http = free_port();
    let milter = free_port();
    // No DNS on these machines: a closed port fails lookups at once.
    let no_dns = closed_port();
    let config = d.join("rspamd.conf");
    std::fs::write(
        &config,
        format!(
            r#".include "$CONFDIR/common.conf"
options {{
    pidfile = "$RUNDIR/rspamd.pid";
    .include "$CONFDIR/options.inc"
    hs_cache_dir = "{cache}/";
    dns {{ nameserver = ["127.0.0.1:{no_dns}"]; timeout = 0.2s; retransmits = 0; }}
    enable_test_patterns = true;
}}
logging {{ type = "file"; filename = "{d}/rspamd.log"; level = "info"; }}
worker "normal" {{
    bind_socket = "127.0.0.1:{http}";
    .include "$CONFDIR/worker-normal.inc"
    count = 1;
}}
worker "rspamd_proxy" {{
    bind_socket = "127.0.0.1:{milter}";
    milter = yes;
    timeout = 60s;
    upstream "local" {{ default = yes; self_scan = yes; }}
    count = 1;
}}
"#,
            cache = cache.display(),
            no_dns = no_dns.port,
            d = d.display(),
        ),
    )
    .unwrap();
    let mut command = Command::new("rspamd");
    command
        .args(["-f", "-i", "-u", "root", "-g", "root", "-c"])
        .arg(&config)
        .arg(format!("--var=LOCAL_CONFDIR={}", d.join("local").display()))
        .arg(format!("--var=DBDIR={}", d.join("db").display()))
        .arg(format!("--var=RUNDIR={}", d.join("run").display()))
        .arg(format!("--var=LOGDIR={}", d.display()));
    let mut daemon = Daemon::spawn(command, dir);
    let http = SocketAddr::from(([127, 0, 0, 1], http));
    let milter = SocketAddr::from(([127, 0, 0, 1], milter));
    daemon.wait_ready(Duration::from_secs(180), "rspamd", || {
        ping(http, b"GET /ping HTTP/1.0\r\n\r\n", b"pong")
    });
    // Keep the port closed for rspamd's lifetime.
    std::mem::forget(no_dns);
    (daemon, http, milter)
}

/// Sends `request` and says whether the answer contains `expect`.
fn ping(addr: SocketAddr, request: &[u8], expect: &[u8]) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(request).is_err() {
        return false;
    }
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    answer.windows(expect.len()).any(|w| w == expect)
}

/// An MX for example.test that filters loopback clients with `filters`.
fn mx(maildirs: &Path, filters: &str) -> Node {
    Node::start(&format!(
        "[policy]\nrelay_networks = []\nlocal_domains = [\"example.test\"]\n\n\
         [inbound]\nenabled = false\n\n\
         [local]\nmaildir = \"{}/{{domain}}/{{user}}\"\n\n{filters}\n",
        maildirs.display()
    ))
}

/// One transaction to bob@example.test; the reply to the end of data.
fn send(node: &Node, message: &str) -> String {
    let mut client = Client::connect(node.smtp).unwrap();
    let ehlo = client.command("EHLO client.sender.test").unwrap();
    assert!(ehlo.starts_with("250"), "{ehlo}");
    match client.send_mail("alice@sender.test", &["bob@example.test"], message) {
        Ok(id) => format!("250 {id}"),
        Err(e) => e.to_string(),
    }
}

fn plain(subject: &str, text: &str) -> String {
    format!(
        "From: Alice <alice@sender.test>\r\nTo: Bob <bob@example.test>\r\nSubject: {subject}\r\n\
         Date: Mon, 07 Dec 2026 12:00:00 +0000\r\nMessage-ID: <{subject}@sender.test>\r\n\
         X-Spam-Score: 0 (forged by the sender)\r\n\r\n{text}\r\n"
    )
}

fn with_eicar_attachment() -> String {
    use base64::Engine as _;
    let attachment = base64::engine::general_purpose::STANDARD.encode(EICAR);
    format!(
        "From: alice@sender.test\r\nTo: bob@example.test\r\nSubject: invoice\r\n\
         Message-ID: <virus@sender.test>\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/mixed; boundary=XX\r\n\r\n\
         --XX\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n\
         --XX\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\
         Content-Disposition: attachment; filename=eicar.com\r\n\r\n{attachment}\r\n--XX--\r\n"
    )
}

/// The messages delivered to `user@example.test` once there are `n`.
fn delivered(maildirs: &Path, user: &str, n: usize) -> Vec<String> {
    let new = maildirs.join("example.test").join(user).join("new");
    let count = || std::fs::read_dir(&new).map(|d| d.count()).unwrap_or(0);
    wait_for(Duration::from_secs(30), &format!("{n} messages for {user}"), || {
        count() >= n
    });
    let mut out: Vec<String> = std::fs::read_dir(&new)
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    out.sort();
    assert_eq!(out.len(), n, "{out:?}");
    out
}

fn delivered_now(maildirs: &Path, user: &str) -> usize {
    std::fs::read_dir(maildirs.join("example.test").join(user).join("new"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// `tern_filter_verdicts_total{filter, verdict}` as scraped.
fn verdicts(node: &Node, filter: &str, verdict: &str) -> u64 {
    let (_, text) = crate::metrics::get_metrics(node.http, None);
    let want = format!("tern_filter_verdicts_total{{filter=\"{filter}\",verdict=\"{verdict}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&want))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0)
}

#[test]
fn clamd_refuses_eicar_and_passes_clean_mail() {
    if !tern_testkit::peers::require("clamd") {
        return;
    }
    let (clamd, addr) = start_clamd();
    let maildirs = tempfile::tempdir().unwrap();
    let node = mx(
        maildirs.path(),
        &format!("[[filter]]\nkind = \"clamd\"\naddress = \"{addr}\"\ntimeout = \"10s\"\n"),
    );

    let reply = send(&node, &with_eicar_attachment());
    assert!(
        reply.starts_with("554 5.7.1 Message refused: virus found (Eicar-Test-Signature"),
        "{reply}\n{}",
        clamd.log()
    );
    // Refused before the queue: nothing queued, nothing delivered.
    assert!(node.queued_ids().is_empty());
    assert_eq!(delivered_now(maildirs.path(), "bob"), 0);

    let reply = send(&node, &plain("clean", "Hello Bob."));
    assert!(reply.starts_with("250"), "{reply}");
    let bob = delivered(maildirs.path(), "bob", 1);
    assert!(bob[0].contains("Hello Bob."), "{}", bob[0]);
    assert_eq!(verdicts(&node, "clamd", "reject"), 1);
    assert_eq!(verdicts(&node, "clamd", "accept"), 1);
    drop(clamd);
}

#[test]
fn filter_down_tempfails_or_accepts_as_configured() {
    let maildirs = tempfile::tempdir().unwrap();
    // A filter that takes connections and never answers: the timeout counts.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let tempfail = mx(
        maildirs.path(),
        &format!(
            "[[filter]]\nkind = \"rspamd\"\naddress = \"{silent_addr}\"\ntimeout = \"1s\"\non_error = \"tempfail\"\n"
        ),
    );
    let reply = send(&tempfail, &plain("one", "x"));
    assert!(reply.starts_with("451 4.7.1"), "{reply}");
    assert!(tempfail.queued_ids().is_empty());
    assert_eq!(verdicts(&tempfail, "rspamd", "error"), 1);
    drop(tempfail);

    // Nobody listens: on_error = "accept" lets the message through.
    let closed = closed_port();
    let accept = mx(
        maildirs.path(),
        &format!(
            "[[filter]]\nkind = \"milter\"\nname = \"gone\"\naddress = \"inet:{}@127.0.0.1\"\non_error = \"accept\"\n",
            closed.port
        ),
    );
    let reply = send(&accept, &plain("two", "still delivered"));
    assert!(reply.starts_with("250"), "{reply}");
    let bob = delivered(maildirs.path(), "bob", 1);
    assert!(bob[0].contains("still delivered"));
    assert_eq!(verdicts(&accept, "gone", "error"), 1);
    drop(silent);
}

#[test]
fn rspamd_http_and_milter_verdicts() {
    if !tern_testkit::peers::require("rspamd") {
        return;
    }
    let (rspamd, http, milter) = start_rspamd();
    let maildirs = tempfile::tempdir().unwrap();

    // rspamd's HTTP protocol.
    let node = mx(
        maildirs.path(),
        &format!("[[filter]]\nkind = \"rspamd\"\naddress = \"{http}\"\ntimeout = \"20s\"\n"),
    );
    let reply = send(&node, &plain("spam", &gtube('X')));
    assert!(
        reply.starts_with("550 5.7.1 Gtube pattern"),
        "{reply}\n{}",
        rspamd.log()
    );
    assert!(node.queued_ids().is_empty());
    let reply = send(&node, &plain("subject", &gtube('Z')));
    assert!(reply.starts_with("250"), "{reply}");
    let reply = send(&node, &plain("clean", "Hello Bob, see you at noon."));
    assert!(reply.starts_with("250"), "{reply}");
    let bob = delivered(maildirs.path(), "bob", 2);
    let rewritten = bob.iter().find(|m| m.contains("Message-ID: <subject@")).unwrap();
    assert!(
        rewritten.contains("\r\nSubject: *** SPAM *** subject\r\n"),
        "{rewritten}"
    );
    assert!(
        rewritten.contains("\r\nX-Spam-Action: rewrite subject\r\n"),
        "{rewritten}"
    );
    assert!(rewritten.contains("\r\nX-Spam: Yes\r\n"), "{rewritten}");
    let clean = bob.iter().find(|m| m.contains("Message-ID: <clean@")).unwrap();
    assert!(clean.contains("\r\nX-Spam-Action: "), "{clean}");
    // The sender's own X-Spam-Score is replaced by rspamd's.
    assert!(!clean.contains("forged by the sender"), "{clean}");
    assert_eq!(clean.matches("\r\nX-Spam-Score: ").count(), 1, "{clean}");
    assert_eq!(verdicts(&node, "rspamd", "reject"), 1);
    assert_eq!(verdicts(&node, "rspamd", "accept"), 2);
    drop(node);

    // The same rspamd as a milter (its proxy worker with milter = yes).
    let maildirs = tempfile::tempdir().unwrap();
    let node = mx(
        maildirs.path(),
        &format!(
            "[[filter]]\nkind = \"milter\"\naddress = \"inet:{}@127.0.0.1\"\ntimeout = \"20s\"\n",
            milter.port()
        ),
    );
    let reply = send(&node, &plain("spam", &gtube('X')));
    assert!(reply.starts_with("5"), "{reply}\n{}", rspamd.log());
    assert!(reply.contains("Gtube pattern"), "{reply}");
    assert!(node.queued_ids().is_empty());
    let reply = send(&node, &plain("marked", &gtube('Y')));
    assert!(reply.starts_with("250"), "{reply}");
    let reply = send(&node, &plain("clean", "Hello Bob, see you at noon."));
    assert!(reply.starts_with("250"), "{reply}");
    let bob = delivered(maildirs.path(), "bob", 2);
    let marked = bob.iter().find(|m| m.contains("Message-ID: <marked@")).unwrap();
    assert!(marked.contains("\r\nX-Spam: Yes\r\n"), "{marked}");
    assert_eq!(verdicts(&node, "milter", "reject"), 1);
    assert_eq!(verdicts(&node, "milter", "accept"), 2);
    drop(rspamd);
}
