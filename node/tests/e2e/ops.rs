//! Queue operations and domain suspension end to end, through ternctl.

use std::time::{Duration, Instant};

use crate::harness::*;

fn send(node: &Node, from: &str, to: &str, tag: &str) -> String {
    let mut c = Client::connect(node.smtp).unwrap();
    c.command("EHLO ops.test").unwrap();
    // "<>" sends with the null reverse-path.
    c.send_mail(if from == "<>" { "" } else { from }, &[to], &body(tag, 300))
        .unwrap()
}

fn ok(node: &Node, args: &[&str]) -> serde_json::Value {
    node.ternctl_json(args)
}

fn attempts(node: &Node, id: &str) -> u64 {
    ok(node, &["queue", "show", id])["attempts"].as_u64().unwrap()
}

#[test]
fn hold_stops_delivery_release_resumes_delete_removes() {
    let port = free_port();
    // example.org stays unreachable throughout.
    let never_guard = closed_port();
    let never = never_guard.port;
    let node = Node::start(&format!(
        "[[route]]\ndomain = \"example.org\"\nto = \"127.0.0.1:{never}\"\n\n[[route]]\ndomain = \"*\"\nto = \"127.0.0.1:{port}\"\n\n[delivery]\nretry_schedule = [\"1s\"]\n"
    ));
    let held = send(&node, "a@tern.test", "r@example.test", "held-1");
    let doomed = send(&node, "a@tern.test", "r@example.org", "doomed-1");
    wait_for(Duration::from_secs(30), "a first attempt", || {
        attempts(&node, &held) >= 1
    });

    let dry = ok(&node, &["queue", "hold", "--domain", "example.test", "--dry-run"]);
    assert_eq!(dry["matched"], 1);
    assert_eq!(dry["ids"], serde_json::json!([held.clone()]));
    let r = ok(&node, &["queue", "hold", &held]);
    assert_eq!(r["affected"], 1);
    assert_eq!(ok(&node, &["queue", "show", &held])["held"], true);
    let summary = ok(&node, &["queue", "summary"]);
    let d = summary["domain_details"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["domain"] == "example.test")
        .unwrap()
        .clone();
    assert_eq!(d["held"], 1, "{summary}");
    assert!(d["last_error"].as_str().unwrap().starts_with("451"), "{summary}");

    // The peer comes up; a held message is not delivered, for several retry periods.
    let sink = SmtpSink::start_on(port, &[]);
    let seen = attempts(&node, &held);
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        assert!(
            !sink.messages().iter().any(|m| m.contains("<held-1@tern.test>")),
            "held mail was delivered"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(attempts(&node, &held), seen);

    let r = ok(
        &node,
        &["queue", "delete", "--sender", "a@tern.test", "--domain", "example.org"],
    );
    assert_eq!(r["affected"], 1);
    assert!(node.ternctl(&["queue", "show", &doomed]).status.code() == Some(3));

    assert_eq!(ok(&node, &["queue", "release", &held])["affected"], 1);
    wait_for(Duration::from_secs(30), "delivery after release", || {
        sink.messages().iter().any(|m| m.contains("<held-1@tern.test>"))
    });
    wait_for(Duration::from_secs(30), "empty queue", || {
        ok(&node, &["queue", "summary"])["messages"] == 0
    });
    assert!(!sink.messages().iter().any(|m| m.contains("<doomed-1@tern.test>")));
    // A selection is required.
    assert_eq!(node.ternctl(&["queue", "delete"]).status.code(), Some(1));
}

#[test]
fn bounce_by_the_administrator_sends_a_report() {
    let closed_guard = closed_port();
    let closed = closed_guard.port;
    let sender_mx = SmtpSink::start(&[]);
    let node = Node::start(&format!(
        "[[route]]\ndomain = \"example.test\"\nto = \"127.0.0.1:{closed}\"\n\n[[route]]\ndomain = \"tern.test\"\nto = \"{}\"\n\n[delivery]\nretry_schedule = [\"1h\"]\n",
        sender_mx.addr
    ));
    let id = send(&node, "sender@tern.test", "stuck@example.test", "stuck-1");
    let r = ok(
        &node,
        &["queue", "bounce", "--older-than", "0s", "--domain", "example.test"],
    );
    assert_eq!(r["affected"], 1, "{r}");
    wait_for(Duration::from_secs(30), "the report", || {
        sender_mx.messages().len() == 1
    });
    let dsn = &sender_mx.messages()[0];
    assert!(
        dsn.contains("Action: failed") && dsn.contains("bounced by the administrator"),
        "{dsn}"
    );
    assert!(dsn.contains(&id));
    wait_for(Duration::from_secs(30), "empty queue", || {
        ok(&node, &["queue", "summary"])["messages"] == 0
    });
}

#[test]
fn suspended_domain_waits_until_resumed() {
    let sink = SmtpSink::start(&[]);
    let node = Node::start(&format!(
        "[[route]]\ndomain = \"*\"\nto = \"{}\"\n\n[delivery]\nretry_schedule = [\"1s\"]\n",
        sink.addr
    ));
    let list = ok(
        &node,
        &[
            "domain",
            "suspend",
            "Example.Test",
            "--duration",
            "1h",
            "--reason",
            "abuse desk asked",
        ],
    );
    assert_eq!(list[0]["domain"], "example.test");
    let id = send(&node, "a@tern.test", "r@example.test", "suspended-1");
    send(&node, "a@tern.test", "r@other.test", "other-1");
    wait_for(Duration::from_secs(30), "other domains still flow", || {
        sink.messages().iter().any(|m| m.contains("<other-1@tern.test>"))
    });
    wait_for(Duration::from_secs(30), "a suspended attempt", || {
        attempts(&node, &id) >= 1
    });
    let m = ok(&node, &["queue", "show", &id]);
    assert!(
        m["recipients"][0]["last_reply"].as_str().unwrap().contains("suspended"),
        "{m}"
    );
    assert!(sink.messages().iter().all(|m| !m.contains("<suspended-1@tern.test>")));
    assert_eq!(ok(&node, &["domain", "list"]).as_array().unwrap().len(), 1);
    ok(&node, &["domain", "resume", "example.test"]);
    wait_for(Duration::from_secs(30), "delivery after resume", || {
        sink.messages().iter().any(|m| m.contains("<suspended-1@tern.test>"))
    });
    assert!(ok(&node, &["domain", "list"]).as_array().unwrap().is_empty());
}

#[test]
fn stats_show_outcomes_reasons_and_time_in_queue() {
    let sink = SmtpSink::start(&[]);
    let rejecting = SmtpSink::start(&["-f", "RCPT"]);
    let closed_guard = closed_port();
    let closed = closed_guard.port;
    let node = Node::start(&format!(
        "[[route]]\ndomain = \"example.test\"\nto = \"{}\"\n\n[[route]]\ndomain = \"reject.test\"\nto = \"{}\"\n\n[[route]]\ndomain = \"*\"\nto = \"127.0.0.1:{closed}\"\n\n[delivery]\nretry_schedule = [\"1h\"]\n",
        sink.addr, rejecting.addr
    ));
    for i in 0..3 {
        send(&node, "a@tern.test", "r@example.test", &format!("stats-{i}"));
    }
    send(&node, "<>", "nobody@reject.test", "stats-bounce");
    send(&node, "a@tern.test", "r@later.test", "stats-defer");
    wait_for(Duration::from_secs(30), "all outcomes counted", || {
        let s = ok(&node, &["stats", "--since", "10m"]);
        s["total"]["delivered"].as_u64().unwrap() >= 3
            && s["total"]["bounced"].as_u64().unwrap() >= 1
            && s["total"]["deferred"].as_u64().unwrap() >= 1
    });
    let s = ok(&node, &["stats"]);
    let rows = s["rows"].as_array().unwrap();
    let row = |k: &str| rows.iter().find(|r| r["key"] == k).cloned().unwrap_or_default();
    assert_eq!(row("example.test")["delivered"], 3, "{s}");
    assert_eq!(row("reject.test")["bounced"], 1, "{s}");
    let reasons = s["top_reasons"].as_array().unwrap();
    assert!(
        reasons
            .iter()
            .any(|r| r["kind"] == "deferred" && r["code"].as_str().unwrap().starts_with("451")),
        "{s}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r["kind"] == "bounced" && r["code"].as_str().unwrap().starts_with("5")),
        "{s}"
    );
    assert!(s["time_in_queue_secs"]["p99"].is_u64(), "{s}");
    let by_node = ok(&node, &["stats", "--by", "node"]);
    assert_eq!(by_node["rows"][0]["key"], "node 1");
    let table = node.ternctl(&["stats", "--by", "site"]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("SITE"));
}
