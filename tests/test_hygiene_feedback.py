"""The feedback pipeline against real Redis and PostgreSQL: bulk application, the APNs 410 race,
FCM rotation through the registry's upsert, crash recovery and replays."""

from __future__ import annotations

import io
import uuid
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from delivery.providers.base import Outcome, Result, Target
from tokens import feedback
from tokens.feedback import GROUP, STREAM, Invalidation, apply_feedback, publish_invalidations
from tokens.models import DeviceToken
from tokens.registry import upsert_device
from tokens.testing import apns_token, fcm_token, make_app
from tokens.validation import Registration

pytestmark = pytest.mark.django_db


def make_tokens(app, count: int, platform: str = "ios", **fields) -> list[DeviceToken]:
    maker = apns_token if platform == "ios" else fcm_token
    rows = []
    for _ in range(count):
        token = maker()
        rows.append(
            DeviceToken(
                app=app,
                device_id=uuid.uuid4(),
                platform=platform,
                token=token,
                token_hash=DeviceToken.hash_token(token),
                **fields,
            )
        )
    return DeviceToken.objects.bulk_create(rows)


def invalidation(row: DeviceToken, **fields) -> Invalidation:
    values = {
        "device_id": row.pk,
        "token_hash": row.token_hash,
        "app_id": row.app_id,
        "provider": "apns" if row.platform == "ios" else "fcm",
        "reason": "Unregistered" if row.platform == "ios" else "UNREGISTERED",
    }
    values.update(fields)
    return Invalidation(**values)


