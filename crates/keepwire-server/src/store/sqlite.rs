//! Embedded SQLite store.
//!
//! One writer thread owns the only write connection and commits in groups:
//! it takes every job queued while the previous commit was running, runs each
//! in its own savepoint (one failing job does not undo the others), commits
//! them with one fsync, and only then answers each job and tells the head
//! listener. Reads run on a small pool of read-only connections (WAL lets them
//! proceed while the writer commits).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use keepwire_proto::{
    Confirm, ConvCreate, ConvId, ConvInfo, ConvKind, Cursor, EntryItem, ErrorCode, FetchHint,
    GapReason, HistoryPage, InboxEntry, MemberChange, MemberEvent, Message, ReadMark, Resume,
    ResumeStatus, Send as SendMsg, Seq, SeqRange, is_valid_user_name,
};
use rand::RngCore as _;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use sha2::{Digest as _, Sha256};
use tokio::sync::{mpsc, oneshot};

use super::{
    Actor, ApiKeyInfo, AuthFailure, AuthedUser, DeviceInfo, DevicePosition, HeadAdvance,
    HeadListener, IssuedToken, Positions, ResumePlan, Retention, Revocation, RevokeTarget,
    SYSTEM_USER, Store, StoreError, TokenInfo, TrimReport, UserId,
};
use crate::metrics::Metrics;

/// Numbered migrations, applied in order; `PRAGMA user_version` records the last one.
const MIGRATIONS: &[(&str, &str)] = &[
    ("0001_init", include_str!("migrations/0001_init.sql")),
    (
        "0002_integration",
        include_str!("migrations/0002_integration.sql"),
    ),
    ("0003_reads", include_str!("migrations/0003_reads.sql")),
    (
        "0004_inbox_without_ts_index",
        include_str!("migrations/0004_inbox_without_ts_index.sql"),
    ),
];

/// Most jobs one group commit takes.
const MAX_BATCH: usize = 1024;
/// The writer's page cache, in KiB (negative: SQLite's "size in KiB").
const WRITER_CACHE_KIB: i64 = -32 * 1024;
/// WAL pages between automatic checkpoints (SQLite's default is 1,000).
const WAL_AUTOCHECKPOINT_PAGES: i64 = 10_000;
/// Jobs that may wait for the writer before senders are slowed down.
const QUEUE_DEPTH: usize = 8192;
/// Idle read connections kept open.
const MAX_IDLE_READERS: usize = 8;
/// Reads running at once. More would not go faster on a few cores, and each
/// one holds a blocking thread and an SQLite connection with its page cache:
/// a burst of thousands of handshakes (a reconnect storm) once grew the
/// relay by tens of megabytes of threads and caches.
const MAX_CONCURRENT_READS: usize = MAX_IDLE_READERS;
/// Most fetch hints in a `welcome` (the client lists conversations for the rest).
const MAX_FETCH_HINTS: usize = 500;

/// Options for [`SqliteStore::open`].
#[derive(Clone, Default)]
pub struct SqliteOptions {
    /// Retention policy.
    pub retention: Retention,
    /// Where to count commits and writes; a private registry when `None`.
    pub metrics: Option<Arc<Metrics>>,
}

type Heads = Vec<HeadAdvance>;
type Completion = Box<dyn FnOnce(Result<(), String>) + Send>;
/// A job runs inside the group transaction (or gets `None` when the
/// transaction could not be started) and returns what to do after the commit.
/// It sets the flag when it failed after writing: the whole group then rolls
/// back.
type Job = Box<dyn FnOnce(Option<&Connection>, &mut Heads, &mut bool) -> Completion + Send>;

enum WriterMsg {
    Job(Job),
    Close(oneshot::Sender<()>),
}

/// The embedded SQLite store. Cheap to share behind an `Arc`.
pub struct SqliteStore {
    path: PathBuf,
    epoch: String,
    retention: Retention,
    writer: mpsc::Sender<WriterMsg>,
    readers: Arc<ReadPool>,
    listener: Arc<OnceLock<Arc<dyn HeadListener>>>,
    writer_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The latest log time handed out in this process.
static LAST_LOG_TS: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

/// The time of a new inbox entry or message (ms since the Unix epoch): the
/// wall clock, but never earlier than a time given before (in this process,
/// or stored in the database, see [`SqliteStore::open`]). A user's entry
/// times then rise with its sequence, which the age trim relies on: it cuts
/// each inbox at its first entry young enough to keep, and no kept entry may
/// point at a message it deletes.
fn log_ts() -> i64 {
    let now = now_ms();
    LAST_LOG_TS
        .fetch_max(now, std::sync::atomic::Ordering::Relaxed)
        .max(now)
}

fn hash_token(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

fn send_digest(send: &SendMsg) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(send.conv.to_le_bytes());
    h.update((send.kind.len() as u64).to_le_bytes());
    h.update(send.kind.as_bytes());
    h.update(send.body.as_bytes());
    h.finalize().to_vec()
}

fn configure(conn: &Connection) -> Result<(), StoreError> {
    conn.busy_timeout(Duration::from_secs(5))?;
    // Durable against power loss: WAL synced at every commit.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    Ok(())
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let version: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > MIGRATIONS.len() {
        return Err(StoreError::Incompatible(format!(
            "the database is at schema version {version}, newer than this keepwire ({}); upgrade keepwire",
            MIGRATIONS.len()
        )));
    }
    if version == 0 {
        // A non-empty database without our version is someone else's file.
        let tables: i64 = conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))?;
        if tables > 0 {
            return Err(StoreError::Incompatible(
                "the file is an SQLite database but not a keepwire one".into(),
            ));
        }
    }
    for (i, (name, sql)) in MIGRATIONS.iter().enumerate().skip(version) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)
            .map_err(|e| StoreError::Incompatible(format!("migration {name} failed: {e}")))?;
        tx.pragma_update(None, "user_version", i + 1)?;
        tx.commit()?;
    }
    Ok(())
}

