//! Push registrations, their state, and mutes.

use base64::Engine as _;
use keepwire_proto::{ConvId, EntryItem, MuteMark, Seq};
use rand::RngCore as _;

use super::inbox::{append_event, entry_time, lock_heads};
use super::queries::{all, exec, opt, require_member};
use super::{Ctx, Heads, PgError, Tx};
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

pub(super) async fn set(
    tx: &Tx<'_>,
    ctx: &Ctx,
    user: UserId,
    device: &str,
    push: Option<NewPush>,
) -> Result<Option<String>, PgError> {
    let Some(p) = push else {
        exec(
            tx,
            "DELETE FROM push_registrations WHERE user_id = $1 AND device = $2",
            &[&user, &device],
        )
        .await?;
        return Ok(None);
    };
    let now = ctx.now_ms();
    // The same registration again (a refresh) keeps its id; one held by
    // another device moves here.
    let same = opt(
        tx,
        "SELECT reg_id FROM push_registrations WHERE user_id = $1 AND device = $2 AND key = $3",
        &[&user, &device, &p.key],
    )
    .await?;
    if let Some(row) = same {
        exec(
            tx,
            "UPDATE push_registrations SET registration = $3, previews = $4, refreshed_at = $5
             WHERE user_id = $1 AND device = $2",
            &[&user, &device, &p.registration, &p.previews, &now],
        )
        .await?;
        return Ok(Some(row.get(0)));
    }
    exec(
        tx,
        "DELETE FROM push_registrations WHERE key = $1 OR (user_id = $2 AND device = $3)",
        &[&p.key, &user, &device],
    )
    .await?;
    let id = new_reg_id();
    exec(
        tx,
        "INSERT INTO push_registrations
         (user_id, device, reg_id, key, provider, registration, previews, created_at, refreshed_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)",
        &[
            &user,
            &device,
            &id,
            &p.key,
            &p.provider,
            &p.registration,
            &p.previews,
            &now,
        ],
    )
    .await?;
    Ok(Some(id))
}

pub(super) async fn mute(
    tx: &Tx<'_>,
    heads: &mut Heads,
    ctx: &Ctx,
    user: UserId,
    conv: ConvId,
    muted: bool,
) -> Result<bool, PgError> {
    require_member(tx, conv, user).await?;
    let changed = if muted {
        exec(
            tx,
            "INSERT INTO mutes (user_id, conv_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&user, &(conv as i64)],
        )
        .await?
    } else {
        exec(
            tx,
            "DELETE FROM mutes WHERE user_id = $1 AND conv_id = $2",
            &[&user, &(conv as i64)],
        )
        .await?
    } > 0;
    if changed {
        let locked = lock_heads(tx, &[user]).await?;
        let ts = entry_time(tx, ctx, &locked, 0).await?;
        let json = serde_json::to_string(&EntryItem::Mute(MuteMark { conv, muted, ts }))
            .map_err(|e| StoreError::commit(format!("encoding a mute marker: {e}")))?;
        append_event(tx, user, &json, ts, ctx.retention.max_entries, heads, None).await?;
    }
    Ok(changed)
}

pub(super) async fn targets(tx: &Tx<'_>, user: UserId) -> Result<Vec<PushTarget>, PgError> {
    let rows = all(
        tx,
        "SELECT p.device, p.reg_id, p.registration, p.previews, COALESCE(d.acked_seq, 0),
                p.pushed_seq, p.delivered_seq, p.pushed_at, p.attempts
         FROM push_registrations p
         LEFT JOIN devices d ON d.user_id = p.user_id AND d.device = p.device
         WHERE p.user_id = $1 ORDER BY p.device COLLATE \"C\"",
        &[&user],
    )
    .await?;
    let mut targets = Vec::with_capacity(rows.len());
    for r in &rows {
        let acked: i64 = r.get(4);
        // The newest entry after the device's position that wakes it: a
        // message from another user, in a conversation not muted.
        let wake: Option<i64> = opt(
            tx,
            "SELECT MAX(i.seq) FROM inbox i JOIN messages m ON m.id = i.message_id
             WHERE i.user_id = $1 AND i.seq > $2 AND m.sender_id != $1
               AND m.conv_id NOT IN (SELECT conv_id FROM mutes WHERE user_id = $1)",
            &[&user, &acked],
        )
        .await?
        .and_then(|r| r.get(0));
        targets.push(PushTarget {
            device: r.get(0),
            reg_id: r.get(1),
            registration: r.get(2),
            previews: r.get(3),
            acked_seq: acked as Seq,
            pushed_seq: r.get::<_, i64>(5) as Seq,
            delivered_seq: r.get::<_, i64>(6) as Seq,
            pushed_at_ms: r.get(7),
            attempts: r.get::<_, i32>(8).max(0) as u32,
            wake_seq: wake.map(|s| s as Seq),
        });
    }
    Ok(targets)
}

pub(super) async fn record(tx: &Tx<'_>, ctx: &Ctx, reg_id: &str, seq: Seq) -> Result<(), PgError> {
    exec(
        tx,
        "UPDATE push_registrations
         SET attempts = CASE WHEN pushed_seq = $2 THEN attempts + 1 ELSE 1 END,
             pushed_seq = $2, pushed_at = $3
         WHERE reg_id = $1",
        &[&reg_id, &(seq.min(i64::MAX as u64) as i64), &ctx.now_ms()],
    )
    .await?;
    Ok(())
}

pub(super) async fn outcome(
    tx: &Tx<'_>,
    ctx: &Ctx,
    reg_id: &str,
    outcome: PushOutcome,
) -> Result<(), PgError> {
    let now = ctx.now_ms();
    match outcome {
        PushOutcome::Delivered(seq) => {
            exec(
                tx,
                "UPDATE push_registrations SET delivered_seq = GREATEST(delivered_seq, $2),
                 last_success = $3, last_error = NULL WHERE reg_id = $1",
                &[&reg_id, &(seq.min(i64::MAX as u64) as i64), &now],
            )
            .await?
        }
        PushOutcome::Failed(why) => {
            exec(
                tx,
                "UPDATE push_registrations SET last_error = $2 WHERE reg_id = $1",
                &[&reg_id, &why],
            )
            .await?
        }
        PushOutcome::Unregistered(_) => {
            exec(
                tx,
                "DELETE FROM push_registrations WHERE reg_id = $1",
                &[&reg_id],
            )
            .await?
        }
    };
    Ok(())
}
