//! The client store: one SQLite database per device ("home").
//!
//! Holds the device id, relay URLs, the token, the durable outbox, the
//! messages and conversations received, and the resume cursor. The cursor
//! advances in the same transaction as the entries it covers, so a crash at
//! any point resumes without loss or duplicates. WAL with `synchronous=FULL`:
//! what was acknowledged to the relay survives power loss.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keepwire_core::{BackfillDue, OutboxItem};

use crate::home::Home;
use keepwire_proto::{
    ConvInfo, ConvKind, Cursor, EntryItem, ErrorCode, InboxEntry, MemberChange, MemberEvent,
    Message, MuteMark, ReadMark,
};
use rusqlite::{Connection, OptionalExtension, params};

const MIGRATIONS: &[(&str, &str)] = &[
    ("0001_init", include_str!("migrations/0001_init.sql")),
    (
        "0002_notifications",
        include_str!("migrations/0002_notifications.sql"),
    ),
    (
        "0003_read_marks",
        include_str!("migrations/0003_read_marks.sql"),
    ),
    (
        "0004_analytics",
        include_str!("migrations/0004_analytics.sql"),
    ),
    (
        "0005_backfill",
        include_str!("migrations/0005_backfill.sql"),
    ),
    (
        "0006_outbox_error_code",
        include_str!("migrations/0006_outbox_error_code.sql"),
    ),
];

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("client store: {0}")]
    Db(#[from] rusqlite::Error),
    /// The home directory could not be prepared.
    #[error("client home {path}: {error}")]
    Home {
        /// The directory.
        path: PathBuf,
        /// What went wrong.
        error: std::io::Error,
    },
    /// The database is newer than this binary or not a keepwire store.
    #[error("{0}")]
    Incompatible(String),
}

/// The outcome of persisting a batch of inbox entries.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Persisted {
    /// The cursor after the batch (`None` if nothing new was stored).
    pub cursor: Option<u64>,
    /// Messages stored by this batch (not seen before).
    pub messages: Vec<Message>,
    /// Membership changes in this batch.
    pub members: Vec<MemberEvent>,
    /// Read markers from the user's other devices in this batch.
    pub reads: Vec<ReadMark>,
    /// Mutes and unmutes from the user's devices in this batch (applied to
    /// the preferences in the same transaction).
    pub mutes: Vec<MuteMark>,
}

/// A row of the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    /// Insertion order.
    pub seq: i64,
    /// The send.
    pub item: OutboxItem,
    /// Pending or failed.
    pub state: OutboxState,
    /// When it was queued, ms since the Unix epoch.
    pub created_at_ms: i64,
}

/// Where a send in the outbox stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutboxState {
    /// Waiting to be sent, or sent and not confirmed yet.
    Pending,
    /// The relay refused it for good (it stays until retried or dropped).
    Failed {
        /// The relay's code.
        code: ErrorCode,
        /// The relay's message.
        message: String,
    },
}

impl OutboxState {
    /// `pending` or `failed` (as `keepwire outbox` shows it).
    pub fn name(&self) -> &'static str {
        match self {
            OutboxState::Pending => "pending",
            OutboxState::Failed { .. } => "failed",
        }
    }

    /// From the row's `status`, `error_code` and `error` columns.
    fn from_row(status: &str, code: Option<String>, message: Option<String>) -> OutboxState {
        match status {
            "failed" => OutboxState::Failed {
                code: code.map_or(ErrorCode::Internal, |c| ErrorCode::from_wire(&c)),
                message: message.unwrap_or_default(),
            },
            _ => OutboxState::Pending,
        }
    }
}

/// Why [`Store::outbox_retry`] or [`Store::outbox_drop`] did nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutboxRefusal {
    /// No send with this client id is in the outbox (it was confirmed, or
    /// never existed).
    Unknown,
    /// The send is still pending (only failed sends are retried).
    Pending,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A connection to a home's database. Each process (and each handle that
/// needs its own) opens one; SQLite serializes writers.
pub struct Store {
    pub(crate) conn: Connection,
    home: PathBuf,
}

/// Sets the database and its WAL and shared-memory files (those that exist)
/// to 0600.
fn tighten_modes(home: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let db = Home::new(home).database();
    for suffix in ["", "-wal", "-shm"] {
        let mut name = db.clone().into_os_string();
        name.push(suffix);
        match std::fs::set_permissions(&name, std::fs::Permissions::from_mode(0o600)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            other => other?,
        }
    }
    Ok(())
}

