//! Following the revocation log: every node closes the connections of
//! tokens and devices revoked anywhere (on this node the hub closes them at
//! once; this brings the others within a poll interval).
//!
//! Log ids are not committed in id order when several writers append (nodes
//! on one PostgreSQL: id 11's transaction may commit before id 10's). A
//! poller that only asks for ids above the highest it has seen would skip
//! id 10 for good. So the [`Cursor`] asks from [`LOOKBACK`] ids below the
//! highest seen and remembers which ids in that window it has handled: a
//! late commit is picked up as long as fewer than `LOOKBACK` later ids
//! committed before it (each node's pool bounds the transactions in flight
//! at 16, so a late one is a handful of ids behind, not hundreds).

use std::collections::BTreeSet;

use crate::store::Revocation;

/// How far below the highest id seen the log is read again.
pub const LOOKBACK: i64 = 256;

/// Where a node stands in the revocation log.
#[derive(Debug, Default)]
pub struct Cursor {
    /// The highest id handled.
    high: i64,
    /// Ids handled above `high - LOOKBACK`.
    handled: BTreeSet<i64>,
}

impl Cursor {
    /// A cursor that treats everything up to `high` as handled (a node
    /// starting: revocations from before it have no connections here).
    pub fn starting_at(high: i64) -> Cursor {
        Cursor {
            high,
            handled: (high.saturating_sub(LOOKBACK) + 1..=high).collect(),
        }
    }

    /// The id to read the log after.
    pub fn read_after(&self) -> i64 {
        self.high.saturating_sub(LOOKBACK).max(0)
    }

    /// Of `revs` (a read from [`Cursor::read_after`]), the ones not handled
    /// yet; they count as handled from now on.
    pub fn take(&mut self, revs: Vec<Revocation>) -> Vec<Revocation> {
        let floor = self.read_after();
        let new: Vec<Revocation> = revs
            .into_iter()
            .filter(|r| r.id > floor && self.handled.insert(r.id))
            .collect();
        if let Some(max) = new.iter().map(|r| r.id).max() {
            self.high = self.high.max(max);
        }
        let floor = self.read_after();
        self.handled.retain(|id| *id > floor);
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rev(id: i64) -> Revocation {
        Revocation {
            id,
            user_id: 1,
            token_id: Some(id),
            device: None,
        }
    }

    fn ids(revs: &[Revocation]) -> Vec<i64> {
        revs.iter().map(|r| r.id).collect()
    }

    #[test]
    fn a_revocation_committed_after_a_later_id_is_not_skipped() {
        let mut c = Cursor::starting_at(9);
        // Id 11 committed first; 10's transaction was still open.
        assert_eq!(ids(&c.take(vec![rev(11)])), vec![11]);
        assert!(c.read_after() < 10, "the next read still covers id 10");
        // Then 10 commits: handled once, 11 not again.
        assert_eq!(ids(&c.take(vec![rev(10), rev(11)])), vec![10]);
        assert!(c.take(vec![rev(10), rev(11)]).is_empty());
    }

    #[test]
    fn a_start_skips_the_past_and_the_window_stays_bounded() {
        let mut c = Cursor::starting_at(1000);
        assert!(
            c.take(vec![rev(999), rev(1000)]).is_empty(),
            "before the start"
        );
        let all: Vec<Revocation> = (1001..=3000).map(rev).collect();
        assert_eq!(c.take(all).len(), 2000);
        assert_eq!(c.read_after(), 3000 - LOOKBACK);
        assert!(c.handled.len() <= LOOKBACK as usize);
        // Below the window: too late to be seen (and never asked for).
        assert!(c.take(vec![rev(3000 - LOOKBACK)]).is_empty());
    }

    #[test]
    fn an_empty_log_reads_from_the_start() {
        let mut c = Cursor::starting_at(0);
        assert_eq!(c.read_after(), 0);
        assert_eq!(ids(&c.take(vec![rev(1), rev(2)])), vec![1, 2]);
    }
}
