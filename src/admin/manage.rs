//! The operator's verbs on a running node: end sessions (`stoa session list|kick`), configure
//! and destroy rooms (`stoa room configure|destroy`). They go through the live node because
//! what they change is live: a kicked session's connections must close, and a room's actor
//! holds its configuration and occupants (a change written behind its back would be fenced
//! or unseen). Every action is validated (400 with the reason), audited with the credential
//! that asked, and answered `{"ok":true,"message":…}` or `{"error":…,"message":…}`.

use super::{Actor, AdminState, bad_request, store_down, write_audit};
use crate::ids::RoomAddr;
use crate::protocol::{Affiliation, RoomConfigPatch, RoomPlugin};
use crate::store::SessionFilter;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

/// The routes of this module (behind the token check of [`super::serve`]).
pub(super) fn routes() -> Router<AdminState> {
    Router::new()
        .route("/api/sessions", get(list_sessions))
        .route("/api/sessions/{id}/kick", post(kick_session))
        .route("/api/users/{user}/kick", post(kick_user))
        .route("/api/users/{user}/home/{node}", post(set_home))
        .route("/api/rooms/{room}/configure", post(configure_room))
        .route("/api/rooms/{room}/destroy", post(destroy_room))
}

fn answer(status: StatusCode, error: &str, message: String) -> Response {
    (status, Json(json!({"error": error, "message": message}))).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SessionQuery {
    user: Option<String>,
}

/// `GET /api/sessions[?user=U]`: the unexpired stored sessions (of the whole group: the store
/// is shared), each with how many connections it has open on this node.
async fn list_sessions(State(state): State<AdminState>, q: Result<Query<SessionQuery>, QueryRejection>) -> Response {
    let q = match super::query(q) {
        Ok(q) => q,
        Err(why) => return bad_request(why),
    };
    if let Some(u) = &q.user
        && let Err(e) = crate::auth::validate_user_ref(u)
    {
        return bad_request(e.to_string());
    }
    let rows = match state.store.list_sessions(q.user.as_deref()).await {
        Ok(rows) => rows,
        Err(e) => return store_down(e),
    };
    let live = state.gateway.sessions_matching(&match &q.user {
        Some(u) => SessionFilter::User(u.clone()),
        None => SessionFilter::HashPrefix(String::new()),
    });
    let sessions: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            let connections = live.iter().filter(|s| s.token_hash() == Some(r.token_hash.as_str())).count();
            json!({
                "id": crate::auth::session_id(&r.token_hash),
                "user": r.user,
                "guest": r.guest,
                "created_at": crate::clock::iso_utc(r.created_at),
                "created_at_ms": r.created_at,
                "expires_at": crate::clock::iso_utc(r.expires_at),
                "expires_at_ms": r.expires_at,
                "connections_here": connections,
            })
        })
        .collect();
    Json(json!({"node": state.settings.node.id, "sessions": sessions})).into_response()
}

/// End the sessions `which` names: delete them from the store first (their tokens stop
/// working on every node of the group), then close their connections on this node (1008).
async fn kick(state: &AdminState, actor: &Actor, which: SessionFilter, target: &str) -> Response {
    let ended = match state.store.delete_sessions(&which).await {
        Ok(rows) => rows,
        Err(e) => return store_down(e),
    };
    let closed = state.gateway.kick_sessions(&which);
    let (what, field) = match &which {
        SessionFilter::User(u) => (format!("user {u}"), json!({"user": u})),
        SessionFilter::HashPrefix(p) => (format!("session {p}"), json!({"session": p})),
    };
    if ended.is_empty() && closed == 0 {
        let message = format!("no session of {what}: nothing to end");
        write_audit(state, actor, "session_kick", target, json!({"message": message}), "refused").await;
        return answer(StatusCode::NOT_FOUND, "not_found", message);
    }
    let message = format!("{what}: {} stored session(s) ended, {closed} connection(s) closed on node {}", ended.len(), state.settings.node.id);
    let mut detail = field;
    detail["sessions_ended"] = json!(ended.len());
    detail["connections_closed"] = json!(closed);
    write_audit(state, actor, "session_kick", target, detail, "done").await;
    Json(json!({"ok": true, "message": message, "sessions_ended": ended.len(), "connections_closed": closed})).into_response()
}

/// `POST /api/sessions/{id}/kick`: end one session (its id as `GET /api/sessions` shows it).
async fn kick_session(State(state): State<AdminState>, Extension(actor): Extension<Actor>, Path(id): Path<String>) -> Response {
    if let Err(m) = crate::auth::validate_session_id(&id) {
        return bad_request(m);
    }
    kick(&state, &actor, SessionFilter::HashPrefix(id.clone()), &id).await
}

