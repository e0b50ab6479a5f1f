//! MTA-STS (RFC 8461) end to end: policies served over HTTPS by a real
//! server (python3 http.server with ssl, certificate from a test CA) on a
//! free port (`[mta_sts] policy_port`), `_mta-sts` TXT and MX records from
//! dnsmasq, aiosmtpd peers with STARTTLS.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::harness::*;
use tern_testkit::dns::DnsServer;
use tern_testkit::peers::{Aiosmtpd, TestCa};

/// Serves `DIR/<Host header>.txt` at /.well-known/mta-sts.txt over TLS
/// (text/plain), appending each request's host to `DIR/requests.log`;
/// prints its port.
const POLICY_SERVER: &str = r#"
import http.server, os, ssl, sys
directory, cert, key = sys.argv[1], sys.argv[2], sys.argv[3]
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        host = (self.headers.get("Host") or "").split(":")[0]
        with open(os.path.join(directory, "requests.log"), "a") as f:
            f.write(host + " " + self.path + "\n")
        path = os.path.join(directory, host + ".txt")
        if self.path != "/.well-known/mta-sts.txt" or not os.path.exists(path):
            self.send_error(404)
            return
        body = open(path, "rb").read()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
server.socket = context.wrap_socket(server.socket, server_side=True)
print(server.server_address[1], flush=True)
server.serve_forever()
"#;

struct PolicyServer {
    port: u16,
    dir: tempfile::TempDir,
    child: Child,
}

