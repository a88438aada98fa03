"""Real parts for campaign tests, the benchmark and the demo: token populations, a bulk loader,
a Celery worker subprocess, and the environment that points workers at the simulator.

Nothing here stands in for code under test: rows go into the real database, workers are real
`celery worker` processes, and the simulator is the project's own, over real sockets.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import random
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from django.conf import settings
from django.db import connection
from django.utils import timezone

from tokens.models import App, DeviceToken

BASE_DIR = Path(settings.BASE_DIR)
FAULT_PREFIX = "fa0175"  # docs/simulator.md: a token starting with fa0175NN gets fault NN
T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float, interval: float = 0.1, what: str = "") -> T:
    """Poll until `predicate()` is truthy; its value, or TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


# --- populations -------------------------------------------------------------------------------
def make_token(platform: str, fault: str | None = None) -> str:
    """A token the simulator accepts (or faults on, with `fault` = "01".."09")."""
    prefix = FAULT_PREFIX + fault if fault else ""
    if platform == "ios":
        return prefix + secrets.token_hex(32)[len(prefix) :]
    return prefix + secrets.token_urlsafe(110) + ":APA91b" + secrets.token_urlsafe(30)


@dataclass
class Population:
    """Tokens loaded for one app: `tokens[platform][fault or ""]` lists the tokens of each kind."""

    tokens: dict[str, dict[str, list[str]]] = field(default_factory=dict)

    def of(self, platform: str | None = None, fault: str | None = "") -> list[str]:
        out: list[str] = []
        for p, by_fault in self.tokens.items():
            if platform and p != platform:
                continue
            for f, toks in by_fault.items():
                if fault is None or f == fault:
                    out += toks
        return out

    def count(self, platform: str | None = None, fault: str | None = None) -> int:
        return len(self.of(platform, fault))


def build_population(counts: dict[str, int], faults: dict[str, dict[str, int]], seed: int = 7) -> list[tuple]:
    """[(platform, token, fault)] shuffled so every shard mixes healthy and faulty tokens.

    `counts`: devices per platform; `faults`: per platform, devices per fault code (part of counts).
    """
    rng = random.Random(seed)
    rows: list[tuple[str, str, str]] = []
    for platform, n in counts.items():
        special = faults.get(platform, {})
        kinds = [code for code, k in special.items() for _ in range(k)]
        kinds += [""] * (n - len(kinds))
        rows += [(platform, make_token(platform, code or None), code) for code in kinds]
    rng.shuffle(rows)
    return rows


def load_devices(app: App, rows: Iterable[tuple[str, str, str]], user_prefix: str = "u") -> Population:
    """Insert the rows as active devices: COPY on PostgreSQL, bulk INSERT elsewhere. Returns
    which tokens went in with which fault."""
    population = Population()
    # Registered a day ago: before any APNs 410 timestamp the simulator gives, so 410s prune.
    now = timezone.now() - timedelta(days=1)
    records = []
    for i, (platform, token, fault) in enumerate(rows):
        population.tokens.setdefault(platform, {}).setdefault(fault, []).append(token)
        records.append(
            (
                app.pk,
                f"{user_prefix}{i}",
                str(uuid.uuid4()),
                platform,
                token,
                hashlib.sha256(token.encode()).hexdigest(),
                now,
            )
        )
    if connection.vendor == "postgresql":
        _copy(records)
    else:
        DeviceToken.objects.bulk_create(
            (
                DeviceToken(
                    app_id=a,
                    user_id=u,
                    device_id=d,
                    platform=p,
                    token=t,
                    token_hash=h,
                    last_seen=ts,
                    created_at=ts,
                    updated_at=ts,
                )
                for a, u, d, p, t, h, ts in records
            ),
            batch_size=2000,
        )
    return population


