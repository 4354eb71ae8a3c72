//! The dispatcher: non-blocking enqueue, independent providers, retries,
//! per-device limit, metrics, shutdown.

use std::time::{Duration, Instant};

use keepwire_push::metrics::{FailureLabel, ProviderLabel};
use keepwire_push::{
    Dispatcher, EnqueueError, Message, Outcome, Provider, PushConfig, PushJob, Registration,
    RegistrationId, VapidKey,
};
use prometheus_client::registry::Registry;

use crate::support::fcm::FcmMock;
use crate::support::webpush::{SUBJECT, WebPushMock};
use crate::support::{Reply, TempDir, next_report, report_for, wait_until};

fn id() -> RegistrationId {
    RegistrationId::new("reg_d").unwrap()
}

fn load(text: &str) -> PushConfig {
    let dir = TempDir::new("cfg");
    PushConfig::load(&dir.write("push.toml", text)).unwrap()
}

fn webpush_section() -> String {
    format!("[webpush]\nsubject = \"{SUBJECT}\"\nallow_private = [\"127.0.0.1\"]\n")
}

fn job(n: u64, registration: &Registration) -> PushJob {
    PushJob {
        id: n,
        registration: registration.clone(),
        message: Message::wake(id()),
    }
}

fn metrics_text(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry).unwrap();
    out
}

/// The value of the sample `name{labels}` in a text exposition.
fn metric(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {sample} in\n{text}"))
}

fn wp(label: &'static str) -> ProviderLabel {
    ProviderLabel { provider: label }
}

#[tokio::test]
async fn a_hung_provider_blocks_neither_enqueue_nor_other_providers() {
    let fcm = FcmMock::start().await;
    let hung = WebPushMock::start().await;
    hung.state.lock().hang = true;
    let (endpoint, keys) = hung.subscribe("dev1");
    let cfg = load(&format!(
        "{}{}[limits]\nconcurrency = 2\nqueue = 60\nattempt_timeout = \"30s\"\ndevice_burst = 100\n",
        fcm.toml(),
        webpush_section()
    ));
    let mut registry = Registry::with_prefix("keepwire");
    let (push, mut reports) = Dispatcher::builder(cfg)
        .vapid(VapidKey::generate())
        .start(Some(&mut registry))
        .unwrap();
    let web = Registration::web_push(
        &endpoint,
        &keys.push_keys().p256dh_base64(),
        &keys.push_keys().auth_base64(),
    )
    .unwrap();

    // Fill the Web Push lane: every enqueue returns at once.
    let started = Instant::now();
    for n in 0..60 {
        push.enqueue(job(n, &web)).unwrap();
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(200),
        "60 enqueues took {took:?}"
    );
    wait_until("two hung requests", Duration::from_secs(5), || {
        hung.pushed().len() == 2
    })
    .await;
    // A full queue is refused, counted and reported to the caller.
    assert_eq!(
        push.enqueue(job(99, &web)),
        Err(EnqueueError::QueueFull(Provider::WebPush))
    );
    assert_eq!(
        push.metrics()
            .queue_full
            .get_or_create(&wp("webpush"))
            .get(),
        1
    );

    // FCM is unaffected.
    let android = Registration::fcm("tok:en-1").unwrap();
    let t = Instant::now();
    push.enqueue(job(1000, &android)).unwrap();
    let (r, others) = report_for(&mut reports, 1000, Duration::from_secs(5)).await;
    assert!(matches!(r.outcome, Outcome::Delivered { .. }), "{r:?}");
    assert!(others.is_empty());
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "FCM waited {:?}",
        t.elapsed()
    );

    assert_eq!(push.queue_depth(Provider::WebPush), 60);
    assert_eq!(
        hung.pushed().len(),
        2,
        "concurrency bounds the hung provider"
    );
    let text = metrics_text(&registry);
    assert!(
        text.contains("keepwire_push_queue_depth{provider=\"webpush\"} 60"),
        "{text}"
    );
    assert!(
        text.contains("keepwire_push_queue_depth{provider=\"fcm\"} 0"),
        "{text}"
    );
    let oldest = metric(
        &text,
        "keepwire_push_oldest_pending_seconds{provider=\"webpush\"}",
    );
    assert!(oldest > 0.0 && oldest < 30.0, "oldest pending {oldest}");
    assert!(
        text.contains("keepwire_push_sent_total{provider=\"fcm\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("keepwire_push_latency_seconds_count{provider=\"fcm\"} 1"),
        "{text}"
    );
    assert!(
        !text.contains("tok:en") && !text.contains("/push/dev1"),
        "no token or endpoint in metrics"
    );

    // Shutdown reports every push left, once.
    push.shutdown(Duration::ZERO).await;
    let mut abandoned = std::collections::HashSet::new();
    for _ in 0..60 {
        let r = next_report(&mut reports, Duration::from_secs(5)).await;
        assert_eq!(r.outcome, Outcome::Abandoned);
        assert!(abandoned.insert(r.id));
    }
    assert_eq!(
        push.enqueue(job(2000, &android)),
        Err(EnqueueError::ShuttingDown)
    );
    assert_eq!(
        push.metrics()
            .failed
            .get_or_create(&FailureLabel {
                provider: "webpush",
                reason: "abandoned"
            })
            .get(),
        60
    );
}

