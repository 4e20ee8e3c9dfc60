//! The OSS setup for real: Debian's `docker-registry` on S3 storage (a real garage node) with
//! redirects enabled, behind the coordinator (TLS, htpasswd), driven by skopeo and by a Shoal
//! agent.
//!
//! The registry's `regionendpoint` is a recording tap in front of garage's S3 port, so the
//! presigned URLs it hands out point at the tap and every byte that leaves storage is counted,
//! with the headers of the request that fetched it. Storage listens on 127.0.0.3, another
//! "host" than the coordinator's 127.0.0.1.
//!
//! garage takes about 15 minutes to build, so these tests are ignored in the normal suite:
//! `scripts/test-s3` installs garage into the cache once and runs exactly them. Run without
//! garage, they fail with the install command; they never pass vacuously.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use shoal_tests::coordinator::{
    CoordinatorOptions, HashFormat, TestCoordinator, htpasswd_add, require_coordinator_tools,
};
use shoal_tests::garage::{Garage, StorageTap, TapRecord, garage_binary};
use shoal_tests::registry::S3Storage;
use shoal_tests::{
    CopyOptions, ImageSpec, Registry, Skopeo, TestImage, http_get, init_tracing, verify_layout,
    wait_until,
};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

const TEST_TIMEOUT: Duration = Duration::from_secs(240);
/// Where object storage lives: another loopback address than the coordinator's.
const STORAGE_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));
/// Front-door user (bcrypt).
const USER: &str = "alice";
const PASSWORD: &str = "alice-pw";
/// `alice:` base64-encoded starts like this in a Basic header.
const ALICE_BASIC_PREFIX: &str = "YWxpY2U6";

async fn within(test: impl Future<Output = Result<()>>) -> Result<()> {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .context("test timed out")?
}

/// garage with a bucket, the tap in front of it, a registry on that storage with redirects,
/// and the coordinator in front of the registry.
struct Setup {
    // Dropped in this order: coordinator, registry, tap, garage.
    coordinator: TestCoordinator,
    registry: Registry,
    tap: StorageTap,
    garage: Garage,
    _dir: tempfile::TempDir,
}

impl Setup {
    async fn start(redirect: &str) -> Result<Setup> {
        init_tracing();
        // Missing tools fail here, with the command that installs them.
        garage_binary()?;
        require_coordinator_tools()?;
        let dir = tempfile::tempdir()?;
        let garage = Garage::start().await?;
        let bucket = garage.create_bucket("regbucket").await?;
        let tap = StorageTap::start(STORAGE_IP, &garage.s3_url()).await?;
        let registry = Registry::builder()
            .s3(S3Storage::new(&tap.url(), &bucket))
            .start()
            .await
            .with_context(|| format!("registry on garage; garage log:\n{}", garage.log_text()))?;
        let users = dir.path().join("htpasswd");
        htpasswd_add(&users, USER, PASSWORD, HashFormat::Bcrypt)?;
        let mut opts = CoordinatorOptions::new(&[registry.url()]);
        opts.htpasswd = Some(users);
        opts.redirect = redirect.into();
        let coordinator = TestCoordinator::start(opts).await?;
        Ok(Setup {
            coordinator,
            registry,
            tap,
            garage,
            _dir: dir,
        })
    }

    fn skopeo_opts(&self) -> CopyOptions {
        CopyOptions::default()
            .tls(self.coordinator.cert_dir())
            .creds(format!("{USER}:{PASSWORD}"))
    }

    /// Pushes a generated image (three random layers) through the coordinator.
    async fn push(&self, repo: &str, seed: u64) -> Result<TestImage> {
        let image = TestImage::generate(
            &ImageSpec::new(vec![1 << 20, 700 << 10, 300 << 10], seed),
            "v1",
        )?;
        let reference = format!("{}/{repo}:v1", self.coordinator.host_port());
        Skopeo::push_image(&image, &reference, &self.skopeo_opts())
            .await
            .with_context(|| format!("push through the coordinator; {}", self.logs()))?;
        Ok(image)
    }

    /// The registry's and garage's log tails, for failure messages.
    fn logs(&self) -> String {
        let tail = |s: String| {
            let start = s.len().saturating_sub(3000);
            let start = (start..s.len())
                .find(|i| s.is_char_boundary(*i))
                .unwrap_or(s.len());
            s[start..].to_owned()
        };
        format!(
            "registry log tail:\n{}\ngarage log tail:\n{}",
            tail(self.registry.log_text()),
            tail(self.garage.log_text())
        )
    }

