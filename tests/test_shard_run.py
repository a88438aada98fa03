"""Every way a shard run stops, in-process: `ShardRun` with a fake provider (scripted Results per
chunk) and a fake clock (sleeps are recorded, not slept), against real PostgreSQL and Redis.

Each test asserts the StopReason and what it left behind: what the provider was sent, the shard's
row (status, the devices left to send), the campaign's counters and state, and what was published.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

import pytest
import redis
from django.db import connections
from django.utils import timezone

from campaigns import control
from campaigns.models import Campaign, Shard
from campaigns.sending import policy
from campaigns.sending.ledger import apply_shard_run
from campaigns.sending.run import RunSettings, ShardRun, StopReason
from delivery import idempotency, leases
from delivery.payload import PushMessage
from delivery.providers.base import Outcome, Provider, Result, Target
from delivery.ratelimit import provider_key
from tokens.models import DeviceToken
from tokens.testing import fcm_token, make_app

pytestmark = pytest.mark.django_db


SETTINGS = RunSettings(
    chunk_size=20,
    probe_size=5,
    lease_s=60,
    sleep_max_s=2.0,
    pause_after_s=900.0,
    max_attempts=5,
    provider_rate=0.0,
)

Script = Callable[[int, list[Target]], list[Result]]


def deliver(chunk: int, targets: list[Target]) -> list[Result]:
    return [Result(t, Outcome.DELIVERED, 200, provider_message_id=f"m{t.device_id}") for t in targets]


def answer(outcome: Outcome, status: int, reason: str = "", **kw: Any) -> Script:
    return lambda chunk, targets: [Result(t, outcome, status, reason, **kw) for t in targets]


class FakeProvider(Provider):
    """The provider interface, answering each chunk from `script(chunk index, targets)`."""

    platform = "android"
    queue = "fcm"

    def __init__(self, script: Script = deliver) -> None:
        self.script = script
        self.chunks: list[list[int]] = []
        self.messages: list[PushMessage] = []

    @classmethod
    def from_app(cls, app: Any) -> FakeProvider:
        raise NotImplementedError

    async def send(self, target: Target, message: PushMessage) -> Result:
        return (await self.send_many([target], message))[0]

    async def send_many(self, targets: list[Target], message: PushMessage) -> list[Result]:
        index = len(self.chunks)
        self.chunks.append([t.device_id for t in targets])
        self.messages.append(message)
        return self.script(index, targets)

    def all_sent(self) -> list[int]:
        return [pk for chunk in self.chunks for pk in chunk]


def at_once(coro: Coroutine[Any, Any, list[Result]]) -> concurrent.futures.Future[list[Result]]:
    """The run's `submit` for these tests: the chunk is sent when handed over, so the provider's
    script runs in the order the run hands chunks out (the worker's loop thread would race it)."""
    future: concurrent.futures.Future[list[Result]] = concurrent.futures.Future()
    try:
        future.set_result(asyncio.run(coro))
    except Exception as exc:  # handed to the run as the send's failure
        future.set_exception(exc)
    return future


@dataclass
class FakeClock:
    """Starts at the real time (the ledger's deadlines use it); `sleep` advances, never waits."""

    now: float = field(default_factory=time.time)
    mono: float = 0.0
    sleeps: list[float] = field(default_factory=list)
    on_sleep: Callable[[], None] | None = None

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.mono

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        self.mono += seconds
        if self.on_sleep:
            self.on_sleep()


class Published(list):
    """(shard, queue, countdown) per publish; `lanes` the lane each shard was published in."""

    def __init__(self) -> None:
        super().__init__()
        self.lanes: dict[int, int] = {}

    def __call__(self, shard_id: int, queue: str, lane: int, countdown: float | None = None) -> None:
        self.append((shard_id, queue, countdown))
        self.lanes[shard_id] = lane


class FlakyRedis:
    """The real client until `down`: then every pipeline (checkpoints, the bitmap) fails."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self.down = False

    def pipeline(self, *args: Any, **kwargs: Any) -> Any:
        if self.down:
            raise redis.ConnectionError("Redis went away")
        return self._client.pipeline(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


@dataclass
class Setup:
    campaign: Campaign
    shard: Shard
    devices: list[DeviceToken]
    client: redis.Redis
    provider: FakeProvider
    clock: FakeClock
    published: Published
    built: list[tuple[int, str]] = field(default_factory=list)  # (app, platform) providers asked for
    keeper: leases.LeaseKeeper | None = None  # the run's lease heartbeat, driven by hand (no thread)

    def run(
        self, client: Any = None, record: Callable[..., Any] | None = None, **settings: Any
    ) -> StopReason:
        def providers(app: Any, platform: str) -> Provider:
            self.built.append((app.pk, platform))
            return self.provider

        return ShardRun(
            self.shard.pk,
            client=client or self.client,
            providers=providers,
            clock=self.clock,
            publish_shard=self.published,
            run_settings=replace(SETTINGS, **settings),
            keeper=self.keeper,
            record=record,
            submit=at_once,
        ).run()

    def refresh(self) -> None:
        self.shard.refresh_from_db()
        self.campaign.refresh_from_db()

    def pks(self, devices: list[DeviceToken] | None = None) -> list[int]:
        return [d.pk for d in (self.devices if devices is None else devices)]


@pytest.fixture
def make(redis_client: redis.Redis) -> Callable[..., Setup]:
    def build(
        n: int = 60, script: Script = deliver, *, message: dict | None = None, **campaign: Any
    ) -> Setup:
        app = make_app()
        rows = []
        for i in range(n):
            token = fcm_token()
            rows.append(
                DeviceToken(
                    app=app,
                    device_id=uuid.uuid4(),
                    platform="android",
                    token=token,
                    token_hash=hashlib.sha256(token.encode()).hexdigest(),
                    user_id=f"u{i}",
                )
            )
        devices = DeviceToken.objects.bulk_create(rows)
        fields = {
            "status": Campaign.Status.RUNNING,
            "started_at": timezone.now(),
            "planned": True,
            "outstanding": 1,
            "targeted": n,
            **campaign,
        }
        row = Campaign.objects.create(app=app, message=message or {"title": "hi"}, **fields)
        control.arm(redis_client, row.pk, row.status)
        shard = Shard.objects.create(
            campaign=row, platform="android", queue="fcm", device_ids=[d.pk for d in devices], planned=n
        )
        clock = FakeClock()
        keeper = leases.LeaseKeeper(lambda: redis_client, every_s=2.0, stall_s=120.0, clock=clock.monotonic)
        return Setup(
            row, shard, devices, redis_client, FakeProvider(script), clock, Published(), keeper=keeper
        )

    return build


# --- finished -------------------------------------------------------------------------------------
def test_done_sends_every_device_once_in_chunks_and_completes_the_campaign(make) -> None:
    s = make(60)
    assert s.run() == StopReason.DONE
    assert [len(c) for c in s.provider.chunks] == [20, 20, 20]
    assert sorted(s.provider.all_sent()) == sorted(s.pks())
    s.refresh()
    assert s.shard.status == Shard.Status.DONE
    assert s.campaign.status == Campaign.Status.COMPLETED
    assert (s.campaign.sent, s.campaign.delivered, s.campaign.outstanding) == (60, 60, 0)
    assert control.current_state(s.client, s.campaign.pk) == Campaign.Status.COMPLETED
    assert s.clock.sleeps == [] and s.published == []
    assert not s.client.exists(idempotency.lease_key(s.shard.pk)), "lease released"


def test_devices_an_earlier_run_delivered_are_counted_not_sent_again(make) -> None:
    s = make(30)
    idempotency.mark_finished(s.client, s.campaign.pk, s.pks()[:10])
    assert s.run() == StopReason.DONE
    assert sorted(s.provider.all_sent()) == sorted(s.pks()[10:])
    s.refresh()
    assert (s.campaign.delivered, s.campaign.skipped_duplicate) == (30, 10)


def test_throttled_overlapping_chunks_cut_the_provider_rate_once_per_event(make, redis_client) -> None:
    """Two chunks are in flight when a report arrives, so each throttling event is reported twice:
    the chunk reserved before the cut must not cut again (delivery/ratelimit.py, the epoch), while
    the next chunk throttled at the cut rate is a new event. The last two chunks' reports both
    reach the bucket, though no checkpoint follows them."""
    bucket: dict[str, str] = {}
    cut_at_send: list[bytes | None] = []

    def throttled(chunk: int, targets: list[Target]) -> list[Result]:
        cut_at_send.append(redis_client.hget(bucket["key"], "cut_at"))
        if chunk == 5:  # F: accepted, so its report is seen arriving
            return deliver(chunk, targets)
        return [Result(t, Outcome.RETRY, 429, "TooManyRequests") for t in targets]

    s = make(7 * 60, throttled, prune_confirmed=True)  # judged already: chunks overlap from the start
    bucket["key"] = provider_key(s.campaign.app_id, "android")
    # 60 a chunk: over THROTTLE_MIN_DEVICES, so each report alone shows provider throttling.
    assert s.run(chunk_size=60, sleep_max_s=600.0) == StopReason.DONE
    a, b, c, d, e, f, g = cut_at_send
    assert a is None and b is None, "sent before any answer"
    # A's report cut before C; B's (reserved before that cut) did not cut before D; C's did before E.
    assert c is not None and d == c
    assert e is not None and e != d and f == e
    assert g is not None and g != f
    # G's report, sent on its own after the loop, cut once more; F's went before it (no checkpoint
    # carried it either): its 60 accepted answers are the only ones the bucket heard.
    last = redis_client.hget(bucket["key"], "cut_at")
    assert last is not None and last != g
    assert float(redis_client.hget(bucket["key"], "acc")) == pytest.approx(60, rel=0.01)


def test_retries_become_a_follow_up_shard_published_with_its_backoff(make, settings) -> None:
    settings.CAMPAIGN_RETRY_BASE_S = 4.0
    s = make(20, answer(Outcome.RETRY, 429, "TooManyRequests", retry_after=30.0))
    assert s.run() == StopReason.DONE
    [(child_id, queue, delay)] = s.published
    child = Shard.objects.get(pk=child_id)
    assert child.attempt == 1 and child.device_ids == sorted(s.pks()) and queue == "fcm"
    assert delay == pytest.approx(30.0), "the Retry-After floor, above the backoff"
    assert s.published.lanes[child_id] == Shard.Lane.HEAD
    s.refresh()
    assert s.campaign.retried == 20 and s.campaign.status == Campaign.Status.RUNNING


def test_a_retry_keeps_its_parent_s_lane(make) -> None:
    """A broadcast's bulk stays behind the head lane through its retries (settings, "Fairness")."""
    s = make(10, answer(Outcome.RETRY, 429, "TooManyRequests"))
    Shard.objects.filter(pk=s.shard.pk).update(lane=Shard.Lane.BULK)
    assert s.run() == StopReason.DONE
    [(child_id, _, _)] = s.published
    assert Shard.objects.get(pk=child_id).lane == Shard.Lane.BULK
    assert s.published.lanes[child_id] == Shard.Lane.BULK


def test_a_retry_past_its_deadline_expires_without_sending(make) -> None:
    s = make(5, message={"title": "hi", "ttl": 60})
    Shard.objects.filter(pk=s.shard.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert s.run() == StopReason.DONE
    assert s.provider.chunks == [] and s.built == [], "no provider built for nothing to send"
    s.refresh()
    assert s.campaign.expired == 5 and s.campaign.status == Campaign.Status.COMPLETED


def test_the_ttl_is_a_deadline_fixed_at_the_first_send(make) -> None:
    s = make(5, message={"title": "hi", "ttl": 600})
    assert s.run() == StopReason.DONE
    [sent] = s.provider.messages
    assert sent.expires_at == int(s.clock.now) + 600 and sent.ttl == 600


# --- not run --------------------------------------------------------------------------------------
def test_a_shard_no_longer_pending_is_skipped(make) -> None:
    s = make(5)
    Shard.objects.filter(pk=s.shard.pk).update(status=Shard.Status.DONE)
    assert s.run() == StopReason.SKIPPED
    assert s.built == [] and s.published == []


def test_a_shard_of_a_paused_campaign_parks_before_sending(make) -> None:
    s = make(5)
    control.pause(s.client, s.campaign.pk, "by request")
    assert s.run() == StopReason.PARKED
    s.refresh()
    assert s.shard.status == Shard.Status.PAUSED and s.built == []


def test_a_shard_of_a_cancelled_campaign_is_cancelled(make) -> None:
    s = make(5)
    control.cancel(s.client, s.campaign.pk)
    Shard.objects.filter(pk=s.shard.pk).update(status=Shard.Status.PENDING)  # its message was in flight
    assert s.run() == StopReason.PARKED
    s.refresh()
    assert s.shard.status == Shard.Status.CANCELLED


def test_a_shard_leased_by_another_run_is_looked_at_again_shortly(make) -> None:
    s = make(5)
    s.client.set(idempotency.lease_key(s.shard.pk), "another-run", ex=60)
    assert s.run() == StopReason.REQUEUED
    [(shard_id, queue, countdown)] = s.published
    assert shard_id == s.shard.pk and queue == "fcm" and 0 < countdown <= 5
    assert s.provider.chunks == [] and s.client.get(idempotency.lease_key(s.shard.pk)) == b"another-run"


def test_the_lease_is_registered_and_kept_alive_while_the_run_sends_then_released(make) -> None:
    s = make(40)
    key = idempotency.lease_key(s.shard.pk)
    seen: list[tuple[list[int], int, bool]] = []

    def script(chunk: int, targets: list[Target]) -> list[Result]:
        # Mid-chunk: the process's heartbeat (driven here by hand) extends the lease it holds.
        s.client.expire(key, 1)
        seen.append(
            (s.keeper.held(), int(s.client.ttl(key)), s.client.hexists(leases.REGISTER_KEY, s.shard.pk))
        )
        assert s.keeper.refresh() == [s.shard.pk]
        return deliver(chunk, targets)

    s.provider.script = script
    assert s.run() == StopReason.DONE
    assert seen[0] == ([s.shard.pk], 1, True)
    assert s.keeper.held() == [] and not s.client.exists(key), "released"
    assert not s.client.hexists(leases.REGISTER_KEY, s.shard.pk), "unregistered: not an orphan"


# --- stopped between chunks -----------------------------------------------------------------------
# The provider answers on the process's send loop, where Django allows no database call: an
# operator's action "meanwhile" runs in a thread of its own (another process, in production),
# which sees only committed rows.
OPERATOR_MEANWHILE = pytest.mark.django_db(transaction=True)


def _then(first: Script, action: Callable[[], None], at: int = 0) -> Script:
    """Answer with `first`, doing `action` while chunk `at` is sent (an operator, a crash)."""

    def script(chunk: int, targets: list[Target]) -> list[Result]:
        if chunk == at:
            _elsewhere(action)
        return first(chunk, targets)

    return script


def _elsewhere(action: Callable[[], None]) -> None:
    def target() -> None:
        try:
            action()
        finally:
            connections.close_all()

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()


@OPERATOR_MEANWHILE
def test_a_pause_stops_the_run_within_one_chunk_and_parks_the_rest(make) -> None:
    s = make(60)
    s.provider.script = _then(deliver, lambda: control.pause(s.client, s.campaign.pk, "by request"))
    assert s.run() == StopReason.PAUSED
    assert len(s.provider.chunks) == 1
    s.refresh()
    assert s.shard.status == Shard.Status.PAUSED
    assert s.shard.device_ids == sorted(s.pks()[20:]), "the unsent devices stay on the shard"
    assert s.campaign.delivered == 20 and s.campaign.outstanding == 1


@OPERATOR_MEANWHILE
def test_a_halt_stops_the_run_like_a_pause(make) -> None:
    s = make(60)
    s.provider.script = _then(
        deliver, lambda: control.pause(s.client, s.campaign.pk, "halted", to=control.HALTED)
    )
    assert s.run() == StopReason.HALTED
    s.refresh()
    assert s.shard.status == Shard.Status.PAUSED and s.campaign.status == Campaign.Status.HALTED


@OPERATOR_MEANWHILE
def test_a_cancel_stops_the_run_and_records_what_was_sent(make) -> None:
    s = make(60)
    s.provider.script = _then(deliver, lambda: control.cancel(s.client, s.campaign.pk))
    assert s.run() == StopReason.CANCELLED
    assert len(s.provider.chunks) == 1
    s.refresh()
    assert s.shard.status == Shard.Status.CANCELLED and s.campaign.delivered == 20


def test_the_error_rate_halts_the_campaign_on_the_runs_record(make, settings) -> None:
    settings.CAMPAIGN_HALT_MIN_SENDS = 10
    s = make(20, answer(Outcome.REJECTED, 400, "InvalidParameters"), outstanding=2, halt_error_rate=0.1)
    assert s.run() == StopReason.HALTED
    s.refresh()
    assert s.campaign.status == Campaign.Status.HALTED and "Halted" in s.campaign.status_reason
    assert control.current_state(s.client, s.campaign.pk) == control.HALTED


def test_the_prune_guard_holds_invalid_answers_and_pauses(make, settings) -> None:
    settings.CAMPAIGN_PRUNE_GUARD_MIN = 10
    s = make(60, answer(Outcome.INVALID_TOKEN, 400, "UNREGISTERED"))
    assert s.run() == StopReason.GUARD_HOLD
    assert len(s.provider.chunks) == 1
    s.refresh()
    assert s.campaign.status == Campaign.Status.PAUSED and "invalid" in s.campaign.status_reason.lower()
    assert s.campaign.invalidated == 0
    assert DeviceToken.objects.filter(pk__in=s.pks(), is_active=True).count() == 60, "no token touched"
    held = Shard.objects.get(campaign=s.campaign, is_child=True)
    assert held.device_ids == sorted(s.pks()[:20]), "held answers are sent again on resume"


def test_credentials_rejected_pause_the_campaign_and_touch_no_token(make) -> None:
    s = make(60, answer(Outcome.AUTH_FAILURE, 401, "THIRD_PARTY_AUTH_ERROR"))
    assert s.run() == StopReason.AUTH_FAILED
    assert len(s.provider.chunks) == 1
    s.refresh()
    assert s.campaign.status == Campaign.Status.PAUSED and "credentials" in s.campaign.status_reason
    assert s.shard.status == Shard.Status.PAUSED and s.shard.device_ids == sorted(s.pks()[20:])
    assert DeviceToken.objects.filter(pk__in=s.pks(), is_active=True).count() == 60


# --- chunks in flight -----------------------------------------------------------------------------
# Once the prune guard has passed, a chunk goes out while the one before it still drains; each
# stop sorts what is in flight first. prune_confirmed: an operator confirmed the campaign's invalid
# tokens, so the guard never holds (the same as a guard whose first results are in).
def _sorted_when_sent(s: Setup) -> list[int]:
    """Per chunk, how many of the shard's devices were already sorted when it was sent."""
    seen: list[int] = []

    def script(chunk: int, targets: list[Target]) -> list[Result]:
        seen.append(len(idempotency.finished(s.client, s.campaign.pk, s.pks())))
        return deliver(chunk, targets)

    s.provider.script = script
    return seen


def test_once_the_guard_has_passed_each_chunk_goes_out_before_the_one_before_is_sorted(make) -> None:
    s = make(60, prune_confirmed=True)
    seen = _sorted_when_sent(s)
    assert s.run() == StopReason.DONE
    assert seen == [0, 0, 20]
    s.refresh()
    assert s.shard.status == Shard.Status.DONE and (s.campaign.sent, s.campaign.delivered) == (60, 60)


def test_while_the_guard_judges_the_first_answers_each_chunk_waits_for_the_one_before(make) -> None:
    s = make(60)  # CAMPAIGN_PRUNE_GUARD_MIN (200) is more than the campaign: the guard judges all run
    seen = _sorted_when_sent(s)
    assert s.run() == StopReason.DONE
    assert seen == [0, 20, 40]


@OPERATOR_MEANWHILE
def test_a_pause_with_a_chunk_in_flight_sorts_it_and_sends_nothing_more(make) -> None:
    s = make(60, prune_confirmed=True)
    s.provider.script = _then(deliver, lambda: control.pause(s.client, s.campaign.pk, "by request"), at=1)
    assert s.run() == StopReason.PAUSED
    assert len(s.provider.chunks) == 2
    s.refresh()
    assert s.shard.status == Shard.Status.PAUSED and s.shard.device_ids == sorted(s.pks()[40:])
    assert s.campaign.delivered == 40


def test_credentials_rejected_with_a_chunk_in_flight_sort_both_and_pause(make) -> None:
    s = make(60, answer(Outcome.AUTH_FAILURE, 401, "THIRD_PARTY_AUTH_ERROR"), prune_confirmed=True)
    assert s.run() == StopReason.AUTH_FAILED
    assert len(s.provider.chunks) == 2, "the chunk sent before the first answers came is the only extra"
    s.refresh()
    assert s.campaign.status == Campaign.Status.PAUSED and "credentials" in s.campaign.status_reason
    assert s.shard.status == Shard.Status.PAUSED and s.shard.device_ids == sorted(s.pks()[40:])
    held = Shard.objects.get(campaign=s.campaign, is_child=True)
    assert held.device_ids == sorted(s.pks()[:40]), "both chunks are sent again on resume"
    assert s.campaign.delivered == 0 and s.campaign.failed == 0
    assert DeviceToken.objects.filter(pk__in=s.pks(), is_active=True).count() == 60


def test_redis_lost_with_a_chunk_in_flight_records_both(make) -> None:
    s = make(60, prune_confirmed=True)
    flaky = FlakyRedis(s.client)
    s.provider.script = _then(deliver, lambda: setattr(flaky, "down", True), at=1)
    assert s.run(client=flaky) == StopReason.REDIS_LOST
    assert len(s.provider.chunks) == 2
    s.refresh()
    assert s.shard.status == Shard.Status.PENDING and s.shard.device_ids == sorted(s.pks()[40:])
    assert (s.campaign.sent, s.campaign.delivered) == (40, 40), "recorded in PostgreSQL"


def test_a_resume_before_the_record_sends_the_held_devices_again(make) -> None:
    # The operator resumed between the run's pause and its record (found by the fault suite: the
    # held devices' shard, written after the resume had unparked everything, stayed parked).
    s = make(60, answer(Outcome.AUTH_FAILURE, 401, "THIRD_PARTY_AUTH_ERROR"))

    def resumed_then_recorded(*args: Any, **kwargs: Any) -> Any:
        Campaign.objects.filter(pk=s.campaign.pk).update(status=Campaign.Status.RUNNING, status_reason="")
        control.set_flag(s.client, s.campaign.pk, control.RUNNING)
        return apply_shard_run(*args, **kwargs)

    assert s.run(record=resumed_then_recorded) == StopReason.AUTH_FAILED
    held = Shard.objects.get(campaign=s.campaign, is_child=True)
    assert held.status == Shard.Status.PENDING and held.device_ids == sorted(s.pks()[:20])
    s.refresh()
    assert s.shard.status == Shard.Status.PENDING
    assert {shard for shard, _, _ in s.published} == {s.shard.pk, held.pk}


@OPERATOR_MEANWHILE
def test_credentials_rejected_before_a_resume_do_not_pause_the_resumed_campaign(make) -> None:
    # Another run paused the campaign for its credentials and the operator fixed them and resumed,
    # all while this run's chunk was on the wire with the old ones (found by the fault suite: the
    # late answer paused the campaign again).
    s = make(60, answer(Outcome.AUTH_FAILURE, 401, "THIRD_PARTY_AUTH_ERROR"))

    def paused_and_resumed() -> None:
        control.pause(s.client, s.campaign.pk, "credentials rejected elsewhere")
        control.resume(s.client, s.campaign.pk)

    s.provider.script = _then(s.provider.script, paused_and_resumed)
    assert s.run() == StopReason.AUTH_FAILED
    s.refresh()
    assert s.campaign.status == Campaign.Status.RUNNING and s.campaign.resumes == 1
    held = Shard.objects.get(campaign=s.campaign, is_child=True)
    assert held.status == Shard.Status.PENDING and held.device_ids == sorted(s.pks()[:20])
    assert s.shard.status == Shard.Status.PENDING, "handed back at once, to be sent with the new credentials"
    assert {shard for shard, _, _ in s.published} == {s.shard.pk, held.pk}

    # A run that loaded the resumed campaign and meets rejected credentials pauses it as before.
    s.provider.script = answer(Outcome.AUTH_FAILURE, 401, "THIRD_PARTY_AUTH_ERROR")
    assert s.run() == StopReason.AUTH_FAILED
    s.refresh()
    assert s.campaign.status == Campaign.Status.PAUSED and "credentials" in s.campaign.status_reason


# --- waits: slept briefly, deferred when long -----------------------------------------------------
def test_an_open_breaker_defers_the_shard_instead_of_sleeping(make, settings) -> None:
    settings.BREAKER_OPEN_S = 2.0
    s = make(60, answer(Outcome.RETRY, 503, "UNAVAILABLE"))
    assert s.run(sleep_max_s=0.5) == StopReason.DEFERRED
    assert len(s.provider.chunks) == 1 and s.clock.sleeps == []
    s.refresh()
    assert s.shard.status == Shard.Status.PENDING and s.shard.device_ids == sorted(s.pks()[20:])
    assert s.shard.not_before is not None
    requeued = [p for p in s.published if p[0] == s.shard.pk]
    assert len(requeued) == 1 and 2.0 <= requeued[0][2] <= 3.0, "the breaker's wait, spread"
    outage = Shard.objects.get(campaign=s.campaign, is_child=True)
    assert outage.attempt == 0, "an outage spends no attempt"


def test_a_provider_down_for_too_long_pauses_the_campaign(make, settings) -> None:
    settings.BREAKER_OPEN_S = 2.0
    s = make(60, answer(Outcome.RETRY, 503, "UNAVAILABLE"))
    assert s.run(sleep_max_s=10.0, pause_after_s=1e-6) == StopReason.BREAKER_PAUSED
    assert s.clock.sleeps and s.clock.sleeps[0] <= 2.0, "the first short wait is slept in place"
    s.refresh()
    assert s.campaign.status == Campaign.Status.PAUSED and "failed every request" in s.campaign.status_reason


def test_a_long_wait_for_the_rate_defers_and_gives_the_tokens_back(make) -> None:
    s = make(200)
    assert s.run(chunk_size=100, provider_rate=10.0) == StopReason.DEFERRED
    assert len(s.provider.chunks) == 1 and s.clock.sleeps == []
    s.refresh()
    assert s.shard.status == Shard.Status.PENDING and len(s.shard.device_ids) == 100
    [(shard_id, _, countdown)] = s.published
    assert shard_id == s.shard.pk and countdown > 5


def test_a_short_wait_is_slept_and_the_lease_checked_again(make) -> None:
    s = make(40)
    # The bucket's debt after the first chunk is ~1 s at 20/s: slept in place (fake clock); the
    # lease is taken by another run meanwhile, so the run stops before sending again.
    s.clock.on_sleep = lambda: s.client.set(idempotency.lease_key(s.shard.pk), "another-run", ex=60)
    assert s.run(provider_rate=20.0, sleep_max_s=5.0) == StopReason.LEASE_LOST
    assert len(s.provider.chunks) == 1 and len(s.clock.sleeps) == 1 and 0 < s.clock.sleeps[0] <= 5.0
    s.refresh()
    assert s.shard.status == Shard.Status.PENDING and s.campaign.sent == 0, "recorded nothing"


# --- lost the lease or Redis ----------------------------------------------------------------------
def test_a_run_that_lost_its_lease_records_nothing_and_its_deliveries_are_in_the_bitmap(make) -> None:
    s = make(60)
    s.provider.script = _then(
        deliver, lambda: s.client.set(idempotency.lease_key(s.shard.pk), "another-run", ex=60)
    )
    assert s.run() == StopReason.LEASE_LOST
    assert len(s.provider.chunks) == 1
    s.refresh()
    assert s.shard.status == Shard.Status.PENDING and s.campaign.sent == 0
    assert idempotency.finished(s.client, s.campaign.pk, s.pks()) == set(s.pks()[:20])
    assert s.client.get(idempotency.lease_key(s.shard.pk)) == b"another-run", "not released: not ours"


def test_redis_lost_mid_run_records_what_was_sent_and_leaves_the_rest_pending(make) -> None:
    s = make(60)
    flaky = FlakyRedis(s.client)
    s.provider.script = _then(deliver, lambda: setattr(flaky, "down", True))
    assert s.run(client=flaky) == StopReason.REDIS_LOST
    assert len(s.provider.chunks) == 1
    s.refresh()
    assert s.shard.status == Shard.Status.PENDING and s.shard.device_ids == sorted(s.pks()[20:])
    assert (s.campaign.sent, s.campaign.delivered) == (20, 20), "recorded in PostgreSQL"


@OPERATOR_MEANWHILE
def test_redis_emptied_mid_run_records_what_was_sent_instead_of_leaving_it_to_a_blind_re_run(make) -> None:
    s = make(60)
    # A flush (or a restart without persistence): the lease, its registration and the bitmap are
    # gone, so a re-run could not tell what this run delivered.
    s.provider.script = _then(deliver, lambda: s.client.flushdb())
    assert s.run() == StopReason.REDIS_LOST
    assert len(s.provider.chunks) == 1
    s.refresh()
    assert s.shard.status == Shard.Status.PENDING and s.shard.device_ids == sorted(s.pks()[20:])
    assert (s.campaign.sent, s.campaign.delivered) == (20, 20), "recorded in PostgreSQL"


@OPERATOR_MEANWHILE
def test_a_run_whose_shard_another_run_recorded_meanwhile_records_nothing(make) -> None:
    s = make(60)

    def another_run_took_it_recorded_part_and_released() -> None:
        s.client.delete(idempotency.lease_key(s.shard.pk), leases.REGISTER_KEY)
        Shard.objects.filter(pk=s.shard.pk).update(device_ids=s.pks()[30:])

    s.provider.script = _then(deliver, another_run_took_it_recorded_part_and_released)
    assert s.run() == StopReason.REDIS_LOST
    s.refresh()
    assert s.shard.device_ids == s.pks()[30:], "the other run's record stands"
    assert s.campaign.sent == 0, "nothing counted twice"
    assert idempotency.finished(s.client, s.campaign.pk, s.pks()) == set(s.pks()[:20]), "in the bitmap"


def test_run_shard_raises_after_recording_when_redis_was_lost(make, monkeypatch, settings) -> None:
    """The Celery task's entry point turns REDIS_LOST into an error, so the task retries."""
    from campaigns.sending import run as run_module

    settings.CAMPAIGN_CHUNK_SIZE = 20  # run_shard reads the settings
    s = make(60)
    flaky = FlakyRedis(s.client)
    s.provider.script = _then(deliver, lambda: setattr(flaky, "down", True))
    monkeypatch.setattr(run_module.runtime, "redis_client", lambda: flaky)
    monkeypatch.setattr(run_module.runtime, "provider_for", lambda app, platform: s.provider)
    with pytest.raises(redis.ConnectionError):
        run_module.run_shard(s.shard.pk)
    s.refresh()
    assert s.campaign.delivered == 20 and s.shard.status == Shard.Status.PENDING


# --- the policy ------------------------------------------------------------------------------------
def test_retry_delay_backs_off_with_jitter_capped_and_never_below_retry_after(settings) -> None:
    settings.CAMPAIGN_RETRY_BASE_S, settings.CAMPAIGN_RETRY_MAX_S = 2.0, 60.0
    for attempt, base in ((1, 2.0), (2, 4.0), (3, 8.0), (10, 60.0)):
        assert policy.min_retry_delay(attempt, 0.0) == base / 2
        assert base / 2 <= policy.retry_delay(attempt, 0.0) <= base
    assert policy.retry_delay(1, 90.0) == 90.0, "Retry-After above the cap is honoured"
    now = 1_000_000.0
    assert policy.before_deadline(50.0, 5.0, int(now) + 20, now) == 19.0
    assert policy.before_deadline(50.0, 30.0, int(now) + 20, now) == 30.0, "the floor wins"
    assert 10.0 <= policy.defer_delay(10.0) <= 15.0
