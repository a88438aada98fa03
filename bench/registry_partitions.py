"""Benchmark: the device registry before and after hash partitioning (tokens 0007), same data,
same run.

    .venv/bin/python bench/registry_partitions.py [--devices 10000000] [--registrations 5000]
        [--database postgres://postgres@127.0.0.1:5432/bench_partitions] [--redis redis://127.0.0.1:6379/5]

The database is recreated and migrated, then the device table is taken back to the plain table
(tokens 0006) and `--devices` devices of one app are generated in PostgreSQL (as bench/campaign.py
does), vacuumed and analyzed. Then, once on the plain table, the migration to the partitioned one
is timed, and again on the partitioned table:
- planning: a broadcast to every device planned for real (campaigns.planning.plan: shards written,
  tasks published to the Redis broker, which is emptied afterwards);
- a shard load (the send path's read: campaigns.sending.run._load) of 30 planned shards;
- registrations through tokens.registry.upsert_device, `--registrations` of each kind: a new
  device, the same registration again, a token rotation, a token moved to a new device;
- lookups by id alone, 500 at a time (the admin's and the API's reads by primary key);
- token invalidation (tokens.invalidation.apply_invalidations, rolled back), 500 at a time, with
  the device's key (what the shard run passes) and by id alone;
- the table's size with its indexes (and the claims').
Times are wall clock in this process; "PG CPU" is every PostgreSQL process's CPU from /proc over the
step (the server must be on this host and the machine otherwise idle).
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.campaign import generate_devices, recreate_database, service_cpu_seconds  # noqa: E402


def pg_cpu() -> float:
    return service_cpu_seconds()["postgres"]


def timed(step: Callable[[], object]) -> tuple[float, float, object]:
    """(wall s, PostgreSQL CPU s, result) of one step."""
    cpu, t0 = pg_cpu(), time.perf_counter()
    result = step()
    return time.perf_counter() - t0, pg_cpu() - cpu, result


def measure(label: str, app_id: int, registrations: int, redis_client) -> dict[str, str]:
    from django.db import connection, transaction

    from campaigns import control, planning
    from campaigns.models import Campaign, Shard
    from campaigns.sending.run import _load
    from tokens import registry
    from tokens.invalidation import Invalidation, apply_invalidations
    from tokens.models import DeviceToken
    from tokens.validation import Registration

    out: dict[str, str] = {}
    campaign = Campaign.objects.create(app_id=app_id, message={"title": label})
    control.start(campaign.pk)
    wall, cpu, _ = timed(lambda: planning.plan(campaign.pk))
    campaign.refresh_from_db()
    shards = list(Shard.objects.filter(campaign=campaign).order_by("?")[:30])
    out["planning"] = f"{wall:.1f} s wall, {cpu:.1f} s PG CPU, {campaign.targeted:,} devices"
    redis_client.flushdb()

    wall, cpu, rows = timed(lambda: sum(len(_load(shard, campaign)) for shard in shards))
    out["shard load"] = (
        f"{wall / len(shards) * 1000:.1f} ms wall, {cpu / len(shards) * 1000:.1f} ms PG CPU "
        f"per shard of {rows // len(shards):,}"
    )

    def ios_token() -> str:
        return secrets.token_hex(32)

    known = list(
        DeviceToken.objects.filter(app_id=app_id, platform="ios")
        .order_by("?")
        .values_list("device_id", "token")[: 3 * registrations]
    )
    kinds = {
        "register a new device": [(uuid.uuid4(), ios_token()) for _ in range(registrations)],
        "the same registration again": known[:registrations],
        "rotate a device's token": [(d, ios_token()) for d, _ in known[registrations : 2 * registrations]],
        "move a token to a new device": [(uuid.uuid4(), t) for _, t in known[2 * registrations :]],
    }
    for kind, regs in kinds.items():
        latencies = []

        def run(regs=regs, latencies=latencies) -> None:
            for device_id, token in regs:
                t0 = time.perf_counter()
                registry.upsert_device(app_id, Registration(device_id=device_id, platform="ios", token=token))
                latencies.append(time.perf_counter() - t0)

        wall, cpu, _ = timed(run)
        latencies.sort()
        out[kind] = (
            f"{statistics.median(latencies) * 1e6:.0f} us median, "
            f"{latencies[int(len(latencies) * 0.99)] * 1e6:.0f} us p99, "
            f"{cpu / len(regs) * 1e6:.0f} us PG CPU"
        )

    ids = list(DeviceToken.objects.order_by("?").values_list("id", flat=True)[:10_000])

    def lookups() -> None:
        with connection.cursor() as cursor:
            for start in range(0, len(ids), 500):
                cursor.execute(
                    f"SELECT id, token_hash, is_active FROM {DeviceToken._meta.db_table} WHERE id = ANY(%s)",
                    [ids[start : start + 500]],
                )
                cursor.fetchall()

    wall, cpu, _ = timed(lookups)
    out["lookup by id"] = f"{wall / len(ids) * 1e6:.1f} us wall, {cpu / len(ids) * 1e6:.1f} us PG CPU per id"
    sample = list(
        DeviceToken.objects.filter(app_id=app_id, is_active=True)
        .order_by("?")
        .values_list("id", "token_hash", "device_id")[:5000]
    )
    for label, keyed in (("invalidation, by key", True), ("invalidation, by id", False)):

        def invalidate(keyed=keyed) -> None:
            for start in range(0, len(sample), 500):
                items = [
                    Invalidation(
                        pk, token_hash, app_id, "apns", "Unregistered", device_key=key if keyed else None
                    )
                    for pk, token_hash, key in sample[start : start + 500]
                ]
                with transaction.atomic():  # undone: both variants see the same active rows
                    apply_invalidations(items)
                    transaction.set_rollback(True)

        wall, cpu, _ = timed(invalidate)
        out[label] = (
            f"{wall / len(sample) * 1e6:.0f} us wall, {cpu / len(sample) * 1e6:.0f} us PG CPU per device"
        )
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_size_pretty(sum(pg_total_relation_size(c.oid))) FROM pg_class c "
            "WHERE c.relname ~ '^tokens_(devicetoken|tokenclaim)(_p[0-9]+)?$' AND c.relkind = 'r'"
        )
        out["size (table, indexes, claims)"] = cursor.fetchone()[0]
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=10_000_000)
    parser.add_argument("--registrations", type=int, default=5000)
    parser.add_argument("--database", default="postgres://postgres@127.0.0.1:5432/bench_partitions")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/5")
    args = parser.parse_args()
    os.environ["DATABASE_URL"] = args.database
    os.environ["REDIS_URL"] = args.redis
    os.environ["CELERY_BROKER_URL"] = args.redis
    os.environ["LOG_LEVEL"] = "WARNING"
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pushsvc.settings")
    recreate_database(args.database)

    import django

    django.setup()
    import redis
    from django.conf import settings
    from django.core.management import call_command
    from django.db import connection

    from tokens import registry
    from tokens.models import App

    call_command("migrate", verbosity=0)
    call_command("migrate", "tokens", "0006", verbosity=0)
    client = redis.Redis.from_url(args.redis)
    client.flushdb()
    print(f"load before: {Path('/proc/loadavg').read_text().strip()}")
    app = App.objects.create(slug="bench", name="bench")
    wall, cpu, _ = timed(lambda: generate_devices(app.pk, args.devices))
    print(f"devices: {args.devices:,} of one app (60 % iOS), loaded in {wall:.0f} s")

    before = measure("plain", app.pk, args.registrations, client)
    wall, cpu, _ = timed(lambda: call_command("migrate", "tokens", verbosity=0))
    # What a deployment's restart after `migrate` does: new sessions (prepared statements of the
    # plain table's shape would be re-planned against the partitions) and a fresh look at the layout.
    connection.close()
    registry.claims_in_use.cache_clear()
    migration = f"{wall:.0f} s wall ({wall / args.devices * 1e6:.1f} s per million), {cpu:.0f} s PG CPU"
    after = measure("partitioned", app.pk, args.registrations, client)

    print(
        f"\nmigration to {settings.REGISTRY_PARTITIONS} partitions (copy, index, claims, VACUUM): {migration}"
    )
    width = max(len(k) for k in before)
    print(f"\n{'':{width}}  plain table | partitioned ({settings.REGISTRY_PARTITIONS})")
    for key in before:
        print(f"{key:{width}}  {before[key]} | {after[key]}")
    print(f"\nload after: {Path('/proc/loadavg').read_text().strip()}")


if __name__ == "__main__":
    main()
