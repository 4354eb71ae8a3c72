//! `keepwire serve --store postgres://...`: the admin commands and the relay
//! on a PostgreSQL database of the test's own (on `KEEPWIRE_TEST_POSTGRES`,
//! default `postgres://postgres@127.0.0.1:5432/postgres`; dropped after;
//! `KEEPWIRE_SKIP_POSTGRES=1` skips).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};

use keepwire_proto::{ClientFrame, ConvCreate, ConvKind, EntryItem, ServerFrame};
use keepwire_testkit::{RelayProcess, WsClient};

use crate::{FAST, bin, keepwire};

fn admin_url() -> String {
    std::env::var("KEEPWIRE_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// Runs one statement on the admin database (from a thread with its own
/// runtime: the test's runtime may not block).
fn admin(sql: String) -> Result<(), String> {
    let url = admin_url();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .map_err(|e| format!("cannot connect to {url}: {e}"))?;
            let task = tokio::spawn(conn);
            let r = client
                .batch_execute(&sql)
                .await
                .map_err(|e| format!("{sql}: {e:?}"));
            drop(client);
            let _ = task.await;
            r
        })
    })
    .join()
    .map_err(|_| "the admin thread panicked".to_owned())?
}

/// A database of the test's own, dropped on drop.
pub(crate) struct TestDb {
    name: String,
    pub(crate) url: String,
}

impl TestDb {
    pub(crate) fn create() -> TestDb {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "kw_test_{}_cli{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        admin(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).unwrap();
        admin(format!("CREATE DATABASE {name}"))
            .expect("create a test database (set KEEPWIRE_SKIP_POSTGRES=1 to skip)");
        let base = admin_url();
        let (base, query) = match base.split_once('?') {
            Some((b, q)) => (b.to_owned(), format!("?{q}")),
            None => (base, String::new()),
        };
        let authority_at = base.find("://").map_or(0, |i| i + 3);
        let path_at = base[authority_at..]
            .find('/')
            .map_or(base.len(), |i| authority_at + i);
        let url = format!("{}/{name}{query}", &base[..path_at]);
        TestDb { name, url }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Err(e) = admin(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )) {
            eprintln!("could not drop the test database {}: {e}", self.name);
        }
    }
}

pub(crate) fn skipped() -> bool {
    let skip = std::env::var("KEEPWIRE_SKIP_POSTGRES").is_ok_and(|v| v == "1");
    if skip {
        eprintln!(
            "!!! KEEPWIRE_SKIP_POSTGRES=1: SKIPPING a PostgreSQL test (nothing was checked) !!!"
        );
    }
    skip
}

/// `keepwire admin --store URL user add NAME`: its token.
pub(crate) fn add_user(store: &str, name: &str) -> String {
    let out = keepwire(&["admin", "--store", store, "user", "add", name]);
    assert!(
        out.status.success(),
        "user add failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Messages sent through a relay on PostgreSQL reach the other user live,
/// survive the relay's `kill -9`, and a second relay on the same database
/// replays them; `--db` and `--store` cannot be given together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_on_postgres_end_to_end() {
    if skipped() {
        return;
    }
    let db = TestDb::create();
    let ta = add_user(&db.url, "alice");
    let tb = add_user(&db.url, "bob");
    let out = keepwire(&[
        "admin", "--store", &db.url, "--db", "x.db", "user", "add", "c",
    ]);
    assert!(!out.status.success(), "--db with --store is refused");
    let out = keepwire(&["admin", "--store", &db.url, "backup", "/tmp/kw-never"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("pg_dump"));

    let mut relay = RelayProcess::start_store(&bin(), &db.url, FAST);
    let mut a = WsClient::connect(&relay.url, &ta, "a", None).await.unwrap();
    let mut b = WsClient::connect(&relay.url, &tb, "b", None).await.unwrap();
    a.send(&ClientFrame::ConvCreate(ConvCreate {
        rid: "c".into(),
        key: "c".into(),
        kind: ConvKind::Direct,
        members: vec!["bob".into()],
        name: None,
    }))
    .await;
    let conv = a
        .recv_where(|f| match f {
            ServerFrame::Conv { conv, .. } => Some(conv.id),
            _ => None,
        })
        .await;
    let mut cids = Vec::new();
    for i in 0..50 {
        cids.push(a.send_message(conv, &format!("m{i}")).await);
    }
    for cid in &cids {
        assert!(!a.confirm(cid).await.duplicate);
    }
    // Bob, live: the membership entry and the 50 messages, in order.
    let live = b.entries(51, true).await;
    let bodies: Vec<String> = live
        .iter()
        .filter_map(|e| match &e.item {
            EntryItem::Message(m) => Some(m.body.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(bodies, (0..50).map(|i| format!("m{i}")).collect::<Vec<_>>());

    relay.kill9();
    // Another relay on the same database: a repeated send is a duplicate,
    // a new device of bob's gets everything once.
    let relay = RelayProcess::start_store(&bin(), &db.url, FAST);
    let mut a = WsClient::connect(&relay.url, &ta, "a", None).await.unwrap();
    a.send_with_cid(conv, "m0", &cids[0]).await;
    assert!(a.confirm(&cids[0]).await.duplicate);
    let mut b2 = WsClient::connect(&relay.url, &tb, "b2", None)
        .await
        .unwrap();
    assert_eq!(b2.welcome().head, 51);
    let replay = b2.entries(51, true).await;
    let mut seen = HashSet::new();
    for (i, e) in replay.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1);
        if let EntryItem::Message(m) = &e.item {
            assert!(seen.insert(m.cid.clone()), "duplicate {}", m.cid);
        }
    }
    assert_eq!(seen.len(), 50);
}
