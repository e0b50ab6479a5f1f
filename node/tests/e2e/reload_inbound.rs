//! Reloading the inbound side (docs/operations.md, "Reloading the
//! configuration"): one running ternd gets, by `ternctl config reload`, a
//! `[dnsbl]` zone served by a real DNS server (dnsmasq), a new
//! `[[admin_token]]` in place of the old one, and a new URL for its
//! `[[webhook]]` (real HTTP receivers). Clients take their addresses from
//! PROXY headers, so one loopback test can be a listed and a clean client.

use std::io::Write as _;
use std::time::Duration;

use crate::dnsbl::Session;
use crate::harness::*;
use crate::operators::ctl;
use crate::reload::{edit, names};
use crate::webhook::{of_message, Receiver};
use tern_testkit::dns::DnsServer;

const OLD_TOKEN: &str = "reload-old-admin-secret";
const NEW_TOKEN: &str = "reload-new-admin-secret";
const LISTED: &str = "192.0.2.7";
const CLEAN: &str = "192.0.2.1";

fn token(name: &str, secret: &str) -> String {
    format!(
        "[[admin_token]]\nname = \"{name}\"\nrole = \"admin\"\nhash = \"{}\"\n",
        hash_password(secret)
    )
}

fn webhook(url: &str) -> String {
    // A fixed name: the endpoint's cursor in the outbox survives the new URL.
    format!("[[webhook]]\nname = \"events\"\nurl = \"{url}\"\n")
}

/// Queues one message from the clean client; its queue id.
fn send(node: &Node, tag: &str) -> String {
    let mut c = Session::open(node, CLEAN);
    let rcpt = c.rcpt("r@example.test");
    assert!(rcpt.starts_with("250 "), "{rcpt}");
    assert!(c.cmd("DATA").starts_with("354"));
    c.0.get_mut().write_all(body(tag, 300).as_bytes()).unwrap();
    let queued = c.cmd(".");
    assert!(queued.starts_with("250 2.0.0"), "{queued}");
    queued.trim().rsplit(' ').next().unwrap().to_owned()
}

/// The whoami of the console with `secret` as bearer token: the HTTP status.
fn console_status(node: &Node, secret: &str) -> u16 {
    crate::console::http(
        "GET",
        &format!("http://{}/console/api/whoami", node.http),
        &[("authorization", &format!("Bearer {secret}"))],
        None,
    )
    .status
}