    /// The tap's `GET`s of blob data: what storage sent, to whom.
    fn storage_blob_gets(&self) -> Vec<TapRecord> {
        self.tap
            .requests()
            .into_iter()
            .filter(TapRecord::is_blob_data_get)
            .collect()
    }

    /// Waits until the coordinator's access log has `n` lines for blob GETs, and returns them
    /// as (status, body bytes).
    async fn coordinator_blob_gets(&self, n: usize) -> Result<Vec<(u16, u64)>> {
        let lines = || {
            self.coordinator
                .access_log()
                .iter()
                .filter_map(|l| parse_blob_get(l))
                .collect::<Vec<_>>()
        };
        wait_until(
            Duration::from_secs(10),
            "the coordinator logged every blob GET",
            || {
                let enough = lines().len() >= n;
                async move { enough }
            },
        )
        .await
        .with_context(|| format!("access log: {:#?}", self.coordinator.access_log()))?;
        Ok(lines())
    }
}

/// What storage and the coordinator carried for blobs, printed with `--nocapture`.
fn report(what: &str, tap: &[TapRecord], gets: &[(u16, u64)]) {
    let presigned: Vec<&TapRecord> = tap.iter().filter(|r| r.is_presigned()).collect();
    println!(
        "{what}: storage sent {} bytes in {} presigned blob GETs (Authorization headers: {}, \
         user agents: {:?}); the coordinator answered blob GETs with {:?}",
        presigned.iter().map(|r| r.body_bytes).sum::<u64>(),
        presigned.len(),
        presigned
            .iter()
            .filter(|r| r.authorization.is_some())
            .count(),
        presigned
            .iter()
            .map(|r| r.user_agent.as_str())
            .collect::<std::collections::BTreeSet<_>>(),
        gets
    );
}

/// `(status, bytes)` of an access log line for `GET /v2/<name>/blobs/<digest>`.
fn parse_blob_get(line: &str) -> Option<(u16, u64)> {
    let (_, rest) = line.split_once("] \"GET /v2/")?;
    let (path, rest) = rest.split_once(' ')?;
    if !path.contains("/blobs/sha256:") {
        return None;
    }
    let (_, rest) = rest.split_once("\" ")?;
    let mut fields = rest.split(' ');
    Some((fields.next()?.parse().ok()?, fields.next()?.parse().ok()?))
}

/// Sizes of the image's layers and config: the blobs a pull fetches.
fn blob_bytes(image: &TestImage) -> u64 {
    image.blobs().iter().map(|b| b.size).sum()
}

