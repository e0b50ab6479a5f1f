//! TLS-RPT (RFC 8460) and DMARC aggregate reports (RFC 7489 7.2) end to
//! end: one node with 4-second reporting periods relays a message to a
//! domain publishing `_smtp._tls` and receives one from a domain whose
//! DMARC record asks for `rua` reports at another domain (with its RFC
//! 7489 7.1 verification record). Both reports arrive at an aiosmtpd sink;
//! a Python receiver (reports/check.py) validates them against their
//! schemas and checks the reports' DKIM signatures with dkimpy.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::harness::*;
use tern_testkit::dns::DnsServer;
use tern_testkit::peers::{files_in, Aiosmtpd, ExactSink};

const CHECK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e/reports/check.py");

/// jsonschema and xmlschema besides dkimpy; false to skip, a failure
/// under `TERN_REQUIRE_PEERS=1`.
fn schema_checkers_available() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import jsonschema, xmlschema"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var("TERN_REQUIRE_PEERS").as_deref() != Ok("1"),
            "python modules jsonschema and xmlschema are required (TERN_REQUIRE_PEERS=1)"
        );
        eprintln!("skipping: jsonschema or xmlschema not installed");
    }
    ok
}

fn swaks(node: &Node, from_ip: &str, from: &str, to: &str) -> std::process::Output {
    Command::new("swaks")
        .args(["--server", &node.smtp.to_string(), "--timeout", "30"])
        .args(["--local-interface", from_ip])
        .args(["--from", from, "--to", to, "--ehlo", "client.test"])
        .output()
        .expect("swaks is installed by cluster-tests/run-all.sh")
}

