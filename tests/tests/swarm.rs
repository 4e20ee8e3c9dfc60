//! The swarm end to end: a real coordinator (or two), N agents on distinct 127.0.0.x
//! addresses sharing pieces over QUIC, a real `docker-registry` origin behind a counting,
//! throttling proxy, and `skopeo` pulling through every agent at the same moment.
//!
//! What the origin serves is read from the registry's own access log (the proxy's count is a
//! cross-check). Every agent's store is checked at the end: every file under `blobs/` hashes
//! to its name, killed agents included.

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use shoal_proto::Digest;
use shoal_proto::msg::{CoordMsg, PeerMsg, RejectReason};
use shoal_proto::tracker::coordinator_order;
use shoal_tests::bad_peer::{BadPeer, Outsider, OutsiderKind, request_piece};
use shoal_tests::cluster::{ClusterOptions, OriginServed, TestCluster, connected_nodes};
use shoal_tests::skopeo::CopyOutput;
use shoal_tests::{
    CopyOptions, ImageSpec, Skopeo, TestAgent, TestImage, verify_layout, wait_until,
};
use tempfile::TempDir;

const TEST_TIMEOUT: Duration = Duration::from_secs(150);
const MIB: usize = 1 << 20;

async fn within(test: impl Future<Output = Result<()>>) -> Result<()> {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .context("test timed out")?
}

/// Every blob of an image (config and layers) with its size.
fn blobs(image: &TestImage) -> Result<Vec<(Digest, u64)>> {
    image
        .blobs()
        .iter()
        .map(|b| Ok((Digest::parse(&b.digest)?, b.size)))
        .collect()
}

/// Bytes of every blob of `image` (what a pull fetches besides the manifest).
fn image_bytes(image: &TestImage) -> u64 {
    image.blobs().iter().map(|b| b.size).sum()
}

/// Slows every layer at the origin to `rate` bytes per second per request, so transfers
/// last long enough to act in the middle and peers matter.
fn throttle_layers(cluster: &TestCluster, image: &TestImage, rate: u64) {
    for l in &image.layers {
        cluster.origin().throttle_blob(&l.digest, rate);
    }
}

/// One pull through each of `agents` at the same moment; each result with its time.
async fn pull_all(
    cluster: &TestCluster,
    agents: &[usize],
    name: &str,
    out: &TempDir,
    timeout: Duration,
) -> Vec<(usize, PathBuf, Result<CopyOutput>)> {
    let opts = CopyOptions::default().timeout(timeout);
    let pulls = agents.iter().map(|&i| {
        let dir = out.path().join(format!("pull-{i}"));
        let opts = opts.clone();
        async move {
            let r = cluster.pull_with(i, name, &dir, &opts).await;
            (i, dir, r)
        }
    });
    futures::future::join_all(pulls).await
}

/// Where each agent's bytes came from, for the test's output.
async fn report(cluster: &TestCluster, what: &str) {
    for a in cluster.agents().iter().filter(|a| !a.is_killed()) {
        let m = |s: &'static str| async move { cluster.metric(a.index, s).await.unwrap_or(-1.0) };
        eprintln!(
            "{what}: {} upstream {:.1} MiB, peers in {:.1} MiB, peers out {:.1} MiB, bad pieces {}",
            a.name,
            m("shoal_agent_upstream_bytes_total").await / MIB as f64,
            m("shoal_agent_peer_received_bytes_total").await / MIB as f64,
            m("shoal_agent_peer_sent_bytes_total").await / MIB as f64,
            m("shoal_agent_bad_pieces_total").await,
        );
    }
}

