//! Sans-IO half of the outbound SMTP/LMTP client: reading replies, parsing
//! the EHLO/LHLO capability list, building MAIL/RCPT commands with their
//! ESMTP parameters (SIZE, BODY, SMTPUTF8, DSN of RFC 3461), encoding DATA
//! content, and classifying replies into per-recipient outcomes.
//!
//! Nothing here touches a socket; the node's delivery client drives it.

use std::collections::HashMap;

use bytes::BytesMut;

pub use crate::reply::Reply;

use crate::envelope::{BodyType, Notify, Ret};

/// Longest reply line we accept, including CRLF. RFC 5321 4.5.3.1.5 says 512;
/// real servers exceed it with long texts, so be generous but bounded.
pub const MAX_REPLY_LINE: usize = 4096;
/// Most lines in one (multi-line) reply; EHLO replies are the longest.
pub const MAX_REPLY_LINES: usize = 100;

/// The server sent something that is not an SMTP reply.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed reply from server: {0}")]
pub struct MalformedReply(pub String);

/// Incremental reply reader: feed it the receive buffer, get whole replies.
#[derive(Debug, Default)]
pub struct ReplyReader {
    /// Code and lines of a multi-line reply still in progress.
    partial: Option<(u16, Vec<String>)>,
    /// Enhanced code found on the first line of the reply in progress.
    enhanced: Option<String>,
}

impl ReplyReader {
    pub fn new() -> Self {
        Self::default()
    }

    /// Consumes complete lines from `input`; returns a reply once its last
    /// line is in, `Ok(None)` if more input is needed. An error leaves the
    /// stream unusable (the caller drops the connection).
    pub fn next(&mut self, input: &mut BytesMut) -> Result<Option<Reply>, MalformedReply> {
        loop {
            let Some(lf) = input.iter().take(MAX_REPLY_LINE).position(|&b| b == b'\n') else {
                if input.len() >= MAX_REPLY_LINE {
                    return Err(MalformedReply(format!("line longer than {MAX_REPLY_LINE} octets")));
                }
                return Ok(None);
            };
            let raw = input.split_to(lf + 1);
            // Tolerate a bare LF as line end; strip CR.
            let mut line = &raw[..lf];
            if let Some(l) = line.strip_suffix(b"\r") {
                line = l;
            }
            let (code, last, text) = parse_line(line)?;
            let (pcode, lines) = self.partial.get_or_insert_with(|| (code, Vec::new()));
            if *pcode != code {
                let got = String::from_utf8_lossy(line).into_owned();
                self.reset();
                return Err(MalformedReply(format!("code changed within reply: {}", clip(&got))));
            }
            let text = if lines.is_empty() {
                let (enh, rest) = split_enhanced(code, &text);
                self.enhanced = enh.map(str::to_string);
                rest.to_string()
            } else {
                // Later lines repeat the enhanced code; drop it only if it matches.
                match (&self.enhanced, split_enhanced(code, &text)) {
                    (Some(e), (Some(e2), rest)) if e == e2 => rest.to_string(),
                    _ => text,
                }
            };
            lines.push(text);
            if lines.len() > MAX_REPLY_LINES {
                self.reset();
                return Err(MalformedReply(format!("more than {MAX_REPLY_LINES} lines")));
            }
            if last {
                let (code, lines) = self.partial.take().unwrap_or_default();
                return Ok(Some(Reply {
                    code,
                    enhanced: self.enhanced.take().map(std::borrow::Cow::Owned),
                    lines,
                }));
            }
        }
    }

    fn reset(&mut self) {
        self.partial = None;
        self.enhanced = None;
    }
}