#[test]
fn tls_rpt_and_dmarc_aggregate_reports_validate_and_are_signed() {
    if !Aiosmtpd::available() || !crate::dkim::dkimpy_available() || !schema_checkers_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("rpt.pem");
    let out = crate::dkim::generate(&[
        "--domain",
        "tern.test",
        "--selector",
        "rpt",
        "--algorithm",
        "ed25519",
        "--out",
        key.to_str().unwrap(),
        "-o",
        "json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let generated: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let dns = DnsServer::start(&format!(
        "txt-record=rpt._domainkey.tern.test,\"{}\"\n\
         txt-record=_smtp._tls.remote.test,\"v=TLSRPTv1; rua=mailto:tlsrpt@reports.test\"\n\
         txt-record=sender.test,\"v=spf1 ip4:127.0.0.1 -all\"\n\
         txt-record=_dmarc.sender.test,\"v=DMARC1; p=none; rua=mailto:dmarc@reports.test\"\n\
         txt-record=sender.test._report._dmarc.reports.test,\"v=DMARC1\"\n\
         txt-record=_dmarc.unverified.test,\"v=DMARC1; p=none; rua=mailto:dmarc@reports.test\"\n\
         txt-record=unverified.test,\"v=spf1 ip4:127.0.0.1 -all\"\n",
        generated["txt_value"].as_str().unwrap()
    ));
    let sink = ExactSink::start();
    let maildirs = dir.path().join("maildirs");
    let node = Node::start(&format!(
        "[dns]\nnameservers = [\"{dns}\"]\n\n\
         [policy]\nrelay_networks = [\"127.0.0.2/32\"]\nlocal_domains = [\"example.test\"]\n\n\
         [local]\nmaildir = \"{maildirs}/{{domain}}/{{user}}\"\n\n\
         [[dkim]]\ndomain = \"tern.test\"\nselector = \"rpt\"\nalgorithm = \"ed25519-sha256\"\nprivate_key = \"{key}\"\n\n\
         [[route]]\ndomain = \"remote.test\"\nto = \"{sink}\"\n\n\
         [[route]]\ndomain = \"reports.test\"\nto = \"{sink}\"\n\n\
         [tls_rpt]\nenabled = true\ninterval = \"4s\"\ngrace = \"1s\"\norg_name = \"Tern Test\"\n\
         from = \"reports@tern.test\"\n\n\
         [dmarc_reports]\nenabled = true\ninterval = \"4s\"\ngrace = \"1s\"\norg_name = \"Tern Test\"\n\
         from = \"reports@tern.test\"\ncontact = \"https://tern.test/reports\"\n",
        dns = dns.addr,
        maildirs = maildirs.display(),
        key = key.display(),
        sink = sink.peer.addr,
    ));

    // Relayed (127.0.0.2 is a relay network) to remote.test: a TLS session
    // without a policy, in clear (the sink offers no STARTTLS).
    let out = swaks(&node, "127.0.0.2", "someone@tern.test", "rcpt@remote.test");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    // Inbound from 127.0.0.1 (untrusted): DMARC passes by SPF for
    // sender.test; unverified.test's rua is external without the 7.1 record.
    let out = swaks(&node, "127.0.0.1", "alice@sender.test", "bob@example.test");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let out = swaks(&node, "127.0.0.1", "carol@unverified.test", "bob@example.test");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));

    // The relayed message and the two reports.
    let messages_dir = sink.peer.dir.path().join("messages");
    wait_for(Duration::from_secs(40), "the relayed message and two reports", || {
        files_in(&messages_dir).len() >= 3
    });
    let reports: Vec<PathBuf> = files_in(&messages_dir)
        .into_iter()
        .filter(|p| {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .contains("reports@tern.test")
        })
        .collect();
    assert_eq!(reports.len(), 2, "{}", node.logs());

    let out = Command::new("python3")
        .arg(CHECK)
        .arg(dns.addr.port().to_string())
        .args(&reports)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let checked: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let find = |suffix: &str| {
        checked
            .iter()
            .find(|c| c["filename"].as_str().is_some_and(|f| f.ends_with(suffix)))
            .unwrap_or_else(|| panic!("no {suffix} report in {checked:?}"))
            .clone()
    };

    let tls = find(".json.gz");
    assert_eq!(tls["schema_valid"], true);
    assert_eq!(tls["dkim"], true, "{tls}");
    assert_eq!(tls["to"], "<tlsrpt@reports.test>");
    assert_eq!(tls["content_type"], "multipart/report");
    assert_eq!(tls["report_type"], "tlsrpt");
    assert_eq!(tls["attachment_type"], "application/tlsrpt+gzip");
    assert_eq!(tls["tls_report_domain"], "remote.test");
    assert_eq!(tls["tls_report_submitter"], "tern.test");
    let filename = tls["filename"].as_str().unwrap();
    assert!(filename.starts_with("tern.test!remote.test!"), "{filename}");
    assert!(
        tls["subject"]
            .as_str()
            .unwrap()
            .starts_with("Report Domain: remote.test Submitter: tern.test Report-ID: <"),
        "{tls}"
    );
    let report = &tls["report"];
    assert_eq!(report["organization-name"], "Tern Test");
    assert_eq!(report["contact-info"], "reports@tern.test");
    let policies = report["policies"].as_array().unwrap();
    assert_eq!(policies.len(), 1, "{report}");
    assert_eq!(policies[0]["policy"]["policy-type"], "no-policy-found");
    assert_eq!(policies[0]["policy"]["policy-domain"], "remote.test");
    assert_eq!(policies[0]["summary"]["total-successful-session-count"], 0);
    assert_eq!(policies[0]["summary"]["total-failure-session-count"], 1);
    assert_eq!(
        policies[0]["failure-details"][0]["result-type"],
        "starttls-not-supported"
    );

    let dmarc = find(".xml.gz");
    assert_eq!(dmarc["schema_valid"], true);
    assert_eq!(dmarc["dkim"], true, "{dmarc}");
    assert_eq!(dmarc["to"], "<dmarc@reports.test>");
    assert_eq!(dmarc["attachment_type"], "application/gzip");
    let filename = dmarc["filename"].as_str().unwrap();
    assert!(filename.starts_with("tern.test!sender.test!"), "{filename}");
    assert!(
        dmarc["subject"]
            .as_str()
            .unwrap()
            .starts_with("Report Domain: sender.test Submitter: tern.test Report-ID: <"),
        "{dmarc}"
    );
    let report = &dmarc["report"];
    assert_eq!(report["org_name"], "Tern Test");
    assert_eq!(report["domain"], "sender.test");
    assert_eq!(report["p"], "none");
    assert_eq!(report["count"], 1);
    assert_eq!(report["source_ip"], "127.0.0.1");
    assert_eq!(report["disposition"], "none");
    assert_eq!(report["spf"], "pass");
    assert_eq!(report["header_from"], "sender.test");
    assert!(
        node.logs().contains("external destination not verified"),
        "unverified.test's report is not sent"
    );
}

