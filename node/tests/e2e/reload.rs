//! Configuration reload without a restart (docs/operations.md, "Reloading
//! the configuration"): a real ternd, real smtp-sink peers, SMTP sessions
//! that stay open across the reload, and `ternctl config reload`; plus
//! `ternd check-config`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use crate::cert_reload::{der, replace, served};
use crate::harness::*;
use tern_testkit::peers::TestCa;

/// Sessions open across the reload, and messages each sends before, during and after it.
const SESSIONS: usize = 4;
const BEFORE: usize = 3;
const DURING: usize = 3;
const AFTER: usize = 1;

fn config_path(node: &Node) -> PathBuf {
    node.dir().join("tern.toml")
}

/// Rewrites the node's config file with `from` replaced by `to` (which must occur).
pub(crate) fn edit(node: &Node, from: &str, to: &str) {
    let path = config_path(node);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(from), "{from:?} not in {text}");
    std::fs::write(&path, text.replace(from, to)).unwrap();
}

fn route(to: std::net::SocketAddr) -> String {
    format!("[[route]]\ndomain = \"example.test\"\nto = \"{to}\"\n")
}

/// An Ed25519 key for `tern.test` with `selector`, and its `[[dkim]]` entry.
fn dkim_key(dir: &Path, selector: &str) -> String {
    let path = dir.join(format!("{selector}.pem"));
    let out = crate::dkim::generate(&[
        "--domain",
        "tern.test",
        "--selector",
        selector,
        "--algorithm",
        "ed25519",
        "--out",
        path.to_str().unwrap(),
        "-o",
        "json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    format!(
        "[[dkim]]\ndomain = \"tern.test\"\nselector = \"{selector}\"\nalgorithm = \"ed25519-sha256\"\nprivate_key = \"{}\"\n",
        path.display()
    )
}

/// `ternctl config reload -o json` on `node`: the exit status and the node's row.
pub(crate) fn reload(node: &Node) -> (std::process::Output, serde_json::Value) {
    let out = node.ternctl(&["config", "reload", "-o", "json"]);
    let v = serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .map(|v| v["nodes"][0].clone())
        .unwrap_or_default();
    (out, v)
}

pub(crate) fn names(v: &serde_json::Value, key: &str) -> Vec<String> {
    v[key]
        .as_array()
        .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

/// Message-IDs (`<id@tern.test>`) and whole dumps at a sink.
fn at(sink: &SmtpSink) -> Vec<String> {
    sink.messages()
}

fn count_id(dumps: &[String], id: &str) -> usize {
    let tag = format!("<{id}@tern.test>");
    dumps.iter().filter(|d| d.contains(&tag)).count()
}

fn reload_total(node: &Node, result: &str) -> f64 {
    crate::metrics::sum(
        &crate::metrics::scrape(node),
        "tern_config_reload_total",
        &[("result", result)],
    )
}

type Session = Result<(Client, Vec<String>), String>;

fn open_session(addr: std::net::SocketAddr) -> Session {
    let mut c = Client::connect(addr).map_err(|e| format!("connect: {e}"))?;
    let ehlo = c.command("EHLO load.test").map_err(|e| format!("EHLO: {e}"))?;
    if !ehlo.starts_with("250") {
        return Err(format!("EHLO: {ehlo}"));
    }
    Ok((c, Vec::new()))
}

/// Messages `range` of session `s`, each answered 250, on the same connection.
fn send_range(session: Session, s: usize, range: std::ops::Range<usize>) -> Session {
    let (mut c, mut ids) = session?;
    for n in range {
        let id = format!("s{s}-m{n}");
        c.send_mail(
            "sender@tern.test",
            &[&format!("rcpt{s}@example.test")],
            &body(&id, 2000),
        )
        .map_err(|e| format!("session {s} message {n}: {e}"))?;
        ids.push(id);
    }
    Ok((c, ids))
}

#[test]
fn reload_under_load_moves_a_route_a_dkim_key_and_the_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("Tern Reload CA");
    let (cert_a, cert_b) = (ca.issue("a", &["mx.tern.test"]), ca.issue("b", &["mx.tern.test"]));
    let live = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    replace(&cert_a.0, &live.0);
    replace(&cert_a.1, &live.1);
    let (dkim1, dkim2) = (dkim_key(dir.path(), "s1"), dkim_key(dir.path(), "s2"));
    let (sink_a, sink_b) = (SmtpSink::start(&[]), SmtpSink::start(&[]));
    let node = Node::start(&format!(
        "{}\n{dkim1}\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n\n[delivery]\nretry_schedule = [\"1s\"]\n",
        route(sink_a.addr),
        live.0.display(),
        live.1.display()
    ));
    assert_eq!(served(node.smtp, &ca.cert), der(&cert_a.0).to_vec());

    // Sessions that stay open across the reload: BEFORE messages, then
    // DURING while the reload runs, then AFTER once it is done.
    let opened = Arc::new(Barrier::new(SESSIONS + 1));
    let reloaded = Arc::new(Barrier::new(SESSIONS + 1));
    let sessions: Vec<_> = (0..SESSIONS)
        .map(|s| {
            let (opened, reloaded, addr) = (Arc::clone(&opened), Arc::clone(&reloaded), node.smtp);
            std::thread::spawn(move || -> Result<Vec<String>, String> {
                // Both barriers are always reached, whatever fails.
                let session = open_session(addr);
                let session = send_range(session, s, 0..BEFORE);
                opened.wait();
                let session = send_range(session, s, BEFORE..BEFORE + DURING);
                reloaded.wait();
                let (mut c, ids) = send_range(session, s, BEFORE + DURING..BEFORE + DURING + AFTER)?;
                let quit = c.command("QUIT").map_err(|e| format!("session {s} QUIT: {e}"))?;
                if !quit.starts_with("221") {
                    return Err(format!("session {s} QUIT: {quit}"));
                }
                Ok(ids)
            })
        })
        .collect();

    opened.wait();
    // The first messages went by the first route.
    wait_for(Duration::from_secs(30), "the first messages at sink A", || {
        at(&sink_a).len() >= SESSIONS * BEFORE
    });
    // New route, new DKIM key (new selector), new certificate at the same paths.
    edit(&node, &route(sink_a.addr), &route(sink_b.addr));
    edit(&node, &dkim1, &dkim2);
    replace(&cert_b.0, &live.0);
    replace(&cert_b.1, &live.1);
    let (out, row) = reload(&node);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(row["ok"], true, "{row}");
    let applied = names(&row, "applied");
    assert!(
        applied.contains(&"route".to_owned()) && applied.contains(&"dkim".to_owned()),
        "{row}"
    );
    assert!(names(&row, "restart_needed").is_empty(), "{row}");
    reloaded.wait();

    // Every session got every 250.
    let mut sent: Vec<String> = Vec::new();
    for s in sessions {
        sent.extend(s.join().unwrap().unwrap_or_else(|e| panic!("a session failed: {e}")));
    }
    assert_eq!(sent.len(), SESSIONS * (BEFORE + DURING + AFTER));

    // A new session: the new certificate, and its mail goes to B signed with s2.
    assert_eq!(served(node.smtp, &ca.cert), der(&cert_b.0).to_vec());
    let mut c = Client::connect(node.smtp).unwrap();
    assert!(c.command("EHLO new.test").unwrap().starts_with("250"));
    c.send_mail("sender@tern.test", &["rcpt@example.test"], &body("fresh", 2000))
        .unwrap();
    sent.push("fresh".into());

    // No message lost: each one at exactly one sink, once.
    wait_for(Duration::from_secs(60), "every message at a sink", || {
        at(&sink_a).len() + at(&sink_b).len() >= sent.len()
    });
    let (a, b) = (at(&sink_a), at(&sink_b));
    for id in &sent {
        assert_eq!(
            count_id(&a, id) + count_id(&b, id),
            1,
            "{id} at A {}, at B {}",
            count_id(&a, id),
            count_id(&b, id)
        );
    }
    assert_eq!(a.len() + b.len(), sent.len());
    // Mail queued after the reload took the new route and the new key.
    let after: Vec<&String> = sent
        .iter()
        .filter(|id| *id == "fresh" || id.ends_with(&format!("-m{}", BEFORE + DURING)))
        .collect();
    for id in after {
        let tag = format!("<{id}@tern.test>");
        let dump = b
            .iter()
            .find(|d| d.contains(&tag))
            .unwrap_or_else(|| panic!("{id} not at sink B"));
        assert!(
            dump.contains("s=s2;") && !dump.contains("s=s1;"),
            "{id} not signed with s2: {dump}"
        );
    }
    assert!(reload_total(&node, "ok") >= 1.0);
}

#[test]
fn an_invalid_file_keeps_the_running_config_and_names_the_key() {
    let (sink_a, sink_b) = (SmtpSink::start(&[]), SmtpSink::start(&[]));
    let node = Node::start(&route(sink_a.addr));
    // A new route, and a value out of range.
    edit(
        &node,
        &route(sink_a.addr),
        &format!("{}\n[policy]\nmax_recipients = 0\n", route(sink_b.addr)),
    );

    let (out, _) = reload(&node);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("policy.max_recipients"), "{err}");

    node.send_signal("HUP");
    wait_for(
        Duration::from_secs(10),
        "the SIGHUP reload failed and was logged",
        || node.logs().matches("configuration reload failed").count() >= 2,
    );
    assert!(node.logs().contains("policy.max_recipients"), "{}", node.logs());
    assert_eq!(reload_total(&node, "error"), 2.0);

    // Still the old route.
    let mut c = Client::connect(node.smtp).unwrap();
    assert!(c.command("EHLO x.test").unwrap().starts_with("250"));
    c.send_mail("sender@tern.test", &["r@example.test"], &body("kept", 500))
        .unwrap();
    assert_eq!(sink_a.wait_dumps(1).len(), 1);
    assert!(at(&sink_b).is_empty());
}

