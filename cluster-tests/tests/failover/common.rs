//! Shared helpers of the scenarios.

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cluster_tests::check::{self, probe_resume, Verdict};
use cluster_tests::cluster::{Cluster, Options};
use cluster_tests::load::{Load, LoadConfig, LoadReport};

/// One multi-node scenario at a time.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// A cluster of `n` nodes with `shards` shards; panics with a clear message
/// when a binary is missing.
pub fn cluster(n: u64, options: Options) -> Cluster {
    tern_testkit::bin("ternd");
    tern_testkit::bin("ternctl");
    let t = Instant::now();
    let c = Cluster::start(n, options).unwrap_or_else(|e| panic!("starting a {n}-node cluster: {e:#}"));
    eprintln!("cluster of {n} formed in {:.1?}", t.elapsed());
    c
}

/// `TERN_FAILOVER_SCALE=N` (default 1): heavier runs multiply message
/// counts and load durations by N.
pub fn scale() -> usize {
    std::env::var("TERN_FAILOVER_SCALE")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|n| *n >= 1)
        .unwrap_or(1)
}

/// Paced load: `messages` over `secs` seconds from 4 sessions (both
/// multiplied by [`scale`]).
pub fn paced(prefix: &str, messages: usize, secs: f64) -> LoadConfig {
    let (messages, secs) = (messages * scale(), secs * scale() as f64);
    LoadConfig {
        messages,
        sessions: 4,
        rate: Some(messages as f64 / secs),
        deadline: Duration::from_secs_f64(secs + 30.0),
        prefix: prefix.into(),
        ..LoadConfig::default()
    }
}

/// Load that runs until [`Load::stop`] (or `max`): `rate` messages per
/// second from `sessions` sessions spread over the nodes, for scenarios
/// whose length is set by their steps, not by a count (so [`scale`], which
/// keeps the rate, does not change it).
pub fn continuous(prefix: &str, sessions: usize, rate: f64, max: Duration) -> LoadConfig {
    LoadConfig {
        messages: (rate * max.as_secs_f64()) as usize,
        sessions,
        rate: Some(rate),
        deadline: max,
        prefix: prefix.into(),
        ..LoadConfig::default()
    }
}

pub fn start_load(c: &Cluster, config: LoadConfig) -> Load {
    Load::start(config, c.targets())
}

/// Waits until the load has `n` acknowledged messages (bounded).
pub fn wait_acked(load: &Load, n: usize) {
    tern_testkit::wait_until(Duration::from_secs(60), &format!("{n} acknowledged"), || {
        load.acked() >= n
    })
    .unwrap();
}

/// Every acknowledged message delivered (bounded), none delivered as two
/// different copies, and duplicates within 1% of what was acknowledged;
/// prints and returns the verdict.
pub fn assert_no_loss(name: &str, c: &Cluster, report: &LoadReport) -> Verdict {
    let v = assert_nothing_lost(name, c, report);
    // Crashes, pauses and partitions repeat only what was in flight.
    assert!(
        v.duplicates_within(1.0),
        "{name}: {} duplicates, {:.2}% of {} acknowledged (budget 1%)",
        v.duplicates,
        v.duplicate_ratio() * 100.0,
        v.acked
    );
    v
}

/// As [`assert_no_loss`] without the duplicate budget, for scenarios that
/// crash far more often than any real node would (a fault every few dozen
/// messages), where duplicates are counted, not bounded.
pub fn assert_nothing_lost(name: &str, c: &Cluster, report: &LoadReport) -> Verdict {
    let v = check::wait_no_loss(report, &c.sink, Duration::from_secs(90));
    eprintln!("{name}: {v}");
    assert!(
        v.no_loss(),
        "{name}: {} acknowledged messages lost: {:?}",
        v.lost.len(),
        &v.lost[..v.lost.len().min(20)]
    );
    assert!(v.acked > 0, "{name}: nothing acknowledged");
    assert!(
        v.failed_multi_copy.is_empty() && v.acked_multi_copy.is_empty(),
        "{name}: delivered as two different copies: failed {:?}, acked {:?}",
        v.failed_multi_copy,
        v.acked_multi_copy
    );
    v
}

/// A planned operation (`hand_overs` leaderships moved) delivered every
/// acknowledged message exactly once.
pub fn assert_exactly_once(name: &str, v: &Verdict, hand_overs: usize) {
    eprintln!(
        "{name}: {} acknowledged, {hand_overs} hand-overs, {} duplicates (+{} copies)",
        v.acked, v.duplicates, v.extra_copies
    );
    assert!(hand_overs > 0, "{name}: no leadership was handed over");
    assert_eq!(
        (v.duplicates, v.extra_copies),
        (0, 0),
        "{name}: a planned operation delivered messages twice"
    );
}

