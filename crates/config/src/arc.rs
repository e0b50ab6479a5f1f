//! `[arc]`: ARC sealing (RFC 8617) of inbound mail that Tern forwards
//! (docs/authentication.md, "ARC sealing").

use std::path::PathBuf;

use serde::Deserialize;

use crate::ConfigError;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawArc {
    enabled: Option<bool>,
    domain: Option<String>,
    selector: Option<String>,
    key_file: Option<PathBuf>,
    algorithm: Option<String>,
    seal: Option<String>,
    authserv_id: Option<String>,
}

/// Which checked messages get an ARC set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ArcSealScope {
    /// Messages with at least one recipient outside `policy.local_domains`
    /// (mail this cluster forwards or relays onward).
    #[default]
    Relayed,
    /// Every message the inbound checks accepted.
    All,
}

/// `[arc]`, validated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ArcConfig {
    /// Seal forwarded inbound mail.
    pub enabled: bool,
    /// `d=` of the seal (lowercase).
    pub domain: String,
    /// `s=`: the public key is at `<selector>._domainkey.<domain>`.
    pub selector: String,
    /// PEM private key; `None`: the `[[dkim]]` entry with the same domain
    /// and selector supplies it.
    pub key_file: Option<PathBuf>,
    pub seal: ArcSealScope,
    /// authserv-id of the ARC-Authentication-Results; `None`: `node.hostname`.
    pub authserv_id: Option<String>,
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

pub(super) fn validate(raw: RawArc) -> Result<ArcConfig, ConfigError> {
    let enabled = raw.enabled.unwrap_or(false);
    let domain = raw
        .domain
        .unwrap_or_default()
        .trim()
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let selector = raw.selector.unwrap_or_default().trim().to_owned();
    let name_ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 253
            && s.split('.').all(|l| {
                (1..=63).contains(&l.len()) && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            })
    };
    if enabled && !name_ok(&domain) {
        return Err(invalid(
            "arc.domain",
            format!("{domain:?} is not a domain name (required when enabled)"),
        ));
    }
    if enabled && !name_ok(&selector) {
        return Err(invalid(
            "arc.selector",
            format!("{selector:?} is not a DNS label (required when enabled)"),
        ));
    }
    // RFC 8617 5.1.1: rsa-sha256 is the only algorithm ARC defines.
    match raw.algorithm.as_deref().map(str::trim) {
        None | Some("rsa-sha256") => {}
        Some(other) => {
            return Err(invalid(
                "arc.algorithm",
                format!("{other:?}: ARC defines only rsa-sha256"),
            ))
        }
    }
    let seal = match raw.seal.as_deref().map(str::trim) {
        None | Some("relayed") => ArcSealScope::Relayed,
        Some("all") => ArcSealScope::All,
        Some(other) => return Err(invalid("arc.seal", format!("{other:?} is not \"relayed\" or \"all\""))),
    };
    let authserv_id = raw.authserv_id.map(|s| s.trim().to_owned());
    if authserv_id
        .as_deref()
        .is_some_and(|s| s.is_empty() || s.contains([';', ' ', '\r', '\n']))
    {
        return Err(invalid("arc.authserv_id", "must be a non-empty token (a host name)"));
    }
    Ok(ArcConfig {
        enabled,
        domain,
        selector,
        key_file: raw.key_file.filter(|p| !p.as_os_str().is_empty()),
        seal,
        authserv_id,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn raw(toml: &str) -> RawArc {
        toml::from_str(toml).unwrap()
    }

    #[test]
    fn defaults_and_errors() {
        assert_eq!(validate(raw("")).unwrap(), ArcConfig::default());
        let c = validate(raw(
            "enabled = true\ndomain = \"Example.COM.\"\nselector = \"arc1\"\nseal = \"all\"",
        ))
        .unwrap();
        assert_eq!(
            (c.domain.as_str(), c.seal, c.key_file),
            ("example.com", ArcSealScope::All, None)
        );
        assert!(validate(raw("enabled = true\nselector = \"arc1\"")).is_err());
        assert!(validate(raw("enabled = true\ndomain = \"x.test\"")).is_err());
        assert!(validate(raw("algorithm = \"ed25519-sha256\"")).is_err());
        assert!(validate(raw("seal = \"some\"")).is_err());
    }
}
