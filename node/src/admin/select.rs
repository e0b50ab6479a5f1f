//! Which queued messages an operator's query or operation selects: the
//! filters of `ternctl queue list` and of every queue operation (ids,
//! recipient domain, sender, age, state, last reply class), checked against
//! one message record. Pure: no I/O, tested below.

use std::collections::HashSet;

use tonic::Status;

use crate::envelope::Envelope;
use crate::queue::message::MessageRecord;

/// A message's state as ternctl and the API name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Held by an operator.
    Held,
    /// Never tried, due later (send_at, HOLDFOR/HOLDUNTIL).
    Scheduled,
    /// Tried before, waiting for its next attempt.
    Deferred,
    /// Due now, never tried.
    Queued,
}

impl State {
    pub fn of(r: &MessageRecord, now: i64) -> State {
        if r.held {
            State::Held
        } else if r.attempts == 0 && r.next_attempt > now {
            State::Scheduled
        } else if r.attempts > 0 {
            State::Deferred
        } else {
            State::Queued
        }
    }

    fn parse(s: &str) -> Result<Option<State>, Status> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "" => None,
            "held" => Some(State::Held),
            "scheduled" => Some(State::Scheduled),
            "deferred" => Some(State::Deferred),
            "queued" => Some(State::Queued),
            other => {
                return Err(Status::invalid_argument(format!(
                    "unknown state {other:?} (held, deferred, scheduled or queued)"
                )))
            }
        })
    }
}

/// The filters of one request, validated; every given one must match.
#[derive(Debug, Default)]
pub struct Selection {
    ids: HashSet<String>,
    domain: String,
    sender: String,
    older_than: i64,
    newer_than: i64,
    state: Option<State>,
    /// b'4' or b'5'.
    reply_class: Option<u8>,
}

impl Selection {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ids: &[String],
        domain: &str,
        sender: &str,
        older_than_secs: u64,
        newer_than_secs: u64,
        state: &str,
        reply_class: &str,
    ) -> Result<Selection, Status> {
        let reply_class = match reply_class.trim().to_ascii_lowercase().as_str() {
            "" => None,
            "4xx" | "4" => Some(b'4'),
            "5xx" | "5" => Some(b'5'),
            other => {
                return Err(Status::invalid_argument(format!(
                    "unknown reply class {other:?} (4xx or 5xx)"
                )))
            }
        };
        let secs = |s: u64| i64::try_from(s).unwrap_or(i64::MAX);
        Ok(Selection {
            ids: ids
                .iter()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect(),
            domain: domain.trim().trim_end_matches('.').to_ascii_lowercase(),
            sender: sender.trim().to_ascii_lowercase(),
            older_than: secs(older_than_secs),
            newer_than: secs(newer_than_secs),
            state: State::parse(state)?,
            reply_class,
        })
    }

    /// No filter at all: every message.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
            && self.domain.is_empty()
            && self.sender.is_empty()
            && self.older_than == 0
            && self.newer_than == 0
            && self.state.is_none()
            && self.reply_class.is_none()
    }

    /// The ids asked for, if the selection names ids (point lookups
    /// instead of a scan).
    pub fn ids(&self) -> Option<&HashSet<String>> {
        (!self.ids.is_empty()).then_some(&self.ids)
    }

    pub fn matches(&self, r: &MessageRecord, now: i64) -> bool {
        (self.ids.is_empty() || self.ids.contains(&r.id))
            && (self.domain.is_empty()
                || r.pending_recipients()
                    .any(|rc| Envelope::domain_of(&rc.address) == self.domain))
            && (self.sender.is_empty()
                || match self.sender.strip_prefix('@') {
                    Some(d) => Envelope::domain_of(&r.envelope.reverse_path) == d,
                    None => r.envelope.reverse_path.eq_ignore_ascii_case(&self.sender),
                })
            && (self.older_than == 0 || now.saturating_sub(r.received_at) >= self.older_than)
            && (self.newer_than == 0 || now.saturating_sub(r.received_at) < self.newer_than)
            && self.state.is_none_or(|s| State::of(r, now) == s)
            && self
                .reply_class
                .is_none_or(|c| r.rcpt_state.iter().any(|s| s.last_reply.as_bytes().first() == Some(&c)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn record(id: &str, received_at: i64, attempts: u32, reply: &str) -> MessageRecord {
        let envelope = crate::envelope::Envelope {
            reverse_path: "Alice@Sender.test".into(),
            recipients: vec![crate::envelope::Recipient {
                address: "bob@example.test".into(),
                notify: Default::default(),
                orcpt: None,
            }],
            ..Default::default()
        };
        let mut r = MessageRecord::new(id.into(), envelope, 10, received_at);
        r.attempts = attempts;
        r.rcpt_state[0].last_reply = reply.into();
        r
    }

    fn sel(domain: &str, sender: &str, older: u64, newer: u64, state: &str, class: &str) -> Selection {
        Selection::new(&[], domain, sender, older, newer, state, class).unwrap()
    }

    #[test]
    fn each_filter_selects_and_rejects() {
        let now = 10_000;
        let fresh = record("A", now - 10, 0, "");
        let old = record("B", now - 5_000, 3, "451 4.7.1 try later");
        assert!(sel("", "", 0, 0, "", "").is_empty());
        assert!(sel("Example.Test.", "", 0, 0, "", "").matches(&fresh, now));
        assert!(!sel("other.test", "", 0, 0, "", "").matches(&fresh, now));
        assert!(sel("", "alice@sender.test", 0, 0, "", "").matches(&fresh, now));
        assert!(sel("", "@sender.test", 0, 0, "", "").matches(&fresh, now));
        assert!(!sel("", "@other.test", 0, 0, "", "").matches(&fresh, now));
        assert!(sel("", "", 3600, 0, "", "").matches(&old, now));
        assert!(!sel("", "", 3600, 0, "", "").matches(&fresh, now));
        assert!(sel("", "", 0, 60, "", "").matches(&fresh, now));
        assert!(!sel("", "", 0, 60, "", "").matches(&old, now));
        assert!(sel("", "", 0, 0, "deferred", "").matches(&old, now));
        assert!(sel("", "", 0, 0, "queued", "").matches(&fresh, now));
        assert!(!sel("", "", 0, 0, "held", "").matches(&fresh, now));
        assert!(sel("", "", 0, 0, "", "4xx").matches(&old, now));
        assert!(!sel("", "", 0, 0, "", "5xx").matches(&old, now));
        assert!(!sel("", "", 0, 0, "", "4xx").matches(&fresh, now));
        let ids = Selection::new(&["B".into()], "", "", 0, 0, "", "").unwrap();
        assert!(ids.matches(&old, now) && !ids.matches(&fresh, now));
    }

    #[test]
    fn unknown_state_or_class_is_a_clear_error() {
        let e = Selection::new(&[], "", "", 0, 0, "stuck", "").unwrap_err();
        assert!(e.message().contains("held, deferred, scheduled"), "{e}");
        let e = Selection::new(&[], "", "", 0, 0, "", "2xx").unwrap_err();
        assert!(e.message().contains("4xx or 5xx"), "{e}");
    }
}
