//! Contract: authentication, devices, membership, conversations, API keys.

use super::*;
use crate::store::{NewPush, PushOutcome};

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
    s.create_user("a.b@c").await.unwrap();
    assert_eq!(
        s.list_users().await.unwrap(),
        ["a.b@c", "x"],
        "every user, by name"
    );
    s.close().await;
}

fn fcm(token: &str) -> NewPush {
    NewPush {
        provider: "fcm".into(),
        key: token.as_bytes().to_vec(),
        registration: format!(r#"{{"provider":"fcm","token":"{token}"}}"#),
        previews: false,
    }
}

/// Push registrations: one per device, kept ids on refresh, moved when
/// registered elsewhere, removed with the device; mutes and own messages
/// wake nobody; push state survives a reopen.
pub async fn push_registrations_and_wake_positions(f: &dyn StoreFactory) {
    let s = open(f);
    let [a, b] = users(&*s, &["a", "b"]).await[..] else {
        unreachable!()
    };
    s.touch_device(b, "phone", None).await.unwrap();
    s.touch_device(b, "tablet", None).await.unwrap();
    let id = s
        .set_push(b, "phone", Some(fcm("t1")))
        .await
        .unwrap()
        .unwrap();
    assert!(id.starts_with("r_") && id.len() > 16, "{id}");
    let again = s.set_push(b, "phone", Some(fcm("t1"))).await.unwrap();
    assert_eq!(
        again.as_deref(),
        Some(id.as_str()),
        "a refresh keeps the id"
    );
    // The same token on the tablet moves there (a token is one device's).
    let moved = s
        .set_push(b, "tablet", Some(fcm("t1")))
        .await
        .unwrap()
        .unwrap();
    assert_ne!(moved, id);
    let t = s.push_targets(b).await.unwrap();
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].device, "tablet");
    assert_eq!(s.set_push(b, "tablet", None).await.unwrap(), None);
    assert!(s.push_targets(b).await.unwrap().is_empty());
    let id = s
        .set_push(b, "phone", Some(fcm("t2")))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(s.push_users().await.unwrap(), vec![b]);

    // What wakes the phone: messages from others, not its own, not muted.
    let conv = group(&*s, a, "g", &["b"]).await;
    let quiet = group(&*s, a, "q", &["b"]).await;
    assert_eq!(s.push_targets(b).await.unwrap()[0].wake_seq, None);
    s.send(Actor::User(b), "phone", msg(conv, "own", "mine"))
        .await
        .unwrap();
    assert_eq!(s.push_targets(b).await.unwrap()[0].wake_seq, None);
    assert!(s.mute(b, quiet, true).await.unwrap());
    assert!(!s.mute(b, quiet, true).await.unwrap());
    s.send(Actor::User(a), "d", msg(quiet, "q1", "hush"))
        .await
        .unwrap();
    assert_eq!(s.push_targets(b).await.unwrap()[0].wake_seq, None);
    let c = s
        .send(Actor::User(a), "d", msg(conv, "m1", "hi"))
        .await
        .unwrap();
    let wake = s.push_targets(b).await.unwrap()[0].wake_seq.unwrap();
    let e = s.read_inbox(b, wake, 1).await.unwrap();
    assert!(matches!(&e[0].item, EntryItem::Message(m) if m.id == c.id));
    // The mute reached b's inbox, once.
    let mutes = inbox(&*s, b)
        .await
        .into_iter()
        .filter(|e| matches!(e.item, EntryItem::Mute(_)))
        .count();
    assert_eq!(mutes, 1);
    assert!(matches!(
        s.mute(b, 999, true).await,
        Err(StoreError::Refused(ErrorCode::NoSuchConv, _))
    ));

    // Push state: attempts per position, delivery, and after an ack nothing wakes.
    s.record_push(&id, wake).await.unwrap();
    s.record_push(&id, wake).await.unwrap();
    let t = &s.push_targets(b).await.unwrap()[0];
    assert_eq!((t.pushed_seq, t.attempts, t.delivered_seq), (wake, 2, 0));
    assert!(t.pushed_at_ms.is_some());
    s.push_outcome(&id, PushOutcome::Delivered(wake))
        .await
        .unwrap();
    s.record_ack(b, "phone", wake).await.unwrap();
    let t = &s.push_targets(b).await.unwrap()[0];
    assert_eq!(
        (t.delivered_seq, t.acked_seq, t.wake_seq),
        (wake, wake, None)
    );
    let devices = s.list_devices("b").await.unwrap();
    let phone = devices.iter().find(|d| d.device == "phone").unwrap();
    let push = phone
        .push
        .as_ref()
        .expect("the phone shows its registration");
    assert_eq!(push.provider, "fcm");
    assert!(push.last_success_ms.is_some());
    let vapid = s.meta_or_init("vapid", "k1").await.unwrap();
    assert_eq!(s.meta_or_init("vapid", "k2").await.unwrap(), vapid);
    s.close().await;

    // All of it survives a restart; a dead registration is removed, and so
    // is a revoked device's.
    let s = open(f);
    assert_eq!(s.meta_or_init("vapid", "k3").await.unwrap(), "k1");
    let t = &s.push_targets(b).await.unwrap()[0];
    assert_eq!((t.reg_id.as_str(), t.pushed_seq), (id.as_str(), wake));
    s.push_outcome(&id, PushOutcome::Unregistered("gone".into()))
        .await
        .unwrap();
    assert!(s.push_targets(b).await.unwrap().is_empty());
    s.set_push(b, "phone", Some(fcm("t3"))).await.unwrap();
    s.revoke_device("b", "phone").await.unwrap();
    assert!(s.push_targets(b).await.unwrap().is_empty());
    s.close().await;
}