impl Store {
    /// Opens (creating if needed) the store in `home`. The home is made
    /// owner-only (0700) and the database with its WAL and shared-memory
    /// files 0600 on every open, not only when new: the token and every
    /// message live in there, and a mode loosened since (by hand, a backup
    /// tool, an older version) is tightened again.
    pub fn open(home: &Path) -> Result<Store, StoreError> {
        use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
        let home_err = |error| StoreError::Home {
            path: home.to_owned(),
            error,
        };
        std::fs::create_dir_all(home).map_err(home_err)?;
        std::fs::set_permissions(home, std::fs::Permissions::from_mode(0o700)).map_err(home_err)?;
        let path = Home::new(home).database();
        // Created owner-only before SQLite opens it (never readable by others,
        // not even for a moment); SQLite gives its WAL and -shm files the
        // database file's mode. `create_new`: an existing database is never
        // opened (and closed) here, since closing any descriptor of a file
        // drops every POSIX lock this process holds on it, SQLite's included.
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(home_err(e)),
        }
        let mut conn = Connection::open(&path)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        migrate(&mut conn)?;
        tighten_modes(home).map_err(home_err)?;
        Ok(Store {
            conn,
            home: home.to_owned(),
        })
    }

    /// The home directory.
    pub fn home(&self) -> &Path {
        &self.home
    }

    /// A meta value.
    pub fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT value FROM meta WHERE key = ?1")?
            .query_row([key], |r| r.get(0))
            .optional()?)
    }

    /// The next boot number of this home (one more than the last): a process
    /// takes one when it takes the connection (see `keepwire_core::Config::boot`).
    pub fn next_boot(&self) -> Result<u64, StoreError> {
        let n = self
            .conn
            .prepare_cached(
                "INSERT INTO meta (key, value) VALUES ('boot', '1')
                 ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + 1
                 RETURNING value",
            )?
            .query_row([], |r| r.get::<_, String>(0))?;
        Ok(n.parse().unwrap_or(0))
    }

    /// Asks the process holding this home's connection for a sync (a
    /// `keepwire sync` beside a running `tail` or agent): the request's
    /// number, which [`Store::holder_sync_answer`] reports once the holder
    /// answered it. The holder notices the request by the store's
    /// `data_version`, as it notices sends queued by other processes.
    pub fn ask_holder_sync(&self) -> Result<u64, StoreError> {
        let n = self
            .conn
            .prepare_cached(
                "INSERT INTO meta (key, value) VALUES ('sync_asked', '1')
                 ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + 1
                 RETURNING value",
            )?
            .query_row([], |r| r.get::<_, String>(0))?;
        Ok(n.parse().unwrap_or(0))
    }

    /// The number of the last sync asked of the holder (0: none yet).
    pub fn holder_sync_asked(&self) -> Result<u64, StoreError> {
        Ok(self
            .meta("sync_asked")?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0))
    }

    /// The holder took up the syncs asked up to `n` (it answers later).
    pub fn acknowledge_holder_sync(&self, n: u64) -> Result<(), StoreError> {
        self.set_meta("sync_seen", &n.to_string())
    }

    /// The last sync request the holder took up (0: none).
    pub fn holder_sync_seen(&self) -> Result<u64, StoreError> {
        Ok(self
            .meta("sync_seen")?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0))
    }

    /// The holder's answer to the syncs asked up to `n`: `caught_up` or
    /// `unreachable`.
    pub fn answer_holder_sync(&self, n: u64, outcome: &str) -> Result<(), StoreError> {
        self.set_meta("sync_answer", &format!("{n} {outcome}"))
    }

    /// The holder's last answer: the number of the request it answered (and
    /// every earlier one) and the outcome.
    pub fn holder_sync_answer(&self) -> Result<Option<(u64, String)>, StoreError> {
        Ok(self.meta("sync_answer")?.and_then(|v| {
            let (n, outcome) = v.split_once(' ')?;
            Some((n.parse().ok()?, outcome.to_owned()))
        }))
    }

    /// Sets a meta value.
    pub fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value")?
            .execute(params![key, value])?;
        Ok(())
    }

    fn delete_meta(&self, key: &str) -> Result<(), StoreError> {
        self.conn
            .execute("DELETE FROM meta WHERE key = ?1", [key])?;
        Ok(())
    }

    /// This device's id, created (random) on first use.
    pub fn device_id(&self) -> Result<String, StoreError> {
        if let Some(d) = self.meta("device")? {
            return Ok(d);
        }
        let id = format!("dev-{:016x}", rand::random::<u64>());
        self.conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('device', ?1)",
            [&id],
        )?;
        Ok(self.meta("device")?.unwrap_or(id))
    }

    /// Saves the relay URLs and token (`keepwire login`).
    pub fn save_login(&self, urls: &[String], token: &str) -> Result<(), StoreError> {
        self.save_urls(urls)?;
        self.set_meta("token", token)
    }

    /// Saves the relay URLs alone (the token is kept elsewhere, in a keyring).
    pub fn save_urls(&self, urls: &[String]) -> Result<(), StoreError> {
        self.set_meta(
            "urls",
            &serde_json::to_string(urls).unwrap_or_else(|_| "[]".into()),
        )
    }

    /// Removes the saved token (it moved to a keyring), overwriting its bytes
    /// in the database file (`secure_delete`) and, when no other process
    /// reads the database, in the write-ahead log (a checkpoint).
    pub fn forget_token(&self) -> Result<(), StoreError> {
        self.conn.pragma_update(None, "secure_delete", true)?;
        self.delete_meta("token")?;
        let _ = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
        Ok(())
    }

    /// The saved relay URLs.
    pub fn urls(&self) -> Result<Vec<String>, StoreError> {
        Ok(self
            .meta("urls")?
            .and_then(|u| serde_json::from_str(&u).ok())
            .unwrap_or_default())
    }

    /// The saved token.
    pub fn token(&self) -> Result<Option<String>, StoreError> {
        self.meta("token")
    }

    /// The resume cursor.
    pub fn cursor(&self) -> Result<Option<Cursor>, StoreError> {
        let epoch = self.meta("epoch")?;
        let seq = self.meta("cursor")?.and_then(|s| s.parse().ok());
        Ok(match (epoch, seq) {
            (Some(epoch), Some(seq)) => Some(Cursor { epoch, seq }),
            _ => None,
        })
    }

    /// Forgets everything learnt in a previous epoch of the relay's log
    /// (message and conversation ids mean other things now). Returns how
    /// many stored messages were forgotten.
    pub fn reset_epoch(&mut self, epoch: &str) -> Result<u64, StoreError> {
        let tx = self.conn.transaction()?;
        let dropped = tx.execute("DELETE FROM messages", [])? as u64;
        tx.execute("DELETE FROM convs", [])?;
        tx.execute("DELETE FROM backfill", [])?;
        tx.execute("DELETE FROM meta WHERE key IN ('cursor')", [])?;
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('epoch', ?1) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [epoch],
        )?;
        tx.commit()?;
        Ok(dropped)
    }

    /// Adds a send to the durable outbox; returns it with its new client id.
    pub fn enqueue(&self, conv: u64, kind: &str, body: &str) -> Result<OutboxRow, StoreError> {
        let cid = format!("{:032x}", rand::random::<u128>());
        let now = now_ms();
        self.conn
            .prepare_cached("INSERT INTO outbox (cid, conv, kind, body, created_at) VALUES (?1, ?2, ?3, ?4, ?5)")?
            .execute(params![cid, conv as i64, kind, body, now])?;
        Ok(OutboxRow {
            seq: self.conn.last_insert_rowid(),
            item: OutboxItem {
                cid,
                conv,
                kind: kind.into(),
                body: body.into(),
            },
            state: OutboxState::Pending,
            created_at_ms: now,
        })
    }

    /// Pending sends with `seq > after`, in order.
    pub fn pending_after(&self, after: i64) -> Result<Vec<OutboxRow>, StoreError> {
        self.outbox_rows("WHERE seq > ?1 AND status = 'pending'", after)
    }

    /// Every send in the outbox (pending and failed), oldest first.
    pub fn outbox(&self) -> Result<Vec<OutboxRow>, StoreError> {
        self.outbox_rows("WHERE seq > ?1", 0)
    }

    fn outbox_rows(&self, filter: &str, after: i64) -> Result<Vec<OutboxRow>, StoreError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT seq, cid, conv, kind, body, status, error_code, error, created_at FROM outbox
             {filter} ORDER BY seq"
        ))?;
        let rows = stmt
            .query_map([after], |r| {
                Ok(OutboxRow {
                    seq: r.get(0)?,
                    item: OutboxItem {
                        cid: r.get(1)?,
                        conv: r.get::<_, i64>(2)? as u64,
                        kind: r.get(3)?,
                        body: r.get(4)?,
                    },
                    state: OutboxState::from_row(&r.get::<_, String>(5)?, r.get(6)?, r.get(7)?),
                    created_at_ms: r.get(8)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Queues a failed send again, at the end of the outbox (so the process
    /// holding the connection, which reads the outbox in order, picks it
    /// up), with its client id: the relay refused it, so it stored nothing
    /// under that id. Its original time is kept.
    pub fn outbox_retry(&mut self, cid: &str) -> Result<Result<(), OutboxRefusal>, StoreError> {
        let tx = self.conn.transaction()?;
        let status: Option<String> = tx
            .query_row("SELECT status FROM outbox WHERE cid = ?1", [cid], |r| {
                r.get(0)
            })
            .optional()?;
        match status.as_deref() {
            None => return Ok(Err(OutboxRefusal::Unknown)),
            Some("failed") => {}
            Some(_) => return Ok(Err(OutboxRefusal::Pending)),
        }
        // A new row (a new `seq`) with the same content; the old one goes.
        tx.execute(
            "INSERT INTO outbox (cid, conv, kind, body, created_at)
             SELECT ?2, conv, kind, body, created_at FROM outbox WHERE cid = ?1",
            params![cid, format!("{cid}~")],
        )?;
        tx.execute("DELETE FROM outbox WHERE cid = ?1", [cid])?;
        tx.execute(
            "UPDATE outbox SET cid = ?1 WHERE cid = ?2",
            params![cid, format!("{cid}~")],
        )?;
        tx.commit()?;
        Ok(Ok(()))
    }

    /// Removes a send from the outbox (it will not be sent). The caller
    /// makes sure no process is sending it (a pending send may be on its
    /// way to the relay).
    pub fn outbox_drop(&self, cid: &str) -> Result<Result<(), OutboxRefusal>, StoreError> {
        let n = self
            .conn
            .execute("DELETE FROM outbox WHERE cid = ?1", [cid])?;
        Ok(if n == 0 {
            Err(OutboxRefusal::Unknown)
        } else {
            Ok(())
        })
    }

    /// The status of a send: `None` once confirmed (it left the outbox).
    pub fn outbox_status(&self, cid: &str) -> Result<Option<OutboxState>, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT status, error_code, error FROM outbox WHERE cid = ?1")?
            .query_row([cid], |r| {
                Ok(OutboxState::from_row(
                    &r.get::<_, String>(0)?,
                    r.get(1)?,
                    r.get(2)?,
                ))
            })
            .optional()?)
    }

    /// Counts (pending, failed) sends.
    pub fn outbox_counts(&self) -> Result<(u64, u64), StoreError> {
        Ok(self.conn.query_row(
            "SELECT COALESCE(SUM(status = 'pending'), 0), COALESCE(SUM(status = 'failed'), 0) FROM outbox",
            [],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
        )?)
    }

    /// A send was confirmed: it leaves the outbox.
    pub fn confirm(&self, cid: &str) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("DELETE FROM outbox WHERE cid = ?1")?
            .execute([cid])?;
        Ok(())
    }

    /// A send failed for good: it stays visible as failed.
    pub fn fail(&self, cid: &str, code: ErrorCode, message: &str) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "UPDATE outbox SET status = 'failed', error_code = ?2, error = ?3 WHERE cid = ?1",
            )?
            .execute(params![cid, code.as_str(), message])?;
        Ok(())
    }

    /// Persists inbox entries and moves the cursor over them, in one
    /// transaction. Entries at or below the stored cursor (a replay after a
    /// crash before the ack) are skipped; the batch must continue the cursor.
    pub fn persist_entries(
        &mut self,
        epoch: &str,
        entries: &[InboxEntry],
    ) -> Result<Persisted, StoreError> {
        let cursor = self.cursor()?.filter(|c| c.epoch == epoch).map(|c| c.seq);
        let tx = self.conn.transaction()?;
        let mut out = Persisted::default();
        let mut last = cursor;
        for e in entries {
            if last.is_some_and(|l| e.seq <= l) {
                continue;
            }
            if let Some(l) = last
                && e.seq != l + 1
            {
                return Err(StoreError::Incompatible(format!(
                    "inbox entry {} does not follow the cursor {l}",
                    e.seq
                )));
            }
            match &e.item {
                EntryItem::Message(m) => {
                    let n = tx
                        .prepare_cached(
                            "INSERT INTO messages (id, conv, conv_seq, sender, cid, kind, body, ts, inbox_seq)
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                             ON CONFLICT (conv, conv_seq) DO UPDATE SET inbox_seq = excluded.inbox_seq
                             WHERE messages.inbox_seq IS NULL",
                        )?
                        .execute(params![
                            m.id as i64, m.conv as i64, m.conv_seq as i64, m.from, m.cid, m.kind, m.body, m.ts, e.seq as i64
                        ])?;
                    if n > 0 {
                        out.messages.push(m.clone());
                    }
                }
                EntryItem::Member(ev) => {
                    upsert_conv(&tx, &ev.conv, true)?;
                    out.members.push(ev.clone());
                }
                EntryItem::Read(mark) => {
                    tx.prepare_cached(
                        "INSERT INTO read_marks (conv, up_to) VALUES (?1, ?2)
                         ON CONFLICT (conv) DO UPDATE SET up_to = MAX(up_to, excluded.up_to)",
                    )?
                    .execute(params![mark.conv as i64, mark.up_to as i64])?;
                    // Read elsewhere: nothing unread here any more.
                    tx.prepare_cached("DELETE FROM unread WHERE conv = ?1")?
                        .execute([mark.conv as i64])?;
                    out.reads.push(mark.clone());
                }
                EntryItem::Mute(mark) => out.mutes.push(mark.clone()),
                _ => {}
            }
            last = Some(e.seq);
        }
        if last != cursor
            && let Some(seq) = last
        {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('cursor', ?1) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [seq.to_string()],
            )?;
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('epoch', ?1) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [epoch],
            )?;
            out.cursor = Some(seq);
        }
        crate::push::apply_mutes(&tx, &out.mutes)?;
        tx.commit()?;
        // Mark conversations this user left.
        for ev in &out.members {
            if ev.change == MemberChange::Removed && !ev.conv.members.contains(&ev.user) {
                let me = self.meta("user")?;
                if me.as_deref() == Some(ev.user.as_str()) {
                    self.conn.execute(
                        "UPDATE convs SET active = 0 WHERE id = ?1",
                        [ev.conv.id as i64],
                    )?;
                }
            }
        }
        Ok(out)
    }

    /// Stores messages from history paging (no cursor change). Returns how many were new.
    pub fn store_history(&mut self, messages: &[Message]) -> Result<usize, StoreError> {
        let tx = self.conn.transaction()?;
        let n = insert_history(&tx, messages)?;
        tx.commit()?;
        Ok(n)
    }

    /// Stores a backfill page of `conv` and what is left of its fill
    /// (`due`: `None` when it is done), in one transaction.
    pub fn store_backfill(
        &mut self,
        conv: u64,
        messages: &[Message],
        due: Option<BackfillDue>,
    ) -> Result<usize, StoreError> {
        let tx = self.conn.transaction()?;
        let n = insert_history(&tx, messages)?;
        match due {
            Some(d) => {
                tx.prepare_cached(
                    "INSERT INTO backfill (conv, before, known) VALUES (?1, ?2, ?3)
                     ON CONFLICT(conv) DO UPDATE SET before = excluded.before, known = excluded.known",
                )?
                .execute(params![d.conv as i64, d.before as i64, d.known as i64])?;
            }
            None => {
                tx.prepare_cached("DELETE FROM backfill WHERE conv = ?1")?
                    .execute([conv as i64])?;
            }
        }
        tx.commit()?;
        Ok(n)
    }

    /// The gap fills not done yet (given back to the connection at start).
    pub fn backfills_due(&self) -> Result<Vec<BackfillDue>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT conv, before, known FROM backfill ORDER BY conv")?;
        let rows = stmt.query_map([], |r| {
            Ok(BackfillDue {
                conv: r.get::<_, i64>(0)? as u64,
                before: r.get::<_, i64>(1)? as u64,
                known: r.get::<_, i64>(2)? as u64,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records conversations (from a list answer or a create).
    pub fn store_convs(&mut self, convs: &[ConvInfo]) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        for c in convs {
            upsert_conv(&tx, c, true)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The highest `conv_seq` stored for a conversation (0 = none).
    pub fn max_conv_seq(&self, conv: u64) -> Result<u64, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT COALESCE(MAX(conv_seq), 0) FROM messages WHERE conv = ?1")?
            .query_row([conv as i64], |r| r.get::<_, i64>(0))? as u64)
    }

    /// Stored messages, oldest first (of one conversation, or all by arrival).
    pub fn messages(&self, conv: Option<u64>, limit: usize) -> Result<Vec<Message>, StoreError> {
        let (sql, arg) = match conv {
            Some(c) => (
                "SELECT id, conv, conv_seq, sender, cid, kind, body, ts FROM
                   (SELECT * FROM messages WHERE conv = ?1 ORDER BY conv_seq DESC LIMIT ?2)
                 ORDER BY conv_seq",
                c as i64,
            ),
            None => (
                "SELECT id, conv, conv_seq, sender, cid, kind, body, ts FROM
                   (SELECT * FROM messages WHERE ?1 >= 0 ORDER BY COALESCE(inbox_seq, 0) DESC, conv, conv_seq DESC LIMIT ?2)
                 ORDER BY COALESCE(inbox_seq, 0), conv, conv_seq",
                0,
            ),
        };
        let mut stmt = self.conn.prepare_cached(sql)?;
        let rows = stmt
            .query_map(params![arg, limit as i64], message_row)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Messages that arrived through the inbox after `inbox_seq`, in order.
    pub fn messages_after(
        &self,
        inbox_seq: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Message)>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, conv, conv_seq, sender, cid, kind, body, ts, inbox_seq FROM messages
             WHERE inbox_seq > ?1 ORDER BY inbox_seq LIMIT ?2",
        )?;
        let rows = stmt
            .query_map(params![inbox_seq as i64, limit as i64], |r| {
                Ok((r.get::<_, i64>(8)? as u64, message_row(r)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Known conversations.
    pub fn convs(&self) -> Result<Vec<ConvInfo>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT c.id, c.kind, c.name, c.members, COALESCE((SELECT MAX(conv_seq) FROM messages m WHERE m.conv = c.id), 0)
             FROM convs c WHERE active = 1 ORDER BY c.id",
        )?;
        let rows = stmt
            .query_map([], |r| {
                let members: String = r.get(3)?;
                Ok(ConvInfo {
                    id: r.get::<_, i64>(0)? as u64,
                    kind: if r.get::<_, String>(1)? == "direct" {
                        ConvKind::Direct
                    } else {
                        ConvKind::Group
                    },
                    name: r.get(2)?,
                    members: serde_json::from_str(&members).unwrap_or_default(),
                    last_seq: r.get::<_, i64>(4)? as u64,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Counts stored messages.
    pub fn message_count(&self) -> Result<u64, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT COUNT(*) FROM messages", [], |r| r.get::<_, i64>(0))?
            as u64)
    }

    /// Changes whenever another connection commits (cheap change detection).
    pub fn data_version(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn
            .pragma_query_value(None, "data_version", |r| r.get(0))?)
    }

    /// Background heartbeats learnt per network: (interval, settled).
    pub fn learned_heartbeats(
        &self,
    ) -> Result<std::collections::HashMap<String, (Duration, bool)>, StoreError> {
        let raw: std::collections::HashMap<String, (u64, bool)> = self
            .meta("heartbeats")?
            .and_then(|j| serde_json::from_str(&j).ok())
            .unwrap_or_default();
        Ok(raw
            .into_iter()
            .map(|(k, (ms, settled))| (k, (Duration::from_millis(ms), settled)))
            .collect())
    }

    /// Records the heartbeat learnt for a network.
    pub fn save_learned_heartbeat(
        &self,
        network: &str,
        interval: Duration,
        settled: bool,
    ) -> Result<(), StoreError> {
        let mut raw: std::collections::HashMap<String, (u64, bool)> = self
            .meta("heartbeats")?
            .and_then(|j| serde_json::from_str(&j).ok())
            .unwrap_or_default();
        raw.insert(network.to_owned(), (interval.as_millis() as u64, settled));
        self.set_meta(
            "heartbeats",
            &serde_json::to_string(&raw).unwrap_or_else(|_| "{}".into()),
        )
    }

    /// The user's preferences.
    pub fn prefs(&self) -> Result<crate::notify::Prefs, StoreError> {
        Ok(self
            .meta("prefs")?
            .and_then(|p| serde_json::from_str(&p).ok())
            .unwrap_or_default())
    }

    /// Saves the user's preferences.
    pub fn set_prefs(&self, p: &crate::notify::Prefs) -> Result<(), StoreError> {
        self.set_meta(
            "prefs",
            &serde_json::to_string(p).unwrap_or_else(|_| "{}".into()),
        )
    }

    /// Records the connection status for other processes (`keepwire status`).
    pub fn save_status(&self, state: &str, last_error: Option<&str>) -> Result<(), StoreError> {
        self.set_meta("state", state)?;
        match last_error {
            Some(e) => self.set_meta("last_error", e),
            None => self.delete_meta("last_error"),
        }
    }
}

/// What a claim decided for one conversation's new messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    /// Conversation.
    pub conv: u64,
    /// Messages claimed for showing in this batch (oldest first).
    pub shown: Vec<Message>,
    /// Unread messages in the conversation, these included.
    pub unread: u64,
    /// Distinct senders of the unread messages known so far.
    pub last_sender: String,
}

impl Store {
    /// Claims notifications for `messages`: each message is claimed once, ever
    /// (across processes), in one transaction. `show(m)` says whether a
    /// message may be shown (not muted, not quiet hours, not our own); the
    /// others are claimed as suppressed so they never show later. Returns, per
    /// conversation, what to show now.
    pub fn claim_notifications(
        &mut self,
        messages: &[Message],
        show: impl Fn(&Message) -> bool,
    ) -> Result<Vec<Claimed>, StoreError> {
        let tx = self.conn.transaction()?;
        let now = now_ms();
        let mut out: Vec<Claimed> = Vec::new();
        for m in messages {
            let visible = show(m);
            let n = tx
                .prepare_cached("INSERT OR IGNORE INTO notified (message_id, conv, shown, at) VALUES (?1, ?2, ?3, ?4)")?
                .execute(params![m.id as i64, m.conv as i64, visible, now])?;
            if n == 0 || !visible {
                continue;
            }
            let unread: i64 = tx
                .prepare_cached(
                    "INSERT INTO unread (conv, count, last_sender, last_body) VALUES (?1, 1, ?2, ?3)
                     ON CONFLICT (conv) DO UPDATE SET count = count + 1, last_sender = excluded.last_sender,
                       last_body = excluded.last_body
                     RETURNING count",
                )?
                .query_row(params![m.conv as i64, m.from, m.body], |r| r.get(0))?;
            match out.iter_mut().find(|c| c.conv == m.conv) {
                Some(c) => {
                    c.shown.push(m.clone());
                    c.unread = unread as u64;
                    c.last_sender = m.from.clone();
                }
                None => out.push(Claimed {
                    conv: m.conv,
                    shown: vec![m.clone()],
                    unread: unread as u64,
                    last_sender: m.from.clone(),
                }),
            }
        }
        tx.commit()?;
        Ok(out)
    }

    /// The read marker of a conversation (0 = nothing read elsewhere).
    pub fn read_mark(&self, conv: u64) -> Result<u64, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT up_to FROM read_marks WHERE conv = ?1")?
            .query_row([conv as i64], |r| r.get::<_, i64>(0))
            .optional()?
            .unwrap_or(0) as u64)
    }

    /// Records a read marker set on this device (and clears its unread count).
    pub fn set_read_mark(&self, conv: u64, up_to: u64) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO read_marks (conv, up_to) VALUES (?1, ?2)
             ON CONFLICT (conv) DO UPDATE SET up_to = MAX(up_to, excluded.up_to)",
            params![conv as i64, up_to as i64],
        )?;
        self.conn
            .execute("DELETE FROM unread WHERE conv = ?1", [conv as i64])?;
        Ok(())
    }

    /// The user saw everything (the app came to the foreground): unread counts reset.
    pub fn clear_unread(&self) -> Result<(), StoreError> {
        self.conn.execute("DELETE FROM unread", [])?;
        Ok(())
    }

    /// How many notifications were shown, in all.
    pub fn notifications_shown(&self) -> Result<u64, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT COUNT(*) FROM notified WHERE shown = 1", [], |r| {
                r.get::<_, i64>(0)
            })? as u64)
    }

    /// A conversation's display name, if known.
    pub fn conv_name(&self, conv: u64) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT name FROM convs WHERE id = ?1")?
            .query_row([conv as i64], |r| r.get::<_, Option<String>>(0))
            .optional()?
            .flatten())
    }
}

