//! Parser for one SMTP command line (RFC 5321 4.1) with the ESMTP parameters
//! we support: SIZE (RFC 1870), BODY (RFC 6152, RFC 3030), SMTPUTF8
//! (RFC 6531), RET/ENVID/NOTIFY/ORCPT (RFC 3461), HOLDFOR/HOLDUNTIL
//! (RFC 4865), and the AUTH command (RFC 4954; the `AUTH=` parameter of
//! MAIL is accepted and ignored).
//!
//! Everything here is a pure function over bytes so it can be fuzzed; the
//! session decides what is allowed in which state.

use crate::envelope::{BodyType, Notify, Ret};
use crate::future_release::{self, Hold};
use crate::reply::Reply;

/// Maximum reverse-/forward-path length including the angle brackets
/// (RFC 5321 4.5.3.1.3).
pub const MAX_PATH_LEN: usize = 256;
/// Maximum local-part length (RFC 5321 4.5.3.1.1).
pub const MAX_LOCAL_PART_LEN: usize = 64;

/// A parsed command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Ehlo(String),
    Helo(String),
    Mail(MailFrom),
    Rcpt(RcptTo),
    Data,
    Bdat {
        size: u64,
        last: bool,
    },
    Rset,
    Noop,
    Quit,
    Vrfy(String),
    Expn,
    Help,
    StartTls,
    /// `AUTH mechanism [initial-response]`; the mechanism upper-cased, the
    /// response still base64 (`=` for an empty one).
    Auth {
        mechanism: String,
        initial_response: Option<String>,
    },
}

/// `MAIL FROM:<reverse-path> [params]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MailFrom {
    /// Without brackets and source route; empty for `<>`.
    pub address: String,
    pub size: Option<u64>,
    pub body: Option<BodyType>,
    pub smtputf8: bool,
    pub ret: Option<Ret>,
    pub envid: Option<String>,
    /// `HOLDFOR=` or `HOLDUNTIL=` (RFC 4865); the session decides whether
    /// this listener allows it.
    pub hold: Option<Hold>,
    /// `REQUIRETLS` (RFC 8689): relay only over verified TLS to hosts that
    /// offer REQUIRETLS; the session decides whether it is offered here.
    pub requiretls: bool,
}

/// `RCPT TO:<forward-path> [params]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RcptTo {
    /// Without brackets and source route; may be a bare `postmaster`.
    pub address: String,
    pub notify: Notify,
    /// `addr-type;addr` with the xtext decoded.
    pub orcpt: Option<String>,
}

/// Why a line is not an acceptable command; [`ParseError::reply`] maps it to
/// the reply code.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("empty command")]
    Empty,
    #[error("command not recognized")]
    Unrecognized,
    #[error("bad UTF-8 or control character in command")]
    BadEncoding,
    /// Wrong arguments; the payload is the usage hint.
    #[error("syntax: {0}")]
    Syntax(&'static str),
    #[error("bad address syntax")]
    BadAddress { sender: bool },
    #[error("path too long")]
    PathTooLong { sender: bool },
    #[error("local part too long")]
    LocalPartTooLong { sender: bool },
    /// A known parameter with a bad or repeated value.
    #[error("bad parameter {0}")]
    BadParam(String),
    /// A parameter we do not implement.
    #[error("unsupported parameter {0}")]
    UnknownParam(String),
    /// Two parameters that exclude each other (HOLDFOR and HOLDUNTIL).
    #[error("parameters {0} and {1} exclude each other")]
    Exclusive(&'static str, &'static str),
}