def _copy(records: list[tuple]) -> None:
    table = DeviceToken._meta.db_table
    columns = "app_id, user_id, device_id, platform, token, token_hash, last_seen, created_at, updated_at"
    with connection.cursor() as cursor:
        for start in range(0, len(records), 200_000):
            buf = io.StringIO()
            writer = csv.writer(buf)
            for a, u, d, p, t, h, ts in records[start : start + 200_000]:
                stamp = ts.isoformat()
                writer.writerow((a, u, d, p, t, h, stamp, stamp, stamp))
            buf.seek(0)
            cursor.copy_expert(
                f"COPY {table} ({columns}, web_p256dh, web_auth, app_version, locale, is_active, "
                f"deactivation_reason) FROM STDIN WITH (FORMAT csv)",
                _with_defaults(buf),
            )


def _with_defaults(buf: io.StringIO) -> io.StringIO:
    out = io.StringIO()
    for line in buf:
        out.write(line.rstrip("\r\n") + ',"","","","",true,""\n')
    out.seek(0)
    return out


# --- the simulator, seen from workers --------------------------------------------------------------
def simulator_env(sim: Any) -> dict[str, str]:
    """Environment that points provider endpoints and TLS trust at a running SimulatorProcess."""
    base = sim.base_url
    return {
        "APNS_ENDPOINT_PRODUCTION": base,
        "APNS_ENDPOINT_SANDBOX": base,
        "FCM_ENDPOINT": base,
        "HMS_ENDPOINT": base,
        "HMS_TOKEN_URL": base + "/oauth2/v3/token",
        "PUSH_CA_BUNDLE": sim.ca_file,
        "WEBPUSH_ALLOW_INSECURE": "true",
    }


def simulator_app(sim: Any, slug: str | None = None, **overrides: Any) -> App:
    """An App holding the simulator's credentials (production APNs environment)."""
    creds = sim.credentials
    fields = {
        "apns_topic": creds.apns_topic,
        "apns_environment": "production",
        "apns_key_p8": creds.apns_key_p8,
        "apns_key_id": creds.apns_key_id,
        "apns_team_id": creds.apns_team_id,
        "fcm_service_account": creds.fcm_service_account,
        "hms_app_id": creds.hms_app_id,
        "hms_client_secret": creds.hms_client_secret,
        "vapid_private_key": creds.vapid_private_key,
        "vapid_public_key": creds.vapid_public_key,
        "vapid_subject": creds.vapid_subject,
    }
    fields.update(overrides)
    slug = slug or f"sim-{secrets.token_hex(4)}"
    return App.objects.create(slug=slug, name=slug, **fields)


# --- Celery workers ------------------------------------------------------------------------------
def database_url() -> str:
    """The URL of the database this process is connected to (pytest-django's test database)."""
    s = connection.settings_dict
    if connection.vendor != "postgresql":
        return settings.DATABASE_URL
    auth = s["USER"] + (f":{s['PASSWORD']}" if s.get("PASSWORD") else "")
    return f"postgres://{auth}@{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}/{s['NAME']}"


