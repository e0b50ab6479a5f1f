//! Low-level text encoding for DSNs: header folding, 7-bit escaping of
//! field values, RFC 6533 address encoding, quoted-printable for the
//! human-readable part, dates, and taking apart the original message.
//!
//! Everything here is total: any input, however odd, yields well-formed
//! output (7-bit where the field must be 7-bit, CRLF line ends, lines well
//! under the 998-octet limit of RFC 5322 2.1.1).

use chrono::{DateTime, Utc};

/// Soft line limit for generated header fields and text (RFC 5322 2.1.1).
pub const SOFT_LINE: usize = 78;

/// Hard line limit without CRLF (RFC 5322 2.1.1, RFC 5321 4.5.3.1.6).
pub const HARD_LINE: usize = 998;

/// Longest run without whitespace that folding keeps in one piece; longer
/// runs are split so no line can reach [`HARD_LINE`].
const MAX_WORD: usize = 900;

/// Makes `s` a 7-bit, single-line header value: CR, LF, TAB and runs of
/// spaces become one space, other controls and non-ASCII characters become
/// the `\x{HEX}` notation of RFC 6533 3 (readable, and reversible enough
/// for a diagnostic). Leading and trailing whitespace is dropped.
pub fn seven_bit_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut pending_space = false;
    for c in s.chars() {
        if c == ' ' || c == '\t' || c == '\r' || c == '\n' {
            pending_space = !out.is_empty();
            continue;
        }
        if pending_space {
            out.push(' ');
            pending_space = false;
        }
        if c.is_ascii_graphic() {
            out.push(c);
        } else {
            out.push_str(&format!("\\x{{{:X}}}", c as u32));
        }
    }
    out
}

/// `utf-8-addr-xtext` of RFC 6533 3: QCHAR (printable ASCII except `+`,
/// `=`, `\`) as is, everything else as `\x{HEX}`.
pub fn utf8_addr_xtext(addr: &str) -> String {
    let mut out = String::with_capacity(addr.len() + 8);
    for c in addr.chars() {
        if c.is_ascii_graphic() && c != '+' && c != '=' && c != '\\' {
            out.push(c);
        } else {
            out.push_str(&format!("\\x{{{:X}}}", c as u32));
        }
    }
    out
}

/// `address-type;address` for Final-Recipient and friends: `rfc822` for an
/// ASCII address, `utf-8` in xtext form (RFC 6533 3) for an internationalized
/// one, because `message/delivery-status` must stay 7-bit.
pub fn typed_address(addr: &str) -> String {
    if addr.is_ascii() {
        format!("rfc822;{}", seven_bit_text(addr))
    } else {
        format!("utf-8;{}", utf8_addr_xtext(addr))
    }
}

/// Original-Recipient value from an ORCPT stored as `type;address` (xtext
/// decoded). A value without a type is taken as rfc822.
pub fn original_recipient(orcpt: &str) -> String {
    let (ty, addr) = match orcpt.split_once(';') {
        Some((t, a)) if !t.trim().is_empty() => (t.trim(), a.trim()),
        _ => ("rfc822", orcpt.trim()),
    };
    let ty_ok = ty.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    let ty = if ty_ok { ty } else { "rfc822" };
    if addr.is_ascii() {
        format!("{ty};{}", seven_bit_text(addr))
    } else if ty.eq_ignore_ascii_case("rfc822") || ty.eq_ignore_ascii_case("utf-8") {
        format!("utf-8;{}", utf8_addr_xtext(addr))
    } else {
        format!("{ty};{}", seven_bit_text(addr))
    }
}

/// `type; name` for Reporting-MTA / Remote-MTA: kept if it already has a
/// type, else `dns; name`.
pub fn typed_mta(mta: &str) -> String {
    match mta.split_once(';') {
        Some((t, n)) if !t.trim().is_empty() && !t.contains(char::is_whitespace) => {
            format!("{}; {}", seven_bit_text(t), seven_bit_text(n))
        }
        _ => format!("dns; {}", seven_bit_text(mta)),
    }
}

/// A hostname fit for a header, Message-ID right side and MAILER-DAEMON
/// address: only LDH, dots, and the brackets/colons of an address literal.
pub fn safe_host(host: &str) -> String {
    let h: String = host
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '[' | ']' | ':' | '_'))
        .collect();
    if h.is_empty() {
        "localhost".to_string()
    } else {
        h
    }
}

