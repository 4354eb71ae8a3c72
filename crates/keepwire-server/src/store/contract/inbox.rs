//! Contract: sends, inbox sequences, head notices, paging, resume,
//! retention, read markers, reopening.

use super::*;

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
