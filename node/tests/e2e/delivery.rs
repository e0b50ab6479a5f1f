//! Delivery end to end: routes and MX lookup (real dnsmasq) to real
//! smtp-sink peers, retries, bounces parsed by Python's email package,
//! and delivery that survives kill -9.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::harness::*;
use tern_testkit::dns::DnsServer;

fn queue_len(node: &Node) -> u64 {
    node.ternctl_json(&["queue", "summary"])["messages"].as_u64().unwrap()
}

fn send(node: &Node, from: &str, to: &[&str], tag: &str) -> String {
    let mut c = Client::connect(node.smtp).unwrap();
    c.command("EHLO sender.test").unwrap();
    c.send_mail(from, to, &body(tag, 512)).unwrap()
}

#[test]
fn route_delivers_to_smtp_sink_and_empties_the_queue() {
    let sink = SmtpSink::start(&[]);
    let node = Node::start(&format!("[[route]]\ndomain = \"*\"\nto = \"{}\"\n", sink.addr));
    for i in 0..20 {
        send(
            &node,
            "a@tern.test",
            &["b@example.test", "c@example.test"],
            &format!("route-{i}"),
        );
    }
    wait_for(Duration::from_secs(60), "20 messages at the sink", || {
        sink.messages().len() >= 20
    });
    wait_for(Duration::from_secs(30), "empty queue", || queue_len(&node) == 0);
    let msgs = sink.messages();
    assert_eq!(msgs.len(), 20, "one transaction per message, both recipients in it");
    for i in 0..20 {
        let id = format!("<route-{i}@tern.test>");
        assert_eq!(msgs.iter().filter(|m| m.contains(&id)).count(), 1, "{id}");
    }
    assert!(msgs
        .iter()
        .all(|m| m.contains("b@example.test") && m.contains("c@example.test")));
}

#[test]
fn mx_lookup_through_dnsmasq_picks_the_preferred_host() {
    let sink = SmtpSink::start(&[]);
    // The preferred MX is 127.0.0.1 (where the sink is); the backup points nowhere.
    let dns = DnsServer::start(
        "mx-host=example.test,mx1.example.test,10\nmx-host=example.test,mx2.example.test,20\nhost-record=mx1.example.test,127.0.0.1\nhost-record=mx2.example.test,127.0.0.2\nmx-host=nullmx.test,.,0\n",
    );
    let node = Node::start(&format!(
        "[dns]\nnameservers = [\"{}\"]\n\n[delivery]\nsmtp_port = {}\n",
        dns.addr,
        sink.addr.port()
    ));
    send(&node, "a@tern.test", &["rcpt@example.test"], "mx-1");
    wait_for(Duration::from_secs(60), "message at the MX", || {
        sink.messages().len() == 1
    });
    assert!(sink.messages()[0].contains("<mx-1@tern.test>"));
    wait_for(Duration::from_secs(30), "empty queue", || queue_len(&node) == 0);
}

#[test]
fn deferred_then_delivered_when_the_peer_comes_back() {
    let port = free_port();
    let node = Node::start(&format!(
        "[[route]]\ndomain = \"*\"\nto = \"127.0.0.1:{port}\"\n\n[delivery]\nretry_schedule = [\"1s\"]\n"
    ));
    let id = send(&node, "a@tern.test", &["later@example.test"], "defer-1");
    wait_for(Duration::from_secs(30), "a deferral", || {
        let m = node.ternctl_json(&["queue", "show", &id]);
        m["attempts"].as_u64().unwrap() >= 1 && m["recipients"][0]["status"] == "deferred"
    });
    let m = node.ternctl_json(&["queue", "show", &id]);
    assert!(
        m["recipients"][0]["last_reply"].as_str().unwrap().starts_with("451"),
        "{m}"
    );
    let sink = SmtpSink::start_on(port, &[]);
    wait_for(Duration::from_secs(60), "delivery after retry", || {
        sink.messages().len() == 1
    });
    wait_for(Duration::from_secs(30), "empty queue", || queue_len(&node) == 0);
}

