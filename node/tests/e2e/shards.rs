//! Growing and shrinking a running three-node cluster (issue 28): `ternctl
//! shard add` gives new shards leaders and then new mail, `shard retire`
//! stops new mail to a shard whose queue is held by a suspended destination,
//! delivers it once the destination is back and then removes the group;
//! mail flows throughout and reaches the sink exactly once. And `cluster
//! set replicas` moves every shard from 3 replicas to 2 and back.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::cluster::{join, shards};
use crate::harness::*;

/// Three nodes with `shards` shards, every one on three voters and led.
fn three_nodes(extra: &str, shards_at_start: usize) -> Vec<Node> {
    let nodes: Vec<Node> = (1..=3).map(|id| Node::cluster_node(id, id == 1, extra)).collect();
    join(&nodes[0], &nodes[1], 2);
    join(&nodes[0], &nodes[2], 3);
    wait_for(Duration::from_secs(120), "every shard on 3 voters, led", || {
        let s = shards(&nodes[0]);
        s.len() == shards_at_start
            && s.iter().all(|sh| {
                sh["voters"].as_array().unwrap().len() == 3
                    && sh["leader"].as_u64().unwrap() != 0
                    && sh["joint"] == false
            })
    });
    nodes
}

/// Shard id -> its row in `shard list -o json`.
fn by_id(node: &Node) -> BTreeMap<u64, serde_json::Value> {
    shards(node)
        .into_iter()
        .map(|s| (s["shard"].as_u64().unwrap(), s))
        .collect()
}

/// Shard of each queued message, cluster-wide (`queue list -o json`).
fn queued_by_shard(node: &Node) -> BTreeMap<String, u64> {
    let v = node.ternctl_json(&["queue", "list", "--limit", "5000"]);
    v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["id"].as_str().unwrap().to_owned(), m["shard"].as_u64().unwrap()))
        .collect()
}

/// Sends `n` messages tagged `prefix-i` round robin through the nodes; the
/// queue id of each accepted one by tag.
fn send_batch(nodes: &[Node], prefix: &str, n: usize) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for i in 0..n {
        let tag = format!("{prefix}-{i}");
        let mut c = Client::connect(nodes[i % nodes.len()].smtp).unwrap();
        c.command("EHLO grow.test").unwrap();
        let id = c
            .send_mail("a@tern.test", &["b@example.test"], &body(&tag, 512))
            .unwrap();
        out.insert(tag, id);
    }
    out
}

/// How many times each tag reached the sink.
fn sink_counts(sink: &SmtpSink) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for m in sink.messages() {
        if let Some(start) = m.find("Message-ID: <") {
            let rest = &m[start + 13..];
            if let Some(end) = rest.find("@tern.test>") {
                *counts.entry(rest[..end].to_owned()).or_default() += 1;
            }
        }
    }
    counts
}

