//! The coordinator's front door, end to end: TLS with the CA from `cert init`, htpasswd files
//! of all three formats made by the real `htpasswd` tool, skopeo pushing and pulling, and the
//! answers `docker login` and friends rely on. The upstream replicas require their own
//! (different) credentials, which only the coordinator has: client credentials never reach
//! them, or every request here would fail.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use shoal_proto::api::{ErrorBody, ErrorCode};
use shoal_tests::coordinator::{
    CoordinatorOptions, HashFormat, TestCoordinator, htpasswd_add, require_coordinator_tools,
};
use shoal_tests::{CopyOptions, ImageSpec, Registry, Skopeo, TestImage, verify_layout};

const TEST_TIMEOUT: Duration = Duration::from_secs(120);

async fn within(test: impl Future<Output = Result<()>>) -> Result<()> {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .context("test timed out")?
}

/// Two replicas sharing storage and secret, requiring `shoal:upstream-pw` (bcrypt: the only
/// format Distribution reads).
async fn protected_replicas(dir: &Path) -> Result<(Registry, Registry)> {
    let upstream_users = dir.join("upstream.htpasswd");
    htpasswd_add(&upstream_users, "shoal", "upstream-pw", HashFormat::Bcrypt)?;
    let a = Registry::builder()
        .htpasswd(&upstream_users)
        .start()
        .await?;
    let b = a.start_replica().await?;
    Ok((a, b))
}

/// Front-door users: alice (bcrypt), bob (APR1-MD5), carol (SHA1), reader (bcrypt).
fn front_door_users(dir: &Path) -> Result<std::path::PathBuf> {
    let file = dir.join("users.htpasswd");
    htpasswd_add(&file, "alice", "alice-pw", HashFormat::Bcrypt)?;
    htpasswd_add(&file, "bob", "bob-pw", HashFormat::Apr1)?;
    htpasswd_add(&file, "carol", "carol-pw", HashFormat::Sha1)?;
    htpasswd_add(&file, "reader", "reader-pw", HashFormat::Bcrypt)?;
    let text = std::fs::read_to_string(&file)?;
    ensure!(text.contains("alice:$2y$"), "{text}");
    ensure!(text.contains("bob:$apr1$"), "{text}");
    ensure!(text.contains("carol:{SHA}"), "{text}");
    Ok(file)
}

const RULES: &str = r#"
[[access]]
users = ["alice", "bob", "carol"]
repositories = ["team/**"]
actions = ["pull", "push", "delete"]

[[access]]
users = ["reader"]
repositories = ["team/**"]
actions = ["pull"]
"#;

async fn coordinator(
    dir: &Path,
    replicas: &[&Registry],
    extra_auth: &str,
) -> Result<TestCoordinator> {
    coordinator_with(dir, replicas, extra_auth, "").await
}

