//! A cluster the harness did not start (tern-chaos `--endpoints`): nodes
//! are known by their gRPC admin addresses; faults act on the local
//! processes that listen on them, found through `/proc/net/tcp{,6}` (socket
//! inode) and `/proc/PID/fd`. A restart runs `/proc/PID/cmdline` again in
//! `/proc/PID/cwd` (output to a log file). Links cannot be cut (no proxies
//! between the nodes): `partition` is an error.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;

use crate::cluster::{ShardInfo, TERNCTL_TIMEOUT};
use crate::load::Targets;
use crate::process::{run_bounded, State};
use crate::sink::Sink;

/// Listening TCP sockets (IPv4 and IPv6): address → socket inode.
pub fn listening_sockets() -> Vec<(SocketAddr, u64)> {
    let mut out = Vec::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
            if f.len() < 10 || f[3] != "0A" {
                continue;
            }
            if let (Some(addr), Ok(inode)) = (parse_proc_addr(f[1]), f[9].parse()) {
                out.push((addr, inode));
            }
        }
    }
    out
}

/// `0100007F:1F90` (or 32 hex digits for IPv6): each 32-bit word is printed
/// in host byte order.
fn parse_proc_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| {
        u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16)
            .ok()
            .map(u32::to_ne_bytes)
    };
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Socket inodes a process holds open (`/proc/PID/fd/N -> socket:[INODE]`).
fn socket_inodes(pid: u32) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return out;
    };
    for e in dir.flatten() {
        if let Ok(link) = std::fs::read_link(e.path()) {
            let link = link.to_string_lossy().into_owned();
            if let Some(n) = link.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                if let Ok(n) = n.parse() {
                    out.insert(n);
                }
            }
        }
    }
    out
}

/// The local process (readable by us) listening on TCP `port`.
pub fn pid_listening_on(port: u16) -> Option<u32> {
    let inodes: BTreeSet<u64> = listening_sockets()
        .into_iter()
        .filter(|(a, _)| a.port() == port)
        .map(|(_, i)| i)
        .collect();
    if inodes.is_empty() {
        return None;
    }
    let dir = std::fs::read_dir("/proc").ok()?;
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if !socket_inodes(pid).is_disjoint(&inodes) {
            return Some(pid);
        }
    }
    None
}

/// Addresses a process listens on.
pub fn listening_of(pid: u32) -> Vec<SocketAddr> {
    let mine = socket_inodes(pid);
    listening_sockets()
        .into_iter()
        .filter(|(_, i)| mine.contains(i))
        .map(|(a, _)| a)
        .collect()
}

