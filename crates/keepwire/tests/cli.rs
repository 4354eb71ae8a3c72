//! Command-line mistakes get one clear line, never a panic.

use crate::{add_user, keepwire};
use keepwire_testkit::TempDir;

fn assert_human_error(out: &std::process::Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "should fail");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "no panic: {err}"
    );
    assert!(err.contains(needle), "expected {needle:?} in {err:?}");
}

#[test]
fn admin_mistakes_are_explained() {
    let dir = TempDir::new("cli");
    let db = dir.join("relay.db");
    let db = db.to_str().unwrap();
    add_user(std::path::Path::new(db), "alice");
    assert_human_error(
        &keepwire(&["admin", "--db", db, "user", "add", "alice"]),
        "error: user \"alice\" already exists",
    );
    assert_human_error(
        &keepwire(&["admin", "--db", db, "user", "add", "bad name"]),
        "not a valid user name",
    );
    assert_human_error(
        &keepwire(&["admin", "--db", db, "token", "issue", "nobody"]),
        "no user named \"nobody\"",
    );
    assert_human_error(
        &keepwire(&["admin", "--db", db, "token", "revoke", "kw_nope"]),
        "no such token",
    );
    assert_human_error(
        &keepwire(&["admin", "--db", db, "token", "revoke"]),
        "name what to revoke",
    );
    assert_human_error(
        &keepwire(&["admin", "--db", db, "user", "add", "bob", "--ttl", "soon"]),
        "invalid value 'soon'",
    );
    assert_human_error(
        &keepwire(&["serve", "--listen", "nowhere"]),
        "invalid value 'nowhere'",
    );
    assert_human_error(&keepwire(&["frobnicate"]), "unrecognized subcommand");
    // A file that is not a keepwire database.
    let junk = dir.join("junk.db");
    std::fs::write(&junk, b"this is not sqlite").unwrap();
    assert_human_error(
        &keepwire(&[
            "admin",
            "--db",
            junk.to_str().unwrap(),
            "token",
            "list",
            "x",
        ]),
        "cannot open the database",
    );
    // Token listing never shows secrets.
    let out = keepwire(&["admin", "--db", db, "token", "list", "alice"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("active") && !text.contains("kw_"));
}

#[test]
fn serve_reports_a_busy_port() {
    let dir = TempDir::new("busy");
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap().to_string();
    let out = keepwire(&[
        "serve",
        "--listen",
        &addr,
        "--db",
        dir.join("r.db").to_str().unwrap(),
    ]);
    assert_human_error(&out, "cannot listen on");
}

#[test]
fn backup_and_restore_change_the_epoch() {
    let dir = TempDir::new("backup");
    let db = dir.join("relay.db");
    add_user(&db, "alice");
    let backup = dir.join("b.db");
    let out = keepwire(&[
        "admin",
        "--db",
        db.to_str().unwrap(),
        "backup",
        backup.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = keepwire(&[
        "admin",
        "--db",
        db.to_str().unwrap(),
        "restore",
        backup.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("new epoch"));
    let out = keepwire(&[
        "admin",
        "--db",
        db.to_str().unwrap(),
        "token",
        "list",
        "alice",
    ]);
    assert!(out.status.success());
}

#[test]
fn api_keys_and_devices_are_managed_from_the_cli() {
    let dir = TempDir::new("apikeys");
    let db = dir.join("relay.db");
    let db = db.to_str().unwrap();
    add_user(std::path::Path::new(db), "alice");
    let out = keepwire(&["admin", "--db", db, "api-key", "create", "backend"]);
    assert!(out.status.success());
    let key = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(key.starts_with("kwk_") && !key.contains('\n'));
    let list = keepwire(&["admin", "--db", db, "api-key", "list"]);
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(text.contains("backend") && text.contains("active") && !text.contains("kwk_"));
    assert!(
        keepwire(&["admin", "--db", db, "api-key", "revoke", "1"])
            .status
            .success()
    );
    assert_human_error(
        &keepwire(&["admin", "--db", db, "api-key", "revoke", "1"]),
        "no active API key with id 1",
    );
    let out = keepwire(&[
        "admin",
        "--db",
        db,
        "device",
        "revoke",
        "alice",
        "old-phone",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "revoked");
    let out = keepwire(&["admin", "--db", db, "device", "list", "alice"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("old-phone"));
    assert_human_error(
        &keepwire(&["admin", "--db", db, "device", "list", "nobody"]),
        "no user named",
    );
    assert_human_error(
        &keepwire(&["serve", "--db", db, "--jwt-secret-file", "/nonexistent"]),
        "cannot read the JWT secret file",
    );
}

#[test]
fn the_demo_plays_every_scenario_and_loses_nothing() {
    let out = keepwire(&["demo"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for step in [
        "1. Background",
        "2. Closed",
        "3. Foreground",
        "4. Network cut",
        "5. Relay restart",
    ] {
        assert!(text.contains(step), "{step} missing:\n{text}");
    }
    assert!(
        text.contains("lost 0, duplicated 0, in order: yes"),
        "{text}"
    );
}

#[test]
fn a_mistyped_db_is_refused_not_created() {
    let dir = TempDir::new("cli-typo");
    let db = dir.join("relay.db");
    add_user(&db, "alice");
    let typo = dir.join("realy.db");
    let t = typo.to_str().unwrap();
    let backup = dir.join("b.db");
    for args in [
        vec!["admin", "--db", t, "user", "add", "bob"],
        vec!["admin", "--db", t, "token", "issue", "alice"],
        vec!["admin", "--db", t, "token", "list", "alice"],
        vec!["admin", "--db", t, "token", "revoke", "--user", "alice"],
        vec!["admin", "--db", t, "api-key", "list"],
        vec!["admin", "--db", t, "device", "list", "alice"],
        vec!["admin", "--db", t, "backup", backup.to_str().unwrap()],
        vec!["admin", "--db", t, "restore", db.to_str().unwrap()],
    ] {
        let out = keepwire(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert_human_error(&out, &format!("there is no relay database at {t}"));
        assert!(!typo.exists(), "{args:?} created {t}");
    }
    // `admin init` creates it (once), and then it can be used.
    let out = keepwire(&["admin", "--db", t, "init"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("created {t}")
    );
    let out = keepwire(&["admin", "--db", t, "init"]);
    assert!(out.status.success(), "init again is harmless");
    assert!(String::from_utf8_lossy(&out.stdout).contains("already exists"));
    add_user(&typo, "bob");
    add_user(&typo, "alice");
    let out = keepwire(&["admin", "--db", t, "user", "list"]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "alice\nbob\n");
}

#[test]
fn admin_user_delete_removes_the_user() {
    let dir = TempDir::new("delete");
    let db = dir.join("relay.db");
    add_user(&db, "alice");
    add_user(&db, "bob");
    let t = db.to_str().unwrap();
    let out = keepwire(&["admin", "--db", t, "user", "delete", "alice"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "deleted alice: left 0 conversations, removed 0 devices; their messages stay with the other members"
    );
    let out = keepwire(&["admin", "--db", t, "user", "list"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "bob\n");
    assert_human_error(
        &keepwire(&["admin", "--db", t, "user", "delete", "alice"]),
        "no user named \"alice\"",
    );
}

#[test]
fn keepwire_log_format_json_makes_serve_log_json_lines() {
    use std::io::BufRead as _;
    use std::process::{Command, Stdio};
    let dir = TempDir::new("logjson");
    let db = dir.join("relay.db");
    let child = Command::new(crate::bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--db"])
        .arg(&db)
        .env("KEEPWIRE_LOG", "info")
        .env("KEEPWIRE_LOG_FORMAT", "json")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn serve");
    let mut child = crate::KillOnDrop(child);
    let stderr = child.0.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let serving = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = rx.recv_timeout(left).expect("serve logs `serving`");
        let v: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}"));
        if v["message"] == "serving" {
            break v;
        }
    };
    assert_eq!(serving["level"], "INFO");
    assert_eq!(serving["target"], "keepwire::server");
    assert!(serving["timestamp"].is_string(), "{serving}");
    child.kill();

    // Anything but text or json: one clear line, before anything starts.
    let out = Command::new(crate::bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--db"])
        .arg(&db)
        .env("KEEPWIRE_LOG_FORMAT", "xml")
        .output()
        .unwrap();
    assert_human_error(
        &out,
        "KEEPWIRE_LOG_FORMAT is \"xml\": use `text` (the default) or `json`",
    );
}

#[test]
fn an_empty_message_is_refused_by_the_cli_and_nothing_is_queued() {
    let dir = TempDir::new("empty");
    let home = dir.join("home");
    let out = crate::kw(
        &home,
        &[
            "login",
            "--no-check",
            "--server",
            "ws://127.0.0.1:9",
            "--token",
            "kw_x",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_human_error(
        &crate::kw(&home, &["send", "1", ""]),
        "the message is empty",
    );
    let out = crate::kw_ok(&home, &["outbox", "--json"]);
    assert_eq!(out.trim(), r#"{"outbox":[]}"#);
}

/// The systemd user units in contrib/ pass `systemd-analyze verify`, with
/// the binaries where the README's `cargo install` puts them.
#[test]
fn the_systemd_units_verify() {
    use std::os::unix::fs::PermissionsExt as _;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    assert!(
        readme.contains("cargo install --locked --path crates/keepwire"),
        "the README says how to install what the units run"
    );
    let Ok(which) = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
    else {
        println!("skipped: systemd-analyze is not installed");
        return;
    };
    if !which.status.success() {
        println!("skipped: systemd-analyze does not run here");
        return;
    }
    let dir = TempDir::new("units");
    let home = dir.join("home");
    let bin_dir = home.join(".cargo/bin");
    std::fs::create_dir_all(&bin_dir).unwrap();
    std::os::unix::fs::symlink(crate::bin(), bin_dir.join("keepwire")).unwrap();
    std::os::unix::fs::symlink(
        env!("CARGO_BIN_EXE_keepwire-agent"),
        bin_dir.join("keepwire-agent"),
    )
    .unwrap();
    // A user manager needs a runtime directory; a private one will do.
    let runtime = dir.join("run");
    std::fs::create_dir_all(&runtime).unwrap();
    std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o700)).unwrap();
    let units = root.join("contrib/systemd");
    let names = [
        "keepwire-agent.service",
        "keepwire-sync.service",
        "keepwire-sync.timer",
    ];
    let out = std::process::Command::new("systemd-analyze")
        .args(["--user", "verify"])
        .args(names.iter().map(|n| units.join(n)))
        .env("HOME", &home)
        .env("XDG_RUNTIME_DIR", &runtime)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {err}");
    for name in names {
        assert!(!err.contains(name), "a complaint about {name}: {err}");
    }
}
