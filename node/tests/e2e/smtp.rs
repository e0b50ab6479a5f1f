//! The SMTP server end to end, driven by real clients: swaks, Python's
//! smtplib, Postfix's smtp-source, and raw bytes where the case needs it.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::*;

fn swaks(node: &Node, extra: &[&str]) -> std::process::Output {
    Command::new("swaks")
        .args(["--server", &node.smtp.to_string(), "--timeout", "30"])
        .args(extra)
        .output()
        .expect("swaks is installed by cluster-tests/run-all.sh")
}

fn python(script: &str) -> std::process::Output {
    Command::new("python3").args(["-c", script]).output().expect("python3")
}

fn queue_id(transcript: &str) -> String {
    let line = transcript
        .lines()
        .rev()
        .find(|l| l.contains("queued as"))
        .unwrap_or_else(|| panic!("no queue id in:\n{transcript}"));
    line.rsplit(' ').next().unwrap().trim().to_owned()
}

fn show(node: &Node, id: &str) -> serde_json::Value {
    node.ternctl_json(&["queue", "show", id, "--body"])
}

#[test]
fn swaks_message_is_queued_with_envelope_and_received_header() {
    let node = Node::start(&hold_mail());
    let out = swaks(
        &node,
        &[
            "--from",
            "alice@tern.test",
            "--to",
            "bob@example.test",
            "--ehlo",
            "client.test",
            "--header",
            "Subject: hello",
        ],
    );
    let transcript = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{transcript}");
    assert!(transcript.contains("PIPELINING") && transcript.contains("CHUNKING") && transcript.contains("DSN"));
    assert!(
        !transcript.contains("STARTTLS"),
        "STARTTLS offered without a certificate"
    );
    let id = queue_id(&transcript);
    let m = show(&node, &id);
    assert_eq!(m["reverse_path"], "alice@tern.test");
    assert_eq!(m["recipients"][0]["address"], "bob@example.test");
    assert!(m["recipients"][0]["status"] == "queued" || m["recipients"][0]["status"] == "deferred");
    assert_eq!(m["helo"], "client.test");
    assert_eq!(m["client_ip"], "127.0.0.1");
    let body = m["body"].as_str().unwrap();
    assert!(body.starts_with("Received: from client.test"), "{body}");
    assert!(body.contains("by mx1.tern.test") && body.contains(&id), "{body}");
    assert!(body.contains("Subject: hello"));
    assert_eq!(m["size"].as_u64().unwrap(), body.len() as u64);
    let summary = node.ternctl_json(&["queue", "summary"]);
    assert_eq!(summary["messages"], 1);
    assert_eq!(summary["domains"]["example.test"], 1);
}

