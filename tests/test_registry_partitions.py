"""The partitioned device table (tokens 0007): its shape, the token claims that keep a token on
one device across partitions, the plans of the queries that matter, and the migration both ways."""

from __future__ import annotations

import re
import uuid

import pytest
from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.migrations.executor import MigrationExecutor

from campaigns.planning import iter_ranges
from tokens import registry
from tokens.admin import EstimatedCountPaginator
from tokens.models import App, DeviceToken
from tokens.validation import Registration

pytestmark = pytest.mark.django_db

DEVICES = DeviceToken._meta.db_table
CLAIMS = DeviceToken.CLAIMS_TABLE


def _sql(query: str, params: list | tuple = ()) -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(query, params)
        return cursor.fetchall() if cursor.description else []


def _register(app: App, device_id: uuid.UUID, token: str, platform: str = "ios") -> None:
    registry.upsert_device(app, Registration(device_id=device_id, platform=platform, token=token))


def _claims() -> set[tuple]:
    return set(_sql(f"SELECT app_id, platform, token_hash, device_id FROM {CLAIMS}"))


def _devices_as_claims() -> set[tuple]:
    return set(_sql(f"SELECT app_id, platform, token_hash, device_id FROM {DEVICES}"))


def _remainder(app_id: int, device_id: uuid.UUID) -> int:
    """The hash partition PostgreSQL routes (app, device) to, inserted or not."""
    count = settings.REGISTRY_PARTITIONS
    for remainder in range(count):
        query = "SELECT satisfies_hash_partition(%s::regclass, %s, %s, %s::bigint, %s::uuid)"
        if _sql(query, [DEVICES, count, remainder, app_id, device_id])[0][0]:
            return remainder
    raise AssertionError("no partition accepts the row")


def _ios_token(n: int) -> str:
    return f"{n:064x}"


@pytest.fixture
def app() -> App:
    return App.objects.create(slug="parts", name="parts")


def test_the_device_table_is_hash_partitioned_on_app_and_device() -> None:
    def shape(table: str) -> tuple:
        return _sql(
            "SELECT p.partstrat, (SELECT array_agg(a.attname ORDER BY k.n) FROM unnest(p.partattrs) "
            "WITH ORDINALITY k(attnum, n) JOIN pg_attribute a ON a.attrelid = p.partrelid "
            "AND a.attnum = k.attnum), (SELECT count(*) FROM pg_inherits WHERE inhparent = p.partrelid) "
            "FROM pg_partitioned_table p WHERE p.partrelid = %s::regclass",
            [table],
        )[0]

    assert shape(DEVICES) == ("h", ["app_id", "device_id"], settings.REGISTRY_PARTITIONS)
    assert shape(CLAIMS) == ("h", ["app_id", "token_hash"], settings.REGISTRY_PARTITIONS)


def test_a_token_stays_on_one_device_across_partitions(app: App) -> None:
    # Two devices in different partitions: only the claims can see that they share a token.
    first = uuid.uuid4()
    _register(app, first, _ios_token(1))
    other = next(d for d in iter(uuid.uuid4, None) if _remainder(app.pk, d) != _remainder(app.pk, first))
    token = DeviceToken.objects.get(device_id=first).token
    with pytest.raises(IntegrityError, match=rf"{CLAIMS}_p\d+_pkey"), transaction.atomic():
        DeviceToken.objects.create(app=app, device_id=other, platform="ios", token=token)
    # Nor can a device rotate onto a token another device holds.
    _register(app, other, _ios_token(2))
    with pytest.raises(IntegrityError, match=rf"{CLAIMS}_p\d+_pkey"), transaction.atomic():
        DeviceToken.objects.filter(device_id=other).update(token_hash=DeviceToken.hash_token(token))
    assert _remainder(app.pk, other) != _remainder(app.pk, first)
    assert DeviceToken.objects.filter(app=app).count() == 2
    # The same token on another platform, or in another app, is another claim.
    DeviceToken.objects.create(app=app, device_id=uuid.uuid4(), platform="web", token=token)
    second_app = App.objects.create(slug="parts-2", name="parts-2")
    DeviceToken.objects.create(app=second_app, device_id=first, platform="ios", token=token)
    assert _claims() == _devices_as_claims() and len(_claims()) == 4


