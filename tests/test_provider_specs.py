"""The provider declarations (delivery/providers/specs.py) agree with what they are derived into
and with the adapters themselves."""

from __future__ import annotations

from django.conf import settings

from delivery.providers.registry import ADAPTERS, provider_class
from delivery.providers.specs import SPECS, provider_name
from tokens.models import Platform


def test_one_spec_per_platform_and_the_adapter_agrees() -> None:
    assert [spec.platform for spec in SPECS] == list(Platform.values)
    for spec in SPECS:
        adapter = provider_class(spec.platform)
        assert (adapter.platform, adapter.queue) == (spec.platform, spec.queue)
        assert provider_name(spec.platform) == spec.name


def test_settings_and_registry_are_derived_from_the_specs() -> None:
    assert tuple(spec.queue for spec in SPECS) == settings.PUSH_QUEUES
    queues = {q.name for q in settings.CELERY_TASK_QUEUES}
    assert queues == {"default", "priority", *settings.PUSH_QUEUES, settings.WEBHOOK_QUEUE}
    assert dict(ADAPTERS) == {spec.platform: spec.adapter for spec in SPECS}
    assert provider_name("unknown") == "unknown"
