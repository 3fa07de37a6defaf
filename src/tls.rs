//! TLS with rustls (ring as the one crypto provider) for every listener of a node (client
//! `wss://`, admin `https://`, node link `wss://`) and for everything that dials one (the node
//! link's dialer, `stoa admin`, the client library).
//!
//! The server side is a [`ServerTls`]: one rustls `ServerConfig` whose certificate comes from a
//! resolver holding an `Arc<CertifiedKey>` behind a lock, so [`ServerTls::reload`] (SIGHUP,
//! `POST /api/tls/reload`) swaps it for new connections while the ones already open keep the
//! session they negotiated. A reload that cannot read or use the files keeps the old
//! certificate and returns why. [`ServerTls::accept`] bounds the handshake by
//! [`HANDSHAKE_TIMEOUT`], so a peer that opens a socket and stalls cannot hold a slot.
//!
//! The client side is [`client_config`]: trust anchors from a PEM file (`tls.ca_file`), or the
//! Mozilla roots of `webpki-roots` when none is given.

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};

/// A TLS handshake that has not finished after this long is dropped: long enough for a slow
/// mobile link (a handshake is two round trips), short enough that an attacker opening sockets
/// and stalling cannot keep connection slots for long.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The ALPN protocol of every Stoa listener: WebSocket upgrades and the admin API are HTTP/1.1.
const ALPN_HTTP_1_1: &[u8] = b"http/1.1";

/// Why TLS could not be set up, reloaded, or negotiated.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate, key or CA file could not be read.
    #[error("cannot read the {what} file {path}: {source}")]
    Read { what: &'static str, path: PathBuf, source: std::io::Error },
    /// A file was read but holds no usable PEM item of the expected kind.
    #[error("{what} file {path}: {message}")]
    Pem { what: &'static str, path: PathBuf, message: String },
    /// rustls refused the material (unsupported key type, key not matching the certificate).
    #[error("{context}: {source}")]
    Rustls { context: String, source: rustls::Error },
    /// The peer did not complete the handshake within [`HANDSHAKE_TIMEOUT`].
    #[error("TLS handshake timed out")]
    HandshakeTimeout,
    /// The handshake failed (bad certificate, protocol error, connection closed).
    #[error("TLS handshake failed: {0}")]
    Handshake(std::io::Error),
}

/// The one crypto provider of the process: ring.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What a certificate is, for logs and the admin API: the leaf's SHA-256 fingerprint and serial.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CertInfo {
    /// SHA-256 of the leaf certificate's DER, lowercase hex.
    pub fingerprint_sha256: String,
    /// The leaf's serial number, lowercase hex (empty if it could not be read).
    pub serial: String,
    /// Certificates in the chain, leaf included.
    pub chain_len: usize,
}

impl CertInfo {
    fn of(chain: &[CertificateDer<'static>]) -> CertInfo {
        let leaf = chain.first().map(|c| c.as_ref()).unwrap_or_default();
        CertInfo {
            fingerprint_sha256: fingerprint(leaf),
            serial: serial_of(leaf).map(hex::encode).unwrap_or_default(),
            chain_len: chain.len(),
        }
    }
}

/// SHA-256 of a DER certificate, lowercase hex (what `openssl x509 -fingerprint -sha256` shows,
/// without the colons).
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// The serial number of a DER X.509 certificate: `Certificate ::= SEQUENCE { tbsCertificate
/// SEQUENCE { [0] version OPTIONAL, serialNumber INTEGER, … } … }`.
fn serial_of(der: &[u8]) -> Option<&[u8]> {
    /// One DER TLV: (tag, contents, rest).
    fn tlv(data: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, data) = data.split_first()?;
        let (&first, mut data) = data.split_first()?;
        let len = if first < 0x80 {
            first as usize
        } else {
            let n = (first & 0x7f) as usize;
            if n == 0 || n > 4 || data.len() < n {
                return None;
            }
            let len = data[..n].iter().fold(0usize, |acc, b| (acc << 8) | *b as usize);
            data = &data[n..];
            len
        };
        (data.len() >= len).then(|| (tag, &data[..len], &data[len..]))
    }
    let (0x30, cert, _) = tlv(der)? else { return None };
    let (0x30, tbs, _) = tlv(cert)? else { return None };
    let (tag, value, rest) = tlv(tbs)?;
    let (tag, value) = if tag == 0xa0 { tlv(rest).map(|(t, v, _)| (t, v))? } else { (tag, value) };
    (tag == 0x02).then_some(value)
}

