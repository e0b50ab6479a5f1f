//! A throwaway DNS server for tests: dnsmasq on a free loopback port
//! (UDP and TCP), authoritative for `.test`, serving the records it is
//! given in dnsmasq syntax, e.g.
//!
//! ```text
//! mx-host=example.test,mx1.example.test,10
//! host-record=mx1.example.test,127.0.0.1,::1
//! cname=alias.test,mx1.example.test
//! local-ttl=300
//! ```
//!
//! Names under `.test` that are not configured get NXDOMAIN; other names
//! get REFUSED as there is no upstream (dnsmasq itself answers NXDOMAIN for
//! a few special-use names such as `.invalid`). A zone can be forwarded,
//! e.g. to a [`ServfailServer`], with `server=/zone.test/127.0.0.1#PORT`.
//! Records have TTL 0 unless `local-ttl=` says otherwise. The server is
//! killed when dropped; [`DnsServer::log`] shows every query it got.

use std::fs;
use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long dnsmasq gets to start answering.
const START_DEADLINE: Duration = Duration::from_secs(10);

/// A running dnsmasq; see the module docs.
pub struct DnsServer {
    /// Where it listens, on UDP and TCP.
    pub addr: SocketAddr,
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl DnsServer {
    /// Starts dnsmasq serving `records` (dnsmasq config lines) and waits
    /// until it answers. Panics if it cannot: this is test scaffolding.
    pub fn start(records: &str) -> DnsServer {
        // The port is free when probed but could be taken before dnsmasq
        // binds it, so a failed start is retried on another port.
        let mut last_log = String::new();
        for _ in 0..5 {
            let dir = tempfile::tempdir().expect("temp dir for dnsmasq");
            let port = crate::free_udp_tcp_port();
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let conf = dir.path().join("dnsmasq.conf");
            let log = dir.path().join("dnsmasq.log");
            let pid = dir.path().join("dnsmasq.pid");
            let config = format!(
                "port={port}\nlisten-address=127.0.0.1\nbind-interfaces\nno-resolv\nno-hosts\nno-poll\n\
                 local=/test/\nlog-queries\nlog-facility={}\n{records}\n",
                log.display()
            );
            fs::write(&conf, config).expect("write dnsmasq.conf");
            let child = Command::new("dnsmasq")
                .arg("-k")
                .arg("-C")
                .arg(&conf)
                .arg("--user=root")
                .arg(format!("--pid-file={}", pid.display()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn dnsmasq (apt-get install dnsmasq-base)");
            let mut server = DnsServer {
                addr,
                child,
                log,
                _dir: dir,
            };
            if server.wait_ready() {
                return server;
            }
            last_log = server.log();
        }
        panic!("dnsmasq did not start; last log:\n{last_log}");
    }

    /// dnsmasq's log so far (startup messages and every query).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls with a DNS query until any answer comes, dnsmasq exits, or the
    /// deadline passes.
    fn wait_ready(&mut self) -> bool {
        let Ok(socket) = UdpSocket::bind("127.0.0.1:0") else {
            return false;
        };
        if socket.set_read_timeout(Some(Duration::from_millis(100))).is_err() {
            return false;
        }
        let query = probe_query();
        let deadline = Instant::now() + START_DEADLINE;
        let mut buf = [0u8; 512];
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return false;
            }
            let _ = socket.send_to(&query, self.addr);
            match socket.recv_from(&mut buf) {
                Ok((n, from)) if from == self.addr && n >= 2 && buf[..2] == query[..2] => return true,
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                // ICMP port unreachable while dnsmasq is still starting.
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        false
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A query for `probe.test` A, id 0x7e57.
fn probe_query() -> Vec<u8> {
    let mut q = vec![0x7e, 0x57, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in ["probe", "test"] {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// A DNS server that answers every UDP query with SERVFAIL, for testing
/// temporary failures (alone, or as a dnsmasq upstream via
/// `server=/zone.test/127.0.0.1#PORT`). Needs a tokio runtime; stops when
/// dropped.
pub struct ServfailServer {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl ServfailServer {
    pub async fn start() -> ServfailServer {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind UDP on loopback");
        let addr = socket.local_addr().expect("local addr");
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                if n < 12 {
                    continue;
                }
                // Echo the query back as a response: QR set, RA set, RCODE 2.
                buf[2] |= 0x80;
                buf[3] = 0x80 | 2;
                let _ = socket.send_to(&buf[..n], from).await;
            }
        });
        ServfailServer { addr, task }
    }
}

impl Drop for ServfailServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
