//! Local delivery: a real Dovecot over LMTP (with recipient verification at
//! RCPT time) and Maildir.

use std::time::Duration;

use crate::harness::*;
use tern_testkit::peers::Dovecot;

#[test]
fn dovecot_lmtp_delivery_and_rcpt_time_verification() {
    // Skips only outside CI: under TERN_REQUIRE_PEERS=1 a missing Dovecot fails.
    if !Dovecot::available() {
        return;
    }
    let dovecot = Dovecot::start(&["bob@example.test", "alice@example.test"]);
    // The client is untrusted here; inbound checks would ask the system's DNS.
    let node = Node::start(&format!(
        "[policy]\nlocal_domains = [\"example.test\"]\nrelay_networks = [\"192.0.2.0/24\"]\n\n[local]\nlmtp = \"{}\"\nverify_recipients = true\n\n[inbound]\nenabled = false\n",
        dovecot.peer.addr
    ));
    let mut c = Client::connect(node.smtp).unwrap();
    c.command("EHLO outside.test").unwrap();
    assert!(c
        .command("MAIL FROM:<someone@elsewhere.test>")
        .unwrap()
        .starts_with("250"));
    assert!(c.command("RCPT TO:<bob@example.test>").unwrap().starts_with("250"));
    let unknown = c.command("RCPT TO:<carol@example.test>").unwrap();
    assert!(unknown.starts_with("550 5.1.1"), "{unknown}");
    assert!(c.command("RCPT TO:<alice@Example.Test>").unwrap().starts_with("250"));
    assert!(c.command("DATA").unwrap().starts_with("354"));
    c.send_raw(body("local-1", 300).as_bytes()).unwrap();
    assert!(c.command(".").unwrap().starts_with("250"));
    let bob = dovecot.wait_messages("bob@example.test", 1);
    assert!(String::from_utf8_lossy(&bob[0]).contains("<local-1@tern.test>"));
    dovecot.wait_messages("alice@example.test", 1);
    wait_for(Duration::from_secs(30), "empty queue", || {
        node.ternctl_json(&["queue", "summary"])["messages"] == 0
    });
}

#[test]
fn maildir_delivery_writes_new_files() {
    let maildirs = tempfile::tempdir().unwrap();
    let node = Node::start(&format!(
        "[policy]\nlocal_domains = [\"example.test\"]\n\n[local]\nmaildir = \"{}/{{domain}}/{{user}}\"\n",
        maildirs.path().display()
    ));
    let mut c = Client::connect(node.smtp).unwrap();
    c.command("EHLO c.test").unwrap();
    c.send_mail("a@tern.test", &["Bob@example.test"], &body("maildir-1", 200))
        .unwrap();
    let new = maildirs.path().join("example.test/bob/new");
    wait_for(Duration::from_secs(30), "a file in new/", || {
        std::fs::read_dir(&new).map(|d| d.count()).unwrap_or(0) == 1
    });
    let file = std::fs::read_dir(&new).unwrap().next().unwrap().unwrap().path();
    assert!(std::fs::read_to_string(file).unwrap().contains("<maildir-1@tern.test>"));
    assert_eq!(
        std::fs::read_dir(maildirs.path().join("example.test/bob/tmp"))
            .unwrap()
            .count(),
        0
    );
}
