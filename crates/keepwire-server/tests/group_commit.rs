//! Group commit: with 100 concurrent senders, commits <= sends / 5.

use keepwire_proto::ConvKind;
use keepwire_testkit::{http_get, metric};

use crate::support::{TestRelay, create_conv};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_senders_share_commits() {
    const SENDERS: usize = 100;
    const PER_SENDER: usize = 20;
    let relay = TestRelay::start().await;
    let mut tokens = Vec::new();
    for i in 0..SENDERS {
        tokens.push(relay.user(&format!("u{i}")).await);
    }
    let sink = relay.user("sink").await;
    let _ = sink;
    // Every sender talks to the sink user in its own direct conversation.
    let mut clients = Vec::new();
    for t in &tokens {
        let mut c = relay.connect(t, "d").await;
        let conv = create_conv(&mut c, ConvKind::Direct, &["sink"]).await;
        clients.push((c, conv.id));
    }
    let (_, before) = http_get(&relay.host_port, "/metrics").await;
    let commits_before = metric(&before, "keepwire_commits_total");
    let sends_before = metric(&before, "keepwire_sends_total");

    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(SENDERS));
    let mut tasks = Vec::new();
    for (mut c, conv) in clients {
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            // Each sender waits for its confirmation before the next send,
            // like a chat user; concurrency comes from the 100 senders.
            for i in 0..PER_SENDER {
                let cid = c.send_message(conv, &format!("{i}")).await;
                c.confirm(&cid).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (_, after) = http_get(&relay.host_port, "/metrics").await;
    let commits = metric(&after, "keepwire_commits_total") - commits_before;
    let sends = metric(&after, "keepwire_sends_total") - sends_before;
    assert_eq!(sends, (SENDERS * PER_SENDER) as u64);
    // Acks and device records also commit; they ride in the same groups.
    println!("group commit: {sends} sends in {commits} commits");
    assert!(commits * 5 <= sends, "{commits} commits for {sends} sends");
}
