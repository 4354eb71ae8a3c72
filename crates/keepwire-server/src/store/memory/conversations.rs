//! The memory store's conversations: creation, membership, lists, history,
//! read markers.

use std::collections::BTreeSet;

use keepwire_proto::{
    ConvCreate, ConvId, ConvInfo, ConvKind, EntryItem, ErrorCode, HistoryPage, MemberChange,
    MemberEvent, Message, ReadMark,
};

use super::state::{Conv, Slot, State, WriteCtx, no_such_conv, refused};
use crate::store::{Actor, DeletedUser, Revocation, StoreError, UserId, deleted_user_name};

impl State {
    /// Deletes a user (see [`AdminStore::delete_user`](crate::store::AdminStore::delete_user)).
    pub(super) fn delete_user(
        &mut self,
        w: &mut WriteCtx<'_>,
        name: &str,
    ) -> Result<DeletedUser, StoreError> {
        let user = match self.user_id(name) {
            Some(id) if keepwire_proto::is_valid_user_name(name) => id,
            _ => return Err(super::no_user(name)),
        };
        let convs: Vec<ConvId> = self
            .convs
            .iter()
            .filter(|(_, c)| c.members.contains(&user))
            .map(|(&id, _)| id)
            .collect();
        let system = self.actor_id(Actor::System);
        let by = self.user_name(system);
        let now = self.log_ts(w.now_ms);
        for &conv in &convs {
            let c = self.convs.get_mut(&conv).expect("listed");
            c.members.remove(&user);
            let rest: Vec<UserId> = c.members.iter().copied().collect();
            let event = MemberEvent {
                conv: self.conv_info(conv).expect("exists"),
                user: name.to_owned(),
                change: MemberChange::Removed,
                by: by.clone(),
                ts: now,
            };
            self.member_entries(w, &rest, &event);
        }
        let before = self.devices.len();
        self.devices.retain(|(u, _), _| *u != user);
        let devices = (before - self.devices.len()) as u64;
        self.inbox.remove(&user);
        self.tokens.retain(|t| t.user != user);
        self.push.retain(|(u, _), _| *u != user);
        self.mutes.retain(|(u, _)| *u != user);
        self.reads.retain(|(u, _), _| *u != user);
        self.sends.retain(|(u, _, _), _| *u != user);
        // The row stays as a tombstone: its id is not reused and the name is free.
        self.user_ids.remove(name);
        let tombstone = deleted_user_name(user);
        self.user_ids.insert(tombstone.clone(), user);
        let u = self.users.get_mut(&user).expect("named");
        u.name = tombstone;
        u.floor = u.head + 1;
        u.tokens_revoked_at = Some(w.now_ms);
        let id = self.revocations.last().map_or(1, |r| r.id + 1);
        self.revocations.push(Revocation {
            id,
            user_id: user,
            token_id: None,
            device: None,
        });
        Ok(DeletedUser {
            id: user,
            user: name.to_owned(),
            conversations: convs.len() as u64,
            devices,
        })
    }

    // -- conversations ------------------------------------------------------

    fn member_entries(&mut self, w: &mut WriteCtx<'_>, recipients: &[UserId], event: &MemberEvent) {
        for &r in recipients {
            self.append(
                w,
                r,
                Slot::Event(EntryItem::Member(event.clone())),
                event.ts,
                None,
                None,
            );
        }
    }

    pub(super) fn conv_create(
        &mut self,
        w: &mut WriteCtx<'_>,
        actor: Actor,
        req: ConvCreate,
        max_group_size: usize,
    ) -> Result<(ConvInfo, bool), StoreError> {
        let user = self.actor_id(actor);
        let mut ids: BTreeSet<UserId> = match actor {
            Actor::User(u) => BTreeSet::from([u]),
            Actor::System => BTreeSet::new(),
        };
        for name in &req.members {
            let id = self.user_id(name).ok_or_else(|| {
                refused(ErrorCode::UnknownUser, format!("no user named {name:?}"))
            })?;
            ids.insert(id);
        }
        let existing = match req.kind {
            ConvKind::Direct => {
                if ids.len() != 2 {
                    return Err(refused(
                        ErrorCode::Invalid,
                        "a direct conversation needs another user",
                    ));
                }
                let mut it = ids.iter();
                let pair = (*it.next().expect("two"), *it.next().expect("two"));
                self.direct.get(&pair).copied()
            }
            ConvKind::Group => self
                .convs
                .iter()
                .find(|(_, c)| c.created_by == user && c.create_key == req.key)
                .map(|(&id, _)| id),
        };
        if let Some(id) = existing {
            // Only a member learns what an earlier create made (a creator
            // who left does not get the members back through its key).
            if let Actor::User(u) = actor {
                self.require_member(id, u)?;
            }
            return Ok((self.conv_info(id).expect("exists"), false));
        }
        if ids.len() > max_group_size {
            return Err(refused(
                ErrorCode::GroupTooLarge,
                format!("a group has at most {max_group_size} members"),
            ));
        }
        let now = self.log_ts(w.now_ms);
        let id = self.convs.keys().next_back().copied().unwrap_or(0) + 1;
        if req.kind == ConvKind::Direct {
            let mut it = ids.iter();
            let pair = (*it.next().expect("two"), *it.next().expect("two"));
            self.direct.insert(pair, id);
        }
        self.convs.insert(
            id,
            Conv {
                kind: req.kind,
                name: req.name,
                created_by: user,
                create_key: req.key,
                last_seq: 0,
                members: ids.clone(),
                last_message: 0,
            },
        );
        let info = self.conv_info(id).expect("inserted");
        let by = self.user_name(user);
        for &m in &ids {
            let event = MemberEvent {
                conv: info.clone(),
                user: self.user_name(m),
                change: MemberChange::Added,
                by: by.clone(),
                ts: now,
            };
            self.member_entries(w, &[m], &event);
        }
        Ok((info, true))
    }

