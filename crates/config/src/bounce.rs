//! `[[bounce_class]]` (the operator's bounce classification rules, checked
//! before the shipped table) and `[suppression]` (which failures add a
//! recipient to the suppression list, for which scope, for how long),
//! validated here.

use std::time::Duration;

use regex::Regex;
use serde::Deserialize;
use tern_model::bounce::Class;

use crate::ConfigError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBounceClass {
    code: Option<String>,
    enhanced: Option<String>,
    #[serde(rename = "match")]
    pattern: Option<String>,
    class: String,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSuppression {
    enabled: Option<bool>,
    classes: Option<Vec<String>>,
    scope: Option<String>,
    expire_after: Option<String>,
}

/// One classification rule: every condition given must hold.
#[derive(Clone, Debug)]
pub struct ClassRule {
    /// The reply code, or its prefix (`"5"`, `"55"`, `"550"`).
    pub code: Option<String>,
    /// The enhanced status code, or its prefix ending in a dot (`"5.7."`).
    pub enhanced: Option<String>,
    /// Matched (case-insensitively) against the whole reply.
    pub pattern: Option<Regex>,
    pub class: Class,
}

impl ClassRule {
    /// Whether the rule matches a reply with reply code `code`, enhanced
    /// code `enhanced` (`""` when the reply has none) and text `reply`.
    pub fn matches(&self, code: &str, enhanced: &str, reply: &str) -> bool {
        self.code.as_deref().is_none_or(|c| code.starts_with(c))
            && self.enhanced.as_deref().is_none_or(|e| {
                if e.ends_with('.') {
                    enhanced.starts_with(e)
                } else {
                    enhanced == e
                }
            })
            && self.pattern.as_ref().is_none_or(|p| p.is_match(reply))
    }
}

/// Whose list an automatic suppression goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SuppressionScope {
    /// The global list: no sender of the cluster mails the recipient again.
    Global,
    /// The list of the sender's domain (the tenant's own list).
    Sender,
}

/// `[suppression]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SuppressionConfig {
    /// Add recipients automatically (checks before delivery stay on).
    pub enabled: bool,
    /// Permanent-failure classes that add the recipient.
    pub classes: Vec<Class>,
    pub scope: SuppressionScope,
    /// How long an automatic entry lasts; `None`: until removed.
    pub expire_after: Option<Duration>,
}

impl Default for SuppressionConfig {
    fn default() -> Self {
        SuppressionConfig {
            enabled: true,
            classes: vec![Class::InvalidRecipient, Class::Inactive],
            scope: SuppressionScope::Global,
            expire_after: None,
        }
    }
}

pub(super) fn class_rules(raw: Vec<RawBounceClass>) -> Result<Vec<ClassRule>, ConfigError> {
    raw.into_iter()
        .enumerate()
        .map(|(i, r)| {
            let bad = |reason: String| ConfigError::Invalid {
                key: "bounce_class",
                reason: format!("entry {}: {reason}", i + 1),
            };
            let class: Class = r
                .class
                .parse()
                .map_err(|e: tern_model::bounce::UnknownClass| bad(format!("class: {e}")))?;
            if class == Class::Suppressed {
                return Err(bad("class: \"suppressed\" is reserved for the suppression list".into()));
            }
            if let Some(code) = &r.code {
                if code.is_empty()
                    || code.len() > 3
                    || !code.chars().all(|c| c.is_ascii_digit())
                    || !code.starts_with(['4', '5'])
                {
                    return Err(bad(format!("code: {code:?} is not a 4xx/5xx reply code or its prefix")));
                }
            }
            if let Some(e) = &r.enhanced {
                let parts: Vec<&str> = e.trim_end_matches('.').split('.').collect();
                let ok = !parts.is_empty()
                    && parts.len() <= 3
                    && parts
                        .iter()
                        .all(|p| !p.is_empty() && p.len() <= 3 && p.chars().all(|c| c.is_ascii_digit()))
                    && (parts.len() == 3 || e.ends_with('.'));
                if !ok {
                    return Err(bad(format!(
                        "enhanced: {e:?} is not an enhanced status code like 5.1.1 or a prefix like 5.7."
                    )));
                }
            }
            let pattern = r
                .pattern
                .as_deref()
                .map(|p| {
                    regex::RegexBuilder::new(p)
                        .case_insensitive(true)
                        .size_limit(1 << 20)
                        .build()
                })
                .transpose()
                .map_err(|e| bad(format!("match: {e}")))?;
            if r.code.is_none() && r.enhanced.is_none() && pattern.is_none() {
                return Err(bad("give at least one of code, enhanced, match".into()));
            }
            Ok(ClassRule {
                code: r.code,
                enhanced: r.enhanced,
                pattern,
                class,
            })
        })
        .collect()
}

