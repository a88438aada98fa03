"""Topic and condition targets (FCM HTTP v1 `message.topic` / `message.condition`, HMS likewise).

The provider fans a topic message out to the devices subscribed to it; the gateway sends one
request per provider and records the provider's answer. What the providers accept:

- a topic name matches `[a-zA-Z0-9-_.~%]+` (FCM's rule; HMS allows the same characters and more),
  may be given with FCM's legacy `/topics/` prefix, which is dropped; at most TOPIC_MAX characters
  (HMS's documented limit; FCM documents none);
- a condition is a boolean expression over `'name' in topics` with `&&`, `||`, `!` and
  parentheses, naming at most CONDITION_MAX_TOPICS topics (FCM: "up to five topics"; HMS the same),
  e.g. `'dogs' in topics && ('cats' in topics || !('birds' in topics))`.

Used by the API to refuse what the provider would, and by the simulator to answer like it.
"""

from __future__ import annotations

import re

TOPIC_PREFIX = "/topics/"
TOPIC_MAX = 900
TOPIC_RE = re.compile(r"[a-zA-Z0-9\-_.~%]+")
CONDITION_MAX = 1000  # characters; five quoted names and their operators fit with room
CONDITION_MAX_TOPICS = 5
# FCM rejects topic messages larger than 2048 bytes (PROTOCOLS.md, "2048 B for topics"); HMS keeps
# its 4 KB body limit.
FCM_TOPIC_PAYLOAD_LIMIT = 2048

_TOKEN_RE = re.compile(
    r"""\s*(?:(?P<op>&&|\|\|)|(?P<not>!)|(?P<open>\()|(?P<close>\))"""
    r"""|(?P<topic>'(?P<sq>[^']*)'|"(?P<dq>[^"]*)")\s+in\s+topics\b)"""
)


class TopicError(ValueError):
    """What is wrong with a topic or a condition, in words fit for the API's 400."""


def normalize_topic(value: str) -> str:
    """The topic's name as sent (without `/topics/`); TopicError if a provider would refuse it."""
    name = value.removeprefix(TOPIC_PREFIX)
    if not name:
        raise TopicError("must name a topic")
    if len(name) > TOPIC_MAX:
        raise TopicError(f"must be at most {TOPIC_MAX} characters, got {len(name)}")
    if not TOPIC_RE.fullmatch(name):
        raise TopicError("may contain only letters, digits and - _ . ~ % (the providers' rule)")
    return name


def condition_topics(condition: str) -> list[str]:
    """Parse a condition; the topics it names, or TopicError saying where it is malformed.

    Grammar: expr := term (('&&' | '||') term)*; term := '!' term | '(' expr ')' | 'name' in topics.
    """
    if len(condition) > CONDITION_MAX:
        raise TopicError(f"must be at most {CONDITION_MAX} characters, got {len(condition)}")
    tokens: list[tuple[str, str]] = []
    pos = 0
    text = condition.rstrip()
    while pos < len(text):
        match = _TOKEN_RE.match(text, pos)
        if match is None:
            raise TopicError(
                f"cannot read it at character {pos + 1}: expected 'topic' in topics, &&, ||, ! or parentheses"
            )
        if match.group("topic"):
            name = match.group("sq") if match.group("sq") is not None else match.group("dq")
            try:
                tokens.append(("topic", normalize_topic(name)))
            except TopicError as exc:
                raise TopicError(f"topic {name!r}: {exc}") from None
        else:
            tokens.append((match.lastgroup or "", match.group(0).strip()))
        pos = match.end()
    topics: list[str] = []
    end = _expr(tokens, 0, topics, 0)
    if end != len(tokens):
        raise TopicError(f"unexpected {tokens[end][1]!r} after a complete expression")
    if not topics:
        raise TopicError("names no topic")
    if len(topics) > CONDITION_MAX_TOPICS:
        raise TopicError(f"may name at most {CONDITION_MAX_TOPICS} topics, got {len(topics)}")
    return topics


_MAX_DEPTH = 20  # parentheses and ! nested deeper than any five-topic condition needs


def _expr(tokens: list[tuple[str, str]], i: int, topics: list[str], depth: int) -> int:
    i = _term(tokens, i, topics, depth)
    while i < len(tokens) and tokens[i][0] == "op":
        i = _term(tokens, i + 1, topics, depth)
    return i


def _term(tokens: list[tuple[str, str]], i: int, topics: list[str], depth: int) -> int:
    if depth > _MAX_DEPTH:
        raise TopicError("nests too deeply")
    if i >= len(tokens):
        raise TopicError("ends where a topic test was expected")
    kind, value = tokens[i]
    if kind == "topic":
        topics.append(value)
        return i + 1
    if kind == "not":
        return _term(tokens, i + 1, topics, depth + 1)
    if kind == "open":
        i = _expr(tokens, i + 1, topics, depth + 1)
        if i >= len(tokens) or tokens[i][0] != "close":
            raise TopicError("has an unclosed parenthesis")
        return i + 1
    raise TopicError(f"unexpected {value!r} where a topic test was expected")
