"""Revoke an API key by its public prefix (shown at creation, in admin and in create_api_key)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from tokens.models import ApiKey


class Command(BaseCommand):
    help = "Revoke an API key, given its prefix (the 12 hex digits after 'psk_')."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("prefix", help="key prefix, or the whole key")

    def handle(self, *args: Any, **o: Any) -> None:
        given = o["prefix"].strip()
        prefix = ApiKey.parse_prefix(given) or given.removeprefix(ApiKey.KEY_PREFIX)
        key = None
        if len(prefix) == 12 and not prefix.strip("0123456789abcdef"):
            key = ApiKey.objects.select_related("app").filter(prefix=prefix).first()
        if key is None:
            raise CommandError(f"No API key with prefix {prefix[:16]!r}.")
        if key.is_revoked:
            self.stdout.write(f"Key {key.prefix} of {key.app.slug} was already revoked at {key.revoked_at}.")
            return
        key.revoke()
        self.stdout.write(
            f"Revoked key {key.prefix} of {key.app.slug}. Web processes stop accepting it within "
            "API_KEY_CACHE_SECONDS (default 5 s)."
        )
