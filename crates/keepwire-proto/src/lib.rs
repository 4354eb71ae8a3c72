//! keepwire wire protocol, version 1.
//!
//! This crate is the executable half of `PROTOCOL.md` at the repository root:
//! the frame types ([`ClientFrame`], [`ServerFrame`]), the JSON codec
//! ([`decode_client`], [`decode_server`], [`encode`]), the error codes sent in
//! error frames ([`ErrorCode`]), the WebSocket close codes and what a client
//! must do on each ([`CloseCode`], [`ClientAction`]), and the limits
//! ([`Limits`]).
//!
//! It performs no I/O, reads no clock and holds no state: it is shared by the
//! relay server, the client engine and the fuzz targets.
//!
//! Frames are JSON objects sent as WebSocket *text* frames, with a `"type"`
//! field naming the frame. The WebSocket subprotocol is [`SUBPROTOCOL`].
#![forbid(unsafe_code)]

mod codec;
mod codes;
mod frames;
mod limits;
mod time;
mod validate;

pub use codec::{
    DecodeError, decode_client, decode_server, encode, encode_entry, is_unknown_server_type,
};
pub use codes::{ClientAction, CloseCode, ErrorCode};
pub use frames::*;
pub use limits::Limits;
pub use time::Instant;
pub use validate::{
    ValidationError, is_safe_display_text, is_valid_cid, is_valid_device_id, is_valid_epoch,
    is_valid_request_id, is_valid_user_name,
};

/// The WebSocket subprotocol a v1 client must offer (`Sec-WebSocket-Protocol`).
pub const SUBPROTOCOL: &str = "keepwire.v1";

/// The largest integer the protocol carries (2^53 - 1: exact in every JSON
/// implementation). Larger sequence numbers from a peer are a violation.
pub const MAX_INT: u64 = (1 << 53) - 1;
