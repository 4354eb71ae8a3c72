//! Who is using a database file: a `flock` on a lock file next to it
//! (`relay.db.lock`, 0600).
//!
//! A running relay holds it (exclusively; shared when several relay nodes
//! share the file over the bus) for as long as it runs; whatever replaces
//! the file (`restore`) takes it exclusively and without waiting, so it is
//! refused beside a live relay instead of swapping the file under it (the
//! relay would keep writing to the deleted inode, and what it confirmed
//! after the restore would be gone at its next start). The kernel drops the
//! lock when its holder dies, so a killed relay leaves nothing stale.
//!
//! A separate file, never the database itself: closing any descriptor of
//! the database would drop SQLite's own POSIX locks on it.

use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use crate::store::StoreError;

/// How a [`DbLock`] holds its database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Alone: a relay without a bus, or a restore.
    Exclusive,
    /// Beside other shared holders: the nodes of a cluster on one file.
    Shared,
}

/// A held lock on a database; released when dropped (or when the process dies).
#[derive(Debug)]
pub struct DbLock {
    _lock: Flock<std::fs::File>,
    path: PathBuf,
}

/// The lock file of the database at `db`.
pub fn lock_path(db: &Path) -> PathBuf {
    PathBuf::from(format!("{}.lock", db.display()))
}

impl DbLock {
    /// Takes the lock of the database at `db` without waiting (creating the
    /// database's directory, 0700, and the lock file if missing). Fails with
    /// [`StoreError::Conflict`], naming the database and the lock file, when
    /// a conflicting holder (a running relay, a restore) has it.
    pub fn acquire(db: &Path, mode: LockMode) -> Result<DbLock, StoreError> {
        let path = lock_path(db);
        if let Some(dir) = db.parent() {
            super::files::create_private_dir(dir)?;
        }
        let mut o = std::fs::OpenOptions::new();
        o.write(true).create(true).truncate(false);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
        let file = o.open(&path).map_err(|e| {
            StoreError::incompatible(format!("cannot open the lock file {}: {e}", path.display()))
        })?;
        super::files::restrict_file(&path)?;
        let arg = match mode {
            LockMode::Exclusive => FlockArg::LockExclusiveNonblock,
            LockMode::Shared => FlockArg::LockSharedNonblock,
        };
        match Flock::lock(file, arg) {
            Ok(lock) => Ok(DbLock { _lock: lock, path }),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(StoreError::Conflict(format!(
                "the database {} is in use by a running relay (it holds {}); stop the relay first",
                db.display(),
                path.display()
            ))),
            Err((_, e)) => Err(StoreError::incompatible(format!(
                "cannot lock {}: {e}",
                path.display()
            ))),
        }
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_holders_coexist_and_exclude_an_exclusive_one() {
        let dir = std::env::temp_dir().join(format!("kw-lock-{:x}", rand::random::<u64>()));
        let db = dir.join("relay.db");
        let a = DbLock::acquire(&db, LockMode::Shared).unwrap();
        let b = DbLock::acquire(&db, LockMode::Shared).expect("two bus nodes on one file");
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(a.path()).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        match DbLock::acquire(&db, LockMode::Exclusive) {
            Err(StoreError::Conflict(m)) => {
                assert!(m.contains(db.to_str().unwrap()), "{m}")
            }
            other => panic!("a restore beside live relays must be refused: {other:?}"),
        }
        drop((a, b));
        let x = DbLock::acquire(&db, LockMode::Exclusive).expect("free once they are gone");
        assert!(matches!(
            DbLock::acquire(&db, LockMode::Shared),
            Err(StoreError::Conflict(_))
        ));
        drop(x);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
