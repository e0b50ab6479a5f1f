//! Delivery Status Notifications (bounces): RFC 3464 reports in an RFC 6522
//! `multipart/report`, sent back to the reverse-path when delivery fails,
//! is delayed, or succeeded and NOTIFY asked for it (RFC 3461).
//!
//! The delivery scheduler decides *when* (see [`should_notify`] and
//! [`is_dsn`]); this module only builds the message. It never fails and
//! never panics: every field is sanitized to what its place allows.
//!
//! Choices made here:
//! - **Returned content** (RFC 3461 4.3): `RET=FULL` returns the whole
//!   original as `message/rfc822`; `RET=HDRS` only its header section as
//!   `text/rfc822-headers`. Without RET a failure report returns the whole
//!   original if it is at most [`DEFAULT_FULL_LIMIT`] octets (as Postfix
//!   does), else the headers. Delay and success reports always carry only
//!   the headers. An original that is not 8bit-clean (NUL, bare CR/LF, line
//!   over 998 octets: possible with BDAT/BINARYMIME) is never returned
//!   whole, because `message/rfc822` may not be `binary` over a plain
//!   8BITMIME path; its headers are returned instead and the text says so.
//! - **8-bit**: a returned original (or header section) with octets >= 0x80
//!   goes out unchanged under `Content-Transfer-Encoding: 8bit`, the outer
//!   multipart is labelled `8bit` too, and [`Dsn::eight_bit`] tells the
//!   sender to use `BODY=8BITMIME`. Nothing is re-encoded (RFC 2046 5.2.1
//!   forbids encoding a `message/rfc822` body other than 7bit/8bit/binary).
//! - **UTF-8 addresses**: no RFC 6533 `message/global-delivery-status`.
//!   Recipient fields stay 7-bit, using the `utf-8` address type in its
//!   `\x{HEX}` xtext form (RFC 6533 3) for non-ASCII addresses. A UTF-8
//!   reverse-path is written verbatim in `To:` (RFC 6532): the report can
//!   only reach it over SMTPUTF8 anyway, so [`Dsn::smtputf8`] is set.
//! - The human-readable part is UTF-8 in quoted-printable when it holds
//!   non-ASCII text, so it never makes the report 8-bit by itself.

mod report;

use std::fmt;

use rand::Rng;

use crate::envelope::{Notify, Ret};
use report::{
    diagnostic_code, fold_field, header_section, header_value, is_8bit_clean, mime_param, original_recipient,
    quoted_printable, rfc5322_date, safe_host, sanitize_headers, seven_bit_text, typed_address, typed_mta, wrap,
};

/// Without RET, a failure report returns the whole original up to this size
/// (octets); larger originals are returned as headers only.
pub const DEFAULT_FULL_LIMIT: usize = 50_000;

/// Comment in our `Auto-Submitted:` field that marks a report as ours.
const AUTO_SUBMITTED: &str = "auto-replied (tern-dsn)";
const AUTO_SUBMITTED_MARKER: &str = "tern-dsn";

/// Width of the human-readable text; below 76 so quoted-printable seldom
/// needs soft breaks.
const TEXT_WIDTH: usize = 72;

/// Which kind of report to send; picks the subject and the wording.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DsnKind {
    Failure,
    Delay,
    Success,
}

/// The per-recipient `Action:` of RFC 3464 2.3.3.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Failed,
    Delayed,
    Delivered,
    /// Handed to a system that does not send DSNs itself (no DSN extension).
    Relayed,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Failed => "failed",
            Action::Delayed => "delayed",
            Action::Delivered => "delivered",
            Action::Relayed => "relayed",
        }
    }

    /// The status to report when nothing better is known.
    fn default_status(self) -> &'static str {
        match self {
            Action::Failed => "5.0.0",
            Action::Delayed => "4.0.0",
            Action::Delivered | Action::Relayed => "2.0.0",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What to say about one recipient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecipientReport {
    /// Final recipient address, without brackets.
    pub address: String,
    /// ORCPT as stored, `type;address` with the xtext decoded.
    pub orcpt: Option<String>,
    pub action: Action,
    /// Enhanced status code such as `5.1.1`; see [`status_from_reply`]. An
    /// invalid value is replaced by one derived from the diagnostic.
    pub status: String,
    /// The remote reply (or our own error text), e.g. `550 5.1.1 no such user`.
    pub diagnostic: Option<String>,
    /// Remote MTA, `dns; mx1.example.test` (a bare name gets `dns;`).
    pub remote_mta: Option<String>,
    /// Unix seconds of the last attempt.
    pub last_attempt: Option<i64>,
    /// Unix seconds until which a delayed recipient will be retried.
    pub will_retry_until: Option<i64>,
}

/// Everything [`build`] needs about the message and the outcome.
#[derive(Clone, Debug)]
pub struct DsnInput<'a> {
    pub kind: DsnKind,
    /// Our hostname: Reporting-MTA, From: and Message-ID.
    pub reporting_mta: &'a str,
    /// Queue id, reported as `X-Tern-Queue-ID`.
    pub queue_id: &'a str,
    /// ENVID with the xtext decoded, reported as Original-Envelope-Id.
    pub envid: Option<&'a str>,
    /// Unix seconds when the original was accepted.
    pub arrival_date: i64,
    /// The original's reverse-path (without brackets): the report goes there.
    pub reverse_path: &'a str,
    pub ret: Option<Ret>,
    /// The original message as queued (CRLF), including our Received field.
    pub original: &'a [u8],
    pub recipients: Vec<RecipientReport>,
    /// Unix seconds, for Date: and the Message-ID.
    pub now: i64,
}

/// A built report, ready to be queued with `MAIL FROM:<>` and `RCPT TO:<reverse_path>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dsn {
    /// The whole RFC 5322 message, CRLF line ends.
    pub message: Vec<u8>,
    /// The Message-ID without angle brackets.
    pub message_id: String,
    /// The message contains 8-bit octets (a returned original): send with
    /// `BODY=8BITMIME`.
    pub eight_bit: bool,
    /// `To:` holds a UTF-8 address: send with `SMTPUTF8`.
    pub smtputf8: bool,
}

