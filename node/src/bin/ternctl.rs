//! `ternctl`: the Tern admin CLI. Talks gRPC to any node's AdminService.
//! Tables for people, `-o json` for scripts.
//!
//! Exit codes: 0 success, 1 the request failed (node unreachable, server
//! error), 2 usage error, 3 not found, 4 not permitted (no or a wrong
//! credential, or a role that does not allow the command).
//!
//! Operator credentials: a client certificate (`--tls-cert`, `--tls-key`)
//! or a token (`--token-file FILE`, or the environment variable
//! `TERN_TOKEN`), sent as `authorization: Bearer <token>`.

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;
use tern_proto::admin::admin_service_client::AdminServiceClient;
use tern_proto::admin::*;

#[derive(Parser)]
#[command(name = "ternctl", version, about = "Administer a Tern cluster")]
struct Args {
    /// gRPC address of any node.
    #[arg(
        long,
        short = 'e',
        global = true,
        env = "TERN_ENDPOINT",
        default_value = "127.0.0.1:7070"
    )]
    endpoint: String,
    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value = "table")]
    output: Output,
    /// Cluster CA (PEM) when the cluster uses mutual TLS ([cluster] tls_ca).
    #[arg(long, global = true, env = "TERN_TLS_CA")]
    tls_ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) signed by the cluster CA.
    #[arg(long, global = true, env = "TERN_TLS_CERT", requires = "tls_ca")]
    tls_cert: Option<std::path::PathBuf>,
    /// Client key (PEM).
    #[arg(long, global = true, env = "TERN_TLS_KEY", requires = "tls_ca")]
    tls_key: Option<std::path::PathBuf>,
    /// Name in the nodes' certificates ([cluster] tls_server_name).
    #[arg(long, global = true, env = "TERN_TLS_SERVER_NAME", default_value = "tern-cluster")]
    tls_server_name: String,
    /// File whose first line is an operator token ([[admin_token]]); overrides TERN_TOKEN.
    #[arg(long, global = true)]
    token_file: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Node id, cluster members, shards with leader and replicas, queued messages.
    Status,
    /// Inspect the queue.
    #[command(subcommand)]
    Queue(QueueCommand),
    /// Cluster membership.
    #[command(subcommand)]
    Member(MemberCommand),
    /// Queue shards (Raft groups).
    #[command(subcommand)]
    Shard(ShardCommand),
    /// Node maintenance.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Destination domains: suspend and resume deliveries.
    #[command(subcommand)]
    Domain(DomainCommand),
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
}