#[test]
fn permanent_failure_bounces_with_an_rfc3464_report() {
    let rejecting = SmtpSink::start(&["-f", "RCPT"]);
    let sender_mx = SmtpSink::start(&[]);
    let node = Node::start(&format!(
        "[[route]]\ndomain = \"example.test\"\nto = \"{}\"\n\n[[route]]\ndomain = \"tern.test\"\nto = \"{}\"\n",
        rejecting.addr, sender_mx.addr
    ));
    let id = send(&node, "sender@tern.test", &["nobody@example.test"], "bounce-1");
    wait_for(Duration::from_secs(60), "the bounce", || {
        sender_mx.messages().len() == 1
    });
    wait_for(Duration::from_secs(30), "empty queue", || queue_len(&node) == 0);
    let dump = &sender_mx.messages()[0];
    // The dump starts with smtp-sink's envelope lines; the message follows them.
    let start = dump.find("Received:").expect("message in dump");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dsn.eml");
    std::fs::write(&path, &dump[start..]).unwrap();
    let script = format!(
        r#"
import email, email.policy, sys
m = email.message_from_binary_file(open({path:?}, "rb"), policy=email.policy.default)
assert m.get_content_type() == "multipart/report", m.get_content_type()
assert m.get_param("report-type") == "delivery-status"
parts = list(m.iter_parts())
assert parts[1].get_content_type() == "message/delivery-status"
groups = parts[1].get_payload()
per_msg, rcpt = groups[0], groups[1]
assert "dns;" in per_msg["Reporting-MTA"], per_msg["Reporting-MTA"]
assert per_msg["X-Tern-Queue-ID"] == {id:?}, per_msg["X-Tern-Queue-ID"]
assert rcpt["Final-Recipient"].lower().replace(" ", "") == "rfc822;nobody@example.test", rcpt["Final-Recipient"]
assert rcpt["Action"] == "failed", rcpt["Action"]
assert rcpt["Status"].startswith("5."), rcpt["Status"]
assert rcpt["Diagnostic-Code"].lower().startswith("smtp; 5"), rcpt["Diagnostic-Code"]
assert "127.0.0.1" in rcpt["Remote-MTA"], rcpt["Remote-MTA"]
original = parts[2].as_string()
assert "bounce-1@tern.test" in original, original
print("ok")
"#,
        path = path.display().to_string()
    );
    let out = Command::new("python3").args(["-c", &script]).output().unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        &dump[start..]
    );
    // The bounce went out with the null reverse-path, to the original sender.
    let envelope = &dump[..start];
    assert!(
        envelope.contains("X-Mail-Args: <>") && envelope.contains("X-Rcpt-Args: <sender@tern.test>"),
        "{envelope}"
    );
    // A bounce never causes another bounce: the rejecting sink got the original only.
    assert!(rejecting.messages().is_empty());
}

#[test]
fn kill_during_delivery_loses_nothing() {
    // A slow sink: every DATA waits a second, so deliveries are in flight when we kill.
    let sink = SmtpSink::start(&["-w", "1"]);
    let mut node = Node::start(&format!(
        "[[route]]\ndomain = \"*\"\nto = \"{}\"\n\n[delivery]\nretry_schedule = [\"1s\"]\nmax_connections_per_site = 5\n",
        sink.addr
    ));
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let senders: Vec<_> = (0..4)
        .map(|t| {
            let (acked, stop, addr) = (Arc::clone(&acked), Arc::clone(&stop), node.smtp);
            std::thread::spawn(move || {
                let Ok(mut c) = Client::connect(addr) else { return };
                let _ = c.command("EHLO load.test");
                for i in 0..25 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let tag = format!("inflight-{t}-{i}");
                    match c.send_mail("a@tern.test", &["b@example.test"], &body(&tag, 1024)) {
                        Ok(_) => acked.lock().unwrap().push(tag),
                        Err(_) => break,
                    }
                }
            })
        })
        .collect();
    wait_for(Duration::from_secs(60), "60 acknowledged and 5 delivered", || {
        acked.lock().unwrap().len() >= 60 && sink.messages().len() >= 5
    });
    node.kill();
    stop.store(true, Ordering::Relaxed);
    for s in senders {
        s.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    node.spawn();
    let count = |tag: &str| {
        let id = format!("<{tag}@tern.test>");
        sink.messages().iter().filter(|m| m.contains(&id)).count()
    };
    wait_for(Duration::from_secs(120), "every acknowledged message delivered", || {
        acked.iter().all(|t| count(t) >= 1)
    });
    wait_for(Duration::from_secs(30), "empty queue", || queue_len(&node) == 0);
    let mut per: BTreeMap<usize, usize> = BTreeMap::new();
    for t in &acked {
        *per.entry(count(t)).or_default() += 1;
    }
    // At-least-once: duplicates only for what was in flight at the kill.
    let dups: usize = per.iter().filter(|(c, _)| **c > 1).map(|(_, n)| n).sum();
    assert!(dups <= 10, "{dups} duplicates for {} messages: {per:?}", acked.len());
    eprintln!(
        "kill during delivery: {} acknowledged, copies per message {per:?}",
        acked.len()
    );
}

