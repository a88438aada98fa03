"""The live invalidation rule (tokens/invalidation.py) against real PostgreSQL: bulk application in
one statement with an audit row each, the APNs 410 race, the token-hash match (FCM rotation, a
token moved to another device), duplicates, replays and the caller's transaction."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from delivery.providers.specs import provider_name
from tokens.invalidation import AUDIT_TABLE, Invalidation, apply_invalidations
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
        "provider": provider_name(row.platform),
        "reason": "Unregistered" if row.platform == "ios" else "UNREGISTERED",
    }
    values.update(fields)
    return Invalidation(**values)


def answer(device_id: int, sent_token: str, app_id: int, platform: str, **fields) -> Invalidation:
    """An invalid-token answer as a shard's results build it (campaigns/sending/ledger.py): the hash is
    of the token the shard SENT, whatever the row holds now."""
    return Invalidation(
        device_id=device_id,
        token_hash=DeviceToken.hash_token(sent_token),
        app_id=app_id,
        provider=provider_name(platform),
        reason=fields.pop("reason", "UNREGISTERED"),
        **fields,
    )


def audit_rows(**where) -> list[dict]:
    clauses = " AND ".join(f"{k} = %s" for k in where) or "TRUE"
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT stream_id, device_id, provider, reason, campaign_id, applied FROM {AUDIT_TABLE}"
            f" WHERE {clauses} ORDER BY id",
            list(where.values()),
        )
        names = [c[0] for c in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def active_ids(app) -> set[int]:
    return set(DeviceToken.objects.filter(app=app, is_active=True).values_list("id", flat=True))


def test_bulk_application_is_one_statement_with_an_audit_row_each():
    app = make_app()
    ios = make_tokens(app, 1800, "ios")
    android = make_tokens(app, 1200, "android")
    dead_ios, dead_android = ios[:1500], android[:1100]
    items = [invalidation(r, campaign_id=42) for r in dead_ios + dead_android]

    with CaptureQueriesContext(connection) as queries:
        deactivated, audited = apply_invalidations(items)
    writes = [q["sql"] for q in queries.captured_queries if "UPDATE" in q["sql"].upper()]
    assert len(writes) == 1, writes  # all of it, audit included, is one statement
    assert (deactivated, audited) == (2600, 2600)

    dead = {r.pk for r in dead_ios + dead_android}
    assert active_ids(app) == {r.pk for r in ios + android} - dead
    rows = DeviceToken.objects.filter(pk__in=dead)
    assert set(rows.values_list("deactivation_reason", flat=True)) == {"Unregistered", "UNREGISTERED"}
    assert rows.filter(deactivated_at__isnull=True).count() == 0
    audit = audit_rows(campaign_id=42)
    assert len(audit) == 2600 and all(a["applied"] for a in audit)
    assert {a["provider"] for a in audit} == {"apns", "fcm"}
    assert sum(a["provider"] == "fcm" for a in audit) == 1100
    assert len({a["stream_id"] for a in audit}) == 2600  # every audit row has its own id


def test_keyed_invalidations_find_each_row_by_its_key_and_check_its_id():
    # The shard run passes each device's device_id (its partition key): PostgreSQL then reads one
    # partition per answer. The key must belong to the same row as the id.
    app = make_app()
    rows = make_tokens(app, 40, "ios")
    right = [invalidation(r, device_key=r.device_id) for r in rows[:20]]
    crossed = [invalidation(r, device_key=o.device_id) for r, o in zip(rows[20:30], rows[30:40], strict=True)]
    assert apply_invalidations(right + crossed) == (20, 30)
    assert active_ids(app) == {r.pk for r in rows[20:]}
    applied = {a["device_id"]: a["applied"] for a in audit_rows()}
    assert applied == {r.pk: r in rows[:20] for r in rows[:30]}


def test_apns_410_timestamp_race():
    app = make_app()
    now = timezone.now()
    apple_ts = now - timedelta(minutes=10)
    before, equal, after = make_tokens(app, 3, "ios")
    DeviceToken.objects.filter(pk=before.pk).update(updated_at=apple_ts - timedelta(seconds=1))
    DeviceToken.objects.filter(pk=equal.pk).update(updated_at=apple_ts)
    # Registered again after Apple decided the token was dead: the device is back, keep it.
    DeviceToken.objects.filter(pk=after.pk).update(updated_at=apple_ts + timedelta(seconds=1))

    deactivated, _ = apply_invalidations(
        [invalidation(r, provider_ts=apple_ts) for r in (before, equal, after)]
    )

    assert deactivated == 2
    assert active_ids(app) == {after.pk}
    applied = {a["device_id"]: a["applied"] for a in audit_rows(app_id=app.pk)}
    assert applied == {before.pk: True, equal.pk: True, after.pk: False}


def test_re_registration_through_registry_wins_over_late_410():
    app = make_app()
    token = apns_token()
    reg = Registration(device_id=uuid.uuid4(), platform="ios", token=token)
    apple_ts = timezone.now() - timedelta(hours=1)
    first = upsert_device(app, reg, now=apple_ts - timedelta(hours=1))
    upsert_device(app, reg, now=apple_ts + timedelta(minutes=5))  # app launched again: same token

    late = answer(first.id, token, app.pk, "ios", reason="Unregistered", provider_ts=apple_ts, campaign_id=7)
    assert apply_invalidations([late]) == (0, 1)
    assert DeviceToken.objects.get(pk=first.id).is_active
    assert [a["applied"] for a in audit_rows(campaign_id=7)] == [False]


def test_fcm_rotation_answer_for_old_token_spares_the_new_one():
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
    deactivated, _ = apply_invalidations([answer(row.id, old_token, app.pk, "android")])

    current = DeviceToken.objects.get(pk=row.id)
    assert deactivated == 0
    assert current.is_active and current.token == new_token
    assert [a["applied"] for a in audit_rows(device_id=row.id)] == [False]

    # The same answer about the token the device holds now does deactivate it.
    assert apply_invalidations([answer(row.id, new_token, app.pk, "android")])[0] == 1
    assert not DeviceToken.objects.get(pk=row.id).is_active


def test_answer_for_a_token_that_moved_to_another_device_spares_it():
    app = make_app()
    token = fcm_token()
    first = upsert_device(app, Registration(device_id=uuid.uuid4(), platform="android", token=token))
    # The same token registers for a new device (reinstall/restore): the registry moves it.
    second = upsert_device(app, Registration(device_id=uuid.uuid4(), platform="android", token=token))
    assert second.id != first.id
    # A send to the first row, in flight during the move, answers UNREGISTERED.
    assert apply_invalidations([answer(first.id, token, app.pk, "android")])[0] == 0
    assert list(DeviceToken.objects.filter(app=app).values_list("id", "is_active")) == [(second.id, True)]


def test_observed_at_protects_a_registration_after_the_answer():
    app = make_app()
    (row,) = make_tokens(app, 1, "android")
    observed = timezone.now() - timedelta(minutes=1)
    DeviceToken.objects.filter(pk=row.pk).update(updated_at=observed + timedelta(seconds=30))
    assert apply_invalidations([invalidation(row, observed_at=observed)])[0] == 0
    assert DeviceToken.objects.get(pk=row.pk).is_active


def test_without_observed_at_the_call_time_is_the_evidence():
    """An answer with neither a provider timestamp nor observed_at counts as seen now: a row
    registered before the call is deactivated."""
    app = make_app()
    (row,) = make_tokens(app, 1, "android")
    assert apply_invalidations([invalidation(row)]) == (1, 1)
    assert active_ids(app) == set()


def test_duplicates_in_one_call_apply_once_and_audit_each():
    app = make_app()
    (row,) = make_tokens(app, 1, "ios")
    deactivated, audited = apply_invalidations(
        [invalidation(row), invalidation(row, reason="BadDeviceToken")]
    )
    assert (deactivated, audited) == (1, 2)
    assert sorted(a["applied"] for a in audit_rows(device_id=row.pk)) == [False, True]


def test_applied_again_deactivates_nothing_more_and_spares_a_re_registration():
    app = make_app()
    rows = make_tokens(app, 10, "ios")
    # As a shard's results do: the answers carry when they arrived, so applying them again later
    # still judges a registration against that moment.
    items = [invalidation(r, observed_at=timezone.now()) for r in rows]
    assert apply_invalidations(items) == (10, 10)

    # Meanwhile one device registers again with the same token.
    upsert_device(
        rows[0].app_id, Registration(device_id=rows[0].device_id, platform="ios", token=rows[0].token)
    )
    deactivated, audited = apply_invalidations(items)
    assert deactivated == 0
    assert active_ids(app) == {rows[0].pk}
    # The second call audits again, none of it applied: a caller that may run twice (a shard)
    # must make its second run a no-op itself (campaigns/sending/ledger.py records a shard once).
    assert audited == 10
    assert sum(a["applied"] for a in audit_rows(app_id=app.pk)) == 10


def test_reason_is_stored_without_nul_and_cut_to_the_column():
    app = make_app()
    first, second = make_tokens(app, 2, "ios")
    apply_invalidations(
        [invalidation(first, reason="Bad\x00DeviceToken"), invalidation(second, reason="x" * 100)]
    )
    assert DeviceToken.objects.get(pk=first.pk).deactivation_reason == "BadDeviceToken"
    assert DeviceToken.objects.get(pk=second.pk).deactivation_reason == "x" * 64
    assert {a["reason"] for a in audit_rows(app_id=app.pk)} == {"BadDeviceToken", "x" * 64}


def test_apply_invalidations_in_the_callers_transaction():
    """A shard's results call it inside their own transaction: same rules and audit, and a
    rollback of that transaction takes the deactivations and the audit with it."""
    app = make_app()
    device = uuid.uuid4()
    old_token, new_token = fcm_token(), fcm_token()
    row = upsert_device(app, Registration(device_id=device, platform="android", token=old_token))
    others = make_tokens(app, 3, "android")
    upsert_device(app, Registration(device_id=device, platform="android", token=new_token))  # rotated
    items = [answer(row.id, old_token, app.pk, "android", campaign_id=3)] + [
        answer(r.pk, r.token, app.pk, "android", campaign_id=3) for r in others
    ]

    class Abort(Exception):
        pass

    with pytest.raises(Abort), transaction.atomic():
        assert apply_invalidations(items) == (3, 4)
        raise Abort  # the shard's transaction fails after the invalidations were applied
    assert active_ids(app) == {row.id, *(r.pk for r in others)}
    assert audit_rows(campaign_id=3) == []

    with transaction.atomic():
        deactivated, audited = apply_invalidations(items)
    assert (deactivated, audited) == (3, 4)
    assert active_ids(app) == {row.id}
    assert sorted(a["applied"] for a in audit_rows(campaign_id=3)) == [False, True, True, True]
    assert {a["provider"] for a in audit_rows(campaign_id=3)} == {"fcm"}


def test_nothing_to_apply_touches_nothing():
    with CaptureQueriesContext(connection) as queries:
        assert apply_invalidations([]) == (0, 0)
    assert queries.captured_queries == []
