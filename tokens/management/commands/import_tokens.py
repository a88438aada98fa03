"""Bulk-load device tokens from CSV with the registration API's validation and upsert semantics.

    python manage.py import_tokens FILE.csv --app SLUG
    python manage.py import_tokens --from-django-push-notifications DATABASE_URL --app SLUG

Columns: device_id,platform,token,user_id[,app_version,locale,p256dh,auth,last_seen,registered_at]
(positional, or in any order under a header line naming them; for `web` rows `token` is the
subscription endpoint and p256dh/auth its keys; last_seen and registered_at are ISO 8601, empty =
the time of the import). The second form reads django-push-notifications' APNSDevice and GCMDevice
tables instead (tokens/dpn.py) and reports every device it skips, with the reason. Every row goes
through `tokens.validation`; a bad row is reported with its line number and skipped, the good ones
are loaded. Within the file the last row for a device (and for a token) wins, like consecutive
registrations would.

PostgreSQL: rows stream into a temporary table with COPY while they are validated (PostgreSQL
ingests in parallel; `tokens.importer` checks the common rows without building a registration),
then one statement applies them in bulk, in the order of the token index, after deleting known
tokens that moved to another device: INSERT ... ON CONFLICT, or, while the app has few devices
yet, a plain INSERT for the new ones and the upsert for the known. The whole import is one
transaction. SQLite (the demo): batched executemany.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from tokens import dpn, importer, registry
from tokens.models import App, DeviceToken
from tokens.validation import PLATFORMS, Registration

COLUMNS = importer.COLUMNS
COPY_READ = 1 << 18
SQLITE_BATCH = 2_000
ANALYZE_AFTER_ROWS = 10_000
APPLY_ATTEMPTS = 3
# The apply step splits new from known devices while the app has at most 1/10 as many devices as
# the file has rows (see Command._apply).
FEW_KNOWN_DIVISOR = 10
_TABLE = DeviceToken._meta.db_table
_INSERT_COLUMNS = (
    "app_id, device_id, platform, token, token_hash, web_p256dh, web_auth, user_id, app_version, "
    "locale, last_seen, last_success_at, is_active, deactivated_at, deactivation_reason, "
    "created_at, updated_at"
)
# Rows are inserted in the order of the largest index, (app_id, platform, token_hash) (on PostgreSQL
# the token claims' primary key, which the insert trigger fills in the same order): its pages
# are then filled left to right instead of visited at random (about a third less PostgreSQL time
# in that index). The sort key is one bigint, the platform's rank (names sort the same in any
# collation) above the hash's first 60 bits: a sort on a single pass-by-value key took 2.4 s
# where ORDER BY platform, token_hash took 5.8 s for 1M rows here. Only the speed depends on it.
_TOKEN_ORDER = (
    "(CASE platform "
    + " ".join(f"WHEN '{name}' THEN {rank}" for rank, name in enumerate(sorted(PLATFORMS)))
    + f" ELSE {len(PLATFORMS)} END)::int8 << 60 | ('x' || substr(token_hash, 1, 15))::bit(60)::int8"
)


class Command(BaseCommand):
    help = "Bulk-load device tokens from a CSV file (validated like the API; bad rows reported)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("file", nargs="?", help="CSV file, or - for standard input")
        parser.add_argument(
            "--from-django-push-notifications",
            dest="dpn_url",
            metavar="DATABASE_URL",
            help="read django-push-notifications' device tables from this database "
            "(postgres://... or sqlite:///path) instead of a CSV file",
        )
        parser.add_argument("--app", required=True, help="slug of the App the tokens belong to")
        parser.add_argument(
            "--max-reported", type=int, default=100, help="print at most this many bad rows (default 100)"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        app = App.objects.filter(slug=options["app"]).first()
        if app is None:
            raise CommandError(f"No app with slug {options['app']!r} (create it with create_app).")
        source = options["file"]
        self.labels: dict[int, str] = {}
        if options["dpn_url"]:
            if source:
                raise CommandError("Give either a CSV file or --from-django-push-notifications, not both.")
            try:
                export = dpn.read_devices(options["dpn_url"])
            except dpn.SourceError as exc:
                raise CommandError(str(exc)) from None
            self.labels = export.labels
            for label, reason in export.skipped:
                self.stderr.write(f"skipped {label}: {reason}")
            stream: Any = contextlib.nullcontext()
            rows: Any = export.reader()
            skipped_at_source = len(export.skipped)
        elif not source:
            raise CommandError(
                "Give a CSV file (or - for standard input), or --from-django-push-notifications."
            )
        elif source == "-":
            stream = io.TextIOWrapper(
                sys.stdin.buffer, encoding="utf-8", errors="surrogateescape", newline=""
            )
        else:
            path = Path(source)
            if not path.is_file():
                raise CommandError(f"{source}: no such file.")
            stream = path.open(encoding="utf-8", errors="surrogateescape", newline="")
        if not options["dpn_url"]:
            rows = None
            skipped_at_source = 0
        self.bad = 0
        self.verbosity = options["verbosity"]
        self.max_reported = options["max_reported"]
        started = time.perf_counter()
        now = timezone.now()
        with stream:
            try:
                reader = importer.Rows(rows if rows is not None else csv.reader(stream))
                if self._uses_copy():
                    good = self._load_postgresql(app.pk, importer.copy_chunks(reader, self._reject, now), now)
                else:
                    good = self._load_batched(app.pk, importer.registrations(reader, self._reject, now), now)
            except importer.HeaderError as exc:
                raise CommandError(f"{source}: {exc}") from None
        # Every row this run inserted carries its `now` as created_at; updates keep theirs.
        created = DeviceToken.objects.filter(app=app, created_at=now).count()
        seconds = time.perf_counter() - started
        rate = good / seconds if seconds > 0 else 0.0
        self.stdout.write(
            f"imported {good} rows into {app.slug} ({created} new devices, {good - created} updated), "
            f"rejected {self.bad}, in {seconds:.1f} s = {rate:,.0f} rows/s"
        )
        if skipped_at_source:
            self.stdout.write(f"skipped {skipped_at_source} django-push-notifications devices (see above)")
        if self.bad:
            raise CommandError(f"{self.bad} bad rows were skipped (see above); the other rows are loaded.")

    def _uses_copy(self) -> bool:
        return connection.vendor == "postgresql"

    def _reject(self, line: int, message: str) -> None:
        self.bad += 1
        if self.bad <= self.max_reported:
            self.stderr.write(f"{self.labels.get(line) or f'line {line}'}: {message}")
        elif self.bad == self.max_reported + 1:
            self.stderr.write("(more bad rows: not shown)")

    # --- PostgreSQL: COPY into a staging table, then one statement ----------------------------

    def _load_postgresql(self, app_id: int, chunks: Iterator[bytes], now: datetime) -> int:
        with transaction.atomic(), connection.cursor() as cursor:
            # Big sorts (de-duplication) and hashes in memory; this transaction only.
            phase = _Phases(self, cursor)
            cursor.execute("SET LOCAL work_mem = '256MB'")
            cursor.execute(
                "CREATE TEMP TABLE import_stage (line integer, device_id uuid, platform varchar(16), "
                "token text, token_hash varchar(64), web_p256dh varchar(128), web_auth varchar(64), "
                "user_id varchar(255), app_version varchar(32), locale varchar(35), "
                "last_seen timestamptz, registered_at timestamptz) ON COMMIT DROP"
            )
            raw = cursor.cursor  # psycopg2's own cursor: COPY is not part of Django's API
            raw.copy_expert(
                f"COPY import_stage ({importer.STAGE_COLUMNS}) FROM STDIN",
                _CopySource(chunks),
                size=COPY_READ,
            )
            staged = raw.rowcount
            phase("copy")
            source = "import_stage"
            if _has_duplicates(cursor):
                # Last row wins per device, then per token (a token on two devices: the later).
                cursor.execute(
                    "CREATE TEMP TABLE import_rows ON COMMIT DROP AS "
                    "SELECT DISTINCT ON (platform, token_hash) * FROM ("
                    "  SELECT DISTINCT ON (device_id) * FROM import_stage ORDER BY device_id, line DESC"
                    ") latest ORDER BY platform, token_hash, line DESC"
                )
                source = "import_rows"
            cursor.execute(f"ANALYZE {source}")
            phase("de-duplicate")
            for attempt in range(1, APPLY_ATTEMPTS + 1):
                try:
                    with transaction.atomic():  # a savepoint: a lost race undoes only this step
                        good = self._apply(cursor, app_id, source, staged, now)
                    break
                except IntegrityError:
                    # A registration through the API committed one of these tokens on another
                    # device meanwhile: run the step again, its DELETE now sees that row.
                    if attempt == APPLY_ATTEMPTS:
                        raise
            phase("upsert")
        # (the commit runs the foreign key checks on app_id that Django's constraint defers)
        phase("commit")
        if good >= ANALYZE_AFTER_ROWS:
            with connection.cursor() as cursor:
                # Fresh planner statistics: a bulk load changes the table's shape at once (and
                # autovacuum may take a minute to notice).
                cursor.execute(f"ANALYZE {_TABLE}")
        phase("analyze")
        return good

    def _apply(self, cursor: Any, app_id: int, source: str, staged: int, now: datetime) -> int:
        # Tokens that moved to another device leave their old device (as in the API); on the
        # partitioned table the token's device is found through its claim (tokens 0007).
        if registry.claims_in_use():
            cursor.execute(
                f"DELETE FROM {_TABLE} d USING {source} s, {DeviceToken.CLAIMS_TABLE} c "
                "WHERE c.app_id = %s AND c.platform = s.platform AND c.token_hash = s.token_hash "
                "AND c.device_id <> s.device_id AND d.app_id = c.app_id AND d.device_id = c.device_id",
                [app_id],
            )
        else:
            cursor.execute(
                f"DELETE FROM {_TABLE} d USING {source} s WHERE d.app_id = %s "
                "AND d.platform = s.platform AND d.token_hash = s.token_hash AND d.device_id <> s.device_id",
                [app_id],
            )
        # The file's registration time is the row's `updated_at` (the APNs 410 rule compares it
        # with Apple's timestamp); created_at stays the time pushsvc first stored the device.
        select = f"""
            SELECT %s, device_id, platform, token, token_hash, web_p256dh, web_auth, user_id,
                   app_version, locale, COALESCE(last_seen, %s), NULL, TRUE, NULL, '', %s,
                   COALESCE(registered_at, %s)
            FROM {source} s {{}}
            ORDER BY {_TOKEN_ORDER}"""
        params = [app_id, now, now, now]
        if not self._few_known(cursor, app_id, staged):
            upsert = f"INSERT INTO {_TABLE} ({_INSERT_COLUMNS}) {select.format('')}"
            cursor.execute(f"{upsert} {registry.UPSERT_CONFLICT_CLAUSE}", params)
            return cursor.rowcount
        # Mostly new devices: those by plain INSERT. ON CONFLICT would probe the device index
        # once more per row before inserting (3 s of 17.5 s on a 1M-row load into a new app);
        # telling new from known costs a join with the app's devices, cheap while they are few.
        # Both halves run in one statement, so on one snapshot: a device is either new or known,
        # and one that an API registration commits meanwhile makes the plain INSERT fail on the
        # unique device index (IntegrityError: the caller runs the step again) rather than vanish.
        known = f"EXISTS (SELECT 1 FROM {_TABLE} d WHERE d.app_id = %s AND d.device_id = s.device_id)"
        cursor.execute(
            f"""
            WITH new_devices AS (
                INSERT INTO {_TABLE} ({_INSERT_COLUMNS}) {select.format("WHERE NOT " + known)}
                RETURNING 1
            ), known_devices AS (
                INSERT INTO {_TABLE} ({_INSERT_COLUMNS}) {select.format("WHERE " + known)}
                {registry.UPSERT_CONFLICT_CLAUSE}
                RETURNING 1
            )
            SELECT (SELECT count(*) FROM new_devices) + (SELECT count(*) FROM known_devices)
            """,
            [*params, app_id] * 2,
        )
        return cursor.fetchone()[0]

    @staticmethod
    def _few_known(cursor: Any, app_id: int, staged: int) -> bool:
        """Whether the app has at most a tenth as many devices as rows were staged (counting
        stops there: cheap for a large app)."""
        cap = staged // FEW_KNOWN_DIVISOR
        cursor.execute(
            f"SELECT count(*) FROM (SELECT 1 FROM {_TABLE} WHERE app_id = %s LIMIT %s) known",
            [app_id, cap + 1],
        )
        return cursor.fetchone()[0] <= cap

    # --- SQLite (and any other database): batched executemany --------------------------------

    def _load_batched(
        self, app_id: int, rows: Iterator[tuple[int, Registration, importer.Dates]], now: datetime
    ) -> int:
        good = 0
        batch: list[tuple[Registration, importer.Dates]] = []

        def flush() -> None:
            nonlocal good
            # Last row wins per device and per token inside the batch; earlier batches are
            # committed, so the moved-token DELETE sees them.
            by_device: dict[Any, tuple[Registration, importer.Dates]] = {}
            for reg, dates in batch:
                by_device.pop(reg.device_id, None)  # re-insert: dict order = order of last rows
                by_device[reg.device_id] = (reg, dates)
            by_token = {(reg.platform, reg.token_hash): (reg, dates) for reg, dates in by_device.values()}
            kept = list(by_token.values())
            good += registry.upsert_many(
                app_id, [reg for reg, _ in kept], now=now, dates=[dates for _, dates in kept]
            )
            batch.clear()

        for _line, reg, dates in rows:
            batch.append((reg, dates))
            if len(batch) >= SQLITE_BATCH:
                flush()
        if batch:
            flush()
        return good


def _has_duplicates(cursor: Any) -> bool:
    """Whether the staged rows repeat a device or a token (hash aggregates: no sort of the rows)."""
    cursor.execute(
        "SELECT EXISTS (SELECT 1 FROM import_stage GROUP BY device_id HAVING count(*) > 1) "
        "OR EXISTS (SELECT 1 FROM import_stage GROUP BY platform, token_hash HAVING count(*) > 1)"
    )
    return cursor.fetchone()[0]


class _Phases:
    """With --verbosity 2, prints each step's wall time and the CPU time PostgreSQL's backend
    spent on it (when the server runs on this host: the figure that stays meaningful on a busy
    machine)."""

    def __init__(self, command: Command, cursor: Any) -> None:
        self.command = command
        self.enabled = command.verbosity >= 2
        self.stat = None
        if self.enabled:
            cursor.execute("SELECT pg_backend_pid()")
            stat = Path(f"/proc/{cursor.fetchone()[0]}/stat")
            self.stat = stat if stat.exists() else None
        self.last = (time.perf_counter(), self._backend_cpu(), time.process_time())

    def _backend_cpu(self) -> float:
        if self.stat is None:
            return 0.0
        try:
            fields = self.stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def __call__(self, name: str) -> None:
        if not self.enabled:
            return
        now = (time.perf_counter(), self._backend_cpu(), time.process_time())
        wall, backend, own = (b - a for a, b in zip(self.last, now, strict=True))
        cpu = f", postgres cpu {backend:.2f} s" if self.stat else ""
        self.command.stdout.write(f"  {name}: {wall:.2f} s (python cpu {own:.2f} s{cpu})")
        self.last = now


class _CopySource(io.RawIOBase):
    """A file-like object over the COPY text chunks, pulled as PostgreSQL takes them: reading the
    CSV, validating and PostgreSQL's ingest overlap and memory stays flat."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = b""

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        target = size if size and size > 0 else COPY_READ
        while len(self._buffer) < target:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            self._buffer = self._buffer + chunk if self._buffer else chunk
        data, self._buffer = self._buffer[:target], self._buffer[target:]
        return data
