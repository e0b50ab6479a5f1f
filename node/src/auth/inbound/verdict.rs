//! The decision on a checked message, from its SPF and DMARC results and
//! `[inbound]` settings: accept, quarantine, refuse (5xx) or defer (4xx).
//! Pure: no DNS, no randomness (the pct sample is passed in), so every
//! branch is unit tested.

use mail_auth::dmarc::Policy;
use mail_auth::SpfResult;

use crate::config::{DmarcPolicyMode, SpfFailAction};
use tern_smtp::reply::Reply;

/// What the checks found, as far as the decision is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Findings {
    /// SPF result of the envelope identity: MAIL FROM, or HELO for `<>`.
    pub spf: SpfResult,
    pub dmarc: DmarcFinding,
}

/// The DMARC evaluation of the RFC 5322.From domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DmarcFinding {
    /// The From domain (empty when there is none to check).
    pub domain: String,
    pub result: DmarcOutcome,
    /// The policy that applies to this domain (p=, or sp=/np= for a
    /// subdomain, lowered one step for t=y, as mail-auth computes it);
    /// `None` when the record could not be fetched (DNS temperror).
    pub policy: Option<Policy>,
    /// The record's pct= (RFC 7489 6.6.4).
    pub pct: Pct,
}

/// DMARC result (RFC 7489 11.2 / RFC 8601 2.7.x).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmarcOutcome {
    Pass,
    Fail,
    TempError,
    PermError,
    None,
}

/// pct= of the applied DMARC record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pct {
    /// 0..=100; 100 when the record has no pct=.
    Known(u8),
    /// A DNS temperror while reading it back.
    Unknown,
}

/// What happens to the message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    /// Queue it with `X-Tern-Quarantine: dmarc`.
    Quarantine,
    /// A 5xx: the message is refused for good.
    Reject(Reply),
    /// A 4xx: a DNS temperror left the outcome open.
    Defer(Reply),
}

/// `[inbound]` settings the decision depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rules {
    pub dmarc_policy: DmarcPolicyMode,
    pub spf_fail: SpfFailAction,
}

impl Findings {
    /// What is known when the checks ran out of time: every lookup a temperror.
    pub fn timed_out() -> Findings {
        Findings {
            spf: SpfResult::TempError,
            dmarc: DmarcFinding {
                domain: String::new(),
                result: DmarcOutcome::TempError,
                policy: None,
                pct: Pct::Unknown,
            },
        }
    }
}

/// Decides; `sample` is a number in 0..100 drawn per message, compared
/// with pct= (a failing message is subject to the policy when `sample < pct`).
pub fn decide(rules: Rules, findings: &Findings, sample: u8) -> Verdict {
    if rules.spf_fail == SpfFailAction::Reject {
        match findings.spf {
            SpfResult::Fail => return Verdict::Reject(Reply::new(550, "5.7.23", "SPF validation failed")),
            SpfResult::TempError => {
                return Verdict::Defer(Reply::new(
                    451,
                    "4.7.24",
                    "Temporary DNS error while checking SPF; try again later",
                ))
            }
            _ => {}
        }
    }
    if rules.dmarc_policy == DmarcPolicyMode::Monitor {
        return Verdict::Accept;
    }
    let dmarc = &findings.dmarc;
    let defer = || {
        Verdict::Defer(Reply::new(
            451,
            "4.7.0",
            "Temporary DNS error while checking DMARC; try again later",
        ))
    };
    match dmarc.result {
        DmarcOutcome::Pass | DmarcOutcome::None | DmarcOutcome::PermError => Verdict::Accept,
        // Had the lookup worked, the message might have failed: only a
        // domain that publishes p=none is safe to accept now.
        DmarcOutcome::TempError => match dmarc.policy {
            Some(Policy::None | Policy::Unspecified) => Verdict::Accept,
            _ => defer(),
        },
        DmarcOutcome::Fail => {
            let policy = dmarc.policy.unwrap_or(Policy::None);
            let sampled = match dmarc.pct {
                Pct::Known(pct) => sample < pct,
                // Reading pct= failed: assuming 100 could reject a message
                // the domain wants spared.
                Pct::Unknown if policy == Policy::Reject => return defer(),
                Pct::Unknown => true,
            };
            // A message outside pct gets the next weaker policy (RFC 7489 6.6.4).
            let policy = match (policy, sampled) {
                (p, true) => p,
                (Policy::Reject, false) => Policy::Quarantine,
                (_, false) => Policy::None,
            };
            match policy {
                Policy::Reject => Verdict::Reject(Reply::new(
                    550,
                    "5.7.1",
                    format!("Message rejected: DMARC policy of {}", dmarc.domain),
                )),
                Policy::Quarantine => Verdict::Quarantine,
                Policy::None | Policy::Unspecified => Verdict::Accept,
            }
        }
    }
}

