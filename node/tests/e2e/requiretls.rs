//! REQUIRETLS (RFC 8689) end to end: a client (python smtplib, STARTTLS)
//! sends `MAIL ... REQUIRETLS` to ternd; the next hop is an aiosmtpd peer
//! with a certificate from a test CA that offers REQUIRETLS (or not), MX
//! names served by dnsmasq.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::harness::*;
use tern_testkit::dns::DnsServer;
use tern_testkit::peers::{Aiosmtpd, TestCa};

/// An aiosmtpd server that offers REQUIRETLS under TLS when told to, and
/// keeps each message as `DIR/msg-N-<requiretls|plain>-<tls|clear>.eml`.
const PEER: &str = r#"
import asyncio, os, ssl, sys
from aiosmtpd.smtp import SMTP
directory, cert, key, offer = sys.argv[1:5]
ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
ctx.load_cert_chain(cert, key)
class Peer(SMTP):
    async def smtp_MAIL(self, arg):
        words = (arg or "").split(" ")
        kept = [w for w in words if w.upper() != "REQUIRETLS"]
        self.session.requiretls = len(kept) != len(words)
        return await super().smtp_MAIL(" ".join(kept))
class Handler:
    count = 0
    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        if offer == "1" and session.ssl is not None:
            responses.insert(len(responses) - 1, "250-REQUIRETLS")
        return responses
    async def handle_DATA(self, server, session, envelope):
        Handler.count += 1
        tag = "requiretls" if getattr(session, "requiretls", False) else "plain"
        tls = "tls" if session.ssl is not None else "clear"
        path = os.path.join(directory, "msg-%d-%s-%s.eml" % (Handler.count, tag, tls))
        with open(path + ".tmp", "wb") as f:
            f.write(envelope.original_content)
        os.rename(path + ".tmp", path)
        return "250 2.0.0 kept"
async def main():
    handler = Handler()
    server = await asyncio.get_running_loop().create_server(
        lambda: Peer(handler, tls_context=ctx), "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()
asyncio.run(main())
"#;

struct Peer {
    port: u16,
    dir: tempfile::TempDir,
    child: Child,
}

impl Peer {
    fn start(cert: &Path, key: &Path, offer_requiretls: bool) -> Peer {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(PEER)
            .arg(dir.path())
            .arg(cert)
            .arg(key)
            .arg(if offer_requiretls { "1" } else { "0" })
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line.trim().parse().unwrap_or_else(|_| panic!("peer said {line:?}"));
        Peer { port, dir, child }
    }

    /// File names of the messages kept so far.
    fn messages(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".eml"))
            .collect();
        names.sort();
        names
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends one message over STARTTLS with python's smtplib; returns the
/// queue id from the 250 reply.
fn send_over_tls(node: &Node, to: &str, tag: &str, requiretls: bool) -> String {
    let script = r#"
import smtplib, ssl, sys
port, to, tag, requiretls = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] == "1"
s = smtplib.SMTP("127.0.0.1", port, timeout=30)
s.ehlo("client.test")
s.starttls(context=ssl._create_unverified_context())
s.ehlo("client.test")
assert s.has_extn("requiretls"), s.esmtp_features
msg = "From: <a@tern.test>\r\nTo: <%s>\r\nSubject: %s\r\nMessage-ID: <%s@tern.test>\r\n\r\nhello\r\n" % (to, tag, tag)
s.mail("a@tern.test", ["REQUIRETLS"] if requiretls else [])
s.rcpt(to)
code, reply = s.data(msg)
assert code == 250, (code, reply)
print(reply.decode().split()[-1])
s.quit()
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(node.smtp.port().to_string())
        .arg(to)
        .arg(tag)
        .arg(if requiretls { "1" } else { "0" })
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn events(node: &Node, id: &str) -> Vec<serde_json::Value> {
    node.logs()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["target"] == "tern::event" && l["fields"]["msg_id"] == id)
        .map(|l| l["fields"].clone())
        .collect()
}

