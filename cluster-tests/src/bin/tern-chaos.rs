//! tern-chaos: runs a real Tern cluster, injects random faults (SIGKILL,
//! SIGSTOP, partitions, restarts, power cuts on `tern-powerfs`) while mail flows, and checks that every
//! acknowledged message is delivered. With `--endpoints` it drives a
//! cluster it did not start (local processes; no partitions). Exit code 0:
//! no loss; 1: loss (or a message delivered as two different copies);
//! 2: setup error. See docs/failover-testing.md.

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, ValueEnum};
use rand::{Rng, SeedableRng};

use cluster_tests::check::{self, probe_resume};
use cluster_tests::cluster::{Cluster, Options};
use cluster_tests::external::External;
use cluster_tests::load::{Load, LoadConfig};
use cluster_tests::target::Target;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
enum Fault {
    /// SIGKILL a node, restart it 3 s later.
    Kill,
    /// SIGSTOP a node for 3 s (past the election timeout), then SIGCONT.
    Pause,
    /// Cut a node's gRPC links for 4 s, then heal.
    Partition,
    /// SIGKILL a node and restart it at once.
    Restart,
    /// SIGKILL a node, drop every write it never fsynced (half the time
    /// tearing the oldest one at a 4 KiB boundary), restart it 3 s later.
    /// Every node's data dir is then on its own `tern-powerfs` mount.
    #[value(name = "power-cut")]
    PowerCut,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::Kill => "kill",
            Fault::Pause => "pause",
            Fault::Partition => "partition",
            Fault::Restart => "restart",
            Fault::PowerCut => "power-cut",
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Parser, Debug)]
#[command(about = "Random faults on a real Tern cluster while mail flows; checks nothing acknowledged is lost")]
struct Args {
    /// Nodes of the cluster tern-chaos starts (not with --endpoints).
    #[arg(long, default_value_t = 3)]
    nodes: u64,
    /// Shards of the cluster tern-chaos starts (not with --endpoints).
    #[arg(long, default_value_t = 6)]
    shards: u32,
    /// Drive an existing cluster instead: the gRPC admin addresses of its
    /// nodes (local processes: faults signal the process listening there).
    #[arg(long, value_delimiter = ',', requires = "sink")]
    endpoints: Vec<std::net::SocketAddr>,
    /// With --endpoints: the nodes' SMTP addresses, in the same order
    /// (default: found among each process's listeners, the one greeting 220).
    #[arg(long, value_delimiter = ',', requires = "endpoints")]
    smtp: Vec<std::net::SocketAddr>,
    /// With --endpoints: where tern-chaos runs its sink (smtp-sink); the
    /// cluster's `[[route]]` must send the test mail (to example.test) there.
    #[arg(long, requires = "endpoints")]
    sink: Option<std::net::SocketAddr>,
    /// Messages to send (at most), paced over the duration.
    #[arg(long, default_value_t = 2000)]
    messages: usize,
    /// How long to inject faults and send mail (`90s`, `2m`, or seconds).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    duration: Duration,
    /// Faults to choose from: kill, pause, partition, restart, power-cut.
    #[arg(long, value_delimiter = ',', default_value = "kill,pause,partition,restart")]
    faults: Vec<Fault>,
    /// Random seed (default: from the clock); printed so a run can be repeated.
    #[arg(long)]
    seed: Option<u64>,
    /// Concurrent SMTP sessions.
    #[arg(long, default_value_t = 4)]
    sessions: usize,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Where to write node logs when mail is lost (default: a temp dir, printed).
    #[arg(long)]
    log_dir: Option<std::path::PathBuf>,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    report: Option<std::path::PathBuf>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("bad duration {s:?} (e.g. 60s, 2m)"))?;
    if !(v > 0.0 && v * mult <= 3600.0) {
        return Err(format!("duration {s:?} out of range (0, 1h]"));
    }
    Ok(Duration::from_secs_f64(v * mult))
}

#[derive(serde::Serialize)]
struct FaultRecord {
    at_secs: f64,
    /// Seconds (since the start) when the fault was undone (restart done,
    /// SIGCONT sent, links healed); `None` if undoing it failed.
    undone_secs: Option<f64>,
    fault: Fault,
    node: u64,
    /// Seconds until a probe message was acknowledged / delivered.
    resume_ack_secs: Option<f64>,
    resume_delivery_secs: Option<f64>,
    /// Shards the victim led when the fault began.
    led: Vec<u64>,
    /// Seconds until every one of them had another leader (failover).
    new_leaders_secs: Option<f64>,
    /// Seconds until converged after the fault ended.
    converged_secs: Option<f64>,
    error: Option<String>,
}

