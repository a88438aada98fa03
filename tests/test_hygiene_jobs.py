"""Prune, stale sweep, their locks and commands; the campaign guard and health signals."""

from __future__ import annotations

import io
import threading
import uuid
from datetime import timedelta

import psycopg2
import pytest
from django.core.management import call_command
from django.db import connection
from django.utils import timezone

from tokens import hygiene
from tokens.invalidation import AUDIT_TABLE, Invalidation, apply_invalidations
from tokens.models import DeviceToken
from tokens.testing import apns_token, make_app

DAY = timedelta(days=1)


def make_row(app, platform: str = "ios", **fields) -> DeviceToken:
    token = apns_token()
    return DeviceToken.objects.create(
        app=app, device_id=uuid.uuid4(), platform=platform, token=token, **fields
    )


def inactive_for(app, days: float, now, **fields) -> DeviceToken:
    return make_row(app, is_active=False, deactivated_at=now - timedelta(days=days), **fields)


def existing(rows) -> set[int]:
    return set(DeviceToken.objects.filter(pk__in=[r.pk for r in rows]).values_list("pk", flat=True))


@pytest.mark.django_db
def test_prune_boundary_29_vs_31_days(redis_client):
    app = make_app()
    now = timezone.now()
    young = inactive_for(app, 29, now)
    old = inactive_for(app, 31, now)
    active_old = make_row(app, last_seen=now - 400 * DAY, updated_at=now - 400 * DAY)
    no_date = make_row(app, is_active=False)  # inactive, age unknown: never pruned

    report = hygiene.prune_inactive(now=now)

    assert (report.changed, report.locked_out) == (1, False)
    assert existing([young, old, active_old, no_date]) == {young.pk, active_old.pk, no_date.pk}
    assert hygiene.prune_inactive(now=now).changed == 0  # idempotent


@pytest.mark.django_db
def test_sweep_boundary_89_vs_91_days(redis_client):
    app = make_app()
    now = timezone.now()
    recent = make_row(app, last_seen=now - 89 * DAY)
    stale = make_row(app, last_seen=now - 91 * DAY)
    already = make_row(app, last_seen=now - 200 * DAY, is_active=False, deactivation_reason="Unregistered")

    report = hygiene.sweep_stale(now=now)

    assert report.changed == 1
    states = {r.pk: (r.is_active, r.deactivation_reason) for r in DeviceToken.objects.filter(app=app)}
    assert states == {recent.pk: (True, ""), stale.pk: (False, "stale"), already.pk: (False, "Unregistered")}
    assert DeviceToken.objects.get(pk=stale.pk).deactivated_at == now
    assert hygiene.sweep_stale(now=now).changed == 0


@pytest.mark.django_db
def test_prune_walks_keyset_batches(redis_client):
    app = make_app()
    now = timezone.now()
    doomed = [inactive_for(app, 40, now) for _ in range(23)]
    kept = [inactive_for(app, 5, now) for _ in range(4)]
    seen = []

    report = hygiene.prune_inactive(now=now, batch_size=5, on_batch=lambda r: seen.append(r.changed))

    assert report.changed == 23 and report.batches == 5
    assert seen == [5, 10, 15, 20, 23]
    assert existing(doomed + kept) == {r.pk for r in kept}


@pytest.mark.django_db(transaction=True)
def test_write_over_the_time_cap_is_cancelled_and_retried_smaller(redis_client, settings):
    app = make_app()
    now = timezone.now()
    rows = [inactive_for(app, 60, now) for _ in range(8)]
    settings.HYGIENE_BATCH_TARGET_S = 0.05  # cap: 3 x target = 150 ms per write statement
    with connection.cursor() as cursor:
        # Every deleted row costs 40 ms: a batch of 8 runs past the cap, a batch of 2 does not.
        cursor.execute(
            "CREATE FUNCTION hygiene_slow() RETURNS trigger LANGUAGE plpgsql AS"
            " $$ BEGIN PERFORM pg_sleep(0.04); RETURN OLD; END $$;"
            " CREATE TRIGGER hygiene_slow BEFORE DELETE ON tokens_devicetoken"
            " FOR EACH ROW EXECUTE FUNCTION hygiene_slow()"
        )
    try:
        report = hygiene.prune_inactive(now=now, batch_size=8)
    finally:
        with connection.cursor() as cursor:
            cursor.execute("DROP TRIGGER hygiene_slow ON tokens_devicetoken; DROP FUNCTION hygiene_slow()")
    # 8 rows (320 ms) cancelled at the cap, retried as 2, then shrunk towards the 50 ms target.
    assert report.timeouts >= 1 and report.smallest_batch <= 2
    assert (report.changed, report.skipped_batches) == (8, 0)
    assert existing(rows) == set()


