//! `ternd`: the Tern node daemon. Argument parsing and logging setup only.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// mimalloc instead of glibc malloc: less CPU per message, and less
/// slowdown as a large queue grows the heap (docs/design.md, "Memory
/// allocator").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Tern MTA node. Without --config it runs a single-node cluster on the
/// embedded default (SMTP 127.0.0.1:2525, gRPC 127.0.0.1:7070, HTTP
/// 127.0.0.1:8080, data in ./tern-data, mail for localhost delivered to
/// ./tern-data/maildir/localhost/USER/).
#[derive(Parser)]
#[command(name = "ternd", version)]
struct Args {
    /// TOML configuration file (see docs/configuration.md).
    #[arg(long, short = 'c', env = "TERN_CONFIG")]
    config: Option<PathBuf>,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Read a password (one line) from stdin and print its argon2id hash,
    /// for the `[auth] users_file` (see docs/smtp.md).
    HashPassword,
    /// Check a config file without starting anything (like `nginx -t`): the
    /// TOML, every value, and the files it names (DKIM keys, certificates,
    /// users file). Prints "FILE: ok" (exit 0) or the error naming the key (exit 1).
    CheckConfig {
        /// The TOML configuration file.
        file: PathBuf,
    },
    /// Unsafe recovery after a majority of nodes is lost for good: rewrite
    /// this node's groups (node stopped) so that the kept members form the
    /// cluster. Messages whose shard had no replica on a kept member are
    /// lost. Without --yes only says what it would do. See
    /// docs/operations.md, "Unsafe recovery".
    Recover {
        /// The surviving node ids that stay members (this node among them), comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        keep_members: Vec<u64>,
        /// Write the changes (without it: a dry run).
        #[arg(long)]
        yes: bool,
    },
}

/// `ternd recover`: prints what it changed (or would change) and the shards lost.
fn recover(config: &tern_node::config::Config, keep: &[u64], yes: bool) -> anyhow::Result<()> {
    let keep: std::collections::BTreeSet<u64> = keep.iter().copied().collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = runtime.block_on(tern_node::cluster::recover::recover(config, &keep, !yes))?;
    let verb = if yes { "rewrote" } else { "would rewrite" };
    for (g, queued) in &report.groups {
        let what = if g.group == 0 {
            "control group".to_owned()
        } else {
            format!("shard {} ({queued} queued messages)", g.group)
        };
        println!(
            "{verb} {what}: voters {:?} (learners {:?}) -> {:?} at log index {}",
            g.old_voters, g.old_learners, g.new_voters, g.log_id.index
        );
    }
    for g in &report.untouched {
        println!("left group {g} alone: no kept member is in its membership");
    }
    if !report.removed.is_empty() {
        println!("lost members removed from the cluster: {:?}", report.removed);
    }
    if report.lost_shards.is_empty() {
        println!("no shard lost: every shard had a replica on a kept member");
    } else {
        println!(
            "LOST shards {:?}: no replica on a kept member; their queued messages cannot be recovered",
            report.lost_shards
        );
    }
    if yes {
        println!("done: start the kept nodes normally (ternd --config FILE)");
    } else {
        println!("dry run: nothing written; run again with --yes to apply");
    }
    Ok(())
}

/// `ternd hash-password`: the line's end (LF or CRLF) is not part of the password.
fn hash_password() -> anyhow::Result<()> {
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    let password = line.strip_suffix('\n').unwrap_or(&line);
    let password = password.strip_suffix('\r').unwrap_or(password);
    anyhow::ensure!(!password.is_empty(), "no password on stdin");
    let hash = tern_node::submission::hash_password(password.as_bytes()).map_err(anyhow::Error::msg)?;
    println!("{hash}");
    Ok(())
}

/// `ternd check-config FILE`.
fn check_config(file: &std::path::Path) -> std::process::ExitCode {
    match tern_node::reload::check_file(file) {
        Ok(_) => {
            println!("{}: ok", file.display());
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}: {e:#}", file.display());
            std::process::ExitCode::FAILURE
        }
    }
}

fn main() -> anyhow::Result<std::process::ExitCode> {
    let args = Args::parse();
    match &args.command {
        Some(Cmd::HashPassword) => return hash_password().map(|()| std::process::ExitCode::SUCCESS),
        Some(Cmd::CheckConfig { file }) => return Ok(check_config(file)),
        Some(Cmd::Recover { .. }) | None => {}
    }
    let config = match &args.config {
        Some(path) => tern_node::config::Config::from_file(path)?,
        None => tern_node::config::Config::embedded_default()?,
    };
    if let Some(Cmd::Recover { keep_members, yes }) = &args.command {
        return recover(&config, keep_members, *yes).map(|()| std::process::ExitCode::SUCCESS);
    }
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn,sled=warn,h2=warn,tower=warn"));
    let log = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let log = if args.log_json || config.log_format == tern_node::config::LogFormat::Json {
        log.json().boxed()
    } else {
        log.boxed()
    };
    // Webhooks get event lines from their own layer, whatever RUST_LOG says;
    // always installed, as a reload may add the first webhook (it formats
    // nothing while there is none).
    let events = tern_node::webhook::EventTap::default();
    let tap = events.layer();
    // The console's recent audit events, whatever RUST_LOG says.
    let recent = tern_node::console::RecentEvents::default();
    tracing_subscriber::registry()
        .with(log.with_filter(filter))
        .with(tap)
        .with(recent.layer())
        .init();
    // actix runs on the same multi-thread tokio runtime as Raft and tonic.
    // Nodes sharing a machine each take a few threads (node.worker_threads):
    // more runnable threads than cores wake each other and wait in the CPU
    // queue, which shows in the 250's latency (bench/RESULTS.md).
    let worker_threads = config.worker_threads;
    let system = actix::System::with_tokio_rt(move || {
        let mut rt = tokio::runtime::Builder::new_multi_thread();
        if let Some(n) = worker_threads {
            rt.worker_threads(n);
        }
        rt.enable_all().build().expect("cannot start the tokio runtime")
    });
    if let Err(e) = system.block_on(tern_node::app::run_from(config, events, recent, args.config.clone())) {
        // Exit now: dropping the runtime would wait for tasks stuck on a
        // failed group's storage. The supervisor restarts the node.
        eprintln!("Error: {e:?}");
        std::process::exit(1);
    }
    Ok(std::process::ExitCode::SUCCESS)
}
