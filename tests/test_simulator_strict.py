"""The strict front's HTTP/2 connection behaviour, observed frame by frame with `h2` as a raw client.

SETTINGS_MAX_CONCURRENT_STREAMS=1 until an authenticated request succeeded, REFUSED_STREAM above the
limit, the limit lowered mid-connection, GOAWAY last-stream-id semantics, connection reset every N
requests (`reset_every`), connection drop (fault 09), PING and request-body flow control; plus
multiplexing with libcurl and cleartext h2c.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable, Iterator
from io import BytesIO

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import httpx
import pycurl
import pytest

from simulator.strict import _SelfEnforcedSettings
from simulator.testing import SimulatorError, SimulatorProcess, apns_jwt

PAYLOAD = b'{"aps":{"alert":"hello"}}'
# tcpi_state after a RST (Linux include/net/tcp_states.h); a FIN leaves the socket in CLOSE_WAIT (8).
_TCP_CLOSE = 7


def tok(n: int) -> str:
    return f"{n:064x}"


class RawH2:
    """A blocking HTTP/2 client that shows every event. `unruly=True` ignores the server's stream limit."""

    def __init__(self, sim: SimulatorProcess, *, unruly: bool = False) -> None:
        ctx = ssl.create_default_context(cafile=sim.ca_file)
        ctx.set_alpn_protocols(["h2"])
        raw = socket.create_connection(("127.0.0.1", sim.port), timeout=10)
        self.sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        assert self.sock.selected_alpn_protocol() == "h2"
        self.sim = sim
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        if unruly:
            self.conn.remote_settings = _SelfEnforcedSettings(client=True)
        # h2 as a client rejects any frame after a GOAWAY, though RFC 9113 6.8 has the server finish the
        # streams up to last-stream-id; this instance (only) accepts them, so the test can see them.
        machine = self.conn.state_machine
        machine._transitions = dict(machine._transitions)
        for name in (
            "RECV_HEADERS",
            "RECV_DATA",
            "RECV_WINDOW_UPDATE",
            "RECV_RST_STREAM",
            "RECV_PING",
            "RECV_SETTINGS",
            "SEND_SETTINGS",
            "SEND_WINDOW_UPDATE",
            "SEND_PING",
        ):
            key = (h2.connection.ConnectionState.CLOSED, getattr(h2.connection.ConnectionInputs, name))
            machine._transitions.setdefault(key, (None, h2.connection.ConnectionState.CLOSED))
        self.conn.initiate_connection()
        self.flush()
        self.events: list[h2.events.Event] = []
        self.responses: dict[int, int] = {}  # stream -> status
        self.closed = False
        self.reset_by_peer = False  # closed by a TCP RST rather than an orderly end
        self.jwt = apns_jwt(sim.credentials)

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def request(self, token: str, body: bytes = PAYLOAD, *, jwt: str | None = None) -> int:
        sid = self.open(token, jwt=jwt)
        self.conn.send_data(sid, body, end_stream=True)
        self.flush()
        return sid

    def open(self, token: str, *, jwt: str | None = None) -> int:
        """Send a request's headers only; its body follows with conn.send_data(..., end_stream=True)."""
        sid = self.conn.get_next_available_stream_id()
        headers = [
            (":method", "POST"),
            (":scheme", "https"),
            (":authority", f"127.0.0.1:{self.sim.port}"),
            (":path", f"/3/device/{token}"),
            ("authorization", f"bearer {jwt or self.jwt}"),
            ("apns-topic", self.sim.credentials.apns_topic),
            ("apns-push-type", "alert"),
        ]
        self.conn.send_headers(sid, headers)
        self.flush()
        return sid

    def pump(self, until: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            if self.closed:
                raise AssertionError(f"connection closed; events so far: {self.events}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out; events so far: {self.events}")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except (ConnectionResetError, ssl.SSLError):
                data = b""
            if not data:
                self.closed = True
                # Python's TLS reports a reset as an EOF; the kernel's TCP state still tells them apart.
                info = self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)
                self.reset_by_peer = info[0] == _TCP_CLOSE
                continue
            for event in self.conn.receive_data(data):
                self.events.append(event)
                if isinstance(event, h2.events.ResponseReceived):
                    self.responses[event.stream_id] = int(dict(event.headers)[b":status"])
            self.flush()

    def read_until_closed(self, timeout: float = 10.0) -> None:
        try:
            self.pump(lambda: self.closed, timeout)
        except AssertionError:
            if not self.closed:
                raise

    def of(self, kind: type) -> list:
        return [e for e in self.events if isinstance(e, kind)]

    def stream_limits(self) -> list[int]:
        limits = []
        for e in self.of(h2.events.RemoteSettingsChanged):
            changed = e.changed_settings.get(h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS)
            if changed is not None:
                limits.append(changed.new_value)
        return limits

    def refused(self) -> list[int]:
        return [
            e.stream_id
            for e in self.of(h2.events.StreamReset)
            if e.error_code == h2.errors.ErrorCodes.REFUSED_STREAM
        ]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def sim(simulator_strict: SimulatorProcess) -> SimulatorProcess:
    return simulator_strict


