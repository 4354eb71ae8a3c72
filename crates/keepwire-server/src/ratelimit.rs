//! Rate limiting: token buckets, and the rules a connection's sends and
//! requests follow (PROTOCOL.md §5 and §12).
//!
//! Time comes in as `now`: these are plain state machines, used by the
//! sans-IO [`Session`](crate::session::Session) and the hub.

use std::time::Duration;

use keepwire_proto::Instant;

use crate::store::UserId;

/// A token bucket: `rate` tokens per second, holding at most `burst`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f32,
    burst: f32,
    tokens: f32,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate_per_sec: u32, burst: u32, now: Instant) -> Self {
        let burst = burst.max(1) as f32;
        TokenBucket {
            rate: rate_per_sec.max(1) as f32,
            burst,
            tokens: burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f32();
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.last = now;
    }

    /// Takes one token, or says how long until one is available.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        self.take_n(1, now)
    }

    /// Charges `n` tokens after the fact: the bucket may go below zero, and
    /// the next takes wait until it has refilled.
    pub fn charge(&mut self, n: u32, now: Instant) {
        self.refill(now);
        self.tokens -= n as f32;
    }

    /// Takes `n` tokens at once (a request that costs more than one), or says
    /// how long until they are there. A cost above the burst is charged as
    /// the whole burst, so every request can pass eventually.
    pub fn take_n(&mut self, n: u32, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        let n = (n.max(1) as f32).min(self.burst);
        if self.tokens >= n {
            self.tokens -= n;
            Ok(())
        } else {
            Err(Duration::from_secs_f32((n - self.tokens) / self.rate))
        }
    }
}

/// The budget a user's connections share (kept by the hub).
pub trait SendBudget: Send + Sync {
    /// Takes `n` sends from `user`'s budget, or says how long to wait.
    fn take(&self, user: UserId, n: u32, now: Instant) -> Result<(), Duration>;
    /// Charges `n` sends to `user`'s budget after the fact.
    fn charge(&self, user: UserId, n: u32, now: Instant);
}

/// A budget with no limit (tests, tools).
#[derive(Debug, Clone, Copy, Default)]
pub struct Unlimited;

impl SendBudget for Unlimited {
    fn take(&self, _: UserId, _: u32, _: Instant) -> Result<(), Duration> {
        Ok(())
    }

    fn charge(&self, _: UserId, _: u32, _: Instant) {}
}

/// What the limiter decided about a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Go ahead.
    Accept,
    /// Answer `rate_limited` with this `retry_after`.
    Reject(Duration),
    /// The client keeps sending while told to wait: close with 4008.
    Abuse,
}

/// One connection's rate limits.
///
/// Sends (and requests that write for others: creating a group, adding a
/// member, each charged one send per member it reaches) take from the
/// connection's send bucket and the user's shared budget. Every other frame
/// takes from the connection's frame bucket. After a refusal, PROTOCOL.md
/// §5's order rule holds: every other send is refused until the first
/// refused one comes again, and a client that keeps sending while it should
/// wait is tolerated for `tolerance` frames, then closed.
#[derive(Debug)]
pub struct Limiter {
    sends: TokenBucket,
    frames: TokenBucket,
    /// No send is accepted before this time.
    penalty_until: Option<Instant>,
    /// Frames received while they should have waited.
    penalty_frames: u32,
    /// The first refused send: nothing behind it passes until it comes again.
    paused_on: Option<Box<str>>,
    tolerance: u32,
}

impl Limiter {
    /// Limits of `sends_per_sec` (burst `send_burst`) and `frames_per_sec`
    /// (burst twice that); `tolerance` frames beyond a refusal are forgiven.
    pub fn new(
        sends_per_sec: u32,
        send_burst: u32,
        frames_per_sec: u32,
        tolerance: u32,
        now: Instant,
    ) -> Self {
        Limiter {
            sends: TokenBucket::new(sends_per_sec, send_burst, now),
            frames: TokenBucket::new(frames_per_sec, frames_per_sec.saturating_mul(2), now),
            penalty_until: None,
            penalty_frames: 0,
            paused_on: None,
            tolerance,
        }
    }

    /// A send with client id `cid`.
    pub fn send(
        &mut self,
        cid: &str,
        user: UserId,
        budget: &dyn SendBudget,
        now: Instant,
    ) -> Verdict {
        let sticky = self.paused_on.as_deref().is_some_and(|first| first != cid);
        let limited = if sticky {
            Err(Duration::ZERO)
        } else {
            self.sends
                .take(now)
                .and_then(|()| budget.take(user, 1, now))
        };
        match limited {
            Ok(()) => {
                self.paused_on = None;
                self.penalty_frames = 0;
                Verdict::Accept
            }
            Err(wait) => {
                if (sticky || self.penalty_until.is_some_and(|t| now < t)) && self.penalise() {
                    return Verdict::Abuse;
                }
                if !sticky {
                    self.paused_on = Some(cid.into());
                    self.penalty_until = Some(now + wait);
                }
                Verdict::Reject(self.retry_after(now))
            }
        }
    }

    /// A request that writes to `reach` users' inboxes (a group creation or
    /// a member added): charged `reach` sends.
    pub fn fanout(
        &mut self,
        reach: u32,
        user: UserId,
        budget: &dyn SendBudget,
        now: Instant,
    ) -> Verdict {
        match self
            .sends
            .take_n(reach, now)
            .and_then(|()| budget.take(user, reach, now))
        {
            Ok(()) => Verdict::Accept,
            Err(wait) => self.refuse(wait, now),
        }
    }

