//! Token buckets for the agent's bandwidth limits (upload to peers, download from peers, origin
//! reads), shared by every transfer of one kind.
//!
//! Transfers take tokens in chunks as bytes move. The balance may go negative: a chunk larger
//! than the burst is granted at once and the debt is paid by the next takers' waits, so no
//! request can ever wait forever (shaping never deadlocks a transfer). Waiters are served in
//! arrival order (tokio's fair mutex), so concurrent transfers interleave chunk by chunk and
//! each keeps making progress, which keeps the swarm's stall detection quiet on a shaped link.

use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

/// Debts worth less than this are carried to the next take instead of slept off.
const MIN_WAIT: Duration = Duration::from_millis(5);

/// A rate limit in bytes per second with a burst allowance. `None` rate: unlimited.
#[derive(Debug)]
pub struct TokenBucket {
    /// Bytes per second; `None` when unlimited.
    rate: Option<f64>,
    burst: f64,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A bucket filling at `rate` bytes per second up to `burst` bytes (at least one byte),
    /// full at the start. `rate = None` or `Some(0)`: no limit.
    pub fn new(rate: Option<u64>, burst: u64) -> TokenBucket {
        let rate = rate.filter(|&r| r > 0).map(|r| r as f64);
        let burst = burst.max(1) as f64;
        TokenBucket {
            rate,
            burst,
            state: Mutex::new(State {
                tokens: burst,
                last: Instant::now(),
            }),
        }
    }

    pub fn unlimited() -> TokenBucket {
        TokenBucket::new(None, 0)
    }

    pub fn is_limited(&self) -> bool {
        self.rate.is_some()
    }

    /// Takes `n` tokens, waiting as long as the rate requires. Cancel-safe: a cancelled wait
    /// has already taken its tokens, which only slows the next takers.
    pub async fn take(&self, n: u64) {
        let Some(rate) = self.rate else {
            return;
        };
        if n == 0 {
            return;
        }
        // Held across the wait: later takers queue behind this one, in order.
        let mut st = self.state.lock().await;
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(st.last).as_secs_f64();
        st.tokens = (st.tokens + elapsed * rate).min(self.burst);
        st.last = now;
        st.tokens -= n as f64;
        // Small debts are carried rather than slept off: QUIC hands over data a packet at a
        // time, and a sleep per packet would be rounded up to the timer's millisecond.
        if st.tokens < -rate * MIN_WAIT.as_secs_f64() {
            // The next taker credits the time actually slept (timer overshoot included), so
            // the long-run rate stays exact.
            tokio::time::sleep(Duration::from_secs_f64(-st.tokens / rate)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn unlimited_never_waits() {
        let b = TokenBucket::unlimited();
        let t0 = Instant::now();
        b.take(u64::MAX).await;
        assert_eq!(Instant::now(), t0);
        assert!(!TokenBucket::new(Some(0), 10).is_limited());
    }

    #[tokio::test(start_paused = true)]
    async fn burst_then_rate() {
        let b = TokenBucket::new(Some(1000), 500);
        let t0 = Instant::now();
        b.take(500).await; // the burst
        assert_eq!(Instant::now() - t0, Duration::ZERO);
        b.take(1000).await; // a second's worth
        let e = Instant::now() - t0;
        assert!(
            e >= Duration::from_millis(999) && e <= Duration::from_millis(1001),
            "{e:?}"
        );
        // Idle time refills, but never beyond the burst.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let t1 = Instant::now();
        b.take(500).await;
        assert_eq!(Instant::now(), t1);
        b.take(100).await;
        let e = Instant::now() - t1;
        assert!(
            e >= Duration::from_millis(99) && e <= Duration::from_millis(101),
            "{e:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn packet_sized_takes_keep_the_rate() {
        // 1200-byte takes at 32 MiB/s: a sleep per take would cap this far below the rate.
        let rate = 32 << 20;
        let b = TokenBucket::new(Some(rate), 64 * 1024);
        let t0 = Instant::now();
        let total = 16 << 20;
        let mut sent = 0u64;
        while sent < total {
            b.take(1200).await;
            sent += 1200;
        }
        let e = (Instant::now() - t0).as_secs_f64();
        let expected = (total - 64 * 1024) as f64 / rate as f64;
        assert!((e - expected).abs() < 0.02, "{e} s, expected {expected} s");
    }

    #[tokio::test(start_paused = true)]
    async fn a_take_larger_than_the_burst_completes() {
        let b = TokenBucket::new(Some(1 << 20), 1024);
        let t0 = Instant::now();
        tokio::time::timeout(Duration::from_secs(60), b.take(16 << 20))
            .await
            .expect("no deadlock");
        let e = Instant::now() - t0;
        assert!(
            e >= Duration::from_secs(15) && e <= Duration::from_secs(17),
            "{e:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_takers_share_the_rate_and_all_progress() {
        let b = Arc::new(TokenBucket::new(Some(100_000), 10_000));
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let b = b.clone();
            tasks.push(tokio::spawn(async move {
                let mut done = Vec::new();
                for _ in 0..10 {
                    b.take(10_000).await;
                    done.push(Instant::now());
                }
                done
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            let done = tokio::time::timeout(Duration::from_secs(60), t)
                .await
                .unwrap()
                .unwrap();
            // Fair: no taker waits for the others to finish before its next chunk.
            for w in done.windows(2) {
                assert!(w[1] - w[0] <= Duration::from_millis(500), "{w:?}");
            }
            all.extend(done);
        }
        // 400 kB at 100 kB/s after a 10 kB burst: about 3.9 s in all.
        let end = all.into_iter().max().unwrap() - t0;
        assert!(
            end >= Duration::from_millis(3850) && end <= Duration::from_millis(3950),
            "{end:?}"
        );
    }
}
