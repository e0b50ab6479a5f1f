//! Egress sources, pools and warm-up end to end: a real aiosmtpd peer that
//! records the client address and EHLO name of every message sees mail
//! leave from the pool's loopback addresses (127.0.0.2, 127.0.0.3, ::1)
//! by weight, the `X-Tern-Pool` header pick a pool and vanish, and a
//! warm-up cap hold mail back without counting attempts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tempfile::TempDir;

use crate::harness::*;

/// An aiosmtpd handler writing one JSON file per message: the client's
/// address, its EHLO name, the recipients and the message as received.
const RECORDING_HANDLER: &str = r#"import json, os

class Handler:
    def __init__(self, directory):
        self.directory = directory
        self.count = 0

    @classmethod
    def from_cli(cls, parser, *args):
        return cls(args[0])

    async def handle_DATA(self, server, session, envelope):
        self.count += 1
        record = {
            "peer": session.peer[0],
            "ehlo": session.host_name,
            "rcpts": envelope.rcpt_tos,
            "data": envelope.original_content.decode("utf-8", "replace"),
        }
        tmp = os.path.join(os.path.dirname(self.directory), "msg-%04d.tmp" % self.count)
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.rename(tmp, os.path.join(self.directory, "msg-%04d.json" % self.count))
        return "250 2.0.0 kept"
"#;

/// aiosmtpd with [`RECORDING_HANDLER`] on a free port of `host`.
struct RecordingSink {
    child: Child,
    dir: TempDir,
    addr: SocketAddr,
}

