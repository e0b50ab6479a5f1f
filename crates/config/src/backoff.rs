//! `[[backoff]]`: rules that match a remote server's reply (reply code,
//! enhanced status code, a regular expression on the text) and decide an
//! automatic shaping action for the destination it came from: suspend it,
//! throttle it, or bounce what is queued for it, for a while.
//!
//! The operator's rules come first, in file order; then, unless
//! `[delivery] backoff_defaults = false`, the shipped [`defaults`] for
//! well-known provider throttle replies. The first rule that matches wins.
//! Matching itself lives with delivery (node `backoff`); this module only
//! parses and validates.

use std::time::Duration;

use regex::Regex;
use serde::Deserialize;

use crate::{parse_duration, parse_rate, ConfigError};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackoff {
    name: Option<String>,
    code: String,
    enhanced: Option<String>,
    #[serde(rename = "match")]
    pattern: Option<String>,
    action: String,
    duration: String,
    rate: Option<String>,
    scope: Option<String>,
}

/// A reply code a rule matches: `421` exactly, or a class such as `4xx`
/// (every code whose first digit is 4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CodeMatch {
    Exact(u16),
    Class(u8),
}

impl CodeMatch {
    pub fn matches(self, code: u16) -> bool {
        match self {
            CodeMatch::Exact(c) => c == code,
            CodeMatch::Class(class) => code / 100 == u16::from(class),
        }
    }
}

/// What a rule does to its scope while the action is in force.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackoffAction {
    /// Nothing is attempted to the scope.
    Suspend,
    /// At most `count` messages per `per` to the scope, cluster-wide.
    Throttle { count: u32, per: Duration },
    /// What is queued for the scope fails with a 5xx reply (and bounces).
    Bounce,
}

impl BackoffAction {
    /// `suspend`, `throttle` or `bounce`.
    pub fn name(self) -> &'static str {
        match self {
            BackoffAction::Suspend => "suspend",
            BackoffAction::Throttle { .. } => "throttle",
            BackoffAction::Bounce => "bounce",
        }
    }
}

/// Whom the action applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackoffScope {
    /// The destination (its shaping scope, e.g. `mx:.google.com`).
    Destination,
    /// The egress source × the destination (as `Destination` when the
    /// attempt used no named source).
    Source,
}

/// One validated `[[backoff]]` rule (or a shipped default).
#[derive(Clone, Debug)]
pub struct BackoffRule {
    /// `name`, else `backoff[N]` (N from 1, in file order); defaults are
    /// named `default:<provider>-<what>`.
    pub name: String,
    pub code: CodeMatch,
    /// Enhanced status code (`4.7.28`); a part written `x` matches any
    /// number (`4.7.x`).
    pub enhanced: Option<String>,
    /// Case-insensitive, searched anywhere in the one-line reply
    /// (`421 4.7.28 Our system has detected ...`, code included).
    pub pattern: Option<Regex>,
    pub action: BackoffAction,
    /// How long the action stays in force after the last matching reply
    /// that recorded it.
    pub duration: Duration,
    pub scope: BackoffScope,
}

/// The longest an automatic action may last: an operator who needs more
/// suspends the domain (`ternctl domain suspend`).
pub const MAX_DURATION: Duration = Duration::from_secs(7 * 86_400);

fn rule_error(key: &'static str, rule: &str, reason: impl std::fmt::Display) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: format!("rule {rule}: {reason}"),
    }
}

fn parse_code(s: &str) -> Option<CodeMatch> {
    let s = s.trim().to_ascii_lowercase();
    let b = s.as_bytes();
    if b.len() != 3 || !(b'2'..=b'5').contains(&b[0]) {
        return None;
    }
    if &s[1..] == "xx" {
        return Some(CodeMatch::Class(b[0] - b'0'));
    }
    let code: u16 = s.parse().ok()?;
    Some(CodeMatch::Exact(code))
}

/// `4.7.28`, `4.7.x`: class 2, 4 or 5, then two numbers (or `x`) of 1 to 3 digits.
fn valid_enhanced(s: &str) -> bool {
    let parts: Vec<&str> = s.split('.').collect();
    parts.len() == 3
        && matches!(parts[0], "2" | "4" | "5")
        && parts[1..]
            .iter()
            .all(|p| *p == "x" || (!p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit())))
}

