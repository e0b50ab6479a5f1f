//! `ternctl`: the Tern admin CLI. Talks gRPC to any node's AdminService.
//! Tables for people, `-o json` for scripts.
//!
//! Exit codes: 0 success, 1 the request failed (no node reachable, server
//! error, a wait that timed out), 2 usage error, 3 not found, 4 not
//! permitted (no or a wrong credential, or a role that does not allow the
//! command). A closed stdout (`ternctl queue list | head`) ends ternctl
//! quietly with 141, as a Unix tool killed by SIGPIPE, never a panic.
//!
//! `--endpoints a,b,c`: the command runs against the first node that
//! answers; a node that cannot be reached or answers UNAVAILABLE passes the
//! command to the next.
//!
//! Operator credentials: a client certificate (`--tls-cert`, `--tls-key`)
//! or a token (`--token-file FILE`, or the environment variable
//! `TERN_TOKEN`), sent as `authorization: Bearer <token>`.
//!
//! # Layout
//! - [`cli`]: the command line (clap): flags, commands, arguments.
//! - [`connect`]: the channel to a node: TLS, the operator token.
//! - [`commands`]: the commands that ask a node, and their output.
//! - [`pool`]: `pool show` (egress pools and warm-up progress).
//! - [`webhook`]: `webhook status` (durable events' backlog and dead letters).
//! - [`config`]: `config reload [--all]` (the nodes read their config file again).
//! - [`output`]: tables for people, JSON for scripts.
//! - [`suppression`]: the suppression-list commands and their CSV form.
//! - [`apikey`]: the sending API's keys.
//! - [`cert`], [`token`], [`dkim`]: offline commands (no node is contacted).
//!
//! Depends on the proto, model, pki and config crates only: never on the
//! node's runtime (openraft, sled, actix, mail-auth).

/// Every `println!` below goes through [`stdout_line`]: std's panics when
/// the reader of a pipe has gone.
macro_rules! println {
    () => {
        $crate::stdout_line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::stdout_line(format_args!($($arg)*))
    };
}

/// Writes one line to stdout; a closed pipe ends the process (status 141,
/// as SIGPIPE would), another write error is reported and exits 1.
fn stdout_line(args: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{args}") {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(141);
        }
        eprintln!("ternctl: writing to stdout: {e}");
        std::process::exit(1);
    }
}

mod apikey;
mod cert;
mod cli;
mod commands;
mod config;
mod connect;
mod dkim;
mod output;
mod pool;
mod shaping;
mod suppression;
mod token;
mod webhook;

use std::process::ExitCode;

use clap::Parser as _;

use cli::{Args, Command, Output};

fn main() -> ExitCode {
    let args = Args::parse();
    if let Command::Dkim(cmd) = &args.command {
        return dkim::command(cmd, args.output == Output::Json);
    }
    if let Command::Cert(cmd) = &args.command {
        return cert::command(cmd, args.output == Output::Json);
    }
    if let Command::Token(cmd) = &args.command {
        return token::command(cmd, args.output == Output::Json);
    }
    if let Command::Completion { shell } = &args.command {
        let mut command = <Args as clap::CommandFactory>::command();
        clap_complete::generate(*shell, &mut command, "ternctl", &mut std::io::stdout());
        return ExitCode::SUCCESS;
    }
    let token = match connect::read_token(args.token_file.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("ternctl: {e}");
            return ExitCode::from(2);
        }
    };
    if token.is_some() && args.tls_ca.is_none() {
        for endpoint in args.endpoints.iter().filter(|e| !connect::endpoint_is_loopback(e)) {
            eprintln!(
                "ternctl: warning: sending a token over plaintext gRPC to {endpoint}; anyone on the path can read it (use --tls-ca)"
            );
        }
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ternctl: cannot start runtime: {e}");
            return ExitCode::from(1);
        }
    };
    // Failover: the whole command again on the next endpoint when a node
    // cannot be reached or answers UNAVAILABLE (every command is safe to
    // repeat: operations re-select what is still queued).
    let endpoints: Vec<&String> = args.endpoints.iter().filter(|e| !e.trim().is_empty()).collect();
    if endpoints.is_empty() {
        eprintln!("ternctl: --endpoints is empty");
        return ExitCode::from(2);
    }
    for (i, endpoint) in endpoints.iter().enumerate() {
        match runtime.block_on(commands::run(&args, endpoint, token.clone())) {
            Ok(()) => return ExitCode::SUCCESS,
            Err(status) if status.code() == tonic::Code::Unavailable && i + 1 < endpoints.len() => {
                eprintln!("ternctl: {endpoint}: {}; trying {}", status.message(), endpoints[i + 1]);
            }
            Err(status) => return exit_code(&status),
        }
    }
    ExitCode::from(1)
}

/// The exit code for a failed request, as the crate doc lists them.
fn exit_code(status: &tonic::Status) -> ExitCode {
    eprintln!("ternctl: {}", status.message());
    match status.code() {
        tonic::Code::NotFound => ExitCode::from(3),
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => ExitCode::from(4),
        _ => ExitCode::from(1),
    }
}
