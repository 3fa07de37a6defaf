//! `stoa session …`: list and end login sessions through a running node's admin API (a kick
//! must reach the live connections).

use super::admin::{AdminApi, path_segment};
use super::{AdminTarget, SessionCommand, cell};
use serde_json::Value;
use std::path::Path;

/// Run `stoa session COMMAND`.
pub async fn run(config: Option<&Path>, target: &AdminTarget, command: SessionCommand) -> anyhow::Result<()> {
    let node = AdminApi::new(config, target)?;
    match command {
        SessionCommand::List { user, json } => {
            let path = match &user {
                Some(u) => {
                    crate::auth::validate_user_ref(u)?;
                    format!("/api/sessions?user={}", path_segment(u))
                }
                None => "/api/sessions".to_owned(),
            };
            let answer = node.call("GET", &path, None).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&answer)?);
            } else {
                print!("{}", sessions_table(answer["sessions"].as_array().map_or(&[][..], Vec::as_slice)));
            }
        }
        SessionCommand::Kick { session, user } => {
            let path = match (session, user) {
                (Some(id), None) => {
                    crate::auth::validate_session_id(&id).map_err(anyhow::Error::msg)?;
                    format!("/api/sessions/{id}/kick")
                }
                (None, Some(u)) => {
                    crate::auth::validate_user_ref(&u)?;
                    format!("/api/users/{}/kick", path_segment(&u))
                }
                _ => anyhow::bail!("give a session id or --user, not both"),
            };
            let answer = node.call("POST", &path, None).await?;
            println!("{}", answer["message"].as_str().unwrap_or("done"));
        }
    }
    Ok(())
}

/// Sessions (`GET /api/sessions`) as a table.
pub fn sessions_table(sessions: &[Value]) -> String {
    let mut out = format!("{:<16} {:<24} {:<5} {:<20} {:<20} {:>5}\n", "SESSION", "USER", "GUEST", "CREATED (UTC)", "EXPIRES (UTC)", "CONNS");
    let time = |v: &Value| v.as_i64().map_or("-".to_owned(), |ms| crate::clock::readable_utc(ms).trim_end_matches(" UTC").to_owned());
    for s in sessions {
        out.push_str(&format!(
            "{:<16} {:<24} {:<5} {:<20} {:<20} {:>5}\n",
            cell(&s["id"]),
            cell(&s["user"]),
            if s["guest"] == true { "yes" } else { "no" },
            time(&s["created_at_ms"]),
            time(&s["expires_at_ms"]),
            cell(&s["connections_here"]),
        ));
    }
    if sessions.is_empty() {
        out.push_str("(no sessions)\n");
    }
    out
}