#[derive(Subcommand)]
enum TokenCommand {
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

#[derive(Subcommand)]
enum CertCommand {
    /// Make the cluster CA: DIR/ca.crt and DIR/ca.key (keep ca.key off the nodes).
    InitCa {
        /// Directory for the files (created if missing).
        #[arg(long)]
        dir: std::path::PathBuf,
        /// The CA's common name.
        #[arg(long, default_value = "Tern cluster CA")]
        name: String,
        /// Validity in days.
        #[arg(long, default_value_t = tern_node::pki::DEFAULT_CA_DAYS)]
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
        #[arg(long, default_value_t = tern_node::pki::DEFAULT_CERT_DAYS)]
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
        #[arg(long, default_value_t = tern_node::pki::DEFAULT_CERT_DAYS)]
        days: u32,
    },
}

#[derive(Subcommand)]
enum DkimCommand {
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
enum KeyAlgorithm {
    #[value(alias = "ed25519-sha256")]
    Ed25519,
    #[value(alias = "rsa-sha256")]
    Rsa,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum StatsBy {
    Domain,
    Site,
    Node,
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Move every shard leadership off node ID (before maintenance).
    Drain { id: u64 },
    /// Let node ID lead shards again.
    Undrain { id: u64 },
}

/// Which messages a queue operation acts on.
#[derive(clap::Args)]
struct Selection {
    /// Queue ids.
    ids: Vec<String>,
    /// Messages with a pending recipient in this domain.
    #[arg(long)]
    domain: Option<String>,
    /// Messages from this sender (an address, or @domain).
    #[arg(long)]
    sender: Option<String>,
    /// Messages older than this (30s, 5m, 2h, 5d).
    #[arg(long, value_parser = parse_age)]
    older_than: Option<u64>,
    /// Only show what would be affected.
    #[arg(long)]
    dry_run: bool,
}

fn parse_age(s: &str) -> Result<u64, String> {
    tern_node::config::parse_duration(s)
        .map(|d| d.as_secs())
        .map_err(|e| e.to_string())
}

#[derive(Subcommand)]
enum DomainCommand {
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

#[derive(Subcommand)]
enum MemberCommand {
    /// Add a node (started without bootstrap) to the cluster.
    Add {
        /// The new node's id (its [node] id; never reused).
        #[arg(long)]
        id: u64,
        /// The new node's gRPC address, as other nodes reach it.
        #[arg(long)]
        addr: String,
    },
    /// Members with role, reachability, lag, shards led and replicas held.
    List,
    /// Remove a node: its replicas move elsewhere first.
    Remove {
        #[arg(long)]
        id: u64,
        /// Remove even if a shard is left without a reachable majority.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum ShardCommand {
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
}

#[derive(Subcommand)]
enum QueueCommand {
    /// Messages queued, per recipient domain.
    Summary,
    /// List queued messages.
    List {
        /// Only messages with a pending recipient in this domain.
        #[arg(long)]
        domain: Option<String>,
        /// At most this many messages.
        #[arg(long, default_value_t = 1000)]
        limit: u32,
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

fn main() -> ExitCode {
    let args = Args::parse();
    if let Command::Dkim(cmd) = &args.command {
        return dkim_command(cmd, args.output == Output::Json);
    }
    if let Command::Cert(cmd) = &args.command {
        return cert_command(cmd, args.output == Output::Json);
    }
    if let Command::Token(cmd) = &args.command {
        return token_command(cmd, args.output == Output::Json);
    }
    let token = match read_token(args.token_file.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("ternctl: {e}");
            return ExitCode::from(2);
        }
    };
    if token.is_some() && args.tls_ca.is_none() && !endpoint_is_loopback(&args.endpoint) {
        eprintln!(
            "ternctl: warning: sending a token over plaintext gRPC to {}; anyone on the path can read it (use --tls-ca)",
            args.endpoint
        );
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ternctl: cannot start runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(args, token)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(status) => {
            eprintln!("ternctl: {}", status.message());
            match status.code() {
                tonic::Code::NotFound => ExitCode::from(3),
                tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => ExitCode::from(4),
                _ => ExitCode::from(1),
            }
        }
    }
}

/// Adds `authorization: Bearer <token>` to every call when a token is given.
#[derive(Clone)]
struct Bearer(Option<tonic::metadata::AsciiMetadataValue>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(b) = &self.0 {
            request.metadata_mut().insert("authorization", b.clone());
        }
        Ok(request)
    }
}

type Client = AdminServiceClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>>;

/// The operator token: the first line of `--token-file` (trimmed), else
/// `TERN_TOKEN`. A token file others may read draws a warning.
fn read_token(file: Option<&std::path::Path>) -> Result<Option<String>, String> {
    let token = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| format!("--token-file {}: {e}", path.display()))?;
            if let Ok(meta) = std::fs::metadata(path) {
                if std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o077 != 0 {
                    eprintln!(
                        "ternctl: warning: {} is readable by other users; chmod 600 it",
                        path.display()
                    );
                }
            }
            let line = text.lines().next().unwrap_or_default().trim().to_owned();
            if line.is_empty() {
                return Err(format!("--token-file {}: the first line is empty", path.display()));
            }
            Some(line)
        }
        None => std::env::var("TERN_TOKEN")
            .ok()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty()),
    };
    if let Some(t) = &token {
        if t.bytes().any(|b| !(0x21..0x7f).contains(&b)) {
            return Err("the token must be printable ASCII without spaces".into());
        }
    }
    Ok(token)
}

/// True if `endpoint` (HOST:PORT, maybe with a scheme) names a loopback address.
fn endpoint_is_loopback(endpoint: &str) -> bool {
    let rest = endpoint.split_once("://").map_or(endpoint, |(_, r)| r);
    let host = rest.split('/').next().unwrap_or_default();
    let host = match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn token_command(cmd: &TokenCommand, json: bool) -> ExitCode {
    let TokenCommand::New { name, role } = cmd;
    if let Err(e) = tern_node::pki::check_client_name(name) {
        eprintln!("ternctl: {e}");
        return ExitCode::from(2);
    }
    let role: tern_node::pki::Role = match role.parse() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ternctl: {e}");
            return ExitCode::from(2);
        }
    };
    use base64::Engine as _;
    let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
    let hash = match tern_node::submission::hash_password(secret.as_bytes()) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("ternctl: {e}");
            return ExitCode::from(1);
        }
    };
    if json {
        print_json(&json!({"name": name, "role": role.as_str(), "token": secret, "hash": hash}));
    } else {
        println!("Token (give it to {name}; it is shown only now):\n\n{secret}\n");
        println!("Add to every node's configuration:\n");
        println!(
            "[[admin_token]]\nname = {}\nrole = \"{role}\"\nhash = \"{hash}\"",
            toml::Value::String(name.clone())
        );
    }
    ExitCode::SUCCESS
}

