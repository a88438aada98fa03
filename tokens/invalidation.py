"""Provider answers that a token is dead, applied to the registry in bulk, with an audit row each.

campaigns/sending/ledger.py calls `apply_invalidations` inside the shard's own transaction, so the
deactivations commit together with the shard's counters and follow-up shards. A token is
deactivated only if both hold:
- the row still has the token that was sent: matched on id AND token_hash, so an answer about a
  token the device has since rotated away from (FCM) or that moved to another device never
  touches the new token;
- nothing registered it again after the evidence: `updated_at <= invalid_since` (the APNs 410
  timestamp) or, without one, `<= observed_at` (when the worker saw the answer).
Every invalidation writes one row to AUDIT_TABLE (provider, campaign, reason, whether it took
effect), which tokens/hygiene.py reads for churn and invalid rates. PostgreSQL runs it all as
one statement; SQLite (the demo's default database) gets the same rules in a few statements.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime

import orjson
from django.db import connection, transaction
from django.utils import timezone

from . import webhooks
from .models import App, DeviceToken

AUDIT_TABLE = "tokens_deactivation_audit"
_TOKENS = DeviceToken._meta.db_table

_REASON_MAX = 64  # DeviceToken.deactivation_reason


@dataclass(slots=True, frozen=True)
class Invalidation:
    """One provider answer saying a token is dead."""

    device_id: int  # DeviceToken primary key
    token_hash: str  # sha256 hex of the token that was sent to (DeviceToken.token_hash)
    app_id: int
    provider: str  # apns | fcm | hms | webpush
    reason: str  # the provider's reason, e.g. Unregistered, BadDeviceToken, UNREGISTERED
    provider_ts: datetime | None = None  # APNs 410 timestamp
    campaign_id: int | None = None
    observed_at: datetime | None = None  # when the answer arrived; apply_invalidations fills in now
    # The device's device_id: with it PostgreSQL finds the row in its one partition of the device
    # table (tokens 0007) instead of probing every partition's id index (docs/scaling.md). A UUID
    # or its text (a shard's devices are loaded with it as text: campaigns/sending/run.py _load).
    device_key: uuid.UUID | str | None = None


@dataclass(slots=True)
class _Row:
    audit_id: str  # the audit table's unique `stream_id` column: a generated id per row
    item: Invalidation
    keep: bool = True  # the one invalidation per token that drives the UPDATE


def _cutoff(item: Invalidation) -> datetime:
    # observed_at is filled in by apply_invalidations; `now` only keeps the type honest.
    return item.provider_ts or item.observed_at or timezone.now()


def _mark_kept(rows: list[_Row]) -> None:
    """One invalidation per (device, token) drives the UPDATE: the latest evidence (largest cutoff)."""
    best: dict[tuple[int, str], _Row] = {}
    for row in rows:
        key = (row.item.device_id, row.item.token_hash)
        current = best.get(key)
        if current is None or _cutoff(row.item) > _cutoff(current.item):
            best[key] = row
    kept = {id(row) for row in best.values()}
    for row in rows:
        row.keep = id(row) in kept


# The batch travels as ONE json parameter: psycopg2 would render ten 2,500-element arrays as a
# 400 KB statement of per-element casts (~50 ms to build, more to parse); orjson builds the
# document in about a millisecond and json_to_recordset reads it back as typed columns.
_PG_APPLY = f"""
WITH v AS (
    SELECT * FROM json_to_recordset(%s::json) AS v(
        audit_id text, device_id bigint, token_hash text, app_id bigint, provider text,
        reason text, provider_ts timestamptz, observed_at timestamptz, campaign_id bigint,
        keep boolean, device_key uuid)
),
upd AS (
    UPDATE {_TOKENS} AS d
       SET is_active = FALSE, deactivated_at = %s, deactivation_reason = v.reason
      FROM v
     WHERE v.keep
       AND {{match}}
       AND d.token_hash = v.token_hash
       AND d.is_active
       AND d.updated_at <= COALESCE(v.provider_ts, v.observed_at)
 RETURNING d.id, d.app_id, d.device_id, d.user_id, d.platform, v.reason
),
ins AS (
    INSERT INTO {AUDIT_TABLE} (stream_id, device_id, token_hash, app_id, provider, reason,
                               provider_ts, observed_at, campaign_id, applied, recorded_at)
    SELECT v.audit_id, v.device_id, v.token_hash, v.app_id, v.provider, v.reason,
           v.provider_ts, v.observed_at, v.campaign_id, v.keep AND upd.id IS NOT NULL, %s
      FROM v LEFT JOIN upd ON upd.id = v.device_id
 RETURNING 1
)
SELECT (SELECT count(*) FROM upd), (SELECT count(*) FROM ins),
       {{devices}}
