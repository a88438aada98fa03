"""No secret leaves the system: one representative flow (devices registered through the API, a
campaign sent through a real worker to the simulator, including a revoked credential and invalid
tokens, then every admin page of what it created) collects every API response body, every admin
page's HTML, every log record of this process and the worker's whole log, and searches them for
the App's private keys (APNs .p8, FCM service account, VAPID), the HMS client secret, the access
tokens actually issued (read from the shared credential cache in Redis) and the raw API key.
"""

from __future__ import annotations

import json
import logging

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from campaigns.models import Campaign
from campaigns.pytest_fixtures import *  # noqa: F403  (sim, fresh_sim, worker_env, start_worker)
from campaigns.testing import build_population, load_devices, simulator_app, wait_for
from tokens.models import ApiKey, DeviceToken
from tokens.testing import registration

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(300)]


def _pem_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and "-----" not in line]


def _secrets(app, raw_key: str, redis_client) -> dict[str, str]:
    found = {"hms_client_secret": app.hms_client_secret, "api key": raw_key}
    found["api key secret part"] = raw_key.rsplit("_", 1)[-1]
    for name, text in (
        ("apns_key_p8", app.apns_key_p8),
        ("vapid_private_key", app.vapid_private_key),
        ("fcm private_key", json.loads(app.fcm_service_account)["private_key"]),
    ):
        for i, line in enumerate(_pem_lines(text)):
            found[f"{name} line {i}"] = line
    for key in redis_client.scan_iter("pushsvc:cred:*"):
        raw = redis_client.get(key)
        if raw and raw.startswith(b"{"):
            found[f"issued token {key.decode()[:40]}"] = json.loads(raw)["value"]
    return {name: value for name, value in found.items() if value and len(value) >= 16}


def test_no_secret_in_responses_admin_pages_or_logs(fresh_sim, start_worker, redis_client, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    collected: list[str] = []
    app = simulator_app(fresh_sim)
    _, raw_key = ApiKey.issue(app, ["devices", "send"])
    api = Client(headers={"Authorization": f"Bearer {raw_key}"})

    def call(method: str, path: str, body=None) -> dict:
        data = json.dumps(body) if body is not None else None
        response = getattr(api, method)(path, data=data, content_type="application/json")
        collected.append(response.content.decode(errors="replace"))
        return response.json() if response.content else {}

    for platform in ("ios", "android"):
        call("post", "/api/v1/devices/", registration(platform))
    call("post", "/api/v1/devices/", {"platform": "ios", "token": "zz"})  # a refusal, too
    call("get", "/api/v1/devices/", None)
    load_devices(
        app, build_population({"ios": 600, "android": 400}, {"ios": {"01": 20}, "android": {"02": 10}})
    )

    worker = start_worker(concurrency=1, env={"LOG_LEVEL": "DEBUG"})
    campaign_id = call("post", "/api/v1/campaigns/", {"message": {"title": "Hi", "body": "secret test"}})[
        "id"
    ]
    wait_for(lambda: Campaign.objects.get(pk=campaign_id).status == "completed", 120, 0.2, "the campaign")
    call("get", f"/api/v1/campaigns/{campaign_id}/")
    # A credential refused mid-way: the error path logs too.
    fresh_sim.configure(revoked_apns_keys=[fresh_sim.credentials.apns_key_id], fcm_revoked=True)
    second = call("post", "/api/v1/campaigns/", {"message": {"title": "Again"}})["id"]
    wait_for(lambda: Campaign.objects.get(pk=second).status == "paused", 60, 0.2, "the credential pause")
    call("get", f"/api/v1/campaigns/{second}/")
    call("post", "/api/v1/notifications/", {"user_ids": ["u1", "u2"], "message": {"title": "direct"}})

    admin = Client()
    admin.force_login(get_user_model().objects.create_superuser("root", "root@example.com", "pw"))
    device = DeviceToken.objects.filter(app=app).first()
    for path in (
        "/admin/",
        "/admin/tokens/app/",
        f"/admin/tokens/app/{app.pk}/change/",
        "/admin/tokens/apikey/",
        f"/admin/tokens/apikey/{ApiKey.objects.get(app=app).pk}/change/",
        "/admin/tokens/devicetoken/",
        f"/admin/tokens/devicetoken/{device.pk}/change/",
        "/admin/campaigns/campaign/",
        f"/admin/campaigns/campaign/{campaign_id}/change/",
        f"/admin/campaigns/campaign/{second}/change/",
    ):
        response = admin.get(path)
        assert response.status_code in (200, 302), (path, response.status_code)
        collected.append(response.content.decode(errors="replace"))

    worker.stop()
    collected.append(worker.log_file.read_text(errors="replace"))
    collected += [record.getMessage() for record in caplog.records]
    collected += [str(record.args) for record in caplog.records if record.args]
    text = "\n".join(collected)

    secrets = _secrets(app, raw_key, redis_client)
    assert any(name.startswith("issued token") for name in secrets), "the flow minted access tokens"
    assert len(text) > 10_000, "the flow produced output to search"
    leaked = [name for name, value in secrets.items() if value in text]
    assert leaked == [], f"secrets found in responses, admin pages or logs: {leaked}"
