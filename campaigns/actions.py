"""What an operator can do to a campaign, once for the API (campaigns/views.py) and the admin
(campaigns/admin_views.py): `act` (launch, pause, resume, cancel, duplicate) and `send_direct`.

A module of its own rather than part of campaigns/control.py: launching and direct sends go
through planning, which itself uses control's transitions (control -> planning would be a cycle).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from django.db import transaction

from campaigns import canary, control, planning
from campaigns.models import Campaign
from campaigns.serializers import ResumeSerializer
from delivery import runtime
from tokens.models import App

ACTIONS = ("launch", "pause", "resume", "cancel", "duplicate")


class InvalidOptions(Exception):
    """The action's options did not validate; `errors` as a DRF serializer gives them."""

    def __init__(self, errors: Mapping[str, Any]) -> None:
        super().__init__(str(errors))
        self.errors = errors


def act(
    action: str,
    campaign: Campaign,
    options: Mapping[str, Any] | None = None,
    *,
    pause_reason: str = "Paused by request.",
) -> str:
    """Run one action on `campaign`; what happened, in a few words. Raises control.TransitionError
    when the campaign's state does not allow it, InvalidOptions when resume's options (
    `confirm_prune`, `halt_error_rate`) are not valid."""
    client = runtime.redis_client()
    if action == "launch":
        if campaign.status != Campaign.Status.DRAFT:
            raise control.TransitionError("Only a draft campaign can be launched.")
        planning.launch(campaign)
        return "launched"
    if action == "pause":
        if not control.pause(client, campaign.pk, pause_reason):
            raise control.TransitionError(f"Only a running campaign can be paused (it is {campaign.status}).")
        return "paused"
    if action == "resume":
        body = ResumeSerializer(data=options or {})
        if not body.is_valid():
            raise InvalidOptions(body.errors)
        control.resume(
            client,
            campaign.pk,
            confirm_prune=body.validated_data["confirm_prune"],
            halt_error_rate=body.validated_data.get("halt_error_rate"),
        )
        canary.after_resume(campaign.pk)  # a failed canary: the rest is planned now
        return "resumed" + (
            " with its invalid tokens confirmed" if body.validated_data["confirm_prune"] else ""
        )
    if action == "cancel":
        control.cancel(client, campaign.pk)
        return "cancelled"
    if action == "duplicate":
        return f"duplicated as draft campaign {duplicate(campaign).pk}"
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
        canary=campaign.canary,
        canary_phase=Campaign.CanaryPhase.PENDING if campaign.canary else Campaign.CanaryPhase.NONE,
    )


def send_direct(
    app: App,
    message: dict[str, Any],
    target: dict[str, Any],
    *,
    name: str = "",
    attach: Callable[[Campaign], None] | None = None,
) -> Campaign:
    """A direct send of a validated message (campaigns/serializers.py DirectSendSerializer) to
    `target` (user_ids or device_ids), planned in the request onto the priority queue. `attach`
    runs in the campaign's creating transaction (an idempotency key's claim)."""
    with transaction.atomic():
        campaign = Campaign.objects.create(
            app=app,
            kind=Campaign.Kind.DIRECT,
            name=name,
            message=message,
            target=target,
            status=Campaign.Status.RUNNING,
        )
        if attach is not None:
            attach(campaign)
    planning.plan_direct(campaign)
    campaign.refresh_from_db()
    return campaign
