//! Queue operations shared by the scheduler and the admin service: building
//! a delivery status notification as a new queued message, and the
//! administrator's bounce.

use super::message::{MessageRecord, RcptStatus};
use crate::delivery::LoadedMessage;
use crate::dsn;
use crate::envelope::{BodyType, Envelope, Notify, Recipient};
use crate::raft::{Body, NewMessage, OutcomeUpdate, RcptResult};

/// The report about `message` as a new message `id` to its reverse-path,
/// or `None` when none may be sent (null sender, or the message is itself
/// a report: a bounce never causes another bounce).
pub fn make_dsn(
    hostname: &str,
    id: String,
    message: &LoadedMessage,
    kind: dsn::DsnKind,
    rcpts: Vec<dsn::RecipientReport>,
    now: i64,
) -> Option<NewMessage> {
    let record = &message.record;
    if rcpts.is_empty() || record.envelope.reverse_path.is_empty() || dsn::is_dsn(&message.body) {
        return None;
    }
    let built = dsn::build(&dsn::DsnInput {
        kind,
        reporting_mta: hostname,
        queue_id: &record.id,
        envid: record.envelope.envid.as_deref(),
        arrival_date: record.received_at,
        reverse_path: &record.envelope.reverse_path,
        ret: record.envelope.ret,
        original: &message.body,
        recipients: rcpts,
        now,
    });
    let envelope = Envelope {
        reverse_path: String::new(),
        recipients: vec![Recipient {
            address: record.envelope.reverse_path.clone(),
            notify: Notify::default(),
            orcpt: None,
        }],
        smtputf8: built.smtputf8,
        body_type: if built.eight_bit {
            BodyType::EightBitMime
        } else {
            BodyType::SevenBit
        },
        helo: hostname.to_owned(),
        client_ip: "127.0.0.1".into(),
        auth_user: None,
        ..Envelope::default()
    };
    tracing::info!(
        target: "tern::event",
        event = "bounced",
        msg_id = %record.id,
        message_id = %crate::delivery::header_value(&message.body, "message-id").unwrap_or_default(),
        dsn_id = %id,
        kind = ?kind,
        to = %record.envelope.reverse_path,
        "dsn queued"
    );
    let size = built.message.len() as u64;
    Some(NewMessage {
        record: Box::new(MessageRecord::new(id, envelope, size, now)),
        body: Body {
            bytes: built.message,
            loc: None,
        },
    })
}

/// The administrator bounces a message: every pending recipient fails with
/// `reply`, and the sender gets one report (NOTIFY permitting).
pub fn admin_bounce(
    hostname: &str,
    dsn_id: String,
    message: &LoadedMessage,
    reply: &str,
    now: i64,
) -> (OutcomeUpdate, Option<NewMessage>) {
    let record = &message.record;
    let mut results = Vec::new();
    let mut reports = Vec::new();
    for (index, (rcpt, state)) in record.envelope.recipients.iter().zip(&record.rcpt_state).enumerate() {
        if state.status.is_final() {
            continue;
        }
        results.push(RcptResult {
            index: index as u32,
            status: RcptStatus::Failed,
            reply: reply.to_owned(),
        });
        if dsn::should_notify(&record.envelope.reverse_path, dsn::DsnKind::Failure, &rcpt.notify) {
            reports.push(dsn::RecipientReport {
                address: rcpt.address.clone(),
                orcpt: rcpt.orcpt.clone(),
                action: dsn::Action::Failed,
                status: dsn::status_from_reply(reply, dsn::Action::Failed),
                diagnostic: Some(reply.to_owned()),
                remote_mta: None,
                last_attempt: Some(now),
                will_retry_until: None,
            });
        }
    }
    let update = OutcomeUpdate {
        id: record.id.clone(),
        results,
        attempts: record.attempts,
        next_attempt: record.next_attempt,
        delay_notified: record.delay_notified,
    };
    let dsn = make_dsn(hostname, dsn_id, message, dsn::DsnKind::Failure, reports, now);
    (update, dsn)
}
