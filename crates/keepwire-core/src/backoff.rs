//! Reconnect backoff with full jitter.

use std::time::Duration;

use crate::rng::SeededRng;

/// Exponential backoff, with full jitter by default: the delay before attempt
/// `n` (0-based) is uniform in `[0, min(cap, base * 2^n)]` ("Exponential
/// Backoff and Jitter", AWS Architecture Blog, 2015). Spreads a reconnect
/// storm evenly while the expected delay still grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Delay scale of the first retry.
    pub base: Duration,
    /// Largest delay.
    pub cap: Duration,
    /// How delays are randomized.
    pub jitter: Jitter,
}

/// How a [`Backoff`] randomizes its delays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Jitter {
    /// Uniform in `[0, ceiling]` (the default).
    #[default]
    Full,
    /// Exactly the ceiling: every client that failed at the same moment retries
    /// at the same moment. For comparisons (the reconnect-storm benchmark), not
    /// for production.
    None,
}

impl Backoff {
    /// The upper bound of the delay before attempt `attempt`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// A random delay for attempt `attempt`.
    pub fn delay(&self, attempt: u32, rng: &mut SeededRng) -> Duration {
        match self.jitter {
            Jitter::Full => rng.duration_up_to(self.ceiling(attempt)),
            Jitter::None => self.ceiling(attempt),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_then_caps() {
        let b = Backoff {
            base: Duration::from_millis(500),
            cap: Duration::from_secs(30),
            jitter: Jitter::Full,
        };
        assert_eq!(b.ceiling(0), Duration::from_millis(500));
        assert_eq!(b.ceiling(1), Duration::from_secs(1));
        assert_eq!(b.ceiling(5), Duration::from_secs(16));
        assert_eq!(b.ceiling(6), Duration::from_secs(30));
        assert_eq!(b.ceiling(1000), Duration::from_secs(30));
        let mut rng = SeededRng::new(3);
        for a in 0..100 {
            assert!(b.delay(a, &mut rng) <= b.cap);
        }
    }

    #[test]
    fn without_jitter_the_delay_is_the_ceiling() {
        let b = Backoff {
            base: Duration::from_millis(500),
            cap: Duration::from_secs(30),
            jitter: Jitter::None,
        };
        let mut rng = SeededRng::new(3);
        for a in 0..10 {
            assert_eq!(b.delay(a, &mut rng), b.ceiling(a));
        }
    }
}
