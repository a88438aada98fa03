"""`python manage.py run_simulator`: the local APNs / FCM / HMS / Web Push stand-in (docs/simulator.md)."""

from __future__ import annotations

import json
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from delivery.simulator.server import FRONTS, main


class Command(BaseCommand):
    help = "Run the provider simulator (APNs, FCM v1, HMS, Web Push) over HTTP/2."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8443, help="0 picks a free port")
        parser.add_argument("--front", choices=FRONTS, default="fast")
        parser.add_argument("--tls", action="store_true", default=True)
        parser.add_argument("--no-tls", dest="tls", action="store_false", help="cleartext h2c and HTTP/1.1")
        parser.add_argument("--workdir", default=str(settings.BASE_DIR / "var" / "simulator"))
        parser.add_argument("--knobs", default="", help="initial knobs as JSON, e.g. '{\"latency_ms\": 5}'")
        parser.add_argument("--ready-file", default="", help="write {base_url, port, pid} here once serving")
        parser.add_argument(
            "--exit-with-parent", action="store_true", help="stop when the parent process dies"
        )
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

    def handle(self, *args: Any, **opts: Any) -> None:
        try:
            knobs = json.loads(opts["knobs"]) if opts["knobs"] else {}
        except json.JSONDecodeError as exc:
            raise CommandError(f"--knobs is not JSON: {exc}") from exc
        if not isinstance(knobs, dict):
            raise CommandError("--knobs must be a JSON object")
        main(
            front=opts["front"],
            host=opts["host"],
            port=opts["port"],
            tls=opts["tls"],
            workdir=opts["workdir"],
            knobs=knobs,
            ready_file=opts["ready_file"] or None,
            exit_with_parent=opts["exit_with_parent"],
            apns_client_ca=opts["apns_client_ca"] or None,
            fast_options={
                "runtime_threads": opts["fast_threads"],
                "task_impl": opts["fast_task_impl"],
                "interface": opts["fast_interface"],
            },
        )
