//! Automatic backoff end to end: a real peer (aiosmtpd, scripted) answers
//! with a provider's throttle reply, a `[[backoff]]` rule turns it into an
//! action recorded in the control group, and every node of the cluster
//! holds (or bounces) the destination's mail until the action expires.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::cluster::{join, shards};
use crate::harness::*;
use crate::metrics::get_metrics;
use tern_testkit::peers::Aiosmtpd;

/// Gmail's throttle reply, as its lines.
const GMAIL_421: [&str; 3] = [
    "421-4.7.28 [127.0.0.1      15] Our system has detected an unusual rate of",
    "421-4.7.28 unsolicited mail originating from your IP address. To protect our",
    "421 4.7.28 users from spam, mail sent from your IP address has been temporarily rate limited. - gsmtp",
];

/// The throttling MX of `backoff_peer.py`: the first `throttled` RCPTs get
/// `reply`, the rest 250; its log has one line per RCPT and per message.
struct ThrottlingPeer {
    child: Child,
    addr: std::net::SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

/// One line of the peer's log.
#[derive(Debug)]
struct Seen {
    at: f64,
    what: String,
    arg: String,
    code: String,
    /// The client address the peer saw.
    client: String,
}

impl ThrottlingPeer {
    fn start(throttled: usize, reply: &[&str]) -> ThrottlingPeer {
        Self::start_for(throttled, reply, None)
    }

    /// As [`ThrottlingPeer::start`], throttling only RCPTs from `only`.
    fn start_for(throttled: usize, reply: &[&str], only: Option<&str>) -> ThrottlingPeer {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/backoff_peer.py");
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("peer.log");
        for _ in 0..5 {
            let port = free_port();
            let mut child = Command::new("python3")
                .arg(&script)
                .arg(port.to_string())
                .arg(&log)
                .arg(throttled.to_string())
                .args(reply)
                .env("BACKOFF_PEER_ONLY", only.unwrap_or(""))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.path().join("stderr")).unwrap())
                .spawn()
                .unwrap();
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if Client::connect(addr).is_ok() {
                    return ThrottlingPeer {
                        child,
                        addr,
                        log,
                        _dir: dir,
                    };
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
            eprintln!(
                "throttling peer on {port} did not start: {}",
                std::fs::read_to_string(dir.path().join("stderr")).unwrap_or_default()
            );
        }
        panic!("could not start the throttling peer");
    }

    fn seen(&self) -> Vec<Seen> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut f = l.split(' ');
                Some(Seen {
                    at: f.next()?.parse().ok()?,
                    what: f.next()?.to_owned(),
                    arg: f.next()?.to_owned(),
                    code: f.next().unwrap_or("").to_owned(),
                    client: f.next().unwrap_or("").to_owned(),
                })
            })
            .collect()
    }

    /// Message-IDs accepted, with when.
    fn delivered(&self) -> BTreeMap<String, f64> {
        self.seen()
            .into_iter()
            .filter(|s| s.what == "data")
            .map(|s| (s.arg, s.at))
            .collect()
    }
}

impl Drop for ThrottlingPeer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of one sample (`name{labels}`) on the node's /metrics, 0 if absent.
fn metric(node: &Node, sample: &str) -> f64 {
    let (_, body) = get_metrics(node.http, None);
    body.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The `fields` of the node's `shaping` events so far.
fn shaping_events(node: &Node) -> Vec<serde_json::Value> {
    node.logs()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["target"] == "tern::event" && l["fields"]["event"] == "shaping")
        .map(|l| l["fields"].clone())
        .collect()
}

