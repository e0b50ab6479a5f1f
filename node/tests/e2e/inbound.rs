//! Inbound authentication checks end to end: ternd is the MX for
//! example.test (Maildir delivery), its `[dns]` points at a real dnsmasq
//! serving SPF, DKIM, DMARC and PTR records, and `relay_networks = []` makes
//! the loopback client untrusted. Messages come from Python's smtplib,
//! DKIM-signed by dkimpy (dkim_send.py).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::*;
use tern_testkit::dns::{DnsServer, ServfailServer};

const SENDER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e/dkim_send.py");

/// python3 with dkimpy and dnspython, and openssl; false to skip, a panic
/// under `TERN_REQUIRE_PEERS=1`.
fn peers_available() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import dkim, dns.resolver"])
        .status()
        .is_ok_and(|s| s.success())
        && Command::new("openssl")
            .arg("version")
            .status()
            .is_ok_and(|s| s.success());
    if !ok {
        if std::env::var("TERN_REQUIRE_PEERS").as_deref() == Ok("1") {
            panic!("python3 with dkimpy and dnspython, and openssl, are required (TERN_REQUIRE_PEERS=1)");
        }
        eprintln!("skipping: python3 with dkimpy and dnspython, or openssl, not installed");
    }
    ok
}

/// A fresh RSA key: the PEM file and the dnsmasq line publishing it as
/// sel1._domainkey.sender.test.
fn dkim_key(dir: &Path) -> (PathBuf, String) {
    let key = dir.join("dkim.pem");
    let out = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl pkey -in '{}' -pubout -outform DER | openssl base64 -A",
            key.display()
        ))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let record = format!("v=DKIM1; k=rsa; p={}", String::from_utf8(out.stdout).unwrap().trim());
    // TXT strings hold at most 255 octets.
    let parts: Vec<String> = record
        .as_bytes()
        .chunks(200)
        .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
        .collect();
    (
        key,
        format!("txt-record=sel1._domainkey.sender.test,{}", parts.join(",")),
    )
}

fn zone(dkim_record: &str) -> String {
    format!(
        "txt-record=sender.test,\"v=spf1 ip4:127.0.0.1 -all\"\n\
         txt-record=_dmarc.sender.test,\"v=DMARC1; p=reject\"\n\
         {dkim_record}\n\
         host-record=client.sender.test,127.0.0.1\n\
         ptr-record=1.0.0.127.in-addr.arpa,client.sender.test\n\
         txt-record=spoof.test,\"v=spf1 ip4:192.0.2.1 -all\"\n\
         txt-record=_dmarc.spoof.test,\"v=DMARC1; p=reject\"\n\
         txt-record=quar.test,\"v=spf1 ip4:192.0.2.1 -all\"\n\
         txt-record=_dmarc.quar.test,\"v=DMARC1; p=quarantine\"\n"
    )
}

/// An MX for example.test that checks loopback clients with `dns`.
fn mx(dns: std::net::SocketAddr, maildirs: &Path, extra: &str) -> Node {
    Node::start(&format!(
        "[dns]\nnameservers = [\"{dns}\"]\n\n[policy]\nrelay_networks = []\nlocal_domains = [\"example.test\"]\n\n\
         [local]\nmaildir = \"{}/{{domain}}/{{user}}\"\n\n{extra}\n",
        maildirs.display()
    ))
}

