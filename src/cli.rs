//! What the `stoa` command line needs beyond parsing: error text with each cause once, the
//! password sources, the config check, and the tables it prints (UTC times for people).

use anyhow::Context as _;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The variable `stoa user add|passwd` read a password from when no `--password-file` is given.
pub const PASSWORD_ENV: &str = "STOA_PASSWORD";

/// An error and its causes on one line, `outer: cause: root`, each cause once. Errors that
/// print their source in their own message (`configuration: <the crate's error>`) would
/// otherwise repeat it: a cause whose text the line already holds is left out.
pub fn error_text(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// The password for `user`: the first line of `file`, else [`PASSWORD_ENV`], else asked twice
/// at the terminal. Checked against the password rule before anything is stored.
pub fn password(user: &str, file: Option<&Path>) -> anyhow::Result<String> {
    let password = match file {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("reading the password file {}", path.display()))?
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned(),
        None => match std::env::var(PASSWORD_ENV) {
            Ok(p) => p,
            Err(_) => {
                let p = rpassword::prompt_password(format!("password for {user}: "))
                    .with_context(|| format!("no password: give --password-file, set {PASSWORD_ENV}, or run at a terminal"))?;
                let again = rpassword::prompt_password("again: ").context("reading the password again")?;
                anyhow::ensure!(p == again, "the two passwords differ");
                p
            }
        },
    };
    crate::auth::validate_password(&password)?;
    Ok(password)
}

/// Settings from `file` (or dev mode without one). The error is one line that names the file
/// once: config errors spell their causes out in their own text.
pub fn load_settings(file: Option<&Path>) -> anyhow::Result<crate::config::Settings> {
    crate::config::Settings::load(file).map_err(|e| {
        let text = e.to_string();
        // `Values` names its origin (the file or the environment) itself.
        let named = matches!(e, crate::config::ConfigError::Values { .. });
        match file {
            Some(f) if !named && !text.contains(&f.display().to_string()) => anyhow::anyhow!("{}: {text}", f.display()),
            Some(_) => anyhow::anyhow!(text),
            None => anyhow::anyhow!("settings (dev mode, no config file): {text}"),
        }
    })
}

/// `stoa config check`: load `file` as `stoa serve` would (parse, unknown keys, values,
/// secret files, the start-up checks) and read the TLS files; returns the file checked.
pub fn check_config(file: Option<&Path>) -> anyhow::Result<PathBuf> {
    let file = file.context("no config file to check: give --config FILE or set STOA_CONFIG")?;
    let settings = load_settings(Some(file))?;
    settings.check_tls_files().map_err(|e| anyhow::anyhow!("{}: [tls]: {e}", file.display()))?;
    Ok(file.to_path_buf())
}

/// `--plugin NAME` or `--plugin 'NAME={"json":"config"}'` of `stoa room create|configure`.
pub fn parse_plugin(arg: &str) -> Result<crate::protocol::RoomPlugin, String> {
    let (name, config) = match arg.split_once('=') {
        Some((name, json)) => {
            let config: Value = serde_json::from_str(json).map_err(|e| format!("the config of plugin `{name}` is not JSON: {e}"))?;
            (name, config)
        }
        None => (arg, serde_json::json!({})),
    };
    if !crate::plugin::valid_name(name) {
        return Err(format!("`{name}` is not a plugin name (a-z, 0-9, '-', '_')"));
    }
    if !config.is_object() {
        return Err(format!("the config of plugin `{name}` must be a JSON object"));
    }
    Ok(crate::protocol::RoomPlugin { name: name.to_owned(), config })
}

/// A JSON value as a table cell: strings bare, `null` as `-`.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `detail` fields as `key=value` pairs (values with spaces quoted).
fn fields(detail: &Value) -> String {
    let Some(map) = detail.as_object() else { return cell(detail) };
    map.iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| {
            let v = cell(v);
            if v.contains(' ') { format!("{k}={v:?}") } else { format!("{k}={v}") }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The audit log (`GET /api/audit` entries) as a table, newest first.
pub fn audit_table(entries: &[Value]) -> String {
    let mut out = format!("{:<23} {:<6} {:<15} {:<15} {:<24} {:<8} DETAIL\n", "TIME (UTC)", "NODE", "ACTOR", "ACTION", "TARGET", "OUTCOME");
    for e in entries {
        let at = e["at_ms"].as_i64().map_or_else(|| cell(&e["at"]), crate::clock::readable_utc);
        let actor = match e["actor"].as_str() {
            Some("") | None => "-".to_owned(),
            Some(a) => a.to_owned(),
        };
        out.push_str(&format!(
            "{:<23} {:<6} {:<15} {:<15} {:<24} {:<8} {}\n",
            at.trim_end_matches(" UTC"),
            cell(&e["node"]),
            actor,
            cell(&e["action"]),
            cell(&e["target"]),
            cell(&e["outcome"]),
            fields(&e["detail"]),
        ));
    }
    if entries.is_empty() {
        out.push_str("(the audit log is empty)\n");
    }
    out
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

/// Registered users as a table.
pub fn users_table(users: &[(String, i64)]) -> String {
    let mut out = format!("{:<24} CREATED (UTC)\n", "USER");
    for (name, created) in users {
        out.push_str(&format!("{name:<24} {}\n", crate::clock::readable_utc(*created).trim_end_matches(" UTC")));
    }
    if users.is_empty() {
        out.push_str("(no registered users)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A cause that the message above it already spells out is printed once.
    #[test]
    fn each_cause_is_printed_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("cannot read secret file /x: {source}")]
        struct Secret {
            source: std::io::Error,
        }
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory (os error 2)");
        let e = anyhow::Error::new(Secret { source: io }).context("loading settings");
        assert_eq!(error_text(&e), "loading settings: cannot read secret file /x: No such file or directory (os error 2)");
        let plain = anyhow::anyhow!("root").context("middle").context("top");
        assert_eq!(error_text(&plain), "top: middle: root");
    }

    #[test]
    fn plugin_arguments_name_a_plugin_and_maybe_its_config() {
        assert_eq!(parse_plugin("word-filter").unwrap().config, json!({}));
        let p = parse_plugin(r#"word-filter={"words":["x"]}"#).unwrap();
        assert_eq!((p.name.as_str(), &p.config), ("word-filter", &json!({"words": ["x"]})));
        assert!(parse_plugin("Bad Name").unwrap_err().contains("plugin name"));
        assert!(parse_plugin("wf={nope").unwrap_err().contains("not JSON"));
        assert!(parse_plugin("wf=[1]").unwrap_err().contains("JSON object"));
    }

    #[test]
    fn the_audit_table_has_utc_times_actors_and_fields() {
        let entries = vec![json!({
            "at_ms": 1_796_408_545_000i64, "node": "1a", "actor": "token:1a2b3c4d", "action": "failover",
            "target": "1a", "outcome": "done", "detail": {"node": "1a", "message": "failed over to 1b"},
        })];
        let table = audit_table(&entries);
        let line = table.lines().nth(1).unwrap();
        assert!(line.starts_with("2026-12-04 18:22:25"), "{table}");
        assert!(line.contains("token:1a2b3c4d") && line.contains("failover"), "{table}");
        assert!(line.contains(r#"message="failed over to 1b""#) && line.contains("node=1a"), "{table}");
        assert!(audit_table(&[]).contains("empty"));
    }

    #[test]
    fn user_list_times_are_readable() {
        let t = users_table(&[("ann".into(), 0)]);
        assert!(t.contains("ann") && t.contains("1970-01-01 00:00:00"), "{t}");
    }
}