def test_claims_follow_every_kind_of_write(app: App) -> None:
    devices = [uuid.uuid4() for _ in range(40)]
    for n, device in enumerate(devices):
        _register(app, device, _ios_token(n))
    _register(app, devices[0], _ios_token(1000))  # rotation: the old token's claim moves with it
    _register(app, uuid.uuid4(), _ios_token(1))  # the token moved to a new device: devices[1] goes
    _register(app, devices[2], _ios_token(2))  # the same registration again: nothing changes
    DeviceToken.objects.filter(device_id=devices[3]).delete()
    DeviceToken.objects.filter(device_id=devices[4]).update(is_active=False)
    assert not DeviceToken.objects.filter(device_id=devices[1]).exists()
    assert _claims() == _devices_as_claims()
    assert len(_claims()) == 39
    # The token freed by the rotation and by the delete can be registered again elsewhere.
    _register(app, uuid.uuid4(), _ios_token(0))
    _register(app, uuid.uuid4(), _ios_token(3))
    assert _claims() == _devices_as_claims() and len(_claims()) == 41


def test_a_device_cannot_change_its_key(app: App) -> None:
    device = uuid.uuid4()
    _register(app, device, _ios_token(7))
    with pytest.raises(IntegrityError, match="cannot change"), transaction.atomic():
        DeviceToken.objects.filter(device_id=device).update(device_id=uuid.uuid4())
    assert DeviceToken.objects.get(app=app).device_id == device


def test_truncate_empties_the_claims_too(app: App) -> None:
    _register(app, uuid.uuid4(), _ios_token(8))
    _sql("SET CONSTRAINTS ALL IMMEDIATE")  # no pending foreign-key events may stand in TRUNCATE's way
    _sql(f"TRUNCATE {DEVICES}")
    assert _claims() == set()
    _register(app, uuid.uuid4(), _ios_token(8))  # the token is free again
    assert len(_claims()) == 1


def _plan(query: str, params: list | tuple) -> str:
    # What is asserted is that an index serves the query, on a table too small for the planner
    # to prefer one by itself.
    with transaction.atomic():
        _sql("SET LOCAL enable_seqscan = off")
        return "\n".join(row[0] for row in _sql("EXPLAIN " + query, params))


def _index_scans(plan: str) -> int:
    """Partitions read through an index (plain, index-only or bitmap)."""
    return len(
        re.findall(
            rf"Index (?:Only )?Scan (?:using|on) \S+ on {DEVICES}_p\d+|Bitmap Index Scan on {DEVICES}_p\d+_",
            plan,
        )
    )


@pytest.fixture
def populated(app: App) -> App:
    """600 devices, 60 % iOS, for `app` among 6,000 of ten apps registering in turns, vacuumed as
    autovacuum would (an index-only scan needs the pages marked all-visible)."""
    apps = [app.pk] + [App.objects.create(slug=f"other-{n}", name="other").pk for n in range(9)]
    _sql(
        f"INSERT INTO {DEVICES} (app_id, user_id, device_id, platform, token, token_hash, web_p256dh, "
        "web_auth, app_version, locale, last_seen, is_active, deactivation_reason, created_at, "
        "updated_at) SELECT (%s::bigint[])[g %% 10 + 1], 'u' || g, gen_random_uuid(), "
        "CASE WHEN g / 10 %% 5 < 3 THEN 'ios' ELSE 'android' END, t, encode(sha256(t::bytea), 'hex'), "
        "'', '', '', '', now(), true, '', now(), now() FROM generate_series(0, 5999) g, md5(g::text) t",
        [apps],
    )
    _sql(f"VACUUM (ANALYZE) {DEVICES}")
    _sql(f"VACUUM (ANALYZE) {CLAIMS}")
    return app


@pytest.mark.django_db(transaction=True)
def test_the_planning_keyset_scan_merges_an_index_scan_per_partition(populated: App) -> None:
    app = populated
    qs = DeviceToken.objects.filter(app_id=app.pk, is_active=True, platform="ios")
    ranges = list(iter_ranges(qs, 100))
    assert sum(n for _, _, n in ranges) == qs.count() == 360
    page = qs.filter(id__gt=ranges[0][1]).order_by("id").values_list("id", flat=True)[99:100]
    sql, params = page.query.sql_with_params()
    plan = _plan(sql, params)
    # Each partition's index hands its rows over in id order; none is sorted or scanned whole.
    # (Which index: at this size the id index, at millions of rows the fan-out index, index-only:
    # bench/registry.py prints that plan.)
    assert "Merge Append" in plan and not re.search(r"->\s+Sort", plan) and "Seq Scan" not in plan, plan
    assert _index_scans(plan) == settings.REGISTRY_PARTITIONS, plan


