//! Queries shared by several operations.

use rusqlite::{Connection, OptionalExtension, params};

use keepwire_proto::{ConvId, ConvInfo, ConvKind, ErrorCode, Message};

use crate::store::{Actor, SYSTEM_USER, StoreError, UserId};

pub(super) fn user_id_by_name(conn: &Connection, name: &str) -> Result<Option<UserId>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT id FROM users WHERE name = ?1")?
        .query_row([name], |r| r.get(0))
        .optional()?)
}

pub(super) fn user_name(conn: &Connection, id: UserId) -> Result<String, StoreError> {
    Ok(conn
        .prepare_cached("SELECT name FROM users WHERE id = ?1")?
        .query_row([id], |r| r.get(0))?)
}

pub(super) fn is_member(conn: &Connection, conv: ConvId, user: UserId) -> Result<bool, StoreError> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM members WHERE conv_id = ?1 AND user_id = ?2")?
        .query_row(params![conv as i64, user], |_| Ok(()))
        .optional()?
        .is_some())
}

/// The system user's id, created on first use.
pub(super) fn system_user(conn: &Connection, now_ms: i64) -> Result<UserId, StoreError> {
    conn.prepare_cached("INSERT OR IGNORE INTO users (name, created_at) VALUES (?1, ?2)")?
        .execute(params![SYSTEM_USER, now_ms])?;
    user_id_by_name(conn, SYSTEM_USER)?
        .ok_or_else(|| StoreError::commit("the system user vanished"))
}

/// Refuses unless the actor may act in `conv` (the system may, if it exists).
pub(super) fn require_actor(
    conn: &Connection,
    conv: ConvId,
    actor: Actor,
) -> Result<(), StoreError> {
    match actor {
        Actor::User(u) => require_member(conn, conv, u),
        Actor::System => {
            let exists = conn
                .prepare_cached("SELECT 1 FROM convs WHERE id = ?1")?
                .query_row([conv as i64], |_| Ok(()))
                .optional()?
                .is_some();
            if exists {
                Ok(())
            } else {
                Err(StoreError::refused(
                    ErrorCode::NoSuchConv,
                    format!("conversation {conv} does not exist"),
                ))
            }
        }
    }
}

/// The acting user's id (the system user for the system).
pub(super) fn actor_id(conn: &Connection, actor: Actor, now_ms: i64) -> Result<UserId, StoreError> {
    match actor {
        Actor::User(u) => Ok(u),
        Actor::System => system_user(conn, now_ms),
    }
}

/// Refuses unless `user` is a member of `conv`.
pub(super) fn require_member(
    conn: &Connection,
    conv: ConvId,
    user: UserId,
) -> Result<(), StoreError> {
    if is_member(conn, conv, user)? {
        return Ok(());
    }
    let exists = conn
        .prepare_cached("SELECT 1 FROM convs WHERE id = ?1")?
        .query_row([conv as i64], |_| Ok(()))
        .optional()?
        .is_some();
    Err(if exists {
        StoreError::refused(
            ErrorCode::NotMember,
            format!("you are not a member of conversation {conv}"),
        )
    } else {
        StoreError::refused(
            ErrorCode::NoSuchConv,
            format!("conversation {conv} does not exist"),
        )
    })
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

pub(super) fn conv_info(conn: &Connection, conv: ConvId) -> Result<Option<ConvInfo>, StoreError> {
    let head = conn
        .prepare_cached("SELECT kind, name, last_seq FROM convs WHERE id = ?1")?
        .query_row([conv as i64], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Option<String>>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })
        .optional()?;
    let Some((kind, name, last_seq)) = head else {
        return Ok(None);
    };
    let mut stmt = conn.prepare_cached(
        "SELECT u.name FROM members m JOIN users u ON u.id = m.user_id
         WHERE m.conv_id = ?1 ORDER BY u.name",
    )?;
    let members = stmt
        .query_map([conv as i64], |r| r.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(ConvInfo {
        id: conv,
        kind: parse_kind(&kind),
        name,
        members,
        last_seq: last_seq as u64,
    }))
}

pub(super) fn member_ids(conn: &Connection, conv: ConvId) -> Result<Vec<UserId>, StoreError> {
    let mut stmt = conn.prepare_cached("SELECT user_id FROM members WHERE conv_id = ?1")?;
    let ids = stmt
        .query_map([conv as i64], |r| r.get(0))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ids)
}

pub(super) const MESSAGE_COLUMNS: &str = "m.id, m.conv_id, m.conv_seq, (SELECT name FROM users WHERE id = m.sender_id), m.cid, m.kind, m.body, m.ts";

pub(super) fn message_from_row(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<Message> {
    Ok(Message {
        id: r.get::<_, i64>(at)? as u64,
        conv: r.get::<_, i64>(at + 1)? as u64,
        conv_seq: r.get::<_, i64>(at + 2)? as u64,
        from: r.get::<_, Option<String>>(at + 3)?.unwrap_or_default(),
        cid: r.get(at + 4)?,
        kind: r.get(at + 5)?,
        body: r.get(at + 6)?,
        ts: r.get(at + 7)?,
    })
}
