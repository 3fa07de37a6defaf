//! `admin_audit`: who did what to the node or its data, and how it ended.
//!
//! A line names the acting credential (`actor`: a fingerprint of the admin token, the node
//! link, or `cli:<unix user>` for verbs that write the store directly) and keeps its details
//! as fields (`detail` holds a JSON object). Lines written before the `actor` column existed,
//! or by writers that keep `detail` as text, read back with an empty actor and the text under
//! `detail.message`.

use super::{Store, StoreError};
use sea_orm::ConnectionTrait;
use sea_orm::sea_query::{Alias, Order, Query};
use serde::Serialize;
use serde_json::{Map, Value};

/// One line to write.
#[derive(Clone, Debug)]
pub struct AuditEntry<'a> {
    /// The node that carried the action out.
    pub node: &'a str,
    /// Who asked: see [`admin_actor`], [`cli_actor`].
    pub actor: &'a str,
    /// `failover`, `user_delete`, `session_kick`, …
    pub action: &'a str,
    /// What it acted on: a node, a user, a room, a session.
    pub target: &'a str,
    /// Readable fields (`{"node": "1a", "message": "…"}`).
    pub detail: Map<String, Value>,
    /// `done`, `refused` or `failed`.
    pub outcome: &'a str,
}

/// One line read back.
#[derive(Clone, Debug, Serialize)]
pub struct AuditLine {
    pub id: i64,
    /// Milliseconds since the Unix epoch on the node that wrote it.
    pub at_ms: i64,
    /// The same time, ISO 8601 in UTC.
    pub at: String,
    pub node: String,
    /// Empty when unknown (lines from before this field existed).
    pub actor: String,
    pub action: String,
    pub target: String,
    pub detail: Map<String, Value>,
    pub outcome: String,
}

/// The actor of an admin API request: the fingerprint of the bearer token it presented (the
/// first 8 hex digits of its SHA-256, never the token), or `open` when the API has no token.
pub fn admin_actor(token: Option<&str>) -> String {
    use sha2::{Digest, Sha256};
    match token.filter(|t| !t.is_empty()) {
        Some(t) => format!("token:{}", &hex::encode(Sha256::digest(t.as_bytes()))[..8]),
        None => "open".to_owned(),
    }
}

/// The actor of a command-line verb that writes the store directly: `cli:<unix user>`.
pub fn cli_actor() -> String {
    let user = std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).unwrap_or_else(|_| "unknown".to_owned());
    format!("cli:{user}")
}

/// `detail` as stored: a JSON object, or text (older writers) kept under `message`.
fn parse_detail(text: &str) -> Map<String, Value> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(fields)) => fields,
        _ if text.is_empty() => Map::new(),
        _ => Map::from_iter([("message".to_owned(), Value::String(text.to_owned()))]),
    }
}

impl Store {
    /// Write one line of the audit log.
    pub async fn audit(&self, entry: &AuditEntry<'_>) -> Result<(), StoreError> {
        let stmt = Query::insert()
            .into_table(Alias::new("admin_audit"))
            .columns(["at", "node", "actor", "action", "target", "detail", "outcome"].map(Alias::new))
            .values_panic([
                super::now_ms().into(),
                entry.node.into(),
                entry.actor.into(),
                entry.action.into(),
                entry.target.into(),
                Value::Object(entry.detail.clone()).to_string().into(),
                entry.outcome.into(),
            ])
            .to_owned();
        self.db.execute(&stmt).await?;
        Ok(())
    }

    /// The newest `limit` lines, newest first.
    pub async fn audit_lines(&self, limit: u64) -> Result<Vec<AuditLine>, StoreError> {
        let stmt = Query::select()
            .columns(["id", "at", "node", "actor", "action", "target", "detail", "outcome"].map(Alias::new))
            .from(Alias::new("admin_audit"))
            .order_by(Alias::new("id"), Order::Desc)
            .limit(limit)
            .to_owned();
        let rows = self.db.query_all(&stmt).await?;
        rows.into_iter()
            .map(|r| {
                let at_ms = r.try_get::<i64>("", "at")?;
                Ok(AuditLine {
                    id: r.try_get("", "id")?,
                    at_ms,
                    at: crate::clock::iso_utc(at_ms),
                    node: r.try_get("", "node")?,
                    actor: r.try_get("", "actor")?,
                    action: r.try_get("", "action")?,
                    target: r.try_get("", "target")?,
                    detail: parse_detail(&r.try_get::<String>("", "detail")?),
                    outcome: r.try_get("", "outcome")?,
                })
            })
            .collect::<Result<_, sea_orm::DbErr>>()
            .map_err(StoreError::Db)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn details_read_back_as_fields_whatever_wrote_them() {
        let fields = parse_detail(r#"{"node":"1a","message":"done"}"#);
        assert_eq!(fields["node"], "1a");
        let old = parse_detail("asked by node 1b over the node link: ok");
        assert_eq!(old["message"], "asked by node 1b over the node link: ok");
        assert!(parse_detail("").is_empty());
    }

    #[test]
    fn the_actor_names_the_token_without_revealing_it() {
        let a = admin_actor(Some("s3cret-admin-token"));
        assert!(a.starts_with("token:") && a.len() == "token:".len() + 8, "{a}");
        assert!(!a.contains("s3cret"));
        assert_eq!(a, admin_actor(Some("s3cret-admin-token")), "stable");
        assert_ne!(a, admin_actor(Some("another-token")));
        assert_eq!(admin_actor(None), "open");
        assert_eq!(admin_actor(Some("")), "open");
    }
}
