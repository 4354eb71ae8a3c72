//! Scripted scenarios: one behaviour each, stepped by hand.

use std::time::Duration;

use keepwire_core::{
    AppState, BackfillDue, BackgroundPolicy, Config, Connection, ConnectionError, Event,
    FailureKind, Instant, Network, OutboxItem, RequestError, RequestId, State, StopReason,
    Transmit, TransportEvent,
};
use keepwire_proto::{
    ClientFrame, CloseCode, Confirm, EntryItem, ErrorCode, ErrorFrame, FetchHint, GapReason,
    HistoryPage, InboxEntry, Limits, Message, Rejected, Resume, ResumeStatus, ServerFrame, Welcome,
    decode_client, encode,
};

fn t(ms: u64) -> Instant {
    Instant::from_duration(Duration::from_millis(ms))
}

struct Harness {
    c: Connection,
    sent: Vec<ClientFrame>,
    events: Vec<Event>,
    open: Option<u64>,
    opens: usize,
}

impl Harness {
    fn new() -> Harness {
        harness(Config::new("phone", vec!["ws://relay".into()]))
    }

    fn drain(&mut self) {
        while let Some(x) = self.c.poll_transmit() {
            match x {
                Transmit::Open { id, .. } => {
                    self.open = Some(id);
                    self.opens += 1;
                }
                Transmit::Frame { text, .. } => self
                    .sent
                    .push(decode_client(&text, &Limits::default()).unwrap()),
                Transmit::Close { .. } => self.open = None,
            }
        }
        while let Some(e) = self.c.poll_event() {
            self.events.push(e);
        }
    }

    fn transport(&mut self, ev: TransportEvent, now: Instant) {
        let id = self.open.expect("a transport is open");
        if matches!(ev, TransportEvent::Closed(_) | TransportEvent::Failed(_)) {
            self.open = None;
        }
        self.c.handle_transport(id, ev, now);
        self.drain();
    }

    fn frame(&mut self, f: ServerFrame, now: Instant) {
        self.transport(TransportEvent::Frame(encode(&f)), now);
    }

    /// Opens and handshakes at `now`.
    fn connect(&mut self, now: Instant) {
        self.transport(TransportEvent::Opened, now);
        assert!(matches!(self.sent.last(), Some(ClientFrame::Hello(_))));
        self.frame(welcome(0), now);
        assert_eq!(self.c.state(), State::Connected);
    }

    fn timeout(&mut self, now: Instant) {
        self.c.handle_timeout(now);
        self.drain();
    }
}

fn welcome(head: u64) -> ServerFrame {
    ServerFrame::Welcome(Welcome {
        session: "s".into(),
        user: "alice".into(),
        device: "phone".into(),
        heartbeat_ms: 30_000,
        idle_timeout_ms: 45_000,
        epoch: "e".into(),
        head,
        resume: Resume {
            status: ResumeStatus::New,
            from: 1,
            reason: None,
            missed: None,
            fetch: vec![],
        },
        limits: Limits::default().wire(512),
        push: None,
    })
}

#[test]
fn backoff_has_full_jitter_under_the_cap_and_resets_after_a_stable_connection() {
    let mut h = Harness::new();
    let mut now = t(0);
    let cap = Duration::from_secs(30);
    for _ in 0..12 {
        h.transport(TransportEvent::Failed(FailureKind::Refused), now);
        assert_eq!(h.c.state(), State::BackingOff);
        let at = h.c.retry_at().unwrap();
        assert!(at - now <= cap);
        now = at;
        h.timeout(now);
        assert_eq!(h.c.state(), State::Connecting);
    }
    // After 12 failures the ceiling is the cap; a long stable connection resets it.
    h.connect(now);
    now = now + Duration::from_secs(25);
    h.transport(TransportEvent::Closed(None), now);
    assert!(
        h.c.retry_at().unwrap() - now <= Duration::from_millis(500),
        "back to the base delay"
    );
}

#[test]
fn no_attempt_while_offline_and_an_immediate_one_when_the_network_returns() {
    let mut h = Harness::new();
    h.c.handle_network(Network::Offline, t(1));
    h.drain();
    assert_eq!(h.c.state(), State::WaitingForNetwork);
    assert!(h.open.is_none());
    let opens = h.opens;
    h.timeout(t(600_000));
    assert_eq!(
        h.opens, opens,
        "no attempt while offline, whatever the timers"
    );
    h.c.handle_network(Network::Online("wifi".into()), t(600_001));
    h.drain();
    assert_eq!(h.c.state(), State::Connecting);
    assert_eq!(h.opens, opens + 1);
}

