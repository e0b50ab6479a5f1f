//! `[[tls_policy]]`: outbound TLS per recipient domain, with Postfix's
//! security levels (`none`, `may`, `encrypt`, `verify`, `dane`,
//! `dane-only`), validated here;
//! [`TlsPolicies::level_for`] answers which entry applies to a domain.

use serde::Deserialize;

use crate::ConfigError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTlsPolicy {
    domain: String,
    level: String,
    names: Option<Vec<String>>,
}

/// Postfix's security levels, as `[[tls_policy]] level`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsLevel {
    /// No STARTTLS.
    None,
    /// STARTTLS when offered, any certificate; clear text otherwise.
    May,
    /// TLS required, any certificate.
    Encrypt,
    /// TLS required; chain to a trusted root and an expected name.
    Verify,
    /// DANE (RFC 7672) when the MX host has DNSSEC-secure usable TLSA
    /// records, else `may`.
    Dane,
    /// DANE required: no secure usable TLSA records, no mail (deferred).
    DaneOnly,
}

/// One `[[tls_policy]]` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsPolicyEntry {
    /// Lowercase recipient domain; a leading `.` (written `.d` or `*.d`)
    /// matches every subdomain of `d`, not `d` itself.
    pub domain: String,
    pub level: TlsLevel,
    /// Expected certificate names for `verify` (lowercase; `.d` matches
    /// subdomains of `d`); empty: the MX (or route) host name.
    pub names: Vec<String>,
}

/// Every `[[tls_policy]]` plus `[delivery] require_tls_domains`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsPolicies {
    pub entries: Vec<TlsPolicyEntry>,
    /// `[delivery] require_tls_domains`: `verify` with the MX host name,
    /// unless an entry names the same domain.
    pub require_tls_domains: Vec<String>,
}

/// The level for a domain and the names it expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resolved<'a> {
    pub level: TlsLevel,
    pub names: &'a [String],
}

impl TlsPolicies {
    /// The policy for recipient `domain` (lowercase): an exact entry, then
    /// `require_tls_domains`, then the longest matching `.suffix` entry,
    /// else `may`.
    pub fn level_for(&self, domain: &str) -> Resolved<'_> {
        self.configured(domain).unwrap_or(Resolved {
            level: TlsLevel::May,
            names: &[],
        })
    }

    /// Like [`TlsPolicies::level_for`], `None` when no entry (nor
    /// `require_tls_domains`) names the domain, so that callers can pick
    /// their own default (`dane` with `[dane] enabled`).
    pub fn configured(&self, domain: &str) -> Option<Resolved<'_>> {
        let domain = domain.trim_end_matches('.');
        if let Some(e) = self.entries.iter().find(|e| e.domain == domain) {
            return Some(Resolved {
                level: e.level,
                names: &e.names,
            });
        }
        if self.require_tls_domains.iter().any(|d| d == domain) {
            return Some(Resolved {
                level: TlsLevel::Verify,
                names: &[],
            });
        }
        self.entries
            .iter()
            .filter(|e| e.domain.starts_with('.') && domain.ends_with(e.domain.as_str()))
            .max_by_key(|e| e.domain.len())
            .map(|e| Resolved {
                level: e.level,
                names: &e.names,
            })
    }
}

fn normalise(name: &str) -> String {
    let name = name.trim().trim_end_matches('.').to_ascii_lowercase();
    match name.strip_prefix("*.") {
        Some(rest) => format!(".{rest}"),
        None => name,
    }
}

/// A domain, or `.domain` for its subdomains.
fn is_domain(name: &str) -> bool {
    crate::is_domain_name(name.strip_prefix('.').unwrap_or(name))
}