impl ParseError {
    /// The reply for this error. Sender problems use X.1.7, recipient
    /// problems X.1.3 (RFC 3463).
    pub fn reply(&self) -> Reply {
        let addr_code = |sender: bool| if sender { "5.1.7" } else { "5.1.3" };
        match self {
            ParseError::Empty => Reply::new(500, "5.5.2", "Error: bad syntax"),
            ParseError::Unrecognized => Reply::new(500, "5.5.2", "Error: command not recognized"),
            ParseError::BadEncoding => Reply::new(500, "5.5.2", "Error: bad UTF-8 syntax or control character"),
            ParseError::Syntax(usage) => Reply::new(501, "5.5.4", format!("Syntax: {usage}")),
            ParseError::BadAddress { sender } => Reply::new(
                501,
                addr_code(*sender),
                if *sender {
                    "Bad sender address syntax"
                } else {
                    "Bad recipient address syntax"
                },
            ),
            ParseError::PathTooLong { sender } => Reply::new(501, addr_code(*sender), "Path too long"),
            ParseError::LocalPartTooLong { sender } => Reply::new(501, addr_code(*sender), "Local part too long"),
            ParseError::BadParam(p) => Reply::new(501, "5.5.4", format!("Bad {p} parameter syntax")),
            ParseError::UnknownParam(p) => Reply::new(555, "5.5.4", format!("Unsupported option: {p}")),
            ParseError::Exclusive(a, b) => {
                Reply::new(501, "5.5.4", format!("Invalid parameters: {a} and {b} together"))
            }
        }
    }
}

/// Parses one command line without its terminating CRLF or LF.
pub fn parse(line: &[u8]) -> Result<Command, ParseError> {
    let line = std::str::from_utf8(line).map_err(|_| ParseError::BadEncoding)?;
    // Control characters (a bare CR in particular) would end up in logs and
    // in the Received header; no legitimate client sends them.
    if line.chars().any(|c| c.is_control()) {
        return Err(ParseError::BadEncoding);
    }
    let line = line.trim_end_matches(' ');
    if line.is_empty() {
        return Err(ParseError::Empty);
    }
    let (verb, rest) = line.split_once(' ').unwrap_or((line, ""));
    let verb = verb.to_ascii_uppercase();
    let no_args = |cmd: Command, usage: &'static str| {
        if rest.trim().is_empty() {
            Ok(cmd)
        } else {
            Err(ParseError::Syntax(usage))
        }
    };
    match verb.as_str() {
        "EHLO" | "HELO" => {
            let name = rest.trim();
            if name.is_empty() {
                return Err(ParseError::Syntax(if verb == "EHLO" {
                    "EHLO hostname"
                } else {
                    "HELO hostname"
                }));
            }
            Ok(if verb == "EHLO" {
                Command::Ehlo(name.to_string())
            } else {
                Command::Helo(name.to_string())
            })
        }
        "MAIL" => parse_mail(rest).map(Command::Mail),
        "RCPT" => parse_rcpt(rest).map(Command::Rcpt),
        "DATA" => no_args(Command::Data, "DATA"),
        "BDAT" => parse_bdat(rest),
        "RSET" => no_args(Command::Rset, "RSET"),
        "NOOP" => Ok(Command::Noop),
        "QUIT" => no_args(Command::Quit, "QUIT"),
        "STARTTLS" => no_args(Command::StartTls, "STARTTLS"),
        "VRFY" => {
            let arg = rest.trim();
            if arg.is_empty() {
                Err(ParseError::Syntax("VRFY address"))
            } else {
                Ok(Command::Vrfy(arg.to_string()))
            }
        }
        "EXPN" => Ok(Command::Expn),
        "HELP" => Ok(Command::Help),
        "AUTH" => parse_auth(rest),
        _ => Err(ParseError::Unrecognized),
    }
}

/// Strips a case-insensitive ASCII prefix such as `FROM:`.
fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| &s[prefix.len()..])
}

