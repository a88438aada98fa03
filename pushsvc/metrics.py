"""Prometheus metrics: `/metrics` on the web process, fed by the workers through Redis.

Why Redis and not prometheus-client's own counters: sends happen in Celery prefork children that
start, recycle and die on their own schedule, none of them serves HTTP, and their in-process
counters would vanish with them (prometheus-client's multiprocess mode needs a shared directory
on one host, and workers run on many). So each worker process adds what a shard did to Redis
hashes, and the web process exports those hashes with a custom collector at scrape time:

- per shard run, in ONE pipeline after the shard's results are committed: sends by app, provider,
  outcome and reason (HINCRBY per distinct tally, a handful per shard), retries scheduled, the
  shard's duration and its chunks' provider round trips into histogram buckets;
- per worker process, in that same pipeline: its providers' engine figures (connections opened,
  requests in flight) in a hash that expires when the process stops reporting, and the
  per-request latency its engines observed since the last report, added to a histogram;
- at scrape time only (the web process reads, nothing is pushed): queue depths (messages ready
  in the Celery queues, delivery/broker.py: Redis lists or RabbitMQ's counts), the progress of
  running/paused/halted campaigns, token churn per app (the hygiene module's figure, cached for a
  minute because it counts active tokens).

Counters in Redis are monotonic, so Prometheus' rate() and increase() work as usual; a Redis flush
looks like a counter reset, which rate() already handles. Nothing here is on a per-token path.

`METRICS_TOKEN` set: /metrics wants `Authorization: Bearer <token>`; neither it nor
`METRICS_PUBLIC=true` set: /metrics answers 403.
"""

from __future__ import annotations

import hmac
import logging
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import redis
from celery.signals import task_postrun, task_prerun
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.views.decorators.cache import never_cache
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from delivery.engine.base import LATENCY_BOUNDS
from delivery.providers.specs import SPECS

if TYPE_CHECKING:
    from campaigns.sending.ledger import ShardResults

logger = logging.getLogger(__name__)

PREFIX = "pushsvc:metrics:"
SENDS = PREFIX + "sends"  # "app|provider|outcome|reason" -> devices
RETRIES = PREFIX + "retries"  # "app|provider" -> retry attempts scheduled
# Answers by app version: "app|provider|version|outcome" -> devices, the version folded into
# "other" unless it ranks in its app's top VERSIONS_TOP by recent volume (VERSION_RANK:app).
VERSION_SENDS = PREFIX + "version_sends"
VERSION_RANK = PREFIX + "version_rank:"  # zset per app: version -> volume, halved once a day
VERSION_DECAY = PREFIX + "version_decay"  # app zset key -> when it was last halved (unix time)
VERSIONS_TOP = 10
VERSIONS_KEPT = 200  # ranked candidates kept per app, so a new release can climb into the top
VERSION_HALF_LIFE_S = 86_400
OTHER_VERSION = "other"
UNKNOWN_VERSION = "unknown"
SHARD_SECONDS = PREFIX + "shard_seconds"  # "queue|le" -> count, "queue|sum", "queue|count"
CHUNK_SECONDS = PREFIX + "chunk_seconds"  # "provider|le" -> count, "provider|sum", "provider|count"
REQUEST_SECONDS = PREFIX + "request_seconds"  # the same, per answered provider request
PROCS = PREFIX + "procs"  # zset: per-process hash key -> last report (unix time)
PROC_TTL_S = 120
SEP = "|"
# A shard is ~5,000 devices: tens of milliseconds against a fast provider, minutes when throttled.
SHARD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# A chunk is up to CAMPAIGN_CHUNK_SIZE requests in flight together: its round trip is about the
# slowest answer among them (per request: REQUEST_SECONDS, timed by the engines).
CHUNK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
PROVIDER_OF = {spec.platform: spec.name for spec in SPECS}  # the metric label per platform
SEND_TASK = "delivery.tasks.send_shard"