/// Events posted to the receiver at `url` and acknowledged (the counter
/// moves once the outbox cursor has).
fn posted(node: &Node, url: &str) -> usize {
    let metrics = crate::metrics::get_metrics(node.http, None).1;
    let prefix = format!("tern_webhook_events_posted_total{{url=\"{url}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_reload_adds_a_block_list_swaps_admin_tokens_and_moves_a_webhook() {
    if !tern_testkit::peers::require("python3") || !tern_testkit::peers::require("curl") {
        return;
    }
    let dns = DnsServer::start("host-record=7.2.0.192.bl.test,127.0.0.2\n");
    let sink = SmtpSink::start(&[]);
    let (hook_a, hook_b) = (Receiver::start(0), Receiver::start(0));
    let dnsbl = "[dnsbl]\nenabled = true\ntimeout = \"2s\"\n\
                 zones = [{ zone = \"bl.test\", codes = [\"127.0.0.2\"], action = \"reject\" }]\n";
    let (old_token, new_token) = (token("old", OLD_TOKEN), token("new", NEW_TOKEN));
    let mut node = Node::start(&format!(
        "[dns]\nnameservers = [\"{}\"]\n\n[policy]\nrelay_networks = []\nrelay_domains = [\"example.test\"]\n\n\
         [smtp]\nproxy_protocol_from = [\"127.0.0.0/8\"]\n\n\
         [[route]]\ndomain = \"example.test\"\nto = \"{}\"\n\n{old_token}\n{}\n",
        dns.addr,
        sink.addr,
        webhook(&hook_a.url("/a")),
    ));
    node.ternctl_env = vec![("TERN_TOKEN".into(), OLD_TOKEN.into())];

    // Before: no block list, the old token works, events go to A.
    assert!(Session::open(&node, LISTED)
        .rcpt("bob@example.test")
        .starts_with("250 "));
    assert!(ctl(&node, &[("TERN_TOKEN", OLD_TOKEN)], &["status"]).status.success());
    assert_eq!(
        ctl(&node, &[("TERN_TOKEN", NEW_TOKEN)], &["status"]).status.code(),
        Some(4)
    );
    let first = send(&node, "before-reload");
    wait_for(
        Duration::from_secs(30),
        "events of the first message at A, acknowledged",
        || {
            let events = hook_a.accepted_events();
            !of_message(&events, &first, "delivered").is_empty() && posted(&node, &hook_a.url("/a")) == events.len()
        },
    );

    edit(&node, &old_token, &format!("{new_token}\n{dnsbl}"));
    edit(&node, &hook_a.url("/a"), &hook_b.url("/b"));
    let out = node.ternctl(&["config", "reload", "-o", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let row = serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["nodes"][0].clone();
    let applied = names(&row, "applied");
    for key in ["dnsbl", "admin_token", "webhook"] {
        assert!(applied.contains(&key.to_owned()), "{key} not applied: {row}");
    }
    assert!(names(&row, "restart_needed").is_empty(), "{row}");

    // The listed client is refused at RCPT with the list's reply; a clean one is not.
    assert_eq!(
        Session::open(&node, LISTED).rcpt("bob@example.test"),
        format!("554 5.7.1 Service unavailable; client [{LISTED}] blocked using bl.test")
    );
    // The new token works, the removed one is refused at once: gRPC and console.
    assert!(ctl(&node, &[("TERN_TOKEN", NEW_TOKEN)], &["status"]).status.success());
    let refused = ctl(&node, &[("TERN_TOKEN", OLD_TOKEN)], &["status"]);
    assert_eq!(
        refused.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert_eq!(console_status(&node, NEW_TOKEN), 200);
    assert_eq!(console_status(&node, OLD_TOKEN), 401);

    // Events of new mail go to B, none to A; B gets nothing A had taken.
    let second = send(&node, "after-reload");
    wait_for(Duration::from_secs(30), "events of the second message at B", || {
        let events = hook_b.accepted_events();
        !of_message(&events, &second, "received").is_empty() && !of_message(&events, &second, "delivered").is_empty()
    });
    assert!(of_message(&hook_a.accepted_events(), &second, "received").is_empty());
    let at_b = hook_b.accepted_events();
    assert!(of_message(&at_b, &first, "delivered").is_empty(), "{at_b:?}");
    assert_eq!(sink.wait_dumps(2).len(), 2);
    // The node's own events (the tap) follow too: the reload's audit event.
    wait_for(Duration::from_secs(30), "the reload's admin event at B", || {
        hook_b
            .accepted_events()
            .iter()
            .any(|e| e["fields"]["event"] == "admin" && e["fields"]["action"] == "config reload")
    });

    // A file that cannot be used changes nothing and names the key.
    node.ternctl_env = vec![("TERN_TOKEN".into(), NEW_TOKEN.into())];
    edit(
        &node,
        &new_token,
        &format!("{new_token}\n[arc]\nenabled = true\ndomain = \"tern.test\"\nselector = \"arc\"\nkey_file = \"/nonexistent/arc.pem\"\n"),
    );
    let out = node.ternctl(&["config", "reload"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("[arc]"), "{err}");
    assert!(ctl(&node, &[("TERN_TOKEN", NEW_TOKEN)], &["status"]).status.success());
}

#[test]
fn the_first_webhook_needs_no_restart() {
    if !tern_testkit::peers::require("python3") {
        return;
    }
    let sink = SmtpSink::start(&[]);
    let hook = Receiver::start(0);
    let route = format!("[[route]]\ndomain = \"example.test\"\nto = \"{}\"\n", sink.addr);
    let node = Node::start(&route);
    let mut c = Client::connect(node.smtp).unwrap();
    assert!(c.command("EHLO hook.test").unwrap().starts_with("250"));
    let unseen = c
        .send_mail("a@tern.test", &["r@example.test"], &body("no-hook-yet", 300))
        .unwrap();
    assert_eq!(sink.wait_dumps(1).len(), 1);
    // Its outcome applied (the message left the queue) before the reload.
    wait_for(Duration::from_secs(30), "the first message final", || {
        node.ternctl_json(&["queue", "list"])["messages"]
            .as_array()
            .is_some_and(Vec::is_empty)
    });

    edit(&node, &route, &format!("{route}\n{}", webhook(&hook.url("/first"))));
    let out = node.ternctl(&["config", "reload", "-o", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let row = serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["nodes"][0].clone();
    assert_eq!(names(&row, "applied"), ["webhook"], "{row}");

    // Message events (the outbox, now written) and the node's own (the tap).
    let id = c
        .send_mail("a@tern.test", &["r@example.test"], &body("hooked", 300))
        .unwrap();
    wait_for(
        Duration::from_secs(30),
        "events of a message sent after the reload",
        || {
            let events = hook.accepted_events();
            !of_message(&events, &id, "received").is_empty()
                && !of_message(&events, &id, "delivered").is_empty()
                && events.iter().any(|e| e["fields"]["event"] == "admin")
        },
    );
    // Mail from before the webhook left no events to post.
    assert!(of_message(&hook.accepted_events(), &unseen, "delivered").is_empty());
}
