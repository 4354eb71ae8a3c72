//! The store contract suite against every backend.

use std::sync::{Arc, Mutex};

use keepwire_server::store::contract::StoreFactory;
use keepwire_server::store::{
    MemoryDisk, MemoryOptions, MemoryStore, Retention, SqliteOptions, SqliteStore, Store, WallClock,
};
use keepwire_testkit::TempDir;

/// SQLite in a temporary directory; each `open` opens the same file.
struct Sqlite(TempDir);

impl StoreFactory for Sqlite {
    fn open(&self, retention: Retention, clock: Arc<dyn WallClock>) -> Arc<dyn Store> {
        SqliteStore::open(
            &self.0.join("relay.db"),
            SqliteOptions {
                retention,
                clock: Some(clock),
                ..Default::default()
            },
        )
        .expect("open the SQLite store")
    }
}

/// Memory; each `open` after the first reopens the same data.
#[derive(Default)]
struct Memory(Mutex<Option<Arc<MemoryDisk>>>);

impl StoreFactory for Memory {
    fn open(&self, retention: Retention, clock: Arc<dyn WallClock>) -> Arc<dyn Store> {
        let opts = MemoryOptions {
            retention,
            clock,
            ..Default::default()
        };
        let mut disk = self.0.lock().unwrap();
        match &*disk {
            Some(d) => MemoryStore::on_disk(d.clone(), opts),
            None => {
                let s = MemoryStore::new(opts);
                *disk = Some(s.disk());
                s
            }
        }
    }
}

mod sqlite {
    keepwire_server::store_contract_tests!(super::Sqlite(keepwire_testkit::TempDir::new(
        "contract"
    )));
}

mod memory {
    keepwire_server::store_contract_tests!(super::Memory::default());
}

/// PostgreSQL: each test creates its own database on the server at
/// `KEEPWIRE_TEST_POSTGRES` (default `postgres://postgres@127.0.0.1:5432/postgres`)
/// and drops it afterwards. `KEEPWIRE_SKIP_POSTGRES=1` skips these tests.
pub(crate) mod pg {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use keepwire_server::store::contract::StoreFactory;
    use keepwire_server::store::{
        PostgresOptions, PostgresStore, Retention, Store, StoreError, WallClock,
    };

    const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

    /// Whether the PostgreSQL tests are skipped (said loudly, once per test).
    pub fn skipped() -> bool {
        let skip = std::env::var("KEEPWIRE_SKIP_POSTGRES").is_ok_and(|v| v == "1");
        if skip {
            eprintln!(
                "!!! KEEPWIRE_SKIP_POSTGRES=1: SKIPPING a PostgreSQL store test (nothing was checked) !!!"
            );
        }
        skip
    }

    fn admin_url() -> String {
        std::env::var("KEEPWIRE_TEST_POSTGRES").unwrap_or_else(|_| DEFAULT_URL.to_owned())
    }

