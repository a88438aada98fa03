"""PostgreSQL: the device table becomes hash-partitioned on (app_id, device_id).

Why that key: a registration is an upsert by (app_id, device_id), so it touches one partition,
and the table's unique key keeps its constraint (PostgreSQL enforces uniqueness on a partitioned
table only for keys that contain the partition key). Not the user: a device changes user at
login and logout and would move between partitions; and one huge app spreads evenly, where a
partition per app would leave it in one.

The second unique key, one device per (app_id, platform, token_hash), does not contain the
partition key. It lives in `tokens_tokenclaim`, hash-partitioned on (app_id, token_hash) with
that key as its primary key; triggers on the device table keep it exact (statement-level, with
transition tables, for INSERT and DELETE, so a bulk import or an app's deletion is one set-based
statement; a row trigger for the rare UPDATE that changes a token; TRUNCATE empties it). The
registry and import_tokens find a token's device through it (tokens/registry.py).

The conversion copies the table in one transaction: sends read on meanwhile (SHARE lock), writes
wait until the end. A VACUUM follows, outside it: until the copy's pages are marked all-visible,
the planner reads the heap for every index entry and prefers the id index for the fan-out scan.
Measured in docs/scaling.md ("The partitioned registry"). SQLite (the demo) keeps the plain table.
"""

from django.conf import settings
from django.db import migrations, transaction

DEVICES = "tokens_devicetoken"
CLAIMS = "tokens_tokenclaim"
NEW = "tokens_devicetoken_new"

_CLAIM_TRIGGERS = f"""
CREATE FUNCTION tokens_claims_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO {CLAIMS} (app_id, platform, token_hash, device_id)
    SELECT app_id, platform, token_hash, device_id FROM inserted;
    RETURN NULL;
END $$;
CREATE FUNCTION tokens_claims_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM {CLAIMS} c USING deleted d
     WHERE c.app_id = d.app_id AND c.platform = d.platform AND c.token_hash = d.token_hash
       AND c.device_id = d.device_id;
    RETURN NULL;
END $$;
CREATE FUNCTION tokens_claims_updated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- A cross-partition UPDATE would run as DELETE + INSERT without these triggers seeing it.
    IF NEW.app_id <> OLD.app_id OR NEW.device_id <> OLD.device_id THEN
        RAISE EXCEPTION 'a device''s (app_id, device_id) cannot change; register a new device instead'
            USING ERRCODE = 'check_violation';
    END IF;
    UPDATE {CLAIMS} SET platform = NEW.platform, token_hash = NEW.token_hash
     WHERE app_id = OLD.app_id AND platform = OLD.platform AND token_hash = OLD.token_hash;
    RETURN NEW;
END $$;
CREATE FUNCTION tokens_claims_truncated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    TRUNCATE {CLAIMS};
    RETURN NULL;
END $$;
CREATE TRIGGER tokens_claims_insert AFTER INSERT ON {DEVICES}
    REFERENCING NEW TABLE AS inserted FOR EACH STATEMENT EXECUTE FUNCTION tokens_claims_inserted();
CREATE TRIGGER tokens_claims_delete AFTER DELETE ON {DEVICES}
    REFERENCING OLD TABLE AS deleted FOR EACH STATEMENT EXECUTE FUNCTION tokens_claims_deleted();
CREATE TRIGGER tokens_claims_update BEFORE UPDATE OF app_id, device_id, platform, token_hash ON {DEVICES}
    FOR EACH ROW WHEN (OLD.app_id IS DISTINCT FROM NEW.app_id OR OLD.device_id IS DISTINCT FROM NEW.device_id
                       OR OLD.platform IS DISTINCT FROM NEW.platform
                       OR OLD.token_hash IS DISTINCT FROM NEW.token_hash)
    EXECUTE FUNCTION tokens_claims_updated();
CREATE TRIGGER tokens_claims_truncate AFTER TRUNCATE ON {DEVICES}
    FOR EACH STATEMENT EXECUTE FUNCTION tokens_claims_truncated();
"""

_DROP_CLAIMS = f"""
DROP TABLE {CLAIMS};
DROP FUNCTION tokens_claims_inserted, tokens_claims_deleted, tokens_claims_updated,
    tokens_claims_truncated CASCADE;
"""

# Index names of the finished table (the model's, where it declares them).
_INDEXES = {
    "device_fanout_idx": "(app_id, platform, is_active, id)",
    "device_user_idx": "(app_id, user_id, is_active)",
}


def _is_partitioned(cursor) -> bool:
    cursor.execute("SELECT relkind FROM pg_class WHERE oid = %s::regclass", [DEVICES])
    return cursor.fetchone()[0] == "p"


def _copy_into_new(cursor, create: str, partitions: list[str]) -> None:
    """Build NEW beside the device table and fill it. Sends keep reading the old table until the
    swap; registrations wait (SHARE lock) so no write is missed."""
    cursor.execute("SET LOCAL maintenance_work_mem = '512MB'")
    cursor.execute(f"LOCK TABLE {DEVICES} IN SHARE MODE")
    cursor.execute(create)
    for statement in partitions:
        cursor.execute(statement)
    cursor.execute(f"INSERT INTO {NEW} SELECT * FROM {DEVICES}")


