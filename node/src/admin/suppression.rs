//! `ternctl suppression add|remove|list|import|export`: the suppression
//! list in the control group, read from this node's replica and written
//! through the control leader. Changes need the operator role and are
//! audited; reading needs the viewer role.

use tern_model::shaping::{Suppression, SuppressionKey as ModelKey, MAX_SUPPRESSIONS_PER_WRITE};
use tern_proto::admin::{SuppressionEntry, SuppressionKey, SuppressionListReply, SuppressionListRequest};
use tonic::Status;

use crate::bounce::suppress::{normalise, normalise_address};
use crate::cluster::control::ControlState;

/// Entries per list page unless asked otherwise, and at most.
const DEFAULT_PAGE: usize = 1000;
/// Longest reason kept (keeps an import request under the gRPC size limit).
pub const MAX_REASON: usize = 500;
/// How long a change made through a follower waits to be applied here.
const APPLY_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// A list entry as the admin API shows it.
pub fn to_proto(s: Suppression) -> SuppressionEntry {
    SuppressionEntry {
        address: s.address,
        scope: s.scope,
        class: s.class,
        reason: s.reason,
        added: s.added,
        expires: s.expires,
    }
}

/// Checks and normalises entries to add; `now` fills an absent `added`.
pub fn validate_entries(entries: Vec<SuppressionEntry>, now: i64) -> Result<Vec<Suppression>, Status> {
    if entries.is_empty() {
        return Err(Status::invalid_argument("no entries"));
    }
    if entries.len() > MAX_SUPPRESSIONS_PER_WRITE {
        return Err(Status::invalid_argument(format!(
            "{} entries in one request (at most {MAX_SUPPRESSIONS_PER_WRITE})",
            entries.len()
        )));
    }
    entries
        .into_iter()
        .map(|e| {
            let entry = normalise(Suppression {
                scope: e.scope,
                address: e.address,
                class: if e.class.trim().is_empty() {
                    "manual".to_owned()
                } else {
                    e.class.trim().to_owned()
                },
                reason: e.reason,
                added: if e.added == 0 { now } else { e.added },
                expires: e.expires,
            });
            check_address(&entry.address)?;
            check_scope(&entry.scope)?;
            if entry.class.len() > 64
                || !entry
                    .class
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err(Status::invalid_argument(format!(
                    "{}: class {:?} is not a word like invalid_recipient or manual",
                    entry.address, entry.class
                )));
            }
            if entry.reason.chars().count() > MAX_REASON || entry.reason.chars().any(char::is_control) {
                return Err(Status::invalid_argument(format!(
                    "{}: reason must be one line of at most {MAX_REASON} characters",
                    entry.address
                )));
            }
            if entry.added < 0 || entry.expires < 0 {
                return Err(Status::invalid_argument(format!("{}: negative time", entry.address)));
            }
            Ok(entry)
        })
        .collect()
}

/// A recipient address: `local@domain`, no spaces, at most 320 octets.
pub fn check_address(address: &str) -> Result<(), Status> {
    let ok = address.len() <= 320
        && !address
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '<' | '>' | ','))
        && address
            .rsplit_once('@')
            .is_some_and(|(l, d)| !l.is_empty() && !d.is_empty());
    if ok {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "{address:?} is not a recipient address"
        )))
    }
}

/// A scope: empty (global) or a domain name.
pub fn check_scope(scope: &str) -> Result<(), Status> {
    let ok = scope.is_empty()
        || (scope.len() <= 253
            && scope
                .chars()
                .all(|c| c.is_alphanumeric() || matches!(c, '.' | '-' | '_')));
    if ok {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!("{scope:?} is not a sender domain")))
    }
}

/// Normalised keys to remove.
pub fn validate_keys(keys: Vec<SuppressionKey>) -> Result<Vec<ModelKey>, Status> {
    if keys.is_empty() {
        return Err(Status::invalid_argument("no entries"));
    }
    if keys.len() > MAX_SUPPRESSIONS_PER_WRITE {
        return Err(Status::invalid_argument(format!(
            "{} entries in one request (at most {MAX_SUPPRESSIONS_PER_WRITE})",
            keys.len()
        )));
    }
    keys.into_iter()
        .map(|k| {
            let key = ModelKey {
                scope: k.scope.trim().to_ascii_lowercase(),
                address: normalise_address(&k.address),
            };
            check_address(&key.address)?;
            check_scope(&key.scope)?;
            Ok(key)
        })
        .collect()
}

/// One page of the list (see `SuppressionListRequest`).
pub fn list(control: &ControlState, req: &SuppressionListRequest, now: i64) -> SuppressionListReply {
    let limit = match req.limit as usize {
        0 => DEFAULT_PAGE,
        n => n.min(MAX_SUPPRESSIONS_PER_WRITE),
    };
    let scope = req.scope.as_ref().map(|s| s.trim().to_ascii_lowercase());
    let after = match (&req.after, &scope) {
        (Some(k), _) => Some(ModelKey {
            scope: k.scope.clone(),
            address: k.address.clone(),
        }),
        // The first entry of a scope comes after its empty address
        // (addresses are never empty).
        (None, Some(s)) => Some(ModelKey {
            scope: s.clone(),
            address: String::new(),
        }),
        (None, None) => None,
    };
    // Expired entries are skipped unless asked for; at most 4 pages are read.
    let budget = limit.saturating_mul(4);
    let mut entries = Vec::new();
    let mut last: Option<ModelKey> = None;
    let mut exhausted = true;
    for (scanned, entry) in control.suppressions(after.as_ref(), budget + 1).into_iter().enumerate() {
        if scope.as_deref().is_some_and(|s| s != entry.scope) {
            break;
        }
        if scanned == budget || entries.len() == limit {
            exhausted = false;
            break;
        }
        last = Some(ModelKey {
            scope: entry.scope.clone(),
            address: entry.address.clone(),
        });
        if req.include_expired || entry.in_force(now) {
            entries.push(to_proto(entry));
        }
    }
    SuppressionListReply {
        entries,
        next: if exhausted {
            None
        } else {
            last.map(|k| SuppressionKey {
                scope: k.scope,
                address: k.address,
            })
        },
    }
}

/// Waits (bounded) until this node's replica shows what a write through
/// the control leader changed: `done` says whether it does.
pub async fn wait_applied(done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + APPLY_WAIT;
    while !done() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
