//! Messages both ways, catch-up, DNS failures, two clients on one home.

use std::collections::HashSet;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use futures_util::StreamExt as _;
use keepwire_client::{BoxFuture, Client, ClientEvent, ConnectionError, Resolver, State};
use keepwire_testkit::TempDir;
use keepwire_testkit::relay::TestRelay;

async fn relay() -> TestRelay {
    TestRelay::start().await
}

async fn client(home: &std::path::Path, url: &str, token: &str) -> Client {
    Client::builder(home)
        .servers(vec![url.to_owned()])
        .token(token)
        .build()
        .await
        .unwrap()
}

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_flow_both_ways_and_land_in_the_store() {
    let r = relay().await;
    let ta = r.user("alice").await;
    let tb = r.user("bob").await;
    let (ha, hb) = (TempDir::new("alice"), TempDir::new("bob"));
    let a = client(ha.path(), &r.url, &ta).await;
    let b = client(hb.path(), &r.url, &tb).await;
    a.wait_connected(T).await.unwrap();
    b.wait_connected(T).await.unwrap();
    let conv = a
        .create_conversation(vec!["bob".into()], None, false)
        .await
        .unwrap();
    let mut b_events = b.events();
    for i in 0..20 {
        a.send(conv.id, &format!("a{i}"))
            .await
            .unwrap()
            .confirmed()
            .await
            .unwrap();
        b.send(conv.id, &format!("b{i}"))
            .await
            .unwrap()
            .confirmed()
            .await
            .unwrap();
    }
    // Bob's app hears of alice's messages as events.
    let mut heard = 0;
    while heard < 20 {
        if let Some(ClientEvent::Message(m)) = b_events.next().await
            && m.from == "alice"
        {
            heard += 1;
        }
    }
    for c in [&a, &b] {
        c.wait_for(T, |s| s.caught_up() && s.cursor >= Some(41))
            .await
            .unwrap();
        let msgs = c.messages(Some(conv.id), 100).unwrap();
        let bodies: Vec<_> = msgs.iter().map(|m| m.body.clone()).collect();
        let want: Vec<_> = (0..20)
            .flat_map(|i| [format!("a{i}"), format!("b{i}")])
            .collect();
        assert_eq!(bodies, want);
    }
    a.stop().await;
    assert_eq!(
        a.status().state,
        State::Stopped(keepwire_client::StopReason::ClosedByApp)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_device_catches_up_on_10k_messages_in_order() {
    let r = relay().await;
    let ta = r.user("alice").await;
    let tb = r.user("bob").await;
    let hb = TempDir::new("bob");
    // Bob logs in once, then goes away.
    let ha = TempDir::new("alice");
    let a = client(ha.path(), &r.url, &ta).await;
    a.wait_connected(T).await.unwrap();
    let conv = a
        .create_conversation(vec!["bob".into()], None, false)
        .await
        .unwrap();
    a.stop().await;
    let b = client(hb.path(), &r.url, &tb).await;
    b.wait_for(T, |s| s.caught_up() && s.cursor == Some(1))
        .await
        .unwrap();
    b.stop().await;
    drop(b);
    let alice = r.user_id(&ta).await;
    r.seed(alice, conv.id, 10_000, "").await;
    let started = std::time::Instant::now();
    let b = client(hb.path(), &r.url, &tb).await;
    let s = b
        .wait_for(Duration::from_secs(120), |s| {
            s.caught_up() && s.cursor >= Some(10_001)
        })
        .await
        .unwrap();
    println!("caught up on 10,000 messages in {:?}", started.elapsed());
    assert_eq!(s.cursor, Some(10_001));
    let msgs = b.messages(Some(conv.id), 20_000).unwrap();
    assert_eq!(msgs.len(), 10_000);
    for (i, m) in msgs.iter().enumerate() {
        assert_eq!(m.conv_seq, i as u64 + 1, "in conversation order, no gaps");
    }
    let bodies: HashSet<String> = msgs.iter().map(|m| m.body.clone()).collect();
    assert_eq!(
        bodies,
        (0..10_000).map(|i| i.to_string()).collect::<HashSet<_>>(),
        "each once"
    );
}

/// A new device replays only its `history` window; the rest of the
/// conversation comes by backfill, page after page, and a fill an earlier
/// process left unfinished (its row in the store) completes at the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_device_backfills_the_whole_conversation_and_an_unfinished_fill_completes() {
    let r = relay().await;
    let ta = r.user("alice").await;
    let tb = r.user("bob").await;
    let ha = TempDir::new("alice");
    let a = client(ha.path(), &r.url, &ta).await;
    a.wait_connected(T).await.unwrap();
    let conv = a
        .create_conversation(vec!["bob".into()], None, false)
        .await
        .unwrap();
    a.stop().await;
    let alice = r.user_id(&ta).await;
    r.seed(alice, conv.id, 450, "").await;
    let hb = TempDir::new("bob");
    let new_device = |page: u32| {
        Client::builder(hb.path())
            .servers(vec![r.url.clone()])
            .token(&tb)
            .configure(move |c| {
                c.history = 20;
                c.backfill_page = page;
            })
            .build()
    };
    let b = new_device(60).await.unwrap();
    b.wait_for(T, |s| {
        s.caught_up() && s.backfilling == 0 && s.cursor >= Some(451)
    })
    .await
    .unwrap();
    let seqs = |b: &Client| -> Vec<u64> {
        b.messages(Some(conv.id), 1000)
            .unwrap()
            .iter()
            .map(|m| m.conv_seq)
            .collect()
    };
    assert_eq!(seqs(&b), (1..=450).collect::<Vec<_>>(), "replay + 8 pages");
    b.stop().await;
    drop(b);
    // As if a process was killed after the first page: most is missing and
    // the store says where the fill goes on.
    {
        let db =
            rusqlite::Connection::open(keepwire_client::Home::new(hb.path()).database()).unwrap();
        db.execute("DELETE FROM messages WHERE conv_seq <= 370", [])
            .unwrap();
        db.execute(
            "INSERT INTO backfill (conv, before, known) VALUES (?1, 371, 0)",
            [conv.id as i64],
        )
        .unwrap();
    }
    let b = new_device(100).await.unwrap();
    b.wait_for(T, |s| s.caught_up() && s.backfilling == 0)
        .await
        .unwrap();
    assert_eq!(seqs(&b), (1..=450).collect::<Vec<_>>(), "the fill went on");
    let db = rusqlite::Connection::open(keepwire_client::Home::new(hb.path()).database()).unwrap();
    let left: i64 = db
        .query_row("SELECT COUNT(*) FROM backfill", [], |r| r.get(0))
        .unwrap();
    assert_eq!(left, 0, "a finished fill leaves no row");
}

/// A resolver tests can break: 0 = works, 1 = fails, 2 = hangs.
struct FlakyResolver {
    mode: AtomicU8,
    target: SocketAddr,
}

impl Resolver for FlakyResolver {
    fn resolve<'a>(
        &'a self,
        _host: &'a str,
        _port: u16,
    ) -> BoxFuture<'a, io::Result<Vec<SocketAddr>>> {
        Box::pin(async move {
            match self.mode.load(Ordering::SeqCst) {
                0 => Ok(vec![self.target]),
                1 => Err(io::Error::other(
                    "Failed host lookup: 'relay.test' (OS Error: No address associated with hostname, errno = 7)",
                )),
                _ => std::future::pending().await,
            }
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_failures_are_no_network_back_off_and_recover() {
    let r = relay().await;
    let ta = r.user("alice").await;
    let ha = TempDir::new("alice");
    let resolver = Arc::new(FlakyResolver {
        mode: AtomicU8::new(1),
        target: r.server.as_ref().unwrap().local_addr(),
    });
    let url = format!(
        "ws://relay.test:{}",
        r.server.as_ref().unwrap().local_addr().port()
    );
    let a = Client::builder(ha.path())
        .servers(vec![url])
        .token(&ta)
        .resolver(resolver.clone())
        .resolve_timeout(Duration::from_millis(300))
        .configure(|c| {
            c.backoff_foreground.base = Duration::from_millis(100);
            c.backoff_foreground.cap = Duration::from_millis(800);
        })
        .build()
        .await
        .unwrap();
    let s = a
        .wait_for(T, |s| {
            s.last_error == Some(ConnectionError::NoNetwork) && s.state == State::BackingOff
        })
        .await
        .unwrap();
    assert_eq!(
        s.last_error,
        Some(ConnectionError::NoNetwork),
        "reported as no network, not a relay fault"
    );
    // A hanging resolver does not hang the client: it times out and retries.
    resolver.mode.store(2, Ordering::SeqCst);
    let mut events = a.events();
    let mut failures = 0;
    while failures < 2 {
        if let Some(ClientEvent::Error(ConnectionError::NoNetwork)) =
            tokio::time::timeout(T, events.next()).await.unwrap()
        {
            failures += 1;
        }
    }
    // The name resolves again: connected without any app action.
    resolver.mode.store(0, Ordering::SeqCst);
    a.wait_connected(T).await.unwrap();
    // Stop is prompt even with a hanging resolver.
    resolver.mode.store(2, Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(5), a.stop())
        .await
        .expect("stop returns promptly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_on_one_home_share_one_connection() {
    let r = relay().await;
    let ta = r.user("alice").await;
    let tb = r.user("bob").await;
    let (ha, hb) = (TempDir::new("alice"), TempDir::new("bob"));
    let holder = client(ha.path(), &r.url, &ta).await;
    holder.wait_connected(T).await.unwrap();
    // An "extension" on the same home: it may not connect, but its sends go through.
    let ext = client(ha.path(), &r.url, &ta).await;
    assert!(
        holder.status().holder && !ext.status().holder,
        "only one holds the connection"
    );
    assert_eq!(r.server.as_ref().unwrap().connection_count(), 1);
    let conv = holder
        .create_conversation(vec!["bob".into()], None, false)
        .await
        .unwrap();
    let mut handles = Vec::new();
    for i in 0..25 {
        handles.push(ext.send(conv.id, &format!("from-ext-{i}")).await.unwrap());
    }
    for h in handles {
        tokio::time::timeout(T, h.confirmed())
            .await
            .unwrap()
            .unwrap();
    }
    let b = client(hb.path(), &r.url, &tb).await;
    b.wait_for(T, |s| s.caught_up() && s.cursor >= Some(26))
        .await
        .unwrap();
    let msgs = b.messages(Some(conv.id), 100).unwrap();
    let bodies: Vec<_> = msgs.iter().map(|m| m.body.clone()).collect();
    assert_eq!(
        bodies,
        (0..25).map(|i| format!("from-ext-{i}")).collect::<Vec<_>>()
    );
    let unique: HashSet<_> = msgs.iter().map(|m| m.cid.clone()).collect();
    assert_eq!(unique.len(), 25);
    // When the holder goes away, the other takes over the connection.
    holder.stop().await;
    drop(holder);
    ext.wait_connected(T).await.unwrap();
    assert!(ext.status().holder);
}

/// A token provider that counts its calls and hands out long-lived JWTs.
struct CountingProvider {
    calls: std::sync::atomic::AtomicUsize,
    user: String,
}

const JWT_SECRET: &[u8] = b"integration-test-secret-of-enough-length";

fn jwt(user: &str, exp_in_secs: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let claims = serde_json::json!({"sub": user, "iat": now, "exp": now + exp_in_secs});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET),
    )
    .unwrap()
}

impl keepwire_client::TokenProvider for CountingProvider {
    fn refresh(&self) -> BoxFuture<'_, Option<String>> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Some(jwt(&self.user, 3600))
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_token_expiring_mid_connection_is_refreshed_once_without_loss() {
    let mut config = keepwire_testkit::relay::test_config();
    config.jwt = Some(keepwire_server::auth::JwtConfig {
        hs256_secret: Some(JWT_SECRET.to_vec()),
        leeway: Duration::ZERO,
        ..Default::default()
    });
    let r = TestRelay::start_with(config, Default::default()).await;
    let hb = TempDir::new("bob");
    let provider = Arc::new(CountingProvider {
        calls: Default::default(),
        user: "bob".into(),
    });
    // Bob's first token expires in 2 s, while he is connected.
    let b = Client::builder(hb.path())
        .servers(vec![r.url.clone()])
        .token(jwt("bob", 2))
        .token_provider(provider.clone())
        .build()
        .await
        .unwrap();
    b.wait_connected(T).await.unwrap();
    let mut alice = keepwire_testkit::WsClient::connect(&r.url, &jwt("alice", 3600), "alice", None)
        .await
        .unwrap();
    let conv = keepwire_testkit::relay::create_conv(
        &mut alice,
        keepwire_proto::ConvKind::Direct,
        &["bob"],
    )
    .await;
    // Alice keeps sending across bob's token expiry.
    let mut cadence = tokio::time::interval(Duration::from_millis(100));
    let mut cids = Vec::new();
    for i in 0..40 {
        cadence.tick().await;
        cids.push(alice.send_message(conv.id, &format!("m{i}")).await);
    }
    for cid in &cids {
        alice.confirm(cid).await;
    }
    let s = b
        .wait_for(T, |s| s.caught_up() && s.cursor >= Some(41))
        .await
        .unwrap();
    assert_eq!(s.state, State::Connected);
    assert_eq!(
        provider.calls.load(Ordering::SeqCst),
        1,
        "exactly one refresh"
    );
    let msgs = b.messages(Some(conv.id), 100).unwrap();
    assert_eq!(
        msgs.iter().map(|m| m.body.clone()).collect::<Vec<_>>(),
        (0..40).map(|i| format!("m{i}")).collect::<Vec<_>>()
    );
}

/// A client for `home` with the app in the background, `policy` and `notifier`.
async fn background_client(
    home: &std::path::Path,
    url: String,
    token: &str,
    notifier: Arc<keepwire_client::notify::CallbackNotifier>,
    policy: keepwire_client::BackgroundPolicy,
) -> Client {
    Client::builder(home)
        .servers(vec![url])
        .token(token)
        .notifier(notifier)
        .background_policy(policy)
        .app_state(keepwire_client::AppState::Background)
        .build()
        .await
        .unwrap()
}

type Shown = Arc<std::sync::Mutex<Vec<keepwire_client::notify::Notification>>>;
type Cleared = Arc<std::sync::Mutex<Vec<u64>>>;

/// A notifier that records what it is asked to show and to clear.
fn recorder() -> (
    Arc<keepwire_client::notify::CallbackNotifier>,
    Shown,
    Cleared,
) {
    use keepwire_client::notify::NotifierCall;
    let shown: Shown = Default::default();
    let cleared: Cleared = Default::default();
    let (s, c) = (shown.clone(), cleared.clone());
    let notifier = keepwire_client::notify::CallbackNotifier::new(move |call| match call {
        NotifierCall::Show(n) => s.lock().unwrap().push(n),
        NotifierCall::Clear(conv) => c.lock().unwrap().push(conv),
    });
    (notifier, shown, cleared)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_messages_notify_once_coalesced_and_respect_mute_and_foreground() {
    let r = relay().await;
    let ta = r.user("alice").await;
    let tb = r.user("bob").await;
    let ha = TempDir::new("alice");
    let (notifier, shown, _) = recorder();
    let a = Client::builder(ha.path())
        .servers(vec![r.url.clone()])
        .token(&ta)
        .notifier(notifier)
        .background_policy(keepwire_client::BackgroundPolicy::KeepAlive)
        .build()
        .await
        .unwrap();
    a.wait_connected(T).await.unwrap();
    let mut b = keepwire_testkit::WsClient::connect(&r.url, &tb, "bob", None)
        .await
        .unwrap();
    let conv =
        keepwire_testkit::relay::create_conv(&mut b, keepwire_proto::ConvKind::Direct, &["alice"])
            .await;
    a.wait_for(T, |s| s.cursor >= Some(1)).await.unwrap();

    // In the background: bob's three messages raise notifications, each message once.
    a.set_app_state(keepwire_client::AppState::Background);
    a.wait_for(T, |s| s.state == State::Connected)
        .await
        .unwrap();
    for i in 0..3 {
        let cid = b.send_message(conv.id, &format!("hello {i}")).await;
        b.confirm(&cid).await;
    }
    a.wait_for(T, |s| s.notified >= 1 && s.cursor >= Some(4))
        .await
        .unwrap();
    let got = shown.lock().unwrap().clone();
    let ids: Vec<u64> = got.iter().flat_map(|n| n.message_ids.clone()).collect();
    assert_eq!(ids.len(), 3, "each message notified once: {got:?}");
    assert!(
        got.iter()
            .all(|n| n.tag == format!("keepwire-conv-{}", conv.id)),
        "replaced, not stacked"
    );
    let last = got.last().unwrap();
    assert_eq!(
        (last.unread, last.title.as_str(), last.body.as_str()),
        (3, "3 new messages from bob", "hello 2")
    );
    assert_eq!(
        last.conv, conv.id,
        "carries what the app needs to open the conversation"
    );

    // Alice's own message (from her other device) never notifies.
    let mut a2 = keepwire_testkit::WsClient::connect(&r.url, &ta, "alice-laptop", None)
        .await
        .unwrap();
    let cid = a2.send_message(conv.id, "from my laptop").await;
    a2.confirm(&cid).await;
    a.wait_for(T, |s| s.cursor >= Some(5)).await.unwrap();
    // Muted conversations and previews off.
    {
        let store = keepwire_client::store::Store::open(ha.path()).unwrap();
        let mut p = store.prefs().unwrap();
        p.muted.insert(conv.id);
        store.set_prefs(&p).unwrap();
    }
    let cid = b.send_message(conv.id, "muted").await;
    b.confirm(&cid).await;
    a.wait_for(T, |s| s.cursor >= Some(6)).await.unwrap();
    assert_eq!(
        shown.lock().unwrap().len(),
        got.len(),
        "nothing for our own or muted messages"
    );
    // Foreground: seen; no notifications while the user looks.
    {
        let store = keepwire_client::store::Store::open(ha.path()).unwrap();
        store
            .set_prefs(&keepwire_client::notify::Prefs {
                previews: false,
                ..Default::default()
            })
            .unwrap();
    }
    a.set_app_state(keepwire_client::AppState::Foreground);
    let cid = b.send_message(conv.id, "while looking").await;
    b.confirm(&cid).await;
    a.wait_for(T, |s| s.cursor >= Some(7)).await.unwrap();
    assert_eq!(shown.lock().unwrap().len(), got.len());
    // Back in the background: counting starts again, and no text without previews.
    a.set_app_state(keepwire_client::AppState::Background);
    let cid = b.send_message(conv.id, "secret").await;
    b.confirm(&cid).await;
    a.wait_for(T, |s| s.cursor >= Some(8) && s.notified > got.len() as u64)
        .await
        .unwrap();
    let n = shown.lock().unwrap().last().unwrap().clone();
    assert_eq!(
        (n.unread, n.title.as_str(), n.body.as_str()),
        (1, "bob", "New message")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wake_only_in_the_background_then_foreground_connects_and_catches_up_at_once() {
    let r = relay().await;
    let ta = r.user("alice").await;
    let tb = r.user("bob").await;
    let ha = TempDir::new("alice");
    let a = Client::builder(ha.path())
        .servers(vec![r.url.clone()])
        .token(&ta)
        .background_policy(keepwire_client::BackgroundPolicy::WakeOnly)
        // Any backoff wait would be obvious.
        .configure(|c| c.backoff_foreground.base = Duration::from_secs(20))
        .build()
        .await
        .unwrap();
    a.wait_connected(T).await.unwrap();
    a.set_app_state(keepwire_client::AppState::Background);
    a.wait_for(T, |s| s.state == State::Dormant).await.unwrap();
    keepwire_testkit::wait_until(T, "the relay to see alice leave", || async {
        r.server.as_ref().unwrap().connection_count() == 0
    })
    .await;
    let mut b = keepwire_testkit::WsClient::connect(&r.url, &tb, "bob", None)
        .await
        .unwrap();
    let conv =
        keepwire_testkit::relay::create_conv(&mut b, keepwire_proto::ConvKind::Direct, &["alice"])
            .await;
    for i in 0..5 {
        let cid = b.send_message(conv.id, &format!("while away {i}")).await;
        b.confirm(&cid).await;
    }
    let started = std::time::Instant::now();
    a.set_app_state(keepwire_client::AppState::Foreground);
    a.wait_for(T, |s| s.caught_up() && s.cursor >= Some(6))
        .await
        .unwrap();
    println!("foreground to caught up: {:?}", started.elapsed());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "no backoff wait (base is 20 s)"
    );
    assert_eq!(a.messages(Some(conv.id), 10).unwrap().len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_once_honours_its_deadline_when_the_relay_is_a_black_hole_and_the_next_call_finishes()
{
    let r = relay().await;
    let ta = r.user("alice").await;
    let tb = r.user("bob").await;
    let relay_addr = r.server.as_ref().unwrap().local_addr();
    // A "relay" that accepts TCP and never answers: packets vanish.
    let hole_addr = keepwire_testkit::black_hole().await;
    let ha = TempDir::new("alice");
    let build = |target: SocketAddr, resolver_mode: u8| {
        let resolver = Arc::new(FlakyResolver {
            mode: AtomicU8::new(resolver_mode),
            target,
        });
        let url = format!("ws://relay.test:{}", target.port());
        let (home, token) = (ha.path().to_owned(), ta.clone());
        async move {
            let c = Client::builder(home)
                .servers(vec![url])
                .token(token)
                .resolver(resolver.clone())
                .resolve_timeout(Duration::from_millis(200))
                .background_policy(keepwire_client::BackgroundPolicy::WakeOnly)
                .app_state(keepwire_client::AppState::Background)
                .build()
                .await
                .unwrap();
            (c, resolver)
        }
    };
    // Alice has synced once before: she holds a cursor.
    let mut b = keepwire_testkit::WsClient::connect(&r.url, &tb, "bob", None)
        .await
        .unwrap();
    let conv =
        keepwire_testkit::relay::create_conv(&mut b, keepwire_proto::ConvKind::Direct, &["alice"])
            .await;
    let (a, _) = build(relay_addr, 0).await;
    assert_eq!(
        a.sync_once(T).await.outcome,
        keepwire_client::SyncOutcome::CaughtUp
    );
    a.stop().await;
    drop(a);
    // A large backlog arrives meanwhile.
    let bob = r.user_id(&tb).await;
    r.seed(bob, conv.id, 20_000, "m").await;

    // The path to the relay is a black hole: the sync returns by its deadline.
    let (a, resolver) = build(hole_addr, 0).await;
    let report = a.sync_once(Duration::from_millis(800)).await;
    assert!(
        report.elapsed < Duration::from_secs(3),
        "deadline honoured: {report:?}"
    );
    assert!(
        matches!(report.outcome, keepwire_client::SyncOutcome::Unreachable(_)),
        "{report:?}"
    );
    // A hanging resolver does not hang it either.
    resolver.mode.store(2, Ordering::SeqCst);
    let report = a.sync_once(Duration::from_millis(800)).await;
    assert!(report.elapsed < Duration::from_secs(3), "{report:?}");
    a.wait_for(T, |s| s.state == State::Dormant)
        .await
        .expect("back to sleep after the sync");
    a.stop().await;
    drop(a);

    // The network heals: short syncs each do part of the work; nothing twice.
    let (a, _) = build(relay_addr, 0).await;
    let mut total = 0;
    let mut rounds = 0;
    loop {
        let report = a.sync_once(Duration::from_millis(150)).await;
        total += report.received;
        rounds += 1;
        if report.outcome == keepwire_client::SyncOutcome::CaughtUp {
            break;
        }
        assert!(rounds < 200, "sync never finished: {report:?}");
    }
    println!("20,000 messages over {rounds} sync_once calls of 150 ms");
    assert_eq!(total, 20_000, "every message once across calls");
    assert_eq!(a.messages(Some(conv.id), 30_000).unwrap().len(), 20_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_marker_from_another_device_clears_and_suppresses_notifications() {
    let r = relay().await;
    let ta = r.user("alice").await;
    let tb = r.user("bob").await;
    let (hp, hl) = (TempDir::new("alice-phone"), TempDir::new("alice-laptop"));
    let (notifier, shown, cleared) = recorder();
    let phone = background_client(
        hp.path(),
        r.url.clone(),
        &ta,
        notifier,
        keepwire_client::BackgroundPolicy::KeepAlive,
    )
    .await;
    let laptop = client(hl.path(), &r.url, &ta).await;
    phone.wait_connected(T).await.unwrap();
    laptop.wait_connected(T).await.unwrap();
    let mut b = keepwire_testkit::WsClient::connect(&r.url, &tb, "bob", None)
        .await
        .unwrap();
    let conv =
        keepwire_testkit::relay::create_conv(&mut b, keepwire_proto::ConvKind::Direct, &["alice"])
            .await;
    for i in 0..2 {
        let cid = b.send_message(conv.id, &format!("one {i}")).await;
        b.confirm(&cid).await;
    }
    phone
        .wait_for(T, |s| s.cursor >= Some(3) && s.notified >= 1)
        .await
        .unwrap();
    laptop.wait_for(T, |s| s.cursor >= Some(3)).await.unwrap();
    // Read on the laptop: the phone's notification goes away.
    laptop.mark_read(conv.id, 2).await.unwrap();
    phone.wait_for(T, |s| s.cursor >= Some(4)).await.unwrap();
    keepwire_testkit::wait_until(T, "the phone to clear its notification", || {
        let cleared = cleared.clone();
        async move { cleared.lock().unwrap().contains(&conv.id) }
    })
    .await;
    let shown_before = shown.lock().unwrap().len();
    // While the phone sleeps, bob writes and alice reads on the laptop: the
    // phone's next sync raises nothing for what was already read.
    phone.stop().await;
    drop(phone);
    for i in 0..2 {
        let cid = b.send_message(conv.id, &format!("two {i}")).await;
        b.confirm(&cid).await;
    }
    laptop.wait_for(T, |s| s.cursor >= Some(6)).await.unwrap();
    laptop.mark_read(conv.id, 4).await.unwrap();
    let (notifier, shown2, _) = recorder();
    let phone = background_client(
        hp.path(),
        r.url.clone(),
        &ta,
        notifier,
        keepwire_client::BackgroundPolicy::WakeOnly,
    )
    .await;
    let report = phone.sync_once(T).await;
    assert_eq!(report.outcome, keepwire_client::SyncOutcome::CaughtUp);
    assert_eq!((report.received, report.notified), (2, 0), "{report:?}");
    assert!(shown2.lock().unwrap().is_empty());
    assert_eq!(shown.lock().unwrap().len(), shown_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_background_heartbeat_learns_each_networks_idle_timeout_without_losing_messages() {
    let mut config = keepwire_testkit::relay::test_config();
    config.heartbeat_min = Duration::from_millis(50);
    config.heartbeat_grace = Duration::from_millis(300);
    let r = TestRelay::start_with(config, Default::default()).await;
    let relay_addr = r.server.as_ref().unwrap().local_addr();
    let tb = r.user("bob").await;
    // Two paths that forget idle connections after 650 ms and 1050 ms
    // (scaled down from minutes).
    let cases = [
        ("wifi:cafe", Duration::from_millis(650)),
        ("cellular:op", Duration::from_millis(1250)),
    ];
    let mut runs = Vec::new();
    for (i, (network, cut)) in cases.into_iter().enumerate() {
        let proxy = keepwire_chaos::FaultProxy::start("127.0.0.1:0".parse().unwrap(), relay_addr)
            .await
            .unwrap();
        proxy.set_idle_cut(Some(cut));
        let user = format!("user{i}");
        let token = r.user(&user).await;
        let home = TempDir::new(&user);
        let c = Client::builder(home.path())
            .servers(vec![format!("ws://{}", proxy.addr())])
            .token(&token)
            .background_policy(keepwire_client::BackgroundPolicy::KeepAlive)
            .app_state(keepwire_client::AppState::Background)
            .configure(|c| {
                c.adaptive_heartbeat = Some(keepwire_core::AdaptiveHeartbeat {
                    initial: Duration::from_millis(200),
                    step: Duration::from_millis(100),
                    successes: 1,
                    min: Duration::from_millis(100),
                    max: Duration::from_secs(5),
                });
                c.pong_timeout = Duration::from_millis(300);
                c.backoff_background.base = Duration::from_millis(50);
                c.backoff_background.cap = Duration::from_millis(200);
            })
            .build()
            .await
            .unwrap();
        c.set_network(keepwire_client::Network::Online(network.into()));
        runs.push((c, home, proxy, user, network, cut));
    }
    let mut b = keepwire_testkit::WsClient::connect(&r.url, &tb, "bob", None)
        .await
        .unwrap();
    for (c, _, proxy, user, network, cut) in &runs {
        c.wait_connected(T).await.unwrap();
        let conv = keepwire_testkit::relay::create_conv(
            &mut b,
            keepwire_proto::ConvKind::Direct,
            &[user.as_str()],
        )
        .await;
        // Learning: it probes above the cut once, finds the path dead, and settles below.
        let learnt = c
            .wait_for(Duration::from_secs(30), |_| {
                c.learned_heartbeats()
                    .ok()
                    .and_then(|m| m.get(*network).copied())
                    .is_some_and(|(_, settled)| settled)
            })
            .await;
        learnt.unwrap_or_else(|e| panic!("{network}: not settled: {e:?}"));
        let (interval, _) = c.learned_heartbeats().unwrap()[*network];
        println!(
            "{network}: idle cut {cut:?} -> learnt {interval:?}, {} cuts",
            proxy.stats().forgotten.load(Ordering::SeqCst)
        );
        assert!(
            interval < *cut,
            "{network}: {interval:?} must stay below the {cut:?} cut"
        );
        // Just below the cut: within two steps (a ping delayed on a loaded
        // machine may count as one more failure).
        assert!(
            interval + Duration::from_millis(200) >= *cut,
            "{network}: {interval:?} is just below the cut"
        );
        assert!(
            proxy.stats().forgotten.load(Ordering::SeqCst) >= 1,
            "the probe above the cut was detected"
        );
        // Recovered: connected again and nothing lost.
        c.wait_connected(T).await.unwrap();
        let cid = b
            .send_message(conv.id, &format!("after learning on {network}"))
            .await;
        b.confirm(&cid).await;
        c.wait_for(T, |s| s.received >= 1).await.unwrap();
        let msgs = c.messages(Some(conv.id), 10).unwrap();
        assert_eq!(msgs.len(), 1);
    }
    let a = runs[0].0.learned_heartbeats().unwrap()["wifi:cafe"].0;
    let b2 = runs[1].0.learned_heartbeats().unwrap()["cellular:op"].0;
    assert!(a < b2, "two paths, two intervals: {a:?} vs {b2:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_verifies_the_relay_against_a_given_root() {
    let pki = keepwire_testkit::tls::TestPki::new();
    let mut config = keepwire_testkit::relay::test_config();
    config.tls = Some(pki.relay_files());
    let r = TestRelay::start_with(config, Default::default()).await;
    assert!(r.url.starts_with("wss://"));
    let ta = r.user("alice").await;
    let tb = r.user("bob").await;
    // Trusting the private CA: messages flow over TLS.
    let (ha, hb) = (TempDir::new("alice"), TempDir::new("bob"));
    let a = Client::builder(ha.path())
        .servers(vec![r.url.replace("127.0.0.1", "localhost")])
        .token(&ta)
        .add_root_certificate(pki.ca_der.clone())
        .build()
        .await
        .unwrap();
    a.wait_connected(T).await.unwrap();
    let conv = a
        .create_conversation(vec!["bob".into()], None, false)
        .await
        .unwrap();
    a.send(conv.id, "over tls")
        .await
        .unwrap()
        .confirmed()
        .await
        .unwrap();
    // Not trusting it (system roots only): the certificate is refused, the
    // client says so and keeps its outbox.
    let b = client(hb.path(), &r.url, &tb).await;
    let status = b.wait_for(T, |s| s.last_error.is_some()).await.unwrap();
    assert_eq!(status.last_error, Some(ConnectionError::Tls));
    assert_ne!(status.state, State::Connected);
    b.stop().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_reaches_the_other_members_connected_devices() {
    let r = relay().await;
    let ta = r.user("alice").await;
    let tb = r.user("bob").await;
    let (ha, hb) = (TempDir::new("alice"), TempDir::new("bob"));
    let a = client(ha.path(), &r.url, &ta).await;
    let b = client(hb.path(), &r.url, &tb).await;
    a.wait_connected(T).await.unwrap();
    b.wait_connected(T).await.unwrap();
    let conv = a
        .create_conversation(vec!["bob".into()], None, false)
        .await
        .unwrap();
    // Bob must be a member by the time the relay relays it: wait for the
    // conversation to reach him.
    b.wait_for(T, |s| s.caught_up() && s.cursor >= Some(1))
        .await
        .unwrap();
    let mut b_events = b.events();
    a.signal(conv.id, serde_json::json!({"typing": true}))
        .await
        .unwrap();
    let got = tokio::time::timeout(T, async {
        loop {
            if let Some(ClientEvent::Signal { conv, from, data }) = b_events.next().await {
                return (conv, from, data);
            }
        }
    })
    .await
    .expect("bob hears the signal");
    assert_eq!(
        got,
        (conv.id, "alice".into(), serde_json::json!({"typing": true}))
    );
    // Too large for the relay: refused before it is sent.
    let big = serde_json::Value::String("x".repeat(2000));
    assert!(matches!(
        a.signal(conv.id, big).await,
        Err(keepwire_client::ClientError::BadSignal(_))
    ));
    a.stop().await;
    // Not queued: without a connection there is no one to tell.
    assert!(matches!(
        a.signal(conv.id, serde_json::json!(1)).await,
        Err(keepwire_client::ClientError::NotConnected | keepwire_client::ClientError::Closed)
    ));
    b.stop().await;
}
