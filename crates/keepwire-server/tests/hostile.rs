//! Hostile clients and browser safety: slowloris heads and TLS handshakes,
//! cross-site WebSocket hijacking (Origin allow-list), and `wss://` with a
//! certificate from a private CA.

use std::time::Duration;

use keepwire_proto::{ClientFrame, Hello, ServerFrame};
use keepwire_testkit::tls::TestPki;
use keepwire_testkit::{Incoming, WsClient, upgrade_status};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use keepwire_server::AdminStore as _;

use crate::support::{TestRelay, test_config};

/// Reads until the peer closes; returns how long that took.
async fn time_until_closed(s: &mut TcpStream, within: Duration) -> Duration {
    let started = tokio::time::Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(started + within, s.read(&mut buf)).await {
            Err(_) => panic!("the relay kept a stalled connection open for {within:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_request_heads_are_cut_and_others_are_served() {
    let mut config = test_config();
    config.request_head_timeout = Duration::from_millis(400);
    let relay = TestRelay::start_with(config, Default::default()).await;
    let token = relay.user("alice").await;
    // Fifty connections that start a request head and never finish it, one
    // byte at a time, plus some that send nothing at all.
    let mut stalled = Vec::new();
    for i in 0..50 {
        let mut s = TcpStream::connect(&relay.host_port).await.unwrap();
        if i % 2 == 0 {
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: web")
                .await
                .unwrap();
        }
        stalled.push(s);
    }
    // Meanwhile a real client connects and works.
    let mut ok = relay.connect(&token, "healthy").await;
    ok.barrier().await;
    for s in stalled.iter_mut() {
        let took = time_until_closed(s, Duration::from_secs(10)).await;
        assert!(took < Duration::from_secs(10));
    }
    // A trickle of header bytes does not keep a connection alive either.
    let mut s = TcpStream::connect(&relay.host_port).await.unwrap();
    let trickle = async {
        for b in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
            if s.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    trickle.await;
    time_until_closed(&mut s, Duration::from_secs(10)).await;
    ok.barrier().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_allowed_browser_origins_may_open_websockets() {
    let mut config = test_config();
    config.allowed_origins = vec!["https://chat.example".into()];
    let relay = TestRelay::start_with(config, Default::default()).await;
    let with_origin = |origin: &'static str| {
        let hp = relay.host_port.clone();
        async move { origin_upgrade(&hp, origin).await }
    };
    assert_eq!(with_origin("https://evil.example").await, 403);
    assert_eq!(with_origin("https://chat.example.evil.example").await, 403);
    assert_eq!(with_origin("null").await, 403);
    assert_eq!(with_origin("https://chat.example").await, 101);
    // Native apps send no Origin.
    let (status, _) = upgrade_status(&relay.host_port, "/", Some("keepwire.v1")).await;
    assert_eq!(status, 101);
    let (_, metrics) = keepwire_testkit::http_get(&relay.host_port, "/metrics").await;
    assert_eq!(
        keepwire_testkit::metric(&metrics, "keepwire_refused_upgrades_total"),
        3
    );
}

/// An upgrade request with an Origin header; the status.
async fn origin_upgrade(host_port: &str, origin: &str) -> u16 {
    let mut s = TcpStream::connect(host_port).await.unwrap();
    let req = format!(
        "GET / HTTP/1.1\r\nHost: {host_port}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Protocol: keepwire.v1\r\nOrigin: {origin}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 2048];
    let n = s.read(&mut buf).await.unwrap();
    String::from_utf8_lossy(&buf[..n])
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_with_a_private_ca_and_stalled_tls_handshakes_are_cut() {
    let pki = TestPki::new();
    let mut config = test_config();
    config.tls = Some(pki.relay_files());
    config.request_head_timeout = Duration::from_millis(400);
    let relay = TestRelay::start_with(config, Default::default()).await;
    assert!(relay.url.starts_with("wss://"), "{}", relay.url);
    let token = relay.user("alice").await;

    // A client trusting the CA gets through, by IP and by name.
    for url in [
        relay.url.clone(),
        relay.url.replace("127.0.0.1", "localhost"),
    ] {
        let mut c = WsClient::open_with(&url, Some(pki.client_config()))
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        c.send(&ClientFrame::Hello(Hello {
            token: token.clone(),
            device: "tls".into(),
            cursor: None,
            heartbeat_ms: None,
            history: None,
            agent: None,
            generation: None,
            transient: false,
            window: None,
        }))
        .await;
        match c.recv().await {
            Incoming::Frame(ServerFrame::Welcome(_)) => {}
            other => panic!("expected a welcome over TLS, got {other:?}"),
        }
    }
    // Without the CA: the certificate is refused.
    let err = WsClient::open_with(&relay.url, Some(TestPki::new().client_config()))
        .await
        .err()
        .expect("an unknown CA must be refused");
    assert!(err.to_string().contains("certificate"), "{err}");
    // Plain ws:// to the TLS port gets nowhere.
    assert!(
        WsClient::open(&relay.url.replace("wss://", "ws://"))
            .await
            .is_err()
    );
    // A TCP connection that never starts its TLS handshake is cut.
    let mut s = TcpStream::connect(&relay.host_port).await.unwrap();
    time_until_closed(&mut s, Duration::from_secs(10)).await;
}

/// Writes `head` (an HTTP request head) while reading the answer; returns the
/// status line's code, or `None` if the relay closed without one.
async fn status_of_head(host_port: &str, head: Vec<u8>) -> Option<u16> {
    let s = TcpStream::connect(host_port).await.unwrap();
    let (mut r, mut w) = s.into_split();
    // The relay may answer and close before the head is all written: write
    // in the background and ignore write errors.
    let writer = tokio::spawn(async move {
        for chunk in head.chunks(4096) {
            if w.write_all(chunk).await.is_err() {
                return;
            }
        }
        let _ = w.flush().await;
        // Keep the write side open until the reader is done.
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = async {
        loop {
            match r.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("the relay answered or closed within 10 s");
    writer.abort();
    String::from_utf8_lossy(&buf)
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
}

fn head_with(extra_bytes: usize) -> Vec<u8> {
    let mut head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..extra_bytes / 1000 {
        head.extend_from_slice(format!("X-Pad-{i}: {}\r\n", "a".repeat(980)).as_bytes());
    }
    head.extend_from_slice(b"\r\n");
    head
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_heads_over_16_kib_are_refused_before_they_are_buffered() {
    let relay = TestRelay::start().await;
    // A head of a few KiB is served.
    assert_eq!(
        status_of_head(&relay.host_port, head_with(8_000)).await,
        Some(200)
    );
    // 20 KB and 400 KB heads, without any credentials, get 431 once the
    // first 16 KiB are in: hyper's default would buffer ~400 KB first.
    for size in [20_000, 400_000] {
        assert_eq!(
            status_of_head(&relay.host_port, head_with(size)).await,
            Some(431),
            "{size}-byte head"
        );
    }
    // The relay is fine.
    let (status, body) = keepwire_testkit::http_get(&relay.host_port, "/healthz").await;
    assert_eq!((status, body.trim()), (200, "ok"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_api_body_is_cut_off_with_408() {
    let mut config = test_config();
    config.request_body_timeout = Duration::from_millis(500);
    let relay = TestRelay::start_with(config, Default::default()).await;
    let (_, key) = relay.store.create_api_key("backend").await.unwrap();
    relay.user("alice").await;
    let body = br#"{"kind":"group","members":["alice"],"key":"k1","name":"a slow group name"}"#;
    let mut s = TcpStream::connect(&relay.host_port).await.unwrap();
    let head = format!(
        "POST /v1/conversations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let started = tokio::time::Instant::now();
    let (mut r, mut w) = s.into_split();
    // One byte every 100 ms: the body would take 7 s.
    let trickle = tokio::spawn(async move {
        for b in body {
            if w.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), r.read_to_end(&mut answer))
        .await
        .expect("the relay cut the trickle and closed the connection")
        .ok();
    let took = started.elapsed();
    trickle.abort();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("application/problem+json"), "{answer}");
    assert!(took < Duration::from_secs(3), "cut after {took:?}");
    // Nothing was created: the same request, sent whole, creates it now.
    let r = reqwest::Client::new()
        .post(format!("http://{}/v1/conversations", relay.host_port))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body(&body[..])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_scheme_is_case_insensitive() {
    let relay = TestRelay::start().await;
    let (_, key) = relay.store.create_api_key("backend").await.unwrap();
    relay.user("alice").await;
    let url = format!("http://{}/v1/users/alice/devices", relay.host_port);
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let r = reqwest::Client::new()
            .get(&url)
            .header("authorization", format!("{scheme} {key}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{scheme}");
    }
    let r = reqwest::Client::new()
        .get(&url)
        .header("authorization", format!("Basic {key}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}
