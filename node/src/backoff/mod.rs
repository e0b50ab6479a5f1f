//! Automatic backoff: remote replies that match a `[[backoff]]` rule become
//! an automatic shaping action for the destination they came from,
//! recorded in the control group so that every node applies it, it
//! survives restarts, and it expires on its own.
//!
//! # Layout
//! - [`rules`]: which rule a one-line reply matches (first match wins).
//! - this file: [`Backoff`], which
//!   - [`Backoff::observe`]s the outcomes of a delivery attempt and writes
//!     an action through the [`ControlWriter`] in the background (never
//!     holding delivery up), at most one proposal per key per
//!     [`PROPOSE_GAP`] and none while an equal or stronger action with at
//!     least half its time to run is in force;
//!   - [`Backoff::held`]: the effect of an action in force on the
//!     recipients of a scope (suspend: held back until it expires, with
//!     jitter; bounce: failed with a 5xx reply naming it). `throttle` is
//!     applied by shaping (it lowers the scope's rate); here it is only
//!     recorded;
//!   - [`watch`]: once a second, the `tern_shaping_actions` gauge and the
//!     `expired`/`lifted` events of the actions this node recorded.
//!
//! Keys: the attempt's shaping scope (`domain:example.com`,
//! `mx:.google.com`), or `<source>|<scope>` for `scope = "source"` rules
//! when the attempt went out through a named egress source.

pub mod rules;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use tern_model::peer::Operation;
use tern_model::shaping::{ActionKind, AutoAction};

use crate::cluster::control::ControlState;
use crate::cluster::writer::ControlWriter;
use crate::config::{BackoffAction, BackoffRule, BackoffScope};
use crate::metrics::DeliveryMetrics;
use crate::raft::NodeId;

/// At most one proposal per key this often from one node (many messages
/// get the same 421 at once).
pub const PROPOSE_GAP: Duration = Duration::from_secs(2);

/// The longest reason kept with an action (the remote reply, cut).
const MAX_REASON: usize = 300;

/// The longest jitter added to a suspension's end for held recipients.
const MAX_JITTER_SECS: i64 = 60;

/// The backoff rules and what this node proposed lately.
pub struct Backoff {
    rules: Arc<[BackoffRule]>,
    node: NodeId,
    /// Key -> when this node last proposed an action for it (kept across
    /// a reload of the rules: shared by [`Backoff::with_rules`]).
    proposed: Arc<Mutex<HashMap<String, Instant>>>,
    metrics: DeliveryMetrics,
}

/// What an action in force does to the recipients of its scope.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Held {
    /// Not attempted until this time (unix seconds); the reply says why.
    Until { not_before: i64, reply: String },
    /// Failed with this reply.
    Bounced { reply: String },
}

impl Backoff {
    pub fn new(rules: &[BackoffRule], node: NodeId, metrics: DeliveryMetrics) -> Backoff {
        Backoff {
            rules: rules.into(),
            node,
            proposed: Arc::default(),
            metrics,
        }
    }

    /// The same node and proposal history under new `rules` (a config
    /// reload); actions in force live in the control group and stay.
    pub fn with_rules(&self, rules: &[BackoffRule]) -> Backoff {
        Backoff {
            rules: rules.into(),
            node: self.node,
            proposed: Arc::clone(&self.proposed),
            metrics: self.metrics.clone(),
        }
    }

    /// The key of an action for mail to `scope` (through `source`, when the
    /// attempt used a named egress source) under `rule`.
    pub fn key(rule_scope: BackoffScope, scope: &str, source: Option<&str>) -> String {
        match (rule_scope, source) {
            (BackoffScope::Source, Some(source)) => format!("{source}|{scope}"),
            _ => scope.to_owned(),
        }
    }

    /// The effect of the action in force for `scope` (and for `source` ×
    /// `scope`), if it holds recipients back or bounces them. Cheap: one or
    /// two reads of the local control-group replica.
    pub fn held(&self, control: Option<&ControlState>, scope: &str, source: Option<&str>, now: i64) -> Option<Held> {
        let control = control?;
        let by_source = source.map(|s| format!("{s}|{scope}"));
        let (key, action) = std::iter::once(scope)
            .chain(by_source.as_deref())
            .filter_map(|k| control.action(k).map(|a| (k, a)))
            .filter(|(_, a)| a.in_force(now))
            .max_by_key(|(_, a)| strength(&a.kind))?;
        let until = rfc3339(action.until);
        match action.kind {
            ActionKind::Suspend => {
                let span = ((action.until - action.since) / 10).clamp(1, MAX_JITTER_SECS);
                let jitter = rand::thread_rng().gen_range(0..=span);
                Some(Held::Until {
                    not_before: action.until + jitter,
                    reply: format!(
                        "451 4.7.0 deliveries to {key} suspended until {until} (backoff rule {}): {}",
                        action.rule, action.reason
                    ),
                })
            }
            ActionKind::Bounce => Some(Held::Bounced {
                reply: format!(
                    "554 5.7.0 mail to {key} bounced by backoff rule {} (in force until {until}): {}",
                    action.rule, action.reason
                ),
            }),
            ActionKind::Throttle { .. } => None,
        }
    }

