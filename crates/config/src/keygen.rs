//! New DKIM key pairs (`ternctl dkim generate`): the private key as PKCS#8
//! PEM, and the TXT record that publishes the public key.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair as _};
use rsa::pkcs8::der::Encode as _;
use rsa::pkcs8::{EncodePrivateKey as _, EncodePublicKey as _, LineEnding, PrivateKeyInfo};

use crate::dkim::{DkimAlgorithm, RSA_MAX_BITS, RSA_MIN_BITS};

/// Longest character-string in a TXT record (RFC 1035 §3.3).
pub const TXT_STRING_MAX: usize = 255;

/// A freshly generated key pair.
pub struct GeneratedKey {
    pub algorithm: DkimAlgorithm,
    /// PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`), LF line ends.
    pub private_pem: String,
    /// `p=`: base64 of the raw Ed25519 public key (RFC 8463), or of the RSA
    /// SubjectPublicKeyInfo DER (RFC 6376 §3.6.1).
    pub public_b64: String,
}

impl GeneratedKey {
    /// The TXT record value, e.g. `v=DKIM1; k=ed25519; p=...`.
    pub fn txt_value(&self) -> String {
        let k = match self.algorithm {
            DkimAlgorithm::RsaSha256 => "rsa",
            DkimAlgorithm::Ed25519Sha256 => "ed25519",
        };
        format!("v=DKIM1; k={k}; p={}", self.public_b64)
    }
}

/// Why no key was made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeygenError {
    #[error("Ed25519 key generation: {0}")]
    Ed25519(String),
    #[error("RSA keys must have {RSA_MIN_BITS} to {RSA_MAX_BITS} bits (2048 recommended), not {0}")]
    RsaBits(usize),
    #[error("RSA key generation: {0}")]
    Rsa(#[from] rsa::Error),
    #[error("RSA key encoding: {0}")]
    RsaEncoding(String),
}

/// Generates an Ed25519 key (`rsa_bits` ignored) or an RSA key of `rsa_bits`.
pub fn generate(algorithm: DkimAlgorithm, rsa_bits: usize) -> Result<GeneratedKey, KeygenError> {
    match algorithm {
        DkimAlgorithm::Ed25519Sha256 => {
            let fail = KeygenError::Ed25519;
            let v2 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|e| fail(e.to_string()))?;
            // ring writes PKCS#8 v2, whose public-key field OpenSSL cannot
            // read; the v1 form (RFC 8410, what OpenSSL writes) is portable.
            let info = PrivateKeyInfo::try_from(v2.as_ref()).map_err(|e| fail(e.to_string()))?;
            let der = PrivateKeyInfo::new(info.algorithm, info.private_key)
                .to_der()
                .map_err(|e| fail(e.to_string()))?;
            let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der).map_err(|e| fail(e.to_string()))?;
            Ok(GeneratedKey {
                algorithm,
                private_pem: pem("PRIVATE KEY", &der),
                public_b64: BASE64.encode(pair.public_key().as_ref()),
            })
        }
        DkimAlgorithm::RsaSha256 => {
            if !(RSA_MIN_BITS..=RSA_MAX_BITS).contains(&rsa_bits) {
                return Err(KeygenError::RsaBits(rsa_bits));
            }
            let key = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, rsa_bits)?;
            let private_pem = key
                .to_pkcs8_pem(LineEnding::LF)
                .map_err(|e| KeygenError::RsaEncoding(e.to_string()))?;
            let spki = rsa::RsaPublicKey::from(&key)
                .to_public_key_der()
                .map_err(|e| KeygenError::RsaEncoding(e.to_string()))?;
            Ok(GeneratedKey {
                algorithm,
                private_pem: private_pem.to_string(),
                public_b64: BASE64.encode(spki.as_bytes()),
            })
        }
    }
}

/// `value` cut into TXT character-strings of at most 255 octets, as a zone
/// file or dnsmasq's `txt-record=` takes them (a resolver joins them again).
pub fn txt_strings(value: &str) -> Vec<&str> {
    // The value is ASCII, so any byte offset is a char boundary.
    value
        .as_bytes()
        .chunks(TXT_STRING_MAX)
        .map(|c| std::str::from_utf8(c).unwrap_or_default())
        .collect()
}

/// `value` as zone-file TXT data: quoted strings separated by spaces.
pub fn zone_txt(value: &str) -> String {
    txt_strings(value)
        .iter()
        .map(|s| format!("\"{s}\""))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Writes the private key with mode 0600; an existing file is left alone
/// (error `AlreadyExists`).
pub fn write_private_key(path: &Path, pem: &str) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(pem.as_bytes())?;
    file.sync_all()
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = BASE64.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}
