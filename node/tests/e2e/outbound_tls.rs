//! Outbound TLS policy end to end: `[[tls_policy]]` levels and
//! `require_tls_domains` against real peers (aiosmtpd with certificates from
//! a test CA made by openssl, smtp-sink without STARTTLS), MX names served by
//! dnsmasq so that the name checked is the MX host's.

use std::time::Duration;

use crate::harness::*;
use tern_testkit::dns::DnsServer;
use tern_testkit::peers::{Aiosmtpd, TestCa};

/// A node whose mail for `domain` goes to the MX `mx` (127.0.0.1) on `port`,
/// with JSON event lines; `extra` is appended to its config.
fn node_with_mx(domain: &str, mx: &str, port: u16, extra: &str) -> (Node, DnsServer) {
    let dns = DnsServer::start(&format!("mx-host={domain},{mx},10\nhost-record={mx},127.0.0.1\n"));
    let node = Node::start(&format!(
        "[log]\nformat = \"json\"\n\n[dns]\nnameservers = [\"{}\"]\n\n[delivery]\nsmtp_port = {port}\nretry_schedule = [\"1h\"]\n{extra}",
        dns.addr
    ));
    (node, dns)
}

fn send(node: &Node, to: &str, tag: &str) -> String {
    let mut c = Client::connect(node.smtp).unwrap();
    c.command("EHLO sender.test").unwrap();
    c.send_mail("a@tern.test", &[to], &body(tag, 512)).unwrap()
}

/// The `tern::event` lines of one message, as their JSON fields.
fn events(node: &Node, id: &str) -> Vec<serde_json::Value> {
    node.logs()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["target"] == "tern::event" && l["fields"]["msg_id"] == id)
        .map(|l| l["fields"].clone())
        .collect()
}

