//! The memory store's push registrations, their state, and mutes.

use keepwire_proto::{ConvId, EntryItem, MuteMark, Seq};

use super::state::{PushReg, Slot, State, WriteCtx};
use crate::store::{NewPush, PushOutcome, PushTarget, StoreError, UserId};

/// Registrations not refreshed for this long are dropped.
pub(super) const STALE_AFTER_MS: i64 = 60 * 24 * 3600 * 1000;

impl State {
    pub(super) fn set_push(
        &mut self,
        now_ms: i64,
        new_id: String,
        user: UserId,
        device: &str,
        push: Option<NewPush>,
    ) -> Option<String> {
        let slot = (user, device.to_owned());
        let Some(p) = push else {
            self.push.remove(&slot);
            return None;
        };
        if let Some(r) = self.push.get_mut(&slot).filter(|r| r.key == p.key) {
            r.registration = p.registration;
            r.previews = p.previews;
            r.refreshed_at = now_ms;
            return Some(r.reg_id.clone());
        }
        self.push.retain(|_, r| r.key != p.key);
        self.push.insert(
            slot,
            PushReg {
                reg_id: new_id.clone(),
                key: p.key,
                provider: p.provider,
                registration: p.registration,
                previews: p.previews,
                refreshed_at: now_ms,
                pushed_seq: 0,
                delivered_seq: 0,
                pushed_at: None,
                attempts: 0,
                last_success: None,
                last_error: None,
            },
        );
        Some(new_id)
    }

    pub(super) fn mute(
        &mut self,
        w: &mut WriteCtx<'_>,
        user: UserId,
        conv: ConvId,
        muted: bool,
    ) -> Result<bool, StoreError> {
        self.require_member(conv, user)?;
        let changed = if muted {
            self.mutes.insert((user, conv))
        } else {
            self.mutes.remove(&(user, conv))
        };
        if changed {
            let ts = self.log_ts(w.now_ms);
            let item = EntryItem::Mute(MuteMark { conv, muted, ts });
            self.append(w, user, Slot::Event(item), ts, None, None);
        }
        Ok(changed)
    }

    pub(super) fn push_targets(&self, user: UserId) -> Vec<PushTarget> {
        self.push
            .range((user, String::new())..)
            .take_while(|((u, _), _)| *u == user)
            .map(|((_, device), r)| {
                let acked = self
                    .devices
                    .get(&(user, device.clone()))
                    .map_or(0, |d| d.acked_seq);
                PushTarget {
                    device: device.clone(),
                    reg_id: r.reg_id.clone(),
                    registration: r.registration.clone(),
                    previews: r.previews,
                    acked_seq: acked,
                    pushed_seq: r.pushed_seq,
                    delivered_seq: r.delivered_seq,
                    pushed_at_ms: r.pushed_at,
                    attempts: r.attempts,
                    wake_seq: self.wake_seq(user, acked),
                }
            })
            .collect()
    }

    /// The newest entry after `after` that wakes `user`'s devices.
    fn wake_seq(&self, user: UserId, after: Seq) -> Option<Seq> {
        let inbox = self.inbox.get(&user)?;
        inbox
            .range(after + 1..)
            .rev()
            .find(|(_, e)| match e.slot {
                Slot::Message(id) => self
                    .messages
                    .get(&id)
                    .is_some_and(|m| m.sender != user && !self.mutes.contains(&(user, m.conv))),
                Slot::Event(_) => false,
            })
            .map(|(&s, _)| s)
    }

    fn reg_mut(&mut self, reg_id: &str) -> Option<&mut PushReg> {
        self.push.values_mut().find(|r| r.reg_id == reg_id)
    }

    pub(super) fn record_push(&mut self, now_ms: i64, reg_id: &str, seq: Seq) {
        if let Some(r) = self.reg_mut(reg_id) {
            r.attempts = if r.pushed_seq == seq {
                r.attempts + 1
            } else {
                1
            };
            r.pushed_seq = seq;
            r.pushed_at = Some(now_ms);
        }
    }

    pub(super) fn push_outcome(&mut self, now_ms: i64, reg_id: &str, outcome: PushOutcome) {
        match outcome {
            PushOutcome::Delivered(seq) => {
                if let Some(r) = self.reg_mut(reg_id) {
                    r.delivered_seq = r.delivered_seq.max(seq);
                    r.last_success = Some(now_ms);
                    r.last_error = None;
                }
            }
            PushOutcome::Failed(why) => {
                if let Some(r) = self.reg_mut(reg_id) {
                    r.last_error = Some(why);
                }
            }
            PushOutcome::Unregistered(_) => self.push.retain(|_, r| r.reg_id != reg_id),
        }
    }
}
