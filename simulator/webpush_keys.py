"""Web Push subscriptions derived from an id, so the simulator can decrypt what it receives.

A browser generates a P-256 key pair and a 16-byte auth secret per subscription and keeps the
private half. The simulator plays the browser too: both halves are a pure function of the
subscription id, so any id a test invents is a valid subscription with no shared state.
"""

from __future__ import annotations

import base64
import hashlib
from functools import lru_cache

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

# Order of the P-256 group: private scalars must lie in [1, n-1].
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@lru_cache(maxsize=65536)
def private_key(sub_id: str) -> ec.EllipticCurvePrivateKey:
    seed = hashlib.sha256(b"pushsvc-simulator/webpush-key\0" + sub_id.encode()).digest()
    scalar = int.from_bytes(seed, "big") % (_P256_ORDER - 1) + 1
    return ec.derive_private_key(scalar, ec.SECP256R1())


def auth_secret(sub_id: str) -> bytes:
    return hashlib.sha256(b"pushsvc-simulator/webpush-auth\0" + sub_id.encode()).digest()[:16]


def public_key_b64(sub_id: str) -> str:
    point = (
        private_key(sub_id)
        .public_key()
        .public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    )
    return b64url(point)


def subscription(base_url: str, sub_id: str) -> tuple[str, str, str]:
    """(endpoint, p256dh, auth) as a browser's PushSubscription would report them (keys base64url)."""
    return f"{base_url.rstrip('/')}/wp/{sub_id}", public_key_b64(sub_id), b64url(auth_secret(sub_id))


def b64decode(text: str) -> bytes:
    """base64url with or without padding, as the Web Push specs write keys."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
