//! `[[shaping]]`: per-destination delivery limits, held cluster-wide by the
//! node (node/src/shaping). This module parses and validates the rules and
//! answers which of them match a destination; it holds no state.
//!
//! A rule matches by recipient `domain` (exact, or `.d` / `*.d` for the
//! subdomains of `d`), by `mx_suffix` (any of the destination's MX or route
//! host names ends with it: every domain hosted there shares one budget), by
//! egress `source`, or by nothing (a default rule; `domain = "*"` is the
//! same). Keys given together must all match. Every matching rule applies,
//! in order; a later rule overrides an earlier one key by key.
//!
//! [`ShapingRules`] starts with [`BUILTIN`]: grouping rules for large
//! providers with no limits, so that automatic actions scope by provider.

use serde::Deserialize;

use crate::ConfigError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawShaping {
    name: Option<String>,
    domain: Option<String>,
    mx_suffix: Option<String>,
    source: Option<String>,
    max_connections: Option<i64>,
    messages_per_connection: Option<i64>,
    rate: Option<String>,
    connection_rate: Option<String>,
    domain_rate: Option<String>,
}

/// `count` events per `per_secs` seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub count: u64,
    pub per_secs: u64,
}

impl Rate {
    /// Events per second.
    pub fn per_second(self) -> f64 {
        self.count as f64 / self.per_secs as f64
    }

    /// The slower of two rates.
    pub fn min(self, other: Rate) -> Rate {
        if other.per_second() < self.per_second() {
            other
        } else {
            self
        }
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let unit = match self.per_secs {
            1 => "s",
            60 => "min",
            3600 => "h",
            86400 => "d",
            n => return write!(f, "{}/{n}s", self.count),
        };
        write!(f, "{}/{unit}", self.count)
    }
}

/// Parses `"N/s"`, `"N/min"`, `"N/h"` or `"N/d"`, N from 1 to 1000000.
pub fn parse_rate(s: &str) -> Result<Rate, String> {
    let bad = || format!("{s:?} is not a rate like 60/min (a count per s, min, h or d)");
    let (count, unit) = s.trim().split_once('/').ok_or_else(bad)?;
    let count: u64 = count.trim().parse().map_err(|_| bad())?;
    let per_secs = match unit.trim() {
        "s" => 1,
        "m" | "min" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(bad()),
    };
    if !(1..=1_000_000).contains(&count) {
        return Err(format!("{s:?}: the count must be 1 to 1000000"));
    }
    Ok(Rate { count, per_secs })
}

/// The limits one rule sets; `None`: the rule leaves that key to earlier
/// rules (or to `[delivery]`'s per-site defaults).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShapingLimits {
    /// Concurrent connections to the destination, cluster-wide.
    pub max_connections: Option<u32>,
    /// Messages sent over one connection before it is closed.
    pub messages_per_connection: Option<u32>,
    /// Messages to the destination, cluster-wide.
    pub rate: Option<Rate>,
    /// New connections to the destination, cluster-wide.
    pub connection_rate: Option<Rate>,
    /// Messages per recipient domain within an `mx_suffix` destination.
    pub domain_rate: Option<Rate>,
}

impl ShapingLimits {
    /// `self` with every key `later` sets taken from `later`.
    pub fn merged(self, later: &ShapingLimits) -> ShapingLimits {
        ShapingLimits {
            max_connections: later.max_connections.or(self.max_connections),
            messages_per_connection: later.messages_per_connection.or(self.messages_per_connection),
            rate: later.rate.or(self.rate),
            connection_rate: later.connection_rate.or(self.connection_rate),
            domain_rate: later.domain_rate.or(self.domain_rate),
        }
    }

    /// No key set: the destination is unlimited (per-site defaults only).
    pub fn is_empty(&self) -> bool {
        *self == ShapingLimits::default()
    }
}

