//! Config files for test nodes: a member of a test cluster ([`NodeConfig`])
//! and a single node with extra TOML ([`SingleNode`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

/// Everything that goes into a cluster member's config file.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub id: u64,
    /// Create the cluster (node 1 only).
    pub bootstrap: bool,
    /// This node's own gRPC address (listened on and advertised).
    pub grpc: SocketAddr,
    pub shards: u32,
    /// `[cluster] peer_addresses`: how this node dials the others (the proxies).
    pub peer_addresses: BTreeMap<u64, SocketAddr>,
    /// Where all mail goes (`[[route]] domain = "*"`).
    pub route_to: SocketAddr,
    /// `[delivery] retry_schedule`, e.g. `["1s"]`.
    pub retry_schedule: Vec<String>,
    /// Extra TOML appended at the end (new sections only).
    pub extra: String,
    /// Extra `key = value` lines for the `[node]` section (e.g. `log_segment_mb = 1`).
    pub node_extra: String,
    /// Extra `[listen]` lines (e.g. `submission = ["127.0.0.1:0"]`).
    pub listen_extra: String,
    /// `[cluster]` TLS lines (`tls_cert`, `tls_key`, `tls_ca`), empty for plaintext.
    pub cluster_tls: String,
    /// Environment for this node's ternctl calls (`TERN_TLS_*`: the harness's admin client certificate).
    pub ternctl_env: Vec<(String, String)>,
}

impl NodeConfig {
    pub fn hostname(&self) -> String {
        format!("mx{}.tern.test", self.id)
    }

    pub fn to_toml(&self, data_dir: &std::path::Path) -> String {
        let peers: Vec<String> = self
            .peer_addresses
            .iter()
            .map(|(id, addr)| format!("\"{id}\" = \"{addr}\""))
            .collect();
        let retry: Vec<String> = self.retry_schedule.iter().map(|r| format!("\"{r}\"")).collect();
        format!(
            "[node]\nid = {id}\nhostname = \"{host}\"\ndata_dir = \"{data}\"\n{node_extra}\n\n\
             [listen]\nsmtp = [\"127.0.0.1:0\"]\ngrpc = \"{grpc}\"\nhttp = \"127.0.0.1:0\"\n{listen_extra}\n\n\
             [cluster]\nbootstrap = {bootstrap}\nshards = {shards}\nadvertise_grpc = \"{grpc}\"\n\
             peer_addresses = {{ {peers} }}\n{cluster_tls}\n\
             [delivery]\nretry_schedule = [{retry}]\n\n\
             [[route]]\ndomain = \"*\"\nto = \"{route}\"\n\n{extra}\n",
            id = self.id,
            host = self.hostname(),
            data = data_dir.display(),
            grpc = self.grpc,
            bootstrap = self.bootstrap,
            shards = self.shards,
            peers = peers.join(", "),
            retry = retry.join(", "),
            route = self.route_to,
            extra = self.extra,
            node_extra = self.node_extra,
            listen_extra = self.listen_extra,
            cluster_tls = self.cluster_tls,
        )
    }
}

/// A node's config in the shape single-node tests use: `[node]` with
/// `node_keys`, `[listen]` on port 0 (gRPC on `grpc` unless `listen` names
/// its own), `[cluster] bootstrap`, then `extra` (new sections).
#[derive(Clone, Debug, Default)]
pub struct SingleNode<'a> {
    pub id: u64,
    pub bootstrap: bool,
    /// `127.0.0.1:PORT` for `[listen] grpc`.
    pub grpc_port: u16,
    /// Extra `[node]` lines.
    pub node_keys: &'a str,
    /// Extra `[listen]` lines (e.g. `submission = ["127.0.0.1:0"]`).
    pub listen: &'a str,
    /// Appended at the end.
    pub extra: &'a str,
}

impl SingleNode<'_> {
    pub fn to_toml(&self, data_dir: &Path) -> String {
        let (id, bootstrap, node_keys, listen, extra) =
            (self.id, self.bootstrap, self.node_keys, self.listen, self.extra);
        // `listen` may name its own gRPC address (e.g. a wildcard one).
        let grpc = if listen.contains("grpc =") {
            String::new()
        } else {
            format!("grpc = \"127.0.0.1:{}\"\n", self.grpc_port)
        };
        format!(
            "[node]\nid = {id}\nhostname = \"mx{id}.tern.test\"\ndata_dir = \"{}\"\n{node_keys}\n\n[listen]\nsmtp = [\"127.0.0.1:0\"]\n{grpc}http = \"127.0.0.1:0\"\n{listen}\n\n[cluster]\nbootstrap = {bootstrap}\n\n{extra}\n",
            data_dir.display()
        )
    }
}
