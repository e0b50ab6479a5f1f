//! Bounce classes: what kind of failure a remote (or our own) reply
//! reports, as events, `ternctl stats`, metrics and the suppression list
//! name it. The names are stable: operators match on them in
//! `[[bounce_class]]`, `[suppression] classes` and event consumers.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The class of a failed or deferred recipient.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Class {
    /// The mailbox does not exist (5.1.1, 5.1.10, "user unknown").
    InvalidRecipient,
    /// The mailbox is over quota (4.2.2, 5.2.2).
    MailboxFull,
    /// The mailbox exists but is disabled or inactive (5.2.1).
    Inactive,
    /// The message was refused as spam or for its content.
    SpamBlock,
    /// Refused by the receiver's policy (relaying, sender policy, DMARC, ...).
    Policy,
    /// Our IP address or domain is blocked or has a poor reputation.
    Reputation,
    /// The recipient's domain does not resolve (NXDOMAIN, Null MX, no MX).
    DnsFailure,
    /// No route or connection to the destination (4.4.x, 5.4.x).
    Routing,
    /// The message is too large (5.3.4, 5.2.3).
    MessageTooLarge,
    /// The destination or our policy requires TLS (5.7.10, 5.7.11).
    TlsRequired,
    /// Not attempted: the recipient is on the suppression list.
    Suppressed,
    /// Nothing more specific matched.
    Other,
}

impl Class {
    /// Every class, in the order `ternctl stats` prints them.
    pub const ALL: [Class; 12] = [
        Class::InvalidRecipient,
        Class::MailboxFull,
        Class::Inactive,
        Class::SpamBlock,
        Class::Policy,
        Class::Reputation,
        Class::DnsFailure,
        Class::Routing,
        Class::MessageTooLarge,
        Class::TlsRequired,
        Class::Suppressed,
        Class::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Class::InvalidRecipient => "invalid_recipient",
            Class::MailboxFull => "mailbox_full",
            Class::Inactive => "inactive",
            Class::SpamBlock => "spam_block",
            Class::Policy => "policy",
            Class::Reputation => "reputation",
            Class::DnsFailure => "dns_failure",
            Class::Routing => "routing",
            Class::MessageTooLarge => "message_too_large",
            Class::TlsRequired => "tls_required",
            Class::Suppressed => "suppressed",
            Class::Other => "other",
        }
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not a bounce class.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownClass(pub String);

impl fmt::Display for UnknownClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = Class::ALL.iter().map(|c| c.as_str()).collect();
        write!(f, "{:?} is not a bounce class (one of {})", self.0, names.join(", "))
    }
}

impl std::error::Error for UnknownClass {}

impl FromStr for Class {
    type Err = UnknownClass;

    fn from_str(s: &str) -> Result<Class, UnknownClass> {
        Class::ALL
            .iter()
            .copied()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| UnknownClass(s.to_owned()))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_listed() {
        for c in Class::ALL {
            assert_eq!(c.as_str().parse::<Class>().unwrap(), c);
        }
        let e = "hard".parse::<Class>().unwrap_err().to_string();
        assert!(e.contains("\"hard\"") && e.contains("invalid_recipient"), "{e}");
    }
}