/// One `[[shaping]]` rule (or a built-in one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShapingRule {
    /// `name`, else `shaping[N]` (N counts the config file's rules from 0),
    /// or `builtin:<provider>`.
    pub name: String,
    /// Lowercase recipient domain; a leading `.` matches its subdomains.
    /// `None`: any domain.
    pub domain: Option<String>,
    /// Lowercase host name suffix with a leading `.`.
    pub mx_suffix: Option<String>,
    /// Egress source name.
    pub source: Option<String>,
    pub limits: ShapingLimits,
}

impl ShapingRule {
    /// Whether the rule applies to mail for `domain` (lowercase) whose next
    /// hops are `hosts` (lowercase names), sent from `source`. A rule that
    /// names a source never matches mail with no source.
    pub fn matches(&self, domain: &str, hosts: &[&str], source: Option<&str>) -> bool {
        if let Some(d) = &self.domain {
            let ok = match d.strip_prefix('.') {
                Some(parent) => domain.ends_with(d.as_str()) && domain.len() > parent.len() + 1,
                None => domain == d,
            };
            if !ok {
                return false;
            }
        }
        if let Some(suffix) = &self.mx_suffix {
            if !hosts.iter().any(|h| suffix_matches(suffix, h)) {
                return false;
            }
        }
        if let Some(s) = &self.source {
            if source != Some(s.as_str()) {
                return false;
            }
        }
        true
    }
}

/// `.google.com` matches `aspmx.l.google.com` and `google.com`.
fn suffix_matches(suffix: &str, host: &str) -> bool {
    let host = host.trim_end_matches('.');
    host.ends_with(suffix) || host == &suffix[1..]
}

/// Built-in grouping rules (first in the list, no limits): the MX suffixes
/// of providers that host many domains, so that their domains share one
/// scope and automatic actions apply to the provider.
pub const BUILTIN: &[(&str, &str)] = &[
    ("builtin:google", ".google.com"),
    ("builtin:outlook", ".outlook.com"),
    ("builtin:yahoo", ".yahoodns.net"),
];

/// Every shaping rule: the built-in ones, then `[[shaping]]` in file order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShapingRules {
    pub rules: Vec<ShapingRule>,
    /// Some rule sets a limit (else shaping only names scopes).
    pub any_limits: bool,
}

impl Default for ShapingRules {
    fn default() -> Self {
        ShapingRules {
            rules: builtin(),
            any_limits: false,
        }
    }
}

fn builtin() -> Vec<ShapingRule> {
    BUILTIN
        .iter()
        .map(|(name, suffix)| ShapingRule {
            name: (*name).to_owned(),
            domain: None,
            mx_suffix: Some((*suffix).to_owned()),
            source: None,
            limits: ShapingLimits::default(),
        })
        .collect()
}

/// What the rules say about one destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Matched<'a> {
    /// The matching rules, in order.
    pub rules: Vec<&'a ShapingRule>,
    /// Their limits merged (later rules override earlier ones key by key).
    pub limits: ShapingLimits,
    /// The last matching rule's `mx_suffix`, if any matched one.
    pub mx_suffix: Option<&'a str>,
}

impl ShapingRules {
    /// The rules matching mail for `domain` through `hosts` from `source`.
    pub fn matching<'a>(&'a self, domain: &str, hosts: &[&str], source: Option<&str>) -> Matched<'a> {
        let mut m = Matched {
            rules: Vec::new(),
            limits: ShapingLimits::default(),
            mx_suffix: None,
        };
        for r in self.rules.iter().filter(|r| r.matches(domain, hosts, source)) {
            m.limits = m.limits.merged(&r.limits);
            if let Some(s) = &r.mx_suffix {
                m.mx_suffix = Some(s);
            }
            m.rules.push(r);
        }
        m
    }
}

