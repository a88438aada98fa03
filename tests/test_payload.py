"""PushMessage: validation of every field, round trip, and size fitting per provider."""

from __future__ import annotations

import dataclasses

import orjson
import pytest

from delivery.payload import (
    ELLIPSIS,
    MESSAGE_ID_KEY,
    TRUNCATED_KEY,
    PayloadError,
    PayloadTooLarge,
    PushMessage,
    fit_message,
)
from delivery.providers.apns import render_payload as apns_payload
from delivery.providers.fcm import render_message as fcm_message
from delivery.providers.hms import render_message as hms_message
from delivery.providers.registry import provider_class
from delivery.providers.webpush import render_plaintext

PLATFORMS = ("ios", "android", "huawei", "web")


def test_defaults_and_round_trip() -> None:
    message = PushMessage.from_dict(
        {
            "title": "Hello",
            "body": "Line one\nline two",
            "data": {"order": "42"},
            "badge": 3,
            "sound": "default",
            "category": "ORDER",
            "thread_id": "orders",
            "image": "https://cdn.example.com/a.png",
            "url": "https://example.com/orders/42",
            "collapse_key": "order-42",
            "priority": "normal",
            "ttl": 3600,
            "mutable_content": True,
        }
    )
    assert len(message.message_id) == 32
    stored = orjson.loads(orjson.dumps(message.to_dict()))  # as a JSONField would keep it
    assert PushMessage.from_dict(stored) == message
    assert stored["data"] == {"order": "42"}


def test_message_ids_differ_and_can_be_given() -> None:
    assert PushMessage(title="a").message_id != PushMessage(title="a").message_id
    assert PushMessage.from_dict({"title": "a", "message_id": "campaign-7_x"}).message_id == "campaign-7_x"


def test_data_cannot_be_mutated_after_construction() -> None:
    message = PushMessage(title="t", data={"a": "1"})
    with pytest.raises(TypeError):
        message.data["a"] = "2"  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        message.title = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("payload", "field", "words"),
    [
        ([], "message", "JSON object"),
        ({"title": "t", "colour": "red"}, "colour", "unknown field"),
        ({"title": 5}, "title", "must be a string"),
        ({"title": "x" * 513}, "title", "at most 512"),
        ({"title": "a\nb"}, "title", "control characters"),
        ({"body": "é" * 40_000}, "body", "at most 65536 bytes"),
        ({"title": "t", "sound": ["a"]}, "sound", "must be a string"),
        ({"title": "t", "image": "ftp://x/a.png"}, "image", "http(s) URL"),
        ({"title": "t", "url": "https://a b"}, "url", "without spaces"),
        ({"title": "t", "url": "JavaScript:alert(1)"}, "url", "not javascript:"),
        ({"title": "t", "url": "data:text/html,x"}, "url", "not javascript:"),
        ({"title": "t", "collapse_key": "é" * 33}, "collapse_key", "at most 64 bytes"),
        ({"title": "t", "badge": -1}, "badge", "between 0 and"),
        ({"title": "t", "badge": True}, "badge", "must be an integer"),
        ({"title": "t", "badge": "3"}, "badge", "must be an integer"),
        ({"title": "t", "ttl": 2_419_201}, "ttl", "between 0 and 2419200"),
        ({"title": "t", "ttl": -1}, "ttl", "between 0 and 2419200"),
        ({"title": "t", "ttl": 1.5}, "ttl", "must be an integer"),
        ({"title": "t", "priority": "urgent"}, "priority", '"high" or "normal"'),
        ({"title": "t", "silent": "yes"}, "silent", "true or false"),
        ({"title": "t", "mutable_content": 1}, "mutable_content", "true or false"),
        ({"title": "t", "data": ["a"]}, "data", "object of string keys"),
        ({"title": "t", "data": {"n": 1}}, "data.n", "values must be strings"),
        ({"title": "t", "data": {"flag": None}}, "data.flag", "values must be strings"),
        ({"title": "t", "data": {"from": "x"}}, "data.from", "reserved"),
        ({"title": "t", "data": {"notification": "x"}}, "data.notification", "reserved"),
        ({"title": "t", "data": {"message_type": "x"}}, "data.message_type", "reserved"),
        ({"title": "t", "data": {"google.c.a": "x"}}, "data.google.c.a", "reserved"),
        ({"title": "t", "data": {"gcm.n.e": "x"}}, "data.gcm.n.e", "reserved"),
        ({"title": "t", "data": {"aps": "x"}}, "data.aps", "reserved"),
        ({"title": "t", "data": {MESSAGE_ID_KEY: "x"}}, f"data.{MESSAGE_ID_KEY}", "reserved"),
        ({"title": "t", "url": "https://e.com", "data": {"url": "x"}}, "data.url", "clashes"),
        ({"title": "t", "data": {"": "x"}}, "data", "non-empty"),
        ({"title": "t", "data": {f"k{i}": "v" for i in range(101)}}, "data", "at most 100 keys"),
        ({"title": "t", "message_id": "has space"}, "message_id", "1 to 64 characters"),
        ({"title": "t", "message_id": "x" * 65}, "message_id", "1 to 64 characters"),
        ({"silent": True, "title": "t"}, "title", "silent"),
        ({"silent": True, "body": "b"}, "body", "silent"),
        ({"silent": True, "sound": "default"}, "sound", "silent"),
        ({"silent": True, "badge": 1}, "badge", "silent"),
        ({"silent": True, "mutable_content": True}, "mutable_content", "not silent"),
        ({"data": {"a": "b"}}, "body", "needs a title, body, badge or sound"),
    ],
)
def test_every_bad_field_is_named(payload: object, field: str, words: str) -> None:
    with pytest.raises(PayloadError) as info:
        PushMessage.from_dict(payload)
    assert info.value.field == field
    assert words in info.value.message
    assert isinstance(info.value, ValueError)


