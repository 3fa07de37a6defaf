//! `stoa plugin list|load|reload|unload`: a thin client of a running node's admin API.

use anyhow::Context as _;

/// Which plugin operation to ask for.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    List,
    Load,
    Reload,
    Unload,
}

/// Call the admin API at `admin` (`host:port`; https with `tls`; bearer `token` if not empty)
/// and return the JSON answer; an error status becomes an `Err` with the node's message.
pub async fn run(
    admin: &str,
    tls: Option<&crate::admin_client::AdminTls>,
    token: &str,
    op: Op,
    name: Option<&str>,
) -> anyhow::Result<serde_json::Value> {
    let (method, path) = match (op, name) {
        (Op::List, None) => ("GET", "/api/plugins".to_owned()),
        (Op::List, Some(n)) => ("GET", format!("/api/plugins/{n}")),
        (Op::Load, Some(n)) => ("POST", format!("/api/plugins/{n}/load")),
        (Op::Reload, Some(n)) => ("POST", format!("/api/plugins/{n}/reload")),
        (Op::Unload, Some(n)) => ("POST", format!("/api/plugins/{n}/unload")),
        (_, None) => anyhow::bail!("a plugin name is required"),
    };
    if let Some(n) = name {
        anyhow::ensure!(super::valid_name(n), "`{n}` is not a valid plugin name (a-z, 0-9, - and _, at most 64)");
    }
    let answer = crate::admin_client::request_with(admin, tls, method, &path, Some(token), std::time::Duration::from_secs(120))
        .await
        .context("the admin API did not answer")?;
    let value: serde_json::Value = serde_json::from_str(&answer.body).unwrap_or(serde_json::Value::String(answer.body.clone()));
    if answer.status != 200 {
        let message = value["message"].as_str().map(str::to_owned).unwrap_or_else(|| value.to_string());
        anyhow::bail!("{method} {path}: HTTP {}: {message}", answer.status);
    }
    Ok(value)
}
