//! [`RelayStore`] for [`SqliteStore`]: thin wrappers that run each
//! operation on the writer (writes) or the read pool (reads).

use std::sync::Arc;

use keepwire_proto::{
    Confirm, ConvCreate, ConvId, ConvInfo, Cursor, HistoryPage, InboxEntry, Send as SendMsg, Seq,
};
use rusqlite::{OptionalExtension, params};

use super::queries::{member_ids, require_member, user_id_by_name};
use super::{SqliteStore, conversations, hash_token, inbox};
use crate::store::{
    Actor, AuthFailure, AuthedUser, HeadListener, RelayStore, ResumePlan, Revocation, StoreError,
    UserId,
};
use keepwire_proto::is_valid_user_name;

#[async_trait::async_trait]
impl RelayStore for SqliteStore {
    fn epoch(&self) -> String {
        self.epoch.clone()
    }

    fn set_head_listener(&self, listener: Arc<dyn HeadListener>) {
        if self.listener.set(listener).is_err() {
            tracing::warn!(target: "keepwire::store", "head listener already set; ignoring");
        }
    }

    async fn authenticate(&self, token: &str) -> Result<AuthedUser, StoreError> {
        if !token.starts_with("kw_") {
            return Err(StoreError::Auth(AuthFailure::Unknown));
        }
        let hash = hash_token(token);
        let row = self
            .read(move |c| {
                Ok(c.prepare_cached(
                    "SELECT t.id, t.user_id, u.name, t.expires_at, t.revoked_at
                     FROM tokens t JOIN users u ON u.id = t.user_id WHERE t.hash = ?1",
                )?
                .query_row([hash], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, Option<i64>>(4)?,
                    ))
                })
                .optional()?)
            })
            .await?;
        match row {
            None => Err(StoreError::Auth(AuthFailure::Unknown)),
            Some((_, _, _, _, Some(_))) => Err(StoreError::Auth(AuthFailure::Revoked)),
            Some((_, _, _, exp, None)) if exp <= self.ctx.clock.now_ms() => {
                Err(StoreError::Auth(AuthFailure::Expired))
            }
            Some((token_id, id, name, exp, None)) => Ok(AuthedUser {
                id,
                name,
                token_id: Some(token_id),
                expires_at_ms: exp,
            }),
        }
    }

    async fn authenticate_external(
        &self,
        name: &str,
        issued_at_ms: Option<i64>,
    ) -> Result<UserId, StoreError> {
        if !is_valid_user_name(name) {
            return Err(StoreError::Auth(AuthFailure::Unknown));
        }
        let name = name.to_owned();
        let known = {
            let name = name.clone();
            self.read(move |c| {
                Ok(
                    c.prepare_cached("SELECT id, tokens_revoked_at FROM users WHERE name = ?1")?
                        .query_row([name], |r| {
                            Ok((r.get::<_, i64>(0)?, r.get::<_, Option<i64>>(1)?))
                        })
                        .optional()?,
                )
            })
            .await?
        };
        let (id, revoked_at) = match known {
            Some(k) => k,
            None => {
                let clock = self.ctx.clock.clone();
                let id = self
                    .write(move |c, _| {
                        c.prepare_cached(
                            "INSERT OR IGNORE INTO users (name, created_at) VALUES (?1, ?2)",
                        )?
                        .execute(params![name, clock.now_ms()])?;
                        user_id_by_name(c, &name)?
                            .ok_or_else(|| StoreError::commit("user vanished"))
                    })
                    .await?;
                (id, None)
            }
        };
        if let Some(r) = revoked_at
            && issued_at_ms.is_none_or(|iat| iat <= r)
        {
            return Err(StoreError::Auth(AuthFailure::Revoked));
        }
        Ok(id)
    }

    async fn device_revoked(&self, user: UserId, device: &str) -> Result<bool, StoreError> {
        let device = device.to_owned();
        self.read(move |c| {
            Ok(c.prepare_cached(
                "SELECT revoked_at FROM devices WHERE user_id = ?1 AND device = ?2",
            )?
            .query_row(params![user, device], |r| r.get::<_, Option<i64>>(0))
            .optional()?
            .flatten()
            .is_some())
        })
        .await
    }

    async fn touch_device(
        &self,
        user: UserId,
        device: &str,
        token_id: Option<i64>,
    ) -> Result<(), StoreError> {
        let device = device.to_owned();
        let clock = self.ctx.clock.clone();
        self.write(move |c, _| {
            let now = clock.now_ms();
            c.prepare_cached(
                "INSERT INTO devices (user_id, device, first_seen, last_seen) VALUES (?1, ?2, ?3, ?3)
                 ON CONFLICT (user_id, device) DO UPDATE SET last_seen = excluded.last_seen",
            )?
            .execute(params![user, device, now])?;
            if let Some(t) = token_id {
                c.prepare_cached(
                    "INSERT OR IGNORE INTO device_tokens (user_id, device, token_id) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![user, device, t])?;
            }
            Ok(())
        })
        .await
    }

    async fn resume(
        &self,
        user: UserId,
        cursor: Option<&Cursor>,
        new_window: u64,
    ) -> Result<ResumePlan, StoreError> {
        let epoch = self.epoch.clone();
        let cursor = cursor.cloned();
        self.read(move |c| inbox::plan_resume(c, &epoch, user, cursor.as_ref(), new_window))
            .await
    }

    async fn read_inbox(
        &self,
        user: UserId,
        from: Seq,
        limit: usize,
    ) -> Result<Vec<InboxEntry>, StoreError> {
        self.read(move |c| inbox::read_inbox(c, user, from, limit))
            .await
    }

    async fn inbox_head(&self, user: UserId) -> Result<Seq, StoreError> {
        self.read(move |c| {
            Ok(
                c.prepare_cached("SELECT inbox_head FROM users WHERE id = ?1")?
                    .query_row([user], |r| r.get::<_, i64>(0))
                    .optional()?
                    .unwrap_or(0) as Seq,
            )
        })
        .await
    }

    async fn send(&self, actor: Actor, device: &str, send: SendMsg) -> Result<Confirm, StoreError> {
        let device = device.to_owned();
        let ctx = self.ctx.clone();
        self.write(move |c, heads| inbox::send(c, heads, &ctx, actor, &device, send))
            .await
    }

    async fn record_ack(&self, user: UserId, device: &str, seq: Seq) -> Result<(), StoreError> {
        let device = device.to_owned();
        let clock = self.ctx.clock.clone();
        self.write(move |c, _| {
            c.prepare_cached(
                "UPDATE devices SET acked_seq = MAX(acked_seq, ?3), last_seen = ?4
                 WHERE user_id = ?1 AND device = ?2",
            )?
            .execute(params![user, device, seq as i64, clock.now_ms()])?;
            Ok(())
        })
        .await
    }

    async fn history(
        &self,
        actor: Actor,
        conv: ConvId,
        before: Option<u64>,
        limit: u32,
    ) -> Result<HistoryPage, StoreError> {
        self.read(move |c| conversations::history(c, actor, conv, before, limit))
            .await
    }

    async fn conv_create(
        &self,
        actor: Actor,
        req: ConvCreate,
        max_group_size: usize,
    ) -> Result<(ConvInfo, bool), StoreError> {
        let ctx = self.ctx.clone();
        self.write(move |c, heads| {
            conversations::create(c, heads, &ctx, actor, req, max_group_size)
        })
        .await
    }

    async fn conv_member(
        &self,
        actor: Actor,
        conv: ConvId,
        target: &str,
        add: bool,
        max_group_size: usize,
    ) -> Result<(ConvInfo, bool), StoreError> {
        let target = target.to_owned();
        let ctx = self.ctx.clone();
        self.write(move |c, heads| {
            conversations::change_member(c, heads, &ctx, actor, conv, &target, add, max_group_size)
        })
        .await
    }

    async fn conv_list(&self, user: UserId) -> Result<Vec<ConvInfo>, StoreError> {
        self.read(move |c| conversations::list(c, user)).await
    }

    async fn conv_member_ids(&self, user: UserId, conv: ConvId) -> Result<Vec<UserId>, StoreError> {
        self.read(move |c| {
            require_member(c, conv, user)?;
            member_ids(c, conv)
        })
        .await
    }

    async fn mark_read(&self, user: UserId, conv: ConvId, up_to: u64) -> Result<bool, StoreError> {
        let ctx = self.ctx.clone();
        self.write(move |c, heads| inbox::mark_read(c, heads, &ctx, user, conv, up_to))
            .await
    }

    async fn revocations_after(&self, after: i64) -> Result<Vec<Revocation>, StoreError> {
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT id, user_id, token_id, device FROM revocations WHERE id > ?1 ORDER BY id LIMIT 1000",
            )?;
            let rows = stmt
                .query_map([after], |r| {
Ok(Revocation { id: r.get(0)?, user_id: r.get(1)?, token_id: r.get(2)?, device: r.get(3)? })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .await
    }

    async fn set_push(
        &self,
        user: UserId,
        device: &str,
        push: Option<crate::store::NewPush>,
    ) -> Result<Option<String>, StoreError> {
        let device = device.to_owned();
        let ctx = self.ctx.clone();
        self.write(move |c, _| super::push::set(c, &ctx, user, &device, push))
            .await
    }

    async fn mute(&self, user: UserId, conv: ConvId, muted: bool) -> Result<bool, StoreError> {
        let ctx = self.ctx.clone();
        self.write(move |c, heads| super::push::mute(c, heads, &ctx, user, conv, muted))
            .await
    }

    async fn push_targets(
        &self,
        user: UserId,
    ) -> Result<Vec<crate::store::PushTarget>, StoreError> {
        self.read(move |c| super::push::targets(c, user)).await
    }

    async fn push_users(&self) -> Result<Vec<UserId>, StoreError> {
        self.read(|c| {
            Ok(c.prepare_cached(
                "SELECT DISTINCT user_id FROM push_registrations ORDER BY user_id",
            )?
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?)
        })
        .await
    }

    async fn record_push(&self, reg_id: &str, seq: Seq) -> Result<(), StoreError> {
        let (reg_id, ctx) = (reg_id.to_owned(), self.ctx.clone());
        self.write(move |c, _| super::push::record(c, &ctx, &reg_id, seq))
            .await
    }

    async fn push_outcome(
        &self,
        reg_id: &str,
        outcome: crate::store::PushOutcome,
    ) -> Result<(), StoreError> {
        let (reg_id, ctx) = (reg_id.to_owned(), self.ctx.clone());
        self.write(move |c, _| super::push::outcome(c, &ctx, &reg_id, outcome))
            .await
    }

    async fn meta_or_init(&self, key: &str, init: &str) -> Result<String, StoreError> {
        let (key, init) = (key.to_owned(), init.to_owned());
        self.write(move |c, _| {
            c.prepare_cached("INSERT OR IGNORE INTO meta (key, value) VALUES (?1, ?2)")?
                .execute(params![key, init])?;
            Ok(c.prepare_cached("SELECT value FROM meta WHERE key = ?1")?
                .query_row([key], |r| r.get(0))?)
        })
        .await
    }

    async fn close(&self) {
        // Reads end too: later ones fail with `Closed`.
        self.readers.permits.close();
        if self.manual.is_some() {
            while self.pending_writes() > 0 {
                self.commit(usize::MAX, None);
            }
            self.crash();
            return;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self
            .writer
            .send(super::writer::WriterMsg::Close(tx))
            .await
            .is_ok()
        {
            let _ = rx.await;
        }
        let handle = self
            .writer_thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(h) = handle {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
    }
}
