//! `POST /api/v1/messages` and `/messages/raw`: compose, sign, write the
//! batch record to the control group, then the messages to their shards;
//! 200 only once every message is committed.
//!
//! Idempotency: the batch record holds the ids and shards chosen for the
//! call, and is written before the messages. A retry with the same key
//! and body writes the same ids again (shards ignore ids they hold or have
//! finished), so a call that failed half-way completes, and one that
//! succeeded queues nothing twice.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request};
use axum::http::{HeaderMap, StatusCode};
use futures::StreamExt as _;
use serde::Serialize;
use tern_model::api::{Batch, Scope};
use tern_model::peer::Operation;

use super::auth::{authenticate, Caller};
use super::compose::{self, ComposeCtx, Composed, RawRequest, SendRequest, TemplateRef};
use super::extract::{decode, internal, json, read_json_body, Api};
use super::problem::Problem;
use super::{unavailable, ApiResult, ApiState};
use crate::envelope::{BodyType, Envelope, Notify, Recipient};
use crate::raft::{Body, GroupId, NewMessage};
use crate::smtp::Enqueuer as _;

/// Longest `Idempotency-Key` accepted.
const MAX_IDEMPOTENCY_KEY: usize = 255;
/// Messages signed at once (each signature runs on a blocking thread).
const SIGNING_IN_FLIGHT: usize = 8;
/// How long a call waits for its batch record to show in this node's
/// replica of the control group.
const RECORD_VISIBLE_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

/// The 200 answer of a send.
#[derive(Debug, Serialize)]
struct Sent<'a> {
    batch_id: &'a str,
    ids: Vec<&'a str>,
    idempotent_replay: bool,
    send_at: Option<i64>,
}

/// What a call carries besides its messages, kept in the batch record.
struct CallMeta {
    idempotency_key: Option<String>,
    request_hash: Vec<u8>,
    tags: Vec<String>,
    metadata: std::collections::BTreeMap<String, String>,
    campaign: Option<String>,
    client_ip: String,
}

pub async fn send(Api(state): Api, request: Request) -> ApiResult {
    let (parts, body) = request.into_parts();
    let caller = authenticate(&state, &parts.headers)?;
    caller.require(Scope::Send)?;
    let (bytes, in_flight) = read_json_body(&state, &parts.headers, body).await?;
    let req: SendRequest = decode(&bytes)?;
    let idempotency_key = idempotency_key(&parts.headers, req.idempotency_key.as_deref())?;
    let stored = match &req.template {
        Some(TemplateRef::Name(name)) => Some(
            state
                .control
                .template(caller.tenant(), name)
                .ok_or_else(|| Problem::invalid("/template", format!("no stored template named {name:?}")))?,
        ),
        _ => None,
    };
    let ctx = compose_ctx(&state);
    // Rendering thousands of recipients is CPU work: off the async workers.
    let (composed, req) = tokio::task::spawn_blocking(move || {
        let composed = compose::compose(&req, stored.as_ref(), &ctx);
        (composed, req)
    })
    .await
    .map_err(|e| internal(&format!("composing: {e}")))?;
    let composed = composed?;
    let meta = CallMeta {
        idempotency_key,
        request_hash: sha256(&bytes),
        tags: req.tags,
        metadata: req.metadata,
        campaign: req.campaign,
        client_ip: client_ip(&parts.extensions),
    };
    drop(bytes);
    queue_call(&state, &caller, meta, composed, in_flight).await
}

pub async fn send_raw(Api(state): Api, request: Request) -> ApiResult {
    let (parts, body) = request.into_parts();
    let caller = authenticate(&state, &parts.headers)?;
    caller.require(Scope::Send)?;
    let (bytes, in_flight) = read_json_body(&state, &parts.headers, body).await?;
    let req: RawRequest = decode(&bytes)?;
    let idempotency_key = idempotency_key(&parts.headers, req.idempotency_key.as_deref())?;
    let composed = compose::compose_raw(&req, &compose_ctx(&state))?;
    let meta = CallMeta {
        idempotency_key,
        request_hash: sha256(&bytes),
        tags: req.tags,
        metadata: req.metadata,
        campaign: req.campaign,
        client_ip: client_ip(&parts.extensions),
    };
    drop(bytes);
    queue_call(&state, &caller, meta, vec![composed], in_flight).await
}

