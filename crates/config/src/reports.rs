//! `[tls_rpt]` and `[dmarc_reports]`: the aggregate reports a node sends
//! for the cluster, once per period and domain (docs/reports.md).

use std::time::Duration;

use serde::Deserialize;

use crate::ConfigError;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTlsRpt {
    enabled: Option<bool>,
    interval: Option<String>,
    org_name: Option<String>,
    from: Option<String>,
    contact_info: Option<String>,
    max_reports: Option<usize>,
    grace: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDmarcReports {
    enabled: Option<bool>,
    org_name: Option<String>,
    from: Option<String>,
    interval: Option<String>,
    contact: Option<String>,
    max_reports: Option<usize>,
    grace: Option<String>,
}

/// `[tls_rpt]`, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsRptConfig {
    /// Record outbound TLS outcomes and send TLS-RPT reports (RFC 8460).
    pub enabled: bool,
    /// Length of a reporting period (RFC 8460 asks for a day).
    pub interval: Duration,
    /// `organization-name` of the reports.
    pub org_name: String,
    /// The address reports are mailed from (its domain's DKIM key signs them).
    pub from: String,
    /// `contact-info` of the reports (defaults to `from`).
    pub contact_info: String,
    /// Most reports sent per period (domains beyond are dropped, logged).
    pub max_reports: usize,
    /// Wait after a period's end before the report is built, so every
    /// node's counts have reached the control group.
    pub grace: Duration,
}

impl Default for TlsRptConfig {
    fn default() -> Self {
        TlsRptConfig {
            enabled: false,
            interval: Duration::from_secs(86_400),
            org_name: String::new(),
            from: String::new(),
            contact_info: String::new(),
            max_reports: 1_000,
            grace: Duration::from_secs(300),
        }
    }
}

/// `[dmarc_reports]`, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DmarcReportsConfig {
    /// Record inbound DMARC results and send aggregate reports (RFC 7489 7.2).
    pub enabled: bool,
    /// The reporter's organisation name in the reports.
    pub org_name: String,
    /// The address reports are sent from.
    pub from: String,
    /// Length of a reporting period (RFC 7489: a day, the `ri=` default).
    pub interval: Duration,
    /// `extra_contact_info` of the reports (empty: left out).
    pub contact: String,
    /// Most reports sent per period.
    pub max_reports: usize,
    /// Wait after a period's end before the report is built.
    pub grace: Duration,
}

impl Default for DmarcReportsConfig {
    fn default() -> Self {
        DmarcReportsConfig {
            enabled: false,
            org_name: String::new(),
            from: String::new(),
            interval: Duration::from_secs(86_400),
            contact: String::new(),
            max_reports: 1_000,
            grace: Duration::from_secs(300),
        }
    }
}

fn duration(v: Option<String>, default: Duration, key: &'static str) -> Result<Duration, ConfigError> {
    let d = match v {
        None => default,
        Some(s) => crate::parse_duration(&s).map_err(|e| ConfigError::Invalid {
            key,
            reason: e.to_string(),
        })?,
    };
    if d.is_zero() {
        return Err(ConfigError::Invalid {
            key,
            reason: "must be more than 0s".into(),
        });
    }
    Ok(d)
}

/// An enabled section needs an `org_name` and a `from` address.
fn required(enabled: bool, value: Option<String>, key: &'static str) -> Result<String, ConfigError> {
    let value = value.unwrap_or_default().trim().to_owned();
    if enabled && value.is_empty() {
        return Err(ConfigError::Invalid {
            key,
            reason: "required when enabled".into(),
        });
    }
    Ok(value)
}

fn address(enabled: bool, value: Option<String>, key: &'static str) -> Result<String, ConfigError> {
    let value = required(enabled, value, key)?;
    if enabled
        && !value
            .rsplit_once('@')
            .is_some_and(|(l, d)| !l.is_empty() && d.contains('.'))
    {
        return Err(ConfigError::Invalid {
            key,
            reason: format!("{value:?} is not an address like reports@example.com"),
        });
    }
    Ok(value)
}

pub(super) fn validate_tls_rpt(raw: RawTlsRpt) -> Result<TlsRptConfig, ConfigError> {
    let d = TlsRptConfig::default();
    let enabled = raw.enabled.unwrap_or(false);
    let from = address(enabled, raw.from, "tls_rpt.from")?;
    Ok(TlsRptConfig {
        enabled,
        interval: duration(raw.interval, d.interval, "tls_rpt.interval")?,
        org_name: required(enabled, raw.org_name, "tls_rpt.org_name")?,
        contact_info: raw.contact_info.unwrap_or_else(|| from.clone()),
        from,
        max_reports: raw.max_reports.unwrap_or(d.max_reports),
        grace: duration(raw.grace, d.grace, "tls_rpt.grace")?,
    })
}

pub(super) fn validate_dmarc(raw: RawDmarcReports) -> Result<DmarcReportsConfig, ConfigError> {
    let d = DmarcReportsConfig::default();
    let enabled = raw.enabled.unwrap_or(false);
    Ok(DmarcReportsConfig {
        enabled,
        org_name: required(enabled, raw.org_name, "dmarc_reports.org_name")?,
        from: address(enabled, raw.from, "dmarc_reports.from")?,
        interval: duration(raw.interval, d.interval, "dmarc_reports.interval")?,
        contact: raw.contact.unwrap_or_default(),
        max_reports: raw.max_reports.unwrap_or(d.max_reports),
        grace: duration(raw.grace, d.grace, "dmarc_reports.grace")?,
    })
}

#[cfg(test)]
mod tests {
    use crate::Config;

    #[test]
    fn defaults_required_keys_and_durations() {
        let c = Config::from_toml("").expect("empty config");
        assert!(!c.tls_rpt.enabled && !c.dmarc_reports.enabled);
        assert_eq!(c.tls_rpt.interval.as_secs(), 86_400);
        assert_eq!(c.dmarc_reports.grace.as_secs(), 300);

        let c = Config::from_toml(
            "[tls_rpt]\nenabled = true\ninterval = \"4s\"\norg_name = \"Org\"\nfrom = \"r@example.com\"\n",
        )
        .expect("valid [tls_rpt]");
        assert_eq!(c.tls_rpt.interval.as_secs(), 4);
        assert_eq!(c.tls_rpt.contact_info, "r@example.com");
        assert_eq!(c.tls_rpt.max_reports, 1_000);

        for (toml, key) in [
            (
                "[tls_rpt]\nenabled = true\nfrom = \"r@example.com\"\n",
                "tls_rpt.org_name",
            ),
            (
                "[dmarc_reports]\nenabled = true\norg_name = \"O\"\n",
                "dmarc_reports.from",
            ),
            (
                "[dmarc_reports]\nenabled = true\norg_name = \"O\"\nfrom = \"nodomain\"\n",
                "dmarc_reports.from",
            ),
            ("[dmarc_reports]\ninterval = \"0s\"\n", "dmarc_reports.interval"),
            ("[tls_rpt]\ngrace = \"soon\"\n", "tls_rpt.grace"),
        ] {
            let e = Config::from_toml(toml).expect_err(toml).to_string();
            assert!(e.contains(key), "{toml}: {e}");
        }
    }
}
