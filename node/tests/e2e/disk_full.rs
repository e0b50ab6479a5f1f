//! A full disk, end to end: `data_dir` on a small tmpfs that the test fills
//! with a file of its own. While full, new mail gets `452 4.3.1` and
//! `/readyz` is 503 naming the reason; once the test frees the space the
//! node takes mail again by itself, and every message acknowledged before
//! is still queued. A node restarted on a nearly full disk starts. In a
//! cluster, the node whose disk fills hands its shards' leadership over and
//! the cluster keeps taking mail.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::{body, cluster_lock, hold_mail, wait_for, Client, Node};

/// A tmpfs mounted on a temporary directory; unmounted on drop, even when
/// the test panics (declare it before the node, so the node dies first).
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size_mb: u64) -> Tmpfs {
        let dir = tempfile::tempdir().expect("tempdir");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mb}m"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(status.success(), "mount tmpfs (these tests run as root)");
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn free(&self) -> u64 {
        fs2::available_space(self.path()).expect("statvfs")
    }

    /// Writes a file that leaves about `leave` bytes free; returns its path.
    fn fill_leaving(&self, leave: u64) -> PathBuf {
        let path = self.path().join("filler");
        let mut f = std::fs::File::create(&path).expect("create filler");
        let chunk = vec![0x5au8; 1 << 20];
        // Bounded: the tmpfs is small.
        for _ in 0..4096 {
            let free = self.free();
            if free <= leave {
                break;
            }
            let n = ((free - leave) as usize).min(chunk.len());
            if f.write_all(&chunk[..n]).is_err() {
                break;
            }
        }
        f.sync_all().expect("sync filler");
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

/// `GET /readyz`: status code and body.
fn readyz(http: SocketAddr) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&http, Duration::from_secs(5)).expect("connect http");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    write!(s, "GET /readyz HTTP/1.0\r\nHost: {http}\r\n\r\n").expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    let code = out.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("status line");
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (code, body)
}

/// One message; the queue id from a 250, else the whole refusal.
fn send(node: &Node, tag: &str) -> Result<String, String> {
    let mut c = Client::connect(node.smtp).map_err(|e| e.to_string())?;
    c.command("EHLO client.test").map_err(|e| e.to_string())?;
    let r = c
        .send_mail("a@sender.test", &["b@example.test"], &body(tag, 2048))
        .map_err(|e| e.to_string());
    let _ = c.command("QUIT");
    r
}

/// The reply to MAIL FROM in a fresh session.
fn mail_from_reply(node: &Node) -> String {
    let mut c = Client::connect(node.smtp).expect("connect");
    c.command("EHLO client.test").expect("ehlo");
    let r = c.command("MAIL FROM:<a@sender.test>").expect("mail");
    let _ = c.command("QUIT");
    r
}

fn disk_full_metric(node: &Node) -> f64 {
    let samples = crate::metrics::scrape(node);
    crate::metrics::sum(&samples, "tern_disk_full", &[])
}

/// 16 MiB low-water mark on a 64 MiB tmpfs, 4 MiB log segments.
const NODE_KEYS: &str = "log_segment_mb = 4\nlog_keep_mb = 8\nmin_free_mb = 16";

#[test]
fn a_full_disk_refuses_mail_with_452_and_recovers_by_itself() {
    let fs = Tmpfs::mount(64);
    let mut node = Node::start_on_data_dir(1, true, &fs.path().join("data"), NODE_KEYS, &hold_mail());
    let mut acked = Vec::new();
    for i in 0..20 {
        acked.push(send(&node, &format!("before-{i}")).expect("accepted before the disk fills"));
    }
    assert_eq!(readyz(node.http).0, 200);

    let filler = fs.fill_leaving(6 << 20);
    wait_for(Duration::from_secs(15), "/readyz 503 naming a full disk", || {
        let (code, body) = readyz(node.http);
        code == 503 && body.contains("disk full")
    });
    let reply = mail_from_reply(&node);
    assert!(reply.starts_with("452 4.3.1"), "MAIL on a full disk: {reply}");
    let refused = send(&node, "while-full").expect_err("no 250 while the disk is full");
    assert!(
        refused.starts_with("452 4.3.1"),
        "transaction on a full disk: {refused}"
    );
    assert_eq!(disk_full_metric(&node), 1.0);

    std::fs::remove_file(&filler).expect("free the space");
    wait_for(
        Duration::from_secs(30),
        "mail accepted again once space is back",
        || match send(&node, "after") {
            Ok(id) => {
                acked.push(id);
                true
            }
            Err(_) => false,
        },
    );
    assert_eq!(readyz(node.http).0, 200);
    assert_eq!(disk_full_metric(&node), 0.0);
    let queued = node.queued_ids();
    let lost: Vec<&String> = acked.iter().filter(|id| !queued.contains(*id)).collect();
    assert_eq!(lost.len(), 0, "acknowledged messages missing from the queue: {lost:?}");
    node.kill();
}

