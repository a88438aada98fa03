"""tests/conftest.py's flush after transactional tests: DELETE while the tables are small, one TRUNCATE
when one is big, and either keeps the token claims (the device table's triggers) equal to the devices."""

from __future__ import annotations

import uuid

import pytest
from django.core.management.color import no_style
from django.db import connection

from tests import conftest
from tokens.models import App, DeviceToken

pytestmark = pytest.mark.django_db


def _tables() -> list[str]:
    return connection.introspection.django_table_names(only_existing=True, include_views=False)


def test_the_only_triggers_keep_the_token_claims():
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.relname, t.tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE NOT t.tgisinternal AND t.tgparentid = 0 AND n.nspname = current_schema()"
        )
        triggers = cursor.fetchall()
    assert {table for table, _ in triggers} == {DeviceToken._meta.db_table}
    assert {name for _, name in triggers} == {
        "tokens_claims_insert",
        "tokens_claims_delete",
        "tokens_claims_update",
        "tokens_claims_truncate",
    }


def _claims() -> int:
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM {DeviceToken.CLAIMS_TABLE}")
        return cursor.fetchone()[0]


@pytest.mark.parametrize("big", [False, True], ids=["delete", "truncate"])
def test_either_flush_empties_the_claims_with_the_devices(monkeypatch, big):
    app = App.objects.create(slug="flush-claims", name="flush-claims")
    DeviceToken.objects.create(app=app, device_id=uuid.uuid4(), platform="ios", token="ab" * 32)
    assert _claims() == 1
    if big:
        monkeypatch.setattr(conftest, "FLUSH_TRUNCATE_BYTES", 0)
    sql = connection.ops.sql_flush(no_style(), _tables())
    assert sql[0].startswith("TRUNCATE ") == big
    with connection.cursor() as cursor:
        # The insert's deferred foreign-key check would stand in TRUNCATE's way inside this test's
        # transaction; a real flush comes after the test's commits.
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
    connection.ops.execute_sql_flush(sql)
    assert not DeviceToken.objects.exists() and _claims() == 0


def test_small_tables_are_emptied_with_delete():
    App.objects.create(slug="flush-small", name="flush-small")
    sql = connection.ops.sql_flush(no_style(), _tables())
    assert sql[0] == "SET CONSTRAINTS ALL DEFERRED;"
    assert all(statement.startswith("DELETE FROM ") for statement in sql[1:])
    assert len(sql) - 1 == len(set(_tables()) - conftest.REBUILT_AFTER_FLUSH)


def test_a_big_table_makes_it_one_truncate_of_all_but_the_kept_tables(monkeypatch):
    App.objects.create(slug="flush-big", name="flush-big")  # a page of its own: "big" below
    monkeypatch.setattr(conftest, "FLUSH_TRUNCATE_BYTES", 0)
    assert App._meta.db_table in conftest._big_tables(connection, _tables())
    sql = connection.ops.sql_flush(no_style(), _tables())
    assert len(sql) == 1 and sql[0].startswith("TRUNCATE ")
    for table in _tables():
        assert (connection.ops.quote_name(table) in sql[0]) == (table not in conftest.REBUILT_AFTER_FLUSH)
    # PostgreSQL takes it (every referencing table is in it); the test's transaction rolls it back.
    connection.ops.execute_sql_flush(sql)
    assert not App.objects.exists()
