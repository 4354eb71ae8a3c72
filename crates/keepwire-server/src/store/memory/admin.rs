//! [`AdminStore`] for [`MemoryStore`]: users, devices, tokens, API keys,
//! retention.

use std::time::Duration;

use super::state::{self, ApiKey, Token};
use super::{MemoryStore, hash, no_user};
use crate::store::{
    AdminStore, ApiKeyInfo, DeletedUser, DeviceInfo, DevicePosition, DevicePush, IssuedToken,
    Positions, Revocation, RevokeTarget, StoreError, TokenInfo, TrimReport, UserId,
};
use keepwire_proto::ConvId;

#[async_trait::async_trait]
impl AdminStore for MemoryStore {
    async fn create_user(&self, name: &str) -> Result<UserId, StoreError> {
        self.read(|s| s.check_new_user(name))?;
        let name = name.to_owned();
        self.write(move |s, _| {
            s.check_new_user(&name)?;
            Ok(s.insert_user(&name))
        })
        .await
    }

    async fn user_id(&self, name: &str) -> Result<Option<UserId>, StoreError> {
        self.read(|s| Ok(s.user_id(name)))
    }

    async fn list_users(&self) -> Result<Vec<String>, StoreError> {
        self.read(|s| {
            // `~` names are the system user and deleted users' tombstones.
            let mut names: Vec<String> = s
                .user_ids
                .keys()
                .filter(|n| !n.starts_with('~'))
                .cloned()
                .collect();
            names.sort();
            Ok(names)
        })
    }

    async fn delete_user(&self, name: &str) -> Result<DeletedUser, StoreError> {
        let name = name.to_owned();
        self.write(move |s, w| s.delete_user(w, &name)).await
    }

    async fn revoke_device(&self, user: &str, device: &str) -> Result<bool, StoreError> {
        let (name, device) = (user.to_owned(), device.to_owned());
        self.write(move |s, w| {
            let user = s.user_id(&name).ok_or_else(|| no_user(&name))?;
            let d = s
                .devices
                .entry((user, device.clone()))
                .or_insert(state::Device {
                    acked_seq: 0,
                    first_seen: w.now_ms,
                    last_seen: w.now_ms,
                    revoked_at: None,
                    tokens: Vec::new(),
                });
            if d.revoked_at.is_some() {
                return Ok(false);
            }
            d.revoked_at = Some(w.now_ms);
            let used = d.tokens.clone();
            s.push.remove(&(user, device.clone()));
            let id = s.revocations.last().map_or(1, |r| r.id + 1);
            s.revocations.push(Revocation {
                id,
                user_id: user,
                token_id: None,
                device: Some(device),
            });
            // The tokens it connected with are revoked too.
            for t in s
                .tokens
                .iter_mut()
                .filter(|t| used.contains(&t.id) && t.revoked_at.is_none())
            {
                t.revoked_at = Some(w.now_ms);
                let id = s.revocations.last().map_or(1, |r| r.id + 1);
                s.revocations.push(Revocation {
                    id,
                    user_id: user,
                    token_id: Some(t.id),
                    device: None,
                });
            }
            Ok(true)
        })
        .await
    }

    async fn list_devices(&self, user: &str) -> Result<Vec<DeviceInfo>, StoreError> {
        self.read(|s| {
            let id = s.user_id(user).ok_or_else(|| no_user(user))?;
            Ok(s.devices
                .range((id, String::new())..)
                .take_while(|((u, _), _)| *u == id)
                .map(|((_, device), d)| DeviceInfo {
                    device: device.clone(),
                    first_seen_ms: d.first_seen,
                    last_seen_ms: d.last_seen,
                    acked_seq: d.acked_seq,
                    revoked_at_ms: d.revoked_at,
                    push: s.push.get(&(id, device.clone())).map(|r| DevicePush {
                        provider: r.provider.clone(),
                        refreshed_at_ms: r.refreshed_at,
                        last_success_ms: r.last_success,
                        last_error: r.last_error.clone(),
                    }),
                })
                .collect())
        })
    }

    async fn positions(&self, user: &str, conv: Option<ConvId>) -> Result<Positions, StoreError> {
        self.read(|s| {
            let id = s.user_id(user).ok_or_else(|| no_user(user))?;
            let devices = s
                .devices
                .range((id, String::new())..)
                .take_while(|((u, _), _)| *u == id)
                .filter(|(_, d)| d.revoked_at.is_none())
                .map(|((_, device), d)| DevicePosition {
                    device: device.clone(),
                    acked_seq: d.acked_seq,
                    conv_delivered_seq: conv.map(|c| s.conv_delivered(id, d.acked_seq, c)),
                })
                .collect();
            Ok(Positions {
                head: s.head(id),
                devices,
            })
        })
    }

