//! `[dane]`: DANE for SMTP (RFC 7672): DNSSEC-validated TLSA records of MX
//! hosts (docs/security.md, "DANE").

use std::path::PathBuf;

use serde::Deserialize;

use crate::ConfigError;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDane {
    enabled: Option<bool>,
    trust_anchor: Option<PathBuf>,
}

/// `[dane]`, validated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DaneConfig {
    /// DANE for destinations without a `[[tls_policy]]`: their level is
    /// `dane` instead of `may` (Postfix's `smtp_tls_security_level = dane`).
    /// `[[tls_policy]]` levels `dane`/`dane-only` work either way.
    pub enabled: bool,
    /// DNSKEY records (zone-file lines) the validating resolver trusts;
    /// `None`: the IANA root keys built into hickory.
    pub trust_anchor: Option<PathBuf>,
}

pub(super) fn validate(raw: RawDane) -> Result<DaneConfig, ConfigError> {
    if let Some(p) = &raw.trust_anchor {
        if p.as_os_str().is_empty() {
            return Err(ConfigError::Invalid {
                key: "dane.trust_anchor",
                reason: "empty path; leave the key out for the built-in root anchors".into(),
            });
        }
    }
    Ok(DaneConfig {
        enabled: raw.enabled.unwrap_or(false),
        trust_anchor: raw.trust_anchor,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use crate::{Config, ConfigError};

    #[test]
    fn defaults_keys_and_errors() {
        let c = Config::from_toml("").unwrap();
        assert!(!c.dane.enabled);
        assert!(c.dane.trust_anchor.is_none());
        let c = Config::from_toml("[dane]\nenabled = true\ntrust_anchor = \"/etc/tern/anchor.keys\"\n").unwrap();
        assert!(c.dane.enabled);
        assert_eq!(
            c.dane.trust_anchor.as_deref(),
            Some(std::path::Path::new("/etc/tern/anchor.keys"))
        );
        match Config::from_toml("[dane]\ntrust_anchor = \"\"\n") {
            Err(ConfigError::Invalid { key, .. }) => assert_eq!(key, "dane.trust_anchor"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            Config::from_toml("[dane]\nanchor = \"x\"\n"),
            Err(ConfigError::Parse(_))
        ));
    }
}