def _swap(cursor, indexes: dict[str, str], constraints: list[str]) -> None:
    """Index NEW, carry the id sequence over, drop the old table and give NEW its name."""
    for name, columns in indexes.items():
        cursor.execute(f"CREATE INDEX {name}_new ON {NEW} {columns}")
    for constraint in constraints:
        cursor.execute(f"ALTER TABLE {NEW} ADD {constraint}")
    cursor.execute(
        f"ALTER TABLE {NEW} ADD CONSTRAINT {DEVICES}_app_id_fk_tokens_app_id FOREIGN KEY (app_id) "
        "REFERENCES tokens_app (id) DEFERRABLE INITIALLY DEFERRED"
    )
    # Ids continue where the old table's sequence stood (deleted rows' ids are never reused).
    cursor.execute(
        "SELECT setval(pg_get_serial_sequence(%s, 'id'), last_value, is_called) "
        f"FROM {DEVICES}_id_seq",
        [NEW],
    )
    cursor.execute(f"ANALYZE {NEW}")
    cursor.execute(f"DROP TABLE {DEVICES}")
    cursor.execute(f"ALTER TABLE {NEW} RENAME TO {DEVICES}")
    cursor.execute(f"ALTER SEQUENCE {NEW}_id_seq RENAME TO {DEVICES}_id_seq")
    cursor.execute(f"ALTER TABLE {DEVICES} RENAME CONSTRAINT {NEW}_pkey TO {DEVICES}_pkey")
    for name in indexes:
        cursor.execute(f"ALTER INDEX {name}_new RENAME TO {name}")
    for constraint in constraints:
        name = constraint.split()[1]
        if name.endswith("_new"):
            cursor.execute(f"ALTER INDEX {name} RENAME TO {name.removesuffix('_new')}")


def partition(apps, schema_editor) -> None:
    if schema_editor.connection.vendor != "postgresql":
        return
    count = settings.REGISTRY_PARTITIONS
    if count < 1:
        raise ValueError(f"REGISTRY_PARTITIONS must be at least 1, got {count}")
    connection = schema_editor.connection
    with transaction.atomic(using=connection.alias), connection.cursor() as cursor:
        if _is_partitioned(cursor):
            return
        _copy_into_new(
            cursor,
            f"CREATE TABLE {NEW} (LIKE {DEVICES} INCLUDING DEFAULTS INCLUDING IDENTITY) "
            "PARTITION BY HASH (app_id, device_id)",
            [
                # 15 % free per page: a re-registration rewrites only unindexed columns and stays
                # a HOT update (tokens 0004).
                f"CREATE TABLE {DEVICES}_p{r} PARTITION OF {NEW} "
                f"FOR VALUES WITH (MODULUS {count}, REMAINDER {r}) WITH (fillfactor = 85)"
                for r in range(count)
            ],
        )
        # Lookups by id alone (admin, invalidation) probe every partition's id index.
        indexes = {**_INDEXES, f"{DEVICES}_id_idx": "(id)"}
        _swap(cursor, indexes, [f"CONSTRAINT {NEW}_pkey PRIMARY KEY (app_id, device_id)"])
        cursor.execute(
            f"CREATE TABLE {CLAIMS} (app_id bigint NOT NULL, platform varchar(16) NOT NULL, "
            "token_hash varchar(64) NOT NULL, device_id uuid NOT NULL) "
            "PARTITION BY HASH (app_id, token_hash)"
        )
        for r in range(count):
            cursor.execute(
                f"CREATE TABLE {CLAIMS}_p{r} PARTITION OF {CLAIMS} "
                f"FOR VALUES WITH (MODULUS {count}, REMAINDER {r})"
            )
        cursor.execute(
            f"INSERT INTO {CLAIMS} SELECT app_id, platform, token_hash, device_id FROM {DEVICES}"
        )
        cursor.execute(
            f"ALTER TABLE {CLAIMS} ADD CONSTRAINT {CLAIMS}_pkey PRIMARY KEY (app_id, platform, token_hash)"
        )
        cursor.execute(f"ANALYZE {CLAIMS}")
        cursor.execute(_CLAIM_TRIGGERS)
    _vacuum(connection, DEVICES, CLAIMS)


def unpartition(apps, schema_editor) -> None:
    if schema_editor.connection.vendor != "postgresql":
        return
    connection = schema_editor.connection
    with transaction.atomic(using=connection.alias), connection.cursor() as cursor:
        if not _is_partitioned(cursor):
            return
        _copy_into_new(
            cursor,
            f"CREATE TABLE {NEW} (LIKE {DEVICES} INCLUDING DEFAULTS INCLUDING IDENTITY) "
            "WITH (fillfactor = 85)",
            [],
        )
        cursor.execute(_DROP_CLAIMS)
        _swap(
            cursor,
            _INDEXES,
            [
                f"CONSTRAINT {NEW}_pkey PRIMARY KEY (id)",
                "CONSTRAINT uniq_device_per_app_new UNIQUE (app_id, device_id)",
                "CONSTRAINT uniq_token_per_app_platform_new UNIQUE (app_id, platform, token_hash)",
            ],
        )
    _vacuum(connection, DEVICES)


def _vacuum(connection, *tables: str) -> None:
    if connection.in_atomic_block:
        return  # a caller's transaction (a test's); autovacuum comes by later
    with connection.cursor() as cursor:
        for table in tables:
            cursor.execute(f"VACUUM (ANALYZE) {table}")


class Migration(migrations.Migration):
    atomic = False  # the copy is one transaction of its own; VACUUM cannot run inside one

    dependencies = [
        ("tokens", "0006_signed_webhooks"),
    ]

    operations = [migrations.RunPython(partition, unpartition)]
