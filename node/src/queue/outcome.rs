//! The outcome decision: what one delivery attempt's per-recipient results
//! mean for the queue. Pure: from the record, the results, the time, the
//! retry jitter and the rules, it returns the [`OutcomeUpdate`] to write
//! through Raft, each recipient's judgement (for metrics, stats and the
//! event log) and the delivery status notifications to stage. The shard
//! actor ([`super::shard::QueueShard`]) performs those effects.

use std::time::Duration;

use super::message::{MessageRecord, RcptStatus};
use super::schedule::RetryPolicy;
use crate::delivery::{RcptAttempt, RcptOutcome};
use crate::dsn;
use crate::metrics::Outcome;
use crate::raft::{OutcomeUpdate, RcptResult};

/// The settings the decision depends on.
#[derive(Clone, Copy, Debug)]
pub struct Rules<'a> {
    pub retry: &'a RetryPolicy,
    /// `[delivery] delay_notice_after`: when a deferred recipient gets a delay report.
    pub delay_notice_after: Option<Duration>,
    /// The class of each failure and deferral (`[[bounce_class]]` first).
    pub classifier: &'a crate::bounce::Classifier,
}

/// What the queue does with one attempt.
#[derive(Debug)]
pub enum Verdict {
    /// Every transaction was abandoned by the fence: no outcome is written;
    /// whoever leads the shard now delivers those recipients.
    Fenced,
    Decided(Decision),
}

/// The outcome of one attempt.
#[derive(Debug)]
pub struct Decision {
    /// What the Raft write records.
    pub update: OutcomeUpdate,
    /// Each recipient's attempt and its judgement, in the attempt's order.
    pub judged: Vec<Judged>,
    /// The reports to stage, in order (failure, success, delay), each with
    /// its recipients; empty lists included (staging skips them).
    pub reports: Vec<(dsn::DsnKind, Vec<dsn::RecipientReport>)>,
}

/// One recipient's attempt as the queue judges it.
#[derive(Debug)]
pub struct Judged {
    pub attempt: RcptAttempt,
    pub status: RcptStatus,
    /// The reply recorded (an expiry adds why it gave up).
    pub reply: String,
    pub outcome: Outcome,
    /// The recipient's domain (metrics and stats).
    pub domain: String,
    /// The event name in the log (docs/events.md).
    pub event: &'static str,
    /// The bounce class of a failure, deferral or expiry; `None` when delivered.
    pub class: Option<crate::bounce::Class>,
}

