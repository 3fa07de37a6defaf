//! A small client for the admin HTTP API: what `stoa admin …` runs, and what tests use to
//! drive a node (HTTP/1.1, one request per connection, bearer token).

use anyhow::Context as _;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An answer: HTTP status and body.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

impl Answer {
    /// The body as JSON (`null` if it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// Send `method path` to the admin API at `addr` (`host:port`), waiting at most `timeout`.
pub async fn request(addr: &str, method: &str, path: &str, token: Option<&str>, timeout: Duration) -> anyhow::Result<Answer> {
    let work = async {
        let mut stream = TcpStream::connect(addr).await.with_context(|| format!("connecting to the admin API at {addr}"))?;
        let auth = token.filter(|t| !t.is_empty()).map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
        let request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        anyhow::Ok(raw)
    };
    let raw = tokio::time::timeout(timeout, work).await.map_err(|_| anyhow::anyhow!("{method} {path} on {addr} timed out"))??;
    parse(&raw).with_context(|| format!("reading the answer to {method} {path}"))
}

fn parse(raw: &[u8]) -> anyhow::Result<Answer> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").context("no end of headers")?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("bad status line")?;
    let mut body = raw[split + 4..].to_vec();
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        body = dechunk(&body);
    }
    Ok(Answer { status, body: String::from_utf8(body).context("body is not UTF-8")? })
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = data.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&data[..eol]).ok().and_then(|s| usize::from_str_radix(s.trim(), 16).ok()).unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = eol + 2;
        let end = (start + size).min(data.len());
        out.extend_from_slice(&data[start..end]);
        data = data.get(end + 2..).unwrap_or_default();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_and_plain_bodies_parse() {
        let plain = parse(b"HTTP/1.1 409 Conflict\r\ncontent-length: 2\r\n\r\n{}").unwrap();
        assert_eq!((plain.status, plain.body.as_str()), (409, "{}"));
        let chunked = parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").unwrap();
        assert_eq!(chunked.body, "abcde");
        assert!(parse(b"garbage").is_err());
    }
}
