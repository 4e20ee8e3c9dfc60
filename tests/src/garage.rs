//! Runs a real single-node garage (S3-compatible object store) for tests of registries on S3
//! storage, and a recording tap in front of its S3 port.
//!
//! garage is not a Debian package: `scripts/install-garage` builds it once from crates.io into
//! `${SHOAL_CACHE:-~/.cache/shoal}/garage/bin/garage` (about 15 minutes on 2 cores). Without
//! it [`Garage::start`] fails with that command; it never skips.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use shoal_tests::garage::{Garage, StorageTap};
//! use shoal_tests::registry::S3Storage;
//! use shoal_tests::Registry;
//! let garage = Garage::start().await?;
//! let bucket = garage.create_bucket("regbucket").await?;
//! // Presigned URLs name the tap, so every byte fetched from storage is seen by it.
//! let tap = StorageTap::start("127.0.0.3".parse()?, &garage.s3_url()).await?;
//! let registry = Registry::builder()
//!     .s3(S3Storage::new(&tap.url(), &bucket))
//!     .start()
//!     .await?;
//! # Ok(()) }
//! ```

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::net::{POLL_INTERVAL, free_port};
use crate::{file_tail, find_in_path, is_executable};

/// The command that installs garage into the cache directory the harness looks in.
pub const GARAGE_INSTALL_HINT: &str = "scripts/install-garage";

/// How long garage may take to answer its CLI after it is spawned.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one `garage` CLI command may take.
const CLI_TIMEOUT: Duration = Duration::from_secs(20);
/// How many fresh port sets to try when one was taken between picking and binding.
const PORT_ATTEMPTS: usize = 5;
/// The region garage answers for, and the one the registry must sign with.
pub const GARAGE_REGION: &str = "us-east-1";

/// Where `scripts/install-garage` puts the binary: `$SHOAL_CACHE/garage/bin/garage`, by
/// default `~/.cache/shoal/garage/bin/garage`.
pub fn cached_garage_path() -> Option<PathBuf> {
    let cache = match std::env::var_os("SHOAL_CACHE") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(std::env::var_os("HOME")?).join(".cache/shoal"),
    };
    Some(cache.join("garage/bin/garage"))
}

/// The garage binary: the cached one, else one on `PATH`; otherwise an error naming
/// `scripts/install-garage`.
pub fn garage_binary() -> Result<PathBuf> {
    if let Some(path) = cached_garage_path().filter(|p| is_executable(p)) {
        return Ok(path);
    }
    if let Some(path) = find_in_path("garage") {
        return Ok(path);
    }
    bail!(
        "garage not found (looked for {} and on PATH); build it once with `{GARAGE_INSTALL_HINT}` \
         (cargo install garage@2.5.0, about 15 minutes on 2 cores)",
        cached_garage_path().map_or_else(|| "<no HOME>".to_owned(), |p| p.display().to_string())
    )
}

/// S3 credentials for one bucket, as made by [`Garage::create_bucket`].
#[derive(Clone, Debug)]
pub struct S3Bucket {
    pub bucket: String,
    /// `GK` and 24 hex digits.
    pub access_key: String,
    /// 64 hex digits.
    pub secret_key: String,
    pub region: String,
}

/// A single-node garage with its metadata and data in a temp dir. Dropping it kills it.
#[derive(Debug)]
pub struct Garage {
    bin: PathBuf,
    dir: TempDir,
    /// metadata_dir and data_dir of the current attempt.
    state: PathBuf,
    config: PathBuf,
    log: PathBuf,
    s3: SocketAddr,
    admin: SocketAddr,
    admin_token: String,
    child: Option<Child>,
}

