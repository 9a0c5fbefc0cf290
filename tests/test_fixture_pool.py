"""The pool of parsed in-memory connections behind ``TaskStore.open(":memory:")``.

Every new memory store must look exactly like a brand-new one, whatever the store that
used the connection before it did: wrote through the API or behind it, failed mid-write,
left a transaction open, changed the schema, ran sync, or was never closed.
"""

from __future__ import annotations

import json
import textwrap
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clinik_local import (
    NotFoundError,
    ReferenceServer,
    StorageError,
    SyncConfig,
    TaskStore,
    ValidationError,
)
from clinik_local.storage import database
from clinik_local.storage.connection import MEMORY, ConnectionOptions, open_connection

pytest_plugins = ["pytester"]

REQUEST = {"status": "requested", "intent": "order", "patientId": "pt_1", "note": "NPO"}


def first_look(store: TaskStore) -> dict[str, Any]:
    """Everything a test could see first on its store."""
    with store.read() as conn:
        meta = conn.execute("SELECT key FROM meta ORDER BY key").fetchall()
        schema = conn.execute("SELECT type, name, sql FROM sqlite_schema ORDER BY name").fetchall()
        pragmas = [conn.pragma(p) for p in ("foreign_keys", "query_only", "user_version")]
    try:
        store.tasks.get("task_missing")
        missing = "found"
    except NotFoundError:
        missing = "not found"
    return {
        "counts": store.table_counts(),
        "meta": meta,
        "schema": schema,
        "pragmas": pragmas,
        "search": store.tasks.search(text="NPO").data,
        "count": store.tasks.count().data,
        "missing": missing,
        "sync": store.tasks.search(limit=1).meta,
    }


def brand_new() -> dict[str, Any]:
    """A store built from the image by a connection the pool never saw."""
    conn = open_connection(
        MEMORY,
        "writer",
        ConnectionOptions(),
        image=database._memory_template(ConnectionOptions()),
    )
    store = TaskStore.open(":memory:")
    real, store._db._conn = store._db._conn, conn
    try:
        return first_look(store)
    finally:
        store._db._conn = real
        conn.close()
        store.close()


def test_a_closed_memory_store_gives_its_connection_to_the_next_one() -> None:
    store = TaskStore.open(":memory:")
    conn = store._db._conn
    store.tasks.create(REQUEST)
    store.close()
    again = TaskStore.open(":memory:")
    try:
        assert again._db._conn is conn
        assert first_look(again) == brand_new()
    finally:
        again.close()


def test_a_closed_store_stays_closed_after_its_connection_serves_another() -> None:
    store = TaskStore.open(":memory:")
    store.close()
    other = TaskStore.open(":memory:")
    try:
        with pytest.raises(StorageError, match="closed"):
            store.tasks.create(REQUEST)
        with pytest.raises(StorageError, match="closed"):
            store.tasks.count()
        assert other.tasks.count().data == 0
    finally:
        other.close()


def test_every_table_written_behind_the_api_is_empty_again() -> None:
    """Fails when a table added to schema.sql is not reset (tables come from sqlite_schema)."""
    store = TaskStore.open(":memory:")
    store.tasks.create(REQUEST)
    with store._db.write() as conn:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT name FROM sqlite_schema WHERE type = 'table' AND sql NOT LIKE "
                "'CREATE VIRTUAL%' AND name NOT LIKE 'sqlite_%' AND name NOT LIKE 'task_text_%'"
            ).fetchall()
        ]
        for table in tables:
            columns = conn.execute(f'PRAGMA table_info("{table}")').fetchall()
            values: list[object] = []
            for _cid, name, kind, _notnull, _default, _pk in columns:
                if name == "op":
                    values.append("create")
                elif name == "state":
                    values.append("pending")
                elif name == "kind":
                    values.append("basedOn")
                elif name in ("body", "payload", "local_body", "server_body"):
                    values.append('{"raw_json": "raw_x"}')
                elif name == "direction":
                    values.append("input")
                elif name == "origin":
                    values.append("server")
                elif "INT" in str(kind).upper():
                    values.append(987_654)
                else:
                    values.append(f"raw_{table}_{name}")
            marks = ", ".join("?" * len(values))
            conn.execute(f'INSERT INTO "{table}" VALUES ({marks})', values)
        conn.execute("UPDATE meta SET value = 'changed' WHERE key = 'created_at'")
    store.close()
    again = TaskStore.open(":memory:")
    try:
        assert first_look(again) == brand_new()
        with again.read() as conn:
            for table in tables:
                leftovers = conn.execute(f'SELECT * FROM "{table}"').fetchall()
                assert all("raw_" not in json.dumps(row, default=str) for row in leftovers), table
    finally:
        again.close()


