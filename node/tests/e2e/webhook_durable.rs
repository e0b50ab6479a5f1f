//! Durable webhook events on a three-node cluster: a receiver
//! (webhook_receiver.py) verifies every Standard Webhooks signature; it is
//! killed while mail flows (events wait in the shards' outboxes), a node
//! that leads shards is SIGKILLed, the receiver comes back: every event
//! arrives, exactly once after de-duplication by id, each signed.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::cluster::{shards, three_node_cluster};
use crate::harness::*;

const SECRET: &str = "whsec_dGVybi1kdXJhYmxlLXdlYmhvb2stdGVzdC1rZXktMzI=";
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e/webhook_receiver.py");

struct Receiver {
    child: Child,
    port: u16,
}

impl Receiver {
    fn start(out: &std::path::Path, port: u16) -> Receiver {
        let mut child = Command::new("python3")
            .arg(SCRIPT)
            .arg(out)
            .arg(port.to_string())
            .arg(SECRET)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line.trim().parse().unwrap_or_else(|_| panic!("receiver said {line:?}"));
        Receiver { child, port }
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Every POST recorded so far: (signature valid, events).
fn posts(out: &std::path::Path) -> Vec<(bool, Vec<Value>)> {
    let text = std::fs::read_to_string(out).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let events = serde_json::from_str(v["body"].as_str().unwrap()).unwrap();
            (v["valid"] == true, events)
        })
        .collect()
}

/// Events de-duplicated by id.
fn unique(out: &std::path::Path) -> BTreeMap<String, Value> {
    posts(out)
        .into_iter()
        .flat_map(|(_, events)| events)
        .map(|e| (e["id"].as_str().unwrap().to_owned(), e))
        .collect()
}

/// Sends one message; a 4xx (a shard's leadership moving just after the
/// cluster formed) is retried as a client would, for at most 30 s.
fn send(node: &Node, rcpt: &str, tag: &str) -> String {
    let end = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut c = Client::connect(node.smtp).unwrap();
        c.command("EHLO t.test").unwrap();
        match c.send_mail("a@tern.test", &[rcpt], &body(tag, 300)) {
            Ok(id) => return id,
            Err(e) if e.to_string().starts_with('4') && std::time::Instant::now() < end => {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("sending {tag}: {e}"),
        }
    }
}

