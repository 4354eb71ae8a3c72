//! Error codes (in `error` and `rejected` frames) and WebSocket close codes.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Stable error codes carried by `error` and `rejected` frames.
///
/// The connection stays open after any of them. Codes are snake_case strings
/// on the wire; a client must treat an unknown code like `internal`.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The frame is not valid JSON, or a field is missing or has the wrong type.
    Malformed,
    /// The frame's `type` is not one this protocol version knows.
    UnknownType,
    /// A field has a value outside its allowed form (see the message).
    Invalid,
    /// A frame that is only allowed once per connection (`hello`) was repeated.
    UnexpectedHello,
    /// The user is not a member of the conversation.
    NotMember,
    /// The user may not do this (e.g. remove another member without being the creator).
    Forbidden,
    /// The conversation does not exist.
    NoSuchConv,
    /// A named user does not exist.
    UnknownUser,
    /// The client id was used before by this device with a different message.
    CidConflict,
    /// The body is larger than the limit.
    BodyTooLarge,
    /// The group would exceed the maximum group size.
    GroupTooLarge,
    /// The message kind is not supported by this server.
    UnsupportedKind,
    /// An `ack` named a sequence that was never delivered on this connection.
    BadAck,
    /// Too many sends: wait `retry_after_ms`, then send again. Temporary.
    RateLimited,
    /// The server failed to handle the frame; retry later. Temporary.
    Internal,
}

impl ErrorCode {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Malformed => "malformed",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::Invalid => "invalid",
            ErrorCode::UnexpectedHello => "unexpected_hello",
            ErrorCode::NotMember => "not_member",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NoSuchConv => "no_such_conv",
            ErrorCode::UnknownUser => "unknown_user",
            ErrorCode::CidConflict => "cid_conflict",
            ErrorCode::BodyTooLarge => "body_too_large",
            ErrorCode::GroupTooLarge => "group_too_large",
            ErrorCode::UnsupportedKind => "unsupported_kind",
            ErrorCode::BadAck => "bad_ack",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Internal => "internal",
        }
    }

    /// The code of a wire spelling; an unknown one reads as `internal`
    /// (a newer relay's code: treat it like `internal`).
    pub fn from_wire(code: &str) -> ErrorCode {
        serde_json::from_value(serde_json::Value::String(code.to_owned()))
            .unwrap_or(ErrorCode::Internal)
    }

    /// True for codes after which the same request may succeed later.
    pub fn is_temporary(self) -> bool {
        matches!(self, ErrorCode::RateLimited | ErrorCode::Internal)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a client must do when a connection closes with a given code.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientAction {
    /// Reconnect with the usual jittered backoff.
    ReconnectWithBackoff,
    /// Reconnect soon: the server is going away; wait a random 0–5 s (spreads a
    /// restart's reconnect storm) without growing the backoff.
    ReconnectSoon,
    /// Reconnect at once, without waiting for a backoff delay.
    ReconnectNow,
    /// Ask the token provider for a new token once, then reconnect; if the new
    /// token is rejected too, stop.
    RefreshTokenOnce,
    /// Do not reconnect. Surface the reason to the app.
    Stop,
}

/// WebSocket close codes used by keepwire.
///
/// Standard codes (RFC 6455 §7.4.1) are used where they fit; keepwire's own
/// are in the private range 4000–4999.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CloseCode {
    /// 1000: normal closure (the client asked to close).
    Normal,
    /// 1001: the server is shutting down or restarting.
    GoingAway,
    /// 1002: the WebSocket framing was broken (e.g. a reserved opcode).
    ProtocolError,
    /// 1003: a binary frame was sent; keepwire v1 is text only.
    UnsupportedData,
    /// 1007: a text frame was not valid UTF-8.
    InvalidPayload,
    /// 1009: a frame exceeded the maximum frame size.
    MessageTooBig,
    /// 1011: the server hit an internal error.
    InternalError,
    /// 4001: the token is unknown, forged or malformed. Terminal.
    AuthFailed,
    /// 4002: the token has expired. Refresh once.
    TokenExpired,
    /// 4003: the token was revoked. Terminal.
    TokenRevoked,
    /// 4004: the client broke the protocol (bad first frame, too many bad frames).
    ProtocolViolation,
    /// 4005: a newer connection of the same device replaced this one. Terminal
    /// for this connection: reconnecting would kick the newer one off.
    Replaced,
    /// 4006: nothing was received within the idle timeout.
    HeartbeatTimeout,
    /// 4007: no valid `hello` within the handshake timeout.
    HandshakeTimeout,
    /// 4008: the client kept sending after being told to wait (rate-limit abuse).
    RateLimited,
    /// 4009: the user has too many open connections.
    TooManyConnections,
    /// 4010: this device was revoked. Terminal.
    DeviceRevoked,
    /// 4011: the server cannot continue this connection's replay (entries
    /// after the last one sent were trimmed by retention meanwhile).
    /// Reconnect at once with the stored cursor: `welcome` will carry the gap.
    Resync,
    /// 4012: a transient connection of the same device (a push wake-up in
    /// another process) took over while this one looked frozen. Not
    /// terminal: reconnect after a short jittered wait, which takes over
    /// again from the transient one.
    Yielded,
}

