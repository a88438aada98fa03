"""Benchmark: applying invalid-token answers, the nightly prune and the stale sweep on PostgreSQL.

    .venv/bin/python bench/hygiene.py [--rows 1000000] [--invalidations 100000]
        [--database postgres://postgres@127.0.0.1:5432/bench_hygiene] [--redis redis://127.0.0.1:6379/6]

It recreates the benchmark database, migrates it and loads `--rows` tokens with COPY: 30 % inactive
for 31-90 days (prunable), 7 % active but not seen for 91-200 days (stale), the rest active and
fresh. Then, each phase timed on its own:

1. invalidations: `--invalidations` random active tokens are deactivated with
   `tokens.invalidation.apply_invalidations`, one call per `--per-shard` tokens as a shard's
   results apply them, in id order as a campaign's keyset shards produce them (`--order random`:
   the worst case, every call spread over the whole table); prints invalidations/s and the
   per-call median/max.
2. prune: `prune_inactive` over the whole table while a thread keeps re-registering active devices
   through the registry upsert (the API's write path); prints rows deleted, batches, the longest and
   median write transaction (the longest time any row lock was held) and the registrations'
   p50/max latency during the prune, which shows whether the prune blocked them.
3. sweep: `sweep_stale`, the same figures.

The Redis database given is flushed. Figures vary with whatever else runs on the machine.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import secrets
import statistics
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


from bench.campaign import recreate_database  # noqa: E402  (after the sys.path insert above)


def _ts(value: datetime) -> str:
    return value.isoformat()


def load_rows(app_id: int, rows: int, now: datetime) -> None:
    """COPY `rows` tokens in 100,000-row chunks; row i's fate is decided by i % 100."""
    from django.db import connection

    columns = (
        "app_id, user_id, device_id, platform, token, token_hash, web_p256dh, web_auth, app_version,"
        " locale, last_seen, last_success_at, is_active, deactivated_at, deactivation_reason,"
        " created_at, updated_at"
    )
    created = _ts(now - timedelta(days=300))
    chunk = 100_000
    with connection.cursor() as cursor:
        for start in range(0, rows, chunk):
            buf = io.StringIO()
            for i in range(start, min(start + chunk, rows)):
                token = secrets.token_hex(32)
                digest = hashlib.sha256(token.encode()).hexdigest()
                kind = i % 100
                if kind < 30:  # inactive for 31-90 days: prunable
                    age = now - timedelta(days=31 + kind * 2)
                    active, deactivated, reason, seen = "f", _ts(age), "Unregistered", _ts(age)
                elif kind < 37:  # active, unseen for 91-200 days: stale
                    active, deactivated, reason, seen = "t", r"\N", "", _ts(now - timedelta(days=91 + kind))
                else:
                    active, deactivated, reason, seen = "t", r"\N", "", _ts(now - timedelta(days=kind % 20))
                buf.write(
                    f"{app_id}\tuser-{i}\t{uuid.uuid4()}\tios\t{token}\t{digest}\t\t\t1.0\ten\t{seen}\t\\N"
                    f"\t{active}\t{deactivated}\t{reason}\t{created}\t{created}\n"
                )
            buf.seek(0)
            cursor.cursor.copy_expert(f"COPY tokens_devicetoken ({columns}) FROM STDIN", buf)
    # A production table is not freshly loaded: set hint bits and the visibility map, and flush
    # the load's dirty pages, so the phases below do not pay for the COPY.
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE tokens_devicetoken")
        cursor.execute("CHECKPOINT")


def bench_invalidations(app_id: int, count: int, order: str, per_shard: int) -> None:
    from django.db import connection, transaction

    from tokens.invalidation import Invalidation, apply_invalidations

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT id, token_hash FROM tokens_devicetoken WHERE app_id = %s AND is_active"
            " AND last_seen > now() - interval '30 days' ORDER BY random() LIMIT %s",
            [app_id, count],
        )
        targets = cursor.fetchall()
    if order == "shard":
        # A campaign's fan-out walks keyset shards in id order, so its answers arrive that way.
        targets.sort()
    items = [
        Invalidation(pk, digest, app_id, "apns", "Unregistered", campaign_id=1) for pk, digest in targets
    ]
    call_times: list[float] = []
    deactivated = audited = 0
    started = time.perf_counter()
    for i in range(0, len(items), per_shard):
        begun = time.perf_counter()
        with transaction.atomic():  # a shard's results run in a transaction of their own
            done, rows = apply_invalidations(items[i : i + per_shard])
        call_times.append(time.perf_counter() - begun)
        deactivated += done
        audited += rows
    applied = time.perf_counter() - started
    print(f"invalidations: {len(items):,} in {order} order, {per_shard:,} per call")
    print(
        f"  apply: {applied:.2f} s ({deactivated / applied:,.0f}/s), {deactivated:,} deactivated,"
        f" {audited:,} audit rows, {len(call_times)} calls;"
        f" per call median {statistics.median(call_times) * 1000:.0f} ms,"
        f" max {max(call_times) * 1000:.0f} ms"
    )


