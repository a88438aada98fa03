"""`manage.py prune_tokens [--dry-run]`: the nightly prune, on demand."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandParser

from tokens.hygiene import prune_inactive


class Command(BaseCommand):
    help = "Delete tokens inactive for more than HYGIENE_PRUNE_AFTER_DAYS days (in short batches)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--dry-run", action="store_true", help="Count per app/platform; change nothing.")
        parser.add_argument("--days", type=int, default=None, help="Override HYGIENE_PRUNE_AFTER_DAYS.")
        parser.add_argument("--batch-size", type=int, default=None, help="Override HYGIENE_BATCH_SIZE.")

    def handle(self, *args, dry_run: bool, days: int | None, batch_size: int | None, **options) -> None:
        report = prune_inactive(dry_run=dry_run, older_than_days=days, batch_size=batch_size)
        for line in report.describe("delete"):
            self.stdout.write(line)
