//! Admin API for plugins (under the admin token like the rest of `/api`):
//!
//! - `GET /api/plugins`: every loaded plugin with its counters.
//! - `GET /api/plugins/{name}`: one plugin.
//! - `POST /api/plugins/{name}/load`: load `<dir>/<name>.wasm` (or replace the loaded one).
//! - `POST /api/plugins/{name}/reload`: the same, but only for a loaded plugin; re-enables a
//!   disabled one. Rooms switch at their next event; connections are untouched.
//! - `POST /api/plugins/{name}/unload`: forget it; rooms skip its hooks from then on.
//!
//! Errors are `{"error": CODE, "message": TEXT}` with 400 (bad name, invalid component),
//! 404 (no such file or plugin) or 503 (no plugin host).

use super::AdminState;
use crate::plugin::{PluginError, PluginHost};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

/// The plugin routes, merged into the protected admin router.
pub(super) fn routes() -> Router<AdminState> {
    Router::new()
        .route("/api/plugins", get(list))
        .route("/api/plugins/{name}", get(show))
        .route("/api/plugins/{name}/load", post(load))
        .route("/api/plugins/{name}/reload", post(reload))
        .route("/api/plugins/{name}/unload", post(unload))
}

fn error(status: StatusCode, code: &str, message: String) -> Response {
    (status, Json(json!({"error": code, "message": message}))).into_response()
}

fn host(state: &AdminState) -> Result<&PluginHost, Box<Response>> {
    state.plugins().ok_or_else(|| Box::new(error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "this node runs no plugin host".into())))
}

fn plugin_error(e: PluginError) -> Response {
    let status = match &e {
        PluginError::BadName(_) | PluginError::Invalid { .. } | PluginError::Unsupported { .. } => StatusCode::BAD_REQUEST,
        PluginError::Read { .. } | PluginError::NotLoaded(_) => StatusCode::NOT_FOUND,
        PluginError::Engine(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let code = if status == StatusCode::NOT_FOUND { "not_found" } else { "bad_request" };
    error(status, code, e.to_string())
}

async fn list(State(state): State<AdminState>) -> Response {
    match host(&state) {
        Ok(h) => Json(json!({"dir": h.dir().display().to_string(), "plugins": h.list()})).into_response(),
        Err(r) => *r,
    }
}

async fn show(State(state): State<AdminState>, Path(name): Path<String>) -> Response {
    match host(&state) {
        Ok(h) => match h.get(&name) {
            Some(s) => Json(s).into_response(),
            None => plugin_error(PluginError::NotLoaded(name)),
        },
        Err(r) => *r,
    }
}

async fn load_as(state: AdminState, name: String, must_exist: bool) -> Response {
    let h = match host(&state) {
        Ok(h) => h.clone(),
        Err(r) => return *r,
    };
    if must_exist && !h.is_loaded(&name) {
        return plugin_error(PluginError::NotLoaded(name));
    }
    // Compiling takes a while: keep it off the I/O threads' async path.
    let loaded = tokio::task::spawn_blocking(move || h.load(&name)).await;
    match loaded {
        Ok(Ok(summary)) => {
            tracing::info!(plugin = %summary.name, generation = summary.generation, digest = %summary.digest, "plugin loaded via admin API");
            Json(summary).into_response()
        }
        Ok(Err(e)) => plugin_error(e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("load task failed: {e}")),
    }
}

async fn load(State(state): State<AdminState>, Path(name): Path<String>) -> Response {
    load_as(state, name, false).await
}

async fn reload(State(state): State<AdminState>, Path(name): Path<String>) -> Response {
    load_as(state, name, true).await
}

async fn unload(State(state): State<AdminState>, Path(name): Path<String>) -> Response {
    match host(&state) {
        Ok(h) => match h.unload(&name) {
            Ok(()) => {
                tracing::info!(plugin = %name, "plugin unloaded via admin API");
                Json(json!({"unloaded": name})).into_response()
            }
            Err(e) => plugin_error(e),
        },
        Err(r) => *r,
    }
}