#[test]
fn a_node_restarts_on_a_nearly_full_disk() {
    let fs = Tmpfs::mount(64);
    let mut node = Node::start_on_data_dir(1, true, &fs.path().join("data"), NODE_KEYS, &hold_mail());
    let mut acked = Vec::new();
    for i in 0..10 {
        acked.push(send(&node, &format!("before-{i}")).expect("accepted"));
    }
    // A crash, then the disk fills while the node is down.
    node.kill();
    let filler = fs.fill_leaving(6 << 20);
    node.spawn();
    let (code, body) = readyz(node.http);
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("disk full"), "{body}");
    let reply = mail_from_reply(&node);
    assert!(reply.starts_with("452 4.3.1"), "MAIL on a full disk: {reply}");
    // An orderly stop is not held up by log writes waiting for space.
    node.signal_and_wait("TERM", Duration::from_secs(30));
    node.spawn();
    assert_eq!(readyz(node.http).0, 503);

    std::fs::remove_file(&filler).expect("free the space");
    wait_for(
        Duration::from_secs(30),
        "mail accepted again once space is back",
        || match send(&node, "after") {
            Ok(id) => {
                acked.push(id);
                true
            }
            Err(_) => false,
        },
    );
    let queued = node.queued_ids();
    let lost: Vec<&String> = acked.iter().filter(|id| !queued.contains(*id)).collect();
    assert_eq!(
        lost.len(),
        0,
        "acknowledged messages missing after the restart: {lost:?}"
    );
    node.kill();
}

/// The disk fills to its last byte while clients are sending: writes in
/// flight meet `ENOSPC` (log appends wait, the node trips full; a sled write
/// caught by it makes the node exit once space is back, for its supervisor
/// to restart it, which the test does as systemd would). Once the space is
/// freed the node takes mail again with every acknowledged message queued.
#[test]
fn a_disk_filled_to_the_last_byte_under_load_loses_nothing() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    let fs = Tmpfs::mount(64);
    let mut node = Node::start_on_data_dir(1, true, &fs.path().join("data"), NODE_KEYS, &hold_mail());
    let acked = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let smtp = Arc::new(Mutex::new(node.smtp));
    let senders: Vec<_> = (0..3)
        .map(|t| {
            let (acked, stop, smtp) = (Arc::clone(&acked), Arc::clone(&stop), Arc::clone(&smtp));
            std::thread::spawn(move || {
                let mut refused = 0;
                // Bounded in count and by the test's stop flag.
                for i in 0..5000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let addr = *smtp.lock().expect("lock");
                    let sent = Client::connect(addr).and_then(|mut c| {
                        c.command("EHLO client.test")?;
                        c.send_mail(
                            "a@sender.test",
                            &["b@example.test"],
                            &body(&format!("load-{t}-{i}"), 8192),
                        )
                    });
                    match sent {
                        Ok(id) => acked.lock().expect("lock").push(id),
                        Err(_) => {
                            refused += 1;
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                }
                refused
            })
        })
        .collect();
    wait_for(Duration::from_secs(30), "some mail accepted under load", || {
        acked.lock().expect("lock").len() >= 30
    });
    let filler = fs.fill_leaving(0);
    wait_for(Duration::from_secs(15), "/readyz 503 naming a full disk", || {
        readyz(node.http).0 == 503
    });
    let at_full = acked.lock().expect("lock").len();
    let until = Instant::now() + Duration::from_secs(3);
    wait_for(Duration::from_secs(5), "3 s on a full disk under load", || {
        Instant::now() > until
    });
    std::fs::remove_file(&filler).expect("free the space");
    let mut restarts = 0;
    wait_for(
        Duration::from_secs(60),
        "mail accepted again once space is back",
        || {
            if node.exited() {
                // What systemd's Restart=on-failure does.
                restarts += 1;
                node.spawn();
                *smtp.lock().expect("lock") = node.smtp;
            }
            acked.lock().expect("lock").len() > at_full + 10
        },
    );
    stop.store(true, Ordering::Relaxed);
    let refused: usize = senders.into_iter().map(|s| s.join().expect("sender")).sum();
    let acked = acked.lock().expect("lock").clone();
    let queued = node.queued_ids();
    let lost: Vec<&String> = acked.iter().filter(|id| !queued.contains(*id)).collect();
    let sled_errors = node.logs().matches("hit error while writing iobuf").count();
    eprintln!(
        "disk full under load: acked {} refused {refused} sled write errors {sled_errors} restarts {restarts} lost {}",
        acked.len(),
        lost.len()
    );
    assert_eq!(lost.len(), 0, "acknowledged messages missing from the queue: {lost:?}");
    assert!(refused > 0, "the full disk refused some mail");
    assert!(restarts <= 1, "at most the one restart that recovers sled");
}

