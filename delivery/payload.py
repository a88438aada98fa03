"""The one message model every provider adapter translates: `PushMessage`.

A message is validated once, where it enters the system (`PushMessage.from_dict`, used by the API and by
campaigns), so adapters can trust it. It is stored as `to_dict()` (a JSON object) and rebuilt with
`from_dict`, which round-trips exactly.

Size: APNs payloads, FCM messages, Web Push records and HMS requests are limited to 4 KB, each measured
by its adapter's `payload_size` (what counts is the adapter's documented choice). An adapter renders a
message through `fit_message`, which shortens the body (on a character, hence UTF-8, boundary, ending in
"…") until the provider's rendering fits, and marks the data with `TRUNCATED_KEY` so the app knows to
fetch the full text by `MESSAGE_ID_KEY`. `check_fits` lets the API refuse, with a 400, a message that
would not fit even with an empty body, so nothing oversized is ever sent.

Localized content: `localizations` maps language tags ("fr", "pt-BR") to a title and/or body that
replace the default ones for devices of that locale. `localized(locale)` picks a device's variant
with language fallback (pt-BR, then pt, then the default text) and returns it as a PushMessage of
its own (same message id, `locale` set to the tag chosen), cached on the message: adapters render
each variant once (their caches key on `render_key`), never once per device. Each variant is
validated and size-checked like the default text.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

# Every rendering carries the message id in the data: the app can fetch a truncated body by it, and
# dedupe the rare duplicate that at-least-once delivery produces.
MESSAGE_ID_KEY = "pushsvc_message_id"
TRUNCATED_KEY = "pushsvc_truncated"
ELLIPSIS = "…"

PAYLOAD_LIMIT = 4096  # bytes: APNs payload, FCM message, Web Push record, HMS message
TTL_MAX = 2_419_200  # 28 days: FCM's maximum; APNs stores for less anyway
COLLAPSE_KEY_MAX_BYTES = 64  # apns-collapse-id limit
BODY_MAX_BYTES = 65_536  # longer bodies would only ever be truncated; refuse instead of storing them
DATA_MAX_KEYS = 100
SHORT_TEXT_MAX = 256  # sound, category, thread_id, data keys
TITLE_MAX = 512
URL_MAX = 2048
LOCALIZATIONS_MAX = 100  # languages per message
LOCALE_TAG_MAX = 35  # DeviceToken.locale's length
# BCP 47 as devices report it (the registry's rule, tokens/validation.py); "_" is accepted from
# devices ("pt_BR") and matched as "-", but a message's own tags use "-".
LOCALE_TAG_RE = re.compile(r"[A-Za-z]{1,8}(?:-[A-Za-z0-9]{1,8})*")
LOCALIZED_FIELDS = ("title", "body")
_VARIANTS_KEPT = 1024  # distinct device locale strings remembered per message
MESSAGE_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Fields that end up in HTTP headers (collapse_key: apns-collapse-id, the Web Push Topic) must be
# printable ASCII: h2/httpx encode header values as ASCII (a "café" raised UnicodeEncodeError inside
# the shard), and a control character made the simulator, like APNs, answer with GOAWAY.
HEADER_TEXT_RE = re.compile(r"[\x20-\x7e]*")
URL_SCHEMES = ("http", "https")

# FCM refuses these data keys ("from", "notification", "message_type", and the google./gcm. prefixes);
# "aps" would collide with the APNs dictionary the data is merged into; ours are set by the gateway.
RESERVED_DATA_KEYS = frozenset({"from", "notification", "message_type", "aps", MESSAGE_ID_KEY, TRUNCATED_KEY})
RESERVED_DATA_PREFIXES = ("google", "gcm")

Priority = Literal["high", "normal"]
FIELDS = (
    "title",
    "body",
    "data",
    "badge",
    "sound",
    "category",
    "thread_id",
    "image",
    "url",
    "collapse_key",
    "priority",
    "ttl",
    "silent",
    "mutable_content",
    "message_id",
    "localizations",
)


class PayloadError(ValueError):
    """A message field is wrong; `field` names it (dotted for data keys) so the API can point at it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class PayloadTooLarge(PayloadError):
    """The message cannot fit a provider's limit even with its body cut to nothing."""

    def __init__(self, platform: str, size: int, limit: int) -> None:
        super().__init__(
            "body",
            f"the message is too large for {platform}: {size} bytes with an empty body, the limit is "
            f"{limit}; shorten the title or the data",
        )
        self.platform = platform
        self.size = size
        self.limit = limit


