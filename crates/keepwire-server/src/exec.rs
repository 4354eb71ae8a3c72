//! Carries out a session's [`StoreRequest`]s against the store, the hub's
//! tail and the authenticator. Shared by the tokio driver (`conn.rs`) and
//! the simulation, so both run the same store calls.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::auth::Authenticator;
use crate::hub::Hub;
use crate::session::{Outgoing, StoreAnswer, StoreRequest};
use crate::store::{Actor, Store, WallClock};

/// A store operation in flight.
pub type AnswerFuture = Pin<Box<dyn Future<Output = StoreAnswer> + Send>>;

/// The longest a connection lives on one token ("never" for a connection).
const MAX_TOKEN_LIFE: Duration = Duration::from_secs(365 * 24 * 3600);

/// Runs store requests for the sessions of one relay.
#[derive(Clone)]
pub struct Executor {
    store: Arc<dyn Store>,
    auth: Arc<Authenticator>,
    hub: Arc<Hub>,
    wall: Arc<dyn WallClock>,
    max_group_size: usize,
    on_push_registered: Option<Arc<dyn Fn(crate::store::UserId) + Send + Sync>>,
}

impl Executor {
    /// An executor over a relay's store, authenticator and hub.
    pub fn new(
        store: Arc<dyn Store>,
        auth: Arc<Authenticator>,
        hub: Arc<Hub>,
        wall: Arc<dyn WallClock>,
        max_group_size: usize,
    ) -> Self {
        Executor {
            store,
            auth,
            hub,
            wall,
            max_group_size,
            on_push_registered: None,
        }
    }

    /// Calls `f` with the user after a push registration was stored (the
    /// push engine starts watching the user's entries).
    pub fn on_push_registered(
        mut self,
        f: Arc<dyn Fn(crate::store::UserId) + Send + Sync>,
    ) -> Self {
        self.on_push_registered = Some(f);
        self
    }

    /// Starts a request. Inbox reads that the hub's tail holds are answered
    /// at once, from entries encoded once for every member.
    pub fn run(&self, req: StoreRequest) -> AnswerFuture {
        if let StoreRequest::ReadInbox { user, from, limit } = &req
            && let Some(entries) = self.hub.recent(*user, *from, *limit as usize)
        {
            let out = entries
                .into_iter()
                .map(|(seq, json)| Outgoing::Encoded(seq, json))
                .collect();
            return Box::pin(std::future::ready(StoreAnswer::Inbox(Ok(out))));
        }
        let this = self.clone();
        Box::pin(async move { this.execute(req).await })
    }

    async fn execute(self, req: StoreRequest) -> StoreAnswer {
        let s = &*self.store;
        let max = self.max_group_size;
        match req {
            StoreRequest::Authenticate { token, device } => {
                StoreAnswer::Auth(self.auth.authenticate(&token, &device).await.map(|u| {
                    let left = u.expires_at_ms.saturating_sub(self.wall.now_ms()).max(0) as u64;
                    let valid_for = Duration::from_millis(left).min(MAX_TOKEN_LIFE);
                    (u, valid_for)
                }))
            }
            StoreRequest::TouchDevice {
                user,
                device,
                token_id,
            } => StoreAnswer::Done(s.touch_device(user, &device, token_id).await),
            StoreRequest::Resume {
                user,
                cursor,
                window,
            } => StoreAnswer::Resume(s.resume(user, cursor.as_ref(), window).await),
            StoreRequest::ReadInbox { user, from, limit } => StoreAnswer::Inbox(
                s.read_inbox(user, from, limit as usize)
                    .await
                    .map(|e| e.into_iter().map(Outgoing::Entry).collect()),
            ),
            StoreRequest::Send { user, device, send } => {
                StoreAnswer::Confirm(s.send(Actor::User(user), &device, send).await)
            }
            StoreRequest::History {
                user,
                conv,
                before,
                limit,
            } => StoreAnswer::History(s.history(Actor::User(user), conv, before, limit).await),
            StoreRequest::ConvCreate { user, req } => {
                StoreAnswer::Conv(s.conv_create(Actor::User(user), req, max).await)
            }
            StoreRequest::ConvMember {
                user,
                conv,
                target,
                add,
            } => StoreAnswer::Conv(
                s.conv_member(Actor::User(user), conv, &target, add, max)
                    .await,
            ),
            StoreRequest::ConvList { user } => StoreAnswer::Convs(s.conv_list(user).await),
            StoreRequest::MarkRead { user, conv, up_to } => {
                StoreAnswer::Done(s.mark_read(user, conv, up_to).await.map(|_| ()))
            }
            StoreRequest::ConvMembers { user, conv } => {
                StoreAnswer::Members(s.conv_member_ids(user, conv).await)
            }
            StoreRequest::SetPush { user, device, push } => {
                let r = s.set_push(user, &device, push).await;
                if let (Ok(Some(_)), Some(f)) = (&r, &self.on_push_registered) {
                    f(user);
                }
                StoreAnswer::Push(r)
            }
            StoreRequest::Mute { user, conv, muted } => {
                StoreAnswer::Muted(s.mute(user, conv, muted).await)
            }
            StoreRequest::RecordAck { user, device, seq } => {
                StoreAnswer::Done(s.record_ack(user, &device, seq).await)
            }
        }
    }
}
