"""Device registry API v1: register (upsert), list, read, unregister.

Every query is scoped to the App of the request's API key; another App's device answers 404,
exactly like a device that does not exist.
"""

from __future__ import annotations

import base64
import binascii
import uuid

import orjson
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, inline_serializer
from rest_framework import exceptions, permissions, serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from .auth import ApiKeyAuthentication, DevicesScope, RegisterOrDevicesScope, verify_authorization
from .models import ApiKey, DeviceToken
from .registry import upsert_device
from .serializers import DeviceRegistrationSerializer, DeviceSerializer, device_payload
from .validation import PLATFORMS, RegistrationError, validate_registration

# A registration is a few hundred bytes; a web subscription under 3 KiB; an FCM token up to 4 KiB.
MAX_REGISTRATION_BYTES = 16 * 1024
PAGE_DEFAULT = 100
PAGE_MAX = 1000

_ERROR = OpenApiResponse(
    response=inline_serializer(
        "Error",
        {"detail": serializers.CharField(), "errors": serializers.DictField(required=False)},
    )
)


def register_device(request: HttpRequest) -> HttpResponse:
    """POST /api/v1/devices/ on a plain Django request; see DeviceCollectionView.dispatch."""
    try:
        key = verify_authorization(request.META.get("HTTP_AUTHORIZATION", ""))
    except exceptions.AuthenticationFailed as exc:
        return _problem(401, str(exc.detail))
    if key is None:
        return _problem(401, str(exceptions.NotAuthenticated.default_detail))
    if not {ApiKey.SCOPE_DEVICES, ApiKey.SCOPE_REGISTER} & key.scopes:
        return _problem(403, "This API key lacks the 'devices' or 'register' scope.")
    content_type = request.META.get("CONTENT_TYPE", "")
    if content_type.split(";", 1)[0].strip().lower() != "application/json":
        return _problem(415, f'Unsupported media type "{content_type or "(none)"}" in request.')
    try:
        length = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    if length > MAX_REGISTRATION_BYTES:
        return _problem(413, f"The request body must be at most {MAX_REGISTRATION_BYTES} bytes.")
    try:
        data = orjson.loads(request.body)
    except orjson.JSONDecodeError as exc:
        return _problem(400, f"The body is not valid JSON: {exc}")
    try:
        reg = validate_registration(data)
    except RegistrationError as exc:
        return _problem(400, "Invalid request.", exc.errors)
    result = upsert_device(key.app_id, reg, now=timezone.now())
    body = device_payload(
        device_id=reg.device_id,
        platform=reg.platform,
        token=reg.token,
        user_id=reg.user_id,
        app_version=reg.app_version,
        locale=reg.locale,
        is_active=True,
        deactivated_at=None,
        deactivation_reason="",
        last_seen=result.registered_at,
        last_success_at=result.last_success_at,
        created_at=result.created_at,
        updated_at=result.registered_at,
    )
    return HttpResponse(
        orjson.dumps(body), status=201 if result.created else 200, content_type="application/json"
    )


def _problem(status: int, detail: str, errors: dict[str, list[str]] | None = None) -> HttpResponse:
    """The API's error shape (pushsvc.api) without DRF's rendering machinery."""
    body: dict[str, object] = {"detail": detail}
    if errors is not None:
        body["errors"] = errors
    response = HttpResponse(orjson.dumps(body), status=status, content_type="application/json")
    if status == 401:
        response["WWW-Authenticate"] = ApiKeyAuthentication.keyword
    return response