async fn run(args: Args, token: Option<String>) -> Result<(), tonic::Status> {
    let scheme = if args.tls_ca.is_some() { "https" } else { "http" };
    let endpoint = if args.endpoint.contains("://") {
        args.endpoint.clone()
    } else {
        format!("{scheme}://{}", args.endpoint)
    };
    let mut endpoint = tonic::transport::Endpoint::from_shared(endpoint)
        .map_err(|e| tonic::Status::invalid_argument(format!("bad endpoint {}: {e}", args.endpoint)))?;
    if let Some(ca) = &args.tls_ca {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| tonic::Status::invalid_argument(format!("{}: {e}", p.display())))
        };
        let mut tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?))
            .domain_name(args.tls_server_name.clone());
        if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
            tls = tls.identity(tonic::transport::Identity::from_pem(read(cert)?, read(key)?));
        }
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| tonic::Status::invalid_argument(format!("TLS: {e}")))?;
    }
    let channel = endpoint
        .connect_timeout(std::time::Duration::from_secs(5))
        .timeout(std::time::Duration::from_secs(60))
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("cannot connect to {}: {e}", args.endpoint)))?;
    let bearer: Option<tonic::metadata::AsciiMetadataValue> = match token {
        Some(t) => Some(
            format!("Bearer {t}")
                .parse()
                .map_err(|_| tonic::Status::invalid_argument("the token is not valid gRPC metadata"))?,
        ),
        None => None,
    };
    let mut client =
        AdminServiceClient::with_interceptor(channel, Bearer(bearer)).max_decoding_message_size(256 * 1024 * 1024);
    let json = args.output == Output::Json;
    match args.command {
        Command::Status => {
            let s = client.status(StatusRequest { local_only: false }).await?.into_inner();
            warn_unreachable(&s.unreachable);
            if json {
                print_json(&status_json(&s));
            } else {
                print_status(&s);
            }
        }
        Command::Member(MemberCommand::Add { id, addr }) => {
            let r = client
                .member_add(MemberAddRequest { id, addr: addr.clone() })
                .await?
                .into_inner();
            if json {
                print_json(&json!({"id": id, "addr": addr, "role": r.role}));
            } else {
                println!("node {id} ({addr}) added as {}", r.role);
            }
        }
        Command::Member(MemberCommand::List) => {
            let r = client.member_list(MemberListRequest {}).await?.into_inner();
            if json {
                print_json(&json!(r
                    .members
                    .iter()
                    .map(|m| json!({
                        "id": m.id, "addr": m.addr, "role": m.role, "control_leader": m.is_control_leader,
                        "reachable": m.reachable, "lag": m.lag, "shards_led": m.shards_led, "replicas": m.replicas,
                    }))
                    .collect::<Vec<_>>()));
            } else {
                let rows: Vec<Vec<String>> = r
                    .members
                    .iter()
                    .map(|m| {
                        vec![
                            m.id.to_string(),
                            m.addr.clone(),
                            m.role.clone(),
                            if m.is_control_leader { "yes" } else { "" }.into(),
                            if m.reachable { "yes" } else { "NO" }.into(),
                            m.lag.to_string(),
                            m.shards_led.to_string(),
                            m.replicas.to_string(),
                        ]
                    })
                    .collect();
                print_table(
                    &[
                        "ID",
                        "ADDR",
                        "ROLE",
                        "CONTROL LEADER",
                        "REACHABLE",
                        "LAG",
                        "LEADS",
                        "REPLICAS",
                    ],
                    &rows,
                );
            }
        }
        Command::Member(MemberCommand::Remove { id, force }) => {
            client.member_remove(MemberRemoveRequest { id, force }).await?;
            if json {
                print_json(&json!({"id": id, "removed": true}));
            } else {
                println!("node {id} removed; its replicas were moved");
            }
        }
        Command::Node(cmd) => {
            let (id, drained) = match cmd {
                NodeCommand::Drain { id } => (id, true),
                NodeCommand::Undrain { id } => (id, false),
            };
            client.drain(DrainRequest { id, drained }).await?;
            if json {
                print_json(&json!({"id": id, "drained": drained}));
            } else if drained {
                println!("node {id} drained: its shard leaderships move to other replicas");
            } else {
                println!("node {id} undrained");
            }
        }
        Command::Queue(QueueCommand::Hold(sel)) => queue_op(&mut client, "hold", sel, json).await?,
        Command::Queue(QueueCommand::Release(sel)) => queue_op(&mut client, "release", sel, json).await?,
        Command::Queue(QueueCommand::Delete(sel)) => queue_op(&mut client, "delete", sel, json).await?,
        Command::Queue(QueueCommand::Bounce(sel)) => queue_op(&mut client, "bounce", sel, json).await?,
        Command::Queue(QueueCommand::Retry(sel)) => queue_op(&mut client, "retry", sel, json).await?,
        // Handled offline in main.
        Command::Dkim(_) | Command::Cert(_) | Command::Token(_) => {}
        Command::Stats { by, since } => {
            let r = client
                .stats(StatsRequest {
                    since_secs: since,
                    local_only: false,
                })
                .await?
                .into_inner();
            print_stats(&r, by, since, json)?;
        }
        Command::Domain(cmd) => {
            let reply = match cmd {
                DomainCommand::Suspend {
                    domain,
                    duration,
                    reason,
                } => client
                    .domain_suspend(DomainSuspendRequest {
                        domain,
                        duration_secs: duration.unwrap_or(0),
                        reason,
                    })
                    .await?
                    .into_inner(),
                DomainCommand::Resume { domain } => {
                    client.domain_resume(DomainResumeRequest { domain }).await?.into_inner()
                }
                DomainCommand::List => client.domain_list(DomainListRequest {}).await?.into_inner(),
            };
            if json {
                print_json(&json!(reply
                    .suspended
                    .iter()
                    .map(|d| json!({"domain": d.domain, "until": d.until, "reason": d.reason}))
                    .collect::<Vec<_>>()));
            } else {
                let rows: Vec<Vec<String>> = reply
                    .suspended
                    .iter()
                    .map(|d| {
                        let until = if d.until >= i64::MAX / 4 {
                            "resumed by hand".into()
                        } else {
                            time(d.until)
                        };
                        vec![d.domain.clone(), until, d.reason.clone()]
                    })
                    .collect();
                print_table(&["SUSPENDED DOMAIN", "UNTIL", "REASON"], &rows);
            }
        }
        Command::Shard(ShardCommand::List { local }) => {
            let s = client.status(StatusRequest { local_only: local }).await?.into_inner();
            warn_unreachable(&s.unreachable);
            if json {
                print_json(&status_json(&s)["shards"]);
            } else {
                print_shards(&s);
            }
        }
        Command::Shard(ShardCommand::MoveLeader { shard, node }) => {
            client.move_leader(MoveLeaderRequest { shard, node }).await?;
            if json {
                print_json(&json!({"shard": shard, "node": node, "requested": true}));
            } else {
                println!("asked node {node} to take over shard {shard}");
            }
        }
        Command::Queue(QueueCommand::Summary) => {
            let s = client
                .queue_summary(QueueSummaryRequest {
                    local_only: false,
                    shards: Vec::new(),
                })
                .await?
                .into_inner();
            warn_unreachable(&s.unreachable);
            if !s.missing_shards.is_empty() {
                eprintln!(
                    "warning: shards {:?} could not be counted (no replica answered)",
                    s.missing_shards
                );
            }
            if json {
                let domains: serde_json::Map<String, serde_json::Value> = s
                    .domains
                    .iter()
                    .map(|d| (d.domain.clone(), json!(d.messages)))
                    .collect();
                print_json(&json!({
                    "messages": s.messages,
                    "recipients": s.recipients,
                    "bytes": s.bytes,
                    "oldest_age_secs": s.oldest_age_secs,
                    "unreachable": s.unreachable,
                    "missing_shards": s.missing_shards,
                    "domains": domains,
                    "domain_recipients": s.domains.iter().map(|d| (d.domain.clone(), json!(d.recipients))).collect::<serde_json::Map<_, _>>(),
                    "domain_details": s.domains.iter().map(|d| json!({
                        "domain": d.domain, "messages": d.messages, "recipients": d.recipients, "held": d.held,
                        "oldest_age_secs": d.oldest_age_secs, "last_error": d.last_error,
                    })).collect::<Vec<_>>(),
                }));
            } else {
                println!(
                    "{} messages, {} recipients, {} bytes, oldest {}",
                    s.messages,
                    s.recipients,
                    s.bytes,
                    age(s.oldest_age_secs)
                );
                let rows: Vec<Vec<String>> = s
                    .domains
                    .iter()
                    .map(|d| {
                        vec![
                            d.domain.clone(),
                            d.messages.to_string(),
                            d.recipients.to_string(),
                            d.held.to_string(),
                            age(d.oldest_age_secs),
                            d.last_error.clone(),
                        ]
                    })
                    .collect();
                if !rows.is_empty() {
                    println!();
                    print_table(
                        &["DOMAIN", "MESSAGES", "RECIPIENTS", "HELD", "OLDEST", "LAST ERROR"],
                        &rows,
                    );
                }
            }
        }
        Command::Queue(QueueCommand::List { domain, limit }) => {
            let r = client
                .queue_list(QueueListRequest {
                    domain: domain.unwrap_or_default(),
                    limit,
                })
                .await?
                .into_inner();
            if json {
                print_json(&json!({
                    "messages": r.messages.iter().map(message_json).collect::<Vec<_>>(),
                    "truncated": r.truncated,
                }));
            } else {
                let rows: Vec<Vec<String>> = r
                    .messages
                    .iter()
                    .map(|m| {
                        vec![
                            m.id.clone(),
                            m.shard.to_string(),
                            sender(&m.reverse_path),
                            m.recipients.len().to_string(),
                            m.size.to_string(),
                            time(m.received_at),
                            m.attempts.to_string(),
                        ]
                    })
                    .collect();
                print_table(
                    &["ID", "SHARD", "SENDER", "RCPTS", "SIZE", "RECEIVED", "ATTEMPTS"],
                    &rows,
                );
                if r.truncated {
                    println!("(more messages match; raise --limit)");
                }
            }
        }
        Command::Queue(QueueCommand::Show { id, body }) => {
            let r = client
                .queue_show(QueueShowRequest { id, with_body: body })
                .await?
                .into_inner();
            let m = r.message.ok_or_else(|| tonic::Status::not_found("no such message"))?;
            if json {
                let mut v = message_json(&m);
                if body {
                    v["body"] = json!(String::from_utf8_lossy(&r.body));
                }
                print_json(&v);
            } else {
                print_message(&m);
                if body {
                    use std::io::Write as _;
                    println!();
                    let _ = std::io::stdout().write_all(&r.body);
                }
            }
        }
    }
    Ok(())
}

