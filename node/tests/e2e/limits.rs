//! SMTP resource limits against a real ternd: concurrent sessions per
//! client address, slow clients and the session deadline, the memory budget
//! under many concurrent large messages, PROXY protocol from trusted
//! proxies only, and the config errors for the new bounds.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::Command;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use crate::harness::{body, hold_mail, ternd_bin, wait_for, Client, Node};
use crate::metrics::{scrape, sum};

/// A blocking connection to `addr` from the local address `source`
/// (e.g. 127.0.0.2, which reaches 127.0.0.1 over loopback).
fn connect_from(source: IpAddr, addr: SocketAddr) -> BufReader<TcpStream> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stream = rt.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(source, 0)).unwrap();
        tokio::time::timeout(Duration::from_secs(5), socket.connect(addr))
            .await
            .expect("connect deadline")
            .unwrap()
    });
    let stream = stream.into_std().unwrap();
    stream.set_nonblocking(false).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    BufReader::new(stream)
}

fn read_reply(r: &mut BufReader<TcpStream>) -> String {
    tern_testkit::smtp::read_reply(r).unwrap_or_else(|e| format!("<{e}>"))
}

fn command(r: &mut BufReader<TcpStream>, line: &str) -> String {
    r.get_mut().write_all(format!("{line}\r\n").as_bytes()).unwrap();
    read_reply(r)
}

/// True once the server has closed `r` (EOF or reset), without a reply.
fn closed_without_reply(r: &mut BufReader<TcpStream>) -> bool {
    let mut line = String::new();
    match r.read_line(&mut line) {
        Ok(0) | Err(_) => true,
        Ok(_) => panic!("expected no reply, got {line:?}"),
    }
}

#[test]
fn per_ip_limit_refuses_the_next_session_and_not_another_address() {
    let node = Node::start(&format!("[smtp]\nmax_connections_per_ip = 3\n\n{}", hold_mail()));
    let held: Vec<Client> = (0..3).map(|_| Client::connect(node.smtp).unwrap()).collect();
    let mut fourth = connect_from("127.0.0.1".parse().unwrap(), node.smtp);
    assert_eq!(
        read_reply(&mut fourth),
        "421 4.7.0 Too many connections from your address"
    );
    assert!(closed_without_reply(&mut fourth));
    let mut other = connect_from("127.0.0.2".parse().unwrap(), node.smtp);
    assert!(read_reply(&mut other).starts_with("220 mx1.tern.test"));
    assert!(command(&mut other, "EHLO other.test").starts_with("250"));
    let samples = scrape(&node);
    assert_eq!(sum(&samples, "tern_smtp_limited_total", &[("limit", "per_ip")]), 1.0);
    // A slot comes back when a session ends.
    drop(held);
    wait_for(Duration::from_secs(10), "a new session from 127.0.0.1", || {
        Client::connect(node.smtp).is_ok()
    });
}

#[test]
fn connection_rate_per_address() {
    let node = Node::start(&format!(
        "[smtp]\nmax_connection_rate_per_ip = \"3/min\"\n\n{}",
        hold_mail()
    ));
    for _ in 0..3 {
        let mut c = Client::connect(node.smtp).unwrap();
        c.command("QUIT").unwrap();
    }
    let mut fourth = connect_from("127.0.0.1".parse().unwrap(), node.smtp);
    assert_eq!(
        read_reply(&mut fourth),
        "421 4.7.0 Too many connections from your address, slow down"
    );
    let mut other = connect_from("127.0.0.2".parse().unwrap(), node.smtp);
    assert!(read_reply(&mut other).starts_with("220 "));
    let samples = scrape(&node);
    assert_eq!(
        sum(&samples, "tern_smtp_limited_total", &[("limit", "connection_rate")]),
        1.0
    );
}

