"""The device upsert: the one write path for registrations (API and single-row callers).

One transaction of two raw statements, portable between PostgreSQL and SQLite:

1. the same (app, platform, token) on another device_id is deleted: the token moved to a new
   device (reinstall, restore, a shared web browser profile) and must never be pushed twice (on
   PostgreSQL's partitioned table the token's claim names that device: tokens 0007);
2. `INSERT ... ON CONFLICT (app_id, device_id) DO UPDATE ... RETURNING`: a new device is
   created; a known one takes the new token (rotation), is re-activated if hygiene or an
   unregister had deactivated it, moves to the new user and gets last_seen and updated_at set to
   this registration's time (the APNs 410 rule compares updated_at with Apple's timestamp).

Concurrency: two upserts of one device are serialized by the (app, device_id) arbiter of
ON CONFLICT and never make two rows. Two devices racing for one token could both pass step 1
before either commits, and the loser's insert would violate (app, platform, token_hash) (the
claim's primary key on the partitioned table): on
PostgreSQL a transaction-scoped advisory lock on the token makes them take turns, so the second
one's step 1 sees and removes the first one's row. What still loses a race (a deadlock when two
devices swap tokens, a unique violation on SQLite or with another writer) is retried whole.

Nothing may reference DeviceToken rows through a database foreign key without ON DELETE: a moved
token's row is deleted here with plain SQL.
"""

from __future__ import annotations

import functools
import logging
import weakref
from dataclasses import dataclass
from datetime import UTC, datetime

from django.conf import settings
from django.db import DatabaseError, IntegrityError, connection, transaction
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from .models import App, DeviceToken
from .validation import Registration

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 5
# PostgreSQL SQLSTATEs that mean "someone else won, run it again".
_RETRYABLE_PG = {"23505", "40001", "40P01"}

_TABLE = DeviceToken._meta.db_table
_DELETE_MOVED = (
    f"DELETE FROM {_TABLE} WHERE app_id = %s AND platform = %s AND token_hash = %s AND device_id <> %s"
)
# The partitioned table (PostgreSQL, tokens 0007) has no index on the token: its claim names the
# device, in the one partition of each table that holds it.
_DELETE_MOVED_CLAIMED = (
    f"DELETE FROM {_TABLE} d USING {DeviceToken.CLAIMS_TABLE} c WHERE c.app_id = %s AND c.platform = %s "
    "AND c.token_hash = %s AND c.device_id <> %s AND d.app_id = c.app_id AND d.device_id = c.device_id"
)
# The update half of every upsert (API and import_tokens): the same registration semantics.
UPSERT_CONFLICT_CLAUSE = f"""ON CONFLICT (app_id, device_id) DO UPDATE SET
    platform = EXCLUDED.platform,
    token = EXCLUDED.token,
    token_hash = EXCLUDED.token_hash,
    web_p256dh = EXCLUDED.web_p256dh,
    web_auth = EXCLUDED.web_auth,
    user_id = EXCLUDED.user_id,
    app_version = EXCLUDED.app_version,
    locale = EXCLUDED.locale,
    last_seen = EXCLUDED.last_seen,
    -- a delivery success belongs to a token, not to the device: a rotated token has none yet
    last_success_at = CASE WHEN {_TABLE}.token_hash = EXCLUDED.token_hash
                           THEN {_TABLE}.last_success_at END,
    is_active = TRUE,
    deactivated_at = NULL,
    deactivation_reason = '',
    updated_at = EXCLUDED.updated_at"""
_INSERT = f"""
INSERT INTO {_TABLE} (
    app_id, device_id, platform, token, token_hash, web_p256dh, web_auth, user_id, app_version,
    locale, last_seen, last_success_at, is_active, deactivated_at, deactivation_reason,
    created_at, updated_at
) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, NULL, TRUE, NULL, '', %s, %s)
{UPSERT_CONFLICT_CLAUSE}"""
_UPSERT = _INSERT + "\nRETURNING id, created_at, last_success_at"
# PostgreSQL: registrations of one token queue behind each other on a transaction-scoped
# advisory lock, so racing devices take turns instead of failing and retrying (with eight racers
# for one token the unlucky one could otherwise lose round after round).
_PG_LOCK_TOKEN = "SELECT pg_advisory_xact_lock(%s, %s)"
_LOCK_NAMESPACE = 0x70757368  # "push": keeps these locks apart from other advisory-lock users


