//! Conversations: creation, membership changes, lists and history.

use std::collections::BTreeSet;

use keepwire_proto::{
    ConvCreate, ConvId, ConvInfo, ConvKind, ErrorCode, HistoryPage, MemberChange, MemberEvent,
};
use rusqlite::{Connection, OptionalExtension, params};

use super::Ctx;
use super::inbox::membership_entries;
use super::queries::{
    MESSAGE_COLUMNS, actor_id, conv_info, is_member, kind_str, member_ids, message_from_row,
    require_actor, user_id_by_name, user_name,
};
use super::writer::Heads;
use crate::store::{Actor, StoreError};

/// A page of `conv`'s history below `before`, for a member (or the system).
pub(super) fn history(
    c: &Connection,
    actor: Actor,
    conv: ConvId,
    before: Option<u64>,
    limit: u32,
) -> Result<HistoryPage, StoreError> {
    require_actor(c, conv, actor)?;
    let before = before.unwrap_or(i64::MAX as u64).min(i64::MAX as u64) as i64;
    let sql = format!(
        "SELECT {MESSAGE_COLUMNS} FROM messages m WHERE m.conv_id = ?1 AND m.conv_seq < ?2
         ORDER BY m.conv_seq DESC LIMIT ?3"
    );
    let mut stmt = c.prepare_cached(&sql)?;
    let mut messages = stmt
        .query_map(params![conv as i64, before, i64::from(limit) + 1], |r| {
            message_from_row(r, 0)
        })?
        .collect::<Result<Vec<_>, _>>()?;
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

/// Creates a conversation (or finds the one an identical request made).
pub(super) fn create(
    c: &Connection,
    heads: &mut Heads,
    ctx: &Ctx,
    actor: Actor,
    req: ConvCreate,
    max_group_size: usize,
) -> Result<(ConvInfo, bool), StoreError> {
    // The creator (unless it is the system) is always a member.
    let user = actor_id(c, actor, ctx.clock.now_ms())?;
    let mut ids = match actor {
        Actor::User(u) => BTreeSet::from([u]),
        Actor::System => BTreeSet::new(),
    };
    for name in &req.members {
        let id = user_id_by_name(c, name)?.ok_or_else(|| {
            StoreError::refused(ErrorCode::UnknownUser, format!("no user named {name:?}"))
        })?;
        ids.insert(id);
    }
    let existing: Option<i64> = match req.kind {
        ConvKind::Direct => {
            if ids.len() != 2 {
                return Err(StoreError::refused(
                    ErrorCode::Invalid,
                    "a direct conversation needs another user",
                ));
            }
            let key = ids.iter().map(i64::to_string).collect::<Vec<_>>().join(":");
            c.prepare_cached("SELECT id FROM convs WHERE direct_key = ?1")?
                .query_row([key], |r| r.get(0))
                .optional()?
        }
        ConvKind::Group => c
            .prepare_cached("SELECT id FROM convs WHERE created_by = ?1 AND create_key = ?2")?
            .query_row(params![user, req.key], |r| r.get(0))
            .optional()?,
    };
    if let Some(id) = existing {
        // Only a member learns what an earlier create made (a creator who
        // left does not get the members back through its key).
        if let Actor::User(u) = actor {
            super::queries::require_member(c, id as u64, u)?;
        }
        let info =
            conv_info(c, id as u64)?.ok_or_else(|| StoreError::commit("conversation vanished"))?;
        return Ok((info, false));
    }
    if ids.len() > max_group_size {
        return Err(StoreError::refused(
            ErrorCode::GroupTooLarge,
            format!("a group has at most {max_group_size} members"),
        ));
    }
    let now = ctx.clock.log_ts();
    let direct_key = (req.kind == ConvKind::Direct)
        .then(|| ids.iter().map(i64::to_string).collect::<Vec<_>>().join(":"));
    c.prepare_cached(
        "INSERT INTO convs (kind, name, created_by, create_key, direct_key, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        kind_str(req.kind),
        req.name,
        user,
        req.key,
        direct_key,
        now
    ])?;
    let conv = c.last_insert_rowid() as u64;
    for &id in &ids {
        c.prepare_cached("INSERT INTO members (conv_id, user_id, joined_at) VALUES (?1, ?2, ?3)")?
            .execute(params![conv as i64, id, now])?;
    }
    let info = conv_info(c, conv)?.ok_or_else(|| StoreError::commit("conversation vanished"))?;
    let by = user_name(c, user)?;
    // Each member learns of the conversation through its own inbox.
    for &id in &ids {
        let event = MemberEvent {
            conv: info.clone(),
            user: user_name(c, id)?,
            change: MemberChange::Added,
            by: by.clone(),
            ts: now,
        };
        membership_entries(c, &[id], &event, ctx.retention.max_entries, heads)?;
    }
    Ok((info, true))
}

