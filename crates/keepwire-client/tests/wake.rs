//! Parking under `wake-only` (the home's lock released), the 2 s lock wait of
//! a sync, and push wake-ups (`on_push`): what to show, at most once.

use std::sync::Arc;
use std::time::Duration;

use keepwire_client::notify::{CallbackNotifier, Notification, NotifierCall};
use keepwire_client::{AppState, BackgroundPolicy, Client, State, SyncOutcome};
use keepwire_testkit::TempDir;
use keepwire_testkit::relay::TestRelay;

const T: Duration = Duration::from_secs(30);

/// Whether another holder could take `home`'s lock now.
fn lock_is_free(home: &std::path::Path) -> bool {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(home.join("lock"))
        .unwrap();
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).is_ok()
}

type Shown = Arc<std::sync::Mutex<Vec<Notification>>>;

fn recorder() -> (Arc<CallbackNotifier>, Shown) {
    let shown: Shown = Default::default();
    let s = shown.clone();
    let n = CallbackNotifier::new(move |call| {
        if let NotifierCall::Show(n) = call {
            s.lock().unwrap().push(n);
        }
    });
    (n, shown)
}

async fn wake_only(
    home: &std::path::Path,
    url: &str,
    token: &str,
    notifier: Arc<CallbackNotifier>,
    state: AppState,
) -> Client {
    Client::builder(home)
        .servers(vec![url.to_owned()])
        .token(token)
        .notifier(notifier)
        .background_policy(BackgroundPolicy::WakeOnly)
        .app_state(state)
        .build()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_under_wake_only_closes_and_releases_the_home_before_returning() {
    let r = TestRelay::start().await;
    let ta = r.user("alice").await;
    let ha = TempDir::new("alice");
    let (n, _) = recorder();
    let a = wake_only(ha.path(), &r.url, &ta, n, AppState::Foreground).await;
    a.wait_connected(T).await.unwrap();
    assert!(!lock_is_free(ha.path()), "the holder has the lock");

    // Starting a started client changes nothing (an app calls start freely).
    let mut events = a.events();
    a.start();
    a.wait_connected(T).await.unwrap();
    assert!(
        tokio::time::timeout(
            Duration::from_millis(300),
            futures_util::StreamExt::next(&mut events)
        )
        .await
        .is_err(),
        "no state change"
    );

    a.apply_app_state(AppState::Background).await;
    // Everything is done by the time the call returns.
    assert!(lock_is_free(ha.path()), "released before returning");
    let s = a.status();
    assert_eq!((s.state, s.holder), (State::Dormant, false));
    keepwire_testkit::wait_until(T, "the relay to see alice leave", || async {
        r.server.as_ref().unwrap().connection_count() == 0
    })
    .await;
    // Parked: the client does not take the lock back by itself.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        lock_is_free(ha.path()),
        "a parked client leaves the home alone"
    );

    // A sync takes it, and gives it back before returning.
    let report = a.sync_once(T).await;
    assert_eq!(report.outcome, SyncOutcome::CaughtUp, "{report:?}");
    assert!(lock_is_free(ha.path()), "released after the sync");

    // The foreground takes it back and connects.
    a.apply_app_state(AppState::Foreground).await;
    a.wait_connected(T).await.unwrap();
    assert!(a.status().holder);
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_waits_at_most_two_seconds_for_a_home_another_process_holds() {
    let r = TestRelay::start().await;
    let ta = r.user("alice").await;
    let ha = TempDir::new("alice");
    let (n, _) = recorder();
    // Another "process" holds the home (here: the lock file itself).
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open({
            std::fs::create_dir_all(ha.path()).unwrap();
            ha.path().join("lock")
        })
        .unwrap();
    let held = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).unwrap();
    let a = wake_only(ha.path(), &r.url, &ta, n, AppState::Background).await;
    let started = std::time::Instant::now();
    let report = a.sync_once(Duration::from_secs(20)).await;
    let took = started.elapsed();
    assert_eq!(report.outcome, SyncOutcome::Busy, "{report:?}");
    // About 2 s for the lock, then up to 1 s for a holder to take the sync
    // up (this one is no keepwire client and never does).
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(5),
        "waited about 3 s, not the deadline: {took:?}"
    );
    // Once the holder lets go, the next sync runs.
    drop(held);
    assert_eq!(a.sync_once(T).await.outcome, SyncOutcome::CaughtUp);
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_push_returns_what_to_show_once_and_the_socket_shows_nothing_more() {
    let r = TestRelay::start().await;
    let ta = r.user("alice").await;
    let tb = r.user("bob").await;
    let ha = TempDir::new("alice");
    let (n, shown) = recorder();
    let a = wake_only(ha.path(), &r.url, &ta, n, AppState::Background).await;
    assert_eq!(a.sync_once(T).await.outcome, SyncOutcome::CaughtUp);
    let mut b = keepwire_testkit::WsClient::connect(&r.url, &tb, "bob", None)
        .await
        .unwrap();
    let conv =
        keepwire_testkit::relay::create_conv(&mut b, keepwire_proto::ConvKind::Direct, &["alice"])
            .await;
    for i in 0..50 {
        let cid = b.send_message(conv.id, &format!("burst {i}")).await;
        b.confirm(&cid).await;
    }
    // Alice's phone is woken by a push: a content-free payload.
    let started = std::time::Instant::now();
    let result = a.on_push(b"kw-registration-1", T).await.unwrap();
    println!("on_push: {:?} in {:?}", result.report, started.elapsed());
    assert_eq!(result.report.outcome, SyncOutcome::CaughtUp);
    assert_eq!(result.report.received, 50);
    assert!(!result.joined);
    assert_eq!(
        result.show.len(),
        1,
        "one coalesced notification: {result:?}"
    );
    let n = &result.show[0];
    assert_eq!(
        (
            n.conv,
            n.unread,
            n.message_ids.len(),
            n.title.as_str(),
            n.body.as_str()
        ),
        (conv.id, 50, 50, "50 new messages from bob", "burst 49")
    );
    assert!(
        shown.lock().unwrap().is_empty(),
        "handed back, not shown through the notifier"
    );
    assert_eq!(a.status().notified, 1);

    // The same messages again (a second wake-up, then the socket): nothing new.
    let again = a.on_push(b"kw-registration-1", T).await.unwrap();
    assert!(again.show.is_empty(), "{again:?}");
    a.set_app_state(AppState::Background);
    a.stop().await;
    drop(a);
    // Forget the messages and the cursor: the relay replays all 50 over the
    // socket and they are stored as new, but their claims remain.
    {
        let db =
            rusqlite::Connection::open(keepwire_client::Home::new(ha.path()).database()).unwrap();
        db.execute_batch("DELETE FROM messages; UPDATE meta SET value = '0' WHERE key = 'cursor';")
            .unwrap();
    }
    let (n2, shown2) = recorder();
    let a = Client::builder(ha.path())
        .servers(vec![r.url.clone()])
        .token(&ta)
        .notifier(n2)
        .background_policy(BackgroundPolicy::KeepAlive)
        .app_state(AppState::Background)
        .build()
        .await
        .unwrap();
    let s = a
        .wait_for(T, |s| s.caught_up() && s.cursor >= Some(51))
        .await
        .unwrap();
    assert_eq!(s.received, 50, "replayed over the socket and stored again");
    let more = a.on_push(b"", T).await.unwrap();
    assert!(more.show.is_empty());
    assert!(
        shown2.lock().unwrap().is_empty(),
        "never shown twice: {:?}",
        shown2.lock().unwrap()
    );
    // Oversized payloads are refused with a clear error.
    let err = a.on_push(&[0u8; 5000], T).await.unwrap_err();
    assert!(err.to_string().contains("5000 bytes"), "{err}");
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_push_joins_the_first_and_a_black_hole_still_returns_by_the_deadline() {
    let r = TestRelay::start().await;
    let ta = r.user("alice").await;
    let tb = r.user("bob").await;
    let ha = TempDir::new("alice");
    let (n, _) = recorder();
    let a = wake_only(ha.path(), &r.url, &ta, n, AppState::Background).await;
    assert_eq!(a.sync_once(T).await.outcome, SyncOutcome::CaughtUp);
    let mut b = keepwire_testkit::WsClient::connect(&r.url, &tb, "bob", None)
        .await
        .unwrap();
    let conv =
        keepwire_testkit::relay::create_conv(&mut b, keepwire_proto::ConvKind::Direct, &["alice"])
            .await;
    let cid = b.send_message(conv.id, "hello").await;
    b.confirm(&cid).await;
    // join! polls the first, which starts the wake-up, then the second.
    let (first, second) = tokio::join!(a.on_push(b"p1", T), a.on_push(b"p2", T));
    let (first, second) = (first.unwrap(), second.unwrap());
    assert!(!first.joined && second.joined, "{first:?} {second:?}");
    assert_eq!(first.show, second.show, "the joiner gets the same result");
    assert_eq!(first.show.len(), 1);
    a.stop().await;
    drop(a);

    // The relay's address is a black hole: the wake-up returns by its deadline.
    let url = format!("ws://{}", keepwire_testkit::black_hole().await);
    let (n, _) = recorder();
    let a = wake_only(ha.path(), &url, &ta, n, AppState::Background).await;
    let started = std::time::Instant::now();
    let result = a.on_push(b"p3", Duration::from_secs(2)).await.unwrap();
    let took = started.elapsed();
    assert!(took <= Duration::from_millis(2300), "{took:?} {result:?}");
    assert!(
        matches!(result.report.outcome, SyncOutcome::Unreachable(_)),
        "{result:?}"
    );
    assert!(lock_is_free(ha.path()), "released before returning");
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_whose_first_sync_found_nothing_gets_later_messages_through_its_inbox() {
    let r = TestRelay::start().await;
    let ta = r.user("alice").await;
    let tb = r.user("bob").await;
    let ha = TempDir::new("alice");
    let (n, shown) = recorder();
    // A fresh device with an empty inbox: the sync stores no entry, but the
    // device keeps the relay's starting point.
    let a = wake_only(ha.path(), &r.url, &ta, n, AppState::Background).await;
    assert_eq!(a.sync_once(T).await.outcome, SyncOutcome::CaughtUp);
    assert_eq!(a.status().cursor, Some(0));
    // Then a conversation and messages arrive while it sleeps.
    let mut b = keepwire_testkit::WsClient::connect(&r.url, &tb, "bob", None)
        .await
        .unwrap();
    let conv =
        keepwire_testkit::relay::create_conv(&mut b, keepwire_proto::ConvKind::Direct, &["alice"])
            .await;
    for i in 0..3 {
        let cid = b.send_message(conv.id, &format!("m{i}")).await;
        b.confirm(&cid).await;
    }
    // The next sync resumes from there: inbox entries, counted and notified
    // (not history fetched for a new device).
    let report = a.sync_once(T).await;
    assert_eq!(
        (report.outcome.clone(), report.received, report.notified),
        (SyncOutcome::CaughtUp, 3, 1),
        "{report:?}"
    );
    assert_eq!(a.status().cursor, Some(4));
    assert_eq!(shown.lock().unwrap()[0].unread, 3);
    a.stop().await;
}
