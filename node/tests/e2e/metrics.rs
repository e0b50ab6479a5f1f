//! `GET /metrics` end to end: counters move as mail is received, delivered
//! and deferred, and the queue gauge shows what is left. The exposition is
//! parsed by Python's prometheus_client (the classic text parser, and the
//! strict OpenMetrics parser for the OpenMetrics variant), not by regexes.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::harness::*;

/// One sample: family name, family type, sample name, labels, value.
#[derive(Debug, serde::Deserialize)]
pub struct Sample {
    family: String,
    kind: String,
    name: String,
    labels: std::collections::BTreeMap<String, String>,
    value: f64,
}

const PARSE: &str = r#"
import json, sys
if sys.argv[1] == "openmetrics":
    from prometheus_client.openmetrics.parser import text_string_to_metric_families
else:
    from prometheus_client.parser import text_string_to_metric_families
out = []
for f in text_string_to_metric_families(sys.stdin.read()):
    for s in f.samples:
        out.append({"family": f.name, "kind": f.type, "name": s.name, "labels": s.labels, "value": s.value})
print(json.dumps(out))
"#;

/// HTTP/1.0 GET of /metrics; returns the content type and the body.
pub fn get_metrics(http: SocketAddr, accept: Option<&str>) -> (String, String) {
    let mut s = TcpStream::connect_timeout(&http, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let accept = accept.map(|a| format!("Accept: {a}\r\n")).unwrap_or_default();
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {http}\r\n{accept}\r\n").unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("HTTP response");
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type").then(|| v.trim().to_owned())
        })
        .unwrap_or_default();
    (content_type, body.to_owned())
}

