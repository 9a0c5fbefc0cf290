"""The pool of parsed in-memory connections behind ``TaskStore.open(":memory:")``.

Every new memory store must look exactly like a brand-new one, whatever the store that
used the connection before it did: wrote through the API or behind it, failed mid-write,
closed itself inside a write, lent its connection out (``store.read()``) and left a
TEMP table, a pragma or a function on it, ran two-way sync, or was never closed.
"""

from __future__ import annotations

import contextlib
import gc
import os
import textwrap
import time
import weakref
from collections.abc import Iterator
from typing import Any

import apsw
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from clinik_local import (
    NotFoundError,
    ReferenceServer,
    StorageError,
    SyncConfig,
    TaskStore,
    ValidationError,
)
from clinik_local import timestamps as ts
from clinik_local.storage import connection, database
from clinik_local.storage.connection import ConnectionOptions

pytest_plugins = ["pytester"]

REQUEST = {"status": "requested", "intent": "order", "patientId": "pt_1", "note": "NPO"}

#: Connection-level settings a test could observe (read one by one: every one of them).
PRAGMAS = (
    "schema_version", "user_version", "application_id", "page_count", "page_size",
    "freelist_count", "foreign_keys", "query_only", "recursive_triggers",
    "defer_foreign_keys", "automatic_index", "cache_size", "busy_timeout",
    "trusted_schema", "cell_size_check", "reverse_unordered_selects",
    "ignore_check_constraints", "legacy_alter_table", "temp_store", "cache_spill",
    "secure_delete", "journal_mode", "synchronous", "locking_mode", "analysis_limit",
    "writable_schema", "auto_vacuum", "max_page_count", "journal_size_limit",
    "count_changes", "full_column_names", "short_column_names", "empty_result_callbacks",
    "read_uncommitted", "encoding",
)  # fmt: skip
DBCONFIG = tuple(
    getattr(apsw, name)
    for name in dir(apsw)
    if name.startswith("SQLITE_DBCONFIG_")
    and name not in ("SQLITE_DBCONFIG_LOOKASIDE", "SQLITE_DBCONFIG_MAINDBNAME")
    and name != "SQLITE_DBCONFIG_STMT_SCANSTATUS"  # (apsw cannot read it)
)
PLANS = (
    "SELECT body FROM tasks WHERE patient_id = ? ORDER BY authored_on DESC, id DESC LIMIT 5",
    "SELECT rowid FROM task_text WHERE task_text MATCH 'npo'",
    "SELECT seq FROM outbox WHERE state = 'pending' ORDER BY seq",
)


def dump(store: TaskStore, opened_after: str) -> dict[str, Any]:
    """Everything a test could see first on its store: every row of every table (shadow
    tables and sqlite_sequence included), the temp schema, functions, collations,
    modules, pragmas, database config, query plans, and what the API answers.

    ``meta.created_at`` is the store's own (made at open): checked to be no older than
    ``opened_after`` and then blanked, so stores opened at different instants compare.
    """
    with store._db.read() as conn:  # the library's own read: the connection stays pooled
        tables = [
            str(name)
            for (name,) in conn.execute(
                "SELECT name FROM sqlite_schema WHERE type = 'table' AND sql NOT LIKE "
                "'CREATE VIRTUAL%' ORDER BY name"
            ).fetchall()
        ]
        rows = {t: conn.execute(f'SELECT * FROM "{t}"').fetchall() for t in tables}
        meta = {str(key): str(value) for key, value in rows["meta"]}
        assert str(meta.pop("created_at")) >= opened_after
        rows["meta"] = sorted(meta.items())
        state = {
            "rows": rows,
            "schema": conn.execute("SELECT * FROM sqlite_schema ORDER BY name").fetchall(),
            "temp": conn.execute("SELECT * FROM temp.sqlite_schema").fetchall(),
            "functions": conn.execute(
                "SELECT name, builtin, type, narg, flags FROM pragma_function_list ORDER BY 1, 4"
            ).fetchall(),
            "collations": sorted(conn.execute("PRAGMA collation_list").fetchall()),
            "modules": sorted(conn.execute("PRAGMA module_list").fetchall()),
            "pragmas": [conn.pragma(p) for p in PRAGMAS],
            "dbconfig": [conn.config(op, -1) for op in DBCONFIG],
            # (the pool's own PRAGMA watch, which allows everything, is not a user's hook)
            "hooks": (conn.exec_trace, conn.row_trace, _user_authorizer(conn)),
            "plans": [
                conn.execute(
                    f"EXPLAIN QUERY PLAN {sql}", ("pt_1",) if "?" in sql else ()
                ).fetchall()
                for sql in PLANS
            ],
        }
    try:
        store.tasks.get("task_missing")
        missing = "found"
    except NotFoundError:
        missing = "not found"
    with pytest.raises(ValidationError) as refused:
        store.tasks.create({"status": "bogus", "intent": "order"})
    state["api"] = {
        "count": store.tasks.count().data,
        "search": store.tasks.search(text="NPO").data,
        "missing": missing,
        "refused": (refused.value.paths, str(refused.value)),
        "counts": store.table_counts(),
        "integrity": store.integrity_check(),
    }
    return state