def _new_message_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class Localization:
    """A language's text; a field left empty keeps the default message's."""

    title: str = ""
    body: str = ""


@dataclass(frozen=True, slots=True)
class PushMessage:
    """One notification, provider-neutral. Immutable: adapters cache renderings per message."""

    title: str = ""
    body: str = ""
    data: Mapping[str, str] = field(default_factory=dict)
    badge: int | None = None
    sound: str = ""
    category: str = ""
    thread_id: str = ""
    image: str = ""
    url: str = ""
    collapse_key: str = ""
    priority: Priority = "high"
    ttl: int | None = None  # seconds the provider may keep trying; None: the provider's default
    silent: bool = False  # background / data-only push: no alert, no sound
    mutable_content: bool = False
    message_id: str = field(default_factory=_new_message_id)
    # Set by the sender, never by API input: the absolute deadline (UNIX seconds) of a message with
    # a TTL, fixed at its first send; `ttl` then holds the seconds that remain (a TTL is absolute).
    expires_at: int | None = None
    localizations: Mapping[str, Localization] = field(default_factory=dict)
    # Set by `localized`, never by API input: the tag of `localizations` this variant carries
    # ("" for the default text). Part of `render_key`, so variants never share a rendering.
    locale: str = ""
    # Device locale string -> variant, filled by `localized`: one variant object per language and
    # message object, so adapters find their rendering by identity.
    _variants: dict[str, PushMessage] = field(default_factory=dict, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        # A read-only view, so that a rendering cached by message id cannot go stale by mutation.
        if not isinstance(self.data, MappingProxyType):
            object.__setattr__(self, "data", MappingProxyType(dict(self.data)))
        if not isinstance(self.localizations, MappingProxyType):
            object.__setattr__(self, "localizations", MappingProxyType(dict(self.localizations)))

    @property
    def render_key(self) -> str:
        """What adapters cache a rendering under: the message id, and the language of a variant."""
        return f"{self.message_id}/{self.locale}" if self.locale else self.message_id

    def localized(self, locale: str) -> PushMessage:
        """The variant for a device whose locale is `locale` ("pt-BR", "pt_br", "" for unknown):
        the exact tag, else its language (pt), else the default text. Cached per locale string."""
        if not self.localizations or not locale:
            return self
        variant = self._variants.get(locale)
        if variant is None:
            tag = match_locale(locale, self.localizations)
            variant = self._variant(tag) if tag else self
            if len(self._variants) < _VARIANTS_KEPT:
                self._variants[locale] = variant
        return variant

    def _variant(self, tag: str) -> PushMessage:
        # Devices that say "pt-BR" and "pt_br" get the same object (cached under the tag too).
        key = "\x00" + tag
        variant = self._variants.get(key)
        if variant is None:
            text = self.localizations[tag]
            variant = dataclasses.replace(
                self,
                title=text.title or self.title,
                body=text.body or self.body,
                localizations={},
                locale=tag,
            )
            self._variants[key] = variant
        return variant

    def variants(self) -> list[PushMessage]:
        """The default text and every language's: what the size checks apply to."""
        return [self, *(self._variant(tag) for tag in self.localizations)]

    def __hash__(self) -> int:
        return hash(self.message_id)

    @classmethod
    def from_dict(cls, d: Any) -> PushMessage:
        """Validate a decoded JSON object and build the message; raise PayloadError on the first problem."""
        if not isinstance(d, Mapping):
            raise PayloadError("message", "expected a JSON object")
        unknown = sorted(set(d) - set(FIELDS))
        if unknown:
            raise PayloadError(unknown[0], f"unknown field (known fields: {', '.join(FIELDS)})")
        kw: dict[str, Any] = {}
        kw["title"] = _text(d, "title", TITLE_MAX)
        kw["body"] = _text(d, "body", BODY_MAX_BYTES, count_bytes=True, allow_newlines=True)
        kw["sound"] = _identifier(d, "sound")
        kw["category"] = _identifier(d, "category")
        kw["thread_id"] = _identifier(d, "thread_id")
        kw["image"] = _url(d, "image")
        kw["url"] = _url(d, "url")
        kw["collapse_key"] = _text(d, "collapse_key", COLLAPSE_KEY_MAX_BYTES, count_bytes=True)
        if not HEADER_TEXT_RE.fullmatch(kw["collapse_key"]):
            raise PayloadError(
                "collapse_key", "must be printable ASCII (it is sent as an HTTP header, apns-collapse-id)"
            )
        kw["badge"] = _int_or_none(d, "badge", 0, 2**31 - 1)
        kw["ttl"] = _int_or_none(d, "ttl", 0, TTL_MAX)
        kw["silent"] = _bool(d, "silent")
        kw["mutable_content"] = _bool(d, "mutable_content")
        priority = d.get("priority", "high")
        if priority not in ("high", "normal"):
            raise PayloadError("priority", 'must be "high" or "normal"')
        kw["priority"] = priority
        kw["data"] = _data(d.get("data", {}), kw)
        message_id = d.get("message_id")
        if message_id is None:
            message_id = _new_message_id()
        elif not isinstance(message_id, str) or not MESSAGE_ID_RE.fullmatch(message_id):
            raise PayloadError("message_id", "must be 1 to 64 characters of A-Z, a-z, 0-9, '_' or '-'")
        kw["message_id"] = message_id
        kw["localizations"] = _localizations(d.get("localizations"))
        _check_combination(kw)
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict that `from_dict` turns back into an equal message."""
        out = {name: getattr(self, name) for name in FIELDS}
        out["data"] = dict(self.data)
        if self.localizations:
            out["localizations"] = {
                tag: {name: getattr(text, name) for name in LOCALIZED_FIELDS if getattr(text, name)}
                for tag, text in self.localizations.items()
            }
        else:
            del out["localizations"]  # stored messages without languages keep their old shape
        return out

    def rendered_data(self) -> dict[str, str]:
        """The data every provider carries: the caller's keys plus the message id."""
        data = dict(self.data)
        data[MESSAGE_ID_KEY] = self.message_id
        return data

    @property
    def truncated(self) -> bool:
        return TRUNCATED_KEY in self.data

    def check_fits(self, platforms: Iterable[str]) -> None:
        """Raise PayloadTooLarge if, for one of `platforms`, even an empty body would not fit."""
        from delivery.providers.registry import provider_class

        for platform in platforms:
            cls = provider_class(platform)
            for variant in self.variants():
                try:
                    fit_message(variant, cls.payload_size, cls.payload_limit, platform)
                except PayloadTooLarge as exc:
                    if variant.locale:
                        exc.field = f"localizations.{variant.locale}"
                        exc.message = f"{exc.message} ({variant.locale} text)"
                    raise


def match_locale(locale: str, localizations: Mapping[str, Any]) -> str:
    """The tag of `localizations` for a device locale, with language fallback: "pt_BR" matches
    "pt-BR", else "pt"; "zh-Hant-TW" tries zh-Hant-TW, zh-Hant, zh. "" when none matches."""
    wanted = locale.replace("_", "-").lower()
    by_lower = {tag.lower(): tag for tag in localizations}
    while wanted:
        if wanted in by_lower:
            return by_lower[wanted]
        wanted = wanted.rpartition("-")[0]
    return ""


def fit_message(
    message: PushMessage, measure: Callable[[PushMessage], int], limit: int, platform: str
) -> PushMessage:
    """Return `message` if `measure(message) <= limit`, else a copy with the longest body prefix that fits.

    `measure` is the adapter's own size of its rendering, so JSON escaping and per-provider layout are
    counted exactly. Runs once per message (adapters cache the result), so a bisection is cheap enough.
    """
    if measure(message) <= limit:
        return message

    def cut(n: int) -> PushMessage:
        data = dict(message.data)
        data[TRUNCATED_KEY] = "1"
        return dataclasses.replace(message, body=message.body[:n] + ELLIPSIS, data=data)

    if measure(cut(0)) > limit:
        shortest = dataclasses.replace(message, body="")
        raise PayloadTooLarge(platform, measure(shortest), limit)
    lo, hi = 0, len(message.body) - 1  # cut(lo) fits; cut(hi + 1) is known not to fit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if measure(cut(mid)) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return cut(lo)


def _text(
    d: Mapping[str, Any],
    name: str,
    limit: int,
    *,
    count_bytes: bool = False,
    allow_newlines: bool = False,
    field: str = "",
) -> str:
    value = d.get(name)
    field = field or name
    if value is None:
        return ""
    if not isinstance(value, str):
        raise PayloadError(field, f"must be a string, got {type(value).__name__}")
    _check_unicode(field, value)
    size = len(value.encode()) if count_bytes else len(value)
    if size > limit:
        unit = "bytes (UTF-8)" if count_bytes else "characters"
        raise PayloadError(field, f"must be at most {limit} {unit}, got {size}")
    if "\x00" in value or (not allow_newlines and ("\n" in value or "\r" in value)):
        raise PayloadError(field, "must not contain control characters")
    return value


def _check_unicode(name: str, value: str) -> None:
    """Refuse what cannot be encoded as UTF-8 (a lone surrogate from a JSON "\\ud800" escape): every
    provider's JSON would fail on it at send time."""
    try:
        value.encode()
    except UnicodeEncodeError:
        raise PayloadError(name, "must be valid Unicode text (no lone surrogates)") from None


def _identifier(d: Mapping[str, Any], name: str) -> str:
    value = _text(d, name, SHORT_TEXT_MAX)
    if not value.isprintable():
        raise PayloadError(name, "must be printable text (no control or format characters)")
    return value


def _url(d: Mapping[str, Any], name: str) -> str:
    """An http(s) URL, judged as a browser would parse it: the WHATWG parser drops leading and trailing
    C0 controls and spaces and every tab and newline, so "\\x01javascript:..." is a javascript: URL to
    a browser. Control characters are refused outright, so what is stored is what is opened."""
    value = _text(d, name, URL_MAX)
    if not value:
        return value
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in value):
        raise PayloadError(name, "must not contain control characters")
    if any(c.isspace() for c in value):
        raise PayloadError(name, "must be a URL without spaces")
    # Nothing a parser would strip is left (controls and spaces are refused above), so the scheme
    # read here is the one a browser reads.
    scheme, sep, rest = value.partition(":")
    if not sep or scheme.lower() not in URL_SCHEMES or not rest.startswith("//") or len(rest) == 2:
        # `url` is opened by browsers (Web Push service workers, HMS) as well as apps: an app link
        # (myapp://...) belongs in `data`, where the app reads it, never opened by a browser.
        raise PayloadError(
            name, "must be an http(s) URL, not javascript:, data: or an app link (put app links in data)"
        )
    return value


