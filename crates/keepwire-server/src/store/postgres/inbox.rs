//! Inboxes: locking heads, appending entries (with count retention),
//! resume plans, reads, sends, read markers and the age trim.

use std::collections::HashMap;
use std::sync::Arc;

use keepwire_proto::{
    Confirm, ConvId, Cursor, EntryItem, ErrorCode, FetchHint, GapReason, InboxEntry, MemberEvent,
    Message, ReadMark, Resume, ResumeStatus, Send as SendMsg, Seq, SeqRange,
};

use sha2::{Digest as _, Sha256};

use super::queries::{
    MESSAGE_COLUMNS, actor_id, all, exec, message_from_row, one, opt, require_actor,
};
use super::{Ctx, Heads, PgError, Tx};
use crate::store::{Actor, HeadAdvance, Origin, OriginKind, ResumePlan, StoreError, UserId};

/// Most fetch hints in a `welcome` (the client lists conversations for the rest).
const MAX_FETCH_HINTS: usize = 500;
/// Inbox entries, messages or dedupe keys one trim transaction deletes at most.
pub(super) const TRIM_CHUNK: i64 = 5_000;

/// What a cid's dedupe key remembers of the send (same as the SQLite
/// store's), to tell a repeat from a different message under one cid.
fn send_digest(send: &SendMsg) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(send.conv.to_le_bytes());
    h.update((send.kind.len() as u64).to_le_bytes());
    h.update(send.kind.as_bytes());
    h.update(send.body.as_bytes());
    h.finalize().to_vec()
}

/// A user's inbox head row, locked until the commit.
#[derive(Debug, Clone, Copy)]
pub(super) struct Head {
    pub(super) user: UserId,
    pub(super) head: i64,
    pub(super) floor: i64,
    /// Time of the user's newest entry.
    pub(super) last_ts: i64,
}

/// Locks the head rows of `users` in id order (every writer locks heads in
/// this order, so writers never wait on each other in a cycle). Only the
/// existing users are returned, sorted by id.
pub(super) async fn lock_heads(tx: &Tx<'_>, users: &[UserId]) -> Result<Vec<Head>, PgError> {
    // NO KEY UPDATE: the lock an UPDATE of these columns takes anyway; it
    // excludes other writers of the row but not inserts of tokens that
    // reference the user.
    Ok(all(
        tx,
        "SELECT id, inbox_head, inbox_floor, last_ts FROM users WHERE id = ANY($1)
         ORDER BY id FOR NO KEY UPDATE",
        &[&users],
    )
    .await?
    .iter()
    .map(|r| Head {
        user: r.get(0),
        head: r.get(1),
        floor: r.get(2),
        last_ts: r.get(3),
    })
    .collect())
}

/// The time for entries appended to `heads`: the log clock's now, raised to
/// the newest time of the locked heads (so each user's entry times rise
/// with its sequence, whatever the nodes' or the database's clock did).
pub(super) async fn entry_time(
    tx: &Tx<'_>,
    ctx: &Ctx,
    heads: &[Head],
    floor: i64,
) -> Result<i64, PgError> {
    let now = ctx.log_now(tx).await?;
    Ok(heads
        .iter()
        .map(|h| h.last_ts)
        .fold(now.max(floor), i64::max))
}

/// Appends an event entry (membership, read or mute marker, stored as its
/// JSON) to a user's inbox, whose head the caller locked, and applies the
/// count retention.
pub(super) async fn append_event(
    tx: &Tx<'_>,
    user: UserId,
    event: &str,
    ts: i64,
    max_entries: Option<u64>,
    heads: &mut Heads,
    origin: Option<Origin>,
) -> Result<Seq, PgError> {
    let r = one(
        tx,
        "UPDATE users SET inbox_head = inbox_head + 1, last_ts = GREATEST(last_ts, $2)
         WHERE id = $1 RETURNING inbox_head, inbox_floor",
        &[&user, &ts],
    )
    .await?;
    let (head, floor): (i64, i64) = (r.get(0), r.get(1));
    exec(
        tx,
        "INSERT INTO inbox (user_id, seq, message_id, event, ts) VALUES ($1, $2, NULL, $3, $4)",
        &[&user, &head, &event, &ts],
    )
    .await?;
    trim_to_max_entries(tx, user, head, floor, max_entries).await?;
    heads.push(HeadAdvance {
        user,
        seq: head as Seq,
        item: None,
        origin,
    });
    Ok(head as Seq)
}

