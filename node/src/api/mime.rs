//! The MIME side of the API: syntax checks of addresses, extra headers and
//! attachments, and the RFC 5322 message mail-builder writes (CRLF, 7-bit
//! safe: 8-bit text goes out quoted-printable or base64).
//!
//! Structure: text and html as multipart/alternative; inline parts (those
//! with a `content_id`) beside the html in multipart/related; attachments
//! beside all of it in multipart/mixed.

use base64::Engine;
use mail_builder::headers::address::Address;
use mail_builder::headers::content_type::ContentType;
use mail_builder::headers::date::Date;
use mail_builder::headers::message_id::MessageId;
use mail_builder::headers::text::Text;
use mail_builder::mime::{BodyPart, MimePart};
use mail_builder::MessageBuilder;

use super::problem::Problem;

/// `Name <local@domain>` or a bare `local@domain`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mailbox {
    pub name: Option<String>,
    pub address: String,
}

impl Mailbox {
    fn to_address(&self) -> Address<'static> {
        Address::new_address(self.name.clone(), self.address.clone())
    }
}

/// Longest address (RFC 5321: 64 octets local part, 255 domain).
const MAX_ADDRESS: usize = 64 + 1 + 255;

/// Characters refused anywhere in an address: they would let a value break
/// out of an SMTP command or a header field.
fn bad_address_char(c: char) -> bool {
    c.is_whitespace() || c.is_control() || matches!(c, '<' | '>' | ',' | ';' | '"' | '(' | ')' | '\\' | '[' | ']')
}

/// Checks a bare address `local@domain`.
pub fn check_address(address: &str, field: &str) -> Result<(), Problem> {
    let invalid = |why: &str| Problem::invalid(field, format!("`{address}` is not a valid address: {why}"));
    if address.is_empty() {
        return Err(Problem::invalid(field, "address is empty"));
    }
    if address.len() > MAX_ADDRESS {
        return Err(invalid("too long"));
    }
    if let Some(c) = address.chars().find(|&c| bad_address_char(c)) {
        return Err(invalid(&format!("it contains {c:?}")));
    }
    let Some((local, domain)) = address.rsplit_once('@') else {
        return Err(invalid("no `@`"));
    };
    if local.is_empty() || local.contains('@') {
        return Err(invalid("the local part must be one non-empty word before a single `@`"));
    }
    if local.len() > 64 {
        return Err(invalid("local part longer than 64 octets"));
    }
    if local.starts_with('.') || local.ends_with('.') || local.contains("..") {
        return Err(invalid("misplaced `.` in the local part"));
    }
    if domain.is_empty() || domain.len() > 255 {
        return Err(invalid("bad domain length"));
    }
    for label in domain.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.chars().all(|c| c.is_alphanumeric() || c == '-');
        if !ok {
            return Err(invalid(&format!("bad domain label `{label}`")));
        }
    }
    Ok(())
}

/// Parses `Name <addr>`, `"Name" <addr>`, `<addr>` or a bare `addr`.
pub fn parse_mailbox(value: &str, field: &str) -> Result<Mailbox, Problem> {
    let value = value.trim();
    if value.contains(['\r', '\n']) {
        return Err(Problem::invalid(field, "address contains CR or LF"));
    }
    let Some(open) = value.find('<') else {
        check_address(value, field)?;
        return Ok(Mailbox {
            name: None,
            address: value.to_owned(),
        });
    };
    let Some(inner) = value[open + 1..].strip_suffix('>') else {
        return Err(Problem::invalid(field, format!("`{value}`: expected `Name <address>`")));
    };
    check_address(inner, field)?;
    let mut name = value[..open].trim();
    if let Some(quoted) = name.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
        name = quoted;
    }
    if name.contains(['"', '\\']) || name.chars().any(char::is_control) {
        return Err(Problem::invalid(
            field,
            "display name contains quotes, backslashes or control characters",
        ));
    }
    Ok(Mailbox {
        name: (!name.is_empty()).then(|| name.to_owned()),
        address: inner.to_owned(),
    })
}

/// Header fields the API builds itself or that only a relay may add.
fn is_structural(name: &str) -> bool {
    const EXACT: [&str; 13] = [
        "from",
        "to",
        "cc",
        "bcc",
        "subject",
        "date",
        "message-id",
        "mime-version",
        "received",
        "return-path",
        "dkim-signature",
        "reply-to",
        "sender",
    ];
    let lower = name.to_ascii_lowercase();
    EXACT.contains(&lower.as_str()) || lower.starts_with("content-") || lower.starts_with("arc-")
}