impl Garage {
    /// Starts garage on free 127.0.0.1 ports and applies a one-node layout, so buckets can be
    /// created right away.
    pub async fn start() -> Result<Garage> {
        let bin = garage_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("shoal-garage-")
            .tempdir()
            .context("creating garage temp dir")?;
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let mut garage = Garage {
            bin,
            state: PathBuf::new(),
            config: PathBuf::new(),
            log: PathBuf::new(),
            dir,
            s3: SocketAddr::new(ip, 0),
            admin: SocketAddr::new(ip, 0),
            admin_token: random_hex::<32>(),
            child: None,
        };
        for attempt in 1..=PORT_ATTEMPTS {
            // A fresh state, config and log per attempt: a half-started node leaves its own.
            garage.state = garage.dir.path().join(format!("state-{attempt}"));
            garage.config = garage.dir.path().join(format!("garage-{attempt}.toml"));
            garage.log = garage.dir.path().join(format!("garage-{attempt}.log"));
            garage.s3 = SocketAddr::new(ip, free_port()?);
            garage.admin = SocketAddr::new(ip, free_port()?);
            garage.write_config(SocketAddr::new(ip, free_port()?))?;
            match garage.spawn_and_configure().await {
                Ok(()) => return Ok(garage),
                // Another process took a port between `free_port` and garage's bind.
                Err(err)
                    if attempt < PORT_ATTEMPTS
                        && format!("{err:#}")
                            .to_lowercase()
                            .contains("address already in use") =>
                {
                    tracing::debug!(attempt, "garage port taken, retrying with others");
                }
                Err(err) => return Err(err),
            }
        }
        unreachable!("the last attempt returns")
    }

    /// `http://127.0.0.1:PORT` of the S3 API.
    pub fn s3_url(&self) -> String {
        format!("http://{}", self.s3)
    }

    pub fn s3_addr(&self) -> SocketAddr {
        self.s3
    }

    /// The admin API address and its bearer token.
    pub fn admin(&self) -> (SocketAddr, &str) {
        (self.admin, &self.admin_token)
    }

    /// garage's own log (stderr).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Creates `name`, imports a fresh random key and gives it read, write and owner rights
    /// on the bucket.
    pub async fn create_bucket(&self, name: &str) -> Result<S3Bucket> {
        let access_key = format!("GK{}", random_hex::<12>());
        let secret_key = random_hex::<32>();
        let key_name = format!("{name}-key");
        self.cli(&["bucket", "create", name]).await?;
        self.cli(&[
            "key",
            "import",
            "--yes",
            "-n",
            &key_name,
            &access_key,
            &secret_key,
        ])
        .await?;
        self.cli(&[
            "bucket", "allow", "--read", "--write", "--owner", name, "--key", &key_name,
        ])
        .await?;
        Ok(S3Bucket {
            bucket: name.to_owned(),
            access_key,
            secret_key,
            region: GARAGE_REGION.to_owned(),
        })
    }

