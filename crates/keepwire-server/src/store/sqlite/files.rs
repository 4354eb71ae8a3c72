//! File modes: the relay's database holds every message and every token
//! hash, so its directory is 0700 and its files 0600 — set when created and
//! tightened again on every open (an operator's `chmod` or a copy may have
//! loosened them).

use std::path::{Path, PathBuf};

use crate::store::StoreError;

/// The files SQLite keeps for the database at `db`.
fn companions(db: &Path) -> [PathBuf; 3] {
    [
        db.to_owned(),
        PathBuf::from(format!("{}-wal", db.display())),
        PathBuf::from(format!("{}-shm", db.display())),
    ]
}

/// Creates `dir` (0700) if it is missing.
pub(super) fn create_private_dir(dir: &Path) -> Result<(), StoreError> {
    if dir.as_os_str().is_empty() || dir.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| StoreError::incompatible(format!("cannot create {}: {e}", dir.display())))?;
    set_mode(dir, 0o700)
}

/// Creates an empty file readable by its owner only, if it does not exist.
/// (SQLite opens what is there, and gives its WAL and shared-memory files
/// the database file's mode.)
pub(super) fn create_private_file(path: &Path) -> Result<(), StoreError> {
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    match o.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(StoreError::incompatible(format!(
            "cannot create {}: {e}",
            path.display()
        ))),
    }
}

/// Makes the database and its WAL and shared-memory files 0600.
pub(super) fn restrict(db: &Path) -> Result<(), StoreError> {
    for f in companions(db) {
        if f.exists() {
            set_mode(&f, 0o600)?;
        }
    }
    Ok(())
}

/// Makes one file (a lock file) 0600.
pub(super) fn restrict_file(path: &Path) -> Result<(), StoreError> {
    set_mode(path, 0o600)
}

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt as _;
    let current = std::fs::metadata(path)
        .map_err(|e| StoreError::incompatible(format!("cannot read {}: {e}", path.display())))?
        .permissions()
        .mode();
    if current & 0o777 == mode {
        return Ok(());
    }
    // By path, never through a descriptor of our own: closing a descriptor
    // of the database would drop SQLite's POSIX locks on it.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| StoreError::incompatible(format!("cannot restrict {}: {e}", path.display())))
}

#[cfg(not(unix))]
fn set_mode(_: &Path, _: u32) -> Result<(), StoreError> {
    Ok(())
}
