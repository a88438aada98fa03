"""Django admin for campaigns: a create form validated exactly like the API, the operator actions,
and a change page with live progress, failures by provider and reason, and dead letters.

The create form hands its fields to `CampaignCreateSerializer` (payload size per provider,
collapse id length, background push rules, target and rollout checks) instead of validating
anything itself, and the actions are the API's (see campaigns/admin_views.py).
"""

from __future__ import annotations

import json
from typing import Any

from django import forms
from django.contrib import admin
from django.db.models import QuerySet
from django.forms.fields import InvalidJSONInput
from django.http import HttpRequest, HttpResponse
from django.urls import URLPattern, path, reverse

from campaigns import admin_views, canary, series
from campaigns.models import Campaign
from campaigns.serializers import CampaignCreateSerializer
from tokens.admin import AppAdmin
from tokens.models import App

# Serializer error keys -> the form field that shows them.
_ROLLOUT_FIELDS = {
    "start_rate": "rollout_start_rate",
    "max_rate": "rollout_max_rate",
    "ramp_minutes": "rollout_ramp_minutes",
}

admin.site.index_template = "admin/pushsvc_index.html"

# The App page's "send test push" is a direct send, which campaigns/ owns; tokens/ (below it)
# knows nothing of campaigns, so the action is added from here.
AppAdmin.actions = (*AppAdmin.actions, admin_views.send_test_push_action)


class SafeJSONField(forms.JSONField):
    """forms.JSONField whose hostile inputs are form errors, not 500s: nesting deep enough to hit
    Python's recursion limit, text PostgreSQL's jsonb cannot store (NUL) or UTF-8 cannot encode
    (lone surrogates from \\ud800 escapes)."""

    max_depth = 64  # a message nests two levels; anything deeper is a mistake or an attack

    def to_python(self, value: Any) -> Any:
        if isinstance(value, str) and _nesting(value) > self.max_depth:
            raise forms.ValidationError(f"JSON nested deeper than {self.max_depth} levels.", code="invalid")
        try:
            converted = super().to_python(value)
        except RecursionError:
            raise forms.ValidationError("JSON nested too deeply.", code="invalid") from None
        _check_text(converted)
        return converted

    def bound_data(self, data: Any, initial: Any) -> Any:
        # An invalid form is shown again from bound_data, which parses the input once more.
        if isinstance(data, str) and _nesting(data) > self.max_depth:
            return InvalidJSONInput(data)
        value = super().bound_data(data, initial)
        try:
            _check_text(value)
        except forms.ValidationError:
            # Shown as typed (its \\u escapes are ASCII): re-dumped, a lone surrogate cannot be
            # encoded into the page, and the answer was a 500.
            return InvalidJSONInput(data)
        return value


def _nesting(text: str) -> int:
    """Deepest bracket nesting of a JSON text (brackets inside strings included: an upper bound)."""
    depth = deepest = 0
    for char in text:
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _check_text(value: Any) -> None:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            if "\x00" in item:
                raise forms.ValidationError("Text must not contain NUL characters.", code="invalid")
            try:
                item.encode()
            except UnicodeEncodeError:
                message = "Text must be valid Unicode (no lone surrogates)."
                raise forms.ValidationError(message, code="invalid") from None


