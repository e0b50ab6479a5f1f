//! The outbox through the real state machine: what each request produces,
//! and the apply of `EventsAck` (cursor, dead letters, trim).

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use openraft::storage::RaftStateMachine;
use openraft::{Entry, EntryPayload, LogId};
use tern_model::api::{EventKind, OutboxEvent};
use tern_model::envelope::{Envelope, Recipient};
use tern_model::record::{MessageRecord, RcptStatus};

use super::*;
use crate::raft::state_machine::StateMachine;
use crate::raft::{Body, NewMessage, OutcomeUpdate, QueueAction, RcptResult, Request, TypeConfig};

fn entry(index: u64, request: Request) -> Entry<TypeConfig> {
    Entry {
        log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(request),
    }
}

fn message(id: &str, rcpts: &[&str], api: bool) -> NewMessage {
    let envelope = Envelope {
        reverse_path: "a@sender.test".into(),
        recipients: rcpts
            .iter()
            .map(|r| Recipient {
                address: (*r).into(),
                notify: Default::default(),
                orcpt: None,
            })
            .collect(),
        envid: api.then(|| "b_batch1".to_owned()),
        auth_user: api.then(|| "apikey:ci".to_owned()),
        ..Default::default()
    };
    NewMessage {
        record: Box::new(MessageRecord::new(id.into(), envelope, 3, 0)),
        body: Body {
            bytes: b"x\r\n".to_vec(),
            loc: None,
        },
    }
}

fn update(id: &str, results: &[(u32, RcptStatus, &str)], attempts: u32) -> OutcomeUpdate {
    OutcomeUpdate {
        id: id.into(),
        results: results
            .iter()
            .map(|(index, status, reply)| RcptResult {
                index: *index,
                status: *status,
                reply: (*reply).into(),
            })
            .collect(),
        attempts,
        next_attempt: 0,
        delay_notified: false,
    }
}

fn outbox(sm: &StateMachine) -> Vec<(String, OutboxEvent)> {
    sm.tree()
        .scan_prefix(OUTBOX_PREFIX)
        .map(|kv| {
            let (k, v) = kv.unwrap();
            (
                String::from_utf8(k.to_vec()).unwrap(),
                bincode::deserialize(&v).unwrap(),
            )
        })
        .collect()
}

fn kinds(events: &[(String, OutboxEvent)]) -> Vec<(EventKind, String, Option<String>)> {
    events
        .iter()
        .map(|(_, e)| (e.kind, e.msg_id.clone(), e.rcpt.clone()))
        .collect()
}

async fn open(dir: &std::path::Path, outbox: bool) -> StateMachine {
    crate::raft::testing::open(
        dir,
        Arc::new(crate::app::Rules {
            outbox: crate::outbox::Switch::new(outbox),
        }),
    )
    .await
    .1
}

