//! Push wake-ups: *when* to wake a device that is not connected (this
//! module); *how* is `keepwire-push`'s dispatcher (FCM, APNs, Web Push).
//!
//! The engine hangs off the store's head notices (a [`HeadListener`] in
//! front of the hub), so it does not depend on how inboxes are stored. For
//! each user with a registration it asks the store where the user's devices
//! stand ([`RelayStore::push_targets`]: the newest entry that wakes each
//! one — another user's message in a conversation not muted — and what was
//! pushed) and the hub whether a device is connected and alive. A device
//! gets a push when such an entry is past its acknowledged position and it
//! either has no connection or its connection has sent nothing for
//! `frozen_after` (an iOS app frozen in the background keeps its socket
//! open). At most one push is outstanding per device: an acknowledgement of
//! the pushed position, or a new handshake, clears it; otherwise it is sent
//! again after `rearm`, doubling up to `rearm_max`, so a push the provider
//! lost cannot silence a device for good.
//!
//! Durability: the position a push is for is recorded in the store before
//! the provider is called, and what the provider did after. A relay that
//! restarts looks at every registration: a wake-up that was due but never
//! recorded is sent, and one recorded whose delivery is unknown is sent
//! again (at most one duplicate; the client's notification claims make it
//! harmless).
//!
//! Previews: a wake-up carries nothing but the registration id, unless the
//! operator allows previews (`previews = true` in the push configuration),
//! the device asked for them (`push_register.previews`, the user's
//! preference) and its registration has RFC 8291 keys. Then it also carries
//! the waking message (id, conversation, sender, kind, the text cut to
//! [`PREVIEW_CHARS`] characters) as JSON, encrypted to those keys by
//! `keepwire-push`: the provider sees ciphertext only. A device that cannot
//! sync in time shows it instead of a bare "new message".

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use keepwire_proto::{EntryItem, PushInfo, Seq};
use keepwire_push::{
    Dispatcher, Message, Outcome, PushConfig, PushJob, Registration, RegistrationId, Report,
    VapidKey,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::hub::Hub;
use crate::session::PushPolicy;
use crate::store::{
    HeadAdvance, HeadListener, NewPush, OriginKind, PushOutcome, PushTarget, Store, StoreError,
    UserId, WallClock,
};

const TARGET: &str = "keepwire::push";

/// The most characters of a message's text a preview carries (the
/// providers' 4 KB payload limits leave room for this after encryption and
/// base64, with the registration id and the padding).
pub const PREVIEW_CHARS: usize = 512;

/// When to push.
#[derive(Debug, Clone, Copy)]
pub struct PushSettings {
    /// A connection silent this long while an entry waits is frozen.
    pub frozen_after: Duration,
    /// An unanswered push is sent again after this...
    pub rearm: Duration,
    /// ...doubling up to this.
    pub rearm_max: Duration,
    /// Test-only: end the process at this point of the push path, as a
    /// `kill -9` would (the end-to-end tests' crash points).
    #[doc(hidden)]
    pub failpoint: Option<PushFailpoint>,
}

/// Where the push path can be made to crash, for the end-to-end tests that
/// show a relay killed around a provider call loses no wake-up.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushFailpoint {
    /// After the push is recorded, before the provider hears of it.
    BeforeCall,
    /// After the provider's 2xx, before the outcome is recorded.
    AfterDelivered,
}

impl PushFailpoint {
    /// Crashes here if `at` is this point.
    fn hit(at: Option<PushFailpoint>, here: PushFailpoint) {
        if at == Some(here) {
            eprintln!("keepwire: push failpoint {here:?}: aborting");
            std::process::abort();
        }
    }
}

impl Default for PushSettings {
    fn default() -> Self {
        PushSettings {
            frozen_after: Duration::from_secs(5),
            rearm: Duration::from_secs(600),
            rearm_max: Duration::from_secs(6 * 3600),
            failpoint: None,
        }
    }
}

/// The relay's push: registration checks for sessions and the API, and the
/// engine's notices.
pub struct Push {
    config: PushConfig,
    dispatcher: Dispatcher,
    vapid: Option<String>,
    registered: Mutex<HashSet<UserId>>,
    notices: mpsc::Sender<Notice>,
}

