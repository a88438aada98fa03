"""CSV rows of `import_tokens` as validated registrations or as COPY text lines.

The COPY path of a large import is bounded by Python while PostgreSQL ingests, and most of that
was building a request body, a `Registration` and a `uuid.UUID` for every row. `copy_chunks` first
tries `fast_copy_line`, which accepts only rows that `validate_registration` accepts too (a
canonical lowercase UUID, an iOS/Android/Huawei token of the usual shape, short printable
texts, a well-formed locale) and renders them the way the validated `Registration` renders. Any
other row (web subscriptions, upper-case UUIDs, anything unusual or wrong) goes through
`validate_registration` itself, so the rules and the error messages are the validator's, never
a second copy of them. tests/test_import_tokens.py checks both paths give the same line.

`last_seen` and `registered_at` (ISO 8601) carry a device's history over from another system:
the APNs 410 rule compares a token's last registration (`updated_at`) with Apple's timestamp, and
the stale sweep reads `last_seen`, so stamping every imported row "now" would keep tokens Apple
already declared dead and make every imported token look fresh. Empty: now, as before.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
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

COLUMNS = (
    "device_id",
    "platform",
    "token",
    "user_id",
    "app_version",
    "locale",
    "p256dh",
    "auth",
    "last_seen",
    "registered_at",
)
DATE_COLUMNS = ("last_seen", "registered_at")
REQUIRED = 4
HEADER_REQUIRED = ("device_id", "platform", "token")
# A date this far ahead of the import's clock is refused: a registration "in the future" would make
# the token immune to every APNs 410 until then. The margin absorbs clock skew between systems.
FUTURE_MARGIN = timedelta(minutes=5)
# Columns of the staging table, in the order of a COPY line.
STAGE_COLUMNS = (
    "line, device_id, platform, token, token_hash, web_p256dh, web_auth, user_id, app_version, locale, "
    "last_seen, registered_at"
)
_NULL = "\\N"  # COPY text's NULL
CHUNK_ROWS = 2_000

# uuid.UUID accepts this and prints it back unchanged; other spellings take the slow path.
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_APNS = re.compile(rf"[0-9a-fA-F]{{{APNS_TOKEN_MIN},{APNS_TOKEN_MAX}}}")
# Visible ASCII is one byte a character, so the length bound is the byte bound.
_PROVIDER = re.compile(rf"[\x21-\x7e]{{1,{PROVIDER_TOKEN_MAX_BYTES}}}")

Reject = Callable[[int, str], None]


class HeaderError(ValueError):
    """The header line names a column import_tokens does not know, or lacks a required one."""


def header_order(names: list[str]) -> list[int | None] | None:
    """Where each of COLUMNS sits in a row laid out as the header `names` says; None when the
    header is the positional layout itself (a prefix of COLUMNS)."""
    names = [name.strip().lower() for name in names]
    unknown = [name for name in names if name not in COLUMNS]
    if unknown:
        raise HeaderError(
            f"unknown column(s) in the header: {', '.join(unknown)}; known: {', '.join(COLUMNS)}"
        )
    if len(set(names)) != len(names):
        raise HeaderError("the header names a column twice")
    missing = [name for name in HEADER_REQUIRED if name not in names]
    if missing:
        raise HeaderError(f"the header lacks: {', '.join(missing)}")
    if names == list(COLUMNS[: len(names)]):
        return None
    return [names.index(column) if column in names else None for column in COLUMNS]


class Rows:
    """A csv.reader (or anything with rows and `line_num`) whose header line is read at once, so
    that a bad header fails before anything is loaded."""

    def __init__(self, reader: Any) -> None:
        self._reader = iter(reader)
        self._source = reader  # csv.reader keeps line_num up to date as it is iterated
        self.order: list[int | None] | None = None
        self.width = len(COLUMNS)
        self._first: tuple[int, list[str]] | None = None
        fields = next(self._reader, None)
        if fields is None:
            return
        if fields and fields[0].strip().lower() in COLUMNS:
            self.order = header_order(fields)  # HeaderError here, before any row is loaded
            self.width = len(fields)
        else:
            self._first = (reader.line_num, fields)

    def __iter__(self) -> Iterator[tuple[int, list[str]]]:
        if self._first is not None:
            yield self._first
        for fields in self._reader:
            yield self._source.line_num, fields


def records(rows: Rows, reject: Reject) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields in COLUMNS order) of the data rows: blank lines skipped, rows with a
    wrong number of columns rejected. A header line may name the columns in any order (and
    leave optional ones out); without one, the row is positional."""
    order, width = rows.order, rows.width
    for line, fields in rows:
        if not fields or fields == [""]:
            continue
        if order is not None:
            # Like csv.DictReader: a short row leaves its last columns empty, a long one is wrong.
            if len(fields) > width:
                reject(line, f"expected at most {width} columns as in the header, got {len(fields)}")
                continue
            fields = [fields[i] if i is not None and i < len(fields) else "" for i in order]
        elif not REQUIRED <= len(fields) <= len(COLUMNS):
            reject(line, f"expected {REQUIRED} to {len(COLUMNS)} columns, got {len(fields)}")
            continue
        yield line, fields


