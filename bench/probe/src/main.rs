//! Open-loop SMTP latency probe for `bench/run` (which runs it beside
//! ternd; see bench/README.md, "Latency phase").
//!
//! Opens `--connections` SMTP sessions (spread over the targets) and sends
//! `--messages` messages at a fixed aggregate `--rate`, round-robin over the
//! sessions: message i is due at start + i/rate, and a session that falls
//! behind sends its next one at once. For every message it records the time
//! from writing the final ".\r\n" (the body written before) to reading the
//! whole reply. MAIL, RCPT and DATA go in one write (RFC 2920). One thread:
//! the probe shares the machine with what it measures, and the Python probe
//! it replaced took 0.2-0.4 ms of CPU per message (15 % of this 2-core machine at
//! 1,300 messages a second). Every wait is bounded (`--timeout` per message,
//! `--deadline` overall).

use std::collections::BTreeMap;
use std::io;
use std::time::{Duration, Instant};

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Parser, Debug)]
#[command(about = "Open-loop SMTP latency probe (see bench/README.md)")]
struct Args {
    /// HOST:PORT (several: sessions are spread over them)
    #[arg(required = true)]
    targets: Vec<String>,
    #[arg(long, default_value_t = 10)]
    connections: usize,
    #[arg(long, default_value_t = 1000)]
    messages: usize,
    /// Aggregate messages per second.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Body bytes (headers excluded).
    #[arg(long, default_value_t = 10240)]
    size: usize,
    /// Seconds per message exchange.
    #[arg(long, default_value_t = 60.0)]
    timeout: f64,
    /// Seconds for the whole probe.
    #[arg(long, default_value_t = 600.0)]
    deadline: f64,
    /// Write each message's end-of-data time (s from start) and latency (ms) here.
    #[arg(long)]
    raw: Option<String>,
}

fn make_body(size: usize, idx: usize) -> Vec<u8> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut body = format!(
        "From: <bench@source.test>\r\nTo: <rcpt@sink.test>\r\nSubject: latency probe {idx}\r\n\
         Message-ID: <lat.{idx}.{nanos}@source.test>\r\nDate: {}\r\n\r\n",
        chrono::Utc::now().format("%a, %d %b %Y %H:%M:%S +0000")
    )
    .into_bytes();
    let line = b"La la la la la la la la la la la la la la la la la la la la la la la la la.\r\n";
    for _ in 0..(size / line.len()).max(1) {
        body.extend_from_slice(line);
    }
    body
}

struct Session {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Session {
    async fn open(target: &str) -> io::Result<Session> {
        let stream = TcpStream::connect(target).await?;
        stream.set_nodelay(true)?;
        let mut s = Session {
            stream,
            buf: Vec::with_capacity(4096),
        };
        if s.reply().await? != 220 {
            return Err(io::Error::other("greeting"));
        }
        if s.command(b"EHLO latency.source.test\r\n").await? != 250 {
            return Err(io::Error::other("EHLO"));
        }
        Ok(s)
    }

    /// The code of the next whole reply (continuation lines skipped).
    async fn reply(&mut self) -> io::Result<u16> {
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                if line.len() >= 4 && line[3] == b'-' {
                    continue;
                }
                let code = std::str::from_utf8(line.get(..3).unwrap_or_default())
                    .ok()
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(0);
                return Ok(code);
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed"));
            }
        }
    }

    async fn command(&mut self, line: &[u8]) -> io::Result<u16> {
        self.stream.write_all(line).await?;
        self.reply().await
    }

    /// (reply code, time from the final dot to the reply; None when refused).
    async fn send(&mut self, body: &[u8]) -> io::Result<(u16, Option<Duration>)> {
        self.stream
            .write_all(b"MAIL FROM:<bench@source.test>\r\nRCPT TO:<rcpt@sink.test>\r\nDATA\r\n")
            .await?;
        let codes = [self.reply().await?, self.reply().await?, self.reply().await?];
        if codes != [250, 250, 354] {
            if codes[2] == 354 {
                // DATA accepted after a refusal: end it empty
                self.command(b".\r\n").await?;
            }
            self.command(b"RSET\r\n").await?;
            let code = codes
                .iter()
                .copied()
                .find(|c| *c != 250 && *c != 354)
                .unwrap_or(codes[2]);
            return Ok((code, None));
        }
        self.stream.write_all(body).await?;
        let t0 = Instant::now();
        self.stream.write_all(b".\r\n").await?;
        let code = self.reply().await?;
        Ok((code, Some(t0.elapsed())))
    }
}

/// CPU time of this process so far (on-CPU nanoseconds, from schedstat).
fn cpu_seconds() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/schedstat").ok()?;
    let ns: f64 = s.split_whitespace().next()?.parse().ok()?;
    Some(ns / 1e9)
}

fn pct(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let k = (p / 100.0 * (sorted.len() - 1) as f64).round() as usize;
    sorted.get(k.min(sorted.len() - 1)).copied()
}

