"""Admin-only views around campaigns: the progress JSON the change page polls, the operator
actions (launch, pause, resume, cancel, duplicate) and "send test push".

Every action calls the functions the API calls (campaigns/control.py, campaigns/fanout.py), and
every message goes through the API's validation (campaigns/serializers.py), so the admin can
never create or do something the API would refuse.
"""

from __future__ import annotations

import time
from typing import Any

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponseRedirect, JsonResponse
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import reverse

from campaigns import control, fanout, series
from campaigns.models import Campaign
from campaigns.serializers import DirectSendSerializer, ResumeSerializer, represent
from delivery import runtime
from delivery.models import DeadLetter
from tokens.models import App, DeviceToken

ACTIONS = ("launch", "pause", "resume", "cancel", "duplicate")
DEAD_LETTERS_SHOWN = 100


def admin_links(request: HttpRequest) -> dict[str, str]:
    """Template context: where the admin's Flower and metrics links point."""
    return {"pushsvc_flower_url": settings.FLOWER_URL}


# --- progress ------------------------------------------------------------------------------------
def progress_payload(campaign: Campaign) -> dict[str, Any]:
    """What the change page shows, from one campaign row, its tallies and its dead letters."""
    body = represent(campaign)
    counters = body["counters"]
    processed = campaign.processed
    body["processed"] = processed
    body["percent"] = round(100.0 * processed / campaign.targeted, 1) if campaign.targeted else 0.0
    body["final"] = campaign.status in Campaign.FINAL_STATUSES
    body["dead_letters"] = campaign.dead_letters.count()
    body.pop("message", None)  # not needed to redraw the page
    body["counters"] = counters
    # The chart: the stored per-interval series (campaigns/series.py, at most ~240 rows however
    # long the campaign) and the server's clock, so the page rates the current, partial interval
    # by its elapsed part; answers by provider and app version.
    body["series"] = {"fields": ["start", "width", *series.SAMPLE_FIELDS], "rows": series.series_of(campaign)}
    body["now"] = int(time.time())
    body.update(series.answers_of(campaign))
    return body


def progress_view(request: HttpRequest, campaign_id: int) -> JsonResponse:
    campaign = get_object_or_404(Campaign, pk=campaign_id)
    return JsonResponse(progress_payload(campaign), json_dumps_params={"default": str})


def dead_letters_of(campaign: Campaign) -> QuerySet[DeadLetter]:
    return campaign.dead_letters.order_by("-id")[:DEAD_LETTERS_SHOWN]


# --- operator actions ----------------------------------------------------------------------------
def apply_action(action: str, campaign: Campaign, options: dict[str, Any] | None = None) -> str:
    """Run one operator action like the API does; returns what happened. Raises TransitionError.
    `options`: resume's `confirm_prune` and `halt_error_rate`, validated as the API validates them."""
    client = runtime.redis_client()
    if action == "launch":
        if campaign.status != Campaign.Status.DRAFT:
            raise control.TransitionError("Only a draft campaign can be launched.")
        fanout.launch(campaign)
        return "launched"
    if action == "pause":
        if not control.pause(client, campaign.pk, "Paused from the admin."):
            raise control.TransitionError(f"Only a running campaign can be paused (it is {campaign.status}).")
        return "paused"
    if action == "resume":
        body = ResumeSerializer(data=options or {})
        if not body.is_valid():
            problems = "; ".join(
                f"{field}: {' '.join(map(str, errs))}" for field, errs in body.errors.items()
            )
            raise control.TransitionError(f"Not resumed: {problems}")
        control.resume(
            client,
            campaign.pk,
            confirm_prune=body.validated_data["confirm_prune"],
            halt_error_rate=body.validated_data.get("halt_error_rate"),
        )
        return "resumed" + (
            " with its invalid tokens confirmed" if body.validated_data["confirm_prune"] else ""
        )
    if action == "cancel":
        control.cancel(client, campaign.pk)
        return "cancelled"
    if action == "duplicate":
        copy = duplicate(campaign)
        return f"duplicated as draft campaign {copy.pk}"
    raise control.TransitionError(f"Unknown action {action!r}.")


def duplicate(campaign: Campaign) -> Campaign:
    """A new draft with the same app, message, target and rollout; counters and state start fresh."""
    if campaign.target.get("topic") or campaign.target.get("condition"):
        # As a broadcast draft its target would be every device of its platforms.
        raise control.TransitionError("A topic or condition send cannot be duplicated as a broadcast.")
    return Campaign.objects.create(
        app_id=campaign.app_id,
        name=(f"Copy of {campaign.name}" if campaign.name else f"Copy of campaign {campaign.pk}")[:200],
        kind=Campaign.Kind.BROADCAST,
        message=campaign.message,
        target=campaign.target,
        rollout_start_rate=campaign.rollout_start_rate,
        rollout_max_rate=campaign.rollout_max_rate,
        rollout_ramp_minutes=campaign.rollout_ramp_minutes,
        halt_error_rate=campaign.halt_error_rate,
    )


