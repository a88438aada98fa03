"""The Celery application. Queues, routes and retry policy live in settings (CELERY_*)."""

import gc
import math
import os
from typing import Any

from celery import Celery
from celery.signals import task_prerun, worker_init, worker_process_init

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pushsvc.settings")


class PushsvcCelery(Celery):
    def send_task(self, *args: Any, **kwargs: Any) -> Any:
        # RabbitMQ: on quorum queues a countdown goes through Celery's native delayed delivery,
        # which delays in whole seconds: it truncates (a 1.9 s retry would be due at 1 s, before
        # the provider's Retry-After) and refuses a delay under one second (ValueError from
        # kombu's calculate_routing_key: a 0.4 s lease re-check or a test's 0.2 s retry would fail
        # to publish). Rounded up here, for every publish (send_task and apply_async), so a message
        # is never due before its time. Redis keeps the exact countdown.
        countdown = kwargs.get("countdown")
        if countdown and countdown > 0 and _broker_is_rabbitmq():
            kwargs["countdown"] = float(math.ceil(countdown))
        return super().send_task(*args, **kwargs)


def _broker_is_rabbitmq() -> bool:
    from django.conf import settings

    return settings.BROKER_IS_RABBITMQ


app = PushsvcCelery("pushsvc")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

# A send allocates a few dozen short-lived objects per device; with CPython's default thresholds
# the collector ran a full pass over the whole Django heap every couple of thousand requests
# (15 % of a worker's CPU, perf). Everything alive once the worker is ready is frozen out of the
# collector's sight, and the youngest generation is collected every 50,000 allocations, not 700.
_GC_THRESHOLDS = (50_000, 20, 20)


@worker_init.connect
def _tune_collector(**_: object) -> None:
    # In the parent, before a prefork pool forks: the children inherit both.
    gc.collect()
    gc.freeze()
    gc.set_threshold(*_GC_THRESHOLDS)


@worker_process_init.connect
def _freeze_child_startup(**_: object) -> None:
    gc.freeze()


@task_prerun.connect
def _check_database_connections(**_: object) -> None:
    # Connections outlive tasks (CELERY_DB_REUSE_MAX); like Django at a request's start, drop
    # one that broke or aged out, and health-check the rest on first use.
    from django.db import close_old_connections

    close_old_connections()


@worker_init.connect
def _declare_every_task_queue(**_: object) -> None:
    # RabbitMQ: a worker declares only the queues it consumes, but Celery's native delayed delivery
    # (countdowns on quorum queues) binds every queue of the app at worker start, and one that does
    # not exist yet stays unbound (logged as CRITICAL "Native delayed delivery will not be
    # available"): a countdown message for it (a webhook retry before any webhooks worker ran)
    # would be dropped as unroutable when its delay ends. Declaring them all first (idempotent).
    from django.conf import settings

    if not settings.BROKER_IS_RABBITMQ:
        return
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=3)
        channel = conn.default_channel
        for queue in app.amqp.queues.values():
            queue.bind(channel).declare()
