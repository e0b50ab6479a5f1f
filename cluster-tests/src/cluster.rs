//! A cluster of real `ternd` processes joined with `ternctl`, their gRPC
//! links through a [`Mesh`] of proxies, all delivering to one [`Sink`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::load::Targets;
use crate::process::{Node, NodeConfig, State};
use crate::proxy::Mesh;
use crate::sink::Sink;

/// Bound on one `ternctl` call.
pub const TERNCTL_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Clone, Debug)]
pub struct Options {
    pub shards: u32,
    /// Node ids that may ever exist (ports and proxies are set up for
    /// `1..=max_nodes` at start; at least the number of nodes started).
    pub max_nodes: u64,
    /// Extra smtp-sink options (e.g. `-w 1`).
    pub sink_args: Vec<String>,
    pub retry_schedule: Vec<String>,
    /// Extra TOML appended to every node's config (new sections only).
    pub extra_toml: String,
    /// Bound on forming the cluster (joins + every shard on its voters).
    pub form_timeout: Duration,
    /// Where every node's `[[route]] "*"` points instead of the harness's
    /// sink (e.g. a sink tern-chaos starts later).
    pub route_to: Option<SocketAddr>,
    /// Per node: where its `[[route]] "*"` points (overrides `route_to`),
    /// e.g. a stalled destination for one node.
    pub node_routes: BTreeMap<u64, SocketAddr>,
    /// Put each node's data dir on its own `tern-powerfs` mount, so that
    /// [`Cluster::power_cut`] loses what a node never fsynced.
    pub power_fs: bool,
    /// Extra `key = value` lines for every node's `[node]` section.
    pub node_toml: String,
    /// Extra lines for every node's `[listen]` section (e.g. a submission
    /// listener; read its address with [`Node::listening`](crate::process::Node::listening)).
    pub listen_toml: String,
    /// Cluster gRPC without TLS. By default every node gets a certificate
    /// from `ternctl cert` (one CA per cluster) and ternctl an admin client
    /// certificate, as a secured production cluster has.
    pub plaintext: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            shards: 6,
            max_nodes: 0,
            sink_args: Vec::new(),
            retry_schedule: vec!["1s".into()],
            extra_toml: String::new(),
            form_timeout: Duration::from_secs(120),
            route_to: None,
            node_routes: BTreeMap::new(),
            power_fs: false,
            node_toml: String::new(),
            listen_toml: String::new(),
            plaintext: false,
        }
    }
}

/// One shard as `ternctl shard list -o json` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardInfo {
    pub shard: u64,
    /// 0: none known.
    pub leader: u64,
    pub replicas: Vec<u64>,
    pub voters: Vec<u64>,
    pub term: u64,
    /// The node that reported it.
    pub reporter: u64,
}

fn ids(v: &serde_json::Value) -> Vec<u64> {
    let mut out: Vec<u64> = v
        .as_array()
        .map(|a| a.iter().filter_map(|x| x.as_u64()).collect())
        .unwrap_or_default();
    out.sort_unstable();
    out
}

pub struct Cluster {
    pub options: Options,
    pub sink: Sink,
    pub mesh: Mesh,
    grpc: BTreeMap<u64, SocketAddr>,
    nodes: BTreeMap<u64, Node>,
    /// Node ids that are cluster members (added, not removed).
    members: Vec<u64>,
    partitioned: Vec<u64>,
    targets: Targets,
    /// The cluster's certificates (None with `plaintext`).
    pub pki: Option<tern_testkit::pki::TestPki>,
}

