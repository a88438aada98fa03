"""Every row of every provider's mapping table, checked against an expectation list written by hand
from ../shared/PROTOCOLS.md (not derived from the tables), plus the parsing around the tables.

The lists below are the specification: if a table row changes, this file has to be changed on purpose.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from delivery.providers import mapping as m
from delivery.providers.apns import APNS_TABLE
from delivery.providers.base import Outcome
from delivery.providers.fcm import FCM_TABLE, INVALID_REGISTRATION
from delivery.providers.fcm import _error as fcm_error
from delivery.providers.hms import HMS_TABLE, _illegal_tokens
from delivery.providers.webpush import WEBPUSH_TABLE, topic_for

D, R, T, X, A = (
    Outcome.DELIVERED,
    Outcome.RETRY,
    Outcome.INVALID_TOKEN,
    Outcome.REJECTED,
    Outcome.AUTH_FAILURE,
)

# (status, reason, outcome, default retry-after, refresh-and-retry-once)
APNS_EXPECTED = [
    (200, "", D, None, False),
    (400, "BadCollapseId", X, None, False),
    (400, "BadDeviceToken", T, None, False),
    (400, "BadExpirationDate", X, None, False),
    (400, "BadMessageId", X, None, False),
    (400, "BadPriority", X, None, False),
    (400, "BadTopic", A, None, False),
    (400, "DeviceTokenNotForTopic", T, None, False),
    (400, "DuplicateHeaders", X, None, False),
    (400, "IdleTimeout", R, 10.0, False),
    (400, "InvalidPushType", X, None, False),
    (400, "MissingDeviceToken", X, None, False),
    (400, "MissingTopic", A, None, False),
    (400, "PayloadEmpty", X, None, False),
    (400, "TopicDisallowed", A, None, False),
    (403, "BadCertificate", A, None, False),
    (403, "BadCertificateEnvironment", A, None, False),
    (403, "ExpiredProviderToken", A, None, True),
    (403, "Forbidden", A, None, False),
    (403, "InvalidProviderToken", A, None, False),
    (403, "MissingProviderToken", A, None, False),
    (403, "UnrelatedKeyIdInToken", A, None, False),
    (403, "BadEnvironmentKeyIdInToken", A, None, False),
    (404, "BadPath", X, None, False),
    (405, "MethodNotAllowed", X, None, False),
    (410, "Unregistered", T, None, False),
    (410, "ExpiredToken", T, None, False),
    (413, "PayloadTooLarge", X, None, False),
    (429, "TooManyProviderTokenUpdates", R, 60.0, False),
    (429, "TooManyRequests", R, 60.0, False),
    (500, "InternalServerError", R, 10.0, False),
    (503, "ServiceUnavailable", R, 10.0, False),
    (503, "Shutdown", R, 10.0, False),
]

FCM_EXPECTED = [
    (200, "", D, None, False),
    (400, "INVALID_ARGUMENT", X, None, False),
    (400, INVALID_REGISTRATION, T, None, False),
    (404, "UNREGISTERED", T, None, False),
    (403, "SENDER_ID_MISMATCH", T, None, False),
    (429, "QUOTA_EXCEEDED", R, 60.0, False),
    (503, "UNAVAILABLE", R, 10.0, False),
    (500, "INTERNAL", R, 10.0, False),
    (401, "THIRD_PARTY_AUTH_ERROR", A, None, False),
    (400, "UNSPECIFIED_ERROR", X, None, False),
    (500, "UNSPECIFIED_ERROR", R, 10.0, False),
    (401, "UNAUTHENTICATED", A, None, True),
    (403, "PERMISSION_DENIED", A, None, False),
    (404, "NOT_FOUND", A, None, False),
    (429, "RESOURCE_EXHAUSTED", R, 60.0, False),
    (504, "DEADLINE_EXCEEDED", R, 10.0, False),
]

HMS_EXPECTED = [
    ("80000000", D, None, False),
    ("80100000", D, None, False),  # the rest of a partial success; illegal tokens handled apart
    ("80100001", X, None, False),
    ("80100003", X, None, False),
    ("80100004", X, None, False),
    ("80100013", X, None, False),
    ("80200001", A, None, False),
    ("80200003", A, None, True),
    ("80300002", A, None, False),
    ("80300007", T, None, False),
    ("80300008", X, None, False),
    ("80300010", X, None, False),
    ("80300011", X, None, False),
    ("80000001", R, 10.0, False),
    ("81000001", R, 10.0, False),
]

WEBPUSH_EXPECTED = [
    (200, D, None),
    (201, D, None),
    (202, D, None),
    (400, X, None),
    (401, A, None),
    (403, X, None),
    (404, T, None),
    (410, T, None),
    (413, X, None),
    (429, R, 60.0),
    (500, R, 10.0),
    (502, R, 10.0),
    (503, R, 10.0),
    (504, R, 10.0),
]


def _check(row: m.Row, outcome: Outcome, retry_after: float | None, refresh: bool) -> None:
    assert (row.outcome, row.retry_after, row.refresh_credential) == (outcome, retry_after, refresh)


@pytest.mark.parametrize(("status", "reason", "outcome", "retry_after", "refresh"), APNS_EXPECTED)
def test_apns_row(
    status: int, reason: str, outcome: Outcome, retry_after: float | None, refresh: bool
) -> None:
    _check(m.lookup(APNS_TABLE, status, reason), outcome, retry_after, refresh)


@pytest.mark.parametrize(("status", "reason", "outcome", "retry_after", "refresh"), FCM_EXPECTED)
def test_fcm_row(
    status: int, reason: str, outcome: Outcome, retry_after: float | None, refresh: bool
) -> None:
    _check(m.lookup(FCM_TABLE, status, reason), outcome, retry_after, refresh)


@pytest.mark.parametrize(("code", "outcome", "retry_after", "refresh"), HMS_EXPECTED)
def test_hms_row(code: str, outcome: Outcome, retry_after: float | None, refresh: bool) -> None:
    for status in (200, 400, 401, 503):  # HMS's HTTP status varies; the code decides
        _check(m.lookup(HMS_TABLE, status, code), outcome, retry_after, refresh)


@pytest.mark.parametrize(("status", "outcome", "retry_after"), WEBPUSH_EXPECTED)
def test_webpush_row(status: int, outcome: Outcome, retry_after: float | None) -> None:
    _check(m.lookup(WEBPUSH_TABLE, status, ""), outcome, retry_after, False)


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        (APNS_TABLE, {(s, r) for s, r, *_ in APNS_EXPECTED}),
        (FCM_TABLE, {(s, r) for s, r, *_ in FCM_EXPECTED}),
        (HMS_TABLE, {(m.ANY, c) for c, *_ in HMS_EXPECTED}),
        (WEBPUSH_TABLE, {(s, "") for s, *_ in WEBPUSH_EXPECTED}),
    ],
    ids=["apns", "fcm", "hms", "webpush"],
)
def test_no_table_row_is_left_without_an_expectation(table: m.Table, expected: set) -> None:
    assert set(table) == expected


def test_the_documented_apns_reasons_are_all_mapped() -> None:
    # The reason list of ../shared/PROTOCOLS.md ("Reasons"), copied by hand.
    documented = """BadCollapseId BadDeviceToken BadExpirationDate BadMessageId BadPriority BadTopic
        DeviceTokenNotForTopic DuplicateHeaders IdleTimeout InvalidPushType MissingDeviceToken MissingTopic
        PayloadEmpty TopicDisallowed BadCertificate BadCertificateEnvironment ExpiredProviderToken Forbidden
        InvalidProviderToken MissingProviderToken UnrelatedKeyIdInToken BadEnvironmentKeyIdInToken BadPath
        MethodNotAllowed Unregistered ExpiredToken PayloadTooLarge TooManyProviderTokenUpdates TooManyRequests
        InternalServerError ServiceUnavailable Shutdown"""
    documented = documented.split()
    assert set(documented) <= {reason for _, reason in APNS_TABLE}


@pytest.mark.parametrize(
    ("status", "outcome", "retry_after"),
    [
        (204, D, None),
        (301, X, None),
        (418, X, None),
        (401, A, None),
        (403, A, None),
        (429, R, 60.0),
        (502, R, 10.0),
    ],
)
def test_unknown_answers_fall_back_on_the_status_and_never_prune(
    status: int, outcome: Outcome, retry_after: float | None
) -> None:
    row = m.lookup(APNS_TABLE, status, "SomethingNew")
    assert (row.outcome, row.retry_after) == (outcome, retry_after)
    # Pruning needs a documented reason: an unknown one, even on 410, keeps the token.
    assert m.lookup(APNS_TABLE, 410, "SomethingNew").outcome is X
    assert m.lookup(FCM_TABLE, 400, "SOMETHING_NEW").outcome is X


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        ("120", 120.0),
        ("0", 0.0),
        ("soon", None),
        ("Wed, 21 Oct 2099 07:28:00 GMT", "future"),
    ],
)
def test_retry_after_header(header: str | None, expected: object) -> None:
    value = m.parse_retry_after(header, now=datetime(2026, 1, 1, tzinfo=UTC).timestamp())
    if expected == "future":
        assert value is not None and value > 365 * 86400
    else:
        assert value == expected


def test_provider_retry_after_overrides_the_default_both_ways() -> None:
    from delivery.providers.base import Target

    target = Target(1, "t")
    assert m.make_result(target, m.THROTTLED, 429, "", {"retry-after": "5"}).retry_after == 5.0
    assert m.make_result(target, m.THROTTLED, 429, "", {}).retry_after == 60.0
    assert m.make_result(target, m.SERVER_ERROR, 503, "", {"retry-after": "300"}).retry_after == 300.0
    assert m.make_result(target, m.REJECTED, 400, "", {"retry-after": "5"}).retry_after is None


def _fcm_body(status: str, message: str, code: str | None) -> bytes:
    import orjson

    details = (
        [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": code}] if code else []
    )
    return orjson.dumps({"error": {"code": 400, "message": message, "status": status, "details": details}})


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (_fcm_body("NOT_FOUND", "Requested entity was not found.", "UNREGISTERED"), "UNREGISTERED"),
        (_fcm_body("PERMISSION_DENIED", "SenderId mismatch", "SENDER_ID_MISMATCH"), "SENDER_ID_MISMATCH"),
        (
            _fcm_body(
                "INVALID_ARGUMENT",
                "The registration token is not a valid FCM registration token",
                "INVALID_ARGUMENT",
            ),
            INVALID_REGISTRATION,
        ),
        # a payload problem is not a token problem, even though it is INVALID_ARGUMENT
        (
            _fcm_body("INVALID_ARGUMENT", "Invalid value at 'message.data[0].value' (TYPE_STRING)", None),
            "INVALID_ARGUMENT",
        ),
        (
            _fcm_body("INVALID_ARGUMENT", "Request contains an invalid argument.", "INVALID_ARGUMENT"),
            "INVALID_ARGUMENT",
        ),
        (
            _fcm_body("UNAUTHENTICATED", "Request had invalid authentication credentials.", None),
            "UNAUTHENTICATED",
        ),
        (b"<html>bad gateway</html>", ""),
    ],
)
def test_fcm_error_code_is_read_from_the_fcm_error_detail(body: bytes, code: str) -> None:
    assert fcm_error(body)[0] == code


def test_hms_partial_success_lists_only_illegal_tokens() -> None:
    msg = '{"success":2,"failure":1,"illegal_tokens":["bad-1"]}'
    assert _illegal_tokens(msg) == {"bad-1"}
    assert _illegal_tokens("not json") == frozenset()
    assert _illegal_tokens('{"success":3}') == frozenset()


@pytest.mark.parametrize(
    ("key", "expected_len"), [("news", 4), ("a" * 32, 32), ("a" * 33, 32), ("sports: live!", 32), ("é", 32)]
)
def test_webpush_topic_is_at_most_32_base64url_characters(key: str, expected_len: int) -> None:
    import re

    topic = topic_for(key)
    assert len(topic) == expected_len
    assert re.fullmatch(r"[A-Za-z0-9_-]+", topic)
    assert topic_for(key) == topic


@pytest.mark.parametrize(
    ("endpoint", "origin"),
    [
        ("https://fcm.googleapis.com/fcm/send/abc", "https://fcm.googleapis.com"),
        (
            "https://Updates.Push.Services.Mozilla.com:443/wpush/v2/x",
            "https://updates.push.services.mozilla.com",
        ),
        ("https://push.example.com:8443/x", "https://push.example.com:8443"),
        ("http://127.0.0.1:8080/wp/1", "http://127.0.0.1:8080"),
        ("https://[::1]:9443/wp/1", "https://[::1]:9443"),
    ],
)
def test_webpush_vapid_audience_is_the_serialized_origin(endpoint: str, origin: str) -> None:
    from urllib.parse import urlsplit

    from delivery.providers.webpush import _origin

    assert _origin(urlsplit(endpoint)) == origin
