from django.apps import AppConfig


class TokensConfig(AppConfig):
    name = "tokens"
    verbose_name = "Apps and device tokens"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Registers the Bearer scheme with drf-spectacular (extensions register on import).
        from . import schema, signals  # noqa: F401

        signals.connect()