#[derive(Default)]
struct Outcome {
    /// (seconds from start of the final dot, seconds to the reply)
    times: Vec<(f64, f64)>,
    errors: BTreeMap<String, usize>,
}

async fn worker(k: usize, mut session: Session, args: &Args, start: Instant, deadline: Instant) -> Outcome {
    let mut out = Outcome::default();
    let mut bodies: BTreeMap<usize, Vec<u8>> = BTreeMap::new();
    for i in (k..args.messages).step_by(args.connections) {
        let due = start + Duration::from_secs_f64(i as f64 / args.rate);
        if Instant::now() > deadline {
            *out.errors.entry("deadline".into()).or_default() += 1;
            continue;
        }
        tokio::time::sleep_until(due.into()).await;
        let body = bodies.entry(i % 4).or_insert_with(|| make_body(args.size, i));
        match tokio::time::timeout(Duration::from_secs_f64(args.timeout), session.send(body)).await {
            Ok(Ok((250, Some(dt)))) => {
                let t = (Instant::now() - dt - start).as_secs_f64();
                out.times.push((t, dt.as_secs_f64()));
            }
            Ok(Ok((code, _))) => *out.errors.entry(code.to_string()).or_default() += 1,
            // timeout or a broken session: count it and stop this session
            Ok(Err(e)) => {
                *out.errors.entry(format!("{:?}", e.kind())).or_default() += 1;
                return out;
            }
            Err(_) => {
                *out.errors.entry("TimeoutError".into()).or_default() += 1;
                return out;
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), session.command(b"QUIT\r\n")).await;
    out
}

async fn run(args: &Args) -> serde_json::Value {
    let timeout = Duration::from_secs_f64(args.timeout);
    let mut sessions = Vec::with_capacity(args.connections);
    for i in 0..args.connections {
        let target = &args.targets[i % args.targets.len()];
        match tokio::time::timeout(timeout, Session::open(target)).await {
            Ok(Ok(s)) => sessions.push(s),
            Ok(Err(e)) => return failure(args, &format!("{target}: {e}")),
            Err(_) => return failure(args, &format!("{target}: no greeting within {timeout:?}")),
        }
    }
    let cpu0 = cpu_seconds();
    let start = Instant::now() + Duration::from_millis(50);
    let deadline = Instant::now() + Duration::from_secs_f64(args.deadline);
    let outcomes = {
        let futures: Vec<_> = sessions
            .into_iter()
            .enumerate()
            .map(|(k, s)| worker(k, s, args, start, deadline))
            .collect();
        // join_all wakes only the session whose socket or timer is ready
        futures::future::join_all(futures).await
    };
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds().zip(cpu0).map(|(b, a)| b - a);
    let mut times: Vec<(f64, f64)> = Vec::new();
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    for o in outcomes {
        times.extend(o.times);
        for (k, v) in o.errors {
            *errors.entry(k).or_default() += v;
        }
    }
    if let Some(path) = &args.raw {
        let mut sorted = times.clone();
        sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
        let text: String = sorted
            .iter()
            .map(|(t, dt)| format!("{t:.6} {:.3}\n", dt * 1000.0))
            .collect();
        if let Err(e) = std::fs::write(path, text) {
            eprintln!("cannot write {path}: {e}");
        }
    }
    let mut lat: Vec<f64> = times.iter().map(|t| t.1).collect();
    lat.sort_by(f64::total_cmp);
    let ms = |v: Option<f64>| v.map(|v| (v * 1e6).round() / 1e3);
    serde_json::json!({
        "count": args.messages, "ok": lat.len(), "errors": errors,
        "connections": args.connections, "target_rate": args.rate, "size": args.size,
        "achieved_rate": (elapsed > 0.0).then(|| (lat.len() as f64 / elapsed * 10.0).round() / 10.0),
        "min_ms": ms(lat.first().copied()), "median_ms": ms(pct(&lat, 50.0)),
        "p90_ms": ms(pct(&lat, 90.0)), "p99_ms": ms(pct(&lat, 99.0)),
        "max_ms": ms(lat.last().copied()),
        // the probe's own CPU: it shares the machine with what it measures
        "probe_cpu_ms_per_msg": cpu.map(|c| (c * 1e6 / lat.len().max(1) as f64).round() / 1e3),
        "probe": "tern-latency-probe",
    })
}

fn failure(args: &Args, what: &str) -> serde_json::Value {
    serde_json::json!({"count": args.messages, "ok": 0, "errors": {"connect": 1}, "failure": what})
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let bound = Duration::from_secs_f64(args.deadline + 30.0);
    let res = match tokio::time::timeout(bound, run(&args)).await {
        Ok(v) => v,
        Err(_) => failure(&args, "the whole probe passed its deadline"),
    };
    println!("{res}");
    if res.get("ok").and_then(serde_json::Value::as_u64) == Some(args.messages as u64) {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