/// Splits `250-text` into (250, is_last_line, "text").
fn parse_line(line: &[u8]) -> Result<(u16, bool, String), MalformedReply> {
    let bad = || MalformedReply(clip(&String::from_utf8_lossy(line)));
    let digits = line.get(..3).ok_or_else(bad)?;
    // RFC 5321 4.2: first digit 2-5, second 0-5, third 0-9.
    if !(b'2'..=b'5').contains(&digits[0]) || !(b'0'..=b'5').contains(&digits[1]) || !digits[2].is_ascii_digit() {
        return Err(bad());
    }
    let code = digits.iter().fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
    let (last, rest) = match line.get(3) {
        None => (true, &[][..]),
        Some(b' ') => (true, &line[4..]),
        Some(b'-') => (false, &line[4..]),
        Some(_) => return Err(bad()),
    };
    // Replace control characters so reply text cannot mess up logs or the
    // DSNs that quote it.
    let text: String = String::from_utf8_lossy(rest)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    Ok((code, last, text.trim_end().to_string()))
}

/// Splits a leading enhanced status code (`class.subject.detail`, RFC 3463)
/// whose class matches the reply code's first digit.
fn split_enhanced(code: u16, text: &str) -> (Option<&str>, &str) {
    let (word, rest) = text.split_once(' ').unwrap_or((text, ""));
    let mut parts = word.split('.');
    let ok = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(c), Some(s), Some(d), None) => {
            c.len() == 1
                && c.as_bytes()[0] == b'0' + (code / 100) as u8
                && (1..=3).contains(&s.len())
                && (1..=3).contains(&d.len())
                && s.bytes().chain(d.bytes()).all(|b| b.is_ascii_digit())
        }
        _ => false,
    };
    if ok {
        (Some(word), rest.trim_start())
    } else {
        (None, text)
    }
}

fn clip(s: &str) -> String {
    let s: String = s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    match s.char_indices().nth(200) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s,
    }
}

/// Extensions from an EHLO/LHLO reply, keyword upper-cased.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    ext: HashMap<String, Vec<String>>,
}

impl Capabilities {
    /// Parses the reply lines after the first (which is the server's name).
    pub fn from_ehlo(reply: &Reply) -> Self {
        let mut ext = HashMap::new();
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_ascii_whitespace();
            let Some(kw) = words.next() else { continue };
            ext.insert(kw.to_ascii_uppercase(), words.map(str::to_string).collect());
        }
        Capabilities { ext }
    }

    /// Whether the extension keyword (case-insensitive) was offered.
    pub fn has(&self, keyword: &str) -> bool {
        self.ext.contains_key(&keyword.to_ascii_uppercase())
    }

    /// `SIZE n` limit (RFC 1870); `None` if absent, zero or unparsable (no limit).
    pub fn size_limit(&self) -> Option<u64> {
        let n: u64 = self.ext.get("SIZE")?.first()?.parse().ok()?;
        (n > 0).then_some(n)
    }
}

/// xtext of RFC 3461 4: `+` `=`, controls, space and non-ASCII as `+HH`.
pub fn xtext_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

/// A path is safe to put between `<` `>` in a command: no controls, spaces
/// outside quotes are tolerated by nobody, and no angle brackets.
pub fn valid_path(addr: &str) -> bool {
    !addr.chars().any(|c| c.is_control() || c == '<' || c == '>') && addr.len() <= 1000
}

/// What the MAIL command should carry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MailParams<'a> {
    pub size: Option<u64>,
    /// `BODY=` value, only when the peer offers it.
    pub body: Option<BodyType>,
    pub smtputf8: bool,
    /// DSN parameters (only when the peer offers DSN).
    pub ret: Option<Ret>,
    pub envid: Option<&'a str>,
    /// `REQUIRETLS` (RFC 8689), only to a peer that offers it.
    pub requiretls: bool,
}

pub fn ehlo(name: &str, lmtp: bool) -> Vec<u8> {
    format!("{} {name}\r\n", if lmtp { "LHLO" } else { "EHLO" }).into_bytes()
}

pub fn helo(name: &str) -> Vec<u8> {
    format!("HELO {name}\r\n").into_bytes()
}