impl Cluster {
    /// Starts `n` nodes (node 1 bootstraps), adds 2..=n through node 1 and
    /// waits (bounded) until every shard has `min(n, 3)` voters and a leader.
    pub fn start(n: u64, mut options: Options) -> anyhow::Result<Cluster> {
        anyhow::ensure!(n >= 1, "at least one node");
        options.max_nodes = options.max_nodes.max(n);
        let sink_args: Vec<&str> = options.sink_args.iter().map(String::as_str).collect();
        let sink = Sink::start(&sink_args)?;
        let mut grpc = BTreeMap::new();
        for id in 1..=options.max_nodes {
            grpc.insert(id, format!("127.0.0.1:{}", tern_testkit::free_port()).parse()?);
        }
        let mesh = Mesh::start(&grpc)?;
        let pki = if options.plaintext {
            None
        } else {
            Some(tern_testkit::pki::TestPki::with_workspace_ternctl().context("the cluster's certificates")?)
        };
        let mut cluster = Cluster {
            pki,
            options,
            sink,
            mesh,
            grpc,
            nodes: BTreeMap::new(),
            members: Vec::new(),
            partitioned: Vec::new(),
            targets: Targets::default(),
        };
        for id in 1..=n {
            cluster.spawn_node(id)?;
        }
        for id in 1..=n {
            cluster.node_mut(id)?.wait_ready(Duration::from_secs(60))?;
        }
        cluster.members.push(1);
        for id in 2..=n {
            cluster.join(id)?;
        }
        cluster.sync_targets();
        let t = cluster.options.form_timeout;
        cluster.wait_converged(t).context("forming the cluster")?;
        Ok(cluster)
    }

    fn spawn_node(&mut self, id: u64) -> anyhow::Result<()> {
        let grpc = *self.grpc.get(&id).with_context(|| format!("node {id} > max_nodes"))?;
        let config = NodeConfig {
            id,
            bootstrap: id == 1,
            grpc,
            shards: self.options.shards,
            peer_addresses: self.mesh.peer_addresses(id),
            route_to: self
                .options
                .node_routes
                .get(&id)
                .copied()
                .or(self.options.route_to)
                .unwrap_or(self.sink.addr),
            retry_schedule: self.options.retry_schedule.clone(),
            extra: self.options.extra_toml.clone(),
            node_extra: self.options.node_toml.clone(),
            listen_extra: self.options.listen_toml.clone(),
            cluster_tls: match &self.pki {
                Some(pki) => pki.cluster_toml(id)?,
                None => String::new(),
            },
            ternctl_env: self.pki.as_ref().map(|p| p.ternctl_env()).unwrap_or_default(),
        };
        let node = if self.options.power_fs {
            Node::spawn_on_powerfs(config)?
        } else {
            Node::spawn(config)?
        };
        self.nodes.insert(id, node);
        Ok(())
    }