fn new_epoch() -> String {
    let mut b = [0u8; 8];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and starts the writer.
    pub fn open(path: &Path, opts: SqliteOptions) -> Result<Arc<SqliteStore>, StoreError> {
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Incompatible(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let mut conn = Connection::open(path)?;
        configure(&conn)?;
        // The writer: savepoints' sub-journals in memory (not a temp file
        // written per job), and a page cache that holds the hot inbox pages.
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        conn.pragma_update(None, "cache_size", WRITER_CACHE_KIB)?;
        // Checkpoint every ~40 MB of WAL, not every 4 MB: group fanout
        // rewrites the same hot inbox pages commit after commit, and a
        // checkpoint copies each page once however often it was rewritten.
        conn.pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES)?;
        migrate(&mut conn)?;
        conn.execute(
            "INSERT OR IGNORE INTO meta(key, value) VALUES ('epoch', ?1)",
            [new_epoch()],
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
        LAST_LOG_TS.fetch_max(latest, std::sync::atomic::Ordering::Relaxed);

        let metrics = opts.metrics.unwrap_or_default();
        let listener: Arc<OnceLock<Arc<dyn HeadListener>>> = Arc::new(OnceLock::new());
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let thread_listener = listener.clone();
        let handle = std::thread::Builder::new()
            .name("keepwire-writer".into())
            .spawn(move || writer_loop(conn, rx, thread_listener, metrics))
            .map_err(|e| StoreError::Incompatible(format!("cannot start writer thread: {e}")))?;
        Ok(Arc::new(SqliteStore {
            path: path.to_owned(),
            epoch,
            retention: opts.retention,
            writer: tx,
            readers: Arc::new(ReadPool {
                path: path.to_owned(),
                idle: Mutex::new(Vec::new()),
                permits: tokio::sync::Semaphore::new(MAX_CONCURRENT_READS),
            }),
            listener,
            writer_thread: Mutex::new(Some(handle)),
        }))
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes a consistent copy of the database to `dest` (which must not exist).
    pub fn backup(db: &Path, dest: &Path) -> Result<(), StoreError> {
        if dest.exists() {
            return Err(StoreError::Conflict(format!(
                "{} already exists",
                dest.display()
            )));
        }
        let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        conn.execute("VACUUM INTO ?1", [dest.to_string_lossy()])?;
        Ok(())
    }

    /// Replaces the database at `db` with the backup at `src` and gives it a
    /// new epoch, so clients holding cursors from after the backup get a gap
    /// answer instead of silently skipping messages. The relay must be stopped.
    pub fn restore(src: &Path, db: &Path) -> Result<String, StoreError> {
        {
            let check = Connection::open_with_flags(src, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
            let v: usize = check.pragma_query_value(None, "user_version", |r| r.get(0))?;
            if v == 0 {
                return Err(StoreError::Incompatible(format!(
                    "{} is not a keepwire database",
                    src.display()
                )));
            }
        }
        let tmp = db.with_extension("restoring");
        let _ = std::fs::remove_file(&tmp);
        {
            let conn = Connection::open_with_flags(src, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
            conn.execute("VACUUM INTO ?1", [tmp.to_string_lossy()])?;
        }
        let epoch = new_epoch();
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
            StoreError::Incompatible(format!("cannot replace {}: {e}", db.display()))
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
                None => Err(StoreError::Commit("could not begin a transaction".into())),
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
                    (Err(e), Ok(_)) => Err(StoreError::Commit(e)),
                };
                let _ = tx.send(out);
            })
        });
        self.writer
            .send(WriterMsg::Job(job))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
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
            .map_err(|_| StoreError::Commit("the store is closed".into()))?;
        let pool = self.readers.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = pool.take()?;
            let r = f(&mut conn);
            pool.put(conn);
            r
        })
        .await
        .map_err(|e| StoreError::Commit(format!("read task failed: {e}")))?
    }
}

fn writer_loop(
    conn: Connection,
    mut rx: mpsc::Receiver<WriterMsg>,
    listener: Arc<OnceLock<Arc<dyn HeadListener>>>,
    metrics: Arc<Metrics>,
) {
    let mut closing: Option<oneshot::Sender<()>> = None;
    let mut batch: Vec<Job> = Vec::new();
    loop {
        if closing.is_none() {
            match rx.blocking_recv() {
                Some(WriterMsg::Job(j)) => batch.push(j),
                Some(WriterMsg::Close(t)) => closing = Some(t),
                None => break,
            }
        }
        // Everything queued meanwhile joins this commit (and, when closing,
        // everything queued before the close request).
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(WriterMsg::Job(j)) => batch.push(j),
                Ok(WriterMsg::Close(t)) => closing = Some(t),
                Err(_) => break,
            }
        }
        if batch.is_empty() {
            if closing.is_some() {
                break;
            }
            continue;
        }
        run_batch(&conn, std::mem::take(&mut batch), &listener, &metrics);
    }
    rx.close();
    // Jobs that raced the close still get an answer.
    while let Ok(msg) = rx.try_recv() {
        if let WriterMsg::Job(j) = msg {
            batch.push(j);
        }
    }
    if !batch.is_empty() {
        run_batch(&conn, batch, &listener, &metrics);
    }
    // Leave a clean database: fold the WAL back into the main file.
    let _ = conn.pragma_update(None, "wal_checkpoint", "TRUNCATE");
    drop(conn);
    if let Some(t) = closing {
        let _ = t.send(());
    }
}

fn run_batch(
    conn: &Connection,
    batch: Vec<Job>,
    listener: &OnceLock<Arc<dyn HeadListener>>,
    metrics: &Metrics,
) {
    let mut heads = Heads::new();
    let jobs = batch.len() as u64;
    let mut wrote_then_failed = false;
    let begun = conn.execute_batch("BEGIN IMMEDIATE");
    let completions: Vec<Completion> = match &begun {
        Ok(()) => batch
            .into_iter()
            .map(|job| job(Some(conn), &mut heads, &mut wrote_then_failed))
            .collect(),
        Err(e) => {
            tracing::error!(target: "keepwire::store", error = %e, "cannot begin a transaction");
            batch
                .into_iter()
                .map(|job| job(None, &mut heads, &mut wrote_then_failed))
                .collect()
        }
    };
    let commit = if wrote_then_failed {
        tracing::error!(target: "keepwire::store", "a job failed after writing: the group commit is rolled back");
        let _ = conn.execute_batch("ROLLBACK");
        Err("a write in the same group commit failed; nothing was stored".to_owned())
    } else if begun.is_ok() {
        match conn.execute_batch("COMMIT") {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::error!(target: "keepwire::store", error = %e, "commit failed");
                let _ = conn.execute_batch("ROLLBACK");
                Err(e.to_string())
            }
        }
    } else {
        Err("could not begin a transaction".to_owned())
    };
    if commit.is_ok() {
        metrics.commits.inc();
        metrics.committed_jobs.inc_by(jobs);
        if !heads.is_empty()
            && let Some(l) = listener.get()
        {
            l.heads_advanced(&heads);
        }
    }
    for c in completions {
        c(commit.clone());
    }
}

