//! Wire pieces of SMTP AUTH (RFC 4954) for the PLAIN (RFC 4616) and LOGIN
//! mechanisms: base64 responses and the PLAIN message. Pure functions over
//! bytes; the session keeps the exchange's state.

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;

/// Mechanisms we offer, in the EHLO `AUTH` line.
pub const MECHANISMS: &str = "PLAIN LOGIN";

/// LOGIN's challenges, base64 of `Username:` and `Password:`.
pub const LOGIN_USERNAME: &str = "VXNlcm5hbWU6";
pub const LOGIN_PASSWORD: &str = "UGFzc3dvcmQ6";

/// Some clients leave out the `=` padding; accept both forms.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A password as received; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(Vec<u8>);

impl Password {
    pub fn new(bytes: Vec<u8>) -> Self {
        Password(bytes)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

/// Decodes the initial response of an `AUTH` command: `=` is the empty one.
pub fn decode_initial(arg: &str) -> Option<Vec<u8>> {
    if arg == "=" {
        return Some(Vec::new());
    }
    BASE64.decode(arg).ok()
}

/// Decodes a response line to a `334` challenge (without CRLF); `None` for
/// bad base64. The caller checks for `*` (cancel) first.
pub fn decode_response(line: &[u8]) -> Option<Vec<u8>> {
    BASE64.decode(line).ok()
}

/// A PLAIN message: `[authzid] NUL authcid NUL passwd`.
#[derive(Debug, PartialEq, Eq)]
pub struct Plain {
    /// Empty when the client did not ask to act as someone else.
    pub authzid: String,
    pub authcid: String,
    pub password: Password,
}

/// Splits a decoded PLAIN message; `None` if it is malformed (not three
/// parts, names that are not UTF-8 or hold control characters, an empty
/// user name).
pub fn parse_plain(data: &[u8]) -> Option<Plain> {
    let mut parts = data.splitn(3, |&b| b == 0);
    let authzid = valid_name(parts.next()?)?;
    let authcid = valid_name(parts.next()?)?;
    let password = parts.next()?;
    if authcid.is_empty() || password.contains(&0) {
        return None;
    }
    Some(Plain {
        authzid,
        authcid,
        password: Password::new(password.to_vec()),
    })
}

/// A user name as UTF-8 without control characters (they would end up in
/// logs and headers), or `None`.
pub fn valid_name(bytes: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(bytes).ok()?;
    (!s.chars().any(char::is_control)).then(|| s.to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn base64_forms() {
        assert_eq!(decode_initial("=").unwrap(), b"");
        assert_eq!(decode_initial("YWxpY2U=").unwrap(), b"alice");
        assert_eq!(decode_initial("YWxpY2U").unwrap(), b"alice");
        assert_eq!(decode_response(b"").unwrap(), b"");
        assert!(decode_response(b"*").is_none());
        assert!(decode_response(b"not base64!").is_none());
        assert_eq!(decode_response(LOGIN_USERNAME.as_bytes()).unwrap(), b"Username:");
        assert_eq!(decode_response(LOGIN_PASSWORD.as_bytes()).unwrap(), b"Password:");
    }

    #[test]
    fn plain_messages() {
        let p = parse_plain(b"\0alice\0secret").unwrap();
        assert_eq!((p.authzid.as_str(), p.authcid.as_str()), ("", "alice"));
        assert_eq!(p.password.as_bytes(), b"secret");
        let p = parse_plain(b"alice\0alice\0pw").unwrap();
        assert_eq!(p.authzid, "alice");
        assert!(parse_plain(b"alice\0secret").is_none());
        assert!(parse_plain(b"\0\0secret").is_none());
        assert!(parse_plain(b"\0alice\0se\0cret").is_none());
        assert!(parse_plain(b"\0al\rice\0secret").is_none());
        assert!(parse_plain(b"\0\xffalice\0secret").is_none());
        assert_eq!(format!("{:?}", p.password), "Password(<redacted>)");
    }
}
