"""Structured logs: JSON lines carrying campaign, shard and provider from a real worker run, and
no credential or access token in what the worker logs, even at DEBUG."""

from __future__ import annotations

import io
import json
import logging

import pytest

from campaigns.models import Campaign
from campaigns.pytest_fixtures import *  # noqa: F403  (sim, fresh_sim, worker_env, start_worker)
from campaigns.pytest_fixtures import api_client
from campaigns.testing import build_population, load_devices, simulator_app, wait_for
from pushsvc.logging import ContextFilter, JsonFormatter, log_context

pytestmark = pytest.mark.django_db(transaction=True)

PEM = (
    "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n-----END PRIVATE KEY-----"
)


def _logger(stream: io.StringIO) -> logging.Logger:
    handler = logging.StreamHandler(stream)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("pushsvc.test.json")
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger


def test_json_lines_carry_the_bound_context_and_mask_secrets() -> None:
    stream = io.StringIO()
    logger = _logger(stream)
    with log_context(campaign=12, shard=345, provider="ios"):
        logger.warning("campaign %s paused: %s", 12, "credentials rejected")
        logger.info(
            "headers %s", {"authorization": "bearer eyJhbGciOiJFUzI1NiJ9.eyJpc3MiOiJ0ZWFtIn0.c2lnbmF0dXJl"}
        )
        logger.info("key %s", PEM)
    logger.info("outside")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 4
    assert lines[0]["message"] == "campaign 12 paused: credentials rejected"
    assert (lines[0]["campaign"], lines[0]["shard"], lines[0]["provider"]) == (12, 345, "ios")
    assert lines[0]["level"] == "WARNING" and lines[0]["logger"] == "pushsvc.test.json"
    assert "eyJpc3MiOiJ0ZWFtIn0" not in lines[1]["message"] and "[redacted" in lines[1]["message"]
    assert "MIGHAgEAMBMG" not in lines[2]["message"]
    assert "campaign" not in lines[3]


def test_worker_logs_json_with_context_and_never_a_secret(fresh_sim, start_worker, redis_client) -> None:
    app = simulator_app(fresh_sim)
    population = build_population({"ios": 150, "android": 100, "huawei": 50}, {"ios": {"08": 5}})
    load_devices(app, population)
    worker = start_worker(concurrency=1, env={"LOG_JSON": "true", "LOG_LEVEL": "DEBUG"})
    response = api_client(app).post("/api/v1/campaigns/", {"message": {"body": "logs"}}, format="json")
    assert response.status_code == 201
    campaign_id = response.json()["id"]
    wait_for(
        lambda: Campaign.objects.filter(pk=campaign_id, status=Campaign.Status.COMPLETED).exists(),
        60,
        what="the campaign to complete",
    )
    worker.stop()
    text = worker.log_file.read_text()

    records = []
    for line in text.splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))  # every log record is one JSON object
    assert records, text[-2000:]
    completed = [r for r in records if r["message"] == f"campaign {campaign_id} completed"]
    assert completed and completed[0]["campaign"] == campaign_id
    assert completed[0]["provider"] in {"ios", "android", "huawei"} and completed[0]["shard"]

    issued = [
        json.loads(redis_client.get(k))["value"]
        for k in redis_client.keys("pushsvc:cred:*")
        if b":lock" not in k
    ]
    assert issued  # FCM and HMS access tokens were minted and cached during the run
    secrets = [
        app.apns_key_p8.splitlines()[1],
        json.loads(app.fcm_service_account)["private_key"].splitlines()[1],
        app.hms_client_secret,
        app.vapid_private_key.splitlines()[1],
        *issued,
    ]
    for secret in secrets:
        assert secret not in text
