//! DKIM signing end to end: keys made by `ternctl dkim generate`, outbound
//! mail signed by ternd and delivered to a sink that keeps the exact bytes,
//! and every signature checked by an independent verifier (Python's dkimpy)
//! against TXT records served by a real DNS server (dnsmasq) on loopback.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use crate::harness::*;
use tern_testkit::dns::DnsServer;
use tern_testkit::peers::{Aiosmtpd, ExactSink};

/// Verifies each message file's DKIM signatures with dkimpy; prints a JSON
/// list (per file) of lists (per DKIM-Signature, top first) of
/// `{a, s, d, pass}`, and why a signature failed on stderr. Keys come from
/// the DNS server at 127.0.0.1:argv[1].
const VERIFY: &str = r#"
import email, json, sys
import dkim, dkim.util, dns.resolver

resolver = dns.resolver.Resolver(configure=False)
resolver.nameservers = ["127.0.0.1"]
resolver.port = int(sys.argv[1])

def dnsfunc(name, timeout=5):
    if isinstance(name, bytes):
        name = name.decode()
    try:
        answer = resolver.resolve(name, "TXT", lifetime=timeout)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return None
    return b"".join(answer[0].strings)

out = []
for path in sys.argv[2:]:
    msg = open(path, "rb").read()
    results = []
    for i, value in enumerate(email.message_from_bytes(msg).get_all("DKIM-Signature") or []):
        tags = dkim.util.parse_tag_value(value.encode())
        try:
            ok = dkim.DKIM(msg).verify(idx=i, dnsfunc=dnsfunc)
        except dkim.DKIMException as e:
            # What dkim.verify() does too: a bad signature is a failure.
            print("%s signature %d: %s" % (path, i, e), file=sys.stderr)
            ok = False
        results.append({t: tags[t.encode()].decode() for t in ("a", "s", "d")} | {"pass": bool(ok)})
    out.append(results)
print(json.dumps(out))
"#;

/// dkimpy with dnspython and PyNaCl (for Ed25519); false to skip, a
/// failure under `TERN_REQUIRE_PEERS=1`.
pub(crate) fn dkimpy_available() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import dkim, dns.resolver, nacl"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var("TERN_REQUIRE_PEERS").as_deref() != Ok("1"),
            "python modules dkimpy, dnspython and pynacl are required (TERN_REQUIRE_PEERS=1)"
        );
        eprintln!("skipping: dkimpy, dnspython or pynacl not installed");
    }
    ok
}

pub(crate) fn generate(args: &[&str]) -> Output {
    Command::new(ternctl_bin())
        .args(["dkim", "generate"])
        .args(args)
        .output()
        .expect("run ternctl")
}

/// dkimpy's verdicts for each file (see [`VERIFY`]) and its notes on failures.
pub(crate) fn verify(dns: &DnsServer, files: &[&Path]) -> (serde_json::Value, String) {
    let out = Command::new("python3")
        .args(["-c", VERIFY, &dns.addr.port().to_string()])
        .args(files)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "verifier failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let notes = String::from_utf8_lossy(&out.stderr).into_owned();
    (serde_json::from_slice(&out.stdout).expect("verifier json"), notes)
}

fn swaks(node: &Node, from: &str, data: &Path) -> Output {
    Command::new("swaks")
        .args(["--server", &node.smtp.to_string(), "--timeout", "30"])
        .args(["--from", from, "--to", "rcpt@elsewhere.test", "--ehlo", "client.test"])
        .arg("--data")
        .arg(format!("@{}", data.display()))
        .output()
        .expect("swaks is installed by cluster-tests/run-all.sh")
}

