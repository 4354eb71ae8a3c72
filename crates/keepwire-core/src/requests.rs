//! The requests in flight on the current session, and the gap backfill.
//!
//! The connection names every request it sends (`rid`, PROTOCOL.md §10) and
//! matches answers by that name, so the driver never parses request ids: it
//! gets [`Event::Answer`](crate::Event::Answer) for the [`RequestId`] it was
//! given, or [`Event::Unanswered`](crate::Event::Unanswered) when the session
//! ends first. The backfill's history pages (PROTOCOL.md §3: a `gap` resume
//! lists what the replay will not bring) are requests of the connection's
//! own: it pages down to what the device holds and hands the messages over.

use std::collections::{BTreeMap, HashMap};

use keepwire_proto::{ConvId, ErrorCode, Message, Seq, ServerFrame};

/// A request the app asked the connection to send; its answer (or the end of
/// the session before one) is reported with the same id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

/// Messages the device misses below a conversation's replay are asked for in
/// pages of this many by default (the relay's cap on `history.limit`).
pub const BACKFILL_PAGE: u32 = 200;

/// A conversation's backfill still to do: the next page goes below `before`,
/// and the device holds everything up to `known`. The driver persists it
/// (from [`Event::History`](crate::Event::History)) and gives it back with
/// [`Connection::backfill`](crate::Connection::backfill) after a restart, so a
/// fill cut short by a crash still completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackfillDue {
    /// The conversation.
    pub conv: ConvId,
    /// The next page's `before`.
    pub before: Seq,
    /// The highest `conv_seq` the device held when the fill started.
    pub known: Seq,
}

/// Why a request is in flight.
#[derive(Debug, Clone, Copy)]
enum Purpose {
    /// The app's; answered with [`Event::Answer`](crate::Event::Answer).
    App(RequestId),
    /// A backfill page of this conversation.
    Backfill(ConvId),
}

/// The requests of the current session, by the `rid` they went out with, and
/// the backfills still due (they outlive sessions).
#[derive(Debug, Default)]
pub(crate) struct Requests {
    /// The next request's number (never reused, so a late answer from an
    /// older session can never match a newer request).
    next: u64,
    open: HashMap<String, Purpose>,
    /// Per conversation, the backfill page due next.
    due: BTreeMap<ConvId, BackfillDue>,
}

/// What an answer was for.
#[derive(Debug)]
pub(crate) enum Answered {
    /// The app's request.
    App(RequestId),
    /// A backfill page: these messages are new to the device; `due` is what
    /// is left (`None`: the fill is done).
    Backfill {
        conv: ConvId,
        messages: Vec<Message>,
        due: Option<BackfillDue>,
    },
}

impl Requests {
    /// A fresh request id and the `rid` it goes out with.
    pub(crate) fn name(&mut self) -> (RequestId, String) {
        self.next += 1;
        (RequestId(self.next), format!("r{}", self.next))
    }

    /// Records the app's request sent under `rid`.
    pub(crate) fn sent(&mut self, rid: String, id: RequestId) {
        self.open.insert(rid, Purpose::App(id));
    }

    /// Records a backfill to do; false when the device misses nothing or
    /// the conversation's fill is already under way.
    pub(crate) fn add_backfill(&mut self, due: BackfillDue) -> bool {
        if due.before <= due.known.saturating_add(1) || self.due.contains_key(&due.conv) {
            return false;
        }
        self.due.insert(due.conv, due);
        true
    }

    /// The backfill pages to send now: every due one without a page in
    /// flight. Each is recorded as in flight under the `rid` returned.
    pub(crate) fn backfill_pages(&mut self) -> Vec<(String, BackfillDue)> {
        let busy: Vec<ConvId> = self
            .open
            .values()
            .filter_map(|p| match p {
                Purpose::Backfill(c) => Some(*c),
                Purpose::App(_) => None,
            })
            .collect();
        let todo: Vec<BackfillDue> = self
            .due
            .values()
            .filter(|d| !busy.contains(&d.conv))
            .copied()
            .collect();
        todo.into_iter()
            .map(|d| {
                let (_, rid) = self.name();
                self.open.insert(rid.clone(), Purpose::Backfill(d.conv));
                (rid, d)
            })
            .collect()
    }