#[test]
fn durable_events_survive_a_receiver_and_a_node_killed() {
    if !tern_testkit::peers::require("python3") {
        return;
    }
    let sink = SmtpSink::start(&[]);
    let refusing = SmtpSink::start(&["-f", "RCPT"]);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("posts.jsonl");
    let mut receiver = Receiver::start(&out, 0);
    let port = receiver.port;
    // An endpoint nobody listens on: its events become dead letters after retry_for.
    let gone = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let extra = format!(
        "shards = 4\n\n[[route]]\ndomain = \"bounce.test\"\nto = \"{bad}\"\n\n\
         [[route]]\ndomain = \"*\"\nto = \"{ok}\"\n\n\
         [[webhook]]\nurl = \"http://127.0.0.1:{port}/events\"\nname = \"crm\"\nsecret = \"{SECRET}\"\n\
         events = [\"received\", \"delivered\", \"bounced\", \"deferred\"]\n\n\
         [[webhook]]\nurl = \"http://127.0.0.1:{gone}/events\"\nname = \"gone\"\nsecret = \"{SECRET}\"\n\
         events = [\"bounced\"]\nretry_for = \"3s\"\n",
        bad = refusing.addr,
        ok = sink.addr,
    );
    let (n1, n2, n3) = three_node_cluster(&extra);
    let mut nodes = [n1, n2, n3];

    // 60 to the sink, 20 refused (5xx); the receiver dies after the first 40.
    let mut ok = Vec::new();
    let mut bad = Vec::new();
    for i in 0..80 {
        let via = &nodes[i % 3];
        if i % 4 == 3 {
            bad.push(send(via, &format!("r{i}@bounce.test"), &format!("dur-{i}")));
        } else {
            ok.push(send(via, &format!("r{i}@example.test"), &format!("dur-{i}")));
        }
        if i == 39 {
            wait_for(Duration::from_secs(60), "some events posted", || {
                unique(&out).len() >= 20
            });
            receiver.stop();
        }
    }
    wait_for(Duration::from_secs(90), "every message at the sink", || {
        let msgs = sink.messages();
        (0..80)
            .filter(|i| i % 4 != 3)
            .all(|i| msgs.iter().any(|m| m.contains(&format!("<dur-{i}@tern.test>"))))
    });

    // Every outcome (DSNs included) committed: the kill below tests the
    // events, not redelivery after a crash.
    wait_for(Duration::from_secs(90), "an empty queue", || {
        nodes[0].ternctl_json(&["queue", "summary"])["messages"] == 0
    });
    // SIGKILL a node that leads a shard: its outboxes are posted by the new leaders.
    let leader = shards(&nodes[0])[0]["leader"].as_u64().unwrap();
    assert!((1..=3).contains(&leader));
    nodes[leader as usize - 1].kill();
    let _receiver = Receiver::start(&out, port);

    let sent: BTreeSet<&String> = ok.iter().chain(&bad).collect();
    let expected = |events: &BTreeMap<String, Value>| {
        let of = |kind: &str, ids: &[String]| {
            ids.iter()
                .all(|id| events.values().any(|e| e["type"] == kind && e["msg_id"] == id.as_str()))
        };
        let dsns = events
            .values()
            .filter(|e| e["type"] == "delivered" && !sent.contains(&e["msg_id"].as_str().unwrap().to_owned()))
            .count();
        of("received", &ok) && of("received", &bad) && of("delivered", &ok) && of("bounced", &bad) && dsns >= 20
    };
    // The receiver was down for at most a few minutes: backoff is below that.
    let end = std::time::Instant::now() + Duration::from_secs(300);
    while !expected(&unique(&out)) {
        if std::time::Instant::now() > end {
            let events = unique(&out);
            let missing: Vec<String> = ok
                .iter()
                .map(|id| ("delivered", id))
                .chain(ok.iter().chain(&bad).map(|id| ("received", id)))
                .chain(bad.iter().map(|id| ("bounced", id)))
                .filter(|(kind, id)| {
                    !events
                        .values()
                        .any(|e| e["type"] == *kind && e["msg_id"] == id.as_str())
                })
                .map(|(kind, id)| format!("{kind} {id}"))
                .collect();
            let alive = &nodes[leader as usize % 3];
            let status = alive.ternctl_json(&["webhook", "status"]);
            let logs: Vec<String> = nodes
                .iter()
                .flat_map(|n| {
                    n.logs()
                        .lines()
                        .filter(|l| {
                            l.contains("webhook")
                                || l.contains("outbox ack")
                                || missing
                                    .iter()
                                    .any(|m| m.split(' ').nth(1).is_some_and(|id| l.contains(id)))
                        })
                        .map(str::to_owned)
                        .collect::<Vec<_>>()
                })
                .collect();
            panic!(
                "missing {missing:?}\nleader killed {leader}\nstatus {status}\nlogs {}",
                logs.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    let events = unique(&out);
    let all = posts(&out);
    assert!(all.iter().all(|(valid, _)| *valid), "a POST with a bad signature");
    // Exactly once per (type, message, recipient) after de-duplication by id.
    let mut by_what: BTreeMap<(String, String, String), usize> = BTreeMap::new();
    for e in events
        .values()
        .filter(|e| sent.contains(&e["msg_id"].as_str().unwrap().to_owned()))
    {
        let key = (
            e["type"].to_string(),
            e["msg_id"].to_string(),
            e["recipient"].to_string(),
        );
        *by_what.entry(key).or_default() += 1;
    }
    assert!(by_what.values().all(|&n| n == 1), "{by_what:?}");
    let count = |kind: &str| {
        events
            .values()
            .filter(|e| e["type"] == kind && sent.contains(&e["msg_id"].as_str().unwrap().to_owned()))
            .count()
    };
    assert_eq!(
        (
            count("received"),
            count("delivered"),
            count("bounced"),
            count("deferred")
        ),
        (80, 60, 20, 0)
    );
    // The bounces carry the remote reply and its class; the DSNs to the
    // sender were delivered too (one each).
    for e in events.values().filter(|e| e["type"] == "bounced") {
        assert!(e["reply"].as_str().unwrap().starts_with('5'), "{e}");
        assert!(e["class"].is_string(), "{e}");
        assert_eq!(e["version"], 1);
    }
    let dsns = events
        .values()
        .filter(|e| e["type"] == "delivered" && !sent.contains(&e["msg_id"].as_str().unwrap().to_owned()))
        .count();
    assert_eq!(dsns, 20);

    // `ternctl webhook status`: nothing left pending in any group, no dead letters.
    let alive = &nodes[leader as usize % 3];
    let mut status = Value::Null;
    // For the dead endpoint: each bounce a dead letter once retry_for passed.
    wait_for(Duration::from_secs(90), "empty backlogs", || {
        status = alive.ternctl_json(&["webhook", "status", "--dead"]);
        let groups = status["groups"].as_array().unwrap();
        let dead: u64 = groups
            .iter()
            .filter(|g| g["endpoint"] == "gone")
            .map(|g| g["dead"].as_u64().unwrap())
            .sum();
        groups.len() == 10 && groups.iter().all(|g| g["pending"] == 0) && dead == 20
    });
    let groups = status["groups"].as_array().unwrap();
    assert!(
        groups.iter().filter(|g| g["endpoint"] == "crm").all(|g| g["dead"] == 0),
        "{status}"
    );
    let letters = status["dead_letters"].as_array().unwrap();
    assert_eq!(letters.len(), 20, "{status}");
    let mut ids: Vec<&str> = letters.iter().map(|d| d["msg_id"].as_str().unwrap()).collect();
    ids.sort_unstable();
    let mut wanted: Vec<&str> = bad.iter().map(String::as_str).collect();
    wanted.sort_unstable();
    assert_eq!(ids, wanted);
    assert!(
        letters
            .iter()
            .all(|d| d["endpoint"] == "gone" && d["type"] == "bounced"),
        "{status}"
    );
}