/// Diagnostic-Code value: `smtp; <reply>` for an SMTP reply, `X-Tern;
/// <text>` for our own (connection, DNS, expiry) errors that carry no reply
/// code. A value that already names the smtp type is kept.
pub fn diagnostic_code(diag: &str) -> String {
    let text = seven_bit_text(diag);
    let b = text.as_bytes();
    if b.len() >= 5 && b[..5].eq_ignore_ascii_case(b"smtp;") {
        format!("smtp; {}", text[5..].trim_start())
    } else if b.len() >= 3 && b[..3].iter().all(u8::is_ascii_digit) && b.get(3).is_none_or(|c| *c == b' ' || *c == b'-')
    {
        format!("smtp; {text}")
    } else {
        format!("X-Tern; {text}")
    }
}

/// One header field `Name: value` folded at spaces (RFC 5322 2.2.3) so
/// lines stay within [`SOFT_LINE`] where the words allow, ending in CRLF.
/// `value` must already be single-line; over-long words are split.
pub fn fold_field(name: &str, value: &str) -> String {
    let mut out = String::with_capacity(name.len() + value.len() + 8);
    out.push_str(name);
    out.push(':');
    let mut line_len = out.len();
    // The first word stays on the name's line however long it is.
    let mut line_has_word = false;
    for word in value.split(' ').filter(|w| !w.is_empty()) {
        for piece in split_long(word) {
            if line_has_word && line_len + 1 + piece.len() > SOFT_LINE {
                out.push_str("\r\n");
                line_len = 0;
            }
            out.push(' ');
            out.push_str(piece);
            line_len += 1 + piece.len();
            line_has_word = true;
        }
    }
    out.push_str("\r\n");
    out
}

/// Splits `word` into pieces of at most [`MAX_WORD`] bytes on char
/// boundaries.
fn split_long(word: &str) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut rest = word;
    while rest.len() > MAX_WORD {
        let mut cut = MAX_WORD;
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        let (a, b) = rest.split_at(cut);
        pieces.push(a);
        rest = b;
    }
    pieces.push(rest);
    pieces
}

/// Word-wraps `text` to `width` columns, the first line indented by
/// `first` spaces and the others by `rest`; every line ends in CRLF.
pub fn wrap(text: &str, width: usize, first: usize, rest: usize) -> String {
    let mut out = " ".repeat(first);
    let mut line_len = first;
    let mut line_has_word = false;
    for word in text.split_whitespace().flat_map(split_long) {
        let wlen = word.chars().count();
        if line_has_word && line_len + 1 + wlen > width {
            out.push_str("\r\n");
            out.push_str(&" ".repeat(rest));
            line_len = rest;
        } else if line_has_word {
            out.push(' ');
            line_len += 1;
        }
        out.push_str(word);
        line_len += wlen;
        line_has_word = true;
    }
    out.push_str("\r\n");
    out
}

/// Quoted-printable (RFC 2045 6.7) of CRLF-separated UTF-8 text, with soft
/// line breaks keeping encoded lines within 76 characters.
pub fn quoted_printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + text.len() / 8);
    let lines: Vec<&str> = text.split("\r\n").collect();
    let last = lines.len().saturating_sub(1);
    for (i, line) in lines.iter().enumerate() {
        let bytes = line.as_bytes();
        let mut len = 0;
        for (j, &b) in bytes.iter().enumerate() {
            let at_end = j + 1 == bytes.len();
            // Trailing whitespace must be encoded, it may be stripped in transit.
            let literal = (b.is_ascii_graphic() && b != b'=') || (b == b' ' && !at_end);
            let enc_len = if literal { 1 } else { 3 };
            // Leave room for the soft break `=`.
            if len + enc_len > 75 {
                out.push_str("=\r\n");
                len = 0;
            }
            if literal {
                out.push(b as char);
            } else {
                out.push_str(&format!("={b:02X}"));
            }
            len += enc_len;
        }
        if i < last {
            out.push_str("\r\n");
        }
    }
    out
}

/// RFC 5322 3.3 date-time in UTC; timestamps out of chrono's range fall back
/// to the epoch rather than failing.
pub fn rfc5322_date(secs: i64) -> String {
    DateTime::<Utc>::from_timestamp(secs, 0)
        .unwrap_or(DateTime::UNIX_EPOCH)
        .to_rfc2822()
}

