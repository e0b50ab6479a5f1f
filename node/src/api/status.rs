//! `GET /api/v1/messages/ID`: a message's state, read from this node's
//! replicas of the shards: the queued record (`m/<id>`) while it is in the
//! queue, else the final status it left (`f/<id>`).

use serde::Serialize;
use tern_model::api::{final_key, FinalStatus};
use tern_model::record::{MessageRecord, RcptStatus};

use crate::raft::groups::Groups;
use crate::raft::GroupId;

/// A message's state as the API shows it (docs/api.md).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MessageStatus {
    pub id: String,
    /// The API batch it belongs to (`None`: not sent through the API).
    #[serde(rename = "batch_id")]
    pub batch: Option<String>,
    /// `held`, `scheduled`, `deferred` or `queued` while a recipient is
    /// pending (in that order of precedence), else `done`.
    pub state: String,
    pub attempts: u32,
    /// Unix seconds of the next attempt, while pending and not due now.
    pub not_before: Option<i64>,
    pub rcpts: Vec<RcptView>,
}

/// One recipient's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RcptView {
    pub address: String,
    /// queued, scheduled, deferred, held, delivered, failed, cancelled.
    pub state: String,
    /// The last reply of the receiving server (empty before one).
    pub reply: String,
}

/// Pending states from the most telling down: the overall state of a
/// message is the first its pending recipients have.
const PRECEDENCE: [&str; 4] = ["held", "scheduled", "deferred", "queued"];

/// The message `id` in a shard hosted here, with that shard.
pub fn lookup(groups: &Groups, id: &str) -> Option<(GroupId, MessageStatus)> {
    lookup_at(groups, id, chrono::Utc::now().timestamp())
}

/// [`lookup`] at unix seconds `now`.
pub fn lookup_at(groups: &Groups, id: &str, now: i64) -> Option<(GroupId, MessageStatus)> {
    let shards = groups.shards();
    // The queue first on every shard: a final status is only read once
    // the message is gone from all of them.
    for g in &shards {
        if let Ok(Some(record)) = g.sm.message(id) {
            return Some((g.id, of_record(&record, now)));
        }
    }
    shards.iter().find_map(|g| {
        let v = g.sm.tree().get(final_key(id)).ok()??;
        let status: FinalStatus = bincode::deserialize(&v).ok()?;
        Some((g.id, of_final(id, status)))
    })
}

/// The status of a queued message at unix seconds `now`.
pub fn of_record(record: &MessageRecord, now: i64) -> MessageStatus {
    let scheduled = record.attempts == 0 && record.next_attempt > now;
    let rcpts: Vec<RcptView> = record
        .envelope
        .recipients
        .iter()
        .zip(&record.rcpt_state)
        .map(|(r, s)| {
            let state = match s.status {
                RcptStatus::Delivered | RcptStatus::Failed => s.status.as_str(),
                _ if record.held => "held",
                _ if scheduled => "scheduled",
                RcptStatus::Deferred => "deferred",
                RcptStatus::Queued => "queued",
            };
            RcptView {
                address: r.address.clone(),
                state: state.to_owned(),
                reply: s.last_reply.clone(),
            }
        })
        .collect();
    let state = overall(&rcpts);
    let pending = state != "done";
    MessageStatus {
        id: record.id.clone(),
        batch: record.envelope.envid.clone().filter(|e| e.starts_with("b_")),
        state,
        attempts: record.attempts,
        not_before: (pending && record.next_attempt > 0).then_some(record.next_attempt),
        rcpts,
    }
}

/// The status of a message that left the queue.
pub fn of_final(id: &str, status: FinalStatus) -> MessageStatus {
    MessageStatus {
        id: id.to_owned(),
        batch: status.batch,
        state: "done".to_owned(),
        attempts: status.attempts,
        not_before: None,
        rcpts: status
            .rcpts
            .into_iter()
            .map(|(address, state, reply)| RcptView { address, state, reply })
            .collect(),
    }
}

fn overall(rcpts: &[RcptView]) -> String {
    PRECEDENCE
        .iter()
        .find(|p| rcpts.iter().any(|r| r.state == **p))
        .map_or("done", |p| *p)
        .to_owned()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tern_model::envelope::{Envelope, Recipient};
    use tern_model::record::RcptState;

    fn record(states: &[RcptStatus]) -> MessageRecord {
        let env = Envelope {
            reverse_path: "a@example.org".into(),
            recipients: (0..states.len())
                .map(|i| Recipient {
                    address: format!("r{i}@example.net"),
                    notify: Default::default(),
                    orcpt: None,
                })
                .collect(),
            envid: Some("b_abc".into()),
            auth_user: Some("apikey:ci".into()),
            ..Default::default()
        };
        let mut r = MessageRecord::new("0001".into(), env, 10, 100);
        r.rcpt_state = states
            .iter()
            .map(|s| RcptState {
                status: *s,
                last_reply: if *s == RcptStatus::Queued {
                    String::new()
                } else {
                    "250 ok".into()
                },
            })
            .collect();
        r
    }

    fn states(s: &MessageStatus) -> Vec<&str> {
        s.rcpts.iter().map(|r| r.state.as_str()).collect()
    }

    #[test]
    fn a_new_message_is_queued_and_due_now() {
        let s = of_record(&record(&[RcptStatus::Queued]), 1000);
        assert_eq!(s.state, "queued");
        assert_eq!(s.not_before, None);
        assert_eq!(s.batch.as_deref(), Some("b_abc"));
        assert_eq!(states(&s), ["queued"]);
    }

    #[test]
    fn not_yet_attempted_and_due_later_is_scheduled() {
        let mut r = record(&[RcptStatus::Queued, RcptStatus::Queued]);
        r.next_attempt = 2000;
        let s = of_record(&r, 1000);
        assert_eq!(s.state, "scheduled");
        assert_eq!(s.not_before, Some(2000));
        assert_eq!(states(&s), ["scheduled", "scheduled"]);
        assert_eq!(of_record(&r, 2000).state, "queued", "its time has come");
    }

    #[test]
    fn after_an_attempt_a_later_retry_is_deferred_not_scheduled() {
        let mut r = record(&[RcptStatus::Delivered, RcptStatus::Deferred]);
        r.attempts = 1;
        r.next_attempt = 2000;
        let s = of_record(&r, 1000);
        assert_eq!(s.state, "deferred");
        assert_eq!(states(&s), ["delivered", "deferred"]);
        assert_eq!(s.attempts, 1);
    }

    #[test]
    fn held_wins_over_every_pending_state_but_not_final_ones() {
        let mut r = record(&[RcptStatus::Failed, RcptStatus::Deferred, RcptStatus::Queued]);
        r.held = true;
        r.next_attempt = 2000;
        let s = of_record(&r, 1000);
        assert_eq!(s.state, "held");
        assert_eq!(states(&s), ["failed", "held", "held"]);
    }

    #[test]
    fn a_final_status_is_done_and_serializes_as_documented() {
        let s = of_final(
            "0001",
            FinalStatus {
                rcpts: vec![
                    ("a@example.net".into(), "delivered".into(), "250 ok".into()),
                    ("b@example.net".into(), "cancelled".into(), String::new()),
                ],
                batch: Some("b_abc".into()),
                attempts: 2,
                at: 5,
            },
        );
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "id": "0001", "batch_id": "b_abc", "state": "done", "attempts": 2, "not_before": null,
                "rcpts": [
                    {"address": "a@example.net", "state": "delivered", "reply": "250 ok"},
                    {"address": "b@example.net", "state": "cancelled", "reply": ""},
                ]
            })
        );
    }
}