#[test]
fn slow_client_is_cut_off_and_the_session_deadline_keeps_accepted_mail() {
    let node = Node::start(&format!(
        "[smtp]\nmin_data_rate = 1024\nmax_session_secs = 20\n\n{}",
        hold_mail()
    ));
    let addr = node.smtp;
    // A client trickling 3 bytes a second: cut off after the 10 s grace.
    let slow = std::thread::spawn(move || {
        let mut c = connect_from("127.0.0.1".parse().unwrap(), addr);
        assert!(read_reply(&mut c).starts_with("220"));
        for line in ["EHLO slow.test", "MAIL FROM:<a@slow.test>", "RCPT TO:<b@example.test>"] {
            assert!(command(&mut c, line).starts_with("250"));
        }
        assert!(command(&mut c, "DATA").starts_with("354"));
        // The one-second read timeout paces the trickle.
        c.get_ref().set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let start = Instant::now();
        let mut line = String::new();
        while start.elapsed() < Duration::from_secs(60) {
            let _ = c.get_mut().write_all(b"abc");
            match c.read_line(&mut line) {
                Ok(_) => break,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(e) => panic!("{e} after {line:?}"),
            }
        }
        (line, start.elapsed())
    });
    // A busy client that never finishes: the session deadline ends it, after its message was queued.
    let busy = std::thread::spawn(move || {
        let start = Instant::now();
        let mut c = Client::connect(addr).unwrap();
        c.command("EHLO busy.test").unwrap();
        let id = c
            .send_mail("a@busy.test", &["b@example.test"], &body("busy", 500))
            .unwrap();
        let mut last = String::new();
        for _ in 0..30 {
            last = c.command("NOOP").unwrap_or_else(|e| format!("<{e}>"));
            if !last.starts_with("250") {
                break;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        (id, last, start.elapsed(), c.read_to_end())
    });
    let (reply, waited) = slow.join().unwrap();
    assert_eq!(reply, "421 4.4.2 mx1.tern.test Error: data transfer rate too low\r\n");
    // 10 s grace plus the few bytes' worth, with a margin for a loaded machine.
    assert!(
        waited >= Duration::from_secs(9) && waited < Duration::from_secs(20),
        "{waited:?}"
    );
    let (id, last, waited, rest) = busy.join().unwrap();
    assert_eq!(last, "421 4.4.2 mx1.tern.test Error: session time limit exceeded");
    assert!(rest.is_empty(), "{rest}");
    assert!(
        waited >= Duration::from_secs(19) && waited < Duration::from_secs(30),
        "{waited:?}"
    );
    assert!(
        node.queued_ids().contains(&id),
        "the message accepted before the deadline is queued"
    );
    let samples = scrape(&node);
    assert_eq!(sum(&samples, "tern_smtp_limited_total", &[("limit", "data_rate")]), 1.0);
    assert_eq!(
        sum(&samples, "tern_smtp_limited_total", &[("limit", "session_time")]),
        1.0
    );
}

/// A `VmRSS:`/`VmHWM:` figure of process `pid`, bytes.
fn vm(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

#[test]
fn memory_budget_answers_452_and_every_250_is_queued() {
    const CLIENTS: usize = 20;
    const SIZE: usize = 2_000_000;
    // 8 MiB holds four 2 MB messages at once.
    let node = Node::start(&format!(
        "[smtp]\nmemory_budget_mb = 8\nmax_connections_per_ip = 50\n\n[policy]\nmax_message_size = 4194304\n\n{}",
        hold_mail()
    ));
    let pid = node.pid().unwrap();
    // Warm up (first message, first Raft writes) before the baseline.
    let mut c = Client::connect(node.smtp).unwrap();
    c.command("EHLO warm.test").unwrap();
    c.send_mail("a@warm.test", &["b@example.test"], &body("warm", SIZE))
        .unwrap();
    let (rss_before, hwm_before) = (vm(pid, "VmRSS:"), vm(pid, "VmHWM:"));

    let addr = node.smtp;
    // Every client asks DATA at once (`asked`); those answered 354 send
    // their content but not the final dot and wait (`held`) while the test
    // reads the node's memory; then all finish (`release`), and those
    // refused retry the same transaction until they get memory.
    let asked = Arc::new(Barrier::new(CLIENTS));
    let held = Arc::new(Barrier::new(CLIENTS + 1));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (asked, held) = (Arc::clone(&asked), Arc::clone(&held));
            std::thread::spawn(move || {
                let text = body(&format!("big{i}"), SIZE);
                let mut c = Client::connect(addr).unwrap();
                c.command("EHLO big.test").unwrap();
                let mail = c
                    .command(&format!("MAIL FROM:<a@big.test> SIZE={}", text.len()))
                    .unwrap();
                assert!(mail.starts_with("250"), "{mail}");
                assert!(c.command("RCPT TO:<b@example.test>").unwrap().starts_with("250"));
                let first = c.command("DATA").unwrap();
                asked.wait();
                if first.starts_with("354") {
                    c.send_raw(text.as_bytes()).unwrap();
                }
                held.wait(); // held
                held.wait(); // released
                let mut reply = first.clone();
                let end = Instant::now() + Duration::from_secs(120);
                while reply.starts_with("452") {
                    assert_eq!(reply, "452 4.3.1 Insufficient system storage, try again later");
                    assert!(Instant::now() < end, "client {i} never got memory");
                    std::thread::sleep(Duration::from_millis(50));
                    reply = c.command("DATA").unwrap();
                    if reply.starts_with("354") {
                        c.send_raw(text.as_bytes()).unwrap();
                    }
                }
                assert!(reply.starts_with("354"), "{reply}");
                let done = c.command(".").unwrap();
                assert!(done.starts_with("250 2.0.0 Ok: queued as "), "{done}");
                (done.rsplit(' ').next().unwrap().to_owned(), first.starts_with("452"))
            })
        })
        .collect();
    held.wait();
    // The content the admitted sessions sent is read once RSS stops growing.
    let mut rss = vm(pid, "VmRSS:");
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = vm(pid, "VmRSS:");
        if now <= rss || Instant::now() > end {
            break;
        }
        rss = now;
    }
    let samples = scrape(&node);
    let reserved = sum(&samples, "tern_smtp_memory_reserved_bytes", &[]);
    held.wait();
    let results: Vec<(String, bool)> = clients.into_iter().map(|t| t.join().unwrap()).collect();
    let refused = results.iter().filter(|(_, refused)| *refused).count();
    // Four fit in 8 MiB; the others waited and then got in.
    assert_eq!(refused, CLIENTS - 4, "refused at first");
    // Each reserved its declared SIZE (the body is a line longer than SIZE at most).
    assert!(
        (4.0 * SIZE as f64..4.0 * (SIZE + 100) as f64).contains(&reserved),
        "reserved {reserved} while held"
    );
    let queued = node.queued_ids();
    for (id, _) in &results {
        assert!(queued.contains(id), "{id} was answered 250 but is not queued");
    }
    let samples = scrape(&node);
    assert_eq!(sum(&samples, "tern_smtp_memory_reserved_bytes", &[]), 0.0);
    assert!(sum(&samples, "tern_smtp_limited_total", &[("limit", "memory_budget")]) >= refused as f64);
    // While the admitted sessions hold their content: the budget (8 MiB)
    // plus 16 MiB for twenty sessions' read buffers and allocator slack.
    // Measured 6-12 MB; without the budget all twenty hold theirs (39 MB).
    let holding = rss.saturating_sub(rss_before);
    // The peak over the whole run also has the queueing path's copies of up
    // to four messages at once and the Raft log of 40 MB of new mail; a
    // sanity bound (measured 51-57 MB, 64-71 MB without the budget).
    let peak = vm(pid, "VmHWM:").saturating_sub(hwm_before);
    eprintln!("RSS while held +{} KiB, peak +{} KiB", holding / 1024, peak / 1024);
    assert!(
        holding < 24 << 20,
        "RSS grew by {holding} bytes while sessions held content"
    );
    assert!(peak < 96 << 20, "peak RSS grew by {peak} bytes");
}

