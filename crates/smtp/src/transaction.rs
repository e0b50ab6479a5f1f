//! One outbound transaction, sans I/O: the envelope commands to send for a
//! message (MAIL, then one RCPT per recipient with a valid path), how many
//! go out before the client waits for replies (pipelining), and how the
//! replies become one outcome per recipient: the MAIL reply for everybody
//! when MAIL is refused, each RCPT reply for a refused recipient, then the
//! reply to the content for every accepted recipient (SMTP) or one reply per
//! accepted recipient in RCPT order (LMTP, RFC 2033 4.2).
//!
//! The node's `Connection::send` moves the bytes, bounds the time and asks
//! the fence; every decision about replies is made here.

use crate::client::{self as proto, MailParams, RcptOutcome};
use crate::envelope::Notify;
use crate::reply::Reply;

/// Commands per pipelined write when the peer offers PIPELINING; without
/// it, one at a time. Bounded so that neither side can block on a full
/// socket buffer while the other is still writing (RFC 2920 3.5).
pub const PIPELINE_BATCH: usize = 100;

/// An envelope command, for matching its reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmd {
    Mail,
    /// RCPT for the recipient at this index of the message.
    Rcpt(usize),
}

impl Cmd {
    /// For logs and error texts.
    pub fn stage(self) -> &'static str {
        match self {
            Cmd::Mail => "MAIL",
            Cmd::Rcpt(_) => "RCPT",
        }
    }
}

/// One recipient as the transaction needs it.
#[derive(Clone, Copy, Debug)]
pub struct RcptSpec<'a> {
    pub address: &'a str,
    pub notify: &'a Notify,
    /// Decoded `addr-type;addr` of the ORCPT parameter.
    pub orcpt: Option<&'a str>,
}

/// The state of one transaction between the envelope and the last reply.
#[derive(Debug)]
pub struct Transaction {
    /// `None`: accepted at RCPT (or not answered yet), waiting for the
    /// content's reply.
    outcomes: Vec<Option<RcptOutcome>>,
    /// MAIL and RCPT commands not yet handed to the driver.
    envelope: Vec<(Cmd, Vec<u8>)>,
    mail_refused: Option<Reply>,
    /// Recipients accepted at RCPT, in RCPT order.
    accepted: Vec<usize>,
    lmtp: bool,
    /// Replies to the content received so far.
    answered: usize,
    /// Every reply to the content was positive.
    all_ok: bool,
}

