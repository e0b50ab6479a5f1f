//! Submission end to end: `[listen] submission` (STARTTLS, port 587) and
//! `[listen] submissions` (implicit TLS, port 465) with SMTP AUTH, driven by
//! swaks against a real ternd whose users file was made with
//! `ternd hash-password`; accepted mail is relayed through a `[[route]]` to
//! Postfix's smtp-sink.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use crate::harness::*;

pub(crate) const ALICE_PASSWORD: &str = "correct horse battery";
const BOB_PASSWORD: &str = "b0b's pass:word";

/// A node with both submission listeners, a users file, and every
/// non-local domain routed to a smtp-sink. Loopback is not a relay network,
/// so only authentication lets mail for `far.test` through.
pub(crate) struct Msa {
    pub(crate) node: Node,
    pub(crate) sink: SmtpSink,
    _dir: tempfile::TempDir,
}

impl Msa {
    pub(crate) fn start(max_failures: u32) -> Msa {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed_cert(dir.path(), "mx1.tern.test");
        let users = dir.path().join("users");
        std::fs::write(
            &users,
            format!(
                "# made with ternd hash-password\nalice@sub.test:{}\n\nbob:{}:bob@sub.test,@bobs.test\n",
                hash_password(ALICE_PASSWORD),
                hash_password(BOB_PASSWORD)
            ),
        )
        .unwrap();
        let sink = SmtpSink::start(&[]);
        let node = Node::start_with_listen(
            1,
            true,
            "submission = [\"127.0.0.1:0\"]\nsubmissions = [\"127.0.0.1:0\"]",
            &format!(
                "[tls]\ncert = \"{}\"\nkey = \"{}\"\n\n[auth]\nusers_file = \"{}\"\nmax_failures = {max_failures}\n\n\
                 [policy]\nrelay_networks = [\"192.0.2.0/24\"]\nlocal_domains = [\"sub.test\"]\n\n\
                 [[route]]\ndomain = \"*\"\nto = \"{}\"\n",
                cert.display(),
                key.display(),
                users.display(),
                sink.addr
            ),
        );
        assert_ne!(node.submission.port(), 0, "no `listening submission=` line");
        assert_ne!(node.submissions.port(), 0, "no `listening submissions=` line");
        Msa { node, sink, _dir: dir }
    }
}

/// swaks' exit code and transcript.
fn swaks(server: SocketAddr, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new("swaks")
        .args([
            "--server",
            &server.to_string(),
            "--timeout",
            "30",
            "--ehlo",
            "client.test",
        ])
        .args(args)
        .output()
        .expect("swaks is installed by cluster-tests/run-all.sh");
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
}

/// swaks arguments to authenticate as `user` with `mechanism`.
fn auth<'a>(mechanism: &'a str, user: &'a str, password: &'a str) -> [&'a str; 6] {
    ["--auth", mechanism, "--auth-user", user, "--auth-password", password]
}

