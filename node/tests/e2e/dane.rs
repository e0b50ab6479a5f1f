//! DANE (RFC 7672) end to end: knot serves a DNSSEC-signed `test.` zone
//! (signed by knot itself, keys from its own KASP) on a free loopback
//! port, with TLSA records made from the certificate of a real aiosmtpd
//! peer; Tern's validating resolver asks knot directly and trusts the
//! zone's KSK (`[dane] trust_anchor`). `unsigned.test.` is an insecure
//! delegation (no DS), `bogus.test.` a signed child whose DS in `test.`
//! does not match its key (every answer from it is bogus).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::*;
use tern_testkit::peers::{Aiosmtpd, TestCa};

/// A running knotd; killed when dropped.
struct Knot {
    port: u16,
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for Knot {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sh(cmd: &str, dir: &Path) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).current_dir(dir).output().unwrap();
    assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

impl Knot {
    /// knotd serving `test.` (signed, `parent` records appended),
    /// `unsigned.test.` (not signed) and `bogus.test.` (signed) from zone
    /// files; waits until the signed answers are served.
    fn start(parent: &str, unsigned: &str, bogus: &str) -> Knot {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let port = tern_testkit::ports::free_udp_tcp_port();
        let conf = d.join("knot.conf");
        fs::write(
            &conf,
            format!(
                "server:\n  listen: 127.0.0.1@{port}\n  rundir: {d}\n\
                 database:\n  storage: {d}/db\n\
                 template:\n  - id: default\n    storage: {d}\n    file: \"%s.zone\"\n    journal-content: none\n\
                 policy:\n  - id: ecdsa\n    algorithm: ecdsap256sha256\n    nsec3: off\n    ksk-lifetime: 0\n    zsk-lifetime: 0\n\
                 zone:\n  - domain: test.\n    dnssec-signing: on\n    dnssec-policy: ecdsa\n\
                 \x20 - domain: unsigned.test.\n\
                 \x20 - domain: bogus.test.\n    dnssec-signing: on\n    dnssec-policy: ecdsa\n",
                d = d.display()
            ),
        )
        .unwrap();
        let soa = "$TTL 300\n@ SOA ns.test. admin.test. 1 3600 600 86400 300\n@ NS ns.test.\n";
        fs::write(
            d.join("test.zone"),
            format!(
                "$ORIGIN test.\n{soa}ns A 127.0.0.1\n\
                 unsigned NS ns.test.\nbogus NS ns.test.\n\
                 bogus DS 4242 13 2 {}\n{parent}",
                "ab".repeat(32)
            ),
        )
        .unwrap();
        fs::write(
            d.join("unsigned.test.zone"),
            format!("$ORIGIN unsigned.test.\n{soa}{unsigned}"),
        )
        .unwrap();
        fs::write(d.join("bogus.test.zone"), format!("$ORIGIN bogus.test.\n{soa}{bogus}")).unwrap();
        fs::create_dir(d.join("db")).unwrap();
        let log = fs::File::create(d.join("knotd.log")).unwrap();
        let child = Command::new("knotd")
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("knotd (apt-get install knot)");
        let knot = Knot { port, child, dir };
        knot.wait_signed("test.");
        knot.wait_signed("bogus.test.");
        knot
    }

