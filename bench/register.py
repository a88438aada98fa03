"""Benchmark: device registrations through the real HTTP API, served by gunicorn on PostgreSQL.

    .venv/bin/python bench/register.py [--requests 10000] [--clients 16] [--workers 3]
        [--worker-class sync|gthread] [--threads 1] [--server gunicorn|granian]
        [--database postgres://postgres@127.0.0.1:5432/bench_register]

It recreates the benchmark database, migrates it, creates an app and an API key, starts gunicorn
(production settings, persistent DB connections) on a listening socket it hands over by file
descriptor (a free port, no race), and sends the upserts from a pycurl CurlMulti driving
`--clients` handles at once (libcurl does the I/O in C, so the client is not the bottleneck;
with sync workers every request is a new connection, as gunicorn's sync worker closes them).
`--server granian` serves the same WSGI app with granian instead, for comparison.

Half of the requests register new devices, half re-register known ones (an app registers on every
launch), so both the INSERT and the UPDATE branch of the upsert are measured. Prints upserts/s
over the measured run (after a warm-up that is not counted), p50/p99 latency per request, the
load average before the run (the machine is shared) and the CPU time per request spent by the
web server processes, the PostgreSQL backends and the client.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pycurl

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))

from bench.campaign import recreate_database  # noqa: E402  (after the sys.path insert above)


def setup_app(env: dict[str, str]) -> str:
    """Migrate and create the app and key in a child process; return the raw key."""
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True)
    code = (
        "import django; django.setup()\n"
        "from tokens.testing import make_app, make_key\n"
        "print(make_key(make_app('bench'), ('devices',)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, capture_output=True)
    return out.stdout.decode().strip().splitlines()[-1]


def bodies(count: int) -> list[bytes]:
    """Half new devices, half re-registrations of devices registered earlier in the run."""
    out: list[bytes] = []
    known: list[dict] = []
    for i in range(count):
        if i % 2 and known:
            body = dict(known[(i * 7919) % len(known)])
        else:
            body = {
                "device_id": str(uuid.uuid4()),
                "platform": "ios" if i % 4 == 0 else "android",
                "token": secrets.token_hex(32) if i % 4 == 0 else secrets.token_urlsafe(120),
                "user_id": f"user-{i % 5000}",
                "app_version": "5.4.1",
                "locale": "en-US",
            }
            known.append(body)
        out.append(json.dumps(body).encode())
    return out


def start_granian(env: dict[str, str], workers: int, threads: int) -> tuple:
    """For comparison: granian (Rust HTTP server, already a dependency) serving the same WSGI app.
    granian binds by port number, so a free one is picked first (a small race, fine here)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = [
        str(VENV_BIN / "granian"),
        "--interface",
        "wsgi",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--blocking-threads",
        str(threads),
        "--no-ws",
        "--log-level",
        "warning",
        "pushsvc.wsgi:application",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    return proc, wait_ready(proc, port)


def wait_ready(proc: subprocess.Popen, port: int) -> str:
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as probe:
                probe.sendall(b"GET /api/v1/devices/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                if probe.recv(12).startswith(b"HTTP/1."):
                    return f"http://127.0.0.1:{port}"
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("the server did not start")
        time.sleep(0.1)


def start_server(env: dict[str, str], workers: int, worker_class: str, threads: int) -> tuple:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    sock.set_inheritable(True)
    port = sock.getsockname()[1]
    cmd = [
        str(VENV_BIN / "gunicorn"),
        "pushsvc.wsgi",
        "--bind",
        f"fd://{sock.fileno()}",
        "--workers",
        str(workers),
        "--worker-class",
        worker_class,
        "--threads",
        str(threads),
        "--backlog",
        "1024",
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, pass_fds=(sock.fileno(),))
    sock.close()
    return proc, wait_ready(proc, port)


def run(base: str, key: str, payloads: list[bytes], clients: int) -> tuple[float, list[float], dict]:
    """Send every payload with `clients` requests in flight; return (seconds, latencies, statuses)."""
    multi = pycurl.CurlMulti()
    url = f"{base}/api/v1/devices/"
    headers = ["Content-Type: application/json", f"Authorization: Bearer {key}", "Expect:"]
    free = []
    for _ in range(clients):
        handle = pycurl.Curl()
        handle.setopt(pycurl.URL, url)
        handle.setopt(pycurl.HTTPHEADER, headers)
        handle.setopt(pycurl.POST, 1)
        handle.setopt(pycurl.TCP_NODELAY, 1)
        free.append(handle)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    pending = iter(payloads)
    in_flight = 0
    started = time.perf_counter()

    def submit(handle: pycurl.Curl) -> bool:
        body = next(pending, None)
        if body is None:
            free.append(handle)
            return False
        handle.sink = io.BytesIO()
        handle.setopt(pycurl.WRITEDATA, handle.sink)
        handle.setopt(pycurl.POSTFIELDS, body)
        multi.add_handle(handle)
        return True

    while free:
        if submit(free.pop()):
            in_flight += 1
        else:
            break
    while in_flight:
        multi.select(1.0)
        while multi.perform()[0] == pycurl.E_CALL_MULTI_PERFORM:
            pass
        _, done, failed = multi.info_read()
        for handle in done:
            multi.remove_handle(handle)
            status = handle.getinfo(pycurl.RESPONSE_CODE)
            statuses[status] = statuses.get(status, 0) + 1
            latencies.append(handle.getinfo(pycurl.TOTAL_TIME))
            in_flight -= 1
            if submit(handle):
                in_flight += 1
        for handle, _errno, message in failed:
            multi.remove_handle(handle)
            statuses[-1] = statuses.get(-1, 0) + 1
            print("transport error:", message, file=sys.stderr)
            in_flight -= 1
            if submit(handle):
                in_flight += 1
    return time.perf_counter() - started, latencies, statuses


def cpu_seconds(pids: list[int]) -> float:
    """User+system CPU of these processes so far (Linux /proc), gone processes count 0."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / tick


def server_pids(master: int) -> list[int]:
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return [master, *map(int, children)]


def analyze(database: str) -> None:
    import psycopg2

    conn = psycopg2.connect(database)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("ANALYZE tokens_devicetoken")
    conn.close()


def backend_pids(database: str) -> list[int]:
    import psycopg2

    conn = psycopg2.connect(database)
    with conn.cursor() as cur:
        cur.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        pids = [row[0] for row in cur.fetchall()]
    conn.close()
    return pids


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--warmup", type=int, default=1_000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--worker-class", default="sync")
    parser.add_argument("--server", choices=("gunicorn", "granian"), default="gunicorn")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--database", default="postgres://postgres@127.0.0.1:5432/bench_register")
    args = parser.parse_args()

    env = {
        **os.environ,
        "DATABASE_URL": args.database,
        "DB_CONN_MAX_AGE": "600",
        "DEBUG": "false",
        "LOG_LEVEL": "WARNING",
        "DJANGO_SETTINGS_MODULE": "pushsvc.settings",
    }
    load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    recreate_database(args.database)
    key = setup_app(env)
    payloads = bodies(args.warmup + args.requests)
    if args.server == "granian":
        proc, base = start_granian(env, args.workers, args.threads)
    else:
        proc, base = start_server(env, args.workers, args.worker_class, args.threads)
    try:
        run(base, key, payloads[: args.warmup], args.clients)
        # A production table has planner statistics; a table created a second ago has none, and
        # without them PostgreSQL may scan (app, platform) instead of probing the token's index.
        analyze(args.database)
        # CPU per request, by component: the only figure that survives a busy shared machine.
        servers, backends = server_pids(proc.pid), backend_pids(args.database)
        cpu_before = (cpu_seconds(servers), cpu_seconds(backends), time.process_time())
        seconds, latencies, statuses = run(base, key, payloads[args.warmup :], args.clients)
        cpu_after = (cpu_seconds(servers), cpu_seconds(backends), time.process_time())
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    latencies.sort()
    ok = statuses.get(200, 0) + statuses.get(201, 0)
    print(
        f"server: {args.server} {args.worker_class if args.server == 'gunicorn' else 'wsgi'} "
        f"x{args.workers} (threads {args.threads}); "
        f"client: pycurl CurlMulti, {args.clients} handles; db: {urlsplit(args.database).path[1:]}"
    )
    print(f"statuses: {dict(sorted(statuses.items()))}; load average before: {load_before}")
    print(f"upserts: {len(latencies)} in {seconds:.2f} s = {ok / seconds:,.0f} upserts/s (2xx only)")
    print(
        f"latency: p50 {statistics.median(latencies) * 1000:.1f} ms, "
        f"p99 {latencies[int(len(latencies) * 0.99) - 1] * 1000:.1f} ms, "
        f"max {latencies[-1] * 1000:.1f} ms"
    )
    web, pg, client = (1e6 * (b - a) / len(latencies) for a, b in zip(cpu_before, cpu_after, strict=True))
    print(f"cpu per request: web server {web:.0f} us, postgres {pg:.0f} us, client {client:.0f} us")
    if ok != len(payloads) - args.warmup:
        raise SystemExit("some upserts failed")


if __name__ == "__main__":
    main()
