//! The device's push registration (what it asks the relay to wake it
//! through), kept in the client store so it survives restarts, and the
//! reading of push payloads.
//!
//! The registration is saved first and sent after: `push_register` goes out
//! at once when this process holds a connection, and after every `welcome`
//! while it is *due* — changed since the relay last accepted it, never
//! accepted in the relay's current epoch (a relay restored from a backup
//! may not have it), or accepted more than [`REFRESH`] ago (the relay drops
//! registrations not refreshed for 60 days). A registration the relay
//! refused is not offered again for [`RETRY_REFUSED`] unless the app sets
//! another one; one for a provider the relay does not offer (`welcome.push`)
//! is not sent at all.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use keepwire_proto::MuteMark;
use keepwire_push::ece::{self, ReceiverKeys};
use keepwire_push::{ApnsEnvironment, Registration};
use rusqlite::{Connection, OptionalExtension as _};
use serde::{Deserialize, Serialize};

use crate::store::{Store, StoreError};

/// How often an accepted registration is sent again (the relay drops one
/// not refreshed for 60 days; the issue asks for at least monthly).
pub const REFRESH: Duration = Duration::from_secs(7 * 24 * 3600);

/// How long a registration the relay refused waits before it is offered
/// again (unless the app sets another).
pub const RETRY_REFUSED: Duration = Duration::from_secs(24 * 3600);

/// The store key of the registration state.
pub(crate) const PUSH_META: &str = "push";
/// The store key of the RFC 8291 keys keepwire made (base64url of
/// [`ReceiverKeys::to_bytes`]; secret).
pub(crate) const PUSH_KEYS_META: &str = "push_keys";

/// A push registration as the app hands it over: the token the OS gave it,
/// or a Web Push subscription. `Debug` hides tokens and endpoints.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PushRegistration {
    /// Firebase Cloud Messaging (Android): the registration token.
    Fcm {
        /// The FCM registration token.
        token: String,
    },
    /// Apple Push Notification service (iOS): the device token (hex), the
    /// app's bundle id (one of the relay's configured topics) and the
    /// gateway the token belongs to.
    Apns {
        /// The device token, hex.
        token: String,
        /// The bundle id.
        topic: String,
        /// `true` for the sandbox gateway (development builds).
        sandbox: bool,
    },
    /// Web Push (a browser's subscription or a UnifiedPush distributor's
    /// endpoint). Without `keys`, keepwire makes a P-256 key pair and auth
    /// secret for this device (kept in the store) and decrypts the pushes in
    /// [`crate::Client::on_push`].
    WebPush {
        /// The push resource URL (`https`).
        endpoint: String,
        /// The subscription's keys (base64url), when made elsewhere.
        keys: Option<WebPushKeys>,
    },
}

impl std::fmt::Debug for PushRegistration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PushRegistration::Fcm { .. } => f.write_str("PushRegistration::Fcm(<redacted>)"),
            PushRegistration::Apns { topic, sandbox, .. } => f
                .debug_struct("PushRegistration::Apns")
                .field("topic", topic)
                .field("sandbox", sandbox)
                .finish_non_exhaustive(),
            PushRegistration::WebPush { keys, .. } => f
                .debug_struct("PushRegistration::WebPush")
                .field("own_keys", &keys.is_none())
                .finish_non_exhaustive(),
        }
    }
}

/// A Web Push subscription's public keys (RFC 8291), base64url.
#[derive(Clone, PartialEq, Eq)]
pub struct WebPushKeys {
    /// The P-256 public key (uncompressed point).
    pub p256dh: String,
    /// The 16-byte auth secret.
    pub auth: String,
}

/// Where the device's push registration stands.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PushStatus {
    /// The provider (`fcm`, `apns`, `webpush`); `None`: no registration.
    pub provider: Option<String>,
    /// keepwire made the Web Push keys (and decrypts the pushes itself).
    pub own_keys: bool,
    /// The registration id the relay gave (every push carries it).
    pub id: Option<String>,
    /// When the relay last accepted it.
    pub registered_at: Option<SystemTime>,
    /// A change (a new registration or a removal) the relay has not
    /// accepted yet: sent when connected.
    pub pending: bool,
    /// Why the relay refused it (or cannot take it), if it did.
    pub last_error: Option<String>,
}