/// Whether a report of `kind` is wanted for a recipient with `notify`
/// (RFC 3461 4.1): never for the null reverse-path (a bounce never causes
/// another bounce, RFC 5321 4.5.5), never with NOTIFY=NEVER, failure and
/// delay by default, otherwise as the flags say.
///
/// The scheduler should also skip messages for which [`is_dsn`] holds.
pub fn should_notify(reverse_path: &str, kind: DsnKind, notify: &Notify) -> bool {
    let rp = reverse_path.trim();
    if rp.is_empty() || rp == "<>" || notify.never {
        return false;
    }
    if !notify.given {
        return matches!(kind, DsnKind::Failure | DsnKind::Delay);
    }
    match kind {
        DsnKind::Failure => notify.failure,
        DsnKind::Delay => notify.delay,
        DsnKind::Success => notify.success,
    }
}

/// Whether `message` is itself a delivery report: a `multipart/report` with
/// `report-type=delivery-status` (or RFC 6533 `global-delivery-status`), or
/// carrying our own `Auto-Submitted: auto-replied (tern-dsn)`. Such a
/// message must never be bounced, even if it arrived with a non-null
/// reverse-path, so report loops cannot start.
pub fn is_dsn(message: &[u8]) -> bool {
    let headers = header_section(message);
    if let Some(ct) = header_value(headers, "Content-Type") {
        let is_report = ct.trim_start().to_ascii_lowercase().starts_with("multipart/report");
        let rt = mime_param(&ct, "report-type").map(|v| v.to_ascii_lowercase());
        if is_report && matches!(rt.as_deref(), Some("delivery-status" | "global-delivery-status")) {
            return true;
        }
    }
    header_value(headers, "Auto-Submitted").is_some_and(|v| {
        let v = v.to_ascii_lowercase();
        v.starts_with("auto-replied") && v.contains(AUTO_SUBMITTED_MARKER)
    })
}

/// The status for a recipient from the remote reply: its enhanced code
/// (RFC 3463) if it has a valid one of the reply's class, else `X.0.0` from
/// the reply code, else the default for `action` (for our own errors that
/// have no reply code).
pub fn status_from_reply(reply: &str, action: Action) -> String {
    let mut t = reply.trim_start();
    if t.len() >= 5 && t.as_bytes()[..5].eq_ignore_ascii_case(b"smtp;") {
        t = t[5..].trim_start();
    }
    let b = t.as_bytes();
    let has_code =
        b.len() >= 3 && b[..3].iter().all(u8::is_ascii_digit) && matches!(b.get(3), None | Some(b' ' | b'-'));
    if has_code && matches!(b[0], b'2' | b'4' | b'5') {
        let enhanced = t.get(4..).and_then(|r| r.split_whitespace().next());
        if let Some(e) = enhanced.filter(|e| valid_status(e) && e.as_bytes()[0] == b[0]) {
            return e.to_string();
        }
        return format!("{}.0.0", b[0] as char);
    }
    action.default_status().to_string()
}

/// `status-code` of RFC 3464 2.3.4 / RFC 3463: class.subject.detail with
/// class 2, 4 or 5 and 1-3 digits each for subject and detail.
fn valid_status(s: &str) -> bool {
    let mut parts = s.split('.');
    let (Some(c), Some(sub), Some(det), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let digits = |p: &str| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit());
    matches!(c, "2" | "4" | "5") && digits(sub) && digits(det)
}

/// What the third part carries.
enum Returned<'a> {
    Full(&'a [u8]),
    Headers(Vec<u8>),
}

/// Why the original is not returned whole although it would have been.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shortened {
    No,
    TooLarge,
    NotClean,
}