fn rule(name: String, raw: &RawBackoff) -> Result<BackoffRule, ConfigError> {
    let code = &raw.code;
    let code = parse_code(code).ok_or_else(|| {
        rule_error(
            "backoff.code",
            &name,
            format!("{code:?} is not a reply code (like 421) or class (like 4xx) from 2xx to 5xx"),
        )
    })?;
    let enhanced = raw
        .enhanced
        .as_deref()
        .map(|e| {
            let e = e.trim().to_ascii_lowercase();
            if valid_enhanced(&e) {
                Ok(e)
            } else {
                Err(rule_error(
                    "backoff.enhanced",
                    &name,
                    format!("{e:?} is not an enhanced status code like 4.7.28 (a part may be x)"),
                ))
            }
        })
        .transpose()?;
    let pattern = raw
        .pattern
        .as_deref()
        .map(|p| {
            regex::RegexBuilder::new(p)
                .case_insensitive(true)
                .size_limit(1 << 20)
                .build()
                .map_err(|e| rule_error("backoff.match", &name, e))
        })
        .transpose()?;
    let duration = parse_duration(&raw.duration).map_err(|e| rule_error("backoff.duration", &name, e))?;
    if duration.is_zero() || duration > MAX_DURATION {
        return Err(rule_error(
            "backoff.duration",
            &name,
            "must be from 1s to 7d (a longer stop is an operator's domain suspension)",
        ));
    }
    let action = match (raw.action.trim(), raw.rate.as_deref()) {
        ("suspend", None) => BackoffAction::Suspend,
        ("bounce", None) => BackoffAction::Bounce,
        ("throttle", Some(rate)) => {
            let (count, per) = parse_rate(rate).map_err(|e| rule_error("backoff.rate", &name, e))?;
            BackoffAction::Throttle { count, per }
        }
        ("throttle", None) => {
            return Err(rule_error(
                "backoff.rate",
                &name,
                "throttle needs a rate such as \"20/min\"",
            ))
        }
        ("suspend" | "bounce", Some(_)) => {
            return Err(rule_error(
                "backoff.rate",
                &name,
                "a rate is only for action = \"throttle\"",
            ))
        }
        (other, _) => {
            return Err(rule_error(
                "backoff.action",
                &name,
                format!("{other:?} is not suspend, throttle or bounce"),
            ))
        }
    };
    let scope = match raw.scope.as_deref().map(str::trim) {
        None | Some("destination") => BackoffScope::Destination,
        Some("source") => BackoffScope::Source,
        Some(other) => {
            return Err(rule_error(
                "backoff.scope",
                &name,
                format!("{other:?} is not destination or source"),
            ))
        }
    };
    Ok(BackoffRule {
        name,
        code,
        enhanced,
        pattern,
        action,
        duration,
        scope,
    })
}

/// The operator's rules, then the shipped defaults when `with_defaults`.
pub(super) fn validate(raw: Vec<RawBackoff>, with_defaults: bool) -> Result<Vec<BackoffRule>, ConfigError> {
    let mut rules = Vec::with_capacity(raw.len() + DEFAULTS.len());
    for (i, r) in raw.into_iter().enumerate() {
        let name = match r.name.clone() {
            Some(n) if n.trim().is_empty() || n.len() > 100 || n.contains(char::is_control) => {
                return Err(ConfigError::Invalid {
                    key: "backoff.name",
                    reason: format!("rule backoff[{}]: {n:?} must be 1 to 100 printable characters", i + 1),
                })
            }
            Some(n) => n.trim().to_owned(),
            None => format!("backoff[{}]", i + 1),
        };
        if rules.iter().any(|other: &BackoffRule| other.name == name) {
            return Err(rule_error("backoff.name", &name, "another rule has this name"));
        }
        rules.push(rule(name, &r)?);
    }
    if with_defaults {
        rules.extend(defaults());
    }
    Ok(rules)
}

/// One shipped rule: name, code, enhanced, match, action, duration.
type Shipped = (
    &'static str,
    &'static str,
    Option<&'static str>,
    &'static str,
    &'static str,
    &'static str,
);

/// The shipped rules (docs/deliverability.md, "Automatic backoff", cites
/// the provider pages they come from). Starting points: the texts are the
/// providers' published throttle replies; the durations are cautious.
const DEFAULTS: &[Shipped] = &[
    // Gmail: "421-4.7.28 ... Our system has detected an unusual rate of
    // unsolicited mail originating from your IP address ... temporarily
    // rate limited" (also sent as 450-4.7.28).
    (
        "default:gmail-rate-limited",
        "4xx",
        Some("4.7.28"),
        r"unusual rate of unsolicited mail|rate limited",
        "suspend",
        "30m",
    ),
    // Yahoo: "421 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily
    // deferred due to unexpected volume or user complaints".
    ("default:yahoo-tss04", "4xx", None, r"\[TSS04\]", "suspend", "1h"),
    // Microsoft (Outlook.com, Exchange Online): "451 4.7.650 The mail
    // server [192.0.2.1] has been temporarily rate limited due to IP
    // reputation ... (S775)".
    (
        "default:microsoft-ip-rate-limited",
        "4xx",
        Some("4.7.650"),
        r"temporarily rate limited",
        "suspend",
        "1h",
    ),
    // Microsoft: "451 4.7.500 Server busy. Please try again later from
    // [192.0.2.1]. (S77714)".
    (
        "default:microsoft-server-busy",
        "4xx",
        Some("4.7.500"),
        r"server busy",
        "suspend",
        "15m",
    ),
    // Outlook.com: "421 RP-001 (...) Unfortunately, some messages from
    // 192.0.2.1 weren't sent. Please try again. We have limits for how many
    // messages can be sent per hour and per day." (RP-002, RP-003 alike).
    (
        "default:microsoft-rp-limits",
        "421",
        None,
        r"\bRP-00[123]\b",
        "suspend",
        "1h",
    ),
];

