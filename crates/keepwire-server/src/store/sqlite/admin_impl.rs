//! [`AdminStore`] for [`SqliteStore`]: users, devices, tokens, API keys,
//! retention.

use std::time::Duration;

use base64::Engine as _;
use keepwire_proto::{ConvId, ErrorCode, MemberChange, MemberEvent, is_valid_user_name};
use rand::RngCore as _;
use rusqlite::{OptionalExtension, params};

use super::inbox::membership_entries;
use super::queries::{conv_info, member_ids, system_user, user_id_by_name, user_name};
use super::{SqliteStore, hash_token, inbox};
use crate::store::{
    AdminStore, ApiKeyInfo, DeletedUser, DeviceInfo, DevicePosition, IssuedToken, Positions,
    RevokeTarget, StoreError, TokenInfo, TrimReport, UserId, deleted_user_name,
};

fn new_token() -> String {
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    format!(
        "kw_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    )
}

#[async_trait::async_trait]
impl AdminStore for SqliteStore {
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
        let clock = self.ctx.clock.clone();
        self.write(move |c, _| {
            if user_id_by_name(c, &name)?.is_some() {
                return Err(StoreError::Conflict(format!(
                    "user {name:?} already exists"
                )));
            }
            c.execute(
                "INSERT INTO users (name, created_at) VALUES (?1, ?2)",
                params![name, clock.now_ms()],
            )?;
            Ok(c.last_insert_rowid())
        })
        .await
    }

    async fn user_id(&self, name: &str) -> Result<Option<UserId>, StoreError> {
        let name = name.to_owned();
        self.read(move |c| user_id_by_name(c, &name)).await
    }

    async fn list_users(&self) -> Result<Vec<String>, StoreError> {
        self.read(|c| {
            // `~` names are the system user and deleted users' tombstones.
            let mut st =
                c.prepare_cached("SELECT name FROM users WHERE name NOT LIKE '~%' ORDER BY name")?;
            let names = st
                .query_map([], |r| r.get::<_, String>(0))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(names)
        })
        .await
    }

    async fn delete_user(&self, name: &str) -> Result<DeletedUser, StoreError> {
        let name = name.to_owned();
        let ctx = self.ctx.clone();
        self.write(move |c, heads| {
            // Every check before the first write (a failing job after a
            // write rolls back its whole group).
            let user = match user_id_by_name(c, &name)? {
                Some(id) if is_valid_user_name(&name) => id,
                _ => return Err(StoreError::NotFound(format!("no user named {name:?}"))),
            };
            let convs: Vec<i64> = c
                .prepare_cached("SELECT conv_id FROM members WHERE user_id = ?1 ORDER BY conv_id")?
                .query_map([user], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            let now_ms = ctx.clock.now_ms();
            let system = system_user(c, now_ms)?;
            let by = user_name(c, system)?;
            let now = ctx.clock.log_ts();
            for &conv in &convs {
                let conv = conv as u64;
                c.prepare_cached("DELETE FROM members WHERE conv_id = ?1 AND user_id = ?2")?
                    .execute(params![conv as i64, user])?;
                let Some(info) = conv_info(c, conv)? else {
                    continue;
                };
                // The others learn of it; the deleted user's inbox is going.
                let event = MemberEvent {
                    conv: info,
                    user: name.clone(),
                    change: MemberChange::Removed,
                    by: by.clone(),
                    ts: now,
                };
                let rest = member_ids(c, conv)?;
                membership_entries(c, &rest, &event, ctx.retention.max_entries, heads)?;
            }
            let devices = c.execute("DELETE FROM devices WHERE user_id = ?1", [user])?;
            for table in [
                "inbox",
                "device_tokens",
                "tokens",
                "push_registrations",
                "mutes",
                "reads",
                "sends",
            ] {
                c.execute(&format!("DELETE FROM {table} WHERE user_id = ?1"), [user])?;
            }
            // The row stays as a tombstone: its id is not reused (messages
            // and direct conversations refer to it) and the name is free.
            c.execute(
                "UPDATE users SET name = ?2, tokens_revoked_at = ?3, inbox_floor = inbox_head + 1
                 WHERE id = ?1",
                params![user, deleted_user_name(user), now_ms],
            )?;
            c.execute(
                "INSERT INTO revocations (user_id, token_id, at) VALUES (?1, NULL, ?2)",
                params![user, now_ms],
            )?;
            Ok(DeletedUser {
                id: user,
                user: name,
                conversations: convs.len() as u64,
                devices: devices as u64,
            })
        })
        .await
    }

    async fn revoke_device(&self, user: &str, device: &str) -> Result<bool, StoreError> {
        let (name, device) = (user.to_owned(), device.to_owned());
        let clock = self.ctx.clock.clone();
        self.write(move |c, _| {
            let user = user_id_by_name(c, &name)?
                .ok_or_else(|| StoreError::NotFound(format!("no user named {name:?}")))?;
            let now = clock.now_ms();
            // Revoking a device that never connected still bars it.
            let n = c.execute(
                "INSERT INTO devices (user_id, device, first_seen, last_seen, revoked_at) VALUES (?1, ?2, ?3, ?3, ?3)
                 ON CONFLICT (user_id, device) DO UPDATE SET revoked_at = excluded.revoked_at
                 WHERE devices.revoked_at IS NULL",
                params![user, device, now],
            )?;
            if n > 0 {
                c.execute(
                    "INSERT INTO revocations (user_id, token_id, device, at) VALUES (?1, NULL, ?2, ?3)",
                    params![user, device, now],
                )?;
                c.execute(
                    "DELETE FROM push_registrations WHERE user_id = ?1 AND device = ?2",
                    params![user, device],
                )?;
                // The tokens it connected with are revoked too: each gets a
                // log entry, so connections using them elsewhere close.
                let tokens: Vec<i64> = c
                    .prepare_cached(
                        "SELECT t.id FROM device_tokens d JOIN tokens t ON t.id = d.token_id
                         WHERE d.user_id = ?1 AND d.device = ?2 AND t.revoked_at IS NULL",
                    )?
                    .query_map(params![user, device], |r| r.get(0))?
                    .collect::<Result<_, _>>()?;
                for t in tokens {
                    c.execute("UPDATE tokens SET revoked_at = ?2 WHERE id = ?1", params![t, now])?;
                    c.execute(
                        "INSERT INTO revocations (user_id, token_id, at) VALUES (?1, ?2, ?3)",
                        params![user, t, now],
                    )?;
                }
            }
            Ok(n > 0)
        })
        .await
    }

    async fn list_devices(&self, user: &str) -> Result<Vec<DeviceInfo>, StoreError> {
        let name = user.to_owned();
        self.read(move |c| {
            let user = user_id_by_name(c, &name)?
                .ok_or_else(|| StoreError::NotFound(format!("no user named {name:?}")))?;
            let mut stmt = c.prepare_cached(
                "SELECT d.device, d.first_seen, d.last_seen, d.acked_seq, d.revoked_at,
                        p.provider, p.refreshed_at, p.last_success, p.last_error
                 FROM devices d LEFT JOIN push_registrations p
                   ON p.user_id = d.user_id AND p.device = d.device
                 WHERE d.user_id = ?1 ORDER BY d.device",
            )?;
            let rows = stmt
                .query_map([user], |r| {
                    let provider: Option<String> = r.get(5)?;
                    Ok(DeviceInfo {
                        device: r.get(0)?,
                        first_seen_ms: r.get(1)?,
                        last_seen_ms: r.get(2)?,
                        acked_seq: r.get::<_, i64>(3)? as u64,
                        revoked_at_ms: r.get(4)?,
                        push: match provider {
                            Some(provider) => Some(crate::store::DevicePush {
                                provider,
                                refreshed_at_ms: r.get(6)?,
                                last_success_ms: r.get(7)?,
                                last_error: r.get(8)?,
                            }),
                            None => None,
                        },
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .await
    }

    async fn positions(&self, user: &str, conv: Option<ConvId>) -> Result<Positions, StoreError> {
        let name = user.to_owned();
        self.read(move |c| {
            let user = user_id_by_name(c, &name)?
                .ok_or_else(|| StoreError::NotFound(format!("no user named {name:?}")))?;
            let head: i64 = c
                .prepare_cached("SELECT inbox_head FROM users WHERE id = ?1")?
                .query_row([user], |r| r.get(0))?;
            let mut stmt = c.prepare_cached(
                "SELECT device, acked_seq FROM devices WHERE user_id = ?1 AND revoked_at IS NULL ORDER BY device",
            )?;
            let devs = stmt
                .query_map([user], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            let mut devices = Vec::with_capacity(devs.len());
            for (device, acked) in devs {
                let conv_delivered_seq = match conv {
                    None => None,
                    Some(conv) => Some(
                        c.prepare_cached(
                            "SELECT COALESCE(MAX(m.conv_seq), 0) FROM inbox i JOIN messages m ON m.id = i.message_id
                             WHERE i.user_id = ?1 AND i.seq <= ?2 AND m.conv_id = ?3",
                        )?
                        .query_row(params![user, acked, conv as i64], |r| r.get::<_, i64>(0))? as u64,
                    ),
                };
                devices.push(DevicePosition { device, acked_seq: acked as u64, conv_delivered_seq });
            }
            Ok(Positions { head: head as u64, devices })
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
        let clock = self.ctx.clock.clone();
        self.write(move |c, _| {
            let mut b = [0u8; 32];
            rand::rng().fill_bytes(&mut b);
            let key = format!(
                "kwk_{}",
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
            );
            c.execute(
                "INSERT INTO api_keys (name, hash, created_at) VALUES (?1, ?2, ?3)",
                params![name, hash_token(&key), clock.now_ms()],
            )?;
            Ok((c.last_insert_rowid(), key))
        })
        .await
    }

    async fn check_api_key(&self, key: &str) -> Result<Option<i64>, StoreError> {
        if !key.starts_with("kwk_") || key.len() > 128 {
            return Ok(None);
        }
        let hash = hash_token(key);
        self.read(move |c| {
            Ok(
                c.prepare_cached("SELECT id FROM api_keys WHERE hash = ?1 AND revoked_at IS NULL")?
                    .query_row([hash], |r| r.get(0))
                    .optional()?,
            )
        })
        .await
    }

    async fn list_api_keys(&self) -> Result<Vec<ApiKeyInfo>, StoreError> {
        self.read(|c| {
            let mut stmt =
                c.prepare("SELECT id, name, created_at, revoked_at FROM api_keys ORDER BY id")?;
            let rows = stmt
                .query_map([], |r| {
                    Ok(ApiKeyInfo {
                        id: r.get(0)?,
                        name: r.get(1)?,
                        created_at_ms: r.get(2)?,
                        revoked_at_ms: r.get(3)?,
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .await
    }

    async fn revoke_api_key(&self, id: i64) -> Result<bool, StoreError> {
        let clock = self.ctx.clock.clone();
        self.write(move |c, _| {
            Ok(c.execute(
                "UPDATE api_keys SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
                params![id, clock.now_ms()],
            )? > 0)
        })
        .await
    }

    async fn issue_token(&self, user: &str, ttl: Duration) -> Result<IssuedToken, StoreError> {
        let name = user.to_owned();
        let clock = self.ctx.clock.clone();
        self.write(move |c, _| {
            let id = user_id_by_name(c, &name)?
                .ok_or_else(|| StoreError::NotFound(format!("no user named {name:?}")))?;
            let token = new_token();
            let now = clock.now_ms();
            let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
            let expires = now.saturating_add(ttl_ms);
            c.execute(
                "INSERT INTO tokens (user_id, hash, created_at, expires_at) VALUES (?1, ?2, ?3, ?4)",
                params![id, hash_token(&token), now, expires],
            )?;
            Ok(IssuedToken { token, id: c.last_insert_rowid(), expires_at_ms: expires })
        })
        .await
    }

    async fn revoke(&self, target: RevokeTarget) -> Result<u64, StoreError> {
        let clock = self.ctx.clock.clone();
        self.write(move |c, _| {
            let now = clock.now_ms();
            match target {
                RevokeTarget::Token(_) | RevokeTarget::Id(_) => {
                    let row: Option<(i64, i64, Option<i64>)> = match &target {
                        RevokeTarget::Token(t) => c
                            .query_row(
                                "SELECT id, user_id, revoked_at FROM tokens WHERE hash = ?1",
                                [hash_token(t)],
                                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                            )
                            .optional()?,
                        RevokeTarget::Id(id) => c
                            .query_row(
                                "SELECT id, user_id, revoked_at FROM tokens WHERE id = ?1",
                                [id],
                                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                            )
                            .optional()?,
                        RevokeTarget::User(_) => None,
                    };
                    let Some((id, user, revoked)) = row else {
                        return Err(StoreError::NotFound("no such token".into()));
                    };
                    if revoked.is_some() {
                        return Ok(0);
                    }
                    c.execute("UPDATE tokens SET revoked_at = ?2 WHERE id = ?1", params![id, now])?;
                    c.execute(
                        "INSERT INTO revocations (user_id, token_id, at) VALUES (?1, ?2, ?3)",
                        params![user, id, now],
                    )?;
                    Ok(1)
                }
                RevokeTarget::User(name) => {
                    let user = user_id_by_name(c, &name)?
                        .ok_or_else(|| StoreError::NotFound(format!("no user named {name:?}")))?;
                    let n = c.execute(
                        "UPDATE tokens SET revoked_at = ?2 WHERE user_id = ?1 AND revoked_at IS NULL",
                        params![user, now],
                    )?;
                    c.execute(
                        "INSERT INTO revocations (user_id, token_id, at) VALUES (?1, NULL, ?2)",
                        params![user, now],
                    )?;
                    // App-issued tokens are stateless: revoke by issue time.
                    c.execute("UPDATE users SET tokens_revoked_at = ?2 WHERE id = ?1", params![user, now])?;
                    Ok(n as u64)
                }
            }
        })
        .await
    }

    async fn list_tokens(&self, user: &str) -> Result<Vec<TokenInfo>, StoreError> {
        let name = user.to_owned();
        self.read(move |c| {
            let id = user_id_by_name(c, &name)?
                .ok_or_else(|| StoreError::NotFound(format!("no user named {name:?}")))?;
            let mut stmt = c.prepare(
                "SELECT id, created_at, expires_at, revoked_at FROM tokens WHERE user_id = ?1 ORDER BY id",
            )?;
            let rows = stmt
                .query_map([id], |r| {
                    Ok(TokenInfo {
                        id: r.get(0)?,
                        user: name.clone(),
                        created_at_ms: r.get(1)?,
                        expires_at_ms: r.get(2)?,
                        revoked_at_ms: r.get(3)?,
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .await
    }

    async fn trim(&self) -> Result<TrimReport, StoreError> {
        let ctx = self.ctx.clone();
        self.write(move |c, _| inbox::trim(c, &ctx)).await
    }
}
