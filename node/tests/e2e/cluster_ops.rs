//! ternctl at cluster scale on four real nodes with three replicas per
//! shard (so no node holds every shard): `queue list`, `queue show` and
//! queue operations are cluster-wide through any node, filters select,
//! `--endpoints` fails over past a dead node, `member add` checks the id of
//! the node it adds, and a selection far larger than any page or batch
//! (`TERN_BIG_SELECTION`, default 150,000 scheduled messages injected
//! through the sending API) is held and deleted in one command each.

use std::io::{Read as _, Write as _};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::cluster::join;
use crate::harness::*;

fn send(node: &Node, from: &str, to: &str, tag: &str) -> String {
    let mut c = Client::connect(node.smtp).unwrap();
    c.command("EHLO ops.test").unwrap();
    c.send_mail(from, &[to], &body(tag, 300)).unwrap()
}

/// The queue ids of a `queue list -o json`.
fn listed(v: &serde_json::Value) -> Vec<String> {
    v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect()
}

/// POST /api/v1/messages with `body` (HTTP/1.1, one call per connection),
/// as a client following docs/api.md would: under `idem`, and a `503` (a
/// shard changing leader under this load) retried with the same key after
/// its Retry-After, a bounded number of times.
fn api_post(node: &Node, key: &str, idem: &str, body: &serde_json::Value) -> (u16, String) {
    let payload = body.to_string();
    let mut last = (0, String::new());
    for _ in 0..10 {
        let mut s = std::net::TcpStream::connect(node.http).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        write!(
            s,
            "POST /api/v1/messages HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {key}\r\nIdempotency-Key: {idem}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{payload}",
            node.http,
            payload.len()
        )
        .unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        let status = answer.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
        if status != 503 {
            return (status, answer);
        }
        let wait = answer
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("retry-after:")
                    .map(|v| v.trim().to_owned())
            })
            .and_then(|v| v.parse().ok())
            .unwrap_or(2u64)
            .min(5);
        std::thread::sleep(Duration::from_secs(wait));
        last = (status, answer);
    }
    last
}

/// How many messages the big-selection step injects.
fn big_selection() -> usize {
    std::env::var("TERN_BIG_SELECTION")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150_000)
}

