//! The client as separate processes: `kill -9` of the relay and of the
//! client, several processes on one home, sync exit codes.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keepwire_testkit::{RelayProcess, TempDir};

use crate::{FAST, add_user, bin, kw, kw_ok};

/// A long-running `keepwire tail` for a home (the connection holder). Killed on drop.
struct Tail(Child);

impl Tail {
    fn start(home: &Path) -> Tail {
        let child = Command::new(bin())
            .args(["tail", "--json"])
            .env("KEEPWIRE_HOME", home)
            .env("KEEPWIRE_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn tail");
        Tail(child)
    }

    fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn status(home: &Path) -> serde_json::Value {
    serde_json::from_str(&kw_ok(home, &["status", "--json"])).unwrap()
}

/// Polls `cond` (every 50 ms) until it holds or `within` passes.
fn wait_until(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Logs in a device home and returns it.
fn device(dir: &TempDir, name: &str, url: &str, token: &str) -> std::path::PathBuf {
    let home = dir.join(name);
    let out = kw_ok(&home, &["login", "--server", url, "--token", token]);
    assert!(out.contains("logged in as"), "{out}");
    home
}

/// The messages of a home's store, by body, with how often each appears.
fn stored(home: &Path) -> (Vec<String>, HashMap<String, usize>) {
    let out = kw_ok(home, &["log", "--json", "--limit", "100000"]);
    let mut order = Vec::new();
    let mut counts = HashMap::new();
    for line in out.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let body = v["body"].as_str().unwrap().to_owned();
        *counts.entry(body.clone()).or_default() += 1;
        order.push(body);
    }
    (order, counts)
}

fn assert_exactly_once_in_order(home: &Path, want: &[String]) {
    let (order, counts) = stored(home);
    for w in want {
        assert_eq!(
            counts.get(w).copied().unwrap_or(0),
            1,
            "{w} must be stored exactly once"
        );
    }
    let mine: Vec<&String> = order.iter().filter(|b| want.contains(b)).collect();
    assert_eq!(mine, want.iter().collect::<Vec<_>>(), "in send order");
}

#[test]
fn relay_killed_and_restarted_while_sends_are_queued() {
    let Setup {
        dir: _dir,
        db,
        mut relay,
        alice,
        bob,
    } = setup("relay-kill");
    let url = relay.url.clone();
    let conv = kw_ok(&alice, &["conv", "create", "bob"]).trim().to_owned();
    let _holder = Tail::start(&alice);
    let mut want = Vec::new();
    for i in 0..30 {
        want.push(format!("before-{i}"));
        kw_ok(&alice, &["send", &conv, &want[i], "--timeout", "0"]);
    }
    relay.kill9();
    // Queued while the relay is dead.
    for i in 0..30 {
        let body = format!("during-{i}");
        kw_ok(&alice, &["send", &conv, &body, "--timeout", "0"]);
        want.push(body);
    }
    // Back on the same address and database.
    let addr = url.trim_start_matches("ws://").to_owned();
    let _relay = RelayProcess::start_at(&bin(), &db, &addr, FAST);
    wait_until(Duration::from_secs(60), "alice's outbox to drain", || {
        status(&alice)["outbox_pending"] == 0
    });
    let out = kw_ok(&bob, &["sync"]);
    assert!(out.contains("synced"), "{out}");
    assert_exactly_once_in_order(&bob, &want);
}

#[test]
fn client_killed_with_a_full_outbox_delivers_it_exactly_once() {
    let Setup {
        dir: _dir,
        db: _db,
        relay: _relay,
        alice,
        bob,
    } = setup("client-kill");
    let conv = kw_ok(&alice, &["conv", "create", "bob"]).trim().to_owned();
    // Queue 200 sends without letting anyone flush them: a tail holds the
    // home while the queue fills, then is killed mid-flush.
    let mut want = Vec::new();
    for i in 0..200 {
        want.push(format!("m{i:03}"));
    }
    {
        let store = keepwire_client::store::Store::open(&alice).unwrap();
        for w in &want {
            store.enqueue(conv.parse().unwrap(), "text", w).unwrap();
        }
    }
    let mut tail = Tail::start(&alice);
    wait_until(
        Duration::from_secs(30),
        "some sends to be confirmed",
        || status(&alice)["outbox_pending"].as_u64().unwrap() < 200,
    );
    tail.kill9();
    let left = status(&alice)["outbox_pending"].as_u64().unwrap();
    println!("client killed with {left} of 200 sends still in the outbox");
    // Restarted: the rest goes out, nothing twice.
    let out = kw(&alice, &["sync"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(status(&alice)["outbox_pending"], 0);
    let out = kw_ok(&bob, &["sync"]);
    println!("bob: {out} {}", status(&bob));
    println!("alice: {}", status(&alice));
    assert_exactly_once_in_order(&bob, &want);
    assert_exactly_once_in_order(&alice, &want);
}

#[test]
fn a_send_from_a_second_process_goes_through_the_holder() {
    let Setup {
        dir: _dir,
        db: _db,
        relay: _relay,
        alice,
        bob,
    } = setup("two-procs");
    let conv = kw_ok(&alice, &["conv", "create", "bob"]).trim().to_owned();
    let _holder = Tail::start(&alice);
    wait_until(Duration::from_secs(10), "the tail to connect", || {
        status(&alice)["state"] == "Connected"
    });
    let out = kw_ok(&alice, &["send", &conv, "via the holder"]);
    assert_eq!(
        out.trim(),
        "sent",
        "confirmed through the other process's connection"
    );
    assert_eq!(status(&alice)["running"], true);
    kw_ok(&bob, &["sync"]);
    assert_exactly_once_in_order(&bob, &["via the holder".to_owned()]);
}

#[test]
fn sync_exit_codes_say_what_happened() {
    let dir = TempDir::new("sync-codes");
    let db = dir.join("relay.db");
    let ta = add_user(&db, "alice");
    let mut relay = RelayProcess::start(&bin(), &db, FAST);
    let alice = device(&dir, "alice", &relay.url, &ta);
    assert_eq!(kw(&alice, &["sync"]).status.code(), Some(0));
    relay.kill9();
    let out = kw(&alice, &["sync", "--deadline", "2s"]);
    assert_eq!(out.status.code(), Some(4), "unreachable");
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the relay"));
    let relay = RelayProcess::start(&bin(), &db, FAST);
    let out = kw(
        &alice,
        &["login", "--server", &relay.url, "--token", "kw_forged"],
    );
    assert_eq!(out.status.code(), Some(5), "auth rejected");
    // Commands on a home that never logged in say what to do.
    let nobody = dir.join("nobody");
    let out = kw(&nobody, &["sync"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("keepwire login"));
}

/// A relay process with two logged-in device homes, alice's and bob's.
struct Setup {
    dir: TempDir,
    db: std::path::PathBuf,
    relay: RelayProcess,
    alice: std::path::PathBuf,
    bob: std::path::PathBuf,
}

fn setup(tag: &str) -> Setup {
    let dir = TempDir::new(tag);
    let db = dir.join("relay.db");
    let ta = add_user(&db, "alice");
    let tb = add_user(&db, "bob");
    let relay = RelayProcess::start(&bin(), &db, FAST);
    let alice = device(&dir, "alice", &relay.url, &ta);
    let bob = device(&dir, "bob", &relay.url, &tb);
    Setup {
        dir,
        db,
        relay,
        alice,
        bob,
    }
}

/// Notifications recorded by a `--notify-command` hook (one JSON per line).
fn notifications(file: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn a_killed_app_catches_up_by_periodic_sync_with_one_coalesced_notification() {
    let Setup {
        dir,
        db: _db,
        relay: _relay,
        alice,
        bob,
    } = setup("closed");
    let conv = kw_ok(&bob, &["conv", "create", "alice"]).trim().to_owned();
    kw_ok(&alice, &["sync"]);
    // Alice's app is killed.
    let mut app = Tail::start(&alice);
    wait_until(Duration::from_secs(10), "alice's app to connect", || {
        status(&alice)["state"] == "Connected"
    });
    app.kill9();
    // Bob sends 20.
    for i in 0..20 {
        kw_ok(&bob, &["send", &conv, &format!("msg {i}")]);
    }
    // The periodic sync (WorkManager, BGAppRefreshTask, a systemd timer) runs.
    let hook = dir.join("notifications.jsonl");
    let cmd = format!("cat >> {}", hook.display());
    let out = kw_ok(&alice, &["sync", "--notify-command", &cmd]);
    assert!(
        out.contains("20 messages received") && out.contains("1 notification,"),
        "{out}"
    );
    let shown = notifications(&hook);
    assert_eq!(shown.len(), 1, "one coalesced notification: {shown:?}");
    assert_eq!(shown[0]["title"], "20 new messages from bob");
    assert_eq!(shown[0]["body"], "msg 19");
    assert_eq!(shown[0]["conv"].as_u64().unwrap().to_string(), conv);
    assert_eq!(shown[0]["message_ids"].as_array().unwrap().len(), 20);
    let want: Vec<String> = (0..20).map(|i| format!("msg {i}")).collect();
    assert_exactly_once_in_order(&alice, &want);
    // Running sync again raises nothing.
    let out = kw_ok(&alice, &["sync", "--notify-command", &cmd]);
    assert!(
        out.contains("0 messages received") && out.contains("0 notifications"),
        "{out}"
    );
    assert_eq!(notifications(&hook).len(), 1);
}

#[test]
fn quiet_hours_and_mute_suppress_notifications_and_prefs_explain_mistakes() {
    let Setup {
        dir,
        db: _db,
        relay: _relay,
        alice,
        bob,
    } = setup("prefs");
    let conv = kw_ok(&bob, &["conv", "create", "alice"]).trim().to_owned();
    let hook = dir.join("n.jsonl");
    kw_ok(
        &alice,
        &[
            "prefs",
            "notify-command",
            &format!("cat >> {}", hook.display()),
        ],
    );
    // Quiet all day (start = end).
    kw_ok(&alice, &["prefs", "quiet-hours", "00:00-00:00"]);
    kw_ok(&bob, &["send", &conv, "at night"]);
    let out = kw_ok(&alice, &["sync"]);
    assert!(
        out.contains("1 message received") && out.contains("0 notifications"),
        "{out}"
    );
    kw_ok(&alice, &["prefs", "quiet-hours", "off"]);
    kw_ok(&alice, &["prefs", "mute", &conv]);
    kw_ok(&bob, &["send", &conv, "muted"]);
    let out = kw_ok(&alice, &["sync"]);
    assert!(out.contains("0 notifications"), "{out}");
    kw_ok(&alice, &["prefs", "unmute", &conv]);
    kw_ok(&alice, &["prefs", "previews", "off"]);
    kw_ok(&bob, &["send", &conv, "private"]);
    let out = kw_ok(&alice, &["sync"]);
    assert!(out.contains("1 notification,"), "{out}");
    let shown = notifications(&hook);
    assert_eq!(shown.len(), 1);
    assert_eq!(shown[0]["body"], "New message", "no text with previews off");
    let out = kw_ok(&alice, &["prefs"]);
    assert!(
        out.contains("previews:       off") && out.contains("quiet hours:    off"),
        "{out}"
    );
    for (args, needle) in [
        (vec!["prefs", "quiet-hours", "late"], "is not HH:MM-HH:MM"),
        (
            vec!["prefs", "previews", "maybe"],
            "previews are `on` or `off`",
        ),
        (
            vec!["prefs", "background", "sometimes"],
            "is not a background policy",
        ),
    ] {
        let out = kw(&alice, &args);
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(needle),
            "{args:?}"
        );
    }
}

#[test]
fn stats_report_reconnects_background_traffic_sync_and_notifications() {
    let Setup {
        dir,
        db,
        mut relay,
        alice,
        bob,
    } = setup("stats");
    let addr = relay.url.trim_start_matches("ws://").to_owned();
    let conv = kw_ok(&bob, &["conv", "create", "alice"]).trim().to_owned();
    let mut agent = Tail::start(&alice);
    wait_until(Duration::from_secs(10), "alice's agent to connect", || {
        status(&alice)["state"] == "Connected"
    });
    // The relay dies and comes back: one reconnect.
    relay.kill9();
    let _relay = RelayProcess::start_at(&bin(), &db, &addr, FAST);
    wait_until(
        Duration::from_secs(30),
        "alice's agent to reconnect",
        || status(&alice)["state"] == "Connected",
    );
    kw_ok(&bob, &["send", &conv, "while alice is in the background"]);
    wait_until(Duration::from_secs(10), "the message to arrive", || {
        status(&alice)["messages"] == 1
    });
    agent.kill9();
    kw_ok(&bob, &["send", &conv, "picked up by sync"]);
    let hook = dir.join("n.jsonl");
    kw_ok(
        &alice,
        &[
            "sync",
            "--notify-command",
            &format!("cat >> {}", hook.display()),
        ],
    );
    let svg = dir.join("timeline.svg");
    let out = kw_ok(&alice, &["stats", "--json", "--svg", svg.to_str().unwrap()]);
    let s: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(s["reconnects"].as_u64().unwrap() >= 1, "{s}");
    assert!(s["reconnect_p50_ms"].as_i64().is_some(), "{s}");
    assert_eq!(s["received_background"], 1, "{s}");
    assert_eq!(s["received_by_sync"], 1, "{s}");
    assert_eq!(s["notifications"], 1, "{s}");
    assert!(
        s["wanted_ms"].as_i64().unwrap() > 0 && s["uptime"].as_f64().unwrap() > 0.0,
        "{s}"
    );
    let picture = std::fs::read_to_string(&svg).unwrap();
    assert!(
        picture.starts_with("<svg") && picture.contains("Connected"),
        "{picture}"
    );
    let text = kw_ok(&alice, &["stats"]);
    assert!(
        text.contains("reconnects:") && text.contains("notifications raised:        1"),
        "{text}"
    );
}

#[test]
fn the_agent_holds_the_connection_notifies_and_serves_send_sync_and_status() {
    use std::os::unix::fs::PermissionsExt as _;
    let Setup {
        dir,
        db: _db,
        relay: _relay,
        alice,
        bob,
    } = setup("agent");
    let conv = kw_ok(&bob, &["conv", "create", "alice"]).trim().to_owned();
    let hook = dir.join("n.jsonl");
    // The dedicated binary (`keepwire agent` runs the same code; the desktop
    // test uses that one).
    let mut agent = Tail(
        Command::new(env!("CARGO_BIN_EXE_keepwire-agent"))
            .args(["--notify-command", &format!("cat >> {}", hook.display())])
            .env("KEEPWIRE_HOME", &alice)
            .env("KEEPWIRE_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let sock = alice.join("agent.sock");
    wait_until(Duration::from_secs(10), "the agent's socket", || {
        sock.exists() && status(&alice)["agent"] == true
    });
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600
    );
    wait_until(Duration::from_secs(10), "the agent to connect", || {
        status(&alice)["state"] == "Connected"
    });
    // Bob writes: the agent notifies at once.
    kw_ok(&bob, &["send", &conv, "hi alice"]);
    wait_until(Duration::from_secs(10), "the notification", || {
        notifications(&hook).len() == 1
    });
    assert_eq!(notifications(&hook)[0]["title"], "bob");
    // Alice's commands go through the agent's connection.
    assert_eq!(kw_ok(&alice, &["send", &conv, "hi bob"]).trim(), "sent");
    let out = kw_ok(&alice, &["sync"]);
    assert!(out.contains("through the agent"), "{out}");
    assert_eq!(
        kw_ok(&alice, &["signal", &conv, "typing"]).trim(),
        "signalled through the agent"
    );
    // SIGTERM: the agent stops cleanly and removes its socket.
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(agent.0.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let exit = agent.0.wait().unwrap();
    assert!(exit.success(), "{exit:?}");
    assert!(!sock.exists());
    kw_ok(&bob, &["sync"]);
    assert_exactly_once_in_order(&bob, &["hi bob".to_owned()]);
}

#[test]
fn wss_with_a_private_ca_from_serve_to_login_send_and_sync() {
    let pki = keepwire_testkit::tls::TestPki::new();
    let dir = TempDir::new("tls");
    let db = dir.join("relay.db");
    let ta = add_user(&db, "alice");
    let tb = add_user(&db, "bob");
    let (cert, key, ca) = (
        pki.cert_pem.to_str().unwrap(),
        pki.key_pem.to_str().unwrap(),
        pki.ca_pem.to_str().unwrap(),
    );
    let relay = RelayProcess::start(&bin(), &db, &["--tls-cert", cert, "--tls-key", key]);
    assert!(relay.url.starts_with("wss://"), "{}", relay.url);
    let url = relay.url.replace("127.0.0.1", "localhost");
    // Without the CA the relay cannot be verified: login says why at once,
    // saves nothing and exits 4 (unreachable).
    let nobody = dir.join("nobody");
    let started = Instant::now();
    let out = kw(
        &nobody,
        &[
            "login",
            "--server",
            &url,
            "--token",
            &ta,
            "--timeout",
            "30s",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(
        err.contains("TLS failure") && err.contains("--no-check"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "not the whole timeout"
    );
    // A file that is not a certificate is refused up front.
    let out = kw(
        &nobody,
        &["login", "--server", &url, "--token", &ta, "--ca-cert", key],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: "));
    // With it, every command on the home uses it.
    let alice = dir.join("alice");
    let bob = dir.join("bob");
    for (home, token) in [(&alice, &ta), (&bob, &tb)] {
        let out = kw_ok(
            home,
            &["login", "--server", &url, "--token", token, "--ca-cert", ca],
        );
        assert!(out.contains("logged in as"), "{out}");
    }
    let conv = kw_ok(&alice, &["conv", "create", "bob"]).trim().to_owned();
    kw_ok(&alice, &["send", &conv, "over wss"]);
    kw_ok(&bob, &["sync"]);
    let log = kw_ok(&bob, &["log"]);
    assert!(log.contains("over wss"), "{log}");
}

#[test]
fn sync_beside_a_running_tail_asks_the_holder_and_returns_once_caught_up() {
    let Setup {
        dir: _dir,
        db: _db,
        mut relay,
        alice,
        bob,
    } = setup("sync-holder");
    let conv = kw_ok(&alice, &["conv", "create", "bob"]).trim().to_owned();
    let _holder = Tail::start(&alice);
    wait_until(Duration::from_secs(10), "the tail to connect", || {
        status(&alice)["state"] == "Connected"
    });
    kw_ok(&bob, &["sync"]);
    assert_eq!(
        kw_ok(&bob, &["send", &conv, "while alice tails"]).trim(),
        "sent"
    );
    let started = Instant::now();
    let out = kw(&alice, &["sync", "--deadline", "30s"]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("through the process holding"), "{stdout}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "returned once the holder was caught up, not at the deadline: {:?}",
        started.elapsed()
    );
    let log = kw_ok(&alice, &["log"]);
    assert!(log.contains("while alice tails"), "{log}");

    // The relay gone: the holder answers "unreachable", sync exits 4, early.
    relay.kill9();
    wait_until(
        Duration::from_secs(10),
        "the tail to see the relay gone",
        || status(&alice)["state"] != "Connected",
    );
    let started = Instant::now();
    let out = kw(&alice, &["sync", "--deadline", "30s"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("cannot reach the relay"), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "well before the 30 s deadline: {:?}",
        started.elapsed()
    );
}

#[test]
fn offline_send_is_queued_at_once_and_sync_gives_up_early() {
    let Setup {
        dir,
        db: _db,
        mut relay,
        alice,
        bob: _bob,
    } = setup("offline-fast");
    let conv = kw_ok(&alice, &["conv", "create", "bob"]).trim().to_owned();
    // Nothing listens on the relay's port any more: connections are refused.
    relay.kill9();
    let started = Instant::now();
    let out = kw_ok(&alice, &["send", &conv, "while the relay is down"]);
    assert!(out.starts_with("queued"), "{out}");
    assert!(out.contains("refused"), "says why: {out}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "not the 10 s timeout: {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    let out = kw(&alice, &["sync"]);
    assert_eq!(out.status.code(), Some(4));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("connection refused"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "not the 30 s deadline: {:?}",
        started.elapsed()
    );
    // The queued message is still there.
    assert!(status(&alice)["outbox_pending"].as_u64().unwrap_or(0) >= 1);

    // A relay name that does not resolve: the same, at once.
    let dns = dir.join("dns");
    let out = kw_ok(
        &dns,
        &[
            "login",
            "--server",
            "ws://keepwire-test.invalid:7447",
            "--token",
            "kw_unchecked",
            "--no-check",
        ],
    );
    assert!(out.contains("not checked"), "{out}");
    let started = Instant::now();
    let out = kw_ok(&dns, &["send", "1", "nowhere to go"]);
    assert!(out.starts_with("queued"), "{out}");
    let out = kw(&dns, &["sync"]);
    assert_eq!(out.status.code(), Some(4));
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "send and sync both fast: {:?}",
        started.elapsed()
    );
}

#[test]
fn login_exits_non_zero_when_it_cannot_check_the_token() {
    let dir = TempDir::new("login-check");
    let db = dir.join("relay.db");
    let ta = add_user(&db, "alice");
    let mut relay = RelayProcess::start(&bin(), &db, FAST);
    let url = relay.url.clone();
    relay.kill9();
    let home = dir.join("alice");
    let started = Instant::now();
    let out = kw(&home, &["login", "--server", &url, "--token", &ta]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "unreachable: {err}");
    assert!(
        err.contains("cannot check the token") && err.contains("connection refused"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(5), "at once");
    // Nothing was saved: the home has no login.
    let out = kw(&home, &["sync"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("keepwire login"));
    // --no-check saves without asking the relay ...
    let out = kw_ok(
        &home,
        &["login", "--server", &url, "--token", &ta, "--no-check"],
    );
    assert!(out.contains("not checked"), "{out}");
    // ... and the saved login works once the relay is back.
    let _relay = RelayProcess::start_at(&bin(), &db, url.trim_start_matches("ws://"), FAST);
    assert_eq!(kw(&home, &["sync"]).status.code(), Some(0));
}

#[test]
fn messages_say_revoked_status_speaks_words_and_prefs_have_units() {
    let Setup {
        dir: _dir,
        db,
        mut relay,
        alice,
        bob: _bob,
    } = setup("words");
    // Preferences with units, and as JSON.
    let prefs = kw_ok(&alice, &["prefs"]);
    assert!(
        prefs.contains(
            "background:     linger 1m (stay connected 1m after going to the background) (default)"
        ),
        "{prefs}"
    );
    let v: serde_json::Value = serde_json::from_str(&kw_ok(&alice, &["prefs", "--json"])).unwrap();
    assert_eq!(
        (v["background"].as_str(), v["linger_secs"].as_u64()),
        (Some("linger:1m"), Some(60))
    );
    let stats = kw_ok(&alice, &["stats"]);
    assert!(stats.contains("the last 1 day"), "{stats}");

    // Status of a holder whose relay is gone: words, and the raw value in JSON.
    let holder = Tail::start(&alice);
    wait_until(Duration::from_secs(10), "the tail to connect", || {
        status(&alice)["state"] == "Connected"
    });
    relay.kill9();
    wait_until(Duration::from_secs(10), "a connection problem", || {
        status(&alice)["last_error"] == "Refused"
    });
    let text = kw_ok(&alice, &["status"]);
    assert!(
        text.contains("last error: connection refused (is the relay running?)"),
        "{text}"
    );
    assert!(
        !text.contains("Refused\n") && !text.contains("BackingOff"),
        "{text}"
    );
    drop(holder);

    // A revoked token is called revoked, with what to do.
    let _relay = RelayProcess::start_at(&bin(), &db, relay.url.trim_start_matches("ws://"), FAST);
    let out = crate::keepwire(&[
        "admin",
        "--db",
        db.to_str().unwrap(),
        "token",
        "revoke",
        "--user",
        "alice",
    ]);
    assert!(out.status.success());
    let out = kw(&alice, &["sync"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(
        err.contains("the token was revoked") && err.contains("keepwire login"),
        "{err}"
    );
}

#[test]
fn a_signal_from_the_cli_reaches_a_member_tailing_with_signals() {
    use std::io::BufRead as _;
    let Setup {
        dir: _dir,
        db: _db,
        relay: _relay,
        alice,
        bob,
    } = setup("signal");
    let conv = kw_ok(&alice, &["conv", "create", "bob"]).trim().to_owned();
    let mut child = Command::new(bin())
        .args(["tail", "--json", "--signals"])
        .env("KEEPWIRE_HOME", &bob)
        .env("KEEPWIRE_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn tail");
    let stdout = child.stdout.take().unwrap();
    let _tail = Tail(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    wait_until(Duration::from_secs(10), "bob's tail to connect", || {
        status(&bob)["state"] == "Connected"
    });
    assert_eq!(
        kw_ok(&alice, &["signal", &conv, r#"{"typing":true}"#]).trim(),
        "signalled"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let got = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).expect("bob's tail prints the signal");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if !v["signal"].is_null() {
            break v["signal"].clone();
        }
    };
    assert_eq!(got["from"], "alice");
    assert_eq!(got["conv"].to_string(), conv);
    assert_eq!(got["data"], serde_json::json!({"typing": true}));
    // A conversation alice is not in: said plainly, not silently dropped.
    let out = kw(&alice, &["signal", "999", "typing"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a member of conversation 999"), "{err}");
}

#[test]
fn the_outbox_lists_retries_and_drops_unconfirmed_sends() {
    let Setup {
        dir: _dir,
        db: _db,
        relay: _relay,
        alice,
        bob: _bob,
    } = setup("outbox");
    let outbox = |home: &Path| -> Vec<serde_json::Value> {
        let v: serde_json::Value =
            serde_json::from_str(&kw_ok(home, &["outbox", "--json"])).unwrap();
        v["outbox"].as_array().unwrap().clone()
    };
    assert!(kw_ok(&alice, &["outbox"]).contains("the outbox is empty"));
    // Refused by the relay (alice is in no conversation 999): failed, kept.
    let out = kw(&alice, &["send", "999", "to nowhere"]);
    assert!(!out.status.success());
    let rows = outbox(&alice);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["state"], "failed");
    assert_eq!(rows[0]["conv"], 999);
    assert!(
        rows[0]["error"].as_str().unwrap().contains("not_member")
            || rows[0]["error"].as_str().unwrap().contains("no_such_conv"),
        "{rows:?}"
    );
    let failed = rows[0]["cid"].as_str().unwrap().to_owned();
    let table = kw_ok(&alice, &["outbox"]);
    assert!(
        table.contains(&failed) && table.contains("failed"),
        "{table}"
    );
    // Queued without waiting: pending.
    kw_ok(&alice, &["send", "--timeout", "0", "999", "later"]);
    let rows = outbox(&alice);
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1]["state"], "pending");
    let pending = rows[1]["cid"].as_str().unwrap().to_owned();
    let out = kw(&alice, &["outbox", "retry", &pending]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("still pending"));
    // Nothing holds the connection: a pending send may be dropped.
    assert_eq!(
        kw_ok(&alice, &["outbox", "drop", &pending]).trim(),
        format!("dropped {pending}")
    );
    // Retry puts the failed one back in line; the next sync sends it (and
    // the relay refuses it again).
    assert_eq!(
        kw_ok(&alice, &["outbox", "retry", "--all"]).trim(),
        format!("queued again {failed}")
    );
    let rows = outbox(&alice);
    assert_eq!(
        (rows.len(), rows[0]["state"].as_str()),
        (1, Some("pending"))
    );
    let _ = kw(&alice, &["sync"]);
    let rows = outbox(&alice);
    assert_eq!(rows[0]["state"], "failed", "{rows:?}");
    assert_eq!(
        kw_ok(&alice, &["outbox", "drop", &failed]).trim(),
        format!("dropped {failed}")
    );
    assert!(outbox(&alice).is_empty());
    let out = kw(&alice, &["outbox", "drop", &failed]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no send"));
}

#[test]
fn a_revoked_agent_exits_5_and_says_why() {
    let Setup {
        dir: _dir,
        db,
        relay: _relay,
        alice,
        bob: _bob,
    } = setup("revoked-agent");
    let mut agent = Tail(
        Command::new(bin())
            .args(["agent", "--no-desktop"])
            .env("KEEPWIRE_HOME", &alice)
            .env("KEEPWIRE_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    wait_until(Duration::from_secs(10), "the agent to connect", || {
        status(&alice)["state"] == "Connected"
    });
    let out = crate::keepwire(&[
        "admin",
        "--db",
        db.to_str().unwrap(),
        "token",
        "revoke",
        "--user",
        "alice",
    ]);
    assert!(out.status.success());
    let mut exit = None;
    wait_until(Duration::from_secs(15), "the agent to exit", || {
        exit = agent.0.try_wait().unwrap();
        exit.is_some()
    });
    let mut err = String::new();
    std::io::Read::read_to_string(agent.0.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert_eq!(exit.unwrap().code(), Some(5), "{err}");
    assert!(
        err.contains("ERROR") && err.contains("the token was revoked"),
        "{err}"
    );
    assert!(!alice.join("agent.sock").exists());
}

#[test]
fn a_relay_restore_that_drops_local_messages_is_said_out_loud() {
    let Setup {
        dir,
        db,
        mut relay,
        alice,
        bob,
    } = setup("epoch-gap");
    let conv = kw_ok(&bob, &["conv", "create", "alice"]).trim().to_owned();
    let backup = dir.join("before.db");
    kw_ok(
        &alice,
        &[
            "admin",
            "--db",
            db.to_str().unwrap(),
            "backup",
            backup.to_str().unwrap(),
        ],
    );
    for m in ["one", "two"] {
        assert_eq!(kw_ok(&bob, &["send", &conv, m]).trim(), "sent");
    }
    kw_ok(&alice, &["sync"]);
    assert!(status(&alice)["last_gap"].is_null());
    // The relay is restored from the backup: its log has a new epoch.
    relay.kill9();
    kw_ok(
        &alice,
        &[
            "admin",
            "--db",
            db.to_str().unwrap(),
            "restore",
            backup.to_str().unwrap(),
        ],
    );
    let _relay = RelayProcess::start_at(&bin(), &db, relay.url.trim_start_matches("ws://"), FAST);
    let out = kw(&alice, &["sync"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the relay's message log was replaced")
            && err.contains("messages stored on this device were forgotten"),
        "{err}"
    );
    let s = status(&alice);
    assert_eq!(s["last_gap"]["reason"], "epoch", "{s}");
    assert!(
        s["last_gap"]["dropped_messages"].as_u64().unwrap() >= 2,
        "{s}"
    );
    let text = kw_ok(&alice, &["status"]);
    assert!(text.contains("warning:  at "), "{text}");
}