class CeleryWorker:
    """`celery -A pushsvc worker` as a subprocess, logging to a file, ready when it says so."""

    def __init__(
        self,
        queues: Iterable[str] = ("default", "priority", "apns", "fcm", "hms", "webpush"),
        *,
        concurrency: int = 2,
        pool: str = "prefork",
        env: dict[str, str] | None = None,
        name: str | None = None,
        log_dir: Path | None = None,
        loglevel: str = "INFO",
        beat: bool = False,
        prefix: Iterable[str] = (),
    ) -> None:
        self.queues = list(queues)
        self.concurrency = concurrency
        self.pool = pool
        self.env = env or {}
        self.name = name or f"w{secrets.token_hex(3)}"
        self.log_dir = log_dir or BASE_DIR / "var" / "workers"
        self.loglevel = loglevel
        self.beat = beat
        self.prefix = list(prefix)  # e.g. ["ip", "netns", "exec", ns]: run it on another host
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_file = self.log_dir / f"{self.name}.log"

    def start(self, timeout: float = 60.0) -> CeleryWorker:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            *self.prefix, sys.executable, "-m", "celery", "-A", "pushsvc", "worker",
            "-P", self.pool, "-c", str(self.concurrency), "-Q", ",".join(self.queues),
            "-n", f"{self.name}@%h", "--loglevel", self.loglevel,
            "--without-gossip", "--without-mingle", "-O", "fair",
        ]  # fmt: skip
        if self.beat:
            cmd += ["-B", "-s", str(self.log_dir / f"{self.name}-beat-schedule")]
        env = dict(os.environ)
        env.update(self.env)
        env.setdefault("DJANGO_SETTINGS_MODULE", "pushsvc.settings")
        with open(self.log_file, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=BASE_DIR, start_new_session=True
            )
        try:
            wait_for(self._ready, timeout, 0.1, f"worker {self.name} ready (log: {self.log_file})")
        except BaseException:
            self.stop(timeout=5)
            raise
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"worker {self.name} exited {self.proc.returncode}:\n{self.log_tail()}")
        try:
            return b" ready." in self.log_file.read_bytes()
        except FileNotFoundError:
            return False

    def log_tail(self, lines: int = 80) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def child_pids(self) -> list[int]:
        if self.proc is None:
            return []
        out = subprocess.run(
            ["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True, check=False
        ).stdout
        return [int(p) for p in out.split()]

    def stop(self, timeout: float = 30.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)  # warm shutdown: finish the current task
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def __enter__(self) -> CeleryWorker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def iter_chunks(items: list[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def sim_counts(sim: Any, tokens: list[str], batch: int = 2_000) -> dict[str, int]:
    """The simulator's accepted deliveries per token, asked in batches its admin API accepts."""
    counts: dict[str, int] = {}
    for part in iter_chunks(tokens, batch):
        counts.update(sim.counts(part))
    return counts


# --- RabbitMQ as the broker (settings.BROKER_IS_RABBITMQ) ---------------------------------------
# A test run owns its vhost (TEST_RABBITMQ_URL in the Makefile) as it owns its Redis database: it
# empties every queue pushsvc declares there before each worker test, the task queues and Celery's
# native delayed-delivery queues (a countdown published by an earlier test would land later).
def broker_queue_names() -> list[str]:
    from kombu.transport.native_delayed_delivery import level_name

    return [*settings.TASK_QUEUE_NAMES, *(level_name(level) for level in range(28))]


def purge_rabbitmq(url: str | None = None) -> int:
    """Empty this vhost's pushsvc queues (those that exist); how many messages were dropped."""
    from kombu import Connection

    dropped = 0
    with Connection(url or settings.CELERY_BROKER_URL, connect_timeout=5) as conn:
        conn.ensure_connection(max_retries=1)
        channel = conn.channel()
        for name in broker_queue_names():
            try:
                dropped += channel.queue_purge(name) or 0
            except conn.channel_errors as exc:
                if getattr(exc, "code", None) != 404:
                    raise
                channel = conn.channel()  # no such queue (yet): the error closed the channel
        channel.close()
    return dropped


def rabbitmqctl(*args: str, timeout: float = 60) -> str:
    """`rabbitmqctl ARGS` on this machine's RabbitMQ node (the fault tests that act on the broker
    itself need it, as the Redis ones need redis-server); its output, or RuntimeError."""
    import shutil

    if shutil.which("rabbitmqctl") is None:
        raise RuntimeError(
            "rabbitmqctl is not on PATH: the RabbitMQ fault tests act on the broker through it "
            "(Debian: package rabbitmq-server)"
        )
    cmd = ["rabbitmqctl", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr or done.stdout}")
    return done.stdout


def rabbitmq_vhost(url: str | None = None) -> str:
    from urllib.parse import unquote, urlparse

    path = urlparse(url or settings.CELERY_BROKER_URL).path
    return unquote(path[1:]) if len(path) > 1 else "/"