/// Retention by count, inline: drops `user`'s oldest entries beyond `max`.
async fn trim_to_max_entries(
    tx: &Tx<'_>,
    user: UserId,
    head: i64,
    floor: i64,
    max_entries: Option<u64>,
) -> Result<(), PgError> {
    if let Some(max) = max_entries {
        let max = max.clamp(1, i64::MAX as u64) as i64;
        if head - floor + 1 > max {
            let new_floor = head - max + 1;
            exec(
                tx,
                "DELETE FROM inbox WHERE user_id = $1 AND seq < $2",
                &[&user, &new_floor],
            )
            .await?;
            exec(
                tx,
                "UPDATE users SET inbox_floor = $2 WHERE id = $1",
                &[&user, &new_floor],
            )
            .await?;
        }
    }
    Ok(())
}

/// Appends a membership event to each recipient's inbox (heads locked by
/// the caller), in id order.
pub(super) async fn membership_entries(
    tx: &Tx<'_>,
    recipients: &[UserId],
    event: &MemberEvent,
    max_entries: Option<u64>,
    heads: &mut Heads,
) -> Result<(), PgError> {
    let json = serde_json::to_string(event)
        .map_err(|e| StoreError::commit(format!("encoding a membership event: {e}")))?;
    for &r in recipients {
        append_event(tx, r, &json, event.ts, max_entries, heads, None).await?;
    }
    Ok(())
}

pub(super) async fn plan_resume(
    tx: &Tx<'_>,
    epoch: &str,
    user: UserId,
    cursor: Option<&Cursor>,
    new_window: u64,
) -> Result<ResumePlan, PgError> {
    let r = opt(
        tx,
        "SELECT inbox_head, inbox_floor FROM users WHERE id = $1",
        &[&user],
    )
    .await?
    .ok_or_else(|| StoreError::commit(format!("no user {user}")))?;
    let (head, floor) = (r.get::<_, i64>(0) as Seq, r.get::<_, i64>(1) as Seq);
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
        // Per conversation: history below the first message the replay brings.
        let first_replayed: HashMap<i64, i64> = all(
            tx,
            "SELECT m.conv_id, MIN(m.conv_seq) FROM inbox i JOIN messages m ON m.id = i.message_id
             WHERE i.user_id = $1 AND i.seq >= $2 GROUP BY m.conv_id",
            &[&user, &(from.min(i64::MAX as u64) as i64)],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
        let convs = all(
            tx,
            // Most recently active first: by each conversation's newest message.
            "SELECT c.id, c.last_seq FROM members mb JOIN convs c ON c.id = mb.conv_id
             WHERE mb.user_id = $1
             ORDER BY (SELECT m.id FROM messages m WHERE m.conv_id = c.id
                       ORDER BY m.conv_seq DESC LIMIT 1) DESC NULLS LAST, c.id DESC",
            &[&user],
        )
        .await?;
        convs
            .iter()
            .map(|r| {
                let (conv, last): (i64, i64) = (r.get(0), r.get(1));
                let before = first_replayed.get(&conv).copied().unwrap_or(last + 1);
                FetchHint {
                    conv: conv as u64,
                    before: before as u64,
                }
            })
            .filter(|h| h.before > 1)
            .take(MAX_FETCH_HINTS)
            .collect()
    };
    Ok(ResumePlan {
        epoch: epoch.to_owned(),
        head,
        resume: Resume {
            status,
            from,
            reason,
            missed,
            fetch,
        },
    })
}

pub(super) async fn read_inbox(
    tx: &Tx<'_>,
    user: UserId,
    from: Seq,
    limit: usize,
) -> Result<Vec<InboxEntry>, PgError> {
    let sql = format!(
        "SELECT i.seq, i.event, {MESSAGE_COLUMNS} FROM inbox i LEFT JOIN messages m ON m.id = i.message_id
         WHERE i.user_id = $1 AND i.seq >= $2 ORDER BY i.seq LIMIT $3"
    );
    let rows = all(
        tx,
        &sql,
        &[
            &user,
            &(from.min(i64::MAX as u64) as i64),
            &(limit.min(i64::MAX as usize) as i64),
        ],
    )
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        let seq = r.get::<_, i64>(0) as Seq;
        let event: Option<String> = r.get(1);
        let item = if let Some(ev) = event {
            match serde_json::from_str::<EntryItem>(&ev)
                .or_else(|_| serde_json::from_str::<MemberEvent>(&ev).map(EntryItem::Member))
            {
                Ok(e) => e,
                Err(e) => {
                    return Err(StoreError::commit(format!(
                        "corrupt inbox event {user}/{seq}: {e}"
                    ))
                    .into());
                }
            }
        } else if let Some(m) = message_from_row(r, 2) {
            EntryItem::Message(m)
        } else {
            // Retention removes an entry and its message together; a dangling
            // entry means the store was damaged. Stop rather than skip silently.
            return Err(
                StoreError::commit(format!("inbox entry {user}/{seq} lost its message")).into(),
            );
        };
        out.push(InboxEntry { seq, item });
    }
    Ok(out)
}

