"""Create or update an App (idempotent on --slug) with its provider credentials.

Secrets are read from files (never from the command line, where they would land in shell
history and the process list) and never printed: the summary shows fingerprints only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from tokens import credentials, webhooks
from tokens.models import ApnsAuth, ApnsEnvironment, App
from tokens.validation import validate_webhook_url


class Command(BaseCommand):
    help = "Create or update an App (tenant) and its APNs / FCM / HMS / Web Push credentials."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--slug", required=True, help="stable identifier; an existing app is updated")
        parser.add_argument("--name", help="display name (required when creating)")
        apns = parser.add_argument_group("APNs (token authentication)")
        apns.add_argument("--apns-key-file", help=".p8 file from the Apple developer account")
        apns.add_argument("--apns-key-id")
        apns.add_argument("--apns-team-id")
        apns.add_argument("--apns-topic", help="bundle id, e.g. com.example.app")
        apns.add_argument("--apns-environment", choices=ApnsEnvironment.values)
        cert = parser.add_argument_group(
            "APNs (certificate authentication: sets the topic from the certificate's UID and the "
            "environment from its extensions)"
        )
        cert.add_argument(
            "--apns-cert-file", help=".p12 export, or PEM certificate (with or without its key)"
        )
        cert.add_argument("--apns-cert-key-file", help="PEM private key, when not in the certificate file")
        cert.add_argument("--apns-cert-password-file", help="file holding the .p12 password")
        cert.add_argument(
            "--apns-auth",
            choices=ApnsAuth.values,
            help="which APNs credential sends (default: certificate when one is given here)",
        )
        fcm = parser.add_argument_group("FCM HTTP v1")
        fcm.add_argument("--fcm-service-account-file", help="service-account JSON of the Firebase project")
        hms = parser.add_argument_group("Huawei Push Kit")
        hms.add_argument("--hms-app-id")
        hms.add_argument("--hms-client-secret-file", help="file holding the app's client secret")
        hooks = parser.add_argument_group("Webhooks (signed events to your backend)")
        hooks.add_argument("--webhook-url", help="https URL receiving the app's events ('' removes it)")
        secret = hooks.add_mutually_exclusive_group()
        secret.add_argument("--webhook-secret-file", help="file holding the signing secret")
        secret.add_argument(
            "--webhook-generate-secret",
            action="store_true",
            help="generate a signing secret and print it once",
        )
        web = parser.add_argument_group("Web Push (VAPID)")
        vapid = web.add_mutually_exclusive_group()
        vapid.add_argument("--vapid-generate", action="store_true", help="generate a new VAPID key pair")
        vapid.add_argument("--vapid-private-key-file", help="PEM of an existing P-256 VAPID key")
        web.add_argument("--vapid-subject", help="mailto: or https: contact sent to push services")

    def handle(self, *args: Any, **o: Any) -> None:
        with transaction.atomic():
            app = App.objects.select_for_update().filter(slug=o["slug"]).first()
            created = app is None
            if created:
                if not o["name"]:
                    raise CommandError("--name is required when creating an app.")
                app = App(slug=o["slug"])
            try:
                self._apply(app, o)
                app.full_clean()
            except (ValueError, OSError) as exc:
                raise CommandError(str(exc)) from None
            except Exception as exc:  # ValidationError from full_clean: field messages only
                messages = getattr(exc, "message_dict", None)
                if messages is None:
                    raise
                raise CommandError(
                    "; ".join(f"{field}: {' '.join(msgs)}" for field, msgs in messages.items())
                ) from None
            app.save()
        self.stdout.write(f"{'Created' if created else 'Updated'} app {app.slug!r} ({app.name}).")
        self._summary(app)
        if created:
            self.stdout.write(f"Next: python manage.py create_api_key {app.slug} --scopes devices,send")

    def _apply(self, app: App, o: dict[str, Any]) -> None:
        if o["name"]:
            app.name = o["name"]
        for option in ("apns_key_id", "apns_team_id", "apns_topic", "apns_environment", "hms_app_id"):
            if o[option] is not None:
                setattr(app, option, o[option])
        if o["apns_key_file"]:
            pem = _read(o["apns_key_file"])
            credentials.check_apns_key(pem)
            app.apns_key_p8 = pem
        if o["apns_cert_file"]:
            self._apply_certificate(app, o)
        if o["apns_auth"]:
            app.apns_auth = o["apns_auth"]
        if o["fcm_service_account_file"]:
            text = _read(o["fcm_service_account_file"])
            credentials.check_service_account(text)
            app.fcm_service_account = text
        if o["hms_client_secret_file"]:
            secret = _read(o["hms_client_secret_file"]).strip()
            if not secret:
                raise ValueError("The HMS client secret file is empty.")
            app.hms_client_secret = secret
        if o["vapid_generate"]:
            app.vapid_private_key, app.vapid_public_key = credentials.generate_vapid_key()
        elif o["vapid_private_key_file"]:
            pem = _read(o["vapid_private_key_file"])
            app.vapid_public_key = credentials.check_vapid_key(pem)
            app.vapid_private_key = pem
        if o["webhook_url"] is not None:
            if o["webhook_url"]:
                validate_webhook_url(o["webhook_url"], resolve=False)
            app.webhook_url = o["webhook_url"]
        self.new_webhook_secret = ""
        if o["webhook_secret_file"]:
            app.webhook_secret = _read(o["webhook_secret_file"]).strip()
        elif o["webhook_generate_secret"]:
            app.webhook_secret = self.new_webhook_secret = webhooks.generate_secret()
        if app.webhook_url and not app.webhook_secret:
            raise ValueError(
                "A webhook URL needs a signing secret: --webhook-secret-file or --webhook-generate-secret."
            )
        if o["vapid_subject"] is not None:
            credentials.check_vapid_subject(o["vapid_subject"])
            app.vapid_subject = o["vapid_subject"]

    def _apply_certificate(self, app: App, o: dict[str, Any]) -> None:
        data = _read_bytes(o["apns_cert_file"])
        key = _read(o["apns_cert_key_file"]) if o["apns_cert_key_file"] else ""
        password = _read(o["apns_cert_password_file"]).strip("\r\n") if o["apns_cert_password_file"] else ""
        cert = credentials.parse_apns_certificate(data, password=password, key_pem=key)
        credentials.check_certificate_topic(cert, o["apns_topic"] or "")
        app.apns_topic = o["apns_topic"] or cert.topic
        app.apns_environment = cert.environment_for(o["apns_environment"] or app.apns_environment)
        app.apns_cert_pem, app.apns_cert_key_pem = cert.cert_pem, cert.key_pem
        app.apns_cert_expires_at = cert.not_after
        app.apns_auth = ApnsAuth.CERTIFICATE

    def _summary(self, app: App) -> None:
        def secret(field: str) -> str:
            return f"set · {app.secret_fingerprint(field)}" if getattr(app, field) else "not set"

        lines = [
            f"  APNs:     key {secret('apns_key_p8')}, key id {app.apns_key_id or '-'}, "
            f"team {app.apns_team_id or '-'}, topic {app.apns_topic or '-'} ({app.apns_environment})",
            f"  APNs cert: {secret('apns_cert_key_pem')}"
            + (f", expires {app.apns_cert_expires_at:%Y-%m-%d}" if app.apns_cert_expires_at else "")
            + f"; APNs sends with: {app.apns_auth}",
            f"  FCM:      service account {secret('fcm_service_account')}",
            f"  HMS:      app id {app.hms_app_id or '-'}, client secret {secret('hms_client_secret')}",
            f"  Web Push: private key {secret('vapid_private_key')}, subject {app.vapid_subject or '-'}",
        ]
        lines.append(f"  Webhooks: {app.webhook_url or '-'}, secret {secret('webhook_secret')}")
        if getattr(self, "new_webhook_secret", ""):
            # Shown once, like an API key: the receiver needs it to verify signatures.
            lines.append(f"  Webhook signing secret (shown once, store it now): {self.new_webhook_secret}")
        if app.vapid_public_key:
            lines.append(f"  VAPID public key (applicationServerKey for the browser): {app.vapid_public_key}")
        self.stdout.write("\n".join(lines))


def _read(path: str) -> str:
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"{path}: no such file.")
    if file.stat().st_size > 64 * 1024:
        raise ValueError(f"{path}: larger than 64 KiB, not a credential file.")
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text.") from None


def _read_bytes(path: str) -> bytes:
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"{path}: no such file.")
    if file.stat().st_size > 64 * 1024:
        raise ValueError(f"{path}: larger than 64 KiB, not a credential file.")
    return file.read_bytes()