/// Serves whatever certificate was loaded last.
#[derive(Debug)]
struct SwappableCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for SwappableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().expect("certificate lock").clone())
    }
}

/// The server side of TLS for a node's listeners: one config, a swappable certificate.
#[derive(Clone)]
pub struct ServerTls {
    inner: Arc<ServerInner>,
}

struct ServerInner {
    cert_file: PathBuf,
    key_file: PathBuf,
    resolver: Arc<SwappableCert>,
    acceptor: tokio_rustls::TlsAcceptor,
    handshake_timeout: Duration,
    info: RwLock<CertInfo>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").field("cert_file", &self.inner.cert_file).field("key_file", &self.inner.key_file).finish()
    }
}

impl ServerTls {
    /// Load the PEM chain (leaf first) from `cert_file` and its key (PKCS#8, PKCS#1 RSA or SEC1
    /// EC) from `key_file`.
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<ServerTls, TlsError> {
        Self::load_with_timeout(cert_file, key_file, HANDSHAKE_TIMEOUT)
    }

    /// [`ServerTls::load`] with another handshake timeout (tests).
    pub fn load_with_timeout(cert_file: &Path, key_file: &Path, handshake_timeout: Duration) -> Result<ServerTls, TlsError> {
        let (key, info) = read_certified_key(cert_file, key_file)?;
        let resolver = Arc::new(SwappableCert { current: RwLock::new(key) });
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|source| TlsError::Rustls { context: "TLS protocol versions".into(), source })?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![ALPN_HTTP_1_1.to_vec()];
        Ok(ServerTls {
            inner: Arc::new(ServerInner {
                cert_file: cert_file.to_owned(),
                key_file: key_file.to_owned(),
                resolver,
                acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
                handshake_timeout,
                info: RwLock::new(info),
            }),
        })
    }

    /// Read the certificate and key files again and serve them to new connections. On any
    /// error the certificate in use stays, and the error says what was wrong.
    pub fn reload(&self) -> Result<CertInfo, TlsError> {
        let (key, info) = read_certified_key(&self.inner.cert_file, &self.inner.key_file)?;
        *self.inner.resolver.current.write().expect("certificate lock") = key;
        *self.inner.info.write().expect("certificate info lock") = info.clone();
        Ok(info)
    }

    /// The certificate new connections get.
    pub fn certificate(&self) -> CertInfo {
        self.inner.info.read().expect("certificate info lock").clone()
    }

    /// The certificate and key files (as configured).
    pub fn files(&self) -> (&Path, &Path) {
        (&self.inner.cert_file, &self.inner.key_file)
    }

    /// Run the server side of a TLS handshake on `stream`, giving up after the handshake
    /// timeout.
    pub async fn accept<S>(&self, stream: S) -> Result<tokio_rustls::server::TlsStream<S>, TlsError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        match tokio::time::timeout(self.inner.handshake_timeout, self.inner.acceptor.accept(stream)).await {
            Ok(Ok(tls)) => Ok(tls),
            Ok(Err(e)) => Err(TlsError::Handshake(e)),
            Err(_) => Err(TlsError::HandshakeTimeout),
        }
    }
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { what, path: path.to_owned(), source })
}

fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem { what, path: path.to_owned(), message: format!("unreadable PEM: {e}") })?;
    if certs.is_empty() {
        return Err(TlsError::Pem { what, path: path.to_owned(), message: "no CERTIFICATE block found".into() });
    }
    Ok(certs)
}

fn read_certified_key(cert_file: &Path, key_file: &Path) -> Result<(Arc<CertifiedKey>, CertInfo), TlsError> {
    let chain = read_certs("certificate", cert_file)?;
    let pem = read_file("key", key_file)?;
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Pem {
        what: "key",
        path: key_file.to_owned(),
        message: format!("no PKCS#8, RSA or EC private key found ({e})"),
    })?;
    let info = CertInfo::of(&chain);
    let certified = CertifiedKey::from_der(chain, key, &provider()).map_err(|source| TlsError::Rustls {
        context: format!("certificate {} with key {}", cert_file.display(), key_file.display()),
        source,
    })?;
    Ok((Arc::new(certified), info))
}

