//! Opening WebSocket transports: name resolution (pluggable), TCP, TLS
//! (rustls, certificates verified), the upgrade, and error classification.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use keepwire_core::{FailureKind, TransportEvent};
use keepwire_proto::SUBPROTOCOL;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

/// How long a closing connection waits for the relay's close frame.
const CLOSE_REPLY_WAIT: Duration = Duration::from_millis(500);

/// A boxed future, for object-safe async traits.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Name resolution, pluggable so tests (and apps with their own DNS) can
/// make it fail or hang.
pub trait Resolver: Send + Sync + 'static {
    /// Resolves `host` to socket addresses for `port`.
    fn resolve<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> BoxFuture<'a, io::Result<Vec<SocketAddr>>>;
}

/// The operating system's resolver (`getaddrinfo` through tokio).
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> BoxFuture<'a, io::Result<Vec<SocketAddr>>> {
        Box::pin(async move { Ok(tokio::net::lookup_host((host, port)).await?.collect()) })
    }
}

/// Wraps a resolver with a timeout and a cache of the last good answer per
/// name: a phone waking in Doze often fails its first lookups ("Failed host
/// lookup") although the relay's address has not changed.
pub(crate) struct CachingResolver {
    inner: Arc<dyn Resolver>,
    timeout: Duration,
    cache: Mutex<HashMap<(String, u16), Vec<SocketAddr>>>,
}

impl CachingResolver {
    pub(crate) fn new(inner: Arc<dyn Resolver>, timeout: Duration) -> Self {
        CachingResolver {
            inner,
            timeout,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Addresses for `host`, or `None` when resolution failed and nothing is cached.
    pub(crate) async fn resolve(&self, host: &str, port: u16) -> Option<Vec<SocketAddr>> {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Some(vec![SocketAddr::new(ip, port)]);
        }
        let key = (host.to_owned(), port);
        match tokio::time::timeout(self.timeout, self.inner.resolve(host, port)).await {
            Ok(Ok(addrs)) if !addrs.is_empty() => {
                self.cache
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key, addrs.clone());
                Some(addrs)
            }
            outcome => {
                tracing::debug!(target: "keepwire::ws", host, ?outcome, "name resolution failed");
                self.cache
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&key)
                    .cloned()
            }
        }
    }
}

/// What the driver tells a transport task.
#[derive(Debug)]
pub(crate) enum Outgoing {
    Frame(String),
    Close(u16),
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// TLS settings for `wss://` relays: the platform's verifier and trust store
/// (Android's trust manager, Apple's Security framework; on Linux the system
/// roots through webpki) plus `extra_roots`.
#[cfg(feature = "platform-verifier")]
pub(crate) fn tls_config(
    extra_roots: &[Vec<u8>],
) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    #[cfg(target_os = "android")]
    let verifier = {
        // Android's verifier takes no extra roots: an app trusts a private CA
        // through its network security configuration.
        if !extra_roots.is_empty() {
            return Err(rustls::Error::General(
                "extra root certificates are not supported with Android's verifier: \
                 trust the CA in the app's network security configuration"
                    .into(),
            ));
        }
        rustls_platform_verifier::Verifier::new(provider.clone())?
    };
    #[cfg(not(target_os = "android"))]
    let verifier = rustls_platform_verifier::Verifier::new_with_extra_roots(
        extra_roots
            .iter()
            .map(|d| rustls::pki_types::CertificateDer::from(d.clone())),
        provider.clone(),
    )?;
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// TLS settings for `wss://` relays: the system's root certificates
/// (`rustls-native-certs`) plus `extra_roots`.
#[cfg(not(feature = "platform-verifier"))]
pub(crate) fn tls_config(
    extra_roots: &[Vec<u8>],
) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    for der in extra_roots {
        roots.add(rustls::pki_types::CertificateDer::from(der.clone()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

async fn open(
    url: &str,
    resolver: &CachingResolver,
    tls: Arc<rustls::ClientConfig>,
) -> Result<Ws, FailureKind> {
    let mut req = url.into_client_request().map_err(|_| FailureKind::Io)?;
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static(SUBPROTOCOL),
    );
    let uri = req.uri().clone();
    let secure = uri.scheme_str() == Some("wss");
    let host = uri.host().ok_or(FailureKind::Io)?;
    let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
    let addrs = resolver.resolve(host, port).await.ok_or(FailureKind::Dns)?;
    let mut last = FailureKind::Io;
    let mut tcp = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => last = FailureKind::Refused,
            Err(e) if e.kind() == io::ErrorKind::TimedOut => last = FailureKind::Timeout,
            Err(_) => last = FailureKind::Io,
        }
    }
    let tcp = tcp.ok_or(last)?;
    let _ = tcp.set_nodelay(true);
    let connector = if secure {
        Connector::Rustls(tls)
    } else {
        Connector::Plain
    };
    let config = ws_config();
    let (ws, resp) =
        tokio_tungstenite::client_async_tls_with_config(req, tcp, Some(config), Some(connector))
            .await
            .map_err(|e| match e {
                tungstenite::Error::Http(resp) => FailureKind::HttpStatus(resp.status().as_u16()),
                tungstenite::Error::Tls(_) => FailureKind::Tls,
                tungstenite::Error::Io(e) if e.kind() == io::ErrorKind::InvalidData => {
                    FailureKind::Tls
                }
                _ => FailureKind::Io,
            })?;
    let selected = resp
        .headers()
        .get("Sec-WebSocket-Protocol")
        .and_then(|v| v.to_str().ok());
    if selected != Some(SUBPROTOCOL) {
        return Err(FailureKind::HttpStatus(resp.status().as_u16()));
    }
    Ok(ws)
}

/// The WebSocket settings of every client connection.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(0)
        .max_message_size(Some(16 * 1024 * 1024))
}

