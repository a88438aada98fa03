"""import_tokens on real PostgreSQL: COPY path and the batched (SQLite) path, bad rows, duplicates,
token moves, re-activation; the COPY path's fast row check against the validator."""

from __future__ import annotations

import csv
import io
import string
import uuid
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from tokens import importer
from tokens.management.commands import import_tokens
from tokens.models import DeviceToken
from tokens.testing import apns_token, fcm_token, make_app, web_keys, write_tokens_csv
from tokens.validation import RegistrationError, validate_registration

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
            import_tokens.Command._uses_copy = lambda self: False
        call_command("import_tokens", path, app=slug, stdout=out, stderr=err)
    except CommandError as exc:
        error = exc
    finally:
        import_tokens.Command._uses_copy = _ORIGINAL_USES_COPY
    assert import_tokens.connection.vendor == original
    return out.getvalue(), err.getvalue(), error


_ORIGINAL_USES_COPY = import_tokens.Command._uses_copy


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
    assert "line 6: expected 4 to 10 columns, got 2" in err
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
                    "AND query LIKE '%%INSERT INTO tokens_devicetoken%%' AND pid <> pg_backend_pid() "
                    "AND datname = current_database()"  # not another run's import on the same server
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


def validator_line(line: int, fields: list[str]) -> str | None:
    try:
        return importer.copy_line(line, validate_registration(importer.registration_body(fields)))
    except RegistrationError:
        return None


# Each column drawn from valid values and from values one rule away from valid (and a few that
# only the validator accepts), so the fast path meets every border of every rule.
_HEX_TOKEN = st.integers(min_value=58, max_value=206).flatmap(
    lambda n: st.text(alphabet="0123456789abcdefABCDEFg", min_size=n, max_size=n)
)
# Exactly the strings of [A-Za-z]{1,8}(?:[-_][A-Za-z0-9]{1,8}){0,5}, composed from text strategies:
# st.from_regex drew the same language, 3,000 examples in ~12 s here against ~5 s for these (the test
# below went from ~21 s to ~11 s, with the same 3,000 examples).
_LOCALE_SHAPED = st.builds(
    lambda head, subtags: head + "".join(sep + tag for sep, tag in subtags),
    st.text(alphabet=string.ascii_letters, min_size=1, max_size=8),
    st.lists(
        st.tuples(
            st.sampled_from("-_"),
            st.text(alphabet=string.ascii_letters + string.digits, min_size=1, max_size=8),
        ),
        max_size=5,
    ),
)
_FIELDS = st.tuples(
    st.one_of(
        st.uuids().map(str),
        st.uuids().map(lambda u: str(u).upper()),
        st.uuids().map(lambda u: "{" + str(u) + "}"),
        st.uuids().map(lambda u: u.hex),
        st.uuids().map(lambda u: str(u) + " "),
        st.text(max_size=40),
    ),
    st.sampled_from(["ios", "android", "huawei", "web", "IOS", "palm", ""]),
    st.one_of(
        _HEX_TOKEN,
        st.text(alphabet=st.characters(min_codepoint=0x1F, max_codepoint=0x80), min_size=0, max_size=60),
        st.just("a" * 4096),
        st.just("a" * 4097),
        st.just("ab\\cd:APA91b"),
    ),
    st.one_of(st.text(max_size=8), st.just("x" * 255), st.just("x" * 256), st.just("u\\1"), st.just("é\t")),
    st.one_of(st.just([]), st.lists(st.text(max_size=40), min_size=1, max_size=4)),
    st.one_of(
        st.sampled_from(["", "en", "en-US", "pt_BR", "zh-Hant-TW", "en-", "e1", "x" * 36, "abcdefghi"]),
        _LOCALE_SHAPED,
    ),
)


@hypothesis_settings(max_examples=3000, deadline=None)
@given(_FIELDS)
def test_fast_row_check_agrees_with_the_validator(drawn):
    device_id, platform, token, user_id, extra, locale = drawn
    fields = [device_id, platform, token, user_id, *extra]
    if len(fields) >= 6:
        fields[5] = locale
    fast = importer.fast_copy_line(7, fields)
    # The fast path may pass a row on to the validator, never accept what it refuses or render
    # a row differently.
    assert fast is None or fast == validator_line(7, fields)


def test_fast_row_check_takes_the_common_rows(tmp_path):
    path = tmp_path / "sample.csv"
    write_tokens_csv(str(path), 300)
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))[1:]
    rows.append([str(uuid.uuid4()), "ios", apns_token().upper(), "u", "1.0", "pt_BR", "ignored", "x"])
    rows.append([str(uuid.uuid4()), "android", "ab\\cd:APA91b", "a\\b", "", ""])
    for line, fields in enumerate(rows, 2):
        assert importer.fast_copy_line(line, fields) == validator_line(line, fields) is not None


def test_backslashes_and_unicode_survive_copy(tmp_path):
    app = make_app()
    device = str(uuid.uuid4())
    token = fcm_token() + "\\x"
    rows = [(device, "android", token, "usér\\1", "v\\2", "de-CH")]
    _, err, error = run(write(tmp_path / "t.csv", rows), app.slug)
    assert error is None, err
    row = DeviceToken.objects.get(app=app)
    assert (row.token, row.user_id, row.app_version, row.locale) == (token, "usér\\1", "v\\2", "de-CH")
    assert row.token_hash == DeviceToken.hash_token(token)


@pytest.mark.parametrize("divisor", [1, 10**6], ids=["split", "upsert"])
def test_new_and_known_devices_in_one_file(tmp_path, monkeypatch, divisor):
    """Split: known devices take the upsert, new ones the plain insert, in one statement. Upsert:
    all rows take it (the app has many devices for the file's size). Same result."""
    monkeypatch.setattr(import_tokens, "FEW_KNOWN_DIVISOR", divisor)
    app = make_app()
    known = [(str(uuid.uuid4()), "ios", apns_token(), "old") for _ in range(3)]
    run(write(tmp_path / "a.csv", known), app.slug)
    created = dict(DeviceToken.objects.filter(app=app).values_list("device_id", "created_at"))
    fresh = [(str(uuid.uuid4()), "android", fcm_token(), "new") for _ in range(4)]
    rotated = [(device, "ios", apns_token(), "again") for device, *_ in known]
    out, err, error = run(write(tmp_path / "b.csv", rotated + fresh), app.slug)
    assert error is None, err
    assert "imported 7 rows" in out and "4 new devices, 3 updated" in out
    stored = {str(d.device_id): d for d in DeviceToken.objects.filter(app=app)}
    assert {device: (d.token, d.user_id) for device, d in stored.items()} == {
        row[0]: (row[2], row[3]) for row in rotated + fresh
    }
    assert all(stored[str(device)].created_at == at for device, at in created.items())


def test_few_known_counts_only_up_to_a_tenth_of_the_file(tmp_path):
    from django.db import connection

    app = make_app()
    run(
        write(tmp_path / "a.csv", [(str(uuid.uuid4()), "ios", apns_token(), "u") for _ in range(3)]), app.slug
    )
    with connection.cursor() as cursor:
        assert import_tokens.Command._few_known(cursor, app.pk, 30)
        assert not import_tokens.Command._few_known(cursor, app.pk, 29)
        assert import_tokens.Command._few_known(cursor, make_app().pk, 1)
