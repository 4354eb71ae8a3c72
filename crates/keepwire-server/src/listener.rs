//! Accepting connections: plain TCP or TLS (rustls), HTTP/1.1 with a
//! deadline for the TLS handshake and the request head (slowloris), upgrades
//! to WebSocket, and a graceful stop that lets requests in flight finish.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Request};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::TlsFiles;

/// A TLS acceptor for the certificate chain and key in `files`.
pub(crate) fn tls_acceptor(files: &TlsFiles) -> io::Result<TlsAcceptor> {
    let bad = |what: &str, path: &std::path::Path, e: &dyn std::fmt::Display| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} {}: {e}", path.display()),
        )
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| bad("cannot read the certificate", &files.cert, &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad("bad certificate PEM in", &files.cert, &e))?;
    if certs.is_empty() {
        return Err(bad("no certificate in", &files.cert, &"empty"));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| bad("cannot read a private key from", &files.key, &e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(io::Error::other)?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| bad("the key does not fit the certificate in", &files.cert, &e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Smallest read buffer hyper accepts (it panics below this).
const MIN_HEAD_BYTES: usize = 8192;

/// How connections are read: deadlines and sizes.
pub(crate) struct HttpLimits {
    /// Deadline for the TLS handshake and the request head.
    pub(crate) head_timeout: Duration,
    /// Largest request head buffered (larger: 431).
    pub(crate) max_head_bytes: usize,
}

/// Serves `app` on `listener` until `stop`, then waits up to `grace` for
/// HTTP requests in flight (upgraded WebSockets are tracked elsewhere).
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<TlsAcceptor>,
    limits: HttpLimits,
    stop: CancellationToken,
    grace: Duration,
) {
    let head_timeout = limits.head_timeout;
    let mut http = http1::Builder::new();
    // The head deadline runs from the connection's start, so a connection
    // that sends nothing, or a trickle, is cut as well. The read buffer is
    // capped, so an oversized head is refused (431) before it is all read,
    // instead of hyper's default of ~400 KB per connection.
    http.timer(TokioTimer::new())
        .header_read_timeout(head_timeout)
        .max_buf_size(limits.max_head_bytes.max(MIN_HEAD_BYTES))
        .keep_alive(true);
    let http = Arc::new(http);
    let requests = TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(target: "keepwire::server", error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let (app, http, tls, stop) = (app.clone(), http.clone(), tls.clone(), stop.clone());
        requests.spawn(async move {
            match tls {
                None => serve_connection(tcp, peer, app, &http, stop).await,
                Some(acceptor) => {
                    match tokio::time::timeout(head_timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => serve_connection(stream, peer, app, &http, stop).await,
                        Ok(Err(e)) => {
                            tracing::debug!(target: "keepwire::server", %peer, error = %e, "TLS handshake failed")
                        }
                        Err(_) => {
                            tracing::debug!(target: "keepwire::server", %peer, "TLS handshake timed out")
                        }
                    }
                }
            }
        });
    }
    drop(listener);
    requests.close();
    if tokio::time::timeout(grace, requests.wait()).await.is_err() {
        tracing::warn!(target: "keepwire::server", "HTTP requests still running after the shutdown grace");
    }
}

async fn serve_connection<S>(
    stream: S,
    peer: SocketAddr,
    app: Router,
    http: &http1::Builder,
    stop: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Handlers read the peer address as `ConnectInfo`, as with `axum::serve`.
    let svc = tower::ServiceExt::map_request(app, move |req: Request<hyper::body::Incoming>| {
        let mut req = req.map(axum::body::Body::new);
        req.extensions_mut().insert(ConnectInfo(peer));
        req
    });
    let conn = http
        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc))
        .with_upgrades();
    tokio::pin!(conn);
    let ended = tokio::select! {
        r = conn.as_mut() => r,
        _ = stop.cancelled() => {
            // Finish the request in flight, take no new one.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = ended {
        tracing::debug!(target: "keepwire::server", %peer, error = %e, "HTTP connection ended with an error");
    }
}