#[test]
fn dns_failure_is_no_network_and_retried_while_the_os_says_online() {
    let mut h = Harness::new();
    h.transport(TransportEvent::Failed(FailureKind::Dns), t(10));
    assert_eq!(h.c.last_error(), Some(&ConnectionError::NoNetwork));
    assert_eq!(h.c.state(), State::BackingOff);
    let at = h.c.retry_at().unwrap();
    h.timeout(at);
    assert_eq!(
        h.c.state(),
        State::Connecting,
        "retried although no network-up event came"
    );
}

#[test]
fn foreground_skips_the_backoff_wait() {
    let mut h = Harness::new();
    h.c.handle_app_state(AppState::Background, t(0));
    for i in 0..8 {
        h.transport(TransportEvent::Failed(FailureKind::Timeout), t(i));
        let at = h.c.retry_at().unwrap();
        h.timeout(at);
    }
    h.transport(TransportEvent::Failed(FailureKind::Timeout), t(100));
    assert_eq!(h.c.state(), State::BackingOff);
    h.c.handle_app_state(AppState::Foreground, t(101));
    h.drain();
    assert_eq!(
        h.c.state(),
        State::Connecting,
        "the user is looking: connect now"
    );
}

#[test]
fn an_expired_token_is_refreshed_once_then_the_client_stops() {
    let mut h = Harness::new();
    h.transport(TransportEvent::Opened, t(1));
    h.transport(
        TransportEvent::Closed(Some(CloseCode::TokenExpired.code())),
        t(2),
    );
    assert_eq!(h.c.state(), State::RefreshingToken);
    assert!(h.events.contains(&Event::TokenNeeded));
    h.c.handle_token(Some("tok2".into()), t(3));
    h.drain();
    assert_eq!(
        h.c.state(),
        State::Connecting,
        "the new token is tried at once"
    );
    h.transport(TransportEvent::Opened, t(4));
    match h.sent.last() {
        Some(ClientFrame::Hello(hello)) => assert_eq!(hello.token, "tok2"),
        other => panic!("expected hello, got {other:?}"),
    }
    h.transport(
        TransportEvent::Closed(Some(CloseCode::AuthFailed.code())),
        t(5),
    );
    assert_eq!(h.c.state(), State::Stopped(StopReason::AuthRejected));
    let opens = h.opens;
    h.timeout(t(1_000_000));
    h.c.handle_network(Network::Online("cell".into()), t(1_000_001));
    h.drain();
    assert_eq!(h.opens, opens, "never loops on a bad token");
}

#[test]
fn replaced_stops_for_good() {
    let mut h = Harness::new();
    h.connect(t(1));
    h.transport(
        TransportEvent::Closed(Some(CloseCode::Replaced.code())),
        t(2),
    );
    assert_eq!(h.c.state(), State::Stopped(StopReason::Replaced));
    let opens = h.opens;
    h.c.handle_app_state(AppState::Background, t(3));
    h.c.handle_app_state(AppState::Foreground, t(4));
    h.timeout(t(10_000_000));
    h.drain();
    assert_eq!(
        h.opens, opens,
        "reconnecting would kick the newer connection off"
    );
}

#[test]
fn an_unconfirmed_send_probes_the_connection_and_a_missing_pong_reconnects() {
    let mut h = Harness::new();
    h.connect(t(0));
    h.c.queue_send(
        OutboxItem {
            cid: "0123456789abcdef0123".into(),
            conv: 1,
            kind: "text".into(),
            body: "hi".into(),
        },
        t(100),
    );
    h.drain();
    assert!(matches!(h.sent.last(), Some(ClientFrame::Send(_))));
    // Nothing comes back: within seconds a ping goes out, not at the next heartbeat.
    let probe = h.c.poll_timeout().unwrap();
    assert!(probe <= t(100) + Duration::from_secs(3));
    h.timeout(probe);
    assert!(matches!(h.sent.last(), Some(ClientFrame::Ping {})));
    let dead = h.c.poll_timeout().unwrap();
    h.timeout(dead);
    assert_eq!(h.c.last_error(), Some(&ConnectionError::HeartbeatTimeout));
    assert!(h.open.is_none());
    // The send is retransmitted on the next session with the same cid.
    let at = h.c.retry_at().unwrap();
    h.timeout(at);
    h.sent.clear();
    h.connect(at);
    assert!(
        h.sent
            .iter()
            .any(|f| matches!(f, ClientFrame::Send(s) if s.cid == "0123456789abcdef0123"))
    );
    assert_eq!(h.c.outbox_len(), 1);
    h.frame(
        ServerFrame::Confirm(Confirm {
            cid: "0123456789abcdef0123".into(),
            id: 1,
            conv: 1,
            conv_seq: 1,
            ts: 0,
            duplicate: false,
            echo_seq: None,
        }),
        at,
    );
    assert_eq!(h.c.outbox_len(), 0);
}

