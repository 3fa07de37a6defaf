//! `stoa admin …`: a running node's admin API (status, HA verbs, TLS reload, the audit log),
//! and the one way every verb that talks to a node reaches it ([`AdminApi`]).

use super::{AdminCommand, AdminTarget, PluginCommand, cell};
use serde_json::Value;
use std::path::Path;

/// `s` percent-encoded as one URL path segment or query value (the node decodes it and
/// validates what it names).
pub(crate) fn path_segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'@' | b'.' | b'_' | b'-' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A running node's admin API, as the config or the flags name it.
pub struct AdminApi {
    pub addr: String,
    pub tls: Option<crate::admin_client::AdminTls>,
    pub token: Option<String>,
}

impl AdminApi {
    /// From `--admin`/`--ca`/`--token`, defaulting to the config (loaded unless `--admin` is
    /// given without one).
    pub fn new(config: Option<&Path>, target: &AdminTarget) -> anyhow::Result<AdminApi> {
        let settings = match (&target.admin, config) {
            (Some(_), None) => None,
            _ => Some(super::load_settings(config)?),
        };
        let admin = target.admin.clone().unwrap_or_else(|| settings.as_ref().map(|s| s.listen.admin.to_string()).unwrap_or_default());
        let ca = target.ca.clone().or_else(|| settings.as_ref().and_then(|s| s.tls.ca_file.clone()));
        let tls_by_default = settings.as_ref().is_some_and(|s| s.tls.enabled());
        let (addr, tls) = crate::admin_client::target(&admin, tls_by_default, ca.as_deref())?;
        let token = target.token.clone().or_else(|| settings.as_ref().map(|s| s.auth.admin_token.clone()));
        Ok(AdminApi { addr, tls, token })
    }

    /// The raw answer to `method path` (with a JSON body, if any).
    pub async fn request(&self, method: &str, path: &str, body: Option<&Value>) -> anyhow::Result<crate::admin_client::Answer> {
        let timeout = std::time::Duration::from_secs(60);
        let token = self.token.as_deref();
        match body {
            Some(b) => crate::admin_client::request_json(&self.addr, self.tls.as_ref(), method, path, token, b, timeout).await,
            None => crate::admin_client::request_with(&self.addr, self.tls.as_ref(), method, path, token, timeout).await,
        }
    }

    /// The JSON answer to `method path`; a status other than 200 is an error with the node's reason.
    pub async fn call(&self, method: &str, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
        let answer = self.request(method, path, body).await?;
        refusal(&answer)?;
        Ok(answer.json())
    }
}

/// A non-200 answer as an error: `code (status): message`.
fn refusal(answer: &crate::admin_client::Answer) -> anyhow::Result<()> {
    if answer.status == 200 {
        return Ok(());
    }
    let json = answer.json();
    let message = json["message"].as_str().map(str::to_owned).unwrap_or(answer.body.clone());
    anyhow::bail!("{} ({}): {message}", json["error"].as_str().unwrap_or("error"), answer.status)
}

/// Run `stoa admin COMMAND`.
pub async fn run(config: Option<&Path>, target: &AdminTarget, command: AdminCommand) -> anyhow::Result<()> {
    let node = AdminApi::new(config, target)?;
    let answer = match &command {
        AdminCommand::Status { .. } => node.request("GET", "/api/topology", None).await?,
        AdminCommand::Node { node: n } => node.request("GET", &format!("/api/nodes/{n}"), None).await?,
        AdminCommand::Failover { node: n } => node.request("POST", &format!("/api/nodes/{n}/failover"), None).await?,
        AdminCommand::Fallback { node: n } => node.request("POST", &format!("/api/nodes/{n}/fallback"), None).await?,
        AdminCommand::Service { action, service, node: n } => node.request("POST", &format!("/api/nodes/{n}/services/{service}/{action}"), None).await?,
        AdminCommand::Audit { limit, .. } => node.request("GET", &format!("/api/audit?limit={limit}"), None).await?,
        AdminCommand::TlsReload => node.request("POST", "/api/tls/reload", None).await?,
    };
    refusal(&answer)?;
    let json = answer.json();
    match &command {
        AdminCommand::Status { json: false } => print_status(&json),
        AdminCommand::Failover { .. } | AdminCommand::Fallback { .. } | AdminCommand::Service { .. } | AdminCommand::TlsReload => {
            println!("{}", json["message"].as_str().unwrap_or(&answer.body));
        }
        AdminCommand::Audit { format, .. } if format == "table" => {
            print!("{}", audit_table(json["entries"].as_array().map_or(&[][..], Vec::as_slice)));
        }
        _ => println!("{}", serde_json::to_string_pretty(&json).unwrap_or(answer.body.clone())),
    }
    Ok(())
}

