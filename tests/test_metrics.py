"""/metrics: what workers record per shard reaches the scrape exactly; the alert rules only name
metrics the scrape exports; METRICS_TOKEN protects the endpoint."""

from __future__ import annotations

import re
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from django.conf import settings
from django.test import Client, override_settings
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from campaigns.models import Campaign
from campaigns.pytest_fixtures import *  # noqa: F403  (sim, fresh_sim, worker_env, start_worker)
from campaigns.pytest_fixtures import api_client
from campaigns.sending.ledger import ShardResults
from campaigns.testing import build_population, load_devices, simulator_app, wait_for
from delivery import breaker
from delivery.providers.base import Outcome
from pushsvc import metrics
from tokens.models import App

pytestmark = pytest.mark.django_db(transaction=True)

ALERTS = Path(settings.BASE_DIR) / "ops" / "alerts.yml"


@pytest.fixture(autouse=True)
def _metrics_open(settings):
    """/metrics is closed without METRICS_TOKEN unless METRICS_PUBLIC (tests/test_security_http.py);
    these tests read it open, and set a token where they test the token."""
    settings.METRICS_PUBLIC = True
    # Churn and active tokens are cached per process for a minute: a scrape by an earlier test of
    # this process must not stand in for this test's tokens.
    metrics._churn_cache = (0.0, [])


def _scrape(**headers: str) -> tuple[int, str]:
    response = Client().get("/metrics", **headers)
    return response.status_code, response.content.decode()


def _samples(text: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def _sum(samples: dict[str, list], name: str, **labels: str) -> float:
    return sum(s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items()))


def test_a_campaign_s_sends_reach_the_scrape_exactly(fresh_sim, start_worker, redis_client) -> None:
    app = simulator_app(fresh_sim, slug="metrics-app")
    load_devices(
        app, build_population({"ios": 400, "android": 200}, {"ios": {"01": 40}, "android": {"03": 20}})
    )
    start_worker(concurrency=2)
    response = api_client(app).post("/api/v1/campaigns/", {"message": {"body": "m"}}, format="json")
    assert response.status_code == 201, response.content
    campaign = wait_for(
        lambda: Campaign.objects.filter(pk=response.json()["id"], status=Campaign.Status.COMPLETED).first(),
        60,
        what="the campaign to complete",
    )
    # The worker's send-task flush happens after the task's last commit: wait for the last shard.
    shards = campaign.shards.count()
    wait_for(
        lambda: _sum(_samples(_scrape()[1]), "pushsvc_shard_duration_seconds_count") >= shards,
        15,
        what="every shard's metrics",
    )

    status, text = _scrape()
    assert status == 200
    samples = _samples(text)
    assert _sum(samples, "pushsvc_sends_total", app="metrics-app", outcome="delivered") == campaign.delivered
    assert _sum(samples, "pushsvc_sends_total", provider="apns", outcome="invalid_token") == 40
    assert campaign.invalidated == 40
    # Fault 03 answers 429 once (docs/simulator.md): retried, then delivered.
    assert _sum(samples, "pushsvc_sends_total", provider="fcm", outcome="retry") == 20
    assert _sum(samples, "pushsvc_retries_total", provider="fcm") == campaign.retried == 20
    assert _sum(samples, "pushsvc_sends_total") == campaign.sent
    assert _sum(samples, "pushsvc_shard_duration_seconds_count") == shards
    # Every shard sends at least one chunk; retry shards too. Buckets are cumulative up to +Inf.
    assert _sum(samples, "pushsvc_provider_chunk_seconds_count") >= shards
    for provider in ("apns", "fcm"):
        count = _sum(samples, "pushsvc_provider_chunk_seconds_count", provider=provider)
        assert (
            _sum(samples, "pushsvc_provider_chunk_seconds_bucket", provider=provider, le="+Inf") == count > 0
        )
        assert _sum(samples, "pushsvc_provider_chunk_seconds_sum", provider=provider) > 0
    # Every answered request is timed once (delivery/engine), by the process that sent it.
    requests = _sum(samples, "pushsvc_provider_request_seconds_count")
    assert requests == campaign.sent
    assert _sum(samples, "pushsvc_provider_request_seconds_bucket", le="+Inf") == requests
    assert _sum(samples, "pushsvc_provider_request_seconds_sum", provider="fcm") > 0
    queues = {s.labels["queue"] for s in samples["pushsvc_queue_depth"]}
    assert queues == {"default", "priority", "apns", "fcm", "hms", "webpush"}
    assert _sum(samples, "pushsvc_worker_processes_reporting") >= 1
    assert _sum(samples, "pushsvc_provider_connections_opened", provider="apns") >= 1
    assert _sum(samples, "pushsvc_tokens_active", app="metrics-app") == 600 - 40
    # Only live campaigns carry progress gauges; this one completed.
    assert not [
        s for s in samples.get("pushsvc_campaign_devices", []) if s.labels["campaign"] == str(campaign.pk)
    ]


