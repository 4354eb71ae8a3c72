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