/// The header section of `msg`: everything before the first empty line,
/// including the CRLF (or LF) of the last header line. A message without an
/// empty line is all header section; one that starts with an empty line has
/// none.
pub fn header_section(msg: &[u8]) -> &[u8] {
    if msg.starts_with(b"\r\n") || msg.starts_with(b"\n") {
        return &[];
    }
    let mut i = 0;
    while let Some(off) = msg[i..].iter().position(|&b| b == b'\n') {
        let nl = i + off;
        let rest = &msg[nl + 1..];
        if rest.starts_with(b"\r\n") || rest.starts_with(b"\n") {
            return &msg[..=nl];
        }
        i = nl + 1;
    }
    msg
}

/// Whether `content` can travel as-is in an `8bit` (or `7bit`) MIME body
/// (RFC 2045 2.8): no NUL, no bare CR or LF, no line over 998 octets.
pub fn is_8bit_clean(content: &[u8]) -> bool {
    let mut line_len = 0usize;
    let mut i = 0;
    while i < content.len() {
        match content[i] {
            0 => return false,
            b'\r' => {
                if content.get(i + 1) != Some(&b'\n') {
                    return false;
                }
                line_len = 0;
                i += 2;
                continue;
            }
            b'\n' => return false,
            _ => {
                line_len += 1;
                if line_len > HARD_LINE {
                    return false;
                }
            }
        }
        i += 1;
    }
    true
}

/// Copy of a header section made safe for a text body: any line end becomes
/// CRLF, NULs are dropped, and lines longer than [`HARD_LINE`] are broken
/// with a folding CRLF SP (informational copy, so this is acceptable).
pub fn sanitize_headers(headers: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(headers.len() + 2);
    let mut line_len = 0usize;
    let mut i = 0;
    while i < headers.len() {
        let b = headers[i];
        match b {
            0 => {}
            b'\r' | b'\n' => {
                out.extend_from_slice(b"\r\n");
                line_len = 0;
                if b == b'\r' && headers.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
            }
            _ => {
                if line_len >= HARD_LINE - 1 {
                    out.extend_from_slice(b"\r\n ");
                    line_len = 1;
                }
                out.push(b);
                line_len += 1;
            }
        }
        i += 1;
    }
    if !out.is_empty() && !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Value of the first header field `name` in a header section, unfolded,
/// lossily decoded; `None` if absent.
pub fn header_value(headers: &[u8], name: &str) -> Option<String> {
    let text = String::from_utf8_lossy(headers);
    let mut found: Option<String> = None;
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if let Some(v) = found.as_mut() {
            if line.starts_with([' ', '\t']) {
                v.push(' ');
                v.push_str(line.trim());
                continue;
            }
            break;
        }
        if let Some((n, v)) = line.split_once(':') {
            if n.trim_end().eq_ignore_ascii_case(name) {
                found = Some(v.trim().to_string());
            }
        }
    }
    found
}

