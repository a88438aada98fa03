"""The hygiene tasks through a real Celery worker (and beat) on the test database and Redis db."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection
from django.utils import timezone

from tokens.models import DeviceToken
from tokens.tasks import prune_inactive, sweep_stale
from tokens.testing import apns_token, make_app

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parent.parent
CELERY = str(Path(sys.executable).with_name("celery"))


def _database_url() -> str:
    db = connection.settings_dict
    user = db.get("USER") or "postgres"
    return f"postgres://{user}@{db.get('HOST') or '127.0.0.1'}:{db.get('PORT') or 5432}/{db['NAME']}"


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DATABASE_URL=_database_url(), REDIS_URL=settings.REDIS_URL, CELERY_BROKER_URL=settings.REDIS_URL
    )
    env.update(extra)
    return env


def _start(args: list[str], tmp_path: Path, name: str, **env: str) -> subprocess.Popen:
    log = (tmp_path / f"{name}.log").open("wb")
    return subprocess.Popen(
        [CELERY, "-A", "pushsvc", *args],
        cwd=ROOT,
        env=_env(**env),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _worker(tmp_path: Path, **env: str) -> subprocess.Popen:
    return _start(
        ["worker", "-Q", "default", "-P", "solo", "--without-mingle", "--without-gossip", "-n", "hygiene@%h"],
        tmp_path,
        "worker",
        **env,
    )


def _wait_for(
    check: Callable[[], bool], timeout: float, procs: list[subprocess.Popen], tmp_path: Path
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        for proc in procs:
            assert proc.poll() is None, _logs(tmp_path)
        time.sleep(0.1)  # polling interval of a deadline loop, not a synchronisation stand-in
    pytest.fail(f"condition not met within {timeout} s\n{_logs(tmp_path)}")


def _logs(tmp_path: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in tmp_path.glob("*.log"))


def _row(app, **fields) -> DeviceToken:
    return DeviceToken.objects.create(
        app=app, device_id=uuid.uuid4(), platform="ios", token=apns_token(), **fields
    )


def test_prune_and_sweep_tasks_run_in_a_worker(redis_client, tmp_path):
    app = make_app()
    now = timezone.now()
    doomed = _row(app, is_active=False, deactivated_at=now - timedelta(days=31))
    young = _row(app, is_active=False, deactivated_at=now - timedelta(days=29))
    stale = _row(app, last_seen=now - timedelta(days=91))
    fresh = _row(app, last_seen=now - timedelta(days=89))

    worker = _worker(tmp_path)
    try:
        prune_inactive.apply_async(queue="default")
        sweep_stale.apply_async(queue="default")
        _wait_for(
            lambda: (
                not DeviceToken.objects.filter(pk=doomed.pk).exists()
                and DeviceToken.objects.filter(
                    pk=stale.pk, is_active=False, deactivation_reason="stale"
                ).exists()
            ),
            120,  # a deadline only (a loaded machine starts a worker slowly)
            [worker],
            tmp_path,
        )
    finally:
        _stop(worker)
    assert DeviceToken.objects.filter(pk=young.pk).exists()
    assert DeviceToken.objects.get(pk=fresh.pk).is_active


def test_beat_schedules_the_nightly_prune_and_the_daily_sweep_only():
    """Beat runs the two hygiene jobs at their UTC times on the default queue, and of tokens/ only
    the webhook outbox's flush besides (invalidations are applied in each shard's transaction, no
    beat job drains them)."""
    from celery.schedules import crontab

    from pushsvc.celery import app as celery_app

    tokens_entries = {
        name: entry
        for name, entry in settings.CELERY_BEAT_SCHEDULE.items()
        if entry["task"].startswith("tokens.")
    }
    assert set(tokens_entries) == {"tokens-prune-inactive", "tokens-sweep-stale", "tokens-flush-webhooks"}
    prune, sweep = tokens_entries["tokens-prune-inactive"], tokens_entries["tokens-sweep-stale"]
    assert (prune["task"], sweep["task"]) == ("tokens.prune_inactive", "tokens.sweep_stale")
    hour, _, minute = settings.HYGIENE_PRUNE_AT.partition(":")
    assert prune["schedule"] == crontab(hour=int(hour), minute=int(minute))
    hour, _, minute = settings.HYGIENE_SWEEP_AT.partition(":")
    assert sweep["schedule"] == crontab(hour=int(hour), minute=int(minute))
    assert prune["options"]["queue"] == sweep["options"]["queue"] == "default"
    # The tasks beat names exist in the worker's registry.
    celery_app.loader.import_default_modules()
    assert {name for name in celery_app.tasks if name.startswith("tokens.")} == {
        "tokens.prune_inactive",
        "tokens.sweep_stale",
        "tokens.flush_webhooks",
        "tokens.deliver_webhook",
    }
