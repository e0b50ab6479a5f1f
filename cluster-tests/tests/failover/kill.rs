//! SIGKILL of a follower, a shard leader, the control-group leader.

use std::time::{Duration, Instant};

use cluster_tests::check::probe_resume;
use cluster_tests::cluster::Options;

use crate::common::*;

/// A node that leads nothing — no shard (drained first) and not the
/// control group — is SIGKILLed under load: mail keeps flowing, nothing
/// acknowledged is lost; it restarts and catches up.
#[test]
fn kill_follower() {
    let _s = serial();
    let mut c = cluster(3, Options::default());
    let control = c.control_leader().unwrap();
    let victim = (1..=3).rev().find(|id| *id != control).unwrap();
    let via = (1..=3).find(|id| *id != victim).unwrap();
    let v = victim.to_string();
    ternctl_ok(&c, via, &["node", "drain", &v]);
    tern_testkit::wait_until(Duration::from_secs(60), "the victim leads no shard", || {
        c.leaders().is_ok_and(|l| l.values().all(|x| *x != victim && *x != 0))
    })
    .unwrap();
    let load = start_load(&c, paced("kill-follower", 300, 6.0));
    wait_acked(&load, 60);
    // A follower in every group right before the kill.
    let control = c.control_leader().unwrap();
    assert_ne!(control, victim, "node {victim} became the control-group leader");
    let led = c.shards_led_by(victim).unwrap();
    assert!(led.is_empty(), "node {victim} leads shards {led:?} after the drain");
    let at = Instant::now();
    c.kill(victim).unwrap();
    let resume = probe_resume(&c, at, "after-follower-kill", Duration::from_secs(30)).unwrap();
    eprintln!("kill_follower: node {victim} (control leader {control}); resume {resume:?}");
    let report = load.finish();
    assert_no_loss("kill_follower", &c, &report);
    c.restart(victim).unwrap();
    ternctl_ok(&c, via, &["node", "undrain", &v]);
    assert_converged("kill_follower", &c, Duration::from_secs(60));
}

/// The leader of the most shards is SIGKILLed under load: its shards get
/// new leaders, mail resumes, nothing acknowledged is lost.
#[test]
fn kill_shard_leader() {
    let _s = serial();
    let mut c = cluster(3, Options::default());
    wait_balanced(&c);
    // Long enough that the deliveries in flight at the kill (the only ones
    // that may be repeated) stay well within 1% of what is acknowledged.
    let load = start_load(&c, paced("kill-leader", 600, 16.0));
    wait_acked(&load, 60);
    let victim = busiest_leader(&c);
    let led = c.shards_led_by(victim).unwrap();
    let at = Instant::now();
    c.kill(victim).unwrap();
    let elected = wait_new_leaders(&c, &led, victim, Duration::from_secs(20));
    let resume = probe_resume(&c, at, "after-leader-kill", Duration::from_secs(30)).unwrap();
    eprintln!("kill_shard_leader: node {victim} led {led:?}; new leaders after {elected:.1?}; resume {resume:?}");
    let report = load.finish();
    assert_no_loss("kill_shard_leader", &c, &report);
    c.restart(victim).unwrap();
    assert_converged("kill_shard_leader", &c, Duration::from_secs(60));
}

/// The control-group leader is SIGKILLed under load: a new control leader
/// is elected, mail keeps flowing, the killed node restarts and rejoins.
#[test]
fn kill_control_leader() {
    let _s = serial();
    let mut c = cluster(3, Options::default());
    wait_balanced(&c);
    let load = start_load(&c, paced("kill-control", 600, 16.0));
    wait_acked(&load, 60);
    let victim = c.control_leader().unwrap();
    let at = Instant::now();
    c.kill(victim).unwrap();
    let elected = tern_testkit::wait_until(Duration::from_secs(20), "a new control leader", || {
        c.control_leader().is_ok_and(|l| l != victim && l != 0)
    })
    .unwrap();
    let resume = probe_resume(&c, at, "after-control-kill", Duration::from_secs(30)).unwrap();
    eprintln!("kill_control_leader: node {victim}; new control leader after {elected:.1?}; resume {resume:?}");
    let report = load.finish();
    assert_no_loss("kill_control_leader", &c, &report);
    c.restart(victim).unwrap();
    assert_converged("kill_control_leader", &c, Duration::from_secs(60));
}