    /// Runs statements on the admin database from a thread of its own (the
    /// tests' runtime may not block on another future).
    pub fn admin(statements: Vec<String>) -> Result<(), String> {
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
                for s in &statements {
                    client
                        .batch_execute(s)
                        .await
                        .map_err(|e| format!("{s}: {e:?}"))?;
                }
                drop(client);
                let _ = task.await;
                Ok(())
            })
        })
        .join()
        .map_err(|_| "the admin thread panicked".to_owned())?
    }

    /// A database of its own, dropped when this is dropped.
    pub struct TestDb {
        name: String,
        /// Its URL.
        pub url: String,
    }

    impl TestDb {
        /// Creates `kw_test_<pid>_<n>`.
        pub fn create() -> TestDb {
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let name = format!(
                "kw_test_{}_{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            );
            admin(vec![
                format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
                format!("CREATE DATABASE {name}"),
            ])
            .expect("create a test database (set KEEPWIRE_SKIP_POSTGRES=1 to skip)");
            let base = admin_url();
            // Same server and user, another database (the URL's path).
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

        /// Opens a store on it.
        pub fn open(&self, opts: PostgresOptions) -> Result<Arc<PostgresStore>, StoreError> {
            let url = self.url.clone();
            tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(PostgresStore::open(&url, opts))
            })
        }

        /// Its name.
        pub fn name(&self) -> &str {
            &self.name
        }

        /// Runs SQL on it (test setup).
        pub fn execute(&self, sql: &str) {
            let url = self.url.clone();
            let sql = sql.to_owned();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                        .await
                        .unwrap();
                    let task = tokio::spawn(conn);
                    client.batch_execute(&sql).await.unwrap();
                    drop(client);
                    let _ = task.await;
                })
            })
            .join()
            .unwrap();
        }
    }

    impl Drop for TestDb {
        fn drop(&mut self) {
            if let Err(e) = admin(vec![format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            )]) {
                eprintln!("could not drop the test database {}: {e}", self.name);
            }
        }
    }

    /// The contract suite's factory: one database per test.
    pub struct Postgres(pub TestDb);

    impl Postgres {
        pub fn new() -> Postgres {
            Postgres(TestDb::create())
        }
    }

    impl StoreFactory for Postgres {
        fn open(&self, retention: Retention, clock: Arc<dyn WallClock>) -> Arc<dyn Store> {
            self.0
                .open(PostgresOptions {
                    retention,
                    clock: Some(clock),
                    ..Default::default()
                })
                .expect("open the PostgreSQL store")
        }
    }
}

mod postgres {
    keepwire_server::store_contract_tests!(super::pg::Postgres::new(), skip_if: super::pg::skipped());
}

/// PostgreSQL-specific: several relays (store handles) on one database.
mod postgres_nodes {
    use std::collections::{BTreeMap, HashSet};
    use std::sync::Arc;

    use keepwire_proto::{ConvCreate, ConvKind, EntryItem, Send as SendMsg};
    use keepwire_server::store::{
        Actor, InfraError, PostgresOptions, PostgresStore, RelayStore as _, Store, StoreError,
    };

    use super::pg::{TestDb, skipped};

    /// Two nodes on one fresh database, stamping entries with its clock.
    fn two_nodes(db: &TestDb) -> [Arc<PostgresStore>; 2] {
        let open = || db.open(PostgresOptions::default()).expect("open");
        [open(), open()]
    }

    fn msg(conv: u64, cid: String, body: String) -> SendMsg {
        SendMsg {
            cid,
            conv,
            kind: "text".into(),
            body,
        }
    }

    async fn group_of(s: &dyn Store, n: usize) -> (Vec<i64>, u64) {
        let mut ids = Vec::new();
        for i in 0..n {
            ids.push(s.create_user(&format!("u{i}")).await.unwrap());
        }
        let conv = s
            .conv_create(
                Actor::User(ids[0]),
                ConvCreate {
                    rid: "r".into(),
                    key: "g".into(),
                    kind: ConvKind::Group,
                    members: (1..n).map(|i| format!("u{i}")).collect(),
                    name: None,
                },
                100,
            )
            .await
            .unwrap()
            .0
            .id;
        (ids, conv)
    }

