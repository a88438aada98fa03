"""A campaign across hosts that are really apart: two worker hosts and a web host, each a network
namespace of its own, reaching the data host (PostgreSQL, Redis, the provider simulator) over a
veth and a bridge (tests/multihost/netns.py has the layout).

1. 200,000 devices (bench/campaign.py's population: 60 % iOS / 40 % Android, 10 % unregistered,
   3 % answering 429 once), launched through the API on the web host: completed, every valid
   device delivered exactly once (the simulator's per-token counts), both worker hosts ran shards.
2. The same, and at ~30 % delivered one worker host's link goes down (`ip link set ... down`: no
   FIN, no RST, its connections just hang). Its runs' leases are no longer refreshed and run out
   (CAMPAIGN_SHARD_LEASE_S); the other host's recovery sweep finds them registered but gone
   (delivery/leases.py, campaigns/recovery.py) and publishes their shards again. Completed, 0
   lost, repeats within what the cut host had in flight (its pool processes x two chunks of
   CAMPAIGN_CHUNK_SIZE). Printed: the time from the cut until the cut host's shards run elsewhere.

Production settings throughout (tests/reliability/harness.py PRODUCTION). Needs root (namespaces);
skipped with the reason elsewhere, and failed instead under CI=true (CI runs as root).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
from django.conf import settings

from bench.campaign import generate_devices
from campaigns.models import Campaign, Shard
from campaigns.testing import CeleryWorker, database_url, sim_counts, simulator_app, simulator_env, wait_for
from delivery import leases
from simulator.credentials import ensure_credentials
from simulator.testing import SimulatorProcess
from tests.multihost.netns import Network, Unavailable, unavailable_reason
from tests.reliability.harness import IN_FLIGHT_PER_RUN, PRODUCTION, wait_delivered
from tokens.models import ApiKey, DeviceToken

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(300)]

DEVICES = int(os.environ.get("MULTIHOST_DEVICES", "200000"))
WORKER_CONCURRENCY = 1  # per worker host: 2 pool processes for the 2 cores
WEB_PORT = 8000
INVALID_PREFIX = "fa017501"  # generate_devices: 10 % answer Unregistered and are deactivated


@pytest.fixture(scope="module")
def net() -> Iterator[Network]:
    reason = unavailable_reason()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"multi-host tests cannot run in CI: {reason}")
        pytest.skip(f"multi-host tests need network namespaces: {reason}")
    try:
        network = Network(hosts_wanted=("w1", "w2", "web")).start()
    except Unavailable as exc:  # pragma: no cover - raced with the check above
        pytest.skip(str(exc))
    try:
        targets = {urlsplit(url) for url in (database_url(), settings.REDIS_URL, settings.CELERY_BROKER_URL)}
        for target in {(t.hostname or "127.0.0.1", t.port) for t in targets}:
            network.forward(target[1], target[0])
        yield network
    finally:
        network.stop()


def via(url: str, gateway: str) -> str:
    """The same URL with its host replaced by the data host's bridge address."""
    parts = urlsplit(url)
    auth = parts.netloc.rpartition("@")[0]
    netloc = (auth + "@" if auth else "") + f"{gateway}:{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


@pytest.fixture(scope="module")
def sim(net: Network, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimulatorProcess]:
    """The simulator on the data host, listening on the bridge address (its certificate names it)."""
    workdir = tmp_path_factory.mktemp("simulator")
    ensure_credentials(workdir, "http://127.0.0.1:0", extra_hosts=(net.gateway,))
    with SimulatorProcess(
        front="fast", tls=True, workdir=workdir, host=net.gateway, record_payloads=False
    ) as s:
        yield s


@pytest.fixture(scope="module")
def host_env(net: Network, sim: SimulatorProcess, django_db_setup: None) -> dict[str, str]:
    """What every host is configured with: the data host's services at the bridge address."""
    return {
        "DATABASE_URL": via(database_url(), net.gateway),
        "REDIS_URL": via(settings.REDIS_URL, net.gateway),
        "CELERY_BROKER_URL": via(settings.CELERY_BROKER_URL, net.gateway),
        **simulator_env(sim),
        **PRODUCTION,
        "LOG_LEVEL": "WARNING",
    }


