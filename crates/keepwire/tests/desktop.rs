//! Desktop notifications through a real D-Bus session bus: a private
//! `dbus-daemon` (from the base image) and a fake
//! `org.freedesktop.Notifications` service written with zbus.

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keepwire_testkit::{RelayProcess, TempDir};

use crate::{FAST, KillOnDrop, add_user, bin};

/// One `Notify` call: (app name, replaces id, summary, body).
type Call = (String, u32, String, String);

struct FakeNotifications {
    calls: Arc<Mutex<Vec<Call>>>,
    next_id: u32,
    /// Advertise `body-markup` (the server renders markup in bodies).
    markup: bool,
}

#[zbus::interface(name = "org.freedesktop.Notifications")]
impl FakeNotifications {
    #[allow(clippy::too_many_arguments, reason = "the D-Bus method's signature")]
    async fn notify(
        &mut self,
        app_name: String,
        replaces_id: u32,
        _app_icon: String,
        summary: String,
        body: String,
        _actions: Vec<String>,
        _hints: HashMap<String, zbus::OwnedVariant>,
        _expire_timeout: i32,
    ) -> u32 {
        self.calls
            .lock()
            .unwrap()
            .push((app_name, replaces_id, summary, body));
        if replaces_id != 0 {
            return replaces_id;
        }
        self.next_id += 1;
        self.next_id
    }

    fn get_capabilities(&self) -> Vec<String> {
        let mut caps = vec!["body".to_string()];
        if self.markup {
            caps.push("body-markup".into());
        }
        caps
    }

    fn get_server_information(&self) -> (String, String, String, String) {
        (
            "fake".into(),
            "keepwire-tests".into(),
            "1.0".into(),
            "1.2".into(),
        )
    }

    fn close_notification(&self, _id: u32) {}
}

/// A private bus (a session bus's configuration; the agent's tests also
/// use one as the system bus); killed on drop.
pub(crate) struct Bus {
    child: Child,
    /// The address to connect to.
    pub(crate) address: String,
}

