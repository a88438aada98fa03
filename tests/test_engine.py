"""The HTTP/2 engines against the provider simulator, over real sockets.

Each test drives its own event loop with `run_until_complete`, as a worker does for its lifetime.
Ground truth for "lost" and "duplicated" is the simulator's per-token delivery count.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import jwt
import pytest

from delivery.engine import Engine, HttpRequest, HttpResponse, TransportError, create_engine
from delivery.engine import curl as curl_engine
from delivery.engine.base import LATENCY_BOUNDS
from delivery.engine.base import parse_headers as _parse_headers
from simulator.testing import SimulatorProcess

T = TypeVar("T")
KINDS = ["curl", "httpx"]
PAYLOAD = b'{"aps":{"alert":{"title":"t","body":"b"}}}'


# --- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def strict_sim() -> Iterator[SimulatorProcess]:
    with SimulatorProcess(front="strict", tls=True) as sim:
        yield sim


@pytest.fixture
def sim(strict_sim: SimulatorProcess) -> SimulatorProcess:
    """The strict front (full HTTP/2 control) with default knobs and empty counters."""
    strict_sim.reset(config=True)
    return strict_sim


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture
def engines(loop: asyncio.AbstractEventLoop) -> Iterator[list[Engine]]:
    """Engines a test creates; closed on the test's loop afterwards."""
    made: list[Engine] = []
    yield made
    for engine in made:
        loop.run_until_complete(engine.aclose())


def make_engine(engines: list[Engine], sim: SimulatorProcess, kind: str = "curl", **kw: Any) -> Engine:
    kw.setdefault("ca_file", sim.ca_file)
    engine = create_engine(sim.base_url, kind=kind, **kw)
    engines.append(engine)
    return engine


# --- helpers -------------------------------------------------------------------------------------
_jwt_cache: dict[str, str] = {}


def apns_headers(sim: SimulatorProcess) -> dict[str, str]:
    creds = sim.credentials
    token = _jwt_cache.get(creds.apns_key_id)
    if token is None:
        token = jwt.encode(
            {"iss": creds.apns_team_id, "iat": int(time.time())},
            creds.apns_key_p8,
            algorithm="ES256",
            headers={"kid": creds.apns_key_id},
        )
        _jwt_cache[creds.apns_key_id] = token
    return {
        "authorization": f"bearer {token}",
        "apns-topic": creds.apns_topic,
        "apns-push-type": "alert",
        "content-type": "application/json",
    }


def device_token(fault: str = "") -> str:
    token = secrets.token_hex(32)
    return f"fa0175{fault}{token[8:]}" if fault else token


def apns_request(sim: SimulatorProcess, token: str, timeout: float | None = None) -> HttpRequest:
    return HttpRequest("POST", f"/3/device/{token}", apns_headers(sim), PAYLOAD, timeout)


async def gather_settled(aws: list[Awaitable[T]]) -> list[T | BaseException]:
    return list(await asyncio.gather(*aws, return_exceptions=True))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def cancel_in_flight(engine: Engine, pending: Awaitable[Any], in_flight: int) -> None:
    """Start `pending`, cancel it once the engine holds its `in_flight` requests (not after a fixed
    sleep), and check the engine holds none after."""
    task = asyncio.ensure_future(pending)
    deadline = time.monotonic() + 10
    while engine.stats().in_flight != in_flight:
        assert time.monotonic() < deadline, "the requests never went in flight"
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.stats().in_flight == 0


