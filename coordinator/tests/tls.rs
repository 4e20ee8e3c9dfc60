//! `cert init` output served by `tls.rs`: handshakes by name and by IP, a client trusting
//! another CA, and certificate reload without dropping connections.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use shoal_coordinator::certs::{CertAuthority, CertInitOptions, cert_init};
use shoal_coordinator::tls::{ReloadingCertResolver, TlsError, provider, server_config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_rustls::client::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

const HOST: &str = "docker.example.test";
const WAIT: Duration = Duration::from_secs(10);

fn init(dir: &Path, force: bool, reuse_ca: bool) {
    cert_init(&CertInitOptions {
        hosts: vec![HOST.into()],
        ips: vec!["127.0.0.1".parse().unwrap()],
        out_dir: dir.to_owned(),
        server_days: 30,
        ca_days: 60,
        force,
        reuse_ca,
    })
    .unwrap();
}

/// An echo server on 127.0.0.1:0 using the resolver; runs until the handle is dropped.
struct Server {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(resolver: Arc<ReloadingCertResolver>) -> Server {
    let acceptor = TlsAcceptor::from(server_config(resolver).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // Handshake failures are what some tests expect; just drop the connection.
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let (mut r, mut w) = tokio::io::split(tls);
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Server { addr, task }
}

fn client_trusting(ca_pem_file: &Path) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(ca_pem_file).unwrap())
        .unwrap();
    client_with_roots(roots)
}

fn client_with_roots(roots: RootCertStore) -> TlsConnector {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // A resumed session shows the certificate of the session it resumes; full handshakes
    // show what the server serves now, which is what these tests look at.
    config.resumption = rustls::client::Resumption::disabled();
    TlsConnector::from(Arc::new(config))
}

async fn connect(
    connector: &TlsConnector,
    addr: SocketAddr,
    name: ServerName<'static>,
) -> std::io::Result<TlsStream<TcpStream>> {
    timeout(WAIT, async {
        let tcp = TcpStream::connect(addr).await?;
        connector.connect(name, tcp).await
    })
    .await
    .expect("handshake finishes in time")
}

async fn echo(stream: &mut TlsStream<TcpStream>, msg: &[u8]) {
    timeout(WAIT, async {
        stream.write_all(msg).await.unwrap();
        let mut buf = vec![0; msg.len()];
        stream.read_exact(&mut buf).await.unwrap();
        assert_eq!(buf, msg);
    })
    .await
    .expect("echo finishes in time");
}

fn peer_leaf(stream: &TlsStream<TcpStream>) -> Vec<u8> {
    stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn file_leaf(path: &Path) -> Vec<u8> {
    CertificateDer::pem_file_iter(path)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .to_vec()
}

fn name(s: &str) -> ServerName<'static> {
    ServerName::try_from(s.to_owned()).unwrap()
}

fn resolver(dir: &Path) -> Arc<ReloadingCertResolver> {
    Arc::new(
        ReloadingCertResolver::load(dir.join("server.crt"), dir.join("server.key"), provider())
            .unwrap(),
    )
}

#[tokio::test]
async fn handshake_by_name_and_by_ip() {
    let dir = tempfile::tempdir().unwrap();
    init(dir.path(), false, false);
    let server = serve(resolver(dir.path())).await;
    let client = client_trusting(&dir.path().join("ca.crt"));

    let mut by_name = connect(&client, server.addr, name(HOST)).await.unwrap();
    echo(&mut by_name, b"hello by name").await;
    assert_eq!(by_name.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));

    let ip: IpAddr = "127.0.0.1".parse().unwrap();
    let mut by_ip = connect(&client, server.addr, ServerName::from(ip))
        .await
        .unwrap();
    echo(&mut by_ip, b"hello by ip").await;

    // A name the certificate does not carry is refused.
    let err = connect(&client, server.addr, name("other.example.test"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("certificate"), "{err}");
}

#[tokio::test]
async fn client_trusting_another_ca_fails() {
    let dir = tempfile::tempdir().unwrap();
    init(dir.path(), false, false);
    let server = serve(resolver(dir.path())).await;

    let other = CertAuthority::generate("elsewhere", 30).unwrap();
    let mut roots = RootCertStore::empty();
    roots.add(other.cert_der().clone()).unwrap();
    let client = client_with_roots(roots);
    let err = connect(&client, server.addr, name(HOST)).await.unwrap_err();
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");
}

#[tokio::test]
async fn reload_serves_new_certificate_and_keeps_old_connections() {
    let dir = tempfile::tempdir().unwrap();
    init(dir.path(), false, false);
    let resolver = resolver(dir.path());
    let server = serve(resolver.clone()).await;
    let client = client_trusting(&dir.path().join("ca.crt"));
    let server_crt = dir.path().join("server.crt");

    let old_leaf = file_leaf(&server_crt);
    let mut before = connect(&client, server.addr, name(HOST)).await.unwrap();
    echo(&mut before, b"before").await;
    assert_eq!(peer_leaf(&before), old_leaf);

    // Renew with the same CA (new key, new serial), then reload.
    init(dir.path(), true, true);
    let new_leaf = file_leaf(&server_crt);
    assert_ne!(new_leaf, old_leaf);
    let summary = resolver.reload().unwrap();
    assert_eq!(summary.chain_len, 2);

    let mut after = connect(&client, server.addr, name(HOST)).await.unwrap();
    echo(&mut after, b"after").await;
    assert_eq!(peer_leaf(&after), new_leaf);
    // The connection made before the reload still works.
    echo(&mut before, b"still here").await;
}

#[tokio::test]
async fn broken_files_keep_the_previous_certificate() {
    let dir = tempfile::tempdir().unwrap();
    init(dir.path(), false, false);
    let resolver = resolver(dir.path());
    let server = serve(resolver.clone()).await;
    let client = client_trusting(&dir.path().join("ca.crt"));
    let served = file_leaf(&dir.path().join("server.crt"));
    let fingerprint = resolver.summary().fingerprint;

    // A renewal caught half way: new key, old certificate.
    let spare = tempfile::tempdir().unwrap();
    init(spare.path(), false, false);
    std::fs::copy(
        spare.path().join("server.key"),
        dir.path().join("server.key"),
    )
    .unwrap();
    assert!(matches!(resolver.reload(), Err(TlsError::Unusable { .. })));

    std::fs::write(dir.path().join("server.crt"), "not a certificate\n").unwrap();
    assert!(matches!(
        resolver.reload(),
        Err(TlsError::NoCertificate { .. })
    ));
    std::fs::write(dir.path().join("server.key"), "").unwrap();
    std::fs::copy(
        spare.path().join("server.crt"),
        dir.path().join("server.crt"),
    )
    .unwrap();
    assert!(matches!(resolver.reload(), Err(TlsError::NoKey { .. })));
    std::fs::remove_file(dir.path().join("server.key")).unwrap();
    let err = resolver.reload().unwrap_err();
    assert!(matches!(err, TlsError::Read { .. }), "{err}");

    assert_eq!(resolver.summary().fingerprint, fingerprint);
    let mut conn = connect(&client, server.addr, name(HOST)).await.unwrap();
    echo(&mut conn, b"old cert").await;
    assert_eq!(peer_leaf(&conn), served);
}

#[test]
fn key_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tls");
    init(&out, false, false);
    let mode = |f: &str| std::fs::metadata(out.join(f)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("ca.key"), 0o600);
    assert_eq!(mode("server.key"), 0o600);
    assert_eq!(mode("ca.crt"), 0o644);
    assert_eq!(mode("server.crt"), 0o644);
    assert_eq!(
        std::fs::metadata(&out).unwrap().permissions().mode() & 0o777,
        0o700
    );
}
