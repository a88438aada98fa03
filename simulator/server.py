"""Starting the simulator: bind, pick a front, announce readiness, serve until SIGTERM/SIGINT.

The command-line options live here too, so `python -m simulator` and `python manage.py run_simulator`
take the same ones and start the same server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
from pathlib import Path
from typing import Any

from simulator.credentials import ensure_credentials
from simulator.world import Simulator

log = logging.getLogger("simulator")

FRONTS = ("fast", "strict")
# The checkout's var/simulator: where both commands and the test helper keep the generated CA and keys.
DEFAULT_WORKDIR = Path(__file__).resolve().parent.parent / "var" / "simulator"


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def run(
    *,
    front: str,
    host: str,
    port: int,
    tls: bool,
    workdir: str,
    knobs: dict[str, Any] | None = None,
    ready_file: str | None = None,
    fast_options: dict[str, Any] | None = None,
    exit_with_parent: bool = False,
    apns_client_ca: str | None = None,
) -> None:
    if front not in FRONTS:
        raise ValueError(f"front must be one of {FRONTS}, got {front!r}")
    sock = _bind(host, port)
    port = sock.getsockname()[1]
    url_host = f"[{host}]" if ":" in host else host
    base_url = f"{'https' if tls else 'http'}://{url_host}:{port}"
    creds = ensure_credentials(workdir, base_url)
    sim = Simulator(creds, front=front)
    if knobs:
        sim.configure(knobs)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    background: list[asyncio.Future[None]] = []  # referenced so the loop does not drop them
    if exit_with_parent:
        # A test run that is killed must not leave simulators behind: once the parent is gone the
        # process is re-parented, and we stop.
        parent = os.getppid()

        async def watch_parent() -> None:
            while os.getppid() == parent:
                await asyncio.sleep(1)
            log.info("parent %s exited, stopping", parent)
            stop.set()

        background.append(asyncio.ensure_future(watch_parent()))

    def announce() -> None:
        log.info("simulator (%s front) listening at %s, CA %s", front, base_url, creds.ca_file)
        if ready_file:
            tmp = Path(ready_file + ".tmp")
            tmp.write_text(
                json.dumps({"base_url": base_url, "port": port, "pid": os.getpid(), "front": front})
            )
            tmp.replace(ready_file)

    if front == "strict":
        from simulator import strict

        # APNs certificate authentication: client certificates must chain to this CA (the
        # generated one unless --apns-client-ca names another). The fast front does not check them.
        client_ca = apns_client_ca or creds.apns_client_ca_file
        ctx = strict.ssl_context(creds.server_cert_file, creds.server_key_file, client_ca) if tls else None
        server = await strict.serve(sim, sock, ctx)
        announce()
        await stop.wait()
        server.close()
        return

    from simulator import fast

    granian, _app = fast.build_server(
        sim,
        sock,
        (creds.server_cert_file, creds.server_key_file) if tls else None,
        **(fast_options or {}),
    )
    serving = asyncio.ensure_future(granian.serve())

    async def ready_when_bound() -> None:
        # granian starts accepting on the pre-bound socket asynchronously; announce once it answers.
        for _ in range(500):
            try:
                _r, w = await asyncio.open_connection(host, port)
                w.close()
                break
            except OSError:
                await asyncio.sleep(0.01)
        announce()

    await ready_when_bound()
    waiter = asyncio.ensure_future(stop.wait())
    await asyncio.wait({serving, waiter}, return_when=asyncio.FIRST_COMPLETED)
    granian.stop()
    await asyncio.wait_for(serving, timeout=10)


def main(**kwargs: Any) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is in requirements
        pass
    asyncio.run(run(**kwargs))


def add_arguments(parser: argparse.ArgumentParser, workdir: str | os.PathLike[str] = DEFAULT_WORKDIR) -> None:
    """The command-line options (docs/simulator.md), for `python -m simulator` and run_simulator."""
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8443, help="0 picks a free port")
    parser.add_argument("--front", choices=FRONTS, default="fast")
    parser.add_argument("--tls", action="store_true", default=True)
    parser.add_argument("--no-tls", dest="tls", action="store_false", help="cleartext h2c and HTTP/1.1")
    parser.add_argument("--workdir", default=str(workdir))
    parser.add_argument("--knobs", default="", help="initial knobs as JSON, e.g. '{\"latency_ms\": 5}'")
    parser.add_argument("--ready-file", default="", help="write {base_url, port, pid} here once serving")
    parser.add_argument("--exit-with-parent", action="store_true", help="stop when the parent process dies")
    parser.add_argument(
        "--apns-client-ca",
        default="",
        help="PEM CA whose client certificates the APNs front accepts (strict front; default: "
        "the generated apns_client_ca.pem in the workdir)",
    )
    # Tuning of the fast front, for measuring alternatives (bench/simulator_ceiling.py).
    parser.add_argument("--fast-threads", type=int, default=1, help="granian runtime threads")
    parser.add_argument("--fast-task-impl", choices=("asyncio", "rust"), default="asyncio")
    parser.add_argument("--fast-interface", choices=("rsgi", "asgi"), default="rsgi")


def main_options(opts: dict[str, Any]) -> dict[str, Any]:
    """`main`'s keyword arguments from the parsed options; ValueError if --knobs is not a JSON object."""
    try:
        knobs = json.loads(opts["knobs"]) if opts["knobs"] else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"--knobs is not JSON: {exc}") from exc
    if not isinstance(knobs, dict):
        raise ValueError("--knobs must be a JSON object")
    return {
        "front": opts["front"],
        "host": opts["host"],
        "port": opts["port"],
        "tls": opts["tls"],
        "workdir": opts["workdir"],
        "knobs": knobs,
        "ready_file": opts["ready_file"] or None,
        "exit_with_parent": opts["exit_with_parent"],
        "apns_client_ca": opts["apns_client_ca"] or None,
        "fast_options": {
            "runtime_threads": opts["fast_threads"],
            "task_impl": opts["fast_task_impl"],
            "interface": opts["fast_interface"],
        },
    }