def parse_when(value: str, column: str, now: datetime) -> datetime | None:
    """An ISO 8601 date-time of the file (naive: UTC), or None for an empty cell; ValueError
    naming the column otherwise."""
    value = value.strip()
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{column}: not an ISO 8601 date-time: {value[:40]!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    if parsed > now + FUTURE_MARGIN:
        raise ValueError(f"{column}: {value[:40]} is in the future")
    return parsed


def row_dates(fields: list[str], now: datetime) -> tuple[datetime | None, datetime | None]:
    """(last_seen, registered_at) of a row; ValueError for a bad one."""
    last_seen = parse_when(fields[8], "last_seen", now) if len(fields) > 8 else None
    registered_at = parse_when(fields[9], "registered_at", now) if len(fields) > 9 else None
    return last_seen, registered_at


def _dates_text(dates: tuple[datetime | None, datetime | None]) -> str:
    return "".join("\t" + (when.isoformat() if when is not None else _NULL) for when in dates)


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


Dates = tuple[datetime | None, datetime | None]  # (last_seen, registered_at)


def registrations(reader: Rows, reject: Reject, now: datetime) -> Iterator[tuple[int, Registration, Dates]]:
    """(line number, validated registration, its dates) of every good row; bad rows go to `reject`."""
    for line, fields in records(reader, reject):
        try:
            dates = row_dates(fields, now)
            yield line, validate_registration(registration_body(fields)), dates
        except (RegistrationError, ValueError) as exc:
            reject(line, str(exc))


def copy_line(line: int, reg: Registration, dates: Dates = (None, None)) -> str:
    """A validated registration as one line of COPY text (STAGE_COLUMNS)."""
    text = _escape(
        f"{line}\t{reg.device_id}\t{reg.platform}\t{reg.token}\t{reg.token_hash}\t"
        f"{reg.web_p256dh}\t{reg.web_auth}\t{reg.user_id}\t{reg.app_version}\t{reg.locale}"
    )
    # After the escape: \N is COPY's NULL, not a backslash of the data.
    return text + _dates_text(dates) + "\n"


def fast_copy_line(line: int, fields: list[str], dates: Dates = (None, None)) -> str | None:
    """`copy_line(line, validate_registration(registration_body(fields)), dates)` for a row of
    the common shape, without building either; None when the row needs the validator."""
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
    text = _escape(
        f"{line}\t{device_id}\t{platform}\t{token}\t{token_hash}\t\t\t{user_id}\t{app_version}\t{locale}"
    )
    return text + _dates_text(dates) + "\n"


def copy_chunks(reader: Rows, reject: Reject, now: datetime, chunk_rows: int = CHUNK_ROWS) -> Iterator[bytes]:
    """The good rows as COPY text, `chunk_rows` lines at a time; bad rows go to `reject`."""
    lines: list[str] = []
    for line, fields in records(reader, reject):
        try:
            dates = row_dates(fields, now) if len(fields) > 8 else (None, None)
        except ValueError as exc:
            reject(line, str(exc))
            continue
        text = fast_copy_line(line, fields, dates)
        if text is None:
            try:
                text = copy_line(line, validate_registration(registration_body(fields)), dates)
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
