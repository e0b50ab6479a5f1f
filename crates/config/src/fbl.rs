//! `[fbl]`: feedback loops. Mail to the addresses listed here is an ARF
//! report (RFC 5965) from a mailbox provider: the node consumes it when it
//! accepts it, records a complaint and suppresses the complained-about
//! recipient (docs/deliverability.md, "Feedback loops").

use std::time::Duration;

use serde::Deserialize;

use crate::ConfigError;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFbl {
    addresses: Option<Vec<String>>,
    keep: Option<bool>,
    scope: Option<String>,
    expire_after: Option<String>,
    suppress_types: Option<Vec<String>>,
    reporters: Option<Vec<String>>,
}

/// Where a complaint's suppression entry goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FblScope {
    /// The global list: no sender's mail goes to the recipient.
    Global,
    /// The list of the original sender's domain (a tenant's own list).
    Sender,
}

/// Feedback types of RFC 5965 (and its registry) accepted in `suppress_types`.
pub const FEEDBACK_TYPES: &[&str] = &["abuse", "fraud", "virus", "other", "not-spam", "auth-failure"];

/// `[fbl]`, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FblConfig {
    /// Whole addresses (lowercase) that receive reports.
    pub addresses: Vec<String>,
    /// Domains (lowercase; written `@domain`) every address of which receives reports.
    pub domains: Vec<String>,
    /// Deliver reports on as usual after processing them (default: consume them).
    pub keep: bool,
    pub scope: FblScope,
    /// How long a complaint's suppression lasts; `None`: until removed.
    pub expire_after: Option<Duration>,
    /// Feedback types that suppress the recipient (lowercase); other
    /// reports are only logged.
    pub suppress_types: Vec<String>,
    /// Domains (lowercase) whose reports are trusted: the report's From
    /// must be in one of them or a subdomain; empty: every reporter.
    pub reporters: Vec<String>,
}

impl Default for FblConfig {
    fn default() -> Self {
        FblConfig {
            addresses: Vec::new(),
            domains: Vec::new(),
            keep: false,
            scope: FblScope::Global,
            expire_after: None,
            suppress_types: vec!["abuse".into(), "fraud".into()],
            reporters: Vec::new(),
        }
    }
}

impl FblConfig {
    /// Whether any address or domain is configured.
    pub fn enabled(&self) -> bool {
        !self.addresses.is_empty() || !self.domains.is_empty()
    }

    /// Whether a report whose From address is `from` may be acted on.
    pub fn trusts(&self, from: &str) -> bool {
        if self.reporters.is_empty() {
            return true;
        }
        let domain = from
            .rsplit_once('@')
            .map_or("", |(_, d)| d)
            .trim_end_matches('.')
            .to_ascii_lowercase();
        self.reporters.iter().any(|r| {
            domain == *r
                || (domain.len() > r.len()
                    && domain.ends_with(r.as_str())
                    && domain[..domain.len() - r.len()].ends_with('.'))
        })
    }

    /// Whether mail to `address` (as the client wrote it) is a feedback report.
    pub fn is_report_address(&self, address: &str) -> bool {
        if !self.enabled() {
            return false;
        }
        let address = address.trim().trim_matches(['<', '>']).to_ascii_lowercase();
        let domain = address.rsplit_once('@').map(|(_, d)| d.trim_end_matches('.'));
        self.addresses.contains(&address) || domain.is_some_and(|d| self.domains.iter().any(|x| x == d))
    }
}

