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

/// `ternd` with no arguments, as README.md tells a newcomer: the embedded
/// default listeners, data in ./tern-data, a bootstrapped one-node cluster
/// that ternctl reaches on its default endpoint; README's first message
/// (swaks to you@localhost) lands in the Maildir README names; mail for
/// elsewhere is queued and shown in ternctl's tables; SIGTERM exits 0.
#[test]
fn no_arguments_runs_the_embedded_default() {
    let defaults = ["127.0.0.1:2525", "127.0.0.1:7070", "127.0.0.1:8080"];
    if let Some(busy) = defaults.iter().find(|a| std::net::TcpListener::bind(a).is_err()) {
        // A developer may be running a node; CI machines must have them free.
        assert!(std::env::var_os("CI").is_none(), "{busy} is in use");
        eprintln!("skipped: {busy} is in use on this machine");
        return;
    }
    let mut node = Node::start_embedded_default();
    let lines = node.stdout_lines();
    for line in [
        "listening smtp=127.0.0.1:2525",
        "listening grpc=127.0.0.1:7070",
        "listening http=127.0.0.1:8080",
        "ready",
    ] {
        assert!(lines.iter().any(|l| l == line), "no {line:?} in {lines:?}");
    }
    assert!(node.dir().join("tern-data").is_dir());

    let ctl = |args: &[&str]| {
        let out = std::process::Command::new(ternctl_bin()).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "ternctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let status: serde_json::Value = serde_json::from_str(&ctl(&["status", "-o", "json"])).unwrap();
    assert_eq!(status["node_id"], 1);
    assert_eq!(status["shards"].as_array().unwrap().len(), 16);

    // README's first step, as written there; the message is delivered to
    // the Maildir README tells the reader to look in.
    let swaks = std::process::Command::new("swaks")
        .args([
            "--server",
            "127.0.0.1:2525",
            "--from",
            "you@example.test",
            "--to",
            "you@localhost",
        ])
        .output()
        .expect("swaks is installed by cluster-tests/run-all.sh");
    assert!(swaks.status.success(), "{}", String::from_utf8_lossy(&swaks.stdout));
    let new = node.dir().join("tern-data/maildir/localhost/you/new");
    let delivered = || {
        std::fs::read_dir(&new)
            .map(|d| d.flatten().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    wait_for(Duration::from_secs(20), "README's message in the Maildir", || {
        delivered().len() == 1
    });
    let text = std::fs::read_to_string(delivered()[0].path()).unwrap();
    assert!(
        text.contains("From: you@example.test") && text.contains("To: you@localhost"),
        "{text}"
    );

    // Mail for a domain that cannot be resolved here stays queued (deferred).
    let mut c = Client::connect(node.smtp).unwrap();
    assert!(c.command("EHLO newcomer.test").unwrap().starts_with("250"));
    let id = c
        .send_mail("alice@tern.test", &["bob@nowhere.invalid"], &body("default", 300))
        .unwrap();
    let summary = ctl(&["queue", "summary"]);
    assert!(summary.contains("nowhere.invalid"), "{summary}");
    let list = ctl(&["queue", "list"]);
    assert!(list.contains(&id) && list.contains("alice@tern.test"), "{list}");
    let show = ctl(&["queue", "show", &id]);
    assert!(show.contains("bob@nowhere.invalid") && show.contains(&id), "{show}");
    // The README's message left the queue once its Maildir outcome committed,
    // a moment after the file appeared.
    wait_for(Duration::from_secs(10), "only the deferred message queued", || {
        ctl(&["status"]).contains("queued messages: 1")
    });

    let exit = node.signal_and_wait("TERM", Duration::from_secs(30));
    assert_eq!(exit.code(), Some(0), "{}", node.logs());
}

#[test]
fn ternctl_exit_codes_mean_something() {
    let node = Node::start("");
    let missing = node.ternctl(&["queue", "show", "NOSUCHID"]);
    assert_eq!(missing.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("NOSUCHID"));
    let unreachable = std::process::Command::new(ternctl_bin())
        .args(["--endpoint", &format!("127.0.0.1:{}", free_port()), "status"])
        .output()
        .unwrap();
    assert_eq!(unreachable.status.code(), Some(1));
    let usage = node.ternctl(&["frobnicate"]);
    assert_eq!(usage.status.code(), Some(2));
    // `ternctl status | head -0`: the reader is gone before ternctl writes
    // (it asks the node first); it ends as a SIGPIPE'd tool does, no panic.
    let mut piped = std::process::Command::new(ternctl_bin())
        .args(["--endpoint", &node.grpc.to_string(), "status"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(piped.stdout.take());
    let out = piped.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(141), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn unknown_config_key_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[policy]\nmax_recipents = 500\n").unwrap();
    let out = std::process::Command::new(ternd_bin())
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

/// docs/configuration.md's dual-stack example, `smtp = ["0.0.0.0:P",
/// "[::]:P"]`: both bind on Linux's default `bindv6only = 0` (that IPv6
/// listener is IPv6-only), and each takes mail, over IPv4 and IPv6. HTTP on
/// `[::]:H` alone keeps the system's dual stack: it answers on both.
#[test]
fn ipv4_and_ipv6_wildcards_share_a_port() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let http = free_port();
    let config = dir.path().join("tern.toml");
    std::fs::write(
        &config,
        format!(
            "[node]\nid = 1\nhostname = \"mx1.tern.test\"\ndata_dir = \"{data}\"\n\n\
             [listen]\nsmtp = [\"0.0.0.0:{port}\", \"[::]:{port}\"]\ngrpc = \"127.0.0.1:{grpc}\"\nhttp = \"[::]:{http}\"\n\n\
             [cluster]\nbootstrap = true\n\n{hold}",
            data = dir.path().join("data").display(),
            grpc = free_port(),
            hold = hold_mail(),
        ),
    )
    .unwrap();
    let node = Node::start_config(config);
    let lines = node.stdout_lines();
    for line in [
        format!("listening smtp=0.0.0.0:{port}"),
        format!("listening smtp=[::]:{port}"),
    ] {
        assert!(lines.contains(&line), "no {line:?} in {lines:?}");
    }
    for (client, to) in [("127.0.0.1", "v4@example.test"), ("[::1]", "v6@example.test")] {
        let addr: std::net::SocketAddr = format!("{client}:{port}").parse().unwrap();
        let mut c = Client::connect(addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
        assert!(c.command("EHLO dual.test").unwrap().starts_with("250"));
        c.send_mail("alice@tern.test", &[to], &body("dual", 100))
            .unwrap_or_else(|e| panic!("{addr}: {e}"));
    }
    let summary = node.ternctl_json(&["queue", "summary"]);
    assert_eq!(summary["messages"], 2, "{summary}");
    for client in ["127.0.0.1", "[::1]"] {
        let addr: std::net::SocketAddr = format!("{client}:{http}").parse().unwrap();
        let mut c = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        std::io::Write::write_all(&mut c, b"GET /healthz HTTP/1.0\r\n\r\n").unwrap();
        let mut reply = String::new();
        std::io::Read::read_to_string(&mut c, &mut reply).unwrap();
        assert!(
            reply.starts_with("HTTP/1.0 200") || reply.starts_with("HTTP/1.1 200"),
            "{addr}: {reply}"
        );
    }
}