/// Builds the report. See the module docs for the choices it makes.
pub fn build(input: &DsnInput) -> Dsn {
    let host = safe_host(input.reporting_mta);
    let mut rng = rand::thread_rng();
    let message_id = format!("{:x}.{:016x}@{host}", input.now.max(0), rng.gen::<u64>());
    let boundary = loop {
        let b = format!("=_tern-dsn_{:016x}{:08x}", rng.gen::<u64>(), rng.gen::<u32>());
        // The boundary must not occur in the returned content (RFC 2046 5.1.1).
        if !contains(input.original, b.as_bytes()) {
            break b;
        }
    };

    let (returned, shortened) = choose_returned(input);
    let returned_8bit = match &returned {
        Returned::Full(m) => !m.is_ascii(),
        Returned::Headers(h) => !h.is_ascii(),
    };

    // A UTF-8 reverse-path is kept verbatim (RFC 6532); strip only what could break the header.
    let to: String = input.reverse_path.trim().chars().filter(|c| !c.is_control()).collect();
    let to = to.trim_start_matches('<').trim_end_matches('>').to_string();
    let smtputf8 = !to.is_ascii();

    let subject = match input.kind {
        DsnKind::Failure => "Undelivered Mail Returned to Sender",
        DsnKind::Delay => "Delayed Mail (still being retried)",
        DsnKind::Success => "Successful Mail Delivery Report",
    };

    let mut out = Vec::with_capacity(input.original.len() + 4096);
    let mut head = String::new();
    head.push_str(&format!("From: Mail Delivery System <MAILER-DAEMON@{host}>\r\n"));
    head.push_str(&format!("To: <{to}>\r\n"));
    head.push_str(&format!("Subject: {subject}\r\n"));
    head.push_str(&format!("Date: {}\r\n", rfc5322_date(input.now)));
    head.push_str(&format!("Message-ID: <{message_id}>\r\n"));
    head.push_str(&format!("Auto-Submitted: {AUTO_SUBMITTED}\r\n"));
    head.push_str("MIME-Version: 1.0\r\n");
    head.push_str(&fold_field(
        "Content-Type",
        &format!("multipart/report; report-type=delivery-status; boundary=\"{boundary}\""),
    ));
    if returned_8bit {
        head.push_str("Content-Transfer-Encoding: 8bit\r\n");
    }
    head.push_str("\r\nThis is a MIME-encapsulated message.\r\n");
    out.extend_from_slice(head.as_bytes());

    // 1: human-readable explanation.
    let text = human_text(input, &host, &returned, shortened);
    let mut part = format!("\r\n--{boundary}\r\nContent-Description: Notification\r\n");
    if text.is_ascii() {
        part.push_str("Content-Type: text/plain; charset=us-ascii\r\n\r\n");
        part.push_str(&text);
    } else {
        part.push_str("Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n");
        part.push_str(&quoted_printable(&text));
    }
    out.extend_from_slice(part.as_bytes());

    // 2: the machine-readable report.
    let mut part = format!(
        "\r\n--{boundary}\r\nContent-Description: Delivery report\r\nContent-Type: message/delivery-status\r\n\r\n"
    );
    part.push_str(&delivery_status(input, &host));
    out.extend_from_slice(part.as_bytes());

    // 3: the original, whole or its headers.
    let cte = if returned_8bit {
        "Content-Transfer-Encoding: 8bit\r\n"
    } else {
        ""
    };
    match &returned {
        Returned::Full(m) => {
            out.extend_from_slice(
                format!(
                    "\r\n--{boundary}\r\nContent-Description: Undelivered Message\r\nContent-Type: message/rfc822\r\n{cte}\r\n"
                )
                .as_bytes(),
            );
            out.extend_from_slice(m);
        }
        Returned::Headers(h) => {
            let desc = if input.kind == DsnKind::Failure {
                "Undelivered Message Headers"
            } else {
                "Message Headers"
            };
            out.extend_from_slice(
                format!(
                    "\r\n--{boundary}\r\nContent-Description: {desc}\r\nContent-Type: text/rfc822-headers\r\n{cte}\r\n"
                )
                .as_bytes(),
            );
            out.extend_from_slice(h);
        }
    }
    // The CRLF before a delimiter belongs to it, so content is unchanged.
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());

    Dsn {
        message: out,
        message_id,
        eight_bit: returned_8bit,
        smtputf8,
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Applies the RET policy of the module docs.
fn choose_returned<'a>(input: &DsnInput<'a>) -> (Returned<'a>, Shortened) {
    let headers = || Returned::Headers(sanitize_headers(header_section(input.original)));
    let wanted_full = input.kind == DsnKind::Failure && input.ret != Some(Ret::Hdrs) && !input.original.is_empty();
    if !wanted_full {
        return (headers(), Shortened::No);
    }
    if !is_8bit_clean(input.original) {
        return (headers(), Shortened::NotClean);
    }
    if input.ret.is_none() && input.original.len() > DEFAULT_FULL_LIMIT {
        return (headers(), Shortened::TooLarge);
    }
    (Returned::Full(input.original), Shortened::No)
}

/// The `message/delivery-status` body (RFC 3464 2.1): per-message fields,
/// then one blank-line-separated group per recipient, fields in the order of
/// the RFC's grammar.
fn delivery_status(input: &DsnInput, host: &str) -> String {
    let mut s = String::new();
    if let Some(envid) = input.envid {
        s.push_str(&fold_field("Original-Envelope-Id", &seven_bit_text(envid)));
    }
    s.push_str(&format!("Reporting-MTA: dns; {host}\r\n"));
    s.push_str(&format!("Arrival-Date: {}\r\n", rfc5322_date(input.arrival_date)));
    s.push_str(&fold_field("X-Tern-Queue-ID", &seven_bit_text(input.queue_id)));
    for r in &input.recipients {
        s.push_str("\r\n");
        if let Some(orcpt) = &r.orcpt {
            s.push_str(&fold_field("Original-Recipient", &original_recipient(orcpt)));
        }
        s.push_str(&fold_field("Final-Recipient", &typed_address(&r.address)));
        s.push_str(&format!("Action: {}\r\n", r.action));
        s.push_str(&format!("Status: {}\r\n", recipient_status(r)));
        if let Some(mta) = &r.remote_mta {
            s.push_str(&fold_field("Remote-MTA", &typed_mta(mta)));
        }
        if let Some(diag) = &r.diagnostic {
            s.push_str(&fold_field("Diagnostic-Code", &diagnostic_code(diag)));
        }
        if let Some(t) = r.last_attempt {
            s.push_str(&format!("Last-Attempt-Date: {}\r\n", rfc5322_date(t)));
        }
        if let Some(t) = r.will_retry_until {
            s.push_str(&format!("Will-Retry-Until: {}\r\n", rfc5322_date(t)));
        }
    }
    s
}

/// The given status if valid, else one derived from the diagnostic.
fn recipient_status(r: &RecipientReport) -> String {
    let given = r.status.trim();
    if valid_status(given) {
        given.to_string()
    } else {
        status_from_reply(r.diagnostic.as_deref().unwrap_or(""), r.action)
    }
}

