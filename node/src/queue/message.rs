//! The queued message record: envelope, per-recipient state, schedule, and
//! where its body lives. Stored in the shard's state machine.

use serde::{Deserialize, Serialize};

use crate::envelope::Envelope;
use crate::storage::wal::BodyLoc;

/// Delivery state of one recipient.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum RcptStatus {
    /// Not yet attempted.
    #[default]
    Queued,
    Delivered,
    /// Temporarily failed; will be retried.
    Deferred,
    /// Permanently failed (bounced or expired).
    Failed,
}

impl RcptStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RcptStatus::Queued => "queued",
            RcptStatus::Delivered => "delivered",
            RcptStatus::Deferred => "deferred",
            RcptStatus::Failed => "failed",
        }
    }

    /// Delivered or failed: nothing more will be tried for this recipient.
    pub fn is_final(self) -> bool {
        matches!(self, RcptStatus::Delivered | RcptStatus::Failed)
    }
}

/// Per-recipient outcome so far, parallel to `envelope.recipients`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RcptState {
    pub status: RcptStatus,
    /// Last reply from the remote side (empty before the first attempt).
    pub last_reply: String,
}

/// One message in a shard's queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageRecord {
    /// Queue id, returned in the 250 reply and in the Received header.
    pub id: String,
    pub envelope: Envelope,
    /// Body size in bytes (including our Received header).
    pub size: u64,
    /// Unix seconds when the message was accepted.
    pub received_at: i64,
    pub rcpt_state: Vec<RcptState>,
    /// Delivery attempts made so far.
    pub attempts: u32,
    /// Unix seconds of the next attempt; 0 means due now.
    pub next_attempt: i64,
    /// Where the body is in the node's write-ahead log; set when the entry is applied.
    pub body: Option<BodyLoc>,
    /// A delay notice has been sent for this message.
    pub delay_notified: bool,
    /// Held by an operator: not delivered until released.
    pub held: bool,
}

impl MessageRecord {
    pub fn new(id: String, envelope: Envelope, size: u64, received_at: i64) -> Self {
        let rcpt_state = vec![RcptState::default(); envelope.recipients.len()];
        MessageRecord {
            id,
            envelope,
            size,
            received_at,
            rcpt_state,
            attempts: 0,
            next_attempt: 0,
            body: None,
            delay_notified: false,
            held: false,
        }
    }

    /// Recipients that still need delivery.
    pub fn pending_recipients(&self) -> impl Iterator<Item = &crate::envelope::Recipient> {
        self.envelope
            .recipients
            .iter()
            .zip(&self.rcpt_state)
            .filter(|(_, s)| !s.status.is_final())
            .map(|(r, _)| r)
    }
}
