//! HTTP listener: `/healthz` (process alive), `/readyz` (can accept mail:
//! the disk is not full, the control group has a leader and a queue shard
//! this node writes to has a leader, here or on a node it forwards to) and
//! `/metrics` (Prometheus: OpenMetrics text when asked for, else the
//! classic text format; docs/metrics.md), the sending API under
//! `/api/v1/` when `[api] enabled` (crate::api), and the web console under
//! `/console` (crate::console).

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::metrics::Metrics;
use crate::raft::groups::Groups;
use crate::raft::{NodeId, CONTROL_GROUP};
use crate::storage::space::DiskSpace;

#[derive(Clone)]
struct HttpState {
    node_id: NodeId,
    groups: Arc<Groups>,
    metrics: Arc<Metrics>,
    data_dir: Arc<PathBuf>,
    space: Arc<DiskSpace>,
}

pub fn router(
    node_id: NodeId,
    groups: Arc<Groups>,
    metrics: Arc<Metrics>,
    data_dir: PathBuf,
    space: Arc<DiskSpace>,
    api: Option<crate::api::ApiHandle>,
    console: Arc<crate::console::Console>,
) -> Router {
    let router = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_handler))
        .with_state(HttpState {
            node_id,
            groups,
            metrics,
            data_dir: Arc::new(data_dir),
            space,
        });
    let router = router.merge(crate::console::router(console));
    match api {
        Some(handle) => router.merge(crate::api::router(handle)),
        None => router,
    }
}

async fn readyz(State(state): State<HttpState>) -> (StatusCode, std::borrow::Cow<'static, str>) {
    if state.space.is_full() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{}\n", state.space.reason()).into(),
        );
    }
    let control = state.groups.get(CONTROL_GROUP).and_then(|g| g.leader()).is_some();
    match (control, can_queue(&state.groups)) {
        (true, true) => (StatusCode::OK, "ready\n".into()),
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "no control-group leader\n".into()),
        (true, false) => (StatusCode::SERVICE_UNAVAILABLE, "no writable queue shard\n".into()),
    }
}

/// Mail accepted here can be written: a shard hosted here has a leader
/// (this node, or one it forwards to), or, hosting none (more nodes than
/// replicas), shards are placed on other members that it forwards to.
fn can_queue(groups: &Groups) -> bool {
    let hosted = groups.shards();
    if hosted.is_empty() {
        return !crate::cluster::records::placement(groups).is_empty();
    }
    hosted.iter().any(|g| g.leader().is_some())
}

/// OpenMetrics when the scraper asks for it (Prometheus does), else the
/// classic text format.
async fn metrics_handler(State(state): State<HttpState>, headers: HeaderMap) -> Response {
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    // Scrape-time values read sled and walk data_dir: off the async workers.
    let text = tokio::task::spawn_blocking(move || {
        state
            .metrics
            .encode(state.node_id, &state.groups, state.data_dir.as_path())
    })
    .await;
    match text {
        Ok(text) if openmetrics => ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response(),
        Ok(text) => (
            [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE_TEXT)],
            crate::metrics::prometheus_text(&text),
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("metrics: {e}\n")).into_response(),
    }
}