fn send(node: &Node, from: &str, to: &str, tag: &str) {
    let mut c = Client::connect(node.smtp).unwrap();
    c.command("EHLO t.test").unwrap();
    c.send_mail(from, &[to], &body(tag, 300))
        .unwrap_or_else(|e| panic!("{tag}: {e}"));
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

const SUSPEND_SECS: u64 = 10;

#[test]
fn a_throttle_reply_suspends_the_destination_on_every_node_until_it_expires() {
    if !Aiosmtpd::available() {
        return;
    }
    let _serial = cluster_lock();
    let peer = ThrottlingPeer::start(1, &GMAIL_421);
    let extra = format!(
        "shards = 6\n\n[log]\nformat = \"json\"\n\n[[route]]\ndomain = \"*\"\nto = \"{}\"\n\n[delivery]\nretry_schedule = [\"1s\"]\n\n\
         [[backoff]]\nname = \"gmail-rate\"\ncode = \"421\"\nenhanced = \"4.7.28\"\n\
         match = \"unusual rate of\\\\s+unsolicited mail\"\naction = \"suspend\"\nduration = \"{SUSPEND_SECS}s\"\n",
        peer.addr
    );
    let n1 = Node::cluster_node(1, true, &extra);
    let n2 = Node::cluster_node(2, false, &extra);
    let n3 = Node::cluster_node(3, false, &extra);
    join(&n1, &n2, 2);
    join(&n1, &n3, 3);
    wait_for(Duration::from_secs(90), "every node leading some of 6 shards", || {
        let s = shards(&n1);
        let mut leads: BTreeMap<u64, usize> = BTreeMap::new();
        for sh in &s {
            *leads.entry(sh["leader"].as_u64().unwrap_or(0)).or_default() += 1;
        }
        s.len() == 6
            && s.iter()
                .all(|sh| sh["voters"].as_array().unwrap().len() == 3 && sh["joint"] == false)
            && leads.len() == 3
            && !leads.contains_key(&0)
    });
    let nodes = [&n1, &n2, &n3];

    // The first message meets the throttle reply.
    send(&n1, "a@tern.test", "b@example.test", "trigger");
    wait_for(Duration::from_secs(30), "the peer's 421", || {
        peer.seen().iter().any(|s| s.what == "rcpt" && s.code == "421")
    });
    wait_for(Duration::from_secs(30), "the suspension on every node", || {
        nodes
            .iter()
            .all(|n| metric(n, "tern_shaping_actions{action=\"suspend\"}") == 1.0)
    });
    let everywhere = unix_now();
    let recorded: Vec<serde_json::Value> = nodes.iter().flat_map(|n| shaping_events(n)).collect();
    assert_eq!(
        recorded.len(),
        1,
        "one node saw the reply and recorded it: {recorded:?}"
    );
    let event = &recorded[0];
    assert_eq!(event["state"], "recorded", "{event}");
    assert_eq!(event["scope"], "domain:example.test", "{event}");
    assert_eq!(event["action"], "suspend", "{event}");
    assert_eq!(event["rule"], "gmail-rate", "{event}");
    assert!(event["reason"].as_str().unwrap().contains("4.7.28"), "{event}");
    let until = chrono::DateTime::parse_from_rfc3339(event["until"].as_str().unwrap())
        .unwrap()
        .timestamp() as f64;
    let recorder = event["node"].as_u64().unwrap();

    // Mail taken by every node while the action is in force waits for it.
    for (i, n) in nodes.iter().enumerate() {
        for j in 0..2 {
            send(n, "a@tern.test", "b@example.test", &format!("held-{i}-{j}"));
        }
    }
    assert!(
        unix_now() < until - 1.0,
        "the machine is too slow for this test's {SUSPEND_SECS}s suspension"
    );
    wait_for(Duration::from_secs(30), "every node holding mail back", || {
        nodes
            .iter()
            .all(|n| metric(n, "tern_backoff_recipients_total{action=\"suspend\"}") >= 1.0)
    });

    // Then it is all delivered, none of it before the action expired.
    wait_for(
        Duration::from_secs(SUSPEND_SECS + 90),
        "all 7 messages at the peer",
        || peer.delivered().len() == 7,
    );
    let delivered = peer.delivered();
    for i in 0..3 {
        for j in 0..2 {
            assert!(
                delivered.contains_key(&format!("held-{i}-{j}@tern.test")),
                "{delivered:?}"
            );
        }
    }
    let seen = peer.seen();
    let early: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.at > everywhere && s.at < until - 0.5)
        .collect();
    assert!(early.is_empty(), "attempts while suspended (until {until}): {early:?}");

    // The node that recorded it tells its expiry; the gauge falls everywhere.
    let recorder = nodes[(recorder - 1) as usize];
    wait_for(Duration::from_secs(30), "the expired event", || {
        shaping_events(recorder).iter().any(|e| e["state"] == "expired")
    });
    wait_for(Duration::from_secs(30), "no action in force", || {
        nodes
            .iter()
            .all(|n| metric(n, "tern_shaping_actions{action=\"suspend\"}") == 0.0)
    });
}

