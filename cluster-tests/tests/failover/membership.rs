//! Membership changes under load: add a 4th node, remove another.

use std::time::{Duration, Instant};

use cluster_tests::check::probe_resume;
use cluster_tests::cluster::Options;

use crate::common::*;

/// Under load, node 4 joins, then node 2 is removed (`ternctl member
/// remove`; its replicas move away); after each change a probe message is
/// acknowledged and delivered within 30 s, the cluster converges and
/// nothing acknowledged is lost.
#[test]
fn add_and_remove_node_under_load() {
    let _s = serial();
    let mut c = cluster(
        3,
        Options {
            max_nodes: 4,
            ..Options::default()
        },
    );
    let load = start_load(&c, paced("members", 600, 25.0));
    wait_acked(&load, 30);
    let t = Instant::now();
    c.add_node(4).unwrap();
    let added = t.elapsed();
    let resume = probe_resume(&c, t, "after-add", Duration::from_secs(30)).unwrap();
    eprintln!("membership: after adding node 4, resume {resume:?}");
    let conv = c.wait_converged(Duration::from_secs(90)).unwrap();
    let four = c
        .shards()
        .unwrap()
        .into_iter()
        .filter(|s| s.voters.contains(&4))
        .count();
    // Whether replicas move onto the new node is placement's business; the
    // figure is printed, not asserted.
    eprintln!(
        "membership: node 4 added in {added:.1?}, converged {conv:.1?} later; node 4 holds {four} of {} shards",
        c.options.shards
    );
    let t = Instant::now();
    c.remove_node(2).unwrap();
    let removed = t.elapsed();
    let resume = probe_resume(&c, t, "after-remove", Duration::from_secs(30)).unwrap();
    eprintln!("membership: after removing node 2, resume {resume:?}");
    let conv = c.wait_converged(Duration::from_secs(90)).unwrap();
    let four = c
        .shards()
        .unwrap()
        .into_iter()
        .filter(|s| s.voters.contains(&4))
        .count();
    eprintln!(
        "membership: node 2 removed in {removed:.1?}, converged {conv:.1?} later; node 4 now holds {four} shards"
    );
    for s in c.shards().unwrap() {
        assert!(!s.replicas.contains(&2), "shard {} still on node 2: {s:?}", s.shard);
    }
    let report = load.finish();
    assert_no_loss("add_and_remove_node_under_load", &c, &report);
}

/// A node that joins a cluster whose shards all have their 3 replicas
/// accepts mail within 30 s (whether or not it holds replicas yet: it
/// forwards to the shard leaders).
#[test]
fn added_node_accepts_mail() {
    let _s = serial();
    let mut c = cluster(
        3,
        Options {
            max_nodes: 4,
            ..Options::default()
        },
    );
    c.add_node(4).unwrap();
    let smtp = c.node(4).unwrap().smtp.unwrap();
    let mut last = None;
    let ok = tern_testkit::wait_until(Duration::from_secs(30), "node 4 acknowledges a message", || {
        let o = cluster_tests::load::send_one(smtp, "via-4@probe.tern.test", Duration::from_secs(10));
        let acked = matches!(o, cluster_tests::load::Outcome::Acked(_));
        last = Some(o);
        acked
    });
    assert!(ok.is_ok(), "node 4: {last:?}");
}
