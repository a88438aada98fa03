"""import_tokens on real PostgreSQL: COPY path and the batched (SQLite) path, bad rows, duplicates,
token moves, re-activation."""

from __future__ import annotations

import csv
import io
import uuid
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from tokens.management.commands import import_tokens
from tokens.models import DeviceToken
from tokens.testing import apns_token, fcm_token, make_app, web_keys, write_tokens_csv

pytestmark = pytest.mark.django_db(transaction=True)


def write(path: Path, rows: list[tuple], header: bool = True) -> str:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        if header:
            writer.writerow(import_tokens.COLUMNS)
        writer.writerows(rows)
    return str(path)


def run(path: str, slug: str, *, batched: bool = False) -> tuple[str, str, Exception | None]:
    out, err = io.StringIO(), io.StringIO()
    original = import_tokens.connection.vendor
    error = None
    try:
        if batched:
            # The SQLite path is plain portable SQL: run it against PostgreSQL too.
            import_tokens.Command._load_postgresql = import_tokens.Command._load_batched
        call_command("import_tokens", path, app=slug, stdout=out, stderr=err)
    except CommandError as exc:
        error = exc
    finally:
        import_tokens.Command._load_postgresql = _ORIGINAL_PG_LOADER
    assert import_tokens.connection.vendor == original
    return out.getvalue(), err.getvalue(), error


_ORIGINAL_PG_LOADER = import_tokens.Command._load_postgresql


@pytest.fixture(params=["copy", "batched"])
def batched(request):
    return request.param == "batched"


def test_loads_valid_rows_and_reports(tmp_path, batched):
    app = make_app()
    rows = [
        (str(uuid.uuid4()), "ios", apns_token(), "u1", "1.0", "en"),
        (str(uuid.uuid4()), "android", fcm_token(), "u2"),
        (str(uuid.uuid4()), "huawei", fcm_token(), ""),
    ]
    out, err, error = run(write(tmp_path / "t.csv", rows), app.slug, batched=batched)
    assert error is None and err == ""
    assert "imported 3 rows" in out and "3 new devices" in out and "rows/s" in out
    stored = {str(d.device_id): d for d in DeviceToken.objects.filter(app=app)}
    assert set(stored) == {r[0] for r in rows}
    assert stored[rows[0][0]].app_version == "1.0" and stored[rows[0][0]].locale == "en"
    assert all(d.is_active and d.token_hash == DeviceToken.hash_token(d.token) for d in stored.values())


def test_bad_rows_are_reported_by_line_and_skipped(tmp_path, batched):
    app = make_app()
    good = (str(uuid.uuid4()), "ios", apns_token(), "u1")
    rows = [
        good,
        ("not-a-uuid", "ios", apns_token(), "u"),  # line 3
        (str(uuid.uuid4()), "palm", "x", "u"),  # line 4
        (str(uuid.uuid4()), "ios", "zz", "u"),  # line 5
        (str(uuid.uuid4()), "android"),  # line 6: too few columns
        (str(uuid.uuid4()), "android", "tok\x00en", "u"),  # line 7
        (str(uuid.uuid4()), "android", fcm_token(), "x" * 300),  # line 8
    ]
    out, err, error = run(write(tmp_path / "t.csv", rows), app.slug, batched=batched)
    assert isinstance(error, CommandError) and "6 bad rows" in str(error)
    for line, field in [(3, "device_id"), (4, "platform"), (5, "token"), (7, "token"), (8, "user_id")]:
        assert f"line {line}: {field}:" in err
    assert "line 6: expected 4 to 8 columns, got 2" in err
    assert "imported 1 rows" in out and "rejected 6" in out
    assert list(DeviceToken.objects.filter(app=app).values_list("device_id", flat=True)) == [
        uuid.UUID(good[0])
    ]


def test_invalid_utf8_is_a_bad_row_not_a_crash(tmp_path):
    app = make_app()
    path = tmp_path / "t.csv"
    good = f"{uuid.uuid4()},ios,{apns_token()},u1\n".encode()
    path.write_bytes(good + f"{uuid.uuid4()},android,abc,\xff\xfe\n".encode("latin-1"))
    _, err, error = run(str(path), app.slug)
    assert error is not None and "line 2: user_id:" in err
    assert DeviceToken.objects.filter(app=app).count() == 1


def test_last_row_wins_per_device_and_per_token(tmp_path, batched):
    app = make_app()
    device_a, device_b = str(uuid.uuid4()), str(uuid.uuid4())
    shared = apns_token()
    rows = [
        (device_a, "ios", apns_token(), "first"),
        (device_a, "ios", apns_token(), "second"),
        (device_b, "ios", shared, "b"),
        (device_a, "ios", shared, "a-took-it"),
    ]
    _, _, error = run(write(tmp_path / "t.csv", rows, header=False), app.slug, batched=batched)
    assert error is None
    assert list(DeviceToken.objects.filter(app=app).values_list("device_id", "token", "user_id")) == [
        (uuid.UUID(device_a), shared, "a-took-it")
    ]


