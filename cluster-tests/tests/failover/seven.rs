//! Seven nodes on one machine (issue 28): each node runs one runtime
//! thread, 14 shards of 3 replicas, and one paced load spread over all
//! nodes runs from the first step to the last: placement, a drain during
//! which the control-group leader is SIGKILLed, the removal of the drained
//! node and the join of a new one, the SIGKILL of the leader of a shard
//! holding queued mail, and a rolling SIGTERM restart of all seven. At the
//! end nothing acknowledged is lost, duplicates stay within 1% and the
//! rolling restart (planned hand-overs) repeated nothing.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cluster_tests::check::{self, probe_resume};
use cluster_tests::cluster::{Cluster, Options};
use cluster_tests::load::Load;

use crate::common::*;

const NODES: u64 = 7;
/// Two leaderships and six replicas per node once spread.
const SHARDS: u32 = 14;
/// The control group's voters (the other members are its learners).
const CONTROL_VOTERS: usize = 5;
/// Messages queued on one shard before its leader is killed.
const BUSY: usize = 10;

#[test]
fn seven_nodes_under_load() {
    let _s = serial();
    let start = Instant::now();
    let mut c = cluster(
        NODES,
        Options {
            shards: SHARDS,
            max_nodes: NODES + 1,
            node_toml: "worker_threads = 1".into(),
            ..Options::default()
        },
    );
    placement_is_spread("seven: formed", &c);
    let load = start_load(&c, continuous("seven", NODES as usize, 15.0, Duration::from_secs(400)));
    wait_acked(&load, 30);
    let mut steps: Vec<(String, Instant, Instant)> = Vec::new();
    let at = Instant::now();
    let drained = drain_while_the_control_leader_dies(&mut c);
    steps.push(("drain + control leader killed".into(), at, Instant::now()));
    let at = Instant::now();
    replace_node(&mut c, drained, NODES + 1);
    steps.push(("drained node replaced".into(), at, Instant::now()));
    let at = Instant::now();
    busy_shard_leader_dies(&mut c, &load);
    steps.push(("busy shard leader killed".into(), at, Instant::now()));
    let at = Instant::now();
    let handed_over = rolling_sigterm_restart("seven-rolling", &mut c);
    steps.push(("rolling SIGTERM restart".into(), at, Instant::now()));
    load.stop();
    let report = load.finish();
    let v = assert_no_loss("seven_nodes_under_load", &c, &report);
    let mut phases = check::phases(&report.records, start, &steps);
    let outside = check::count_duplicates(&mut phases, &report, &c.sink, start);
    for p in &phases {
        eprintln!(
            "seven: {:<30} {:>6.1}-{:>6.1} s acked {:>5} ({:.1}/s) duplicates {}",
            p.name, p.from_secs, p.to_secs, p.acked, p.acked_per_sec, p.duplicates
        );
    }
    eprintln!("seven: duplicates outside the steps {outside}");
    let rolling = phases.iter().find(|p| p.name.starts_with("rolling")).unwrap();
    assert_eq!(
        rolling.duplicates, 0,
        "the rolling SIGTERM restart ({handed_over} hand-overs) delivered messages twice"
    );
    assert_converged("seven_nodes_under_load", &c, Duration::from_secs(90));
    eprintln!(
        "seven: {} acknowledged in all, whole test {:.1?}",
        v.acked,
        start.elapsed()
    );
}

/// The members joined: five control-group voters and the rest learners,
/// every shard on 3 voters, replicas per node within one of each other (the
/// controller rebalances after a join), leaderships spread.
fn placement_is_spread(label: &str, c: &Cluster) {
    let mut last = BTreeMap::new();
    let spread = tern_testkit::wait_until(Duration::from_secs(180), "replicas spread over the nodes", || {
        let Ok(per_node) = c.replicas_per_node() else {
            return false;
        };
        let (min, max) = (per_node.values().min(), per_node.values().max());
        last = per_node.clone();
        per_node.len() == NODES as usize && min.zip(max).is_some_and(|(a, b)| b - a <= 1)
    })
    .unwrap_or_else(|e| panic!("{label}: {e}: replicas per node {last:?}"));
    assert_converged(label, c, Duration::from_secs(60));
    let per_node = c.replicas_per_node().unwrap();
    assert_eq!(
        per_node.values().sum::<usize>(),
        3 * SHARDS as usize,
        "{label}: {per_node:?}"
    );
    let roles = c.control_roles().unwrap();
    let voters = roles.values().filter(|r| *r == "voter").count();
    assert_eq!(roles.len(), NODES as usize, "{label}: members {roles:?}");
    assert_eq!(voters, CONTROL_VOTERS, "{label}: control-group roles {roles:?}");
    wait_balanced(c);
    eprintln!("{label}: replicas spread after {spread:.1?}: {per_node:?}; control group {roles:?}");
}

/// The drained node is removed (`ternctl member remove`: its replicas move
/// to the others) and a new node, `new`, joins in its place (a removed id
/// never comes back); mail flows after each change.
fn replace_node(c: &mut Cluster, old: u64, new: u64) {
    let at = Instant::now();
    c.remove_node(old).unwrap();
    let removed = at.elapsed();
    let resume = probe_resume(&*c, at, "seven-remove", Duration::from_secs(30)).unwrap();
    assert_converged("seven: after the removal", c, Duration::from_secs(90));
    for s in c.shards().unwrap() {
        assert!(
            !s.replicas.contains(&old) && !s.voters.contains(&old),
            "shard {} still on node {old}: {s:?}",
            s.shard
        );
    }
    eprintln!("seven: node {old} removed in {removed:.1?}, its replicas moved; resume {resume:?}");
    let at = Instant::now();
    c.add_node(new).unwrap();
    let resume = probe_resume(&*c, at, "seven-add", Duration::from_secs(30)).unwrap();
    eprintln!("seven: node {new} added in {:.1?}; resume {resume:?}", at.elapsed());
    placement_is_spread(&format!("seven: with node {new}"), c);
}