/// Sends one message with dkim_send.py; the reply to the end of data.
fn send(node: &Node, args: &[&str]) -> String {
    let out = Command::new("python3")
        .arg(SENDER)
        .arg("--server")
        .arg(node.smtp.to_string())
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// The one message delivered to `user@example.test`, once it is there.
fn delivered(maildirs: &Path, user: &str) -> (PathBuf, String) {
    let new = maildirs.join("example.test").join(user).join("new");
    wait_for(Duration::from_secs(30), &format!("a message for {user}"), || {
        std::fs::read_dir(&new).map(|d| d.count()).unwrap_or(0) == 1
    });
    let path = std::fs::read_dir(&new).unwrap().next().unwrap().unwrap().path();
    let text = std::fs::read_to_string(&path).unwrap();
    (path, text)
}

/// Header fields of a message, unfolded.
fn fields(message: &str) -> Vec<String> {
    let head = message.split("\r\n\r\n").next().unwrap();
    let mut out: Vec<String> = Vec::new();
    for line in head.split("\r\n") {
        match (line.starts_with([' ', '\t']), out.last_mut()) {
            (true, Some(last)) => {
                last.push(' ');
                last.push_str(line.trim());
            }
            _ => out.push(line.to_owned()),
        }
    }
    out
}

fn our_results(message: &str) -> Vec<String> {
    fields(message)
        .into_iter()
        .filter(|f| f.starts_with("Authentication-Results: mx1.tern.test;"))
        .collect()
}

#[test]
fn enforce_mode_end_to_end() {
    if !peers_available() {
        return;
    }
    let keys = tempfile::tempdir().unwrap();
    let (key, dkim_record) = dkim_key(keys.path());
    let dns = DnsServer::start(&zone(&dkim_record));
    let maildirs = tempfile::tempdir().unwrap();
    let node = mx(dns.addr, maildirs.path(), "");
    let key = key.to_str().unwrap();

    // Aligned SPF and DKIM, carrying a forged result that claims our name.
    let reply = send(
        &node,
        &[
            "--mail-from",
            "alice@sender.test",
            "--rcpt",
            "bob@example.test",
            "--from-header",
            "alice@sender.test",
            "--key",
            key,
            "--domain",
            "sender.test",
            "--header",
            "Authentication-Results: mx1.tern.test; dkim=pass (forged)",
            "--header",
            "Authentication-Results: other.example; spf=pass (kept)",
        ],
    );
    assert!(reply.starts_with("250"), "{reply}");
    // SPF fails, no DKIM, the From domain publishes p=reject.
    let reply = send(
        &node,
        &[
            "--mail-from",
            "ceo@spoof.test",
            "--rcpt",
            "bob@example.test",
            "--from-header",
            "ceo@spoof.test",
        ],
    );
    assert!(
        reply.starts_with("550 5.7.1 Message rejected: DMARC policy of spoof.test"),
        "{reply}"
    );
    // p=quarantine: delivered, marked.
    let reply = send(
        &node,
        &[
            "--mail-from",
            "x@quar.test",
            "--rcpt",
            "carol@example.test",
            "--from-header",
            "x@quar.test",
        ],
    );
    assert!(reply.starts_with("250"), "{reply}");

    let (path, bob) = delivered(maildirs.path(), "bob");
    let ours = our_results(&bob);
    assert_eq!(ours.len(), 1, "exactly one Authentication-Results of ours:\n{bob}");
    for want in [
        "spf=pass",
        "smtp.mailfrom=alice@sender.test",
        "dkim=pass header.i=@sender.test header.s=sel1",
        "dmarc=pass header.from=sender.test",
        "iprev=pass",
    ] {
        assert!(ours[0].contains(want), "{want:?} missing in {}", ours[0]);
    }
    assert!(!bob.contains("(forged)"), "{bob}");
    assert!(
        bob.contains("Authentication-Results: other.example; spf=pass (kept)"),
        "{bob}"
    );
    assert!(bob.starts_with("Authentication-Results: mx1.tern.test;"), "{bob}");
    assert!(
        fields(&bob).iter().any(|f| f.starts_with("Received-SPF: pass")),
        "{bob}"
    );
    assert!(!bob.contains("X-Tern-Quarantine"), "{bob}");
    // Our additions on top leave the sender's signature intact.
    let out = Command::new("python3")
        .arg(SENDER)
        .arg("--verify")
        .arg(&path)
        .arg("--dns")
        .arg(dns.addr.to_string())
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "dkim=pass",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let (_, carol) = delivered(maildirs.path(), "carol");
    assert!(
        fields(&carol).iter().any(|f| f == "X-Tern-Quarantine: dmarc"),
        "{carol}"
    );
    let ours = our_results(&carol);
    assert_eq!(ours.len(), 1, "{carol}");
    assert!(
        ours[0].contains("dmarc=fail") && ours[0].contains("policy.dmarc=quarantine"),
        "{}",
        ours[0]
    );
    assert!(node.logs().contains("inbound checks"), "one log line per check");
    wait_for(Duration::from_secs(30), "empty queue", || {
        node.ternctl_json(&["queue", "summary"])["messages"] == 0
    });
}

#[test]
fn monitor_mode_records_dmarc_fail_and_delivers() {
    if !peers_available() {
        return;
    }
    let dns = DnsServer::start(&zone(""));
    let maildirs = tempfile::tempdir().unwrap();
    let node = mx(dns.addr, maildirs.path(), "[inbound]\ndmarc_policy = \"monitor\"\n");
    let spoof = [
        "--mail-from",
        "ceo@spoof.test",
        "--rcpt",
        "bob@example.test",
        "--from-header",
        "ceo@spoof.test",
    ];
    let reply = send(&node, &spoof);
    assert!(reply.starts_with("250"), "{reply}");
    let (_, bob) = delivered(maildirs.path(), "bob");
    let ours = our_results(&bob);
    assert_eq!(ours.len(), 1, "{bob}");
    for want in [
        "spf=fail",
        "dkim=none",
        "dmarc=fail (policy not aligned) header.from=spoof.test policy.dmarc=reject",
    ] {
        assert!(ours[0].contains(want), "{want:?} missing in {}", ours[0]);
    }
    assert!(!bob.contains("X-Tern-Quarantine"), "{bob}");
    drop(node);

    // spf_fail = "reject" refuses an SPF fail by itself, whatever DMARC says.
    let node = mx(
        dns.addr,
        maildirs.path(),
        "[inbound]\ndmarc_policy = \"monitor\"\nspf_fail = \"reject\"\n",
    );
    let reply = send(&node, &spoof);
    assert!(reply.starts_with("550 5.7.23"), "{reply}");
}

#[test]
fn dns_failures_answer_451_never_5xx() {
    if !peers_available() {
        return;
    }
    let maildirs = tempfile::tempdir().unwrap();
    let spoof = [
        "--mail-from",
        "ceo@spoof.test",
        "--rcpt",
        "bob@example.test",
        "--from-header",
        "ceo@spoof.test",
    ];
    let rt = tokio::runtime::Runtime::new().unwrap();
    let servfail = rt.block_on(ServfailServer::start());
    let node = mx(servfail.addr, maildirs.path(), "");
    let reply = send(&node, &spoof);
    assert!(reply.starts_with("451 4.7.0"), "{reply}");
    drop(node);

    // A server that never answers: the checks run out of time.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let node = mx(
        silent.local_addr().unwrap(),
        maildirs.path(),
        "[inbound]\ntimeout_secs = 3\n",
    );
    let started = Instant::now();
    let reply = send(&node, &spoof);
    assert!(reply.starts_with("451 4.7.0"), "{reply}");
    assert!(started.elapsed() < Duration::from_secs(15), "{:?}", started.elapsed());
    assert_eq!(node.ternctl_json(&["queue", "summary"])["messages"], 0);
    assert!(!maildirs.path().join("example.test").exists());
}

/// The harness's default config keeps loopback trusted: no check, no DNS.
#[test]
fn loopback_clients_are_trusted_by_default() {
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let maildirs = tempfile::tempdir().unwrap();
    let node = Node::start(&format!(
        "[dns]\nnameservers = [\"{}\"]\n\n[policy]\nlocal_domains = [\"example.test\"]\n\n[local]\nmaildir = \"{}/{{domain}}/{{user}}\"\n",
        silent.local_addr().unwrap(),
        maildirs.path().display()
    ));
    let mut c = Client::connect(node.smtp).unwrap();
    c.command("EHLO client.sender.test").unwrap();
    c.send_mail("ceo@spoof.test", &["bob@example.test"], &body("trusted-1", 100))
        .unwrap();
    let (_, bob) = delivered(maildirs.path(), "bob");
    assert!(!bob.contains("Authentication-Results"), "{bob}");
    assert!(!node.logs().contains("inbound checks"));
}
