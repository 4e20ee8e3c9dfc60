//! What reaches a replica and what reaches the logs: a counting proxy between the coordinator
//! and the registry records the headers of every request the replica gets, so `X-Forwarded-*`
//! (and the absence of the client's credentials) are checked where they land; the access log
//! is checked for the passwords of right and wrong logins. (The process-level check of the
//! coordinator's own log output is in `coordinator/tests/serve.rs`.)

use std::future::Future;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use base64::Engine as _;
use shoal_tests::coordinator::{
    CoordinatorOptions, HashFormat, TestCoordinator, htpasswd_add, require_coordinator_tools,
};
use shoal_tests::http::push_blob;
use shoal_tests::{Proxy, Registry, RequestLog, wait_until};

const TEST_TIMEOUT: Duration = Duration::from_secs(120);
const PASSWORD: &str = "Right-Pw-6c1f0e";
const WRONG: &str = "Wrong-Pw-93ab2d";

async fn within(test: impl Future<Output = Result<()>>) -> Result<()> {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .context("test timed out")?
}

fn header<'a>(r: &'a RequestLog, name: &str) -> Option<&'a str> {
    r.headers.get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_sets_x_forwarded_headers_and_logs_no_password() -> Result<()> {
    within(async {
        require_coordinator_tools()?;
        let dir = tempfile::tempdir()?;
        let users = dir.path().join("htpasswd");
        htpasswd_add(&users, "alice", PASSWORD, HashFormat::Bcrypt)?;
        let registry = Registry::start().await?;
        let digest = push_blob(&registry.url(), "fwd/app", b"forwarded").await?;
        let proxy = Proxy::start(&registry.url()).await?;
        let mut opts = CoordinatorOptions::new(&[proxy.url()]);
        opts.htpasswd = Some(users);
        let c = TestCoordinator::start(opts).await?;
        let path = format!("/v2/fwd/app/blobs/{digest}");

        // Two clients on addresses of their own: HTTP/2 (the authority comes as `:authority`)
        // and HTTP/1.1 (as `Host`). The second also sends forwarding headers of its own.
        let h2_ip: IpAddr = "127.0.0.2".parse()?;
        let h1_ip: IpAddr = "127.0.0.3".parse()?;
        let h2 = c.client_from(h2_ip)?;
        let h1 = reqwest::Client::builder()
            .tls_backend_preconfigured(c.tls_client_config(&[b"http/1.1"])?)
            .http1_only()
            .local_address(h1_ip)
            .timeout(Duration::from_secs(30))
            .build()?;
        let r = h2
            .get(c.url(&path))
            .basic_auth("alice", Some(PASSWORD))
            .send()
            .await?;
        ensure!(r.status() == 200, "HTTP/2 GET: {}", r.status());
        ensure!(r.version() == reqwest::Version::HTTP_2);
        r.bytes().await?;
        let r = h1
            .get(c.url(&path))
            .basic_auth("alice", Some(PASSWORD))
            .header("x-forwarded-for", "192.0.2.7")
            .header("x-forwarded-proto", "http")
            .header("x-forwarded-host", "spoofed.example")
            .send()
            .await?;
        ensure!(r.status() == 200, "HTTP/1.1 GET: {}", r.status());
        ensure!(r.version() == reqwest::Version::HTTP_11);
        r.bytes().await?;

        let seen: Vec<RequestLog> = proxy
            .requests()
            .into_iter()
            .filter(|r| r.path == path)
            .collect();
        ensure!(seen.len() == 2, "{} GETs reached the replica", seen.len());
        let host = c.host_port();
        for (r, xff) in seen
            .iter()
            .zip([h2_ip.to_string(), format!("192.0.2.7, {h1_ip}")])
        {
            println!(
                "at the replica: X-Forwarded-For {:?}, -Proto {:?}, -Host {:?}",
                header(r, "x-forwarded-for"),
                header(r, "x-forwarded-proto"),
                header(r, "x-forwarded-host")
            );
            ensure!(
                header(r, "x-forwarded-for") == Some(xff.as_str()),
                "{:?}",
                r.headers
            );
            ensure!(
                header(r, "x-forwarded-proto") == Some("https"),
                "{:?}",
                r.headers
            );
            ensure!(
                header(r, "x-forwarded-host") == Some(host.as_str()),
                "{:?}",
                r.headers
            );
            ensure!(
                r.headers.get_all("x-forwarded-host").iter().count() == 1,
                "the client's X-Forwarded-Host went through: {:?}",
                r.headers
            );
            ensure!(
                r.headers.get("authorization").is_none(),
                "the client's credentials reached the replica"
            );
        }

        // Logins with the right password, a wrong one, and an unknown user.
        let wrong = h2
            .get(c.url("/v2/"))
            .basic_auth("alice", Some(WRONG))
            .send()
            .await?;
        ensure!(wrong.status() == 401, "wrong password: {}", wrong.status());
        let unknown = h1
            .get(c.url("/v2/"))
            .basic_auth("mallory", Some(WRONG))
            .send()
            .await?;
        ensure!(
            unknown.status() == 401,
            "unknown user: {}",
            unknown.status()
        );
        let right = h1
            .get(c.url("/v2/"))
            .basic_auth("alice", Some(PASSWORD))
            .send()
            .await?;
        ensure!(right.status() == 200, "right password: {}", right.status());
        // The last request's line is there (lines are written by a thread, in order).
        wait_until(
            Duration::from_secs(10),
            "the access log has every request",
            || async {
                c.access_log()
                    .iter()
                    .any(|l| l.contains("\"GET /v2/ HTTP/1.1\" 200"))
            },
        )
        .await?;
        let log = c.access_log().join("\n");
        println!("access log:\n{log}");
        let b64 = |user: &str, pw: &str| {
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"))
        };
        for secret in [
            PASSWORD.to_owned(),
            WRONG.to_owned(),
            b64("alice", PASSWORD),
            b64("alice", WRONG),
            b64("mallory", WRONG),
        ] {
            ensure!(!log.contains(&secret), "the access log holds {secret}");
        }
        // The client address is what is logged.
        ensure!(
            log.lines().any(|l| l.starts_with("127.0.0.2 - alice ")),
            "{log}"
        );
        ensure!(
            log.lines().any(|l| l.starts_with("127.0.0.3 - alice ")),
            "{log}"
        );
        c.stop().await
    })
    .await
}