/// The registration state in the store.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub(crate) struct PushState {
    /// The wire form (`push_register.registration`); `None`: removed.
    pub registration: Option<serde_json::Value>,
    /// Bumped by every change, so a late answer for an older one is ignored.
    pub version: u64,
    /// Changed since the relay last answered.
    pub dirty: bool,
    /// keepwire made the keys.
    pub own_keys: bool,
    /// The relay's registration id.
    pub id: Option<String>,
    /// When the relay last accepted it (ms since the Unix epoch).
    pub accepted_ms: Option<i64>,
    /// The relay epoch it was accepted in.
    pub accepted_epoch: Option<String>,
    /// The last refusal (or why it cannot be sent).
    pub last_error: Option<String>,
    /// When it was refused (ms since the Unix epoch).
    pub refused_ms: Option<i64>,
}

impl PushState {
    /// Whether a `push_register` should go out on a session of `epoch`.
    pub fn due(&self, epoch: Option<&str>, now_ms: i64) -> bool {
        if self.dirty {
            return true;
        }
        if self.registration.is_none() {
            return false;
        }
        if let Some(at) = self.refused_ms {
            return elapsed(at, now_ms) >= RETRY_REFUSED;
        }
        self.accepted_epoch.as_deref() != epoch
            || self
                .accepted_ms
                .is_none_or(|at| elapsed(at, now_ms) >= REFRESH)
    }

    /// The provider the registration names.
    pub fn provider(&self) -> Option<String> {
        self.registration
            .as_ref()?
            .get("provider")?
            .as_str()
            .map(str::to_owned)
    }

    /// What the app sees.
    pub fn status(&self) -> PushStatus {
        PushStatus {
            provider: self.provider(),
            own_keys: self.own_keys && self.registration.is_some(),
            id: self.id.clone(),
            registered_at: self
                .accepted_ms
                .filter(|_| self.registration.is_some())
                .map(|ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)),
            pending: self.dirty,
            last_error: self.last_error.clone(),
        }
    }
}

fn elapsed(from_ms: i64, now_ms: i64) -> Duration {
    Duration::from_millis(now_ms.saturating_sub(from_ms).max(0) as u64)
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Validates `reg` and turns it into the wire form. `own_keys` are this
/// device's keys: a Web Push registration without keys of its own uses
/// them, and FCM and APNs registrations carry them so the relay can
/// encrypt previews to this device.
pub(crate) fn wire_form(
    reg: &PushRegistration,
    own_keys: Option<&ReceiverKeys>,
) -> Result<serde_json::Value, String> {
    let with_own = |r: Registration| match own_keys {
        Some(k) => r.with_keys(k.push_keys().clone()),
        None => r,
    };
    let r = match reg {
        PushRegistration::Fcm { token } => Registration::fcm(token).map(with_own),
        PushRegistration::Apns {
            token,
            topic,
            sandbox,
        } => {
            let env = if *sandbox {
                ApnsEnvironment::Sandbox
            } else {
                ApnsEnvironment::Production
            };
            Registration::apns(token, env, topic).map(with_own)
        }
        PushRegistration::WebPush {
            endpoint,
            keys: Some(k),
        } => Registration::web_push(endpoint, &k.p256dh, &k.auth),
        PushRegistration::WebPush {
            endpoint,
            keys: None,
        } => {
            let keys = own_keys.ok_or("no keys were made for this Web Push registration")?;
            let k = keys.push_keys();
            Registration::web_push(endpoint, &k.p256dh_base64(), &k.auth_base64())
        }
    }
    .map_err(|e| e.to_string())?;
    serde_json::to_value(&r).map_err(|e| e.to_string())
}

/// Encodes keys for the store.
pub(crate) fn encode_keys(k: &ReceiverKeys) -> String {
    URL_SAFE_NO_PAD.encode(k.to_bytes())
}

/// Decodes keys from the store.
pub(crate) fn decode_keys(s: &str) -> Option<ReceiverKeys> {
    let bytes = URL_SAFE_NO_PAD.decode(s).ok()?;
    ReceiverKeys::from_bytes(&bytes).ok()
}

/// What a push payload said, as far as keepwire reads it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct PushPayload {
    /// The registration id (`kw`).
    pub registration_id: Option<String>,
    /// The payload was a Web Push body this device's keys opened.
    pub decrypted: bool,
    /// The message preview the relay encrypted to this device's keys, when
    /// it sent one (`kw_preview` of FCM and APNs, `preview` inside a Web
    /// Push body).
    pub preview: Option<Preview>,
}

