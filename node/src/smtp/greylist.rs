//! Greylisting (as postgrey does it): the first attempt of a new triplet
//! (client network, sender, recipient) gets `451 4.7.1`; a retry after
//! `delay` and within `retry_window` passes, and the triplet then stays
//! welcome for `pass_ttl` after its last message.
//!
//! State is shared in the cluster, so a retry that lands on another node
//! is recognised: triplets are control-group records in space
//! [`SPACE`], keyed by a hash (32 hex digits of SHA-256 over the client's
//! `/24` or `/64` network, the sender and the recipient, so keys are
//! bounded whatever the addresses), read from this node's replica
//! (`ControlState::shared`). Value: JSON [`Record`]; new fields must be
//! `#[serde(default)]` so older nodes keep reading it.
//!
//! Writes are batched: one task per node collects them for up to
//! [`LINGER`] and writes one `PutShared`; its queue is bounded and a write
//! that does not fit is dropped and counted
//! (`tern_greylist_total{outcome="dropped"}`), so that triplet is simply
//! greylisted again on its next try. Until a write is applied locally this
//! node remembers it for [`OVERLAY_TTL`]. The node leading the control
//! group removes expired records every [`PURGE_EVERY`].
//!
//! Without the control group (not open yet) greylisting fails open.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tern_model::peer::Operation;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::cluster::control::ControlState;
use crate::cluster::writer::ControlWriter;
use crate::config::GreylistConfig;
use crate::metrics::ScreenMetrics;

/// The control group's record space for triplets.
pub const SPACE: &str = "greylist";
/// Writes waiting for the batching task, at most.
const QUEUE: usize = 10_000;
/// How long the task waits for more writes before one Raft write.
const LINGER: Duration = Duration::from_millis(200);
/// Records per write (the control group takes at most 5,000).
const BATCH: usize = 2_000;
/// How long this node trusts its own recent writes over its replica.
const OVERLAY_TTL: Duration = Duration::from_secs(60);
const OVERLAY_MAX: usize = 10_000;
/// How often the control leader removes expired triplets.
const PURGE_EVERY: Duration = Duration::from_secs(600);
/// A passed triplet's last-seen time is rewritten at most this often.
const REFRESH_EVERY_MS: i64 = 86_400_000;

/// One triplet's state, times in unix milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// First attempt of the current greylisting round.
    pub first: i64,
    /// When a retry passed; 0: not yet.
    #[serde(default)]
    pub passed: i64,
    /// Last message accepted after passing.
    #[serde(default)]
    pub last: i64,
}

impl Record {
    fn newest(&self) -> i64 {
        self.first.max(self.passed).max(self.last)
    }

    /// Whether the purge may remove it at `now`.
    pub fn expired(&self, config: &GreylistConfig, now: i64) -> bool {
        if self.passed > 0 {
            now - self.last.max(self.passed) > ms(config.pass_ttl)
        } else {
            now - self.first > ms(config.retry_window)
        }
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// What greylisting decided about one recipient.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// First attempt (or one past `retry_window`): refused, recorded.
    New,
    /// A retry before `delay` is over: refused; this many seconds remain.
    Early(u64),
    /// A retry after `delay`: accepted from now on.
    Passed,
    /// A triplet that passed before.
    Known,
    /// The control group is not readable here: accepted (fail open).
    Unavailable,
    /// New, but the client network had `max_new_per_hour` new triplets
    /// already: refused and not recorded.
    Limited,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::New => "new",
            Outcome::Early(_) => "early",
            Outcome::Passed => "passed",
            Outcome::Known => "known",
            Outcome::Unavailable => "unavailable",
            Outcome::Limited => "limited",
        }
    }

    /// Whether the recipient is accepted.
    pub fn accepts(self) -> bool {
        matches!(self, Outcome::Passed | Outcome::Known | Outcome::Unavailable)
    }
}

/// The client's network: its address cut to the configured prefix.
fn network(config: &GreylistConfig, client: IpAddr) -> IpAddr {
    let client = client.to_canonical();
    let prefix = if client.is_ipv4() {
        config.ipv4_prefix
    } else {
        config.ipv6_prefix
    };
    IpNet::new(client, prefix).map_or(client, |n| n.network())
}

