"""Publishing the campaign tasks, by name: planning, sending and recovery enqueue work without
importing the tasks module (campaigns/tasks.py), which imports them. The names are the public
contract with queued messages and routes (pushsvc/settings.py), kept across moves."""

from __future__ import annotations

from celery import current_app
from django.conf import settings

PLAN_TASK = "delivery.tasks.plan_campaign"
SEND_TASK = "delivery.tasks.send_shard"
LAUNCH_DUE_TASK = "delivery.tasks.launch_due_campaigns"
TOPIC_TASK = "campaigns.send_topic"
PRIORITY_QUEUE = "priority"


def shard(shard_id: int, queue: str, lane: int, countdown: float | None = None) -> None:
    """A send task for one shard, at its lane's broker priority (Shard.Lane; the numbers are the
    broker's: pushsvc/settings.py SHARD_LANE_PRIORITIES)."""
    current_app.send_task(
        SEND_TASK,
        args=[shard_id],
        queue=queue,
        countdown=countdown,
        priority=settings.SHARD_LANE_PRIORITIES[lane],
    )


def plan(campaign_id: int) -> None:
    current_app.send_task(PLAN_TASK, args=[campaign_id])


def topic(
    campaign_id: int, platform: str, attempt: int, deadline: int | None, countdown: float | None = None
) -> None:
    """A topic or condition send to one provider (campaigns/topics.py), on the priority queue."""
    current_app.send_task(
        TOPIC_TASK, args=[campaign_id, platform, attempt, deadline], queue=PRIORITY_QUEUE, countdown=countdown
    )
