//! The schema: numbered migrations embedded in the binary, connection
//! settings, and the epoch.

use rand::RngCore as _;
use rusqlite::Connection;
use std::time::Duration;

use crate::store::StoreError;

/// Numbered migrations, applied in order; `PRAGMA user_version` records the last one.
pub(super) const MIGRATIONS: &[(&str, &str)] = &[
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
    (
        "0005_device_tokens",
        include_str!("migrations/0005_device_tokens.sql"),
    ),
    ("0006_push", include_str!("migrations/0006_push.sql")),
];

pub(super) fn configure(conn: &Connection) -> Result<(), StoreError> {
    conn.busy_timeout(Duration::from_secs(5))?;
    // Durable against power loss: WAL synced at every commit.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    Ok(())
}

pub(super) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let version: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > MIGRATIONS.len() {
        return Err(StoreError::incompatible(format!(
            "the database is at schema version {version}, newer than this keepwire ({}); upgrade keepwire",
            MIGRATIONS.len()
        )));
    }
    if version == 0 {
        // A non-empty database without our version is someone else's file.
        let tables: i64 = conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))?;
        if tables > 0 {
            return Err(StoreError::incompatible(
                "the file is an SQLite database but not a keepwire one",
            ));
        }
    }
    for (i, (name, sql)) in MIGRATIONS.iter().enumerate().skip(version) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)
            .map_err(|e| StoreError::incompatible(format!("migration {name} failed: {e}")))?;
        tx.pragma_update(None, "user_version", i + 1)?;
        tx.commit()?;
    }
    Ok(())
}

pub(super) fn new_epoch() -> String {
    let mut b = [0u8; 8];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}
