//! TCP proxies between nodes' gRPC ports, so the harness can cut and heal
//! links without root. There is one proxy per ordered pair of nodes: node j
//! dials node i through proxy (j→i), whose address is what node j's
//! `[cluster] peer_addresses` gives for i. Cutting a proxy closes its open
//! connections and closes every new one at once; healing lets them through
//! again. `ternctl` talks to nodes directly, never through a proxy.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

struct Shared {
    target: SocketAddr,
    open: AtomicBool,
    stop: AtomicBool,
    next_conn: AtomicU64,
    /// Both sockets of every live connection (to close them on a cut).
    conns: Mutex<HashMap<u64, (TcpStream, TcpStream)>>,
}

/// One forwarding proxy `addr` → `target`.
pub struct Proxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Proxy {
    pub fn start(target: SocketAddr) -> anyhow::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            target,
            open: AtomicBool::new(true),
            stop: AtomicBool::new(false),
            next_conn: AtomicU64::new(0),
            conns: Mutex::new(HashMap::new()),
        });
        let s = Arc::clone(&shared);
        std::thread::Builder::new()
            .name(format!("proxy-{addr}"))
            .spawn(move || accept_loop(listener, s))?;
        Ok(Proxy { addr, shared })
    }

    pub fn target(&self) -> SocketAddr {
        self.shared.target
    }

    pub fn is_open(&self) -> bool {
        self.shared.open.load(Ordering::SeqCst)
    }

    /// Closes every connection through the proxy; new ones are closed at once.
    pub fn cut(&self) {
        self.shared.open.store(false, Ordering::SeqCst);
        let conns: Vec<_> = self
            .shared
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .collect();
        for (_, (a, b)) in conns {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
    }

    /// Lets connections through again.
    pub fn heal(&self) {
        self.shared.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.cut();
        // Wake the accept loop so it sees `stop`.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for conn in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = conn else { continue };
        if !shared.open.load(Ordering::SeqCst) {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        }
        let s = Arc::clone(&shared);
        let _ = std::thread::Builder::new()
            .name("proxy-conn".into())
            .spawn(move || serve(client, s));
    }
}

fn serve(client: TcpStream, shared: Arc<Shared>) {
    let Ok(upstream) = TcpStream::connect_timeout(&shared.target, Duration::from_secs(2)) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let id = shared.next_conn.fetch_add(1, Ordering::SeqCst);
    let (Ok(c2), Ok(u2), Ok(c3), Ok(u3)) = (
        client.try_clone(),
        upstream.try_clone(),
        client.try_clone(),
        upstream.try_clone(),
    ) else {
        return;
    };
    {
        let mut conns = shared.conns.lock().unwrap_or_else(|p| p.into_inner());
        // A cut between the accept and here: drop the connection.
        if !shared.open.load(Ordering::SeqCst) {
            let _ = client.shutdown(Shutdown::Both);
            let _ = upstream.shutdown(Shutdown::Both);
            return;
        }
        conns.insert(id, (c3, u3));
    }
    let back = std::thread::Builder::new()
        .name("proxy-back".into())
        .spawn(move || pump(u2, c2));
    pump(client, upstream);
    if let Ok(h) = back {
        let _ = h.join();
    }
    shared.conns.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
}

/// Copies `from` → `to` until EOF or an error, then closes both directions.
fn pump(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

/// The proxies of a cluster: one per ordered pair (from, to) of node ids.
pub struct Mesh {
    proxies: BTreeMap<(u64, u64), Proxy>,
}

impl Mesh {
    /// Proxies for every ordered pair of `grpc` (node id → own gRPC address).
    pub fn start(grpc: &BTreeMap<u64, SocketAddr>) -> anyhow::Result<Mesh> {
        let mut proxies = BTreeMap::new();
        for &from in grpc.keys() {
            for (&to, &target) in grpc {
                if from != to {
                    proxies.insert((from, to), Proxy::start(target)?);
                }
            }
        }
        Ok(Mesh { proxies })
    }

    /// `peer_addresses` for node `from`: each peer's proxy (from→peer).
    pub fn peer_addresses(&self, from: u64) -> BTreeMap<u64, SocketAddr> {
        self.proxies
            .iter()
            .filter(|((f, _), _)| *f == from)
            .map(|((_, t), p)| (*t, p.addr))
            .collect()
    }

    pub fn proxy(&self, from: u64, to: u64) -> Option<&Proxy> {
        self.proxies.get(&(from, to))
    }

    /// Cuts every link into and out of `node`.
    pub fn partition(&self, node: u64) {
        for ((f, t), p) in &self.proxies {
            if *f == node || *t == node {
                p.cut();
            }
        }
    }

    /// Restores every link of `node` (links cut for another partitioned
    /// node stay cut).
    pub fn heal(&self, node: u64, still_partitioned: &[u64]) {
        for ((f, t), p) in &self.proxies {
            if (*f == node || *t == node) && !still_partitioned.contains(f) && !still_partitioned.contains(t) {
                p.heal();
            }
        }
    }

    /// Restores every link.
    pub fn heal_all(&self) {
        for p in self.proxies.values() {
            p.heal();
        }
    }
}
