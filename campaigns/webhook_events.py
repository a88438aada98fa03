"""Campaign state changes as webhook events (tokens/webhooks.py): `campaign.completed`,
`campaign.halted`, `campaign.paused`.

`campaign_changed` is called inside the transaction that moves the campaign (campaigns/control.py,
campaigns/sending/ledger.py), so the event is in the outbox exactly when the new state committed.
"""

from __future__ import annotations

from campaigns.models import Campaign
from tokens import webhooks

EVENT_OF_STATUS = {
    Campaign.Status.COMPLETED.value: webhooks.CAMPAIGN_COMPLETED,
    Campaign.Status.HALTED.value: webhooks.CAMPAIGN_HALTED,
    Campaign.Status.PAUSED.value: webhooks.CAMPAIGN_PAUSED,
}
COUNTERS = ("targeted", "sent", "delivered", "failed", "invalidated", "invalid_kept", "expired", "retried")


def campaign_changed(campaign_id: int, status: str) -> None:
    """Record the event of a campaign that just moved to `status` (no-op for other states)."""
    event_type = EVENT_OF_STATUS.get(str(status))
    if event_type is None:
        return
    row = (
        Campaign.objects.filter(pk=campaign_id)
        .values("app_id", "name", "kind", "status_reason", "started_at", "finished_at", *COUNTERS)
        .first()
    )
    if row is None:
        return
    webhooks.emit(
        row["app_id"],
        event_type,
        {
            "campaign": {
                "id": campaign_id,
                "name": row["name"],
                "kind": row["kind"],
                "status": str(status),
                "reason": row["status_reason"],
                "started_at": row["started_at"].isoformat() if row["started_at"] else None,
                "finished_at": row["finished_at"].isoformat() if row["finished_at"] else None,
                "counters": {name: row[name] for name in COUNTERS},
            }
        },
    )
