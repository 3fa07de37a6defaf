//! `stoa plugin list|load|reload|unload`: a thin client of a running node's admin API.

use anyhow::Context as _;
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Which plugin operation to ask for.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    List,
    Load,
    Reload,
    Unload,
}

/// Call the admin API at `admin` (bearer `token` if not empty) and return the JSON answer;
/// an error status becomes an `Err` with the node's message.
pub async fn run(admin: SocketAddr, token: &str, op: Op, name: Option<&str>) -> anyhow::Result<serde_json::Value> {
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
    let mut stream = tokio::net::TcpStream::connect(admin).await.with_context(|| format!("connecting to the admin API at {admin}"))?;
    let auth = if token.is_empty() { String::new() } else { format!("Authorization: Bearer {token}\r\n") };
    let request = format!("{method} {path} HTTP/1.1\r\nHost: {admin}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(120), stream.read_to_end(&mut raw))
        .await
        .context("the admin API did not answer within 120 s")??;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").context("malformed HTTP answer")?;
    let status: u16 = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("malformed HTTP status line")?;
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_owned() };
    let value: serde_json::Value = serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body.clone()));
    if status != 200 {
        let message = value["message"].as_str().map(str::to_owned).unwrap_or_else(|| value.to_string());
        anyhow::bail!("{method} {path}: HTTP {status}: {message}");
    }
    Ok(value)
}

fn dechunk(mut data: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = data.split_once("\r\n") {
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("0").trim(), 16).unwrap_or(0);
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        data = rest[size..].strip_prefix("\r\n").unwrap_or(&rest[size..]);
    }
    out
}
