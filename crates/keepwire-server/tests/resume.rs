//! Resume: exact replay of missed entries (also 100k of them while others
//! send), gap answers for retention and foreign epochs, and history paging.

use std::time::Duration;

use keepwire_proto::{
    ClientFrame, ConvKind, Cursor, EntryItem, GapReason, HistoryRequest, ResumeStatus, Send,
    ServerFrame,
};
use keepwire_server::RelayStore as _;
use keepwire_server::store::Retention;
use keepwire_testkit::{WsClient, assert_contiguous, bodies, wait_until};

use crate::support::{TestRelay, create_conv, reply, test_config};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_replays_exactly_the_missed_entries() {
    let relay = TestRelay::start().await;
    let ta = relay.user("alice").await;
    let tb = relay.user("bob").await;
    let mut a = relay.connect(&ta, "a").await;
    let mut b = relay.connect(&tb, "b").await;
    let conv = create_conv(&mut a, ConvKind::Direct, &["bob"]).await;
    for i in 0..5 {
        let cid = a.send_message(conv.id, &format!("before-{i}")).await;
        a.confirm(&cid).await;
    }
    let seen = b.entries(6, true).await;
    assert_contiguous(&seen, 1);
    let cursor = b.cursor(6);
    b.close().await;

    for i in 0..7 {
        let cid = a.send_message(conv.id, &format!("missed-{i}")).await;
        a.confirm(&cid).await;
    }
    let mut b = WsClient::connect(&relay.url, &tb, "b", Some(cursor))
        .await
        .unwrap();
    let w = b.welcome().clone();
    assert_eq!(w.resume.status, ResumeStatus::Complete);
    assert_eq!(w.resume.from, 7);
    assert_eq!(w.head, 13);
    let replay = b.entries(7, true).await;
    assert_contiguous(&replay, 7);
    assert_eq!(
        bodies(&replay),
        (0..7).map(|i| format!("missed-{i}")).collect::<Vec<_>>()
    );
    b.barrier().await;
    assert!(b.take_queued_entries().is_empty(), "nothing replayed twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_of_100k_entries_stays_in_order_while_others_send() {
    const BACKLOG: usize = 100_000;
    const LIVE: usize = 500;
    let relay = TestRelay::start().await;
    let ta = relay.user("alice").await;
    let _tb = relay.user("bob").await;
    let tc = relay.user("carol").await;
    let mut a = relay.connect(&ta, "a").await;
    let conv = create_conv(&mut a, ConvKind::Group, &["bob", "carol"]).await;
    let alice = relay.user_id(&ta).await;

    // Seed the backlog through the store, many sends per group commit.
    relay.seed(alice, conv.id, BACKLOG, "").await;

    // Carol resumes from just after the membership entry while alice keeps sending.
    let cursor = Cursor {
        epoch: relay.store.epoch(),
        seq: 1,
    };
    let mut carol = WsClient::connect(&relay.url, &tc, "carol", Some(cursor))
        .await
        .unwrap();
    assert_eq!(carol.welcome().resume.status, ResumeStatus::Complete);
    let sender = tokio::spawn({
        let url = relay.url.clone();
        async move {
            let mut a = WsClient::connect(&url, &ta, "a2", None).await.unwrap();
            let mut cids = Vec::new();
            for i in 0..LIVE {
                cids.push(a.send_message(conv.id, &format!("live-{i}")).await);
                if i % 50 == 49 {
                    tokio::task::yield_now().await;
                }
            }
            for cid in cids {
                a.confirm(&cid).await;
            }
        }
    });
    let entries = carol.entries(BACKLOG + LIVE, true).await;
    sender.await.unwrap();
    assert_contiguous(&entries, 2);
    let mut live_seen = Vec::new();
    let mut backlog_seen = 0usize;
    let mut last_conv_seq = 0;
    for e in &entries {
        let EntryItem::Message(m) = &e.item else {
            panic!("unexpected {e:?}")
        };
        assert!(m.conv_seq > last_conv_seq, "conversation order");
        last_conv_seq = m.conv_seq;
        if let Some(i) = m.body.strip_prefix("live-") {
            live_seen.push(i.parse::<usize>().unwrap());
        } else {
            backlog_seen += 1;
        }
    }
    assert_eq!(backlog_seen, BACKLOG);
    assert_eq!(
        live_seen,
        (0..LIVE).collect::<Vec<_>>(),
        "live sends in send order, none twice"
    );
    carol.barrier().await;
    assert!(carol.take_queued_entries().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_by_count_gives_a_gap_answer_that_history_fills() {
    let retention = Retention {
        max_entries: Some(50),
        ..Default::default()
    };
    let relay = TestRelay::start_with(test_config(), retention).await;
    let ta = relay.user("alice").await;
    let tb = relay.user("bob").await;
    let mut a = relay.connect(&ta, "a").await;
    let conv = create_conv(&mut a, ConvKind::Direct, &["bob"]).await;
    let mut cids = Vec::new();
    for i in 0..10 {
        cids.push(a.send_message(conv.id, &format!("m{i}")).await);
    }
    for cid in &cids {
        a.confirm(cid).await;
    }
    // Bob stores the membership entry and m0..m9 (inbox seq 1..=11), then goes away.
    let mut b = relay.connect(&tb, "b").await;
    b.entries(11, true).await;
    b.close().await;
    // 110 more: bob's inbox keeps only the last 50 of its 121 entries. (They
    // go through the store: alice's own connection may be told to resync as
    // her inbox is trimmed under it.)
    let alice = relay.user_id(&ta).await;
    for i in 10..120 {
        let send = Send {
            cid: format!("bulk-{i:012}"),
            conv: conv.id,
            kind: "text".into(),
            body: format!("m{i}"),
        };
        relay
            .store
            .send(keepwire_server::store::Actor::User(alice), "a", send)
            .await
            .unwrap();
    }
    let mut b = WsClient::connect(
        &relay.url,
        &tb,
        "b",
        Some(Cursor {
            epoch: relay.store.epoch(),
            seq: 11,
        }),
    )
    .await
    .unwrap();
    let r = b.welcome().resume.clone();
    assert_eq!(r.status, ResumeStatus::Gap);
    assert_eq!(r.reason, Some(GapReason::Retention));
    let head = b.welcome().head;
    assert_eq!(head, 121);
    assert_eq!(r.from, head - 49, "the oldest retained entry");
    let missed = r.missed.unwrap();
    assert_eq!((missed.first, missed.last), (12, r.from - 1));
    assert_eq!(r.fetch.len(), 1);
    let hint = r.fetch[0];
    assert_eq!(hint.conv, conv.id);
    let replay = b.entries(50, true).await;
    assert_contiguous(&replay, r.from);
    let EntryItem::Message(first_replayed) = &replay[0].item else {
        panic!()
    };
    assert_eq!(hint.before, first_replayed.conv_seq);

    // History before the hint returns exactly what the inbox no longer has.
    let mut fetched = Vec::new();
    let mut before = Some(hint.before);
    loop {
        let rid = format!("h{}", fetched.len());
        b.send(&ClientFrame::History(HistoryRequest {
            rid: rid.clone(),
            conv: conv.id,
            before,
            limit: Some(30),
        }))
        .await;
        let ServerFrame::History(page) = reply(&mut b, &rid).await else {
            panic!("history failed")
        };
        fetched.splice(0..0, page.messages.iter().cloned());
        if !page.more {
            break;
        }
        before = Some(page.messages[0].conv_seq);
    }
    assert_eq!(fetched.len() as u64, hint.before - 1);
    assert_eq!(
        fetched.iter().map(|m| m.conv_seq).collect::<Vec<_>>(),
        (1..hint.before).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_by_age_trims_and_answers_with_a_gap() {
    let mut config = test_config();
    config.trim_interval = Duration::from_millis(50);
    let retention = Retention {
        max_age: Some(Duration::from_millis(300)),
        ..Default::default()
    };
    let relay = TestRelay::start_with(config, retention).await;
    let ta = relay.user("alice").await;
    let tb = relay.user("bob").await;
    let mut a = relay.connect(&ta, "a").await;
    let conv = create_conv(&mut a, ConvKind::Direct, &["bob"]).await;
    for i in 0..5 {
        let cid = a.send_message(conv.id, &format!("old-{i}")).await;
        a.confirm(&cid).await;
    }
    // Wait until the relay's own trimmer has removed them.
    let store = relay.store.clone();
    let bob = store.authenticate(&tb).await.unwrap().id;
    wait_until(
        Duration::from_secs(10),
        "age retention to trim bob's inbox",
        || {
            let store = store.clone();
            async move { store.read_inbox(bob, 1, 10).await.unwrap().is_empty() }
        },
    )
    .await;
    let cid = a.send_message(conv.id, "new").await;
    a.confirm(&cid).await;
    let mut b = WsClient::connect(
        &relay.url,
        &tb,
        "b",
        Some(Cursor {
            epoch: relay.store.epoch(),
            seq: 1,
        }),
    )
    .await
    .unwrap();
    let r = b.welcome().resume.clone();
    assert_eq!(r.status, ResumeStatus::Gap);
    assert_eq!(r.reason, Some(GapReason::Retention));
    assert_eq!(r.from, 7);
    let e = b.entry().await;
    assert_eq!(bodies(&[e]), vec!["new"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cursor_from_another_epoch_or_ahead_gets_a_gap() {
    let relay = TestRelay::start().await;
    let ta = relay.user("alice").await;
    let tb = relay.user("bob").await;
    let mut a = relay.connect(&ta, "a").await;
    let conv = create_conv(&mut a, ConvKind::Direct, &["bob"]).await;
    for i in 0..3 {
        let cid = a.send_message(conv.id, &format!("m{i}")).await;
        a.confirm(&cid).await;
    }
    let mut b = WsClient::connect(
        &relay.url,
        &tb,
        "b",
        Some(Cursor {
            epoch: "0123456789abcdef".into(),
            seq: 2,
        }),
    )
    .await
    .unwrap();
    let r = b.welcome().resume.clone();
    assert_eq!(r.status, ResumeStatus::Gap);
    assert_eq!(r.reason, Some(GapReason::Epoch));
    assert_eq!(r.from, 1, "replays the recent window of the new epoch");
    assert_eq!(r.fetch.len(), 0, "the window covers all history here");
    b.entries(4, true).await;
    b.close().await;

    let b = WsClient::connect(
        &relay.url,
        &tb,
        "b",
        Some(Cursor {
            epoch: relay.store.epoch(),
            seq: 99,
        }),
    )
    .await
    .unwrap();
    assert_eq!(b.welcome().resume.reason, Some(GapReason::CursorAhead));
    b.close().await;

    // A new device with a small window gets fetch hints for older history.
    let mut nb = WsClient::open(&relay.url).await.unwrap();
    nb.send(&ClientFrame::Hello(keepwire_proto::Hello {
        token: tb.clone(),
        device: "b-new".into(),
        cursor: None,
        heartbeat_ms: None,
        history: Some(2),
        agent: None,
        generation: None,
        transient: false,
        window: None,
    }))
    .await;
    let w = nb
        .recv_where(|f| match f {
            ServerFrame::Welcome(w) => Some(w.clone()),
            _ => None,
        })
        .await;
    assert_eq!(w.resume.status, ResumeStatus::New);
    assert_eq!(w.resume.from, 3);
    assert_eq!(
        w.resume.fetch,
        vec![keepwire_proto::FetchHint {
            conv: conv.id,
            before: 2
        }]
    );
}
