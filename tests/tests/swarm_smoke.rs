//! Smoke test of the data plane with the real control plane: a coordinator (cluster CA,
//! tracker) and three agents started with `shoal_agent::run` and a `[cluster]` section, each
//! on its own 127.0.0.x, in front of a real `docker-registry`. A cold pull of one blob on all
//! three at once must give every client the right bytes while the registry serves the blob
//! about once (measured in its access log, not inside Shoal).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use shoal_agent::{Config, Listeners, Overrides};
use shoal_tests::coordinator::{CoordinatorOptions, TestCoordinator};
use shoal_tests::http::push_blob;
use shoal_tests::image::sha256_digest;
use shoal_tests::{Registry, free_port, free_port_on, http_get, wait_until};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const TEST_TIMEOUT: Duration = Duration::from_secs(120);
const TOKEN: &str = "swarm-smoke-token-0123456789";
const REPO: &str = "test/swarm";

fn q(p: &Path) -> String {
    serde_json::to_string(&p.to_string_lossy()).expect("a str serialises")
}

struct Agent {
    mirror: SocketAddr,
    _stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), shoal_agent::AgentError>>,
    _dir: TempDir,
}

async fn start_agent(
    i: u8,
    registry: &Registry,
    coordinator: &TestCoordinator,
    token_file: &Path,
    ca_file: &Path,
) -> Result<Agent> {
    let ip = Ipv4Addr::new(127, 0, 0, 70 + i);
    let dir = tempfile::Builder::new().prefix("shoal-swarm-").tempdir()?;
    let mirror = TcpListener::bind((ip, 0)).await?;
    let mirror_addr = mirror.local_addr()?;
    let peer = SocketAddr::new(IpAddr::V4(ip), free_port_on(IpAddr::V4(ip))?);
    let cluster = coordinator.cluster_addr().context("no cluster port")?;
    let text = format!(
        "[mirror]\nlisten = \"{mirror_addr}\"\n[metrics]\nenabled = false\n\
         [store]\nroot = {store}\n\
         [[upstream]]\nhost = \"registry.test\"\nurl = \"{registry}\"\ninsecure_http = true\n\
         [cluster]\nnode_name = \"agent-{i}\"\npeer_listen = \"{peer}\"\nstate_dir = {state}\n\
         bootstrap_token_file = {token}\nca_file = {ca}\n\
         [[cluster.coordinator]]\nname = \"coord-a\"\nenroll_url = \"https://127.0.0.1:{https}\"\n\
         ctl_addr = \"{cluster}\"\n",
        store = q(&dir.path().join("store")),
        registry = registry.url(),
        state = q(&dir.path().join("cluster")),
        token = q(token_file),
        ca = q(ca_file),
        https = coordinator.https_addr().port(),
    );
    let config = Config::from_toml(&text, &Overrides::default(), None)
        .with_context(|| format!("agent config:\n{text}"))?;
    let (stop, stopped) = oneshot::channel::<()>();
    let listeners = Listeners {
        mirror,
        metrics: None,
    };
    let task = tokio::spawn(shoal_agent::run(config, listeners, async move {
        let _ = stopped.await;
    }));
    let url = format!("http://{mirror_addr}/v2/");
    wait_until(Duration::from_secs(30), "agent answers /v2/", || {
        let url = url.clone();
        async move {
            http_get(&url, Duration::from_secs(2))
                .await
                .is_ok_and(|r| r.status == 200)
        }
    })
    .await?;
    Ok(Agent {
        mirror: mirror_addr,
        _stop: stop,
        task,
        _dir: dir,
    })
}

#[tokio::test]
async fn three_agents_pull_one_blob_that_leaves_the_registry_about_once() -> Result<()> {
    shoal_tests::require_tools()?;
    tokio::time::timeout(TEST_TIMEOUT, async {
        let registry = Registry::start().await?;
        let size = 6 << 20;
        let blob: Vec<u8> = {
            let mut x = 0x2545_f491_4f6c_dd1du64;
            (0..size)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect()
        };
        let digest = push_blob(&registry.url(), REPO, &blob).await?;
        let shared = tempfile::Builder::new()
            .prefix("shoal-cluster-")
            .tempdir()?;
        let tokens = shared.path().join("tokens");
        std::fs::write(&tokens, format!("{TOKEN}\n"))?;
        let token_file = shared.path().join("token");
        std::fs::write(&token_file, TOKEN)?;
        let mut opts = CoordinatorOptions::new(&[format!("http://127.0.0.1:{}", free_port()?)]);
        opts.cluster_toml = Some(format!(
            "name = \"coord-a\"\ndata_dir = {}\nbootstrap_tokens_file = {}\n",
            q(&shared.path().join("ca")),
            q(&tokens),
        ));
        let coordinator = TestCoordinator::start(opts).await?;
        let ca_file = shared.path().join("front-door-ca.pem");
        std::fs::write(&ca_file, coordinator.ca_pem())?;

        let mut agents = Vec::new();
        for i in 0..3 {
            agents.push(start_agent(i, &registry, &coordinator, &token_file, &ca_file).await?);
        }
        let pulls = agents.iter().map(|a| {
            let url = format!("http://{}/v2/{REPO}/blobs/{digest}", a.mirror);
            async move { http_get(&url, Duration::from_secs(60)).await }
        });
        for (i, r) in futures::future::join_all(pulls)
            .await
            .into_iter()
            .enumerate()
        {
            let r = r.with_context(|| format!("agent {i}"))?;
            ensure!(r.status == 200, "agent {i}: status {}", r.status);
            ensure!(r.body.len() == size, "agent {i}: {} bytes", r.body.len());
            ensure!(sha256_digest(&r.body) == digest, "agent {i}: wrong content");
        }
        let served: u64 = registry
            .access_log()
            .iter()
            .filter(|e| e.method == "GET" && e.path.ends_with(&digest))
            .map(|e| e.bytes)
            .sum();
        ensure!(
            served as f64 <= 1.1 * size as f64,
            "the registry served {served} bytes of a {size}-byte blob"
        );
        for a in agents {
            drop(a._stop);
            tokio::time::timeout(Duration::from_secs(40), a.task)
                .await
                .context("agent did not stop")???;
        }
        Ok(())
    })
    .await
    .context("test timed out")?
}