/// Finds the selected messages (a dry run on the server), then applies the
/// operation in batches, showing progress on stderr.
async fn queue_op(client: &mut Client, op: &str, sel: Selection, json: bool) -> Result<(), tonic::Status> {
    const BATCH: usize = 200;
    let found = client
        .queue_op(QueueOpRequest {
            op: op.into(),
            ids: sel.ids,
            domain: sel.domain.unwrap_or_default(),
            sender: sel.sender.unwrap_or_default(),
            older_than_secs: sel.older_than.unwrap_or(0),
            dry_run: true,
            on_leader: false,
        })
        .await?
        .into_inner();
    if sel.dry_run {
        if json {
            print_json(&json!({"op": op, "dry_run": true, "matched": found.matched, "ids": found.ids}));
        } else {
            println!("{op}: {} messages would be affected (dry run)", found.matched);
            for id in &found.ids {
                println!("{id}");
            }
        }
        return Ok(());
    }
    let total = found.ids.len();
    let mut affected = 0;
    for (i, batch) in found.ids.chunks(BATCH).enumerate() {
        let reply = client
            .queue_op(QueueOpRequest {
                op: op.into(),
                ids: batch.to_vec(),
                dry_run: false,
                ..Default::default()
            })
            .await?
            .into_inner();
        affected += reply.affected;
        if total > BATCH {
            eprintln!("{op}: {}/{total}", ((i + 1) * BATCH).min(total));
        }
    }
    if json {
        print_json(&json!({"op": op, "matched": found.matched, "affected": affected}));
    } else {
        println!("{op}: {affected} messages affected");
    }
    Ok(())
}