impl Transaction {
    /// A transaction for `recipients`; a recipient whose path cannot be
    /// sent gets `553 5.1.3` now and no RCPT. `dsn`: the peer offers DSN.
    pub fn new(
        reverse_path: &str,
        params: &MailParams<'_>,
        recipients: &[RcptSpec<'_>],
        dsn: bool,
        lmtp: bool,
    ) -> Self {
        let mut outcomes = vec![None; recipients.len()];
        let mut envelope = Vec::with_capacity(recipients.len() + 1);
        envelope.push((Cmd::Mail, proto::mail_from(reverse_path, params)));
        for (i, r) in recipients.iter().enumerate() {
            if proto::valid_path(r.address) {
                envelope.push((Cmd::Rcpt(i), proto::rcpt_to(r.address, r.notify, r.orcpt, dsn)));
            } else {
                let reply = Reply::synthetic(553, "5.1.3", "Invalid recipient address syntax");
                outcomes[i] = Some(RcptOutcome::from_reply(&reply));
            }
        }
        Transaction {
            outcomes,
            envelope,
            mail_refused: None,
            accepted: Vec::new(),
            lmtp,
            answered: 0,
            all_ok: true,
        }
    }

    /// The envelope commands, to be written in batches of
    /// [`Transaction::batch`] and answered in order through
    /// [`Transaction::envelope_reply`].
    pub fn take_envelope(&mut self) -> Vec<(Cmd, Vec<u8>)> {
        std::mem::take(&mut self.envelope)
    }

    /// How many envelope commands go out before reading their replies.
    pub fn batch(pipelining: bool) -> usize {
        if pipelining {
            PIPELINE_BATCH
        } else {
            1
        }
    }

    /// Takes the reply to an envelope command (not a `421`: the driver ends
    /// the session on that).
    pub fn envelope_reply(&mut self, cmd: Cmd, reply: &Reply) {
        match cmd {
            Cmd::Mail if !reply.is_positive() => self.mail_refused = Some(reply.clone()),
            Cmd::Mail => {}
            // Pipelined RCPTs after a refused MAIL get 503s: ignore.
            Cmd::Rcpt(_) if self.mail_refused.is_some() => {}
            Cmd::Rcpt(i) => {
                if !reply.is_positive() {
                    if let Some(slot) = self.outcomes.get_mut(i) {
                        *slot = Some(RcptOutcome::from_reply(reply));
                    }
                }
            }
        }
    }

    /// MAIL was refused: stop after the current batch.
    pub fn mail_refused(&self) -> bool {
        self.mail_refused.is_some()
    }

    /// After the envelope's replies: the outcomes when the transaction ends
    /// here (MAIL refused, or no recipient accepted), else `None` and the
    /// content is to be sent.
    pub fn after_envelope(&mut self) -> Option<Vec<RcptOutcome>> {
        if let Some(mail) = &self.mail_refused {
            // MAIL refused: that reply is everybody's.
            let o = RcptOutcome::from_reply(mail);
            return Some(self.fill(Some(o)));
        }
        self.accepted = (0..self.outcomes.len())
            .filter(|&i| self.outcomes[i].is_none())
            .collect();
        if self.accepted.is_empty() {
            return Some(self.fill(None));
        }
        None
    }

    /// DATA got something other than `354`: its reply is every accepted
    /// recipient's.
    pub fn data_refused(&mut self, reply: &Reply) -> Vec<RcptOutcome> {
        self.fill(Some(RcptOutcome::from_reply(reply)))
    }

    /// Replies the peer owes after the content: one (SMTP) or one per
    /// accepted recipient (LMTP).
    pub fn content_replies(&self) -> usize {
        if self.lmtp {
            self.accepted.len()
        } else {
            1
        }
    }

    /// Takes the next reply to the content (not a `421`).
    pub fn content_reply(&mut self, reply: &Reply) {
        self.all_ok &= reply.is_positive();
        let o = RcptOutcome::from_reply(reply);
        if self.lmtp {
            if let Some(slot) = self.accepted.get(self.answered).and_then(|&i| self.outcomes.get_mut(i)) {
                *slot = Some(o);
            }
        } else {
            for &i in &self.accepted {
                self.outcomes[i] = Some(o.clone());
            }
        }
        self.answered += 1;
    }

    /// Replies to the content received so far.
    pub fn answered(&self) -> usize {
        self.answered
    }

    /// Reading a reply to the content failed with `error`. After some LMTP
    /// replies the deliveries so far stand and the rest is deferred with the
    /// error's text (`Some`); before any, the whole transaction failed
    /// (`None`: the driver reports the error).
    pub fn content_failed(&mut self, error: &str) -> Option<Vec<RcptOutcome>> {
        (self.answered > 0).then(|| {
            self.fill(Some(RcptOutcome::Deferred {
                reply: error.to_string(),
            }))
        })
    }

    /// The outcome of every recipient, in order, and whether every reply to
    /// the content was positive (else the peer may hold state: RSET before
    /// the next transaction).
    pub fn finish(mut self) -> (Vec<RcptOutcome>, bool) {
        let all_ok = self.all_ok;
        (self.fill(None), all_ok)
    }

    /// The outcomes, with `with` for recipients still without one (dropped
    /// when `None`).
    fn fill(&mut self, with: Option<RcptOutcome>) -> Vec<RcptOutcome> {
        std::mem::take(&mut self.outcomes)
            .into_iter()
            .filter_map(|o| o.or_else(|| with.clone()))
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn reply(code: u16, enhanced: &str, text: &str) -> Reply {
        Reply::synthetic(code, enhanced, text)
    }

    fn tx(addrs: &[&str], lmtp: bool) -> Transaction {
        let notify = Notify::default();
        let rcpts: Vec<RcptSpec<'_>> = addrs
            .iter()
            .map(|a| RcptSpec {
                address: a,
                notify: &notify,
                orcpt: None,
            })
            .collect();
        Transaction::new("s@a.test", &MailParams::default(), &rcpts, false, lmtp)
    }

    fn codes(o: &[RcptOutcome]) -> Vec<&str> {
        o.iter().map(|o| &o.reply()[..3]).collect()
    }

    /// Answers the envelope: `rcpt_codes` per RCPT in order.
    fn envelope(t: &mut Transaction, mail: u16, rcpt_codes: &[u16], pipelining: bool) -> Vec<usize> {
        let cmds = t.take_envelope();
        let mut batches = Vec::new();
        let mut codes = rcpt_codes.iter();
        for group in cmds.chunks(Transaction::batch(pipelining)) {
            batches.push(group.len());
            for (cmd, _) in group {
                let code = match cmd {
                    Cmd::Mail => mail,
                    Cmd::Rcpt(_) => *codes.next().unwrap_or(&503),
                };
                t.envelope_reply(*cmd, &reply(code, &format!("{}.0.0", code / 100), "x"));
            }
            if t.mail_refused() {
                break;
            }
        }
        batches
    }

    #[test]
    fn commands_and_pipelining_batches() {
        let mut t = tx(&["a@b.test", "c@d.test"], false);
        let cmds = t.take_envelope();
        assert_eq!(cmds[0], (Cmd::Mail, b"MAIL FROM:<s@a.test>\r\n".to_vec()));
        assert_eq!(cmds[1], (Cmd::Rcpt(0), b"RCPT TO:<a@b.test>\r\n".to_vec()));
        assert_eq!(cmds[2].0, Cmd::Rcpt(1));
        let addrs: Vec<String> = (0..150).map(|i| format!("r{i}@b.test")).collect();
        let addrs: Vec<&str> = addrs.iter().map(String::as_str).collect();
        let mut t = tx(&addrs, false);
        assert_eq!(envelope(&mut t, 250, &[250; 150], true), [100, 51]);
        let mut t = tx(&addrs[..3], false);
        assert_eq!(envelope(&mut t, 250, &[250; 3], false), [1, 1, 1, 1]);
    }

    #[test]
    fn smtp_one_content_reply_for_all_accepted() {
        let mut t = tx(&["a@b.test", "bad<@b.test", "c@b.test", "d@b.test"], false);
        envelope(&mut t, 250, &[250, 550, 250], true);
        assert!(t.after_envelope().is_none());
        assert_eq!(t.content_replies(), 1);
        t.content_reply(&reply(250, "2.0.0", "queued"));
        let (o, all_ok) = t.finish();
        assert_eq!(codes(&o), ["250", "553", "550", "250"]);
        assert!(o[0].is_delivered() && all_ok);
    }

    #[test]
    fn lmtp_one_reply_per_accepted_recipient_in_order() {
        let mut t = tx(&["a@b.test", "b@b.test", "c@b.test"], true);
        envelope(&mut t, 250, &[250, 450, 250], true);
        assert!(t.after_envelope().is_none());
        assert_eq!(t.content_replies(), 2);
        t.content_reply(&reply(250, "2.0.0", "a ok"));
        t.content_reply(&reply(552, "5.2.2", "c over quota"));
        let (o, all_ok) = t.finish();
        assert_eq!(codes(&o), ["250", "450", "552"]);
        assert!(!all_ok);
    }

    #[test]
    fn lmtp_failure_midway_defers_the_rest() {
        let mut t = tx(&["a@b.test", "b@b.test", "c@b.test"], true);
        envelope(&mut t, 250, &[250, 250, 250], true);
        assert!(t.after_envelope().is_none());
        assert_eq!(
            t.content_failed("lost"),
            None,
            "nothing answered: the error is the result"
        );
        t.content_reply(&reply(250, "2.0.0", "a ok"));
        assert_eq!(t.answered(), 1);
        let o = t.content_failed("lost connection").unwrap();
        assert!(o[0].is_delivered());
        assert_eq!(
            o[1..],
            [
                RcptOutcome::Deferred {
                    reply: "lost connection".into()
                },
                RcptOutcome::Deferred {
                    reply: "lost connection".into()
                }
            ]
        );
    }

    #[test]
    fn refused_mail_is_everybodys_and_stops_the_envelope() {
        let addrs: Vec<String> = (0..150).map(|i| format!("r{i}@b.test")).collect();
        let mut addrs: Vec<&str> = addrs.iter().map(String::as_str).collect();
        addrs[0] = "bad>@b.test";
        let mut t = tx(&addrs, false);
        assert_eq!(envelope(&mut t, 550, &[], true), [100], "the second batch is not sent");
        let o = t.after_envelope().unwrap();
        assert_eq!(o.len(), 150);
        assert_eq!(o[0].reply(), "553 5.1.3 Invalid recipient address syntax");
        assert!(o[1..].iter().all(|o| o.reply() == "550 5.0.0 x"));
    }

    #[test]
    fn nobody_accepted_or_data_refused() {
        let mut t = tx(&["a@b.test", "b@b.test"], false);
        envelope(&mut t, 250, &[550, 450], true);
        assert_eq!(codes(&t.after_envelope().unwrap()), ["550", "450"]);
        let mut t = tx(&["a@b.test", "b@b.test"], false);
        envelope(&mut t, 250, &[250, 450], true);
        assert!(t.after_envelope().is_none());
        assert_eq!(codes(&t.data_refused(&reply(554, "5.0.0", "no"))), ["554", "450"]);
    }
}
