//! The ordered answer queue: one slot per frame that gets an answer, filled
//! in any order, emptied in order.

use std::collections::VecDeque;

use keepwire_proto::ConvId;

use super::RequestId;

/// What a slot answers, and what the answer frame needs.
#[derive(Debug)]
pub(super) enum SlotKind {
    /// A send: `confirm` or `rejected` with its cid.
    Send(Box<str>),
    /// `history` with its rid.
    History(Box<str>),
    /// `conv_create`: `conv` with its rid.
    Create(Box<str>),
    /// `conv_add`/`conv_remove`: `conv` with its rid; a change that went
    /// through is charged to the rate limits by the members it reached.
    Member(Box<str>),
    /// `conv_list`: `convs` with its rid.
    List(Box<str>),
    /// `read`: nothing, or an error naming the conversation.
    Read(ConvId),
    /// `signal`: relayed to the members, or an error naming the conversation.
    Signal(ConvId, Box<serde_json::Value>),
    /// `push_register`: `push` with its rid.
    Push(Box<str>),
    /// `mute`: `muted` with its rid, conversation and wish.
    Mute(Box<str>, ConvId, bool),
}

#[derive(Debug)]
struct Slot {
    id: RequestId,
    /// Taken when the answer is built.
    kind: Option<SlotKind>,
    /// `None` while pending; then the frame to send, if any.
    answer: Option<Option<String>>,
}

/// Slots in the order their frames arrived.
#[derive(Debug, Default)]
pub(super) struct Answers {
    slots: VecDeque<Slot>,
}

impl Answers {
    /// Slots not yet sent (pending or waiting for an earlier one).
    pub(super) fn len(&self) -> usize {
        self.slots.len()
    }

    /// A slot waiting for the store's answer.
    pub(super) fn push(&mut self, id: RequestId, kind: SlotKind) {
        self.slots.push_back(Slot {
            id,
            kind: Some(kind),
            answer: None,
        });
    }

    /// A slot answered at once (refused by validation or a rate limit).
    pub(super) fn push_ready(&mut self, id: RequestId, frame: String) {
        self.slots.push_back(Slot {
            id,
            kind: None,
            answer: Some(Some(frame)),
        });
    }

    /// Whether request `id` has a slot.
    pub(super) fn contains(&self, id: RequestId) -> bool {
        self.slots.iter().any(|s| s.id == id)
    }

    /// Takes what slot `id` answers, to build its frame.
    pub(super) fn take_kind(&mut self, id: RequestId) -> Option<SlotKind> {
        self.slots
            .iter_mut()
            .find(|s| s.id == id)
            .and_then(|s| s.kind.take())
    }

    /// Fills slot `id`.
    pub(super) fn fill(&mut self, id: RequestId, frame: Option<String>) {
        if let Some(s) = self.slots.iter_mut().find(|s| s.id == id) {
            s.answer = Some(frame);
        }
    }

    /// The first slot's answer, if it is there (`Some(None)`: a slot that
    /// sends nothing).
    pub(super) fn pop_ready(&mut self) -> Option<Option<String>> {
        self.slots.front()?.answer.as_ref()?;
        let answer = self.slots.pop_front().and_then(|s| s.answer);
        if self.slots.is_empty() && self.slots.capacity() > 0 {
            // Most connections are idle: give a burst's memory back.
            self.slots = VecDeque::new();
        }
        answer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_leave_in_slot_order_whatever_the_fill_order() {
        let mut a = Answers::default();
        a.push(1, SlotKind::Send("c1".into()));
        a.push_ready(2, "refused".into());
        a.push(3, SlotKind::Read(7));
        a.push(4, SlotKind::List("r".into()));
        assert_eq!(a.pop_ready(), None);
        a.fill(4, Some("convs".into()));
        a.fill(3, None);
        assert_eq!(a.pop_ready(), None, "slot 1 still pending");
        assert!(matches!(a.take_kind(1), Some(SlotKind::Send(_))));
        a.fill(1, Some("confirm".into()));
        assert_eq!(a.pop_ready(), Some(Some("confirm".into())));
        assert_eq!(a.pop_ready(), Some(Some("refused".into())));
        assert_eq!(a.pop_ready(), Some(None));
        assert_eq!(a.pop_ready(), Some(Some("convs".into())));
        assert_eq!(a.pop_ready(), None);
        assert_eq!(a.len(), 0);
    }
}
