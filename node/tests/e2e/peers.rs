//! Peer authentication end to end: a cluster secured with certificates
//! from `ternctl cert`, and a small gRPC client of the test's own (with
//! tern-proto) making the peer RPCs a hostile or confused caller would:
//! each is refused with the status and message an operator would look for,
//! and counted in `tern_peer_refused_total{reason}`. Also the start-up
//! refusal of plaintext gRPC on a non-loopback address.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use openraft::raft::{AppendEntriesRequest, VoteRequest};
use openraft::Vote;
use tern_node::raft::{Request, TypeConfig};
use tern_proto::peer::peer_service_client::PeerServiceClient;
use tern_proto::raft::raft_service_client::RaftServiceClient;
use tern_proto::raft::RaftRequest;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::harness::*;

/// A TLS channel to `node`'s gRPC port presenting `cert`/`key` (None: no
/// client certificate).
async fn channel(node: &Node, identity: Option<(PathBuf, PathBuf)>) -> Channel {
    let pki = test_pki();
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(pki.path("ca.crt")).unwrap()))
        .domain_name("tern-cluster");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(cert).unwrap(),
            std::fs::read(key).unwrap(),
        ));
    }
    Endpoint::from_shared(format!("https://{}", node.grpc))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap()
}

fn node_identity(id: u64) -> Option<(PathBuf, PathBuf)> {
    let pki = test_pki();
    pki.issue_node(id).unwrap();
    Some((pki.path(&format!("node-{id}.crt")), pki.path(&format!("node-{id}.key"))))
}

fn raft_request<T: serde::Serialize>(group: u64, rpc: &T) -> RaftRequest {
    RaftRequest {
        group_id: group,
        payload: bincode::serialize(rpc).unwrap(),
    }
}

fn vote(term: u64, candidate: u64) -> VoteRequest<u64> {
    VoteRequest {
        vote: Vote::new(term, candidate),
        last_log_id: None,
    }
}

fn heartbeat(term: u64, leader: u64) -> AppendEntriesRequest<TypeConfig> {
    AppendEntriesRequest {
        vote: Vote::new_committed(term, leader),
        prev_log_id: None,
        leader_commit: None,
        entries: Vec::new(),
    }
}

fn assert_refused<T: std::fmt::Debug>(what: &str, result: Result<T, tonic::Status>, code: tonic::Code, words: &[&str]) {
    let status = match result {
        Ok(r) => panic!("{what}: accepted ({r:?})"),
        Err(s) => s,
    };
    assert_eq!(status.code(), code, "{what}: {status:?}");
    for w in words {
        assert!(
            status.message().contains(w),
            "{what}: {:?} lacks {w:?}",
            status.message()
        );
    }
}