/// Stores a message from `actor`'s `device` (or finds the original for a
/// repeated cid) and appends it to every member's inbox.
pub(super) async fn send(
    tx: &Tx<'_>,
    heads: &mut Heads,
    ctx: &Ctx,
    actor: Actor,
    device: &str,
    send: SendMsg,
) -> Result<Confirm, PgError> {
    let user = actor_id(tx, actor, ctx.now_ms()).await?;
    let digest = send_digest(&send);
    // Claim the dedupe key first: a concurrent send of the same key waits
    // here for this transaction, then finds the original (or, if this one
    // rolled back, claims it itself).
    let claimed = exec(
        tx,
        "INSERT INTO sends (user_id, device, cid, digest, message_id, conv_id, conv_seq, ts)
         VALUES ($1, $2, $3, $4, 0, 0, 0, 0) ON CONFLICT DO NOTHING",
        &[&user, &device, &send.cid, &digest],
    )
    .await?;
    if claimed == 0 {
        let prior = opt(
            tx,
            "SELECT digest, message_id, conv_id, conv_seq, ts FROM sends
             WHERE user_id = $1 AND device = $2 AND cid = $3",
            &[&user, &device, &send.cid],
        )
        .await?
        // Trimmed between the two statements: the retry claims it.
        .ok_or_else(|| StoreError::commit("a dedupe key vanished while it was read; retry"))?;
        if prior.get::<_, Vec<u8>>(0) != digest {
            return Err(StoreError::refused(
                ErrorCode::CidConflict,
                "this cid was already used by this device for a different message",
            )
            .into());
        }
        return Ok(Confirm {
            cid: send.cid,
            id: prior.get::<_, i64>(1) as u64,
            conv: prior.get::<_, i64>(2) as u64,
            conv_seq: prior.get::<_, i64>(3) as u64,
            ts: prior.get(4),
            duplicate: true,
            echo_seq: None,
        });
    }
    // The conversation's row first: membership cannot change under it.
    let conv_row = opt(
        tx,
        "SELECT last_seq, last_ts FROM convs WHERE id = $1 FOR NO KEY UPDATE",
        &[&(send.conv.min(i64::MAX as u64) as i64)],
    )
    .await?;
    let Some(conv_row) = conv_row else {
        return Err(StoreError::refused(
            ErrorCode::NoSuchConv,
            format!("conversation {} does not exist", send.conv),
        )
        .into());
    };
    require_actor(tx, send.conv, actor).await?;
    let conv = send.conv as i64;
    let members: Vec<UserId> = all(
        tx,
        "SELECT user_id FROM members WHERE conv_id = $1",
        &[&conv],
    )
    .await?
    .iter()
    .map(|r| r.get(0))
    .collect();
    let locked = lock_heads(tx, &members).await?;
    let ts = entry_time(tx, ctx, &locked, conv_row.get(1)).await?;
    let conv_seq = conv_row.get::<_, i64>(0) + 1;
    exec(
        tx,
        "UPDATE convs SET last_seq = $2, last_ts = $3 WHERE id = $1",
        &[&conv, &conv_seq, &ts],
    )
    .await?;
    let id: i64 = one(
        tx,
        "INSERT INTO messages (conv_id, conv_seq, sender_id, cid, kind, body, ts)
         VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
        &[
            &conv, &conv_seq, &user, &send.cid, &send.kind, &send.body, &ts,
        ],
    )
    .await?
    .get(0);
    let sender: String = one(tx, "SELECT name FROM users WHERE id = $1", &[&user])
        .await?
        .get(0);
    // The entry every member's live connections deliver from memory,
    // encoded once.
    let item: Arc<str> = keepwire_proto::encode(&EntryItem::Message(Message {
        id: id as u64,
        conv: send.conv,
        conv_seq: conv_seq as u64,
        from: sender,
        cid: send.cid.clone(),
        kind: send.kind.clone(),
        body: send.body.clone(),
        ts,
    }))
    .into();
    let echo_seq = append_message(tx, &locked, send.conv, id, user, ts, ctx, heads, &item).await?;
    exec(
        tx,
        "UPDATE sends SET message_id = $4, conv_id = $5, conv_seq = $6, ts = $7
         WHERE user_id = $1 AND device = $2 AND cid = $3",
        &[&user, &device, &send.cid, &id, &conv, &conv_seq, &ts],
    )
    .await?;
    Ok(Confirm {
        cid: send.cid,
        id: id as u64,
        conv: send.conv,
        conv_seq: conv_seq as u64,
        ts,
        duplicate: false,
        echo_seq,
    })
}

