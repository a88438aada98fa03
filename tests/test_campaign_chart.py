"""The campaign page's chart and per-version figures: the stored per-interval series stays bounded
however long a campaign runs and adds up to the campaign's counters; per-version answers reach the
page and /metrics with bounded cardinality (top versions per app, the rest as "other")."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
from django.contrib.auth.models import User
from django.test import Client
from prometheus_client.parser import text_string_to_metric_families

from campaigns import series
from campaigns.models import Campaign, CampaignSample
from campaigns.pytest_fixtures import *  # noqa: F403  (sim, fresh_sim, worker_env, start_worker)
from campaigns.pytest_fixtures import api_client
from campaigns.sending.ledger import Device, ShardResults
from campaigns.testing import build_population, load_devices, simulator_app, wait_for
from delivery.providers.base import Outcome, Result, Target
from pushsvc import metrics
from tokens.models import App, DeviceToken

pytestmark = pytest.mark.django_db(transaction=True)


def _run(devices: list[Device], outcomes: list[Outcome]) -> ShardResults:
    """A shard run's results sorted by the real ShardResults.add, as the send loop does."""
    results = ShardResults(attempt=0, max_attempts=5)
    answers = [Result(target=Target(d.pk, d.token), outcome=o, reason="" if o == Outcome.DELIVERED else "X")
               for d, o in zip(devices, outcomes, strict=True)]  # fmt: skip
    results.add(devices, answers, hold_invalid=False)
    return results


def _rows(campaign: Campaign) -> list[CampaignSample]:
    return list(CampaignSample.objects.filter(campaign=campaign).order_by("start"))