fn parse_mail(rest: &str) -> Result<MailFrom, ParseError> {
    const USAGE: &str = "MAIL FROM:<address>";
    let after = strip_prefix_ci(rest, "FROM:").ok_or(ParseError::Syntax(USAGE))?;
    // RFC 5321 has no space after the colon, but many clients send one.
    let (address, params) = parse_path(after.trim_start_matches(' '), true, USAGE)?;
    let mut mail = MailFrom {
        address,
        ..MailFrom::default()
    };
    for (key, value) in split_params(params, USAGE)? {
        let bad = || ParseError::BadParam(key.clone());
        match key.as_str() {
            "SIZE" => {
                let v = value.ok_or_else(bad)?;
                if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad());
                }
                // More digits than u64 holds is simply "too big".
                mail.size = Some(v.parse().unwrap_or(u64::MAX));
            }
            "BODY" => {
                let v = value.ok_or_else(bad)?.to_ascii_uppercase();
                mail.body = Some(match v.as_str() {
                    "7BIT" => BodyType::SevenBit,
                    "8BITMIME" => BodyType::EightBitMime,
                    "BINARYMIME" => BodyType::BinaryMime,
                    _ => return Err(bad()),
                });
            }
            "SMTPUTF8" => {
                if value.is_some() {
                    return Err(bad());
                }
                mail.smtputf8 = true;
            }
            "RET" => {
                let v = value.ok_or_else(bad)?.to_ascii_uppercase();
                mail.ret = Some(match v.as_str() {
                    "FULL" => Ret::Full,
                    "HDRS" => Ret::Hdrs,
                    _ => return Err(bad()),
                });
            }
            "ENVID" => {
                let v = value.ok_or_else(bad)?;
                let decoded = xtext_decode(v).ok_or_else(bad)?;
                if decoded.is_empty() || decoded.len() > 100 {
                    return Err(bad());
                }
                mail.envid = Some(decoded);
            }
            "HOLDFOR" | "HOLDUNTIL" => {
                // RFC 4865 4: one hold parameter, never both.
                if mail.hold.is_some() {
                    return Err(ParseError::Exclusive("HOLDFOR", "HOLDUNTIL"));
                }
                let v = value.ok_or_else(bad)?;
                let hold = if key == "HOLDFOR" {
                    future_release::parse_holdfor(v)
                } else {
                    future_release::parse_holduntil(v)
                };
                mail.hold = Some(hold.ok_or_else(bad)?);
            }
            "REQUIRETLS" => {
                if value.is_some() {
                    return Err(bad());
                }
                mail.requiretls = true;
            }
            // RFC 4954: without AUTH advertised, accepted and ignored.
            "AUTH" => {}
            _ => return Err(ParseError::UnknownParam(key)),
        }
    }
    Ok(mail)
}

fn parse_rcpt(rest: &str) -> Result<RcptTo, ParseError> {
    const USAGE: &str = "RCPT TO:<address>";
    let after = strip_prefix_ci(rest, "TO:").ok_or(ParseError::Syntax(USAGE))?;
    let (address, params) = parse_path(after.trim_start_matches(' '), false, USAGE)?;
    let mut rcpt = RcptTo {
        address,
        ..RcptTo::default()
    };
    for (key, value) in split_params(params, USAGE)? {
        let bad = || ParseError::BadParam(key.clone());
        match key.as_str() {
            "NOTIFY" => {
                let v = value.ok_or_else(bad)?;
                let mut n = Notify {
                    given: true,
                    ..Notify::default()
                };
                for item in v.split(',') {
                    let flag = match item.to_ascii_uppercase().as_str() {
                        "NEVER" => &mut n.never,
                        "SUCCESS" => &mut n.success,
                        "FAILURE" => &mut n.failure,
                        "DELAY" => &mut n.delay,
                        _ => return Err(bad()),
                    };
                    *flag = true;
                }
                // RFC 3461 4.1: NEVER stands alone.
                if n.never && (n.success || n.failure || n.delay) {
                    return Err(bad());
                }
                rcpt.notify = n;
            }
            "ORCPT" => {
                let v = value.ok_or_else(bad)?;
                let (addr_type, xtext) = v.split_once(';').ok_or_else(bad)?;
                let valid_type =
                    !addr_type.is_empty() && addr_type.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
                let decoded = xtext_decode(xtext).ok_or_else(bad)?;
                if !valid_type || decoded.is_empty() {
                    return Err(bad());
                }
                rcpt.orcpt = Some(format!("{addr_type};{decoded}"));
            }
            _ => return Err(ParseError::UnknownParam(key)),
        }
    }
    Ok(rcpt)
}