/// Decides what `attempts` (one attempt of `record`'s recipients, at
/// `now`) do to the queue; `jitter` in -1..=1 spreads the next retry.
pub fn decide(
    record: &MessageRecord,
    mut attempts: Vec<RcptAttempt>,
    now: i64,
    jitter: f64,
    rules: Rules<'_>,
) -> Verdict {
    // Transactions abandoned by the fence have no outcome.
    let before = attempts.len();
    attempts.retain(|a| !matches!(a.outcome, RcptOutcome::Fenced));
    if attempts.is_empty() && before > 0 {
        return Verdict::Fenced;
    }
    let expired = rules.retry.expired(record.received_at, now);
    // Recipients shaping held back were not attempted: their state and the
    // attempt count stay, and they come back when shaping allows (past the
    // message's max age they are judged, and expire, like a deferral).
    let mut held_until: Option<i64> = None;
    if !expired {
        attempts.retain(|a| match a.not_before {
            Some(t) => {
                held_until = Some(held_until.map_or(t, |h| h.min(t)));
                false
            }
            None => true,
        });
    }
    if attempts.is_empty() {
        if let Some(until) = held_until {
            return Verdict::Decided(Decision {
                update: OutcomeUpdate {
                    id: record.id.clone(),
                    results: Vec::new(),
                    attempts: record.attempts,
                    next_attempt: until.max(now),
                    delay_notified: record.delay_notified,
                },
                judged: Vec::new(),
                reports: Vec::new(),
            });
        }
    }
    let mut results = Vec::with_capacity(attempts.len());
    let mut judged = Vec::with_capacity(attempts.len());
    for a in attempts {
        let (status, reply, outcome) = judge(&a.outcome, expired, rules.retry.max_age);
        let domain = record
            .envelope
            .recipients
            .get(a.index)
            .map(|r| crate::envelope::Envelope::domain_of(&r.address))
            .unwrap_or_default();
        let event = match outcome {
            Outcome::Expired => "expired",
            Outcome::Failed if a.suppressed => "suppressed",
            _ => status.as_str(),
        };
        let class = match status {
            RcptStatus::Delivered => None,
            _ if a.suppressed => Some(crate::bounce::Class::Suppressed),
            _ => Some(rules.classifier.classify(&reply)),
        };
        results.push(RcptResult {
            index: a.index as u32,
            status,
            reply: reply.clone(),
        });
        judged.push(Judged {
            attempt: a,
            status,
            reply,
            outcome,
            domain,
            event,
            class,
        });
    }
    let attempts_made = record.attempts + 1;
    let mut next_attempt = rules.retry.next_attempt(attempts_made, now, jitter);
    if let Some(until) = held_until {
        next_attempt = next_attempt.min(until.max(now));
    }
    let mut delay_notified = record.delay_notified;
    let mut reports = Vec::with_capacity(3);

    // Bounces (RFC 3464): one per message and kind, to the reverse-path.
    let failure_rcpts: Vec<_> = judged
        .iter()
        .filter(|j| j.status == RcptStatus::Failed)
        .filter(|j| notify_wanted(record, j.attempt.index, dsn::DsnKind::Failure))
        .filter(|j| !j.attempt.suppressed || failure_notify_given(record, j.attempt.index))
        .map(|j| report(record, &j.attempt, dsn::Action::Failed, &j.reply, now, None, expired))
        .collect();
    reports.push((dsn::DsnKind::Failure, failure_rcpts));
    let success_rcpts: Vec<_> = judged
        .iter()
        .filter(|j| j.status == RcptStatus::Delivered)
        .filter(|j| !j.attempt.dsn_relayed && notify_wanted(record, j.attempt.index, dsn::DsnKind::Success))
        .map(|j| {
            let a = &j.attempt;
            let reply = match &a.outcome {
                RcptOutcome::Delivered { reply } => reply.clone(),
                _ => String::new(),
            };
            // RFC 3461 6.2.3: handed to an MTA without DSN is "relayed".
            let action = if a.final_delivery {
                dsn::Action::Delivered
            } else {
                dsn::Action::Relayed
            };
            report(record, a, action, &reply, now, None, false)
        })
        .collect();
    reports.push((dsn::DsnKind::Success, success_rcpts));
    if let Some(after) = rules.delay_notice_after {
        if !delay_notified && now - record.received_at >= after.as_secs() as i64 {
            let until = record.received_at + rules.retry.max_age.as_secs() as i64;
            let delay_rcpts: Vec<_> = judged
                .iter()
                .filter(|j| !matches!(j.status, RcptStatus::Failed | RcptStatus::Delivered))
                .filter(|j| notify_wanted(record, j.attempt.index, dsn::DsnKind::Delay))
                .map(|j| {
                    report(
                        record,
                        &j.attempt,
                        dsn::Action::Delayed,
                        &j.reply,
                        now,
                        Some(until),
                        false,
                    )
                })
                .collect();
            if !delay_rcpts.is_empty() {
                delay_notified = true;
            }
            reports.push((dsn::DsnKind::Delay, delay_rcpts));
        }
    }
    Verdict::Decided(Decision {
        update: OutcomeUpdate {
            id: record.id.clone(),
            results,
            attempts: attempts_made,
            next_attempt,
            delay_notified,
        },
        judged,
        reports,
    })
}

