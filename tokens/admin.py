"""Django admin for apps (write-only credentials), API keys and device tokens."""

from __future__ import annotations

import uuid
from typing import Any

from django import forms
from django.contrib import admin
from django.core.paginator import Paginator
from django.db import connection
from django.db.models import Q, QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.functional import cached_property

from . import credentials, webhooks
from .auth import forget_cached_keys
from .models import ApiKey, ApnsAuth, App, DeviceToken, WebhookAttempt, WebhookEvent
from .validation import validate_webhook_url

# --- App: credentials are write-only -------------------------------------------------------------

# form field -> (model field, label). The form fields have their own names so that Django never
# fills them from the instance: the stored secret is never rendered back, not even hidden.
SECRET_INPUTS = {
    "new_apns_key_p8": ("apns_key_p8", "APNs .p8 key (PEM)"),
    "new_fcm_service_account": ("fcm_service_account", "FCM service-account JSON"),
    "new_hms_client_secret": ("hms_client_secret", "HMS client secret"),
    "new_vapid_private_key": ("vapid_private_key", "VAPID private key (PEM)"),
    "new_webhook_secret": ("webhook_secret", "Webhook signing secret"),
}


class WriteOnlyTextarea(forms.Textarea):
    """Renders empty even when the form comes back with errors: a pasted secret is not echoed."""

    def format_value(self, value: Any) -> None:
        return None