/// Deleting a user removes their inbox, devices, tokens, push registrations,
/// mutes and memberships (the others get a `removed` event by the system),
/// logs a revocation that closes their connections, and leaves their
/// delivered messages in the others' inboxes, attributed to a tombstone
/// name; the name is free for a new, unrelated user.
pub async fn deleting_a_user(f: &dyn StoreFactory) {
    let s = open(f);
    let [a, b, _c] = users(&*s, &["a", "b", "c"]).await[..] else {
        unreachable!()
    };
    let g = group(&*s, a, "g", &["b", "c"]).await;
    let (d, _) = s
        .conv_create(
            Actor::User(a),
            ConvCreate {
                rid: "r".into(),
                key: "d".into(),
                kind: ConvKind::Direct,
                members: vec!["b".into()],
                name: None,
            },
            1000,
        )
        .await
        .unwrap();
    s.send(Actor::User(a), "phone", msg(g, "1", "from a"))
        .await
        .unwrap();
    s.send(Actor::User(b), "laptop", msg(d.id, "2", "to a"))
        .await
        .unwrap();
    let t = s.issue_token("a", Duration::from_secs(60)).await.unwrap();
    s.touch_device(a, "phone", Some(t.id)).await.unwrap();
    s.set_push(a, "phone", Some(fcm("ta"))).await.unwrap();
    s.mute(a, g, true).await.unwrap();
    s.mark_read(a, d.id, 1).await.unwrap();
    let before = s.revocations_after(0).await.unwrap().len();

    let gone = s.delete_user("a").await.unwrap();
    assert_eq!(
        (
            gone.id,
            gone.user.as_str(),
            gone.conversations,
            gone.devices
        ),
        (a, "a", 2, 1)
    );
    assert!(matches!(
        s.authenticate(&t.token).await,
        Err(StoreError::Auth(_))
    ));
    assert_eq!(s.user_id("a").await.unwrap(), None);
    assert_eq!(s.list_users().await.unwrap(), ["b", "c"]);
    assert!(matches!(
        s.list_devices("a").await,
        Err(StoreError::NotFound(_))
    ));
    assert!(inbox(&*s, a).await.is_empty(), "the inbox is gone");
    assert!(s.push_targets(a).await.unwrap().is_empty());
    let revs = s.revocations_after(0).await.unwrap();
    assert_eq!(revs.len(), before + 1);
    let last = revs.last().unwrap();
    assert_eq!(
        (last.user_id, last.token_id, &last.device),
        (a, None, &None)
    );

    // The others keep the message and learn that `a` left, by the system.
    let tomb = crate::store::deleted_user_name(a);
    let bi = inbox(&*s, b).await;
    assert_contiguous(&bi, 1);
    assert!(bi.iter().any(|e| matches!(&e.item,
        EntryItem::Message(m) if m.body == "from a" && m.from == tomb)));
    let removed: Vec<(u64, &str, &str)> = bi
        .iter()
        .filter_map(|e| match &e.item {
            EntryItem::Member(ev) if ev.change == MemberChange::Removed => {
                Some((ev.conv.id, ev.user.as_str(), ev.by.as_str()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(removed, [(g, "a", "~system"), (d.id, "a", "~system")]);
    let convs = s.conv_list(b).await.unwrap();
    let gi = convs.iter().find(|c| c.id == g).unwrap();
    assert_eq!(gi.members, ["b", "c"]);
    let page = s.history(Actor::System, g, None, 10).await.unwrap();
    assert_eq!(page.messages[0].from, tomb);

    // The name is free again, for an unrelated user.
    let a2 = s.create_user("a").await.unwrap();
    assert_ne!(a2, a);
    assert!(s.conv_list(a2).await.unwrap().is_empty());
    assert!(inbox(&*s, a2).await.is_empty());
    assert!(matches!(
        s.delete_user("nobody").await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        s.delete_user(crate::store::SYSTEM_USER).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        s.delete_user(&tomb).await,
        Err(StoreError::NotFound(_))
    ));
    s.close().await;
}
