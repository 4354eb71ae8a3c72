//! [`AdminStore`] for [`PostgresStore`]: users, devices, tokens, API keys,
//! retention (the age trim in many small transactions).

use std::time::Duration;

use base64::Engine as _;
use keepwire_proto::{ConvId, ErrorCode, is_valid_user_name};
use rand::RngCore as _;

use super::inbox::{TRIM_CHUNK, trim_user};
use super::queries::{all, exec, one, opt, user_id_by_name};
use super::{PgError, PostgresStore, Tx, hash_token, push};
use crate::store::{
    AdminStore, ApiKeyInfo, DeletedUser, DeviceInfo, DevicePosition, DevicePush, IssuedToken,
    Positions, RevokeTarget, StoreError, TokenInfo, TrimReport, UserId,
};

/// Users looked at per page of the age trim.
const TRIM_USERS_PAGE: i64 = 500;

fn new_secret(prefix: &str) -> String {
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    )
}

async fn require_user(tx: &Tx<'_>, name: &str) -> Result<UserId, PgError> {
    user_id_by_name(tx, name)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("no user named {name:?}")).into())
}

/// Deletes up to [`TRIM_CHUNK`] rows of `table` older than `cutoff`.
async fn delete_old(tx: &Tx<'_>, table: &str, cutoff: i64) -> Result<u64, PgError> {
    exec(
        tx,
        &format!(
            "DELETE FROM {table} WHERE ctid IN (SELECT ctid FROM {table} WHERE ts < $1 LIMIT {TRIM_CHUNK})"
        ),
        &[&cutoff],
    )
    .await
}

#[async_trait::async_trait]
impl AdminStore for PostgresStore {
    async fn create_user(&self, name: &str) -> Result<UserId, StoreError> {
        if !is_valid_user_name(name) {
            return Err(StoreError::refused(
                ErrorCode::Invalid,
                format!(
                    "{name:?} is not a valid user name: use 1-64 characters of [A-Za-z0-9_.@-]"
                ),
            ));
        }
        let name = name.to_owned();
        let ctx = self.ctx.clone();
        self.write(move |tx, _| {
            let (name, now) = (name.clone(), ctx.now_ms());
            Box::pin(async move {
                let row = opt(
                    tx,
                    "INSERT INTO users (name, created_at) VALUES ($1, $2)
                     ON CONFLICT (name) DO NOTHING RETURNING id",
                    &[&name, &now],
                )
                .await?;
                match row {
                    Some(r) => Ok(r.get(0)),
                    None => {
                        Err(StoreError::Conflict(format!("user {name:?} already exists")).into())
                    }
                }
            })
        })
        .await
    }

    async fn user_id(&self, name: &str) -> Result<Option<UserId>, StoreError> {
        let name = name.to_owned();
        self.read(move |tx| {
            let name = name.clone();
            Box::pin(async move { user_id_by_name(tx, &name).await })
        })
        .await
    }