pub(super) fn validate(raw: Vec<RawTlsPolicy>, require_tls_domains: Vec<String>) -> Result<TlsPolicies, ConfigError> {
    let mut entries: Vec<TlsPolicyEntry> = Vec::with_capacity(raw.len());
    for r in raw {
        let domain = normalise(&r.domain);
        if !is_domain(&domain) {
            return Err(ConfigError::Invalid {
                key: "tls_policy.domain",
                reason: format!("{:?} is not a domain, .domain or *.domain", r.domain),
            });
        }
        if entries.iter().any(|e| e.domain == domain) {
            return Err(ConfigError::Invalid {
                key: "tls_policy.domain",
                reason: format!("{domain} has more than one [[tls_policy]]"),
            });
        }
        let level = match r.level.as_str() {
            "none" => TlsLevel::None,
            "may" => TlsLevel::May,
            "encrypt" => TlsLevel::Encrypt,
            "verify" => TlsLevel::Verify,
            "dane" => TlsLevel::Dane,
            "dane-only" => TlsLevel::DaneOnly,
            other => {
                return Err(ConfigError::Invalid {
                    key: "tls_policy.level",
                    reason: format!("{other:?} (for {domain}) is not none, may, encrypt, verify, dane or dane-only"),
                })
            }
        };
        let names = match r.names {
            None => Vec::new(),
            Some(_) if level != TlsLevel::Verify => {
                return Err(ConfigError::Invalid {
                    key: "tls_policy.names",
                    reason: format!("names are checked only with level = \"verify\" (policy for {domain})"),
                })
            }
            Some(names) if names.is_empty() => {
                return Err(ConfigError::Invalid {
                    key: "tls_policy.names",
                    reason: format!("empty list for {domain}; leave names out to expect the MX host name"),
                })
            }
            Some(names) => {
                let names: Vec<String> = names
                    .iter()
                    .map(|n| n.trim().trim_end_matches('.').to_ascii_lowercase())
                    .collect();
                if let Some(bad) = names.iter().find(|n| !is_domain(n)) {
                    return Err(ConfigError::Invalid {
                        key: "tls_policy.names",
                        reason: format!("{bad:?} (for {domain}) is not a host name or .domain"),
                    });
                }
                names
            }
        };
        entries.push(TlsPolicyEntry { domain, level, names });
    }
    Ok(TlsPolicies {
        entries,
        require_tls_domains,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::Config;

    fn policies(toml: &str) -> Result<TlsPolicies, ConfigError> {
        Config::from_toml(toml).map(|c| c.tls_policies)
    }

    #[test]
    fn exact_suffix_require_tls_and_default() {
        let p = policies(
            r#"
[delivery]
require_tls_domains = ["bank.test", "both.test"]

[[tls_policy]]
domain = "Good.Test"
level = "verify"
names = ["mx.good.test", ".mail.good.test"]

[[tls_policy]]
domain = "*.corp.test"
level = "encrypt"

[[tls_policy]]
domain = ".eu.corp.test"
level = "none"

[[tls_policy]]
domain = "both.test"
level = "may"

[[tls_policy]]
domain = "dane.test"
level = "dane"

[[tls_policy]]
domain = ".strict.test"
level = "dane-only"
"#,
        )
        .unwrap();
        let level = |d: &str| p.level_for(d).level;
        assert_eq!(level("good.test"), TlsLevel::Verify);
        assert_eq!(p.level_for("good.test").names, ["mx.good.test", ".mail.good.test"]);
        // A suffix entry matches subdomains only; the longest one wins.
        assert_eq!(level("a.corp.test"), TlsLevel::Encrypt);
        assert_eq!(level("x.eu.corp.test"), TlsLevel::None);
        assert_eq!(level("corp.test"), TlsLevel::May);
        assert_eq!(level("evilcorp.test"), TlsLevel::May);
        // require_tls_domains means verify with the MX name; an explicit entry wins.
        assert_eq!(level("bank.test"), TlsLevel::Verify);
        assert!(p.level_for("bank.test").names.is_empty());
        assert_eq!(level("both.test"), TlsLevel::May);
        assert_eq!(level("other.test"), TlsLevel::May);
        assert_eq!(level("dane.test"), TlsLevel::Dane);
        assert_eq!(level("mx.strict.test"), TlsLevel::DaneOnly);
        // No entry: `configured` leaves the default to the caller.
        assert!(p.configured("other.test").is_none());
        assert_eq!(p.configured("both.test").map(|r| r.level), Some(TlsLevel::May));
    }

    #[test]
    fn bad_entries_name_the_key() {
        let key = |toml: &str| match policies(toml) {
            Err(ConfigError::Invalid { key, reason }) => (key, reason),
            other => panic!("{other:?}"),
        };
        let (k, r) = key("[[tls_policy]]\ndomain = \"a.test\"\nlevel = \"secure\"\n");
        assert_eq!(k, "tls_policy.level");
        assert!(r.contains("secure"), "{r}");
        let (k, _) = key("[[tls_policy]]\ndomain = \"a.test\"\nlevel = \"encrypt\"\nnames = [\"mx.a.test\"]\n");
        assert_eq!(k, "tls_policy.names");
        let (k, r) = key(
            "[[tls_policy]]\ndomain = \"a.test\"\nlevel = \"may\"\n\n[[tls_policy]]\ndomain = \"A.test.\"\nlevel = \"verify\"\n",
        );
        assert_eq!(k, "tls_policy.domain");
        assert!(r.contains("a.test"), "{r}");
        let (k, _) = key("[[tls_policy]]\ndomain = \"a test\"\nlevel = \"may\"\n");
        assert_eq!(k, "tls_policy.domain");
        let (k, _) = key("[[tls_policy]]\ndomain = \"a.test\"\nlevel = \"verify\"\nnames = []\n");
        assert_eq!(k, "tls_policy.names");
        assert!(matches!(
            policies("[[tls_policy]]\ndomain = \"a.test\"\nlevel = \"may\"\nmatch = \"x\"\n"),
            Err(ConfigError::Parse(_))
        ));
    }
}
