//! TLS on every listener: clients over `wss://`, the admin API over https, certificate reload
//! (new connections get the new certificate, open ones keep working, a broken file changes
//! nothing), and an HA pair whose node link runs over TLS and verifies the peer's certificate.
//!
//! Certificates are made at test time with rcgen: a CA, and leaf certificates it signs for
//! `localhost` and the IP address 127.0.0.1 (the node link dials an IP from the topology).

use crate::harness::*;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use stoa::admin_client::{AdminTls, request_with};
use stoa::client::{Client, ClientOptions, Login, new_cid};
use stoa::protocol::{RoomAddr, RoomConfigPatch};
use tokio::time::Instant;

/// A test CA and the files a node reads.
struct Pki {
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    ca_file: PathBuf,
    cert_file: PathBuf,
    key_file: PathBuf,
}

impl Pki {
    /// A fresh CA in `dir` (files prefixed `name`), with a first leaf certificate installed.
    fn new(dir: &Path, name: &str) -> (Pki, Vec<u8>) {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, format!("Stoa test CA {name}"));
        let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().expect("CA key")).expect("CA certificate");
        let ca_file = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&ca_file, ca.pem()).expect("writing the CA file");
        let pki = Pki { ca, ca_file, cert_file: dir.join(format!("{name}-cert.pem")), key_file: dir.join(format!("{name}-key.pem")) };
        let der = pki.install_new_leaf();
        (pki, der)
    }

    /// Issue a new leaf for `localhost` + 127.0.0.1, write it over the node's files; its DER.
    fn install_new_leaf(&self) -> Vec<u8> {
        let params = rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).expect("leaf params");
        let key = rcgen::KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.ca).expect("leaf certificate");
        std::fs::write(&self.cert_file, cert.pem()).expect("writing the certificate");
        std::fs::write(&self.key_file, key.serialize_pem()).expect("writing the key");
        cert.der().to_vec()
    }

    /// `[tls]` for a node: this CA's leaf, trusting `trust`'s CA file.
    fn apply(&self, settings: &mut stoa::config::Settings, trust: &Path) {
        settings.tls.cert_file = Some(self.cert_file.clone());
        settings.tls.key_file = Some(self.key_file.clone());
        settings.tls.ca_file = Some(trust.to_owned());
    }

    fn admin_tls(&self) -> AdminTls {
        AdminTls { config: stoa::tls::client_config(Some(&self.ca_file)).expect("client config"), server_name: "127.0.0.1".into() }
    }
}

/// The certificate a fresh TLS connection to `addr` is shown (verified against `ca_file`).
async fn served_certificate(addr: SocketAddr, ca_file: &Path) -> Vec<u8> {
    let config = stoa::tls::client_config(Some(ca_file)).expect("client config");
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let handshake = async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        tokio_rustls::TlsConnector::from(config).connect(name, tcp).await
    };
    let tls = tokio::time::timeout(DEADLINE, handshake).await.expect("TLS handshake in time").expect("TLS handshake");
    tls.get_ref().1.peer_certificates().expect("the server sent a certificate")[0].to_vec()
}

async fn https(addr: SocketAddr, tls: &AdminTls, method: &str, path: &str, token: Option<&str>) -> (u16, Value) {
    let answer = request_with(&addr.to_string(), Some(tls), method, path, token, DEADLINE)
        .await
        .unwrap_or_else(|e| panic!("{method} {path} over https: {e:#}"));
    (answer.status, answer.json())
}