@pytest.fixture
def raw(sim: SimulatorProcess) -> Iterator[RawH2]:
    client = RawH2(sim)
    yield client
    client.close()


@pytest.fixture
def unruly(sim: SimulatorProcess) -> Iterator[RawH2]:
    client = RawH2(sim, unruly=True)
    yield client
    client.close()


def test_one_stream_until_an_authenticated_request_succeeded(raw, sim):
    raw.pump(lambda: raw.stream_limits() == [1])
    sid = raw.request(tok(1))
    raw.pump(lambda: sid in raw.responses and len(raw.stream_limits()) == 2)
    assert raw.responses[sid] == 200
    assert raw.stream_limits() == [1, 1000]
    assert sim.stats()["settings_raised"] == 1


def test_a_rejected_credential_does_not_raise_the_limit(raw, sim):
    raw.pump(lambda: raw.stream_limits() == [1])
    sid = raw.request(tok(1), jwt="not.a.jwt")
    raw.pump(lambda: sid in raw.responses)
    assert raw.responses[sid] == 403
    # A second request proves the SETTINGS that would have followed the first had time to arrive.
    sid2 = raw.request(tok(2), jwt="not.a.jwt")
    raw.pump(lambda: sid2 in raw.responses)
    assert raw.stream_limits() == [1]


def test_a_burst_before_authentication_is_refused(unruly, sim):
    sim.configure(latency_ms=300)  # the first request is still in flight when the others arrive
    sids = [unruly.request(tok(i)) for i in range(1, 5)]
    unruly.pump(lambda: sids[0] in unruly.responses and len(unruly.refused()) == 3)
    assert unruly.responses == {sids[0]: 200}
    assert unruly.refused() == sids[1:]
    assert sim.counts([tok(i) for i in range(1, 5)]) == {tok(1): 1, tok(2): 0, tok(3): 0, tok(4): 0}
    assert sim.stats()["refused_streams"] == 3


def test_initial_streams_knob(sim):
    sim.configure(apns_initial_streams=5, max_concurrent_streams=50)
    client = RawH2(sim)
    try:
        client.pump(lambda: client.stream_limits() == [5])
        sid = client.request(tok(1))
        client.pump(lambda: client.stream_limits() == [5, 50] and sid in client.responses)
    finally:
        client.close()


def test_limit_lowered_mid_connection_refuses_excess_streams(unruly, sim):
    first = unruly.request(tok(1))
    unruly.pump(lambda: first in unruly.responses and unruly.stream_limits() == [1, 1000])
    sim.configure(max_concurrent_streams=2, latency_ms=300)
    unruly.pump(lambda: unruly.stream_limits() == [1, 1000, 2])
    sids = [unruly.request(tok(i)) for i in range(10, 14)]
    unruly.pump(lambda: all(s in unruly.responses for s in sids[:2]) and len(unruly.refused()) == 2)
    assert unruly.refused() == sids[2:]
    assert [unruly.responses[s] for s in sids[:2]] == [200, 200]
    assert sim.stats()["peak_streams_per_connection"] == 2


