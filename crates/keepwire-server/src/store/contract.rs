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

/// Tokens authenticate until they expire or are revoked; revocations are logged.
pub async fn tokens_authenticate_expire_and_revoke(f: &dyn StoreFactory) {
    let clock = TestClock::at(T0);
    let s = f.open(Retention::default(), clock.clone());
    users(&*s, &["alice"]).await;
    let t = s
        .issue_token("alice", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(s.authenticate(&t.token).await.unwrap().name, "alice");
    assert!(matches!(
        s.authenticate("kw_forged").await,
        Err(StoreError::Auth(AuthFailure::Unknown))
    ));
    clock.advance(Duration::from_secs(61));
    assert!(matches!(
        s.authenticate(&t.token).await,
        Err(StoreError::Auth(AuthFailure::Expired))
    ));
    let t2 = s
        .issue_token("alice", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(s.revoke(RevokeTarget::Id(t2.id)).await.unwrap(), 1);
    assert_eq!(s.revoke(RevokeTarget::Id(t2.id)).await.unwrap(), 0);
    assert!(matches!(
        s.authenticate(&t2.token).await,
        Err(StoreError::Auth(AuthFailure::Revoked))
    ));
    let revs = s.revocations_after(0).await.unwrap();
    assert_eq!(revs.len(), 1);
    assert_eq!(revs[0].token_id, Some(t2.id));
    assert!(s.revocations_after(revs[0].id).await.unwrap().is_empty());
    assert!(matches!(
        s.revoke(RevokeTarget::User("nobody".into())).await,
        Err(StoreError::NotFound(_))
    ));
    // Revoking a user's tokens also revokes app-issued tokens issued until now.
    s.revoke(RevokeTarget::User("alice".into())).await.unwrap();
    assert!(matches!(
        s.authenticate_external("alice", Some(T0)).await,
        Err(StoreError::Auth(AuthFailure::Revoked))
    ));
    clock.advance(Duration::from_secs(1));
    assert!(
        s.authenticate_external("alice", Some(T0 + 62_000))
            .await
            .is_ok()
    );
    // External users exist without sign-up.
    let bob = s.authenticate_external("bob", Some(T0)).await.unwrap();
    assert_eq!(s.user_id("bob").await.unwrap(), Some(bob));
    s.close().await;
}

/// Devices are recorded, acks only move forward, revoked devices are barred.
pub async fn devices_acks_and_revocation(f: &dyn StoreFactory) {
    let s = open(f);
    let [a, b] = users(&*s, &["a", "b"]).await[..] else {
        unreachable!()
    };
    let conv = group(&*s, a, "g", &["b"]).await;
    s.touch_device(b, "phone", None).await.unwrap();
    for i in 0..3 {
        s.send(Actor::User(a), "d", msg(conv, &format!("{i}"), "x"))
            .await
            .unwrap();
    }
    s.record_ack(b, "phone", 3).await.unwrap();
    s.record_ack(b, "phone", 2).await.unwrap();
    let p = s.positions("b", Some(conv)).await.unwrap();
    assert_eq!(p.head, 4);
    assert_eq!(p.devices.len(), 1);
    assert_eq!(p.devices[0].acked_seq, 3, "an ack position never goes back");
    assert_eq!(p.devices[0].conv_delivered_seq, Some(2));
    assert!(!s.device_revoked(b, "phone").await.unwrap());
    assert!(s.revoke_device("b", "phone").await.unwrap());
    assert!(!s.revoke_device("b", "phone").await.unwrap());
    assert!(s.device_revoked(b, "phone").await.unwrap());
    // A device that never connected can be barred too.
    assert!(s.revoke_device("b", "tablet").await.unwrap());
    assert!(s.device_revoked(b, "tablet").await.unwrap());
    let revs = s.revocations_after(0).await.unwrap();
    assert_eq!(revs.len(), 2);
    assert_eq!(revs[0].device.as_deref(), Some("phone"));
    let devices = s.list_devices("b").await.unwrap();
    assert_eq!(devices.len(), 2);
    assert!(devices.iter().all(|d| d.revoked_at_ms.is_some()));
    s.close().await;
}

/// Revoking a device revokes the keepwire tokens it connected with, so a
/// stolen device's token cannot connect under another device id; the
/// user's other tokens keep working.
pub async fn revoking_a_device_revokes_its_tokens(f: &dyn StoreFactory) {
    let s = open(f);
    let [a] = users(&*s, &["a"]).await[..] else {
        unreachable!()
    };
    let stolen = s.issue_token("a", Duration::from_secs(600)).await.unwrap();
    let other = s.issue_token("a", Duration::from_secs(600)).await.unwrap();
    let u = s.authenticate(&stolen.token).await.unwrap();
    s.touch_device(a, "phone", u.token_id).await.unwrap();
    s.touch_device(a, "laptop", Some(other.id)).await.unwrap();
    assert!(s.revoke_device("a", "phone").await.unwrap());
    assert!(matches!(
        s.authenticate(&stolen.token).await,
        Err(StoreError::Auth(AuthFailure::Revoked))
    ));
    assert_eq!(s.authenticate(&other.token).await.unwrap().id, a);
    // The log names the token, so its connections on any device close.
    let revs = s.revocations_after(0).await.unwrap();
    assert!(revs.iter().any(|r| r.token_id == Some(stolen.id)));
    assert!(revs.iter().all(|r| r.token_id != Some(other.id)));
    s.close().await;
}

/// Sends fan out to every member with gap-free inboxes; a repeated cid
/// stores nothing; another device's cid is another send.
pub async fn sends_fan_out_with_gap_free_inboxes_and_dedupe(f: &dyn StoreFactory) {
    let s = open(f);
    let [a, b] = users(&*s, &["a", "b"]).await[..] else {
        unreachable!()
    };
    let (conv, created) = s
        .conv_create(
            Actor::User(a),
            ConvCreate {
                rid: "r".into(),
                key: "k1".into(),
                kind: ConvKind::Direct,
                members: vec!["b".into()],
                name: None,
            },
            100,
        )
        .await
        .unwrap();
    assert!(created);
    let c1 = s
        .send(Actor::User(a), "d1", msg(conv.id, "1", "hi"))
        .await
        .unwrap();
    assert!(!c1.duplicate);
    assert_eq!(c1.echo_seq, Some(2), "the sender's own inbox entry");
    let again = s
        .send(Actor::User(a), "d1", msg(conv.id, "1", "hi"))
        .await
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(
        (again.id, again.conv_seq, again.ts),
        (c1.id, c1.conv_seq, c1.ts)
    );
    assert!(matches!(
        s.send(Actor::User(a), "d1", msg(conv.id, "1", "other"))
            .await,
        Err(StoreError::Refused(ErrorCode::CidConflict, _))
    ));
    let c2 = s
        .send(Actor::User(a), "d2", msg(conv.id, "1", "hi"))
        .await
        .unwrap();
    assert_ne!(c2.id, c1.id);
    assert_eq!(c2.conv_seq, 2);
    let eb = inbox(&*s, b).await;
    assert_contiguous(&eb, 1);
    assert_eq!(eb.len(), 3, "membership entry then two messages");
    assert!(matches!(&eb[0].item, EntryItem::Member(m) if m.change == MemberChange::Added));
    assert_eq!(inbox(&*s, a).await.len(), 3);
    assert_eq!(s.inbox_head(b).await.unwrap(), 3);
    s.close().await;
}

/// Concurrent writers to overlapping conversations: every user's inbox is
/// gap-free, every member sees each conversation in `conv_seq` order, and
/// every confirmed message is in every member's inbox exactly once.
pub async fn gap_free_sequences_under_concurrent_writers(f: &dyn StoreFactory) {
    let s = open(f);
    let names = ["u0", "u1", "u2", "u3"];
    let ids = users(&*s, &names).await;
    let c01 = group(&*s, ids[0], "a", &["u1"]).await;
    let c12 = group(&*s, ids[1], "b", &["u2", "u3"]).await;
    let c_all = group(&*s, ids[3], "c", &["u0", "u1", "u2"]).await;
    let convs = [
        (c01, vec![0, 1]),
        (c12, vec![1, 2, 3]),
        (c_all, vec![0, 1, 2, 3]),
    ];
    let mut tasks = Vec::new();
    for w in 0..8usize {
        let s = s.clone();
        let (conv, members) = convs[w % 3].clone();
        let sender = ids[members[w % members.len()]];
        tasks.push(tokio::spawn(async move {
            let mut confirmed = Vec::new();
            for i in 0..25 {
                let c = s
                    .send(
                        Actor::User(sender),
                        &format!("w{w}"),
                        msg(conv, &format!("{w}x{i}"), &format!("{w}:{i}")),
                    )
                    .await
                    .expect("send");
                confirmed.push((conv, c.conv_seq, c.id));
            }
            confirmed
        }));
    }
    let mut confirmed = Vec::new();
    for t in tasks {
        confirmed.extend(t.await.unwrap());
    }
    assert_eq!(confirmed.len(), 200);
    for (u, &id) in ids.iter().enumerate() {
        let e = inbox(&*s, id).await;
        assert_contiguous(&e, 1);
        let mut last_per_conv: BTreeMap<u64, u64> = BTreeMap::new();
        let mut seen = HashSet::new();
        for entry in &e {
            if let EntryItem::Message(m) = &entry.item {
                assert!(seen.insert(m.id), "message {} twice in u{u}'s inbox", m.id);
                let last = last_per_conv.entry(m.conv).or_insert(0);
                assert_eq!(
                    m.conv_seq,
                    *last + 1,
                    "u{u} sees conv {} out of order",
                    m.conv
                );
                *last = m.conv_seq;
            }
        }
        for (conv, members) in &convs {
            let expected = confirmed.iter().filter(|c| c.0 == *conv).count() as u64;
            let got = last_per_conv.get(conv).copied().unwrap_or(0);
            if members.contains(&u) {
                assert_eq!(got, expected, "u{u} misses messages of conv {conv}");
            } else {
                assert_eq!(got, 0, "u{u} got messages of a conversation it is not in");
            }
        }
    }
    s.close().await;
}

/// Concurrent sends of one `(user, device, cid)` store one message.
pub async fn concurrent_duplicates_store_once(f: &dyn StoreFactory) {
    let s = open(f);
    let [a, b] = users(&*s, &["a", "b"]).await[..] else {
        unreachable!()
    };
    let conv = group(&*s, a, "g", &["b"]).await;
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.send(Actor::User(a), "d", msg(conv, "same", "once"))
                .await
                .expect("send")
        }));
    }
    let mut originals = 0;
    let mut ids = HashSet::new();
    for t in tasks {
        let c = t.await.unwrap();
        originals += usize::from(!c.duplicate);
        ids.insert((c.id, c.conv_seq));
    }
    assert_eq!(originals, 1, "exactly one send is the original");
    assert_eq!(ids.len(), 1, "every answer names the same message");
    assert_eq!(bodies(&inbox(&*s, b).await), vec!["once"]);
    s.close().await;
}

