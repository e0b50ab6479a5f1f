//! The `tern-chaos` binary: against a cluster it did not start
//! (`--endpoints`), and a long run in its own cluster (ignored by default).

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use cluster_tests::cluster::Options;
use cluster_tests::process::run_bounded;

use crate::common::*;

/// Kills whatever still listens on the nodes' gRPC ports (processes
/// tern-chaos restarted are not the harness's children).
struct KillListeners(Vec<u16>);

impl Drop for KillListeners {
    fn drop(&mut self) {
        for port in &self.0 {
            if let Some(pid) = cluster_tests::external::pid_listening_on(*port) {
                let _ = Command::new("kill").args(["-CONT", &pid.to_string()]).status();
                let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            }
        }
    }
}

fn chaos() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tern-chaos"));
    cmd.env(
        "PATH",
        format!("{}:/usr/sbin", std::env::var("PATH").unwrap_or_default()),
    );
    cmd
}

/// A harness cluster routes its mail to a port where tern-chaos then runs
/// its sink; tern-chaos drives it through `--endpoints` (kill, pause,
/// restart of the local processes) for a short run. Exit 0 and a JSON
/// report with nothing lost, every field present. `partition` is refused
/// (exit 2) in this mode.
#[test]
fn chaos_against_existing_cluster() {
    let _s = serial();
    let sink: SocketAddr = format!("127.0.0.1:{}", tern_testkit::free_port()).parse().unwrap();
    let c = cluster(
        3,
        Options {
            route_to: Some(sink),
            ..Options::default()
        },
    );
    let grpc: Vec<SocketAddr> = (1..=3).map(|id| c.node(id).unwrap().grpc()).collect();
    let _cleanup = KillListeners(grpc.iter().map(SocketAddr::port).collect());
    let endpoints = grpc.iter().map(SocketAddr::to_string).collect::<Vec<_>>().join(",");
    let dir = tempfile::tempdir().unwrap();
    // The cluster is secured: tern-chaos's ternctl calls present the
    // harness's admin certificate, as an operator's environment would.
    let tls_env = c.pki.as_ref().map(|p| p.ternctl_env()).unwrap_or_default();
    let chaos = || {
        let mut cmd = chaos();
        cmd.envs(tls_env.iter().map(|(k, v)| (k, v)));
        cmd
    };

    let refused = run_bounded(
        chaos().args([
            "--endpoints",
            &endpoints,
            "--sink",
            &sink.to_string(),
            "--faults",
            "kill,partition",
        ]),
        Duration::from_secs(30),
    )
    .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("partition"), "{stderr}");

    let report = dir.path().join("report.json");
    let messages = (600 * scale()).to_string();
    let duration = format!("{}s", 24 * scale());
    let out = run_bounded(
        chaos()
            .args([
                "--endpoints",
                &endpoints,
                "--sink",
                &sink.to_string(),
                "--faults",
                "kill,pause,restart",
                "--messages",
                &messages,
                "--duration",
                &duration,
                "--seed",
                "5",
                "--log-dir",
            ])
            .arg(dir.path().join("logs"))
            .arg("--report")
            .arg(&report),
        Duration::from_secs(400 * scale() as u64),
    )
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stderr}\n{stdout}");
    assert_eq!(out.status.code(), Some(0), "tern-chaos failed");
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(r["mode"], "endpoints");
    assert_eq!(r["nodes"], 3);
    assert_eq!(r["shards"], u64::from(c.options.shards));
    assert_eq!(r["lost"].as_array().map(Vec::len), Some(0), "{r}");
    assert_eq!(r["failed_multi_copy"].as_array().map(Vec::len), Some(0), "{r}");
    assert_eq!(r["acked_multi_copy"].as_array().map(Vec::len), Some(0), "{r}");
    let acked = r["acked"].as_u64().unwrap();
    assert!(acked > 0, "{r}");
    assert_eq!(r["delivered"].as_u64(), Some(acked), "{r}");
    for key in [
        "sent",
        "duplicates",
        "max_resume_secs",
        "median_resume_secs",
        "converged_at_end",
    ] {
        assert!(r.get(key).is_some(), "no {key} in {r}");
    }
    let faults = r["faults"].as_array().unwrap();
    assert!(!faults.is_empty(), "no fault injected: {r}");
    for f in faults {
        assert!(f["error"].is_null(), "fault failed: {f}");
        assert!(f["undone_secs"].is_number(), "{f}");
    }
    let phases = r["phases"].as_array().unwrap();
    assert_eq!(
        phases.first().map(|p| p["name"].clone()),
        Some("before faults".into()),
        "{r}"
    );
    assert!(
        phases.len() > 2 * faults.len(),
        "a phase during and after each fault: {r}"
    );
    let acked_in_phases: u64 = phases.iter().map(|p| p["acked"].as_u64().unwrap()).sum();
    assert_eq!(acked_in_phases, acked, "every acknowledgement falls in one phase: {r}");
    assert!(phases.iter().all(|p| p["acked_per_sec"].is_number()), "{r}");
    // Duplicates are reported per fault (the phase of the second copy) and
    // stay within 1% of acknowledged messages.
    let duplicates = r["duplicates"].as_u64().unwrap();
    let in_phases: u64 = phases.iter().map(|p| p["duplicates"].as_u64().unwrap()).sum();
    assert_eq!(in_phases, duplicates, "every duplicate falls in one phase: {r}");
    assert!(
        duplicates * 100 <= acked,
        "{duplicates} duplicates for {acked} acknowledged (budget 1%): {r}"
    );
}

/// The heavier variant: tern-chaos's own 3-node cluster, 20000 messages and
/// every fault kind for 5 minutes (`cargo test ... -- --ignored chaos_long`).
#[test]
#[ignore = "long: about 6 minutes"]
fn chaos_long() {
    let _s = serial();
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.json");
    let out = run_bounded(
        chaos()
            .args([
                "--nodes",
                "3",
                "--messages",
                "20000",
                "--duration",
                "300s",
                "--faults",
                "kill,pause,partition,restart",
                "--seed",
                "7",
                "--report",
            ])
            .arg(&report),
        Duration::from_secs(900),
    )
    .unwrap();
    eprintln!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(out.status.code(), Some(0), "tern-chaos reported loss or failed");
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(r["lost"].as_array().map(Vec::len), Some(0), "{r}");
}
