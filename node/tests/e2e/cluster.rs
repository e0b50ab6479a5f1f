//! A real three-node cluster on loopback: joined with ternctl, mail sent to
//! every node while a node is SIGKILLed, nothing acknowledged lost.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::*;

pub(crate) fn shards(node: &Node) -> Vec<serde_json::Value> {
    node.ternctl_json(&["shard", "list"]).as_array().unwrap().clone()
}

pub(crate) fn join(n1: &Node, n: &Node, id: u64) {
    let out = n1.ternctl(&["member", "add", "--id", &id.to_string(), "--addr", &n.grpc.to_string()]);
    assert!(
        out.status.success(),
        "member add {id}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits until all `n` shards have three voters and every node leads some.
fn wait_spread(n1: &Node, n: usize) {
    wait_for(
        Duration::from_secs(90),
        "every shard on 3 replicas with leaders spread",
        || {
            let s = shards(n1);
            let mut leads: BTreeMap<u64, usize> = BTreeMap::new();
            for sh in &s {
                *leads.entry(sh["leader"].as_u64().unwrap()).or_default() += 1;
            }
            s.len() == n
                && s.iter()
                    .all(|sh| sh["voters"].as_array().unwrap().len() == 3 && sh["joint"] == false)
                && leads.len() == 3
                && !leads.contains_key(&0)
        },
    );
}

/// Nodes packed on one machine run with `node.worker_threads = 1` (as
/// bench/run's cluster does): with a single runtime thread, anything that
/// blocks it or waits on another task from inside it stalls the node, so
/// mail accepted by every node must still reach the sink.
#[test]
fn three_single_threaded_nodes_relay_every_message() {
    let _serial = cluster_lock();
    let sink = SmtpSink::start(&[]);
    let extra = format!("shards = 6\n\n[[route]]\ndomain = \"*\"\nto = \"{}\"\n", sink.addr);
    let keys = "worker_threads = 1";
    let n1 = Node::cluster_node_with_keys(1, true, keys, &extra);
    let n2 = Node::cluster_node_with_keys(2, false, keys, &extra);
    let n3 = Node::cluster_node_with_keys(3, false, keys, &extra);
    join(&n1, &n2, 2);
    join(&n1, &n3, 3);
    wait_spread(&n1, 6);

    let senders: Vec<_> = [n1.smtp, n2.smtp, n3.smtp]
        .into_iter()
        .enumerate()
        .map(|(t, addr)| {
            std::thread::spawn(move || {
                let mut c = Client::connect(addr).unwrap();
                c.command("EHLO load.test").unwrap();
                (0..20)
                    .map(|i| {
                        let tag = format!("single-{t}-{i}");
                        let queued = c.send_mail("a@tern.test", &["b@example.test"], &body(&tag, 2048));
                        assert!(queued.is_ok(), "{tag} not accepted: {queued:?}");
                        tag
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let acked: Vec<String> = senders.into_iter().flat_map(|s| s.join().unwrap()).collect();
    assert_eq!(acked.len(), 60);
    wait_for(Duration::from_secs(30), "all 60 delivered", || {
        let got = sink.messages();
        acked
            .iter()
            .all(|t| got.iter().any(|m| m.contains(&format!("<{t}@tern.test>"))))
    });
    wait_for(Duration::from_secs(30), "every queue empty", || {
        [&n1, &n2, &n3].iter().all(|n| n.queued_ids().is_empty())
    });
}

#[test]
fn three_nodes_join_spread_and_survive_a_kill() {
    let _serial = cluster_lock();
    let sink = SmtpSink::start(&[]);
    // Appended to each node's [cluster] section (the harness writes it last).
    let extra = format!(
        "shards = 6\n\n[[route]]\ndomain = \"*\"\nto = \"{}\"\n\n[delivery]\nretry_schedule = [\"1s\"]\n",
        sink.addr
    );
    let cfg = |e: &str| e.to_owned();
    let n1 = Node::cluster_node(1, true, &cfg(&extra));
    let mut n2 = Node::cluster_node(2, false, &cfg(&extra));
    let n3 = Node::cluster_node(3, false, &cfg(&extra));
    join(&n1, &n2, 2);
    join(&n1, &n3, 3);

    let members = n2.ternctl_json(&["member", "list"]);
    let roles: Vec<_> = members
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["role"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(roles, ["voter", "voter", "voter"], "{members}");
    wait_spread(&n1, 6);

    // Mail to every node concurrently; kill node 2 mid-stream.
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut senders = Vec::new();
    for (t, addr) in [n1.smtp, n2.smtp, n3.smtp, n1.smtp, n3.smtp].into_iter().enumerate() {
        let (acked, stop) = (Arc::clone(&acked), Arc::clone(&stop));
        senders.push(std::thread::spawn(move || {
            // Bounded: 60 messages per sender; reconnects after a failure, at most 20 times.
            let mut failures = 0;
            let mut i = 0;
            while i < 60 && failures < 20 && !stop.load(Ordering::Relaxed) {
                let Ok(mut c) = Client::connect(addr) else {
                    failures += 1;
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                };
                let _ = c.command("EHLO load.test");
                while i < 60 {
                    let tag = format!("cluster-{t}-{i}");
                    match c.send_mail("a@tern.test", &["b@example.test"], &body(&tag, 1024)) {
                        Ok(_) => {
                            acked.lock().unwrap().push(tag);
                            i += 1;
                        }
                        Err(_) => {
                            failures += 1;
                            i += 1;
                            break;
                        }
                    }
                }
            }
        }));
    }
    wait_for(Duration::from_secs(60), "100 acknowledged", || {
        acked.lock().unwrap().len() >= 100
    });
    let led_by_2: Vec<u64> = shards(&n1)
        .iter()
        .filter(|sh| sh["leader"] == 2)
        .map(|sh| sh["shard"].as_u64().unwrap())
        .collect();
    let killed_at = Instant::now();
    n2.kill();
    wait_for(Duration::from_secs(15), "new leaders for node 2's shards", || {
        shards(&n1)
            .iter()
            .filter(|sh| led_by_2.contains(&sh["shard"].as_u64().unwrap()))
            .all(|sh| sh["leader"] != 2 && sh["leader"] != 0)
    });
    let new_leaders_after = killed_at.elapsed();
    // Reachability is the control leader's ping, not replication progress
    // (which never goes backwards): the dead node shows as unreachable.
    wait_for(Duration::from_secs(10), "node 2 unreachable in member list", || {
        n3.ternctl_json(&["member", "list"])
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["reachable"] == (m["id"] != 2))
    });
    let failover = {
        // Time until a message accepted by a survivor after the kill is delivered.
        let mut c = Client::connect(n1.smtp).unwrap();
        c.command("EHLO probe.test").unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if c.send_mail("a@tern.test", &["b@example.test"], &body("after-kill", 200))
                .is_ok()
            {
                break;
            }
            assert!(Instant::now() < deadline, "no shard writable after the kill");
            std::thread::sleep(Duration::from_millis(50));
        }
        wait_for(Duration::from_secs(30), "delivery after the kill", || {
            sink.messages().iter().any(|m| m.contains("<after-kill@tern.test>"))
        });
        killed_at.elapsed()
    };
    stop.store(true, Ordering::Relaxed);
    for s in senders {
        s.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let count = |tag: &str| {
        let id = format!("<{tag}@tern.test>");
        sink.messages().iter().filter(|m| m.contains(&id)).count()
    };
    wait_for(Duration::from_secs(90), "every acknowledged message delivered", || {
        acked.iter().all(|t| count(t) >= 1)
    });
    let dups = acked.iter().filter(|t| count(t) > 1).count();
    eprintln!(
        "cluster kill: {} acknowledged, all delivered, {dups} duplicates; node 2 led shards {led_by_2:?}, \
         re-elected {new_leaders_after:?} after SIGKILL; a new message accepted and delivered {failover:?} after it",
        acked.len(),
    );

    // The killed node comes back and catches up.
    n2.spawn();
    wait_for(Duration::from_secs(60), "node 2 caught up", || {
        let m = n1.ternctl_json(&["member", "list"]);
        m.as_array().unwrap().iter().all(|m| m["reachable"] == true)
    });

    // Drain node 3: it leads nothing; undrain.
    let out = n2.ternctl(&["node", "drain", "3"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for(Duration::from_secs(60), "node 3 leads no shard", || {
        shards(&n1).iter().all(|sh| sh["leader"] != 3 && sh["leader"] != 0)
    });
    assert!(n1.ternctl(&["node", "undrain", "3"]).status.success());

    // Remove node 3: its replicas move (two nodes left: two replicas each), mail flows on.
    let out = n2.ternctl(&["member", "remove", "--id", "3"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = shards(&n1);
    assert!(
        s.iter()
            .all(|sh| sh["replicas"] == serde_json::json!([1, 2]) || sh["replicas"] == serde_json::json!([2, 1])),
        "{s:?}"
    );
    let ids: Vec<u64> = n1
        .ternctl_json(&["member", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [1, 2]);
    drop(n3);
    let mut c = Client::connect(n2.smtp).unwrap();
    c.command("EHLO after.test").unwrap();
    c.send_mail("a@tern.test", &["b@example.test"], &body("after-remove", 200))
        .unwrap();
    wait_for(Duration::from_secs(30), "delivery after the removal", || {
        sink.messages().iter().any(|m| m.contains("<after-remove@tern.test>"))
    });
}

#[test]
fn control_group_leader_kill_keeps_mail_flowing() {
    let _serial = cluster_lock();
    let sink = SmtpSink::start(&[]);
    let extra = format!("shards = 4\n\n[[route]]\ndomain = \"*\"\nto = \"{}\"\n", sink.addr);
    let mut n1 = Node::cluster_node(1, true, &extra);
    let n2 = Node::cluster_node(2, false, &extra);
    let n3 = Node::cluster_node(3, false, &extra);
    join(&n1, &n2, 2);
    join(&n1, &n3, 3);
    // Three voters and no membership change half done (a joint config still
    // needs the old voter set, here node 1 alone).
    wait_for(Duration::from_secs(90), "every shard with 3 voters", || {
        shards(&n1)
            .iter()
            .all(|sh| sh["voters"].as_array().unwrap().len() == 3 && sh["joint"] == false && sh["leader"] != 0)
    });
    let leader = |n: &Node| -> u64 { n.ternctl_json(&["status"])["control_leader"].as_u64().unwrap() };
    assert_eq!(leader(&n2), 1);
    n1.kill();
    wait_for(Duration::from_secs(15), "a new control-group leader", || {
        let l = leader(&n2);
        l == 2 || l == 3
    });
    let mut acked = Vec::new();
    for (i, addr) in [n2.smtp, n3.smtp].iter().cycle().take(20).enumerate() {
        let tag = format!("ctl-{i}");
        let mut c = Client::connect(*addr).unwrap();
        c.command("EHLO x.test").unwrap();
        // Bounded retries while shards led by node 1 elect new leaders.
        let deadline = Instant::now() + Duration::from_secs(45);
        while c
            .send_mail("a@tern.test", &["b@example.test"], &body(&tag, 200))
            .is_err()
        {
            assert!(Instant::now() < deadline, "no 250 for {tag}");
            std::thread::sleep(Duration::from_millis(100));
            c = Client::connect(*addr).unwrap();
            c.command("EHLO x.test").unwrap();
        }
        acked.push(tag);
    }
    wait_for(Duration::from_secs(60), "all delivered", || {
        let msgs = sink.messages();
        acked
            .iter()
            .all(|t| msgs.iter().any(|m| m.contains(&format!("<{t}@tern.test>"))))
    });
    let members = n3.ternctl_json(&["member", "list"]);
    let down: Vec<_> = members
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["reachable"] == false)
        .map(|m| m["id"].clone())
        .collect();
    assert_eq!(down, [serde_json::json!(1)], "{members}");
}

/// Three joined nodes with every shard on three voters.
pub(crate) fn three_node_cluster(extra: &str) -> (Node, Node, Node) {
    let n1 = Node::cluster_node(1, true, extra);
    let n2 = Node::cluster_node(2, false, extra);
    let n3 = Node::cluster_node(3, false, extra);
    join(&n1, &n2, 2);
    join(&n1, &n3, 3);
    wait_for(
        Duration::from_secs(90),
        "every shard with 3 voters and a leader",
        || {
            shards(&n1)
                .iter()
                .all(|sh| sh["voters"].as_array().unwrap().len() == 3 && sh["joint"] == false && sh["leader"] != 0)
        },
    );
    (n1, n2, n3)
}

fn send_tagged(node: &Node, tag: &str) -> bool {
    let Ok(mut c) = Client::connect(node.smtp) else {
        return false;
    };
    c.command("EHLO t.test").is_ok() && c.send_mail("a@tern.test", &["b@example.test"], &body(tag, 300)).is_ok()
}

fn delivered(sink: &SmtpSink, tag: &str) -> usize {
    let id = format!("<{tag}@tern.test>");
    sink.messages().iter().filter(|m| m.contains(&id)).count()
}

/// A shard leader frozen (SIGSTOP) past the election timeout loses its
/// shards; after SIGCONT it steps down and mail queued meanwhile is
/// delivered once by the new leaders.
#[test]
fn paused_leader_steps_down_and_nothing_is_lost() {
    let _serial = cluster_lock();
    // A slow sink keeps deliveries in flight while the leader is frozen.
    let sink = SmtpSink::start(&["-w", "1"]);
    let extra = format!(
        "shards = 4\n\n[[route]]\ndomain = \"*\"\nto = \"{}\"\n\n[delivery]\nretry_schedule = [\"1s\"]\n",
        sink.addr
    );
    let (n1, n2, n3) = three_node_cluster(&extra);
    let leaders: Vec<u64> = shards(&n1).iter().map(|sh| sh["leader"].as_u64().unwrap()).collect();
    let frozen_id = leaders[0];
    let (frozen, others): (&Node, Vec<&Node>) = match frozen_id {
        1 => (&n1, vec![&n2, &n3]),
        2 => (&n2, vec![&n1, &n3]),
        _ => (&n3, vec![&n1, &n2]),
    };
    let mut tags = Vec::new();
    for i in 0..10 {
        let tag = format!("before-pause-{i}");
        assert!(send_tagged(frozen, &tag));
        tags.push(tag);
    }
    frozen.send_signal("STOP");
    wait_for(Duration::from_secs(20), "new leaders elected while frozen", || {
        shards(others[0])
            .iter()
            .all(|sh| sh["leader"] != frozen_id && sh["leader"] != 0)
    });
    for i in 0..10 {
        let tag = format!("during-pause-{i}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !send_tagged(others[i % 2], &tag) {
            assert!(Instant::now() < deadline, "no 250 for {tag}");
            std::thread::sleep(Duration::from_millis(100));
        }
        tags.push(tag);
    }
    // Keep leadership away from the frozen node once it wakes up, so that any
    // copy it delivers can only be one that was in flight at the freeze.
    let out = others[0].ternctl(&["node", "drain", &frozen_id.to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    frozen.send_signal("CONT");
    wait_for(Duration::from_secs(90), "every message delivered", || {
        tags.iter().all(|t| delivered(&sink, t) >= 1)
    });
    wait_for(Duration::from_secs(20), "resumed node rejoined as follower", || {
        shards(frozen)
            .iter()
            .all(|sh| sh["leader"] != 0 && sh["leader"] != frozen_id)
    });
    let dups: usize = tags.iter().filter(|t| delivered(&sink, t) > 1).count();
    eprintln!(
        "pause: {} messages, {dups} delivered twice (in flight at the freeze)",
        tags.len()
    );
    // The woken node never delivers what the new leaders accepted meanwhile
    // (each dump names the delivering node in its HELO line).
    let frozen_helo = format!("X-Helo-Args: mx{frozen_id}.tern.test");
    for t in tags.iter().filter(|t| t.starts_with("during")) {
        let id = format!("<{t}@tern.test>");
        let by_frozen = sink
            .messages()
            .iter()
            .filter(|m| m.contains(&id) && m.contains(&frozen_helo))
            .count();
        assert_eq!(by_frozen, 0, "{t} delivered by the node that was frozen");
    }
}

/// Every node SIGKILLed, then all restarted: all acknowledged mail is delivered.
#[test]
fn whole_cluster_restart_loses_nothing() {
    let _serial = cluster_lock();
    let closed_guard = closed_port();
    let closed = closed_guard.port;
    let extra = format!("shards = 4\n\n[[route]]\ndomain = \"*\"\nto = \"127.0.0.1:{closed}\"\n\n[delivery]\nretry_schedule = [\"1s\"]\n");
    let (mut n1, mut n2, mut n3) = three_node_cluster(&extra);
    let mut tags = Vec::new();
    for (i, n) in [&n1, &n2, &n3].iter().cycle().take(30).enumerate() {
        let tag = format!("restart-{i}");
        assert!(send_tagged(n, &tag), "{tag}");
        tags.push(tag);
    }
    for n in [&mut n1, &mut n2, &mut n3] {
        n.kill();
    }
    drop(closed_guard);
    // Mail was deferred (nothing listened); now the sink appears on that port.
    let sink = SmtpSink::start_on(closed, &[]);
    for n in [&mut n1, &mut n2, &mut n3] {
        n.spawn();
    }
    wait_for(Duration::from_secs(90), "every acknowledged message delivered", || {
        tags.iter().all(|t| delivered(&sink, t) >= 1)
    });
}

/// A node dead for `dead_node_after_secs` has its replicas moved to a live
/// node: every shard is back at three voters without it.
#[test]
fn long_dead_node_replicas_move_to_live_nodes() {
    let _serial = cluster_lock();
    let sink = SmtpSink::start(&[]);
    let extra = format!(
        "shards = 2\ndead_node_after_secs = 3\n\n[[route]]\ndomain = \"*\"\nto = \"{}\"\n",
        sink.addr
    );
    let n1 = Node::cluster_node(1, true, &extra);
    let mut others: Vec<Node> = (2..=4).map(|id| Node::cluster_node(id, false, &extra)).collect();
    for (i, n) in others.iter().enumerate() {
        join(&n1, n, i as u64 + 2);
    }
    wait_for(Duration::from_secs(90), "both shards on 3 voters", || {
        shards(&n1)
            .iter()
            .all(|sh| sh["voters"].as_array().unwrap().len() == 3 && sh["joint"] == false && sh["leader"] != 0)
    });
    // Kill a node (other than the control leader, node 1) that holds a replica.
    let victim = shards(&n1)
        .iter()
        .flat_map(|sh| {
            sh["voters"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect::<Vec<_>>()
        })
        .find(|v| *v != 1)
        .unwrap();
    others[(victim - 2) as usize].kill();
    wait_for(Duration::from_secs(60), "replicas moved off the dead node", || {
        shards(&n1).iter().all(|sh| {
            let voters: Vec<u64> = sh["voters"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect();
            voters.len() == 3 && !voters.contains(&victim) && sh["joint"] == false && sh["leader"] != 0
        })
    });
    assert!(send_tagged(&n1, "after-dead"));
    wait_for(Duration::from_secs(30), "delivery", || {
        delivered(&sink, "after-dead") == 1
    });
}

fn send_to(node: &Node, rcpt: &str, tag: &str) -> String {
    let mut c = Client::connect(node.smtp).unwrap();
    c.command("EHLO t.test").unwrap();
    c.send_mail("a@tern.test", &[rcpt], &body(tag, 300)).unwrap()
}

fn suspended_domains(node: &Node, args: &[&str]) -> Vec<String> {
    node.ternctl_json(args)
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["domain"].as_str().unwrap().to_owned())
        .collect()
}

/// A suspension made through one node holds mail for the domain on every
/// node (it is stored in the control group), whichever node took the mail
/// and whichever shard leader delivers it; a resume through another node
/// releases it everywhere.
#[test]
fn domain_suspension_applies_on_every_node() {
    let _serial = cluster_lock();
    let started = Instant::now();
    let sink = SmtpSink::start(&[]);
    let extra = format!(
        "shards = 3\n\n[[route]]\ndomain = \"*\"\nto = \"{}\"\n\n[delivery]\nretry_schedule = [\"1s\"]\n",
        sink.addr
    );
    let (n1, n2, n3) = three_node_cluster(&extra);
    let cluster_up = started.elapsed();

    let reply = n1.ternctl_json(&[
        "domain",
        "suspend",
        "held.test",
        "--duration",
        "1h",
        "--reason",
        "rbl listing",
    ]);
    assert_eq!(reply[0]["domain"], "held.test", "{reply}");
    assert_eq!(reply[0]["reason"], "rbl listing", "{reply}");
    for n in [&n2, &n3] {
        wait_for(Duration::from_secs(5), "the suspension listed on every node", || {
            suspended_domains(n, &["domain", "list"]) == ["held.test"]
        });
    }

    // Two messages per node, so that shards led by every node get some.
    let mut held = Vec::new();
    for (n, node) in [(2, &n2), (3, &n3)] {
        for i in 0..2 {
            let tag = format!("held-{n}-{i}");
            held.push((node, send_to(node, &format!("r{i}@held.test"), &tag), tag));
        }
    }
    let free = send_to(&n2, "r@free.test", "free-1");
    wait_for(Duration::from_secs(10), "mail for another domain delivered", || {
        delivered(&sink, "free-1") == 1
    });
    wait_for(Duration::from_secs(10), "held mail deferred as suspended", || {
        held.iter().all(|(node, id, _)| {
            let m = node.ternctl_json(&["queue", "show", id]);
            m["attempts"].as_u64().unwrap_or(0) >= 1
                && m["recipients"][0]["status"] == "deferred"
                && m["recipients"][0]["last_reply"]
                    .as_str()
                    .is_some_and(|r| r.contains("suspended by the administrator: rbl listing"))
        })
    });
    // Several retry periods (1 s) pass without a delivery.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        for (_, _, tag) in &held {
            assert_eq!(delivered(&sink, tag), 0, "{tag} delivered while suspended");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_for(Duration::from_secs(5), "the delivered message out of the queue", || {
        n1.ternctl(&["queue", "show", &free]).status.code() == Some(3)
    });
    let summary = n3.ternctl_json(&["queue", "summary"]);
    assert_eq!(summary["messages"], held.len(), "{summary}");

    let resumed = started.elapsed();
    let reply = suspended_domains(&n3, &["domain", "resume", "held.test"]);
    assert!(reply.is_empty(), "resume through node 3 still lists {reply:?}");
    wait_for(
        Duration::from_secs(10),
        "every held message delivered after the resume",
        || held.iter().all(|(_, _, tag)| delivered(&sink, tag) == 1),
    );
    for n in [&n1, &n2, &n3] {
        assert!(suspended_domains(n, &["domain", "list"]).is_empty());
    }
    eprintln!(
        "suspension: cluster up in {cluster_up:?}, delivered {:?} after the resume, {:?} in all",
        started.elapsed() - resumed,
        started.elapsed()
    );
}

/// One connection as [`GatedPeer`] saw it.
#[derive(Default, Clone, Debug)]
struct PeerConn {
    transcript: String,
    /// Messages it accepted (final "." received).
    completed: usize,
    /// The client went away.
    closed: bool,
}

/// An SMTP server (no PIPELINING, no CHUNKING) that answers the first
/// connection's DATA only once [`GatedPeer::open`] is called; every other
/// connection is served at once. Serves at most 20 connections.
struct GatedPeer {
    addr: std::net::SocketAddr,
    conns: Arc<Mutex<Vec<PeerConn>>>,
    gate: Arc<(Mutex<bool>, std::sync::Condvar)>,
}

impl GatedPeer {
    fn start() -> GatedPeer {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind(("127.0.0.1", free_port())).unwrap();
        let addr = listener.local_addr().unwrap();
        let conns: Arc<Mutex<Vec<PeerConn>>> = Arc::default();
        let gate: Arc<(Mutex<bool>, std::sync::Condvar)> = Arc::default();
        let (shared, gate2) = (Arc::clone(&conns), Arc::clone(&gate));
        std::thread::spawn(move || {
            for stream in listener.incoming().take(20) {
                let Ok(stream) = stream else { continue };
                let conns = Arc::clone(&shared);
                let gate = Arc::clone(&gate2);
                std::thread::spawn(move || {
                    let me = {
                        let mut c = conns.lock().unwrap();
                        c.push(PeerConn::default());
                        c.len() - 1
                    };
                    stream.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
                    let mut w = stream.try_clone().unwrap();
                    let mut r = BufReader::new(stream);
                    let _ = w.write_all(b"220 gated ESMTP\r\n");
                    let mut line = String::new();
                    let mut in_data = false;
                    while r.read_line(&mut line).is_ok_and(|n| n > 0) {
                        conns.lock().unwrap()[me].transcript.push_str(&line);
                        let reply: &[u8] = if in_data {
                            if line == ".\r\n" {
                                in_data = false;
                                conns.lock().unwrap()[me].completed += 1;
                                b"250 2.0.0 ok\r\n"
                            } else {
                                b""
                            }
                        } else {
                            match line.get(..4).map(|c| c.to_ascii_uppercase()).as_deref() {
                                Some("EHLO") => b"250 gated\r\n",
                                Some("DATA") => {
                                    if me == 0 {
                                        let (open, cv) = &*gate;
                                        let guard = open.lock().unwrap();
                                        let _unused =
                                            cv.wait_timeout_while(guard, Duration::from_secs(120), |o| !*o).unwrap();
                                    }
                                    in_data = true;
                                    b"354 go on\r\n"
                                }
                                Some("QUIT") => {
                                    let _ = w.write_all(b"221 bye\r\n");
                                    break;
                                }
                                _ => b"250 ok\r\n",
                            }
                        };
                        if !reply.is_empty() && w.write_all(reply).is_err() {
                            break;
                        }
                        line.clear();
                    }
                    conns.lock().unwrap()[me].closed = true;
                });
            }
        });
        GatedPeer { addr, conns, gate }
    }

    fn conns(&self) -> Vec<PeerConn> {
        self.conns.lock().unwrap().clone()
    }

    fn open(&self) {
        let (open, cv) = &*self.gate;
        *open.lock().unwrap() = true;
        cv.notify_all();
    }
}

/// A shard leader frozen in the middle of a delivery (waiting for the 354
/// to DATA) wakes after a new leader delivered the message: it must not
/// complete its own transaction (docs/delivery.md, "Fencing a paused
/// leader"). Without the fence the peer would accept the message twice.
#[test]
fn paused_leader_does_not_finish_its_delivery() {
    let _serial = cluster_lock();
    let peer = GatedPeer::start();
    let extra = format!(
        "shards = 1\n\n[[route]]\ndomain = \"*\"\nto = \"{}\"\n\n[delivery]\nretry_schedule = [\"1s\"]\n",
        peer.addr
    );
    let (n1, n2, n3) = three_node_cluster(&extra);
    let frozen_id = shards(&n1)[0]["leader"].as_u64().unwrap();
    let (frozen, others): (&Node, Vec<&Node>) = match frozen_id {
        1 => (&n1, vec![&n2, &n3]),
        2 => (&n2, vec![&n1, &n3]),
        _ => (&n3, vec![&n1, &n2]),
    };
    assert!(send_tagged(frozen, "fence-1"));
    wait_for(Duration::from_secs(30), "the leader waiting for 354", || {
        peer.conns().first().is_some_and(|c| c.transcript.contains("DATA\r\n"))
    });
    frozen.send_signal("STOP");
    wait_for(Duration::from_secs(20), "a new leader elected while frozen", || {
        shards(others[0])
            .iter()
            .all(|sh| sh["leader"] != frozen_id && sh["leader"] != 0)
    });
    wait_for(Duration::from_secs(60), "the new leader's delivery", || {
        peer.conns().iter().map(|c| c.completed).sum::<usize>() == 1
    });
    // The woken node gets the 354 at once: its lease is seconds old.
    frozen.send_signal("CONT");
    peer.open();
    wait_for(
        Duration::from_secs(30),
        "the woken node to abandon its transaction",
        || peer.conns()[0].closed,
    );
    let conns = peer.conns();
    let first = &conns[0];
    // It got the 354 and sent the content, but never the final dot.
    assert!(first.transcript.contains("fence-1@tern.test"), "{first:?}");
    assert_eq!(first.completed, 0, "{first:?}");
    assert_eq!(conns.iter().map(|c| c.completed).sum::<usize>(), 1, "{conns:?}");
}

fn u64s(v: &serde_json::Value) -> Vec<u64> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
}

/// Every shard has a leader, no membership change half done, and its
/// actual voters are its placement.
fn settled(rows: &[serde_json::Value]) -> bool {
    rows.iter().all(|sh| {
        let mut voters = u64s(&sh["voters"]);
        let mut replicas = u64s(&sh["replicas"]);
        voters.sort_unstable();
        replicas.sort_unstable();
        sh["leader"] != 0 && sh["joint"] == false && voters == replicas
    })
}

fn control_leader(n: &Node) -> u64 {
    n.ternctl_json(&["status"])["control_leader"].as_u64().unwrap()
}

/// Three nodes with `replicas = 3`: every shard is already at full
/// strength when a fourth node joins, and rebalancing still gives it its
/// share of replicas (three moves at once: `cluster set rebalance_moves 3`). Any node lists every shard and counts every queued
/// message (cluster-wide queries). A SIGKILLed member turns unreachable in
/// `member list`; `member remove` refuses to break a shard's quorum; the
/// dead member is removed and its id can never be added again.
#[test]
fn fourth_node_gets_replicas_and_every_node_sees_every_shard() {
    let _serial = cluster_lock();
    let sink = SmtpSink::start(&[]);
    let closed = closed_port();
    let extra = format!(
        "shards = 4\n\n[[route]]\ndomain = \"*\"\nto = \"{}\"\n\n[[route]]\ndomain = \"stuck.test\"\nto = \"127.0.0.1:{}\"\n\n[delivery]\nretry_schedule = [\"1h\"]\n",
        sink.addr, closed.port
    );
    let (n1, n2, n3) = three_node_cluster(&extra);
    // Mail that stays queued: its route refuses connections.
    for (i, n) in [&n1, &n2, &n3].iter().cycle().take(8).enumerate() {
        send_to(n, "r@stuck.test", &format!("stuck-{i}"));
    }
    // Node 4's three replicas move at once (the default is one at a time).
    for bad in ["0", "65", "x"] {
        let out = n2.ternctl(&["cluster", "set", "rebalance_moves", bad]);
        assert!(!out.status.success(), "rebalance_moves {bad} is refused");
    }
    let set = n2.ternctl_json(&["cluster", "set", "rebalance_moves", "3"]);
    assert_eq!(set["value"], "3", "{set}");
    wait_for(Duration::from_secs(10), "another node reads the setting", || {
        n3.ternctl_json(&["status"])["rebalance_moves"] == 3
    });
    let n4 = Node::cluster_node(4, false, &extra);
    join(&n1, &n4, 4);
    let mut nodes = [n1, n2, n3, n4];
    let started = Instant::now();
    wait_for(Duration::from_secs(150), "node 4 holds its share of replicas", || {
        let members = nodes[0].ternctl_json(&["member", "list"]);
        let counts: Vec<u64> = members
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["replicas"].as_u64().unwrap())
            .collect();
        let rows = shards(&nodes[0]);
        counts.len() == 4
            && counts.iter().max().unwrap() - counts.iter().min().unwrap() <= 1
            && rows.len() == 4
            && settled(&rows)
            && rows.iter().filter(|sh| u64s(&sh["voters"]).contains(&4)).count() >= 2
    });
    eprintln!("rebalanced onto node 4 in {:?}", started.elapsed());
    assert!(send_tagged(&nodes[3], "via-4"));
    assert!(send_tagged(&nodes[0], "via-1"));
    wait_for(Duration::from_secs(30), "mail delivered after rebalancing", || {
        delivered(&sink, "via-4") == 1 && delivered(&sink, "via-1") == 1
    });

    // Node 4 hosts three of the four shards (the others may keep an idle
    // copy of a shard they left until they restart); every node lists and
    // counts all four.
    let local = nodes[3].ternctl_json(&["shard", "list", "--local"]);
    assert_eq!(local.as_array().unwrap().len(), 3, "{local}");
    for n in &nodes {
        wait_for(
            Duration::from_secs(10),
            "every shard listed, every message counted",
            || {
                let rows = shards(n);
                let mut ids: Vec<u64> = rows.iter().map(|sh| sh["shard"].as_u64().unwrap()).collect();
                ids.dedup();
                let summary = n.ternctl_json(&["queue", "summary"]);
                ids.len() == 4
                    && rows.iter().all(|sh| sh["leader"] != 0)
                    && summary["messages"] == 8
                    && summary["domains"]["stuck.test"] == 8
            },
        );
    }

    // A killed member becomes unreachable.
    let ctl = control_leader(&nodes[0]);
    let victim = (1..=4u64).rev().find(|id| *id != ctl).unwrap();
    nodes[(victim - 1) as usize].kill();
    let asked = &nodes[(ctl - 1) as usize];
    wait_for(Duration::from_secs(10), "the killed member unreachable", || {
        asked
            .ternctl_json(&["member", "list"])
            .as_array()
            .unwrap()
            .iter()
            .all(|m| {
                let id = m["id"].as_u64().unwrap();
                m["reachable"] == (id != victim)
            })
    });

    // Removing a replica-mate of the dead node would leave a shard with one
    // reachable replica of three: refused, with the reason.
    let rows = shards(asked);
    let mate = rows
        .iter()
        .map(|sh| u64s(&sh["voters"]))
        .filter(|v| v.contains(&victim))
        .flat_map(|v| v.into_iter())
        .find(|v| *v != victim && *v != ctl)
        .unwrap();
    let out = asked.ternctl(&["member", "remove", "--id", &mate.to_string()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "removing node {mate} was allowed");
    assert!(err.contains("reachable majority") && err.contains("--force"), "{err}");
    assert_eq!(
        asked.ternctl_json(&["member", "list"]).as_array().unwrap().len(),
        4,
        "a refused removal changed the membership"
    );

    // The dead node itself can go: every shard keeps two live replicas.
    let out = asked.ternctl(&["member", "remove", "--id", &victim.to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for(
        Duration::from_secs(60),
        "every shard back at 3 replicas without it",
        || {
            let rows = shards(asked);
            settled(&rows)
                && rows.iter().all(|sh| {
                    let v = u64s(&sh["voters"]);
                    v.len() == 3 && !v.contains(&victim)
                })
        },
    );
    assert!(send_tagged(asked, "after-remove"));
    wait_for(Duration::from_secs(30), "delivery after the removal", || {
        delivered(&sink, "after-remove") == 1
    });

    // Its id is never reused.
    let addr = nodes[(victim - 1) as usize].grpc.to_string();
    let out = asked.ternctl(&["member", "add", "--id", &victim.to_string(), "--addr", &addr]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a removed id was added again");
    assert!(err.contains("never reused"), "{err}");
}

/// `shard move-leader` moves a leadership and the balancer leaves it while
/// the counts stay within its share; a restarted node catches up with the
/// leaders' applied index; removing the control-group leader hands the
/// control group to another node first.
#[test]
fn operator_moves_restart_catch_up_and_control_leader_removal() {
    let _serial = cluster_lock();
    let sink = SmtpSink::start(&[]);
    let extra = format!(
        "shards = 4\n\n[[route]]\ndomain = \"*\"\nto = \"{}\"\n\n[delivery]\nretry_schedule = [\"1s\"]\n",
        sink.addr
    );
    let (n1, n2, n3) = three_node_cluster(&extra);
    let mut nodes = [n1, n2, n3];
    let leads = |rows: &[serde_json::Value]| {
        let mut count: BTreeMap<u64, usize> = (1..=3).map(|n| (n, 0)).collect();
        for sh in rows {
            *count.entry(sh["leader"].as_u64().unwrap()).or_default() += 1;
        }
        count
    };
    // The balancer stops once no node leads more than ceil(4 / 3) = 2.
    wait_for(Duration::from_secs(60), "leaders balanced", || {
        let rows = shards(&nodes[0]);
        settled(&rows) && leads(&rows).values().all(|c| *c <= 2)
    });
    let rows = shards(&nodes[0]);
    let count = leads(&rows);
    // A move that keeps every node within the share of 2.
    let (shard, target) = rows
        .iter()
        .find_map(|sh| {
            let leader = sh["leader"].as_u64().unwrap();
            u64s(&sh["voters"])
                .into_iter()
                .find(|v| *v != leader && count[v] < 2)
                .map(|t| (sh["shard"].as_u64().unwrap(), t))
        })
        .unwrap();
    let out = nodes[0].ternctl(&["shard", "move-leader", &shard.to_string(), &target.to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let leader_of = |n: &Node, shard: u64| {
        shards(n)
            .iter()
            .find(|sh| sh["shard"] == shard)
            .map(|sh| sh["leader"].as_u64().unwrap())
    };
    wait_for(Duration::from_secs(20), "the moved leadership", || {
        leader_of(&nodes[0], shard) == Some(target)
    });
    // Five balancer ticks later it is still there.
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        assert_eq!(leader_of(&nodes[1], shard), Some(target), "the balancer undid the move");
        std::thread::sleep(Duration::from_millis(250));
    }

    // A follower killed, mail committed without it, then restarted: it
    // catches up to the leaders' applied index on every shard.
    let ctl = control_leader(&nodes[0]);
    let k = (1..=3u64).rev().find(|id| *id != ctl).unwrap();
    nodes[(k - 1) as usize].kill();
    let others: Vec<usize> = (0..3).filter(|i| *i as u64 != k - 1).collect();
    let mut tags = Vec::new();
    for i in 0..20 {
        let tag = format!("while-down-{i}");
        let n = &nodes[others[i % 2]];
        let deadline = Instant::now() + Duration::from_secs(30);
        while !send_tagged(n, &tag) {
            assert!(Instant::now() < deadline, "no 250 for {tag}");
            std::thread::sleep(Duration::from_millis(100));
        }
        tags.push(tag);
    }
    wait_for(
        Duration::from_secs(30),
        "mail delivered while the node was down",
        || tags.iter().all(|t| delivered(&sink, t) >= 1),
    );
    let leader_applied: BTreeMap<u64, u64> = shards(&nodes[others[0]])
        .iter()
        .map(|sh| (sh["shard"].as_u64().unwrap(), sh["applied_index"].as_u64().unwrap()))
        .collect();
    nodes[(k - 1) as usize].spawn();
    let restarted = &nodes[(k - 1) as usize];
    wait_for(Duration::from_secs(60), "the restarted node caught up", || {
        let local = restarted.ternctl_json(&["shard", "list", "--local"]);
        let rows = local.as_array().unwrap();
        rows.len() == leader_applied.len()
            && rows
                .iter()
                .all(|sh| sh["applied_index"].as_u64().unwrap() >= leader_applied[&sh["shard"].as_u64().unwrap()])
    });

    // Removing the control leader: the leadership moves, then the removal runs.
    let ctl = control_leader(&nodes[0]);
    let asked = &nodes[(1..=3u64).find(|id| *id != ctl).unwrap() as usize - 1];
    let out = asked.ternctl(&["member", "remove", "--id", &ctl.to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let new_ctl = control_leader(asked);
    assert!(new_ctl != ctl && new_ctl != 0, "control leader still {new_ctl}");
    let ids: Vec<u64> = asked
        .ternctl_json(&["member", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect();
    assert!(!ids.contains(&ctl) && ids.len() == 2, "{ids:?}");
    wait_for(
        Duration::from_secs(60),
        "every shard on the two remaining nodes",
        || {
            let rows = shards(asked);
            settled(&rows) && rows.iter().all(|sh| !u64s(&sh["voters"]).contains(&ctl))
        },
    );
    assert!(send_tagged(asked, "after-ctl-remove"));
    wait_for(
        Duration::from_secs(30),
        "delivery after removing the control leader",
        || delivered(&sink, "after-ctl-remove") == 1,
    );
}

/// `ternctl queue bounce` through a follower while the shard leaders are
/// delivering: mail to example.test is in delivery (the sink answers DATA
/// after 2 s, two connections per site), mail to example.org is deferred
/// (its MX refuses connections; next try in 60 s). Every message gets exactly
/// one outcome: the mail in delivery is delivered once and never reported as
/// bounced, the deferred mail is bounced with exactly one report. Before the
/// fix the bounce was decided on the asked node's replica and hit the
/// messages in flight too: delivered and bounced.
#[test]
fn queue_bounce_during_delivery_gives_one_outcome_per_message() {
    let _serial = cluster_lock();
    let sink = SmtpSink::start(&["-w", "2"]);
    let refused = closed_port();
    let extra = format!(
        "shards = 4\n\n[[route]]\ndomain = \"example.org\"\nto = \"127.0.0.1:{}\"\n\n[[route]]\ndomain = \"*\"\nto = \"{}\"\n\n[delivery]\nretry_schedule = [\"60s\"]\nmax_connections_per_site = 2\n",
        refused.port, sink.addr
    );
    let (n1, n2, n3) = three_node_cluster(&extra);
    let send = |node: &Node, rcpt: &str, tag: &str| {
        let mut c = Client::connect(node.smtp).unwrap();
        c.command("EHLO t.test").unwrap();
        // Ok only after 250.
        c.send_mail("a@tern.test", &[rcpt], &body(tag, 300)).unwrap();
    };
    let nodes = [&n1, &n2, &n3];
    let deferred: Vec<String> = (0..9).map(|i| format!("deferred-{i}")).collect();
    for (i, tag) in deferred.iter().enumerate() {
        send(nodes[i % 3], "c@example.org", tag);
    }
    let in_flight: Vec<String> = (0..12).map(|i| format!("in-flight-{i}")).collect();
    for (i, tag) in in_flight.iter().enumerate() {
        send(nodes[i % 3], "b@example.test", tag);
    }
    // Transactions under way: smtp-sink creates the dump file at MAIL FROM.
    wait_for(Duration::from_secs(30), "deliveries in flight", || {
        std::fs::read_dir(sink.dumps_dir()).map(|d| d.count()).unwrap_or(0) >= 2
    });
    let out = n3.ternctl(&["queue", "bounce", "--sender", "a@tern.test"]);
    assert!(
        out.status.success(),
        "queue bounce: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(Duration::from_secs(90), "every queue empty", || {
        nodes.iter().all(|n| n.queued_ids().is_empty())
    });
    let messages = sink.messages();
    let (reports, deliveries): (Vec<&String>, Vec<&String>) =
        messages.iter().partition(|m| m.contains("multipart/report"));
    let outcome = |tag: &str| {
        let id = format!("<{tag}@tern.test>");
        (
            deliveries.iter().filter(|m| m.contains(&id)).count(),
            reports.iter().filter(|m| m.contains(&id)).count(),
        )
    };
    for tag in &in_flight {
        assert_eq!(outcome(tag), (1, 0), "{tag}: (deliveries, bounce reports)");
    }
    for tag in &deferred {
        assert_eq!(outcome(tag), (0, 1), "{tag}: (deliveries, bounce reports)");
    }
    eprintln!(
        "queue bounce race: {} delivered once, {} bounced once, {} reports in all",
        in_flight.len(),
        deferred.len(),
        reports.len()
    );
    assert_eq!(reports.len(), deferred.len(), "one report per bounced message");
}

/// Issue 21 (defect 7): a replica added after the leader purged its log
/// catches up by a snapshot of several 3 MiB chunks (40 queued messages of
/// 300 KB), installed in batches; made leader, it delivers every message
/// from the bodies it installed, once each.
#[test]
fn a_new_replica_catches_up_by_a_snapshot_of_several_chunks_and_delivers_everything() {
    const MESSAGES: usize = 40;
    let _serial = cluster_lock();
    let sink_port = free_port();
    let extra = format!(
        "shards = 1\n\n[[route]]\ndomain = \"*\"\nto = \"127.0.0.1:{sink_port}\"\n\n[delivery]\nretry_schedule = [\"1h\"]\n"
    );
    // A small log kept behind the newest entries: the leader purges what
    // the first messages were written in, so a newcomer needs a snapshot.
    let keys = "log_segment_mb = 1\nlog_keep_mb = 1";
    let n1 = Node::cluster_node_with_keys(1, true, keys, &extra);
    let n2 = Node::cluster_node_with_keys(2, false, keys, &extra);
    let tags: Vec<String> = (0..MESSAGES).map(|i| format!("snap-{i}")).collect();
    let mut c = Client::connect(n1.smtp).unwrap();
    c.command("EHLO t.test").unwrap();
    for tag in &tags {
        // Errors unless the reply is 250.
        c.send_mail("a@tern.test", &["rcpt@example.test"], &body(tag, 300 * 1024))
            .unwrap();
    }
    // The newcomer will need entries the leader no longer has.
    wait_for(Duration::from_secs(30), "the leader's log of shard 1 purged", || {
        crate::metrics::sum(
            &crate::metrics::scrape(&n1),
            "tern_raft_purged_index",
            &[("group", "1")],
        ) > 1.0
    });
    join(&n1, &n2, 2);
    wait_for(Duration::from_secs(90), "shard 1 on both nodes", || {
        shards(&n1)
            .iter()
            .all(|sh| sh["voters"].as_array().unwrap().len() == 2 && sh["joint"] == false && sh["leader"] != 0)
    });
    let installed = n2
        .logs()
        .lines()
        .any(|l| l.contains("snapshot installed") && l.contains("messages=40"));
    assert!(
        installed,
        "node 2 caught up without a snapshot of the queue:\n{}",
        n2.logs()
    );
    let built = n1
        .logs()
        .lines()
        .find(|l| l.contains("snapshot built for a lagging replica") && l.contains("messages=40"))
        .map(str::to_owned)
        .unwrap_or_default();
    let bytes: u64 = built
        .split_whitespace()
        .find_map(|w| w.strip_prefix("bytes="))
        .and_then(|b| b.parse().ok())
        .unwrap_or(0);
    assert!(bytes > 3 * 3 * 1024 * 1024, "several chunks: {built}");
    assert_eq!(n2.queued_ids().len(), MESSAGES);
    // Node 2 delivers, from what it installed.
    let out = n1.ternctl(&["shard", "move-leader", "1", "2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for(Duration::from_secs(30), "node 2 leads shard 1", || {
        shards(&n1).iter().all(|sh| sh["leader"] == 2)
    });
    let sink = SmtpSink::start_on(sink_port, &[]);
    let out = n2.ternctl(&["queue", "retry", "--domain", "example.test"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for(Duration::from_secs(60), "every message delivered", || {
        n2.queued_ids().is_empty()
    });
    let dumps = sink.messages();
    let mut lost = Vec::new();
    let mut duplicated = Vec::new();
    for tag in &tags {
        let id = format!("<{tag}@tern.test>");
        match dumps.iter().filter(|m| m.contains(&id)).count() {
            0 => lost.push(tag),
            1 => {}
            _ => duplicated.push(tag),
        }
    }
    assert!(lost.is_empty(), "lost: {lost:?}");
    assert!(duplicated.is_empty(), "duplicated: {duplicated:?}");
    for n in [&n1, &n2] {
        let left: Vec<_> = std::fs::read_dir(n.dir().join("data/snapshots"))
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "snapshot files left: {left:?}");
    }
}