/// One line of human text: whitespace collapsed, controls dropped,
/// non-ASCII kept (the part is quoted-printable then).
fn plain(s: &str) -> String {
    s.split_whitespace()
        .map(|w| w.chars().filter(|c| !c.is_control()).collect::<String>())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The `text/plain` explanation, CRLF line ends, lines of at most
/// [`TEXT_WIDTH`] columns where the words allow.
fn human_text(input: &DsnInput, host: &str, returned: &Returned, shortened: Shortened) -> String {
    let mut t = format!("This is the mail system at host {host}.\r\n\r\n");
    let attached = match returned {
        Returned::Full(_) => "the delivery report and your original message are attached",
        Returned::Headers(_) => "the delivery report and the headers of your message are attached",
    };
    let intro = match input.kind {
        DsnKind::Failure => format!(
            "Your message could not be delivered to one or more recipients, listed below with the reason; {attached}."
        ),
        DsnKind::Delay => format!(
            "Your message has not yet been delivered to the recipients listed below. The mail system will keep \
             trying; you do not need to send it again. {}.",
            capitalize(attached)
        ),
        DsnKind::Success => format!(
            "Your message was delivered to the recipients listed below, as you asked to be told. {}.",
            capitalize(attached)
        ),
    };
    t.push_str(&wrap(&intro, TEXT_WIDTH, 0, 0));
    match shortened {
        Shortened::No => {}
        Shortened::TooLarge => t.push_str(&wrap(
            &format!("The message is larger than {DEFAULT_FULL_LIMIT} bytes, so only its headers are returned."),
            TEXT_WIDTH,
            0,
            0,
        )),
        Shortened::NotClean => t.push_str(&wrap(
            "The message contains binary content that cannot be returned as is, so only its headers are returned.",
            TEXT_WIDTH,
            0,
            0,
        )),
    }
    for r in &input.recipients {
        t.push_str("\r\n");
        let status = recipient_status(r);
        let what = match r.action {
            Action::Failed => format!("delivery failed (status {status})"),
            Action::Delayed => match r.will_retry_until {
                Some(u) => format!(
                    "delivery delayed (status {status}); will retry until {}",
                    rfc5322_date(u)
                ),
                None => format!("delivery delayed (status {status})"),
            },
            Action::Delivered => format!("delivered (status {status})"),
            Action::Relayed => {
                format!("relayed to a system that does not send delivery notifications (status {status})")
            }
        };
        t.push_str(&wrap(&format!("<{}>: {what}", plain(&r.address)), TEXT_WIDTH, 0, 4));
        if let Some(diag) = &r.diagnostic {
            let line = match &r.remote_mta {
                Some(mta) => {
                    let name = mta.split_once(';').map_or(mta.as_str(), |(_, n)| n);
                    format!("The mail server {} said: {}", plain(name), plain(diag))
                }
                None => format!("Reason: {}", plain(diag)),
            };
            t.push_str(&wrap(&line, TEXT_WIDTH, 4, 4));
        }
    }
    t
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
        .unwrap_or_default()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const ORIGINAL: &[u8] =
        b"Received: from client.example.test ([192.0.2.1])\r\n\tby mx.tern.test with ESMTP id Q1\r\n\
From: Alice <alice@example.test>\r\nTo: bob@example.net, carol@example.org\r\nSubject: Hello\r\n\
Message-ID: <orig-1@example.test>\r\n\r\nHi Bob,\r\n\r\nsee you.\r\n";

    const LONG_REPLY: &str = "550 5.1.1 <bob@example.net>: Recipient address rejected: User unknown in virtual \
mailbox table; please check the address and try again later";

    fn rcpt(address: &str, action: Action, status: &str, diag: Option<&str>) -> RecipientReport {
        RecipientReport {
            address: address.to_string(),
            orcpt: None,
            action,
            status: status.to_string(),
            diagnostic: diag.map(str::to_string),
            remote_mta: diag.map(|_| "dns; mx1.example.net".to_string()),
            last_attempt: Some(1_700_000_100),
            will_retry_until: None,
        }
    }

    fn input<'a>(
        kind: DsnKind,
        ret: Option<Ret>,
        original: &'a [u8],
        recipients: Vec<RecipientReport>,
    ) -> DsnInput<'a> {
        DsnInput {
            kind,
            reporting_mta: "mx.tern.test",
            queue_id: "Q1",
            envid: Some("env-42"),
            arrival_date: 1_700_000_000,
            reverse_path: "alice@example.test",
            ret,
            original,
            recipients,
            now: 1_700_000_200,
        }
    }

    fn failure_rcpts() -> Vec<RecipientReport> {
        let mut bob = rcpt("bob@example.net", Action::Failed, "5.1.1", Some(LONG_REPLY));
        bob.orcpt = Some("rfc822;Bob@Example.NET".to_string());
        let carol = rcpt(
            "carol@example.org",
            Action::Failed,
            "5.0.0",
            Some("554 mailbox disabled"),
        );
        vec![bob, carol]
    }

    /// Top-level header section and the parts as (part headers, body).
    fn split(msg: &[u8]) -> (String, Vec<(String, Vec<u8>)>) {
        let text = String::from_utf8_lossy(msg).into_owned();
        let (head, _) = text.split_once("\r\n\r\n").unwrap();
        let ct = header_value(head.as_bytes(), "Content-Type").unwrap();
        let boundary = mime_param(&ct, "boundary").unwrap();
        let delim = format!("\r\n--{boundary}");
        let bytes = msg;
        let mut cuts = Vec::new();
        let mut i = 0;
        while let Some(off) = bytes[i..].windows(delim.len()).position(|w| w == delim.as_bytes()) {
            cuts.push(i + off);
            i += off + delim.len();
        }
        let mut parts = Vec::new();
        for w in cuts.windows(2) {
            let start = w[0] + delim.len() + 2;
            let part = &bytes[start..w[1]];
            let sep = part.windows(4).position(|x| x == b"\r\n\r\n").unwrap();
            parts.push((
                String::from_utf8_lossy(&part[..sep + 2]).into_owned(),
                part[sep + 4..].to_vec(),
            ));
        }
        let last = *cuts.last().unwrap();
        assert_eq!(&bytes[last + delim.len()..], b"--\r\n");
        (head.to_string(), parts)
    }

    /// Invariants every report must meet, whatever the input.
    fn check_wellformed(dsn: &Dsn) {
        let m = &dsn.message;
        assert!(is_8bit_clean(m), "bare CR/LF, NUL or long line");
        assert!(m.ends_with(b"\r\n"));
        if !dsn.eight_bit && !dsn.smtputf8 {
            assert!(m.is_ascii());
        }
        let (head, parts) = split(m);
        assert_eq!(parts.len(), 3);
        for name in [
            "From",
            "To",
            "Subject",
            "Date",
            "Message-ID",
            "Auto-Submitted",
            "MIME-Version",
        ] {
            let n = head
                .lines()
                .filter(|l| l.split_once(':').is_some_and(|(k, _)| k == name))
                .count();
            assert_eq!(n, 1, "{name} in {head}");
        }
        assert!(parts[1].1.is_ascii(), "delivery-status must be 7-bit");
        assert!(parts[0].1.is_ascii(), "text part is us-ascii or quoted-printable");
        assert!(is_dsn(m));
    }

    #[test]
    fn failure_structure() {
        let dsn = build(&input(DsnKind::Failure, None, ORIGINAL, failure_rcpts()));
        check_wellformed(&dsn);
        let (head, parts) = split(&dsn.message);
        assert!(head.contains("From: Mail Delivery System <MAILER-DAEMON@mx.tern.test>\r\n"));
        assert!(head.contains("To: <alice@example.test>\r\n"));
        assert!(head.contains("Subject: Undelivered Mail Returned to Sender\r\n"));
        assert!(head.contains("Date: Tue, 14 Nov 2023 22:16:40 +0000\r\n"));
        assert!(head.contains(&format!("Message-ID: <{}>\r\n", dsn.message_id)));
        assert!(head.contains("Auto-Submitted: auto-replied (tern-dsn)\r\n"));
        assert!(head.contains("Content-Type: multipart/report; report-type=delivery-status;"));
        assert!(!head.contains("Content-Transfer-Encoding"));
        assert!(dsn.message_id.ends_with("@mx.tern.test"));
        assert!(!dsn.eight_bit && !dsn.smtputf8);

        assert!(parts[0].0.contains("Content-Type: text/plain; charset=us-ascii"));
        let text = String::from_utf8(parts[0].1.clone()).unwrap();
        assert!(text.starts_with("This is the mail system at host mx.tern.test."));
        assert!(text.contains("<bob@example.net>: delivery failed (status 5.1.1)"));
        assert!(text.contains("    The mail server mx1.example.net said: 550 5.1.1"));
        assert!(text.lines().all(|l| l.len() <= TEXT_WIDTH), "{text}");

        assert!(parts[1].0.contains("Content-Type: message/delivery-status"));
        let ds = String::from_utf8(parts[1].1.clone()).unwrap();
        let groups: Vec<&str> = ds.trim_end_matches("\r\n").split("\r\n\r\n").collect();
        assert_eq!(groups.len(), 3, "{ds}");
        assert_eq!(
            groups[0],
            "Original-Envelope-Id: env-42\r\nReporting-MTA: dns; mx.tern.test\r\n\
             Arrival-Date: Tue, 14 Nov 2023 22:13:20 +0000\r\nX-Tern-Queue-ID: Q1"
        );
        let unfolded = groups[1].replace("\r\n ", " ");
        assert_eq!(
            unfolded,
            format!(
                "Original-Recipient: rfc822;Bob@Example.NET\r\nFinal-Recipient: rfc822;bob@example.net\r\n\
                 Action: failed\r\nStatus: 5.1.1\r\nRemote-MTA: dns; mx1.example.net\r\n\
                 Diagnostic-Code: smtp; {LONG_REPLY}\r\nLast-Attempt-Date: Tue, 14 Nov 2023 22:15:00 +0000"
            )
        );
        assert!(groups[1].lines().all(|l| l.len() <= 78));
        assert!(
            groups[2].starts_with("Final-Recipient: rfc822;carol@example.org\r\nAction: failed\r\nStatus: 5.0.0\r\n")
        );

        // Small original, no RET: returned whole and byte-exact.
        assert!(parts[2].0.contains("Content-Type: message/rfc822"));
        assert_eq!(parts[2].1, ORIGINAL);
    }

    #[test]
    fn ret_policy() {
        let third = |kind, ret, orig: &[u8]| {
            let dsn = build(&input(kind, ret, orig, failure_rcpts()));
            check_wellformed(&dsn);
            let (_, parts) = split(&dsn.message);
            let ct = header_value(parts[2].0.as_bytes(), "Content-Type").unwrap();
            (ct, parts[2].1.clone(), String::from_utf8(parts[0].1.clone()).unwrap())
        };
        let headers = header_section(ORIGINAL).to_vec();
        assert_eq!(third(DsnKind::Failure, Some(Ret::Full), ORIGINAL).1, ORIGINAL);
        let (ct, body, _) = third(DsnKind::Failure, Some(Ret::Hdrs), ORIGINAL);
        assert_eq!((ct.as_str(), body), ("text/rfc822-headers", headers.clone()));
        for kind in [DsnKind::Delay, DsnKind::Success] {
            let (ct, body, _) = third(kind, Some(Ret::Full), ORIGINAL);
            assert_eq!((ct.as_str(), body), ("text/rfc822-headers", headers.clone()));
        }
        // Large original: headers by default, whole with RET=FULL.
        let mut big = ORIGINAL.to_vec();
        big.extend(b"0123456789012345678901234567890123456789\r\n".repeat(DEFAULT_FULL_LIMIT / 40));
        let (ct, body, text) = third(DsnKind::Failure, None, &big);
        assert_eq!((ct.as_str(), body), ("text/rfc822-headers", headers.clone()));
        assert!(text.contains("larger than 50000 bytes"), "{text}");
        assert_eq!(third(DsnKind::Failure, Some(Ret::Full), &big).1, big);
        // Binary content is never returned whole.
        let mut bin = ORIGINAL.to_vec();
        bin.extend(b"a\0b\nc\r\n");
        let (ct, _, text) = third(DsnKind::Failure, Some(Ret::Full), &bin);
        assert_eq!(ct, "text/rfc822-headers");
        assert!(text.contains("binary content"));
    }

    #[test]
    fn delay_and_success() {
        let mut r = rcpt(
            "bob@example.net",
            Action::Delayed,
            "",
            Some("451 4.7.1 greylisted, try later"),
        );
        r.will_retry_until = Some(1_700_432_000);
        let dsn = build(&input(DsnKind::Delay, None, ORIGINAL, vec![r]));
        check_wellformed(&dsn);
        let (head, parts) = split(&dsn.message);
        assert!(head.contains("Subject: Delayed Mail (still being retried)\r\n"));
        let ds = String::from_utf8(parts[1].1.clone()).unwrap();
        assert!(ds.contains("Action: delayed\r\nStatus: 4.7.1\r\n"), "{ds}");
        assert!(ds.contains("Will-Retry-Until: Sun, 19 Nov 2023 22:13:20 +0000\r\n"));
        let text = String::from_utf8(parts[0].1.clone()).unwrap();
        assert!(text.contains("will retry until"));

        let r = RecipientReport {
            remote_mta: Some("mx1.example.net".to_string()),
            ..rcpt(
                "bob@example.net",
                Action::Delivered,
                "2.0.0",
                Some("250 2.0.0 Ok: queued as X"),
            )
        };
        let relayed = rcpt("carol@example.org", Action::Relayed, "2.0.0", None);
        let dsn = build(&input(DsnKind::Success, None, ORIGINAL, vec![r, relayed]));
        check_wellformed(&dsn);
        let (head, parts) = split(&dsn.message);
        assert!(head.contains("Subject: Successful Mail Delivery Report\r\n"));
        let ds = String::from_utf8(parts[1].1.clone()).unwrap();
        assert!(ds.contains("Action: delivered\r\nStatus: 2.0.0\r\nRemote-MTA: dns; mx1.example.net\r\n"));
        assert!(ds.contains("Action: relayed\r\n"));
    }

    #[test]
    fn status_derivation() {
        let f = |r: &str, a| status_from_reply(r, a);
        assert_eq!(f("550 5.1.1 no such user", Action::Failed), "5.1.1");
        assert_eq!(
            f("550-5.7.26 unauthenticated\r\n550 5.7.26 see", Action::Failed),
            "5.7.26"
        );
        assert_eq!(f("550 no such user", Action::Failed), "5.0.0");
        assert_eq!(f("550 4.1.1 class mismatch", Action::Failed), "5.0.0");
        assert_eq!(f("550 5.1234.1 bad subject", Action::Failed), "5.0.0");
        assert_eq!(f("452 4.2.2 full", Action::Delayed), "4.2.2");
        assert_eq!(f("421", Action::Delayed), "4.0.0");
        assert_eq!(f("250 2.6.0 ok", Action::Delivered), "2.6.0");
        assert_eq!(f("250 ok", Action::Delivered), "2.0.0");
        assert_eq!(f("smtp; 554 5.7.1 spam", Action::Failed), "5.7.1");
        assert_eq!(f("connect to mx: Connection refused", Action::Delayed), "4.0.0");
        assert_eq!(f("", Action::Failed), "5.0.0");
        assert_eq!(f("", Action::Relayed), "2.0.0");
        assert_eq!(f("354 go ahead", Action::Failed), "5.0.0");
        assert_eq!(f("5\u{e9}0 x", Action::Failed), "5.0.0");
        assert!(valid_status("5.1.1") && valid_status("4.999.999"));
        assert!(!valid_status("3.1.1") && !valid_status("5.1") && !valid_status("5.1.1.1") && !valid_status("5..1"));

        // An invalid status in the report is replaced from the diagnostic.
        let r = rcpt("bob@example.net", Action::Failed, "bogus", Some("550 5.2.2 full"));
        assert_eq!(recipient_status(&r), "5.2.2");
        let r = rcpt("bob@example.net", Action::Failed, " 5.1.10 ", None);
        assert_eq!(recipient_status(&r), "5.1.10");
    }

    #[test]
    fn notify_semantics() {
        let absent = Notify::default();
        let never = Notify {
            given: true,
            never: true,
            ..Notify::default()
        };
        let success_only = Notify {
            given: true,
            success: true,
            ..Notify::default()
        };
        let all = Notify {
            given: true,
            never: false,
            success: true,
            failure: true,
            delay: true,
        };
        let rp = "alice@example.test";
        assert!(should_notify(rp, DsnKind::Failure, &absent));
        assert!(should_notify(rp, DsnKind::Delay, &absent));
        assert!(!should_notify(rp, DsnKind::Success, &absent));
        for k in [DsnKind::Failure, DsnKind::Delay, DsnKind::Success] {
            assert!(!should_notify(rp, k, &never));
            assert!(should_notify(rp, k, &all));
            assert_eq!(should_notify(rp, k, &success_only), k == DsnKind::Success);
            for null in ["", "  ", "<>"] {
                assert!(!should_notify(null, k, &all));
                assert!(!should_notify(null, k, &absent));
            }
        }
    }

    #[test]
    fn dsn_detection() {
        assert!(!is_dsn(ORIGINAL));
        assert!(!is_dsn(b""));
        assert!(is_dsn(
            b"Subject: x\r\nContent-Type: multipart/report;\r\n report-type=\"Delivery-Status\"; boundary=b\r\n\r\n"
        ));
        assert!(is_dsn(
            b"Content-Type: multipart/report; report-type=global-delivery-status\r\n\r\n"
        ));
        assert!(!is_dsn(
            b"Content-Type: multipart/report; report-type=disposition-notification\r\n\r\n"
        ));
        assert!(is_dsn(b"auto-submitted: Auto-Replied (tern-dsn)\r\n\r\n"));
        // Someone else's auto-reply (a vacation message) may still bounce.
        assert!(!is_dsn(b"Auto-Submitted: auto-replied\r\n\r\n"));
        // Only the header section counts.
        assert!(!is_dsn(
            b"Subject: x\r\n\r\nAuto-Submitted: auto-replied (tern-dsn)\r\n"
        ));
    }

    #[test]
    fn eight_bit_original() {
        let orig = "Received: by mx.tern.test\r\nSubject: Gr\u{fc}\u{df}e\r\n\r\nK\u{e4}se\r\n".as_bytes();
        let r = rcpt(
            "bob@example.net",
            Action::Failed,
            "5.1.1",
            Some("550 5.1.1 Benutzer unbekannt: b\u{f6}b"),
        );
        let dsn = build(&input(DsnKind::Failure, Some(Ret::Full), orig, vec![r.clone()]));
        check_wellformed(&dsn);
        assert!(dsn.eight_bit && !dsn.smtputf8);
        let (head, parts) = split(&dsn.message);
        assert!(head.ends_with("\r\nContent-Transfer-Encoding: 8bit"));
        assert!(parts[2].0.contains("Content-Transfer-Encoding: 8bit\r\n"));
        assert_eq!(parts[2].1, orig);
        // Non-ASCII diagnostic: escaped in the report, quoted-printable in the text.
        let ds = String::from_utf8(parts[1].1.clone()).unwrap();
        assert!(
            ds.contains("Diagnostic-Code: smtp; 550 5.1.1 Benutzer unbekannt: b\\x{F6}b\r\n"),
            "{ds}"
        );
        assert!(parts[0].0.contains("charset=utf-8") && parts[0].0.contains("quoted-printable"));
        let qp = String::from_utf8_lossy(&parts[0].1).replace("=\r\n", "");
        assert!(qp.contains("b=C3=B6b"), "{qp}");

        // Headers only: still 8bit if the header section is.
        let dsn = build(&input(DsnKind::Failure, Some(Ret::Hdrs), orig, vec![r]));
        check_wellformed(&dsn);
        assert!(dsn.eight_bit);
    }

    #[test]
    fn utf8_addresses() {
        let mut r = rcpt(
            "j\u{f6}rg@b\u{fc}cher.test",
            Action::Failed,
            "5.1.1",
            Some("550 5.1.1 unknown"),
        );
        r.orcpt = Some("utf-8;j\u{f6}rg@b\u{fc}cher.test".to_string());
        let mut inp = input(DsnKind::Failure, Some(Ret::Hdrs), ORIGINAL, vec![r]);
        inp.reverse_path = "\u{e1}lice@example.test";
        let dsn = build(&inp);
        check_wellformed(&dsn);
        assert!(dsn.smtputf8 && !dsn.eight_bit);
        let (head, parts) = split(&dsn.message);
        assert!(head.contains("To: <\u{e1}lice@example.test>\r\n"));
        let ds = String::from_utf8(parts[1].1.clone()).unwrap();
        assert!(ds.contains("Original-Recipient: utf-8;j\\x{F6}rg@b\\x{FC}cher.test\r\n"));
        assert!(ds.contains("Final-Recipient: utf-8;j\\x{F6}rg@b\\x{FC}cher.test\r\n"));
    }

    #[test]
    fn odd_input_never_breaks_the_report() {
        let long_line = [b"Subject: ".as_slice(), &[b'x'; 5000], b"\r\n\r\nbody\r\n"].concat();
        let originals: Vec<&[u8]> = vec![
            b"",
            b"\r\n",
            b"\r\nbody only\r\n",
            b"Subject: no separator",
            b"Subject: no separator\r\nX: y\r\n",
            b"Subject: bare\nLF\n\nbody\n",
            b"Subject: \0nul\r\n\r\n\xff\xfe",
            &long_line,
        ];
        let nasty = RecipientReport {
            address: "evil@x\r\nBcc: victim@y".to_string(),
            orcpt: Some(";\r\n".to_string()),
            action: Action::Failed,
            status: "".to_string(),
            diagnostic: Some(format!("\u{7}\r\n{}\u{1F600}", "z".repeat(3000))),
            remote_mta: Some(";".to_string()),
            last_attempt: Some(i64::MIN),
            will_retry_until: Some(i64::MAX),
        };
        for orig in originals {
            for ret in [None, Some(Ret::Full), Some(Ret::Hdrs)] {
                for kind in [DsnKind::Failure, DsnKind::Delay, DsnKind::Success] {
                    for rcpts in [vec![], vec![nasty.clone()], failure_rcpts()] {
                        let mut inp = input(kind, ret, orig, rcpts);
                        inp.reporting_mta = "bad host\r\nX-Injected: 1";
                        inp.reverse_path = "a@b\r\nBcc: c@d";
                        inp.envid = Some("e\r\nX-Injected: 2");
                        inp.queue_id = "";
                        let dsn = build(&inp);
                        check_wellformed(&dsn);
                        let text = String::from_utf8_lossy(&dsn.message);
                        assert!(!text.contains("\r\nX-Injected") && !text.contains("\r\nBcc"), "{text}");
                    }
                }
            }
        }
    }

    #[test]
    fn boundary_avoids_content() {
        let dsn = build(&input(DsnKind::Failure, Some(Ret::Full), ORIGINAL, failure_rcpts()));
        let (head, _) = split(&dsn.message);
        let b = mime_param(&header_value(head.as_bytes(), "Content-Type").unwrap(), "boundary").unwrap();
        assert!(b.starts_with("=_tern-dsn_"));
        let a = build(&input(DsnKind::Failure, Some(Ret::Full), ORIGINAL, failure_rcpts()));
        assert_ne!(a.message_id, dsn.message_id);
    }

    /// Feeds generated reports to independent parsers: Python's `email`
    /// package and `flufl.bounce` (Mailman's bounce detector). Needs
    /// `python3` with `pip install flufl.bounce`; set TERN_SKIP_PYTHON=1 to
    /// skip where that is unavailable.
    #[test]
    fn python_parsers_agree() {
        if std::env::var_os("TERN_SKIP_PYTHON").is_some() {
            eprintln!("skipped: TERN_SKIP_PYTHON set");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, dsn: Dsn| std::fs::write(dir.path().join(name), dsn.message).unwrap();
        write(
            "failure.eml",
            build(&input(DsnKind::Failure, Some(Ret::Full), ORIGINAL, failure_rcpts())),
        );
        write(
            "failure_hdrs.eml",
            build(&input(DsnKind::Failure, Some(Ret::Hdrs), ORIGINAL, failure_rcpts())),
        );
        let mut r = rcpt(
            "bob@example.net",
            Action::Delayed,
            "4.7.1",
            Some("451 4.7.1 greylisted, try later"),
        );
        r.will_retry_until = Some(1_700_432_000);
        write("delay.eml", build(&input(DsnKind::Delay, None, ORIGINAL, vec![r])));
        let r = rcpt(
            "bob@example.net",
            Action::Delivered,
            "2.0.0",
            Some("250 2.0.0 Ok: queued as X"),
        );
        write(
            "success.eml",
            build(&input(DsnKind::Success, Some(Ret::Full), ORIGINAL, vec![r])),
        );
        let orig8 = "Received: by mx.tern.test\r\nSubject: Gr\u{fc}\u{df}e\r\nMIME-Version: 1.0\r\n\
                     Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nK\u{e4}se\r\n"
            .as_bytes();
        let r = rcpt(
            "bob@example.net",
            Action::Failed,
            "5.1.1",
            Some("550 5.1.1 Benutzer unbekannt: b\u{f6}b"),
        );
        write(
            "eightbit.eml",
            build(&input(DsnKind::Failure, Some(Ret::Full), orig8, vec![r])),
        );

        let out = std::process::Command::new("python3")
            .arg("-c")
            .arg(PY_CHECK)
            .arg(dir.path())
            .arg(LONG_REPLY)
            .output()
            .expect("python3 must be installed (or set TERN_SKIP_PYTHON=1)");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "python check failed:\n{stdout}\n{stderr}");
        assert!(stdout.contains("5 reports OK"), "{stdout}\n{stderr}");
    }

    const PY_CHECK: &str = r#"
