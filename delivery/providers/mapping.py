"""Turning a provider's answer into a normalized `Result`: the shared part of every mapping table.

Each adapter declares its table as data, `{(http_status, reason): Row}`, where `reason` is the provider's
own error name (APNs `reason`, FCM error code, HMS result code). `lookup` falls back from the exact row
to a reason-only row (status `ANY`) and then to what the HTTP status alone means, so an undocumented
answer still lands on a safe outcome: never INVALID_TOKEN, which only documented signals may produce.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping
from dataclasses import dataclass

from delivery.engine.base import TransportError
from delivery.providers.base import Outcome, Result, Target

# Google's guidance for senders at scale (FCM), used for every provider: back off at least a minute
# after being throttled and ten seconds after a server error, unless the provider says otherwise.
RETRY_AFTER_THROTTLED = 60.0
RETRY_AFTER_SERVER_ERROR = 10.0
RETRY_AFTER_TRANSPORT = 10.0
ANY = 0  # status wildcard in a table key


@dataclass(frozen=True, slots=True)
class Row:
    outcome: Outcome
    retry_after: float | None = None  # default guidance when the provider sends no Retry-After
    refresh_credential: bool = False  # refresh the auth token and retry once; `outcome` if that fails


DELIVERED = Row(Outcome.DELIVERED)
INVALID_TOKEN = Row(Outcome.INVALID_TOKEN)
REJECTED = Row(Outcome.REJECTED)
AUTH_FAILURE = Row(Outcome.AUTH_FAILURE)
THROTTLED = Row(Outcome.RETRY, RETRY_AFTER_THROTTLED)
SERVER_ERROR = Row(Outcome.RETRY, RETRY_AFTER_SERVER_ERROR)
REFRESH_THEN_AUTH_FAILURE = Row(Outcome.AUTH_FAILURE, refresh_credential=True)

Table = Mapping[tuple[int, str], Row]


def by_status(status: int) -> Row:
    """What an HTTP status means when the table has no row for the answer."""
    if 200 <= status < 300:
        return DELIVERED
    if status == 429:
        return THROTTLED
    if status >= 500:
        return SERVER_ERROR
    if status in (401, 403):
        return AUTH_FAILURE
    # Other 4xx (and 3xx: redirects are never followed) mean our request is wrong for this target.
    if status >= 300:
        return REJECTED
    return SERVER_ERROR  # 1xx: not a final answer; treat like a broken exchange


def lookup(table: Table, status: int, reason: str) -> Row:
    row = table.get((status, reason))
    if row is None:
        row = table.get((ANY, reason))
    if row is None:
        row = by_status(status)
    return row


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def make_result(
    target: Target,
    row: Row,
    status: int,
    reason: str,
    headers: Mapping[str, str],
    provider_message_id: str = "",
    maybe_duplicate: bool = False,
) -> Result:
    retry_after = None
    if row.outcome is Outcome.RETRY:
        retry_after = parse_retry_after(headers.get("retry-after"))
        if retry_after is None:
            retry_after = row.retry_after
    return Result(
        target=target,
        outcome=row.outcome,
        status=status,
        reason=reason,
        provider_message_id=provider_message_id,
        retry_after=retry_after,
        maybe_duplicate=maybe_duplicate,
    )


def transport_result(target: Target, exc: TransportError) -> Result:
    return Result(
        target=target,
        outcome=Outcome.RETRY,
        reason=f"transport: {exc}",
        retry_after=RETRY_AFTER_TRANSPORT,
        maybe_duplicate=exc.may_have_reached,
    )


def credential_result(target: Target, message: str, *, transient: bool) -> Result:
    """No usable auth token: the token endpoint is down (retry) or refused our credentials (pause)."""
    if transient:
        return Result(
            target, Outcome.RETRY, reason=f"credentials: {message}", retry_after=RETRY_AFTER_SERVER_ERROR
        )
    return Result(target, Outcome.AUTH_FAILURE, reason=f"credentials: {message}")