#[test]
fn expired_mail_bounces_with_the_last_deferral_reason() {
    let closed_guard = closed_port();
    let closed = closed_guard.port;
    let sender_mx = SmtpSink::start(&[]);
    let node = Node::start(&format!(
        "[log]\nformat = \"json\"\n\n[[route]]\ndomain = \"example.test\"\nto = \"127.0.0.1:{closed}\"\n\n[[route]]\ndomain = \"tern.test\"\nto = \"{}\"\n\n[delivery]\nretry_schedule = [\"1s\"]\nmax_age = \"3s\"\n",
        sender_mx.addr
    ));
    let id = send(&node, "sender@tern.test", &["late@example.test"], "expire-1");
    // smtp-sink creates its dump file before it has written the message.
    wait_for(Duration::from_secs(60), "the expiry bounce", || {
        sender_mx.messages().iter().any(|m| m.contains("Action: failed"))
    });
    assert_eq!(sender_mx.messages().len(), 1);
    let dsn = &sender_mx.messages()[0];
    assert!(dsn.contains("Action: failed"), "{dsn}");
    assert!(dsn.contains("Status: 4.4."), "{dsn}");
    assert!(dsn.contains("expire-1@tern.test"));
    wait_for(Duration::from_secs(30), "empty queue", || queue_len(&node) == 0);
    // The log tells expiry apart from a 5xx failure, and names the bounced message.
    let events: Vec<serde_json::Value> = node
        .logs()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["target"] == "tern::event" && l["fields"]["msg_id"] == id.as_str())
        .map(|l| l["fields"].clone())
        .collect();
    let of = |e: &str| events.iter().filter(|f| f["event"] == e).collect::<Vec<_>>();
    assert_eq!(of("expired").len(), 1, "{events:?}");
    assert!(of("failed").is_empty(), "{events:?}");
    assert!(!of("deferred").is_empty(), "{events:?}");
    assert_eq!(of("expired")[0]["rcpt"], "late@example.test");
    let bounced = of("bounced");
    assert_eq!(bounced.len(), 1, "{events:?}");
    assert_eq!(bounced[0]["message_id"], "expire-1@tern.test", "{events:?}");
}

#[test]
fn required_tls_is_never_sent_in_clear() {
    // smtp-sink offers no STARTTLS.
    let sink = SmtpSink::start(&[]);
    let node = Node::start(&format!(
        "[[route]]\ndomain = \"*\"\nto = \"{}\"\n\n[delivery]\nrequire_tls_domains = [\"secure.test\"]\nretry_schedule = [\"1h\"]\n",
        sink.addr
    ));
    let id = send(&node, "a@tern.test", &["x@secure.test"], "tls-1");
    send(&node, "a@tern.test", &["y@plain.test"], "plain-1");
    wait_for(Duration::from_secs(30), "the plain message", || {
        sink.messages().len() == 1
    });
    wait_for(Duration::from_secs(30), "the TLS deferral", || {
        node.ternctl_json(&["queue", "show", &id])["recipients"][0]["status"] == "deferred"
    });
    let m = node.ternctl_json(&["queue", "show", &id]);
    let reply = m["recipients"][0]["last_reply"].as_str().unwrap().to_ascii_lowercase();
    assert!(reply.starts_with("451") && reply.contains("tls"), "{reply}");
    assert!(!sink.messages().iter().any(|m| m.contains("tls-1@tern.test")));
}

