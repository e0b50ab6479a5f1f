//! The console's JSON endpoints: each is one or a few AdminService calls
//! made as the caller ([`Call`]), answered as JSON or a problem.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::Response;
use serde::Deserialize;
use serde_json::{json, Value};
use tern_proto::admin::admin_service_server::AdminService;
use tern_proto::admin::*;

use super::access::{check_csrf, from_status, Call};
use super::Console;
use crate::api::extract::json;
use crate::api::problem::Problem;
use crate::api::{ApiError, ApiResult};
use crate::pki::Role;

/// Largest action body.
const MAX_BODY: usize = 16 * 1024;
/// Minutes the charts cover by default, and at most.
const DEFAULT_MINUTES: u32 = 30;
const MAX_MINUTES: u32 = 60;
/// How long the stats gathering may take before the charts give up.
const STATS_DEADLINE: Duration = Duration::from_secs(10);

/// Queue operations: messages per listing page, pages at most (10 million
/// messages), ids per write, and tries of a write while a shard elects.
const SELECTION_PAGE: u32 = 10_000;
const MAX_SELECTION_PAGES: usize = 1_000;
const OP_BATCH: usize = 2_000;
const OP_RETRIES: u32 = 10;

type Shared = State<Arc<Console>>;

fn ok(value: &Value) -> ApiResult {
    let mut response = json(StatusCode::OK, value);
    super::secure_headers(response.headers_mut());
    Ok(response)
}

/// Who the caller is and whether the page should offer actions.
pub async fn whoami(State(console): Shared, call: Call) -> ApiResult {
    if call.bearer.is_none() {
        return ok(&json!({
            "name": "anonymous (loopback, read-only)",
            "role": "viewer",
            "how": "none",
            "can_act": false,
            "node": console.admin.node_id,
        }));
    }
    let caller = console
        .admin
        .authz
        .judge(&call.request(()), Role::Viewer)
        .await
        .map_err(|r| from_status(r.status))?;
    ok(&json!({
        "name": caller.name,
        "role": caller.role.as_str(),
        "how": caller.how.as_str(),
        "can_act": caller.role >= Role::Operator,
        "node": console.admin.node_id,
    }))
}

/// Members with their health, shards with leaders and replicas.
pub async fn overview(State(console): Shared, call: Call) -> ApiResult {
    let admin = call.service(&console);
    let (status, members) = tokio::join!(
        admin.status(call.request(StatusRequest { local_only: false })),
        admin.member_list(call.request(MemberListRequest {})),
    );
    let status = status.map_err(from_status)?.into_inner();
    let members = members.map_err(from_status)?.into_inner();
    let members: Vec<Value> = members
        .members
        .iter()
        .map(|m| {
            json!({
                "id": m.id,
                "addr": m.addr,
                "role": m.role,
                "control_leader": m.is_control_leader,
                "reachable": m.reachable,
                "lag": m.lag,
                "shards_led": m.shards_led,
                "replicas": m.replicas,
                "health": if !m.reachable { "unreachable" } else if m.lag > 100 { "lagging" } else { "ok" },
            })
        })
        .collect();
    let shards: Vec<Value> = status
        .shards
        .iter()
        .map(|s| {
            json!({
                "shard": s.shard,
                "leader": s.leader,
                "replicas": s.replicas,
                "voters": s.voters,
                "queued": s.queued_messages,
                "term": s.term,
                "applied": s.applied_index,
                "joint": s.joint,
            })
        })
        .collect();
    ok(&json!({
        "node": status.node_id,
        "hostname": status.hostname,
        "version": status.version,
        "control_leader": status.control_leader,
        "queued_messages": status.queued_messages,
        "unreachable": status.unreachable,
        "members": members,
        "shards": shards,
    }))
}

/// The queue by destination domain.
pub async fn queue(State(console): Shared, call: Call) -> ApiResult {
    let admin = call.service(&console);
    let q = admin
        .queue_summary(call.request(QueueSummaryRequest {
            local_only: false,
            shards: Vec::new(),
        }))
        .await
        .map_err(from_status)?
        .into_inner();
    let domains: Vec<Value> = q
        .domains
        .iter()
        .map(|d| {
            json!({
                "domain": d.domain,
                "messages": d.messages,
                "recipients": d.recipients,
                "held": d.held,
                "oldest_age_secs": d.oldest_age_secs,
                "last_error": d.last_error,
            })
        })
        .collect();
    ok(&json!({
        "messages": q.messages,
        "recipients": q.recipients,
        "bytes": q.bytes,
        "oldest_age_secs": q.oldest_age_secs,
        "unreachable": q.unreachable,
        "missing_shards": q.missing_shards,
        "domains": domains,
    }))
}