@functools.cache
def claims_in_use() -> bool:
    """Whether the token claims exist (the partitioned table, tokens 0007), looked up once per
    process: code started before its migration ran keeps the plain table's statements."""
    if connection.vendor != "postgresql":
        return False
    with connection.cursor() as cursor:
        cursor.execute("SELECT to_regclass(%s) IS NOT NULL", [DeviceToken.CLAIMS_TABLE])
        return cursor.fetchone()[0]


def _delete_moved() -> str:
    return _DELETE_MOVED_CLAIMED if claims_in_use() else _DELETE_MOVED


# A multi-statement simple query runs as one implicit transaction: one round trip instead of
# five (BEGIN, lock, DELETE, INSERT, COMMIT) on the hottest path of the API.
# Its commit does not wait for the WAL flush (synchronous_commit off, for this transaction only):
# a crash of PostgreSQL can lose the last fraction of a second of registrations, never corrupt
# anything, and every app registers again on its next launch. Waiting for the flush costs more
# than the whole rest of the request on a busy disk.
def _one_trip(delete: str) -> str:
    return ";\n".join((_PG_LOCK_TOKEN + ", set_config('synchronous_commit', %s, true)", delete, _UPSERT))


def _numbered(sql: str) -> str:
    """%s placeholders -> $1, $2, ... (PREPARE syntax)."""
    head, *rest = sql.split("%s")
    return head + "".join(f"${n}{part}" for n, part in enumerate(rest, 1))


# Planning the two statements costs PostgreSQL more than running them (five indexes and a
# unique arbiter to consider): each web connection prepares them once and then only EXECUTEs.
# Measured on this project's 2-core box: backend CPU per upsert 370 -> 110 us.
# On the partitioned table PostgreSQL's default would plan them again on every EXECUTE (a generic
# plan covering every partition looks dearer than a custom one pruned to one), 2-3x the generic
# plan's cost, which prunes at run time. Only these statements are prepared on the server
# (psycopg2 sends everything else as text), so the session-wide setting touches nothing else.
def _prepare(delete: str) -> str:
    return (
        "SET plan_cache_mode = force_generic_plan;\n"
        f"PREPARE pushsvc_device_delete AS {_numbered(delete)};\n"
        f"PREPARE pushsvc_device_upsert AS {_numbered(_UPSERT)}"
    )


_PG_ONE_TRIP_PREPARED = ";\n".join(
    (
        _PG_LOCK_TOKEN + ", set_config('synchronous_commit', %s, true)",
        "EXECUTE pushsvc_device_delete (%s, %s, %s, %s)",
        "EXECUTE pushsvc_device_upsert (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
    )
)
# psycopg2 connections that hold the prepared statements (a reconnect starts a new session).
_prepared_on: weakref.WeakSet = weakref.WeakSet()
_NO_PREPARED_STATEMENT = "26000"

_device_field = DeviceToken._meta.get_field("device_id")
_datetime_field = DeviceToken._meta.get_field("updated_at")


@dataclass(slots=True, frozen=True)
class UpsertResult:
    id: int
    created: bool
    created_at: datetime
    registered_at: datetime
    last_success_at: datetime | None


def upsert_device(app: App | int, reg: Registration, *, now: datetime | None = None) -> UpsertResult:
    """Create or update the device `reg.device_id` of `app`; see the module docstring."""
    app_id = app if isinstance(app, int) else app.pk
    now = now or timezone.now()
    device_db = _device_field.get_db_prep_value(reg.device_id, connection)
    now_db = _datetime_field.get_db_prep_value(now, connection)
    token_hash = reg.token_hash
    delete_params, upsert_params = _statement_params(app_id, reg, device_db, now_db)
    postgres = connection.vendor == "postgresql"
    lock_params = (_LOCK_NAMESPACE, int(token_hash[:8], 16) - 2**31)
    one_trip = postgres and not connection.in_atomic_block
    sync_commit = "on" if settings.REGISTRY_SYNCHRONOUS_COMMIT else "off"
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            if one_trip:
                params = (*lock_params, sync_commit, *delete_params, *upsert_params)
                with connection.cursor() as cursor:
                    cursor.execute(_one_trip_sql(cursor), params)
                    row = cursor.fetchone()
            else:
                # SQLite: IMMEDIATE transactions (settings) already serialize writers.
                with transaction.atomic(), connection.cursor() as cursor:
                    if postgres:
                        cursor.execute(_PG_LOCK_TOKEN, lock_params)
                    cursor.execute(_delete_moved(), delete_params)
                    cursor.execute(_UPSERT, upsert_params)
                    row = cursor.fetchone()
        except DatabaseError as exc:
            if attempt == MAX_ATTEMPTS or not _retryable(exc):
                raise
            logger.debug("upsert of device %s lost a race (attempt %d), retrying", reg.device_id, attempt)
            continue
        device_pk, created_at, last_success_at = row
        # created_at is only ever written by the INSERT branch, with this call's `now`.
        created_at = _as_datetime(created_at)
        return UpsertResult(
            id=device_pk,
            created=created_at == now,
            created_at=created_at,
            registered_at=now,
            last_success_at=None if last_success_at is None else _as_datetime(last_success_at),
        )
    raise AssertionError("unreachable")