    /// Runs `garage -c CONFIG ARGS…` and returns its stdout; fails with its output after
    /// [`CLI_TIMEOUT`] or on a non-zero exit.
    pub async fn cli(&self, args: &[&str]) -> Result<String> {
        let mut command = Command::new(&self.bin);
        command
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        // Secrets are arguments of `key import`; name only the subcommand in errors.
        let what = format!(
            "garage {}",
            args.iter().take(2).copied().collect::<Vec<_>>().join(" ")
        );
        let out = tokio::time::timeout(CLI_TIMEOUT, command.output())
            .await
            .with_context(|| format!("{what} did not finish within {CLI_TIMEOUT:?}"))?
            .with_context(|| format!("running {what}"))?;
        if !out.status.success() {
            bail!(
                "{what} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn write_config(&self, rpc: SocketAddr) -> Result<()> {
        let q = |s: &str| serde_json::to_string(s).expect("a str always serializes");
        let p = |p: &Path| q(&p.to_string_lossy());
        let text = format!(
            "metadata_dir = {meta}\n\
             data_dir = {data}\n\
             db_engine = \"sqlite\"\n\
             replication_factor = 1\n\
             rpc_bind_addr = \"{rpc}\"\n\
             rpc_public_addr = \"{rpc}\"\n\
             rpc_secret = \"{secret}\"\n\
             \n[s3_api]\n\
             s3_region = \"{GARAGE_REGION}\"\n\
             api_bind_addr = \"{s3}\"\n\
             root_domain = \".s3.garage.localhost\"\n\
             \n[admin]\n\
             api_bind_addr = \"{admin}\"\n\
             admin_token = \"{token}\"\n",
            meta = p(&self.state.join("meta")),
            data = p(&self.state.join("data")),
            secret = random_hex::<32>(),
            s3 = self.s3,
            admin = self.admin,
            token = self.admin_token,
        );
        std::fs::write(&self.config, text)
            .with_context(|| format!("writing {}", self.config.display()))?;
        // garage refuses a config readable by others, since it holds the RPC secret.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&self.config, std::fs::Permissions::from_mode(0o600))?;
        }
        Ok(())
    }

    async fn spawn_and_configure(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&self.config)
            .arg("server")
            .env("RUST_LOG", "garage=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawning {}", self.bin.display()))?;
        self.child = Some(child);
        let result = self.configure().await;
        if let Err(err) = result {
            self.kill();
            return Err(err.context(format!("garage log tail:\n{}", file_tail(&self.log, 2048))));
        }
        Ok(())
    }

    /// Waits until the node answers its CLI, then assigns it the whole layout.
    async fn configure(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let node_id = loop {
            let child = self.child.as_mut().context("garage is not running")?;
            if let Some(status) = child.try_wait().context("polling garage")? {
                self.child = None;
                bail!("garage exited with {status} at start");
            }
            match self.cli(&["node", "id", "-q"]).await {
                // `<64 hex>@127.0.0.1:PORT`
                Ok(out) => match out.trim().split_once('@') {
                    Some((id, _)) => break id.to_owned(),
                    None => bail!("unexpected `garage node id` output: {out:?}"),
                },
                Err(err) if Instant::now() >= deadline => {
                    return Err(err.context(format!("garage not ready after {READY_TIMEOUT:?}")));
                }
                Err(_) => tokio::time::sleep(POLL_INTERVAL * 4).await,
            }
        };
        // `node id` reads the key from disk; the RPC port may not listen yet, so the first
        // command that needs it is retried until the deadline.
        loop {
            match self
                .cli(&["layout", "assign", "-z", "dc1", "-c", "1G", &node_id])
                .await
            {
                Ok(_) => break,
                Err(err) if Instant::now() >= deadline => {
                    return Err(
                        err.context(format!("garage RPC not ready after {READY_TIMEOUT:?}"))
                    );
                }
                Err(err) if format!("{err:#}").contains("Connection refused") => {
                    tokio::time::sleep(POLL_INTERVAL * 4).await;
                }
                Err(err) => return Err(err),
            }
        }
        self.cli(&["layout", "apply", "--version", "1"]).await?;
        // The S3 endpoint answers once the layout is in force; any HTTP answer will do.
        crate::net::wait_until(READY_TIMEOUT, "garage's S3 API answers", || async {
            crate::net::http_get(&format!("{}/", self.s3_url()), Duration::from_secs(2))
                .await
                .is_ok()
        })
        .await?;
        tracing::debug!(s3 = %self.s3, "garage ready");
        Ok(())
    }

    fn kill(&mut self) {
        // kill_on_drop alone sends SIGKILL without waiting, and the temp dir goes right after;
        // SIGKILL takes effect at once, so this bounded wait is short.
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let deadline = std::time::Instant::now() + Duration::from_secs(2);
            while matches!(child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `2 * N` random hex digits.
fn random_hex<const N: usize>() -> String {
    hex::encode(rand::random::<[u8; N]>())
}

/// One request that went through a [`StorageTap`].
#[derive(Clone, Debug)]
pub struct TapRecord {
    pub method: http::Method,
    pub path: String,
    pub query: Option<String>,
    /// The `Authorization` header, if any (the registry's own S3 calls carry SigV4 here).
    pub authorization: Option<String>,
    pub user_agent: String,
    pub status: u16,
    /// Response body bytes sent to the client.
    pub body_bytes: u64,
}

impl TapRecord {
    /// A presigned URL: the signature is in the query, not in a header.
    pub fn is_presigned(&self) -> bool {
        self.query
            .as_deref()
            .is_some_and(|q| q.contains("X-Amz-Signature="))
    }

    /// A `GET` of a registry blob's data object (`…/docker/registry/v2/blobs/sha256/xx/HEX/data`).
    pub fn is_blob_data_get(&self) -> bool {
        self.method == http::Method::GET
            && self.path.contains("/docker/registry/v2/blobs/")
            && self.path.ends_with("/data")
    }
}

#[derive(Debug)]
struct TapCell {
    method: http::Method,
    path: String,
    query: Option<String>,
    authorization: Option<String>,
    user_agent: String,
    status: AtomicU16,
    body_bytes: AtomicU64,
}

type Records = Arc<Mutex<Vec<Arc<TapCell>>>>;

/// A recording reverse proxy in front of an S3 endpoint: the registry is told this is its
/// `regionendpoint`, so the presigned URLs it hands out point here and every byte that leaves
/// storage, for whoever fetched it, is counted with the request's headers.
#[derive(Debug)]
pub struct StorageTap {
    addr: SocketAddr,
    records: Records,
    task: JoinHandle<()>,
}

impl StorageTap {
    /// Listens on `ip:0` and forwards to `upstream_url` (`http://HOST:PORT`), keeping the
    /// client's `Host` header (SigV4 signs it).
    pub async fn start(ip: IpAddr, upstream_url: &str) -> Result<StorageTap> {
        let upstream: Uri = upstream_url
            .parse()
            .with_context(|| format!("parsing {upstream_url}"))?;
        let authority = upstream
            .authority()
            .context("upstream url has no host")?
            .clone();
        let listener = TcpListener::bind((ip, 0))
            .await
            .with_context(|| format!("binding storage tap on {ip}"))?;
        let addr = listener.local_addr()?;
        let records: Records = Arc::default();
        let client: Client<HttpConnector, Incoming> =
            Client::builder(TokioExecutor::new()).build_http();
        let shared = (records.clone(), client, authority);
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let (records, client, authority) = shared.clone();
                let service = service_fn(move |req: Request<Incoming>| {
                    tap_request(req, records.clone(), client.clone(), authority.clone())
                });
                connections.spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
                while connections.try_join_next().is_some() {}
            }
        });
        Ok(StorageTap {
            addr,
            records,
            task,
        })
    }

    /// `http://IP:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<TapRecord> {
        self.records
            .lock()
            .expect("no panics while holding the tap lock")
            .iter()
            .map(|c| TapRecord {
                method: c.method.clone(),
                path: c.path.clone(),
                query: c.query.clone(),
                authorization: c.authorization.clone(),
                user_agent: c.user_agent.clone(),
                status: c.status.load(Ordering::Acquire),
                body_bytes: c.body_bytes.load(Ordering::Acquire),
            })
            .collect()
    }

    /// Forgets the requests recorded so far.
    pub fn reset(&self) {
        self.records
            .lock()
            .expect("no panics while holding the tap lock")
            .clear();
    }
}