#[test]
fn success_notification_when_the_next_hop_has_no_dsn() {
    // -N: the sink does not offer DSN, so Tern itself reports success:
    // "relayed" for the MTA, "delivered" for the local Maildir (RFC 3461 6.2.3).
    let sink = SmtpSink::start(&["-N"]);
    let sender_mx = SmtpSink::start(&[]);
    let maildirs = tempfile::tempdir().unwrap();
    let node = Node::start(&format!(
        "[policy]\nlocal_domains = [\"local.test\"]\n\n[local]\nmaildir = \"{}/{{domain}}/{{user}}\"\n\n\
         [[route]]\ndomain = \"example.test\"\nto = \"{}\"\n\n[[route]]\ndomain = \"tern.test\"\nto = \"{}\"\n",
        maildirs.path().display(),
        sink.addr,
        sender_mx.addr
    ));
    let script = format!(
        r#"
import smtplib
s = smtplib.SMTP("127.0.0.1", {port}, timeout=30)
s.sendmail("sender@tern.test", ["r@example.test", "box@local.test"], b"Subject: s\r\nMessage-ID: <success-1@tern.test>\r\n\r\nhi\r\n",
    rcpt_options=["NOTIFY=SUCCESS"])
s.quit()
"#,
        port = node.smtp.port()
    );
    let out = Command::new("python3").args(["-c", &script]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for(Duration::from_secs(60), "the success DSN", || {
        sender_mx.messages().iter().any(|m| m.contains("Final-Recipient"))
    });
    let dsns = sender_mx.messages();
    assert_eq!(dsns.len(), 1, "{dsns:?}");
    let dsn = &dsns[0];
    let block = |rcpt: &str| {
        dsn.split("Final-Recipient: ")
            .find(|b| b.starts_with(&format!("rfc822; {rcpt}")) || b.starts_with(&format!("rfc822;{rcpt}")))
            .unwrap_or_else(|| panic!("no block for {rcpt}: {dsn}"))
            .to_owned()
    };
    let relayed = block("r@example.test");
    assert!(
        relayed.contains("Action: relayed") && relayed.contains("Status: 2."),
        "{dsn}"
    );
    let delivered = block("box@local.test");
    assert!(
        delivered.contains("Action: delivered") && delivered.contains("Status: 2."),
        "{dsn}"
    );
    assert_eq!(sink.messages().len(), 1);
}

#[test]
fn a_421_or_dropped_connection_defers_and_retries() {
    let flaky = SmtpSink::start(&["-Q", "RCPT"]);
    let node = Node::start(&format!(
        "[[route]]\ndomain = \"*\"\nto = \"{}\"\n\n[delivery]\nretry_schedule = [\"1h\"]\n",
        flaky.addr
    ));
    let id = send(&node, "a@tern.test", &["r@example.test"], "flaky-1");
    wait_for(Duration::from_secs(30), "a deferral", || {
        node.ternctl_json(&["queue", "show", &id])["recipients"][0]["status"] == "deferred"
    });
    let m = node.ternctl_json(&["queue", "show", &id]);
    assert_eq!(m["attempts"], 1);
    assert!(
        m["recipients"][0]["last_reply"].as_str().unwrap().contains("421"),
        "{m}"
    );
    assert!(m["next_attempt"].as_i64().unwrap() > chrono_now() + 3000);
}

fn chrono_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[test]
fn delay_notice_is_sent_once_while_retrying() {
    let closed = closed_port();
    let sender_mx = SmtpSink::start(&[]);
    let node = Node::start(&format!(
        "[[route]]\ndomain = \"example.test\"\nto = \"127.0.0.1:{}\"\n\n[[route]]\ndomain = \"tern.test\"\nto = \"{}\"\n\n[delivery]\nretry_schedule = [\"1s\"]\ndelay_notice_after = \"2s\"\n",
        closed.port, sender_mx.addr
    ));
    let id = send(&node, "sender@tern.test", &["slow@example.test"], "delay-1");
    // smtp-sink creates its dump file before it has written the message.
    wait_for(Duration::from_secs(60), "the delay notice", || {
        sender_mx.messages().iter().any(|m| m.contains("Will-Retry-Until:"))
    });
    assert_eq!(sender_mx.messages().len(), 1);
    let dsn = &sender_mx.messages()[0];
    assert!(
        dsn.contains("Action: delayed") && dsn.contains("Will-Retry-Until:"),
        "{dsn}"
    );
    // Still queued and retried, and no second notice.
    wait_for(Duration::from_secs(30), "two more attempts", || {
        node.ternctl_json(&["queue", "show", &id])["attempts"].as_u64().unwrap() >= 4
    });
    assert_eq!(sender_mx.messages().len(), 1);
}

/// Accepts up to `n` connections on `addr` and greets each with a 421.
fn greet_421(addr: std::net::SocketAddr, n: usize) -> Arc<Mutex<usize>> {
    let listener = std::net::TcpListener::bind(addr).unwrap();
    let seen = Arc::new(Mutex::new(0));
    let counter = Arc::clone(&seen);
    std::thread::spawn(move || {
        for stream in listener.incoming().take(n) {
            let Ok(mut s) = stream else { continue };
            *counter.lock().unwrap() += 1;
            let _ = std::io::Write::write_all(&mut s, b"421 4.3.2 too busy, try another\r\n");
        }
    });
    seen
}

#[test]
fn next_mx_host_after_a_refused_connection_and_a_421_greeting() {
    // All MX hosts share `delivery.smtp_port`, so they differ by loopback
    // address: mx1 (preferred) refuses the connection, mx2 greets with 421,
    // mx3 is the sink.
    let sink = SmtpSink::start(&[]);
    let port = sink.addr.port();
    // Held bound (not listening) so nobody can listen at mx1 meanwhile.
    let reserved = tokio::net::TcpSocket::new_v4().unwrap();
    reserved
        .bind(std::net::SocketAddr::from(([127, 0, 0, 2], port)))
        .expect("127.0.0.2 port free for the refusing MX");
    let busy = greet_421(std::net::SocketAddr::from(([127, 0, 0, 3], port)), 20);
    let dns = DnsServer::start(
        "mx-host=example.test,mx1.example.test,10\nmx-host=example.test,mx2.example.test,20\n\
         mx-host=example.test,mx3.example.test,30\nhost-record=mx1.example.test,127.0.0.2\n\
         host-record=mx2.example.test,127.0.0.3\nhost-record=mx3.example.test,127.0.0.1\n",
    );
    let node = Node::start(&format!(
        "[dns]\nnameservers = [\"{}\"]\n\n[delivery]\nsmtp_port = {port}\n",
        dns.addr
    ));
    let id = send(&node, "a@tern.test", &["rcpt@example.test"], "next-mx-1");
    wait_for(Duration::from_secs(60), "message at the third MX", || {
        sink.messages().iter().any(|m| m.contains("<next-mx-1@tern.test>"))
    });
    wait_for(Duration::from_secs(30), "empty queue", || queue_len(&node) == 0);
    assert_eq!(sink.messages().len(), 1);
    assert_eq!(*busy.lock().unwrap(), 1, "the 421 host was tried once, before the sink");
    // Delivered on the first attempt: moving on was not a deferral.
    let delivered = node
        .logs()
        .lines()
        .filter(|l| l.contains(&id) && l.contains("delivered"))
        .map(str::to_owned)
        .collect::<Vec<_>>();
    assert_eq!(delivered.len(), 1, "{}", node.logs());
    assert!(
        delivered[0].contains("attempt=1") && delivered[0].contains("mx3.example.test"),
        "{delivered:?}"
    );
}

#[test]
fn null_mx_bounces_with_5_1_10() {
    let sender_mx = SmtpSink::start(&[]);
    let dns = DnsServer::start("mx-host=nullmx.test,.,0\n");
    let node = Node::start(&format!(
        "[dns]\nnameservers = [\"{}\"]\n\n[[route]]\ndomain = \"tern.test\"\nto = \"{}\"\n",
        dns.addr, sender_mx.addr
    ));
    let id = send(&node, "sender@tern.test", &["nobody@nullmx.test"], "nullmx-1");
    wait_for(Duration::from_secs(60), "the bounce", || {
        sender_mx.messages().iter().any(|m| m.contains("Final-Recipient"))
    });
    wait_for(Duration::from_secs(30), "empty queue", || queue_len(&node) == 0);
    let dumps = sender_mx.messages();
    assert_eq!(dumps.len(), 1, "{dumps:?}");
    let dump = &dumps[0];
    let start = dump.find("Received:").expect("message in dump");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dsn.eml");
    std::fs::write(&path, &dump[start..]).unwrap();
    let script = format!(
        r#"
import email, email.policy
m = email.message_from_binary_file(open({path:?}, "rb"), policy=email.policy.default)
assert m.get_content_type() == "multipart/report", m.get_content_type()
parts = list(m.iter_parts())
groups = parts[1].get_payload()
per_msg, rcpt = groups[0], groups[1]
assert per_msg["X-Tern-Queue-ID"] == {id:?}, per_msg["X-Tern-Queue-ID"]
assert rcpt["Final-Recipient"].lower().replace(" ", "") == "rfc822;nobody@nullmx.test", rcpt["Final-Recipient"]
assert rcpt["Action"] == "failed", rcpt["Action"]
assert rcpt["Status"] == "5.1.10", rcpt["Status"]
assert "nullmx.test" in parts[0].get_content(), parts[0].get_content()
print("ok")
"#,
        path = path.display().to_string()
    );
    let out = Command::new("python3").args(["-c", &script]).output().unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        &dump[start..]
    );
}

