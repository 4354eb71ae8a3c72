//! A repeated client id is stored once and confirmed with the original ids.

use keepwire_proto::{ConvKind, ErrorCode};
use keepwire_testkit::{bodies, new_cid};

use crate::support::{TestRelay, create_conv};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_cid_is_stored_once_and_confirmed_with_original_ids() {
    let relay = TestRelay::start().await;
    let ta = relay.user("alice").await;
    let tb = relay.user("bob").await;
    let tm = relay.user("mallory").await;
    let mut a = relay.connect(&ta, "a").await;
    let conv = create_conv(&mut a, ConvKind::Direct, &["bob"]).await;
    let cid = new_cid();
    a.send_with_cid(conv.id, "hello", &cid).await;
    let first = a.confirm(&cid).await;
    assert!(!first.duplicate);

    // Same connection, and after a reconnect (the outbox retry case).
    a.send_with_cid(conv.id, "hello", &cid).await;
    let again = a.confirm(&cid).await;
    a.close().await;
    let mut a = relay.connect(&ta, "a").await;
    a.send_with_cid(conv.id, "hello", &cid).await;
    let third = a.confirm(&cid).await;
    for c in [&again, &third] {
        assert!(c.duplicate);
        assert_eq!(
            (c.id, c.conv, c.conv_seq, c.ts),
            (first.id, first.conv, first.conv_seq, first.ts)
        );
    }

    // Same cid, different payload: an error, nothing stored.
    a.send_with_cid(conv.id, "something else", &cid).await;
    let r = a.answer(&cid).await.unwrap_err();
    assert_eq!(r.code, ErrorCode::CidConflict);
    assert!(r.retry_after_ms.is_none(), "permanent");

    // Another user's device reusing the cid gets nothing of alice's.
    let mut m = relay.connect(&tm, "a").await;
    let mconv = create_conv(&mut m, ConvKind::Direct, &["bob"]).await;
    m.send_with_cid(mconv.id, "mallory's", &cid).await;
    let mc = m.confirm(&cid).await;
    assert!(!mc.duplicate);
    assert_ne!(mc.id, first.id);

    // Bob's inbox holds alice's message once.
    let mut b = relay.connect(&tb, "b").await;
    let entries = b.entries(4, true).await; // 2 memberships + 2 messages
    let got = bodies(&entries);
    assert_eq!(got.iter().filter(|b| *b == "hello").count(), 1);
    assert_eq!(got.iter().filter(|b| *b == "mallory's").count(), 1);
    b.barrier().await;
    assert!(b.take_queued_entries().is_empty());
}