/// `MAIL FROM:<path> params CRLF`.
pub fn mail_from(reverse_path: &str, p: &MailParams<'_>) -> Vec<u8> {
    let mut s = format!("MAIL FROM:<{reverse_path}>");
    if let Some(n) = p.size {
        s.push_str(&format!(" SIZE={n}"));
    }
    match p.body {
        Some(BodyType::EightBitMime) => s.push_str(" BODY=8BITMIME"),
        Some(BodyType::BinaryMime) => s.push_str(" BODY=BINARYMIME"),
        Some(BodyType::SevenBit) => s.push_str(" BODY=7BIT"),
        None => {}
    }
    if p.smtputf8 {
        s.push_str(" SMTPUTF8");
    }
    match p.ret {
        Some(Ret::Full) => s.push_str(" RET=FULL"),
        Some(Ret::Hdrs) => s.push_str(" RET=HDRS"),
        None => {}
    }
    if let Some(envid) = p.envid.filter(|e| !e.is_empty()) {
        s.push_str(" ENVID=");
        s.push_str(&xtext_encode(envid));
    }
    if p.requiretls {
        s.push_str(" REQUIRETLS");
    }
    s.push_str("\r\n");
    s.into_bytes()
}

/// `NOTIFY=` value, `None` when the client gave none (the default then
/// applies at the next hop too).
pub fn notify_param(n: &Notify) -> Option<String> {
    if !n.given {
        return None;
    }
    if n.never {
        return Some("NEVER".to_string());
    }
    let words: Vec<&str> = [(n.success, "SUCCESS"), (n.failure, "FAILURE"), (n.delay, "DELAY")]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, w)| *w)
        .collect();
    (!words.is_empty()).then(|| words.join(","))
}

/// `ORCPT=` value from the decoded `addr-type;addr` form, the address part
/// xtext-encoded. An unusable addr-type drops the parameter.
pub fn orcpt_param(orcpt: &str) -> Option<String> {
    let (kind, addr) = orcpt.split_once(';')?;
    let atom = !kind.is_empty() && kind.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    (atom && !addr.is_empty()).then(|| format!("{kind};{}", xtext_encode(addr)))
}

/// `RCPT TO:<addr> [NOTIFY=..] [ORCPT=..] CRLF`; DSN parameters only if `dsn`.
pub fn rcpt_to(address: &str, notify: &Notify, orcpt: Option<&str>, dsn: bool) -> Vec<u8> {
    let mut s = format!("RCPT TO:<{address}>");
    if dsn {
        if let Some(n) = notify_param(notify) {
            s.push_str(" NOTIFY=");
            s.push_str(&n);
        }
        if let Some(o) = orcpt.and_then(orcpt_param) {
            s.push_str(" ORCPT=");
            s.push_str(&o);
        }
    }
    s.push_str("\r\n");
    s.into_bytes()
}

/// DATA content: line ends normalised to CRLF (a bare CR or LF would let a
/// receiver see an end marker we did not mean, i.e. SMTP smuggling), a dot
/// doubled at the start of each line (RFC 5321 4.5.2), a final CRLF added if
/// missing, then the `.` CRLF terminator.
pub fn dot_stuff(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / 64 + 5);
    let mut rest = body;
    // Line by line: the text of a line is copied in one piece.
    while !rest.is_empty() {
        if rest[0] == b'.' {
            out.push(b'.');
        }
        match memchr::memchr2(b'\r', b'\n', rest) {
            Some(end) => {
                out.extend_from_slice(&rest[..end]);
                // CRLF, bare CR and bare LF all end a line.
                out.extend_from_slice(b"\r\n");
                let skip = if rest[end] == b'\r' && rest.get(end + 1) == Some(&b'\n') {
                    2
                } else {
                    1
                };
                rest = &rest[end + skip..];
            }
            None => {
                out.extend_from_slice(rest);
                out.extend_from_slice(b"\r\n");
                rest = &[];
            }
        }
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// Final status of one recipient for this attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RcptOutcome {
    /// Accepted by the next hop (2xx to the final dot, or LMTP per-recipient 2xx).
    Delivered { reply: String },
    /// Temporary failure: retry later.
    Deferred { reply: String },
    /// Permanent failure: bounce.
    Failed { reply: String },
    /// Abandoned before the end of data because the caller's fence said no
    /// (the sender may no longer deliver this message); the next hop
    /// discards the unfinished data. Says nothing about the next hop: the
    /// caller records no outcome and leaves the recipient to whoever may
    /// deliver it now.
    Fenced,
}