/// A message as a push preview carries it (see keepwire-server's push
/// module): enough to show a notification when the sync cannot fetch it in
/// time. The text may be cut short.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub(crate) struct Preview {
    pub id: u64,
    pub conv: u64,
    pub conv_seq: u64,
    pub from: String,
    pub kind: String,
    pub body: String,
    pub ts: i64,
}

impl Preview {
    /// The message, for the notification claims (no client id: it is not ours).
    pub(crate) fn message(&self) -> keepwire_proto::Message {
        keepwire_proto::Message {
            id: self.id,
            conv: self.conv,
            conv_seq: self.conv_seq,
            from: self.from.clone(),
            cid: String::new(),
            kind: self.kind.clone(),
            body: self.body.clone(),
            ts: self.ts,
        }
    }
}

/// Opens a preview sealed to `keys` (RFC 8188 `aes128gcm`, base64url).
fn open_preview(sealed: &str, keys: &ReceiverKeys) -> Option<Preview> {
    let body = URL_SAFE_NO_PAD.decode(sealed.trim_end_matches('=')).ok()?;
    let plain = ece::decrypt(&body, keys).ok()?;
    serde_json::from_slice(&plain).ok()
}

/// Reads a push payload: the bare registration id, the JSON an FCM data
/// message or an APNs notification carries (`kw` at the top or under
/// `data`), a Web Push body
/// encrypted to `keys` (RFC 8291), or anything else (a content-free wake-up).
/// Only the registration id is taken from it: the sync fetches the rest.
pub(crate) fn read_payload(payload: &[u8], keys: Option<&ReceiverKeys>) -> PushPayload {
    if let Some(id) = registration_id(payload) {
        // FCM's data or an APNs payload: a sealed preview may ride along.
        let preview = keys.and_then(|k| {
            let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
            let sealed = v
                .get("kw_preview")
                .or_else(|| v.get("data")?.get("kw_preview"))?
                .as_str()?;
            open_preview(sealed, k)
        });
        return PushPayload {
            registration_id: Some(id),
            decrypted: false,
            preview,
        };
    }
    if let Some(keys) = keys
        && payload.len() >= ece::HEADER_LEN + ece::TAG_LEN
        && let Ok(plain) = ece::decrypt(payload, keys)
    {
        let preview = serde_json::from_slice::<serde_json::Value>(&plain)
            .ok()
            .and_then(|v| serde_json::from_str(v.get("preview")?.as_str()?).ok());
        return PushPayload {
            registration_id: registration_id(&plain),
            decrypted: true,
            preview,
        };
    }
    PushPayload::default()
}

/// The `kw` field of a JSON payload (top level, or FCM's `data`), or the
/// payload itself when it is just the id (an app that hands over `data["kw"]`).
fn registration_id(json: &[u8]) -> Option<String> {
    if let Ok(id) = std::str::from_utf8(json)
        && let Ok(id) = keepwire_push::RegistrationId::new(id.trim())
    {
        return Some(id.as_str().to_owned());
    }
    let v: serde_json::Value = serde_json::from_slice(json).ok()?;
    let kw = v.get("kw").or_else(|| v.get("data")?.get("kw"))?.as_str()?;
    keepwire_push::RegistrationId::new(kw)
        .ok()
        .map(|id| id.as_str().to_owned())
}

