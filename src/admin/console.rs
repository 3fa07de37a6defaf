//! The operators' console on the admin listener (docs/operations.md, "Console"): its files
//! (`crate::web`), sign-in with the admin token to a console session, and the live state as
//! server-sent events. The console then calls the same `/api/...` routes as `stoa admin`.
//!
//! A console session is a random id in a cookie (`HttpOnly`, `SameSite=Strict`, `Secure`
//! under TLS, one name per node so that two nodes' consoles on one host keep their own) and a
//! CSRF token the page holds in memory and sends as `X-CSRF-Token` with every state-changing
//! call; [`super::require_token`] refuses such a call without it. Sessions live in this node's
//! memory: a restart signs everyone out. Every response of the listener carries the security
//! headers of [`security_headers`], the strict Content-Security-Policy of the console among them.

use super::{Actor, AdminState, write_audit};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The header that carries a console session's CSRF token.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// How often the event stream looks at the node's state: the console shows a change within
/// this (state changes take a lease renewal or a heartbeat, 100 ms and more, to happen).
const EVENT_TICK: Duration = Duration::from_millis(500);

/// Transitions sent when the event stream opens.
const HISTORY_ON_OPEN: u64 = 50;

/// Most live console sessions on a node: a sign-in past it ends the oldest.
const MAX_SESSIONS: usize = 256;

/// One signed-in console.
#[derive(Clone, Debug)]
struct Session {
    csrf: String,
    actor: String,
    expires: Instant,
}

/// The node's console sessions, by session id.
#[derive(Clone, Default)]
pub struct Sessions(Arc<Mutex<HashMap<String, Session>>>);

impl Sessions {
    fn get(&self, id: &str) -> Option<Session> {
        let mut map = self.0.lock().expect("console sessions lock");
        let now = Instant::now();
        map.retain(|_, s| s.expires > now);
        map.get(id).cloned()
    }

    fn insert(&self, id: String, session: Session) {
        let mut map = self.0.lock().expect("console sessions lock");
        if map.len() >= MAX_SESSIONS
            && let Some(oldest) = map.iter().min_by_key(|(_, s)| s.expires).map(|(k, _)| k.clone())
        {
            map.remove(&oldest);
        }
        map.insert(id, session);
    }

    fn remove(&self, id: &str) -> Option<Session> {
        self.0.lock().expect("console sessions lock").remove(id)
    }
}

/// The routes anyone may call: the console's files, sign-in, the session check, sign-out.
pub(super) fn open_routes(state: &AdminState) -> Router<AdminState> {
    let mut router = Router::new()
        .route("/api/console/login", post(login))
        .route("/api/console/session", get(session))
        .route("/api/console/logout", post(logout));
    if state.settings.web.console {
        for asset in crate::web::CONSOLE {
            router = router.route(asset.path, get(move || async move { file(asset) }));
        }
        router = router.route("/console", get(|| async { file(&crate::web::CONSOLE[0]) }));
    }
    router
}

/// The routes behind the token check.
pub(super) fn routes() -> Router<AdminState> {
    Router::new().route("/api/events", get(events))
}

fn file(asset: &'static crate::web::Asset) -> Response {
    ([(header::CONTENT_TYPE, asset.content_type)], asset.body).into_response()
}

/// Every response of the admin listener: the console's CSP and the other security headers
/// (JSON answers carry them too; they cost nothing there and protect a page opened by mistake).
pub(super) async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(crate::web::CONSOLE_CSP));
    for (name, value) in crate::web::HEADERS {
        headers.insert(HeaderName::from_static(name), HeaderValue::from_static(value));
    }
    response
}

/// The cookie name of this node's console session.
fn cookie_name(state: &AdminState) -> String {
    let node: String = state.settings.node.id.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    format!("stoa_console_{node}")
}