/// A `bounce` rule: once the destination said it is closing for good,
/// what is queued for it (and what comes after) fails with a reply naming
/// the rule, and the senders get their DSNs.
#[test]
fn a_bounce_rule_fails_the_queued_mail_of_the_destination() {
    if !Aiosmtpd::available() {
        return;
    }
    let peer = ThrottlingPeer::start(1, &["421 4.7.1 gone.test is closing for good, stop sending"]);
    let sender_mx = SmtpSink::start(&[]);
    let node = Node::start(&format!(
        "[[route]]\ndomain = \"sender.test\"\nto = \"{}\"\n\n[[route]]\ndomain = \"*\"\nto = \"{}\"\n\n\
         [delivery]\nretry_schedule = [\"1s\"]\nbackoff_defaults = false\n\n\
         [[backoff]]\nname = \"retired\"\ncode = \"4xx\"\nmatch = \"closing for good\"\naction = \"bounce\"\nduration = \"1h\"\n",
        sender_mx.addr, peer.addr
    ));
    send(&node, "a@sender.test", "x@gone.test", "first");
    wait_for(Duration::from_secs(30), "the bounce action", || {
        metric(&node, "tern_shaping_actions{action=\"bounce\"}") == 1.0
    });
    send(&node, "b@sender.test", "y@gone.test", "second");
    wait_for(Duration::from_secs(60), "two failure DSNs", || {
        sender_mx
            .messages()
            .iter()
            .filter(|m| m.contains("Action: failed"))
            .count()
            == 2
    });
    for tag in ["first", "second"] {
        let dsn = sender_mx
            .messages()
            .into_iter()
            .find(|m| m.contains(&format!("{tag}@tern.test")))
            .unwrap_or_else(|| panic!("no DSN for {tag}"));
        assert!(dsn.contains("Status: 5.7.0"), "{dsn}");
        assert!(
            dsn.contains("Diagnostic-Code: smtp; 554 5.7.0 mail to domain:gone.test bounced by backoff"),
            "{dsn}"
        );
    }
    // Only the first RCPT reached the peer; nothing was delivered to it.
    let seen = peer.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].code, "421");
    assert_eq!(metric(&node, "tern_backoff_recipients_total{action=\"bounce\"}"), 2.0);
}

/// An action survives a restart; an operator lifts it early with
/// `ternctl shaping clear SCOPE` (an audited change), then `queue retry`
/// sends what it held back.
#[test]
fn an_action_survives_a_restart_and_an_operator_lifts_it_early() {
    if !Aiosmtpd::available() {
        return;
    }
    let peer = ThrottlingPeer::start(1, &GMAIL_421);
    let mut node = Node::start(&format!(
        "[log]\nformat = \"json\"\n\n[[route]]\ndomain = \"*\"\nto = \"{}\"\n\n[delivery]\nretry_schedule = [\"1s\"]\n",
        peer.addr
    ));
    send(&node, "a@tern.test", "b@example.test", "lift-1");
    wait_for(Duration::from_secs(30), "the shipped Gmail rule's suspension", || {
        metric(&node, "tern_shaping_actions{action=\"suspend\"}") == 1.0
    });
    let recorded = shaping_events(&node);
    assert_eq!(recorded[0]["rule"], "default:gmail-rate-limited", "{recorded:?}");
    wait_for(Duration::from_secs(30), "the message held back", || {
        metric(&node, "tern_backoff_recipients_total{action=\"suspend\"}") >= 1.0
    });

    let status = node.signal_and_wait("TERM", Duration::from_secs(30));
    assert_eq!(status.code(), Some(0));
    node.spawn();
    wait_for(Duration::from_secs(30), "the suspension after the restart", || {
        metric(&node, "tern_shaping_actions{action=\"suspend\"}") == 1.0
    });
    send(&node, "a@tern.test", "c@example.test", "lift-2");
    wait_for(Duration::from_secs(30), "the new message held back", || {
        metric(&node, "tern_backoff_recipients_total{action=\"suspend\"}") >= 1.0
    });
    assert_eq!(peer.seen().len(), 1, "only the first RCPT reached the peer");

    let out = node.ternctl(&["shaping", "clear", "domain:nowhere.test"]);
    assert_eq!(out.status.code(), Some(3), "no such action: {out:?}");
    let out = node.ternctl(&["-o", "json", "shaping", "clear", "domain:example.test"]);
    assert!(out.status.success(), "{out:?}");
    let lifted: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(lifted["action"], "suspend", "{lifted}");
    assert_eq!(lifted["rule"], "default:gmail-rate-limited", "{lifted}");
    wait_for(Duration::from_secs(10), "the lifted event", || {
        shaping_events(&node).iter().any(|e| e["state"] == "lifted")
    });
    assert_eq!(metric(&node, "tern_shaping_actions{action=\"suspend\"}"), 0.0);

    let out = node.ternctl(&["queue", "retry", "--domain", "example.test"]);
    assert!(out.status.success(), "{out:?}");
    wait_for(Duration::from_secs(30), "the held messages delivered", || {
        let d = peer.delivered();
        d.contains_key("lift-1@tern.test") && d.contains_key("lift-2@tern.test")
    });
}