/// The key of a triplet (see the module docs).
pub fn triplet_key(config: &GreylistConfig, client: IpAddr, sender: &str, recipient: &str) -> String {
    let network = network(config, client);
    let mut input = Vec::with_capacity(64 + sender.len() + recipient.len());
    input.extend_from_slice(network.to_string().as_bytes());
    input.push(0);
    input.extend_from_slice(sender.to_lowercase().as_bytes());
    input.push(0);
    input.extend_from_slice(recipient.to_lowercase().as_bytes());
    let digest = ring::digest::digest(&ring::digest::SHA256, &input);
    digest.as_ref()[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// The greylist of a node.
pub struct Greylist {
    config: GreylistConfig,
    control: Option<ControlState>,
    tx: mpsc::Sender<(String, Record)>,
    /// This node's writes not yet certainly applied to its replica.
    overlay: Mutex<HashMap<String, (Instant, Record)>>,
    /// New triplets per client network in the current hour, on this node.
    new_per_network: Mutex<HashMap<IpAddr, (Instant, u32)>>,
    metrics: ScreenMetrics,
}

impl std::fmt::Debug for Greylist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Greylist")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Greylist {
    /// Starts the writing (and purging) task on the current runtime; it
    /// ends when the greylist is dropped.
    pub fn start(
        config: GreylistConfig,
        control: Option<ControlState>,
        writer: Option<ControlWriter>,
        metrics: ScreenMetrics,
    ) -> Arc<Greylist> {
        let (tx, rx) = mpsc::channel(QUEUE);
        if let Some(writer) = writer {
            tokio::spawn(run(rx, writer, control.clone(), config.clone()));
        }
        Arc::new(Greylist {
            config,
            control,
            tx,
            overlay: Mutex::new(HashMap::new()),
            new_per_network: Mutex::new(HashMap::new()),
            metrics,
        })
    }

    /// `[greylist] delay`.
    /// `[greylist]` as this greylist was started with.
    pub fn config(&self) -> &GreylistConfig {
        &self.config
    }

    pub fn delay(&self) -> Duration {
        self.config.delay
    }

    /// Whether `ip` is never greylisted (`[greylist] exempt`).
    pub fn exempt(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.config.exempt.iter().any(|n| n.contains(&ip))
    }

    /// Decides about one recipient at `now` (unix ms) and records it.
    pub fn check(&self, client: IpAddr, sender: &str, recipient: &str, now: i64) -> Outcome {
        let Some(control) = &self.control else {
            return self.counted(Outcome::Unavailable);
        };
        let key = triplet_key(&self.config, client, sender, recipient);
        let shared = control
            .shared(SPACE, &key)
            .and_then(|v| serde_json::from_slice::<Record>(&v).ok());
        let local = {
            let overlay = self.overlay.lock().unwrap_or_else(|p| p.into_inner());
            overlay
                .get(&key)
                .filter(|(at, _)| at.elapsed() < OVERLAY_TTL)
                .map(|(_, r)| *r)
        };
        let record = match (shared, local) {
            (Some(s), Some(l)) => Some(if l.newest() > s.newest() { l } else { s }),
            (s, l) => s.or(l),
        };
        let (mut outcome, mut write) = decide(&self.config, record, now);
        if outcome == Outcome::New && !self.may_record_new(client) {
            (outcome, write) = (Outcome::Limited, None);
        }
        if let Some(write) = write {
            self.put(key, write);
        }
        debug!(client = %client, sender, recipient, outcome = outcome.label(), "greylist");
        self.counted(outcome)
    }

    /// Counts a new triplet of `client`'s network; false past `max_new_per_hour`.
    fn may_record_new(&self, client: IpAddr) -> bool {
        const HOUR: Duration = Duration::from_secs(3600);
        let network = network(&self.config, client);
        let mut counts = self.new_per_network.lock().unwrap_or_else(|p| p.into_inner());
        if counts.len() >= OVERLAY_MAX && !counts.contains_key(&network) {
            counts.retain(|_, (start, _)| start.elapsed() < HOUR);
            if counts.len() >= OVERLAY_MAX {
                // Too many networks at once: an attack; record nothing new.
                return false;
            }
        }
        let entry = counts.entry(network).or_insert((Instant::now(), 0));
        if entry.0.elapsed() >= HOUR {
            *entry = (Instant::now(), 0);
        }
        entry.1 = entry.1.saturating_add(1);
        entry.1 <= self.config.max_new_per_hour
    }

    fn counted(&self, outcome: Outcome) -> Outcome {
        self.metrics.greylist(outcome.label());
        outcome
    }

    fn put(&self, key: String, record: Record) {
        {
            let mut overlay = self.overlay.lock().unwrap_or_else(|p| p.into_inner());
            if overlay.len() >= OVERLAY_MAX {
                overlay.retain(|_, (at, _)| at.elapsed() < OVERLAY_TTL);
            }
            if overlay.len() < OVERLAY_MAX {
                overlay.insert(key.clone(), (Instant::now(), record));
            }
        }
        if self.tx.try_send((key, record)).is_err() {
            self.metrics.greylist("dropped");
            debug!("greylist write queue full; triplet not recorded");
        }
    }
}

/// The outcome for a triplet whose record is `record`, and the record to
/// write, if any.
pub fn decide(config: &GreylistConfig, record: Option<Record>, now: i64) -> (Outcome, Option<Record>) {
    let fresh = Record {
        first: now,
        ..Record::default()
    };
    let Some(r) = record else {
        return (Outcome::New, Some(fresh));
    };
    if r.passed > 0 && now - r.last.max(r.passed) <= ms(config.pass_ttl) {
        let refresh = (now - r.last > REFRESH_EVERY_MS).then_some(Record { last: now, ..r });
        return (Outcome::Known, refresh);
    }
    let waited = now - r.first;
    if r.passed > 0 || waited > ms(config.retry_window) {
        return (Outcome::New, Some(fresh));
    }
    if waited < ms(config.delay) {
        let remaining = (ms(config.delay) - waited).max(0) as u64;
        return (Outcome::Early(remaining.div_ceil(1000)), None);
    }
    (
        Outcome::Passed,
        Some(Record {
            first: r.first,
            passed: now,
            last: now,
        }),
    )
}

/// Batches writes into `PutShared`s; on the control leader, purges.
async fn run(
    mut rx: mpsc::Receiver<(String, Record)>,
    writer: ControlWriter,
    control: Option<ControlState>,
    config: GreylistConfig,
) {
    let mut purge = tokio::time::interval_at(tokio::time::Instant::now() + PURGE_EVERY, PURGE_EVERY);
    purge.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let first = tokio::select! {
            first = rx.recv() => first,
            _ = purge.tick() => {
                if let Some(control) = control.as_ref().filter(|_| writer.leads_control()) {
                    purge_expired(&writer, control, &config).await;
                }
                continue;
            }
        };
        let Some((key, record)) = first else { break };
        let mut batch = BTreeMap::new();
        batch.insert(key, record);
        let deadline = tokio::time::Instant::now() + LINGER;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some((key, record))) => {
                    batch.insert(key, record);
                }
                Ok(None) | Err(_) => break,
            }
        }
        let n = batch.len();
        let entries = batch
            .into_iter()
            .filter_map(|(k, r)| Some((k, serde_json::to_vec(&r).ok()?)))
            .collect();
        let op = Operation::PutShared {
            space: SPACE.to_owned(),
            entries,
        };
        if let Err(e) = writer.write(op).await {
            warn!(error = %e, triplets = n, "greylist triplets not written");
        }
    }
}

