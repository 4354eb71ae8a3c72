//! The WebSocket upgrade and the socket under each session.
//!
//! The relay does the upgrade itself (RFC 6455 §4.2) instead of through
//! axum's extractor, to choose what sits under tungstenite: a [`Batched`]
//! writer. tungstenite writes each frame to its stream as soon as it is
//! given (`write_buffer_size` 0, so it keeps no buffer of its own); the
//! batched writer collects them and the session's flush sends a wake-up's
//! frames in one `write`, then frees the buffer — one syscall per batch
//! instead of one per entry, and no buffer left behind on an idle
//! connection.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Writes are collected until a flush; a flush writes them out and frees
/// the buffer. Reads pass through.
#[derive(Debug)]
pub(crate) struct Batched<S> {
    inner: S,
    buf: Vec<u8>,
    written: usize,
}

/// Collected bytes beyond which a write starts draining without a flush (a
/// bound, not a tuning knob: a session flushes after every wake-up).
const MAX_BATCH: usize = 256 * 1024;

impl<S> Batched<S> {
    pub(crate) fn new(inner: S) -> Self {
        Batched {
            inner,
            buf: Vec::new(),
            written: 0,
        }
    }
}

impl<S: AsyncWrite + Unpin> Batched<S> {
    /// Writes out what is collected; frees the buffer once all is out.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.buf = Vec::new();
        self.written = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Batched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Batched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.buf.len() >= MAX_BATCH {
            ready!(self.poll_drain(cx))?;
        }
        self.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Why a request is not a WebSocket upgrade.
pub(crate) fn not_an_upgrade(method: &Method, headers: &HeaderMap) -> bool {
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    *method != Method::GET
        || !has_token(header::CONNECTION, "upgrade")
        || !has_token(header::UPGRADE, "websocket")
        || headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .is_none_or(|v| v.as_bytes() != b"13")
        || headers.get(header::SEC_WEBSOCKET_KEY).is_none()
}

/// The `101 Switching Protocols` answer, selecting `protocol`.
pub(crate) fn switching_protocols(headers: &HeaderMap, protocol: &'static str) -> Response {
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|k| k.as_bytes())
        .unwrap_or_default();
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key);
    (
        StatusCode::SWITCHING_PROTOCOLS,
        [
            (header::CONNECTION, HeaderValue::from_static("upgrade")),
            (header::UPGRADE, HeaderValue::from_static("websocket")),
            (
                header::SEC_WEBSOCKET_ACCEPT,
                HeaderValue::from_str(&accept).unwrap_or(HeaderValue::from_static("")),
            ),
            (
                header::SEC_WEBSOCKET_PROTOCOL,
                HeaderValue::from_static(protocol),
            ),
        ],
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[tokio::test]
    async fn writes_wait_for_the_flush_and_go_out_together() {
        let (a, mut b) = tokio::io::duplex(1024);
        let mut w = Batched::new(a);
        w.write_all(b"one ").await.unwrap();
        w.write_all(b"two").await.unwrap();
        let mut got = [0u8; 16];
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), b.read(&mut got))
                .await
                .is_err(),
            "nothing before the flush"
        );
        w.flush().await.unwrap();
        let n = b.read(&mut got).await.unwrap();
        assert_eq!(&got[..n], b"one two");
        assert_eq!(w.buf.capacity(), 0, "the buffer is freed after a flush");
    }

    #[test]
    fn only_websocket_upgrades_pass() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        h.insert(
            header::SEC_WEBSOCKET_KEY,
            HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="),
        );
        assert!(!not_an_upgrade(&Method::GET, &h));
        assert!(not_an_upgrade(&Method::POST, &h));
        let mut v12 = h.clone();
        v12.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("12"),
        );
        assert!(not_an_upgrade(&Method::GET, &v12));
        let r = switching_protocols(&h, "keepwire.v1");
        assert_eq!(r.status(), StatusCode::SWITCHING_PROTOCOLS);
        // RFC 6455 §1.3's example.
        assert_eq!(
            r.headers()[header::SEC_WEBSOCKET_ACCEPT],
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
