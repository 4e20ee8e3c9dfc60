//! Shoal coordinator: the registry front door (TLS, authentication, access rules, load
//! balancing over upstream registry replicas, coalescing), and later the cluster CA and the
//! tracker.
//!
//! [`run`] takes already-bound listeners and a shutdown future, so tests start a real
//! coordinator on port 0 and stop it cleanly; the `shoal-coordinator serve` command only
//! loads the config, binds and waits for SIGTERM.
//!
//! Modules:
//! - [`config`]: TOML file + flags → validated [`Config`];
//! - [`gateway`]: the registry gateway (accept loops, auth, routing, forwarding, balancing,
//!   health, coalescing, access log);
//! - [`htpasswd`], [`auth`], [`access`], [`users`]: credentials and access rules;
//! - [`certs`], [`tls`]: `cert init` and the reloadable server certificate;
//! - [`reload`]: SIGHUP and file-change reloads; [`metrics`]: Prometheus metrics;
//! - [`cli`]: the command line, so that the binary stays a thin shell.

pub mod access;
pub mod auth;
pub mod certs;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod gateway;
pub mod htpasswd;
pub mod metrics;
pub mod reload;
pub mod tls;
pub mod users;

mod fsutil;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, Stream, StreamExt};
use tokio::net::TcpListener;
use tracing::{info, warn};

pub use config::{Config, ConfigError, Overrides};

use crate::gateway::accesslog::AccessLog;
use crate::gateway::pool::Pool;
use crate::gateway::server::{Limits, Transport};