/// What one recipient's attempt means for the queue: a deferral of a
/// message past `max_age` becomes a failure (an expiry).
pub fn judge(outcome: &RcptOutcome, expired: bool, max_age: Duration) -> (RcptStatus, String, Outcome) {
    match outcome {
        RcptOutcome::Delivered { reply } => (RcptStatus::Delivered, reply.clone(), Outcome::Delivered),
        RcptOutcome::Failed { reply } => (RcptStatus::Failed, reply.clone(), Outcome::Failed),
        RcptOutcome::Deferred { reply } if expired => (
            RcptStatus::Failed,
            format!("{reply} (gave up: message older than {}s)", max_age.as_secs()),
            Outcome::Expired,
        ),
        RcptOutcome::Deferred { reply } => (RcptStatus::Deferred, reply.clone(), Outcome::Deferred),
        // `decide` drops fenced attempts before judging; judged alone, one
        // is a deferral that leaves the recipient to the current leader.
        RcptOutcome::Fenced => (RcptStatus::Deferred, outcome.reply().to_owned(), Outcome::Deferred),
    }
}

/// The sender asked for failure reports of this recipient explicitly
/// (`NOTIFY=FAILURE`): a suppressed recipient is reported only then, since
/// the sender of a list that keeps mailing it ignores bounces anyway.
fn failure_notify_given(record: &MessageRecord, index: usize) -> bool {
    record
        .envelope
        .recipients
        .get(index)
        .is_some_and(|r| r.notify.given && r.notify.failure)
}

/// NOTIFY semantics for one recipient (RFC 3461 §4.1).
fn notify_wanted(record: &MessageRecord, index: usize, kind: dsn::DsnKind) -> bool {
    record
        .envelope
        .recipients
        .get(index)
        .is_some_and(|r| dsn::should_notify(&record.envelope.reverse_path, kind, &r.notify))
}

