//! The suppression list's writers. Entries live in the control group
//! (`x/<scope>\0<address>`, see `cluster::control`), so every node checks
//! the same list before it attempts a recipient
//! (`Delivery::attempt`), and they survive restarts.
//!
//! - [`suppress`] / [`unsuppress`]: write entries now, in batches of
//!   [`MAX_SUPPRESSIONS_PER_WRITE`] (admin API, imports, feedback loops).
//! - [`AutoSuppress`]: the automatic additions after hard bounces. The
//!   shard actors offer entries without waiting; one task coalesces them
//!   into few Raft writes (not one per bounce). Its queue is bounded: when
//!   it is full an entry is dropped and counted
//!   (`tern_suppression_writes_total{result="dropped"}`); the next bounce of the
//!   same recipient offers it again. The same task, on the node that
//!   leads the control group, removes expired entries every hour (readers
//!   ignore them meanwhile).

use std::collections::BTreeMap;
use std::time::Duration;

use tern_model::peer::Operation;
use tern_model::shaping::{Suppression, SuppressionKey, MAX_SUPPRESSIONS_PER_WRITE};
use tokio::sync::mpsc;

use super::Class;
use crate::cluster::control::ControlState;
use crate::cluster::error::ClusterError;
use crate::cluster::writer::ControlWriter;
use crate::config::{SuppressionConfig, SuppressionScope};
use crate::metrics::DeliveryMetrics;

/// Entries waiting for the coalescing task, at most.
const QUEUE: usize = 10_000;
/// How long the task waits for more entries before writing a batch.
const LINGER: Duration = Duration::from_millis(200);
/// How often the control leader removes expired entries.
const PURGE_EVERY: Duration = Duration::from_secs(3600);

/// Normalises an entry as the list keys it: address and scope lowercase,
/// surrounding angle brackets and spaces removed.
pub fn normalise(mut entry: Suppression) -> Suppression {
    entry.address = normalise_address(&entry.address);
    entry.scope = entry.scope.trim().to_ascii_lowercase();
    entry
}

/// `<Bob@Example.ORG>` -> `bob@example.org`.
pub fn normalise_address(address: &str) -> String {
    address
        .trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .to_lowercase()
}

/// Adds (or replaces) `entries` in the suppression list; returns how many
/// were written. Written in batches of at most
/// [`MAX_SUPPRESSIONS_PER_WRITE`]; an error leaves the batches before it
/// written.
pub async fn suppress(writer: &ControlWriter, entries: Vec<Suppression>) -> Result<usize, ClusterError> {
    let entries: Vec<Suppression> = entries.into_iter().map(normalise).collect();
    let mut written = 0;
    for batch in entries.chunks(MAX_SUPPRESSIONS_PER_WRITE) {
        writer
            .write(Operation::Suppress {
                entries: batch.to_vec(),
            })
            .await?;
        written += batch.len();
    }
    Ok(written)
}

/// Removes `keys` from the suppression list (absent ones are no error).
pub async fn unsuppress(writer: &ControlWriter, keys: Vec<SuppressionKey>) -> Result<usize, ClusterError> {
    let keys: Vec<SuppressionKey> = keys
        .into_iter()
        .map(|k| SuppressionKey {
            scope: k.scope.trim().to_ascii_lowercase(),
            address: normalise_address(&k.address),
        })
        .collect();
    let mut removed = 0;
    for batch in keys.chunks(MAX_SUPPRESSIONS_PER_WRITE) {
        writer
            .write(Operation::Unsuppress {
                entries: batch.to_vec(),
            })
            .await?;
        removed += batch.len();
    }
    Ok(removed)
}

/// The reply a suppressed recipient fails with (no connection is made).
pub fn reply(entry: &Suppression) -> String {
    let since = chrono::DateTime::from_timestamp(entry.added, 0)
        .map(|t| t.format("%Y-%m-%d").to_string())
        .unwrap_or_else(|| entry.added.to_string());
    let list = if entry.scope.is_empty() {
        String::new()
    } else {
        format!(" for {}", entry.scope)
    };
    let reason: String = entry.reason.chars().filter(|c| !c.is_control()).take(200).collect();
    format!(
        "550 5.7.1 recipient suppressed{list} ({} since {since}): {reason}",
        entry.class
    )
}

/// The automatic additions: a bounded queue and the task that writes it.
#[derive(Clone)]
pub struct AutoSuppress {
    config: SuppressionConfig,
    tx: mpsc::Sender<Suppression>,
    metrics: DeliveryMetrics,
}

