//! The relay as a child process: durability across `kill -9`, graceful
//! shutdown on SIGTERM, revocation from another process.

use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

use keepwire_proto::{ClientFrame, CloseCode, ConvCreate, ConvKind, EntryItem, ServerFrame};
use keepwire_testkit::{RelayProcess, TempDir, WsClient, http_get, new_cid};

use crate::{FAST, add_user, bin, keepwire};

async fn direct_conv(c: &mut WsClient, other: &str) -> u64 {
    c.send(&ClientFrame::ConvCreate(ConvCreate {
        rid: "c".into(),
        key: "c".into(),
        kind: ConvKind::Direct,
        members: vec![other.into()],
        name: None,
    }))
    .await;
    c.recv_where(|f| match f {
        ServerFrame::Conv { conv, .. } => Some(conv.id),
        _ => None,
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_messages_survive_kill_9() {
    let dir = TempDir::new("kill9");
    let db = dir.join("relay.db");
    let ta = add_user(&db, "alice");
    let tb = add_user(&db, "bob");
    let mut relay = RelayProcess::start(&bin(), &db, FAST);
    let (status, body) = http_get(relay.host_port(), "/healthz").await;
    assert_eq!((status, body.trim()), (200, "ok"));

    let mut a = WsClient::connect(&relay.url, &ta, "a", None).await.unwrap();
    let conv = direct_conv(&mut a, "bob").await;
    // 300 confirmed sends, then 100 more in flight when the relay dies.
    let mut confirmed = HashSet::new();
    let mut cids = Vec::new();
    for i in 0..300 {
        cids.push(a.send_message(conv, &format!("c{i}")).await);
    }
    for cid in &cids {
        a.confirm(cid).await;
        confirmed.insert(cid.clone());
    }
    let mut in_flight = Vec::new();
    for i in 0..100 {
        in_flight.push((
            a.send_message(conv, &format!("f{i}")).await,
            format!("f{i}"),
        ));
    }
    // Whatever was confirmed before the kill must survive it.
    let mut confirmed_in_flight = HashSet::new();
    while let Some(keepwire_testkit::Incoming::Frame(f)) =
        a.recv_wire(Duration::from_millis(2)).await
    {
        if let ServerFrame::Confirm(c) = f {
            confirmed_in_flight.insert(c.cid);
        }
    }
    relay.kill9();
    assert_eq!(
        a.expect_close().await,
        None,
        "no close frame from a killed process"
    );
    confirmed.extend(confirmed_in_flight.iter().cloned());

    let relay = RelayProcess::start(&bin(), &db, FAST);
    // Alice's outbox retry after the crash: stored once whatever happened.
    let mut a = WsClient::connect(&relay.url, &ta, "a", None).await.unwrap();
    for (cid, body) in &in_flight {
        a.send_with_cid(conv, body, cid).await;
    }
    for (cid, _) in &in_flight {
        let c = a.confirm(cid).await;
        if confirmed_in_flight.contains(cid) {
            assert!(
                c.duplicate,
                "a confirmed send must be found again after the crash"
            );
        }
    }
    // Bob's new device gets everything: every message exactly once, in order.
    let mut b = WsClient::connect(&relay.url, &tb, "b", None).await.unwrap();
    let head = b.welcome().head;
    assert_eq!(head, 401, "membership entry + 400 messages");
    let entries = b.entries(head as usize, true).await;
    let mut seen = HashSet::new();
    for e in &entries {
        if let EntryItem::Message(m) = &e.item {
            assert!(seen.insert(m.cid.clone()), "duplicate {}", m.cid);
        }
    }
    for cid in &confirmed {
        assert!(seen.contains(cid), "confirmed message {cid} lost");
    }
    assert_eq!(seen.len(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_connections_with_going_away_and_exits_zero() {
    let dir = TempDir::new("sigterm");
    let db = dir.join("relay.db");
    let ta = add_user(&db, "alice");
    let mut relay = RelayProcess::start(&bin(), &db, &[]);
    let mut a = WsClient::connect(&relay.url, &ta, "a", None).await.unwrap();
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(relay.child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(a.expect_close().await, Some(CloseCode::GoingAway.code()));
    let exit = tokio::task::spawn_blocking(move || relay.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "exit status {exit:?}");
    // The database is intact and usable.
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_from_the_cli_closes_live_connections() {
    let dir = TempDir::new("revoke");
    let db = dir.join("relay.db");
    let ta = add_user(&db, "alice");
    let relay = RelayProcess::start(&bin(), &db, &[]);
    let mut a = WsClient::connect(&relay.url, &ta, "a", None).await.unwrap();
    let started = std::time::Instant::now();
    let out = keepwire(&[
        "admin",
        "--db",
        db.to_str().unwrap(),
        "token",
        "revoke",
        &ta,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "revoked 1 token"
    );
    assert_eq!(a.expect_close().await, Some(CloseCode::TokenRevoked.code()));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "closed at once (250 ms poll)"
    );
    let r = WsClient::connect(&relay.url, &ta, "a", None).await;
    assert_eq!(r.err(), Some(Some(CloseCode::TokenRevoked.code())));
    let _ = new_cid();
}

/// Waits (at most 20 s) for `child` to exit; kills it and fails if it does not.
fn exit_within(mut child: std::process::Child, what: &str) -> std::process::Output {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_beside_a_running_relay_is_refused_and_loses_nothing() {
    let dir = TempDir::new("restore-live");
    let db = dir.join("relay.db");
    let dbs = db.to_str().unwrap();
    let ta = add_user(&db, "alice");
    let tb = add_user(&db, "bob");
    let backup = dir.join("backup.db");
    let out = keepwire(&["admin", "--db", dbs, "backup", backup.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut relay = RelayProcess::start(&bin(), &db, &[]);
    // The relay's lock file sits next to the database, readable by its owner only.
    let lock = dir.join("relay.db.lock");
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&lock)
            .expect("lock file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "lock file mode {mode:o}");
    }
    let mut a = WsClient::connect(&relay.url, &ta, "a", None).await.unwrap();
    let conv = direct_conv(&mut a, "bob").await;
    let cid = a
        .send_message(conv, "confirmed before the restore attempt")
        .await;
    a.confirm(&cid).await;

    // Restore beside the live relay: refused, naming the database, exit 1.
    let out = keepwire(&["admin", "--db", dbs, "restore", backup.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert!(!err.contains("panicked"), "no panic: {err}");
    assert!(
        err.contains(dbs) && err.contains("running relay"),
        "names the database and the reason: {err}"
    );
    // A second relay on the same file (no bus) is refused too.
    let second = Command::new(bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--db", dbs])
        .env("KEEPWIRE_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = exit_within(second, "a second relay on a locked database");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert!(err.contains("in use by another relay"), "{err}");

    // The relay kept working and its data: a message sent after the refused
    // restore, then a restart, and Bob gets both.
    let cid2 = a.send_message(conv, "after the refused restore").await;
    a.confirm(&cid2).await;
    relay.kill9();
    let relay = RelayProcess::start(&bin(), &db, &[]);
    let mut b = WsClient::connect(&relay.url, &tb, "b", None).await.unwrap();
    assert_eq!(b.welcome().head, 3, "membership entry + 2 messages");
    let bodies: Vec<String> = b
        .entries(3, true)
        .await
        .into_iter()
        .filter_map(|e| match e.item {
            EntryItem::Message(m) => Some(m.body),
            _ => None,
        })
        .collect();
    assert_eq!(
        bodies,
        [
            "confirmed before the restore attempt",
            "after the refused restore"
        ]
    );
    drop(b);
    drop(relay);
    // With the relay stopped (the kernel dropped its lock), restore works.
    let out = keepwire(&["admin", "--db", dbs, "restore", backup.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `keepwire serve ARGS...` (no --listen/--db of its own): the child and the
/// first line of its stdout (empty if it exited first).
fn serve_with(args: &[&str]) -> (crate::KillOnDrop, String) {
    use std::io::BufRead as _;
    let mut child = Command::new(bin())
        .arg("serve")
        .args(args)
        .env("KEEPWIRE_LOG", "warn")
        .env_remove("KEEPWIRE_DB")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (crate::KillOnDrop(child), line.trim().to_owned())
}

#[test]
fn serve_reads_a_config_file_and_flags_override_it() {
    let dir = TempDir::new("config");
    let from_file = dir.join("from-file.db");
    let cfg = dir.join("relay.toml");
    std::fs::write(
        &cfg,
        format!(
            "# a relay\nlisten = \"127.0.0.1:0\"\ndb = {:?}\nmax_body_bytes = 2048\nallow-origin = [\"https://a.example\", \"https://b.example\"]\nretention-age = \"90d\"\n",
            from_file.to_str().unwrap()
        ),
    )
    .unwrap();
    let c = cfg.to_str().unwrap();
    let (_relay, url) = serve_with(&["--config", c]);
    assert!(
        url.starts_with("ws://127.0.0.1:"),
        "listens where the file says: {url:?}"
    );
    assert!(from_file.exists(), "the database the file names");
    // A flag on the command line wins over the file.
    let other = dir.join("other.db");
    let (_relay2, url2) = serve_with(&["--config", c, "--db", other.to_str().unwrap()]);
    assert!(url2.starts_with("ws://"), "{url2:?}");
    assert!(other.exists(), "--db overrides the file's db");

    // Mistakes name the file and the setting; values are checked like flags.
    let bad = dir.join("bad.toml");
    for (text, needle) in [
        ("listn = \"127.0.0.1:0\"\n", "unknown setting \"listn\""),
        ("max-body-bytes = \"lots\"\n", "invalid value 'lots'"),
        ("listen = [\n", "bad.toml"),
    ] {
        std::fs::write(&bad, text).unwrap();
        let out = keepwire(&["serve", "--config", bad.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}: {err}");
        assert!(err.contains(needle), "{text}: expected {needle:?} in {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
