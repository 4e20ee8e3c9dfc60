//! TLS fixtures for upstream tests: a CA and a server certificate for 127.0.0.1 made with
//! rcgen (through `shoal-coordinator cert init`), rustls client configs that trust it, and a
//! listener that accepts TCP connections and never says a word (a replica whose TLS handshake
//! stalls).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result};
use rustls_pki_types::pem::PemObject;
use shoal_coordinator::certs::{CertInitOptions, cert_init};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A fresh CA and a server certificate for `localhost` and 127.0.0.1, as PEM files in a temp
/// dir (removed on drop).
#[derive(Debug)]
pub struct TestCerts {
    dir: TempDir,
    ca_pem: Vec<u8>,
}

impl TestCerts {
    pub fn generate() -> Result<TestCerts> {
        let dir = tempfile::Builder::new().prefix("shoal-certs-").tempdir()?;
        cert_init(&CertInitOptions {
            hosts: vec!["localhost".into()],
            ips: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
            out_dir: dir.path().join("tls"),
            server_days: 30,
            ca_days: 30,
            force: false,
            reuse_ca: false,
        })
        .context("cert init")?;
        let ca_pem = std::fs::read(dir.path().join("tls/ca.crt"))?;
        // skopeo's --*-cert-dir takes any *.key next to ca.crt for a client key.
        std::fs::create_dir(dir.path().join("client"))?;
        std::fs::write(dir.path().join("client/ca.crt"), &ca_pem)?;
        Ok(TestCerts { dir, ca_pem })
    }

    /// The CA certificate (PEM file), for a coordinator pool's `ca_file`.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("tls/ca.crt")
    }

    /// The server certificate chain (PEM file).
    pub fn cert_file(&self) -> PathBuf {
        self.dir.path().join("tls/server.crt")
    }

    /// The server key (PEM file).
    pub fn key_file(&self) -> PathBuf {
        self.dir.path().join("tls/server.key")
    }

    /// A directory with only `ca.crt`, for skopeo's `--src-cert-dir` / `--dest-cert-dir`.
    pub fn client_cert_dir(&self) -> PathBuf {
        self.dir.path().join("client")
    }

    pub fn ca_pem(&self) -> &[u8] {
        &self.ca_pem
    }
}

/// A rustls client configuration (ring provider) trusting only the CA certificates in
/// `ca_pem`, offering the given ALPN protocols.
pub fn client_config(ca_pem: &[u8], alpn: &[&[u8]]) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert?)?;
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}

/// A listener on 127.0.0.1 that accepts connections, keeps them open and never sends or reads
/// a byte: to a TLS client, a server whose handshake never completes. Dropping it closes the
/// listener and every connection.
#[derive(Debug)]
pub struct SilentListener {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl SilentListener {
    pub async fn start() -> Result<SilentListener> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            // The task owns the connections, so aborting it closes them.
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::AcqRel);
                held.push(stream);
            }
        });
        Ok(SilentListener {
            addr,
            accepted,
            task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://127.0.0.1:PORT`: what a client that expects TLS there is configured with.
    pub fn https_url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Acquire)
    }
}

impl Drop for SilentListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}