    /// Forgets a page that could not be sent (it stays due).
    pub(crate) fn unsent(&mut self, rid: &str) {
        self.open.remove(rid);
    }

    /// The conversations whose backfill is not done.
    pub(crate) fn backfilling(&self) -> usize {
        self.due.len()
    }

    /// Forgets every backfill (the epoch changed: their ids mean nothing).
    pub(crate) fn clear_backfills(&mut self) {
        self.due.clear();
        self.open.retain(|_, p| matches!(p, Purpose::App(_)));
    }

    /// The request `frame` answers, taken out of the table; `None` for a
    /// frame that answers nothing of this session's.
    pub(crate) fn answer(&mut self, frame: &ServerFrame) -> Option<Answered> {
        let purpose = self.open.remove(frame.rid()?)?;
        let conv = match purpose {
            Purpose::App(id) => return Some(Answered::App(id)),
            Purpose::Backfill(conv) => conv,
        };
        let Some(d) = self.due.get(&conv).copied() else {
            // Cleared meanwhile (epoch reset): nothing of it counts.
            return None;
        };
        let page = match frame {
            ServerFrame::History(p) => p,
            ServerFrame::Error(e)
                if matches!(e.code, ErrorCode::RateLimited | ErrorCode::Internal) =>
            {
                // Transient: the page stays due and goes again on the next
                // session.
                return Some(Answered::Backfill {
                    conv,
                    messages: Vec::new(),
                    due: Some(d),
                });
            }
            // Refused for good (e.g. no longer a member): nothing to fill.
            _ => {
                self.due.remove(&conv);
                return Some(Answered::Backfill {
                    conv,
                    messages: Vec::new(),
                    due: None,
                });
            }
        };
        let messages: Vec<Message> = page
            .messages
            .iter()
            .filter(|m| m.conv == conv && m.conv_seq > d.known && m.conv_seq < d.before)
            .cloned()
            .collect();
        // The next page goes below this one's first message, while the relay
        // has more and the device still misses some. A page that does not go
        // down would loop: it ends the fill.
        let due = match page.messages.first() {
            Some(first)
                if page.more && first.conv_seq > d.known + 1 && first.conv_seq < d.before =>
            {
                Some(BackfillDue {
                    before: first.conv_seq,
                    ..d
                })
            }
            _ => None,
        };
        match due {
            Some(next) => self.due.insert(conv, next),
            None => self.due.remove(&conv),
        };
        Some(Answered::Backfill {
            conv,
            messages,
            due,
        })
    }