/// A node is drained and the control-group leader (which runs the
/// controller that moves the drained node's leaderships) is SIGKILLed right
/// after: a new control leader finishes the drain, the killed leader's
/// shards get new leaders, mail keeps flowing; the killed node restarts.
/// Returns the drained node (it stays drained).
fn drain_while_the_control_leader_dies(c: &mut Cluster) -> u64 {
    let control = c.control_leader().unwrap();
    let drained = busiest_leader_but(c, control);
    let led = c.shards_led_by(drained).unwrap();
    assert!(!led.is_empty(), "node {drained} leads nothing to drain");
    let via = c
        .healthy_ids()
        .into_iter()
        .find(|id| ![control, drained].contains(id))
        .unwrap();
    let d = drained.to_string();
    ternctl_ok(c, via, &["node", "drain", &d]);
    let at = Instant::now();
    c.kill(control).unwrap();
    let elected = tern_testkit::wait_until(Duration::from_secs(30), "a new control leader", || {
        c.control_leader().is_ok_and(|l| l != control && l != 0)
    })
    .unwrap();
    let new_control = c.control_leader().unwrap();
    let drained_in = tern_testkit::wait_until(
        Duration::from_secs(90),
        &format!("node {drained} (drained) and {control} (dead) lead nothing"),
        || {
            c.leaders()
                .is_ok_and(|l| l.values().all(|x| ![0, control, drained].contains(x)))
        },
    )
    .unwrap();
    let resume = probe_resume(&*c, at, "seven-control", Duration::from_secs(30)).unwrap();
    let hand_overs = c
        .node(new_control)
        .unwrap()
        .logs()
        .matches("draining shard leader")
        .count();
    eprintln!(
        "seven: drained node {drained} (led {led:?}), killed control leader {control}: node {new_control} \
         leads the control group after {elected:.1?} and logged {hand_overs} drain hand-overs; drain done \
         {drained_in:.1?} after the kill; resume {resume:?}"
    );
    c.restart(control).unwrap();
    assert_converged("seven: after the drain", c, Duration::from_secs(90));
    drained
}

/// The node leading the most shards, other than `not`.
fn busiest_leader_but(c: &Cluster, not: u64) -> u64 {
    let mut counts = BTreeMap::<u64, usize>::new();
    for l in c.leaders().unwrap().into_values().filter(|l| ![0, not].contains(l)) {
        *counts.entry(l).or_default() += 1;
    }
    counts
        .into_iter()
        .max_by_key(|(id, n)| (*n, *id))
        .map(|(id, _)| id)
        .unwrap()
}

/// With the sink down, mail queues on every shard; once one shard holds
/// [`BUSY`] messages, its leader (not the control leader) is SIGKILLed.
/// The load keeps being acknowledged; after the sink returns, each message
/// that was queued on that shard is delivered by another of its replicas
/// (the new leader).
fn busy_shard_leader_dies(c: &mut Cluster, load: &Load) {
    c.sink.stop();
    let mut busy = None;
    tern_testkit::wait_until(Duration::from_secs(60), "a shard with queued mail", || {
        let (Ok(queued), Ok(control)) = (c.queued_by_shard(), c.control_leader()) else {
            return false;
        };
        let Ok(shards) = c.shards() else { return false };
        busy = shards
            .into_iter()
            .filter(|s| ![0, control].contains(&s.leader))
            .filter_map(|s| Some((queued.get(&s.shard)?.clone(), s)))
            .filter(|(ids, _)| ids.len() >= BUSY)
            .max_by_key(|(ids, _)| ids.len());
        busy.is_some()
    })
    .unwrap();
    let (ids, shard) = busy.unwrap();
    let victim = shard.leader;
    let acked = load.acked();
    c.kill(victim).unwrap();
    let elected = wait_new_leaders(c, &[shard.shard], victim, Duration::from_secs(30));
    let new_leader = c.leader_of(shard.shard).unwrap();
    wait_acked(load, acked + 30);
    c.sink.resume().unwrap();
    let mut by_node = BTreeMap::<u64, usize>::new();
    let delivered = tern_testkit::wait_until(Duration::from_secs(60), "the busy shard's mail delivered", || {
        let deliveries = c.sink.deliveries();
        by_node.clear();
        ids.iter().all(|id| {
            let by: Vec<u64> = deliveries
                .iter()
                .filter(|d| &d.queue_id == id)
                .filter_map(|d| d.node())
                .collect();
            let other = by.iter().find(|n| **n != victim && shard.voters.contains(n));
            if let Some(n) = other {
                *by_node.entry(*n).or_default() += 1;
            }
            other.is_some()
        })
    })
    .unwrap();
    eprintln!(
        "seven: shard {} ({} queued, replicas {:?}) lost its leader {victim}; node {new_leader} leads it after \
         {elected:.1?}; with the sink back, all delivered {delivered:.1?} later, by {by_node:?}",
        shard.shard,
        ids.len(),
        shard.voters
    );
    c.restart(victim).unwrap();
    assert_converged("seven: after the shard leader's restart", c, Duration::from_secs(90));
}
