//! An in-memory store: the same contract as SQLite, without a disk.
//!
//! For tests, and for the simulation, which runs real relay sessions on it in
//! virtual time. Its data lives in a [`MemoryDisk`] that outlives any one
//! store handle: [`MemoryStore::reopen`] is a relay restart on the same data.
//!
//! Writes are applied one at a time under a lock, and the head listener is
//! told inside that lock, so heads arrive in commit order. In **manual
//! commit** mode ([`MemoryOptions::manual_commit`]) writes wait in a queue
//! until the owner calls [`MemoryStore::commit`], which applies a prefix of
//! the queue as one group commit and can crash at any point of it: the
//! simulation decides which writes share a commit and when they are answered.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use keepwire_proto::{
    Confirm, ConvCreate, ConvId, ConvInfo, Cursor, HistoryPage, InboxEntry, Send as SendMsg, Seq,
};
use sha2::{Digest as _, Sha256};
use tokio::sync::oneshot;

use super::{
    Actor, AuthFailure, AuthedUser, HeadAdvance, HeadListener, RelayStore, ResumePlan, Retention,
    Revocation, StoreError, SystemClock, UserId, WallClock,
};
use state::{State, WriteCtx};

mod admin;
mod conversations;
mod push;
mod state;

/// Options for [`MemoryStore::new`].
#[derive(Clone)]
pub struct MemoryOptions {
    /// Retention policy.
    pub retention: Retention,
    /// The wall clock for entry times and token expiry.
    pub clock: Arc<dyn WallClock>,
    /// Seeds the epoch and the tokens and keys the store makes.
    pub seed: u64,
    /// Writes wait for [`MemoryStore::commit`] instead of applying at once.
    pub manual_commit: bool,
    /// A deliberate bug, to prove the simulation and the contract suite
    /// catch it.
    #[cfg(any(test, feature = "testing"))]
    pub sabotage: Option<Sabotage>,
}

/// Deliberate bugs the memory store can be built with (tests only): each
/// breaks one guarantee, and the simulation must notice.
#[cfg(any(test, feature = "testing"))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sabotage {
    /// Now and then an inbox sequence is skipped.
    SkipSequence,
    /// Writes are answered before they are committed.
    AnswerBeforeCommit,
    /// A repeated `(user, device, cid)` is stored again.
    DoubleStore,
    /// The hub's tail hands out entry N+1 before N.
    TailOutOfOrder,
    /// A removed member loses the messages it had.
    RemovedMemberLosesMessages,
}

#[cfg(any(test, feature = "testing"))]
impl Sabotage {
    /// Every sabotage.
    pub const ALL: [Sabotage; 5] = [
        Sabotage::SkipSequence,
        Sabotage::AnswerBeforeCommit,
        Sabotage::DoubleStore,
        Sabotage::TailOutOfOrder,
        Sabotage::RemovedMemberLosesMessages,
    ];
}

impl Default for MemoryOptions {
    fn default() -> Self {
        MemoryOptions {
            retention: Retention::default(),
            clock: Arc::new(SystemClock),
            seed: 0x6b77_6d65_6d6f_7279,
            manual_commit: false,
            #[cfg(any(test, feature = "testing"))]
            sabotage: None,
        }
    }
}

/// Where in a group commit a simulated crash lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// Nothing of the group is stored.
    BeforeCommit,
    /// The group is stored; no head listener call, no answers.
    AfterCommit,
    /// The group is stored and the listener told; no answers.
    AfterHeads,
}

/// The data of a memory store: what survives a [`MemoryStore::reopen`].
#[derive(Default)]
pub struct MemoryDisk {
    state: Mutex<Disk>,
}

#[derive(Clone, Default)]
struct Disk {
    state: State,
    epoch: String,
}

/// A copy of a memory store's data at one moment (a backup).
#[derive(Clone)]
pub struct MemorySnapshot(Disk);

