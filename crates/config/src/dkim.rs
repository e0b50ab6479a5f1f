//! `[[dkim]]` entries: one signing key each (domain, selector, key file,
//! what to sign and how). Parsed and checked here; the key files are read
//! when the node starts (the node's `auth::dkim::Signer::new`), not when the
//! config is parsed.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::{parse_duration, ConfigError};

/// Headers signed by default (each instance present is signed).
pub const DEFAULT_HEADERS: &[&str] = &[
    "From",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "Reply-To",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
];

/// Headers over-signed by default: listed once more than present, so a
/// copy added later (a second From or Subject) breaks the signature.
pub const DEFAULT_OVERSIGN: &[&str] = &["From", "To", "Subject", "Date"];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDkim {
    domain: String,
    selector: String,
    algorithm: String,
    private_key: PathBuf,
    headers: Option<Vec<String>>,
    oversign_headers: Option<Vec<String>>,
    canonicalization: Option<String>,
    expire: Option<String>,
}

/// RSA modulus sizes ring can sign with. RFC 8301 asks for at least 1024
/// bits and recommends 2048; ring refuses anything under 2048.
pub const RSA_MIN_BITS: usize = 2048;
pub const RSA_MAX_BITS: usize = 4096;

/// DKIM signing algorithm (`a=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DkimAlgorithm {
    RsaSha256,
    Ed25519Sha256,
}

impl DkimAlgorithm {
    /// The name used in config and in `a=`.
    pub fn name(self) -> &'static str {
        match self {
            DkimAlgorithm::RsaSha256 => "rsa-sha256",
            DkimAlgorithm::Ed25519Sha256 => "ed25519-sha256",
        }
    }
}

/// A canonicalization algorithm (RFC 6376 §3.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Canonicalization {
    Simple,
    Relaxed,
}

/// One validated `[[dkim]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DkimKeyConfig {
    /// `d=`: lowercase; signs mail whose From domain is this or a subdomain of it.
    pub domain: String,
    /// `s=`: the key is published at `<selector>._domainkey.<domain>`.
    pub selector: String,
    pub algorithm: DkimAlgorithm,
    /// PEM file: PKCS#8 (RSA or Ed25519) or PKCS#1 (RSA).
    pub private_key: PathBuf,
    /// Header names signed (every instance present), From first.
    pub headers: Vec<String>,
    /// Header names signed once more than present.
    pub oversign_headers: Vec<String>,
    /// Header / body canonicalization (`c=`).
    pub canonicalization: (Canonicalization, Canonicalization),
    /// `x=` is this long after `t=`; none by default.
    pub expire: Option<Duration>,
}

impl DkimKeyConfig {
    /// The `h=` list handed to the signer: every name once, then the
    /// over-signed names again (the signer signs all instances of a name on
    /// its first listing and an empty instance for each further listing).
    pub fn signed_header_list(&self) -> Vec<String> {
        let mut list = self.headers.clone();
        for name in &self.oversign_headers {
            if !list.iter().any(|h| h.eq_ignore_ascii_case(name)) {
                list.push(name.clone());
            }
        }
        list.extend(self.oversign_headers.iter().cloned());
        list
    }
}

fn invalid(key: &'static str, reason: String) -> ConfigError {
    ConfigError::Invalid { key, reason }
}

/// A DNS name made of letters, digits, `-` and `_` labels.
fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Header field names (RFC 5322 ftext), without duplicates.
fn header_names(key: &'static str, names: Vec<String>) -> Result<Vec<String>, ConfigError> {
    let mut out: Vec<String> = Vec::with_capacity(names.len());
    for name in names {
        let name = name.trim().to_owned();
        if name.is_empty() || !name.bytes().all(|b| (33..=126).contains(&b) && b != b':') {
            return Err(invalid(key, format!("{name:?} is not a header field name")));
        }
        if out.iter().any(|h| h.eq_ignore_ascii_case(&name)) {
            return Err(invalid(key, format!("{name} is listed twice")));
        }
        // Delivery removes it before sending: a signature over it would break.
        if name.eq_ignore_ascii_case(crate::egress::POOL_HEADER) {
            return Err(invalid(
                key,
                format!("{name} is removed before sending and cannot be signed"),
            ));
        }
        out.push(name);
    }
    Ok(out)
}

