//! The store contract suite: every behaviour the relay relies on, run
//! against every backend by [`store_contract_tests!`](crate::store_contract_tests).
//!
//! A backend provides a [`StoreFactory`]; the macro turns each function of
//! this module into a `#[tokio::test]` for it. A new backend (Postgres) must
//! pass exactly these tests, unchanged.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keepwire_proto::{
    ConvCreate, ConvKind, Cursor, EntryItem, ErrorCode, GapReason, InboxEntry, MemberChange,
    ResumeStatus, Send as SendMsg, Seq,
};

mod access;
mod inbox;

pub use access::*;
pub use inbox::*;

use super::{
    Actor, AuthFailure, HeadAdvance, HeadListener, Retention, RevokeTarget, Store, StoreError,
    UserId, WallClock,
};

/// Opens stores for the contract suite.
pub trait StoreFactory: Send + Sync {
    /// Opens the store at the factory's place (fresh the first time; the
    /// same data after [`RelayStore::close`](super::RelayStore::close)).
    fn open(&self, retention: Retention, clock: Arc<dyn WallClock>) -> Arc<dyn Store>;
}

/// A wall clock the tests move by hand.
#[derive(Debug, Default)]
pub struct TestClock(Mutex<i64>);

impl TestClock {
    /// A clock at `ms` since the Unix epoch.
    pub fn at(ms: i64) -> Arc<TestClock> {
        Arc::new(TestClock(Mutex::new(ms)))
    }

    /// Moves the clock on.
    pub fn advance(&self, d: Duration) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) += d.as_millis() as i64;
    }
}

impl WallClock for TestClock {
    fn now_ms(&self) -> i64 {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A head listener that records every head advance.
#[derive(Default)]
pub struct RecordingListener(pub Mutex<Vec<HeadAdvance>>);

impl HeadListener for RecordingListener {
    fn heads_advanced(&self, heads: &[HeadAdvance]) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(heads);
    }
}

const T0: i64 = 1_800_000_000_000;

fn open(f: &dyn StoreFactory) -> Arc<dyn Store> {
    f.open(Retention::default(), TestClock::at(T0))
}

async fn users(s: &dyn Store, names: &[&str]) -> Vec<UserId> {
    let mut ids = Vec::new();
    for n in names {
        ids.push(s.create_user(n).await.expect("create user"));
    }
    ids
}

async fn group(s: &dyn Store, creator: UserId, key: &str, members: &[&str]) -> u64 {
    s.conv_create(
        Actor::User(creator),
        ConvCreate {
            rid: "r".into(),
            key: key.into(),
            kind: ConvKind::Group,
            members: members.iter().map(|m| m.to_string()).collect(),
            name: Some(key.into()),
        },
        1000,
    )
    .await
    .expect("create group")
    .0
    .id
}

fn msg(conv: u64, cid: &str, body: &str) -> SendMsg {
    SendMsg {
        cid: format!("{cid:0>16}"),
        conv,
        kind: "text".into(),
        body: body.into(),
    }
}

async fn inbox(s: &dyn Store, user: UserId) -> Vec<InboxEntry> {
    s.read_inbox(user, 1, 100_000).await.expect("read inbox")
}

/// Checks `entries` are numbered contiguously from `first`.
fn assert_contiguous(entries: &[InboxEntry], first: Seq) {
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e.seq, first + i as u64, "inbox has a gap or a repeat");
    }
}

/// Bodies of the message entries, in inbox order.
fn bodies(entries: &[InboxEntry]) -> Vec<String> {
    entries
        .iter()
        .filter_map(|e| match &e.item {
            EntryItem::Message(m) => Some(m.body.clone()),
            _ => None,
        })
        .collect()
}

/// Runs the whole contract suite against a backend: one `#[tokio::test]` per
/// behaviour. `$factory` is an expression building a [`StoreFactory`]; it is
/// evaluated once per test. With `skip_if: $skip`, each test first evaluates
/// `$skip` and passes without running when it is true (a backend whose
/// server is not there, e.g. PostgreSQL with `KEEPWIRE_SKIP_POSTGRES=1`).
#[macro_export]
macro_rules! store_contract_tests {
    ($factory:expr) => {
        $crate::store_contract_tests!(@tests $factory; false; TESTS);
    };
    ($factory:expr, skip_if: $skip:expr) => {
        $crate::store_contract_tests!(@tests $factory; $skip; TESTS);
    };
    (@tests $factory:expr; $skip:expr; TESTS) => {
        $crate::store_contract_tests!(@tests $factory; $skip;
            tokens_authenticate_expire_and_revoke,
            devices_acks_and_revocation,
            revoking_a_device_revokes_its_tokens,
            sends_fan_out_with_gap_free_inboxes_and_dedupe,
            gap_free_sequences_under_concurrent_writers,
            concurrent_duplicates_store_once,
            answers_match_what_was_stored,
            heads_are_announced_after_commit_in_order,
            membership_rules_and_what_members_see,
            conversation_creation_rules,
            paging,
            resume_plans_and_epochs,
            retention_by_count_and_age,
            read_markers,
            reopen_keeps_everything,
            api_keys,
            push_registrations_and_wake_positions,
            deleting_a_user,
        );
    };
    (@tests $factory:expr; $skip:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                if $skip {
                    return;
                }
                let factory = $factory;
                $crate::store::contract::$name(&factory).await;
            }
        )*
    };
}
