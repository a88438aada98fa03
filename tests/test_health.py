"""/healthz and /readyz against the real database, Redis and broker, and against closed ports."""

from __future__ import annotations

import socket

import pytest
from django.test import Client, override_settings

pytestmark = pytest.mark.django_db


def _closed_port_url(scheme: str) -> str:
    # A port that was just free and is now closed: connections are refused at once.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"{scheme}://:s3cret-password@127.0.0.1:{port}/0"


def test_healthz_answers_while_the_process_serves() -> None:
    response = Client().get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_readyz_is_ok_when_every_dependency_answers(redis_client) -> None:
    response = Client().get("/readyz")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["failed"] == []
    assert {name: check["ok"] for name, check in body["checks"].items()} == {
        "database": True,
        "redis": True,
        "broker": True,
    }


def test_readyz_names_the_failed_dependencies_without_revealing_urls() -> None:
    with override_settings(REDIS_URL=_closed_port_url("redis"), CELERY_BROKER_URL=_closed_port_url("redis")):
        response = Client().get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["failed"] == ["broker", "redis"]
    assert body["checks"]["database"]["ok"] is True
    assert body["checks"]["redis"]["error"]  # the exception type, e.g. ConnectionError
    assert b"s3cret" not in response.content and b"127.0.0.1" not in response.content


def test_readyz_reports_the_database() -> None:
    from django.db import connection

    # The connection, closed and pointed at a closed port, cannot reconnect for the check.
    original = dict(connection.settings_dict)
    connection.close()
    connection.settings_dict["PORT"] = _closed_port_url("postgres").rsplit(":", 1)[1].split("/")[0]
    try:
        response = Client().get("/readyz")
    finally:
        connection.close()
        connection.settings_dict.clear()
        connection.settings_dict.update(original)
    assert response.status_code == 503
    assert response.json()["failed"] == ["database"]
