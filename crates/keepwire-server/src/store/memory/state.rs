//! The memory store's data and its operations: plain functions over
//! [`State`], the same rules as the SQLite store's SQL.
//!
//! Every write operation checks everything before it changes anything, so a
//! refused write leaves the state untouched (a group commit is all or
//! nothing without a rollback log).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use keepwire_proto::{
    Confirm, ConvId, ConvInfo, ConvKind, Cursor, EntryItem, ErrorCode, FetchHint, GapReason,
    InboxEntry, Message, Resume, ResumeStatus, Send as SendMsg, Seq, SeqRange, is_valid_user_name,
};

use crate::store::{
    Actor, HeadAdvance, Origin, OriginKind, ResumePlan, Retention, Revocation, SYSTEM_USER,
    StoreError, TrimReport, UserId,
};

/// Most fetch hints in a `welcome`.
const MAX_FETCH_HINTS: usize = 500;

/// A user.
#[derive(Debug, Clone)]
pub(super) struct User {
    pub(super) name: String,
    /// Highest inbox sequence handed out (0 = none).
    pub(super) head: Seq,
    /// Lowest inbox sequence still stored (`head + 1` when empty).
    pub(super) floor: Seq,
    /// App-issued tokens issued at or before this time are revoked.
    pub(super) tokens_revoked_at: Option<i64>,
}

/// A `kw_` token (by hash).
#[derive(Debug, Clone)]
pub(super) struct Token {
    pub(super) id: i64,
    pub(super) user: UserId,
    pub(super) hash: Vec<u8>,
    pub(super) created_at: i64,
    pub(super) expires_at: i64,
    pub(super) revoked_at: Option<i64>,
}

/// A device of a user.
#[derive(Debug, Clone)]
pub(super) struct Device {
    pub(super) acked_seq: Seq,
    pub(super) first_seen: i64,
    pub(super) last_seen: i64,
    pub(super) revoked_at: Option<i64>,
    /// The keepwire tokens it connected with.
    pub(super) tokens: Vec<i64>,
}

/// A conversation.
#[derive(Debug, Clone)]
pub(super) struct Conv {
    pub(super) kind: ConvKind,
    pub(super) name: Option<String>,
    pub(super) created_by: UserId,
    pub(super) create_key: String,
    pub(super) last_seq: u64,
    pub(super) members: BTreeSet<UserId>,
    /// The id of its newest message (0 = none): recency for fetch hints.
    pub(super) last_message: u64,
}

/// A stored message.
#[derive(Debug, Clone)]
pub(super) struct StoredMessage {
    pub(super) conv: ConvId,
    pub(super) conv_seq: u64,
    pub(super) sender: UserId,
    pub(super) cid: String,
    pub(super) kind: String,
    pub(super) body: String,
    pub(super) ts: i64,
}

/// An inbox entry: a message by id, or an event.
#[derive(Debug, Clone)]
pub(super) enum Slot {
    Message(u64),
    Event(EntryItem),
}

#[derive(Debug, Clone)]
pub(super) struct Entry {
    pub(super) slot: Slot,
    pub(super) ts: i64,
}

/// A dedupe key's record.
#[derive(Debug, Clone)]
pub(super) struct SendRecord {
    pub(super) conv: ConvId,
    pub(super) kind: String,
    pub(super) body: String,
    pub(super) message: u64,
    pub(super) conv_seq: u64,
    pub(super) ts: i64,
}

/// A push registration and where its pushes stand.
#[derive(Debug, Clone)]
pub(super) struct PushReg {
    pub(super) reg_id: String,
    pub(super) key: Vec<u8>,
    pub(super) provider: String,
    pub(super) registration: String,
    pub(super) previews: bool,
    pub(super) refreshed_at: i64,
    pub(super) pushed_seq: Seq,
    pub(super) delivered_seq: Seq,
    pub(super) pushed_at: Option<i64>,
    pub(super) attempts: u32,
    pub(super) last_success: Option<i64>,
    pub(super) last_error: Option<String>,
}

