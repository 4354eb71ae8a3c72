//! PostgreSQL and NATS failing under a relay's traffic (issue #18): a
//! restart, a crash or a failover of the engines costs clients retries and
//! latency, never a lost, duplicated or reordered message, and never a
//! silently reused sequence.
//!
//! Each test crashes engines of its own (`keepwire_testkit::engines`: a
//! PostgreSQL cluster in a temporary directory, a `nats-server`, each on a
//! free port), never the shared ones. Skipped, loudly, where they cannot run
//! (not root, no PostgreSQL 15 programs, no `nats-server`) and with
//! `KEEPWIRE_SKIP_POSTGRES=1`.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use keepwire_proto::{
    ClientFrame, Confirm, ConvKind, Cursor, EntryItem, ErrorCode, GapReason, Hello, InboxEntry,
    ResumeStatus, ServerFrame,
};
use keepwire_testkit::engines::{CommitCutter, OwnNats, OwnPostgres};
use keepwire_testkit::relay::create_conv;
use keepwire_testkit::{Incoming, RelayProcess, WsClient, new_cid, wait_until};
use tokio::time::Instant;

use crate::postgres::{TestDb, add_user, skipped};
use crate::{FAST, bin};

/// Sends a client keeps unconfirmed at most (the relay allows 64).
const WINDOW: usize = 32;

/// Whether the test must be skipped (said loudly): PostgreSQL tests are
/// off, or this machine cannot run an own PostgreSQL (`pg`) or NATS (`nats`).
fn cannot_run(pg: bool, nats: bool) -> bool {
    if skipped() {
        return true;
    }
    let why = pg
        .then(OwnPostgres::unavailable)
        .flatten()
        .or_else(|| nats.then(OwnNats::unavailable).flatten());
    match why {
        Some(why) => {
            eprintln!("!!! {why}: SKIPPING a PostgreSQL/NATS crash test (nothing was checked) !!!");
            true
        }
        None => false,
    }
}

/// One user's device sending like a client with a durable outbox: every
/// message has its cid from the start; up to [`WINDOW`] sends are pipelined;
/// after a temporary rejection it pauses for `retry_after_ms` and resends
/// from the first rejected send; after every reconnection it resends every
/// unconfirmed send, in order, with the same cid.
struct Outbox {
    url: String,
    token: String,
    device: String,
    conv: u64,
    /// (cid, body) in send order.
    msgs: Vec<(String, String)>,
    /// Each send's first confirmation.
    confirmed: Vec<Option<Confirm>>,
    /// A new send is released every `pace` (resends are not paced), so the
    /// traffic spans the faults.
    pace: Duration,
    /// Sends confirmed so far.
    progress: Arc<AtomicUsize>,
    rejections: usize,
    connections: usize,
    duplicates: usize,
}

impl Outbox {
    fn new(url: &str, token: &str, device: &str, conv: u64, n: usize, pace: Duration) -> Outbox {
        let tag = new_cid()[..8].to_owned();
        Outbox {
            url: url.to_owned(),
            token: token.to_owned(),
            device: device.to_owned(),
            conv,
            msgs: (0..n)
                .map(|i| (format!("{tag}{i:0>24}"), format!("m{i}")))
                .collect(),
            confirmed: vec![None; n],
            pace,
            progress: Arc::default(),
            rejections: 0,
            connections: 0,
            duplicates: 0,
        }
    }

    fn done(&self) -> usize {
        self.progress.load(Ordering::SeqCst)
    }

