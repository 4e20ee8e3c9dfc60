//! In-process tests of the data plane over real QUIC on 127.0.0.x: hostile frames, a blob
//! fetched from a peer, a cold pull by several agents that reads the origin about once,
//! partial blobs served while they download, stalled and corrupt peers, the fallback to the
//! origin without a coordinator, and the bandwidth limits holding in real transfers. Every wait
//! has a timeout; nothing sleeps to synchronise.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use shoal_proto::Digest;
use shoal_proto::msg::{AgentMsg, NodeId, PeerMsg, PieceData, RejectReason};
use shoal_proto::piece::{Geometry, MIN_PIECE_LEN};
use shoal_proto::tracker::TrackerConfig;
use shoal_proto::wire::{self, Decoder};

use super::testing::{Origin, TestCa, TestNode, TestTracker, random_blob};
use super::{Fault, PeerConfig, code};

const DEADLINE: Duration = Duration::from_secs(60);
const PL: usize = MIN_PIECE_LEN as usize;

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no result within {DEADLINE:?}"))
}

fn cluster() -> (Arc<TestTracker>, Arc<TestCa>) {
    crate::peer::tests::init_tracing();
    (TestTracker::new(TrackerConfig::default()), TestCa::new())
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "shoal_agent=info".into()),
        )
        .try_init();
}

/// A quinn client that is not an agent: speaks raw frames.
struct Raw {
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
}

impl Raw {
    fn new(ca: &TestCa, name: &str) -> Raw {
        let cert = ca.issue(name);
        Raw {
            endpoint: quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap(),
            config: ca.client_config(&cert),
        }
    }

    async fn connect(&self, node: &TestNode) -> Result<quinn::Connection, String> {
        let c = self
            .endpoint
            .connect_with(
                self.config.clone(),
                node.peer.local_addr(),
                node.node().as_str(),
            )
            .map_err(|e| e.to_string())?;
        within("handshake", c).await.map_err(|e| e.to_string())
    }
}

/// Sends `bytes` on a new stream and expects the server to close the connection for a
/// protocol violation.
async fn expect_closed(conn: &quinn::Connection, bytes: &[u8]) {
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    let _ = send.write_all(bytes).await;
    let _ = send.finish();
    let err = within("connection close", conn.closed()).await;
    match err {
        quinn::ConnectionError::ApplicationClosed(c) => assert_eq!(c.error_code, code::PROTOCOL),
        other => panic!("closed for another reason: {other:?}"),
    }
}

/// Sends one frame on a new stream and reads one frame back.
async fn ask(conn: &quinn::Connection, msg: &PeerMsg) -> PeerMsg {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&wire::encode(msg).unwrap()).await.unwrap();
    send.finish().unwrap();
    let bytes = within("answer", recv.read_to_end(20 << 20)).await.unwrap();
    let mut dec = Decoder::<PeerMsg>::new();
    let mut input = &bytes[..];
    dec.decode(&mut input).unwrap().expect("one whole frame")
}