/// What [`counting_peer`] saw.
#[derive(Default)]
struct PeerCounts {
    open: usize,
    max_open: usize,
    /// Messages accepted per connection, in order of connection.
    per_connection: Vec<usize>,
}

/// A minimal SMTP server (no PIPELINING) that answers each message's final
/// dot after `delay`, counting concurrent connections and messages per
/// connection; with `hang_up_after`, it closes a connection (no reply, as a
/// server dropping idle sessions does) after that many messages. Serves at
/// most 100 connections.
fn counting_peer(delay: Duration, hang_up_after: Option<usize>) -> (std::net::SocketAddr, Arc<Mutex<PeerCounts>>) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind(("127.0.0.1", free_port())).unwrap();
    let addr = listener.local_addr().unwrap();
    let counts = Arc::new(Mutex::new(PeerCounts::default()));
    let shared = Arc::clone(&counts);
    std::thread::spawn(move || {
        for stream in listener.incoming().take(100) {
            let Ok(stream) = stream else { continue };
            let counts = Arc::clone(&shared);
            std::thread::spawn(move || {
                let conn = {
                    let mut c = counts.lock().unwrap();
                    c.open += 1;
                    c.max_open = c.max_open.max(c.open);
                    c.per_connection.push(0);
                    c.per_connection.len() - 1
                };
                stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                let mut w = stream.try_clone().unwrap();
                let mut r = BufReader::new(stream);
                let _ = w.write_all(b"220 counting ESMTP\r\n");
                let mut line = String::new();
                let mut in_data = false;
                // Bounded by the read timeout and by EOF.
                while r.read_line(&mut line).is_ok_and(|n| n > 0) {
                    let reply: &[u8] = if in_data {
                        if line == ".\r\n" {
                            in_data = false;
                            std::thread::sleep(delay);
                            let n = {
                                let mut c = counts.lock().unwrap();
                                c.per_connection[conn] += 1;
                                c.per_connection[conn]
                            };
                            if hang_up_after == Some(n) {
                                let _ = w.write_all(b"250 2.0.0 ok\r\n");
                                break;
                            }
                            b"250 2.0.0 ok\r\n"
                        } else {
                            b""
                        }
                    } else {
                        match line.get(..4).map(|c| c.to_ascii_uppercase()).as_deref() {
                            Some("EHLO") => b"250 counting\r\n",
                            Some("DATA") => {
                                in_data = true;
                                b"354 go on\r\n"
                            }
                            Some("QUIT") => {
                                let _ = w.write_all(b"221 bye\r\n");
                                break;
                            }
                            _ => b"250 ok\r\n",
                        }
                    };
                    if !reply.is_empty() && w.write_all(reply).is_err() {
                        break;
                    }
                    line.clear();
                }
                counts.lock().unwrap().open -= 1;
            });
        }
    });
    (addr, counts)
}