type Job = Box<dyn FnOnce(&mut State, &mut WriteCtx<'_>) -> Box<dyn FnOnce() + Send> + Send>;

/// The in-memory store. Cheap to share behind an `Arc`.
pub struct MemoryStore {
    disk: Arc<MemoryDisk>,
    retention: Retention,
    clock: Arc<dyn WallClock>,
    listener: OnceLock<Arc<dyn HeadListener>>,
    manual: bool,
    queue: Mutex<VecDeque<Job>>,
    closed: AtomicBool,
    rng: AtomicU64,
    #[cfg(any(test, feature = "testing"))]
    sabotage: Option<Sabotage>,
    /// With [`Sabotage::AnswerBeforeCommit`]: the last committed data.
    #[cfg(any(test, feature = "testing"))]
    committed: Mutex<Option<Disk>>,
}

impl MemoryStore {
    /// A new, empty store.
    pub fn new(opts: MemoryOptions) -> Arc<MemoryStore> {
        let disk = Arc::new(MemoryDisk::default());
        let epoch = format!("{:016x}", splitmix(opts.seed ^ 0x6570_6f63_6821_0000));
        disk.state.lock().unwrap_or_else(|p| p.into_inner()).epoch = epoch;
        Self::on_disk(disk, opts)
    }

    /// A store handle over existing data (a relay starting on it).
    pub fn on_disk(disk: Arc<MemoryDisk>, opts: MemoryOptions) -> Arc<MemoryStore> {
        Arc::new(MemoryStore {
            disk,
            retention: opts.retention,
            clock: opts.clock,
            listener: OnceLock::new(),
            manual: opts.manual_commit,
            queue: Mutex::new(VecDeque::new()),
            closed: AtomicBool::new(false),
            rng: AtomicU64::new(opts.seed),
            #[cfg(any(test, feature = "testing"))]
            sabotage: opts.sabotage,
            #[cfg(any(test, feature = "testing"))]
            committed: Mutex::new(None),
        })
    }

    /// The data, to open another handle on it after a crash.
    pub fn disk(&self) -> Arc<MemoryDisk> {
        self.disk.clone()
    }

    /// Closes this handle at once (queued writes are lost, as in a crash) and
    /// opens a new one on the same data.
    pub fn reopen(&self, opts: MemoryOptions) -> Arc<MemoryStore> {
        self.crash();
        Self::on_disk(self.disk.clone(), opts)
    }

    /// Stops this handle as a crash would: queued writes are dropped
    /// unanswered, later calls fail.
    pub fn crash(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).clear();
        #[cfg(any(test, feature = "testing"))]
        if let Some(d) = self
            .committed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            *self.lock() = d;
        }
    }

    /// A copy of the data (a backup).
    pub fn snapshot(&self) -> MemorySnapshot {
        MemorySnapshot(self.lock().clone())
    }

    /// Puts a backup back, with a new epoch (as `keepwire admin restore`
    /// does); returns the new epoch. Open a new handle afterwards.
    pub fn restore(disk: &MemoryDisk, snapshot: MemorySnapshot, seed: u64) -> String {
        let mut d = snapshot.0;
        d.epoch = format!("{:016x}", splitmix(seed ^ 0x0072_6573_746f_7265));
        let epoch = d.epoch.clone();
        *disk.state.lock().unwrap_or_else(|p| p.into_inner()) = d;
        epoch
    }

    /// Writes waiting for [`MemoryStore::commit`] (manual commit mode).
    pub fn pending_writes(&self) -> usize {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Commits the first `n` queued writes as one group, or crashes at
    /// `crash` (then this handle is closed). Returns how many were taken.
    pub fn commit(&self, n: usize, crash: Option<CrashPoint>) -> usize {
        let jobs: Vec<Job> = {
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            let n = n.min(q.len());
            q.drain(..n).collect()
        };
        let taken = jobs.len();
        #[cfg(any(test, feature = "testing"))]
        if self.sabotage == Some(Sabotage::AnswerBeforeCommit) && crash.is_none() {
            let snapshot = self.lock().clone();
            *self.committed.lock().unwrap_or_else(|p| p.into_inner()) = Some(snapshot);
        }
        if crash == Some(CrashPoint::BeforeCommit) {
            drop(jobs);
            self.crash();
            return taken;
        }
        let answers = {
            let mut d = self.lock();
            let mut heads = Vec::new();
            let answers: Vec<_> = jobs
                .into_iter()
                .map(|job| {
                    let mut w = WriteCtx {
                        now_ms: self.clock.now_ms(),
                        retention: self.retention,
                        heads: &mut heads,
                        #[cfg(any(test, feature = "testing"))]
                        sabotage: self.sabotage,
                    };
                    job(&mut d.state, &mut w)
                })
                .collect();
            if crash == Some(CrashPoint::AfterCommit) {
                drop(d);
                self.crash();
                return taken;
            }
            self.tell(&heads);
            answers
        };
        if crash == Some(CrashPoint::AfterHeads) {
            self.crash();
            return taken;
        }
        for a in answers {
            a();
        }
        taken
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Disk> {
        self.disk.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check_open(&self) -> Result<(), StoreError> {
        if self.closed.load(Ordering::SeqCst) {
            Err(StoreError::closed())
        } else {
            Ok(())
        }
    }

    fn tell(&self, heads: &[HeadAdvance]) {
        if !heads.is_empty()
            && let Some(l) = self.listener.get()
        {
            l.heads_advanced(heads);
        }
    }

    fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    fn random_secret(&self, prefix: &str) -> String {
        use base64::Engine as _;
        let mut b = [0u8; 32];
        for chunk in b.chunks_mut(8) {
            let x = splitmix(self.rng.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed));
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        format!(
            "{prefix}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
        )
    }

    /// Reads the committed state.
    fn read<R>(&self, f: impl FnOnce(&State) -> Result<R, StoreError>) -> Result<R, StoreError> {
        self.check_open()?;
        f(&self.lock().state)
    }

    /// Applies a write: at once, or in the next [`MemoryStore::commit`].
    async fn write<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut State, &mut WriteCtx<'_>) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        self.check_open()?;
        if !self.manual {
            let mut d = self.lock();
            let mut heads = Vec::new();
            let mut w = WriteCtx {
                now_ms: self.now_ms(),
                retention: self.retention,
                heads: &mut heads,
                #[cfg(any(test, feature = "testing"))]
                sabotage: self.sabotage,
            };
            let r = f(&mut d.state, &mut w);
            self.tell(&heads);
            return r;
        }
        #[cfg(any(test, feature = "testing"))]
        if self.sabotage == Some(Sabotage::AnswerBeforeCommit) {
            // Applied and answered now; durable only at the next commit (a
            // crash before it reverts to the last committed state).
            let mut d = self.lock();
            let mut heads = Vec::new();
            let mut w = WriteCtx {
                now_ms: self.now_ms(),
                retention: self.retention,
                heads: &mut heads,
                sabotage: self.sabotage,
            };
            let r = f(&mut d.state, &mut w);
            self.tell(&heads);
            drop(d);
            let marker: Job = Box::new(|_, _| Box::new(|| {}));
            self.queue
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push_back(marker);
            return r;
        }
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |state, w| {
            let r = f(state, w);
            Box::new(move || {
                let _ = tx.send(r);
            })
        });
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(job);
        rx.await.map_err(|_| StoreError::closed())?
    }
}

