//! One upstream registry as the gateway uses it: its replicas, the HTTP client towards them,
//! the balancer that picks one per request, and the coordinator's credentials for them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::HeaderValue;
use shoal_proto::RegistryHost;
use url::Url;

use super::balance::{Affinity, Balancer, ReplicaSpec};
use super::client::{self, ClientError, HttpClient};
use super::upstream_auth::UpstreamAuth;
use crate::config::{HealthConfig, Policy, RedirectMode, RegistryConfig};
use crate::metrics::Metrics;

/// A replica's address in the forms the gateway needs.
#[derive(Debug, Clone)]
pub struct Replica {
    pub url: Url,
    /// `scheme://host:port` without a trailing slash: the prefix of request URLs, and the
    /// replica's name in logs and metrics.
    pub label: String,
    /// The `Host` header value for requests to it.
    pub host_header: HeaderValue,
}

/// An upstream registry and its replicas.
#[derive(Debug)]
pub struct Pool {
    pub index: usize,
    pub host: RegistryHost,
    pub policy: Policy,
    pub redirect: RedirectMode,
    pub insecure_http: bool,
    /// Bounds TCP connect and TLS handshake together.
    pub connect_timeout: Duration,
    pub health: HealthConfig,
    pub replicas: Vec<Replica>,
    pub balancer: Arc<Balancer>,
    pub client: HttpClient,
    pub auth: UpstreamAuth,
    metrics: Metrics,
}

impl Pool {
    pub fn new(
        index: usize,
        cfg: &RegistryConfig,
        auth_timeout: Duration,
        metrics: Metrics,
    ) -> Result<Pool, ClientError> {
        let replicas = cfg
            .replicas
            .iter()
            .map(|r| {
                let label = r.url.as_str().trim_end_matches('/').to_owned();
                let authority = match (r.url.host_str(), r.url.port()) {
                    (Some(h), Some(p)) => format!("{h}:{p}"),
                    (Some(h), None) => h.to_owned(),
                    (None, _) => String::new(),
                };
                let host_header = HeaderValue::from_str(&authority)
                    .map_err(|_| ClientError(format!("replica {label} has no usable host name")))?;
                Ok(Replica {
                    url: r.url.clone(),
                    label,
                    host_header,
                })
            })
            .collect::<Result<Vec<_>, ClientError>>()?;
        let specs: Vec<ReplicaSpec> = cfg
            .replicas
            .iter()
            .zip(&replicas)
            .map(|(c, r)| ReplicaSpec {
                id: r.label.clone(),
                weight: c.weight,
                down: c.down,
            })
            .collect();
        let balancer = Arc::new(Balancer::new(
            cfg.policy,
            &specs,
            cfg.health.max_fails,
            cfg.health.fail_timeout,
        ));
        let client = client::build_client(
            cfg.ca_file.as_deref(),
            cfg.connect_timeout,
            cfg.insecure_http,
        )?;
        let pool = Pool {
            index,
            host: cfg.host.clone(),
            policy: cfg.policy,
            redirect: cfg.redirect,
            insecure_http: cfg.insecure_http,
            connect_timeout: cfg.connect_timeout,
            health: cfg.health.clone(),
            replicas,
            balancer,
            client,
            auth: UpstreamAuth::new(cfg.credentials.as_ref(), auth_timeout),
            metrics,
        };
        for i in 0..pool.replicas.len() {
            pool.publish(i, Instant::now());
        }
        Ok(pool)
    }

    pub fn pick(&self, affinity: Affinity<'_>, exclude: &[usize]) -> Option<usize> {
        self.balancer.pick(affinity, Instant::now(), exclude)
    }

    pub fn record_success(&self, i: usize) {
        let was = self.balancer.is_available(i, Instant::now());
        // An ejection that expired leaves the replica available but its gauge at 0 until
        // the next health round, which may be far off: the probe's success corrects it.
        let ejected = self.balancer.record_success(i);
        if !was || ejected {
            self.publish(i, Instant::now());
        }
    }

    pub fn record_failure(&self, i: usize) {
        let now = Instant::now();
        self.metrics
            .upstream_failure(self.host.as_str(), &self.replicas[i].label);
        if self.balancer.record_failure(i, now) {
            tracing::warn!(
                registry = %self.host,
                replica = %self.replicas[i].label,
                for_s = self.health.fail_timeout.as_secs_f64(),
                "replica ejected after consecutive failures"
            );
            self.publish(i, now);
        }
    }

    /// Records an active health check result.
    pub fn set_healthy(&self, i: usize, healthy: bool) {
        if self.balancer.set_healthy(i, healthy) {
            if healthy {
                tracing::info!(registry = %self.host, replica = %self.replicas[i].label, "replica healthy");
            } else {
                tracing::warn!(registry = %self.host, replica = %self.replicas[i].label, "replica failed its health check");
            }
        }
        self.publish(i, Instant::now());
    }

    /// Updates the `upstream_up` gauge of replica `i`.
    pub fn publish(&self, i: usize, now: Instant) {
        self.metrics.upstream_up(
            self.host.as_str(),
            &self.replicas[i].label,
            self.balancer.is_available(i, now),
        );
    }
}
