"""import_tokens keeps a device's history: `last_seen` / `registered_at` columns (both load paths),
and `--from-django-push-notifications` against a real PostgreSQL database holding
django-push-notifications' tables, with every skipped device reported and why."""

from __future__ import annotations

import csv
import io
import secrets
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg2
import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from django.utils import timezone

from tokens import dpn
from tokens.invalidation import Invalidation, apply_invalidations
from tokens.management.commands import import_tokens
from tokens.models import DeviceToken
from tokens.testing import apns_token, fcm_token, make_app

pytestmark = pytest.mark.django_db(transaction=True)

_ORIGINAL_USES_COPY = import_tokens.Command._uses_copy


@pytest.fixture(params=["copy", "batched"])
def batched(request, monkeypatch):
    if request.param == "batched":
        # The SQLite path is portable SQL: run it against PostgreSQL too.
        monkeypatch.setattr(import_tokens.Command, "_uses_copy", lambda self: False)
    return request.param == "batched"


def run(*args: str, **options: str) -> tuple[str, str, Exception | None]:
    out, err = io.StringIO(), io.StringIO()
    try:
        call_command("import_tokens", *args, stdout=out, stderr=err, **options)
    except CommandError as exc:
        return out.getvalue(), err.getvalue(), exc
    return out.getvalue(), err.getvalue(), None


def write(path: Path, header: list[str], rows: list[list[str]]) -> str:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def test_dates_are_kept_in_any_column_order(tmp_path, batched):
    app = make_app()
    old, seen = "2024-01-02T03:04:05+00:00", "2025-06-01T12:00:00Z"
    ids = [str(uuid.uuid4()) for _ in range(3)]
    path = write(
        tmp_path / "t.csv",
        ["registered_at", "device_id", "platform", "token", "last_seen", "user_id"],
        [
            [old, ids[0], "ios", apns_token(), seen, "u1"],
            ["", ids[1], "android", fcm_token(), "", "u2"],  # empty: now, as before
            ["2024-03-01T10:00:00", ids[2], "ios", apns_token(), "", "u3"],  # naive: UTC
        ],
    )
    before = timezone.now()
    out, err, error = run(path, app=app.slug)
    assert error is None and err == "", err
    rows = {str(d.device_id): d for d in DeviceToken.objects.filter(app=app)}
    assert rows[ids[0]].updated_at == datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert rows[ids[0]].last_seen == datetime(2025, 6, 1, 12, tzinfo=UTC)
    assert rows[ids[1]].updated_at >= before and rows[ids[1]].last_seen >= before
    assert rows[ids[2]].updated_at == datetime(2024, 3, 1, 10, tzinfo=UTC)
    # created_at is when pushsvc stored the row: the new-device count still reads it.
    assert all(d.created_at >= before for d in rows.values()) and "3 new devices" in out


def test_positional_dates_and_bad_dates_are_reported(tmp_path, batched):
    app = make_app()
    good = [str(uuid.uuid4()), "ios", apns_token(), "u", "", "", "", "", "2025-01-01T00:00:00Z", ""]
    future = (timezone.now() + timedelta(days=2)).isoformat()
    rows = [
        good,
        [str(uuid.uuid4()), "ios", apns_token(), "u", "", "", "", "", "yesterday", ""],  # line 2
        [str(uuid.uuid4()), "ios", apns_token(), "u", "", "", "", "", "", future],  # line 3
    ]
    path = tmp_path / "t.csv"
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    _out, err, error = run(str(path), app=app.slug)
    assert isinstance(error, CommandError) and "2 bad rows" in str(error)
    assert "line 2: last_seen: not an ISO 8601 date-time: 'yesterday'" in err
    assert "line 3: registered_at:" in err and "is in the future" in err
    device = DeviceToken.objects.get(app=app)
    assert str(device.device_id) == good[0] and device.last_seen == datetime(2025, 1, 1, tzinfo=UTC)