/// Every kind from the queue's requests, keyed by log index and position,
/// with the API's batch on API messages; nothing twice for a replayed
/// enqueue or a final recipient.
#[tokio::test]
async fn each_request_produces_its_events() {
    use EventKind::{Bounced, Cancelled, Deferred, Delivered, Expired, Queued, Received, Suppressed};
    use RcptStatus::Failed;
    let (delivered, deferred) = (RcptStatus::Delivered, RcptStatus::Deferred);
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open(dir.path(), true).await;
    sm.apply([entry(
        1,
        Request::EnqueueMany {
            messages: vec![
                message("S1", &["x@r.test", "y@r.test"], false),
                message("A1", &["p@r.test", "q@r.test"], true),
            ],
        },
    )])
    .await
    .unwrap();
    let first = outbox(&sm);
    assert_eq!(
        first.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
        [
            "o/0000000000000001/0000",
            "o/0000000000000001/0001",
            "o/0000000000000001/0002"
        ]
    );
    assert_eq!(
        kinds(&first),
        [
            (Received, "S1".into(), None),
            (Queued, "A1".into(), Some("p@r.test".into())),
            (Queued, "A1".into(), Some("q@r.test".into())),
        ]
    );
    assert_eq!(first[1].1.batch.as_deref(), Some("b_batch1"));
    assert_eq!(first[0].1.batch, None);
    assert!(first[0].1.at > 0);

    // A retried proposal of the same messages: nothing new.
    sm.apply([entry(
        2,
        Request::Enqueue {
            record: message("S1", &["x@r.test"], false).record,
            body: message("S1", &[], false).body,
        },
    )])
    .await
    .unwrap();
    assert_eq!(outbox(&sm).len(), 3);

    sm.apply([entry(
        3,
        Request::Outcomes {
            updates: vec![
                update("S1", &[(0, delivered, "250 ok"), (1, deferred, "451 4.3.0 later")], 1),
                update(
                    "A1",
                    &[
                        (0, Failed, "550 5.1.1 no such user"),
                        (
                            1,
                            Failed,
                            "550 5.7.1 recipient suppressed (complaint since 2026-12-07): x",
                        ),
                    ],
                    1,
                ),
            ],
            bounces: Vec::new(),
        },
    )])
    .await
    .unwrap();
    let third: Vec<_> = outbox(&sm).into_iter().skip(3).collect();
    assert_eq!(
        kinds(&third),
        [
            (Delivered, "S1".into(), Some("x@r.test".into())),
            (Deferred, "S1".into(), Some("y@r.test".into())),
            (Bounced, "A1".into(), Some("p@r.test".into())),
            (Suppressed, "A1".into(), Some("q@r.test".into())),
        ]
    );
    assert!(third[0].0.starts_with("o/0000000000000003/"));
    assert_eq!(third[2].1.attempts, 1);
    assert_eq!(third[2].1.reply, "550 5.1.1 no such user");

    // The delivered recipient is final: a late outcome for it is no event;
    // the deferred one expires.
    sm.apply([entry(
        4,
        Request::Outcomes {
            updates: vec![update(
                "S1",
                &[
                    (0, Failed, "550 late"),
                    (1, Failed, "451 4.3.0 later (gave up: message older than 1200s)"),
                ],
                2,
            )],
            bounces: Vec::new(),
        },
    )])
    .await
    .unwrap();
    let fourth: Vec<_> = outbox(&sm).into_iter().skip(7).collect();
    assert_eq!(kinds(&fourth), [(Expired, "S1".into(), Some("y@r.test".into()))]);

    // Delete cancels the pending recipients only.
    sm.apply([entry(
        5,
        Request::EnqueueMany {
            messages: vec![message("A2", &["p@r.test", "q@r.test"], true)],
        },
    )])
    .await
    .unwrap();
    sm.apply([entry(
        6,
        Request::Outcomes {
            updates: vec![update("A2", &[(0, delivered, "250 ok")], 1)],
            bounces: Vec::new(),
        },
    )])
    .await
    .unwrap();
    sm.apply([entry(
        7,
        Request::QueueOp {
            action: QueueAction::Delete,
            ids: vec!["A2".into(), "gone".into()],
        },
    )])
    .await
    .unwrap();
    let last = outbox(&sm).pop().unwrap();
    assert!(last.0.starts_with("o/0000000000000007/0000"));
    assert_eq!(
        (last.1.kind, last.1.rcpt.as_deref(), last.1.batch.as_deref()),
        (Cancelled, Some("q@r.test"), Some("b_batch1"))
    );
    assert_eq!(outbox(&sm).len(), 12);
}

/// An admin bounce produces events only for recipients it changes.
#[tokio::test]
async fn a_bounce_produces_events_only_for_what_it_changes() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open(dir.path(), true).await;
    sm.apply([entry(
        1,
        Request::EnqueueMany {
            messages: vec![message("M", &["a@r.test", "b@r.test"], false)],
        },
    )])
    .await
    .unwrap();
    sm.apply([entry(
        2,
        Request::Outcomes {
            updates: vec![update("M", &[(0, RcptStatus::Delivered, "250 ok")], 1)],
            bounces: Vec::new(),
        },
    )])
    .await
    .unwrap();
    sm.apply([entry(
        3,
        Request::Bounce {
            updates: vec![update(
                "M",
                &[
                    (0, RcptStatus::Failed, "550 bounced by operator"),
                    (1, RcptStatus::Failed, "550 bounced by operator"),
                ],
                1,
            )],
            reports: vec![None],
        },
    )])
    .await
    .unwrap();
    let events = outbox(&sm);
    assert_eq!(
        kinds(&events[2..]),
        [(EventKind::Bounced, "M".into(), Some("b@r.test".into()))]
    );
}

/// A complaint's suppression in the control group is a `complaint` event;
/// other suppressions are not. Without webhooks nothing is produced.
#[tokio::test]
async fn complaints_are_events_and_the_switch_turns_the_outbox_off() {
    let suppression = |class: &str| tern_model::shaping::Suppression {
        scope: String::new(),
        address: "c@r.test".into(),
        class: class.into(),
        reason: "abuse report by fbl.example about <m@x>".into(),
        added: 1,
        expires: 0,
    };
    let request = || Request::Suppress {
        entries: vec![suppression("complaint"), suppression("invalid_recipient")],
    };
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open(dir.path(), true).await;
    sm.apply([entry(1, request())]).await.unwrap();
    let events = outbox(&sm);
    assert_eq!(
        kinds(&events),
        [(EventKind::Complaint, String::new(), Some("c@r.test".into()))]
    );
    assert_eq!(events[0].1.reply, "abuse report by fbl.example about <m@x>");

    let dir = tempfile::tempdir().unwrap();
    let mut off = open(dir.path(), false).await;
    off.apply([entry(1, request())]).await.unwrap();
    off.apply([entry(
        2,
        Request::EnqueueMany {
            messages: vec![message("M", &["a@r.test"], false)],
        },
    )])
    .await
    .unwrap();
    assert!(outbox(&off).is_empty());
}