class AppAdminForm(forms.ModelForm):
    new_apns_key_p8 = forms.CharField(required=False, widget=WriteOnlyTextarea(attrs={"rows": 4}))
    new_fcm_service_account = forms.CharField(required=False, widget=WriteOnlyTextarea(attrs={"rows": 4}))
    new_hms_client_secret = forms.CharField(required=False, widget=forms.PasswordInput(render_value=False))
    new_vapid_private_key = forms.CharField(required=False, widget=WriteOnlyTextarea(attrs={"rows": 4}))
    new_webhook_secret = forms.CharField(required=False, widget=forms.PasswordInput(render_value=False))
    clear_secrets = forms.MultipleChoiceField(
        required=False,
        widget=forms.CheckboxSelectMultiple,
        choices=[
            *((model_field, label) for model_field, label in SECRET_INPUTS.values()),
            ("apns_cert_key_pem", "APNs certificate"),
        ],
        help_text="Remove these stored credentials.",
    )
    generate_vapid = forms.BooleanField(required=False, label="Generate a new VAPID key pair")
    new_apns_certificate = forms.FileField(
        required=False,
        label="APNs certificate (.p12 or PEM)",
        help_text="Sets the topic from the certificate's UID and the environment from its extensions.",
    )
    new_apns_certificate_password = forms.CharField(
        required=False, label=".p12 password", widget=forms.PasswordInput(render_value=False)
    )
    new_apns_certificate_key = forms.CharField(
        required=False,
        label="Certificate's private key (PEM)",
        help_text="Only for a PEM certificate whose key is in a separate file.",
        widget=WriteOnlyTextarea(attrs={"rows": 3}),
    )

    class Meta:
        model = App
        exclude = (*App.SECRET_FIELDS, "vapid_public_key", "apns_cert_pem", "apns_cert_expires_at")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for form_field, (model_field, label) in SECRET_INPUTS.items():
            fingerprint = self.instance.secret_fingerprint(model_field) if self.instance.pk else ""
            state = f"set · {fingerprint}" if fingerprint else "not set"
            self.fields[form_field].label = label
            self.fields[form_field].help_text = f"Currently: {state}. Empty keeps it; paste to replace."
        self._certificate: credentials.ApnsCertificate | None = None
        app = self.instance
        if app.pk and app.apns_cert_key_pem:
            expires = f"{app.apns_cert_expires_at:%Y-%m-%d %H:%M} UTC" if app.apns_cert_expires_at else "?"
            self.fields["new_apns_certificate"].help_text = (
                f"Currently: set · {app.secret_fingerprint('apns_cert_key_pem')}, expires {expires}. "
                "Empty keeps it; upload to replace (the topic and environment follow the certificate)."
            )
        else:
            self.fields["new_apns_certificate"].help_text = "Currently: not set. " + (
                self.fields["new_apns_certificate"].help_text or ""
            )

    def clean_new_apns_key_p8(self) -> str:
        return self._checked("new_apns_key_p8", credentials.check_apns_key)

    def clean_new_fcm_service_account(self) -> str:
        return self._checked("new_fcm_service_account", credentials.check_service_account)

    def clean_new_vapid_private_key(self) -> str:
        return self._checked("new_vapid_private_key", credentials.check_vapid_key)

    def clean_vapid_subject(self) -> str:
        subject = self.cleaned_data.get("vapid_subject", "")
        if subject:
            try:
                credentials.check_vapid_subject(subject)
            except ValueError as exc:
                raise forms.ValidationError(str(exc)) from None
        return subject

    def clean_webhook_url(self) -> str:
        url = (self.cleaned_data.get("webhook_url") or "").strip()
        if url:
            try:
                validate_webhook_url(url, resolve=False)  # resolved again before every delivery
            except ValueError as exc:
                raise forms.ValidationError(str(exc)) from None
        return url

    def _checked(self, name: str, check: Any) -> str:
        value = (self.cleaned_data.get(name) or "").strip()
        if value:
            try:
                check(value)
            except ValueError as exc:
                raise forms.ValidationError(str(exc)) from None
        return value

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        if data.get("generate_vapid") and data.get("new_vapid_private_key"):
            raise forms.ValidationError("Either paste a VAPID key or generate one, not both.")
        upload = data.get("new_apns_certificate")
        if upload:
            if upload.size > 64 * 1024:
                self.add_error("new_apns_certificate", "Larger than 64 KiB: not a certificate file.")
                return data
            try:
                cert = credentials.parse_apns_certificate(
                    upload.read(),
                    password=data.get("new_apns_certificate_password") or "",
                    key_pem=data.get("new_apns_certificate_key") or "",
                )
                credentials.check_certificate_topic(cert, data.get("apns_topic") or "")
            except ValueError as exc:
                self.add_error("new_apns_certificate", str(exc))
                return data
            self._certificate = cert
        clearing = "apns_cert_key_pem" in (data.get("clear_secrets") or ())
        has_cert = self._certificate is not None or (bool(self.instance.apns_cert_key_pem) and not clearing)
        clears_secret = "webhook_secret" in (data.get("clear_secrets") or ())
        has_secret = bool(data.get("new_webhook_secret")) or (
            bool(self.instance.webhook_secret) and not clears_secret
        )
        if data.get("webhook_url") and not has_secret:
            self.add_error("new_webhook_secret", "A webhook URL needs a signing secret.")
        if data.get("apns_auth") == ApnsAuth.CERTIFICATE and not has_cert:
            self.add_error("apns_auth", "Certificate authentication needs an APNs certificate: upload one.")
        return data

    def save(self, commit: bool = True) -> App:
        app = super().save(commit=False)
        for model_field in self.cleaned_data.get("clear_secrets") or ():
            setattr(app, model_field, "")
            if model_field == "vapid_private_key":
                app.vapid_public_key = ""
            if model_field == "apns_cert_key_pem":
                app.apns_cert_pem, app.apns_cert_expires_at = "", None
        cert = self._certificate
        if cert is not None:
            app.apns_cert_pem, app.apns_cert_key_pem = cert.cert_pem, cert.key_pem
            app.apns_cert_expires_at = cert.not_after
            app.apns_topic = app.apns_topic or cert.topic
            app.apns_environment = cert.environment_for(app.apns_environment)
        for form_field, (model_field, _label) in SECRET_INPUTS.items():
            value = self.cleaned_data.get(form_field)
            if value:  # empty input keeps the stored secret
                setattr(app, model_field, value)
                if model_field == "vapid_private_key":
                    app.vapid_public_key = credentials.check_vapid_key(value)
        if self.cleaned_data.get("generate_vapid"):
            app.vapid_private_key, app.vapid_public_key = credentials.generate_vapid_key()
        if commit:
            app.save()
        return app


