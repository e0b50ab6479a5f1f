//! The mail sink every node delivers to: Postfix's `smtp-sink`, dumping each
//! transaction to its own file (`-d DIR/%M.`, the dump dir mode 0777 since
//! smtp-sink drops to `nobody`). A delivery is a dump file holding a
//! `Message-ID:`; its `X-Helo-Args:` line names the delivering node
//! (`mxN.tern.test`). The sink can be stopped and started again on the same
//! port and dump dir (mail is then deferred and retried).

use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use anyhow::Context;

/// One dump file: one delivery of one message.
#[derive(Clone, Debug)]
pub struct Delivery {
    /// Without the angle brackets.
    pub message_id: String,
    /// The delivering client's EHLO name (`mxN.tern.test`).
    pub helo: String,
    /// The queue id of the copy delivered: the `id` of the topmost
    /// `Received: ... (Tern) with ESMTP id ID` header (smtp-sink's own
    /// Received header sits above it) (the id the accepting
    /// node answered `250 ... queued as ID` with); empty when absent.
    pub queue_id: String,
    /// The dump file's modification time.
    pub at: SystemTime,
}

impl Delivery {
    /// The node id in `mxN.tern.test`, if it is one.
    pub fn node(&self) -> Option<u64> {
        self.helo.strip_prefix("mx")?.strip_suffix(".tern.test")?.parse().ok()
    }
}

pub struct Sink {
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
    args: Vec<String>,
    child: Option<Child>,
    /// Parsed dump files (a file is parsed again until it has a Message-ID).
    seen: Mutex<HashMap<PathBuf, Delivery>>,
}

fn smtp_sink_binary() -> PathBuf {
    let sbin = PathBuf::from("/usr/sbin/smtp-sink");
    if sbin.is_file() {
        sbin
    } else {
        PathBuf::from("smtp-sink")
    }
}

impl Sink {
    /// Starts smtp-sink on a free loopback port; `args` are extra smtp-sink
    /// options (e.g. `["-w", "1"]`: wait a second before answering DATA).
    pub fn start(args: &[&str]) -> anyhow::Result<Sink> {
        let port = tern_testkit::free_port();
        Sink::start_at(format!("127.0.0.1:{port}").parse()?, args)
    }

    /// Starts smtp-sink on a given address (tern-chaos `--sink`).
    pub fn start_at(addr: SocketAddr, args: &[&str]) -> anyhow::Result<Sink> {
        let dir = tempfile::Builder::new().prefix("tern-sink-").tempdir()?;
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
        let mut sink = Sink {
            addr,
            dir,
            args: args.iter().map(|a| a.to_string()).collect(),
            child: None,
            seen: Mutex::new(HashMap::new()),
        };
        sink.resume()?;
        Ok(sink)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Stops the sink (its port then refuses connections: deliveries defer).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts smtp-sink (again) on the same port and dump dir.
    pub fn resume(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            return Ok(());
        }
        let child = Command::new(smtp_sink_binary())
            .args(["-u", "nobody", "-d"])
            .arg(format!("{}/%M.", self.dir.path().display()))
            .args(&self.args)
            .arg(self.addr.to_string())
            .arg("100")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting smtp-sink (Postfix; put /usr/sbin in PATH or install postfix)")?;
        self.child = Some(child);
        let addr = self.addr;
        tern_testkit::wait_until(Duration::from_secs(10), "smtp-sink listening", || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        })?;
        Ok(())
    }

    /// Every delivery so far.
    pub fn deliveries(&self) -> Vec<Delivery> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if let Ok(entries) = std::fs::read_dir(self.dir.path()) {
            for e in entries.flatten() {
                let path = e.path();
                if seen.contains_key(&path) {
                    continue;
                }
                if let Some(d) = parse_dump(&path) {
                    seen.insert(path, d);
                }
            }
        }
        seen.values().cloned().collect()
    }

    /// Message-ID → number of deliveries.
    pub fn counts(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for d in self.deliveries() {
            *out.entry(d.message_id).or_default() += 1;
        }
        out
    }

    /// Message-ID → the distinct queued copies (queue ids) delivered.
    pub fn copies(&self) -> BTreeMap<String, std::collections::BTreeSet<String>> {
        let mut out: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
        for d in self.deliveries() {
            out.entry(d.message_id).or_default().insert(d.queue_id);
        }
        out
    }

    /// The deliveries of one Message-ID.
    pub fn deliveries_of(&self, message_id: &str) -> Vec<Delivery> {
        self.deliveries()
            .into_iter()
            .filter(|d| d.message_id == message_id)
            .collect()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Reads a dump file: `None` while it has no Message-ID yet.
fn parse_dump(path: &Path) -> Option<Delivery> {
    let bytes = std::fs::read(path).ok()?;
    let text = String::from_utf8_lossy(&bytes);
    let mut message_id = None;
    let mut helo = String::new();
    let mut queue_id = None;
    // The topmost Received header Tern wrote (smtp-sink adds its own above), unfolded (`\tby HOST (Tern) with ESMTP id ID`).
    let mut received: Option<String> = None;
    for line in text.lines() {
        let lower = line.to_ascii_lowercase();
        if let Some(r) = received.as_mut() {
            if line.starts_with([' ', '\t']) {
                r.push(' ');
                r.push_str(line.trim());
                continue;
            }
            let id = tern_queue_id(r);
            if !id.is_empty() {
                queue_id = Some(id);
            }
            received = None;
        }
        if queue_id.is_none() && lower.starts_with("received:") {
            received = Some(line.to_owned());
            continue;
        }
        if line.is_empty() {
            break;
        }
        if helo.is_empty() && lower.starts_with("x-helo-args:") {
            helo = line["x-helo-args:".len()..].trim().to_owned();
        } else if message_id.is_none() && lower.starts_with("message-id:") {
            let v = line["message-id:".len()..].trim();
            message_id = Some(v.trim_start_matches('<').trim_end_matches('>').to_owned());
        }
    }
    let at = std::fs::metadata(path).and_then(|m| m.modified()).ok()?;
    Some(Delivery {
        message_id: message_id?,
        helo,
        queue_id: queue_id.unwrap_or_default(),
        at,
    })
}

/// `ID` in `... (Tern) with PROTO id ID ...`; empty when not Tern's.
fn tern_queue_id(received: &str) -> String {
    let Some((_, rest)) = received.split_once("(Tern) with ") else {
        return String::new();
    };
    let mut words = rest.split_whitespace().skip(1);
    match (words.next(), words.next()) {
        (Some("id"), Some(id)) => id.trim_end_matches(';').to_owned(),
        _ => String::new(),
    }
}
