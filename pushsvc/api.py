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
    PostgreSQL text and jsonb cannot store it, so it would fail later as a database error. So is
    nesting deeper than MAX_DEPTH: DRF's fields recurse over what they are given (CharField calls
    str() on it, JSONField json.dumps), and a list 990 deep in any field was a RecursionError."""

    def parse(
        self, stream: IO[bytes] | None, media_type: str | None = None, parser_context: Any = None
    ) -> Any:
        try:
            data = orjson.loads(stream.read() if stream is not None else b"")
        except orjson.JSONDecodeError as exc:
            raise ParseError(f"The body is not valid JSON: {exc}") from None
        problem = _refusal(data)
        if problem:
            raise ParseError(problem)
        return data


# The deepest valid body is 3 levels (campaign > message > data); Python's recursion limit is 1,000.
MAX_DEPTH = 32


def _refusal(data: Any) -> str | None:
    """Why a decoded body is refused (NUL in a string, nesting deeper than MAX_DEPTH), or None."""
    stack = [(data, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return "Text must not contain the NUL character (\\u0000)."
        elif isinstance(item, dict | list):
            if depth > MAX_DEPTH:
                return f"The body must not nest objects or arrays deeper than {MAX_DEPTH} levels."
            if isinstance(item, dict):
                stack.extend((key, depth) for key in item)
                stack.extend((value, depth + 1) for value in item.values())
            else:
                stack.extend((value, depth + 1) for value in item)
    return None


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