fn parse_bdat(rest: &str) -> Result<Command, ParseError> {
    const USAGE: &str = "BDAT chunk-size [LAST]";
    let mut words = rest.split(' ').filter(|w| !w.is_empty());
    let size = words.next().ok_or(ParseError::Syntax(USAGE))?;
    if !size.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ParseError::Syntax(USAGE));
    }
    let size: u64 = size.parse().map_err(|_| ParseError::Syntax(USAGE))?;
    let last = match words.next() {
        None => false,
        Some(w) if w.eq_ignore_ascii_case("LAST") => true,
        Some(_) => return Err(ParseError::Syntax(USAGE)),
    };
    if words.next().is_some() {
        return Err(ParseError::Syntax(USAGE));
    }
    Ok(Command::Bdat { size, last })
}

fn parse_auth(rest: &str) -> Result<Command, ParseError> {
    const USAGE: &str = "AUTH mechanism [initial-response]";
    let mut words = rest.split(' ').filter(|w| !w.is_empty());
    let mechanism = words.next().ok_or(ParseError::Syntax(USAGE))?;
    // RFC 4422 3.1: 1 to 20 of A-Z, 0-9, '-' and '_'.
    let valid = mechanism.len() <= 20
        && mechanism
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !valid {
        return Err(ParseError::Syntax(USAGE));
    }
    let initial_response = words.next().map(str::to_string);
    if words.next().is_some() {
        return Err(ParseError::Syntax(USAGE));
    }
    Ok(Command::Auth {
        mechanism: mechanism.to_ascii_uppercase(),
        initial_response,
    })
}

/// Splits `KEY[=VALUE]` parameters; keys are returned upper-cased and a
/// key given twice is refused.
fn split_params<'a>(s: &'a str, usage: &'static str) -> Result<Vec<(String, Option<&'a str>)>, ParseError> {
    if !s.is_empty() && !s.starts_with(' ') {
        return Err(ParseError::Syntax(usage));
    }
    let mut out = Vec::new();
    for p in s.split(' ').filter(|p| !p.is_empty()) {
        let (k, v) = match p.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (p, None),
        };
        if k.is_empty() || !k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(ParseError::Syntax(usage));
        }
        out.push((k.to_ascii_uppercase(), v));
    }
    // A parameter given twice is refused (checked after syntax, as before).
    for (i, (k, _)) in out.iter().enumerate() {
        if out[..i].iter().any(|(seen, _)| seen == k) {
            return Err(ParseError::BadParam(k.clone()));
        }
    }
    Ok(out)
}

/// Parses `<path>` at the start of `s`; returns the mailbox (source route
/// dropped) and the remainder after `>`.
fn parse_path<'a>(s: &'a str, sender: bool, usage: &'static str) -> Result<(String, &'a str), ParseError> {
    let bytes = s.as_bytes();
    if bytes.first() != Some(&b'<') {
        return Err(ParseError::Syntax(usage));
    }
    // Find the closing '>' outside a quoted local part.
    let mut in_quote = false;
    let mut escaped = false;
    let mut end = None;
    for (i, &b) in bytes.iter().enumerate().skip(1) {
        if escaped {
            escaped = false;
        } else if in_quote && b == b'\\' {
            escaped = true;
        } else if b == b'"' {
            in_quote = !in_quote;
        } else if b == b'>' && !in_quote {
            end = Some(i);
            break;
        }
    }
    let end = end.ok_or(ParseError::Syntax(usage))?;
    if end + 1 > MAX_PATH_LEN {
        return Err(ParseError::PathTooLong { sender });
    }
    let inner = &s[1..end];
    let rest = &s[end + 1..];
    if inner.is_empty() {
        return if sender {
            Ok((String::new(), rest))
        } else {
            Err(ParseError::BadAddress { sender })
        };
    }
    let mailbox = strip_source_route(inner).ok_or(ParseError::BadAddress { sender })?;
    if !sender && mailbox.eq_ignore_ascii_case("postmaster") {
        return Ok((mailbox.to_string(), rest));
    }
    validate_mailbox(mailbox, sender)?;
    Ok((mailbox.to_string(), rest))
}