@pytest.mark.django_db(transaction=True)
def test_a_shard_load_reads_its_range_through_the_fanout_index(populated: App) -> None:
    app = populated
    lo, hi = _sql(f"SELECT min(id), min(id) + 1000 FROM {DEVICES}")[0]
    qs = DeviceToken.objects.filter(app_id=app.pk, is_active=True, platform="ios", id__gt=lo, id__lte=hi)
    sql, params = qs.order_by("id").values_list("id", "token").query.sql_with_params()
    plan = _plan(sql, params)
    assert "Seq Scan" not in plan and _index_scans(plan) == settings.REGISTRY_PARTITIONS, plan


@pytest.mark.django_db(transaction=True)
def test_a_registration_finds_the_tokens_old_device_through_its_claim(populated: App) -> None:
    app = populated
    token_hash = _sql(f"SELECT token_hash FROM {DEVICES} LIMIT 1")[0][0]
    assert registry.claims_in_use()
    plan = _plan(registry._DELETE_MOVED_CLAIMED, [app.pk, "ios", token_hash, str(uuid.uuid4())])
    assert "Seq Scan" not in plan, plan
    assert f"{CLAIMS}_p" in plan and "_pkey" in plan, plan
    # Only the claim's own partition is searched for the token.
    assert plan.count(f"on {CLAIMS}_p") == 1, plan


def _layout_changed() -> None:
    """What a restart after the migration does: a new session (its prepared statements name the
    old table's way) and a fresh look at the layout."""
    connection.close()
    registry.claims_in_use.cache_clear()


@pytest.mark.django_db(transaction=True)
def test_the_migration_turns_a_filled_table_into_partitions_and_back() -> None:
    app = App.objects.create(slug="migrated", name="migrated")
    for n in range(50):
        _register(app, uuid.uuid4(), _ios_token(n), platform="ios" if n % 2 else "android")
    before = set(_sql(f"SELECT id, app_id, device_id, platform, token_hash FROM {DEVICES}"))
    executor = MigrationExecutor(connection)
    try:
        executor.migrate([("tokens", "0006_signed_webhooks")])
        assert _sql("SELECT relkind FROM pg_class WHERE relname = %s", [DEVICES]) == [("r",)]
        assert _sql("SELECT to_regclass(%s)", [CLAIMS]) == [(None,)]
        assert set(_sql(f"SELECT id, app_id, device_id, platform, token_hash FROM {DEVICES}")) == before
        constraints = _sql("SELECT conname FROM pg_constraint WHERE conrelid = %s::regclass", [DEVICES])
        expected = {"uniq_device_per_app", "uniq_token_per_app_platform", f"{DEVICES}_pkey"}
        assert expected <= {name for (name,) in constraints}
        _layout_changed()
        _register(app, uuid.uuid4(), _ios_token(98))  # the registry works on the plain table
        assert not registry.claims_in_use()
        before = set(_sql(f"SELECT id, app_id, device_id, platform, token_hash FROM {DEVICES}"))
    finally:
        executor = MigrationExecutor(connection)
        executor.loader.build_graph()
        executor.migrate(executor.loader.graph.leaf_nodes())
        _layout_changed()
    assert _sql("SELECT relkind FROM pg_class WHERE relname = %s", [DEVICES]) == [("p",)]
    assert set(_sql(f"SELECT id, app_id, device_id, platform, token_hash FROM {DEVICES}")) == before
    assert _claims() == _devices_as_claims() and len(_claims()) == 51
    # Ids go on from where the sequence stood, and the registry works on the new table.
    top = max(row[0] for row in before)
    _register(app, uuid.uuid4(), _ios_token(99))
    assert DeviceToken.objects.latest("id").id > top and registry.claims_in_use()


def test_the_admins_device_count_is_the_partitions_estimate(app: App) -> None:
    _sql(
        f"INSERT INTO {DEVICES} (app_id, user_id, device_id, platform, token, token_hash, web_p256dh, "
        "web_auth, app_version, locale, last_seen, is_active, deactivation_reason, created_at, "
        "updated_at) SELECT %s, '', gen_random_uuid(), 'ios', t, encode(sha256(t::bytea), 'hex'), "
        "'', '', '', '', now(), true, '', now(), now() FROM generate_series(1, 12000) g, md5(g::text) t",
        [app.pk],
    )
    _sql(f"ANALYZE {DEVICES}")
    DeviceToken.objects.filter(id__in=DeviceToken.objects.values("id")[:100]).delete()
    # The estimate, not a COUNT(*) of millions of rows: the 100 deleted rows are not in it yet.
    assert EstimatedCountPaginator(DeviceToken.objects.order_by("-id"), 100).count == 12000
    assert DeviceToken.objects.count() == 11900