fn shard_leaders(node: &Node) -> Vec<u64> {
    node.ternctl_json(&["shard", "list"])
        .as_array()
        .expect("shards")
        .iter()
        .map(|s| s["leader"].as_u64().unwrap_or(0))
        .collect()
}

fn join(n1: &Node, n: &Node, id: u64) {
    let out = n1.ternctl(&["member", "add", "--id", &id.to_string(), "--addr", &n.grpc.to_string()]);
    assert!(
        out.status.success(),
        "member add {id}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Sends one message through `node`, retrying a temporary refusal (as a
/// client would) for up to 30 s; the queue id.
fn send_retrying(node: &Node, tag: &str) -> String {
    let mut id = None;
    wait_for(Duration::from_secs(30), "a message accepted", || {
        id = send(node, tag).ok();
        id.is_some()
    });
    id.expect("accepted")
}

#[test]
fn a_node_whose_disk_fills_hands_its_shards_over_and_the_cluster_takes_mail() {
    let _lock = cluster_lock();
    let fs = Tmpfs::mount(96);
    let extra = hold_mail();
    let n1 = Node::cluster_node(1, true, &extra);
    let n2 = Node::cluster_node(2, false, &extra);
    let mut n3 = Node::start_on_data_dir(
        3,
        false,
        &fs.path().join("data"),
        NODE_KEYS,
        &format!("{}{extra}", crate::harness::cluster_tls(3)),
    );
    n3.ternctl_env = crate::harness::test_pki().ternctl_env();
    join(&n1, &n2, 2);
    join(&n1, &n3, 3);
    wait_for(
        Duration::from_secs(120),
        "every shard on 3 replicas, node 3 leading some",
        || {
            let s = n1.ternctl_json(&["shard", "list"]);
            let s = s.as_array().expect("shards");
            s.iter()
                .all(|sh| sh["voters"].as_array().is_some_and(|v| v.len() == 3) && sh["leader"] != 0)
                && s.iter().any(|sh| sh["leader"] == 3)
        },
    );
    let mut acked = Vec::new();
    for i in 0..10 {
        acked.push(send_retrying(&n1, &format!("before-{i}")));
    }

    let filled = Instant::now();
    let filler = fs.fill_leaving(6 << 20);
    wait_for(Duration::from_secs(60), "node 3 leads no shard", || {
        let leaders = shard_leaders(&n1);
        !leaders.contains(&3) && !leaders.contains(&0)
    });
    eprintln!(
        "disk full in a cluster: node 3 led no shard {:?} after the fill",
        filled.elapsed()
    );
    let (code, body) = readyz(n3.http);
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("disk full"), "{body}");
    let reply = mail_from_reply(&n3);
    assert!(reply.starts_with("452 4.3.1"), "MAIL on node 3: {reply}");
    // The others take mail meanwhile (their writes need only each other).
    for i in 0..10 {
        acked.push(send_retrying(&n1, &format!("full-a-{i}")));
        acked.push(send_retrying(&n2, &format!("full-b-{i}")));
    }

    std::fs::remove_file(&filler).expect("free the space");
    let id = send_retrying(&n3, "after");
    acked.push(id);
    // The listing reads each shard's copy here, which may be a follower's a
    // moment behind the leader that acknowledged: wait (bounded) for it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let lost = loop {
        let queued = n1.queued_ids();
        let lost: Vec<String> = acked.iter().filter(|id| !queued.contains(*id)).cloned().collect();
        if lost.is_empty() || Instant::now() > deadline {
            break lost;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(lost.len(), 0, "acknowledged messages missing from the queue: {lost:?}");
    drop((n1, n2, n3));
}