/// `@a,@b:user@d` -> `user@d` (RFC 5321 4.1.2: routes must be accepted and
/// may be ignored).
fn strip_source_route(inner: &str) -> Option<&str> {
    if !inner.starts_with('@') {
        return Some(inner);
    }
    let (route, mailbox) = inner.split_once(':')?;
    for hop in route.split(',') {
        let domain = hop.strip_prefix('@')?;
        if !valid_domain(domain) {
            return None;
        }
    }
    Some(mailbox)
}

fn validate_mailbox(mailbox: &str, sender: bool) -> Result<(), ParseError> {
    let bad = ParseError::BadAddress { sender };
    let (local, domain) = mailbox.rsplit_once('@').ok_or(bad.clone())?;
    if local.len() > MAX_LOCAL_PART_LEN {
        return Err(ParseError::LocalPartTooLong { sender });
    }
    if !valid_local_part(local) || !valid_domain(domain) {
        return Err(bad);
    }
    Ok(())
}

fn valid_local_part(local: &str) -> bool {
    if local.is_empty() {
        return false;
    }
    if let Some(q) = local.strip_prefix('"') {
        let Some(body) = q.strip_suffix('"') else {
            return false;
        };
        let mut escaped = false;
        for c in body.chars() {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                return false;
            }
        }
        return !escaped;
    }
    // Dot-string; non-ASCII is UTF-8 atext (RFC 6531), checked by the session
    // against the SMTPUTF8 parameter.
    local
        .chars()
        .all(|c| !c.is_ascii() || c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~.".contains(c))
}

fn valid_domain(domain: &str) -> bool {
    if domain.is_empty() {
        return false;
    }
    if let Some(lit) = domain.strip_prefix('[') {
        let Some(body) = lit.strip_suffix(']') else {
            return false;
        };
        return !body.is_empty()
            && body
                .chars()
                .all(|c| c.is_ascii_graphic() && !matches!(c, '[' | ']' | '\\'));
    }
    domain.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .chars()
                .all(|c| !c.is_ascii() || c.is_ascii_alphanumeric() || c == '-' || c == '_')
    })
}

