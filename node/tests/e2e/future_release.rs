//! Future message release (RFC 4865) end to end: Python's smtplib submits
//! with STARTTLS and AUTH on the submission port, asking HOLDFOR= or
//! HOLDUNTIL=; the message waits in the queue (shown `scheduled` by
//! ternctl) and reaches the smtp-sink no earlier than its release time.

use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::harness::*;
use crate::submission::{Msa, ALICE_PASSWORD};

/// One SMTP transaction through smtplib; prints JSON with the EHLO reply
/// (after STARTTLS), the MAIL reply and, if MAIL was accepted, DATA's.
const SEND_PY: &str = r#"
import json, smtplib, ssl, sys
a = json.loads(sys.argv[1])
out = {}
s = smtplib.SMTP(a["host"], a["port"], timeout=30)
s.ehlo("client.test")
if a["tls"]:
    s.starttls(context=ssl._create_unverified_context())
    s.ehlo("client.test")
out["ehlo"] = s.ehlo_resp.decode()
if a["auth"]:
    s.login("alice@sub.test", a["password"])
code, msg = s.mail("alice@sub.test", a["options"])
out["mail"] = "%d %s" % (code, msg.decode())
if code == 250:
    s.rcpt(a["to"])
    code, msg = s.data(("Subject: %s\r\n\r\nhello\r\n" % a["subject"]).encode())
    out["data"] = "%d %s" % (code, msg.decode())
s.quit()
print(json.dumps(out))
"#;

struct Send<'a> {
    server: std::net::SocketAddr,
    tls: bool,
    auth: bool,
    options: &'a [&'a str],
    subject: &'a str,
}

/// Runs [`SEND_PY`]; returns its JSON.
fn send(s: Send<'_>) -> serde_json::Value {
    let args = serde_json::json!({
        "host": s.server.ip().to_string(), "port": s.server.port(), "tls": s.tls, "auth": s.auth,
        "password": ALICE_PASSWORD, "options": s.options, "to": format!("{}@far.test", s.subject),
        "subject": s.subject,
    });
    let out = Command::new("python3")
        .args(["-c", SEND_PY, &args.to_string()])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "smtplib failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json from smtplib")
}

fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// The queue id from `250 2.0.0 Ok: queued as ID`.
fn queue_id(data_reply: &serde_json::Value) -> String {
    let r = data_reply.as_str().unwrap();
    assert!(r.starts_with("250 "), "{r}");
    r.rsplit(' ').next().unwrap().to_owned()
}

/// When each message reached the sink (the dump file's last write, in unix
/// seconds), by subject.
fn arrivals(sink: &SmtpSink) -> Vec<(String, i64)> {
    tern_testkit::peers::files_in(&sink.dumps_dir())
        .iter()
        .map(|p| {
            let text = String::from_utf8_lossy(&std::fs::read(p).unwrap()).into_owned();
            let subject = text
                .lines()
                .find_map(|l| l.strip_prefix("Subject: "))
                .unwrap_or_default()
                .to_owned();
            let at = std::fs::metadata(p).unwrap().modified().unwrap();
            (subject, at.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64)
        })
        .collect()
}

