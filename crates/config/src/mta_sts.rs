//! `[mta_sts]`: MTA-STS (RFC 8461) for outbound mail: policies looked up
//! (`_mta-sts` TXT), fetched over verified HTTPS, cached and enforced
//! (docs/security.md, "MTA-STS").

use serde::Deserialize;

use crate::ConfigError;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMtaSts {
    enabled: Option<bool>,
}

/// `[mta_sts]`, validated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MtaStsConfig {
    /// Look up and apply MTA-STS policies of recipient domains.
    pub enabled: bool,
}

pub(super) fn validate(raw: RawMtaSts) -> Result<MtaStsConfig, ConfigError> {
    Ok(MtaStsConfig {
        enabled: raw.enabled.unwrap_or(false),
    })
}