/// `POST /api/users/{user}/kick`: end every session of a user.
async fn kick_user(State(state): State<AdminState>, Extension(actor): Extension<Actor>, Path(user): Path<String>) -> Response {
    if let Err(e) = crate::auth::validate_user_ref(&user) {
        return bad_request(e.to_string());
    }
    kick(&state, &actor, SessionFilter::User(user.clone()), &user).await
}

/// `POST /api/users/{user}/home/{node}`: make `node` (a node of this node's group, whose store
/// has the account) the user's home; its next login is served there (docs/clusters.md).
async fn set_home(State(state): State<AdminState>, Extension(actor): Extension<Actor>, Path((user, node)): Path<(String, String)>) -> Response {
    if let Err(e) = crate::auth::validate_user_name(&user) {
        return bad_request(e.to_string());
    }
    let in_group = match state.settings.group() {
        Some(g) => g.nodes.iter().any(|n| n.id == node),
        None => node == state.settings.node.id,
    };
    if !in_group {
        return bad_request(format!("node `{node}` is not in this node's group: a user's home is a node of the group whose store has its account"));
    }
    let before = match state.store.user_home(&user).await {
        Ok(Some(before)) => before,
        Ok(None) => return answer(StatusCode::NOT_FOUND, "not_found", format!("no user `{user}` in this group's store")),
        Err(e) => return store_down(e),
    };
    let home = crate::ids::NodeId(node);
    if let Err(e) = state.store.set_user_home(&user, &home, false).await {
        return store_down(e);
    }
    let message = format!("user {user} is homed on node {home}; its next login is served there");
    write_audit(&state, &actor, "user_home", &user, json!({"home": home.0, "was": before.map(|b| b.0)}), "done").await;
    Json(json!({"ok": true, "message": message})).into_response()
}

/// What `POST /api/rooms/{room}/configure` takes: the keys `stoa room create` sets.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoomChange {
    pub subject: Option<String>,
    /// `true` = members-only, `false` = public.
    pub members_only: Option<bool>,
    /// Replaces the room's plugin list (`[]` removes them all).
    pub plugins: Option<Vec<RoomPlugin>>,
}

/// Longest subject an operator may set (the client protocol's limit for texts).
const MAX_SUBJECT_CHARS: usize = crate::gateway::MAX_TEXT_CHARS;

impl RoomChange {
    /// The change as a room config patch, or why it is refused.
    fn patch(self) -> Result<RoomConfigPatch, String> {
        if self.subject.is_none() && self.members_only.is_none() && self.plugins.is_none() {
            return Err("nothing to change: give subject, members_only or plugins".into());
        }
        if let Some(s) = &self.subject
            && (s.chars().count() > MAX_SUBJECT_CHARS || s.contains('\0'))
        {
            return Err(format!("subject must be at most {MAX_SUBJECT_CHARS} characters, without NUL"));
        }
        for p in self.plugins.iter().flatten() {
            if !crate::plugin::valid_name(&p.name) {
                return Err(format!("`{}` is not a plugin name (a-z, 0-9, '-', '_')", p.name.escape_debug()));
            }
            if !p.config.is_object() {
                return Err(format!("the config of plugin `{}` must be a JSON object", p.name));
            }
        }
        Ok(RoomConfigPatch { subject: self.subject, public: self.members_only.map(|m| !m), plugins: self.plugins, ..RoomConfigPatch::default() })
    }
}

/// The room named in a path, if it exists, and an owner to act as: the room actor accepts
/// configuration and destruction from its owners only, and an operator stands in for them.
async fn room_and_owner(state: &AdminState, room: &str) -> Result<(RoomAddr, String), Response> {
    if room.split_once('@').is_none_or(|(n, s)| n.is_empty() || s.is_empty()) || room.len() > 255 {
        return Err(bad_request(format!("`{}` is not a room address (name@service)", room.escape_debug())));
    }
    let addr = RoomAddr(room.to_owned());
    let row = match state.store.load_room(&addr).await {
        Ok(Some(row)) => row,
        Ok(None) => return Err(answer(StatusCode::NOT_FOUND, "not_found", format!("no room {addr}"))),
        Err(e) => return Err(store_down(e)),
    };
    let affiliations = match state.store.load_affiliations(row.id).await {
        Ok(a) => a,
        Err(e) => return Err(store_down(e)),
    };
    let mut owners: Vec<&String> = affiliations.iter().filter(|(_, a)| **a == Affiliation::Owner).map(|(u, _)| u).collect();
    owners.sort();
    match owners.first() {
        Some(owner) => Ok((addr, (*owner).clone())),
        None => Err(answer(StatusCode::CONFLICT, "conflict", format!("room {addr} has no owner for the node to act as"))),
    }
}