/// The first of `pid`'s listeners (other than `except`) that greets with
/// `220`: its SMTP port. A wildcard address is reached on loopback.
fn discover_smtp(pid: u32, except: u16) -> Option<SocketAddr> {
    let mut addrs = listening_of(pid);
    addrs.sort();
    addrs.dedup();
    addrs.into_iter().filter(|a| a.port() != except).find_map(|mut a| {
        if a.ip().is_unspecified() {
            a.set_ip(if a.is_ipv4() {
                IpAddr::V4(Ipv4Addr::LOCALHOST)
            } else {
                IpAddr::V6(Ipv6Addr::LOCALHOST)
            });
        }
        let s = TcpStream::connect_timeout(&a, Duration::from_secs(1)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
        let mut r = std::io::BufReader::new(s);
        let greeting = tern_testkit::smtp::read_reply(&mut r).ok()?;
        greeting.starts_with("220").then_some(a)
    })
}

/// `ternctl --endpoint GRPC ARGS -o json`, parsed.
fn ternctl_json(ternctl: &Path, grpc: SocketAddr, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let out = run_bounded(
        Command::new(ternctl)
            .arg("--endpoint")
            .arg(grpc.to_string())
            .args(args)
            .args(["-o", "json"]),
        TERNCTL_TIMEOUT,
    )?;
    anyhow::ensure!(
        out.status.success(),
        "ternctl {args:?} on {grpc}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    serde_json::from_slice(&out.stdout).context("ternctl json")
}

struct ExtNode {
    grpc: SocketAddr,
    smtp: Option<SocketAddr>,
    /// SMTP address given on the command line (not rediscovered).
    fixed_smtp: bool,
    pid: u32,
    cmdline: Vec<OsString>,
    cwd: PathBuf,
    state: State,
    /// A process we started (restart): waited for after a kill.
    child: Option<Child>,
    restarts: u32,
}

pub struct External {
    pub sink: Sink,
    nodes: BTreeMap<u64, ExtNode>,
    shards: u32,
    members: usize,
    targets: Targets,
    ternctl: PathBuf,
    /// Output of restarted processes (`nID.restartN.log`).
    pub log_dir: PathBuf,
}

impl External {
    /// Finds each node (`ternctl status` on its gRPC address gives its id;
    /// the local process listening there gives pid, command line and cwd),
    /// discovers its SMTP address unless given (`smtp`, same order as
    /// `grpc`), and starts a sink on `sink` (the cluster's `[[route]]` must
    /// point there).
    pub fn connect(
        grpc: &[SocketAddr],
        smtp: &[SocketAddr],
        sink: SocketAddr,
        log_dir: PathBuf,
    ) -> anyhow::Result<External> {
        anyhow::ensure!(!grpc.is_empty(), "no --endpoints");
        anyhow::ensure!(
            smtp.is_empty() || smtp.len() == grpc.len(),
            "--smtp needs one address per endpoint ({} given, {} endpoints)",
            smtp.len(),
            grpc.len()
        );
        let ternctl = tern_testkit::try_bin("ternctl")?;
        std::fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
        let mut nodes = BTreeMap::new();
        let mut members = 0;
        for (i, g) in grpc.iter().enumerate() {
            let status = ternctl_json(&ternctl, *g, &["status"]).with_context(|| format!("endpoint {g}"))?;
            let id = status["node_id"]
                .as_u64()
                .with_context(|| format!("{g}: status has no node_id"))?;
            members = members.max(status["members"].as_array().map_or(0, Vec::len));
            let pid = pid_listening_on(g.port()).with_context(|| {
                format!(
                    "endpoint {g} (node {id}): no local process of ours listens on port {}",
                    g.port()
                )
            })?;
            let cmdline: Vec<OsString> = std::fs::read(format!("/proc/{pid}/cmdline"))
                .with_context(|| format!("reading /proc/{pid}/cmdline"))?
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| OsString::from(String::from_utf8_lossy(a).into_owned()))
                .collect();
            anyhow::ensure!(!cmdline.is_empty(), "node {id}: empty /proc/{pid}/cmdline");
            let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).with_context(|| format!("/proc/{pid}/cwd"))?;
            let (smtp, fixed_smtp) =
                match smtp.get(i) {
                    Some(a) => (Some(*a), true),
                    None => (
                        Some(discover_smtp(pid, g.port()).with_context(|| {
                            format!("node {id} (pid {pid}): no listener greets with 220; give --smtp")
                        })?),
                        false,
                    ),
                };
            anyhow::ensure!(!nodes.contains_key(&id), "node {id} given twice");
            nodes.insert(
                id,
                ExtNode {
                    grpc: *g,
                    smtp,
                    fixed_smtp,
                    pid,
                    cmdline,
                    cwd,
                    state: State::Running,
                    child: None,
                    restarts: 0,
                },
            );
        }
        let any = *grpc.first().context("no endpoint")?;
        let shards = crate::cluster::parse_shards(&ternctl_json(&ternctl, any, &["shard", "list"])?, 0)?
            .iter()
            .map(|s| s.shard)
            .max()
            .unwrap_or(0);
        let shards = u32::try_from(shards).context("shard count")?;
        let sink = Sink::start_at(sink, &[]).with_context(|| format!("starting the sink on {sink}"))?;
        let ext = External {
            sink,
            nodes,
            shards,
            members: members.max(grpc.len()),
            targets: Targets::default(),
            ternctl,
            log_dir,
        };
        ext.sync_targets();
        Ok(ext)
    }

    pub fn ids(&self) -> Vec<u64> {
        self.nodes.keys().copied().collect()
    }

    pub fn shard_count(&self) -> u32 {
        self.shards
    }

    /// The pid of node `id`'s process (changes at restarts).
    pub fn pid(&self, id: u64) -> Option<u32> {
        self.nodes.get(&id).map(|n| n.pid)
    }

    fn node(&mut self, id: u64) -> anyhow::Result<&mut ExtNode> {
        self.nodes
            .get_mut(&id)
            .with_context(|| format!("no node {id} among the endpoints"))
    }

    fn sync_targets(&self) {
        let mut t = self.targets.write().unwrap_or_else(|p| p.into_inner());
        t.clear();
        for (id, n) in &self.nodes {
            if let (State::Running | State::Paused, Some(a)) = (n.state, n.smtp) {
                t.insert(*id, a);
            }
        }
    }

    fn signal(pid: u32, sig: &str) -> anyhow::Result<()> {
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()?;
        anyhow::ensure!(st.success(), "kill -{sig} {pid} failed");
        Ok(())
    }

    fn shards_on(&self, id: u64) -> anyhow::Result<Vec<ShardInfo>> {
        let n = self.nodes.get(&id).with_context(|| format!("no node {id}"))?;
        crate::cluster::parse_shards(&ternctl_json(&self.ternctl, n.grpc, &["shard", "list"])?, id)
    }

    fn shards(&self) -> anyhow::Result<Vec<ShardInfo>> {
        crate::cluster::merge_shards(&crate::target::Target::healthy_ids(self), |id| self.shards_on(id))
    }
}

impl crate::target::Target for External {
    fn sink(&self) -> &Sink {
        &self.sink
    }

    fn targets(&self) -> Targets {
        self.targets.clone()
    }

