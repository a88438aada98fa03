"""How many messages wait in a Celery queue, whichever broker carries them (settings.CELERY_BROKER_URL).

Both counts are of messages ready for a consumer, not of those delivered and not yet acknowledged:
- Redis (kombu's transport): one list per queue and priority step (step 0 is the plain name);
  the unacknowledged ones sit in the transport's unacked hash, not counted.
- RabbitMQ: a passive queue.declare answers the queue's ready count (RabbitMQ counts the
  unacknowledged ones apart). A queue that does not exist (a broker that lost its definitions)
  holds nothing. One short connection per call: the callers (the recovery sweep, a metrics scrape)
  ask every few seconds at most.
"""

from __future__ import annotations

from collections.abc import Iterable

import redis
from django.conf import settings
from kombu import Connection

# kombu's Redis transport keeps one list per queue and priority step (0 is the plain name).
REDIS_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")
CONNECT_TIMEOUT_S = 5


def ready_counts(queues: Iterable[str], redis_broker: redis.Redis | None = None) -> dict[str, int]:
    """{queue: messages waiting}. `redis_broker` is the broker's Redis database (Redis broker only)."""
    names = list(dict.fromkeys(queues))
    if settings.BROKER_IS_RABBITMQ:
        return _amqp_ready_counts(names)
    if redis_broker is None:
        raise ValueError("a Redis broker's database is needed to count its queues")
    pipe = redis_broker.pipeline(transaction=False)
    for queue in names:
        for suffix in REDIS_PRIORITY_SUFFIXES:
            pipe.llen(queue + suffix)
    lengths = pipe.execute()
    step = len(REDIS_PRIORITY_SUFFIXES)
    return {queue: sum(lengths[i * step : (i + 1) * step]) for i, queue in enumerate(names)}


def _amqp_ready_counts(queues: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    with Connection(settings.CELERY_BROKER_URL, connect_timeout=CONNECT_TIMEOUT_S) as conn:
        conn.ensure_connection(max_retries=1)
        channel = conn.channel()
        try:
            for queue in queues:
                try:
                    counts[queue] = channel.queue_declare(queue=queue, passive=True).message_count
                except conn.channel_errors as exc:
                    if getattr(exc, "code", None) != 404:
                        raise
                    counts[queue] = 0  # no such queue: nothing waits in it
                    channel = conn.channel()  # a channel error closed the channel
        finally:
            channel.close()
    return counts
