//! A device's home folder: the files in it, and the lock that says which
//! process holds the device's connection.
//!
//! Every process that opens a home (an app and its extension, the CLI next
//! to an agent) agrees on these names; nothing else builds paths inside a
//! home.

use std::fs::File;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

/// A device's home folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Home {
    path: PathBuf,
}

/// The home's lock, held until dropped: its holder runs the connection.
#[derive(Debug)]
pub struct HomeLock {
    _lock: Flock<File>,
}

impl Home {
    /// The home at `path` (nothing is created).
    pub fn new(path: impl Into<PathBuf>) -> Home {
        Home { path: path.into() }
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The device's database (outbox, messages, cursor, settings).
    pub fn database(&self) -> PathBuf {
        self.path.join("client.db")
    }

    /// The lock file (`flock`ed by the process holding the connection).
    pub fn lock_file(&self) -> PathBuf {
        self.path.join("lock")
    }

    /// The desktop agent's control socket.
    pub fn agent_socket(&self) -> PathBuf {
        self.path.join("agent.sock")
    }

    /// Takes the lock if no process holds it (never waits). `None` when
    /// another process holds it, or the lock file cannot be opened.
    pub fn try_lock(&self) -> Option<HomeLock> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.lock_file())
            .ok()?;
        Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .ok()
            .map(|l| HomeLock { _lock: l })
    }

    /// Whether another process holds the lock (runs the connection) now.
    /// Checking takes the lock for an instant when it is free.
    pub fn is_held(&self) -> bool {
        let Ok(file) = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.lock_file())
        else {
            return false;
        };
        Flock::lock(file, FlockArg::LockExclusiveNonblock).is_err()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time_and_the_lock_ends_with_its_value() {
        let dir = std::env::temp_dir().join(format!("kw-home-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let home = Home::new(&dir);
        assert!(!home.is_held());
        let lock = home.try_lock().expect("free");
        // flock is per open file description: a second open conflicts even
        // within this process, as another process's would.
        assert!(home.is_held());
        assert!(home.try_lock().is_none());
        drop(lock);
        assert!(!home.is_held());
        assert!(home.try_lock().is_some());
        assert_eq!(home.database(), dir.join("client.db"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
