//! The command line: global flags, commands and their arguments (clap).

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "ternctl", version, about = "Administer a Tern cluster")]
pub struct Args {
    /// gRPC addresses of nodes, comma-separated: the first that answers is
    /// used (the next is tried when one cannot be reached or answers
    /// UNAVAILABLE). `--endpoint` is the same flag.
    #[arg(
        long = "endpoints",
        visible_alias = "endpoint",
        short = 'e',
        global = true,
        env = "TERN_ENDPOINT",
        value_delimiter = ',',
        default_value = "127.0.0.1:7070"
    )]
    pub endpoints: Vec<String>,
    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value = "table")]
    pub output: Output,
    /// Cluster CA (PEM) when the cluster uses mutual TLS ([cluster] tls_ca).
    #[arg(long, global = true, env = "TERN_TLS_CA")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) signed by the cluster CA.
    #[arg(long, global = true, env = "TERN_TLS_CERT", requires = "tls_ca")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// Client key (PEM).
    #[arg(long, global = true, env = "TERN_TLS_KEY", requires = "tls_ca")]
    pub tls_key: Option<std::path::PathBuf>,
    /// Name in the nodes' certificates ([cluster] tls_server_name).
    #[arg(long, global = true, env = "TERN_TLS_SERVER_NAME", default_value = "tern-cluster")]
    pub tls_server_name: String,
    /// File whose first line is an operator token ([[admin_token]]); overrides TERN_TOKEN.
    #[arg(long, global = true)]
    pub token_file: Option<std::path::PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Clone)]
pub enum Command {
    /// Node id, cluster members, shards with leader and replicas, queued messages.
    Status,
    /// Inspect the queue.
    #[command(subcommand)]
    Queue(QueueCommand),
    /// Cluster membership.
    #[command(subcommand)]
    Member(MemberCommand),
    /// Queue shards (Raft groups): list, move a leader, add, retire.
    #[command(subcommand)]
    Shard(ShardCommand),
    /// Cluster-wide settings.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Node maintenance.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Destination domains: suspend and resume deliveries.
    #[command(subcommand)]
    Domain(DomainCommand),
    /// The cluster's suppression list: recipients no mail is attempted to.
    #[command(subcommand)]
    Suppression(SuppressionCommand),
    /// Per-destination shaping: matching rules, limits, shares, automatic actions.
    #[command(subcommand)]
    Shaping(ShapingCommand),
    /// Keys of the sending API (/api/v1): create, list, revoke.
    #[command(subcommand)]
    Apikey(ApiKeyCommand),
    /// Egress pools: sources, weights and warm-up progress.
    #[command(subcommand)]
    Pool(PoolCommand),
    /// Durable webhook events: backlog, errors and dead letters per endpoint.
    #[command(subcommand)]
    Webhook(WebhookCommand),
    /// The nodes' configuration file: reload it without a restart.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Delivery analytics across the cluster: outcomes, rates, top reasons, time in queue.
    Stats {
        /// Rows by recipient domain, by site (relay host) or by node.
        #[arg(long, value_enum, default_value = "domain")]
        by: StatsBy,
        /// The window (1m to 24h).
        #[arg(long, value_parser = parse_age, default_value = "1h")]
        since: u64,
    },
    /// DKIM keys (offline: no node is contacted).
    #[command(subcommand)]
    Dkim(DkimCommand),
    /// The cluster's certificates (offline: no node is contacted).
    #[command(subcommand)]
    Cert(CertCommand),
    /// Operator tokens (offline: no node is contacted).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Print a shell completion script (offline), e.g.
    /// `ternctl completion bash > /etc/bash_completion.d/ternctl`.
    Completion {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand, Clone)]
pub enum TokenCommand {
    /// Print a new random token and an [[admin_token]] entry with its hash.
    New {
        /// The token's name (shown in audit events).
        #[arg(long)]
        name: String,
        /// admin, operator or viewer.
        #[arg(long)]
        role: String,
    },
}

