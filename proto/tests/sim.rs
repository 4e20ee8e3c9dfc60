//! Deterministic simulations of the tracker and swarm state machines: hundreds of nodes pull
//! one blob at once through an in-memory network with a virtual clock (see `sim/mod.rs`).

#[path = "sim/harness.rs"]
mod harness;

use std::time::Duration;

use harness::{MIB, Params, Report, Sim};

fn figures(name: &str, p: &Params, r: &Report) {
    let bound = p.lower_bound().as_secs_f64();
    println!(
        "{name}: nodes={} size={} MiB pieces={} origin_pieces={} ({:.3}x) slowest={:.2}s \
         median={:.2}s bound={:.2}s slowest/bound={:.2} median/bound={:.2} rejected={} \
         seeders={:?} revoked={:?} quarantined={:?} events={}",
        p.nodes,
        p.size / MIB,
        r.pieces,
        r.origin_pieces,
        r.origin_pieces as f64 / f64::from(r.pieces),
        r.slowest().as_secs_f64(),
        r.median().as_secs_f64(),
        bound,
        r.slowest().as_secs_f64() / bound,
        r.median().as_secs_f64() / bound,
        r.rejected,
        r.seeders,
        r.revoked,
        r.quarantined_at_tracker,
        r.events,
    );
}

/// Every live node completed, well before the horizon (no deadlock), with genuine pieces only.
fn assert_complete(p: &Params, r: &Report) {
    for (i, done) in r.completed.iter().enumerate() {
        if !r.dead.contains(&i) {
            assert!(done.is_some(), "node {i} did not complete by {:?}", r.end);
        }
    }
    assert!(r.slowest() < p.horizon);
    assert!(r.all_genuine, "a node stored a piece that was not genuine");
    assert!(
        r.completed_whole,
        "a node completed without every genuine piece"
    );
}

#[test]
fn the_simulation_is_deterministic() {
    let mut p = Params::new(30, 16 * MIB);
    p.seed = 9;
    p.kills = vec![(3, Duration::from_secs(1))];
    let a = Sim::new(p.clone()).run();
    let b = Sim::new(p.clone()).run();
    assert_eq!(a.completed, b.completed);
    assert_eq!(a.events, b.events);
    assert_eq!(a.origin_pieces, b.origin_pieces);
    p.seed = 10;
    let c = Sim::new(p).run();
    assert_ne!(a.completed, c.completed, "the seed matters");
}

#[test]
fn two_hundred_nodes_pull_one_blob_from_one_origin_copy() {
    let p = Params::new(200, 64 * MIB);
    let r = Sim::new(p.clone()).run();
    figures("200 nodes", &p, &r);
    assert_complete(&p, &r);
    assert_eq!(r.pieces, 128);
    assert!(
        r.origin_pieces as f64 <= 1.1 * f64::from(r.pieces),
        "origin served {} pieces for a {}-piece blob",
        r.origin_pieces,
        r.pieces
    );
    assert_eq!(r.seeders.len(), 1, "one origin slot, never moved");
    assert!(
        r.slowest() <= p.lower_bound().mul_f64(2.0),
        "slowest {:?} vs bound {:?}",
        r.slowest(),
        p.lower_bound()
    );
}

#[test]
fn nodes_dying_mid_transfer_do_not_stop_the_others() {
    let mut p = Params::new(60, 32 * MIB);
    p.seed = 2;
    // Four downloaders and the seeder itself die mid-transfer.
    p.kills = vec![
        (10, Duration::from_secs(3)),
        (20, Duration::from_secs(3)),
        (30, Duration::from_secs(4)),
        (40, Duration::from_secs(5)),
    ];
    p.kill_first_seeder_at = Some(Duration::from_secs(4));
    let r = Sim::new(p.clone()).run();
    figures("deaths", &p, &r);
    assert_eq!(r.dead.len(), 5, "{:?}", r.dead);
    assert!(r.dead.contains(&r.seeders[0]));
    assert_complete(&p, &r);
    assert!(
        r.seeders.len() >= 2,
        "the seeder's slot moved: {:?}",
        r.seeders
    );
    assert!(
        r.origin_pieces as f64 <= 1.5 * f64::from(r.pieces),
        "origin served {} pieces",
        r.origin_pieces
    );
}

#[test]
fn a_corrupt_peer_is_quarantined_and_nothing_corrupt_is_stored() {
    let mut p = Params::new(40, 16 * MIB);
    p.seed = 3;
    p.corrupt = vec![5];
    let r = Sim::new(p.clone()).run();
    figures("corrupt peer", &p, &r);
    assert_complete(&p, &r);
    assert!(r.rejected > 0, "the corrupt peer was never asked");
    assert_eq!(r.quarantined_at_tracker, vec![5]);
}

#[test]
fn a_stalled_seeder_loses_its_origin_slot() {
    let mut p = Params::new(40, 16 * MIB);
    p.seed = 4;
    p.hang_first_seeder_at = Some(Duration::from_secs(2));
    let r = Sim::new(p.clone()).run();
    figures("stalled seeder", &p, &r);
    assert_complete(&p, &r);
    assert!(r.seeders.len() >= 2, "{:?}", r.seeders);
    assert_eq!(
        r.revoked.first(),
        r.seeders.first(),
        "the first seeder was revoked"
    );
    assert!(
        r.origin_pieces as f64 <= 1.1 * f64::from(r.pieces),
        "origin served {} pieces",
        r.origin_pieces
    );
}

/// The 200-node run with a line per virtual second: `cargo test -p shoal-proto --test sim --
/// --ignored --nocapture trace`.
#[test]
#[ignore]
fn trace() {
    let mut p = Params::new(200, 64 * MIB);
    p.trace = true;
    let r = Sim::new(p.clone()).run();
    figures("trace", &p, &r);
}

/// Larger and smaller clusters, for the figures (not run by default):
/// `cargo test -p shoal-proto --test sim -- --ignored --nocapture scale`.
#[test]
#[ignore]
fn scale() {
    for (nodes, size) in [(20, 64 * MIB), (1000, 64 * MIB)] {
        let p = Params::new(nodes, size);
        let r = Sim::new(p.clone()).run();
        figures(&format!("{nodes} nodes"), &p, &r);
        assert_complete(&p, &r);
    }
}