/// An API key (by hash).
#[derive(Debug, Clone)]
pub(super) struct ApiKey {
    pub(super) id: i64,
    pub(super) name: String,
    pub(super) hash: Vec<u8>,
    pub(super) created_at: i64,
    pub(super) revoked_at: Option<i64>,
}

/// Everything the memory store keeps.
#[derive(Debug, Clone, Default)]
pub(super) struct State {
    pub(super) users: BTreeMap<UserId, User>,
    pub(super) user_ids: HashMap<String, UserId>,
    pub(super) tokens: Vec<Token>,
    pub(super) revocations: Vec<Revocation>,
    pub(super) devices: BTreeMap<(UserId, String), Device>,
    pub(super) convs: BTreeMap<ConvId, Conv>,
    pub(super) direct: HashMap<(UserId, UserId), ConvId>,
    pub(super) messages: BTreeMap<u64, StoredMessage>,
    pub(super) inbox: HashMap<UserId, BTreeMap<Seq, Entry>>,
    pub(super) sends: HashMap<(UserId, String, String), SendRecord>,
    pub(super) reads: HashMap<(UserId, ConvId), u64>,
    pub(super) api_keys: Vec<ApiKey>,
    /// Push registrations by (user, device).
    pub(super) push: BTreeMap<(UserId, String), PushReg>,
    /// Muted (user, conversation) pairs.
    pub(super) mutes: std::collections::BTreeSet<(UserId, ConvId)>,
    /// Meta data (the VAPID key).
    pub(super) meta: BTreeMap<String, String>,
    pub(super) next_message: u64,
    /// The latest log time handed out (entry times never go back).
    pub(super) last_ts: i64,
}

/// What a write operation needs besides the state.
pub(super) struct WriteCtx<'a> {
    pub(super) now_ms: i64,
    pub(super) retention: Retention,
    pub(super) heads: &'a mut Vec<HeadAdvance>,
    #[cfg(any(test, feature = "testing"))]
    pub(super) sabotage: Option<super::Sabotage>,
}

impl WriteCtx<'_> {
    #[cfg(any(test, feature = "testing"))]
    pub(super) fn sabotaged(&self, s: super::Sabotage) -> bool {
        self.sabotage == Some(s)
    }
}

pub(super) fn refused(code: ErrorCode, msg: impl Into<String>) -> StoreError {
    StoreError::Refused(code, msg.into())
}

pub(super) fn no_such_conv(conv: ConvId) -> StoreError {
    refused(
        ErrorCode::NoSuchConv,
        format!("conversation {conv} does not exist"),
    )
}

impl State {
    /// A log time: the wall clock, never earlier than the last one.
    pub(super) fn log_ts(&mut self, now_ms: i64) -> i64 {
        self.last_ts = self.last_ts.max(now_ms);
        self.last_ts
    }

    pub(super) fn user_id(&self, name: &str) -> Option<UserId> {
        self.user_ids.get(name).copied()
    }

    pub(super) fn user_name(&self, id: UserId) -> String {
        self.users
            .get(&id)
            .map(|u| u.name.clone())
            .unwrap_or_default()
    }

    /// Creates a user; the caller checked the name is free.
    pub(super) fn insert_user(&mut self, name: &str) -> UserId {
        let id = self.users.keys().next_back().copied().unwrap_or(0) + 1;
        self.users.insert(
            id,
            User {
                name: name.to_owned(),
                head: 0,
                floor: 1,
                tokens_revoked_at: None,
            },
        );
        self.user_ids.insert(name.to_owned(), id);
        id
    }

    pub(super) fn actor_id(&mut self, actor: Actor) -> UserId {
        match actor {
            Actor::User(u) => u,
            Actor::System => match self.user_id(SYSTEM_USER) {
                Some(id) => id,
                None => self.insert_user(SYSTEM_USER),
            },
        }
    }

