"""Celery entry points of the token hygiene jobs (scheduled in settings.CELERY_BEAT_SCHEDULE).

Thin on purpose: the work lives in tokens/hygiene.py, where tests and the
management commands call it directly. Each task returns a small JSON summary for the worker log
and Flower. Re-running any of them (acks_late redelivery, two beats) is harmless.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from celery import shared_task
from django.conf import settings

from . import hygiene, webhooks


def _summary(report: hygiene.JobReport) -> dict[str, Any]:
    data = asdict(report)
    data["cutoff"] = report.cutoff.isoformat()
    return data


@shared_task(name="tokens.prune_inactive")
def prune_inactive() -> dict[str, Any]:
    """Nightly: delete tokens inactive for more than HYGIENE_PRUNE_AFTER_DAYS, then audit rows
    older than HYGIENE_AUDIT_RETENTION_DAYS."""
    summary = _summary(hygiene.prune_inactive())
    summary["audit_rows_deleted"] = hygiene.prune_audit()
    # Finished webhook events are kept as long as the audit, for the admin's delivery history.
    summary["webhook_rows_deleted"] = webhooks.prune(settings.HYGIENE_AUDIT_RETENTION_DAYS)
    return summary


@shared_task(name="tokens.sweep_stale")
def sweep_stale() -> dict[str, Any]:
    """Daily: deactivate tokens not seen for HYGIENE_STALE_AFTER_DAYS."""
    return _summary(hygiene.sweep_stale())


@shared_task(name="tokens.deliver_webhook")
def deliver_webhook(event_id: str) -> str:
    """One delivery attempt of a webhook event (tokens/webhooks.py); re-publishes itself with a
    countdown when the attempt fails and attempts remain."""
    return webhooks.deliver(event_id)


@shared_task(name="tokens.flush_webhooks")
def flush_webhooks() -> int:
    """Beat: publish due webhook events nobody is delivering (the outbox's safety net)."""
    return webhooks.flush_due()
