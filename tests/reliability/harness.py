"""What every fault test does around its fault: load a population, launch a campaign through the
API, wait for a final state, and account for every token in the simulator's per-token counts."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db.models import Count

from campaigns.models import Campaign, Shard
from campaigns.pytest_fixtures import api_client
from campaigns.testing import Population, build_population, load_devices, sim_counts, simulator_app, wait_for
from delivery import runtime
from tokens.models import App, DeviceToken

MESSAGE = {"title": "Fault test", "body": "every device exactly once"}

# Production's values (this process reads the defaults; the fixtures' worker environment shortens
# some of them for the other suites, so they are passed back explicitly).
PRODUCTION = {
    name: str(getattr(settings, name))
    for name in (
        "CAMPAIGN_SHARD_SIZE",
        "CAMPAIGN_CHUNK_SIZE",
        "CAMPAIGN_SHARD_LEASE_S",
        "CAMPAIGN_SHARD_LEASE_REFRESH_S",
        "CAMPAIGN_SHARD_STALL_S",
        "CAMPAIGN_RECOVERY_GRACE_S",
        "CAMPAIGN_RECOVERY_INTERVAL_S",
        "CAMPAIGN_RECOVERY_ORPHAN_INTERVAL_S",
        "PUSH_REQUEST_TIMEOUT",
    )
}
# What one run may have sent and not yet marked delivered in the idempotency bitmap, so what a
# process that dies may repeat: two chunks (a run sends the next chunk while it sorts the answers
# of the one before: campaigns/sending/run.py).
IN_FLIGHT_PER_RUN = 2 * int(PRODUCTION["CAMPAIGN_CHUNK_SIZE"])


@dataclass
class Run:
    app: App
    population: Population
    campaign_id: int
    client: Any

    def campaign(self) -> Campaign:
        return Campaign.objects.get(pk=self.campaign_id)

    def status(self, *statuses: str) -> Campaign | None:
        campaign = self.campaign()
        return campaign if campaign.status in statuses else None

    def wait_status(self, *statuses: str, timeout: float = 120) -> Campaign:
        try:
            return wait_for(lambda: self.status(*statuses), timeout, 0.2, f"campaign in {statuses}")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.describe()}") from None

    def describe(self) -> str:
        """Where a campaign that did not finish stands: its counters, its shards by status, the
        pending ones, and the app's rate buckets and breakers in Redis."""
        c = self.campaign()
        lines = [
            f"campaign {c.pk}: {c.status} ({c.status_reason!r}) targeted={c.targeted} sent={c.sent} "
            f"delivered={c.delivered} retried={c.retried} failed={c.failed} outstanding={c.outstanding}",
            "shards: "
            + ", ".join(f"{r['status']}={r['n']}" for r in c.shards.values("status").annotate(n=Count("pk"))),
        ]
        pending = c.shards.filter(status=Shard.Status.PENDING).order_by("pk")[:10]
        lines += [
            f"  pending {s.pk} {s.platform} attempt={s.attempt} not_before={s.not_before} "
            f"failures={s.failures} {s.last_error[:200]}"
            for s in pending
        ]
        client = runtime.redis_client()
        for key in sorted(client.scan_iter(f"pushsvc:*:app:{self.app.pk}:*")):
            kind = client.type(key).decode()
            value = client.hgetall(key) if kind == "hash" else kind
            lines.append(f"  {key.decode()}: {value}")
        return "\n".join(lines)

    def wait_done(self, timeout: float = 180) -> Campaign:
        # Paused and halted end the wait too: a test that expects completion fails with the reason.
        return self.wait_status(*Campaign.FINAL_STATUSES, "paused", "halted", timeout=timeout)


def launch(sim: Any, counts: dict[str, int], faults: dict | None = None, **body: Any) -> Run:
    app = simulator_app(sim)
    population = load_devices(app, build_population(counts, faults or {}))
    client = api_client(app)
    response = client.post("/api/v1/campaigns/", {"message": MESSAGE, **body}, format="json")
    assert response.status_code == 201, response.content
    return Run(app, population, response.json()["id"], client)


@dataclass
class Tally:
    lost: list[str]
    duplicated: dict[str, int]

    @property
    def extra_deliveries(self) -> int:
        return sum(n - 1 for n in self.duplicated.values())


def tally(sim: Any, tokens: list[str]) -> Tally:
    """Per-token accepted deliveries: tokens never delivered, and tokens delivered more than once."""
    counts = sim_counts(sim, tokens)
    return Tally(
        lost=[t for t in tokens if counts.get(t, 0) == 0],
        duplicated={t: n for t, n in counts.items() if n > 1},
    )


def wait_delivered(sim: Any, at_least: int, timeout: float = 180) -> int:
    # Generous: a deadline only matters when something is broken, and a loaded machine is slow.
    return wait_for(
        lambda: (n := sim.stats()["delivered_total"]) >= at_least and n,
        timeout,
        0.05,
        f"{at_least} deliveries",
    )


def inactive_count(app: App) -> int:
    return DeviceToken.objects.filter(app=app, is_active=False).count()


def sample_requests(sim: Any, seconds: float, every: float = 0.25) -> list[tuple[float, int]]:
    """(monotonic time, simulator request counter) every `every` seconds for `seconds`."""
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        out.append((time.monotonic(), sim.stats()["requests"]))
        time.sleep(every)
    return out