    pub(super) fn require_member(&self, conv: ConvId, user: UserId) -> Result<&Conv, StoreError> {
        let c = self.convs.get(&conv).ok_or_else(|| no_such_conv(conv))?;
        if c.members.contains(&user) {
            Ok(c)
        } else {
            Err(refused(
                ErrorCode::NotMember,
                format!("you are not a member of conversation {conv}"),
            ))
        }
    }

    pub(super) fn require_actor(&self, conv: ConvId, actor: Actor) -> Result<&Conv, StoreError> {
        match actor {
            Actor::User(u) => self.require_member(conv, u),
            Actor::System => self.convs.get(&conv).ok_or_else(|| no_such_conv(conv)),
        }
    }

    pub(super) fn conv_info(&self, id: ConvId) -> Option<ConvInfo> {
        let c = self.convs.get(&id)?;
        let mut members: Vec<String> = c.members.iter().map(|&u| self.user_name(u)).collect();
        members.sort();
        Some(ConvInfo {
            id,
            kind: c.kind,
            name: c.name.clone(),
            members,
            last_seq: c.last_seq,
        })
    }

    pub(super) fn message(&self, id: u64) -> Option<Message> {
        let m = self.messages.get(&id)?;
        Some(Message {
            id,
            conv: m.conv,
            conv_seq: m.conv_seq,
            from: self.user_name(m.sender),
            cid: m.cid.clone(),
            kind: m.kind.clone(),
            body: m.body.clone(),
            ts: m.ts,
        })
    }

    /// Appends an entry to `user`'s inbox and applies the count retention.
    pub(super) fn append(
        &mut self,
        w: &mut WriteCtx<'_>,
        user: UserId,
        slot: Slot,
        ts: i64,
        item: Option<&Arc<str>>,
        origin: Option<Origin>,
    ) -> Seq {
        let u = self.users.get_mut(&user).expect("members are users");
        u.head += 1;
        #[cfg(any(test, feature = "testing"))]
        if w.sabotaged(super::Sabotage::SkipSequence) && u.head.is_multiple_of(17) {
            u.head += 1;
        }
        let seq = u.head;
        let inbox = self.inbox.entry(user).or_default();
        inbox.insert(seq, Entry { slot, ts });
        if let Some(max) = w.retention.max_entries {
            let max = max.max(1);
            if u.head + 1 - u.floor > max {
                let new_floor = u.head - max + 1;
                let kept = inbox.split_off(&new_floor);
                *inbox = kept;
                u.floor = new_floor;
            }
        }
        w.heads.push(HeadAdvance {
            user,
            seq,
            item: item.cloned(),
            origin,
        });
        seq
    }

    // -- sends ------------------------------------------------------------

    pub(super) fn send(
        &mut self,
        w: &mut WriteCtx<'_>,
        actor: Actor,
        device: &str,
        send: SendMsg,
    ) -> Result<Confirm, StoreError> {
        let user = self.actor_id(actor);
        let key = (user, device.to_owned(), send.cid.clone());
        #[cfg(any(test, feature = "testing"))]
        let known = if w.sabotaged(super::Sabotage::DoubleStore) {
            None
        } else {
            self.sends.get(&key)
        };
        #[cfg(not(any(test, feature = "testing")))]
        let known = self.sends.get(&key);
        if let Some(r) = known {
            if r.conv != send.conv || r.kind != send.kind || r.body != send.body {
                return Err(refused(
                    ErrorCode::CidConflict,
                    "this cid was already used by this device for a different message",
                ));
            }
            return Ok(Confirm {
                cid: send.cid,
                id: r.message,
                conv: r.conv,
                conv_seq: r.conv_seq,
                ts: r.ts,
                duplicate: true,
                echo_seq: None,
            });
        }
        self.require_actor(send.conv, actor)?;
        let ts = self.log_ts(w.now_ms);
        self.next_message += 1;
        let id = self.next_message;
        let conv = self.convs.get_mut(&send.conv).expect("checked");
        conv.last_seq += 1;
        conv.last_message = id;
        let conv_seq = conv.last_seq;
        let members: Vec<UserId> = conv.members.iter().copied().collect();
        self.messages.insert(
            id,
            StoredMessage {
                conv: send.conv,
                conv_seq,
                sender: user,
                cid: send.cid.clone(),
                kind: send.kind.clone(),
                body: send.body.clone(),
                ts,
            },
        );
        let item: Arc<str> =
            keepwire_proto::encode(&EntryItem::Message(self.message(id).expect("inserted"))).into();
        let mut echo_seq = None;
        for m in members {
            let origin = Origin {
                conv: send.conv,
                sender: user,
                kind: OriginKind::Message,
            };
            let seq = self.append(w, m, Slot::Message(id), ts, Some(&item), Some(origin));
            if m == user {
                echo_seq = Some(seq);
            }
        }
        self.sends.insert(
            key,
            SendRecord {
                conv: send.conv,
                kind: send.kind,
                body: send.body,
                message: id,
                conv_seq,
                ts,
            },
        );
        Ok(Confirm {
            cid: send.cid,
            id,
            conv: send.conv,
            conv_seq,
            ts,
            duplicate: false,
            echo_seq,
        })
    }