impl Drop for StorageTap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type TapBody = BoxBody<Bytes, hyper::Error>;

async fn tap_request(
    mut req: Request<Incoming>,
    records: Records,
    client: Client<HttpConnector, Incoming>,
    authority: http::uri::Authority,
) -> Result<Response<TapBody>, Infallible> {
    let header = |name: header::HeaderName| {
        req.headers()
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    let cell = Arc::new(TapCell {
        method: req.method().clone(),
        path: req.uri().path().to_owned(),
        query: req.uri().query().map(str::to_owned),
        authorization: header(header::AUTHORIZATION),
        user_agent: header(header::USER_AGENT).unwrap_or_default(),
        status: AtomicU16::new(0),
        body_bytes: AtomicU64::new(0),
    });
    records
        .lock()
        .expect("no panics while holding the tap lock")
        .push(cell.clone());
    let pq = req
        .uri()
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_owned();
    let uri = Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query(pq)
        .build();
    let fail = |status: StatusCode, message: String| {
        cell.status.store(status.as_u16(), Ordering::Release);
        let mut r = Response::new(
            Full::new(Bytes::from(message))
                .map_err(|never| match never {})
                .boxed(),
        );
        *r.status_mut() = status;
        r
    };
    let uri = match uri {
        Ok(uri) => uri,
        Err(e) => return Ok(fail(StatusCode::BAD_GATEWAY, format!("bad uri: {e}"))),
    };
    // The Host header stays the client's (it is part of the signature); an HTTP/1.1 request
    // always has one.
    if !req.headers().contains_key(header::HOST)
        && let Some(a) = req.uri().authority()
        && let Ok(v) = HeaderValue::from_str(a.as_str())
    {
        req.headers_mut().insert(header::HOST, v);
    }
    *req.uri_mut() = uri;
    match client.request(req).await {
        Ok(response) => {
            cell.status
                .store(response.status().as_u16(), Ordering::Release);
            let (parts, body) = response.into_parts();
            let body = CountingBody { inner: body, cell }.boxed();
            Ok(Response::from_parts(parts, body))
        }
        Err(e) => Ok(fail(
            StatusCode::BAD_GATEWAY,
            format!("tap upstream: {e:?}"),
        )),
    }
}

struct CountingBody {
    inner: Incoming,
    cell: Arc<TapCell>,
}

impl Body for CountingBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.cell
                .body_bytes
                .fetch_add(data.len() as u64, Ordering::AcqRel);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
