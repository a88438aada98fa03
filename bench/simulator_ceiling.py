"""The provider simulator's throughput ceiling, measured with h2load (Debian package nghttp2-client).

    python bench/simulator_ceiling.py [--front fast|strict] [--no-tls] [-n 200000] [-c 4] [-m 250]

starts a simulator, measures the APNs and FCM send paths with valid credentials and prints req/s
(median of the repeats). `measure(base_url, credentials)` does the measuring against a simulator that
is already running, for other benchmarks (bench/providers.py) to print the ceiling next to their own
figures. h2load and the simulator share this machine's cores: the figure is the ceiling for a client
that costs as little as h2load does, not the simulator's capacity on a dedicated machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simulator.credentials import SimCredentials
from simulator.testing import SimulatorProcess, apns_jwt, fcm_assertion

_FINISHED = re.compile(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s")
_REQUESTS = re.compile(
    r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored"
)
_STATUS = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")


def _fcm_access_token(creds: SimCredentials, ca_file: str) -> str:
    sa = json.loads(creds.fcm_service_account)
    form = urllib.parse.urlencode(
        {"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": fcm_assertion(creds)}
    ).encode()
    ctx = ssl.create_default_context(cafile=ca_file)
    with urllib.request.urlopen(sa["token_uri"], data=form, context=ctx, timeout=10) as resp:
        return json.load(resp)["access_token"]


def _h2load(
    url: str, headers: list[str], body: bytes, n: int, clients: int, streams: int, threads: int
) -> dict:
    h2load = shutil.which("h2load")
    if h2load is None:
        raise RuntimeError("h2load not found: apt-get install -y nghttp2-client")
    with tempfile.NamedTemporaryFile(suffix=".json") as data:
        data.write(body)
        data.flush()
        cmd = [
            h2load,
            "-n",
            str(n),
            "-c",
            str(clients),
            "-m",
            str(streams),
            "-t",
            str(threads),
            "-d",
            data.name,
        ]
        for header in headers:
            cmd += ["-H", header]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=600, check=False).stdout
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    finished, requests, status = _FINISHED.search(out), _REQUESTS.search(out), _STATUS.search(out)
    if not (finished and requests and status):
        raise RuntimeError(f"unexpected h2load output:\n{out}")
    seconds = float(finished.group(1)) / (1000 if finished.group(2) == "ms" else 1)
    return {
        "req_per_s": float(finished.group(3)),
        "seconds": seconds,
        "done": int(requests.group(2)),
        "succeeded": int(requests.group(3)),
        "failed": int(requests.group(4)) + int(requests.group(5)),
        "status_2xx": int(status.group(1)),
        "status_4xx": int(status.group(3)),
        "status_5xx": int(status.group(4)),
        # h2load's own CPU: with the simulator's, the whole budget a request costs on this machine.
        "client_cpu_us_per_req": (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        / n
        * 1e6,
    }


def _cpu_seconds(pid: int) -> float:
    """user + system CPU time of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(
    base_url: str,
    credentials: SimCredentials,
    *,
    pid: int | None = None,
    n: int = 200_000,
    clients: int = 4,
    streams: int = 250,
    threads: int = 1,
    paths: tuple[str, ...] = ("apns", "fcm"),
) -> dict[str, dict[str, Any]]:
    """h2load against a running simulator: {"apns": {...}, "fcm": {...}} with req_per_s and status counts.

    Every request carries valid credentials (one fixed token), so the figure is the success path (JWT
    cache hit, validation, counting), not an error shortcut. With the simulator's `pid`, each result
    also has `server_cpu_us_per_req`: the simulator's CPU time per request, which depends far less on
    what else runs on the machine than req/s does.
    """
    results: dict[str, dict[str, Any]] = {}
    if "apns" in paths:
        headers = [
            f"authorization: bearer {apns_jwt(credentials)}",
            f"apns-topic: {credentials.apns_topic}",
            "apns-push-type: alert",
        ]
        cpu = _cpu_seconds(pid) if pid else 0.0
        results["apns"] = _h2load(
            f"{base_url}/3/device/{'ab' * 32}",
            headers,
            b'{"aps":{"alert":"hello"}}',
            n,
            clients,
            streams,
            threads,
        )
        if pid:
            results["apns"]["server_cpu_us_per_req"] = (_cpu_seconds(pid) - cpu) / n * 1e6
    if "fcm" in paths:
        token = _fcm_access_token(credentials, credentials.ca_file)
        body = json.dumps({"message": {"token": "bench-token", "data": {"k": "v"}}}).encode()
        cpu = _cpu_seconds(pid) if pid else 0.0
        results["fcm"] = _h2load(
            f"{base_url}/v1/projects/{credentials.fcm_project_id}/messages:send",
            [f"authorization: Bearer {token}", "content-type: application/json"],
            body,
            n,
            clients,
            streams,
            threads,
        )
        if pid:
            results["fcm"]["server_cpu_us_per_req"] = (_cpu_seconds(pid) - cpu) / n * 1e6
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--front", choices=("fast", "strict"), default="fast")
    parser.add_argument("--no-tls", dest="tls", action="store_false")
    parser.add_argument("-n", type=int, default=200_000)
    parser.add_argument("-c", "--clients", type=int, default=4)
    parser.add_argument("-m", "--streams", type=int, default=250)
    parser.add_argument("-t", "--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--fast-threads", type=int, default=1, help="granian runtime threads (fast front)")
    parser.add_argument("--fast-task-impl", choices=("asyncio", "rust"), default="asyncio")
    parser.add_argument("--fast-interface", choices=("rsgi", "asgi"), default="rsgi")
    args = parser.parse_args()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pushsvc.settings")
    runs: dict[str, list[float]] = {"apns": [], "fcm": []}
    cpu: dict[str, list[float]] = {"apns": [], "fcm": []}
    client_cpu: dict[str, list[float]] = {"apns": [], "fcm": []}
    extra = [
        "--fast-threads", str(args.fast_threads),
        "--fast-task-impl", args.fast_task_impl,
        "--fast-interface", args.fast_interface,
    ]  # fmt: skip
    knobs: dict[str, Any] = {"record_payloads": False}
    if args.front == "strict":
        # Throughput, not the cold-start limit: h2load bursts before it reads SETTINGS, and streams the
        # strict front refuses would count as failures.
        knobs["apns_initial_streams"] = args.streams
    with SimulatorProcess(front=args.front, tls=args.tls, extra_args=extra, **knobs) as sim:
        for _ in range(args.repeat):
            sim.reset()
            assert sim.proc is not None
            result = measure(
                sim.base_url,
                sim.credentials,
                pid=sim.proc.pid,
                n=args.n,
                clients=args.clients,
                streams=args.streams,
                threads=args.threads,
            )
            for path, figures in result.items():
                if figures["succeeded"] != args.n or figures["status_2xx"] != args.n:
                    raise SystemExit(f"{path}: not every request succeeded: {figures}")
                runs[path].append(figures["req_per_s"])
                cpu[path].append(figures["server_cpu_us_per_req"])
                client_cpu[path].append(figures["client_cpu_us_per_req"])
            stats = sim.stats()
            if stats["delivered_total"] != 2 * args.n:
                raise SystemExit(
                    f"simulator counted {stats['delivered_total']} deliveries, expected {2 * args.n}"
                )
    print(
        f"simulator ceiling, {args.front} front, {'TLS' if args.tls else 'h2c'}, h2load -n {args.n} "
        f"-c {args.clients} -m {args.streams} -t {args.threads}, {args.repeat} runs"
        + (
            f", granian {args.fast_interface} threads={args.fast_threads} tasks={args.fast_task_impl}"
            if args.front == "fast"
            else ""
        )
    )
    for path, values in runs.items():
        print(
            f"  {path:5s} median {statistics.median(values):>9,.0f} req/s, "
            f"CPU per request: simulator {statistics.median(cpu[path]):.1f} µs, "
            f"h2load {statistics.median(client_cpu[path]):.1f} µs; runs: "
            + ", ".join(f"{v:,.0f}" for v in values)
        )


if __name__ == "__main__":
    main()
