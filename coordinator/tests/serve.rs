//! `shoal-coordinator serve` as a real process: a bad configuration exits 2 with one clear
//! message, `--check-config` accepts the deploy example, SIGHUP reloads the certificate
//! (file polling off, so only the signal can have done it), and SIGTERM drains and exits 0.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_shoal-coordinator");
const WAIT: Duration = Duration::from_secs(20);

fn free_port() -> u16 {
    // Bound and released: another process could take it in between, which a test on a
    // developer machine tolerates; the coordinator binds from its config file.
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Kills the process if the test ends early.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -{sig} failed");
}

#[test]
fn coordinator_serve_bad_config_exits_2_with_one_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("bogus = 1\n", "unknown field"),
        (
            "[server]\ntls_cert = \"c\"\ntls_key = \"k\"\n[auth]\nhtpasswd = \"h\"\n",
            "no upstream registry configured",
        ),
    ];
    for (text, want) in cases {
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, text).unwrap();
        let out = Command::new(BIN)
            .args(["serve", "-c"])
            .arg(&file)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{text:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.starts_with("shoal-coordinator: "), "{stderr}");
        assert!(stderr.contains(want), "{stderr}");
        assert!(out.stdout.is_empty());
    }
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/coordinator.toml");
    let out = Command::new(BIN)
        .args(["serve", "--check-config", "-c"])
        .arg(&example)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration is valid"));
}

/// The SHA-256 of the leaf certificate served on `addr`, after a `GET /_ping` answered 200.
async fn served_fingerprint(addr: &str, ca: &Path) -> Option<String> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).ok()? {
        roots.add(cert.ok()?).ok()?;
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .ok()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.ok()?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").ok()?, tcp)
        .await
        .ok()?;
    let leaf = tls.get_ref().1.peer_certificates()?[0].clone();
    tls.write_all(b"GET /_ping HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut resp = Vec::new();
    let _ = tls.read_to_end(&mut resp).await;
    String::from_utf8_lossy(&resp)
        .starts_with("HTTP/1.1 200")
        .then(|| hex::encode(Sha256::digest(leaf.as_ref())))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_serve_reloads_on_sighup_and_drains_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("tls");
    let cert_init = |extra: &[&str]| {
        let out = Command::new(BIN)
            .args([
                "cert",
                "init",
                "--host",
                "localhost",
                "--ip",
                "127.0.0.1",
                "--out",
            ])
            .arg(&tls)
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    cert_init(&[]);
    let (https, metrics, nobody) = (free_port(), free_port(), free_port());
    let config = dir.path().join("coordinator.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{https}\"\ntls_cert = \"tls/server.crt\"\n\
             tls_key = \"tls/server.key\"\nreload_poll = \"0s\"\ndrain_timeout = \"5s\"\n\
             [metrics]\nlisten = \"127.0.0.1:{metrics}\"\n\
             [log]\naccess_log = \"access.log\"\n\
             [auth]\ninsecure_no_auth = true\n\
             [[registry]]\nhost = \"registry.test\"\ninsecure_http = true\n\
             [[registry.replica]]\nurl = \"http://127.0.0.1:{nobody}\"\n"
        ),
    )
    .unwrap();
    let stderr = dir.path().join("stderr.log");
    let child = Command::new(BIN)
        .args(["serve", "-c"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let mut proc = Proc(child);
    let addr = format!("127.0.0.1:{https}");
    let ca = tls.join("ca.crt");
    let log = || std::fs::read_to_string(&stderr).unwrap_or_default();

    let deadline = Instant::now() + WAIT;
    let first = loop {
        if let Some(fp) = served_fingerprint(&addr, &ca).await {
            break fp;
        }
        assert!(
            proc.0.try_wait().unwrap().is_none(),
            "serve exited:\n{}",
            log()
        );
        assert!(
            Instant::now() < deadline,
            "serve did not answer:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    // A renewed certificate (same CA) is served only after SIGHUP: polling is off.
    cert_init(&["--force", "--reuse-ca"]);
    assert_eq!(
        served_fingerprint(&addr, &ca).await.as_deref(),
        Some(first.as_str())
    );
    signal(&proc.0, "HUP");
    let deadline = Instant::now() + WAIT;
    loop {
        match served_fingerprint(&addr, &ca).await {
            Some(fp) if fp != first => break,
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not reload:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    signal(&proc.0, "TERM");
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = proc.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "SIGTERM did not stop serve:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit {status}:\n{}", log());
    let log = log();
    assert!(log.contains("tls certificate reloaded"), "{log}");
    assert!(log.contains("coordinator stopped"), "{log}");
    // The access log saw the pings, flushed before exit.
    let access = std::fs::read_to_string(dir.path().join("access.log")).unwrap();
    assert!(access.contains("\"GET /_ping HTTP/1.1\" 200"), "{access}");
}
