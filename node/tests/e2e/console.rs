//! The web console (docs/console.md) in a real browser: headless Chromium,
//! driven through the DevTools protocol by console_browser.py, opens the
//! console of a real three-node cluster holding deferred mail, shows what a
//! person sees, signs in with an operator token and suspends a domain by
//! clicking the page's form. The access rules are checked with curl.
//! Screenshots go to target/console-artifacts/.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::*;

pub(crate) const OPERATOR: &str = "console-operator-secret";
const VIEWER: &str = "console-viewer-secret";
const DEFERRED: &str = "deferred.test";

pub(crate) fn tokens() -> String {
    format!(
        "[[admin_token]]\nname = \"ops\"\nrole = \"operator\"\nhash = \"{}\"\n\n\
         [[admin_token]]\nname = \"look\"\nrole = \"viewer\"\nhash = \"{}\"\n\n",
        hash_password(OPERATOR),
        hash_password(VIEWER)
    )
}

/// One HTTP exchange made with curl.
pub(crate) struct Answer {
    pub(crate) status: u16,
    /// Header lines, lowercased.
    headers: String,
    pub(crate) body: String,
}

impl Answer {
    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

pub(crate) fn http(method: &str, url: &str, headers: &[(&str, &str)], body: Option<&str>) -> Answer {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-i", "--max-time", "30", "-X", method, url]);
    for (k, v) in headers {
        cmd.arg("-H").arg(format!("{k}: {v}"));
    }
    if let Some(b) = body {
        cmd.args(["--data-binary", b]);
    }
    let out = cmd.output().expect("curl is installed by cluster-tests/run-all.sh");
    assert!(
        out.status.success(),
        "curl {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    Answer {
        status,
        headers: head.to_ascii_lowercase(),
        body: body.to_owned(),
    }
}

/// An action as the page sends it, with `extra` headers.
pub(crate) fn act(base: &str, path: &str, body: &str, extra: &[(&str, &str)]) -> Answer {
    let mut headers = vec![("content-type", "application/json"), ("x-tern-console", "1")];
    headers.extend_from_slice(extra);
    http("POST", &format!("{base}/console/api/{path}"), &headers, Some(body))
}

fn artifacts() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/console-artifacts");
    std::fs::create_dir_all(&dir).expect("artifacts dir");
    dir
}

/// Runs the browser script; returns what the page showed.
fn browse(url: &str, wait_js: &str, sign_in: Option<(&str, &str)>) -> serde_json::Value {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/console_browser.py");
    let mut cmd = Command::new("python3");
    cmd.arg(script).arg(url).arg(artifacts()).arg(wait_js);
    if let Some((token, domain)) = sign_in {
        cmd.args([token, domain]);
    }
    let started = Instant::now();
    let out = cmd.output().expect("python3");
    eprintln!("browser session: {:?}", started.elapsed());
    assert!(
        out.status.success(),
        "console_browser.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("browser json")
}

fn rows<'a>(seen: &'a serde_json::Value, table: &str) -> &'a Vec<serde_json::Value> {
    seen[table].as_array().unwrap()
}

/// The `fields` of `admin` events in the node's JSON log.
fn admin_events(node: &Node) -> Vec<serde_json::Value> {
    node.logs()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["target"] == "tern::event" && l["fields"]["event"] == "admin")
        .map(|l| l["fields"].clone())
        .collect()
}