/// Parameter `name` of a MIME header value such as
/// `multipart/report; report-type="delivery-status"`, unquoted.
pub fn mime_param(value: &str, name: &str) -> Option<String> {
    value.split(';').skip(1).find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().trim_matches('"').to_string())
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn seven_bit_text_escapes() {
        assert_eq!(seven_bit_text("  550 5.1.1\r\n  no\tsuch  "), "550 5.1.1 no such");
        assert_eq!(
            seven_bit_text("caf\u{e9} \u{1F600}\u{7}"),
            "caf\\x{E9} \\x{1F600}\\x{7}"
        );
        assert_eq!(seven_bit_text(""), "");
    }

    #[test]
    fn address_types() {
        assert_eq!(typed_address("bob@example.test"), "rfc822;bob@example.test");
        assert_eq!(
            typed_address("j\u{f6}rg+x@b\u{fc}cher.test"),
            "utf-8;j\\x{F6}rg\\x{2B}x@b\\x{FC}cher.test"
        );
        assert_eq!(original_recipient("rfc822;orig@x.test"), "rfc822;orig@x.test");
        assert_eq!(original_recipient("orig@x.test"), "rfc822;orig@x.test");
        assert_eq!(original_recipient("rfc822;\u{e9}@x.test"), "utf-8;\\x{E9}@x.test");
        assert_eq!(original_recipient("x400;\u{e9}"), "x400;\\x{E9}");
        assert_eq!(original_recipient("bad type;a@b"), "rfc822;a@b");
        assert_eq!(typed_mta("dns; mx1.example.test"), "dns; mx1.example.test");
        assert_eq!(typed_mta("mx1.example.test"), "dns; mx1.example.test");
        assert_eq!(safe_host("mx\r\n.ex ample"), "mx.example");
        assert_eq!(safe_host("\u{e9}"), "localhost");
    }

    #[test]
    fn diagnostic_types() {
        assert_eq!(diagnostic_code("550 5.1.1 no"), "smtp; 550 5.1.1 no");
        assert_eq!(
            diagnostic_code("550-5.1.1 a\r\n550 5.1.1 b"),
            "smtp; 550-5.1.1 a 550 5.1.1 b"
        );
        assert_eq!(diagnostic_code("421"), "smtp; 421");
        assert_eq!(diagnostic_code("SMTP;550 x"), "smtp; 550 x");
        assert_eq!(diagnostic_code("connect: refused"), "X-Tern; connect: refused");
        assert_eq!(diagnostic_code("5500 x"), "X-Tern; 5500 x");
    }

    #[test]
    fn folding() {
        let v = "smtp; 550 5.1.1 ".to_string() + &"word ".repeat(40);
        let f = fold_field("Diagnostic-Code", v.trim());
        assert!(f.ends_with("\r\n"));
        for line in f.trim_end_matches("\r\n").split("\r\n") {
            assert!(line.len() <= SOFT_LINE, "{line:?}");
        }
        // Unfolding restores the value.
        assert_eq!(
            f.replace("\r\n", ""),
            format!("Diagnostic-Code: {}\r\n", v.trim()).replace("\r\n", "")
        );
        let long = "x".repeat(2500);
        let f = fold_field("Diagnostic-Code", &long);
        assert!(f.split("\r\n").all(|l| l.len() <= HARD_LINE));
        assert_eq!(fold_field("A", ""), "A:\r\n");
    }

    #[test]
    fn wrapping() {
        let w = wrap("aaa bbb ccc ddd", 8, 2, 4);
        assert_eq!(w, "  aaa\r\n    bbb\r\n    ccc\r\n    ddd\r\n");
        assert_eq!(wrap("", 8, 0, 0), "\r\n");
    }

    #[test]
    fn qp() {
        assert_eq!(quoted_printable("a=b\r\nc\u{e9} "), "a=3Db\r\nc=C3=A9=20");
        let long = "\u{e9}".repeat(100);
        let q = quoted_printable(&long);
        assert!(q.split("\r\n").all(|l| l.len() <= 76));
        assert!(q.is_ascii());
    }

    #[test]
    fn header_section_cases() {
        assert_eq!(header_section(b"A: 1\r\nB: 2\r\n\r\nbody\r\n"), b"A: 1\r\nB: 2\r\n");
        assert_eq!(header_section(b"A: 1\nB: 2\n\nbody\n"), b"A: 1\nB: 2\n");
        assert_eq!(header_section(b"A: 1\r\nB: 2"), b"A: 1\r\nB: 2");
        assert_eq!(header_section(b"\r\nbody"), b"");
        assert_eq!(header_section(b""), b"");
    }

    #[test]
    fn eight_bit_clean() {
        assert!(is_8bit_clean(b"a\r\n\xc3\xa9\r\n"));
        assert!(is_8bit_clean(b""));
        assert!(!is_8bit_clean(b"a\nb"));
        assert!(!is_8bit_clean(b"a\rb"));
        assert!(!is_8bit_clean(b"a\0b"));
        assert!(!is_8bit_clean(&vec![b'a'; 999]));
        assert!(is_8bit_clean(&vec![b'a'; 998]));
    }

    #[test]
    fn sanitize() {
        assert_eq!(sanitize_headers(b"A: 1\nB:\0 2\rC: 3"), b"A: 1\r\nB: 2\r\nC: 3\r\n");
        let s = sanitize_headers(&vec![b'a'; 3000]);
        assert!(s.split(|b| *b == b'\n').all(|l| l.len() <= HARD_LINE + 1));
    }

    #[test]
    fn header_lookup() {
        let h = b"Subject: x\r\nContent-Type: multipart/report;\r\n\treport-type=\"delivery-status\"\r\nX: y\r\n";
        let ct = header_value(h, "content-type").unwrap();
        assert_eq!(ct, "multipart/report; report-type=\"delivery-status\"");
        assert_eq!(mime_param(&ct, "Report-Type").unwrap(), "delivery-status");
        assert_eq!(header_value(h, "missing"), None);
    }

    #[test]
    fn dates() {
        assert_eq!(rfc5322_date(0), "Thu, 1 Jan 1970 00:00:00 +0000");
        assert_eq!(rfc5322_date(i64::MAX), "Thu, 1 Jan 1970 00:00:00 +0000");
    }
}
