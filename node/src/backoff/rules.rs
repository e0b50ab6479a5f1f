//! Which `[[backoff]]` rule a remote reply matches: the reply code, the
//! enhanced status code and the rule's regular expression, first match
//! wins (the operator's rules come before the shipped defaults).
//!
//! Replies arrive in their one-line form (`421 4.7.28 Our system has ...`,
//! multi-line replies joined by spaces), as delivery outcomes carry them.
//! A reply that ended the session (a 421, or a refused greeting, EHLO or
//! MAIL) comes wrapped in our own (`451 4.4.2 mx.example.net said: 421
//! 4.7.28 ...`): rules see the remote reply inside.

use crate::config::BackoffRule;

/// The reply code and enhanced status code at the head of a one-line reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplyHead<'a> {
    pub code: u16,
    pub enhanced: Option<&'a str>,
}

/// `None` when the reply does not start with a three-digit code.
pub fn head(reply: &str) -> Option<ReplyHead<'_>> {
    let reply = reply.trim_start();
    let code = reply.get(..3)?;
    if !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let rest = &reply[3..];
    // `421-4.7.28` when a multi-line reply was kept as sent.
    let rest = rest.strip_prefix([' ', '-']).unwrap_or(rest);
    let token = rest.split_whitespace().next().unwrap_or("");
    let enhanced = is_enhanced(token).then_some(token);
    Some(ReplyHead {
        code: code.parse().ok()?,
        enhanced,
    })
}

fn is_enhanced(token: &str) -> bool {
    let mut parts = token.split('.');
    let class_ok = matches!(parts.next(), Some("2" | "4" | "5"));
    let rest: Vec<&str> = parts.collect();
    class_ok
        && rest.len() == 2
        && rest
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
}

/// `4.7.x` matches `4.7.28`.
fn enhanced_matches(want: &str, got: &str) -> bool {
    let mut got = got.split('.');
    want.split('.').all(|w| match got.next() {
        Some(g) => w == "x" || w == g,
        None => false,
    })
}

/// The remote server's reply in one of ours: the text after the first
/// `": "` that starts a reply (`said: 421 ...`, `refused MAIL: 421 ...`);
/// else the reply itself.
pub fn remote_reply(reply: &str) -> &str {
    reply
        .match_indices(": ")
        .map(|(i, _)| &reply[i + 2..])
        .find(|tail| {
            let b = tail.as_bytes();
            b.len() >= 3 && b[..3].iter().all(u8::is_ascii_digit) && matches!(b.get(3), None | Some(b' ' | b'-'))
        })
        .unwrap_or(reply)
}

/// Whether `rule` matches the one-line `reply` (or the remote reply it wraps).
pub fn matches(rule: &BackoffRule, reply: &str) -> bool {
    let reply = remote_reply(reply);
    let Some(head) = head(reply) else {
        return false;
    };
    if !rule.code.matches(head.code) {
        return false;
    }
    if let Some(want) = &rule.enhanced {
        match head.enhanced {
            Some(got) if enhanced_matches(want, got) => {}
            _ => return false,
        }
    }
    rule.pattern.as_ref().is_none_or(|p| p.is_match(reply))
}

