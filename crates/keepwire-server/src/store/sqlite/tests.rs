//! SQLite-specific tests (the behaviour every backend shares is in the
//! contract suite, `store::contract`).

use std::path::PathBuf;
use std::time::Duration;

use rusqlite::Connection;

use super::*;
use crate::store::{AdminStore as _, RelayStore as _};

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
        Err::<(), _>(StoreError::commit("failed after writing"))
    });
    let good = store.create_user("whole");
    let (held, bad, good) = tokio::join!(hold, bad, good);
    // The holder wrote nothing: it may share the failed group or not.
    assert!(
        matches!(
            held,
            Ok(()) | Err(StoreError::Infra(crate::store::InfraError::Commit(_)))
        ),
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
        Err(StoreError::Infra(crate::store::InfraError::Incompatible(_)))
    ));
}

#[cfg(unix)]
fn mode(p: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// The database, its WAL, its directory and backups are the owner's alone,
/// also after an open that finds them loosened.
#[cfg(unix)]
#[tokio::test]
async fn files_are_private_after_start_backup_and_a_loosened_chmod() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempdir::Dir::new();
    let p = dir.path().join("data").join("relay.db");
    let store = SqliteStore::open(&p, SqliteOptions::default()).unwrap();
    store.create_user("alice").await.unwrap();
    assert_eq!(mode(p.parent().unwrap()), 0o700);
    assert_eq!(mode(&p), 0o600);
    let wal = std::path::PathBuf::from(format!("{}-wal", p.display()));
    assert_eq!(mode(&wal), 0o600);
    let backup = dir.path().join("backups").join("b.db");
    SqliteStore::backup(&p, &backup).unwrap();
    assert_eq!(mode(&backup), 0o600);
    assert_eq!(mode(backup.parent().unwrap()), 0o700);
    store.close().await;
    for f in [&p, &wal] {
        if f.exists() {
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
    }
    let store = SqliteStore::open(&p, SqliteOptions::default()).unwrap();
    assert_eq!(mode(&p), 0o600);
    store.close().await;
    SqliteStore::restore(&backup, &p).unwrap();
    assert_eq!(mode(&p), 0o600);
}