#[test]
fn held_submissions_reach_the_sink_at_their_release_time() {
    let msa = Msa::start(5);
    let sub = msa.node.submission;
    let t0 = unix_now();
    let hold_for = send(Send {
        server: sub,
        tls: true,
        auth: true,
        options: &["HOLDFOR=8"],
        subject: "holdfor",
    });
    // The default `[api] max_schedule_ahead` (72h) is the advertised limit.
    let ehlo = hold_for["ehlo"].as_str().unwrap();
    let keyword = ehlo
        .lines()
        .find(|l| l.starts_with("FUTURERELEASE "))
        .unwrap_or_else(|| panic!("no FUTURERELEASE in {ehlo}"));
    let mut words = keyword.split(' ').skip(1);
    assert_eq!(words.next(), Some("259200"), "{keyword}");
    let latest = chrono::DateTime::parse_from_rfc3339(words.next().unwrap()).unwrap();
    assert!((latest.timestamp() - (t0 + 259_200)).abs() <= 5, "{keyword}");
    assert_eq!(hold_for["mail"], "250 2.1.0 Sender ok");
    let hold_for_id = queue_id(&hold_for["data"]);

    let until = t0 + 10;
    let until_text = chrono::DateTime::from_timestamp(until, 0).unwrap().to_rfc3339();
    let hold_until = send(Send {
        server: sub,
        tls: true,
        auth: true,
        options: &[&format!("HOLDUNTIL={until_text}")],
        subject: "holduntil",
    });
    let hold_until_id = queue_id(&hold_until["data"]);
    let now = send(Send {
        server: sub,
        tls: true,
        auth: true,
        options: &[],
        subject: "now",
    });
    queue_id(&now["data"]);

    // Held mail waits in the queue, shown as scheduled until its time.
    // (Asked only well before the release: once delivered, a message is gone.)
    if unix_now() < t0 + 6 {
        for id in [&hold_for_id, &hold_until_id] {
            let m = msa.node.ternctl_json(&["queue", "show", id]);
            assert_eq!((&m["state"], &m["attempts"]), (&"scheduled".into(), &0.into()), "{m}");
            assert!(m["next_attempt"].as_i64().unwrap() >= t0 + 8, "{m}");
        }
    } else {
        eprintln!("submission was slow: the queue state was not checked");
    }
    let list = msa.node.ternctl(&["queue", "list"]);
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(list.lines().next().unwrap_or_default().ends_with("STATE"), "{list}");

    // Mail without a hold goes at once; the held mail is not there with it.
    wait_for(Duration::from_secs(30), "the unheld message at the sink", || {
        arrivals(&msa.sink).iter().any(|(s, _)| s == "now")
    });
    let seen = arrivals(&msa.sink);
    if unix_now() < t0 + 8 {
        let early: Vec<_> = seen.into_iter().filter(|(s, _)| s != "now").collect();
        assert!(early.is_empty(), "delivered before their release: {early:?}");
    }

    wait_for(Duration::from_secs(60), "both held messages at the sink", || {
        arrivals(&msa.sink).len() == 3
    });
    let arrived = arrivals(&msa.sink);
    for (subject, release) in [("holdfor", t0 + 8), ("holduntil", until)] {
        let at = arrived.iter().find(|(s, _)| s == subject).unwrap().1;
        assert!(
            at >= release,
            "{subject} arrived at {at}, before its release at {release}"
        );
        // And not long after: the shard schedules by the release time.
        assert!(at <= release + 20, "{subject} arrived at {at}, release was {release}");
    }
    // The outcomes are recorded right after the deliveries.
    wait_for(Duration::from_secs(20), "an empty queue", || {
        msa.node.queued_ids().is_empty()
    });
}

#[test]
fn hold_parameters_are_refused_without_auth_out_of_range_or_together() {
    let msa = Msa::start(5);
    let sub = msa.node.submission;
    let mail = |server, tls, auth, options: &[&str]| {
        let r = send(Send {
            server,
            tls,
            auth,
            options,
            subject: "refused",
        });
        assert!(r.get("data").is_none(), "{r}");
        r["mail"].as_str().unwrap().to_owned()
    };
    assert_eq!(
        mail(sub, true, false, &["HOLDFOR=8"]),
        "530 5.7.0 Authentication required"
    );
    assert!(mail(sub, true, true, &["HOLDFOR=259201"])
        .starts_with("554 5.7.0 Requested release time exceeds the maximum (259200 seconds"),);
    let far = chrono::DateTime::from_timestamp(unix_now() + 4 * 86_400, 0)
        .unwrap()
        .to_rfc3339();
    assert!(mail(sub, true, true, &[&format!("HOLDUNTIL={far}")]).starts_with("554 5.7.0 "));
    assert_eq!(
        mail(sub, true, true, &["HOLDFOR=8", &format!("HOLDUNTIL={far}")]),
        "501 5.5.4 Invalid parameters: HOLDFOR and HOLDUNTIL together"
    );
    assert_eq!(
        mail(sub, true, true, &["HOLDFOR=8s"]),
        "501 5.5.4 Bad HOLDFOR parameter syntax"
    );
    // The MX listener neither advertises nor accepts it.
    let mx = send(Send {
        server: msa.node.smtp,
        tls: true,
        auth: false,
        options: &["HOLDFOR=8"],
        subject: "mx",
    });
    assert!(!mx["ehlo"].as_str().unwrap().contains("FUTURERELEASE"), "{mx}");
    assert_eq!(mx["mail"], "555 5.5.4 Unsupported option: HOLDFOR");
    assert!(msa.node.queued_ids().is_empty());
}
