"""Peer benchmark: the same devices, the same simulator, three senders; prints a table.

    .venv/bin/python bench/peers.py [--devices 100000] [--workers 2] [--skip dpn,send_each]
        [--database postgres://postgres@127.0.0.1:5432/bench_peers] [--redis redis://127.0.0.1:6379/9]

Peers run in their own virtualenv (var/peers/venv, created from bench/peers/requirements.txt on
first use) through bench/peers/run_peer.py:
- pushsvc: a campaign end to end (API-less launch -> plan -> shards on real Celery workers ->
  completed), timed from launch to `completed`, as bench/campaign.py does;
- django-push-notifications 3.3.0: `APNSDevice.objects.all().send_message()` then
  `GCMDevice.objects.all().send_message()`, the package's bulk path (aioapns, firebase-admin);
- Firebase Admin SDK `messaging.send_each` over the FCM share only, 500 messages per call.

Devices: N tokens, 60 % iOS / 40 % Android, all healthy (no faults, so every peer does the same
work and every accepted request is a delivery). Deliveries are the simulator's own count of
distinct tokens accepted (delivered_unique), reset between runs; a peer's claims are not used.
The simulator is the fast front over TLS, without payload recording. Everything shares the
machine: figures move with whatever else is running.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PEER_DIR = ROOT / "var" / "peers"
PEER_PY = PEER_DIR / "venv" / "bin" / "python"


def tokens(n: int) -> list[tuple[str, str]]:
    """(platform, token), deterministic: device i is iOS when i % 10 < 6."""
    out = []
    for i in range(n):
        digest = hashlib.sha256(f"peer:{i}".encode()).hexdigest()
        if i % 10 < 6:
            out.append(("ios", digest))
        else:
            out.append(("android", f"{digest[:22]}:APA91b{digest}{digest[:40]}"))
    return out


def ensure_peer_venv() -> None:
    if PEER_PY.exists():
        return
    subprocess.run([sys.executable, "-m", "venv", str(PEER_DIR / "venv")], check=True)
    pip = [str(PEER_DIR / "venv" / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "-r", str(ROOT / "bench" / "peers" / "requirements.txt")], check=True)


def run_pushsvc(sim, rows, args) -> float:
    import redis
    from django.core.management import call_command

    from campaigns import planning
    from campaigns.models import Campaign
    from campaigns.testing import CeleryWorker, load_devices, simulator_app, simulator_env

    call_command("migrate", verbosity=0)
    redis.Redis.from_url(args.redis).flushdb()
    app = simulator_app(sim, slug="peers")
    load_devices(app, [(p, t, "") for p, t in rows])
    env = {
        "DATABASE_URL": args.database,
        "REDIS_URL": args.redis,
        "CELERY_BROKER_URL": args.redis,
        "LOG_LEVEL": "WARNING",
        **simulator_env(sim),
    }
    workers = [
        CeleryWorker(queues=("default", "apns", "fcm"), concurrency=1, env=env, name=f"peers{i}")
        for i in range(args.workers)
    ]
    try:
        for worker in workers:
            worker.start()
        campaign = Campaign.objects.create(app=app, name="peers", message={"title": "Bench", "body": "hi"})
        started = time.perf_counter()
        planning.launch(campaign)
        while campaign.status in (Campaign.Status.DRAFT, Campaign.Status.RUNNING):
            time.sleep(0.1)
            campaign.refresh_from_db()
        seconds = time.perf_counter() - started
    finally:
        for worker in workers:
            worker.stop()
    if campaign.status != Campaign.Status.COMPLETED:
        raise SystemExit(f"pushsvc campaign ended {campaign.status}: {campaign.status_reason}")
    return seconds


def run_peer(peer: str, sim, token_file: Path) -> dict:
    creds = sim.credentials
    key = PEER_DIR / "apns_key.p8"
    account = PEER_DIR / "service_account.json"
    key.write_text(creds.apns_key_p8)
    account.write_text(creds.fcm_service_account)
    cmd = [str(PEER_PY), str(ROOT / "bench" / "peers" / "run_peer.py"), peer]
    cmd += ["--base-url", sim.base_url, "--ca", sim.ca_file, "--workdir", str(PEER_DIR)]
    cmd += ["--tokens", str(token_file), "--key-p8", str(key), "--key-id", creds.apns_key_id]
    cmd += ["--team-id", creds.apns_team_id, "--topic", creds.apns_topic, "--service-account", str(account)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not lines:
        raise SystemExit(f"{peer} failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip", default="", help="comma-separated: pushsvc,dpn,send_each")
    parser.add_argument("--database", default="postgres://postgres@127.0.0.1:5432/bench_peers")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/9")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    os.environ.update(
        {
            "DATABASE_URL": args.database,
            "REDIS_URL": args.redis,
            "CELERY_BROKER_URL": args.redis,
            "LOG_LEVEL": "WARNING",
            "DJANGO_SETTINGS_MODULE": "pushsvc.settings",
        }
    )
    from bench.campaign import recreate_database

    recreate_database(args.database)
    import django

    django.setup()
    from simulator.testing import SimulatorProcess

    PEER_DIR.mkdir(parents=True, exist_ok=True)
    if skip != {"dpn", "send_each"}:
        ensure_peer_venv()
    rows = tokens(args.devices)
    token_file = PEER_DIR / "tokens.csv"
    token_file.write_text("".join(f"{p},{t}\n" for p, t in rows))
    n_ios = sum(1 for p, _ in rows if p == "ios")
    n_android = len(rows) - n_ios

    results: list[tuple[str, int, float, int, str]] = []
    with SimulatorProcess(front="fast", tls=True, record_payloads=False) as sim:
        if "pushsvc" not in skip:
            sim.reset()
            seconds = run_pushsvc(sim, rows, args)
            stats = sim.stats()
            note = f"{args.workers} workers x 1, dup {stats['duplicates']}"
            results.append(("pushsvc campaign", len(rows), seconds, stats["delivered_unique"], note))
        if "dpn" not in skip:
            sim.reset()
            out = run_peer("dpn", sim, token_file)
            stats = sim.stats()
            note = f"APNs {out['apns_s']:.1f}s, FCM {out['fcm_s']:.1f}s, {out['deactivated']} deactivated"
            if out["apns_error"]:
                note += f"; APNs raised {out['apns_error'][:60]}"
            results.append(
                ("django-push-notifications", len(rows), out["seconds"], stats["delivered_unique"], note)
            )
        if "send_each" not in skip:
            sim.reset()
            out = run_peer("send_each", sim, token_file)
            stats = sim.stats()
            results.append(
                ("firebase-admin send_each", n_android, out["seconds"], stats["delivered_unique"], "")
            )

    dpn = next((r for r in results if r[0] == "django-push-notifications"), None)
    dpn_rate = dpn[3] / dpn[2] if dpn and dpn[3] else None
    print(f"devices: {args.devices:,} ({n_ios:,} iOS / {n_android:,} Android), simulator fast front, TLS")
    print(f"{'sender':<28}{'devices':>9}{'seconds':>10}{'delivered':>11}{'deliv/s':>10}{'vs DPN':>8}  notes")
    for name, n, seconds, delivered, note in results:
        rate = delivered / seconds if seconds else 0.0
        ratio = f"{rate / dpn_rate:.1f}x" if dpn_rate else "-"
        print(f"{name:<28}{n:>9,}{seconds:>10.1f}{delivered:>11,}{rate:>10,.0f}{ratio:>8}  {note}")


if __name__ == "__main__":
    main()
