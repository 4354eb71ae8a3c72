//! `keepwire push` and `prefs mute` against a `keepwire serve --push-config`
//! process and a mock FCM (a small HTTP/1.1 server on 127.0.0.1).

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpListener;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keepwire_testkit::{RelayProcess, TempDir};

use crate::{FAST, add_user, bin, kw, kw_ok};

/// FCM data messages received, by token.
type Pushes = Arc<Mutex<Vec<(String, serde_json::Value)>>>;

/// A mock FCM: `POST /token` hands out an access token, `POST
/// /v1/projects/*/messages:send` records the message and answers 200, or
/// (while [`MockFcm::hang`] is on) records it and never answers: a provider
/// call in flight. One request per connection (`Connection: close`).
pub(crate) struct MockFcm {
    /// Where it listens (`http://127.0.0.1:PORT`).
    pub url: String,
    /// The messages received, in order (also those left unanswered).
    pub pushes: Pushes,
    hang: Arc<AtomicBool>,
}

impl MockFcm {
    pub(crate) fn start() -> MockFcm {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let pushes: Pushes = Default::default();
        let hang = Arc::new(AtomicBool::new(false));
        let (got, hanging) = (pushes.clone(), hang.clone());
        std::thread::spawn(move || {
            // Unanswered connections stay open until the mock ends.
            let mut held = Vec::new();
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let Some((path, body)) = read_request(&conn) else {
                    continue;
                };
                let answer = if path == "/token" {
                    serde_json::json!({"access_token": "mock", "expires_in": 3600, "token_type": "Bearer"})
                } else {
                    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                    let m = &v["message"];
                    got.lock().unwrap().push((
                        m["token"].as_str().unwrap_or_default().to_owned(),
                        m["data"].clone(),
                    ));
                    if hanging.load(Ordering::SeqCst) {
                        held.push(conn);
                        continue;
                    }
                    serde_json::json!({"name": "projects/kw-test/messages/1"})
                };
                let text = answer.to_string();
                let _ = write!(
                    &conn,
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
                    text.len()
                );
            }
        });
        MockFcm { url, pushes, hang }
    }

    /// Leaves send requests unanswered (`true`) or answers them.
    pub(crate) fn hang(&self, on: bool) {
        self.hang.store(on, Ordering::SeqCst);
    }

    /// How many messages were received for `token`.
    pub(crate) fn count(&self, token: &str) -> usize {
        let pushes = self.pushes.lock().unwrap();
        pushes.iter().filter(|(t, _)| t == token).count()
    }

    /// Waits for the `n`th message to `token` and returns its data.
    pub(crate) fn wait_for(&self, token: &str, n: usize) -> serde_json::Value {
        wait_until(
            Duration::from_secs(20),
            &format!("push {n} to {token}"),
            || self.count(token) >= n,
        );
        let pushes = self.pushes.lock().unwrap();
        let mine: Vec<_> = pushes.iter().filter(|(t, _)| t == token).collect();
        mine[n - 1].1.clone()
    }

    /// Writes a service account and a push configuration pointing at this
    /// mock into `dir`; returns the configuration's path.
    pub(crate) fn config(&self, dir: &TempDir) -> std::path::PathBuf {
        let key = include_str!("../../keepwire-push/tests/fixtures/fcm-test-key.pem");
        let sa = serde_json::json!({
            "type": "service_account", "project_id": "kw-test", "private_key_id": "k1",
            "private_key": key, "client_email": "relay@kw-test.iam.gserviceaccount.com",
            "token_uri": format!("{}/token", self.url),
        });
        std::fs::write(dir.join("sa.json"), sa.to_string()).unwrap();
        let config = dir.join("push.toml");
        std::fs::write(
            &config,
            format!(
                "[fcm]\nservice_account = \"sa.json\"\nendpoint = \"{}\"\n",
                self.url
            ),
        )
        .unwrap();
        config
    }
}

/// One HTTP/1.1 request: its path and body.
fn read_request(conn: &std::net::TcpStream) -> Option<(String, Vec<u8>)> {
    let mut reader = BufReader::new(conn.try_clone().ok()?);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
    let mut len = 0;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; len];
    reader.read_exact(&mut body).ok()?;
    Some((path, body))
}

/// A relay's Prometheus counter (summed over labels), read over plain HTTP.
pub(crate) fn relay_metric(relay: &RelayProcess, name: &str) -> u64 {
    let mut s = std::net::TcpStream::connect(relay.host_port()).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    keepwire_testkit::metric(&text, name)
}