@admin.register(App)
class AppAdmin(admin.ModelAdmin):
    form = AppAdminForm
    list_display = ("slug", "name", "is_active", "apns_topic", "configured", "apns_certificate", "created_at")
    search_fields = ("slug", "name")
    readonly_fields = ("vapid_public_key", "created_at", "apns_cert_expires_at")
    actions = ()  # campaigns/admin.py adds "send test push" (a direct send: tokens/ knows nothing of it)
    fieldsets = (
        (None, {"fields": ("name", "slug", "is_active", "created_at")}),
        (
            "APNs",
            {
                "fields": (
                    "apns_auth",
                    "apns_topic",
                    "apns_environment",
                    "apns_key_id",
                    "apns_team_id",
                    "new_apns_key_p8",
                    "new_apns_certificate",
                    "new_apns_certificate_password",
                    "new_apns_certificate_key",
                    "apns_cert_expires_at",
                )
            },
        ),
        ("FCM", {"fields": ("new_fcm_service_account",)}),
        ("Huawei Push Kit", {"fields": ("hms_app_id", "new_hms_client_secret")}),
        (
            "Web Push",
            {"fields": ("vapid_subject", "vapid_public_key", "new_vapid_private_key", "generate_vapid")},
        ),
        ("Webhooks", {"fields": ("webhook_url", "new_webhook_secret")}),
        ("Remove credentials", {"classes": ("collapse",), "fields": ("clear_secrets",)}),
    )

    @admin.display(description="APNs certificate", ordering="apns_cert_expires_at")
    def apns_certificate(self, app: App) -> str:
        if app.apns_cert_expires_at is None:
            return "-"
        return f"certificate expires {app.apns_cert_expires_at:%Y-%m-%d}"

    @admin.display(description="credentials")
    def configured(self, app: App) -> str:
        names = {"apns_key_p8": "APNs", "fcm_service_account": "FCM", "hms_client_secret": "HMS"}
        names["apns_cert_key_pem"] = "APNs cert"
        names["vapid_private_key"] = "Web"
        return ", ".join(label for field, label in names.items() if getattr(app, field)) or "-"


# --- ApiKey: the raw key exists once, on the page answering its creation ------------------------------


