"""Checks and helpers for an App's provider credentials, shared by admin and management commands.

Error messages describe what is wrong with a credential, never its content.
"""

from __future__ import annotations

import base64
import json

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

SERVICE_ACCOUNT_FIELDS = ("type", "project_id", "private_key", "client_email", "token_uri")


def check_apns_key(pem: str) -> None:
    """The .p8 must be a PEM P-256 private key (what Apple issues for token authentication)."""
    key = _private_key(pem, "The APNs key")
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("The APNs key must be a P-256 (ES256) private key, as in Apple's .p8 file.")


def check_service_account(text: str) -> dict:
    """The FCM service-account JSON: an object with the fields the OAuth flow needs."""
    try:
        data = json.loads(text)
    except ValueError:
        raise ValueError("The service account is not valid JSON.") from None
    if not isinstance(data, dict):
        raise ValueError("The service account must be a JSON object.")
    missing = [f for f in SERVICE_ACCOUNT_FIELDS if not isinstance(data.get(f), str) or not data[f]]
    if missing:
        raise ValueError(f"The service account lacks: {', '.join(missing)}.")
    if data["type"] != "service_account":
        raise ValueError('The service account JSON must have "type": "service_account".')
    _private_key(data["private_key"], "The service account's private_key")
    return data


def check_vapid_key(pem: str) -> str:
    """The VAPID private key must be P-256; returns its public key (base64url uncompressed point)."""
    key = _private_key(pem, "The VAPID key")
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("The VAPID key must be a P-256 private key.")
    return vapid_public_key(key)


def check_vapid_subject(subject: str) -> None:
    if not (subject.startswith("mailto:") or subject.startswith("https://")):
        raise ValueError("The VAPID subject must be a mailto: or https: contact (RFC 8292).")


def generate_vapid_key() -> tuple[str, str]:
    """A new VAPID key pair: (private key PEM, public key base64url)."""
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return pem, vapid_public_key(key)


def vapid_public_key(key: ec.EllipticCurvePrivateKey) -> str:
    point = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return base64.urlsafe_b64encode(point).rstrip(b"=").decode()


def _private_key(pem: str, what: str) -> object:
    try:
        return serialization.load_pem_private_key(pem.strip().encode(), password=None)
    except (ValueError, TypeError, UnicodeEncodeError):
        raise ValueError(f"{what} is not a readable unencrypted PEM private key.") from None