#[tokio::test]
async fn transient_failures_are_retried_then_given_up() {
    let mock = WebPushMock::start().await;
    let (endpoint, keys) = mock.subscribe("dev1");
    let cfg = load(&format!(
        "{}[limits]\nmax_attempts = 3\nbackoff_base = \"20ms\"\nbackoff_max = \"100ms\"\n",
        webpush_section()
    ));
    let (push, mut reports) = Dispatcher::builder(cfg)
        .vapid(VapidKey::generate())
        .start(None)
        .unwrap();
    let web = Registration::web_push(
        &endpoint,
        &keys.push_keys().p256dh_base64(),
        &keys.push_keys().auth_base64(),
    )
    .unwrap();

    // Two failures, then success.
    mock.reply(Reply::new(503, ""));
    mock.reply(Reply::new(500, ""));
    push.enqueue(job(1, &web)).unwrap();
    let r = next_report(&mut reports, Duration::from_secs(5)).await;
    assert!(
        matches!(r.outcome, Outcome::Delivered { attempts: 3, .. }),
        "{r:?}"
    );

    // Failing every time: given up after max_attempts, reported, counted.
    for _ in 0..3 {
        mock.reply(Reply::new(429, ""));
    }
    push.enqueue(job(2, &web)).unwrap();
    let r = next_report(&mut reports, Duration::from_secs(5)).await;
    match &r.outcome {
        Outcome::GaveUp {
            attempts: 3,
            reason,
        } => assert!(reason.contains("429"), "{reason}"),
        other => panic!("{other:?}"),
    }
    let m = push.metrics();
    assert_eq!(m.retried.get_or_create(&wp("webpush")).get(), 4);
    assert_eq!(
        m.failed
            .get_or_create(&FailureLabel {
                provider: "webpush",
                reason: "gave_up"
            })
            .get(),
        1
    );
    assert_eq!(mock.pushed().len(), 6);
    push.shutdown(Duration::ZERO).await;
}

#[tokio::test]
async fn a_device_gets_a_burst_then_one_push_per_interval() {
    let fcm = FcmMock::start().await;
    let cfg = load(&format!(
        "{}[limits]\ndevice_burst = 3\ndevice_interval = \"300ms\"\n",
        fcm.toml()
    ));
    let (push, mut reports) = Dispatcher::builder(cfg).start(None).unwrap();
    let busy = Registration::fcm("busy-device").unwrap();
    let quiet = Registration::fcm("quiet-device").unwrap();
    for n in 0..5 {
        push.enqueue(job(n, &busy)).unwrap();
    }
    push.enqueue(job(10, &quiet)).unwrap();
    for _ in 0..6 {
        let r = next_report(&mut reports, Duration::from_secs(5)).await;
        assert!(matches!(r.outcome, Outcome::Delivered { .. }), "{r:?}");
    }
    let sends = fcm.sends();
    let busy_at: Vec<_> = sends
        .iter()
        .filter(|s| s.message["token"] == "busy-device")
        .map(|s| s.at)
        .collect();
    let quiet_at = sends
        .iter()
        .find(|s| s.message["token"] == "quiet-device")
        .unwrap()
        .at;
    assert_eq!(busy_at.len(), 5);
    let t0 = busy_at[0];
    assert!(
        busy_at[2] - t0 < Duration::from_millis(250),
        "the burst goes at once"
    );
    assert!(
        busy_at[3] - t0 >= Duration::from_millis(280),
        "4th after {:?}",
        busy_at[3] - t0
    );
    assert!(
        busy_at[4] - t0 >= Duration::from_millis(580),
        "5th after {:?}",
        busy_at[4] - t0
    );
    assert!(
        quiet_at - t0 < Duration::from_millis(250),
        "another device is not held back"
    );
    assert!(push.metrics().throttled.get_or_create(&wp("fcm")).get() >= 2);
    push.shutdown(Duration::ZERO).await;
}

