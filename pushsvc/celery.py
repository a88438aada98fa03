"""The Celery application. Queues, routes and retry policy live in settings (CELERY_*)."""

import os

from celery import Celery
from celery.signals import task_prerun

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
