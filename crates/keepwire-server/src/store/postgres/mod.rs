//! PostgreSQL store, for several relay nodes over one database.
//!
//! Every write is one READ COMMITTED transaction on a connection of a
//! bounded pool ([`PostgresStore::write`]); the operations are plain async
//! functions over a transaction, by topic as in the SQLite store:
//! [`inbox`], [`conversations`], [`push`], and the admin ones in
//! [`admin_impl`]; [`schema`] holds the numbered migrations.
//!
//! Per-user sequences are gap-free and in commit order because they are
//! assigned under row locks, always taken in one order: the conversation's
//! row, then (membership read under it) the members' rows in `users`
//! `ORDER BY id FOR UPDATE`, held until the commit. No SEQUENCE hands them
//! out (`nextval` survives a rollback) and no SERIALIZABLE (hot users would
//! abort all the time). Deadlocks and serialization failures (40P01,
//! 40001) are retried and counted. A send claims its dedupe key first, so a
//! concurrent duplicate waits for the original's commit and then answers
//! `duplicate`. A commit whose outcome is unknown (the connection died
//! during it) is answered as a retryable [`InfraError::Commit`]; the
//! client's retry with the same cid finds the original if it did commit,
//! and the users' heads are re-read once the database answers, to announce
//! its entries if it did. After a send of a device fails on the database,
//! the device's other sends fail too for a moment (`SEND_HOLD`), so the
//! client's resend keeps its messages in order.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use deadpool_postgres::{
    HookError, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime, Transaction,
};
use sha2::{Digest as _, Sha256};
use tokio_postgres::IsolationLevel;
use tokio_postgres::error::SqlState;

use keepwire_proto::Seq;

use super::{
    HeadAdvance, HeadListener, InfraError, Retention, StoreError, SystemClock, UserId, WallClock,
};
use crate::metrics::Metrics;

mod admin_impl;
mod conversations;
mod inbox;
mod push;
mod queries;
mod relay_impl;
mod schema;

/// Connections the pool keeps at most, by default.
const DEFAULT_POOL_SIZE: usize = 16;
/// How long an operation waits for a free connection before failing.
const POOL_WAIT: Duration = Duration::from_secs(30);
/// How long opening a connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the heads of a commit whose outcome is unknown are re-read
/// while the database does not answer.
const RECHECK_FOR: Duration = Duration::from_secs(600);
/// Attempts of one operation (deadlocks, serialization failures, lost
/// connections before the commit) before it fails.
const MAX_ATTEMPTS: u32 = 8;

/// Options for [`PostgresStore::open`].
#[derive(Clone, Default)]
pub struct PostgresOptions {
    /// Retention policy.
    pub retention: Retention,
    /// Where to count commits and retries; a private registry when `None`.
    pub metrics: Option<Arc<Metrics>>,
    /// The wall clock for entry times. `None` (production): the database's
    /// clock, so that every node stamps entries on one clock.
    pub clock: Option<Arc<dyn WallClock>>,
    /// Connections in the pool at most (default 16).
    pub pool_size: Option<usize>,
}

/// The PostgreSQL store. Cheap to share behind an `Arc`; several relays
/// (processes or nodes) may open one database at once.
pub struct PostgresStore {
    epoch: String,
    ctx: Ctx,
    pool: Pool,
    listener: OnceLock<Arc<dyn HeadListener>>,
    metrics: Arc<Metrics>,
    closed: AtomicBool,
    /// One gate per `(user, device)` sending now: a device's sends commit
    /// one at a time in the order they were made (a connection pipelines
    /// them, and the protocol stores them in the order sent; concurrent
    /// transactions would commit them in any order).
    send_gates: Arc<SendGates>,
    /// Set when a new connection finds another timeline (a failover) or a
    /// server that lost its durability settings: the relay must restart
    /// with a new epoch, so every operation fails until then.
    stale: Arc<OnceLock<String>>,
}

/// What every operation needs besides its transaction.
#[derive(Clone)]
pub(super) struct Ctx {
    retention: Retention,
    /// Times that need not rise (`created_at`, token expiry, ...).
    clock: Arc<dyn WallClock>,
    /// The clock for entry times; `None`: the database's.
    log_clock: Option<Arc<dyn WallClock>>,
}

