//! `[dane]`: DANE for SMTP (RFC 7672): DNSSEC-validated TLSA records of MX
//! hosts (docs/security.md, "DANE").

use serde::Deserialize;

use crate::ConfigError;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDane {
    enabled: Option<bool>,
}

/// `[dane]`, validated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DaneConfig {
    /// Look up TLSA records for MX hosts of `dane` destinations.
    pub enabled: bool,
}

pub(super) fn validate(raw: RawDane) -> Result<DaneConfig, ConfigError> {
    Ok(DaneConfig {
        enabled: raw.enabled.unwrap_or(false),
    })
}
