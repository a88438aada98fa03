"""Benchmark: one campaign end to end, launch -> completed, against the provider simulator.

    .venv/bin/python bench/campaign.py [--devices 200000] [--workers 2] [--concurrency 1]
        [--front fast|strict] [--loop uvloop|asyncio] [--invalid-pct 10] [--throttled-pct 3]
        [--database postgres://postgres@127.0.0.1:5432/bench_campaign] [--redis redis://127.0.0.1:6379/5]
        [--broker amqp://guest:guest@127.0.0.1:5672/VHOST]   (default: the --redis database)
    .venv/bin/python bench/campaign.py --plan-only --devices 10000000

The database is recreated and migrated, the Redis database flushed. Devices are generated inside
PostgreSQL (INSERT ... SELECT generate_series): 60 % iOS, 40 % Android, 10 % answering
unregistered forever (fault 01: deactivated), 3 % answering 429 once (fault 03: retried), spread
evenly over the id space (the two shares are options: issue 12's scenario is 5 % uninstalled).
The simulator runs as a subprocess, `--workers` Celery worker processes serve the default, apns
and fcm queues. Printed: time per phase (load, plan, first attempts, retries), deliveries/s from
launch to completed, peak RSS per worker process (VmHWM), Redis memory, and the database work
(transactions, rows read/written per table).

CPU per delivered device adds the workers, every PostgreSQL process and Redis from launch to
completed (from /proc; the simulator and the workers' start-up excluded); "rows_written" of
tokens_devicetoken is what a campaign rewrites of the registry.

`--plan-only` loads the devices and times planning alone (shards written and their tasks
enqueued; nothing is sent).

Everything shares the machine: figures move with whatever else is running.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def recreate_database(url: str) -> None:
    import psycopg2

    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    conn = psycopg2.connect(urlunsplit(parts._replace(path="/postgres")))
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()


def generate_devices(
    app_id: int, n: int, first: int = 1, invalid_pct: int = 10, throttled_pct: int = 3
) -> None:
    """n devices generated server side (g = first, first + 1, ...); device g's kind is decided by
    g % 100, its token by g (so apps loaded from different `first` share no token)."""
    from django.db import connection

    from tokens.models import DeviceToken

    table = DeviceToken._meta.db_table
    # iOS: 64 hex chars; Android: a long registration-token-like string. Faults by prefix.
    sql = f"""
    INSERT INTO {table} (app_id, user_id, device_id, platform, token, token_hash, web_p256dh, web_auth,
        app_version, locale, last_seen, is_active, deactivation_reason, created_at, updated_at)
    SELECT %s, 'u' || g, md5('d' || g)::uuid, t.platform, t.token, encode(sha256(t.token::bytea), 'hex'),
        '', '', '1.0', '', now(), true, '', now() - interval '1 day', now() - interval '1 day'
    FROM generate_series(%s, %s) AS g,
    LATERAL (SELECT CASE WHEN g %% 10 < 6 THEN 'ios' ELSE 'android' END AS platform,
                    CASE WHEN g %% 100 < {invalid_pct:d} THEN 'fa017501'
                         WHEN g %% 100 < {invalid_pct + throttled_pct:d} THEN 'fa017503' ELSE '' END
                        AS prefix) k,
    LATERAL (SELECT k.platform,
                    CASE WHEN k.platform = 'ios'
                         THEN substr(k.prefix || md5('a' || g) || md5('b' || g), 1, 64)
                         ELSE k.prefix || md5('c' || g) || md5('e' || g) || ':APA91b' || md5('f' || g)
                    END AS token) t
    """
    step = 1_000_000
    with connection.cursor() as cursor:
        for lo in range(first, first + n, step):
            cursor.execute(sql, [app_id, lo, min(lo + step - 1, first + n - 1)])
        cursor.execute(f"VACUUM ANALYZE {table}")


def rss_sampler(pids_of, stop: threading.Event, peaks: dict[int, int]) -> None:
    while not stop.is_set():
        for pid in pids_of():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peaks[pid] = max(peaks.get(pid, 0), int(line.split()[1]) * 1024)
            except OSError:
                pass
        stop.wait(0.5)


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the processes (and their reaped children), from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(v) for v in fields[11:15])  # utime, stime, cutime, cstime
    return total / ticks


def service_cpu_seconds() -> dict[str, float]:
    """CPU of the central services by process name, from /proc: every PostgreSQL process with its
    reaped children (a backend that exits hands its time to the postmaster's cutime/cstime), and
    Redis. Machine-wide: the benchmark must run alone."""
    ticks = os.sysconf("SC_CLK_TCK")
    totals = {"postgres": 0, "redis-server": 0, "beam.smp": 0}  # beam.smp: RabbitMQ (the whole node)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            raw = stat.read_text()
        except OSError:
            continue
        name = raw[raw.index("(") + 1 : raw.rindex(")")]
        if name in totals:
            totals[name] += sum(int(v) for v in raw.rsplit(")", 1)[1].split()[11:15])
    return {name: t / ticks for name, t in totals.items()}


def redis_counters(client) -> dict[str, int]:
    """Commands Redis processed (all, and LPUSH: kombu publishes a message with one) and bytes in."""
    stats = client.info("stats")
    lpush = client.info("commandstats").get("cmdstat_lpush", {}).get("calls", 0)
    return {
        "commands": stats["total_commands_processed"],
        "lpush": lpush,
        "net_input_bytes": stats["total_net_input_bytes"],
    }


def db_counters() -> dict[str, int]:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
        out = {"transactions": cursor.fetchone()[0]}
        cursor.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")
        out["wal_bytes"] = int(cursor.fetchone()[0])
        # A partitioned table has no counters of its own: its partitions' (tokens_devicetoken_pN) add up.
        cursor.execute(
            "SELECT t.name, sum(seq_scan + coalesce(idx_scan, 0)), sum(n_tup_ins), sum(n_tup_upd), "
            "sum(n_tup_del) FROM pg_stat_user_tables, regexp_replace(relname, '_p[0-9]+$', '') AS t(name) "
            "WHERE t.name IN ('tokens_devicetoken', 'campaigns_campaign', 'campaigns_shard', "
            "'campaigns_outcometally', 'delivery_deadletter') GROUP BY t.name"
        )
        for rel, scans, ins, upd, dele in cursor.fetchall():
            # PostgreSQL counts an `id IN (...)` index scan once per list element.
            out[f"{rel}.scans (an IN list counts per element)"] = int(scans)
            out[f"{rel}.rows_written"] = int(ins + upd + dele)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=200_000)
    parser.add_argument("--workers", type=int, default=2, help="worker processes (each -c --concurrency)")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--front", default="fast", choices=("fast", "strict"))
    parser.add_argument("--loop", default="uvloop", choices=("asyncio", "uvloop"))
    parser.add_argument("--plan-only", action="store_true")
    parser.add_argument("--invalid-pct", type=int, default=10, help="devices answering unregistered")
    parser.add_argument("--throttled-pct", type=int, default=3, help="devices answering 429 once")
    parser.add_argument("--database", default="postgres://postgres@127.0.0.1:5432/bench_campaign")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/5")
    parser.add_argument("--broker", default="", help="default: --redis; amqp://: RabbitMQ")
    args = parser.parse_args()
    broker_url = args.broker or args.redis

    os.environ["DATABASE_URL"] = args.database
    os.environ["REDIS_URL"] = args.redis
    os.environ["CELERY_BROKER_URL"] = broker_url
    os.environ["LOG_LEVEL"] = "WARNING"
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pushsvc.settings")
    recreate_database(args.database)

    import django

    django.setup()
    import redis
    from django.core.management import call_command

    from campaigns import control, planning
    from campaigns.models import Campaign, Shard
    from campaigns.testing import CeleryWorker, simulator_app, simulator_env
    from simulator.testing import SimulatorProcess
    from tokens.models import App

    call_command("migrate", verbosity=0)
    client = redis.Redis.from_url(args.redis)
    client.flushdb()
    from django.conf import settings

    from delivery import broker

    if settings.BROKER_IS_RABBITMQ:
        from campaigns.testing import purge_rabbitmq

        purge_rabbitmq()  # the vhost's pushsvc queues: an earlier run's messages
    print(f"broker: {'RabbitMQ (quorum queues, confirms)' if settings.BROKER_IS_RABBITMQ else 'Redis'}")

    print(
        f"devices: {args.devices:,} (60% iOS / 40% Android, {args.invalid_pct}% invalid, "
        f"{args.throttled_pct}% throttled once)"
    )
    if args.plan_only:
        app = App.objects.create(slug="bench", name="bench")
        t0 = time.perf_counter()
        generate_devices(app.pk, args.devices, invalid_pct=args.invalid_pct, throttled_pct=args.throttled_pct)
        print(f"load (generate_series + VACUUM ANALYZE): {time.perf_counter() - t0:.1f} s")
        campaign = Campaign.objects.create(app=app, message={"title": "plan"})
        control.start(campaign.pk)
        t0 = time.perf_counter()
        planning.plan(campaign.pk)
        elapsed = time.perf_counter() - t0
        campaign.refresh_from_db()
        shards = Shard.objects.filter(campaign=campaign).count()
        queued = sum(broker.ready_counts(["apns", "fcm"], client).values())
        print(
            f"planning: {elapsed:.1f} s for {campaign.targeted:,} devices -> {shards:,} shards, "
            f"{queued:,} tasks queued"
        )
        if not settings.BROKER_IS_RABBITMQ:
            sample = client.lindex("apns", 0) or b""
            print(f"broker message size: {len(sample)} bytes")
        client.flushdb()
        if settings.BROKER_IS_RABBITMQ:
            purge_rabbitmq()
        return

    with SimulatorProcess(front=args.front, tls=True, record_payloads=False) as sim:
        app = simulator_app(sim, slug="bench")
        t0 = time.perf_counter()
        generate_devices(app.pk, args.devices, invalid_pct=args.invalid_pct, throttled_pct=args.throttled_pct)
        load_s = time.perf_counter() - t0
        print(f"load (generate_series + VACUUM ANALYZE): {load_s:.1f} s")

        env = {
            "DATABASE_URL": args.database,
            "REDIS_URL": args.redis,
            "CELERY_BROKER_URL": broker_url,
            "LOG_LEVEL": "WARNING",
            "PUSH_EVENT_LOOP": args.loop,
            **simulator_env(sim),
        }
        workers: list[CeleryWorker] = []
        try:
            for i in range(args.workers):
                worker = CeleryWorker(
                    queues=("default", "apns", "fcm"), concurrency=args.concurrency, env=env, name=f"bench{i}"
                )
                workers.append(worker)
                worker.start()
        except BaseException:
            for worker in workers:
                worker.stop()
            raise

        def worker_pids() -> list[int]:
            return [pid for w in workers for pid in ([w.proc.pid] if w.proc else []) + w.child_pids()]

        peaks: dict[int, int] = {}
        stop = threading.Event()
        sampler = threading.Thread(target=rss_sampler, args=(worker_pids, stop, peaks), daemon=True)
        sampler.start()
        before = db_counters()
        redis_before_counts = redis_counters(client)
        services_before = service_cpu_seconds()
        # From launch: the workers' start (Django, imports, fork) is not a cost per device.
        workers_before = cpu_seconds(worker_pids())
        sim_before = cpu_seconds([sim.proc.pid]) if sim.proc else 0.0
        redis_before = client.info("memory")["used_memory"]
        try:
            campaign = Campaign.objects.create(
                app=app, name="bench", message={"title": "Bench", "body": "hi"}
            )
            launched = time.perf_counter()
            planning.launch(campaign)
            planned_at = first_attempts_at = None
            redis_peak = redis_before
            first_shards = None
            while True:
                time.sleep(0.25)
                campaign.refresh_from_db()
                redis_peak = max(redis_peak, client.info("memory")["used_memory"])
                now = time.perf_counter()
                if planned_at is None and campaign.planned:
                    planned_at = now
                    first_shards = Shard.objects.filter(campaign=campaign, is_child=False)
                if (
                    first_attempts_at is None
                    and first_shards is not None
                    and not first_shards.exclude(status=Shard.Status.DONE).exists()
                ):
                    first_attempts_at = now
                if campaign.status != Campaign.Status.RUNNING:
                    break
            finished = time.perf_counter()
            redis_counts = {k: v - redis_before_counts[k] for k, v in redis_counters(client).items()}
            worker_cpu = cpu_seconds(worker_pids()) - workers_before
            services = {k: v - services_before[k] for k, v in service_cpu_seconds().items()}
            sim_cpu = (cpu_seconds([sim.proc.pid]) if sim.proc else 0.0) - sim_before
        finally:
            stop.set()
            sampler.join()
            for worker in workers:
                worker.stop()
        after = db_counters()
        stats = sim.stats()

    total = finished - launched
    print(f"status: {campaign.status} {campaign.status_reason}")
    print(
        f"counters: targeted {campaign.targeted:,} delivered {campaign.delivered:,} "
        f"(after retry {campaign.delivered_after_retry:,}) invalidated {campaign.invalidated:,} "
        f"failed {campaign.failed:,} retried {campaign.retried:,} sent {campaign.sent:,}"
    )
    print(
        f"simulator: delivered_total {stats['delivered_total']:,} unique {stats['delivered_unique']:,} "
        f"duplicates {stats['duplicates']} connections {stats['connections_opened']}"
    )
    print(
        f"phases: plan {planned_at - launched:.1f} s | "
        f"first attempts done {first_attempts_at - launched:.1f} s | "
        f"retries done (completed) {total:.1f} s"
    )
    processed = campaign.delivered + campaign.invalidated + campaign.failed
    print(f"throughput: {campaign.delivered / total:,.0f} deliveries/s ({processed / total:,.0f} results/s)")
    first_rate = (campaign.sent - campaign.retried) / (first_attempts_at - launched)
    print(f"first-attempt pass: {first_rate:,.0f} requests/s")
    per_k = 1000 / max(campaign.sent, 1)
    print(
        f"CPU: workers {worker_cpu:.1f} s ({worker_cpu * per_k * 1000:.0f} ms per 1,000 requests), "
        f"simulator {sim_cpu:.1f} s ({sim_cpu * per_k * 1000:.0f} ms per 1,000 requests)"
    )
    pushsvc_cpu = worker_cpu + services["postgres"] + services["redis-server"] + services["beam.smp"]
    per_device = 1e6 / max(campaign.delivered, 1)
    print(
        f"CPU per delivered device, everything but the simulator: {pushsvc_cpu * per_device:.0f} us "
        f"(workers {worker_cpu * per_device:.0f}, PostgreSQL {services['postgres'] * per_device:.0f}, "
        f"Redis {services['redis-server'] * per_device:.0f}, "
        f"RabbitMQ {services['beam.smp'] * per_device:.0f})"
    )
    rss = sorted(peaks.values())
    if rss:
        print(
            f"worker RSS peak (VmHWM): max {rss[-1] / 2**20:.0f} MiB, "
            f"median {statistics.median(rss) / 2**20:.0f} MiB "
            f"over {len(rss)} processes"
        )
    print(f"redis used_memory: before {redis_before / 2**20:.1f} MiB, peak {redis_peak / 2**20:.1f} MiB")
    diff = {k: after[k] - before.get(k, 0) for k in after}
    shards = Shard.objects.filter(campaign=campaign).count()
    print(f"database: {diff['transactions']:,} transactions for {shards:,} shard rows")
    for key in sorted(k for k in diff if k not in ("transactions", "wal_bytes")):
        print(f"  {key}: {diff[key]:,}")
    # The central parts' cost per 1,000 delivered devices (docs/scaling.md): machine-wide counters,
    # so the benchmark must run alone. Redis is both the broker and the state store here.
    k = 1000 / max(campaign.delivered, 1)
    print(
        "central cost per 1,000 deliveries: "
        f"PostgreSQL {services['postgres'] * k * 1000:.1f} ms CPU, "
        f"{diff['wal_bytes'] * k / 1024:.1f} KiB WAL, {diff['transactions'] * k:.2f} transactions | "
        f"Redis {services['redis-server'] * k * 1000:.1f} ms CPU, "
        f"{redis_counts['commands'] * k:.0f} commands, "
        f"{redis_counts['net_input_bytes'] * k / 1024:.1f} KiB in | "
        f"broker {redis_counts['lpush'] * k:.2f} messages published"
    )


if __name__ == "__main__":
    main()
