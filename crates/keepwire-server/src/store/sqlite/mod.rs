//! Embedded SQLite store.
//!
//! One writer thread owns the only write connection and commits in groups
//! ([`writer`]): it takes every job queued while the previous commit was
//! running, commits them with one fsync, and only then answers each job and
//! tells the head listener. Reads run on a small pool of read-only
//! connections ([`read_pool`]; WAL lets them proceed while the writer
//! commits). The operations themselves are plain functions over a
//! connection, by topic: [`inbox`], [`conversations`], and the admin ones in
//! [`admin_impl`]; [`schema`] holds the numbered migrations.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use rusqlite::{Connection, OpenFlags};
use sha2::{Digest as _, Sha256};
use tokio::sync::{mpsc, oneshot};

use super::{HeadListener, Retention, StoreError, SystemClock, WallClock};
use crate::metrics::Metrics;
use read_pool::{MAX_IDLE_READERS, ReadPool};
use writer::{Heads, Job, WriterMsg};

pub use lock::{DbLock, LockMode, lock_path};

mod admin_impl;
mod conversations;
mod files;
mod inbox;
mod lock;
mod push;
mod queries;
mod read_pool;
mod relay_impl;
mod schema;
#[cfg(test)]
mod tests;
mod writer;

/// The writer's page cache, in KiB (negative: SQLite's "size in KiB").
const WRITER_CACHE_KIB: i64 = -32 * 1024;
/// WAL pages between automatic checkpoints (SQLite's default is 1,000).
const WAL_AUTOCHECKPOINT_PAGES: i64 = 10_000;
/// Jobs that may wait for the writer before senders are slowed down.
const QUEUE_DEPTH: usize = 8192;
/// Reads running at once. More would not go faster on a few cores, and each
/// one holds a blocking thread and an SQLite connection with its page cache:
/// a burst of thousands of handshakes (a reconnect storm) once grew the
/// relay by tens of megabytes of threads and caches.
const MAX_CONCURRENT_READS: usize = MAX_IDLE_READERS;

/// Options for [`SqliteStore::open`].
#[derive(Clone, Default)]
pub struct SqliteOptions {
    /// Retention policy.
    pub retention: Retention,
    /// Where to count commits and writes; a private registry when `None`.
    pub metrics: Option<Arc<Metrics>>,
    /// The wall clock for entry times; the system clock when `None`.
    pub clock: Option<Arc<dyn WallClock>>,
    /// No writer thread: writes wait until [`SqliteStore::commit`] runs a
    /// group commit on the caller's thread, and reads run inline (the
    /// simulation drives the real writer this way).
    #[cfg(any(test, feature = "testing"))]
    pub manual_commit: bool,
}

/// The writer's connection and queue when the owner drives commits.
struct Manual {
    conn: Connection,
    rx: mpsc::Receiver<WriterMsg>,
    metrics: Arc<Metrics>,
}

/// The embedded SQLite store. Cheap to share behind an `Arc`.
pub struct SqliteStore {
    path: PathBuf,
    epoch: String,
    ctx: Ctx,
    writer: mpsc::Sender<WriterMsg>,
    readers: Arc<ReadPool>,
    listener: Arc<OnceLock<Arc<dyn HeadListener>>>,
    writer_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    manual: Option<Mutex<Manual>>,
}

/// What every operation needs besides its connection.
#[derive(Clone)]
pub(super) struct Ctx {
    retention: Retention,
    clock: Arc<LogClock>,
}

/// Entry and message times (ms since the Unix epoch): the wall clock, but
/// never earlier than a time given before (by this store, or stored in the
/// database when it was opened). A user's entry times then rise with its
/// sequence, which the age trim relies on: it cuts each inbox at its first
/// entry young enough to keep, and no kept entry may point at a message it
/// deletes.
pub(super) struct LogClock {
    wall: Arc<dyn WallClock>,
    last: AtomicI64,
}

impl LogClock {
    fn new(wall: Arc<dyn WallClock>, latest: i64) -> Self {
        LogClock {
            wall,
            last: AtomicI64::new(latest),
        }
    }

    /// The wall clock, for times that need not rise (`created_at`, ...).
    pub(super) fn now_ms(&self) -> i64 {
        self.wall.now_ms()
    }

    /// The time of a new log entry: never earlier than the last one.
    pub(super) fn log_ts(&self) -> i64 {
        let now = self.wall.now_ms();
        self.last.fetch_max(now, Ordering::Relaxed).max(now)
    }
}