    fn record(&mut self, i: usize, c: Confirm) {
        match &self.confirmed[i] {
            Some(first) => assert_eq!(
                (first.id, first.conv_seq),
                (c.id, c.conv_seq),
                "two answers for {} name different messages",
                c.cid
            ),
            None => {
                // Confirmed as a duplicate the first time we hear of it: the
                // send whose answer was lost (an unknown commit outcome, a
                // closed connection) had been stored.
                self.duplicates += usize::from(c.duplicate);
                self.confirmed[i] = Some(c);
                self.progress.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    /// Sends until every message is confirmed (or panics after `within`).
    async fn run(mut self, within: Duration) -> Outbox {
        let n = self.msgs.len();
        let started = Instant::now();
        let deadline = started + within;
        while self.done() < n {
            assert!(
                Instant::now() < deadline,
                "{} of {n} sends confirmed after {within:?}",
                self.done()
            );
            let mut c = match WsClient::connect(&self.url, &self.token, &self.device, None).await {
                Ok(c) => c,
                Err(_) => {
                    // The relay could not open the session (its store is down).
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            self.connections += 1;
            // After every welcome: every unconfirmed send again, in order.
            let mut next = 0;
            let mut in_flight: VecDeque<usize> = VecDeque::new();
            let mut paused_until: Option<Instant> = None;
            while self.done() < n {
                if paused_until.is_some_and(|p| in_flight.is_empty() && Instant::now() >= p) {
                    // Everything before the first rejected send is
                    // confirmed: resume from it.
                    paused_until = None;
                    next = 0;
                }
                let released =
                    (started.elapsed().as_millis() / self.pace.as_millis().max(1)) as usize + 1;
                while paused_until.is_none() && in_flight.len() < WINDOW && next < released.min(n) {
                    if self.confirmed[next].is_none() {
                        let (cid, body) = &self.msgs[next];
                        c.send_with_cid(self.conv, body, cid).await;
                        in_flight.push_back(next);
                    }
                    next += 1;
                }
                match c.recv_wire(Duration::from_millis(10)).await {
                    None => {}
                    Some(Incoming::Closed(_)) => break,
                    Some(Incoming::Frame(ServerFrame::Confirm(cf))) => {
                        let i = in_flight.pop_front().expect("a confirm without a send");
                        assert_eq!(cf.cid, self.msgs[i].0, "answers come in send order");
                        self.record(i, cf);
                    }
                    Some(Incoming::Frame(ServerFrame::Rejected(r))) => {
                        let i = in_flight.pop_front().expect("a rejection without a send");
                        assert_eq!(r.cid, self.msgs[i].0, "answers come in send order");
                        assert!(
                            matches!(r.code, ErrorCode::Internal | ErrorCode::RateLimited),
                            "a permanent rejection: {r:?}"
                        );
                        self.rejections += 1;
                        let wait = Duration::from_millis(r.retry_after_ms.unwrap_or(1000));
                        paused_until.get_or_insert(Instant::now() + wait);
                    }
                    // Its own messages' echoes.
                    Some(Incoming::Frame(ServerFrame::Entry(e))) => {
                        c.send(&ClientFrame::Ack { seq: e.seq }).await;
                    }
                    Some(Incoming::Frame(_)) => {}
                }
            }
        }
        self
    }
}

/// A device that stays connected: it reconnects whenever its connection
/// closes, resuming from its cursor (the last entry it got: entries come
/// gap-free, so that is the last it has). Collects the entries until
/// `messages` messages came; `count` follows the messages received.
async fn receive(
    url: String,
    token: String,
    device: &'static str,
    messages: usize,
    count: Arc<AtomicUsize>,
    within: Duration,
) -> (Vec<InboxEntry>, usize) {
    let deadline = Instant::now() + within;
    let mut got: Vec<InboxEntry> = Vec::new();
    let mut epoch: Option<String> = None;
    let mut connections = 0;
    loop {
        assert!(
            Instant::now() < deadline,
            "{} of {messages} messages received after {within:?}",
            count.load(Ordering::SeqCst)
        );
        let cursor = epoch.clone().map(|epoch| Cursor {
            epoch,
            seq: got.len() as u64,
        });
        let Ok(mut c) = WsClient::connect(&url, &token, device, cursor).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        connections += 1;
        let w = c.welcome().clone();
        match &epoch {
            None => epoch = Some(w.epoch.clone()),
            Some(e) => {
                assert_eq!(&w.epoch, e, "a restart of the engines keeps the epoch");
                assert_eq!(w.resume.status, ResumeStatus::Complete, "{:?}", w.resume);
            }
        }
        assert_eq!(w.resume.from, got.len() as u64 + 1, "{:?}", w.resume);
        loop {
            if count.load(Ordering::SeqCst) >= messages {
                let seq = got.len() as u64;
                c.send(&ClientFrame::Ack { seq }).await;
                c.close().await;
                return (got, connections);
            }
            match c.recv_wire(Duration::from_millis(200)).await {
                None => assert!(
                    Instant::now() < deadline,
                    "{} of {messages} messages received after {within:?}",
                    count.load(Ordering::SeqCst)
                ),
                Some(Incoming::Closed(_)) => break,
                Some(Incoming::Frame(ServerFrame::Entry(e))) => {
                    assert_eq!(e.seq, got.len() as u64 + 1, "an entry out of sequence");
                    if matches!(e.item, EntryItem::Message(_)) {
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                    got.push(e);
                    if got.len().is_multiple_of(8) {
                        let seq = got.len() as u64;
                        c.send(&ClientFrame::Ack { seq }).await;
                    }
                }
                Some(Incoming::Frame(_)) => {}
            }
        }
    }
}

/// The messages of entries: (seq, message id, cid, body).
fn messages(entries: &[InboxEntry]) -> Vec<(u64, u64, String, String)> {
    entries
        .iter()
        .filter_map(|e| match &e.item {
            EntryItem::Message(m) => Some((e.seq, m.id, m.cid.clone(), m.body.clone())),
            _ => None,
        })
        .collect()
}

/// Everything in `user`'s inbox now, through a new device of theirs.
async fn replay(url: &str, token: &str) -> Vec<InboxEntry> {
    let device = format!("replay-{}", &new_cid()[..8]);
    let mut c = WsClient::connect(url, token, &device, None)
        .await
        .expect("a new device connects");
    let head = c.welcome().head as usize;
    assert_eq!(c.welcome().resume.from, 1, "the whole inbox is replayed");
    let entries = c.entries(head, true).await;
    c.close().await;
    entries
}

/// The invariants after the faults: the receiver got every message once,
/// in send order, on gap-free sequences; a new device of the receiver's
/// gets exactly what it got live (each sequence names one message, and
/// nothing was added later, such as a second copy); the sender's own inbox
/// holds each message once, in order, at the sequence its confirm named.
async fn check(url: &str, outbox: &Outbox, live: &[InboxEntry], sender_token: &str, rtoken: &str) {
    let n = outbox.msgs.len();
    let sent: Vec<(String, String)> = outbox.msgs.clone();
    let ids: HashMap<&str, u64> = outbox
        .confirmed
        .iter()
        .map(|c| {
            let c = c.as_ref().expect("every send confirmed");
            (c.cid.as_str(), c.id)
        })
        .collect();
    let got = messages(live);
    let got_order: Vec<(String, String)> = got
        .iter()
        .map(|(_, _, cid, body)| (cid.clone(), body.clone()))
        .collect();
    let bodies = |v: &[(String, String)]| v.iter().map(|m| m.1.clone()).collect::<Vec<_>>();
    if let Some(i) = (0..n.min(got_order.len())).find(|&i| got_order[i] != sent[i]) {
        let around = i.saturating_sub(3)..(i + 12).min(got_order.len());
        panic!(
            "not in send order from the {i}th message: received {:?}",
            bodies(&got_order[around])
        );
    }
    assert_eq!(got_order.len(), n, "every message once");
    for (_, id, cid, _) in &got {
        assert_eq!(ids[cid.as_str()], *id, "{cid}: the confirmed message");
    }
    let after = replay(url, rtoken).await;
    assert_eq!(
        after.len(),
        live.len(),
        "the receiver's inbox grew after every message had come"
    );
    for (l, a) in live.iter().zip(&after) {
        assert_eq!(l, a, "sequence {} names another entry now", l.seq);
    }
    let own = replay(url, sender_token).await;
    let own_msgs = messages(&own);
    let own_order: Vec<(String, String)> = own_msgs
        .iter()
        .map(|(_, _, cid, body)| (cid.clone(), body.clone()))
        .collect();
    assert!(
        own_order == sent,
        "the sender's own copies, once each, in order: {:?}",
        bodies(&own_order)
    );
    let own_seq: HashMap<&str, u64> = own_msgs
        .iter()
        .map(|(seq, _, cid, _)| (cid.as_str(), *seq))
        .collect();
    for c in outbox.confirmed.iter().flatten() {
        if let Some(echo) = c.echo_seq {
            assert_eq!(own_seq[c.cid.as_str()], echo, "{}: its echo_seq", c.cid);
        }
    }
}

/// Waits until `counter` reaches `at`.
/// A direct conversation of alice (`ta`) with bob, created through `url`.
async fn direct_conv(url: &str, ta: &str) -> u64 {
    let mut a = WsClient::connect(url, ta, "setup", None).await.unwrap();
    let conv = create_conv(&mut a, ConvKind::Direct, &["bob"]).await.id;
    a.close().await;
    conv
}

/// Traffic of `n` messages: alice's outbox sends through `send_url`, bob's
/// device "b" receives through `recv_url`, each within `within`.
struct Traffic {
    sender: tokio::task::JoinHandle<Outbox>,
    receiver: tokio::task::JoinHandle<(Vec<InboxEntry>, usize)>,
    /// Sends confirmed so far.
    progress: Arc<AtomicUsize>,
    /// Messages received so far.
    received: Arc<AtomicUsize>,
}

impl Traffic {
    fn start(
        send_url: &str,
        ta: &str,
        recv_url: &str,
        tb: &str,
        conv: u64,
        n: usize,
        within: Duration,
    ) -> Traffic {
        let received = Arc::new(AtomicUsize::new(0));
        let receiver = tokio::spawn(receive(
            recv_url.to_owned(),
            tb.to_owned(),
            "b",
            n,
            received.clone(),
            within,
        ));
        let outbox = Outbox::new(send_url, ta, "a", conv, n, Duration::from_millis(25));
        let progress = outbox.progress.clone();
        let sender = tokio::spawn(outbox.run(within));
        Traffic {
            sender,
            receiver,
            progress,
            received,
        }
    }
}

async fn reached(counter: &Arc<AtomicUsize>, at: usize, what: &str) {
    let c = counter.clone();
    wait_until(Duration::from_secs(60), what, move || {
        let c = c.clone();
        async move { c.load(Ordering::SeqCst) >= at }
    })
    .await;
}

/// A relay on a PostgreSQL that crashes (`-m immediate`) three times under
/// a steady stream of pipelined sends, each time back after about a
/// second: the sender sees rejections and reconnections and resends by cid;
/// the receiver, connected throughout and resuming from its cursor after
/// every close, gets every message once, in send order, gap-free; the
/// sequences name the same messages after the crashes as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_crash_costs_retries_never_a_message() {
    if cannot_run(true, false) {
        return;
    }
    let t0 = std::time::Instant::now();
    let mut pg = OwnPostgres::start();
    let url = pg.url("postgres");
    let (ta, tb) = (add_user(&url, "alice"), add_user(&url, "bob"));
    let relay = RelayProcess::start_store(&bin(), &url, FAST);
    let conv = direct_conv(&relay.url, &ta).await;
    const N: usize = 300;
    let Traffic {
        sender,
        receiver,
        progress,
        ..
    } = Traffic::start(
        &relay.url,
        &ta,
        &relay.url,
        &tb,
        conv,
        N,
        Duration::from_secs(90),
    );
    for at in [60, 140, 220] {
        reached(&progress, at, "sends confirmed before a crash").await;
        tokio::task::block_in_place(|| pg.crash());
        // The outage (what is checked does not depend on its length).
        tokio::time::sleep(Duration::from_secs(1)).await;
        tokio::task::block_in_place(|| pg.start_again());
    }
    let outbox = sender.await.expect("the sender");
    let (live, connections) = receiver.await.expect("the receiver");
    eprintln!(
        "sender: {} rejections, {} connections, {} first answered as duplicates; \
         receiver: {connections} connections; {:?}",
        outbox.rejections,
        outbox.connections,
        outbox.duplicates,
        t0.elapsed()
    );
    assert!(
        outbox.rejections + outbox.connections > 1,
        "the crashes cost the sender nothing: were they during the traffic?"
    );
    check(&relay.url, &outbox, &live, &ta, &tb).await;
}

/// Sends `bodies` through `c` one after the other, each confirmed.
async fn send_all(c: &mut WsClient, conv: u64, bodies: &[&str]) {
    for body in bodies {
        let cid = c.send_message(conv, body).await;
        assert!(!c.confirm(&cid).await.duplicate);
    }
}

/// A send whose commit went through while its answer was lost (the
/// connection to PostgreSQL broke after the COMMIT left): the relay answers
/// `internal` (it cannot know), the resend is a duplicate, and the receiver
/// on the same relay, with no bus and no other traffic, still gets the
/// message once: the relay re-reads the heads that transaction touched once
/// the database answers again (nothing else would announce it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_answer_was_lost_still_reaches_the_receiver() {
    if cannot_run(true, false) {
        return;
    }
    let pg = OwnPostgres::start();
    let url = pg.url("postgres");
    let (ta, tb) = (add_user(&url, "alice"), add_user(&url, "bob"));
    let cutter = CommitCutter::start(pg.port()).await;
    let relay = RelayProcess::start_store(
        &bin(),
        &format!("postgres://postgres@127.0.0.1:{}/postgres", cutter.port()),
        FAST,
    );
    let mut a = WsClient::connect(&relay.url, &ta, "a", None).await.unwrap();
    let conv = create_conv(&mut a, ConvKind::Direct, &["bob"]).await.id;
    let mut b = WsClient::connect(&relay.url, &tb, "b", None).await.unwrap();
    b.entries(1, true).await;

    let cid = new_cid();
    cutter.arm(&cid);
    a.send_with_cid(conv, "lost answer", &cid).await;
    let r = a.answer(&cid).await.expect_err("the answer was lost");
    assert_eq!(r.code, ErrorCode::Internal, "{r:?}");
    assert_eq!(cutter.cuts(), 1);
    // Nobody sends anything else: the receiver gets it all the same.
    let e = b.entry().await;
    let EntryItem::Message(m) = &e.item else {
        panic!("not a message: {e:?}")
    };
    assert_eq!((e.seq, m.cid.as_str()), (2, cid.as_str()));
    // The outbox's resend: stored once.
    a.send_with_cid(conv, "lost answer", &cid).await;
    let c = a.confirm(&cid).await;
    assert!(c.duplicate);
    assert_eq!(c.id, m.id);
    send_all(&mut a, conv, &["next"]).await;
    let e = b.entry().await;
    assert_eq!(e.seq, 3, "no second copy: {e:?}");
    assert_eq!(messages(&[e])[0].3, "next");
}

/// `keepwire serve` flags for a node of a cluster on the bus at `nats`.
fn node_args(nats: &str, prefix: &str) -> Vec<String> {
    let mut args: Vec<String> = FAST.iter().map(|s| s.to_string()).collect();
    args.extend(["--bus", nats, "--bus-prefix", prefix].map(str::to_owned));
    args
}

/// Starts a relay node on `store` with `args`.
fn node(store: &str, args: &[String]) -> RelayProcess {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    RelayProcess::start_store(&bin(), store, &args)
}

/// Two relay nodes on one PostgreSQL with a NATS bus; a receiver on node B
/// stays connected while PostgreSQL crashes and restarts under the
/// sender's traffic on node A: the messages committed through A after the
/// restart reach B (node B's store reconnects, and what no hint announced,
/// such as a commit whose answer was lost, it finds by re-reading its
/// users' heads), each once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_postgres_restart_the_relay_rereads_heads() {
    if cannot_run(true, true) {
        return;
    }
    let t0 = std::time::Instant::now();
    let mut pg = OwnPostgres::start();
    let nats = OwnNats::start();
    let url = pg.url("postgres");
    let (ta, tb) = (add_user(&url, "alice"), add_user(&url, "bob"));
    let args = node_args(&nats.url(), "kwpgcrash");
    let (node_a, node_b) = (node(&url, &args), node(&url, &args));
    let conv = direct_conv(&node_a.url, &ta).await;
    const N: usize = 120;
    let Traffic {
        sender,
        receiver,
        progress,
        ..
    } = Traffic::start(
        &node_a.url,
        &ta,
        &node_b.url,
        &tb,
        conv,
        N,
        Duration::from_secs(60),
    );
    reached(&progress, 40, "sends confirmed before the crash").await;
    tokio::task::block_in_place(|| pg.crash());
    tokio::time::sleep(Duration::from_secs(1)).await;
    tokio::task::block_in_place(|| pg.start_again());
    let confirmed_at_restart = progress.load(Ordering::SeqCst);
    assert!(
        confirmed_at_restart < N,
        "nothing left to send after the restart"
    );
    let outbox = sender.await.expect("the sender");
    let (live, connections) = receiver.await.expect("the receiver");
    eprintln!(
        "{} sends confirmed after the restart; sender: {} rejections, {} connections; \
         receiver on node B: {connections} connections; {:?}",
        N - confirmed_at_restart,
        outbox.rejections,
        outbox.connections,
        t0.elapsed()
    );
    check(&node_b.url, &outbox, &live, &ta, &tb).await;
}

/// Two relay nodes on the shared PostgreSQL (a database of the test's own)
/// with a NATS server of the test's own: NATS is killed (`kill -9`) under
/// the traffic from node A to a receiver on node B. Messages keep arriving
/// while it is down (node B re-reads its users' heads on a timer), NATS
/// comes back on its port, the traffic goes on, and nothing is lost,
/// duplicated or reordered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_costs_latency_never_a_message() {
    if cannot_run(false, true) {
        return;
    }
    let t0 = std::time::Instant::now();
    let db = TestDb::create();
    let mut nats = OwnNats::start();
    let (ta, tb) = (add_user(&db.url, "alice"), add_user(&db.url, "bob"));
    let args = node_args(&nats.url(), "kwnatscrash");
    let (node_a, node_b) = (node(&db.url, &args), node(&db.url, &args));
    let conv = direct_conv(&node_a.url, &ta).await;
    const N: usize = 240;
    let Traffic {
        sender,
        receiver,
        progress,
        received,
    } = Traffic::start(
        &node_a.url,
        &ta,
        &node_b.url,
        &tb,
        conv,
        N,
        Duration::from_secs(60),
    );
    reached(&progress, 60, "sends confirmed before NATS dies").await;
    nats.kill();
    let killed_at = std::time::Instant::now();
    // More than a window of sends after the kill: messages committed while
    // no hint can travel reach node B all the same.
    let at_kill = progress.load(Ordering::SeqCst);
    reached(
        &received,
        at_kill + WINDOW + 40,
        "messages delivered on node B while NATS is down",
    )
    .await;
    let down = killed_at.elapsed();
    tokio::task::block_in_place(|| nats.start_again());
    assert!(
        progress.load(Ordering::SeqCst) < N,
        "nothing left to send after NATS came back"
    );
    let outbox = sender.await.expect("the sender");
    let (live, connections) = receiver.await.expect("the receiver");
    eprintln!(
        "NATS down for {down:?}; sender: {} rejections, {} connections; \
         receiver on node B: {connections} connections; {:?}",
        outbox.rejections,
        outbox.connections,
        t0.elapsed()
    );
    assert_eq!(outbox.rejections, 0, "NATS down costs no rejection");
    check(&node_b.url, &outbox, &live, &ta, &tb).await;
}

/// An asynchronous failover: the standby did not get the primary's last
/// commits, so after its promotion the same inbox sequences get other
/// messages. The epoch carries PostgreSQL's timeline: the relay still
/// running on the old primary's address refuses to go on, a new relay
/// there has a new epoch, and a device resuming with its old cursor gets a
/// `gap` (`epoch`) instead of silently missing the reused sequences.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_asynchronous_failover_changes_the_epoch() {
    if cannot_run(true, false) {
        return;
    }
    let t0 = std::time::Instant::now();
    let mut primary = OwnPostgres::start();
    let url = primary.url("postgres");
    let (ta, tb) = (add_user(&url, "alice"), add_user(&url, "bob"));
    let mut standby = tokio::task::block_in_place(|| primary.standby());
    let old = RelayProcess::start_store(&bin(), &url, FAST);
    let mut a = WsClient::connect(&old.url, &ta, "a", None).await.unwrap();
    let conv = create_conv(&mut a, ConvKind::Direct, &["bob"]).await.id;
    let mut b = WsClient::connect(&old.url, &tb, "b", None).await.unwrap();
    let old_epoch = b.welcome().epoch.clone();
    let (db_id, timeline) = old_epoch.split_once('-').expect("id-timeline");
    assert_eq!(
        timeline, "1",
        "the epoch ends with the timeline: {old_epoch}"
    );

    send_all(&mut a, conv, &["m0", "m1", "m2", "m3", "m4"]).await;
    let lsn = primary
        .psql("postgres", "SELECT pg_current_wal_lsn()")
        .unwrap();
    tokio::task::block_in_place(|| {
        standby.wait_for(
            "postgres",
            &format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn"),
            "t",
            Duration::from_secs(30),
        )
    });
    // The standby falls behind: what follows is committed on the primary
    // only (asynchronous replication loses it in a failover).
    tokio::task::block_in_place(|| standby.stop());
    send_all(&mut a, conv, &["m5", "m6", "m7", "m8", "m9"]).await;
    let before = b.entries(11, true).await;
    assert_eq!(messages(&before).len(), 10);
    let cursor = b.cursor(11);

    // The primary dies; the standby is promoted and takes its address.
    tokio::task::block_in_place(|| {
        primary.crash();
        standby.start_again();
        standby.promote();
        standby.wait_for(
            "postgres",
            "SELECT pg_is_in_recovery()",
            "f",
            Duration::from_secs(30),
        );
        standby.stop();
        standby.set_port(primary.port());
        standby.start_again();
    });

    // The relay that ran on the old primary stores nothing more: it sees
    // the new timeline on its first new connection.
    let cid = new_cid();
    let mut refusals = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while refusals < 3 {
        assert!(
            Instant::now() < deadline,
            "the old relay neither stored nor refused"
        );
        match WsClient::connect(&old.url, &ta, "a", None).await {
            Err(code) => {
                assert_eq!(code, Some(1011), "the old relay's close");
                refusals += 1;
            }
            Ok(mut c) => {
                c.send_with_cid(conv, "after the failover", &cid).await;
                loop {
                    match c.recv_wire(Duration::from_secs(20)).await {
                        Some(Incoming::Frame(ServerFrame::Confirm(cf))) => {
                            panic!("the old relay stored a message after the failover: {cf:?}")
                        }
                        Some(Incoming::Frame(ServerFrame::Rejected(r))) => {
                            assert_eq!(r.code, ErrorCode::Internal, "{r:?}");
                            refusals += 1;
                            break;
                        }
                        Some(Incoming::Frame(_)) => {}
                        Some(Incoming::Closed(_)) => {
                            refusals += 1;
                            break;
                        }
                        None => panic!("the old relay did not answer"),
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A relay started on the promoted server: same database, new timeline.
    let new = RelayProcess::start_store(&bin(), &url, FAST);
    let mut b2 = WsClient::connect(&new.url, &tb, "b", Some(cursor))
        .await
        .expect("welcome");
    let w = b2.welcome().clone();
    assert_eq!(w.epoch, format!("{db_id}-2"), "the new timeline's epoch");
    assert_eq!(w.resume.status, ResumeStatus::Gap, "{:?}", w.resume);
    assert_eq!(w.resume.reason, Some(GapReason::Epoch), "{:?}", w.resume);
    assert_eq!(
        w.head, 6,
        "the last five commits were lost with the primary"
    );
    let mut a2 = WsClient::connect(&new.url, &ta, "a", None).await.unwrap();
    send_all(&mut a2, conv, &["n0"]).await;
    let now = b2.entries(7, true).await;
    // Sequence 7 named m5 in the old epoch and names n0 in the new one:
    // only the epoch tells the device apart.
    let old7 = messages(&before)
        .into_iter()
        .find(|m| m.0 == 7)
        .expect("seq 7 before");
    let new7 = messages(&now)
        .into_iter()
        .find(|m| m.0 == 7)
        .expect("seq 7 after");
    assert_eq!((old7.3.as_str(), new7.3.as_str()), ("m5", "n0"));
    eprintln!("failover checked in {:?}", t0.elapsed());
}

/// Opens a connection to `url` (no hello yet).
async fn open(url: &str) -> WsClient {
    WsClient::open(url)
        .await
        .unwrap_or_else(|e| panic!("open {url}: {e}"))
}

/// Says hello on `c` as `device` with `generation`, resuming from `cursor`.
async fn hello(
    c: &mut WsClient,
    token: &str,
    device: &str,
    generation: u64,
    cursor: Option<Cursor>,
) {
    c.send(&ClientFrame::Hello(Hello {
        token: token.into(),
        device: device.into(),
        cursor,
        heartbeat_ms: None,
        history: Some(1_000_000),
        agent: Some("keepwire-testkit".into()),
        generation: Some(generation),
        transient: false,
        window: None,
    }))
    .await;
}

/// The answer to a hello on `c`: its welcome (kept in `c`), or the close
/// code it was refused with.
async fn welcomed(c: &mut WsClient) -> Result<(), Option<u16>> {
    match c.recv_wire(Duration::from_secs(10)).await {
        None => panic!("no answer to a hello within 10 s"),
        Some(Incoming::Frame(ServerFrame::Welcome(w))) => {
            c.welcome = Some(w);
            Ok(())
        }
        Some(Incoming::Frame(f)) => panic!("a frame before the welcome: {f:?}"),
        Some(Incoming::Closed(code)) => Err(code),
    }
}

/// Waits (at most `within`) for `c` to be closed; its close code.
async fn closed_within(c: &mut WsClient, within: Duration) -> Option<Option<u16>> {
    let deadline = Instant::now() + within;
    loop {
        match c
            .recv_wire(deadline.saturating_duration_since(Instant::now()))
            .await
        {
            None => return None,
            Some(Incoming::Closed(code)) => return Some(code),
            Some(Incoming::Frame(_)) => {}
        }
    }
}

/// Two relay nodes on the shared PostgreSQL with a NATS of the test's own:
/// a hundred times, one device of bob's says hello to node A and to node B
/// at the same moment, with two generations (the newer one on either node,
/// in turn). Every time exactly the newer connection survives: the older
/// one is refused or closed with 4005 (replaced) within 5 s, and the newer
/// one gets the message alice sends afterwards; never both, never neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_device_connecting_to_two_nodes_at_once_keeps_the_newer_connection() {
    if cannot_run(false, true) {
        return;
    }
    let t0 = std::time::Instant::now();
    let db = TestDb::create();
    let nats = OwnNats::start();
    let (ta, tb) = (add_user(&db.url, "alice"), add_user(&db.url, "bob"));
    let args = node_args(&nats.url(), "kwtwonodes");
    let (node_a, node_b) = (node(&db.url, &args), node(&db.url, &args));
    let mut a = WsClient::connect(&node_a.url, &ta, "a", None)
        .await
        .unwrap();
    let conv = create_conv(&mut a, ConvKind::Direct, &["bob"]).await.id;

    const ROUNDS: u64 = 100;
    // The device's cursor: the last entry it got.
    let mut cursor: Option<Cursor> = None;
    let (mut refused, mut closed_after_welcome) = (0, 0);
    for round in 0..ROUNDS {
        // Generations grow from round to round, like a client's attempts.
        let (older, newer) = (2 * round + 1, 2 * round + 2);
        let newer_on_b = round % 2 == 0;
        let (gen_a, gen_b) = if newer_on_b {
            (older, newer)
        } else {
            (newer, older)
        };
        let (mut ca, mut cb) = tokio::join!(open(&node_a.url), open(&node_b.url));
        tokio::join!(
            hello(&mut ca, &tb, "phone", gen_a, cursor.clone()),
            hello(&mut cb, &tb, "phone", gen_b, cursor.clone()),
        );
        let (ra, rb) = tokio::join!(welcomed(&mut ca), welcomed(&mut cb));
        let ((mut new, new_r), (mut old, old_r)) = if newer_on_b {
            ((cb, rb), (ca, ra))
        } else {
            ((ca, ra), (cb, rb))
        };
        assert_eq!(
            new_r,
            Ok(()),
            "round {round}: the newer hello (generation {newer}) was refused"
        );
        match old_r {
            Err(code) => {
                assert_eq!(code, Some(4005), "round {round}: the older hello's refusal");
                refused += 1;
            }
            Ok(()) => {
                let code = closed_within(&mut old, Duration::from_secs(5)).await;
                assert_eq!(
                    code,
                    Some(Some(4005)),
                    "round {round}: the older connection (generation {older}) was not \
                     closed with 4005 within 5 s"
                );
                closed_after_welcome += 1;
            }
        }
        // The newer one is still there: it gets the next message.
        let body = format!("round {round}");
        send_all(&mut a, conv, &[body.as_str()]).await;
        let seen = new
            .recv_where(|f| match f {
                ServerFrame::Entry(e) => match &e.item {
                    EntryItem::Message(m) if m.body == body => Some(e.seq),
                    _ => None,
                },
                _ => None,
            })
            .await;
        cursor = Some(new.cursor(seen));
        new.send(&ClientFrame::Ack { seq: seen }).await;
        new.barrier().await;
        assert!(
            closed_within(&mut new, Duration::from_millis(50))
                .await
                .is_none(),
            "round {round}: the newer connection was closed too"
        );
        new.close().await;
    }
    eprintln!(
        "{ROUNDS} rounds: the older hello refused {refused} times, closed after its \
         welcome {closed_after_welcome} times; {:?}",
        t0.elapsed()
    );
}

/// Two relay nodes on the shared PostgreSQL whose bus is down for the whole
/// run: node A is started while its NATS runs, the NATS is killed before
/// any traffic, and node B is started on that address with nothing
/// listening (the relay starts all the same: it keeps trying to connect in
/// the background). A receiver on node B gets the 30 messages sent through
/// node A one after the other, each once, in order, within about 2 s of its
/// confirm: without hints it finds them by re-reading its users' heads
/// every second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_nats_down_for_a_whole_run_delivery_still_takes_about_a_second() {
    if cannot_run(false, true) {
        return;
    }
    let t0 = std::time::Instant::now();
    let db = TestDb::create();
    let mut nats = OwnNats::start();
    let (ta, tb) = (add_user(&db.url, "alice"), add_user(&db.url, "bob"));
    let args = node_args(&nats.url(), "kwnatsdown");
    let node_a = node(&db.url, &args);
    nats.kill();
    let node_b = node(&db.url, &args);
    let mut a = WsClient::connect(&node_a.url, &ta, "a", None)
        .await
        .unwrap();
    let conv = create_conv(&mut a, ConvKind::Direct, &["bob"]).await.id;
    let mut b = WsClient::connect(&node_b.url, &tb, "b", None)
        .await
        .unwrap();
    // The conversation's creation, in the welcome's replay.
    let first = b.entry().await;
    assert_eq!(first.seq, 1, "{first:?}");

    const N: usize = 30;
    let receiver = tokio::spawn(async move {
        let mut got = Vec::new();
        while got.len() < N {
            let e = b.entry().await;
            let at = std::time::Instant::now();
            b.send(&ClientFrame::Ack { seq: e.seq }).await;
            got.push((e, at));
        }
        b.close().await;
        got
    });
    let mut confirmed = Vec::new();
    for i in 0..N {
        let cid = a.send_message(conv, &format!("m{i}")).await;
        let c = a.confirm(&cid).await;
        confirmed.push((c, std::time::Instant::now()));
        // Not a multiple of the re-read period: the confirms fall at every
        // point of it.
        tokio::time::sleep(Duration::from_millis(170)).await;
    }
    let got = receiver.await.expect("the receiver");
    let mut delays = Vec::new();
    for (i, ((e, at), (c, confirmed_at))) in got.iter().zip(&confirmed).enumerate() {
        let EntryItem::Message(m) = &e.item else {
            panic!("not a message: {e:?}")
        };
        assert_eq!(e.seq, i as u64 + 2, "in order, gap-free, once each");
        assert_eq!((m.id, m.body.as_str()), (c.id, format!("m{i}").as_str()));
        delays.push(at.saturating_duration_since(*confirmed_at));
    }
    let mut sorted = delays.clone();
    sorted.sort();
    let (p50, max) = (sorted[N / 2], sorted[N - 1]);
    eprintln!(
        "NATS down: delivery delay after the confirm p50 {p50:?}, max {max:?}; all: {delays:?}; {:?}",
        t0.elapsed()
    );
    assert!(
        max < Duration::from_secs(2),
        "a message took {max:?} to reach node B"
    );
    // Nothing came twice or later.
    let after = replay(&node_b.url, &tb).await;
    assert_eq!(after.len(), N + 1, "the receiver's inbox: {after:?}");
}

/// A synchronous failover: the primary commits only once its standby has
/// applied the commit (`synchronous_standby_names` naming the standby's
/// walreceiver, `synchronous_commit = remote_apply`, checked in
/// `pg_stat_replication` before any traffic). The primary crashes right
/// after the last confirm and the standby is promoted: every confirmed
/// message is there, at the same sequence in the sender's and the
/// receiver's inbox. The relay does not check how the replication was set
/// up, so the epoch still carries the new timeline (`<db id>-2`): a device
/// resumes with a `gap` (`epoch`), a resync that costs time, not messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synchronous_standby_failover_loses_nothing() {
    if cannot_run(true, false) {
        return;
    }
    let t0 = std::time::Instant::now();
    let mut primary = OwnPostgres::start();
    let url = primary.url("postgres");
    let (ta, tb) = (add_user(&url, "alice"), add_user(&url, "bob"));
    // Before the standby attaches. A standby started by `pg_basebackup -R`
    // connects with the application_name `walreceiver` (no cluster_name).
    for sql in [
        "ALTER SYSTEM SET synchronous_standby_names = 'walreceiver'",
        "ALTER SYSTEM SET synchronous_commit = 'remote_apply'",
        "SELECT pg_reload_conf()",
    ] {
        primary.psql("postgres", sql).expect(sql);
    }
    let standby = tokio::task::block_in_place(|| primary.standby());
    tokio::task::block_in_place(|| {
        primary.wait_for(
            "postgres",
            "SELECT string_agg(application_name || ' ' || sync_state, ',') FROM pg_stat_replication",
            "walreceiver sync",
            Duration::from_secs(30),
        )
    });
    assert_eq!(
        primary
            .psql("postgres", "SHOW synchronous_commit")
            .as_deref(),
        Ok("remote_apply")
    );
    let old = RelayProcess::start_store(&bin(), &url, FAST);
    let mut a = WsClient::connect(&old.url, &ta, "a", None).await.unwrap();
    let conv = create_conv(&mut a, ConvKind::Direct, &["bob"]).await.id;
    let mut b = WsClient::connect(&old.url, &tb, "b", None).await.unwrap();
    let old_epoch = b.welcome().epoch.clone();
    let (db_id, _) = old_epoch.split_once('-').expect("id-timeline");

    // 40 sends pipelined; the primary dies as soon as they are confirmed
    // (and the receiver has them).
    const N: usize = 40;
    let cids: Vec<String> = (0..N).map(|_| new_cid()).collect();
    for (i, cid) in cids.iter().enumerate() {
        a.send_with_cid(conv, &format!("m{i}"), cid).await;
    }
    let mut confirms = Vec::new();
    for cid in &cids {
        confirms.push(a.confirm(cid).await);
    }
    let live = b.entries(N + 1, true).await;
    tokio::task::block_in_place(|| primary.crash());

    tokio::task::block_in_place(|| {
        standby.promote();
        standby.wait_for(
            "postgres",
            "SELECT pg_is_in_recovery()",
            "f",
            Duration::from_secs(30),
        );
    });
    // It took the primary's settings with the base backup: as a primary
    // without a standby of its own, it would wait forever for every commit.
    for sql in [
        "ALTER SYSTEM RESET synchronous_standby_names",
        "SELECT pg_reload_conf()",
    ] {
        standby.psql("postgres", sql).expect(sql);
    }
    let new = RelayProcess::start_store(&bin(), &standby.url("postgres"), FAST);
    let b2 = WsClient::connect(&new.url, &tb, "b", Some(b.cursor(N as u64 + 1)))
        .await
        .expect("welcome");
    let w = b2.welcome().clone();
    b2.close().await;
    eprintln!(
        "synchronous failover: epoch {old_epoch} before, {} after; resume {:?}; {:?}",
        w.epoch,
        w.resume,
        t0.elapsed()
    );
    assert_eq!(w.head, N as u64 + 1, "every confirmed message is there");
    // Each confirmed message at the same sequence: the receiver's...
    let after = replay(&new.url, &tb).await;
    assert_eq!(after, live, "the receiver's inbox after the failover");
    // ...and the sender's (its echo at the sequence its confirm named).
    let own = messages(&replay(&new.url, &ta).await);
    assert_eq!(own.len(), N);
    for (c, (seq, id, cid, _)) in confirms.iter().zip(&own) {
        assert_eq!((c.id, c.cid.as_str()), (*id, cid.as_str()));
        if let Some(echo) = c.echo_seq {
            assert_eq!(echo, *seq, "{cid}: its echo_seq");
        }
    }
    // What the relay does today: the new timeline is a new epoch, lossless
    // replication or not (the exception is not implemented).
    assert_eq!(w.epoch, format!("{db_id}-2"), "the new timeline's epoch");
    assert_eq!(w.resume.reason, Some(GapReason::Epoch), "{:?}", w.resume);
}