struct ReadPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    permits: tokio::sync::Semaphore,
}

impl ReadPool {
    fn take(&self) -> Result<Connection, StoreError> {
        if let Some(c) = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop() {
            return Ok(c);
        }
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(Duration::from_secs(5))?;
        Ok(conn)
    }

    fn put(&self, conn: Connection) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE_READERS {
            idle.push(conn);
        }
    }
}

// ---------------------------------------------------------------------------
// Queries shared by reads and writes.

fn user_id_by_name(conn: &Connection, name: &str) -> Result<Option<UserId>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT id FROM users WHERE name = ?1")?
        .query_row([name], |r| r.get(0))
        .optional()?)
}

fn user_name(conn: &Connection, id: UserId) -> Result<String, StoreError> {
    Ok(conn
        .prepare_cached("SELECT name FROM users WHERE id = ?1")?
        .query_row([id], |r| r.get(0))?)
}

fn is_member(conn: &Connection, conv: ConvId, user: UserId) -> Result<bool, StoreError> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM members WHERE conv_id = ?1 AND user_id = ?2")?
        .query_row(params![conv as i64, user], |_| Ok(()))
        .optional()?
        .is_some())
}

/// The system user's id, created on first use.
fn system_user(conn: &Connection) -> Result<UserId, StoreError> {
    conn.prepare_cached("INSERT OR IGNORE INTO users (name, created_at) VALUES (?1, ?2)")?
        .execute(params![SYSTEM_USER, now_ms()])?;
    user_id_by_name(conn, SYSTEM_USER)?
        .ok_or_else(|| StoreError::Commit("the system user vanished".into()))
}

/// Refuses unless the actor may act in `conv` (the system may, if it exists).
fn require_actor(conn: &Connection, conv: ConvId, actor: Actor) -> Result<(), StoreError> {
    match actor {
        Actor::User(u) => require_member(conn, conv, u),
        Actor::System => {
            let exists = conn
                .prepare_cached("SELECT 1 FROM convs WHERE id = ?1")?
                .query_row([conv as i64], |_| Ok(()))
                .optional()?
                .is_some();
            if exists {
                Ok(())
            } else {
                Err(StoreError::refused(
                    ErrorCode::NoSuchConv,
                    format!("conversation {conv} does not exist"),
                ))
            }
        }
    }
}

/// The acting user's id (the system user for the system).
fn actor_id(conn: &Connection, actor: Actor) -> Result<UserId, StoreError> {
    match actor {
        Actor::User(u) => Ok(u),
        Actor::System => system_user(conn),
    }
}

/// Refuses unless `user` is a member of `conv`.
fn require_member(conn: &Connection, conv: ConvId, user: UserId) -> Result<(), StoreError> {
    if is_member(conn, conv, user)? {
        return Ok(());
    }
    let exists = conn
        .prepare_cached("SELECT 1 FROM convs WHERE id = ?1")?
        .query_row([conv as i64], |_| Ok(()))
        .optional()?
        .is_some();
    Err(if exists {
        StoreError::refused(
            ErrorCode::NotMember,
            format!("you are not a member of conversation {conv}"),
        )
    } else {
        StoreError::refused(
            ErrorCode::NoSuchConv,
            format!("conversation {conv} does not exist"),
        )
    })
}

fn parse_kind(s: &str) -> ConvKind {
    if s == "direct" {
        ConvKind::Direct
    } else {
        ConvKind::Group
    }
}

fn kind_str(k: ConvKind) -> &'static str {
    match k {
        ConvKind::Direct => "direct",
        ConvKind::Group => "group",
    }
}

fn conv_info(conn: &Connection, conv: ConvId) -> Result<Option<ConvInfo>, StoreError> {
    let head = conn
        .prepare_cached("SELECT kind, name, last_seq FROM convs WHERE id = ?1")?
        .query_row([conv as i64], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Option<String>>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })
        .optional()?;
    let Some((kind, name, last_seq)) = head else {
        return Ok(None);
    };
    let mut stmt = conn.prepare_cached(
        "SELECT u.name FROM members m JOIN users u ON u.id = m.user_id
         WHERE m.conv_id = ?1 ORDER BY u.name",
    )?;
    let members = stmt
        .query_map([conv as i64], |r| r.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(ConvInfo {
        id: conv,
        kind: parse_kind(&kind),
        name,
        members,
        last_seq: last_seq as u64,
    }))
}

fn member_ids(conn: &Connection, conv: ConvId) -> Result<Vec<UserId>, StoreError> {
    let mut stmt = conn.prepare_cached("SELECT user_id FROM members WHERE conv_id = ?1")?;
    let ids = stmt
        .query_map([conv as i64], |r| r.get(0))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ids)
}

const MESSAGE_COLUMNS: &str = "m.id, m.conv_id, m.conv_seq, (SELECT name FROM users WHERE id = m.sender_id), m.cid, m.kind, m.body, m.ts";