pub(super) fn hash(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

pub(super) fn no_user(name: &str) -> StoreError {
    StoreError::NotFound(format!("no user named {name:?}"))
}

#[async_trait::async_trait]
impl RelayStore for MemoryStore {
    fn epoch(&self) -> String {
        self.lock().epoch.clone()
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
        let h = hash(token);
        let now = self.now_ms();
        self.read(|s| {
            let t = s
                .tokens
                .iter()
                .find(|t| t.hash == h)
                .ok_or(StoreError::Auth(AuthFailure::Unknown))?;
            if t.revoked_at.is_some() {
                return Err(StoreError::Auth(AuthFailure::Revoked));
            }
            if t.expires_at <= now {
                return Err(StoreError::Auth(AuthFailure::Expired));
            }
            Ok(AuthedUser {
                id: t.user,
                name: s.user_name(t.user),
                token_id: Some(t.id),
                expires_at_ms: t.expires_at,
            })
        })
    }

    async fn authenticate_external(
        &self,
        name: &str,
        issued_at_ms: Option<i64>,
    ) -> Result<UserId, StoreError> {
        if !keepwire_proto::is_valid_user_name(name) {
            return Err(StoreError::Auth(AuthFailure::Unknown));
        }
        let known = self.read(|s| {
            Ok(s.user_id(name)
                .map(|id| (id, s.users[&id].tokens_revoked_at)))
        })?;
        let (id, revoked_at) = match known {
            Some(k) => k,
            None => {
                let name = name.to_owned();
                let id = self
                    .write(move |s, _| {
                        Ok(match s.user_id(&name) {
                            Some(id) => id,
                            None => s.insert_user(&name),
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
        self.read(|s| {
            Ok(s.devices
                .get(&(user, device.to_owned()))
                .is_some_and(|d| d.revoked_at.is_some()))
        })
    }

    async fn touch_device(
        &self,
        user: UserId,
        device: &str,
        token_id: Option<i64>,
    ) -> Result<(), StoreError> {
        let device = device.to_owned();
        self.write(move |s, w| {
            s.touch_device(user, &device, token_id, w.now_ms);
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
        self.check_open()?;
        let d = self.lock();
        Ok(d.state.plan_resume(&d.epoch, user, cursor, new_window))
    }

    async fn read_inbox(
        &self,
        user: UserId,
        from: Seq,
        limit: usize,
    ) -> Result<Vec<InboxEntry>, StoreError> {
        self.read(|s| s.read_inbox(user, from, limit))
    }

    async fn inbox_head(&self, user: UserId) -> Result<Seq, StoreError> {
        self.read(|s| Ok(s.head(user)))
    }

    async fn send(&self, actor: Actor, device: &str, send: SendMsg) -> Result<Confirm, StoreError> {
        let device = device.to_owned();
        self.write(move |s, w| s.send(w, actor, &device, send))
            .await
    }

    async fn record_ack(&self, user: UserId, device: &str, seq: Seq) -> Result<(), StoreError> {
        let device = device.to_owned();
        self.write(move |s, w| {
            s.record_ack(user, &device, seq, w.now_ms);
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
        self.read(|s| s.history(actor, conv, before, limit))
    }

    async fn conv_create(
        &self,
        actor: Actor,
        req: ConvCreate,
        max_group_size: usize,
    ) -> Result<(ConvInfo, bool), StoreError> {
        self.write(move |s, w| s.conv_create(w, actor, req, max_group_size))
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
        self.write(move |s, w| s.conv_member(w, actor, conv, &target, add, max_group_size))
            .await
    }

    async fn conv_list(&self, user: UserId) -> Result<Vec<ConvInfo>, StoreError> {
        self.read(|s| Ok(s.conv_list(user)))
    }

    async fn conv_member_ids(&self, user: UserId, conv: ConvId) -> Result<Vec<UserId>, StoreError> {
        self.read(|s| s.conv_member_ids(user, conv))
    }

    async fn mark_read(&self, user: UserId, conv: ConvId, up_to: u64) -> Result<bool, StoreError> {
        self.write(move |s, w| s.mark_read(w, user, conv, up_to))
            .await
    }

    async fn revocations_after(&self, after: i64) -> Result<Vec<Revocation>, StoreError> {
        self.read(|s| {
            Ok(s.revocations
                .iter()
                .filter(|r| r.id > after)
                .take(1000)
                .cloned()
                .collect())
        })
    }

    async fn set_push(
        &self,
        user: UserId,
        device: &str,
        push: Option<crate::store::NewPush>,
    ) -> Result<Option<String>, StoreError> {
        let device = device.to_owned();
        let new_id = self.random_secret("r_");
        self.write(move |s, w| Ok(s.set_push(w.now_ms, new_id, user, &device, push)))
            .await
    }

    async fn mute(&self, user: UserId, conv: ConvId, muted: bool) -> Result<bool, StoreError> {
        self.write(move |s, w| s.mute(w, user, conv, muted)).await
    }

    async fn push_targets(
        &self,
        user: UserId,
    ) -> Result<Vec<crate::store::PushTarget>, StoreError> {
        self.read(|s| Ok(s.push_targets(user)))
    }

    async fn push_users(&self) -> Result<Vec<UserId>, StoreError> {
        self.read(|s| {
            let mut users: Vec<UserId> = s.push.keys().map(|(u, _)| *u).collect();
            users.dedup();
            Ok(users)
        })
    }

    async fn record_push(&self, reg_id: &str, seq: Seq) -> Result<(), StoreError> {
        let reg_id = reg_id.to_owned();
        self.write(move |s, w| {
            s.record_push(w.now_ms, &reg_id, seq);
            Ok(())
        })
        .await
    }

    async fn push_outcome(
        &self,
        reg_id: &str,
        outcome: crate::store::PushOutcome,
    ) -> Result<(), StoreError> {
        let reg_id = reg_id.to_owned();
        self.write(move |s, w| {
            s.push_outcome(w.now_ms, &reg_id, outcome);
            Ok(())
        })
        .await
    }

    async fn meta_or_init(&self, key: &str, init: &str) -> Result<String, StoreError> {
        let (key, init) = (key.to_owned(), init.to_owned());
        self.write(move |s, _| Ok(s.meta.entry(key).or_insert(init).clone()))
            .await
    }

    async fn close(&self) {
        // Queued writes are committed first, as SQLite's writer does.
        while self.pending_writes() > 0 && !self.closed.load(Ordering::SeqCst) {
            self.commit(usize::MAX, None);
        }
        self.closed.store(true, Ordering::SeqCst);
    }
}
