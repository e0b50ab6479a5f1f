//! The sending API end to end, through the real HTTP listener (curl): a
//! templated batch of 1,000 recipients arrives at a sink rendered per
//! recipient, HTML-escaped and DKIM-signed (checked with Python's email
//! package and dkimpy, `api/verify_batch.py`); idempotent retries queue
//! nothing new; scheduled batches are cancelled before their time; keys,
//! scopes and tenants are enforced; errors are problem+json; and every
//! answer matches the shipped OpenAPI document (`api/contract.py`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tern_testkit::dns::DnsServer;
use tern_testkit::peers::{files_in, Aiosmtpd, ExactSink};

use crate::harness::*;

const SCRIPTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e/api");
const OPENAPI: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src/api/openapi.json");

/// One answer of the API.
#[derive(Debug)]
struct Reply {
    status: u16,
    /// Header names lowercased.
    headers: Vec<(String, String)>,
    body: Value,
    content_type: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// A curl-driven client that records every exchange for the contract check.
struct Client {
    base: String,
    dir: tempfile::TempDir,
    exchanges: std::cell::RefCell<Vec<Value>>,
}

impl Client {
    fn new(node: &Node) -> Client {
        Client {
            base: format!("http://{}", node.http),
            dir: tempfile::tempdir().unwrap(),
            exchanges: Default::default(),
        }
    }

    /// `route` is the OpenAPI path template the call belongs to.
    fn call(
        &self,
        method: &str,
        path: &str,
        route: &str,
        key: Option<&str>,
        body: Option<&[u8]>,
        headers: &[&str],
    ) -> Reply {
        let (out, head, req) = (
            self.dir.path().join("out"),
            self.dir.path().join("head"),
            self.dir.path().join("req"),
        );
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "120", "-X", method, "-o"])
            .arg(&out)
            .arg("-D")
            .arg(&head)
            .args(["-w", "%{http_code}"])
            .arg(format!("{}{path}", self.base));
        if let Some(key) = key {
            cmd.args(["-H", &format!("Authorization: Bearer {key}")]);
        }
        for h in headers {
            cmd.args(["-H", h]);
        }
        if let Some(body) = body {
            std::fs::write(&req, body).unwrap();
            if !headers
                .iter()
                .any(|h| h.to_ascii_lowercase().starts_with("content-type"))
            {
                cmd.args(["-H", "Content-Type: application/json"]);
            }
            cmd.arg("--data-binary").arg(format!("@{}", req.display()));
        }
        let _ = std::fs::remove_file(&out);
        let output = cmd.output().expect("curl");
        assert!(
            output.status.success(),
            "curl: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let status: u16 = String::from_utf8_lossy(&output.stdout).trim().parse().unwrap();
        let head = std::fs::read_to_string(&head).unwrap_or_default();
        let headers: Vec<(String, String)> = head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let raw = std::fs::read(&out).unwrap_or_default();
        let body = if raw.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&raw).unwrap_or_else(|e| {
                panic!(
                    "{method} {path}: {status} body is not JSON ({e}): {}",
                    String::from_utf8_lossy(&raw)
                )
            })
        };
        let content_type = headers
            .iter()
            .find(|(n, _)| n == "content-type")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        self.exchanges.borrow_mut().push(json!({
            "method": method, "route": route, "status": status,
            "content_type": content_type, "body": if raw.is_empty() { Value::Null } else { body.clone() },
        }));
        Reply {
            status,
            headers,
            body,
            content_type,
        }
    }

    fn post(&self, path: &str, route: &str, key: &str, body: &Value, headers: &[&str]) -> Reply {
        self.call(
            "POST",
            path,
            route,
            Some(key),
            Some(body.to_string().as_bytes()),
            headers,
        )
    }

    fn get(&self, path: &str, route: &str, key: &str) -> Reply {
        self.call("GET", path, route, Some(key), None, &[])
    }

    fn delete(&self, path: &str, route: &str, key: &str) -> Reply {
        self.call("DELETE", path, route, Some(key), None, &[])
    }

    /// Every recorded answer against node/src/api/openapi.json.
    fn assert_contract(&self) {
        let file = self.dir.path().join("exchanges.json");
        std::fs::write(&file, serde_json::to_vec(&*self.exchanges.borrow()).unwrap()).unwrap();
        let out = python(&[&format!("{SCRIPTS}/contract.py"), OPENAPI, file.to_str().unwrap()]);
        let verdict: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            verdict["failures"],
            json!([]),
            "answers that break the OpenAPI document"
        );
        assert_eq!(verdict["checked"], json!(self.exchanges.borrow().len()));
    }
}