#[test]
fn per_site_connection_limit_is_honoured_and_connections_are_reused() {
    const LIMIT: usize = 2;
    const MESSAGES: usize = 12;
    let (peer, counts) = counting_peer(Duration::from_millis(200), None);
    let node = Node::start(&format!(
        "[[route]]\ndomain = \"*\"\nto = \"{peer}\"\n\n[delivery]\nmax_connections_per_site = {LIMIT}\n"
    ));
    let mut c = Client::connect(node.smtp).unwrap();
    c.command("EHLO sender.test").unwrap();
    for i in 0..MESSAGES {
        c.send_mail("a@tern.test", &["r@example.test"], &body(&format!("limit-{i}"), 300))
            .unwrap();
    }
    wait_for(Duration::from_secs(60), "every message at the peer", || {
        counts.lock().unwrap().per_connection.iter().sum::<usize>() == MESSAGES
    });
    wait_for(Duration::from_secs(30), "empty queue", || queue_len(&node) == 0);
    let c = counts.lock().unwrap();
    assert!(c.max_open <= LIMIT, "{} connections at once, limit {LIMIT}", c.max_open);
    // 200 ms per message with 12 queued: the limit is reached, not just respected.
    assert_eq!(c.max_open, LIMIT);
    assert!(
        c.per_connection.iter().any(|&n| n >= 2),
        "no connection carried two messages: {:?}",
        c.per_connection
    );
    assert!(c.per_connection.len() < MESSAGES, "{:?}", c.per_connection);
}

