"""Real concurrency against PostgreSQL: threads, each on its own database connection, start each
round together on a barrier. Two upserts of one device never make two rows; devices racing for
one token end with exactly one row holding it."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable

import pytest
from django.db import connection

from tokens.models import DeviceToken
from tokens.registry import upsert_device
from tokens.testing import apns_token, make_app
from tokens.validation import validate_registration

pytestmark = pytest.mark.django_db(transaction=True)

THREADS = 8
ROUNDS = 40


def run_together(jobs: list[Callable[[], object]]) -> list[object]:
    """Run the jobs in threads released at the same instant; re-raise the first failure."""
    barrier = threading.Barrier(len(jobs))
    results: list[object] = [None] * len(jobs)
    errors: list[BaseException] = []

    def worker(index: int, job: Callable[[], object]) -> None:
        try:
            connection.ensure_connection()  # connect before the barrier: race the upserts only
            barrier.wait(timeout=30)
            results[index] = job()
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker, args=(i, job)) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
        assert not thread.is_alive(), "an upsert hung"
    if errors:
        raise errors[0]
    return results


def upsert(app_id: int, device_id: str, token: str, user_id: str = "") -> Callable[[], object]:
    body = {"device_id": device_id, "platform": "ios", "token": token, "user_id": user_id}
    reg = validate_registration(body)
    return lambda: upsert_device(app_id, reg)


def test_concurrent_upserts_of_one_device_make_one_row():
    app = make_app()
    for _ in range(ROUNDS):
        device = str(uuid.uuid4())
        results = run_together([upsert(app.pk, device, apns_token(), f"u{i}") for i in range(THREADS)])
        rows = list(DeviceToken.objects.filter(app=app, device_id=device).values_list("id", "token"))
        assert len(rows) == 1
        # Exactly one of the racers inserted; the others updated that row.
        assert sum(r.created for r in results) == 1
        assert {r.id for r in results} == {rows[0][0]}


def test_devices_racing_for_one_token_end_with_one_row():
    app = make_app()
    for _ in range(ROUNDS):
        token = apns_token()
        devices = [str(uuid.uuid4()) for _ in range(THREADS)]
        run_together([upsert(app.pk, device, token) for device in devices])
        holders = list(
            DeviceToken.objects.filter(app=app, token_hash=DeviceToken.hash_token(token)).values_list(
                "device_id", flat=True
            )
        )
        assert len(holders) == 1
        assert str(holders[0]) in devices


def test_token_moves_and_rotations_interleaved_stay_consistent():
    """Half the racers move a shared token between devices, half rotate those devices to fresh
    tokens: whatever the interleaving, no token or device appears twice, and the shared token is
    held at most once (none holds it when its last taker's rotation to a fresh token came after)."""
    app = make_app()
    devices = [str(uuid.uuid4()) for _ in range(THREADS)]
    for _ in range(ROUNDS):
        shared = apns_token()
        jobs = [
            upsert(app.pk, device, shared if i % 2 == 0 else apns_token()) for i, device in enumerate(devices)
        ]
        jobs += [upsert(app.pk, device, shared) for device in devices[1::2]]
        run_together(jobs)
        rows = list(DeviceToken.objects.filter(app=app).values_list("device_id", "token_hash"))
        assert len({d for d, _ in rows}) == len(rows)
        assert len({t for _, t in rows}) == len(rows)
        assert sum(1 for _, t in rows if t == DeviceToken.hash_token(shared)) <= 1
