"""Topic and condition sends (POST /api/v1/notifications/ with `topic` or `condition`).

Through the API, then the send task's body (`campaigns.topics.run`) in this process against the
simulator's fast front over TLS (its FCM and HMS fronts fan topic messages out like the real
APIs), on real PostgreSQL and Redis. What a provider received is what the simulator counted
under `topic_key`.
"""

from __future__ import annotations

import pytest

from campaigns import topics
from campaigns.models import Campaign, DirectResult
from campaigns.pytest_fixtures import api_client
from campaigns.testing import simulator_app
from delivery import runtime
from delivery.payload import PushMessage
from delivery.providers.base import Outcome, Target
from delivery.providers.registry import provider_class
from delivery.topics import TopicError, condition_topics, normalize_topic
from simulator.core import topic_key
from tokens.testing import make_app

pytestmark = pytest.mark.django_db(transaction=True)
NOTIFY = "/api/v1/notifications/"
MESSAGE = {"title": "Storm warning", "body": "Stay inside"}


def _results(client, campaign_id: int) -> list[dict]:
    response = client.get(f"/api/v1/campaigns/{campaign_id}/results/")
    assert response.status_code == 200
    return response.json()["results"]


def test_a_topic_send_reaches_fcm_once_and_records_its_message_id(fast_sim) -> None:
    app = simulator_app(fast_sim)
    client = api_client(app)
    response = client.post(NOTIFY, {"message": MESSAGE, "topic": "/topics/weather"}, format="json")
    assert response.status_code == 202, response.content
    sent = response.json()
    assert sent["kind"] == "direct" and sent["target"] == {"topic": "weather", "platforms": ["android"]}
    assert sent["counters"]["targeted"] == 1

    topics.run(sent["id"], "android")
    topics.run(sent["id"], "android")  # the broker redelivers the task: nothing is sent again

    key = topic_key("fcm", "topic", "weather")
    assert fast_sim.counts([key]) == {key: 1}
    assert fast_sim.last([key])[key]["message"]["notification"] == MESSAGE
    campaign = Campaign.objects.get(pk=sent["id"])
    assert (campaign.status, campaign.delivered, campaign.sent) == ("completed", 1, 1)
    [row] = _results(client, sent["id"])
    assert row["device_id"] is None and row["platform"] == "android" and row["outcome"] == "delivered"
    assert row["provider_message_id"].startswith("projects/") and row["status"] == 200


def test_a_condition_goes_to_fcm_and_hms_each_answering_for_itself(fast_sim) -> None:
    app = simulator_app(fast_sim)
    client = api_client(app)
    condition = "'dogs' in topics && ('cats' in topics || !('birds' in topics))"
    response = client.post(
        NOTIFY,
        {"message": MESSAGE, "condition": condition, "platforms": ["android", "huawei"]},
        format="json",
    )
    assert response.status_code == 202, response.content
    campaign_id = response.json()["id"]
    topics.run(campaign_id, "android")
    topics.run(campaign_id, "huawei")

    fcm, hms = topic_key("fcm", "condition", condition), topic_key("hms", "condition", condition)
    assert fast_sim.counts([fcm, hms]) == {fcm: 1, hms: 1}
    assert fast_sim.last([hms])[hms]["message"]["condition"] == condition
    rows = {row["platform"]: row for row in _results(client, campaign_id)}
    assert set(rows) == {"android", "huawei"}
    assert all(row["outcome"] == "delivered" and row["provider_message_id"] for row in rows.values())
    campaign = Campaign.objects.get(pk=campaign_id)
    assert (campaign.status, campaign.targeted, campaign.delivered) == ("completed", 2, 2)


def test_a_transient_answer_is_retried_and_counted_once(fast_sim) -> None:
    """A topic named fa017506... makes the simulator answer 503 the first time only."""
    app = simulator_app(fast_sim)
    response = api_client(app).post(NOTIFY, {"message": MESSAGE, "topic": "fa017506news"}, format="json")
    campaign_id = response.json()["id"]
    topics.run(campaign_id, "android")  # 503: a retry is published, nothing recorded as final
    assert not DirectResult.objects.filter(campaign_id=campaign_id).exists()
    topics.run(campaign_id, "android", 1, None)  # the retry task
    campaign = Campaign.objects.get(pk=campaign_id)
    assert (campaign.status, campaign.sent, campaign.retried, campaign.delivered) == ("completed", 2, 1, 1)
    assert DirectResult.objects.get(campaign_id=campaign_id).attempt == 1
    key = topic_key("fcm", "topic", "fa017506news")
    assert fast_sim.counts([key]) == {key: 1}


