//! SIGSTOP of a shard leader past the election timeout, then SIGCONT.

use std::time::{Duration, Instant};

use cluster_tests::check::probe_resume;
use cluster_tests::cluster::Options;
use cluster_tests::load::{Outcome, Record};

use crate::common::*;

/// The leader of the most shards is frozen for 5 s (election timeout 1–2 s)
/// under load, with a slow sink (1 s per DATA) so deliveries are in flight.
/// The others elect new leaders and mail resumes; after SIGCONT the node
/// steps down, and it never delivers a message that was acknowledged by the
/// others while it was frozen (each dump's X-Helo-Args names the delivering
/// node). Nothing acknowledged is lost.
#[test]
fn pause_leader_steps_down() {
    let _s = serial();
    let mut c = cluster(
        3,
        Options {
            sink_args: vec!["-w".into(), "1".into()],
            ..Options::default()
        },
    );
    wait_balanced(&c);
    let load = start_load(&c, paced("pause", 500, 12.0));
    wait_acked(&load, 40);
    let victim = busiest_leader(&c);
    let led = c.shards_led_by(victim).unwrap();
    let paused_at = Instant::now();
    c.pause(victim).unwrap();
    let elected = wait_new_leaders(&c, &led, victim, Duration::from_secs(20));
    let resume = probe_resume(&c, paused_at, "during-pause", Duration::from_secs(30)).unwrap();
    // Keep leadership away from the frozen node once it wakes up, so that any
    // copy it delivers can only be one that was in flight at the freeze.
    let via = c.healthy_ids()[0];
    let out = c
        .node(via)
        .unwrap()
        .ternctl(&["node", "drain", &victim.to_string()], Duration::from_secs(20))
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let frozen_for = Duration::from_secs(5).saturating_sub(paused_at.elapsed());
    std::thread::sleep(frozen_for);
    let resumed_at = Instant::now();
    c.resume(victim).unwrap();
    let stepped_down = tern_testkit::wait_until(Duration::from_secs(20), "resumed node steps down", || {
        c.shards_on(victim)
            .is_ok_and(|l| l.iter().all(|s| s.leader != victim && s.leader != 0))
    })
    .unwrap();
    eprintln!(
        "pause_leader_steps_down: node {victim} led {led:?}; frozen {:.1?}; new leaders after {elected:.1?}; \
         resume {resume:?}; stepped down {stepped_down:.1?} after SIGCONT",
        resumed_at - paused_at
    );
    let report = load.finish();
    let v = assert_no_loss("pause_leader_steps_down", &c, &report);
    // Acknowledged by another node while the victim was frozen: never
    // delivered by the victim.
    let during: Vec<&Record> = report
        .records
        .iter()
        .filter(|r| {
            r.node != victim
                && r.started > paused_at
                && r.finished < resumed_at
                && matches!(r.outcome, Outcome::Acked(_))
        })
        .collect();
    let mut by_victim = Vec::new();
    for r in &during {
        if c.sink
            .deliveries_of(&r.message_id)
            .iter()
            .any(|d| d.node() == Some(victim))
        {
            by_victim.push(r.message_id.clone());
        }
    }
    eprintln!(
        "pause_leader_steps_down: {} acknowledged during the pause, {} duplicates overall",
        during.len(),
        v.duplicates
    );
    assert!(!during.is_empty(), "nothing acknowledged during the pause");
    assert!(
        by_victim.is_empty(),
        "delivered by the frozen node {victim} after it woke: {by_victim:?}"
    );
    let out = c
        .node(via)
        .unwrap()
        .ternctl(&["node", "undrain", &victim.to_string()], Duration::from_secs(20))
        .unwrap();
    assert!(out.status.success());
    assert_converged("pause_leader_steps_down", &c, Duration::from_secs(60));
}
