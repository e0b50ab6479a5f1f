//! Quiet groups (issue 28): idle shards of a three-node cluster stop their
//! heartbeats while their leaders' nodes vouch for them. Mail to a quiet
//! shard is delivered; a SIGKILLed leader's quiet shards get new leaders
//! and deliver; the node comes back and its shards go quiet again.

use std::time::{Duration, Instant};

use crate::cluster::{join, shards};
use crate::harness::*;
use crate::metrics::{scrape, sum};

const SHARDS: usize = 6;

/// Quiet shards led and replicas following a quiet leader, summed over `nodes`.
fn quiet(nodes: &[Node]) -> (f64, f64) {
    nodes.iter().fold((0.0, 0.0), |(l, f), n| {
        let s = scrape(n);
        (
            l + sum(&s, "tern_raft_quiet_leading_groups", &[]),
            f + sum(&s, "tern_raft_quiet_following_groups", &[]),
        )
    })
}

fn wait_all_quiet(nodes: &[Node], why: &str) {
    let want = (SHARDS as f64, (SHARDS * (nodes.len() - 1)) as f64);
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut seen = quiet(nodes);
    while seen != want {
        if Instant::now() >= deadline {
            if let Ok(dir) = std::env::var("TERN_QUIET_DIAG_DIR") {
                for n in nodes {
                    let _ = std::fs::write(format!("{dir}/node-{}.log", n.grpc.port()), n.logs());
                }
            }
            for n in nodes {
                let logs = n.logs();
                let lines: Vec<&str> = logs.lines().filter(|l| !l.contains("DEBUG")).collect();
                eprintln!(
                    "DIAG node {} ({} lines):\n{}",
                    n.grpc,
                    lines.len(),
                    lines[lines.len().saturating_sub(80)..].join("\n")
                );
            }
        }
        assert!(
            Instant::now() < deadline,
            "{why}: (quiet led, replicas following) is {seen:?}, want {want:?}; shards: {:?}",
            shards(&nodes[0])
        );
        std::thread::sleep(Duration::from_millis(200));
        seen = quiet(nodes);
    }
}

fn send(node: &Node, tag: &str) {
    let mut c = Client::connect(node.smtp).unwrap();
    c.command("EHLO quiet.test").unwrap();
    c.send_mail("a@tern.test", &["b@example.test"], &body(tag, 500))
        .unwrap();
    c.command("QUIT").unwrap();
}

fn delivered(sink: &SmtpSink, tag: &str) -> usize {
    let id = format!("<{tag}@tern.test>");
    sink.messages().iter().filter(|m| m.contains(&id)).count()
}

/// TERN_QUIET_DIAG_DIR=DIR keeps the three nodes' logs there (a diagnosis
/// run; with TERN_TEST_RUST_LOG for more of them).
#[test]
fn idle_shards_go_quiet_deliver_and_fail_over() {
    let _serial = cluster_lock();
    let sink = SmtpSink::start(&[]);
    let extra = format!(
        "quiesce_idle_groups = true\nshards = {SHARDS}\n\n[[route]]\ndomain = \"*\"\nto = \"{}\"\n\n[delivery]\nretry_schedule = [\"1s\"]\n",
        sink.addr
    );
    let mut nodes: Vec<Node> = (1..=3).map(|id| Node::cluster_node(id, id == 1, &extra)).collect();
    join(&nodes[0], &nodes[1], 2);
    join(&nodes[0], &nodes[2], 3);
    wait_for(Duration::from_secs(120), "every shard on 3 voters, led", || {
        let s = shards(&nodes[0]);
        s.len() == SHARDS
            && s.iter().all(|sh| {
                sh["voters"].as_array().unwrap().len() == 3
                    && sh["leader"].as_u64().unwrap() != 0
                    && sh["joint"] == false
            })
    });
    wait_all_quiet(&nodes, "every idle shard quiet, every follower following");

    // Mail wakes a quiet shard, is delivered once, and the shard goes quiet again.
    let tags: Vec<String> = (0..12).map(|i| format!("quiet-{i}")).collect();
    for (i, tag) in tags.iter().enumerate() {
        send(&nodes[i % 3], tag);
    }
    wait_for(Duration::from_secs(30), "mail to quiet shards delivered", || {
        tags.iter().all(|t| delivered(&sink, t) >= 1)
    });
    wait_all_quiet(&nodes, "quiet again after the mail");

    // SIGKILL the node (2 or 3) leading the most shards: its quiet shards elect.
    let led = |node: u64| -> Vec<u64> {
        shards(&nodes[0])
            .iter()
            .filter(|sh| sh["leader"] == node)
            .map(|sh| sh["shard"].as_u64().unwrap())
            .collect()
    };
    let victim = (2..=3).max_by_key(|id| led(*id).len()).unwrap();
    let victim_shards = led(victim);
    assert!(!victim_shards.is_empty(), "node {victim} leads a shard");
    let (v, other) = (victim as usize - 1, if victim == 2 { 2 } else { 1 });
    let at = Instant::now();
    nodes[v].kill();
    wait_for(
        Duration::from_secs(20),
        "new leaders for the killed node's quiet shards",
        || {
            shards(&nodes[0])
                .iter()
                .filter(|sh| victim_shards.contains(&sh["shard"].as_u64().unwrap()))
                .all(|sh| sh["leader"] != victim && sh["leader"] != 0)
        },
    );
    eprintln!(
        "quiet shards {victim_shards:?} of node {victim} re-elected {:?} after SIGKILL",
        at.elapsed()
    );
    let after: Vec<String> = (0..6).map(|i| format!("after-kill-{i}")).collect();
    for (i, tag) in after.iter().enumerate() {
        send(&nodes[if i % 2 == 0 { 0 } else { other }], tag);
    }
    wait_for(Duration::from_secs(30), "mail after the kill delivered", || {
        after.iter().all(|t| delivered(&sink, t) >= 1)
    });

    // Back again: it catches up, and every shard goes quiet with it.
    nodes[v].spawn();
    wait_all_quiet(&nodes, "quiet again with the restarted node");
    if let Ok(dir) = std::env::var("TERN_QUIET_DIAG_DIR") {
        for n in &nodes {
            let _ = std::fs::write(format!("{dir}/ok-node-{}.log", n.grpc.port()), n.logs());
        }
    }
    for t in tags.iter().chain(&after) {
        assert_eq!(delivered(&sink, t), 1, "{t} delivered exactly once");
    }
}
