"""RabbitMQ as the broker (`make test-rabbitmq`): how pushsvc declares and publishes, and what the
recovery sweep reads from it.

- Every task queue a worker declares is a durable quorum queue (a worker declares them all at
  start, pushsvc/celery.py, including those it does not consume), read back from the broker.
- Publishing waits for the broker's confirm: a message RabbitMQ refuses (a queue over its length
  limit with `reject-publish`) makes the app's publish raise, where an unconfirmed publish of the
  same message returns as if it had been queued.
- A countdown is never due early, and one under a second is published (rounded up to whole
  seconds, pushsvc/celery.py) where Celery's native delayed delivery refused it.
- The recovery sweep counts RabbitMQ's messages (delivery/broker.py): a lost shard is published
  again only when its queue holds nothing; under the Redis code it read an empty Redis list for
  every queue and published every pending shard past the grace on every sweep.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta

import amqp
import pytest
from celery import current_app
from django.conf import settings
from django.utils import timezone
from kombu import Connection, Producer, Queue

from campaigns import recovery
from campaigns.models import Campaign, Shard
from campaigns.testing import purge_rabbitmq, rabbitmq_vhost, rabbitmqctl, wait_for
from delivery import broker, idempotency
from tokens.testing import make_app

pytestmark = pytest.mark.django_db(transaction=True)


def test_every_task_queue_is_a_durable_quorum_queue(start_worker) -> None:
    assert settings.BROKER_IS_RABBITMQ
    start_worker(queues=("default",), concurrency=1)  # declares every task queue, not just `default`

    listed = rabbitmqctl(
        "list_queues", "-p", rabbitmq_vhost(), "name", "type", "durable", "--quiet", "--no-table-headers"
    )
    types = {name: (kind, durable) for name, kind, durable in (line.split() for line in listed.splitlines())}
    for name in settings.TASK_QUEUE_NAMES:
        assert types.get(name) == ("quorum", "true"), (name, types.get(name))

    # The broker says so to a client too: declaring a send queue as classic is refused.
    with Connection(settings.CELERY_BROKER_URL) as conn:
        classic = Queue("apns", settings.TASK_EXCHANGE, routing_key="apns", durable=True,
                        queue_arguments={"x-queue-type": "classic"})  # fmt: skip
        with pytest.raises(amqp.exceptions.PreconditionFailed, match=r"x-queue-type.*quorum"):
            classic.bind(conn.channel()).declare()


def test_publishes_wait_for_the_broker_confirm(redis_client) -> None:
    name = "pushsvc-test-confirms"
    limited = {"x-queue-type": "quorum", "x-max-length": 1, "x-overflow": "reject-publish"}
    full = Queue(name, settings.TASK_EXCHANGE, routing_key=name, durable=True, queue_arguments=limited)
    with Connection(settings.CELERY_BROKER_URL) as conn:
        channel = conn.channel()
        full.bind(channel).delete()
        full.bind(channel).declare()
        try:
            # Without confirms a publisher cannot tell: these return whether or not the queue took them.
            plain = Producer(channel)
            for _ in range(3):
                plain.publish({"n": 1}, exchange=settings.TASK_EXCHANGE, routing_key=name)
            # The app's publish (settings: confirm_publish) waits for the answer, and RabbitMQ refuses.
            with pytest.raises(Exception) as refused:
                current_app.send_task("pushsvc.test.refused", queue=full)
            assert isinstance(refused.value.__cause__ or refused.value, amqp.exceptions.MessageNacked), repr(
                refused.value
            )
        finally:
            full.bind(conn.channel()).delete()


def _shard(campaign: Campaign, queue: str, age_s: float) -> Shard:
    return Shard.objects.create(
        campaign=campaign, platform="ios", queue=queue, lo=0, hi=10, planned=10,
        created_at=timezone.now() - timedelta(seconds=age_s),
    )  # fmt: skip


def _queued_shards(queue: str) -> list[int]:
    """Take the messages off a queue; the first argument of each (a send_shard message's shard id;
    Celery protocol 2 bodies are [args, kwargs, embed])."""
    ids = []
    with Connection(settings.CELERY_BROKER_URL) as conn:
        channel = conn.channel()
        while (message := channel.basic_get(queue, no_ack=True)) is not None:
            args = json.loads(message.body)[0]
            ids.append(args[0] if args else None)
    return ids


def test_recovery_reads_rabbitmq_queue_counts(redis_client) -> None:
    purge_rabbitmq()
    for queue in settings.CELERY_TASK_QUEUES:  # as a worker declares them
        with Connection(settings.CELERY_BROKER_URL) as conn:
            queue.bind(conn.channel()).declare()
    campaign = Campaign.objects.create(
        app=make_app(), message={"title": "x"}, status=Campaign.Status.RUNNING, planned=True
    )
    grace = recovery.grace_s()
    lost = _shard(campaign, "apns", grace + 60)
    leased = _shard(campaign, "apns", grace + 60)
    _shard(campaign, "fcm", grace + 60)  # behind a queued message: left alone
    redis_client.set(idempotency.lease_key(leased.pk), "someone")
    current_app.send_task("pushsvc.test.still-queued", queue="fcm")  # fcm still has work in order

    assert broker.ready_counts(["apns", "fcm", "no-such-queue"]) == {"apns": 0, "fcm": 1, "no-such-queue": 0}
    assert recovery.republish_lost(redis_client) == 1
    assert broker.ready_counts(["apns", "fcm"]) == {"apns": 1, "fcm": 1}
    assert _queued_shards("apns") == [lost.pk]
    # A second sweep with the message still queued publishes nothing more (it did every sweep).
    current_app.send_task("pushsvc.test.still-queued", queue="apns")
    assert recovery.republish_lost(redis_client) == 0
    assert _queued_shards("fcm") == [None], "behind was left alone: fcm had work in order"
    purge_rabbitmq()


def test_a_countdown_under_a_second_is_published_and_never_early(redis_client) -> None:
    """Native delayed delivery (countdowns on quorum queues) delays in whole seconds and refused a
    delay under one (ValueError at publish); pushsvc/celery.py rounds up instead."""
    from kombu.transport.native_delayed_delivery import (
        bind_queue_to_native_delayed_delivery_exchange,
        declare_native_delayed_delivery_exchanges_and_queues,
    )

    purge_rabbitmq()
    apns = current_app.amqp.queues["apns"]
    with Connection(settings.CELERY_BROKER_URL) as conn:  # what a worker's start sets up
        apns.bind(conn.default_channel).declare()
        declare_native_delayed_delivery_exchanges_and_queues(conn, "quorum")
        bind_queue_to_native_delayed_delivery_exchange(conn, apns)

    published = time.monotonic()
    current_app.send_task("pushsvc.test.soon", args=[1], queue="apns", countdown=0.3)
    current_app.send_task("pushsvc.test.later", args=[2], queue="apns", countdown=1.4)
    assert broker.ready_counts(["apns"])["apns"] == 0, "not before its countdown"
    wait_for(lambda: broker.ready_counts(["apns"])["apns"] == 1, 10, 0.05, "the 0.3 s message (after 1 s)")
    first = time.monotonic() - published
    wait_for(lambda: broker.ready_counts(["apns"])["apns"] == 2, 10, 0.05, "the 1.4 s message (after 2 s)")
    second = time.monotonic() - published
    assert first >= 0.3 and second >= 1.4, (first, second)
    assert sorted(_queued_shards("apns")) == [1, 2]
    purge_rabbitmq()
