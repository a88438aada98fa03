"""The deactivation audit table of token hygiene (tokens/invalidation.py).

Database-only: the table is written and read with bulk SQL by tokens/invalidation.py and
tokens/hygiene.py, never through a model, so it stays out of the migration state and out of the
registry's models (makemigrations never sees or removes it). Rows reference tokens, apps and
campaigns by plain ids: the audit must outlive the tokens the nightly prune deletes.
"""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("tokens", "0001_initial"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[
                migrations.CreateModel(
                    name="DeactivationAudit",
                    fields=[
                        ("id", models.BigAutoField(primary_key=True, serialize=False)),
                        # A unique id per audit row (named for the Redis stream that once fed
                        # this table; tokens/invalidation.py now generates it).
                        ("stream_id", models.CharField(max_length=32, unique=True)),
                        ("device_id", models.BigIntegerField()),
                        ("token_hash", models.CharField(max_length=64)),
                        ("app_id", models.BigIntegerField()),
                        ("provider", models.CharField(max_length=16)),
                        ("reason", models.CharField(max_length=64)),
                        ("provider_ts", models.DateTimeField(null=True)),
                        ("observed_at", models.DateTimeField()),
                        ("campaign_id", models.BigIntegerField(null=True)),
                        # False: the token was already inactive, re-registered after the provider's
                        # timestamp, or rotated/moved (its hash no longer matches).
                        ("applied", models.BooleanField()),
                        ("recorded_at", models.DateTimeField()),
                    ],
                    options={
                        "db_table": "tokens_deactivation_audit",
                        "indexes": [
                            models.Index(fields=["campaign_id", "provider"], name="deact_audit_campaign_idx"),
                            models.Index(fields=["app_id", "recorded_at"], name="deact_audit_app_time_idx"),
                        ],
                    },
                ),
            ],
            state_operations=[],
        ),
    ]