/// Run `stoa plugin COMMAND` (the plugin routes of the node's admin API; docs/plugins.md).
pub async fn plugin(config: Option<&Path>, target: &AdminTarget, command: PluginCommand) -> anyhow::Result<()> {
    use crate::plugin::cli::Op;
    let (op, name) = match command {
        PluginCommand::List { name } => (Op::List, name),
        PluginCommand::Load { name } => (Op::Load, Some(name)),
        PluginCommand::Reload { name } => (Op::Reload, Some(name)),
        PluginCommand::Unload { name } => (Op::Unload, Some(name)),
    };
    let node = AdminApi::new(config, target)?;
    let answer = crate::plugin::cli::run(&node.addr, node.tls.as_ref(), node.token.as_deref().unwrap_or_default(), op, name.as_deref()).await?;
    println!("{}", serde_json::to_string_pretty(&answer)?);
    Ok(())
}

/// A duration for people: `42s`, `7m03s`, `5h12m`, `3d04h`.
fn readable_age(ms: i64) -> String {
    let s = (ms.max(0) / 1000) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

fn print_status(topology: &serde_json::Value) {
    // 99 columns at most; the JSON (`--json`) has everything.
    println!("{:<8} {:<26} {:<22} {:>7} {:>6} {:>6} {:<10} {:>7}", "NODE", "STATE", "REASON", "SINCE", "ROOMS", "USERS", "SERVICES", "LEASE");
    let groups = topology["groups"].as_array().cloned().unwrap_or_default();
    if groups.is_empty() {
        println!("(no [cluster] topology configured on this node)");
    }
    let several = groups.len() > 1;
    for group in groups {
        // A cluster: each group under its name (the rooms and leases of another group are in
        // its own store: `-` here).
        if several {
            println!("group {}{}", group["name"].as_str().unwrap_or("?"), if group["ha"] == true { " (ha)" } else { "" });
        }
        for n in group["nodes"].as_array().cloned().unwrap_or_default() {
            // `ok`, or the services that are down.
            // (the peer's, as its heartbeats report them)
            let down: Option<Vec<&str>> = match n["services"].as_array() {
                Some(s) => Some(s.iter().filter(|x| x["running"] != true).filter_map(|x| x["service"].as_str()).collect()),
                None if n["link"]["reachable"] == true => n["link"]["services_down"].as_array().map(|d| d.iter().filter_map(|x| x.as_str()).collect()),
                None => None,
            };
            let services = match down {
                Some(d) if d.is_empty() => "ok".to_owned(),
                Some(d) => format!("DOWN:{}", d.join(",")),
                None => "-".to_owned(),
            };
            let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
            let since = n["since_ms"].as_i64().map_or("-".to_owned(), |at| readable_age(now_ms - at));
            // A lease the peer took over (`taken-by/…`) is as dead as an expired one.
            let taken = n["lease"]["holder"].as_str().is_some_and(|h| h.starts_with("taken-by/"));
            let lease = match (n["lease"]["expired"].as_bool(), n["lease"]["remaining_ms"].as_i64()) {
                _ if taken => "taken".to_owned(),
                (Some(true), _) => "expired".to_owned(),
                (_, Some(ms)) => format!("{:.1}s", ms as f64 / 1000.0),
                _ => "-".to_owned(),
            };
            let show = |v: &serde_json::Value| match v {
                serde_json::Value::Null => "-".to_owned(),
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            // The longest state name does not fit a column: the table abbreviates it.
            let state = show(&n["state"]).replace("failed_over_critical_services_not_running", "failed_over_critical");
            println!(
                "{:<8} {:<26} {:<22} {:>7} {:>6} {:>6} {:<10} {:>7}",
                show(&n["id"]),
                state,
                show(&n["reason"]),
                since,
                show(&n["rooms_hosted"]),
                show(&n["users_connected"]),
                services,
                lease,
            );
        }
    }
    if topology["store_busy"] == true {
        println!("(store busy: it did not answer in time; the states are live, rooms and leases left out)");
    }
    for peering in topology["peering"].as_array().cloned().unwrap_or_default() {
        println!("peering cluster {}", peering["name"].as_str().unwrap_or("?"));
        for n in peering["nodes"].as_array().cloned().unwrap_or_default() {
            let link = &n["link"];
            let state = if link["reachable"] == true { link["state"].as_str().unwrap_or("-") } else { "unknown" };
            println!("{:<8} {:<26} {}", n["id"].as_str().unwrap_or("?"), state, n["service"].as_str().unwrap_or(""));
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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

}
