"""Campaign and direct-send endpoints (scope `send`). Another app's campaign is a 404.

Each operation's OpenAPI description (request body, every answer) is declared here with
`extend_schema`, as tokens/views.py does for the device endpoints: these APIViews have no
serializer_class for drf-spectacular to guess from.
"""

from __future__ import annotations

from django.db import transaction
from django.http import Http404
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import serializers, status
from rest_framework.exceptions import APIException, ValidationError
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from campaigns import actions, control, idempotent, topics
from campaigns.models import Campaign, DirectResult
from campaigns.serializers import (
    CampaignCreateSerializer,
    CampaignSerializer,
    DirectSendSerializer,
    ResumeSerializer,
    represent,
)
from tokens.auth import SendScope
from tokens.views import _ERROR as ERROR  # the devices' error response: one Error component in all


class Conflict(APIException):
    status_code = status.HTTP_409_CONFLICT
    default_code = "conflict"


def _errors(*codes: int) -> dict[int, OpenApiResponse]:
    """The API's error shape (pushsvc/api.py) under each of `codes`; every operation authenticates."""
    return dict.fromkeys((401, 403, 429, *codes), ERROR)


# A JSON body is parsed (so can be refused with these) only by the operations that read one.
_BODY_ERRORS = (400, 413, 415)

# The two send operations take an Idempotency-Key (campaigns/idempotent.py): 409 while the key's
# first request is still running, 422 for the key reused with another body.
IDEMPOTENCY_KEY = OpenApiParameter(
    idempotent.HEADER,
    {
        "type": "string",
        "minLength": 1,
        "maxLength": idempotent.KEY_MAX,
        "pattern": rf"^{idempotent.KEY_PATTERN}$",
    },
    OpenApiParameter.HEADER,
    description=(
        "Makes a retry safe: the same key from the same app within IDEMPOTENCY_TTL_S (24 h) returns "
        "the first answer (same status and body) and sends nothing more; the key with another body is "
        "a 422, and while the first request runs a duplicate gets 409 with Retry-After."
    ),
)
_IDEMPOTENT_ERRORS = (409, 422)


def _campaign(request: Request, campaign_id: int) -> Campaign:
    campaign = Campaign.objects.filter(pk=campaign_id, app_id=request.auth.app_id).first()
    if campaign is None:
        raise Http404("No such campaign.")
    return campaign


class CampaignCollectionView(APIView):
    permission_classes = [SendScope]

    @extend_schema(
        operation_id="campaigns_create",
        summary="Create a campaign and launch it, schedule it (send_at) or keep it a draft",
        description=(
            "Without a target, every active device of the app. Launched now unless `draft` is true or "
            "`send_at` is in the future (status scheduled); the answer is the campaign as stored, "
            "planning and sending go on in the workers."
        ),
        request=CampaignCreateSerializer,
        parameters=[IDEMPOTENCY_KEY],
        responses={201: CampaignSerializer, **_errors(*_BODY_ERRORS, *_IDEMPOTENT_ERRORS)},
    )
    def post(self, request: Request) -> Response:
        return idempotent.respond(request, "campaigns", lambda claim: self._create(request, claim))

    def _create(self, request: Request, claim: idempotent.Claim | idempotent.NoClaim) -> Response:
        serializer = CampaignCreateSerializer(data=request.data, context={"app": request.auth.app})
        serializer.is_valid(raise_exception=True)
        with transaction.atomic():
            campaign = serializer.save()
            claim.attach(campaign)
        if not serializer.validated_data["draft"]:
            actions.act("launch", campaign)
            campaign.refresh_from_db()
        return Response(represent(campaign), status=status.HTTP_201_CREATED)


class CampaignDetailView(APIView):
    permission_classes = [SendScope]

    @extend_schema(
        operation_id="campaigns_retrieve",
        summary="Read a campaign: status, counters, progress, hygiene and failures by reason",
        responses={200: CampaignSerializer, **_errors(404)},
    )
    def get(self, request: Request, campaign_id: int) -> Response:
        return Response(represent(_campaign(request, campaign_id)))


class DirectResultSerializer(serializers.Serializer):
    id = serializers.IntegerField(help_text="the cursor: pass the last one as `after` for the next page")
    device_id = serializers.UUIDField(allow_null=True)
    platform = serializers.CharField()
    outcome = serializers.CharField(
        help_text="delivered, invalid_token, rejected, dead_letter (transient to the last attempt) or expired"
    )
    reason = serializers.CharField(allow_blank=True)
    status = serializers.IntegerField(allow_null=True, help_text="the provider's HTTP status")
    provider_message_id = serializers.CharField(
        allow_blank=True, help_text="apns-id, FCM message name or HMS requestId, for the provider's own logs"
    )
    attempt = serializers.IntegerField(help_text="0: the first send")


class DirectResultPageSerializer(serializers.Serializer):
    results = DirectResultSerializer(many=True)
    next_after = serializers.IntegerField(allow_null=True, help_text="null on the last page")


RESULTS_PAGE_MAX = 1000


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValidationError({name: f"must be an integer from {low} to {high}"}) from None
    if not low <= value <= high:
        raise ValidationError({name: f"must be an integer from {low} to {high}"})
    return value


