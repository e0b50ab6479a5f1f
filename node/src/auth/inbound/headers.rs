//! Header surgery on the raw message: find `Authentication-Results` fields
//! that claim our authserv-id (a forgery from outside, RFC 8601 5) and
//! rebuild the message with our own fields on top and those removed.

use std::ops::Range;

/// Byte ranges of the header fields (with their folded lines and line ends)
/// of `message` named `Authentication-Results` whose authserv-id equals
/// `authserv_id` (ignoring case).
pub fn forged_results(message: &[u8], authserv_id: &str) -> Vec<Range<usize>> {
    let mut forged = Vec::new();
    for field in header_fields(message) {
        let bytes = &message[field.clone()];
        let Some(colon) = bytes.iter().position(|&b| b == b':') else {
            continue;
        };
        let name = bytes[..colon].trim_ascii();
        if name.eq_ignore_ascii_case(b"Authentication-Results")
            && authserv_id_of(&bytes[colon + 1..]).is_some_and(|id| id.eq_ignore_ascii_case(authserv_id.as_bytes()))
        {
            forged.push(field);
        }
    }
    forged
}

/// `top` followed by `message` without the `removed` ranges (sorted, disjoint).
pub fn rebuild(top: &[u8], message: &[u8], removed: &[Range<usize>]) -> Vec<u8> {
    let dropped: usize = removed.iter().map(|r| r.len()).sum();
    let mut out = Vec::with_capacity(top.len() + message.len() - dropped);
    out.extend_from_slice(top);
    let mut at = 0;
    for r in removed {
        out.extend_from_slice(&message[at..r.start]);
        at = r.end;
    }
    out.extend_from_slice(&message[at..]);
    out
}

/// The ranges of each header field: a line that does not start with
/// whitespace plus its continuation lines, up to the empty line that ends
/// the header (CRLF or bare LF line ends).
fn header_fields(message: &[u8]) -> Vec<Range<usize>> {
    let mut fields: Vec<Range<usize>> = Vec::new();
    let mut at = 0;
    while at < message.len() {
        let end = message[at..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(message.len(), |i| at + i + 1);
        let line = &message[at..end];
        if line == b"\r\n" || line == b"\n" {
            break;
        }
        match (line.first(), fields.last_mut()) {
            (Some(b' ' | b'\t'), Some(last)) if last.end == at => last.end = end,
            _ => fields.push(at..end),
        }
        at = end;
    }
    fields
}

/// The authserv-id of an `Authentication-Results` value: the first token
/// (or quoted string) after comments and folding whitespace.
fn authserv_id_of(value: &[u8]) -> Option<&[u8]> {
    let mut i = 0;
    let mut depth = 0usize;
    while i < value.len() {
        match value[i] {
            b'(' => depth += 1,
            b')' if depth > 0 => depth -= 1,
            b'\\' if depth > 0 => i += 1,
            b' ' | b'\t' | b'\r' | b'\n' => {}
            _ if depth > 0 => {}
            _ => break,
        }
        i += 1;
    }
    let rest = value.get(i..)?;
    if let Some(quoted) = rest.strip_prefix(b"\"") {
        let end = quoted.iter().position(|&b| b == b'"')?;
        return Some(&quoted[..end]);
    }
    let end = rest
        .iter()
        .position(|b| matches!(b, b';' | b'(' | b' ' | b'\t' | b'\r' | b'\n'))
        .unwrap_or(rest.len());
    (end > 0).then(|| &rest[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    const OURS: &str = "mx1.tern.test";

    fn strip(message: &str) -> String {
        let forged = forged_results(message.as_bytes(), OURS);
        String::from_utf8(rebuild(b"", message.as_bytes(), &forged)).unwrap_or_default()
    }

    #[test]
    fn forged_results_are_removed_and_others_kept() {
        let message = "Received: from x\r\n\tby mx1.tern.test\r\n\
            Authentication-Results: mx1.tern.test; spf=pass\r\n\tsmtp.mailfrom=a@b.test\r\n\
            Authentication-Results: other.example; dkim=pass\r\n\
            authentication-results:  (comment (nested)) MX1.Tern.Test ; dmarc=pass\r\n\
            Authentication-Results: \"mx1.tern.test\"; none\r\n\
            Authentication-Results: mx1.tern.test.evil; none\r\n\
            Authentication-Results:\r\n mx1.tern.test;\r\n\tdkim=pass\r\n\
            ARC-Authentication-Results: i=1; mx1.tern.test; spf=pass\r\n\
            Subject: hi\r\n\
            \r\n\
            Authentication-Results: mx1.tern.test; body text is not a header\r\n";
        assert_eq!(
            strip(message),
            "Received: from x\r\n\tby mx1.tern.test\r\n\
            Authentication-Results: other.example; dkim=pass\r\n\
            Authentication-Results: mx1.tern.test.evil; none\r\n\
            ARC-Authentication-Results: i=1; mx1.tern.test; spf=pass\r\n\
            Subject: hi\r\n\
            \r\n\
            Authentication-Results: mx1.tern.test; body text is not a header\r\n"
        );
    }

    #[test]
    fn bare_lf_and_headers_only_messages() {
        assert_eq!(
            strip("Authentication-Results: mx1.tern.test; spf=pass\nSubject: x\n\nbody\n"),
            "Subject: x\n\nbody\n"
        );
        assert_eq!(
            strip("Subject: x\r\nAuthentication-Results: mx1.tern.test"),
            "Subject: x\r\n"
        );
        assert_eq!(strip(""), "");
        assert_eq!(
            strip("Authentication-Results: ; none\r\n"),
            "Authentication-Results: ; none\r\n"
        );
    }

    #[test]
    fn rebuild_puts_our_fields_on_top() {
        let message = b"A: 1\r\nAuthentication-Results: mx1.tern.test; x\r\nB: 2\r\n\r\nbody";
        let forged = forged_results(message, OURS);
        assert_eq!(forged.len(), 1);
        let out = rebuild(b"Authentication-Results: mx1.tern.test; none\r\n", message, &forged);
        assert_eq!(
            out,
            b"Authentication-Results: mx1.tern.test; none\r\nA: 1\r\nB: 2\r\n\r\nbody".to_vec()
        );
    }
}
