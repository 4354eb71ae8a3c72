//! Message encryption for Web Push: RFC 8188 `aes128gcm` content coding with
//! the RFC 8291 key derivation.
//!
//! Two sides use this module:
//!
//! - the **sender** (the relay) encrypts a push to a device's public
//!   subscription keys ([`PushKeys`]: a P-256 point and a 16-byte auth secret)
//!   with [`encrypt`];
//! - the **receiver** (a keepwire client that makes its own keys) holds
//!   [`ReceiverKeys`], publishes [`ReceiverKeys::push_keys`] with its
//!   registration, and opens pushes with [`decrypt`].
//!
//! The module needs no HTTP stack or runtime: it is available with
//! `default-features = false`.
//!
//! ## Format (RFC 8188 §2, RFC 8291 §4)
//!
//! ```text
//! salt (16) | rs (u32, big endian) | idlen (1) | keyid (idlen) | records...
//! ```
//!
//! For Web Push the key id is the sender's ephemeral public key (65 bytes,
//! uncompressed) and the body is a single record of at most 4096 bytes:
//! the plaintext, a `0x02` delimiter, zero padding, then the 16-byte GCM tag.
//! [`decrypt`] also reads multi-record bodies (RFC 8188 §2: every record but
//! the last ends its plaintext with `0x01`).
//!
//! ## Key derivation (RFC 8291 §3.3–3.4, RFC 8188 §2.2–2.3)
//!
//! ```text
//! ecdh   = ECDH(sender private, receiver public)
//! ikm    = HKDF(salt = auth, ikm = ecdh,
//!               info = "WebPush: info" 0x00 | receiver public | sender public, 32)
//! cek    = HKDF(salt = salt, ikm = ikm, info = "Content-Encoding: aes128gcm" 0x00, 16)
//! nonce  = HKDF(salt = salt, ikm = ikm, info = "Content-Encoding: nonce" 0x00, 12)
//! record i: AES-128-GCM(cek, nonce XOR i)
//! ```

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hkdf::Hkdf;
use p256::ecdh::diffie_hellman;
use p256::elliptic_curve::sec1::ToEncodedPoint as _;
use p256::{PublicKey, SecretKey};
use rand_core::{OsRng, RngCore as _};
use ring::aead::{AES_128_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use sha2::Sha256;

/// Length of an uncompressed P-256 point (`0x04 | x | y`).
pub const PUBLIC_KEY_LEN: usize = 65;
/// Length of the RFC 8291 authentication secret.
pub const AUTH_SECRET_LEN: usize = 16;
/// Length of the RFC 8188 salt.
pub const SALT_LEN: usize = 16;
/// Length of a Web Push `aes128gcm` header: salt, rs, idlen and the 65-byte key id.
pub const HEADER_LEN: usize = SALT_LEN + 4 + 1 + PUBLIC_KEY_LEN;
/// Length of the AES-GCM authentication tag at the end of every record.
pub const TAG_LEN: usize = 16;
/// Largest Web Push body (RFC 8291 §4: push services need accept no more).
pub const MAX_BODY_LEN: usize = 4096;
/// Record size written by [`encrypt`] (RFC 8291 §4 recommends 4096).
pub const RECORD_SIZE: u32 = 4096;
/// Largest plaintext [`encrypt`] accepts (a 4096-byte body: header, delimiter, tag).
pub const MAX_PLAINTEXT_LEN: usize = MAX_BODY_LEN - HEADER_LEN - 1 - TAG_LEN;
/// Largest body [`decrypt`] reads: a bound on work for hostile input.
pub const MAX_DECRYPT_LEN: usize = 64 * 1024;

/// Why encryption or decryption failed. Each says what was wrong with the
/// input; none of them leaks key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EceError {
    /// The public key is not an uncompressed point on P-256.
    #[error("the public key is not an uncompressed P-256 point (65 bytes, 0x04 first)")]
    InvalidPublicKey,
    /// The auth secret is not 16 bytes.
    #[error("the auth secret must be 16 bytes")]
    InvalidAuthSecret,
    /// The private key is not a valid P-256 scalar.
    #[error("the private key is not a valid P-256 scalar (32 bytes)")]
    InvalidPrivateKey,
    /// A key was not valid base64url.
    #[error("{0} is not valid base64url")]
    Base64(&'static str),
    /// The plaintext (with its padding) does not fit one 4096-byte record.
    #[error("the plaintext is {len} bytes; at most {max} fit one Web Push record")]
    TooLarge {
        /// Plaintext plus padding, in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The body is shorter than its header says, or has no complete record.
    #[error("the body is truncated")]
    Truncated,
    /// The body is longer than [`MAX_DECRYPT_LEN`].
    #[error("the body is longer than {MAX_DECRYPT_LEN} bytes")]
    BodyTooLarge,
    /// The header's record size is below the minimum (18) or the key id is
    /// not a 65-byte public key.
    #[error("the header is invalid: {0}")]
    InvalidHeader(&'static str),
    /// A record failed authentication: wrong keys, or the body was altered.
    #[error("a record failed authentication (wrong keys or altered body)")]
    Authentication,
    /// A record's padding delimiter is missing or misplaced.
    #[error("a record's padding is invalid")]
    InvalidPadding,
}

/// A device's public Web Push keys, as a browser's `PushSubscription` gives
/// them: the P-256 public key (`p256dh`) and the 16-byte auth secret.
///
/// Both are validated on construction (the point must be on the curve).
/// `Debug` redacts them: the auth secret is a secret and the key identifies
/// the device.
#[derive(Clone, PartialEq, Eq)]
pub struct PushKeys {
    p256dh: [u8; PUBLIC_KEY_LEN],
    auth: [u8; AUTH_SECRET_LEN],
}

impl PushKeys {
    /// Keys from raw bytes.
    pub fn new(p256dh: &[u8], auth: &[u8]) -> Result<PushKeys, EceError> {
        let p256dh: [u8; PUBLIC_KEY_LEN] =
            p256dh.try_into().map_err(|_| EceError::InvalidPublicKey)?;
        if p256dh[0] != 0x04 {
            return Err(EceError::InvalidPublicKey);
        }
        PublicKey::from_sec1_bytes(&p256dh).map_err(|_| EceError::InvalidPublicKey)?;
        let auth: [u8; AUTH_SECRET_LEN] =
            auth.try_into().map_err(|_| EceError::InvalidAuthSecret)?;
        Ok(PushKeys { p256dh, auth })
    }

    /// Keys from base64url text (padding tolerated), as in a subscription's JSON.
    pub fn from_base64(p256dh: &str, auth: &str) -> Result<PushKeys, EceError> {
        let p = decode_b64(p256dh).map_err(|_| EceError::Base64("p256dh"))?;
        let a = decode_b64(auth).map_err(|_| EceError::Base64("auth"))?;
        PushKeys::new(&p, &a)
    }

    /// The uncompressed public key.
    pub fn p256dh(&self) -> &[u8; PUBLIC_KEY_LEN] {
        &self.p256dh
    }

    /// The auth secret.
    pub fn auth(&self) -> &[u8; AUTH_SECRET_LEN] {
        &self.auth
    }

    /// The public key as unpadded base64url.
    pub fn p256dh_base64(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.p256dh)
    }

    /// The auth secret as unpadded base64url.
    pub fn auth_base64(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.auth)
    }

    fn public_key(&self) -> PublicKey {
        // Checked in `new`.
        PublicKey::from_sec1_bytes(&self.p256dh).expect("validated P-256 point")
    }
}

impl fmt::Debug for PushKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PushKeys(<redacted>)")
    }
}