/// The session id the request's cookie names, if any.
fn cookie_session(state: &AdminState, headers: &HeaderMap) -> Option<String> {
    let name = cookie_name(state);
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

/// How a request without a bearer token may still be let in: a console session, and for a
/// state-changing method its CSRF token. `None`: no console session (the caller answers 401).
pub(super) fn authenticate(state: &AdminState, request: &Request) -> Option<Result<Actor, Response>> {
    let id = cookie_session(state, request.headers())?;
    let session = state.console.get(&id)?;
    let safe = matches!(*request.method(), Method::GET | Method::HEAD);
    if !safe {
        let given = request.headers().get(CSRF_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("");
        if !super::constant_time_eq(given.as_bytes(), session.csrf.as_bytes()) {
            let body = json!({"error": "forbidden", "message": "missing or wrong CSRF token (X-CSRF-Token)"});
            return Some(Err((StatusCode::FORBIDDEN, Json(body)).into_response()));
        }
    }
    Some(Ok(Actor(session.actor)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Login {
    token: String,
    /// Who signs in, for the audit log (`console:NAME`); optional.
    #[serde(default)]
    name: Option<String>,
}

/// `NAME` of a sign-in: 1 to 32 of `A-Za-z0-9._-`, else why not.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 32 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
        return Err("name must be 1 to 32 of A-Z, a-z, 0-9, '.', '_', '-'".into());
    }
    Ok(())
}

fn random_hex() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// `POST /api/console/login {"token":…, "name":…}`: the admin token (or, on a node without
/// one, anything) opens a console session; audited either way.
async fn login(State(state): State<AdminState>, body: Result<Json<Login>, axum::extract::rejection::JsonRejection>) -> Response {
    let Ok(Json(login)) = body else {
        return super::bad_request("give {\"token\": the admin token, \"name\": who you are (optional)}".into());
    };
    if let Some(name) = &login.name
        && let Err(why) = check_name(name)
    {
        return super::bad_request(why);
    }
    let expected = &state.settings.auth.admin_token;
    let credential = Actor(crate::store::audit::admin_actor(Some(login.token.as_str()).filter(|_| !expected.is_empty())));
    let actor = match &login.name {
        Some(n) => format!("console:{n} ({})", credential.0),
        None => format!("console ({})", credential.0),
    };
    if !expected.is_empty() && !super::constant_time_eq(login.token.as_bytes(), expected.as_bytes()) {
        write_audit(&state, &Actor(actor), "console_login", &state.settings.node.id, json!({"message": "wrong admin token"}), "refused").await;
        return (StatusCode::UNAUTHORIZED, Json(json!({"error": "unauthorized", "message": "wrong admin token"}))).into_response();
    }
    let (id, csrf) = (random_hex(), random_hex());
    let ttl = Duration::from_secs(state.settings.web.console_session_ttl_s.max(60));
    state.console.insert(id.clone(), Session { csrf: csrf.clone(), actor: actor.clone(), expires: Instant::now() + ttl });
    write_audit(&state, &Actor(actor.clone()), "console_login", &state.settings.node.id, json!({}), "done").await;
    let secure = if state.tls.is_some() { "; Secure" } else { "" };
    let cookie = format!("{}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}", cookie_name(&state), ttl.as_secs());
    let mut response = Json(json!({"ok": true, "actor": actor, "csrf": csrf, "node": state.settings.node.id})).into_response();
    response.headers_mut().insert(header::SET_COOKIE, HeaderValue::from_str(&cookie).expect("hex and ASCII settings"));
    response
}

/// `GET /api/console/session`: the signed-in console's actor, CSRF token and what the page
/// needs to word its confirmations; 401 without a session. A page reload signs in again with it.
async fn session(State(state): State<AdminState>, headers: HeaderMap) -> Response {
    let Some(s) = cookie_session(&state, &headers).and_then(|id| state.console.get(&id)) else {
        return (StatusCode::UNAUTHORIZED, Json(json!({"error": "unauthorized", "message": "not signed in"}))).into_response();
    };
    let c = &state.settings.cluster;
    Json(json!({
        "actor": s.actor,
        "csrf": s.csrf,
        "node": state.settings.node.id,
        "critical_service_down_delay_ms": c.critical_service_down_delay_ms,
        "lease_ttl_ms": c.lease_ttl_ms,
    }))
    .into_response()
}

/// `POST /api/console/logout` (with the CSRF token): ends the session and clears the cookie.
async fn logout(State(state): State<AdminState>, request: Request<Body>) -> Response {
    let Some(id) = cookie_session(&state, request.headers()) else {
        return (StatusCode::UNAUTHORIZED, Json(json!({"error": "unauthorized", "message": "not signed in"}))).into_response();
    };
    match authenticate(&state, &request) {
        Some(Ok(actor)) => {
            state.console.remove(&id);
            write_audit(&state, &actor, "console_logout", &state.settings.node.id, json!({}), "done").await;
        }
        Some(Err(refused)) => return refused,
        None => {}
    }
    let secure = if state.tls.is_some() { "; Secure" } else { "" };
    let cookie = format!("{}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{secure}", cookie_name(&state));
    let mut response = Json(json!({"ok": true})).into_response();
    response.headers_mut().insert(header::SET_COOKIE, HeaderValue::from_str(&cookie).expect("ASCII"));
    response
}

/// What the event stream has sent so far.
struct Cursor {
    state: AdminState,
    last_transition: i64,
    opened: bool,
}

/// `GET /api/events`: server-sent events. `history` (the node-state log: the last transitions
/// on opening, then each new one) and `topology` (what `/api/topology` answers, every tick).
async fn events(State(state): State<AdminState>) -> impl IntoResponse {
    let cursor = Cursor { state, last_transition: 0, opened: false };
    let stream = futures_util::stream::unfold(cursor, |mut c| async move {
        // The stream ends with the listener, or graceful shutdown would wait for it forever.
        if c.opened {
            tokio::select! {
                _ = tokio::time::sleep(EVENT_TICK) => {}
                _ = c.state.shutdown.cancelled() => return None,
            }
        }
        let limit = if c.opened { 1000 } else { HISTORY_ON_OPEN };
        c.opened = true;
        // SQLite (one node, no pair) has no node-state log: then only the topology.
        let transitions = c.state.store.state_transitions(c.last_transition, limit).await.unwrap_or_default();
        if let Some(last) = transitions.last() {
            c.last_transition = last.id;
        }
        let topology = super::topology_view(&c.state).await;
        let mut events = Vec::with_capacity(2);
        if !transitions.is_empty() {
            events.push(Ok::<_, std::convert::Infallible>(Event::default().event("history").json_data(&transitions).expect("serializable")));
        }
        events.push(Ok(Event::default().event("topology").json_data(&topology).expect("serializable")));
        Some((futures_util::stream::iter(events), c))
    });
    use futures_util::StreamExt;
    Sse::new(stream.flatten()).keep_alive(KeepAlive::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_in_names_are_short_and_plain() {
        assert!(check_name("alice.ops-1").is_ok());
        for bad in ["", "a b", "<script>", &"x".repeat(33), "ann)"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
