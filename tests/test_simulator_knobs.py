"""Global knobs and the admin API of the simulator (docs/simulator.md), over real sockets."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from simulator.testing import SimulatorError, SimulatorProcess, apns_jwt

PAYLOAD = b'{"aps":{"alert":"hello"}}'


@pytest.fixture(params=["fast", "strict"])
def sim(request: pytest.FixtureRequest) -> SimulatorProcess:
    return request.getfixturevalue(f"simulator_{request.param}")


@pytest.fixture
def client(sim: SimulatorProcess) -> Iterator[httpx.Client]:
    with httpx.Client(http2=True, verify=sim.ssl_context(), base_url=sim.base_url, timeout=30) as c:
        yield c


def push(client: httpx.Client, sim: SimulatorProcess, token: str) -> httpx.Response:
    headers = {
        "authorization": f"bearer {apns_jwt(sim.credentials)}",
        "apns-topic": sim.credentials.apns_topic,
    }
    return client.post(f"/3/device/{token}", headers=headers, content=PAYLOAD)


def tok(n: int) -> str:
    return f"{n:064x}"


def test_config_defaults_and_validation(sim):
    config = sim.config()
    assert config["max_concurrent_streams"] == 1000
    assert config["apns_initial_streams"] == 1
    assert config["retry_after_s"] == 1
    assert config["slow_ms"] == 2000
    with pytest.raises(SimulatorError, match=r"unknown knob.*latency"):
        sim.configure(latencyms=5)
    with pytest.raises(SimulatorError, match="error_rate"):
        sim.configure(error_rate=2)
    with pytest.raises(SimulatorError, match="goaway_every: expected int"):
        sim.configure(goaway_every="3")
    with pytest.raises(SimulatorError, match="apns_topics: expected a list of strings"):
        sim.configure(apns_topics=[1])
    assert sim.config() == config  # a rejected change changes nothing
    sim.configure(latency_ms=5, goaway_every=7)
    sim.reset()
    assert sim.config()["goaway_every"] == 7  # a plain reset keeps knobs
    sim.reset(config=True)
    assert sim.config() == config


def test_admin_errors_are_clear(client, sim):
    resp = client.post("/_sim/counts", json={"tokens": "abc"})
    assert resp.status_code == 400
    assert "tokens" in resp.json()["error"]
    resp = client.post("/_sim/config", content=b"{not json")
    assert resp.status_code == 400
    assert client.get("/_sim/nothing").status_code == 404
    assert client.get("/_sim/duplicates?limit=x").status_code == 400


def test_stats_shape(sim):
    stats = sim.stats()
    for key in (
        "requests",
        "by_outcome",
        "delivered_total",
        "delivered_unique",
        "duplicates",
        "connections_opened",
        "peak_streams_per_connection",
        "in_flight",
    ):
        assert key in stats
    if stats["front"] == "strict":  # present and zero right after a reset, not only once incremented
        for key in ("refused_streams", "goaways_sent", "connections_dropped", "settings_raised"):
            assert stats[key] == 0


def test_latency_holds_requests_in_flight(client, sim):
    sim.configure(latency_ms=1500)
    result: dict[str, int] = {}
    thread = threading.Thread(target=lambda: result.update(status=push(client, sim, tok(1)).status_code))
    thread.start()
    held = sim.wait_for(lambda s: s["in_flight"] == 1)
    assert held["in_flight"] == 1
    thread.join(timeout=30)
    assert result == {"status": 200}
    assert sim.stats()["in_flight"] == 0


def test_slow_fault_holds_the_request(client, sim):
    sim.configure(slow_ms=1500)
    result: dict[str, int] = {}
    token = "fa017507" + "00" * 28
    thread = threading.Thread(target=lambda: result.update(status=push(client, sim, token).status_code))
    thread.start()
    sim.wait_for(lambda s: s["in_flight"] == 1)
    thread.join(timeout=30)
    assert result == {"status": 200}


def _error_pattern(client: httpx.Client, sim: SimulatorProcess) -> list[int]:
    return [push(client, sim, tok(i)).status_code for i in range(60)]


def test_error_rate_is_deterministic(client, sim):
    sim.configure(error_rate=0.5)
    first = _error_pattern(client, sim)
    assert set(first) == {200, 503}
    assert 10 < first.count(503) < 50
    sim.reset()
    assert _error_pattern(client, sim) == first
    sim.reset()
    sim.configure(seed=12345)
    second = _error_pattern(client, sim)
    assert second != first
    assert sim.stats()["by_outcome"]["apns 503 ServiceUnavailable"] == second.count(503)


def test_outage_window(client, sim):
    sim.configure(outage_until=time.time() + 600)
    resp = push(client, sim, tok(1))
    assert (resp.status_code, resp.json()["reason"]) == (503, "ServiceUnavailable")
    sim.configure(outage_until=0)
    assert push(client, sim, tok(1)).status_code == 200


def test_rate_limit(client, sim):
    sim.configure(rate_limit_per_s=5, retry_after_s=3)
    statuses = []
    for i in range(30):
        resp = push(client, sim, tok(i))
        statuses.append(resp.status_code)
        if resp.status_code == 429:
            assert resp.headers["retry-after"] == "3"
            assert resp.json()["reason"] == "TooManyRequests"
    assert statuses[:5] == [200] * 5 or statuses.count(200) >= 5  # a window may roll over mid-loop
    assert statuses.count(429) > 0


def test_record_payloads_off(client, sim):
    sim.configure(record_payloads=False)
    assert push(client, sim, tok(1)).status_code == 200
    assert sim.last([tok(1)]) == {tok(1): None}
    assert sim.counts([tok(1)]) == {tok(1): 1}


def test_duplicates_limit(client, sim):
    for t in (tok(1), tok(1), tok(2), tok(2), tok(2), tok(3)):
        assert push(client, sim, t).status_code == 200
    assert sim.duplicates() == {tok(2): 3, tok(1): 2}
    assert sim.duplicates(limit=1) == {tok(2): 3}


@pytest.mark.slow  # starts a simulator process of its own: the slow lane
def test_initial_knobs_and_log_file(tmp_path):
    with SimulatorProcess(front="strict", tls=True, goaway_every=9) as sim:
        assert sim.config()["goaway_every"] == 9
        assert "listening at" in sim.log_tail()
    assert sim.proc is None


@pytest.mark.slow  # starts a Python process that starts a simulator: the slow lane
def test_simulator_exits_with_its_parent(tmp_path):
    """A killed test run leaves no simulator behind (SimulatorProcess passes --exit-with-parent)."""
    script = (
        "import os, sys\n"
        "from simulator.testing import SimulatorProcess\n"
        "sim = SimulatorProcess(front='strict', tls=False).start()\n"
        "print(sim.proc.pid, flush=True)\n"
        "os._exit(0)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    pid = int(out.stdout.strip())
    deadline = time.monotonic() + 15
    while Path(f"/proc/{pid}").exists() and "zombie" not in _proc_state(pid):
        assert time.monotonic() < deadline, f"simulator {pid} outlived its parent"
        time.sleep(0.1)


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return "zombie"
