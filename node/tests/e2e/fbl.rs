//! Feedback loops end to end: ARF reports (the samples in fbl/, written
//! the way Yahoo, Microsoft's JMRP and AOL send them) mailed to a node's
//! `[fbl]` address become a `complaint` event and a suppression entry in
//! the control group, on every node; reports that say nothing usable are
//! still answered 250 and counted.

use std::time::Duration;

use crate::harness::*;
use crate::metrics::get_metrics;

/// The policy and `[fbl]` tables of the tests' nodes (`fbl` adds keys).
fn fbl_config(fbl: &str) -> String {
    format!("[log]\nformat = \"json\"\n\n[policy]\nlocal_domains = [\"tern.test\"]\n\n[fbl]\naddresses = [\"fbl@tern.test\"]\n{fbl}\n")
}

fn sample(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/e2e/fbl")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Sends a report as a provider's robot does (null reverse-path); returns the reply to the data.
fn send_report(node: &Node, to: &[&str], report: &str) -> String {
    let mut c = Client::connect(node.smtp).unwrap();
    c.command("EHLO feedback.provider.example").unwrap();
    assert!(c.command("MAIL FROM:<>").unwrap().starts_with("250"));
    for rcpt in to {
        let reply = c.command(&format!("RCPT TO:<{rcpt}>")).unwrap();
        assert!(reply.starts_with("250"), "RCPT {rcpt}: {reply}");
    }
    assert!(c.command("DATA").unwrap().starts_with("354"));
    c.send_raw(report.as_bytes()).unwrap();
    c.command(".").unwrap()
}

/// The `fields` of every `complaint` event in the node's log so far.
fn complaints(node: &Node) -> Vec<serde_json::Value> {
    node.logs()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["target"] == "tern::event" && l["fields"]["event"] == "complaint")
        .map(|l| l["fields"].clone())
        .collect()
}

/// Waits for a `complaint` event about `rcpt` whose `suppression` is `suppression`.
#[track_caller]
fn complaint(node: &Node, rcpt: &str, suppression: &str) -> serde_json::Value {
    let mut found = None;
    wait_for(
        Duration::from_secs(15),
        &format!("complaint about {rcpt:?} ({suppression})"),
        || {
            found = complaints(node)
                .into_iter()
                .find(|e| e["rcpt"] == rcpt && e["suppression"] == suppression);
            found.is_some()
        },
    );
    found.expect("event")
}

