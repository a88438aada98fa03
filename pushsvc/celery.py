"""The Celery application. Queues, routes and retry policy live in settings (CELERY_*)."""

import os

from celery import Celery
from celery.signals import task_prerun, worker_init

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pushsvc.settings")

app = Celery("pushsvc")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


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