/// pct= of a DMARC record's text; 100 when absent or invalid (RFC 7489 6.3).
pub fn pct_of(record: &str) -> u8 {
    record
        .split(';')
        .filter_map(|tag| tag.split_once('='))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("pct"))
        .and_then(|(_, value)| value.trim().parse::<u8>().ok())
        .filter(|pct| *pct <= 100)
        .unwrap_or(100)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(dmarc_policy: DmarcPolicyMode, spf_fail: SpfFailAction) -> Rules {
        Rules { dmarc_policy, spf_fail }
    }

    const ENFORCE: Rules = Rules {
        dmarc_policy: DmarcPolicyMode::Enforce,
        spf_fail: SpfFailAction::Header,
    };
    const MONITOR: Rules = Rules {
        dmarc_policy: DmarcPolicyMode::Monitor,
        spf_fail: SpfFailAction::Header,
    };

    fn findings(spf: SpfResult, result: DmarcOutcome, policy: Option<Policy>, pct: Pct) -> Findings {
        Findings {
            spf,
            dmarc: DmarcFinding {
                domain: "sender.test".into(),
                result,
                policy,
                pct,
            },
        }
    }

    fn failing(policy: Policy, pct: Pct) -> Findings {
        findings(SpfResult::Fail, DmarcOutcome::Fail, Some(policy), pct)
    }

    fn code(v: &Verdict) -> Option<(u16, &str)> {
        match v {
            Verdict::Reject(r) | Verdict::Defer(r) => Some((r.code, r.enhanced.as_deref().unwrap_or(""))),
            _ => None,
        }
    }

    #[test]
    fn enforce_applies_the_published_policy() {
        let v = decide(ENFORCE, &failing(Policy::Reject, Pct::Known(100)), 99);
        assert_eq!(code(&v), Some((550, "5.7.1")));
        let Verdict::Reject(r) = v else { unreachable!() };
        assert_eq!(r.text(), "Message rejected: DMARC policy of sender.test");
        assert_eq!(
            decide(ENFORCE, &failing(Policy::Quarantine, Pct::Known(100)), 0),
            Verdict::Quarantine
        );
        assert_eq!(
            decide(ENFORCE, &failing(Policy::None, Pct::Known(100)), 0),
            Verdict::Accept
        );
        for outcome in [DmarcOutcome::Pass, DmarcOutcome::None, DmarcOutcome::PermError] {
            let f = findings(SpfResult::Fail, outcome, Some(Policy::Reject), Pct::Known(100));
            assert_eq!(decide(ENFORCE, &f, 0), Verdict::Accept, "{outcome:?}");
        }
    }

    #[test]
    fn monitor_never_refuses() {
        assert_eq!(
            decide(MONITOR, &failing(Policy::Reject, Pct::Known(100)), 0),
            Verdict::Accept
        );
        assert_eq!(decide(MONITOR, &Findings::timed_out(), 0), Verdict::Accept);
        let temp = findings(SpfResult::TempError, DmarcOutcome::TempError, None, Pct::Unknown);
        assert_eq!(decide(MONITOR, &temp, 0), Verdict::Accept);
    }

    #[test]
    fn pct_samples_and_lowers_the_policy_outside_the_sample() {
        let f = failing(Policy::Reject, Pct::Known(30));
        assert_eq!(code(&decide(ENFORCE, &f, 29)), Some((550, "5.7.1")));
        assert_eq!(decide(ENFORCE, &f, 30), Verdict::Quarantine);
        let f = failing(Policy::Quarantine, Pct::Known(0));
        assert_eq!(decide(ENFORCE, &f, 0), Verdict::Accept);
        // pct could not be read: no reject on a guess, but quarantine is safe.
        let f = failing(Policy::Reject, Pct::Unknown);
        assert_eq!(code(&decide(ENFORCE, &f, 0)), Some((451, "4.7.0")));
        let f = failing(Policy::Quarantine, Pct::Unknown);
        assert_eq!(decide(ENFORCE, &f, 99), Verdict::Quarantine);
    }

    #[test]
    fn temperror_defers_instead_of_rejecting() {
        // The DMARC record itself could not be fetched.
        let f = findings(SpfResult::None, DmarcOutcome::TempError, None, Pct::Unknown);
        let v = decide(ENFORCE, &f, 0);
        assert_eq!(code(&v), Some((451, "4.7.0")));
        let Verdict::Defer(r) = v else { unreachable!() };
        assert!(r.text().contains("Temporary DNS error"), "{r:?}");
        // A known reject or quarantine policy whose checks hit a temperror.
        for policy in [Policy::Reject, Policy::Quarantine] {
            let f = findings(
                SpfResult::TempError,
                DmarcOutcome::TempError,
                Some(policy),
                Pct::Known(100),
            );
            assert_eq!(code(&decide(ENFORCE, &f, 0)), Some((451, "4.7.0")));
        }
        // p=none: nothing is at stake.
        let f = findings(
            SpfResult::TempError,
            DmarcOutcome::TempError,
            Some(Policy::None),
            Pct::Known(100),
        );
        assert_eq!(decide(ENFORCE, &f, 0), Verdict::Accept);
        // The whole check timed out.
        assert_eq!(code(&decide(ENFORCE, &Findings::timed_out(), 0)), Some((451, "4.7.0")));
    }

    #[test]
    fn spf_fail_reject() {
        let r = rules(DmarcPolicyMode::Monitor, SpfFailAction::Reject);
        let pass = findings(SpfResult::Fail, DmarcOutcome::Pass, Some(Policy::None), Pct::Known(100));
        assert_eq!(code(&decide(r, &pass, 0)), Some((550, "5.7.23")));
        let temp = findings(SpfResult::TempError, DmarcOutcome::None, None, Pct::Known(100));
        assert_eq!(code(&decide(r, &temp, 0)), Some((451, "4.7.24")));
        for spf in [
            SpfResult::SoftFail,
            SpfResult::Neutral,
            SpfResult::None,
            SpfResult::PermError,
        ] {
            let f = findings(spf, DmarcOutcome::None, None, Pct::Known(100));
            assert_eq!(decide(r, &f, 0), Verdict::Accept, "{spf:?}");
        }
        // With spf_fail = "header" an SPF fail alone changes nothing.
        let f = findings(SpfResult::Fail, DmarcOutcome::None, None, Pct::Known(100));
        assert_eq!(decide(ENFORCE, &f, 0), Verdict::Accept);
        assert_eq!(code(&decide(r, &Findings::timed_out(), 0)), Some((451, "4.7.24")));
    }

    #[test]
    fn pct_tag() {
        assert_eq!(pct_of("v=DMARC1; p=reject"), 100);
        assert_eq!(pct_of("v=DMARC1; p=reject; pct=20"), 20);
        assert_eq!(pct_of("v=DMARC1;p=reject;PCT = 0 ;"), 0);
        assert_eq!(pct_of("v=DMARC1; p=reject; pct=200"), 100);
        assert_eq!(pct_of("v=DMARC1; p=reject; pct=x"), 100);
    }
}
