//! TLS-RPT counts as they travel between nodes (one serialized value per
//! domain and node) and the RFC 8460 4.4 JSON report built from them.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use super::tls::{PolicyCounts, PolicyKind};

/// The counts of one policy of a domain, as written to the control group.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyTally {
    pub policy_type: String,
    #[serde(default)]
    pub policy_string: Vec<String>,
    #[serde(default)]
    pub mx_host: Vec<String>,
    pub successes: u64,
    #[serde(default)]
    pub failures: Vec<FailureTally>,
}

/// One failure detail and how many sessions it covers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureTally {
    pub result_type: String,
    pub sending_mta_ip: Option<String>,
    pub receiving_mx_hostname: Option<String>,
    pub receiving_ip: Option<String>,
    pub reason: String,
    pub count: u64,
}

/// This node's counts of a period (from [`super::tls::TlsRecorder::take`]) by domain.
pub fn by_domain(counts: HashMap<(String, PolicyKind), PolicyCounts>) -> BTreeMap<String, Vec<PolicyTally>> {
    let mut out: BTreeMap<String, Vec<PolicyTally>> = BTreeMap::new();
    for ((domain, policy), counts) in counts {
        let (policy_string, mx_host) = match &policy {
            PolicyKind::Sts { policy, mx } => (policy.clone(), mx.clone()),
            PolicyKind::Tlsa { records } => (records.clone(), Vec::new()),
            PolicyKind::NoPolicyFound => (Vec::new(), Vec::new()),
        };
        let failures = counts
            .failures
            .into_iter()
            .map(|(f, count)| FailureTally {
                result_type: f.result_type.as_str().to_owned(),
                sending_mta_ip: f.sending_mta_ip.map(|ip| ip.to_string()),
                receiving_mx_hostname: f.receiving_mx_hostname,
                receiving_ip: f.receiving_ip.map(|ip| ip.to_string()),
                reason: f.reason,
                count,
            })
            .collect();
        out.entry(domain).or_default().push(PolicyTally {
            policy_type: policy.type_name().to_owned(),
            policy_string,
            mx_host,
            successes: counts.successes,
            failures,
        });
    }
    out
}

/// Sums the tallies of several nodes: same policy, same failure detail.
pub fn merge(parts: impl IntoIterator<Item = Vec<PolicyTally>>) -> Vec<PolicyTally> {
    let mut merged: Vec<PolicyTally> = Vec::new();
    for tally in parts.into_iter().flatten() {
        let same = merged.iter_mut().find(|m| {
            m.policy_type == tally.policy_type && m.policy_string == tally.policy_string && m.mx_host == tally.mx_host
        });
        let Some(m) = same else {
            merged.push(tally);
            continue;
        };
        m.successes += tally.successes;
        for f in tally.failures {
            match m.failures.iter_mut().find(|g| {
                FailureTally {
                    count: f.count,
                    ..(*g).clone()
                } == f
            }) {
                Some(g) => g.count += f.count,
                None => m.failures.push(f),
            }
        }
    }
    merged
}

/// What identifies a report besides its counts.
pub struct Header<'a> {
    pub org_name: &'a str,
    pub contact_info: &'a str,
    pub report_id: &'a str,
    pub begin: i64,
    pub end: i64,
    pub policy_domain: &'a str,
}

fn rfc3339(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0)
        .unwrap_or_default()
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// The RFC 8460 4.4 report.
pub fn report_json(h: &Header<'_>, tallies: &[PolicyTally]) -> serde_json::Value {
    use serde_json::{json, Map, Value};
    let policies: Vec<Value> = tallies
        .iter()
        .map(|t| {
            let mut policy = Map::new();
            policy.insert("policy-type".into(), json!(t.policy_type));
            if !t.policy_string.is_empty() {
                policy.insert("policy-string".into(), json!(t.policy_string));
            }
            policy.insert("policy-domain".into(), json!(h.policy_domain));
            if !t.mx_host.is_empty() {
                policy.insert("mx-host".into(), json!(t.mx_host));
            }
            let failed: u64 = t.failures.iter().map(|f| f.count).sum();
            let mut entry = Map::new();
            entry.insert("policy".into(), Value::Object(policy));
            entry.insert(
                "summary".into(),
                json!({
                    "total-successful-session-count": t.successes,
                    "total-failure-session-count": failed,
                }),
            );
            if !t.failures.is_empty() {
                let details: Vec<Value> = t
                    .failures
                    .iter()
                    .map(|f| {
                        let mut d = Map::new();
                        d.insert("result-type".into(), json!(f.result_type));
                        if let Some(ip) = &f.sending_mta_ip {
                            d.insert("sending-mta-ip".into(), json!(ip));
                        }
                        if let Some(mx) = &f.receiving_mx_hostname {
                            d.insert("receiving-mx-hostname".into(), json!(mx));
                        }
                        if let Some(ip) = &f.receiving_ip {
                            d.insert("receiving-ip".into(), json!(ip));
                        }
                        d.insert("failed-session-count".into(), json!(f.count));
                        if !f.reason.is_empty() {
                            d.insert("failure-reason-code".into(), json!(f.reason));
                        }
                        Value::Object(d)
                    })
                    .collect();
                entry.insert("failure-details".into(), Value::Array(details));
            }
            Value::Object(entry)
        })
        .collect();
    json!({
        "organization-name": h.org_name,
        "date-range": {
            "start-datetime": rfc3339(h.begin),
            "end-datetime": rfc3339(h.end),
        },
        "contact-info": h.contact_info,
        "report-id": h.report_id,
        "policies": policies,
    })
}

/// The `rua` URIs of a `_smtp._tls` TXT record (RFC 8460 3): `None` when
/// the text is not a TLSRPTv1 record.
pub fn parse_record(text: &str) -> Option<Vec<String>> {
    let mut fields = text.split(';').map(str::trim);
    if !fields.next()?.eq_ignore_ascii_case("v=TLSRPTv1") {
        return None;
    }
    let rua = fields.find_map(|f| {
        let (k, v) = f.split_once('=')?;
        k.trim().eq_ignore_ascii_case("rua").then(|| v.trim().to_owned())
    })?;
    let uris: Vec<String> = rua
        .split(',')
        .map(|u| u.trim().to_owned())
        .filter(|u| u.starts_with("mailto:") || u.starts_with("https://"))
        .collect();
    (!uris.is_empty()).then_some(uris)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_parsing() {
        assert_eq!(
            parse_record("v=TLSRPTv1; rua=mailto:a@b.test,https://r.test/x"),
            Some(vec!["mailto:a@b.test".into(), "https://r.test/x".into()])
        );
        assert_eq!(parse_record("v=spf1 -all"), None);
        assert_eq!(parse_record("v=TLSRPTv1;"), None);
    }

    #[test]
    fn merge_sums_same_policy_and_detail() {
        let f = FailureTally {
            result_type: "starttls-not-supported".into(),
            sending_mta_ip: None,
            receiving_mx_hostname: Some("mx.test".into()),
            receiving_ip: None,
            reason: "x".into(),
            count: 2,
        };
        let t = PolicyTally {
            policy_type: "no-policy-found".into(),
            successes: 3,
            failures: vec![f.clone()],
            ..PolicyTally::default()
        };
        let m = merge([vec![t.clone()], vec![t]]);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].successes, 6);
        assert_eq!(m[0].failures, vec![FailureTally { count: 4, ..f }]);
    }
}
