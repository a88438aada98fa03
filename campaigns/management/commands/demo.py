"""`python manage.py demo` (`make demo`): the whole pipeline, end to end, on this machine.

Starts what it needs (the provider simulator, Celery workers, an HTTP server for the API, and a
private redis-server when none answers at REDIS_URL), registers 50,000 devices (a sample through
the HTTP API, the bulk through `import_tokens`), launches a campaign through the API with a
progress bar, prints the report, then launches a second campaign to show the pruned tokens are
no longer targeted. Everything it started is stopped at the end, on errors and on Ctrl-C.

Database: DATABASE_URL, else the SQLite file var/pushsvc.sqlite3 (WAL; two worker processes
share it well at this size; use PostgreSQL for anything bigger).
"""

from __future__ import annotations

import csv
import json
import shutil
import socket
import socketserver
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from contextlib import ExitStack
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import redis
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandParser
from django.db import connection

from campaigns.testing import CeleryWorker, build_population, simulator_app, simulator_env, wait_for
from tokens.models import ApiKey, App

SLUG = "demo"
IOS, ANDROID = 30_000, 20_000
FAULTS = {"ios": {"01": 720, "03": 1_800}, "android": {"01": 480, "03": 1_200}}
SAMPLE = 10  # devices per platform registered one by one through the HTTP API


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class Command(BaseCommand):
    help = "Run the canonical 50,000-device campaign end to end against the provider simulator."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--workers", type=int, default=2, help="Celery worker processes (default 2)")

    def handle(self, *args: Any, **options: Any) -> None:
        started = time.monotonic()
        with ExitStack() as stack:
            try:
                self._run(stack, options["workers"])
            except KeyboardInterrupt:
                self.stdout.write("\nInterrupted: stopping everything the demo started...")
        self.stdout.write(f"All demo processes stopped. Total time {time.monotonic() - started:.0f} s.")

    # ------------------------------------------------------------------------------------------
    def _run(self, stack: ExitStack, n_workers: int) -> None:
        say = self.stdout.write
        db = connection.vendor
        say(f"Database: {db} ({settings.DATABASES['default']['NAME']})")
        redis_url = self._redis(stack)
        say(f"Redis: {redis_url}")
        call_command("migrate", verbosity=0)

        from simulator.testing import SimulatorError, SimulatorProcess

        try:
            sim = stack.enter_context(SimulatorProcess(front="fast", tls=True, record_payloads=False))
        except SimulatorError as exc:  # the Rust front needs granian's wheel; the asyncio one always works
            say(f"(fast simulator front unavailable: {str(exc).splitlines()[0]}; using the strict front)")
            sim = stack.enter_context(SimulatorProcess(front="strict", tls=True, record_payloads=False))
        say(f"Provider simulator (APNs, FCM, HMS, Web Push): {sim.base_url}")

        App.objects.filter(slug=SLUG).delete()
        app = simulator_app(sim, slug=SLUG)
        _, api_key = ApiKey.issue(app, ["devices", "send"], name="demo")
        base = self._http_server(stack)
        say(f"API server: {base}/api/v1/ (docs at {base}/api/docs/)")

        rows = build_population({"ios": IOS, "android": ANDROID}, FAULTS, seed=int(time.time()))
        t0 = time.monotonic()
        sample = [r for r in rows if r[0] == "ios"][:SAMPLE] + [r for r in rows if r[0] == "android"][:SAMPLE]
        for platform, token, _fault in sample:
            self._api(
                base,
                api_key,
                "POST",
                "/api/v1/devices/",
                {"device_id": str(uuid.uuid4()), "platform": platform, "token": token, "user_id": "sample"},
            )
        sampled = {token for _, token, _ in sample}
        csv_path = settings.BASE_DIR / "var" / "demo-devices.csv"
        with open(csv_path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(("device_id", "platform", "token", "user_id"))
            for i, (platform, token, _fault) in enumerate(rows):
                if token not in sampled:
                    writer.writerow((uuid.uuid4(), platform, token, f"user{i}"))
        call_command("import_tokens", str(csv_path), app=SLUG, stdout=_Null(), stderr=_Null())
        csv_path.unlink()
        invalid = sum(v["01"] for v in FAULTS.values())
        throttled = sum(v["03"] for v in FAULTS.values())
        say(
            f"Registered {len(rows):,} devices ({IOS:,} iOS, {ANDROID:,} Android; {2 * SAMPLE} through "
            f"POST /api/v1/devices/, the rest with import_tokens) in {time.monotonic() - t0:.1f} s. "
            f"Of them {invalid:,} uninstalled the app and {throttled:,} will be throttled once."
        )
        # Apple's 410 carries the time it learned of the uninstall: now, after these registrations.
        sim.configure(unregistered_timestamp_ms=int(time.time() * 1000))

        env = {
            "DATABASE_URL": settings.DATABASE_URL,
            "REDIS_URL": redis_url,
            "CELERY_BROKER_URL": redis_url,
            "LOG_LEVEL": "WARNING",
            **simulator_env(sim),
        }
        for i in range(n_workers):
            worker = CeleryWorker(
                queues=("default", "priority", "apns", "fcm", "hms", "webpush"),
                concurrency=1,
                env=env,
                name=f"demo{i}",
                log_dir=settings.BASE_DIR / "var" / "demo",
                loglevel="INFO",
            )
            stack.callback(worker.stop)
            worker.start()
        say(f"Celery workers: {n_workers} (logs in var/demo/)\n")

        first = self._campaign(base, api_key, "Welcome back!", "First campaign")
        self._report(first)
        say("")
        second = self._campaign(base, api_key, "Second campaign", "Second campaign (after pruning)")
        by_outcome = sim.stats()["by_outcome"]
        dead_requests = by_outcome.get("apns 410 Unregistered", 0) + by_outcome.get("fcm 404 UNREGISTERED", 0)
        say(
            f"  targeted {second['counters']['targeted']:,} devices (= {len(rows):,} - "
            f"{first['counters']['invalidated']:,} pruned); requests to uninstalled apps over both "
            f"campaigns: {dead_requests:,} (all in the first one). "
            f"Delivered {second['counters']['delivered']:,}, invalid {second['counters']['invalidated']}."
        )
        say(
            "\nWatch the same thing live:\n"
            "  make web      # http://127.0.0.1:8000/admin/ (first: manage.py createsuperuser)\n"
            "  make flower   # http://127.0.0.1:5555/ (workers, the apns/fcm/hms/webpush queues, tasks)\n"
            "  make worker   # and `make simulator` for a long-running provider simulator"
        )

    # ------------------------------------------------------------------------------------------
    def _campaign(self, base: str, key: str, title: str, label: str) -> dict[str, Any]:
        body = {"name": label, "message": {"title": title, "body": "Tap to see what is new."}}
        campaign = self._api(base, key, "POST", "/api/v1/campaigns/", body)
        path = f"/api/v1/campaigns/{campaign['id']}/"
        self.stdout.write(f"{label}: campaign {campaign['id']} launched through POST /api/v1/campaigns/")
        while True:
            campaign = self._api(base, key, "GET", path)
            self._progress(campaign)
            if campaign["status"] not in ("running", "scheduled", "draft"):
                break
            time.sleep(0.25)
        self.stdout.write("")
        if campaign["status"] != "completed":
            self.stdout.write(f"  status {campaign['status']}: {campaign['status_reason']}")
        return campaign

    def _progress(self, campaign: dict[str, Any]) -> None:
        c = campaign["counters"]
        done = c["delivered"] + c["invalidated"] + c["failed"]
        total = max(c["targeted"], 1)
        width = 40
        filled = int(width * min(done / total, 1.0))
        rate = campaign["progress"]["rate_per_s"]
        line = (
            f"\r  [{'#' * filled}{'.' * (width - filled)}] {done:>6,}/{c['targeted']:,} "
            f"delivered {c['delivered']:,} retrying {max(c['retried'] - c['delivered_after_retry'], 0):,} "
            f"invalid {c['invalidated']:,} {rate:,.0f}/s "
        )
        self.stdout.write(line, ending="")
        self.stdout.flush()

    def _report(self, campaign: dict[str, Any]) -> None:
        c, p = campaign["counters"], campaign["progress"]
        say = self.stdout.write
        say(f"Report, campaign {campaign['id']} ({campaign['status']}, {p['elapsed_s']:.1f} s):")
        say(f"  targeted              {c['targeted']:>8,}")
        say(f"  delivered             {c['delivered']:>8,}")
        say(f"    of which after retry{c['delivered_after_retry']:>8,}")
        say(f"  invalid tokens pruned {c['invalidated']:>8,}")
        say(f"  failed                {c['failed']:>8,}")
        say("  provider answers other than success (devices):")
        for f in campaign["failures"]:
            say(f"    {f['platform']:<8} {f['outcome']:<14} {f['reason']:<28} {f['count']:>6,}")
        elapsed = max(p["elapsed_s"], 1e-9)
        say(
            f"  throughput            {c['delivered'] / elapsed:>8,.0f} deliveries/s "
            f"({p['rate_per_s']:,.0f} results/s, launch to completed)"
        )

    # ------------------------------------------------------------------------------------------
    def _redis(self, stack: ExitStack) -> str:
        url = settings.REDIS_URL
        try:
            redis.Redis.from_url(url, socket_connect_timeout=1).ping()
            return url
        except redis.RedisError:
            pass
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit(
                f"No Redis answers at {url} and redis-server is not on PATH: install Redis "
                "(apt install redis-server) or set REDIS_URL."
            )
        port = _free_port()
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        stack.callback(_stop, proc)
        url = f"redis://127.0.0.1:{port}/0"
        wait_for(lambda: _pings(url), 10, what="the private redis-server")
        self.stdout.write(f"(no Redis at {settings.REDIS_URL}: started a private redis-server)")
        # This process only talks to Redis from now on: point it (and the Celery client) there.
        from celery import current_app

        settings.REDIS_URL = settings.CELERY_BROKER_URL = url
        current_app.conf.broker_url = url
        return url

    def _http_server(self, stack: ExitStack) -> str:
        from django.core.wsgi import get_wsgi_application

        server = make_server(
            "127.0.0.1",
            0,
            get_wsgi_application(),
            server_class=_ThreadingWSGIServer,
            handler_class=_QuietHandler,
        )
        thread = threading.Thread(target=server.serve_forever, name="demo-http", daemon=True)
        thread.start()
        stack.callback(server.server_close)
        stack.callback(server.shutdown)
        return f"http://127.0.0.1:{server.server_port}"

    @staticmethod
    def _api(base: str, key: str, method: str, path: str, body: Any = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            base + path,
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            raise SystemExit(
                f"{method} {path} -> {exc.code}: {exc.read().decode(errors='replace')}"
            ) from None


class _Null:
    def write(self, *_: Any, **__: Any) -> None:
        pass

    def flush(self) -> None:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pings(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