fn python(args: &[&str]) -> Vec<u8> {
    let out = Command::new("python3").args(args).output().expect("python3");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// jsonschema, requests' friends and dkimpy; false to skip, a failure under
/// `TERN_REQUIRE_PEERS=1`.
fn peers_available() -> bool {
    let ok = Aiosmtpd::available()
        && crate::dkim::dkimpy_available()
        && Command::new("python3")
            .args(["-c", "import jsonschema"])
            .status()
            .is_ok_and(|s| s.success())
        && Command::new("curl").arg("--version").output().is_ok();
    if !ok {
        assert!(
            std::env::var("TERN_REQUIRE_PEERS").as_deref() != Ok("1"),
            "aiosmtpd, dkimpy, jsonschema and curl are required (TERN_REQUIRE_PEERS=1)"
        );
        eprintln!("skipping: aiosmtpd, dkimpy, jsonschema or curl missing");
    }
    ok
}

/// `ternctl apikey create` with `args`; the key printed once.
fn create_key(node: &Node, name: &str, args: &[&str]) -> String {
    let mut all = vec!["apikey", "create", "--name", name];
    all.extend_from_slice(args);
    let v = node.ternctl_json(&all);
    v["key"]
        .as_str()
        .expect("key in ternctl apikey create -o json")
        .to_owned()
}

/// An Ed25519 DKIM key for example.test (ternctl dkim generate), its TXT
/// record served by dnsmasq, and the `[[dkim]]` entry for the node.
fn dkim_setup(dir: &Path) -> (DnsServer, String) {
    let key = dir.join("ed.pem");
    let out = crate::dkim::generate(&[
        "--domain",
        "example.test",
        "--selector",
        "api",
        "--algorithm",
        "ed25519",
        "--out",
        key.to_str().unwrap(),
        "-o",
        "json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let dns = DnsServer::start(&format!(
        "txt-record=api._domainkey.example.test,\"{}\"\n",
        v["txt_value"].as_str().unwrap()
    ));
    let entry = format!(
        "[[dkim]]\ndomain = \"example.test\"\nselector = \"api\"\nalgorithm = \"ed25519-sha256\"\nprivate_key = \"{}\"\n",
        key.display()
    );
    (dns, entry)
}

fn sink_dir(sink: &ExactSink) -> PathBuf {
    sink.peer.dir.path().join("messages")
}

/// Messages in the sink whose bytes contain `needle`.
fn delivered_with(sink: &ExactSink, needle: &str) -> usize {
    files_in(&sink_dir(sink))
        .iter()
        .filter(|p| String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).contains(needle))
        .count()
}

