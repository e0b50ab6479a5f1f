//! ARF, the Abuse Reporting Format (RFC 5965): a `multipart/report;
//! report-type=feedback-report` whose second part (`message/feedback-report`)
//! holds header-like fields (`Feedback-Type`, `Original-Rcpt-To`, ...) and
//! whose third part is the reported message (`message/rfc822`) or its
//! header (`text/rfc822-headers`).
//!
//! [`parse`] is pure and total: any bytes give a [`Report`] or an
//! [`ArfError`], never a panic. mail-parser splits the MIME structure and
//! decodes transfer encodings; the report's fields and the original's
//! header block are read here. Bounds: only the first [`MAX_REPORT_BYTES`]
//! are looked at (the fields and the original's header come first; the
//! original's body is not needed), at most [`MAX_FIELDS`] fields of a
//! block are kept, each value cut to [`MAX_VALUE`] bytes.
//!
//! From the original, Tern's own Received field (`by <host> (Tern) with
//! ESMTP id <queue id>`, see tern-smtp's session) gives the queue id of the
//! message the complaint is about.

use std::borrow::Cow;

use mail_parser::{MessageParser, MimeHeaders, PartType};

/// Bytes of a report that are parsed; the rest is ignored.
pub const MAX_REPORT_BYTES: usize = 1 << 20;
/// Fields kept from one header block.
pub const MAX_FIELDS: usize = 200;
/// Bytes kept of one field's value.
pub const MAX_VALUE: usize = 512;

/// Why a message is not a usable feedback report.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ArfError {
    #[error("not a MIME message")]
    NotMessage,
    #[error("no message/feedback-report part")]
    NoFeedbackReport,
    #[error("the feedback report has no Feedback-Type field")]
    NoFeedbackType,
}

/// What a feedback report says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// `Feedback-Type`, lowercased (`abuse`, `fraud`, `not-spam`, ...).
    pub feedback_type: String,
    /// `User-Agent` of the reporting system.
    pub user_agent: String,
    /// `Version` (1 for RFC 5965).
    pub version: String,
    /// `Original-Rcpt-To` as an address (lowercase), when present and not redacted.
    pub original_rcpt_to: Option<String>,
    /// `Original-Mail-From` as an address (lowercase); `Some("")` for `<>`.
    pub original_mail_from: Option<String>,
    /// `Source-IP`: the address the reported message came from.
    pub source_ip: String,
    /// `Arrival-Date`, as written.
    pub arrival_date: String,
    /// `Reported-Domain` fields.
    pub reported_domains: Vec<String>,
    /// The report's own `From` address (the provider's FBL robot).
    pub reporter: String,
    /// The reported message (or its header), if the report carries it.
    pub original: Option<Original>,
}

/// What is read from the reported message's header.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Original {
    /// `Message-ID`, without angle brackets.
    pub message_id: String,
    /// The queue id from the topmost Received field Tern wrote, if any.
    pub queue_id: Option<String>,
    /// Addresses of `To` (lowercase), redacted ones left out; `to_count`
    /// counts every address the field named.
    pub to: Vec<String>,
    pub to_count: usize,
    /// `Return-Path`, else the `From` address (lowercase).
    pub sender: Option<String>,
}

impl Report {
    /// The complained-about recipient: `Original-Rcpt-To`, else the
    /// original's `To` when it names exactly one (unredacted) address.
    pub fn recipient(&self) -> Option<&str> {
        if let Some(rcpt) = &self.original_rcpt_to {
            return Some(rcpt);
        }
        let original = self.original.as_ref()?;
        match original.to.as_slice() {
            [only] if original.to_count == 1 => Some(only),
            _ => None,
        }
    }

    /// The reported message's sender: `Original-Mail-From`, else the
    /// original's `Return-Path` or `From`.
    pub fn sender(&self) -> Option<&str> {
        self.original_mail_from
            .as_deref()
            .filter(|s| !s.is_empty())
            .or_else(|| self.original.as_ref()?.sender.as_deref())
    }
}

