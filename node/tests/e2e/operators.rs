//! Operator authentication, roles and audit end to end (docs/security.md,
//! "Operators"): a real ternd with `[[admin_token]]` entries or cluster TLS
//! from `ternctl cert`, driven by the real ternctl binary.

use std::process::{Command, Output};
use std::time::Duration;

use crate::harness::*;

/// ternctl's exit code for "not permitted" (unauthenticated or role too low).
const NOT_PERMITTED: i32 = 4;

/// ternctl against `node` with exactly the environment `env` adds (no
/// TERN_TOKEN or TERN_TLS_* from the test's own environment).
pub(crate) fn ctl(node: &Node, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = Command::new(ternctl_bin());
    for var in ["TERN_TOKEN", "TERN_TLS_CA", "TERN_TLS_CERT", "TERN_TLS_KEY"] {
        cmd.env_remove(var);
    }
    cmd.arg("--endpoint")
        .arg(node.grpc.to_string())
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run ternctl")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[track_caller]
fn assert_ok(out: &Output, what: &str) {
    assert!(out.status.success(), "{what}: {}", stderr(out));
}

#[track_caller]
fn assert_refused(out: &Output, what: &str, says: &[&str]) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(NOT_PERMITTED), "{what}: {err}");
    for s in says {
        assert!(err.contains(s), "{what}: expected {s:?} in {err}");
    }
}

/// The `fields` of every `admin` event in the node's JSON log so far.
fn admin_events(node: &Node) -> Vec<serde_json::Value> {
    node.logs()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["target"] == "tern::event" && l["fields"]["event"] == "admin")
        .map(|l| l["fields"].clone())
        .collect()
}

/// Waits for an `admin` event matching `want` (field -> value) and returns it.
#[track_caller]
fn admin_event(node: &Node, want: &[(&str, serde_json::Value)]) -> serde_json::Value {
    let mut found = None;
    let matches = |e: &serde_json::Value| want.iter().all(|(k, v)| &e[*k] == v);
    wait_for(
        std::time::Duration::from_secs(5),
        &format!("admin event {want:?}"),
        || {
            found = admin_events(node).into_iter().find(|e| matches(e));
            found.is_some()
        },
    );
    found.expect("event")
}

fn queue_one(node: &Node, tag: &str) -> String {
    let mut c = Client::connect(node.smtp).expect("connect");
    c.command("EHLO operators.test").expect("EHLO");
    c.send_mail("a@tern.test", &["r@example.test"], &body(tag, 300))
        .expect("queued")
}

