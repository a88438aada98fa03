"""ops/grafana/pushsvc.json: every metric its PromQL queries (panels and template variables) is a
family /metrics renders, with the labels the queries select on; the panels the operators asked
for are there; the JSON is a dashboard Grafana imports (unique panel ids, a data source variable)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings
from django.test import Client
from prometheus_client.parser import text_string_to_metric_families

from campaigns.models import Campaign
from campaigns.sending.ledger import Device, ShardResults
from delivery import breaker
from delivery.providers.base import Outcome, Result, Target
from pushsvc import metrics
from tokens.models import App

pytestmark = pytest.mark.django_db(transaction=True)

DASHBOARD = Path(settings.BASE_DIR) / "ops" / "grafana" / "pushsvc.json"

# PromQL words that look like identifiers but are not metric names.
KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
    "offset", "inf", "nan",
}  # fmt: skip


def _panels(items: list[dict]) -> Iterator[dict]:
    for panel in items:
        yield panel
        yield from _panels(panel.get("panels", []))


def _queries(dashboard: dict) -> list[str]:
    queries = [t["expr"] for p in _panels(dashboard["panels"]) for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            # label_values(<series selector>, label): the selector is PromQL.
            match = re.fullmatch(r"label_values\((.*),\s*\w+\)", query.strip())
            assert match, query
            queries.append(match.group(1))
    return queries


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads: identifiers that are not functions, keywords,
    grouping labels, label matchers, strings or range durations."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery durations ($__rate_interval)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set(re.findall(r"(?<![\w.$])([a-zA-Z_:][\w:]*)\b(?!\s*\()", text))
    return {n for n in names if n.lower() not in KEYWORDS}


def selectors(expr: str) -> Iterator[tuple[str, set[str]]]:
    """(metric, labels its matchers name) for every `metric{...}` in the expression."""
    for name, body in re.findall(r"([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}", expr):
        yield name, set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", body))


def _record_everything() -> None:
    """Real recordings through the worker-side code, so the scrape has samples to show."""
    app = App.objects.create(slug="dash")
    devices = [Device(pk, f"t{pk}", "", "", None, "2.1") for pk in range(1, 5)]
    results = ShardResults(attempt=0, max_attempts=5)
    outcomes = [Outcome.DELIVERED, Outcome.INVALID_TOKEN, Outcome.RETRY, Outcome.REJECTED]
    results.add(
        devices,
        [
            Result(target=Target(d.pk, d.token), outcome=o, reason="R")
            for d, o in zip(devices, outcomes, strict=True)
        ],
        hold_invalid=False,
    )
    metrics.record_shard(app.pk, "android", results)
    metrics.observe_chunk("android", 0.02)
    breaker.Breaker(metrics._client()).check(app.pk, "android", "run-1", breaker.FAIL)
    # A live campaign carries the progress gauges.
    Campaign.objects.create(
        app=app, message={"body": "x"}, status=Campaign.Status.RUNNING, targeted=10, delivered=1
    )


def _exported() -> tuple[set[str], dict[str, set[str]]]:
    """Sample names /metrics renders for each family it renders (sampled or not), and the label
    names seen per sample name."""
    response = Client().get("/metrics")
    assert response.status_code == 200
    names: set[str] = set()
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(response.content.decode()):
        suffixes = {
            "counter": ("_total",),
            "histogram": ("_bucket", "_sum", "_count"),
            "summary": ("_sum", "_count", ""),
        }.get(family.type, ("",))
        names |= {family.name + suffix for suffix in suffixes}
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return names, labels


@pytest.fixture(autouse=True)
def _metrics_open(settings):
    settings.METRICS_PUBLIC = True
    metrics._churn_cache = (0.0, [])  # cached per process: this test's apps must be counted


def test_the_parser_finds_metric_names() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (provider, le) (rate(pushsvc_a_bucket{x="y{z}"}[$__rate_interval])))'
        " / on (app) group_left sum without (reason) (pushsvc_b_total offset 5m) > bool 0.5"
        " and pushsvc_c"
    )
    assert metric_names(expr) == {"pushsvc_a_bucket", "pushsvc_b_total", "pushsvc_c"}
    assert dict(selectors(expr)) == {"pushsvc_a_bucket": {"x"}}


def test_every_metric_the_dashboard_queries_is_exported(redis_client) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    _record_everything()
    exported, labels = _exported()

    queries = _queries(dashboard)
    assert len(queries) >= 20
    used: set[str] = set()
    for expr in queries:
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= exported, f"{expr!r} queries metrics /metrics does not export: {names - exported}"
        used |= names
        for name, matched in selectors(expr):
            # Labels a query selects on must exist on the family's samples (recorded above).
            assert name in labels, f"{name} has no sample to check its labels against"
            assert matched <= labels[name], f"{expr!r}: {name} has no label {matched - labels[name]}"

    # What the dashboard is for: throughput and success per provider, invalid-token share,
    # breaker state, queue depths, campaign progress, token churn, success per app version.
    assert {
        "pushsvc_sends_total",
        "pushsvc_version_sends_total",
        "pushsvc_provider_breaker_open_seconds",
        "pushsvc_provider_breaker_trips_total",
        "pushsvc_queue_depth",
        "pushsvc_campaign_devices",
        "pushsvc_token_churn_ratio",
        "pushsvc_provider_request_seconds_bucket",
    } <= used
    # And nothing /metrics exports of the main families is forgotten.
    assert {"pushsvc_retries_total", "pushsvc_worker_processes_reporting", "pushsvc_tokens_active"} <= used


def test_the_dashboard_is_importable_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = list(_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 30
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    for panel in panels:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        for target in panel.get("targets", []):
            # Every query goes to the data source picked on import, never a hard-coded one.
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
