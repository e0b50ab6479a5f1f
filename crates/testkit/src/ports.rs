//! Free loopback ports, for listeners that bind them later, and ports that
//! refuse connections for as long as the test needs.

use std::net::{SocketAddr, TcpListener, UdpSocket};

/// A free loopback TCP port for a listener that binds it later.
///
/// Taken from 20000..32000, below Linux's ephemeral range (32768..60999):
/// a port released after `bind(0)` can be handed to any outgoing connection
/// before the node binds it (CI saw exactly that). Each process walks its
/// own pid-derived sequence and checks the port is free right now.
/// Panics when the whole range is taken.
pub fn free_port() -> u16 {
    next_port(|port| TcpListener::bind(("127.0.0.1", port)).is_ok())
}

/// As [`free_port`], free for both UDP and TCP right now (a DNS server).
pub fn free_udp_tcp_port() -> u16 {
    next_port(|port| UdpSocket::bind(("127.0.0.1", port)).is_ok() && TcpListener::bind(("127.0.0.1", port)).is_ok())
}

fn next_port(free: impl Fn(u16) -> bool) -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 20000;
    const SPAN: u32 = 12000;
    let base = std::process::id().wrapping_mul(7919) % SPAN;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOW + (base + n) % SPAN) as u16;
        if free(port) {
            return port;
        }
    }
    panic!("no free loopback port in {LOW}..{}", LOW + SPAN)
}

/// A loopback port where connections are refused for as long as this lives:
/// bound (without SO_REUSEADDR) but not listening, so no other process on
/// the machine can start listening on it mid-test. A port that is merely
/// free may be taken by another test run's listener that accepts and never
/// greets, and delivery then waits out the 5-minute greeting timeout.
pub struct ClosedPort {
    pub port: u16,
    _socket: tokio::net::TcpSocket,
}

/// See [`ClosedPort`].
pub fn closed_port() -> ClosedPort {
    for _ in 0..100 {
        let port = free_port();
        let socket = tokio::net::TcpSocket::new_v4().expect("TCP socket");
        if socket.bind(SocketAddr::from(([127, 0, 0, 1], port))).is_ok() {
            return ClosedPort { port, _socket: socket };
        }
    }
    panic!("no loopback port could be reserved")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_below_the_ephemeral_range_and_bindable() {
        let (a, b) = (free_port(), free_port());
        assert_ne!(a, b);
        for port in [a, b] {
            assert!((20000..32000).contains(&port), "{port}");
            TcpListener::bind(("127.0.0.1", port)).expect("bindable");
        }
        let dns = free_udp_tcp_port();
        UdpSocket::bind(("127.0.0.1", dns)).expect("UDP bindable");
        TcpListener::bind(("127.0.0.1", dns)).expect("TCP bindable");
    }

    #[test]
    fn a_closed_port_refuses_connections() {
        let closed = closed_port();
        let refused = std::net::TcpStream::connect(("127.0.0.1", closed.port)).expect_err("refused");
        assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    }
}
