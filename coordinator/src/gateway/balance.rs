//! Replica selection for one pool: the five policies, the `down` flag, active health and
//! passive ejection. No IO and no clock: `now` is an argument, so every decision is tested
//! without sockets or sleeps.
//!
//! Which replicas are candidates for a request: not `down`, not excluded by the caller (a
//! retry never goes back to a replica that just failed), and available (healthy by the last
//! active check, and not ejected). When no replica is available, the ones that are merely
//! unhealthy or ejected are tried anyway: a request that might succeed beats a certain 502.
//!
//! Passive ejection: `max_fails` consecutive failures take a replica out for `fail_timeout`.
//! When that time has passed it is a candidate again with its failure count kept, so one more
//! failure ejects it again at once (the probe), and one success clears the count.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

use crate::config::Policy;

/// What a request offers for hashing policies.
#[derive(Clone, Copy, Debug)]
pub enum Affinity<'a> {
    None,
    /// The client address (`ip_hash`).
    Client(IpAddr),
    /// A blob or manifest digest, as text (`digest_hash`).
    Digest(&'a str),
}

/// One replica as the balancer sees it.
#[derive(Debug)]
struct Replica {
    /// Stable identity for rendezvous hashing (the replica URL).
    id: String,
    weight: u32,
    down: bool,
    healthy: AtomicBool,
    passive: Mutex<Passive>,
    /// Requests in flight, for `least_conn`.
    active: AtomicUsize,
}

#[derive(Debug, Default)]
struct Passive {
    consecutive_fails: u32,
    ejected_until: Option<Instant>,
}

/// The selection state of a pool. Shared by every request of the pool.
#[derive(Debug)]
pub struct Balancer {
    policy: Policy,
    replicas: Vec<Replica>,
    max_fails: u32,
    fail_timeout: Duration,
    /// Turn counter of the round-robin policies and of tie breaks.
    turn: AtomicUsize,
    /// Current weights of smooth weighted round robin, one per replica.
    smooth: Mutex<Vec<i64>>,
}