#[tokio::test]
async fn unconfigured_providers_and_registrations() {
    let fcm = FcmMock::start().await;
    let (push, _reports) = Dispatcher::builder(load(&fcm.toml())).start(None).unwrap();
    let apns = Registration::apns(
        &"ab".repeat(32),
        keepwire_push::ApnsEnvironment::Production,
        "com.example.chat",
    )
    .unwrap();
    assert_eq!(
        push.enqueue(job(1, &apns)),
        Err(EnqueueError::NotConfigured(Provider::Apns))
    );
    assert!(push.check_registration(&apns).is_err());
    assert!(
        push.check_registration(&Registration::fcm("t").unwrap())
            .is_ok()
    );
    assert_eq!(push.vapid_public_key(), None);
    assert!(push.has_provider(Provider::Fcm) && !push.has_provider(Provider::WebPush));
    // Web Push without a VAPID key cannot start.
    let err = Dispatcher::builder(load(&webpush_section()))
        .start(None)
        .unwrap_err();
    assert!(err.to_string().contains("VAPID"), "{err}");
}

/// Collects formatted log lines.
#[derive(Clone, Default)]
struct LogBuffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn logs_name_registrations_by_key_never_by_token_or_endpoint() {
    let logs = LogBuffer::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    // The test runtime is single-threaded: the dispatcher's tasks log here too.
    let _guard = tracing::subscriber::set_default(subscriber);

    let fcm = FcmMock::start().await;
    let web = WebPushMock::start().await;
    let (endpoint, keys) = web.subscribe("secret-subscription");
    let cfg = load(&format!(
        "{}{}[limits]\nqueue = 2\n",
        fcm.toml(),
        webpush_section()
    ));
    let (push, mut reports) = Dispatcher::builder(cfg)
        .vapid(VapidKey::generate())
        .start(None)
        .unwrap();
    let android = Registration::fcm("SECRET-FCM-TOKEN").unwrap();
    let browser = Registration::web_push(
        &endpoint,
        &keys.push_keys().p256dh_base64(),
        &keys.push_keys().auth_base64(),
    )
    .unwrap();

    fcm.state.reply(Reply::new(
        404,
        r#"{"error":{"code":404,"status":"NOT_FOUND","details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"UNREGISTERED"}]}}"#,
    ));
    fcm.state.reply(Reply::new(
        403,
        r#"{"error":{"code":403,"status":"PERMISSION_DENIED"}}"#,
    ));
    web.reply(Reply::new(400, "bad SECRET-FCM-TOKEN secret-subscription"));
    push.enqueue(job(1, &android)).unwrap();
    let (r1, _) = report_for(&mut reports, 1, Duration::from_secs(5)).await;
    push.enqueue(job(2, &android)).unwrap();
    let (r2, _) = report_for(&mut reports, 2, Duration::from_secs(5)).await;
    push.enqueue(job(3, &browser)).unwrap();
    let (r3, _) = report_for(&mut reports, 3, Duration::from_secs(5)).await;
    assert!(matches!(r1.outcome, Outcome::Unregistered { .. }), "{r1:?}");
    assert!(matches!(r2.outcome, Outcome::ConfigError { .. }), "{r2:?}");
    assert!(matches!(r3.outcome, Outcome::Rejected { .. }), "{r3:?}");
    for n in 0..3 {
        let _ = push.enqueue(job(10 + n, &android));
    }
    push.shutdown(Duration::ZERO).await;

    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(text.contains("push registration is dead"), "{text}");
    assert!(text.contains("push configuration error"), "{text}");
    assert!(text.contains("push rejected"), "{text}");
    assert!(text.contains("push queue full"), "{text}");
    assert!(
        text.contains(&android.key().to_string()),
        "logs name the registration key"
    );
    for secret in [
        "SECRET-FCM-TOKEN",
        "secret-subscription",
        &keys.push_keys().auth_base64(),
    ] {
        assert!(
            !text.contains(secret),
            "{secret} leaked into the log:\n{text}"
        );
    }
    // Reports carry no secrets either.
    for r in [&r1, &r2, &r3] {
        let s = format!("{r:?}");
        assert!(
            !s.contains("SECRET") && !s.contains("secret-subscription"),
            "{s}"
        );
    }
}