#[derive(serde::Serialize)]
struct Report {
    seed: u64,
    /// `harness` (tern-chaos started the cluster) or `endpoints`.
    mode: &'static str,
    nodes: u64,
    shards: u32,
    duration_secs: f64,
    #[serde(flatten)]
    verdict: check::Verdict,
    faults: Vec<FaultRecord>,
    /// Power cuts injected (also counted in `faults`).
    power_cuts: usize,
    /// Messages acknowledged per second before the first fault, during
    /// each fault and after it was undone.
    phases: Vec<check::Phase>,
    /// Injection stopped early: a fault could not be undone (so a second
    /// faulty node never joins a first one).
    stopped_early: Option<String>,
    max_resume_secs: Option<f64>,
    median_resume_secs: Option<f64>,
    max_new_leaders_secs: Option<f64>,
    converged_at_end: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let external = !args.endpoints.is_empty();
    if args.faults.is_empty() {
        eprintln!("tern-chaos: need at least one fault kind");
        return ExitCode::from(2);
    }
    if external && args.faults.contains(&Fault::Partition) {
        eprintln!(
            "tern-chaos: --faults partition needs the harness's proxies between nodes; \
             it cannot be used with --endpoints (choose from kill,pause,restart)"
        );
        return ExitCode::from(2);
    }
    if external && args.faults.contains(&Fault::PowerCut) {
        eprintln!(
            "tern-chaos: --faults power-cut needs each node's data dir on a tern-powerfs mount that \
             tern-chaos starts; it cannot be used with --endpoints"
        );
        return ExitCode::from(2);
    }
    let nodes = if external {
        args.endpoints.len() as u64
    } else {
        args.nodes
    };
    if nodes < 3 {
        eprintln!("tern-chaos: need at least 3 nodes");
        return ExitCode::from(2);
    }
    eprintln!(
        "tern-chaos: seed {seed}, {nodes} nodes{}, {} messages over {:?}, faults {:?}",
        if external {
            " (existing cluster)".to_owned()
        } else {
            format!(", {} shards", args.shards)
        },
        args.messages,
        args.duration,
        args.faults
    );
    let log_dir = args
        .log_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("tern-chaos-{seed}")));
    let mut shards = args.shards;
    let mut target: Box<dyn Target> = if external {
        let Some(sink) = args.sink else {
            eprintln!("tern-chaos: --endpoints needs --sink");
            return ExitCode::from(2);
        };
        match External::connect(&args.endpoints, &args.smtp, sink, log_dir.clone()) {
            Ok(e) => {
                shards = e.shard_count();
                Box::new(e)
            }
            Err(e) => {
                eprintln!("tern-chaos: setup failed: {e:#}");
                return ExitCode::from(2);
            }
        }
    } else {
        match Cluster::start(
            args.nodes,
            Options {
                shards: args.shards,
                power_fs: args.faults.contains(&Fault::PowerCut),
                ..Options::default()
            },
        ) {
            Ok(mut c) => {
                c.quiet_logs();
                Box::new(c)
            }
            Err(e) => {
                eprintln!("tern-chaos: setup failed: {e:#}");
                return ExitCode::from(2);
            }
        }
    };
    match run(&args, seed, target.as_mut()) {
        Ok(mut report) => {
            report.mode = if external { "endpoints" } else { "harness" };
            report.nodes = nodes;
            report.shards = shards;
            let bad = !report.verdict.ok();
            if bad {
                match target.save_logs(&log_dir) {
                    Ok(()) => eprintln!("tern-chaos: node logs in {}", log_dir.display()),
                    Err(e) => eprintln!("tern-chaos: saving logs: {e:#}"),
                }
            }
            print_report(&report, args.output);
            if let Some(path) = &args.report {
                let json = serde_json::to_string_pretty(&report).unwrap_or_default();
                if let Err(e) = std::fs::write(path, json) {
                    eprintln!("tern-chaos: writing {}: {e}", path.display());
                    return ExitCode::from(2);
                }
            }
            if bad {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("tern-chaos: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(args: &Args, seed: u64, cluster: &mut dyn Target) -> anyhow::Result<Report> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let start = Instant::now();
    let load = Load::start(
        LoadConfig {
            messages: args.messages,
            sessions: args.sessions,
            rate: Some(args.messages as f64 / (args.duration.as_secs_f64() * 0.9)),
            deadline: args.duration,
            prefix: format!("chaos{seed}"),
            ..LoadConfig::default()
        },
        cluster.targets(),
    );
    // One progress line per second.
    let progress = load.progress();
    let sink_dir = cluster.sink().dir().to_path_buf();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ticker = {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                std::thread::sleep(Duration::from_secs(1));
                let (sent, acked) = progress.counts();
                let delivered = std::fs::read_dir(&sink_dir).map(|d| d.count()).unwrap_or(0);
                eprintln!(
                    "[{:>5.1}s] sent {sent} acked {acked} deliveries {delivered}",
                    start.elapsed().as_secs_f64()
                );
            }
        })
    };
    let mut faults = Vec::new();
    // Throughput intervals: (name, from, to).
    let mut intervals = Vec::new();
    let (mut phase_name, mut phase_start) = ("before faults".to_owned(), start);
    let mut stopped_early = None;
    // Let mail flow before the first fault.
    std::thread::sleep(Duration::from_secs(2));
    while start.elapsed() + Duration::from_secs(8) < args.duration && !load.is_done() {
        let fault = args.faults[rng.gen_range(0..args.faults.len())];
        let members = cluster.healthy_ids();
        if members.is_empty() {
            stopped_early = Some("no healthy node left".to_owned());
            break;
        }
        // Half the time a shard leader (the interesting victim), else any node.
        let node = if rng.gen_bool(0.5) {
            cluster
                .leaders()
                .ok()
                .and_then(|l| {
                    let v: Vec<u64> = l.values().copied().filter(|x| *x != 0).collect();
                    (!v.is_empty()).then(|| v[rng.gen_range(0..v.len())])
                })
                .unwrap_or(members[0])
        } else {
            members[rng.gen_range(0..members.len())]
        };
        let at = Instant::now();
        let at_secs = start.elapsed().as_secs_f64();
        eprintln!("[{at_secs:>5.1}s] fault: {} node {node}", fault.name());
        intervals.push((std::mem::take(&mut phase_name), phase_start, at));
        let label = format!("{} n{node}", fault.name());
        let mut rec = FaultRecord {
            at_secs,
            undone_secs: None,
            fault,
            node,
            resume_ack_secs: None,
            resume_delivery_secs: None,
            led: cluster.shards_led_by(node).unwrap_or_default(),
            new_leaders_secs: None,
            converged_secs: None,
            error: None,
        };
        let tear = rng.gen_bool(0.5);
        let undone = inject(cluster, fault, node, tear, at, &mut rec);
        if let Some(e) = &rec.error {
            eprintln!(
                "[{:>5.1}s] fault {fault:?} node {node}: {e}",
                start.elapsed().as_secs_f64()
            );
        }
        eprintln!(
            "[{:>5.1}s] fault done: {fault:?} node {node}: led {:?}, new leaders {:?}s, resumed (ack) {:?}s, \
             converged {:?}s",
            start.elapsed().as_secs_f64(),
            rec.led,
            rec.new_leaders_secs.map(|s| (s * 10.0).round() / 10.0),
            rec.resume_ack_secs.map(|s| (s * 10.0).round() / 10.0),
            rec.converged_secs.map(|s| (s * 10.0).round() / 10.0)
        );
        match undone {
            Some(t) => {
                rec.undone_secs = Some(t.saturating_duration_since(start).as_secs_f64());
                intervals.push((format!("during {label}"), at, t));
                (phase_name, phase_start) = (format!("after {label}"), t);
                faults.push(rec);
            }
            None => {
                // The node stays faulty: inject nothing more.
                stopped_early = Some(format!(
                    "{label} could not be undone: {}",
                    rec.error.clone().unwrap_or_default()
                ));
                (phase_name, phase_start) = (format!("during {label} (not undone)"), at);
                faults.push(rec);
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(rng.gen_range(1000..3000)));
    }
    load.stop();
    let report = load.finish();
    intervals.push((phase_name, phase_start, Instant::now()));
    let mut phases = check::phases(&report.records, start, &intervals);
    // Undo whatever is left, then check.
    for id in cluster.partitioned() {
        cluster.heal(id);
    }
    cluster.restart_all_down().context("restarting nodes at the end")?;
    let verdict = check::wait_no_loss(&report, cluster.sink(), Duration::from_secs(120));
    check::count_duplicates(&mut phases, &report, cluster.sink(), start);
    let converged_at_end = cluster.wait_converged(Duration::from_secs(60)).is_ok();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = ticker.join();
    let max_resume_secs = faults
        .iter()
        .filter_map(|f| f.resume_delivery_secs)
        .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
    let median_resume_secs = {
        let mut all: Vec<f64> = faults.iter().filter_map(|f| f.resume_delivery_secs).collect();
        all.sort_by(f64::total_cmp);
        all.get(all.len() / 2).copied()
    };
    let max_new_leaders_secs = faults
        .iter()
        .filter_map(|f| f.new_leaders_secs)
        .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
    let power_cuts = faults.iter().filter(|f| f.fault == Fault::PowerCut).count();
    Ok(Report {
        power_cuts,
        max_new_leaders_secs,
        seed,
        mode: "harness",
        nodes: args.nodes,
        shards: args.shards,
        duration_secs: start.elapsed().as_secs_f64(),
        verdict,
        faults,
        phases,
        stopped_early,
        max_resume_secs,
        median_resume_secs,
        converged_at_end,
    })
}

/// Applies one fault, measures failover and resume, undoes the fault and
/// waits for convergence (each bounded). The fault is undone whatever
/// failed before (so at most one node is ever faulty); errors go to
/// `rec.error`. Returns when the fault was undone, `None` if undoing failed.
fn inject(
    cluster: &mut dyn Target,
    fault: Fault,
    node: u64,
    tear: bool,
    at: Instant,
    rec: &mut FaultRecord,
) -> Option<Instant> {
    let mut errors = Vec::new();
    let hold = match fault {
        Fault::Kill | Fault::Pause | Fault::PowerCut => Duration::from_secs(3),
        Fault::Partition => Duration::from_secs(4),
        Fault::Restart => Duration::ZERO,
    };
    let applied = match fault {
        Fault::Kill | Fault::Restart => cluster.kill(node),
        Fault::PowerCut => cluster.power_off(node, tear),
        Fault::Pause => cluster.pause(node),
        Fault::Partition => cluster.partition(node),
    };
    match applied {
        Ok(()) => {
            if let Err(e) = measure_faulty(cluster, fault, node, at, rec) {
                errors.push(format!("{e:#}"));
            }
        }
        Err(e) => errors.push(format!("applying: {e:#}")),
    }
    let elapsed = at.elapsed();
    if elapsed < hold {
        std::thread::sleep(hold - elapsed);
    }
    let undo = match fault {
        Fault::Kill | Fault::Restart | Fault::PowerCut => cluster.restart(node),
        Fault::Pause => cluster.resume(node),
        Fault::Partition => {
            cluster.heal(node);
            Ok(())
        }
    };
    if let Err(e) = undo {
        errors.push(format!("undoing: {e:#}"));
        rec.error = Some(errors.join("; "));
        return None;
    }
    let undone = Instant::now();
    let after = (|| -> anyhow::Result<()> {
        if fault == Fault::Restart {
            let r = probe_resume(
                cluster,
                at,
                &format!("resume-{}", at.elapsed().as_nanos()),
                Duration::from_secs(30),
            )?;
            rec.resume_ack_secs = Some(r.acked.as_secs_f64());
            rec.resume_delivery_secs = Some(r.delivered.as_secs_f64());
        }
        cluster.wait_converged(Duration::from_secs(60))?;
        rec.converged_secs = Some(undone.elapsed().as_secs_f64());
        Ok(())
    })();
    if let Err(e) = after {
        errors.push(format!("{e:#}"));
    }
    if !errors.is_empty() {
        rec.error = Some(errors.join("; "));
    }
    Some(undone)
}

/// While the fault holds: new leaders for the victim's shards, then mail
/// acknowledged and delivered through a healthy node.
fn measure_faulty(
    cluster: &mut dyn Target,
    fault: Fault,
    node: u64,
    at: Instant,
    rec: &mut FaultRecord,
) -> anyhow::Result<()> {
    if fault == Fault::Restart {
        return Ok(());
    }
    if !rec.led.is_empty() {
        let led = rec.led.clone();
        tern_testkit::wait_until(Duration::from_secs(20), "new leaders", || {
            cluster
                .leaders()
                .is_ok_and(|l| led.iter().all(|s| l.get(s).is_some_and(|x| *x != node && *x != 0)))
        })?;
        rec.new_leaders_secs = Some(at.elapsed().as_secs_f64());
    }
    let r = probe_resume(
        cluster,
        at,
        &format!("resume-{}", at.elapsed().as_nanos()),
        Duration::from_secs(30),
    )?;
    rec.resume_ack_secs = Some(r.acked.as_secs_f64());
    rec.resume_delivery_secs = Some(r.delivered.as_secs_f64());
    Ok(())
}

fn print_report(r: &Report, output: Output) {
    let mut out = std::io::stdout().lock();
    if let Output::Json = output {
        let _ = writeln!(out, "{}", serde_json::to_string_pretty(r).unwrap_or_default());
        return;
    }
    let v = &r.verdict;
    let _ = writeln!(
        out,
        "tern-chaos report (seed {}, {}, {} nodes, {} shards, {:.0}s)",
        r.seed, r.mode, r.nodes, r.shards, r.duration_secs
    );
    let mut kinds = std::collections::BTreeMap::<String, usize>::new();
    for f in &r.faults {
        *kinds.entry(f.fault.name().to_owned()).or_default() += 1;
    }
    let kinds: Vec<String> = kinds.iter().map(|(k, n)| format!("{k} {n}")).collect();
    let rows = [
        ("messages sent", v.sent.to_string()),
        ("acknowledged (250)", v.acked.to_string()),
        ("rejected (4xx/5xx)", v.rejected.to_string()),
        ("broken / timed out", v.broken.to_string()),
        ("delivered (of acked)", v.delivered.to_string()),
        ("lost", v.lost.len().to_string()),
        (
            "duplicates",
            format!(
                "{} (+{} copies, {:.2}% of acked)",
                v.duplicates,
                v.extra_copies,
                v.duplicate_ratio() * 100.0
            ),
        ),
        ("unacked but delivered", v.unacked_delivered.to_string()),
        (
            "two different copies",
            format!(
                "{} failed, {} acked (must be 0)",
                v.failed_multi_copy.len(),
                v.acked_multi_copy.len()
            ),
        ),
        ("faults injected", format!("{} ({})", r.faults.len(), kinds.join(", "))),
        ("power cuts", r.power_cuts.to_string()),
        (
            "fault errors",
            r.faults.iter().filter(|f| f.error.is_some()).count().to_string(),
        ),
        (
            "max time to resume",
            r.max_resume_secs.map_or("-".into(), |s| format!("{s:.1}s")),
        ),
        (
            "median time to resume",
            r.median_resume_secs.map_or("-".into(), |s| format!("{s:.1}s")),
        ),
        (
            "max time to new leaders",
            r.max_new_leaders_secs.map_or("-".into(), |s| format!("{s:.1}s")),
        ),
        ("converged at end", r.converged_at_end.to_string()),
    ];
    for (k, val) in rows {
        let _ = writeln!(out, "  {k:<24} {val}");
    }
    if let Some(why) = &r.stopped_early {
        let _ = writeln!(out, "  stopped early: {why}");
    }
    let _ = writeln!(out, "  acceptance throughput per phase:");
    for p in &r.phases {
        let _ = writeln!(
            out,
            "    {:<28} {:>6.1}s..{:>6.1}s {:>6} acked {:>8.1}/s {:>4} duplicated",
            p.name, p.from_secs, p.to_secs, p.acked, p.acked_per_sec, p.duplicates
        );
    }
    if !v.lost.is_empty() {
        let _ = writeln!(out, "  lost: {:?}", &v.lost[..v.lost.len().min(20)]);
    }
    for (what, ids) in [("failed", &v.failed_multi_copy), ("acked", &v.acked_multi_copy)] {
        if !ids.is_empty() {
            let _ = writeln!(out, "  {what}, two different copies: {:?}", &ids[..ids.len().min(20)]);
        }
    }
}