@contextlib.contextmanager
def fresh_pool(monkeypatch: pytest.MonkeyPatch) -> Iterator[database._MemoryPool]:
    """A pool of its own (a new template from schema.sql): its first store is brand-new."""
    pool = database._MemoryPool()
    with monkeypatch.context() as patch:
        patch.setattr(database, "_POOL", pool)
        yield pool


def brand_new(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The first look at a brand-new store: from a new pool, on a never-used connection."""
    with fresh_pool(monkeypatch):
        before = ts.now()
        store = TaskStore.open(":memory:")
        try:
            return dump(store, before)
        finally:
            store.close()


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    return brand_new(monkeypatch)


def _leaked(*_args: apsw.SQLiteValue) -> int:
    return 1


def opened() -> tuple[TaskStore, str]:
    before = ts.now()
    return TaskStore.open(":memory:"), before


@contextlib.contextmanager
def next_store(
    fresh: dict[str, Any],
    *,
    reuses: apsw.Connection | None = None,
    avoids: apsw.Connection | None = None,
    note: str = "",
) -> Iterator[TaskStore]:
    """The next memory store, checked to look exactly like a brand-new one (and to be
    on the connection ``reuses``, or on another than ``avoids``); closed after."""
    again, before = opened()
    try:
        if reuses is not None:
            assert again._db._conn is reuses, note
        if avoids is not None:
            assert again._db._conn is not avoids, note
        assert dump(again, before) == fresh, note
        yield again
    finally:
        again.close()


def assert_next_store_is_fresh(
    fresh: dict[str, Any],
    *,
    reuses: apsw.Connection | None = None,
    avoids: apsw.Connection | None = None,
    note: str = "",
) -> None:
    """:func:`next_store`'s checks, and nothing more."""
    with next_store(fresh, reuses=reuses, avoids=avoids, note=note):
        pass


def test_a_pooled_stores_first_look_is_an_unpooled_stores(
    fresh: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The baseline itself: inside its pool transaction a store looks like one without."""
    with fresh_pool(monkeypatch) as pool:
        monkeypatch.setattr(pool.template(ConnectionOptions()), "poolable", False)
        pool._idle.clear()
        before = ts.now()
        with TaskStore.open(":memory:") as plain:
            assert plain._db._conn.get_autocommit()
            assert dump(plain, before) == fresh


def test_a_closed_store_gives_its_connection_to_the_next_one_byte_for_byte_reset(
    fresh: dict[str, Any],
) -> None:
    store = TaskStore.open(":memory:")
    conn = store._db._conn
    store.tasks.create(REQUEST)
    store.tasks.create_many([REQUEST] * 3)
    store.close()
    # The rollback puts back every page of the image: the connection is the image again.
    assert bytes(conn.serialize("main")) == database._POOL.template(store._db.options).image
    assert_next_store_is_fresh(fresh, reuses=conn)


def test_a_closed_store_stays_closed_after_its_connection_serves_another() -> None:
    store = TaskStore.open(":memory:")
    store.close()
    other = TaskStore.open(":memory:")
    try:
        assert other._db._conn is store._db._conn
        with pytest.raises(StorageError, match="closed"):
            store.tasks.create(REQUEST)
        with pytest.raises(StorageError, match="closed"):
            store.tasks.count()
        with pytest.raises(StorageError, match="closed"), store.read():
            pass
        assert other.tasks.count().data == 0
    finally:
        other.close()


def test_every_table_written_behind_the_api_is_empty_again(fresh: dict[str, Any]) -> None:
    """Tables come from sqlite_schema: one added to schema.sql is reset with no change."""
    store = TaskStore.open(":memory:")
    store.tasks.create(REQUEST)
    with store._db.write() as conn:
        for (table,) in conn.execute(
            "SELECT name FROM sqlite_schema WHERE type = 'table' AND sql NOT LIKE "
            "'CREATE VIRTUAL%' AND name NOT LIKE 'sqlite_%' AND name NOT LIKE 'task_text_%'"
        ).fetchall():
            columns = conn.execute(f'PRAGMA table_info("{table}")').fetchall()
            values = [_raw_value(str(table), str(c[1]), str(c[2])) for c in columns]
            marks = ", ".join("?" * len(values))
            conn.execute(f'INSERT OR REPLACE INTO "{table}" VALUES ({marks})', values)
        conn.execute("UPDATE meta SET value = 'changed' WHERE key = 'schema_created'")
        conn.execute("INSERT INTO meta VALUES ('sync.cursor', 'c1'), ('lease.owner', 'me')")
    store.close()
    assert_next_store_is_fresh(fresh)


def _raw_value(table: str, name: str, kind: str) -> object:
    fixed = {
        "op": "create",
        "state": "pending",
        "kind": "basedOn",
        "direction": "input",
        "origin": "server",
    }
    if name in fixed:
        return fixed[name]
    if "INT" in kind.upper():
        return 987_654
    if name in ("body", "payload", "local_body", "server_body"):
        return '{"raw": true}'
    return f"raw_{table}_{name}"


def test_ddl_and_statistics_of_a_store_are_rolled_back_with_it(fresh: dict[str, Any]) -> None:
    store = TaskStore.open(":memory:")
    conn = store._db._conn
    store.tasks.create(REQUEST)
    with store._db.write() as c:
        c.execute("ANALYZE")  # sqlite_stat1: the plans of a new store would differ
        c.execute("CREATE TABLE scratch(x)")
        c.execute("CREATE TEMP TABLE scratch_temp(x)")
    store.optimize()
    store.close()
    assert_next_store_is_fresh(fresh, reuses=conn)


def test_a_write_that_fails_midway_is_undone_and_the_next_store_is_clean(
    fresh: dict[str, Any],
) -> None:
    store = TaskStore.open(":memory:")
    kept = store.tasks.create(REQUEST).data

    def fail_mid_write() -> None:
        with store._db.write() as conn:
            conn.execute("INSERT INTO meta(key, value) VALUES ('half', 'written')")
            conn.execute("DELETE FROM tasks")
            raise RuntimeError("the test failed here")

    with pytest.raises(RuntimeError):
        fail_mid_write()
    with pytest.raises(ValidationError):
        store.tasks.create({"status": "nope", "intent": "order"})
    assert [t.id for t in store.tasks.search().data] == [kept.id]  # as a real store: undone
    with store._db.read() as conn:
        assert "half" not in {row[0] for row in conn.execute("SELECT * FROM meta")}
    store.close()
    assert_next_store_is_fresh(fresh)


def test_a_write_inside_a_write_is_refused_as_by_a_file_store(tmp_path: Any) -> None:
    errors = []
    for store in (TaskStore.open(":memory:"), TaskStore.open(tmp_path / "t.db")):
        with store:
            with pytest.raises(StorageError) as info, store._db.write(), store._db.write():
                pass
            errors.append(str(info.value).split(" (")[0])
            assert store.tasks.count().data == 0
            store.tasks.create(REQUEST)  # the store still writes afterwards
    assert errors[0] == errors[1] == "cannot start a transaction within a transaction"


def test_a_store_closed_inside_its_own_write_block_never_hands_on_its_connection(
    fresh: dict[str, Any],
) -> None:
    store = TaskStore.open(":memory:")
    conn = store._db._conn

    def close_inside_a_write() -> None:
        with store._db.write() as c:
            c.execute("INSERT INTO meta VALUES ('inside', 'write')")
            store.close()

    with pytest.raises(StorageError):
        close_inside_a_write()
    assert store.closed
    assert_next_store_is_fresh(fresh, avoids=conn)


def test_a_lent_connection_behaves_as_an_unpooled_one_and_is_never_reused(
    fresh: dict[str, Any],
) -> None:
    store = TaskStore.open(":memory:")
    conn = store._db._conn
    store.tasks.create(REQUEST)
    with store.read() as lent:
        assert lent.get_autocommit()  # as in any store: no transaction open outside writes
        lent.execute("BEGIN; CREATE TEMP TABLE seen(x); INSERT INTO seen VALUES (1); COMMIT")
        lent.execute("PRAGMA recursive_triggers = ON")
        lent.create_scalar_function("leaked", _leaked)
        lent.exec_trace = lambda *_: True
    assert store.tasks.count().data == 1  # the store goes on as before
    store.tasks.create(REQUEST)
    store.close()
    assert_next_store_is_fresh(fresh, avoids=conn)


def _user_authorizer(conn: apsw.Connection) -> object:
    found = conn.authorizer
    return None if isinstance(found, database._PragmaWatch) else found


def test_a_connection_with_hooks_or_pragmas_set_behind_the_api_is_closed(
    fresh: dict[str, Any],
) -> None:
    changes = (
        "trace",
        "pragma",
        "authorizer",
        "foreign keys",
        "committed",
        "committed and begun again",
    )
    for change in changes:
        store = TaskStore.open(":memory:")
        conn = store._db._conn
        if change == "trace":
            conn.exec_trace = lambda *_: True
        elif change == "pragma":
            conn.execute("PRAGMA recursive_triggers = ON")
        elif change == "authorizer":  # (the pool's own watch replaced: it cannot see)
            conn.authorizer = lambda *_: apsw.SQLITE_OK
        elif change == "foreign keys":  # (no PRAGMA can: it is a no-op in a transaction)
            conn.config(apsw.SQLITE_DBCONFIG_ENABLE_FKEY, 0)
        elif change == "committed":
            conn.execute("COMMIT")  # the store's transaction ended behind its back
            conn.execute("INSERT INTO meta VALUES ('committed', 'x')")
        else:  # ... and a new one looks like it: only the commit itself tells
            conn.execute("COMMIT; INSERT INTO meta VALUES ('committed', 'x'); BEGIN")
        store.close()
        assert_next_store_is_fresh(fresh, avoids=conn, note=change)


@pytest.mark.parametrize(
    "pragma",
    [
        "ignore_check_constraints = ON",  # a new store would then accept any status
        "case_sensitive_like = ON",  # (no PRAGMA reads it back)
        "reverse_unordered_selects = ON",
        "cache_size = 7",
        "main.cell_size_check(1)",
        "query_only = 1",
    ],
)
def test_a_connection_whose_settings_a_pragma_changed_is_never_pooled_again(
    fresh: dict[str, Any], pragma: str
) -> None:
    store = TaskStore.open(":memory:")
    conn = store._db._conn
    conn.execute(f"PRAGMA {pragma}")
    store.close()
    with next_store(fresh, avoids=conn) as again:
        with again._db.write() as c, pytest.raises(apsw.ConstraintError):
            c.execute(
                "INSERT INTO task_history (task_id, version, op, body, changed_at) "
                "VALUES ('t', 1, 'bogus', NULL, '2026-01-01T00:00:00.000Z')"
            )
        with again._db.read() as c:
            assert c.execute("SELECT 'a' LIKE 'A'").fetchall() == [(1,)]


def test_reading_a_pragma_or_running_the_stores_own_leaves_the_connection_pooled(
    fresh: dict[str, Any],
) -> None:
    store = TaskStore.open(":memory:")
    conn = store._db._conn
    store.tasks.create(REQUEST)
    assert store.integrity_check() == []
    assert store.schema_version() > 0
    store.optimize()
    with store._db.read() as c:
        c.execute("PRAGMA ignore_check_constraints").fetchall()
        c.execute("PRAGMA query_only").fetchall()
    store.close()
    assert_next_store_is_fresh(fresh, reuses=conn)


def _shadow_after_each_step(store: TaskStore) -> list[Any]:
    def look() -> Any:
        with store._db.read() as conn:
            names = conn.execute(
                "SELECT name FROM sqlite_schema WHERE type = 'table' AND name LIKE 'task_text_%'"
            ).fetchall()
            rows = {n: conn.execute(f'SELECT * FROM "{n}"').fetchall() for (n,) in names}
        return rows, store.table_counts()

    steps = []
    store.tasks.create({**REQUEST, "id": "a", "note": "alpha beta"})
    steps.append(look())
    with pytest.raises(ValidationError):
        store.tasks.update("a", {"status": None})
    steps.append(look())
    store.tasks.update("a", {"note": "gamma"})
    steps.append(look())
    store.tasks.create_many([{**REQUEST, "id": f"b{i}", "note": f"n{i}"} for i in range(5)])
    steps.append(look())
    store.tasks.delete("a")
    steps.append(look())
    return steps


def test_a_pooled_stores_tables_after_each_write_are_an_unpooled_stores(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Savepoints instead of commits leave the full-text index's tables as commits do."""
    with fresh_pool(monkeypatch) as pool:
        with TaskStore.open(":memory:") as pooled:
            assert not pooled._db._conn.get_autocommit()
            in_pool = _shadow_after_each_step(pooled)
        monkeypatch.setattr(pool.template(ConnectionOptions()), "poolable", False)
        with TaskStore.open(":memory:") as plain:
            assert plain._db._conn.get_autocommit()
            assert _shadow_after_each_step(plain) == in_pool


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


def test_at_most_max_idle_connections_wait_in_the_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    with fresh_pool(monkeypatch) as pool:
        stores = [TaskStore.open(":memory:") for _ in range(pool.MAX_IDLE + 3)]
        for store in stores:
            store.close()
        assert pool.idle_count() == pool.MAX_IDLE


def test_a_schema_with_deferred_foreign_keys_gets_a_fresh_copy_per_store(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A savepoint's RELEASE never checks a deferred key: such a schema is not pooled."""
    with fresh_pool(monkeypatch) as pool:
        template = pool.template(ConnectionOptions())
        monkeypatch.setattr(template, "poolable", False)
        pool._idle.clear()
        first = TaskStore.open(":memory:")
        conn = first._db._conn
        assert conn.get_autocommit()  # an ordinary store: no pool transaction
        first.tasks.create(REQUEST)
        first.close()
        second = TaskStore.open(":memory:")
        try:
            assert second._db._conn is not conn
            assert second.tasks.count().data == 0
        finally:
            second.close()
        assert pool.idle_count() == 0


def test_ids_versions_sequences_and_created_at_start_as_in_a_new_store() -> None:
    store = TaskStore.open(":memory:")
    for _ in range(3):
        store.tasks.update(store.tasks.create(REQUEST).data.id or "", {"note": "x"})
    store.close()
    time.sleep(0.002)
    again, before = opened()
    try:
        task = again.tasks.create(REQUEST).data
        assert task.version_id == "1"
        with again._db.read() as conn:
            assert conn.execute("SELECT seq FROM outbox").fetchall() == [(1,)]
            assert conn.execute("SELECT seq FROM tasks").fetchall() == [(1,)]
            assert conn.execute("SELECT version FROM task_history").fetchall() == [(1,)]
            created = conn.execute("SELECT value FROM meta WHERE key = 'created_at'").fetchall()
        assert str(created[0][0]) >= before  # the store's own, not the pool's or the template's
    finally:
        again.close()


def test_a_memory_stores_meta_rows_are_a_new_files_own(tmp_path: Any) -> None:
    """A memory store writes only its created_at at open (the image holds the rest): its
    meta rows are still exactly those of a brand-new file, whose schema install wrote
    them all (the baseline of the other tests is a memory store too, so it cannot tell)."""

    def meta(store: TaskStore) -> dict[str, str]:
        with store._db.read() as conn:
            rows = {str(k): str(v) for k, v in conn.execute("SELECT key, value FROM meta")}
        assert str(rows.pop("created_at")) >= before
        return rows

    for _ in range(2):  # a connection never used, then a pooled one
        before = ts.now()
        with (
            TaskStore.open(tmp_path / f"new{_}.db") as on_file,
            TaskStore.open(":memory:") as memory,
        ):
            assert meta(memory) == meta(on_file)
            memory.tasks.create(REQUEST)


def test_memory_stores_use_small_pages_and_answer_as_a_file_store_does(tmp_path: Any) -> None:
    """Memory stores have 1 KiB pages (less to journal and roll back per test), files
    SQLite's 4 KiB; a task far larger than a page (overflow chains) reads back, and is
    found, the same in both."""
    long_text = " ".join(f"word{i}" for i in range(1500))  # about 12 KB
    request = {**REQUEST, "description": long_text, "note": long_text}
    with TaskStore.open(tmp_path / "f.db") as on_file, TaskStore.open(":memory:") as memory:
        for store, size in [(memory, connection.MEMORY_PAGE_SIZE), (on_file, 4096)]:
            with store._db.read() as conn:
                assert conn.pragma("page_size") == size
        assert connection.MEMORY_PAGE_SIZE == 1024
        made = [store.tasks.create(request).data for store in (memory, on_file)]
        for store, task in zip((memory, on_file), made, strict=True):
            assert store.tasks.get(str(task.id)).data == task
            assert store.tasks.search(text="word1499").data == [task]
        assert made[0].description == made[1].description == long_text


def test_a_closed_store_without_sync_is_freed_without_the_cyclic_gc() -> None:
    """A test's store holds no reference cycle: closed and dropped, it is gone at once,
    so a session of such tests adds nothing to the garbage collector's work."""
    gc.collect()
    gc.disable()
    try:
        store = TaskStore.open(":memory:")
        store.tasks.create(REQUEST)
        store.tasks.search(patientId="pt_1")
        store.close()
        refs: list[weakref.ref[object]] = [
            weakref.ref(store),
            weakref.ref(store._db),
            weakref.ref(store.tasks),
        ]
        del store
        assert [ref() for ref in refs] == [None, None, None]
    finally:
        gc.enable()


def test_a_store_that_synced_both_ways_hands_on_a_clean_connection(
    fresh: dict[str, Any],
) -> None:
    with ReferenceServer(token="t") as server:
        server.put_task({**REQUEST, "id": "task_server_1"})
        store = TaskStore.open(
            ":memory:", sync=SyncConfig(base_url=server.url, token_provider=lambda: "t")
        )
        store.tasks.create(REQUEST)
        assert store.sync.flush(timeout=20)
        store.sync.pull()
        assert store.tasks.get("task_server_1").data.id == "task_server_1"
        with store._db.read() as conn:
            assert conn.execute("SELECT count(*) FROM sync_bases").fetchall() != [(0,)]
            assert conn.execute("SELECT count(*) FROM meta WHERE key LIKE 'sync.%'").fetchall()
        store.close()
    assert_next_store_is_fresh(fresh)


def test_a_forked_child_never_uses_its_parents_pooled_connections() -> None:
    parent = TaskStore.open(":memory:")
    parent.close()  # one connection idle in the parent's pool
    idle = {id(p.conn) for conns in database._POOL._idle.values() for p in conns}
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running any cleanup
        code = 1
        try:
            child = TaskStore.open(":memory:")
            ok = id(child._db._conn) not in idle and child.tasks.count().data == 0
            child.tasks.create(REQUEST)
            child.close()
            code = 0 if ok and database._POOL.idle_count() == 1 else 2
        finally:
            os.write(write, bytes([code]))
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        answer = pipe.read()
    os.waitpid(pid, 0)
    assert answer == bytes([0])
    again = TaskStore.open(":memory:")  # the parent's pool is untouched
    try:
        assert id(again._db._conn) in idle
    finally:
        again.close()


def test_a_store_its_parent_opened_is_left_untouched_when_a_forked_child_closes_it() -> None:
    store = TaskStore.open(":memory:")
    store.tasks.create(REQUEST)  # inside the store's pool transaction
    conn = store._db._conn
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: close the inherited store, report, leave without cleanup
        code = 1
        try:
            store.close()
            untouched = not conn.get_autocommit()  # no rollback ran in the child
            idle = [p.conn for conns in database._POOL._idle.values() for p in conns]
            code = 0 if untouched and all(c is not conn for c in idle) else 2
        finally:
            os.write(write, bytes([code]))
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        answer = pipe.read()
    os.waitpid(pid, 0)
    assert answer == bytes([0])
    assert store.tasks.count().data == 1  # the parent's store is as it was
    store.close()
    again = TaskStore.open(":memory:")  # and goes back to the parent's pool
    try:
        assert again._db._conn is conn
        assert again.tasks.count().data == 0
    finally:
        again.close()


class PoolSequence(RuleBasedStateMachine):
    """Random sequences of 'tests' on pooled stores; each test's first look at its store
    must equal a brand-new store's (the model: one dump, made once)."""

    def __init__(self) -> None:
        super().__init__()
        self.store: TaskStore | None = None
        self.ids: list[str] = []
        #: A lent connection left a transaction open: the store's writes now fail (as
        #: in any store), so the rules that write skip it.
        self.stuck = False

    @initialize()
    def first_test(self) -> None:
        self.start_test(close=True)

    @rule(close=st.booleans())
    def start_test(self, close: bool) -> None:
        """The previous test ends (its store closed, or just dropped), the next begins."""
        if self.store is not None and close:
            self.store.close()
        self.store, before = opened()
        self.ids = []
        self.stuck = False
        assert dump(self.store, before) == FRESH[0]

    def _store(self) -> TaskStore | None:
        """The current test's store, if it can still be written."""
        store = self.store
        return None if store is None or store.closed or self.stuck else store

    @rule(n=st.integers(1, 3))
    def create(self, n: int) -> None:
        store = self._store()
        if store is None:
            return
        created = store.tasks.create_many([REQUEST] * n).data
        self.ids.extend(t.id or "" for t in created)

    @rule(i=st.integers(0, 5), delete=st.booleans())
    def edit(self, i: int, delete: bool) -> None:
        store = self._store()
        if store is None:
            return
        if self.ids:
            task_id = self.ids[i % len(self.ids)]
            if delete:
                store.tasks.delete(task_id)
                self.ids.remove(task_id)
            else:
                store.tasks.update(task_id, {"note": f"edit {i}"})

    @rule()
    def refused(self) -> None:
        store = self._store()
        if store is None:
            return
        with pytest.raises(ValidationError):
            store.tasks.create({**REQUEST, "status": "bogus"})

    @rule(key=st.sampled_from(["sync.cursor", "sync.generation", "lease.owner", "k"]))
    def fail_mid_write(self, key: str) -> None:
        store = self._store()
        if store is None:
            return

        def fail() -> None:
            with store._db.write() as conn:
                conn.execute("INSERT OR REPLACE INTO meta VALUES (?, 'x')", (key,))
                conn.execute("INSERT OR REPLACE INTO sync_bases VALUES ('t', '1', '{}', NULL, 0)")
                raise RuntimeError("the test failed mid-write")

        with pytest.raises(RuntimeError):
            fail()

    @rule(key=st.sampled_from(["sync.cursor", "lease.owner"]))
    def raw_write(self, key: str) -> None:
        store = self._store()
        if store is None:
            return
        with store._db.write() as conn:
            conn.execute("INSERT OR REPLACE INTO meta VALUES (?, 'x')", (key,))
            conn.execute("INSERT OR REPLACE INTO task_sync VALUES ('t', '3', NULL, NULL)")
            conn.execute("INSERT OR REPLACE INTO sync_bases VALUES ('t', '3', '{}', NULL, 1)")

    @rule(what=st.sampled_from(["temp", "pragma", "function", "begin"]))
    def lend(self, what: str) -> None:
        store = self._store()
        if store is None:
            return
        with store.read() as conn:
            if what == "temp":
                conn.execute("CREATE TEMP TABLE IF NOT EXISTS seen(x)")
            elif what == "pragma":
                conn.execute("PRAGMA automatic_index = OFF")
            elif what == "function":
                conn.create_scalar_function("leaked", _leaked)
            else:
                conn.execute("BEGIN")  # left open, as a test may: the store's writes fail
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('open', 'txn')")
                self.stuck = True

    @rule()
    def close_inside_write(self) -> None:
        store = self._store()
        if store is None:
            return
        with pytest.raises(StorageError), store._db.write():
            store.close()

    @rule()
    def second_store(self) -> None:
        with TaskStore.open(":memory:") as other:
            other.tasks.create(REQUEST)

    @rule()
    def sync(self) -> None:
        server = SERVER[0]
        synced = TaskStore.open(
            ":memory:", sync=SyncConfig(base_url=server.url, token_provider=lambda: "t")
        )
        with synced:
            synced.tasks.create(REQUEST)
            assert synced.sync.flush(timeout=20)
            synced.sync.pull()

    @invariant()
    def stores_do_not_leak_into_each_other(self) -> None:
        store = self.store
        if store is not None and not store.closed:
            assert store.tasks.count().data == len(self.ids)

    def teardown(self) -> None:
        if self.store is not None:
            self.store.close()


FRESH: list[dict[str, Any]] = []
SERVER: list[ReferenceServer] = []


def test_each_test_first_sees_a_brand_new_store(monkeypatch: pytest.MonkeyPatch) -> None:
    FRESH[:] = [brand_new(monkeypatch)]
    with ReferenceServer(token="t") as server:
        SERVER[:] = [server]
        try:
            run = PoolSequence.TestCase
            run.settings = settings(
                max_examples=25,
                stateful_step_count=12,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
            )
            run().runTest()
        finally:
            SERVER.clear()


def test_task_store_fixture_is_isolated_in_a_real_pytest_session(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        textwrap.dedent(
            """
            import pytest
            from clinik_local import SyncConfig, TaskStore

            @pytest.mark.parametrize("n", range(40))
            def test_one(task_store, n):
                assert task_store.tasks.count().data == 0
                assert task_store.table_counts()["outbox"] == 0
                task_store.tasks.create({"status": "requested", "intent": "order"})
                if n % 7 == 3:
                    raise AssertionError("a failing test")
                if n % 5 == 1:
                    task_store.close()
                elif n % 6 == 2:
                    with task_store.read() as conn:
                        conn.execute("CREATE TEMP TABLE leak(x)")
                elif n % 8 == 5:
                    with TaskStore.open(":memory:") as other:
                        assert other.tasks.count().data == 0

            def test_with_the_sync_engine(task_store, remote_server):
                config = SyncConfig(base_url=remote_server.url,
                                    token_provider=lambda: remote_server.token)
                with TaskStore.open(":memory:", sync=config) as store:
                    store.tasks.create({"status": "requested", "intent": "order"})
                    assert store.sync.flush(timeout=20)
                assert task_store.tasks.count().data == 0

            def test_file_fixture_is_a_real_file(task_store_file):
                assert task_store_file.path.endswith("tasks.db")
                with task_store_file.read() as conn:
                    assert conn.pragma("journal_mode") == "wal"
                assert task_store_file.tasks.count().data == 0
            """
        )
    )
    result = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=36, failed=6)