/// Why the coordinator could not start.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("TLS certificate: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("{0}")]
    Htpasswd(#[from] htpasswd::LoadError),
    #[error("registry {host}: {reason}")]
    Upstream { host: String, reason: String },
    #[error("cannot open the access log: {0}")]
    AccessLog(std::io::Error),
    #[error("cluster: {0}")]
    Cluster(#[from] cluster::ClusterStartError),
    #[error("coalescing spool directory {}: {source}", path.display())]
    Spool {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The listeners the coordinator serves on, bound by the caller.
#[derive(Debug)]
pub struct Listeners {
    /// The HTTPS front door.
    pub https: TcpListener,
    /// Plain HTTP (`insecure_http_listen`), if configured.
    pub http: Option<TcpListener>,
    pub metrics: Option<TcpListener>,
    /// The control channel's UDP socket (`[cluster] listen`); bound by `run` from the config
    /// when `None` and a `[cluster]` section is present.
    pub cluster: Option<std::net::UdpSocket>,
}

/// Runs the coordinator until `shutdown` resolves, then drains and returns. SIGHUP reloads
/// the certificate, the htpasswd file and the access log.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), CoordinatorError> {
    run_with_reload(config, listeners, shutdown, sighup()).await
}

/// [`run`], with reloads triggered by `reload` instead of SIGHUP (for embedding and tests).
pub async fn run_with_reload(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
    reload: impl Stream<Item = ()> + Send + Unpin + 'static,
) -> Result<(), CoordinatorError> {
    let resolver = Arc::new(tls::ReloadingCertResolver::load(
        &config.server.tls_cert,
        &config.server.tls_key,
        tls::provider(),
    )?);
    let tls_config = tls::server_config(Arc::clone(&resolver))?;

    // The authenticator and the file it reloads from.
    let auth = match &config.auth {
        None => {
            warn!("auth.insecure_no_auth: anyone who reaches the coordinator may pull and push");
            None
        }
        Some(a) => {
            let auth = Arc::new(auth::Authenticator::load(
                &a.htpasswd,
                a.rules.clone(),
                a.tuning.clone(),
            )?);
            info!(htpasswd = %a.htpasswd.display(), users = auth.user_count(), "htpasswd loaded");
            Some((auth, a.htpasswd.clone()))
        }
    };

    let access_log =
        AccessLog::start(&config.log.access_log).map_err(CoordinatorError::AccessLog)?;
    let metrics = metrics::Metrics::new();

    if config.coalescing.enabled {
        let dir = &config.coalescing.spool_dir;
        let spool_err = |source| CoordinatorError::Spool {
            path: dir.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(spool_err)?;
        // Fail now, not at the first coalesced request, if the directory is not writable.
        tempfile::tempfile_in(dir).map_err(spool_err)?;
    }

    let mut pools = Vec::new();
    for (i, r) in config.registries.iter().enumerate() {
        let pool = Pool::new(i, r, Duration::from_secs(30), metrics.clone()).map_err(|e| {
            CoordinatorError::Upstream {
                host: r.host.to_string(),
                reason: e.0,
            }
        })?;
        info!(
            registry = %r.host,
            policy = %r.policy,
            replicas = ?pool.replicas.iter().map(|x| x.label.as_str()).collect::<Vec<_>>(),
            "upstream registry"
        );
        pools.push(Arc::new(pool));
    }

    let shutdown = shutdown.shared();
    let cluster = match &config.cluster {
        None => None,
        Some(c) => {
            let socket = match listeners.cluster {
                Some(s) => s,
                None => std::net::UdpSocket::bind(c.listen).map_err(|e| {
                    CoordinatorError::Cluster(cluster::ClusterStartError::Socket(e))
                })?,
            };
            log_front_door_pin(&resolver);
            Some(cluster::start(
                c,
                socket,
                metrics.clone(),
                shutdown.clone(),
            )?)
        }
    };

    let mut gateway = gateway::Gateway::new(
        &config,
        auth.as_ref().map(|(a, _)| Arc::clone(a)),
        pools.clone(),
        metrics.clone(),
        access_log.clone(),
    );
    if let Some(c) = &cluster {
        gateway = gateway.with_enrollment(Arc::clone(&c.enroller));
    }
    let gateway = Arc::new(gateway);

    let mut background = Vec::new();
    for pool in &pools {
        background.push(tokio::spawn(gateway::health::run(
            Arc::clone(pool),
            shutdown.clone(),
        )));
    }
    if let Some(l) = listeners.metrics {
        info!(listen = ?l.local_addr().ok(), "metrics listening");
        background.push(tokio::spawn(gateway::server::serve_metrics(
            l,
            metrics.clone(),
            shutdown.clone(),
        )));
    }
    let reloader = reload::Reloader::new(
        Arc::clone(&resolver),
        config.server.tls_cert.clone(),
        config.server.tls_key.clone(),
        auth,
        config.source.clone(),
        access_log.clone(),
        metrics.clone(),
    );
    background.push(tokio::spawn(reload_loop(
        reloader,
        reload,
        config.server.reload_poll,
        shutdown.clone(),
    )));

    let mut serving = Vec::new();
    info!(listen = ?listeners.https.local_addr().ok(), "https listening");
    serving.push((
        listeners.https,
        Transport::Tls(tokio_rustls::TlsAcceptor::from(tls_config)),
    ));
    if let Some(l) = listeners.http {
        warn!(listen = ?l.local_addr().ok(), "plain http listening (insecure_http_listen): credentials cross the network in clear");
        serving.push((l, Transport::Plain));
    }
    gateway::server::serve(
        serving,
        gateway,
        Limits::from(&config.server),
        shutdown,
        config.server.drain_timeout,
    )
    .await;

    for task in background {
        let _ = task.await;
    }
    if let Some(c) = cluster {
        c.join().await;
    }
    access_log.flush(Duration::from_secs(5));
    info!("coordinator stopped");
    Ok(())
}

/// Logs the `ca_pin` agents can use to trust this front door when they enroll: the SHA-256 of
/// the key of the CA certificate at the end of the served chain.
fn log_front_door_pin(resolver: &tls::ReloadingCertResolver) {
    let current = resolver.current();
    match current.cert.as_slice() {
        [_, .., ca] => match shoal_agent::cluster::spki_pin(ca) {
            Ok(pin) => {
                info!(ca_pin = %format!("sha256:{}", hex::encode(pin)), "front door CA pin for agents' [cluster] ca_pin")
            }
            Err(e) => warn!(error = %e, "cannot compute the front door CA pin"),
        },
        _ => info!(
            "the front door serves no CA certificate in its chain: agents need ca_file (or the system roots) to enroll"
        ),
    }
}

/// Reloads on each item of `signals` and, every `poll`, whatever changed on disk.
async fn reload_loop(
    reloader: reload::Reloader,
    mut signals: impl Stream<Item = ()> + Unpin,
    poll: Option<Duration>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    // Reloading reads files and may hash a dummy password: off the async threads.
    let reloader = Arc::new(std::sync::Mutex::new(reloader));
    let run = |f: fn(&mut reload::Reloader)| {
        let reloader = Arc::clone(&reloader);
        tokio::task::spawn_blocking(move || {
            f(&mut reloader
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner))
        })
    };
    let mut tick = tokio::time::interval(poll.unwrap_or(Duration::from_secs(3600)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            Some(()) = signals.next() => {
                let _ = run(reload::Reloader::reload_all).await;
            }
            _ = tick.tick(), if poll.is_some() => {
                let _ = run(reload::Reloader::poll).await;
            }
            () = &mut shutdown => return,
        }
    }
}

/// SIGHUP as a stream; never yields if the handler cannot be installed.
fn sighup() -> std::pin::Pin<Box<dyn Stream<Item = ()> + Send>> {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::hangup()) {
        Ok(mut s) => Box::pin(futures::stream::poll_fn(move |cx| s.poll_recv(cx))),
        Err(e) => {
            warn!(error = %e, "cannot install a SIGHUP handler; reloads only by file polling");
            Box::pin(futures::stream::pending())
        }
    }
}
