//! Conversations: creation, membership changes, lists and history.

use std::collections::BTreeSet;

use keepwire_proto::{
    ConvCreate, ConvId, ConvInfo, ConvKind, ErrorCode, HistoryPage, MemberChange, MemberEvent,
};

use super::inbox::{entry_time, lock_heads, membership_entries};
use super::queries::{
    MESSAGE_COLUMNS, actor_id, all, conv_info, exec, is_member, kind_str, member_ids,
    message_from_row, opt, require_actor, require_member, user_id_by_name, user_name,
};
use super::{Ctx, Heads, PgError, Tx};
use crate::store::{Actor, DeletedUser, StoreError, UserId, deleted_user_name};

/// A page of `conv`'s history below `before`, for a member (or the system).
pub(super) async fn history(
    tx: &Tx<'_>,
    actor: Actor,
    conv: ConvId,
    before: Option<u64>,
    limit: u32,
) -> Result<HistoryPage, PgError> {
    require_actor(tx, conv, actor).await?;
    let before = before.unwrap_or(i64::MAX as u64).min(i64::MAX as u64) as i64;
    let sql = format!(
        "SELECT {MESSAGE_COLUMNS} FROM messages m WHERE m.conv_id = $1 AND m.conv_seq < $2
         ORDER BY m.conv_seq DESC LIMIT $3"
    );
    let mut messages: Vec<_> = all(
        tx,
        &sql,
        &[&(conv as i64), &before, &(i64::from(limit) + 1)],
    )
    .await?
    .iter()
    .filter_map(|r| message_from_row(r, 0))
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

/// The conversation an earlier identical request made, if any.
async fn existing(
    tx: &Tx<'_>,
    kind: ConvKind,
    direct_key: Option<&str>,
    creator: UserId,
    key: &str,
) -> Result<Option<i64>, PgError> {
    Ok(match (kind, direct_key) {
        (ConvKind::Direct, Some(dk)) => {
            opt(tx, "SELECT id FROM convs WHERE direct_key = $1", &[&dk]).await?
        }
        _ => {
            opt(
                tx,
                "SELECT id FROM convs WHERE created_by = $1 AND create_key = $2",
                &[&creator, &key],
            )
            .await?
        }
    }
    .map(|r| r.get(0)))
}

/// What an earlier create made, for a member (a creator who left does not
/// get the members back through its key).
async fn earlier(tx: &Tx<'_>, actor: Actor, id: i64) -> Result<(ConvInfo, bool), PgError> {
    if let Actor::User(u) = actor {
        require_member(tx, id as u64, u).await?;
    }
    let info = conv_info(tx, id as u64)
        .await?
        .ok_or_else(|| StoreError::commit("conversation vanished"))?;
    Ok((info, false))
}

/// Creates a conversation (or finds the one an identical request made).
pub(super) async fn create(
    tx: &Tx<'_>,
    heads: &mut Heads,
    ctx: &Ctx,
    actor: Actor,
    req: ConvCreate,
    max_group_size: usize,
) -> Result<(ConvInfo, bool), PgError> {
    // The creator (unless it is the system) is always a member.
    let user = actor_id(tx, actor, ctx.now_ms()).await?;
    let mut ids = match actor {
        Actor::User(u) => BTreeSet::from([u]),
        Actor::System => BTreeSet::new(),
    };
    for name in &req.members {
        let id = user_id_by_name(tx, name).await?.ok_or_else(|| {
            StoreError::refused(ErrorCode::UnknownUser, format!("no user named {name:?}"))
        })?;
        ids.insert(id);
    }
    if req.kind == ConvKind::Direct && ids.len() != 2 {
        return Err(StoreError::refused(
            ErrorCode::Invalid,
            "a direct conversation needs another user",
        )
        .into());
    }
    let direct_key = (req.kind == ConvKind::Direct)
        .then(|| ids.iter().map(i64::to_string).collect::<Vec<_>>().join(":"));
    if let Some(id) = existing(tx, req.kind, direct_key.as_deref(), user, &req.key).await? {
        return earlier(tx, actor, id).await;
    }
    if ids.len() > max_group_size {
        return Err(StoreError::refused(
            ErrorCode::GroupTooLarge,
            format!("a group has at most {max_group_size} members"),
        )
        .into());
    }
    let members: Vec<UserId> = ids.iter().copied().collect();
    let locked = lock_heads(tx, &members).await?;
    let now = entry_time(tx, ctx, &locked, 0).await?;
    // A concurrent identical create that committed meanwhile wins; this
    // one then answers with its conversation.
    let Some(row) = opt(
        tx,
        "INSERT INTO convs (kind, name, created_by, create_key, direct_key, created_at)
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING RETURNING id",
        &[
            &kind_str(req.kind),
            &req.name,
            &user,
            &req.key,
            &direct_key,
            &now,
        ],
    )
    .await?
    else {
        return match existing(tx, req.kind, direct_key.as_deref(), user, &req.key).await? {
            Some(id) => earlier(tx, actor, id).await,
            None => Err(StoreError::commit("a conflicting conversation vanished; retry").into()),
        };
    };
    let conv: i64 = row.get(0);
    exec(
        tx,
        "INSERT INTO members (conv_id, user_id, joined_at) SELECT $1, u, $3 FROM unnest($2::bigint[]) AS t(u)",
        &[&conv, &members, &now],
    )
    .await?;
    let info = conv_info(tx, conv as u64)
        .await?
        .ok_or_else(|| StoreError::commit("conversation vanished"))?;
    let by = user_name(tx, user).await?;
    // Each member learns of the conversation through its own inbox.
    for &id in &members {
        let event = MemberEvent {
            conv: info.clone(),
            user: user_name(tx, id).await?,
            change: MemberChange::Added,
            by: by.clone(),
            ts: now,
        };
        membership_entries(tx, &[id], &event, ctx.retention.max_entries, heads).await?;
    }
    Ok((info, true))
}

/// Adds or removes `target` (idempotent).
#[allow(
    clippy::too_many_arguments,
    reason = "the trait method's arguments plus the transaction, the entries and the context"
)]
pub(super) async fn change_member(
    tx: &Tx<'_>,
    heads: &mut Heads,
    ctx: &Ctx,
    actor: Actor,
    conv: ConvId,
    target: &str,
    add: bool,
    max_group_size: usize,
) -> Result<(ConvInfo, bool), PgError> {
    // The conversation's row first (as sends lock it): membership changes
    // and sends to one conversation are serialised.
    let row = opt(
        tx,
        "SELECT last_ts, created_by FROM convs WHERE id = $1 FOR NO KEY UPDATE",
        &[&(conv.min(i64::MAX as u64) as i64)],
    )
    .await?;
    require_actor(tx, conv, actor).await?;
    let Some(row) = row else {
        return Err(StoreError::refused(
            ErrorCode::NoSuchConv,
            format!("conversation {conv} does not exist"),
        )
        .into());
    };
    let (conv_ts, creator): (i64, i64) = (row.get(0), row.get(1));
    let user = actor_id(tx, actor, ctx.now_ms()).await?;
    let info = conv_info(tx, conv).await?.ok_or_else(|| {
        StoreError::refused(
            ErrorCode::NoSuchConv,
            format!("conversation {conv} does not exist"),
        )
    })?;
    if info.kind == ConvKind::Direct {
        return Err(StoreError::refused(
            ErrorCode::Forbidden,
            "the members of a direct conversation cannot change",
        )
        .into());
    }
    let target_id = user_id_by_name(tx, target).await?.ok_or_else(|| {
        StoreError::refused(ErrorCode::UnknownUser, format!("no user named {target:?}"))
    })?;
    let present = is_member(tx, conv, target_id).await?;
    if present == add {
        return Ok((info, false));
    }
    let mut recipients = member_ids(tx, conv).await?;
    if add {
        if info.members.len() >= max_group_size {
            return Err(StoreError::refused(
                ErrorCode::GroupTooLarge,
                format!("a group has at most {max_group_size} members"),
            )
            .into());
        }
        recipients.push(target_id);
        recipients.sort_unstable();
    } else if actor != Actor::System && target_id != user && user != creator {
        return Err(StoreError::refused(
            ErrorCode::Forbidden,
            "only the creator can remove other members",
        )
        .into());
    }
    // The removed user learns of it too (it is still in `recipients`).
    let locked = lock_heads(tx, &recipients).await?;
    let now = entry_time(tx, ctx, &locked, conv_ts).await?;
    if add {
        exec(
            tx,
            "INSERT INTO members (conv_id, user_id, joined_at) VALUES ($1, $2, $3)",
            &[&(conv as i64), &target_id, &now],
        )
        .await?;
    } else {
        exec(
            tx,
            "DELETE FROM members WHERE conv_id = $1 AND user_id = $2",
            &[&(conv as i64), &target_id],
        )
        .await?;
    }
    let info = conv_info(tx, conv)
        .await?
        .ok_or_else(|| StoreError::commit("conversation vanished"))?;
    let event = MemberEvent {
        conv: info.clone(),
        user: target.to_owned(),
        change: if add {
            MemberChange::Added
        } else {
            MemberChange::Removed
        },
        by: user_name(tx, user).await?,
        ts: now,
    };
    membership_entries(tx, &recipients, &event, ctx.retention.max_entries, heads).await?;
    Ok((info, true))
}