@pytest.mark.django_db(transaction=True)
def test_batch_blocked_by_a_row_lock_is_skipped_not_waited_for(redis_client, settings):
    app = make_app()
    now = timezone.now()
    rows = [inactive_for(app, 60, now) for _ in range(6)]
    settings.HYGIENE_BATCH_TARGET_S = 0.05
    blocker = psycopg2.connect(**_dsn())
    try:
        with blocker.cursor() as cursor:  # a registration holding rows[4] mid-transaction
            cursor.execute("SELECT 1 FROM tokens_devicetoken WHERE id = %s FOR UPDATE", [rows[4].pk])
        report = hygiene.prune_inactive(now=now, batch_size=3)
    finally:
        blocker.rollback()
        blocker.close()
    assert (report.changed, report.skipped_batches) == (3, 1)
    assert existing(rows) == {r.pk for r in rows[3:]}
    assert hygiene.prune_inactive(now=now).changed == 3  # the next run takes them


def _dsn() -> dict:
    db = connection.settings_dict
    return {
        "dbname": db["NAME"],
        "user": db.get("USER") or "postgres",
        "host": db.get("HOST") or "127.0.0.1",
        "port": db.get("PORT") or 5432,
    }


def test_batch_size_adapts_to_the_time_target(settings):
    settings.HYGIENE_BATCH_TARGET_S = 0.25
    assert hygiene._next_size(5000, 1.0, 5000) == 1250  # four times too slow: a quarter
    assert hygiene._next_size(1250, 0.05, 5000) == 2500  # fast again: grow back, doubling
    assert hygiene._next_size(2500, 0.01, 5000) == 5000  # never past the configured size
    assert hygiene._next_size(200, 100.0, 5000) == 100  # never below the floor
    assert hygiene._next_size(3000, 0.2, 5000) == 3000  # close to target: keep


@pytest.mark.django_db
def test_dry_runs_change_nothing_and_print_counts(redis_client):
    app = make_app(slug="dry-app")
    now = timezone.now()
    inactive_for(app, 45, now)
    inactive_for(app, 45, now, platform="android")
    make_row(app, last_seen=now - 120 * DAY)

    out = io.StringIO()
    call_command("prune_tokens", "--dry-run", stdout=out)
    assert "would delete 2 token(s)" in out.getvalue()
    assert "dry-app/android: 1" in out.getvalue() and "dry-app/ios: 1" in out.getvalue()

    out = io.StringIO()
    call_command("sweep_stale", "--dry-run", stdout=out)
    assert "would deactivate 1 token(s)" in out.getvalue()
    assert DeviceToken.objects.filter(app=app).count() == 3
    assert DeviceToken.objects.filter(app=app, is_active=True).count() == 1

    out = io.StringIO()
    call_command("prune_tokens", stdout=out)
    assert out.getvalue().startswith("deleted 2 token(s)")
    out = io.StringIO()
    call_command("sweep_stale", "--days", "100", stdout=out)
    assert out.getvalue().startswith("deactivated 1 token(s)")


@pytest.mark.django_db(transaction=True)
def test_two_concurrent_prunes_one_runs(redis_client):
    app = make_app()
    now = timezone.now()
    rows = [inactive_for(app, 60, now) for _ in range(12)]
    first_batch_done = threading.Event()
    let_go = threading.Event()
    reports = {}

    def hold_after_first_batch(report):
        first_batch_done.set()
        assert let_go.wait(30)

    def first():
        try:
            reports["first"] = hygiene.prune_inactive(now=now, batch_size=4, on_batch=hold_after_first_batch)
        finally:
            connection.close()

    runner = threading.Thread(target=first)
    runner.start()
    try:
        assert first_batch_done.wait(30)
        # A second beat fires while the first run is mid-way: it must not run.
        second = hygiene.prune_inactive(now=now, batch_size=4)
        assert second.locked_out and second.changed == 0 and second.batches == 0
        assert redis_client.exists(hygiene.LOCK_PREFIX + "prune_inactive")
    finally:
        let_go.set()
        runner.join(30)
    assert reports["first"].changed == 12
    assert existing(rows) == set()
    # The owner released its lock: the next night's run is not locked out.
    assert not redis_client.exists(hygiene.LOCK_PREFIX + "prune_inactive")
    assert not hygiene.prune_inactive(now=now).locked_out


@pytest.mark.django_db
def test_a_run_that_lost_its_lock_stops_and_leaves_the_new_owner_alone(redis_client):
    app = make_app()
    now = timezone.now()
    rows = [inactive_for(app, 60, now) for _ in range(6)]
    key = hygiene.LOCK_PREFIX + "prune_inactive"

    def lose_lock(report):
        # The lock expired during a stall and another run took it.
        redis_client.set(key, "someone-else")

    report = hygiene.prune_inactive(now=now, batch_size=2, on_batch=lose_lock)
    assert (report.lock_lost, report.batches, report.changed) == (True, 1, 2)
    assert len(existing(rows)) == 4  # stopped after its first batch
    assert redis_client.get(key) == b"someone-else"  # and did not release the other's lock


