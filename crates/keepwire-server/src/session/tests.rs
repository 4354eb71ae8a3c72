//! Unit tests of the sans-IO session: inputs in, outputs checked, no I/O.

use std::sync::Arc;
use std::time::Duration;

use keepwire_proto::{
    CloseCode, Confirm, ConvInfo, ConvKind, EntryItem, ErrorCode, InboxEntry, Instant, Limits,
    Message, Resume, ResumeStatus, ServerFrame, decode_server,
};

use super::*;
use crate::ratelimit::Unlimited;
use crate::store::AuthedUser;

fn at(ms: u64) -> Instant {
    Instant::from_duration(Duration::from_millis(ms))
}

fn config(limits: Limits) -> Arc<SessionConfig> {
    Arc::new(config_of(limits))
}

fn config_of(limits: Limits) -> SessionConfig {
    SessionConfig {
        limits,
        send_burst: 100,
        handshake_timeout: Duration::from_secs(10),
        heartbeat: HeartbeatBounds {
            default: Duration::from_secs(30),
            min: Duration::from_secs(5),
            max: Duration::from_secs(1800),
            grace: Duration::from_secs(10),
        },
        history_window: 100,
        max_history_window: 10_000,
        member_adds: crate::MemberAdds::Members,
        push: None,
        user_budget: Arc::new(Unlimited),
        metrics: Arc::new(Metrics::default()),
    }
}

/// A session plus a record of what it asked for.
struct Harness {
    s: Session,
    requests: Vec<(RequestId, StoreRequest)>,
    frames: Vec<ServerFrame>,
    close: Option<CloseCode>,
    events: Vec<Event>,
}

impl Harness {
    fn new(limits: Limits) -> Harness {
        Self::with_config(config(limits))
    }

    fn with_config(cfg: Arc<SessionConfig>) -> Harness {
        Harness {
            s: Session::new(cfg, 7, at(0)),
            requests: Vec::new(),
            frames: Vec::new(),
            close: None,
            events: Vec::new(),
        }
    }

    /// Drains every output.
    fn drain(&mut self) {
        while let Some(e) = self.s.poll_event() {
            self.events.push(e);
        }
        while let Some(r) = self.s.poll_store_request() {
            self.requests.push(r);
        }
        while let Some(t) = self.s.poll_transmit() {
            match t {
                Transmit::Text(t) => self.frames.push(decode_server(&t).expect("valid frame")),
                Transmit::Close(c) => self.close = Some(c),
            }
        }
    }

    fn take_request(&mut self) -> (RequestId, StoreRequest) {
        self.drain();
        assert!(!self.requests.is_empty(), "no store request");
        self.requests.remove(0)
    }

    fn answer(&mut self, id: RequestId, a: StoreAnswer, now: Instant) {
        self.s.handle_store_answer(id, a, now);
        self.drain();
    }

    fn text(&mut self, t: &str, now: Instant) {
        self.s.handle_transport(TransportEvent::Text(t), now);
        self.drain();
    }

    /// Runs the handshake to an open session with an inbox head of `head`.
    fn open(limits: Limits, head: u64) -> Harness {
        Self::open_with(config(limits), head)
    }

    fn open_with(cfg: Arc<SessionConfig>, head: u64) -> Harness {
        Self::open_hello(
            cfg,
            r#"{"type":"hello","token":"kw_x","device":"phone"}"#,
            head,
        )
        .0
    }