def _int_or_none(d: Mapping[str, Any], name: str, lo: int, hi: int) -> int | None:
    value = d.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise PayloadError(name, f"must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise PayloadError(name, f"must be between {lo} and {hi}, got {value}")
    return value


def _bool(d: Mapping[str, Any], name: str) -> bool:
    value = d.get(name, False)
    if not isinstance(value, bool):
        raise PayloadError(name, f"must be true or false, got {type(value).__name__}")
    return value


def _data(value: Any, kw: Mapping[str, Any]) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise PayloadError("data", "must be an object of string keys to string values")
    if len(value) > DATA_MAX_KEYS:
        raise PayloadError("data", f"must have at most {DATA_MAX_KEYS} keys, got {len(value)}")
    out: dict[str, str] = {}
    for key, item in value.items():
        where = f"data.{key}"
        if not isinstance(key, str) or not key:
            raise PayloadError("data", "keys must be non-empty strings")
        if len(key) > SHORT_TEXT_MAX:
            raise PayloadError(where, f"keys must be at most {SHORT_TEXT_MAX} characters")
        if key in RESERVED_DATA_KEYS or key.lower().startswith(RESERVED_DATA_PREFIXES):
            raise PayloadError(
                where,
                "reserved key (FCM refuses from, notification, message_type and keys starting with "
                "google or gcm; aps and pushsvc_* are used by the gateway)",
            )
        if key in ("url", "image") and kw.get(key):
            raise PayloadError(where, f"clashes with the message's {key} field, which is sent under this key")
        if not isinstance(item, str):
            raise PayloadError(
                where, f"values must be strings (FCM carries only strings), got {type(item).__name__}"
            )
        _check_unicode(where, key)
        _check_unicode(where, item)
        if "\x00" in key or "\x00" in item:
            # PostgreSQL's jsonb cannot store \u0000: refused here rather than a failed INSERT.
            raise PayloadError(where, "must not contain NUL characters")
        out[key] = item
    return out


def _localizations(value: Any) -> dict[str, Localization]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise PayloadError("localizations", 'must be an object of language tags to {"title", "body"}')
    if len(value) > LOCALIZATIONS_MAX:
        raise PayloadError(
            "localizations", f"must have at most {LOCALIZATIONS_MAX} languages, got {len(value)}"
        )
    out: dict[str, Localization] = {}
    seen: dict[str, str] = {}
    for tag, text in value.items():
        where = f"localizations.{tag}"
        if not isinstance(tag, str) or len(tag) > LOCALE_TAG_MAX or not LOCALE_TAG_RE.fullmatch(tag):
            raise PayloadError(
                where,
                f"must be a language tag such as fr or pt-BR (letters, digits and '-', "
                f"at most {LOCALE_TAG_MAX} characters)",
            )
        if tag.lower() in seen:
            raise PayloadError(where, f"the same language as {seen[tag.lower()]} (tags are case-insensitive)")
        seen[tag.lower()] = tag
        if not isinstance(text, Mapping):
            raise PayloadError(where, 'must be an object with "title" and/or "body"')
        unknown = sorted(set(text) - set(LOCALIZED_FIELDS))
        if unknown:
            raise PayloadError(f"{where}.{unknown[0]}", "unknown field (a language sets title and body only)")
        # The same rules as the default title and body, under this language's name.
        title = _text(text, "title", TITLE_MAX, field=f"{where}.title")
        body = _text(
            text, "body", BODY_MAX_BYTES, count_bytes=True, allow_newlines=True, field=f"{where}.body"
        )
        if not (title or body):
            raise PayloadError(where, "sets neither title nor body")
        out[tag] = Localization(title=title, body=body)
    return out


def _check_combination(kw: Mapping[str, Any]) -> None:
    if kw["silent"] and kw.get("localizations"):
        raise PayloadError("localizations", "a silent (background) push has no text to translate")
    if kw["silent"]:
        # Apple: a background notification's aps holds only content-available; anything the user would
        # see or hear makes it an alert, which APNs then throttles or drops as a background push.
        for name in ("title", "body", "sound", "badge"):
            if kw[name] not in ("", None):
                raise PayloadError(name, "a silent (background) push carries no title, body, sound or badge")
        if kw["mutable_content"]:
            raise PayloadError("mutable_content", "applies to visible notifications, not silent pushes")
    elif not (kw["title"] or kw["body"] or kw["badge"] is not None or kw["sound"]):
        raise PayloadError(
            "body", "a visible notification needs a title, body, badge or sound; set silent for data only"
        )