/// Checks one extra header: the name is RFC 5322 ftext and not structural,
/// the value holds no CR, LF or other control character (no injection).
pub fn check_header(name: &str, value: &str, field: &str) -> Result<(), Problem> {
    if name.is_empty() || name.len() > 76 {
        return Err(Problem::invalid(field, "header name must be 1 to 76 characters"));
    }
    if let Some(c) = name.chars().find(|&c| !matches!(c, '!'..='9' | ';'..='~')) {
        return Err(Problem::invalid(field, format!("header name `{name}` contains {c:?}")));
    }
    if is_structural(name) {
        return Err(Problem::invalid(
            field,
            format!("header `{name}` is set by the API itself (use the request's own field) and cannot be given"),
        ));
    }
    if value.contains(['\r', '\n']) {
        return Err(Problem::invalid(
            field,
            format!("value of header `{name}` contains CR or LF"),
        ));
    }
    if let Some(c) = value.chars().find(|&c| c.is_control() && c != '\t') {
        return Err(Problem::invalid(
            field,
            format!("value of header `{name}` contains {c:?}"),
        ));
    }
    if value.len() > 998 {
        return Err(Problem::invalid(
            field,
            format!("value of header `{name}` is longer than 998 octets"),
        ));
    }
    Ok(())
}

/// A decoded attachment or inline part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part {
    pub filename: String,
    pub content_type: String,
    pub content: Vec<u8>,
    pub content_id: Option<String>,
}

fn is_token(s: &str) -> bool {
    // RFC 2045 token: no tspecials, spaces or controls.
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?=".contains(&b))
}

/// Checks and decodes an attachment; `field` is its JSON pointer.
pub fn attachment(
    filename: &str,
    content_type: Option<&str>,
    content: &str,
    content_id: Option<&str>,
    field: &str,
) -> Result<Part, Problem> {
    if filename.is_empty() || filename.chars().count() > 255 {
        return Err(Problem::invalid(
            &format!("{field}/filename"),
            "filename must be 1 to 255 characters",
        ));
    }
    if let Some(c) = filename
        .chars()
        .find(|&c| c.is_control() || matches!(c, '"' | '\\' | '/'))
    {
        return Err(Problem::invalid(
            &format!("{field}/filename"),
            format!("filename contains {c:?}"),
        ));
    }
    let content_type = content_type.unwrap_or("application/octet-stream").trim();
    match content_type.split_once('/') {
        Some((t, s)) if is_token(t) && is_token(s) => {}
        _ => {
            return Err(Problem::invalid(
                &format!("{field}/content_type"),
                format!("`{content_type}` is not a `type/subtype` media type"),
            ))
        }
    }
    // Senders wrap long base64 lines; the line breaks carry nothing.
    let compact: String = content.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let content = base64::engine::general_purpose::STANDARD
        .decode(compact.as_bytes())
        .map_err(|e| Problem::invalid(&format!("{field}/content"), format!("not valid base64: {e}")))?;
    if let Some(cid) = content_id {
        let ok = !cid.is_empty()
            && cid.len() <= 250
            && cid
                .chars()
                .all(|c| c.is_ascii_graphic() && !matches!(c, '<' | '>' | '"' | '\\'));
        if !ok {
            return Err(Problem::invalid(
                &format!("{field}/content_id"),
                "content_id must be 1 to 250 printable ASCII characters without <, >, quotes or backslashes",
            ));
        }
    }
    Ok(Part {
        filename: filename.to_owned(),
        content_type: content_type.to_ascii_lowercase(),
        content,
        content_id: content_id.map(str::to_owned),
    })
}

/// Everything one message is built from, already checked.
pub struct Message<'a> {
    pub from: &'a Mailbox,
    pub to: &'a [Mailbox],
    pub cc: &'a [Mailbox],
    pub reply_to: Option<&'a Mailbox>,
    pub subject: &'a str,
    pub text: Option<&'a str>,
    pub html: Option<&'a str>,
    pub parts: &'a [Part],
    pub headers: &'a [(String, String)],
    /// Unix seconds.
    pub date: i64,
    /// Without angle brackets.
    pub message_id: &'a str,
}

/// A fresh Message-ID (without brackets): 128 random bits at `hostname`.
pub fn message_id(hostname: &str) -> String {
    let bits: u128 = rand::random();
    format!("{bits:032x}@{hostname}")
}