/// Validates `[[shaping]]`; errors name the key and the rule.
pub(super) fn validate(raw: Vec<RawShaping>) -> Result<ShapingRules, ConfigError> {
    let mut rules = builtin();
    let mut any_limits = false;
    for (i, r) in raw.into_iter().enumerate() {
        let name = match &r.name {
            Some(n) if n.trim().is_empty() => {
                return Err(ConfigError::Invalid {
                    key: "shaping.name",
                    reason: format!("shaping[{i}]: the name is empty"),
                })
            }
            Some(n) => n.trim().to_owned(),
            None => format!("shaping[{i}]"),
        };
        let invalid = |key: &'static str, reason: String| ConfigError::Invalid {
            key,
            reason: format!("rule {name:?}: {reason}"),
        };
        let domain = match r
            .domain
            .as_deref()
            .map(|d| d.trim().trim_end_matches('.').to_ascii_lowercase())
        {
            None => None,
            Some(d) if d == "*" => None,
            Some(d) => {
                let d = match d.strip_prefix("*.") {
                    Some(rest) => format!(".{rest}"),
                    None => d,
                };
                if !crate::is_domain_name(d.strip_prefix('.').unwrap_or(&d)) {
                    return Err(invalid(
                        "shaping.domain",
                        format!(
                            "{:?} is not a domain, .domain, *.domain or *",
                            r.domain.unwrap_or_default()
                        ),
                    ));
                }
                Some(d)
            }
        };
        let mx_suffix = match r.mx_suffix.as_deref() {
            None => None,
            Some(s) => {
                let t = s.trim().trim_end_matches('.').to_ascii_lowercase();
                let bare = t.strip_prefix("*.").or_else(|| t.strip_prefix('.')).unwrap_or(&t);
                if !crate::is_domain_name(bare) || !bare.contains('.') {
                    return Err(invalid(
                        "shaping.mx_suffix",
                        format!("{s:?} is not a host name suffix like .google.com"),
                    ));
                }
                Some(format!(".{bare}"))
            }
        };
        let source = match r.source.as_deref().map(str::trim) {
            None => None,
            Some("") => return Err(invalid("shaping.source", "the source name is empty".into())),
            Some(s) => Some(s.to_owned()),
        };
        let count = |key: &'static str, v: Option<i64>, max: i64| -> Result<Option<u32>, ConfigError> {
            match v {
                None => Ok(None),
                Some(n) if (1..=max).contains(&n) => Ok(Some(n as u32)),
                Some(n) => Err(invalid(key, format!("{n} is outside 1..={max}"))),
            }
        };
        let rate = |key: &'static str, v: &Option<String>| -> Result<Option<Rate>, ConfigError> {
            v.as_deref().map(parse_rate).transpose().map_err(|e| invalid(key, e))
        };
        let limits = ShapingLimits {
            max_connections: count("shaping.max_connections", r.max_connections, 10_000)?,
            messages_per_connection: count("shaping.messages_per_connection", r.messages_per_connection, 100_000)?,
            rate: rate("shaping.rate", &r.rate)?,
            connection_rate: rate("shaping.connection_rate", &r.connection_rate)?,
            domain_rate: rate("shaping.domain_rate", &r.domain_rate)?,
        };
        if limits.domain_rate.is_some() && mx_suffix.is_none() {
            return Err(invalid(
                "shaping.domain_rate",
                "a per-recipient-domain rate needs mx_suffix (it caps each domain within the provider's budget)".into(),
            ));
        }
        any_limits |= !limits.is_empty();
        rules.push(ShapingRule {
            name,
            domain,
            mx_suffix,
            source,
            limits,
        });
    }
    Ok(ShapingRules { rules, any_limits })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn rules(toml_text: &str) -> Result<ShapingRules, ConfigError> {
        #[derive(Deserialize)]
        struct W {
            shaping: Vec<RawShaping>,
        }
        let w: W = toml::from_str(toml_text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        validate(w.shaping)
    }

    #[test]
    fn rates_parse_in_every_unit() {
        assert_eq!(
            parse_rate("60/min").unwrap(),
            Rate {
                count: 60,
                per_secs: 60
            }
        );
        assert_eq!(parse_rate(" 5/s").unwrap(), Rate { count: 5, per_secs: 1 });
        assert_eq!(
            parse_rate("600/h").unwrap(),
            Rate {
                count: 600,
                per_secs: 3600
            }
        );
        assert_eq!(
            parse_rate("50/d").unwrap(),
            Rate {
                count: 50,
                per_secs: 86400
            }
        );
        assert_eq!(parse_rate("50/d").unwrap().to_string(), "50/d");
        for bad in ["60", "60/week", "x/min", "0/min", "2000000/s", "-1/s", ""] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
        assert!(
            Rate { count: 1, per_secs: 1 }
                .min(Rate {
                    count: 30,
                    per_secs: 60
                })
                .per_second()
                < 1.0
        );
    }

    #[test]
    fn later_rules_override_earlier_ones_key_by_key() {
        let r = rules(
            r#"
            [[shaping]]
            max_connections = 10
            rate = "100/min"
            messages_per_connection = 20
            [[shaping]]
            name = "google"
            mx_suffix = "*.google.com"
            rate = "600/h"
            domain_rate = "60/h"
            [[shaping]]
            domain = "gmail.com"
            max_connections = 3
            [[shaping]]
            domain = "other.test"
            max_connections = 1
            "#,
        )
        .unwrap();
        assert!(r.any_limits);
        let m = r.matching("gmail.com", &["gmail-smtp-in.l.google.com"], None);
        let names: Vec<&str> = m.rules.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["builtin:google", "shaping[0]", "google", "shaping[2]"]);
        assert_eq!(m.mx_suffix, Some(".google.com"));
        assert_eq!(
            m.limits,
            ShapingLimits {
                max_connections: Some(3),
                messages_per_connection: Some(20),
                rate: Some(Rate {
                    count: 600,
                    per_secs: 3600
                }),
                connection_rate: None,
                domain_rate: Some(Rate {
                    count: 60,
                    per_secs: 3600
                }),
            }
        );
        // Not at Google: only the default rule.
        let m = r.matching("example.org", &["mx.example.org"], None);
        assert_eq!(m.rules.len(), 1);
        assert_eq!(m.mx_suffix, None);
        assert_eq!(m.limits.max_connections, Some(10));
        // The suffix matches the bare provider name too, not a look-alike.
        assert!(r.matching("x.test", &["google.com"], None).mx_suffix.is_some());
        assert!(r.matching("x.test", &["notgoogle.com"], None).mx_suffix.is_none());
    }

    #[test]
    fn domain_and_source_matching() {
        let r = rules(
            r#"
            [[shaping]]
            domain = ".example.com"
            rate = "1/s"
            [[shaping]]
            source = "ip1"
            rate = "2/s"
            [[shaping]]
            domain = "*"
            max_connections = 4
            "#,
        )
        .unwrap();
        assert_eq!(
            r.matching("a.example.com", &[], None).limits.rate,
            Some(Rate { count: 1, per_secs: 1 })
        );
        assert_eq!(
            r.matching("example.com", &[], None).limits.rate,
            None,
            ".d is subdomains only"
        );
        assert_eq!(
            r.matching("a.example.com", &[], Some("ip1")).limits.rate.unwrap().count,
            2
        );
        assert_eq!(r.matching("x.test", &[], None).limits.max_connections, Some(4));
    }

    #[test]
    fn bad_rules_are_refused_with_the_rule_and_key_named() {
        for (text, key, needle) in [
            ("[[shaping]]\nrate = \"60\"", "shaping.rate", "shaping[0]"),
            (
                "[[shaping]]\nname = \"g\"\nconnection_rate = \"1/week\"",
                "shaping.connection_rate",
                "\"g\"",
            ),
            ("[[shaping]]\nmax_connections = 0", "shaping.max_connections", "outside"),
            (
                "[[shaping]]\nmessages_per_connection = -3",
                "shaping.messages_per_connection",
                "outside",
            ),
            ("[[shaping]]\ndomain = \"a b\"", "shaping.domain", "not a domain"),
            ("[[shaping]]\nmx_suffix = \"com\"", "shaping.mx_suffix", "suffix"),
            (
                "[[shaping]]\ndomain = \"a.test\"\ndomain_rate = \"1/s\"",
                "shaping.domain_rate",
                "mx_suffix",
            ),
            ("[[shaping]]\nsource = \"\"", "shaping.source", "empty"),
        ] {
            match rules(text) {
                Err(ConfigError::Invalid { key: k, reason }) => {
                    assert_eq!(k, key, "{text}");
                    assert!(reason.contains(needle), "{text}: {reason}");
                }
                other => panic!("{text}: {other:?}"),
            }
        }
        let e = rules("[[shaping]]\nrates = \"1/s\"").unwrap_err();
        assert!(e.to_string().contains("rates"), "{e}");
    }

    /// The example in docs/deliverability.md parses and merges as it says.
    #[test]
    fn the_documented_example_is_valid() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let doc = std::fs::read_to_string(root.join("docs/deliverability.md")).unwrap();
        let doc = &doc[doc.find("\n## Shaping\n").unwrap()..];
        let start = doc.find("```toml\n").unwrap() + "```toml\n".len();
        let end = start + doc[start..].find("```").unwrap();
        let c = crate::Config::from_toml(&doc[start..end]).unwrap();
        let m = c.shaping.matching("gmail.com", &["gmail-smtp-in.l.google.com"], None);
        let names: Vec<&str> = m.rules.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["builtin:google", "shaping[0]", "google"]);
        assert_eq!(m.limits.messages_per_connection, Some(100));
        assert_eq!(m.limits.max_connections, Some(10));
        assert_eq!(m.limits.rate.unwrap().to_string(), "3600/h");
    }

    /// The bulk sender's setup at the top of docs/deliverability.md is a
    /// valid configuration and means what the text under it says.
    #[test]
    fn the_bulk_sender_example_is_valid() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let doc = std::fs::read_to_string(root.join("docs/deliverability.md")).unwrap();
        let doc = &doc[doc.find("\n## A bulk sender's setup\n").unwrap()..];
        let start = doc.find("```toml\n").unwrap() + "```toml\n".len();
        let end = start + doc[start..].find("```").unwrap();
        let c = crate::Config::from_toml(&doc[start..end]).unwrap();
        let m = c.shaping.matching("gmail.com", &["gmail-smtp-in.l.google.com"], None);
        assert_eq!(m.limits.rate.unwrap().to_string(), "6000/h");
        assert_eq!(m.limits.max_connections, Some(20));
        assert_eq!(m.limits.messages_per_connection, Some(100));
        assert_eq!(c.egress.sources.len(), 4);
        assert_eq!(c.egress.pools.len(), 2);
        assert_eq!(c.backoff[0].name, "slow-down");
        assert_eq!(
            c.suppression.expire_after,
            Some(std::time::Duration::from_secs(180 * 86400))
        );
        assert_eq!(c.fbl.addresses, ["fbl@example.com"]);
    }

    #[test]
    fn builtin_rules_group_providers_without_limits() {
        let r = ShapingRules::default();
        assert!(!r.any_limits);
        let m = r.matching("contoso.com", &["contoso-com.mail.protection.outlook.com"], None);
        assert_eq!(m.mx_suffix, Some(".outlook.com"));
        assert!(m.limits.is_empty());
        let m = r.matching("yahoo.com", &["mta5.am0.yahoodns.net"], None);
        assert_eq!(m.mx_suffix, Some(".yahoodns.net"));
    }
}
