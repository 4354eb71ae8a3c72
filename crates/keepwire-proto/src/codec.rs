//! JSON codec. Decoding never panics, whatever the input (see the fuzz targets).

use serde::{Deserialize, Serialize};

use crate::codes::ErrorCode;
use crate::frames::{ClientFrame, ServerFrame};
use crate::limits::Limits;

/// Frame types a v1 client may send.
const CLIENT_TYPES: &[&str] = &[
    "hello",
    "send",
    "ack",
    "ping",
    "set_heartbeat",
    "history",
    "conv_create",
    "conv_add",
    "conv_remove",
    "conv_list",
    "read",
    "signal",
    "push_register",
    "mute",
];

/// Frame types a v1 relay sends.
const SERVER_TYPES: &[&str] = &[
    "welcome",
    "entry",
    "confirm",
    "rejected",
    "pong",
    "heartbeat_set",
    "history",
    "conv",
    "convs",
    "signal",
    "error",
    "push",
    "muted",
];

/// True if `text` is a JSON object whose `type` is not a v1 server frame
/// type: a client skips such frames (sent by a newer relay) instead of
/// treating them as a protocol violation.
pub fn is_unknown_server_type(text: &str) -> bool {
    serde_json::from_str::<Probe>(text)
        .ok()
        .and_then(|p| p.frame_type)
        .is_some_and(|t| !SERVER_TYPES.contains(&t.as_str()))
}

/// Why a frame could not be decoded; maps to an `error` frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct DecodeError {
    /// `malformed`, `unknown_type`, `invalid`, `body_too_large`, ...
    pub code: ErrorCode,
    /// What is wrong, for humans.
    pub message: String,
    /// The frame's request id, when one could be read, to echo in the answer.
    pub rid: Option<String>,
    /// The frame's `type`, when one could be read.
    pub frame_type: Option<String>,
    /// A `send`'s client id, when it could be read and is well formed, so
    /// the answer can be a `rejected` for that send.
    pub cid: Option<String>,
}

/// The fields read from a frame that failed to decode, to give a precise answer.
#[derive(Deserialize)]
struct Probe {
    #[serde(rename = "type")]
    frame_type: Option<String>,
    rid: Option<serde_json::Value>,
    cid: Option<serde_json::Value>,
}

/// Decodes and validates one client frame.
pub fn decode_client(text: &str, limits: &Limits) -> Result<ClientFrame, DecodeError> {
    if text.len() > limits.max_frame_bytes {
        return Err(DecodeError {
            code: ErrorCode::Invalid,
            message: format!(
                "frame is {} bytes; the limit is {}",
                text.len(),
                limits.max_frame_bytes
            ),
            rid: None,
            frame_type: None,
            cid: None,
        });
    }
    match serde_json::from_str::<ClientFrame>(text) {
        Ok(frame) => match frame.validate(limits) {
            Ok(()) => Ok(frame),
            Err(e) => Err(DecodeError {
                code: e.code,
                message: e.message,
                rid: frame.rid().map(str::to_owned),
                frame_type: Some(frame.type_name().to_owned()),
                cid: match &frame {
                    ClientFrame::Send(s) if crate::is_valid_cid(&s.cid) => Some(s.cid.clone()),
                    _ => None,
                },
            }),
        },
        Err(err) => Err(explain(text, &err)),
    }
}

