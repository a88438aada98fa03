"""Keeps the in-process API-key cache honest: any change to a key or an app clears it here."""

from __future__ import annotations

from django.db.models.signals import post_delete, post_save

from .auth import forget_cached_keys
from .models import ApiKey, App


def _forget(sender: type, **kwargs: object) -> None:
    forget_cached_keys()


def connect() -> None:
    for model in (ApiKey, App):
        post_save.connect(_forget, sender=model, dispatch_uid=f"forget-keys-save-{model.__name__}")
        post_delete.connect(_forget, sender=model, dispatch_uid=f"forget-keys-delete-{model.__name__}")