#[test]
fn a_restart_only_key_is_named_and_keeps_its_running_value() {
    let (sink_a, sink_b) = (SmtpSink::start(&[]), SmtpSink::start(&[]));
    let node = Node::start(&route(sink_a.addr));
    edit(&node, "hostname = \"mx1.tern.test\"", "hostname = \"mx9.tern.test\"");
    edit(&node, &route(sink_a.addr), &route(sink_b.addr));

    let (out, row) = reload(&node);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // delivery.helo_name defaults to the host name, so it changed too.
    assert_eq!(
        names(&row, "restart_needed"),
        ["node.hostname", "delivery.helo_name"],
        "{row}"
    );
    assert_eq!(names(&row, "applied"), ["route"], "{row}");
    let table = node.ternctl(&["config", "reload"]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("node.hostname"));
    assert!(
        node.logs()
            .contains("restart needed for: node.hostname, delivery.helo_name"),
        "{}",
        node.logs()
    );

    // The running hostname stays; the route moved.
    let mut c = Client::connect(node.smtp).unwrap();
    let ehlo = c.command("EHLO x.test").unwrap();
    assert!(ehlo.contains("mx1.tern.test"), "{ehlo}");
    c.send_mail("sender@tern.test", &["r@example.test"], &body("moved", 500))
        .unwrap();
    assert_eq!(sink_b.wait_dumps(1).len(), 1);
    assert!(at(&sink_a).is_empty());
}

