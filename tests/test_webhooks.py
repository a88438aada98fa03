"""Signed webhooks: the outbox is written in the transaction of the change (token invalidations,
campaign state changes), delivery signs and POSTs to a real local HTTP server, failures retry with
backoff until the attempts run out, a second copy of the task never double-sends, the SSRF guard
refuses private addresses unless allowed, and the admin shows every attempt without the secret."""

from __future__ import annotations

import http.server
import json
import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest
import redis
from django.contrib.auth import get_user_model
from django.db import transaction
from django.test import Client
from django.utils import timezone

from campaigns import control
from campaigns.models import Campaign
from campaigns.pytest_fixtures import *  # noqa: F403  (start_worker and the simulator it needs)
from tokens import webhooks
from tokens.invalidation import Invalidation, apply_invalidations
from tokens.models import DeviceToken, WebhookAttempt, WebhookEvent
from tokens.tasks import deliver_webhook
from tokens.testing import apns_token, make_app
from tokens.validation import validate_webhook_url

pytestmark = pytest.mark.django_db(transaction=True)

SECRET = webhooks.generate_secret()


class Receiver:
    """A real HTTP server on 127.0.0.1: records every request, answers the scripted statuses."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.statuses: list[int] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                outer.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                status = outer.statuses.pop(0) if outer.statuses else 200
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/pushsvc?x=1"
        # shutdown() waits for serve_forever's next poll: 0.05 s, not the default 0.5 s, per test.
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver(settings, redis_client: redis.Redis) -> Iterator[Receiver]:
    # The receiver is a local plain-http server: both guards are lifted explicitly, as a
    # deployment with its backend on a private network would.
    settings.WEBHOOK_ALLOW_PRIVATE = True
    settings.WEBHOOK_ALLOW_HTTP = True
    server = Receiver()
    yield server
    server.close()


def hooked_app(url: str):
    return make_app(webhook_url=url, webhook_secret=SECRET)


def invalidate(app, count: int = 3) -> list[DeviceToken]:
    devices = [
        DeviceToken.objects.create(
            app=app, device_id=uuid.uuid4(), platform="ios", token=apns_token(), user_id=f"u{i}"
        )
        for i in range(count)
    ]
    apply_invalidations([Invalidation(d.pk, d.token_hash, app.pk, "apns", "Unregistered") for d in devices])
    return devices


def test_signature_scheme_round_trip() -> None:
    body = b'{"id":"x"}'
    header = webhooks.signature_header(SECRET, 1_700_000_000, body)
    assert header.startswith("t=1700000000,v1=") and len(header.split("v1=")[1]) == 64
    assert webhooks.verify_signature(SECRET, header, body, now=1_700_000_100)
    assert not webhooks.verify_signature(SECRET, header, body + b" ", now=1_700_000_100)  # body changed
    assert not webhooks.verify_signature("whsec_other", header, body, now=1_700_000_100)
    assert not webhooks.verify_signature(SECRET, header, body, now=1_700_000_000 + 301)  # a replay
    assert not webhooks.verify_signature(SECRET, "v1=abc", body)


def test_invalidations_are_batched_into_one_event_in_the_same_transaction(receiver, settings) -> None:
    settings.WEBHOOK_BATCH_MAX = 2
    app = hooked_app(receiver.url)
    devices = invalidate(app, count=3)
    events = list(WebhookEvent.objects.filter(app=app).order_by("created_at"))
    assert [e.type for e in events] == ["token.invalidated"] * 2  # 3 devices, 2 per event
    reported = [d for e in events for d in e.payload["devices"]]
    assert sorted(d["device_id"] for d in reported) == sorted(str(d.device_id) for d in devices)
    assert {d["reason"] for d in reported} == {"Unregistered"} and reported[0]["platform"] == "ios"

    # Rolled back with the change: no deactivation, no event.
    more = DeviceToken.objects.create(app=app, device_id=uuid.uuid4(), platform="ios", token=apns_token())
    with pytest.raises(RuntimeError), transaction.atomic():
        apply_invalidations([Invalidation(more.pk, more.token_hash, app.pk, "apns", "Unregistered")])
        raise RuntimeError("the shard's transaction fails after the invalidation")
    assert DeviceToken.objects.get(pk=more.pk).is_active
    assert WebhookEvent.objects.filter(app=app).count() == 2

    # An app without a webhook keeps no events.
    plain = make_app()
    invalidate(plain, count=1)
    assert not WebhookEvent.objects.filter(app=plain).exists()


def test_delivery_is_signed_and_recorded(receiver) -> None:
    app = hooked_app(receiver.url)
    invalidate(app, count=2)
    event = WebhookEvent.objects.get(app=app)
    assert deliver_webhook.apply(args=[str(event.id)]).get() == "delivered (200)"
    [(headers, body)] = receiver.requests
    assert (
        headers["pushsvc-event-id"] == str(event.id) and headers["pushsvc-event-type"] == "token.invalidated"
    )
    assert webhooks.verify_signature(SECRET, headers["pushsvc-signature"], body)
    assert headers["host"] == receiver.url.split("/")[2]
    doc = json.loads(body)
    assert doc["id"] == str(event.id) and doc["app"] == app.slug and len(doc["data"]["devices"]) == 2
    event.refresh_from_db()
    assert event.status == "delivered" and event.attempts == 1 and event.delivered_at is not None
    [attempt] = WebhookAttempt.objects.filter(event=event)
    assert attempt.status_code == 200 and attempt.error == ""
    # Delivered: another copy of the task (a redelivered message, the sweep) sends nothing.
    assert webhooks.deliver(str(event.id)) == "not due, leased or done"
    assert len(receiver.requests) == 1


def test_failures_back_off_then_deliver_with_the_same_event_id(receiver, settings) -> None:
    settings.WEBHOOK_RETRY_BASE_S = 60.0
    app = hooked_app(receiver.url)
    invalidate(app, count=1)
    event = WebhookEvent.objects.get(app=app)
    receiver.statuses = [500, 503]
    before = timezone.now()
    assert webhooks.deliver(str(event.id)).startswith("retry in")
    event.refresh_from_db()
    # First retry: within [base/2, base] of now (the jittered upper half), never at once.
    assert before + timedelta(seconds=30) <= event.next_attempt_at <= timezone.now() + timedelta(seconds=60)
    assert event.status == "pending" and event.last_error == "HTTP 500"
    assert webhooks.deliver(str(event.id)) == "not due, leased or done"  # not yet due: no request
    assert len(receiver.requests) == 1

    WebhookEvent.objects.filter(pk=event.pk).update(next_attempt_at=timezone.now())  # time passes
    assert webhooks.deliver(str(event.id)).startswith("retry in")
    event.refresh_from_db()
    assert (
        timezone.now() + timedelta(seconds=60) <= event.next_attempt_at
    )  # second retry: base * 2 / 2 at least
    WebhookEvent.objects.filter(pk=event.pk).update(next_attempt_at=timezone.now())
    assert webhooks.deliver(str(event.id)) == "delivered (200)"
    ids = {headers["pushsvc-event-id"] for headers, _ in receiver.requests}
    assert ids == {str(event.id)} and len(receiver.requests) == 3  # at least once, one id to dedupe on
    assert list(WebhookAttempt.objects.filter(event=event).values_list("status_code", flat=True)) == [
        500,
        503,
        200,
    ]


def test_attempts_run_out_and_the_event_fails(receiver, settings) -> None:
    settings.WEBHOOK_MAX_ATTEMPTS = 2
    app = hooked_app(receiver.url)
    invalidate(app, count=1)
    event = WebhookEvent.objects.get(app=app)
    receiver.statuses = [500, 500]
    webhooks.deliver(str(event.id))
    WebhookEvent.objects.filter(pk=event.pk).update(next_attempt_at=timezone.now())
    assert webhooks.deliver(str(event.id)) == "failed: HTTP 500"
    event.refresh_from_db()
    assert event.status == "failed" and event.attempts == 2


def test_the_sweep_republishes_due_events(receiver, redis_client) -> None:
    app = hooked_app(receiver.url)
    invalidate(app, count=1)
    queued = redis_client.llen("webhooks")  # the commit published it (Celery's Redis list)
    assert queued >= 1
    assert webhooks.flush_due() == 1
    assert redis_client.llen("webhooks") == queued + 1


def test_campaign_state_changes_emit_events(receiver, redis_client) -> None:
    app = hooked_app(receiver.url)
    campaign = Campaign.objects.create(app=app, name="launch", message={"title": "x"}, status="running")
    assert control.pause(redis_client, campaign.pk, "Paused by request.")
    Campaign.objects.filter(pk=campaign.pk).update(status="running", outstanding=0, delivered=5)
    assert control.complete_if_done(redis_client, campaign.pk)
    Campaign.objects.filter(pk=campaign.pk).update(status="running")
    assert control.pause(redis_client, campaign.pk, "error rate", to=control.HALTED)
    events = list(WebhookEvent.objects.filter(app=app).order_by("created_at"))
    assert [e.type for e in events] == ["campaign.paused", "campaign.completed", "campaign.halted"]
    assert events[0].payload["campaign"]["reason"] == "Paused by request."
    assert events[1].payload["campaign"]["counters"]["delivered"] == 5
    assert events[2].payload["campaign"]["status"] == "halted"
    # Not running: nothing changes, nothing is emitted.
    assert not control.pause(redis_client, campaign.pk, "again")
    assert WebhookEvent.objects.filter(app=app).count() == 3


def test_ssrf_guard_refuses_private_addresses_unless_allowed(settings) -> None:
    settings.WEBHOOK_ALLOW_PRIVATE = False
    settings.WEBHOOK_ALLOW_HTTP = False
    for url, problem in [
        ("http://hooks.example.com/x", "https://"),
        ("https://10.0.0.5/x", "non-public address"),
        ("https://[::1]/x", "non-public address"),
        ("https://169.254.169.254/latest/meta-data", "non-public address"),
        ("https://user:pw@hooks.example.com/x", "credentials"),
        ("https://bad_host.example.com/x", "DNS name"),
        ("not a url", "without spaces"),
    ]:
        with pytest.raises(ValueError, match=problem):
            validate_webhook_url(url, resolve=False)
    with pytest.raises(ValueError, match="resolves to a non-public address"):
        validate_webhook_url("https://localhost:8443/x", resolve=True)
    assert validate_webhook_url("https://hooks.example.com:8443/x", resolve=False) == ()
    settings.WEBHOOK_ALLOW_PRIVATE = True
    assert validate_webhook_url("https://localhost/x", resolve=True)


def test_a_refused_address_at_send_time_is_an_attempt_not_a_request(receiver, settings) -> None:
    app = hooked_app(receiver.url)
    invalidate(app, count=1)
    event = WebhookEvent.objects.get(app=app)
    settings.WEBHOOK_ALLOW_PRIVATE = False  # e.g. the name now resolves to a private address
    assert "refused" in webhooks.deliver(str(event.id))
    assert receiver.requests == []
    assert "non-public address" in WebhookAttempt.objects.get(event=event).error


def test_admin_shows_attempts_and_never_the_secret(receiver, settings) -> None:
    app = hooked_app(receiver.url)
    invalidate(app, count=1)
    event = WebhookEvent.objects.get(app=app)
    receiver.statuses = [502]
    webhooks.deliver(str(event.id))
    user = get_user_model().objects.create_superuser("root", "root@example.com", "pw")
    client = Client()
    client.force_login(user)
    listing = client.get("/admin/tokens/webhookevent/").content.decode()
    detail = client.get(f"/admin/tokens/webhookevent/{event.pk}/change/").content.decode()
    app_page = client.get(f"/admin/tokens/app/{app.pk}/change/").content.decode()
    assert "token.invalidated" in listing and "502" in detail
    assert f"set · {app.secret_fingerprint('webhook_secret')}" in app_page
    for page in (listing, detail, app_page):
        assert SECRET not in page
    # A private URL is refused when saved from the admin unless allowed.
    settings.WEBHOOK_ALLOW_PRIVATE = False
    response = client.post(
        f"/admin/tokens/app/{app.pk}/change/",
        {
            "name": app.name,
            "slug": app.slug,
            "apns_auth": "token",
            "apns_environment": "production",
            "webhook_url": "https://10.1.2.3/hook",
        },
    )
    assert response.status_code == 200 and "non-public address" in response.content.decode()


def test_a_campaign_against_the_simulator_reports_dead_tokens_and_completion(receiver, fast_sim) -> None:
    """End to end in-process: a shard run against the simulator deactivates the 410s, the
    campaign completes, and both events reach the receiver, signed."""
    import hashlib

    from campaigns import control, targeting
    from campaigns.models import Shard
    from campaigns.sending import run
    from campaigns.testing import make_token, simulator_app
    from delivery import runtime

    app = simulator_app(fast_sim, webhook_url=receiver.url, webhook_secret=SECRET)
    old = timezone.now() - timedelta(days=2)
    tokens = [make_token("ios", fault) for fault in ("01", "01", None, None)]
    devices = DeviceToken.objects.bulk_create(
        DeviceToken(
            app=app,
            device_id=uuid.uuid4(),
            platform="ios",
            token=token,
            token_hash=hashlib.sha256(token.encode()).hexdigest(),
            user_id=f"u{i}",
        )
        for i, token in enumerate(tokens)
    )
    DeviceToken.objects.filter(app=app).update(updated_at=old, created_at=old)  # before Apple's 410
    campaign = Campaign.objects.create(
        app=app,
        message={"title": "hi"},
        status="running",
        started_at=timezone.now(),
        planned=True,
        outstanding=1,
        targeted=4,
    )
    control.arm(runtime.redis_client(), campaign.pk)
    shard = Shard.objects.create(
        campaign=campaign,
        platform="ios",
        queue=targeting.queue_for(campaign, "ios"),
        device_ids=[d.pk for d in devices],
        planned=4,
    )
    run.run_shard(shard.pk)
    campaign.refresh_from_db()
    assert campaign.status == "completed" and campaign.invalidated == 2
    events = {e.type: e for e in WebhookEvent.objects.filter(app=app)}
    assert set(events) == {"token.invalidated", "campaign.completed"}
    dead = {d["device_id"] for d in events["token.invalidated"].payload["devices"]}
    assert dead == {str(d.device_id) for d in devices[:2]}
    assert events["campaign.completed"].payload["campaign"]["counters"]["invalidated"] == 2
    for event in events.values():
        assert webhooks.deliver(str(event.id)).startswith("delivered")
    assert {h["pushsvc-event-type"] for h, _ in receiver.requests} == set(events)
    assert all(
        webhooks.verify_signature(SECRET, h["pushsvc-signature"], body) for h, body in receiver.requests
    )


def test_finished_events_are_pruned_with_the_audit_retention(receiver) -> None:
    app = hooked_app(receiver.url)
    invalidate(app, count=1)
    invalidate(app, count=1)
    done, pending = WebhookEvent.objects.filter(app=app)
    webhooks.deliver(str(done.id))
    WebhookEvent.objects.filter(app=app).update(created_at=timezone.now() - timedelta(days=200))
    assert webhooks.prune(180) == 2  # the delivered event and its attempt row
    assert list(WebhookEvent.objects.filter(app=app)) == [pending]


def test_a_real_worker_delivers_and_retries(receiver, start_worker) -> None:
    """The tokens.deliver_webhook task in a real Celery worker on the webhooks queue: the commit
    publishes it, a 500 is retried after its backoff, the 200 marks it delivered."""
    from campaigns.testing import wait_for

    start_worker(
        queues=("webhooks",),
        concurrency=1,
        env={
            "WEBHOOK_ALLOW_PRIVATE": "true",
            "WEBHOOK_ALLOW_HTTP": "true",
            "WEBHOOK_RETRY_BASE_S": "0.2",
        },
    )
    app = hooked_app(receiver.url)
    receiver.statuses = [500]
    invalidate(app, count=2)
    event = WebhookEvent.objects.get(app=app)
    wait_for(
        lambda: WebhookEvent.objects.filter(pk=event.pk, status="delivered").exists(),
        60,
        what="the event delivered by the worker",
    )
    assert [h["pushsvc-event-id"] for h, _ in receiver.requests] == [str(event.id)] * 2
    assert list(WebhookAttempt.objects.filter(event=event).values_list("status_code", flat=True)) == [
        500,
        200,
    ]
