//! Scheduled mail across a failover: messages submitted with RFC 4865
//! `HOLDFOR=` (SMTP) or `send_at` (`POST /api/v1/messages`, a templated
//! batch) wait in their shards; the leader of those shards is SIGKILLed
//! before the release time; the new leaders release them at their time,
//! each exactly once, none early.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, UNIX_EPOCH};

use cluster_tests::cluster::{Cluster, Options};
use tern_testkit::peers::TestCa;

use crate::common::*;

const USER: &str = "sched@tern.test";
const PASSWORD: &str = "scheduled pass";
/// Messages submitted, and how long each is held.
const MESSAGES: usize = 50;
const HOLD_SECS: i64 = 20;

/// Submits `n` messages in one session with STARTTLS, AUTH and `HOLDFOR=`;
/// prints JSON `[{"id": queue id, "mid": Message-ID, "t": unix time before MAIL}]`.
const SUBMIT_PY: &str = r#"
import json, smtplib, ssl, sys, time
host, port, user, password, n, hold, tag = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6], sys.argv[7]
s = smtplib.SMTP(host, port, timeout=60)
s.ehlo("client.test")
s.starttls(context=ssl._create_unverified_context())
s.ehlo("client.test")
assert s.has_extn("futurerelease"), s.ehlo_resp
s.login(user, password)
out = []
for i in range(n):
    mid = "%s-%d@tern.test" % (tag, i)
    t = time.time()
    code, msg = s.mail(user, ["HOLDFOR=" + hold])
    assert code == 250, (code, msg)
    code, msg = s.rcpt("r%d@far.test" % i)
    assert code == 250, (code, msg)
    code, msg = s.data(("Message-ID: <%s>\r\nSubject: scheduled %d\r\n\r\nhello\r\n" % (mid, i)).encode())
    assert code == 250, (code, msg)
    out.append({"id": msg.decode().rsplit(" ", 1)[1], "mid": mid, "t": t})
s.quit()
print(json.dumps(out))
"#;