    // -- inbox reads --------------------------------------------------------

    pub(super) fn head(&self, user: UserId) -> Seq {
        self.users.get(&user).map_or(0, |u| u.head)
    }

    pub(super) fn read_inbox(
        &self,
        user: UserId,
        from: Seq,
        limit: usize,
    ) -> Result<Vec<InboxEntry>, StoreError> {
        let Some(inbox) = self.inbox.get(&user) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for (&seq, e) in inbox.range(from..).take(limit) {
            let item = match &e.slot {
                Slot::Event(item) => item.clone(),
                Slot::Message(id) => match self.message(*id) {
                    Some(m) => EntryItem::Message(m),
                    None => {
                        return Err(StoreError::commit(format!(
                            "inbox entry {user}/{seq} lost its message"
                        )));
                    }
                },
            };
            out.push(InboxEntry { seq, item });
        }
        Ok(out)
    }

    pub(super) fn plan_resume(
        &self,
        epoch: &str,
        user: UserId,
        cursor: Option<&Cursor>,
        new_window: u64,
    ) -> ResumePlan {
        let (head, floor) = self.users.get(&user).map_or((0, 1), |u| (u.head, u.floor));
        let fresh_from = head.saturating_sub(new_window).saturating_add(1).max(floor);
        let (status, from, reason, missed) = match cursor {
            None => (ResumeStatus::New, fresh_from, None, None),
            Some(c) if c.epoch != epoch => {
                (ResumeStatus::Gap, fresh_from, Some(GapReason::Epoch), None)
            }
            Some(c) if c.seq > head => (
                ResumeStatus::Gap,
                fresh_from,
                Some(GapReason::CursorAhead),
                None,
            ),
            Some(c) if c.seq + 1 >= floor => (ResumeStatus::Complete, c.seq + 1, None, None),
            Some(c) => (
                ResumeStatus::Gap,
                floor,
                Some(GapReason::Retention),
                Some(SeqRange {
                    first: c.seq + 1,
                    last: floor - 1,
                }),
            ),
        };
        let fetch = if status == ResumeStatus::Complete {
            Vec::new()
        } else {
            let mut first_replayed: HashMap<ConvId, u64> = HashMap::new();
            if let Some(inbox) = self.inbox.get(&user) {
                for e in inbox.range(from..).map(|(_, e)| e) {
                    if let Slot::Message(id) = e.slot
                        && let Some(m) = self.messages.get(&id)
                    {
                        let s = first_replayed.entry(m.conv).or_insert(m.conv_seq);
                        *s = (*s).min(m.conv_seq);
                    }
                }
            }
            let mut convs: Vec<(ConvId, &Conv)> = self
                .convs
                .iter()
                .filter(|(_, c)| c.members.contains(&user))
                .map(|(&id, c)| (id, c))
                .collect();
            // Most recently active first.
            convs.sort_by(|a, b| b.1.last_message.cmp(&a.1.last_message).then(b.0.cmp(&a.0)));
            convs
                .into_iter()
                .map(|(id, c)| FetchHint {
                    conv: id,
                    before: first_replayed.get(&id).copied().unwrap_or(c.last_seq + 1),
                })
                .filter(|h| h.before > 1)
                .take(MAX_FETCH_HINTS)
                .collect()
        };
        ResumePlan {
            epoch: epoch.to_owned(),
            head,
            resume: Resume {
                status,
                from,
                reason,
                missed,
                fetch,
            },
        }
    }

