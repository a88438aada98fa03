"""Cost of the metrics path: the worker-side flush per shard, and one /metrics render.

Usage: DATABASE_URL=... REDIS_URL=... .venv/bin/python bench/metrics.py [--shards 2000] [--apps 10]

Feeds `--shards` shard results (950 delivered, 20 retries, 4 failure tallies each, spread over
apps, providers and 12 reasons) through the same record/flush functions a send task uses, then
renders /metrics 30 times. Creates `bench-metrics-*` apps and deletes them, and removes only the
`pushsvc:metrics:*` keys from Redis (before and after). Prints medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pushsvc.settings")

import django

django.setup()

from django.test import Client  # noqa: E402

from campaigns.sending.ledger import ShardResults  # noqa: E402
from pushsvc import metrics  # noqa: E402
from tokens.models import App  # noqa: E402

OUTCOMES = ("retry", "invalid_token", "rejected", "dead_letter", "auth_failure")
PLATFORMS = ("ios", "android", "huawei", "web")


class _Task:
    name = metrics.SEND_TASK

    class request:
        delivery_info = {"routing_key": "apns"}


def _forget(client) -> None:
    keys = list(client.scan_iter(match=metrics.PREFIX + "*", count=1000))
    if keys:
        client.delete(*keys)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, default=2000)
    parser.add_argument("--apps", type=int, default=10)
    args = parser.parse_args()
    client = metrics._client()
    _forget(client)
    apps = [
        App.objects.get_or_create(slug=f"bench-metrics-{i}", defaults={"name": "bench"})[0]
        for i in range(args.apps)
    ]
    try:
        flushes = []
        for n in range(args.shards):
            results = ShardResults(attempt=0, max_attempts=5)
            results.delivered = list(range(950))
            results.retry = list(range(20))
            results.tallies = Counter(
                {(OUTCOMES[(n + k) % 5], f"Reason{(n * 7 + k) % 12}"): 3 for k in range(4)}
            )
            metrics._task_started(task=_Task)
            metrics.record_shard(apps[n % len(apps)].pk, PLATFORMS[n % 4], results)
            started = time.perf_counter()
            metrics._task_finished(task=_Task)
            flushes.append(time.perf_counter() - started)
        series = client.hlen(metrics.SENDS)
        web = Client()
        renders, size = [], 0
        for _ in range(30):
            started = time.perf_counter()
            response = web.get("/metrics")
            renders.append(time.perf_counter() - started)
            size = len(response.content)
        flushes.sort()
        print(
            f"flush per shard: median {statistics.median(flushes) * 1e3:.2f} ms, "
            f"p95 {flushes[int(len(flushes) * 0.95)] * 1e3:.2f} ms ({args.shards} shards)"
        )
        render_ms = statistics.median(renders) * 1e3
        print(f"/metrics: {series} send series, {size} bytes, render median {render_ms:.1f} ms (30 scrapes)")
    finally:
        _forget(client)
        App.objects.filter(pk__in=[a.pk for a in apps]).delete()


if __name__ == "__main__":
    main()