    pub(super) fn conv_member(
        &mut self,
        w: &mut WriteCtx<'_>,
        actor: Actor,
        conv: ConvId,
        target: &str,
        add: bool,
        max_group_size: usize,
    ) -> Result<(ConvInfo, bool), StoreError> {
        self.require_actor(conv, actor)?;
        let user = self.actor_id(actor);
        let c = self.convs.get(&conv).ok_or_else(|| no_such_conv(conv))?;
        if c.kind == ConvKind::Direct {
            return Err(refused(
                ErrorCode::Forbidden,
                "the members of a direct conversation cannot change",
            ));
        }
        let target_id = self
            .user_id(target)
            .ok_or_else(|| refused(ErrorCode::UnknownUser, format!("no user named {target:?}")))?;
        let c = self.convs.get(&conv).expect("checked");
        if c.members.contains(&target_id) == add {
            return Ok((self.conv_info(conv).expect("exists"), false));
        }
        if add && c.members.len() >= max_group_size {
            return Err(refused(
                ErrorCode::GroupTooLarge,
                format!("a group has at most {max_group_size} members"),
            ));
        }
        if !add && actor != Actor::System && target_id != user && user != c.created_by {
            return Err(refused(
                ErrorCode::Forbidden,
                "only the creator can remove other members",
            ));
        }
        let now = self.log_ts(w.now_ms);
        let c = self.convs.get_mut(&conv).expect("checked");
        // The added user learns of it with the others; the removed one too.
        let recipients: Vec<UserId> = if add {
            c.members.insert(target_id);
            c.members.iter().copied().collect()
        } else {
            let r = c.members.iter().copied().collect();
            c.members.remove(&target_id);
            r
        };
        #[cfg(any(test, feature = "testing"))]
        if !add && w.sabotaged(super::Sabotage::RemovedMemberLosesMessages) {
            let messages = &self.messages;
            if let Some(inbox) = self.inbox.get_mut(&target_id) {
                inbox.retain(|_, e| {
                    !matches!(e.slot, Slot::Message(id) if messages.get(&id).is_some_and(|m| m.conv == conv))
                });
            }
        }
        let info = self.conv_info(conv).expect("exists");
        let event = MemberEvent {
            conv: info.clone(),
            user: target.to_owned(),
            change: if add {
                MemberChange::Added
            } else {
                MemberChange::Removed
            },
            by: self.user_name(user),
            ts: now,
        };
        self.member_entries(w, &recipients, &event);
        Ok((info, true))
    }

    pub(super) fn conv_list(&self, user: UserId) -> Vec<ConvInfo> {
        self.convs
            .iter()
            .filter(|(_, c)| c.members.contains(&user))
            .filter_map(|(&id, _)| self.conv_info(id))
            .collect()
    }

    pub(super) fn conv_member_ids(
        &self,
        user: UserId,
        conv: ConvId,
    ) -> Result<Vec<UserId>, StoreError> {
        Ok(self
            .require_member(conv, user)?
            .members
            .iter()
            .copied()
            .collect())
    }

    pub(super) fn history(
        &self,
        actor: Actor,
        conv: ConvId,
        before: Option<u64>,
        limit: u32,
    ) -> Result<HistoryPage, StoreError> {
        self.require_actor(conv, actor)?;
        let before = before.unwrap_or(u64::MAX);
        let mut messages: Vec<Message> = self
            .messages
            .iter()
            .rev()
            .filter(|(_, m)| m.conv == conv && m.conv_seq < before)
            .take(limit as usize + 1)
            .filter_map(|(&id, _)| self.message(id))
            .collect();
        let more = messages.len() > limit as usize;
        messages.truncate(limit as usize);
        messages.reverse();
        Ok(HistoryPage {
            rid: String::new(),
            conv,
            messages,
            more,
        })
    }

    pub(super) fn mark_read(
        &mut self,
        w: &mut WriteCtx<'_>,
        user: UserId,
        conv: ConvId,
        up_to: u64,
    ) -> Result<bool, StoreError> {
        let last = self.require_member(conv, user)?.last_seq;
        let up_to = up_to.min(last);
        let mark = self.reads.entry((user, conv)).or_insert(0);
        if up_to <= *mark {
            return Ok(false);
        }
        *mark = up_to;
        let ts = self.log_ts(w.now_ms);
        self.append(
            w,
            user,
            Slot::Event(EntryItem::Read(ReadMark { conv, up_to, ts })),
            ts,
            None,
            Some(crate::store::Origin {
                conv,
                sender: user,
                kind: crate::store::OriginKind::Read,
            }),
        );
        Ok(true)
    }
}