def test_existing_devices_are_updated_reactivated_and_tokens_moved(tmp_path, batched):
    app = make_app()
    old_device, kept_device = str(uuid.uuid4()), str(uuid.uuid4())
    moving, kept = apns_token(), apns_token()
    run(
        write(tmp_path / "a.csv", [(old_device, "ios", moving, "u"), (kept_device, "ios", kept, "u")]),
        app.slug,
    )
    past = timezone.now() - timezone.timedelta(days=2)
    DeviceToken.objects.filter(app=app).update(
        is_active=False, deactivated_at=past, deactivation_reason="unregistered", updated_at=past
    )
    new_device = str(uuid.uuid4())
    rows = [(new_device, "ios", moving, "v"), (kept_device, "ios", kept, "v")]
    out, _, error = run(write(tmp_path / "b.csv", rows), app.slug, batched=batched)
    assert error is None and "1 new devices, 1 updated" in out
    devices = {str(d.device_id): d for d in DeviceToken.objects.filter(app=app)}
    assert set(devices) == {new_device, kept_device}
    kept_row = devices[kept_device]
    assert kept_row.is_active and kept_row.deactivation_reason == "" and kept_row.user_id == "v"
    assert kept_row.updated_at > past


def test_web_rows_carry_their_keys(tmp_path, settings, batched):
    settings.WEBPUSH_ALLOW_INSECURE = False
    app = make_app()
    keys = web_keys()
    endpoint = "https://updates.push.services.mozilla.com/wpush/v2/abc"
    rows = [
        (str(uuid.uuid4()), "web", endpoint, "u", "", "", keys["p256dh"], keys["auth"]),
        (str(uuid.uuid4()), "web", "https://10.0.0.1/x", "u", "", "", keys["p256dh"], keys["auth"]),
        (str(uuid.uuid4()), "web", endpoint + "2", "u", "", "", keys["p256dh"], "short"),
    ]
    _, err, error = run(write(tmp_path / "t.csv", rows), app.slug, batched=batched)
    assert error is not None and "line 3: token:" in err and "line 4: token:" in err
    row = DeviceToken.objects.get(app=app)
    assert (row.token, row.web_p256dh, row.web_auth) == (endpoint, keys["p256dh"], keys["auth"])


def test_apps_are_separate_and_unknown_app_is_an_error(tmp_path):
    app, other = make_app(), make_app()
    path = write(tmp_path / "t.csv", [(str(uuid.uuid4()), "ios", apns_token(), "u")])
    run(path, app.slug)
    run(path, other.slug)
    assert DeviceToken.objects.filter(app=app).count() == DeviceToken.objects.filter(app=other).count() == 1
    with pytest.raises(CommandError, match="No app with slug"):
        call_command("import_tokens", path, app="nope", stdout=io.StringIO())
    with pytest.raises(CommandError, match="no such file"):
        call_command("import_tokens", str(tmp_path / "missing.csv"), app=app.slug, stdout=io.StringIO())


def test_generated_sample_file_imports_cleanly(tmp_path):
    app = make_app()
    path = tmp_path / "sample.csv"
    write_tokens_csv(str(path), 5_000)
    out, err, error = run(str(path), app.slug)
    assert error is None and err == "" and "imported 5000 rows" in out
    assert DeviceToken.objects.filter(app=app, is_active=True).count() == 5_000


def test_import_racing_an_api_registration_of_the_same_token(tmp_path):
    """A registration commits token T on device X while the import is inserting T for device Y:
    the import's insert waits, fails on the unique token, re-runs its step and moves T to Y."""
    import threading
    import time

    import psycopg2
    from django.db import connection

    from tokens import registry

    app = make_app()
    token = apns_token()
    api_device, csv_device = uuid.uuid4(), uuid.uuid4()
    path = write(tmp_path / "t.csv", [(str(csv_device), "ios", token, "from-csv")])
    params = connection.settings_dict
    dsn = {"dbname": params["NAME"], "user": params["USER"], "host": params["HOST"], "port": params["PORT"]}
    blocker = psycopg2.connect(**dsn)
    # pg_stat_activity is a per-transaction snapshot: watch it from an autocommit session.
    watcher = psycopg2.connect(**dsn)
    watcher.autocommit = True
    now = timezone.now()
    row = [app.pk, str(api_device), "ios", token, DeviceToken.hash_token(token), "", "", "api", "", ""]
    with blocker.cursor() as cursor:  # the registration, mid-transaction
        cursor.execute(registry._INSERT, [*row, now, now, now])
    outcome: dict[str, object] = {}

    def do_import() -> None:
        try:
            outcome["result"] = run(path, app.slug)
        finally:
            connection.close()

    importer = threading.Thread(target=do_import)
    importer.start()
    try:
        deadline = time.monotonic() + 60
        with watcher.cursor() as watch:
            while True:  # until the import's INSERT waits on the registration's row
                watch.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND query LIKE '%%INSERT INTO tokens_devicetoken%%' AND pid <> pg_backend_pid()"
                )
                if watch.fetchone()[0] or time.monotonic() > deadline or not importer.is_alive():
                    break
        assert importer.is_alive(), outcome
    finally:
        blocker.commit()
        blocker.close()
        watcher.close()
        importer.join(timeout=60)
    out, err, error = outcome["result"]
    assert error is None, err
    assert "imported 1 rows" in out
    rows = list(DeviceToken.objects.filter(app=app).values_list("device_id", "user_id"))
    assert rows == [(csv_device, "from-csv")]