impl PolicyServer {
    /// `policies`: (policy host, policy text).
    fn start(cert: &Path, key: &Path, policies: &[(&str, &str)]) -> PolicyServer {
        let dir = tempfile::tempdir().unwrap();
        for (host, text) in policies {
            std::fs::write(dir.path().join(format!("{host}.txt")), text).unwrap();
        }
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(POLICY_SERVER)
            .arg(dir.path())
            .arg(cert)
            .arg(key)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("policy server said {line:?}"));
        PolicyServer { port, dir, child }
    }

    /// Requests so far, one `host path` per line.
    fn requests(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("requests.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for PolicyServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn send(node: &Node, to: &str, tag: &str) -> String {
    let mut c = Client::connect(node.smtp).unwrap();
    c.command("EHLO sender.test").unwrap();
    c.send_mail("a@tern.test", &[to], &body(tag, 512)).unwrap()
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

/// DNS for `domain`: MX `mx.<domain>`, `mta-sts.<domain>` and the MX on
/// 127.0.0.1, and the `_mta-sts` TXT record with `id`.
fn zone(domain: &str, id: &str) -> String {
    format!(
        "mx-host={domain},mx.{domain},10\nhost-record=mx.{domain},127.0.0.1\nhost-record=mta-sts.{domain},127.0.0.1\n\
         txt-record=_mta-sts.{domain},\"v=STSv1; id={id};\"\n"
    )
}

fn node(dns: &DnsServer, ca: &TestCa, smtp_port: u16, policy_port: u16) -> Node {
    Node::start(&format!(
        "[log]\nformat = \"json\"\n\n[dns]\nnameservers = [\"{}\"]\n\n[delivery]\nsmtp_port = {smtp_port}\n\
         retry_schedule = [\"1h\"]\ntls_ca_file = \"{}\"\n\n[mta_sts]\nenabled = true\npolicy_port = {policy_port}\n",
        dns.addr,
        ca.cert.display()
    ))
}

#[test]
fn enforce_defers_when_no_mx_matches_and_delivers_over_verified_tls_when_one_does() {
    if !Aiosmtpd::available() {
        return;
    }
    let ca = TestCa::new("Tern Test CA");
    let (mx_cert, mx_key) = ca.issue("mx", &["mx.good.test", "mx.bad.test"]);
    let (web_cert, web_key) = ca.issue("web", &["mta-sts.good.test", "mta-sts.bad.test"]);
    let peer = Aiosmtpd::start_with_cert(&mx_cert, &mx_key);
    let policies = PolicyServer::start(
        &web_cert,
        &web_key,
        &[
            (
                "mta-sts.good.test",
                "version: STSv1\r\nmode: enforce\r\nmx: *.good.test\r\nmax_age: 86400\r\n",
            ),
            (
                "mta-sts.bad.test",
                "version: STSv1\r\nmode: enforce\r\nmx: mx.elsewhere.test\r\nmax_age: 86400\r\n",
            ),
        ],
    );
    let dns = DnsServer::start(&(zone("good.test", "g1") + &zone("bad.test", "b1")));
    let node = node(&dns, &ca, peer.peer.addr.port(), policies.port);

    let bad = send(&node, "rcpt@bad.test", "sts-bad");
    let deferred = wait_event(&node, &bad, "deferred");
    let reply = deferred["reply"].as_str().unwrap();
    assert!(reply.starts_with("451 4.7.5 MTA-STS policy of bad.test"), "{reply}");

    let good = send(&node, "rcpt@good.test", "sts-good");
    let got = peer.wait_messages(1);
    assert!(String::from_utf8_lossy(&got[0]).contains("sts-good@tern.test"));
    let delivered = wait_event(&node, &good, "delivered");
    assert_eq!(delivered["relay"], "mx.good.test", "{delivered}");
    assert!(delivered["tls"].as_str().unwrap().starts_with("TLSv1."), "{delivered}");
    assert_eq!(peer.messages().len(), 1, "nothing went to bad.test's MX");

    // A second message uses the cached policy: no second fetch.
    send(&node, "rcpt2@good.test", "sts-good-2");
    peer.wait_messages(2);
    let fetches = policies.requests();
    assert_eq!(
        fetches.iter().filter(|r| r.starts_with("mta-sts.good.test ")).count(),
        1,
        "{fetches:?}"
    );
    assert!(
        fetches.iter().all(|r| r.ends_with(" /.well-known/mta-sts.txt")),
        "{fetches:?}"
    );
}

#[test]
fn enforce_refuses_an_mx_whose_certificate_is_not_trusted() {
    if !Aiosmtpd::available() {
        return;
    }
    let ca = TestCa::new("Tern Test CA");
    let (web_cert, web_key) = ca.issue("web", &["mta-sts.selfsigned.test"]);
    // Self-signed, not from the trusted CA.
    let peer = Aiosmtpd::start(true, false);
    let policies = PolicyServer::start(
        &web_cert,
        &web_key,
        &[(
            "mta-sts.selfsigned.test",
            "version: STSv1\nmode: enforce\nmx: mx.selfsigned.test\nmax_age: 86400\n",
        )],
    );
    let dns = DnsServer::start(&zone("selfsigned.test", "s1"));
    let node = node(&dns, &ca, peer.peer.addr.port(), policies.port);
    let id = send(&node, "rcpt@selfsigned.test", "sts-untrusted");
    let deferred = wait_event(&node, &id, "deferred");
    let reply = deferred["reply"].as_str().unwrap();
    assert!(
        reply.starts_with("451 ") && reply.contains("MTA-STS policy of selfsigned.test"),
        "{reply}"
    );
    assert!(
        peer.messages().is_empty(),
        "nothing may reach an unverified MX under enforce"
    );
    assert!(node
        .logs()
        .lines()
        .any(|l| l.contains("MTA-STS: TLS failure under the policy") && l.contains("certificate-not-trusted")));
}

#[test]
fn testing_delivers_and_records_the_failure() {
    if !Aiosmtpd::available() {
        return;
    }
    let ca = TestCa::new("Tern Test CA");
    let (web_cert, web_key) = ca.issue("web", &["mta-sts.trial.test"]);
    let peer = Aiosmtpd::start(true, false);
    let policies = PolicyServer::start(
        &web_cert,
        &web_key,
        &[(
            "mta-sts.trial.test",
            "version: STSv1\nmode: testing\nmx: mx.trial.test\nmax_age: 86400\n",
        )],
    );
    let dns = DnsServer::start(&zone("trial.test", "t1"));
    let node = node(&dns, &ca, peer.peer.addr.port(), policies.port);
    let id = send(&node, "rcpt@trial.test", "sts-testing");
    peer.wait_messages(1);
    let delivered = wait_event(&node, &id, "delivered");
    assert_eq!(delivered["attempt"], 1, "testing mode does not defer: {delivered}");
    assert!(delivered["tls"].as_str().unwrap().starts_with("TLSv1."), "{delivered}");
    let reported: Vec<String> = node
        .logs()
        .lines()
        .filter(|l| l.contains("MTA-STS: TLS failure under the policy"))
        .map(str::to_owned)
        .collect();
    assert_eq!(reported.len(), 1, "{reported:?}");
    assert!(reported[0].contains("certificate-not-trusted") && reported[0].contains("mx.trial.test"));
}

#[test]
fn tls_required_no_ignores_the_policy_for_that_message() {
    if !Aiosmtpd::available() {
        return;
    }
    let ca = TestCa::new("Tern Test CA");
    let (web_cert, web_key) = ca.issue("web", &["mta-sts.strict.test"]);
    // Self-signed, and the policy names another MX: enforce would defer.
    let peer = Aiosmtpd::start(true, false);
    let policies = PolicyServer::start(
        &web_cert,
        &web_key,
        &[(
            "mta-sts.strict.test",
            "version: STSv1\nmode: enforce\nmx: mx.elsewhere.test\nmax_age: 86400\n",
        )],
    );
    let dns = DnsServer::start(&zone("strict.test", "x1"));
    let node = node(&dns, &ca, peer.peer.addr.port(), policies.port);
    let mut c = Client::connect(node.smtp).unwrap();
    c.command("EHLO sender.test").unwrap();
    let id = c
        .send_mail(
            "a@tern.test",
            &["rcpt@strict.test"],
            &format!("TLS-Required: No\r\n{}", body("sts-optional", 512)),
        )
        .unwrap();
    peer.wait_messages(1);
    let delivered = wait_event(&node, &id, "delivered");
    assert_eq!(delivered["attempt"], 1, "{delivered}");
    // Without the header the same destination is refused.
    let strict = send(&node, "rcpt2@strict.test", "sts-strict");
    let deferred = wait_event(&node, &strict, "deferred");
    assert!(
        deferred["reply"].as_str().unwrap().starts_with("451 4.7.5 MTA-STS"),
        "{deferred}"
    );
    assert_eq!(peer.messages().len(), 1);
}