impl Ctx {
    /// Now, for times that need not rise.
    pub(super) fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Now on the log's clock: the injected one, or the database's (one
    /// clock for every node). Callers raise it to the newest time of the
    /// rows they locked, so a user's entry times rise with its sequence.
    pub(super) async fn log_now(&self, tx: &Tx<'_>) -> Result<i64, PgError> {
        match &self.log_clock {
            Some(c) => Ok(c.now_ms()),
            None => Ok(tx
                .query_one(
                    &tx.prepare_cached(
                        "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint",
                    )
                    .await?,
                    &[],
                )
                .await?
                .get(0)),
        }
    }
}

/// A transaction of the pool.
pub(super) type Tx<'t> = Transaction<'t>;

/// The entries a transaction appended, for the head listener.
pub(super) type Heads = Vec<HeadAdvance>;

/// What an operation returns: a store error (a refusal, ...) or a database
/// error the retry loop looks at.
pub(super) enum PgError {
    /// Answer this.
    Store(StoreError),
    /// The database failed; maybe retried.
    Db(tokio_postgres::Error),
}

impl From<StoreError> for PgError {
    fn from(e: StoreError) -> Self {
        PgError::Store(e)
    }
}

impl From<tokio_postgres::Error> for PgError {
    fn from(e: tokio_postgres::Error) -> Self {
        PgError::Db(e)
    }
}

/// A boxed operation future borrowing its transaction.
pub(super) type TxFut<'t, R> = Pin<Box<dyn Future<Output = Result<R, PgError>> + Send + 't>>;

/// How one attempt ended when it did not succeed.
enum Failed {
    /// Nothing was stored and trying again may work; the label counts it.
    Retry(&'static str, String),
    /// The answer.
    Final(StoreError),
}

/// A database error in words (tokio-postgres's `Display` says only "db error").
pub(super) fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

/// Whether a failed statement (before any commit) may be retried, and the
/// label it is counted under.
fn retryable(e: &tokio_postgres::Error) -> Option<&'static str> {
    match e.code() {
        Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED => Some("deadlock"),
        Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE => Some("serialization"),
        // Two writers inserting one unique key (a user, a conversation):
        // the retry finds the other's row.
        Some(c) if *c == SqlState::UNIQUE_VIOLATION => Some("unique"),
        // The server is shutting down or restarting, or the connection broke.
        Some(c)
            if *c == SqlState::ADMIN_SHUTDOWN
                || *c == SqlState::CRASH_SHUTDOWN
                || *c == SqlState::CANNOT_CONNECT_NOW
                || c.code().starts_with("08") =>
        {
            Some("connection")
        }
        Some(_) => None,
        // The connection closed or failed mid-statement (no commit was asked).
        None if e.is_closed() || io_failure(e) => Some("connection"),
        // A statement's result did not fit (a bug, not the network).
        None => None,
    }
}

/// Whether `e` comes from the socket.
fn io_failure(e: &tokio_postgres::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.is::<std::io::Error>() {
            return true;
        }
        source = s.source();
    }
    false
}

/// How long, after a device's send failed on the database, the device's
/// other sends are refused too (unless one is that send again): the
/// `retry_after_ms` an `internal` rejection announces.
const SEND_HOLD: Duration = Duration::from_secs(1);

/// The senders with a send in progress, each with its FIFO gate, and those
/// whose send failed within [`SEND_HOLD`].
type SendGates = std::sync::Mutex<HashMap<(UserId, String), Arc<tokio::sync::Mutex<Gate>>>>;

/// What a device's gate remembers between its sends.
#[derive(Default)]
pub(super) struct Gate {
    /// The cid of the device's last send that failed on the database, and
    /// when.
    failed: Option<(String, std::time::Instant)>,
}

impl Gate {
    fn holding(&self) -> bool {
        self.failed
            .as_ref()
            .is_some_and(|(_, at)| at.elapsed() < SEND_HOLD)
    }
}

/// A device's turn to send; the next send of the device waits until it is
/// dropped (FIFO: tokio's mutex wakes waiters in the order they came).
pub(super) struct SendTurn {
    gates: Arc<SendGates>,
    key: (UserId, String),
    gate: Option<Arc<tokio::sync::Mutex<Gate>>>,
    guard: Option<tokio::sync::OwnedMutexGuard<Gate>>,
}

impl SendTurn {
    /// Waits for `key`'s earlier sends. Its first poll queues it, so turns
    /// follow the order in which the sends were first polled.
    pub(super) async fn take(gates: &Arc<SendGates>, key: (UserId, String)) -> SendTurn {
        let gate = gates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .clone();
        let mut turn = SendTurn {
            gates: gates.clone(),
            key,
            gate: Some(gate.clone()),
            guard: None,
        };
        turn.guard = Some(gate.lock_owned().await);
        turn
    }