@pytest.fixture(scope="module")
def web(net: Network, host_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The API (granian) on the web host; its base URL, once /readyz (database, Redis, broker) is OK."""
    host = net.hosts["web"]
    log = tmp_path_factory.mktemp("web") / "granian.log"
    env = {
        **os.environ,
        **host_env,
        "ALLOWED_HOSTS": host.address,
        "DJANGO_SETTINGS_MODULE": "pushsvc.settings",
    }
    cmd = [
        *host.prefix,
        str(Path(sys.executable).parent / "granian"),
        "--interface", "wsgi", "pushsvc.wsgi:application",
        "--workers", "1", "--blocking-threads", "2",
        "--host", host.address, "--port", str(WEB_PORT),
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=settings.BASE_DIR)
    base = f"http://{host.address}:{WEB_PORT}"

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"granian exited {proc.returncode}: {log.read_text(errors='replace')}")
        try:
            with urllib.request.urlopen(base + "/readyz", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    try:
        wait_for(ready, 60, 0.2, "the web host's /readyz")
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture
def worker_hosts(
    net: Network, host_env: dict[str, str], redis_client, tmp_path: Path
) -> Iterator[dict[str, CeleryWorker]]:
    """One `celery worker` per worker host (queues default, apns, fcm), on an emptied Redis database."""
    workers = {
        name: CeleryWorker(
            queues=("default", "apns", "fcm"),
            concurrency=WORKER_CONCURRENCY,
            env=host_env,
            name=f"mh-{name}",
            log_dir=tmp_path,
            prefix=net.hosts[name].prefix,
        )
        for name in ("w1", "w2")
    }
    try:
        for worker in workers.values():
            worker.start()
        yield workers
    finally:
        for name, worker in workers.items():
            # A host whose link is down cannot finish its task: no point waiting for a warm shutdown.
            cut = net.hosts[name].is_cut
            worker.stop(timeout=3 if cut else 30)


# --- the campaign ------------------------------------------------------------------------------
def launch_through_web(web: str, sim: SimulatorProcess) -> tuple[int, int, float]:
    """Devices loaded, the campaign posted to the web host. (campaign id, valid devices, launch time)."""
    app = simulator_app(sim)
    t0 = time.monotonic()
    generate_devices(app.pk, DEVICES)
    print(f"\n{DEVICES:,} devices generated in {time.monotonic() - t0:.1f} s")
    valid = DeviceToken.objects.filter(app=app).exclude(token__startswith=INVALID_PREFIX).count()
    _, key = ApiKey.issue(app, ["send"])
    request = urllib.request.Request(
        web + "/api/v1/campaigns/",
        data=json.dumps({"message": {"title": "Multi-host", "body": "every device exactly once"}}).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        method="POST",
    )
    launched = time.monotonic()
    with urllib.request.urlopen(request, timeout=30) as resp:
        assert resp.status == 201
        campaign_id = json.loads(resp.read())["id"]
    return campaign_id, valid, launched


def wait_done(campaign_id: int, timeout: float = 240) -> Campaign:
    final = (*Campaign.FINAL_STATUSES, "paused", "halted")
    return wait_for(
        lambda: (c := Campaign.objects.get(pk=campaign_id)).status in final and c,
        timeout,
        0.2,
        "campaign done",
    )


def tally(sim: SimulatorProcess, campaign: Campaign) -> tuple[int, int]:
    """(lost, duplicates) over the valid devices: never accepted, accepted more than once (extra)."""
    tokens = list(
        DeviceToken.objects.filter(app_id=campaign.app_id)
        .exclude(token__startswith=INVALID_PREFIX)
        .values_list("token", flat=True)
    )
    counts = sim_counts(sim, tokens)
    lost = sum(1 for t in tokens if counts.get(t, 0) == 0)
    duplicates = sum(n - 1 for n in counts.values() if n > 1)
    return lost, duplicates


class ShardWatcher(threading.Thread):
    """Which host ran which shard: every 20 ms, the register of held shard leases
    (delivery/leases.py, shard -> `host:pid:random`; each host has a hostname of its own)."""

    def __init__(self, redis_client) -> None:
        super().__init__(daemon=True)
        self.redis = redis_client
        self.seen: dict[str, set[int]] = {}
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.02):
            for shard, token in self.redis.hgetall(leases.REGISTER_KEY).items():
                self.seen.setdefault(token.decode().split(":", 1)[0], set()).add(int(shard))

    def per_host(self, net: Network) -> dict[str, int]:
        return {name: len(self.seen.get(host.ns, ())) for name, host in net.hosts.items() if name != "web"}

    def __enter__(self) -> ShardWatcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.join(5)


def held_by(redis_client, hostname: str) -> dict[int, str]:
    """Shards whose registered lease token names `hostname` (tokens are host:pid:random)."""
    return {
        int(shard): token.decode()
        for shard, token in redis_client.hgetall(leases.REGISTER_KEY).items()
        if token.decode().startswith(hostname + ":")
    }


def taken_over(redis_client, dead: dict[int, str]) -> bool:
    """Every shard of the cut host is registered under another run, or done."""
    register = {int(k): v.decode() for k, v in redis_client.hgetall(leases.REGISTER_KEY).items()}
    pending = set(
        Shard.objects.filter(pk__in=list(dead), status=Shard.Status.PENDING).values_list("id", flat=True)
    )
    return all(s not in pending or register.get(s) not in (None, token) for s, token in dead.items())


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def watcher() -> ShardWatcher:
    return ShardWatcher(redis.Redis.from_url(settings.REDIS_URL))


def test_campaign_across_two_worker_hosts(net, sim, web, worker_hosts) -> None:
    sim.reset()
    with watcher() as seen:
        campaign_id, valid, launched = launch_through_web(web, sim)
        campaign = wait_done(campaign_id)
        wall = time.monotonic() - launched
    assert campaign.status == "completed", (campaign.status, campaign.status_reason)
    lost, duplicates = tally(sim, campaign)
    per_host = seen.per_host(net)
    print(
        f"two worker hosts, {DEVICES:,} devices ({valid:,} valid): wall {wall:.1f} s "
        f"({campaign.delivered / wall:,.0f} deliveries/s), lost={lost} duplicates={duplicates}, "
        f"shards run per host {per_host} of {Shard.objects.filter(campaign_id=campaign_id).count()}, "
        f"load {load()}"
    )
    assert lost == 0
    assert duplicates == 0, "no process died: nothing was in flight to repeat"
    assert campaign.delivered == valid
    assert all(n > 0 for n in per_host.values()), f"both worker hosts ran shards: {per_host}"


def test_worker_host_cut_off_mid_campaign(net, sim, web, worker_hosts, redis_client) -> None:
    sim.reset()
    victim = net.hosts["w2"]
    pool = worker_hosts["w2"].child_pids()  # what it may have had in flight: a chunk per pool process
    with watcher() as seen:
        campaign_id, valid, launched = launch_through_web(web, sim)
        at_cut = wait_delivered(sim, int(valid * 0.3), timeout=180)
        held = wait_for(lambda: held_by(redis_client, victim.ns), 60, 0.01, "a shard run on w2")
        victim.cut()
        cut_at = time.monotonic()
        held.update(held_by(redis_client, victim.ns))
        dead = {
            s: t for s, t in held.items() if Shard.objects.filter(pk=s, status=Shard.Status.PENDING).exists()
        }
        assert dead, "w2 was running a shard when its link went down"
        wait_for(lambda: taken_over(redis_client, dead), 120, 0.05, "w2's shards taken over")
        takeover = time.monotonic() - cut_at
        # Counted once the takeover is seen, not at the cut: a lease w2 wrote just before its link
        # went down can reach Redis (through the data host's forwarder) after the cut and after the
        # watcher's last look; seconds later nothing of w2's can still be on its way.
        w2_by_takeover = seen.per_host(net)["w2"]
        campaign = wait_done(campaign_id)
        wall = time.monotonic() - launched
    assert campaign.status == "completed", (campaign.status, campaign.status_reason)
    lost, duplicates = tally(sim, campaign)
    bound = len(pool) * IN_FLIGHT_PER_RUN
    per_host = seen.per_host(net)
    print(
        f"w2's link cut at {at_cut:,}/{valid:,} delivered ({len(dead)} shard(s) in progress there): "
        f"taken over {takeover:.1f} s after the cut (lease {PRODUCTION['CAMPAIGN_SHARD_LEASE_S']} s); "
        f"wall {wall:.1f} s, lost={lost} duplicates={duplicates} (bound {len(pool)} x "
        f"{IN_FLIGHT_PER_RUN}), skipped_duplicate={campaign.skipped_duplicate}; shards run "
        f"per host {per_host} (w2 by the takeover: {w2_by_takeover}), load {load()}"
    )
    assert lost == 0
    assert duplicates <= bound, "only what the cut host had in flight may repeat"
    assert campaign.delivered == valid
    assert per_host["w2"] == w2_by_takeover, "the cut host started nothing after the cut"
