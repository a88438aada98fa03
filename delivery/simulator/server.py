"""Starting the simulator: bind, pick a front, announce readiness, serve until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
from pathlib import Path
from typing import Any

from delivery.simulator.core import Simulator
from delivery.simulator.credentials import ensure_credentials

log = logging.getLogger("delivery.simulator")

FRONTS = ("fast", "strict")


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
        from delivery.simulator import strict

        # APNs certificate authentication: client certificates must chain to this CA (the
        # generated one unless --apns-client-ca names another). The fast front does not check them.
        client_ca = apns_client_ca or creds.apns_client_ca_file
        ctx = strict.ssl_context(creds.server_cert_file, creds.server_key_file, client_ca) if tls else None
        server = await strict.serve(sim, sock, ctx)
        announce()
        await stop.wait()
        server.close()
        return

    from delivery.simulator import fast

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