impl RecordingSink {
    fn start(host: &str) -> Option<RecordingSink> {
        if !tern_testkit::peers::Aiosmtpd::available() {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("recsink.py"), RECORDING_HANDLER).unwrap();
        std::fs::create_dir(dir.path().join("messages")).unwrap();
        for _ in 0..5 {
            let addr = SocketAddr::new(host.parse().unwrap(), free_port());
            let log = std::fs::File::create(dir.path().join("sink.log")).unwrap();
            let mut child = Command::new("python3")
                .env("PYTHONPATH", dir.path())
                .args(["-m", "aiosmtpd", "-n", "-l"])
                // aiosmtpd splits host and port at the last ':' (no brackets for IPv6).
                .arg(format!("{host}:{}", addr.port()))
                .args(["-c", "recsink.Handler"])
                .arg(dir.path().join("messages"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap();
            let up = tern_testkit::wait_until(Duration::from_secs(15), "recording sink", || {
                matches!(child.try_wait(), Ok(Some(_))) || banner(addr)
            })
            .is_ok();
            if up && matches!(child.try_wait(), Ok(None)) {
                return Some(RecordingSink { child, dir, addr });
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!(
            "recording sink did not start: {}",
            std::fs::read_to_string(dir.path().join("sink.log")).unwrap_or_default()
        );
    }

    fn files(&self) -> Vec<PathBuf> {
        tern_testkit::peers::files_in(&self.dir.path().join("messages"))
    }

    /// Every message received so far.
    fn messages(&self) -> Vec<Value> {
        self.files()
            .iter()
            .map(|p| serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap())
            .collect()
    }

    /// The messages received, once there are `n`.
    fn wait_messages(&self, n: usize, deadline: Duration) -> Vec<Value> {
        wait_for(deadline, &format!("{n} messages at the sink"), || {
            self.files().len() >= n
        });
        self.messages()
    }
}

impl Drop for RecordingSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// True once something at `addr` sends a 220 banner.
fn banner(addr: SocketAddr) -> bool {
    use std::io::Read;
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 3];
    s.read_exact(&mut buf).is_ok() && &buf == b"220"
}

fn send(node: &Node, from: &str, to: &str, tag: &str, extra_header: &str) -> String {
    let mut c = Client::connect(node.smtp).unwrap();
    c.command("EHLO sender.test").unwrap();
    let message = format!("{extra_header}{}", body(tag, 300));
    c.send_mail(from, &[to], &message).unwrap()
}

fn by_peer<'a>(messages: &'a [Value], peer: &str) -> Vec<&'a Value> {
    messages.iter().filter(|m| m["peer"] == peer).collect()
}

const TWO_SOURCES: &str = "[[source]]\nname = \"two\"\naddress = \"127.0.0.2\"\nehlo = \"two.pool.test\"\n\n\
    [[source]]\nname = \"three\"\naddress = \"127.0.0.3\"\n\n";

#[test]
fn a_pool_spreads_mail_over_its_sources_by_weight_with_their_ehlo_names() {
    let Some(sink) = RecordingSink::start("127.0.0.1") else {
        return;
    };
    let node = Node::start(&format!(
        "[log]\nformat = \"json\"\n\n[[route]]\ndomain = \"*\"\nto = \"{}\"\n\n{TWO_SOURCES}\
         [[pool]]\nname = \"default\"\nsources = [\"two:3\", \"three:1\"]\n",
        sink.addr
    ));
    for i in 0..40 {
        send(
            &node,
            "a@tern.test",
            &format!("r{i}@example.test"),
            &format!("weight-{i}"),
            "",
        );
    }
    let messages = sink.wait_messages(40, Duration::from_secs(120));
    assert_eq!(messages.len(), 40);
    let two = by_peer(&messages, "127.0.0.2");
    let three = by_peer(&messages, "127.0.0.3");
    assert_eq!(two.len() + three.len(), 40, "only the pool's addresses: {messages:?}");
    assert!(
        !three.is_empty() && two.len() > three.len(),
        "weights 3:1, got {}:{}",
        two.len(),
        three.len()
    );
    assert!(two.iter().all(|m| m["ehlo"] == "two.pool.test"), "{two:?}");
    // A source without `ehlo` says the node's helo_name (its hostname).
    assert!(three.iter().all(|m| m["ehlo"] == "mx1.tern.test"), "{three:?}");
    // The delivery events name the source.
    wait_for(Duration::from_secs(10), "40 delivered events", || {
        node.logs().lines().filter(|l| l.contains("\"delivered\"")).count() >= 40
    });
    let sources: Vec<String> = node
        .logs()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["fields"]["event"] == "delivered")
        .map(|l| l["fields"]["source"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(sources.iter().filter(|s| *s == "two").count(), two.len(), "{sources:?}");
    assert_eq!(
        sources.iter().filter(|s| *s == "three").count(),
        three.len(),
        "{sources:?}"
    );

    let shown = node.ternctl_json(&["pool", "show"]);
    let pool = &shown["pools"][0];
    assert_eq!(pool["name"], "default");
    assert_eq!(pool["sources"][0]["address"], "127.0.0.2");
    assert_eq!(pool["sources"][0]["weight"], 3);
    assert_eq!(pool["sources"][1]["ehlo"], "mx1.tern.test");
    assert!(pool["sources"][0]["warmup"].is_null(), "{shown}");
    let samples = crate::metrics::scrape(&node);
    let sent = |source: &str| crate::metrics::sum(&samples, "tern_egress_messages_total", &[("name", source)]);
    assert_eq!(sent("two") as usize, two.len());
    assert_eq!(sent("three") as usize, three.len());
}

#[test]
fn an_ipv6_source_reaches_an_ipv6_peer() {
    let Some(sink) = RecordingSink::start("::1") else {
        return;
    };
    // The IPv4 source cannot reach an IPv6 host: every message leaves from ::1.
    let node = Node::start(&format!(
        "[[route]]\ndomain = \"*\"\nto = \"[::1]:{}\"\n\n\
         [[source]]\nname = \"four\"\naddress = \"127.0.0.2\"\n\n\
         [[source]]\nname = \"six\"\naddress = \"::1\"\nehlo = \"six.pool.test\"\n\n\
         [[pool]]\nname = \"default\"\nsources = [\"four:5\", \"six\"]\n",
        sink.addr.port()
    ));
    for i in 0..4 {
        send(&node, "a@tern.test", "r@example.test", &format!("six-{i}"), "");
    }
    let messages = sink.wait_messages(4, Duration::from_secs(60));
    assert!(
        messages
            .iter()
            .all(|m| m["peer"] == "::1" && m["ehlo"] == "six.pool.test"),
        "{messages:?}"
    );
}

#[test]
fn the_pool_header_and_rules_pick_a_pool_and_the_header_is_not_sent() {
    let Some(sink) = RecordingSink::start("127.0.0.1") else {
        return;
    };
    let node = Node::start(&format!(
        "[[route]]\ndomain = \"*\"\nto = \"{}\"\n\n{TWO_SOURCES}\
         [[pool]]\nname = \"default\"\nsources = [\"two\"]\n\n\
         [[pool]]\nname = \"bulk\"\nsources = [\"three\"]\n\n\
         [[pool_rule]]\npool = \"bulk\"\nsender_domain = \"news.test\"\n",
        sink.addr
    ));
    send(&node, "a@tern.test", "r@example.test", "plain", "");
    send(
        &node,
        "a@tern.test",
        "r@example.test",
        "by-header",
        "X-Tern-Pool: bulk\r\n",
    );
    send(&node, "a@news.test", "r@example.test", "by-rule", "");
    send(
        &node,
        "a@tern.test",
        "r@example.test",
        "unknown",
        "X-Tern-Pool: nosuch\r\n",
    );
    let messages = sink.wait_messages(4, Duration::from_secs(60));
    let peer_of = |tag: &str| {
        let m = messages
            .iter()
            .find(|m| m["data"].as_str().unwrap().contains(&format!("<{tag}@tern.test>")))
            .unwrap_or_else(|| panic!("{tag} not at the sink: {messages:?}"));
        assert!(
            !m["data"].as_str().unwrap().to_ascii_lowercase().contains("x-tern-pool"),
            "the pool header was sent: {m}"
        );
        m["peer"].as_str().unwrap().to_owned()
    };
    assert_eq!(peer_of("plain"), "127.0.0.2");
    assert_eq!(peer_of("by-header"), "127.0.0.3");
    assert_eq!(peer_of("by-rule"), "127.0.0.3");
    // A header naming no pool: the default pool, with a warning.
    assert_eq!(peer_of("unknown"), "127.0.0.2");
    // The node's output is read by another thread: wait for the line.
    wait_for(Duration::from_secs(10), "the unknown-pool warning", || {
        node.logs().contains("names no [[pool]]")
    });
}

#[test]
fn warmup_caps_a_source_and_holds_the_rest_without_counting_attempts() {
    let Some(sink) = RecordingSink::start("127.0.0.1") else {
        return;
    };
    let today = chrono::Utc::now().format("%Y-%m-%d");
    let node = Node::start(&format!(
        "[[route]]\ndomain = \"*\"\nto = \"{}\"\n\n{TWO_SOURCES}\
         [[pool]]\nname = \"default\"\nsources = [\"two\"]\n\
         warmup = {{ start = \"{today}\", schedule = [5, 50] }}\n",
        sink.addr
    ));
    let mut ids = Vec::new();
    for i in 0..12 {
        ids.push(send(&node, "a@tern.test", "r@example.test", &format!("warm-{i}"), ""));
    }
    sink.wait_messages(5, Duration::from_secs(60));
    // Every message was tried: 7 are held until the next UTC day, not attempted.
    let tomorrow = (chrono::Utc::now().timestamp() / 86_400 + 1) * 86_400;
    wait_for(Duration::from_secs(60), "7 messages held until tomorrow", || {
        let list = node.ternctl_json(&["queue", "list"]);
        let held: Vec<&Value> = list["messages"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["next_attempt"].as_i64().unwrap() >= tomorrow)
            .collect();
        held.len() == 7
    });
    let list = node.ternctl_json(&["queue", "list"]);
    for m in list["messages"].as_array().unwrap() {
        assert_eq!(m["attempts"], 0, "held back, not attempted: {m}");
        assert_ne!(m["recipients"][0]["status"], "failed", "{m}");
    }
    assert_eq!(sink.messages().len(), 5, "the day-1 cap");
    assert!(sink.messages().iter().all(|m| m["peer"] == "127.0.0.2"));

    let shown = node.ternctl_json(&["pool", "show"]);
    let warmup = &shown["pools"][0]["sources"][0]["warmup"];
    assert_eq!(warmup["day"], 1, "{shown}");
    assert_eq!(warmup["cap"], 5, "{shown}");
    assert_eq!(warmup["node_cap"], 5, "{shown}");
    assert_eq!(warmup["used"][0]["scope"], "domain:example.test", "{shown}");
    assert_eq!(warmup["used"][0]["used"], 5, "{shown}");
    let samples = crate::metrics::scrape(&node);
    let metric = |name: &str, label: &str| crate::metrics::sum(&samples, name, &[("name", label)]);
    assert_eq!(metric("tern_egress_messages_total", "two"), 5.0);
    assert!(metric("tern_egress_warmup_held_total", "default") >= 7.0);
    let table = String::from_utf8(node.ternctl(&["pool", "show"]).stdout).unwrap();
    assert!(
        table.contains("day 1/2: 5/day") && table.contains("domain:example.test 5"),
        "{table}"
    );
}

/// DKIM signs at acceptance, delivery removes `X-Tern-Pool` afterwards: the
/// signature must not cover it, so dkimpy still verifies what the peer got.
#[test]
fn a_dkim_signature_survives_the_removal_of_the_pool_header() {
    use crate::dkim::{dkimpy_available, generate, verify};
    if !dkimpy_available() {
        return;
    }
    let Some(sink) = RecordingSink::start("127.0.0.1") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("ed.pem");
    let out = generate(&[
        "--domain",
        "example.test",
        "--selector",
        "ed",
        "--algorithm",
        "ed25519",
        "--out",
        key.to_str().unwrap(),
        "-o",
        "json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let generated: Value = serde_json::from_slice(&out.stdout).unwrap();
    let dns = tern_testkit::dns::DnsServer::start(&format!(
        "txt-record=ed._domainkey.example.test,\"{}\"\n",
        generated["txt_value"].as_str().unwrap()
    ));
    let node = Node::start(&format!(
        "[[dkim]]\ndomain = \"example.test\"\nselector = \"ed\"\nalgorithm = \"ed25519-sha256\"\nprivate_key = \"{}\"\n\n\
         [[route]]\ndomain = \"*\"\nto = \"{}\"\n\n{TWO_SOURCES}\
         [[pool]]\nname = \"default\"\nsources = [\"two\"]\n\n[[pool]]\nname = \"bulk\"\nsources = [\"three\"]\n",
        key.display(),
        sink.addr
    ));
    let mut c = Client::connect(node.smtp).unwrap();
    c.command("EHLO sender.test").unwrap();
    c.send_mail(
        "someone@example.test",
        &["rcpt@elsewhere.test"],
        "From: someone@example.test\r\nTo: rcpt@elsewhere.test\r\nX-Tern-Pool: bulk\r\nSubject: pooled\r\n\
         Message-ID: <pooled-dkim@example.test>\r\n\r\nHello.\r\n",
    )
    .unwrap();
    let messages = sink.wait_messages(1, Duration::from_secs(60));
    assert_eq!(messages[0]["peer"], "127.0.0.3", "the header's pool");
    let data = messages[0]["data"].as_str().unwrap();
    assert!(
        data.starts_with("DKIM-Signature: ") && !data.contains("X-Tern-Pool"),
        "{data}"
    );
    let file = dir.path().join("received.eml");
    std::fs::write(&file, data).unwrap();
    let (verdicts, notes) = verify(&dns, &[&file]);
    assert_eq!(
        verdicts[0],
        serde_json::json!([{"a": "ed25519-sha256", "s": "ed", "d": "example.test", "pass": true}]),
        "{notes}\n{data}"
    );
}