def audit_rows(**where) -> list[dict]:
    clauses = " AND ".join(f"{k} = %s" for k in where) or "TRUE"
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT stream_id, device_id, provider, reason, campaign_id, applied FROM {feedback.AUDIT_TABLE}"
            f" WHERE {clauses} ORDER BY id",
            list(where.values()),
        )
        names = [c[0] for c in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def active_ids(app) -> set[int]:
    return set(DeviceToken.objects.filter(app=app, is_active=True).values_list("id", flat=True))


def test_bulk_application_one_update_per_batch_with_audit(redis_client):
    app = make_app()
    ios = make_tokens(app, 1800, "ios")
    android = make_tokens(app, 1200, "android")
    dead_ios, dead_android = ios[:1500], android[:1100]
    publish_invalidations([invalidation(r, campaign_id=42) for r in dead_ios], client=redis_client)
    publish_invalidations([invalidation(r, campaign_id=42) for r in dead_android], client=redis_client)
    assert redis_client.xlen(STREAM) == 2600

    with CaptureQueriesContext(connection) as queries:
        first = apply_feedback(2500, block_ms=0, client=redis_client)
    writes = [q["sql"] for q in queries.captured_queries if "UPDATE" in q["sql"].upper()]
    assert len(writes) == 1, writes  # the whole batch, audit included, is one statement
    assert (first.read, first.deactivated, first.audited, first.acked) == (2500, 2500, 2500, 2500)

    second = apply_feedback(2500, block_ms=0, client=redis_client)
    assert (second.read, second.deactivated, second.acked) == (100, 100, 100)

    dead = {r.pk for r in dead_ios + dead_android}
    assert active_ids(app) == {r.pk for r in ios + android} - dead
    rows = DeviceToken.objects.filter(pk__in=dead)
    assert set(rows.values_list("deactivation_reason", flat=True)) == {"Unregistered", "UNREGISTERED"}
    assert rows.filter(deactivated_at__isnull=True).count() == 0
    audit = audit_rows(campaign_id=42)
    assert len(audit) == 2600 and all(a["applied"] for a in audit)
    assert {a["provider"] for a in audit} == {"apns", "fcm"}
    assert sum(a["provider"] == "fcm" for a in audit) == 1100
    # Applied entries are acknowledged and removed: nothing pending, nothing left in the stream.
    assert redis_client.xlen(STREAM) == 0
    assert redis_client.xpending(STREAM, GROUP)["pending"] == 0


def test_apns_410_timestamp_race(redis_client):
    app = make_app()
    now = timezone.now()
    apple_ts = now - timedelta(minutes=10)
    before, equal, after = make_tokens(app, 3, "ios")
    DeviceToken.objects.filter(pk=before.pk).update(updated_at=apple_ts - timedelta(seconds=1))
    DeviceToken.objects.filter(pk=equal.pk).update(updated_at=apple_ts)
    # Registered again after Apple decided the token was dead: the device is back, keep it.
    DeviceToken.objects.filter(pk=after.pk).update(updated_at=apple_ts + timedelta(seconds=1))
    publish_invalidations([invalidation(r, provider_ts=apple_ts) for r in (before, equal, after)])

    report = apply_feedback(block_ms=0)

    assert report.deactivated == 2
    assert active_ids(app) == {after.pk}
    applied = {a["device_id"]: a["applied"] for a in audit_rows(app_id=app.pk)}
    assert applied == {before.pk: True, equal.pk: True, after.pk: False}


def test_re_registration_through_registry_wins_over_late_410(redis_client):
    app = make_app()
    token = apns_token()
    reg = Registration(device_id=uuid.uuid4(), platform="ios", token=token)
    apple_ts = timezone.now() - timedelta(hours=1)
    first = upsert_device(app, reg, now=apple_ts - timedelta(hours=1))
    upsert_device(app, reg, now=apple_ts + timedelta(minutes=5))  # app launched again: same token

    result = Result(
        target=Target(device_id=first.id, token=token),
        outcome=Outcome.INVALID_TOKEN,
        status=410,
        reason="Unregistered",
        invalid_since=apple_ts,
    )
    publish_invalidations([Invalidation.from_result(result, app_id=app.pk, platform="ios", campaign_id=7)])
    assert apply_feedback(block_ms=0).deactivated == 0
    assert DeviceToken.objects.get(pk=first.id).is_active


def test_fcm_rotation_feedback_for_old_token_spares_the_new_one(redis_client):
    app = make_app()
    device = uuid.uuid4()
    old_token, new_token = fcm_token(), fcm_token()
    row = upsert_device(app, Registration(device_id=device, platform="android", token=old_token))
    sent_at = timezone.now()
    # FCM rotated the token; the app registered the new one (same device, same row).
    rotated = upsert_device(
        app,
        Registration(device_id=device, platform="android", token=new_token),
        now=sent_at - timedelta(seconds=1),  # even with a registration older than the answer
    )
    assert rotated.id == row.id

    # A send to the old token, in flight during the rotation, answers UNREGISTERED.
    stale = Result(
        target=Target(device_id=row.id, token=old_token), outcome=Outcome.INVALID_TOKEN, reason="UNREGISTERED"
    )
    publish_invalidations([Invalidation.from_result(stale, app_id=app.pk, platform="android")])
    report = apply_feedback(block_ms=0)

    current = DeviceToken.objects.get(pk=row.id)
    assert report.deactivated == 0
    assert current.is_active and current.token == new_token
    assert [a["applied"] for a in audit_rows(device_id=row.id)] == [False]

    # The same answer about the token the device holds now does deactivate it.
    fresh = Result(
        target=Target(device_id=row.id, token=new_token), outcome=Outcome.INVALID_TOKEN, reason="UNREGISTERED"
    )
    publish_invalidations([Invalidation.from_result(fresh, app_id=app.pk, platform="android")])
    assert apply_feedback(block_ms=0).deactivated == 1
    assert not DeviceToken.objects.get(pk=row.id).is_active


def test_observed_at_protects_a_registration_after_the_answer(redis_client):
    app = make_app()
    (row,) = make_tokens(app, 1, "android")
    observed = timezone.now() - timedelta(minutes=1)
    DeviceToken.objects.filter(pk=row.pk).update(updated_at=observed + timedelta(seconds=30))
    publish_invalidations([invalidation(row, observed_at=observed)])
    assert apply_feedback(block_ms=0).deactivated == 0
    assert DeviceToken.objects.get(pk=row.pk).is_active


def test_duplicates_in_one_batch_apply_once_and_audit_each(redis_client):
    app = make_app()
    (row,) = make_tokens(app, 1, "ios")
    publish_invalidations([invalidation(row), invalidation(row, reason="BadDeviceToken")])
    report = apply_feedback(block_ms=0)
    assert (report.deactivated, report.audited) == (1, 2)
    assert sorted(a["applied"] for a in audit_rows(device_id=row.pk)) == [False, True]


def test_crash_between_read_and_apply_loses_nothing(redis_client):
    app = make_app()
    rows = make_tokens(app, 300, "ios")
    publish_invalidations([invalidation(r, campaign_id=9) for r in rows], client=redis_client)
    feedback.ensure_group(redis_client)

    # A consumer reads the batch and dies before applying it: no ack, nothing written.
    taken, _ = feedback.read_batch(redis_client, "worker-a:1234", 2500, block_ms=0, claim_idle_ms=60_000)
    assert len(taken) == 300
    assert len(active_ids(app)) == 300
    assert redis_client.xpending(STREAM, GROUP)["pending"] == 300

    # Another consumer gets nothing new, and does not steal entries that are not idle yet.
    quiet = apply_feedback(block_ms=0, consumer="worker-b:99", claim_idle_ms=60_000, client=redis_client)
    assert (quiet.read, quiet.deactivated) == (0, 0)
    assert redis_client.xpending(STREAM, GROUP)["pending"] == 300

    # Once the dead consumer's entries are idle long enough, they are reclaimed and applied.
    report = apply_feedback(block_ms=0, consumer="worker-b:99", claim_idle_ms=0, client=redis_client)
    assert (report.read, report.reclaimed, report.deactivated, report.acked) == (300, 300, 300, 300)
    assert active_ids(app) == set()
    assert redis_client.xpending(STREAM, GROUP)["pending"] == 0
    assert len(audit_rows(campaign_id=9)) == 300


def test_failed_apply_keeps_the_batch_pending_for_the_same_consumer(redis_client):
    app = make_app()
    rows = make_tokens(app, 5, "ios")
    publish_invalidations([invalidation(r) for r in rows], client=redis_client)
    # The audit table is briefly unavailable: the transaction fails and nothing is acknowledged.
    with connection.cursor() as cursor:
        cursor.execute(f"ALTER TABLE {feedback.AUDIT_TABLE} RENAME TO hygiene_audit_away")
    with pytest.raises(Exception, match=r"hygiene_audit_away|tokens_deactivation_audit"):
        apply_feedback(block_ms=0, consumer="c1", client=redis_client)
    with connection.cursor() as cursor:
        cursor.execute(f"ALTER TABLE hygiene_audit_away RENAME TO {feedback.AUDIT_TABLE}")
    assert len(active_ids(app)) == 5
    assert redis_client.xpending(STREAM, GROUP)["pending"] == 5

    report = apply_feedback(block_ms=0, consumer="c1", client=redis_client)  # its own pending first
    assert (report.read, report.reclaimed, report.deactivated) == (5, 0, 5)


def test_replayed_batch_changes_nothing(redis_client):
    """Commit succeeded but the ack was lost: the entries come back and must be a no-op."""
    app = make_app()
    rows = make_tokens(app, 10, "ios")
    publish_invalidations([invalidation(r) for r in rows], client=redis_client)
    feedback.ensure_group(redis_client)
    taken, _ = feedback.read_batch(redis_client, "c1", 100, block_ms=0, claim_idle_ms=60_000)
    entries = [feedback._decode(entry_id, fields) for entry_id, fields in taken]
    assert feedback.apply_entries(entries) == (10, 10)

    # Meanwhile one device registers again with the same token.
    upsert_device(
        rows[0].app_id, Registration(device_id=rows[0].device_id, platform="ios", token=rows[0].token)
    )
    report = apply_feedback(block_ms=0, consumer="c1", client=redis_client)
    assert (report.read, report.deactivated, report.audited, report.acked) == (10, 0, 0, 10)
    assert active_ids(app) == {rows[0].pk}
    assert len(audit_rows(app_id=app.pk)) == 10


def test_malformed_entries_are_dropped_without_failing_the_batch(redis_client):
    app = make_app()
    row, other = make_tokens(app, 2, "ios")
    good = {
        "d": row.pk,
        "h": row.token_hash,
        "a": app.pk,
        "p": "apns",
        "r": "Unregistered",
        "t": "",
        "c": "",
        "o": "",
    }
    for bad in (
        {"d": "not-a-number"},
        {**good, "d": 2**63},  # beyond bigint: PostgreSQL would refuse the whole batch
        {**good, "h": "zz" * 32},
        {**good, "p": "ap\x00ns"},
        {**good, "t": "9" * 30},
    ):
        redis_client.xadd(STREAM, bad)
    publish_invalidations([invalidation(other, reason="Bad\x00DeviceToken")], client=redis_client)
    report = apply_feedback(block_ms=0, client=redis_client)
    assert (report.read, report.dropped, report.deactivated, report.acked) == (6, 5, 1, 6)
    assert active_ids(app) == {row.pk}
    assert DeviceToken.objects.get(pk=other.pk).deactivation_reason == "BadDeviceToken"
    assert redis_client.xlen(STREAM) == 0


def test_blocking_read_returns_entries_published_meanwhile(redis_client):
    app = make_app()
    (row,) = make_tokens(app, 1, "ios")
    feedback.ensure_group(redis_client)
    assert apply_feedback(block_ms=50, client=redis_client).read == 0
    publish_invalidations([invalidation(row)], client=redis_client)
    assert apply_feedback(block_ms=5000, client=redis_client).deactivated == 1


def test_drain_applies_full_batches_until_empty(redis_client):
    app = make_app()
    rows = make_tokens(app, 1000, "android")
    publish_invalidations([invalidation(r) for r in rows], client=redis_client)
    report = feedback.drain_feedback(30, batch_max=300, consumers=1, client=redis_client)
    assert (report.batches, report.deactivated) == (4, 1000)
    assert feedback.backlog(redis_client) == {"stream_length": 0, "pending": 0}


def test_run_feedback_command_applies_a_batch(redis_client):
    app = make_app()
    rows = make_tokens(app, 20, "ios")
    publish_invalidations([invalidation(r) for r in rows], client=redis_client)
    out = io.StringIO()
    call_command("run_feedback", "--once", "--consumer", "cli-1", stdout=out)
    assert "applied 20 entries: 20 deactivated" in out.getvalue()
    assert active_ids(app) == set()


def test_apply_invalidations_in_the_callers_transaction(redis_client):
    """The synchronous entry point for a shard's results: same matching rules and audit, no stream."""
    app = make_app()
    device = uuid.uuid4()
    old_token, new_token = fcm_token(), fcm_token()
    row = upsert_device(app, Registration(device_id=device, platform="android", token=old_token))
    others = make_tokens(app, 3, "android")
    upsert_device(app, Registration(device_id=device, platform="android", token=new_token))  # rotated
    results = [
        Result(
            target=Target(device_id=row.id, token=old_token),
            outcome=Outcome.INVALID_TOKEN,
            reason="UNREGISTERED",
        )
    ] + [
        Result(
            target=Target(device_id=r.pk, token=r.token), outcome=Outcome.INVALID_TOKEN, reason="UNREGISTERED"
        )
        for r in others
    ]
    with transaction.atomic():
        deactivated, audited = feedback.apply_invalidations(
            [Invalidation.from_result(r, app_id=app.pk, platform="android", campaign_id=3) for r in results]
        )
    assert (deactivated, audited) == (3, 4)
    assert active_ids(app) == {row.id}
    assert sorted(a["applied"] for a in audit_rows(campaign_id=3)) == [False, True, True, True]
    assert {a["provider"] for a in audit_rows(campaign_id=3)} == {"fcm"}
    assert redis_client.xlen(STREAM) == 0


def test_feedback_for_a_token_that_moved_to_another_device_spares_it(redis_client):
    app = make_app()
    token = fcm_token()
    first = upsert_device(app, Registration(device_id=uuid.uuid4(), platform="android", token=token))
    # The same token registers for a new device (reinstall/restore): the registry moves it.
    second = upsert_device(app, Registration(device_id=uuid.uuid4(), platform="android", token=token))
    assert second.id != first.id
    # A send to the first row, in flight during the move, answers UNREGISTERED.
    answer = Result(
        target=Target(device_id=first.id, token=token), outcome=Outcome.INVALID_TOKEN, reason="UNREGISTERED"
    )
    publish_invalidations([Invalidation.from_result(answer, app_id=app.pk, platform="android")])
    assert apply_feedback(block_ms=0).deactivated == 0
    assert list(DeviceToken.objects.filter(app=app).values_list("id", "is_active")) == [(second.id, True)]


@pytest.mark.django_db(transaction=True)
def test_drain_works_a_backlog_with_parallel_consumers(redis_client):
    app = make_app()
    rows = make_tokens(app, 3000, "android")
    publish_invalidations([invalidation(r, campaign_id=11) for r in rows], client=redis_client)
    try:
        report = feedback.drain_feedback(
            60, batch_max=250, consumers=3, consumer="drain", client=redis_client
        )
        consumers = {c["name"] for c in redis_client.xinfo_consumers(STREAM, GROUP)}
        assert (report.read, report.deactivated, report.audited, report.acked) == (3000, 3000, 3000, 3000)
        assert consumers == {b"drain", b"drain:1", b"drain:2"}
        assert active_ids(app) == set()
        assert feedback.backlog(redis_client) == {"stream_length": 0, "pending": 0}
    finally:
        with connection.cursor() as cursor:  # not a model table: the flush after this test skips it
            cursor.execute(f"DELETE FROM {feedback.AUDIT_TABLE}")