/// Parses a feedback report (the whole message, header included).
pub fn parse(message: &[u8]) -> Result<Report, ArfError> {
    let message = &message[..message.len().min(MAX_REPORT_BYTES)];
    let parsed = MessageParser::new().parse(message).ok_or(ArfError::NotMessage)?;
    let mut feedback: Option<Vec<u8>> = None;
    let mut original: Option<Cow<'_, [u8]>> = None;
    // parts[0] is the root; a single-part message is never a report.
    for part in parsed.parts.iter().skip(1) {
        if part.is_content_type("message", "feedback-report") {
            if feedback.is_none() {
                feedback = Some(body_bytes(&part.body).into_owned());
            }
            continue;
        }
        if original.is_some() {
            continue;
        }
        let headers_only =
            part.is_content_type("text", "rfc822-headers") || part.is_content_type("message", "rfc822-headers");
        if headers_only || part.is_content_type("message", "rfc822") || matches!(part.body, PartType::Message(_)) {
            original = Some(body_bytes(&part.body));
        }
    }
    let feedback = feedback.ok_or(ArfError::NoFeedbackReport)?;
    let mut report = Report {
        reporter: parsed
            .from()
            .and_then(|a| a.first())
            .and_then(|a| a.address())
            .map(clip)
            .unwrap_or_default()
            .to_lowercase(),
        ..Report::default()
    };
    for (name, value) in fields(&feedback, false) {
        match name.to_ascii_lowercase().as_str() {
            "feedback-type" if report.feedback_type.is_empty() => report.feedback_type = value.to_ascii_lowercase(),
            "user-agent" if report.user_agent.is_empty() => report.user_agent = value,
            "version" if report.version.is_empty() => report.version = value,
            "original-rcpt-to" if report.original_rcpt_to.is_none() => report.original_rcpt_to = address(&value),
            "original-mail-from" if report.original_mail_from.is_none() => {
                report.original_mail_from = if value.trim() == "<>" {
                    Some(String::new())
                } else {
                    address(&value)
                }
            }
            "source-ip" if report.source_ip.is_empty() => report.source_ip = value,
            "arrival-date" | "received-date" if report.arrival_date.is_empty() => report.arrival_date = value,
            "reported-domain" if report.reported_domains.len() < 10 => report.reported_domains.push(value),
            _ => {}
        }
    }
    if report.feedback_type.is_empty() {
        return Err(ArfError::NoFeedbackType);
    }
    report.original = original.map(|bytes| read_original(&bytes));
    Ok(report)
}

/// The bytes of a part's (decoded) body.
fn body_bytes<'a>(body: &'a PartType<'_>) -> Cow<'a, [u8]> {
    match body {
        PartType::Text(t) | PartType::Html(t) => Cow::Borrowed(t.as_bytes()),
        PartType::Binary(b) | PartType::InlineBinary(b) => Cow::Borrowed(b.as_ref()),
        PartType::Message(m) => Cow::Borrowed(m.raw_message()),
        PartType::Multipart(_) => Cow::Borrowed(&[]),
    }
}

/// Reads the reported message's header block.
fn read_original(bytes: &[u8]) -> Original {
    let mut original = Original::default();
    let header = fields(bytes, true);
    for (name, value) in &header {
        if name.eq_ignore_ascii_case("message-id") && original.message_id.is_empty() {
            original.message_id = value.trim().trim_matches(['<', '>']).trim().to_owned();
        } else if name.eq_ignore_ascii_case("received") && original.queue_id.is_none() {
            original.queue_id = tern_queue_id(value);
        }
    }
    // Addresses with display names, quoting and groups: mail-parser's job.
    // The header block alone is enough (and keeps a body out of it).
    let end = header_end(bytes);
    if let Some(parsed) = MessageParser::new().parse_headers(&bytes[..end]) {
        if let Some(to) = parsed.to() {
            for a in to.iter() {
                original.to_count += 1;
                if let Some(addr) = a.address().and_then(address) {
                    original.to.push(addr);
                }
            }
        }
        original.sender = parsed
            .return_address()
            .and_then(address)
            .or_else(|| parsed.from()?.first()?.address().and_then(address));
    }
    original
}

/// The queue id in a Received field Tern wrote: `... (Tern) with ESMTP id <ID> ...`.
pub fn tern_queue_id(received: &str) -> Option<String> {
    const MARK: &str = "(Tern) with ";
    let at = received.find(MARK)?;
    let mut words = received[at + MARK.len()..].split_whitespace();
    let _protocol = words.next()?;
    if !words.next()?.eq_ignore_ascii_case("id") {
        return None;
    }
    let id = words.next()?.trim_end_matches(';');
    (!id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric())).then(|| id.to_owned())
}

/// Offset just past a header block: after its empty line, else the end.
fn header_end(bytes: &[u8]) -> usize {
    let crlf = bytes.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4);
    let lf = bytes.windows(2).position(|w| w == b"\n\n").map(|p| p + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => a.or(b).unwrap_or(bytes.len()),
    }
}

