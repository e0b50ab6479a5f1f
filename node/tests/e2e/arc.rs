//! ARC sealing end to end: ternd is the MX for example.test with `[arc]`
//! on, its `[dns]` a real dnsmasq publishing the sender's SPF/DMARC and our
//! sealing key; `relay_networks = []` makes the loopback client untrusted.
//! dkimpy (`dkim.arc_verify`, arc_check.py), an independent
//! implementation, verifies the chain Tern sealed: one set on the first
//! pass, two when the sealed message comes through again (a second
//! forwarding hop).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::harness::*;
use tern_testkit::dns::DnsServer;
use tern_testkit::peers::ExactSink;

const HELPER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e/arc_check.py");
const SENDER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e/dkim_send.py");

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

/// A fresh RSA-2048 key and the dnsmasq line publishing it at `name`.
fn rsa_key(dir: &Path, name: &str) -> (PathBuf, String) {
    let key = dir.join(format!("{name}.pem"));
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
    let parts: Vec<String> = record
        .as_bytes()
        .chunks(200)
        .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
        .collect();
    (key, format!("txt-record={name},{}", parts.join(",")))
}

/// The messages delivered to `user@example.test`, once there are `n`.
fn delivered(maildirs: &Path, user: &str, n: usize) -> Vec<PathBuf> {
    let new = maildirs.join("example.test").join(user).join("new");
    wait_for(Duration::from_secs(30), &format!("{n} message(s) for {user}"), || {
        std::fs::read_dir(&new).map(|d| d.count()).unwrap_or(0) == n
    });
    std::fs::read_dir(&new).unwrap().map(|e| e.unwrap().path()).collect()
}

