//! `ternctl apikey create|list|revoke`: the sending API's keys in the
//! control group, read from this node's replica and written through the
//! control leader. Changes need the admin role and are audited; listing
//! needs the viewer role. A key's secret is returned once, by `create`,
//! and never kept (only its SHA-256).

use tern_model::api::{ApiKey, Scope};
use tern_model::peer::Operation;
use tern_proto::admin::{
    ApiKeyCreateReply, ApiKeyCreateRequest, ApiKeyInfo, ApiKeyListReply, ApiKeyRevokeReply, ApiKeyRevokeRequest,
};
use tonic::Status;

use crate::admin::suppression::wait_applied;
use crate::api::keys;
use crate::cluster::control::ControlState;
use crate::cluster::ControlWriter;

/// Longest key name and tenant.
const MAX_NAME: usize = 64;

/// A key as the admin API shows it: never its hash.
pub fn to_proto(k: &ApiKey) -> ApiKeyInfo {
    ApiKeyInfo {
        id: k.id.clone(),
        name: k.name.clone(),
        tenant: k.tenant.clone(),
        scopes: k.scopes.iter().map(|s| s.as_str().to_owned()).collect(),
        rate: k.rate,
        created: k.created,
        revoked: k.revoked.unwrap_or(0),
    }
}

/// 1-64 of `[A-Za-z0-9._-]` (names and tenants: shown in tables, logs and
/// keys of the control group's tree, where NUL separates a tenant).
fn is_word(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_NAME && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// The scopes asked for, checked and without repeats; none: every scope.
pub fn parse_scopes(given: &[String]) -> Result<Vec<Scope>, Status> {
    if given.is_empty() {
        return Ok(Scope::ALL.to_vec());
    }
    let mut scopes = given
        .iter()
        .map(|s| {
            Scope::parse(s.trim()).ok_or_else(|| {
                let known: Vec<&str> = Scope::ALL.iter().map(|s| s.as_str()).collect();
                Status::invalid_argument(format!("unknown scope {s:?} (known: {})", known.join(", ")))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    scopes.sort();
    scopes.dedup();
    Ok(scopes)
}

/// The selection an audit event names for a create.
pub fn create_selection(r: &ApiKeyCreateRequest) -> String {
    format!(
        "name={} tenant={:?} scopes={} rate={}",
        r.name,
        r.tenant,
        r.scopes.join(","),
        r.rate
    )
}

/// Makes a key and writes its record; the reply holds the key, once.
pub async fn create(
    control: &ControlState,
    writer: &ControlWriter,
    req: ApiKeyCreateRequest,
    now: i64,
) -> Result<ApiKeyCreateReply, Status> {
    if !is_word(&req.name) {
        return Err(Status::invalid_argument(format!(
            "name {:?}: 1-{MAX_NAME} characters of A-Z a-z 0-9 . _ -",
            req.name
        )));
    }
    if !req.tenant.is_empty() && !is_word(&req.tenant) {
        return Err(Status::invalid_argument(format!(
            "tenant {:?}: 1-{MAX_NAME} characters of A-Z a-z 0-9 . _ - (or none: the default tenant)",
            req.tenant
        )));
    }
    let scopes = parse_scopes(&req.scopes)?;
    // Names are unique among live keys: the messages a key sends carry its
    // name (auth user `apikey:<name>`), so two would be told apart by no one.
    if let Some(taken) = control.live_api_key_named(&req.name) {
        return Err(Status::already_exists(format!(
            "an API key named {} exists (id {}); revoke it first or choose another name",
            req.name, taken.id
        )));
    }
    let new = keys::generate(&req.name, scopes, &req.tenant, req.rate, now);
    let id = new.record.id.clone();
    writer
        .write(Operation::ApiKey {
            key: new.record.clone(),
        })
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    wait_applied(|| control.api_key(&id).is_some()).await;
    Ok(ApiKeyCreateReply {
        key: new.secret,
        info: Some(to_proto(&new.record)),
    })
}

/// Every key, live and revoked.
pub fn list(control: &ControlState) -> ApiKeyListReply {
    ApiKeyListReply {
        keys: control.api_keys().iter().map(to_proto).collect(),
    }
}

/// Revokes the live key named `req.key`, or the key with that id.
pub async fn revoke(
    control: &ControlState,
    writer: &ControlWriter,
    req: ApiKeyRevokeRequest,
    now: i64,
) -> Result<ApiKeyRevokeReply, Status> {
    let wanted = req.key.trim();
    let key = control
        .live_api_key_named(wanted)
        .or_else(|| control.api_key(wanted))
        .ok_or_else(|| Status::not_found(format!("no API key named or with id {wanted:?}")))?;
    if let Some(at) = key.revoked {
        return Err(Status::failed_precondition(format!(
            "API key {} ({}) was already revoked at {at}",
            key.id, key.name
        )));
    }
    writer
        .write(Operation::RevokeApiKey {
            id: key.id.clone(),
            at: now,
        })
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    wait_applied(|| control.api_key(&key.id).is_some_and(|k| k.revoked.is_some())).await;
    let info = control
        .api_key(&key.id)
        .map_or_else(|| to_proto(&key), |k| to_proto(&k));
    Ok(ApiKeyRevokeReply { info: Some(info) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_default_to_all_and_unknown_ones_are_refused() {
        assert_eq!(parse_scopes(&[]).unwrap_or_default(), Scope::ALL.to_vec());
        let two = parse_scopes(&["templates:read".into(), "send".into(), "send".into()]);
        assert_eq!(two.unwrap_or_default(), [Scope::Send, Scope::TemplatesRead]);
        let err = parse_scopes(&["admin".into()]).err().map(|s| s.message().to_owned());
        assert!(err.unwrap_or_default().contains("unknown scope \"admin\""));
    }

    #[test]
    fn names_are_short_words() {
        assert!(is_word("ci-prod.v2_1"));
        for bad in ["", "a b", "naïve", "x\0y", &"n".repeat(65)] {
            assert!(!is_word(bad), "{bad:?}");
        }
    }
}
