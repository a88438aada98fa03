"""A campaign's stored per-interval series (the campaign page's chart) and per-version answers.

Written once per shard run, in the run's transaction (campaigns/sending/ledger.py `apply_shard_run`):

- one upsert into the run's `SAMPLE_BASE_S` (10 s) interval row of `CampaignSample`
  (`... ON CONFLICT (campaign, start) DO UPDATE SET delivered = delivered + EXCLUDED.delivered`),
  whatever the shard size: concurrent shards of one interval add to one row;
- one upsert into `VersionTally`, a row per (platform, app version, answer) present in the run.

Bounded: when an upsert opens a new interval (at most once per 10 s per campaign) and the campaign
then holds more than `SAMPLE_MAX_ROWS` rows, the rows older than the newest `SAMPLE_KEEP_FINE`
are merged pairwise (two neighbours become one row spanning both), which halves them. Old
intervals so get coarser as the campaign ages, recent ones stay 10 s wide, and a campaign never
holds more than `SAMPLE_MAX_ROWS` rows (about 240 points for a campaign of minutes or of days).
Per-version rows are bounded by the versions present in the target; the page shows the top
`VERSIONS_SHOWN` and folds the rest into "other". They count the answers providers gave; devices
a re-run found already delivered by a run that died before recording them (`skipped_duplicate`)
were not sent again, so they are in the series' deliveries but in no version's answers.

These are figures for operators, not accounting: a database error here is logged and loses one
run's figures; the campaign's own counters (campaigns/models.py) are written in the run's
transaction and stay exact.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from django.db import DatabaseError, connection, transaction

from campaigns.counts import add_counts
from campaigns.models import Campaign, CampaignSample, VersionTally
from delivery.providers.specs import SPECS

if TYPE_CHECKING:
    from campaigns.sending.ledger import ShardResults

logger = logging.getLogger(__name__)

SAMPLE_BASE_S = 10
SAMPLE_MAX_ROWS = 240
SAMPLE_KEEP_FINE = 60  # the last ~10 minutes stay at full resolution
VERSIONS_SHOWN = 10
OTHER = "other"
UNKNOWN = "unknown"  # devices that registered no app_version
SAMPLE_FIELDS = ("delivered", "failed", "invalid", "retried", "expired")
PROVIDER_OF = {spec.platform: spec.name for spec in SPECS}  # the metric label per platform


# --- write side (workers) ------------------------------------------------------------------------
def record_run(campaign_id: int, platform: str, results: ShardResults, now: float | None = None) -> None:
    """Add one shard run to its interval and to the per-version answers (two statements)."""
    counts = {
        "delivered": len(results.delivered),
        "failed": results.failed,
        "invalid": len(results.invalid) + results.held_invalid,
        "retried": results.retried,
        "expired": len(results.expired),
    }
    try:
        # A savepoint: a caller inside a transaction keeps a usable connection if this fails.
        with transaction.atomic():
            opened = add_sample(campaign_id, counts, time.time() if now is None else now)
            _add_versions(campaign_id, platform, results.versions)
        if opened:
            compact(campaign_id)
    except DatabaseError as exc:
        logger.warning("campaign %s: chart figures not recorded: %s", campaign_id, type(exc).__name__)


def add_sample(campaign_id: int, counts: dict[str, int], now: float) -> bool:
    """Add `counts` to the interval holding `now`; True if that interval's row was new."""
    if not any(counts.values()):
        return False
    start = int(now) - int(now) % SAMPLE_BASE_S
    table = CampaignSample._meta.db_table
    columns = ", ".join(SAMPLE_FIELDS)
    updates = ", ".join(f"{name} = {table}.{name} + EXCLUDED.{name}" for name in SAMPLE_FIELDS)
    sql = (
        f"INSERT INTO {table} (campaign_id, start, width, {columns}) "
        f"VALUES (%s, %s, %s, {', '.join(['%s'] * len(SAMPLE_FIELDS))}) "
        f"ON CONFLICT (campaign_id, start) DO UPDATE SET {updates} "
        "RETURNING (xmax = 0)"  # PostgreSQL: xmax is 0 on a freshly inserted row
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [campaign_id, start, SAMPLE_BASE_S, *(counts[n] for n in SAMPLE_FIELDS)])
        return bool(cursor.fetchone()[0])