class ApiKeyAdminForm(forms.ModelForm):
    scopes = forms.MultipleChoiceField(
        choices=[(s, s) for s in ApiKey.SCOPES], widget=forms.CheckboxSelectMultiple
    )

    class Meta:
        model = ApiKey
        fields = ("app", "name", "scopes")


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    form = ApiKeyAdminForm
    list_display = ("prefix", "app", "name", "scopes", "created_at", "revoked_at")
    list_filter = ("app", ("revoked_at", admin.EmptyFieldListFilter))
    list_select_related = ("app",)
    search_fields = ("prefix", "name", "app__slug")
    readonly_fields = ("prefix", "key_hash", "created_at", "revoked_at")
    actions = ("revoke",)

    def get_readonly_fields(self, request: HttpRequest, obj: ApiKey | None = None) -> tuple[str, ...]:
        # A key's app and scopes are fixed once issued: issue a new key instead.
        return self.readonly_fields + (("app", "scopes") if obj else ())

    def get_fields(self, request: HttpRequest, obj: ApiKey | None = None) -> list[str]:
        if obj is None:
            return ["app", "name", "scopes"]
        return ["app", "name", "scopes", "prefix", "key_hash", "created_at", "revoked_at"]

    def save_model(self, request: HttpRequest, obj: ApiKey, form: forms.Form, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        key, raw = ApiKey.issue(obj.app, form.cleaned_data["scopes"], name=obj.name)
        obj.pk, obj.prefix, obj.key_hash, obj.created_at = key.pk, key.prefix, key.key_hash, key.created_at
        obj.scopes = key.scopes
        # Shown by response_add on the answer to this POST, never through the messages framework:
        # its cookie is signed, not encrypted, and outlives the page.
        request._pushsvc_new_api_key = raw  # type: ignore[attr-defined]

    def response_add(
        self, request: HttpRequest, obj: ApiKey, post_url_continue: str | None = None
    ) -> HttpResponse:
        raw = getattr(request, "_pushsvc_new_api_key", None)
        if raw is None:
            return super().response_add(request, obj, post_url_continue)
        context = {
            **self.admin_site.each_context(request),
            "title": "API key created",
            "opts": self.opts,
            "key": obj,
            "raw_key": raw,
            "changelist_url": reverse("admin:tokens_apikey_changelist"),
        }
        response = TemplateResponse(request, "admin/tokens/apikey/created.html", context)
        response["Cache-Control"] = "no-store"  # the page holds the only copy of the key
        return response

    @admin.action(description="Revoke selected keys")
    def revoke(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        count = queryset.filter(revoked_at__isnull=True).update(revoked_at=timezone.now())
        forget_cached_keys()  # a queryset update sends no signals
        self.message_user(request, f"Revoked {count} key(s).")


# --- DeviceToken: big table, read-mostly --------------------------------------------------------


class EstimatedCountPaginator(Paginator):
    """The unfiltered change list of a table with millions of rows must not COUNT(*) it:
    PostgreSQL's planner estimate is good enough for page links."""

    @cached_property
    def count(self) -> int:
        query = getattr(self.object_list, "query", None)
        if connection.vendor == "postgresql" and query is not None and not query.where:
            with connection.cursor() as cursor:
                # The partitioned table's estimate is its partitions' (autovacuum analyzes those).
                cursor.execute(
                    "SELECT COALESCE((SELECT sum(greatest(p.reltuples, 0)) FROM pg_inherits i "
                    "JOIN pg_class p ON p.oid = i.inhrelid WHERE i.inhparent = t.oid), t.reltuples)::bigint "
                    "FROM pg_class t WHERE t.oid = %s::regclass",
                    [DeviceToken._meta.db_table],
                )
                row = cursor.fetchone()
            if row and row[0] > 10_000:
                return int(row[0])
        return super().count


@admin.register(DeviceToken)
class DeviceTokenAdmin(admin.ModelAdmin):
    list_display = ("device_id", "app", "platform", "user_id", "token_start", "is_active", "last_seen")
    list_filter = ("platform", "is_active", "app")
    list_select_related = ("app",)
    search_fields = ("user_id",)  # see get_search_results
    search_help_text = "A user id (exact), a device id, or the first characters of a token."
    show_full_result_count = False
    paginator = EstimatedCountPaginator
    list_per_page = 50
    ordering = ("-id",)
    exclude = ("web_p256dh", "web_auth")
    readonly_fields = (
        "app",
        "device_id",
        "platform",
        "user_id",
        "token",
        "token_hash",
        "app_version",
        "locale",
        "last_seen",
        "last_success_at",
        "created_at",
        "updated_at",
    )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # devices register through the API, which validates them

    @admin.display(description="token")
    def token_start(self, device: DeviceToken) -> str:
        return device.token[:16] + "…"

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[DeviceToken], search_term: str
    ) -> tuple[QuerySet[DeviceToken], bool]:
        # Exact and prefix lookups only: a substring search would scan millions of rows.
        term = search_term.strip()
        if not term:
            return queryset, False
        if not term.isprintable():
            return queryset.none(), False
        try:
            return queryset.filter(device_id=uuid.UUID(term)), False
        except ValueError:
            pass
        condition = Q(user_id=term[:255])
        if len(term) >= 8:
            condition |= Q(token__startswith=term)
        return queryset.filter(condition), False


# --- Webhook events: the outbox and every delivery attempt, read-only ----------------------------


class WebhookAttemptInline(admin.TabularInline):
    model = WebhookAttempt
    extra = 0
    can_delete = False
    fields = ("attempt", "attempted_at", "url", "status_code", "error", "duration_ms")
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(WebhookEvent)
class WebhookEventAdmin(admin.ModelAdmin):
    list_display = (
        "created_at",
        "app",
        "type",
        "status",
        "attempts",
        "next_attempt_at",
        "delivered_at",
        "last_error",
    )
    list_filter = ("status", "type", "app")
    list_select_related = ("app",)
    search_fields = ("=id",)
    date_hierarchy = "created_at"
    fields = (
        "id",
        "app",
        "type",
        "status",
        "attempts",
        "created_at",
        "next_attempt_at",
        "delivered_at",
        "last_error",
        "payload",
    )
    readonly_fields = fields
    inlines = (WebhookAttemptInline,)
    actions = ("deliver_again",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.action(description="Deliver the selected events again now")
    def deliver_again(self, request: HttpRequest, queryset: QuerySet) -> None:
        ids = [str(pk) for pk in queryset.values_list("pk", flat=True)]
        queryset.update(status=WebhookEvent.Status.PENDING, next_attempt_at=timezone.now(), leased_until=None)
        for event_id in ids:
            webhooks.publish(event_id)
        self.message_user(request, f"{len(ids)} events queued for delivery.")