/// A PROXY v2 header for a TCP client `source` talking to `destination`.
fn proxy_v2(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n\x21".to_vec();
    match (source.ip(), destination.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            h.extend_from_slice(&[0x11, 0, 12]);
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            h.extend_from_slice(&[0x21, 0, 36]);
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
        }
        _ => panic!("mixed families"),
    }
    h.extend_from_slice(&source.port().to_be_bytes());
    h.extend_from_slice(&destination.port().to_be_bytes());
    h
}

/// One transaction to `rcpt`; the queue id, or the first reply that was not 2xx/3xx.
fn transaction(c: &mut BufReader<TcpStream>, rcpt: &str, tag: &str) -> Result<String, String> {
    for line in [
        "EHLO proxied.test",
        "MAIL FROM:<a@client.test>",
        &format!("RCPT TO:<{rcpt}>"),
        "DATA",
    ] {
        let r = command(c, line);
        if !(r.starts_with('2') || r.starts_with('3')) {
            return Err(r);
        }
    }
    c.get_mut().write_all(body(tag, 300).as_bytes()).unwrap();
    let r = command(c, ".");
    r.strip_prefix("250 2.0.0 Ok: queued as ").map(str::to_owned).ok_or(r)
}

#[test]
fn proxy_protocol_from_trusted_proxies_only() {
    // 127.0.0.2 is the load balancer; 192.0.2.0/24 may relay, loopback may not.
    let node = Node::start(&format!(
        "[smtp]\nproxy_protocol_from = [\"127.0.0.2/32\"]\n\n[policy]\nlocal_domains = [\"example.test\"]\n\
         relay_networks = [\"192.0.2.0/24\"]\n\n{}",
        hold_mail()
    ));
    let proxy: IpAddr = "127.0.0.2".parse().unwrap();
    // v1 from the trusted proxy: the client 192.0.2.7 may relay.
    let mut c = connect_from(proxy, node.smtp);
    c.get_mut()
        .write_all(format!("PROXY TCP4 192.0.2.7 127.0.0.1 40001 {}\r\n", node.smtp.port()).as_bytes())
        .unwrap();
    assert!(read_reply(&mut c).starts_with("220 "));
    let v1 = transaction(&mut c, "far@relay.test", "v1").unwrap();
    // v2 (IPv6 client) from the trusted proxy: not in relay_networks.
    let mut c = connect_from(proxy, node.smtp);
    c.get_mut()
        .write_all(&proxy_v2(
            "[2001:db8::9]:40002".parse().unwrap(),
            "[2001:db8::25]:25".parse().unwrap(),
        ))
        .unwrap();
    assert!(read_reply(&mut c).starts_with("220 "));
    assert_eq!(
        transaction(&mut c, "far@relay.test", "v2denied"),
        Err("554 5.7.1 <far@relay.test>: Relay access denied".into())
    );
    command(&mut c, "RSET");
    let v2 = transaction(&mut c, "bob@example.test", "v2").unwrap();
    // The same v1 header from an untrusted address is a bad command, and
    // its claimed address grants nothing.
    let mut c = connect_from("127.0.0.1".parse().unwrap(), node.smtp);
    assert!(read_reply(&mut c).starts_with("220 "));
    let r = command(&mut c, "PROXY TCP4 192.0.2.7 127.0.0.1 40003 25");
    assert!(r.starts_with("500 5.5."), "{r}");
    assert_eq!(
        transaction(&mut c, "far@relay.test", "untrusted"),
        Err("554 5.7.1 <far@relay.test>: Relay access denied".into())
    );
    // The trusted proxy without a header (or a garbled one) is closed unanswered.
    let mut c = connect_from(proxy, node.smtp);
    c.get_mut().write_all(b"EHLO direct.test\r\n").unwrap();
    assert!(closed_without_reply(&mut c));
    let mut c = connect_from(proxy, node.smtp);
    c.get_mut().write_all(b"PROXY TCP4 192.0.2.7 nonsense\r\n").unwrap();
    assert!(closed_without_reply(&mut c));

    for (id, client) in [(&v1, "192.0.2.7"), (&v2, "2001:db8::9")] {
        let m = node.ternctl_json(&["queue", "show", id, "--body"]);
        assert_eq!(m["client_ip"], client, "{m}");
        let body = m["body"].as_str().unwrap();
        assert!(
            body.contains(&format!("Received: from proxied.test ([{client}])")),
            "{body}"
        );
    }
    let logs = node.logs();
    for (id, client) in [(&v1, "192.0.2.7"), (&v2, "2001:db8::9")] {
        assert!(
            logs.lines()
                .any(|l| l.contains("event=\"received\"") && l.contains(id.as_str()) && l.contains(client)),
            "no received event for {id} naming {client}"
        );
    }
    assert!(
        logs.contains("without a valid PROXY header"),
        "the refusal is logged with its reason"
    );
}

#[test]
fn resource_limit_config_errors_name_the_key() {
    for (toml, needle) in [
        (
            "[smtp]\nmax_connections_per_ip = 0\n",
            "smtp.max_connections_per_ip: must be at least 1",
        ),
        ("[smtp]\nmax_connections = 0\n", "smtp.max_connections"),
        ("[delivery]\nscheduler_tick_ms = 1\n", "delivery.scheduler_tick_ms"),
        ("[policy]\nmax_message_size = 2147483648\n", "policy.max_message_size"),
        ("[policy]\nmax_recipients = 1000000\n", "policy.max_recipients"),
        ("[smtp]\nmemory_budget_mb = 8\n", "smtp.memory_budget_mb"),
        ("[smtp]\nproxy_protocol_from = [\"not-a-net\"]\n", "proxy_protocol_from"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tern.toml");
        std::fs::write(&path, toml).unwrap();
        let out = Command::new(ternd_bin()).arg("--config").arg(&path).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{toml}: ternd started");
        assert!(stderr.contains(needle), "{toml}: {stderr}");
    }
}
