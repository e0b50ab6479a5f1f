//! The control plane simulated at 20 nodes x 512 shards (debug builds run
//! these in seconds); the 100 x 4,096 figures are an ignored test, run with
//! `cargo test --release -p tern-node --lib sim::tests::figures -- --ignored --nocapture`.

#![allow(clippy::unwrap_used)]

use super::*;

/// A formed cluster at rest: spread out, leaderships balanced.
fn formed(nodes: u64, shards: u64, seed: u64) -> Sim {
    let mut sim = Sim::spread(Config::new(nodes, shards, seed));
    sim.run_until(5_000, Sim::settled).expect("a spread cluster settles");
    sim.reset_stats();
    sim
}

/// Every shard on R distinct members, voters = placement, led by a voter.
fn assert_placed(sim: &Sim) {
    for (shard, replicas) in &sim.placement {
        let set: BTreeSet<NodeId> = replicas.iter().copied().collect();
        assert_eq!(set.len(), sim.cfg.replicas, "shard {shard}: {replicas:?}");
        assert!(set.is_subset(&sim.members), "shard {shard}: {replicas:?}");
        let (voters, leader, busy) = sim.shard_view(*shard).unwrap();
        assert_eq!(voters, set, "shard {shard}");
        assert!(leader.is_some_and(|l| voters.contains(&l)), "shard {shard}: {leader:?}");
        assert!(!busy, "shard {shard}");
    }
}

/// Replicas per member within one of each other (the rebalancer's bound);
/// leaderships at most `slack` above an even share on the nodes that may
/// lead. The leader balancer moves a leadership only to another replica of
/// the same shard, and it stops when no such move helps: after a drain or
/// a removal it can settle a leadership or two above the share.
fn assert_balanced(sim: &Sim, may_lead: &[NodeId], slack: usize) {
    let replicas = sim.replica_counts();
    let (min, max) = (replicas.values().min().unwrap(), replicas.values().max().unwrap());
    assert!(max - min <= 1, "{replicas:?}");
    let leaders = sim.leader_counts(may_lead);
    let share = (sim.cfg.shards as usize).div_ceil(may_lead.len());
    assert!(
        leaders.values().all(|c| *c <= share + slack),
        "share {share}: {leaders:?}"
    );
    assert_eq!(leaders.values().sum::<usize>(), sim.cfg.shards as usize, "{leaders:?}");
}

fn assert_majorities_kept(sim: &Sim) {
    assert!(
        sim.stats.violations.is_empty(),
        "{:?}",
        &sim.stats.violations[..5.min(sim.stats.violations.len())]
    );
    assert!(sim.stats.min_margin >= 0, "{:?}", sim.stats);
}

#[test]
fn formation_converges_to_the_target_placement() {
    let mut sim = Sim::bootstrap(Config::new(20, 512, 1));
    let took = sim.run_until(20_000, Sim::settled).expect("formation converges");
    assert_placed(&sim);
    let all: Vec<NodeId> = sim.members.iter().copied().collect();
    assert_balanced(&sim, &all, 0);
    assert_majorities_kept(&sim);
    // Node 1 started with all 512; it keeps its share, every other replica
    // it held moved once, and each of the others was grown or moved once.
    let kept = sim.replica_counts()[&1] as u64;
    assert_eq!(
        sim.stats.replica_moves,
        512 * 3 - kept,
        "took {took} s: {:?}",
        sim.stats
    );
}

#[test]
fn a_lost_node_has_exactly_its_replicas_replaced() {
    let mut sim = formed(20, 512, 2);
    let victim = 20;
    let held = sim.shards_on(victim) as u64;
    sim.kill(victim);
    let healed = |s: &Sim| s.settled() && s.placement.values().all(|r| !r.contains(&victim));
    let took = sim.run_until(2_000, healed).expect("the cluster heals");
    // Nothing moves before `dead_node_after_secs`; then its shards at once.
    assert!((300..330).contains(&took), "healed after {took} s");
    assert_eq!(sim.stats.replica_moves, held, "{:?}", sim.stats);
    assert_eq!(sim.stats.placement_writes, held, "{:?}", sim.stats);
    assert_eq!(sim.shards_on(victim), 0);
    // The lost node's shards ran on two of three until replaced.
    assert_majorities_kept(&sim);
    assert_eq!(sim.stats.min_margin, 0);
    for (shard, replicas) in &sim.placement {
        assert_eq!(replicas.iter().collect::<BTreeSet<_>>().len(), 3, "shard {shard}");
    }
    let live: Vec<NodeId> = sim.members.iter().copied().filter(|n| *n != victim).collect();
    let leaders = sim.leader_counts(&live);
    assert_eq!(leaders.values().sum::<usize>(), 512);
}