fn explain(text: &str, err: &serde_json::Error) -> DecodeError {
    let probe = serde_json::from_str::<Probe>(text).ok();
    let rid = probe
        .as_ref()
        .and_then(|p| p.rid.as_ref())
        .and_then(|r| r.as_str())
        .filter(|r| crate::is_valid_request_id(r))
        .map(str::to_owned);
    let frame_type = probe.as_ref().and_then(|p| p.frame_type.clone());
    let cid = probe
        .as_ref()
        .and_then(|p| p.cid.as_ref())
        .and_then(|c| c.as_str())
        .filter(|c| crate::is_valid_cid(c))
        .map(str::to_owned);
    let (code, message) = match (&probe, &frame_type) {
        (None, _) => (ErrorCode::Malformed, format!("not a JSON object: {err}")),
        (Some(_), None) => (ErrorCode::Malformed, "missing \"type\" field".to_owned()),
        (Some(_), Some(t)) if !CLIENT_TYPES.contains(&t.as_str()) => (
            ErrorCode::UnknownType,
            format!("unknown frame type {:?}", truncate(t, 40)),
        ),
        (Some(_), Some(t)) => (ErrorCode::Malformed, format!("bad {t:?} frame: {err}")),
    };
    DecodeError {
        code,
        message,
        rid,
        frame_type: frame_type.map(|t| truncate(&t, 40).to_owned()),
        cid,
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Decodes one server frame (for clients). Unknown frame types are an error;
/// clients should log and ignore them.
pub fn decode_server(text: &str) -> Result<ServerFrame, serde_json::Error> {
    serde_json::from_str(text)
}

/// Encodes a frame as JSON text.
pub fn encode<T: Serialize>(frame: &T) -> String {
    // Frames are plain data with string keys: serialization cannot fail.
    serde_json::to_string(frame).unwrap_or_else(|e| {
        debug_assert!(false, "frame serialization failed: {e}");
        String::from("{}")
    })
}

/// Encodes an `entry` frame around an item already encoded as JSON (an
/// `EntryItem`, e.g. `{"message":{...}}`): a message going to many members
/// is encoded once, and each member's frame only differs in `seq`. The item
/// is flattened into the frame, exactly as `encode(&ServerFrame::Entry(..))`
/// writes it.
pub fn encode_entry(seq: crate::Seq, item_json: &str) -> String {
    let fields = item_json.strip_prefix('{').unwrap_or(item_json);
    let mut s = String::with_capacity(fields.len() + 40);
    s.push_str("{\"type\":\"entry\",\"seq\":");
    s.push_str(&seq.to_string());
    if fields != "}" {
        s.push(',');
    }
    s.push_str(fields);
    s
}

impl ServerFrame {
    /// The request id this frame answers, if it answers one (PROTOCOL.md §10:
    /// every answer and every error about a request carries its `rid`).
    pub fn rid(&self) -> Option<&str> {
        match self {
            ServerFrame::History(p) => Some(&p.rid),
            ServerFrame::Conv { rid, .. }
            | ServerFrame::Convs { rid, .. }
            | ServerFrame::Push { rid, .. }
            | ServerFrame::Muted { rid, .. } => Some(rid),
            ServerFrame::Error(e) => e.rid.as_deref(),
            _ => None,
        }
    }
}

impl ClientFrame {
    /// The frame's request id, if it has one.
    pub fn rid(&self) -> Option<&str> {
        match self {
            ClientFrame::History(h) => Some(&h.rid),
            ClientFrame::ConvCreate(c) => Some(&c.rid),
            ClientFrame::ConvAdd(m) | ClientFrame::ConvRemove(m) => Some(&m.rid),
            ClientFrame::ConvList { rid } => Some(rid),
            ClientFrame::PushRegister(p) => Some(&p.rid),
            ClientFrame::Mute { rid, .. } => Some(rid),
            _ => None,
        }
    }

    /// The frame's request id, to set it (a client names its requests).
    pub fn rid_mut(&mut self) -> Option<&mut String> {
        match self {
            ClientFrame::History(h) => Some(&mut h.rid),
            ClientFrame::ConvCreate(c) => Some(&mut c.rid),
            ClientFrame::ConvAdd(m) | ClientFrame::ConvRemove(m) => Some(&mut m.rid),
            ClientFrame::ConvList { rid } => Some(rid),
            ClientFrame::PushRegister(p) => Some(&mut p.rid),
            ClientFrame::Mute { rid, .. } => Some(rid),
            _ => None,
        }
    }

    /// The wire `type` of the frame.
    pub fn type_name(&self) -> &'static str {
        match self {
            ClientFrame::Hello(_) => "hello",
            ClientFrame::Send(_) => "send",
            ClientFrame::Ack { .. } => "ack",
            ClientFrame::Ping {} => "ping",
            ClientFrame::SetHeartbeat { .. } => "set_heartbeat",
            ClientFrame::History(_) => "history",
            ClientFrame::ConvCreate(_) => "conv_create",
            ClientFrame::ConvAdd(_) => "conv_add",
            ClientFrame::ConvRemove(_) => "conv_remove",
            ClientFrame::ConvList { .. } => "conv_list",
            ClientFrame::Read { .. } => "read",
            ClientFrame::Signal { .. } => "signal",
            ClientFrame::PushRegister(_) => "push_register",
            ClientFrame::Mute { .. } => "mute",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pre_encoded_entry_is_the_same_text_as_a_serialized_one() {
        let item = crate::EntryItem::Message(crate::Message {
            id: 7,
            conv: 3,
            conv_seq: 9,
            from: "alice".into(),
            cid: "0123456789abcdef".into(),
            kind: "text".into(),
            body: "hi \"there\" ✓".into(),
            ts: 1_700_000_000_000,
        });
        let entry = ServerFrame::Entry(crate::InboxEntry {
            seq: 42,
            item: item.clone(),
        });
        assert_eq!(encode_entry(42, &encode(&item)), encode(&entry));
    }
    use crate::frames::*;

    #[test]
    fn a_hello_debug_print_hides_the_token() {
        let hello = Hello {
            token: "kw_secret-token-value".into(),
            device: "phone".into(),
            cursor: None,
            heartbeat_ms: Some(30_000),
            history: None,
            agent: None,
            generation: None,
            transient: false,
            window: None,
        };
        let shown = format!("{:?}", ClientFrame::Hello(hello));
        assert!(!shown.contains("secret"), "{shown}");
        assert!(
            shown.contains("phone") && shown.contains("<21 bytes>"),
            "{shown}"
        );
    }

    fn lim() -> Limits {
        Limits::default()
    }

    #[test]
    fn every_client_type_is_listed() {
        // A frame of each variant encodes to a type the probe table knows.
        let frames = vec![
            ClientFrame::Hello(Hello {
                token: "t".into(),
                device: "d".into(),
                cursor: None,
                heartbeat_ms: None,
                history: None,
                agent: None,
                generation: None,
                transient: false,
                window: None,
            }),
            ClientFrame::Ping {},
            ClientFrame::Ack { seq: 1 },
            ClientFrame::ConvList { rid: "r".into() },
            ClientFrame::PushRegister(PushRegister {
                rid: "r".into(),
                registration: serde_json::Value::Null,
                previews: false,
            }),
            ClientFrame::Mute {
                rid: "r".into(),
                conv: 7,
                muted: true,
            },
        ];
        for f in &frames {
            assert!(CLIENT_TYPES.contains(&f.type_name()), "{}", f.type_name());
            let text = encode(f);
            assert_eq!(&decode_client(&text, &lim()).unwrap(), f);
        }
        // No stale or duplicate names in the table: its length is the
        // number of distinct variants (update both when adding a frame).
        let mut names: Vec<&str> = CLIENT_TYPES.to_vec();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), CLIENT_TYPES.len());
        assert_eq!(CLIENT_TYPES.len(), 14);
    }

    #[test]
    fn hello_wire_shape() {
        let f = decode_client(
            r#"{"type":"hello","token":"kw_x","device":"phone","cursor":{"epoch":"e1","seq":41},"heartbeat_ms":30000}"#,
            &lim(),
        )
        .unwrap();
        match f {
            ClientFrame::Hello(h) => {
                assert_eq!(
                    h.cursor,
                    Some(Cursor {
                        epoch: "e1".into(),
                        seq: 41
                    })
                );
                assert_eq!(h.heartbeat_ms, Some(30000));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn send_defaults_kind_to_text() {
        let f = decode_client(
            r#"{"type":"send","cid":"0123456789abcdef0123456789abcdef","conv":3,"body":"hi"}"#,
            &lim(),
        )
        .unwrap();
        assert!(matches!(f, ClientFrame::Send(Send { ref kind, .. }) if kind == "text"));
    }

    #[test]
    fn errors_are_classified() {
        let e = decode_client("{not json", &lim()).unwrap_err();
        assert_eq!(e.code, ErrorCode::Malformed);
        let e = decode_client("[1,2]", &lim()).unwrap_err();
        assert_eq!(e.code, ErrorCode::Malformed);
        let e = decode_client(r#"{"token":"x"}"#, &lim()).unwrap_err();
        assert_eq!(e.code, ErrorCode::Malformed);
        let e = decode_client(r#"{"type":"teleport","rid":"r1"}"#, &lim()).unwrap_err();
        assert_eq!(e.code, ErrorCode::UnknownType);
        assert_eq!(e.rid.as_deref(), Some("r1"));
        let e = decode_client(r#"{"type":"history","rid":"r2","conv":"x"}"#, &lim()).unwrap_err();
        assert_eq!(e.code, ErrorCode::Malformed);
        assert_eq!(e.rid.as_deref(), Some("r2"));
        let e = decode_client(
            r#"{"type":"send","cid":"short","conv":1,"body":""}"#,
            &lim(),
        )
        .unwrap_err();
        assert_eq!(e.code, ErrorCode::Invalid);
        let body = "x".repeat(lim().max_body_bytes + 1);
        let e = decode_client(
            &format!(
                r#"{{"type":"send","cid":"0123456789abcdef0123456789abcdef","conv":1,"body":"{body}"}}"#
            ),
            &lim(),
        )
        .unwrap_err();
        assert_eq!(e.code, ErrorCode::BodyTooLarge);
        let e = decode_client(
            r#"{"type":"send","cid":"0123456789abcdef0123456789abcdef","conv":1,"kind":"video","body":""}"#,
            &lim(),
        )
        .unwrap_err();
        assert_eq!(e.code, ErrorCode::UnsupportedKind);
        let e = decode_client(r#"{"type":"ack","seq":-1}"#, &lim()).unwrap_err();
        assert_eq!(e.code, ErrorCode::Malformed);
    }

    #[test]
    fn entry_wire_shape() {
        let f = ServerFrame::Entry(InboxEntry {
            seq: 7,
            item: EntryItem::Message(Message {
                id: 1,
                conv: 2,
                conv_seq: 3,
                from: "alice".into(),
                cid: "c".into(),
                kind: "text".into(),
                body: "hi".into(),
                ts: 5,
            }),
        });
        let text = encode(&f);
        assert_eq!(
            text,
            r#"{"type":"entry","seq":7,"message":{"id":1,"conv":2,"conv_seq":3,"from":"alice","cid":"c","kind":"text","body":"hi","ts":5}}"#
        );
        assert_eq!(decode_server(&text).unwrap(), f);
    }

    #[test]
    fn decoding_garbage_never_panics() {
        // A cheap deterministic sweep; the fuzz targets go further.
        let seeds = [
            r#"{"type":"hello"}"#,
            r#"{"type":"send","cid":null}"#,
            r#"{"type":1}"#,
            r#"{"type":"signal","conv":1,"data":{"a":[1,2,{"b":null}]}}"#,
            "\u{0}",
            "",
            "null",
        ];
        for s in seeds {
            for cut in 0..=s.len() {
                if s.is_char_boundary(cut) {
                    let _ = decode_client(&s[..cut], &lim());
                    let _ = decode_server(&s[..cut]);
                }
            }
        }
    }
}