import email, sys
from email import policy
from flufl.bounce import all_failures, scan_message

d, long_reply = sys.argv[1], sys.argv[2]

def load(name, pol):
    with open(f"{d}/{name}", "rb") as f:
        return email.message_from_binary_file(f, policy=pol)

# flufl.bounce reports the Original-Recipient where there is one, as it should.
BOB = ("rfc822;bob@example.net", "failed", "5.1.1", "smtp; " + long_reply, "dns; mx1.example.net", "Bob@Example.NET")
CAROL = ("rfc822;carol@example.org", "failed", "5.0.0", "smtp; 554 mailbox disabled", "dns; mx1.example.net")
CASES = {
    "failure.eml": ("Undelivered Mail Returned to Sender", "message/rfc822", [BOB, CAROL]),
    "failure_hdrs.eml": ("Undelivered Mail Returned to Sender", "text/rfc822-headers", [BOB, CAROL]),
    "delay.eml": ("Delayed Mail (still being retried)", "text/rfc822-headers",
                  [("rfc822;bob@example.net", "delayed", "4.7.1", "smtp; 451 4.7.1 greylisted, try later",
                    "dns; mx1.example.net")]),
    "success.eml": ("Successful Mail Delivery Report", "text/rfc822-headers",
                    [("rfc822;bob@example.net", "delivered", "2.0.0", "smtp; 250 2.0.0 Ok: queued as X",
                      "dns; mx1.example.net")]),
    "eightbit.eml": ("Undelivered Mail Returned to Sender", "message/rfc822",
                     [("rfc822;bob@example.net", "failed", "5.1.1",
                       "smtp; 550 5.1.1 Benutzer unbekannt: b\\x{F6}b", "dns; mx1.example.net")]),
}