/// Keys of expired records, read a two-hex-digit prefix at a time.
pub fn expired(control: &ControlState, config: &GreylistConfig, now: i64) -> Vec<String> {
    let mut out = Vec::new();
    for p in 0..=255u8 {
        let prefix = format!("{p:02x}");
        for (key, value) in control.shared_scan(SPACE, &prefix, 50_000) {
            match serde_json::from_slice::<Record>(&value) {
                Ok(r) if !r.expired(config, now) => {}
                // Expired, or unreadable: either way of no use.
                _ => out.push(key),
            }
        }
    }
    out
}

async fn purge_expired(writer: &ControlWriter, control: &ControlState, config: &GreylistConfig) {
    let now = chrono::Utc::now().timestamp_millis();
    let (control, config) = (control.clone(), config.clone());
    let Ok(keys) = tokio::task::spawn_blocking(move || expired(&control, &config, now)).await else {
        return;
    };
    let n = keys.len();
    for chunk in keys.chunks(BATCH) {
        let op = Operation::DeleteShared {
            space: SPACE.to_owned(),
            keys: chunk.to_vec(),
            prefixes: Vec::new(),
        };
        if let Err(e) = writer.write(op).await {
            warn!(error = %e, triplets = n, "expired greylist triplets not removed");
            return;
        }
    }
    if n > 0 {
        info!(triplets = n, "expired greylist triplets removed");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn config() -> GreylistConfig {
        GreylistConfig {
            enabled: true,
            delay: Duration::from_secs(300),
            ..GreylistConfig::default()
        }
    }

    #[test]
    fn a_triplet_passes_after_the_delay_within_the_window() {
        let c = config();
        let t0 = 1_000_000_000;
        let (o, w) = decide(&c, None, t0);
        assert_eq!(o, Outcome::New);
        let r = w.unwrap();
        assert_eq!(decide(&c, Some(r), t0 + 60_000), (Outcome::Early(240), None));
        let (o, w) = decide(&c, Some(r), t0 + 301_000);
        assert_eq!(o, Outcome::Passed);
        let passed = w.unwrap();
        assert_eq!(decide(&c, Some(passed), t0 + 3_600_000).0, Outcome::Known);
        // Past the retry window a retry starts over.
        assert_eq!(decide(&c, Some(r), t0 + 5 * 3_600_000).0, Outcome::New);
        // Past pass_ttl a passed triplet starts over too.
        let late = t0 + 301_000 + ms(c.pass_ttl) + 1;
        assert_eq!(decide(&c, Some(passed), late).0, Outcome::New);
        assert!(passed.expired(&c, late));
        assert!(!passed.expired(&c, t0 + 400_000));
    }

    #[test]
    fn the_purge_finds_expired_and_unreadable_records_only() {
        let c = config();
        let db = sled::Config::new().temporary(true).open().unwrap();
        let tree = db.open_tree("control").unwrap();
        let now = 100 * 86_400_000;
        let records = [
            (
                "00aa",
                Record {
                    first: now - 1000,
                    ..Record::default()
                },
            ),
            (
                "7fbb",
                Record {
                    first: now - ms(c.retry_window) - 1,
                    ..Record::default()
                },
            ),
            (
                "ffcc",
                Record {
                    first: 1,
                    passed: 2,
                    last: now - 1000,
                },
            ),
            (
                "ffdd",
                Record {
                    first: 1,
                    passed: 2,
                    last: 3,
                },
            ),
        ];
        for (key, r) in records {
            let key = crate::cluster::control::shared_key(SPACE, key);
            tree.insert(key, serde_json::to_vec(&r).unwrap()).unwrap();
        }
        tree.insert(crate::cluster::control::shared_key(SPACE, "80ee"), b"{".to_vec())
            .unwrap();
        // Another space is not touched.
        tree.insert(crate::cluster::control::shared_key("other", "7fbb"), b"{".to_vec())
            .unwrap();
        let control = ControlState::new(tree);
        let mut keys = expired(&control, &c, now);
        keys.sort();
        assert_eq!(keys, ["7fbb", "80ee", "ffdd"]);
    }

    #[tokio::test]
    async fn one_network_records_at_most_max_new_per_hour_triplets() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let control = ControlState::new(db.open_tree("control").unwrap());
        let c = GreylistConfig {
            max_new_per_hour: 2,
            ..config()
        };
        let g = Greylist::start(c, Some(control), None, ScreenMetrics::default());
        let now = 1_000_000_000;
        let outcomes: Vec<Outcome> = ["a", "b", "c"]
            .iter()
            .map(|r| g.check("192.0.2.1".parse().unwrap(), "s@x.test", r, now))
            .collect();
        assert_eq!(outcomes, [Outcome::New, Outcome::New, Outcome::Limited]);
        // The recorded ones are known (early) on retry; another network is not limited.
        assert_eq!(
            g.check("192.0.2.9".parse().unwrap(), "s@x.test", "a", now + 1000),
            Outcome::Early(299)
        );
        assert_eq!(
            g.check("198.51.100.1".parse().unwrap(), "s@x.test", "a", now),
            Outcome::New
        );
    }

    #[test]
    fn keys_cover_the_client_network_and_are_bounded() {
        let c = config();
        let a = triplet_key(&c, "192.0.2.1".parse().unwrap(), "A@x.test", "b@y.test");
        let b = triplet_key(&c, "192.0.2.200".parse().unwrap(), "a@x.test", "B@y.test");
        assert_eq!(a, b);
        assert_eq!(a.len(), 32);
        let other = triplet_key(&c, "192.0.3.1".parse().unwrap(), "a@x.test", "b@y.test");
        assert_ne!(a, other);
        let v6a = triplet_key(&c, "2001:db8::1".parse().unwrap(), "", &"x".repeat(10_000));
        let v6b = triplet_key(&c, "2001:db8::ffff".parse().unwrap(), "", &"x".repeat(10_000));
        assert_eq!(v6a, v6b);
    }
}
