"""The Celery application. Queues, routes and retry policy live in settings (CELERY_*)."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pushsvc.settings")

app = Celery("pushsvc")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