impl AutoSuppress {
    /// Starts the writing task (on the current runtime); it ends when the
    /// last handle is dropped.
    /// `control` (this node's replica) is read to purge expired entries.
    pub fn start(
        config: SuppressionConfig,
        writer: ControlWriter,
        control: Option<ControlState>,
        metrics: DeliveryMetrics,
    ) -> AutoSuppress {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(rx, writer, control, metrics.clone()));
        AutoSuppress { config, tx, metrics }
    }

    /// The entry a permanent failure of class `class` adds, if
    /// `[suppression]` asks for one: `None` when disabled or for another class.
    pub fn entry_for(
        config: &SuppressionConfig,
        reverse_path: &str,
        recipient: &str,
        class: Class,
        reply: &str,
        now: i64,
    ) -> Option<Suppression> {
        if !config.enabled || !config.classes.contains(&class) {
            return None;
        }
        let scope = match config.scope {
            SuppressionScope::Global => String::new(),
            // A null reverse-path (a bounce) has no tenant: no entry.
            SuppressionScope::Sender => match crate::envelope::Envelope::domain_of(reverse_path) {
                d if d.is_empty() => return None,
                d => d,
            },
        };
        let reason: String = reply.chars().filter(|c| !c.is_control()).take(300).collect();
        Some(normalise(Suppression {
            scope,
            address: recipient.to_owned(),
            class: class.as_str().to_owned(),
            reason,
            added: now,
            expires: config
                .expire_after
                .map_or(0, |d| now.saturating_add(d.as_secs() as i64)),
        }))
    }

    pub fn config(&self) -> &SuppressionConfig {
        &self.config
    }

    /// Queues `entry` without waiting; dropped (and counted) when the queue is full.
    pub fn offer(&self, entry: Suppression) {
        if self.tx.try_send(entry).is_err() {
            self.metrics.suppression("dropped", 1);
            tracing::debug!("suppression queue full; automatic entry dropped");
        }
    }
}

/// Collects entries for up to [`LINGER`] after the first, keeps the last
/// of each recipient, and writes them in one operation; every
/// [`PURGE_EVERY`], on the control leader, removes expired entries.
async fn run(
    mut rx: mpsc::Receiver<Suppression>,
    writer: ControlWriter,
    control: Option<ControlState>,
    metrics: DeliveryMetrics,
) {
    let mut purge = tokio::time::interval_at(tokio::time::Instant::now() + PURGE_EVERY, PURGE_EVERY);
    purge.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let first = tokio::select! {
            first = rx.recv() => first,
            _ = purge.tick() => {
                if let Some(control) = control.as_ref().filter(|_| writer.leads_control()) {
                    purge_expired(&writer, control).await;
                }
                continue;
            }
        };
        let Some(first) = first else { break };
        let mut batch: BTreeMap<(String, String), Suppression> = BTreeMap::new();
        batch.insert((first.scope.clone(), first.address.clone()), first);
        let deadline = tokio::time::Instant::now() + LINGER;
        while batch.len() < MAX_SUPPRESSIONS_PER_WRITE {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(e)) => {
                    batch.insert((e.scope.clone(), e.address.clone()), e);
                }
                Ok(None) | Err(_) => break,
            }
        }
        let entries: Vec<Suppression> = batch.into_values().collect();
        let n = entries.len() as u64;
        match suppress(&writer, entries).await {
            Ok(_) => metrics.suppression("added", n),
            Err(e) => {
                metrics.suppression("write_failed", n);
                tracing::warn!(error = %e, entries = n, "automatic suppressions not written");
            }
        }
    }
}

/// The keys of entries expired at `now`, reading the list a page at a time.
pub fn expired(control: &ControlState, now: i64) -> Vec<SuppressionKey> {
    let mut out = Vec::new();
    let mut after: Option<SuppressionKey> = None;
    loop {
        let page = control.suppressions(after.as_ref(), MAX_SUPPRESSIONS_PER_WRITE);
        let Some(last) = page.last() else { break };
        after = Some(SuppressionKey {
            scope: last.scope.clone(),
            address: last.address.clone(),
        });
        let full = page.len() == MAX_SUPPRESSIONS_PER_WRITE;
        out.extend(page.into_iter().filter(|e| !e.in_force(now)).map(|e| SuppressionKey {
            scope: e.scope,
            address: e.address,
        }));
        if !full {
            break;
        }
    }
    out
}

