//! Send → confirm → delivery to every member device, in order, gap-free.

use keepwire_proto::{ClientFrame, ConvKind, EntryItem, MemberChange};
use keepwire_testkit::{assert_contiguous, bodies};

use crate::support::{TestRelay, create_conv};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_confirm_and_deliver_to_every_member_device_in_order() {
    let relay = TestRelay::start().await;
    let ta = relay.user("alice").await;
    let tb = relay.user("bob").await;
    let tc = relay.user("carol").await;
    let mut a1 = relay.connect(&ta, "alice-phone").await;
    let mut a2 = relay.connect(&ta, "alice-laptop").await;
    let mut b = relay.connect(&tb, "bob-phone").await;
    let mut c = relay.connect(&tc, "carol-phone").await;

    let conv = create_conv(&mut a1, ConvKind::Group, &["bob", "carol"]).await;
    assert_eq!(conv.members, vec!["alice", "bob", "carol"]);

    // Everyone (and alice's other device) learns of the conversation first.
    for client in [&mut a1, &mut a2, &mut b, &mut c] {
        let e = client.entry().await;
        assert_eq!(e.seq, 1);
        match e.item {
            EntryItem::Member(m) => {
                assert_eq!(m.change, MemberChange::Added);
                assert_eq!(m.conv.id, conv.id);
            }
            other => panic!("expected a membership entry, got {other:?}"),
        }
    }

    // Interleaved senders: 30 messages from three devices.
    let mut cids = Vec::new();
    for i in 0..10 {
        cids.push((0, a1.send_message(conv.id, &format!("a1-{i}")).await));
        cids.push((1, b.send_message(conv.id, &format!("b-{i}")).await));
        cids.push((2, a2.send_message(conv.id, &format!("a2-{i}")).await));
    }
    let mut conv_seqs = Vec::new();
    for (who, cid) in &cids {
        let client = match who {
            0 => &mut a1,
            1 => &mut b,
            _ => &mut a2,
        };
        let confirm = client.confirm(cid).await;
        assert!(!confirm.duplicate);
        assert_eq!(confirm.conv, conv.id);
        conv_seqs.push(confirm.conv_seq);
    }
    conv_seqs.sort_unstable();
    assert_eq!(
        conv_seqs,
        (1..=30).collect::<Vec<u64>>(),
        "conversation sequence is gap-free"
    );

    // Every device of every member gets all 30, in conversation order, with
    // gap-free inbox sequences.
    let mut reference: Option<Vec<String>> = None;
    for client in [&mut a1, &mut a2, &mut b, &mut c] {
        let entries = client.entries(30, true).await;
        assert_contiguous(&entries, 2);
        let mut last = 0;
        for e in &entries {
            let EntryItem::Message(m) = &e.item else {
                panic!("expected a message")
            };
            assert!(m.conv_seq > last, "conversation order");
            last = m.conv_seq;
        }
        let got = bodies(&entries);
        match &reference {
            None => reference = Some(got),
            Some(r) => assert_eq!(&got, r, "every device sees the same order"),
        }
    }
    // Per sender, messages appear in send order.
    let r = reference.unwrap();
    for prefix in ["a1-", "b-", "a2-"] {
        let mine: Vec<_> = r
            .iter()
            .filter(|b| b.starts_with(prefix))
            .cloned()
            .collect();
        let want: Vec<_> = (0..10).map(|i| format!("{prefix}{i}")).collect();
        assert_eq!(mine, want);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sender_echo_carries_cid_and_credit_window_bounds_delivery() {
    let mut config = crate::support::test_config();
    config.limits.window = 10;
    let relay = TestRelay::start_with(config, Default::default()).await;
    let ta = relay.user("alice").await;
    let tb = relay.user("bob").await;
    let mut a = relay.connect(&ta, "a").await;
    let conv = create_conv(&mut a, ConvKind::Direct, &["bob"]).await;
    let mut cids = Vec::new();
    for i in 0..30 {
        cids.push(a.send_message(conv.id, &format!("m{i}")).await);
    }
    for cid in &cids {
        a.confirm(cid).await;
    }
    // Bob connects and does not acknowledge: exactly `window` entries arrive.
    let mut b = relay.connect(&tb, "b").await;
    let first = b.entries(10, false).await;
    assert_contiguous(&first, 1);
    b.barrier().await;
    assert!(
        b.take_queued_entries().is_empty(),
        "nothing beyond the credit window"
    );
    // Acknowledging opens the window again.
    b.send(&ClientFrame::Ack { seq: 10 }).await;
    let next = b.entries(10, false).await;
    assert_contiguous(&next, 11);
    b.send(&ClientFrame::Ack { seq: 20 }).await;
    let rest = b.entries(11, true).await;
    assert_contiguous(&rest, 21);
    // The echo to the sender carries the cid.
    let echo = a.entries(31, true).await;
    let echoed: Vec<_> = echo
        .iter()
        .filter_map(|e| match &e.item {
            EntryItem::Message(m) => Some(m.cid.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(echoed, cids);
}
