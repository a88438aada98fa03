"""Issue an API key for an App. The key is printed once; only its hash is stored."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from tokens.models import ApiKey, App


class Command(BaseCommand):
    help = "Create an API key for an app and print it (once)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("app_slug")
        parser.add_argument(
            "--scopes",
            default=ApiKey.SCOPE_DEVICES,
            help=f"comma-separated: {', '.join(ApiKey.SCOPES)} (default: devices)",
        )
        parser.add_argument("--name", default="", help="a label, e.g. 'ios-app' or 'marketing-backend'")
        parser.add_argument("--quiet-key", action="store_true", help="print only the key (for scripts)")

    def handle(self, *args: Any, **o: Any) -> None:
        app = App.objects.filter(slug=o["app_slug"]).first()
        if app is None:
            raise CommandError(f"No app with slug {o['app_slug']!r} (create it with create_app).")
        scopes = [s.strip() for s in o["scopes"].split(",") if s.strip()]
        unknown = sorted(set(scopes) - set(ApiKey.SCOPES))
        if not scopes or unknown:
            raise CommandError(f"Scopes must be among {', '.join(ApiKey.SCOPES)}; got {o['scopes']!r}.")
        key, raw = ApiKey.issue(app, list(dict.fromkeys(scopes)), name=o["name"])
        if o["quiet_key"]:
            self.stdout.write(raw)
            return
        self.stdout.write(
            f"API key for {app.slug} (scopes: {', '.join(key.scopes)}; prefix {key.prefix}):\n\n"
            f"    {raw}\n\n"
            "Store it now: it is not shown again (only a hash is kept). Use it as\n"
            f"    Authorization: Bearer {raw[:20]}...\n"
            f"Revoke it with: python manage.py revoke_api_key {key.prefix}"
        )