def test_goaway_last_stream_id(raw, sim):
    sim.configure(goaway_every=3)
    first = raw.request(tok(1))
    raw.pump(lambda: first in raw.responses and raw.stream_limits() == [1, 1000])
    # Five more requests in one burst: the third request on the connection triggers the GOAWAY.
    sids = [raw.request(tok(i)) for i in range(2, 7)]
    raw.read_until_closed()
    goaways = raw.of(h2.events.ConnectionTerminated)
    assert len(goaways) == 1
    assert goaways[0].error_code == h2.errors.ErrorCodes.NO_ERROR
    last = goaways[0].last_stream_id
    assert last == sids[1]
    # Everything up to last-stream-id was answered; nothing above it was processed or counted.
    assert {s: raw.responses.get(s) for s in sids} == {
        sids[0]: 200,
        sids[1]: 200,
        sids[2]: None,
        sids[3]: None,
        sids[4]: None,
    }
    counts = sim.counts([tok(i) for i in range(1, 7)])
    assert counts == {tok(1): 1, tok(2): 1, tok(3): 1, tok(4): 0, tok(5): 0, tok(6): 0}
    stats = sim.stats()
    assert stats["goaways_sent"] == 1
    assert stats["delivered_total"] == 3
    # The unprocessed ones succeed on a new connection.
    again = RawH2(sim)
    try:
        resent = [again.request(tok(i)) for i in range(4, 5)]
        again.pump(lambda: all(s in again.responses for s in resent))
    finally:
        again.close()
    assert sim.counts([tok(4)]) == {tok(4): 1}


def test_goaway_waits_for_slow_streams_below_last_id(raw, sim):
    sim.configure(goaway_every=2, slow_ms=300)
    first = raw.request(tok(1))
    raw.pump(lambda: first in raw.responses)
    slow = raw.request("fa017507" + "00" * 28)  # request 2 on the connection: GOAWAY right after it
    raw.read_until_closed()
    assert raw.of(h2.events.ConnectionTerminated)[0].last_stream_id == slow
    assert raw.responses[slow] == 200


def test_fault_09_drops_the_connection_with_requests_in_flight(raw, sim):
    sim.configure(slow_ms=2000)
    first = raw.request(tok(1))
    raw.pump(lambda: first in raw.responses)
    slow = raw.request("fa017507" + "11" * 28)
    drop = raw.request("fa017509" + "22" * 28)
    raw.read_until_closed()
    assert slow not in raw.responses
    assert drop not in raw.responses
    assert not raw.of(h2.events.ConnectionTerminated)  # no GOAWAY: the connection just died
    stats = sim.stats()
    assert stats["connections_dropped"] == 1
    assert stats["by_outcome"]["apns drop"] == 1
    # The slow request had been processed when the connection died: a resend will be a duplicate.
    assert sim.counts(["fa017507" + "11" * 28, "fa017509" + "22" * 28]) == {
        "fa017507" + "11" * 28: 1,
        "fa017509" + "22" * 28: 0,
    }
    sim.wait_for(lambda s: s["in_flight"] == 0)
    # Fault 09 drops the first attempt only.
    again = RawH2(sim)
    try:
        sid = again.request("fa017509" + "22" * 28)
        again.pump(lambda: sid in again.responses)
        assert again.responses[sid] == 200
    finally:
        again.close()