#[derive(Subcommand, Clone)]
pub enum CertCommand {
    /// Make the cluster CA: DIR/ca.crt and DIR/ca.key (keep ca.key off the nodes).
    InitCa {
        /// Directory for the files (created if missing).
        #[arg(long)]
        dir: std::path::PathBuf,
        /// The CA's common name.
        #[arg(long, default_value = "Tern cluster CA")]
        name: String,
        /// Validity in days.
        #[arg(long, default_value_t = tern_pki::DEFAULT_CA_DAYS)]
        days: u32,
    },
    /// A node's certificate (names tern://node/ID): DIR/node-ID.crt and .key.
    Node {
        #[arg(long)]
        dir: std::path::PathBuf,
        /// The node id ([node] id).
        #[arg(long)]
        id: u64,
        /// Host names and addresses peers and ternctl use to reach the node (repeatable).
        #[arg(long = "host")]
        hosts: Vec<String>,
        #[arg(long, default_value_t = tern_pki::DEFAULT_CERT_DAYS)]
        days: u32,
    },
    /// An operator's client certificate (names tern://client/ROLE/NAME): DIR/client-NAME.crt and .key.
    Client {
        #[arg(long)]
        dir: std::path::PathBuf,
        /// Who the operator is (shown in audit events).
        #[arg(long)]
        name: String,
        /// admin, operator or viewer.
        #[arg(long)]
        role: String,
        #[arg(long, default_value_t = tern_pki::DEFAULT_CERT_DAYS)]
        days: u32,
    },
}