fn print_stats(r: &StatsReply, by: StatsBy, since: u64, json: bool) -> Result<(), tonic::Status> {
    use tern_node::queue::stats::{Counts, Window};
    let mut all = Window::default();
    let mut rows: std::collections::BTreeMap<String, Counts> = std::collections::BTreeMap::new();
    for n in &r.nodes {
        let w: Window = bincode::deserialize(&n.window)
            .map_err(|e| tonic::Status::internal(format!("node {}: bad stats: {e}", n.node)))?;
        match by {
            StatsBy::Node => {
                rows.insert(format!("node {}", n.node), w.total());
            }
            StatsBy::Domain | StatsBy::Site => {
                let source = if by == StatsBy::Domain {
                    &w.by_domain
                } else {
                    &w.by_relay
                };
                for (k, c) in source {
                    let e = rows.entry(k.clone()).or_default();
                    e.delivered += c.delivered;
                    e.deferred += c.deferred;
                    e.bounced += c.bounced;
                }
            }
        }
        all.merge(w);
    }
    let total = all.total();
    let minutes = (since as f64 / 60.0).max(1.0);
    let (p50, p90, p99) = (all.percentile(50.0), all.percentile(90.0), all.percentile(99.0));
    let mut reasons: Vec<_> = all.reasons.iter().collect();
    reasons.sort_by_key(|r| std::cmp::Reverse(r.1.count));
    reasons.truncate(10);
    if json {
        print_json(&json!({
            "since_secs": since,
            "total": {"delivered": total.delivered, "deferred": total.deferred, "bounced": total.bounced},
            "per_minute": {
                "delivered": total.delivered as f64 / minutes,
                "deferred": total.deferred as f64 / minutes,
                "bounced": total.bounced as f64 / minutes,
            },
            "time_in_queue_secs": {"p50": p50, "p90": p90, "p99": p99},
            "rows": rows.iter().map(|(k, c)| json!({
                "key": k, "delivered": c.delivered, "deferred": c.deferred, "bounced": c.bounced,
            })).collect::<Vec<_>>(),
            "top_reasons": reasons.iter().map(|((kind, code), r)| json!({
                "kind": kind, "code": code, "count": r.count, "last_reply": r.last_reply,
            })).collect::<Vec<_>>(),
            "unreachable_nodes": r.unreachable,
        }));
        return Ok(());
    }
    println!(
        "last {}: {} delivered ({:.1}/min), {} deferred ({:.1}/min), {} bounced ({:.1}/min)",
        age(since),
        total.delivered,
        total.delivered as f64 / minutes,
        total.deferred,
        total.deferred as f64 / minutes,
        total.bounced,
        total.bounced as f64 / minutes
    );
    let secs = |p: Option<u32>| p.map(|s| format!("{s}s")).unwrap_or_else(|| "-".into());
    println!("time in queue: p50 {}, p90 {}, p99 {}", secs(p50), secs(p90), secs(p99));
    if !r.unreachable.is_empty() {
        println!("(no answer from nodes {:?})", r.unreachable);
    }
    println!();
    let key = match by {
        StatsBy::Domain => "DOMAIN",
        StatsBy::Site => "SITE",
        StatsBy::Node => "NODE",
    };
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|(k, c)| {
            vec![
                k.clone(),
                c.delivered.to_string(),
                c.deferred.to_string(),
                c.bounced.to_string(),
            ]
        })
        .collect();
    print_table(&[key, "DELIVERED", "DEFERRED", "BOUNCED"], &table);
    if !reasons.is_empty() {
        println!();
        let table: Vec<Vec<String>> = reasons
            .iter()
            .map(|((kind, code), r)| vec![kind.clone(), code.clone(), r.count.to_string(), r.last_reply.clone()])
            .collect();
        print_table(&["OUTCOME", "CODE", "COUNT", "LAST REPLY"], &table);
    }
    Ok(())
}