/// Outcomes per minute and the top deferral reasons (`?minutes=N`).
pub async fn stats(State(console): Shared, call: Call, uri: Uri) -> ApiResult {
    let minutes = minutes_param(uri.query())?;
    let admin = call.service(&console);
    let asks = (1..=minutes).map(|k| {
        admin.stats(call.request(StatsRequest {
            since_secs: 60 * u64::from(k),
            local_only: false,
        }))
    });
    let answers = tokio::time::timeout(STATS_DEADLINE, futures::future::join_all(asks))
        .await
        .map_err(|_| ApiError::from(crate::api::unavailable("the cluster's stats did not come in time")))?;
    let mut windows = Vec::with_capacity(answers.len());
    let mut unreachable = Vec::new();
    for answer in answers {
        let reply = answer.map_err(from_status)?.into_inner();
        let mut window = crate::queue::stats::Window::default();
        for node in reply.nodes {
            let part = crate::queue::stats::Window::decode(&node.window)
                .map_err(|e| Problem::new(StatusCode::BAD_GATEWAY, "internal", "Bad answer", e.to_string()))?;
            window.merge(part);
        }
        unreachable.extend(reply.unreachable);
        windows.push(window);
    }
    unreachable.sort_unstable();
    unreachable.dedup();
    let series = super::series::series(&windows);
    ok(&json!({
        "minutes": minutes,
        "points": series.points,
        "reasons": series.reasons,
        "unreachable": unreachable,
    }))
}

fn minutes_param(query: Option<&str>) -> Result<u32, ApiError> {
    let Some(value) = query
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("minutes="))
    else {
        return Ok(DEFAULT_MINUTES);
    };
    match value.parse::<u32>() {
        Ok(m) if (1..=MAX_MINUTES).contains(&m) => Ok(m),
        _ => Err(Problem::invalid(
            "minutes",
            format!("minutes must be a whole number from 1 to {MAX_MINUTES}, not {value:?}"),
        )
        .into()),
    }
}

/// Suspended domains.
pub async fn domains(State(console): Shared, call: Call) -> ApiResult {
    let reply = call
        .service(&console)
        .domain_list(call.request(DomainListRequest {}))
        .await
        .map_err(from_status)?
        .into_inner();
    ok(&suspensions(&reply))
}

fn suspensions(reply: &DomainReply) -> Value {
    let list: Vec<Value> = reply
        .suspended
        .iter()
        .map(|s| {
            json!({
                "domain": s.domain,
                // Suspended "until resumed" is stored as a far future.
                "until": if s.until >= i64::MAX / 4 { Value::Null } else { s.until.into() },
                "reason": s.reason,
            })
        })
        .collect();
    json!({ "suspended": list })
}

