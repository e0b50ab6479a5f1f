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

    // A retired shard's data is deleted, not only closed: its state is
    // empty on disk, and the node starts again without it (the restart
    // drops what is left of it).
    let mut nodes = nodes;
    nodes[2].signal_and_wait("TERM", Duration::from_secs(60));
    {
        let db = sled::Config::new()
            .path(nodes[2].dir().join("data/sled"))
            .open()
            .expect("open the stopped node's state");
        let rows = |name: &str| {
            db.tree_names()
                .iter()
                .any(|n| n.as_ref() == name.as_bytes())
                .then(|| db.open_tree(name).unwrap().len())
        };
        assert_eq!(rows("g1/sm").unwrap_or(0), 0, "the retired shard's state is deleted");
        assert!(rows("g2/sm").unwrap_or(0) > 0, "an active shard's state is kept");
    }
    nodes[2].spawn();
    wait_for(Duration::from_secs(90), "node 3 back with shards 2-6 and not 1", || {
        let local = nodes[2].ternctl_json(&["shard", "list", "--local"]);
        let ids: BTreeSet<u64> = local
            .as_array()
            .unwrap()
            .iter()
            .map(|sh| sh["shard"].as_u64().unwrap())
            .collect();
        ids == BTreeSet::from([2, 3, 4, 5, 6])
    });

    // A retired shard's id is not reused; a repeated `shard add` with the
    // same request id (a script's retry) adds nothing more.
    let more = nodes[0].ternctl_json(&["shard", "add", "1", "--request-id", "grow-7"]);
    assert_eq!(more["added"], serde_json::json!([7]), "{more}");
    let again = nodes[1].ternctl_json(&["shard", "add", "1", "--request-id", "grow-7"]);
    assert_eq!(
        again["added"],
        serde_json::json!([7]),
        "the repeat returns the first call's shard"
    );
    let other = nodes[2].ternctl(&["shard", "add", "2", "--request-id", "grow-7"]);
    assert!(
        !other.status.success(),
        "a request id reused for another count is refused"
    );
    assert!(
        String::from_utf8_lossy(&other.stderr).contains("already added 1 shards"),
        "{}",
        String::from_utf8_lossy(&other.stderr)
    );
    assert_eq!(by_id(&nodes[0]).keys().max(), Some(&7), "one shard added, not two");
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

/// ternctl against `node` with `token` only (no credentials from the
/// test's own environment).
fn ctl_as(node: &Node, token: &str, args: &[&str]) -> std::process::Output {
    let mut cmd = std::process::Command::new(ternctl_bin());
    for var in ["TERN_TOKEN", "TERN_TLS_CA", "TERN_TLS_CERT", "TERN_TLS_KEY"] {
        cmd.env_remove(var);
    }
    cmd.arg("--endpoint")
        .arg(node.grpc.to_string())
        .args(args)
        .env("TERN_TOKEN", token)
        .output()
        .expect("run ternctl")
}

/// The `admin` audit events in the node's JSON log.
fn admin_events(node: &Node) -> Vec<serde_json::Value> {
    node.logs()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["target"] == "tern::event" && l["fields"]["event"] == "admin")
        .map(|l| l["fields"].clone())
        .collect()
}

/// Admin-only and audited, on a single node (the control leader itself):
/// an operator is refused, an admin adds a shard that then takes mail
/// placement, retires it once empty, and cannot ask for more replicas
/// than members.
#[test]
fn shard_changes_are_admin_only_and_audited() {
    let (admin, operator) = ("admin-5e1d2c3b4a", "operator-9f8e7d6c");
    // Appended to the [cluster] section: its keys first.
    let mut extra = "shards = 2\n\n[log]\nformat = \"json\"\n\n".to_owned();
    for (name, role, secret) in [("boss", "admin", admin), ("ops", "operator", operator)] {
        extra.push_str(&format!(
            "[[admin_token]]\nname = \"{name}\"\nrole = \"{role}\"\nhash = \"{}\"\n\n",
            hash_password(secret)
        ));
    }
    let node = Node::start(&extra);

    for args in [
        &["shard", "add", "1"][..],
        &["shard", "retire", "1"],
        &["cluster", "set", "replicas", "1"],
    ] {
        let out = ctl_as(&node, operator, args);
        assert_eq!(out.status.code(), Some(4), "{args:?} as operator: {out:?}");
    }
    let out = ctl_as(&node, admin, &["-o", "json", "shard", "add", "1"]);
    assert!(out.status.success(), "{out:?}");
    let added: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(added["added"], serde_json::json!([3]));
    let list = |n: &Node| -> BTreeMap<u64, serde_json::Value> {
        let out = ctl_as(n, admin, &["-o", "json", "shard", "list"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| (s["shard"].as_u64().unwrap(), s.clone()))
            .collect()
    };
    wait_for(Duration::from_secs(30), "shard 3 active and led", || {
        list(&node)
            .get(&3)
            .is_some_and(|s| s["state"] == "active" && s["leader"] == 1)
    });
    let out = ctl_as(&node, admin, &["cluster", "set", "replicas", "2"]);
    assert_eq!(out.status.code(), Some(1), "more replicas than members: {out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("number of members (1)"),
        "{out:?}"
    );

    let out = ctl_as(&node, admin, &["shard", "retire", "3"]);
    assert!(out.status.success(), "{out:?}");
    wait_for(Duration::from_secs(90), "shard 3 retired and closed", || {
        list(&node).get(&3).is_some_and(|s| s["state"] == "retired") && {
            let out = ctl_as(&node, admin, &["-o", "json", "shard", "list", "--local"]);
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            v.as_array().unwrap().iter().all(|s| s["shard"] != 3)
        }
    });

    let events = admin_events(&node);
    let find = |action: &str, who: &str, result: &str| {
        events
            .iter()
            .any(|e| e["action"] == action && e["who"] == who && e["result"] == result)
    };
    assert!(find("shard add", "ops", "refused"), "{events:?}");
    assert!(find("shard add", "boss", "ok"), "{events:?}");
    assert!(find("shard retire", "boss", "ok"), "{events:?}");
    assert!(find("cluster set", "boss", "failed"), "{events:?}");
}