    /// Feeds the replies of one attempt to the rules, each with the
    /// shaping scope it came from: a reply that matches one records an
    /// action for its scope, written in the background. The caller passes
    /// remote replies only (not the ones of recipients held back by shaping,
    /// which are ours).
    pub fn observe<'a>(
        &self,
        replies: impl IntoIterator<Item = (&'a str, &'a str, Option<&'a str>)>,
        control: Option<&ControlState>,
        writer: Option<&ControlWriter>,
    ) {
        if self.rules.is_empty() {
            return;
        }
        let Some(writer) = writer else {
            return;
        };
        let now = chrono::Utc::now().timestamp();
        for (reply, scope, source) in replies {
            let Some(rule) = rules::first_match(&self.rules, reply) else {
                continue;
            };
            // Without egress pools an attempt names no source: source-scoped rules act on the destination.
            let key = Self::key(rule.scope, scope, source);
            let action = AutoAction {
                kind: kind_of(rule.action),
                since: now,
                until: now.saturating_add(i64::try_from(rule.duration.as_secs()).unwrap_or(i64::MAX / 2)),
                rule: rule.name.clone(),
                reason: cut(rules::remote_reply(reply), MAX_REASON),
                node: self.node,
            };
            if let Some(current) = control.and_then(|c| c.action(&key)) {
                if covers(&current, &action, now) {
                    continue;
                }
            }
            if !self.may_propose(&key) {
                continue;
            }
            self.record(writer.clone(), key, action);
        }
    }

    /// Claims the proposal slot of `key` for [`PROPOSE_GAP`].
    fn may_propose(&self, key: &str) -> bool {
        let mut proposed = self.proposed.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        proposed.retain(|_, at| now.duration_since(*at) < PROPOSE_GAP);
        if proposed.contains_key(key) {
            return false;
        }
        proposed.insert(key.to_owned(), now);
        true
    }

    fn record(&self, writer: ControlWriter, key: String, action: AutoAction) {
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            let op = Operation::ShapingAction {
                key: key.clone(),
                action: Some(action.clone()),
            };
            match writer.write(op).await {
                Ok(()) => {
                    metrics.shaping_action_recorded();
                    event("recorded", &key, &action);
                }
                Err(e) => tracing::warn!(scope = %key, rule = %action.rule, error = %e, "backoff action not recorded"),
            }
        });
    }
}

fn kind_of(action: BackoffAction) -> ActionKind {
    match action {
        BackoffAction::Suspend => ActionKind::Suspend,
        BackoffAction::Bounce => ActionKind::Bounce,
        BackoffAction::Throttle { count, per } => ActionKind::Throttle {
            count: u64::from(count),
            per_secs: per.as_secs().max(1),
        },
    }
}

/// Bounce over suspend over throttle.
fn strength(kind: &ActionKind) -> u8 {
    match kind {
        ActionKind::Throttle { .. } => 0,
        ActionKind::Suspend => 1,
        ActionKind::Bounce => 2,
    }
}

/// Whether `current` makes writing `new` pointless: it is in force and
/// stronger, or as strong (the same throttle rate) with at least half of
/// `new`'s time still to run.
fn covers(current: &AutoAction, new: &AutoAction, now: i64) -> bool {
    if !current.in_force(now) {
        return false;
    }
    match strength(&current.kind).cmp(&strength(&new.kind)) {
        std::cmp::Ordering::Greater => true,
        std::cmp::Ordering::Less => false,
        std::cmp::Ordering::Equal => current.kind == new.kind && current.until >= now + (new.until - now) / 2,
    }
}

fn cut(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_owned(),
    }
}

fn rfc3339(unix: i64) -> String {
    chrono::DateTime::from_timestamp(unix, 0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| unix.to_string())
}