def test_reset_every_leaves_the_unprocessed_requests_open_and_uncounted(raw, sim):
    sim.configure(reset_every=3)
    first = raw.request(tok(1))
    raw.pump(lambda: first in raw.responses and raw.stream_limits() == [1, 1000])
    # Five more in one burst: the third request on the connection is the last one processed.
    sids = [raw.request(tok(i)) for i in range(2, 7)]
    raw.read_until_closed()
    assert raw.reset_by_peer, "a TCP RST, not an orderly close"
    assert not raw.of(h2.events.ConnectionTerminated)  # no GOAWAY: nothing tells the client in advance
    assert {s: raw.responses.get(s) for s in sids} == {
        sids[0]: 200,
        sids[1]: 200,
        sids[2]: None,
        sids[3]: None,
        sids[4]: None,
    }
    tokens = [tok(i) for i in range(1, 7)]
    assert sim.counts(tokens) == {tok(1): 1, tok(2): 1, tok(3): 1, tok(4): 0, tok(5): 0, tok(6): 0}
    stats = sim.wait_for(lambda s: s["connections_reset"] == 1 and s["in_flight"] == 0)
    assert (stats["requests"], stats["delivered_total"]) == (3, 3)  # the unanswered were never seen
    assert stats["requests_cut_by_reset"] == 3
    assert stats["connections_dropped"] == 0 and stats["goaways_sent"] == 0
    # Resending exactly the unanswered requests delivers each once: nothing lost, nothing twice.
    again = RawH2(sim)
    try:
        for i in range(4, 7):
            sid = again.request(tok(i))
            again.pump(lambda sid=sid: sid in again.responses)
            assert again.responses[sid] == 200
    finally:
        again.close()
    assert sim.counts(tokens) == dict.fromkeys(tokens, 1)


def test_reset_every_answers_every_processed_request_first(raw, sim):
    """Delayed answers (latency, a slow token) are all written and read before the RST."""
    sim.configure(reset_every=4, latency_ms=200, slow_ms=600)
    first = raw.request(tok(1))
    raw.pump(lambda: first in raw.responses and raw.stream_limits() == [1, 1000])
    slow = "fa017507" + "33" * 28
    tokens = [tok(2), slow, tok(4), tok(5), tok(6)]
    sids = [raw.request(t) for t in tokens]
    raw.read_until_closed()
    assert raw.reset_by_peer
    assert [raw.responses.get(s) for s in sids] == [200, 200, 200, None, None]
    assert sim.counts(tokens) == {tok(2): 1, slow: 1, tok(4): 1, tok(5): 0, tok(6): 0}
    stats = sim.wait_for(lambda s: s["in_flight"] == 0)
    assert (stats["connections_reset"], stats["requests_cut_by_reset"]) == (1, 2)


def test_reset_every_does_not_process_a_request_completed_after_the_nth(raw, sim):
    """A request whose headers arrived before the Nth but whose body ends after it is left unprocessed."""
    sim.configure(reset_every=3)
    first = raw.request(tok(1))
    raw.pump(lambda: first in raw.responses and raw.stream_limits() == [1, 1000])
    early = raw.open(tok(2))
    done = [raw.request(tok(3)), raw.request(tok(4))]  # requests 2 and 3 on the connection
    raw.conn.send_data(early, PAYLOAD, end_stream=True)
    raw.flush()
    raw.read_until_closed()
    assert raw.reset_by_peer
    assert [raw.responses.get(s) for s in (*done, early)] == [200, 200, None]
    assert sim.counts([tok(2), tok(3), tok(4)]) == {tok(2): 0, tok(3): 1, tok(4): 1}
    assert sim.wait_for(lambda s: s["connections_reset"] == 1)["requests_cut_by_reset"] == 1


def test_reset_every_rejects_a_negative_count(sim):
    with pytest.raises(SimulatorError, match="reset_every: must be >= 0"):
        sim.configure(reset_every=-1)
    assert sim.config()["reset_every"] == 0


def test_ping_is_answered(raw):
    raw.conn.ping(b"12345678")
    raw.flush()
    raw.pump(lambda: bool(raw.of(h2.events.PingAckReceived)))
    assert raw.of(h2.events.PingAckReceived)[0].ping_data == b"12345678"