    /// `ternctl member add --id ID --addr <own grpc>` sent to node 1 (or
    /// another healthy member when node 1 is gone).
    fn join(&mut self, id: u64) -> anyhow::Result<()> {
        let addr = self.grpc[&id].to_string();
        let via = self.any_healthy()?;
        let out = via.ternctl(
            &["member", "add", "--id", &id.to_string(), "--addr", &addr],
            Duration::from_secs(120),
        )?;
        anyhow::ensure!(
            out.status.success(),
            "member add {id}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        self.members.push(id);
        Ok(())
    }

    /// Starts node `id` (≤ max_nodes, never used before) and adds it.
    pub fn add_node(&mut self, id: u64) -> anyhow::Result<()> {
        anyhow::ensure!(!self.nodes.contains_key(&id), "node {id} exists");
        self.spawn_node(id)?;
        self.node_mut(id)?.wait_ready(Duration::from_secs(60))?;
        self.join(id)?;
        self.sync_targets();
        Ok(())
    }

    /// `ternctl member remove --id ID` (through another healthy member),
    /// then stops the removed node.
    pub fn remove_node(&mut self, id: u64) -> anyhow::Result<()> {
        let via = self
            .healthy_ids()
            .into_iter()
            .find(|i| *i != id)
            .context("no other healthy node")?;
        let out = self
            .node(via)?
            .ternctl(&["member", "remove", "--id", &id.to_string()], Duration::from_secs(180))?;
        anyhow::ensure!(
            out.status.success(),
            "member remove {id}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        self.members.retain(|m| *m != id);
        if let Some(n) = self.nodes.get_mut(&id) {
            n.kill();
        }
        self.sync_targets();
        Ok(())
    }

    pub fn node(&self, id: u64) -> anyhow::Result<&Node> {
        self.nodes.get(&id).with_context(|| format!("no node {id}"))
    }

    pub fn node_mut(&mut self, id: u64) -> anyhow::Result<&mut Node> {
        self.nodes.get_mut(&id).with_context(|| format!("no node {id}"))
    }

    pub fn members(&self) -> &[u64] {
        &self.members
    }

    /// Members that run, are not paused and not partitioned.
    pub fn healthy_ids(&self) -> Vec<u64> {
        self.members
            .iter()
            .copied()
            .filter(|id| {
                self.nodes.get(id).is_some_and(|n| n.state() == State::Running) && !self.partitioned.contains(id)
            })
            .collect()
    }

    pub fn any_healthy(&self) -> anyhow::Result<&Node> {
        let id = *self.healthy_ids().first().context("no healthy node")?;
        self.node(id)
    }

    /// The SMTP address of a healthy node (round robin by `turn`).
    pub fn healthy_smtp(&self, turn: usize) -> Option<(u64, SocketAddr)> {
        let ids = self.healthy_ids();
        let ids: Vec<_> = ids
            .into_iter()
            .filter_map(|id| self.nodes.get(&id).and_then(|n| n.smtp).map(|a| (id, a)))
            .collect();
        if ids.is_empty() {
            None
        } else {
            Some(ids[turn % ids.len()])
        }
    }

    /// The SMTP targets load generators use (kept up to date by the cluster:
    /// every member with a running or paused process, partitioned or not).
    pub fn targets(&self) -> Targets {
        self.targets.clone()
    }

    fn sync_targets(&self) {
        let mut t = self.targets.write().unwrap_or_else(|p| p.into_inner());
        t.clear();
        for id in &self.members {
            if let Some(n) = self.nodes.get(id) {
                if let (State::Running | State::Paused, Some(a)) = (n.state(), n.smtp) {
                    t.insert(*id, a);
                }
            }
        }
    }

    /// SIGKILL.
    pub fn kill(&mut self, id: u64) -> anyhow::Result<()> {
        self.node_mut(id)?.kill();
        self.sync_targets();
        Ok(())
    }

    /// A power cut of node `id` (SIGKILL, unsynced writes dropped, see
    /// [`Node::power_cut`]), then a restart; waits for `ready`. Needs
    /// [`Options::power_fs`].
    pub fn power_cut(&mut self, id: u64, tear: bool) -> anyhow::Result<tern_powerfs::mount::Counters> {
        let counters = self.power_off(id, tear)?;
        self.restart(id)?;
        Ok(counters)
    }

    /// Every member's file system made durable now (see [`Node::settle_fs`]).
    pub fn settle_fs(&mut self) -> anyhow::Result<()> {
        for id in self.members.clone() {
            self.node_mut(id)?.settle_fs()?;
        }
        Ok(())
    }

    /// The power part of [`Cluster::power_cut`]: the node stays down.
    pub fn power_off(&mut self, id: u64, tear: bool) -> anyhow::Result<tern_powerfs::mount::Counters> {
        let counters = self.node_mut(id)?.power_cut(tear)?;
        self.sync_targets();
        Ok(counters)
    }

    /// Every member loses power at once: all killed, then every file system
    /// cut, then all restarted together (no manual step).
    pub fn power_cut_all(&mut self, tear: bool) -> anyhow::Result<Vec<tern_powerfs::mount::Counters>> {
        let members = self.members.clone();
        for id in &members {
            self.node_mut(*id)?.kill();
        }
        self.sync_targets();
        let mut all = Vec::new();
        for id in &members {
            all.push(self.node_mut(*id)?.power_cut(tear)?);
        }
        self.restart_all_down()?;
        Ok(all)
    }

    /// SIGTERM (an orderly stop), bounded by `deadline`; false when the node
    /// had to be killed.
    pub fn terminate(&mut self, id: u64, deadline: Duration) -> anyhow::Result<bool> {
        let clean = self.node_mut(id)?.terminate(deadline)?;
        self.sync_targets();
        Ok(clean)
    }

    /// Starts a killed node again (same config and data dir); waits for `ready`.
    pub fn restart(&mut self, id: u64) -> anyhow::Result<()> {
        self.node_mut(id)?.restart(Duration::from_secs(90))?;
        self.sync_targets();
        Ok(())
    }

    /// Starts every killed member at once, then waits for all to be ready
    /// (a restarted node waits for a shard leader before `ready`).
    pub fn restart_all_down(&mut self) -> anyhow::Result<()> {
        let down: Vec<u64> = self
            .members
            .iter()
            .copied()
            .filter(|id| self.nodes.get(id).is_some_and(|n| n.state() == State::Down))
            .collect();
        for id in &down {
            self.node_mut(*id)?.start()?;
        }
        for id in &down {
            self.node_mut(*id)?.wait_ready(Duration::from_secs(90))?;
        }
        self.sync_targets();
        Ok(())
    }

    /// SIGSTOP.
    pub fn pause(&mut self, id: u64) -> anyhow::Result<()> {
        self.node_mut(id)?.pause()
    }

    /// SIGCONT.
    pub fn resume(&mut self, id: u64) -> anyhow::Result<()> {
        self.node_mut(id)?.resume()
    }

    /// Cuts every gRPC link into and out of `id` (SMTP and ternctl still reach it).
    pub fn partition(&mut self, id: u64) {
        self.mesh.partition(id);
        if !self.partitioned.contains(&id) {
            self.partitioned.push(id);
        }
    }

    /// Restores the links cut by [`Cluster::partition`].
    pub fn heal(&mut self, id: u64) {
        self.partitioned.retain(|p| *p != id);
        self.mesh.heal(id, &self.partitioned);
    }

    pub fn partitioned(&self) -> &[u64] {
        &self.partitioned
    }

    /// `ternctl shard list -o json` on one node.
    pub fn shards_on(&self, id: u64) -> anyhow::Result<Vec<ShardInfo>> {
        let v = self.node(id)?.ternctl_json(&["shard", "list"], TERNCTL_TIMEOUT)?;
        parse_shards(&v, id)
    }

    /// Every shard as the healthy nodes see it: per shard, the report with
    /// the highest term (a node hosts only its own shards).
    pub fn shards(&self) -> anyhow::Result<Vec<ShardInfo>> {
        merge_shards(&self.healthy_ids(), |id| self.shards_on(id))
    }

    /// Every shard's leader as the healthy nodes see it (0: none).
    pub fn leaders(&self) -> anyhow::Result<BTreeMap<u64, u64>> {
        Ok(self.shards()?.into_iter().map(|s| (s.shard, s.leader)).collect())
    }

    pub fn leader_of(&self, shard: u64) -> anyhow::Result<u64> {
        self.leaders()?
            .get(&shard)
            .copied()
            .with_context(|| format!("no shard {shard}"))
    }

    /// `ternctl status -o json` → `control_leader` (asked of a healthy node).
    pub fn control_leader(&self) -> anyhow::Result<u64> {
        let v = self.any_healthy()?.ternctl_json(&["status"], TERNCTL_TIMEOUT)?;
        v["control_leader"].as_u64().context("status has no control_leader")
    }

    /// Shards each healthy node leads.
    pub fn shards_led_by(&self, id: u64) -> anyhow::Result<Vec<u64>> {
        Ok(self
            .leaders()?
            .into_iter()
            .filter(|(_, l)| *l == id)
            .map(|(s, _)| s)
            .collect())
    }

    /// `ternctl status -o json` asked of a healthy node: members with their
    /// control-group role, every shard with its placement and queued count.
    pub fn status(&self) -> anyhow::Result<serde_json::Value> {
        self.any_healthy()?.ternctl_json(&["status"], TERNCTL_TIMEOUT)
    }

    /// Each member's role in the control group (`voter` or `learner`).
    pub fn control_roles(&self) -> anyhow::Result<BTreeMap<u64, String>> {
        let v = self.status()?;
        let members = v["members"].as_array().context("status has no members")?;
        Ok(members
            .iter()
            .filter_map(|m| Some((m["id"].as_u64()?, m["role"].as_str()?.to_owned())))
            .collect())
    }

    /// Replicas each member holds by placement (members holding none
    /// count 0), from the merged shard list.
    pub fn replicas_per_node(&self) -> anyhow::Result<BTreeMap<u64, usize>> {
        let mut out: BTreeMap<u64, usize> = self.members.iter().map(|m| (*m, 0)).collect();
        for s in self.shards()? {
            for r in &s.replicas {
                *out.entry(*r).or_default() += 1;
            }
        }
        Ok(out)
    }

    /// Queue ids of the messages queued now, per shard
    /// (`ternctl queue list --limit 0 -o json` on a healthy node).
    pub fn queued_by_shard(&self) -> anyhow::Result<BTreeMap<u64, Vec<String>>> {
        let v = self
            .any_healthy()?
            .ternctl_json(&["queue", "list", "--limit", "0"], TERNCTL_TIMEOUT)?;
        let mut out: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        for m in v["messages"].as_array().context("queue list has no messages")? {
            if let (Some(shard), Some(id)) = (m["shard"].as_u64(), m["id"].as_str()) {
                out.entry(shard).or_default().push(id.to_owned());
            }
        }
        Ok(out)
    }

    /// Why the cluster is not converged (`None` when it is): every shard
    /// present, led by a healthy member that every healthy replica agrees
    /// on, with `min(members, 3)` replicas, all of them voters.
    pub fn not_converged(&self) -> Option<String> {
        not_converged(&self.healthy_ids(), self.members.len(), self.options.shards, |id| {
            self.shards_on(id)
        })
    }

    pub fn converged(&self) -> bool {
        self.not_converged().is_none()
    }

    /// Waits (bounded) for [`Cluster::converged`]; how long it took.
    pub fn wait_converged(&self, deadline: Duration) -> anyhow::Result<Duration> {
        wait_converged(deadline, || self.not_converged())
    }

    /// All node logs, one after the other.
    pub fn logs(&self) -> String {
        self.nodes.values().map(|n| n.logs()).collect::<Vec<_>>().join("\n")
    }

    /// Writes each node's log to `dir/nID.log`.
    pub fn save_logs(&self, dir: &std::path::Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        for (id, n) in &self.nodes {
            std::fs::write(dir.join(format!("n{id}.log")), n.logs())?;
        }
        Ok(())
    }

    /// Don't print node logs on drop (the caller handles them).
    pub fn quiet_logs(&mut self) {
        for n in self.nodes.values_mut() {
            n.print_logs_on_panic(false);
        }
    }
}

/// `ternctl shard list -o json` output as reported by node `reporter`.
pub fn parse_shards(v: &serde_json::Value, reporter: u64) -> anyhow::Result<Vec<ShardInfo>> {
    let arr = v.as_array().context("shard list is not an array")?;
    Ok(arr
        .iter()
        .map(|s| ShardInfo {
            shard: s["shard"].as_u64().unwrap_or(0),
            leader: s["leader"].as_u64().unwrap_or(0),
            replicas: ids(&s["replicas"]),
            voters: ids(&s["voters"]),
            term: s["term"].as_u64().unwrap_or(0),
            reporter,
        })
        .collect())
}

/// Per shard, the report with the highest term among the nodes `healthy`.
pub fn merge_shards(
    healthy: &[u64],
    shards_on: impl Fn(u64) -> anyhow::Result<Vec<ShardInfo>>,
) -> anyhow::Result<Vec<ShardInfo>> {
    let mut best: BTreeMap<u64, ShardInfo> = BTreeMap::new();
    let mut asked = 0;
    for id in healthy {
        let Ok(list) = shards_on(*id) else { continue };
        asked += 1;
        for s in list {
            let better = best
                .get(&s.shard)
                .is_none_or(|b| (s.term, s.leader != 0) > (b.term, b.leader != 0));
            if better {
                best.insert(s.shard, s);
            }
        }
    }
    anyhow::ensure!(asked > 0, "no healthy node answered shard list");
    Ok(best.into_values().collect())
}

/// Why a cluster is not converged (`None` when it is): every shard
/// `1..=shards` present, led by a healthy member that every healthy replica
/// agrees on, with `min(members, 3)` replicas, all of them voters.
pub fn not_converged(
    healthy: &[u64],
    members: usize,
    shards: u32,
    shards_on: impl Fn(u64) -> anyhow::Result<Vec<ShardInfo>>,
) -> Option<String> {
    let want = members.min(3);
    let mut per_node = Vec::new();
    for id in healthy {
        match shards_on(*id) {
            Ok(l) => per_node.push(l),
            Err(e) => return Some(format!("node {id}: {e}")),
        }
    }
    for shard in 1..=u64::from(shards) {
        let reports: Vec<&ShardInfo> = per_node.iter().flatten().filter(|s| s.shard == shard).collect();
        let Some(first) = reports.first() else {
            return Some(format!("shard {shard}: reported by no healthy node"));
        };
        if first.leader == 0 || !healthy.contains(&first.leader) {
            return Some(format!(
                "shard {shard}: leader {} is not a healthy member",
                first.leader
            ));
        }
        if let Some(other) = reports.iter().find(|s| s.leader != first.leader) {
            return Some(format!(
                "shard {shard}: node {} says leader {}, node {} says {}",
                first.reporter, first.leader, other.reporter, other.leader
            ));
        }
        let leader_view = reports.iter().find(|s| s.reporter == first.leader).unwrap_or(first);
        if leader_view.voters.len() != want || leader_view.replicas != leader_view.voters {
            return Some(format!(
                "shard {shard}: voters {:?}, replicas {:?}, want {want}",
                leader_view.voters, leader_view.replicas
            ));
        }
    }
    None
}

/// Polls `check` (every 250 ms) until it reports nothing; bounded.
pub fn wait_converged(deadline: Duration, check: impl Fn() -> Option<String>) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        let last = check();
        let Some(why) = last else {
            return Ok(start.elapsed());
        };
        if start.elapsed() > deadline {
            anyhow::bail!("not converged after {deadline:?}: {why}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

impl crate::target::Target for Cluster {
    fn sink(&self) -> &Sink {
        &self.sink
    }
    fn targets(&self) -> Targets {
        Cluster::targets(self)
    }
    fn healthy_ids(&self) -> Vec<u64> {
        Cluster::healthy_ids(self)
    }
    fn healthy_smtp(&self, turn: usize) -> Option<(u64, SocketAddr)> {
        Cluster::healthy_smtp(self, turn)
    }
    fn leaders(&self) -> anyhow::Result<BTreeMap<u64, u64>> {
        Cluster::leaders(self)
    }
    fn kill(&mut self, id: u64) -> anyhow::Result<()> {
        Cluster::kill(self, id)
    }
    fn restart(&mut self, id: u64) -> anyhow::Result<()> {
        Cluster::restart(self, id)
    }
    fn power_off(&mut self, id: u64, tear: bool) -> anyhow::Result<()> {
        Cluster::power_off(self, id, tear).map(|_| ())
    }
    fn restart_all_down(&mut self) -> anyhow::Result<()> {
        Cluster::restart_all_down(self)
    }
    fn pause(&mut self, id: u64) -> anyhow::Result<()> {
        Cluster::pause(self, id)
    }
    fn resume(&mut self, id: u64) -> anyhow::Result<()> {
        Cluster::resume(self, id)
    }
    fn partition(&mut self, id: u64) -> anyhow::Result<()> {
        Cluster::partition(self, id);
        Ok(())
    }
    fn heal(&mut self, id: u64) {
        Cluster::heal(self, id)
    }
    fn partitioned(&self) -> Vec<u64> {
        Cluster::partitioned(self).to_vec()
    }
    fn wait_converged(&self, deadline: Duration) -> anyhow::Result<Duration> {
        Cluster::wait_converged(self, deadline)
    }
    fn save_logs(&self, dir: &std::path::Path) -> anyhow::Result<()> {
        Cluster::save_logs(self, dir)
    }
}