class CampaignCreateForm(forms.ModelForm):
    message = SafeJSONField(
        help_text='The unified message, as in the API: {"title": "...", "body": "...", "data": {...}, '
        '"collapse_id": "...", "content_available": true, ...}',
        widget=forms.Textarea(attrs={"rows": 6, "cols": 80}),
    )
    target = SafeJSONField(
        required=False,
        help_text="Empty = every active device. Keys: platforms, user_ids, min_app_version, "
        "max_app_version, active_within_days.",
        widget=forms.Textarea(attrs={"rows": 3, "cols": 80}),
    )
    canary = SafeJSONField(
        required=False,
        help_text='Empty = no canary. {"size": 1000, "wait_s": 300, "max_error_rate": 0.05}: send to a '
        "random sample first; the rest goes only if the sample's error rate is within the limit, else the "
        "campaign pauses.",
        widget=forms.Textarea(attrs={"rows": 2, "cols": 80}),
    )
    launch_now = forms.BooleanField(
        required=False, initial=True, help_text="Launch on save (or schedule, when a send time is set)."
    )

    class Meta:
        model = Campaign
        fields = (
            "app",
            "name",
            "message",
            "target",
            "send_at",
            "rollout_start_rate",
            "rollout_max_rate",
            "rollout_ramp_minutes",
            "halt_error_rate",
            "canary",
        )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["app"].queryset = App.objects.filter(is_active=True)
        self._serializer: CampaignCreateSerializer | None = None

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        app = data.get("app")
        if self.errors or app is None:
            return data
        rollout = {
            key: data.get(field) for key, field in _ROLLOUT_FIELDS.items() if data.get(field) is not None
        }
        body = {
            "name": data.get("name") or "",
            "message": data.get("message"),
            "target": data.get("target") or {},
            "send_at": data.get("send_at"),
            "rollout": rollout,
            "halt_error_rate": data.get("halt_error_rate"),
            "draft": True,
        }
        if not body["target"]:
            body.pop("target")
        if data.get("canary") not in (None, "", {}):
            body["canary"] = data["canary"]
        serializer = CampaignCreateSerializer(data=body, context={"app": app})
        if not serializer.is_valid():
            self._attach(serializer.errors)
        self._serializer = serializer
        return data

    def _attach(self, errors: dict[str, Any]) -> None:
        for key, value in errors.items():
            if key == "rollout" and isinstance(value, dict):
                for sub, messages in value.items():
                    self.add_error(_ROLLOUT_FIELDS.get(sub), _texts(sub, messages))
            elif key == "target":
                self.add_error("target", _texts("", value))
            elif key in self.fields:
                self.add_error(key, _texts("", value))
            elif key == "non_field_errors":
                self.add_error(None, _texts("", value))
            else:
                # validate_message names the message's own field ("collapse_key", "body", ...).
                self.add_error("message", _texts(key, value))

    def save(self, commit: bool = True) -> Campaign:
        assert self._serializer is not None
        self.save_m2m = lambda: None  # the admin calls it; a campaign has no many-to-many fields
        return self._serializer.save()


def _texts(name: str, messages: Any) -> list[str]:
    """DRF's nested errors ({"platforms": {0: ["..."]}}) as readable lines."""
    if isinstance(messages, dict):
        return [m for key, value in messages.items() for m in _texts(_join(name, key), value)]
    if isinstance(messages, list):
        return [m for value in messages for m in _texts(name, value)]
    return [f"{name}: {messages}" if name else str(messages)]


def _join(name: str, key: object) -> str:
    if isinstance(key, int):
        return f"{name} item {key}"
    return str(key) if not name or key == "non_field_errors" else f"{name}.{key}"