/// The first rule that matches `reply`.
pub fn first_match<'a>(rules: &'a [BackoffRule], reply: &str) -> Option<&'a BackoffRule> {
    rules.iter().find(|r| matches(r, reply))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::{BackoffAction, Config};

    fn defaults() -> Vec<BackoffRule> {
        crate::config::backoff::defaults()
    }

    fn fired(reply: &str) -> Option<String> {
        first_match(&defaults(), reply).map(|r| r.name.clone())
    }

    // Provider texts as the providers publish them (one-line form).
    const GMAIL_421: &str = "421 4.7.28 [192.0.2.1      15] Our system has detected an unusual rate of \
        unsolicited mail originating from your IP address. To protect our users from spam, mail sent from your \
        IP address has been temporarily rate limited. Please visit \
        https://support.google.com/mail/?p=UnsolicitedRateLimitError to review our Bulk Email Senders \
        Guidelines. d2e1a72fcca58-7e2b123sor1234567b3a.11 - gsmtp";
    const GMAIL_450: &str = "450-4.7.28 [192.0.2.1] Our system has detected an unusual rate of unsolicited mail \
        originating from your IP address. To protect our users from spam, mail sent from your IP address has \
        been temporarily rate limited. - gsmtp";
    const YAHOO_TSS04: &str = "421 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected \
        volume or user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes";
    const MS_4_7_650: &str = "451 4.7.650 The mail server [192.0.2.1] has been temporarily rate limited due to IP \
        reputation. For e-mail delivery information, see https://postmaster.live.com (S775) \
        [BN8NAM11FT066.eop-nam11.prod.protection.outlook.com]";
    const MS_4_7_500: &str = "451 4.7.500 Server busy. Please try again later from [192.0.2.1]. (S77714) \
        [DB5EUR03FT044.eop-EUR03.prod.protection.outlook.com]";
    const MS_RP_001: &str = "421 RP-001 (BAY004-MC1F18) Unfortunately, some messages from 192.0.2.1 weren't sent. \
        Please try again. We have limits for how many messages can be sent per hour and per day. You can also \
        refer to http://mail.live.com/mail/troubleshooting.aspx#errors.";

    #[test]
    fn shipped_defaults_fire_on_provider_throttle_replies() {
        assert_eq!(fired(GMAIL_421).as_deref(), Some("default:gmail-rate-limited"));
        assert_eq!(fired(GMAIL_450).as_deref(), Some("default:gmail-rate-limited"));
        assert_eq!(fired(YAHOO_TSS04).as_deref(), Some("default:yahoo-tss04"));
        assert_eq!(fired(MS_4_7_650).as_deref(), Some("default:microsoft-ip-rate-limited"));
        assert_eq!(fired(MS_4_7_500).as_deref(), Some("default:microsoft-server-busy"));
        assert_eq!(fired(MS_RP_001).as_deref(), Some("default:microsoft-rp-limits"));
    }

    #[test]
    fn a_reply_that_closed_the_session_is_matched_inside_ours() {
        let wrapped = format!("451 4.4.2 mx.google.com: 127.0.0.1[127.0.0.1] said: {GMAIL_421}");
        assert_eq!(remote_reply(&wrapped), GMAIL_421);
        assert_eq!(fired(&wrapped).as_deref(), Some("default:gmail-rate-limited"));
        let refused = format!("451 4.4.2 mx.yahoo.test:25 refused MAIL: {YAHOO_TSS04}");
        assert_eq!(fired(&refused).as_deref(), Some("default:yahoo-tss04"));
        assert_eq!(
            remote_reply("451 4.4.1 127.0.0.1:25: connection refused"),
            "451 4.4.1 127.0.0.1:25: connection refused"
        );
    }

    #[test]
    fn shipped_defaults_ignore_ordinary_failures() {
        for reply in [
            "250 2.0.0 OK 1700000000 d2e1a72fcca58 - gsmtp",
            // Per-recipient, not the sender's rate: no reason to stop the destination.
            "452 4.2.2 The email account that you tried to reach is over quota. - gsmtp",
            "450 4.2.1 The user you are trying to contact is receiving mail at a rate that prevents additional \
             messages from being delivered. - gsmtp",
            "550 5.1.1 The email account that you tried to reach does not exist. - gsmtp",
            "421 4.7.0 [TSS01] Messages from 192.0.2.1 temporarily deferred due to user complaints",
            "451 4.3.0 delivery interrupted",
            "451 4.4.1 mx.example.test:25: connection refused",
            // The text without its code is not enough.
            "550 5.7.28 unusual rate of unsolicited mail",
            "",
            "garbage",
        ] {
            assert_eq!(fired(reply), None, "{reply}");
        }
    }

    fn operator_rules(toml: &str) -> Vec<BackoffRule> {
        Config::from_toml(toml).unwrap().backoff
    }

    #[test]
    fn operator_rules_come_first_and_match_by_class_and_partial_enhanced_code() {
        let rules = operator_rules(
            r#"
[[backoff]]
name = "any-4.7"
code = "4xx"
enhanced = "4.7.x"
match = "RATE LIMITED"
action = "throttle"
rate = "10/min"
duration = "10m"
"#,
        );
        let rule = first_match(&rules, GMAIL_421).unwrap();
        assert_eq!(rule.name, "any-4.7");
        assert!(matches!(rule.action, BackoffAction::Throttle { count: 10, .. }));
        // Yahoo's 4.7.0 does not say "rate limited": the default still answers.
        assert_eq!(first_match(&rules, YAHOO_TSS04).unwrap().name, "default:yahoo-tss04");
    }

    #[test]
    fn rule_without_match_or_enhanced_is_code_only() {
        let rules = operator_rules("[delivery]\nbackoff_defaults = false\n[[backoff]]\ncode = \"554\"\naction = \"bounce\"\nduration = \"1h\"\n");
        assert!(first_match(&rules, "554 5.7.1 Service unavailable").is_some());
        assert!(first_match(&rules, "550 5.7.1 Service unavailable").is_none());
        let rules = operator_rules("[delivery]\nbackoff_defaults = false\n[[backoff]]\ncode = \"421\"\nenhanced = \"4.7.0\"\naction = \"suspend\"\nduration = \"1h\"\n");
        assert!(
            first_match(&rules, "421 Service not available").is_none(),
            "no enhanced code"
        );
        assert!(first_match(&rules, "421 4.7.0 try later").is_some());
    }

    #[test]
    fn reply_heads() {
        assert_eq!(
            head("421-4.7.28 x"),
            Some(ReplyHead {
                code: 421,
                enhanced: Some("4.7.28")
            })
        );
        assert_eq!(
            head("421 RP-001 x"),
            Some(ReplyHead {
                code: 421,
                enhanced: None
            })
        );
        assert_eq!(head("42"), None);
        assert_eq!(head("abc def"), None);
        assert_eq!(head("451 4.7.1234 x").and_then(|h| h.enhanced), None);
    }
}