def test_the_series_stays_bounded_over_a_campaign_of_hours(redis_client) -> None:
    app = App.objects.create(slug="long")
    campaign = Campaign.objects.create(app=app, message={"body": "x"}, status=Campaign.Status.RUNNING)
    devices = [Device(pk, f"t{pk}", "", "", None, "1.0") for pk in range(1, 11)]
    t0 = 1_800_000_000  # a multiple of 10: the first interval starts here
    delivered = retried = 0
    most = 0
    # Three hours of shard runs, one every 5 s (two per interval), with the run's own clock.
    for step in range(3 * 3600 // 5):
        outcomes = [Outcome.DELIVERED] * 9 + [Outcome.RETRY if step % 3 else Outcome.DELIVERED]
        results = _run(devices, outcomes)
        delivered += len(results.delivered)
        retried += results.retried
        series.record_run(campaign.pk, "ios", results, now=t0 + 5 * step)
        if step % 50 == 0:
            most = max(most, CampaignSample.objects.filter(campaign=campaign).count())
    rows = _rows(campaign)
    most = max(most, len(rows))
    assert most <= series.SAMPLE_MAX_ROWS + 1, most
    assert len(rows) <= series.SAMPLE_MAX_ROWS
    # Nothing lost in the merges, and the intervals tile the campaign's life in order.
    assert sum(r.delivered for r in rows) == delivered
    assert sum(r.retried for r in rows) == retried
    assert rows[0].start == t0
    assert rows[-1].start + rows[-1].width == t0 + 3 * 3600
    for before, after in itertools.pairwise(rows):
        assert before.start + before.width == after.start
    # Recent intervals at full resolution, old ones merged into wider ones.
    assert {r.width for r in rows[-series.SAMPLE_KEEP_FINE :]} == {series.SAMPLE_BASE_S}
    assert rows[0].width >= 8 * series.SAMPLE_BASE_S
    # Two runs of one interval share one row: 2 runs of 10 devices.
    assert rows[-1].delivered + rows[-1].retried == 20


def test_a_finished_campaign_s_page_shows_its_series_and_versions(
    fresh_sim, start_worker, redis_client
) -> None:
    app = simulator_app(fresh_sim, slug="chart-app")
    population = load_devices(
        app, build_population({"ios": 300, "android": 200}, {"ios": {"01": 30}, "android": {"03": 20}})
    )
    # App versions: the unregistered iOS tokens on "9.9", the Android ones answered 429 once on
    # "3.0-flaky", the healthy ones on "1.0" (iOS) and "2.0" (Android).
    DeviceToken.objects.filter(app=app, platform="ios").update(app_version="1.0")
    DeviceToken.objects.filter(app=app, platform="android").update(app_version="2.0")
    DeviceToken.objects.filter(app=app, token__in=population.of("ios", "01")).update(app_version="9.9")
    DeviceToken.objects.filter(app=app, token__in=population.of("android", "03")).update(
        app_version="3.0-flaky"
    )
    start_worker(concurrency=2, env={"CAMPAIGN_SHARD_SIZE": "100"})
    response = api_client(app).post("/api/v1/campaigns/", {"message": {"body": "m"}}, format="json")
    assert response.status_code == 201, response.content
    campaign = wait_for(
        lambda: Campaign.objects.filter(pk=response.json()["id"], status=Campaign.Status.COMPLETED).first(),
        90,
        what="the campaign to complete",
    )

    # The stored series adds up to the campaign's own counters (written in the runs' transactions).
    rows = _rows(campaign)
    assert rows
    assert sum(r.delivered for r in rows) == campaign.delivered == 470
    assert sum(r.invalid for r in rows) == campaign.invalidated + campaign.invalid_kept == 30
    assert sum(r.retried for r in rows) == campaign.retried == 20
    assert sum(r.failed for r in rows) == campaign.failed == 0

    # The page's progress endpoint, after the campaign ended: the series, the provider shares and
    # the per-version success.
    User.objects.create_superuser("chart-op", "op@example.com", "pw-chart-123")
    client = Client()
    client.force_login(User.objects.get(username="chart-op"))
    body = client.get(f"/admin/campaigns/campaign/{campaign.pk}/progress/").json()
    assert body["final"] is True
    assert body["series"]["fields"] == [
        "start",
        "width",
        "delivered",
        "failed",
        "invalid",
        "retried",
        "expired",
    ]
    assert [list(r) for r in body["series"]["rows"]] == [
        [r.start, r.width, r.delivered, r.failed, r.invalid, r.retried, r.expired] for r in rows
    ]
    assert body["providers"] == {
        "apns": {"delivered": 270, "invalid_token": 30},
        "fcm": {"delivered": 200, "retry": 20},
    }
    versions = {(v["provider"], v["version"]): v for v in body["versions"]}
    assert versions[("apns", "9.9")] == {
        "provider": "apns", "version": "9.9", "answers": 30, "delivered": 0, "invalid": 30, "failed": 0,
        "success": None,  # only invalid tokens: nothing to judge
    }  # fmt: skip
    assert versions[("fcm", "3.0-flaky")]["success"] == 50.0  # 20 retried, then 20 delivered
    assert versions[("apns", "1.0")]["success"] == versions[("fcm", "2.0")]["success"] == 100.0
    assert versions[("fcm", "2.0")]["answers"] == 180
    page = client.get(f"/admin/campaigns/campaign/{campaign.pk}/change/").content.decode()
    assert 'id="campaign-chart"' in page and "3.0-flaky" in page

    # /metrics: the same answers by version, counted by the worker per shard.
    wait_for(
        lambda: _version_sends(app.slug).total() == campaign.sent, 15, what="every shard's version figures"
    )
    by_version = _version_sends(app.slug)
    assert by_version[("apns", "9.9", "invalid_token")] == 30
    assert by_version[("fcm", "3.0-flaky", "retry")] == by_version[("fcm", "3.0-flaky", "delivered")] == 20
    assert by_version[("fcm", "2.0", "delivered")] == 180


def _version_sends(app: str) -> Counter:
    response = Client().get("/metrics")
    out: Counter = Counter()
    for family in text_string_to_metric_families(response.content.decode()):
        for s in family.samples:
            if s.name == "pushsvc_version_sends_total" and s.labels["app"] == app:
                out[(s.labels["provider"], s.labels["version"], s.labels["outcome"])] += int(s.value)
    return out


@pytest.fixture(autouse=True)
def _metrics_open(settings):
    settings.METRICS_PUBLIC = True


def test_metrics_export_the_top_versions_and_fold_the_rest(redis_client) -> None:
    app = App.objects.create(slug="many-versions")
    # 14 versions, version k on k+1 devices: 4.13 is the biggest; an app registered without a version.
    devices, outcomes = [], []
    pk = 0
    for k in range(14):
        for i in range(k + 1):
            pk += 1
            devices.append(Device(pk, f"t{pk}", "", "", None, f"4.{k}"))
            outcomes.append(Outcome.REJECTED if k == 13 and i == 0 else Outcome.DELIVERED)
    pk += 1
    devices.append(Device(pk, f"t{pk}", "", "", None, ""))
    outcomes.append(Outcome.DELIVERED)
    metrics.record_shard(app.pk, "android", _run(devices, outcomes))

    sends = _version_sends(app.slug)
    versions = {version for _, version, _ in sends}
    top = {f"4.{k}" for k in range(14 - metrics.VERSIONS_TOP, 14)}
    assert versions == top | {"other"}
    assert len(versions) == metrics.VERSIONS_TOP + 1
    assert sends[("fcm", "4.13", "delivered")] == 13 and sends[("fcm", "4.13", "rejected")] == 1
    # 4.0 .. 4.3 (1+2+3+4 devices) and the device without a version are "other".
    assert sends[("fcm", "other", "delivered")] == 1 + 2 + 3 + 4 + 1
    assert sum(sends.values()) == len(devices)

    # A new release that overtakes: its answers get their own label from the run that ranks it,
    # "other" never shrinks (Prometheus counters only grow).
    other_before = sends[("fcm", "other", "delivered")]
    newcomers = [Device(1000 + i, f"n{i}", "", "", None, "5.0") for i in range(50)]
    metrics.record_shard(app.pk, "android", _run(newcomers, [Outcome.DELIVERED] * 50))
    sends = _version_sends(app.slug)
    assert sends[("fcm", "5.0", "delivered")] == 50
    assert sends[("fcm", "other", "delivered")] == other_before
    assert len({version for _, version, _ in sends}) == metrics.VERSIONS_TOP + 1  # 4.4 left the top