/// Adds or removes `target` (idempotent).
#[allow(
    clippy::too_many_arguments,
    reason = "the trait method's arguments plus the connection, the group's entries and the context"
)]
pub(super) fn change_member(
    c: &Connection,
    heads: &mut Heads,
    ctx: &Ctx,
    actor: Actor,
    conv: ConvId,
    target: &str,
    add: bool,
    max_group_size: usize,
) -> Result<(ConvInfo, bool), StoreError> {
    require_actor(c, conv, actor)?;
    let user = actor_id(c, actor, ctx.clock.now_ms())?;
    let info = conv_info(c, conv)?.ok_or_else(|| {
        StoreError::refused(
            ErrorCode::NoSuchConv,
            format!("conversation {conv} does not exist"),
        )
    })?;
    if info.kind == ConvKind::Direct {
        return Err(StoreError::refused(
            ErrorCode::Forbidden,
            "the members of a direct conversation cannot change",
        ));
    }
    let target_id = user_id_by_name(c, target)?.ok_or_else(|| {
        StoreError::refused(ErrorCode::UnknownUser, format!("no user named {target:?}"))
    })?;
    let present = is_member(c, conv, target_id)?;
    if present == add {
        return Ok((info, false));
    }
    let now = ctx.clock.log_ts();
    let recipients = if add {
        if info.members.len() >= max_group_size {
            return Err(StoreError::refused(
                ErrorCode::GroupTooLarge,
                format!("a group has at most {max_group_size} members"),
            ));
        }
        c.prepare_cached("INSERT INTO members (conv_id, user_id, joined_at) VALUES (?1, ?2, ?3)")?
            .execute(params![conv as i64, target_id, now])?;
        member_ids(c, conv)?
    } else {
        let creator: i64 = c
            .prepare_cached("SELECT created_by FROM convs WHERE id = ?1")?
            .query_row([conv as i64], |r| r.get(0))?;
        if actor != Actor::System && target_id != user && user != creator {
            return Err(StoreError::refused(
                ErrorCode::Forbidden,
                "only the creator can remove other members",
            ));
        }
        let mut r = member_ids(c, conv)?;
        c.prepare_cached("DELETE FROM members WHERE conv_id = ?1 AND user_id = ?2")?
            .execute(params![conv as i64, target_id])?;
        // The removed user learns of it too.
        r.sort_unstable();
        r
    };
    let info = conv_info(c, conv)?.ok_or_else(|| StoreError::commit("conversation vanished"))?;
    let event = MemberEvent {
        conv: info.clone(),
        user: target.to_owned(),
        change: if add {
            MemberChange::Added
        } else {
            MemberChange::Removed
        },
        by: user_name(c, user)?,
        ts: now,
    };
    membership_entries(c, &recipients, &event, ctx.retention.max_entries, heads)?;
    Ok((info, true))
}

/// The conversations `user` belongs to.
pub(super) fn list(
    c: &Connection,
    user: crate::store::UserId,
) -> Result<Vec<ConvInfo>, StoreError> {
    let ids: Vec<i64> = c
        .prepare_cached("SELECT conv_id FROM members WHERE user_id = ?1 ORDER BY conv_id")?
        .query_map([user], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        if let Some(info) = conv_info(c, id as u64)? {
            out.push(info);
        }
    }
    Ok(out)
}