fn ratio(served: OriginServed, image: &TestImage) -> f64 {
    served.bytes as f64 / image_bytes(image) as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_agents_pull_at_once_and_each_blob_leaves_the_origin_about_once() -> Result<()> {
    within(async {
        let cluster = TestCluster::start(ClusterOptions::new(8)).await?;
        let image = TestImage::generate(
            &ImageSpec::new(vec![24 * MIB, 22 * MIB, 20 * MIB], 401),
            "v1",
        )?;
        ensure!(image_bytes(&image) >= 64 << 20);
        let name = cluster.push(&image, "swarm/eight").await?;
        throttle_layers(&cluster, &image, 24 << 20);
        let before = cluster.origin_served();
        let proxy_before = cluster.proxy_served();

        let out = tempfile::tempdir()?;
        let started = Instant::now();
        let all: Vec<usize> = (0..8).collect();
        let results = pull_all(&cluster, &all, &name, &out, Duration::from_secs(100)).await;
        let took = started.elapsed();
        for (i, dir, r) in &results {
            let r = r.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"));
            let o = r.with_context(|| format!("pull through agent {i}"))?;
            eprintln!("agent {i}: pulled in {:?}", o.elapsed);
            verify_layout(dir, &image).with_context(|| format!("layout of agent {i}"))?;
        }
        report(&cluster, "eight").await;
        let served = cluster.origin_served() - before;
        let proxied = cluster.proxy_served() - proxy_before;
        eprintln!(
            "image {} bytes; origin served {} bytes in {} blob GETs ({:.3}x); proxy saw {} bytes in {} GETs; all pulls done in {took:?}",
            image_bytes(&image),
            served.bytes,
            served.gets,
            ratio(served, &image),
            proxied.bytes,
            proxied.gets,
        );
        ensure!(
            ratio(served, &image) <= 1.1,
            "the origin served {:.3}x the image ({} of {} bytes)",
            ratio(served, &image),
            served.bytes,
            image_bytes(&image)
        );
        ensure!(
            proxied.bytes.abs_diff(served.bytes) <= image_bytes(&image) / 100,
            "the proxy ({} bytes) and the registry's access log ({} bytes) disagree",
            proxied.bytes,
            served.bytes
        );
        let checked = cluster.check_stores()?;
        ensure!(checked >= 8 * 4, "only {checked} blobs in the stores");
        Ok(())
    })
    .await
}

/// Waits until the origin has served at least `bytes` of blob data (counted by the proxy, which
/// sees bytes as they flow; the registry logs a request only when it ends).
async fn wait_origin_progress(cluster: &TestCluster, bytes: u64) -> Result<()> {
    cluster
        .origin()
        .wait_for(
            Duration::from_secs(60),
            &format!("the origin served {bytes} blob bytes"),
            |_| cluster.origin().bytes_served_for_blobs() >= bytes,
        )
        .await
}

/// The agents uploading the most: the one that read the most from the origin (the seeder,
/// holding origin slots) and the one that sent the most to peers besides it. Waits (bounded)
/// until both are actually uploading, so that killing them interrupts transfers.
async fn busiest(cluster: &TestCluster, among: &[usize]) -> Result<(usize, usize)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut up = Vec::new();
        for &i in among {
            let origin = cluster
                .metric(i, "shoal_agent_upstream_bytes_total")
                .await?;
            let sent = cluster
                .metric(i, "shoal_agent_peer_sent_bytes_total")
                .await?;
            up.push((i, origin, sent));
        }
        let seeder = *up
            .iter()
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .context("no agents")?;
        let uploader = *up
            .iter()
            .filter(|a| a.0 != seeder.0)
            .max_by(|a, b| a.2.total_cmp(&b.2))
            .context("no second agent")?;
        if seeder.1 > 0.0 && uploader.2 > 0.0 {
            eprintln!("upload so far (agent, origin bytes, peer bytes sent): {up:?}");
            return Ok((seeder.0, uploader.0));
        }
        ensure!(
            Instant::now() < deadline,
            "no agent besides the seeder uploads to peers: {up:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `pulls` and, once `act` is done (in the middle of the pulls), carries on with them;
/// fails if every pull ended before `act` did.
async fn during<T, A>(
    pulls: impl Future<Output = T>,
    act: impl Future<Output = Result<A>>,
) -> Result<(T, A)> {
    let mut pulls = std::pin::pin!(pulls);
    let acted = tokio::select! {
        a = act => a?,
        _ = &mut pulls => anyhow::bail!("every pull ended before the action in their middle"),
    };
    Ok((pulls.await, acted))
}

/// Checks that every pull of `results` from an agent outside `except` succeeded and holds
/// the image.
fn check_pulls(
    results: &[(usize, PathBuf, Result<CopyOutput>)],
    except: &[usize],
    image: &TestImage,
) -> Result<()> {
    for (i, dir, r) in results {
        if except.contains(i) {
            eprintln!(
                "agent {i} (killed): {:?}",
                r.as_ref()
                    .map(|o| o.elapsed)
                    .map_err(|e| format!("{e:#}").chars().take(200).collect::<String>())
            );
            continue;
        }
        let o = r
            .as_ref()
            .map_err(|e| anyhow::anyhow!("{e:#}"))
            .with_context(|| format!("pull through agent {i}"))?;
        eprintln!("agent {i}: pulled in {:?}", o.elapsed);
        verify_layout(dir, image).with_context(|| format!("layout of agent {i}"))?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_two_agents_mid_transfer_leaves_every_other_pull_complete() -> Result<()> {
    within(async {
        let cluster = TestCluster::start(ClusterOptions::new(6)).await?;
        let image = TestImage::generate(
            &ImageSpec::new(vec![12 * MIB, 10 * MIB, 8 * MIB], 402),
            "v1",
        )?;
        let name = cluster.push(&image, "swarm/kill").await?;
        throttle_layers(&cluster, &image, 2 << 20);
        let before = cluster.origin_served();

        let out = tempfile::tempdir()?;
        let all: Vec<usize> = (0..6).collect();
        let started = Instant::now();
        let (results, victims) = during(
            pull_all(&cluster, &all, &name, &out, Duration::from_secs(100)),
            async {
                // A third of the image has left the origin: the seeder is mid-blob and
                // peers are sharing what it read. Kill the seeder and the busiest uploader.
                wait_origin_progress(&cluster, image_bytes(&image) / 3).await?;
                let (seeder, uploader) = busiest(&cluster, &all).await?;
                cluster.kill_agent(seeder)?;
                cluster.kill_agent(uploader)?;
                eprintln!(
                    "killed agents {seeder} (seeder) and {uploader} after {:?}",
                    started.elapsed()
                );
                Ok(vec![seeder, uploader])
            },
        )
        .await?;
        check_pulls(&results, &victims, &image)?;
        eprintln!("every other pull done after {:?}", started.elapsed());
        report(&cluster, "kill").await;
        let served = cluster.origin_served() - before;
        eprintln!(
            "origin served {} bytes in {} GETs ({:.3}x the image)",
            served.bytes,
            served.gets,
            ratio(served, &image)
        );
        cluster.check_stores()?;
        Ok(())
    })
    .await
}

/// When the misbehaving member claims to hold every blob of the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Claim {
    /// Before any pull starts (nobody has read the blobs yet).
    First,
    /// Once the seeder has read part of the image from the origin.
    MidTransfer,
}

/// Five agents pull while an enrolled member claims every blob and answers every piece
/// request with wrong bytes: nothing corrupt is committed anywhere, every pull completes and
/// verifies, and the liar ends up quarantined (refused by the tracker and by the agents).
async fn corrupt_peer(claim: Claim, seed: u64) -> Result<()> {
    let cluster = TestCluster::start(ClusterOptions::new(5)).await?;
    let image = TestImage::generate(&ImageSpec::new(vec![8 * MIB, 6 * MIB, 6 * MIB], seed), "v1")?;
    let name = cluster.push(&image, "swarm/bad").await?;
    throttle_layers(&cluster, &image, 1 << 20);
    let bad = BadPeer::start(
        cluster.member_config("bad-peer", "127.0.0.1:1".parse()?, &PathBuf::new())?,
        "127.0.0.100".parse()?,
    )
    .await?;
    cluster.wait_connected(6).await?;
    if claim == Claim::First {
        bad.claim(&blobs(&image)?);
    }

    let out = tempfile::tempdir()?;
    let started = Instant::now();
    let results = match claim {
        Claim::First => {
            let all: Vec<usize> = (0..5).collect();
            pull_all(&cluster, &all, &name, &out, Duration::from_secs(100)).await
        }
        Claim::MidTransfer => {
            // Agent 0 starts alone and becomes the seeder; once it has read a quarter of the
            // image (and published those pieces' hashes), the liar claims everything, and
            // the four others start: their locates name the liar as a complete holder.
            let first = pull_all(&cluster, &[0], &name, &out, Duration::from_secs(100));
            let rest = async {
                wait_origin_progress(&cluster, image_bytes(&image) / 4).await?;
                bad.claim(&blobs(&image)?);
                eprintln!(
                    "the bad peer claims every blob after {:?}",
                    started.elapsed()
                );
                Ok::<_, anyhow::Error>(
                    pull_all(
                        &cluster,
                        &[1, 2, 3, 4],
                        &name,
                        &out,
                        Duration::from_secs(100),
                    )
                    .await,
                )
            };
            let (mut first, rest) = tokio::join!(first, rest);
            first.append(&mut rest?);
            first
        }
    };
    eprintln!("pulls ended after {:?}", started.elapsed());
    report(&cluster, "bad").await;
    eprintln!(
        "the bad peer: {} connections, {} sessions, {} corrupt pieces sent",
        bad.stats().connections.load(Ordering::Relaxed),
        bad.stats().sessions.load(Ordering::Relaxed),
        bad.corrupt_pieces_served()
    );
    // Nothing corrupt anywhere, whatever else happened.
    let checked = cluster.check_stores()?;
    eprintln!("{checked} committed blobs hash to their names");
    check_pulls(&results, &[], &image)?;
    let served = cluster.origin_served();
    eprintln!("origin served {:.3}x the image", ratio(served, &image));

    ensure!(
        bad.corrupt_pieces_served() > 0,
        "no agent asked the bad peer for a piece, so it was never caught (origin served {:.3}x the image)",
        ratio(served, &image)
    );
    let mut rejected = 0.0;
    for i in 0..5 {
        rejected += cluster.metric(i, "shoal_agent_bad_pieces_total").await?;
    }
    ensure!(rejected > 0.0, "no agent counted a bad piece");
    // Quarantined: the coordinator tells every member (the liar included) to refuse it.
    let coordinator = cluster.coordinator(0).context("coordinator")?;
    wait_until(
        Duration::from_secs(15),
        "the bad peer is quarantined",
        || async { bad.is_refused() },
    )
    .await?;
    let reports = coordinator
        .metric_sum("shoal_coordinator_cluster_bad_peer_reports_total", &[])
        .await?;
    ensure!(reports >= 2.0, "{reports} bad peer reports");
    let member = cluster
        .start_member("probe", "127.0.0.101".parse()?)
        .await?;
    wait_until(
        Duration::from_secs(10),
        "a member that joins later is told to refuse the bad peer",
        || async { member.is_refused(bad.node()) },
    )
    .await?;
    // ... and the agents refuse its connections.
    let honest = cluster.agent(0);
    let refused = request_piece(
        bad.cluster().peer_client_config(),
        bad.addr().ip(),
        honest.peer_addr,
        &honest.node(),
        &blobs(&image)?[0].0,
        0,
    )
    .await;
    ensure!(
        matches!(
            refused,
            Err(_)
                | Ok(PeerMsg::Reject {
                    reason: RejectReason::Forbidden,
                    ..
                })
        ),
        "an agent served the quarantined peer: {refused:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_sending_corrupt_pieces_is_quarantined_and_nothing_corrupt_is_committed()
-> Result<()> {
    within(corrupt_peer(Claim::MidTransfer, 403)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_claiming_every_blob_before_anyone_read_it_is_caught_too() -> Result<()> {
    within(corrupt_peer(Claim::First, 404)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_coordinator_that_owns_the_image_mid_pull_leaves_every_pull_complete()
-> Result<()> {
    within(async {
        let image = TestImage::generate(
            &ImageSpec::new(vec![10 * MIB, 8 * MIB, 6 * MIB], 405),
            "v1",
        )?;
        // Name the two coordinators so that one of them owns every blob of the image.
        let digests: Vec<Digest> = blobs(&image)?.into_iter().map(|b| b.0).collect();
        let (names, owner) = (0..1000)
            .find_map(|k| {
                let names = [format!("coord-{k}a"), format!("coord-{k}b")];
                let owners: Vec<usize> = digests
                    .iter()
                    .filter_map(|d| coordinator_order(d, &names).first().copied())
                    .collect();
                let first = *owners.first()?;
                owners.iter().all(|&o| o == first).then_some((names, first))
            })
            .context("no pair of names puts every blob on one coordinator")?;
        let survivor = 1 - owner;
        let cluster =
            TestCluster::start(ClusterOptions::new(5).two_coordinators(&names[0], &names[1]))
                .await?;
        let name = cluster.push(&image, "swarm/failover").await?;
        throttle_layers(&cluster, &image, 2 << 20);
        let before = cluster.origin_served();
        let locates = |j: usize| {
            let c = cluster.coordinator(j);
            async move {
                match c {
                    Some(c) => c.metric_sum("shoal_coordinator_cluster_locates_total", &[]).await,
                    None => Ok(0.0),
                }
            }
        };
        let survivor_before = locates(survivor).await?;

        let out = tempfile::tempdir()?;
        let all: Vec<usize> = (0..5).collect();
        let started = Instant::now();
        let (results, ()) = during(
            pull_all(&cluster, &all, &name, &out, Duration::from_secs(100)),
            async {
                wait_origin_progress(&cluster, image_bytes(&image) / 3).await?;
                ensure!(
                    locates(owner).await? > 0.0,
                    "the owner {} answered no locate",
                    names[owner]
                );
                cluster.kill_coordinator(owner)?;
                eprintln!(
                    "killed {} (owner of every blob) after {:?}",
                    names[owner],
                    started.elapsed()
                );
                Ok(())
            },
        )
        .await?;
        check_pulls(&results, &[], &image)?;
        eprintln!("every pull done after {:?}", started.elapsed());
        report(&cluster, "failover").await;
        let served = cluster.origin_served() - before;
        let took_over = locates(survivor).await? - survivor_before;
        eprintln!(
            "origin served {:.3}x the image in {} GETs; {} answered {took_over} locates after the kill",
            ratio(served, &image),
            served.gets,
            names[survivor]
        );
        ensure!(
            took_over > 0.0,
            "the surviving coordinator {} answered no locate: did the swarm move to it?",
            names[survivor]
        );
        let asked = match cluster.coordinator(survivor) {
            Some(c) => {
                c.metric_sum("shoal_coordinator_cluster_manifests_asked_total", &[])
                    .await?
            }
            None => 0.0,
        };
        eprintln!("{} asked holders for {asked} manifests", names[survivor]);
        // The survivor learns the pieces from the holders (their kept manifests, the slot
        // holders' hashes) instead of sending a second reader to the origin: about one copy.
        ensure!(
            ratio(served, &image) <= 1.25,
            "the origin served {:.3}x the image across the failover",
            ratio(served, &image)
        );
        cluster.check_stores()?;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_without_a_cluster_certificate_reach_neither_peers_nor_the_control_channel()
-> Result<()> {
    within(async {
        let cluster = TestCluster::start(ClusterOptions::new(2)).await?;
        let image = TestImage::generate(&ImageSpec::new(vec![2 * MIB], 406), "v1")?;
        let name = cluster.push(&image, "swarm/outsiders").await?;
        let out = tempfile::tempdir()?;
        cluster.pull(0, &name, &out.path().join("a")).await?;
        let layer = Digest::parse(&image.layers[0].digest)?;
        let holder = cluster.agent(0);
        let ca = cluster.cluster_ca_der()?;
        let ctl = cluster.ctl_addr(0).context("no control address")?;

        // A member with a cluster certificate is served (the probe itself works) ...
        let member = cluster.start_member("probe", "127.0.0.50".parse()?).await?;
        let served = request_piece(
            member.peer_client_config(),
            member.ip(),
            holder.peer_addr,
            &holder.node(),
            &layer,
            0,
        )
        .await?;
        ensure!(
            matches!(served, PeerMsg::Piece { .. }),
            "a member was not served: {served:?}"
        );

        // ... an outsider with a certificate from another CA, or none, is not: neither by
        // a real agent's peer endpoint nor by the coordinator's control channel.
        let peer_addr: std::net::SocketAddr = "127.0.0.51:7000".parse()?;
        for kind in [OutsiderKind::ForeignCa, OutsiderKind::NoCertificate] {
            let o = Outsider::new(kind, "intruder", peer_addr.ip())?;
            let r = o
                .try_peer(&ca, holder.peer_addr, &holder.node(), &layer)
                .await;
            ensure!(
                r.is_err(),
                "{kind:?}: the agent's peer endpoint answered {r:?}"
            );
            let r = o.try_control(&ca, ctl, "coord-a", peer_addr).await;
            ensure!(
                matches!(r, Err(_) | Ok(CoordMsg::Refused { .. })),
                "{kind:?}: the control channel answered {r:?}"
            );
        }
        // Members do not fetch from a peer whose certificate comes from another CA either.
        let foreign = Outsider::new(OutsiderKind::ForeignCa, "stranger", "127.0.0.53".parse()?)?;
        let (addr, handshake, _server) = foreign.serve_foreign()?;
        let r = request_piece(
            member.peer_client_config(),
            member.ip(),
            addr,
            foreign.node(),
            &layer,
            0,
        )
        .await;
        ensure!(r.is_err(), "a member talked to a foreign peer: {r:?}");
        ensure!(
            !tokio::time::timeout(Duration::from_secs(15), handshake).await??,
            "a handshake with the foreign peer completed"
        );

        // A whole agent holding a certificate from another CA: it never joins (no session,
        // no peer bytes), and its pull still completes, from the origin.
        let intruder = Outsider::new(
            OutsiderKind::ForeignCa,
            "node-intruder",
            "127.0.0.52".parse()?,
        )?;
        let store = tempfile::tempdir()?;
        let state = store.path().join("store").join("cluster");
        {
            use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&state)?;
            let mut f = std::fs::OpenOptions::new()
                .create_new(true)
                .write(true)
                .mode(0o600)
                .open(state.join("identity.pem"))?;
            std::io::Write::write_all(
                &mut f,
                intruder.identity_pem().context("no identity")?.as_bytes(),
            )?;
        }
        let wrong_token = store.path().join("wrong-token");
        std::fs::write(&wrong_token, "not-the-cluster-token-0123456789")?;
        let mut opts = cluster.agent_options("node-intruder", "127.0.0.52".parse()?)?;
        opts.store_dir = Some(store.path().join("store"));
        opts.extra_toml = with_token_file(&opts.extra_toml, &wrong_token);
        let sent_before = peer_bytes_sent(&cluster).await?;
        let agent = TestAgent::start_with(opts).await?;
        let pulled = tempfile::tempdir()?;
        let src = format!("{}/{name}", agent.host_port());
        Skopeo::pull(&src, &pulled.path().join("oci"), &CopyOptions::default()).await?;
        verify_layout(&pulled.path().join("oci"), &image)?;
        ensure!(
            agent
                .metric("shoal_agent_peer_received_bytes_total")
                .await?
                == 0.0,
            "the intruder received piece bytes"
        );
        ensure!(
            agent.metric("shoal_agent_upstream_bytes_total").await? >= image_bytes(&image) as f64,
            "the intruder's pull did not come from the origin"
        );
        ensure!(
            peer_bytes_sent(&cluster).await? == sent_before,
            "a member sent piece bytes to the intruder"
        );
        let coordinator = cluster.coordinator(0).context("coordinator")?;
        ensure!(
            connected_nodes(coordinator).await == Some(3),
            "the coordinator has a session with the intruder (2 agents and the probe expected)"
        );

        // An agent with no certificate and a wrong token cannot enroll: it does not start.
        let mut opts = cluster.agent_options("node-nocert", "127.0.0.54".parse()?)?;
        opts.extra_toml = with_token_file(&opts.extra_toml, &wrong_token);
        let err = match TestAgent::start_with(opts).await {
            Ok(_) => anyhow::bail!("an agent enrolled with a wrong token"),
            Err(e) => format!("{e:#}"),
        };
        ensure!(err.contains("refused"), "{err}");
        ensure!(
            !err.contains("not-the-cluster-token"),
            "the token was echoed: {err}"
        );
        Ok(())
    })
    .await
}

/// The config with `bootstrap_token_file` pointing at `file`.
fn with_token_file(toml: &str, file: &std::path::Path) -> String {
    toml.lines()
        .map(|l| {
            if l.starts_with("bootstrap_token_file") {
                format!("bootstrap_token_file = {:?}", file.to_string_lossy())
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Piece bytes every agent of the cluster has sent to peers.
async fn peer_bytes_sent(cluster: &TestCluster) -> Result<f64> {
    let mut sum = 0.0;
    for a in cluster.agents().iter().filter(|a| !a.is_killed()) {
        sum += cluster
            .metric(a.index, "shoal_agent_peer_sent_bytes_total")
            .await?;
    }
    Ok(sum)
}