pub(super) fn suppression(raw: RawSuppression) -> Result<SuppressionConfig, ConfigError> {
    let default = SuppressionConfig::default();
    let classes = match raw.classes {
        None => default.classes,
        Some(names) => names
            .iter()
            .map(|n| {
                n.parse::<Class>().map_err(|e| ConfigError::Invalid {
                    key: "suppression.classes",
                    reason: e.to_string(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?,
    };
    let scope = match raw.scope.as_deref() {
        None | Some("global") => SuppressionScope::Global,
        Some("sender") => SuppressionScope::Sender,
        Some(other) => {
            return Err(ConfigError::Invalid {
                key: "suppression.scope",
                reason: format!("{other:?}: use \"global\" or \"sender\""),
            })
        }
    };
    let expire_after = raw
        .expire_after
        .as_deref()
        .map(crate::parse_duration)
        .transpose()
        .map_err(crate::invalid("suppression.expire_after"))?
        .filter(|d| !d.is_zero());
    Ok(SuppressionConfig {
        enabled: raw.enabled.unwrap_or(true),
        classes,
        scope,
        expire_after,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn rule(code: Option<&str>, enhanced: Option<&str>, pattern: Option<&str>, class: &str) -> RawBounceClass {
        RawBounceClass {
            code: code.map(Into::into),
            enhanced: enhanced.map(Into::into),
            pattern: pattern.map(Into::into),
            class: class.into(),
        }
    }

    fn err(raw: Vec<RawBounceClass>) -> String {
        class_rules(raw).unwrap_err().to_string()
    }

    #[test]
    fn rules_are_validated_with_the_entry_named() {
        let rules = class_rules(vec![rule(Some("55"), Some("5.7."), Some("Blocked"), "reputation")]).unwrap();
        assert!(rules[0].matches("554", "5.7.1", "554 5.7.1 blocked here"));
        assert!(!rules[0].matches("554", "5.1.1", "554 5.1.1 blocked here"));
        assert!(!rules[0].matches("451", "5.7.1", "blocked"));
        assert!(err(vec![rule(None, None, None, "policy")]).contains("entry 1: give at least one"));
        assert!(err(vec![rule(Some("250"), None, None, "policy")]).contains("code"));
        assert!(err(vec![rule(None, Some("5.7"), None, "policy")]).contains("enhanced"));
        let e = err(vec![
            rule(None, None, Some("x"), "policy"),
            rule(None, None, Some("(unclosed"), "policy"),
        ]);
        assert!(e.contains("bounce_class") && e.contains("entry 2: match"), "{e}");
        assert!(err(vec![rule(Some("5"), None, None, "hard")]).contains("not a bounce class"));
        assert!(err(vec![rule(Some("5"), None, None, "suppressed")]).contains("reserved"));
    }

    #[test]
    fn suppression_defaults_and_errors() {
        let d = suppression(RawSuppression::default()).unwrap();
        assert_eq!(d, SuppressionConfig::default());
        let s = suppression(RawSuppression {
            classes: Some(vec!["mailbox_full".into()]),
            scope: Some("sender".into()),
            expire_after: Some("30d".into()),
            enabled: None,
        })
        .unwrap();
        assert_eq!(s.classes, [Class::MailboxFull]);
        assert_eq!(s.scope, SuppressionScope::Sender);
        assert_eq!(s.expire_after, Some(Duration::from_secs(30 * 86400)));
        let e = suppression(RawSuppression {
            scope: Some("tenant".into()),
            ..RawSuppression::default()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("suppression.scope"), "{e}");
        let e = suppression(RawSuppression {
            classes: Some(vec!["bogus".into()]),
            ..RawSuppression::default()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("suppression.classes"), "{e}");
    }
}