/// Mail that trickles in, one message at a time, goes over one cached
/// connection (`delivery.connection_idle_secs`), which is closed with QUIT
/// once idle; a cached connection the peer has dropped meanwhile is noticed
/// before use, so the next message goes over a new one instead of being
/// deferred.
#[test]
fn trickling_mail_reuses_a_cached_connection_until_it_idles_out() {
    let send = |node: &Node, tag: &str| {
        let mut c = Client::connect(node.smtp).unwrap();
        c.command("EHLO sender.test").unwrap();
        c.send_mail("a@tern.test", &["r@example.test"], &body(tag, 200))
            .unwrap();
    };
    let at_peer = |counts: &Arc<Mutex<PeerCounts>>| counts.lock().unwrap().per_connection.iter().sum::<usize>();

    let routed_to = |peer: std::net::SocketAddr, idle_secs: u32| {
        Node::start(&format!(
            "[[route]]\ndomain = \"*\"\nto = \"{peer}\"\n\n[delivery]\nconnection_idle_secs = {idle_secs}\n"
        ))
    };

    let (peer, counts) = counting_peer(Duration::ZERO, None);
    let node = routed_to(peer, 4);
    for i in 1..=3 {
        send(&node, &format!("trickle-{i}"));
        wait_for(Duration::from_secs(20), "the message at the peer", || {
            at_peer(&counts) == i
        });
    }
    assert_eq!(
        counts.lock().unwrap().per_connection,
        vec![3],
        "one connection for all three"
    );
    wait_for(Duration::from_secs(20), "the idle connection closed", || {
        counts.lock().unwrap().open == 0
    });
    assert_eq!(counts.lock().unwrap().per_connection.len(), 1);
    drop(node);

    // The peer hangs up after each message: every one still goes at once.
    let (peer, counts) = counting_peer(Duration::ZERO, Some(1));
    let node = routed_to(peer, 30);
    for i in 1..=3 {
        send(&node, &format!("hangup-{i}"));
        // Far below the first retry: a deferral would miss it.
        wait_for(Duration::from_secs(20), "the message at the peer", || {
            at_peer(&counts) == i
        });
        wait_for(Duration::from_secs(10), "the peer's hang-up", || {
            counts.lock().unwrap().open == 0
        });
    }
    assert_eq!(counts.lock().unwrap().per_connection, vec![1, 1, 1]);
    wait_for(Duration::from_secs(30), "empty queue", || queue_len(&node) == 0);
}