def _add_versions(campaign_id: int, platform: str, versions: dict[tuple[str, str], int]) -> None:
    add_counts(
        VersionTally._meta.db_table,
        ("campaign_id", "platform", "app_version", "outcome"),
        ((campaign_id, platform, (v or "")[:32], outcome, n) for (v, outcome), n in versions.items() if n),
    )


def compact(campaign_id: int) -> int:
    """Merge the older rows pairwise while the campaign holds more than SAMPLE_MAX_ROWS; returns
    the rows removed. Runs under the rows' locks, so two workers never merge the same rows."""
    with transaction.atomic():
        rows = list(
            CampaignSample.objects.select_for_update()
            .filter(campaign_id=campaign_id)
            .order_by("start")
            .values("pk", "start", "width", *SAMPLE_FIELDS)
        )
        if len(rows) <= SAMPLE_MAX_ROWS:
            return 0
        old = rows[: len(rows) - SAMPLE_KEEP_FINE]
        merged, doomed = [], []
        for first, second in zip(old[0::2], old[1::2], strict=False):
            # The pair becomes one row from the first's start to the second's end (gaps included:
            # an interval without a row sent nothing).
            first["width"] = second["start"] + second["width"] - first["start"]
            for name in SAMPLE_FIELDS:
                first[name] += second[name]
            merged.append(first)
            doomed.append(second["pk"])
        CampaignSample.objects.filter(pk__in=doomed).delete()
        CampaignSample.objects.bulk_update(
            [CampaignSample(**row) for row in merged], ["width", *SAMPLE_FIELDS]
        )
        return len(doomed)


# --- read side (the campaign page) ---------------------------------------------------------------
def series_of(campaign: Campaign) -> list[list[int]]:
    """[[start, width, delivered, failed, invalid, retried, expired], ...] oldest first, at most
    SAMPLE_MAX_ROWS (+ the few a busy interval may add before its compaction)."""
    rows = (
        CampaignSample.objects.filter(campaign=campaign)
        .order_by("start")
        .values_list("start", "width", *SAMPLE_FIELDS)
    )
    return [list(row) for row in rows]


def answers_of(campaign: Campaign) -> dict[str, Any]:
    """Provider answers by provider (shares) and by app version (top VERSIONS_SHOWN per
    campaign by volume, the rest as "other"), from the VersionTally rows."""
    per_provider: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    per_version: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for platform, version, outcome, count in VersionTally.objects.filter(campaign=campaign).values_list(
        "platform", "app_version", "outcome", "count"
    ):
        provider = PROVIDER_OF.get(platform, platform)
        per_provider[provider][outcome] += count
        per_version[(provider, version or UNKNOWN)][outcome] += count
    ranked = sorted(per_version.items(), key=lambda item: (-sum(item[1].values()), item[0]))
    shown = ranked[:VERSIONS_SHOWN]
    rest: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for (provider, _version), outcomes in ranked[VERSIONS_SHOWN:]:
        for outcome, count in outcomes.items():
            rest[provider][outcome] += count
    versions = [_version_row(provider, version, outcomes) for (provider, version), outcomes in shown]
    versions += [_version_row(provider, OTHER, outcomes) for provider, outcomes in sorted(rest.items())]
    providers = {provider: dict(outcomes) for provider, outcomes in sorted(per_provider.items())}
    return {"providers": providers, "versions": versions}


def _version_row(provider: str, version: str, outcomes: dict[str, int]) -> dict[str, Any]:
    answered = sum(outcomes.values())
    delivered = outcomes.get("delivered", 0)
    invalid = outcomes.get("invalid_token", 0)
    # The alert's definition (ops/alerts.yml): invalid tokens are left out of the success rate.
    judged = answered - invalid
    return {
        "provider": provider,
        "version": version,
        "answers": answered,
        "delivered": delivered,
        "invalid": invalid,
        "failed": answered - delivered - invalid,
        "success": round(100.0 * delivered / judged, 1) if judged else None,
    }