/// `ternctl dkim generate`: exit 0, 1 (key not written) or 2 (bad arguments).
fn cert_command(cmd: &CertCommand, json: bool) -> ExitCode {
    use tern_node::pki::{self, Ca, PkiError};
    let result = (|| -> Result<(String, Vec<std::path::PathBuf>), PkiError> {
        match cmd {
            CertCommand::InitCa { dir, name, days } => {
                std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
                    path: dir.clone(),
                    source,
                })?;
                let ca = Ca::generate(name, *days)?;
                let issued = pki::Issued {
                    cert_pem: ca.cert_pem(),
                    key_pem: ca.key_pem(),
                };
                let (cert, key) = pki::write_pair(dir, "ca", &issued)?;
                Ok((format!("CA {name:?}"), vec![cert, key]))
            }
            CertCommand::Node { dir, id, hosts, days } => {
                let issued = Ca::load(dir)?.issue_node(*id, hosts, *days)?;
                let (cert, key) = pki::write_pair(dir, &format!("node-{id}"), &issued)?;
                Ok((format!("node {id} (tern://node/{id})"), vec![cert, key]))
            }
            CertCommand::Client { dir, name, role, days } => {
                let role: pki::Role = role.parse()?;
                let issued = Ca::load(dir)?.issue_client(name, role, *days)?;
                let (cert, key) = pki::write_pair(dir, &format!("client-{name}"), &issued)?;
                Ok((format!("client {name} with role {role}"), vec![cert, key]))
            }
        }
    })();
    match result {
        Ok((what, files)) => {
            if json {
                print_json(&json!({
                    "issued": what,
                    "files": files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
                }));
            } else {
                println!("issued {what}");
                for f in &files {
                    println!("  wrote {}", f.display());
                }
            }
            ExitCode::SUCCESS
        }
        Err(e @ PkiError::BadName(_)) => {
            eprintln!("ternctl: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("ternctl: {e}");
            ExitCode::from(1)
        }
    }
}

