//! Push wake-ups through faults, end to end: a relay killed around its
//! provider call loses no wake-up, and a device whose process the OS froze
//! (SIGSTOP) gets a push, is synced by `keepwire push receive` beside it, and
//! reconnects when it thaws instead of stopping as "replaced".

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use keepwire_testkit::{RelayProcess, TempDir};

use crate::push_cli::{MockFcm, relay_metric, wait_until};
use crate::{FAST, add_user, bin, kw_ok};

/// A relay, two users (alice writes to bob), bob registered for FCM and not
/// connected.
struct Setup {
    dir: TempDir,
    fcm: MockFcm,
    args: Vec<String>,
    alice: std::path::PathBuf,
    bob: std::path::PathBuf,
    conv: String,
}

impl Setup {
    fn new(tag: &str, extra: &[&str]) -> (Setup, RelayProcess) {
        let dir = TempDir::new(tag);
        let fcm = MockFcm::start();
        let config = fcm.config(&dir);
        let db = dir.join("relay.db");
        let ta = add_user(&db, "alice");
        let tb = add_user(&db, "bob");
        let mut args: Vec<String> = FAST.iter().map(|s| s.to_string()).collect();
        args.extend(["--push-config".into(), config.display().to_string()]);
        let relay = start(&dir, &args, extra);
        let (alice, bob) = (dir.join("alice"), dir.join("bob"));
        kw_ok(&alice, &["login", "--server", &relay.url, "--token", &ta]);
        kw_ok(&bob, &["login", "--server", &relay.url, "--token", &tb]);
        let conv = kw_ok(&alice, &["conv", "create", "bob"]).trim().to_owned();
        let register = ["push", "register", "--provider", "fcm", "--token", "bob-1"];
        kw_ok(&bob, &register);
        let setup = Setup {
            dir,
            fcm,
            args,
            alice,
            bob,
            conv,
        };
        (setup, relay)
    }

    /// The relay again, on the same database and address.
    fn restart(&self, old: &RelayProcess, extra: &[&str]) -> RelayProcess {
        let db = self.dir.join("relay.db");
        let mut args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        args.extend(extra);
        RelayProcess::start_at(&bin(), &db, old.host_port(), &args)
    }

    fn send(&self, body: &str) {
        kw_ok(&self.alice, &["send", &self.conv, body]);
    }
}

fn start(dir: &TempDir, args: &[String], extra: &[&str]) -> RelayProcess {
    let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
    all.extend(extra);
    RelayProcess::start(&bin(), &dir.join("relay.db"), &all)
}

/// Waits for a relay that crashes by itself (a failpoint) to be gone.
fn wait_exit(relay: &mut RelayProcess) {
    wait_until(Duration::from_secs(20), "the relay to crash", || {
        matches!(relay.child.try_wait(), Ok(Some(_)))
    });
}

#[test]
fn a_relay_killed_while_the_provider_call_is_in_flight_pushes_again_after_restart() {
    let (s, mut relay) = Setup::new("push-kill-inflight", &[]);
    s.fcm.hang(true);
    s.send("one");
    let first = s.fcm.wait_for("bob-1", 1);
    relay.kill9();
    s.fcm.hang(false);
    let relay = s.restart(&relay, &[]);
    // The outcome of the first call is unknown: it is sent again, once.
    assert_eq!(s.fcm.wait_for("bob-1", 2), first);
    wait_until(Duration::from_secs(10), "the resend to be answered", || {
        relay_metric(&relay, "keepwire_push_sent_total") == 1
    });
    assert_eq!(relay_metric(&relay, "keepwire_push_enqueued_total"), 1);
}

#[test]
fn a_relay_crashing_just_before_the_provider_call_loses_no_wake_up() {
    let (s, mut relay) = Setup::new("push-kill-before", &["--push-failpoint", "before-call"]);
    s.send("one");
    wait_exit(&mut relay);
    assert_eq!(s.fcm.count("bob-1"), 0, "it crashed before calling");
    let relay = s.restart(&relay, &[]);
    s.fcm.wait_for("bob-1", 1);
    wait_until(Duration::from_secs(10), "the push to be answered", || {
        relay_metric(&relay, "keepwire_push_sent_total") == 1
    });
    assert_eq!(relay_metric(&relay, "keepwire_push_enqueued_total"), 1);
}

#[test]
fn a_relay_crashing_just_after_the_providers_2xx_sends_at_most_one_duplicate() {
    let (s, mut relay) = Setup::new("push-kill-after", &["--push-failpoint", "after-delivered"]);
    s.send("one");
    let first = s.fcm.wait_for("bob-1", 1);
    wait_exit(&mut relay);
    // The 2xx was not recorded: one duplicate wake-up (the client's
    // notification claims make it harmless), and no more.
    let relay = s.restart(&relay, &[]);
    assert_eq!(s.fcm.wait_for("bob-1", 2), first);
    wait_until(Duration::from_secs(10), "the resend to be answered", || {
        relay_metric(&relay, "keepwire_push_sent_total") == 1
    });
    assert_eq!(relay_metric(&relay, "keepwire_push_enqueued_total"), 1);
    // Once bob has synced, the next message pushes again.
    kw_ok(&s.bob, &["sync"]);
    s.send("two");
    s.fcm.wait_for("bob-1", 3);
}

/// `keepwire tail --json` with its stdout lines on a channel.
struct Tail {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Tail {
    fn start(home: &Path) -> Tail {
        let mut child = Command::new(bin())
            .args(["tail", "--json"])
            .env("KEEPWIRE_HOME", home)
            .env("KEEPWIRE_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn tail");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Tail { child, lines }
    }

    /// Waits for a printed message whose body is `body`.
    fn wait_for(&self, body: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("tail never printed {body:?}"));
            if line.contains(&format!("\"{body}\"")) {
                return;
            }
        }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_frozen_device_is_pushed_synced_beside_and_reconnects_when_it_thaws() {
    let (s, _relay) = Setup::new("push-frozen", &["--push-frozen-after", "1s"]);
    let mut tail = Tail::start(&s.bob);
    s.send("before");
    tail.wait_for("before");

    // The OS freezes the app with its socket open: the relay sees silence
    // while entries wait, and pushes.
    tail.signal("-STOP");
    for i in 0..3 {
        s.send(&format!("frozen {i}"));
    }
    let data = s.fcm.wait_for("bob-1", 1);

    // The push wakes a second process of the same device (an iOS
    // notification extension): the holder does not answer, so it connects
    // as a transient connection and fetches everything.
    let mut child = Command::new(bin())
        .args(["push", "receive", "--json"])
        .env("KEEPWIRE_HOME", &s.bob)
        .env("KEEPWIRE_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(data.to_string().as_bytes()).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let shown: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(shown.len(), 1, "{shown:?}");
    assert_eq!(shown[0]["unread"], 3, "{shown:?}");

    // Thawed, the app was told its connection was borrowed (4012), not
    // replaced (4005): it reconnects and keeps receiving.
    tail.signal("-CONT");
    s.send("after");
    tail.wait_for("after");
    assert!(
        matches!(tail.child.try_wait(), Ok(None)),
        "tail must keep running"
    );
}
