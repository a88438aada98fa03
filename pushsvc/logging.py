"""Structured logs: the send path's context on every record, and JSON lines when LOG_JSON=true.

The send path binds `campaign`, `shard` and `provider` once per shard (`bind`, a contextvar: a
coroutine handed to the worker's send loop carries a copy of the caller's context, so adapter logs
are labelled too, and a task never sees the previous task's values because every task starts with
the context cleared); `ContextFilter` copies them onto every record logged meanwhile, whichever
module logs it. `JsonFormatter` writes one JSON object per line for log shippers.

Secrets: adapters never log credentials or tokens (tests assert it); as a second line of
defence the filter masks anything shaped like a PEM block, a bearer token, a Google access token
or a JWT in the final message, so a careless `logger.info("%s", headers)` cannot ship a key to
the log store. Long-lived connection tasks keep the context of the shard that created them.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

CONTEXT_FIELDS = ("campaign", "shard", "provider")
_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("pushsvc_log", default=None)

_SECRET_PATTERNS = (
    (re.compile(r"-----BEGIN [A-Z ]+-----.*?(?:-----END [A-Z ]+-----|$)", re.S), "[redacted key]"),
    (re.compile(r"(?i)\b(bearer|key=|secret=)\s*[A-Za-z0-9._~+/=-]{16,}"), r"\1 [redacted]"),
    (re.compile(r"\bya29\.[A-Za-z0-9._-]+"), "[redacted token]"),  # Google OAuth access tokens
    (re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]+"), "[redacted jwt]"),
    (re.compile(r'"private_key"\s*:\s*"[^"]*"'), '"private_key": "[redacted]"'),
)


def bind(**fields: Any) -> contextvars.Token:
    """Attach campaign/shard/provider to every record logged from this context on."""
    current = dict(_context.get() or {})
    current.update({k: v for k, v in fields.items() if v is not None})
    return _context.set(current)


def unbind(token: contextvars.Token | None = None) -> None:
    if token is not None:
        _context.reset(token)
    else:
        _context.set(None)


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    token = bind(**fields)
    try:
        yield
    finally:
        _context.reset(token)


def redact(text: str) -> str:
    """`text` with anything shaped like a key, a bearer/access token or a JWT masked."""
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class ContextFilter(logging.Filter):
    """Copies the bound context onto the record and masks secrets in its message, so every
    formatter (ours, Celery's) gets both."""

    def filter(self, record: logging.LogRecord) -> bool:
        bound = _context.get() or {}
        for name in CONTEXT_FIELDS:
            if not hasattr(record, name):
                setattr(record, name, bound.get(name))
        if not getattr(record, "_pushsvc_redacted", False):
            try:
                message = record.getMessage()
            except (TypeError, ValueError):
                return True  # a malformed call; logging reports it in the handler
            cleaned = redact(message)
            if cleaned != message:
                record.msg, record.args = cleaned, ()
            record._pushsvc_redacted = True
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, context fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, default=str, ensure_ascii=False)


class PlainFormatter(logging.Formatter):
    """The human format, with the context appended when there is one, and the same redaction."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extra = " ".join(
            f"{name}={getattr(record, name)}"
            for name in CONTEXT_FIELDS
            if getattr(record, name, None) is not None
        )
        return f"{text} [{extra}]" if extra else text


def logging_config(level: str, as_json: bool) -> dict[str, Any]:
    """The LOGGING dict for settings.py."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"context": {"()": "pushsvc.logging.ContextFilter"}},
        "formatters": {
            "plain": {
                "()": "pushsvc.logging.PlainFormatter",
                "format": "%(asctime)s %(levelname)s %(name)s %(message)s",
            },
            "json": {"()": "pushsvc.logging.JsonFormatter"},
        },
        "handlers": {
            "console": {
                "class": "logging.StreamHandler",
                "formatter": "json" if as_json else "plain",
                "filters": ["context"],
            }
        },
        "root": {"handlers": ["console"], "level": level},
        "loggers": {
            "django.db.backends": {"level": "INFO"},
            # httpx logs every request URL at INFO; Web Push endpoints are capability URLs.
            "httpx": {"level": "WARNING"},
            "httpcore": {"level": "WARNING"},
        },
    }


def use_in_celery(as_json: bool) -> None:
    """Celery replaces the root logger's handlers when a worker starts; put the context filter
    (and the JSON format) back on the handlers it installs."""
    from celery.signals import after_setup_logger, after_setup_task_logger

    def adopt(logger: logging.Logger | None = None, **_: Any) -> None:
        for handler in logger.handlers if logger else []:
            if not any(isinstance(f, ContextFilter) for f in handler.filters):
                handler.addFilter(ContextFilter())
            if as_json:
                handler.setFormatter(JsonFormatter())

    after_setup_logger.connect(adopt, weak=False)
    after_setup_task_logger.connect(adopt, weak=False)


def _forget_previous_task(**_: Any) -> None:
    # A prefork child runs task after task in one thread: one shard's context must not label the next.
    _context.set(None)


def _connect_task_reset() -> None:
    from celery.signals import task_prerun

    task_prerun.connect(_forget_previous_task, weak=False)


_connect_task_reset()
