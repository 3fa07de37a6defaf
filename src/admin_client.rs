//! A small client for the admin HTTP API, the one the project has: what `stoa admin …` runs,
//! what the bench polls a server's `/health` with, and what tests use to drive a node
//! (HTTP/1.1, one request per connection, bearer token; https through [`request_with`] when
//! the node has `[tls]`).

use anyhow::Context as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// https for an admin request: the trust anchors and the name the node's certificate must carry.
#[derive(Clone, Debug)]
pub struct AdminTls {
    pub config: Arc<rustls::ClientConfig>,
    /// A DNS name or an IP address (an IP SAN in the certificate).
    pub server_name: String,
}

/// Where to send admin requests, from `--admin` (`host:port`, `http://host:port` or
/// `https://host:port`): a bare `host:port` uses https when `tls_by_default` (the config has
/// `[tls]`). https trusts `ca_file`, or the Mozilla roots. An unspecified address (`0.0.0.0`,
/// `[::]`, a listener bound to every interface) is dialed on loopback, and its certificate
/// must then name `localhost`. Answers the `host:port` to dial and the TLS to use.
pub fn target(admin: &str, tls_by_default: bool, ca_file: Option<&Path>) -> anyhow::Result<(String, Option<AdminTls>)> {
    let (tls, addr) = match admin.split_once("://") {
        Some(("https", rest)) => (true, rest),
        Some(("http", rest)) => (false, rest),
        Some((scheme, _)) => anyhow::bail!("admin address {admin}: use http:// or https://, not {scheme}://"),
        None => (tls_by_default, admin),
    };
    let addr = addr.trim_end_matches('/');
    let (host, port) = addr.rsplit_once(':').with_context(|| format!("admin address {admin} has no :port"))?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let unspecified = bare.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_unspecified());
    let (dial, name) = if unspecified { (format!("127.0.0.1:{port}"), "localhost".to_owned()) } else { (addr.to_owned(), bare.to_owned()) };
    if !tls {
        return Ok((dial, None));
    }
    let config = crate::tls::client_config(ca_file).context("loading the TLS trust anchors for the admin API")?;
    Ok((dial, Some(AdminTls { config, server_name: name })))
}

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

/// The value of unlabelled metric `name` in the text of a node's `/metrics`: 0 when it is not
/// listed (the exporter lists a counter from its first increment).
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0.0)
}

/// Send `method path` to the admin API at `addr` (`host:port`, plain HTTP), waiting at most
/// `timeout`.
pub async fn request(addr: &str, method: &str, path: &str, token: Option<&str>, timeout: Duration) -> anyhow::Result<Answer> {
    request_with(addr, None, method, path, token, timeout).await
}

/// [`request`], over https when `tls` is given.
pub async fn request_with(
    addr: &str,
    tls: Option<&AdminTls>,
    method: &str,
    path: &str,
    token: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<Answer> {
    send(addr, tls, method, path, token, None, timeout).await
}

/// [`request_with`] with a JSON body.
pub async fn request_json(
    addr: &str,
    tls: Option<&AdminTls>,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &serde_json::Value,
    timeout: Duration,
) -> anyhow::Result<Answer> {
    send(addr, tls, method, path, token, Some(&body.to_string()), timeout).await
}

async fn send(
    addr: &str,
    tls: Option<&AdminTls>,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<Answer> {
    let work = async {
        let stream = TcpStream::connect(addr).await.with_context(|| format!("connecting to the admin API at {addr}"))?;
        let auth = token.filter(|t| !t.is_empty()).map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
        let (kind, body) = match body {
            Some(b) => ("Content-Type: application/json\r\n", b),
            None => ("", ""),
        };
        let length = body.len();
        let request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}{kind}Content-Length: {length}\r\nConnection: close\r\n\r\n{body}");
        match tls {
            None => exchange(stream, &request).await,
            Some(tls) => {
                let name = rustls_pki_types::ServerName::try_from(tls.server_name.clone())
                    .with_context(|| format!("`{}` is not a DNS name or IP address", tls.server_name))?;
                let stream = tokio_rustls::TlsConnector::from(tls.config.clone())
                    .connect(name, stream)
                    .await
                    .with_context(|| format!("TLS with the admin API at {addr} (certificate for `{}`)", tls.server_name))?;
                exchange(stream, &request).await
            }
        }
    };
    let raw = tokio::time::timeout(timeout, work).await.map_err(|_| anyhow::anyhow!("{method} {path} on {addr} timed out"))??;
    parse(&raw).with_context(|| format!("reading the answer to {method} {path}"))
}

/// Write `request`, read the answer to the end of the connection.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, request: &str) -> anyhow::Result<Vec<u8>> {
    stream.write_all(request.as_bytes()).await?;
    stream.flush().await?;
    let mut raw = Vec::new();
    match stream.read_to_end(&mut raw).await {
        Ok(_) => {}
        // A TLS peer that closes without close_notify: the answer is complete when it parses.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => return Err(e.into()),
    }
    Ok(raw)
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

    #[test]
    fn targets_pick_the_scheme_and_the_name_to_verify() {
        let (addr, tls) = target("127.0.0.1:7451", false, None).unwrap();
        assert_eq!((addr.as_str(), tls.is_none()), ("127.0.0.1:7451", true));
        let (_, tls) = target("127.0.0.1:7451", true, None).unwrap();
        assert_eq!(tls.unwrap().server_name, "127.0.0.1");
        let (addr, tls) = target("https://admin.example.com:7451/", false, None).unwrap();
        assert_eq!((addr.as_str(), tls.unwrap().server_name.as_str()), ("admin.example.com:7451", "admin.example.com"));
        assert!(target("http://10.0.0.1:7451", true, None).unwrap().1.is_none());
        let (addr, tls) = target("0.0.0.0:7451", true, None).unwrap();
        assert_eq!((addr.as_str(), tls.unwrap().server_name.as_str()), ("127.0.0.1:7451", "localhost"));
        assert!(target("ftp://x:1", false, None).is_err());
    }
}