impl CloseCode {
    /// Every code, for documentation and tests.
    pub const ALL: [CloseCode; 19] = [
        CloseCode::Normal,
        CloseCode::GoingAway,
        CloseCode::ProtocolError,
        CloseCode::UnsupportedData,
        CloseCode::InvalidPayload,
        CloseCode::MessageTooBig,
        CloseCode::InternalError,
        CloseCode::AuthFailed,
        CloseCode::TokenExpired,
        CloseCode::TokenRevoked,
        CloseCode::ProtocolViolation,
        CloseCode::Replaced,
        CloseCode::HeartbeatTimeout,
        CloseCode::HandshakeTimeout,
        CloseCode::RateLimited,
        CloseCode::TooManyConnections,
        CloseCode::DeviceRevoked,
        CloseCode::Resync,
        CloseCode::Yielded,
    ];

    /// The numeric code.
    pub fn code(self) -> u16 {
        match self {
            CloseCode::Normal => 1000,
            CloseCode::GoingAway => 1001,
            CloseCode::ProtocolError => 1002,
            CloseCode::UnsupportedData => 1003,
            CloseCode::InvalidPayload => 1007,
            CloseCode::MessageTooBig => 1009,
            CloseCode::InternalError => 1011,
            CloseCode::AuthFailed => 4001,
            CloseCode::TokenExpired => 4002,
            CloseCode::TokenRevoked => 4003,
            CloseCode::ProtocolViolation => 4004,
            CloseCode::Replaced => 4005,
            CloseCode::HeartbeatTimeout => 4006,
            CloseCode::HandshakeTimeout => 4007,
            CloseCode::RateLimited => 4008,
            CloseCode::TooManyConnections => 4009,
            CloseCode::DeviceRevoked => 4010,
            CloseCode::Resync => 4011,
            CloseCode::Yielded => 4012,
        }
    }

    /// The code for a number, if keepwire defines it.
    pub fn from_code(code: u16) -> Option<CloseCode> {
        CloseCode::ALL.into_iter().find(|c| c.code() == code)
    }

    /// A short reason phrase sent in the close frame.
    pub fn reason(self) -> &'static str {
        match self {
            CloseCode::Normal => "normal closure",
            CloseCode::GoingAway => "server going away",
            CloseCode::ProtocolError => "WebSocket protocol error",
            CloseCode::UnsupportedData => "binary frames are not supported",
            CloseCode::InvalidPayload => "text frame is not valid UTF-8",
            CloseCode::MessageTooBig => "frame too big",
            CloseCode::InternalError => "internal error",
            CloseCode::AuthFailed => "authentication failed",
            CloseCode::TokenExpired => "token expired",
            CloseCode::TokenRevoked => "token revoked",
            CloseCode::ProtocolViolation => "protocol violation",
            CloseCode::Replaced => "replaced by a newer connection of this device",
            CloseCode::HeartbeatTimeout => "heartbeat timeout",
            CloseCode::HandshakeTimeout => "handshake timeout",
            CloseCode::RateLimited => "rate limit exceeded",
            CloseCode::TooManyConnections => "too many connections for this user",
            CloseCode::DeviceRevoked => "device revoked",
            CloseCode::Resync => "history trimmed under this connection; reconnect to resync",
            CloseCode::Yielded => "a push wake-up of this device took over for a moment; reconnect",
        }
    }

    /// What a client must do after a close with this code.
    pub fn client_action(self) -> ClientAction {
        match self {
            CloseCode::GoingAway | CloseCode::Yielded => ClientAction::ReconnectSoon,
            CloseCode::Resync => ClientAction::ReconnectNow,
            CloseCode::TokenExpired => ClientAction::RefreshTokenOnce,
            CloseCode::AuthFailed
            | CloseCode::TokenRevoked
            | CloseCode::Replaced
            | CloseCode::DeviceRevoked => ClientAction::Stop,
            CloseCode::Normal
            | CloseCode::ProtocolError
            | CloseCode::InvalidPayload
            | CloseCode::UnsupportedData
            | CloseCode::MessageTooBig
            | CloseCode::InternalError
            | CloseCode::ProtocolViolation
            | CloseCode::HeartbeatTimeout
            | CloseCode::HandshakeTimeout
            | CloseCode::RateLimited
            | CloseCode::TooManyConnections => ClientAction::ReconnectWithBackoff,
        }
    }
}

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.code(), self.reason())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_round_trip_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for c in CloseCode::ALL {
            assert!(seen.insert(c.code()), "duplicate code {}", c.code());
            assert_eq!(CloseCode::from_code(c.code()), Some(c));
            assert!(
                c.reason().len() <= 123,
                "close reasons must fit a control frame"
            );
        }
        assert_eq!(CloseCode::from_code(4999), None);
    }

    #[test]
    fn terminal_codes_stop() {
        for c in [
            CloseCode::AuthFailed,
            CloseCode::TokenRevoked,
            CloseCode::Replaced,
        ] {
            assert_eq!(c.client_action(), ClientAction::Stop);
        }
        assert_eq!(
            CloseCode::TokenExpired.client_action(),
            ClientAction::RefreshTokenOnce
        );
        assert_eq!(
            CloseCode::GoingAway.client_action(),
            ClientAction::ReconnectSoon
        );
    }

    #[test]
    fn error_code_spelling_matches_serde() {
        for code in [
            ErrorCode::Malformed,
            ErrorCode::UnknownType,
            ErrorCode::Invalid,
            ErrorCode::UnexpectedHello,
            ErrorCode::NotMember,
            ErrorCode::Forbidden,
            ErrorCode::NoSuchConv,
            ErrorCode::UnknownUser,
            ErrorCode::CidConflict,
            ErrorCode::BodyTooLarge,
            ErrorCode::GroupTooLarge,
            ErrorCode::UnsupportedKind,
            ErrorCode::BadAck,
            ErrorCode::RateLimited,
            ErrorCode::Internal,
        ] {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
        }
    }
}
