//! What fault injection and the checks need from a cluster, whether the
//! harness started it ([`crate::cluster::Cluster`]) or it already ran
//! ([`crate::external::External`], tern-chaos `--endpoints`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use crate::load::Targets;
use crate::sink::Sink;

pub trait Target {
    /// The sink the cluster routes mail to.
    fn sink(&self) -> &Sink;
    /// SMTP targets for load generators (kept up to date by the target).
    fn targets(&self) -> Targets;
    /// Members that run, are not paused and not partitioned.
    fn healthy_ids(&self) -> Vec<u64>;
    /// The SMTP address of a healthy node (round robin by `turn`).
    fn healthy_smtp(&self, turn: usize) -> Option<(u64, SocketAddr)>;
    /// Every shard's leader as the healthy nodes see it (0: none).
    fn leaders(&self) -> anyhow::Result<BTreeMap<u64, u64>>;
    /// Shards `id` leads.
    fn shards_led_by(&self, id: u64) -> anyhow::Result<Vec<u64>> {
        Ok(self
            .leaders()?
            .into_iter()
            .filter(|(_, l)| *l == id)
            .map(|(s, _)| s)
            .collect())
    }
    /// SIGKILL.
    fn kill(&mut self, id: u64) -> anyhow::Result<()>;
    /// The power goes off: SIGKILL, then every write the node never fsynced
    /// is dropped (optionally torn); the node stays down until
    /// [`Target::restart`]. Only for nodes whose data dir is on `tern-powerfs`.
    fn power_off(&mut self, id: u64, _tear: bool) -> anyhow::Result<()> {
        anyhow::bail!(
            "power cut of node {id}: this target has no power-cut file system (start the cluster with Options::power_fs)"
        )
    }
    /// Starts a killed node again; waits until it serves.
    fn restart(&mut self, id: u64) -> anyhow::Result<()>;
    /// Starts every killed member again.
    fn restart_all_down(&mut self) -> anyhow::Result<()>;
    /// SIGSTOP.
    fn pause(&mut self, id: u64) -> anyhow::Result<()>;
    /// SIGCONT.
    fn resume(&mut self, id: u64) -> anyhow::Result<()>;
    /// Cuts a node's gRPC links (an error where the links cannot be cut).
    fn partition(&mut self, id: u64) -> anyhow::Result<()>;
    /// Restores them.
    fn heal(&mut self, id: u64);
    fn partitioned(&self) -> Vec<u64>;
    /// Waits (bounded) until every shard has a healthy leader and its replicas.
    fn wait_converged(&self, deadline: Duration) -> anyhow::Result<Duration>;
    /// Writes what logs it has to `dir`.
    fn save_logs(&self, dir: &std::path::Path) -> anyhow::Result<()>;
}
