"""Localized content: `message.localizations`, chosen per device by its locale with language
fallback (pt-BR -> pt -> default), validated like the default text, rendered once per variant.

Sends go through the API (a direct send) and `run.run_shard` in this process to the simulator's
fast front over TLS, on real PostgreSQL and Redis; what each device got is what the simulator
recorded for its token.
"""

from __future__ import annotations

import pytest

from campaigns.models import Shard
from campaigns.pytest_fixtures import api_client
from campaigns.sending import run
from campaigns.testing import build_population, load_devices, simulator_app
from delivery import runtime
from delivery.payload import PayloadError, PayloadTooLarge, PushMessage, fit_message, match_locale
from delivery.providers.base import Target
from delivery.providers.fcm import FcmProvider
from tokens.models import DeviceToken
from tokens.testing import make_app

LOCALIZED = {
    "title": "Sale",
    "body": "Everything must go",
    "localizations": {
        "fr": {"title": "Soldes", "body": "Tout doit disparaître"},
        "pt": {"title": "Promoção", "body": "Tudo deve sair"},
        "pt-BR": {"title": "Liquidação"},  # body left out: the default's
    },
}
# device locale -> (title, body) it must get
EXPECTED = {
    "fr": ("Soldes", "Tout doit disparaître"),
    "fr-CA": ("Soldes", "Tout doit disparaître"),
    "pt-BR": ("Liquidação", "Everything must go"),
    "pt_br": ("Liquidação", "Everything must go"),
    "pt-PT": ("Promoção", "Tudo deve sair"),
    "de": ("Sale", "Everything must go"),
    "": ("Sale", "Everything must go"),
}


def _shown(platform: str, record: dict) -> tuple[str, str]:
    """(title, body) as the provider would show it, from the simulator's record of the request."""
    if platform == "ios":
        alert = record["payload"]["aps"]["alert"]
        return alert.get("title", ""), alert.get("body", "")
    message = record["message"]
    notification = message["android"]["notification"] if platform == "huawei" else message["notification"]
    return notification.get("title", ""), notification.get("body", "")


@pytest.mark.django_db(transaction=True)
def test_each_device_gets_its_language_with_fallback(fast_sim) -> None:
    app = simulator_app(fast_sim)
    platforms = ("ios", "android", "huawei")
    population = load_devices(app, build_population({p: len(EXPECTED) for p in platforms}, {}))
    locale_of: dict[str, str] = {}
    for platform in platforms:
        for token, locale in zip(population.of(platform), EXPECTED, strict=True):
            DeviceToken.objects.filter(app=app, token=token).update(locale=locale)
            locale_of[token] = locale

    response = api_client(app).post(
        "/api/v1/notifications/",
        {"message": LOCALIZED, "user_ids": [f"u{i}" for i in range(len(locale_of))]},
        format="json",
    )
    assert response.status_code == 202, response.content
    assert response.json()["message"]["localizations"]["pt-BR"] == {"title": "Liquidação"}
    for shard_id in Shard.objects.filter(campaign_id=response.json()["id"]).values_list("pk", flat=True):
        run.run_shard(shard_id)

    records = fast_sim.last(list(locale_of))
    got = {}
    for platform in platforms:
        for token in population.of(platform):
            got[(platform, locale_of[token])] = _shown(platform, records[token])
    assert got == {(p, locale): text for p in platforms for locale, text in EXPECTED.items()}
    assert set(fast_sim.counts(list(locale_of)).values()) == {1}


class CountingFcm(FcmProvider):
    """The real FCM adapter, counting how often it renders (the work the cache must spare)."""

    renders = 0

    def _render(self, message):  # type: ignore[no-untyped-def]
        self.renders += 1
        return super()._render(message)


@pytest.mark.django_db(transaction=True)
def test_each_variant_is_rendered_once_not_per_device(fast_sim) -> None:
    app = simulator_app(fast_sim)
    population = load_devices(app, build_population({"android": 300}, {}))
    locales = ["fr", "pt-BR", "pt_br", "pt-PT", "de", ""]
    targets = [
        Target(device_id=i, token=token, locale=locales[i % len(locales)])
        for i, token in enumerate(population.of("android"))
    ]
    message = PushMessage.from_dict(LOCALIZED)
    provider = CountingFcm.from_app(app)
    try:
        results = runtime.run(provider.send_many(targets, message))
        runtime.run(provider.send_many(targets, message))  # a second chunk of the same shard
    finally:
        runtime.run(provider.aclose())
    assert {r.outcome for r in results} == {"delivered"}
    # fr, pt-BR (pt_br too), pt (for pt-PT), and the default (de, ""): four renderings for 600 sends.
    assert provider.renders == 4
    assert message.localized("pt_br") is message.localized("pt-BR")


