//! The checks: zero loss (every `250`'d Message-ID delivered at least
//! once), duplicates counted, delivery resuming within a deadline after a
//! fault, convergence after healing ([`crate::cluster::Cluster::wait_converged`]).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::load::{LoadReport, Outcome, Record};
use crate::sink::Sink;
use crate::target::Target;

/// Deliveries compared with what the load generator was told.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Verdict {
    pub sent: usize,
    pub acked: usize,
    pub rejected: usize,
    pub broken: usize,
    /// Acknowledged messages delivered at least once.
    pub delivered: usize,
    /// Acknowledged messages never delivered: must be empty.
    pub lost: Vec<String>,
    /// Messages (acknowledged or not) delivered more than once.
    pub duplicates: usize,
    /// Deliveries beyond the first, over all messages.
    pub extra_copies: usize,
    /// Messages without a 250 (4xx or broken) that were delivered anyway
    /// (allowed: the client could not know).
    pub unacked_delivered: usize,
    /// Messages the client saw fail (4xx/5xx or broken) that were delivered
    /// as two or more different queued copies (distinct queue ids in Tern's
    /// Received header): must be empty. The load generator sends each
    /// Message-ID in one transaction only and never retries it, so a second
    /// copy can only come from Tern queueing one transaction twice.
    pub failed_multi_copy: Vec<String>,
    /// The same for acknowledged messages (one `250` is one queued copy).
    pub acked_multi_copy: Vec<String>,
}

impl Verdict {
    pub fn no_loss(&self) -> bool {
        self.lost.is_empty()
    }

    /// No loss and no message delivered as two different copies.
    pub fn ok(&self) -> bool {
        self.no_loss() && self.failed_multi_copy.is_empty() && self.acked_multi_copy.is_empty()
    }

    /// Duplicated messages per acknowledged message (0 when none acked).
    pub fn duplicate_ratio(&self) -> f64 {
        if self.acked == 0 {
            return 0.0;
        }
        self.duplicates as f64 / self.acked as f64
    }

    /// Duplicates stay within `percent` % of acknowledged messages (crash,
    /// pause and partition faults: only deliveries in flight at the fault
    /// may be repeated).
    pub fn duplicates_within(&self, percent: f64) -> bool {
        self.duplicate_ratio() * 100.0 <= percent
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sent {} acked {} (rejected {}, broken {}) delivered {} lost {} duplicates {} (+{} copies), unacked delivered {}, two different copies of {} failed + {} acked",
            self.sent,
            self.acked,
            self.rejected,
            self.broken,
            self.delivered,
            self.lost.len(),
            self.duplicates,
            self.extra_copies,
            self.unacked_delivered,
            self.failed_multi_copy.len(),
            self.acked_multi_copy.len()
        )
    }
}

/// The verdict now.
pub fn verdict(report: &LoadReport, sink: &Sink) -> Verdict {
    let counts = sink.counts();
    let copies = sink.copies();
    let mut v = Verdict {
        sent: report.records.len(),
        rejected: report.rejected(),
        broken: report.broken(),
        ..Verdict::default()
    };
    let ours: BTreeSet<&str> = report.records.iter().map(|r| r.message_id.as_str()).collect();
    for r in &report.records {
        let n = counts.get(&r.message_id).copied().unwrap_or(0);
        if copies.get(&r.message_id).is_some_and(|c| c.len() > 1) {
            if r.acked() {
                v.acked_multi_copy.push(r.message_id.clone());
            } else {
                v.failed_multi_copy.push(r.message_id.clone());
            }
        }
        match r.outcome {
            Outcome::Acked(_) => {
                v.acked += 1;
                if n > 0 {
                    v.delivered += 1;
                } else {
                    v.lost.push(r.message_id.clone());
                }
            }
            _ if n > 0 => v.unacked_delivered += 1,
            _ => {}
        }
    }
    for (id, n) in &counts {
        if *n > 1 && ours.contains(id.as_str()) {
            v.duplicates += 1;
            v.extra_copies += n - 1;
        }
    }
    v
}

