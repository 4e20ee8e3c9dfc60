//! `Time`, the virtual instant the state machines are driven with: the caller passes it in, so
//! `proto` never reads a clock and a simulation can run hours of protocol in milliseconds.

use std::fmt;
use std::ops::{Add, Sub};
use std::time::Duration;

/// Microseconds since an origin the driver chooses (its start, a test's zero). Only differences
/// and order matter; two drivers' `Time`s are not comparable.
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Time(u64);

impl Time {
    pub const ZERO: Time = Time(0);

    pub const fn from_micros(us: u64) -> Time {
        Time(us)
    }

    pub const fn from_millis(ms: u64) -> Time {
        Time(ms.saturating_mul(1000))
    }

    pub const fn as_micros(self) -> u64 {
        self.0
    }

    /// Time elapsed since `earlier`; zero when `earlier` is later.
    pub fn since(self, earlier: Time) -> Duration {
        Duration::from_micros(self.0.saturating_sub(earlier.0))
    }
}

/// Saturates at the far end instead of wrapping: a deadline that far away is "never".
impl Add<Duration> for Time {
    type Output = Time;
    fn add(self, d: Duration) -> Time {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        Time(self.0.saturating_add(us))
    }
}

impl Sub<Duration> for Time {
    type Output = Time;
    fn sub(self, d: Duration) -> Time {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        Time(self.0.saturating_sub(us))
    }
}

impl fmt::Debug for Time {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "t={}.{:06}s", self.0 / 1_000_000, self.0 % 1_000_000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_saturates() {
        let t = Time::from_millis(1500);
        assert_eq!(t.as_micros(), 1_500_000);
        assert_eq!(t + Duration::from_millis(500), Time::from_millis(2000));
        assert_eq!(t - Duration::from_secs(10), Time::ZERO);
        assert_eq!(Time::ZERO + Duration::MAX, Time::from_micros(u64::MAX));
        assert_eq!(t.since(Time::ZERO), Duration::from_millis(1500));
        assert_eq!(Time::ZERO.since(t), Duration::ZERO);
        assert_eq!(format!("{t:?}"), "t=1.500000s");
    }
}
