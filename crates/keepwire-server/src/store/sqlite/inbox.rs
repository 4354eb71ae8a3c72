//! Inboxes: appending entries (with count retention), resume plans, reads,
//! sends, read markers and the age trim.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use keepwire_proto::{
    Confirm, ConvId, Cursor, EntryItem, ErrorCode, FetchHint, GapReason, InboxEntry, MemberEvent,
    Message, ReadMark, Resume, ResumeStatus, Send as SendMsg, Seq, SeqRange,
};
use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest as _, Sha256};

use super::Ctx;
use super::queries::{MESSAGE_COLUMNS, actor_id, message_from_row, require_actor, require_member};
use super::writer::Heads;
use crate::store::{
    Actor, HeadAdvance, Origin, OriginKind, ResumePlan, Retention, StoreError, TrimReport, UserId,
};

/// Most fetch hints in a `welcome` (the client lists conversations for the rest).
const MAX_FETCH_HINTS: usize = 500;

pub(super) fn send_digest(send: &SendMsg) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(send.conv.to_le_bytes());
    h.update((send.kind.len() as u64).to_le_bytes());
    h.update(send.kind.as_bytes());
    h.update(send.body.as_bytes());
    h.finalize().to_vec()
}

/// Appends an event entry (membership, read or mute marker, stored as its
/// JSON) to a user's inbox and applies the count retention.
pub(super) fn append_event(
    conn: &Connection,
    user: UserId,
    event: &str,
    ts: i64,
    max_entries: Option<u64>,
    heads: &mut Heads,
    origin: Option<Origin>,
) -> Result<Seq, StoreError> {
    let (head, floor): (i64, i64) = conn
        .prepare_cached(
            "UPDATE users SET inbox_head = inbox_head + 1 WHERE id = ?1
             RETURNING inbox_head, inbox_floor",
        )?
        .query_row([user], |r| Ok((r.get(0)?, r.get(1)?)))?;
    conn.prepare_cached(
        "INSERT INTO inbox (user_id, seq, message_id, event, ts) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![user, head, None::<i64>, event, ts])?;
    trim_to_max_entries(conn, user, head, floor, max_entries)?;
    heads.push(HeadAdvance {
        user,
        seq: head as Seq,
        item: None,
        origin,
    });
    Ok(head as Seq)
}

/// Appends message `message_id` to the inbox of every member of `conv`, in
/// two statements whatever the group's size (one row per member, but not one
/// statement per member: that overhead was most of the writer's work under
/// group fanout). Returns the sender's own sequence (its echo), if a member.
#[allow(clippy::too_many_arguments)]
pub(super) fn append_message_to_members(
    conn: &Connection,
    conv: ConvId,
    message_id: i64,
    sender: UserId,
    ts: i64,
    max_entries: Option<u64>,
    heads: &mut Heads,
    item: &Arc<str>,
) -> Result<Option<Seq>, StoreError> {
    let advanced: Vec<(UserId, i64, i64)> = conn
        .prepare_cached(
            "UPDATE users SET inbox_head = inbox_head + 1
             WHERE id IN (SELECT user_id FROM members WHERE conv_id = ?1)
             RETURNING id, inbox_head, inbox_floor",
        )?
        .query_map([conv as i64], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    conn.prepare_cached(
        "INSERT INTO inbox (user_id, seq, message_id, event, ts)
         SELECT u.id, u.inbox_head, ?2, NULL, ?3
         FROM members m JOIN users u ON u.id = m.user_id WHERE m.conv_id = ?1",
    )?
    .execute(params![conv as i64, message_id, ts])?;
    let mut echo = None;
    for (user, head, floor) in advanced {
        trim_to_max_entries(conn, user, head, floor, max_entries)?;
        heads.push(HeadAdvance {
            user,
            seq: head as Seq,
            item: Some(item.clone()),
            origin: Some(Origin {
                conv,
                sender,
                kind: OriginKind::Message,
            }),
        });
        if user == sender {
            echo = Some(head as Seq);
        }
    }
    Ok(echo)
}

/// Retention by count, inline: drops `user`'s oldest entries beyond `max`.
pub(super) fn trim_to_max_entries(
    conn: &Connection,
    user: UserId,
    head: i64,
    floor: i64,
    max_entries: Option<u64>,
) -> Result<(), StoreError> {
    if let Some(max) = max_entries {
        let max = max.max(1) as i64;
        if head - floor + 1 > max {
            let new_floor = head - max + 1;
            conn.prepare_cached("DELETE FROM inbox WHERE user_id = ?1 AND seq < ?2")?
                .execute(params![user, new_floor])?;
            conn.prepare_cached("UPDATE users SET inbox_floor = ?2 WHERE id = ?1")?
                .execute(params![user, new_floor])?;
        }
    }
    Ok(())
}

pub(super) fn membership_entries(
    conn: &Connection,
    recipients: &[UserId],
    event: &MemberEvent,
    max_entries: Option<u64>,
    heads: &mut Heads,
) -> Result<(), StoreError> {
    let json = serde_json::to_string(event)
        .map_err(|e| StoreError::commit(format!("encoding a membership event: {e}")))?;
    for &r in recipients {
        append_event(conn, r, &json, event.ts, max_entries, heads, None)?;
    }
    Ok(())
}

pub(super) fn plan_resume(
    conn: &mut Connection,
    epoch: &str,
    user: UserId,
    cursor: Option<&Cursor>,
    new_window: u64,
) -> Result<ResumePlan, StoreError> {
    let tx = conn.transaction()?;
    let (head, floor): (i64, i64) = tx
        .prepare_cached("SELECT inbox_head, inbox_floor FROM users WHERE id = ?1")?
        .query_row([user], |r| Ok((r.get(0)?, r.get(1)?)))?;
    let (head, floor) = (head as Seq, floor as Seq);
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
        let mut first_replayed: HashMap<i64, i64> = HashMap::new();
        let mut stmt = tx.prepare_cached(
            "SELECT m.conv_id, MIN(m.conv_seq) FROM inbox i JOIN messages m ON m.id = i.message_id
             WHERE i.user_id = ?1 AND i.seq >= ?2 GROUP BY m.conv_id",
        )?;
        let rows = stmt.query_map(params![user, from as i64], |r| Ok((r.get(0)?, r.get(1)?)))?;
        for row in rows {
            let (conv, seq) = row?;
            first_replayed.insert(conv, seq);
        }
        drop(stmt);
        let mut stmt = tx.prepare_cached(
            // Most recently active first: by each conversation's newest message.
            "SELECT c.id, c.last_seq FROM members mb JOIN convs c ON c.id = mb.conv_id
             WHERE mb.user_id = ?1
             ORDER BY (SELECT m.id FROM messages m WHERE m.conv_id = c.id
                       ORDER BY m.conv_seq DESC LIMIT 1) DESC NULLS LAST, c.id DESC",
        )?;
        let convs = stmt
            .query_map([user], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        convs
            .into_iter()
            .map(|(conv, last)| {
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
    tx.commit()?;
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

pub(super) fn read_inbox(
    conn: &Connection,
    user: UserId,
    from: Seq,
    limit: usize,
) -> Result<Vec<InboxEntry>, StoreError> {
    let sql = format!(
        "SELECT i.seq, i.event, {MESSAGE_COLUMNS} FROM inbox i LEFT JOIN messages m ON m.id = i.message_id
         WHERE i.user_id = ?1 AND i.seq >= ?2 ORDER BY i.seq LIMIT ?3"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let mut rows = stmt.query(params![user, from as i64, limit as i64])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        let seq = r.get::<_, i64>(0)? as Seq;
        let event: Option<String> = r.get(1)?;
        let item = if let Some(ev) = event {
            // Events are stored as an `EntryItem` (read markers) or, from
            // schema 1, a bare membership event.
            match serde_json::from_str::<EntryItem>(&ev)
                .or_else(|_| serde_json::from_str::<MemberEvent>(&ev).map(EntryItem::Member))
            {
                Ok(e) => e,
                Err(e) => {
                    return Err(StoreError::commit(format!(
                        "corrupt inbox event {user}/{seq}: {e}"
                    )));
                }
            }
        } else if r.get::<_, Option<i64>>(2)?.is_some() {
            EntryItem::Message(message_from_row(r, 2)?)
        } else {
            // Retention removes an entry and its message together; a dangling
            // entry means the store was damaged. Stop rather than skip silently.
            return Err(StoreError::commit(format!(
                "inbox entry {user}/{seq} lost its message"
            )));
        };
        out.push(InboxEntry { seq, item });
    }
    Ok(out)
}

/// Stores a message from `actor`'s `device` (or finds the original for a
/// repeated cid) and appends it to every member's inbox.
pub(super) fn send(
    c: &Connection,
    heads: &mut Heads,
    ctx: &Ctx,
    actor: Actor,
    device: &str,
    send: SendMsg,
) -> Result<Confirm, StoreError> {
    let user = actor_id(c, actor, ctx.clock.now_ms())?;
    let digest = send_digest(&send);
    let prior = c
        .prepare_cached(
            "SELECT digest, message_id, conv_id, conv_seq, ts FROM sends
             WHERE user_id = ?1 AND device = ?2 AND cid = ?3",
        )?
        .query_row(params![user, device, send.cid], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
            ))
        })
        .optional()?;
    if let Some((d, id, conv, conv_seq, ts)) = prior {
        if d != digest {
            return Err(StoreError::refused(
                ErrorCode::CidConflict,
                "this cid was already used by this device for a different message",
            ));
        }
        return Ok(Confirm {
            cid: send.cid,
            id: id as u64,
            conv: conv as u64,
            conv_seq: conv_seq as u64,
            ts,
            duplicate: true,
            echo_seq: None,
        });
    }
    require_actor(c, send.conv, actor)?;
    let ts = ctx.clock.log_ts();
    let conv_seq: i64 = c
        .prepare_cached(
            "UPDATE convs SET last_seq = last_seq + 1 WHERE id = ?1 RETURNING last_seq",
        )?
        .query_row([send.conv as i64], |r| r.get(0))?;
    c.prepare_cached(
        "INSERT INTO messages (conv_id, conv_seq, sender_id, cid, kind, body, ts)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        send.conv as i64,
        conv_seq,
        user,
        send.cid,
        send.kind,
        send.body,
        ts
    ])?;
    let id = c.last_insert_rowid();
    let sender: String = c
        .prepare_cached("SELECT name FROM users WHERE id = ?1")?
        .query_row([user], |r| r.get(0))?;
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
    let echo_seq = append_message_to_members(
        c,
        send.conv,
        id,
        user,
        ts,
        ctx.retention.max_entries,
        heads,
        &item,
    )?;
    c.prepare_cached(
        "INSERT INTO sends (user_id, device, cid, digest, message_id, conv_id, conv_seq, ts)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        user,
        device,
        send.cid,
        digest,
        id,
        send.conv as i64,
        conv_seq,
        ts
    ])?;
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

/// Moves `user`'s read marker of `conv` and appends a `read` entry when it moved.
pub(super) fn mark_read(
    c: &Connection,
    heads: &mut Heads,
    ctx: &Ctx,
    user: UserId,
    conv: ConvId,
    up_to: u64,
) -> Result<bool, StoreError> {
    require_member(c, conv, user)?;
    let last: i64 = c
        .prepare_cached("SELECT last_seq FROM convs WHERE id = ?1")?
        .query_row([conv as i64], |r| r.get(0))?;
    let up_to = (up_to.min(i64::MAX as u64) as i64).min(last);
    let n = c
        .prepare_cached(
            "INSERT INTO reads (user_id, conv_id, up_to) VALUES (?1, ?2, ?3)
             ON CONFLICT (user_id, conv_id) DO UPDATE SET up_to = excluded.up_to
             WHERE excluded.up_to > reads.up_to",
        )?
        .execute(params![user, conv as i64, up_to])?;
    if n == 0 || up_to <= 0 {
        return Ok(false);
    }
    let ts = ctx.clock.log_ts();
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
        c,
        user,
        &json,
        ts,
        ctx.retention.max_entries,
        heads,
        Some(origin),
    )?;
    Ok(true)
}

/// Applies the age retention and drops old dedupe keys.
pub(super) fn trim(c: &Connection, ctx: &Ctx) -> Result<TrimReport, StoreError> {
    let retention: Retention = ctx.retention;
    let now = ctx.clock.now_ms();
    let mut report = TrimReport::default();
    if let Some(age) = retention.max_age {
        let cutoff = now - i64::try_from(age.as_millis()).unwrap_or(i64::MAX);
        // Per user, everything before the first entry young enough
        // to keep (entries are appended in commit order, so a
        // user's entry times rise with the sequence; the scan
        // stops at the first one to keep).
        let mut users = c.prepare_cached("SELECT id, inbox_floor, inbox_head FROM users")?;
        let users: Vec<(i64, i64, i64)> = users
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?;
        for (user, floor, head) in users {
            if floor > head {
                continue;
            }
            let keep_from: i64 = c
                .prepare_cached(
                    "SELECT seq FROM inbox WHERE user_id = ?1 AND ts >= ?2
                     ORDER BY seq LIMIT 1",
                )?
                .query_row(params![user, cutoff], |r| r.get(0))
                .optional()?
                .unwrap_or(head + 1);
            if keep_from > floor {
                report.inbox_entries +=
                    c.prepare_cached("DELETE FROM inbox WHERE user_id = ?1 AND seq < ?2")?
                        .execute(params![user, keep_from])? as u64;
                c.prepare_cached("UPDATE users SET inbox_floor = ?2 WHERE id = ?1")?
                    .execute(params![user, keep_from])?;
            }
        }
        report.messages = c.execute("DELETE FROM messages WHERE ts < ?1", [cutoff])? as u64;
    }
    let dedupe = retention
        .dedupe_age
        .unwrap_or(Duration::from_secs(30 * 24 * 3600))
        .max(retention.max_age.unwrap_or_default());
    let cutoff = now - i64::try_from(dedupe.as_millis()).unwrap_or(i64::MAX);
    report.dedupe_keys = c.execute("DELETE FROM sends WHERE ts < ?1", [cutoff])? as u64;
    // Push registrations not refreshed for 60 days are dead.
    c.execute(
        "DELETE FROM push_registrations WHERE refreshed_at < ?1",
        [now - super::push::STALE_AFTER_MS],
    )?;
    Ok(report)
}