/// Appends message `message_id` to the locked members' inboxes in two
/// statements whatever the group's size. Returns the sender's own sequence
/// (its echo), if a member.
#[allow(
    clippy::too_many_arguments,
    reason = "the message's parts, the transaction, the context and the group's entries"
)]
async fn append_message(
    tx: &Tx<'_>,
    locked: &[Head],
    conv: ConvId,
    message_id: i64,
    sender: UserId,
    ts: i64,
    ctx: &Ctx,
    heads: &mut Heads,
    item: &Arc<str>,
) -> Result<Option<Seq>, PgError> {
    if locked.is_empty() {
        return Ok(None);
    }
    let ids: Vec<i64> = locked.iter().map(|h| h.user).collect();
    let seqs: Vec<i64> = locked.iter().map(|h| h.head + 1).collect();
    exec(
        tx,
        "UPDATE users SET inbox_head = inbox_head + 1, last_ts = $2 WHERE id = ANY($1)",
        &[&ids, &ts],
    )
    .await?;
    exec(
        tx,
        "INSERT INTO inbox (user_id, seq, message_id, event, ts)
         SELECT u, s, $3, NULL, $4 FROM unnest($1::bigint[], $2::bigint[]) AS t(u, s)",
        &[&ids, &seqs, &message_id, &ts],
    )
    .await?;
    let mut echo = None;
    for h in locked {
        let seq = h.head + 1;
        trim_to_max_entries(tx, h.user, seq, h.floor, ctx.retention.max_entries).await?;
        heads.push(HeadAdvance {
            user: h.user,
            seq: seq as Seq,
            item: Some(item.clone()),
            origin: Some(Origin {
                conv,
                sender,
                kind: OriginKind::Message,
            }),
        });
        if h.user == sender {
            echo = Some(seq as Seq);
        }
    }
    Ok(echo)
}

/// Moves `user`'s read marker of `conv` and appends a `read` entry when it moved.
pub(super) async fn mark_read(
    tx: &Tx<'_>,
    heads: &mut Heads,
    ctx: &Ctx,
    user: UserId,
    conv: ConvId,
    up_to: u64,
) -> Result<bool, PgError> {
    super::queries::require_member(tx, conv, user).await?;
    let last: i64 = one(
        tx,
        "SELECT last_seq FROM convs WHERE id = $1",
        &[&(conv as i64)],
    )
    .await?
    .get(0);
    let up_to = (up_to.min(i64::MAX as u64) as i64).min(last);
    let n = exec(
        tx,
        "INSERT INTO reads (user_id, conv_id, up_to) VALUES ($1, $2, $3)
         ON CONFLICT (user_id, conv_id) DO UPDATE SET up_to = EXCLUDED.up_to
         WHERE EXCLUDED.up_to > reads.up_to",
        &[&user, &(conv as i64), &up_to],
    )
    .await?;
    if n == 0 || up_to <= 0 {
        return Ok(false);
    }
    let locked = lock_heads(tx, &[user]).await?;
    let ts = entry_time(tx, ctx, &locked, 0).await?;
    let mark = EntryItem::Read(ReadMark {
        conv,
        up_to: up_to as u64,
        ts,
    });
    let json = serde_json::to_string(&mark)
        .map_err(|e| StoreError::commit(format!("encoding a read marker: {e}")))?;
    let origin = Origin {
        conv,
        sender: user,
        kind: OriginKind::Read,
    };
    append_event(
        tx,
        user,
        &json,
        ts,
        ctx.retention.max_entries,
        heads,
        Some(origin),
    )
    .await?;
    Ok(true)
}

/// Trims one user's inbox entries older than `cutoff`, at most
/// [`TRIM_CHUNK`] of them; returns how many, and whether more are due.
pub(super) async fn trim_user(
    tx: &Tx<'_>,
    user: UserId,
    cutoff: i64,
) -> Result<(u64, bool), PgError> {
    let Some(head) = lock_heads(tx, &[user]).await?.pop() else {
        return Ok((0, false));
    };
    if head.floor > head.head {
        return Ok((0, false));
    }
    // Entries are appended under the head's lock with rising times, so the
    // first young enough to keep ends the old ones.
    let keep_from: i64 = opt(
        tx,
        "SELECT seq FROM inbox WHERE user_id = $1 AND seq >= $2 AND ts >= $3
         ORDER BY seq LIMIT 1",
        &[&user, &head.floor, &cutoff],
    )
    .await?
    .map_or(head.head + 1, |r| r.get(0));
    let new_floor = keep_from.min(head.floor.saturating_add(TRIM_CHUNK));
    if new_floor <= head.floor {
        return Ok((0, false));
    }
    let n = exec(
        tx,
        "DELETE FROM inbox WHERE user_id = $1 AND seq < $2",
        &[&user, &new_floor],
    )
    .await?;
    exec(
        tx,
        "UPDATE users SET inbox_floor = $2 WHERE id = $1",
        &[&user, &new_floor],
    )
    .await?;
    Ok((n, new_floor < keep_from))
}