    /// The cid of an earlier send of the device that failed on the database
    /// less than [`SEND_HOLD`] ago, unless it is `cid`: this send must fail
    /// too. Sends pipelined behind a failed one would otherwise commit
    /// before it, and the client's resend (from the first rejected send, as
    /// PROTOCOL.md §5 asks) would store the device's messages out of order.
    pub(super) fn held_by(&self, cid: &str) -> Option<String> {
        let gate = self.guard.as_ref()?;
        match &gate.failed {
            Some((first, _)) if gate.holding() && first != cid => Some(first.clone()),
            _ => None,
        }
    }

    /// This turn's send (`cid`) failed on the database, or was stored.
    pub(super) fn outcome(&mut self, cid: &str, failed: bool) {
        let Some(gate) = self.guard.as_mut() else {
            return;
        };
        if !failed {
            gate.failed = None;
            return;
        }
        gate.failed = Some((cid.to_owned(), std::time::Instant::now()));
        // Failures are rare: forget the devices whose hold ran out and
        // that nobody uses (this one is in use).
        self.gates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, g| Arc::strong_count(g) > 1 || g.try_lock().map_or(true, |g| g.holding()));
    }
}

impl Drop for SendTurn {
    fn drop(&mut self) {
        let holding = self.guard.as_ref().is_some_and(|g| g.holding());
        self.guard.take();
        let mut gates = self.gates.lock().unwrap_or_else(|p| p.into_inner());
        // The map's and this one: nobody else waits, the entry can go
        // (unless it holds the device's sends after a failure).
        if let Some(gate) = self.gate.take()
            && Arc::strong_count(&gate) == 2
            && !holding
        {
            gates.remove(&self.key);
        }
    }
}