fn dkim_command(cmd: &DkimCommand, json: bool) -> ExitCode {
    use tern_node::auth::dkim::keygen;
    use tern_node::config::DkimAlgorithm;
    let DkimCommand::Generate {
        domain,
        selector,
        algorithm,
        bits,
        out,
    } = cmd;
    let domain = domain.trim().trim_end_matches('.').to_ascii_lowercase();
    let algorithm = match algorithm {
        KeyAlgorithm::Ed25519 => DkimAlgorithm::Ed25519Sha256,
        KeyAlgorithm::Rsa => DkimAlgorithm::RsaSha256,
    };
    let out = out
        .clone()
        .unwrap_or_else(|| format!("dkim-{domain}-{selector}.pem").into());
    let key_file = std::path::absolute(&out).unwrap_or_else(|_| out.clone());
    let snippet = format!(
        "[[dkim]]\ndomain = {}\nselector = {}\nalgorithm = \"{}\"\nprivate_key = {}\n",
        toml::Value::String(domain.clone()),
        toml::Value::String(selector.clone()),
        algorithm.name(),
        toml::Value::String(key_file.display().to_string()),
    );
    // The entry must be one ternd accepts: this checks domain and selector.
    if let Err(e) = tern_node::config::Config::from_toml(&snippet) {
        eprintln!("ternctl: {e}");
        return ExitCode::from(2);
    }
    if out.exists() {
        eprintln!("ternctl: {} exists; not overwriting it", out.display());
        return ExitCode::from(1);
    }
    let key = match keygen::generate(algorithm, *bits) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("ternctl: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = keygen::write_private_key(&out, &key.private_pem) {
        eprintln!("ternctl: cannot write {}: {e}", out.display());
        return ExitCode::from(1);
    }
    let txt_name = format!("{selector}._domainkey.{domain}");
    let txt_value = key.txt_value();
    if json {
        print_json(&json!({
            "domain": domain,
            "selector": selector,
            "algorithm": algorithm.name(),
            "key_file": key_file.display().to_string(),
            "txt_name": txt_name,
            "txt_value": txt_value,
            "txt_strings": keygen::txt_strings(&txt_value),
        }));
    } else {
        println!("Private key written to {} (mode 0600).\n", key_file.display());
        println!("Add to the ternd configuration:\n\n{snippet}");
        println!("Publish this DNS record before signing with the key:\n");
        println!("{txt_name}. IN TXT {}", keygen::zone_txt(&txt_value));
    }
    ExitCode::SUCCESS
}

fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Cluster-wide answers name the members that did not answer (on stderr,
/// so that `-o json` output stays parseable).
fn warn_unreachable(nodes: &[u64]) {
    if !nodes.is_empty() {
        eprintln!("warning: members {nodes:?} did not answer; their shards may be missing or stale");
    }
}

fn status_json(s: &StatusReply) -> serde_json::Value {
    json!({
        "node_id": s.node_id,
        "hostname": s.hostname,
        "version": s.version,
        "control_leader": s.control_leader,
        "queued_messages": s.queued_messages,
        "unreachable": s.unreachable,
        "members": s.members.iter().map(|m| json!({
            "id": m.id, "addr": m.addr, "role": m.role, "control_leader": m.is_control_leader,
        })).collect::<Vec<_>>(),
        "shards": s.shards.iter().map(|sh| json!({
            "shard": sh.shard, "leader": sh.leader, "replicas": sh.replicas, "voters": sh.voters, "joint": sh.joint, "term": sh.term,
            "applied_index": sh.applied_index, "queued_messages": sh.queued_messages,
        })).collect::<Vec<_>>(),
    })
}

fn message_json(m: &MessageInfo) -> serde_json::Value {
    json!({
        "id": m.id,
        "shard": m.shard,
        "reverse_path": m.reverse_path,
        "recipients": m.recipients.iter().map(|r| json!({
            "address": r.address, "status": r.status, "notify": r.notify,
            "orcpt": r.orcpt, "last_reply": r.last_reply,
        })).collect::<Vec<_>>(),
        "size": m.size,
        "received_at": m.received_at,
        "attempts": m.attempts,
        "next_attempt": m.next_attempt,
        "ret": m.ret,
        "envid": m.envid,
        "body_type": m.body_type,
        "smtputf8": m.smtputf8,
        "helo": m.helo,
        "client_ip": m.client_ip,
        "held": m.held,
    })
}

fn print_status(s: &StatusReply) {
    println!("node {} ({}), tern {}", s.node_id, s.hostname, s.version);
    println!("control-group leader: {}", opt_node(s.control_leader));
    println!("queued messages: {}\n", s.queued_messages);
    let members: Vec<Vec<String>> = s
        .members
        .iter()
        .map(|m| {
            vec![
                m.id.to_string(),
                m.addr.clone(),
                m.role.clone(),
                if m.is_control_leader { "yes" } else { "" }.into(),
            ]
        })
        .collect();
    print_table(&["ID", "ADDR", "ROLE", "CONTROL LEADER"], &members);
    println!();
    print_shards(s);
}

fn print_shards(s: &StatusReply) {
    let shards: Vec<Vec<String>> = s
        .shards
        .iter()
        .map(|sh| {
            vec![
                sh.shard.to_string(),
                opt_node(sh.leader),
                sh.replicas.iter().map(u64::to_string).collect::<Vec<_>>().join(","),
                sh.voters.iter().map(u64::to_string).collect::<Vec<_>>().join(","),
                sh.term.to_string(),
                sh.applied_index.to_string(),
                sh.queued_messages.to_string(),
            ]
        })
        .collect();
    print_table(
        &["SHARD", "LEADER", "REPLICAS", "VOTERS", "TERM", "APPLIED", "QUEUED"],
        &shards,
    );
}

fn print_message(m: &MessageInfo) {
    let fields = [
        ("id", m.id.clone()),
        ("shard", m.shard.to_string()),
        ("sender", sender(&m.reverse_path)),
        ("size", format!("{} bytes", m.size)),
        ("received", time(m.received_at)),
        ("attempts", m.attempts.to_string()),
        (
            "next attempt",
            if m.next_attempt == 0 {
                "now".into()
            } else {
                time(m.next_attempt)
            },
        ),
        (
            "body",
            format!("{}{}", m.body_type, if m.smtputf8 { ", SMTPUTF8" } else { "" }),
        ),
        ("ret", m.ret.clone()),
        ("envid", m.envid.clone()),
        ("client", format!("{} (helo {})", m.client_ip, m.helo)),
    ];
    for (k, v) in fields {
        if !v.is_empty() {
            println!("{k:>13}: {v}");
        }
    }
    println!();
    let rows: Vec<Vec<String>> = m
        .recipients
        .iter()
        .map(|r| {
            vec![
                r.address.clone(),
                r.status.clone(),
                r.notify.clone(),
                r.orcpt.clone(),
                r.last_reply.clone(),
            ]
        })
        .collect();
    print_table(&["RECIPIENT", "STATUS", "NOTIFY", "ORCPT", "LAST REPLY"], &rows);
}

fn sender(reverse_path: &str) -> String {
    if reverse_path.is_empty() {
        "<>".into()
    } else {
        reverse_path.into()
    }
}

fn opt_node(id: u64) -> String {
    if id == 0 {
        "none".into()
    } else {
        id.to_string()
    }
}

fn time(unix: i64) -> String {
    chrono::DateTime::from_timestamp(unix, 0)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|| unix.to_string())
}

fn age(secs: u64) -> String {
    match secs {
        0..=119 => format!("{secs}s"),
        120..=7199 => format!("{}m", secs / 60),
        _ => format!("{}h", secs / 3600),
    }
}

fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let text: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}", w = *w))
            .collect();
        println!("{}", text.join("  ").trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}
