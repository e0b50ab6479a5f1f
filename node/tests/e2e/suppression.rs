//! The suppression list end to end: a hard bounce suppresses the next
//! message to that recipient on every node of a cluster (the peer sees no
//! RCPT for it, a `suppressed` event is logged), and `ternctl suppression`
//! add/list/remove/import/export round trips through CSV, with expired
//! entries not enforced.

use std::time::Duration;

use crate::cluster::three_node_cluster;
use crate::harness::*;
use tern_testkit::peers::{Aiosmtpd, RefusingSink};

fn send(node: &Node, from: &str, to: &[&str], tag: &str) -> String {
    let mut c = Client::connect(node.smtp).unwrap();
    c.command("EHLO sender.test").unwrap();
    c.send_mail(from, to, &body(tag, 256)).unwrap()
}

/// RCPT commands for `address` (any case) in a verbose smtp-sink's log.
fn rcpts(sink: &SmtpSink, address: &str) -> usize {
    let wanted = format!("rcpt to:<{}>", address.to_lowercase());
    sink.peer
        .log()
        .lines()
        .filter(|l| l.to_lowercase().contains(&wanted))
        .count()
}

fn queue_empty(node: &Node) -> bool {
    node.ternctl_json(&["queue", "summary"])["messages"].as_u64() == Some(0)
}

fn has_event(node: &Node, event: &str, rcpt: &str) -> bool {
    node.logs()
        .lines()
        .any(|l| l.contains(&format!("event=\"{event}\"")) && l.contains(rcpt))
}

fn reports(sink: &SmtpSink) -> usize {
    sink.messages()
        .iter()
        .filter(|m| m.contains("multipart/report"))
        .count()
}

#[test]
fn a_hard_bounce_suppresses_the_next_message_on_every_node() {
    if !Aiosmtpd::available() {
        return;
    }
    let _serial = cluster_lock();
    // The recipient's MX answers Postfix's "550 5.1.1 ... User unknown"
    // for gone@ and accepts ok@; reports go to the sender's sink.
    let mx = RefusingSink::start(&["gone@gone.test"]);
    let sink = SmtpSink::start(&[]);
    let extra = format!(
        "shards = 4\n\n[[route]]\ndomain = \"gone.test\"\nto = \"{}\"\n\n[[route]]\ndomain = \"*\"\nto = \"{}\"\n\n\
         [delivery]\nretry_schedule = [\"1s\"]\n",
        mx.peer.addr, sink.addr
    );
    let (n1, n2, n3) = three_node_cluster(&extra);
    send(&n1, "a@tern.test", &["Gone@gone.test"], "hard-1");
    wait_for(Duration::from_secs(60), "the bounce of the first message", || {
        reports(&sink) == 1
    });
    assert_eq!(mx.rcpts(), ["Gone@gone.test"]);
    // The entry is in the control group, seen from every node.
    for node in [&n1, &n2, &n3] {
        wait_for(Duration::from_secs(30), "the automatic entry on every node", || {
            let list = node.ternctl_json(&["suppression", "list"]);
            list["entries"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["address"] == "gone@gone.test" && e["class"] == "invalid_recipient" && e["scope"] == "")
        });
    }
    // The second message, through another node, with a good recipient too.
    send(&n2, "a@tern.test", &["gone@gone.test", "ok@gone.test"], "hard-2");
    wait_for(Duration::from_secs(60), "the good recipient's copy", || {
        mx.messages()
            .iter()
            .any(|m| String::from_utf8_lossy(m).contains("<hard-2@tern.test>"))
    });
    wait_for(Duration::from_secs(30), "a suppressed event", || {
        [&n1, &n2, &n3]
            .iter()
            .any(|n| has_event(n, "suppressed", "gone@gone.test"))
    });
    wait_for(Duration::from_secs(30), "an empty queue", || queue_empty(&n3));
    assert_eq!(
        mx.rcpts(),
        ["Gone@gone.test", "ok@gone.test"],
        "no RCPT for the suppressed recipient"
    );
    // No NOTIFY was given: no report for the suppressed recipient.
    assert_eq!(reports(&sink), 1);
    // The first failure's event carries its class.
    assert!(
        [&n1, &n2, &n3].iter().any(|n| n
            .logs()
            .lines()
            .any(|l| l.contains("event=\"failed\"") && l.contains("class=\"invalid_recipient\""))),
        "no failed event with its class"
    );
    // And ternctl stats counts both by class.
    let stats = n1.ternctl_json(&["stats"]);
    let classes = stats["by_class"].as_array().unwrap();
    assert!(
        classes
            .iter()
            .any(|c| c["class"] == "invalid_recipient" && c["bounced"].as_u64() >= Some(1))
            && classes
                .iter()
                .any(|c| c["class"] == "suppressed" && c["bounced"].as_u64() >= Some(1)),
        "{stats}"
    );
}

