"""An independent Web Push implementation checking keepwire-push's output.

decrypt BODY_FILE RECEIVER_PRIVATE AUTH AUTHORIZATION ORIGIN SUBJECT
    Opens an aes128gcm body with PyPI http-ece, verifies the VAPID header
    with `cryptography` (raw r||s ES256 against k=, aud, exp <= 24 h, sub),
    prints {"plaintext": ..., "claims": ...}.
encrypt RECEIVER_PUBLIC AUTH TEXT
    Encrypts TEXT to the receiver with http-ece, prints the body (base64url).
"""

import base64
import json
import sys
import time

import http_ece
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils


def b64d(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def b64e(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def verify_vapid(header, origin, subject):
    if not header.startswith("vapid t="):
        raise SystemExit(f"not a vapid authorization: {header!r}")
    token, k = header[len("vapid t="):].split(", k=")
    h, c, s = token.split(".")
    head, claims, sig = json.loads(b64d(h)), json.loads(b64d(c)), b64d(s)
    if head.get("alg") != "ES256":
        raise SystemExit(f"alg {head.get('alg')}")
    if len(sig) != 64:
        raise SystemExit(f"signature of {len(sig)} bytes: JOSE wants raw r||s")
    public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b64d(k))
    der = utils.encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    public.verify(der, f"{h}.{c}".encode(), ec.ECDSA(hashes.SHA256()))
    now = time.time()
    if claims.get("aud") != origin:
        raise SystemExit(f"aud {claims.get('aud')!r} != {origin!r}")
    if not now < claims["exp"] <= now + 24 * 3600:
        raise SystemExit(f"exp {claims['exp']} not within 24 h")
    if claims.get("sub") != subject:
        raise SystemExit(f"sub {claims.get('sub')!r}")
    return claims


def main():
    cmd = sys.argv[1]
    if cmd == "decrypt":
        _, _, body_file, private, auth, authorization, origin, subject = sys.argv
        with open(body_file, "rb") as f:
            body = f.read()
        key = ec.derive_private_key(int.from_bytes(b64d(private), "big"), ec.SECP256R1())
        plain = http_ece.decrypt(body, private_key=key, auth_secret=b64d(auth), version="aes128gcm")
        claims = verify_vapid(authorization, origin, subject)
        print(json.dumps({"plaintext": plain.decode(), "claims": claims}))
    elif cmd == "encrypt":
        _, _, public, auth, text = sys.argv
        sender = ec.generate_private_key(ec.SECP256R1())
        body = http_ece.encrypt(text.encode(), private_key=sender, dh=b64d(public), auth_secret=b64d(auth), version="aes128gcm")
        print(b64e(body))
    else:
        raise SystemExit(f"unknown command {cmd}")


main()
