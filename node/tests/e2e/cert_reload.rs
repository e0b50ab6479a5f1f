//! The SMTP listener's certificate follows its files and SIGHUP without
//! dropping sessions: a real ternd, certificates from a test CA (openssl),
//! and a rustls client that verifies what it is served.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::harness::*;
use tern_testkit::peers::TestCa;

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// Every file is padded to this size, so that an in-place rewrite keeps it.
const PADDED: usize = 8192;

/// One SMTP reply (all its lines), read byte by byte up to the final line.
fn reply(r: &mut impl Read) -> String {
    let mut all = Vec::new();
    let mut line_start = 0;
    let mut b = [0u8; 1];
    loop {
        let n = r.read(&mut b).expect("reading a reply");
        assert!(n == 1, "connection closed after {:?}", String::from_utf8_lossy(&all));
        all.push(b[0]);
        if b[0] == b'\n' {
            let line = &all[line_start..];
            if line.len() >= 4 && line[3] == b' ' {
                return String::from_utf8_lossy(&all).into_owned();
            }
            line_start = all.len();
        }
        assert!(all.len() < 64 * 1024, "reply too long");
    }
}

fn command(s: &mut (impl Read + Write), line: &str) -> String {
    s.write_all(format!("{line}\r\n").as_bytes()).unwrap();
    s.flush().unwrap();
    reply(s)
}

/// Connects, STARTTLS, verifies the server as `mx.tern.test` against `ca`,
/// says EHLO over TLS; returns the session and the certificate served.
fn starttls(addr: SocketAddr, ca: &Path) -> (Tls, Vec<u8>) {
    let mut tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    assert!(reply(&mut tcp).starts_with("220"));
    assert!(command(&mut tcp, "EHLO client.test").contains("STARTTLS"));
    assert!(command(&mut tcp, "STARTTLS").starts_with("220"));
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der(ca)).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("mx.tern.test").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    assert!(command(&mut tls, "EHLO client.test").starts_with("250"));
    let served = tls.conn.peer_certificates().unwrap()[0].to_vec();
    (tls, served)
}

/// The certificate a new session is served.
pub(crate) fn served(addr: SocketAddr, ca: &Path) -> Vec<u8> {
    let (mut tls, cert) = starttls(addr, ca);
    command(&mut tls, "QUIT");
    cert
}

/// DER of the first certificate in a PEM file.
pub(crate) fn der(pem: &Path) -> rustls::pki_types::CertificateDer<'static> {
    let text = std::fs::read(pem).unwrap();
    let first = rustls_pemfile::certs(&mut text.as_slice()).next().unwrap().unwrap();
    first
}

/// Rewrites `to` in place (same inode, same size, same modification time):
/// a change the file poll cannot see, only SIGHUP.
fn rewrite_unnoticed(from: &Path, to: &Path) {
    let mtime = std::fs::metadata(to).unwrap().modified().unwrap();
    let mut text = std::fs::read(from).unwrap();
    assert!(text.len() < PADDED);
    text.resize(PADDED, b'\n');
    let mut f = std::fs::OpenOptions::new().write(true).open(to).unwrap();
    f.write_all(&text).unwrap();
    f.set_modified(mtime).unwrap();
}

/// Replaces `to` by a renamed new file (new inode), as deployment tools do.
pub(crate) fn replace(from: &Path, to: &Path) {
    let mut text = std::fs::read(from).unwrap();
    text.resize(PADDED, b'\n');
    let tmp = to.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

#[test]
fn certificate_follows_its_files_and_sighup_without_dropping_sessions() {
    let ca = TestCa::new("Tern Listener CA");
    let pair = |label: &str| ca.issue(label, &["mx.tern.test"]);
    let (a, b, c) = (pair("a"), pair("b"), pair("c"));
    let dir = tempfile::tempdir().unwrap();
    let live: (PathBuf, PathBuf) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    replace(&a.0, &live.0);
    replace(&a.1, &live.1);
    let node = Node::start(&format!(
        "{}[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        hold_mail(),
        live.0.display(),
        live.1.display()
    ));
    let (a_der, b_der, c_der) = (der(&a.0).to_vec(), der(&b.0).to_vec(), der(&c.0).to_vec());

    // A session on certificate A stays open through every reload below.
    let (mut open, first) = starttls(node.smtp, &ca.cert);
    assert_eq!(first, a_der);
    assert!(command(&mut open, "MAIL FROM:<a@tern.test>").starts_with("250"));

    // Files replaced: new sessions get B within a few polls.
    replace(&b.0, &live.0);
    replace(&b.1, &live.1);
    wait_for(Duration::from_secs(20), "new sessions served certificate B", || {
        served(node.smtp, &ca.cert) == b_der
    });
    assert!(command(&mut open, "RCPT TO:<r@example.test>").starts_with("250"));

    // C written where the poll cannot see it: still B until SIGHUP.
    rewrite_unnoticed(&c.0, &live.0);
    rewrite_unnoticed(&c.1, &live.1);
    let quiet_until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < quiet_until {
        assert_eq!(served(node.smtp, &ca.cert), b_der, "reloaded without SIGHUP");
        std::thread::sleep(Duration::from_millis(500));
    }
    node.send_signal("HUP");
    wait_for(Duration::from_secs(20), "new sessions served certificate C", || {
        served(node.smtp, &ca.cert) == c_der
    });

    // A broken certificate file keeps C, and is counted.
    std::fs::write(
        &live.0,
        "-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    node.send_signal("HUP");
    wait_for(Duration::from_secs(20), "the reload error counted", || {
        crate::metrics::sum(&crate::metrics::scrape(&node), "tern_tls_reload_errors_total", &[]) >= 1.0
    });
    assert_eq!(served(node.smtp, &ca.cert), c_der);
    assert!(node.logs().contains("TLS certificate reload failed"), "{}", node.logs());

    // The first session, on A all along, finishes normally.
    assert!(command(&mut open, "NOOP").starts_with("250"));
    assert!(command(&mut open, "QUIT").starts_with("221"));
    assert_eq!(open.conn.peer_certificates().unwrap()[0].as_ref(), &a_der[..]);
}