/// A `scope = "source"` rule with egress pools: the throttle reply given to
/// one source (127.0.0.2) suspends that source for the destination only;
/// the pool's other source (127.0.0.3) carries the mail meanwhile.
#[test]
fn a_source_scoped_action_moves_mail_to_the_pools_other_source() {
    if !Aiosmtpd::available() {
        return;
    }
    let peer = ThrottlingPeer::start_for(1, &GMAIL_421, Some("127.0.0.2"));
    let extra = format!(
        "[log]\nformat = \"json\"\n\n[[route]]\ndomain = \"*\"\nto = \"{}\"\n\n[delivery]\nretry_schedule = [\"1s\"]\n\n\
         [[source]]\nname = \"a\"\naddress = \"127.0.0.2\"\n\n[[source]]\nname = \"b\"\naddress = \"127.0.0.3\"\n\n\
         [[pool]]\nname = \"default\"\nsources = [\"a\", \"b\"]\n\n\
         [[backoff]]\nname = \"per-ip\"\ncode = \"421\"\nenhanced = \"4.7.28\"\naction = \"suspend\"\n\
         duration = \"10m\"\nscope = \"source\"\n",
        peer.addr
    );
    let node = Node::start(&extra);
    send(&node, "a@tern.test", "b@example.test", "first");
    send(&node, "a@tern.test", "b@example.test", "second");
    wait_for(Duration::from_secs(30), "the 421 to source a", || {
        peer.seen().iter().any(|s| s.what == "rcpt" && s.code == "421")
    });
    wait_for(Duration::from_secs(30), "the action recorded", || {
        shaping_events(&node).iter().any(|e| e["state"] == "recorded")
    });
    let event = shaping_events(&node).remove(0);
    assert_eq!(event["scope"], "a|domain:example.test", "{event}");
    let recorded = unix_now();
    for i in 0..8 {
        send(&node, "a@tern.test", "b@example.test", &format!("after-{i}"));
    }
    wait_for(Duration::from_secs(60), "all 10 messages at the peer", || {
        peer.delivered().len() == 10
    });
    let seen = peer.seen();
    let throttled: Vec<&Seen> = seen.iter().filter(|s| s.code == "421").collect();
    assert!(throttled.iter().all(|s| s.client == "127.0.0.2"), "{throttled:?}");
    let from_a_after: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.at > recorded + 0.5 && s.client == "127.0.0.2")
        .collect();
    assert!(
        from_a_after.is_empty(),
        "source a was used while suspended for the destination: {from_a_after:?}"
    );
    assert!(
        seen.iter()
            .filter(|s| s.what == "data" && s.client == "127.0.0.3")
            .count()
            >= 8,
        "source b carried the mail: {seen:?}"
    );
}