/// The store key of the mutes not yet accepted by the relay (JSON object
/// `{conv: muted}`).
pub(crate) const MUTES_META: &str = "mutes_pending";

impl Store {
    /// The push registration state.
    pub(crate) fn push_state(&self) -> Result<PushState, StoreError> {
        Ok(self
            .meta(PUSH_META)?
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default())
    }

    /// Saves the push registration state.
    pub(crate) fn set_push_state(&self, s: &PushState) -> Result<(), StoreError> {
        self.set_meta(
            PUSH_META,
            &serde_json::to_string(s).unwrap_or_else(|_| "{}".into()),
        )
    }

    /// Where the device's push registration stands.
    pub fn push_status(&self) -> Result<PushStatus, StoreError> {
        Ok(self.push_state()?.status())
    }

    /// The Web Push keys keepwire made for this device, if any.
    pub(crate) fn push_keys(&self) -> Result<Option<ReceiverKeys>, StoreError> {
        Ok(self.meta(PUSH_KEYS_META)?.as_deref().and_then(decode_keys))
    }

    /// This device's Web Push keys, made (and kept) on first use: a device
    /// keeps one key pair, so pushes sent to an older registration still open.
    pub(crate) fn ensure_push_keys(&self) -> Result<ReceiverKeys, StoreError> {
        if let Some(k) = self.push_keys()? {
            return Ok(k);
        }
        // Another process may make its own at the same moment: the first
        // stored wins and both use it.
        self.conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES (?1, ?2)",
            rusqlite::params![PUSH_KEYS_META, encode_keys(&ReceiverKeys::generate())],
        )?;
        self.push_keys()?
            .ok_or_else(|| StoreError::Incompatible("the stored Web Push keys do not parse".into()))
    }

    /// Records a new registration (`None`: remove it) for sending.
    pub(crate) fn change_push(
        &mut self,
        registration: Option<serde_json::Value>,
        own_keys: bool,
    ) -> Result<PushState, StoreError> {
        // Immediate: a read-then-write transaction that another writer got
        // ahead of would fail with SQLITE_BUSY at once instead of waiting.
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut s: PushState = read_json(&tx, PUSH_META)?;
        s = PushState {
            registration,
            version: s.version + 1,
            dirty: true,
            own_keys,
            // The id and acceptance stay until the relay answers the change.
            id: s.id,
            accepted_ms: s.accepted_ms,
            accepted_epoch: s.accepted_epoch,
            last_error: None,
            refused_ms: None,
        };
        write_json(&tx, PUSH_META, &s)?;
        tx.commit()?;
        Ok(s)
    }

    /// The relay answered the `push_register` of `version`: `Ok(id)` or a
    /// refusal. Ignored if the registration changed since.
    pub(crate) fn push_answered(
        &mut self,
        version: u64,
        epoch: Option<&str>,
        answer: Result<Option<String>, String>,
    ) -> Result<(), StoreError> {
        // Immediate: a read-then-write transaction that another writer got
        // ahead of would fail with SQLITE_BUSY at once instead of waiting.
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut s: PushState = read_json(&tx, PUSH_META)?;
        if s.version != version {
            return Ok(());
        }
        s.dirty = false;
        match answer {
            Ok(id) => {
                s.id = id;
                s.accepted_ms = Some(now_ms());
                s.accepted_epoch = epoch.map(str::to_owned);
                s.last_error = None;
                s.refused_ms = None;
                if s.registration.is_none() {
                    s = PushState {
                        version: s.version,
                        ..Default::default()
                    };
                }
            }
            Err(why) => {
                s.last_error = Some(why);
                s.refused_ms = Some(now_ms());
            }
        }
        write_json(&tx, PUSH_META, &s)?;
        tx.commit()?;
        Ok(())
    }

    /// Notes why the registration cannot be sent now (the relay does not
    /// offer its provider); it stays due.
    pub(crate) fn push_unsendable(&self, why: &str) -> Result<(), StoreError> {
        let mut s = self.push_state()?;
        if s.last_error.as_deref() != Some(why) {
            s.last_error = Some(why.to_owned());
            self.set_push_state(&s)?;
        }
        Ok(())
    }

    /// Saves the preferences and queues the mutes they change for the
    /// relay (sent by the process holding the connection, within 100 ms
    /// when connected, else after its next handshake). Returns the changed
    /// mutes.
    pub fn save_prefs(&mut self, p: &crate::notify::Prefs) -> Result<Vec<(u64, bool)>, StoreError> {
        let old = self.prefs()?;
        let changed: Vec<(u64, bool)> = old
            .muted
            .symmetric_difference(&p.muted)
            .map(|&c| (c, p.muted.contains(&c)))
            .collect();
        self.set_prefs(p)?;
        for &(conv, muted) in &changed {
            self.queue_mute(conv, muted)?;
        }
        Ok(changed)
    }

    /// Mutes or unmutes `conv` here at once (no notifications) and queues
    /// the change for the relay (no pushes; all the user's devices follow).
    pub fn queue_mute(&mut self, conv: u64, muted: bool) -> Result<(), StoreError> {
        // Immediate: a read-then-write transaction that another writer got
        // ahead of would fail with SQLITE_BUSY at once instead of waiting.
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut prefs: crate::notify::Prefs = read_json(&tx, "prefs")?;
        if muted {
            prefs.muted.insert(conv);
        } else {
            prefs.muted.remove(&conv);
        }
        write_json(&tx, "prefs", &prefs)?;
        let mut pending: BTreeMap<u64, bool> = read_json(&tx, MUTES_META)?;
        pending.insert(conv, muted);
        write_json(&tx, MUTES_META, &pending)?;
        tx.commit()?;
        Ok(())
    }

    /// Mutes not yet accepted by the relay.
    pub(crate) fn pending_mutes(&self) -> Result<BTreeMap<u64, bool>, StoreError> {
        read_json(&self.conn, MUTES_META)
    }

    /// The relay answered a `mute` (accepted, or refused for good): it is
    /// no longer pending unless changed since.
    pub(crate) fn mute_answered(&mut self, conv: u64, muted: bool) -> Result<(), StoreError> {
        // Immediate: a read-then-write transaction that another writer got
        // ahead of would fail with SQLITE_BUSY at once instead of waiting.
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut pending: BTreeMap<u64, bool> = read_json(&tx, MUTES_META)?;
        if pending.get(&conv) == Some(&muted) {
            pending.remove(&conv);
            write_json(&tx, MUTES_META, &pending)?;
        }
        tx.commit()?;
        Ok(())
    }
}

