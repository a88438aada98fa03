"""Idempotent sends: the `Idempotency-Key` header of POST /api/v1/notifications/ and /campaigns/.

A backend that retries a send after a timeout must not send twice. With the header, the first
request claims (app, key) by inserting its row (campaigns.models.IdempotencyKey, unique on app and
key) in a transaction of its own, before it does anything; then it runs, and records its answer
on the row. Another request with that key, within IDEMPOTENCY_TTL_S:

- same body, answered: gets the first answer again (status code and body, campaign id included;
  header `Idempotent-Replayed: true`) and sends nothing;
- same body, still running: 409 with Retry-After (the IETF idempotency-key draft's answer);
- another body (or the other endpoint): 422, nothing sent.

Concurrent duplicates: the unique index serialises the two INSERTs (`ON CONFLICT`), so exactly
one request claims the key and only it runs. The claim is committed before the request runs
because the request publishes Celery tasks, which must see committed rows: holding the claim in
one transaction with the send would publish before commit.

A request that fails before it created its campaign (a 400, a crash) gives the key back, so the
corrected retry can use it. A request that dies holding its claim is not stuck for 24 h: past
IDEMPOTENCY_LOCK_S a retry takes over a claim that created nothing, and answers a claim that did
create its campaign from that campaign (its campaign is tied to the key in the transaction that
creates it, so there is no window in which a campaign exists that a retry cannot find).
"""

from __future__ import annotations

import hashlib
import logging
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import orjson
from django.conf import settings
from django.db import connection
from django.utils import timezone
from rest_framework import status
from rest_framework.exceptions import APIException, ValidationError
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response

from campaigns.models import Campaign, IdempotencyKey
from tokens import hygiene

logger = logging.getLogger(__name__)

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
KEY_MAX = 255
# Printable ASCII: the key is echoed in messages and logs, and clients send UUIDs or similar.
KEY_PATTERN = r"[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?"
_KEY_RE = re.compile(KEY_PATTERN)
EXPIRE_BATCH = 5000
EXPIRE_LOCK = "idempotency-expire"


class KeyInProgress(APIException):
    status_code = status.HTTP_409_CONFLICT
    default_code = "idempotency_key_in_progress"
    wait = 1  # DRF's exception handler turns this into Retry-After: 1


class KeyReused(APIException):
    status_code = status.HTTP_422_UNPROCESSABLE_ENTITY
    default_code = "idempotency_key_reused"


@dataclass(slots=True)
class Claim:
    """This request's hold on its key; the view ties its campaign to it (`attach`)."""

    row_id: int
    owner: uuid.UUID

    def attach(self, campaign: Campaign) -> None:
        """Tie the campaign to the key. Call it in the transaction that creates the campaign, so a
        retry after a crash finds the campaign instead of creating a second one."""
        if not IdempotencyKey.objects.filter(pk=self.row_id, owner=self.owner).update(campaign=campaign):
            # This request ran past IDEMPOTENCY_LOCK_S and a retry took the key over: that retry
            # sends; raising here rolls this request's campaign back.
            raise KeyInProgress(f"A retry with this {HEADER} took over this request; it sends instead.")


class NoClaim:
    """No header: the request runs as before."""

    def attach(self, campaign: Campaign) -> None:
        return None


Handler = Callable[[Claim | NoClaim], Response]


