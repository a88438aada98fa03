"""`python manage.py run_simulator`: the local APNs / FCM / HMS / Web Push stand-in (docs/simulator.md).

Kept for the docs and scripts that start it this way; the simulator itself is the top-level
`simulator` package (also `python -m simulator`, which takes the same options).
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from simulator.server import add_arguments, main, main_options


class Command(BaseCommand):
    help = "Run the provider simulator (APNs, FCM v1, HMS, Web Push) over HTTP/2."

    def add_arguments(self, parser: CommandParser) -> None:
        add_arguments(parser, workdir=settings.BASE_DIR / "var" / "simulator")

    def handle(self, *args: Any, **opts: Any) -> None:
        try:
            kwargs = main_options(opts)
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        main(**kwargs)