/// Waits (bounded) until every acknowledged message is delivered; the final
/// verdict either way (check [`Verdict::no_loss`]).
pub fn wait_no_loss(report: &LoadReport, sink: &Sink, deadline: Duration) -> Verdict {
    let end = Instant::now() + deadline;
    loop {
        let v = verdict(report, sink);
        if v.no_loss() || Instant::now() > end {
            // Late copies still in flight: let a retry tick pass before counting duplicates.
            std::thread::sleep(Duration::from_millis(500));
            return verdict(report, sink);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// How long after a fault mail flowed again.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Resume {
    /// Until a probe message got `250` from a healthy node.
    #[serde(with = "secs")]
    pub acked: Duration,
    /// Until that message was delivered.
    #[serde(with = "secs")]
    pub delivered: Duration,
}

mod secs {
    pub fn serialize<S: serde::Serializer>(d: &std::time::Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

/// Sends probe messages (`<tag>-N@probe.tern.test`) to healthy nodes in turn
/// until one gets `250`, then waits for its delivery; times are measured
/// from `fault_at`. Fails after `deadline`.
pub fn probe_resume(
    cluster: &(impl Target + ?Sized),
    fault_at: Instant,
    tag: &str,
    deadline: Duration,
) -> anyhow::Result<Resume> {
    let end = Instant::now() + deadline;
    let mut turn = 0;
    let (id, acked) = loop {
        anyhow::ensure!(
            Instant::now() < end,
            "no probe message acknowledged within {deadline:?}"
        );
        turn += 1;
        let Some((_, addr)) = cluster.healthy_smtp(turn) else {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        let id = format!("{tag}-{turn}@probe.tern.test");
        if let Outcome::Acked(_) = crate::load::send_one(addr, &id, Duration::from_secs(10)) {
            break (id, fault_at.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    loop {
        if !cluster.sink().deliveries_of(&id).is_empty() {
            return Ok(Resume {
                acked,
                delivered: fault_at.elapsed(),
            });
        }
        anyhow::ensure!(
            Instant::now() < end,
            "probe {id} acknowledged but not delivered within {deadline:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Acceptance throughput over one interval of a run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Phase {
    /// `before faults`, `during kill n2`, `after kill n2`, ...
    pub name: String,
    /// Seconds since the start of the run.
    pub from_secs: f64,
    pub to_secs: f64,
    /// Messages whose `250` arrived in the interval.
    pub acked: usize,
    /// `acked` per second of the interval.
    pub acked_per_sec: f64,
    /// Messages whose second delivery (the duplicate) happened in the
    /// interval: duplicates per fault (see [`count_duplicates`]).
    pub duplicates: usize,
}

/// Messages acknowledged per second in each `(name, from, to)` interval
/// (by the time the `250` arrived); intervals of zero length are skipped.
pub fn phases(records: &[Record], start: Instant, intervals: &[(String, Instant, Instant)]) -> Vec<Phase> {
    intervals
        .iter()
        .filter(|(_, from, to)| to > from)
        .map(|(name, from, to)| {
            let acked = records
                .iter()
                .filter(|r| r.acked() && r.finished >= *from && r.finished < *to)
                .count();
            let secs = (*to - *from).as_secs_f64();
            Phase {
                name: name.clone(),
                from_secs: from.saturating_duration_since(start).as_secs_f64(),
                to_secs: to.saturating_duration_since(start).as_secs_f64(),
                acked,
                acked_per_sec: acked as f64 / secs,
                duplicates: 0,
            }
        })
        .collect()
}

/// Fills each phase's `duplicates`: every message of `report` delivered more
/// than once counts in the phase its second delivery fell in (the fault
/// that caused it, or the recovery after it); one delivered after the last
/// phase counts in the last. Returns how many fell in no phase.
pub fn count_duplicates(phases: &mut [Phase], report: &LoadReport, sink: &Sink, start: Instant) -> usize {
    let start_at = std::time::SystemTime::now() - start.elapsed();
    let ours: BTreeSet<&str> = report.records.iter().map(|r| r.message_id.as_str()).collect();
    let mut by_message: std::collections::BTreeMap<String, Vec<std::time::SystemTime>> = Default::default();
    for d in sink.deliveries() {
        if ours.contains(d.message_id.as_str()) {
            by_message.entry(d.message_id).or_default().push(d.at);
        }
    }
    let mut outside = 0;
    for times in by_message.values_mut().filter(|t| t.len() > 1) {
        times.sort();
        let at = times[1].duration_since(start_at).unwrap_or_default().as_secs_f64();
        let last = phases.len().saturating_sub(1);
        match phases
            .iter()
            .position(|p| at >= p.from_secs && at < p.to_secs)
            .or((!phases.is_empty() && phases.get(last).is_some_and(|p| at >= p.to_secs)).then_some(last))
        {
            Some(i) => phases[i].duplicates += 1,
            None => outside += 1,
        }
    }
    outside
}
