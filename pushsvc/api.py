"""API-wide error shape: every 4xx is `{"detail": "<what is wrong>"}`, plus `"errors":
{field: [messages]}` when individual fields are wrong."""

from __future__ import annotations

from typing import Any

from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    data = response.data
    if isinstance(data, list):
        # ValidationError("...") or a list of messages: not tied to a field.
        response.data = {"detail": " ".join(str(message) for message in data) or "Invalid request."}
    elif isinstance(data, dict) and "detail" not in data:
        # Field errors: keep DRF's {field: [messages]} and add a one-line summary.
        response.data = {"detail": "Invalid request.", "errors": data}
    return response
