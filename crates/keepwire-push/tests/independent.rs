//! An independent implementation checks the crate's Web Push output: PyPI
//! `http-ece` decrypts the bodies the crate sends and `cryptography`
//! verifies its VAPID JWTs; and the crate decrypts what `http-ece`
//! encrypts. `tests/independent/setup.sh` installs them into a virtualenv
//! under the target dir (cached). If PyPI is unreachable the test says so
//! loudly and skips; any other failure fails.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use keepwire_push::clock::SystemClock;
use keepwire_push::webpush::WebPushClient;
use keepwire_push::{
    Attempt, Message, PushConfig, ReceiverKeys, Registration, RegistrationId, VapidKey, ece,
};
use serde_json::{Value, json};

use crate::support::TempDir;
use crate::support::webpush::{SUBJECT, WebPushMock};

fn here() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/independent")
}

/// The virtualenv's python, or None when PyPI is unreachable.
fn python() -> Option<PathBuf> {
    let venv = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("py-webpush");
    let status = Command::new("bash")
        .arg(here().join("setup.sh"))
        .arg(&venv)
        .status()
        .expect("run setup.sh");
    match status.code() {
        Some(0) => Some(venv.join("bin/python")),
        Some(3) => {
            eprintln!(
                "\n{}\n!!! SKIPPED: PyPI is unreachable, so the independent Web Push check (http-ece) did NOT run !!!\n{}\n",
                "!".repeat(90),
                "!".repeat(90)
            );
            None
        }
        other => panic!("tests/independent/setup.sh failed ({other:?})"),
    }
}

fn run(python: &PathBuf, args: &[&str]) -> String {
    let out = Command::new(python)
        .arg(here().join("webpush_check.py"))
        .args(args)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "webpush_check.py {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_owned()
}

#[tokio::test]
async fn http_ece_and_cryptography_accept_the_crates_pushes() {
    let Some(python) = python() else { return };
    let mock = WebPushMock::start().await;
    let (endpoint, device) = mock.subscribe("dev1");
    let dir = TempDir::new("indep");
    let cfg = PushConfig::load(&dir.write(
        "push.toml",
        format!(
            "previews = true\n[webpush]\nsubject = \"{SUBJECT}\"\nallow_private = [\"127.0.0.1\"]\n"
        ),
    ))
    .unwrap();
    let client = WebPushClient::new(
        cfg.webpush.as_ref().unwrap(),
        Arc::new(VapidKey::generate()),
        Arc::new(SystemClock),
        Duration::from_secs(5),
    )
    .unwrap();
    let reg = Registration::web_push(
        &endpoint,
        &device.push_keys().p256dh_base64(),
        &device.push_keys().auth_base64(),
    )
    .unwrap();
    let msg = Message::wake(RegistrationId::new("reg_x").unwrap()).with_preview("Zoë: ¿lunch? 🍉");
    assert!(matches!(
        client.send(&reg, &msg).await,
        Attempt::Delivered {
            preview_sent: true,
            ..
        }
    ));

    let pushed = mock.pushed().pop().unwrap();
    let body = dir.write("body.bin", &pushed.body);
    let private = URL_SAFE_NO_PAD.encode(&device.to_bytes()[..32]);
    let out = run(
        &python,
        &[
            "decrypt",
            body.to_str().unwrap(),
            &private,
            &device.push_keys().auth_base64(),
            &pushed.headers["authorization"],
            &format!("http://{}", mock.addr),
            SUBJECT,
        ],
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    let plain: Value = serde_json::from_str(v["plaintext"].as_str().unwrap()).unwrap();
    assert_eq!(
        plain,
        json!({"kw": "reg_x", "kind": "wake", "preview": "Zoë: ¿lunch? 🍉"})
    );
    assert_eq!(v["claims"]["sub"], SUBJECT);

    // The other direction: what http-ece encrypts, the crate decrypts (the
    // client side of `ece`).
    let rx = ReceiverKeys::generate();
    let sealed = run(
        &python,
        &[
            "encrypt",
            &rx.push_keys().p256dh_base64(),
            &rx.push_keys().auth_base64(),
            "from python, with love",
        ],
    );
    let opened = ece::decrypt(&URL_SAFE_NO_PAD.decode(sealed).unwrap(), &rx).unwrap();
    assert_eq!(opened, b"from python, with love");
}