/// Decodes xtext (RFC 3461 4): `+XX` is a hex-encoded octet. Returns `None`
/// on a malformed escape, a raw `+`/`=`, or a result that is not UTF-8.
pub fn xtext_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => {
                let hex = s.get(i + 1..i + 3)?;
                if !hex.bytes().all(|h| h.is_ascii_hexdigit()) {
                    return None;
                }
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'=' => return None,
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Command, ParseError> {
        parse(s.as_bytes())
    }

    fn mail(s: &str) -> MailFrom {
        match p(s).unwrap() {
            Command::Mail(m) => m,
            other => panic!("not MAIL: {other:?}"),
        }
    }

    fn rcpt(s: &str) -> RcptTo {
        match p(s).unwrap() {
            Command::Rcpt(r) => r,
            other => panic!("not RCPT: {other:?}"),
        }
    }

    #[test]
    fn simple_verbs_are_case_insensitive() {
        assert_eq!(
            p("ehlo client.example").unwrap(),
            Command::Ehlo("client.example".into())
        );
        assert_eq!(p("HELO x").unwrap(), Command::Helo("x".into()));
        assert_eq!(p("data").unwrap(), Command::Data);
        assert_eq!(p("Quit").unwrap(), Command::Quit);
        assert_eq!(p("RSET ").unwrap(), Command::Rset);
        assert_eq!(p("NOOP hello").unwrap(), Command::Noop);
        assert_eq!(p("STARTTLS").unwrap(), Command::StartTls);
        assert_eq!(p("EXPN list").unwrap(), Command::Expn);
        assert_eq!(p("HELP").unwrap(), Command::Help);
        assert_eq!(p("VRFY bob").unwrap(), Command::Vrfy("bob".into()));
    }

    #[test]
    fn auth() {
        assert_eq!(
            p("auth plain").unwrap(),
            Command::Auth {
                mechanism: "PLAIN".into(),
                initial_response: None
            }
        );
        assert_eq!(
            p("AUTH PLAIN AGFsaWNlAHB3").unwrap(),
            Command::Auth {
                mechanism: "PLAIN".into(),
                initial_response: Some("AGFsaWNlAHB3".into())
            }
        );
        assert_eq!(
            p("AUTH SCRAM-SHA-256 =").unwrap(),
            Command::Auth {
                mechanism: "SCRAM-SHA-256".into(),
                initial_response: Some("=".into())
            }
        );
        let usage = Err(ParseError::Syntax("AUTH mechanism [initial-response]"));
        assert_eq!(p("AUTH"), usage);
        assert_eq!(p("AUTH PLAIN a b"), usage);
        assert_eq!(p("AUTH PL@IN"), usage);
        assert_eq!(p("AUTH ABCDEFGHIJKLMNOPQRSTU"), usage);
    }

    #[test]
    fn bad_lines() {
        assert_eq!(p(""), Err(ParseError::Empty));
        assert_eq!(p("FOO bar"), Err(ParseError::Unrecognized));
        assert_eq!(parse(b"MAIL \xff"), Err(ParseError::BadEncoding));
        assert_eq!(p("NOOP a\rb"), Err(ParseError::BadEncoding));
        assert_eq!(p("EHLO"), Err(ParseError::Syntax("EHLO hostname")));
        assert_eq!(p("DATA x"), Err(ParseError::Syntax("DATA")));
        assert_eq!(p("VRFY"), Err(ParseError::Syntax("VRFY address")));
        assert_eq!(p("MAIL TO:<a@b>"), Err(ParseError::Syntax("MAIL FROM:<address>")));
        assert_eq!(p("MAIL FROM:a@b"), Err(ParseError::Syntax("MAIL FROM:<address>")));
        assert_eq!(p("MAIL FROM:<a@b"), Err(ParseError::Syntax("MAIL FROM:<address>")));
        assert_eq!(p("MAIL FROM:<a@b>X"), Err(ParseError::Syntax("MAIL FROM:<address>")));
        assert_eq!(p("RCPT TO:<>"), Err(ParseError::BadAddress { sender: false }));
        assert_eq!(p("RCPT TO:<bob>"), Err(ParseError::BadAddress { sender: false }));
        assert_eq!(p("MAIL FROM:<a@b..c>"), Err(ParseError::BadAddress { sender: true }));
        assert_eq!(p("MAIL FROM:<a b@c>"), Err(ParseError::BadAddress { sender: true }));
        assert_eq!(p("RCPT TO:<a@[1.2.3.4>"), Err(ParseError::BadAddress { sender: false }));
    }

    #[test]
    fn mail_paths() {
        assert_eq!(mail("MAIL FROM:<>").address, "");
        assert_eq!(mail("mail from:<Smith@bar.com>").address, "Smith@bar.com");
        assert_eq!(mail("MAIL FROM: <a@b.example>").address, "a@b.example");
        assert_eq!(
            mail("MAIL FROM:<@a.example,@b.example:u@d.example>").address,
            "u@d.example"
        );
        assert_eq!(mail("MAIL FROM:<\"a >b\"@d.example>").address, "\"a >b\"@d.example");
        assert_eq!(mail("MAIL FROM:<u@[192.0.2.1]>").address, "u@[192.0.2.1]");
        assert_eq!(rcpt("RCPT TO:<Postmaster>").address, "Postmaster");
        assert_eq!(rcpt("RCPT TO:<Jones@foo.com>").address, "Jones@foo.com");
        assert_eq!(
            rcpt("RCPT TO:<δοκιμή@παράδειγμα.δοκιμή>").address,
            "δοκιμή@παράδειγμα.δοκιμή"
        );
    }

    #[test]
    fn path_and_local_part_limits() {
        // 256 octets including brackets is fine, 257 is not.
        let domain = format!("{}.{}.{}.example", "a".repeat(60), "b".repeat(60), "c".repeat(60));
        let local = "l".repeat(256 - 2 - 1 - domain.len());
        let ok = format!("MAIL FROM:<{local}@{domain}>");
        assert_eq!(mail(&ok).address.len(), 254);
        let too_long = format!("RCPT TO:<{local}x@{domain}>");
        assert_eq!(p(&too_long), Err(ParseError::PathTooLong { sender: false }));
        let l64 = "a".repeat(64);
        assert_eq!(rcpt(&format!("RCPT TO:<{l64}@d.example>")).address.len(), 74);
        assert_eq!(
            p(&format!("RCPT TO:<{l64}a@d.example>")),
            Err(ParseError::LocalPartTooLong { sender: false })
        );
        assert_eq!(
            ParseError::PathTooLong { sender: false }.reply().to_string(),
            "501 5.1.3 Path too long"
        );
    }

    #[test]
    fn mail_params() {
        let m = mail("MAIL FROM:<a@b.example> SIZE=1000 BODY=8bitmime SMTPUTF8 RET=HDRS ENVID=abc+2Bdef AUTH=<>");
        assert_eq!(m.size, Some(1000));
        assert_eq!(m.body, Some(BodyType::EightBitMime));
        assert!(m.smtputf8);
        assert_eq!(m.ret, Some(Ret::Hdrs));
        assert_eq!(m.envid.as_deref(), Some("abc+def"));
        assert_eq!(
            mail("MAIL FROM:<> body=BINARYMIME ret=full").body,
            Some(BodyType::BinaryMime)
        );
        assert_eq!(mail("MAIL FROM:<> SIZE=99999999999999999999999").size, Some(u64::MAX));
        assert_eq!(p("MAIL FROM:<> SIZE=12a"), Err(ParseError::BadParam("SIZE".into())));
        assert_eq!(
            p("MAIL FROM:<> SIZE=1 SIZE=2"),
            Err(ParseError::BadParam("SIZE".into()))
        );
        assert_eq!(p("MAIL FROM:<> BODY=9BIT"), Err(ParseError::BadParam("BODY".into())));
        assert_eq!(p("MAIL FROM:<> RET=ALL"), Err(ParseError::BadParam("RET".into())));
        assert_eq!(p("MAIL FROM:<> ENVID=a+2"), Err(ParseError::BadParam("ENVID".into())));
        assert_eq!(
            p("MAIL FROM:<> SMTPUTF8=yes"),
            Err(ParseError::BadParam("SMTPUTF8".into()))
        );
        assert_eq!(p("MAIL FROM:<> FOO=bar"), Err(ParseError::UnknownParam("FOO".into())));
        assert_eq!(
            ParseError::UnknownParam("FOO".into()).reply().to_string(),
            "555 5.5.4 Unsupported option: FOO"
        );
    }

    #[test]
    fn hold_params() {
        assert_eq!(mail("MAIL FROM:<a@b.example> HOLDFOR=8").hold, Some(Hold::For(8)));
        assert_eq!(
            mail("MAIL FROM:<a@b.example> holduntil=2026-12-07T09:00:00Z").hold,
            Some(Hold::Until(1_796_634_000))
        );
        assert_eq!(mail("MAIL FROM:<a@b.example>").hold, None);
        assert_eq!(
            p("MAIL FROM:<> HOLDFOR=8 HOLDUNTIL=2026-12-07T09:00:00Z"),
            Err(ParseError::Exclusive("HOLDFOR", "HOLDUNTIL"))
        );
        assert_eq!(
            p("MAIL FROM:<> HOLDUNTIL=2026-12-07T09:00:00Z HOLDFOR=8")
                .unwrap_err()
                .reply()
                .to_string(),
            "501 5.5.4 Invalid parameters: HOLDFOR and HOLDUNTIL together"
        );
        for bad in [
            "HOLDFOR",
            "HOLDFOR=",
            "HOLDFOR=1234567890",
            "HOLDFOR=-1",
            "HOLDUNTIL=2026-12-07",
        ] {
            let key = bad.split('=').next().unwrap_or_default();
            assert_eq!(
                p(&format!("MAIL FROM:<> {bad}")),
                Err(ParseError::BadParam(key.into())),
                "{bad}"
            );
        }
        assert_eq!(
            ParseError::BadParam("HOLDFOR".into()).reply().to_string(),
            "501 5.5.4 Bad HOLDFOR parameter syntax"
        );
    }

    #[test]
    fn rcpt_params() {
        let r = rcpt("RCPT TO:<bob@d.example> NOTIFY=SUCCESS,delay ORCPT=rfc822;bob+40d.example");
        assert_eq!(
            r.notify,
            Notify {
                given: true,
                never: false,
                success: true,
                failure: false,
                delay: true
            }
        );
        assert_eq!(r.orcpt.as_deref(), Some("rfc822;bob@d.example"));
        assert!(rcpt("RCPT TO:<b@d.example> NOTIFY=NEVER").notify.never);
        assert!(!rcpt("RCPT TO:<b@d.example>").notify.given);
        assert_eq!(
            p("RCPT TO:<b@d.example> NOTIFY=NEVER,SUCCESS"),
            Err(ParseError::BadParam("NOTIFY".into()))
        );
        assert_eq!(
            p("RCPT TO:<b@d.example> NOTIFY=SOMETIMES"),
            Err(ParseError::BadParam("NOTIFY".into()))
        );
        assert_eq!(
            p("RCPT TO:<b@d.example> ORCPT=bob"),
            Err(ParseError::BadParam("ORCPT".into()))
        );
        assert_eq!(
            p("RCPT TO:<b@d.example> SIZE=1"),
            Err(ParseError::UnknownParam("SIZE".into()))
        );
    }

    #[test]
    fn bdat() {
        assert_eq!(p("BDAT 0 LAST").unwrap(), Command::Bdat { size: 0, last: true });
        assert_eq!(p("bdat 123").unwrap(), Command::Bdat { size: 123, last: false });
        assert_eq!(p("BDAT 12 last").unwrap(), Command::Bdat { size: 12, last: true });
        assert!(p("BDAT").is_err());
        assert!(p("BDAT -1").is_err());
        assert!(p("BDAT 1 MORE").is_err());
        assert!(p("BDAT 1 LAST X").is_err());
        assert!(p("BDAT 99999999999999999999999").is_err());
    }

    #[test]
    fn xtext() {
        assert_eq!(xtext_decode("abc+2Bdef").as_deref(), Some("abc+def"));
        assert_eq!(xtext_decode("a+3Db").as_deref(), Some("a=b"));
        assert_eq!(xtext_decode("plain").as_deref(), Some("plain"));
        assert_eq!(xtext_decode("+").as_deref(), None);
        assert_eq!(xtext_decode("+4").as_deref(), None);
        assert_eq!(xtext_decode("+ZZ").as_deref(), None);
        assert_eq!(xtext_decode("+FF").as_deref(), None);
        assert_eq!(xtext_decode("+C3+A9").as_deref(), Some("é"));
        assert_eq!(xtext_decode("é+2B").as_deref(), Some("é+"));
    }

    #[test]
    fn never_panics_on_odd_input() {
        for s in [
            "MAIL FROM:",
            "MAIL FROM:<",
            "MAIL FROM:<\"",
            "MAIL FROM:<\"\\>",
            "RCPT TO:<@>",
            "RCPT TO:<@a:>",
            "RCPT TO:<@:b@c>",
            "MAIL",
            "MAIL FRO",
            "RCPT TO:<a@é>",
            "MAIL FROM:<> =",
            "MAIL FROM:<> ENVID=+é",
            "RCPT TO:<a@b> ORCPT=;",
            "MAIL FROM:<a@[]>",
        ] {
            let _ = p(s);
        }
    }
}