/// A receiver's key pair and auth secret: what a keepwire client that makes
/// its own Web Push keys keeps (in its store) to open pushes.
///
/// Serialise with [`ReceiverKeys::to_bytes`] (48 bytes: the private scalar,
/// then the auth secret); the public key is derived. `Debug` redacts.
#[derive(Clone)]
pub struct ReceiverKeys {
    secret: SecretKey,
    public: PushKeys,
}

impl ReceiverKeys {
    /// Fresh keys from the operating system's random source.
    pub fn generate() -> ReceiverKeys {
        let secret = SecretKey::random(&mut OsRng);
        let mut auth = [0u8; AUTH_SECRET_LEN];
        OsRng.fill_bytes(&mut auth);
        ReceiverKeys::from_parts(secret, auth)
    }

    /// Keys from a 32-byte private scalar and a 16-byte auth secret.
    pub fn from_private(private: &[u8], auth: &[u8]) -> Result<ReceiverKeys, EceError> {
        let secret = SecretKey::from_slice(private).map_err(|_| EceError::InvalidPrivateKey)?;
        let auth: [u8; AUTH_SECRET_LEN] =
            auth.try_into().map_err(|_| EceError::InvalidAuthSecret)?;
        Ok(ReceiverKeys::from_parts(secret, auth))
    }

