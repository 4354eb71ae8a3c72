//! The bindings' API from Rust against an in-process relay: callbacks on the
//! crate's thread that call the client (even `close`), a listener that
//! panics, the runtime's size, push wake-ups.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keepwire_ffi::{
    AppState, Client, ConnectionState, Event, EventListener, KeepwireError, SyncOutcome,
};
use keepwire_testkit::TempDir;
use keepwire_testkit::relay::TestRelay;

const T: Duration = Duration::from_secs(30);

/// A relay on its own runtime (the test thread stays outside any runtime,
/// like an app's thread).
struct Relay {
    rt: tokio::runtime::Runtime,
    relay: TestRelay,
}

impl Relay {
    fn start() -> Relay {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let relay = rt.block_on(TestRelay::start());
        Relay { rt, relay }
    }

    fn user(&self, name: &str) -> String {
        self.rt.block_on(self.relay.user(name))
    }
}

fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + T;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

type Log = Arc<Mutex<Vec<(String, Event)>>>;

struct Recorder(Log);

impl EventListener for Recorder {
    fn on_event(&self, event: Event) {
        let thread = std::thread::current().name().unwrap_or("").to_owned();
        self.0.lock().unwrap().push((thread, event));
    }
}

fn login(relay: &Relay, home: &TempDir, user: &str) -> Arc<Client> {
    let c = Client::new(home.path().to_string_lossy().into_owned()).unwrap();
    c.login(relay.relay.url.clone(), relay.user(user)).unwrap();
    c.wait_connected(30_000).unwrap();
    c
}

#[test]
fn the_runtime_has_at_most_two_workers_and_bad_input_gets_clear_errors() {
    assert!((1..=2).contains(&keepwire_ffi::runtime_worker_threads()));
    let home = TempDir::new("ffi-bad");
    let c = Client::new(home.path().to_string_lossy().into_owned()).unwrap();
    assert!(matches!(
        c.send(1, "x".into()),
        Err(KeepwireError::NotLoggedIn { .. })
    ));
    let err = c.login("https://relay".into(), "kw_x".into()).unwrap_err();
    assert!(err.to_string().contains("ws://HOST:PORT"), "{err}");
    assert!(matches!(
        c.set_trusted_certificates("not a certificate".into()),
        Err(KeepwireError::InvalidInput { .. })
    ));
    c.close();
    assert_eq!(c.messages(1, 10), Err(KeepwireError::Closed));
}

/// Replies to bob from inside the callback, then closes the client from
/// inside the callback when told to.
struct Replier {
    client: Mutex<Option<Arc<Client>>>,
    conv: u64,
    log: Log,
}

impl EventListener for Replier {
    fn on_event(&self, event: Event) {
        let thread = std::thread::current().name().unwrap_or("").to_owned();
        self.log.lock().unwrap().push((thread, event.clone()));
        let Event::MessageReceived { message } = event else {
            return;
        };
        if message.sender != "bob" {
            return;
        }
        let client = self.client.lock().unwrap().clone().unwrap();
        let _ = client.messages(self.conv, 100).unwrap();
        let _ = client.status();
        client.set_app_state(AppState::Foreground);
        client
            .send(self.conv, format!("re: {}", message.body))
            .unwrap();
        if message.body == "close" {
            client.close();
            // Let go of it from inside the callback, too.
            self.client.lock().unwrap().take();
        }
    }
}

struct Panicker;

impl EventListener for Panicker {
    fn on_event(&self, _event: Event) {
        panic!("a listener bug");
    }
}

#[test]
fn callbacks_run_on_the_crates_thread_and_may_call_the_client_even_close() {
    let relay = Relay::start();
    let (ha, hb) = (TempDir::new("ffi-alice"), TempDir::new("ffi-bob"));
    let bob = login(&relay, &hb, "bob");
    let bob_log: Log = Default::default();
    bob.set_listener(Box::new(Recorder(bob_log.clone())));
    let alice = login(&relay, &ha, "alice");
    let conv = bob
        .create_conversation(vec!["alice".into()], None, false)
        .unwrap();
    // A listener that panics does not stop the deliveries.
    alice.set_listener(Box::new(Panicker));
    bob.send(conv.id, "into the panicking listener".into())
        .unwrap();
    wait_until("alice to store it", || {
        alice.messages(conv.id, 10).unwrap().len() == 1
    });
    let log: Log = Default::default();
    let replier = Arc::new(Replier {
        client: Mutex::new(Some(alice.clone())),
        conv: conv.id,
        log: log.clone(),
    });
    struct Shared(Arc<Replier>);
    impl EventListener for Shared {
        fn on_event(&self, event: Event) {
            self.0.on_event(event)
        }
    }
    alice.set_listener(Box::new(Shared(replier.clone())));
    bob.send(conv.id, "ping".into()).unwrap();
    wait_until("the reply from inside the callback", || {
        bob.messages(conv.id, 10)
            .unwrap()
            .iter()
            .any(|m| m.body == "re: ping")
    });
    bob.send(conv.id, "close".into()).unwrap();
    wait_until("close from inside the callback", || {
        replier.client.lock().unwrap().is_none()
    });
    assert_eq!(
        alice.send(conv.id, "after".into()),
        Err(KeepwireError::Closed)
    );
    drop(alice);
    let threads: std::collections::HashSet<String> =
        log.lock().unwrap().iter().map(|(t, _)| t.clone()).collect();
    assert_eq!(
        threads,
        ["keepwire-callbacks".to_owned()].into_iter().collect()
    );
    // Bob heard alice's confirmations in order.
    wait_until("bob to hear the reply", || {
        bob_log.lock().unwrap().iter().any(
            |(_, e)| matches!(e, Event::MessageReceived { message } if message.body == "re: close"),
        )
    });
    bob.close();
}

#[test]
fn a_push_wake_up_hands_back_one_notification_and_parks_again() {
    let relay = Relay::start();
    let (ha, hb) = (TempDir::new("ffi-push-alice"), TempDir::new("ffi-push-bob"));
    let bob = login(&relay, &hb, "bob");
    let alice = Client::new(ha.path().to_string_lossy().into_owned()).unwrap();
    let log: Log = Default::default();
    alice.set_listener(Box::new(Recorder(log.clone())));
    alice.set_app_state(AppState::Background);
    alice
        .login(relay.relay.url.clone(), relay.user("alice"))
        .unwrap();
    assert_eq!(
        alice.sync_once(30_000).unwrap().outcome,
        SyncOutcome::CaughtUp
    );
    let conv = bob
        .create_conversation(vec!["alice".into()], Some("team".into()), true)
        .unwrap();
    for i in 0..30 {
        bob.send(conv.id, format!("m{i}")).unwrap();
    }
    // Stored by the relay: bob's own copies came back through his inbox.
    wait_until("bob's sends stored", || {
        bob.messages(conv.id, 100).unwrap().len() == 30
    });
    let r = alice.on_push(b"kw".to_vec(), 8_000).unwrap();
    assert_eq!(r.report.outcome, SyncOutcome::CaughtUp, "{r:?}");
    assert_eq!(r.show.len(), 1, "{r:?}");
    assert_eq!(r.show[0].title, "30 new messages in team");
    assert_eq!(r.show[0].tag, format!("keepwire-conv-{}", conv.id));
    assert_eq!(alice.status().state, ConnectionState::Dormant);
    assert!(
        !log.lock()
            .unwrap()
            .iter()
            .any(|(_, e)| matches!(e, Event::ShowNotification { .. })),
        "handed back, not raised as events too"
    );
    alice.close();
    bob.close();
}