fn hash_token(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and starts the writer.
    pub fn open(path: &Path, opts: SqliteOptions) -> Result<Arc<SqliteStore>, StoreError> {
        if let Some(dir) = path.parent() {
            files::create_private_dir(dir)?;
        }
        files::create_private_file(path)?;
        let mut conn = Connection::open(path)?;
        schema::configure(&conn)?;
        files::restrict(path)?;
        // The writer: savepoints' sub-journals in memory (not a temp file
        // written per job), and a page cache that holds the hot inbox pages.
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        conn.pragma_update(None, "cache_size", WRITER_CACHE_KIB)?;
        // Checkpoint every ~40 MB of WAL, not every 4 MB: group fanout
        // rewrites the same hot inbox pages commit after commit, and a
        // checkpoint copies each page once however often it was rewritten.
        conn.pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES)?;
        schema::migrate(&mut conn)?;
        conn.execute(
            "INSERT OR IGNORE INTO meta(key, value) VALUES ('epoch', ?1)",
            [schema::new_epoch()],
        )?;
        let epoch: String =
            conn.query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |r| {
                r.get(0)
            })?;
        // Log times go on from the latest stored one, even if the clock
        // was set back while the relay was down.
        let latest: i64 = conn.query_row("SELECT COALESCE(MAX(ts), 0) FROM messages", [], |r| {
            r.get(0)
        })?;
        let clock = Arc::new(LogClock::new(
            opts.clock.clone().unwrap_or_else(|| Arc::new(SystemClock)),
            latest,
        ));

        let metrics = opts.metrics.unwrap_or_default();
        let listener: Arc<OnceLock<Arc<dyn HeadListener>>> = Arc::new(OnceLock::new());
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        #[cfg(any(test, feature = "testing"))]
        let manual_commit = opts.manual_commit;
        #[cfg(not(any(test, feature = "testing")))]
        let manual_commit = false;
        let (handle, manual) = if manual_commit {
            (None, Some(Mutex::new(Manual { conn, rx, metrics })))
        } else {
            let thread_listener = listener.clone();
            let handle = std::thread::Builder::new()
                .name("keepwire-writer".into())
                .spawn(move || writer::writer_loop(conn, rx, thread_listener, metrics))
                .map_err(|e| {
                    StoreError::incompatible(format!("cannot start writer thread: {e}"))
                })?;
            (Some(handle), None)
        };
        Ok(Arc::new(SqliteStore {
            path: path.to_owned(),
            epoch,
            ctx: Ctx {
                retention: opts.retention,
                clock,
            },
            writer: tx,
            readers: Arc::new(ReadPool {
                path: path.to_owned(),
                idle: Mutex::new(Vec::new()),
                permits: tokio::sync::Semaphore::new(MAX_CONCURRENT_READS),
            }),
            listener,
            writer_thread: Mutex::new(handle),
            manual,
        }))
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes waiting for [`SqliteStore::commit`] (manual commit mode).
    pub fn pending_writes(&self) -> usize {
        self.manual
            .as_ref()
            .map_or(0, |m| m.lock().unwrap_or_else(|p| p.into_inner()).rx.len())
    }

    /// Runs the first `n` queued writes as one group commit on this thread,
    /// or crashes at `crash` (then this handle is closed). Manual commit mode
    /// only; returns how many were taken.
    pub fn commit(&self, n: usize, crash: Option<crate::store::CrashPoint>) -> usize {
        let Some(m) = &self.manual else { return 0 };
        let mut m = m.lock().unwrap_or_else(|p| p.into_inner());
        let mut batch: Vec<Job> = Vec::new();
        while batch.len() < n {
            match m.rx.try_recv() {
                Ok(WriterMsg::Job(j)) => batch.push(j),
                Ok(WriterMsg::Close(done)) => {
                    let _ = done.send(());
                }
                Err(_) => break,
            }
        }
        let taken = batch.len();
        writer::run_batch(&m.conn, batch, &self.listener, &m.metrics, crash);
        if crash.is_some() {
            m.rx.close();
            self.readers.permits.close();
        }
        taken
    }

    /// Stops this handle as a crash would (manual commit mode): queued
    /// writes are dropped unanswered, later calls fail.
    pub fn crash(&self) {
        if let Some(m) = &self.manual {
            let mut m = m.lock().unwrap_or_else(|p| p.into_inner());
            m.rx.close();
            while m.rx.try_recv().is_ok() {}
        }
        self.readers.permits.close();
    }

    /// Writes a consistent copy of the database to `dest` (which must not exist).
    pub fn backup(db: &Path, dest: &Path) -> Result<(), StoreError> {
        if dest.exists() {
            return Err(StoreError::Conflict(format!(
                "{} already exists",
                dest.display()
            )));
        }
        if let Some(dir) = dest.parent() {
            files::create_private_dir(dir)?;
        }
        files::create_private_file(dest)?;
        let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        conn.execute("VACUUM INTO ?1", [dest.to_string_lossy()])?;
        files::restrict(dest)?;
        Ok(())
    }

    /// Replaces the database at `db` with the backup at `src` and gives it a
    /// new epoch, so clients holding cursors from after the backup get a gap
    /// answer instead of silently skipping messages. The relay must be
    /// stopped: this takes the database's [`DbLock`] exclusively for the
    /// whole swap and fails with [`StoreError::Conflict`] if a relay holds it.
    pub fn restore(src: &Path, db: &Path) -> Result<String, StoreError> {
        let _lock = DbLock::acquire(db, LockMode::Exclusive)?;
        {
            let check = Connection::open_with_flags(src, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
            let v: usize = check.pragma_query_value(None, "user_version", |r| r.get(0))?;
            if v == 0 {
                return Err(StoreError::incompatible(format!(
                    "{} is not a keepwire database",
                    src.display()
                )));
            }
        }
        let tmp = db.with_extension("restoring");
        let _ = std::fs::remove_file(&tmp);
        files::create_private_file(&tmp)?;
        {
            let conn = Connection::open_with_flags(src, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
            conn.execute("VACUUM INTO ?1", [tmp.to_string_lossy()])?;
        }
        let epoch = schema::new_epoch();
        {
            let conn = Connection::open(&tmp)?;
            conn.execute("UPDATE meta SET value = ?1 WHERE key = 'epoch'", [&epoch])?;
        }
        // A stale WAL next to the new file would be replayed into it.
        let wal = PathBuf::from(format!("{}-wal", db.display()));
        let shm = PathBuf::from(format!("{}-shm", db.display()));
        let _ = std::fs::remove_file(wal);
        let _ = std::fs::remove_file(shm);
        std::fs::rename(&tmp, db).map_err(|e| {
            StoreError::incompatible(format!("cannot replace {}: {e}", db.display()))
        })?;
        Ok(epoch)
    }

    /// Runs `f` in the next group commit; resolves after the commit.
    async fn write<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection, &mut Heads) -> Result<R, StoreError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<Result<R, StoreError>>();
        let job: Job = Box::new(move |conn, heads, wrote_then_failed| {
            let result = match conn {
                None => Err(StoreError::commit("could not begin a transaction")),
                Some(conn) => {
                    // No savepoint per job: SQLite copies every page a
                    // savepoint touches into a sub-journal, which cost more
                    // than the jobs themselves under fanout. Jobs check
                    // before they write; one that fails after writing (an
                    // SQLite error) rolls the whole group back instead.
                    let mark = heads.len();
                    let changes = conn.total_changes();
                    let r = f(conn, heads);
                    if r.is_err() {
                        heads.truncate(mark);
                        if conn.total_changes() != changes {
                            *wrote_then_failed = true;
                        }
                    }
                    r
                }
            };
            Box::new(move |commit: Result<(), String>| {
                let out = match (commit, result) {
                    (Ok(()), r) => r,
                    (Err(_), Err(e)) => Err(e),
                    (Err(e), Ok(_)) => Err(StoreError::commit(e)),
                };
                let _ = tx.send(out);
            })
        });
        self.writer
            .send(WriterMsg::Job(job))
            .await
            .map_err(|_| StoreError::closed())?;
        rx.await.map_err(|_| StoreError::closed())?
    }

    /// Runs `f` on a read connection in a blocking thread.
    async fn read<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<R, StoreError> + Send + 'static,
    {
        let _permit = self
            .readers
            .permits
            .acquire()
            .await
            .map_err(|_| StoreError::closed())?;
        if self.manual.is_some() {
            // Driven by the caller: no blocking thread.
            let mut conn = self.readers.take()?;
            let r = f(&mut conn);
            self.readers.put(conn);
            return r;
        }
        let pool = self.readers.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = pool.take()?;
            let r = f(&mut conn);
            pool.put(conn);
            r
        })
        .await
        .map_err(|e| StoreError::commit(format!("read task failed: {e}")))?
    }
}