/// Converged (bounded), with the time it took printed.
pub fn assert_converged(name: &str, c: &Cluster, deadline: Duration) {
    match c.wait_converged(deadline) {
        Ok(t) => eprintln!("{name}: converged in {t:.1?}"),
        Err(e) => panic!("{name}: {e:#}"),
    }
}

/// Waits (bounded) until the leader balancer has spread the shards: no node
/// leads more than its share. Balancing moves are hand-overs that wait for
/// deliveries in flight, so under load they take longer; scenarios that
/// need other nodes to keep accepting mail while one leader is faulty
/// start from a spread cluster.
pub fn wait_balanced(c: &Cluster) {
    let nodes = c.members().len().max(1);
    let share = (c.options.shards as usize).div_ceil(nodes);
    let mut last = std::collections::BTreeMap::<u64, usize>::new();
    tern_testkit::wait_until(Duration::from_secs(60), "shard leaders spread", || {
        c.leaders().is_ok_and(|l| {
            last.clear();
            for x in l.values() {
                *last.entry(*x).or_default() += 1;
            }
            !last.contains_key(&0) && last.values().all(|n| *n <= share)
        })
    })
    .unwrap_or_else(|e| panic!("{e}: shards led per node {last:?}, share {share}"));
}

/// The node leading the most shards.
pub fn busiest_leader(c: &Cluster) -> u64 {
    let leaders = c.leaders().unwrap();
    let mut counts = std::collections::BTreeMap::<u64, usize>::new();
    for l in leaders.values().filter(|l| **l != 0) {
        *counts.entry(*l).or_default() += 1;
    }
    counts.into_iter().max_by_key(|(_, n)| *n).map(|(id, _)| id).unwrap()
}

/// Waits until no shard in `shards` is led by `old` (or by nobody); how long.
pub fn wait_new_leaders(c: &Cluster, shards: &[u64], old: u64, deadline: Duration) -> Duration {
    tern_testkit::wait_until(deadline, &format!("new leaders for {shards:?} (was {old})"), || {
        c.leaders()
            .map(|l| shards.iter().all(|s| l.get(s).is_some_and(|x| *x != old && *x != 0)))
            .unwrap_or(false)
    })
    .unwrap()
}

/// A loopback SMTP server that answers every connection `421` and closes
/// it: deliveries routed to it defer (retried later), never bounce.
pub struct Stall {
    pub addr: std::net::SocketAddr,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Stall {
    pub fn start() -> Stall {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind(("127.0.0.1", tern_testkit::free_port())).unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (a, st) = (std::sync::Arc::clone(&accepted), std::sync::Arc::clone(&stop));
        // Ends when `stop` is set (on drop).
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        a.fetch_add(1, Ordering::SeqCst);
                        let _ = std::io::Write::write_all(&mut conn, b"421 4.3.2 stalled for the test\r\n");
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Stall {
            addr,
            accepted,
            stop,
            thread: Some(thread),
        }
    }

    /// Connections answered so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Stall {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs `ternctl ARGS` through node `via`; panics with its stderr on failure.
pub fn ternctl_ok(c: &Cluster, via: u64, args: &[&str]) {
    let out = c.node(via).unwrap().ternctl(args, Duration::from_secs(20)).unwrap();
    assert!(
        out.status.success(),
        "ternctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every member in turn stopped with SIGTERM (as systemd or a rolling
/// upgrade does: it hands its shards over first, and must exit by itself
/// within 60 s) and started again; after each, a probe is acknowledged and
/// delivered and the cluster converges before the next. Returns how many
/// shard leaderships the stopped nodes held (the hand-overs).
pub fn rolling_sigterm_restart(name: &str, c: &mut Cluster) -> usize {
    let mut led_total = 0;
    for id in c.members().to_vec() {
        let led = c.shards_led_by(id).unwrap();
        led_total += led.len();
        let t = Instant::now();
        let clean = c.terminate(id, Duration::from_secs(60)).unwrap();
        assert!(clean, "{name}: node {id} did not stop within 60 s of SIGTERM");
        let stopped = t.elapsed();
        c.restart(id).unwrap();
        let resume = probe_resume(&*c, t, &format!("{name}-{id}"), Duration::from_secs(60)).unwrap();
        let conv = c
            .wait_converged(Duration::from_secs(90))
            .unwrap_or_else(|e| panic!("{name}: after restarting node {id}: {e:#}"));
        eprintln!(
            "{name}: node {id} (led {led:?}) stopped in {stopped:.1?}, back; resume {resume:?}, converged {conv:.1?} later"
        );
    }
    led_total
}
