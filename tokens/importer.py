"""CSV rows of `import_tokens` as validated registrations or as COPY text lines.

The COPY path of a large import is bounded by Python while PostgreSQL ingests, and most of that
was building a request body, a `Registration` and a `uuid.UUID` for every row. `copy_chunks` first
tries `fast_copy_line`, which accepts only rows that `validate_registration` accepts too (a
canonical lowercase UUID, an iOS/Android/Huawei token of the usual shape, short printable
texts, a well-formed locale) and renders them the way the validated `Registration` renders. Any
other row (web subscriptions, upper-case UUIDs, anything unusual or wrong) goes through
`validate_registration` itself, so the rules and the error messages are the validator's, never
a second copy of them. tests/test_import_tokens.py checks both paths give the same line.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator
from typing import Any

from .validation import _LOCALE as LOCALE_TAG
from .validation import (
    APNS_TOKEN_MAX,
    APNS_TOKEN_MIN,
    APP_VERSION_MAX,
    LOCALE_MAX,
    PROVIDER_TOKEN_MAX_BYTES,
    USER_ID_MAX,
    Registration,
    RegistrationError,
    validate_registration,
)

COLUMNS = ("device_id", "platform", "token", "user_id", "app_version", "locale", "p256dh", "auth")
REQUIRED = 4
# Columns of the staging table, in the order of a COPY line.
STAGE_COLUMNS = (
    "line, device_id, platform, token, token_hash, web_p256dh, web_auth, user_id, app_version, locale"
)
CHUNK_ROWS = 2_000

# uuid.UUID accepts this and prints it back unchanged; other spellings take the slow path.
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_APNS = re.compile(rf"[0-9a-fA-F]{{{APNS_TOKEN_MIN},{APNS_TOKEN_MAX}}}")
# Visible ASCII is one byte a character, so the length bound is the byte bound.
_PROVIDER = re.compile(rf"[\x21-\x7e]{{1,{PROVIDER_TOKEN_MAX_BYTES}}}")

Reject = Callable[[int, str], None]


def records(reader: Any, reject: Reject) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of the data rows: header and blank lines skipped, rows with a wrong
    number of columns rejected."""
    first = True
    for fields in reader:
        line = reader.line_num
        if first:
            first = False
            if fields and fields[0].strip().lower() == "device_id":
                continue  # header
        if not fields or fields == [""]:
            continue
        if not REQUIRED <= len(fields) <= len(COLUMNS):
            reject(line, f"expected {REQUIRED} to {len(COLUMNS)} columns, got {len(fields)}")
            continue
        yield line, fields


def registration_body(fields: list[str]) -> dict[str, Any]:
    """The registration API's body for one CSV row (4 to 8 columns)."""
    values = dict(zip(COLUMNS, fields, strict=False))
    platform = values["platform"]
    body: dict[str, Any] = {
        "device_id": values["device_id"],
        "platform": platform,
        "token": values["token"],
        "user_id": values["user_id"],
        "app_version": values.get("app_version", ""),
        "locale": values.get("locale", ""),
    }
    if platform == "web":
        body["token"] = {
            "endpoint": values["token"],
            "keys": {"p256dh": values.get("p256dh", ""), "auth": values.get("auth", "")},
        }
    return body


def registrations(reader: Any, reject: Reject) -> Iterator[tuple[int, Registration]]:
    """(line number, validated registration) of every good row; bad rows go to `reject`."""
    for line, fields in records(reader, reject):
        try:
            yield line, validate_registration(registration_body(fields))
        except RegistrationError as exc:
            reject(line, str(exc))


def copy_line(line: int, reg: Registration) -> str:
    """A validated registration as one line of COPY text (STAGE_COLUMNS)."""
    return _escape(
        f"{line}\t{reg.device_id}\t{reg.platform}\t{reg.token}\t{reg.token_hash}\t"
        f"{reg.web_p256dh}\t{reg.web_auth}\t{reg.user_id}\t{reg.app_version}\t{reg.locale}\n"
    )


def fast_copy_line(line: int, fields: list[str]) -> str | None:
    """`copy_line(line, validate_registration(registration_body(fields)))` for a row of the
    common shape, without building either; None when the row needs the validator."""
    count = len(fields)
    device_id, platform, token, user_id = fields[0], fields[1], fields[2], fields[3]
    app_version = fields[4] if count > 4 else ""
    locale = fields[5] if count > 5 else ""
    if platform == "ios":
        if len(token) & 1 or not _APNS.fullmatch(token):
            return None
        token = token.lower()
    elif platform == "android" or platform == "huawei":
        if not _PROVIDER.fullmatch(token):
            return None
    else:
        return None
    if (
        not _CANONICAL_UUID.fullmatch(device_id)
        or len(user_id) > USER_ID_MAX
        or not user_id.isprintable()
        or len(app_version) > APP_VERSION_MAX
        or not app_version.isprintable()
        # the tag pattern is ASCII letters, digits and - _: printable
        or (locale and (len(locale) > LOCALE_MAX or not LOCALE_TAG.fullmatch(locale)))
    ):
        return None
    token_hash = hashlib.sha256(token.encode()).hexdigest()
    return _escape(
        f"{line}\t{device_id}\t{platform}\t{token}\t{token_hash}\t\t\t{user_id}\t{app_version}\t{locale}\n"
    )


def copy_chunks(reader: Any, reject: Reject, chunk_rows: int = CHUNK_ROWS) -> Iterator[bytes]:
    """The good rows as COPY text, `chunk_rows` lines at a time; bad rows go to `reject`."""
    lines: list[str] = []
    for line, fields in records(reader, reject):
        text = fast_copy_line(line, fields)
        if text is None:
            try:
                text = copy_line(line, validate_registration(registration_body(fields)))
            except RegistrationError as exc:
                reject(line, str(exc))
                continue
        lines.append(text)
        if len(lines) >= chunk_rows:
            yield "".join(lines).encode()
            lines.clear()
    if lines:
        yield "".join(lines).encode()


def _escape(text: str) -> str:
    # Validated text has no tab, newline or other control character; the backslash is the one
    # character COPY's text format treats specially (and no column's own syntax has one).
    return text.replace("\\", "\\\\") if "\\" in text else text
