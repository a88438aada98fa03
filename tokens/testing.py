"""Builders for tests, benchmarks and the demo: apps, keys and valid registrations.

Real objects only (rows in the real database, tokens that pass the real validators); nothing
here stands in for code under test.
"""

from __future__ import annotations

import base64
import secrets
import uuid
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .models import ApiKey, App


def make_app(slug: str | None = None, **fields: Any) -> App:
    slug = slug or f"app-{secrets.token_hex(4)}"
    return App.objects.create(slug=slug, name=fields.pop("name", slug), **fields)


def make_key(app: App, scopes: tuple[str, ...] = ("devices",), name: str = "") -> str:
    """A new key's raw value (what a client sends as Bearer)."""
    return ApiKey.issue(app, scopes, name=name)[1]


def apns_token() -> str:
    return secrets.token_hex(32)


def fcm_token() -> str:
    return secrets.token_urlsafe(120) + ":APA91b" + secrets.token_urlsafe(40)


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def web_keys() -> dict[str, str]:
    public = ec.generate_private_key(ec.SECP256R1()).public_key()
    point = public.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    return {"p256dh": b64url(point), "auth": b64url(secrets.token_bytes(16))}


def web_subscription(endpoint: str | None = None) -> dict[str, Any]:
    endpoint = endpoint or f"https://fcm.googleapis.com/fcm/send/{secrets.token_urlsafe(24)}"
    return {"endpoint": endpoint, "keys": web_keys()}


def registration(platform: str = "ios", **fields: Any) -> dict[str, Any]:
    """A valid POST /api/v1/devices/ body; `fields` override or add keys."""
    make_token = {"ios": apns_token, "android": fcm_token, "huawei": fcm_token, "web": web_subscription}
    token = make_token[platform]()
    body = {"device_id": str(uuid.uuid4()), "platform": platform, "token": token, "user_id": "user-1"}
    body.update(fields)
    return body


def write_tokens_csv(path: str, rows: int, *, seed: int = 0) -> None:
    """A valid import_tokens CSV: a mix of iOS, Android and Huawei tokens, 1 user per 2 devices.

    Deterministic for a seed (so a benchmark can be re-run on the same data) and fast enough to
    write a million rows in a few seconds.
    """
    import csv
    import hashlib
    import random

    rng = random.Random(seed)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("device_id", "platform", "token", "user_id", "app_version", "locale"))
        for i in range(rows):
            digest = hashlib.sha256(f"{seed}:{i}".encode()).hexdigest()
            device = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            kind = i % 10
            if kind < 4:
                platform, token = "ios", digest
            elif kind < 9:
                platform, token = "android", f"{digest[:22]}:APA91b{digest * 2}"
            else:
                platform, token = "huawei", f"IQAAAACy{digest}{digest[:40]}"
            writer.writerow((device, platform, token, f"user-{i // 2}", "5.4.1", "en-US"))
