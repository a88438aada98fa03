"""Counters kept as rows and added to in bulk: one upsert per shard run, never per device."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from django.db import connection


def add_counts(table: str, keys: Sequence[str], rows: Iterable[tuple]) -> None:
    """`INSERT ... ON CONFLICT (keys) DO UPDATE SET count = count + EXCLUDED.count` for rows of
    (*keys, count). Rows go in key order: two shard runs adding to the same rows in different
    orders could deadlock each other."""
    ordered = sorted(rows)
    if not ordered:
        return
    columns = ", ".join((*keys, "count"))
    placeholders = ", ".join(["(" + ", ".join(["%s"] * (len(keys) + 1)) + ")"] * len(ordered))
    sql = (
        f"INSERT INTO {table} ({columns}) VALUES {placeholders} "
        f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET count = {table}.count + EXCLUDED.count"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [value for row in ordered for value in row])