async fn coordinator_with(
    dir: &Path,
    replicas: &[&Registry],
    extra_auth: &str,
    extra_server: &str,
) -> Result<TestCoordinator> {
    let urls: Vec<String> = replicas.iter().map(|r| r.url()).collect();
    let mut opts = CoordinatorOptions::new(&urls);
    opts.htpasswd = Some(front_door_users(dir)?);
    opts.upstream_credentials = Some(("shoal".into(), "upstream-pw".into()));
    opts.access_toml = RULES.into();
    opts.auth_toml = extra_auth.into();
    opts.server_toml = extra_server.into();
    TestCoordinator::start(opts).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn coordinator_push_and_pull_over_tls_with_every_htpasswd_format() -> Result<()> {
    within(async {
        require_coordinator_tools()?;
        let dir = tempfile::tempdir()?;
        let (a, b) = protected_replicas(dir.path()).await?;
        let c = coordinator(dir.path(), &[&a, &b], "").await?;

        for (i, (user, pw)) in [
            ("alice", "alice-pw"),
            ("bob", "bob-pw"),
            ("carol", "carol-pw"),
        ]
        .into_iter()
        .enumerate()
        {
            let image = TestImage::generate(
                &ImageSpec::new(vec![300 << 10, 700 << 10], i as u64 + 10),
                "v1",
            )?;
            let opts = CopyOptions::default()
                .tls(c.cert_dir())
                .creds(format!("{user}:{pw}"));
            let reference = format!("{}/team/{user}:v1", c.host_port());
            Skopeo::push_image(&image, &reference, &opts)
                .await
                .with_context(|| format!("push as {user}"))?;
            let out = tempfile::tempdir()?;
            Skopeo::pull(&reference, &out.path().join("oci"), &opts)
                .await
                .with_context(|| format!("pull as {user}"))?;
            verify_layout(&out.path().join("oci"), &image)?;
        }
        // A pull-only user pulls what alice pushed.
        let out = tempfile::tempdir()?;
        let opts = CopyOptions::default()
            .tls(c.cert_dir())
            .creds("reader:reader-pw");
        Skopeo::pull(
            &format!("{}/team/alice:v1", c.host_port()),
            &out.path().join("oci"),
            &opts,
        )
        .await?;

        // Catalog, tags and delete. A repository outside every rule, pushed straight to a
        // replica, stays out of the catalog users see.
        let secret = TestImage::generate(&ImageSpec::new(vec![1000], 99), "v1")?;
        let upstream = CopyOptions::default().creds("shoal:upstream-pw");
        Skopeo::push_image(
            &secret,
            &format!("{}/other/secret:v1", a.host_port()),
            &upstream,
        )
        .await?;
        let http = c.client()?;
        let get = |path: &str, user: &'static str, pw: &'static str| {
            http.get(c.url(path)).basic_auth(user, Some(pw)).send()
        };
        let catalog: serde_json::Value = serde_json::from_slice(
            &get("/v2/_catalog", "alice", "alice-pw")
                .await?
                .bytes()
                .await?,
        )?;
        let repos = catalog["repositories"].as_array().context("catalog")?;
        ensure!(
            repos.len() == 3
                && repos
                    .iter()
                    .all(|r| r.as_str().is_some_and(|r| r.starts_with("team/"))),
            "catalog as alice: {catalog}"
        );
        let tags = get("/v2/team/alice/tags/list", "reader", "reader-pw").await?;
        ensure!(tags.status() == 200);
        let tags: serde_json::Value = serde_json::from_slice(&tags.bytes().await?)?;
        ensure!(tags["tags"] == serde_json::json!(["v1"]), "{tags}");
        let manifest = c.url("/v2/team/carol/manifests/v1");
        let oci = "application/vnd.oci.image.manifest.v1+json";
        let r = http
            .get(&manifest)
            .basic_auth("carol", Some("carol-pw"))
            .header("accept", oci)
            .send()
            .await?;
        ensure!(r.status() == 200, "manifest by tag: {}", r.status());
        let digest = r
            .headers()
            .get("docker-content-digest")
            .context("no Docker-Content-Digest")?
            .to_str()?
            .to_owned();
        let by_digest = c.url(&format!("/v2/team/carol/manifests/{digest}"));
        let r = http
            .delete(&by_digest)
            .basic_auth("reader", Some("reader-pw"))
            .send()
            .await?;
        ensure!(
            r.status() == 403,
            "delete as a pull-only user: {}",
            r.status()
        );
        let r = http
            .delete(&by_digest)
            .basic_auth("carol", Some("carol-pw"))
            .send()
            .await?;
        ensure!(r.status() == 202, "delete as carol: {}", r.status());
        let r = http
            .get(&by_digest)
            .basic_auth("carol", Some("carol-pw"))
            .header("accept", oci)
            .send()
            .await?;
        ensure!(r.status() == 404, "deleted manifest: {}", r.status());

        // Both replicas served (round robin), and every request carried the coordinator's
        // credentials: the replicas logged no 401 except for auth discovery on /v2/.
        for r in [&a, &b] {
            let log = r.access_log();
            ensure!(
                log.iter().any(|e| e.path.contains("/team/")),
                "a replica served nothing"
            );
            let refused: Vec<_> = log
                .iter()
                .filter(|e| e.status == 401 && e.path != "/v2/")
                .collect();
            ensure!(refused.is_empty(), "replica refused requests: {refused:?}");
        }
        // The access log names user, request and upstream.
        let lines = c.access_log();
        ensure!(
            lines
                .iter()
                .any(|l| l.contains(" - carol [")
                    && l.contains("\"PUT /v2/team/carol/manifests/v1 ")),
            "no access log line for carol's manifest push in {lines:#?}"
        );
        c.stop().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_answers_401_403_429_and_ping_like_a_registry() -> Result<()> {
    within(async {
        require_coordinator_tools()?;
        let dir = tempfile::tempdir()?;
        let (a, b) = protected_replicas(dir.path()).await?;
        let c = coordinator_with(
            dir.path(),
            &[&a, &b],
            "max_failures = 3\nfailure_window = \"60s\"",
            "external_url = \"https://registry.example.test\"",
        )
        .await?;
        let http = c.client()?;
        let api = "registry/2.0";

        // Ping endpoints: no credentials needed.
        for path in ["/_ping", "/v1/_ping", "/healthz"] {
            let r = http.get(c.url(path)).send().await?;
            ensure!(r.status() == 200, "{path}: {}", r.status());
            ensure!(r.headers()["docker-distribution-api-version"] == api);
        }

        // No credentials on /v2/: the Basic challenge docker login answers.
        let r = http.get(c.url("/v2/")).send().await?;
        ensure!(r.status() == 401, "{}", r.status());
        let challenge = r.headers()["www-authenticate"].to_str()?.to_owned();
        ensure!(challenge.starts_with("Basic realm=\""), "{challenge}");
        ensure!(r.headers()["docker-distribution-api-version"] == api);
        let body: ErrorBody = serde_json::from_slice(&r.bytes().await?)?;
        ensure!(body.errors[0].code == ErrorCode::Unauthorized);

        // Right password: 200 from the upstream's /v2/ (answered with the coordinator's own
        // credentials), over HTTP/2 as negotiated by ALPN.
        let r = http
            .get(c.url("/v2/"))
            .basic_auth("bob", Some("bob-pw"))
            .send()
            .await?;
        ensure!(r.status() == 200, "{}", r.status());
        ensure!(r.version() == reqwest::Version::HTTP_2, "{:?}", r.version());
        ensure!(r.headers()["docker-distribution-api-version"] == api);

        // Upload sessions point at the public URL, not at a replica.
        let r = http
            .post(c.url("/v2/team/app/blobs/uploads/"))
            .basic_auth("alice", Some("alice-pw"))
            .header("content-length", "0")
            .send()
            .await?;
        ensure!(r.status() == 202, "{}", r.status());
        let location = r.headers()["location"].to_str()?;
        ensure!(
            location.starts_with("https://registry.example.test/v2/team/app/blobs/uploads/"),
            "{location}"
        );

        // Pull-only user pushing: 403 DENIED, not 401.
        let r = http
            .post(c.url("/v2/team/app/blobs/uploads/"))
            .basic_auth("reader", Some("reader-pw"))
            .header("content-length", "0")
            .send()
            .await?;
        ensure!(r.status() == 403, "{}", r.status());
        let body: ErrorBody = serde_json::from_slice(&r.bytes().await?)?;
        ensure!(body.errors[0].code == ErrorCode::Denied, "{body:?}");
        // ...and with skopeo.
        let image = TestImage::generate(&ImageSpec::new(vec![1000], 3), "v1")?;
        let opts = CopyOptions::default()
            .tls(c.cert_dir())
            .creds("reader:reader-pw");
        let err = Skopeo::push_image(&image, &format!("{}/team/app:v1", c.host_port()), &opts)
            .await
            .expect_err("a pull-only user cannot push");
        ensure!(format!("{err:#}").contains("denied"), "{err:#}");
        // Outside any rule: denied for pull too.
        let r = http
            .get(c.url("/v2/other/app/tags/list"))
            .basic_auth("alice", Some("alice-pw"))
            .send()
            .await?;
        ensure!(r.status() == 403, "{}", r.status());

        // Wrong password: 401; after max_failures, 429 with Retry-After, even for a right one.
        for _ in 0..3 {
            let r = http
                .get(c.url("/v2/"))
                .basic_auth("alice", Some("wrong"))
                .send()
                .await?;
            ensure!(r.status() == 401, "{}", r.status());
        }
        let r = http
            .get(c.url("/v2/"))
            .basic_auth("alice", Some("alice-pw"))
            .send()
            .await?;
        ensure!(r.status() == 429, "{}", r.status());
        let retry: u64 = r.headers()["retry-after"].to_str()?.parse()?;
        ensure!((1..=60).contains(&retry), "{retry}");
        let failures = c
            .metric_sum("shoal_coordinator_auth_failures_total", &[])
            .await?;
        ensure!(failures >= 5.0, "auth failures counted: {failures}");
        c.stop().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn coordinator_reloads_access_rules_from_its_config_file() -> Result<()> {
    within(async {
        require_coordinator_tools()?;
        let dir = tempfile::tempdir()?;
        let (a, _b) = protected_replicas(dir.path()).await?;
        let c = coordinator(dir.path(), &[&a], "").await?;
        let http = c.client()?;
        let status = || {
            let (http, url) = (http.clone(), c.url("/v2/ops/tool/tags/list"));
            async move {
                http.get(url)
                    .basic_auth("reader", Some("reader-pw"))
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0)
            }
        };
        ensure!(status().await == 403, "reader may not read ops/* yet");

        // A rule added to the file: in force without a restart (SIGHUP here; the file is
        // also polled). The repository does not exist, so allowed means the registry's 404.
        let config = c.config_path();
        let original = std::fs::read_to_string(&config)?;
        std::fs::write(
            &config,
            format!("{original}\n[[access]]\nusers = [\"reader\"]\nrepositories = [\"ops/**\"]\nactions = [\"pull\"]\n"),
        )?;
        c.reload();
        shoal_tests::wait_until(Duration::from_secs(10), "the new rule is in force", || async {
            status().await == 404
        })
        .await?;

        // A file that does not load leaves the rules as they were.
        std::fs::write(&config, format!("{original}\n[[access]]\nusers = 5\n"))?;
        c.reload();
        let failed = r#"file="access_rules",result="error""#;
        shoal_tests::wait_until(
            Duration::from_secs(10),
            "the broken config file was rejected",
            || async {
                c.metric_sum("shoal_coordinator_reloads_total", &[failed])
                    .await
                    .unwrap_or(0.0)
                    >= 1.0
            },
        )
        .await?;
        ensure!(status().await == 404, "a broken config file dropped the rules in force");
        c.stop().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_reloads_users_and_certificate_without_restart() -> Result<()> {
    within(async {
        require_coordinator_tools()?;
        let dir = tempfile::tempdir()?;
        let (a, b) = protected_replicas(dir.path()).await?;
        let c = coordinator(dir.path(), &[&a, &b], "").await?;
        let http = c.client()?;
        let users = dir.path().join("users.htpasswd");
        let status = |user: &'static str, pw: &'static str| {
            let http = http.clone();
            let url = c.url("/v2/");
            async move {
                http.get(url)
                    .basic_auth(user, Some(pw))
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0)
            }
        };
        ensure!(status("dave", "dave-pw").await == 401);
        // A new user appears without a restart (file poll).
        htpasswd_add(&users, "dave", "dave-pw", HashFormat::Apr1)?;
        shoal_tests::wait_until(Duration::from_secs(10), "dave is accepted", || async {
            status("dave", "dave-pw").await == 200
        })
        .await?;
        // A broken file keeps the previous one.
        std::fs::write(&users, "dave:plaintext-password\n")?;
        c.reload();
        let failed = r#"file="htpasswd",result="error""#;
        shoal_tests::wait_until(
            Duration::from_secs(10),
            "the broken file was rejected",
            || async {
                c.metric_sum("shoal_coordinator_reloads_total", &[failed])
                    .await
                    .unwrap_or(0.0)
                    >= 1.0
            },
        )
        .await?;
        ensure!(
            status("dave", "dave-pw").await == 200,
            "a broken htpasswd file replaced the good one"
        );

        // A new certificate from the same CA is served to new connections.
        let fingerprint = |der: &[u8]| {
            use sha2::Digest as _;
            hex::encode(sha2::Sha256::digest(der))
        };
        let served = || async {
            let cfg = std::sync::Arc::new(c.tls_client_config(&[b"http/1.1"]).unwrap());
            let tcp = tokio::net::TcpStream::connect(c.https_addr())
                .await
                .unwrap();
            let tls = tokio_rustls::TlsConnector::from(cfg)
                .connect(
                    rustls_pki_types::ServerName::try_from("localhost").unwrap(),
                    tcp,
                )
                .await
                .unwrap();
            fingerprint(tls.get_ref().1.peer_certificates().unwrap()[0].as_ref())
        };
        let before = served().await;
        shoal_coordinator::certs::cert_init(&shoal_coordinator::certs::CertInitOptions {
            hosts: vec!["localhost".into()],
            ips: vec!["127.0.0.1".parse()?],
            out_dir: c.tls_dir(),
            server_days: 30,
            ca_days: 30,
            force: true,
            reuse_ca: true,
        })?;
        c.reload();
        shoal_tests::poll_until(
            Duration::from_secs(10),
            "the new certificate is served",
            || async {
                let now = served().await;
                (now != before).then_some(())
            },
        )
        .await?;
        c.stop().await
    })
    .await
}