# One round trip per (app, provider) of a shard, atomic so concurrent workers agree on the rank:
# halve the app's volumes once a day (recent volume decides, so a new release overtakes the
# ones it replaces), add this shard's volumes, trim the candidates, then count each answer under
# its version if the version ranks in the top N now, else under "other". Each exported series
# only ever grows: a version's answers go to one label or the other, never move between them.
_VERSION_SCRIPT = """
local top_n, kept, now, half = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local last = tonumber(redis.call('HGET', KEYS[3], KEYS[1]) or '0')
if now - last >= half then
  if last > 0 then redis.call('ZUNIONSTORE', KEYS[1], 1, KEYS[1], 'WEIGHTS', 0.5) end
  redis.call('HSET', KEYS[3], KEYS[1], now)
end
for i = 7, #ARGV, 3 do redis.call('ZINCRBY', KEYS[1], ARGV[i + 2], ARGV[i]) end
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(kept + 1))
for i = 7, #ARGV, 3 do
  local rank = redis.call('ZREVRANK', KEYS[1], ARGV[i])
  local label = ARGV[i]
  if (not rank) or rank >= top_n then label = 'other' end
  redis.call('HINCRBY', KEYS[2], ARGV[5] .. '|' .. ARGV[6] .. '|' .. label .. '|' .. ARGV[i + 1], ARGV[i + 2])
end
return 0
"""

_local = threading.local()
# Per engine (by id) of this process: its latency counts and sum at the last report.
_latency_reported: dict[int, tuple[list[int], float]] = {}
_redis: redis.Redis | None = None
_redis_pid: int | None = None


def _client() -> redis.Redis:
    global _redis, _redis_pid
    if _redis is None or _redis_pid != os.getpid():
        _redis = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
        _redis_pid = os.getpid()
    return _redis


# --- worker side ---------------------------------------------------------------------------------
def record_shard(app_id: int, platform: str, results: ShardResults) -> None:
    """Count one recorded shard run (called by campaigns/sending/ledger.py after its transaction).

    Inside a send task the figures wait for the task's end and leave with its duration in one
    pipeline; anywhere else (a test, a shell) they are written at once.
    """
    provider = PROVIDER_OF.get(platform, platform)
    sends: Counter[str] = Counter()
    if results.delivered:
        sends[SEP.join((str(app_id), provider, "delivered", ""))] += len(results.delivered)
    for (outcome, reason), count in results.tallies.items():
        sends[SEP.join((str(app_id), provider, str(outcome), reason))] += count
    retries = Counter({SEP.join((str(app_id), provider)): results.retried} if results.retried else {})
    versions: Counter[tuple[str, str, str, str]] = Counter()
    for (version, outcome), count in getattr(results, "versions", {}).items():
        versions[(str(app_id), provider, (version or UNKNOWN_VERSION).replace(SEP, "/"), outcome)] += count
    pending = getattr(_local, "pending", None)
    if pending is not None:
        pending[0].update(sends)
        pending[1].update(retries)
        pending[4].update(versions)
        return
    _safe_flush(sends, retries, None, None, versions=versions)


def observe_chunk(platform: str, seconds: float) -> None:
    """One chunk's provider round trip (called by the send loop in campaigns/sending/run.py)."""
    provider = PROVIDER_OF.get(platform, platform)
    field = f"{provider}{SEP}{_bucket(seconds, CHUNK_BUCKETS)}"
    pending = getattr(_local, "pending", None)
    if pending is not None:
        pending[2][field] += 1
        pending[2][f"{provider}{SEP}count"] += 1
        pending[3][provider] += seconds
        return
    chunks: Counter[str] = Counter({field: 1, f"{provider}{SEP}count": 1})
    _safe_flush(Counter(), Counter(), None, None, (chunks, Counter({provider: seconds})))


def _bucket(seconds: float, bounds: tuple[float, ...]) -> str:
    return next((str(b) for b in bounds if seconds <= b), "+Inf")