#[test]
fn console_shows_the_cluster_in_a_browser_and_suspends_a_domain() {
    let _serial = cluster_lock();
    let started = Instant::now();
    let extra = format!("shards = 4\n\n[log]\nformat = \"json\"\n\n{}{}", tokens(), hold_mail());
    let n1 = Node::cluster_node(1, true, &extra);
    let n2 = Node::cluster_node(2, false, &extra);
    let n3 = Node::cluster_node(3, false, &extra);
    crate::cluster::join(&n1, &n2, 2);
    crate::cluster::join(&n1, &n3, 3);
    wait_for(Duration::from_secs(90), "4 shards on 3 voters with leaders", || {
        let s = crate::cluster::shards(&n1);
        s.len() == 4
            && s.iter()
                .all(|sh| sh["voters"].as_array().unwrap().len() == 3 && sh["leader"] != 0)
    });
    let mut c = Client::connect(n1.smtp).unwrap();
    c.command("EHLO console.test").unwrap();
    for i in 0..3 {
        c.send_mail(
            "a@tern.test",
            &[&format!("r{i}@{DEFERRED}")],
            &body(&format!("console-{i}"), 300),
        )
        .unwrap();
    }
    // Delivery to a closed port: each message deferred once (next try in an hour).
    wait_for(Duration::from_secs(30), "three deferred messages", || {
        let s = n1.ternctl_json(&["queue", "summary"]);
        let list = n1.ternctl_json(&["queue", "list"]);
        s["domains"][DEFERRED] == 3
            && list["messages"]
                .as_array()
                .unwrap()
                .iter()
                .all(|m| m["attempts"].as_u64() >= Some(1))
    });
    let cluster_up = started.elapsed();

    // Anonymous on a loopback listener: read-only.
    let base = format!("http://{}", n1.http);
    let wait_js = format!(
        "(() => {{ const q = document.querySelector('#queue tr[data-domain=\"{DEFERRED}\"]');
           const shards = [...document.querySelectorAll('#shards tbody tr')];
           return q && q.dataset.messages === '3'
             && document.querySelectorAll('#members tbody tr[data-health=\"ok\"]').length === 3
             && shards.length === 4 && shards.every(r => r.dataset.leader !== '0')
             && document.querySelectorAll('#rate-chart polyline').length === 3
             && document.querySelectorAll('#reasons tbody tr').length >= 1; }})()"
    );
    let seen = browse(&format!("{base}/console"), &wait_js, Some((OPERATOR, DEFERRED)));
    let before = &seen["before"];
    let members: Vec<&str> = rows(before, "members")
        .iter()
        .map(|r| r["data"]["member"].as_str().unwrap())
        .collect();
    assert_eq!(members, ["1", "2", "3"], "{before}");
    let queue = rows(before, "queue");
    let row = queue.iter().find(|r| r["data"]["domain"] == DEFERRED).unwrap();
    assert_eq!(row["cells"][1], "3", "messages column: {row}");
    assert!(
        row["cells"][5].as_str().unwrap().starts_with('4'),
        "the last error is a deferral reply: {row}"
    );
    assert_eq!(before["rate_lines"], 3, "{before}");
    assert!(before["reason_lines"].as_u64().unwrap() >= 1, "{before}");
    assert_eq!(before["can_act"], "0", "anonymous is read-only: {before}");
    assert!(before["who"].as_str().unwrap().contains("read-only"), "{before}");

    // Signed in as an operator, the page's form suspended the domain.
    let after = &seen["after"];
    assert!(after["who"].as_str().unwrap().contains("ops (operator)"), "{after}");
    let suspended: Vec<&str> = rows(after, "suspended")
        .iter()
        .map(|r| r["data"]["domain"].as_str().unwrap())
        .collect();
    assert_eq!(suspended, [DEFERRED], "{after}");
    // Held cluster-wide (the control group), seen through another node.
    let listed = n2.ternctl_json(&["domain", "list"]);
    assert_eq!(listed[0]["domain"], DEFERRED, "{listed}");
    assert_eq!(listed[0]["reason"], "clicked in the console test", "{listed}");
    // Audited as the gRPC call is, naming the token and the browser's address.
    let mut audited = None;
    wait_for(Duration::from_secs(5), "the suspend audit event", || {
        audited = admin_events(&n1)
            .into_iter()
            .find(|e| e["action"] == "domain suspend" && e["result"] == "ok");
        audited.is_some()
    });
    let audited = audited.unwrap();
    assert_eq!(
        (audited["who"].as_str(), audited["how"].as_str()),
        (Some("ops"), Some("token"))
    );
    assert!(audited["peer"].as_str().unwrap().starts_with("127.0.0.1:"), "{audited}");
    assert!(
        rows(after, "events")
            .iter()
            .any(|r| r["cells"][2] == "domain suspend" && r["cells"][3] == "ops (operator)"),
        "the page's recent events: {after}"
    );

    // The page itself: strict CSP, no inline script.
    let page = http("GET", &format!("{base}/console"), &[], None);
    assert_eq!(page.status, 200);
    assert!(
        page.headers
            .contains("content-security-policy: default-src 'none'; script-src 'self';"),
        "{}",
        page.headers
    );
    assert!(!page.body.contains("<script>"), "inline script in the page");

    // Access rules on the loopback listener.
    let bearer = |t: &str| format!("Bearer {t}");
    let suspend = "{\"domain\":\"other.test\"}";
    let anonymous = act(&base, "domains/suspend", suspend, &[]);
    assert_eq!(anonymous.status, 401, "{}", anonymous.body);
    assert!(anonymous.headers.contains("www-authenticate: bearer"));
    let viewer = act(&base, "domains/suspend", suspend, &[("authorization", &bearer(VIEWER))]);
    assert_eq!(viewer.status, 403, "{}", viewer.body);
    assert!(
        viewer.json()["detail"].as_str().unwrap().contains("viewer"),
        "{}",
        viewer.body
    );
    wait_for(Duration::from_secs(5), "the refusals audited", || {
        let refused: Vec<_> = admin_events(&n1)
            .into_iter()
            .filter(|e| {
                e["result"] == "refused" && e["selection"].as_str().unwrap_or("").starts_with("domain=other.test ")
            })
            .map(|e| e["who"].as_str().unwrap_or("").to_owned())
            .collect();
        refused.contains(&"unauthenticated".to_owned()) && refused.contains(&"look".to_owned())
    });
    let operator = bearer(OPERATOR);
    let no_mark = http(
        "POST",
        &format!("{base}/console/api/domains/suspend"),
        &[("content-type", "application/json"), ("authorization", &operator)],
        Some(suspend),
    );
    assert_eq!(no_mark.status, 403, "no X-Tern-Console: {}", no_mark.body);
    let foreign = act(
        &base,
        "domains/suspend",
        suspend,
        &[("authorization", &operator), ("origin", "http://evil.example")],
    );
    assert_eq!(foreign.status, 403, "foreign Origin: {}", foreign.body);
    let rebound = http(
        "GET",
        &format!("{base}/console/api/overview"),
        &[("host", "evil.example")],
        None,
    );
    assert_eq!(
        rebound.status, 401,
        "anonymous read under a foreign Host: {}",
        rebound.body
    );
    let retry = act(
        &base,
        "queue/retry",
        &format!("{{\"domain\":\"{DEFERRED}\"}}"),
        &[("authorization", &operator)],
    );
    assert_eq!(retry.status, 200, "{}", retry.body);
    assert_eq!(retry.json()["matched"], 3, "{}", retry.body);
    let resumed = act(
        &base,
        "domains/resume",
        &format!("{{\"domain\":\"{DEFERRED}\"}}"),
        &[("authorization", &operator)],
    );
    assert_eq!(resumed.status, 200, "{}", resumed.body);
    assert_eq!(resumed.json()["suspended"], serde_json::json!([]), "{}", resumed.body);
    eprintln!(
        "console: cluster up with deferred mail in {cluster_up:?}, {:?} in all",
        started.elapsed()
    );
}