/// The text shown for [`RcptOutcome::Fenced`] (in logs and wherever a
/// reply line is wanted); never recorded as a recipient's reply.
pub const FENCED_REPLY: &str = "451 4.3.0 shard leadership not confirmed; delivery left to the current leader";

impl RcptOutcome {
    /// 2xx → Delivered, 5xx → Failed, anything else (4xx and the codes
    /// that make no sense here) → Deferred.
    pub fn from_reply(reply: &Reply) -> Self {
        let text = reply.one_line();
        match reply.code / 100 {
            2 => RcptOutcome::Delivered { reply: text },
            5 => RcptOutcome::Failed { reply: text },
            _ => RcptOutcome::Deferred { reply: text },
        }
    }

    pub fn reply(&self) -> &str {
        match self {
            RcptOutcome::Delivered { reply } | RcptOutcome::Deferred { reply } | RcptOutcome::Failed { reply } => reply,
            RcptOutcome::Fenced => FENCED_REPLY,
        }
    }

    pub fn is_delivered(&self) -> bool {
        matches!(self, RcptOutcome::Delivered { .. })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn read_all(data: &[u8]) -> Vec<Result<Reply, MalformedReply>> {
        let mut r = ReplyReader::new();
        let mut buf = BytesMut::from(data);
        let mut out = Vec::new();
        loop {
            match r.next(&mut buf) {
                Ok(Some(rep)) => out.push(Ok(rep)),
                Ok(None) => return out,
                Err(e) => {
                    out.push(Err(e));
                    return out;
                }
            }
        }
    }

    #[test]
    fn single_and_multiline_replies() {
        let got =
            read_all(b"220 mx.test ESMTP\r\n250-mx\r\n250-PIPELINING\r\n250 DSN\r\n550 5.1.1 <x>: user unknown\r\n");
        let r: Vec<Reply> = got.into_iter().map(Result::unwrap).collect();
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].code, 220);
        assert_eq!(r[0].one_line(), "220 mx.test ESMTP");
        assert_eq!(r[1].lines, vec!["mx", "PIPELINING", "DSN"]);
        assert_eq!(r[2].enhanced.as_deref(), Some("5.1.1"));
        assert_eq!(r[2].one_line(), "550 5.1.1 <x>: user unknown");
    }

    #[test]
    fn multiline_enhanced_joined_once() {
        let r = read_all(b"550-5.7.1 Rejected\r\n550-5.7.1 see\r\n550 5.7.1 https://x\r\n");
        let r = r[0].clone().unwrap();
        assert_eq!(r.one_line(), "550 5.7.1 Rejected see https://x");
        // The enhanced code must match the reply class to count as one.
        let r = read_all(b"451 5.1.1 odd\r\n")[0].clone().unwrap();
        assert_eq!(r.enhanced, None);
        assert_eq!(r.one_line(), "451 5.1.1 odd");
        let r = read_all(b"250 2.0.0\r\n")[0].clone().unwrap();
        assert_eq!(
            (r.enhanced.as_deref(), r.one_line().as_str()),
            (Some("2.0.0"), "250 2.0.0")
        );
    }

    #[test]
    fn incremental_bare_lf_and_code_only() {
        let mut r = ReplyReader::new();
        let mut buf = BytesMut::from(&b"250-a\r\n25"[..]);
        assert_eq!(r.next(&mut buf).unwrap(), None);
        buf.extend_from_slice(b"0 b\n250\r\n");
        assert_eq!(r.next(&mut buf).unwrap().unwrap().lines, vec!["a", "b"]);
        assert_eq!(r.next(&mut buf).unwrap().unwrap().one_line(), "250");
        assert!(buf.is_empty());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bad in [
            &b"hello\r\n"[..],
            b"25\r\n",
            b"2500 x\r\n",
            b"650 x\r\n",
            b"290 x\r\n",
            b"250x\r\n",
            b"250-a\r\n251 b\r\n",
            b"\r\n",
            b"\xff\xfe\xfd\r\n",
        ] {
            let got = read_all(bad);
            assert!(matches!(got.last(), Some(Err(_))), "{bad:?}: {got:?}");
        }
        // Non-UTF-8 text is fine; control characters are blanked.
        let r = read_all(b"550 5.1.1 caf\xe9\x07 x\r\n")[0].clone().unwrap();
        assert_eq!(r.one_line(), "550 5.1.1 caf\u{fffd}  x");
    }

    #[test]
    fn limits() {
        let long = [b"250 ".to_vec(), vec![b'a'; MAX_REPLY_LINE]].concat();
        assert!(read_all(&long)[0].is_err());
        let mut many = Vec::new();
        for _ in 0..=MAX_REPLY_LINES {
            many.extend_from_slice(b"250-x\r\n");
        }
        many.extend_from_slice(b"250 end\r\n");
        assert!(read_all(&many).last().unwrap().is_err());
        // Exactly at the limit is fine.
        let mut ok = b"250-x\r\n".repeat(MAX_REPLY_LINES - 1);
        ok.extend_from_slice(b"250 end\r\n");
        assert_eq!(read_all(&ok)[0].as_ref().unwrap().lines.len(), MAX_REPLY_LINES);
    }

    #[test]
    fn ehlo_capabilities() {
        let r = read_all(b"250-mx.test\r\n250-PIPELINING\r\n250-size 1000\r\n250-8BITMIME\r\n250-dsn\r\n250 \r\n")[0]
            .clone()
            .unwrap();
        let c = Capabilities::from_ehlo(&r);
        assert!(c.has("PIPELINING") && c.has("Dsn") && c.has("8bitmime"));
        assert!(!c.has("mx.test") && !c.has("SMTPUTF8") && !c.has(""));
        assert_eq!(c.size_limit(), Some(1000));
        let r = Reply {
            code: 250,
            enhanced: None,
            lines: vec!["mx".into(), "SIZE".into(), "STARTTLS".into()],
        };
        let c = Capabilities::from_ehlo(&r);
        assert_eq!(c.size_limit(), None);
        assert!(c.has("starttls"));
        assert_eq!(
            Capabilities::from_ehlo(&Reply::synthetic(250, "2.0.0", "x")).size_limit(),
            None
        );
    }

    #[test]
    fn xtext() {
        assert_eq!(xtext_encode("bob@example.test"), "bob@example.test");
        assert_eq!(xtext_encode("a+b=c d\u{e9}"), "a+2Bb+3Dc+20d+C3+A9");
        assert_eq!(xtext_encode("~!"), "~!");
        assert_eq!(xtext_encode("\r\n"), "+0D+0A");
    }

    #[test]
    fn mail_and_rcpt_commands() {
        assert_eq!(mail_from("", &MailParams::default()), b"MAIL FROM:<>\r\n");
        let p = MailParams {
            size: Some(1234),
            body: Some(BodyType::EightBitMime),
            smtputf8: true,
            ret: Some(Ret::Hdrs),
            envid: Some("id+1 x"),
            requiretls: true,
        };
        assert_eq!(
            String::from_utf8(mail_from("a@b.test", &p)).unwrap(),
            "MAIL FROM:<a@b.test> SIZE=1234 BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=id+2B1+20x REQUIRETLS\r\n"
        );
        let n = Notify {
            given: true,
            success: true,
            failure: true,
            ..Notify::default()
        };
        assert_eq!(
            String::from_utf8(rcpt_to("c@d.test", &n, Some("rfc822;c+x@d.test"), true)).unwrap(),
            "RCPT TO:<c@d.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;c+2Bx@d.test\r\n"
        );
        assert_eq!(
            rcpt_to("c@d.test", &n, Some("rfc822;c@d.test"), false),
            b"RCPT TO:<c@d.test>\r\n"
        );
        let never = Notify {
            given: true,
            never: true,
            ..Notify::default()
        };
        assert_eq!(notify_param(&never).as_deref(), Some("NEVER"));
        assert_eq!(notify_param(&Notify::default()), None);
        assert_eq!(orcpt_param("no-type"), None);
        assert_eq!(orcpt_param("bad type;x@y"), None);
        assert_eq!(orcpt_param("rfc822;").as_deref(), None);
        assert_eq!(orcpt_param("utf-8;x=y@z").as_deref(), Some("utf-8;x+3Dy@z"));
        assert!(valid_path("a@b.test") && valid_path(""));
        assert!(!valid_path("a@b>\r\nRSET") && !valid_path("a b\n"));
    }

    #[test]
    fn dot_stuffing() {
        assert_eq!(
            dot_stuff(b"a\r\n.b\r\n..\r\n.\r\nc\r\n"),
            b"a\r\n..b\r\n...\r\n..\r\nc\r\n.\r\n"
        );
        assert_eq!(dot_stuff(b".start"), b"..start\r\n.\r\n");
        assert_eq!(dot_stuff(b""), b".\r\n");
        assert_eq!(dot_stuff(b"x\r\n"), b"x\r\n.\r\n");
        // Bare LF/CR cannot smuggle an end marker: they become CRLF and the
        // dot after them is stuffed.
        assert_eq!(dot_stuff(b"a\n.\nb\r.\rc"), b"a\r\n..\r\nb\r\n..\r\nc\r\n.\r\n");
        assert_eq!(dot_stuff(b"a\r\n\r\n"), b"a\r\n\r\n.\r\n");
    }

    #[test]
    fn dot_stuffing_matches_a_byte_by_byte_reading() {
        // The rule, one byte at a time: any of CRLF, CR, LF ends a line; a
        // dot that starts a line is doubled; the last line is ended.
        fn reference(body: &[u8]) -> Vec<u8> {
            let (mut out, mut start, mut i) = (Vec::new(), true, 0);
            while i < body.len() {
                if body[i] == b'\r' || body[i] == b'\n' {
                    i += usize::from(body[i] == b'\r' && body.get(i + 1) == Some(&b'\n'));
                    out.extend_from_slice(b"\r\n");
                    start = true;
                } else {
                    if start && body[i] == b'.' {
                        out.push(b'.');
                    }
                    out.push(body[i]);
                    start = false;
                }
                i += 1;
            }
            if !start {
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b".\r\n");
            out
        }
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        for len in 0..400 {
            let body: Vec<u8> = (0..len % 40)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    b"a.\r\n"[(seed % 4) as usize]
                })
                .collect();
            assert_eq!(
                dot_stuff(&body),
                reference(&body),
                "{:?}",
                String::from_utf8_lossy(&body)
            );
        }
    }

    #[test]
    fn outcome_classification() {
        let r = |code, e: &str, t: &str| RcptOutcome::from_reply(&Reply::synthetic(code, e, t));
        assert_eq!(
            r(250, "2.1.5", "ok"),
            RcptOutcome::Delivered {
                reply: "250 2.1.5 ok".into()
            }
        );
        assert!(matches!(r(451, "4.3.0", "later"), RcptOutcome::Deferred { .. }));
        assert!(matches!(r(421, "4.4.2", "bye"), RcptOutcome::Deferred { .. }));
        assert_eq!(
            r(550, "5.1.1", "<x>: user unknown").reply(),
            "550 5.1.1 <x>: user unknown"
        );
        assert!(matches!(r(550, "5.1.1", "no"), RcptOutcome::Failed { .. }));
        // A 354 to RCPT is nonsense: retry later rather than bounce.
        assert!(matches!(r(354, "3.0.0", "go"), RcptOutcome::Deferred { .. }));
    }
}
