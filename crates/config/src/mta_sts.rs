//! `[mta_sts]`: MTA-STS (RFC 8461) for outbound mail: policies looked up
//! (`_mta-sts` TXT), fetched over verified HTTPS, cached and enforced
//! (docs/security.md, "MTA-STS").

use std::time::Duration;

use serde::Deserialize;

use crate::ConfigError;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMtaSts {
    enabled: Option<bool>,
    fetch_timeout: Option<String>,
    max_policy_size: Option<usize>,
    cache_size: Option<usize>,
    policy_port: Option<u16>,
}

/// `[mta_sts]`, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MtaStsConfig {
    /// Look up and apply MTA-STS policies of recipient domains.
    pub enabled: bool,
    /// Longest a policy fetch (DNS of the policy host, connect, TLS, HTTP) may take.
    pub fetch_timeout: Duration,
    /// Largest policy body read; RFC 8461 3.3 lets senders stop at 64 KiB.
    pub max_policy_size: usize,
    /// Most domains whose policy is held in memory.
    pub cache_size: usize,
    /// Port of the policy host: 443 (RFC 8461 3.3). Other values are for
    /// tests, which cannot bind port 443.
    pub policy_port: u16,
}

impl Default for MtaStsConfig {
    fn default() -> Self {
        MtaStsConfig {
            enabled: false,
            fetch_timeout: Duration::from_secs(10),
            max_policy_size: 64 * 1024,
            cache_size: 10_000,
            policy_port: 443,
        }
    }
}

pub(super) fn validate(raw: RawMtaSts) -> Result<MtaStsConfig, ConfigError> {
    let d = MtaStsConfig::default();
    let fetch_timeout = match raw.fetch_timeout {
        None => d.fetch_timeout,
        Some(s) => crate::parse_duration(&s).map_err(|e| ConfigError::Invalid {
            key: "mta_sts.fetch_timeout",
            reason: e.to_string(),
        })?,
    };
    if fetch_timeout.is_zero() || fetch_timeout > Duration::from_secs(300) {
        return Err(ConfigError::Invalid {
            key: "mta_sts.fetch_timeout",
            reason: "must be between 1s and 5m".into(),
        });
    }
    let max_policy_size = raw.max_policy_size.unwrap_or(d.max_policy_size);
    if !(1024..=1024 * 1024).contains(&max_policy_size) {
        return Err(ConfigError::Invalid {
            key: "mta_sts.max_policy_size",
            reason: "must be between 1024 and 1048576 bytes".into(),
        });
    }
    let cache_size = raw.cache_size.unwrap_or(d.cache_size);
    if cache_size == 0 {
        return Err(ConfigError::Invalid {
            key: "mta_sts.cache_size",
            reason: "must be at least 1".into(),
        });
    }
    let policy_port = raw.policy_port.unwrap_or(d.policy_port);
    if policy_port == 0 {
        return Err(ConfigError::Invalid {
            key: "mta_sts.policy_port",
            reason: "must be a port number".into(),
        });
    }
    Ok(MtaStsConfig {
        enabled: raw.enabled.unwrap_or(false),
        fetch_timeout,
        max_policy_size,
        cache_size,
        policy_port,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_bounds() {
        let d = validate(RawMtaSts::default()).unwrap();
        assert_eq!(d, MtaStsConfig::default());
        assert_eq!((d.policy_port, d.max_policy_size), (443, 65_536));
        let raw = RawMtaSts {
            enabled: Some(true),
            fetch_timeout: Some("30s".into()),
            policy_port: Some(8443),
            ..RawMtaSts::default()
        };
        let c = validate(raw).unwrap();
        assert!(c.enabled);
        assert_eq!((c.fetch_timeout, c.policy_port), (Duration::from_secs(30), 8443));
        for (raw, key) in [
            (
                RawMtaSts {
                    fetch_timeout: Some("0s".into()),
                    ..RawMtaSts::default()
                },
                "mta_sts.fetch_timeout",
            ),
            (
                RawMtaSts {
                    max_policy_size: Some(10),
                    ..RawMtaSts::default()
                },
                "mta_sts.max_policy_size",
            ),
            (
                RawMtaSts {
                    cache_size: Some(0),
                    ..RawMtaSts::default()
                },
                "mta_sts.cache_size",
            ),
            (
                RawMtaSts {
                    policy_port: Some(0),
                    ..RawMtaSts::default()
                },
                "mta_sts.policy_port",
            ),
        ] {
            let e = validate(raw).unwrap_err().to_string();
            assert!(e.contains(key), "{e}");
        }
    }
}