pub(crate) fn wait_until(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until every push the relay queued has reached the mock: after a
/// later push to another device was seen, nothing earlier is still on its
/// way (the relay decides pushes in order).
fn settled(relay: &RelayProcess, fcm: &MockFcm) {
    wait_until(Duration::from_secs(10), "queued pushes to arrive", || {
        relay_metric(relay, "keepwire_push_enqueued_total") as usize
            == fcm.pushes.lock().unwrap().len()
    });
}

#[test]
fn push_register_status_receive_and_mute_from_the_command_line() {
    let dir = TempDir::new("push-cli");
    let fcm = MockFcm::start();
    let config = fcm.config(&dir);
    let db = dir.join("relay.db");
    let ta = add_user(&db, "alice");
    let tb = add_user(&db, "bob");
    // Carol is the marker: a push to her shows the relay has decided
    // everything that came before (it decides in order).
    let tc = add_user(&db, "carol");
    let mut args = FAST.to_vec();
    args.extend(["--push-config", config.to_str().unwrap()]);
    let relay = RelayProcess::start(&bin(), &db, &args);
    let alice = dir.join("alice");
    let bob = dir.join("bob");
    kw_ok(&alice, &["login", "--server", &relay.url, "--token", &ta]);
    kw_ok(&bob, &["login", "--server", &relay.url, "--token", &tb]);
    let carol = dir.join("carol");
    kw_ok(&carol, &["login", "--server", &relay.url, "--token", &tc]);
    let conv = kw_ok(&alice, &["conv", "create", "bob"]).trim().to_owned();
    let marker = kw_ok(&alice, &["conv", "create", "carol"])
        .trim()
        .to_owned();
    let register = ["push", "register", "--provider", "fcm", "--token"];
    kw_ok(&carol, &[&register[..], &["carol-cli-1"]].concat());

    // Not registered yet; then registered; the token never shows.
    assert!(kw_ok(&bob, &["push", "status"]).contains("not registered"));
    let out = kw_ok(
        &bob,
        &[
            "push",
            "register",
            "--provider",
            "fcm",
            "--token",
            "bob-cli-1",
        ],
    );
    assert!(out.contains("push:        fcm"), "{out}");
    let status: serde_json::Value =
        serde_json::from_str(&kw_ok(&bob, &["push", "status", "--json"])).unwrap();
    let id = status["id"].as_str().expect("an id").to_owned();
    assert_eq!(status["pending"], false);
    assert!(!status.to_string().contains("bob-cli-1"), "{status}");
    // A refusal is one clear line: this relay has no APNs.
    let out = kw(
        &bob,
        &[
            "push",
            "register",
            "--provider",
            "apns",
            "--token",
            &"ab".repeat(32),
            "--topic",
            "com.example.chat",
            "--env",
            "sandbox",
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("offers no apns"), "{err}");
    kw_ok(
        &bob,
        &[
            "push",
            "register",
            "--provider",
            "fcm",
            "--token",
            "bob-cli-1",
        ],
    );

    // Bob is not connected: alice's burst wakes him once.
    for i in 0..5 {
        kw_ok(&alice, &["send", &conv, &format!("hi {i}")]);
    }
    let data = fcm.wait_for("bob-cli-1", 1);
    assert_eq!(data, serde_json::json!({"kw": id}));
    kw_ok(&alice, &["send", &marker, "marker 1"]);
    fcm.wait_for("carol-cli-1", 1);
    settled(&relay, &fcm);
    assert_eq!(fcm.count("bob-cli-1"), 1, "one push for the burst");

    // `push receive`: the push body on stdin, one coalesced notification.
    let mut child = std::process::Command::new(bin())
        .args(["push", "receive", "--json"])
        .env("KEEPWIRE_HOME", &bob)
        .env("KEEPWIRE_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(data.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(shown.len(), 1, "{shown:?}");
    assert_eq!(shown[0]["unread"], 5);
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("push for {id}")));
    // Received again: nothing new to show.
    let mut child = std::process::Command::new(bin())
        .args(["push", "receive", "--json"])
        .env("KEEPWIRE_HOME", &bob)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert!(out.stdout.is_empty());

    // Muted through the relay: no push for the next message.
    let out = kw(&bob, &["prefs", "mute", &conv]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("on all your devices"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    kw_ok(&alice, &["send", &conv, "quiet please"]);
    // Carol syncs (which clears her outstanding push), then gets the next.
    kw_ok(&carol, &["sync"]);
    kw_ok(&alice, &["send", &marker, "marker 2"]);
    fcm.wait_for("carol-cli-1", 2);
    settled(&relay, &fcm);
    assert_eq!(fcm.count("bob-cli-1"), 1, "muted: no push");

    // Unregistered.
    let out = kw_ok(&bob, &["push", "unregister"]);
    assert!(out.contains("not registered"), "{out}");
    drop(relay);
}