def test_request_body_flow_control(raw, sim):
    """A 200 KB body only gets through if the server keeps opening the window (default 64 KB)."""
    first = raw.request(tok(1))
    raw.pump(lambda: first in raw.responses)
    body = b'{"aps":{"alert":"' + b"x" * 200_000 + b'"}}'
    sid = raw.conn.get_next_available_stream_id()
    raw.conn.send_headers(
        sid,
        [
            (":method", "POST"),
            (":scheme", "https"),
            (":authority", "127.0.0.1"),
            (":path", f"/3/device/{tok(2)}"),
            ("authorization", f"bearer {raw.jwt}"),
            ("apns-topic", sim.credentials.apns_topic),
        ],
    )
    sent = 0
    deadline = time.monotonic() + 10
    while sent < len(body):
        window = min(raw.conn.local_flow_control_window(sid), raw.conn.max_outbound_frame_size)
        if window <= 0:
            assert time.monotonic() < deadline, "server never opened the flow-control window"
            raw.pump(lambda: bool(raw.of(h2.events.WindowUpdated)))
            raw.events = [e for e in raw.events if not isinstance(e, h2.events.WindowUpdated)]
            continue
        chunk = body[sent : sent + window]
        sent += len(chunk)
        raw.conn.send_data(sid, chunk, end_stream=sent == len(body))
        raw.flush()
    raw.pump(lambda: sid in raw.responses)
    assert raw.responses[sid] == 413


def test_oversized_body_is_drained_and_answered_413(sim):
    """Past the 1 MB cap the body is read and dropped, and the request still gets its provider answer."""
    headers = {
        "authorization": f"bearer {apns_jwt(sim.credentials)}",
        "apns-topic": sim.credentials.apns_topic,
    }
    with httpx.Client(http2=True, verify=sim.ssl_context(), timeout=30) as client:
        resp = client.post(sim.url(f"/3/device/{tok(1)}"), headers=headers, content=b"x" * 3_000_000)
    assert resp.http_version == "HTTP/2"
    assert (resp.status_code, resp.json()) == (413, {"reason": "PayloadTooLarge"})


class CurlH2:
    """libcurl multi with HTTP/2 multiplexing and PIPEWAIT: one connection, many streams."""

    def __init__(self, sim: SimulatorProcess, *, tls: bool = True) -> None:
        self.sim = sim
        self.tls = tls
        self.multi = pycurl.CurlMulti()
        self.multi.setopt(pycurl.M_PIPELINING, pycurl.PIPE_MULTIPLEX)
        self.multi.setopt(pycurl.M_MAX_HOST_CONNECTIONS, 1)
        self.jwt = apns_jwt(sim.credentials)

    def run(self, tokens: list[str]) -> list[int]:
        handles = []
        for token in tokens:
            c = pycurl.Curl()
            c.setopt(pycurl.URL, f"{self.sim.base_url}/3/device/{token}")
            version = (
                pycurl.CURL_HTTP_VERSION_2TLS if self.tls else pycurl.CURL_HTTP_VERSION_2_PRIOR_KNOWLEDGE
            )
            c.setopt(pycurl.HTTP_VERSION, version)
            c.setopt(pycurl.PIPEWAIT, 1)
            c.setopt(pycurl.POSTFIELDS, PAYLOAD)
            c.setopt(
                pycurl.HTTPHEADER,
                [
                    f"authorization: bearer {self.jwt}",
                    f"apns-topic: {self.sim.credentials.apns_topic}",
                    "apns-push-type: alert",
                ],
            )
            c.setopt(pycurl.WRITEDATA, BytesIO())
            if self.tls:
                c.setopt(pycurl.CAINFO, self.sim.ca_file)
            self.multi.add_handle(c)
            handles.append(c)
        deadline = time.monotonic() + 30
        remaining = len(handles)
        while remaining:
            assert time.monotonic() < deadline, "libcurl transfers did not finish"
            self.multi.select(0.5)
            while True:
                ret, remaining = self.multi.perform()
                if ret != pycurl.E_CALL_MULTI_PERFORM:
                    break
        statuses = [c.getinfo(pycurl.RESPONSE_CODE) for c in handles]
        for c in handles:
            self.multi.remove_handle(c)
            c.close()
        return statuses

    def close(self) -> None:
        self.multi.close()


