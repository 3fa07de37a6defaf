//! The admin API from tests, through the same client `stoa admin` uses (`stoa::admin_client`):
//! one GET ([`http_get`]), a counter of `/metrics` ([`counter`]) and polling an endpoint until
//! a state shows ([`await_admin`]).

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

use super::DEADLINE;

/// A GET on the admin API (or any of a node's HTTP listeners) with an optional bearer token;
/// returns the status and the body.
pub async fn http_get(addr: SocketAddr, path: &str, bearer: Option<&str>) -> (u16, String) {
    let answer = stoa::admin_client::request(&addr.to_string(), "GET", path, bearer, DEADLINE)
        .await
        .unwrap_or_else(|e| panic!("GET {path} on {addr}: {e:#}"));
    (answer.status, answer.body)
}

/// Counter `name` (unlabelled) on the node's `/metrics`: 0 before its first increment, when the
/// exporter does not list it yet.
pub async fn counter(addr: SocketAddr, name: &str) -> f64 {
    stoa::admin_client::metric(&http_get(addr, "/metrics", None).await.1, name)
}

/// Poll an admin JSON endpoint until `pred` holds, or fail after [`DEADLINE`].
pub async fn await_admin(addr: SocketAddr, token: Option<&str>, path: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + DEADLINE;
    let mut last = Value::Null;
    while Instant::now() < deadline {
        let (status, body) = http_get(addr, path, token).await;
        if status == 200 {
            last = serde_json::from_str(&body).unwrap_or(Value::Null);
            if pred(&last) {
                return last;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await; // polling interval, not a wait
    }
    panic!("timed out waiting for {what} on GET {path}; last answer: {last}");
}