@admin.register(Campaign)
class CampaignAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "name",
        "app",
        "kind",
        "status",
        "targeted",
        "delivered",
        "failed",
        "invalidated",
        "created_at",
    )
    list_filter = ("status", "kind", "app")
    list_select_related = ("app",)
    search_fields = ("name",)
    ordering = ("-id",)
    actions = (
        "launch_selected",
        "pause_selected",
        "resume_selected",
        "cancel_selected",
        "duplicate_selected",
    )
    change_form_template = "admin/campaigns/campaign/change_form.html"
    change_list_template = "admin/campaigns/campaign/change_list.html"

    def get_form(
        self, request: HttpRequest, obj: Campaign | None = None, **kwargs: Any
    ) -> type[forms.ModelForm]:
        if obj is None:
            kwargs["form"] = CampaignCreateForm
            kwargs["fields"] = None
        return super().get_form(request, obj, **kwargs)

    def get_fields(self, request: HttpRequest, obj: Campaign | None = None) -> list[str]:
        if obj is None:
            return [*CampaignCreateForm.Meta.fields, "launch_now"]
        return ["app", "name", "kind", "status", "status_reason", "message_json", "target_json", "send_at",
                "rollout_start_rate", "rollout_max_rate", "rollout_ramp_minutes", "halt_error_rate",
                "prune_confirmed", "canary_summary", "created_at", "started_at", "finished_at"]  # fmt: skip

    def get_readonly_fields(self, request: HttpRequest, obj: Campaign | None = None) -> list[str]:
        # A campaign is immutable once created: operators act on it (pause, cancel, duplicate).
        return self.get_fields(request, obj) if obj is not None else []

    @admin.display(description="message")
    def message_json(self, campaign: Campaign) -> str:
        return json.dumps(campaign.message, indent=2, ensure_ascii=False)

    @admin.display(description="canary")
    def canary_summary(self, campaign: Campaign) -> str:
        """The canary cohort: its settings, where it stands, and the figures it was decided on."""
        state = canary.status_of(campaign)
        if state is None:
            return "none"
        limit = 100.0 * state["max_error_rate"]
        line = f"{state['size']} devices, wait {state['wait_s']} s, limit {limit:.1f} %"
        line += f" · phase {state['phase']}"
        if state["sample"] is not None:
            line += f" · sample {state['sample']}"
        if state["decide_at"] is not None and state["decision"] is None:
            line += f" · decides at {state['decide_at']:%Y-%m-%d %H:%M:%S} UTC"
        figures = state["figures"]
        if figures is not None:
            rate = 100.0 * figures["error_rate"]
            line += f" · {figures['errors']} of {figures['answered']} failed ({rate:.1f} %)"
            line += f" → {state['decision']}"
        if state["resumed_at"]:
            line += " · resumed by an operator"
        return line

    @admin.display(description="target")
    def target_json(self, campaign: Campaign) -> str:
        return json.dumps(campaign.target or {"all active devices": True}, ensure_ascii=False)

    def save_model(self, request: HttpRequest, obj: Campaign, form: forms.ModelForm, change: bool) -> None:
        if change:
            return  # nothing is editable; actions change state
        # The form's save() already created the row through the API serializer.
        if form.cleaned_data.get("launch_now"):
            admin_views.apply_action("launch", obj)
            obj.refresh_from_db()

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)  # a bulk delete would not ask whether campaigns run
        return actions

    def has_delete_permission(self, request: HttpRequest, obj: Campaign | None = None) -> bool:
        # Deleting a running campaign would orphan its queued shards; cancel it instead.
        return obj is None or obj.status in (*Campaign.FINAL_STATUSES, Campaign.Status.DRAFT)

    def get_urls(self) -> list[URLPattern]:
        wrap = self.admin_site.admin_view
        return [
            path("<int:campaign_id>/progress/", wrap(self._progress), name="campaigns_campaign_progress"),
            path("<int:campaign_id>/do/<str:action>/", wrap(self._act), name="campaigns_campaign_act"),
            path("send-test/", wrap(self._send_test), name="campaigns_campaign_send_test"),
            *super().get_urls(),
        ]

    def _progress(self, request: HttpRequest, campaign_id: int) -> HttpResponse:
        if not self.has_view_permission(request):
            return HttpResponse("Forbidden", status=403)
        return admin_views.progress_view(request, campaign_id)

    def _act(self, request: HttpRequest, campaign_id: int, action: str) -> HttpResponse:
        if not self.has_change_permission(request):
            return HttpResponse("Forbidden", status=403)
        return admin_views.action_view(request, campaign_id, action, self)

    def _send_test(self, request: HttpRequest) -> HttpResponse:
        if not self.has_add_permission(request):
            return HttpResponse("Forbidden", status=403)
        return admin_views.send_test_push_view(request, self)

    def change_view(
        self, request: HttpRequest, object_id: str, form_url: str = "", extra_context: dict | None = None
    ) -> HttpResponse:
        campaign = self.get_object(request, object_id)
        extra = dict(extra_context or {})
        if campaign is not None:
            extra.update(
                progress=admin_views.progress_payload(campaign),
                progress_url=reverse("admin:campaigns_campaign_progress", args=[campaign.pk]),
                dead_letters=admin_views.dead_letters_of(campaign),
                actions_available=admin_views.ACTIONS,
                versions_shown=series.VERSIONS_SHOWN,
            )
        return super().change_view(request, object_id, form_url, extra)

    def _run(self, request: HttpRequest, queryset: QuerySet[Campaign], action: str) -> None:
        admin_views.run_actions(request, action, queryset, self)

    @admin.action(description="Launch selected draft campaigns")
    def launch_selected(self, request: HttpRequest, queryset: QuerySet[Campaign]) -> None:
        self._run(request, queryset, "launch")

    @admin.action(description="Pause selected campaigns")
    def pause_selected(self, request: HttpRequest, queryset: QuerySet[Campaign]) -> None:
        self._run(request, queryset, "pause")

    @admin.action(description="Resume selected campaigns")
    def resume_selected(self, request: HttpRequest, queryset: QuerySet[Campaign]) -> None:
        self._run(request, queryset, "resume")

    @admin.action(description="Cancel selected campaigns")
    def cancel_selected(self, request: HttpRequest, queryset: QuerySet[Campaign]) -> None:
        self._run(request, queryset, "cancel")

    @admin.action(description="Duplicate selected campaigns as drafts")
    def duplicate_selected(self, request: HttpRequest, queryset: QuerySet[Campaign]) -> None:
        self._run(request, queryset, "duplicate")
