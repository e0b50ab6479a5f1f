//! What delivery tells TLS-RPT: one [`TlsOutcome`] per TLS negotiation with
//! a destination whose policy (MTA-STS, DANE) or lack of one is known, and
//! [`TlsRecorder`], which counts them per policy until the reporting task
//! takes them.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

/// The policy a session was held to (RFC 8460 4.3, `policy-type`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PolicyKind {
    /// An MTA-STS policy: its text as fetched, split into lines, and its
    /// `mx` patterns.
    Sts { policy: Vec<String>, mx: Vec<String> },
    /// DANE: the TLSA records (presentation format) of the MX host.
    Tlsa { records: Vec<String> },
    /// Neither was found (recorded for domains that publish `_smtp._tls`).
    NoPolicyFound,
}

impl PolicyKind {
    /// RFC 8460's `policy-type` string.
    pub fn type_name(&self) -> &'static str {
        match self {
            PolicyKind::Sts { .. } => "sts",
            PolicyKind::Tlsa { .. } => "tlsa",
            PolicyKind::NoPolicyFound => "no-policy-found",
        }
    }
}

/// RFC 8460 4.3, `result-type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FailureType {
    StarttlsNotSupported,
    CertificateHostMismatch,
    CertificateExpired,
    CertificateNotTrusted,
    ValidationFailure,
    TlsaInvalid,
    DnssecInvalid,
    DaneRequired,
    StsPolicyFetchError,
    StsPolicyInvalid,
    StsWebpkiInvalid,
}

impl FailureType {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureType::StarttlsNotSupported => "starttls-not-supported",
            FailureType::CertificateHostMismatch => "certificate-host-mismatch",
            FailureType::CertificateExpired => "certificate-expired",
            FailureType::CertificateNotTrusted => "certificate-not-trusted",
            FailureType::ValidationFailure => "validation-failure",
            FailureType::TlsaInvalid => "tlsa-invalid",
            FailureType::DnssecInvalid => "dnssec-invalid",
            FailureType::DaneRequired => "dane-required",
            FailureType::StsPolicyFetchError => "sts-policy-fetch-error",
            FailureType::StsPolicyInvalid => "sts-policy-invalid",
            FailureType::StsWebpkiInvalid => "sts-webpki-invalid",
        }
    }
}

/// A failed negotiation (RFC 8460 4.3, `failure-details`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Failure {
    pub result_type: FailureType,
    pub sending_mta_ip: Option<IpAddr>,
    pub receiving_mx_hostname: Option<String>,
    pub receiving_ip: Option<IpAddr>,
    /// A short, stable reason (`additional-information`/`failure-reason-code`).
    pub reason: String,
}

/// One TLS negotiation's outcome under a policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsOutcome {
    /// The recipient domain whose policy applied (`policy-domain`).
    pub policy_domain: String,
    pub policy: PolicyKind,
    /// `None`: the session was secured as the policy asks.
    pub failure: Option<Failure>,
}

/// The counts of one policy of one domain.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyCounts {
    pub successes: u64,
    pub failures: HashMap<Failure, u64>,
}

/// Counts of outcomes per (policy domain, policy), shared by every site
/// actor of the node; bounded in the number of keys it holds.
#[derive(Debug, Default)]
pub struct TlsRecorder {
    counts: Mutex<HashMap<(String, PolicyKind), PolicyCounts>>,
}

/// Most (domain, policy) pairs held between two takes; later new pairs are
/// dropped (counted in the log) rather than growing without bound.
pub const MAX_TLS_POLICIES: usize = 100_000;
/// Most distinct failure details kept per policy.
pub const MAX_FAILURE_DETAILS: usize = 100;

impl TlsRecorder {
    /// Counts one outcome.
    pub fn record(&self, outcome: TlsOutcome) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let key = (outcome.policy_domain, outcome.policy);
        if !counts.contains_key(&key) && counts.len() >= MAX_TLS_POLICIES {
            tracing::warn!(domain = %key.0, "TLS-RPT: too many policies this period, outcome not counted");
            return;
        }
        let entry = counts.entry(key).or_default();
        match outcome.failure {
            None => entry.successes += 1,
            Some(f) => {
                if entry.failures.len() < MAX_FAILURE_DETAILS || entry.failures.contains_key(&f) {
                    *entry.failures.entry(f).or_default() += 1;
                } else {
                    // The total still counts: fold into an existing detail of the type.
                    let same = entry.failures.keys().find(|k| k.result_type == f.result_type).cloned();
                    match same {
                        Some(k) => *entry.failures.entry(k).or_default() += 1,
                        None => *entry.failures.entry(f).or_default() += 1,
                    }
                }
            }
        }
    }

    /// Everything counted since the last take, emptied.
    pub fn take(&self) -> HashMap<(String, PolicyKind), PolicyCounts> {
        std::mem::take(&mut *self.counts.lock().unwrap_or_else(|e| e.into_inner()))
    }
}