/// Waits for the message's first recipient to be deferred; returns the
/// reply `queue show` gives and the `deferred` event's reply.
fn wait_deferred(node: &Node, id: &str) -> (String, String) {
    wait_for(Duration::from_secs(60), "the deferral", || {
        node.ternctl_json(&["queue", "show", id])["recipients"][0]["status"] == "deferred"
    });
    let shown = node.ternctl_json(&["queue", "show", id])["recipients"][0]["last_reply"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_for(Duration::from_secs(10), "the deferred event", || {
        events(node, id).iter().any(|e| e["event"] == "deferred")
    });
    let event = events(node, id).into_iter().find(|e| e["event"] == "deferred").unwrap();
    (shown, event["reply"].as_str().unwrap().to_owned())
}

#[test]
fn verify_delivers_to_a_peer_whose_certificate_chains_to_tls_ca_file() {
    if !Aiosmtpd::available() {
        return;
    }
    let ca = TestCa::new("Tern Test CA");
    let (cert, key) = ca.issue("good", &["mx.good.test"]);
    let peer = Aiosmtpd::start_with_cert(&cert, &key);
    let (node, _dns) = node_with_mx(
        "good.test",
        "mx.good.test",
        peer.peer.addr.port(),
        &format!(
            "tls_ca_file = \"{}\"\n\n[[tls_policy]]\ndomain = \"good.test\"\nlevel = \"verify\"\n",
            ca.cert.display()
        ),
    );
    let id = send(&node, "rcpt@good.test", "verify-ok");
    let got = peer.wait_messages(1);
    assert!(String::from_utf8_lossy(&got[0]).contains("verify-ok@tern.test"));
    wait_for(Duration::from_secs(30), "the delivered event", || {
        events(&node, &id).iter().any(|e| e["event"] == "delivered")
    });
    let delivered = events(&node, &id)
        .into_iter()
        .find(|e| e["event"] == "delivered")
        .unwrap();
    assert_eq!(delivered["relay"], "mx.good.test", "{delivered}");
    assert!(delivered["tls"].as_str().unwrap().starts_with("TLSv1."), "{delivered}");
}

#[test]
fn verify_with_a_wrong_name_defers_with_the_reason_and_sends_nothing() {
    if !Aiosmtpd::available() {
        return;
    }
    let ca = TestCa::new("Tern Test CA");
    // Signed by the trusted CA, but for another host.
    let (cert, key) = ca.issue("other", &["mx.other.test"]);
    let peer = Aiosmtpd::start_with_cert(&cert, &key);
    let (node, _dns) = node_with_mx(
        "bad.test",
        "mx.bad.test",
        peer.peer.addr.port(),
        &format!(
            "tls_ca_file = \"{}\"\n\n[[tls_policy]]\ndomain = \"bad.test\"\nlevel = \"verify\"\n",
            ca.cert.display()
        ),
    );
    let id = send(&node, "rcpt@bad.test", "verify-bad-name");
    let (shown, event) = wait_deferred(&node, &id);
    for reply in [&shown, &event] {
        assert!(reply.starts_with("451 "), "{reply}");
        assert!(
            reply.contains("TLS verification failed for mx.bad.test: certificate name mismatch"),
            "{reply}"
        );
    }
    assert!(peer.messages().is_empty(), "nothing may reach an unverified peer");
}

#[test]
fn a_failed_verification_moves_on_to_the_next_mx() {
    if !Aiosmtpd::available() {
        return;
    }
    // Both MX hosts share `delivery.smtp_port`, so they differ by loopback
    // address: mx1 (preferred, 127.0.0.2) has a certificate for another
    // name, mx2 (127.0.0.1) the right one.
    let ca = TestCa::new("Tern Test CA");
    let (good_cert, good_key) = ca.issue("mx2", &["mx2.two.test"]);
    let (bad_cert, bad_key) = ca.issue("wrong", &["mx.other.test"]);
    let good = Aiosmtpd::start_with_cert(&good_cert, &good_key);
    let port = good.peer.addr.port();
    let bad = Aiosmtpd::start_with_cert_at(
        &bad_cert,
        &bad_key,
        Some(std::net::SocketAddr::from(([127, 0, 0, 2], port))),
    );
    let dns = DnsServer::start(
        "mx-host=two.test,mx1.two.test,10\nmx-host=two.test,mx2.two.test,20\n\
         host-record=mx1.two.test,127.0.0.2\nhost-record=mx2.two.test,127.0.0.1\n",
    );
    let node = Node::start(&format!(
        "[log]\nformat = \"json\"\n\n[dns]\nnameservers = [\"{}\"]\n\n[delivery]\nsmtp_port = {port}\n\
         tls_ca_file = \"{}\"\n\n[[tls_policy]]\ndomain = \"two.test\"\nlevel = \"verify\"\n",
        dns.addr,
        ca.cert.display()
    ));
    let id = send(&node, "rcpt@two.test", "verify-next-mx");
    good.wait_messages(1);
    wait_for(Duration::from_secs(30), "the delivered event", || {
        events(&node, &id).iter().any(|e| e["event"] == "delivered")
    });
    let delivered = events(&node, &id)
        .into_iter()
        .find(|e| e["event"] == "delivered")
        .unwrap();
    assert_eq!(delivered["relay"], "mx2.two.test", "{delivered}");
    assert_eq!(delivered["attempt"], 1, "moving on was not a deferral: {delivered}");
    assert!(bad.messages().is_empty());
    assert!(
        node.logs()
            .lines()
            .any(|l| l.contains("TLS verification failed") && l.contains("mx1.two.test")),
        "{}",
        node.logs()
    );
}

#[test]
fn may_delivers_to_a_self_signed_peer_over_tls() {
    if !Aiosmtpd::available() {
        return;
    }
    let peer = Aiosmtpd::start(true, false);
    let (node, _dns) = node_with_mx("plain.test", "mx.plain.test", peer.peer.addr.port(), "");
    let id = send(&node, "rcpt@plain.test", "may-self-signed");
    peer.wait_messages(1);
    wait_for(Duration::from_secs(30), "the delivered event", || {
        events(&node, &id).iter().any(|e| e["event"] == "delivered")
    });
    let delivered = events(&node, &id)
        .into_iter()
        .find(|e| e["event"] == "delivered")
        .unwrap();
    assert!(delivered["tls"].as_str().unwrap().starts_with("TLSv1."), "{delivered}");
}

#[test]
fn encrypt_to_a_peer_without_starttls_defers() {
    // smtp-sink offers no STARTTLS.
    let sink = SmtpSink::start(&[]);
    let (node, _dns) = node_with_mx(
        "enc.test",
        "mx.enc.test",
        sink.addr.port(),
        "\n[[tls_policy]]\ndomain = \"enc.test\"\nlevel = \"encrypt\"\n",
    );
    let id = send(&node, "rcpt@enc.test", "encrypt-no-tls");
    let (shown, event) = wait_deferred(&node, &id);
    for reply in [&shown, &event] {
        assert!(reply.starts_with("451 ") && reply.contains("TLS required"), "{reply}");
    }
    assert!(sink.messages().is_empty());
}

#[test]
fn require_tls_domains_now_verifies_and_defers_on_an_untrusted_certificate() {
    if !Aiosmtpd::available() {
        return;
    }
    // Self-signed (CN mx.example.test, no trusted root): `may` would take it.
    let peer = Aiosmtpd::start(true, false);
    let (node, _dns) = node_with_mx(
        "example.test",
        "mx.example.test",
        peer.peer.addr.port(),
        "require_tls_domains = [\"example.test\"]\n",
    );
    let id = send(&node, "rcpt@example.test", "require-tls-untrusted");
    let (shown, event) = wait_deferred(&node, &id);
    for reply in [&shown, &event] {
        assert!(
            reply.contains("TLS verification failed for mx.example.test: self-signed certificate"),
            "{reply}"
        );
    }
    assert!(peer.messages().is_empty());
}

#[test]
fn bad_tls_policy_is_a_config_error_naming_the_key() {
    for (toml, key) in [
        ("[[tls_policy]]\ndomain = \"a.test\"\nlevel = \"strict\"\n", "tls_policy.level"),
        (
            "[[tls_policy]]\ndomain = \"a.test\"\nlevel = \"may\"\nnames = [\"mx.a.test\"]\n",
            "tls_policy.names",
        ),
        (
            "[[tls_policy]]\ndomain = \"a.test\"\nlevel = \"may\"\n[[tls_policy]]\ndomain = \"a.test\"\nlevel = \"none\"\n",
            "tls_policy.domain",
        ),
        ("[delivery]\ntls_ca_file = \"/nonexistent/ca.pem\"\n", "delivery.tls_ca_file"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tern.toml");
        std::fs::write(
            &path,
            format!("[node]\ndata_dir = \"{}\"\n\n{toml}", dir.path().join("data").display()),
        )
        .unwrap();
        let out = std::process::Command::new(ternd_bin())
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{toml}: started");
        assert!(stderr.contains(key), "{toml}: {stderr}");
    }
}