def poll(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        time.sleep(0.02)


# --- success, TLS, connection use ----------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_request_over_tls_trusting_the_simulator_ca(kind, sim, loop, engines):
    engine = make_engine(engines, sim, kind)
    token = device_token()
    resp = loop.run_until_complete(engine.request(apns_request(sim, token)))
    assert resp.status == 200
    assert resp.headers["apns-id"]  # names are lower-cased
    assert not resp.maybe_duplicate
    assert sim.counts([token]) == {token: 1}
    stats = engine.stats()
    assert (stats.requests_sent, stats.connections_opened, stats.in_flight) == (1, 1, 0)


@pytest.mark.parametrize("kind", KINDS)
def test_provider_error_is_a_response_with_its_body(kind, sim, loop, engines):
    engine = make_engine(engines, sim, kind)
    resp = loop.run_until_complete(engine.request(apns_request(sim, device_token("01"))))
    assert resp.status == 410
    assert b'"Unregistered"' in resp.body


@pytest.mark.parametrize("kind", KINDS)
def test_answered_requests_are_timed_into_the_latency_histogram(kind, sim, loop, engines):
    engine = make_engine(engines, sim, kind)
    sim.configure(latency_ms=60)
    tokens = [device_token() for _ in range(20)]
    results = loop.run_until_complete(gather_settled([engine.request(apns_request(sim, t)) for t in tokens]))
    assert [getattr(r, "status", r) for r in results] == [200] * 20
    stats = engine.stats()
    assert sum(stats.latency_counts) == 20
    # The provider took 60 ms for each: none may land in the buckets up to 50 ms.
    assert sum(stats.latency_counts[: LATENCY_BOUNDS.index(0.05) + 1]) == 0
    assert 20 * 0.06 <= stats.latency_sum < 20 * 5.0
    assert stats.latency_counts is not engine.stats().latency_counts  # a snapshot, not the live list


def test_many_concurrent_requests_share_one_connection(sim, loop, engines):
    engine = make_engine(engines, sim, max_connections=1)
    tokens = [device_token() for _ in range(1500)]
    results = loop.run_until_complete(gather_settled([engine.request(apns_request(sim, t)) for t in tokens]))
    assert [getattr(r, "status", r) for r in results] == [200] * len(tokens)
    server = sim.stats()
    assert server["connections_opened"] == 1
    # More than libcurl's default of 100 streams: the server's SETTINGS governed.
    assert server["peak_streams_per_connection"] > 100
    assert server["duplicates"] == 0
    assert set(sim.counts(tokens).values()) == {1}
    assert engine.stats().connections_opened == 1


def test_cold_start_waits_for_settings_on_one_connection(sim, loop, engines):
    """APNs allows one stream until an authenticated request succeeded: no burst, no extra connection."""
    assert sim.config()["apns_initial_streams"] == 1
    engine = make_engine(engines, sim, max_connections=2)
    tokens = [device_token() for _ in range(300)]
    results = loop.run_until_complete(gather_settled([engine.request(apns_request(sim, t)) for t in tokens]))
    assert [getattr(r, "status", r) for r in results] == [200] * len(tokens)
    server = sim.stats()
    assert server["connections_opened"] == 1, server
    assert server["refused_streams"] == 0, server  # no burst before the server's SETTINGS
    assert server["duplicates"] == 0
    assert set(sim.counts(tokens).values()) == {1}
    stats = engine.stats()
    assert stats.connections_opened == 1
    assert stats.resent_maybe_processed == 0


# --- GOAWAY, dropped connections -----------------------------------------------------------------
def test_goaway_every_n_requests_loses_and_duplicates_nothing(sim, loop, engines):
    sim.configure(goaway_every=50)
    engine = make_engine(engines, sim, timeout=60)
    # Every GOAWAY refuses all requests in flight above its last-stream-id, and each new
    # connection starts at one stream: 600 requests make about a dozen such rounds.
    tokens = [device_token() for _ in range(600)]
    results = loop.run_until_complete(gather_settled([engine.request(apns_request(sim, t)) for t in tokens]))
    # libcurl fails a request without telling why when the connection under it went away (it
    # cannot say whether the stream was above the GOAWAY's last-stream-id): such a request is
    # "may have reached", and the caller re-sends it, as the adapters do. It must stay rare.
    unanswered = [t for t, r in zip(tokens, results, strict=True) if not isinstance(r, HttpResponse)]
    assert all(
        isinstance(r, TransportError) and r.may_have_reached
        for r in results
        if not isinstance(r, HttpResponse)
    )
    reasons = Counter(str(r)[:60] for r in results if not isinstance(r, HttpResponse))
    assert len(unanswered) <= len(tokens) // 50, reasons
    retried = loop.run_until_complete(
        gather_settled([engine.request(apns_request(sim, t)) for t in unanswered])
    )
    assert [getattr(r, "status", r) for r in retried] == [200] * len(unanswered)
    answered = [r for r in results if isinstance(r, HttpResponse)]
    assert {r.status for r in answered} == {200}
    assert not any(r.maybe_duplicate for r in answered)
    counts = sim.counts(tokens)
    assert [t for t in tokens if counts[t] != 1] == []  # 0 lost, 0 duplicates
    server = sim.stats()
    assert server["duplicates"] == 0
    assert server["goaways_sent"] >= 5  # the scenario did happen, many times
    stats = engine.stats()
    # Streams above each GOAWAY's last-stream-id were re-sent by libcurl, and by the engine once
    # libcurl's own five resends were used up.
    assert stats.resent_unprocessed > 0
    assert stats.extra.get("resubmitted_after_refusals", 0) > 0


def test_httpx_fails_in_flight_requests_on_goaway_as_may_have_reached(sim, loop, engines):
    sim.configure(goaway_every=20)
    engine = make_engine(engines, sim, "httpx")
    tokens = [device_token() for _ in range(200)]
    results = loop.run_until_complete(gather_settled([engine.request(apns_request(sim, t)) for t in tokens]))
    failures = [r for r in results if isinstance(r, BaseException)]
    assert all(isinstance(f, TransportError) and f.may_have_reached for f in failures), failures[:3]
    counts = sim.counts(tokens)
    assert max(counts.values()) == 1
    for token, result in zip(tokens, results, strict=True):
        if isinstance(result, HttpResponse):
            assert result.status == 200 and counts[token] == 1


def test_connection_dropped_with_requests_in_flight(sim, loop, engines):
    """Fault 09: the strict front resets the connection with the request unanswered."""
    # Held long enough that all 20 are in flight at the server together even on a loaded machine.
    sim.configure(slow_ms=5000)
    engine = make_engine(engines, sim, max_connections=1)
    # Authenticated first: a new APNs connection carries one stream until a request succeeded.
    loop.run_until_complete(engine.request(apns_request(sim, device_token())))
    slow = [device_token("07") for _ in range(20)]
    drop = device_token("09")

    async def scenario() -> tuple[list[Any], Any]:
        pending = [asyncio.ensure_future(engine.request(apns_request(sim, t))) for t in slow]
        await asyncio.sleep(0)  # hand them to libcurl before polling the server
        deadline = time.monotonic() + 10
        while (await loop.run_in_executor(None, sim.stats))["in_flight"] < len(slow):
            assert time.monotonic() < deadline, "slow requests never reached the simulator"
            await asyncio.sleep(0.02)
        dropped = await gather_settled([engine.request(apns_request(sim, drop))])
        return await gather_settled(pending), dropped[0]

    slow_results, drop_result = loop.run_until_complete(scenario())
    # Its connection died before any byte of the answer: the engine re-submitted it on a fresh
    # connection (fault 09 drops the first attempt only). The new connection starts at one stream,
    # which the 5 s slow tokens re-sent by libcurl may hold until the deadline: answered (flagged,
    # the first copy may have been processed) or timed out as "may have reached", never "not sent".
    assert engine.stats().extra["resubmitted_after_connection_loss"] >= 1
    if isinstance(drop_result, HttpResponse):
        assert drop_result.status == 200 and drop_result.maybe_duplicate
    else:
        assert isinstance(drop_result, TransportError) and drop_result.may_have_reached
    counts = sim.counts([*slow, drop])
    assert counts[drop] <= 1  # the dropped copy was never counted as delivered
    for token, result in zip(slow, slow_results, strict=True):
        assert counts[token] >= 1
        if isinstance(result, HttpResponse):  # libcurl re-sent it after the reset: flagged
            assert result.status == 200 and result.maybe_duplicate
        else:
            assert isinstance(result, TransportError) and result.may_have_reached
    # Every duplicate the simulator saw was counted by the engine: measured, not hidden.
    duplicates = sum(counts[t] - 1 for t in slow)
    assert duplicates <= engine.stats().resent_maybe_processed
    # The engine recovers on a new connection.
    token = device_token()
    assert loop.run_until_complete(engine.request(apns_request(sim, token))).status == 200
    assert engine.stats().in_flight == 0


def test_connection_reset_under_load_is_resubmitted_up_to_a_cap(sim, loop, engines):
    """A connection reset with streams open (`reset_every`: the cut streams were never processed):
    the cut requests are re-submitted on fresh connections and answered, nothing is delivered
    twice. How often one request is cut depends on the machine's load (a re-submission can land on
    a connection already doomed), so a request may fail back after the engine's cap of
    re-submissions, never processed; any other failure fails the test."""
    sim.configure(reset_every=200)
    engine = make_engine(engines, sim, max_connections=2, timeout=30)
    loop.run_until_complete(engine.request(apns_request(sim, device_token())))  # past the cold start
    tokens = [device_token() for _ in range(1000)]
    results = loop.run_until_complete(gather_settled([engine.request(apns_request(sim, t)) for t in tokens]))
    server, stats = sim.stats(), engine.stats()
    assert server["connections_reset"] >= 1 and server["requests_cut_by_reset"] >= 1, server
    answered = [t for t, r in zip(tokens, results, strict=True) if isinstance(r, HttpResponse)]
    failed = [(t, r) for t, r in zip(tokens, results, strict=True) if not isinstance(r, HttpResponse)]
    capped = f"re-submitted {curl_engine._CONNECTION_LOSS_RESUBMITS}x after connection loss"
    assert all(isinstance(r, TransportError) and capped in str(r) for _, r in failed), (failed[:3], stats)
    assert len(failed) < len(tokens) // 10, (len(failed), stats, server)
    assert all(r.status == 200 for r in results if isinstance(r, HttpResponse))
    assert stats.extra["resubmitted_after_connection_loss"] >= 1, stats
    counts = sim.counts(tokens)
    assert {counts[t] for t in answered} == {1} and server["duplicates"] == 0
    assert all(counts[t] == 0 for t, _ in failed), "a cut request was never processed"


# --- idle connections ----------------------------------------------------------------------------
def _idle_scenario(sim: SimulatorProcess, loop: Any, engines: list[Engine], idle_max_s: int) -> Any:
    """One answered request, then the simulator's idle timeout goes by, then one more request."""
    sim.configure(idle_timeout_s=2.5, idle_silent=True)
    engine = make_engine(engines, sim, max_connections=1, timeout=3, idle_max_s=idle_max_s)
    assert loop.run_until_complete(engine.request(apns_request(sim, device_token()))).status == 200
    # Waiting for the provider to have dropped the connection is the scenario itself: the
    # simulator says when it did (no answer will ever come on it again).
    sim.wait_for(lambda s: s["connections_closed_idle"] == 1, timeout=30)
    token = device_token()
    result = loop.run_until_complete(gather_settled([engine.request(apns_request(sim, token))]))[0]
    return engine, token, result


def test_idle_connection_is_retired_before_the_provider_drops_it(sim, loop, engines):
    engine, token, result = _idle_scenario(sim, loop, engines, idle_max_s=1)
    assert isinstance(result, HttpResponse) and result.status == 200 and not result.maybe_duplicate
    stats = engine.stats()
    # First attempt, on a new connection: nothing re-sent, nothing re-submitted.
    assert (stats.connections_opened, stats.resent_unprocessed, stats.resent_maybe_processed) == (2, 0, 0)
    assert "resubmitted_after_connection_loss" not in stats.extra
    assert sim.counts([token]) == {token: 1} and sim.stats()["connections_opened"] == 2


def test_idle_connection_kept_past_the_provider_timeout_fails_the_next_send(sim, loop, engines):
    """The failure the idle limit prevents: the dark connection is reused and never answers."""
    engine, token, result = _idle_scenario(sim, loop, engines, idle_max_s=600)
    assert isinstance(result, TransportError) and result.may_have_reached
    assert engine.stats().connections_opened == 1
    assert sim.counts([token]) == {token: 0}


# --- transport errors: reached or not ------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_connection_refused_never_reached(kind, loop, engines):
    engine = create_engine(f"https://127.0.0.1:{free_port()}", kind=kind)
    engines.append(engine)
    with pytest.raises(TransportError) as info:
        loop.run_until_complete(engine.request(HttpRequest("POST", "/3/device/ab", {}, b"{}")))
    assert info.value.may_have_reached is False


@pytest.mark.parametrize("kind", KINDS)
def test_untrusted_certificate_never_reached(kind, sim, loop, engines):
    engine = make_engine(engines, sim, kind, ca_file=None)  # system store: the simulator CA is unknown
    token = device_token()
    with pytest.raises(TransportError) as info:
        loop.run_until_complete(engine.request(apns_request(sim, token)))
    assert info.value.may_have_reached is False
    assert sim.counts([token]) == {token: 0}


@pytest.mark.parametrize("kind", KINDS)
def test_timeout_after_sending_may_have_reached(kind, sim, loop, engines):
    sim.configure(slow_ms=6000)
    engine = make_engine(engines, sim, kind)
    # The connection is up first, and the timeout leaves seconds to send the request: it times out
    # after sending (the server holds the answer 6 s), however slow a loaded machine is to send.
    assert loop.run_until_complete(engine.request(apns_request(sim, device_token()))).status == 200
    token = device_token("07")
    with pytest.raises(TransportError) as info:
        loop.run_until_complete(engine.request(apns_request(sim, token, timeout=2.0)))
    assert info.value.may_have_reached is True
    poll(lambda: sim.counts([token])[token] == 1)  # the server did process it
    fresh = device_token()
    assert loop.run_until_complete(engine.request(apns_request(sim, fresh))).status == 200


def test_an_answer_libcurl_was_not_woken_for_is_read_by_the_scan_not_at_the_timeout(sim, loop, engines):
    """libcurl can fail to report a socket event (docs/reliability.md, "The jitter duplicate"):
    here the loop's reader for the connection is dropped behind the engine's back while a request
    is in flight. The engine's periodic scan still reads the answer, long before the 30 s timeout
    that would have failed it as "may have reached" (and had it sent again)."""
    sim.configure(slow_ms=300)
    engine = make_engine(engines, sim, timeout=30.0)
    assert loop.run_until_complete(engine.request(apns_request(sim, device_token()))).status == 200
    token = device_token("07")  # answered after slow_ms

    async def deafened() -> HttpResponse:
        task = asyncio.ensure_future(engine.request(apns_request(sim, token)))
        while not engine._watched:  # loop turns until libcurl has sent it and watches for the answer
            assert not task.done()
            await asyncio.sleep(0)
        for fd in list(engine._watched):
            loop.remove_reader(fd)  # the wake-up libcurl will never get
        return await task

    resp = loop.run_until_complete(deafened())
    assert resp.status == 200 and not resp.maybe_duplicate
    assert sim.counts([token]) == {token: 1}
    assert engine.stats().extra.get("answered_by_scan") == 1


@pytest.mark.parametrize("kind", KINDS)
def test_timeout_before_the_connection_is_up_never_reached(kind, loop, engines):
    # A listener that never accepts: the kernel completes TCP, nobody answers the TLS hello.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        engine = create_engine(f"https://127.0.0.1:{port}", kind=kind, timeout=0.5)
        engines.append(engine)
        with pytest.raises(TransportError) as info:
            loop.run_until_complete(engine.request(HttpRequest("POST", "/3/device/ab", {}, b"{}")))
    assert info.value.may_have_reached is False


# --- event loop lifetime, cancellation ----------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_engine_survives_many_run_until_complete_calls(kind, sim, loop, engines):
    engine = make_engine(engines, sim, kind)
    tokens: list[str] = []
    for _ in range(30):
        batch = [device_token() for _ in range(10)]
        tokens += batch
        results = loop.run_until_complete(
            gather_settled([engine.request(apns_request(sim, t)) for t in batch])
        )
        assert [getattr(r, "status", r) for r in results] == [200] * len(batch)
    assert set(sim.counts(tokens).values()) == {1}
    assert engine.stats().connections_opened == 1  # the connection outlived every call
    assert sim.stats()["connections_opened"] == 1


def test_curl_engine_on_uvloop(sim, engines):
    """Workers may run their providers on uvloop (PUSH_EVENT_LOOP): same socket integration."""
    uvloop = pytest.importorskip("uvloop")
    loop = uvloop.new_event_loop()
    try:
        engine = make_engine(engines, sim)
        tokens = [device_token() for _ in range(500)]
        for chunk in (tokens[:250], tokens[250:]):
            requests = [engine.request(apns_request(sim, t)) for t in chunk]
            results = loop.run_until_complete(gather_settled(requests))
            assert [getattr(r, "status", r) for r in results] == [200] * len(chunk)
        loop.run_until_complete(engine.aclose())
    finally:
        loop.close()
    assert set(sim.counts(tokens).values()) == {1}
    assert sim.stats()["connections_opened"] == 1


@pytest.mark.parametrize("kind", KINDS)
def test_engine_moves_to_a_new_event_loop(kind, sim, engines):
    engine = create_engine(sim.base_url, kind=kind, ca_file=sim.ca_file)
    first, second = device_token(), device_token()
    assert asyncio.run(engine.request(apns_request(sim, first))).status == 200
    assert asyncio.run(engine.request(apns_request(sim, second))).status == 200
    asyncio.run(engine.aclose())
    assert sim.counts([first, second]) == {first: 1, second: 1}


def test_cancelled_request_frees_its_slot(sim, loop, engines):
    sim.configure(slow_ms=2000)
    engine = make_engine(engines, sim)

    async def scenario() -> HttpResponse:
        await cancel_in_flight(engine, engine.request(apns_request(sim, device_token("07"))), 1)
        return await engine.request(apns_request(sim, device_token()))

    assert loop.run_until_complete(scenario()).status == 200


@pytest.mark.parametrize("kind", KINDS)
def test_request_many_answers_each_request_in_its_place(kind, sim, loop, engines):
    """A chunk's answers, a provider error and a timeout among them, each where its request was."""
    engine = make_engine(engines, sim, kind)
    sim.configure(slow_ms=3000)
    tokens = [device_token(), device_token("01"), device_token("07"), device_token()]
    requests = [apns_request(sim, t) for t in tokens]
    requests[2] = apns_request(sim, tokens[2], timeout=0.5)
    answers = loop.run_until_complete(engine.request_many(requests))
    assert [getattr(a, "status", None) for a in answers] == [200, 410, None, 200]
    assert isinstance(answers[2], TransportError) and answers[2].may_have_reached
    assert answers[0].header("apns-id") == answers[0].headers["apns-id"] != answers[3].header("apns-id")
    assert sim.counts([tokens[0], tokens[3]]) == {tokens[0]: 1, tokens[3]: 1}
    assert engine.stats().in_flight == 0


@pytest.mark.parametrize("kind", KINDS)
def test_request_many_on_a_closed_engine_answers_each_never_reached(kind, sim, loop, engines):
    engine = make_engine(engines, sim, kind)
    loop.run_until_complete(engine.aclose())
    answers = loop.run_until_complete(engine.request_many([apns_request(sim, device_token())] * 3))
    assert [type(a) for a in answers] == [TransportError] * 3
    assert not any(a.may_have_reached for a in answers)


def test_cancelled_request_many_frees_every_slot(sim, loop, engines):
    sim.configure(slow_ms=2000)
    engine = make_engine(engines, sim)

    async def scenario() -> list[HttpResponse | TransportError]:
        many = engine.request_many([apns_request(sim, device_token("07")) for _ in range(5)])
        await cancel_in_flight(engine, many, 5)
        return await engine.request_many([apns_request(sim, device_token())])

    assert [a.status for a in loop.run_until_complete(scenario())] == [200]


def test_a_pooled_handle_sends_each_requests_own_headers(sim, loop, engines):
    """Handles keep the last header list they were given: a request with another dict must not go
    with the previous request's headers (the engine reuses a list only for the same dict)."""
    engine = make_engine(engines, sim, max_connections=1)
    first, second = apns_headers(sim), {**apns_headers(sim), "apns-collapse-id": "second"}
    tokens = [device_token() for _ in range(4)]
    requests = [HttpRequest("POST", f"/3/device/{t}", first, PAYLOAD) for t in tokens[:2]]
    loop.run_until_complete(engine.request_many(requests))
    requests = [HttpRequest("POST", f"/3/device/{t}", second, PAYLOAD) for t in tokens[2:]]
    loop.run_until_complete(engine.request_many(requests))
    seen = sim.last(tokens)
    assert [seen[t]["headers"].get("apns-collapse-id") for t in tokens] == [None, None, "second", "second"]


def test_lowering_max_concurrent_streams_mid_connection(sim, loop, engines):
    """APNs lowers SETTINGS_MAX_CONCURRENT_STREAMS under load; the engine follows, nothing lost."""
    engine = make_engine(engines, sim, max_connections=1)
    loop.run_until_complete(engine.request(apns_request(sim, device_token())))  # authenticated: 1000 streams
    tokens = [device_token() for _ in range(1500)]

    async def scenario() -> list[Any]:
        pending = [asyncio.ensure_future(engine.request(apns_request(sim, t))) for t in tokens]
        await asyncio.sleep(0)
        await loop.run_in_executor(None, lambda: sim.configure(max_concurrent_streams=5))
        return await gather_settled(pending)

    results = loop.run_until_complete(scenario())
    assert [getattr(r, "status", r) for r in results] == [200] * len(tokens)
    assert set(sim.counts(tokens).values()) == {1}


def test_after_aclose_requests_fail_without_reaching(sim, loop, engines):
    engine = make_engine(engines, sim)
    loop.run_until_complete(engine.aclose())
    with pytest.raises(TransportError) as info:
        loop.run_until_complete(engine.request(apns_request(sim, device_token())))
    assert info.value.may_have_reached is False


def test_unsupported_method_is_refused_before_anything_is_sent(sim, loop, engines):
    engine = make_engine(engines, sim)
    with pytest.raises(ValueError, match="unsupported method 'HEAD'"):
        loop.run_until_complete(engine.request(HttpRequest("HEAD", "/3/device/ab", {})))
    assert engine.stats().requests_sent == 0
    assert loop.run_until_complete(engine.request(apns_request(sim, device_token()))).status == 200


def test_unknown_engine_kind_is_refused():
    with pytest.raises(ValueError, match="unknown engine kind"):
        create_engine("https://example.invalid", kind="carrier-pigeon")


def test_header_block_after_interim_response_is_the_one_kept():
    raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/2 410 \r\napns-id: X\r\ncontent-type: application/json\r\n\r\n"
    assert _parse_headers(raw) == {"apns-id": "X", "content-type": "application/json"}


def test_one_header_is_read_without_parsing_the_block():
    raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/2 410 \r\napns-id: X\r\nretry-after: 7\r\n\r\n"
    response = HttpResponse(410, raw_headers=raw)
    assert (response.header("apns-id"), response.header("retry-after"), response.header("location")) == (
        "X",
        "7",
        "",
    )
    assert response.headers == _parse_headers(raw)
    http11 = HttpResponse(201, raw_headers=b"HTTP/1.1 201 Created\r\nLocation:  /wp/1 \r\n\r\n")
    assert http11.header("location") == "/wp/1"


def test_http11_header_names_are_lower_cased_and_values_trimmed():
    raw = b"HTTP/1.1 201 Created\r\nLocation:  /wp/1 \r\nTTL:60\r\n\r\n"
    assert _parse_headers(raw) == {"location": "/wp/1", "ttl": "60"}


def test_curl_engine_trusts_the_system_store_by_default():
    from delivery.engine.curl import system_ca_file

    path = system_ca_file()
    assert path is not None and path.endswith((".crt", ".pem"))
    with open(path, "rb") as bundle:
        assert b"BEGIN CERTIFICATE" in bundle.read(1 << 16)