def fingerprint(endpoint: str, body: Any) -> str:
    """The request's identity: its endpoint and its body as canonical JSON (keys sorted), so a
    client re-serialising the same object in another key order is still the same request."""
    try:
        canonical = orjson.dumps(body, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
    except TypeError:
        # Not a JSON document (an empty body reaches the view as an empty QueryDict).
        canonical = orjson.dumps(sorted(dict(body.lists()).items()) if hasattr(body, "lists") else repr(body))
    return hashlib.sha256(endpoint.encode() + b"\n" + canonical).hexdigest()


def read_key(request: Request) -> str | None:
    raw = request.headers.get(HEADER)
    if raw is None:
        return None
    if len(raw) > KEY_MAX or not _KEY_RE.fullmatch(raw):
        raise ValidationError(
            {HEADER: [f"must be 1 to {KEY_MAX} printable ASCII characters (a UUID is a good key)"]}
        )
    return raw


def respond(request: Request, endpoint: str, handler: Handler) -> Response:
    """Run `handler` once per (app, Idempotency-Key); answer duplicates with the first answer."""
    key = read_key(request)
    if key is None:
        return handler(NoClaim())
    app_id = request.auth.app_id
    digest = fingerprint(endpoint, request.data)
    claim = _claim(app_id, key, digest)
    if claim is None:
        return _duplicate(app_id, key, digest)
    try:
        response = handler(claim)
    except BaseException:
        _give_back(claim)
        raise
    _record(claim, response)
    return response


def _claim(app_id: int, key: str, digest: str) -> Claim | None:
    """Insert the key's row, or take over an expired one or a stale claim of this same request that
    created nothing; None when another request holds the key. One statement: the unique index
    makes a concurrent duplicate wait for this INSERT and then see its row."""
    now = timezone.now()
    owner = uuid.uuid4()
    table = IdempotencyKey._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            INSERT INTO {table} AS k
                (app_id, key, fingerprint, owner, created_at, expires_at, locked_until,
                 campaign_id, status_code, response)
            VALUES (%(app)s, %(key)s, %(digest)s, %(owner)s, %(now)s, %(expires)s, %(locked)s,
                    NULL, NULL, NULL)
            ON CONFLICT (app_id, key) DO UPDATE SET
                fingerprint = EXCLUDED.fingerprint, owner = EXCLUDED.owner,
                created_at = EXCLUDED.created_at, expires_at = EXCLUDED.expires_at,
                locked_until = EXCLUDED.locked_until, campaign_id = NULL, status_code = NULL,
                response = NULL
            WHERE k.expires_at <= %(now)s
               OR (k.status_code IS NULL AND k.campaign_id IS NULL AND k.locked_until <= %(now)s
                   AND k.fingerprint = EXCLUDED.fingerprint)
            RETURNING id
            """,
            {
                "app": app_id,
                "key": key,
                "digest": digest,
                "owner": owner,
                "now": now,
                "expires": now + timedelta(seconds=settings.IDEMPOTENCY_TTL_S),
                "locked": now + timedelta(seconds=settings.IDEMPOTENCY_LOCK_S),
            },
        )
        row = cursor.fetchone()
    return Claim(row[0], owner) if row else None


def _duplicate(app_id: int, key: str, digest: str) -> Response:
    row = IdempotencyKey.objects.filter(app_id=app_id, key=key).first()
    if row is None:
        # Given back (the first request failed validation) between our INSERT and this read.
        raise KeyInProgress(f"A request with this {HEADER} was just being processed; retry it.")
    if row.fingerprint != digest:
        raise KeyReused(
            f"This {HEADER} was used within the last {settings.IDEMPOTENCY_TTL_S // 3600} h for a "
            "request with another body or endpoint; nothing was sent. Use a new key for a new request."
        )
    if row.status_code is None and row.campaign_id is not None and row.locked_until <= timezone.now():
        row = _answer_from_campaign(row)
    if row.status_code is None:
        raise KeyInProgress(
            f"A request with this {HEADER} is still being processed; retry after it has answered."
        )
    response = Response(row.response, status=row.status_code)
    response[REPLAYED_HEADER] = "true"
    return response


def _answer_from_campaign(row: IdempotencyKey) -> IdempotencyKey:
    """The request that claimed the key created its campaign and died before answering: its
    answer is that campaign (201 for a campaign, 202 for a direct send)."""
    from campaigns.serializers import represent

    campaign = Campaign.objects.filter(pk=row.campaign_id).first()
    if campaign is None:
        return row
    code = status.HTTP_202_ACCEPTED if campaign.kind == Campaign.Kind.DIRECT else status.HTTP_201_CREATED
    body = _json_ready(represent(campaign))
    IdempotencyKey.objects.filter(pk=row.pk, owner=row.owner, status_code__isnull=True).update(
        status_code=code, response=body, locked_until=None
    )
    row.refresh_from_db()
    return row


def _json_ready(data: Any) -> Any:
    """What the client received: DRF's rendering (datetimes as ISO strings), as JSON values."""
    return orjson.loads(JSONRenderer().render(data))


def _record(claim: Claim, response: Response) -> None:
    if response.status_code >= 400:
        _give_back(claim)
        return
    IdempotencyKey.objects.filter(pk=claim.row_id, owner=claim.owner).update(
        status_code=response.status_code, response=_json_ready(response.data), locked_until=None
    )


def _give_back(claim: Claim) -> None:
    """The request did not get as far as its campaign (refused, or it raised): free the key for
    the corrected retry. A claim with a campaign is kept, open to a retry at once, which answers
    from the campaign rather than creating another."""
    mine = IdempotencyKey.objects.filter(pk=claim.row_id, owner=claim.owner)
    if not mine.filter(campaign__isnull=True).delete()[0]:
        mine.update(locked_until=timezone.now())


def expire_keys(*, now: Any = None) -> int:
    """Delete keys past their TTL, in batches (run by beat: campaigns.expire_idempotency_keys).
    A key past its TTL is free already (`_claim` takes it over); this only reclaims the rows."""
    now = now or timezone.now()
    deleted = 0
    with hygiene.job_lock(EXPIRE_LOCK) as lock:
        if lock is None:
            return 0
        table = IdempotencyKey._meta.db_table
        while True:
            with connection.cursor() as cursor:
                cursor.execute(
                    f"DELETE FROM {table} WHERE id IN "
                    f"(SELECT id FROM {table} WHERE expires_at <= %s ORDER BY id LIMIT %s)",
                    [now, EXPIRE_BATCH],
                )
                batch = cursor.rowcount
            deleted += batch
            if batch < EXPIRE_BATCH:
                break
            lock.reacquire()
    if deleted:
        logger.info("deleted %d expired idempotency keys", deleted)
    return deleted