def test_valid_edge_values_are_accepted() -> None:
    assert PushMessage.from_dict({"title": "t", "ttl": 0}).ttl == 0
    assert PushMessage.from_dict({"title": "t", "ttl": 2_419_200}).ttl == 2_419_200
    assert PushMessage.from_dict({"title": "t", "collapse_key": "k" * 64}).collapse_key == "k" * 64
    assert PushMessage.from_dict({"badge": 0}).badge == 0  # badge-only update is a visible push
    # `url` is http(s) only (browsers open it); an app link travels in data (test_security_payload.py).
    assert PushMessage.from_dict({"title": "t", "data": {"link": "myapp://orders/42"}}).data["link"]
    silent = PushMessage.from_dict({"silent": True, "data": {"sync": "1"}})
    assert silent.silent and silent.data == {"sync": "1"}


def _sizes(message: PushMessage) -> dict[str, int]:
    return {
        "ios": len(apns_payload(message)),
        "android": len(orjson.dumps(fcm_message(message))),
        # the whole request, with room for one 256-character token (HMS counts the body)
        "huawei": len(
            orjson.dumps({"validate_only": False, "message": {"token": ["x" * 256], **hms_message(message)}})
        ),
        # aes128gcm adds 103 bytes to the plaintext
        "web": len(render_plaintext(message)) + 103,
    }


@pytest.mark.parametrize("platform", PLATFORMS)
def test_small_message_is_untouched(platform: str) -> None:
    cls = provider_class(platform)
    message = PushMessage(title="t", body="short")
    assert fit_message(message, cls.payload_size, cls.payload_limit, platform) is message


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("char", ["a", "é", "😀", '"'])  # 1-, 2-, 4-byte UTF-8, and a JSON escape
def test_oversized_body_is_cut_to_fit_on_a_character_boundary(platform: str, char: str) -> None:
    cls = provider_class(platform)
    message = PushMessage(title="Title", body=char * 5000, data={"k": "v"})
    fitted = fit_message(message, cls.payload_size, cls.payload_limit, platform)
    size = _sizes(fitted)[platform]
    assert size <= 4096
    # as long as possible: one more character would not have fitted
    longer = dataclasses.replace(fitted, body=message.body[: len(fitted.body)] + ELLIPSIS)
    assert _sizes(longer)[platform] > 4096
    assert fitted.body.endswith(ELLIPSIS)
    assert set(fitted.body[:-1]) == {char}
    fitted.body.encode("utf-8")  # never half a code point
    assert fitted.data[TRUNCATED_KEY] == "1" and fitted.data["k"] == "v"
    assert fitted.message_id == message.message_id
    assert fitted.rendered_data()[MESSAGE_ID_KEY] == message.message_id


@pytest.mark.parametrize("platform", PLATFORMS)
def test_every_rendering_carries_the_message_id(platform: str) -> None:
    message = PushMessage(title="t", body="b", message_id="abc123")
    rendered = {
        "ios": lambda: orjson.loads(apns_payload(message))[MESSAGE_ID_KEY],
        "android": lambda: fcm_message(message)["data"][MESSAGE_ID_KEY],
        "huawei": lambda: orjson.loads(hms_message(message)["data"])[MESSAGE_ID_KEY],
        "web": lambda: orjson.loads(render_plaintext(message))["data"][MESSAGE_ID_KEY],
    }[platform]()
    assert rendered == "abc123"


def test_check_fits_refuses_what_cannot_fit_even_without_body() -> None:
    big_data = {f"key{i}": "v" * 60 for i in range(70)}  # ~4.7 KB of data alone
    message = PushMessage.from_dict({"title": "t", "body": "b", "data": big_data})
    with pytest.raises(PayloadTooLarge) as info:
        message.check_fits(PLATFORMS)
    assert info.value.platform == "ios"
    assert info.value.size > 4096 and info.value.limit == 4096
    assert "too large for ios" in str(info.value)
    assert info.value.field == "body"


def test_check_fits_accepts_long_bodies_that_truncation_handles() -> None:
    PushMessage.from_dict({"title": "t", "body": "x" * 60_000}).check_fits(PLATFORMS)


def test_check_fits_names_unknown_platforms() -> None:
    with pytest.raises(ValueError, match="no provider for platform 'pager'"):
        PushMessage(title="t").check_fits(["pager"])