fn queued(node: &Node, env: &[(&str, &str)], id: &str) -> bool {
    let out = ctl(node, env, &["queue", "list", "-o", "json"]);
    assert_ok(&out, "queue list");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    v["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .any(|m| m["id"] == id)
}

#[test]
fn tokens_authenticate_and_roles_limit_what_each_may_do() {
    let tokens = [
        ("boss", "admin", "admin-3b1f9c0e5d"),
        ("ops", "operator", "operator-7a2c44e1"),
        ("look", "viewer", "viewer-c0ffee1234"),
    ];
    let mut extra = "[log]\nformat = \"json\"\n\n".to_owned();
    for (name, role, secret) in tokens {
        extra.push_str(&format!(
            "[[admin_token]]\nname = \"{name}\"\nrole = \"{role}\"\nhash = \"{}\"\n\n",
            hash_password(secret)
        ));
    }
    // `ternctl token new` makes a token and the entry to paste.
    let made = Command::new(ternctl_bin())
        .args(["token", "new", "--name", "dash", "--role", "viewer", "-o", "json"])
        .output()
        .expect("ternctl token new");
    assert_ok(&made, "token new");
    let made: serde_json::Value = serde_json::from_slice(&made.stdout).expect("json");
    let made_token = made["token"].as_str().expect("token").to_owned();
    assert!(made_token.len() >= 43, "{made}");
    extra.push_str(&format!(
        "[[admin_token]]\nname = \"dash\"\nrole = \"viewer\"\nhash = \"{}\"\n\n",
        made["hash"].as_str().expect("hash")
    ));
    extra.push_str(&hold_mail());
    let node = Node::start(&extra);
    let id = queue_one(&node, "op-token-1");
    let admin = [("TERN_TOKEN", tokens[0].2)];
    let viewer = [("TERN_TOKEN", tokens[2].2)];
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("ops.token");
    std::fs::write(&token_file, format!("{}\n", tokens[1].2)).expect("token file");
    std::fs::set_permissions(&token_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod");
    let file = token_file.display().to_string();
    let operator = |args: &[&str]| {
        let mut all = vec!["--token-file", file.as_str()];
        all.extend(args);
        ctl(&node, &[], &all)
    };

    // No token, even on loopback, once tokens are configured.
    assert_refused(
        &ctl(&node, &[], &["status"]),
        "status without a token",
        &["--token-file", "TERN_TOKEN"],
    );
    // A wrong token: no hint which part was wrong.
    let wrong = ctl(&node, &[("TERN_TOKEN", "viewer-c0ffee1235")], &["status"]);
    assert_refused(&wrong, "a wrong token", &["invalid token"]);

    assert_ok(
        &ctl(&node, &[("TERN_TOKEN", made_token.as_str())], &["status"]),
        "a token from ternctl token new",
    );
    // A token file other users may read works, with a warning.
    let loose = dir.path().join("loose.token");
    std::fs::write(&loose, format!("{}\n", tokens[2].2)).expect("token file");
    std::fs::set_permissions(&loose, std::os::unix::fs::PermissionsExt::from_mode(0o644)).expect("chmod");
    let out = ctl(&node, &[], &["--token-file", &loose.display().to_string(), "status"]);
    assert_ok(&out, "a token file readable by others");
    assert!(stderr(&out).contains("readable by other users"), "{}", stderr(&out));

    // The viewer reads, but may not delete or read bodies.
    assert_ok(&ctl(&node, &viewer, &["status"]), "viewer status");
    assert!(queued(&node, &viewer, &id));
    assert_ok(&ctl(&node, &viewer, &["queue", "show", &id]), "viewer queue show");
    assert_ok(
        &ctl(&node, &viewer, &["shaping", "show", "example.test"]),
        "viewer shaping show",
    );
    assert_refused(
        &ctl(&node, &viewer, &["queue", "delete", &id]),
        "viewer queue delete",
        &["look", "viewer", "operator"],
    );
    assert!(queued(&node, &viewer, &id), "a refused delete left the message queued");
    // The suppression list: the viewer reads it, the operator changes it.
    assert_refused(
        &ctl(&node, &viewer, &["suppression", "add", "x@example.test"]),
        "viewer suppression add",
        &["look", "needs role operator"],
    );
    assert_ok(
        &ctl(&node, &viewer, &["suppression", "list"]),
        "viewer suppression list",
    );
    assert_ok(
        &ctl(&node, &viewer, &["suppression", "export"]),
        "viewer suppression export",
    );
    assert_ok(
        &operator(&["suppression", "add", "x@example.test"]),
        "operator suppression add",
    );
    assert_ok(
        &operator(&["suppression", "remove", "x@example.test"]),
        "operator suppression remove",
    );
    assert_refused(
        &ctl(&node, &viewer, &["queue", "show", &id, "--body"]),
        "viewer queue show --body",
        &["look", "needs role operator"],
    );

    // The operator (token from a file) reads bodies and deletes, but may not change membership.
    assert_refused(
        &operator(&["member", "add", "--id", "2", "--addr", "127.0.0.1:9"]),
        "operator member add",
        &["ops", "needs role admin"],
    );
    let show = operator(&["queue", "show", &id, "--body"]);
    assert_ok(&show, "operator queue show --body");
    assert!(String::from_utf8_lossy(&show.stdout).contains("op-token-1"));
    assert_ok(&operator(&["queue", "delete", &id]), "operator queue delete");
    assert!(!queued(&node, &viewer, &id), "deleted");

    // The admin may do everything, membership included.
    assert_ok(&ctl(&node, &admin, &["member", "list"]), "admin member list");
    assert_ok(
        &ctl(&node, &admin, &["shard", "move-leader", "1", "1"]),
        "admin move leader",
    );
    assert_ok(
        &ctl(
            &node,
            &admin,
            &["domain", "suspend", "example.test", "--reason", "audit me"],
        ),
        "admin domain suspend",
    );
    assert_ok(
        &ctl(&node, &admin, &["domain", "resume", "example.test"]),
        "admin domain resume",
    );

    // Audit: who, how, what, which, how many, and how it ended.
    let refused = admin_event(
        &node,
        &[
            ("action", "queue delete".into()),
            ("who", "look".into()),
            ("result", "refused".into()),
        ],
    );
    assert_eq!(refused["how"], "token");
    assert!(refused["selection"].as_str().unwrap().contains(&id), "{refused}");
    assert!(
        refused["error"].as_str().unwrap().contains("needs role operator"),
        "{refused}"
    );
    assert!(refused["peer"].as_str().unwrap().starts_with("127.0.0.1:"), "{refused}");
    let deleted = admin_event(
        &node,
        &[
            ("action", "queue delete".into()),
            ("who", "ops".into()),
            ("affected", 1.into()),
        ],
    );
    assert_eq!(deleted["result"], "ok");
    assert_eq!(deleted["role"], "operator");
    // ternctl sends the selected ids shard by shard: the audit names both.
    let selection = deleted["selection"].as_str().unwrap();
    assert!(selection.starts_with(&format!("ids={id} shard=")), "{selection}");
    admin_event(
        &node,
        &[
            ("action", "queue show --body".into()),
            ("who", "ops".into()),
            ("result", "ok".into()),
        ],
    );
    admin_event(
        &node,
        &[
            ("action", "member add".into()),
            ("who", "ops".into()),
            ("result", "refused".into()),
        ],
    );
    admin_event(
        &node,
        &[
            ("action", "move leader".into()),
            ("who", "boss".into()),
            ("result", "ok".into()),
        ],
    );
    let suspend = admin_event(&node, &[("action", "domain suspend".into()), ("who", "boss".into())]);
    assert!(
        suspend["selection"].as_str().unwrap().contains("domain=example.test"),
        "{suspend}"
    );
    admin_event(&node, &[("action", "domain resume".into()), ("who", "boss".into())]);
    // Reads are not audited.
    assert!(
        !admin_events(&node)
            .iter()
            .any(|e| e["action"] == "status" || e["action"] == "queue list"),
        "read-only calls are not audited"
    );
}

#[test]
fn client_certificates_carry_roles_and_a_node_certificate_is_not_an_operator_credential() {
    let pki = tempfile::tempdir().expect("tempdir");
    let d = pki.path().display().to_string();
    for args in [
        vec!["cert", "init-ca", "--dir", &d],
        vec!["cert", "node", "--dir", &d, "--id", "1", "--host", "127.0.0.1"],
        vec!["cert", "client", "--dir", &d, "--name", "vera", "--role", "viewer"],
        vec!["cert", "client", "--dir", &d, "--name", "root", "--role", "admin"],
    ] {
        let out = Command::new(ternctl_bin()).args(&args).output().expect("ternctl cert");
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    }
    let node = Node::start(&format!(
        "tls_cert = \"{d}/node-1.crt\"\ntls_key = \"{d}/node-1.key\"\ntls_ca = \"{d}/ca.crt\"\n\n[log]\nformat = \"json\"\n\n{}",
        hold_mail()
    ));
    let id = queue_one(&node, "op-cert-1");
    let files = |stem: &str| {
        [
            ("TERN_TLS_CA".to_owned(), format!("{d}/ca.crt")),
            ("TERN_TLS_CERT".to_owned(), format!("{d}/{stem}.crt")),
            ("TERN_TLS_KEY".to_owned(), format!("{d}/{stem}.key")),
        ]
    };
    let (viewer, admin, node_cert) = (files("client-vera"), files("client-root"), files("node-1"));
    let env = |f: &[(String, String); 3]| -> Vec<(String, String)> { f.to_vec() };
    let run = |f: &[(String, String); 3], args: &[&str]| {
        let e = env(f);
        let pairs: Vec<(&str, &str)> = e.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        ctl(&node, &pairs, args)
    };

    assert_ok(&run(&viewer, &["status"]), "viewer certificate: status");
    assert_ok(&run(&viewer, &["queue", "list"]), "viewer certificate: queue list");
    assert_refused(
        &run(&viewer, &["queue", "delete", &id]),
        "viewer certificate: queue delete",
        &["vera", "viewer", "needs role operator"],
    );
    let show = run(&admin, &["queue", "show", &id, "--body"]);
    assert_ok(&show, "admin certificate: queue show --body");
    assert!(String::from_utf8_lossy(&show.stdout).contains("op-cert-1"));
    assert_ok(&run(&admin, &["member", "list"]), "admin certificate: member list");

    // The node's own certificate is refused for an operator's call, with or without a token.
    let member_add = ["member", "add", "--id", "2", "--addr", "127.0.0.1:9"];
    assert_refused(
        &run(&node_cert, &member_add),
        "node certificate: member add",
        &["a node certificate is not an operator credential"],
    );
    let mut with_token: Vec<(&str, &str)> = node_cert.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    with_token.push(("TERN_TOKEN", "anything"));
    assert_refused(
        &ctl(&node, &with_token, &["status"]),
        "node certificate with a token",
        &["a node certificate is not an operator credential"],
    );
    assert_eq!(
        run(&admin, &["member", "list", "-o", "json"])
            .stdout
            .iter()
            .filter(|b| **b == b'{')
            .count(),
        1,
        "still one member"
    );

    let refused = admin_event(
        &node,
        &[
            ("action", "member add".into()),
            ("who", "node 1".into()),
            ("result", "refused".into()),
        ],
    );
    assert_eq!(refused["selection"], "id=2 addr=127.0.0.1:9");
    let viewer_delete = admin_event(
        &node,
        &[
            ("action", "queue delete".into()),
            ("who", "vera".into()),
            ("result", "refused".into()),
        ],
    );
    assert_eq!(viewer_delete["how"], "certificate");
    let body = admin_event(&node, &[("action", "queue show --body".into()), ("who", "root".into())]);
    assert_eq!(body["how"], "certificate");
    assert_eq!(body["result"], "ok");
}

#[test]
fn a_non_loopback_node_without_credentials_refuses_every_operator_call() {
    let port = free_port();
    let mut node = Node::start_with_listen(
        1,
        true,
        &format!("grpc = \"0.0.0.0:{port}\""),
        &format!(
            "insecure = true\nadvertise_grpc = \"127.0.0.1:{port}\"\n\n{}",
            hold_mail()
        ),
    );
    // Traffic stays on loopback: the wildcard listener is reached at 127.0.0.1.
    node.grpc = format!("127.0.0.1:{port}").parse().expect("addr");
    let id = queue_one(&node, "op-open-1");
    for args in [
        vec!["status"],
        vec!["queue", "list"],
        vec!["queue", "show", &id],
        vec!["member", "list"],
        vec!["domain", "list"],
        vec!["shaping", "show", "example.test"],
        vec!["stats"],
        vec!["queue", "delete", &id],
        vec!["member", "add", "--id", "2", "--addr", "127.0.0.1:9"],
    ] {
        assert_refused(&ctl(&node, &[], &args), &format!("{args:?}"), &["--token-file"]);
    }
    // A token is no credential here either (the node has none configured);
    // sent in plaintext to a non-loopback address, ternctl warns.
    let out = Command::new(ternctl_bin())
        .args(["--endpoint", &format!("0.0.0.0:{port}"), "status"])
        .env("TERN_TOKEN", "guess")
        .output()
        .expect("ternctl");
    assert_refused(
        &out,
        "a token on a node without tokens",
        &["plaintext", "requires an operator credential"],
    );
}

/// Two nodes (`extra` on both, ternctl as `admin`) with node 1 leading both
/// shards; then `queue bounce` asked of node 2 as `operator` (whose name is
/// `who`) must run on node 1, the shard leader, on the operator's behalf.
/// Returns the admin event node 1 wrote.
fn bounce_relayed_to_the_shard_leader(
    extra: [&str; 2],
    admin: &[(String, String)],
    operator: &[(&str, &str)],
    who: &str,
) -> serde_json::Value {
    let mut n1 = Node::start_node(1, true, extra[0]);
    let mut n2 = Node::start_node(2, false, extra[1]);
    n1.ternctl_env = admin.to_vec();
    n2.ternctl_env = admin.to_vec();
    crate::cluster::join(&n1, &n2, 2);
    wait_for(Duration::from_secs(60), "both shards on two voters", || {
        crate::cluster::shards(&n1).iter().all(|sh| {
            sh["voters"].as_array().is_some_and(|v| v.len() == 2) && sh["joint"] == false && sh["leader"] != 0
        })
    });
    for shard in ["1", "2"] {
        assert_ok(&n1.ternctl(&["shard", "move-leader", shard, "1"]), "move leader");
    }
    wait_for(Duration::from_secs(30), "node 1 leads both shards", || {
        crate::cluster::shards(&n1).iter().all(|sh| sh["leader"] == 1)
    });
    let id = queue_one(&n2, "op-relay-1");
    wait_for(Duration::from_secs(10), "the message replicated to node 2", || {
        queued(&n2, operator, &id)
    });

    assert_ok(
        &ctl(&n2, operator, &["queue", "bounce", &id]),
        "queue bounce via node 2",
    );
    let asked = admin_event(
        &n2,
        &[
            ("action", "queue bounce".into()),
            ("who", who.into()),
            ("affected", 1.into()),
        ],
    );
    assert_eq!(asked["result"], "ok");
    wait_for(Duration::from_secs(10), "bounced message gone", || {
        !queued(&n2, operator, &id)
    });
    asked
}

/// Without TLS: a bounce asked of a follower runs on the shard leader and
/// the node asked audits it under the operator's token name.
#[test]
fn a_change_run_on_another_node_is_audited_where_it_was_asked() {
    let _serial = cluster_lock();
    let (boss, ops) = ("admin-relay-5e1d", "operator-relay-9a7b");
    let extra = format!(
        "shards = 2\n\n[log]\nformat = \"json\"\n\n\
         [[admin_token]]\nname = \"boss\"\nrole = \"admin\"\nhash = \"{}\"\n\n\
         [[admin_token]]\nname = \"ops\"\nrole = \"operator\"\nhash = \"{}\"\n\n{}",
        hash_password(boss),
        hash_password(ops),
        hold_mail()
    );
    let admin = [("TERN_TOKEN".to_owned(), boss.to_owned())];
    let asked = bounce_relayed_to_the_shard_leader([&extra, &extra], &admin, &[("TERN_TOKEN", ops)], "ops");
    assert_eq!(asked["how"], "token");
}

/// With cluster TLS: the same, the operator named by its client certificate.
#[test]
fn a_change_run_on_another_node_under_cluster_tls_names_the_certificate() {
    let _serial = cluster_lock();
    let pki = tempfile::tempdir().expect("tempdir");
    let d = pki.path().display().to_string();
    for args in [
        vec!["cert", "init-ca", "--dir", &d],
        vec!["cert", "node", "--dir", &d, "--id", "1", "--host", "127.0.0.1"],
        vec!["cert", "node", "--dir", &d, "--id", "2", "--host", "127.0.0.1"],
        vec!["cert", "client", "--dir", &d, "--name", "root", "--role", "admin"],
        vec!["cert", "client", "--dir", &d, "--name", "olga", "--role", "operator"],
    ] {
        let out = Command::new(ternctl_bin()).args(&args).output().expect("ternctl cert");
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    }
    let extra = |id: u64| {
        format!(
            "shards = 2\ntls_cert = \"{d}/node-{id}.crt\"\ntls_key = \"{d}/node-{id}.key\"\ntls_ca = \"{d}/ca.crt\"\n\n\
             [log]\nformat = \"json\"\n\n{}",
            hold_mail()
        )
    };
    let tls = |stem: &str| {
        vec![
            ("TERN_TLS_CA".to_owned(), format!("{d}/ca.crt")),
            ("TERN_TLS_CERT".to_owned(), format!("{d}/{stem}.crt")),
            ("TERN_TLS_KEY".to_owned(), format!("{d}/{stem}.key")),
        ]
    };
    let olga = tls("client-olga");
    let operator: Vec<(&str, &str)> = olga.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let asked = bounce_relayed_to_the_shard_leader([&extra(1), &extra(2)], &tls("client-root"), &operator, "olga");
    assert_eq!(asked["how"], "certificate");
}