/// Three nodes each deliver a message to remote.test: the TLS-RPT counts
/// of all three reach the reports once, through the control group's
/// leader, whatever node delivered them.
#[test]
fn three_nodes_send_each_tls_rpt_period_once() {
    if !Aiosmtpd::available() || !crate::dkim::dkimpy_available() || !schema_checkers_available() {
        return;
    }
    let _lock = cluster_lock();
    let dns = DnsServer::start("txt-record=_smtp._tls.remote.test,\"v=TLSRPTv1; rua=mailto:tlsrpt@reports.test\"\n");
    let sink = ExactSink::start();
    let extra = format!(
        "[dns]\nnameservers = [\"{dns}\"]\n\n\
         [policy]\nrelay_networks = [\"127.0.0.2/32\"]\n\n\
         [[route]]\ndomain = \"remote.test\"\nto = \"{sink}\"\n\n\
         [[route]]\ndomain = \"reports.test\"\nto = \"{sink}\"\n\n\
         [tls_rpt]\nenabled = true\ninterval = \"5s\"\ngrace = \"2s\"\norg_name = \"Tern Test\"\n\
         from = \"reports@tern.test\"\n",
        dns = dns.addr,
        sink = sink.peer.addr,
    );
    let (n1, n2, n3) = crate::cluster::three_node_cluster(&extra);
    for node in [&n1, &n2, &n3] {
        let out = swaks(node, "127.0.0.2", "someone@tern.test", "rcpt@remote.test");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    }
    let messages_dir = sink.peer.dir.path().join("messages");
    let counted = || -> (u64, Vec<String>) {
        let reports: Vec<PathBuf> = files_in(&messages_dir)
            .into_iter()
            .filter(|p| {
                std::fs::read_to_string(p)
                    .unwrap_or_default()
                    .contains("reports@tern.test")
            })
            .collect();
        if reports.is_empty() {
            return (0, Vec::new());
        }
        let out = Command::new("python3")
            .arg(CHECK)
            .arg(dns.addr.port().to_string())
            .args(&reports)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let checked: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        let sessions = checked
            .iter()
            .flat_map(|c| c["report"]["policies"].as_array().cloned().unwrap_or_default())
            .map(|p| p["summary"]["total-failure-session-count"].as_u64().unwrap_or(0))
            .sum();
        let ids = checked
            .iter()
            .map(|c| c["report"]["report-id"].as_str().unwrap_or_default().to_owned())
            .collect();
        (sessions, ids)
    };
    wait_for(Duration::from_secs(60), "reports covering the three sessions", || {
        counted().0 >= 3
    });
    // One more session, in a later period: once its report is in, the
    // earlier periods' passes are over, and none was sent twice.
    let out = swaks(&n2, "127.0.0.2", "someone@tern.test", "rcpt@remote.test");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    wait_for(Duration::from_secs(60), "the later session's report", || {
        counted().0 >= 4
    });
    let (sessions, mut ids) = counted();
    assert_eq!(sessions, 4, "{}", n1.logs());
    let all = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), all, "a period reported twice: {ids:?}");
}