fn hash_token(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

impl PostgresStore {
    /// Connects to the database at `url` (`postgres://user@host:port/db`),
    /// checks that the server is durable, applies the migrations and makes
    /// the epoch (the database's id and the server's timeline).
    pub async fn open(url: &str, opts: PostgresOptions) -> Result<Arc<PostgresStore>, StoreError> {
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| StoreError::incompatible(format!("invalid PostgreSQL URL: {e}")))?;
        config.application_name("keepwire");
        config.connect_timeout(CONNECT_TIMEOUT);
        let metrics = opts.metrics.unwrap_or_default();
        let stale: Arc<OnceLock<String>> = Arc::new(OnceLock::new());
        // The timeline every connection must be on (0 until the first).
        let timeline = Arc::new(AtomicI64::new(0));
        let manager = Manager::from_config(
            config,
            tokio_postgres::NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let hook_stale = stale.clone();
        let hook_timeline = timeline.clone();
        let pool = Pool::builder(manager)
            .max_size(opts.pool_size.unwrap_or(DEFAULT_POOL_SIZE).max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .post_create(deadpool_postgres::Hook::async_fn(move |client, _| {
                let stale = hook_stale.clone();
                let timeline = hook_timeline.clone();
                Box::pin(async move {
                    // Every new connection (after a restart or failover too)
                    // is checked: a server that lost its durability or moved
                    // to another timeline must not take this relay's writes.
                    let check = async {
                        schema::check_durability(client).await?;
                        let tl = schema::timeline(client).await?;
                        match timeline.compare_exchange(0, tl, Ordering::SeqCst, Ordering::SeqCst)
                        {
                            Ok(_) => Ok(()),
                            Err(known) if known == tl => Ok(()),
                            Err(known) => Err(schema::Check::Refuse(StoreError::incompatible(
                                format!(
                                    "PostgreSQL moved from timeline {known} to {tl} (a failover): \
                                     restart the relay so that clients get a new epoch"
                                ),
                            ))),
                        }
                    };
                    match check.await {
                        Ok(()) => Ok(()),
                        Err(schema::Check::Refuse(e)) => {
                            let msg = e.to_string();
                            tracing::error!(target: "keepwire::store", error = %msg, "refusing the PostgreSQL server");
                            let _ = stale.set(msg.clone());
                            Err(HookError::message(msg))
                        }
                        // A connection that died during its check: the
                        // pool tries another.
                        Err(schema::Check::Failed(why)) => Err(HookError::message(why)),
                    }
                })
            }))
            .build()
            .map_err(|e| StoreError::incompatible(format!("cannot build the pool: {e}")))?;
        let mut client = pool.get().await.map_err(|e| match stale.get() {
            Some(why) => StoreError::incompatible(why.clone()),
            None => StoreError::incompatible(format!("cannot connect to PostgreSQL: {e}")),
        })?;
        schema::migrate(&mut client).await?;
        let id = schema::database_id(&client).await?;
        drop(client);
        let epoch = format!("{id}-{}", timeline.load(Ordering::SeqCst));
        let clock: Arc<dyn WallClock> = opts.clock.clone().unwrap_or_else(|| Arc::new(SystemClock));
        Ok(Arc::new(PostgresStore {
            epoch,
            ctx: Ctx {
                retention: opts.retention,
                clock,
                log_clock: opts.clock,
            },
            pool,
            listener: OnceLock::new(),
            metrics,
            closed: AtomicBool::new(false),
            send_gates: Arc::default(),
            stale,
        }))
    }

    fn check_usable(&self) -> Result<(), StoreError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(StoreError::closed());
        }
        if let Some(why) = self.stale.get() {
            return Err(StoreError::incompatible(why.clone()));
        }
        Ok(())
    }

    /// Waits before attempt `attempt + 1` (a few ms, doubling, jittered).
    async fn backoff(&self, label: &'static str, attempt: u32, why: &str) {
        self.metrics.store_retry(label);
        tracing::debug!(target: "keepwire::store", label, attempt, error = %why, "retrying a PostgreSQL transaction");
        let base = 2u64 << attempt.min(6);
        let ms = rand::random_range(base / 2..=base);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    async fn connection(&self) -> Result<deadpool_postgres::Object, Failed> {
        self.pool.get().await.map_err(|e| {
            if self.closed.load(Ordering::Acquire) {
                return Failed::Final(StoreError::closed());
            }
            if let Some(why) = self.stale.get() {
                return Failed::Final(StoreError::incompatible(why.clone()));
            }
            match e {
                deadpool_postgres::PoolError::Timeout(_) => Failed::Final(StoreError::Infra(
                    InfraError::Database("no PostgreSQL connection became free in time".into()),
                )),
                deadpool_postgres::PoolError::Closed => Failed::Final(StoreError::closed()),
                e => Failed::Retry("connection", format!("cannot connect to PostgreSQL: {e}")),
            }
        })
    }

    /// Runs `f` in a READ COMMITTED transaction and commits it; retries
    /// deadlocks, serialization failures and connections lost before the
    /// commit. The head listener hears of the entries after the commit.
    pub(super) async fn write<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send,
        F: for<'t> Fn(&'t Tx<'t>, &'t mut Heads) -> TxFut<'t, R> + Send + Sync,
    {
        self.check_usable()?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut heads = Heads::new();
            match self.write_once(&f, &mut heads).await {
                Ok(r) => {
                    self.metrics.commits.inc();
                    self.metrics.committed_jobs.inc();
                    if !heads.is_empty()
                        && let Some(l) = self.listener.get()
                    {
                        l.heads_advanced(&heads);
                    }
                    return Ok(r);
                }
                Err(Failed::Final(e)) => return Err(e),
                Err(Failed::Retry(label, why)) => {
                    if attempt >= MAX_ATTEMPTS {
                        return Err(StoreError::Infra(InfraError::Database(format!(
                            "gave up after {attempt} attempts: {why}"
                        ))));
                    }
                    self.backoff(label, attempt, &why).await;
                    self.check_usable()?;
                }
            }
        }
    }

    async fn write_once<R, F>(&self, f: &F, heads: &mut Heads) -> Result<R, Failed>
    where
        R: Send,
        F: for<'t> Fn(&'t Tx<'t>, &'t mut Heads) -> TxFut<'t, R> + Send + Sync,
    {
        let mut client = self.connection().await?;
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::ReadCommitted)
            .start()
            .await
            .map_err(|e| before_commit(&e))?;
        let result = f(&tx, heads).await;
        match result {
            Err(e) => {
                // Nothing is stored: the transaction rolls back.
                let _ = tx.rollback().await;
                Err(match e {
                    PgError::Store(e) => Failed::Final(e),
                    PgError::Db(e) => before_commit(&e),
                })
            }
            Ok(r) => match tx.commit().await {
                Ok(()) => Ok(r),
                // The server refused the commit (a serialization failure, a
                // deferred constraint): nothing is stored.
                Err(e)
                    if e.code().is_some_and(|c| {
                        c.code().starts_with("40") || c.code().starts_with("23")
                    }) =>
                {
                    Err(before_commit(&e))
                }
                // No answer, or the connection ended (a terminated backend
                // waiting for synchronous replication has committed
                // locally): the transaction may or may not have committed.
                // Nobody is told of its entries; the client's retry (same
                // cid) finds the original if it committed.
                Err(e) => {
                    tracing::error!(target: "keepwire::store", error = %e, "the outcome of a PostgreSQL commit is unknown");
                    self.announce_if_committed(std::mem::take(heads));
                    Err(Failed::Final(StoreError::commit(format!(
                        "the outcome of the commit is unknown ({e}); retry"
                    ))))
                }
            },
        }
    }

    /// After a commit whose outcome is unknown: once the database answers
    /// again, re-reads the heads of the users that transaction would have
    /// advanced, and announces (without items: readers use the store) those
    /// that reached its entries. If it did commit, nothing else would tell
    /// this node's connections: the client's resend is only a duplicate, and
    /// a relay without a bus has no timer that re-reads heads, so a device
    /// connected here would not get the message until the user's next entry.
    fn announce_if_committed(&self, heads: Heads) {
        let Some(listener) = self.listener.get().cloned() else {
            return;
        };
        if heads.is_empty() {
            return;
        }
        let (pool, stale) = (self.pool.clone(), self.stale.clone());
        tokio::spawn(async move {
            let users: Vec<UserId> = heads.iter().map(|h| h.user).collect();
            let deadline = tokio::time::Instant::now() + RECHECK_FOR;
            let mut wait = Duration::from_millis(50);
            loop {
                let read = async {
                    let client = pool.get().await.map_err(|e| e.to_string())?;
                    client
                        .query(
                            "SELECT id, inbox_head FROM users WHERE id = ANY($1)",
                            &[&users],
                        )
                        .await
                        .map_err(|e| describe(&e))
                };
                match read.await {
                    Ok(rows) => {
                        let now: HashMap<UserId, Seq> = rows
                            .iter()
                            .map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1) as Seq))
                            .collect();
                        let reached: Heads = heads
                            .into_iter()
                            .filter_map(|h| {
                                let head = *now.get(&h.user)?;
                                (head >= h.seq).then_some(HeadAdvance {
                                    seq: head,
                                    item: None,
                                    ..h
                                })
                            })
                            .collect();
                        if !reached.is_empty() {
                            listener.heads_advanced(&reached);
                        }
                        return;
                    }
                    Err(why) => {
                        if pool.is_closed()
                            || stale.get().is_some()
                            || tokio::time::Instant::now() >= deadline
                        {
                            tracing::warn!(target: "keepwire::store", error = %why, "gave up re-reading the heads after an unknown commit outcome");
                            return;
                        }
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(5));
                    }
                }
            }
        });
    }

    /// Runs `f` in a read-only REPEATABLE READ transaction (one snapshot
    /// for every statement); retries lost connections.
    pub(super) async fn read<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send,
        F: for<'t> Fn(&'t Tx<'t>) -> TxFut<'t, R> + Send + Sync,
    {
        self.check_usable()?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let once = async {
                let mut client = self.connection().await?;
                let tx = client
                    .build_transaction()
                    .isolation_level(IsolationLevel::RepeatableRead)
                    .read_only(true)
                    .start()
                    .await
                    .map_err(|e| before_commit(&e))?;
                let r = f(&tx).await;
                // Read-only: ending it cannot lose anything.
                let _ = tx.rollback().await;
                r.map_err(|e| match e {
                    PgError::Store(e) => Failed::Final(e),
                    PgError::Db(e) => before_commit(&e),
                })
            };
            match once.await {
                Ok(r) => return Ok(r),
                Err(Failed::Final(e)) => return Err(e),
                Err(Failed::Retry(label, why)) => {
                    if attempt >= MAX_ATTEMPTS {
                        return Err(StoreError::Infra(InfraError::Database(format!(
                            "gave up after {attempt} attempts: {why}"
                        ))));
                    }
                    self.backoff(label, attempt, &why).await;
                    self.check_usable()?;
                }
            }
        }
    }
}

/// A failure before (or of) a commit the server refused: nothing stored.
fn before_commit(e: &tokio_postgres::Error) -> Failed {
    match retryable(e) {
        Some(label) => Failed::Retry(label, describe(e)),
        None => Failed::Final(StoreError::Infra(InfraError::Database(describe(e)))),
    }
}