    /// Runs the handshake with `hello`; returns the session and its welcome.
    fn open_hello(cfg: Arc<SessionConfig>, hello: &str, head: u64) -> (Harness, Welcome) {
        let mut h = Harness::with_config(cfg);
        h.text(hello, at(1));
        let (id, req) = h.take_request();
        assert!(matches!(req, StoreRequest::Authenticate { .. }));
        let user = AuthedUser {
            id: 1,
            name: "alice".into(),
            token_id: Some(3),
            expires_at_ms: 0,
        };
        h.answer(
            id,
            StoreAnswer::Auth(Ok((user, Duration::from_secs(3600)))),
            at(2),
        );
        assert!(matches!(
            h.events.remove(0),
            Event::Register { user: 1, .. }
        ));
        h.s.handle_registered(Ok(head), at(3));
        let (id, req) = h.take_request();
        assert!(matches!(req, StoreRequest::TouchDevice { .. }));
        h.answer(id, StoreAnswer::Done(Ok(())), at(4));
        let (id, req) = h.take_request();
        assert!(matches!(req, StoreRequest::Resume { .. }));
        let plan = ResumePlan {
            epoch: "e1".into(),
            head,
            resume: Resume {
                status: ResumeStatus::New,
                from: 1,
                reason: None,
                missed: None,
                fetch: vec![],
            },
        };
        h.answer(id, StoreAnswer::Resume(Ok(plan)), at(5));
        let welcome = match h.frames.remove(0) {
            ServerFrame::Welcome(w) if w.epoch == "e1" => w,
            other => panic!("not the welcome: {other:?}"),
        };
        // The position it connected with is persisted at once.
        h.s.handle_timeout(at(5));
        h.drain();
        let (_, req) = h.take_request();
        assert!(matches!(req, StoreRequest::RecordAck { seq: 0, .. }));
        (h, welcome)
    }
}

fn entry(seq: u64, conv_seq: u64) -> Outgoing {
    Outgoing::Entry(InboxEntry {
        seq,
        item: EntryItem::Message(Message {
            id: seq,
            conv: 1,
            conv_seq,
            from: "bob".into(),
            cid: "c".repeat(16),
            kind: "text".into(),
            body: "hi".into(),
            ts: 0,
        }),
    })
}

fn confirm(cid: &str) -> Confirm {
    Confirm {
        cid: cid.into(),
        id: 1,
        conv: 1,
        conv_seq: 1,
        ts: 0,
        duplicate: false,
        echo_seq: None,
    }
}

