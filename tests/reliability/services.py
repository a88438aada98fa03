"""Private Redis, PostgreSQL and RabbitMQ servers for the restart tests: the machine's shared services are
used by everybody's tests and are never restarted. Each server runs on a free port in a temporary
directory and is stopped (and its files removed) by the test that started it."""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


class PrivateRedis:
    """`redis-server` with nothing on disk (as the machine's Redis is configured here) unless
    `appendonly`: then an AOF fsynced every second, in its own directory."""

    def __init__(self, port: int | None = None, *, appendonly: bool = False) -> None:
        self.port = port or free_port()
        self.appendonly = appendonly
        self.dir = Path(tempfile.mkdtemp(prefix="pushsvc-redis-"))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir)]
        args += [
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "everysec",
        ]
        with open(self.dir / "log", "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        _wait(self._up, 10, f"redis on {self.port}")
        return self

    def _up(self) -> bool:
        try:
            return bool(redis.Redis(port=self.port, socket_connect_timeout=0.2).ping())
        except redis.RedisError:
            return False

    def restart(self, down_s: float = 1.0) -> None:
        """SHUTDOWN (writes the AOF if enabled, nothing else), stay down `down_s`, start again."""
        self._shutdown()
        _wait(lambda: not self._up(), 10, f"redis on {self.port} to stop")
        time.sleep(down_s)  # the outage itself: clients meet a refused connection meanwhile
        self.start()

    def _shutdown(self) -> None:
        # By port, not by process: the scenario's process restarts a server the test started.
        with contextlib.suppress(redis.ConnectionError):  # the server closes the connection as it exits
            redis.Redis(port=self.port, socket_connect_timeout=0.5).shutdown(nosave=not self.appendonly)

    def stop(self) -> None:
        if self._up():
            self._shutdown()
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
        if self.proc:
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivatePostgres:
    """A throwaway cluster (Debian's initdb/pg_ctl, run as the postgres user, trust auth)."""

    def __init__(self) -> None:
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        if not bins:
            raise RuntimeError("no /usr/lib/postgresql/*/bin/pg_ctl on this machine")
        self.bin = Path(bins[-1]).parent
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="pushsvc-pg-"))
        os.chmod(self.dir, 0o777)
        self.data = self.dir / "data"

    @property
    def url(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *args: str, timeout: float = 60) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *args], check=True, capture_output=True, timeout=timeout
        )

    def start(self) -> PrivatePostgres:
        if not self.data.exists():
            self._as_postgres(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres")
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._as_postgres(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            opts,
            "-l",
            str(self.dir / "log"),
            "-w",
            "start",
        )
        return self

    def restart(self, down_s: float = 1.0) -> None:
        """Fast shutdown (every session is terminated, as in a failover or an upgrade), then start."""
        self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
        time.sleep(down_s)  # the outage itself
        self.start()

    def stop(self) -> None:
        if self.data.exists():
            with contextlib.suppress(subprocess.CalledProcessError):
                self._as_postgres(
                    str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"
                )
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivateRabbitMQ:
    """A RabbitMQ node of its own (Debian's rabbitmq-server, run as the rabbitmq user through its
    wrapper), on free ports, with its data in a temporary directory: the machine's node serves
    everybody's tests and is never restarted. `restart` stops the whole node (the Erlang VM
    exits) and starts it again on the same data, as an upgrade or a crash-and-restart does."""

    def __init__(self) -> None:
        self.name = f"pushsvc_test_{secrets.token_hex(4)}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="pushsvc-rabbitmq-"))
        os.chmod(self.dir, 0o777)  # the node runs as the rabbitmq user
        (self.dir / "enabled_plugins").write_text("[].\n")
        # A config of its own: the machine's /etc/rabbitmq/rabbitmq.conf names port 5672.
        (self.dir / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def _env(self) -> dict[str, str]:
        return {
            **os.environ,
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.dir / "pid"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
        }

    def _ctl(self, *args: str, timeout: float = 90) -> None:
        subprocess.run(
            ["rabbitmqctl", "-n", self.name, *args], check=True, capture_output=True, timeout=timeout
        )

    def start(self) -> PrivateRabbitMQ:
        if shutil.which("rabbitmq-server") is None:
            raise RuntimeError("rabbitmq-server is not on PATH (Debian: package rabbitmq-server)")
        subprocess.run(["rabbitmq-server", "-detached"], env=self._env(), check=True, timeout=60)
        try:
            # `wait` with the pid file: until the node has written it and booted (await_startup
            # fails at once while the node is not yet registered).
            self._ctl("wait", str(self.dir / "pid"), "--timeout", "90", timeout=120)
        except subprocess.CalledProcessError as exc:
            logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in (self.dir / "log").glob("*.log"))
            self.stop()  # whatever half-started, and its directory
            raise RuntimeError(f"RabbitMQ node {self.name} did not start: {exc.stderr!r}\n{logs}") from exc
        return self

    def restart(self, down_s: float = 1.0) -> None:
        """`rabbitmqctl stop` (the node exits: every connection is cut), then start on the same data."""
        self._ctl("stop", str(self.dir / "pid"))  # with the pid file: returns once the VM has exited
        time.sleep(down_s)  # the outage itself: clients meet a refused connection meanwhile
        self.start()

    def stop(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError):
            self._ctl("stop", str(self.dir / "pid"), timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)