fn message_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Message> {
    Ok(Message {
        id: r.get::<_, i64>(0)? as u64,
        conv: r.get::<_, i64>(1)? as u64,
        conv_seq: r.get::<_, i64>(2)? as u64,
        from: r.get(3)?,
        cid: r.get(4)?,
        kind: r.get(5)?,
        body: r.get(6)?,
        ts: r.get(7)?,
    })
}

fn upsert_conv(tx: &Connection, c: &ConvInfo, active: bool) -> Result<(), StoreError> {
    let kind = match c.kind {
        ConvKind::Direct => "direct",
        ConvKind::Group => "group",
    };
    tx.prepare_cached(
        "INSERT INTO convs (id, kind, name, members, active) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT(id) DO UPDATE SET kind = excluded.kind, name = excluded.name,
           members = excluded.members, active = excluded.active",
    )?
    .execute(params![
        c.id as i64,
        kind,
        c.name,
        serde_json::to_string(&c.members).unwrap_or_else(|_| "[]".into()),
        active
    ])?;
    Ok(())
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let version: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > MIGRATIONS.len() {
        return Err(StoreError::Incompatible(format!(
            "the client store is at schema version {version}, newer than this keepwire; upgrade keepwire"
        )));
    }
    for (i, (name, sql)) in MIGRATIONS.iter().enumerate().skip(version) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql).map_err(|e| {
            StoreError::Incompatible(format!("client store migration {name} failed: {e}"))
        })?;
        tx.pragma_update(None, "user_version", i + 1)?;
        tx.commit()?;
    }
    Ok(())
}