fn refused_count(node: &Node, reason: &str) -> f64 {
    let (_, text) = crate::metrics::get_metrics(node.http, None);
    text.lines()
        .filter(|l| l.starts_with("tern_peer_refused_total{") && l.contains(&format!("reason=\"{reason}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A two-node cluster on `ternctl cert` certificates carries mail, and
/// refuses: a non-member's Vote, a member claiming another's leadership,
/// an operator's and an anonymous caller's peer RPCs, a Forward that is not
/// one new message, an operation for the wrong group, and creating a group
/// not placed on the node asked.
#[test]
fn peer_rpcs_are_refused_unless_from_a_member_speaking_for_itself() {
    let _serial = cluster_lock();
    let sink = SmtpSink::start(&[]);
    let extra = format!("shards = 2\n\n[[route]]\ndomain = \"*\"\nto = \"{}\"\n", sink.addr);
    let n1 = Node::cluster_node(1, true, &extra);
    let n2 = Node::cluster_node(2, false, &extra);
    let out = n1.ternctl(&["member", "add", "--id", "2", "--addr", &n2.grpc.to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for(Duration::from_secs(60), "both shards on two voters", || {
        let shards = n1.ternctl_json(&["shard", "list"]);
        shards
            .as_array()
            .unwrap()
            .iter()
            .all(|sh| sh["voters"].as_array().unwrap().len() == 2 && sh["joint"] == false && sh["leader"] != 0)
    });
    // Mail flows on the secured cluster (through node 2, forwarded or not).
    let mut c = Client::connect(n2.smtp).unwrap();
    c.command("EHLO t.test").unwrap();
    // Ok only on 250, with the queue id.
    c.send_mail("a@tern.test", &["b@example.test"], &body("peers-1", 300))
        .unwrap();
    wait_for(Duration::from_secs(30), "delivery", || {
        sink.messages().iter().any(|m| m.contains("<peers-1@tern.test>"))
    });
    // A node started but never added: it knows no members yet.
    let n3 = Node::cluster_node(3, false, &extra);

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // A certificate for a node that is not a member.
        let mut stranger = RaftServiceClient::new(channel(&n1, node_identity(99)).await);
        assert_refused(
            "Vote from node 99",
            stranger.vote(raft_request(0, &vote(1_000, 99))).await,
            tonic::Code::Unavailable,
            &["node 99", "not a member"],
        );
        // A member's certificate claiming another member's leadership.
        let mut n2_cert = RaftServiceClient::new(channel(&n1, node_identity(2)).await);
        assert_refused(
            "AppendEntries from node 2 as leader 1",
            n2_cert.append_entries(raft_request(1, &heartbeat(1_000, 1))).await,
            tonic::Code::PermissionDenied,
            &["names node 2", "claims node 1"],
        );
        assert_refused(
            "Vote from node 2 for candidate 1",
            n2_cert.vote(raft_request(0, &vote(1_000, 1))).await,
            tonic::Code::PermissionDenied,
            &["names node 2", "claims node 1"],
        );
        // An operator's certificate is not a node's.
        let pki = test_pki();
        let operator = Some(pki.issue_client("ops", "admin").unwrap());
        let mut op_peer = PeerServiceClient::new(channel(&n1, operator.clone()).await);
        assert_refused(
            "Ping with an operator certificate",
            op_peer.ping(tern_proto::peer::PingRequest {}).await,
            tonic::Code::PermissionDenied,
            &["tern://client/admin/ops", "node certificate"],
        );
        let mut op_raft = RaftServiceClient::new(channel(&n1, operator).await);
        assert_refused(
            "Vote with an operator certificate",
            op_raft.vote(raft_request(0, &vote(1_000, 1))).await,
            tonic::Code::PermissionDenied,
            &["operator certificate"],
        );
        // No client certificate at all.
        let mut anonymous = PeerServiceClient::new(channel(&n1, None).await);
        assert_refused(
            "LocalStatus without a certificate",
            anonymous.local_status(tern_proto::peer::LocalStatusRequest {}).await,
            tonic::Code::PermissionDenied,
            &["node certificate"],
        );
        // Forward carries one new message, never another state-machine request.
        let mut peer = PeerServiceClient::new(channel(&n1, node_identity(2)).await);
        let set_node = Request::SetNode {
            id: 66,
            addr: "10.6.6.6:7070".into(),
        };
        assert_refused(
            "Enqueue carrying SetNode",
            peer.enqueue(tern_proto::peer::EnqueueRequest {
                group_id: 1,
                message: bincode::serialize(&set_node).unwrap(),
                hop: true,
            })
            .await,
            tonic::Code::InvalidArgument,
            &["not one new message"],
        );
        let mut raw_enqueue = bincode::serialize(&Request::SetShardReplicas {
            shard: 1,
            replicas: vec![66],
        })
        .unwrap();
        raw_enqueue.extend_from_slice(&[0; 64]);
        assert_refused(
            "Enqueue to the control group",
            peer.enqueue(tern_proto::peer::EnqueueRequest {
                group_id: 0,
                message: raw_enqueue,
                hop: true,
            })
            .await,
            tonic::Code::InvalidArgument,
            &["control group"],
        );
        let drain_on_shard = tern_node::peer::Operation::Drain { node: 1, drained: true };
        assert_refused(
            "a drain written to a queue shard",
            peer.operation(tern_proto::peer::OperationRequest {
                group_id: 1,
                operation: bincode::serialize(&drain_on_shard).unwrap(),
            })
            .await,
            tonic::Code::InvalidArgument,
            &["control group", "not to group 1"],
        );
        // A group not placed on the node asked is not created there.
        let mut to_n3 = RaftServiceClient::new(channel(&n3, node_identity(1)).await);
        assert_refused(
            "AppendEntries for shard 1 on node 3",
            to_n3.append_entries(raft_request(1, &heartbeat(1_000, 1))).await,
            tonic::Code::FailedPrecondition,
            &["group 1 is not placed on node 3"],
        );
        assert_refused(
            "AppendEntries for group 4000",
            to_n3.append_entries(raft_request(4_000, &heartbeat(1_000, 1))).await,
            tonic::Code::NotFound,
            &["group 4000 does not exist"],
        );
    });
    for (node, reason) in [
        (&n1, "unknown_node"),
        (&n1, "forged_id"),
        (&n1, "operator_certificate"),
        (&n1, "no_certificate"),
        (&n3, "group_not_placed"),
    ] {
        assert!(
            refused_count(node, reason) >= 1.0,
            "tern_peer_refused_total{{reason={reason:?}}}"
        );
    }
    let hosted = n3.ternctl_json(&["shard", "list", "--local"]);
    assert_eq!(
        hosted.as_array().map(Vec::len),
        Some(0),
        "node 3 created a shard: {hosted}"
    );
    // The cluster is unharmed: still one leader per shard, mail still flows.
    c.send_mail("a@tern.test", &["b@example.test"], &body("peers-2", 300))
        .unwrap();
    wait_for(Duration::from_secs(30), "delivery after the refusals", || {
        sink.messages().iter().any(|m| m.contains("<peers-2@tern.test>"))
    });
    // A former shard leader's outcomes (it delivered, then lost leadership
    // before writing that down) reach the new leader as an operation: the
    // message leaves the queue and is not delivered again. Not to the
    // control group, and a report must be a well-formed new message.
    n1.ternctl_json(&["domain", "suspend", "held.test", "--duration", "1h", "--reason", "test"]);
    for n in [&n1, &n2] {
        wait_for(Duration::from_secs(10), "the suspension on every node", || {
            n.ternctl_json(&["domain", "list"])
                .as_array()
                .is_some_and(|d| d.len() == 1)
        });
    }
    let held_id = c
        .send_mail("a@tern.test", &["r@held.test"], &body("peers-3", 300))
        .unwrap();
    let shown = n1.ternctl_json(&["queue", "show", &held_id]);
    let shard = shown["shard"].as_u64().unwrap();
    let leader = n1
        .ternctl_json(&["shard", "list"])
        .as_array()
        .unwrap()
        .iter()
        .find(|sh| sh["shard"] == shard)
        .map(|sh| sh["leader"].as_u64().unwrap())
        .unwrap();
    let (to, from) = if leader == 1 { (&n1, 2) } else { (&n2, 1) };
    let delivered = tern_node::peer::Operation::Outcomes {
        updates: vec![tern_node::raft::OutcomeUpdate {
            id: held_id.clone(),
            results: vec![tern_node::raft::RcptResult {
                index: 0,
                status: tern_node::queue::message::RcptStatus::Delivered,
                reply: "250 2.0.0 delivered by the former leader".into(),
            }],
            attempts: 1,
            next_attempt: 0,
            delay_notified: false,
        }],
        bounces: vec![],
    };
    rt.block_on(async {
        let mut peer = PeerServiceClient::new(channel(to, node_identity(from)).await);
        assert_refused(
            "outcomes written to the control group",
            peer.operation(tern_proto::peer::OperationRequest {
                group_id: 0,
                operation: bincode::serialize(&delivered).unwrap(),
            })
            .await,
            tonic::Code::InvalidArgument,
            &["a queue shard", "not to group 0"],
        );
        peer.operation(tern_proto::peer::OperationRequest {
            group_id: shard,
            operation: bincode::serialize(&delivered).unwrap(),
        })
        .await
        .unwrap();
    });
    wait_for(Duration::from_secs(10), "the message recorded as delivered", || {
        n1.ternctl(&["queue", "show", &held_id]).status.code() == Some(3)
    });
    n1.ternctl_json(&["domain", "resume", "held.test"]);
    for n in [&n1, &n2] {
        wait_for(Duration::from_secs(10), "the resume on every node", || {
            n.ternctl_json(&["domain", "list"])
                .as_array()
                .is_some_and(|d| d.is_empty())
        });
    }
    let after = c
        .send_mail("a@tern.test", &["r@held.test"], &body("peers-4", 300))
        .unwrap();
    wait_for(Duration::from_secs(30), "delivery after the resume", || {
        sink.messages().iter().any(|m| m.contains("<peers-4@tern.test>"))
    });
    assert!(
        !sink.messages().iter().any(|m| m.contains("<peers-3@tern.test>")),
        "the message recorded as delivered was delivered again ({after})"
    );
    // An operator's `member add` through a node that does not lead the
    // control group reaches the leader as a peer operation; node 3 then
    // takes the replicas placed on it (groups created where placed).
    let leader = n1.ternctl_json(&["status"])["control_leader"].as_u64().unwrap();
    let via = if leader == 1 { &n2 } else { &n1 };
    let added = via.ternctl_json(&["member", "add", "--id", "3", "--addr", &n3.grpc.to_string()]);
    assert_eq!(added["role"], "voter", "{added}");
    wait_for(Duration::from_secs(90), "node 3 hosting both shards", || {
        n3.ternctl_json(&["shard", "list", "--local"]).as_array().map(Vec::len) == Some(2)
    });
}

/// `listen.grpc` on a non-loopback address without cluster TLS: ternd
/// refuses to start and says why; with `[cluster] insecure = true` it
/// starts and warns.
#[test]
fn plaintext_grpc_on_a_public_address_needs_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let config = |insecure: bool| {
        let port = free_port();
        let path = dir.path().join(format!("tern-{insecure}.toml"));
        let toml = format!(
            "[node]\nid = 1\ndata_dir = \"{}\"\n\n[listen]\nsmtp = [\"127.0.0.1:0\"]\ngrpc = \"0.0.0.0:{port}\"\nhttp = \"127.0.0.1:0\"\n\n[cluster]\nbootstrap = true\nshards = 1\nadvertise_grpc = \"127.0.0.1:{port}\"\n{}",
            dir.path().join(format!("data-{insecure}")).display(),
            if insecure { "insecure = true\n" } else { "" }
        );
        std::fs::write(&path, toml).unwrap();
        path
    };
    let refused = Command::new(ternd_bin())
        .arg("--config")
        .arg(config(false))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("cluster.insecure") && err.contains("not a loopback address") && err.contains("ternctl cert"),
        "{err}"
    );
    assert!(!String::from_utf8_lossy(&refused.stdout).contains("ready"));

    let mut node = Node::start_config(config(true));
    assert!(
        node.logs()
            .contains("cluster gRPC is plaintext on a non-loopback address"),
        "{}",
        node.logs()
    );
    node.kill();
}

/// The serial of the certificate `addr` presents (openssl s_client, no
/// client certificate: the server asks for one but does not require it).
fn served_serial(addr: std::net::SocketAddr) -> Option<String> {
    let mut s_client = Command::new("openssl")
        .args(["s_client", "-connect", &addr.to_string(), "-servername", "tern-cluster"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let x509 = Command::new("openssl")
        .args(["x509", "-noout", "-serial"])
        .stdin(s_client.stdout.take()?)
        .output()
        .ok()?;
    let _ = s_client.wait();
    String::from_utf8_lossy(&x509.stdout)
        .trim()
        .strip_prefix("serial=")
        .map(str::to_owned)
}

fn file_serial(cert: &std::path::Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-in"])
        .arg(cert)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .trim_start_matches("serial=")
        .to_owned()
}

/// Node certificates replaced in a running 3-node cluster (re-issued by
/// `ternctl cert` for the same ids) are served to new connections within a
/// few seconds, without a restart, and mail still flows; SIGHUP reloads too.
#[test]
fn replaced_node_certificates_are_served_without_a_restart() {
    let _serial = cluster_lock();
    // This test's own CA: it rewrites its nodes' certificate files.
    let pki = tern_testkit::pki::TestPki::with_workspace_ternctl().unwrap();
    let node_dir = tempfile::tempdir().unwrap();
    let sink = SmtpSink::start(&[]);
    let nodes: Vec<Node> = (1..=3)
        .map(|id| {
            pki.issue_node(id).unwrap();
            for ext in ["crt", "key"] {
                std::fs::copy(
                    pki.path(&format!("node-{id}.{ext}")),
                    node_dir.path().join(format!("node-{id}.{ext}")),
                )
                .unwrap();
            }
            let extra = format!(
                "tls_cert = \"{dir}/node-{id}.crt\"\ntls_key = \"{dir}/node-{id}.key\"\ntls_ca = \"{ca}\"\nshards = 3\n\n[[route]]\ndomain = \"*\"\nto = \"{sink}\"\n",
                dir = node_dir.path().display(),
                ca = pki.path("ca.crt").display(),
                sink = sink.addr
            );
            let mut n = Node::start_node(id, id == 1, &extra);
            n.ternctl_env = pki.ternctl_env();
            n
        })
        .collect();
    for (i, n) in nodes.iter().enumerate().skip(1) {
        let out = nodes[0].ternctl(&[
            "member",
            "add",
            "--id",
            &(i + 1).to_string(),
            "--addr",
            &n.grpc.to_string(),
        ]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    wait_for(Duration::from_secs(90), "every shard on 3 voters", || {
        let shards = nodes[0].ternctl_json(&["shard", "list"]);
        shards
            .as_array()
            .unwrap()
            .iter()
            .all(|sh| sh["voters"].as_array().unwrap().len() == 3 && sh["joint"] == false && sh["leader"] != 0)
    });
    let before = served_serial(nodes[0].grpc).expect("a served certificate");
    assert_eq!(before, file_serial(&node_dir.path().join("node-1.crt")));

    // Re-issue every node's certificate (same CA, same ids) into a fresh
    // directory with ternctl cert, then replace the files the nodes use
    // (rename: a node never reads a half-written file).
    let again = tempfile::tempdir().unwrap();
    for f in ["ca.crt", "ca.key"] {
        std::fs::copy(pki.path(f), again.path().join(f)).unwrap();
    }
    for id in 1..=3u64 {
        let out = Command::new(ternctl_bin())
            .args(["cert", "node", "--dir"])
            .arg(again.path())
            .args(["--id", &id.to_string(), "--host", "127.0.0.1"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        for ext in ["key", "crt"] {
            let tmp = node_dir.path().join(format!(".node-{id}.{ext}.new"));
            std::fs::copy(again.path().join(format!("node-{id}.{ext}")), &tmp).unwrap();
            std::fs::rename(&tmp, node_dir.path().join(format!("node-{id}.{ext}"))).unwrap();
        }
    }
    for (i, n) in nodes.iter().enumerate() {
        let want = file_serial(&node_dir.path().join(format!("node-{}.crt", i + 1)));
        assert_ne!(want, before);
        wait_for(Duration::from_secs(15), "the new certificate served", || {
            served_serial(n.grpc).as_deref() == Some(want.as_str())
        });
    }
    assert!(nodes[0].logs().contains("cluster TLS reloaded"), "{}", nodes[0].logs());
    // Mail still flows, through every node (forwarding makes new peer connections).
    for (i, n) in nodes.iter().enumerate() {
        let mut c = Client::connect(n.smtp).unwrap();
        c.command("EHLO t.test").unwrap();
        c.send_mail("a@tern.test", &["b@example.test"], &body(&format!("reload-{i}"), 300))
            .unwrap();
    }
    wait_for(Duration::from_secs(60), "every message delivered", || {
        let msgs = sink.messages();
        (0..3).all(|i| msgs.iter().any(|m| m.contains(&format!("<reload-{i}@tern.test>"))))
    });
    // SIGHUP reloads on demand too.
    nodes[1].send_signal("HUP");
    wait_for(Duration::from_secs(10), "a reload on SIGHUP", || {
        nodes[1].logs().matches("cluster TLS reloaded").count() >= 2
    });
}
