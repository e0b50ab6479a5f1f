//! Membership changes under load: add a 4th node, remove another.

use std::time::{Duration, Instant};

use cluster_tests::cluster::Options;

use crate::common::*;

/// Under load, node 4 joins (replicas rebalance onto it), then node 2 is
/// removed (`ternctl member remove`; its replicas move away); the cluster
/// converges each time and nothing acknowledged is lost.
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
    // Placement does not move replicas onto a new node while every shard
    // already has 3 (see `added_node_accepts_mail`); give it a few seconds.
    let placed = cluster_tests::wait_until(Duration::from_secs(5), "node 4 a voter of some shard", || {
        c.shards().is_ok_and(|l| l.iter().any(|s| s.voters.contains(&4)))
    });
    let conv = c.wait_converged(Duration::from_secs(90)).unwrap();
    let four = c
        .shards()
        .unwrap()
        .into_iter()
        .filter(|s| s.voters.contains(&4))
        .count();
    eprintln!(
        "membership: node 4 added in {added:.1?}, voter of a shard: {placed:?}, converged {conv:.1?} later; \
         node 4 holds {four} of {} shards",
        c.options.shards
    );
    let t = Instant::now();
    c.remove_node(2).unwrap();
    let removed = t.elapsed();
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

/// A node that joins a cluster whose shards all have their 3 replicas gets
/// no replica (placement does not rebalance onto it) and so cannot forward:
/// it answers every message `451 4.3.0 no queue shard available`.
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
    let ok = cluster_tests::wait_until(Duration::from_secs(30), "node 4 acknowledges a message", || {
        let o = cluster_tests::load::send_one(smtp, "via-4@probe.tern.test", Duration::from_secs(10));
        let acked = matches!(o, cluster_tests::load::Outcome::Acked(_));
        last = Some(o);
        acked
    });
    assert!(ok.is_ok(), "node 4: {last:?}");
}
