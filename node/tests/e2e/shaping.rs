//! `[[shaping]]` end to end: a cluster-wide message rate held by three
//! nodes together, an MX-suffix rule that puts two domains in one budget,
//! and `ternctl shaping show`.
//!
//! Rates are checked as upper bounds the limiter guarantees (a slow machine
//! only delivers later), plus that everything is delivered in the end.

use std::time::{Duration, Instant};

use crate::cluster::{join, shards};
use crate::harness::*;
use tern_testkit::dns::DnsServer;

/// Transactions the sink has started (smtp-sink creates a dump file when a
/// transaction begins): never fewer than the messages delivered.
fn started(sink: &SmtpSink) -> usize {
    std::fs::read_dir(sink.dumps_dir()).map(|d| d.count()).unwrap_or(0)
}

/// Samples the sink until `total` messages are there (or `deadline`),
/// asserting at every sample that at most `burst + rate_per_sec × elapsed`
/// transactions have started since `t0`.
fn watch_rate(sink: &SmtpSink, t0: Instant, total: usize, rate_per_sec: f64, burst: f64, deadline: Duration) {
    let mut samples = Vec::new();
    loop {
        let n = started(sink);
        let elapsed = t0.elapsed().as_secs_f64();
        samples.push((elapsed, n));
        let bound = burst + rate_per_sec * elapsed;
        assert!(
            n as f64 <= bound,
            "{n} transactions by {elapsed:.1}s, over the bound {bound:.1}: {samples:?}"
        );
        if n >= total {
            break;
        }
        assert!(
            t0.elapsed() < deadline,
            "only {n} of {total} delivered by {deadline:?}: {samples:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn send_many(node: &Node, to: &str, tags: &[String]) {
    let mut c = Client::connect(node.smtp).unwrap();
    c.command("EHLO sender.test").unwrap();
    for tag in tags {
        let queued = c.send_mail("a@tern.test", &[to], &body(tag, 512));
        assert!(queued.is_ok(), "{tag} not accepted: {queued:?}");
    }
}

/// Three nodes under one `rate = "60/min"` rule: the sink sees at most
/// 60/min plus the documented burst (one message per delivering node
/// here: one second's worth of each node's share, at least one), and
/// every message arrives.
#[test]
fn three_nodes_hold_one_cluster_wide_rate() {
    let _serial = cluster_lock();
    let sink = SmtpSink::start(&[]);
    let extra = format!(
        "shards = 6\n\n[[route]]\ndomain = \"*\"\nto = \"{}\"\n\n\
         [[shaping]]\nname = \"slow-example\"\ndomain = \"example.test\"\nrate = \"60/min\"\n",
        sink.addr
    );
    let n1 = Node::cluster_node(1, true, &extra);
    let n2 = Node::cluster_node(2, false, &extra);
    let n3 = Node::cluster_node(3, false, &extra);
    join(&n1, &n2, 2);
    join(&n1, &n3, 3);
    wait_for(
        Duration::from_secs(90),
        "every node leads two of the six shards",
        || {
            let s = shards(&n1);
            s.len() == 6
                && [1, 2, 3]
                    .iter()
                    .all(|id| s.iter().filter(|sh| sh["leader"].as_u64() == Some(*id)).count() == 2)
        },
    );

    // `shaping show` names the rule, the limit and each node's share.
    let show = n2.ternctl_json(&["shaping", "show", "example.test"]);
    assert_eq!(show["scope"], "domain:example.test", "{show}");
    let rules: Vec<&str> = show["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(rules, ["slow-example"], "{show}");
    assert_eq!(show["limits"]["rate"], "60/min", "{show}");
    let shares = show["shares"].as_array().unwrap();
    assert_eq!(shares.len(), 3, "{show}");
    for s in shares {
        assert_eq!(s["shards_led"], 2, "{show}");
        let f = s["fraction"].as_f64().unwrap();
        assert!((f - 1.0 / 3.0).abs() < 1e-6, "{show}");
        assert!((s["rate_per_min"].as_f64().unwrap() - 20.0).abs() < 1e-6, "{show}");
    }

    // 30 messages, 10 through each node.
    let t0 = Instant::now();
    let tags: Vec<Vec<String>> = (0..3)
        .map(|n| (0..10).map(|i| format!("rate-{n}-{i}")).collect())
        .collect();
    std::thread::scope(|s| {
        for (node, tags) in [&n1, &n2, &n3].into_iter().zip(&tags) {
            s.spawn(move || send_many(node, "b@example.test", tags));
        }
    });
    // 1/s cluster-wide; burst: one per node; +1 for the share being read
    // again once a second should a leader move meanwhile.
    watch_rate(&sink, t0, 30, 1.0, 4.0, Duration::from_secs(90));
    wait_for(
        Duration::from_secs(30),
        "all 30 delivered and every queue empty",
        || {
            let got = sink.messages();
            tags.iter()
                .flatten()
                .all(|t| got.iter().any(|m| m.contains(&format!("<{t}@tern.test>"))))
                && [&n1, &n2, &n3].iter().all(|n| n.queued_ids().is_empty())
        },
    );
    // Held messages are not attempts: their deferrals are not retries.
    assert!(
        t0.elapsed() >= Duration::from_secs(20),
        "30 messages at 1/s took only {:?}",
        t0.elapsed()
    );
}

/// Two domains whose MX hosts both end in `.prov.test` share one budget:
/// the combined rate is capped, not each domain's.
#[test]
fn an_mx_suffix_rule_puts_two_domains_in_one_budget() {
    let sink = SmtpSink::start(&[]);
    let dns = DnsServer::start(
        "mx-host=a.test,mx1.a.prov.test,10\nmx-host=b.test,mx1.b.prov.test,10\n\
         host-record=mx1.a.prov.test,127.0.0.1\nhost-record=mx1.b.prov.test,127.0.0.1\n",
    );
    let node = Node::start(&format!(
        "[dns]\nnameservers = [\"{}\"]\n\n[delivery]\nsmtp_port = {}\n\n\
         [[shaping]]\nname = \"prov\"\nmx_suffix = \".prov.test\"\nrate = \"30/min\"\nmax_connections = 1\n",
        dns.addr,
        sink.addr.port()
    ));

    let show = node.ternctl_json(&["shaping", "show", "b.test"]);
    assert_eq!(show["scope"], "mx:.prov.test", "{show}");
    assert_eq!(show["hosts"], serde_json::json!(["mx1.b.prov.test"]), "{show}");
    let rules: Vec<&str> = show["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(rules, ["prov"], "{show}");
    assert_eq!(show["limits"]["rate"], "30/min", "{show}");
    assert_eq!(show["limits"]["max_connections"], 1, "{show}");
    assert_eq!(show["shares"][0]["fraction"], 1.0, "{show}");
    assert_eq!(show["shares"][0]["rate_per_min"], 30.0, "{show}");
    assert_eq!(show["shares"][0]["max_connections"], 1, "{show}");
    assert!(show["actions"].as_array().unwrap().is_empty(), "{show}");
    // A domain elsewhere is in its own scope, unlimited.
    let other = node.ternctl_json(&["shaping", "show", "c.test"]);
    assert_eq!(other["scope"], "domain:c.test", "{other}");
    assert!(other["rules"].as_array().unwrap().is_empty(), "{other}");
    // A bad name is refused with a clear error.
    let bad = node.ternctl(&["shaping", "show", "not a domain"]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("is not a domain name"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );

    let t0 = Instant::now();
    let a: Vec<String> = (0..5).map(|i| format!("prov-a-{i}")).collect();
    let b: Vec<String> = (0..5).map(|i| format!("prov-b-{i}")).collect();
    std::thread::scope(|s| {
        s.spawn(|| send_many(&node, "x@a.test", &a));
        s.spawn(|| send_many(&node, "y@b.test", &b));
    });
    // 0.5/s for both domains together (each alone would allow twice that), burst 1.
    watch_rate(&sink, t0, 10, 0.5, 1.0, Duration::from_secs(60));
    wait_for(Duration::from_secs(30), "all 10 delivered", || {
        let got = sink.messages();
        a.iter()
            .chain(&b)
            .all(|t| got.iter().any(|m| m.contains(&format!("<{t}@tern.test>"))))
    });
    // Holding shows in the metrics under the rule's scope (at least the
    // eight messages beyond the first two slots were held once).
    let samples = crate::metrics::scrape(&node);
    let held = crate::metrics::sum(&samples, "tern_shaping_held_total", &[("scope", "mx:.prov.test")]);
    assert!(held >= 8.0, "held {held}");
}

/// A rule naming an egress source limits what leaves from that source (its
/// own budget, `<source>|<scope>`), on top of the destination's limits.
#[test]
fn a_source_rule_limits_mail_from_that_source() {
    let sink = SmtpSink::start(&[]);
    let node = Node::start(&format!(
        "[[route]]\ndomain = \"*\"\nto = \"127.0.0.1:{}\"\n\n\
         [[source]]\nname = \"a\"\naddress = \"127.0.0.2\"\n\n\
         [[pool]]\nname = \"default\"\nsources = [\"a\"]\n\n\
         [[shaping]]\nname = \"slow-ip\"\nsource = \"a\"\nrate = \"60/min\"\n",
        sink.addr.port()
    ));
    let tags: Vec<String> = (0..6).map(|i| format!("src-{i}")).collect();
    let t0 = Instant::now();
    send_many(&node, "rcpt@example.test", &tags);
    // 1/s with a burst of one message; 0.5 for the sampling.
    watch_rate(&sink, t0, tags.len(), 1.0, 1.5, Duration::from_secs(60));
    wait_for(Duration::from_secs(10), "the hold counted", || {
        let (_, body) = crate::metrics::get_metrics(node.http, None);
        body.lines().any(|l| {
            l.starts_with("tern_shaping_held_total{scope=\"source:a\"}")
                && l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) >= 1.0
        })
    });
}
