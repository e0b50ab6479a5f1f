//! `[tls_rpt]` and `[dmarc_reports]`: the aggregate reports a node sends
//! for the cluster, once per period and domain (docs/reports.md).

use serde::Deserialize;

use crate::ConfigError;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTlsRpt {
    enabled: Option<bool>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDmarcReports {
    enabled: Option<bool>,
    org_name: Option<String>,
    from: Option<String>,
}

/// `[tls_rpt]`, validated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsRptConfig {
    /// Record outbound TLS outcomes and send TLS-RPT reports (RFC 8460).
    pub enabled: bool,
}

/// `[dmarc_reports]`, validated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DmarcReportsConfig {
    /// Record inbound DMARC results and send aggregate reports (RFC 7489 7.2).
    pub enabled: bool,
    /// The reporter's organisation name in the reports.
    pub org_name: String,
    /// The address reports are sent from.
    pub from: String,
}

pub(super) fn validate_tls_rpt(raw: RawTlsRpt) -> Result<TlsRptConfig, ConfigError> {
    Ok(TlsRptConfig {
        enabled: raw.enabled.unwrap_or(false),
    })
}

pub(super) fn validate_dmarc(raw: RawDmarcReports) -> Result<DmarcReportsConfig, ConfigError> {
    Ok(DmarcReportsConfig {
        enabled: raw.enabled.unwrap_or(false),
        org_name: raw.org_name.unwrap_or_default(),
        from: raw.from.unwrap_or_default(),
    })
}
