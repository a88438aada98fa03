"""Reading django-push-notifications' device tables for `import_tokens --from-django-push-notifications`.

django-push-notifications (DPN) keeps one table per platform; pushsvc imports two of them:
- `push_notifications_apnsdevice`: registration_id (APNs hex token), device_id (UUID, optional),
  user_id, active, date_created;
- `push_notifications_gcmdevice`: the same with device_id an optional 64-bit integer (ANDROID_ID)
  and cloud_message_type "FCM" or "GCM". Tokens issued by the old GCM SDK keep working with FCM,
  so both become `android` devices.

The rows become import rows (tokens/importer.py COLUMNS) and go through the same validation and
bulk load as a CSV file. pushsvc wants a device id per row and DPN's is optional, so a missing one
is derived from the DPN row id (uuid5): running the import twice updates the same devices instead
of adding them again. `date_created` becomes `registered_at`; DPN records no last-seen time, so
`last_seen` is the time of the import (the 90-day stale sweep would otherwise deactivate every
device registered more than 90 days ago, in use or not).

Skipped, each reported with its reason: inactive devices (DPN deactivated them after a provider
error), rows without a token, an unknown cloud_message_type, and a row superseded by a later
registration of the same device or token (last registration wins, as in pushsvc's registry).
The Web Push and WNS tables are counted and reported, not imported.

The source is opened read-only; PostgreSQL and SQLite URLs are supported (for MySQL, export the
tables to CSV and import that).
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import dj_database_url
import psycopg2

APNS_TABLE = "push_notifications_apnsdevice"
GCM_TABLE = "push_notifications_gcmdevice"
OTHER_TABLES = {"push_notifications_webpushdevice": "Web Push", "push_notifications_wnsdevice": "WNS"}
# Fixed, so that the ids derived for devices without one are the same on every run.
DEVICE_NAMESPACE = uuid.UUID("5d1e4c6e-3a8f-4f62-9a1b-7c2d8e0f4b91")
CLOUD_MESSAGE_TYPES = ("FCM", "GCM")


class SourceError(Exception):
    """The source database cannot be read as a django-push-notifications database."""


@dataclass
class Export:
    """Import rows (COLUMNS order) with their labels, and what was skipped before validation."""

    rows: list[list[str]] = field(default_factory=list)
    labels: dict[int, str] = field(default_factory=dict)  # row number (1-based) -> "apnsdevice id 17"
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (label, reason)

    def reader(self) -> _Rows:
        return _Rows(self.rows)


class _Rows:
    """What tokens.importer.records expects of a csv.reader: rows, and `line_num` while iterating."""

    def __init__(self, rows: list[list[str]]) -> None:
        self._rows = rows
        self.line_num = 0

    def __iter__(self) -> Iterator[list[str]]:
        for index, row in enumerate(self._rows, 1):
            self.line_num = index
            yield row


@dataclass(slots=True)
class _Device:
    label: str
    platform: str
    device_id: str
    token: str
    user_id: str
    registered_at: datetime | None


def read_devices(url: str) -> Export:
    connection = _connect(url)
    try:
        cursor = connection.cursor()
        tables = _tables(connection, cursor)
        if APNS_TABLE not in tables and GCM_TABLE not in tables:
            raise SourceError(
                f"neither {APNS_TABLE} nor {GCM_TABLE} exists in that database: "
                "is it django-push-notifications' database?"
            )
        export = Export()
        devices: list[_Device] = []
        if APNS_TABLE in tables:
            devices += _apns(cursor, export)
        if GCM_TABLE in tables:
            devices += _gcm(cursor, connection, export)
        for table, name in OTHER_TABLES.items():
            if table in tables:
                cursor.execute(f"SELECT count(*) FROM {table}")
                count = cursor.fetchone()[0]
                if count:
                    export.skipped.append((table, f"{count} {name} devices not imported (APNs and FCM only)"))
    finally:
        connection.close()
    _keep_latest(devices, export)
    return export


def _connect(url: str) -> Any:
    try:
        config = dj_database_url.parse(url)
    except (ValueError, KeyError) as exc:
        raise SourceError(f"not a database URL: {exc}") from None
    engine = config.get("ENGINE", "")
    try:
        if engine.endswith("postgresql"):
            connection = psycopg2.connect(
                dbname=config.get("NAME") or None,
                user=config.get("USER") or None,
                password=config.get("PASSWORD") or None,
                host=config.get("HOST") or None,
                port=config.get("PORT") or None,
                connect_timeout=10,
            )
            connection.set_session(readonly=True)
            return connection
        if engine.endswith("sqlite3"):
            return sqlite3.connect(f"file:{config['NAME']}?mode=ro", uri=True)
    except (psycopg2.Error, sqlite3.Error) as exc:
        # The driver's message names host and database, never the password.
        raise SourceError(f"cannot open the source database: {str(exc).strip()}") from None
    raise SourceError("only postgres:// and sqlite:/// sources are supported; export other databases to CSV")


def _tables(connection: Any, cursor: Any) -> set[str]:
    if isinstance(connection, sqlite3.Connection):
        cursor.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    else:
        cursor.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
        )
    return {row[0] for row in cursor.fetchall()}


def _columns(connection: Any, cursor: Any, table: str) -> set[str]:
    if isinstance(connection, sqlite3.Connection):
        cursor.execute(f"PRAGMA table_info({table})")
        return {row[1] for row in cursor.fetchall()}
    cursor.execute(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND table_name = %s",
        [table],
    )
    return {row[0] for row in cursor.fetchall()}


def _when(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):  # SQLite stores text
        value = datetime.fromisoformat(value)
    # A project with USE_TZ = False stores naive times; DPN's own default is UTC.
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _apns(cursor: Any, export: Export) -> list[_Device]:
    cursor.execute(f"SELECT id, registration_id, device_id, user_id, active, date_created FROM {APNS_TABLE}")
    devices = []
    for pk, token, device_id, user_id, active, created in cursor.fetchall():
        label = f"apnsdevice id {pk}"
        if not active:
            export.skipped.append((label, "inactive in django-push-notifications (active = false)"))
            continue
        if not token:
            export.skipped.append((label, "no registration_id"))
            continue
        device = str(device_id) if device_id else str(uuid.uuid5(DEVICE_NAMESPACE, f"apns:{pk}"))
        devices.append(
            _Device(label, "ios", device, str(token), "" if user_id is None else str(user_id), _when(created))
        )
    return devices


def _gcm(cursor: Any, connection: Any, export: Export) -> list[_Device]:
    # cloud_message_type arrived in DPN 1.5; older tables hold GCM tokens only.
    has_type = "cloud_message_type" in _columns(connection, cursor, GCM_TABLE)
    kind = "cloud_message_type" if has_type else "'GCM'"
    cursor.execute(
        f"SELECT id, registration_id, device_id, user_id, active, date_created, {kind} FROM {GCM_TABLE}"
    )
    devices = []
    for pk, token, device_id, user_id, active, created, message_type in cursor.fetchall():
        label = f"gcmdevice id {pk}"
        if not active:
            export.skipped.append((label, "inactive in django-push-notifications (active = false)"))
            continue
        if (message_type or "").upper() not in CLOUD_MESSAGE_TYPES:
            export.skipped.append((label, f"cloud_message_type {message_type!r} is neither FCM nor GCM"))
            continue
        if not token:
            export.skipped.append((label, "no registration_id"))
            continue
        # DPN's device_id here is the ANDROID_ID, an integer; one device keeps it across tokens.
        name = f"gcm-device:{device_id}" if device_id is not None else f"gcm:{pk}"
        devices.append(
            _Device(
                label,
                "android",
                str(uuid.uuid5(DEVICE_NAMESPACE, name)),
                str(token),
                "" if user_id is None else str(user_id),
                _when(created),
            )
        )
    return devices


def _keep_latest(devices: list[_Device], export: Export) -> None:
    """The latest registration per device and per token becomes a row; the others are reported."""
    epoch = datetime.min.replace(tzinfo=UTC)
    devices.sort(key=lambda d: (d.registered_at or epoch, d.label))
    by_device: dict[Any, _Device] = {}
    by_token: dict[Any, _Device] = {}
    dropped: set[int] = set()
    for device in devices:
        for key, seen, what in (
            (device.device_id, by_device, "device"),
            ((device.platform, device.token), by_token, "token"),
        ):
            earlier = seen.get(key)
            if earlier is not None and id(earlier) not in dropped:
                dropped.add(id(earlier))
                export.skipped.append(
                    (earlier.label, f"superseded by a later registration of the same {what} ({device.label})")
                )
            seen[key] = device
    for device in devices:
        if id(device) in dropped:
            continue
        export.rows.append(
            [
                device.device_id,
                device.platform,
                device.token,
                device.user_id,
                "",
                "",
                "",
                "",
                "",  # last_seen: DPN has none (module docstring)
                device.registered_at.isoformat() if device.registered_at else "",
            ]
        )
        export.labels[len(export.rows)] = device.label