    /// Keys from [`ReceiverKeys::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<ReceiverKeys, EceError> {
        if bytes.len() != 32 + AUTH_SECRET_LEN {
            return Err(EceError::InvalidPrivateKey);
        }
        ReceiverKeys::from_private(&bytes[..32], &bytes[32..])
    }

    /// The private scalar followed by the auth secret (48 bytes). Secret:
    /// store it like a password.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = self.secret.to_bytes().to_vec();
        out.extend_from_slice(&self.public.auth);
        out
    }

    /// The public half to register with a relay.
    pub fn push_keys(&self) -> &PushKeys {
        &self.public
    }

    fn from_parts(secret: SecretKey, auth: [u8; AUTH_SECRET_LEN]) -> ReceiverKeys {
        let point = secret.public_key().to_encoded_point(false);
        let mut p256dh = [0u8; PUBLIC_KEY_LEN];
        p256dh.copy_from_slice(point.as_bytes());
        ReceiverKeys {
            secret,
            public: PushKeys { p256dh, auth },
        }
    }
}

impl fmt::Debug for ReceiverKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ReceiverKeys(<redacted>)")
    }
}

/// Encrypts `plaintext` for the device that owns `keys`, as one RFC 8291
/// record with a fresh ephemeral key and salt, padded with `pad` zero bytes
/// (padding hides the plaintext's length from the push service).
///
/// Fails with [`EceError::TooLarge`] when plaintext and padding exceed
/// [`MAX_PLAINTEXT_LEN`].
pub fn encrypt(plaintext: &[u8], keys: &PushKeys, pad: usize) -> Result<Vec<u8>, EceError> {
    let sender = SecretKey::random(&mut OsRng);
    let mut salt = [0u8; SALT_LEN];
    OsRng.fill_bytes(&mut salt);
    encrypt_with(plaintext, keys, pad, &sender, &salt)
}

/// [`encrypt`] with a given sender key and salt: only for test vectors
/// (reusing a salt with the same key breaks the encryption).
pub(crate) fn encrypt_with(
    plaintext: &[u8],
    keys: &PushKeys,
    pad: usize,
    sender: &SecretKey,
    salt: &[u8; SALT_LEN],
) -> Result<Vec<u8>, EceError> {
    let len = plaintext.len().saturating_add(pad);
    if len > MAX_PLAINTEXT_LEN {
        return Err(EceError::TooLarge {
            len,
            max: MAX_PLAINTEXT_LEN,
        });
    }
    let sender_public = sender.public_key().to_encoded_point(false);
    let ikm = webpush_ikm(
        sender,
        &keys.public_key(),
        keys.p256dh(),
        sender_public.as_bytes(),
        keys.auth(),
    );
    let (key, nonce) = content_keys(&ikm, salt);

    let mut out = Vec::with_capacity(HEADER_LEN + len + 1 + TAG_LEN);
    out.extend_from_slice(salt);
    out.extend_from_slice(&RECORD_SIZE.to_be_bytes());
    out.push(PUBLIC_KEY_LEN as u8);
    out.extend_from_slice(sender_public.as_bytes());
    let mut record = Vec::with_capacity(len + 1 + TAG_LEN);
    record.extend_from_slice(plaintext);
    record.push(0x02);
    record.resize(plaintext.len() + 1 + pad, 0);
    key.seal_in_place_append_tag(record_nonce(&nonce, 0), Aad::empty(), &mut record)
        .map_err(|_| EceError::TooLarge {
            len,
            max: MAX_PLAINTEXT_LEN,
        })?;
    out.extend_from_slice(&record);
    Ok(out)
}