fn helper(args: &[&str]) -> String {
    let out = Command::new("python3").arg(HELPER).args(args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn arc_sets(message: &str) -> usize {
    message.lines().filter(|l| l.starts_with("ARC-Seal:")).count()
}

#[test]
fn arc_seals_verify_with_dkimpy() {
    if !peers_available() {
        return;
    }
    let keys = tempfile::tempdir().unwrap();
    let (key, record) = rsa_key(keys.path(), "arc1._domainkey.tern.test");
    let dns = DnsServer::start(&format!(
        "txt-record=sender.test,\"v=spf1 ip4:127.0.0.1 -all\"\n\
         txt-record=_dmarc.sender.test,\"v=DMARC1; p=reject\"\n\
         host-record=client.sender.test,127.0.0.1\n\
         ptr-record=1.0.0.127.in-addr.arpa,client.sender.test\n\
         {record}\n"
    ));
    let maildirs = tempfile::tempdir().unwrap();
    let node = Node::start(&format!(
        "[dns]\nnameservers = [\"{}\"]\n\n[policy]\nrelay_networks = []\nlocal_domains = [\"example.test\"]\n\n\
         [local]\nmaildir = \"{}/{{domain}}/{{user}}\"\n\n\
         [arc]\nenabled = true\ndomain = \"tern.test\"\nselector = \"arc1\"\nkey_file = \"{}\"\nseal = \"all\"\n",
        dns.addr,
        maildirs.path().display(),
        key.display()
    ));

    // First hop: a plain message from sender.test.
    let out = Command::new("python3")
        .arg(SENDER)
        .args(["--server", &node.smtp.to_string()])
        .args(["--mail-from", "alice@sender.test", "--rcpt", "bob@example.test"])
        .args(["--from-header", "alice@sender.test"])
        .output()
        .unwrap();
    let reply = String::from_utf8_lossy(&out.stdout);
    assert!(reply.starts_with("250"), "{reply}");
    let first = delivered(maildirs.path(), "bob", 1).remove(0);
    let text = std::fs::read_to_string(&first).unwrap();
    assert_eq!(arc_sets(&text), 1, "{text}");
    assert!(text.contains("i=1; a=rsa-sha256") || text.contains("i=1;"), "{text}");
    assert!(text.contains("cv=none"), "{text}");
    assert!(
        text.contains("ARC-Authentication-Results: i=1; mx1.tern.test"),
        "{text}"
    );
    let dns_addr = dns.addr.to_string();
    let verdict = helper(&["verify", first.to_str().unwrap(), &dns_addr]);
    assert!(verdict.starts_with("cv=pass sets=1"), "{verdict}\n{text}");

    // Second hop: the sealed message comes in again (a forwarder passing
    // it on); our verification passes the chain and adds set 2.
    let reply = helper(&[
        "resend",
        first.to_str().unwrap(),
        &node.smtp.to_string(),
        "alice@sender.test",
        "carol@example.test",
    ]);
    assert!(reply.starts_with("250"), "{reply}");
    let second = delivered(maildirs.path(), "carol", 1).remove(0);
    let text = std::fs::read_to_string(&second).unwrap();
    assert_eq!(arc_sets(&text), 2, "{text}");
    assert!(text.contains("arc=pass"), "{text}");
    assert!(text.contains("cv=pass"), "{text}");
    let verdict = helper(&["verify", second.to_str().unwrap(), &dns_addr]);
    assert!(verdict.starts_with("cv=pass sets=2"), "{verdict}\n{text}");
}

/// The default `seal = "relayed"`: mail relayed onward (for
/// `relay_domains`) is sealed, mail delivered locally is not; the key is
/// lent by the `[[dkim]]` entry with the same domain and selector.
#[test]
fn arc_seals_relayed_mail_only() {
    if !peers_available() {
        return;
    }
    let keys = tempfile::tempdir().unwrap();
    let (key, record) = rsa_key(keys.path(), "arc1._domainkey.tern.test");
    let dns = DnsServer::start(&format!(
        "txt-record=sender.test,\"v=spf1 ip4:127.0.0.1 -all\"\n\
         txt-record=_dmarc.sender.test,\"v=DMARC1; p=reject\"\n\
         {record}\n"
    ));
    let sink = ExactSink::start();
    let maildirs = tempfile::tempdir().unwrap();
    let node = Node::start(&format!(
        "[dns]\nnameservers = [\"{}\"]\n\n[policy]\nrelay_networks = []\nlocal_domains = [\"example.test\"]\n\
         relay_domains = [\"relay.test\"]\n\n[local]\nmaildir = \"{}/{{domain}}/{{user}}\"\n\n\
         [[dkim]]\ndomain = \"tern.test\"\nselector = \"arc1\"\nalgorithm = \"rsa-sha256\"\nprivate_key = \"{}\"\n\n\
         [[route]]\ndomain = \"relay.test\"\nto = \"{}\"\n\n\
         [arc]\nenabled = true\ndomain = \"tern.test\"\nselector = \"arc1\"\n",
        dns.addr,
        maildirs.path().display(),
        key.display(),
        sink.peer.addr
    ));
    for rcpt in ["bob@example.test", "fwd@relay.test"] {
        let out = Command::new("python3")
            .arg(SENDER)
            .args(["--server", &node.smtp.to_string()])
            .args(["--mail-from", "alice@sender.test", "--rcpt", rcpt])
            .args(["--from-header", "alice@sender.test"])
            .output()
            .unwrap();
        let reply = String::from_utf8_lossy(&out.stdout);
        assert!(reply.starts_with("250"), "{rcpt}: {reply}");
    }
    let local = delivered(maildirs.path(), "bob", 1).remove(0);
    let text = std::fs::read_to_string(&local).unwrap();
    assert_eq!(arc_sets(&text), 0, "local delivery is not sealed:\n{text}");
    assert!(text.contains("Authentication-Results: mx1.tern.test;"), "{text}");

    let relayed = sink.wait_messages(1).remove(0);
    let path = keys.path().join("relayed.eml");
    std::fs::write(&path, &relayed).unwrap();
    let text = String::from_utf8_lossy(&relayed);
    assert_eq!(arc_sets(&text), 1, "{text}");
    let verdict = helper(&["verify", path.to_str().unwrap(), &dns.addr.to_string()]);
    assert!(verdict.starts_with("cv=pass sets=1"), "{verdict}\n{text}");
}
