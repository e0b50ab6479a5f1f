//! Power cuts: each node's data dir on its own `tern-powerfs` mount, which
//! drops whatever the node never fsynced (and undoes directory entries never
//! made durable) when the power goes (docs/failover-testing.md, "Power cuts").
//! SIGKILL alone keeps the page cache; these tests do not.

use std::time::{Duration, Instant};

use cluster_tests::cluster::Options;
use cluster_tests::load::{Load, LoadConfig};

use crate::common::*;

/// Skips (with a message) when FUSE is missing and `TERN_REQUIRE_PEERS` is
/// unset; panics when it is missing and required, or `tern-powerfs` is not built.
fn powerfs_ready() -> bool {
    if !tern_powerfs::mount::fuse_available() {
        assert!(
            std::env::var_os("TERN_REQUIRE_PEERS").is_none(),
            "/dev/fuse is missing and TERN_REQUIRE_PEERS is set"
        );
        eprintln!("SKIPPED: /dev/fuse is missing (set TERN_REQUIRE_PEERS=1 to make this an error)");
        return false;
    }
    if let Err(e) = cluster_tests::powerfs_path() {
        panic!("{e:#}");
    }
    true
}

fn power_options() -> Options {
    Options {
        power_fs: true,
        ..Options::default()
    }
}

/// Duplicates (messages delivered more than once) must stay under 1% of the
/// acknowledged messages.
fn assert_few_duplicates(name: &str, v: &cluster_tests::check::Verdict) {
    assert!(
        v.duplicates * 100 < v.acked.max(1),
        "{name}: {} duplicates for {} acknowledged (1% allowed)",
        v.duplicates,
        v.acked
    );
}

/// (a) The leader of the most shards loses power under load (its
/// oldest unsynced write torn): it restarts with no manual step, every
/// acknowledged message is delivered, duplicates under 1%.
#[test]
fn power_cut_one_node_under_load() {
    if !powerfs_ready() {
        return;
    }
    let _s = serial();
    let mut c = cluster(3, power_options());
    let load = start_load(&c, paced("power-one", 400, 10.0));
    wait_acked(&load, 80);
    let victim = busiest_leader(&c);
    let counters = c
        .power_cut(victim, true)
        .unwrap_or_else(|e| panic!("power cut of node {victim}: {e:#}"));
    eprintln!("power_cut_one_node_under_load: node {victim}: {counters}");
    let report = load.finish();
    let v = assert_no_loss("power_cut_one_node_under_load", &c, &report);
    assert_few_duplicates("power_cut_one_node_under_load", &v);
    assert_converged("power_cut_one_node_under_load", &c, Duration::from_secs(90));
}

/// (b) Every node loses power at the same instant under load: all killed,
/// all file systems cut (torn), all restarted together with no manual step;
/// every acknowledged message is delivered.
#[test]
fn power_cut_whole_cluster_under_load() {
    if !powerfs_ready() {
        return;
    }
    let _s = serial();
    let mut c = cluster(3, power_options());
    let load = start_load(&c, paced("power-all", 400, 12.0));
    wait_acked(&load, 80);
    let counters = c
        .power_cut_all(true)
        .unwrap_or_else(|e| panic!("whole-cluster power cut: {e:#}"));
    for (i, k) in counters.iter().enumerate() {
        eprintln!("power_cut_whole_cluster_under_load: node {}: {k}", i + 1);
    }
    let report = load.finish();
    let v = assert_no_loss("power_cut_whole_cluster_under_load", &c, &report);
    assert_few_duplicates("power_cut_whole_cluster_under_load", &v);
    assert_converged("power_cut_whole_cluster_under_load", &c, Duration::from_secs(90));
}

/// Power cuts of a single node with a tiny log (1 MiB segments, 1 MiB
/// kept: purges and segment recycling all the time) under load from two
/// sessions, `rounds` times: it must start every time, and nothing it
/// acknowledged is lost. Returns (power cuts, verdict).
fn single_node_loop(name: &str, rounds: usize) -> (usize, cluster_tests::check::Verdict) {
    let mut c = cluster(
        1,
        Options {
            shards: 1,
            node_toml: "log_segment_mb = 1\nlog_keep_mb = 1".into(),
            ..power_options()
        },
    );
    let load = Load::start(
        LoadConfig {
            messages: usize::MAX / 2,
            sessions: 2,
            rate: None,
            deadline: Duration::from_secs(3600),
            size: 4096,
            prefix: name.into(),
            per_connection: 100,
            ..LoadConfig::default()
        },
        c.targets(),
    );
    let start = Instant::now();
    let mut cuts = 0;
    for round in 1..=rounds {
        // Mail flows between cuts: wait for some new acknowledgements.
        let before = load.acked();
        cluster_tests::wait_until(
            Duration::from_secs(60),
            &format!("round {round}: new acknowledgements"),
            || load.acked() >= before + 20,
        )
        .unwrap_or_else(|e| panic!("{name}: {e:#}\n{}", c.logs()));
        let tear = round % 2 == 0;
        match c.power_cut(1, tear) {
            Ok(k) => eprintln!("{name}: round {round} (tear {tear}) after {:.0?}: {k}", start.elapsed()),
            Err(e) => panic!("{name}: round {round}: node did not come back after a power cut: {e:#}"),
        }
        cuts += 1;
    }
    load.stop();
    let report = load.finish();
    let v = assert_no_loss(name, &c, &report);
    (cuts, v)
}

/// (c) The CI variant of the single-node loop: 15 power cuts
/// (`TERN_POWER_CUTS` to change).
#[test]
fn power_cut_single_node_loop() {
    if !powerfs_ready() {
        return;
    }
    let _s = serial();
    let rounds = rounds_from_env(15);
    let (cuts, v) = single_node_loop("power-loop", rounds);
    eprintln!("power_cut_single_node_loop: power cuts {cuts}, {v}");
    assert_few_duplicates("power_cut_single_node_loop", &v);
}

/// (d) The long variant: at least 500 power cuts (`TERN_POWER_CUTS`, default
/// 500). Figures in docs/failover-testing.md.
#[test]
#[ignore = "long: 500 power cuts; run by hand (docs/failover-testing.md)"]
fn power_cut_single_node_long() {
    if !powerfs_ready() {
        return;
    }
    let _s = serial();
    let rounds = rounds_from_env(500);
    let (cuts, v) = single_node_loop("power-long", rounds);
    eprintln!(
        "power_cut_single_node_long: power cuts {cuts}, acknowledged {}, lost {}, duplicates {}",
        v.acked,
        v.lost.len(),
        v.duplicates
    );
    assert_few_duplicates("power_cut_single_node_long", &v);
}

fn rounds_from_env(default: usize) -> usize {
    std::env::var("TERN_POWER_CUTS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|n| *n >= 1)
        .unwrap_or(default)
}