#[test]
fn outbound_mail_gets_ed25519_and_rsa_signatures_that_dkimpy_verifies() {
    if !Aiosmtpd::available() || !dkimpy_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();

    // Ed25519, JSON output.
    let ed_file = dir.path().join("ed.pem");
    let ed_path = ed_file.to_str().unwrap();
    let out = generate(&[
        "--domain",
        "Example.test",
        "--selector",
        "ed",
        "--algorithm",
        "ed25519",
        "--out",
        ed_path,
        "-o",
        "json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ed["domain"], "example.test");
    assert_eq!(ed["selector"], "ed");
    assert_eq!(ed["algorithm"], "ed25519-sha256");
    assert_eq!(ed["key_file"], ed_path);
    assert_eq!(ed["txt_name"], "ed._domainkey.example.test");
    let ed_txt = ed["txt_value"].as_str().unwrap();
    assert!(ed_txt.starts_with("v=DKIM1; k=ed25519; p="), "{ed_txt}");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&ed_file).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let ed_pem = std::fs::read_to_string(&ed_file).unwrap();
    assert!(ed_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
    // An existing key file is never overwritten.
    let again = generate(&[
        "--domain",
        "example.test",
        "--selector",
        "ed",
        "--algorithm",
        "ed25519",
        "--out",
        ed_path,
    ]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists"));
    assert_eq!(std::fs::read_to_string(&ed_file).unwrap(), ed_pem);

    // RSA, text output: the printed [[dkim]] entry goes into the config and
    // the printed zone-file record (several strings) into the DNS server.
    let rsa_file = dir.path().join("rsa.pem");
    let out = generate(&[
        "--domain",
        "example.test",
        "--selector",
        "rsa",
        "--algorithm",
        "rsa",
        "--bits",
        "2048",
        "--out",
        rsa_file.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let start = text.find("[[dkim]]").expect("config entry printed");
    let rsa_entry = &text[start..start + text[start..].find("\n\n").unwrap()];
    assert!(rsa_entry.contains("algorithm = \"rsa-sha256\""), "{rsa_entry}");
    let record = text
        .lines()
        .find(|l| l.starts_with("rsa._domainkey.example.test. IN TXT "))
        .unwrap_or_else(|| panic!("no TXT record in:\n{text}"));
    let strings = record.split_once(" IN TXT ").unwrap().1;
    let parts: Vec<&str> = strings.split("\" \"").collect();
    assert!(parts.len() >= 2, "a 2048-bit key needs two TXT strings: {record}");
    assert!(parts.iter().all(|p| p.trim_matches('"').len() <= 255), "{record}");
    assert!(strings.starts_with("\"v=DKIM1; k=rsa; p=MII"), "{record}");

    let dns = DnsServer::start(&format!(
        "txt-record=ed._domainkey.example.test,\"{ed_txt}\"\ntxt-record=rsa._domainkey.example.test,{}\n",
        strings.replace("\" \"", "\",\"")
    ));
    let sink = ExactSink::start();
    let node = Node::start(&format!(
        "[[dkim]]\ndomain = \"example.test\"\nselector = \"ed\"\nalgorithm = \"ed25519-sha256\"\nprivate_key = \"{ed_path}\"\n\n\
         {rsa_entry}\n\n[[route]]\ndomain = \"*\"\nto = \"{}\"\n",
        sink.peer.addr
    ));

    // From 127.0.0.1 (in the default relay_networks): outbound. A folded
    // From, a line that needs dot-stuffing, and trailing blank lines.
    let signed_data = dir.path().join("signed.txt");
    std::fs::write(
        &signed_data,
        "From: \"Some One\"\r\n <someone@example.test>\r\nTo: rcpt@elsewhere.test\r\nSubject: dkim e2e\r\n\
         Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <dkim-signed@example.test>\r\n\r\n\
         Hello,\r\n.a line starting with a dot\r\n\r\nbye\r\n\r\n",
    )
    .unwrap();
    let out = swaks(&node, "someone@example.test", &signed_data);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    // The same from a domain we hold no key for: delivered unsigned.
    let unsigned_data = dir.path().join("unsigned.txt");
    std::fs::write(
        &unsigned_data,
        "From: other@unsigned.test\r\nTo: rcpt@elsewhere.test\r\nSubject: no key\r\n\
         Message-ID: <dkim-unsigned@example.test>\r\n\r\nHello.\r\n",
    )
    .unwrap();
    let out = swaks(&node, "other@unsigned.test", &unsigned_data);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));

    let messages = sink.wait_messages(2);
    let find = |id: &str| -> Vec<u8> {
        messages
            .iter()
            .find(|m| String::from_utf8_lossy(m).contains(id))
            .unwrap_or_else(|| panic!("{id} not delivered"))
            .clone()
    };
    let signed = find("<dkim-signed@example.test>");
    let unsigned = find("<dkim-unsigned@example.test>");
    let signed_text = String::from_utf8_lossy(&signed).into_owned();
    assert!(signed_text.starts_with("DKIM-Signature: "), "{signed_text}");
    assert!(
        !String::from_utf8_lossy(&unsigned).contains("DKIM-Signature"),
        "{}",
        String::from_utf8_lossy(&unsigned)
    );
    assert!(
        signed_text.contains("\r\n.a line starting with a dot\r\n"),
        "{signed_text}"
    );

    // A copy with one body byte changed must fail both signatures.
    let body_at = signed_text.find("Hello,").unwrap();
    let mut tampered = signed.clone();
    tampered[body_at] = b'J';
    let (signed_file, tampered_file, unsigned_file) = (
        dir.path().join("signed.eml"),
        dir.path().join("tampered.eml"),
        dir.path().join("unsigned.eml"),
    );
    std::fs::write(&signed_file, &signed).unwrap();
    std::fs::write(&tampered_file, &tampered).unwrap();
    std::fs::write(&unsigned_file, &unsigned).unwrap();
    let (verdicts, notes) = verify(&dns, &[&signed_file, &tampered_file, &unsigned_file]);

    let sig = |a: &str, s: &str, pass: bool| serde_json::json!({"a": a, "s": s, "d": "example.test", "pass": pass});
    assert_eq!(
        verdicts[0],
        serde_json::json!([sig("ed25519-sha256", "ed", true), sig("rsa-sha256", "rsa", true)]),
        "{notes}\n{signed_text}\n{}",
        dns.log()
    );
    assert_eq!(
        verdicts[1],
        serde_json::json!([sig("ed25519-sha256", "ed", false), sig("rsa-sha256", "rsa", false)])
    );
    assert_eq!(notes.matches("body hash mismatch").count(), 2, "{notes}");
    assert_eq!(verdicts[2], serde_json::json!([]));
}

#[test]
fn ternd_refuses_to_start_with_an_unusable_key_and_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("ed.pem");
    let out = generate(&[
        "--domain",
        "example.test",
        "--selector",
        "s",
        "--algorithm",
        "ed25519",
        "--out",
        key.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    // An Ed25519 key configured as RSA.
    let config = dir.path().join("tern.toml");
    std::fs::write(
        &config,
        format!(
            "[node]\ndata_dir = \"{}\"\n\n[listen]\nsmtp = [\"127.0.0.1:0\"]\ngrpc = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\n\n\
             [[dkim]]\ndomain = \"example.test\"\nselector = \"s\"\nalgorithm = \"rsa-sha256\"\nprivate_key = \"{}\"\n",
            dir.path().join("data").display(),
            key.display()
        ),
    )
    .unwrap();
    let out = Command::new(ternd_bin()).arg("--config").arg(&config).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&key.display().to_string()) && err.contains("Ed25519"),
        "{err}"
    );
    assert!(String::from_utf8_lossy(&out.stdout)
        .lines()
        .all(|l| !l.starts_with("listening")));

    // Bad arguments are a usage error (exit 2) and write nothing.
    let bad = dir.path().join("bad.pem");
    for args in [
        vec!["--domain", "exa mple.test", "--selector", "s", "--algorithm", "ed25519"],
        vec![
            "--domain",
            "example.test",
            "--selector",
            "s",
            "--algorithm",
            "rsa",
            "--bits",
            "1024",
        ],
    ] {
        let out = generate(&[args, vec!["--out", bad.to_str().unwrap()]].concat());
        assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(!bad.exists());
    }
}