    fn healthy_ids(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.state == State::Running)
            .map(|(id, _)| *id)
            .collect()
    }

    fn healthy_smtp(&self, turn: usize) -> Option<(u64, SocketAddr)> {
        let ids: Vec<(u64, SocketAddr)> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.state == State::Running)
            .filter_map(|(id, n)| n.smtp.map(|a| (*id, a)))
            .collect();
        (!ids.is_empty()).then(|| ids[turn % ids.len()])
    }

    fn leaders(&self) -> anyhow::Result<BTreeMap<u64, u64>> {
        Ok(self.shards()?.into_iter().map(|s| (s.shard, s.leader)).collect())
    }

    fn kill(&mut self, id: u64) -> anyhow::Result<()> {
        let n = self.node(id)?;
        anyhow::ensure!(n.state != State::Down, "node {id} is already down");
        External::signal(n.pid, "KILL")?;
        if let Some(mut c) = n.child.take() {
            let _ = c.wait();
        }
        n.state = State::Down;
        let port = n.grpc.port();
        // Until the kernel has closed its sockets (a restart binds the same port).
        tern_testkit::wait_until(Duration::from_secs(10), "the killed node's port to close", || {
            pid_listening_on(port).is_none()
        })?;
        self.sync_targets();
        Ok(())
    }

    fn restart(&mut self, id: u64) -> anyhow::Result<()> {
        if self.node(id)?.state != State::Down {
            self.kill(id)?;
        }
        let log_dir = self.log_dir.clone();
        let n = self.node(id)?;
        n.restarts += 1;
        let log = log_dir.join(format!("n{id}.restart{}.log", n.restarts));
        let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new(&n.cmdline[0])
            .args(&n.cmdline[1..])
            .current_dir(&n.cwd)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("re-running {:?} in {}", n.cmdline, n.cwd.display()))?;
        n.pid = child.id();
        n.child = Some(child);
        n.state = State::Running;
        let (pid, grpc, fixed) = (n.pid, n.grpc, n.fixed_smtp);
        let ternctl = self.ternctl.clone();
        let mut smtp = None;
        tern_testkit::wait_until(Duration::from_secs(90), &format!("node {id} serving again"), || {
            if !fixed && smtp.is_none() {
                smtp = discover_smtp(pid, grpc.port());
            }
            (fixed || smtp.is_some())
                && pid_listening_on(grpc.port()) == Some(pid)
                && ternctl_json(&ternctl, grpc, &["status"]).is_ok()
        })
        .with_context(|| format!("log: {}", log.display()))?;
        let n = self.node(id)?;
        if !fixed {
            n.smtp = smtp;
        }
        self.sync_targets();
        Ok(())
    }

    fn restart_all_down(&mut self) -> anyhow::Result<()> {
        let down: Vec<u64> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.state == State::Down)
            .map(|(id, _)| *id)
            .collect();
        for id in down {
            self.restart(id)?;
        }
        Ok(())
    }

    fn pause(&mut self, id: u64) -> anyhow::Result<()> {
        let n = self.node(id)?;
        External::signal(n.pid, "STOP")?;
        n.state = State::Paused;
        Ok(())
    }

    fn resume(&mut self, id: u64) -> anyhow::Result<()> {
        let n = self.node(id)?;
        External::signal(n.pid, "CONT")?;
        n.state = State::Running;
        Ok(())
    }

    fn partition(&mut self, id: u64) -> anyhow::Result<()> {
        anyhow::bail!(
            "cannot partition node {id}: partitions need the harness's proxies between nodes (not with --endpoints)"
        )
    }

    fn heal(&mut self, _id: u64) {}

    fn partitioned(&self) -> Vec<u64> {
        Vec::new()
    }

    fn wait_converged(&self, deadline: Duration) -> anyhow::Result<Duration> {
        let healthy = crate::target::Target::healthy_ids(self);
        crate::cluster::wait_converged(deadline, || {
            crate::cluster::not_converged(&healthy, self.members, self.shards, |id| self.shards_on(id))
        })
    }

    fn save_logs(&self, dir: &Path) -> anyhow::Result<()> {
        if dir != self.log_dir {
            std::fs::create_dir_all(dir)?;
            for e in std::fs::read_dir(&self.log_dir)?.flatten() {
                std::fs::copy(e.path(), dir.join(e.file_name()))?;
            }
        }
        Ok(())
    }
}

impl Drop for External {
    /// Never leaves a node of the operator's cluster frozen.
    fn drop(&mut self) {
        for n in self.nodes.values() {
            if n.state == State::Paused {
                let _ = External::signal(n.pid, "CONT");
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn proc_addresses() {
        let v4 = parse_proc_addr("0100007F:1F90").map(|a| a.to_string());
        if cfg!(target_endian = "little") {
            assert_eq!(v4.as_deref(), Some("127.0.0.1:8080"));
            let v6 = parse_proc_addr("00000000000000000000000001000000:0019").map(|a| a.to_string());
            assert_eq!(v6.as_deref(), Some("[::1]:25"));
        }
        assert_eq!(parse_proc_addr("zz:1"), None);
    }

    #[test]
    fn finds_our_own_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert_eq!(pid_listening_on(port), Some(std::process::id()));
        assert!(listening_of(std::process::id()).iter().any(|a| a.port() == port));
    }
}