fn compose_ctx(state: &ApiState) -> ComposeCtx {
    ComposeCtx {
        hostname: state.hostname.clone(),
        now: super::now(),
        max_recipients: state.config.max_recipients,
        max_message_size: state.max_message_size,
        max_schedule_ahead: state.config.max_schedule_ahead,
    }
}

/// The `Idempotency-Key` header or the body's `idempotency_key` (both
/// given and different: 400).
fn idempotency_key(headers: &HeaderMap, in_body: Option<&str>) -> Result<Option<String>, Problem> {
    let header = match headers.get("idempotency-key") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .map_err(|_| Problem::invalid("", "the Idempotency-Key header is not visible ASCII"))?
                .to_owned(),
        ),
    };
    let key = match (header, in_body) {
        (Some(h), Some(b)) if h != b => {
            return Err(Problem::invalid(
                "/idempotency_key",
                "the Idempotency-Key header and the body's idempotency_key differ",
            ))
        }
        (Some(h), _) => h,
        (None, Some(b)) => b.to_owned(),
        (None, None) => return Ok(None),
    };
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY || key.chars().any(|c| c.is_control()) {
        return Err(Problem::invalid(
            "/idempotency_key",
            format!("an idempotency key is 1 to {MAX_IDEMPOTENCY_KEY} characters without control characters"),
        ));
    }
    Ok(Some(key))
}

/// Writes the call's batch record, then its messages; or, for a known
/// idempotency key, writes the recorded ids again.
async fn queue_call(
    state: &ApiState,
    caller: &Caller,
    meta: CallMeta,
    composed: Vec<Composed>,
    mut in_flight: super::limits::InFlight,
) -> ApiResult {
    let total: u64 = composed.iter().map(|c| c.body.len() as u64).sum();
    in_flight.hold_instead(&state.limits, total)?;
    if let Some(key) = &meta.idempotency_key {
        if let Some(batch) = state.control.batch_by_idempotency(caller.tenant(), key) {
            return replay(state, caller, &meta, batch, composed).await;
        }
    }
    state
        .limits
        .take_rate(&caller.key.id, caller.key.rate, composed.len())?;
    let shards = state
        .front
        .choose_shards(composed.len())
        .map_err(|e| unavailable(format!("the queue cannot take mail: {e}")))?;
    let send_at = composed.iter().map(|c| c.not_before).filter(|&t| t > 0).min();
    let batch = Batch {
        id: new_batch_id(),
        tenant: caller.tenant().to_owned(),
        key_id: caller.key.id.clone(),
        idempotency_key: meta.idempotency_key.clone(),
        request_hash: meta.request_hash.clone(),
        messages: shards.into_iter().map(|shard| (state.front.next_id(), shard)).collect(),
        tags: meta.tags.clone(),
        metadata: meta.metadata.clone(),
        campaign: meta.campaign.clone(),
        created: super::now(),
        send_at,
    };
    state
        .writer
        .write(Operation::Batch {
            batch: Box::new(batch.clone()),
        })
        .await
        .map_err(|e| unavailable(format!("writing the batch record: {e}")))?;
    if let Some(key) = &meta.idempotency_key {
        // A concurrent first call with the same key may have won: the
        // control group kept its record, and this call answers with it.
        let held = held_batch(state, caller.tenant(), key).await?;
        if held.id != batch.id {
            return replay(state, caller, &meta, held, composed).await;
        }
    }
    write_messages(state, caller, &meta, &batch, composed).await?;
    state.metrics.api.messages(batch.messages.len() as u64);
    Ok(answer(&batch, false))
}