@pytest.mark.parametrize("front", ["fast", "strict"])
def test_libcurl_multiplexes_on_one_connection(request, front):
    sim = request.getfixturevalue(f"simulator_{front}")
    sim.configure(latency_ms=50)  # keeps requests in flight together
    curl = CurlH2(sim)
    try:
        # The first authenticated request lifts the strict front's one-stream limit on the connection.
        assert curl.run([tok(0)]) == [200]
        assert curl.run([tok(i) for i in range(1, 201)]) == [200] * 200
    finally:
        curl.close()
    stats = sim.stats()
    assert stats["delivered_unique"] == 201
    assert stats["duplicates"] == 0
    assert stats["connections_opened"] == 1
    assert stats["peak_streams_per_connection"] > 1
    assert stats["in_flight"] == 0


def test_libcurl_requests_cut_by_resets_were_never_processed(simulator_strict):
    """With libcurl as the client: an answered request was delivered once, an unanswered one never,
    so resending every unanswered request (and nothing else) ends with each token delivered once."""
    sim = simulator_strict
    # Latency keeps requests in flight when the RST lands; a new connection takes the whole burst at
    # once, so every unanswered transfer here is a reset's, none a cold-start REFUSED_STREAM.
    sim.configure(reset_every=40, latency_ms=20, apns_initial_streams=1000)
    curl = CurlH2(sim)
    tokens = [tok(i) for i in range(1000, 1200)]
    try:
        assert curl.run([tok(0)]) == [200]
        pending, rounds = tokens, 0
        while pending:
            rounds += 1
            assert rounds <= 20, f"{len(pending)} tokens still unanswered"
            statuses = curl.run(pending)
            # A reset transfer has no status; a processed request always got its answer.
            assert set(statuses) <= {200, 0}, statuses
            answered = [t for t, status in zip(pending, statuses, strict=True) if status == 200]
            unanswered = [t for t, status in zip(pending, statuses, strict=True) if status != 200]
            counts = sim.counts(pending)
            assert {t: counts[t] for t in answered} == dict.fromkeys(answered, 1)
            assert {t: counts[t] for t in unanswered} == dict.fromkeys(unanswered, 0)
            pending = unanswered
    finally:
        curl.close()
    stats = sim.wait_for(lambda s: s["in_flight"] == 0)
    # 201 requests processed at 40 per connection: five connections reached the limit. The last may
    # still wait for its PING acknowledgement (libcurl does not read an idle connection).
    assert stats["connections_reset"] >= 4
    assert stats["delivered_unique"] == 201 and stats["duplicates"] == 0
    assert stats["requests"] == stats["delivered_total"]  # no cut request was even counted as a request


@pytest.mark.slow  # starts a cleartext simulator process of its own per front: the slow lane
@pytest.mark.parametrize("front", ["fast", "strict"])
def test_cleartext_h2c_and_http1(tmp_path, front):
    with SimulatorProcess(front=front, tls=False) as sim:
        assert sim.base_url.startswith("http://")
        curl = CurlH2(sim, tls=False)
        try:
            assert curl.run([tok(1)]) == [200]
            assert curl.run([tok(2)]) == [200]
        finally:
            curl.close()
        headers = {
            "authorization": f"bearer {apns_jwt(sim.credentials)}",
            "apns-topic": sim.credentials.apns_topic,
        }
        with httpx.Client(http1=True, http2=False) as h1:
            resp = h1.post(sim.url(f"/3/device/{tok(3)}"), headers=headers, content=PAYLOAD)
            assert (resp.http_version, resp.status_code) == ("HTTP/1.1", 200)
        with httpx.Client(http1=False, http2=True) as h2c:
            resp = h2c.post(sim.url(f"/3/device/{tok(4)}"), headers=headers, content=PAYLOAD)
            assert (resp.http_version, resp.status_code) == ("HTTP/2", 200)
        assert sim.stats()["delivered_unique"] == 4
