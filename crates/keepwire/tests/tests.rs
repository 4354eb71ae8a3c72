//! End-to-end tests of the `keepwire` binary: real processes, `kill -9`,
//! signals, and the command line's error messages.

mod chaos;
mod cli;
mod client_process;
mod desktop;
mod desktop_keyring;
mod desktop_system;
mod pg_crash;
mod postgres;
mod push_cli;
mod push_faults;
mod relay_process;
mod security;

use std::path::PathBuf;
use std::process::{Command, Output};

/// `keepwire serve` flags that keep rate limits out of the way of bulk tests.
pub const FAST: &[&str] = &[
    "--sends-per-sec",
    "100000",
    "--send-burst",
    "100000",
    "--user-sends-per-sec",
    "100000",
];

/// A child process killed (and reaped) on drop, also when a test fails.
pub struct KillOnDrop(pub std::process::Child);

impl KillOnDrop {
    /// `kill -9` and reap.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_keepwire"))
}

/// Runs `keepwire ARGS...` to completion.
pub fn keepwire(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .env("KEEPWIRE_LOG", "warn")
        .env("KEEPWIRE_TOKEN_STORE", "file")
        .output()
        .expect("run keepwire")
}

/// `keepwire admin --db DB user add NAME` (after `admin init` when the
/// database is new): the token it prints.
pub fn add_user(db: &std::path::Path, name: &str) -> String {
    if !db.exists() {
        let out = keepwire(&["admin", "--db", db.to_str().unwrap(), "init"]);
        assert!(
            out.status.success(),
            "admin init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = keepwire(&["admin", "--db", db.to_str().unwrap(), "user", "add", name]);
    assert!(
        out.status.success(),
        "user add failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(
        token.starts_with("kw_") && !token.contains('\n'),
        "one line with the token: {token:?}"
    );
    token
}

/// Runs `keepwire ARGS...` for the device home `home`. Logins keep the
/// token in the home's file: a developer's desktop keyring stays clean.
pub fn kw(home: &std::path::Path, args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .env("KEEPWIRE_HOME", home)
        .env("KEEPWIRE_LOG", "warn")
        .env("KEEPWIRE_TOKEN_STORE", "file")
        .output()
        .expect("run keepwire")
}

/// Like [`kw`], asserting success; returns stdout.
pub fn kw_ok(home: &std::path::Path, args: &[&str]) -> String {
    let out = kw(home, args);
    assert!(
        out.status.success(),
        "keepwire {args:?} failed ({:?}): {}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}
