"""An adapter's handle on its auth token: a check of one attribute on the hot path, and one refresh at
a time when the token is due or a provider rejected it.

Minting and the Redis round trips (delivery.credentials) are blocking and rare, so they run in a thread;
a burst of sends that all find the token due wait for one refresh instead of starting one each. After a
failure, sends fail fast for a short hold instead of hammering the token endpoint.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol, TypeVar

from delivery.credentials import Clock, CredentialError, IssuedToken
from delivery.providers.mapping import credential_result

if TYPE_CHECKING:
    from delivery.providers.base import Result, Target

FAILURE_HOLD = 30.0  # the credentials were refused: re-check this often, not per send
TRANSIENT_HOLD = 2.0  # the token endpoint is unreachable


class TokenSource(Protocol):
    def get(self) -> IssuedToken: ...

    def refresh(self, rejected: IssuedToken) -> IssuedToken | None: ...


class AuthToken:
    def __init__(
        self, source: TokenSource | None, *, config_error: str = "", clock: Clock = time.time
    ) -> None:
        self._source = source
        self._config_error = config_error
        self._clock = clock
        self.token: IssuedToken | None = None
        self._failure: CredentialError | None = None
        self._failed_until = 0.0
        self._refused = ""  # the last token whose forced refresh was refused
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None

    def fresh(self) -> IssuedToken | None:
        """The token if it can be used now, without waiting (the hot path)."""
        token = self.token
        if token is not None and self._clock() < token.refresh_at:
            return token
        return None

    async def current(self) -> IssuedToken:
        """A usable token; raise CredentialError when none can be had."""
        token = self.fresh()
        if token is not None:
            return token
        async with self._mutex():
            token = self.fresh()
            if token is not None:
                return token
            return await self._call(lambda source: source.get())

    async def refresh(self, rejected: IssuedToken) -> IssuedToken | None:
        """After the provider rejected `rejected`: a newer token, or None if a refresh is not allowed."""
        async with self._mutex():
            token = self.fresh()
            if token is not None and token.value != rejected.value:
                return token  # a concurrent send refreshed already
            if self._refused == rejected.value:
                return None  # asked and refused already: the rest of the burst need not ask again
            token = await self._call(lambda source: source.refresh(rejected))
            if token is None:
                self._refused = rejected.value
            return token

    async def _call(self, fn):
        if self._source is None:
            raise CredentialError(self._config_error or "no credentials configured", transient=False)
        if self._clock() < self._failed_until and self._failure is not None:
            raise self._failure
        try:
            token = await asyncio.to_thread(fn, self._source)
        except CredentialError as exc:
            self._failure = exc
            self._failed_until = self._clock() + (TRANSIENT_HOLD if exc.transient else FAILURE_HOLD)
            raise
        if token is not None:
            self.token = token
            self._failure = None
        return token

    def _mutex(self) -> asyncio.Lock:
        # An adapter may outlive an event loop (asyncio.run per task); an asyncio.Lock must not.
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock_loop is not loop:
            self._lock = asyncio.Lock()
            self._lock_loop = loop
        return self._lock


_P = TypeVar("_P")
# (position in the chunk, target, what the adapter prepared to send it)
Pending = list[tuple[int, "Target", _P]]
# One answer per pending send: its result, and whether the provider rejected the auth token.
Attempt = Callable[[Pending[_P], IssuedToken], Awaitable[list[tuple["Result", bool]]]]


async def send_authorized(
    auth: AuthToken, results: list[Result | None], pending: Pending[_P], attempt: Attempt[_P]
) -> list[Result]:
    """Fill `results` with the answers to a chunk's `pending` sends, made with the current auth
    token. Sends the provider answered with "token rejected" go once more with a refreshed token:
    one refresh for the whole chunk, as for concurrent single sends."""
    if pending:
        try:
            token = await auth.current()
        except CredentialError as exc:
            for index, target, _ in pending:
                results[index] = credential_result(target, str(exc), transient=exc.transient)
            pending = []
        else:
            rejected: Pending[_P] = []
            for item, (result, refresh) in zip(pending, await attempt(pending, token), strict=True):
                results[item[0]] = result
                if refresh:
                    rejected.append(item)
            if rejected:
                try:
                    newer = await auth.refresh(token)
                except CredentialError as exc:
                    for index, target, _ in rejected:
                        results[index] = credential_result(target, str(exc), transient=exc.transient)
                else:
                    if newer is not None:
                        for item, (result, _) in zip(rejected, await attempt(rejected, newer), strict=True):
                            results[item[0]] = result
    assert all(result is not None for result in results)
    return results  # type: ignore[return-value]
