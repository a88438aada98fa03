"""Checks and helpers for an App's provider credentials, shared by admin and management commands.

Error messages describe what is wrong with a credential, never its content.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

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


# --- APNs certificate authentication -----------------------------------------------------------------

# Apple's provider certificates carry the app's bundle id as the subject's UID, and say which APNs
# environment they open with extensions (the OIDs of Apple's WWDR certificate policy): development
# (sandbox) and production. A "Sandbox & Production" certificate carries both, plus a list of its
# topics (bundle id, .voip, .complication) in a third extension.
APNS_DEVELOPMENT_OID = x509.ObjectIdentifier("1.2.840.113635.100.6.3.1")
APNS_PRODUCTION_OID = x509.ObjectIdentifier("1.2.840.113635.100.6.3.2")
APNS_TOPICS_OID = x509.ObjectIdentifier("1.2.840.113635.100.6.3.6")
APNS_TOPIC_SUFFIXES = (".voip", ".complication")
_PEM_KEY = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----.+?-----END [A-Z ]*PRIVATE KEY-----", re.S)


@dataclass(frozen=True)
class ApnsCertificate:
    """A checked APNs provider certificate with its key, as PEM (what the TLS client loads)."""

    cert_pem: str
    key_pem: str  # secret
    topic: str  # the subject's UID: the app's bundle id
    environments: frozenset[str]  # ApnsEnvironment values the certificate opens
    not_after: datetime

    def environment_for(self, wanted: str) -> str:
        """The environment an app with this certificate sends to: the only one the certificate
        opens, or `wanted` when it opens both."""
        if wanted in self.environments:
            return wanted
        if len(self.environments) == 1:
            return next(iter(self.environments))
        raise ValueError("The certificate opens no APNs environment.")  # parse refuses these


def parse_apns_certificate(
    data: bytes, *, password: str = "", key_pem: str = "", now: datetime | None = None
) -> ApnsCertificate:
    """Read a .p12 (PKCS#12, with its password) or a PEM certificate (with its key in the same text
    or in `key_pem`) and check it is a usable APNs provider certificate: the key matches, it has
    not expired, it names a topic and opens at least one APNs environment. ValueError says what is
    wrong, never what the secret contains."""
    now = now or datetime.now(UTC)
    if b"-----BEGIN" in data:
        cert, key = _pem_certificate(data, key_pem)
    else:
        cert, key = _pkcs12_certificate(data, password)
    if key is None:
        raise ValueError("The certificate comes without its private key: add the key (PEM) or use the .p12.")
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise ValueError("The certificate's key must be an RSA or EC private key.")
    if key.public_key().public_numbers() != cert.public_key().public_numbers():
        raise ValueError("The private key does not belong to the certificate.")
    not_after = cert.not_valid_after_utc
    if not_after <= now:
        raise ValueError(
            f"The certificate expired on {not_after:%Y-%m-%d}; renew it in the Apple developer account."
        )
    if cert.not_valid_before_utc > now:
        raise ValueError(
            f"The certificate is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC."
        )
    uids = cert.subject.get_attributes_for_oid(NameOID.USER_ID)
    topic = str(uids[0].value).strip() if uids else ""
    if not topic:
        raise ValueError("The certificate's subject has no UID: it is not an APNs provider certificate.")
    environments = set()
    for ext in cert.extensions:
        if ext.oid == APNS_DEVELOPMENT_OID:
            environments.add("sandbox")
        elif ext.oid == APNS_PRODUCTION_OID:
            environments.add("production")
    if not environments:
        raise ValueError(
            "The certificate has neither Apple's development nor production push extension: "
            "it is not an APNs provider certificate."
        )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    key_text = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return ApnsCertificate(cert_pem, key_text, topic, frozenset(environments), not_after)


def check_certificate_topic(cert: ApnsCertificate, topic: str) -> None:
    """An app's configured topic must be the certificate's (or one of its suffixed topics)."""
    if topic and topic != cert.topic and topic not in {cert.topic + s for s in APNS_TOPIC_SUFFIXES}:
        raise ValueError(f"The certificate is for {cert.topic!r}, not for the app's topic {topic!r}.")


def _pem_certificate(data: bytes, key_pem: str) -> tuple[x509.Certificate, object]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ValueError("The PEM text holds no readable certificate.") from None
    key_source = key_pem.encode() if key_pem.strip() else data
    key = None
    if b"PRIVATE KEY-----" in key_source:
        try:
            key = serialization.load_pem_private_key(_only_key(key_source), password=None)
        except (ValueError, TypeError):
            raise ValueError("The certificate's key is not a readable unencrypted PEM private key.") from None
    return certs[0], key


def _only_key(pem: bytes) -> bytes:
    # load_pem_private_key reads the first PEM block: hand it the key's block, not a certificate.
    match = _PEM_KEY.search(pem)
    return match.group(0) if match else pem


def _pkcs12_certificate(data: bytes, password: str) -> tuple[x509.Certificate, object]:
    try:
        key, cert, _chain = pkcs12.load_key_and_certificates(data, password.encode() or None)
    except ValueError:
        raise ValueError("The .p12 file cannot be opened: wrong password, or not a PKCS#12 file.") from None
    if cert is None:
        raise ValueError("The .p12 file holds no certificate.")
    return cert, key