fn canonicalization(s: &str) -> Result<(Canonicalization, Canonicalization), ConfigError> {
    let one = |c: &str| match c.trim() {
        "simple" => Ok(Canonicalization::Simple),
        "relaxed" => Ok(Canonicalization::Relaxed),
        other => Err(invalid(
            "dkim.canonicalization",
            format!("{other:?} is not simple or relaxed (write header/body, e.g. \"relaxed/relaxed\")"),
        )),
    };
    // RFC 6376 §3.5: a lone algorithm is the header's; the body's is then simple.
    match s.split_once('/') {
        Some((h, b)) => Ok((one(h)?, one(b)?)),
        None => Ok((one(s)?, Canonicalization::Simple)),
    }
}

pub(crate) fn validate(raw: Vec<RawDkim>) -> Result<Vec<DkimKeyConfig>, ConfigError> {
    let mut out: Vec<DkimKeyConfig> = Vec::with_capacity(raw.len());
    for r in raw {
        let domain = r.domain.trim().trim_end_matches('.').to_ascii_lowercase();
        if !is_dns_name(&domain) {
            return Err(invalid("dkim.domain", format!("{:?} is not a domain name", r.domain)));
        }
        let selector = r.selector.trim().to_owned();
        if !is_dns_name(&selector) {
            return Err(invalid("dkim.selector", format!("{selector:?} is not a DNS label")));
        }
        if out
            .iter()
            .any(|k| k.domain == domain && k.selector.eq_ignore_ascii_case(&selector))
        {
            return Err(invalid(
                "dkim.selector",
                format!("two entries for {selector}._domainkey.{domain}"),
            ));
        }
        let algorithm = match r.algorithm.trim() {
            "rsa-sha256" => DkimAlgorithm::RsaSha256,
            "ed25519-sha256" => DkimAlgorithm::Ed25519Sha256,
            other => {
                return Err(invalid(
                    "dkim.algorithm",
                    format!("{other:?} is not rsa-sha256 or ed25519-sha256"),
                ))
            }
        };
        if r.private_key.as_os_str().is_empty() {
            return Err(invalid(
                "dkim.private_key",
                format!("empty path for {selector}._domainkey.{domain}"),
            ));
        }
        let headers = header_names(
            "dkim.headers",
            r.headers
                .unwrap_or_else(|| DEFAULT_HEADERS.iter().map(|h| h.to_string()).collect()),
        )?;
        // RFC 6376 §5.4: the From field MUST be signed.
        if !headers.iter().any(|h| h.eq_ignore_ascii_case("From")) {
            return Err(invalid("dkim.headers", "must include From (RFC 6376 §5.4)".into()));
        }
        let oversign_headers = header_names(
            "dkim.oversign_headers",
            r.oversign_headers
                .unwrap_or_else(|| DEFAULT_OVERSIGN.iter().map(|h| h.to_string()).collect()),
        )?;
        let expire = r
            .expire
            .as_deref()
            .map(parse_duration)
            .transpose()
            .map_err(|e| invalid("dkim.expire", e.to_string()))?;
        if expire.is_some_and(|d| d.is_zero()) {
            return Err(invalid("dkim.expire", "must be at least 1s".into()));
        }
        out.push(DkimKeyConfig {
            domain,
            selector,
            algorithm,
            private_key: r.private_key,
            headers,
            oversign_headers,
            canonicalization: canonicalization(r.canonicalization.as_deref().unwrap_or("relaxed/relaxed"))?,
            expire,
        });
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::Config;

    const MIN: &str = "[[dkim]]\ndomain = \"Example.TEST.\"\nselector = \"s1\"\nalgorithm = \"ed25519-sha256\"\nprivate_key = \"/k/ed.pem\"\n";

    fn err(toml: &str) -> String {
        Config::from_toml(toml).unwrap_err().to_string()
    }

    #[test]
    fn defaults() {
        let c = Config::from_toml(MIN).unwrap();
        assert_eq!(c.dkim.len(), 1);
        let k = &c.dkim[0];
        assert_eq!(k.domain, "example.test");
        assert_eq!(k.selector, "s1");
        assert_eq!(k.algorithm, DkimAlgorithm::Ed25519Sha256);
        assert_eq!(k.private_key, PathBuf::from("/k/ed.pem"));
        assert_eq!(k.headers, DEFAULT_HEADERS);
        assert_eq!(k.oversign_headers, DEFAULT_OVERSIGN);
        assert_eq!(
            k.canonicalization,
            (Canonicalization::Relaxed, Canonicalization::Relaxed)
        );
        assert_eq!(k.expire, None);
        // Every default header once, then the over-signed ones again.
        let list = k.signed_header_list();
        assert_eq!(list.len(), DEFAULT_HEADERS.len() + DEFAULT_OVERSIGN.len());
        assert_eq!(list.iter().filter(|h| *h == "From").count(), 2);
        assert_eq!(list.iter().filter(|h| *h == "Cc").count(), 1);
        assert!(Config::from_toml("").unwrap().dkim.is_empty());
    }

    #[test]
    fn every_key_and_several_entries() {
        let c = Config::from_toml(&format!(
            "{MIN}\n[[dkim]]\ndomain = \"example.test\"\nselector = \"rsa1\"\nalgorithm = \"rsa-sha256\"\n\
             private_key = \"/k/rsa.pem\"\nheaders = [\"From\", \"Subject\"]\noversign_headers = [\"Sender\"]\n\
             canonicalization = \"simple/relaxed\"\nexpire = \"30d\"\n"
        ))
        .unwrap();
        assert_eq!(c.dkim.len(), 2);
        let k = &c.dkim[1];
        assert_eq!(k.algorithm, DkimAlgorithm::RsaSha256);
        assert_eq!(
            k.canonicalization,
            (Canonicalization::Simple, Canonicalization::Relaxed)
        );
        assert_eq!(k.expire, Some(Duration::from_secs(30 * 86400)));
        assert_eq!(k.signed_header_list(), ["From", "Subject", "Sender", "Sender"]);
        // A lone algorithm is the header's; the body's is simple (RFC 6376 §3.5).
        let c = Config::from_toml(&format!("{MIN}canonicalization = \"relaxed\"\n")).unwrap();
        assert_eq!(
            c.dkim[0].canonicalization,
            (Canonicalization::Relaxed, Canonicalization::Simple)
        );
        let c = Config::from_toml(&format!("{MIN}oversign_headers = []\n")).unwrap();
        assert_eq!(c.dkim[0].signed_header_list(), DEFAULT_HEADERS);
    }

    #[test]
    fn invalid_values_are_named() {
        for (extra, key) in [
            ("algorithm = \"rsa-sha1\"\n", "dkim.algorithm"),
            ("canonicalization = \"relaxed/loose\"\n", "dkim.canonicalization"),
            ("headers = [\"Subject\"]\n", "dkim.headers"),
            ("headers = [\"From\", \"from\"]\n", "dkim.headers"),
            ("headers = [\"From\", \"Bad Name\"]\n", "dkim.headers"),
            ("oversign_headers = [\"X:Y\"]\n", "dkim.oversign_headers"),
            ("expire = \"0s\"\n", "dkim.expire"),
            ("expire = \"soon\"\n", "dkim.expire"),
        ] {
            // Later keys of the same table override nothing: replace the line.
            let toml = MIN.replace("algorithm = \"ed25519-sha256\"\n", "") + extra;
            let toml = if extra.starts_with("algorithm") {
                toml
            } else {
                format!("{toml}algorithm = \"ed25519-sha256\"\n")
            };
            let e = err(&toml);
            assert!(e.contains(key), "{extra}: {e}");
        }
        assert!(err(&MIN.replace("Example.TEST.", "exa mple.test")).contains("dkim.domain"));
        assert!(err(&MIN.replace("\"s1\"", "\"\"")).contains("dkim.selector"));
        assert!(err(&format!("{MIN}\n{MIN}")).contains("two entries for s1._domainkey.example.test"));
        assert!(err(&format!("{MIN}selektor = \"x\"\n")).contains("selektor"));
        assert!(
            err("[[dkim]]\ndomain = \"example.test\"\nselector = \"s\"\nalgorithm = \"ed25519-sha256\"\n")
                .contains("private_key")
        );
    }
}