"""
# What the token.invalidated webhook reports of each deactivated device of an app with a webhook
# (tokens/webhooks.py apps_with_webhooks' rule, in the statement: asking first was an ORM query per
# batch, as much CPU as the rest of a shard's invalidations).
_PG_DEVICES = f"""(
    SELECT json_agg(json_build_array(upd.app_id, upd.device_id, upd.user_id, upd.platform, upd.reason))
      FROM upd JOIN {App._meta.db_table} AS a ON a.id = upd.app_id
     WHERE a.webhook_url <> ''
)"""
_PG_MATCH_BY_KEY = "d.app_id = v.app_id AND d.device_id = v.device_key AND d.id = v.device_id"
_PG_MATCH_BY_ID = "d.id = v.device_id"


Deactivated = list[tuple[int, str, str, str, str]]  # (app_id, device_id, user_id, platform, reason)


def _apply_postgresql(rows: list[_Row], now: datetime) -> tuple[int, int, Deactivated]:
    """One statement; reports the deactivations of the apps with a webhook only."""
    # Id order: the nested loop then walks the table and its indexes in order (far fewer page
    # reads on a big table), and concurrent shards lock rows in the same order (no deadlocks).
    document = [
        {
            "audit_id": row.audit_id,
            "device_id": row.item.device_id,
            "token_hash": row.item.token_hash,
            "app_id": row.item.app_id,
            "provider": row.item.provider,
            "reason": row.item.reason,
            "provider_ts": row.item.provider_ts,
            "observed_at": row.item.observed_at,
            "campaign_id": row.item.campaign_id,
            "keep": row.keep,
            "device_key": row.item.device_key and str(row.item.device_key),
        }
        for row in sorted(rows, key=lambda r: r.item.device_id)
    ]
    keyed = all(row.item.device_key is not None for row in rows)
    sql = _PG_APPLY.replace("{devices}", _PG_DEVICES).replace(
        "{match}", _PG_MATCH_BY_KEY if keyed else _PG_MATCH_BY_ID
    )
    with connection.cursor() as cursor:  # one statement: apply_invalidations' savepoint is enough
        cursor.execute(sql, [orjson.dumps(document).decode(), now, now])
        deactivated, audited, devices = cursor.fetchone()
    if isinstance(devices, str):  # psycopg2 decodes json; a driver that does not gives text
        devices = orjson.loads(devices)
    return int(deactivated), int(audited), [tuple(d) for d in devices or ()]


def _apply_portable(rows: list[_Row], now: datetime, report: bool) -> tuple[int, int, Deactivated]:
    """SQLite (the demo): same rules, a few statements; IMMEDIATE transactions serialize writers."""
    with transaction.atomic():
        found_rows = DeviceToken.objects.filter(id__in={r.item.device_id for r in rows}).values_list(
            "id", "token_hash", "is_active", "updated_at", "device_id", "user_id", "platform"
        )
        current = {
            pk: (token_hash, is_active, updated_at)
            for pk, token_hash, is_active, updated_at, *_ in found_rows
        }
        described = {
            pk: (str(device_id), user_id, platform) for pk, *_, device_id, user_id, platform in found_rows
        }
        devices: Deactivated = []
        applied: set[str] = set()
        by_reason: dict[str, list[int]] = {}
        for row in rows:
            item = row.item
            found = current.get(item.device_id)
            if (
                row.keep
                and found is not None
                and found[0] == item.token_hash
                and found[1]
                and found[2] <= _cutoff(item)
            ):
                applied.add(row.audit_id)
                by_reason.setdefault(item.reason, []).append(item.device_id)
                if report:
                    devices.append((item.app_id, *described[item.device_id], item.reason))
        deactivated = 0
        for reason, ids in by_reason.items():
            deactivated += DeviceToken.objects.filter(id__in=ids, is_active=True).update(
                is_active=False, deactivated_at=now, deactivation_reason=reason
            )
        audited = 0
        with connection.cursor() as cursor:
            for row in rows:
                item = row.item
                cursor.execute(
                    f"INSERT INTO {AUDIT_TABLE} (stream_id, device_id, token_hash, app_id, provider, reason,"
                    " provider_ts, observed_at, campaign_id, applied, recorded_at)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    [
                        row.audit_id,
                        item.device_id,
                        item.token_hash,
                        item.app_id,
                        item.provider,
                        item.reason,
                        item.provider_ts,
                        item.observed_at,
                        item.campaign_id,
                        row.audit_id in applied,
                        now,
                    ],
                )
                audited += cursor.rowcount
    return deactivated, audited, devices


def apply_invalidations(items: Sequence[Invalidation], *, now: datetime | None = None) -> tuple[int, int]:
    """Deactivate the tokens the rules allow and audit every invalidation, in the caller's
    transaction (a savepoint of it); returns (tokens deactivated, audit rows written).

    Applying the same invalidations twice deactivates nothing more but audits them again, so a
    caller that may run twice must make the second run a no-op itself (a shard does: a recorded
    shard records nothing).
    """
    if not items:
        return 0, 0
    now = now or timezone.now()
    rows = [
        _Row(
            uuid.uuid4().hex,  # 32 characters: the width of the audit's unique id column
            replace(
                item,
                reason=item.reason.replace("\x00", "")[:_REASON_MAX],  # PostgreSQL text takes no NUL
                observed_at=item.observed_at or now,
            ),
        )
        for item in items
    ]
    _mark_kept(rows)
    # Apps with a webhook hear of their deactivated devices, in this same transaction (the outbox).
    with transaction.atomic():
        if connection.vendor == "postgresql":
            deactivated, audited, devices = _apply_postgresql(rows, now)
            hooked = {app_id for app_id, *_ in devices}
        else:
            hooked = webhooks.apps_with_webhooks(item.app_id for item in items)
            deactivated, audited, devices = _apply_portable(rows, now, bool(hooked))
        if hooked and devices:
            _emit(hooked, devices, now)
    return deactivated, audited


def _emit(hooked: set[int], devices: Deactivated, now: datetime) -> None:
    if devices:
        by_app: dict[int, list[dict[str, str]]] = {}
        for app_id, device_id, user_id, platform, reason in devices:
            if app_id in hooked:
                by_app.setdefault(app_id, []).append(
                    {
                        "device_id": str(device_id),
                        "user_id": user_id,
                        "platform": platform,
                        "reason": reason,
                        "deactivated_at": now.isoformat(),
                    }
                )
        for app_id, described in by_app.items():
            webhooks.emit_token_invalidated(app_id, described)
