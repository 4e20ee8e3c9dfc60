//! Graceful shutdown of the coordinator: once told to stop it accepts no new connection, and
//! a download in flight through it finishes (within the drain timeout, 5 s in the harness).

use std::future::Future;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use shoal_tests::coordinator::{CoordinatorOptions, TestCoordinator, require_coordinator_tools};
use shoal_tests::http::push_blob;
use shoal_tests::image::sha256_digest;
use shoal_tests::{Proxy, Registry, wait_until};

const TEST_TIMEOUT: Duration = Duration::from_secs(120);
const MIB: usize = 1 << 20;

async fn within(test: impl Future<Output = Result<()>>) -> Result<()> {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .context("test timed out")?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stopping_the_coordinator_lets_an_in_flight_download_finish() -> Result<()> {
    within(async {
        require_coordinator_tools()?;
        let registry = Registry::start().await?;
        let blob: Vec<u8> = (0..4 * MIB).map(|i| (i * 13 % 251) as u8).collect();
        let digest = push_blob(&registry.url(), "drain/app", &blob).await?;
        let proxy = Proxy::start(&registry.url()).await?;
        // The upstream body stops after 1 MiB until released: the download is in flight for
        // as long as the test wants.
        proxy.stall_blob_after(&digest, MIB as u64);
        let c = TestCoordinator::start(CoordinatorOptions::new(&[proxy.url()])).await?;
        let client = c.client()?;
        let url = c.url(&format!("/v2/drain/app/blobs/{digest}"));
        let download = tokio::spawn({
            let (client, url) = (client.clone(), url.clone());
            async move {
                let r = client.get(&url).send().await?;
                ensure!(r.status() == 200, "{}", r.status());
                anyhow::Ok(r.bytes().await?.to_vec())
            }
        });
        proxy
            .wait_for(Duration::from_secs(20), "1 MiB of the blob sent", |reqs| {
                reqs.iter()
                    .any(|r| r.blob_digest() == Some(digest.as_str()) && r.body_bytes >= MIB as u64)
            })
            .await?;

        let addr = c.host_port();
        let stopping = tokio::spawn(c.stop());
        // No new connection once the coordinator is stopping.
        wait_until(Duration::from_secs(10), "the listener closed", || {
            let addr = addr.clone();
            async move { tokio::net::TcpStream::connect(&addr).await.is_err() }
        })
        .await?;
        ensure!(
            !stopping.is_finished(),
            "the coordinator stopped before the download ended"
        );
        proxy.release_stalls();
        proxy.clear_faults();
        let body = download.await??;
        ensure!(
            body.len() == blob.len() && sha256_digest(&body) == digest,
            "the drained download got {} bytes, not the blob",
            body.len()
        );
        stopping.await??;
        Ok(())
    })
    .await
}

/// A download still stalled when the drain timeout (5 s here) runs out is aborted: the client
/// sees a broken transfer, never a short "complete" body, and the coordinator stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_download_outliving_the_drain_timeout_is_aborted_not_cut_short() -> Result<()> {
    within(async {
        require_coordinator_tools()?;
        let registry = Registry::start().await?;
        let blob: Vec<u8> = (0..2 * MIB).map(|i| (i * 17 % 251) as u8).collect();
        let digest = push_blob(&registry.url(), "drain/late", &blob).await?;
        let proxy = Proxy::start(&registry.url()).await?;
        proxy.stall_blob_after(&digest, MIB as u64 / 2);
        let c = TestCoordinator::start(CoordinatorOptions::new(&[proxy.url()])).await?;
        let url = c.url(&format!("/v2/drain/late/blobs/{digest}"));
        let client = c.client()?;
        let download = tokio::spawn(async move {
            let r = client.get(&url).send().await?;
            ensure!(r.status() == 200, "{}", r.status());
            anyhow::Ok(r.bytes().await.map(|b| b.len()))
        });
        proxy
            .wait_for(Duration::from_secs(20), "half a MiB sent", |reqs| {
                reqs.iter().any(|r| {
                    r.blob_digest() == Some(digest.as_str()) && r.body_bytes >= MIB as u64 / 2
                })
            })
            .await?;
        c.stop().await?;
        match download.await?? {
            Err(_) => {}
            Ok(n) => anyhow::bail!("the client saw a complete body of {n} bytes"),
        }
        proxy.release_stalls();
        Ok(())
    })
    .await
}
