//! `[dnsbl]` and `[greylist]`: DNS block lists asked about connecting
//! clients, and greylisting of new (client, sender, recipient) triplets,
//! with state shared in the cluster (docs/filters.md).

use serde::Deserialize;

use crate::ConfigError;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDnsbl {
    enabled: Option<bool>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGreylist {
    enabled: Option<bool>,
}

/// `[dnsbl]`, validated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DnsblConfig {
    pub enabled: bool,
}

/// `[greylist]`, validated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GreylistConfig {
    pub enabled: bool,
}

pub(super) fn validate_dnsbl(raw: RawDnsbl) -> Result<DnsblConfig, ConfigError> {
    Ok(DnsblConfig {
        enabled: raw.enabled.unwrap_or(false),
    })
}

pub(super) fn validate_greylist(raw: RawGreylist) -> Result<GreylistConfig, ConfigError> {
    Ok(GreylistConfig {
        enabled: raw.enabled.unwrap_or(false),
    })
}