/// The value of one sample in the node's /metrics (classic text), 0 if absent.
fn metric(node: &Node, sample: &str) -> f64 {
    let (_, text) = get_metrics(node.http, None);
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// An ARF report (Yahoo's layout) around `original`, the message as the provider received it.
fn report_about(original: &str, rcpt: &str) -> String {
    format!(
        "From: Yahoo! Mail AntiSpam Feedback <feedback@arf.mail.yahoo.example>\r\n\
         To: fbl@tern.test\r\n\
         Subject: FW: complaint\r\n\
         Message-ID: <report-1@arf.mail.yahoo.example>\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=feedback-report; boundary=\"arf\"\r\n\
         \r\n\
         --arf\r\n\
         Content-Type: text/plain\r\n\
         \r\n\
         This is an email abuse report.\r\n\
         \r\n\
         --arf\r\n\
         Content-Type: message/feedback-report\r\n\
         \r\n\
         Feedback-Type: abuse\r\n\
         User-Agent: Yahoo!-Mail-Feedback/2.0\r\n\
         Version: 1\r\n\
         Original-Mail-From: <news@shop.test>\r\n\
         Original-Rcpt-To: <{rcpt}>\r\n\
         Arrival-Date: Mon, 07 Dec 2026 06:00:00 +0000\r\n\
         Source-IP: 127.0.0.1\r\n\
         \r\n\
         --arf\r\n\
         Content-Type: message/rfc822\r\n\
         \r\n\
         Received: from 127.0.0.1 by mta1.yahoo.example with SMTP; Mon, 07 Dec 2026 06:00:00 +0000\r\n\
         {original}\r\n\
         --arf--\r\n"
    )
}

/// The message smtp-sink received, without the `X-*-Args`/`X-Client-*` lines it puts first.
fn as_received(dump: &str) -> String {
    let start = dump.find("Received:").expect("a Received field");
    dump[start..].replace("\r\n", "\n").replace('\n', "\r\n")
}

#[test]
fn a_report_about_mail_we_sent_suppresses_its_recipient() {
    let sink = SmtpSink::start(&[]);
    let node = Node::start(&format!(
        "[[route]]\ndomain = \"*\"\nto = \"{}\"\n\n{}",
        sink.addr,
        fbl_config("")
    ));
    // The newsletter the recipient complains about, sent through the node.
    let mut c = Client::connect(node.smtp).unwrap();
    c.command("EHLO app1.shop.test").unwrap();
    let queue_id = c
        .send_mail("news@shop.test", &["complainer@yahoo.example"], &body("weekly-49", 400))
        .unwrap();
    let mut dumped = Vec::new();
    wait_for(Duration::from_secs(30), "the newsletter at the sink", || {
        dumped = sink.messages();
        dumped.iter().any(|m| m.contains("weekly-49@tern.test"))
    });
    let original = as_received(&dumped[0]);
    wait_for(Duration::from_secs(30), "the newsletter out of the queue", || {
        node.ternctl_json(&["queue", "summary"])["messages"] == 0
    });
    assert!(
        original.contains(&format!("(Tern) with ESMTP id {queue_id}")),
        "{original}"
    );

    let reply = send_report(
        &node,
        &["fbl@tern.test"],
        &report_about(&original, "complainer@yahoo.example"),
    );
    assert!(reply.starts_with("250"), "{reply}");
    let event = complaint(&node, "complainer@yahoo.example", "added");
    assert_eq!(event["msg_id"], queue_id.as_str(), "{event}");
    assert_eq!(event["message_id"], "weekly-49@tern.test", "{event}");
    assert_eq!(event["feedback_type"], "abuse", "{event}");
    assert_eq!(event["from"], "news@shop.test", "{event}");
    assert_eq!(event["source_ip"], "127.0.0.1", "{event}");
    assert_eq!(event["reporter"], "feedback@arf.mail.yahoo.example", "{event}");
    assert_eq!(event["scope"], "", "global by default: {event}");
    assert_eq!(event["node"], 1, "{event}");
    // The entry is in the control group's list, and the report was consumed, not queued.
    assert_eq!(metric(&node, "tern_suppressions{class=\"complaint\"}"), 1.0);
    assert_eq!(metric(&node, "tern_fbl_reports_total{result=\"complaint\"}"), 1.0);
    assert_eq!(node.ternctl_json(&["queue", "summary"])["messages"], 0);
    assert_eq!(sink.messages().len(), 1, "only the newsletter reached the sink");

    // The same recipient reported again (Yahoo's own sample): already suppressed, nothing new written.
    let reply = send_report(&node, &["fbl@tern.test"], &sample("yahoo.eml"));
    assert!(reply.starts_with("250"), "{reply}");
    let event = complaint(&node, "complainer@yahoo.example", "existing");
    assert_eq!(event["msg_id"], "19AF5E2C1A80001000A3B", "{event}");
    assert_eq!(event["message_id"], "weekly-2026-49.a81f@news.shop.test", "{event}");
    assert_eq!(metric(&node, "tern_suppressions{class=\"complaint\"}"), 1.0);
    assert_eq!(metric(&node, "tern_fbl_reports_total{result=\"complaint\"}"), 2.0);
}

#[test]
fn unusable_reports_are_answered_250_and_counted() {
    let sink = SmtpSink::start(&[]);
    let node = Node::start(&format!(
        "[[route]]\ndomain = \"*\"\nto = \"{}\"\n\n{}",
        sink.addr,
        fbl_config(
            "scope = \"sender\"\nexpire_after = \"30d\"\nreporters = [\"mail.example\", \"aol.example\", \"isp.example\"]\n"
        )
    ));
    // Not ARF at all (a forwarded message with a note): 250, counted, nothing suppressed.
    let reply = send_report(&node, &["fbl@tern.test"], &sample("malformed.eml"));
    assert!(reply.starts_with("250"), "{reply}");
    // A report cut short in its feedback part, and one that is not MIME.
    let yahoo = sample("yahoo.eml");
    let cut = &yahoo[..yahoo.find("Feedback-Type").unwrap()];
    assert!(send_report(&node, &["fbl@tern.test"], cut).starts_with("250"));
    assert!(send_report(&node, &["fbl@tern.test"], "Subject: spam!\r\n\r\nyou sent me spam\r\n").starts_with("250"));
    wait_for(Duration::from_secs(10), "three malformed reports counted", || {
        metric(&node, "tern_fbl_reports_total{result=\"malformed\"}") == 3.0
    });

    // Recipient redacted everywhere: a complaint event about the message, no suppression.
    assert!(send_report(&node, &["fbl@tern.test"], &sample("redacted-none.eml")).starts_with("250"));
    let event = complaint(&node, "", "no_recipient");
    assert_eq!(event["msg_id"], "19AF5E2F00A0001000E01", "{event}");
    assert_eq!(metric(&node, "tern_fbl_reports_total{result=\"no_recipient\"}"), 1.0);

    // Original-Rcpt-To redacted, the original's To names one address: that one,
    // on the list of the original sender's domain (scope = "sender").
    assert!(send_report(&node, &["fbl@tern.test"], &sample("redacted-to.eml")).starts_with("250"));
    let event = complaint(&node, "reader@mail.example", "added");
    assert_eq!(event["scope"], "news.shop.test", "{event}");
    assert_eq!(event["msg_id"], "19AF5E2F11B0001000E44", "{event}");

    // A report also addressed to an archive: consumed for fbl@, delivered to the archive.
    let reply = send_report(
        &node,
        &["fbl@tern.test", "archive@example.test"],
        &sample("aol-headers.eml"),
    );
    assert!(reply.starts_with("250"), "{reply}");
    let event = complaint(&node, "buyer@aol.example", "added");
    assert_eq!(event["msg_id"], "19AF5E2E77F0003000D20", "{event}");
    assert_eq!(event["reporter"], "scomp@aol.example", "{event}");
    let dumps = sink.wait_dumps(1);
    assert!(dumps[0].contains("X-Rcpt-Args: <archive@example.test>"), "{}", dumps[0]);
    assert!(!dumps[0].contains("X-Rcpt-Args: <fbl@tern.test>"), "{}", dumps[0]);
    assert_eq!(metric(&node, "tern_suppressions{class=\"complaint\"}"), 2.0);

    // A well-formed report from a reporter not in fbl.reporters: 250, counted, not acted on.
    assert!(send_report(&node, &["fbl@tern.test"], &sample("microsoft-jmrp.eml")).starts_with("250"));
    wait_for(Duration::from_secs(10), "the untrusted report counted", || {
        metric(&node, "tern_fbl_reports_total{result=\"untrusted\"}") == 1.0
    });
    assert!(complaints(&node).iter().all(|e| e["rcpt"] != "someone@outlook.example"));
    assert_eq!(metric(&node, "tern_suppressions{class=\"complaint\"}"), 2.0);
    assert!(!node.logs().contains("panicked"), "{}", node.logs());
}

#[test]
fn keep_delivers_the_report_after_recording_it() {
    let maildirs = tempfile::tempdir().unwrap();
    let node = Node::start(&format!(
        "{}\n[local]\nmaildir = \"{}/{{domain}}/{{user}}\"\n",
        fbl_config("keep = true\n"),
        maildirs.path().display()
    ));
    let reply = send_report(&node, &["fbl@tern.test"], &sample("yahoo.eml"));
    assert!(reply.starts_with("250"), "{reply}");
    complaint(&node, "complainer@yahoo.example", "added");
    // The abuse desk's mailbox gets the report itself.
    let new = maildirs.path().join("tern.test/fbl/new");
    let mut files = Vec::new();
    wait_for(Duration::from_secs(30), "the report in the fbl mailbox", || {
        files = std::fs::read_dir(&new)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        !files.is_empty()
    });
    let kept = std::fs::read_to_string(&files[0]).unwrap();
    assert!(kept.contains("Feedback-Type: abuse"), "{kept}");
}

#[test]
fn a_report_to_one_node_suppresses_on_every_node() {
    let _serial = crate::harness::cluster_lock();
    let extra = format!("{}{}", hold_mail(), fbl_config(""));
    let n1 = Node::cluster_node(1, true, &extra);
    let n2 = Node::cluster_node(2, false, &extra);
    let n3 = Node::cluster_node(3, false, &extra);
    crate::cluster::join(&n1, &n2, 2);
    crate::cluster::join(&n1, &n3, 3);
    wait_for(Duration::from_secs(90), "three voters in the control group", || {
        let members = n1.ternctl_json(&["member", "list"]);
        members
            .as_array()
            .is_some_and(|m| m.len() == 3 && m.iter().all(|m| m["role"] == "voter"))
    });

    let reply = send_report(&n2, &["fbl@tern.test"], &sample("microsoft-jmrp.eml"));
    assert!(reply.starts_with("250"), "{reply}");
    let event = complaint(&n2, "someone@outlook.example", "added");
    assert_eq!(event["msg_id"], "19AF5E2D0B10002000C11", "{event}");
    assert_eq!(event["node"], 2, "{event}");
    for node in [&n1, &n2, &n3] {
        wait_for(Duration::from_secs(15), "the suppression on every replica", || {
            metric(node, "tern_suppressions{class=\"complaint\"}") == 1.0
        });
    }
    // Node 3 already holds the entry: the same report there writes nothing.
    assert!(send_report(&n3, &["fbl@tern.test"], &sample("microsoft-jmrp.eml")).starts_with("250"));
    complaint(&n3, "someone@outlook.example", "existing");

    // Without a majority the suppression cannot be committed: 451, so the provider sends it again.
    let (mut n1, mut n3) = (n1, n3);
    n1.kill();
    n3.kill();
    let reply = send_report(&n2, &["fbl@tern.test"], &sample("redacted-to.eml"));
    assert!(reply.starts_with("451"), "{reply}");
    assert_eq!(metric(&n2, "tern_fbl_reports_total{result=\"failed\"}"), 1.0);
    assert!(complaints(&n2).iter().all(|e| e["rcpt"] != "reader@mail.example"));
}