def test_locale_matching_falls_back_to_the_language_then_the_default() -> None:
    tags = {"pt-BR": 1, "pt": 1, "zh-Hant": 1, "EN": 1}
    assert match_locale("pt-BR", tags) == "pt-BR"
    assert match_locale("pt_br", tags) == "pt-BR"
    assert match_locale("pt-PT", tags) == "pt"
    assert match_locale("zh-Hant-TW", tags) == "zh-Hant"
    assert match_locale("zh-Hans", tags) == ""
    assert match_locale("en-GB", tags) == "EN"
    assert match_locale("de", tags) == ""
    assert match_locale("", tags) == ""


def test_a_localized_message_round_trips_and_variants_keep_the_message_id() -> None:
    message = PushMessage.from_dict(LOCALIZED)
    assert PushMessage.from_dict(message.to_dict()) == message
    assert "localizations" not in PushMessage.from_dict({"title": "x"}).to_dict(), "old shape kept"
    fr = message.localized("fr-CA")
    assert (fr.title, fr.body, fr.locale) == ("Soldes", "Tout doit disparaître", "fr")
    assert fr.message_id == message.message_id and fr.render_key != message.render_key
    assert fr.rendered_data() == message.rendered_data()


@pytest.mark.parametrize(
    ("localizations", "field", "words"),
    [
        ([], "localizations", "must be an object"),
        ({"français": {"title": "x"}}, "localizations.français", "language tag"),
        ({"fr": {"title": "x"}, "FR": {"title": "y"}}, "localizations.FR", "same language"),
        ({"fr": "Soldes"}, "localizations.fr", "title"),
        ({"fr": {"titre": "x"}}, "localizations.fr.titre", "unknown field"),
        ({"fr": {}}, "localizations.fr", "neither title nor body"),
        ({"fr": {"title": "x" * 513}}, "localizations.fr.title", "at most 512"),
        ({"fr": {"title": "a\nb"}}, "localizations.fr.title", "control characters"),
        ({"fr": {"body": "é" * 40_000}}, "localizations.fr.body", "at most 65536 bytes"),
        ({"fr": {"body": 7}}, "localizations.fr.body", "must be a string"),
        ({f"x{i}": {"title": "t"} for i in range(101)}, "localizations", "at most 100 languages"),
    ],
)
def test_localizations_are_validated_like_the_default_text(localizations, field, words) -> None:
    with pytest.raises(PayloadError) as caught:
        PushMessage.from_dict({"title": "Sale", "localizations": localizations})
    assert caught.value.field == field and words in caught.value.message, caught.value


def test_a_silent_push_has_no_localizations() -> None:
    with pytest.raises(PayloadError) as caught:
        PushMessage.from_dict({"silent": True, "data": {"k": "v"}, "localizations": {"fr": {"title": "x"}}})
    assert caught.value.field == "localizations"


def test_each_language_must_fit_and_long_bodies_are_cut_per_language() -> None:
    data = {f"k{i}": "v" * 1100 for i in range(3)}
    # The default fits with room; the French title (2 bytes a character) leaves none for any body.
    message = PushMessage.from_dict(
        {"title": "Sale", "data": data, "localizations": {"fr": {"title": "é" * 480}}}
    )
    with pytest.raises(PayloadTooLarge) as caught:
        message.check_fits(["ios"])
    assert caught.value.field == "localizations.fr" and "(fr text)" in caught.value.message

    long = PushMessage.from_dict({"title": "t", "body": "b", "localizations": {"fr": {"body": "é" * 5000}}})
    long.check_fits(["ios", "android", "huawei", "web"])  # a long body is cut, not refused
    fitted = fit_message(long.localized("fr"), FcmProvider.payload_size, 4096, "android")
    assert fitted.truncated and fitted.locale == "fr" and fitted.body.endswith("…")
    assert long.localized("de").body == "b"


def test_the_api_names_the_wrong_language_field(db) -> None:
    client = api_client(make_app())
    r = client.post(
        "/api/v1/campaigns/",
        {"message": {"title": "Sale", "localizations": {"fr": {"title": "x" * 600}}}, "draft": True},
        format="json",
    )
    assert r.status_code == 400
    assert "localizations.fr.title" in r.json()["errors"], r.json()