@task_prerun.connect(weak=False)
def _task_started(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    if getattr(task, "name", "") == SEND_TASK:
        _local.pending = (Counter(), Counter(), Counter(), Counter(), Counter())
        _local.started = time.monotonic()


@task_postrun.connect(weak=False)
def _task_finished(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    if getattr(task, "name", "") != SEND_TASK or getattr(_local, "pending", None) is None:
        return
    sends, retries, chunks, chunk_sums, versions = _local.pending
    _local.pending = None
    elapsed = time.monotonic() - _local.started
    queue = ((getattr(task.request, "delivery_info", None) or {}).get("routing_key")) or "unknown"
    figures, requests = _engine_figures()
    _safe_flush(sends, retries, (queue, elapsed), figures, (chunks, chunk_sums), requests, versions)


def _engine_figures() -> tuple[dict[str, int], tuple[Counter[str], Counter[str]]]:
    """Connections opened and requests in flight of this process's warm providers, and the
    request latencies their engines observed since the last call (histogram fields, sums)."""
    from delivery import runtime

    figures: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    sums: Counter[str] = Counter()
    with runtime._lock:
        providers = list(runtime._providers.items()) if runtime._pid == os.getpid() else []
    for (_app, platform, _fp), provider in providers:
        engine = getattr(provider, "_engine", None)  # Web Push keeps one engine per push service
        if engine is None:
            continue
        stats = engine.stats()
        name = PROVIDER_OF.get(platform, platform)
        figures[f"{name}{SEP}connections_opened"] += stats.connections_opened
        figures[f"{name}{SEP}in_flight"] += stats.in_flight
        before, before_sum = _latency_reported.get(id(engine), ([0] * len(stats.latency_counts), 0.0))
        if sum(stats.latency_counts) < sum(before):  # another engine now lives at that id
            before, before_sum = [0] * len(stats.latency_counts), 0.0
        _latency_reported[id(engine)] = (stats.latency_counts, stats.latency_sum)
        for bound, now, then in zip((*LATENCY_BOUNDS, "+Inf"), stats.latency_counts, before, strict=True):
            if now > then:
                counts[f"{name}{SEP}{bound}"] += now - then
                counts[f"{name}{SEP}count"] += now - then
        sums[name] += stats.latency_sum - before_sum
    return dict(figures), (counts, sums)


def _safe_flush(
    sends: Counter[str],
    retries: Counter[str],
    duration: tuple[str, float] | None,
    engines: dict[str, int] | None,
    chunks: tuple[Counter[str], Counter[str]] | None = None,
    requests: tuple[Counter[str], Counter[str]] | None = None,
    versions: Counter[tuple[str, str, str, str]] | None = None,
) -> None:
    # Metrics must never fail a send: a Redis blip loses one shard's figures, logged.
    try:
        _flush(_client(), sends, retries, duration, engines, chunks, requests, versions)
    except redis.RedisError as exc:
        logger.warning("metrics not recorded: %s", type(exc).__name__)


def _flush(
    client: redis.Redis,
    sends: Counter[str],
    retries: Counter[str],
    duration: tuple[str, float] | None,
    engines: dict[str, int] | None,
    chunks: tuple[Counter[str], Counter[str]] | None = None,
    requests: tuple[Counter[str], Counter[str]] | None = None,
    versions: Counter[tuple[str, str, str, str]] | None = None,
) -> None:
    pipe = client.pipeline(transaction=False)
    if versions:
        script = client.register_script(_VERSION_SCRIPT)
        groups: dict[tuple[str, str], list[str]] = {}
        for (app, provider, version, outcome), count in versions.items():
            groups.setdefault((app, provider), []).extend((version, outcome, str(count)))
        now = int(time.time())
        for (app, provider), triples in groups.items():
            script(
                keys=[VERSION_RANK + app, VERSION_SENDS, VERSION_DECAY],
                args=[VERSIONS_TOP, VERSIONS_KEPT, now, VERSION_HALF_LIFE_S, app, provider, *triples],
                client=pipe,
            )
    for field, count in sends.items():
        pipe.hincrby(SENDS, field, count)
    for field, count in retries.items():
        pipe.hincrby(RETRIES, field, count)
    if duration is not None:
        queue, seconds = duration
        pipe.hincrby(SHARD_SECONDS, f"{queue}{SEP}{_bucket(seconds, SHARD_BUCKETS)}", 1)
        pipe.hincrbyfloat(SHARD_SECONDS, f"{queue}{SEP}sum", seconds)
        pipe.hincrby(SHARD_SECONDS, f"{queue}{SEP}count", 1)
    for key, histogram in ((CHUNK_SECONDS, chunks), (REQUEST_SECONDS, requests)):
        if histogram is None:
            continue
        counts, sums = histogram
        for field, count in counts.items():
            pipe.hincrby(key, field, count)
        for provider, seconds in sums.items():
            pipe.hincrbyfloat(key, f"{provider}{SEP}sum", seconds)
    if engines is not None:
        key = f"{PREFIX}proc:{socket.gethostname()}:{os.getpid()}"
        pipe.delete(key)
        if engines:
            pipe.hset(key, mapping=engines)
        pipe.expire(key, PROC_TTL_S)
        pipe.zadd(PROCS, {key: time.time()})
    pipe.execute()


# --- web side ------------------------------------------------------------------------------------
_churn_cache: tuple[float, list[tuple[str, float, int]]] = (0.0, [])
CHURN_CACHE_S = 60.0


class RedisCollector:
    """Reads the workers' tallies and the live state at scrape time."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def collect(self) -> Iterator[Any]:
        from campaigns.models import Campaign

        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(SENDS)
        pipe.hgetall(RETRIES)
        pipe.hgetall(SHARD_SECONDS)
        pipe.hgetall(CHUNK_SECONDS)
        pipe.hgetall(REQUEST_SECONDS)
        pipe.zremrangebyscore(PROCS, "-inf", time.time() - PROC_TTL_S)
        pipe.zrange(PROCS, 0, -1)
        pipe.hgetall(VERSION_SENDS)
        sends, retries, shard_seconds, chunk_seconds, request_seconds, _, procs, version_sends = (
            pipe.execute()
        )
        slugs = _app_slugs()

        family = CounterMetricFamily(
            "pushsvc_sends",
            "Devices sent to, by final or intermediate outcome and provider reason.",
            labels=["app", "provider", "outcome", "reason"],
        )
        for field, value in sends.items():
            app, provider, outcome, reason = field.decode().split(SEP, 3)
            family.add_metric([slugs.get(app, app), provider, outcome, reason], int(value))
        yield family

        yield _version_family(self.client, version_sends, slugs)

        family = CounterMetricFamily(
            "pushsvc_retries", "Retry attempts scheduled (devices).", labels=["app", "provider"]
        )
        for field, value in retries.items():
            app, provider = field.decode().split(SEP, 1)
            family.add_metric([slugs.get(app, app), provider], int(value))
        yield family

        yield _histogram(
            "pushsvc_shard_duration_seconds", "Wall time of one send-shard task, by queue.", "queue",
            shard_seconds, SHARD_BUCKETS,
        )  # fmt: skip
        yield _histogram(
            "pushsvc_provider_chunk_seconds",
            "Provider round trip of one chunk of concurrent requests (about its slowest answer).",
            "provider", chunk_seconds, CHUNK_BUCKETS,
        )  # fmt: skip
        yield _histogram(
            "pushsvc_provider_request_seconds",
            "Answer time of one provider request, from a ready connection to the answer (stream waits in).",
            "provider", request_seconds, LATENCY_BOUNDS,
        )  # fmt: skip

        engines: Counter[str] = Counter()
        if procs:
            pipe = self.client.pipeline(transaction=False)
            for key in procs:
                pipe.hgetall(key)
            for figures in pipe.execute():
                for field, value in figures.items():
                    engines[field.decode()] += int(value)
        opened = GaugeMetricFamily(
            "pushsvc_provider_connections_opened",
            "Connections opened by live worker processes' warm providers (sum over processes).",
            labels=["provider"],
        )
        in_flight = GaugeMetricFamily(
            "pushsvc_provider_streams_in_flight",
            "Requests in flight at each worker process's last report (sum over processes).",
            labels=["provider"],
        )
        for field, value in sorted(engines.items()):
            provider, name = field.split(SEP, 1)
            (opened if name == "connections_opened" else in_flight).add_metric([provider], value)
        yield opened
        yield in_flight
        yield GaugeMetricFamily(
            "pushsvc_worker_processes_reporting", "Worker processes that reported recently.", value=len(procs)
        )
        yield from _breaker_families(self.client, slugs)

        yield from _queue_depth_family(self.client)

        yield from _campaign_families(Campaign, slugs)
        yield from _churn_families()
        yield from _credential_families()


def _queue_depth_family(client: redis.Redis) -> Iterator[Any]:
    """Messages waiting in each Celery queue, from whichever broker carries them
    (delivery/broker.py). A broker that does not answer leaves the family out of this scrape
    (the `/readyz` probe and the worker alerts report it) instead of failing every other figure."""
    from delivery import broker

    queues = ("default", "priority", *settings.PUSH_QUEUES)
    try:
        depths = broker.ready_counts(queues, client)
    except Exception as exc:  # RabbitMQ away: kombu's and py-amqp's errors vary
        logger.warning("metrics: queue depths unavailable: %s", type(exc).__name__)
        return
    family = GaugeMetricFamily("pushsvc_queue_depth", "Messages waiting in a Celery queue.", labels=["queue"])
    for queue in queues:
        family.add_metric([queue], depths[queue])
    yield family


def _version_family(client: redis.Redis, raw: dict[bytes, bytes], slugs: dict[str, str]) -> Any:
    """Answers by app version: per app, the versions now in its top VERSIONS_TOP and "other".
    A version that left the top keeps its Redis field but is no longer exported (its series goes
    stale in Prometheus), so the exported cardinality per app stays at most
    (VERSIONS_TOP + 1) x providers x outcomes."""
    family = CounterMetricFamily(
        "pushsvc_version_sends",
        "Provider answers by app version (top versions per app by recent volume, the rest as other).",
        labels=["app", "provider", "version", "outcome"],
    )
    parsed = [(field.decode().split(SEP, 3), int(value)) for field, value in raw.items()]
    apps = sorted({app for (app, *_), _ in parsed})
    pipe = client.pipeline(transaction=False)
    for app in apps:
        pipe.zrevrange(VERSION_RANK + app, 0, VERSIONS_TOP - 1)
    ranked = pipe.execute()
    top = {app: {v.decode() for v in vs} | {OTHER_VERSION} for app, vs in zip(apps, ranked, strict=True)}
    for (app, provider, version, outcome), value in sorted(parsed):
        if version in top[app]:
            family.add_metric([slugs.get(app, app), provider, version, outcome], value)
    return family


def _breaker_families(client: redis.Redis, slugs: dict[str, str]) -> Iterable[Any]:
    """The providers' circuit breakers (delivery/breaker.py): how often each opened, and how long
    the open ones have been open (an alert: a provider down for minutes)."""
    from delivery import breaker

    trips = CounterMetricFamily(
        "pushsvc_provider_breaker_trips",
        "Times a provider's circuit breaker opened (an outage began), per app.",
        labels=["app", "provider"],
    )
    for field, value in client.hgetall(breaker.TRIPS).items():
        app, platform = field.decode().split(SEP, 1)
        trips.add_metric([slugs.get(app, app), PROVIDER_OF.get(platform, platform)], int(value))
    yield trips
    open_for = GaugeMetricFamily(
        "pushsvc_provider_breaker_open_seconds",
        "Seconds since an open circuit breaker opened (absent: closed): no sends to that provider.",
        labels=["app", "provider"],
    )
    now = time.time()
    for app_id, platform, opened_at in breaker.open_breakers(client):
        open_for.add_metric(
            [slugs.get(str(app_id), str(app_id)), PROVIDER_OF.get(platform, platform)], now - opened_at
        )
    yield open_for


def _histogram(
    name: str, documentation: str, label: str, raw: dict[bytes, bytes], bounds: tuple[float, ...]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=[label])
    per_key: dict[str, dict[str, float]] = {}
    for field, value in raw.items():
        key, part = field.decode().rsplit(SEP, 1)
        per_key.setdefault(key, {})[part] = float(value)
    for key, values in sorted(per_key.items()):
        cumulative, buckets = 0.0, []
        for bound in bounds:
            cumulative += values.get(str(bound), 0.0)
            buckets.append((str(bound), cumulative))
        buckets.append(("+Inf", values.get("count", 0.0)))
        family.add_metric([key], buckets, values.get("sum", 0.0))
    return family


def _app_slugs() -> dict[str, str]:
    from tokens.models import App

    return {str(pk): slug for pk, slug in App.objects.values_list("pk", "slug")}


def _campaign_families(campaign_model: Any, slugs: dict[str, str]) -> Iterable[Any]:
    live = (campaign_model.Status.RUNNING, campaign_model.Status.PAUSED, campaign_model.Status.HALTED)
    fields = (
        "targeted",
        "delivered",
        "retried",
        "failed",
        "invalidated",
        "invalid_kept",
        "expired",
        "skipped_duplicate",
    )
    rows = campaign_model.objects.filter(status__in=live).values("pk", "app_id", "status", *fields)[:200]
    family = GaugeMetricFamily(
        "pushsvc_campaign_devices",
        "Progress counters of running, paused and halted campaigns.",
        labels=["campaign", "app", "status", "counter"],
    )
    for row in rows:
        labels = [str(row["pk"]), slugs.get(str(row["app_id"]), str(row["app_id"])), row["status"]]
        for name in fields:
            family.add_metric([*labels, name], row[name])
    yield family
    family = GaugeMetricFamily("pushsvc_campaigns", "Campaigns by status (live ones).", labels=["status"])
    counts = Counter(row["status"] for row in rows)
    for status in live:
        family.add_metric([str(status)], counts.get(status, 0))
    yield family


def _credential_families() -> Iterable[Any]:
    """Seconds until each expiring credential expires (negative once expired): today the APNs
    provider certificates. An expired certificate fails every APNs send of its app, so
    ops/alerts.yml warns 30 days ahead. Read at scrape time: one indexed query on apps."""
    from tokens.models import App

    family = GaugeMetricFamily(
        "pushsvc_credential_expiry_seconds",
        "Seconds until the credential expires (APNs provider certificates); negative: expired.",
        labels=["app", "provider"],
    )
    now = time.time()
    # Only certificates in use: a stored one the app does not send with must not page anyone.
    in_use = App.objects.filter(apns_auth="certificate", apns_cert_expires_at__isnull=False)
    for slug, expires_at in in_use.values_list("slug", "apns_cert_expires_at"):
        family.add_metric([slug, "apns"], round(expires_at.timestamp() - now))
    yield family


def _churn_families() -> Iterable[Any]:
    global _churn_cache
    from tokens.hygiene import token_churn
    from tokens.models import App

    stamp, rows = _churn_cache
    if time.monotonic() - stamp > CHURN_CACHE_S or not stamp:
        rows = []
        for app in App.objects.filter(is_active=True).only("pk", "slug")[:100]:
            churn = token_churn(app)
            rows.append((app.slug, churn.per_day, churn.active))
        _churn_cache = (time.monotonic(), rows)
    churn_family = GaugeMetricFamily(
        "pushsvc_token_churn_ratio",
        "Provider invalidations over the last day as a share of active tokens (cached 60 s).",
        labels=["app"],
    )
    active_family = GaugeMetricFamily(
        "pushsvc_tokens_active", "Active device tokens (cached 60 s).", labels=["app"]
    )
    for slug, per_day, active in rows:
        churn_family.add_metric([slug], per_day)
        active_family.add_metric([slug], active)
    yield churn_family
    yield active_family


def render() -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RedisCollector(_client()))
    return generate_latest(registry)


@never_cache
def metrics_view(request: HttpRequest) -> HttpResponse:
    token = settings.METRICS_TOKEN
    if not token and not settings.METRICS_PUBLIC:
        # Closed by default: the metrics name tenants, campaigns and volumes.
        return HttpResponse(
            "/metrics is closed: set METRICS_TOKEN (or METRICS_PUBLIC=true to open it).\n", status=403
        )
    if token:
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            response = HttpResponse("A bearer token is required (METRICS_TOKEN).\n", status=401)
            response["WWW-Authenticate"] = 'Bearer realm="metrics"'
            return response
    try:
        body = render()
    except redis.RedisError as exc:
        return HttpResponse(f"metrics unavailable: Redis {type(exc).__name__}\n", status=503)
    return HttpResponse(body, content_type=CONTENT_TYPE_LATEST)