/// The recent `admin` and `shaping` events of this node.
pub async fn events(State(console): Shared, call: Call) -> ApiResult {
    // Readers with a token are checked like the other reads.
    if call.bearer.is_some() {
        console
            .admin
            .authz
            .check(&call.request(()), Role::Viewer)
            .await
            .map_err(from_status)?;
    }
    ok(&json!({
        "node": console.admin.node_id,
        "events": console.events.recent(),
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SuspendBody {
    domain: String,
    #[serde(default)]
    duration_secs: u64,
    #[serde(default)]
    reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DomainBody {
    domain: String,
}

/// Reads an action's JSON body after the CSRF checks.
async fn action_body<T: serde::de::DeserializeOwned>(headers: &HeaderMap, body: Body) -> Result<T, ApiError> {
    check_csrf(headers)?;
    let bytes = axum::body::to_bytes(body, MAX_BODY).await.map_err(|_| {
        Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-large",
            "Request too large",
            format!("a console action's body is at most {MAX_BODY} bytes"),
        )
    })?;
    serde_json::from_slice(&bytes).map_err(|e| Problem::invalid("", format!("the body is not valid: {e}")).into())
}

/// Suspends delivery to a domain (operator).
pub async fn suspend(State(console): Shared, call: Call, headers: HeaderMap, body: Body) -> ApiResult {
    let body: SuspendBody = action_body(&headers, body).await?;
    // The selection as the AdminService's audit writes it.
    let selection = format!(
        "domain={} duration={}s reason={:?}",
        body.domain, body.duration_secs, body.reason
    );
    call.require_token("domain suspend", &selection)?;
    let reply = console
        .admin
        .domain_suspend(call.request(DomainSuspendRequest {
            domain: body.domain,
            duration_secs: body.duration_secs,
            reason: body.reason,
        }))
        .await
        .map_err(from_status)?
        .into_inner();
    ok(&suspensions(&reply))
}

/// Resumes delivery to a domain (operator).
pub async fn resume(State(console): Shared, call: Call, headers: HeaderMap, body: Body) -> ApiResult {
    let body: DomainBody = action_body(&headers, body).await?;
    call.require_token("domain resume", &format!("domain={}", body.domain))?;
    let reply = console
        .admin
        .domain_resume(call.request(DomainResumeRequest { domain: body.domain }))
        .await
        .map_err(from_status)?
        .into_inner();
    ok(&suspensions(&reply))
}

/// Holds, releases or retries the queued mail to a domain (operator).
pub async fn queue_op(
    State(console): Shared,
    call: Call,
    Path(op): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let action = match op.as_str() {
        "hold" => "queue hold",
        "release" => "queue release",
        "retry" => "queue retry",
        _ => {
            return Err(Problem::new(
                StatusCode::NOT_FOUND,
                "not-found",
                "Not found",
                format!("no queue operation {op:?} in the console (hold, release, retry)"),
            )
            .into())
        }
    };
    let body: DomainBody = action_body(&headers, body).await?;
    if body.domain.trim().is_empty() {
        return Err(Problem::invalid("/domain", "give the destination domain").into());
    }
    call.require_token(action, &format!("domain={}", body.domain))?;
    // Cluster-wide, as `ternctl queue hold --domain D` is: every page of the
    // selection (each shard read on its leader), then each shard's messages
    // in batches through its leader (each batch audited too). The role is
    // checked first: a selection that matches nothing is refused alike.
    let admin = &console.admin;
    let audit = admin
        .authz
        .check_change(
            &call.request(()),
            Role::Operator,
            action,
            format!("domain={} (console, cluster-wide)", body.domain),
        )
        .await
        .map_err(from_status)?;
    let result = async {
        let mut by_shard: std::collections::BTreeMap<u64, Vec<String>> = std::collections::BTreeMap::new();
        let (mut unreachable, mut missing) = (Vec::new(), Vec::new());
        let mut after = String::new();
        for _ in 0..MAX_SELECTION_PAGES {
            let page = admin
                .queue_list(call.request(QueueListRequest {
                    domain: body.domain.clone(),
                    limit: SELECTION_PAGE,
                    after,
                    ids_only: true,
                    ..Default::default()
                }))
                .await?
                .into_inner();
            unreachable.extend(page.unreachable);
            missing.extend(page.missing_shards);
            for m in page.messages {
                by_shard.entry(m.shard).or_default().push(m.id);
            }
            if !page.truncated || page.next.is_empty() {
                break;
            }
            after = page.next;
        }
        unreachable.sort_unstable();
        unreachable.dedup();
        missing.sort_unstable();
        missing.dedup();
        let matched: usize = by_shard.values().map(Vec::len).sum();
        let mut affected = 0u64;
        for (shard, ids) in by_shard {
            for batch in ids.chunks(OP_BATCH) {
                let request = QueueOpRequest {
                    op: op.clone(),
                    ids: batch.to_vec(),
                    shard,
                    ..Default::default()
                };
                // A shard changing leader answers UNAVAILABLE for a moment.
                let mut tries = 0;
                let reply = loop {
                    match admin.queue_op(call.request(request.clone())).await {
                        Ok(r) => break r.into_inner(),
                        Err(e) if e.code() == tonic::Code::Unavailable && tries < OP_RETRIES => {
                            tries += 1;
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                        Err(e) => return Err(e),
                    }
                };
                affected += reply.affected;
            }
        }
        Ok((matched, affected, unreachable, missing))
    }
    .await;
    let (matched, affected, unreachable, missing) = audit.finish(result, |r| r.1).map_err(from_status)?;
    ok(&json!({
        "matched": matched,
        "affected": affected,
        "unreachable": unreachable,
        "missing_shards": missing,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minutes_are_bounded() {
        assert_eq!(minutes_param(None).ok(), Some(DEFAULT_MINUTES));
        assert_eq!(minutes_param(Some("x=1&minutes=5")).ok(), Some(5));
        for bad in ["minutes=0", "minutes=61", "minutes=abc", "minutes=-1"] {
            assert!(minutes_param(Some(bad)).is_err(), "{bad}");
        }
    }
}
