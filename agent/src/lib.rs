//! Shoal node agent: a local pull-through registry mirror with a content-addressed store.
//!
//! [`run`] takes already-bound listeners and a shutdown future, so tests start a real agent on
//! port 0 and stop it cleanly; the `shoal-agent` binary only parses flags and binds.

pub mod cli;
pub mod cluster;
pub mod config;
pub mod fetch;
pub mod metrics;
pub mod mirror;
pub mod peer;
pub mod server;
pub mod store;
pub mod upstream;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::net::TcpListener;
use tracing::{info, warn};

pub use config::{Config, ConfigError, Overrides};

/// Default of `[mirror] drain_timeout`: how long in-flight transfers may continue after
/// shutdown is requested.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot open the content store: {0}")]
    Store(#[from] store::StoreError),
    #[error("upstream {host}: {source}")]
    Upstream {
        host: String,
        source: upstream::UpstreamError,
    },
    #[error("cluster: {0}")]
    Cluster(#[from] cluster::ClusterError),
    #[error("peer endpoint: {0}")]
    Peer(#[from] peer::PeerError),
    #[error("internal: {0}")]
    Internal(String),
}

/// The listeners the agent serves on, bound by the caller.
#[derive(Debug)]
pub struct Listeners {
    pub mirror: TcpListener,
    pub metrics: Option<TcpListener>,
}

/// Runs the agent until `shutdown` resolves, then drains and returns.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    let store_cfg = config.store.clone();
    let store = tokio::task::spawn_blocking(move || store::Store::open(store_cfg))
        .await
        .map_err(|e| AgentError::Internal(e.to_string()))??;
    let usage = store.usage();

    let mut upstreams = Vec::new();
    for u in &config.upstreams {
        let host = u.host.to_string();
        upstreams.push(
            upstream::Upstream::new(u.clone())
                .map_err(|source| AgentError::Upstream { host, source })?,
        );
    }

    let metrics = metrics::Metrics::new();
    metrics.store_usage(usage.blobs, usage.bytes);
    let downloads = fetch::Downloads::new(store.clone(), metrics.clone());
    let mirror = Arc::new(mirror::Mirror::new(
        config.mirror.clone(),
        upstreams,
        store.clone(),
        downloads.clone(),
        metrics.clone(),
    ));

    let shutdown = shutdown.shared();
    // The control plane: enrollment, control channels, certificate renewal.
    let cluster = match config.cluster.clone() {
        Some(c) => Some(cluster::Cluster::start(c, shutdown.clone()).await?),
        None => None,
    };
    if let Some(c) = &cluster {
        info!(node = %c.node(), zone = %c.zone().as_str(), "cluster member");
    }
    // The data plane: bandwidth limits always; the peer endpoint and swarm downloads in a
    // cluster.
    let shaping = peer::Shaping::new(&config.peer);
    downloads.set_shaping(shaping.clone());
    let peer = match &cluster {
        Some(c) => {
            let control: Arc<dyn peer::Control> = Arc::new(c.clone());
            let p = peer::Peer::start(
                control,
                config.peer.clone(),
                shaping,
                store.clone(),
                metrics.clone(),
            )?;
            downloads.set_peer(p.clone());
            Some(p)
        }
        None => None,
    };
    let mirror_addr = listeners
        .mirror
        .local_addr()
        .map_err(|e| AgentError::Internal(e.to_string()))?;
    info!(
        listen = %mirror_addr,
        default_upstream = %config.mirror.default_upstream,
        upstreams = %config.upstreams.iter().map(|u| u.host.as_str()).collect::<Vec<_>>().join(","),
        "mirror listening"
    );
    if let Some(l) = listeners.metrics {
        if let Ok(addr) = l.local_addr() {
            info!(listen = %addr, "metrics listening");
        }
        tokio::spawn(server::serve_metrics(l, metrics.clone(), shutdown.clone()));
    }
    let maintenance = tokio::spawn(maintain(
        store.clone(),
        metrics.clone(),
        config.maintenance_interval,
        shutdown.clone(),
    ));

    server::serve_mirror(
        listeners.mirror,
        mirror,
        shutdown,
        config.mirror.drain_timeout,
    )
    .await;

    let _ = maintenance.await;
    if let Some(p) = peer {
        p.shutdown().await;
    }
    let flushed = tokio::task::spawn_blocking(move || store.flush()).await;
    if let Ok(Err(e)) = flushed {
        warn!(error = %e, "could not persist access times at shutdown");
    }
    info!("agent stopped");
    Ok(())
}

/// Periodic store upkeep: eviction, stale ingest sweep, access-time flush, usage metrics.
async fn maintain(
    store: store::Store,
    metrics: metrics::Metrics,
    every: Duration,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate; the store was just opened
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = &mut shutdown => return,
        }
        let s = store.clone();
        let m = metrics.clone();
        let r = tokio::task::spawn_blocking(move || {
            match s.evict_if_needed() {
                Ok(report) if report.freed > 0 => m.evicted(report.freed),
                Ok(_) => {}
                Err(e) => warn!(error = %e, "eviction failed"),
            }
            if let Err(e) = s.sweep_ingest() {
                warn!(error = %e, "ingest sweep failed");
            }
            if let Err(e) = s.flush() {
                warn!(error = %e, "access-time flush failed");
            }
            let u = s.usage();
            m.store_usage(u.blobs, u.bytes);
        })
        .await;
        if let Err(e) = r {
            warn!(error = %e, "store maintenance task failed");
        }
    }
}