/// The RFC 5322 bytes of `m` (CRLF line ends).
pub fn build(m: &Message<'_>) -> Vec<u8> {
    let mut builder = MessageBuilder::new()
        .from(m.from.to_address())
        .subject(Text::new(m.subject.to_owned()))
        .date(Date::new(m.date))
        .message_id(MessageId::new(m.message_id.to_owned()));
    if !m.to.is_empty() {
        builder = builder.to(Address::new_list(m.to.iter().map(Mailbox::to_address).collect()));
    }
    if !m.cc.is_empty() {
        builder = builder.cc(Address::new_list(m.cc.iter().map(Mailbox::to_address).collect()));
    }
    if let Some(reply_to) = m.reply_to {
        builder = builder.reply_to(reply_to.to_address());
    }
    for (name, value) in m.headers {
        builder = builder.header(name.clone(), Text::new(value.clone()));
    }

    let leaf =
        |content_type: &str, body: &str| MimePart::new(content_type.to_owned(), BodyPart::Text(body.to_owned().into()));
    let (inline, attached): (Vec<&Part>, Vec<&Part>) = m.parts.iter().partition(|p| p.content_id.is_some());
    let binary = |p: &Part| MimePart::new(ContentType::new(p.content_type.clone()), p.content.clone());
    let inline: Vec<MimePart<'static>> = inline
        .into_iter()
        .map(|p| {
            binary(p).cid(p.content_id.clone().unwrap_or_default()).header(
                "Content-Disposition",
                ContentType::new("inline").attribute("filename", p.filename.clone()),
            )
        })
        .collect();
    let mut inline = Some(inline).filter(|v| !v.is_empty());

    let html = m.html.map(|html| {
        let part = leaf("text/html", html);
        match inline.take() {
            Some(mut related) => {
                related.insert(0, part);
                MimePart::new("multipart/related", related)
            }
            None => part,
        }
    });
    let text = m.text.map(|text| leaf("text/plain", text));
    let main = match (text, html) {
        (Some(text), Some(html)) => Some(MimePart::new("multipart/alternative", vec![text, html])),
        (text, html) => text.or(html),
    };
    let mut mixed: Vec<MimePart<'static>> = main.into_iter().collect();
    // Inline parts without an html body to refer to them travel as attachments.
    mixed.extend(inline.into_iter().flatten());
    mixed.extend(attached.into_iter().map(|p| binary(p).attachment(p.filename.clone())));
    let body = if mixed.len() == 1 {
        mixed.pop().unwrap_or_else(|| MimePart::new("text/plain", "\r\n"))
    } else {
        MimePart::new("multipart/mixed", mixed)
    };
    let mut out = Vec::new();
    builder.body(body).serialize(&mut out);
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert!(check_address("a@example.org", "/to/0").is_ok());
        assert!(check_address("a.b+c@sub.example.org", "/to/0").is_ok());
        for bad in [
            "",
            "a",
            "a@",
            "@b.org",
            "a b@c.org",
            "a@b@c.org",
            "a@c..org",
            "<a@b.org>",
            "a@b.org\r\nX: y",
            "a@-b.org",
        ] {
            let p = check_address(bad, "/to/3").expect_err(bad);
            assert_eq!(p.field.as_deref(), Some("/to/3"), "{bad}");
            assert_eq!(p.status, 400);
        }
    }

    #[test]
    fn mailboxes() {
        let m = parse_mailbox("Ann Example <ann@example.org>", "/from").unwrap();
        assert_eq!(m.name.as_deref(), Some("Ann Example"));
        assert_eq!(m.address, "ann@example.org");
        let m = parse_mailbox("\"Ann\" <ann@example.org>", "/from").unwrap();
        assert_eq!(m.name.as_deref(), Some("Ann"));
        let m = parse_mailbox("ann@example.org", "/from").unwrap();
        assert_eq!(m.name, None);
        assert!(parse_mailbox("Ann <ann@example.org", "/from").is_err());
        assert!(parse_mailbox("Ann\r\nBcc: x@y.org <ann@example.org>", "/from").is_err());
    }

    #[test]
    fn headers() {
        assert!(check_header("X-Campaign", "spring", "/headers/X-Campaign").is_ok());
        assert!(check_header("List-Unsubscribe", "<https://x.org/u>", "/h").is_ok());
        for (name, value) in [
            ("X-Foo", "a\r\nBcc: victim@x.org"),
            ("X-Foo", "a\nb"),
            ("X Foo", "a"),
            ("X:Foo", "a"),
            ("", "a"),
            ("Subject", "a"),
            ("content-type", "a"),
            ("DKIM-Signature", "a"),
            ("ARC-Seal", "a"),
            ("bcc", "a"),
        ] {
            let p = check_header(name, value, "/headers/X").expect_err(name);
            assert_eq!(p.status, 400);
        }
    }

    #[test]
    fn attachments() {
        let p = attachment("a.txt", None, "aGVs\nbG8=", None, "/attachments/0").unwrap();
        assert_eq!(p.content, b"hello");
        assert_eq!(p.content_type, "application/octet-stream");
        let e = attachment("a.txt", None, "!!!", None, "/attachments/1").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("/attachments/1/content"));
        let e = attachment("a\".txt", None, "", None, "/attachments/2").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("/attachments/2/filename"));
        let e = attachment("a\r\n.txt", None, "", None, "/attachments/2").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("/attachments/2/filename"));
        let e = attachment("a.txt", Some("text"), "", None, "/attachments/3").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("/attachments/3/content_type"));
        let e = attachment("a.txt", Some("text/plain; x=\"y\""), "", None, "/attachments/3").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("/attachments/3/content_type"));
        let e = attachment("a.png", Some("image/png"), "", Some("<x>"), "/attachments/4").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("/attachments/4/content_id"));
    }
}