/// Opens a Web Push body encrypted to `keys` and returns the plaintext
/// (without padding).
///
/// Truncated, altered or oversized bodies, a wrong key, and bad padding are
/// each an error; nothing is returned from a record that failed
/// authentication.
pub fn decrypt(body: &[u8], keys: &ReceiverKeys) -> Result<Vec<u8>, EceError> {
    if body.len() > MAX_DECRYPT_LEN {
        return Err(EceError::BodyTooLarge);
    }
    if body.len() < SALT_LEN + 5 {
        return Err(EceError::Truncated);
    }
    let salt: [u8; SALT_LEN] = body[..SALT_LEN].try_into().expect("length checked");
    let rs = u32::from_be_bytes(
        body[SALT_LEN..SALT_LEN + 4]
            .try_into()
            .expect("length checked"),
    ) as usize;
    let idlen = body[SALT_LEN + 4] as usize;
    if rs < TAG_LEN + 2 {
        return Err(EceError::InvalidHeader("record size below 18"));
    }
    if idlen != PUBLIC_KEY_LEN {
        return Err(EceError::InvalidHeader(
            "the key id is not a 65-byte P-256 key",
        ));
    }
    let start = SALT_LEN + 5 + idlen;
    if body.len() < start {
        return Err(EceError::Truncated);
    }
    let sender_bytes = &body[SALT_LEN + 5..start];
    let sender_public = PublicKey::from_sec1_bytes(sender_bytes)
        .map_err(|_| EceError::InvalidHeader("the key id is not a P-256 point"))?;
    let ikm = webpush_ikm(
        &keys.secret,
        &sender_public,
        keys.public.p256dh(),
        sender_bytes,
        keys.public.auth(),
    );
    let (key, nonce) = content_keys(&ikm, &salt);

    let records = &body[start..];
    if records.len() < TAG_LEN + 1 {
        return Err(EceError::Truncated);
    }
    let mut plaintext = Vec::with_capacity(records.len());
    let mut chunks = records.chunks(rs).enumerate().peekable();
    while let Some((seq, chunk)) = chunks.next() {
        let last = chunks.peek().is_none();
        if chunk.len() < TAG_LEN + 1 {
            return Err(EceError::Truncated);
        }
        let mut buf = chunk.to_vec();
        let opened = key
            .open_in_place(record_nonce(&nonce, seq as u64), Aad::empty(), &mut buf)
            .map_err(|_| EceError::Authentication)?;
        // The delimiter is the last non-zero byte: 0x01 in every record but
        // the last, 0x02 in the last (RFC 8188 §2).
        let delimiter = opened
            .iter()
            .rposition(|&b| b != 0)
            .ok_or(EceError::InvalidPadding)?;
        match (opened[delimiter], last) {
            (0x02, true) => {}
            (0x01, false) => {}
            // A last record ending with 0x01 means records were cut off.
            (0x01, true) => return Err(EceError::Truncated),
            _ => return Err(EceError::InvalidPadding),
        }
        plaintext.extend_from_slice(&opened[..delimiter]);
    }
    Ok(plaintext)
}

/// Decodes base64url with or without padding (and standard base64, which
/// some servers send).
pub(crate) fn decode_b64(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
    let trimmed = text.trim_end_matches('=');
    let normalized: String = trimmed
        .chars()
        .map(|c| match c {
            '+' => '-',
            '/' => '_',
            c => c,
        })
        .collect();
    URL_SAFE_NO_PAD.decode(normalized)
}

fn webpush_ikm(
    private: &SecretKey,
    peer: &PublicKey,
    ua_public: &[u8],
    as_public: &[u8],
    auth: &[u8; AUTH_SECRET_LEN],
) -> [u8; 32] {
    let shared = diffie_hellman(private.to_nonzero_scalar(), peer.as_affine());
    let mut info = Vec::with_capacity(14 + 2 * PUBLIC_KEY_LEN);
    info.extend_from_slice(b"WebPush: info\0");
    info.extend_from_slice(ua_public);
    info.extend_from_slice(as_public);
    let mut ikm = [0u8; 32];
    Hkdf::<Sha256>::new(Some(auth), shared.raw_secret_bytes())
        .expand(&info, &mut ikm)
        .expect("32 bytes is a valid HKDF-SHA-256 length");
    ikm
}

fn content_keys(ikm: &[u8; 32], salt: &[u8; SALT_LEN]) -> (LessSafeKey, [u8; 12]) {
    let hk = Hkdf::<Sha256>::new(Some(salt), ikm);
    let mut cek = [0u8; 16];
    hk.expand(b"Content-Encoding: aes128gcm\0", &mut cek)
        .expect("16 bytes is a valid HKDF-SHA-256 length");
    let mut nonce = [0u8; 12];
    hk.expand(b"Content-Encoding: nonce\0", &mut nonce)
        .expect("12 bytes is a valid HKDF-SHA-256 length");
    let key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &cek).expect("16-byte AES-128 key"));
    (key, nonce)
}