#[test]
fn pipelined_transactions_from_swaks_and_raw_bytes() {
    let node = Node::start(&hold_mail());
    let out = swaks(
        &node,
        &[
            "--pipeline",
            "--from",
            "a@tern.test",
            "--to",
            "b@example.test,c@example.org",
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));

    // Two whole transactions in one write; every reply must come back in order.
    let mut c = Client::connect(node.smtp).unwrap();
    c.command("EHLO raw.test").unwrap();
    c.send_raw(b"MAIL FROM:<x@tern.test>\r\nRCPT TO:<y@example.net>\r\nRCPT TO:<z@example.net>\r\nDATA\r\n")
        .unwrap();
    assert!(c.read_reply().unwrap().starts_with("250 2.1.0"));
    assert!(c.read_reply().unwrap().starts_with("250 2.1.5"));
    assert!(c.read_reply().unwrap().starts_with("250 2.1.5"));
    assert!(c.read_reply().unwrap().starts_with("354"));
    c.send_raw(b"Subject: one\r\n\r\nbody\r\n.\r\nMAIL FROM:<>\r\nRCPT TO:<y@example.net>\r\nDATA\r\n")
        .unwrap();
    assert!(c.read_reply().unwrap().starts_with("250 2.0.0"));
    assert!(c.read_reply().unwrap().starts_with("250 2.1.0"));
    assert!(c.read_reply().unwrap().starts_with("250 2.1.5"));
    assert!(c.read_reply().unwrap().starts_with("354"));
    c.send_raw(b"Subject: two\r\n\r\n..dot-stuffed line\r\n.\r\nQUIT\r\n")
        .unwrap();
    let id = c.read_reply().unwrap().rsplit(' ').next().unwrap().to_owned();
    assert!(c.read_reply().unwrap().starts_with("221"));
    let m = show(&node, &id);
    assert_eq!(m["reverse_path"], "");
    assert!(m["body"].as_str().unwrap().contains("\r\n.dot-stuffed line\r\n"));
    assert_eq!(node.ternctl_json(&["queue", "summary"])["messages"], 3);
    assert_eq!(
        node.ternctl_json(&["queue", "list", "--domain", "example.net"])["messages"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn dsn_parameters_and_smtputf8_are_stored_with_the_envelope() {
    let node = Node::start(&hold_mail());
    let script = format!(
        r#"
import smtplib
s = smtplib.SMTP("127.0.0.1", {port}, timeout=30)
s.ehlo("py.test")
assert s.has_extn("dsn") and s.has_extn("smtputf8") and s.has_extn("8bitmime")
r = s.sendmail("dsn@tern.test", ["rcpt@example.test"], b"Subject: dsn\r\n\r\nhi\r\n",
    mail_options=["RET=HDRS", "ENVID=env+2Bid", "BODY=8BITMIME"],
    rcpt_options=["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;orig+2Brcpt@example.test"])
assert r == {{}}, r
s.sendmail("j\u00f6rg@tern.test", ["m\u00fcller@b\u00fccher.example"], "Subject: utf8\r\n\r\nGr\u00fc\u00dfe\r\n".encode(),
    mail_options=["SMTPUTF8", "BODY=8BITMIME"])
s.quit()
"#,
        port = node.smtp.port()
    );
    let out = python(&script);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let list = node.ternctl_json(&["queue", "list"]);
    let msgs = list["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 2);
    let dsn = msgs.iter().find(|m| m["reverse_path"] == "dsn@tern.test").unwrap();
    assert_eq!(dsn["ret"], "HDRS");
    assert_eq!(dsn["envid"], "env+id");
    assert_eq!(dsn["body_type"], "EightBitMime");
    assert_eq!(dsn["recipients"][0]["notify"], "SUCCESS,FAILURE");
    assert_eq!(dsn["recipients"][0]["orcpt"], "rfc822;orig+rcpt@example.test");
    let utf8 = msgs.iter().find(|m| m["reverse_path"] == "jörg@tern.test").unwrap();
    assert_eq!(utf8["smtputf8"], true);
    assert_eq!(utf8["recipients"][0]["address"], "müller@bücher.example");
}

#[test]
fn bdat_chunks_make_one_message() {
    let node = Node::start(&hold_mail());
    let mut c = Client::connect(node.smtp).unwrap();
    c.command("EHLO bdat.test").unwrap();
    c.command("MAIL FROM:<b@tern.test> BODY=BINARYMIME").unwrap();
    c.command("RCPT TO:<r@example.test>").unwrap();
    let part1 = b"Subject: bdat\r\n\r\nfirst chunk\r\n.\r\n";
    let part2 = b"second chunk, with a bare\nLF that BDAT carries as is\r\n";
    c.send_raw(format!("BDAT {}\r\n", part1.len()).as_bytes()).unwrap();
    c.send_raw(part1).unwrap();
    assert!(c.read_reply().unwrap().starts_with("250"));
    // Pipelined: command and chunk in one write.
    let mut both = format!("BDAT {} LAST\r\n", part2.len()).into_bytes();
    both.extend_from_slice(part2);
    c.send_raw(&both).unwrap();
    let reply = c.read_reply().unwrap();
    assert!(reply.starts_with("250 2.0.0"), "{reply}");
    let id = reply.rsplit(' ').next().unwrap();
    let body = show(&node, id)["body"].as_str().unwrap().to_owned();
    assert!(body.ends_with(
        "Subject: bdat\r\n\r\nfirst chunk\r\n.\r\nsecond chunk, with a bare\nLF that BDAT carries as is\r\n"
    ));
    assert_eq!(c.command("NOOP").unwrap().get(..3), Some("250"));
}

/// SMTP smuggling: no variant of a fake end-of-data marker may split one
/// message into two; such a message is rejected whole.
#[test]
fn smuggling_variants_never_split_a_message() {
    let node = Node::start(&hold_mail());
    let variants: [&[u8]; 7] = [
        b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\r", b"\r.\r\n", b"\r\n.\n", b"\n.\r",
    ];
    for (i, marker) in variants.iter().enumerate() {
        let mut c = Client::connect(node.smtp).unwrap();
        c.command("EHLO smuggler.test").unwrap();
        c.command("MAIL FROM:<a@tern.test>").unwrap();
        c.command("RCPT TO:<b@example.test>").unwrap();
        assert!(c.command("DATA").unwrap().starts_with("354"));
        let mut data = b"Subject: outer\r\n\r\nhello".to_vec();
        data.extend_from_slice(marker);
        data.extend_from_slice(b"MAIL FROM:<admin@tern.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\nSubject: smuggled\r\n\r\nevil\r\n.\r\n");
        c.send_raw(&data).unwrap();
        let reply = c.read_reply().unwrap();
        assert!(reply.starts_with("550 5.6.0"), "variant {i}: {reply}");
        // The session stays in sync: the next command gets its own reply.
        assert!(c.command("NOOP").unwrap().starts_with("250"), "variant {i}");
    }
    assert_eq!(node.ternctl_json(&["queue", "summary"])["messages"], 0);
}

#[test]
fn limits_get_precise_replies() {
    let node = Node::start(&format!(
        "{}[policy]\nmax_message_size = 4096\nmax_recipients = 100\n",
        hold_mail()
    ));
    let mut c = Client::connect(node.smtp).unwrap();
    let ehlo = c.command("EHLO limits.test").unwrap();
    assert!(ehlo.contains("SIZE 4096"), "{ehlo}");
    // Command line over 512 octets.
    let long = format!("NOOP {}", "x".repeat(600));
    assert!(c.command(&long).unwrap().starts_with("500 5.5.2"));
    // Path over 256 octets (short local part, five 60-octet labels), and a
    // local part over 64.
    let domain = vec!["d".repeat(60); 5].join(".");
    let r = c.command(&format!("MAIL FROM:<a@{domain}>")).unwrap();
    assert!(r.starts_with("501 5.1.7 Path too long"), "{r}");
    let r = c.command(&format!("MAIL FROM:<{}@tern.test>", "a".repeat(65))).unwrap();
    assert!(r.starts_with("501 5.1.7 Local part too long"), "{r}");
    // SIZE declared over the limit.
    assert!(c
        .command("MAIL FROM:<a@tern.test> SIZE=5000")
        .unwrap()
        .starts_with("552 5.3.4"));
    assert!(c
        .command("MAIL FROM:<a@tern.test> SIZE=100")
        .unwrap()
        .starts_with("250"));
    for i in 0..100 {
        assert!(c
            .command(&format!("RCPT TO:<r{i}@example.test>"))
            .unwrap()
            .starts_with("250"));
    }
    assert!(c
        .command("RCPT TO:<r100@example.test>")
        .unwrap()
        .starts_with("452 4.5.3"));
    assert!(c.command("DATA").unwrap().starts_with("354"));
    // More than declared and more than the limit: rejected at the end, session in sync.
    c.send_raw(body("big", 6000).as_bytes()).unwrap();
    assert!(c.command(".").unwrap().starts_with("552 5.3.4"));
    assert!(c.command("RSET").unwrap().starts_with("250"));
    // A text line over 1000 octets.
    c.command("MAIL FROM:<a@tern.test>").unwrap();
    c.command("RCPT TO:<b@example.test>").unwrap();
    c.command("DATA").unwrap();
    c.send_raw(format!("Subject: long\r\n\r\n{}\r\n", "y".repeat(1200)).as_bytes())
        .unwrap();
    let r = c.command(".").unwrap();
    assert!(r.starts_with("550 5.6.0 Message line too long"), "{r}");
    assert!(c.command("NOOP").unwrap().starts_with("250"));
    // A recipient path over 256 octets.
    c.command("MAIL FROM:<a@tern.test>").unwrap();
    let r = c.command(&format!("RCPT TO:<b@{domain}>")).unwrap();
    assert!(r.starts_with("501 5.1.3 Path too long"), "{r}");
    assert_eq!(node.ternctl_json(&["queue", "summary"])["messages"], 0);
}

#[test]
fn relay_is_denied_outside_relay_networks() {
    let node = Node::start(&format!("{}[policy]\nrelay_networks = [\"192.0.2.0/24\"]\nlocal_domains = [\"tern.test\"]\nrelay_domains = [\"relay.test\"]\n", hold_mail()));
    let mut c = Client::connect(node.smtp).unwrap();
    c.command("EHLO outside.test").unwrap();
    c.command("MAIL FROM:<someone@elsewhere.test>").unwrap();
    assert!(c.command("RCPT TO:<user@tern.test>").unwrap().starts_with("250"));
    assert!(c.command("RCPT TO:<user@Relay.Test>").unwrap().starts_with("250"));
    let denied = c.command("RCPT TO:<victim@example.com>").unwrap();
    assert!(denied.starts_with("554 5.7.1"), "{denied}");
    // swaks sees the refusal too (exit code 24: all recipients rejected).
    let out = swaks(&node, &["--from", "a@elsewhere.test", "--to", "victim@example.com"]);
    assert_eq!(out.status.code(), Some(24), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn idle_session_times_out_and_error_cap_closes() {
    let node = Node::start(&format!(
        "{}[smtp]\ncommand_timeout_secs = 1\nmax_errors = 3\n",
        hold_mail()
    ));
    let started = Instant::now();
    let mut c = Client::connect(node.smtp).unwrap();
    let rest = c.read_to_end();
    assert!(rest.starts_with("421 4.4.2"), "{rest}");
    assert!(started.elapsed() < Duration::from_secs(20));

    let mut c = Client::connect(node.smtp).unwrap();
    for _ in 0..3 {
        c.send_raw(b"BOGUS\r\n").unwrap();
    }
    let all = c.read_to_end();
    assert!(all.contains("421 4.7.0"), "{all}");
}

#[test]
fn starttls_with_swaks_and_no_readvertising_inside_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let ok = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=mx.tern.test",
            "-days",
            "1",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let node = Node::start(&format!(
        "{}[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        hold_mail(),
        cert.display(),
        key.display()
    ));
    let out = swaks(&node, &["--tls", "--from", "t@tern.test", "--to", "r@example.test"]);
    let transcript = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{transcript}");
    let after_tls = &transcript[transcript.find("TLS started").expect("TLS started")..];
    let second_ehlo = &after_tls[after_tls.find("EHLO").unwrap()..after_tls.find("MAIL FROM").unwrap()];
    assert!(!second_ehlo.contains("STARTTLS"), "{second_ehlo}");
    let id = queue_id(&transcript);
    let body = show(&node, &id)["body"].as_str().unwrap().to_owned();
    assert!(body.contains("with ESMTPS") && body.contains("TLS"), "{body}");
}

#[test]
fn smtp_source_burst_is_all_queued() {
    use crate::metrics::{scrape, sum};
    let node = Node::start(&hold_mail());
    let before = scrape(&node);
    let out = Command::new("smtp-source")
        .args([
            "-s",
            "10",
            "-m",
            "300",
            "-l",
            "2048",
            "-f",
            "load@tern.test",
            "-t",
            "sink@example.test",
        ])
        .arg(node.smtp.to_string())
        .output()
        .expect("smtp-source is installed by cluster-tests/run-all.sh");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary = node.ternctl_json(&["queue", "summary"]);
    assert_eq!(summary["messages"], 300);
    assert_eq!(summary["domains"]["example.test"], 300);
    // Every message went through the write-ahead log's commit (how many
    // share an fsync is a timing figure: bench/run reports it as
    // `group_commit`, bench/README.md).
    let after = scrape(&node);
    let delta = |name: &str| sum(&after, name, &[]) - sum(&before, name, &[]);
    let completions = delta("tern_storage_commit_batch_size_sum");
    assert!(completions >= 300.0, "{completions}");
}

#[test]
fn sigterm_tells_open_sessions_421() {
    let mut node = Node::start(&hold_mail());
    let mut c = Client::connect(node.smtp).unwrap();
    c.command("EHLO waiting.test").unwrap();
    let status = node.signal_and_wait("TERM", Duration::from_secs(30));
    assert_eq!(status.code(), Some(0));
    let rest = c.read_to_end();
    assert!(rest.starts_with("421 4.3.2"), "{rest:?}");
}
