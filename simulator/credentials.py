"""The simulator's generated secrets: a CA and server certificate, and test credentials per provider.

Everything is generated once into the workdir and reused, so a CA bundle or a .p8 handed to a
client stays valid across simulator restarts. Only the FCM service account depends on where the
simulator listens (its `token_uri`), so that JSON is composed on every call from the stored key.
"""

from __future__ import annotations

import base64
import datetime as dt
import fcntl
import ipaddress
import json
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

APNS_TOPIC = "com.example.pushsvc.demo"
FCM_PROJECT_ID = "pushsvc-sim"
VAPID_SUBJECT = "mailto:ops@pushsvc.example"

_ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


@dataclass(frozen=True)
class SimCredentials:
    workdir: Path
    ca_file: str
    server_cert_file: str
    server_key_file: str
    apns_key_p8: str
    apns_key_id: str
    apns_team_id: str
    apns_topic: str
    fcm_service_account: str
    hms_app_id: str
    hms_client_secret: str
    vapid_private_key: str
    vapid_public_key: str
    vapid_subject: str
    # The CA whose client certificates the APNs front accepts (certificate authentication), as
    # Apple's WWDR CA signs real provider certificates; `apns_client_certificate` issues them.
    apns_client_ca_file: str = ""

    @property
    def fcm_project_id(self) -> str:
        return json.loads(self.fcm_service_account)["project_id"]

    @property
    def fcm_client_email(self) -> str:
        return json.loads(self.fcm_service_account)["client_email"]

    def __repr__(self) -> str:  # never print the secrets
        return f"SimCredentials(workdir={str(self.workdir)!r}, apns_key_id={self.apns_key_id!r})"


def _pem_private(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_once(path: Path, make: Callable[[], bytes]) -> bytes:
    if path.exists():
        return path.read_bytes()
    data = make()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o600)
    tmp.replace(path)
    return data


def _make_ca(workdir: Path, extra_hosts: tuple[str, ...] = ()) -> None:
    if (workdir / "ca.pem").exists() and (workdir / "server.pem").exists():
        return
    now = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    later = now + dt.timedelta(days=3650)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pushsvc simulator CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(later)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(later)
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                    *(_san(host) for host in extra_hosts),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_once(workdir / "server.key", lambda: _pem_private(server_key))
    _write_once(workdir / "server.pem", lambda: server_cert.public_bytes(serialization.Encoding.PEM))
    _write_once(workdir / "ca.pem", lambda: ca_cert.public_bytes(serialization.Encoding.PEM))


def _ids(workdir: Path) -> dict[str, str]:
    def make() -> bytes:
        ids = {
            "apns_key_id": "".join(secrets.choice(_ALNUM) for _ in range(10)),
            "apns_team_id": "".join(secrets.choice(_ALNUM) for _ in range(10)),
            "fcm_private_key_id": secrets.token_hex(20),
            "hms_app_id": str(100_000_000 + secrets.randbelow(900_000_000)),
            "hms_client_secret": secrets.token_hex(32),
        }
        return json.dumps(ids, indent=2).encode()

    return json.loads(_write_once(workdir / "ids.json", make))


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def ensure_credentials(
    workdir: str | os.PathLike[str], base_url: str, extra_hosts: tuple[str, ...] = ()
) -> SimCredentials:
    """Create (first call) or load the simulator's secrets; safe to call from several processes.

    The server certificate names localhost, 127.0.0.1 and ::1, plus `extra_hosts` (addresses or
    names) when this call creates it: a simulator listening on another address (the multi-host
    tests' bridge, tests/multihost) gets a workdir of its own, created with that address."""
    wd = Path(workdir).resolve()
    wd.mkdir(parents=True, exist_ok=True)
    with open(wd / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _make_ca(wd, tuple(extra_hosts))
        ids = _ids(wd)
        apns_p8 = _write_once(
            wd / "apns_key.p8", lambda: _pem_private(ec.generate_private_key(ec.SECP256R1()))
        )
        fcm_pem = _write_once(
            wd / "fcm_key.pem",
            lambda: _pem_private(rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        )
        vapid_pem = _write_once(
            wd / "vapid_key.pem", lambda: _pem_private(ec.generate_private_key(ec.SECP256R1()))
        )
        if not (wd / "apns_client_ca.pem").exists():
            ca_cert, ca_key = new_ca("pushsvc simulator APNs client CA")
            _write_once(wd / "apns_client_ca.key", lambda: _pem_private(ca_key))
            _write_once(wd / "apns_client_ca.pem", lambda: ca_cert.public_bytes(serialization.Encoding.PEM))
    vapid_key = serialization.load_pem_private_key(vapid_pem, password=None)
    vapid_point = vapid_key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    service_account = {
        "type": "service_account",
        "project_id": FCM_PROJECT_ID,
        "private_key_id": ids["fcm_private_key_id"],
        "private_key": fcm_pem.decode(),
        "client_email": f"firebase-adminsdk@{FCM_PROJECT_ID}.iam.gserviceaccount.com",
        "client_id": "100000000000000000001",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": base_url.rstrip("/") + "/token",
        "universe_domain": "googleapis.com",
    }
    return SimCredentials(
        workdir=wd,
        ca_file=str(wd / "ca.pem"),
        server_cert_file=str(wd / "server.pem"),
        server_key_file=str(wd / "server.key"),
        apns_key_p8=apns_p8.decode(),
        apns_key_id=ids["apns_key_id"],
        apns_team_id=ids["apns_team_id"],
        apns_topic=APNS_TOPIC,
        fcm_service_account=json.dumps(service_account),
        hms_app_id=ids["hms_app_id"],
        hms_client_secret=ids["hms_client_secret"],
        vapid_private_key=vapid_pem.decode(),
        vapid_public_key=base64.urlsafe_b64encode(vapid_point).rstrip(b"=").decode(),
        vapid_subject=VAPID_SUBJECT,
        apns_client_ca_file=str(wd / "apns_client_ca.pem"),
    )


# --- APNs provider certificates (certificate authentication) ---------------------------------------

# Apple's extensions on provider certificates: development (sandbox) and production environment.
APNS_DEVELOPMENT_OID = x509.ObjectIdentifier("1.2.840.113635.100.6.3.1")
APNS_PRODUCTION_OID = x509.ObjectIdentifier("1.2.840.113635.100.6.3.2")


def new_ca(name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA (the simulator's client CA, or, in tests, one APNs does not trust)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def load_ca(cert_file: str | os.PathLike[str]) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA certificate and its key (stored next to it as .key)."""
    cert_path = Path(cert_file)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(cert_path.with_suffix(".key").read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return cert, key


def apns_client_certificate(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    topic: str,
    *,
    environments: tuple[str, ...] = ("sandbox", "production"),
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> tuple[str, str]:
    """(certificate PEM, key PEM) shaped like Apple's: the bundle id as the subject's UID, the
    environments as Apple's extensions, signed by `ca` (RSA 2048, as Apple issues them)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.USER_ID, topic),
                    x509.NameAttribute(NameOID.COMMON_NAME, f"Apple Push Services: {topic}"),
                ]
            )
        )
        .issuer_name(ca[0].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - dt.timedelta(days=1))
        .not_valid_after(not_after or now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    for environment, oid in (("sandbox", APNS_DEVELOPMENT_OID), ("production", APNS_PRODUCTION_OID)):
        if environment in environments:
            builder = builder.add_extension(x509.UnrecognizedExtension(oid, b"\x05\x00"), critical=False)
    cert = builder.sign(ca[1], hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM).decode(), _pem_private(key).decode()
