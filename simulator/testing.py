"""`SimulatorProcess`: the simulator as a subprocess, for tests, benchmarks and the demo.

    with SimulatorProcess(front="strict", tls=True) as sim:
        sim.base_url, sim.ca_file, sim.credentials   # where and how to talk to it
        sim.configure(goaway_every=100); sim.reset(); sim.stats(); sim.counts(tokens)

Admin calls are plain HTTP/1.1 over the same port (stdlib only), so the helper does not depend on
any of the HTTP clients under test. The simulator's output goes to a log file in the workdir
(`.log_file`, `.log_tail()`), which a failing test can print.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import http_ece
import jwt
from cryptography.hazmat.primitives.asymmetric import ec

from simulator.credentials import SimCredentials, ensure_credentials
from simulator.server import DEFAULT_WORKDIR
from simulator.webpush_keys import b64decode

BASE_DIR = Path(__file__).resolve().parent.parent  # the checkout: `python -m simulator` runs from here


class SimulatorError(RuntimeError):
    pass


class SimulatorProcess:
    def __init__(
        self,
        front: str = "strict",
        tls: bool = True,
        workdir: str | os.PathLike[str] | None = None,
        host: str = "127.0.0.1",
        startup_timeout: float = 30.0,
        extra_args: list[str] | None = None,
        **knobs: Any,
    ) -> None:
        self.front = front
        self.tls = tls
        self.workdir = Path(workdir or DEFAULT_WORKDIR).resolve()
        self.host = host
        self.startup_timeout = startup_timeout
        self.initial_knobs = knobs
        self.extra_args = list(extra_args or [])  # further simulator options, e.g. --fast-threads 2
        self.proc: subprocess.Popen[bytes] | None = None
        self.base_url = ""
        self.port = 0
        self.log_file = ""
        self._credentials: SimCredentials | None = None
        self._conn: http.client.HTTPConnection | None = None

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> SimulatorProcess:
        if self.proc is not None:
            raise SimulatorError("already started")
        run_dir = self.workdir / "run"
        run_dir.mkdir(parents=True, exist_ok=True)
        tag = f"{self.front}-{'tls' if self.tls else 'h2c'}-{time.strftime('%H%M%S')}-{uuid.uuid4().hex[:6]}"
        ready = run_dir / f"{tag}.json"
        self.log_file = str(run_dir / f"{tag}.log")
        # Generate the credentials before the child starts, so two children never race to create them.
        ensure_credentials(self.workdir, "http://127.0.0.1:0")
        cmd = [
            sys.executable,
            "-m", "simulator",
            "--host", self.host,
            "--port", "0",
            "--front", self.front,
            "--tls" if self.tls else "--no-tls",
            "--workdir", str(self.workdir),
            "--ready-file", str(ready),
            "--exit-with-parent",
        ]  # fmt: skip
        if self.initial_knobs:
            cmd += ["--knobs", json.dumps(self.initial_knobs)]
        cmd += self.extra_args
        with open(self.log_file, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=BASE_DIR)
        deadline = time.monotonic() + self.startup_timeout
        while not ready.exists():
            if self.proc.poll() is not None:
                raise SimulatorError(f"simulator exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise SimulatorError(f"simulator not ready after {self.startup_timeout}s:\n{self.log_tail()}")
            time.sleep(0.02)
        info = json.loads(ready.read_text())
        ready.unlink()
        self.base_url, self.port = info["base_url"], info["port"]
        self._credentials = ensure_credentials(self.workdir, self.base_url)
        while True:  # the port is bound; wait until the admin endpoint answers too
            try:
                self.stats()
                break
            except (OSError, http.client.HTTPException) as exc:
                if time.monotonic() > deadline:
                    self.stop()
                    raise SimulatorError(f"simulator does not answer: {exc}\n{self.log_tail()}") from exc
                self._close_admin()
                time.sleep(0.05)
        return self

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if the process is still there after grace_s. The fast front
        (granian) waits on SIGTERM for its clients to close their connections: a client that keeps
        one open (a warm pool in the test process) holds it for the whole grace period."""
        self._close_admin()
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def __enter__(self) -> SimulatorProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(Path(self.log_file).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # ---- what clients need -------------------------------------------------------------------
    @property
    def credentials(self) -> SimCredentials:
        if self._credentials is None:
            raise SimulatorError("not started")
        return self._credentials

    @property
    def ca_file(self) -> str:
        return self.credentials.ca_file

    def url(self, path: str) -> str:
        return self.base_url + path

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca_file)

    # ---- admin API ---------------------------------------------------------------------------
    def _close_admin(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _admin(self, method: str, path: str, payload: Any = None) -> Any:
        if not self.base_url:
            raise SimulatorError("not started")
        body = json.dumps(payload).encode() if payload is not None else None
        headers = {"content-type": "application/json"} if body is not None else {}
        for retry in (True, False):
            if self._conn is None:
                parts = urlsplit(self.base_url)
                if self.tls:
                    self._conn = http.client.HTTPSConnection(
                        parts.hostname, parts.port, timeout=30, context=self.ssl_context()
                    )
                else:
                    self._conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
            try:
                self._conn.request(method, "/_sim/" + path, body=body, headers=headers)
                resp = self._conn.getresponse()
                data = resp.read()
                break
            except (OSError, http.client.HTTPException):
                self._close_admin()
                if not retry:
                    raise
        if resp.status != 200:
            raise SimulatorError(f"{method} /_sim/{path}: {resp.status} {data.decode(errors='replace')}")
        return json.loads(data)

    def stats(self) -> dict[str, Any]:
        return self._admin("GET", "stats")

    def config(self) -> dict[str, Any]:
        return self._admin("GET", "config")

    def configure(self, **knobs: Any) -> dict[str, Any]:
        return self._admin("POST", "config", knobs)

    def reset(self, config: bool = False) -> None:
        self._admin("POST", "reset", {"config": config})

    def counts(self, tokens: list[str]) -> dict[str, int]:
        return self._admin("POST", "counts", {"tokens": list(tokens)})["counts"]

    def last(self, tokens: list[str]) -> dict[str, Any]:
        """What the simulator last accepted for each token (payload and headers), None if nothing."""
        return self._admin("POST", "last", {"tokens": list(tokens)})["last"]

    def duplicates(self, limit: int = 100) -> dict[str, int]:
        return self._admin("GET", f"duplicates?limit={limit}")["duplicates"]

    def wait_for(self, predicate: Any, timeout: float = 10.0, interval: float = 0.02) -> dict[str, Any]:
        """Poll stats() until predicate(stats) is true; return those stats (or raise with the last)."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if predicate(stats):
                return stats
            if time.monotonic() > deadline:
                raise SimulatorError(f"condition not met within {timeout}s; last stats: {stats}")
            time.sleep(interval)


# ---- client-side helpers: credentials as a provider client would present them ---------------------
def apns_jwt(
    creds: SimCredentials, iat: int | None = None, kid: str | None = None, key_p8: str | None = None
) -> str:
    """An APNs provider token (ES256, kid, iss = team, iat)."""
    claims = {"iss": creds.apns_team_id, "iat": int(time.time()) if iat is None else iat}
    return jwt.encode(
        claims, key_p8 or creds.apns_key_p8, algorithm="ES256", headers={"kid": kid or creds.apns_key_id}
    )


def fcm_assertion(
    creds: SimCredentials, *, now: int | None = None, lifetime: int = 3600, **overrides: Any
) -> str:
    """The RS256 JWT a service account posts to its token_uri (JWT-bearer grant)."""
    sa = json.loads(creds.fcm_service_account)
    now = int(time.time()) if now is None else now
    claims = {
        "iss": sa["client_email"],
        "aud": sa["token_uri"],
        "scope": "https://www.googleapis.com/auth/firebase.messaging",
        "iat": now,
        "exp": now + lifetime,
        **overrides,
    }
    return jwt.encode(claims, sa["private_key"], algorithm="RS256", headers={"kid": sa["private_key_id"]})


def vapid_authorization(
    creds: SimCredentials, origin: str, *, exp: int | None = None, sub: str | None = None
) -> str:
    """`Authorization: vapid t=..., k=...` for an endpoint's origin (RFC 8292)."""
    claims = {
        "aud": origin,
        "exp": int(time.time()) + 12 * 3600 if exp is None else exp,
        "sub": creds.vapid_subject if sub is None else sub,
    }
    token = jwt.encode(claims, creds.vapid_private_key, algorithm="ES256")
    return f"vapid t={token}, k={creds.vapid_public_key}"


def webpush_encrypt(p256dh: str, auth: str, plaintext: bytes) -> bytes:
    """An aes128gcm record (RFC 8291) for a subscription, as an application server sends it."""
    sender = ec.generate_private_key(ec.SECP256R1())
    return http_ece.encrypt(
        plaintext,
        salt=os.urandom(16),
        private_key=sender,
        dh=b64decode(p256dh),
        auth_secret=b64decode(auth),
        version="aes128gcm",
    )
