//! HTTP listener: `/healthz` (process alive) and `/readyz` (can accept mail:
//! the control group has a leader and this node leads a queue shard).

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;

use crate::raft::groups::Groups;
use crate::raft::{NodeId, CONTROL_GROUP};

#[derive(Clone)]
struct HttpState {
    node_id: NodeId,
    groups: Arc<Groups>,
}

pub fn router(node_id: NodeId, groups: Arc<Groups>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(HttpState { node_id, groups })
}

async fn readyz(State(state): State<HttpState>) -> (StatusCode, &'static str) {
    let control = state.groups.get(CONTROL_GROUP).and_then(|g| g.leader()).is_some();
    let leads_shard = state.groups.shards().iter().any(|g| g.leader() == Some(state.node_id));
    match (control, leads_shard) {
        (true, true) => (StatusCode::OK, "ready\n"),
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "no control-group leader\n"),
        (true, false) => (StatusCode::SERVICE_UNAVAILABLE, "no writable queue shard\n"),
    }
}