    async fn list_users(&self) -> Result<Vec<String>, StoreError> {
        self.read(|tx| {
            Box::pin(async move {
                let rows = tx
                    // `~` names are the system user and deleted users' tombstones.
                    .query(
                        "SELECT name FROM users WHERE name NOT LIKE '~%' ORDER BY name",
                        &[],
                    )
                    .await?;
                Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect())
            })
        })
        .await
    }

    async fn delete_user(&self, name: &str) -> Result<DeletedUser, StoreError> {
        let name = name.to_owned();
        let ctx = self.ctx.clone();
        self.write(move |tx, heads| {
            let (ctx, name) = (ctx.clone(), name.clone());
            Box::pin(async move { super::conversations::delete_user(tx, heads, &ctx, &name).await })
        })
        .await
    }

    async fn revoke_device(&self, user: &str, device: &str) -> Result<bool, StoreError> {
        let (name, device) = (user.to_owned(), device.to_owned());
        let ctx = self.ctx.clone();
        self.write(move |tx, _| {
            let (name, device, now) = (name.clone(), device.clone(), ctx.now_ms());
            Box::pin(async move {
                let user = require_user(tx, &name).await?;
                // Revoking a device that never connected still bars it.
                let n = exec(
                    tx,
                    "INSERT INTO devices (user_id, device, first_seen, last_seen, revoked_at)
                     VALUES ($1, $2, $3, $3, $3)
                     ON CONFLICT (user_id, device) DO UPDATE SET revoked_at = EXCLUDED.revoked_at
                     WHERE devices.revoked_at IS NULL",
                    &[&user, &device, &now],
                )
                .await?;
                if n > 0 {
                    exec(
                        tx,
                        "INSERT INTO revocations (user_id, token_id, device, at) VALUES ($1, NULL, $2, $3)",
                        &[&user, &device, &now],
                    )
                    .await?;
                    exec(
                        tx,
                        "DELETE FROM push_registrations WHERE user_id = $1 AND device = $2",
                        &[&user, &device],
                    )
                    .await?;
                    // The tokens it connected with are revoked too: each gets
                    // a log entry, so connections using them elsewhere close.
                    let tokens: Vec<i64> = all(
                        tx,
                        "UPDATE tokens t SET revoked_at = $3 FROM device_tokens d
                         WHERE d.user_id = $1 AND d.device = $2 AND t.id = d.token_id
                           AND t.revoked_at IS NULL
                         RETURNING t.id",
                        &[&user, &device, &now],
                    )
                    .await?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                    for t in tokens {
                        exec(
                            tx,
                            "INSERT INTO revocations (user_id, token_id, at) VALUES ($1, $2, $3)",
                            &[&user, &t, &now],
                        )
                        .await?;
                    }
                }
                Ok(n > 0)
            })
        })
        .await
    }

    async fn list_devices(&self, user: &str) -> Result<Vec<DeviceInfo>, StoreError> {
        let name = user.to_owned();
        self.read(move |tx| {
            let name = name.clone();
            Box::pin(async move {
                let user = require_user(tx, &name).await?;
                Ok(all(
                    tx,
                    "SELECT d.device, d.first_seen, d.last_seen, d.acked_seq, d.revoked_at,
                            p.provider, p.refreshed_at, p.last_success, p.last_error
                     FROM devices d LEFT JOIN push_registrations p
                       ON p.user_id = d.user_id AND p.device = d.device
                     WHERE d.user_id = $1 ORDER BY d.device COLLATE \"C\"",
                    &[&user],
                )
                .await?
                .iter()
                .map(|r| DeviceInfo {
                    device: r.get(0),
                    first_seen_ms: r.get(1),
                    last_seen_ms: r.get(2),
                    acked_seq: r.get::<_, i64>(3) as u64,
                    revoked_at_ms: r.get(4),
                    push: r.get::<_, Option<String>>(5).map(|provider| DevicePush {
                        provider,
                        refreshed_at_ms: r.get(6),
                        last_success_ms: r.get(7),
                        last_error: r.get(8),
                    }),
                })
                .collect())
            })
        })
        .await
    }

    async fn positions(&self, user: &str, conv: Option<ConvId>) -> Result<Positions, StoreError> {
        let name = user.to_owned();
        self.read(move |tx| {
            let name = name.clone();
            Box::pin(async move {
                let user = require_user(tx, &name).await?;
                let head: i64 = one(tx, "SELECT inbox_head FROM users WHERE id = $1", &[&user])
                    .await?
                    .get(0);
                let devs = all(
                    tx,
                    "SELECT device, acked_seq FROM devices WHERE user_id = $1 AND revoked_at IS NULL
                     ORDER BY device COLLATE \"C\"",
                    &[&user],
                )
                .await?;
                let mut devices = Vec::with_capacity(devs.len());
                for r in &devs {
                    let (device, acked): (String, i64) = (r.get(0), r.get(1));
                    let conv_delivered_seq = match conv {
                        None => None,
                        Some(conv) => Some(
                            one(
                                tx,
                                "SELECT COALESCE(MAX(m.conv_seq), 0) FROM inbox i
                                 JOIN messages m ON m.id = i.message_id
                                 WHERE i.user_id = $1 AND i.seq <= $2 AND m.conv_id = $3",
                                &[&user, &acked, &(conv.min(i64::MAX as u64) as i64)],
                            )
                            .await?
                            .get::<_, i64>(0) as u64,
                        ),
                    };
                    devices.push(DevicePosition {
                        device,
                        acked_seq: acked as u64,
                        conv_delivered_seq,
                    });
                }
                Ok(Positions {
                    head: head as u64,
                    devices,
                })
            })
        })
        .await
    }

    async fn create_api_key(&self, name: &str) -> Result<(i64, String), StoreError> {
        if name.is_empty() || name.len() > 128 {
            return Err(StoreError::refused(
                ErrorCode::Invalid,
                "an API key name is 1-128 bytes",
            ));
        }
        let name = name.to_owned();
        let ctx = self.ctx.clone();
        self.write(move |tx, _| {
            let (name, now) = (name.clone(), ctx.now_ms());
            Box::pin(async move {
                let key = new_secret("kwk_");
                let id: i64 = one(
                    tx,
                    "INSERT INTO api_keys (name, hash, created_at) VALUES ($1, $2, $3) RETURNING id",
                    &[&name, &hash_token(&key), &now],
                )
                .await?
                .get(0);
                Ok((id, key))
            })
        })
        .await
    }

    async fn check_api_key(&self, key: &str) -> Result<Option<i64>, StoreError> {
        if !key.starts_with("kwk_") || key.len() > 128 {
            return Ok(None);
        }
        let hash = hash_token(key);
        self.read(move |tx| {
            let hash = hash.clone();
            Box::pin(async move {
                Ok(opt(
                    tx,
                    "SELECT id FROM api_keys WHERE hash = $1 AND revoked_at IS NULL",
                    &[&hash],
                )
                .await?
                .map(|r| r.get(0)))
            })
        })
        .await
    }

    async fn list_api_keys(&self) -> Result<Vec<ApiKeyInfo>, StoreError> {
        self.read(|tx| {
            Box::pin(async move {
                Ok(all(
                    tx,
                    "SELECT id, name, created_at, revoked_at FROM api_keys ORDER BY id",
                    &[],
                )
                .await?
                .iter()
                .map(|r| ApiKeyInfo {
                    id: r.get(0),
                    name: r.get(1),
                    created_at_ms: r.get(2),
                    revoked_at_ms: r.get(3),
                })
                .collect())
            })
        })
        .await
    }

    async fn revoke_api_key(&self, id: i64) -> Result<bool, StoreError> {
        let ctx = self.ctx.clone();
        self.write(move |tx, _| {
            let now = ctx.now_ms();
            Box::pin(async move {
                Ok(exec(
                    tx,
                    "UPDATE api_keys SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL",
                    &[&id, &now],
                )
                .await?
                    > 0)
            })
        })
        .await
    }

    async fn issue_token(&self, user: &str, ttl: Duration) -> Result<IssuedToken, StoreError> {
        let name = user.to_owned();
        let ctx = self.ctx.clone();
        self.write(move |tx, _| {
            let (name, now) = (name.clone(), ctx.now_ms());
            Box::pin(async move {
                let user = require_user(tx, &name).await?;
                let token = new_secret("kw_");
                let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
                let expires = now.saturating_add(ttl_ms);
                let id: i64 = one(
                    tx,
                    "INSERT INTO tokens (user_id, hash, created_at, expires_at)
                     VALUES ($1, $2, $3, $4) RETURNING id",
                    &[&user, &hash_token(&token), &now, &expires],
                )
                .await?
                .get(0);
                Ok(IssuedToken {
                    token,
                    id,
                    expires_at_ms: expires,
                })
            })
        })
        .await
    }

    async fn revoke(&self, target: RevokeTarget) -> Result<u64, StoreError> {
        let ctx = self.ctx.clone();
        self.write(move |tx, _| {
            let (target, now) = (target.clone(), ctx.now_ms());
            Box::pin(async move {
                let row = match &target {
                    RevokeTarget::Token(t) => {
                        opt(
                            tx,
                            "SELECT id, user_id, revoked_at FROM tokens WHERE hash = $1 FOR UPDATE",
                            &[&hash_token(t)],
                        )
                        .await?
                    }
                    RevokeTarget::Id(id) => {
                        opt(
                            tx,
                            "SELECT id, user_id, revoked_at FROM tokens WHERE id = $1 FOR UPDATE",
                            &[id],
                        )
                        .await?
                    }
                    RevokeTarget::User(name) => {
                        let user = require_user(tx, name).await?;
                        let n = exec(
                            tx,
                            "UPDATE tokens SET revoked_at = $2 WHERE user_id = $1 AND revoked_at IS NULL",
                            &[&user, &now],
                        )
                        .await?;
                        exec(
                            tx,
                            "INSERT INTO revocations (user_id, token_id, at) VALUES ($1, NULL, $2)",
                            &[&user, &now],
                        )
                        .await?;
                        // App-issued tokens are stateless: revoke by issue time.
                        exec(
                            tx,
                            "UPDATE users SET tokens_revoked_at = $2 WHERE id = $1",
                            &[&user, &now],
                        )
                        .await?;
                        return Ok(n);
                    }
                };
                let Some(row) = row else {
                    return Err(StoreError::NotFound("no such token".into()).into());
                };
                let (id, user, revoked): (i64, i64, Option<i64>) =
                    (row.get(0), row.get(1), row.get(2));
                if revoked.is_some() {
                    return Ok(0);
                }
                exec(
                    tx,
                    "UPDATE tokens SET revoked_at = $2 WHERE id = $1",
                    &[&id, &now],
                )
                .await?;
                exec(
                    tx,
                    "INSERT INTO revocations (user_id, token_id, at) VALUES ($1, $2, $3)",
                    &[&user, &id, &now],
                )
                .await?;
                Ok(1)
            })
        })
        .await
    }

    async fn list_tokens(&self, user: &str) -> Result<Vec<TokenInfo>, StoreError> {
        let name = user.to_owned();
        self.read(move |tx| {
            let name = name.clone();
            Box::pin(async move {
                let user = require_user(tx, &name).await?;
                Ok(all(
                    tx,
                    "SELECT id, created_at, expires_at, revoked_at FROM tokens
                     WHERE user_id = $1 ORDER BY id",
                    &[&user],
                )
                .await?
                .iter()
                .map(|r| TokenInfo {
                    id: r.get(0),
                    user: name.clone(),
                    created_at_ms: r.get(1),
                    expires_at_ms: r.get(2),
                    revoked_at_ms: r.get(3),
                })
                .collect())
            })
        })
        .await
    }

    async fn trim(&self) -> Result<TrimReport, StoreError> {
        // Many small transactions, never one that holds every user's lock:
        // relays keep writing while the trim runs.
        let retention = self.ctx.retention;
        let ctx = self.ctx.clone();
        // Cutoffs on the log's clock (the one entry times were stamped with).
        let now = self
            .read(move |tx| {
                let ctx = ctx.clone();
                Box::pin(async move { ctx.log_now(tx).await })
            })
            .await?;
        let mut report = TrimReport::default();
        if let Some(age) = retention.max_age {
            let cutoff = now.saturating_sub(i64::try_from(age.as_millis()).unwrap_or(i64::MAX));
            let mut after: i64 = 0;
            loop {
                // Users whose oldest stored entry is old enough to go.
                let users: Vec<i64> = self
                    .read(move |tx| {
                        Box::pin(async move {
                            Ok(all(
                                tx,
                                "SELECT u.id FROM users u
                                 JOIN inbox i ON i.user_id = u.id AND i.seq = u.inbox_floor
                                 WHERE u.id > $1 AND i.ts < $2 ORDER BY u.id LIMIT $3",
                                &[&after, &cutoff, &TRIM_USERS_PAGE],
                            )
                            .await?
                            .iter()
                            .map(|r| r.get(0))
                            .collect())
                        })
                    })
                    .await?;
                let Some(&last) = users.last() else { break };
                for user in users {
                    loop {
                        let (n, more) = self
                            .write(move |tx, _| Box::pin(trim_user(tx, user, cutoff)))
                            .await?;
                        report.inbox_entries += n;
                        if !more {
                            break;
                        }
                    }
                }
                after = last;
            }
            loop {
                let n = self
                    .write(move |tx, _| Box::pin(delete_old(tx, "messages", cutoff)))
                    .await?;
                report.messages += n;
                if n < TRIM_CHUNK as u64 {
                    break;
                }
            }
        }
        let dedupe = retention
            .dedupe_age
            .unwrap_or(Duration::from_secs(30 * 24 * 3600))
            .max(retention.max_age.unwrap_or_default());
        let cutoff = now.saturating_sub(i64::try_from(dedupe.as_millis()).unwrap_or(i64::MAX));
        loop {
            let n = self
                .write(move |tx, _| Box::pin(delete_old(tx, "sends", cutoff)))
                .await?;
            report.dedupe_keys += n;
            if n < TRIM_CHUNK as u64 {
                break;
            }
        }
        // Push registrations not refreshed for 60 days are dead.
        let stale = self.ctx.now_ms() - push::STALE_AFTER_MS;
        self.write(move |tx, _| {
            Box::pin(async move {
                exec(
                    tx,
                    "DELETE FROM push_registrations WHERE refreshed_at < $1",
                    &[&stale],
                )
                .await
            })
        })
        .await?;
        Ok(report)
    }
}