for name, (subject, third, rcpts) in CASES.items():
    m = load(name, policy.default)
    for p in m.walk():
        assert not p.defects, (name, p.get_content_type(), p.defects)
    assert m.get_content_type() == "multipart/report", name
    assert m.get_param("report-type") == "delivery-status", name
    assert m["Subject"] == subject, (name, m["Subject"])
    assert m["From"].addresses[0].addr_spec == "MAILER-DAEMON@mx.tern.test", name
    assert m["To"].addresses[0].addr_spec == "alice@example.test", name
    assert m["Auto-Submitted"].startswith("auto-replied"), name
    assert m["Date"].datetime.year == 2023, name
    parts = m.get_payload()
    types = [p.get_content_type() for p in parts]
    assert types == ["text/plain", "message/delivery-status", third], (name, types)
    text = parts[0].get_content()
    assert "This is the mail system at host mx.tern.test." in text, (name, text)
    blocks = parts[1].get_payload()
    assert len(blocks) == 1 + len(rcpts), (name, len(blocks))
    assert blocks[0]["Reporting-MTA"] == "dns; mx.tern.test", name
    assert blocks[0]["X-Tern-Queue-ID"] == "Q1", name
    assert blocks[0]["Original-Envelope-Id"] == "env-42", name
    for b, (final, action, status, diag, remote, *_) in zip(blocks[1:], rcpts):
        got = (b["Final-Recipient"], b["Action"], b["Status"], b["Diagnostic-Code"], b["Remote-MTA"])
        assert got == (final, action, status, diag, remote), (name, got)
    if third == "message/rfc822":
        inner = parts[2].get_content()
        assert inner["Received"], name
        body = inner.get_content()
        if name == "eightbit.eml":
            assert inner["Subject"] == "Gr\u00fc\u00dfe", inner["Subject"]
            assert "K\u00e4se" in body, body
            assert "b\u00f6b" in text, text
        else:
            assert inner["Subject"] == "Hello" and "Hi Bob," in body, name
    else:
        hdrs = parts[2].get_content()
        assert "Subject: Hello" in hdrs and "Hi Bob" not in hdrs, (name, hdrs)

    # flufl.bounce expects the legacy Message API, as Mailman uses it.
    legacy = load(name, policy.compat32)
    temp, perm = all_failures(legacy)
    reported = lambda r: (r[5] if len(r) > 5 else r[0].split(";", 1)[1]).encode()
    want = {reported(r) for r in rcpts if r[1] == "failed"}
    assert scan_message(legacy) == want, (name, scan_message(legacy))
    assert perm == want, (name, perm)
    want_temp = {reported(r) for r in rcpts if r[1] == "delayed"}
    assert temp == want_temp, (name, temp)

print(f"{len(CASES)} reports OK")
"#;
}