async fn purge_expired(writer: &ControlWriter, control: &ControlState) {
    let keys = expired(control, chrono::Utc::now().timestamp());
    if keys.is_empty() {
        return;
    }
    let n = keys.len();
    match unsuppress(writer, keys).await {
        Ok(_) => tracing::info!(entries = n, "expired suppressions removed"),
        Err(e) => tracing::warn!(error = %e, entries = n, "expired suppressions not removed"),
    }
}

/// Entries read per page while counting.
const COUNT_PAGE: usize = 10_000;

/// Entries of the suppression list in force at `now`, by class, in this
/// node's replica of the control group (a walk over the whole list).
pub fn count_by_class(control: &ControlState, now: i64) -> std::collections::BTreeMap<String, i64> {
    let mut counts = std::collections::BTreeMap::new();
    let mut after: Option<SuppressionKey> = None;
    loop {
        let page = control.suppressions(after.as_ref(), COUNT_PAGE);
        for s in page.iter().filter(|s| s.in_force(now)) {
            *counts.entry(s.class.clone()).or_default() += 1;
        }
        match page.last() {
            Some(last) if page.len() == COUNT_PAGE => {
                after = Some(SuppressionKey {
                    scope: last.scope.clone(),
                    address: last.address.clone(),
                })
            }
            _ => break,
        }
    }
    counts
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn automatic_entries_follow_the_config() {
        let mut config = SuppressionConfig::default();
        let now = 1_800_000_000;
        let e = AutoSuppress::entry_for(
            &config,
            "news@Shop.test",
            "<Bob@Example.ORG>",
            Class::InvalidRecipient,
            "550 5.1.1 no\r\n",
            now,
        )
        .unwrap();
        assert_eq!(
            (e.scope.as_str(), e.address.as_str(), e.class.as_str()),
            ("", "bob@example.org", "invalid_recipient")
        );
        assert_eq!((e.added, e.expires, e.reason.as_str()), (now, 0, "550 5.1.1 no"));
        assert!(AutoSuppress::entry_for(&config, "a@b", "c@d", Class::MailboxFull, "552", now).is_none());
        config.scope = SuppressionScope::Sender;
        config.expire_after = Some(Duration::from_secs(60));
        let e = AutoSuppress::entry_for(&config, "news@Shop.test", "c@d", Class::Inactive, "550", now).unwrap();
        assert_eq!((e.scope.as_str(), e.expires), ("shop.test", now + 60));
        assert!(AutoSuppress::entry_for(&config, "", "c@d", Class::Inactive, "550", now).is_none());
        config.enabled = false;
        assert!(AutoSuppress::entry_for(&config, "a@b", "c@d", Class::Inactive, "550", now).is_none());
    }

    #[test]
    fn expired_entries_are_found_across_pages() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let tree = db.open_tree("control").unwrap();
        let now = 1_800_000_000;
        let n = MAX_SUPPRESSIONS_PER_WRITE + 3;
        for i in 0..n {
            let e = Suppression {
                scope: if i % 2 == 0 { String::new() } else { "shop.test".into() },
                address: format!("u{i:05}@x.test"),
                class: "manual".into(),
                reason: String::new(),
                added: 1,
                // Every third one has lapsed; the rest never lapse or later.
                expires: match i % 3 {
                    0 => now - 1,
                    1 => 0,
                    _ => now + 60,
                },
            };
            tree.insert(
                crate::cluster::control::suppression_key(&e.scope, &e.address),
                bincode::serialize(&e).unwrap(),
            )
            .unwrap();
        }
        let control = ControlState::new(tree);
        let keys = expired(&control, now);
        assert_eq!(keys.len(), n.div_ceil(3));
        assert!(keys.iter().all(|k| k.address[1..6].parse::<usize>().unwrap() % 3 == 0));
    }

    #[test]
    fn the_reply_says_why_and_since_when() {
        let e = Suppression {
            scope: String::new(),
            address: "bob@example.org".into(),
            class: "invalid_recipient".into(),
            reason: "550 5.1.1 unknown".into(),
            added: 1_796_601_600,
            expires: 0,
        };
        assert_eq!(
            reply(&e),
            "550 5.7.1 recipient suppressed (invalid_recipient since 2026-12-07): 550 5.1.1 unknown"
        );
        let scoped = Suppression {
            scope: "shop.test".into(),
            ..e
        };
        assert!(reply(&scoped).starts_with("550 5.7.1 recipient suppressed for shop.test ("));
    }
}