/// The conversations `user` belongs to.
pub(super) async fn list(tx: &Tx<'_>, user: UserId) -> Result<Vec<ConvInfo>, PgError> {
    let ids: Vec<i64> = all(
        tx,
        "SELECT conv_id FROM members WHERE user_id = $1 ORDER BY conv_id",
        &[&user],
    )
    .await?
    .iter()
    .map(|r| r.get(0))
    .collect();
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        if let Some(info) = conv_info(tx, id as u64).await? {
            out.push(info);
        }
    }
    Ok(out)
}

/// The conversations `user` belongs to, by id.
async fn user_convs(tx: &Tx<'_>, user: UserId) -> Result<Vec<i64>, PgError> {
    Ok(all(
        tx,
        "SELECT conv_id FROM members WHERE user_id = $1 ORDER BY conv_id",
        &[&user],
    )
    .await?
    .iter()
    .map(|r| r.get(0))
    .collect())
}

/// Deletes a user (see [`AdminStore::delete_user`](crate::store::AdminStore::delete_user)).
/// Locks as every writer does, conversation rows before inbox heads, each
/// in id order.
pub(super) async fn delete_user(
    tx: &Tx<'_>,
    heads: &mut Heads,
    ctx: &Ctx,
    name: &str,
) -> Result<DeletedUser, PgError> {
    let no_user = || PgError::from(StoreError::NotFound(format!("no user named {name:?}")));
    if !keepwire_proto::is_valid_user_name(name) {
        return Err(no_user());
    }
    let user = user_id_by_name(tx, name).await?.ok_or_else(no_user)?;
    let convs = user_convs(tx, user).await?;
    let rows = all(
        tx,
        "SELECT last_ts FROM convs WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE",
        &[&convs],
    )
    .await?;
    let conv_ts = rows.iter().map(|r| r.get::<_, i64>(0)).max().unwrap_or(0);
    let mut recipients = BTreeSet::from([user]);
    for &conv in &convs {
        recipients.extend(member_ids(tx, conv as u64).await?);
    }
    let recipients: Vec<UserId> = recipients.into_iter().collect();
    let locked = lock_heads(tx, &recipients).await?;
    // With the user's head locked no membership of theirs can change: look
    // again, in case one did before (or the user was deleted meanwhile).
    if user_id_by_name(tx, name).await? != Some(user) || user_convs(tx, user).await? != convs {
        return Err(StoreError::commit("the user changed while being deleted; retry").into());
    }
    let system = actor_id(tx, Actor::System, ctx.now_ms()).await?;
    let by = user_name(tx, system).await?;
    let now = entry_time(tx, ctx, &locked, conv_ts).await?;
    for &conv in &convs {
        exec(
            tx,
            "DELETE FROM members WHERE conv_id = $1 AND user_id = $2",
            &[&conv, &user],
        )
        .await?;
        let Some(info) = conv_info(tx, conv as u64).await? else {
            continue;
        };
        // The others learn of it; the deleted user's inbox is going.
        let event = MemberEvent {
            conv: info,
            user: name.to_owned(),
            change: MemberChange::Removed,
            by: by.clone(),
            ts: now,
        };
        let rest = member_ids(tx, conv as u64).await?;
        membership_entries(tx, &rest, &event, ctx.retention.max_entries, heads).await?;
    }
    let devices = exec(tx, "DELETE FROM devices WHERE user_id = $1", &[&user]).await?;
    for table in [
        "inbox",
        "device_tokens",
        "tokens",
        "push_registrations",
        "mutes",
        "reads",
        "sends",
    ] {
        exec(
            tx,
            &format!("DELETE FROM {table} WHERE user_id = $1"),
            &[&user],
        )
        .await?;
    }
    // The row stays as a tombstone: its id is not reused (messages and
    // direct conversations refer to it) and the name is free.
    let now_ms = ctx.now_ms();
    exec(
        tx,
        "UPDATE users SET name = $2, tokens_revoked_at = $3, inbox_floor = inbox_head + 1
         WHERE id = $1",
        &[&user, &deleted_user_name(user), &now_ms],
    )
    .await?;
    exec(
        tx,
        "INSERT INTO revocations (user_id, token_id, at) VALUES ($1, NULL, $2)",
        &[&user, &now_ms],
    )
    .await?;
    Ok(DeletedUser {
        id: user,
        user: name.to_owned(),
        conversations: convs.len() as u64,
        devices,
    })
}