    /// Charges a request that wrote to `reach` inboxes, once its reach is known.
    pub fn charge(&mut self, reach: u32, user: UserId, budget: &dyn SendBudget, now: Instant) {
        self.sends.charge(reach, now);
        budget.charge(user, reach, now);
    }

    /// Any other frame.
    pub fn frame(&mut self, now: Instant) -> Verdict {
        match self.frames.take(now) {
            Ok(()) => Verdict::Accept,
            Err(wait) => self.refuse(wait, now),
        }
    }

    fn refuse(&mut self, wait: Duration, now: Instant) -> Verdict {
        if self.penalty_until.is_some_and(|t| now < t) && self.penalise() {
            return Verdict::Abuse;
        }
        self.penalty_until = Some(self.penalty_until.map_or(now + wait, |t| t.max(now + wait)));
        Verdict::Reject(self.retry_after(now))
    }

    /// Counts a frame sent while it should have waited; true past the tolerance.
    fn penalise(&mut self) -> bool {
        self.penalty_frames += 1;
        self.penalty_frames > self.tolerance
    }

    fn retry_after(&self, now: Instant) -> Duration {
        self.penalty_until
            .map(|t| t.saturating_duration_since(now))
            .unwrap_or_default()
            .max(Duration::from_millis(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> Instant {
        Instant::from_duration(Duration::from_millis(ms))
    }

    #[test]
    fn bucket_allows_burst_then_rate() {
        let t0 = at(1000);
        let mut b = TokenBucket::new(10, 3, t0);
        assert!(b.take(t0).is_ok());
        assert!(b.take(t0).is_ok());
        assert!(b.take(t0).is_ok());
        let wait = b.take(t0).unwrap_err();
        assert!(wait <= Duration::from_millis(101) && wait > Duration::from_millis(90));
        assert!(b.take(t0 + Duration::from_millis(100)).is_ok());
        assert!(b.take(t0 + Duration::from_millis(100)).is_err());
        // Never more than the burst after a long pause.
        let later = t0 + Duration::from_secs(100);
        for _ in 0..3 {
            assert!(b.take(later).is_ok());
        }
        assert!(b.take(later).is_err());
    }

    #[test]
    fn a_cost_above_the_burst_is_capped() {
        let t0 = at(0);
        let mut b = TokenBucket::new(10, 5, t0);
        assert!(b.take_n(50, t0).is_ok(), "a full bucket pays any cost");
        assert!(b.take_n(1, t0).is_err());
    }

    #[test]
    fn sends_after_a_refusal_wait_for_the_first_refused_one() {
        let t0 = at(0);
        let mut l = Limiter::new(10, 2, 100, 3, t0);
        assert_eq!(l.send("a", 1, &Unlimited, t0), Verdict::Accept);
        assert_eq!(l.send("b", 1, &Unlimited, t0), Verdict::Accept);
        assert!(matches!(l.send("c", 1, &Unlimited, t0), Verdict::Reject(_)));
        // Anything but "c" is refused, even once tokens are back.
        let later = t0 + Duration::from_secs(1);
        assert!(matches!(
            l.send("d", 1, &Unlimited, later),
            Verdict::Reject(_)
        ));
        assert_eq!(l.send("c", 1, &Unlimited, later), Verdict::Accept);
        assert_eq!(l.send("d", 1, &Unlimited, later), Verdict::Accept);
    }

    #[test]
    fn sending_on_while_told_to_wait_is_abuse_past_the_tolerance() {
        let t0 = at(0);
        let mut l = Limiter::new(1, 1, 100, 2, t0);
        assert_eq!(l.send("a", 1, &Unlimited, t0), Verdict::Accept);
        assert!(matches!(l.send("b", 1, &Unlimited, t0), Verdict::Reject(_)));
        assert!(matches!(l.send("c", 1, &Unlimited, t0), Verdict::Reject(_)));
        assert!(matches!(l.send("d", 1, &Unlimited, t0), Verdict::Reject(_)));
        assert_eq!(l.send("e", 1, &Unlimited, t0), Verdict::Abuse);
    }

    #[test]
    fn group_writes_are_charged_per_member() {
        let t0 = at(0);
        let mut l = Limiter::new(10, 20, 100, 8, t0);
        assert_eq!(l.fanout(15, 1, &Unlimited, t0), Verdict::Accept);
        assert!(matches!(
            l.fanout(15, 1, &Unlimited, t0),
            Verdict::Reject(_)
        ));
        assert_eq!(
            l.fanout(15, 1, &Unlimited, t0 + Duration::from_secs(2)),
            Verdict::Accept
        );
    }

    #[test]
    fn every_other_frame_has_a_bucket() {
        let t0 = at(0);
        let mut l = Limiter::new(10, 10, 5, 3, t0);
        for _ in 0..10 {
            assert_eq!(l.frame(t0), Verdict::Accept);
        }
        assert!(matches!(l.frame(t0), Verdict::Reject(_)));
        assert!(matches!(l.frame(t0), Verdict::Reject(_)));
        assert!(matches!(l.frame(t0), Verdict::Reject(_)));
        assert!(matches!(l.frame(t0), Verdict::Reject(_)));
        assert_eq!(l.frame(t0), Verdict::Abuse);
    }
}