class Registrations(threading.Thread):
    """Re-registers random active devices through the registry upsert until stopped."""

    def __init__(self, app_id: int) -> None:
        super().__init__(daemon=True)
        self.app_id = app_id
        self.stop = threading.Event()
        self.latencies: list[float] = []

    def run(self) -> None:
        from django.db import connection

        from tokens.registry import upsert_device
        from tokens.validation import Registration

        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT device_id, token FROM tokens_devicetoken WHERE app_id = %s AND is_active"
                " AND last_seen > now() - interval '30 days' LIMIT 5000",
                [self.app_id],
            )
            devices = cursor.fetchall()
        i = 0
        while not self.stop.is_set():
            device_id, token = devices[i % len(devices)]
            i += 1
            started = time.perf_counter()
            upsert_device(self.app_id, Registration(device_id=device_id, platform="ios", token=token))
            self.latencies.append(time.perf_counter() - started)
        connection.close()


def bench_job(name: str, run, app_id: int) -> None:
    batch_times: list[float] = []
    registrations = Registrations(app_id)
    registrations.start()
    report = run(on_batch=lambda r: batch_times.append(r.last_batch_s))
    registrations.stop.set()
    registrations.join()
    lat = sorted(registrations.latencies)
    print(
        f"{name}: {report.changed:,} rows in {report.batches} batches, {report.seconds:.2f} s"
        f" ({report.changed / report.seconds:,.0f} rows/s); smallest batch {report.smallest_batch};"
        f" timeouts retried smaller: {report.timeouts}; skipped: {report.skipped_batches}"
    )
    print(
        "  write transaction per batch (longest row-lock hold):"
        f" median {statistics.median(batch_times) * 1000:.0f} ms,"
        f" max {report.longest_batch_s * 1000:.0f} ms (target < 1,000 ms)"
    )
    if lat:
        print(
            f"  concurrent registrations: {len(lat):,}, p50 {lat[len(lat) // 2] * 1000:.1f} ms,"
            f" p99 {lat[int(len(lat) * 0.99)] * 1000:.1f} ms, max {lat[-1] * 1000:.1f} ms"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--invalidations", type=int, default=100_000)
    parser.add_argument("--database", default="postgres://postgres@127.0.0.1:5432/bench_hygiene")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/6")
    parser.add_argument(
        "--order",
        choices=("shard", "random"),
        default="shard",
        help="order the invalidations arrive in: shard (a campaign's id order) or random (worst case)",
    )
    parser.add_argument(
        "--per-shard",
        type=int,
        default=1000,
        help="invalidations per apply_invalidations call (CAMPAIGN_SHARD_SIZE default: 1000)",
    )
    args = parser.parse_args()

    recreate_database(args.database)
    os.environ.update(
        DATABASE_URL=args.database, REDIS_URL=args.redis, DJANGO_SETTINGS_MODULE="pushsvc.settings"
    )
    import django

    django.setup()
    from django.core.management import call_command

    from tokens import hygiene
    from tokens.testing import make_app

    call_command("migrate", verbosity=0)
    hygiene.redis_client().flushdb()
    app = make_app("bench-hygiene")
    now = datetime.now(UTC)

    started = time.perf_counter()
    load_rows(app.pk, args.rows, now)
    print(f"loaded {args.rows:,} rows with COPY in {time.perf_counter() - started:.1f} s")

    bench_invalidations(app.pk, args.invalidations, args.order, args.per_shard)
    bench_job("prune", lambda on_batch: hygiene.prune_inactive(on_batch=on_batch), app.pk)
    bench_job("sweep", lambda on_batch: hygiene.sweep_stale(on_batch=on_batch), app.pk)


if __name__ == "__main__":
    main()