    // -- devices and positions ------------------------------------------------

    pub(super) fn touch_device(
        &mut self,
        user: UserId,
        device: &str,
        token_id: Option<i64>,
        now_ms: i64,
    ) {
        let d = self
            .devices
            .entry((user, device.to_owned()))
            .or_insert(Device {
                acked_seq: 0,
                first_seen: now_ms,
                last_seen: now_ms,
                revoked_at: None,
                tokens: Vec::new(),
            });
        d.last_seen = now_ms;
        if let Some(t) = token_id
            && !d.tokens.contains(&t)
        {
            d.tokens.push(t);
        }
    }

    pub(super) fn record_ack(&mut self, user: UserId, device: &str, seq: Seq, now_ms: i64) {
        if let Some(d) = self.devices.get_mut(&(user, device.to_owned())) {
            d.acked_seq = d.acked_seq.max(seq);
            d.last_seen = now_ms;
        }
    }

    /// The highest `conv_seq` of `conv` among `user`'s entries up to `acked`.
    pub(super) fn conv_delivered(&self, user: UserId, acked: Seq, conv: ConvId) -> u64 {
        let Some(inbox) = self.inbox.get(&user) else {
            return 0;
        };
        inbox
            .range(..=acked)
            .filter_map(|(_, e)| match e.slot {
                Slot::Message(id) => self.messages.get(&id).filter(|m| m.conv == conv),
                Slot::Event(_) => None,
            })
            .map(|m| m.conv_seq)
            .max()
            .unwrap_or(0)
    }

    /// Checks a user name for creation.
    pub(super) fn check_new_user(&self, name: &str) -> Result<(), StoreError> {
        if !is_valid_user_name(name) {
            return Err(refused(
                ErrorCode::Invalid,
                format!(
                    "{name:?} is not a valid user name: use 1-64 characters of [A-Za-z0-9_.@-]"
                ),
            ));
        }
        if self.user_ids.contains_key(name) {
            return Err(StoreError::Conflict(format!(
                "user {name:?} already exists"
            )));
        }
        Ok(())
    }

    // -- retention ------------------------------------------------------------

    pub(super) fn trim(&mut self, retention: Retention, now_ms: i64) -> TrimReport {
        let mut report = TrimReport::default();
        if let Some(age) = retention.max_age {
            let cutoff = now_ms - i64::try_from(age.as_millis()).unwrap_or(i64::MAX);
            for (id, u) in self.users.iter_mut() {
                let Some(inbox) = self.inbox.get_mut(id) else {
                    continue;
                };
                let keep_from = inbox
                    .iter()
                    .find(|(_, e)| e.ts >= cutoff)
                    .map_or(u.head + 1, |(&s, _)| s);
                if keep_from > u.floor {
                    let kept = inbox.split_off(&keep_from);
                    report.inbox_entries += inbox.len() as u64;
                    *inbox = kept;
                    u.floor = keep_from;
                }
            }
            let before = self.messages.len();
            self.messages.retain(|_, m| m.ts >= cutoff);
            report.messages = (before - self.messages.len()) as u64;
        }
        let dedupe = retention
            .dedupe_age
            .unwrap_or(std::time::Duration::from_secs(30 * 24 * 3600))
            .max(retention.max_age.unwrap_or_default());
        let cutoff = now_ms - i64::try_from(dedupe.as_millis()).unwrap_or(i64::MAX);
        let before = self.sends.len();
        self.sends.retain(|_, r| r.ts >= cutoff);
        report.dedupe_keys = (before - self.sends.len()) as u64;
        report
    }
}
