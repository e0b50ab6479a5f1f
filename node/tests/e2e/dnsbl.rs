//! DNS block lists at RCPT time against a real DNS server (dnsmasq serving
//! test lists): a listed client gets `554 5.7.1` naming the list, scores
//! add up across zones, answers outside 127.0.0.0/8 and unlisted codes do
//! not count, IPv6 clients are asked in nibble form, postmaster stays
//! reachable, and a list that fails or never answers lets mail through.
//! Clients take their addresses from PROXY headers (the node trusts
//! loopback as a proxy), so one loopback test can be many clients.

use std::io::{BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::harness::*;
use crate::metrics::get_metrics;
use tern_testkit::dns::{DnsServer, ServfailServer};

/// A session from `client` (claimed by a PROXY v1 header), greeted.
pub(crate) struct Session(pub(crate) BufReader<TcpStream>);

impl Session {
    pub(crate) fn open(node: &Node, client: &str) -> Session {
        let s = TcpStream::connect_timeout(&node.smtp, Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let (family, to) = if client.contains(':') {
            ("TCP6", "::1")
        } else {
            ("TCP4", "127.0.0.1")
        };
        let mut session = Session(BufReader::new(s));
        session
            .0
            .get_mut()
            .write_all(format!("PROXY {family} {client} {to} 40000 25\r\n").as_bytes())
            .unwrap();
        let greeting = tern_testkit::smtp::read_reply(&mut session.0).unwrap();
        assert!(greeting.starts_with("220 "), "{greeting}");
        assert!(session.cmd("EHLO client.test").starts_with("250"));
        session
    }

    pub(crate) fn cmd(&mut self, line: &str) -> String {
        self.0.get_mut().write_all(format!("{line}\r\n").as_bytes()).unwrap();
        tern_testkit::smtp::read_reply(&mut self.0).unwrap()
    }

    /// The reply to RCPT TO:<rcpt> in a new transaction.
    pub(crate) fn rcpt(&mut self, rcpt: &str) -> String {
        assert!(self.cmd("RSET").starts_with("250"));
        assert!(self.cmd("MAIL FROM:<someone@sender.test>").starts_with("250"));
        self.cmd(&format!("RCPT TO:<{rcpt}>"))
    }
}

fn metric(node: &Node, sample: &str) -> f64 {
    let (_, body) = get_metrics(node.http, None);
    body.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The RFC 5782 name of 2001:db8::7 under `zone`.
fn v6_name(zone: &str) -> String {
    let nibbles = "7.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2";
    format!("{nibbles}.{zone}")
}

#[test]
fn listed_clients_are_refused_at_rcpt_naming_the_lists_and_scores_add_up() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let servfail = rt.block_on(ServfailServer::start());
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let dns = DnsServer::start(&format!(
        "host-record=7.2.0.192.bl.test,127.0.0.2\n\
         host-record={},127.0.0.2\n\
         host-record=8.2.0.192.score-a.test,127.0.0.4\n\
         host-record=8.2.0.192.score-b.test,127.0.0.3\n\
         host-record=10.2.0.192.score-a.test,127.0.0.4\n\
         host-record=9.2.0.192.bl.test,10.0.0.2\n\
         host-record=11.2.0.192.bl.test,127.0.0.9\n\
         server=/down.test/{}\n\
         server=/silent.test/{}\n",
        v6_name("bl.test"),
        servfail.addr.to_string().replace(':', "#"),
        silent.local_addr().unwrap().to_string().replace(':', "#"),
    ));
    let maildirs = tempfile::tempdir().unwrap();
    let node = Node::start(&format!(
        "[dns]\nnameservers = [\"{}\"]\n\n[policy]\nrelay_networks = []\nlocal_domains = [\"example.test\"]\n\n\
         [local]\nmaildir = \"{}/{{domain}}/{{user}}\"\n\n\
         [smtp]\nproxy_protocol_from = [\"127.0.0.0/8\", \"::1/128\"]\n\n\
         [dnsbl]\nenabled = true\nreject_score = 5\ntimeout = \"2s\"\nzones = [\n\
         {{ zone = \"bl.test\", codes = [\"127.0.0.2\"], action = \"reject\" }},\n\
         {{ zone = \"score-a.test\", score = 3 }},\n\
         {{ zone = \"score-b.test\", score = 2 }},\n\
         {{ zone = \"down.test\", action = \"reject\" }},\n\
         {{ zone = \"silent.test\", action = \"reject\" }},\n]\n",
        dns.addr,
        maildirs.path().display()
    ));

    // Listed by a reject zone: refused, naming it; postmaster still reachable.
    let mut c = Session::open(&node, "192.0.2.7");
    assert_eq!(
        c.rcpt("bob@example.test"),
        "554 5.7.1 Service unavailable; client [192.0.2.7] blocked using bl.test"
    );
    assert!(c.rcpt("postmaster@example.test").starts_with("250 "));
    assert!(c.rcpt("Postmaster").starts_with("250 "));

    // The same list asked about an IPv6 client in nibble form.
    let mut c = Session::open(&node, "2001:db8::7");
    assert_eq!(
        c.rcpt("bob@example.test"),
        "554 5.7.1 Service unavailable; client [2001:db8::7] blocked using bl.test"
    );

    // 3 + 2 reaches reject_score 5; 3 alone does not.
    let mut c = Session::open(&node, "192.0.2.8");
    assert_eq!(
        c.rcpt("bob@example.test"),
        "554 5.7.1 Service unavailable; client [192.0.2.8] blocked using score-a.test, score-b.test"
    );
    let mut c = Session::open(&node, "192.0.2.10");
    assert!(c.rcpt("bob@example.test").starts_with("250 "));

    // An answer outside 127.0.0.0/8, or a code not in `codes`, is no listing.
    for client in ["192.0.2.9", "192.0.2.11"] {
        let mut c = Session::open(&node, client);
        let reply = c.rcpt("bob@example.test");
        assert!(reply.starts_with("250 "), "{client}: {reply}");
    }

    // A clean client's mail is accepted whole, although two lists fail
    // (SERVFAIL, and no answer within the timeout): they fail open.
    let mut c = Session::open(&node, "192.0.2.1");
    assert!(c.rcpt("bob@example.test").starts_with("250 "));
    assert!(c.cmd("DATA").starts_with("354"));
    c.0.get_mut().write_all(body("clean", 200).as_bytes()).unwrap();
    let queued = c.cmd(".");
    assert!(queued.starts_with("250 2.0.0"), "{queued}");

    assert_eq!(metric(&node, "tern_dnsbl_rejections_total{zone=\"bl.test\"}"), 2.0);
    assert_eq!(metric(&node, "tern_dnsbl_rejections_total{zone=\"score-a.test\"}"), 1.0);
    assert_eq!(metric(&node, "tern_dnsbl_rejections_total{zone=\"score-b.test\"}"), 1.0);
    assert_eq!(metric(&node, "tern_dnsbl_listed_total{zone=\"score-a.test\"}"), 2.0);
    // Seven clients, each asked about once (postmaster needs no new lookup).
    assert_eq!(metric(&node, "tern_dnsbl_lookups_total{result=\"timeout\"}"), 7.0);
    assert_eq!(metric(&node, "tern_dnsbl_lookups_total{result=\"failed\"}"), 7.0);
    let log = dns.log();
    assert!(log.contains(&v6_name("bl.test")), "no nibble query in:\n{log}");
    drop(silent);
}
