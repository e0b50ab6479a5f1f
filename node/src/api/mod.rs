//! The sending API (`/api/v1/` on the HTTP listener; docs/api.md).
//!
//! Layout: `compose.rs` (request → messages: templates, MIME, schedule; no
//! I/O), `template.rs` (minijinja, bounded), `mime.rs` (checks and
//! mail-builder), `openapi.rs` (the OpenAPI document), `problem.rs`
//! (RFC 9457 errors), `routes.rs` (the router, body limits, metrics),
//! `auth.rs` (bearer keys, scopes, tenants), `limits.rs` (per-key rate,
//! node back-pressure), `send.rs` (POST messages), `messages.rs` (status
//! and cancel of messages and batches), `templates.rs` (stored templates).

pub mod auth;
pub mod compose;
pub mod extract;
pub mod keys;
pub mod limits;
pub mod messages;
pub mod mime;
pub mod openapi;
pub mod problem;
pub mod purge;
pub mod routes;
pub mod send;
pub mod status;
pub mod template;
pub mod templates;

use std::sync::{Arc, OnceLock};

use axum::response::{IntoResponse, Response};

use crate::cluster::control::ControlState;
use crate::cluster::{ControlWriter, Peers};
use crate::metrics::Metrics;
use crate::queue::QueueFront;
use crate::raft::groups::Groups;
use crate::raft::NodeId;
use problem::Problem;

pub use routes::router;

/// Everything the API's handlers use, made once the queue is up.
pub struct ApiState {
    pub config: tern_config::ApiConfig,
    pub node_id: NodeId,
    /// For Message-IDs.
    pub hostname: String,
    /// `[smtp] max_message_size`: API messages obey the same limit.
    pub max_message_size: u64,
    pub groups: Arc<Groups>,
    /// This node's replica of the control group (keys, templates, batches).
    pub control: ControlState,
    /// Writes batch records and templates through the control leader.
    pub writer: ControlWriter,
    /// Queue operations (cancel) on shards led elsewhere.
    pub peers: Arc<Peers>,
    pub front: Arc<QueueFront>,
    /// DKIM signing, as for submitted mail.
    pub pipeline: Arc<crate::auth::Pipeline>,
    pub metrics: Arc<Metrics>,
    pub limits: limits::Limits,
}

/// The API's state, set once the node can queue mail: the HTTP listener
/// serves `/healthz` before that, and the API answers 503 until then.
pub type ApiHandle = Arc<OnceLock<Arc<ApiState>>>;

/// A handler's failure: a problem, or a response already made (401 with
/// its `WWW-Authenticate`).
#[derive(Debug)]
pub struct ApiError(Box<Response>);

impl ApiError {
    pub fn response(response: Response) -> ApiError {
        ApiError(Box::new(response))
    }
}

impl From<Problem> for ApiError {
    fn from(p: Problem) -> ApiError {
        ApiError::response(p.into_response())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        *self.0
    }
}

pub type ApiResult = Result<Response, ApiError>;

/// 404 for anything the caller may not see (never 403: no leak of what
/// other tenants hold).
pub fn not_found(what: &str, id: &str) -> Problem {
    Problem::new(
        axum::http::StatusCode::NOT_FOUND,
        "not-found",
        "Not found",
        format!("no {what} {id:?}"),
    )
}

/// 503 with Retry-After: the client retries (with the same Idempotency-Key).
pub fn unavailable(detail: impl Into<String>) -> Problem {
    Problem::new(
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "Service unavailable",
        detail,
    )
    .with_retry_after(UNAVAILABLE_RETRY_AFTER)
}

/// Seconds a client waits after a 503 (a leader election takes about one).
pub const UNAVAILABLE_RETRY_AFTER: u64 = 2;

/// Unix seconds now.
pub fn now() -> i64 {
    chrono::Utc::now().timestamp()
}