fn wait_event(node: &Node, id: &str, event: &str) -> serde_json::Value {
    wait_for(Duration::from_secs(60), event, || {
        events(node, id).iter().any(|e| e["event"] == event)
    });
    events(node, id).into_iter().find(|e| e["event"] == event).unwrap()
}

fn node(dir: &Path, dns: &DnsServer, ca: &TestCa, smtp_port: u16) -> Node {
    let (cert, key) = self_signed_cert(dir, "mx1.tern.test");
    Node::start(&format!(
        "[log]\nformat = \"json\"\n\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n\n[dns]\nnameservers = [\"{}\"]\n\n\
         [delivery]\nsmtp_port = {smtp_port}\nretry_schedule = [\"1h\"]\ntls_ca_file = \"{}\"\n",
        cert.display(),
        key.display(),
        dns.addr,
        ca.cert.display()
    ))
}

#[test]
fn requiretls_is_relayed_over_verified_tls_to_a_host_that_offers_it() {
    if !Aiosmtpd::available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("Tern Test CA");
    let (cert, key) = ca.issue("mx", &["mx.secure.test"]);
    let peer = Peer::start(&cert, &key, true);
    let dns = DnsServer::start("mx-host=secure.test,mx.secure.test,10\nhost-record=mx.secure.test,127.0.0.1\n");
    let node = node(dir.path(), &dns, &ca, peer.port);
    let id = send_over_tls(&node, "rcpt@secure.test", "rt-ok", true);
    let delivered = wait_event(&node, &id, "delivered");
    assert_eq!(delivered["relay"], "mx.secure.test", "{delivered}");
    let kept = peer.messages();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(
        kept[0].ends_with("-requiretls-tls.eml"),
        "REQUIRETLS passed on, over TLS: {kept:?}"
    );
}

#[test]
fn requiretls_fails_with_5_7_30_when_the_next_hop_does_not_offer_it() {
    if !Aiosmtpd::available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("Tern Test CA");
    let (cert, key) = ca.issue("mx", &["mx.legacy.test"]);
    let peer = Peer::start(&cert, &key, false);
    let dns = DnsServer::start("mx-host=legacy.test,mx.legacy.test,10\nhost-record=mx.legacy.test,127.0.0.1\n");
    let node = node(dir.path(), &dns, &ca, peer.port);
    let id = send_over_tls(&node, "rcpt@legacy.test", "rt-refused", true);
    let failed = wait_event(&node, &id, "failed");
    let reply = failed["reply"].as_str().unwrap();
    assert!(reply.starts_with("550 5.7.30 REQUIRETLS support required"), "{failed}");
    // The same peer takes mail without REQUIRETLS.
    let plain = send_over_tls(&node, "rcpt@legacy.test", "rt-plain", false);
    wait_event(&node, &plain, "delivered");
    let kept = peer.messages();
    assert_eq!(kept.len(), 1, "only the message without REQUIRETLS: {kept:?}");
    assert!(kept[0].ends_with("-plain-tls.eml"), "{kept:?}");
}

#[test]
fn requiretls_is_not_sent_to_an_unverified_host() {
    if !Aiosmtpd::available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("Tern Test CA");
    // Trusted CA, wrong name: verification fails, so nothing is sent.
    let (cert, key) = ca.issue("mx", &["mx.other.test"]);
    let peer = Peer::start(&cert, &key, true);
    let dns = DnsServer::start("mx-host=spoof.test,mx.spoof.test,10\nhost-record=mx.spoof.test,127.0.0.1\n");
    let node = node(dir.path(), &dns, &ca, peer.port);
    let id = send_over_tls(&node, "rcpt@spoof.test", "rt-spoof", true);
    let deferred = wait_event(&node, &id, "deferred");
    let reply = deferred["reply"].as_str().unwrap();
    assert!(
        reply.contains("TLS verification failed for mx.spoof.test"),
        "{deferred}"
    );
    assert!(peer.messages().is_empty());
}
