"""Campaign admin: the create form validates like the API, actions use the API's transitions, the
progress endpoint is admin-only, the change page shows failures and dead letters, and "send test
push" goes through the direct-send path to the simulator."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse

from campaigns.models import Campaign, OutcomeTally
from campaigns.pytest_fixtures import *  # noqa: F403  (sim, fresh_sim, worker_env, start_worker)
from campaigns.testing import build_population, load_devices, simulator_app, wait_for
from delivery.models import DeadLetter
from tokens.models import App, DeviceToken

pytestmark = pytest.mark.django_db  # the one test with a worker asks for committed transactions

ADD_URL = "/admin/campaigns/campaign/add/"
CHANGELIST = "/admin/campaigns/campaign/"


@pytest.fixture
def staff(redis_client) -> Client:
    user = User.objects.create_superuser("ops", "ops@example.com", "pw-ops-123")
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def app() -> App:
    return App.objects.create(slug="adm", name="Admin app")


def _add(staff: Client, app: App, **overrides) -> object:
    form = {
        "app": app.pk,
        "name": "spring sale",
        "message": '{"title": "Hi", "body": "Sale"}',
        "target": "",
        "send_at_0": "",
        "send_at_1": "",
        "rollout_start_rate": "",
        "rollout_max_rate": "",
        "rollout_ramp_minutes": "0",
        "halt_error_rate": "0.05",
    }
    form.update(overrides)
    return staff.post(ADD_URL, form)


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            '{"body": "Hi", "data": {"k": "' + "x" * 5000 + '"}}',
            "too large for ios: 5073 bytes with an empty body",
        ),
        ('{"body": "Hi", "collapse_key": "' + "c" * 100 + '"}', "collapse_key: must be at most 64"),
        ('{"silent": true, "title": "Hi"}', "a silent (background) push carries no title"),
        ('{"body": "Hi", "colour": "red"}', "colour: unknown field"),
    ],
)
def test_create_form_refuses_what_the_api_refuses(
    staff: Client, app: App, message: str, expected: str
) -> None:
    response = _add(staff, app, message=message)
    assert response.status_code == 200  # the form again, with errors
    assert expected in response.content.decode()
    assert not Campaign.objects.exists()


def test_create_form_checks_target_and_rollout(staff: Client, app: App) -> None:
    response = _add(staff, app, target='{"platforms": ["symbian"]}')
    assert "platforms: {0: [ErrorDetail" not in response.content.decode()
    assert "symbian&quot; is not a valid choice" in response.content.decode()
    response = _add(staff, app, rollout_start_rate="500", rollout_max_rate="100")
    assert "start_rate: must not exceed max_rate" in response.content.decode()
    assert not Campaign.objects.exists()


def test_create_form_saves_a_draft_or_launches(staff: Client, app: App, redis_client) -> None:
    response = _add(staff, app, target='{"platforms": ["ios"]}')
    assert response.status_code == 302, response.content.decode()[:2000]
    draft = Campaign.objects.get()
    assert draft.status == Campaign.Status.DRAFT
    assert draft.target == {"platforms": ["ios"]}
    assert draft.message["title"] == "Hi" and draft.message["message_id"]  # normalised like the API

    response = _add(staff, app, name="now", launch_now="on")
    assert response.status_code == 302
    launched = Campaign.objects.get(name="now")
    assert launched.status == Campaign.Status.RUNNING  # planned by a worker; the plan task is queued
    assert redis_client.llen("default") == 1


def test_actions_use_the_api_transitions(staff: Client, app: App, redis_client) -> None:
    # outstanding=1: a planner still holds it, so resuming does not complete it on the spot.
    running = Campaign.objects.create(
        app=app, message={"body": "x"}, status=Campaign.Status.RUNNING, name="r", outstanding=1
    )
    done = Campaign.objects.create(app=app, message={"body": "y"}, status=Campaign.Status.COMPLETED)

    def act(action: str, *campaigns: Campaign):
        return staff.post(
            CHANGELIST, {"action": action, "_selected_action": [c.pk for c in campaigns]}, follow=True
        )

    text = act("pause_selected", running, done).content.decode()
    running.refresh_from_db()
    assert running.status == Campaign.Status.PAUSED
    assert redis_client.get(f"pushsvc:campaign:{running.pk}:state") == b"paused"  # shards see it
    assert "Only a running campaign can be paused (it is completed)" in text

    act("resume_selected", running)
    running.refresh_from_db()
    assert running.status == Campaign.Status.RUNNING

    act("duplicate_selected", running)
    copy = Campaign.objects.get(name="Copy of r")
    assert copy.status == Campaign.Status.DRAFT and copy.message == running.message and copy.targeted == 0

    # The change page's buttons post to the same actions.
    staff.post(reverse("admin:campaigns_campaign_act", args=[running.pk, "cancel"]))
    running.refresh_from_db()
    assert running.status == Campaign.Status.CANCELLED
    text = act("cancel_selected", running).content.decode()
    assert "already finished" in text


def test_progress_endpoint_is_admin_only_and_reports_counters(staff: Client, app: App) -> None:
    campaign = Campaign.objects.create(
        app=app,
        message={"body": "x"},
        status=Campaign.Status.RUNNING,
        targeted=1000,
        delivered=400,
        failed=20,
    )
    OutcomeTally.objects.create(
        campaign=campaign, platform="ios", outcome="rejected", reason="BadTopic", count=20
    )
    url = reverse("admin:campaigns_campaign_progress", args=[campaign.pk])

    anonymous = Client().get(url)
    assert anonymous.status_code == 302 and "/admin/login/" in anonymous["Location"]
    plain_user = User.objects.create_user("nobody", password="pw")
    outsider = Client()
    outsider.force_login(plain_user)
    assert outsider.get(url).status_code == 302  # not staff: back to the login page

    body = staff.get(url).json()
    assert body["status"] == "running"
    assert body["counters"]["delivered"] == 400 and body["processed"] == 420
    assert body["percent"] == 42.0
    assert body["failures"] == [{"platform": "ios", "outcome": "rejected", "reason": "BadTopic", "count": 20}]
    assert staff.get(reverse("admin:campaigns_campaign_progress", args=[campaign.pk + 99])).status_code == 404


def test_change_page_shows_progress_failures_and_dead_letters(staff: Client, app: App) -> None:
    campaign = Campaign.objects.create(
        app=app, message={"body": "x"}, status=Campaign.Status.COMPLETED, targeted=10, delivered=9, failed=1
    )
    OutcomeTally.objects.create(
        campaign=campaign, platform="android", outcome="dead_letter", reason="UNAVAILABLE", count=1
    )
    DeadLetter.objects.create(
        campaign=campaign,
        device_pk=7,
        platform="android",
        reason="UNAVAILABLE: try later",
        status=503,
        attempts=5,
    )
    page = staff.get(reverse("admin:campaigns_campaign_change", args=[campaign.pk])).content.decode()
    assert 'id="campaign-progress" max="10" value="10"' in page
    assert "UNAVAILABLE: try later" in page and "dead_letter" in page
    assert "campaigns/progress.js" in page
    assert "http://127.0.0.1:5555" in page  # the Flower link


def test_admin_index_links_flower(staff: Client) -> None:
    page = staff.get("/admin/").content.decode()
    assert "Flower" in page and "http://127.0.0.1:5555" in page


@pytest.mark.django_db(transaction=True)
def test_send_test_push_reaches_the_device_through_the_direct_path(
    staff: Client, fresh_sim, start_worker
) -> None:
    app = simulator_app(fresh_sim)
    population = load_devices(app, build_population({"ios": 3}, {}))
    device = DeviceToken.objects.filter(app=app).order_by("id").first()

    # From the App admin's action to the form, prefilled with the app.
    response = staff.post(
        "/admin/tokens/app/", {"action": "send_test_push_action", "_selected_action": [app.pk]}
    )
    assert response.status_code == 302 and response["Location"].endswith(f"/send-test/?app={app.pk}")
    assert staff.get(response["Location"]).status_code == 200

    bad = staff.post(
        response["Location"], {"app": app.pk, "device_id": "not-a-uuid", "title": "t", "body": "b"}
    )
    assert "Enter a valid UUID" in bad.content.decode()
    stranger = "5b0f8c0e-8d5a-4f7e-9a59-7f0c2b1d9e11"
    bad = staff.post(response["Location"], {"app": app.pk, "device_id": stranger, "title": "t", "body": "b"})
    assert f"No device with this id in app {app.slug}" in bad.content.decode()
    silent_title = staff.post(
        response["Location"], {"app": app.pk, "device_id": str(device.device_id), "title": "", "body": ""}
    )
    assert "This field is required" in silent_title.content.decode()

    start_worker(queues=("priority",), concurrency=1)
    response = staff.post(
        response["Location"],
        {"app": app.pk, "device_id": str(device.device_id), "title": "Test", "body": "push"},
    )
    assert response.status_code == 302
    campaign = Campaign.objects.get(kind=Campaign.Kind.DIRECT)
    done = wait_for(
        lambda: Campaign.objects.filter(pk=campaign.pk, status=Campaign.Status.COMPLETED).first(),
        30,
        what="the test push to complete",
    )
    assert done.delivered == 1 and done.targeted == 1
    counts = fresh_sim.counts(population.of("ios"))
    assert counts[device.token] == 1 and sum(counts.values()) == 1


def test_resume_from_the_change_page_takes_the_api_s_options(staff: Client, app: App, redis_client) -> None:
    halted = Campaign.objects.create(
        app=app, message={"body": "x"}, status=Campaign.Status.HALTED, halt_error_rate=0.05, planned=True
    )
    page = staff.get(reverse("admin:campaigns_campaign_change", args=[halted.pk])).content.decode()
    assert 'name="confirm_prune"' in page and 'name="halt_error_rate"' in page
    url = reverse("admin:campaigns_campaign_act", args=[halted.pk, "resume"])

    response = staff.post(url, {"halt_error_rate": "7"}, follow=True)
    assert "Not resumed: halt_error_rate" in response.content.decode()
    halted.refresh_from_db()
    assert (halted.status, halted.halt_error_rate) == (Campaign.Status.HALTED, 0.05)

    response = staff.post(url, {"halt_error_rate": "0.2", "confirm_prune": "on"}, follow=True)
    assert "resumed with its invalid tokens confirmed" in response.content.decode()
    halted.refresh_from_db()
    assert halted.halt_error_rate == 0.2 and halted.prune_confirmed
    assert halted.status in (Campaign.Status.RUNNING, Campaign.Status.COMPLETED)