@pytest.mark.django_db
def test_stale_share_counts_active_target_only(redis_client):
    app = make_app()
    other = make_app()
    now = timezone.now()
    for days in (1, 10, 29, 31, 45, 200):
        make_row(app, last_seen=now - days * DAY)
    make_row(app, platform="android", last_seen=now - 300 * DAY)
    make_row(app, last_seen=now - 300 * DAY, is_active=False)
    make_row(other, last_seen=now - 300 * DAY)

    ios = hygiene.stale_share(app, ["ios"], now=now)
    assert (ios.target, ios.unseen) == (6, 3) and ios.share == 0.5
    everything = hygiene.stale_share(app.pk, now=now)
    assert (everything.target, everything.unseen) == (7, 4)
    narrowed = hygiene.stale_share_of(
        DeviceToken.objects.filter(app=app, last_seen__gte=now - 40 * DAY), now=now
    )
    assert (narrowed.target, narrowed.unseen) == (4, 1)
    assert hygiene.stale_share(make_app(), ["ios"]).share == 0.0
    fresh = hygiene.exclude_stale(DeviceToken.objects.filter(app=app, platform="ios"), now=now)
    assert sorted(fresh.values_list("last_seen", flat=True)) == sorted(
        now - days * DAY for days in (45, 31, 29, 10, 1)
    )


@pytest.mark.django_db
def test_churn_and_invalid_rates_from_the_audit(redis_client):
    app = make_app()
    rows = [make_row(app) for _ in range(10)] + [make_row(app, platform="android") for _ in range(5)]
    items = [
        Invalidation(r.pk, r.token_hash, app.pk, "apns", "Unregistered", campaign_id=77) for r in rows[:3]
    ] + [Invalidation(r.pk, r.token_hash, app.pk, "fcm", "UNREGISTERED", campaign_id=77) for r in rows[10:12]]
    items.append(
        Invalidation(rows[3].pk, rows[3].token_hash, app.pk, "apns", "BadDeviceToken")
    )  # no campaign
    assert apply_invalidations(items) == (6, 6)

    churn = hygiene.token_churn(app)
    assert (churn.invalidations, churn.active) == (6, 9)
    assert churn.per_day == pytest.approx(6 / 9)
    assert hygiene.token_churn(app, days=7).per_day == pytest.approx(6 / 7 / 9)

    assert hygiene.invalid_counts(77) == {"apns": {"Unregistered": 3}, "fcm": {"UNREGISTERED": 2}}
    rates = hygiene.invalid_rates(77, {"apns": 100, "fcm": 40, "webpush": 5})
    assert rates["apns"].rate == pytest.approx(0.03)
    assert rates["fcm"].rate == pytest.approx(0.05)
    assert rates["webpush"].invalid == 0
    # Audit rows survive the prune of the tokens they describe.
    DeviceToken.objects.filter(app=app, is_active=False).update(deactivated_at=timezone.now() - 60 * DAY)
    assert hygiene.prune_inactive().changed == 6
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM {AUDIT_TABLE} WHERE app_id = %s", [app.pk])
        assert cursor.fetchone()[0] == 6


def test_spike_flagged_in_the_first_thousand_sends(redis_client):
    # 205 invalid in the first 1,000 APNs sends: flagged once the window is full, and it stays.
    for _ in range(3):
        spike = hygiene.record_sends(1, "apns", 300, 60, client=redis_client)
        assert not spike.flagged
    spike = hygiene.record_sends(1, "apns", 100, 25, client=redis_client)
    assert (spike.window_sent, spike.window_invalid, spike.flagged) == (1000, 205, True)
    assert hygiene.record_sends(1, "apns", 5000, 0, client=redis_client).flagged

    # 10 % invalid: not flagged; and invalid answers after the window do not count.
    hygiene.record_sends(2, "fcm", 1000, 100, client=redis_client)
    late = hygiene.record_sends(2, "fcm", 1000, 900, client=redis_client)
    assert (late.window_sent, late.window_invalid, late.flagged) == (1000, 100, False)

    # Already past 20 % of the window before it is full: flagged early.
    assert hygiene.record_sends(3, "apns", 400, 201, client=redis_client).flagged

    status = hygiene.spike_status(1, client=redis_client)
    assert set(status) == {"apns"} and status["apns"].flagged
    assert not hygiene.spike_status(2, client=redis_client)["fcm"].flagged


@pytest.mark.django_db
def test_audit_retention_deletes_only_old_rows(redis_client, settings):
    app = make_app()
    rows = [make_row(app) for _ in range(12)]
    assert apply_invalidations(
        [Invalidation(r.pk, r.token_hash, app.pk, "apns", "Unregistered") for r in rows]
    ) == (12, 12)
    now = timezone.now()
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT id FROM {AUDIT_TABLE} ORDER BY id")
        ids = [pk for (pk,) in cursor.fetchall()]
        # The oldest seven (lowest ids) are past retention.
        cursor.execute(f"UPDATE {AUDIT_TABLE} SET recorded_at = %s WHERE id <= %s", [now - 200 * DAY, ids[6]])
    settings.HYGIENE_BATCH_SIZE = 3
    assert hygiene.prune_audit(now=now) == 7
    assert hygiene.prune_audit(now=now) == 0
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT id FROM {AUDIT_TABLE} ORDER BY id")
        assert [pk for (pk,) in cursor.fetchall()] == ids[7:]