/// An idempotent retry: same body, the recorded ids written again (a no-op
/// for those already queued or finished); another body, 422.
async fn replay(
    state: &ApiState,
    caller: &Caller,
    meta: &CallMeta,
    batch: Batch,
    composed: Vec<Composed>,
) -> ApiResult {
    if batch.request_hash != meta.request_hash || batch.messages.len() != composed.len() {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency-mismatch",
            "Idempotency key reused",
            format!(
                "idempotency key {:?} was used for another request (batch {})",
                meta.idempotency_key.as_deref().unwrap_or_default(),
                batch.id
            ),
        )
        .into());
    }
    write_messages(state, caller, meta, &batch, composed).await?;
    Ok(answer(&batch, true))
}

/// The batch record holding `key` in this node's replica, waited for.
async fn held_batch(state: &ApiState, tenant: &str, key: &str) -> Result<Batch, Problem> {
    let end = tokio::time::Instant::now() + RECORD_VISIBLE_WITHIN;
    loop {
        if let Some(batch) = state.control.batch_by_idempotency(tenant, key) {
            return Ok(batch);
        }
        if tokio::time::Instant::now() >= end {
            return Err(unavailable("the batch record is not visible on this node yet"));
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Signs each message (DKIM, as submitted mail) and writes it under the
/// batch's id and shard.
async fn write_messages(
    state: &ApiState,
    caller: &Caller,
    meta: &CallMeta,
    batch: &Batch,
    composed: Vec<Composed>,
) -> Result<(), Problem> {
    let auth_user = caller.auth_user();
    let received_at = super::now();
    let envelopes: Vec<(Envelope, Composed)> = composed
        .into_iter()
        .map(|c| (envelope(&c, &batch.id, &auth_user, &meta.client_ip), c))
        .collect();
    let pipeline = &state.pipeline;
    let signed: Vec<(Envelope, Vec<u8>, i64)> = futures::stream::iter(envelopes)
        .map(|(envelope, c)| async move {
            let body = match pipeline.dkim.load_full() {
                Some(signer) => signer.sign(&envelope, c.body).await,
                None => c.body,
            };
            (envelope, body, c.not_before)
        })
        .buffered(SIGNING_IN_FLIGHT)
        .collect()
        .await;
    let mut logs = Vec::with_capacity(signed.len());
    let mut messages = Vec::with_capacity(signed.len());
    for ((id, shard), (envelope, body, not_before)) in batch.messages.iter().zip(signed) {
        logs.push((
            id.as_str(),
            *shard,
            envelope.reverse_path.clone(),
            envelope.recipients.len(),
        ));
        let mut record =
            crate::queue::message::MessageRecord::new(id.clone(), envelope, body.len() as u64, received_at);
        record.next_attempt = not_before.max(0);
        messages.push((
            *shard,
            NewMessage {
                record: Box::new(record),
                body: Body { bytes: body, loc: None },
            },
        ));
    }
    state.front.write_batch(messages).await.map_err(|e| {
        tracing::warn!(batch = %batch.id, error = %e, "api batch write failed");
        unavailable(format!(
            "the messages were not all queued ({e}); retry with the same Idempotency-Key"
        ))
    })?;
    for (id, shard, from, rcpts) in logs {
        log_queued(id, shard, &batch.id, &from, rcpts, &batch.tenant, &caller.key.name);
    }
    Ok(())
}

fn log_queued(id: &str, shard: GroupId, batch: &str, from: &str, rcpts: usize, tenant: &str, key: &str) {
    tracing::info!(
        target: "tern::event",
        event = "queued",
        msg_id = %id,
        batch = %batch,
        from = %from,
        rcpts,
        tenant = %tenant,
        key = %key,
        shard,
        "queued by the API"
    );
}

/// The envelope of an API message (docs/api.md: envid = batch id,
/// auth_user = `apikey:<name>`, helo = `api`).
fn envelope(c: &Composed, batch: &str, auth_user: &str, client_ip: &str) -> Envelope {
    let eight_bit = c.body.iter().any(|&b| b >= 0x80);
    Envelope {
        reverse_path: c.reverse_path.clone(),
        recipients: c
            .recipients
            .iter()
            .map(|address| Recipient {
                address: address.clone(),
                notify: Notify::default(),
                orcpt: None,
            })
            .collect(),
        body_type: if eight_bit {
            BodyType::EightBitMime
        } else {
            BodyType::SevenBit
        },
        smtputf8: !c.reverse_path.is_ascii() || c.recipients.iter().any(|a| !a.is_ascii()),
        ret: None,
        envid: Some(batch.to_owned()),
        declared_size: None,
        helo: "api".into(),
        client_ip: client_ip.to_owned(),
        auth_user: Some(auth_user.to_owned()),
    }
}

fn answer(batch: &Batch, replay: bool) -> axum::response::Response {
    json(
        StatusCode::OK,
        &Sent {
            batch_id: &batch.id,
            ids: batch.messages.iter().map(|(id, _)| id.as_str()).collect(),
            idempotent_replay: replay,
            send_at: batch.send_at,
        },
    )
}

fn client_ip(extensions: &axum::http::Extensions) -> String {
    extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_canonical().to_string())
        .unwrap_or_default()
}

fn sha256(bytes: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, bytes).as_ref().to_vec()
}

/// `b_` and 26 lowercase base32 characters (128 random bits).
fn new_batch_id() -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let bits: u128 = rand::random();
    let mut id = String::with_capacity(28);
    id.push_str("b_");
    for i in (0..26).rev() {
        id.push(char::from(ALPHABET[((bits >> (i * 5)) & 31) as usize]));
    }
    id
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn batch_ids_are_b_and_26_base32_characters() {
        let a = new_batch_id();
        assert_eq!(a.len(), 28);
        assert!(a.starts_with("b_"));
        assert!(a[2..]
            .bytes()
            .all(|c| c.is_ascii_lowercase() || (b'2'..=b'7').contains(&c)));
        assert_ne!(a, new_batch_id());
    }

    #[test]
    fn the_idempotency_key_comes_from_the_header_or_the_body() {
        let mut headers = HeaderMap::new();
        assert_eq!(idempotency_key(&headers, None).unwrap(), None);
        assert_eq!(idempotency_key(&headers, Some("k1")).unwrap().as_deref(), Some("k1"));
        headers.insert("idempotency-key", "k1".parse().unwrap());
        assert_eq!(idempotency_key(&headers, None).unwrap().as_deref(), Some("k1"));
        assert_eq!(idempotency_key(&headers, Some("k1")).unwrap().as_deref(), Some("k1"));
        let both = idempotency_key(&headers, Some("k2")).unwrap_err();
        assert_eq!((both.status, both.field.as_deref()), (400, Some("/idempotency_key")));
        assert_eq!(idempotency_key(&HeaderMap::new(), Some("")).unwrap_err().status, 400);
    }

    #[test]
    fn api_envelopes_carry_the_batch_and_the_key() {
        let c = Composed {
            reverse_path: "a@example.org".into(),
            recipients: vec!["b@example.net".into(), "c@example.net".into()],
            body: b"Subject: x\r\n\r\nhi\r\n".to_vec(),
            not_before: 0,
        };
        let e = envelope(&c, "b_x", "apikey:app", "192.0.2.1");
        assert_eq!(e.envid.as_deref(), Some("b_x"));
        assert_eq!(e.auth_user.as_deref(), Some("apikey:app"));
        assert_eq!(e.helo, "api");
        assert_eq!(e.recipients.len(), 2);
        assert_eq!(e.body_type, BodyType::SevenBit);
        assert!(!e.smtputf8);
    }
}