def test_a_connection_whose_schema_changed_is_not_reused() -> None:
    store = TaskStore.open(":memory:")
    conn = store._db._conn
    store.tasks.create(REQUEST)
    with store._db.write() as c:
        c.execute("ANALYZE")  # creates sqlite_stat1: the plans of a new store would differ
    store.close()
    again = TaskStore.open(":memory:")
    try:
        assert again._db._conn is not conn
        assert first_look(again) == brand_new()
    finally:
        again.close()


def test_a_store_that_failed_mid_write_hands_on_a_clean_connection() -> None:
    store = TaskStore.open(":memory:")

    def fail_mid_write() -> None:
        with store._db.write() as conn:
            conn.execute("INSERT INTO meta(key, value) VALUES ('half', 'written')")
            raise RuntimeError("the test failed here")

    with pytest.raises(RuntimeError):
        fail_mid_write()
    with pytest.raises(ValidationError):
        store.tasks.create({"status": "nope", "intent": "order"})
    store._db._conn.execute("BEGIN")  # a transaction left open behind the API
    store._db._conn.execute("INSERT INTO meta(key, value) VALUES ('open', 'txn')")
    store.close()
    again = TaskStore.open(":memory:")
    try:
        assert first_look(again) == brand_new()
    finally:
        again.close()


def test_two_stores_open_at_once_never_share_a_connection() -> None:
    first = TaskStore.open(":memory:")
    second = TaskStore.open(":memory:")
    try:
        assert first._db._conn is not second._db._conn
        first.tasks.create(REQUEST)
        assert second.tasks.count().data == 0
    finally:
        first.close()
        second.close()


def test_ids_versions_and_outbox_sequence_start_as_in_a_new_store() -> None:
    store = TaskStore.open(":memory:")
    for _ in range(3):
        store.tasks.create(REQUEST)
    store.close()
    again = TaskStore.open(":memory:")
    try:
        task = again.tasks.create(REQUEST).data
        assert task.version_id == "1"
        with again.read() as conn:
            assert conn.execute("SELECT seq FROM outbox").fetchall() == [(1,)]
            assert conn.execute("SELECT seq FROM tasks").fetchall() == [(1,)]
    finally:
        again.close()


Step = tuple[str, int]
steps = st.lists(
    st.tuples(
        st.sampled_from(["create", "update", "delete", "fail", "raw", "none"]), st.integers(0, 3)
    ),
    max_size=6,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tests=st.lists(st.tuples(steps, st.booleans(), st.booleans()), min_size=1, max_size=5))
def test_each_test_first_sees_a_brand_new_store(
    tests: list[tuple[list[Step], bool, bool]],
) -> None:
    """A sequence of 'tests', each doing writes, failures, a second store, maybe no close."""
    fresh = brand_new()
    for actions, second_store, close in tests:
        store = TaskStore.open(":memory:")
        assert first_look(store) == fresh
        other = TaskStore.open(":memory:") if second_store else None
        ids: list[str] = []
        for action, n in actions:
            if action == "create":
                ids.append(store.tasks.create({**REQUEST, "priority": "routine"}).data.id or "")
            elif action == "update" and ids:
                store.tasks.update(ids[n % len(ids)], {"note": f"edit {n}"})
            elif action == "delete" and ids:
                store.tasks.delete(ids.pop(n % len(ids)))
            elif action == "fail":
                with pytest.raises(ValidationError):
                    store.tasks.create({**REQUEST, "status": "bogus"})
            elif action == "raw":
                with store._db.write() as conn:
                    conn.execute("INSERT OR REPLACE INTO meta VALUES ('k', ?)", (str(n),))
        if other is not None:
            other.tasks.create(REQUEST)
            other.close()
        if close:
            store.close()


def test_a_store_that_synced_hands_on_a_clean_connection() -> None:
    with ReferenceServer(token="t") as server:
        store = TaskStore.open(
            ":memory:", sync=SyncConfig(base_url=server.url, token_provider=lambda: "t")
        )
        store.tasks.create(REQUEST)
        assert store.sync.flush(timeout=20)
        store.close()
    again = TaskStore.open(":memory:")
    try:
        assert first_look(again) == brand_new()
    finally:
        again.close()


def test_task_store_fixture_is_isolated_in_a_real_pytest_session(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        textwrap.dedent(
            """
            import pytest

            @pytest.mark.parametrize("n", range(40))
            def test_one(task_store, n):
                assert task_store.tasks.count().data == 0
                assert task_store.table_counts()["outbox"] == 0
                task_store.tasks.create({"status": "requested", "intent": "order"})
                if n % 7 == 3:
                    raise AssertionError("a failing test")
                if n % 5 == 1:
                    task_store.close()

            def test_file_fixture(task_store_file):
                assert task_store_file.path.endswith("tasks.db")
                assert task_store_file.tasks.count().data == 0
            """
        )
    )
    result = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=35, failed=6)
