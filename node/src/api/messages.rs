//! Status and cancel: `GET`/`DELETE /api/v1/messages/{id}` and
//! `/batches/{id}`. A caller sees only its tenant's batches and their
//! messages (others: 404). Cancelling is the operator's queue delete,
//! made through each shard's leader.

use std::collections::BTreeMap;

use axum::extract::Path;
use axum::http::{HeaderMap, StatusCode};
use serde::Serialize;
use tern_model::api::{Batch, Scope};
use tern_model::peer::Operation;

use super::auth::{authenticate, Caller};
use super::extract::{json, Api};
use super::problem::Problem;
use super::status::MessageStatus;
use super::{not_found, unavailable, ApiResult, ApiState};
use crate::raft::{GroupId, QueueAction, Request};

/// Ids in one delete entry.
const DELETE_CHUNK: usize = 500;

/// Recipient states of a message still in the queue.
const PENDING: [&str; 4] = ["queued", "scheduled", "deferred", "held"];

pub async fn get_message(Api(state): Api, Path(id): Path<String>, headers: HeaderMap) -> ApiResult {
    let caller = authenticate(&state, &headers)?;
    caller.require(Scope::Send)?;
    let (_, status) = visible_message(&state, &caller, &id)?;
    Ok(json(StatusCode::OK, &status))
}

#[derive(Serialize)]
struct Cancelled<'a> {
    id: &'a str,
    cancelled: usize,
}

pub async fn cancel_message(Api(state): Api, Path(id): Path<String>, headers: HeaderMap) -> ApiResult {
    let caller = authenticate(&state, &headers)?;
    caller.require(Scope::Send)?;
    let (shard, status) = visible_message(&state, &caller, &id)?;
    let pending = status
        .rcpts
        .iter()
        .filter(|r| PENDING.contains(&r.state.as_str()))
        .count();
    if pending == 0 {
        return Err(Problem::new(
            StatusCode::CONFLICT,
            "conflict",
            "Already done",
            format!(
                "message {id} has left the queue (state {:?}): nothing to cancel",
                status.state
            ),
        )
        .into());
    }
    delete(&state, shard, vec![id.clone()]).await?;
    tracing::info!(msg_id = %id, shard, tenant = %caller.tenant(), key = %caller.key.name, "api: message cancelled");
    Ok(json(
        StatusCode::OK,
        &Cancelled {
            id: &id,
            cancelled: pending,
        },
    ))
}

#[derive(Serialize)]
struct BatchView<'a> {
    batch_id: &'a str,
    ids: Vec<&'a str>,
    created: i64,
    send_at: Option<i64>,
    tags: &'a [String],
    metadata: &'a BTreeMap<String, String>,
    campaign: Option<&'a str>,
}

pub async fn get_batch(Api(state): Api, Path(id): Path<String>, headers: HeaderMap) -> ApiResult {
    let caller = authenticate(&state, &headers)?;
    caller.require(Scope::Send)?;
    let batch = visible_batch(&state, &caller, &id)?;
    Ok(json(
        StatusCode::OK,
        &BatchView {
            batch_id: &batch.id,
            ids: batch.messages.iter().map(|(id, _)| id.as_str()).collect(),
            created: batch.created,
            send_at: batch.send_at,
            tags: &batch.tags,
            metadata: &batch.metadata,
            campaign: batch.campaign.as_deref(),
        },
    ))
}

#[derive(Serialize)]
struct BatchCancelled<'a> {
    batch_id: &'a str,
    cancelled: usize,
    already_final: usize,
}

pub async fn cancel_batch(Api(state): Api, Path(id): Path<String>, headers: HeaderMap) -> ApiResult {
    let caller = authenticate(&state, &headers)?;
    caller.require(Scope::Send)?;
    let batch = visible_batch(&state, &caller, &id)?;
    // Reading thousands of records from sled: off the async workers.
    let groups = std::sync::Arc::clone(&state.groups);
    let messages = batch.messages.clone();
    let (pending, already_final) = tokio::task::spawn_blocking(move || {
        let mut pending: BTreeMap<GroupId, Vec<String>> = BTreeMap::new();
        let mut already_final = 0;
        for (id, shard) in messages {
            match super::status::lookup(&groups, &id) {
                Some((_, status)) if status.rcpts.iter().any(|r| PENDING.contains(&r.state.as_str())) => {
                    pending.entry(shard).or_default().push(id);
                }
                Some(_) => already_final += 1,
                // Never written (a call that failed half-way) or purged.
                None => {}
            }
        }
        (pending, already_final)
    })
    .await
    .map_err(|e| super::extract::internal(&format!("reading the batch's messages: {e}")))?;
    let mut cancelled = 0;
    for (shard, ids) in pending {
        for chunk in ids.chunks(DELETE_CHUNK) {
            delete(&state, shard, chunk.to_vec()).await?;
            cancelled += chunk.len();
        }
    }
    tracing::info!(batch = %batch.id, cancelled, already_final, tenant = %caller.tenant(), key = %caller.key.name, "api: batch cancelled");
    Ok(json(
        StatusCode::OK,
        &BatchCancelled {
            batch_id: &batch.id,
            cancelled,
            already_final,
        },
    ))
}

/// The status of message `id` if the caller's tenant sent it, with its shard.
fn visible_message(state: &ApiState, caller: &Caller, id: &str) -> Result<(GroupId, MessageStatus), Problem> {
    let found = super::status::lookup(&state.groups, id).filter(|(_, status)| {
        status
            .batch
            .as_deref()
            .and_then(|b| state.control.batch(b))
            .is_some_and(|b| b.tenant == caller.tenant())
    });
    found.ok_or_else(|| not_found("message", id))
}

fn visible_batch(state: &ApiState, caller: &Caller, id: &str) -> Result<Batch, Problem> {
    state
        .control
        .batch(id)
        .filter(|b| b.tenant == caller.tenant())
        .ok_or_else(|| not_found("batch", id))
}

/// Removes `ids` from `shard` through its leader (here, or a peer).
async fn delete(state: &ApiState, shard: GroupId, ids: Vec<String>) -> Result<(), Problem> {
    let Some(group) = state.groups.get(shard) else {
        return Err(unavailable(format!("shard {shard} is not replicated on this node")));
    };
    if group.leader() == Some(state.node_id) {
        let write = group.raft.client_write(Request::QueueOp {
            action: QueueAction::Delete,
            ids,
        });
        match tokio::time::timeout(crate::queue::WRITE_TIMEOUT, write).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(unavailable(format!("cancelling on shard {shard}: {e}"))),
            Err(_) => Err(unavailable(format!("cancelling on shard {shard}: no commit in time"))),
        }
    } else {
        let op = Operation::Queue {
            action: QueueAction::Delete,
            ids,
        };
        state
            .peers
            .operate(&group, &op)
            .await
            .map(|_| ())
            .map_err(|e| unavailable(format!("cancelling on shard {shard}: {e}")))
    }
}