    /// The session ended: the app's requests still open, in the order they
    /// were sent. Backfill pages in flight stay due and go again on the next
    /// session.
    pub(crate) fn end_session(&mut self) -> Vec<RequestId> {
        let mut ids: Vec<RequestId> = self
            .open
            .drain()
            .filter_map(|(_, p)| match p {
                Purpose::App(id) => Some(id),
                Purpose::Backfill(_) => None,
            })
            .collect();
        ids.sort();
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keepwire_proto::{ErrorCode, ErrorFrame, HistoryPage, ServerFrame};

    fn msg(conv: ConvId, conv_seq: Seq) -> Message {
        Message {
            id: conv_seq,
            conv,
            conv_seq,
            from: "a".into(),
            cid: format!("c{conv_seq}"),
            kind: "text".into(),
            body: String::new(),
            ts: 0,
        }
    }

    fn page(
        rid: &str,
        conv: ConvId,
        seqs: std::ops::RangeInclusive<Seq>,
        more: bool,
    ) -> ServerFrame {
        ServerFrame::History(HistoryPage {
            rid: rid.into(),
            conv,
            messages: seqs.map(|s| msg(conv, s)).collect(),
            more,
        })
    }

    #[test]
    fn answers_match_by_rid_once() {
        let mut r = Requests::default();
        let (id, rid) = r.name();
        r.sent(rid.clone(), id);
        let answer = ServerFrame::Convs {
            rid: rid.clone(),
            convs: vec![],
        };
        assert!(matches!(r.answer(&answer), Some(Answered::App(i)) if i == id));
        assert!(
            r.answer(&answer).is_none(),
            "a second answer matches nothing"
        );
        let stranger = ServerFrame::Convs {
            rid: "someone-else".into(),
            convs: vec![],
        };
        assert!(r.answer(&stranger).is_none());
    }

    fn due(conv: ConvId, before: Seq, known: Seq) -> BackfillDue {
        BackfillDue {
            conv,
            before,
            known,
        }
    }

    /// Sends the due page of `conv` and answers it with `frame(rid)`.
    fn answer_page(r: &mut Requests, frame: impl Fn(&str) -> ServerFrame) -> Answered {
        let pages = r.backfill_pages();
        assert_eq!(pages.len(), 1, "one page in flight per conversation");
        assert!(r.backfill_pages().is_empty());
        r.answer(&frame(&pages[0].0)).expect("a backfill answer")
    }

    #[test]
    fn a_backfill_keeps_only_what_the_device_misses_and_pages_down_until_done() {
        let mut r = Requests::default();
        assert!(!r.add_backfill(due(3, 11, 10)), "nothing missing");
        assert!(r.add_backfill(due(3, 100, 10)));
        assert!(!r.add_backfill(due(3, 90, 10)), "already under way");
        assert_eq!(r.backfilling(), 1);
        let Answered::Backfill {
            messages, due: d, ..
        } = answer_page(&mut r, |rid| page(rid, 3, 50..=99, true))
        else {
            panic!()
        };
        assert_eq!(messages.len(), 50);
        assert_eq!(d, Some(due(3, 50, 10)), "more below, still missing");
        let Answered::Backfill {
            messages, due: d, ..
        } = answer_page(&mut r, |rid| page(rid, 3, 8..=49, true))
        else {
            panic!()
        };
        assert_eq!(messages.first().map(|m| m.conv_seq), Some(11));
        assert_eq!(messages.len(), 39);
        assert_eq!(d, None, "the page reached what the device holds");
        assert_eq!(r.backfilling(), 0);

        assert!(r.add_backfill(due(4, 60, 0)));
        let Answered::Backfill { due: d, .. } =
            answer_page(&mut r, |rid| page(rid, 4, 50..=59, false))
        else {
            panic!()
        };
        assert_eq!(d, None, "the relay has nothing older (retention)");
    }

    fn error(rid: &str, code: ErrorCode) -> ServerFrame {
        ServerFrame::Error(ErrorFrame {
            rid: Some(rid.into()),
            code,
            message: String::new(),
            frame: Some("history".into()),
            conv: None,
        })
    }

    #[test]
    fn a_backfill_survives_the_session_and_transient_refusals_but_not_a_final_one() {
        let mut r = Requests::default();
        assert!(r.add_backfill(due(1, 500, 0)));
        let pages = r.backfill_pages();
        assert_eq!(pages.len(), 1);
        let ids: Vec<RequestId> = (0..3)
            .map(|_| {
                let (id, rid) = r.name();
                r.sent(rid, id);
                id
            })
            .collect();
        assert_eq!(r.end_session(), ids, "the app's requests, in order");
        assert!(r.answer(&page(&pages[0].0, 1, 300..=499, true)).is_none());
        assert_eq!(r.backfilling(), 1, "still due");
        let Answered::Backfill { due: d, .. } =
            answer_page(&mut r, |rid| error(rid, ErrorCode::RateLimited))
        else {
            panic!()
        };
        assert_eq!(d, Some(due(1, 500, 0)));
        let Answered::Backfill { due: d, .. } =
            answer_page(&mut r, |rid| error(rid, ErrorCode::NotMember))
        else {
            panic!()
        };
        assert_eq!(d, None);
        assert_eq!(r.backfilling(), 0);
        assert!(r.add_backfill(due(2, 500, 0)));
        r.clear_backfills();
        assert_eq!(r.backfilling(), 0);
        assert!(r.backfill_pages().is_empty());
    }
}
