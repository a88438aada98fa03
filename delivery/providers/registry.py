"""Which adapter serves which platform. The send path and the API look adapters up only here; the
table comes from the provider declarations (delivery/providers/specs.py), so adding a provider is
one adapter module and one spec.

Adapter modules are imported on first use: a worker that only sends to APNs never imports the Web Push
crypto stack, and importing this module stays cheap for the API process.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING

from delivery.providers.specs import SPECS

if TYPE_CHECKING:
    from delivery.providers.base import Provider

# platform (tokens.models.Platform value) -> "module:Class"
ADAPTERS: Mapping[str, str] = {spec.platform: spec.adapter for spec in SPECS}


class _Providers(Mapping[str, "type[Provider]"]):
    """`PROVIDERS[platform]` imports the adapter class on first access and keeps it."""

    def __init__(self, paths: Mapping[str, str]) -> None:
        self._paths = paths
        self._loaded: dict[str, type[Provider]] = {}

    def __getitem__(self, platform: str) -> type[Provider]:
        cls = self._loaded.get(platform)
        if cls is None:
            module, _, name = self._paths[platform].partition(":")
            cls = getattr(importlib.import_module(module), name)
            self._loaded[platform] = cls
        return cls

    def __iter__(self):
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)


PROVIDERS: Mapping[str, type[Provider]] = _Providers(ADAPTERS)


def provider_class(platform: str) -> type[Provider]:
    """The adapter class for a platform; ValueError names the known platforms when it is unknown."""
    try:
        return PROVIDERS[platform]
    except KeyError:
        raise ValueError(f"no provider for platform {platform!r}; known: {', '.join(ADAPTERS)}") from None
