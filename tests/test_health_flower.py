"""Flower, as the Procfile and `make flower` start it, sees a real worker and its six queues."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request

import pytest
from django.conf import settings

from campaigns.testing import BASE_DIR, CeleryWorker, wait_for

QUEUES = {"default", "priority", "apns", "fcm", "hms", "webpush"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> object:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())
    except OSError:
        return None


@pytest.fixture
def flower(redis_client):
    port = _free_port()
    env = {**os.environ, "REDIS_URL": settings.REDIS_URL, "FLOWER_UNAUTHENTICATED_API": "true"}
    log = open(BASE_DIR / "var" / "flower-test.log", "wb")  # noqa: SIM115  (closed below)
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "pushsvc", "flower", "--address=127.0.0.1", f"--port={port}"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=BASE_DIR,
        start_new_session=True,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
        log.close()


def test_flower_lists_the_worker_and_its_queues(flower: str) -> None:
    worker = CeleryWorker(
        env={"REDIS_URL": settings.REDIS_URL, "CELERY_BROKER_URL": settings.CELERY_BROKER_URL}
    )
    with worker:

        def listed() -> dict | None:
            workers = _get(f"{flower}/api/workers?refresh=1") or {}
            mine = [info for name, info in workers.items() if name.startswith(worker.name + "@")]
            return mine[0] if mine and mine[0].get("active_queues") else None

        info = wait_for(listed, 90, 0.5, "Flower to list the worker")
        assert {q["name"] for q in info["active_queues"]} == QUEUES
        lengths = _get(f"{flower}/api/queues/length")
        assert {q["name"] for q in lengths["active_queues"]} == QUEUES