def _statement_params(
    app_id: int,
    reg: Registration,
    device_db: object,
    now_db: object,
    seen_db: object = None,
    updated_db: object = None,
) -> tuple[tuple[object, ...], tuple[object, ...]]:
    """Parameters of _DELETE_MOVED and _UPSERT for one registration (now = created, seen, updated;
    an import may carry the device's own last-seen and registration times instead)."""
    token_hash = reg.token_hash  # a property that hashes: once
    delete_params = (app_id, reg.platform, token_hash, device_db)
    upsert_params = (
        app_id,
        device_db,
        reg.platform,
        reg.token,
        token_hash,
        reg.web_p256dh,
        reg.web_auth,
        reg.user_id,
        reg.app_version,
        reg.locale,
        now_db if seen_db is None else seen_db,
        now_db,
        now_db if updated_db is None else updated_db,
    )
    return delete_params, upsert_params


def _as_datetime(value: datetime | str) -> datetime:
    # PostgreSQL returns aware datetimes; SQLite naive UTC ones or, without converters, text.
    parsed = value if isinstance(value, datetime) else parse_datetime(value)
    return parsed if timezone.is_aware(parsed) else parsed.replace(tzinfo=UTC)


def _one_trip_sql(cursor: object) -> str:
    """The prepared form when this session can hold prepared statements (prepared on first use)."""
    if not settings.REGISTRY_PREPARED_STATEMENTS:
        return _one_trip(_delete_moved())
    raw = connection.connection
    if raw not in _prepared_on:
        cursor.execute(_prepare(_delete_moved()))
        _prepared_on.add(raw)
    return _PG_ONE_TRIP_PREPARED


def _retryable(exc: DatabaseError) -> bool:
    if isinstance(exc, IntegrityError) and connection.vendor != "postgresql":
        return True
    pgcode = getattr(exc.__cause__, "pgcode", None)
    if pgcode == _NO_PREPARED_STATEMENT:
        # The session lost its prepared statements (DISCARD ALL by a pooler, for instance):
        # prepare again on the next attempt.
        _prepared_on.discard(connection.connection)
        return True
    return pgcode in _RETRYABLE_PG


def upsert_many(
    app_id: int,
    regs: list[Registration],
    *,
    now: datetime,
    dates: list[tuple[datetime | None, datetime | None]] | None = None,
) -> int:
    """Apply a batch of registrations in one transaction (import_tokens on SQLite); return the
    number applied. The batch must hold each device and each (platform, token) at most once.
    `dates`, per registration: (last_seen, registered_at) from the imported file, None = now."""
    now_db = _datetime_field.get_db_prep_value(now, connection)
    deletes = []
    upserts = []
    for index, reg in enumerate(regs):
        device_db = _device_field.get_db_prep_value(reg.device_id, connection)
        seen, registered = dates[index] if dates is not None else (None, None)
        delete_params, upsert_params = _statement_params(
            app_id,
            reg,
            device_db,
            now_db,
            None if seen is None else _datetime_field.get_db_prep_value(seen, connection),
            None if registered is None else _datetime_field.get_db_prep_value(registered, connection),
        )
        deletes.append(delete_params)
        upserts.append(upsert_params)
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.executemany(_delete_moved(), deletes)
        cursor.executemany(_INSERT, upserts)
    return len(upserts)
