//! TLS on both ports, with a CA made here (rcgen): pushes and queries over https, plain text
//! and strangers' certificates refused, client certificates enforced when configured, and a
//! renewed certificate served after SIGHUP.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use covd::client::{Client, ClientError, Connect};
use covd::server::{self, Settings};
use covd::tls::TlsFiles;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

/// A certificate authority of the test's own.
struct Ca(CertifiedIssuer<'static, KeyPair>);

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        Ca(CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap())
    }

    fn pem(&self) -> Vec<u8> {
        self.0.pem().into_bytes()
    }

    /// A certificate for `127.0.0.1` and `localhost` and its key, in PEM.
    fn issue(&self) -> (Vec<u8>, Vec<u8>) {
        let params =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.0).unwrap();
        (cert.pem().into_bytes(), key.serialize_pem().into_bytes())
    }

    /// [`Ca::issue`], written to `dir` as `name.pem` and `name.key`.
    fn issue_files(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = self.issue();
        let (c, k) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert).unwrap();
        std::fs::write(&k, key).unwrap();
        (c, k)
    }
}

/// A daemon with TLS on both ports: its gRPC and HTTP addresses.
struct Secured {
    grpc: SocketAddr,
    http: SocketAddr,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn secured(tls: TlsFiles) -> Secured {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc = listener.local_addr().unwrap();
    let settings = Settings {
        tls: Some(tls),
        http_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..Settings::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready) = tokio::sync::oneshot::channel();
    tokio::spawn(server::run_with_ready(
        listener,
        settings,
        async {
            let _ = stopped.await;
        },
        ready_tx,
    ));
    let http = ready.await.unwrap().http.unwrap();
    Secured {
        grpc,
        http,
        _stop: stop,
    }
}

fn client(addr: SocketAddr, ca: &Ca, identity: Option<(Vec<u8>, Vec<u8>)>) -> Client {
    let how = Connect {
        ca_pem: Some(ca.pem()),
        identity,
        ..Connect::default()
    };
    Client::connect_using(&format!("https://{addr}"), &how).unwrap()
}

fn gcc_shard() -> covd::model::Coverage {
    read_lcov(
        &fixture("gcc-lcov/shard1.info"),
        &covd::model::path::PathRules::default(),
    )
}

/// GET `path` on the HTTP port over TLS, trusting `ca`: the status line.
async fn https_get(addr: SocketAddr, ca: &Ca, path: &str) -> std::io::Result<String> {
    let mut roots = rustls::RootCertStore::empty();
    let ca_der = rustls::pki_types::CertificateDer::from_pem_slice(&ca.pem()).unwrap();
    roots.add(ca_der).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = connector.connect(name, tcp).await?;
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut answer = Vec::new();
    tls.read_to_end(&mut answer).await?;
    let answer = String::from_utf8_lossy(&answer);
    Ok(answer.lines().next().unwrap_or_default().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_and_queries_go_over_https_and_plain_text_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("covd test CA");
    let (cert, key) = ca.issue_files(dir.path(), "server");
    let daemon = secured(TlsFiles {
        cert,
        key,
        client_ca: None,
    })
    .await;

    let mut c = client(daemon.grpc, &ca, None);
    let coverage = gcc_shard();
    push(&mut c, "over-tls", "0", 1, coverage.clone()).await;
    let (_, merged) = fetch(&mut c, "over-tls").await;
    assert_eq!(merged, coverage);
    assert_eq!(
        https_get(daemon.http, &ca, "/metrics").await.unwrap(),
        "HTTP/1.1 200 OK"
    );

    // Plain text on the TLS port: no answer, on either port.
    let mut plain = Client::connect(&format!("http://{}", daemon.grpc)).unwrap();
    let e = plain.list_runs(10).await.unwrap_err();
    assert!(
        matches!(&e, ClientError::Status(s) if s.code() != tonic::Code::Ok),
        "{e:?}"
    );
    let mut raw = tokio::net::TcpStream::connect(daemon.http).await.unwrap();
    raw.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = raw.read_to_end(&mut answer).await;
    assert!(!answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");

    // A certificate from another CA is refused by the client.
    let stranger = Ca::new("another CA");
    let e = client(daemon.grpc, &stranger, None)
        .list_runs(10)
        .await
        .unwrap_err();
    assert!(
        format!("{e:?}").to_lowercase().contains("certificate"),
        "{e:?}"
    );
    assert!(https_get(daemon.http, &stranger, "/metrics").await.is_err());

    // The daemon serves on.
    let runs = client(daemon.grpc, &ca, None).list_runs(10).await.unwrap();
    assert_eq!(runs.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_are_required_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("servers");
    let clients = Ca::new("clients");
    let (cert, key) = ca.issue_files(dir.path(), "server");
    let client_ca = dir.path().join("clients.pem");
    std::fs::write(&client_ca, clients.pem()).unwrap();
    let daemon = secured(TlsFiles {
        cert,
        key,
        client_ca: Some(client_ca),
    })
    .await;

    let mut with = client(daemon.grpc, &ca, Some(clients.issue()));
    let coverage = gcc_shard();
    push(&mut with, "mutual", "0", 1, coverage.clone()).await;
    assert_eq!(fetch(&mut with, "mutual").await.1, coverage);

    let e = client(daemon.grpc, &ca, None)
        .list_runs(10)
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::Status(_)), "{e:?}");
    let e = client(daemon.grpc, &ca, Some(Ca::new("strangers").issue()))
        .list_runs(10)
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::Status(_)), "{e:?}");
    // Over the HTTP port too: no certificate, no page.
    assert!(https_get(daemon.http, &ca, "/metrics").await.is_err());
}

/// Reads `child`'s standard error until a line holds `needle`.
fn wait_for_line(lines: &mut impl Iterator<Item = std::io::Result<String>>, needle: &str) {
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line.contains(needle) {
            return;
        }
    }
    panic!("covd ended without saying `{needle}`");
}

fn hangup(child: &Child) {
    let status = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// SIGHUP reads the certificate again: a renewed one (here from another CA) is served to the
/// next connection; files that do not load leave the served certificate as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (Ca::new("old"), Ca::new("new"));
    let (cert, key) = old.issue_files(dir.path(), "server");
    let mut child = crate::cli::serve_in_memory()
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .env("COVD_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr: SocketAddr = loop {
        let line = lines.next().expect("covd said nothing").unwrap();
        if let Some(word) = line.split_whitespace().find(|w| w.starts_with("https://")) {
            break word.trim_start_matches("https://").parse().unwrap();
        }
    };
    client(addr, &old, None).list_runs(1).await.unwrap();

    let (renewed, renewed_key) = new.issue();
    std::fs::write(&cert, renewed).unwrap();
    std::fs::write(&key, renewed_key).unwrap();
    hangup(&child);
    wait_for_line(&mut lines, "TLS certificate reloaded");
    client(addr, &new, None).list_runs(1).await.unwrap();
    assert!(client(addr, &old, None).list_runs(1).await.is_err());

    std::fs::write(&cert, b"not a certificate").unwrap();
    hangup(&child);
    wait_for_line(&mut lines, "TLS certificate not reloaded");
    client(addr, &new, None).list_runs(1).await.unwrap();
    let _ = child.kill();
    let _ = child.wait();
}

/// A daemon whose certificate files do not load does not start, and says which file.
#[test]
fn a_certificate_that_does_not_load_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("server.pem");
    std::fs::write(&cert, b"nothing here").unwrap();
    let out = crate::cli::serve_in_memory()
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(dir.path().join("missing.key"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("server.pem"), "{said}");
}
