//! API keys: `tern_<id>_<secret>`, where `id` (16 lowercase hex) is the
//! public lookup key and `secret` 32 random bytes in unpadded base64url (43
//! characters). The control group keeps only the SHA-256 of the whole key
//! string: keys are 256-bit random, so a fast hash cannot be brute-forced,
//! and a slow password hash (argon2) would cost every request.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::rand::{SecureRandom, SystemRandom};
use tern_model::api::{ApiKey, Scope};

use crate::cluster::control::ControlState;

const PREFIX: &str = "tern_";
const ID_LEN: usize = 16;
const SECRET_LEN: usize = 43;

/// A key just made: its secret, shown once, and what is stored.
#[derive(Debug)]
pub struct NewKey {
    /// The whole key string (`tern_<id>_<secret>`) the client sends.
    pub secret: String,
    pub record: ApiKey,
}

/// Why a bearer key was refused (every one answers 401).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("not an API key (expected tern_<id>_<secret>)")]
    Malformed,
    #[error("unknown API key")]
    Unknown,
    #[error("revoked API key")]
    Revoked,
}

/// Makes a new key from the system's secure random source.
pub fn generate(name: &str, scopes: Vec<Scope>, tenant: &str, rate: u32, now: i64) -> NewKey {
    let rng = SystemRandom::new();
    let mut id = [0u8; ID_LEN / 2];
    let mut secret = [0u8; 32];
    // The system's random source failing is not something to go on without.
    #[allow(clippy::expect_used)]
    {
        rng.fill(&mut id).expect("system random source");
        rng.fill(&mut secret).expect("system random source");
    }
    let id: String = id.iter().map(|b| format!("{b:02x}")).collect();
    let key = format!("{PREFIX}{id}_{}", URL_SAFE_NO_PAD.encode(secret));
    NewKey {
        record: ApiKey {
            id,
            name: name.to_owned(),
            hash: hash(&key),
            scopes,
            tenant: tenant.to_owned(),
            rate,
            created: now,
            revoked: None,
        },
        secret: key,
    }
}

/// SHA-256 of the whole key string, as stored.
pub fn hash(key: &str) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, key.as_bytes())
        .as_ref()
        .to_vec()
}

/// The public id of a well-formed key.
pub fn parse_id(bearer: &str) -> Result<&str, KeyError> {
    let rest = bearer.strip_prefix(PREFIX).ok_or(KeyError::Malformed)?;
    let id = rest.get(..ID_LEN).ok_or(KeyError::Malformed)?;
    let secret = rest
        .get(ID_LEN..)
        .and_then(|s| s.strip_prefix('_'))
        .ok_or(KeyError::Malformed)?;
    let id_ok = id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let secret_ok = secret.len() == SECRET_LEN
        && secret
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if id_ok && secret_ok {
        Ok(id)
    } else {
        Err(KeyError::Malformed)
    }
}

/// The stored key a bearer string is, checked against its hash in
/// constant time.
pub fn verify(state: &ControlState, bearer: &str) -> Result<ApiKey, KeyError> {
    let id = parse_id(bearer)?;
    let key = state.api_key(id).ok_or(KeyError::Unknown)?;
    let given = hash(bearer);
    if !constant_time_eq(&given, &key.hash) {
        return Err(KeyError::Unknown);
    }
    if key.revoked.is_some() {
        return Err(KeyError::Revoked);
    }
    Ok(key)
}

/// Equality whose time does not depend on where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use openraft::storage::{RaftLogStorageExt, RaftStateMachine};
    use openraft::{Entry, EntryPayload, LogId, RaftLogReader};
    use std::sync::Arc;

    use super::*;
    use crate::raft::Request;

    #[test]
    fn generated_keys_have_the_documented_shape() {
        let k = generate("ci", vec![Scope::Send], "acme", 5, 100);
        assert!(k.secret.starts_with("tern_"));
        assert_eq!(k.secret.len(), 5 + 16 + 1 + 43);
        assert_eq!(parse_id(&k.secret), Ok(k.record.id.as_str()));
        assert_eq!(k.record.hash, hash(&k.secret));
        assert!(!k.secret.contains('='));
        let other = generate("ci", vec![Scope::Send], "acme", 5, 100);
        assert_ne!(k.secret, other.secret, "random");
        assert_ne!(k.record.id, other.record.id);
    }

    #[test]
    fn malformed_bearers_are_refused_without_a_lookup() {
        let k = generate("ci", vec![Scope::Send], "", 0, 100);
        for bad in [
            "",
            "tern_",
            "Bearer x",
            &k.secret[..k.secret.len() - 1],
            &format!("{}A", k.secret),
            &k.secret.replacen("tern_", "tern-", 1),
            &k.secret.to_uppercase(),
            "tern_0123456789abcdef_é23456789012345678901234567890123456789012",
        ] {
            assert_eq!(parse_id(bad), Err(KeyError::Malformed), "{bad:?}");
        }
    }

    /// Keys written through the control group's log verify; a wrong
    /// secret with a real id, an unknown id and a revoked key do not.
    #[tokio::test]
    async fn keys_verify_until_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, mut sm) = crate::raft::testing::open(dir.path(), Arc::new(crate::app::Rules::default())).await;
        let k = generate("ci", vec![Scope::Send, Scope::TemplatesRead], "acme", 0, 100);
        let entry = |index: u64, request: Request| Entry::<crate::raft::TypeConfig> {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(request),
        };
        log.blocking_append(vec![entry(1, Request::PutApiKey { key: k.record.clone() })])
            .await
            .unwrap();
        sm.apply(log.try_get_log_entries(1..2).await.unwrap()).await.unwrap();
        let state = ControlState::new(sm.tree());

        assert_eq!(verify(&state, &k.secret), Ok(k.record.clone()));
        let mut forged = k.secret.clone();
        let last = if forged.ends_with('A') { "B" } else { "A" };
        forged.replace_range(forged.len() - 1.., last);
        assert_eq!(verify(&state, &forged), Err(KeyError::Unknown));
        let stranger = generate("x", vec![Scope::Send], "", 0, 100);
        assert_eq!(verify(&state, &stranger.secret), Err(KeyError::Unknown));

        log.blocking_append(vec![entry(
            2,
            Request::RevokeApiKey {
                id: k.record.id.clone(),
                at: 200,
            },
        )])
        .await
        .unwrap();
        sm.apply(log.try_get_log_entries(2..3).await.unwrap()).await.unwrap();
        assert_eq!(verify(&state, &k.secret), Err(KeyError::Revoked));
        assert_eq!(state.api_key(&k.record.id).unwrap().revoked, Some(200));
    }
}
