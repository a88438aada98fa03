"""The served OpenAPI schema (/api/schema/) describes the campaign, action and notification
endpoints as they behave: request bodies with their required fields, enums and limits, and every
answer. Real answers, through the WSGI app on PostgreSQL and Redis, are validated against it.

No Celery worker runs: a launched campaign stays running with its plan task queued in Redis.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
import schemathesis
from django.conf import settings as django_settings
from django.utils import timezone
from werkzeug.test import Client as WsgiClient
from werkzeug.test import TestResponse

from campaigns import canary
from campaigns.models import Campaign, OutcomeTally
from delivery import payload, topics
from pushsvc.wsgi import application
from tokens import hygiene
from tokens.models import Platform
from tokens.testing import make_app, make_key, registration

# transaction=True: the WSGI handler closes a connection left inside a transaction after each request.
pytestmark = pytest.mark.django_db(transaction=True)

SCHEMA_URL = "/api/schema/?format=json"
CAMPAIGNS = "/api/v1/campaigns/"
DETAIL = "/api/v1/campaigns/{campaign_id}/"
NOTIFY = "/api/v1/notifications/"
ACTIONS = ("launch", "pause", "resume", "cancel")
AUTH_ERRORS = {"401", "403", "429"}
BODY_ERRORS = {"400", "413", "415"}
IDEMPOTENT_ERRORS = {"409", "422"}  # Idempotency-Key: in progress, reused with another body
MESSAGE = {"title": "Sale", "body": "Everything must go"}


def fetch_schema() -> dict[str, Any]:
    response = WsgiClient(application).get(SCHEMA_URL)
    assert response.status_code == 200, response.text[:300]
    return json.loads(response.text)


@pytest.fixture
def spec() -> dict[str, Any]:
    # Per test: the WSGI handler's request signals touch the database connection, allowed only
    # inside a test's database access.
    return fetch_schema()


def resolve(spec: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """Follow a $ref, or the one-element allOf drf-spectacular wraps a nullable $ref in."""
    while True:
        if "$ref" in node:
            node = spec["components"]["schemas"][node["$ref"].rsplit("/", 1)[1]]
        elif len(node.get("allOf", [])) == 1:
            node = node["allOf"][0]
        else:
            return node


def operation(spec: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    return spec["paths"][path][method]


def request_body(spec: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    op = operation(spec, method, path)
    assert "requestBody" in op, f"{method.upper()} {path} declares no request body"
    return resolve(spec, op["requestBody"]["content"]["application/json"]["schema"])


def prop(spec: dict[str, Any], obj: dict[str, Any], name: str) -> dict[str, Any]:
    assert name in obj["properties"], (name, sorted(obj["properties"]))
    return resolve(spec, obj["properties"][name])


# --- what the schema says ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "path", "success", "errors"),
    [
        ("post", CAMPAIGNS, "201", BODY_ERRORS | IDEMPOTENT_ERRORS),
        ("get", DETAIL, "200", {"404"}),
        *(("post", f"{DETAIL}{a}/", "200", {"404", "409"}) for a in ("launch", "pause", "cancel")),
        ("post", f"{DETAIL}resume/", "200", {"404", "409"} | BODY_ERRORS),
        ("post", NOTIFY, "202", BODY_ERRORS | IDEMPOTENT_ERRORS),
    ],
)
def test_every_answer_is_declared_with_its_shape(spec, method, path, success, errors) -> None:
    responses = operation(spec, method, path)["responses"]
    assert set(responses) == {success} | AUTH_ERRORS | errors
    campaign = resolve(spec, responses[success]["content"]["application/json"]["schema"])
    assert {"id", "status", "message", "counters", "progress"} <= set(campaign["required"])
    assert prop(spec, campaign, "status")["enum"] == list(Campaign.Status.values)
    for code in AUTH_ERRORS | errors:
        error = resolve(spec, responses[code]["content"]["application/json"]["schema"])
        assert error["required"] == ["detail"] and "errors" in error["properties"], (code, error)


def test_campaign_body_has_the_message_target_rollout_and_limits(spec) -> None:
    body = request_body(spec, "post", CAMPAIGNS)
    assert operation(spec, "post", CAMPAIGNS)["requestBody"]["required"] is True
    assert body["required"] == ["message"]
    assert {"name", "target", "send_at", "rollout", "halt_error_rate", "draft"} <= set(body["properties"])
    message = prop(spec, body, "message")
    # The message fields are PushMessage.from_dict's, no more, no fewer.
    assert set(message["properties"]) == set(payload.FIELDS)
    assert prop(spec, message, "title")["maxLength"] == payload.TITLE_MAX
    assert prop(spec, message, "body")["maxLength"] == payload.BODY_MAX_BYTES
    assert prop(spec, message, "priority")["enum"] == ["high", "normal"]
    assert prop(spec, message, "data")["maxProperties"] == payload.DATA_MAX_KEYS
    assert prop(spec, message, "ttl")["maximum"] == payload.TTL_MAX
    target = prop(spec, body, "target")
    platforms = prop(spec, target, "platforms")
    assert resolve(spec, platforms["items"])["enum"] == list(Platform.values)
    assert platforms["minItems"] == 1
    rollout = prop(spec, body, "rollout")
    assert prop(spec, rollout, "start_rate")["maximum"] == 2**31 - 1
    rate = prop(spec, body, "halt_error_rate")
    assert (rate["minimum"], rate["maximum"]) == (0, 1)


def test_notification_body_has_the_recipients_and_their_limit(spec) -> None:
    body = request_body(spec, "post", NOTIFY)
    assert body["required"] == ["message"]
    assert prop(spec, body, "message")["properties"].keys() == set(payload.FIELDS)
    users, devices = prop(spec, body, "user_ids"), prop(spec, body, "device_ids")
    assert users["maxItems"] == devices["maxItems"] == django_settings.DIRECT_SEND_MAX_RECIPIENTS
    assert devices["items"]["format"] == "uuid"
    assert (users["items"]["minLength"], users["items"]["maxLength"]) == (1, 255)
    # Exactly one of them, non-empty (DirectSendSerializer.validate).
    assert [alt["required"] for alt in body["oneOf"]] == [
        ["user_ids"],
        ["device_ids"],
        ["topic"],
        ["condition"],
    ]
    assert prop(spec, body, "condition")["maxLength"] == topics.CONDITION_MAX
    platforms = prop(spec, body, "platforms")
    assert resolve(spec, platforms["items"])["enum"] == ["android", "huawei"]


def test_localizations_and_the_idempotency_key_are_described(spec) -> None:
    for path in (CAMPAIGNS, NOTIFY):
        message = prop(spec, request_body(spec, "post", path), "message")
        languages = prop(spec, message, "localizations")
        assert languages["maxProperties"] == payload.LOCALIZATIONS_MAX
        text = resolve(spec, languages["additionalProperties"])
        assert set(text["properties"]) == {"title", "body"}
        assert text["properties"]["title"]["maxLength"] == payload.TITLE_MAX
        [header] = [p for p in operation(spec, "post", path)["parameters"] if p["in"] == "header"]
        assert header["name"] == "Idempotency-Key" and not header.get("required")
        assert header["schema"]["maxLength"] == 255


def test_resume_takes_an_optional_body_and_the_other_actions_none(spec) -> None:
    body = request_body(spec, "post", f"{DETAIL}resume/")
    assert not operation(spec, "post", f"{DETAIL}resume/")["requestBody"].get("required")
    confirm = prop(spec, body, "confirm_prune")
    assert (confirm["type"], confirm["default"]) == ("boolean", False)
    rate = prop(spec, body, "halt_error_rate")
    assert (rate["type"], rate["minimum"], rate["maximum"]) == ("number", 0, 1)
    for action in ("launch", "pause", "cancel"):
        assert "requestBody" not in operation(spec, "post", f"{DETAIL}{action}/"), action
    assert len({operation(spec, "post", f"{DETAIL}{a}/")["operationId"] for a in ACTIONS}) == len(ACTIONS)


def test_the_recipient_limit_in_the_schema_is_the_enforced_one(settings, redis_client) -> None:
    settings.DIRECT_SEND_MAX_RECIPIENTS = 3
    spec = fetch_schema()
    body = request_body(spec, "post", NOTIFY)
    assert prop(spec, body, "user_ids")["maxItems"] == prop(spec, body, "device_ids")["maxItems"] == 3
    api = Api(make_key(make_app(), ("send",)))
    refused = api.post(NOTIFY, {"message": MESSAGE, "user_ids": ["a", "b", "c", "d"]})
    assert refused.status_code == 400
    assert refused.json["errors"]["user_ids"] == [
        "at most 3 recipients per direct send (got 4); use a campaign"
    ]
    assert api.post(NOTIFY, {"message": MESSAGE, "user_ids": ["a", "b", "c"]}).status_code == 202
    assert Campaign.objects.count() == 1


# --- real answers against it ---------------------------------------------------------------------
class Api:
    """Requests through the WSGI app, each answer checked against the schema it is served with."""

    def __init__(self, key: str | None) -> None:
        self.client = WsgiClient(application)
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.schema = schemathesis.openapi.from_wsgi(SCHEMA_URL, application)
        self.spec = self.schema.raw_schema

    def post(self, path: str, body: Any = None, **kw: Any) -> TestResponse:
        if body is not None and "data" not in kw:
            kw.update(data=json.dumps(body), content_type="application/json")
        return self.checked("post", path, self.client.post(path, headers=self.headers, **kw))

    def get(self, path: str) -> TestResponse:
        return self.checked("get", path, self.client.get(path, headers=self.headers))

    def checked(self, method: str, path: str, response: TestResponse) -> TestResponse:
        template = path
        for segment in path.strip("/").split("/"):
            if segment.isdigit():
                template = template.replace(f"/{segment}/", "/{campaign_id}/")
        declared = self.spec["paths"][template][method]["responses"]
        assert str(response.status_code) in declared, (method, path, response.status_code, response.text)
        # Raises with every mismatch between the answer and the declared schema.
        self.schema[template][method.upper()].validate_response(response)
        body = json.loads(response.text)
        media = declared[str(response.status_code)]["content"]["application/json"]["schema"]
        assert_same_keys(self.spec, media, body, path)
        return response


def assert_same_keys(spec: dict[str, Any], node: dict[str, Any], value: Any, where: str) -> None:
    """The schema validation above lets unknown keys through: an answer must not carry a key the
    schema leaves out (a field added to `represent` must be described too)."""
    node = resolve(spec, node)
    if isinstance(value, dict) and "properties" in node:
        assert set(value) <= set(node["properties"]), (where, set(value) - set(node["properties"]))
        for key, item in value.items():
            assert_same_keys(spec, node["properties"][key], item, f"{where}.{key}")
    elif isinstance(value, dict) and isinstance(node.get("additionalProperties"), dict):
        for key, item in value.items():
            assert_same_keys(spec, node["additionalProperties"], item, f"{where}.{key}")
    elif isinstance(value, list) and "items" in node:
        for item in value:
            assert_same_keys(spec, node["items"], item, f"{where}[]")


@pytest.fixture
def api(redis_client) -> Api:
    return Api(make_key(make_app(), ("devices", "send")))


def test_campaign_lifecycle_answers_match_the_schema(api) -> None:
    draft = api.post(CAMPAIGNS, {"message": MESSAGE, "draft": True, "name": "spring"}).json
    assert draft["status"] == "draft"

    later = (timezone.now() + timedelta(days=1)).isoformat()
    scheduled = api.post(CAMPAIGNS, {"message": MESSAGE, "send_at": later}).json
    assert scheduled["status"] == "scheduled"

    body = {
        "message": {**MESSAGE, "data": {"k": "v"}, "badge": 2, "ttl": 60, "priority": "normal"},
        "target": {"platforms": ["ios", "android"], "user_ids": ["u1"], "min_app_version": "2.1"},
        "rollout": {"start_rate": 10, "max_rate": 100, "ramp_minutes": 5},
        "halt_error_rate": 0.1,
    }
    running = api.post(CAMPAIGNS, body).json
    assert running["status"] == "running"
    url = f"{CAMPAIGNS}{running['id']}/"

    # Fill what a finished shard leaves behind, so that the nested objects are checked non-empty.
    Campaign.objects.filter(pk=running["id"]).update(
        stale_at_launch={"target": 10, "unseen": 2, "days": 30, "share": 0.2}
    )
    OutcomeTally.objects.create(
        campaign_id=running["id"], platform="ios", outcome="invalid", reason="x", count=3
    )
    hygiene.record_sends(running["id"], "apns", 10, 3)
    read = api.get(url).json
    assert read["failures"] == [{"platform": "ios", "outcome": "invalid", "reason": "x", "count": 3}]
    assert read["hygiene"]["invalid_spike"]["apns"]["window_invalid"] == 3

    assert api.post(f"{CAMPAIGNS}{draft['id']}/pause/").status_code == 409
    assert api.post(f"{url}pause/").json["status"] == "paused"
    refused = api.post(f"{url}resume/", {"halt_error_rate": 2})
    assert refused.status_code == 400 and "halt_error_rate" in refused.json["errors"]
    resumed = api.post(f"{url}resume/", {"confirm_prune": True, "halt_error_rate": 0.25}).json
    assert resumed["status"] == "running" and resumed["halt_error_rate"] == 0.25
    assert Campaign.objects.get(pk=running["id"]).prune_confirmed
    assert api.post(f"{url}cancel/").json["status"] == "cancelled"
    assert api.post(f"{url}cancel/").status_code == 409
    assert api.post(f"{CAMPAIGNS}{draft['id']}/launch/").json["status"] == "running"
    assert api.get(f"{CAMPAIGNS}999999999/").status_code == 404


def test_direct_send_and_refusals_match_the_schema(api) -> None:
    device = registration("android", user_id="u7")
    assert api.client.post(
        "/api/v1/devices/", headers=api.headers, data=json.dumps(device), content_type="application/json"
    ).status_code in (200, 201)
    sent = api.post(NOTIFY, {"message": MESSAGE, "user_ids": ["u7"]})
    assert sent.status_code == 202
    assert sent.json["kind"] == "direct" and sent.json["counters"]["targeted"] == 1
    assert sent.json["target"] == {"user_ids": ["u7"]}

    before = Campaign.objects.count()
    assert api.post(NOTIFY, {"message": MESSAGE}).status_code == 400
    assert api.post(CAMPAIGNS, {"message": {"title": 5}}).json["errors"] == {
        "title": ["must be a string, got int"]
    }
    assert api.post(CAMPAIGNS, data="x", content_type="text/plain").status_code == 415
    big = {"message": {"title": "t", "body": "x" * django_settings.DATA_UPLOAD_MAX_MEMORY_SIZE}}
    assert api.post(CAMPAIGNS, big).status_code == 413
    assert Campaign.objects.count() == before

    topic = api.post(NOTIFY, {"message": MESSAGE, "condition": "'a' in topics", "platforms": ["huawei"]})
    assert topic.status_code == 202 and topic.json["target"]["condition"] == "'a' in topics"
    before = Campaign.objects.count()

    keyed = dict(api.headers)
    api.headers = {**keyed, "Idempotency-Key": "schema-1"}
    first = api.post(CAMPAIGNS, {"message": MESSAGE, "draft": True})
    replay = api.post(CAMPAIGNS, {"message": MESSAGE, "draft": True})
    assert (first.status_code, replay.status_code) == (201, 201) and replay.json == first.json
    assert api.post(CAMPAIGNS, {"message": MESSAGE}).status_code == 422
    api.headers = keyed
    assert Campaign.objects.count() == before + 1
    before += 1

    anonymous, devices_only = Api(None), Api(make_key(make_app(), ("devices",)))
    assert anonymous.post(NOTIFY, {"message": MESSAGE, "user_ids": ["u7"]}).status_code == 401
    assert devices_only.post(CAMPAIGNS, {"message": MESSAGE}).status_code == 403
    assert Campaign.objects.count() == before


def test_a_canary_campaign_answer_matches_the_schema(api, spec) -> None:
    body = request_body(spec, "post", CAMPAIGNS)
    cohort = prop(spec, body, "canary")
    assert (prop(spec, cohort, "size")["minimum"], prop(spec, cohort, "size")["maximum"]) == (
        1,
        canary.MAX_SIZE,
    )
    assert prop(spec, cohort, "wait_s")["maximum"] == canary.MAX_WAIT_S
    assert (
        prop(spec, cohort, "max_error_rate")["minimum"],
        prop(spec, cohort, "max_error_rate")["maximum"],
    ) == (0, 1)

    created = api.post(CAMPAIGNS, {"message": MESSAGE, "canary": {"size": 5, "wait_s": 30}}).json
    assert created["canary"]["phase"] == "pending"
    refused = api.post(CAMPAIGNS, {"message": MESSAGE, "canary": {"size": 0}})
    assert refused.status_code == 400 and "size" in refused.json["errors"]["canary"]
    # A decided canary, so that the nested figures are checked non-empty.
    Campaign.objects.filter(pk=created["id"]).update(
        canary_phase="failed",
        canary_decide_at=timezone.now(),
        canary_result={
            "sample": 5,
            "target": 9,
            "delivered": 4,
            "failed": 1,
            "invalidated": 0,
            "invalid_kept": 0,
            "expired": 0,
            "errors": 1,
            "answered": 5,
            "error_rate": 0.2,
            "max_error_rate": 0.05,
            "decision": "pause",
            "decided_at": timezone.now().isoformat(),
        },
    )
    read = api.get(f"{CAMPAIGNS}{created['id']}/").json
    assert read["canary"]["figures"]["error_rate"] == 0.2 and read["canary"]["decision"] == "pause"