/// Inserts history messages (no inbox position; already held ones are kept).
fn insert_history(
    tx: &rusqlite::Transaction<'_>,
    messages: &[Message],
) -> Result<usize, StoreError> {
    let mut n = 0;
    for m in messages {
        n += tx
            .prepare_cached(
                "INSERT OR IGNORE INTO messages (id, conv, conv_seq, sender, cid, kind, body, ts, inbox_seq)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, NULL)",
            )?
            .execute(params![m.id as i64, m.conv as i64, m.conv_seq as i64, m.from, m.cid, m.kind, m.body, m.ts])?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn home() -> PathBuf {
        let p = std::env::temp_dir().join(format!(
            "kw-client-store-{}-{:x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    fn msg(seq: u64, conv_seq: u64) -> InboxEntry {
        InboxEntry {
            seq,
            item: EntryItem::Message(Message {
                id: conv_seq,
                conv: 1,
                conv_seq,
                from: "a".into(),
                cid: format!("c{conv_seq}"),
                kind: "text".into(),
                body: format!("m{conv_seq}"),
                ts: 0,
            }),
        }
    }

    fn mode(p: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    fn with_suffix(p: &Path, suffix: &str) -> PathBuf {
        let mut s = p.to_owned().into_os_string();
        s.push(suffix);
        s.into()
    }

    #[test]
    fn the_home_and_database_files_are_owner_only_on_every_open() {
        use std::os::unix::fs::PermissionsExt as _;
        let h = home();
        let db = Home::new(&h).database();
        let (wal, shm) = (with_suffix(&db, "-wal"), with_suffix(&db, "-shm"));
        let first = Store::open(&h).unwrap();
        first.save_login(&["ws://x".into()], "kw_secret").unwrap();
        assert_eq!(mode(&h), 0o700);
        for f in [&db, &wal, &shm] {
            assert_eq!(mode(f), 0o600, "{}", f.display());
        }
        // Loosened while the store is open (another process, a backup tool):
        // the next open, by any process, tightens everything again.
        std::fs::set_permissions(&h, std::fs::Permissions::from_mode(0o755)).unwrap();
        for f in [&db, &wal, &shm] {
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        let second = Store::open(&h).unwrap();
        assert_eq!(second.token().unwrap().as_deref(), Some("kw_secret"));
        assert_eq!(mode(&h), 0o700);
        for f in [&db, &wal, &shm] {
            assert_eq!(mode(f), 0o600, "{}", f.display());
        }
        drop((first, second));
        std::fs::remove_dir_all(&h).unwrap();
    }

    #[test]
    fn a_token_moved_to_a_keyring_leaves_the_home() {
        let h = home();
        let s = Store::open(&h).unwrap();
        s.save_login(&["ws://x".into()], "kw_moved_to_the_keyring")
            .unwrap();
        s.save_urls(&["ws://y".into()]).unwrap();
        s.forget_token().unwrap();
        assert_eq!(s.token().unwrap(), None);
        assert_eq!(s.urls().unwrap(), ["ws://y"]);
        drop(s);
        // Overwritten, not only unlinked from the table (database and WAL).
        for f in std::fs::read_dir(&h).unwrap() {
            let bytes = std::fs::read(f.unwrap().path()).unwrap();
            assert!(!bytes.windows(23).any(|w| w == b"kw_moved_to_the_keyring"));
        }
        std::fs::remove_dir_all(&h).unwrap();
    }

    #[test]
    fn cursor_moves_with_entries_and_replays_are_skipped() {
        let h = home();
        let mut s = Store::open(&h).unwrap();
        assert_eq!(s.cursor().unwrap(), None);
        let p = s.persist_entries("e1", &[msg(1, 1), msg(2, 2)]).unwrap();
        assert_eq!(p.cursor, Some(2));
        assert_eq!(p.messages.len(), 2);
        // A replay overlapping the cursor stores only the new entry.
        let p = s.persist_entries("e1", &[msg(2, 2), msg(3, 3)]).unwrap();
        assert_eq!(p.cursor, Some(3));
        assert_eq!(p.messages.len(), 1);
        assert_eq!(s.message_count().unwrap(), 3);
        // A gap is refused and changes nothing.
        assert!(s.persist_entries("e1", &[msg(5, 5)]).is_err());
        assert_eq!(s.cursor().unwrap().unwrap().seq, 3);
        let sync: i64 = s
            .conn
            .pragma_query_value(None, "synchronous", |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 2);
        let _ = std::fs::remove_dir_all(h);
    }

    #[test]
    fn outbox_is_ordered_and_the_db_is_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let h = home();
        let s = Store::open(&h).unwrap();
        let a = s.enqueue(1, "text", "one").unwrap();
        let b = s.enqueue(1, "text", "two").unwrap();
        assert_eq!(a.item.cid.len(), 32);
        let rows = s.pending_after(0).unwrap();
        assert_eq!(
            rows.iter()
                .map(|r| r.item.body.as_str())
                .collect::<Vec<_>>(),
            vec!["one", "two"]
        );
        s.confirm(&a.item.cid).unwrap();
        s.fail(&b.item.cid, ErrorCode::NotMember, "you are not a member")
            .unwrap();
        assert_eq!(s.outbox_status(&a.item.cid).unwrap(), None);
        assert_eq!(
            s.outbox_status(&b.item.cid).unwrap(),
            Some(OutboxState::Failed {
                code: ErrorCode::NotMember,
                message: "you are not a member".into()
            })
        );
        assert_eq!(s.outbox_counts().unwrap(), (0, 1));
        let mode = std::fs::metadata(Home::new(&h).database())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let _ = std::fs::remove_dir_all(h);
    }
}
