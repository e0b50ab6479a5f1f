//! One sender address or domain an SMTP AUTH user may use in MAIL FROM:
//! written in `[auth] senders` and in the users file.

/// An entry that is neither `user@domain` nor `@domain`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an address (user@domain) or a domain (@domain)")]
pub struct NotOwnable(pub String);

/// One address or domain a user may use as the sender (MAIL FROM).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Owned {
    /// The local part as written and the domain in lower case.
    Address { local: String, domain: String },
    /// `@domain`: every address in the domain (lower case).
    Domain(String),
}

impl Owned {
    /// Parses `user@domain` or `@domain`.
    pub fn parse(s: &str) -> Result<Owned, NotOwnable> {
        let s = s.trim();
        let bad = || NotOwnable(s.to_owned());
        let (local, domain) = s.rsplit_once('@').ok_or_else(bad)?;
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        if domain.is_empty()
            || s.chars()
                .any(|c| c.is_whitespace() || c.is_control() || c == ',' || c == ':')
        {
            return Err(bad());
        }
        Ok(if local.is_empty() {
            Owned::Domain(domain)
        } else {
            Owned::Address {
                local: local.to_string(),
                domain,
            }
        })
    }

    /// Whether `local@domain` is this address, or in this domain (the local
    /// part compared as written, the domain without regard to ASCII case).
    pub fn matches(&self, local: &str, domain: &str) -> bool {
        match self {
            Owned::Domain(d) => d.eq_ignore_ascii_case(domain),
            Owned::Address { local: l, domain: d } => l == local && d.eq_ignore_ascii_case(domain),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_match() {
        let a = Owned::parse(" alice@Example.COM. ").unwrap();
        assert!(a.matches("alice", "example.com"));
        assert!(!a.matches("Alice", "example.com"));
        assert_eq!(
            Owned::parse("@team.example").unwrap(),
            Owned::Domain("team.example".into())
        );
        assert_eq!(
            Owned::parse("example.com").unwrap_err().to_string(),
            "\"example.com\" is not an address (user@domain) or a domain (@domain)"
        );
        assert!(Owned::parse("a@").is_err());
        assert!(Owned::parse("a b@c").is_err());
    }
}