#[test]
fn shards_added_and_retired_under_load_lose_and_duplicate_nothing() {
    let _serial = cluster_lock();
    let sink = SmtpSink::start(&[]);
    let extra = format!(
        "shards = 4\n\n[[route]]\ndomain = \"*\"\nto = \"{}\"\n\n[delivery]\nretry_schedule = [\"1s\"]\n",
        sink.addr
    );
    let nodes = three_nodes(&extra, 4);

    // Load through every node for the whole test (bounded: 600 messages).
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (acked, stop) = (Arc::clone(&acked), Arc::clone(&stop));
        let addrs: Vec<_> = nodes.iter().map(|n| n.smtp).collect();
        std::thread::spawn(move || {
            let mut i = 0;
            while i < 600 && !stop.load(Ordering::Relaxed) {
                let tag = format!("load-{i}");
                if let Ok(mut c) = Client::connect(addrs[i % addrs.len()]) {
                    if c.command("EHLO load.test").is_ok()
                        && c.send_mail("a@tern.test", &["b@example.test"], &body(&tag, 512))
                            .is_ok()
                    {
                        acked.lock().unwrap().push(tag);
                    }
                }
                i += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };

    // shard add 2 through a node that may not lead the control group.
    let added = nodes[1].ternctl_json(&["shard", "add", "2"]);
    assert_eq!(added["added"], serde_json::json!([5, 6]), "{added}");
    wait_for(
        Duration::from_secs(90),
        "shards 5 and 6 active, led, on 3 voters",
        || {
            let s = by_id(&nodes[0]);
            [5, 6].iter().all(|id| {
                s.get(id).is_some_and(|sh| {
                    sh["state"] == "active"
                        && sh["leader"].as_u64().unwrap() != 0
                        && sh["voters"].as_array().unwrap().len() == 3
                        && sh["joint"] == false
                })
            })
        },
    );
    let placed = by_id(&nodes[2]);
    assert_eq!(placed.len(), 6, "{placed:?}");

    // Hold the destination: mail stays queued, and shows where it was placed.
    let out = nodes[0].ternctl(&["domain", "suspend", "example.test", "--reason", "grow test"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let first = send_batch(&nodes, "held", 36);
    let placed = queued_by_shard(&nodes[0]);
    let shards_used: BTreeSet<u64> = first.values().filter_map(|id| placed.get(id).copied()).collect();
    assert!(
        shards_used.contains(&5) && shards_used.contains(&6),
        "new shards take new mail: {shards_used:?}"
    );
    assert!(
        placed.values().any(|s| *s == 1),
        "shard 1 holds queued mail before it retires"
    );

    // Retire shard 1 while it holds mail: it retires, no new mail goes to it.
    let retire = nodes[2].ternctl_json(&["shard", "retire", "1"]);
    assert_eq!(retire["state"], "retiring", "{retire}");
    let again = nodes[0].ternctl(&["shard", "retire", "1"]);
    assert!(!again.status.success(), "retiring twice is refused");
    wait_for(Duration::from_secs(10), "every node sees shard 1 retiring", || {
        nodes.iter().all(|n| by_id(n)[&1]["state"] == "retiring")
    });
    let second = send_batch(&nodes, "after-retire", 36);
    let placed = queued_by_shard(&nodes[0]);
    for (tag, id) in &second {
        let shard = placed.get(id).copied();
        assert!(shard.is_some(), "{tag} ({id}) is queued while the domain is suspended");
        assert_ne!(shard, Some(1), "{tag} ({id}) was placed on the retiring shard");
    }
    // Still retiring: its queue is not empty (held by the suspension).
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(by_id(&nodes[0])[&1]["state"], "retiring");
    assert!(by_id(&nodes[0])[&1]["queued_messages"].as_u64().unwrap() > 0);

    // The destination comes back: everything is delivered, then shard 1 goes.
    let out = nodes[0].ternctl(&["domain", "resume", "example.test"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for(
        Duration::from_secs(120),
        "shard 1 retired and closed on every node",
        || {
            let s = by_id(&nodes[0]);
            s.get(&1).is_some_and(|sh| sh["state"] == "retired")
                && nodes.iter().all(|n| {
                    let local = n.ternctl_json(&["shard", "list", "--local"]);
                    local.as_array().unwrap().iter().all(|sh| sh["shard"] != 1)
                })
        },
    );
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();

    let mut expected: Vec<String> = acked.lock().unwrap().clone();
    expected.extend(first.into_keys());
    expected.extend(second.into_keys());
    assert!(expected.len() > 72, "load was accepted throughout: {}", expected.len());
    wait_for(Duration::from_secs(60), "every accepted message delivered", || {
        let got = sink_counts(&sink);
        expected.iter().all(|t| got.contains_key(t))
    });
    wait_for(Duration::from_secs(30), "every queue empty", || {
        nodes.iter().all(|n| n.queued_ids().is_empty())
    });
    let got = sink_counts(&sink);
    let duplicated: Vec<_> = got.iter().filter(|(_, n)| **n > 1).collect();
    assert!(duplicated.is_empty(), "delivered more than once: {duplicated:?}");
    assert_eq!(
        got.len(),
        expected.len(),
        "nothing but what was accepted reached the sink"
    );

    // A retired shard's id is not reused.
    let more = nodes[0].ternctl_json(&["shard", "add", "1"]);
    assert_eq!(more["added"], serde_json::json!([7]), "{more}");
}

#[test]
fn replicas_follow_the_cluster_setting_down_and_up() {
    let _serial = cluster_lock();
    let sink = SmtpSink::start(&[]);
    let extra = format!(
        "shards = 4\n\n[[route]]\ndomain = \"*\"\nto = \"{}\"\n\n[delivery]\nretry_schedule = [\"1s\"]\n",
        sink.addr
    );
    let nodes = three_nodes(&extra, 4);

    for bad in ["0", "4", "two"] {
        let out = nodes[0].ternctl(&["cluster", "set", "replicas", bad]);
        assert_eq!(out.status.code(), Some(1), "replicas {bad} is refused");
        assert!(String::from_utf8_lossy(&out.stderr).contains("replicas"), "{out:?}");
    }

    let on = |want: usize| {
        move |n: &Node| {
            let s = shards(n);
            s.len() == 4
                && s.iter().all(|sh| {
                    sh["voters"].as_array().unwrap().len() == want
                        && sh["replicas"].as_array().unwrap().len() == want
                        && sh["leader"].as_u64().unwrap() != 0
                        && sh["joint"] == false
                })
        }
    };
    let out = nodes[1].ternctl(&["cluster", "set", "replicas", "2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for(Duration::from_secs(120), "every shard on 2 voters", || on(2)(&nodes[0]));
    assert_eq!(nodes[2].ternctl_json(&["status"])["replicas"], 2);
    let tags = send_batch(&nodes, "two", 12);
    wait_for(Duration::from_secs(30), "mail delivered on 2 replicas", || {
        let got = sink_counts(&sink);
        tags.keys().all(|t| got.contains_key(t))
    });

    let out = nodes[2].ternctl(&["cluster", "set", "replicas", "3"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for(Duration::from_secs(120), "every shard on 3 voters again", || {
        on(3)(&nodes[0])
    });
    let tags = send_batch(&nodes, "three", 12);
    wait_for(Duration::from_secs(30), "mail delivered on 3 replicas", || {
        let got = sink_counts(&sink);
        tags.keys().all(|t| got.contains_key(t))
    });
}
