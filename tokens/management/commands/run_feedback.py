"""`manage.py run_feedback`: a long-running consumer of the provider feedback stream.

The beat task `tokens.drain_feedback` is the default consumer: nothing extra to deploy, and
invalidations reach the registry within HYGIENE_FEEDBACK_FLUSH_S. This command is for
deployments that want them applied as they arrive, or more throughput: it blocks on the stream
and applies each batch at once, and several copies (each its own consumer in the group) share
the work. Both can run at the same time; the consumer group gives each entry to one of them.
"""

from __future__ import annotations

import logging
import signal
import threading

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser
from django.db import DatabaseError, close_old_connections, connection
from redis.exceptions import RedisError

from tokens.feedback import apply_feedback, default_consumer

logger = logging.getLogger(__name__)


class Command(BaseCommand):
    help = "Apply provider invalidations from the feedback stream until stopped (SIGTERM/SIGINT)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--batch", type=int, default=None, help="Override HYGIENE_FEEDBACK_BATCH.")
        parser.add_argument("--consumer", default=None, help="Consumer name (default host:pid).")
        parser.add_argument("--once", action="store_true", help="Apply one batch (or wait once) and exit.")

    def handle(self, *args, batch: int | None, consumer: str | None, once: bool, **options) -> None:
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        consumer = consumer or default_consumer()
        block_ms = int(settings.HYGIENE_FEEDBACK_FLUSH_S * 1000)
        self.stdout.write(f"feedback consumer {consumer} started")
        while not stop.is_set():
            if not connection.in_atomic_block:  # (a caller's transaction, e.g. in tests)
                # A consumer lives for days: drop connections that broke or aged out, as Django
                # does around each request.
                close_old_connections()
            try:
                report = apply_feedback(batch, block_ms=block_ms, consumer=consumer)
            except (DatabaseError, RedisError):
                # The batch stays pending for this consumer and is retried on the next turn.
                logger.exception("feedback batch failed; retrying")
                stop.wait(1.0)
                continue
            if report.read:
                self.stdout.write(
                    f"applied {report.read} entries: {report.deactivated} deactivated,"
                    f" {report.reclaimed} reclaimed, {report.dropped} dropped, {report.seconds * 1000:.0f} ms"
                )
            if once:
                break
        self.stdout.write(f"feedback consumer {consumer} stopped")