/// WebSocket conformance (Autobahn|Testsuite `fuzzingserver`): opens `url`
/// with the client's WebSocket stack and settings, without the keepwire
/// subprotocol, and echoes every message until the peer closes. Not part of
/// the protocol; used by `scripts/autobahn.sh`.
#[doc(hidden)]
pub async fn conformance_echo(url: &str) -> Result<(), tungstenite::Error> {
    let (ws, _) =
        tokio_tungstenite::connect_async_with_config(url, Some(ws_config()), true).await?;
    let (mut sink, mut stream) = ws.split();
    while let Some(msg) = stream.next().await {
        // tungstenite answers pings and closes itself; keep polling so the
        // close reply goes out.
        if let m @ (Message::Text(_) | Message::Binary(_)) = msg? {
            sink.send(m).await?;
        }
    }
    Ok(())
}

/// Runs one transport: opens it, then pumps frames both ways until either
/// side closes. Reports to the driver with `(id, event)`.
pub(crate) async fn run(
    id: u64,
    url: String,
    resolver: Arc<CachingResolver>,
    tls: Arc<rustls::ClientConfig>,
    events: mpsc::Sender<(u64, TransportEvent)>,
    mut outgoing: mpsc::Receiver<Outgoing>,
) {
    let ws = match open(&url, &resolver, tls).await {
        Ok(ws) => ws,
        Err(kind) => {
            let _ = events.send((id, TransportEvent::Failed(kind))).await;
            return;
        }
    };
    if events.send((id, TransportEvent::Opened)).await.is_err() {
        return;
    }
    let (mut sink, mut stream) = ws.split();
    loop {
        tokio::select! {
            out = outgoing.recv() => match out {
                Some(Outgoing::Frame(text)) => {
                    if sink.send(Message::Text(text.into())).await.is_err() {
                        let _ = events.send((id, TransportEvent::Closed(None))).await;
                        return;
                    }
                }
                Some(Outgoing::Close(code)) => {
                    let frame = CloseFrame { code: WsCloseCode::from(code), reason: "".into() };
                    let _ = tokio::time::timeout(Duration::from_secs(1), sink.send(Message::Close(Some(frame)))).await;
                    // The closing handshake (RFC 6455 §7): wait briefly for the
                    // relay's close, so it has read everything sent before it.
                    // Dropping the socket at once can reset the connection
                    // while the relay still has our last frames unread, and a
                    // reset discards them (a signal sent just before exiting).
                    let _ = tokio::time::timeout(CLOSE_REPLY_WAIT, async {
                        while let Some(Ok(msg)) = stream.next().await {
                            if matches!(msg, Message::Close(_)) {
                                break;
                            }
                        }
                    })
                    .await;
                    return;
                }
                // The driver forgot this transport.
                None => return,
            },
            msg = stream.next() => match msg {
                Some(Ok(Message::Text(t))) => {
                    if events.send((id, TransportEvent::Frame(t.as_str().to_owned()))).await.is_err() {
                        return;
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    let code = frame.map(|f| u16::from(f.code));
                    let _ = sink.flush().await;
                    let _ = events.send((id, TransportEvent::Closed(code))).await;
                    return;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => {
                    let _ = events.send((id, TransportEvent::Closed(None))).await;
                    return;
                }
            },
        }
    }
}
