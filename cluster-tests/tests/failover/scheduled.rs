//! Scheduled mail across a failover: messages submitted with RFC 4865
//! `HOLDFOR=` wait in their shards; the leader of those shards is
//! SIGKILLed before the release time; the new leaders release them at
//! their time, each exactly once, none early.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, UNIX_EPOCH};

use cluster_tests::cluster::Options;
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

#[test]
fn scheduled_mail_survives_the_kill_of_its_shard_leader() {
    let _s = serial();
    let ca = TestCa::new("tern scheduled test CA");
    let (cert, key) = ca.issue("submission", &["mx.tern.test"]);
    let users = ca.dir.path().join("users");
    std::fs::write(&users, format!("{USER}:{}\n", hash_password(PASSWORD))).unwrap();
    let mut c = cluster(
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
    wait_balanced(&c);
    // Submitted through one node, the messages go to the shards it leads.
    let victim = busiest_leader(&c);
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
    assert_eq!(sent.len(), MESSAGES);
    // The earliest a message may be released: HOLDFOR counts from its MAIL.
    let release: BTreeMap<String, i64> = sent
        .iter()
        .map(|m| {
            let t = m["t"].as_f64().unwrap().floor() as i64;
            (m["mid"].as_str().unwrap().to_owned(), t + HOLD_SECS)
        })
        .collect();
    let earliest = *release.values().min().unwrap();

    // Where they wait: scheduled, in shards the victim leads.
    let list = c
        .node(victim)
        .unwrap()
        .ternctl_json(&["queue", "list", "--limit", "1000"], Duration::from_secs(20))
        .unwrap();
    let ids: Vec<&str> = sent.iter().map(|m| m["id"].as_str().unwrap()).collect();
    let held: Vec<&serde_json::Value> = list["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| ids.contains(&m["id"].as_str().unwrap()))
        .collect();
    assert_eq!(held.len(), MESSAGES, "{list}");
    let now = std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        now < earliest,
        "submission took too long: the hold ran out before the kill"
    );
    assert!(held.iter().all(|m| m["state"] == "scheduled"), "{list}");
    let mut shards: Vec<u64> = held.iter().map(|m| m["shard"].as_u64().unwrap()).collect();
    shards.sort_unstable();
    shards.dedup();
    let leaders = c.leaders().unwrap();
    assert!(
        shards.iter().all(|s| leaders.get(s) == Some(&victim)),
        "shards {shards:?} not all led by node {victim}: {leaders:?}"
    );

    c.kill(victim).unwrap();
    let elected = wait_new_leaders(&c, &shards, victim, Duration::from_secs(30));
    eprintln!("scheduled: killed node {victim} leading {shards:?}; new leaders after {elected:.1?}");
    let now = std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        now < earliest,
        "the new leaders were elected after the release time; nothing was tested"
    );
    assert!(c.sink.deliveries().is_empty(), "delivered before the release time");

    // Every message delivered exactly once, none before its release time.
    tern_testkit::wait_until(Duration::from_secs(90), "every scheduled message at the sink", || {
        c.sink.counts().len() >= MESSAGES
    })
    .unwrap();
    let counts = c.sink.counts();
    assert_eq!(counts.len(), MESSAGES, "{counts:?}");
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    for d in c.sink.deliveries() {
        let at = d.at.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
        let due = release[&d.message_id];
        assert!(
            at >= due,
            "{} delivered at {at}, before its release at {due}",
            d.message_id
        );
        assert_ne!(d.node(), Some(victim), "delivered by the killed node");
    }
    c.restart(victim).unwrap();
    assert_converged("scheduled", &c, Duration::from_secs(60));
}
