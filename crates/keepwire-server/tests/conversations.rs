//! Conversations: idempotent creation, membership entries, permissions, signals.

use keepwire_proto::{
    ClientFrame, ConvCreate, ConvKind, ConvMember, EntryItem, ErrorCode, HistoryRequest,
    MemberChange, ServerFrame,
};
use keepwire_testkit::bodies;

use crate::support::{TestRelay, reply, test_config};

fn create(rid: &str, key: &str, kind: ConvKind, members: &[&str]) -> ClientFrame {
    ClientFrame::ConvCreate(ConvCreate {
        rid: rid.into(),
        key: key.into(),
        kind,
        members: members.iter().map(|s| s.to_string()).collect(),
        name: Some("team".into()),
    })
}

fn error_code(f: &ServerFrame) -> ErrorCode {
    match f {
        ServerFrame::Error(e) => e.code,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creation_is_idempotent_and_membership_changes_are_inbox_entries() {
    let mut config = test_config();
    config.limits.max_group_size = 3;
    let relay = TestRelay::start_with(config, Default::default()).await;
    let ta = relay.user("alice").await;
    let tb = relay.user("bob").await;
    let tc = relay.user("carol").await;
    let td = relay.user("dave").await;
    let mut a = relay.connect(&ta, "a").await;

    a.send(&create("r1", "k1", ConvKind::Group, &["bob"])).await;
    let ServerFrame::Conv {
        conv,
        changed: true,
        ..
    } = reply(&mut a, "r1").await
    else {
        panic!()
    };
    a.send(&create("r2", "k1", ConvKind::Group, &["bob"])).await;
    let ServerFrame::Conv {
        conv: again,
        changed: false,
        ..
    } = reply(&mut a, "r2").await
    else {
        panic!()
    };
    assert_eq!(
        again.id, conv.id,
        "a retried create returns the same conversation"
    );

    // Direct conversations are unique per pair, whoever creates them.
    a.send(&create("r3", "d1", ConvKind::Direct, &["carol"]))
        .await;
    let ServerFrame::Conv { conv: direct, .. } = reply(&mut a, "r3").await else {
        panic!()
    };
    let mut c = relay.connect(&tc, "c").await;
    c.send(&create("r4", "other-key", ConvKind::Direct, &["alice"]))
        .await;
    let ServerFrame::Conv {
        conv: direct2,
        changed: false,
        ..
    } = reply(&mut c, "r4").await
    else {
        panic!()
    };
    assert_eq!(direct.id, direct2.id);

    // Unknown users, self-direct and oversized groups are refused.
    a.send(&create("r5", "k5", ConvKind::Group, &["nobody"]))
        .await;
    assert_eq!(
        error_code(&reply(&mut a, "r5").await),
        ErrorCode::UnknownUser
    );
    a.send(&create("r6", "k6", ConvKind::Direct, &["alice"]))
        .await;
    assert_eq!(error_code(&reply(&mut a, "r6").await), ErrorCode::Invalid);
    a.send(&create(
        "r7",
        "k7",
        ConvKind::Group,
        &["bob", "carol", "dave"],
    ))
    .await;
    assert_eq!(
        error_code(&reply(&mut a, "r7").await),
        ErrorCode::GroupTooLarge
    );

    // An offline member learns of the conversation before its messages.
    a.send(&ClientFrame::ConvAdd(ConvMember {
        rid: "r8".into(),
        conv: conv.id,
        user: "dave".into(),
    }))
    .await;
    let ServerFrame::Conv {
        conv: grown,
        changed: true,
        ..
    } = reply(&mut a, "r8").await
    else {
        panic!()
    };
    assert_eq!(grown.members, vec!["alice", "bob", "dave"]);
    let cid = a.send_message(conv.id, "welcome dave").await;
    a.confirm(&cid).await;
    let mut d = relay.connect(&td, "d").await;
    let entries = d.entries(2, true).await;
    match &entries[0].item {
        EntryItem::Member(m) => {
            assert_eq!(
                (m.user.as_str(), m.change, m.by.as_str()),
                ("dave", MemberChange::Added, "alice")
            );
            assert_eq!(m.conv.id, conv.id);
        }
        other => panic!("expected membership first, got {other:?}"),
    }
    assert_eq!(bodies(&entries[1..]), vec!["welcome dave"]);

    // The group is full now.
    a.send(&ClientFrame::ConvAdd(ConvMember {
        rid: "r9".into(),
        conv: conv.id,
        user: "carol".into(),
    }))
    .await;
    assert_eq!(
        error_code(&reply(&mut a, "r9").await),
        ErrorCode::GroupTooLarge
    );

    // Only the creator removes others; anyone may leave.
    let mut b = relay.connect(&tb, "b").await;
    b.send(&ClientFrame::ConvRemove(ConvMember {
        rid: "r10".into(),
        conv: conv.id,
        user: "dave".into(),
    }))
    .await;
    assert_eq!(
        error_code(&reply(&mut b, "r10").await),
        ErrorCode::Forbidden
    );
    d.send(&ClientFrame::ConvRemove(ConvMember {
        rid: "r11".into(),
        conv: conv.id,
        user: "dave".into(),
    }))
    .await;
    let ServerFrame::Conv { changed: true, .. } = reply(&mut d, "r11").await else {
        panic!()
    };
    let left = d.entry().await;
    assert!(matches!(left.item, EntryItem::Member(ref m) if m.change == MemberChange::Removed));
    // After leaving: no sends, no history, no more messages.
    let cid = d.send_message(conv.id, "still here?").await;
    assert_eq!(d.answer(&cid).await.unwrap_err().code, ErrorCode::NotMember);
    d.send(&ClientFrame::History(HistoryRequest {
        rid: "r12".into(),
        conv: conv.id,
        before: None,
        limit: None,
    }))
    .await;
    assert_eq!(
        error_code(&reply(&mut d, "r12").await),
        ErrorCode::NotMember
    );
    let cid = a.send_message(conv.id, "after dave left").await;
    a.confirm(&cid).await;
    d.barrier().await;
    assert!(d.take_queued_entries().is_empty());

    // Direct conversations have fixed members; unknown conversations say so.
    a.send(&ClientFrame::ConvAdd(ConvMember {
        rid: "r13".into(),
        conv: direct.id,
        user: "bob".into(),
    }))
    .await;
    assert_eq!(
        error_code(&reply(&mut a, "r13").await),
        ErrorCode::Forbidden
    );
    let cid = a.send_message(999_999, "void").await;
    assert_eq!(
        a.answer(&cid).await.unwrap_err().code,
        ErrorCode::NoSuchConv
    );

    // Listing.
    a.send(&ClientFrame::ConvList { rid: "r14".into() }).await;
    let ServerFrame::Convs { convs, .. } = reply(&mut a, "r14").await else {
        panic!()
    };
    let mut ids: Vec<_> = convs.iter().map(|c| c.id).collect();
    ids.sort_unstable();
    assert_eq!(ids, vec![conv.id, direct.id]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_reach_other_members_and_are_not_stored() {
    let relay = TestRelay::start().await;
    let ta = relay.user("alice").await;
    let tb = relay.user("bob").await;
    let te = relay.user("eve").await;
    let mut a = relay.connect(&ta, "a").await;
    let mut b = relay.connect(&tb, "b").await;
    let mut e = relay.connect(&te, "e").await;
    let conv = crate::support::create_conv(&mut a, ConvKind::Direct, &["bob"]).await;
    b.entry().await;
    a.send(&ClientFrame::Signal {
        conv: conv.id,
        data: serde_json::json!({"typing": true}),
    })
    .await;
    let (from, data) = b
        .recv_where(|f| match f {
            ServerFrame::Signal { from, data, .. } => Some((from.clone(), data.clone())),
            _ => None,
        })
        .await;
    assert_eq!(from, "alice");
    assert_eq!(data["typing"], true);
    // A non-member cannot signal into it.
    e.send(&ClientFrame::Signal {
        conv: conv.id,
        data: serde_json::json!(1),
    })
    .await;
    let err = e
        .recv_where(|f| match f {
            ServerFrame::Error(x) => Some(x.code),
            _ => None,
        })
        .await;
    assert_eq!(err, ErrorCode::NotMember);
    b.barrier().await;
    assert!(
        b.take_queued_entries().is_empty(),
        "signals take no inbox sequence"
    );
}

/// A client that signals and closes at once (a command-line tool, an app
/// going away): the relay finishes the signal's membership lookup after the
/// close, so the signal still reaches the members, every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_sent_just_before_closing_still_reaches_the_members() {
    let relay = TestRelay::start().await;
    let ta = relay.user("alice").await;
    let tb = relay.user("bob").await;
    let mut a = relay.connect(&ta, "a").await;
    let mut b = relay.connect(&tb, "b").await;
    let conv = crate::support::create_conv(&mut a, ConvKind::Direct, &["bob"]).await;
    b.entry().await;
    a.close().await;
    for i in 0..30 {
        let mut a = relay.connect(&ta, "a").await;
        a.send(&ClientFrame::Signal {
            conv: conv.id,
            data: serde_json::json!(i),
        })
        .await;
        a.close().await;
        let got = b
            .recv_where(|f| match f {
                ServerFrame::Signal { data, .. } => Some(data.clone()),
                _ => None,
            })
            .await;
        assert_eq!(got, serde_json::json!(i), "signal {i}");
    }
}