def run_actions(
    request: HttpRequest,
    action: str,
    campaigns: QuerySet[Campaign],
    admin_obj: Any,
    options: dict[str, Any] | None = None,
) -> None:
    for campaign in campaigns:
        try:
            outcome = apply_action(action, campaign, options)
        except control.TransitionError as exc:
            admin_obj.message_user(request, f"Campaign {campaign.pk}: {exc}", level=messages.ERROR)
        else:
            admin_obj.message_user(request, f"Campaign {campaign.pk}: {outcome}.")


def action_view(request: HttpRequest, campaign_id: int, action: str, admin_obj: Any) -> HttpResponseRedirect:
    """POST from a button on the change page; back to the page with a message."""
    campaign = get_object_or_404(Campaign, pk=campaign_id)
    if request.method == "POST" and action in ACTIONS:
        options = {}
        if action == "resume":
            # The change page's resume options; an empty limit field means "keep the limit".
            options["confirm_prune"] = request.POST.get("confirm_prune") == "on"
            if request.POST.get("halt_error_rate", "").strip():
                options["halt_error_rate"] = request.POST["halt_error_rate"].strip()
        run_actions(request, action, Campaign.objects.filter(pk=campaign.pk), admin_obj, options)
    return HttpResponseRedirect(reverse("admin:campaigns_campaign_change", args=[campaign.pk]))


# --- send test push ------------------------------------------------------------------------------
class TestPushForm(forms.Form):
    app = forms.ModelChoiceField(queryset=App.objects.filter(is_active=True))
    device_id = forms.UUIDField(help_text="The device's id (see Device tokens).")
    title = forms.CharField(max_length=200, initial="Test push")
    body = forms.CharField(max_length=1000, initial="Sent from the pushsvc admin.", widget=forms.Textarea)

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        if self.errors:
            return data
        device = DeviceToken.objects.filter(app=data["app"], device_id=data["device_id"]).first()
        if device is None:
            raise forms.ValidationError({"device_id": f"No device with this id in app {data['app'].slug}."})
        if not device.is_active:
            reason = device.deactivation_reason or "deactivated"
            raise forms.ValidationError({"device_id": f"This device's token is inactive ({reason})."})
        # The direct-send API's own validation (message rules, recipient limits).
        serializer = DirectSendSerializer(
            data={
                "message": {"title": data["title"], "body": data["body"]},
                "device_ids": [data["device_id"]],
            }
        )
        if not serializer.is_valid():
            raise forms.ValidationError(_flatten(serializer.errors))
        data["validated"] = serializer.validated_data
        return data


def _flatten(errors: Any, prefix: str = "") -> list[str]:
    if isinstance(errors, dict):
        return [m for key, value in errors.items() for m in _flatten(value, f"{prefix}{key}: ")]
    if isinstance(errors, list):
        return [m for value in errors for m in _flatten(value, prefix)]
    return [f"{prefix}{errors}"]


def send_test_push_view(request: HttpRequest, admin_obj: Any) -> Any:
    form = TestPushForm(request.POST or None, initial={"app": request.GET.get("app")})
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        # The same path as POST /api/v1/notifications/ (campaigns/views.py DirectSendView).
        campaign = Campaign.objects.create(
            app=data["app"],
            kind=Campaign.Kind.DIRECT,
            name="Test push from the admin",
            message=data["validated"]["message"],
            target={"device_ids": [str(data["device_id"])]},
            status=Campaign.Status.RUNNING,
        )
        fanout.plan_direct(campaign)
        admin_obj.message_user(request, f"Test push queued as direct send {campaign.pk}.")
        return HttpResponseRedirect(reverse("admin:campaigns_campaign_change", args=[campaign.pk]))
    context = {
        **admin.site.each_context(request),
        "title": "Send a test push",
        "form": form,
        "opts": Campaign._meta,
    }
    return TemplateResponse(request, "admin/campaigns/send_test_push.html", context)


@admin.action(description="Send a test push to one device of the selected app")
def send_test_push_action(
    modeladmin: Any, request: HttpRequest, queryset: QuerySet[App]
) -> HttpResponseRedirect:
    app = queryset.first()
    url = reverse("admin:campaigns_campaign_send_test")
    return HttpResponseRedirect(f"{url}?app={app.pk}" if app else url)