/// `ternd hash-password` with the password on stdin.
fn hash_password(password: &str) -> String {
    use std::io::Write as _;
    let mut child = Command::new(tern_testkit::bin("ternd"))
        .arg("hash-password")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// One templated `POST /api/v1/messages` of `n` recipients with `send_at`;
/// prints the JSON answer.
const API_PY: &str = r#"
import json, sys, urllib.request
url, key, n, send_at = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
body = {"from": "sched@tern.test", "subject": "Hi {{ name }}", "text": "Dear {{ name }}", "send_at": send_at,
        "recipients": [{"to": "r%d@far.test" % i, "variables": {"name": "R%d" % i}} for i in range(n)]}
req = urllib.request.Request(url + "/api/v1/messages", json.dumps(body).encode(),
                             {"Authorization": "Bearer " + key, "Content-Type": "application/json"})
print(urllib.request.urlopen(req, timeout=60).read().decode())
"#;

/// What was submitted: queue ids, and when each may be released at the
/// earliest (by Message-ID, else `release_default`).
struct Submitted {
    ids: Vec<String>,
    release: BTreeMap<String, i64>,
    release_default: i64,
}

impl Submitted {
    fn release_of(&self, message_id: &str) -> i64 {
        self.release.get(message_id).copied().unwrap_or(self.release_default)
    }

    fn earliest(&self) -> i64 {
        self.release.values().copied().min().unwrap_or(self.release_default)
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A 3-node cluster with a submission listener and a users file.
fn scheduling_cluster() -> (Cluster, TestCa) {
    let ca = TestCa::new("tern scheduled test CA");
    let (cert, key) = ca.issue("submission", &["mx.tern.test"]);
    let users = ca.dir.path().join("users");
    std::fs::write(&users, format!("{USER}:{}\n", hash_password(PASSWORD))).unwrap();
    let c = cluster(
        3,
        Options {
            listen_toml: "submission = [\"127.0.0.1:0\"]".into(),
            extra_toml: format!(
                "[tls]\ncert = \"{}\"\nkey = \"{}\"\n\n[auth]\nusers_file = \"{}\"\n",
                cert.display(),
                key.display(),
                users.display()
            ),
            ..Options::default()
        },
    );
    (c, ca)
}

/// Submits through `submit` to the busiest shard leader (its messages go
/// to the shards it leads), kills it before the release time, and checks
/// that every message is delivered once, by the other nodes, none early.
fn scheduled_across_leader_kill(name: &str, submit: impl FnOnce(&Cluster, u64) -> Submitted) {
    let _s = serial();
    let (mut c, _ca) = scheduling_cluster();
    wait_balanced(&c);
    let victim = busiest_leader(&c);
    let sent = submit(&c, victim);
    assert_eq!(sent.ids.len(), MESSAGES);

    // Where they wait: scheduled, in shards the victim leads.
    let list = c
        .node(victim)
        .unwrap()
        .ternctl_json(&["queue", "list", "--limit", "1000"], Duration::from_secs(20))
        .unwrap();
    let held: Vec<&serde_json::Value> = list["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| sent.ids.iter().any(|id| m["id"] == id.as_str()))
        .collect();
    assert_eq!(held.len(), MESSAGES, "{list}");
    assert!(
        unix_now() < sent.earliest(),
        "{name}: submission took too long: the hold ran out before the kill"
    );
    assert!(held.iter().all(|m| m["state"] == "scheduled"), "{list}");
    let mut shards: Vec<u64> = held.iter().map(|m| m["shard"].as_u64().unwrap()).collect();
    shards.sort_unstable();
    shards.dedup();
    let leaders = c.leaders().unwrap();
    assert!(
        shards.iter().all(|s| leaders.get(s) == Some(&victim)),
        "{name}: shards {shards:?} not all led by node {victim}: {leaders:?}"
    );

    c.kill(victim).unwrap();
    let elected = wait_new_leaders(&c, &shards, victim, Duration::from_secs(30));
    eprintln!("{name}: killed node {victim} leading {shards:?}; new leaders after {elected:.1?}");
    assert!(
        unix_now() < sent.earliest(),
        "{name}: the new leaders were elected after the release time; nothing was tested"
    );
    assert!(
        c.sink.deliveries().is_empty(),
        "{name}: delivered before the release time"
    );

    // Every message delivered exactly once, none before its release time.
    tern_testkit::wait_until(Duration::from_secs(90), "every scheduled message at the sink", || {
        c.sink.counts().len() >= MESSAGES
    })
    .unwrap();
    let counts = c.sink.counts();
    assert_eq!(counts.len(), MESSAGES, "{counts:?}");
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "{name}: delivered more than once: {twice:?}");
    for d in c.sink.deliveries() {
        let at = d.at.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
        let due = sent.release_of(&d.message_id);
        assert!(
            at >= due,
            "{name}: {} delivered at {at}, before its release at {due}",
            d.message_id
        );
        assert_ne!(d.node(), Some(victim), "{name}: delivered by the killed node");
    }
    c.restart(victim).unwrap();
    assert_converged(name, &c, Duration::from_secs(60));
}

/// RFC 4865 over SMTP: HOLDFOR on the submission port, with AUTH.
#[test]
fn scheduled_mail_survives_the_kill_of_its_shard_leader() {
    scheduled_across_leader_kill("scheduled_smtp", |c, victim| {
        let submission = c
            .node(victim)
            .unwrap()
            .listening("submission")
            .expect("a submission listener");
        let out = Command::new("python3")
            .args([
                "-c",
                SUBMIT_PY,
                &submission.ip().to_string(),
                &submission.port().to_string(),
                USER,
                PASSWORD,
                &MESSAGES.to_string(),
                &HOLD_SECS.to_string(),
                "sched",
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "submit: {}", String::from_utf8_lossy(&out.stderr));
        let sent: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        Submitted {
            ids: sent.iter().map(|m| m["id"].as_str().unwrap().to_owned()).collect(),
            // HOLDFOR counts from each message's MAIL.
            release: sent
                .iter()
                .map(|m| {
                    let t = m["t"].as_f64().unwrap().floor() as i64;
                    (m["mid"].as_str().unwrap().to_owned(), t + HOLD_SECS)
                })
                .collect(),
            release_default: i64::MAX,
        }
    });
}

/// The sending API: one templated batch of 50 recipients with `send_at`.
#[test]
fn scheduled_api_batch_survives_the_kill_of_its_shard_leader() {
    scheduled_across_leader_kill("scheduled_api", |c, victim| {
        let node = c.node(victim).unwrap();
        let key = node
            .ternctl_json(
                &["apikey", "create", "--name", "sched", "--scope", "send"],
                Duration::from_secs(20),
            )
            .unwrap();
        let key = key["key"].as_str().unwrap().to_owned();
        let http = node.http.expect("an http listener");
        let send_at = unix_now() + HOLD_SECS;
        let out = Command::new("python3")
            .args([
                "-c",
                API_PY,
                &format!("http://{http}"),
                &key,
                &MESSAGES.to_string(),
                &send_at.to_string(),
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "POST: {}", String::from_utf8_lossy(&out.stderr));
        let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(answer["send_at"], send_at, "{answer}");
        Submitted {
            ids: answer["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i.as_str().unwrap().to_owned())
                .collect(),
            release: BTreeMap::new(),
            release_default: send_at,
        }
    });
}