/// No request to storage carried the front-door user's credentials, and no presigned GET
/// carried any `Authorization` header: the signature is in the URL.
fn check_storage_credentials(tap: &[TapRecord]) -> Result<()> {
    for r in tap {
        let auth = r.authorization.as_deref().unwrap_or("");
        ensure!(
            !auth.contains(ALICE_BASIC_PREFIX) && !auth.starts_with("Basic"),
            "storage got client credentials: {} {} {auth:?}",
            r.method,
            r.path
        );
        if r.is_presigned() {
            ensure!(
                r.authorization.is_none(),
                "a presigned GET carried Authorization: {} {} {auth:?} ({})",
                r.method,
                r.path,
                r.user_agent
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs garage: run scripts/test-s3"]
async fn registry_on_garage_answers_blob_gets_with_presigned_redirects() -> Result<()> {
    within(async {
        let s = Setup::start("pass").await?;
        let image = s.push("team/direct", 31).await?;
        let layer = &image.layer_digests()[0];
        // Straight to the registry, no coordinator: the real 307 of the OSS setup.
        let r = http_get(
            &format!("{}/v2/team/direct/blobs/{layer}", s.registry.url()),
            Duration::from_secs(10),
        )
        .await?;
        ensure!(
            r.status == 307,
            "registry answered {}; {}",
            r.status,
            s.logs()
        );
        let location = r.headers["location"].to_str()?.to_owned();
        ensure!(
            location.starts_with(&s.tap.url()) && location.contains("X-Amz-Signature="),
            "not a presigned storage URL: {location}"
        );
        // The presigned URL works without any credentials.
        let r = http_get(&location, Duration::from_secs(10)).await?;
        ensure!(r.status == 200, "storage answered {}", r.status);
        ensure!(
            shoal_tests::image::sha256_digest(&r.body) == *layer,
            "storage served other bytes"
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs garage: run scripts/test-s3"]
async fn coordinator_passes_storage_redirects_so_blob_bytes_bypass_it() -> Result<()> {
    within(async {
        let s = Setup::start("pass").await?;
        let image = s.push("team/app", 41).await?;
        let blobs = image.blobs().len();
        s.tap.reset();

        let out = tempfile::tempdir()?;
        let reference = format!("{}/team/app:v1", s.coordinator.host_port());
        Skopeo::pull(&reference, &out.path().join("oci"), &s.skopeo_opts())
            .await
            .with_context(|| format!("pull through the coordinator; {}", s.logs()))?;
        verify_layout(&out.path().join("oci"), &image)?;

        // Every blob came from storage, presigned, to skopeo itself.
        let tap = s.storage_blob_gets();
        let from_storage: u64 = tap
            .iter()
            .filter(|r| r.is_presigned() && r.status == 200)
            .map(|r| r.body_bytes)
            .sum();
        ensure!(
            from_storage >= blob_bytes(&image),
            "storage sent {from_storage} bytes of presigned blob GETs, the image's blobs are {}: {tap:#?}",
            blob_bytes(&image)
        );
        check_storage_credentials(&s.tap.requests())?;

        // The coordinator answered every blob GET with the registry's 307 and carried ~none of
        // the bytes.
        let gets = s.coordinator_blob_gets(blobs).await?;
        report("pass", &tap, &gets);
        ensure!(
            gets.iter().all(|(status, _)| *status == 307),
            "blob GETs through the coordinator: {gets:?}"
        );
        let through: u64 = gets.iter().map(|(_, bytes)| bytes).sum();
        ensure!(
            through < 1024 * gets.len() as u64,
            "the coordinator served {through} bytes for blobs"
        );
        s.coordinator.stop().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs garage: run scripts/test-s3"]
async fn coordinator_follows_storage_redirects_without_credentials() -> Result<()> {
    within(async {
        let s = Setup::start("follow").await?;
        let image = s.push("team/app", 51).await?;
        let blobs = image.blobs().len();
        s.tap.reset();

        let out = tempfile::tempdir()?;
        let reference = format!("{}/team/app:v1", s.coordinator.host_port());
        Skopeo::pull(&reference, &out.path().join("oci"), &s.skopeo_opts())
            .await
            .with_context(|| format!("pull through the coordinator; {}", s.logs()))?;
        verify_layout(&out.path().join("oci"), &image)?;

        // The client never saw a 307: the coordinator answered 200 with the whole blob.
        let gets = s.coordinator_blob_gets(blobs).await?;
        ensure!(
            gets.iter().all(|(status, _)| *status == 200),
            "blob GETs through the coordinator: {gets:?}"
        );
        let through: u64 = gets.iter().map(|(_, bytes)| bytes).sum();
        ensure!(
            through >= blob_bytes(&image),
            "the coordinator served {through} bytes, the blobs are {}",
            blob_bytes(&image)
        );
        // It fetched them from storage with presigned URLs and no Authorization header.
        let tap = s.storage_blob_gets();
        report("follow", &tap, &gets);
        ensure!(
            tap.iter().filter(|r| r.is_presigned()).count() >= blobs,
            "presigned GETs at storage: {tap:#?}"
        );
        check_storage_credentials(&s.tap.requests())?;

        // A client asking for a range gets it from storage through the coordinator.
        let layer = &image.layer_digests()[0];
        let whole = std::fs::read(image.blob_path(layer)?)?;
        let r = s
            .coordinator
            .client()?
            .get(s.coordinator.url(&format!("/v2/team/app/blobs/{layer}")))
            .basic_auth(USER, Some(PASSWORD))
            .header("range", "bytes=100-199")
            .send()
            .await?;
        ensure!(r.status() == 206, "range GET answered {}", r.status());
        ensure!(r.bytes().await? == whole[100..200], "wrong range bytes");
        check_storage_credentials(&s.tap.requests())?;
        s.coordinator.stop().await
    })
    .await
}

/// An in-process `shoal-agent` whose upstream is the coordinator over TLS with the test CA and
/// front-door credentials.
struct CoordinatorAgent {
    addr: std::net::SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), shoal_agent::AgentError>>,
    _dir: tempfile::TempDir,
}

impl CoordinatorAgent {
    async fn start(c: &TestCoordinator) -> Result<CoordinatorAgent> {
        let dir = tempfile::tempdir()?;
        let mirror = TcpListener::bind("127.0.0.1:0").await?;
        let metrics = TcpListener::bind("127.0.0.1:0").await?;
        let q = |s: &str| serde_json::to_string(s).expect("a str serialises");
        let p = |p: &Path| q(&p.to_string_lossy());
        let password = dir.path().join("password");
        std::fs::write(&password, format!("{PASSWORD}\n"))?;
        // insecure_http allows the redirect from the https coordinator to plain-http storage.
        let text = format!(
            "[mirror]\nlisten = \"{}\"\ndefault_upstream = \"registry.test\"\n\
             [metrics]\nlisten = \"{}\"\n[store]\nroot = {}\n\
             [[upstream]]\nhost = \"registry.test\"\nurl = {}\nusername = {}\n\
             password_file = {}\nca_file = {}\ninsecure_http = true\nconnect_timeout = \"2s\"\n\
             idle_timeout = \"10s\"\nmax_retries = 1\n",
            mirror.local_addr()?,
            metrics.local_addr()?,
            p(&dir.path().join("store")),
            q(&c.url("")),
            q(USER),
            p(&password),
            p(&c.cert_dir().join("ca.crt")),
        );
        let config =
            shoal_agent::Config::from_toml(&text, &shoal_agent::Overrides::default(), None)
                .with_context(|| format!("agent config:\n{text}"))?;
        let addr = mirror.local_addr()?;
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(shoal_agent::run(
            config,
            shoal_agent::Listeners {
                mirror,
                metrics: Some(metrics),
            },
            async move {
                let _ = rx.await;
            },
        ));
        let url = format!("http://{addr}/v2/");
        wait_until(Duration::from_secs(10), "the agent answers /v2/", || {
            let url = url.clone();
            async move {
                http_get(&url, Duration::from_secs(2))
                    .await
                    .is_ok_and(|r| r.status == 200)
            }
        })
        .await?;
        Ok(CoordinatorAgent {
            addr,
            shutdown: Some(tx),
            task,
            _dir: dir,
        })
    }

    async fn stop(mut self) -> Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(40), &mut self.task)
            .await
            .context("agent did not stop within 40 s")?
            .context("agent task panicked")??;
        Ok(())
    }
}

impl Drop for CoordinatorAgent {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs garage: run scripts/test-s3"]
async fn agent_behind_the_coordinator_fetches_blobs_from_storage_without_credentials() -> Result<()>
{
    within(async {
        let s = Setup::start("pass").await?;
        let image = s.push("team/app", 61).await?;
        let blobs = image.blobs().len();
        s.tap.reset();

        let agent = CoordinatorAgent::start(&s.coordinator).await?;
        let out = tempfile::tempdir()?;
        Skopeo::pull(
            &format!("{}/team/app:v1", agent.addr),
            &out.path().join("oci"),
            &CopyOptions::default(),
        )
        .await
        .with_context(|| format!("pull through the agent; {}", s.logs()))?;
        verify_layout(&out.path().join("oci"), &image)?;

        // The coordinator passed 307s; the agent followed them to storage, presigned, with no
        // Authorization header (it holds alice's password for the coordinator only).
        let gets = s.coordinator_blob_gets(blobs).await?;
        ensure!(
            gets.iter().all(|(status, _)| *status == 307),
            "blob GETs through the coordinator: {gets:?}"
        );
        let tap = s.storage_blob_gets();
        report("agent, pass", &tap, &gets);
        let from_storage: u64 = tap
            .iter()
            .filter(|r| r.is_presigned() && r.status == 200)
            .map(|r| r.body_bytes)
            .sum();
        ensure!(
            from_storage >= blob_bytes(&image),
            "storage sent {from_storage} bytes, the blobs are {}: {tap:#?}",
            blob_bytes(&image)
        );
        check_storage_credentials(&s.tap.requests())?;
        agent.stop().await?;
        s.coordinator.stop().await
    })
    .await
}

#[test]
fn access_log_blob_lines_are_parsed() {
    let line = "127.0.0.1 - alice [29/Nov/2025:10:01:51 +0000] \"GET /v2/team/app/blobs/sha256:ab HTTP/1.1\" 307 245 \"-\" \"skopeo\" \"http://127.0.0.1:5000\" 0.004";
    assert_eq!(parse_blob_get(line), Some((307, 245)));
    let manifest = line.replace("blobs/sha256:ab", "manifests/v1");
    assert_eq!(parse_blob_get(&manifest), None);
}