fn send(cid: &str, body: &str) -> String {
    format!(r#"{{"type":"send","cid":"{cid}","conv":1,"body":"{body}"}}"#)
}

const CID_A: &str = "aaaaaaaaaaaaaaaa";
const CID_B: &str = "bbbbbbbbbbbbbbbb";
const CID_C: &str = "cccccccccccccccc";

#[test]
fn the_handshake_runs_auth_register_touch_resume_then_welcome() {
    let h = Harness::open(Limits::default(), 0);
    assert!(h.s.wants_frames());
    assert!(h.close.is_none());
}

#[test]
fn a_bad_first_frame_closes_with_4004_and_auth_failures_with_their_codes() {
    let mut h = Harness::new(Limits::default());
    h.text(r#"{"type":"ping"}"#, at(1));
    assert_eq!(h.close, Some(CloseCode::ProtocolViolation));

    let mut h = Harness::new(Limits::default());
    h.text(r#"{"type":"hello","token":"kw_x","device":"phone"}"#, at(1));
    let (id, _) = h.take_request();
    h.answer(
        id,
        StoreAnswer::Auth(Err(StoreError::Auth(AuthFailure::DeviceRevoked))),
        at(2),
    );
    assert_eq!(h.close, Some(CloseCode::DeviceRevoked));
    assert!(h.s.is_closed());
}

#[test]
fn deadlines_close_with_handshake_idle_and_token_codes() {
    let mut h = Harness::new(Limits::default());
    assert_eq!(h.s.poll_timeout(), Some(at(10_000)));
    h.s.handle_timeout(at(9_999));
    h.drain();
    assert!(h.close.is_none(), "early timeouts are no-ops");
    h.s.handle_timeout(at(10_000));
    h.drain();
    assert_eq!(h.close, Some(CloseCode::HandshakeTimeout));

    let mut h = Harness::open(Limits::default(), 0);
    // 30 s heartbeat + 15 s slack after the last activity at 5 ms.
    h.s.handle_timeout(at(45_004));
    h.drain();
    assert!(h.close.is_none());
    h.text(r#"{"type":"ping"}"#, at(40_000));
    h.s.handle_timeout(at(45_005));
    h.drain();
    assert!(h.close.is_none(), "activity moved the idle deadline");
    h.s.handle_timeout(at(85_000));
    h.drain();
    assert_eq!(h.close, Some(CloseCode::HeartbeatTimeout));

    let mut h = Harness::open(Limits::default(), 0);
    for t in (10_000..3_600_002).step_by(10_000) {
        h.text(r#"{"type":"ping"}"#, at(t));
    }
    h.s.handle_timeout(at(3_600_002));
    h.drain();
    assert_eq!(h.close, Some(CloseCode::TokenExpired));
}

#[test]
fn answers_leave_in_request_order_with_their_cid_or_rid() {
    let mut h = Harness::open(Limits::default(), 0);
    h.text(&send(CID_A, "one"), at(10));
    h.text(r#"{"type":"conv_list","rid":"r1"}"#, at(11));
    // A validation refusal and a bad cid are answered in order too.
    h.text(
        &format!(r#"{{"type":"send","cid":"{CID_B}","conv":1,"kind":"video","body":"x"}}"#),
        at(12),
    );
    h.text(r#"{"type":"send","cid":"bad","conv":1,"body":"x"}"#, at(13));
    h.text(&send(CID_C, "three"), at(14));
    assert!(h.frames.is_empty(), "nothing overtakes the first send");
    let (send_a, _) = h.take_request();
    // The list (a read) waits for the earlier write.
    assert_eq!(h.requests.len(), 0, "{:?}", h.requests);
    h.answer(send_a, StoreAnswer::Confirm(Ok(confirm(CID_A))), at(20));
    let (list, req) = h.take_request();
    assert!(matches!(req, StoreRequest::ConvList { .. }));
    // Once the read is issued, the send behind it may go (writes pipeline).
    let (send_c, _) = h.take_request();
    h.answer(send_c, StoreAnswer::Confirm(Ok(confirm(CID_C))), at(21));
    assert_eq!(h.frames.len(), 1, "the confirm of C waits for the list");
    h.answer(list, StoreAnswer::Convs(Ok(vec![])), at(22));
    let order: Vec<String> = h
        .frames
        .iter()
        .map(|f| match f {
            ServerFrame::Confirm(c) => format!("confirm {}", c.cid),
            ServerFrame::Convs { rid, .. } => format!("convs {rid}"),
            ServerFrame::Rejected(r) => format!("rejected {} {}", r.cid, r.code),
            ServerFrame::Error(e) => {
                format!("error {} {}", e.frame.as_deref().unwrap_or("?"), e.code)
            }
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        order,
        vec![
            format!("confirm {CID_A}"),
            "convs r1".to_string(),
            format!("rejected {CID_B} unsupported_kind"),
            "error send invalid".to_string(),
            format!("confirm {CID_C}"),
        ]
    );
}

#[test]
fn rate_limited_does_not_overtake_earlier_confirms() {
    let limits = Limits {
        sends_per_sec: 1,
        ..Default::default()
    };
    let mut h = Harness::open(limits, 0);
    // The burst is 100 (config); spend it.
    let mut ids = Vec::new();
    for i in 0..100 {
        h.text(&send(&format!("{i:0>16}"), "x"), at(10));
        ids.push(h.take_request().0);
        if h.s.wants_frames() {
            continue;
        }
        // Answer the oldest to keep within max_unconfirmed.
        let id = ids.remove(0);
        h.answer(id, StoreAnswer::Confirm(Ok(confirm("x"))), at(10));
    }
    let before = h.frames.len();
    h.text(&send(CID_A, "over"), at(10));
    assert_eq!(
        h.frames.len(),
        before,
        "the refusal waits for earlier answers"
    );
    for id in ids {
        h.answer(id, StoreAnswer::Confirm(Ok(confirm("x"))), at(11));
    }
    let last = h.frames.last().unwrap();
    assert!(
        matches!(last, ServerFrame::Rejected(r) if r.cid == CID_A && r.code == ErrorCode::RateLimited && r.retry_after_ms.is_some()),
        "{last:?}"
    );
}

#[test]
fn oversized_bodies_do_not_count_toward_the_bad_frame_limit() {
    let limits = Limits::default();
    let max = limits.max_protocol_errors;
    let body = "x".repeat(limits.max_body_bytes + 1);
    let mut h = Harness::open(limits, 0);
    for i in 0..(max + 5) {
        h.text(&send(&format!("{i:0>16}"), &body), at(10));
    }
    assert!(h.close.is_none(), "a well-behaved client is not closed");
    assert!(
        h.frames
            .iter()
            .all(|f| matches!(f, ServerFrame::Rejected(r) if r.code == ErrorCode::BodyTooLarge))
    );
    // Garbage does count.
    for _ in 0..=max {
        h.text("garbage", at(11));
    }
    assert_eq!(h.close, Some(CloseCode::ProtocolViolation));
}

#[test]
fn read_and_signal_errors_name_their_frame_and_conversation_without_a_rid() {
    let mut h = Harness::open(Limits::default(), 0);
    h.text(r#"{"type":"read","conv":9,"up_to":3}"#, at(10));
    let (id, _) = h.take_request();
    let refused = StoreError::Refused(ErrorCode::NotMember, "not a member".into());
    h.answer(id, StoreAnswer::Done(Err(refused)), at(11));
    h.text(
        r#"{"type":"signal","conv":8,"data":{"typing":true}}"#,
        at(12),
    );
    let (id, _) = h.take_request();
    let refused = StoreError::Refused(ErrorCode::NoSuchConv, "none".into());
    h.answer(id, StoreAnswer::Members(Err(refused)), at(13));
    let errors: Vec<_> = h
        .frames
        .iter()
        .map(|f| match f {
            ServerFrame::Error(e) => (e.rid.clone(), e.frame.clone(), e.conv, e.code),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        errors,
        vec![
            (None, Some("read".into()), Some(9), ErrorCode::NotMember),
            (None, Some("signal".into()), Some(8), ErrorCode::NoSuchConv),
        ]
    );
}

#[test]
fn a_signal_goes_to_the_members_through_the_hub() {
    let mut h = Harness::open(Limits::default(), 0);
    h.text(
        r#"{"type":"signal","conv":8,"data":{"typing":true}}"#,
        at(10),
    );
    let (id, _) = h.take_request();
    h.answer(id, StoreAnswer::Members(Ok(vec![1, 2])), at(11));
    assert!(h.frames.is_empty());
    assert!(matches!(
        h.events.pop(),
        Some(Event::Signal { members, frame }) if members == vec![1, 2]
            && matches!(*frame, ServerFrame::Signal { conv: 8, ref from, .. } if from == "alice")
    ));
}

#[test]
fn delivery_follows_the_head_in_order_within_the_credit_window() {
    let limits = Limits {
        window: 4,
        ..Default::default()
    };
    let mut h = Harness::open(limits, 0);
    h.s.handle_head(10, at(10));
    let (id, req) = h.take_request();
    assert!(matches!(
        req,
        StoreRequest::ReadInbox {
            from: 1,
            limit: 4,
            ..
        }
    ));
    h.s.handle_head(11, at(11));
    h.drain();
    assert!(h.requests.is_empty(), "one read at a time");
    h.answer(
        id,
        StoreAnswer::Inbox(Ok((1..=4).map(|s| entry(s, s)).collect())),
        at(12),
    );
    let seqs: Vec<u64> = h
        .frames
        .iter()
        .map(|f| match f {
            ServerFrame::Entry(e) => e.seq,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(seqs, vec![1, 2, 3, 4]);
    assert!(h.requests.is_empty(), "the window is full until an ack");
    h.text(r#"{"type":"ack","seq":2}"#, at(13));
    let (_, req) = h.take_request();
    assert!(matches!(
        req,
        StoreRequest::ReadInbox {
            from: 5,
            limit: 2,
            ..
        }
    ));
    h.text(r#"{"type":"ack","seq":9}"#, at(14));
    assert!(matches!(h.frames.last(), Some(ServerFrame::Error(e)) if e.code == ErrorCode::BadAck));
}

#[test]
fn the_credit_window_is_what_the_hello_asked_for_clamped_to_the_maximum() {
    let limits = Limits {
        window: 4,
        max_window: 300,
        ..Default::default()
    };
    // (asked, granted): absent = the default; out of range = clamped.
    for (asked, granted) in [(None, 4), (Some(6), 6), (Some(100_000), 300), (Some(0), 1)] {
        let hello = match asked {
            None => r#"{"type":"hello","token":"kw_x","device":"phone"}"#.to_owned(),
            Some(w) => {
                format!(r#"{{"type":"hello","token":"kw_x","device":"phone","window":{w}}}"#)
            }
        };
        let (mut h, welcome) = Harness::open_hello(config(limits), &hello, 0);
        assert_eq!(welcome.limits.window, granted, "asked {asked:?}");
        h.s.handle_head(1000, at(10));
        let (id, req) = h.take_request();
        let StoreRequest::ReadInbox { from: 1, limit, .. } = req else {
            panic!("{req:?}")
        };
        assert_eq!(limit, granted.min(READ_BATCH), "asked {asked:?}");
        // Once the window is full, nothing more until an ack.
        h.answer(
            id,
            StoreAnswer::Inbox(Ok((1..=limit).map(|s| entry(s, s)).collect())),
            at(11),
        );
        if limit == granted {
            assert!(h.requests.is_empty(), "asked {asked:?}: window full");
        } else {
            let (_, req) = h.take_request();
            assert!(
                matches!(req, StoreRequest::ReadInbox { from, limit, .. }
                    if from == READ_BATCH + 1 && limit == (granted - READ_BATCH).min(READ_BATCH)),
                "{req:?}"
            );
        }
    }
}

#[test]
fn entries_trimmed_under_a_live_connection_close_with_4011() {
    let mut h = Harness::open(Limits::default(), 0);
    h.s.handle_head(5, at(10));
    let (id, _) = h.take_request();
    h.answer(id, StoreAnswer::Inbox(Ok(vec![entry(3, 3)])), at(11));
    assert_eq!(h.close, Some(CloseCode::Resync));

    let mut h = Harness::open(Limits::default(), 0);
    h.s.handle_head(5, at(10));
    let (id, _) = h.take_request();
    h.answer(id, StoreAnswer::Inbox(Ok(vec![])), at(11));
    assert_eq!(
        h.close,
        Some(CloseCode::Resync),
        "announced entries that are gone"
    );
}

#[test]
fn transport_violations_close_with_their_codes() {
    for (event, code) in [
        (TransportEvent::Binary, CloseCode::UnsupportedData),
        (TransportEvent::TooBig, CloseCode::MessageTooBig),
        (TransportEvent::InvalidUtf8, CloseCode::InvalidPayload),
        (TransportEvent::ProtocolError, CloseCode::ProtocolError),
    ] {
        let mut h = Harness::open(Limits::default(), 0);
        h.s.handle_transport(event, at(10));
        h.drain();
        assert_eq!(h.close, Some(code));
    }
}

#[test]
fn closing_flushes_the_ack_position_and_stops_everything() {
    let mut h = Harness::open(Limits::default(), 0);
    h.s.handle_head(2, at(10));
    let (id, _) = h.take_request();
    h.answer(
        id,
        StoreAnswer::Inbox(Ok(vec![entry(1, 1), entry(2, 2)])),
        at(11),
    );
    h.text(r#"{"type":"ack","seq":2}"#, at(12));
    h.s.handle_control(crate::hub::Control::Close(CloseCode::Replaced), at(13));
    h.drain();
    assert_eq!(h.close, Some(CloseCode::Replaced));
    assert!(matches!(
        h.requests.last(),
        Some((_, StoreRequest::RecordAck { seq: 2, .. }))
    ));
    assert_eq!(h.s.poll_timeout(), None);
    h.text(&send(CID_A, "late"), at(14));
    assert!(
        h.requests
            .iter()
            .all(|(_, r)| !matches!(r, StoreRequest::Send { .. }))
    );
}

#[test]
fn group_writes_are_charged_by_the_members_they_reach() {
    let limits = Limits {
        sends_per_sec: 1,
        ..Default::default()
    };
    let mut h = Harness::open(limits, 0);
    let members: Vec<String> = (0..120).map(|i| format!("\"u{i}\"")).collect();
    let create = format!(
        r#"{{"type":"conv_create","rid":"c1","key":"k","kind":"group","members":[{}]}}"#,
        members.join(",")
    );
    h.text(&create, at(10));
    let (id, _) = h.take_request();
    let info = ConvInfo {
        id: 5,
        kind: ConvKind::Group,
        name: None,
        members: vec![],
        last_seq: 0,
    };
    h.answer(id, StoreAnswer::Conv(Ok((info, true))), at(11));
    // The whole burst went into that group: the next send waits.
    h.text(&send(CID_A, "x"), at(12));
    assert!(
        matches!(h.frames.last(), Some(ServerFrame::Rejected(r)) if r.code == ErrorCode::RateLimited)
    );
}

#[test]
fn under_backend_adds_users_put_nobody_else_into_conversations() {
    let mut cfg = config_of(Limits::default());
    cfg.member_adds = crate::MemberAdds::Backend;
    let mut h = Harness::open_with(Arc::new(cfg), 0);
    h.text(
        r#"{"type":"conv_add","rid":"a1","conv":3,"user":"bob"}"#,
        at(10),
    );
    h.text(
        r#"{"type":"conv_create","rid":"c1","key":"k","kind":"group","members":["bob"]}"#,
        at(11),
    );
    h.text(
        r#"{"type":"conv_remove","rid":"r1","conv":3,"user":"alice"}"#,
        at(12),
    );
    h.text(
        r#"{"type":"conv_create","rid":"c2","key":"k2","kind":"group","members":[]}"#,
        at(13),
    );
    let refused: Vec<_> = h
        .frames
        .iter()
        .map(|f| match f {
            ServerFrame::Error(e) => (e.rid.clone().unwrap(), e.code),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        refused,
        vec![
            ("a1".to_string(), ErrorCode::Forbidden),
            ("c1".to_string(), ErrorCode::Forbidden),
        ]
    );
    // Leaving and a conversation of one's own go to the store.
    assert!(
        matches!(
            &h.requests[..],
            [
                (_, StoreRequest::ConvMember { add: false, .. }),
                (_, StoreRequest::ConvCreate { .. })
            ]
        ),
        "{:?}",
        h.requests
    );
}

/// An idle open session stays small: a relay holds many of them.
#[test]
fn an_idle_session_is_small() {
    let size = std::mem::size_of::<Session>();
    assert!(size <= 512, "Session is {size} bytes");
}

/// The session is sans-IO: its sources use no clock, socket, runtime or
/// thread RNG.
#[test]
fn the_session_performs_no_io() {
    for (name, src) in [
        ("mod.rs", include_str!("mod.rs")),
        ("open.rs", include_str!("open.rs")),
        ("answers.rs", include_str!("answers.rs")),
        ("ratelimit.rs", include_str!("../ratelimit.rs")),
    ] {
        for banned in [
            "tokio::",
            "Instant::now",
            "SystemTime",
            "rand::",
            "std::net",
            "std::fs",
            "std::thread",
        ] {
            assert!(!src.contains(banned), "{name} uses {banned}");
        }
    }
}