#[test]
fn a_drained_node_hands_over_every_leadership() {
    let mut sim = formed(20, 512, 3);
    let drained = 5;
    let led = sim.leader_counts(&[drained])[&drained];
    assert!(led > 0);
    sim.drain(drained);
    let took = sim
        .run_until(2_000, |s| s.leader_counts(&[drained])[&drained] == 0 && s.settled())
        .expect("the drain completes");
    assert!(took >= led as u64, "one hand-over per tick: {took} s for {led}");
    assert_eq!(sim.stats.replica_moves, 0, "a drain moves no replica");
    let others: Vec<NodeId> = sim.members.iter().copied().filter(|n| *n != drained).collect();
    assert_balanced(&sim, &others, 2);
    assert_majorities_kept(&sim);
}

#[test]
fn a_joining_node_takes_its_share_and_nothing_else_moves() {
    let mut sim = formed(20, 512, 4);
    let new = sim.join();
    let took = sim.run_until(10_000, Sim::settled).expect("rebalancing converges");
    let got = sim.replica_counts()[&new] as u64;
    assert!(got >= 512 * 3 / 21, "{got}");
    assert_eq!(sim.stats.replica_moves, got, "took {took} s: {:?}", sim.stats);
    assert_placed(&sim);
    let all: Vec<NodeId> = sim.members.iter().copied().collect();
    assert_balanced(&sim, &all, 0);
    assert_majorities_kept(&sim);
}

#[test]
fn a_removed_node_has_its_replicas_moved_before_it_goes() {
    let mut sim = formed(20, 512, 5);
    let gone = 7;
    let held = sim.shards_on(gone) as u64;
    sim.remove(gone);
    let done = |s: &Sim| s.settled() && s.shards_on(gone) == 0;
    sim.run_until(5_000, done).expect("the removal completes");
    assert_eq!(sim.stats.replica_moves, held, "{:?}", sim.stats);
    assert_placed(&sim);
    let all: Vec<NodeId> = sim.members.iter().copied().collect();
    assert_balanced(&sim, &all, 1);
    // The node stayed up until it held nothing: no shard ran short.
    assert_majorities_kept(&sim);
    assert!(sim.stats.min_margin >= 1, "{:?}", sim.stats);
}

#[test]
fn the_same_seed_gives_the_same_trace() {
    let run = |seed| {
        let mut sim = Sim::bootstrap(Config::new(8, 64, seed));
        sim.run_until(5_000, Sim::settled).unwrap();
        sim.kill(8);
        sim.run_until(2_000, |s| s.settled() && s.shards_on(8) == 0).unwrap();
        sim.trace
    };
    let first = run(11);
    assert!(first.len() > 100, "{}", first.len());
    assert_eq!(first, run(11));
    assert_ne!(first, run(12), "the seed drives elections and catch-up times");
}

#[test]
fn the_invariant_catches_a_lost_majority() {
    let mut sim = Sim::spread(Config::new(5, 8, 1));
    let (voters, _, _) = sim.shard_view(1).unwrap();
    let mut two = voters.iter().copied();
    sim.kill(two.next().unwrap());
    sim.tick();
    assert_eq!(sim.stats.min_margin, 0);
    assert!(sim.stats.violations.is_empty());
    sim.kill(two.next().unwrap());
    sim.tick();
    assert_eq!(sim.stats.min_margin, -1);
    assert!(
        sim.stats.violations.iter().any(|v| v.contains("shard 1:")),
        "{:?}",
        sim.stats.violations
    );
}

#[test]
fn concurrent_moves_keep_majorities_and_converge() {
    let mut cfg = Config::new(20, 512, 6);
    cfg.concurrency = 8;
    let mut sim = Sim::bootstrap(cfg);
    sim.run_until(20_000, Sim::settled).expect("formation converges");
    assert_placed(&sim);
    let all: Vec<NodeId> = sim.members.iter().copied().collect();
    assert_balanced(&sim, &all, 0);
    assert_majorities_kept(&sim);
}