#[test]
fn submission_requires_tls_then_auth_and_relays_owned_senders() {
    let msa = Msa::start(5);
    let (sub, subs) = (msa.node.submission, msa.node.submissions);

    // Before STARTTLS: no AUTH offered or accepted, and no mail without it.
    let mut c = Client::connect(sub).unwrap();
    let ehlo = c.command("EHLO raw.test").unwrap();
    assert!(ehlo.contains("STARTTLS") && !ehlo.contains("AUTH"), "{ehlo}");
    let r = c.command("AUTH PLAIN AGFsaWNlQHN1Yi50ZXN0AHg=").unwrap();
    assert_eq!(
        r,
        "538 5.7.11 Encryption required for requested authentication mechanism"
    );
    assert_eq!(
        c.command("MAIL FROM:<alice@sub.test>").unwrap(),
        "530 5.7.0 Authentication required"
    );

    // Under TLS AUTH is offered, but MAIL still needs it.
    let (code, t) = swaks(sub, &["--tls", "--from", "alice@sub.test", "--to", "r@far.test"]);
    assert_eq!(code, Some(23), "{t}");
    let tls_at = t.find("TLS started").expect("TLS started");
    assert!(!t[..tls_at].contains("AUTH"), "{t}");
    assert!(t[tls_at..].contains("250-AUTH PLAIN LOGIN"), "{t}");
    assert!(t.contains("530 5.7.0 Authentication required"), "{t}");

    // PLAIN and LOGIN on both listeners; mail for a foreign domain is relayed.
    let sends: [(SocketAddr, &str, &str, &str, &str, &str); 4] = [
        (sub, "--tls", "PLAIN", "alice@sub.test", "alice@sub.test", "sub-plain"),
        (sub, "--tls", "LOGIN", "bob", "someone@Bobs.Test", "sub-login"),
        (subs, "--tlsc", "PLAIN", "bob", "bob@sub.test", "subs-plain"),
        (subs, "--tlsc", "LOGIN", "alice@sub.test", "<>", "subs-login"),
    ];
    for (server, tls, mechanism, user, from, subject) in sends {
        let password = if user == "bob" { BOB_PASSWORD } else { ALICE_PASSWORD };
        let to = format!("{subject}@far.test");
        let header = format!("Subject: {subject}");
        let mut args = vec![tls];
        args.extend(auth(mechanism, user, password));
        args.extend(["--from", from, "--to", &to, "--header", &header]);
        let (code, t) = swaks(server, &args);
        assert_eq!(code, Some(0), "{subject}: {t}");
        assert!(t.contains("235 2.7.0 Authentication successful"), "{t}");
        if tls == "--tlsc" {
            assert!(!t.contains("STARTTLS"), "STARTTLS offered under implicit TLS: {t}");
        }
    }

    // A sender the user does not own.
    let mut args = vec!["--tls"];
    args.extend(auth("PLAIN", "alice@sub.test", ALICE_PASSWORD));
    args.extend(["--from", "bob@sub.test", "--to", "r@far.test"]);
    let (code, t) = swaks(sub, &args);
    assert_eq!(code, Some(23), "{t}");
    assert!(
        t.contains("553 5.7.1 Sender address not owned by user alice@sub.test"),
        "{t}"
    );

    // The MX listener offers no AUTH and does not relay for loopback.
    let (code, t) = swaks(
        msa.node.smtp,
        &["--tls", "--from", "alice@sub.test", "--to", "r@far.test"],
    );
    assert_eq!(code, Some(24), "{t}");
    assert!(!t.contains("AUTH"), "{t}");

    wait_for(Duration::from_secs(60), "4 messages at the sink", || {
        msa.sink.messages().len() == 4
    });
    for m in msa.sink.messages() {
        assert!(m.contains("(Tern) with ESMTPSA id"), "{m}");
        assert!(m.contains("(using TLSv1.3 with cipher"), "{m}");
    }
    let all = msa.sink.messages().join("\n");
    for subject in ["sub-plain", "sub-login", "subs-plain", "subs-login"] {
        assert!(
            all.contains(&format!("Subject: {subject}")),
            "{subject} missing:\n{all}"
        );
    }
    // Log lines reach us through a reader thread: wait for them.
    let count = || msa.node.logs().matches("auth ok").count();
    wait_for(Duration::from_secs(10), "5 `auth ok` log lines", || count() >= 5);
    assert_eq!(count(), 5, "{}", msa.node.logs());
}

#[test]
fn failed_auth_gets_535_then_454_per_ip_and_user() {
    let msa = Msa::start(3);
    let (sub, subs) = (msa.node.submission, msa.node.submissions);
    // Three failures, on both listeners (one limiter for the node).
    for (server, tls) in [(sub, "--tls"), (subs, "--tlsc"), (sub, "--tls")] {
        let mut args = vec![tls];
        args.extend(auth("PLAIN", "alice@sub.test", "wrong"));
        args.extend(["--from", "alice@sub.test", "--to", "r@far.test"]);
        let (code, t) = swaks(server, &args);
        assert_eq!(code, Some(28), "{t}");
        assert!(t.contains("535 5.7.8 Authentication credentials invalid"), "{t}");
    }
    // Now even the right password is refused, and so is another user from this IP.
    for (user, password) in [("alice@sub.test", ALICE_PASSWORD), ("bob", BOB_PASSWORD)] {
        let mut args = vec!["--tls"];
        args.extend(auth("LOGIN", user, password));
        args.extend(["--from", "bob@sub.test", "--to", "r@far.test"]);
        let (code, t) = swaks(sub, &args);
        assert_eq!(code, Some(28), "{t}");
        assert!(
            t.contains("454 4.7.0 Too many failed authentication attempts, try again later"),
            "{t}"
        );
    }
    // Log lines reach us through a reader thread: wait for them.
    let count = |what: &str| msa.node.logs().matches(what).count();
    wait_for(Duration::from_secs(10), "5 `auth failed` log lines", || {
        count("auth failed") >= 5
    });
    let logs = msa.node.logs();
    let failed: Vec<&str> = logs.lines().filter(|l| l.contains("auth failed")).collect();
    assert_eq!(failed.len(), 5, "{logs}");
    assert!(failed[..3]
        .iter()
        .all(|l| l.contains("alice@sub.test") && l.contains("127.0.0.1")));
    assert!(
        failed[4].contains("bob") && failed[4].contains("LOGIN"),
        "{}",
        failed[4]
    );
    let samples = crate::metrics::scrape(&msa.node);
    let auth = |result| crate::metrics::sum(&samples, "tern_smtp_auth_total", &[("result", result)]);
    assert_eq!((auth("ok"), auth("failed"), auth("rate_limited")), (0.0, 3.0, 2.0));
    assert!(msa.sink.messages().is_empty());
}
