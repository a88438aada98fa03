"""Every retry decision of the send path in one place: the backoff of a retried device (with its
jitter, cap and Retry-After floor), the cut that keeps a retry before the message's deadline, the
TTL a chunk sends with, the spread of deferred shards, and which answers speak for provider-wide
throttling. Pure functions of their arguments and the settings, so they are tested directly.
"""

from __future__ import annotations

import dataclasses
import random
import time

from django.conf import settings

from delivery.payload import PushMessage
from delivery.providers.base import Outcome, Result
from delivery.ratelimit import Report

THROTTLE_REASONS = frozenset({"TooManyRequests", "QUOTA_EXCEEDED"})  # APNs, FCM (also on 429)
DEFER_SPREAD_MAX_S = 5.0  # deferred shards wake spread over at most this many seconds


def retry_delay(attempt: int, retry_after: float, *, jitter: bool = True) -> float:
    """Exponential backoff with full jitter on the upper half, capped, never below Retry-After.
    Without `jitter`: the shortest delay it can give."""
    base = settings.CAMPAIGN_RETRY_BASE_S * (2 ** max(attempt - 1, 0))
    capped = min(base, settings.CAMPAIGN_RETRY_MAX_S)
    jittered = capped / 2 + (random.uniform(0, capped / 2) if jitter else 0.0)
    return min(max(jittered, retry_after), max(settings.CAMPAIGN_RETRY_MAX_S, retry_after))


def min_retry_delay(attempt: int, retry_after: float) -> float:
    """The shortest delay `retry_delay` can give: a device whose retry cannot go before the
    deadline even then is expired instead of retried."""
    return retry_delay(attempt, retry_after, jitter=False)


def before_deadline(delay: float, floor: float, deadline: int | None, now: float | None = None) -> float:
    """The jittered delay, cut to leave the retry a second before the deadline when that still
    honours the device's floor (ShardResults.add expired the devices whose floor did not fit)."""
    if deadline is None:
        return delay
    return max(min(delay, deadline - (time.time() if now is None else now) - 1.0), floor)


def remaining(message: PushMessage, deadline: int | None, now: float) -> PushMessage:
    """The message as a chunk sends it: with a TTL, the seconds left until the deadline fixed at
    the first send (and the deadline itself, which APNs takes as apns-expiration). TTL 0 stays 0."""
    if deadline is None or not message.ttl:
        return message
    return dataclasses.replace(message, ttl=max(deadline - int(now), 1), expires_at=deadline)


def defer_delay(wait_s: float) -> float:
    """Deferred shards must not all wake together: spread them over a few seconds."""
    return wait_s + random.uniform(0, min(wait_s / 2, DEFER_SPREAD_MAX_S))


def rate_report(answers: list[Result], sample: bool, epoch: str) -> Report:
    """The chunk's report for the provider's adaptive bucket: what it accepted, and, when the
    chunk can speak for the provider (`sample`: first sends of a broadcast), its 429s, with the
    bucket's `epoch` its reservation was told. The bucket decides from many chunks whether the
    provider throttles the app or a few devices were pushed too often (delivery/ratelimit.py)."""
    accepted = sum(1 for a in answers if a.outcome not in (Outcome.RETRY, Outcome.AUTH_FAILURE))
    if not sample:
        return Report(accepted=accepted)
    hits = [
        a
        for a in answers
        if a.outcome == Outcome.RETRY and (a.status == 429 or a.reason.split(":", 1)[0] in THROTTLE_REASONS)
    ]
    return Report(
        throttled=len(hits),
        answered=len(answers),
        retry_after=max((a.retry_after or 0.0 for a in hits), default=0.0),
        accepted=accepted,
        epoch=epoch,
    )
