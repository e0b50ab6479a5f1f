//! SMTP replies: a three-digit code, an optional enhanced status code
//! (RFC 2034 / RFC 3463) and one or more text lines. One type for both
//! sides: the server session makes them and writes them ([`Reply::write_to`]),
//! the delivery client reads them from a peer
//! ([`ReplyReader`](crate::client::ReplyReader)) and reports them
//! ([`Reply::one_line`]).

use std::borrow::Cow;
use std::fmt;

/// One SMTP reply, possibly multi-line (RFC 5321 4.2.1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// Enhanced status code such as `2.1.0`: written on every line, read
    /// from the first. Ours are static strings; a peer's are parsed.
    pub enhanced: Option<Cow<'static, str>>,
    /// Text of each line, without code, separator and enhanced code.
    pub lines: Vec<String>,
}

impl Reply {
    /// Single-line reply with an enhanced status code.
    pub fn new(code: u16, enhanced: &'static str, text: impl Into<String>) -> Self {
        Reply {
            code,
            enhanced: Some(Cow::Borrowed(enhanced)),
            lines: vec![text.into()],
        }
    }

    /// A reply the delivery client makes up itself in place of the peer's
    /// (e.g. SMTPUTF8 unsupported by the peer).
    pub fn synthetic(code: u16, enhanced: &str, text: impl Into<String>) -> Self {
        Reply {
            code,
            enhanced: Some(Cow::Owned(enhanced.to_string())),
            lines: vec![text.into()],
        }
    }

    /// Single-line reply without an enhanced status code (banner, 354).
    pub fn bare(code: u16, text: impl Into<String>) -> Self {
        Reply {
            code,
            enhanced: None,
            lines: vec![text.into()],
        }
    }

    /// Multi-line reply without enhanced codes (the EHLO response).
    pub fn multiline(code: u16, lines: Vec<String>) -> Self {
        Reply {
            code,
            enhanced: None,
            lines,
        }
    }

    /// 4xx and 5xx replies.
    pub fn is_error(&self) -> bool {
        self.code >= 400
    }

    /// 2xx replies.
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }

    /// All text lines joined by a space, without code or enhanced code.
    pub fn text(&self) -> String {
        self.lines.join(" ")
    }

    /// The one-line form used in delivery outcomes and logs:
    /// `550 5.1.1 <x>: user unknown`, non-empty lines joined with a space.
    pub fn one_line(&self) -> String {
        let mut s = self.code.to_string();
        if let Some(e) = &self.enhanced {
            s.push(' ');
            s.push_str(e);
        }
        for line in self.lines.iter().filter(|l| !l.is_empty()) {
            s.push(' ');
            s.push_str(line);
        }
        s
    }

    /// Appends the wire form, every line terminated by CRLF.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let n = self.lines.len().max(1);
        for i in 0..n {
            let text = self.lines.get(i).map(String::as_str).unwrap_or("");
            let sep = if i + 1 < n { '-' } else { ' ' };
            let mut line = format!("{:03}{}", self.code, sep);
            if let Some(e) = &self.enhanced {
                line.push_str(e);
                if !text.is_empty() {
                    line.push(' ');
                }
            }
            // Text may come from the queue (enqueue errors); a CR or LF in it
            // would let it forge extra reply lines.
            line.extend(text.chars().map(|c| if c.is_control() { ' ' } else { c }));
            let trimmed = line.trim_end();
            out.extend_from_slice(trimmed.as_bytes());
            // An empty AUTH challenge is `334 ` (RFC 4954 4: "334" SP [base64]).
            if self.code == 334 && trimmed.len() == 3 {
                out.push(b' ');
            }
            out.extend_from_slice(b"\r\n");
        }
    }

    /// The wire form as bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.write_to(&mut v);
        v
    }
}

impl fmt::Display for Reply {
    /// [`Reply::one_line`]; for a one-line reply of ours, its wire form
    /// without CRLF.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.one_line())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_line_with_enhanced() {
        let r = Reply::new(250, "2.1.0", "Sender ok");
        assert_eq!(r.to_bytes(), b"250 2.1.0 Sender ok\r\n");
        assert!(!r.is_error());
    }

    #[test]
    fn bare_and_multiline() {
        assert_eq!(Reply::bare(354, "Go").to_bytes(), b"354 Go\r\n");
        let r = Reply::multiline(250, vec!["mx".into(), "PIPELINING".into(), "DSN".into()]);
        assert_eq!(r.to_bytes(), b"250-mx\r\n250-PIPELINING\r\n250 DSN\r\n");
        let r = Reply {
            code: 550,
            enhanced: Some("5.1.1".into()),
            lines: vec!["a".into(), "b".into()],
        };
        assert_eq!(r.to_bytes(), b"550-5.1.1 a\r\n550 5.1.1 b\r\n");
        assert!(r.is_error());
    }

    #[test]
    fn control_characters_cannot_inject_lines() {
        let r = Reply::new(451, "4.3.0", "disk\r\n250 2.0.0 fake");
        assert_eq!(r.to_bytes(), b"451 4.3.0 disk  250 2.0.0 fake\r\n");
        assert_eq!(Reply::new(250, "2.0.0", "").to_bytes(), b"250 2.0.0\r\n");
        assert_eq!(Reply::new(250, "2.0.0", "Ok").to_string(), "250 2.0.0 Ok");
    }

    #[test]
    fn empty_auth_challenge_keeps_its_space() {
        assert_eq!(Reply::bare(334, "").to_bytes(), b"334 \r\n");
        assert_eq!(Reply::bare(334, "VXNlcm5hbWU6").to_bytes(), b"334 VXNlcm5hbWU6\r\n");
    }
}