/// `suspend`, `throttle` or `bounce`.
pub fn action_name(kind: &ActionKind) -> &'static str {
    match kind {
        ActionKind::Suspend => "suspend",
        ActionKind::Throttle { .. } => "throttle",
        ActionKind::Bounce => "bounce",
    }
}

/// One `shaping` event (docs/events.md): `state` is `recorded`, `expired`
/// or `lifted`.
fn event(state: &str, key: &str, action: &AutoAction) {
    let rate = match action.kind {
        ActionKind::Throttle { count, per_secs } => format!("{count}/{per_secs}s"),
        _ => String::new(),
    };
    tracing::info!(
        target: crate::webhook::EVENT_TARGET,
        event = "shaping",
        state,
        scope = key,
        action = action_name(&action.kind),
        rate,
        until = %rfc3339(action.until),
        rule = %action.rule,
        reason = %action.reason,
        node = action.node,
        "shaping"
    );
}

/// How often [`watch`] looks at the actions in force.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// Until `stop`: keeps the `tern_shaping_actions` gauge current and emits
/// `expired` (or `lifted`, when the record went away early) for the
/// actions this node recorded, so each action's story is told once, by the
/// node that saw the reply.
pub async fn watch(
    control: ControlState,
    node: NodeId,
    metrics: DeliveryMetrics,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut mine: HashMap<String, AutoAction> = HashMap::new();
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let now = chrono::Utc::now().timestamp();
        let in_force = control.actions(now);
        let mut counts = [0i64; 3];
        for (_, a) in &in_force {
            counts[usize::from(strength(&a.kind))] += 1;
        }
        metrics.shaping_actions(counts[1], counts[0], counts[2]);
        let now_mine: HashMap<String, AutoAction> = in_force.into_iter().filter(|(_, a)| a.node == node).collect();
        for (key, before) in &mine {
            if now_mine.get(key) == Some(before) {
                continue;
            }
            match control.action(key) {
                // Replaced by a newer action: its own `recorded` event told it.
                Some(a) if &a != before && a.in_force(now) => {}
                Some(_) => event("expired", key, before),
                None if before.until <= now => event("expired", key, before),
                None => event("lifted", key, before),
            }
        }
        mine = now_mine;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn action(kind: ActionKind, since: i64, until: i64) -> AutoAction {
        AutoAction {
            kind,
            since,
            until,
            rule: "r".into(),
            reason: "421 4.7.28 slow down".into(),
            node: 1,
        }
    }

    #[test]
    fn an_action_in_force_is_not_rewritten_until_half_of_a_new_one_has_passed() {
        let now = 1000;
        let new = action(ActionKind::Suspend, now, now + 600);
        assert!(covers(&action(ActionKind::Suspend, now - 10, now + 590), &new, now));
        assert!(covers(&action(ActionKind::Suspend, now - 300, now + 300), &new, now));
        assert!(!covers(&action(ActionKind::Suspend, now - 400, now + 200), &new, now));
        assert!(
            !covers(&action(ActionKind::Suspend, now - 600, now), &new, now),
            "expired"
        );
        // A stronger action stays; a weaker one gives way.
        assert!(covers(&action(ActionKind::Bounce, now, now + 10), &new, now));
        let throttle = action(
            ActionKind::Throttle {
                count: 10,
                per_secs: 60,
            },
            now,
            now + 3600,
        );
        assert!(!covers(&throttle, &new, now));
        let other_rate = action(ActionKind::Throttle { count: 5, per_secs: 60 }, now, now + 3600);
        assert!(!covers(&throttle, &other_rate, now));
    }

    #[test]
    fn source_rules_key_by_source_when_there_is_one() {
        assert_eq!(
            Backoff::key(BackoffScope::Source, "mx:.google.com", Some("ip1")),
            "ip1|mx:.google.com"
        );
        assert_eq!(
            Backoff::key(BackoffScope::Source, "mx:.google.com", None),
            "mx:.google.com"
        );
        assert_eq!(
            Backoff::key(BackoffScope::Destination, "mx:.google.com", Some("ip1")),
            "mx:.google.com"
        );
    }

    #[test]
    fn proposals_per_key_are_rate_limited() {
        let b = Backoff::new(&[], 1, DeliveryMetrics::default());
        assert!(b.may_propose("domain:a.test"));
        assert!(!b.may_propose("domain:a.test"));
        assert!(b.may_propose("domain:b.test"));
    }

    #[test]
    fn reasons_are_cut_on_a_char_boundary() {
        assert_eq!(cut("ééé", 2), "éé...");
        assert_eq!(cut("abc", 5), "abc");
    }
}