def test_unknown_header_column_is_a_clear_error(tmp_path):
    app = make_app()
    path = write(tmp_path / "t.csv", ["device_id", "platform", "token", "seen"], [])
    _out, _err, error = run(path, app=app.slug)
    assert isinstance(error, CommandError) and "unknown column(s) in the header: seen" in str(error)


def test_an_apns_410_older_than_now_but_newer_than_the_imported_registration_prunes(tmp_path):
    """The issue's case: tokens Apple declared dead after their real registration but before the
    import were kept, because the import stamped them "now"."""
    app = make_app()
    device_id, token = str(uuid.uuid4()), apns_token()
    path = write(
        tmp_path / "t.csv",
        ["device_id", "platform", "token", "user_id", "registered_at"],
        [[device_id, "ios", token, "u", "2024-01-01T00:00:00Z"]],
    )
    assert run(path, app=app.slug)[2] is None
    device = DeviceToken.objects.get(app=app)
    apple_says_dead = datetime(2024, 6, 1, tzinfo=UTC)  # before the import, after the registration
    deactivated, _ = apply_invalidations(
        [Invalidation(device.pk, device.token_hash, app.pk, "apns", "Unregistered", apple_says_dead)]
    )
    assert deactivated == 1
    assert not DeviceToken.objects.get(pk=device.pk).is_active


# --- django-push-notifications --------------------------------------------------------------------

# The tables as django-push-notifications 3.x migrations create them on PostgreSQL.
DPN_SCHEMA = """
CREATE TABLE push_notifications_apnsdevice (
    id serial PRIMARY KEY, name varchar(255) NULL, active boolean NOT NULL,
    date_created timestamptz NULL, device_id uuid NULL, registration_id varchar(200) NOT NULL UNIQUE,
    user_id integer NULL, application_id varchar(64) NULL);
CREATE TABLE push_notifications_gcmdevice (
    id serial PRIMARY KEY, name varchar(255) NULL, active boolean NOT NULL,
    date_created timestamptz NULL, device_id bigint NULL, registration_id text NOT NULL,
    cloud_message_type varchar(3) NOT NULL, user_id integer NULL, application_id varchar(64) NULL);
CREATE TABLE push_notifications_wnsdevice (
    id serial PRIMARY KEY, name varchar(255) NULL, active boolean NOT NULL,
    date_created timestamptz NULL, device_id uuid NULL, registration_id text NOT NULL,
    user_id integer NULL, application_id varchar(64) NULL);
"""


@pytest.fixture
def dpn_database():
    """A real PostgreSQL database of django-push-notifications' shape, dropped afterwards."""
    server = settings.DATABASES["default"]
    name = f"dpn_src_{secrets.token_hex(4)}"
    params = {
        "host": server["HOST"] or None,
        "port": server["PORT"] or None,
        "user": server["USER"] or None,
        "password": server["PASSWORD"] or None,
    }
    admin = psycopg2.connect(dbname="postgres", **params)
    admin.autocommit = True
    admin.cursor().execute(f"CREATE DATABASE {name}")
    conn = psycopg2.connect(dbname=name, **params)
    conn.autocommit = True
    conn.cursor().execute(DPN_SCHEMA)
    user = f"{server['USER']}@" if server["USER"] else ""
    host = server["HOST"] or "127.0.0.1"
    port = server["PORT"] or 5432
    try:
        yield conn, f"postgres://{user}{host}:{port}/{name}"
    finally:
        conn.close()
        admin.cursor().execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


