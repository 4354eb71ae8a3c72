//! The schema: numbered migrations embedded in the binary (applied in one
//! transaction under an advisory lock, recorded in `keepwire_migrations`),
//! the durability settings the relay insists on, and the epoch.

use rand::RngCore as _;
use tokio_postgres::Client;

use super::describe;
use crate::store::StoreError;

/// Numbered migrations, applied in order; `keepwire_migrations` records
/// each one applied.
pub(super) const MIGRATIONS: &[(&str, &str)] =
    &[("0001_init", include_str!("migrations/0001_init.sql"))];

/// Serialises migrations of relays starting at once on one database.
const MIGRATION_LOCK: i64 = 0x6b77_6d69_6772;

fn db(what: &str, e: tokio_postgres::Error) -> StoreError {
    StoreError::incompatible(format!("{what}: {}", describe(&e)))
}

/// Why a connection's check did not pass.
pub(super) enum Check {
    /// The server must not be used (a verdict: settings, standby, timeline).
    Refuse(StoreError),
    /// The check could not run (the connection failed): try another.
    Failed(String),
}

fn failed(what: &str, e: tokio_postgres::Error) -> Check {
    Check::Failed(format!("{what}: {}", describe(&e)))
}

/// Refuses a server that can lose acknowledged commits: with `fsync`,
/// `full_page_writes` or `synchronous_commit` off, a crash of PostgreSQL
/// or its machine can lose or tear what the relay already confirmed.
pub(super) async fn check_durability(c: &Client) -> Result<(), Check> {
    let row = c
        .query_one(
            "SELECT current_setting('fsync'), current_setting('full_page_writes'),
                    current_setting('synchronous_commit'), pg_is_in_recovery()",
            &[],
        )
        .await
        .map_err(|e| failed("cannot read the server's settings", e))?;
    let (fsync, fpw, sync): (String, String, String) = (row.get(0), row.get(1), row.get(2));
    if row.get::<_, bool>(3) {
        return Err(Check::Refuse(StoreError::incompatible(
            "this PostgreSQL is a standby (in recovery): point the relay at the primary",
        )));
    }
    for (name, value) in [
        ("fsync", &fsync),
        ("full_page_writes", &fpw),
        ("synchronous_commit", &sync),
    ] {
        if value == "off" {
            return Err(Check::Refuse(StoreError::incompatible(format!(
                "PostgreSQL runs with {name} = off: a crash could lose messages the relay \
                 confirmed; turn it on (the relay refuses to start without it)"
            ))));
        }
    }
    Ok(())
}

/// The server's current timeline: it changes when a standby is promoted,
/// so an asynchronous failover (which may lose the last commits) gives the
/// relay a new epoch instead of reusing lost sequences. Taken from the WAL
/// position being written (exact right after a promotion) and from the
/// last checkpoint's control data, whichever is newer.
pub(super) async fn timeline(c: &Client) -> Result<i64, Check> {
    let wal: String = c
        .query_one("SELECT pg_walfile_name(pg_current_wal_lsn())", &[])
        .await
        .map_err(|e| failed("cannot read the server's timeline", e))?
        .get(0);
    let from_wal = wal
        .get(..8)
        .and_then(|h| i64::from_str_radix(h, 16).ok())
        .ok_or_else(|| {
            Check::Refuse(StoreError::incompatible(format!(
                "unexpected WAL file name {wal:?}"
            )))
        })?;
    // Needs pg_monitor (or superuser) on some setups: optional.
    let from_control = match c
        .query_one(
            "SELECT timeline_id::bigint FROM pg_control_checkpoint()",
            &[],
        )
        .await
    {
        Ok(r) => r.get::<_, Option<i64>>(0).unwrap_or(0),
        Err(_) => 0,
    };
    Ok(from_wal.max(from_control))
}

/// Applies the missing migrations in one transaction, refusing a database
/// that is someone else's or newer than this binary.
pub(super) async fn migrate(c: &mut Client) -> Result<(), StoreError> {
    let tx = c
        .transaction()
        .await
        .map_err(|e| db("cannot begin the migration", e))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(|e| db("cannot take the migration lock", e))?;
    let has_table: bool = tx
        .query_one("SELECT to_regclass('keepwire_migrations') IS NOT NULL", &[])
        .await
        .map_err(|e| db("cannot read the schema version", e))?
        .get(0);
    let version: i64 = if has_table {
        tx.query_one(
            "SELECT COALESCE(MAX(version), 0)::bigint FROM keepwire_migrations",
            &[],
        )
        .await
        .map_err(|e| db("cannot read the schema version", e))?
        .get(0)
    } else {
        // A schema with tables but without our version is someone else's.
        let tables: i64 = tx
            .query_one(
                "SELECT count(*) FROM pg_tables WHERE schemaname = current_schema()",
                &[],
            )
            .await
            .map_err(|e| db("cannot list the tables", e))?
            .get(0);
        if tables > 0 {
            return Err(StoreError::incompatible(
                "the database has tables but is not a keepwire database",
            ));
        }
        tx.batch_execute(
            "CREATE TABLE keepwire_migrations (
                 version    BIGINT PRIMARY KEY,
                 name       TEXT NOT NULL,
                 applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
             )",
        )
        .await
        .map_err(|e| db("cannot create the version table", e))?;
        0
    };
    if version > MIGRATIONS.len() as i64 {
        return Err(StoreError::incompatible(format!(
            "the database is at schema version {version}, newer than this keepwire ({}); upgrade keepwire",
            MIGRATIONS.len()
        )));
    }
    for (i, (name, sql)) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.batch_execute(sql)
            .await
            .map_err(|e| db(&format!("migration {name} failed"), e))?;
        tx.execute(
            "INSERT INTO keepwire_migrations (version, name) VALUES ($1, $2)",
            &[&(i as i64 + 1), name],
        )
        .await
        .map_err(|e| db(&format!("cannot record migration {name}"), e))?;
    }
    tx.commit()
        .await
        .map_err(|e| db("cannot commit the migrations", e))
}

/// This database's random id, made once and kept in `meta`.
pub(super) async fn database_id(c: &Client) -> Result<String, StoreError> {
    let mut b = [0u8; 8];
    rand::rng().fill_bytes(&mut b);
    c.execute(
        "INSERT INTO meta (key, value) VALUES ('epoch', $1) ON CONFLICT (key) DO NOTHING",
        &[&hex::encode(b)],
    )
    .await
    .map_err(|e| db("cannot store the database id", e))?;
    Ok(
        c.query_one("SELECT value FROM meta WHERE key = 'epoch'", &[])
            .await
            .map_err(|e| db("cannot read the database id", e))?
            .get(0),
    )
}