#[derive(Debug, Clone, Copy)]
enum Notice {
    /// Entries landed for this user (a message, or a read marker).
    Entries(UserId, OriginKind),
    /// A registration was set for this user.
    Registered(UserId),
}

/// Why push could not start.
#[derive(Debug, thiserror::Error)]
pub enum PushStartError {
    /// The configuration file.
    #[error(transparent)]
    Config(#[from] keepwire_push::ConfigError),
    /// The dispatcher.
    #[error(transparent)]
    Start(#[from] keepwire_push::StartError),
    /// The store (the VAPID key).
    #[error("the push key in the store: {0}")]
    Store(#[from] StoreError),
    /// A stored VAPID key that does not parse.
    #[error("the stored VAPID key is not usable: {0}")]
    Vapid(String),
}

impl Push {
    /// Starts the dispatcher and the engine (inside a tokio runtime). The
    /// VAPID key pair is made once and kept in the store.
    pub async fn start(
        config: PushConfig,
        settings: PushSettings,
        store: Arc<dyn Store>,
        hub: Arc<Hub>,
        wall: Arc<dyn WallClock>,
        metrics: &crate::Metrics,
        shutdown: CancellationToken,
    ) -> Result<Arc<Push>, PushStartError> {
        let mut builder = Dispatcher::builder(config.clone());
        let mut vapid = None;
        if config.webpush.is_some() {
            let fresh =
                base64::engine::general_purpose::STANDARD.encode(VapidKey::generate().to_bytes());
            let stored = store.meta_or_init("vapid_key", &fresh).await?;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(stored)
                .map_err(|e| PushStartError::Vapid(e.to_string()))?;
            let key =
                VapidKey::from_bytes(&bytes).map_err(|e| PushStartError::Vapid(e.to_string()))?;
            vapid = Some(key.public_key_base64());
            builder = builder.vapid(key);
        }
        let mut registry = prometheus_client::registry::Registry::with_prefix("keepwire");
        let (dispatcher, reports) = builder.start(Some(&mut registry))?;
        metrics.attach(registry);
        let (tx, rx) = mpsc::channel(64 * 1024);
        let push = Arc::new(Push {
            config,
            dispatcher: dispatcher.clone(),
            vapid,
            registered: Mutex::new(store.push_users().await?.into_iter().collect()),
            notices: tx,
        });
        let engine = Engine {
            push: push.clone(),
            store,
            hub,
            wall,
            settings,
            in_flight: HashMap::new(),
            sent: HashSet::new(),
            timers: BTreeMap::new(),
            next_job: 1,
        };
        tokio::spawn(engine.run(rx, reports, shutdown));
        Ok(push)
    }

    /// The dispatcher (the API's Web Push probe, `GET /v1/push/vapid`).
    pub fn dispatcher(&self) -> &Dispatcher {
        &self.dispatcher
    }

    /// The relay's VAPID public key, when Web Push is configured.
    pub fn vapid_public_key(&self) -> Option<&str> {
        self.vapid.as_deref()
    }

    /// A registration was stored for `user`: start watching their entries.
    pub fn registered(&self, user: UserId) {
        self.registered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(user);
        let _ = self.notices.try_send(Notice::Registered(user));
    }

    /// The head listener to give the store: the hub first, then push.
    pub fn listener(self: &Arc<Self>, hub: Arc<Hub>) -> Arc<dyn HeadListener> {
        Arc::new(PushListener {
            hub,
            push: self.clone(),
        })
    }
}

impl PushPolicy for Push {
    fn check(&self, registration: &serde_json::Value, previews: bool) -> Result<NewPush, String> {
        let reg: Registration = serde_json::from_value(registration.clone())
            .map_err(|e| format!("not a push registration: {e}"))?;
        self.dispatcher
            .check_registration(&reg)
            .map_err(|e| e.to_string())?;
        Ok(NewPush {
            provider: reg.provider().as_str().to_owned(),
            key: reg.key().0.to_vec(),
            registration: serde_json::to_string(&reg).map_err(|e| e.to_string())?,
            previews: previews && self.config.previews,
        })
    }

    fn info(&self) -> PushInfo {
        let mut providers = Vec::new();
        if self.config.fcm.is_some() {
            providers.push("fcm".to_owned());
        }
        if self.config.apns.is_some() {
            providers.push("apns".to_owned());
        }
        if self.config.webpush.is_some() {
            providers.push("webpush".to_owned());
        }
        PushInfo {
            providers,
            vapid: self.vapid.clone(),
        }
    }
}

/// The store's head listener: the hub, then the push engine's notices.
struct PushListener {
    hub: Arc<Hub>,
    push: Arc<Push>,
}

impl HeadListener for PushListener {
    fn heads_advanced(&self, heads: &[HeadAdvance]) {
        self.hub.heads_advanced(heads);
        let registered = self
            .push
            .registered
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut told: Vec<(UserId, OriginKind)> = Vec::new();
        for h in heads {
            let Some(o) = h.origin else { continue };
            // Own messages wake nobody (the store checks it too).
            let wakes = match o.kind {
                OriginKind::Message => o.sender != h.user,
                OriginKind::Read => true,
            };
            if wakes && registered.contains(&h.user) && !told.contains(&(h.user, o.kind)) {
                told.push((h.user, o.kind));
            }
        }
        drop(registered);
        for (user, kind) in told {
            if self
                .push
                .notices
                .try_send(Notice::Entries(user, kind))
                .is_err()
            {
                tracing::warn!(target: TARGET, user, "push notices are behind: a device may wait for the rearm");
            }
        }
    }
}

/// A push enqueued and not reported yet.
struct InFlight {
    reg_id: String,
    user: UserId,
    seq: Seq,
}

struct Engine {
    push: Arc<Push>,
    store: Arc<dyn Store>,
    hub: Arc<Hub>,
    wall: Arc<dyn WallClock>,
    settings: PushSettings,
    in_flight: HashMap<u64, InFlight>,
    /// Registrations pushed by this process (a restart resends those whose
    /// delivery is unknown, once).
    sent: HashSet<String>,
    /// Users to look at again, by wall time (ms).
    timers: BTreeMap<i64, HashSet<UserId>>,
    next_job: u64,
}

impl Engine {
    async fn run(
        mut self,
        mut notices: mpsc::Receiver<Notice>,
        mut reports: mpsc::Receiver<Report>,
        shutdown: CancellationToken,
    ) {
        // After a restart: whatever is still due.
        match self.store.push_users().await {
            Ok(users) => {
                for u in users {
                    self.evaluate(u, OriginKind::Message).await;
                }
            }
            Err(e) => {
                tracing::error!(target: TARGET, error = %e, "reading push registrations failed")
            }
        }
        loop {
            let next_timer = self.timers.keys().next().copied();
            let sleep = next_timer
                .map(|t| Duration::from_millis(t.saturating_sub(self.wall.now_ms()).max(0) as u64));
            tokio::select! {
                _ = shutdown.cancelled() => break,
                n = notices.recv() => match n {
                    Some(first) => {
                        let mut batch = vec![first];
                        while let Ok(n) = notices.try_recv() {
                            batch.push(n);
                        }
                        let mut seen = HashSet::new();
                        for n in batch {
                            let (user, kind) = match n {
                                Notice::Entries(u, k) => (u, k),
                                Notice::Registered(u) => (u, OriginKind::Message),
                            };
                            if seen.insert((user, kind == OriginKind::Read)) {
                                self.evaluate(user, kind).await;
                            }
                        }
                    }
                    None => break,
                },
                r = reports.recv() => match r {
                    Some(r) => self.report(r).await,
                    None => break,
                },
                _ = tokio::time::sleep(sleep.unwrap_or(Duration::from_secs(3600))), if sleep.is_some() => {
                    let now = self.wall.now_ms();
                    let due: Vec<i64> = self.timers.range(..=now).map(|(t, _)| *t).collect();
                    let mut users = HashSet::new();
                    for t in due {
                        users.extend(self.timers.remove(&t).unwrap_or_default());
                    }
                    for u in users {
                        self.evaluate(u, OriginKind::Message).await;
                    }
                }
            }
        }
        self.push.dispatcher.shutdown(Duration::from_secs(2)).await;
    }

    /// How long an unanswered push waits before it is sent again, after
    /// `attempts` sends for the same position: `rearm`, doubling, capped.
    fn rearm_after(&self, attempts: u32) -> Duration {
        let shift = attempts.saturating_sub(1).min(16);
        self.settings
            .rearm
            .saturating_mul(1 << shift)
            .min(self.settings.rearm_max)
    }

    fn timer(&mut self, at_ms: i64, user: UserId) {
        self.timers.entry(at_ms).or_default().insert(user);
    }

    /// Looks at `user`'s registered devices and pushes what is due.
    async fn evaluate(&mut self, user: UserId, kind: OriginKind) {
        let targets = match self.store.push_targets(user).await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(target: TARGET, error = %e, user, "reading push targets failed; retrying in a second");
                let at = self.wall.now_ms() + 1000;
                self.timer(at, user);
                return;
            }
        };
        for t in targets {
            if kind == OriginKind::Read {
                self.clear(user, &t).await;
            } else {
                self.wake(user, &t).await;
            }
        }
    }

    async fn wake(&mut self, user: UserId, t: &PushTarget) {
        let now = self.wall.now_ms();
        let frozen_after = self.settings.frozen_after.as_millis() as i64;
        let live = self.hub.device_activity(user, &t.device);
        let acked = t.acked_seq.max(live.map_or(0, |l| l.acked));
        let Some(wake) = t.wake_seq.filter(|&w| w > acked) else {
            return;
        };
        if let Some(l) = live
            && now - l.last_frame_ms < frozen_after
        {
            // Connected and alive: it gets the entry over its socket. Look
            // again when it would count as frozen.
            self.timer(l.last_frame_ms + frozen_after, user);
            return;
        }
        // An outstanding push is cleared by an ack of its position or a
        // handshake since.
        let cleared = t.pushed_seq <= acked
            || live.is_some_and(|l| t.pushed_at_ms.is_some_and(|p| l.opened_ms > p));
        if !cleared {
            if self.in_flight.values().any(|f| f.reg_id == t.reg_id) {
                return;
            }
            let unknown = t.delivered_seq < t.pushed_seq && !self.sent.contains(&t.reg_id);
            if !unknown {
                let wait = self.rearm_after(t.attempts);
                let due = t.pushed_at_ms.unwrap_or(now) + wait.as_millis() as i64;
                if now < due {
                    self.timer(due, user);
                    return;
                }
            }
        }
        let preview = if t.previews && self.push.config.previews {
            self.preview(user, wake).await
        } else {
            None
        };
        self.send(user, t, wake, move |id| match preview {
            Some(p) => Message::wake(id).with_preview(p),
            None => Message::wake(id),
        })
        .await;
    }

    /// The preview of inbox entry `seq` of `user` (a message: see the module
    /// docs), as JSON; `None` for anything else or when it cannot be read
    /// (the push goes without it).
    async fn preview(&self, user: UserId, seq: Seq) -> Option<String> {
        let entries = match self.store.read_inbox(user, seq, 1).await {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(target: TARGET, error = %e, "reading a preview failed; the push goes without it");
                return None;
            }
        };
        let entry = entries.into_iter().next().filter(|e| e.seq == seq)?;
        let EntryItem::Message(m) = entry.item else {
            return None;
        };
        let body: String = m.body.chars().take(PREVIEW_CHARS).collect();
        let v = serde_json::json!({
            "id": m.id, "conv": m.conv, "conv_seq": m.conv_seq, "from": m.from,
            "kind": m.kind, "body": body, "ts": m.ts,
        });
        Some(v.to_string())
    }