    /// Many tasks on two nodes send to one group at once: every member's
    /// inbox is gap-free, holds every confirmed message once, and lists the
    /// group's messages in `conv_seq` order (the same order for everyone).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_sends_on_two_nodes_keep_inboxes_gap_free_and_in_order() {
        if skipped() {
            return;
        }
        let db = TestDb::create();
        let nodes = two_nodes(&db);
        let (ids, conv) = group_of(&*nodes[0], 6).await;
        let mut tasks = Vec::new();
        for w in 0..12usize {
            let node = nodes[w % 2].clone();
            let sender = ids[w % ids.len()];
            tasks.push(tokio::spawn(async move {
                let mut confirmed = Vec::new();
                for i in 0..20 {
                    let c = node
                        .send(
                            Actor::User(sender),
                            &format!("d{w}"),
                            msg(conv, format!("{w:0>8}x{i:0>8}"), format!("{w}:{i}")),
                        )
                        .await
                        .expect("send");
                    assert!(!c.duplicate);
                    confirmed.push((c.conv_seq, c.id));
                }
                confirmed
            }));
        }
        let mut confirmed = Vec::new();
        for t in tasks {
            confirmed.extend(t.await.unwrap());
        }
        confirmed.sort_unstable();
        let seqs: Vec<u64> = confirmed.iter().map(|c| c.0).collect();
        assert_eq!(seqs, (1..=240).collect::<Vec<_>>(), "conv_seq is gap-free");
        let order: Vec<u64> = confirmed.iter().map(|c| c.1).collect();
        for &u in &ids {
            let e = nodes[1].read_inbox(u, 1, 10_000).await.unwrap();
            for (i, entry) in e.iter().enumerate() {
                assert_eq!(entry.seq, i as u64 + 1, "user {u}'s inbox has a gap");
            }
            let got: Vec<u64> = e
                .iter()
                .filter_map(|x| match &x.item {
                    EntryItem::Message(m) => Some(m.id),
                    _ => None,
                })
                .collect();
            assert_eq!(got, order, "user {u} sees the group in conv_seq order");
            let mut ts = 0;
            for entry in &e {
                if let EntryItem::Message(m) = &entry.item {
                    assert!(m.ts >= ts, "entry times rise with the sequence");
                    ts = m.ts;
                }
            }
        }
        for n in &nodes {
            n.close().await;
        }
    }

    /// One `(user, device, cid)` sent at once through two nodes: one
    /// original, every other answer `duplicate` with its ids.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_duplicate_on_two_nodes_answers_duplicate() {
        if skipped() {
            return;
        }
        let db = TestDb::create();
        let nodes = two_nodes(&db);
        let (ids, conv) = group_of(&*nodes[0], 3).await;
        for round in 0..5 {
            let mut tasks = Vec::new();
            for t in 0..10usize {
                let node = nodes[t % 2].clone();
                let sender = ids[1];
                tasks.push(tokio::spawn(async move {
                    node.send(
                        Actor::User(sender),
                        "phone",
                        msg(conv, format!("{round:0>16}"), format!("once {round}")),
                    )
                    .await
                    .expect("send")
                }));
            }
            let mut originals = 0;
            let mut answers = HashSet::new();
            for t in tasks {
                let c = t.await.unwrap();
                originals += usize::from(!c.duplicate);
                answers.insert((c.id, c.conv_seq, c.ts));
            }
            assert_eq!(originals, 1, "round {round}: exactly one original");
            assert_eq!(answers.len(), 1, "round {round}: one message named");
        }
        let mut per_body: BTreeMap<String, usize> = BTreeMap::new();
        for entry in nodes[0].read_inbox(ids[2], 1, 1000).await.unwrap() {
            if let EntryItem::Message(m) = entry.item {
                *per_body.entry(m.body).or_default() += 1;
            }
        }
        assert_eq!(per_body.len(), 5);
        assert!(per_body.values().all(|&n| n == 1), "{per_body:?}");
        for n in &nodes {
            n.close().await;
        }
    }

    /// A device's sends started in order (a connection pipelining them) are
    /// stored in that order, though each runs in its own transaction.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_devices_pipelined_sends_keep_their_order() {
        use futures_util::StreamExt as _;
        if skipped() {
            return;
        }
        let db = TestDb::create();
        let [s, _] = two_nodes(&db);
        let (ids, conv) = group_of(&*s, 3).await;
        // Like a connection: every send started before any is answered.
        let mut in_flight = futures_util::stream::FuturesUnordered::new();
        for i in 0..60 {
            in_flight.push(s.send(
                Actor::User(ids[0]),
                "phone",
                msg(conv, format!("{i:0>16}"), format!("{i}")),
            ));
        }
        while let Some(r) = in_flight.next().await {
            r.expect("send");
        }
        let got: Vec<String> = s
            .read_inbox(ids[2], 1, 1000)
            .await
            .unwrap()
            .into_iter()
            .filter_map(|e| match e.item {
                EntryItem::Message(m) => Some(m.body),
                _ => None,
            })
            .collect();
        assert_eq!(got, (0..60).map(|i| i.to_string()).collect::<Vec<_>>());
        s.close().await;
    }

    /// The epoch is the database's id and the server's timeline; a second
    /// node gets the same one, a new database another.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn epoch_is_per_database_with_the_timeline() {
        if skipped() {
            return;
        }
        let db = TestDb::create();
        let [a, b] = two_nodes(&db);
        let epoch = a.epoch();
        assert_eq!(b.epoch(), epoch);
        let (id, timeline) = epoch.split_once('-').expect("id-timeline");
        assert_eq!(id.len(), 16);
        assert!(timeline.parse::<u32>().unwrap() >= 1);
        let other = TestDb::create();
        let c = other.open(PostgresOptions::default()).unwrap();
        assert_ne!(c.epoch(), epoch);
        for s in [a, b, c] {
            s.close().await;
        }
    }

    /// The relay's connections killed again and again while devices send
    /// (each retrying its send with the same cid on an error, as clients
    /// do): nothing is lost or stored twice, inboxes stay gap-free.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn killed_connections_cost_retries_not_messages() {
        if skipped() {
            return;
        }
        let db = TestDb::create();
        let metrics = Arc::new(keepwire_server::Metrics::default());
        let open = || {
            db.open(PostgresOptions {
                metrics: Some(metrics.clone()),
                ..Default::default()
            })
            .expect("open")
        };
        let nodes = [open(), open()];
        let (ids, conv) = group_of(&*nodes[0], 4).await;
        let mut tasks = Vec::new();
        for w in 0..4usize {
            let node = nodes[w % 2].clone();
            let sender = ids[w];
            tasks.push(tokio::spawn(async move {
                let mut stored = Vec::new();
                for i in 0..40 {
                    let cid = format!("{w:0>8}y{i:0>8}");
                    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
                    let c = loop {
                        match node
                            .send(
                                Actor::User(sender),
                                "d",
                                msg(conv, cid.clone(), cid.clone()),
                            )
                            .await
                        {
                            Ok(c) => break c,
                            Err(StoreError::Infra(e)) => {
                                assert!(std::time::Instant::now() < deadline, "no progress: {e}");
                                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                            }
                            Err(e) => panic!("send refused: {e}"),
                        }
                    };
                    stored.push(c.id);
                }
                stored
            }));
        }
        // Meanwhile: kill the relays' connections to this database, 8 times.
        let name = db.name().to_owned();
        let killer = tokio::task::spawn_blocking(move || {
            for _ in 0..8 {
                std::thread::sleep(std::time::Duration::from_millis(40));
                super::pg::admin(vec![format!(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                     WHERE datname = '{name}' AND application_name = 'keepwire'"
                )])
                .expect("terminate the relays' connections");
            }
        });
        let mut all = HashSet::new();
        for t in tasks {
            for id in t.await.unwrap() {
                assert!(all.insert(id), "two sends answered with one message");
            }
        }
        killer.await.unwrap();
        assert_eq!(all.len(), 160);
        let retries = metrics
            .render()
            .lines()
            .filter(|l| l.starts_with("keepwire_store_retries_total"))
            .map(str::to_owned)
            .collect::<Vec<_>>();
        eprintln!("retries: {retries:?}");
        for &u in &ids {
            let e = nodes[0].read_inbox(u, 1, 10_000).await.unwrap();
            let mut seen = HashSet::new();
            for (i, entry) in e.iter().enumerate() {
                assert_eq!(entry.seq, i as u64 + 1, "user {u}'s inbox has a gap");
                if let EntryItem::Message(m) = &entry.item {
                    assert!(seen.insert(m.cid.clone()), "{} stored twice", m.cid);
                }
            }
            assert_eq!(seen.len(), 160, "user {u} misses messages");
        }
        for n in &nodes {
            n.close().await;
        }
    }

    /// A server that could lose confirmed commits is refused, clearly (here
    /// `synchronous_commit = off`, set on the test's database only).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refuses_a_server_without_synchronous_commit() {
        if skipped() {
            return;
        }
        let db = TestDb::create();
        db.execute(
            "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET synchronous_commit = off', \
             current_database()); END $$",
        );
        match db.open(PostgresOptions::default()) {
            Err(StoreError::Infra(InfraError::Incompatible(m))) => {
                assert!(m.contains("synchronous_commit = off"), "{m}")
            }
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("opened a store on a server that may lose commits"),
        }
    }

    /// A database holding someone else's tables is refused, clearly.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refuses_a_foreign_database() {
        if skipped() {
            return;
        }
        let db = TestDb::create();
        db.execute("CREATE TABLE invoices (id BIGINT PRIMARY KEY)");
        match db.open(PostgresOptions::default()) {
            Err(StoreError::Infra(InfraError::Incompatible(m))) => {
                assert!(m.contains("not a keepwire database"), "{m}")
            }
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("opened someone else's database"),
        }
    }

    /// Revocation ids commit out of order across writers: a revocation whose
    /// transaction commits after a later id's is still applied by the
    /// relay's poller (it used to read only ids above the highest seen, and
    /// skipped it for good).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_revocation_committed_after_a_later_one_still_closes_the_connection() {
        use keepwire_proto::CloseCode;
        use keepwire_server::{AdminStore as _, Metrics, RelayServer};
        use keepwire_testkit::WsClient;
        use std::time::Duration;

        if skipped() {
            return;
        }
        let db = TestDb::create();
        let store = db.open(PostgresOptions::default()).expect("open");
        let relay = RelayServer::start(
            crate::support::test_config(),
            store.clone(),
            Arc::new(Metrics::default()),
        )
        .await
        .expect("start the relay");
        let alice = store.create_user("alice").await.unwrap();
        let bob = store.create_user("bob").await.unwrap();
        let day = Duration::from_secs(86_400);
        let ta = store.issue_token("alice", day).await.unwrap();
        let tb = store.issue_token("bob", day).await.unwrap();
        let mut a = WsClient::connect(&relay.url(), &ta.token, "a", None)
            .await
            .expect("welcome");
        let mut b = WsClient::connect(&relay.url(), &tb.token, "b", None)
            .await
            .expect("welcome");
        let writer = || async {
            let (c, conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
                .await
                .expect("connect");
            tokio::spawn(conn);
            c
        };
        // Writer 1 takes the next id for alice's revocation and keeps its
        // transaction open; writer 2 takes the id after it for bob's and
        // commits first.
        let w1 = writer().await;
        w1.batch_execute(&format!(
            "BEGIN; INSERT INTO revocations (user_id, token_id, at) VALUES ({alice}, {}, 0)",
            ta.id
        ))
        .await
        .unwrap();
        let w2 = writer().await;
        w2.batch_execute(&format!(
            "INSERT INTO revocations (user_id, token_id, at) VALUES ({bob}, {}, 0)",
            tb.id
        ))
        .await
        .unwrap();
        // The poller has read past alice's id: bob's connection is closed.
        assert_eq!(b.expect_close().await, Some(CloseCode::TokenRevoked.code()));
        w1.batch_execute("COMMIT").await.unwrap();
        assert_eq!(
            a.expect_close().await,
            Some(CloseCode::TokenRevoked.code()),
            "the late revocation was applied"
        );
        relay.shutdown();
    }
}
