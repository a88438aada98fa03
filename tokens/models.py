"""Tenants (App), their API keys, and the device token registry."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid

from django.db import models
from django.utils import timezone


class Platform(models.TextChoices):
    IOS = "ios", "iOS (APNs)"
    ANDROID = "android", "Android (FCM)"
    HUAWEI = "huawei", "Huawei (HMS Push Kit)"
    WEB = "web", "Web Push"


class ApnsEnvironment(models.TextChoices):
    SANDBOX = "sandbox", "Sandbox"
    PRODUCTION = "production", "Production"


class ApnsAuth(models.TextChoices):
    TOKEN = "token", "Token (.p8 key)"
    CERTIFICATE = "certificate", "Certificate (.p12 / PEM)"


class App(models.Model):
    """One mobile or web app: the tenant every token, key and campaign belongs to.

    Credential fields are secrets: they are written by admin or a management command and read
    only by the provider adapters. No serializer, admin page or log line returns them.
    """

    name = models.CharField(max_length=200)
    slug = models.SlugField(max_length=64, unique=True)
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    apns_topic = models.CharField(max_length=255, blank=True, help_text="Bundle id, e.g. com.example.app")
    apns_environment = models.CharField(
        max_length=16, choices=ApnsEnvironment.choices, default=ApnsEnvironment.PRODUCTION
    )
    apns_auth = models.CharField(
        max_length=16,
        choices=ApnsAuth.choices,
        default=ApnsAuth.TOKEN,
        help_text="How pushsvc authenticates to APNs: a .p8 signing key, or a provider certificate (TLS).",
    )
    apns_key_p8 = models.TextField(blank=True, help_text="PEM of the .p8 signing key (secret)")
    apns_key_id = models.CharField(max_length=32, blank=True)
    apns_team_id = models.CharField(max_length=32, blank=True)
    # Certificate authentication (tokens/credentials.py parse_apns_certificate checks it on save).
    apns_cert_pem = models.TextField(blank=True, help_text="PEM of the APNs provider certificate")
    apns_cert_key_pem = models.TextField(
        blank=True, help_text="PEM of the certificate's private key (secret)"
    )
    apns_cert_expires_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="When the APNs certificate expires (every APNs send fails from then on)",
    )

    fcm_service_account = models.TextField(blank=True, help_text="Service-account JSON (secret)")

    hms_app_id = models.CharField(max_length=64, blank=True)
    hms_client_secret = models.CharField(max_length=255, blank=True, help_text="(secret)")

    vapid_private_key = models.TextField(blank=True, help_text="PEM of the VAPID P-256 key (secret)")
    vapid_public_key = models.CharField(max_length=128, blank=True, help_text="base64url, uncompressed point")
    vapid_subject = models.CharField(max_length=255, blank=True, help_text="mailto: or https: contact")

    # Signed webhooks to the app's backend (tokens/webhooks.py).
    webhook_url = models.CharField(
        max_length=2048, blank=True, help_text="https URL receiving the app's events (empty: none sent)"
    )
    webhook_secret = models.CharField(
        max_length=128, blank=True, help_text="HMAC-SHA256 signing secret (secret)"
    )

    SECRET_FIELDS = (
        "apns_key_p8",
        "apns_cert_key_pem",
        "fcm_service_account",
        "hms_client_secret",
        "vapid_private_key",
        "webhook_secret",
    )

    class Meta:
        ordering = ("id",)

    def __str__(self) -> str:
        return self.slug

    def secret_fingerprint(self, field: str) -> str:
        """A short, non-reversible label for a stored secret ("" when unset)."""
        value = getattr(self, field)
        if not value:
            return ""
        return "sha256:" + hashlib.sha256(value.encode()).hexdigest()[:12]


class ApiKey(models.Model):
    """A bearer key for one App. Only a SHA-256 of the key is stored; the key is shown once.

    Keys are 256-bit random strings, so a fast hash is enough (no password stretching needed);
    the public prefix makes lookup an index hit.
    """

    # devices: the whole registry of the app (server side). send: campaigns and direct sends (server
    # side). register: the key shipped inside apps, which anyone can extract: create/update and
    # delete of a device by its device_id only; it cannot list or read devices (README).
    SCOPE_DEVICES = "devices"
    SCOPE_SEND = "send"
    SCOPE_REGISTER = "register"
    SCOPES = (SCOPE_DEVICES, SCOPE_SEND, SCOPE_REGISTER)
    KEY_PREFIX = "psk_"

    app = models.ForeignKey(App, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100, blank=True)
    prefix = models.CharField(max_length=16, unique=True, editable=False)
    key_hash = models.CharField(max_length=64, editable=False)
    scopes = models.JSONField(default=list)
    created_at = models.DateTimeField(auto_now_add=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ("id",)

    def __str__(self) -> str:
        return f"{self.app.slug}:{self.prefix}"

    @staticmethod
    def hash_key(raw: str) -> str:
        return hashlib.sha256(raw.encode()).hexdigest()

    @classmethod
    def issue(cls, app: App, scopes: list[str] | tuple[str, ...], name: str = "") -> tuple[ApiKey, str]:
        """Create a key and return it with the raw secret (the only time it exists in clear)."""
        unknown = set(scopes) - set(cls.SCOPES)
        if unknown:
            raise ValueError(f"unknown scopes: {sorted(unknown)}")
        prefix = secrets.token_hex(6)
        raw = f"{cls.KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"
        key = cls.objects.create(
            app=app, name=name, prefix=prefix, key_hash=cls.hash_key(raw), scopes=list(scopes)
        )
        return key, raw

    @staticmethod
    def parse_prefix(raw: str) -> str | None:
        if not raw.startswith(ApiKey.KEY_PREFIX):
            return None
        prefix, sep, _ = raw[len(ApiKey.KEY_PREFIX) :].partition("_")
        # Checked before it reaches a query: a header can carry any byte, PostgreSQL takes no NUL.
        if not sep or len(prefix) != 12 or prefix.strip("0123456789abcdef"):
            return None
        return prefix

    def matches(self, raw: str) -> bool:
        return hmac.compare_digest(self.key_hash, self.hash_key(raw))

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None

    def revoke(self) -> None:
        self.revoked_at = timezone.now()
        self.save(update_fields=["revoked_at"])


class DeviceToken(models.Model):
    """A device's current push address for one App.

    `token` is the provider token (APNs hex, FCM/HMS registration token) or, for the web, the
    push subscription's endpoint URL with its keys in `web_p256dh` / `web_auth`. Uniqueness of
    the token is enforced on `token_hash` (SHA-256 hex of `token`): tokens may be up to 4 KiB,
    beyond what a btree index entry can hold.

    `updated_at` is the last registration time; the APNs 410 rule compares it with the provider's
    timestamp, so only registrations (not deliveries) may move it.

    On PostgreSQL the table is hash-partitioned on (app_id, device_id) (tokens 0007): the primary
    key there is (app_id, device_id), `id` has a plain index, and the token's uniqueness is the
    primary key of CLAIMS_TABLE, kept by triggers. The constraints below are what SQLite gets.
    """

    CLAIMS_TABLE = "tokens_tokenclaim"

    # No index of its own: every composite index below starts with app_id and serves it, and a
    # sixth index would cost every registration and bulk import one more btree insert.
    app = models.ForeignKey(App, on_delete=models.CASCADE, related_name="devices", db_index=False)
    user_id = models.CharField(max_length=255, blank=True, default="")
    device_id = models.UUIDField()
    platform = models.CharField(max_length=16, choices=Platform.choices)
    token = models.TextField()
    token_hash = models.CharField(max_length=64, editable=False)
    web_p256dh = models.CharField(max_length=128, blank=True, default="")
    web_auth = models.CharField(max_length=64, blank=True, default="")
    app_version = models.CharField(max_length=32, blank=True, default="")
    locale = models.CharField(max_length=35, blank=True, default="")
    last_seen = models.DateTimeField(default=timezone.now)
    # Carried over by import_tokens from another system; sends no longer write it: an UPDATE per
    # delivered device rewrote the whole registry on every broadcast. Failures are what is written.
    last_success_at = models.DateTimeField(null=True, blank=True)
    is_active = models.BooleanField(default=True)
    deactivated_at = models.DateTimeField(null=True, blank=True)
    deactivation_reason = models.CharField(max_length=64, blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["app", "device_id"], name="uniq_device_per_app"),
            models.UniqueConstraint(
                fields=["app", "platform", "token_hash"], name="uniq_token_per_app_platform"
            ),
        ]
        indexes = [
            models.Index(fields=["app", "user_id", "is_active"], name="device_user_idx"),
            models.Index(fields=["app", "platform", "is_active", "id"], name="device_fanout_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.platform}:{self.token[:12]}…"

    @staticmethod
    def hash_token(token: str) -> str:
        return hashlib.sha256(token.encode()).hexdigest()

    def save(self, *args, **kwargs) -> None:
        self.token_hash = self.hash_token(self.token)
        super().save(*args, **kwargs)


class WebhookEvent(models.Model):
    """The outbox: one event for the app's backend, written in the transaction of the change that
    causes it, so a committed change always has its event and a rolled-back one never does.
    Delivered at least once by tokens.deliver_webhook; `id` is the event id receivers dedupe on."""

    class Status(models.TextChoices):
        PENDING = "pending"
        DELIVERED = "delivered"
        FAILED = "failed"  # gave up after WEBHOOK_MAX_ATTEMPTS, or the app's URL was removed

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    app = models.ForeignKey(App, on_delete=models.CASCADE, related_name="webhook_events")
    type = models.CharField(max_length=64)
    payload = models.JSONField()
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)
    next_attempt_at = models.DateTimeField(default=timezone.now)
    # Set by the delivering task for the length of one attempt: a second copy of the task (the
    # beat sweep, a redelivered message) finds the event leased and leaves it alone.
    leased_until = models.DateTimeField(null=True, blank=True)
    delivered_at = models.DateTimeField(null=True, blank=True)
    last_error = models.CharField(max_length=300, blank=True, default="")

    class Meta:
        ordering = ("-created_at",)
        indexes = [
            models.Index(
                fields=["next_attempt_at"],
                name="webhook_event_due_idx",
                condition=models.Q(status="pending"),
            ),
            models.Index(fields=["app", "-created_at"], name="webhook_event_app_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.type} {self.id}"


class WebhookAttempt(models.Model):
    """One delivery attempt of an event: what the backend answered, or why there was no answer."""

    event = models.ForeignKey(WebhookEvent, on_delete=models.CASCADE, related_name="attempt_log")
    attempt = models.PositiveIntegerField()
    attempted_at = models.DateTimeField(default=timezone.now)
    url = models.CharField(max_length=2048)
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    error = models.CharField(max_length=300, blank=True, default="")
    duration_ms = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ("attempt",)

    def __str__(self) -> str:
        return f"attempt {self.attempt} of {self.event_id}: {self.status_code or self.error}"