/// Poll an https admin JSON endpoint until `pred` holds, or fail after [`DEADLINE`].
async fn await_https(addr: SocketAddr, tls: &AdminTls, path: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + DEADLINE;
    let mut last = Value::Null;
    while Instant::now() < deadline {
        if let Ok(a) = request_with(&addr.to_string(), Some(tls), "GET", path, None, Duration::from_secs(5)).await {
            last = a.json();
            if a.status == 200 && pred(&last) {
                return last;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await; // polling interval, not a wait
    }
    panic!("timed out waiting for {what} on GET {path}; last answer: {last}");
}

/// A node with `[tls]` serves clients over `wss://` only (a `ws://` client and a client that
/// does not trust the CA both fail), serves the admin API over https only (the console's
/// session cookie is `Secure`), and reloads its
/// certificate on `POST /api/tls/reload`: a new connection sees the new certificate, a client
/// connected before keeps posting, and a reload from a broken file answers the error, keeps the
/// certificate in use and is audited like the successful one.
pub async fn tls_on_client_and_admin_listeners_with_certificate_reload(db: &TestDb) {
    let (pki, first) = Pki::new(db.dir(), "node");
    let mut settings = db.settings("tls1");
    settings.auth.admin_token = "t0k3n-for-tls".into();
    pki.apply(&mut settings, &pki.ca_file);
    let node = TestNode::start(settings).await;
    let token = Some("t0k3n-for-tls");
    let wss = format!("wss://127.0.0.1:{}/ws", node.client_addr.port());
    let options = || ClientOptions::default().trust_ca_file(&pki.ca_file).expect("the CA file loads");

    // A client over wss posts and reads back.
    let room = RoomAddr(room("secure"));
    let (ann, welcome) = Client::connect_with(&wss, Login::guest("ann"), options()).await.expect("ann connects over wss");
    assert!(welcome.user.starts_with("ann"), "{welcome:?}");
    ann.create(room.clone(), RoomConfigPatch::default()).await.expect("create");
    ann.join(room.clone(), "ann", None, None).await.expect("join");
    let ack = ann.send(room.clone(), "over TLS", new_cid()).await.expect("send over wss");
    let page = ann.history(room.clone(), None, None, Some(10)).await.expect("history");
    assert_eq!(page.messages.iter().map(|m| (m.seq, m.body.as_str())).collect::<Vec<_>>(), vec![(ack.seq, "over TLS")]);

    // Plaintext and untrusted clients get nowhere.
    let plain = format!("ws://127.0.0.1:{}/ws", node.client_addr.port());
    let Err(err) = Client::connect(&plain, Login::guest("eve")).await else { panic!("a ws:// client must not get a session") };
    eprintln!("ws:// to the TLS listener: {err}");
    let Err(err) = Client::connect(&wss, Login::guest("eve")).await else { panic!("a client without the CA must not connect") };
    assert!(err.to_string().to_lowercase().contains("certificate"), "untrusted server certificate: {err}");

    // The admin API: https with the token; plain HTTP gets no answer.
    let admin_tls = pki.admin_tls();
    let (status, info) = https(node.admin_addr, &admin_tls, "GET", "/api/node", token).await;
    assert_eq!(status, 200, "{info}");
    assert_eq!(info["tls"]["fingerprint_sha256"], stoa::tls::fingerprint(&first), "{info}");
    let (status, _) = https(node.admin_addr, &admin_tls, "GET", "/api/node", None).await;
    assert_eq!(status, 401, "the token is still required over https");
    // The console's session cookie is `Secure` under TLS.
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let tcp = tokio::net::TcpStream::connect(node.admin_addr).await.expect("connect");
    let stream = tokio_rustls::TlsConnector::from(admin_tls.config.clone()).connect(name, tcp).await.expect("TLS handshake");
    let login = crate::cases::web::exchange(stream, "POST", "/api/console/login", &[], Some(&json!({"token": "t0k3n-for-tls"}))).await;
    assert_eq!(login.status, 200, "{}", login.body);
    let cookie = login.header("set-cookie").expect("a session cookie");
    assert!(cookie.contains("; Secure") && cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"), "{cookie}");
    let plain_admin = stoa::admin_client::request(&node.admin_addr.to_string(), "GET", "/health", None, Duration::from_secs(5)).await;
    assert!(plain_admin.is_err(), "plain HTTP to the https admin API answered: {plain_admin:?}");
    assert_eq!(served_certificate(node.client_addr, &pki.ca_file).await, first);

    // Reload a new certificate: new connections see it, ann's connection keeps working.
    let second = pki.install_new_leaf();
    let (status, reloaded) = https(node.admin_addr, &admin_tls, "POST", "/api/tls/reload", token).await;
    assert_eq!(status, 200, "{reloaded}");
    assert_eq!(reloaded["certificate"]["fingerprint_sha256"], stoa::tls::fingerprint(&second), "{reloaded}");
    assert_eq!(served_certificate(node.client_addr, &pki.ca_file).await, second, "client listener after the reload");
    assert_eq!(served_certificate(node.admin_addr, &pki.ca_file).await, second, "admin listener after the reload");
    let after = ann.send(room.clone(), "after the reload", new_cid()).await.expect("the open connection keeps working");
    assert_eq!(after.seq, ack.seq + 1);
    let (bob, _) = Client::connect_with(&wss, Login::guest("bob"), options()).await.expect("bob connects after the reload");
    bob.join(room.clone(), "bob", Some(0), None).await.expect("bob joins");
    let page = bob.history(room.clone(), None, None, Some(10)).await.expect("history");
    assert_eq!(page.messages.len(), 2, "{:?}", page.messages);

    // A broken certificate file: the reload fails, says why, and the second certificate stays.
    std::fs::write(&pki.cert_file, "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n").unwrap();
    let (status, failed) = https(node.admin_addr, &admin_tls, "POST", "/api/tls/reload", token).await;
    assert_eq!(status, 500, "{failed}");
    assert_eq!(failed["error"], "tls_reload_failed", "{failed}");
    assert!(failed["message"].as_str().unwrap_or("").contains("node-cert.pem"), "the error names the file: {failed}");
    assert_eq!(failed["certificate"]["fingerprint_sha256"], stoa::tls::fingerprint(&second), "{failed}");
    assert_eq!(served_certificate(node.client_addr, &pki.ca_file).await, second, "the old certificate stays in use");
    ann.send(room.clone(), "still here", new_cid()).await.expect("and connections keep working");

    let (_, audit) = https(node.admin_addr, &admin_tls, "GET", "/api/audit?limit=10", token).await;
    let outcomes: Vec<&str> = audit["entries"]
        .as_array()
        .expect("audit entries")
        .iter()
        .filter(|e| e["action"] == "tls_reload")
        .filter_map(|e| e["outcome"].as_str())
        .collect();
    assert_eq!(outcomes, vec!["failed", "done"], "newest first: {audit}");
    ann.close().await;
    bob.close().await;
    node.stop().await;
}

/// An HA pair whose node link runs over TLS: each node dials `wss://` to the peer's `link`
/// address (an IP) and verifies its certificate against `tls.ca_file`; both reach `reachable`
/// and `normal`. A peer whose certificate comes from a CA the other node does not trust is
/// not dialed by it: that node's link to the impostor never comes up (while the impostor,
/// which trusts the real CA, does reach it).
pub async fn ha_pair_node_link_runs_over_tls(db: &TestDb) {
    let (pki, leaf) = Pki::new(db.dir(), "pair");
    let links = (free_port(), free_port());
    let mut sa = crate::cases::ha::pair_settings(db, "1a", links);
    let mut sb = crate::cases::ha::pair_settings(db, "1b", links);
    pki.apply(&mut sa, &pki.ca_file);
    pki.apply(&mut sb, &pki.ca_file);
    let a = TestNode::start(sa).await;
    let b = TestNode::start(sb).await;
    let admin_tls = pki.admin_tls();
    let peer_up = |t: &Value| t["peer"]["reachable"] == true && t["peer"]["state"] == "normal";
    await_https(a.admin_addr, &admin_tls, "/api/topology", "1a to see 1b over the TLS link", peer_up).await;
    await_https(b.admin_addr, &admin_tls, "/api/topology", "1b to see 1a over the TLS link", peer_up).await;
    assert_eq!(served_certificate(SocketAddr::from(([127, 0, 0, 1], links.0)), &pki.ca_file).await, leaf, "the link listener speaks TLS");
    b.stop().await;
    await_https(a.admin_addr, &admin_tls, "/api/topology", "1a to see 1b gone", |t| t["peer"]["reachable"] == false).await;

    // An impostor 1b with a certificate from another CA (it trusts the real one, so its own dial
    // to 1a works and 1a hears its heartbeats); 1a must refuse to complete its dial to it.
    let rogue_dir = db.dir().join("rogue");
    std::fs::create_dir_all(&rogue_dir).unwrap();
    let (rogue, _) = Pki::new(&rogue_dir, "rogue");
    let mut si = crate::cases::ha::pair_settings(db, "1b", links);
    rogue.apply(&mut si, &pki.ca_file);
    let impostor = TestNode::start(si).await;
    let rogue_admin = rogue.admin_tls();
    await_https(a.admin_addr, &admin_tls, "/api/topology", "1a to hear the impostor's heartbeats", |t| t["peer"]["reachable"] == true).await;
    tokio::time::sleep(Duration::from_millis(1000)).await; // ten heartbeat intervals of 1a's dialer
    let (status, t) = https(impostor.admin_addr, &rogue_admin, "GET", "/api/topology", None).await;
    assert_eq!(status, 200, "{t}");
    assert_eq!(t["peer"]["link_up"], false, "1a completed a TLS link to a certificate it does not trust: {t}");
    drop(impostor);
    a.stop().await;
}

/// `stoa serve` reloads its certificate on SIGHUP and keeps running (it used to stop), logging
/// the outcome; `stoa admin tls-reload` over https reports a failed reload as an error and the
/// node keeps serving the certificate it had.
pub async fn sighup_reloads_the_certificate_of_a_running_process(db: &TestDb) {
    let (pki, first) = Pki::new(db.dir(), "proc");
    let extra = format!(
        "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\nca_file = \"{}\"\n",
        pki.cert_file.display(),
        pki.key_file.display(),
        pki.ca_file.display()
    );
    let config = db.write_config("hup1", &extra);
    let node = NodeProcess::start(&config, "hup1").await;
    assert_eq!(served_certificate(node.client_addr, &pki.ca_file).await, first);

    let second = pki.install_new_leaf();
    // SAFETY: signalling a child process this test started.
    assert_eq!(unsafe { libc::kill(node.pid() as i32, libc::SIGHUP) }, 0);
    let deadline = Instant::now() + DEADLINE;
    while served_certificate(node.client_addr, &pki.ca_file).await != second {
        assert!(Instant::now() < deadline, "no new certificate after SIGHUP:\n{}", node.log_text());
        tokio::time::sleep(Duration::from_millis(20)).await; // polling interval, not a wait
    }
    // The reload is logged after the swap, and the log comes through a pipe: it may trail.
    assert!(node.log_line("TLS certificate reloaded", DEADLINE).await.is_some(), "no reload logged after SIGHUP:\n{}", node.log_text());
    assert_eq!(https(node.admin_addr, &pki.admin_tls(), "GET", "/health", None).await.0, 200, "still serving after SIGHUP");

    std::fs::write(&pki.key_file, "not a key").unwrap();
    let admin = format!("https://127.0.0.1:{}", node.admin_addr.port());
    let ca = pki.ca_file.display().to_string();
    let (ok, out) = run_stoa(&["admin", "--admin", &admin, "--ca", &ca, "tls-reload"]).await;
    assert!(!ok && out.contains("proc-key.pem"), "a failed reload is an error naming the file: {out}");
    assert_eq!(served_certificate(node.client_addr, &pki.ca_file).await, second, "the certificate in use stays");
    let (ok, out) = run_stoa(&["admin", "--admin", &admin, "--ca", &ca, "status", "--json"]).await;
    assert!(ok, "stoa admin over https: {out}");
    let (ok, out) = run_stoa(&["admin", "--admin", &format!("127.0.0.1:{}", node.admin_addr.port()), "status"]).await;
    assert!(!ok, "stoa admin in plain HTTP against an https admin API must fail: {out}");
}

/// XMPP direct TLS (XEP-0368, `xmpp.c2s_tls`): a client speaks TLS from the first byte with the
/// node's certificate, then negotiates as after STARTTLS (no STARTTLS offered again; PLAIN
/// allowed, the stream being encrypted) and logs in; a plaintext client gets nothing.
pub async fn xmpp_direct_tls_listener(db: &TestDb) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (pki, _) = Pki::new(db.dir(), "xmpp");
    let mut settings = db.settings("tls3");
    pki.apply(&mut settings, &pki.ca_file);
    settings.xmpp.c2s_tls = Some("127.0.0.1:0".parse().expect("literal"));
    let node = TestNode::start(settings).await;
    let addr = node.xmpp_tls_addr.expect("the direct TLS listener");

    let config = stoa::tls::client_config(Some(&pki.ca_file)).expect("client config");
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("a name");
    let mut tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.expect("the TLS handshake");
    let open = "<?xml version='1.0'?><stream:stream to='localhost' version='1.0' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>";
    tls.write_all(open.as_bytes()).await.unwrap();
    let read_until = async |tls: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>, needle: &str| {
        let mut got = String::new();
        let mut buf = [0u8; 4096];
        while !got.contains(needle) {
            let n = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf)).await.expect("an answer in 10 s").expect("read");
            assert!(n > 0, "the stream ended before `{needle}`: {got}");
            got.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        got
    };
    let features = read_until(&mut tls, "</stream:features>").await;
    assert!(!features.contains("starttls"), "no STARTTLS on a TLS connection: {features}");
    assert!(features.contains("<mechanism>PLAIN</mechanism>") && features.contains("SCRAM-SHA-256"), "{features}");
    tls.write_all(b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='ANONYMOUS'/>").await.unwrap();
    let success = read_until(&mut tls, "success").await;
    assert!(success.contains("<success"), "{success}");

    // A plaintext client on the TLS port gets no XMPP.
    let mut plain = tokio::net::TcpStream::connect(addr).await.expect("connect");
    plain.write_all(open.as_bytes()).await.unwrap();
    let mut buf = [0u8; 1024];
    let answer = tokio::time::timeout(Duration::from_secs(10), plain.read(&mut buf)).await.expect("closed in 10 s");
    assert!(!String::from_utf8_lossy(&buf[..answer.unwrap_or(0)]).contains("stream:features"), "no XMPP without TLS");
    node.stop().await;
}
