//! The connection's deadlines, in one table (quinn-proto's `timer.rs`): each
//! [`Timer`] is armed, moved or stopped by the state machine, and
//! [`TimerTable::next`] is what `poll_timeout` returns.

use keepwire_proto::Instant;

/// A deadline the connection may be waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Timer {
    /// The next connection attempt (backoff, going-away jitter).
    Retry,
    /// The rate-limit pause of the outbox ends.
    SendPause,
    /// The background linger ends: the connection goes dormant.
    Linger,
    /// A requested sync's deadline.
    Sync,
    /// The next heartbeat ping is due (session only).
    Ping,
    /// The outstanding ping's pong is late: the connection is dead (session only).
    Pong,
    /// The stored position must be acknowledged (session only).
    Ack,
}

impl Timer {
    const COUNT: usize = 7;

    /// The timers that belong to a session and end with it.
    pub(crate) const SESSION: [Timer; 3] = [Timer::Ping, Timer::Pong, Timer::Ack];

    fn index(self) -> usize {
        self as usize
    }
}

/// The armed deadlines.
#[derive(Debug, Clone, Default)]
pub(crate) struct TimerTable {
    at: [Option<Instant>; Timer::COUNT],
}

impl TimerTable {
    /// Arms (or moves) a timer.
    pub(crate) fn set(&mut self, t: Timer, at: Instant) {
        self.at[t.index()] = Some(at);
    }

    /// Disarms a timer.
    pub(crate) fn stop(&mut self, t: Timer) {
        self.at[t.index()] = None;
    }

    /// When a timer fires, if armed.
    pub(crate) fn get(&self, t: Timer) -> Option<Instant> {
        self.at[t.index()]
    }

    /// Whether a timer is armed.
    pub(crate) fn is_set(&self, t: Timer) -> bool {
        self.get(t).is_some()
    }

    /// Whether a timer is armed and due at `now`.
    pub(crate) fn is_due(&self, t: Timer, now: Instant) -> bool {
        self.get(t).is_some_and(|at| now >= at)
    }

    /// The earliest armed deadline.
    pub(crate) fn next(&self) -> Option<Instant> {
        self.at.iter().flatten().min().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(ms: u64) -> Instant {
        Instant::from_duration(Duration::from_millis(ms))
    }

    #[test]
    fn the_earliest_armed_deadline_is_next() {
        let mut t = TimerTable::default();
        assert_eq!(t.next(), None);
        t.set(Timer::Ping, at(30));
        t.set(Timer::Ack, at(10));
        t.set(Timer::Retry, at(20));
        assert_eq!(t.next(), Some(at(10)));
        t.stop(Timer::Ack);
        assert_eq!(t.next(), Some(at(20)));
        assert!(t.is_due(Timer::Retry, at(20)));
        assert!(!t.is_due(Timer::Ping, at(20)));
        assert!(!t.is_set(Timer::Sync));
    }
}