fn parse(text: &str, format: &str) -> Vec<Sample> {
    let mut child = Command::new("python3")
        .args(["-c", PARSE, format])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client could not parse the {format} exposition: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Scrapes in the classic text format (no Accept header).
pub fn scrape(node: &Node) -> Vec<Sample> {
    let (content_type, body) = get_metrics(node.http, None);
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    parse(&body, "text")
}

/// Sum of the samples named `name` whose labels include every pair in `labels`.
pub fn sum(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

fn send(node: &Node, to: &str, tag: &str) {
    let mut c = Client::connect(node.smtp).unwrap();
    c.command("EHLO sender.test").unwrap();
    c.send_mail("a@tern.test", &[to], &body(tag, 2000)).unwrap();
    c.command("QUIT").unwrap();
}

#[test]
fn metrics_follow_received_delivered_and_deferred_mail() {
    let sink = SmtpSink::start(&[]);
    let closed_guard = closed_port();
    let closed = closed_guard.port;
    let node = Node::start(&format!(
        "shards = 2\n\n[[route]]\ndomain = \"example.test\"\nto = \"{}\"\n\n[[route]]\ndomain = \"deferred.test\"\nto = \"127.0.0.1:{closed}\"\n\n[delivery]\nretry_schedule = [\"1h\"]\n",
        sink.addr
    ));
    let before = scrape(&node);
    assert_eq!(sum(&before, "tern_smtp_messages_received_total", &[]), 0.0);
    assert_eq!(sum(&before, "tern_raft_is_leader", &[("group", "0")]), 1.0);
    assert_eq!(
        sum(&before, "tern_raft_is_leader", &[]),
        3.0,
        "control group and 2 shards"
    );
    let types: std::collections::BTreeMap<&str, &str> =
        before.iter().map(|s| (s.family.as_str(), s.kind.as_str())).collect();
    for (family, kind) in [
        ("tern_smtp_sessions", "counter"),
        ("tern_smtp_sessions_open", "gauge"),
        ("tern_queue_messages", "gauge"),
        ("tern_delivery_attempt_duration_seconds", "histogram"),
        ("tern_storage_fsync_duration_seconds", "histogram"),
        ("tern_raft_leader_changes", "counter"),
    ] {
        assert_eq!(types.get(family), Some(&kind), "{family}: {types:?}");
    }

    for i in 0..3 {
        send(&node, "b@example.test", &format!("metrics-{i}"));
    }
    let mut after = Vec::new();
    wait_for(Duration::from_secs(60), "3 delivered recipients in the metrics", || {
        after = scrape(&node);
        sum(
            &after,
            "tern_queue_recipients_total",
            &[("outcome", "delivered"), ("destination", "example.test")],
        ) >= 3.0
            && sum(&after, "tern_queue_messages", &[]) == 0.0
    });
    wait_for(Duration::from_secs(10), "3 messages at the sink", || {
        sink.messages().len() == 3
    });
    assert!(sum(&after, "tern_smtp_messages_received_total", &[]) >= 3.0);
    assert!(sum(&after, "tern_smtp_received_bytes_total", &[]) >= 3.0 * 2000.0);
    assert!(sum(&after, "tern_smtp_sessions_total", &[]) >= 3.0);
    assert!(sum(&after, "tern_smtp_transaction_replies_total", &[("class", "2xx")]) >= 3.0);
    assert_eq!(
        sum(&after, "tern_smtp_transaction_replies_total", &[("class", "5xx")]),
        0.0
    );
    assert!(
        sum(&after, "tern_smtp_replies_total", &[("class", "3xx")]) >= 3.0,
        "354 to DATA"
    );
    // smtp-sink offers no STARTTLS.
    assert!(sum(&after, "tern_delivery_connections_total", &[("tls", "no")]) >= 1.0);
    assert_eq!(sum(&after, "tern_delivery_connections_total", &[("tls", "yes")]), 0.0);
    assert!(
        sum(
            &after,
            "tern_delivery_attempt_duration_seconds_count",
            &[("result", "ok")]
        ) >= 1.0
    );
    assert!(sum(&after, "tern_storage_fsync_duration_seconds_count", &[]) > 0.0);
    assert!(sum(&after, "tern_storage_commit_batch_size_count", &[]) > 0.0);
    assert!(sum(&after, "tern_storage_disk_bytes", &[("part", "sled")]) > 0.0);
    assert!(sum(&after, "tern_storage_disk_bytes", &[("part", "wal")]) > 0.0);
    assert!(sum(&after, "tern_raft_leader_changes_total", &[("group", "1")]) >= 1.0);
    assert!(sum(&after, "tern_raft_term", &[("group", "1")]) >= 1.0);
    assert!(
        sum(&after, "tern_raft_last_applied", &[("group", "1")])
            + sum(&after, "tern_raft_last_applied", &[("group", "2")])
            >= 6.0,
        "3 enqueues and their outcomes"
    );
    assert_eq!(
        sum(&after, "tern_queue_recipients_total", &[("outcome", "failed")]),
        0.0
    );

    // One message to a port nobody listens on: deferred, and it stays queued.
    send(&node, "c@deferred.test", "metrics-deferred");
    let mut deferred = Vec::new();
    wait_for(Duration::from_secs(60), "a deferral in the metrics", || {
        deferred = scrape(&node);
        sum(
            &deferred,
            "tern_queue_recipients_total",
            &[("outcome", "deferred"), ("destination", "deferred.test")],
        ) >= 1.0
    });
    assert_eq!(sum(&deferred, "tern_queue_messages", &[]), 1.0);
    assert!(sum(&deferred, "tern_smtp_messages_received_total", &[]) >= 4.0);
    assert!(
        sum(
            &deferred,
            "tern_delivery_attempt_duration_seconds_count",
            &[("result", "error")]
        ) >= 1.0
    );
    let oldest = sum(&deferred, "tern_queue_oldest_message_age_seconds", &[]);
    assert!((0.0..120.0).contains(&oldest), "{oldest}");
    assert_eq!(sum(&deferred, "tern_smtp_sessions_open", &[]), 0.0);

    // Prometheus asks for OpenMetrics: the same metrics, valid for the strict parser.
    let (content_type, body) = get_metrics(
        node.http,
        Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"),
    );
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    let om = parse(&body, "openmetrics");
    assert_eq!(sum(&om, "tern_queue_messages", &[]), 1.0);
    assert!(sum(&om, "tern_smtp_messages_received_total", &[]) >= 4.0);
}
