//! `shoal-coordinator serve` as a real process: a bad configuration exits 2 with one clear
//! message, `--check-config` accepts the deploy example, SIGHUP reloads the certificate
//! (file polling off, so only the signal can have done it), SIGTERM drains and exits 0, and
//! neither its log output (at trace level) nor its access log shows a password.

mod common;

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

/// A TLS connection to `addr` (server name `localhost`) trusting only the CA file `ca`.
async fn tls_connect(addr: &str, ca: &Path) -> Option<tokio_rustls::client::TlsStream<TcpStream>> {
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
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").ok()?, tcp)
        .await
        .ok()
}

/// The SHA-256 of the leaf certificate served on `addr`, after a `GET /_ping` answered 200.
async fn served_fingerprint(addr: &str, ca: &Path) -> Option<String> {
    let mut tls = tls_connect(addr, ca).await?;
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

/// Sends one HTTP/1.1 request over TLS to `addr` (trusting `ca`) and returns the response
/// as text, or `None` if the exchange failed.
async fn tls_exchange(addr: &str, ca: &Path, request: &str) -> Option<String> {
    let mut tls = tls_connect(addr, ca).await?;
    tls.write_all(request.as_bytes()).await.ok()?;
    let mut resp = Vec::new();
    let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut resp)).await;
    Some(String::from_utf8_lossy(&resp).into_owned())
}

/// A replica that answers every request with `200 {}` and closes the connection.
async fn tiny_replica() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
                    .await;
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_serve_logs_no_password_even_at_trace_level() {
    use base64::Engine as _;
    const ALICE_PW: &str = "Alice-Right-5d02c1";
    const BOB_PW: &str = "Bob-Right-a7e4b9";
    const WRONG_PW: &str = "Wrong-Guess-39f1aa";
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("tls");
    let out = Command::new(BIN)
        .args(["cert", "init", "--host", "localhost", "--out"])
        .arg(&tls)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(
        dir.path().join("htpasswd"),
        format!(
            "{}\n{}\n",
            common::make_line(&["-B"], "alice", ALICE_PW),
            common::make_line(&["-m"], "bob", BOB_PW)
        ),
    )
    .unwrap();
    let replica = tiny_replica().await;
    let (https, metrics) = (free_port(), free_port());
    let config = dir.path().join("coordinator.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{https}\"\ntls_cert = \"tls/server.crt\"\n\
             tls_key = \"tls/server.key\"\ndrain_timeout = \"5s\"\n\
             [metrics]\nlisten = \"127.0.0.1:{metrics}\"\n\
             [log]\nlevel = \"trace\"\naccess_log = \"access.log\"\n\
             [auth]\nhtpasswd = \"htpasswd\"\n\
             [[registry]]\nhost = \"registry.test\"\ninsecure_http = true\n\
             [[registry.replica]]\nurl = \"http://127.0.0.1:{replica}\"\n"
        ),
    )
    .unwrap();
    let stderr = dir.path().join("stderr.log");
    let child = Command::new(BIN)
        .args(["serve", "-c"])
        .arg(&config)
        // The config's level applies, whatever the test runner's environment says.
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let mut proc = Proc(child);
    let addr = format!("127.0.0.1:{https}");
    let ca = tls.join("ca.crt");
    let log = || std::fs::read_to_string(&stderr).unwrap_or_default();
    let request = |path: &str, user: &str, pw: &str| {
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"));
        format!(
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Basic {basic}\r\nConnection: close\r\n\r\n"
        )
    };
    let deadline = Instant::now() + WAIT;
    loop {
        let ping = "GET /_ping HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
        if tls_exchange(&addr, &ca, ping)
            .await
            .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
        {
            break;
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
    }

    let blob = format!("/v2/team/app/blobs/sha256:{}", "a".repeat(64));
    let cases = [
        ("/v2/", "alice", ALICE_PW, "200"),
        (blob.as_str(), "alice", ALICE_PW, "200"),
        ("/v2/", "alice", WRONG_PW, "401"),
        ("/v2/", "bob", BOB_PW, "200"),
        ("/v2/", "bob", WRONG_PW, "401"),
        ("/v2/", "mallory", WRONG_PW, "401"),
    ];
    for (path, user, pw, want) in cases {
        let resp = tls_exchange(&addr, &ca, &request(path, user, pw))
            .await
            .unwrap_or_default();
        assert!(
            resp.starts_with(&format!("HTTP/1.1 {want}")),
            "{user} on {path}: {resp}\n{}",
            log()
        );
    }

    // SIGTERM flushes the access log before the process exits.
    signal(&proc.0, "TERM");
    let deadline = Instant::now() + WAIT;
    while proc.0.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "SIGTERM did not stop serve:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = log();
    let access = std::fs::read_to_string(dir.path().join("access.log")).unwrap();
    // The checks below mean something only if the requests were logged, in detail.
    assert!(log.contains("authentication failed"), "{log}");
    assert!(log.contains("TRACE"), "not logged at trace level:\n{log}");
    assert_eq!(
        access.lines().filter(|l| l.contains("\"GET /v2/")).count(),
        6,
        "{access}"
    );
    let b64 = |user: &str, pw: &str| {
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"))
    };
    for secret in [
        ALICE_PW.to_owned(),
        BOB_PW.to_owned(),
        WRONG_PW.to_owned(),
        b64("alice", ALICE_PW),
        b64("alice", WRONG_PW),
        b64("bob", BOB_PW),
        b64("bob", WRONG_PW),
        b64("mallory", WRONG_PW),
    ] {
        assert!(!log.contains(&secret), "stderr holds {secret}");
        assert!(!access.contains(&secret), "the access log holds {secret}");
    }
    println!(
        "{} lines on stderr at trace level and {} access log lines: no password, no Basic value",
        log.lines().count(),
        access.lines().count()
    );
}
