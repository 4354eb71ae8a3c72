//! [`RelayStore`] for [`PostgresStore`]: thin wrappers that run each
//! operation in a write transaction or a read snapshot. The closures clone
//! their inputs because a retried transaction runs them again.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use keepwire_proto::{
    Confirm, ConvCreate, ConvId, ConvInfo, Cursor, HistoryPage, InboxEntry, Send as SendMsg, Seq,
    is_valid_user_name,
};

use super::queries::{exec, member_ids, one, opt, require_member};
use super::{PostgresStore, SendTurn, conversations, hash_token, inbox, push};
use crate::store::{
    Actor, AuthFailure, AuthedUser, HeadListener, InfraError, NewPush, PushOutcome, PushTarget,
    RelayStore, ResumePlan, Revocation, StoreError, UserId,
};

#[async_trait::async_trait]
impl RelayStore for PostgresStore {
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
            .read(move |tx| {
                let hash = hash.clone();
                Box::pin(async move {
                    Ok(opt(
                        tx,
                        "SELECT t.id, t.user_id, u.name, t.expires_at, t.revoked_at
                         FROM tokens t JOIN users u ON u.id = t.user_id WHERE t.hash = $1",
                        &[&hash],
                    )
                    .await?
                    .map(|r| {
                        (
                            r.get::<_, i64>(0),
                            r.get::<_, i64>(1),
                            r.get::<_, String>(2),
                            r.get::<_, i64>(3),
                            r.get::<_, Option<i64>>(4),
                        )
                    }))
                })
            })
            .await?;
        match row {
            None => Err(StoreError::Auth(AuthFailure::Unknown)),
            Some((_, _, _, _, Some(_))) => Err(StoreError::Auth(AuthFailure::Revoked)),
            Some((_, _, _, exp, None)) if exp <= self.ctx.now_ms() => {
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
            self.read(move |tx| {
                let name = name.clone();
                Box::pin(async move {
                    Ok(opt(
                        tx,
                        "SELECT id, tokens_revoked_at FROM users WHERE name = $1",
                        &[&name],
                    )
                    .await?
                    .map(|r| (r.get::<_, i64>(0), r.get::<_, Option<i64>>(1))))
                })
            })
            .await?
        };
        let (id, revoked_at) = match known {
            Some(k) => k,
            None => {
                let ctx = self.ctx.clone();
                let id = self
                    .write(move |tx, _| {
                        let (name, now) = (name.clone(), ctx.now_ms());
                        Box::pin(async move {
                            exec(
                                tx,
                                "INSERT INTO users (name, created_at) VALUES ($1, $2)
                                 ON CONFLICT (name) DO NOTHING",
                                &[&name, &now],
                            )
                            .await?;
                            Ok(one(tx, "SELECT id FROM users WHERE name = $1", &[&name])
                                .await?
                                .get(0))
                        })
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
        self.read(move |tx| {
            let device = device.clone();
            Box::pin(async move {
                Ok(opt(
                    tx,
                    "SELECT revoked_at FROM devices WHERE user_id = $1 AND device = $2",
                    &[&user, &device],
                )
                .await?
                .and_then(|r| r.get::<_, Option<i64>>(0))
                .is_some())
            })
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
        let ctx = self.ctx.clone();
        self.write(move |tx, _| {
            let (device, now) = (device.clone(), ctx.now_ms());
            Box::pin(async move {
                exec(
                    tx,
                    "INSERT INTO devices (user_id, device, first_seen, last_seen) VALUES ($1, $2, $3, $3)
                     ON CONFLICT (user_id, device) DO UPDATE SET last_seen = EXCLUDED.last_seen",
                    &[&user, &device, &now],
                )
                .await?;
                if let Some(t) = token_id {
                    exec(
                        tx,
                        "INSERT INTO device_tokens (user_id, device, token_id) VALUES ($1, $2, $3)
                         ON CONFLICT DO NOTHING",
                        &[&user, &device, &t],
                    )
                    .await?;
                }
                Ok(())
            })
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
        self.read(move |tx| {
            let (epoch, cursor) = (epoch.clone(), cursor.clone());
            Box::pin(async move {
                inbox::plan_resume(tx, &epoch, user, cursor.as_ref(), new_window).await
            })
        })
        .await
    }

    async fn read_inbox(
        &self,
        user: UserId,
        from: Seq,
        limit: usize,
    ) -> Result<Vec<InboxEntry>, StoreError> {
        self.read(move |tx| Box::pin(inbox::read_inbox(tx, user, from, limit)))
            .await
    }

    async fn inbox_head(&self, user: UserId) -> Result<Seq, StoreError> {
        self.read(move |tx| {
            Box::pin(async move {
                Ok(
                    opt(tx, "SELECT inbox_head FROM users WHERE id = $1", &[&user])
                        .await?
                        .map_or(0, |r| r.get::<_, i64>(0)) as Seq,
                )
            })
        })
        .await
    }

    async fn send(&self, actor: Actor, device: &str, send: SendMsg) -> Result<Confirm, StoreError> {
        let device = device.to_owned();
        let ctx = self.ctx.clone();
        let sender = match actor {
            Actor::User(u) => u,
            // The backend's sends (no user id before the transaction).
            Actor::System => -1,
        };
        let mut turn = SendTurn::take(&self.send_gates, (sender, device.clone())).await;
        let by_user = matches!(actor, Actor::User(_));
        let cid = send.cid.clone();
        if by_user && let Some(first) = turn.held_by(&cid) {
            return Err(StoreError::Infra(InfraError::Database(format!(
                "an earlier send of this device ({first}) failed: resend from it"
            ))));
        }
        let r = self
            .write(move |tx, heads| {
                let (device, send, ctx) = (device.clone(), send.clone(), ctx.clone());
                Box::pin(async move { inbox::send(tx, heads, &ctx, actor, &device, send).await })
            })
            .await;
        if by_user {
            match &r {
                Ok(_) => turn.outcome(&cid, false),
                Err(StoreError::Infra(_)) => turn.outcome(&cid, true),
                // Refused for good (PROTOCOL.md §5): it holds nothing back.
                Err(_) => {}
            }
        }
        r
    }

    async fn record_ack(&self, user: UserId, device: &str, seq: Seq) -> Result<(), StoreError> {
        let device = device.to_owned();
        let ctx = self.ctx.clone();
        let seq = seq.min(i64::MAX as u64) as i64;
        self.write(move |tx, _| {
            let (device, now) = (device.clone(), ctx.now_ms());
            Box::pin(async move {
                exec(
                    tx,
                    "UPDATE devices SET acked_seq = GREATEST(acked_seq, $3), last_seen = $4
                     WHERE user_id = $1 AND device = $2",
                    &[&user, &device, &seq, &now],
                )
                .await?;
                Ok(())
            })
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
        self.read(move |tx| Box::pin(conversations::history(tx, actor, conv, before, limit)))
            .await
    }

    async fn conv_create(
        &self,
        actor: Actor,
        req: ConvCreate,
        max_group_size: usize,
    ) -> Result<(ConvInfo, bool), StoreError> {
        let ctx = self.ctx.clone();
        self.write(move |tx, heads| {
            let (ctx, req) = (ctx.clone(), req.clone());
            Box::pin(async move {
                conversations::create(tx, heads, &ctx, actor, req, max_group_size).await
            })
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
        self.write(move |tx, heads| {
            let (ctx, target) = (ctx.clone(), target.clone());
            Box::pin(async move {
                conversations::change_member(
                    tx,
                    heads,
                    &ctx,
                    actor,
                    conv,
                    &target,
                    add,
                    max_group_size,
                )
                .await
            })
        })
        .await
    }

    async fn conv_list(&self, user: UserId) -> Result<Vec<ConvInfo>, StoreError> {
        self.read(move |tx| Box::pin(conversations::list(tx, user)))
            .await
    }

    async fn conv_member_ids(&self, user: UserId, conv: ConvId) -> Result<Vec<UserId>, StoreError> {
        self.read(move |tx| {
            Box::pin(async move {
                require_member(tx, conv, user).await?;
                member_ids(tx, conv).await
            })
        })
        .await
    }

    async fn mark_read(&self, user: UserId, conv: ConvId, up_to: u64) -> Result<bool, StoreError> {
        let ctx = self.ctx.clone();
        self.write(move |tx, heads| {
            let ctx = ctx.clone();
            Box::pin(async move { inbox::mark_read(tx, heads, &ctx, user, conv, up_to).await })
        })
        .await
    }

    async fn revocations_after(&self, after: i64) -> Result<Vec<Revocation>, StoreError> {
        self.read(move |tx| {
            Box::pin(async move {
                Ok(super::queries::all(
                    tx,
                    "SELECT id, user_id, token_id, device FROM revocations WHERE id > $1
                     ORDER BY id LIMIT 1000",
                    &[&after],
                )
                .await?
                .iter()
                .map(|r| Revocation {
                    id: r.get(0),
                    user_id: r.get(1),
                    token_id: r.get(2),
                    device: r.get(3),
                })
                .collect())
            })
        })
        .await
    }

    async fn set_push(
        &self,
        user: UserId,
        device: &str,
        push: Option<NewPush>,
    ) -> Result<Option<String>, StoreError> {
        let device = device.to_owned();
        let ctx = self.ctx.clone();
        self.write(move |tx, _| {
            let (ctx, device, push) = (ctx.clone(), device.clone(), push.clone());
            Box::pin(async move { push::set(tx, &ctx, user, &device, push).await })
        })
        .await
    }

    async fn mute(&self, user: UserId, conv: ConvId, muted: bool) -> Result<bool, StoreError> {
        let ctx = self.ctx.clone();
        self.write(move |tx, heads| {
            let ctx = ctx.clone();
            Box::pin(async move { push::mute(tx, heads, &ctx, user, conv, muted).await })
        })
        .await
    }

    async fn push_targets(&self, user: UserId) -> Result<Vec<PushTarget>, StoreError> {
        self.read(move |tx| Box::pin(push::targets(tx, user))).await
    }

    async fn push_users(&self) -> Result<Vec<UserId>, StoreError> {
        self.read(|tx| {
            Box::pin(async move {
                Ok(super::queries::all(
                    tx,
                    "SELECT DISTINCT user_id FROM push_registrations ORDER BY user_id",
                    &[],
                )
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect())
            })
        })
        .await
    }

    async fn record_push(&self, reg_id: &str, seq: Seq) -> Result<(), StoreError> {
        let (reg_id, ctx) = (reg_id.to_owned(), self.ctx.clone());
        self.write(move |tx, _| {
            let (reg_id, ctx) = (reg_id.clone(), ctx.clone());
            Box::pin(async move { push::record(tx, &ctx, &reg_id, seq).await })
        })
        .await
    }

    async fn push_outcome(&self, reg_id: &str, outcome: PushOutcome) -> Result<(), StoreError> {
        let (reg_id, ctx) = (reg_id.to_owned(), self.ctx.clone());
        self.write(move |tx, _| {
            let (reg_id, ctx, outcome) = (reg_id.clone(), ctx.clone(), outcome.clone());
            Box::pin(async move { push::outcome(tx, &ctx, &reg_id, outcome).await })
        })
        .await
    }

    async fn meta_or_init(&self, key: &str, init: &str) -> Result<String, StoreError> {
        let (key, init) = (key.to_owned(), init.to_owned());
        self.write(move |tx, _| {
            let (key, init) = (key.clone(), init.clone());
            Box::pin(async move {
                exec(
                    tx,
                    "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
                    &[&key, &init],
                )
                .await?;
                Ok(one(tx, "SELECT value FROM meta WHERE key = $1", &[&key])
                    .await?
                    .get(0))
            })
        })
        .await
    }

    async fn close(&self) {
        // Every write answers before its future resolves, so there is no
        // queue to flush: later calls fail, and the pool's connections close.
        self.closed.store(true, Ordering::Release);
        self.pool.close();
    }
}