/// A console on a non-loopback listener answers nothing without a token,
/// and a viewer's token reads but cannot act.
#[test]
fn console_off_loopback_needs_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tern.toml");
    std::fs::write(
        &config,
        format!(
            "[node]\nid = 1\nhostname = \"mx1.tern.test\"\ndata_dir = \"{}\"\n\n\
             [listen]\nsmtp = [\"127.0.0.1:0\"]\ngrpc = \"127.0.0.1:{}\"\nhttp = \"0.0.0.0:0\"\n\n\
             [cluster]\nbootstrap = true\nshards = 1\n\n{}",
            dir.path().join("data").display(),
            free_port(),
            tokens()
        ),
    )
    .unwrap();
    let node = Node::start_config(config);
    let base = format!("http://127.0.0.1:{}", node.http.port());
    let overview = format!("{base}/console/api/overview");
    let anonymous = http("GET", &overview, &[], None);
    assert_eq!(anonymous.status, 401, "{}", anonymous.body);
    assert!(anonymous.headers.contains("content-type: application/problem+json"));
    assert!(anonymous.json()["detail"].as_str().unwrap().contains("non-loopback"));
    let viewer = format!("Bearer {VIEWER}");
    let read = http("GET", &overview, &[("authorization", &viewer)], None);
    assert_eq!(read.status, 200, "{}", read.body);
    assert_eq!(read.json()["members"][0]["id"], 1, "{}", read.body);
    let who = http(
        "GET",
        &format!("{base}/console/api/whoami"),
        &[("authorization", &viewer)],
        None,
    );
    assert_eq!(who.json()["can_act"], false, "{}", who.body);
    let wrong = http("GET", &overview, &[("authorization", "Bearer not-a-token")], None);
    assert_eq!(wrong.status, 401, "{}", wrong.body);
    let hold = act(
        &base,
        "queue/hold",
        "{\"domain\":\"example.test\"}",
        &[("authorization", &viewer)],
    );
    assert_eq!(hold.status, 403, "{}", hold.body);
    // The page (no data in it) loads for everyone, to show the sign-in form.
    assert_eq!(http("GET", &format!("{base}/console"), &[], None).status, 200);
}