def test_live_campaign_progress_and_protection(redis_client) -> None:
    app = App.objects.create(slug="live")
    campaign = Campaign.objects.create(
        app=app, message={"body": "x"}, status=Campaign.Status.RUNNING, targeted=100, delivered=30
    )
    samples = _samples(_scrape()[1])
    assert _sum(samples, "pushsvc_campaign_devices", campaign=str(campaign.pk), counter="delivered") == 30
    assert _sum(samples, "pushsvc_campaigns", status="running") == 1

    with override_settings(METRICS_TOKEN="t0k3n-metrics"):
        status, body = _scrape()
        assert status == 401 and "pushsvc" not in body
        assert _scrape(HTTP_AUTHORIZATION="Bearer wrong")[0] == 401
        status, body = _scrape(HTTP_AUTHORIZATION="Bearer t0k3n-metrics")
        assert status == 200 and "pushsvc_queue_depth" in body


def _record_examples() -> None:
    """Real calls of the worker-side recorder (outside a task: written at once)."""
    # An APNs certificate 10 days from expiry (ApnsCertificateExpiringSoon selects on it).
    app = App.objects.create(
        slug="alerts", apns_auth="certificate", apns_cert_expires_at=timezone.now() + timedelta(days=10)
    )
    results = ShardResults(attempt=0, max_attempts=5)
    results.delivered = [1, 2, 3]
    results.retry = [4]
    results.tallies = Counter(
        {
            (str(Outcome.INVALID_TOKEN), "Unregistered"): 2,
            (str(Outcome.AUTH_FAILURE), "InvalidProviderToken"): 1,
            (str(Outcome.RETRY), "TooManyRequests"): 1,
        }
    )
    metrics.record_shard(app.pk, "ios", results)
    metrics.observe_chunk("ios", 0.03)
    # A chunk that found APNs down: the breaker opens (delivery/breaker.py).
    breaker.Breaker(metrics._client()).check(app.pk, "ios", "run-1", breaker.FAIL)


def test_alert_rules_parse_and_name_only_exported_metrics(redis_client) -> None:
    _record_examples()
    status, text = _scrape()
    assert status == 200
    exported = set(_samples(text))
    exported |= set(re.findall(r"^# TYPE (\S+)", text, re.M))  # families with no sample yet
    for histogram in re.findall(r"^# TYPE (\S+) histogram", text, re.M):
        exported |= {f"{histogram}_bucket", f"{histogram}_sum", f"{histogram}_count"}

    rules = yaml.safe_load(ALERTS.read_text())
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert {a["alert"] for a in alerts} >= {
        "PushSuccessRateLow",
        "PushUnregisteredSpike",
        "ApnsAuthErrors",
        "PushQueueBacklogGrowing",
        "ApnsCertificateExpiringSoon",
    }
    promql_words = {"sum", "by", "rate", "increase", "deriv", "and", "or", "unless", "without", "on", "le"}
    for alert in alerts:
        assert alert["labels"]["severity"] in {"warning", "critical"}
        expr = alert["expr"]
        assert expr.count("(") == expr.count(")"), alert["alert"]
        # Metric names: identifiers not followed by "(" that are neither keywords nor label names.
        names = set(re.findall(r"\b([a-z_][a-z0-9_]*)\b(?!\s*\()(?=\s*[\[{)\s<>=!]|$)", expr)) - promql_words
        names = {n for n in names if n.startswith("pushsvc_")}
        assert names, f"{alert['alert']} names no pushsvc metric"
        assert names <= exported, (
            f"{alert['alert']} uses metrics /metrics does not export: {names - exported}"
        )
        for selector in re.findall(r"\{([^}]*)\}", expr):
            for label, value in re.findall(r'(\w+)\s*!?=\s*"([^"]*)"', selector):
                assert label in {"provider", "outcome", "app", "reason", "queue", "le", "version"}, label
                if label == "outcome":
                    assert value in {o.value for o in Outcome}, value
                if label == "provider":
                    assert value in metrics.PROVIDER_OF.values(), value
    # The recorded examples are visible with the labels the rules select on.
    samples = _samples(text)
    assert _sum(samples, "pushsvc_sends_total", provider="apns", outcome="auth_failure", app="alerts") == 1
    expiry = _sum(samples, "pushsvc_credential_expiry_seconds", provider="apns", app="alerts")
    assert 9 * 86400 < expiry <= 10 * 86400
    assert _sum(samples, "pushsvc_sends_total", provider="apns", outcome="delivered", app="alerts") == 3
    assert _sum(samples, "pushsvc_provider_chunk_seconds_bucket", provider="apns", le="0.025") == 0
    assert _sum(samples, "pushsvc_provider_breaker_trips_total", provider="apns", app="alerts") == 1
    assert 0 <= _sum(samples, "pushsvc_provider_breaker_open_seconds", provider="apns", app="alerts") < 60
    assert _sum(samples, "pushsvc_provider_chunk_seconds_bucket", provider="apns", le="0.05") == 1