    /// A read marker: devices that may show a notification are told to
    /// clear it (low priority, unrecorded).
    async fn clear(&mut self, user: UserId, t: &PushTarget) {
        let live = self.hub.device_activity(user, &t.device);
        let now = self.wall.now_ms();
        let alive = live
            .is_some_and(|l| now - l.last_frame_ms < self.settings.frozen_after.as_millis() as i64);
        if alive || t.delivered_seq <= t.acked_seq {
            return;
        }
        let Some((registration, id)) = parse(t) else {
            return;
        };
        let job = PushJob {
            id: self.job_id(),
            registration,
            message: Message::clear(id),
        };
        let _ = self.push.dispatcher.enqueue(job);
    }

    fn job_id(&mut self) -> u64 {
        self.next_job += 1;
        self.next_job
    }

    async fn send(
        &mut self,
        user: UserId,
        t: &PushTarget,
        seq: Seq,
        make: impl FnOnce(RegistrationId) -> Message,
    ) {
        let Some((registration, id)) = parse(t) else {
            return;
        };
        // Durable before the provider hears of it.
        if let Err(e) = self.store.record_push(&t.reg_id, seq).await {
            tracing::warn!(target: TARGET, error = %e, "recording a push failed; retrying in a second");
            let at = self.wall.now_ms() + 1000;
            self.timer(at, user);
            return;
        }
        PushFailpoint::hit(self.settings.failpoint, PushFailpoint::BeforeCall);
        let job_id = self.job_id();
        let job = PushJob {
            id: job_id,
            registration,
            message: make(id),
        };
        match self.push.dispatcher.enqueue(job) {
            Ok(()) => {
                // Look again when it is due to be sent again, if unanswered.
                let attempts = if t.pushed_seq == seq {
                    t.attempts + 1
                } else {
                    1
                };
                let at = self.wall.now_ms() + self.rearm_after(attempts).as_millis() as i64;
                self.timer(at, user);
                self.sent.insert(t.reg_id.clone());
                self.in_flight.insert(
                    job_id,
                    InFlight {
                        reg_id: t.reg_id.clone(),
                        user,
                        seq,
                    },
                );
            }
            Err(e) => {
                tracing::warn!(target: TARGET, error = %e, "a push could not be queued; retrying in a second");
                let at = self.wall.now_ms() + 1000;
                self.timer(at, user);
            }
        }
    }

