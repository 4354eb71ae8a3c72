//! The monotonic timestamp of keepwire's sans-IO state machines (the
//! client core and the relay session).

use std::ops::{Add, Sub};
use std::time::Duration;

/// A point on a monotonic clock that keeps counting while the device is
/// suspended (`CLOCK_BOOTTIME` on Linux and Android). The state machines never
/// read a clock: their driver passes `now` into every call.
///
/// `std::time::Instant` is not used because it stops while a phone sleeps,
/// which would stretch backoff, linger and heartbeat timers by the sleep time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Instant(Duration);

impl Instant {
    /// The clock's origin.
    pub const ZERO: Instant = Instant(Duration::ZERO);

    /// The instant `d` after the origin.
    pub const fn from_duration(d: Duration) -> Instant {
        Instant(d)
    }

    /// Time since the origin.
    pub const fn as_duration(self) -> Duration {
        self.0
    }

    /// Time since `earlier`, or zero if `earlier` is later.
    pub fn saturating_duration_since(self, earlier: Instant) -> Duration {
        self.0.saturating_sub(earlier.0)
    }
}

impl Add<Duration> for Instant {
    type Output = Instant;
    fn add(self, d: Duration) -> Instant {
        Instant(self.0.saturating_add(d))
    }
}

impl Sub<Instant> for Instant {
    type Output = Duration;
    fn sub(self, earlier: Instant) -> Duration {
        self.saturating_duration_since(earlier)
    }
}