class DeviceCollectionView(APIView):
    permission_classes = (DevicesScope,)

    @extend_schema(
        operation_id="devices_register",
        summary="Register a device (upsert by device_id)",
        description=(
            "Creates the device or updates it: a rotated token replaces the old one, a token known on "
            "another device_id moves here, a deactivated device is re-activated, last_seen and "
            "updated_at become now. Call it on every app launch. Takes a server key (`devices` scope) "
            "or the app's own key (`register` scope)."
        ),
        request=DeviceRegistrationSerializer,
        responses={201: DeviceSerializer, 200: DeviceSerializer, 400: _ERROR, 401: _ERROR, 403: _ERROR},
    )
    def post(self, request: Request) -> HttpResponse:
        # Reached only if something calls the DRF handler directly; dispatch() short-cuts POST.
        return register_device(request._request)

    def dispatch(self, request: HttpRequest, *args: object, **kwargs: object) -> HttpResponse:
        # The registration is the hottest request of the service (every app launch of every
        # user): it skips DRF's request wrapping, negotiation and rendering, which cost more
        # than the validation. Same auth, same checks, same error shapes.
        if request.method == "POST":
            return register_device(request)
        return super().dispatch(request, *args, **kwargs)

    @extend_schema(
        operation_id="devices_list",
        summary="List devices, newest registration order by id, keyset-paginated",
        parameters=[
            OpenApiParameter("user_id", OpenApiTypes.STR, description="Only this user's devices"),
            OpenApiParameter("platform", OpenApiTypes.STR, description="ios, android, huawei or web"),
            OpenApiParameter("limit", OpenApiTypes.INT, description=f"Page size, 1-{PAGE_MAX}"),
            OpenApiParameter("cursor", OpenApiTypes.STR, description="`next_cursor` of the previous page"),
        ],
        responses={
            200: inline_serializer(
                "DevicePage",
                {
                    "results": DeviceSerializer(many=True),
                    "next_cursor": serializers.CharField(allow_null=True),
                },
            ),
            400: _ERROR,
            401: _ERROR,
            403: _ERROR,
        },
    )
    def get(self, request: Request) -> Response:
        params = request.query_params
        errors: dict[str, list[str]] = {}
        qs = DeviceToken.objects.filter(app_id=request.auth.app_id)
        user_id = params.get("user_id")
        if user_id is not None:
            if len(user_id) > 255 or not user_id.isprintable():
                errors["user_id"] = ["Must be at most 255 printable characters."]
            else:
                qs = qs.filter(user_id=user_id)
        platform = params.get("platform")
        if platform is not None:
            if platform not in PLATFORMS:
                errors["platform"] = ["Must be one of: android, huawei, ios, web."]
            else:
                qs = qs.filter(platform=platform)
        limit = _int_param(params.get("limit"), PAGE_DEFAULT)
        if limit is None or not 1 <= limit <= PAGE_MAX:
            errors["limit"] = [f"Must be an integer from 1 to {PAGE_MAX}."]
        after = 0
        if params.get("cursor"):
            after = _decode_cursor(params["cursor"])
            if after is None:
                errors["cursor"] = ["Invalid cursor: pass the next_cursor of the previous page."]
        if errors:
            raise exceptions.ValidationError(errors)
        page = list(qs.filter(id__gt=after).order_by("id")[: limit + 1])
        more = len(page) > limit
        page = page[:limit]
        return Response(
            {
                "results": DeviceSerializer(page, many=True).data,
                "next_cursor": _encode_cursor(page[-1].id) if more else None,
            }
        )


class DeviceDetailView(APIView):
    # GET needs `devices`; DELETE also takes an app's `register` key (get_permissions).
    permission_classes = (DevicesScope,)

    def get_permissions(self) -> list[permissions.BasePermission]:
        if self.request.method == "DELETE":
            return [RegisterOrDevicesScope()]
        return super().get_permissions()

    def _devices(self, request: Request, device_id: str) -> QuerySet[DeviceToken]:
        try:
            parsed = uuid.UUID(device_id)
        except ValueError:
            raise exceptions.NotFound("No such device.") from None
        return DeviceToken.objects.filter(app_id=request.auth.app_id, device_id=parsed)

    @extend_schema(
        operation_id="devices_retrieve",
        summary="Read one device",
        responses={200: DeviceSerializer, 401: _ERROR, 403: _ERROR, 404: _ERROR},
    )
    def get(self, request: Request, device_id: str) -> Response:
        device = self._devices(request, device_id).first()
        if device is None:
            raise exceptions.NotFound("No such device.")
        return Response(DeviceSerializer(device).data)

    @extend_schema(
        operation_id="devices_unregister",
        summary="Unregister a device (deactivates it with reason 'unregistered')",
        description=(
            "The row is kept, inactive; registering the device again re-activates it. Takes a "
            "`devices` key, or an app's `register` key (then 204 whether or not the device exists)."
        ),
        responses={204: None, 401: _ERROR, 403: _ERROR, 404: _ERROR},
    )
    def delete(self, request: Request, device_id: str) -> Response:
        devices = self._devices(request, device_id)
        # updated_at is deliberately untouched: it is the last *registration* time.
        changed = devices.filter(is_active=True).update(
            is_active=False, deactivated_at=timezone.now(), deactivation_reason="unregistered"
        )
        if ApiKey.SCOPE_DEVICES not in request.auth.scopes:
            # An app's register key learns nothing about which device ids exist: 204 either way.
            return Response(status=204)
        if not changed and not devices.exists():
            raise exceptions.NotFound("No such device.")
        return Response(status=204)


def _int_param(raw: str | None, default: int) -> int | None:
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        return None


def _encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(str(last_id).encode()).rstrip(b"=").decode()


def _decode_cursor(raw: str) -> int | None:
    if len(raw) > 32:
        return None
    try:
        value = int(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode())
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None
    return value if 0 <= value < 2**63 else None
