//! `keepwire demo`: an embedded relay on a free port with a temporary
//! database, two users with their devices, and the scenarios keepwire exists
//! for — background, closed, foreground, a network cut, a relay restart —
//! with a readable timeline and a final verdict.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use keepwire_client::notify::{CallbackNotifier, NotifierCall};
use keepwire_client::{AppState, BackgroundPolicy, Client, Network, State, SyncOutcome};
use keepwire_server::{AdminStore as _, RelayStore as _};
use keepwire_server::{Config, Metrics, RelayServer, SqliteOptions, SqliteStore};

const T: Duration = Duration::from_secs(20);

struct Demo {
    started: Instant,
    dir: PathBuf,
    db: PathBuf,
    addr: SocketAddr,
    relay: Option<RelayServer>,
    sent: Vec<String>,
    notifications: Arc<Mutex<Vec<String>>>,
}

impl Demo {
    fn say(&self, what: impl AsRef<str>) {
        println!(
            "[{:>6.2}s] {}",
            self.started.elapsed().as_secs_f64(),
            what.as_ref()
        );
    }

    async fn start_relay(&mut self) -> anyhow::Result<()> {
        let metrics = Arc::new(Metrics::default());
        let store = SqliteStore::open(
            &self.db,
            SqliteOptions {
                metrics: Some(metrics.clone()),
                ..Default::default()
            },
        )?;
        let config = Config {
            listen: self.addr,
            ..Config::default()
        };
        let relay = RelayServer::start(config, store, metrics)
            .await
            .context("starting the relay")?;
        self.addr = relay.local_addr();
        self.relay = Some(relay);
        Ok(())
    }

    fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    async fn alice(&self, policy: BackgroundPolicy, app: AppState) -> anyhow::Result<Client> {
        let log = self.notifications.clone();
        let started = self.started;
        let notifier = CallbackNotifier::new(move |call| {
            if let NotifierCall::Show(n) = call {
                println!(
                    "[{:>6.2}s]   alice's phone shows: \"{}\" — {}",
                    started.elapsed().as_secs_f64(),
                    n.title,
                    n.body
                );
                log.lock().unwrap_or_else(|p| p.into_inner()).push(n.title);
            }
        });
        Ok(Client::builder(self.dir.join("alice"))
            .notifier(notifier)
            .background_policy(policy)
            .app_state(app)
            .configure(|c| c.backoff_foreground.base = Duration::from_millis(200))
            .build()
            .await?)
    }

    async fn bob_sends(
        &mut self,
        bob: &Client,
        conv: u64,
        n: usize,
        tag: &str,
    ) -> anyhow::Result<()> {
        for i in 0..n {
            let body = format!("{tag} #{}", i + 1);
            bob.send(conv, &body)
                .await?
                .confirmed()
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            self.sent.push(body);
        }
        self.say(format!(
            "bob sent {n} message{} ({tag})",
            if n == 1 { "" } else { "s" }
        ));
        Ok(())
    }
}

async fn login(home: &Path, url: &str, token: &str) -> anyhow::Result<Client> {
    let store = keepwire_client::store::Store::open(home)?;
    store.save_login(&[url.to_owned()], token)?;
    Ok(Client::builder(home).build().await?)
}

