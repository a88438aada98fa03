"""The hygiene tasks through a real Celery worker (and beat) on the test database and Redis db."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection
from django.utils import timezone

from tokens.feedback import AUDIT_TABLE, Invalidation, publish_invalidations
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


@pytest.fixture
def audit_cleanup() -> Iterator[None]:
    # transaction=True tests end with a flush of the models' tables; the audit table is not one.
    yield
    with connection.cursor() as cursor:
        cursor.execute(f"DELETE FROM {AUDIT_TABLE}")


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


def test_beat_schedule_drains_the_feedback_stream(redis_client, tmp_path, audit_cleanup):
    """Beat fires tokens.drain_feedback on its interval; the worker applies the stream."""
    app = make_app()
    rows = [_row(app) for _ in range(50)]
    publish_invalidations(
        [Invalidation(r.pk, r.token_hash, app.pk, "apns", "Unregistered", campaign_id=5) for r in rows[:40]]
    )
    knobs = {"HYGIENE_FEEDBACK_FLUSH_S": "1"}
    worker = _worker(tmp_path, **knobs)
    beat = _start(
        ["beat", "-s", str(tmp_path / "beat-schedule"), "--pidfile", str(tmp_path / "beat.pid")],
        tmp_path,
        "beat",
        **knobs,
    )
    try:
        _wait_for(
            lambda: DeviceToken.objects.filter(app=app, is_active=False).count() == 40,
            120,  # a deadline only (a loaded machine starts a worker slowly)
            [worker, beat],
            tmp_path,
        )
        _wait_for(lambda: redis_client.xlen("pushsvc:hygiene:feedback") == 0, 120, [worker, beat], tmp_path)
    finally:
        _stop(beat)
        _stop(worker)
    assert set(DeviceToken.objects.filter(app=app, is_active=True).values_list("pk", flat=True)) == {
        r.pk for r in rows[40:]
    }
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM {AUDIT_TABLE} WHERE campaign_id = 5 AND applied")
        assert cursor.fetchone()[0] == 40