    async fn create_api_key(&self, name: &str) -> Result<(i64, String), StoreError> {
        if name.is_empty() || name.len() > 128 {
            return Err(StoreError::refused(
                keepwire_proto::ErrorCode::Invalid,
                "an API key name is 1-128 bytes",
            ));
        }
        let key = self.random_secret("kwk_");
        let name = name.to_owned();
        self.write(move |s, w| {
            let id = s.api_keys.last().map_or(1, |k| k.id + 1);
            s.api_keys.push(ApiKey {
                id,
                name,
                hash: hash(&key),
                created_at: w.now_ms,
                revoked_at: None,
            });
            Ok((id, key))
        })
        .await
    }

    async fn check_api_key(&self, key: &str) -> Result<Option<i64>, StoreError> {
        if !key.starts_with("kwk_") || key.len() > 128 {
            return Ok(None);
        }
        let h = hash(key);
        self.read(|s| {
            Ok(s.api_keys
                .iter()
                .find(|k| k.hash == h && k.revoked_at.is_none())
                .map(|k| k.id))
        })
    }

    async fn list_api_keys(&self) -> Result<Vec<ApiKeyInfo>, StoreError> {
        self.read(|s| {
            Ok(s.api_keys
                .iter()
                .map(|k| ApiKeyInfo {
                    id: k.id,
                    name: k.name.clone(),
                    created_at_ms: k.created_at,
                    revoked_at_ms: k.revoked_at,
                })
                .collect())
        })
    }

    async fn revoke_api_key(&self, id: i64) -> Result<bool, StoreError> {
        self.write(move |s, w| {
            Ok(
                match s
                    .api_keys
                    .iter_mut()
                    .find(|k| k.id == id && k.revoked_at.is_none())
                {
                    Some(k) => {
                        k.revoked_at = Some(w.now_ms);
                        true
                    }
                    None => false,
                },
            )
        })
        .await
    }

    async fn issue_token(&self, user: &str, ttl: Duration) -> Result<IssuedToken, StoreError> {
        let token = self.random_secret("kw_");
        let name = user.to_owned();
        self.write(move |s, w| {
            let user = s.user_id(&name).ok_or_else(|| no_user(&name))?;
            let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
            let expires = w.now_ms.saturating_add(ttl_ms);
            let id = s.tokens.last().map_or(1, |t| t.id + 1);
            s.tokens.push(Token {
                id,
                user,
                hash: hash(&token),
                created_at: w.now_ms,
                expires_at: expires,
                revoked_at: None,
            });
            Ok(IssuedToken {
                token,
                id,
                expires_at_ms: expires,
            })
        })
        .await
    }

    async fn revoke(&self, target: RevokeTarget) -> Result<u64, StoreError> {
        self.write(move |s, w| {
            let next_rev = s.revocations.last().map_or(1, |r| r.id + 1);
            match target {
                RevokeTarget::Token(_) | RevokeTarget::Id(_) => {
                    let t = s
                        .tokens
                        .iter_mut()
                        .find(|t| match &target {
                            RevokeTarget::Token(secret) => t.hash == hash(secret),
                            RevokeTarget::Id(id) => t.id == *id,
                            RevokeTarget::User(_) => false,
                        })
                        .ok_or_else(|| StoreError::NotFound("no such token".into()))?;
                    if t.revoked_at.is_some() {
                        return Ok(0);
                    }
                    t.revoked_at = Some(w.now_ms);
                    let (user, token) = (t.user, t.id);
                    s.revocations.push(Revocation {
                        id: next_rev,
                        user_id: user,
                        token_id: Some(token),
                        device: None,
                    });
                    Ok(1)
                }
                RevokeTarget::User(name) => {
                    let user = s.user_id(&name).ok_or_else(|| no_user(&name))?;
                    let mut n = 0;
                    for t in s
                        .tokens
                        .iter_mut()
                        .filter(|t| t.user == user && t.revoked_at.is_none())
                    {
                        t.revoked_at = Some(w.now_ms);
                        n += 1;
                    }
                    s.revocations.push(Revocation {
                        id: next_rev,
                        user_id: user,
                        token_id: None,
                        device: None,
                    });
                    if let Some(u) = s.users.get_mut(&user) {
                        u.tokens_revoked_at = Some(w.now_ms);
                    }
                    Ok(n)
                }
            }
        })
        .await
    }

    async fn list_tokens(&self, user: &str) -> Result<Vec<TokenInfo>, StoreError> {
        self.read(|s| {
            let id = s.user_id(user).ok_or_else(|| no_user(user))?;
            Ok(s.tokens
                .iter()
                .filter(|t| t.user == id)
                .map(|t| TokenInfo {
                    id: t.id,
                    user: user.to_owned(),
                    created_at_ms: t.created_at,
                    expires_at_ms: t.expires_at,
                    revoked_at_ms: t.revoked_at,
                })
                .collect())
        })
    }

    async fn trim(&self) -> Result<TrimReport, StoreError> {
        let retention = self.retention;
        self.write(move |s, w| {
            let now = w.now_ms;
            s.push
                .retain(|_, r| r.refreshed_at >= now - super::push::STALE_AFTER_MS);
            Ok(s.trim(retention, now))
        })
        .await
    }
}