impl Bus {
    /// Starts a `dbus-daemon` and reads its address.
    pub(crate) fn start() -> Bus {
        let mut child = Command::new("dbus-daemon")
            .args(["--session", "--nofork", "--nopidfile", "--print-address=1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("dbus-daemon (part of the base image)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        Bus {
            child,
            address: line.trim().to_owned(),
        }
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn serve_notifications(address: &str) -> (zbus::Connection, Arc<Mutex<Vec<Call>>>) {
    serve_notifications_with(address, false).await
}

async fn serve_notifications_with(
    address: &str,
    markup: bool,
) -> (zbus::Connection, Arc<Mutex<Vec<Call>>>) {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let conn = zbus::connection::Builder::address(address)
        .name("org.freedesktop.Notifications")
        .serve_at(
            "/org/freedesktop/Notifications",
            FakeNotifications {
                calls: calls.clone(),
                next_id: 0,
                markup,
            },
        )
        .build()
        .await
        .expect("serve the fake notification daemon");
    (conn, calls)
}

fn kw_bus(home: &std::path::Path, bus: &str, args: &[&str]) -> String {
    let out = Command::new(bin())
        .args(args)
        .env("KEEPWIRE_HOME", home)
        .env("KEEPWIRE_LOG", "warn")
        .env("KEEPWIRE_TOKEN_STORE", "file")
        .env("DBUS_SESSION_BUS_ADDRESS", bus)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_messages_become_one_replaced_desktop_notification() {
    let bus = Bus::start();
    let (_service, calls) = serve_notifications(&bus.address).await;
    let dir = TempDir::new("desktop");
    let db = dir.join("relay.db");
    let ta = add_user(&db, "alice");
    let tb = add_user(&db, "bob");
    let relay = RelayProcess::start(&bin(), &db, FAST);
    let alice = dir.join("alice");
    let bob = dir.join("bob");
    kw_bus(
        &alice,
        &bus.address,
        &["login", "--server", &relay.url, "--token", &ta],
    );
    kw_bus(
        &bob,
        &bus.address,
        &["login", "--server", &relay.url, "--token", &tb],
    );
    let conv = kw_bus(&bob, &bus.address, &["conv", "create", "alice"])
        .trim()
        .to_owned();
    kw_bus(&alice, &bus.address, &["sync"]);
    for i in 0..3 {
        kw_bus(&bob, &bus.address, &["send", &conv, &format!("ping {i}")]);
    }
    let out = kw_bus(&alice, &bus.address, &["sync", "--desktop"]);
    assert!(
        out.contains("3 messages received") && out.contains("1 notification,"),
        "{out}"
    );
    {
        let got = calls.lock().unwrap().clone();
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(
            got[0],
            (
                "keepwire".into(),
                0,
                "3 new messages from bob".into(),
                "ping 2".into()
            )
        );
    }
    // Nothing twice.
    kw_bus(&alice, &bus.address, &["sync", "--desktop"]);
    assert_eq!(calls.lock().unwrap().len(), 1);
    // A connected background agent replaces its notification in place.
    let mut tail = KillOnDrop(
        Command::new(bin())
            .args(["tail", "--desktop"])
            .env("KEEPWIRE_HOME", &alice)
            .env("KEEPWIRE_LOG", "warn")
            .env("DBUS_SESSION_BUS_ADDRESS", &bus.address)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    keepwire_testkit::wait_until(Duration::from_secs(10), "alice's agent to connect", || {
        let alice = alice.clone();
        async move {
            let out = Command::new(bin())
                .args(["status", "--json"])
                .env("KEEPWIRE_HOME", &alice)
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).contains("\"state\":\"Connected\"")
        }
    })
    .await;
    for i in 0..2 {
        kw_bus(&bob, &bus.address, &["send", &conv, &format!("live {i}")]);
        keepwire_testkit::wait_until(Duration::from_secs(10), "the notification", || {
            let calls = calls.clone();
            async move { calls.lock().unwrap().len() >= 2 + i }
        })
        .await;
    }
    tail.kill();
    let got = calls.lock().unwrap().clone();
    assert_eq!(got.len(), 3, "{got:?}");
    // Unread until the app is opened: the count goes on.
    assert_eq!(got[1].2, "4 new messages from bob");
    assert_ne!(
        got[2].1, 0,
        "the agent's second notification replaces its first: {got:?}"
    );
    assert_eq!(got[2].2, "5 new messages from bob");
    assert_eq!(got[2].3, "live 1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_text_cannot_inject_markup_into_desktop_notifications() {
    let (markup_bus, plain_bus) = (Bus::start(), Bus::start());
    let (_m, markup_calls) = serve_notifications_with(&markup_bus.address, true).await;
    let (_p, plain_calls) = serve_notifications_with(&plain_bus.address, false).await;
    let dir = TempDir::new("markup");
    let db = dir.join("relay.db");
    let ta = add_user(&db, "alice");
    let tb = add_user(&db, "bob");
    let relay = RelayProcess::start(&bin(), &db, FAST);
    let (alice, bob) = (dir.join("alice"), dir.join("bob"));
    let bus = &markup_bus.address;
    kw_bus(
        &alice,
        bus,
        &["login", "--server", &relay.url, "--token", &ta],
    );
    kw_bus(
        &bob,
        bus,
        &["login", "--server", &relay.url, "--token", &tb],
    );
    let conv = kw_bus(&bob, bus, &["conv", "create", "alice"])
        .trim()
        .to_owned();
    kw_bus(&alice, bus, &["sync"]);
    let hostile = r#"<a href="https://evil.example">update</a> & <img src="file:///x"/>"#;
    kw_bus(&bob, bus, &["send", &conv, hostile]);
    // A server that renders markup gets it escaped: shown as the text it is.
    kw_bus(&alice, bus, &["sync", "--desktop"]);
    let got = markup_calls.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(
        got[0].3,
        r#"&lt;a href="https://evil.example"&gt;update&lt;/a&gt; &amp; &lt;img src="file:///x"/&gt;"#
    );
    // One that shows plain text gets it as is.
    kw_bus(&bob, bus, &["send", &conv, hostile]);
    kw_bus(&alice, &plain_bus.address, &["sync", "--desktop"]);
    let got = plain_calls.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].3, hostile);
}