#[derive(Subcommand, Clone)]
pub enum DkimCommand {
    /// Make a key pair: writes the private key (PKCS#8 PEM, mode 0600) and
    /// prints the [[dkim]] config entry and the DNS TXT record to publish.
    Generate {
        /// Signing domain (d=).
        #[arg(long)]
        domain: String,
        /// Selector (s=): the key is published at SELECTOR._domainkey.DOMAIN.
        #[arg(long)]
        selector: String,
        /// ed25519 (RFC 8463: short keys, fast) or rsa (checked by every verifier); sign with both for now.
        #[arg(long, value_enum)]
        algorithm: KeyAlgorithm,
        /// RSA modulus size (2048 to 4096).
        #[arg(long, default_value_t = 2048)]
        bits: usize,
        /// Private key file to create (never overwritten) [default: dkim-DOMAIN-SELECTOR.pem].
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KeyAlgorithm {
    #[value(alias = "ed25519-sha256")]
    Ed25519,
    #[value(alias = "rsa-sha256")]
    Rsa,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StatsBy {
    Domain,
    Site,
    Node,
}

#[derive(Subcommand, Clone)]
pub enum NodeCommand {
    /// Move every shard leadership off node ID (before maintenance).
    Drain {
        id: u64,
        /// Wait until the node leads no shard, showing progress on stderr.
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this long (exit 1).
        #[arg(long, value_parser = parse_age, default_value = "5m")]
        timeout: u64,
    },
    /// Let node ID lead shards again.
    Undrain { id: u64 },
}

/// The filters shared by `queue list` and the queue operations; every one
/// given must match.
#[derive(clap::Args, Clone, Default)]
pub struct Filters {
    /// Messages with a pending recipient in this domain.
    #[arg(long)]
    pub domain: Option<String>,
    /// Messages from this sender (an address, or @domain).
    #[arg(long)]
    pub sender: Option<String>,
    /// Messages received more than this long ago (30s, 5m, 2h, 5d).
    #[arg(long, value_parser = parse_age)]
    pub older_than: Option<u64>,
    /// Messages received less than this long ago.
    #[arg(long, value_parser = parse_age)]
    pub newer_than: Option<u64>,
    /// held, deferred (tried before), scheduled (due later, never tried) or queued (due now).
    #[arg(long, value_parser = ["held", "deferred", "scheduled", "queued"])]
    pub state: Option<String>,
    /// 4xx or 5xx: a recipient's last reply is of this class.
    #[arg(long, value_parser = ["4xx", "5xx"])]
    pub reply_class: Option<String>,
}

impl Filters {
    pub fn is_empty(&self) -> bool {
        self.domain.is_none()
            && self.sender.is_none()
            && self.older_than.is_none()
            && self.newer_than.is_none()
            && self.state.is_none()
            && self.reply_class.is_none()
    }
}

/// Which messages a queue operation acts on (cluster-wide).
#[derive(clap::Args, Clone)]
pub struct Selection {
    /// Queue ids.
    pub ids: Vec<String>,
    #[command(flatten)]
    pub filters: Filters,
    /// Only show what would be affected.
    #[arg(long)]
    pub dry_run: bool,
}

/// `30s`, `5m`, `2h`, `5d` (or bare seconds) as seconds.
pub fn parse_age(s: &str) -> Result<u64, tern_config::DurationError> {
    tern_config::parse_duration(s).map(|d| d.as_secs())
}

#[derive(Subcommand, Clone)]
pub enum ApiKeyCommand {
    /// Make a key and print it once (it is not stored, only its hash).
    Create {
        /// Unique among live keys (1-64 of A-Z a-z 0-9 . _ -).
        #[arg(long)]
        name: String,
        /// send, templates:read or templates:write (repeat for more; all three if absent).
        #[arg(long = "scope")]
        scopes: Vec<String>,
        /// The tenant its messages, templates and events belong to (default tenant if absent).
        #[arg(long, default_value = "")]
        tenant: String,
        /// Messages per second it may send (0: no limit of its own).
        #[arg(long, default_value_t = 0)]
        rate: u32,
    },
    /// Every key, live and revoked (never the secret).
    List,
    /// Revoke a key by its name or id (it stops working at once).
    Revoke {
        /// The live key's name, or a key's id.
        key: String,
    },
}

#[derive(Subcommand, Clone)]
pub enum SuppressionCommand {
    /// Add (or replace) a recipient on the global list or a sender domain's.
    Add {
        address: String,
        /// The sender domain whose list it goes on; the global list if absent.
        #[arg(long)]
        scope: Option<String>,
        #[arg(long, default_value = "")]
        reason: String,
        #[arg(long, default_value = "manual")]
        class: String,
        /// Lapses after this long (30d, 12h); never if absent.
        #[arg(long, value_parser = parse_age)]
        expires: Option<u64>,
    },
    /// Remove a recipient from the global list or a sender domain's.
    Remove {
        address: String,
        #[arg(long)]
        scope: Option<String>,
    },
    /// Entries in force (every list, or one with --scope; "" is the global one).
    List {
        #[arg(long)]
        scope: Option<String>,
        /// Entries shown at most (up to 5000; export has no limit).
        #[arg(long, default_value_t = 1000)]
        limit: u32,
        /// Include entries that have expired.
        #[arg(long)]
        all: bool,
    },
    /// Add the entries of a CSV file (address,scope,class,reason,added,expires).
    Import { file: std::path::PathBuf },
    /// Write the list as CSV to FILE (or standard output).
    Export {
        file: Option<std::path::PathBuf>,
        #[arg(long)]
        scope: Option<String>,
        /// Include entries that have expired.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Subcommand, Clone)]
pub enum DomainCommand {
    /// Stop deliveries to a domain cluster-wide (mail is still accepted).
    Suspend {
        domain: String,
        /// For how long (30m, 2h, 1d); until resumed if absent.
        #[arg(long, value_parser = parse_age)]
        duration: Option<u64>,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Deliver to a suspended domain again.
    Resume { domain: String },
    /// Suspended domains.
    List,
}

#[derive(Subcommand, Clone)]
pub enum ShapingCommand {
    /// The rules matching DOMAIN (in order), the effective limits, each
    /// node's share and any automatic action in force.
    Show { domain: String },
    /// Lift an automatic action (suspend, throttle, bounce) before it runs out.
    Clear {
        /// Its scope, as the shaping event names it (domain:example.com, mx:.google.com).
        scope: String,
    },
}

#[derive(Subcommand, Clone)]
pub enum ConfigCommand {
    /// Read the config file again and apply what changed; keys that need a
    /// restart are named and keep their running value (docs/operations.md).
    /// Exit 1 when a node's reload failed (its running config stays).
    Reload {
        /// Every cluster member, one after the other, not only the node at --endpoint.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Subcommand, Clone)]
pub enum WebhookCommand {
    /// Per endpoint and group hosted by the node asked: pending events, the
    /// oldest one's age, the last error, dead letters.
    Status {
        /// List the dead-lettered events too (id, type, msg_id, age).
        #[arg(long)]
        dead: bool,
        /// Most dead letters listed.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

#[derive(Subcommand, Clone)]
pub enum PoolCommand {
    /// Each pool's sources, weights, and warm-up day, cap and use per destination scope.
    Show,
}

#[derive(Subcommand, Clone)]
pub enum MemberCommand {
    /// Add node ID (started without bootstrap) to the cluster; the node at
    /// --addr must answer as node ID.
    Add {
        /// The new node's id (its [node] id; never reused).
        #[arg(value_name = "ID", required_unless_present = "id_flag")]
        id: Option<u64>,
        /// The same as ID (older form).
        #[arg(long = "id", hide = true, conflicts_with = "id")]
        id_flag: Option<u64>,
        /// The new node's gRPC address, as other nodes reach it.
        #[arg(long)]
        addr: String,
    },
    /// Members with role, reachability, lag, shards led and replicas held.
    List,
    /// Remove node ID: its replicas move elsewhere first (progress on stderr).
    Remove {
        #[arg(value_name = "ID", required_unless_present = "id_flag")]
        id: Option<u64>,
        /// The same as ID (older form).
        #[arg(long = "id", hide = true, conflicts_with = "id")]
        id_flag: Option<u64>,
        /// Remove even if a shard is left without a reachable majority.
        #[arg(long)]
        force: bool,
        /// Give up waiting after this long (exit 1).
        #[arg(long, value_parser = parse_age, default_value = "5m")]
        timeout: u64,
    },
}

#[derive(Subcommand, Clone)]
pub enum ShardCommand {
    /// Shards with leader, replicas, applied index and queued messages,
    /// gathered from every member (each shard as its leader reports it).
    List {
        /// Only the shards the node asked hosts, as that node sees them
        /// (e.g. its own applied index).
        #[arg(long)]
        local: bool,
    },
    /// Make NODE (which holds a replica) the leader of SHARD.
    MoveLeader { shard: u64, node: u64 },
    /// Add N shards to the running cluster (ids after the highest ever
    /// used); each gets a leader, then its replicas, then new mail.
    Add {
        #[arg(value_name = "N")]
        count: u32,
        /// Makes the call safe to repeat: the cluster adds shards once per
        /// id and answers a repeat with the shards it added then. Default:
        /// a random id per run, so that the `--endpoints` failover of one
        /// run never adds twice; give one to make a script's retries safe.
        #[arg(long, value_name = "ID")]
        request_id: Option<String>,
    },
    /// Stop placing new mail on SHARD; it keeps delivering its queue and its
    /// group is removed once it holds nothing (`shard list` shows progress).
    Retire {
        #[arg(value_name = "SHARD")]
        shard: u64,
    },
}

#[derive(Subcommand, Clone)]
pub enum ClusterCommand {
    /// Set a cluster-wide setting. `replicas R`: copies of every shard
    /// (1 to the number of members); the controller moves shards there one
    /// at a time. `rebalance_moves N`: shards the rebalancer moves at once
    /// (1 to 64; default 1).
    Set {
        #[arg(value_name = "KEY", value_parser = ["replicas", "rebalance_moves"])]
        key: String,
        #[arg(value_name = "VALUE")]
        value: String,
    },
}

#[derive(Subcommand, Clone)]
pub enum QueueCommand {
    /// Messages queued, per recipient domain.
    Summary,
    /// List queued messages, cluster-wide, in arrival order.
    List {
        #[command(flatten)]
        filters: Filters,
        /// At most this many messages (0: every one; fetched in pages).
        #[arg(long, default_value_t = 1000)]
        limit: u64,
    },
    /// Keep messages queued without delivering them.
    Hold(Selection),
    /// Let held messages be delivered again (at once).
    Release(Selection),
    /// Remove messages without delivery or report.
    Delete(Selection),
    /// Fail every pending recipient and send the sender a bounce (RFC 3464).
    Bounce(Selection),
    /// Try messages again now.
    Retry(Selection),
    /// Show one message: envelope, size, attempts, next attempt.
    Show {
        id: String,
        /// Also print the message content as queued.
        #[arg(long)]
        body: bool,
    },
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn the_command_line_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn endpoints_split_and_repeat_and_ids_are_positional_or_flags() {
        let a =
            Args::try_parse_from(["ternctl", "-e", "a:1,b:2", "--endpoint", "c:3", "member", "remove", "3"]).unwrap();
        assert_eq!(a.endpoints, ["a:1", "b:2", "c:3"]);
        assert!(matches!(
            a.command,
            Command::Member(MemberCommand::Remove {
                id: Some(3),
                id_flag: None,
                ..
            })
        ));
        let a = Args::try_parse_from(["ternctl", "member", "remove", "--id", "4"]).unwrap();
        assert!(matches!(
            a.command,
            Command::Member(MemberCommand::Remove {
                id: None,
                id_flag: Some(4),
                ..
            })
        ));
        assert!(Args::try_parse_from(["ternctl", "member", "remove"]).is_err());
        assert!(Args::try_parse_from(["ternctl", "member", "remove", "3", "--id", "3"]).is_err());
        let a = Args::try_parse_from(["ternctl", "member", "add", "5", "--addr", "h:1"]).unwrap();
        assert!(matches!(
            a.command,
            Command::Member(MemberCommand::Add { id: Some(5), .. })
        ));
        assert!(Args::try_parse_from(["ternctl", "queue", "hold", "--state", "stuck"]).is_err());
        let a =
            Args::try_parse_from(["ternctl", "queue", "delete", "--state", "held", "--reply-class", "4xx"]).unwrap();
        let Command::Queue(QueueCommand::Delete(sel)) = a.command else {
            panic!("not a delete")
        };
        assert_eq!(sel.filters.state.as_deref(), Some("held"));
        assert!(!sel.filters.is_empty() && sel.ids.is_empty());
    }
}