/// What one scenario took.
struct Figures {
    formation: u64,
    formation_moves: u64,
    loss: u64,
    loss_moves: u64,
    lost_replicas: usize,
    join: u64,
    join_moves: u64,
    drain: u64,
    drained_leaders: usize,
    /// Most leaderships on one node at the end, and the even share.
    max_leaders: usize,
    share: usize,
    min_margin: i64,
    violations: usize,
}

fn figures(nodes: u64, shards: u64, concurrency: usize, seed: u64) -> Figures {
    let mut cfg = Config::new(nodes, shards, seed);
    cfg.concurrency = concurrency;
    let mut sim = Sim::bootstrap(cfg);
    let limit = 1_000_000;
    let formation = sim.run_until(limit, Sim::settled).expect("formation");
    let formation_moves = sim.stats.replica_moves;
    let (mut min_margin, mut violations) = (sim.stats.min_margin, sim.stats.violations.len());
    let mut done = |sim: &mut Sim| {
        min_margin = min_margin.min(sim.stats.min_margin);
        violations += sim.stats.violations.len();
        let moves = sim.stats.replica_moves;
        sim.reset_stats();
        moves
    };
    done(&mut sim);
    let victim = nodes;
    let lost_replicas = sim.shards_on(victim);
    sim.kill(victim);
    let loss = sim
        .run_until(limit, |s| {
            s.settled() && s.placement.values().all(|r| !r.contains(&victim))
        })
        .expect("heal");
    let loss_moves = done(&mut sim);
    // A fresh node joins the healed cluster (the dead one stays a member, so
    // it is removed first, as an operator would).
    sim.remove(victim);
    sim.run_until(limit, Sim::settled).expect("removal");
    done(&mut sim);
    sim.join();
    let join = sim.run_until(limit, Sim::settled).expect("join");
    let join_moves = done(&mut sim);
    let drained = nodes / 2;
    let drained_leaders = sim.leader_counts(&[drained])[&drained];
    sim.drain(drained);
    let drain = sim
        .run_until(limit, |s| s.leader_counts(&[drained])[&drained] == 0)
        .expect("drain");
    done(&mut sim);
    let may_lead: Vec<NodeId> = sim.members.iter().copied().filter(|n| *n != drained).collect();
    sim.run_until(limit, Sim::settled).expect("settles after the drain");
    let max_leaders = sim.leader_counts(&may_lead).values().copied().max().unwrap_or(0);
    let share = (shards as usize).div_ceil(may_lead.len());
    Figures {
        max_leaders,
        share,
        formation,
        formation_moves,
        loss,
        loss_moves,
        lost_replicas,
        join,
        join_moves,
        drain,
        drained_leaders,
        min_margin,
        violations,
    }
}

fn hms(secs: u64) -> String {
    format!("{}h{:02}m{:02}s", secs / 3600, secs / 60 % 60, secs % 60)
}

#[test]
#[ignore = "100 nodes x 4,096 shards: minutes in a release build"]
fn figures_at_100_nodes() {
    let (nodes, shards) = (100, 4096);
    println!(
        "| concurrency | formation | moves | node loss: heal | moves (its replicas) | join | moves \
         | drain (leaders) | most leaders (share) | min margin | violations | wall |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    // TERN_SIM_CONCURRENCY=8 (say) runs that row alone.
    let rows: Vec<usize> = std::env::var("TERN_SIM_CONCURRENCY")
        .ok()
        .map(|v| v.split(',').filter_map(|c| c.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 8, 32]);
    for concurrency in rows {
        let wall = std::time::Instant::now();
        let f = figures(nodes, shards, concurrency, 42);
        println!(
            "| {concurrency} | {} | {} | {} | {} ({}) | {} | {} | {} ({}) | {} ({}) | {} | {} | {:.1} s |",
            hms(f.formation),
            f.formation_moves,
            hms(f.loss),
            f.loss_moves,
            f.lost_replicas,
            hms(f.join),
            f.join_moves,
            hms(f.drain),
            f.drained_leaders,
            f.max_leaders,
            f.share,
            f.min_margin,
            f.violations,
            wall.elapsed().as_secs_f64()
        );
        assert_eq!(f.violations, 0);
        assert_eq!(f.loss_moves, f.lost_replicas as u64);
    }
}