fn message_from_row(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<Message> {
    Ok(Message {
        id: r.get::<_, i64>(at)? as u64,
        conv: r.get::<_, i64>(at + 1)? as u64,
        conv_seq: r.get::<_, i64>(at + 2)? as u64,
        from: r.get::<_, Option<String>>(at + 3)?.unwrap_or_default(),
        cid: r.get(at + 4)?,
        kind: r.get(at + 5)?,
        body: r.get(at + 6)?,
        ts: r.get(at + 7)?,
    })
}

/// Appends one entry to a user's inbox and applies the count retention.
#[allow(
    clippy::too_many_arguments,
    reason = "one call site per entry kind; a struct would only rename them"
)]
fn append_inbox(
    conn: &Connection,
    user: UserId,
    message_id: Option<i64>,
    event: Option<&str>,
    ts: i64,
    max_entries: Option<u64>,
    heads: &mut Heads,
    item: Option<&Arc<str>>,
) -> Result<Seq, StoreError> {
    let (head, floor): (i64, i64) = conn
        .prepare_cached(
            "UPDATE users SET inbox_head = inbox_head + 1 WHERE id = ?1
             RETURNING inbox_head, inbox_floor",
        )?
        .query_row([user], |r| Ok((r.get(0)?, r.get(1)?)))?;
    conn.prepare_cached(
        "INSERT INTO inbox (user_id, seq, message_id, event, ts) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![user, head, message_id, event, ts])?;
    trim_to_max_entries(conn, user, head, floor, max_entries)?;
    heads.push(HeadAdvance {
        user,
        seq: head as Seq,
        item: item.cloned(),
    });
    Ok(head as Seq)
}

/// Appends message `message_id` to the inbox of every member of `conv`, in
/// two statements whatever the group's size (one row per member, but not one
/// statement per member: that overhead was most of the writer's work under
/// group fanout). Returns the sender's own sequence (its echo), if a member.
#[allow(clippy::too_many_arguments)]
fn append_message_to_members(
    conn: &Connection,
    conv: ConvId,
    message_id: i64,
    sender: UserId,
    ts: i64,
    max_entries: Option<u64>,
    heads: &mut Heads,
    item: &Arc<str>,
) -> Result<Option<Seq>, StoreError> {
    let advanced: Vec<(UserId, i64, i64)> = conn
        .prepare_cached(
            "UPDATE users SET inbox_head = inbox_head + 1
             WHERE id IN (SELECT user_id FROM members WHERE conv_id = ?1)
             RETURNING id, inbox_head, inbox_floor",
        )?
        .query_map([conv as i64], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    conn.prepare_cached(
        "INSERT INTO inbox (user_id, seq, message_id, event, ts)
         SELECT u.id, u.inbox_head, ?2, NULL, ?3
         FROM members m JOIN users u ON u.id = m.user_id WHERE m.conv_id = ?1",
    )?
    .execute(params![conv as i64, message_id, ts])?;
    let mut echo = None;
    for (user, head, floor) in advanced {
        trim_to_max_entries(conn, user, head, floor, max_entries)?;
        heads.push(HeadAdvance {
            user,
            seq: head as Seq,
            item: Some(item.clone()),
        });
        if user == sender {
            echo = Some(head as Seq);
        }
    }
    Ok(echo)
}

/// Retention by count, inline: drops `user`'s oldest entries beyond `max`.
fn trim_to_max_entries(
    conn: &Connection,
    user: UserId,
    head: i64,
    floor: i64,
    max_entries: Option<u64>,
) -> Result<(), StoreError> {
    if let Some(max) = max_entries {
        let max = max.max(1) as i64;
        if head - floor + 1 > max {
            let new_floor = head - max + 1;
            conn.prepare_cached("DELETE FROM inbox WHERE user_id = ?1 AND seq < ?2")?
                .execute(params![user, new_floor])?;
            conn.prepare_cached("UPDATE users SET inbox_floor = ?2 WHERE id = ?1")?
                .execute(params![user, new_floor])?;
        }
    }
    Ok(())
}

fn membership_entries(
    conn: &Connection,
    recipients: &[UserId],
    event: &MemberEvent,
    max_entries: Option<u64>,
    heads: &mut Heads,
) -> Result<(), StoreError> {
    let json = serde_json::to_string(event)
        .map_err(|e| StoreError::Commit(format!("encoding a membership event: {e}")))?;
    for &r in recipients {
        append_inbox(
            conn,
            r,
            None,
            Some(&json),
            event.ts,
            max_entries,
            heads,
            None,
        )?;
    }
    Ok(())
}

fn plan_resume(
    conn: &mut Connection,
    epoch: &str,
    user: UserId,
    cursor: Option<&Cursor>,
    new_window: u64,
) -> Result<ResumePlan, StoreError> {
    let tx = conn.transaction()?;
    let (head, floor): (i64, i64) = tx
        .prepare_cached("SELECT inbox_head, inbox_floor FROM users WHERE id = ?1")?
        .query_row([user], |r| Ok((r.get(0)?, r.get(1)?)))?;
    let (head, floor) = (head as Seq, floor as Seq);
    let fresh_from = head.saturating_sub(new_window).saturating_add(1).max(floor);
    let (status, from, reason, missed) = match cursor {
        None => (ResumeStatus::New, fresh_from, None, None),
        Some(c) if c.epoch != epoch => {
            (ResumeStatus::Gap, fresh_from, Some(GapReason::Epoch), None)
        }
        Some(c) if c.seq > head => (
            ResumeStatus::Gap,
            fresh_from,
            Some(GapReason::CursorAhead),
            None,
        ),
        Some(c) if c.seq + 1 >= floor => (ResumeStatus::Complete, c.seq + 1, None, None),
        Some(c) => (
            ResumeStatus::Gap,
            floor,
            Some(GapReason::Retention),
            Some(SeqRange {
                first: c.seq + 1,
                last: floor - 1,
            }),
        ),
    };
    let fetch = if status == ResumeStatus::Complete {
        Vec::new()
    } else {
        // Per conversation: history below the first message the replay brings.
        let mut first_replayed: HashMap<i64, i64> = HashMap::new();
        let mut stmt = tx.prepare_cached(
            "SELECT m.conv_id, MIN(m.conv_seq) FROM inbox i JOIN messages m ON m.id = i.message_id
             WHERE i.user_id = ?1 AND i.seq >= ?2 GROUP BY m.conv_id",
        )?;
        let rows = stmt.query_map(params![user, from as i64], |r| Ok((r.get(0)?, r.get(1)?)))?;
        for row in rows {
            let (conv, seq) = row?;
            first_replayed.insert(conv, seq);
        }
        drop(stmt);
        let mut stmt = tx.prepare_cached(
            "SELECT c.id, c.last_seq FROM members mb JOIN convs c ON c.id = mb.conv_id
             WHERE mb.user_id = ?1 ORDER BY c.last_seq DESC, c.id",
        )?;
        let convs = stmt
            .query_map([user], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        convs
            .into_iter()
            .map(|(conv, last)| {
                let before = first_replayed.get(&conv).copied().unwrap_or(last + 1);
                FetchHint {
                    conv: conv as u64,
                    before: before as u64,
                }
            })
            .filter(|h| h.before > 1)
            .take(MAX_FETCH_HINTS)
            .collect()
    };
    tx.commit()?;
    Ok(ResumePlan {
        head,
        resume: Resume {
            status,
            from,
            reason,
            missed,
            fetch,
        },
    })
}

fn read_inbox(
    conn: &Connection,
    user: UserId,
    from: Seq,
    limit: usize,
) -> Result<Vec<InboxEntry>, StoreError> {
    let sql = format!(
        "SELECT i.seq, i.event, {MESSAGE_COLUMNS} FROM inbox i LEFT JOIN messages m ON m.id = i.message_id
         WHERE i.user_id = ?1 AND i.seq >= ?2 ORDER BY i.seq LIMIT ?3"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let mut rows = stmt.query(params![user, from as i64, limit as i64])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        let seq = r.get::<_, i64>(0)? as Seq;
        let event: Option<String> = r.get(1)?;
        let item = if let Some(ev) = event {
            // Events are stored as an `EntryItem` (read markers) or, from
            // schema 1, a bare membership event.
            match serde_json::from_str::<EntryItem>(&ev)
                .or_else(|_| serde_json::from_str::<MemberEvent>(&ev).map(EntryItem::Member))
            {
                Ok(e) => e,
                Err(e) => {
                    return Err(StoreError::Commit(format!(
                        "corrupt inbox event {user}/{seq}: {e}"
                    )));
                }
            }
        } else if r.get::<_, Option<i64>>(2)?.is_some() {
            EntryItem::Message(message_from_row(r, 2)?)
        } else {
            // Retention removes an entry and its message together; a dangling
            // entry means the store was damaged. Stop rather than skip silently.
            return Err(StoreError::Commit(format!(
                "inbox entry {user}/{seq} lost its message"
            )));
        };
        out.push(InboxEntry { seq, item });
    }
    Ok(out)
}

fn new_token() -> String {
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    format!(
        "kw_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    )
}

#[async_trait::async_trait]
impl Store for SqliteStore {
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
            Some((_, _, _, exp, None)) if exp <= now_ms() => {
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

    async fn touch_device(&self, user: UserId, device: &str) -> Result<(), StoreError> {
        let device = device.to_owned();
        self.write(move |c, _| {
            let now = now_ms();
            c.prepare_cached(
                "INSERT INTO devices (user_id, device, first_seen, last_seen) VALUES (?1, ?2, ?3, ?3)
                 ON CONFLICT (user_id, device) DO UPDATE SET last_seen = excluded.last_seen",
            )?
            .execute(params![user, device, now])?;
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
        self.read(move |c| plan_resume(c, &epoch, user, cursor.as_ref(), new_window))
            .await
    }

    async fn read_inbox(
        &self,
        user: UserId,
        from: Seq,
        limit: usize,
    ) -> Result<Vec<InboxEntry>, StoreError> {
        self.read(move |c| read_inbox(c, user, from, limit)).await
    }

    async fn send(&self, actor: Actor, device: &str, send: SendMsg) -> Result<Confirm, StoreError> {
        let device = device.to_owned();
        let max_entries = self.retention.max_entries;
        self.write(move |c, heads| {
            let user = actor_id(c, actor)?;
            let digest = send_digest(&send);
            let prior = c
                .prepare_cached(
                    "SELECT digest, message_id, conv_id, conv_seq, ts FROM sends
                     WHERE user_id = ?1 AND device = ?2 AND cid = ?3",
                )?
                .query_row(params![user, device, send.cid], |r| {
                    Ok((
                        r.get::<_, Vec<u8>>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, i64>(4)?,
                    ))
                })
                .optional()?;
            if let Some((d, id, conv, conv_seq, ts)) = prior {
                if d != digest {
                    return Err(StoreError::refused(
                        ErrorCode::CidConflict,
                        "this cid was already used by this device for a different message",
                    ));
                }
                return Ok(Confirm {
                    cid: send.cid,
                    id: id as u64,
                    conv: conv as u64,
                    conv_seq: conv_seq as u64,
                    ts,
                    duplicate: true,
                    echo_seq: None,
                });
            }
            require_actor(c, send.conv, actor)?;
            let ts = log_ts();
            let conv_seq: i64 = c
                .prepare_cached(
                    "UPDATE convs SET last_seq = last_seq + 1 WHERE id = ?1 RETURNING last_seq",
                )?
                .query_row([send.conv as i64], |r| r.get(0))?;
            c.prepare_cached(
                "INSERT INTO messages (conv_id, conv_seq, sender_id, cid, kind, body, ts)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                send.conv as i64,
                conv_seq,
                user,
                send.cid,
                send.kind,
                send.body,
                ts
            ])?;
            let id = c.last_insert_rowid();
            let sender: String = c
                .prepare_cached("SELECT name FROM users WHERE id = ?1")?
                .query_row([user], |r| r.get(0))?;
            // The entry every member's live connections deliver from memory,
            // encoded once.
            let item: Arc<str> = keepwire_proto::encode(&EntryItem::Message(Message {
                id: id as u64,
                conv: send.conv,
                conv_seq: conv_seq as u64,
                from: sender,
                cid: send.cid.clone(),
                kind: send.kind.clone(),
                body: send.body.clone(),
                ts,
            }))
            .into();
            let echo_seq =
                append_message_to_members(c, send.conv, id, user, ts, max_entries, heads, &item)?;
            c.prepare_cached(
                "INSERT INTO sends (user_id, device, cid, digest, message_id, conv_id, conv_seq, ts)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?
            .execute(params![user, device, send.cid, digest, id, send.conv as i64, conv_seq, ts])?;
            Ok(Confirm {
                cid: send.cid,
                id: id as u64,
                conv: send.conv,
                conv_seq: conv_seq as u64,
                ts,
                duplicate: false,
                echo_seq,
            })
        })
        .await
    }

    async fn record_ack(&self, user: UserId, device: &str, seq: Seq) -> Result<(), StoreError> {
        let device = device.to_owned();
        self.write(move |c, _| {
            c.prepare_cached(
                "UPDATE devices SET acked_seq = MAX(acked_seq, ?3), last_seen = ?4
                 WHERE user_id = ?1 AND device = ?2",
            )?
            .execute(params![user, device, seq as i64, now_ms()])?;
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
        self.read(move |c| {
            require_actor(c, conv, actor)?;
            let before = before.unwrap_or(i64::MAX as u64).min(i64::MAX as u64) as i64;
            let sql = format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages m WHERE m.conv_id = ?1 AND m.conv_seq < ?2
                 ORDER BY m.conv_seq DESC LIMIT ?3"
            );
            let mut stmt = c.prepare_cached(&sql)?;
            let mut messages = stmt
                .query_map(params![conv as i64, before, i64::from(limit) + 1], |r| {
                    message_from_row(r, 0)
                })?
                .collect::<Result<Vec<_>, _>>()?;
            let more = messages.len() > limit as usize;
            messages.truncate(limit as usize);
            messages.reverse();
            Ok(HistoryPage {
                rid: String::new(),
                conv,
                messages,
                more,
            })
        })
        .await
    }

    async fn conv_create(
        &self,
        actor: Actor,
        req: ConvCreate,
        max_group_size: usize,
    ) -> Result<(ConvInfo, bool), StoreError> {
        let max_entries = self.retention.max_entries;
        self.write(move |c, heads| {
            // The creator (unless it is the system) is always a member.
            let user = actor_id(c, actor)?;
            let mut ids = match actor {
                Actor::User(u) => BTreeSet::from([u]),
                Actor::System => BTreeSet::new(),
            };
            for name in &req.members {
                let id = user_id_by_name(c, name)?.ok_or_else(|| {
                    StoreError::refused(ErrorCode::UnknownUser, format!("no user named {name:?}"))
                })?;
                ids.insert(id);
            }
            let existing: Option<i64> = match req.kind {
                ConvKind::Direct => {
                    if ids.len() != 2 {
                        return Err(StoreError::refused(
                            ErrorCode::Invalid,
                            "a direct conversation needs another user",
                        ));
                    }
                    let key = ids.iter().map(i64::to_string).collect::<Vec<_>>().join(":");
                    c.prepare_cached("SELECT id FROM convs WHERE direct_key = ?1")?
                        .query_row([key], |r| r.get(0))
                        .optional()?
                }
                ConvKind::Group => c
                    .prepare_cached(
                        "SELECT id FROM convs WHERE created_by = ?1 AND create_key = ?2",
                    )?
                    .query_row(params![user, req.key], |r| r.get(0))
                    .optional()?,
            };
            if let Some(id) = existing {
                let info = conv_info(c, id as u64)?
                    .ok_or_else(|| StoreError::Commit("conversation vanished".into()))?;
                return Ok((info, false));
            }
            if ids.len() > max_group_size {
                return Err(StoreError::refused(
                    ErrorCode::GroupTooLarge,
                    format!("a group has at most {max_group_size} members"),
                ));
            }
            let now = log_ts();
            let direct_key = (req.kind == ConvKind::Direct)
                .then(|| ids.iter().map(i64::to_string).collect::<Vec<_>>().join(":"));
            c.prepare_cached(
                "INSERT INTO convs (kind, name, created_by, create_key, direct_key, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                kind_str(req.kind),
                req.name,
                user,
                req.key,
                direct_key,
                now
            ])?;
            let conv = c.last_insert_rowid() as u64;
            for &id in &ids {
                c.prepare_cached(
                    "INSERT INTO members (conv_id, user_id, joined_at) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![conv as i64, id, now])?;
            }
            let info = conv_info(c, conv)?
                .ok_or_else(|| StoreError::Commit("conversation vanished".into()))?;
            let by = user_name(c, user)?;
            // Each member learns of the conversation through its own inbox.
            for &id in &ids {
                let event = MemberEvent {
                    conv: info.clone(),
                    user: user_name(c, id)?,
                    change: MemberChange::Added,
                    by: by.clone(),
                    ts: now,
                };
                membership_entries(c, &[id], &event, max_entries, heads)?;
            }
            Ok((info, true))
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
        let max_entries = self.retention.max_entries;
        self.write(move |c, heads| {
            require_actor(c, conv, actor)?;
            let user = actor_id(c, actor)?;
            let info = conv_info(c, conv)?.ok_or_else(|| {
                StoreError::refused(
                    ErrorCode::NoSuchConv,
                    format!("conversation {conv} does not exist"),
                )
            })?;
            if info.kind == ConvKind::Direct {
                return Err(StoreError::refused(
                    ErrorCode::Forbidden,
                    "the members of a direct conversation cannot change",
                ));
            }
            let target_id = user_id_by_name(c, &target)?.ok_or_else(|| {
                StoreError::refused(ErrorCode::UnknownUser, format!("no user named {target:?}"))
            })?;
            let present = is_member(c, conv, target_id)?;
            if present == add {
                return Ok((info, false));
            }
            let now = log_ts();
            let recipients = if add {
                if info.members.len() >= max_group_size {
                    return Err(StoreError::refused(
                        ErrorCode::GroupTooLarge,
                        format!("a group has at most {max_group_size} members"),
                    ));
                }
                c.prepare_cached(
                    "INSERT INTO members (conv_id, user_id, joined_at) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![conv as i64, target_id, now])?;
                member_ids(c, conv)?
            } else {
                let creator: i64 = c
                    .prepare_cached("SELECT created_by FROM convs WHERE id = ?1")?
                    .query_row([conv as i64], |r| r.get(0))?;
                if actor != Actor::System && target_id != user && user != creator {
                    return Err(StoreError::refused(
                        ErrorCode::Forbidden,
                        "only the creator can remove other members",
                    ));
                }
                let mut r = member_ids(c, conv)?;
                c.prepare_cached("DELETE FROM members WHERE conv_id = ?1 AND user_id = ?2")?
                    .execute(params![conv as i64, target_id])?;
                // The removed user learns of it too.
                r.sort_unstable();
                r
            };
            let info = conv_info(c, conv)?
                .ok_or_else(|| StoreError::Commit("conversation vanished".into()))?;
            let event = MemberEvent {
                conv: info.clone(),
                user: target.clone(),
                change: if add {
                    MemberChange::Added
                } else {
                    MemberChange::Removed
                },
                by: user_name(c, user)?,
                ts: now,
            };
            membership_entries(c, &recipients, &event, max_entries, heads)?;
            Ok((info, true))
        })
        .await
    }

    async fn conv_list(&self, user: UserId) -> Result<Vec<ConvInfo>, StoreError> {
        self.read(move |c| {
            let ids: Vec<i64> = c
                .prepare_cached("SELECT conv_id FROM members WHERE user_id = ?1 ORDER BY conv_id")?
                .query_map([user], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                if let Some(info) = conv_info(c, id as u64)? {
                    out.push(info);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn conv_member_ids(&self, user: UserId, conv: ConvId) -> Result<Vec<UserId>, StoreError> {
        self.read(move |c| {
            require_member(c, conv, user)?;
            member_ids(c, conv)
        })
        .await
    }

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
        self.write(move |c, _| {
            if user_id_by_name(c, &name)?.is_some() {
                return Err(StoreError::Conflict(format!(
                    "user {name:?} already exists"
                )));
            }
            c.execute(
                "INSERT INTO users (name, created_at) VALUES (?1, ?2)",
                params![name, now_ms()],
            )?;
            Ok(c.last_insert_rowid())
        })
        .await
    }

    async fn mark_read(&self, user: UserId, conv: ConvId, up_to: u64) -> Result<bool, StoreError> {
        let max_entries = self.retention.max_entries;
        self.write(move |c, heads| {
            require_member(c, conv, user)?;
            let last: i64 = c
                .prepare_cached("SELECT last_seq FROM convs WHERE id = ?1")?
                .query_row([conv as i64], |r| r.get(0))?;
            let up_to = (up_to.min(i64::MAX as u64) as i64).min(last);
            let n = c
                .prepare_cached(
                    "INSERT INTO reads (user_id, conv_id, up_to) VALUES (?1, ?2, ?3)
                     ON CONFLICT (user_id, conv_id) DO UPDATE SET up_to = excluded.up_to
                     WHERE excluded.up_to > reads.up_to",
                )?
                .execute(params![user, conv as i64, up_to])?;
            if n == 0 || up_to <= 0 {
                return Ok(false);
            }
            let ts = log_ts();
            let mark = EntryItem::Read(ReadMark {
                conv,
                up_to: up_to as u64,
                ts,
            });
            let json = serde_json::to_string(&mark)
                .map_err(|e| StoreError::Commit(format!("encoding a read marker: {e}")))?;
            append_inbox(c, user, None, Some(&json), ts, max_entries, heads, None)?;
            Ok(true)
        })
        .await
    }

    async fn user_id(&self, name: &str) -> Result<Option<UserId>, StoreError> {
        let name = name.to_owned();
        self.read(move |c| user_id_by_name(c, &name)).await
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
                let id = self
                    .write(move |c, _| {
                        c.prepare_cached(
                            "INSERT OR IGNORE INTO users (name, created_at) VALUES (?1, ?2)",
                        )?
                        .execute(params![name, now_ms()])?;
                        user_id_by_name(c, &name)?
                            .ok_or_else(|| StoreError::Commit("user vanished".into()))
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

    async fn revoke_device(&self, user: &str, device: &str) -> Result<bool, StoreError> {
        let (name, device) = (user.to_owned(), device.to_owned());
        self.write(move |c, _| {
            let user = user_id_by_name(c, &name)?
                .ok_or_else(|| StoreError::NotFound(format!("no user named {name:?}")))?;
            let now = now_ms();
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
                "SELECT device, first_seen, last_seen, acked_seq, revoked_at FROM devices
                 WHERE user_id = ?1 ORDER BY device",
            )?;
            let rows = stmt
                .query_map([user], |r| {
                    Ok(DeviceInfo {
                        device: r.get(0)?,
                        first_seen_ms: r.get(1)?,
                        last_seen_ms: r.get(2)?,
                        acked_seq: r.get::<_, i64>(3)? as u64,
                        revoked_at_ms: r.get(4)?,
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
        self.write(move |c, _| {
            let mut b = [0u8; 32];
            rand::rng().fill_bytes(&mut b);
            let key = format!(
                "kwk_{}",
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
            );
            c.execute(
                "INSERT INTO api_keys (name, hash, created_at) VALUES (?1, ?2, ?3)",
                params![name, hash_token(&key), now_ms()],
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
        self.write(move |c, _| {
            Ok(c.execute(
                "UPDATE api_keys SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
                params![id, now_ms()],
            )? > 0)
        })
        .await
    }

    async fn issue_token(&self, user: &str, ttl: Duration) -> Result<IssuedToken, StoreError> {
        let name = user.to_owned();
        self.write(move |c, _| {
            let id = user_id_by_name(c, &name)?
                .ok_or_else(|| StoreError::NotFound(format!("no user named {name:?}")))?;
            let token = new_token();
            let now = now_ms();
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
        self.write(move |c, _| {
            let now = now_ms();
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

    async fn trim(&self) -> Result<TrimReport, StoreError> {
        let retention = self.retention;
        self.write(move |c, _| {
            let now = now_ms();
            let mut report = TrimReport::default();
            if let Some(age) = retention.max_age {
                let cutoff = now - i64::try_from(age.as_millis()).unwrap_or(i64::MAX);
                // Per user, everything before the first entry young enough
                // to keep (entries are appended in commit order, so a
                // user's entry times rise with the sequence; the scan
                // stops at the first one to keep).
                let mut users =
                    c.prepare_cached("SELECT id, inbox_floor, inbox_head FROM users")?;
                let users: Vec<(i64, i64, i64)> = users
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .collect::<Result<_, _>>()?;
                for (user, floor, head) in users {
                    if floor > head {
                        continue;
                    }
                    let keep_from: i64 = c
                        .prepare_cached(
                            "SELECT seq FROM inbox WHERE user_id = ?1 AND ts >= ?2
                             ORDER BY seq LIMIT 1",
                        )?
                        .query_row(params![user, cutoff], |r| r.get(0))
                        .optional()?
                        .unwrap_or(head + 1);
                    if keep_from > floor {
                        report.inbox_entries += c
                            .prepare_cached("DELETE FROM inbox WHERE user_id = ?1 AND seq < ?2")?
                            .execute(params![user, keep_from])?
                            as u64;
                        c.prepare_cached("UPDATE users SET inbox_floor = ?2 WHERE id = ?1")?
                            .execute(params![user, keep_from])?;
                    }
                }
                report.messages = c.execute("DELETE FROM messages WHERE ts < ?1", [cutoff])? as u64;
            }
            let dedupe = retention
                .dedupe_age
                .unwrap_or(Duration::from_secs(30 * 24 * 3600))
                .max(retention.max_age.unwrap_or_default());
            let cutoff = now - i64::try_from(dedupe.as_millis()).unwrap_or(i64::MAX);
            report.dedupe_keys = c.execute("DELETE FROM sends WHERE ts < ?1", [cutoff])? as u64;
            Ok(report)
        })
        .await
    }

    async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.writer.send(WriterMsg::Close(tx)).await.is_ok() {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp_db() -> (tempdir::Dir, PathBuf) {
        let dir = tempdir::Dir::new();
        let p = dir.path().join("relay.db");
        (dir, p)
    }

    /// A tiny temp dir helper (keeps dev-dependencies small).
    mod tempdir {
        use std::path::{Path, PathBuf};
        pub struct Dir(PathBuf);
        impl Dir {
            pub fn new() -> Self {
                let p = std::env::temp_dir().join(format!(
                    "keepwire-store-test-{}-{}",
                    std::process::id(),
                    rand::random::<u64>()
                ));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
            pub fn path(&self) -> &Path {
                &self.0
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    /// A job that fails after writing must leave nothing behind, and every
    /// other job's answer must match what was stored (success: stored;
    /// error: not stored), whether or not they shared its group commit.
    #[tokio::test]
    async fn a_job_failing_after_writing_leaves_nothing_and_answers_match_the_store() {
        let (_d, p) = tmp_db();
        let store = SqliteStore::open(&p, SqliteOptions::default()).unwrap();
        // Hold the writer so the next jobs queue up and share one group.
        let hold = store.write(|_, _| {
            std::thread::sleep(Duration::from_millis(100));
            Ok(())
        });
        let bad = store.write(|c, _| {
            c.execute(
                "INSERT INTO users (name, created_at) VALUES ('half', 0)",
                [],
            )?;
            Err::<(), _>(StoreError::Commit("failed after writing".into()))
        });
        let good = store.create_user("whole");
        let (held, bad, good) = tokio::join!(hold, bad, good);
        // The holder wrote nothing: it may share the failed group or not.
        assert!(
            matches!(held, Ok(()) | Err(StoreError::Commit(_))),
            "{held:?}"
        );
        assert!(bad.is_err());
        assert_eq!(store.user_id("half").await.unwrap(), None);
        let stored = store.user_id("whole").await.unwrap();
        assert_eq!(good.is_ok(), stored.is_some(), "{good:?} vs {stored:?}");
        // The writer goes on.
        store.create_user("after").await.unwrap();
        store.close().await;
    }

    #[tokio::test]
    async fn durable_settings_are_applied() {
        let (_d, p) = tmp_db();
        let store = SqliteStore::open(&p, SqliteOptions::default()).unwrap();
        let conn = Connection::open(&p).unwrap();
        // Settings are per connection: check the writer's through a job.
        let (sync, mode) = store
            .write(|c, _| {
                let s: i64 = c.pragma_query_value(None, "synchronous", |r| r.get(0))?;
                let m: String = c.pragma_query_value(None, "journal_mode", |r| r.get(0))?;
                Ok((s, m))
            })
            .await
            .unwrap();
        assert_eq!(sync, 2, "synchronous must be FULL (2)");
        assert_eq!(mode, "wal");
        let m: String = conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(m, "wal", "WAL is persistent in the file");
        store.close().await;
    }

    #[tokio::test]
    async fn reopen_keeps_epoch_and_restore_changes_it() {
        let (d, p) = tmp_db();
        let store = SqliteStore::open(&p, SqliteOptions::default()).unwrap();
        let epoch = store.epoch();
        store.create_user("alice").await.unwrap();
        store.close().await;
        let store = SqliteStore::open(&p, SqliteOptions::default()).unwrap();
        assert_eq!(store.epoch(), epoch);
        store.close().await;
        let backup = d.path().join("backup.db");
        SqliteStore::backup(&p, &backup).unwrap();
        let new = SqliteStore::restore(&backup, &p).unwrap();
        assert_ne!(new, epoch);
        let store = SqliteStore::open(&p, SqliteOptions::default()).unwrap();
        assert_eq!(store.epoch(), new);
        assert!(matches!(
            store.create_user("alice").await,
            Err(StoreError::Conflict(_))
        ));
        store.close().await;
    }

    #[tokio::test]
    async fn rejects_foreign_databases() {
        let (_d, p) = tmp_db();
        let c = Connection::open(&p).unwrap();
        c.execute_batch("CREATE TABLE other(x)").unwrap();
        drop(c);
        assert!(matches!(
            SqliteStore::open(&p, SqliteOptions::default()),
            Err(StoreError::Incompatible(_))
        ));
    }

    #[tokio::test]
    async fn tokens_authenticate_expire_and_revoke() {
        let (_d, p) = tmp_db();
        let store = SqliteStore::open(&p, SqliteOptions::default()).unwrap();
        store.create_user("alice").await.unwrap();
        let t = store
            .issue_token("alice", Duration::from_secs(60))
            .await
            .unwrap();
        let u = store.authenticate(&t.token).await.unwrap();
        assert_eq!(u.name, "alice");
        assert!(matches!(
            store.authenticate("kw_forged").await,
            Err(StoreError::Auth(AuthFailure::Unknown))
        ));
        let short = store
            .issue_token("alice", Duration::from_millis(0))
            .await
            .unwrap();
        assert!(matches!(
            store.authenticate(&short.token).await,
            Err(StoreError::Auth(AuthFailure::Expired))
        ));
        assert_eq!(
            store
                .revoke(RevokeTarget::Token(t.token.clone()))
                .await
                .unwrap(),
            1
        );
        assert!(matches!(
            store.authenticate(&t.token).await,
            Err(StoreError::Auth(AuthFailure::Revoked))
        ));
        let revs = store.revocations_after(0).await.unwrap();
        assert_eq!(revs.len(), 1);
        assert_eq!(revs[0].token_id, Some(t.id));
        store.close().await;
    }

    #[tokio::test]
    async fn sends_fan_out_with_gap_free_inboxes_and_dedupe() {
        let (_d, p) = tmp_db();
        let store = SqliteStore::open(&p, SqliteOptions::default()).unwrap();
        let a = store.create_user("a").await.unwrap();
        let b = store.create_user("b").await.unwrap();
        let (conv, created) = store
            .conv_create(
                Actor::User(a),
                ConvCreate {
                    rid: "r".into(),
                    key: "k1".into(),
                    kind: ConvKind::Direct,
                    members: vec!["b".into()],
                    name: None,
                },
                100,
            )
            .await
            .unwrap();
        assert!(created);
        let send = |cid: &str, body: &str| SendMsg {
            cid: cid.into(),
            conv: conv.id,
            kind: "text".into(),
            body: body.into(),
        };
        let c1 = store
            .send(Actor::User(a), "d1", send("0000000000000001", "hi"))
            .await
            .unwrap();
        let again = store
            .send(Actor::User(a), "d1", send("0000000000000001", "hi"))
            .await
            .unwrap();
        assert!(again.duplicate);
        assert_eq!((again.id, again.conv_seq), (c1.id, c1.conv_seq));
        assert!(matches!(
            store
                .send(Actor::User(a), "d1", send("0000000000000001", "other"))
                .await,
            Err(StoreError::Refused(ErrorCode::CidConflict, _))
        ));
        // Same cid from another device is a different send.
        let c2 = store
            .send(Actor::User(a), "d2", send("0000000000000001", "hi"))
            .await
            .unwrap();
        assert_ne!(c2.id, c1.id);
        let entries = store.read_inbox(b, 1, 100).await.unwrap();
        let seqs: Vec<_> = entries.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![1, 2, 3], "membership entry then two messages");
        let entries = store.read_inbox(a, 1, 100).await.unwrap();
        assert_eq!(entries.len(), 3);
        store.close().await;
    }
}