/// An operator's `[[bounce_class]]` rule classes a reply the shipped
/// table does not know, and that class suppresses the recipient.
#[test]
fn an_operator_rule_classes_a_reply_and_it_suppresses() {
    // smtp-sink refuses every RCPT with "500 5.3.0 Error: command failed"
    // (`other` in the shipped table).
    let refusing = SmtpSink::start(&["-v", "-f", "RCPT"]);
    let node = Node::start(&format!(
        "[[route]]\ndomain = \"*\"\nto = \"{}\"\n\n\
         [[bounce_class]]\ncode = \"500\"\nmatch = \"command failed\"\nclass = \"inactive\"\n\n\
         [suppression]\nscope = \"sender\"\nexpire_after = \"30d\"\n",
        refusing.addr
    ));
    send(&node, "", &["old@example.test"], "rule-1");
    send(&node, "list@shop.test", &["old@example.test"], "rule-2");
    wait_for(Duration::from_secs(30), "the sender's entry", || {
        let list = node.ternctl_json(&["suppression", "list", "--scope", "shop.test"]);
        list["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["address"] == "old@example.test" && e["class"] == "inactive")
    });
    let list = node.ternctl_json(&["suppression", "list"]);
    assert_eq!(
        list["entries"].as_array().unwrap().len(),
        1,
        "nothing for the null sender's domain: {list}"
    );
    let expires = list["entries"][0]["expires"].as_i64().unwrap() - list["entries"][0]["added"].as_i64().unwrap();
    assert_eq!(expires, 30 * 86400);
    assert!(node.logs().contains("class=\"inactive\""));
}

#[test]
fn ternctl_manages_the_list_and_expired_entries_are_not_enforced() {
    let sink = SmtpSink::start(&["-v"]);
    let node = Node::start(&format!(
        "[[route]]\ndomain = \"*\"\nto = \"{}\"\n\n[delivery]\nretry_schedule = [\"1s\"]\n",
        sink.addr
    ));
    let ok = |args: &[&str]| {
        let out = node.ternctl(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let added = node.ternctl_json(&["suppression", "add", "Stop@Example.test", "--reason", "asked by phone"]);
    assert_eq!(added["affected"], 1, "{added}");
    ok(&[
        "suppression",
        "add",
        "tenant@example.test",
        "--scope",
        "shop.test",
        "--expires",
        "30d",
    ]);
    let dir = tempfile::tempdir().unwrap();
    let import = dir.path().join("in.csv");
    std::fs::write(
        &import,
        "address,scope,class,reason,added,expires\nold@example.test,,complaint,\"lapsed, long ago\",2020-01-01T00:00:00Z,2020-02-01T00:00:00Z\n",
    )
    .unwrap();
    let imported = node.ternctl_json(&["suppression", "import", import.to_str().unwrap()]);
    assert_eq!(imported["affected"], 1, "{imported}");
    // In force: the two added; with --all the lapsed one too.
    let list = node.ternctl_json(&["suppression", "list"]);
    let addresses: Vec<&str> = list["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["address"].as_str().unwrap())
        .collect();
    assert_eq!(addresses, ["stop@example.test", "tenant@example.test"], "{list}");
    let scoped = node.ternctl_json(&["suppression", "list", "--scope", "shop.test"]);
    assert_eq!(scoped["entries"].as_array().unwrap().len(), 1, "{scoped}");
    assert!(scoped["entries"][0]["expires"].as_i64().unwrap() > 0);
    let all = node.ternctl_json(&["suppression", "list", "--all"]);
    assert_eq!(all["entries"].as_array().unwrap().len(), 3, "{all}");

    // Enforcement: the global entry stops mail from any sender, the
    // tenant's only mail from its domain, the lapsed one nothing.
    send(
        &node,
        "a@tern.test",
        &["stop@example.test", "old@example.test", "tenant@example.test"],
        "list-1",
    );
    send(&node, "news@shop.test", &["tenant@example.test"], "list-2");
    wait_for(Duration::from_secs(60), "the first message at the sink", || {
        sink.messages().iter().any(|m| m.contains("<list-1@tern.test>"))
    });
    wait_for(Duration::from_secs(30), "an empty queue", || queue_empty(&node));
    assert_eq!(rcpts(&sink, "stop@example.test"), 0, "{}", sink.peer.log());
    assert_eq!(rcpts(&sink, "old@example.test"), 1, "{}", sink.peer.log());
    assert_eq!(rcpts(&sink, "tenant@example.test"), 1, "{}", sink.peer.log());
    assert!(has_event(&node, "suppressed", "stop@example.test"));
    assert!(!sink.messages().iter().any(|m| m.contains("<list-2@tern.test>")));
    // Counted by class: two suppressed recipients (one per message).
    let (_, metrics) = crate::metrics::get_metrics(node.http, None);
    assert!(
        metrics.lines().any(|l| l.starts_with("tern_delivery_failures_total{")
            && l.contains("class=\"suppressed\"")
            && l.ends_with(" 2")),
        "{metrics}"
    );

    // Export, remove, import the export: the same list.
    let export = dir.path().join("out.csv");
    ok(&["suppression", "export", export.to_str().unwrap()]);
    let csv = std::fs::read_to_string(&export).unwrap();
    assert!(csv.starts_with("address,scope,class,reason,added,expires\n"), "{csv}");
    assert!(csv.contains("stop@example.test,,manual,asked by phone,"), "{csv}");
    assert_eq!(csv.lines().count(), 3, "header and the two in force: {csv}");
    ok(&["suppression", "remove", "stop@example.test"]);
    let out = node.ternctl(&["suppression", "remove", "stop@example.test"]);
    assert_eq!(out.status.code(), Some(3), "removing an absent entry is not found");
    let after = node.ternctl_json(&["suppression", "list"]);
    assert_eq!(after["entries"].as_array().unwrap().len(), 1, "{after}");
    ok(&["suppression", "import", export.to_str().unwrap()]);
    let back = node.ternctl_json(&["suppression", "list"]);
    assert_eq!(back["entries"], list["entries"], "the export imports back as it was");
    // stdout export, and a bad file refused with its line.
    assert_eq!(ok(&["suppression", "export"]), csv);
    let bad = dir.path().join("bad.csv");
    std::fs::write(&bad, "a@example.test\nnot an address\n").unwrap();
    let out = node.ternctl(&["suppression", "import", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 2: address"), "{err}");
    let out = node.ternctl(&["suppression", "add", "no-at-sign"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("not a recipient address"));
    // Changes are audited.
    assert!(node
        .logs()
        .lines()
        .any(|l| l.contains("event=\"admin\"") && l.contains("suppression remove")));
}
