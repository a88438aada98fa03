"""Campaign and direct-send endpoints (scope `send`). Another app's campaign is a 404."""

from __future__ import annotations

from django.http import Http404
from rest_framework import status
from rest_framework.exceptions import APIException
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from campaigns import control, fanout
from campaigns.models import Campaign
from campaigns.serializers import (
    CampaignCreateSerializer,
    DirectSendSerializer,
    ResumeSerializer,
    represent,
)
from delivery import runtime
from tokens.auth import SendScope


class Conflict(APIException):
    status_code = status.HTTP_409_CONFLICT
    default_code = "conflict"


def _campaign(request: Request, campaign_id: int) -> Campaign:
    campaign = Campaign.objects.filter(pk=campaign_id, app_id=request.auth.app_id).first()
    if campaign is None:
        raise Http404("No such campaign.")
    return campaign


class CampaignCollectionView(APIView):
    permission_classes = [SendScope]

    def post(self, request: Request) -> Response:
        serializer = CampaignCreateSerializer(data=request.data, context={"app": request.auth.app})
        serializer.is_valid(raise_exception=True)
        campaign = serializer.save()
        if not serializer.validated_data["draft"]:
            fanout.launch(campaign)
            campaign.refresh_from_db()
        return Response(represent(campaign), status=status.HTTP_201_CREATED)


class CampaignDetailView(APIView):
    permission_classes = [SendScope]

    def get(self, request: Request, campaign_id: int) -> Response:
        return Response(represent(_campaign(request, campaign_id)))


class CampaignActionView(APIView):
    """POST .../launch | pause | resume | cancel."""

    permission_classes = [SendScope]
    action: str = ""

    def post(self, request: Request, campaign_id: int) -> Response:
        campaign = _campaign(request, campaign_id)
        client = runtime.redis_client()
        try:
            if self.action == "launch":
                if campaign.status != Campaign.Status.DRAFT:
                    raise control.TransitionError("Only a draft campaign can be launched.")
                fanout.launch(campaign)
            elif self.action == "pause":
                if not control.pause(client, campaign.pk, "Paused by request."):
                    raise control.TransitionError(
                        f"Only a running campaign can be paused (it is {campaign.status})."
                    )
            elif self.action == "resume":
                body = ResumeSerializer(data=request.data or {})
                body.is_valid(raise_exception=True)
                control.resume(
                    client,
                    campaign.pk,
                    confirm_prune=body.validated_data["confirm_prune"],
                    halt_error_rate=body.validated_data.get("halt_error_rate"),
                )
            elif self.action == "cancel":
                control.cancel(client, campaign.pk)
        except control.TransitionError as exc:
            raise Conflict(str(exc)) from None
        campaign.refresh_from_db()
        return Response(represent(campaign))


class DirectSendView(APIView):
    """POST /api/v1/notifications/: up to 10,000 users or devices, on the priority queue."""

    permission_classes = [SendScope]

    def post(self, request: Request) -> Response:
        serializer = DirectSendSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        target = {"user_ids": data["user_ids"]} if data.get("user_ids") else {}
        if data.get("device_ids"):
            target["device_ids"] = [str(d) for d in data["device_ids"]]
        campaign = Campaign.objects.create(
            app=request.auth.app,
            kind=Campaign.Kind.DIRECT,
            message=data["message"],
            target=target,
            status=Campaign.Status.RUNNING,
        )
        fanout.plan_direct(campaign)
        campaign.refresh_from_db()
        return Response(represent(campaign), status=status.HTTP_202_ACCEPTED)