class DirectResultsView(APIView):
    """GET /api/v1/campaigns/{id}/results/: a direct send's final answer per device."""

    permission_classes = [SendScope]

    @extend_schema(
        operation_id="campaigns_results",
        summary="A direct send's final answer per device, with the provider's message id",
        description=(
            "Direct sends only (a broadcast keeps counters); a device appears once it has a final "
            "answer. Pages in id order: pass the last `next_after` as `after`."
        ),
        parameters=[
            OpenApiParameter("after", int, description="cursor: results with a greater id (default 0)"),
            OpenApiParameter("limit", int, description=f"page size, 1 to {RESULTS_PAGE_MAX} (default 500)"),
        ],
        responses={200: DirectResultPageSerializer, **_errors(400, 404)},
    )
    def get(self, request: Request, campaign_id: int) -> Response:
        campaign = _campaign(request, campaign_id)
        after = _int_param(request, "after", 0, 0, 2**63 - 1)
        limit = _int_param(request, "limit", 500, 1, RESULTS_PAGE_MAX)
        rows = list(
            DirectResult.objects.filter(campaign=campaign, id__gt=after)
            .order_by("id")
            .values(
                "id", "device_id", "platform", "outcome", "reason", "status", "provider_message_id", "attempt"
            )[:limit]
        )
        return Response({"results": rows, "next_after": rows[-1]["id"] if len(rows) == limit else None})


class CampaignActionView(APIView):
    """POST .../launch | pause | resume | cancel; one subclass per action below (for the schema)."""

    permission_classes = [SendScope]
    action: str = ""

    def post(self, request: Request, campaign_id: int) -> Response:
        campaign = _campaign(request, campaign_id)
        try:
            # Only resume reads a body: the others take none, so a stray one is not parsed.
            options = (request.data or {}) if self.action == "resume" else None
            actions.act(self.action, campaign, options)
        except actions.InvalidOptions as exc:
            raise ValidationError(exc.errors) from None
        except control.TransitionError as exc:
            raise Conflict(str(exc)) from None
        campaign.refresh_from_db()
        return Response(represent(campaign))


def _action_schema(action: str, summary: str, **kwargs: object) -> extend_schema_view:
    # Launch, pause and cancel read no body: they take none in the schema either.
    kwargs.setdefault("request", None)
    kwargs.setdefault("responses", {200: CampaignSerializer, **_errors(404, 409)})
    return extend_schema_view(
        post=extend_schema(operation_id=f"campaigns_{action}", summary=summary, **kwargs)
    )


@_action_schema("launch", "Launch a draft (now, or scheduled when its send_at is in the future)")
class CampaignLaunchView(CampaignActionView):
    action = "launch"


@_action_schema("pause", "Pause a running campaign within one chunk; resume continues where it stopped")
class CampaignPauseView(CampaignActionView):
    action = "pause"


@_action_schema(
    "resume",
    "Resume a paused or halted campaign",
    description=(
        "A campaign paused by the mass-prune guard resumes with `confirm_prune` to apply the invalid "
        "answers; a halted one halts again at its next shard unless `halt_error_rate` raises the limit. "
        "The body may be left out."
    ),
    request=ResumeSerializer,
    responses={200: CampaignSerializer, **_errors(404, 409, *_BODY_ERRORS)},
)
class CampaignResumeView(CampaignActionView):
    action = "resume"


@_action_schema("cancel", "Cancel a campaign that is not finished; what is unsent stays unsent")
class CampaignCancelView(CampaignActionView):
    action = "cancel"


ACTION_VIEWS: dict[str, type[CampaignActionView]] = {
    view.action: view
    for view in (CampaignLaunchView, CampaignPauseView, CampaignResumeView, CampaignCancelView)
}


class DirectSendView(APIView):
    """POST /api/v1/notifications/: up to 10,000 users or devices, on the priority queue."""

    permission_classes = [SendScope]

    @extend_schema(
        operation_id="notifications_send",
        summary="Send one message now to listed users or devices (a direct campaign, priority queue)",
        description=(
            "Give exactly one of `user_ids` and `device_ids` (at most DIRECT_SEND_MAX_RECIPIENTS, "
            "10,000 by default), `topic` or `condition`. The devices are planned in the request; the "
            "answer is the direct campaign, to follow with GET /api/v1/campaigns/{id}/. A topic or "
            "condition is sent once per provider in `platforms` (FCM by default, HMS), which fans it "
            "out to the subscribers; each provider's answer and message id is a row of "
            "GET /api/v1/campaigns/{id}/results/."
        ),
        request=DirectSendSerializer,
        parameters=[IDEMPOTENCY_KEY],
        responses={202: CampaignSerializer, **_errors(*_BODY_ERRORS, *_IDEMPOTENT_ERRORS)},
    )
    def post(self, request: Request) -> Response:
        return idempotent.respond(request, "notifications", lambda claim: self._send(request, claim))

    def _send(self, request: Request, claim: idempotent.Claim | idempotent.NoClaim) -> Response:
        serializer = DirectSendSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        if topics.is_topic_send(data):
            campaign = topics.start(request.auth.app, data, claim)
            return Response(represent(campaign), status=status.HTTP_202_ACCEPTED)
        target = {"user_ids": data["user_ids"]} if data.get("user_ids") else {}
        if data.get("device_ids"):
            target["device_ids"] = [str(d) for d in data["device_ids"]]
        campaign = actions.send_direct(request.auth.app, data["message"], target, attach=claim.attach)
        return Response(represent(campaign), status=status.HTTP_202_ACCEPTED)
