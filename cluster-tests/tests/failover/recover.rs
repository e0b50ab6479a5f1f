//! Unsafe recovery (`ternd recover`) after losing a majority for good: a
//! 3-node cluster holds deferred mail (its destination is down), two nodes
//! die for good, the survivor is rewritten offline to a one-node cluster,
//! restarted, and delivers every message it held; new mail is accepted.

use std::time::Duration;

use cluster_tests::cluster::Options;
use tern_testkit::smtp::{body, Client};

use crate::common::*;

fn queued_here(c: &cluster_tests::cluster::Cluster, id: u64) -> u64 {
    c.node(id)
        .unwrap()
        .ternctl_json(&["shard", "list", "--local"], Duration::from_secs(20))
        .map(|v| {
            v.as_array()
                .map(|a| a.iter().filter_map(|s| s["queued_messages"].as_u64()).sum())
                .unwrap_or(0)
        })
        .unwrap_or(0)
}

#[test]
fn recover_a_survivor_after_losing_the_majority() {
    let _s = serial();
    let mut c = cluster(
        3,
        Options {
            retry_schedule: vec!["1h".into()],
            ..Options::default()
        },
    );
    c.sink.stop();
    const N: usize = 30;
    let mut sent = Vec::new();
    for i in 0..N {
        let node = c.node(1 + (i as u64 % 3)).unwrap();
        let mut client = Client::connect(node.smtp.unwrap()).unwrap();
        client.command("EHLO recover.test").unwrap();
        let tag = format!("recover-{i}");
        client
            .send_mail("a@tern.test", &["b@example.test"], &body(&tag, 500))
            .unwrap();
        sent.push(tag);
    }
    // Every acknowledged message applied on the survivor-to-be (it holds a
    // replica of every shard), and tried once (deferred).
    tern_testkit::wait_until(Duration::from_secs(60), "node 1 holds all the mail", || {
        queued_here(&c, 1) == N as u64
    })
    .unwrap();
    tern_testkit::wait_until(Duration::from_secs(60), "every message deferred", || {
        c.node(1)
            .unwrap()
            .ternctl_json(&["queue", "list", "--state", "deferred"], Duration::from_secs(20))
            .is_ok_and(|v| v["messages"].as_array().is_some_and(|m| m.len() == N))
    })
    .unwrap();

    // The majority is lost for good; the survivor is stopped for recovery.
    c.kill(2).unwrap();
    c.kill(3).unwrap();
    assert!(c.node_mut(1).unwrap().terminate(Duration::from_secs(30)).is_ok());
    let data_dir = c.node(1).unwrap().data_dir();
    let config = data_dir.parent().unwrap().join("tern.toml");
    let ternd = tern_testkit::bin("ternd");
    let run = |extra: &[&str]| {
        let mut cmd = std::process::Command::new(&ternd);
        cmd.arg("--config")
            .arg(&config)
            .args(["recover", "--keep-members", "1"])
            .args(extra);
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "ternd recover {extra:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    let dry = run(&[]);
    assert!(
        dry.contains("would rewrite control group") && dry.contains("dry run"),
        "{dry}"
    );
    let done = run(&["--yes"]);
    eprintln!("ternd recover:\n{done}");
    assert!(done.contains("rewrote control group"), "{done}");
    assert!(done.contains("lost members removed from the cluster: [2, 3]"), "{done}");
    assert!(done.contains("no shard lost"), "{done}");

    c.node_mut(1).unwrap().start().unwrap();
    c.node_mut(1).unwrap().wait_ready(Duration::from_secs(90)).unwrap();
    c.sink.resume().unwrap();
    // Deferred for an hour: tried again now, cluster-wide (one node left).
    tern_testkit::wait_until(Duration::from_secs(60), "queue retry on the recovered node", || {
        c.node(1)
            .unwrap()
            .ternctl_json(&["queue", "retry", "--state", "deferred"], Duration::from_secs(20))
            .is_ok_and(|v| v["affected"].as_u64() == Some(N as u64))
    })
    .unwrap();
    tern_testkit::wait_until(Duration::from_secs(60), "every message delivered", || {
        let got = c.sink.counts();
        sent.iter().all(|t| got.contains_key(&format!("{t}@tern.test")))
    })
    .unwrap();
    // New mail is accepted and delivered.
    let mut client = Client::connect(c.node(1).unwrap().smtp.unwrap()).unwrap();
    client.command("EHLO recover.test").unwrap();
    client
        .send_mail("a@tern.test", &["b@example.test"], &body("recover-after", 500))
        .unwrap();
    tern_testkit::wait_until(Duration::from_secs(60), "new mail delivered", || {
        c.sink.counts().contains_key("recover-after@tern.test")
    })
    .unwrap();
    let members = c
        .node(1)
        .unwrap()
        .ternctl_json(&["member", "list"], Duration::from_secs(20))
        .unwrap();
    let ids: Vec<u64> = members
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["id"].as_u64())
        .collect();
    assert_eq!(ids, [1], "{members}");
}
