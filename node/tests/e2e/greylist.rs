//! Greylisting in a 3-node cluster: a new triplet gets `451 4.7.1`, an
//! early retry too, and a retry after the delay is accepted on ANOTHER
//! node, because the triplet is a control-group record every node reads.

use std::time::{Duration, Instant};

use crate::cluster::{join, shards};
use crate::harness::*;
use crate::metrics::get_metrics;

const DELAY: Duration = Duration::from_secs(5);

fn metric(node: &Node, sample: &str) -> f64 {
    let (_, body) = get_metrics(node.http, None);
    body.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The RCPT reply for one attempt from `from` to `to` through `node`; on
/// 250 the message is sent and must be queued.
fn attempt(node: &Node, from: &str, to: &str) -> String {
    let mut c = Client::connect(node.smtp).unwrap();
    assert!(c.command("EHLO client.test").unwrap().starts_with("250"));
    assert!(c.command(&format!("MAIL FROM:<{from}>")).unwrap().starts_with("250"));
    let reply = c.command(&format!("RCPT TO:<{to}>")).unwrap();
    if reply.starts_with("250") {
        assert!(c.command("DATA").unwrap().starts_with("354"));
        c.send_raw(body("greylisted", 200).as_bytes()).unwrap();
        let queued = c.command(".").unwrap();
        assert!(queued.starts_with("250 2.0.0"), "{queued}");
    }
    let _ = c.command("QUIT");
    reply
}

fn greylisted(reply: &str) -> bool {
    reply.starts_with("451 4.7.1 ") && reply.contains("Greylisted")
}

#[test]
fn a_retry_after_the_delay_passes_on_another_node() {
    let _serial = cluster_lock();
    let maildirs = tempfile::tempdir().unwrap();
    let extra = format!(
        "shards = 3\n\n[policy]\nrelay_networks = []\nlocal_domains = [\"example.test\"]\n\n\
         [local]\nmaildir = \"{}/{{domain}}/{{user}}\"\n\n\
         [greylist]\nenabled = true\ndelay = \"{}s\"\n",
        maildirs.path().display(),
        DELAY.as_secs()
    );
    let n1 = Node::cluster_node(1, true, &extra);
    let n2 = Node::cluster_node(2, false, &extra);
    let n3 = Node::cluster_node(3, false, &extra);
    join(&n1, &n2, 2);
    join(&n1, &n3, 3);
    wait_for(Duration::from_secs(90), "every shard on 3 replicas", || {
        let s = shards(&n1);
        s.len() == 3
            && s.iter()
                .all(|sh| sh["voters"].as_array().unwrap().len() == 3 && sh["joint"] == false)
    });

    // First attempt on node 1: greylisted; an early retry there too.
    let first = Instant::now();
    let reply = attempt(&n1, "alice@sender.test", "bob@example.test");
    assert!(greylisted(&reply), "{reply}");
    let reply = attempt(&n1, "alice@sender.test", "bob@example.test");
    assert!(greylisted(&reply), "{reply}");
    assert_eq!(metric(&n1, "tern_greylist_total{outcome=\"new\"}"), 1.0);
    assert_eq!(metric(&n1, "tern_greylist_total{outcome=\"early\"}"), 1.0);

    // The greylisting delay itself is what the retry must wait for.
    let wait = DELAY.saturating_sub(first.elapsed()) + Duration::from_millis(500);
    std::thread::sleep(wait);

    // The retry lands on node 2, which knows the triplet from the cluster.
    let reply = attempt(&n2, "alice@sender.test", "bob@example.test");
    assert!(reply.starts_with("250 "), "{reply}");
    assert_eq!(metric(&n2, "tern_greylist_total{outcome=\"passed\"}"), 1.0);
    assert_eq!(metric(&n2, "tern_greylist_total{outcome=\"new\"}"), 0.0);

    // Node 3 accepts the triplet from now on, and greylists a new one.
    let reply = attempt(&n3, "alice@sender.test", "bob@example.test");
    assert!(reply.starts_with("250 "), "{reply}");
    let reply = attempt(&n3, "mallory@sender.test", "bob@example.test");
    assert!(greylisted(&reply), "{reply}");
    assert_eq!(metric(&n3, "tern_greylist_total{outcome=\"new\"}"), 1.0);
    // Postmaster is never greylisted.
    let reply = attempt(&n3, "mallory@sender.test", "postmaster@example.test");
    assert!(reply.starts_with("250 "), "{reply}");
    assert_eq!(metric(&n3, "tern_greylist_total{outcome=\"new\"}"), 1.0);
}
