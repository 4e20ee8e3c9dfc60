//! Active health checks: every `interval`, `GET <path>` on each replica of a pool that is not
//! marked down. 200 or 401 means healthy (a registry that asks for credentials is up); a
//! 401's challenge also teaches the pool which scheme its credentials are for, so the first
//! push does not have to discover it.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use http::{Request, StatusCode};

use super::client;
use super::pool::Pool;

/// Checks the replicas of `pool` until `shutdown` resolves. The first round runs at once.
pub async fn run(pool: Arc<Pool>, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(pool.health.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = &mut shutdown => return,
        }
        let checks = (0..pool.replicas.len())
            .filter(|&i| !pool.balancer.is_down(i))
            .map(|i| {
                let pool = Arc::clone(&pool);
                async move {
                    let healthy = check(&pool, i).await;
                    pool.set_healthy(i, healthy);
                }
            });
        futures::future::join_all(checks).await;
        // Ejections expire with time; keep the gauge current.
        for i in 0..pool.replicas.len() {
            pool.publish(i, Instant::now());
        }
    }
}

async fn check(pool: &Pool, i: usize) -> bool {
    let replica = &pool.replicas[i];
    let url = format!("{}{}", replica.label, pool.health.path);
    let req = match Request::get(&url)
        .header(http::header::HOST, replica.host_header.clone())
        .body(client::empty())
    {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(url, error = %e, "cannot build the health check request");
            return false;
        }
    };
    let resp = match tokio::time::timeout(pool.health.timeout, pool.client.request(req)).await {
        Err(_) => {
            tracing::debug!(url, "health check timed out");
            return false;
        }
        Ok(Err(e)) => {
            tracing::debug!(url, error = %e, "health check failed");
            return false;
        }
        Ok(Ok(resp)) => resp,
    };
    match resp.status() {
        StatusCode::OK => true,
        StatusCode::UNAUTHORIZED => {
            if let Err(e) = pool.auth.learn(resp.headers(), &replica.url) {
                tracing::warn!(url, error = %e, "replica sends an unusable auth challenge");
            }
            true
        }
        status => {
            tracing::debug!(url, %status, "health check answered with an error status");
            false
        }
    }
}
