//! Admin API for the merge jobs recorded in the node's store (`stoa db merge`, docs/merge.md),
//! under the admin token like the rest of `/api`:
//!
//! - `GET /api/db/jobs`: every job, newest first: id, state, times, sources, options, counts,
//!   validation report, verification, error.
//! - `GET /api/db/jobs/{id}`: one job (404 if there is none).

use super::{AdminState, store_down};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

/// The job routes, merged into the protected admin router.
pub(super) fn routes() -> Router<AdminState> {
    Router::new().route("/api/db/jobs", get(list)).route("/api/db/jobs/{id}", get(show))
}

async fn list(State(state): State<AdminState>) -> Response {
    match state.store.merge_jobs().await {
        Ok(jobs) => Json(json!({"jobs": jobs.iter().map(crate::merge::job_json).collect::<Vec<_>>()})).into_response(),
        Err(e) => store_down(e),
    }
}

async fn show(State(state): State<AdminState>, Path(id): Path<String>) -> Response {
    match state.store.merge_job(&id).await {
        Ok(Some(job)) => Json(crate::merge::job_json(&job)).into_response(),
        Ok(None) => (StatusCode::NOT_FOUND, Json(json!({"error": "not_found", "message": format!("no merge job {id}")}))).into_response(),
        Err(e) => store_down(e),
    }
}