/// Refused writes store nothing and do not disturb the writes around them;
/// every answer matches what was stored.
pub async fn answers_match_what_was_stored(f: &dyn StoreFactory) {
    let s = open(f);
    let [a, b, _c] = users(&*s, &["a", "b", "c"]).await[..] else {
        unreachable!()
    };
    let conv = group(&*s, a, "g", &["b"]).await;
    let mut tasks = Vec::new();
    for i in 0..40u32 {
        let s = s.clone();
        // Every third send is from a non-member, every fifth to a missing conversation.
        let (actor, to) = match i {
            i if i % 5 == 0 => (a, conv + 100),
            i if i % 3 == 0 => (_c, conv),
            _ => (a, conv),
        };
        tasks.push(tokio::spawn(async move {
            let r = s
                .send(
                    Actor::User(actor),
                    "d",
                    msg(to, &format!("{i}"), &format!("m{i}")),
                )
                .await;
            (i, r)
        }));
    }
    let mut ok = Vec::new();
    for t in tasks {
        let (i, r) = t.await.unwrap();
        match r {
            Ok(c) => ok.push((c.conv_seq, format!("m{i}"))),
            Err(StoreError::Refused(code, _)) => {
                assert!(
                    matches!(code, ErrorCode::NotMember | ErrorCode::NoSuchConv),
                    "{code:?}"
                );
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    ok.sort();
    let expected: Vec<String> = ok.into_iter().map(|(_, b)| b).collect();
    assert_eq!(bodies(&inbox(&*s, b).await), expected);
    s.close().await;
}

/// The head listener hears of every entry after its commit, in commit order
/// per user, before the write's answer; a read after the notice sees it.
pub async fn heads_are_announced_after_commit_in_order(f: &dyn StoreFactory) {
    let s = open(f);
    let listener = Arc::new(RecordingListener::default());
    s.set_head_listener(listener.clone());
    let [a, b] = users(&*s, &["a", "b"]).await[..] else {
        unreachable!()
    };
    let conv = group(&*s, a, "g", &["b"]).await;
    for i in 0..20 {
        let c = s
            .send(Actor::User(a), "d", msg(conv, &format!("{i}"), "x"))
            .await
            .unwrap();
        let echo = c.echo_seq.expect("a member's echo");
        let heads = listener.0.lock().unwrap().clone();
        assert!(
            heads.iter().any(|h| h.user == a && h.seq == echo),
            "the answer came before the head notice"
        );
        // Whatever was announced can be read.
        let last_b = heads
            .iter()
            .filter(|h| h.user == b)
            .map(|h| h.seq)
            .max()
            .unwrap();
        let e = s.read_inbox(b, last_b, 1).await.unwrap();
        assert_eq!(e.first().map(|e| e.seq), Some(last_b));
        // A message's notice carries its encoded item.
        let h = heads.iter().rfind(|h| h.user == b).unwrap();
        assert!(h.item.as_deref().is_some_and(|i| i.contains("\"message\"")));
    }
    let heads = listener.0.lock().unwrap().clone();
    for u in [a, b] {
        let seqs: Vec<Seq> = heads
            .iter()
            .filter(|h| h.user == u)
            .map(|h| h.seq)
            .collect();
        assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    }
    s.close().await;
}

/// Membership: a member gets exactly the messages committed while it was a
/// member; added and removed users get `member` entries; the rules on who may
/// change what hold.
pub async fn membership_rules_and_what_members_see(f: &dyn StoreFactory) {
    let s = open(f);
    let [a, b, c] = users(&*s, &["a", "b", "c"]).await[..] else {
        unreachable!()
    };
    let conv = group(&*s, a, "g", &["b"]).await;
    s.send(Actor::User(a), "d", msg(conv, "1", "before"))
        .await
        .unwrap();
    let (info, changed) = s
        .conv_member(Actor::User(b), conv, "c", true, 10)
        .await
        .unwrap();
    assert!(changed);
    assert_eq!(info.members, vec!["a", "b", "c"]);
    assert!(
        !s.conv_member(Actor::User(b), conv, "c", true, 10)
            .await
            .unwrap()
            .1,
        "adding twice changes nothing"
    );
    s.send(Actor::User(a), "d", msg(conv, "2", "while"))
        .await
        .unwrap();
    assert!(matches!(
        s.conv_member(Actor::User(b), conv, "a", false, 10).await,
        Err(StoreError::Refused(ErrorCode::Forbidden, _))
    ));
    s.conv_member(Actor::User(a), conv, "c", false, 10)
        .await
        .unwrap();
    s.send(Actor::User(a), "d", msg(conv, "3", "after"))
        .await
        .unwrap();
    assert_eq!(bodies(&inbox(&*s, c).await), vec!["while"]);
    assert_eq!(
        bodies(&inbox(&*s, b).await),
        vec!["before", "while", "after"]
    );
    let changes: Vec<(String, MemberChange)> = inbox(&*s, c)
        .await
        .into_iter()
        .filter_map(|e| match e.item {
            EntryItem::Member(m) => Some((m.user, m.change)),
            _ => None,
        })
        .collect();
    assert_eq!(
        changes,
        vec![
            ("c".to_string(), MemberChange::Added),
            ("c".to_string(), MemberChange::Removed)
        ]
    );
    // A non-member cannot send, add, read history or list members.
    assert!(matches!(
        s.send(Actor::User(c), "d", msg(conv, "4", "x")).await,
        Err(StoreError::Refused(ErrorCode::NotMember, _))
    ));
    assert!(matches!(
        s.conv_member(Actor::User(c), conv, "c", true, 10).await,
        Err(StoreError::Refused(ErrorCode::NotMember, _))
    ));
    assert!(matches!(
        s.history(Actor::User(c), conv, None, 10).await,
        Err(StoreError::Refused(ErrorCode::NotMember, _))
    ));
    assert!(matches!(
        s.conv_member_ids(c, conv).await,
        Err(StoreError::Refused(ErrorCode::NotMember, _))
    ));
    assert!(matches!(
        s.conv_member(Actor::User(a), conv, "nobody", true, 10)
            .await,
        Err(StoreError::Refused(ErrorCode::UnknownUser, _))
    ));
    assert!(matches!(
        s.conv_member(Actor::User(a), conv, "c", true, 2).await,
        Err(StoreError::Refused(ErrorCode::GroupTooLarge, _))
    ));
    // A member may leave; the system may change anything.
    s.conv_member(Actor::User(b), conv, "b", false, 10)
        .await
        .unwrap();
    s.conv_member(Actor::System, conv, "b", true, 10)
        .await
        .unwrap();
    let mut members = s.conv_member_ids(a, conv).await.unwrap();
    members.sort();
    assert_eq!(members, vec![a, b]);
    s.close().await;
}

/// Creation is idempotent per key, one direct conversation per pair, and a
/// creator who left gets nothing back through its key.
pub async fn conversation_creation_rules(f: &dyn StoreFactory) {
    let s = open(f);
    let [a, b] = users(&*s, &["a", "b"]).await[..] else {
        unreachable!()
    };
    let direct = |creator: UserId, other: &str, key: &str| {
        let s = s.clone();
        let req = ConvCreate {
            rid: "r".into(),
            key: key.into(),
            kind: ConvKind::Direct,
            members: vec![other.into()],
            name: None,
        };
        async move { s.conv_create(Actor::User(creator), req, 10).await }
    };
    let (d1, new1) = direct(a, "b", "k1").await.unwrap();
    let (d2, new2) = direct(b, "a", "k2").await.unwrap();
    assert!(new1 && !new2);
    assert_eq!(d1.id, d2.id, "one direct conversation per pair");
    assert!(matches!(
        direct(a, "a", "k3").await,
        Err(StoreError::Refused(ErrorCode::Invalid, _))
    ));
    assert!(matches!(
        direct(a, "nobody", "k4").await,
        Err(StoreError::Refused(ErrorCode::UnknownUser, _))
    ));
    assert!(matches!(
        s.conv_member(Actor::User(a), d1.id, "b", false, 10).await,
        Err(StoreError::Refused(ErrorCode::Forbidden, _))
    ));
    let g1 = group(&*s, a, "team", &["b"]).await;
    assert_eq!(
        group(&*s, a, "team", &["b"]).await,
        g1,
        "same key, same group"
    );
    assert_ne!(
        group(&*s, b, "team", &["a"]).await,
        g1,
        "keys are per creator"
    );
    let too_big = s
        .conv_create(
            Actor::User(a),
            ConvCreate {
                rid: "r".into(),
                key: "big".into(),
                kind: ConvKind::Group,
                members: vec!["b".into()],
                name: None,
            },
            1,
        )
        .await;
    assert!(matches!(
        too_big,
        Err(StoreError::Refused(ErrorCode::GroupTooLarge, _))
    ));
    s.conv_member(Actor::User(a), g1, "a", false, 10)
        .await
        .unwrap();
    let again = s
        .conv_create(
            Actor::User(a),
            ConvCreate {
                rid: "r".into(),
                key: "team".into(),
                kind: ConvKind::Group,
                members: vec!["b".into()],
                name: None,
            },
            10,
        )
        .await;
    assert!(
        matches!(again, Err(StoreError::Refused(ErrorCode::NotMember, _))),
        "{again:?}"
    );
    let listed: Vec<u64> = s.conv_list(b).await.unwrap().iter().map(|c| c.id).collect();
    assert_eq!(listed.len(), 3);
    assert!(listed.contains(&g1) && listed.contains(&d1.id));
    s.close().await;
}

/// History pages backwards in `conv_seq` order; inbox reads page forwards.
pub async fn paging(f: &dyn StoreFactory) {
    let s = open(f);
    let [a, b] = users(&*s, &["a", "b"]).await[..] else {
        unreachable!()
    };
    let conv = group(&*s, a, "g", &["b"]).await;
    for i in 1..=25 {
        s.send(
            Actor::User(a),
            "d",
            msg(conv, &format!("{i}"), &format!("{i}")),
        )
        .await
        .unwrap();
    }
    let p = s.history(Actor::User(b), conv, None, 10).await.unwrap();
    assert!(p.more);
    let seqs: Vec<u64> = p.messages.iter().map(|m| m.conv_seq).collect();
    assert_eq!(seqs, (16..=25).collect::<Vec<_>>());
    let p = s.history(Actor::User(b), conv, Some(6), 10).await.unwrap();
    assert!(!p.more);
    assert_eq!(p.messages.len(), 5);
    assert_eq!(p.messages[0].conv_seq, 1);
    let p = s.history(Actor::System, conv, Some(1), 10).await.unwrap();
    assert!(p.messages.is_empty() && !p.more);
    let mut from = 1;
    let mut all = Vec::new();
    loop {
        let page = s.read_inbox(b, from, 7).await.unwrap();
        if page.is_empty() {
            break;
        }
        from = page.last().unwrap().seq + 1;
        all.extend(page);
    }
    assert_contiguous(&all, 1);
    assert_eq!(all.len(), 26);
    s.close().await;
}

/// Resume plans: complete, new with a window, another epoch, a cursor ahead,
/// and fetch hints most recently active first.
pub async fn resume_plans_and_epochs(f: &dyn StoreFactory) {
    let s = open(f);
    let [a, b] = users(&*s, &["a", "b"]).await[..] else {
        unreachable!()
    };
    let old = group(&*s, a, "old", &["b"]).await;
    let busy = group(&*s, a, "busy", &["b"]).await;
    for i in 0..5 {
        s.send(Actor::User(a), "d", msg(busy, &format!("b{i}"), "x"))
            .await
            .unwrap();
    }
    s.send(Actor::User(a), "d", msg(old, "o1", "recent"))
        .await
        .unwrap();
    let epoch = s.epoch();
    assert!(!epoch.is_empty());
    let head = s.inbox_head(b).await.unwrap();
    assert_eq!(head, 8);
    let cursor = |seq| Cursor {
        epoch: epoch.clone(),
        seq,
    };
    let p = s.resume(b, Some(&cursor(5)), 100).await.unwrap();
    assert_eq!(p.head, 8);
    assert_eq!(p.resume.status, ResumeStatus::Complete);
    assert_eq!(p.resume.from, 6);
    assert!(p.resume.fetch.is_empty());
    let p = s.resume(b, None, 2).await.unwrap();
    assert_eq!(p.resume.status, ResumeStatus::New);
    assert_eq!(p.resume.from, 7);
    // busy's 5th message and old's 1st are replayed: only busy has older history.
    assert_eq!(p.resume.fetch.len(), 1);
    assert_eq!(
        (p.resume.fetch[0].conv, p.resume.fetch[0].before),
        (busy, 5)
    );
    let p = s.resume(b, None, 0).await.unwrap();
    assert_eq!(p.resume.from, 9);
    // The recently active small conversation comes first.
    let order: Vec<(u64, u64)> = p.resume.fetch.iter().map(|h| (h.conv, h.before)).collect();
    assert_eq!(
        order,
        vec![(old, 2), (busy, 6)],
        "fetch hints by recent activity"
    );
    let other = Cursor {
        epoch: format!("{epoch}x"),
        seq: 3,
    };
    let p = s.resume(b, Some(&other), 100).await.unwrap();
    assert_eq!(p.resume.status, ResumeStatus::Gap);
    assert_eq!(p.resume.reason, Some(GapReason::Epoch));
    let p = s.resume(b, Some(&cursor(9)), 100).await.unwrap();
    assert_eq!(p.resume.reason, Some(GapReason::CursorAhead));
    s.close().await;
}

/// Count retention trims the oldest entries and resumes answer a gap;
/// age retention trims entries and messages together.
pub async fn retention_by_count_and_age(f: &dyn StoreFactory) {
    let clock = TestClock::at(T0);
    let s = f.open(
        Retention {
            max_entries: Some(5),
            max_age: Some(Duration::from_secs(3600)),
            dedupe_age: None,
        },
        clock.clone(),
    );
    let [a, b] = users(&*s, &["a", "b"]).await[..] else {
        unreachable!()
    };
    let conv = group(&*s, a, "g", &["b"]).await;
    for i in 1..=8 {
        s.send(
            Actor::User(a),
            "d",
            msg(conv, &format!("{i}"), &format!("{i}")),
        )
        .await
        .unwrap();
    }
    let e = inbox(&*s, b).await;
    assert_eq!(e.len(), 5);
    assert_eq!(e[0].seq, 5);
    let cursor = Cursor {
        epoch: s.epoch(),
        seq: 2,
    };
    let p = s.resume(b, Some(&cursor), 100).await.unwrap();
    assert_eq!(p.resume.status, ResumeStatus::Gap);
    assert_eq!(p.resume.reason, Some(GapReason::Retention));
    assert_eq!(p.resume.from, 5);
    let missed = p.resume.missed.unwrap();
    assert_eq!((missed.first, missed.last), (3, 4));
    clock.advance(Duration::from_secs(7200));
    s.send(Actor::User(a), "d", msg(conv, "9", "9"))
        .await
        .unwrap();
    let r = s.trim().await.unwrap();
    assert!(r.messages >= 8, "{r:?}");
    let e = inbox(&*s, b).await;
    assert_eq!(bodies(&e), vec!["9"]);
    assert_eq!(e[0].seq, 10);
    let h = s.history(Actor::User(b), conv, None, 50).await.unwrap();
    assert_eq!(
        h.messages.len(),
        1,
        "trimmed messages are gone from history"
    );
    // Dedupe keys outlive the messages for the dedupe retention.
    let again = s
        .send(Actor::User(a), "d", msg(conv, "8", "8"))
        .await
        .unwrap();
    assert!(again.duplicate);
    s.close().await;
}

/// Read markers are clamped, only move forward, and append one entry each.
pub async fn read_markers(f: &dyn StoreFactory) {
    let s = open(f);
    let [a, b, c] = users(&*s, &["a", "b", "c"]).await[..] else {
        unreachable!()
    };
    let conv = group(&*s, a, "g", &["b"]).await;
    for i in 0..3 {
        s.send(Actor::User(a), "d", msg(conv, &format!("{i}"), "x"))
            .await
            .unwrap();
    }
    assert!(s.mark_read(b, conv, 99).await.unwrap());
    assert!(!s.mark_read(b, conv, 2).await.unwrap());
    assert!(!s.mark_read(b, conv, 3).await.unwrap());
    let reads: Vec<u64> = inbox(&*s, b)
        .await
        .into_iter()
        .filter_map(|e| match e.item {
            EntryItem::Read(r) => Some(r.up_to),
            _ => None,
        })
        .collect();
    assert_eq!(reads, vec![3], "clamped to the last message, once");
    assert!(matches!(
        s.mark_read(c, conv, 1).await,
        Err(StoreError::Refused(ErrorCode::NotMember, _))
    ));
    s.close().await;
}

/// Closing flushes; reopening keeps data, heads and the epoch; a closed
/// handle refuses work.
pub async fn reopen_keeps_everything(f: &dyn StoreFactory) {
    let s = open(f);
    let [a, b] = users(&*s, &["a", "b"]).await[..] else {
        unreachable!()
    };
    let conv = group(&*s, a, "g", &["b"]).await;
    let c = s
        .send(Actor::User(a), "d", msg(conv, "1", "kept"))
        .await
        .unwrap();
    let epoch = s.epoch();
    s.close().await;
    assert!(matches!(s.user_id("a").await, Err(e) if e.is_closed()));
    let s = open(f);
    assert_eq!(s.epoch(), epoch);
    assert_eq!(bodies(&inbox(&*s, b).await), vec!["kept"]);
    let again = s
        .send(Actor::User(a), "d", msg(conv, "1", "kept"))
        .await
        .unwrap();
    assert!(again.duplicate && again.id == c.id);
    let next = s
        .send(Actor::User(a), "d", msg(conv, "2", "new"))
        .await
        .unwrap();
    assert_eq!(next.conv_seq, 2);
    assert_eq!(next.echo_seq, Some(3), "a's inbox: member, kept, new");
    s.close().await;
}

/// API keys: shown once, checked by hash, revocable.
pub async fn api_keys(f: &dyn StoreFactory) {
    let s = open(f);
    let (id, key) = s.create_api_key("backend").await.unwrap();
    assert!(key.starts_with("kwk_"));
    assert_eq!(s.check_api_key(&key).await.unwrap(), Some(id));
    assert_eq!(s.check_api_key("kwk_forged").await.unwrap(), None);
    assert_eq!(s.list_api_keys().await.unwrap().len(), 1);
    assert!(s.revoke_api_key(id).await.unwrap());
    assert!(!s.revoke_api_key(id).await.unwrap());
    assert_eq!(s.check_api_key(&key).await.unwrap(), None);
    assert!(matches!(
        s.create_api_key("").await,
        Err(StoreError::Refused(ErrorCode::Invalid, _))
    ));
    assert!(matches!(
        s.create_user("bad name").await,
        Err(StoreError::Refused(ErrorCode::Invalid, _))
    ));
    s.create_user("x").await.unwrap();
    assert!(matches!(
        s.create_user("x").await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(s.list_tokens("x").await.unwrap().len(), 0);
    s.close().await;
}

/// Runs the whole contract suite against a backend: one `#[tokio::test]` per
/// behaviour. `$factory` is an expression building a [`StoreFactory`]; it is
/// evaluated once per test.
#[macro_export]
macro_rules! store_contract_tests {
    ($factory:expr) => {
        $crate::store_contract_tests!(@tests $factory;
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
        );
    };
    (@tests $factory:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let factory = $factory;
                $crate::store::contract::$name(&factory).await;
            }
        )*
    };
}
