"""Benchmark: fair sharing between apps. App B's small campaign, alone and while app A's
broadcast is sending, with the lanes (settings CAMPAIGN_HEAD_DEVICES) and without them (one FIFO
lane per queue, CAMPAIGN_HEAD_DEVICES=0), in the same run:

    .venv/bin/python bench/fairness.py [--devices-a 1000000] [--devices-b 5000] [--workers 2]
        [--head 20000] [--b-after 0.2]

Per mode: B alone (after one untimed warm-up run of B), then A launched and, once A has
delivered --b-after of its devices (so it is sending its bulk), B launched again; B's time from
launch to completed in both, their ratio, and A's time. Devices as bench/campaign.py generates
them (10 % invalid, 3 % throttled once); the simulator and `--workers` Celery workers (default,
apns, fcm queues) run as subprocesses.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.campaign import generate_devices, recreate_database  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices-a", type=int, default=1_000_000)
    parser.add_argument("--devices-b", type=int, default=5_000)
    parser.add_argument("--workers", type=int, default=2, help="worker processes, concurrency 1 each")
    parser.add_argument("--head", type=int, default=20_000, help="CAMPAIGN_HEAD_DEVICES of the lanes mode")
    parser.add_argument("--b-after", type=float, default=0.2, help="A's delivered share when B starts")
    parser.add_argument("--database", default="postgres://postgres@127.0.0.1:5432/bench_fairness")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/5")
    args = parser.parse_args()

    os.environ.update(
        DATABASE_URL=args.database, REDIS_URL=args.redis, CELERY_BROKER_URL=args.redis, LOG_LEVEL="WARNING"
    )
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pushsvc.settings")
    recreate_database(args.database)

    import django

    django.setup()
    import redis
    from django.core.management import call_command

    from campaigns import control, planning
    from campaigns.models import Campaign
    from campaigns.testing import CeleryWorker, simulator_app, simulator_env
    from simulator.testing import SimulatorProcess

    call_command("migrate", verbosity=0)
    client = redis.Redis.from_url(args.redis)

    def run(app, name: str) -> Campaign:
        campaign = Campaign.objects.create(app=app, name=name, message={"title": name, "body": "hi"})
        planning.launch(campaign)
        return campaign

    def wait(campaign: Campaign, until) -> float:
        while True:
            campaign.refresh_from_db()
            if until(campaign):
                return time.perf_counter()
            time.sleep(0.1)  # polling the row a benchmark reads; no test outcome depends on it

    def finished(campaign: Campaign) -> bool:
        return campaign.status not in (
            Campaign.Status.DRAFT,
            Campaign.Status.SCHEDULED,
            Campaign.Status.RUNNING,
        )

    results = []
    with SimulatorProcess(front="fast", tls=True, record_payloads=False) as sim:
        app_a = simulator_app(sim, slug="big")
        app_b = simulator_app(sim, slug="small")
        generate_devices(app_a.pk, args.devices_a)
        generate_devices(app_b.pk, args.devices_b, first=args.devices_a + 1)
        print(
            f"A: {args.devices_a:,} devices, B: {args.devices_b:,} devices (60% iOS / 40% Android, "
            f"10% invalid, 3% throttled once); {args.workers} workers, concurrency 1"
        )
        for mode, head in (("lanes", args.head), ("one FIFO lane", 0)):
            client.flushdb()
            env = {
                "DATABASE_URL": args.database,
                "REDIS_URL": args.redis,
                "CELERY_BROKER_URL": args.redis,
                "LOG_LEVEL": "WARNING",
                "CAMPAIGN_HEAD_DEVICES": str(head),
                **simulator_env(sim),
            }
            workers = [
                CeleryWorker(queues=("default", "apns", "fcm"), concurrency=1, env=env, name=f"fair{i}")
                for i in range(args.workers)
            ]
            try:
                for worker in workers:
                    worker.start()
                wait(run(app_b, "warm-up"), finished)  # connections opened, credentials cached
                t0 = time.perf_counter()
                b_idle = wait(run(app_b, "B alone"), finished) - t0
                load_idle = os.getloadavg()[0]

                a0 = time.perf_counter()
                a = run(app_a, "A broadcast")
                wait(a, lambda c: c.delivered >= args.b_after * args.devices_a)
                a_at_b = a.delivered
                b0 = time.perf_counter()
                b = run(app_b, "B during A")
                b_busy = wait(b, finished) - b0
                load_busy = os.getloadavg()[0]
                a.refresh_from_db()
                a_left = a.targeted - a.delivered - a.invalidated - a.failed
                if head:  # the lanes served B; A's rest is not what this measures
                    control.cancel(client, a.pk)
                    a_s = None
                else:
                    a_s = wait(a, finished) - a0
            finally:
                for worker in workers:
                    worker.stop()
            b.refresh_from_db()
            print(
                f"{mode} (CAMPAIGN_HEAD_DEVICES={head}): B alone {b_idle:.1f} s (load {load_idle:.2f}); "
                f"B during A {b_busy:.1f} s (load {load_busy:.2f}), {b_busy / b_idle:.2f}x; "
                f"B delivered {b.delivered:,} status {b.status}; A had delivered {a_at_b:,} when B started, "
                f"{a_left:,} left when B completed"
                + (f"; A completed in {a_s:.1f} s" if a_s is not None else "; A cancelled then")
            )
            results.append((mode, b_idle, b_busy))
    for mode, b_idle, b_busy in results:
        print(f"summary: {mode}: B {b_busy:.1f} s under A vs {b_idle:.1f} s alone = {b_busy / b_idle:.2f}x")


if __name__ == "__main__":
    main()