/// A client config trusting the certificates in `ca_file` (PEM, one or more), or the
/// `webpki-roots` Mozilla roots when `ca_file` is `None`. ALPN offers `http/1.1`.
pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for cert in read_certs("CA", path)? {
                roots.add(cert).map_err(|source| TlsError::Rustls { context: format!("CA file {}", path.display()), source })?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Rustls { context: "TLS protocol versions".into(), source })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_HTTP_1_1.to_vec()];
    Ok(Arc::new(config))
}

/// Most TLS handshakes an [`TlsListener`] runs at once; more connections wait in the kernel's
/// backlog. With [`HANDSHAKE_TIMEOUT`] this bounds what stalled peers can hold.
const MAX_PENDING_HANDSHAKES: usize = 64;

/// A TCP listener whose connections come out TLS-terminated, for `axum::serve` (the admin API).
/// Handshakes run concurrently in a task of their own (each bounded by the handshake timeout),
/// so one slow peer never holds up the next connection.
pub struct TlsListener {
    ready: tokio::sync::mpsc::Receiver<(tokio_rustls::server::TlsStream<tokio::net::TcpStream>, std::net::SocketAddr)>,
    local: std::net::SocketAddr,
}

impl TlsListener {
    /// Accept on `listener` and hand out streams that finished the TLS handshake, until
    /// `shutdown`. `label` names the listener in logs and metrics.
    pub fn new(
        listener: tokio::net::TcpListener,
        tls: ServerTls,
        label: &'static str,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> std::io::Result<TlsListener> {
        let local = listener.local_addr()?;
        let (tx, ready) = tokio::sync::mpsc::channel(MAX_PENDING_HANDSHAKES);
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let permit = tokio::select! {
                    p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
                    _ = shutdown.cancelled() => return,
                };
                let (stream, peer) = tokio::select! {
                    a = listener.accept() => match a {
                        Ok(a) => a,
                        Err(e) => {
                            tracing::warn!(listener = label, error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                    _ = shutdown.cancelled() => return,
                };
                let (tls, tx) = (tls.clone(), tx.clone());
                tokio::spawn(async move {
                    match tls.accept(stream).await {
                        Ok(stream) => {
                            let _ = tx.send((stream, peer)).await;
                        }
                        Err(e) => {
                            metrics::counter!("stoa_tls_handshake_failures_total", "listener" => label).increment(1);
                            tracing::debug!(listener = label, %peer, error = %e, "TLS handshake failed");
                        }
                    }
                    drop(permit);
                });
            }
        });
        Ok(TlsListener { ready, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(accepted) => accepted,
            // The accept task ended (shutdown): nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// A server-side stream that is plaintext or TLS, decided per listener at run time.
pub enum MaybeTls<S> {
    /// No `[tls]`: the socket as accepted.
    Plain(S),
    /// After a completed TLS handshake.
    Tls(Box<tokio_rustls::server::TlsStream<S>>),
}

impl<S: AsyncRead + AsyncWrite + Unpin> MaybeTls<S> {
    /// Run the TLS handshake on `stream` when `tls` is given; pass it through otherwise.
    pub async fn accept(stream: S, tls: Option<&ServerTls>) -> Result<MaybeTls<S>, TlsError> {
        match tls {
            None => Ok(MaybeTls::Plain(stream)),
            Some(tls) => Ok(MaybeTls::Tls(Box::new(tls.accept(stream).await?))),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for MaybeTls<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut tokio::io::ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for MaybeTls<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MaybeTls::Plain(s) => s.is_write_vectored(),
            MaybeTls::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Reload `tls` and log the outcome (`trigger`: what asked for it, e.g. `SIGHUP`).
pub fn reload_logged(tls: &ServerTls, trigger: &str) -> Result<CertInfo, TlsError> {
    let result = tls.reload();
    match &result {
        Ok(info) => tracing::info!(
            trigger,
            cert_file = %tls.files().0.display(),
            fingerprint_sha256 = %info.fingerprint_sha256,
            serial = %info.serial,
            "TLS certificate reloaded"
        ),
        Err(e) => tracing::error!(trigger, error = %e, "TLS certificate reload failed; the previous certificate stays in use"),
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Issued {
        cert_pem: String,
        key_pem: String,
        der: Vec<u8>,
    }

    fn ca() -> rcgen::CertifiedIssuer<'static, rcgen::KeyPair> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap()
    }

    fn leaf(ca: &rcgen::CertifiedIssuer<'static, rcgen::KeyPair>) -> Issued {
        let params = rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, ca).unwrap();
        Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem(), der: cert.der().to_vec() }
    }

    /// Handshake over an in-memory pipe; answers the certificate the client saw.
    async fn handshake(server: &ServerTls, ca_pem: &Path, name: &str) -> Result<Vec<u8>, String> {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let connector = tokio_rustls::TlsConnector::from(client_config(Some(ca_pem)).unwrap());
        let name = rustls_pki_types::ServerName::try_from(name.to_owned()).unwrap();
        let server = server.clone();
        let accept = tokio::spawn(async move {
            let mut s = server.accept(b).await.map_err(|e| e.to_string())?;
            s.write_all(b"ok").await.map_err(|e| e.to_string())?;
            s.flush().await.map_err(|e| e.to_string())?;
            Ok::<_, String>(s)
        });
        let mut c = connector.connect(name, a).await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 2];
        c.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        let _server_side = accept.await.unwrap()?;
        assert_eq!(c.get_ref().1.alpn_protocol(), Some(ALPN_HTTP_1_1));
        Ok(c.get_ref().1.peer_certificates().unwrap()[0].to_vec())
    }

    /// A reload serves the new certificate to new handshakes; a reload from a broken file
    /// fails with the file named and the previous certificate stays in use.
    #[tokio::test]
    async fn reload_swaps_the_certificate_and_a_broken_file_keeps_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca();
        let (ca_file, cert_file, key_file) = (dir.path().join("ca.pem"), dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&ca_file, ca.pem()).unwrap();
        let first = leaf(&ca);
        std::fs::write(&cert_file, &first.cert_pem).unwrap();
        std::fs::write(&key_file, &first.key_pem).unwrap();
        let server = ServerTls::load(&cert_file, &key_file).unwrap();
        assert_eq!(server.certificate().fingerprint_sha256, fingerprint(&first.der));
        assert!(!server.certificate().serial.is_empty());
        assert_eq!(handshake(&server, &ca_file, "127.0.0.1").await.unwrap(), first.der, "IP SAN");
        assert_eq!(handshake(&server, &ca_file, "localhost").await.unwrap(), first.der);
        let err = handshake(&server, &ca_file, "example.com").await.unwrap_err();
        assert!(err.contains("not valid for name") || err.contains("NotValidForName"), "{err}");

        let second = leaf(&ca);
        std::fs::write(&cert_file, &second.cert_pem).unwrap();
        std::fs::write(&key_file, &second.key_pem).unwrap();
        let info = server.reload().unwrap();
        assert_eq!(info.fingerprint_sha256, fingerprint(&second.der));
        assert_ne!(info.serial, CertInfo::of(&[CertificateDer::from(first.der.clone())]).serial);
        assert_eq!(handshake(&server, &ca_file, "localhost").await.unwrap(), second.der);

        std::fs::write(&cert_file, "-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n").unwrap();
        let err = server.reload().unwrap_err().to_string();
        assert!(err.contains("cert.pem"), "{err}");
        // A key that does not belong to the certificate is refused too.
        std::fs::write(&cert_file, &second.cert_pem).unwrap();
        std::fs::write(&key_file, &first.key_pem).unwrap();
        assert!(server.reload().is_err(), "a mismatched key must be refused");
        assert_eq!(server.certificate().fingerprint_sha256, fingerprint(&second.der));
        assert_eq!(handshake(&server, &ca_file, "localhost").await.unwrap(), second.der, "the old certificate stays");
    }

    /// A peer that connects and never speaks is dropped after the handshake timeout.
    #[tokio::test]
    async fn a_stalled_handshake_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let issued = leaf(&ca());
        let (cert_file, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert_file, &issued.cert_pem).unwrap();
        std::fs::write(&key_file, &issued.key_pem).unwrap();
        let server = ServerTls::load_with_timeout(&cert_file, &key_file, Duration::from_millis(200)).unwrap();
        let (_silent_client, b) = tokio::io::duplex(1024);
        let started = std::time::Instant::now();
        let result = server.accept(b).await;
        assert!(matches!(result, Err(TlsError::HandshakeTimeout)), "{:?}", result.err());
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    /// Missing files and files without the expected PEM block are named in the error.
    #[test]
    fn unusable_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let err = ServerTls::load(&missing, &missing).unwrap_err().to_string();
        assert!(err.contains("missing.pem") && err.contains("certificate"), "{err}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        assert!(client_config(Some(&empty)).unwrap_err().to_string().contains("no CERTIFICATE"));
        assert!(client_config(None).is_ok());
    }
}
