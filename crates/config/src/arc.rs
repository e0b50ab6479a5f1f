//! `[arc]`: ARC sealing (RFC 8617) of inbound mail that Tern forwards
//! (docs/authentication.md, "ARC sealing").

use serde::Deserialize;

use crate::ConfigError;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawArc {
    enabled: Option<bool>,
}

/// `[arc]`, validated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ArcConfig {
    /// Seal forwarded inbound mail.
    pub enabled: bool,
}

pub(super) fn validate(raw: RawArc) -> Result<ArcConfig, ConfigError> {
    Ok(ArcConfig {
        enabled: raw.enabled.unwrap_or(false),
    })
}