/// Unfolded `name: value` fields of a header block. With `stop_at_blank`
/// the block ends at its first empty line (a message's header); without,
/// empty lines are skipped (a feedback-report part holds fields only).
/// Lines that are not fields are skipped.
fn fields(bytes: &[u8], stop_at_blank: bool) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(bytes);
    let mut out: Vec<(String, String)> = Vec::new();
    let mut started = false;
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() {
            if stop_at_blank && started {
                break;
            }
            continue;
        }
        started = true;
        if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = out.last_mut() {
                if value.len() < MAX_VALUE {
                    value.push(' ');
                    value.push_str(line.trim());
                    *value = clip(value).to_owned();
                }
            }
            continue;
        }
        if out.len() >= MAX_FIELDS {
            // Keep reading only to find the block's end.
            continue;
        }
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if name.is_empty() || name.len() > 76 || !name.bytes().all(|b| b.is_ascii_graphic()) {
            continue;
        }
        out.push((name.to_owned(), clip(value.trim()).to_owned()));
    }
    out
}

/// `s` cut to at most [`MAX_VALUE`] bytes, on a character boundary.
fn clip(s: &str) -> &str {
    if s.len() <= MAX_VALUE {
        return s;
    }
    let mut end = MAX_VALUE;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// An address field value as a lowercase address: `rfc822;` prefixes and
/// angle brackets removed. `None` for what is not one address, and for
/// redacted ones: providers replace the local part with `redacted`, a run
/// of `x` or `*`, or write `[redacted]`.
pub fn address(value: &str) -> Option<String> {
    let v = value.trim();
    let v = match v.split_once(';') {
        Some((kind, rest)) if kind.trim().eq_ignore_ascii_case("rfc822") => rest,
        _ => v,
    };
    let v = v.trim().trim_start_matches('<').trim_end_matches('>').trim();
    if v.len() > 320
        || v.chars()
            .any(|c| c.is_whitespace() || c.is_control() || "<>,;[]\"()\\".contains(c))
    {
        return None;
    }
    let (local, domain) = v.rsplit_once('@')?;
    if local.is_empty()
        || domain.is_empty()
        || !domain.split('.').all(|l| !l.is_empty())
        || !domain
            .chars()
            .all(|c| c.is_alphanumeric() || c == '-' || c == '.' || c == '_')
    {
        return None;
    }
    let redacted =
        local.eq_ignore_ascii_case("redacted") || local.chars().all(|c| c == 'x' || c == 'X' || c == '*' || c == '.');
    if redacted {
        return None;
    }
    Some(v.to_lowercase())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// The samples the end-to-end tests send, in node/tests/e2e/fbl/.
    fn sample(name: &str) -> Vec<u8> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/e2e/fbl")
            .join(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    #[test]
    fn yahoo_style_report_with_the_whole_original() {
        let r = parse(&sample("yahoo.eml")).unwrap();
        assert_eq!(r.feedback_type, "abuse");
        assert_eq!(r.version, "1");
        assert_eq!(r.user_agent, "Yahoo!-Mail-Feedback/2.0");
        assert_eq!(r.original_rcpt_to.as_deref(), Some("complainer@yahoo.example"));
        assert_eq!(r.original_mail_from.as_deref(), Some("bounces@news.shop.test"));
        assert_eq!(r.source_ip, "192.0.2.25");
        assert_eq!(r.arrival_date, "Sun, 06 Dec 2026 21:14:03 +0000");
        assert_eq!(r.reported_domains, ["news.shop.test"]);
        assert_eq!(r.reporter, "feedback@arf.mail.yahoo.example");
        let o = r.original.as_ref().unwrap();
        assert_eq!(o.message_id, "weekly-2026-49.a81f@news.shop.test");
        assert_eq!(o.queue_id.as_deref(), Some("19AF5E2C1A80001000A3B"));
        assert_eq!(r.recipient(), Some("complainer@yahoo.example"));
        assert_eq!(r.sender(), Some("bounces@news.shop.test"));
    }

    #[test]
    fn microsoft_jmrp_style_report_received_over_tls() {
        let r = parse(&sample("microsoft-jmrp.eml")).unwrap();
        assert_eq!(r.feedback_type, "abuse");
        assert_eq!(r.original_rcpt_to.as_deref(), Some("someone@outlook.example"));
        assert_eq!(r.source_ip, "198.51.100.7");
        let o = r.original.as_ref().unwrap();
        assert_eq!(o.queue_id.as_deref(), Some("19AF5E2D0B10002000C11"), "ESMTPS id");
        assert_eq!(o.message_id, "order-5512@billing.shop.test");
    }

    #[test]
    fn aol_style_report_with_headers_only() {
        let r = parse(&sample("aol-headers.eml")).unwrap();
        assert_eq!(r.feedback_type, "abuse");
        assert_eq!(r.user_agent, "AOL SComp");
        let o = r.original.as_ref().unwrap();
        assert_eq!(o.queue_id.as_deref(), Some("19AF5E2E77F0003000D20"));
        assert_eq!(o.message_id, "promo-77@deals.shop.test");
        assert_eq!(r.recipient(), Some("buyer@aol.example"));
    }

    #[test]
    fn redacted_recipient_falls_back_to_the_original_to() {
        let r = parse(&sample("redacted-to.eml")).unwrap();
        assert_eq!(r.original_rcpt_to, None, "redacted@ is not an address to suppress");
        assert_eq!(r.recipient(), Some("reader@mail.example"));
        // No Original-Mail-From: the original's Return-Path.
        assert_eq!(r.sender(), Some("bounces@news.shop.test"));
    }

    #[test]
    fn redacted_everywhere_has_no_recipient() {
        let r = parse(&sample("redacted-none.eml")).unwrap();
        assert_eq!(r.feedback_type, "abuse");
        assert_eq!(r.recipient(), None);
        assert_eq!(
            r.original.as_ref().unwrap().queue_id.as_deref(),
            Some("19AF5E2F00A0001000E01")
        );
    }

    #[test]
    fn malformed_reports_are_errors() {
        assert_eq!(parse(&sample("malformed.eml")), Err(ArfError::NoFeedbackReport));
        assert_eq!(parse(b""), Err(ArfError::NotMessage));
        let no_type = b"From: a@b.test\r\nContent-Type: multipart/report; report-type=feedback-report; boundary=\"b\"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n--b\r\nContent-Type: message/feedback-report\r\n\r\nVersion: 1\r\n--b--\r\n";
        assert_eq!(parse(no_type), Err(ArfError::NoFeedbackType));
    }

    #[test]
    fn addresses() {
        assert_eq!(address("rfc822; Bob@Example.TEST").as_deref(), Some("bob@example.test"));
        assert_eq!(address("<bob@example.test>").as_deref(), Some("bob@example.test"));
        assert_eq!(address("redacted@example.test"), None);
        assert_eq!(address("xxxxxxxx@example.test"), None);
        assert_eq!(address("[redacted]"), None);
        assert_eq!(address("bob"), None);
        assert_eq!(address("bob@"), None);
        assert_eq!(address("a b@example.test"), None);
        assert_eq!(address("a@b..test"), None);
    }

    #[test]
    fn queue_ids_from_received_fields() {
        let f = "from c.test ([192.0.2.1]) by mx1.tern.test (Tern) with ESMTPSA id 19AF5E2C1A80001000A3B (using TLSv1.3 with cipher X); Sun, 6 Dec 2026 21:00:00 +0000";
        assert_eq!(tern_queue_id(f).as_deref(), Some("19AF5E2C1A80001000A3B"));
        assert_eq!(tern_queue_id("from x by y (Postfix) with ESMTP id 4XyZ"), None);
        assert_eq!(tern_queue_id("by y (Tern) with ESMTP id"), None);
        assert_eq!(tern_queue_id("by y (Tern) with ESMTP id ../../etc"), None);
    }

    /// Every sample cut at every few bytes, and with bytes flipped, parses
    /// or errs without panicking.
    #[test]
    fn truncated_and_garbled_samples_never_panic() {
        for name in [
            "yahoo.eml",
            "microsoft-jmrp.eml",
            "aol-headers.eml",
            "redacted-to.eml",
            "redacted-none.eml",
            "malformed.eml",
        ] {
            let bytes = sample(name);
            for end in (0..bytes.len()).step_by(7) {
                let _ = parse(&bytes[..end]);
            }
            let mut seed = 0x9E37_79B9_7F4A_7C15_u64;
            for _ in 0..300 {
                let mut garbled = bytes.clone();
                for _ in 0..8 {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let at = (seed % garbled.len() as u64) as usize;
                    garbled[at] = (seed >> 32) as u8;
                }
                let _ = parse(&garbled);
            }
        }
        // Long fields and deep nesting are bounded too.
        let long = format!(
            "Content-Type: multipart/report; boundary=b\r\n\r\n--b\r\nContent-Type: message/feedback-report\r\n\r\nFeedback-Type: abuse\r\nOriginal-Rcpt-To: {}@x.test\r\n{}--b--\r\n",
            "a".repeat(100_000),
            "X-F: v\r\n".repeat(10_000)
        );
        let r = parse(long.as_bytes()).unwrap();
        assert_eq!(r.original_rcpt_to, None);
        let nested = "Content-Type: message/rfc822\r\n\r\n".repeat(5_000);
        let _ = parse(nested.as_bytes());
    }
}