/// Validates `[fbl]`; every address's domain must be one the node accepts
/// mail for from anyone (`policy.local_domains` or `policy.relay_domains`),
/// else no provider could deliver a report to it.
pub(super) fn validate(raw: RawFbl, accepted_domains: &[&String]) -> Result<FblConfig, ConfigError> {
    let mut config = FblConfig {
        keep: raw.keep.unwrap_or(false),
        ..FblConfig::default()
    };
    for entry in raw.addresses.unwrap_or_default() {
        let lowered = entry.trim().to_ascii_lowercase();
        let (local, domain) = lowered.rsplit_once('@').ok_or_else(|| ConfigError::Invalid {
            key: "fbl.addresses",
            reason: format!("{entry:?} is neither an address (fbl@example.com) nor a domain (@fbl.example.com)"),
        })?;
        let domain = domain.trim_end_matches('.');
        if !crate::is_domain_name(domain) || local.contains(char::is_whitespace) || local.contains(['<', '>', '@']) {
            return Err(ConfigError::Invalid {
                key: "fbl.addresses",
                reason: format!("{entry:?} is neither an address (fbl@example.com) nor a domain (@fbl.example.com)"),
            });
        }
        if !accepted_domains.iter().any(|d| d.as_str() == domain) {
            return Err(ConfigError::Invalid {
                key: "fbl.addresses",
                reason: format!(
                    "{entry:?}: {domain} is not in policy.local_domains or policy.relay_domains, so no provider could deliver a report to it"
                ),
            });
        }
        if local.is_empty() {
            config.domains.push(domain.to_owned());
        } else {
            config.addresses.push(format!("{local}@{domain}"));
        }
    }
    config.scope = match raw.scope.as_deref() {
        None | Some("global") => FblScope::Global,
        Some("sender") => FblScope::Sender,
        Some(other) => {
            return Err(ConfigError::Invalid {
                key: "fbl.scope",
                reason: format!("{other:?} is not global or sender"),
            })
        }
    };
    config.expire_after = match raw.expire_after.as_deref() {
        None | Some("never") => None,
        Some(text) => match crate::parse_duration(text) {
            Ok(d) if d.is_zero() => {
                return Err(ConfigError::Invalid {
                    key: "fbl.expire_after",
                    reason: "must be longer than 0 (leave it out, or write \"never\", for no expiry)".into(),
                })
            }
            Ok(d) => Some(d),
            Err(e) => {
                return Err(ConfigError::Invalid {
                    key: "fbl.expire_after",
                    reason: e.to_string(),
                })
            }
        },
    };
    if let Some(types) = raw.suppress_types {
        let mut lowered = Vec::with_capacity(types.len());
        for t in types {
            let t = t.trim().to_ascii_lowercase();
            if !FEEDBACK_TYPES.contains(&t.as_str()) {
                return Err(ConfigError::Invalid {
                    key: "fbl.suppress_types",
                    reason: format!("{t:?} is not a feedback type ({})", FEEDBACK_TYPES.join(", ")),
                });
            }
            lowered.push(t);
        }
        config.suppress_types = lowered;
    }
    for r in raw.reporters.unwrap_or_default() {
        let domain = r.trim().trim_end_matches('.').to_ascii_lowercase();
        if !crate::is_domain_name(&domain) {
            return Err(ConfigError::Invalid {
                key: "fbl.reporters",
                reason: format!("{r:?} is not a domain"),
            });
        }
        config.reporters.push(domain);
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use crate::{Config, ConfigError};

    use super::FblScope;

    const POLICY: &str = "[policy]\nlocal_domains = [\"example.test\"]\nrelay_domains = [\"relay.test\"]\n";

    fn parse(fbl: &str) -> Result<Config, ConfigError> {
        Config::from_toml(&format!("{POLICY}\n[fbl]\n{fbl}"))
    }

    fn key_of(r: Result<Config, ConfigError>) -> &'static str {
        match r {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("expected an invalid key, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_off_global_and_never_expire() {
        let c = Config::embedded_default().unwrap();
        assert!(!c.fbl.enabled());
        assert!(!c.fbl.is_report_address("fbl@example.test"));
        assert_eq!(c.fbl.scope, FblScope::Global);
        assert_eq!(c.fbl.expire_after, None);
        assert!(!c.fbl.keep);
        assert_eq!(c.fbl.suppress_types, ["abuse", "fraud"]);
        assert!(c.fbl.reporters.is_empty());
        assert!(c.fbl.trusts("anyone@anywhere.test"));
    }

    #[test]
    fn the_documented_example_is_valid() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let doc = std::fs::read_to_string(root.join("docs/configuration.md")).unwrap();
        let section = &doc[doc.find("## `[fbl]`").unwrap()..];
        let start = section.find("```\n").unwrap() + 4;
        let end = start + section[start..].find("```").unwrap();
        let c = Config::from_toml(&section[start..end]).unwrap();
        assert_eq!(c.fbl.addresses, ["fbl@example.com"]);
        assert_eq!(c.fbl.scope, FblScope::Sender);
    }

    #[test]
    fn reporters_are_domains_and_their_subdomains() {
        let c = parse("reporters = [\"Yahoo.example\", \"aol.example.\"]\n").unwrap();
        assert_eq!(c.fbl.reporters, ["yahoo.example", "aol.example"]);
        assert!(c.fbl.trusts("feedback@yahoo.example"));
        assert!(c.fbl.trusts("feedback@arf.mail.YAHOO.example"));
        assert!(c.fbl.trusts("scomp@aol.example"));
        assert!(!c.fbl.trusts("feedback@notyahoo.example"));
        assert!(!c.fbl.trusts("feedback@yahoo.example.evil.test"));
        assert!(!c.fbl.trusts(""));
        assert_eq!(key_of(parse("reporters = [\"not a domain\"]\n")), "fbl.reporters");
    }

    #[test]
    fn addresses_and_whole_domains() {
        let c = parse(
            "addresses = [\"FBL@Example.test\", \"@relay.test\"]\nkeep = true\nscope = \"sender\"\nexpire_after = \"30d\"\nsuppress_types = [\"Abuse\"]\n",
        )
        .unwrap();
        assert_eq!(c.fbl.addresses, ["fbl@example.test"]);
        assert_eq!(c.fbl.domains, ["relay.test"]);
        assert!(c.fbl.is_report_address("fbl@EXAMPLE.test"));
        assert!(c.fbl.is_report_address("<anything@relay.test>"));
        assert!(!c.fbl.is_report_address("other@example.test"));
        assert!(!c.fbl.is_report_address("fbl@elsewhere.test"));
        assert!(c.fbl.keep);
        assert_eq!(c.fbl.scope, FblScope::Sender);
        assert_eq!(c.fbl.expire_after, Some(std::time::Duration::from_secs(30 * 86400)));
        assert_eq!(c.fbl.suppress_types, ["abuse"]);
        assert_eq!(parse("expire_after = \"never\"\n").unwrap().fbl.expire_after, None);
    }

    #[test]
    fn bad_values_name_their_key() {
        assert_eq!(key_of(parse("addresses = [\"fbl\"]\n")), "fbl.addresses");
        assert_eq!(key_of(parse("addresses = [\"a b@example.test\"]\n")), "fbl.addresses");
        assert_eq!(key_of(parse("addresses = [\"fbl@\"]\n")), "fbl.addresses");
        // A domain nobody may send to from outside.
        let r = parse("addresses = [\"fbl@other.test\"]\n");
        assert!(
            r.as_ref().unwrap_err().to_string().contains("policy.local_domains"),
            "{r:?}"
        );
        assert_eq!(key_of(r), "fbl.addresses");
        assert_eq!(key_of(parse("scope = \"tenant\"\n")), "fbl.scope");
        assert_eq!(key_of(parse("expire_after = \"soon\"\n")), "fbl.expire_after");
        assert_eq!(key_of(parse("expire_after = \"0s\"\n")), "fbl.expire_after");
        assert_eq!(key_of(parse("suppress_types = [\"spam\"]\n")), "fbl.suppress_types");
        assert!(matches!(parse("adresses = []\n"), Err(ConfigError::Parse(_))));
    }
}