/// A replica as configured: identity, weight, and whether it is out of rotation by hand.
#[derive(Clone, Debug)]
pub struct ReplicaSpec {
    pub id: String,
    pub weight: u32,
    pub down: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update is a plain assignment; the state is consistent even after a panic.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Balancer {
    pub fn new(
        policy: Policy,
        replicas: &[ReplicaSpec],
        max_fails: u32,
        fail_timeout: Duration,
    ) -> Balancer {
        Balancer {
            policy,
            replicas: replicas
                .iter()
                .map(|r| Replica {
                    id: r.id.clone(),
                    weight: r.weight.max(1),
                    down: r.down,
                    healthy: AtomicBool::new(true),
                    passive: Mutex::new(Passive::default()),
                    active: AtomicUsize::new(0),
                })
                .collect(),
            max_fails: max_fails.max(1),
            fail_timeout,
            turn: AtomicUsize::new(0),
            smooth: Mutex::new(vec![0; replicas.len()]),
        }
    }

    pub fn len(&self) -> usize {
        self.replicas.len()
    }

    pub fn is_empty(&self) -> bool {
        self.replicas.is_empty()
    }

    /// Whether replica `i` would be chosen without falling back: not down, healthy, not ejected.
    pub fn is_available(&self, i: usize, now: Instant) -> bool {
        let r = &self.replicas[i];
        !r.down && r.healthy.load(Ordering::Relaxed) && !self.is_ejected(i, now)
    }

    pub fn is_down(&self, i: usize) -> bool {
        self.replicas[i].down
    }

    fn is_ejected(&self, i: usize, now: Instant) -> bool {
        lock(&self.replicas[i].passive)
            .ejected_until
            .is_some_and(|until| now < until)
    }

    /// Picks a replica for a request, never one in `exclude`. `None` when every replica is
    /// down or excluded.
    pub fn pick(&self, affinity: Affinity<'_>, now: Instant, exclude: &[usize]) -> Option<usize> {
        let eligible = |i: &usize| !self.replicas[*i].down && !exclude.contains(i);
        let mut candidates: Vec<usize> = (0..self.replicas.len())
            .filter(eligible)
            .filter(|&i| self.is_available(i, now))
            .collect();
        if candidates.is_empty() {
            candidates = (0..self.replicas.len()).filter(eligible).collect();
        }
        if candidates.is_empty() {
            return None;
        }
        let pick = match (self.policy, affinity) {
            (Policy::RoundRobin, _)
            | (Policy::DigestHash, Affinity::None | Affinity::Client(_)) => {
                self.round_robin(&candidates)
            }
            (Policy::Weighted, _) => self.smooth_weighted(&candidates),
            (Policy::LeastConn, _) => self.least_conn(&candidates),
            (Policy::IpHash, Affinity::Client(ip)) => self.rendezvous(&candidates, &ip_key(ip)),
            (Policy::IpHash, _) => self.round_robin(&candidates),
            (Policy::DigestHash, Affinity::Digest(d)) => self.rendezvous(&candidates, d.as_bytes()),
        };
        Some(pick)
    }

    fn round_robin(&self, candidates: &[usize]) -> usize {
        candidates[self.turn.fetch_add(1, Ordering::Relaxed) % candidates.len()]
    }

    /// nginx's smooth weighted round robin: every candidate gains its weight, the largest
    /// current weight wins and pays back the total. Weights 2:1 give A B A A B A ...
    fn smooth_weighted(&self, candidates: &[usize]) -> usize {
        let mut current = lock(&self.smooth);
        let mut total = 0i64;
        let mut best = candidates[0];
        for &i in candidates {
            let w = i64::from(self.replicas[i].weight);
            current[i] += w;
            total += w;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        best
    }

    /// Fewest requests in flight relative to weight; ties go round robin.
    fn least_conn(&self, candidates: &[usize]) -> usize {
        let start = self.turn.fetch_add(1, Ordering::Relaxed);
        let load = |i: usize| {
            (
                self.replicas[i].active.load(Ordering::Relaxed) as u128,
                u128::from(self.replicas[i].weight),
            )
        };
        let mut best = candidates[start % candidates.len()];
        for k in 0..candidates.len() {
            let i = candidates[(start + k) % candidates.len()];
            let (a, wa) = load(i);
            let (b, wb) = load(best);
            // a / wa < b / wb without division.
            if a * wb < b * wa {
                best = i;
            }
        }
        best
    }

    /// Weighted rendezvous hashing: each candidate scores `weight / -ln(u)` with `u` uniform
    /// in (0, 1) from SHA-256 of key and replica; the highest score wins. Removing a replica
    /// moves only the keys that were on it.
    fn rendezvous(&self, candidates: &[usize], key: &[u8]) -> usize {
        let score = |i: usize| {
            let r = &self.replicas[i];
            let mut h = Sha256::new();
            h.update((key.len() as u64).to_be_bytes());
            h.update(key);
            h.update(r.id.as_bytes());
            let out = h.finalize();
            let mut first = [0u8; 8];
            first.copy_from_slice(&out[..8]);
            // (x + 0.5) / 2^64 is strictly inside (0, 1).
            let u = (u64::from_be_bytes(first) as f64 + 0.5) / 18_446_744_073_709_551_616.0;
            f64::from(r.weight) / -u.ln()
        };
        let mut best = candidates[0];
        let mut best_score = score(best);
        for &i in &candidates[1..] {
            let s = score(i);
            if s > best_score {
                best = i;
                best_score = s;
            }
        }
        best
    }

    /// A request to replica `i` succeeded (any answer that is not a server failure). Returns
    /// whether it had been ejected (the probe after `fail_timeout` succeeded), so that what
    /// was published about the ejection can be corrected.
    pub fn record_success(&self, i: usize) -> bool {
        let mut p = lock(&self.replicas[i].passive);
        p.consecutive_fails = 0;
        p.ejected_until.take().is_some()
    }

    /// A request to replica `i` failed (connect error, timeout, 500, 502-504). Returns true
    /// when this failure ejected it.
    pub fn record_failure(&self, i: usize, now: Instant) -> bool {
        let mut p = lock(&self.replicas[i].passive);
        p.consecutive_fails = p.consecutive_fails.saturating_add(1);
        if p.consecutive_fails >= self.max_fails && p.ejected_until.is_none_or(|t| now >= t) {
            p.ejected_until = Some(now + self.fail_timeout);
            return true;
        }
        false
    }

    /// Result of an active health check. Returns whether the health changed.
    pub fn set_healthy(&self, i: usize, healthy: bool) -> bool {
        self.replicas[i].healthy.swap(healthy, Ordering::Relaxed) != healthy
    }

    /// Marks a request to `i` as started; the guard marks it finished when dropped.
    pub fn begin(self: &std::sync::Arc<Self>, i: usize) -> InFlight {
        self.replicas[i].active.fetch_add(1, Ordering::Relaxed);
        InFlight {
            balancer: std::sync::Arc::clone(self),
            replica: i,
        }
    }
}

/// A request in flight to one replica (for `least_conn`).
#[derive(Debug)]
pub struct InFlight {
    balancer: std::sync::Arc<Balancer>,
    replica: usize,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.balancer.replicas[self.replica]
            .active
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// IPv4 address, or the /64 of an IPv6 address (one host usually owns the whole prefix).
fn ip_key(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.octets().to_vec(),
            None => v6.octets()[..8].to_vec(),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn specs(weights: &[u32]) -> Vec<ReplicaSpec> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| ReplicaSpec {
                id: format!("http://10.0.0.{i}:5000"),
                weight: w,
                down: false,
            })
            .collect()
    }

    fn counts(b: &Balancer, n: usize, affinity: impl Fn(usize) -> Affinity<'static>) -> Vec<usize> {
        let now = Instant::now();
        let mut c = vec![0; b.len()];
        for k in 0..n {
            c[b.pick(affinity(k), now, &[]).unwrap()] += 1;
        }
        c
    }

    #[test]
    fn round_robin_alternates_and_ignores_weights() {
        let b = Balancer::new(
            Policy::RoundRobin,
            &specs(&[5, 1]),
            1,
            Duration::from_secs(1),
        );
        assert_eq!(counts(&b, 100, |_| Affinity::None), [50, 50]);
    }

    #[test]
    fn smooth_weighted_is_exact_and_interleaved() {
        let b = Balancer::new(Policy::Weighted, &specs(&[2, 1]), 1, Duration::from_secs(1));
        let now = Instant::now();
        let seq: Vec<usize> = (0..6)
            .map(|_| b.pick(Affinity::None, now, &[]).unwrap())
            .collect();
        assert_eq!(seq, [0, 1, 0, 0, 1, 0]);
        assert_eq!(counts(&b, 999, |_| Affinity::None), [666, 333]);
        let b = Balancer::new(
            Policy::Weighted,
            &specs(&[5, 1, 1]),
            1,
            Duration::from_secs(1),
        );
        assert_eq!(counts(&b, 700, |_| Affinity::None), [500, 100, 100]);
    }

    #[test]
    fn down_replicas_are_never_picked() {
        let mut s = specs(&[1, 1, 1]);
        s[1].down = true;
        let b = Balancer::new(Policy::RoundRobin, &s, 1, Duration::from_secs(1));
        let c = counts(&b, 100, |_| Affinity::None);
        assert_eq!(c[1], 0);
        // Even when everything else is unhealthy.
        b.set_healthy(0, false);
        b.set_healthy(2, false);
        assert_eq!(counts(&b, 10, |_| Affinity::None)[1], 0);
        assert_eq!(b.pick(Affinity::None, Instant::now(), &[0, 2]), None);
    }

    #[test]
    fn ip_hash_is_sticky_and_spreads() {
        let b = Balancer::new(
            Policy::IpHash,
            &specs(&[1, 1, 1]),
            1,
            Duration::from_secs(1),
        );
        let now = Instant::now();
        let mut used = std::collections::HashSet::new();
        for last in 1..=60u8 {
            let ip = IpAddr::from([10, 1, 2, last]);
            let first = b.pick(Affinity::Client(ip), now, &[]).unwrap();
            for _ in 0..5 {
                assert_eq!(b.pick(Affinity::Client(ip), now, &[]), Some(first));
            }
            used.insert(first);
        }
        assert_eq!(used.len(), 3, "60 clients should reach all 3 replicas");
        // IPv6 clients in one /64 share a replica.
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let c: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        assert_eq!(
            b.pick(Affinity::Client(a), now, &[]),
            b.pick(Affinity::Client(c), now, &[])
        );
    }

    #[test]
    fn rendezvous_moves_only_the_keys_of_a_removed_replica() {
        let b = Balancer::new(
            Policy::DigestHash,
            &specs(&[1, 1, 1]),
            1,
            Duration::from_secs(1),
        );
        let now = Instant::now();
        let keys: Vec<String> = (0..300).map(|i| format!("sha256:{i:064x}")).collect();
        let before: Vec<usize> = keys
            .iter()
            .map(|k| b.pick(Affinity::Digest(k), now, &[]).unwrap())
            .collect();
        let mut per = [0usize; 3];
        before.iter().for_each(|&i| per[i] += 1);
        assert!(per.iter().all(|&n| n > 60), "uneven spread {per:?}");
        b.set_healthy(1, false);
        for (k, &was) in keys.iter().zip(&before) {
            let now_on = b.pick(Affinity::Digest(k), now, &[]).unwrap();
            if was != 1 {
                assert_eq!(now_on, was, "{k} moved although its replica is up");
            } else {
                assert_ne!(now_on, 1);
            }
        }
        // Requests without a digest go round robin.
        b.set_healthy(1, true);
        assert_eq!(counts(&b, 30, |_| Affinity::None), [10, 10, 10]);
    }

    #[test]
    fn weighted_rendezvous_follows_weights() {
        let b = Balancer::new(
            Policy::DigestHash,
            &specs(&[3, 1]),
            1,
            Duration::from_secs(1),
        );
        let keys: Vec<String> = (0..4000).map(|i| format!("sha256:{i:064x}")).collect();
        let now = Instant::now();
        let on0 = keys
            .iter()
            .filter(|k| b.pick(Affinity::Digest(k), now, &[]) == Some(0))
            .count();
        // Expected 3000.
        assert!((2800..3200).contains(&on0), "{on0}");
    }

    #[test]
    fn least_conn_prefers_idle_replicas() {
        let b = Arc::new(Balancer::new(
            Policy::LeastConn,
            &specs(&[1, 1, 1]),
            1,
            Duration::from_secs(1),
        ));
        let now = Instant::now();
        let _a = b.begin(0);
        let _b = b.begin(0);
        let _c = b.begin(1);
        assert_eq!(b.pick(Affinity::None, now, &[]), Some(2));
        let held = b.begin(2);
        // 0 has 2, 1 and 2 have 1 each.
        let p = b.pick(Affinity::None, now, &[]).unwrap();
        assert!(p == 1 || p == 2);
        drop(held);
        assert_eq!(b.pick(Affinity::None, now, &[]), Some(2));
    }

    #[test]
    fn passive_ejection_and_probe_back() {
        let b = Balancer::new(
            Policy::RoundRobin,
            &specs(&[1, 1]),
            2,
            Duration::from_secs(10),
        );
        let t0 = Instant::now();
        assert!(!b.record_failure(0, t0));
        assert!(b.is_available(0, t0));
        assert!(b.record_failure(0, t0));
        assert!(!b.is_available(0, t0));
        assert_eq!(counts(&b, 10, |_| Affinity::None), [0, 10]);
        // Still out just before the timeout, back after it.
        assert!(!b.is_available(0, t0 + Duration::from_secs(9)));
        let t1 = t0 + Duration::from_secs(10);
        assert!(b.is_available(0, t1));
        // The probe fails: out again at once.
        assert!(b.record_failure(0, t1));
        assert!(!b.is_available(0, t1 + Duration::from_secs(1)));
        // A success after the next timeout clears everything.
        let t2 = t1 + Duration::from_secs(10);
        assert!(b.record_success(0), "the probe's success ends an ejection");
        assert!(b.is_available(0, t2));
        assert!(!b.record_failure(0, t2));
        assert!(
            !b.record_success(0),
            "a success without an ejection ends none"
        );
    }

    #[test]
    fn retries_exclude_and_fall_back_to_unavailable() {
        let b = Balancer::new(
            Policy::RoundRobin,
            &specs(&[1, 1]),
            1,
            Duration::from_secs(10),
        );
        let now = Instant::now();
        assert_eq!(b.pick(Affinity::None, now, &[0]), Some(1));
        b.record_failure(0, now);
        b.record_failure(1, now);
        // Both ejected: they are still tried rather than failing outright.
        assert!(b.pick(Affinity::None, now, &[]).is_some());
        assert_eq!(b.pick(Affinity::None, now, &[1]), Some(0));
        assert_eq!(b.pick(Affinity::None, now, &[0, 1]), None);
    }
}