/// The shipped rules, validated (they are constants; a test checks every one parses).
pub fn defaults() -> Vec<BackoffRule> {
    DEFAULTS
        .iter()
        .filter_map(|(name, code, enhanced, pattern, action, duration)| {
            let raw = RawBackoff {
                name: None,
                code: (*code).to_owned(),
                enhanced: enhanced.map(str::to_owned),
                pattern: Some((*pattern).to_owned()),
                action: (*action).to_owned(),
                duration: (*duration).to_owned(),
                rate: None,
                // IP reputation and volume: the sending address's problem.
                scope: Some("source".to_owned()),
            };
            rule((*name).to_owned(), &raw).ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::Config;

    fn parse(extra: &str) -> Result<Config, ConfigError> {
        Config::from_toml(extra)
    }

    #[test]
    fn every_default_parses() {
        assert_eq!(defaults().len(), DEFAULTS.len());
    }

    #[test]
    fn operator_rules_first_then_defaults() {
        let c = parse(
            r#"
[[backoff]]
name = "slow-down"
code = "421"
enhanced = "4.7.x"
match = "slow down"
action = "throttle"
rate = "20/min"
duration = "10m"

[[backoff]]
code = "5xx"
match = "domain retired"
action = "bounce"
duration = "1h"
scope = "destination"
"#,
        )
        .unwrap();
        let names: Vec<&str> = c.backoff.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(&names[..2], ["slow-down", "backoff[2]"]);
        assert_eq!(names.len(), 2 + DEFAULTS.len());
        assert_eq!(
            c.backoff[0].action,
            BackoffAction::Throttle {
                count: 20,
                per: Duration::from_secs(60)
            }
        );
        assert_eq!(c.backoff[0].code, CodeMatch::Exact(421));
        assert_eq!(c.backoff[1].code, CodeMatch::Class(5));
        assert_eq!(c.backoff[1].duration, Duration::from_secs(3600));
        assert!(c.backoff[0].pattern.as_ref().unwrap().is_match("PLEASE SLOW DOWN"));
    }

    #[test]
    fn defaults_can_be_turned_off() {
        let c = parse("[delivery]\nbackoff_defaults = false\n").unwrap();
        assert!(c.backoff.is_empty());
        let c = parse("").unwrap();
        assert_eq!(c.backoff.len(), DEFAULTS.len());
    }

    fn error_of(rule: &str) -> String {
        match parse(&format!("[[backoff]]\n{rule}\n")) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("accepted: {rule}"),
        }
    }

    #[test]
    fn bad_rules_are_named() {
        let e =
            error_of("name = \"x\"\ncode = \"421\"\nmatch = \"(unclosed\"\naction = \"suspend\"\nduration = \"1h\"");
        assert!(e.contains("backoff.match") && e.contains("rule x"), "{e}");
        let e = error_of("code = \"421\"\naction = \"throttle\"\nduration = \"1h\"");
        assert!(e.contains("backoff.rate") && e.contains("rule backoff[1]"), "{e}");
        let e = error_of("code = \"421\"\naction = \"suspend\"\nrate = \"1/s\"\nduration = \"1h\"");
        assert!(e.contains("backoff.rate"), "{e}");
        let e = error_of("code = \"42\"\naction = \"suspend\"\nduration = \"1h\"");
        assert!(e.contains("backoff.code"), "{e}");
        let e = error_of("code = \"6xx\"\naction = \"suspend\"\nduration = \"1h\"");
        assert!(e.contains("backoff.code"), "{e}");
        let e = error_of("code = \"421\"\nenhanced = \"4.7\"\naction = \"suspend\"\nduration = \"1h\"");
        assert!(e.contains("backoff.enhanced"), "{e}");
        let e = error_of("code = \"421\"\naction = \"pause\"\nduration = \"1h\"");
        assert!(e.contains("backoff.action") && e.contains("pause"), "{e}");
        let e = error_of("code = \"421\"\naction = \"suspend\"\nduration = \"0s\"");
        assert!(e.contains("backoff.duration"), "{e}");
        let e = error_of("code = \"421\"\naction = \"suspend\"\nduration = \"8d\"");
        assert!(e.contains("backoff.duration"), "{e}");
        let e = error_of("code = \"421\"\naction = \"suspend\"\nduration = \"soon\"");
        assert!(e.contains("backoff.duration"), "{e}");
        let e = error_of("code = \"421\"\naction = \"suspend\"\nduration = \"1h\"\nscope = \"site\"");
        assert!(e.contains("backoff.scope"), "{e}");
        let e = error_of("code = \"421\"\naction = \"suspend\"\nduration = \"1h\"\nwhen = \"now\"");
        assert!(e.contains("when"), "{e}");
        let e = error_of(
            "name = \"a\"\ncode = \"421\"\naction = \"suspend\"\nduration = \"1h\"\n[[backoff]]\nname = \"a\"\ncode = \"421\"\naction = \"suspend\"\nduration = \"1h\"",
        );
        assert!(e.contains("another rule"), "{e}");
    }
}