#[tokio::test]
async fn hostile_frames_close_the_connection_and_never_panic() {
    let (tracker, ca) = cluster();
    let a = TestNode::start(
        &tracker,
        &ca,
        "node-a",
        1,
        "http://127.0.0.1:9",
        PeerConfig::default(),
    )
    .await;
    let blob = random_blob(3 * PL - 10, 1);
    let d = a.seed(&blob).await;
    let raw = Raw::new(&ca, "mallory");

    // A header announcing a control frame far above the bound.
    let conn = raw.connect(&a).await.unwrap();
    expect_closed(&conn, &[wire::VERSION, 3, 0, 0x10, 0, 0]).await;
    // A piece-data frame where a stream must start with Have or Request.
    let conn = raw.connect(&a).await.unwrap();
    let piece = PeerMsg::Piece {
        digest: d.clone(),
        piece: 0,
        data: PieceData::new(vec![0; 10]).unwrap(),
    };
    expect_closed(&conn, &wire::encode(&piece).unwrap()).await;
    // A well-formed frame of the wrong kind to start a stream.
    let conn = raw.connect(&a).await.unwrap();
    let reject = PeerMsg::Reject {
        digest: d.clone(),
        piece: 0,
        reason: RejectReason::Busy,
    };
    expect_closed(&conn, &wire::encode(&reject).unwrap()).await;
    // Another protocol version, and garbage.
    let conn = raw.connect(&a).await.unwrap();
    expect_closed(&conn, &[9, 3, 0, 0, 0, 1, 0]).await;
    let conn = raw.connect(&a).await.unwrap();
    expect_closed(&conn, &[wire::VERSION, 3, 0, 0, 0, 3, 0xff, 0xff, 0xff]).await;
    // A piece index past the blob's end.
    let conn = raw.connect(&a).await.unwrap();
    let past = PeerMsg::Request {
        digest: d.clone(),
        piece: 3,
    };
    expect_closed(&conn, &wire::encode(&past).unwrap()).await;

    // An unknown digest is a normal race (evicted, never had it): refused, connection kept.
    let conn = raw.connect(&a).await.unwrap();
    let unknown = Digest::sha256_of(b"nobody has this");
    let r = ask(
        &conn,
        &PeerMsg::Request {
            digest: unknown.clone(),
            piece: 0,
        },
    )
    .await;
    assert_eq!(
        r,
        PeerMsg::Reject {
            digest: unknown.clone(),
            piece: 0,
            reason: RejectReason::UnknownBlob
        }
    );
    // The server is unharmed: a proper request gets the verified piece, a session its Have.
    let r = ask(
        &conn,
        &PeerMsg::Request {
            digest: d.clone(),
            piece: 2,
        },
    )
    .await;
    let g = Geometry::for_size(blob.len() as u64);
    let range = g.range(2).unwrap();
    match r {
        PeerMsg::Piece {
            digest,
            piece: 2,
            data,
        } => {
            assert_eq!(digest, d);
            assert_eq!(
                data.as_slice(),
                &blob[range.start as usize..range.end as usize]
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(conn.close_reason().is_none());

    // A certificate from another CA does not get in.
    let other = TestCa::new();
    let stranger = Raw::new(&other, "stranger");
    if let Ok(conn) = stranger.connect(&a).await {
        // TLS 1.3: the client may finish before the server refuses its certificate; then the
        // connection is closed right after.
        within("rejection", conn.closed()).await;
    }
    // A refused node is closed at once.
    tracker
        .refused
        .lock()
        .unwrap()
        .insert(NodeId::new("mallory").unwrap());
    if let Ok(conn) = raw.connect(&a).await {
        let err = within("refusal", conn.closed()).await;
        assert!(
            matches!(err, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == code::REFUSED)
        );
    }
}

#[tokio::test]
async fn a_peer_fetches_a_seeded_blob_over_quic() {
    let (tracker, ca) = cluster();
    let origin = Origin::start().await;
    let a = TestNode::plain(&tracker, &ca, "node-a", 1, &origin.url()).await;
    let b = TestNode::plain(&tracker, &ca, "node-b", 2, &origin.url()).await;
    let blob = random_blob(5 * PL + 123, 2);
    let d = a.seed(&blob).await;
    origin.add(&blob);

    let got = within("pull", b.pull(&d)).await.unwrap();
    assert_eq!(got.len(), blob.len());
    assert!(got == blob, "content differs");
    assert!(b.store.contains(&d), "committed");
    assert_eq!(origin.served(), 0, "the origin was not needed");
    assert!(b.peer.connected_peers().contains(a.node()));
    let text = b.metrics.encode();
    assert!(
        text.contains(&format!(
            "shoal_agent_peer_received_bytes_total {}",
            blob.len()
        )),
        "{text}"
    );
    // B announced the blob complete, so a third node can get it from either.
    let announced = tracker.sent(|m| matches!(m, AgentMsg::Announce(a) if a.complete.contains(&d)));
    assert!(announced.iter().any(|(n, _)| n == b.node()));
}

#[tokio::test]
async fn an_evicted_blob_is_withdrawn_from_the_tracker() {
    let (tracker, ca) = cluster();
    let origin = Origin::start().await;
    let blob_len = 4 * PL;
    // Room for one of the two blobs.
    let cap = Some((blob_len + blob_len / 2) as u64);
    let a = TestNode::start_capped(
        &tracker,
        &ca,
        "node-a",
        1,
        &origin.url(),
        PeerConfig::default(),
        cap,
    )
    .await;
    let b = TestNode::plain(&tracker, &ca, "node-b", 2, &origin.url()).await;
    let first = a.seed(&random_blob(blob_len, 11)).await;
    let holders = |r: &shoal_proto::msg::LocateReply| {
        r.peers.iter().map(|p| p.node.clone()).collect::<Vec<_>>()
    };
    assert_eq!(
        holders(&b.control_locate(&first).await),
        vec![a.node().clone()]
    );

    let second = a.seed(&random_blob(blob_len, 12)).await;
    let store = a.store.clone();
    tokio::task::spawn_blocking(move || store.evict_if_needed())
        .await
        .unwrap()
        .unwrap();
    assert!(!a.store.contains(&first), "the older blob was evicted");
    assert!(a.store.contains(&second));
    let withdrawn = tracker.sent(
        |m| matches!(m, AgentMsg::Withdraw { digests } if digests == std::slice::from_ref(&first)),
    );
    assert_eq!(withdrawn.len(), 1, "one Withdraw for the evicted blob");
    assert_eq!(&withdrawn[0].0, a.node());
    assert!(
        holders(&b.control_locate(&first).await).is_empty(),
        "the tracker no longer sends peers to A for it"
    );
    assert_eq!(
        holders(&b.control_locate(&second).await),
        vec![a.node().clone()]
    );
}

#[tokio::test]
async fn a_blob_the_upstream_refuses_is_not_taken_from_peers() {
    let (tracker, ca) = cluster();
    let origin = Origin::start().await;
    let a = TestNode::plain(&tracker, &ca, "node-a", 3, &origin.url()).await;
    let b = TestNode::plain(&tracker, &ca, "node-b", 4, &origin.url()).await;
    // A holds it; the origin does not have it in this repository (as a registry answers for
    // a blob not linked there, or for a repository this node may not read).
    let d = a.seed(&random_blob(3 * PL, 13)).await;
    let err = within("pull", b.pull(&d)).await.unwrap_err();
    assert!(err.contains("not found upstream"), "{err}");
    assert!(!b.store.contains(&d));
    let text = b.metrics.encode();
    assert!(
        text.contains("shoal_agent_peer_received_bytes_total 0"),
        "{text}"
    );
    assert!(b.peer.connected_peers().is_empty(), "B asked A for it");
}

#[tokio::test]
async fn a_cold_pull_by_three_agents_reads_the_origin_about_once() {
    let (tracker, ca) = cluster();
    let origin = Origin::start().await;
    let size = 24 * PL + 77;
    let blob = random_blob(size, 3);
    let d = origin.add(&blob);
    let mut nodes = Vec::new();
    for (i, name) in ["node-a", "node-b", "node-c"].iter().enumerate() {
        nodes.push(
            TestNode::start(
                &tracker,
                &ca,
                name,
                10 + i as u8,
                &origin.url(),
                PeerConfig::default(),
            )
            .await,
        );
    }
    let pulls = nodes.iter().map(|n| n.pull(&d));
    let results = within("three pulls", futures::future::join_all(pulls)).await;
    for (n, r) in nodes.iter().zip(results) {
        let got = r.unwrap_or_else(|e| panic!("{}: {e}", n.node()));
        assert!(got == blob, "{}: content differs", n.node());
        assert!(n.store.contains(&d));
    }
    let served = origin.served();
    assert!(
        served as f64 <= 1.1 * size as f64,
        "the origin served {served} bytes for a blob of {size}"
    );
    // The seeder published the anchored manifest.
    assert_eq!(
        tracker
            .sent(|m| matches!(m, AgentMsg::PublishManifest(_)))
            .len(),
        1
    );
}

#[tokio::test]
async fn verified_pieces_are_served_while_the_blob_still_downloads() {
    let (tracker, ca) = cluster();
    let origin = Origin::start().await;
    let size = 16 * PL;
    let blob = random_blob(size, 4);
    let d = origin.add(&blob);
    // The seeder reads the origin slowly: about two seconds for the blob.
    let slow = PeerConfig {
        origin_limit: Some(2 << 20),
        ..PeerConfig::default()
    };
    let a = TestNode::start(&tracker, &ca, "node-a", 20, &origin.url(), slow).await;
    let b = TestNode::plain(&tracker, &ca, "node-b", 21, &origin.url()).await;
    // A takes the origin slot first.
    let a_pull = tokio::spawn({
        let (downloads, upstream, d) = (a.downloads.clone(), a.upstream.clone(), d.clone());
        async move {
            let name = shoal_proto::RepoName::parse(super::testing::REPO).unwrap();
            let sub = match downloads.join(&upstream, &name, &d) {
                crate::fetch::Join::Started(s) => s,
                other => panic!("{other:?}"),
            };
            let mut sub = sub;
            sub.finished().await.map(|_| tokio::time::Instant::now())
        }
    });
    within("A starts", async {
        while tracker
            .sent(|m| matches!(m, AgentMsg::PublishHashes(_)))
            .is_empty()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let name = shoal_proto::RepoName::parse(super::testing::REPO).unwrap();
    let sub = match b.downloads.join(&b.upstream, &name, &d) {
        crate::fetch::Join::Started(s) => s,
        other => panic!("{other:?}"),
    };
    let mut stream = sub.into_stream(0, None);
    let first = within("B's first bytes", futures::StreamExt::next(&mut stream))
        .await
        .unwrap()
        .unwrap();
    let first_at = tokio::time::Instant::now();
    let mut got = first.to_vec();
    while let Some(c) = within("B's pull", futures::StreamExt::next(&mut stream)).await {
        got.extend_from_slice(&c.unwrap());
    }
    let a_done = within("A's pull", a_pull).await.unwrap().unwrap();
    assert!(got == blob);
    assert!(
        first_at < a_done,
        "B streamed bytes only after A had the whole blob"
    );
    assert!(
        origin.served() as f64 <= 1.1 * size as f64,
        "origin served {}",
        origin.served()
    );
}

#[tokio::test]
async fn a_stalled_peer_is_abandoned_within_seconds() {
    let (tracker, ca) = cluster();
    let origin = Origin::start().await;
    let quick = PeerConfig {
        stall_timeout: Duration::from_secs(1),
        ..PeerConfig::default()
    };
    let staller = TestNode::start(
        &tracker,
        &ca,
        "node-stall",
        30,
        &origin.url(),
        quick.clone(),
    )
    .await;
    let honest =
        TestNode::start(&tracker, &ca, "node-good", 31, &origin.url(), quick.clone()).await;
    let c = TestNode::start(&tracker, &ca, "node-c", 32, &origin.url(), quick).await;
    let blob = random_blob(8 * PL, 5);
    let d = staller.seed(&blob).await;
    origin.add(&blob);
    staller.peer.set_fault(Fault::Stall);
    let started = tokio::time::Instant::now();
    let pull = tokio::spawn({
        let c = Arc::new(c);
        let d = d.clone();
        async move { c.pull(&d).await }
    });
    // The only holder takes C's requests and sits on them...
    within("requests to the staller", async {
        while staller.peer.stalled_requests() == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // ...until another holder appears: C gives up on the staller and gets every piece.
    honest.seed(&blob).await;
    let got = within("pull", pull).await.unwrap().unwrap();
    assert!(got == blob);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(origin.served(), 0);
}

#[tokio::test]
async fn a_corrupt_peer_is_reported_and_nothing_bad_is_committed() {
    let (tracker, ca) = cluster();
    let origin = Origin::start().await;
    let liar = TestNode::plain(&tracker, &ca, "node-liar", 40, &origin.url()).await;
    let honest = TestNode::plain(&tracker, &ca, "node-good", 41, &origin.url()).await;
    let c = TestNode::plain(&tracker, &ca, "node-c", 42, &origin.url()).await;
    let blob = random_blob(12 * PL, 6);
    let d = liar.seed(&blob).await;
    honest.seed(&blob).await;
    origin.add(&blob);
    liar.peer.set_fault(Fault::Corrupt);
    let got = within("pull", c.pull(&d)).await.unwrap();
    assert!(got == blob, "content differs");
    let reports = tracker.sent(
        |m| matches!(m, AgentMsg::ReportBadPeer { peer, .. } if peer.as_str() == "node-liar"),
    );
    assert!(!reports.is_empty(), "the corrupt peer was not reported");
    assert!(c.metrics.encode().contains("shoal_agent_bad_pieces_total"));
    assert!(
        !c.metrics
            .encode()
            .contains("shoal_agent_bad_pieces_total 0")
    );
}

#[tokio::test]
async fn a_blob_that_fails_its_digest_aborts_every_client_and_then_goes_direct() {
    let (tracker, ca) = cluster();
    let origin = Origin::start().await;
    let blob = random_blob(6 * PL, 10);
    let d = Digest::sha256_of(&blob);
    let mut bad = blob.clone();
    bad[5 * PL + 7] ^= 1;
    // The origin serves wrong bytes: the seeder's provisional hashes describe them, so every
    // piece checks out and only the whole-blob digest can tell.
    origin.put(&d, &bad);
    let a = TestNode::plain(&tracker, &ca, "node-a", 70, &origin.url()).await;
    let b = TestNode::plain(&tracker, &ca, "node-b", 71, &origin.url()).await;
    let (ra, rb) = within("pulls", futures::future::join(a.pull(&d), b.pull(&d))).await;
    assert!(
        ra.is_err() && rb.is_err(),
        "a client got a complete-looking wrong blob"
    );
    assert!(
        !a.store.contains(&d) && !b.store.contains(&d),
        "a wrong blob was committed"
    );
    assert!(
        a.metrics
            .encode()
            .contains("shoal_agent_verification_failures_total 1")
    );
    // The origin is fixed; the next pull reads it directly instead of trusting the swarm's
    // hashes again.
    origin.put(&d, &blob);
    let before = origin.served();
    let got = within("second pull", a.pull(&d)).await.unwrap();
    assert!(got == blob);
    assert_eq!(
        origin.served() - before,
        blob.len() as u64,
        "one direct read of the blob"
    );
}

#[tokio::test]
async fn an_interrupted_download_resumes_with_its_re_verified_pieces() {
    let (tracker, ca) = cluster();
    let origin = Origin::start().await;
    let a = TestNode::plain(&tracker, &ca, "node-a", 80, &origin.url()).await;
    let b = TestNode::plain(&tracker, &ca, "node-b", 81, &origin.url()).await;
    let blob = random_blob(10 * PL, 11);
    let d = a.seed(&blob).await;
    origin.add(&blob);
    let g = Geometry::for_size(blob.len() as u64);
    let piece = |i: u32| {
        let r = g.range(i).unwrap();
        blob[r.start as usize..r.end as usize].to_vec()
    };
    // What a crash left at B: pieces 0-3 recorded (3 damaged on disk), 4 written unrecorded.
    {
        let (store, d) = (b.store.clone(), d.clone());
        let mut damaged = piece(3);
        damaged[9] ^= 1;
        let pieces = (0..4).map(piece).collect::<Vec<_>>();
        let four = piece(4);
        tokio::task::spawn_blocking(move || {
            let ing = store.piece_ingest(&d).unwrap();
            ing.set_geometry(g).unwrap();
            for (i, p) in pieces.iter().enumerate() {
                let bytes = if i == 3 { &damaged } else { p };
                ing.write_piece(i as u32, bytes).unwrap();
            }
            ing.checkpoint().unwrap();
            ing.write_piece(4, &four).unwrap();
        })
        .await
        .unwrap();
    }
    let got = within("pull", b.pull(&d)).await.unwrap();
    assert!(got == blob);
    // Pieces 0-2 came from disk; 3 (damaged) and 4 (unrecorded) and the rest from A.
    let text = b.metrics.encode();
    let want = format!("shoal_agent_peer_received_bytes_total {}", 7 * PL);
    assert!(text.contains(&want), "{text}");
}

#[tokio::test]
async fn without_a_coordinator_the_pull_reads_the_origin() {
    let (tracker, ca) = cluster();
    let origin = Origin::start().await;
    let b = TestNode::plain(&tracker, &ca, "node-b", 50, &origin.url()).await;
    let blob = random_blob(3 * PL + 5, 7);
    let d = origin.add(&blob);
    tracker.available.store(false, Ordering::SeqCst);
    let got = within("pull", b.pull(&d)).await.unwrap();
    assert!(got == blob);
    assert!(b.store.contains(&d));
    assert_eq!(origin.served(), blob.len() as u64);
}

#[tokio::test]
async fn with_no_peer_and_no_slot_the_origin_is_read_anyway() {
    let (tracker, ca) = cluster();
    let origin = Origin::start().await;
    let quick = PeerConfig {
        origin_fallback: Duration::from_secs(1),
        ..PeerConfig::default()
    };
    let a = TestNode::start(&tracker, &ca, "node-a", 60, &origin.url(), quick.clone()).await;
    let b = TestNode::start(&tracker, &ca, "node-b", 61, &origin.url(), quick).await;
    let blob = random_blob(4 * PL, 8);
    let d = origin.add(&blob);
    // A takes the slot and then vanishes without a word (its endpoint closes, the tracker
    // still believes in it).
    let r = a.control_locate(&d).await;
    assert!(r.origin);
    a.peer.shutdown().await;
    let got = within("pull", b.pull(&d)).await.unwrap();
    assert!(got == blob);
}

/// Throughput of one peer-to-peer transfer on loopback, unshaped and shaped (not a test of
/// correctness: run it with `--ignored --nocapture` to see the figures).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn throughput() {
    let (tracker, ca) = cluster();
    let origin = Origin::start().await;
    let size = 128 << 20;
    let blob = random_blob(size, 9);
    for (name, limit) in [
        ("unshaped", None),
        ("download_limit 32MiB/s", Some(32 << 20)),
    ] {
        let config = PeerConfig {
            download_limit: limit,
            ..PeerConfig::default()
        };
        let a = TestNode::plain(&tracker, &ca, "node-a", 90, &origin.url()).await;
        let b = TestNode::start(&tracker, &ca, "node-b", 91, &origin.url(), config).await;
        let d = a.seed(&blob).await;
        origin.add(&blob);
        let t = tokio::time::Instant::now();
        let got = within("pull", b.pull(&d)).await.unwrap();
        let secs = t.elapsed().as_secs_f64();
        assert!(got == blob);
        println!(
            "{name}: {size} bytes in {secs:.2}s = {:.1} MiB/s",
            size as f64 / secs / 1048576.0
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Bandwidth limits in real transfers.
//
// Each test moves a known number of bytes through a shaped agent and measures the wall-clock
// time it took. A slow or busy machine only makes a transfer slower, so the assertions are
// lower bounds on the time (equivalently, upper bounds on the rate) with generous tolerance:
// the observed rate is at most 1.5x the cap (the bucket's quarter-second burst included), and
// the transfer takes at least 0.6x of size/cap. Unshaped, the same transfers take a small
// fraction of that on loopback, so neither bound passes if the limit is ignored.

/// A shaped rate: 2 MiB/s, so a few MiB take a couple of seconds.
const CAP: u64 = 2 << 20;

/// The value of an unlabelled counter in a node's metrics.
fn counter(node: &TestNode, name: &str) -> u64 {
    let text = node.metrics.encode();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no counter {name} in\n{text}"))
}

/// Asserts that `bytes` moved in `elapsed` kept within `cap` bytes per second, and that a
/// transfer of `size` bytes at `cap` took at least 0.6 of its nominal time.
fn assert_within_cap(what: &str, bytes: u64, size: u64, elapsed: Duration, cap: u64) {
    let secs = elapsed.as_secs_f64();
    let rate = bytes as f64 / secs;
    let nominal = size as f64 / cap as f64;
    println!(
        "{what}: {bytes} bytes in {secs:.2} s = {:.2} MiB/s (cap {:.2} MiB/s, {:.2}x); \
         nominal time {nominal:.2} s",
        rate / 1048576.0,
        cap as f64 / 1048576.0,
        rate / cap as f64,
    );
    assert!(
        rate <= 1.5 * cap as f64,
        "{what}: {rate:.0} B/s is more than 1.5x the cap of {cap} B/s"
    );
    assert!(
        secs >= 0.6 * nominal,
        "{what}: {size} bytes in {secs:.2} s, faster than 0.6x of {nominal:.2} s at the cap"
    );
}

#[tokio::test]
async fn the_upload_limit_holds_for_all_peers_together() {
    let (tracker, ca) = cluster();
    let origin = Origin::start().await;
    let capped = PeerConfig {
        upload_limit: Some(CAP),
        ..PeerConfig::default()
    };
    let a = TestNode::start(&tracker, &ca, "node-a", 100, &origin.url(), capped).await;
    let b = TestNode::plain(&tracker, &ca, "node-b", 101, &origin.url()).await;
    let c = TestNode::plain(&tracker, &ca, "node-c", 102, &origin.url()).await;
    let size = 20 * PL; // 5 MiB
    let blob = random_blob(size, 20);
    // A is the only holder; the origin answers the pullers' HEAD, and must not be read.
    let d = a.seed(&blob).await;
    origin.add(&blob);
    let t0 = std::time::Instant::now();
    let (rb, rc) = within("pulls", futures::future::join(b.pull(&d), c.pull(&d))).await;
    let elapsed = t0.elapsed();
    assert!(
        rb.unwrap() == blob && rc.unwrap() == blob,
        "content differs"
    );
    assert_eq!(origin.served(), 0, "the origin was read");
    // Every byte left A under its limit, whichever of the two it went to (they also share
    // pieces between themselves, unshaped).
    let sent = counter(&a, "shoal_agent_peer_sent_bytes_total");
    assert!(sent >= size as u64, "A sent {sent} bytes of {size}");
    assert_within_cap("upload from A to B and C", sent, sent, elapsed, CAP);
}

#[tokio::test]
async fn the_download_limit_holds_for_all_sources_together() {
    let (tracker, ca) = cluster();
    let origin = Origin::start().await;
    let capped = PeerConfig {
        download_limit: Some(CAP),
        ..PeerConfig::default()
    };
    let a = TestNode::plain(&tracker, &ca, "node-a", 110, &origin.url()).await;
    let c = TestNode::plain(&tracker, &ca, "node-c", 112, &origin.url()).await;
    let b = TestNode::start(&tracker, &ca, "node-b", 111, &origin.url(), capped).await;
    let size = 20 * PL; // 5 MiB
    let blob = random_blob(size, 21);
    // Two holders, both unshaped: B may take pieces from both at once.
    let d = a.seed(&blob).await;
    c.seed(&blob).await;
    origin.add(&blob);
    let t0 = std::time::Instant::now();
    let got = within("pull", b.pull(&d)).await.unwrap();
    let elapsed = t0.elapsed();
    assert!(got == blob, "content differs");
    assert_eq!(origin.served(), 0, "the origin was read");
    let received = counter(&b, "shoal_agent_peer_received_bytes_total");
    let (from_a, from_c) = (
        counter(&a, "shoal_agent_peer_sent_bytes_total"),
        counter(&c, "shoal_agent_peer_sent_bytes_total"),
    );
    println!("B received {from_a} bytes from A and {from_c} from C");
    assert!(received >= size as u64);
    assert_within_cap("download by B", received, size as u64, elapsed, CAP);
}

#[tokio::test]
async fn the_download_limit_holds_for_origin_reads() {
    let (tracker, ca) = cluster();
    let origin = Origin::start().await;
    let capped = PeerConfig {
        download_limit: Some(CAP),
        ..PeerConfig::default()
    };
    let b = TestNode::start(&tracker, &ca, "node-b", 113, &origin.url(), capped).await;
    let size = 16 * PL; // 4 MiB
    let blob = random_blob(size, 22);
    let d = origin.add(&blob);
    let t0 = std::time::Instant::now();
    let got = within("pull", b.pull(&d)).await.unwrap();
    let elapsed = t0.elapsed();
    assert!(got == blob, "content differs");
    let read = origin.served();
    assert_eq!(read, size as u64, "one read of the blob from the origin");
    assert_within_cap("origin read by B", read, read, elapsed, CAP);
}

#[tokio::test]
async fn the_origin_limit_holds_for_all_origin_reads_together() {
    let (tracker, ca) = cluster();
    let origin = Origin::start().await;
    let capped = PeerConfig {
        origin_limit: Some(CAP),
        ..PeerConfig::default()
    };
    let a = TestNode::start(&tracker, &ca, "node-a", 120, &origin.url(), capped).await;
    // Two blobs at once, each under its own origin slot: the limit is the agent's, not the
    // transfer's.
    let size = 10 * PL; // 2.5 MiB each
    let (x, y) = (random_blob(size, 23), random_blob(size, 24));
    let (dx, dy) = (origin.add(&x), origin.add(&y));
    let t0 = std::time::Instant::now();
    let (rx, ry) = within("pulls", futures::future::join(a.pull(&dx), a.pull(&dy))).await;
    let elapsed = t0.elapsed();
    assert!(rx.unwrap() == x && ry.unwrap() == y, "content differs");
    let slots = tracker.sent(|m| matches!(m, AgentMsg::PublishHashes(_)));
    assert!(!slots.is_empty(), "A read the origin under a slot");
    let read = origin.served();
    assert_eq!(
        read,
        2 * size as u64,
        "one read of each blob from the origin"
    );
    assert_within_cap("origin reads by A", read, read, elapsed, CAP);
}

#[tokio::test]
async fn the_origin_limit_holds_without_a_coordinator() {
    let (tracker, ca) = cluster();
    let origin = Origin::start().await;
    let capped = PeerConfig {
        origin_limit: Some(CAP),
        ..PeerConfig::default()
    };
    let a = TestNode::start(&tracker, &ca, "node-a", 121, &origin.url(), capped).await;
    let size = 16 * PL; // 4 MiB
    let blob = random_blob(size, 25);
    let d = origin.add(&blob);
    // No locate answer: the download goes straight to the origin, outside the swarm.
    tracker.available.store(false, Ordering::SeqCst);
    let t0 = std::time::Instant::now();
    let got = within("pull", a.pull(&d)).await.unwrap();
    let elapsed = t0.elapsed();
    assert!(got == blob, "content differs");
    let read = origin.served();
    assert_eq!(read, size as u64);
    assert_within_cap("direct origin read by A", read, read, elapsed, CAP);
}

#[tokio::test]
async fn the_download_limit_holds_on_the_wire() {
    let (tracker, ca) = cluster();
    let origin = Origin::start().await;
    // Many requests in flight: each would bring a whole piece at the link's speed, ahead of
    // the limited reads, if the peer could send it all before it is read.
    let capped = PeerConfig {
        download_limit: Some(CAP),
        max_requests_per_peer: 16,
        ..PeerConfig::default()
    };
    let a = TestNode::plain(&tracker, &ca, "node-a", 114, &origin.url()).await;
    let b = TestNode::start(&tracker, &ca, "node-b", 115, &origin.url(), capped).await;
    let size = 16 * PL; // 4 MiB
    let blob = random_blob(size, 26);
    let d = a.seed(&blob).await;
    origin.add(&blob);
    let t0 = std::time::Instant::now();
    let pull = b.pull(&d);
    tokio::pin!(pull);
    // The bytes B's socket received from A, sampled as the transfer goes. At any moment they
    // may exceed the limit's share of the time so far by the bucket's burst and one receive
    // window (a quarter of a second's worth each), plus packet overhead.
    let allowance = 2 * (CAP / 4) + (256 << 10);
    let mut samples = Vec::new();
    let got = within("pull", async {
        loop {
            tokio::select! {
                r = &mut pull => break r,
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
            let wire = b
                .peer
                .inner
                .connection(a.node())
                .map_or(0, |c| c.stats().udp_rx.bytes);
            // Taken after the count, so the time can only be overstated.
            samples.push((t0.elapsed(), wire));
        }
    })
    .await
    .unwrap();
    let elapsed = t0.elapsed();
    assert!(got == blob, "content differs");
    let worst = samples
        .iter()
        .map(|&(t, wire)| wire as f64 - 1.5 * CAP as f64 * t.as_secs_f64())
        .fold(f64::MIN, f64::max);
    println!(
        "{} samples; at most {worst:.0} bytes on the wire beyond 1.5x the cap (allowed {allowance}); \
         first {:?}",
        samples.len(),
        samples.iter().find(|s| s.1 > 0)
    );
    assert!(
        worst <= allowance as f64,
        "B's link received {worst:.0} bytes beyond 1.5x its download limit: {samples:?}"
    );
    assert_within_cap("download by B", size as u64, size as u64, elapsed, CAP);
}

/// Waits until `node`'s endpoint has exactly one open connection.
async fn one_connection(what: &str, node: &TestNode) {
    let wait = Duration::from_secs(10);
    tokio::time::timeout(wait, async {
        while node.peer.inner.endpoint.open_connections() != 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        let n = node.peer.inner.endpoint.open_connections();
        panic!("{what}: {n} connections open after {wait:?}")
    });
}

#[tokio::test]
async fn peers_dialing_each_other_at_once_keep_one_connection() {
    let (tracker, ca) = cluster();
    let origin = Origin::start().await;
    let a = TestNode::plain(&tracker, &ca, "node-a", 130, &origin.url()).await;
    let b = TestNode::plain(&tracker, &ca, "node-b", 131, &origin.url()).await;
    // Both dial before either handshake is done: two connections come up.
    let (ab, ba) = within(
        "dials",
        futures::future::join(
            a.peer.inner.connect(b.node(), b.peer.local_addr()),
            b.peer.inner.connect(a.node(), a.peer.local_addr()),
        ),
    )
    .await;
    let (ab, ba) = (ab.unwrap(), ba.unwrap());
    // B's dial was the duplicate: node-a is the lower id and keeps the one it opened.
    one_connection("A's duplicate closed", &a).await;
    one_connection("B's duplicate closed", &b).await;
    let at_a = a
        .peer
        .inner
        .connection(b.node())
        .expect("A's connection to B");
    let at_b = b
        .peer
        .inner
        .connection(a.node())
        .expect("B's connection to A");
    assert_eq!(at_a.side(), quinn::Side::Client, "A keeps its own dial");
    assert_eq!(at_b.side(), quinn::Side::Server, "B uses A's dial");
    assert_eq!(at_a.stable_id(), ab.stable_id());
    assert!(ba.close_reason().is_some(), "B's dial was closed");
    // The kept connection carries transfers both ways, and no new one is opened for them.
    let x = random_blob(4 * PL + 1, 30);
    let y = random_blob(4 * PL + 2, 31);
    let dx = a.seed(&x).await;
    let dy = b.seed(&y).await;
    origin.add(&x);
    origin.add(&y);
    let (gx, gy) = within("pulls", futures::future::join(b.pull(&dx), a.pull(&dy))).await;
    assert!(gx.unwrap() == x && gy.unwrap() == y, "content differs");
    assert_eq!(origin.served(), 0);
    assert_eq!(a.peer.inner.endpoint.open_connections(), 1);
    assert_eq!(b.peer.inner.endpoint.open_connections(), 1);
}

#[tokio::test]
async fn sessions_on_a_duplicate_connection_move_to_the_kept_one() {
    let (tracker, ca) = cluster();
    let origin = Origin::start().await;
    let a = TestNode::plain(&tracker, &ca, "node-a", 132, &origin.url()).await;
    let b = TestNode::plain(&tracker, &ca, "node-b", 133, &origin.url()).await;
    // Each holds what the other pulls, so both downloads dial at the same moment and open
    // their sessions on whichever connection they got.
    let x = random_blob(4 * PL, 32);
    let y = random_blob(4 * PL, 33);
    let dx = a.seed(&x).await;
    let dy = b.seed(&y).await;
    origin.add(&x);
    origin.add(&y);
    let t0 = std::time::Instant::now();
    let (gx, gy) = within("pulls", futures::future::join(b.pull(&dx), a.pull(&dy))).await;
    let elapsed = t0.elapsed();
    assert!(gx.unwrap() == x && gy.unwrap() == y, "content differs");
    assert_eq!(origin.served(), 0, "a pull fell back to the origin");
    // A session that ended with its connection, instead of moving, would leave its download
    // without the peer until the next locate, 2 s later (these pulls take a fraction of a
    // second on loopback).
    assert!(
        elapsed < Duration::from_secs(2),
        "the pulls took {elapsed:?}: a session waited for a locate to find its peer again"
    );
    one_connection("A's duplicate closed", &a).await;
    one_connection("B's duplicate closed", &b).await;
}
