//! The queued message record: envelope, per-recipient state, schedule, and
//! where its body lives. Stored in the shard's state machine.

use bincode::Options as _;
use serde::{Deserialize, Serialize};

use crate::envelope::Envelope;
use crate::BodyLoc;

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

/// Marks a record stored in the compact form: varint bincode without the id
/// (the key holds it). The legacy form (fixed-width bincode, id included)
/// starts with the id's length as a little-endian u64, never 0xFF 0x01.
const COMPACT: [u8; 2] = [0xFF, 0x01];

fn compact() -> impl bincode::Options {
    bincode::DefaultOptions::new().with_varint_encoding()
}

impl MessageRecord {
    /// The record as kept in the state machine, under the key that holds its id.
    ///
    /// Compact because a deferred queue is these records: at the default
    /// sled cache, the accept rate bends once they no longer fit in it.
    pub fn to_stored(&self) -> bincode::Result<Vec<u8>> {
        // The record's fields in order, borrowed, with an empty id: bincode
        // writes a &str, a slice and a reference as it writes a String, a
        // Vec and the value, so this is the record's own encoding.
        #[derive(Serialize)]
        struct Stored<'a> {
            id: &'a str,
            envelope: &'a Envelope,
            size: u64,
            received_at: i64,
            rcpt_state: &'a [RcptState],
            attempts: u32,
            next_attempt: i64,
            body: &'a Option<BodyLoc>,
            delay_notified: bool,
            held: bool,
        }
        let stored = Stored {
            id: "",
            envelope: &self.envelope,
            size: self.size,
            received_at: self.received_at,
            rcpt_state: &self.rcpt_state,
            attempts: self.attempts,
            next_attempt: self.next_attempt,
            body: &self.body,
            delay_notified: self.delay_notified,
            held: self.held,
        };
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(&COMPACT);
        compact().serialize_into(&mut out, &stored)?;
        Ok(out)
    }

    /// Reads a stored record (either form) kept under queue id `id`.
    pub fn from_stored(id: &str, bytes: &[u8]) -> bincode::Result<MessageRecord> {
        match bytes.strip_prefix(&COMPACT) {
            Some(rest) => {
                let mut record: MessageRecord = compact().deserialize(rest)?;
                record.id = id.to_owned();
                Ok(record)
            }
            None => bincode::deserialize(bytes),
        }
    }

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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::envelope::{Notify, Recipient};

    /// A message as the deferred-queue benchmark leaves it: one attempt refused.
    fn deferred() -> MessageRecord {
        let envelope = Envelope {
            reverse_path: "bench@source.test".into(),
            recipients: vec![Recipient {
                address: "rcpt@deferred.test".into(),
                notify: Notify::default(),
                orcpt: None,
            }],
            helo: "client.source.test".into(),
            client_ip: "127.0.0.1".into(),
            ..Envelope::default()
        };
        let mut r = MessageRecord::new("0193A2B4C5D6E0001000A7".into(), envelope, 1090, 1_764_400_000);
        r.rcpt_state[0] = RcptState {
            status: RcptStatus::Deferred,
            last_reply: "connect to 127.0.0.1:35837: Connection refused (os error 111)".into(),
        };
        r.attempts = 1;
        r.next_attempt = 1_764_421_600;
        r.body = Some(BodyLoc {
            segment: 41,
            offset: 50_331_000,
            len: 1090,
            crc: 0xDEAD_BEEF,
        });
        r
    }

    #[test]
    fn a_stored_record_reads_back_whole_with_the_id_of_its_key() {
        let record = deferred();
        let stored = record.to_stored().unwrap();
        assert_eq!(MessageRecord::from_stored(&record.id, &stored).unwrap(), record);
        // The same bytes as the whole record's own encoding with no id.
        let mut whole = record.clone();
        whole.id = String::new();
        assert_eq!(stored[COMPACT.len()..], compact().serialize(&whole).unwrap()[..]);
        assert!(MessageRecord::from_stored(&record.id, &stored[..stored.len() - 1]).is_err());
    }

    #[test]
    fn records_written_by_earlier_versions_still_read() {
        let record = deferred();
        let legacy = bincode::serialize(&record).unwrap();
        assert_eq!(MessageRecord::from_stored("ignored", &legacy).unwrap(), record);
    }

    #[test]
    fn the_stored_form_is_under_two_thirds_of_the_legacy_one() {
        // The deferred queue is made of these records: smaller ones fit more
        // messages in sled's cache before the accept rate bends.
        let record = deferred();
        let legacy = bincode::serialize(&record).unwrap().len();
        let stored = record.to_stored().unwrap().len();
        assert!(stored * 3 < legacy * 2, "stored {stored} B, legacy {legacy} B");
    }
}
