"""Leave 15% of every DeviceToken heap page free (PostgreSQL only).

An app re-registers its device on every launch: the upsert rewrites last_seen and updated_at and
leaves the indexed columns as they were. With room on the page PostgreSQL makes that a HOT
update (no new entry in any of the five indexes); on a full page every re-registration writes
all five indexes again.
"""

from django.db import migrations


def set_fillfactor(apps, schema_editor, value: int = 85) -> None:
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(f"ALTER TABLE tokens_devicetoken SET (fillfactor = {value})")


def reset_fillfactor(apps, schema_editor) -> None:
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute("ALTER TABLE tokens_devicetoken RESET (fillfactor)")


class Migration(migrations.Migration):
    dependencies = [
        ("tokens", "0003_devicetoken_drop_redundant_app_index"),
    ]

    operations = [migrations.RunPython(set_fillfactor, reset_fillfactor)]