#[test]
fn four_nodes_three_replicas_queue_ops_are_cluster_wide() {
    let _serial = cluster_lock();
    let closed = closed_port();
    let extra = format!(
        "shards = 8\n\n{}[[route]]\ndomain = \"*\"\nto = \"127.0.0.1:{}\"\n\n[delivery]\nretry_schedule = [\"1h\"]\n",
        crate::console::tokens(),
        closed.port
    );
    let nodes: Vec<Node> = (1..=4).map(|id| Node::cluster_node(id, id == 1, &extra)).collect();
    for (i, n) in nodes.iter().enumerate().skip(1) {
        join(&nodes[0], n, i as u64 + 1);
    }
    wait_for(Duration::from_secs(120), "8 shards on 3 voters each, all led", || {
        let s = crate::cluster::shards(&nodes[0]);
        s.len() == 8
            && s.iter().all(|sh| {
                sh["voters"].as_array().unwrap().len() == 3
                    && sh["leader"].as_u64().unwrap() != 0
                    && sh["joint"] == false
            })
    });

    // Mail through every node, to two domains from two senders.
    let mut a_ids = Vec::new();
    let mut b_ids = Vec::new();
    for i in 0..24 {
        let n = &nodes[i % 4];
        if i % 2 == 0 {
            a_ids.push(send(n, "x@one.test", "r@a.test", &format!("ops-a-{i}")));
        } else {
            b_ids.push(send(n, "y@two.test", "r@b.test", &format!("ops-b-{i}")));
        }
    }
    // Every node lists all 24, whichever shards it holds.
    wait_for(Duration::from_secs(60), "every message tried once", || {
        listed(&nodes[3].ternctl_json(&["queue", "list", "--state", "deferred"])).len() == 24
    });
    for (i, n) in nodes.iter().enumerate() {
        let all = listed(&n.ternctl_json(&["queue", "list"]));
        assert_eq!(all.len(), 24, "node {}", i + 1);
        let mut sorted = all.clone();
        sorted.sort();
        assert_eq!(all, sorted, "arrival (id) order");
    }
    // Filters: domain, sender, reply class, age, a limit smaller than the selection.
    let a = listed(&nodes[1].ternctl_json(&["queue", "list", "--domain", "a.test"]));
    assert_eq!(a.len(), 12);
    assert!(a.iter().all(|id| a_ids.contains(id)));
    let two = listed(&nodes[2].ternctl_json(&["queue", "list", "--sender", "@two.test", "--reply-class", "4xx"]));
    assert_eq!(two.len(), 12);
    assert!(listed(&nodes[2].ternctl_json(&["queue", "list", "--reply-class", "5xx"])).is_empty());
    assert!(listed(&nodes[2].ternctl_json(&["queue", "list", "--older-than", "1h"])).is_empty());
    assert_eq!(
        listed(&nodes[2].ternctl_json(&["queue", "list", "--newer-than", "1h"])).len(),
        24
    );
    let page = nodes[0].ternctl_json(&["queue", "list", "--limit", "5"]);
    assert_eq!(listed(&page).len(), 5);
    assert_eq!(page["truncated"], true);

    // A message in a shard node N holds no replica of, shown through N.
    let shards = crate::cluster::shards(&nodes[0]);
    let replicas = |shard: u64| -> Vec<u64> {
        shards
            .iter()
            .find(|s| s["shard"] == shard)
            .map(|s| {
                s["replicas"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap())
                    .collect()
            })
            .unwrap_or_default()
    };
    let every = nodes[0].ternctl_json(&["queue", "list"]);
    let (far_id, far_node) = every["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|m| {
            let r = replicas(m["shard"].as_u64().unwrap());
            let outside = (1..=4u64).find(|n| !r.contains(n))?;
            Some((m["id"].as_str().unwrap().to_owned(), outside))
        })
        .expect("with 8 shards on 3 of 4 nodes some shard misses a node");
    let via = &nodes[far_node as usize - 1];
    assert_eq!(via.ternctl_json(&["queue", "show", &far_id])["id"], far_id.as_str());

    // The console's queue actions through that node are cluster-wide too.
    let far_domain = if a_ids.contains(&far_id) { "a.test" } else { "b.test" };
    let console = |action: &str| {
        let answer = crate::console::act(
            &format!("http://{}", via.http),
            &format!("queue/{action}"),
            &format!("{{\"domain\":\"{far_domain}\"}}"),
            &[("authorization", &format!("Bearer {}", crate::console::OPERATOR))],
        );
        assert_eq!(answer.status, 200, "console {action}: {}", answer.body);
        answer.json()
    };
    let held = console("hold");
    assert_eq!(
        (&held["matched"], &held["affected"]),
        (&json!(12), &json!(12)),
        "{held}"
    );
    assert_eq!(
        listed(&nodes[0].ternctl_json(&["queue", "list", "--state", "held"])).len(),
        12
    );
    assert_eq!(console("release")["affected"], 12);
    assert!(listed(&nodes[0].ternctl_json(&["queue", "list", "--state", "held"])).is_empty());

    // Operations through one node act on every shard, wherever its leader is.
    let held = via.ternctl_json(&["queue", "hold", "--domain", "a.test"]);
    assert_eq!(held["affected"], 12, "{held}");
    let held_ids = listed(&nodes[0].ternctl_json(&["queue", "list", "--state", "held"]));
    assert_eq!(held_ids.len(), 12);
    assert!(held_ids.iter().all(|id| a_ids.contains(id)));
    let dry = nodes[1].ternctl_json(&["queue", "delete", "--state", "held", "--dry-run"]);
    assert_eq!(dry["matched"], 12);
    assert_eq!(
        nodes[2].ternctl_json(&["queue", "release", "--state", "held"])["affected"],
        12
    );
    assert!(listed(&nodes[0].ternctl_json(&["queue", "list", "--state", "held"])).is_empty());
    let deleted = nodes[3].ternctl_json(&["queue", "delete", "--sender", "y@two.test"]);
    assert_eq!(deleted["affected"], 12, "{deleted}");
    wait_for(Duration::from_secs(30), "b.test mail gone everywhere", || {
        nodes
            .iter()
            .all(|n| listed(&n.ternctl_json(&["queue", "list", "--domain", "b.test"])).is_empty())
    });
    // Replicas apply the delete a moment after the leader.
    wait_for(Duration::from_secs(30), "queue show: not found", || {
        nodes[0].ternctl(&["queue", "show", &b_ids[0]]).status.code() == Some(3)
    });
    assert_eq!(
        nodes[0].ternctl(&["queue", "list", "--state", "stuck"]).status.code(),
        Some(2)
    );

    // --endpoints: the first node is dead, the command runs on the next.
    let dead = closed_port();
    let out = std::process::Command::new(ternctl_bin())
        .args([
            "--endpoints",
            &format!("127.0.0.1:{},{}", dead.port, nodes[1].grpc),
            "queue",
            "summary",
            "-o",
            "json",
        ])
        .envs(nodes[1].ternctl_env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["messages"], 12, "{summary}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("trying"),
        "no failover note"
    );
    // Every endpoint dead: exit 1 naming the last.
    let out = std::process::Command::new(ternctl_bin())
        .args([
            "-e",
            &format!("127.0.0.1:{},127.0.0.1:{}", dead.port, closed.port),
            "status",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));

    // member add checks the id of the node at the address.
    let wrong = nodes[0].ternctl(&["member", "add", "9", "--addr", &nodes[3].grpc.to_string()]);
    assert_eq!(wrong.status.code(), Some(1));
    let err = String::from_utf8_lossy(&wrong.stderr);
    // With cluster TLS the certificate already names the other node.
    assert!(
        err.contains("node 9") && (err.contains("is node 4") || err.contains("tern://node/4")),
        "{err}"
    );
    let nobody = nodes[0].ternctl(&["member", "add", "9", "--addr", &format!("127.0.0.1:{}", dead.port)]);
    assert_eq!(nobody.status.code(), Some(1));
    assert_eq!(nodes[0].ternctl_json(&["member", "list"]).as_array().unwrap().len(), 4);

    // A selection larger than any page or batch, in one command each.
    let total = big_selection();
    let key = nodes[0].ternctl_json(&["apikey", "create", "--name", "bulk", "--scope", "send"])["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let send_at = chrono_now() + 48 * 3600;
    let t = Instant::now();
    let mut queued = 0;
    while queued < total {
        let n = (total - queued).min(10_000);
        let recipients: Vec<_> = (queued..queued + n)
            .map(|i| json!({"to": format!("r{i}@bulk.test")}))
            .collect();
        let (status, answer) = api_post(
            &nodes[queued / 10_000 % 4],
            &key,
            &format!("bulk-{queued}"),
            &json!({"from": "bulk@one.test", "subject": "bulk", "text": "x", "variables": {},
                    "recipients": recipients, "send_at": send_at}),
        );
        assert_eq!(status, 200, "{}", answer.chars().take(500).collect::<String>());
        queued += n;
    }
    eprintln!(
        "big selection: {total} scheduled messages injected in {:.1?}",
        t.elapsed()
    );
    let t = Instant::now();
    let hold = nodes[2].ternctl(&[
        "queue",
        "hold",
        "--domain",
        "bulk.test",
        "--state",
        "scheduled",
        "-o",
        "json",
    ]);
    assert!(hold.status.success(), "{}", String::from_utf8_lossy(&hold.stderr));
    let r: serde_json::Value = serde_json::from_slice(&hold.stdout).unwrap();
    assert_eq!(r["affected"], total as u64, "{r}");
    let progress = String::from_utf8_lossy(&hold.stderr);
    assert!(
        progress.contains(&format!("hold: {total}/{total}")),
        "no progress: {progress}"
    );
    eprintln!("big selection: held in {:.1?}", t.elapsed());
    let t = Instant::now();
    let del = nodes[1].ternctl_json(&["queue", "delete", "--state", "held"]);
    assert_eq!(del["affected"], total as u64, "{del}");
    eprintln!("big selection: deleted in {:.1?}", t.elapsed());
    wait_for(Duration::from_secs(120), "an empty queue", || {
        nodes[0].ternctl_json(&["queue", "summary"])["messages"] == 12
    });
}

fn chrono_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}
