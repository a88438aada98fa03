"""Two beats firing the nightly prune at the same moment: the job runs once.

Two `tokens.prune_inactive` messages reach a worker with two pool processes at once (what two
beat processes, or a beat restarted mid-tick, produce). The hygiene job lock (tokens/hygiene.py,
Redis) lets one run; the other returns at once with `locked_out`. The prunable rows are many small
batches so the first run is still going when the second starts.
"""

from __future__ import annotations

import ast
import re
from datetime import timedelta

import pytest
from django.utils import timezone

from campaigns.testing import wait_for
from tokens.models import DeviceToken
from tokens.tasks import prune_inactive
from tokens.testing import make_app

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(180)]

SUCCEEDED = re.compile(r"Task tokens\.prune_inactive\[[^\]]+\] succeeded in [0-9.]+s: (\{.*\})")


def test_two_beats_at_once_prune_once(start_worker) -> None:
    app = make_app()
    old = timezone.now() - timedelta(days=40)
    DeviceToken.objects.bulk_create(
        [
            DeviceToken(
                app=app,
                device_id=f"00000000-0000-4000-8000-{i:012d}",
                platform="android",
                token=f"tok-{i}",
                token_hash=DeviceToken.hash_token(f"tok-{i}"),
                is_active=False,
                deactivated_at=old,
            )
            for i in range(20_000)
        ],
        batch_size=5000,
    )
    worker = start_worker(
        queues=["default"], concurrency=2, env={"HYGIENE_BATCH_SIZE": "200", "LOG_LEVEL": "INFO"}
    )
    prune_inactive.apply_async(queue="default")
    prune_inactive.apply_async(queue="default")

    def summaries():
        found = [ast.literal_eval(m.group(1)) for m in SUCCEEDED.finditer(worker.log_file.read_text())]
        return found if len(found) == 2 else None

    runs = wait_for(summaries, 150, 0.2, "both prune tasks to finish")
    ran = [r for r in runs if not r["locked_out"]]
    locked_out = [r for r in runs if r["locked_out"]]
    print(f"\nbeat twice: {[(r['changed'], r['locked_out'], r['seconds']) for r in runs]}")
    assert len(ran) == 1 and len(locked_out) == 1, runs
    assert ran[0]["changed"] == 20_000 and locked_out[0]["changed"] == 0
    assert not DeviceToken.objects.filter(app=app).exists()