fn check_config(path: &Path) -> std::process::Output {
    Command::new(ternd_bin())
        .arg("check-config")
        .arg(path)
        .output()
        .unwrap()
}

#[test]
fn check_config_accepts_a_valid_file_and_names_the_bad_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tern.toml");
    let dkim = dkim_key(dir.path(), "ok");
    std::fs::write(
        &file,
        format!(
            "[node]\nid = 3\ndata_dir = \"{}\"\n\n{dkim}",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let out = check_config(&file);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("{}: ok", file.display())
    );
    assert!(!dir.path().join("data").exists(), "check-config started something");

    for (text, key) in [
        ("[policy]\nmax_recipients = 0\n", "policy.max_recipients"),
        ("[policy]\nrelay_netwroks = []\n", "relay_netwroks"),
        (&*dkim.replace("ok.pem", "missing.pem"), "dkim"),
    ] {
        std::fs::write(&file, text).unwrap();
        let out = check_config(&file);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{text} passed");
        assert!(err.contains(key), "{key} not named: {err}");
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// One message to `r@example.test`; its queue id.
fn send_one(node: &Node, tag: &str) -> String {
    let mut c = Client::connect(node.smtp).unwrap();
    assert!(c.command("EHLO x.test").unwrap().starts_with("250"));
    c.send_mail("sender@tern.test", &["r@example.test"], &body(tag, 500))
        .unwrap()
}

/// A reload that must succeed, apply `keys` and need no restart.
fn reload_applies(node: &Node, keys: &[&str]) {
    let (out, row) = reload(node);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let applied = names(&row, "applied");
    for key in keys {
        assert!(applied.iter().any(|a| a == key), "{key} not applied: {row}");
    }
    assert!(names(&row, "restart_needed").is_empty(), "{row}");
}

/// Delivery rules change by reload while mail flows to a plaintext sink:
/// a `[[tls_policy]]` that requires TLS turns deliveries into deferrals, a
/// new `retry_schedule` sets the next retry time, a `[[shaping]]` rate
/// holds the second message; at the end every message is at the sink once.
#[test]
fn reload_makes_tls_policy_retry_schedule_and_shaping_live() {
    const TLS: &str = "\n[[tls_policy]]\ndomain = \"example.test\"\nlevel = \"encrypt\"\n";
    const SHAPING: &str = "\n[[shaping]]\nname = \"slow\"\ndomain = \"example.test\"\nrate = \"1/h\"\n";
    // smtp-sink offers no STARTTLS.
    let sink = SmtpSink::start(&[]);
    // `#rules`: where the test adds rules.
    let node = Node::start(&format!(
        "{}\n[delivery]\nretry_schedule = [\"1s\"]\n#rules\n",
        route(sink.addr)
    ));
    let show = |id: &str| node.ternctl_json(&["queue", "show", id]);

    send_one(&node, "before");
    wait_for(Duration::from_secs(15), "the first message at the sink", || {
        at(&sink).len() == 1
    });

    // TLS now required for example.test: the plaintext sink gets nothing,
    // the message is deferred (and retried every second).
    edit(&node, "#rules", &format!("#rules{TLS}"));
    reload_applies(&node, &["tls_policy/delivery.require_tls_domains"]);
    let tls_held = send_one(&node, "tls");
    wait_for(Duration::from_secs(15), "two deferrals for want of TLS", || {
        let m = show(&tls_held);
        m["attempts"].as_u64().unwrap_or(0) >= 2
            && m["recipients"][0]["last_reply"]
                .as_str()
                .is_some_and(|r| r.starts_with("451") && r.contains("TLS required"))
    });
    assert_eq!(at(&sink).len(), 1);

    // An hour between retries from the next deferral on (±10% jitter).
    edit(&node, "retry_schedule = [\"1s\"]", "retry_schedule = [\"1h\"]");
    reload_applies(&node, &["delivery.retry_schedule"]);
    let t0 = unix_now();
    wait_for(Duration::from_secs(10), "a retry time an hour away", || {
        show(&tls_held)["next_attempt"].as_i64().unwrap_or(0) >= t0 + 3000
    });
    let next = show(&tls_held)["next_attempt"].as_i64().unwrap();
    assert!(next <= unix_now() + 3960, "next attempt {next}, now {}", unix_now());

    // No TLS policy any more, and one message an hour to example.test:
    // the deferred message goes (the first slot), a new one is held.
    edit(&node, TLS, SHAPING);
    reload_applies(&node, &["tls_policy/delivery.require_tls_domains", "shaping"]);
    assert!(node.ternctl(&["queue", "retry", &tls_held]).status.success());
    wait_for(Duration::from_secs(15), "the deferred message at the sink", || {
        count_id(&at(&sink), "tls") == 1
    });
    let shaped = send_one(&node, "shaped");
    let held = || {
        crate::metrics::sum(
            &crate::metrics::scrape(&node),
            "tern_shaping_held_total",
            &[("scope", "domain:example.test")],
        )
    };
    wait_for(Duration::from_secs(15), "the new message held by shaping", || {
        held() >= 1.0
    });
    let m = show(&shaped);
    assert!(m["next_attempt"].as_i64().unwrap() >= unix_now() + 3000, "{m}");
    assert_eq!(at(&sink).len(), 2);

    // The rate gone, the held message goes when asked.
    edit(&node, SHAPING, "");
    reload_applies(&node, &["shaping"]);
    assert!(node.ternctl(&["queue", "retry", &shaped]).status.success());
    wait_for(Duration::from_secs(15), "every message at the sink", || {
        at(&sink).len() >= 3
    });
    let dumps = at(&sink);
    for tag in ["before", "tls", "shaped"] {
        assert_eq!(count_id(&dumps, tag), 1, "{tag}");
    }
    assert_eq!(dumps.len(), 3);
    wait_for(Duration::from_secs(10), "an empty queue", || {
        node.queued_ids().is_empty()
    });
}
