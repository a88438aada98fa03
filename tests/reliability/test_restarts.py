"""Redis and PostgreSQL restarted mid-campaign. The machine's shared servers are never touched:
each test starts a private server, runs the campaign scenario (scenario_restart.py) in a pytest
process of its own whose DATABASE_URL or REDIS_URL points at it, and the scenario restarts the
server when a fifth of the campaign is delivered.

Redis here keeps nothing on disk unless told to (no RDB, no AOF), so a restart empties the broker's
queues and the unacked set and the campaign's Redis state (control flag, idempotency bitmap,
buckets). See docs/reliability.md for what that means and what the AOF variant shows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from django.conf import settings

from tests.reliability.services import PrivatePostgres, PrivateRedis

pytestmark = [pytest.mark.timeout(600)]


def _scenario(env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-s"]
    cmd += ["tests/reliability/scenario_restart.py", "-o", "python_files=scenario_*.py"]
    result = subprocess.run(
        cmd, cwd=settings.BASE_DIR, env={**os.environ, **env}, capture_output=True, text=True, timeout=560
    )
    summary = [line for line in result.stdout.splitlines() if line.startswith("RESULT")]
    print("\n".join(summary) or result.stdout[-3000:])
    return result


def _redis_restart(appendonly: bool) -> subprocess.CompletedProcess:
    server = PrivateRedis(appendonly=appendonly).start()
    try:
        info = {"port": server.port, "appendonly": appendonly, "dir": str(server.dir)}
        return _scenario(
            {
                "REDIS_URL": server.url,
                "CELERY_BROKER_URL": server.url,
                "RELIABILITY_RESTART": "redis",
                "RELIABILITY_SERVICE": json.dumps(info),
            }
        )
    finally:
        server.stop()


def test_redis_restart_with_aof_loses_nothing() -> None:
    result = _redis_restart(appendonly=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_redis_restart_without_persistence_loses_nothing() -> None:
    result = _redis_restart(appendonly=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_postgres_restart_mid_campaign_loses_nothing() -> None:
    server = PrivatePostgres().start()
    try:
        info = {"port": server.port, "dir": str(server.dir), "bin": str(server.bin)}
        result = _scenario(
            {
                "DATABASE_URL": server.url,
                "RELIABILITY_RESTART": "postgres",
                "RELIABILITY_SERVICE": json.dumps(info),
            }
        )
    finally:
        server.stop()
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