fn report(
    record: &MessageRecord,
    a: &RcptAttempt,
    action: dsn::Action,
    reply: &str,
    now: i64,
    will_retry_until: Option<i64>,
    expired: bool,
) -> dsn::RecipientReport {
    let rcpt = record.envelope.recipients.get(a.index);
    // An expiry after repeated 4xx reports the last 4.x.x status (as Postfix does); ours is 4.4.7.
    let status = if expired && !reply.starts_with('4') {
        "4.4.7".to_owned()
    } else {
        dsn::status_from_reply(reply, action)
    };
    dsn::RecipientReport {
        address: rcpt.map(|r| r.address.clone()).unwrap_or_default(),
        orcpt: rcpt.and_then(|r| r.orcpt.clone()),
        action,
        status,
        diagnostic: (!reply.is_empty()).then(|| reply.to_owned()),
        remote_mta: a.remote_host.clone(),
        last_attempt: Some(now),
        will_retry_until,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::envelope::{Envelope, Notify, Recipient};
    use crate::queue::schedule::{Clock, Schedule, TokioClock};

    const NOW: i64 = 1_800_000_000;

    fn retry() -> RetryPolicy {
        RetryPolicy {
            schedule: vec![Duration::from_secs(60), Duration::from_secs(300)],
            max_age: Duration::from_secs(1200),
        }
    }

    static CLASSIFIER: std::sync::LazyLock<crate::bounce::Classifier> =
        std::sync::LazyLock::new(crate::bounce::Classifier::default);

    fn rules(retry: &RetryPolicy, delay_after: Option<u64>) -> Rules<'_> {
        Rules {
            retry,
            delay_notice_after: delay_after.map(Duration::from_secs),
            classifier: &CLASSIFIER,
        }
    }

    /// A message from alice with `n` recipients, received `age` seconds ago.
    fn record(n: usize, age: i64) -> MessageRecord {
        let envelope = Envelope {
            reverse_path: "alice@example.test".into(),
            recipients: (0..n)
                .map(|i| Recipient {
                    address: format!("rcpt{i}@Dest{i}.test"),
                    notify: Notify::default(),
                    orcpt: None,
                })
                .collect(),
            ..Envelope::default()
        };
        MessageRecord::new("m1".into(), envelope, 100, NOW - age)
    }

    fn attempt(index: usize, outcome: RcptOutcome) -> RcptAttempt {
        RcptAttempt {
            index,
            outcome,
            remote_host: Some("mx.dest.test".into()),
            remote_ip: None,
            tls: None,
            dsn_relayed: false,
            final_delivery: false,
            message_id: String::new(),
            not_before: None,
            scope: None,
            suppressed: false,
            source: None,
        }
    }

    fn delivered(index: usize) -> RcptAttempt {
        attempt(
            index,
            RcptOutcome::Delivered {
                reply: "250 2.0.0 ok".into(),
            },
        )
    }

    fn deferred(index: usize) -> RcptAttempt {
        attempt(
            index,
            RcptOutcome::Deferred {
                reply: "451 4.3.0 later".into(),
            },
        )
    }

    fn failed(index: usize) -> RcptAttempt {
        attempt(
            index,
            RcptOutcome::Failed {
                reply: "550 5.1.1 no such user".into(),
            },
        )
    }

    fn decided(verdict: Verdict) -> Decision {
        match verdict {
            Verdict::Decided(d) => d,
            Verdict::Fenced => panic!("fenced"),
        }
    }

    /// The kinds of the reports that have recipients, and how many each.
    fn staged(d: &Decision) -> Vec<(dsn::DsnKind, usize)> {
        d.reports
            .iter()
            .filter(|(_, r)| !r.is_empty())
            .map(|(k, r)| (*k, r.len()))
            .collect()
    }

    fn statuses(d: &Decision) -> Vec<RcptStatus> {
        d.update.results.iter().map(|r| r.status).collect()
    }

    fn held(index: usize, until: i64) -> RcptAttempt {
        let mut a = attempt(
            index,
            RcptOutcome::Deferred {
                reply: "451 4.7.0 held by shaping".into(),
            },
        );
        a.not_before = Some(until);
        a
    }

    #[test]
    fn a_recipient_held_by_shaping_is_not_an_attempt() {
        let r = retry();
        let rec = record(1, 30);
        let d = decided(decide(&rec, vec![held(0, NOW + 42)], NOW, 0.0, rules(&r, Some(1))));
        assert!(d.update.results.is_empty(), "{:?}", d.update.results);
        assert_eq!(d.update.attempts, rec.attempts);
        assert_eq!(d.update.next_attempt, NOW + 42);
        assert!(d.judged.is_empty() && staged(&d).is_empty());
    }

    #[test]
    fn held_and_attempted_recipients_share_one_attempt_and_the_earlier_time() {
        let r = retry();
        let rec = record(2, 30);
        let d = decided(decide(
            &rec,
            vec![deferred(0), held(1, NOW + 5)],
            NOW,
            0.0,
            rules(&r, None),
        ));
        assert_eq!(statuses(&d), [RcptStatus::Deferred]);
        assert_eq!(d.update.attempts, rec.attempts + 1);
        assert_eq!(
            d.update.next_attempt,
            NOW + 5,
            "the held one comes back before the retry"
        );
    }

    #[test]
    fn a_held_recipient_past_the_max_age_expires() {
        let r = retry();
        let rec = record(1, 1300);
        let d = decided(decide(&rec, vec![held(0, NOW + 5)], NOW, 0.0, rules(&r, None)));
        assert_eq!(statuses(&d), [RcptStatus::Failed]);
        assert_eq!(d.judged[0].event, "expired");
    }

    #[test]
    fn a_delivered_recipient_is_final_and_reports_nothing_by_default() {
        let retry = retry();
        let d = decided(decide(
            &record(1, 10),
            vec![delivered(0)],
            NOW,
            0.0,
            rules(&retry, None),
        ));
        assert_eq!(statuses(&d), [RcptStatus::Delivered]);
        assert_eq!(d.update.id, "m1");
        assert_eq!(d.update.attempts, 1);
        assert_eq!(d.update.results[0].reply, "250 2.0.0 ok");
        assert_eq!(d.judged[0].event, "delivered");
        assert_eq!(d.judged[0].domain, "dest0.test");
        assert!(matches!(d.judged[0].outcome, Outcome::Delivered));
        assert!(staged(&d).is_empty());
    }

    #[test]
    fn a_deferred_recipient_is_retried_on_the_policy_schedule() {
        let retry = retry();
        let d = decided(decide(
            &record(1, 10),
            vec![deferred(0)],
            NOW,
            0.0,
            rules(&retry, Some(3600)),
        ));
        assert_eq!(statuses(&d), [RcptStatus::Deferred]);
        assert_eq!(d.update.next_attempt, NOW + 60);
        assert!(!d.update.delay_notified);
        assert!(matches!(d.judged[0].outcome, Outcome::Deferred));
        assert!(staged(&d).is_empty());
        // Jitter spreads the retry within ±10%.
        let late = decided(decide(&record(1, 10), vec![deferred(0)], NOW, 1.0, rules(&retry, None)));
        assert_eq!(late.update.next_attempt, NOW + 66);
    }

    #[test]
    fn a_deferral_past_max_age_expires_and_bounces() {
        let retry = retry();
        let d = decided(decide(
            &record(1, 1200),
            vec![deferred(0)],
            NOW,
            0.0,
            rules(&retry, None),
        ));
        assert_eq!(statuses(&d), [RcptStatus::Failed]);
        assert_eq!(
            d.update.results[0].reply,
            "451 4.3.0 later (gave up: message older than 1200s)"
        );
        assert_eq!(d.judged[0].event, "expired");
        assert!(matches!(d.judged[0].outcome, Outcome::Expired));
        assert_eq!(staged(&d), [(dsn::DsnKind::Failure, 1)]);
        // The report keeps the last temporary status.
        let (_, rcpts) = &d.reports[0];
        assert_eq!(rcpts[0].status, "4.3.0");
        assert_eq!(rcpts[0].action, dsn::Action::Failed);
    }

    #[test]
    fn a_permanent_failure_bounces_to_the_reverse_path() {
        let retry = retry();
        let d = decided(decide(&record(1, 10), vec![failed(0)], NOW, 0.0, rules(&retry, None)));
        assert_eq!(statuses(&d), [RcptStatus::Failed]);
        assert_eq!(d.judged[0].event, "failed");
        assert_eq!(staged(&d), [(dsn::DsnKind::Failure, 1)]);
        let (_, rcpts) = &d.reports[0];
        assert_eq!(rcpts[0].address, "rcpt0@Dest0.test");
        assert_eq!(rcpts[0].status, "5.1.1");
        // The null sender gets no report.
        let mut bounce = record(1, 10);
        bounce.envelope.reverse_path.clear();
        let d = decided(decide(&bounce, vec![failed(0)], NOW, 0.0, rules(&retry, None)));
        assert!(staged(&d).is_empty());
    }

    #[test]
    fn failures_and_deferrals_carry_their_class() {
        let retry = retry();
        let d = decided(decide(
            &record(3, 10),
            vec![failed(0), deferred(1), delivered(2)],
            NOW,
            0.0,
            rules(&retry, None),
        ));
        let classes: Vec<_> = d.judged.iter().map(|j| j.class).collect();
        use crate::bounce::Class;
        assert_eq!(classes, [Some(Class::InvalidRecipient), Some(Class::Other), None]);
    }

    #[test]
    fn a_suppressed_recipient_is_a_suppressed_event_reported_only_on_explicit_notify() {
        let retry = retry();
        let suppressed = || {
            let mut a = attempt(
                0,
                RcptOutcome::Failed {
                    reply: "550 5.7.1 recipient suppressed (invalid_recipient since 2026-12-07): x".into(),
                },
            );
            a.suppressed = true;
            a
        };
        let d = decided(decide(
            &record(1, 10),
            vec![suppressed()],
            NOW,
            0.0,
            rules(&retry, None),
        ));
        assert_eq!(statuses(&d), [RcptStatus::Failed]);
        assert_eq!(d.judged[0].event, "suppressed");
        assert_eq!(d.judged[0].class, Some(crate::bounce::Class::Suppressed));
        assert!(staged(&d).is_empty(), "no report unless NOTIFY=FAILURE was given");
        let mut asked = record(1, 10);
        asked.envelope.recipients[0].notify = Notify {
            given: true,
            failure: true,
            ..Notify::default()
        };
        let d = decided(decide(&asked, vec![suppressed()], NOW, 0.0, rules(&retry, None)));
        assert_eq!(staged(&d), [(dsn::DsnKind::Failure, 1)]);
        assert_eq!(d.reports[0].1[0].status, "5.7.1");
    }

    #[test]
    fn a_delay_notice_is_sent_once_after_the_configured_wait() {
        let retry = retry();
        // Not yet: deferred for 10 minutes, notice after an hour.
        let d = decided(decide(
            &record(1, 600),
            vec![deferred(0)],
            NOW,
            0.0,
            rules(&retry, Some(3600)),
        ));
        assert!(staged(&d).is_empty());
        let long = RetryPolicy {
            max_age: Duration::from_secs(86_400),
            ..retry.clone()
        };
        let d = decided(decide(
            &record(1, 3600),
            vec![deferred(0)],
            NOW,
            0.0,
            rules(&long, Some(3600)),
        ));
        assert_eq!(staged(&d), [(dsn::DsnKind::Delay, 1)]);
        assert!(d.update.delay_notified);
        let (_, rcpts) = d.reports.iter().find(|(k, _)| *k == dsn::DsnKind::Delay).unwrap();
        assert_eq!(rcpts[0].will_retry_until, Some(NOW - 3600 + 86_400));
        // Once noted, never again.
        let mut noted = record(1, 7200);
        noted.delay_notified = true;
        let d = decided(decide(&noted, vec![deferred(0)], NOW, 0.0, rules(&long, Some(3600))));
        assert!(staged(&d).is_empty());
        assert!(d.update.delay_notified);
    }

    #[test]
    fn mixed_recipients_each_get_their_own_outcome() {
        let retry = retry();
        let mut r = record(3, 10);
        r.attempts = 2;
        let attempts = vec![delivered(0), deferred(1), failed(2)];
        let d = decided(decide(&r, attempts, NOW, 0.0, rules(&retry, None)));
        assert_eq!(
            statuses(&d),
            [RcptStatus::Delivered, RcptStatus::Deferred, RcptStatus::Failed]
        );
        let indexes: Vec<u32> = d.update.results.iter().map(|r| r.index).collect();
        assert_eq!(indexes, [0, 1, 2]);
        // The third attempt: the second delay of the schedule.
        assert_eq!(d.update.attempts, 3);
        assert_eq!(d.update.next_attempt, NOW + 300);
        // One failure report, for the failed recipient only.
        assert_eq!(staged(&d), [(dsn::DsnKind::Failure, 1)]);
        assert_eq!(d.reports[0].1[0].address, "rcpt2@Dest2.test");
    }

    #[test]
    fn success_reports_follow_notify_and_say_relayed_or_delivered() {
        let retry = retry();
        let mut r = record(2, 10);
        for rcpt in &mut r.envelope.recipients {
            rcpt.notify = Notify {
                given: true,
                success: true,
                ..Notify::default()
            };
        }
        let mut relayed_by_next_hop = delivered(1);
        relayed_by_next_hop.dsn_relayed = true;
        let mut into_mailbox = delivered(0);
        into_mailbox.final_delivery = true;
        let d = decided(decide(
            &r,
            vec![into_mailbox, relayed_by_next_hop],
            NOW,
            0.0,
            rules(&retry, None),
        ));
        assert_eq!(staged(&d), [(dsn::DsnKind::Success, 1)]);
        let (_, rcpts) = &d.reports[1];
        assert_eq!(rcpts[0].action, dsn::Action::Delivered);
    }

    #[test]
    fn fenced_transactions_record_no_outcome() {
        let retry = retry();
        let fenced = || attempt(0, RcptOutcome::Fenced);
        assert!(matches!(
            decide(&record(1, 10), vec![fenced()], NOW, 0.0, rules(&retry, None)),
            Verdict::Fenced
        ));
        // Only the fenced ones are dropped.
        let d = decided(decide(
            &record(2, 10),
            vec![fenced(), failed(1)],
            NOW,
            0.0,
            rules(&retry, None),
        ));
        assert_eq!(statuses(&d), [RcptStatus::Failed]);
        assert_eq!(d.update.results[0].index, 1);
    }

    /// Defer -> retry -> expire of one message through the shard's schedule,
    /// retry policy and outcome rule, on tokio's paused clock: attempts come
    /// at the scheduled delays (jitter within ±10%) and the first deferral
    /// after `max_age` is an expiry.
    #[tokio::test(start_paused = true)]
    async fn deferred_mail_is_retried_on_schedule_then_expires() {
        const TICK: Duration = Duration::from_secs(5);
        let clock = TokioClock {
            epoch: NOW,
            start: tokio::time::Instant::now(),
        };
        let retry = RetryPolicy {
            schedule: vec![Duration::from_secs(60), Duration::from_secs(300)],
            max_age: Duration::from_secs(1200),
        };
        let received_at = clock.now();
        let mut schedule = Schedule::default();
        schedule.insert("m", received_at);
        let mut tried_at = Vec::new();
        let mut last = None;
        // Bounded: 2000 ticks of 5 s is far past max_age.
        for step in 0..2000u32 {
            for id in schedule.pop_due(clock.now(), 10) {
                let now = clock.now();
                tried_at.push(now - received_at);
                let peer_says = RcptOutcome::Deferred {
                    reply: "451 4.3.0 try later".into(),
                };
                let (status, reply, outcome) = judge(&peer_says, retry.expired(received_at, now), retry.max_age);
                if status == RcptStatus::Deferred {
                    // Alternate the jitter's extremes.
                    let jitter = if step % 2 == 0 { 1.0 } else { -1.0 };
                    schedule.insert(&id, retry.next_attempt(tried_at.len() as u32, now, jitter));
                } else {
                    last = Some((status, reply, outcome));
                }
            }
            if last.is_some() {
                break;
            }
            tokio::time::advance(TICK).await;
        }
        let (status, reply, outcome) = last.expect("the message expired");
        assert_eq!(status, RcptStatus::Failed);
        assert!(matches!(outcome, Outcome::Expired));
        assert_eq!(reply, "451 4.3.0 try later (gave up: message older than 1200s)");
        assert!(schedule.is_empty());
        // First try at once, then 60 s ±10%, then 300 s ±10% each (a tick late at most).
        assert_eq!(tried_at[0], 0);
        let gaps: Vec<i64> = tried_at.windows(2).map(|w| w[1] - w[0]).collect();
        assert!((54..=66 + 5).contains(&gaps[0]), "{tried_at:?}");
        for g in &gaps[1..] {
            assert!((270..=330 + 5).contains(g), "{tried_at:?}");
        }
        // Only the last attempt is past max_age; the one before was not.
        let n = tried_at.len();
        assert!(tried_at[n - 1] >= 1200 && tried_at[n - 2] < 1200, "{tried_at:?}");
        assert!((5..=6).contains(&n), "{tried_at:?}");
    }
}
