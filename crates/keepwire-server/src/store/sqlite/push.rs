//! Push registrations, their state, and mutes.

use base64::Engine as _;
use keepwire_proto::{ConvId, EntryItem, MuteMark, Seq};
use rand::RngCore as _;
use rusqlite::{Connection, OptionalExtension, params};

use super::Ctx;
use super::inbox::append_event;
use super::queries::require_member;
use super::writer::Heads;
use crate::store::{NewPush, PushOutcome, PushTarget, StoreError, UserId};

/// Registrations not refreshed for this long are dropped (clients refresh at
/// least monthly).
pub(super) const STALE_AFTER_MS: i64 = 60 * 24 * 3600 * 1000;

fn new_reg_id() -> String {
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    format!(
        "r_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    )
}

pub(super) fn set(
    c: &Connection,
    ctx: &Ctx,
    user: UserId,
    device: &str,
    push: Option<NewPush>,
) -> Result<Option<String>, StoreError> {
    let Some(p) = push else {
        c.prepare_cached("DELETE FROM push_registrations WHERE user_id = ?1 AND device = ?2")?
            .execute(params![user, device])?;
        return Ok(None);
    };
    let now = ctx.clock.now_ms();
    // The same registration again (a refresh) keeps its id; one held by
    // another device moves here.
    let same: Option<String> = c
        .prepare_cached(
            "SELECT reg_id FROM push_registrations WHERE user_id = ?1 AND device = ?2 AND key = ?3",
        )?
        .query_row(params![user, device, p.key], |r| r.get(0))
        .optional()?;
    if let Some(id) = same {
        c.prepare_cached(
            "UPDATE push_registrations SET registration = ?3, previews = ?4, refreshed_at = ?5
             WHERE user_id = ?1 AND device = ?2",
        )?
        .execute(params![user, device, p.registration, p.previews, now])?;
        return Ok(Some(id));
    }
    c.prepare_cached(
        "DELETE FROM push_registrations WHERE key = ?1 OR (user_id = ?2 AND device = ?3)",
    )?
    .execute(params![p.key, user, device])?;
    let id = new_reg_id();
    c.prepare_cached(
        "INSERT INTO push_registrations
         (user_id, device, reg_id, key, provider, registration, previews, created_at, refreshed_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8)",
    )?
    .execute(params![
        user,
        device,
        id,
        p.key,
        p.provider,
        p.registration,
        p.previews,
        now
    ])?;
    Ok(Some(id))
}

pub(super) fn mute(
    c: &Connection,
    heads: &mut Heads,
    ctx: &Ctx,
    user: UserId,
    conv: ConvId,
    muted: bool,
) -> Result<bool, StoreError> {
    require_member(c, conv, user)?;
    let changed = if muted {
        c.prepare_cached("INSERT OR IGNORE INTO mutes (user_id, conv_id) VALUES (?1, ?2)")?
            .execute(params![user, conv as i64])?
    } else {
        c.prepare_cached("DELETE FROM mutes WHERE user_id = ?1 AND conv_id = ?2")?
            .execute(params![user, conv as i64])?
    } > 0;
    if changed {
        let ts = ctx.clock.log_ts();
        let json = serde_json::to_string(&EntryItem::Mute(MuteMark { conv, muted, ts }))
            .map_err(|e| StoreError::commit(format!("encoding a mute marker: {e}")))?;
        append_event(c, user, &json, ts, ctx.retention.max_entries, heads, None)?;
    }
    Ok(changed)
}

pub(super) fn targets(c: &Connection, user: UserId) -> Result<Vec<PushTarget>, StoreError> {
    let mut stmt = c.prepare_cached(
        "SELECT p.device, p.reg_id, p.registration, p.previews, COALESCE(d.acked_seq, 0),
                p.pushed_seq, p.delivered_seq, p.pushed_at, p.attempts
         FROM push_registrations p
         LEFT JOIN devices d ON d.user_id = p.user_id AND d.device = p.device
         WHERE p.user_id = ?1 ORDER BY p.device",
    )?;
    let mut targets = stmt
        .query_map([user], |r| {
            Ok(PushTarget {
                device: r.get(0)?,
                reg_id: r.get(1)?,
                registration: r.get(2)?,
                previews: r.get(3)?,
                acked_seq: r.get::<_, i64>(4)? as Seq,
                pushed_seq: r.get::<_, i64>(5)? as Seq,
                delivered_seq: r.get::<_, i64>(6)? as Seq,
                pushed_at_ms: r.get(7)?,
                attempts: r.get(8)?,
                wake_seq: None,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    // The newest entry after the device's position that wakes it: a message
    // from another user, in a conversation not muted.
    let mut wake = c.prepare_cached(
        "SELECT MAX(i.seq) FROM inbox i JOIN messages m ON m.id = i.message_id
         WHERE i.user_id = ?1 AND i.seq > ?2 AND m.sender_id != ?1
           AND m.conv_id NOT IN (SELECT conv_id FROM mutes WHERE user_id = ?1)",
    )?;
    for t in &mut targets {
        t.wake_seq = wake
            .query_row(params![user, t.acked_seq as i64], |r| {
                r.get::<_, Option<i64>>(0)
            })?
            .map(|s| s as Seq);
    }
    Ok(targets)
}

pub(super) fn record(c: &Connection, ctx: &Ctx, reg_id: &str, seq: Seq) -> Result<(), StoreError> {
    c.prepare_cached(
        "UPDATE push_registrations
         SET attempts = CASE WHEN pushed_seq = ?2 THEN attempts + 1 ELSE 1 END,
             pushed_seq = ?2, pushed_at = ?3
         WHERE reg_id = ?1",
    )?
    .execute(params![reg_id, seq as i64, ctx.clock.now_ms()])?;
    Ok(())
}

pub(super) fn outcome(
    c: &Connection,
    ctx: &Ctx,
    reg_id: &str,
    outcome: PushOutcome,
) -> Result<(), StoreError> {
    let now = ctx.clock.now_ms();
    match outcome {
        PushOutcome::Delivered(seq) => c
            .prepare_cached(
                "UPDATE push_registrations SET delivered_seq = MAX(delivered_seq, ?2),
                 last_success = ?3, last_error = NULL WHERE reg_id = ?1",
            )?
            .execute(params![reg_id, seq as i64, now])?,
        PushOutcome::Failed(why) => c
            .prepare_cached("UPDATE push_registrations SET last_error = ?2 WHERE reg_id = ?1")?
            .execute(params![reg_id, why])?,
        PushOutcome::Unregistered(_) => c
            .prepare_cached("DELETE FROM push_registrations WHERE reg_id = ?1")?
            .execute([reg_id])?,
    };
    Ok(())
}