def test_import_from_django_push_notifications(dpn_database):
    conn, url = dpn_database
    app = make_app()
    cur = conn.cursor()
    ios_uuid = uuid.uuid4()
    ios_token, ios_token_2, gcm_1, gcm_2, gcm_3 = (
        apns_token(),
        apns_token(),
        fcm_token(),
        fcm_token(),
        fcm_token(),
    )
    created = datetime(2023, 5, 6, 7, 8, 9, tzinfo=UTC)
    cur.execute(
        "INSERT INTO push_notifications_apnsdevice (id, active, date_created, device_id, registration_id,"
        " user_id) VALUES (1, true, %s, %s, %s, 42), (2, false, %s, NULL, %s, 43),"
        " (3, true, %s, NULL, %s, NULL), (4, true, %s, NULL, 'not-a-hex-token', 44)",
        [created, str(ios_uuid), ios_token, created, apns_token(), created, ios_token_2, created],
    )
    cur.execute(
        "INSERT INTO push_notifications_gcmdevice (id, active, date_created, device_id, registration_id,"
        " cloud_message_type, user_id) VALUES"
        " (10, true, %s, 4660, %s, 'FCM', 7),"  # superseded: the same device registered again (11)
        " (11, true, %s, 4660, %s, 'FCM', 7),"
        " (12, true, %s, NULL, %s, 'GCM', 8),"
        " (13, true, %s, NULL, %s, 'WNS', 9)",
        [
            created,
            gcm_1,
            created + timedelta(days=1),
            gcm_2,
            created,
            gcm_3,
            created,
            fcm_token(),
        ],
    )
    cur.execute("INSERT INTO push_notifications_wnsdevice (active, registration_id) VALUES (true, 'x')")
    before = timezone.now()
    out, err, error = run(app=app.slug, from_django_push_notifications=url)
    # The one bad token is a rejected row (exit status says so); everything else is reported.
    assert isinstance(error, CommandError) and "1 bad rows" in str(error)
    assert "apnsdevice id 4: token:" in err
    assert "skipped apnsdevice id 2: inactive in django-push-notifications (active = false)" in err
    assert (
        "skipped gcmdevice id 10: superseded by a later registration of the same device (gcmdevice id 11)"
        in err
    )
    assert "skipped gcmdevice id 13: cloud_message_type 'WNS' is neither FCM nor GCM" in err
    assert "1 WNS devices not imported" in err
    assert "imported 4 rows" in out and "skipped 4 django-push-notifications devices" in out

    stored = {d.token: d for d in DeviceToken.objects.filter(app=app)}
    assert set(stored) == {ios_token, ios_token_2, gcm_2, gcm_3}
    first = DeviceToken.objects.get(app=app, device_id=ios_uuid)
    assert first.platform == "ios" and first.user_id == "42" and first.updated_at == created
    assert first.last_seen >= before  # DPN has no last-seen time: the import's (tokens/dpn.py)
    assert stored[gcm_2].platform == "android" and stored[gcm_2].updated_at == created + timedelta(days=1)
    assert stored[gcm_3].platform == "android" and stored[gcm_3].user_id == "8"
    assert stored[ios_token_2].user_id == ""

    # Devices without a DPN device id get one derived from the row: a second run updates them.
    count = DeviceToken.objects.filter(app=app).count()
    run(app=app.slug, from_django_push_notifications=url)
    assert DeviceToken.objects.filter(app=app).count() == count == 4


def test_dpn_source_errors_are_clear(tmp_path, dpn_database):
    app = make_app()
    _conn, url = dpn_database
    empty = url.rsplit("/", 1)[0] + "/postgres"
    _out, _err, error = run(app=app.slug, from_django_push_notifications=empty)
    assert isinstance(error, CommandError) and "is it django-push-notifications' database?" in str(error)
    _out, _err, error = run(app=app.slug, from_django_push_notifications="mysql://u@h/db")
    assert isinstance(error, CommandError) and "only postgres:// and sqlite:///" in str(error)
    _out, _err, error = run(str(tmp_path / "x.csv"), app=app.slug, from_django_push_notifications=url)
    assert isinstance(error, CommandError) and "not both" in str(error)
    with pytest.raises(dpn.SourceError):
        dpn.read_devices(url.rsplit("/", 1)[0] + "/no_such_database_here")