    async fn report(&mut self, r: Report) {
        let Some(f) = self.in_flight.remove(&r.id) else {
            return;
        };
        let outcome = match r.outcome {
            Outcome::Delivered { .. } => {
                PushFailpoint::hit(self.settings.failpoint, PushFailpoint::AfterDelivered);
                PushOutcome::Delivered(f.seq)
            }
            Outcome::Unregistered { reason } => {
                tracing::info!(target: TARGET, registration = %r.registration, %reason, "registration dropped");
                PushOutcome::Unregistered(reason)
            }
            Outcome::ConfigError { reason } => {
                tracing::error!(target: TARGET, provider = %r.provider, %reason, "push configuration error: check the push configuration");
                PushOutcome::Failed(reason)
            }
            Outcome::Rejected { reason } | Outcome::GaveUp { reason, .. } => {
                tracing::warn!(target: TARGET, provider = %r.provider, %reason, "push failed");
                PushOutcome::Failed(reason)
            }
            Outcome::Abandoned => return,
            _ => return,
        };
        let failed = matches!(outcome, PushOutcome::Failed(_));
        if let Err(e) = self.store.push_outcome(&f.reg_id, outcome).await {
            tracing::warn!(target: TARGET, error = %e, "recording a push outcome failed");
        }
        if failed {
            // Keep trying at the rearm pace.
            let at = self.wall.now_ms() + self.settings.rearm.as_millis() as i64;
            self.timer(at, f.user);
        }
    }
}

/// The stored registration, and the id its pushes carry.
fn parse(t: &PushTarget) -> Option<(Registration, RegistrationId)> {
    let reg: Registration = match serde_json::from_str(&t.registration) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(target: TARGET, error = %e, "a stored push registration does not parse");
            return None;
        }
    };
    let id = RegistrationId::new(t.reg_id.clone()).ok()?;
    Some((reg, id))
}
