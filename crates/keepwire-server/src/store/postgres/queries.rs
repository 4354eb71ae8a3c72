//! Statement helpers (each statement prepared once per connection) and
//! queries shared by several operations.

use keepwire_proto::{ConvId, ConvInfo, ConvKind, ErrorCode, Message};
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::{PgError, Tx};
use crate::store::{Actor, SYSTEM_USER, StoreError, UserId};

/// Statement parameters.
pub(super) type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// Every row of `sql`.
pub(super) async fn all(tx: &Tx<'_>, sql: &str, p: Params<'_>) -> Result<Vec<Row>, PgError> {
    Ok(tx.query(&tx.prepare_cached(sql).await?, p).await?)
}

/// The one row of `sql`.
pub(super) async fn one(tx: &Tx<'_>, sql: &str, p: Params<'_>) -> Result<Row, PgError> {
    Ok(tx.query_one(&tx.prepare_cached(sql).await?, p).await?)
}

/// The row of `sql`, if any.
pub(super) async fn opt(tx: &Tx<'_>, sql: &str, p: Params<'_>) -> Result<Option<Row>, PgError> {
    Ok(tx.query_opt(&tx.prepare_cached(sql).await?, p).await?)
}

/// Runs `sql`; returns the rows it changed.
pub(super) async fn exec(tx: &Tx<'_>, sql: &str, p: Params<'_>) -> Result<u64, PgError> {
    Ok(tx.execute(&tx.prepare_cached(sql).await?, p).await?)
}

pub(super) async fn user_id_by_name(tx: &Tx<'_>, name: &str) -> Result<Option<UserId>, PgError> {
    Ok(opt(tx, "SELECT id FROM users WHERE name = $1", &[&name])
        .await?
        .map(|r| r.get(0)))
}

pub(super) async fn user_name(tx: &Tx<'_>, id: UserId) -> Result<String, PgError> {
    Ok(one(tx, "SELECT name FROM users WHERE id = $1", &[&id])
        .await?
        .get(0))
}

pub(super) async fn is_member(tx: &Tx<'_>, conv: ConvId, user: UserId) -> Result<bool, PgError> {
    Ok(opt(
        tx,
        "SELECT 1 FROM members WHERE conv_id = $1 AND user_id = $2",
        &[&(conv as i64), &user],
    )
    .await?
    .is_some())
}

async fn conv_exists(tx: &Tx<'_>, conv: ConvId) -> Result<bool, PgError> {
    Ok(
        opt(tx, "SELECT 1 FROM convs WHERE id = $1", &[&(conv as i64)])
            .await?
            .is_some(),
    )
}

/// The system user's id, created on first use.
pub(super) async fn system_user(tx: &Tx<'_>, now_ms: i64) -> Result<UserId, PgError> {
    exec(
        tx,
        "INSERT INTO users (name, created_at) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        &[&SYSTEM_USER, &now_ms],
    )
    .await?;
    user_id_by_name(tx, SYSTEM_USER)
        .await?
        .ok_or_else(|| StoreError::commit("the system user vanished").into())
}

fn no_such_conv(conv: ConvId) -> PgError {
    StoreError::refused(
        ErrorCode::NoSuchConv,
        format!("conversation {conv} does not exist"),
    )
    .into()
}

/// Refuses unless the actor may act in `conv` (the system may, if it exists).
pub(super) async fn require_actor(tx: &Tx<'_>, conv: ConvId, actor: Actor) -> Result<(), PgError> {
    match actor {
        Actor::User(u) => require_member(tx, conv, u).await,
        Actor::System if conv_exists(tx, conv).await? => Ok(()),
        Actor::System => Err(no_such_conv(conv)),
    }
}

/// The acting user's id (the system user for the system).
pub(super) async fn actor_id(tx: &Tx<'_>, actor: Actor, now_ms: i64) -> Result<UserId, PgError> {
    match actor {
        Actor::User(u) => Ok(u),
        Actor::System => system_user(tx, now_ms).await,
    }
}

/// Refuses unless `user` is a member of `conv`.
pub(super) async fn require_member(tx: &Tx<'_>, conv: ConvId, user: UserId) -> Result<(), PgError> {
    if is_member(tx, conv, user).await? {
        return Ok(());
    }
    if conv_exists(tx, conv).await? {
        Err(StoreError::refused(
            ErrorCode::NotMember,
            format!("you are not a member of conversation {conv}"),
        )
        .into())
    } else {
        Err(no_such_conv(conv))
    }
}

pub(super) fn parse_kind(s: &str) -> ConvKind {
    if s == "direct" {
        ConvKind::Direct
    } else {
        ConvKind::Group
    }
}

pub(super) fn kind_str(k: ConvKind) -> &'static str {
    match k {
        ConvKind::Direct => "direct",
        ConvKind::Group => "group",
    }
}

pub(super) async fn conv_info(tx: &Tx<'_>, conv: ConvId) -> Result<Option<ConvInfo>, PgError> {
    let Some(head) = opt(
        tx,
        "SELECT kind, name, last_seq FROM convs WHERE id = $1",
        &[&(conv as i64)],
    )
    .await?
    else {
        return Ok(None);
    };
    let members = all(
        tx,
        "SELECT u.name FROM members m JOIN users u ON u.id = m.user_id
         WHERE m.conv_id = $1 ORDER BY u.name COLLATE \"C\"",
        &[&(conv as i64)],
    )
    .await?
    .iter()
    .map(|r| r.get(0))
    .collect();
    Ok(Some(ConvInfo {
        id: conv,
        kind: parse_kind(head.get(0)),
        name: head.get(1),
        members,
        last_seq: head.get::<_, i64>(2) as u64,
    }))
}

pub(super) async fn member_ids(tx: &Tx<'_>, conv: ConvId) -> Result<Vec<UserId>, PgError> {
    Ok(all(
        tx,
        "SELECT user_id FROM members WHERE conv_id = $1 ORDER BY user_id",
        &[&(conv as i64)],
    )
    .await?
    .iter()
    .map(|r| r.get(0))
    .collect())
}

/// A message's columns, for [`message_from_row`].
pub(super) const MESSAGE_COLUMNS: &str = "m.id, m.conv_id, m.conv_seq, (SELECT name FROM users WHERE id = m.sender_id), m.cid, m.kind, m.body, m.ts";

/// The message whose [`MESSAGE_COLUMNS`] start at column `at`, if the row has one.
pub(super) fn message_from_row(r: &Row, at: usize) -> Option<Message> {
    let id: Option<i64> = r.get(at);
    Some(Message {
        id: id? as u64,
        conv: r.get::<_, i64>(at + 1) as u64,
        conv_seq: r.get::<_, i64>(at + 2) as u64,
        from: r.get::<_, Option<String>>(at + 3).unwrap_or_default(),
        cid: r.get(at + 4),
        kind: r.get(at + 5),
        body: r.get(at + 6),
        ts: r.get(at + 7),
    })
}
