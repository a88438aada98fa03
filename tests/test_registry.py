"""Upsert semantics of tokens.registry against real PostgreSQL: create, refresh, rotation, token
move, re-activation, cross-app independence."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from tokens.models import DeviceToken
from tokens.registry import upsert_device
from tokens.testing import apns_token, fcm_token, make_app, web_subscription
from tokens.validation import validate_registration

pytestmark = pytest.mark.django_db(transaction=True)


def register(app, **body):
    return upsert_device(app, validate_registration(body))


def test_first_registration_creates_then_updates():
    app = make_app()
    device = str(uuid.uuid4())
    token = apns_token()
    first = register(app, device_id=device, platform="ios", token=token, user_id="u1", locale="en")
    assert first.created
    second = register(app, device_id=device, platform="ios", token=token, user_id="u1", locale="de")
    assert not second.created
    assert second.id == first.id
    assert second.created_at == first.created_at
    row = DeviceToken.objects.get(pk=first.id)
    assert row.locale == "de"
    assert row.token_hash == DeviceToken.hash_token(token)
    assert row.last_seen == row.updated_at == second.registered_at
    assert row.created_at == first.registered_at < row.updated_at


def test_rotation_replaces_the_token_and_forgets_its_delivery_history():
    app = make_app()
    device = str(uuid.uuid4())
    old, new = fcm_token(), fcm_token()
    first = register(app, device_id=device, platform="android", token=old)
    DeviceToken.objects.filter(pk=first.id).update(last_success_at=timezone.now())
    assert register(app, device_id=device, platform="android", token=old).last_success_at is not None
    second = register(app, device_id=device, platform="android", token=new)
    assert not second.created and second.last_success_at is None
    rows = list(DeviceToken.objects.filter(app=app))
    assert [(r.token, r.token_hash) for r in rows] == [(new, DeviceToken.hash_token(new))]


def test_token_moves_to_the_new_device():
    app = make_app()
    token = apns_token()
    old_device, new_device = str(uuid.uuid4()), str(uuid.uuid4())
    register(app, device_id=old_device, platform="ios", token=token, user_id="alice")
    moved = register(app, device_id=new_device, platform="ios", token=token.upper(), user_id="bob")
    assert moved.created
    rows = list(DeviceToken.objects.filter(app=app).values_list("device_id", "user_id", "token"))
    assert rows == [(uuid.UUID(new_device), "bob", token)]


def test_same_token_on_another_platform_is_another_device():
    app = make_app()
    token = fcm_token()
    register(app, device_id=str(uuid.uuid4()), platform="android", token=token)
    register(app, device_id=str(uuid.uuid4()), platform="huawei", token=token)
    assert DeviceToken.objects.filter(app=app).count() == 2


def test_reregistration_reactivates_moves_user_and_refreshes_updated_at():
    app = make_app()
    device = str(uuid.uuid4())
    token = apns_token()
    first = register(app, device_id=device, platform="ios", token=token, user_id="alice")
    past = timezone.now() - timedelta(days=3)
    DeviceToken.objects.filter(pk=first.id).update(
        is_active=False, deactivated_at=past, deactivation_reason="unregistered", updated_at=past
    )
    again = register(app, device_id=device, platform="ios", token=token, user_id="bob")
    assert not again.created
    row = DeviceToken.objects.get(pk=first.id)
    assert row.is_active and row.deactivated_at is None and row.deactivation_reason == ""
    assert row.user_id == "bob"
    assert row.updated_at == row.last_seen == again.registered_at > past


def test_apps_are_independent():
    app_a, app_b = make_app(), make_app()
    device, token = str(uuid.uuid4()), apns_token()
    a = register(app_a, device_id=device, platform="ios", token=token, user_id="a")
    b = register(app_b, device_id=device, platform="ios", token=token, user_id="b")
    assert a.created and b.created and a.id != b.id
    assert DeviceToken.objects.get(pk=a.id).user_id == "a"
    assert DeviceToken.objects.get(pk=b.id).user_id == "b"


def test_web_subscription_is_stored_with_normalized_keys(settings):
    settings.WEBPUSH_ALLOW_INSECURE = False
    app = make_app()
    sub = web_subscription()
    sub["keys"]["auth"] += "=="
    result = register(app, device_id=str(uuid.uuid4()), platform="web", token=sub)
    row = DeviceToken.objects.get(pk=result.id)
    assert row.token == sub["endpoint"]
    assert row.web_auth == sub["keys"]["auth"].rstrip("=")
    assert row.web_p256dh == sub["keys"]["p256dh"]


def test_upsert_inside_an_outer_transaction_uses_a_savepoint():
    from django.db import transaction

    app = make_app()
    device, token = str(uuid.uuid4()), apns_token()
    with transaction.atomic():
        register(app, device_id=str(uuid.uuid4()), platform="ios", token=token)
        moved = register(app, device_id=device, platform="ios", token=token)
    assert moved.created
    devices = DeviceToken.objects.filter(app=app).values_list("device_id", flat=True)
    assert list(devices) == [uuid.UUID(device)]


def test_session_that_lost_its_prepared_statements_prepares_again():
    from django.db import connection

    app = make_app()
    register(app, device_id=str(uuid.uuid4()), platform="ios", token=apns_token())  # prepares
    with connection.cursor() as cursor:
        cursor.execute("DEALLOCATE ALL")  # what a pooler's DISCARD ALL does to the session
    again = register(app, device_id=str(uuid.uuid4()), platform="ios", token=apns_token())
    assert again.created
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_prepared_statements WHERE name LIKE 'pushsvc_device_%%'")
        assert cursor.fetchone()[0] == 2


def test_without_prepared_statements(settings):
    settings.REGISTRY_PREPARED_STATEMENTS = False
    app = make_app()
    device, token = str(uuid.uuid4()), apns_token()
    assert register(app, device_id=device, platform="ios", token=token).created
    assert not register(app, device_id=device, platform="ios", token=token).created