def test_the_simulator_refuses_what_fcm_and_hms_would(fast_sim) -> None:
    app = simulator_app(fast_sim)
    for platform in ("android", "huawei"):
        provider = runtime.provider_for(app, platform)
        message = PushMessage.from_dict(MESSAGE)
        for kind, value in (
            ("topic", "no spaces"),
            ("topic", "/topics/prefixed"),
            ("condition", "'a' in topics &&"),
            ("condition", " || ".join(f"'t{i}' in topics" for i in range(6))),
        ):
            result = runtime.run(provider.send(Target(device_id=0, token=value, kind=kind), message))
            assert result.outcome == Outcome.REJECTED, (platform, kind, value, result)
            assert result.status == 400 and kind in result.reason, result.reason
    assert provider_class("android").topics and provider_class("huawei").topics
    assert not provider_class("ios").topics and not provider_class("web").topics


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"topic": "no spaces"}, "topic", "letters, digits"),
        ({"topic": "/topics/"}, "topic", "must name a topic"),
        ({"condition": "'a' in topics || "}, "condition", "topic test was expected"),
        ({"condition": " && ".join(f"'t{i}' in topics" for i in range(6))}, "condition", "at most 5"),
        ({"topic": "news", "user_ids": ["u1"]}, "non_field_errors", "exactly one of"),
        ({"topic": "news", "platforms": ["ios"]}, "platforms", "not a valid choice"),
        ({"user_ids": ["u1"], "platforms": ["android"]}, "platforms", "topic and condition sends"),
        (
            {"topic": "news", "message": {**MESSAGE, "localizations": {"fr": {"title": "Tempête"}}}},
            "localizations",
            "one topic per language",
        ),
        # FCM keeps topic messages to 2,048 bytes: 2,100 bytes of data cannot fit.
        ({"topic": "news", "message": {"title": "t", "data": {"k": "v" * 2100}}}, "body", "too large"),
    ],
)
def test_topic_sends_refuse_what_the_providers_would(body, field, words) -> None:
    client = api_client(make_app())
    response = client.post(NOTIFY, {"message": MESSAGE, **body}, format="json")
    assert response.status_code == 400, response.content
    answer = response.json()
    text = str(answer["errors"][field])
    assert words in text, answer
    assert not Campaign.objects.exists()


def test_topic_names_and_conditions() -> None:
    assert normalize_topic("/topics/a-b_c.d~e%f") == "a-b_c.d~e%f"
    assert condition_topics("\"a\" in topics||'b' in topics") == ["a", "b"]
    for bad in ("", "true", "('a' in topics", "'a' in topics 'b' in topics", "!" * 30 + "'a' in topics"):
        with pytest.raises(TopicError):
            condition_topics(bad)


def test_a_paused_topic_send_waits_and_goes_after_resume(fast_sim, redis_client) -> None:
    app = simulator_app(fast_sim)
    client = api_client(app)
    campaign_id = client.post(NOTIFY, {"message": MESSAGE, "topic": "later"}, format="json").json()["id"]
    assert client.post(f"/api/v1/campaigns/{campaign_id}/pause/").json()["status"] == "paused"
    queued = redis_client.llen("priority")
    topics.run(campaign_id, "android")
    key = topic_key("fcm", "topic", "later")
    assert fast_sim.counts([key]) == {key: 0}
    assert redis_client.llen("priority") == queued + 1, "the task looks again later"
    assert client.post(f"/api/v1/campaigns/{campaign_id}/resume/").json()["status"] == "running"
    topics.run(campaign_id, "android")
    assert fast_sim.counts([key]) == {key: 1}
    assert Campaign.objects.get(pk=campaign_id).status == "completed"


def test_a_topic_send_is_not_duplicated_as_a_broadcast(db) -> None:
    from campaigns import actions, control

    campaign = Campaign.objects.create(
        app=make_app(),
        kind=Campaign.Kind.DIRECT,
        message=MESSAGE,
        target={"topic": "x", "platforms": ["android"]},
    )
    with pytest.raises(control.TransitionError):
        actions.duplicate(campaign)


def test_a_topic_send_lost_with_the_broker_is_sent_again_once(fast_sim, redis_client, settings) -> None:
    """A topic send's only state between attempts is its task message: after the broker lost its
    data, recovery publishes a task for each provider that has not answered (and none for one that has)."""
    import base64
    import json

    from campaigns import recovery

    settings.CAMPAIGN_SHARD_LEASE_S = 0  # recovery waits one lease period after seeing the loss
    app = simulator_app(fast_sim)
    client = api_client(app)
    body = {
        "message": MESSAGE,
        "condition": "'a' in topics || 'b' in topics",
        "platforms": ["android", "huawei"],
    }
    campaign_id = client.post(NOTIFY, body, format="json").json()["id"]
    topics.run(campaign_id, "huawei")  # HMS answered before the loss; FCM's task was still queued
    redis_client.flushdb()  # the broker lost its data: FCM's message is gone

    assert recovery._after_broker_loss(redis_client, redis_client) == 0, "the loss is seen first"
    assert recovery._after_broker_loss(redis_client, redis_client) == 1
    [raw] = redis_client.lrange("priority", 0, -1)
    envelope = json.loads(raw)
    assert envelope["headers"]["task"] == "campaigns.send_topic"
    args, _kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
    assert args[:3] == [campaign_id, "android", 0]

    topics.run(*args)
    fcm = topic_key("fcm", "condition", body["condition"])
    hms = topic_key("hms", "condition", body["condition"])
    assert fast_sim.counts([fcm, hms]) == {fcm: 1, hms: 1}
    campaign = Campaign.objects.get(pk=campaign_id)
    assert (campaign.status, campaign.delivered) == ("completed", 2)