/// A room actor's refusal as an answer.
fn room_refused(e: crate::room::RoomError) -> Response {
    use crate::room::RoomError;
    let (status, code) = match &e {
        RoomError::NotFound => (StatusCode::NOT_FOUND, "not_found"),
        RoomError::BadRequest(_) | RoomError::TooLarge(_) => (StatusCode::BAD_REQUEST, "bad_request"),
        RoomError::Unavailable(_) | RoomError::Passivating => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        RoomError::HostedBy(_) => (StatusCode::CONFLICT, "conflict"),
        RoomError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        _ => (StatusCode::CONFLICT, "conflict"),
    };
    let message = match &e {
        RoomError::HostedBy(node) => format!("the room is hosted by node {node} now: ask its admin API"),
        RoomError::Internal(_) => "internal error (see the node's log)".to_owned(),
        other => other.to_string(),
    };
    answer(status, code, message)
}

/// `POST /api/rooms/{room}/configure` with a JSON [`RoomChange`]: through the room's actor
/// (fenced write; occupants get `configured`, and `subject` for a new subject; plugins see
/// the change).
async fn configure_room(
    State(state): State<AdminState>,
    Extension(actor): Extension<Actor>,
    Path(room): Path<String>,
    body: Result<Json<RoomChange>, JsonRejection>,
) -> Response {
    let change = match body {
        Ok(Json(change)) => change,
        Err(e) => return bad_request(e.body_text()),
    };
    let patch = match change.patch() {
        Ok(p) => p,
        Err(m) => return bad_request(m),
    };
    let (addr, owner) = match room_and_owner(&state, &room).await {
        Ok(found) => found,
        Err(answer) => return answer,
    };
    let detail = serde_json::to_value(&patch).unwrap_or_default();
    let result = state.registry.call(&addr, crate::room::Configure { user: owner, patch }).await.and_then(|r| r);
    match result {
        Ok(()) => {
            write_audit(&state, &actor, "room_configure", addr.as_str(), detail, "done").await;
            Json(json!({"ok": true, "message": format!("room {addr} configured")})).into_response()
        }
        Err(e) => {
            let mut detail = detail;
            detail["message"] = json!(e.to_string());
            write_audit(&state, &actor, "room_configure", addr.as_str(), detail, "refused").await;
            room_refused(e)
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DestroyRequest {
    reason: Option<String>,
}

/// `POST /api/rooms/{room}/destroy` (JSON body `{"reason": …}` optional): through the room's
/// actor; occupants get `destroyed` with the reason; the log, affiliations and row go.
async fn destroy_room(
    State(state): State<AdminState>,
    Extension(actor): Extension<Actor>,
    Path(room): Path<String>,
    body: Result<Json<DestroyRequest>, JsonRejection>,
) -> Response {
    let request = match body {
        Ok(Json(r)) => r,
        Err(JsonRejection::MissingJsonContentType(_)) => DestroyRequest::default(),
        Err(e) => return bad_request(e.body_text()),
    };
    if let Some(r) = &request.reason
        && (r.chars().count() > MAX_SUBJECT_CHARS || r.contains('\0'))
    {
        return bad_request(format!("reason must be at most {MAX_SUBJECT_CHARS} characters, without NUL"));
    }
    let (addr, owner) = match room_and_owner(&state, &room).await {
        Ok(found) => found,
        Err(answer) => return answer,
    };
    let detail = json!({"reason": request.reason});
    let result = state.registry.call(&addr, crate::room::Destroy { user: owner, reason: request.reason }).await.and_then(|r| r);
    match result {
        Ok(()) => {
            tracing::info!(room = %addr, "room destroyed by an administrator");
            write_audit(&state, &actor, "room_destroy", addr.as_str(), detail, "done").await;
            Json(json!({"ok": true, "message": format!("room {addr} destroyed")})).into_response()
        }
        Err(e) => {
            let mut detail = detail;
            detail["message"] = json!(e.to_string());
            write_audit(&state, &actor, "room_destroy", addr.as_str(), detail, "refused").await;
            room_refused(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_room_change_becomes_a_patch_or_a_reason() {
        assert!(RoomChange::default().patch().unwrap_err().contains("nothing to change"));
        let p = RoomChange { members_only: Some(true), subject: Some("ops".into()), plugins: None }.patch().unwrap();
        assert_eq!((p.public, p.subject.as_deref(), p.plugins), (Some(false), Some("ops"), None));
        let long = RoomChange { subject: Some("x".repeat(MAX_SUBJECT_CHARS + 1)), ..RoomChange::default() };
        assert!(long.patch().unwrap_err().contains("subject"));
        let bad = RoomChange { plugins: Some(vec![RoomPlugin { name: "../x".into(), config: json!({}) }]), ..RoomChange::default() };
        assert!(bad.patch().unwrap_err().contains("plugin name"));
        let bad = RoomChange { plugins: Some(vec![RoomPlugin { name: "wf".into(), config: json!(3) }]), ..RoomChange::default() };
        assert!(bad.patch().unwrap_err().contains("JSON object"));
        let clear = RoomChange { plugins: Some(vec![]), ..RoomChange::default() }.patch().unwrap();
        assert_eq!(clear.plugins, Some(vec![]));
    }
}