/// Applies `mute` inbox entries to the preferences, inside the entries'
/// transaction. A conversation with a change of this device not yet
/// accepted keeps the local choice (its own entry follows).
pub(crate) fn apply_mutes(tx: &Connection, marks: &[MuteMark]) -> Result<(), StoreError> {
    if marks.is_empty() {
        return Ok(());
    }
    let pending: BTreeMap<u64, bool> = read_json(tx, MUTES_META)?;
    let mut prefs: crate::notify::Prefs = read_json(tx, "prefs")?;
    for m in marks.iter().filter(|m| !pending.contains_key(&m.conv)) {
        if m.muted {
            prefs.muted.insert(m.conv);
        } else {
            prefs.muted.remove(&m.conv);
        }
    }
    write_json(tx, "prefs", &prefs)
}

fn read_json<T: serde::de::DeserializeOwned + Default>(
    conn: &Connection,
    key: &str,
) -> Result<T, StoreError> {
    let raw: Option<String> = conn
        .prepare_cached("SELECT value FROM meta WHERE key = ?1")?
        .query_row([key], |r| r.get(0))
        .optional()?;
    Ok(raw
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default())
}

fn write_json<T: Serialize>(conn: &Connection, key: &str, v: &T) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
    )?
    .execute(rusqlite::params![
        key,
        serde_json::to_string(v).unwrap_or_else(|_| "{}".into())
    ])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_give_the_registration_id_and_nothing_else() {
        let keys = ReceiverKeys::generate();
        // FCM data (as the app hands it over, or the whole message) and APNs.
        for p in [
            "r_abc",
            r#"{"kw":"r_abc"}"#,
            r#"{"data":{"kw":"r_abc"}}"#,
            r#"{"aps":{"alert":{"loc-key":"KW_NEW_MESSAGE"},"mutable-content":1},"kw":"r_abc"}"#,
        ] {
            let got = read_payload(p.as_bytes(), Some(&keys));
            assert_eq!(got.registration_id.as_deref(), Some("r_abc"), "{p}");
            assert!(!got.decrypted);
        }
        // A Web Push body encrypted to our keys.
        let body = ece::encrypt(br#"{"kw":"r_web","kind":"wake"}"#, keys.push_keys(), 0).unwrap();
        let got = read_payload(&body, Some(&keys));
        assert_eq!(got.registration_id.as_deref(), Some("r_web"));
        assert!(got.decrypted);
        // Someone else's keys, garbage, an id that is not one: a plain wake-up.
        let other = ReceiverKeys::generate();
        assert_eq!(read_payload(&body, Some(&other)), PushPayload::default());
        assert_eq!(read_payload(&body, None), PushPayload::default());
        assert_eq!(read_payload(b"\xff\x00", None), PushPayload::default());
        assert_eq!(
            read_payload(br#"{"kw":"not an id!"}"#, None),
            PushPayload::default()
        );
    }

    #[test]
    fn registrations_are_validated_and_keys_round_trip() {
        let keys = ReceiverKeys::generate();
        assert_eq!(
            decode_keys(&encode_keys(&keys)).unwrap().to_bytes(),
            keys.to_bytes()
        );
        let w = wire_form(
            &PushRegistration::WebPush {
                endpoint: "https://push.example/abc".into(),
                keys: None,
            },
            Some(&keys),
        )
        .unwrap();
        assert_eq!(w["provider"], "webpush");
        assert_eq!(w["keys"]["p256dh"], keys.push_keys().p256dh_base64());
        let a = wire_form(
            &PushRegistration::Apns {
                token: "ab".repeat(32),
                topic: "com.example.chat".into(),
                sandbox: true,
            },
            None,
        )
        .unwrap();
        assert_eq!(a["environment"], "sandbox");
        let bad = wire_form(
            &PushRegistration::WebPush {
                endpoint: "http://push.example/abc".into(),
                keys: None,
            },
            Some(&keys),
        );
        assert!(bad.unwrap_err().contains("https"));
        assert!(wire_form(&PushRegistration::Fcm { token: "".into() }, None).is_err());
        let dbg = format!(
            "{:?}",
            PushRegistration::Fcm {
                token: "secret-token".into()
            }
        );
        assert!(!dbg.contains("secret"), "{dbg}");
    }

    #[test]
    fn a_registration_is_due_when_changed_stale_or_from_another_epoch() {
        let day = 24 * 3600 * 1000;
        let mut s = PushState {
            registration: Some(serde_json::json!({"provider":"fcm","token":"t"})),
            dirty: true,
            ..Default::default()
        };
        assert!(s.due(Some("e1"), 0));
        s.dirty = false;
        s.accepted_ms = Some(0);
        s.accepted_epoch = Some("e1".into());
        assert!(!s.due(Some("e1"), day));
        assert!(s.due(Some("e2"), day), "a restored relay may not have it");
        assert!(s.due(Some("e1"), 8 * day), "refreshed weekly");
        // Refused: offered again a day later.
        s.refused_ms = Some(10 * day);
        assert!(!s.due(Some("e1"), 10 * day + 1000));
        assert!(s.due(Some("e1"), 11 * day));
        // Removed and answered: nothing to send.
        let gone = PushState::default();
        assert!(!gone.due(Some("e1"), 0));
    }
}
