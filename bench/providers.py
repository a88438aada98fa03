"""Sends per second from one process, per HTTP/2 engine and per adapter, against the simulator.

    REDIS_URL=redis://127.0.0.1:6379/3 .venv/bin/python bench/providers.py \\
        [--n 100000] [--level engine|adapter|all] [--engines curl,httpx] [--concurrency 1000] \\
        [--chunk 500]

The simulator (fast front, TLS unless --no-tls) runs in another process, started here with
SimulatorProcess. Its h2load ceiling is measured in the same run (bench/simulator_ceiling.py), so
the client figures can be read against what the server side can take at all on this machine.

Each case keeps `--concurrency` requests in flight from that many coroutines, each awaiting one
send after another (with `--chunk`, the adapter cases send chunks with send_many, as a shard run
does, from concurrency / chunk coroutines), for `--n` sends after a warm-up; it prints sends/s,
the client's CPU time per send (process_time: user + system of this process), p50/p99 latency per send, the
connections the client opened and the peak streams per connection (client view and simulator
view), and checks that the simulator counted every send exactly once.

The client and the simulator share the machine's cores, so sends/s is bounded by both; CPU µs
per send is the client's own cost and moves much less with what else runs on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import logging
import os
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pushsvc.settings")

import django
import redis

django.setup()

from django.conf import settings  # noqa: E402

from delivery.engine import Engine, HttpRequest, create_engine  # noqa: E402
from simulator.testing import SimulatorProcess, apns_jwt  # noqa: E402

WARMUP = 2_000
APNS_BODY = b'{"aps":{"alert":{"title":"Hello","body":"from bench/providers.py"}}}'


@dataclass
class Case:
    label: str
    sends: int
    seconds: float
    cpu_s: float
    latencies: list[float]
    failures: int
    client_connections: int
    client_peak_streams: int
    server_connections: int
    server_peak_streams: int
    delivered_once: bool
    notes: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        lat = sorted(self.latencies)
        p50 = lat[len(lat) // 2] * 1e3 if lat else float("nan")
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3 if lat else float("nan")
        return (
            f"  {self.label:<22s} {self.sends / self.seconds:>9,.0f} sends/s  "
            f"{self.cpu_s / self.sends * 1e6:>6.1f} µs CPU/send  p50 {p50:6.2f} ms  p99 {p99:7.2f} ms  "
            f"conns {self.client_connections}/{self.server_connections} (client/server)  "
            f"peak streams/conn {self.client_peak_streams}/{self.server_peak_streams}  "
            f"failures {self.failures}  counted once: {'yes' if self.delivered_once else 'NO'}"
        )


async def drive(
    send: Callable[[int], Awaitable[bool]], n: int, concurrency: int
) -> tuple[float, float, list[float], int]:
    """`concurrency` coroutines, each awaiting one send after the other, until `n` sends are done."""
    latencies: list[float] = []
    failures = 0
    next_index = 0
    clock = time.perf_counter

    async def worker() -> None:
        nonlocal next_index, failures
        while next_index < n:
            i = next_index
            next_index += 1
            started = clock()
            if not await send(i):
                failures += 1
            latencies.append(clock() - started)

    gc.collect()
    cpu0, t0 = time.process_time(), clock()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, n))))
    return clock() - t0, time.process_time() - cpu0, latencies, failures


def device_tokens(n: int) -> list[str]:
    return [secrets.token_hex(32) for _ in range(n)]


# --- engine level --------------------------------------------------------------------------------
def bench_engine(
    sim: SimulatorProcess, kind: str, n: int, concurrency: int, connections: int, h2c: bool
) -> Case:
    headers = {
        "authorization": "bearer " + apns_jwt(sim.credentials),
        "apns-topic": sim.credentials.apns_topic,
        "apns-push-type": "alert",
        "content-type": "application/json",
    }
    warm, tokens = device_tokens(WARMUP), device_tokens(n)

    async def run() -> tuple[Engine, tuple[float, float, list[float], int]]:
        engine = create_engine(
            sim.base_url,
            kind=kind,
            ca_file=None if h2c else sim.ca_file,
            max_connections=connections,
            h2c=h2c,
        )

        def sender(batch: list[str]) -> Callable[[int], Awaitable[bool]]:
            async def send(i: int) -> bool:
                resp = await engine.request(HttpRequest("POST", "/3/device/" + batch[i], headers, APNS_BODY))
                return resp.status == 200

            return send

        await drive(sender(warm), len(warm), concurrency)
        figures = await drive(sender(tokens), n, concurrency)
        await engine.aclose()
        return engine, figures

    sim.reset()
    engine, (seconds, cpu, latencies, failures) = asyncio.run(run())
    stats = engine.stats()
    return finish_case(sim, f"engine {kind}", n, seconds, cpu, latencies, failures, tokens, stats)


# --- adapter level -------------------------------------------------------------------------------
def bench_adapter(
    sim: SimulatorProcess,
    platform: str,
    kind: str,
    n: int,
    concurrency: int,
    connections: int,
    h2c: bool,
    chunk: int = 0,
) -> Case:
    from delivery.credentials import KEY_PREFIX, ApnsTokens, FcmTokens, ServiceAccount, shared_cache
    from delivery.payload import PushMessage
    from delivery.providers.apns import ApnsProvider
    from delivery.providers.auth import AuthToken
    from delivery.providers.base import Outcome, Target
    from delivery.providers.fcm import FcmProvider

    creds = sim.credentials
    settings.PUSH_CA_BUNDLE = "" if h2c else sim.ca_file  # the FCM OAuth exchange trusts the simulator
    message = PushMessage(title="Hello", body="from bench/providers.py", data={"k": "v"}, ttl=3600)
    if platform == "ios":
        tokens = device_tokens(n)
        warm = device_tokens(WARMUP)
    else:
        tokens = ["bench-" + secrets.token_hex(16) for _ in range(n)]
        warm = ["bench-" + secrets.token_hex(16) for _ in range(WARMUP)]

    async def run() -> tuple[Engine, tuple[float, float, list[float], int]]:
        engine = create_engine(
            sim.base_url,
            kind=kind,
            ca_file=None if h2c else sim.ca_file,
            max_connections=connections,
            h2c=h2c,
        )
        if platform == "ios":
            auth = AuthToken(
                ApnsTokens(shared_cache(), creds.apns_team_id, creds.apns_key_id, creds.apns_key_p8)
            )
            provider: Any = ApnsProvider(engine, creds.apns_topic, auth)
        else:
            account = ServiceAccount.parse(creds.fcm_service_account)
            provider = FcmProvider(engine, account.project_id, AuthToken(FcmTokens(shared_cache(), account)))

        def sender(batch: list[str]) -> Callable[[int], Awaitable[bool]]:
            async def send(i: int) -> bool:
                result = await provider.send(Target(i, batch[i]), message)
                return result.outcome is Outcome.DELIVERED

            async def send_chunk(i: int) -> bool:  # a shard run's shape: send_many per chunk
                ids = range(i * chunk, min((i + 1) * chunk, len(batch)))
                results = await provider.send_many([Target(j, batch[j]) for j in ids], message)
                return all(r.outcome is Outcome.DELIVERED for r in results)

            return send_chunk if chunk else send

        if chunk:
            loops = max(1, concurrency // chunk)
            await drive(sender(warm), -(-len(warm) // chunk), loops)
            figures = await drive(sender(tokens), -(-n // chunk), loops)
        else:
            await drive(sender(warm), len(warm), concurrency)
            figures = await drive(sender(tokens), n, concurrency)
        await engine.aclose()
        return engine, figures

    # Provider tokens minted in an earlier run were issued by that run's simulator; this one would
    # reject them (120 failed FCM sends when two runs came within OAUTH_MIN_INTERVAL).
    client = redis.Redis.from_url(settings.REDIS_URL)
    stale = list(client.scan_iter(match=KEY_PREFIX + "*"))
    if stale:
        client.delete(*stale)
    shared_cache().forget_local()
    sim.reset()
    engine, (seconds, cpu, latencies, failures) = asyncio.run(run())
    label = f"adapter {'apns' if platform == 'ios' else 'fcm'} ({kind}{f', x{chunk}' if chunk else ''})"
    return finish_case(sim, label, n, seconds, cpu, latencies, failures, tokens, engine.stats())


def finish_case(
    sim: SimulatorProcess,
    label: str,
    n: int,
    seconds: float,
    cpu: float,
    latencies: list[float],
    failures: int,
    tokens: list[str],
    stats: Any,
) -> Case:
    server = sim.stats()
    sample = tokens[:: max(1, len(tokens) // 2000)]  # the whole list would be a large admin call
    counts = sim.counts(sample)
    return Case(
        label,
        n,
        seconds,
        cpu,
        latencies,
        failures,
        stats.connections_opened,
        stats.peak_streams_per_connection,
        server["connections_opened"],
        server["peak_streams_per_connection"],
        set(counts.values()) == {1} and server["duplicates"] == 0,
        {
            "resent_unprocessed": stats.resent_unprocessed,
            "resent_maybe_processed": stats.resent_maybe_processed,
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="sends per case (after a warm-up)")
    parser.add_argument(
        "--httpx-n", type=int, default=20_000, help="sends per httpx case (it is ~20x slower)"
    )
    parser.add_argument("--level", choices=("engine", "adapter", "all"), default="all")
    parser.add_argument("--engines", default="curl,httpx", help="comma-separated engine kinds")
    parser.add_argument("--concurrency", type=int, default=1000, help="sends in flight")
    parser.add_argument("--connections", type=int, default=2, help="max connections per engine")
    parser.add_argument("--no-tls", dest="tls", action="store_false", help="h2c instead of TLS")
    parser.add_argument("--no-ceiling", dest="ceiling", action="store_false")
    parser.add_argument("--ceiling-n", type=int, default=200_000)
    parser.add_argument("--uvloop", action="store_true", help="run the client on uvloop")
    parser.add_argument(
        "--chunk", type=int, default=0, help="adapter cases: send_many of this many targets (a shard's chunk)"
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per case; the median run is reported")
    args = parser.parse_args()
    kinds = [k.strip() for k in args.engines.split(",") if k.strip()]
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    if args.uvloop:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

    cases: list[Case] = []
    with SimulatorProcess(front="fast", tls=args.tls, record_payloads=False) as sim:
        ceiling = None
        if args.ceiling:
            from bench.simulator_ceiling import measure

            assert sim.proc is not None
            ceiling = measure(sim.base_url, sim.credentials, pid=sim.proc.pid, n=args.ceiling_n)
        h2c = not args.tls
        runs: list[Callable[[], Case]] = []
        for kind in kinds:
            n = args.httpx_n if kind == "httpx" else args.n
            common = (n, args.concurrency, args.connections, h2c)
            if args.level in ("engine", "all"):
                runs.append(functools.partial(bench_engine, sim, kind, *common))
            if args.level in ("adapter", "all"):
                for platform in ("ios", "android"):
                    runs.append(functools.partial(bench_adapter, sim, platform, kind, *common, args.chunk))
        for run in runs:
            repeats = []
            for _ in range(args.repeat):
                repeats.append(run())
                print(repeats[-1].line(), flush=True)
            repeats.sort(key=lambda c: c.sends / c.seconds)
            median = repeats[len(repeats) // 2]
            median.notes["runs"] = [round(c.sends / c.seconds) for c in repeats]
            cases.append(median)

    print()
    print(
        f"bench/providers.py: fast front, {'TLS' if args.tls else 'h2c'}, {args.concurrency} in flight, "
        f"max {args.connections} connections, loop {'uvloop' if args.uvloop else 'asyncio'}, "
        f"median of {args.repeat} run(s) per case, "
        f"{os.cpu_count()} cores shared by client and simulator"
    )
    if ceiling:
        for path, figures in ceiling.items():
            print(
                f"  simulator ceiling {path:<4s} (h2load -n {args.ceiling_n} -c 4 -m 250): "
                f"{figures['req_per_s']:>9,.0f} req/s, {figures.get('server_cpu_us_per_req', 0):.1f} µs "
                f"simulator CPU/req"
            )
    for case in cases:
        print(case.line())
        print(f"    {case.notes}")
    if not all(c.delivered_once and c.failures == 0 for c in cases):
        raise SystemExit("some sends failed or were not counted exactly once")


if __name__ == "__main__":
    main()