/// Runs the demo; fails (non-zero exit) if anything was lost or duplicated.
pub(crate) async fn run() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("keepwire-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = play(&dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn play(dir: &Path) -> anyhow::Result<()> {
    let mut d = Demo {
        started: Instant::now(),
        dir: dir.to_owned(),
        db: dir.join("relay.db"),
        addr: "127.0.0.1:0".parse()?,
        relay: None,
        sent: Vec::new(),
        notifications: Arc::new(Mutex::new(Vec::new())),
    };
    // Users and tokens, as `keepwire admin user add` would make them.
    let (ta, tb) = {
        let admin = SqliteStore::open(&d.db, SqliteOptions::default())?;
        admin.create_user("alice").await?;
        admin.create_user("bob").await?;
        let ta = admin
            .issue_token("alice", Duration::from_secs(3600))
            .await?
            .token;
        let tb = admin
            .issue_token("bob", Duration::from_secs(3600))
            .await?
            .token;
        admin.close().await;
        (ta, tb)
    };
    d.start_relay().await?;
    d.say(format!(
        "relay listening on {} (database {})",
        d.url(),
        d.db.display()
    ));
    let bob = login(&dir.join("bob"), &d.url(), &tb).await?;
    bob.wait_connected(T).await?;
    let alice = login(&dir.join("alice"), &d.url(), &ta).await?;
    alice.wait_connected(T).await?;
    let conv = bob
        .create_conversation(vec!["alice".into()], None, false)
        .await?
        .id;
    alice.wait_for(T, |s| s.cursor >= Some(1)).await?;
    alice.stop().await;
    drop(alice);
    d.say(format!(
        "users alice and bob, each with a device; direct conversation {conv}"
    ));

    println!("\n1. Background: alice's app is in the background, still connected");
    let alice = d
        .alice(BackgroundPolicy::KeepAlive, AppState::Background)
        .await?;
    alice.wait_connected(T).await?;
    d.bob_sends(&bob, conv, 3, "while alice is in the background")
        .await?;
    alice
        .wait_for(T, |s| s.received >= 3 && s.notified >= 1)
        .await?;
    alice.stop().await;
    drop(alice);

    println!("\n2. Closed: alice's app is killed; later a periodic sync runs");
    d.say("alice's app is gone");
    d.bob_sends(&bob, conv, 20, "while alice's app is closed")
        .await?;
    let alice = d
        .alice(BackgroundPolicy::WakeOnly, AppState::Background)
        .await?;
    let r = alice.sync_once(T).await;
    d.say(format!(
        "sync: {:?}, {} received, {} notification(s), {:.0} ms",
        r.outcome,
        r.received,
        r.notified,
        r.elapsed.as_millis()
    ));
    let again = alice.sync_once(T).await;
    d.say(format!(
        "sync again: {} received, {} notification(s)",
        again.received, again.notified
    ));
    if r.outcome != SyncOutcome::CaughtUp || again.notified != 0 {
        bail!("the periodic sync did not behave");
    }

    println!("\n3. Foreground: alice's app sleeps (wake-only), then the user opens it");
    alice.wait_for(T, |s| s.state == State::Dormant).await?;
    d.say("alice's connection is dormant");
    d.bob_sends(&bob, conv, 5, "while alice's app sleeps")
        .await?;
    let t0 = Instant::now();
    alice.set_app_state(AppState::Foreground);
    let want = alice.status().cursor.unwrap_or(0) + 5;
    alice
        .wait_for(T, |s| s.state == State::Connected && s.cursor >= Some(want))
        .await?;
    d.say(format!(
        "opened: connected and caught up in {} ms, no backoff wait",
        t0.elapsed().as_millis()
    ));

    println!("\n4. Network cut: the phone loses its network for a moment");
    alice.set_network(Network::Offline);
    alice
        .wait_for(T, |s| s.state == State::WaitingForNetwork)
        .await?;
    d.say("offline: no connection attempts");
    d.bob_sends(&bob, conv, 3, "while alice is offline").await?;
    let t0 = Instant::now();
    alice.set_network(Network::Online("wifi".into()));
    let want = alice.status().cursor.unwrap_or(0) + 3;
    alice
        .wait_for(T, |s| s.state == State::Connected && s.cursor >= Some(want))
        .await?;
    d.say(format!(
        "network back: reconnected and caught up in {} ms",
        t0.elapsed().as_millis()
    ));

    println!("\n5. Relay restart: the relay goes away and comes back on the same database");
    if let Some(r) = d.relay.take() {
        r.shutdown();
        r.wait().await;
    }
    d.say("relay stopped (clients told \"going away\")");
    let want = alice.status().cursor.unwrap_or(0) + 1;
    let queued = bob.send(conv, "queued while the relay is down").await?;
    d.sent.push("queued while the relay is down".into());
    d.say("bob queued a message while the relay is down");
    d.start_relay().await?;
    d.say(format!("relay back on {}", d.url()));
    tokio::time::timeout(T, queued.confirmed())
        .await
        .context("the queued message was not confirmed")?
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    alice
        .wait_for(T, |s| s.state == State::Connected && s.cursor >= Some(want))
        .await?;
    d.say("both reconnected; the queued message arrived");

    // Verdict from alice's store.
    let stored = alice.messages(Some(conv), 10_000)?;
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for m in &stored {
        *counts.entry(m.body.as_str()).or_default() += 1;
    }
    let lost = d
        .sent
        .iter()
        .filter(|b| !counts.contains_key(b.as_str()))
        .count();
    let duplicated = counts.values().filter(|&&n| n > 1).count();
    let in_order = stored.iter().map(|m| m.body.clone()).collect::<Vec<_>>() == d.sent;
    let notifications = d
        .notifications
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .len();
    alice.stop().await;
    bob.stop().await;
    if let Some(r) = d.relay.take() {
        r.shutdown();
        r.wait().await;
    }
    println!(
        "\nverdict: sent {}, delivered {}, lost {lost}, duplicated {duplicated}, in order: {}, notifications shown: {notifications}",
        d.sent.len(),
        stored.len(),
        if in_order { "yes" } else { "NO" }
    );
    if lost > 0 || duplicated > 0 || !in_order {
        bail!("messages were lost, duplicated or reordered");
    }
    println!("every message delivered exactly once, in order");
    Ok(())
}
