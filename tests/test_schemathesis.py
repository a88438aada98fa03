"""Schemathesis against the served OpenAPI schema (/api/schema/), through the real WSGI app,
PostgreSQL and Redis: generated requests (valid and invalid by the schema) to every devices,
campaigns and notifications operation with a valid key of both scopes. No answer may be a 5xx,
and every 4xx carries the API's error shape with a message that says what is wrong.

The number of examples per operation is SCHEMATHESIS_EXAMPLES (default 300; 12 operations make
about 3,600 requests plus the ones schemathesis adds for negative and coverage phases).
"""

from __future__ import annotations

import json
import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pushsvc.wsgi import application
from tokens.testing import make_app, make_key

EXAMPLES = int(os.environ.get("SCHEMATHESIS_EXAMPLES", "300"))

schema = schemathesis.openapi.from_wsgi("/api/schema/?format=json", application)

# transaction=True: the WSGI handler closes a connection left inside a transaction after each request.
pytestmark = pytest.mark.django_db(transaction=True)

SEEN: dict[str, int] = {}


@pytest.fixture
def auth_headers(redis_client) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_key(make_app(), ('devices', 'send'))}"}


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_no_server_errors_and_every_4xx_says_what_is_wrong(case, auth_headers) -> None:
    # The schema's bearer scheme makes schemathesis generate Authorization values; replace them with
    # the valid key so the requests reach validation (auth failures are test_security.py's subject).
    case.headers = {**(case.headers or {}), **auth_headers}
    response = case.call()
    status = response.status_code
    SEEN[str(status)] = SEEN.get(str(status), 0) + 1
    assert status < 500, f"{case.method} {case.formatted_path} -> {status}: {response.text[:500]}"
    if 400 <= status < 500:
        try:
            body = json.loads(response.text)
        except ValueError:
            pytest.fail(
                f"{case.method} {case.formatted_path} -> {status} without a JSON body: {response.text[:300]}"
            )
        assert isinstance(body, dict), body
        assert isinstance(body.get("detail"), str) and body["detail"].strip(), body


# The schema describes no request body for the campaign and notification POSTs (drf-spectacular
# cannot guess the serializers of those APIViews), so schemathesis sends them nothing worth
# judging. These bodies come from Hypothesis directly: near-valid requests with arbitrary JSON
# in every field, through the same WSGI app.
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)
FIELDS = {
    "/api/v1/campaigns/": ["name", "message", "target", "send_at", "rollout", "halt_error_rate", "draft"],
    "/api/v1/notifications/": ["user_ids", "device_ids", "message"],
}
MESSAGE_FIELDS = ["title", "body", "data", "badge", "sound", "ttl", "priority", "collapse_key", "url"]


@st.composite
def near_valid_bodies(draw, path: str) -> dict:
    body: dict = {"message": {"title": "t", "body": "b"}, "draft": True}
    if path.endswith("notifications/"):
        body = {"message": {"title": "t"}, "user_ids": ["u1"]}
    for field in draw(st.lists(st.sampled_from(FIELDS[path]), max_size=3, unique=True)):
        body[field] = draw(JSON)
    if isinstance(body.get("message"), dict):
        for field in draw(st.lists(st.sampled_from(MESSAGE_FIELDS), max_size=3, unique=True)):
            body["message"][field] = draw(JSON)
    return body


@pytest.mark.parametrize("path", list(FIELDS))
def test_arbitrary_json_in_campaign_and_notification_bodies(path, auth_headers) -> None:
    from django.test import Client

    client = Client(headers=auth_headers)

    @given(near_valid_bodies(path))
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    def run(body: dict) -> None:
        response = client.post(path, json.dumps(body), content_type="application/json")
        SEEN[str(response.status_code)] = SEEN.get(str(response.status_code), 0) + 1
        assert response.status_code in (200, 201, 202, 400), (
            body,
            response.status_code,
            response.content[:300],
        )
        if response.status_code == 400:
            assert response.json()["detail"].strip()

    run()


def test_the_generated_requests_covered_refusals_and_successes() -> None:
    """Runs after the generated tests in this module: the run reached both outcomes, so the
    assertions above had something to judge (a schema that generated nothing would pass them)."""
    if not SEEN:
        pytest.skip("run together with the generated tests")
    classes = {code[0] for code in SEEN}
    assert classes == {"2", "4"}, SEEN
    print("schemathesis outcomes:", SEEN)