#[test]
fn rate_limited_sends_are_resent_in_order_after_the_wait() {
    let mut h = Harness::new();
    h.connect(t(0));
    let cids: Vec<String> = (0..3).map(|i| format!("cid-{i:016}")).collect();
    for c in &cids {
        h.c.queue_send(
            OutboxItem {
                cid: c.clone(),
                conv: 1,
                kind: "text".into(),
                body: c.clone(),
            },
            t(1),
        );
    }
    h.drain();
    h.frame(
        ServerFrame::Confirm(Confirm {
            cid: cids[0].clone(),
            id: 1,
            conv: 1,
            conv_seq: 1,
            ts: 0,
            duplicate: false,
            echo_seq: None,
        }),
        t(2),
    );
    h.frame(
        ServerFrame::Rejected(Rejected {
            cid: cids[1].clone(),
            code: keepwire_proto::ErrorCode::RateLimited,
            message: String::new(),
            retry_after_ms: Some(200),
        }),
        t(3),
    );
    h.sent.clear();
    h.timeout(t(100));
    assert!(
        h.sent.iter().all(|f| !matches!(f, ClientFrame::Send(_))),
        "waits retry_after"
    );
    h.timeout(t(203));
    let resent: Vec<String> = h
        .sent
        .iter()
        .filter_map(|f| match f {
            ClientFrame::Send(s) => Some(s.cid.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(
        resent,
        vec![cids[1].clone(), cids[2].clone()],
        "from the first rejected one, in order"
    );
}

#[test]
fn the_cursor_moves_only_when_entries_are_persisted() {
    let mut h = Harness::new();
    h.connect(t(0));
    let entry = |seq: u64| {
        ServerFrame::Entry(InboxEntry {
            seq,
            item: EntryItem::Message(Message {
                id: seq,
                conv: 1,
                conv_seq: seq,
                from: "b".into(),
                cid: "x".into(),
                kind: "text".into(),
                body: "m".into(),
                ts: 0,
            }),
        })
    };
    h.frame(entry(1), t(1));
    h.frame(entry(2), t(1));
    let handed: usize = h
        .events
        .iter()
        .map(|e| {
            if let Event::Entries(v) = e {
                v.len()
            } else {
                0
            }
        })
        .sum();
    assert_eq!(handed, 2, "entries are handed to the driver to persist");
    assert_eq!(
        h.c.cursor().map(|c| c.seq),
        Some(0),
        "where the relay started this new device"
    );
    assert!(
        !h.sent.iter().any(|f| matches!(f, ClientFrame::Ack { .. })),
        "no ack before persisting"
    );
    h.c.handle_persisted(2, t(2));
    h.drain();
    assert_eq!(h.c.cursor().map(|c| c.seq), Some(2));
    // Acknowledged within ACK_DELAY (or after ACK_EVERY entries).
    assert!(!h.sent.iter().any(|f| matches!(f, ClientFrame::Ack { .. })));
    let due = h.c.poll_timeout().unwrap();
    assert!(due <= t(2) + keepwire_core::ACK_DELAY);
    h.c.handle_timeout(due);
    h.drain();
    assert!(matches!(h.sent.last(), Some(ClientFrame::Ack { seq: 2 })));
    // An entry out of sequence is a protocol error: reconnect and resume.
    h.frame(entry(4), t(3));
    assert!(matches!(
        h.c.last_error(),
        Some(ConnectionError::Protocol(_))
    ));
    assert_eq!(h.c.state(), State::BackingOff);
}

#[test]
fn going_away_reconnects_within_the_jitter_window_without_growing_backoff() {
    let mut h = Harness::new();
    h.connect(t(0));
    h.transport(
        TransportEvent::Closed(Some(CloseCode::GoingAway.code())),
        t(1000),
    );
    let at = h.c.retry_at().unwrap();
    assert!(at - t(1000) <= Duration::from_secs(5));
}

fn harness_with(policy: BackgroundPolicy) -> Harness {
    let mut cfg = Config::new("phone", vec!["ws://relay".into()]);
    cfg.background_policy = policy;
    harness(cfg)
}

/// A started connection with `cfg`, its first transmits drained.
fn harness(cfg: Config) -> Harness {
    let mut h = Harness {
        c: Connection::new(cfg, "tok".into(), None, 7, t(0)),
        sent: vec![],
        events: vec![],
        open: None,
        opens: 0,
    };
    h.c.start(t(0));
    h.drain();
    h
}

#[test]
fn wake_only_disconnects_in_the_background_and_sync_and_foreground_connect_at_once() {
    let mut h = harness_with(BackgroundPolicy::WakeOnly);
    h.connect(t(0));
    h.c.handle_app_state(AppState::Background, t(10));
    h.drain();
    assert_eq!(h.c.state(), State::Dormant);
    assert!(h.open.is_none(), "disconnected at once");
    let opens = h.opens;
    h.timeout(t(3_600_000));
    h.c.handle_network(Network::Online("cell".into()), t(3_600_001));
    h.drain();
    assert_eq!(
        h.opens, opens,
        "no attempts while dormant, even on network changes"
    );
    // A push wake-up: connect now for a bounded sync.
    h.c.request_sync(t(3_630_000), t(3_600_002));
    h.drain();
    assert_eq!(h.c.state(), State::Connecting);
    h.connect(t(3_600_010));
    h.c.end_sync(t(3_600_500));
    h.drain();
    assert_eq!(h.c.state(), State::Dormant);
    assert!(h.open.is_none());
    // A sync that overruns its deadline is cut.
    h.c.request_sync(t(3_700_000), t(3_690_000));
    h.drain();
    h.timeout(t(3_700_000));
    assert_eq!(h.c.state(), State::Dormant);
    assert!(h.open.is_none());
    // Foreground: connect at once, whatever backoff was pending.
    h.c.handle_app_state(AppState::Foreground, t(3_700_001));
    h.drain();
    assert_eq!(h.c.state(), State::Connecting);
}

#[test]
fn linger_keeps_the_connection_for_a_while_then_goes_dormant() {
    let mut h = harness_with(BackgroundPolicy::Linger(Duration::from_secs(60)));
    h.connect(t(0));
    h.c.handle_app_state(AppState::Background, t(1000));
    h.drain();
    assert_eq!(h.c.state(), State::Connected);
    assert!(
        matches!(h.sent.last(), Some(ClientFrame::SetHeartbeat { .. })),
        "background heartbeat negotiated"
    );
    h.timeout(t(30_000));
    assert_eq!(h.c.state(), State::Connected);
    h.timeout(t(61_000));
    assert_eq!(h.c.state(), State::Dormant);
    assert!(h.open.is_none());
    // Keep-alive never goes dormant.
    let mut k = harness_with(BackgroundPolicy::KeepAlive);
    k.connect(t(0));
    k.c.handle_app_state(AppState::Background, t(1));
    k.drain();
    k.timeout(t(10_000_000));
    assert_ne!(k.c.state(), State::Dormant);
}

#[test]
fn the_background_heartbeat_is_learnt_per_network_and_settles_below_a_failure() {
    let mut cfg = Config::new("phone", vec!["ws://relay".into()]);
    cfg.background_policy = BackgroundPolicy::KeepAlive;
    cfg.adaptive_heartbeat = Some(keepwire_core::AdaptiveHeartbeat {
        initial: Duration::from_secs(100),
        step: Duration::from_secs(50),
        successes: 2,
        min: Duration::from_secs(50),
        max: Duration::from_secs(1000),
    });
    let mut h = harness(cfg);
    h.c.handle_network(Network::Online("wifi:home".into()), t(0));
    h.drain();
    h.connect(t(0));
    h.c.handle_app_state(AppState::Background, t(0));
    h.drain();
    // The relay grants what is asked.
    let grant = |h: &mut Harness, now: Instant| {
        if let Some(ClientFrame::SetHeartbeat { heartbeat_ms }) = h.sent.last().cloned() {
            h.frame(
                ServerFrame::HeartbeatSet {
                    heartbeat_ms,
                    idle_timeout_ms: heartbeat_ms * 2,
                },
                now,
            );
        }
    };
    grant(&mut h, t(0));
    assert_eq!(h.c.background_heartbeat(), Duration::from_secs(100));
    // The path keeps idle connections for 220 s: pings at 100, 150, 200 s get
    // pongs; the probe at 250 s is lost.
    let mut now = t(0);
    let mut learnt = vec![];
    for _ in 0..12 {
        let at = h.c.poll_timeout().unwrap();
        now = at;
        h.timeout(now);
        if matches!(h.sent.last(), Some(ClientFrame::Ping {})) {
            let interval = h.c.background_heartbeat();
            if interval <= Duration::from_secs(220) {
                h.frame(ServerFrame::Pong { head: None }, now);
                grant(&mut h, now);
            } else {
                let dead = h.c.poll_timeout().unwrap();
                h.timeout(dead);
                break;
            }
        }
        learnt.push(h.c.background_heartbeat());
    }
    assert!(
        learnt.contains(&Duration::from_secs(150)) && learnt.contains(&Duration::from_secs(200)),
        "{learnt:?}"
    );
    assert_eq!(
        h.c.last_error(),
        Some(&ConnectionError::HeartbeatTimeout),
        "the 250 s probe found the path dead"
    );
    assert_eq!(
        h.c.background_heartbeat(),
        Duration::from_secs(200),
        "settles just below the failure"
    );
    assert!(h.events.iter().any(|e| matches!(e, Event::HeartbeatLearned { network, settled: true, .. } if network == "wifi:home")));
    // Another network has its own.
    h.c.handle_network(Network::Online("cellular".into()), now);
    assert_eq!(h.c.background_heartbeat(), Duration::from_secs(100));
    h.c.handle_network(Network::Online("wifi:home".into()), now);
    assert_eq!(h.c.background_heartbeat(), Duration::from_secs(200));
}

/// Found by the `client_core` fuzz target: a welcome starting at u64::MAX and
/// an entry there overflowed the expected sequence; an absurd heartbeat
/// overflowed the clock.
#[test]
fn a_welcome_out_of_range_is_a_protocol_error_not_a_panic() {
    for (from, heartbeat_ms, epoch) in [
        (u64::MAX, 30_000, "e"),
        (0, 30_000, "e"),
        (1, u64::MAX, "e"),
        // Found later by the same target: an empty epoch would be echoed in
        // the next hello's cursor, which the relay refuses.
        (1, 30_000, ""),
    ] {
        let mut h = Harness::new();
        h.c.start(t(0));
        h.drain();
        h.transport(TransportEvent::Opened, t(1));
        let ServerFrame::Welcome(mut w) = welcome(0) else {
            unreachable!()
        };
        w.resume.from = from;
        w.heartbeat_ms = heartbeat_ms;
        w.epoch = epoch.into();
        h.frame(ServerFrame::Welcome(w), t(2));
        if h.open.is_some() {
            h.frame(
                ServerFrame::Entry(keepwire_proto::InboxEntry {
                    seq: from,
                    item: keepwire_proto::EntryItem::Read(keepwire_proto::ReadMark {
                        conv: 1,
                        up_to: 1,
                        ts: 0,
                    }),
                }),
                t(3),
            );
            h.timeout(t(4_000_000));
        }
        if from == 0 || from == u64::MAX || epoch.is_empty() {
            assert_ne!(h.c.state(), State::Connected, "from {from} epoch {epoch:?}");
        }
    }
}

#[test]
fn resume_from_sleep_reconnects_at_once_with_the_backoff_started_over() {
    let mut h = harness_with(BackgroundPolicy::KeepAlive);
    h.c.handle_app_state(AppState::Background, t(0));
    h.drain();
    // Failures while the device was going to sleep: a long backoff ahead.
    let mut now = t(1);
    for _ in 0..12 {
        h.transport(TransportEvent::Failed(FailureKind::Dns), now);
        now = h.c.retry_at().unwrap();
        h.timeout(now);
    }
    h.transport(TransportEvent::Failed(FailureKind::Dns), now);
    assert_eq!(h.c.state(), State::BackingOff);
    let opens = h.opens;
    h.c.handle_resume(now + Duration::from_millis(1));
    h.drain();
    assert_eq!(h.c.state(), State::Connecting, "no backoff wait on resume");
    assert_eq!(h.opens, opens + 1);
    // The first failure after the wake waits the base delay, not the cap.
    now = now + Duration::from_millis(2);
    h.transport(TransportEvent::Failed(FailureKind::Dns), now);
    assert!(h.c.retry_at().unwrap() - now <= Duration::from_millis(500));
}

#[test]
fn resume_replaces_a_socket_from_before_the_sleep_without_blaming_the_heartbeat() {
    let mut h = harness_with(BackgroundPolicy::KeepAlive);
    h.c.handle_network(Network::Online("wifi:a".into()), t(0));
    h.drain();
    h.connect(t(1));
    h.c.handle_app_state(AppState::Background, t(2));
    h.drain();
    let before = h.c.background_heartbeat();
    let opens = h.opens;
    h.c.handle_resume(t(3_600_000));
    h.drain();
    assert_eq!(h.opens, opens + 1, "a new socket at once");
    assert_eq!(h.c.state(), State::Connecting);
    assert_eq!(
        h.c.background_heartbeat(),
        before,
        "the sleep, not the network, lost the old socket"
    );
    assert!(
        !h.events.iter().any(|e| matches!(
            e,
            Event::HeartbeatLearned { .. } | Event::HeartbeatProbed { ok: false, .. }
        )),
        "{:?}",
        h.events
    );
}

#[test]
fn resume_does_not_connect_offline_dormant_or_stopped() {
    // Offline: the network's return connects, not the wake.
    let mut h = Harness::new();
    h.c.handle_network(Network::Offline, t(1));
    h.drain();
    let opens = h.opens;
    h.c.handle_resume(t(2));
    h.drain();
    assert_eq!(h.c.state(), State::WaitingForNetwork);
    assert_eq!(h.opens, opens);
    // Dormant under wake-only: a wake is not a sync.
    let mut h = harness_with(BackgroundPolicy::WakeOnly);
    h.c.handle_app_state(AppState::Background, t(1));
    h.drain();
    let opens = h.opens;
    h.c.handle_resume(t(2));
    h.drain();
    assert_eq!(h.c.state(), State::Dormant);
    assert_eq!(h.opens, opens);
    // Closed by the app: stays closed.
    let mut h = Harness::new();
    h.c.close(t(1));
    h.drain();
    h.c.handle_resume(t(2));
    h.drain();
    assert_eq!(h.c.state(), State::Stopped(StopReason::ClosedByApp));
    assert!(h.open.is_none());
}

/// A welcome of epoch `epoch` resuming from `from` with `status`/`reason`
/// and history hints.
fn resume_welcome(
    epoch: &str,
    from: u64,
    status: ResumeStatus,
    reason: Option<GapReason>,
    fetch: Vec<FetchHint>,
) -> ServerFrame {
    let ServerFrame::Welcome(mut w) = welcome(from - 1) else {
        unreachable!()
    };
    w.epoch = epoch.into();
    w.resume = Resume {
        status,
        from,
        reason,
        missed: None,
        fetch,
    };
    ServerFrame::Welcome(w)
}

fn page(rid: &str, conv: u64, seqs: std::ops::RangeInclusive<u64>, more: bool) -> ServerFrame {
    ServerFrame::History(HistoryPage {
        rid: rid.into(),
        conv,
        messages: seqs
            .map(|s| Message {
                id: 1000 + s,
                conv,
                conv_seq: s,
                from: "bob".into(),
                cid: format!("c{s}"),
                kind: "text".into(),
                body: format!("m{s}"),
                ts: 0,
            })
            .collect(),
        more,
    })
}

/// The last history request sent: (rid, conv, before, limit).
fn last_history(h: &Harness) -> (String, u64, Option<u64>, Option<u32>) {
    match h.sent.last() {
        Some(ClientFrame::History(r)) => (r.rid.clone(), r.conv, r.before, r.limit),
        other => panic!("expected a history request, got {other:?}"),
    }
}

#[test]
fn requests_are_named_by_the_connection_and_answered_by_id_or_reported_unanswered() {
    let mut h = Harness::new();
    assert_eq!(
        h.c.send_request(ClientFrame::ConvList { rid: "x".into() }, t(0)),
        Err(RequestError::NotConnected)
    );
    h.connect(t(0));
    assert_eq!(
        h.c.send_request(ClientFrame::Ping {}, t(1)),
        Err(RequestError::NotARequest)
    );
    let list =
        h.c.send_request(ClientFrame::ConvList { rid: "mine".into() }, t(1))
            .unwrap();
    let create =
        h.c.send_request(ClientFrame::ConvList { rid: "mine".into() }, t(1))
            .unwrap();
    h.drain();
    let rids: Vec<String> = h.sent[h.sent.len() - 2..]
        .iter()
        .map(|f| f.rid().unwrap().to_owned())
        .collect();
    assert_ne!(rids[0], rids[1], "each request gets a name of its own");
    assert_ne!(rids[0], "mine");
    // The second is refused, the first answered; a stranger's rid is a plain reply.
    h.frame(
        ServerFrame::Error(ErrorFrame {
            rid: Some(rids[1].clone()),
            code: ErrorCode::RateLimited,
            message: "slow down".into(),
            frame: Some("conv_list".into()),
            conv: None,
        }),
        t(2),
    );
    h.frame(
        ServerFrame::Convs {
            rid: rids[0].clone(),
            convs: vec![],
        },
        t(2),
    );
    h.frame(
        ServerFrame::Convs {
            rid: "stranger".into(),
            convs: vec![],
        },
        t(2),
    );
    let answers: Vec<(RequestId, bool)> = h
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Answer { request, frame } => {
                Some((*request, matches!(**frame, ServerFrame::Error(_))))
            }
            _ => None,
        })
        .collect();
    assert_eq!(answers, vec![(create, true), (list, false)]);
    assert!(matches!(h.events.last(), Some(Event::Reply(_))));
    // A request still open when the session ends is reported unanswered.
    let open =
        h.c.send_request(ClientFrame::ConvList { rid: String::new() }, t(3))
            .unwrap();
    h.drain();
    h.transport(TransportEvent::Closed(None), t(4));
    assert!(h.events.contains(&Event::Unanswered(open)));
    assert!(!h.events.contains(&Event::Unanswered(list)));
}

#[test]
fn a_backfill_pages_down_to_what_the_device_holds_and_goes_on_after_a_reconnect() {
    let mut cfg = Config::new("phone", vec!["ws://relay".into()]);
    cfg.backfill_page = 10;
    let mut h = harness(cfg);
    h.transport(TransportEvent::Opened, t(0));
    let hint = FetchHint {
        conv: 7,
        before: 41,
    };
    h.frame(
        resume_welcome("e", 5, ResumeStatus::New, None, vec![hint]),
        t(0),
    );
    let due = BackfillDue {
        conv: 7,
        before: 41,
        known: 12,
    };
    assert!(h.c.backfill(due, t(0)));
    assert!(!h.c.backfill(due, t(0)), "already under way");
    h.drain();
    let (rid, conv, before, limit) = last_history(&h);
    assert_eq!((conv, before, limit), (7, Some(41), Some(10)));
    h.frame(page(&rid, 7, 31..=40, true), t(1));
    let next = BackfillDue { before: 31, ..due };
    assert!(matches!(
        h.events.last(),
        Some(Event::History { conv: 7, messages, due: Some(d) })
            if messages.len() == 10 && *d == next
    ));
    let (rid, _, before, _) = last_history(&h);
    assert_eq!(before, Some(31));
    // The connection drops with that page in flight: it goes again after
    // the next welcome, and its late answer on the old rid counts for nothing.
    h.transport(TransportEvent::Closed(None), t(2));
    assert_eq!(h.c.backfilling(), 1);
    h.timeout(h.c.poll_timeout().unwrap());
    h.transport(TransportEvent::Opened, t(3000));
    h.frame(
        resume_welcome("e", 45, ResumeStatus::Complete, None, vec![]),
        t(3000),
    );
    let (rid2, _, before, _) = last_history(&h);
    assert_eq!(before, Some(31));
    assert_ne!(rid, rid2);
    h.frame(page(&rid, 7, 21..=30, true), t(3001));
    assert!(matches!(h.events.last(), Some(Event::Reply(_))));
    // The last page reaches what the device holds: only 13.. is new.
    h.frame(page(&rid2, 7, 21..=30, true), t(3002));
    let (rid3, _, before, _) = last_history(&h);
    assert_eq!(before, Some(21));
    h.frame(page(&rid3, 7, 11..=20, true), t(3003));
    match h.events.last() {
        Some(Event::History {
            messages,
            due: None,
            ..
        }) => assert_eq!(messages.first().map(|m| m.conv_seq), Some(13)),
        other => panic!("expected the last page, got {other:?}"),
    }
    assert_eq!(h.c.backfilling(), 0);
}

#[test]
fn an_epoch_change_resets_the_cursor_and_the_backfills_and_retention_moves_the_cursor() {
    let mut h = Harness::new();
    h.connect(t(0));
    // The device holds entries 1..=3 of epoch "e".
    for seq in 1..=3 {
        h.frame(
            ServerFrame::Entry(InboxEntry {
                seq,
                item: EntryItem::Read(keepwire_proto::ReadMark {
                    conv: 1,
                    up_to: 1,
                    ts: 0,
                }),
            }),
            t(1),
        );
    }
    h.c.handle_persisted(3, t(1));
    assert!(h.c.backfill(
        BackfillDue {
            conv: 1,
            before: 100,
            known: 0
        },
        t(1)
    ));
    h.transport(TransportEvent::Closed(None), t(2));
    h.timeout(h.c.poll_timeout().unwrap());
    h.transport(TransportEvent::Opened, t(3000));
    match h.sent.last() {
        Some(ClientFrame::Hello(hello)) => {
            assert_eq!(hello.cursor.as_ref().map(|c| c.seq), Some(3))
        }
        other => panic!("expected hello, got {other:?}"),
    }
    // The relay's log was restored from a backup: epoch "f".
    h.events.clear();
    let sent_before = h.sent.len();
    h.frame(
        resume_welcome("f", 8, ResumeStatus::Gap, Some(GapReason::Epoch), vec![]),
        t(3001),
    );
    let order: Vec<&str> = h
        .events
        .iter()
        .filter_map(|e| match e {
            Event::EpochReset { epoch, .. } if epoch == "f" => Some("reset"),
            Event::CursorReset(c) if c.epoch == "f" && c.seq == 7 => Some("cursor"),
            Event::Welcome(_) => Some("welcome"),
            _ => None,
        })
        .collect();
    assert_eq!(order, ["reset", "cursor", "welcome"], "{:?}", h.events);
    assert_eq!(h.c.backfilling(), 0, "old-epoch fills are forgotten");
    assert_eq!(h.c.epoch(), Some("f"));
    assert!(
        !h.sent[sent_before..]
            .iter()
            .any(|f| matches!(f, ClientFrame::History(_))),
        "nothing of the old epoch is asked for"
    );
    // Retention: the cursor moves past what is gone, without a reset.
    h.transport(TransportEvent::Closed(None), t(3002));
    h.timeout(h.c.poll_timeout().unwrap());
    h.transport(TransportEvent::Opened, t(6000));
    h.events.clear();
    h.frame(
        resume_welcome(
            "f",
            20,
            ResumeStatus::Gap,
            Some(GapReason::Retention),
            vec![],
        ),
        t(6001),
    );
    assert!(
        !h.events
            .iter()
            .any(|e| matches!(e, Event::EpochReset { .. }))
    );
    assert!(
        h.events
            .iter()
            .any(|e| matches!(e, Event::CursorReset(c) if c.epoch == "f" && c.seq == 19))
    );
    assert_eq!(h.c.cursor().map(|c| c.seq), Some(19));
}

#[test]
fn state_names_read_back_and_match_what_older_versions_stored() {
    use keepwire_core::StopReason::*;
    let states = [
        State::Idle,
        State::WaitingForNetwork,
        State::Connecting,
        State::Handshaking,
        State::Connected,
        State::BackingOff,
        State::RefreshingToken,
        State::Dormant,
        State::Stopped(ClosedByApp),
        State::Stopped(AuthRejected),
        State::Stopped(TokenRevoked),
        State::Stopped(DeviceRevoked),
        State::Stopped(Replaced),
    ];
    for s in states {
        assert_eq!(State::from_name(s.name()), Some(s));
        // Earlier versions stored `Debug`: those rows still read.
        assert_eq!(State::from_name(&format!("{s:?}")), Some(s));
    }
    for a in [AppState::Foreground, AppState::Background] {
        assert_eq!(AppState::from_name(a.name()), Some(a));
        assert_eq!(a.name(), format!("{a:?}"));
    }
    assert_eq!(State::from_name("stopped"), None);
}