    fn wait_signed(&self, zone: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = Command::new("kdig")
                .args(["@127.0.0.1", "-p", &self.port.to_string(), "+dnssec", zone, "SOA"])
                .output()
                .unwrap();
            if String::from_utf8_lossy(&out.stdout).contains("\tRRSIG\t") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "knot did not sign {zone}: {}",
                fs::read_to_string(self.dir.path().join("knotd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Every DNSKEY of `test.` (KSK and ZSK, as served) as a trust anchor
    /// file: hickory asks for the DS of a zone unless all its keys are
    /// anchors, and knot has no parent to answer that.
    fn trust_anchor(&self) -> PathBuf {
        let out = sh(
            &format!("kdig @127.0.0.1 -p {} test. DNSKEY", self.port),
            self.dir.path(),
        );
        let keys: Vec<String> = out
            .lines()
            .filter(|l| l.contains("\tDNSKEY\t"))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        assert_eq!(keys.len(), 2, "{out}");
        let path = self.dir.path().join("anchor.keys");
        fs::write(&path, keys.join("\n") + "\n").unwrap();
        path
    }
}

/// `TLSA 3 1 1` of a certificate: SHA-256 of its public key (openssl).
fn tlsa_311(cert: &Path, dir: &Path) -> String {
    let hex = sh(
        &format!(
            "openssl x509 -in {} -noout -pubkey | openssl pkey -pubin -outform DER | sha256sum",
            cert.display()
        ),
        dir,
    );
    format!("3 1 1 {}", &hex[..64])
}

/// `TLSA 2 0 1` of a CA: SHA-256 of its whole certificate.
fn tlsa_201(cert: &Path, dir: &Path) -> String {
    let hex = sh(
        &format!("openssl x509 -in {} -outform DER | sha256sum", cert.display()),
        dir,
    );
    format!("2 0 1 {}", &hex[..64])
}

fn send(node: &Node, to: &str, tag: &str) -> String {
    let mut c = Client::connect(node.smtp).unwrap();
    c.command("EHLO sender.test").unwrap();
    c.send_mail("a@tern.test", &[to], &body(tag, 512)).unwrap()
}

fn recipient(node: &Node, id: &str) -> serde_json::Value {
    node.ternctl_json(&["queue", "show", id])["recipients"][0].clone()
}

#[test]
fn dane_delivers_on_matching_tlsa_and_defers_on_mismatch_bogus_or_missing() {
    if !Aiosmtpd::available() || !tern_testkit::peers::require("knotd") {
        return;
    }
    let ca = TestCa::new("Tern DANE Test CA");
    let names = [
        "mx.good.test",
        "mx.ta.test",
        "mx.wrong.test",
        "mx.notlsa.test",
        "mx.unsigned.test",
        "mx.bogus.test",
        "mx.fallback.test",
    ];
    let (cert, key) = ca.issue("mx", &names);
    // The chain file holds the CA too, as DANE-TA needs (RFC 7672 §3.2.1).
    let chain = cert.with_file_name("chain.pem");
    fs::write(&chain, [fs::read(&cert).unwrap(), fs::read(&ca.cert).unwrap()].concat()).unwrap();
    let peer = Aiosmtpd::start_with_cert(&chain, &key);
    let tmp = tempfile::tempdir().unwrap();
    let ee = tlsa_311(&cert, tmp.path());
    let ta = tlsa_201(&ca.cert, tmp.path());
    let other = TestCa::new("Unrelated CA");
    let wrong = tlsa_311(&other.cert, tmp.path());
    let mut parent = String::new();
    for name in ["good", "ta", "wrong", "notlsa", "fallback"] {
        parent.push_str(&format!("{name} MX 10 mx.{name}.test.\nmx.{name} A 127.0.0.1\n"));
    }
    parent.push_str(&format!(
        "_25._tcp.mx.good TLSA {ee}\n_25._tcp.mx.ta TLSA {ta}\n_25._tcp.mx.wrong TLSA {wrong}\n"
    ));
    let knot = Knot::start(
        &parent,
        "@ MX 10 mx\nmx A 127.0.0.1\n",
        &format!("@ MX 10 mx\nmx A 127.0.0.1\n_25._tcp.mx TLSA {ee}\n"),
    );
    let anchor = knot.trust_anchor();
    let node = Node::start(&format!(
        "[log]\nformat = \"json\"\n\n[dns]\nnameservers = [\"127.0.0.1:{}\"]\n\n\
         [delivery]\nsmtp_port = {}\nretry_schedule = [\"1h\"]\n\n\
         [dane]\nenabled = true\ntrust_anchor = \"{}\"\n\n\
         [[tls_policy]]\ndomain = \"notlsa.test\"\nlevel = \"dane-only\"\n",
        knot.port,
        peer.peer.addr.port(),
        anchor.display()
    ));

    // Delivered: DANE-EE, DANE-TA, and the fallbacks to `may` (an insecure
    // zone; a secure zone without TLSA at level `dane`).
    let delivered: Vec<(String, &str)> = [
        ("rcpt@good.test", "dane-ee"),
        ("rcpt@ta.test", "dane-ta"),
        ("rcpt@unsigned.test", "insecure-may"),
        ("rcpt@fallback.test", "no-tlsa-may"),
    ]
    .iter()
    .map(|(to, tag)| (send(&node, to, tag), *tag))
    .collect();
    // Deferred: a TLSA that matches nothing, a bogus zone, dane-only without TLSA.
    let deferred: Vec<(String, &str)> = [
        ("rcpt@wrong.test", "certificate matches no TLSA record"),
        ("rcpt@bogus.test", "DANE"),
        ("rcpt@notlsa.test", "no DNSSEC-secure TLSA records"),
    ]
    .iter()
    .map(|(to, why)| (send(&node, to, &format!("deferred-{to}")), *why))
    .collect();

    let got = peer.wait_messages(delivered.len());
    for (_, tag) in &delivered {
        assert!(
            got.iter()
                .any(|m| String::from_utf8_lossy(m).contains(&format!("{tag}@tern.test"))),
            "{tag} not delivered"
        );
    }
    for (id, why) in &deferred {
        wait_for(Duration::from_secs(60), "the deferral", || {
            recipient(&node, id)["status"] == "deferred"
        });
        let reply = recipient(&node, id)["last_reply"].as_str().unwrap().to_owned();
        assert!(reply.starts_with("451 4.7.5 "), "{reply}");
        assert!(reply.contains(why), "{reply}");
    }
    // Nothing more reached the peer (the deferrals are settled above).
    assert_eq!(peer.messages().len(), delivered.len(), "{}", node.logs());
    // Every delivery was over TLS.
    for l in node.logs().lines().filter(|l| l.contains("\"event\":\"delivered\"")) {
        assert!(l.contains("TLSv1."), "{l}");
    }
}