fn record_nonce(base: &[u8; 12], seq: u64) -> Nonce {
    let mut n = *base;
    for (i, b) in seq.to_be_bytes().iter().enumerate() {
        n[4 + i] ^= b;
    }
    Nonce::assume_unique_for_key(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 8291 Appendix A (published test data, not credentials).
    const PLAINTEXT: &str = "When I grow up, I want to be a watermelon";
    const AS_PRIVATE: &str = "yfWPiYE-n46HLnH0KqZOF1fJJU3MYrct3AELtAQ-oRw";
    const UA_PRIVATE: &str = "q1dXpw3UpT5VOmu_cf_v6ih07Aems3njxI-JWgLcM94";
    const UA_PUBLIC: &str =
        "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4";
    const SALT: &str = "DGv6ra1nlYgDCS1FRnbzlw";
    const AUTH: &str = "BTBZMqHH6r4Tts7J_aSIgg";
    const BODY: &str = "DGv6ra1nlYgDCS1FRnbzlwAAEABBBP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A_yl95bQpu6cVPTpK4Mqgkf1CXztLVBSt2Ks3oZwbuwXPXLWyouBWLVWGNWQexSgSxsj_Qulcy4a-fN";

    fn b64(s: &str) -> Vec<u8> {
        decode_b64(s).unwrap()
    }

    fn receiver() -> ReceiverKeys {
        ReceiverKeys::from_private(&b64(UA_PRIVATE), &b64(AUTH)).unwrap()
    }

    #[test]
    fn reproduces_rfc8291_appendix_a_byte_for_byte() {
        let keys = PushKeys::from_base64(UA_PUBLIC, AUTH).unwrap();
        let sender = SecretKey::from_slice(&b64(AS_PRIVATE)).unwrap();
        let salt: [u8; 16] = b64(SALT).try_into().unwrap();
        let body = encrypt_with(PLAINTEXT.as_bytes(), &keys, 0, &sender, &salt).unwrap();
        assert_eq!(URL_SAFE_NO_PAD.encode(&body), BODY);
        // The receiver's derived public key is the RFC's.
        assert_eq!(receiver().push_keys(), &keys);
    }

    #[test]
    fn decrypts_rfc8291_appendix_a() {
        assert_eq!(
            decrypt(&b64(BODY), &receiver()).unwrap(),
            PLAINTEXT.as_bytes()
        );
    }

    #[test]
    fn round_trip_with_fresh_keys_and_padding() {
        let rx = ReceiverKeys::generate();
        for (msg, pad) in [
            (&b""[..], 0),
            (b"hello", 100),
            (&[7u8; MAX_PLAINTEXT_LEN][..], 0),
        ] {
            let body = encrypt(msg, rx.push_keys(), pad).unwrap();
            assert!(body.len() <= MAX_BODY_LEN);
            assert_eq!(body.len(), HEADER_LEN + msg.len() + pad + 1 + TAG_LEN);
            assert_eq!(decrypt(&body, &rx).unwrap(), msg);
        }
        // Keys survive serialisation.
        let again = ReceiverKeys::from_bytes(&rx.to_bytes()).unwrap();
        assert_eq!(again.push_keys(), rx.push_keys());
    }

    #[test]
    fn refuses_oversized_plaintext() {
        let rx = ReceiverKeys::generate();
        let err = encrypt(&[0u8; MAX_PLAINTEXT_LEN + 1], rx.push_keys(), 0).unwrap_err();
        assert!(matches!(err, EceError::TooLarge { .. }));
        let err = encrypt(b"x", rx.push_keys(), MAX_PLAINTEXT_LEN).unwrap_err();
        assert!(matches!(err, EceError::TooLarge { .. }));
    }

    #[test]
    fn rejects_truncated_and_tampered_bodies() {
        let rx = receiver();
        let body = b64(BODY);
        for cut in [0, 10, 20, HEADER_LEN, HEADER_LEN + 10, body.len() - 1] {
            let err = decrypt(&body[..cut], &rx).unwrap_err();
            assert!(
                matches!(err, EceError::Truncated | EceError::Authentication),
                "cut at {cut}: {err:?}"
            );
        }
        // Salt, key id, ciphertext, tag.
        for i in [0, 30, HEADER_LEN, body.len() - 1] {
            let mut bad = body.clone();
            bad[i] ^= 0x01;
            assert!(decrypt(&bad, &rx).is_err(), "flipped byte {i}");
        }
        // A smaller record size splits the record: authentication fails.
        let mut bad = body.clone();
        bad[16..20].copy_from_slice(&50u32.to_be_bytes());
        assert_eq!(decrypt(&bad, &rx), Err(EceError::Authentication));
        bad[16..20].copy_from_slice(&17u32.to_be_bytes());
        assert!(matches!(
            decrypt(&bad, &rx),
            Err(EceError::InvalidHeader(_))
        ));
        // Another receiver's keys cannot open it.
        assert_eq!(
            decrypt(&body, &ReceiverKeys::generate()),
            Err(EceError::Authentication)
        );
        // A key id that is not a key.
        let mut bad = body.clone();
        bad[20] = 64;
        assert!(matches!(
            decrypt(&bad, &rx),
            Err(EceError::InvalidHeader(_))
        ));
        assert_eq!(
            decrypt(&vec![0u8; MAX_DECRYPT_LEN + 1], &rx),
            Err(EceError::BodyTooLarge)
        );
    }

    #[test]
    fn reads_multi_record_bodies_and_detects_dropped_records() {
        // Build a 3-record body by hand with rs = 40 (RFC 8188 §2).
        let rx = ReceiverKeys::generate();
        let sender = SecretKey::random(&mut OsRng);
        let salt = [9u8; 16];
        let sender_public = sender.public_key().to_encoded_point(false);
        let ikm = webpush_ikm(
            &sender,
            &rx.push_keys().public_key(),
            rx.push_keys().p256dh(),
            sender_public.as_bytes(),
            rx.push_keys().auth(),
        );
        let (key, nonce) = content_keys(&ikm, &salt);
        let rs = 40usize;
        let mut body = salt.to_vec();
        body.extend_from_slice(&(rs as u32).to_be_bytes());
        body.push(65);
        body.extend_from_slice(sender_public.as_bytes());
        let text = b"0123456789012345678901234567890123456789012345678901";
        let per = rs - TAG_LEN - 1;
        let parts: Vec<&[u8]> = text.chunks(per).collect();
        for (i, part) in parts.iter().enumerate() {
            let mut rec = part.to_vec();
            rec.push(if i + 1 == parts.len() { 2 } else { 1 });
            key.seal_in_place_append_tag(record_nonce(&nonce, i as u64), Aad::empty(), &mut rec)
                .unwrap();
            body.extend_from_slice(&rec);
        }
        assert_eq!(decrypt(&body, &rx).unwrap(), text);
        // Dropping the last record is detected, not silently accepted.
        let cut = HEADER_LEN + rs * (parts.len() - 1);
        assert_eq!(decrypt(&body[..cut], &rx), Err(EceError::Truncated));
    }

    #[test]
    fn validates_keys_and_redacts_them() {
        assert_eq!(
            PushKeys::new(&[4u8; 65], &[0u8; 16]),
            Err(EceError::InvalidPublicKey)
        );
        let good = b64(UA_PUBLIC);
        assert_eq!(
            PushKeys::new(&good[1..], &[0u8; 16]),
            Err(EceError::InvalidPublicKey)
        );
        assert_eq!(
            PushKeys::new(&good, &[0u8; 15]),
            Err(EceError::InvalidAuthSecret)
        );
        assert_eq!(
            PushKeys::from_base64("%%", AUTH),
            Err(EceError::Base64("p256dh"))
        );
        // Padded and standard-alphabet base64 are accepted too.
        let padded = format!("{AUTH}==");
        assert!(PushKeys::from_base64(UA_PUBLIC, &padded).is_ok());
        let keys = PushKeys::from_base64(UA_PUBLIC, AUTH).unwrap();
        assert_eq!(keys.p256dh_base64(), UA_PUBLIC);
        assert_eq!(keys.auth_base64(), AUTH);
        assert!(!format!("{keys:?}").contains("BCV"));
        assert!(!format!("{:?}", receiver()).contains(UA_PRIVATE));
        assert_eq!(
            ReceiverKeys::from_private(&[0u8; 32], &[0u8; 16]).unwrap_err(),
            EceError::InvalidPrivateKey
        );
    }
}
