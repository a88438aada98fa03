"""API-wide error shape: every 4xx is `{"detail": "<what is wrong>"}`, plus `"errors":
{field: [messages]}` when individual fields are wrong."""

from __future__ import annotations

from typing import IO, Any

import orjson
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse
from django.views.defaults import page_not_found
from rest_framework import parsers
from rest_framework.exceptions import ParseError
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler


class JSONParser(parsers.JSONParser):
    """JSON bodies through orjson, which refuses lone surrogates, NaN and nesting deeper than 1,024
    with an error message (the stdlib parser gives a RecursionError, a 500). NUL is refused too:
    PostgreSQL text and jsonb cannot store it, so it would fail later as a database error."""

    def parse(
        self, stream: IO[bytes] | None, media_type: str | None = None, parser_context: Any = None
    ) -> Any:
        try:
            data = orjson.loads(stream.read() if stream is not None else b"")
        except orjson.JSONDecodeError as exc:
            raise ParseError(f"The body is not valid JSON: {exc}") from None
        if _contains_nul(data):
            raise ParseError("Text must not contain the NUL character (\\u0000).")
        return data


def _contains_nul(data: Any) -> bool:
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, RequestDataTooBig):
        # Django's own answer is an HTML 400; say what is wrong in the API's shape instead.
        return Response({"detail": "The request body is too large."}, status=413)
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


def not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    """handler404: an API path the URL patterns do not match (e.g. a non-numeric campaign id)
    answers in the API's error shape instead of Django's HTML page."""
    if request.path.startswith("/api/"):
        body = orjson.dumps({"detail": f"No API resource at {request.path!r}."})
        return HttpResponse(body, status=404, content_type="application/json")
    return page_not_found(request, exception)
