//! The node as a process: start, listeners, readiness, ternctl, shutdown.

use std::time::Duration;

use crate::harness::*;

#[test]
fn prints_listeners_then_ready_and_ternctl_sees_one_node_cluster() {
    let node = Node::start("");
    let lines = node.stdout_lines();
    let pos = |prefix: &str| lines.iter().position(|l| l.starts_with(prefix)).unwrap_or(usize::MAX);
    assert!(pos("listening smtp=") < pos("ready"), "{lines:?}");
    assert!(pos("listening grpc=") < pos("ready"), "{lines:?}");
    assert!(pos("listening http=") < pos("ready"), "{lines:?}");

    let status = node.ternctl_json(&["status"]);
    assert_eq!(status["node_id"], 1);
    assert_eq!(status["members"].as_array().unwrap().len(), 1);
    let shards = status["shards"].as_array().unwrap();
    assert_eq!(shards.len(), 16);
    assert!(shards
        .iter()
        .all(|s| s["leader"] == 1 && s["replicas"] == serde_json::json!([1])));

    let table = node.ternctl(&["status"]);
    assert!(table.status.success());
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("SHARD") && text.contains("LEADER"), "{text}");

    let summary = node.ternctl_json(&["queue", "summary"]);
    assert_eq!(summary["messages"], 0);
    assert!(summary["domains"].as_object().unwrap().is_empty());
}

#[test]
fn ternctl_exit_codes_mean_something() {
    let node = Node::start("");
    let missing = node.ternctl(&["queue", "show", "NOSUCHID"]);
    assert_eq!(missing.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("NOSUCHID"));
    let unreachable = std::process::Command::new(TERNCTL)
        .args(["--endpoint", &format!("127.0.0.1:{}", free_port()), "status"])
        .output()
        .unwrap();
    assert_eq!(unreachable.status.code(), Some(1));
    let usage = node.ternctl(&["frobnicate"]);
    assert_eq!(usage.status.code(), Some(2));
}

#[test]
fn unknown_config_key_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[policy]\nmax_recipents = 500\n").unwrap();
    let out = std::process::Command::new(TERND)
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("max_recipents"), "{err}");
}

#[test]
fn sigterm_exits_zero_and_restart_keeps_the_cluster() {
    let mut node = Node::start("");
    let status = node.signal_and_wait("TERM", Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{}", node.logs());
    node.spawn();
    let status = node.ternctl_json(&["status"]);
    assert_eq!(status["shards"].as_array().unwrap().len(), 16);
    let status = node.signal_and_wait("INT", Duration::from_secs(30));
    assert_eq!(status.code(), Some(0));
}