/// `EventsAck`: the cursor moves (never back), dead ones are kept under the
/// endpoint with their event id, and records up to the trim go.
#[tokio::test]
async fn acks_move_the_cursor_keep_dead_letters_and_trim() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open(dir.path(), true).await;
    for i in 1..=3 {
        sm.apply([entry(
            i,
            Request::EnqueueMany {
                messages: vec![message(&format!("M{i}"), &["a@r.test"], false)],
            },
        )])
        .await
        .unwrap();
    }
    let keys: Vec<String> = outbox(&sm).into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys.len(), 3);
    let ack = |upto: &str, dead: Vec<String>, trim: &str| Request::EventsAck {
        endpoint: "crm".into(),
        upto: upto.into(),
        dead,
        trim: trim.into(),
    };
    sm.apply([entry(4, ack(&keys[1], vec![keys[1].clone()], ""))])
        .await
        .unwrap();
    let tree = sm.tree();
    assert_eq!(
        tree.get(cursor_key("crm")).unwrap().unwrap().as_ref(),
        keys[1].as_bytes()
    );
    assert_eq!(outbox(&sm).len(), 3, "no trim while another endpoint has no cursor");
    let group = sm_group(&sm);
    let dead = status::dead_letters(&tree, "crm", 10);
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, format!("evt_{group}_2_0"));
    assert_eq!(dead[0].event.msg_id, "M2");
    let backlog = status::backlog(&tree, "crm");
    assert_eq!((backlog.pending, backlog.dead), (1, 1));
    assert!(backlog.oldest_at.is_some());

    // A late ack from a deposed leader does not move the cursor back; the trim applies.
    sm.apply([entry(5, ack(&keys[0], Vec::new(), &keys[0]))]).await.unwrap();
    assert_eq!(
        tree.get(cursor_key("crm")).unwrap().unwrap().as_ref(),
        keys[1].as_bytes()
    );
    assert_eq!(outbox(&sm).into_iter().map(|(k, _)| k).collect::<Vec<_>>(), keys[1..]);
    sm.apply([entry(6, ack(&keys[2], Vec::new(), &keys[2]))]).await.unwrap();
    assert!(outbox(&sm).is_empty());
    assert_eq!(status::backlog(&tree, "crm").pending, 0);
    // The ack itself produced no event.
    assert!(outbox(&sm).is_empty());
}

fn sm_group(sm: &StateMachine) -> u64 {
    sm.group()
}

#[test]
fn outbox_keys_parse_back() {
    let key = tern_model::api::outbox_key(0x1234, 7);
    assert_eq!(parse_outbox_key(&key), Some((0x1234, 7)));
    assert_eq!(parse_outbox_key(b"o/12/0007"), None);
    assert_eq!(parse_outbox_key(b"oc/crm"), None);
}

#[test]
fn events_render_with_the_documented_fields() {
    let event = OutboxEvent {
        kind: EventKind::Bounced,
        msg_id: "M1".into(),
        rcpt: Some("b@r.test".into()),
        from: "a@s.test".into(),
        reply: "550 5.1.1 <b@r.test>: Recipient address rejected: User unknown".into(),
        attempts: 1,
        batch: Some("b_1".into()),
        at: 1_765_000_000_123,
    };
    let info = BatchInfo {
        tenant: "acme".into(),
        tags: vec!["welcome".into()],
        metadata: [("user".to_owned(), "42".to_owned())].into(),
        campaign: Some("c1".into()),
    };
    let v = render(
        "evt_3_9_0",
        3,
        &event,
        Some(&info),
        &crate::bounce::Classifier::default(),
    );
    assert_eq!(
        v,
        serde_json::json!({
            "id": "evt_3_9_0", "type": "bounced", "version": 1,
            "timestamp": "2025-12-06T05:46:40.123Z",
            "msg_id": "M1", "recipient": "b@r.test", "from": "a@s.test",
            "reply": "550 5.1.1 <b@r.test>: Recipient address rejected: User unknown",
            "attempts": 1, "batch_id": "b_1", "tenant": "acme", "tags": ["welcome"],
            "metadata": {"user": "42"}, "campaign": "c1", "class": "invalid_recipient", "shard": 3
        })
    );
}
