"""The campaign page in a real headless Chromium: log into the admin, open a running campaign's
page, and watch its progress bar move without a page reload while a real worker sends to the
simulator, with its throughput chart drawing points as intervals are recorded, its provider shares
and its success by app version. Leaves a screenshot of the page mid-campaign, chart included, in
docs/img/campaign_page.png (the one docs/operations.md shows).

The page is served as in production: DEBUG off and no test static-file handler, so the admin CSS and
progress.js come from WhiteNoise (tests/security_servers.py), the way they reach a real browser.

Needs Debian's chromium and chromium-driver (`make test` installs them when missing). A browser
that cannot start fails the test with the reason; it is never skipped.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.auth.models import User

from campaigns.models import Campaign
from campaigns.pytest_fixtures import *  # noqa: F403  (sim, fresh_sim, worker_env, start_worker)
from campaigns.pytest_fixtures import api_client
from campaigns.testing import build_population, load_devices, simulator_app, wait_for
from tests.security_servers import production_server
from tokens.models import DeviceToken

pytestmark = pytest.mark.django_db(transaction=True)

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACT = Path(settings.BASE_DIR) / "docs" / "img" / "campaign_page.png"
# Small shards so the counters move shard by shard, and a rollout rate so the campaign lasts
# long enough to watch and to draw a few 10 s intervals on the chart while it still runs: ~60 s for
# 900 devices at 15/s (at 30/s a full run with a core kept busy saw the campaign end before the
# chart's third interval).
DEVICES = 900
RATE = 15
MID_CAMPAIGN_POINTS = 3
# The lease outlasts the 6 s answers of the test's start: with the suites' 5 s lease a run lost
# its shard mid-chunk and the next run counted its deliveries without their answers (the
# per-provider shares then missed that chunk; seen twice in full runs).
WORKER_ENV = {"CAMPAIGN_SHARD_SIZE": "100", "CAMPAIGN_CHUNK_SIZE": "50", "CAMPAIGN_SHARD_LEASE_S": "60"}


@pytest.fixture
def site() -> Iterator[str]:
    """The app over real HTTP with DEBUG off, static files served by the app itself (WhiteNoise)."""
    with production_server() as url:
        yield url


@pytest.fixture
def browser() -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            pytest.fail(f"{path} is missing: `make test` installs chromium and chromium-driver (apt-get).")
    profile = tempfile.mkdtemp(prefix="pushsvc-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--window-size=1280,1000",
    ):
        options.add_argument(flag)
    try:
        driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    except Exception as exc:
        shutil.rmtree(profile, ignore_errors=True)
        pytest.fail(f"Chromium could not start ({CHROMIUM} via {CHROMEDRIVER}): {exc}")
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _progress(driver) -> tuple[int, int, str]:
    from selenium.webdriver.common.by import By

    bar = driver.find_element(By.ID, "campaign-progress")
    status = driver.find_element(By.CSS_SELECTOR, '#campaign-live [data-field="status"]').text
    return int(float(bar.get_attribute("value"))), int(float(bar.get_attribute("max"))), status


def _chart(driver) -> dict[str, int]:
    """Intervals the chart shows, and the vertices of each of its lines: read in one script, since
    the page redraws the chart every second (elements found one call earlier may be gone)."""
    return driver.execute_script(
        """
        const chart = document.getElementById("campaign-chart");
        const out = {intervals: Number(chart.dataset.points || 0)};
        for (const line of chart.querySelectorAll("polyline[data-series]")) {
          out[line.dataset.series] = (line.getAttribute("points") || "").trim().split(/\\s+/).length;
        }
        return out;
        """
    )


def test_progress_bar_moves_without_reload(site, browser, fresh_sim, start_worker) -> None:
    from selenium.webdriver.common.by import By

    User.objects.create_superuser("operator", "op@example.com", "browser-pw-123")
    app = simulator_app(fresh_sim)
    population = load_devices(
        app, build_population({"ios": 600, "android": 300}, {"ios": {"01": 30}, "android": {"03": 20}})
    )
    # App versions for the per-version table: the unregistered iOS tokens on an old release.
    DeviceToken.objects.filter(app=app, platform="ios").update(app_version="4.2.0")
    DeviceToken.objects.filter(app=app, platform="android").update(app_version="4.1.3")
    DeviceToken.objects.filter(app=app, token__in=population.of("ios", "01")).update(app_version="3.9.1")
    worker = start_worker(concurrency=2, env=WORKER_ENV)
    # Until the page is open every request takes 6 s (well under the workers' 10 s timeout): the campaign
    # cannot finish (~55 s at that pace) before a loaded machine has started Chromium, logged in and
    # loaded the page. Normal speed again once the page shows it running.
    fresh_sim.configure(latency_ms=6000)
    response = api_client(app).post(
        "/api/v1/campaigns/",
        {"name": "browser test", "message": {"title": "Hello", "body": "watch me"},
         "rollout": {"start_rate": RATE, "max_rate": RATE}},
        format="json",
    )  # fmt: skip
    assert response.status_code == 201, response.content
    campaign_id = response.json()["id"]

    assert settings.DEBUG is False
    browser.get(f"{site}/admin/login/?next=/admin/campaigns/campaign/{campaign_id}/change/")
    browser.find_element(By.NAME, "username").send_keys("operator")
    browser.find_element(By.NAME, "password").send_keys("browser-pw-123")
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    wait_for(lambda: browser.find_elements(By.ID, "campaign-progress"), 60, what="the campaign page")
    # A marker a reload would wipe out: the bar must move in this same document.
    browser.execute_script("window.__pushsvcNoReload = 'still here';")

    first, _, status = _progress(browser)
    fresh_sim.configure(latency_ms=0)
    assert status in {"running", "scheduled"}, status
    try:
        moved = wait_for(
            lambda: _progress(browser)[0] > first and _progress(browser), 45, what="the bar to move"
        )
    except TimeoutError:
        campaign = Campaign.objects.get(pk=campaign_id)
        updated = browser.find_element(By.CSS_SELECTOR, '[data-field="updated"]').text
        pytest.fail(
            f"bar stuck at {first}: page says {_progress(browser)}, updated {updated!r}; database: "
            f"{campaign.status} processed={campaign.processed}/{campaign.targeted} "
            f"shards={list(campaign.shards.values_list('status', flat=True))}\n{worker.log_tail(30)}"
        )
    assert moved[0] > first
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    # Mid-campaign: the chart has drawn a few recorded intervals, and the campaign is still running.
    chart = wait_for(
        lambda: (c := _chart(browser))["intervals"] >= MID_CAMPAIGN_POINTS and c, 90, what="chart intervals"
    )
    assert _progress(browser)[2] == "running"
    # A step line: two vertices per interval, more where a gap drops to zero.
    assert chart["delivered"] >= 2 * MID_CAMPAIGN_POINTS, chart
    assert set(chart) == {"intervals", "delivered", "errors", "retries"}
    # Tall enough to show the chart, the provider shares and the per-version table in one image.
    browser.set_window_size(1280, 1700)
    browser.save_screenshot(str(ARTIFACT))

    value, maximum, status = wait_for(
        lambda: (p := _progress(browser))[2] == "completed" and p, 120, what="the page to show completion"
    )
    assert browser.execute_script("return window.__pushsvcNoReload") == "still here"
    campaign = Campaign.objects.get(pk=campaign_id)
    assert maximum == campaign.targeted == DEVICES
    assert value == campaign.processed == DEVICES
    delivered = browser.find_element(By.CSS_SELECTOR, '[data-counter="delivered"]').text
    assert int(delivered) == campaign.delivered == DEVICES - 30
    failures = browser.find_element(By.ID, "campaign-failures").text
    assert "invalid_token" in failures and "retry" in failures
    # After the end the chart still draws the stored series (the page polls once more, then stops).
    final_chart = _chart(browser)
    assert final_chart["intervals"] >= chart["intervals"] and final_chart["delivered"] >= 2, final_chart
    shares = browser.execute_script(
        """
        const out = {};
        for (const row of document.querySelectorAll("#provider-shares .share-row")) {
          out[row.dataset.provider] = [...row.querySelectorAll(".share-bar span")].map((seg) => seg.title);
        }
        return out;
        """
    )
    assert set(shares) == {"apns", "fcm"}
    assert "invalid_token: 30" in shares["apns"] and "retry: 20" in shares["fcm"], shares
    versions = browser.find_element(By.ID, "campaign-versions").text
    assert "3.9.1" in versions and "4.2.0" in versions and "4.1.3" in versions
    buttons = {
        b.get_attribute("data-action"): b.is_enabled()
        for b in browser.find_elements(By.CSS_SELECTOR, "button[data-action]")
    }
    assert buttons == {"launch": False, "pause": False, "resume": False, "cancel": False, "duplicate": True}
    assert ARTIFACT.stat().st_size > 10_000
