//! The SMTP envelope of a message as accepted, stored with it in the queue.
//!
//! Shared by the SMTP server (which builds it) and the queue (which stores
//! and later hands it to delivery). Field names follow RFC 5321 / RFC 3461.

use serde::{Deserialize, Serialize};

/// Body type declared with `MAIL FROM ... BODY=` (RFC 6152, RFC 3030).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum BodyType {
    #[default]
    SevenBit,
    EightBitMime,
    BinaryMime,
}

/// `RET=` of RFC 3461: what a bounce should carry of the original.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ret {
    Full,
    Hdrs,
}

/// `NOTIFY=` of RFC 3461 as flags. `never` excludes the other three.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notify {
    /// NOTIFY was given at all (absent means "failure,delay" by default).
    pub given: bool,
    pub never: bool,
    pub success: bool,
    pub failure: bool,
    pub delay: bool,
}

/// One forward-path with its DSN parameters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipient {
    /// The address as given, without angle brackets (source route removed).
    pub address: String,
    pub notify: Notify,
    /// `ORCPT=` as `addr-type;addr` with the xtext decoded, e.g. `rfc822;bob@example.test`.
    pub orcpt: Option<String>,
}

/// What the client told us in MAIL/RCPT.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Reverse-path without brackets; empty for the null sender `<>`.
    pub reverse_path: String,
    pub recipients: Vec<Recipient>,
    pub body_type: BodyType,
    /// The client asked for SMTPUTF8 (RFC 6531).
    pub smtputf8: bool,
    pub ret: Option<Ret>,
    /// `ENVID=` with the xtext decoded.
    pub envid: Option<String>,
    /// `SIZE=` declared at MAIL, if any.
    pub declared_size: Option<u64>,
    /// HELO/EHLO name the client gave.
    pub helo: String,
    /// Client IP address as text.
    pub client_ip: String,
    /// SMTP AUTH identity of the submitting user, if the session authenticated.
    pub auth_user: Option<String>,
}

impl Envelope {
    /// Domain part of an address (lowercased), or empty for a bare local part.
    pub fn domain_of(address: &str) -> String {
        address
            .rsplit_once('@')
            .map(|(_, d)| d.to_ascii_lowercase())
            .unwrap_or_default()
    }
}