fn wait_for(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    while !cond() {
        assert!(Instant::now() < end, "timed out after {deadline:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn ids(reply: &Reply) -> Vec<String> {
    reply.body["ids"]
        .as_array()
        .unwrap_or_else(|| panic!("no ids in {reply:?}"))
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn a_templated_batch_of_1000_arrives_rendered_signed_and_an_idempotent_retry_queues_nothing() {
    if !peers_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (dns, dkim) = dkim_setup(dir.path());
    let sink = ExactSink::start();
    let node = Node::start(&format!(
        "{dkim}\n[[route]]\ndomain = \"*\"\nto = \"{}\"\n",
        sink.peer.addr
    ));
    let key = create_key(&node, "app", &[]);
    let api = Client::new(&node);

    // The smallest request of the issue is delivered.
    let smallest = api.post(
        "/api/v1/messages",
        "/api/v1/messages",
        &key,
        &json!({"from": "a@example.test", "to": ["b@example.net"], "subject": "Hi", "text": "Hello smallest"}),
        &[],
    );
    assert_eq!(smallest.status, 200, "{:?}", smallest.body);
    assert_eq!(smallest.body["idempotent_replay"], json!(false));
    assert_eq!(smallest.body["send_at"], Value::Null);
    let first = ids(&smallest);
    assert_eq!(first.len(), 1);
    assert!(smallest.body["batch_id"].as_str().unwrap().starts_with("b_"));
    wait_for("the smallest message at the sink", Duration::from_secs(30), || {
        delivered_with(&sink, "Hello smallest") == 1
    });
    let path = format!("/api/v1/messages/{}", first[0]);
    let mut status = api.get(&path, "/api/v1/messages/{id}", &key);
    wait_for("the message's final status", Duration::from_secs(10), || {
        status = api.get(&path, "/api/v1/messages/{id}", &key);
        status.body["state"] == "done"
    });
    assert_eq!(status.status, 200);
    assert_eq!(status.body["rcpts"][0]["address"], "b@example.net");
    assert_eq!(status.body["rcpts"][0]["state"], "delivered");
    assert_eq!(status.body["batch_id"], smallest.body["batch_id"]);
    // A delivered message cannot be cancelled.
    let late = api.delete(&path, "/api/v1/messages/{id}", &key);
    assert_eq!(late.status, 409, "{:?}", late.body);
    assert!(late.content_type.starts_with("application/problem+json"));

    // A stored template, then 1,000 recipients with their own variables;
    // the names carry HTML specials that only the html part escapes.
    let put = api.call(
        "PUT",
        "/api/v1/templates/welcome",
        "/api/v1/templates/{name}",
        Some(&key),
        Some(
            json!({"subject": "Hi {{ name }}", "text": "Dear {{ name }}, your code is {{ code }}.",
                   "html": "<p>Dear {{ name }}</p><p>{{ code }}</p>"})
            .to_string()
            .as_bytes(),
        ),
        &[],
    );
    assert_eq!(put.status, 200, "{:?}", put.body);
    assert_eq!(put.body["name"], "welcome");
    let mut expected = serde_json::Map::new();
    let recipients: Vec<Value> = (0..1000)
        .map(|i| {
            let to = format!("r{i:04}@d{}.example.net", i % 4);
            let name = format!("Bo {i} <b>&co");
            expected.insert(to.clone(), json!(name));
            json!({"to": to, "variables": {"name": name, "code": format!("C{i}")}})
        })
        .collect();
    let batch_body = json!({"from": "News <news@example.test>", "template": "welcome",
                            "recipients": recipients, "tags": ["spring"], "campaign": "c-1"});
    let sent = api.post(
        "/api/v1/messages",
        "/api/v1/messages",
        &key,
        &batch_body,
        &["Idempotency-Key: spring-1"],
    );
    assert_eq!(sent.status, 200, "{:?}", sent.body);
    let batch_ids = ids(&sent);
    assert_eq!(batch_ids.len(), 1000);
    assert_eq!(
        batch_ids.iter().collect::<std::collections::BTreeSet<_>>().len(),
        1000,
        "ids are unique"
    );
    let batch_id = sent.body["batch_id"].as_str().unwrap().to_owned();
    let batch = api.get(&format!("/api/v1/batches/{batch_id}"), "/api/v1/batches/{id}", &key);
    assert_eq!(batch.status, 200);
    assert_eq!(ids(&batch), batch_ids);
    assert_eq!(batch.body["tags"], json!(["spring"]));
    assert_eq!(batch.body["campaign"], "c-1");

    wait_for("1,001 messages at the sink", Duration::from_secs(240), || {
        files_in(&sink_dir(&sink)).len() >= 1001
    });
    let expected_file = dir.path().join("expected.json");
    std::fs::write(&expected_file, serde_json::to_vec(&expected).unwrap()).unwrap();
    let verdict: Value = serde_json::from_slice(&python(&[
        &format!("{SCRIPTS}/verify_batch.py"),
        &dns.addr.port().to_string(),
        sink_dir(&sink).to_str().unwrap(),
        expected_file.to_str().unwrap(),
    ]))
    .unwrap();
    assert_eq!(verdict["failures"], json!([]), "{verdict}");
    assert_eq!(verdict["count"], json!(1000));
    assert_eq!(verdict["verified"], json!(1000), "every message DKIM-verified");

    // The same call again (key in the header, then in the body): the same
    // ids, nothing queued twice.
    let again = api.post(
        "/api/v1/messages",
        "/api/v1/messages",
        &key,
        &batch_body,
        &["Idempotency-Key: spring-1"],
    );
    assert_eq!(again.status, 200, "{:?}", again.body);
    assert_eq!(again.body["idempotent_replay"], json!(true));
    assert_eq!(again.body["batch_id"], json!(batch_id));
    assert_eq!(ids(&again), batch_ids);
    // The same key with another body: 422.
    let mut other = batch_body.clone();
    other["campaign"] = json!("c-2");
    let mismatch = api.post(
        "/api/v1/messages",
        "/api/v1/messages",
        &key,
        &other,
        &["Idempotency-Key: spring-1"],
    );
    assert_eq!(mismatch.status, 422, "{:?}", mismatch.body);
    assert_eq!(mismatch.body["type"], "https://tern.dev/problems/idempotency-mismatch");
    // A marker sent after the retry: once it is delivered and the queue is
    // empty, anything the retry had queued would have arrived too.
    let marker = api.post(
        "/api/v1/messages",
        "/api/v1/messages",
        &key,
        &json!({"from": "a@example.test", "to": ["m@example.net"], "subject": "Marker", "text": "Hello marker"}),
        &[],
    );
    assert_eq!(marker.status, 200);
    wait_for("the marker at the sink", Duration::from_secs(30), || {
        delivered_with(&sink, "Hello marker") == 1
    });
    wait_for("an empty queue", Duration::from_secs(30), || {
        node.queued_ids().is_empty()
    });
    assert_eq!(files_in(&sink_dir(&sink)).len(), 1002, "1,000 + smallest + marker");

    let metrics = Command::new("curl")
        .args(["-sS", &format!("http://{}/metrics", node.http)])
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    assert!(metrics.contains("tern_api_messages_total 1002"), "{metrics}");
    assert!(
        metrics.contains("tern_api_requests_total{endpoint=\"POST /api/v1/messages\",status=\"422\"} 1"),
        "{metrics}"
    );
    api.assert_contract();
}

#[test]
fn keys_scopes_tenants_limits_and_scheduled_cancel_answer_as_documented() {
    if !peers_available() {
        return;
    }
    let sink = ExactSink::start();
    let node = Node::start(&format!(
        "[api]\nmax_request_bytes = 65536\n\n[[route]]\ndomain = \"*\"\nto = \"{}\"\n",
        sink.peer.addr
    ));
    let key = create_key(&node, "app", &[]);
    let reader = create_key(&node, "reader", &["--scope", "templates:read"]);
    let stranger = create_key(&node, "stranger", &["--tenant", "other"]);
    let slow = create_key(&node, "slow", &["--rate", "1"]);
    let api = Client::new(&node);
    let small = json!({"from": "a@example.test", "to": ["b@example.net"], "subject": "Hi", "text": "Hello"});

    // The document needs no key.
    let doc = api.call("GET", "/api/v1/openapi.json", "/api/v1/openapi.json", None, None, &[]);
    assert_eq!(doc.status, 200);
    assert!(
        doc.body["openapi"].as_str().unwrap().starts_with("3.1"),
        "{:?}",
        doc.body
    );

    // Keys: none, malformed, unknown: 401 with WWW-Authenticate.
    let bare = api.call(
        "POST",
        "/api/v1/messages",
        "/api/v1/messages",
        None,
        Some(small.to_string().as_bytes()),
        &[],
    );
    assert_eq!(bare.status, 401);
    assert_eq!(bare.header("www-authenticate"), Some("Bearer"));
    assert_eq!(bare.body["type"], "https://tern.dev/problems/unauthorized");
    for bad in [
        "nonsense",
        "tern_0123456789abcdef_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    ] {
        let r = api.post("/api/v1/messages", "/api/v1/messages", bad, &small, &[]);
        assert_eq!(r.status, 401, "{bad}: {:?}", r.body);
    }
    // A key without the scope: 403.
    let forbidden = api.post("/api/v1/messages", "/api/v1/messages", &reader, &small, &[]);
    assert_eq!(forbidden.status, 403, "{:?}", forbidden.body);
    let write = api.call(
        "PUT",
        "/api/v1/templates/t1",
        "/api/v1/templates/{name}",
        Some(&reader),
        Some(br#"{"subject": "x", "text": "y"}"#),
        &[],
    );
    assert_eq!(write.status, 403);

    // Tenants: another tenant's message, batch and template are 404.
    let sent = api.post("/api/v1/messages", "/api/v1/messages", &key, &small, &[]);
    assert_eq!(sent.status, 200, "{:?}", sent.body);
    let id = ids(&sent)[0].clone();
    let batch = sent.body["batch_id"].as_str().unwrap().to_owned();
    let put = api.call(
        "PUT",
        "/api/v1/templates/t1",
        "/api/v1/templates/{name}",
        Some(&key),
        Some(br#"{"subject": "Hi {{ name }}", "text": "Dear {{ name }}"}"#),
        &[],
    );
    assert_eq!(put.status, 200, "{:?}", put.body);
    for (path, route) in [
        (format!("/api/v1/messages/{id}"), "/api/v1/messages/{id}"),
        (format!("/api/v1/batches/{batch}"), "/api/v1/batches/{id}"),
        ("/api/v1/templates/t1".to_owned(), "/api/v1/templates/{name}"),
    ] {
        let theirs = api.get(&path, route, &stranger);
        assert_eq!(theirs.status, 404, "{path}: {:?}", theirs.body);
        assert_eq!(api.get(&path, route, &key).status, 200, "{path}");
    }
    let listed = api.get("/api/v1/templates", "/api/v1/templates", &stranger);
    assert_eq!(listed.body["templates"], json!([]));
    let listed = api.get("/api/v1/templates", "/api/v1/templates", &reader);
    assert_eq!(listed.body["templates"][0]["name"], "t1");
    let got = api.get("/api/v1/templates/t1", "/api/v1/templates/{name}", &reader);
    assert_eq!(got.body["subject"], "Hi {{ name }}");
    let bad_template = api.call(
        "PUT",
        "/api/v1/templates/t2",
        "/api/v1/templates/{name}",
        Some(&key),
        Some(br#"{"subject": "Hi {{ name", "text": "x"}"#),
        &[],
    );
    assert_eq!(bad_template.status, 400, "a template that does not compile");
    let gone = api.call(
        "DELETE",
        "/api/v1/templates/t1",
        "/api/v1/templates/{name}",
        Some(&key),
        None,
        &[],
    );
    assert_eq!(gone.status, 204);
    assert_eq!(
        api.get("/api/v1/templates/t1", "/api/v1/templates/{name}", &key).status,
        404
    );

    // Problems: bad JSON, a missing field, header injection, unknown
    // template, too large, wrong media type.
    let problem = |r: &Reply, status: u16, field: Option<&str>| {
        assert_eq!(r.status, status, "{:?}", r.body);
        assert!(
            r.content_type.starts_with("application/problem+json"),
            "{}",
            r.content_type
        );
        assert_eq!(r.body["status"], json!(status));
        if let Some(field) = field {
            assert_eq!(r.body["field"], json!(field), "{:?}", r.body);
        }
    };
    let r = api.call(
        "POST",
        "/api/v1/messages",
        "/api/v1/messages",
        Some(&key),
        Some(b"{\"from\": "),
        &[],
    );
    problem(&r, 400, None);
    let r = api.post(
        "/api/v1/messages",
        "/api/v1/messages",
        &key,
        &json!({"to": ["b@example.net"], "subject": "x", "text": "y"}),
        &[],
    );
    problem(&r, 400, Some("/from"));
    let r = api.post(
        "/api/v1/messages",
        "/api/v1/messages",
        &key,
        &json!({"from": "a@example.test", "to": ["b@example.net"], "subject": "x", "text": "y",
                "headers": {"X-Campaign": "a\r\nBcc: evil@example.net"}}),
        &[],
    );
    problem(&r, 400, Some("/headers/X-Campaign"));
    let r = api.post(
        "/api/v1/messages",
        "/api/v1/messages",
        &key,
        &json!({"from": "a@example.test", "to": ["b@example.net"], "template": "nope"}),
        &[],
    );
    problem(&r, 400, Some("/template"));
    let big = json!({"from": "a@example.test", "to": ["b@example.net"], "subject": "x", "text": "y".repeat(70_000)});
    let r = api.post("/api/v1/messages", "/api/v1/messages", &key, &big, &[]);
    problem(&r, 413, None);
    let r = api.call(
        "POST",
        "/api/v1/messages",
        "/api/v1/messages",
        Some(&key),
        Some(b"from=a"),
        &["Content-Type: application/x-www-form-urlencoded"],
    );
    problem(&r, 415, None);

    // A key with rate 1: the second call within the second is 429.
    let first = api.post("/api/v1/messages", "/api/v1/messages", &slow, &small, &[]);
    assert_eq!(first.status, 200, "{:?}", first.body);
    let second = api.post("/api/v1/messages", "/api/v1/messages", &slow, &small, &[]);
    problem(&second, 429, None);
    let retry: u64 = second.header("retry-after").expect("Retry-After").parse().unwrap();
    assert!((1..=2).contains(&retry), "{retry}");

    // A raw message with its envelope.
    let raw = api.post(
        "/api/v1/messages/raw",
        "/api/v1/messages/raw",
        &key,
        &json!({"from": "a@example.test", "to": ["raw@example.net"],
                "message": "From: a@example.test\nTo: raw@example.net\nSubject: raw\n\nHello raw\n"}),
        &[],
    );
    assert_eq!(raw.status, 200, "{:?}", raw.body);
    assert_eq!(ids(&raw).len(), 1);

    // Two first calls with the same key at once: one batch, one message.
    let racing = json!({"from": "a@example.test", "to": ["race@example.net"], "subject": "race", "text": "Hello race"});
    let racers: Vec<_> = (0..2)
        .map(|_| {
            Command::new("curl")
                .args(["-sS", "--max-time", "60", "-H", &format!("Authorization: Bearer {key}")])
                .args(["-H", "Content-Type: application/json", "-H", "Idempotency-Key: race-1"])
                .args(["--data-binary", &racing.to_string()])
                .arg(format!("http://{}/api/v1/messages", node.http))
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|child| serde_json::from_slice::<Value>(&child.wait_with_output().unwrap().stdout).unwrap())
        .collect();
    assert_eq!(racers[0]["batch_id"], racers[1]["batch_id"], "{racers:?}");
    assert_eq!(racers[0]["ids"], racers[1]["ids"]);
    let replays = racers.iter().filter(|r| r["idempotent_replay"] == json!(true)).count();
    assert_eq!(replays, 1, "{racers:?}");

    // Scheduled: two batches for the same time; one is cancelled before it.
    let send_at = chrono::Utc::now().timestamp() + 20;
    let scheduled = |to: &[&str], text: &str| {
        api.post(
            "/api/v1/messages",
            "/api/v1/messages",
            &key,
            &json!({"from": "a@example.test", "subject": "later", "text": "{{ recipient }}",
                    "variables": {}, "recipients": to.iter().map(|t| json!({"to": t})).collect::<Vec<_>>(),
                    "send_at": send_at, "tags": [text]}),
            &[],
        )
    };
    let cancelled = scheduled(&["gone1@example.net", "gone2@example.net"], "cancelled");
    assert_eq!(cancelled.status, 200, "{:?}", cancelled.body);
    assert_eq!(cancelled.body["send_at"], json!(send_at));
    let kept = scheduled(&["kept@example.net"], "kept");
    assert_eq!(kept.status, 200, "{:?}", kept.body);
    let gone = ids(&cancelled);
    let status = api.get(&format!("/api/v1/messages/{}", gone[0]), "/api/v1/messages/{id}", &key);
    assert_eq!(status.body["state"], "scheduled", "{:?}", status.body);
    assert_eq!(status.body["not_before"], json!(send_at));
    let batch = cancelled.body["batch_id"].as_str().unwrap();
    let cancel = api.delete(&format!("/api/v1/batches/{batch}"), "/api/v1/batches/{id}", &key);
    assert_eq!(cancel.status, 200, "{:?}", cancel.body);
    assert_eq!(cancel.body["cancelled"], json!(2));
    assert_eq!(cancel.body["already_final"], json!(0));
    for id in &gone {
        let s = api.get(&format!("/api/v1/messages/{id}"), "/api/v1/messages/{id}", &key);
        assert_eq!(s.status, 200, "{:?}", s.body);
        assert_eq!(s.body["state"], "done");
        assert_eq!(s.body["rcpts"][0]["state"], "cancelled", "{:?}", s.body);
    }
    // The kept one arrives, not before its time; the cancelled ones never.
    wait_for("the scheduled message", Duration::from_secs(60), || {
        delivered_with(&sink, "kept@example.net") >= 1
    });
    assert!(chrono::Utc::now().timestamp() >= send_at, "delivered before send_at");
    assert_eq!(delivered_with(&sink, "Hello raw"), 1);
    assert_eq!(
        delivered_with(&sink, "Hello race"),
        1,
        "the racing calls queued one message"
    );
    assert_eq!(delivered_with(&sink, "gone1@example.net"), 0);
    assert_eq!(delivered_with(&sink, "gone2@example.net"), 0);
    api.assert_contract();
}

#[test]
fn a_node_with_the_api_disabled_serves_nothing_under_api() {
    let node = Node::start("[api]\nenabled = false\n");
    for path in ["/api/v1/openapi.json", "/api/v1/messages/x"] {
        let out = Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}"])
            .arg(format!("http://{}{path}", node.http))
            .output()
            .expect("curl");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "404", "{path}");
    }
    let health = Command::new("curl")
        .args(["-sS", &format!("http://{}/healthz", node.http)])
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&health.stdout), "ok\n");
}
