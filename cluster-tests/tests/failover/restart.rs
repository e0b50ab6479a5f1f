//! Rolling restart and whole-cluster restart.

use std::time::{Duration, Instant};

use cluster_tests::check::probe_resume;
use cluster_tests::cluster::Options;
use cluster_tests::load;

use crate::common::*;

/// Every node in turn is SIGKILLed and restarted (same config and data)
/// under load; after each restart a probe message is acknowledged and
/// delivered within 30 s of the kill, and the cluster converges before the
/// next node; nothing acknowledged is lost.
#[test]
fn rolling_restart_under_load() {
    let _s = serial();
    let mut c = cluster(3, Options::default());
    let load = start_load(&c, paced("rolling", 900, 30.0));
    wait_acked(&load, 30);
    for id in 1..=3 {
        let t = Instant::now();
        c.kill(id).unwrap();
        std::thread::sleep(Duration::from_millis(500));
        c.restart(id).unwrap();
        let resume = probe_resume(&c, t, &format!("rolling-{id}"), Duration::from_secs(30)).unwrap();
        let conv = c.wait_converged(Duration::from_secs(60)).unwrap();
        eprintln!(
            "rolling: node {id} killed and restarted, resume {resume:?}, converged {:.1?} after the kill \
             ({conv:.1?} after the probe)",
            t.elapsed()
        );
    }
    let report = load.finish();
    assert_no_loss("rolling_restart_under_load", &c, &report);
    assert_converged("rolling_restart_under_load", &c, Duration::from_secs(60));
}

/// Mail is acknowledged while the sink is down (so it stays queued), every
/// node is SIGKILLed, the sink comes back and every node restarts: new
/// mail is acknowledged and delivered within 30 s of the restart and every
/// acknowledged message is delivered.
#[test]
fn whole_cluster_restart() {
    let _s = serial();
    let mut c = cluster(3, Options::default());
    c.sink.stop();
    let n = 90 * scale();
    let report = load::run(
        load::LoadConfig {
            messages: n,
            sessions: 3,
            prefix: "whole".into(),
            ..load::LoadConfig::default()
        },
        c.targets(),
    );
    assert_eq!(report.acked().len(), n, "every message acknowledged before the crash");
    for id in 1..=3 {
        c.kill(id).unwrap();
    }
    c.sink.resume().unwrap();
    let t = Instant::now();
    c.restart_all_down().unwrap();
    eprintln!("whole_cluster_restart: all ready {:.1?} after the restart", t.elapsed());
    let resume = probe_resume(&c, t, "after-whole-restart", Duration::from_secs(30)).unwrap();
    eprintln!("whole_cluster_restart: resume {resume:?} (from the restart)");
    let v = assert_no_loss("whole_cluster_restart", &c, &report);
    eprintln!(
        "whole_cluster_restart: all delivered {:.1?} after the restart",
        t.elapsed()
    );
    assert_eq!(v.acked, n);
    assert_converged("whole_cluster_restart", &c, Duration::from_secs(60));
}
