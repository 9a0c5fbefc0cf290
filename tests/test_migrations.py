"""A store file at schema version 1 opens, is migrated to the current version in one
transaction, and loses nothing.

The version-1 file is built by hand from tests/data/schema_v1.sql (the schema.sql of
version 1, as released) with raw apsw: its triggers derive task_refs, task_io and the
version-1 task_text, exactly as a version-1 clinik-local left them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import apsw
import pytest

from clinik_local import TaskStore, encode_task
from clinik_local.codec import decode_task
from clinik_local.demo import generate_requests
from clinik_local.errors import StorageError
from clinik_local.ids import new_change_id, new_task_id
from clinik_local.storage import migrations as migrations_module
from clinik_local.storage import outbox
from clinik_local.storage.migrations import APPLICATION_ID, SCHEMA_VERSION

from .derived import derived_problems

V1_SCHEMA = (Path(__file__).parent / "data" / "schema_v1.sql").read_text(encoding="utf-8")
_RANK = {"stat": 0, "asap": 1, "urgent": 2, "routine": 3, None: 4}
_TASK = (
    "INSERT INTO tasks (id, version, status, intent, priority, priority_rank, code, "
    "patient_id, owner_id, requester_id, encounter_id, focus_id, business_status, "
    "authored_on, last_modified, period_start, period_end, body) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_WORDS = ["cbc", "lipid", "npo", "mri", "cardiology", "or"]


def _wire(request: dict[str, Any], version: int) -> dict[str, Any]:
    task = decode_task(request)
    object.__setattr__(task, "version_id", str(version))
    object.__setattr__(task, "last_modified", task.authored_on)
    return encode_task(task)


def _columns(w: dict[str, Any], version: int) -> tuple[object, ...]:
    period = w.get("executionPeriod") or {}
    return (
        w["id"], version, w["status"], w["intent"], w.get("priority"),
        _RANK[w.get("priority")], w.get("code"), w.get("patientId"), w.get("ownerId"),
        w.get("requesterId"), w.get("encounterId"), w.get("focusId"),
        w.get("businessStatus"), w["authoredOn"], w["lastModified"], period.get("start"),
        period.get("end"), json.dumps(w, separators=(",", ":")),
    )  # fmt: skip


def build_v1(path: Path, count: int = 300) -> list[dict[str, Any]]:
    """A version-1 store with ``count`` tasks (each with history and outbox rows), a few
    updated (two history rows) and one deleted. Returns the live tasks' wire forms."""
    conn = apsw.Connection(str(path))
    conn.pragma("journal_mode", "wal")
    conn.execute("BEGIN IMMEDIATE")
    conn.execute(V1_SCHEMA)
    conn.execute("INSERT INTO meta (key, value) VALUES ('created_at', '2025-01-01T00:00:00.000Z')")
    live: list[dict[str, Any]] = []
    for n, request in enumerate(generate_requests(count, seed=3)):
        request = dict(request, id=new_task_id())
        if n % 7 == 0:
            request["partOf"] = ["t_parent1"]
            request["basedOn"] = ["sr_1", "sr_2"]
        wire = _wire(request, 1)
        conn.execute(_TASK, _columns(wire, 1))
        body = json.dumps(wire, separators=(",", ":"))
        conn.execute(
            "INSERT INTO task_history (task_id, version, op, body, changed_at) "
            "VALUES (?, 1, 'create', ?, ?)",
            (wire["id"], body, wire["lastModified"]),
        )
        conn.execute(
            "INSERT INTO outbox (change_id, task_id, op, payload, created_at) "
            "VALUES (?, ?, 'create', ?, ?)",
            (new_change_id(), wire["id"], body, wire["lastModified"]),
        )
        if n % 10 == 0:  # an update: a second version in the history
            wire = _wire(dict(request, description=f"updated {n} lipid"), 2)
            body = json.dumps(wire, separators=(",", ":"))
            conn.execute("DELETE FROM tasks WHERE id = ?", (wire["id"],))
            conn.execute(_TASK, _columns(wire, 2))
            conn.execute(
                "INSERT INTO task_history (task_id, version, op, body, changed_at) "
                "VALUES (?, 2, 'update', ?, ?)",
                (wire["id"], body, wire["lastModified"]),
            )
        live.append(wire)
    gone = live.pop()
    conn.execute("DELETE FROM tasks WHERE id = ?", (gone["id"],))
    conn.execute(
        "INSERT INTO task_history (task_id, version, op, body, changed_at) "
        "VALUES (?, ?, 'delete', ?, ?)",
        (gone["id"], int(gone["versionId"]) + 1, json.dumps(gone), gone["lastModified"]),
    )
    conn.pragma("application_id", APPLICATION_ID)
    conn.pragma("user_version", 1)
    conn.execute("COMMIT")
    conn.close()
    return live


def _snapshot(path: Path) -> dict[str, object]:
    """Everything a migration must keep, read with raw apsw."""
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        out: dict[str, object] = {
            table: conn.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall()
            for table in ("tasks", "task_history", "outbox", "task_refs", "task_io", "meta")
        }
        for word in _WORDS:
            out[f"text:{word}"] = sorted(
                r[0]
                for r in conn.execute(
                    "SELECT rowid FROM task_text WHERE task_text MATCH ?", (f'"{word}"*',)
                )
            )
        out["version"] = conn.pragma("user_version")
        out["schema"] = [
            r[0] for r in conn.execute("SELECT sql FROM sqlite_schema WHERE name = 'task_text'")
        ]
    finally:
        conn.close()
    return out


def test_a_version_1_file_opens_migrated_and_keeps_every_row_and_text_match(
    tmp_path: Path,
) -> None:
    path = tmp_path / "v1.db"
    live = build_v1(path)
    before = _snapshot(path)
    assert before["version"] == 1
    assert "prefix" in str(before["schema"])
    assert all(before[f"text:{w}"] for w in ("cbc", "lipid")), "the fixture must match text"

    with TaskStore.open(path) as store:
        assert store.schema_version() == SCHEMA_VERSION == 6
        for wire in live[::17]:
            got = store.tasks.get(wire["id"]).data
            assert encode_task(got) == wire
        updated = store.tasks.history(live[0]["id"]).data
        assert [h.version for h in updated] == [1, 2]
        # The migrated store searches, and keeps writing through its triggers.
        ids_by_seq = {row[0]: row[1] for row in before["tasks"]}  # type: ignore[attr-defined]
        for word in _WORDS:
            found = store.tasks.search(text=word, limit=1000).data
            assert sorted(str(t.id) for t in found) == sorted(
                ids_by_seq[seq]
                for seq in before[f"text:{word}"]  # type: ignore[attr-defined]
            )
        created = store.tasks.create({"status": "ready", "intent": "order",
                                      "authoredOn": "2025-05-05T00:00:00Z",
                                      "description": "zebrafish assay"}).data  # fmt: skip
        assert [t.id for t in store.tasks.search(text="zebra").data] == [created.id]
        store.tasks.delete(str(created.id))

    after = _snapshot(path)
    assert after["version"] == SCHEMA_VERSION
    assert "prefix" not in str(after["schema"])
    for key, value in before.items():
        if key in ("version", "schema"):
            continue
        kept = set(value)  # type: ignore[call-overload]
        # Version 3 adds columns at the end (outbox.patch, task_history.origin).
        if key in ("task_history", "outbox"):
            width = len(next(iter(kept)))
            now = {row[:width] for row in after[key]}  # type: ignore[attr-defined]
        else:
            now = set(after[key])  # type: ignore[call-overload]
        assert kept <= now, key  # every row of version 1 is still there, unchanged
        # ... and only the create + delete above were added (meta may gain facts).
        extra = {"task_history": 2, "outbox": 2}.get(key, 0)
        assert len(now) == len(kept) + extra or key == "meta", key


def test_a_failing_migration_leaves_the_version_1_file_exactly_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "v1.db"
    build_v1(path, count=50)
    before = _snapshot(path)
    broken = dict(migrations_module.MIGRATIONS)
    broken[2] = broken[2] + "\nINSERT INTO no_such_table VALUES (1);"
    for module in ("clinik_local.storage.migrations", "clinik_local.storage.connection"):
        monkeypatch.setattr(f"{module}.MIGRATIONS", broken)
    with pytest.raises(StorageError) as raised:
        TaskStore.open(path)
    assert "no_such_table" in str(raised.value)
    assert _snapshot(path) == before


def _schema(path: Path) -> set[tuple[object, ...]]:
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return set(
            conn.execute(
                "SELECT type, name, tbl_name, sql FROM sqlite_schema WHERE name NOT LIKE 'sqlite_%'"
            ).fetchall()
        )
    finally:
        conn.close()


def test_a_migrated_version_1_file_has_exactly_the_schema_of_a_new_file(
    tmp_path: Path,
) -> None:
    build_v1(tmp_path / "v1.db", count=20)
    TaskStore.open(tmp_path / "v1.db").close()
    TaskStore.open(tmp_path / "new.db").close()
    migrated, fresh = _schema(tmp_path / "v1.db"), _schema(tmp_path / "new.db")
    assert not any(kind == "trigger" for kind, *_ in fresh)
    assert migrated == fresh
    assert any(name == "sync_bases" for _, name, *_ in fresh)


def test_the_derived_rows_of_a_migrated_file_are_what_derive_rows_computes(
    tmp_path: Path,
) -> None:
    path = tmp_path / "v1.db"
    build_v1(path, count=120)
    conn = apsw.Connection(str(path))
    try:  # the fixture must hold every kind of derived row
        for table in ("task_refs", "task_io", "task_text"):
            assert conn.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0], table
    finally:
        conn.close()
    TaskStore.open(path).close()
    assert derived_problems(path) == []


def test_version_1_rows_read_as_local_changes_without_a_patch(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    live = build_v1(path, count=20)
    with TaskStore.open(path) as store, store.read() as conn:
        patches = {r[0] for r in conn.execute("SELECT patch FROM outbox")}
        origins = {r[0] for r in conn.execute("SELECT origin FROM task_history")}
        history = store.tasks.history(live[0]["id"]).data
    assert patches == {None}  # derived from consecutive bodies when a rebase needs them
    assert origins == {"local"}
    assert {h.origin for h in history} == {"local"}


def test_a_version_3_outbox_row_with_its_own_payload_is_read_as_stored(
    tmp_path: Path,
) -> None:
    path = tmp_path / "v3.db"
    with TaskStore.open(path) as store:
        task_id = str(store.tasks.create({"status": "draft", "intent": "order"}).data.id)
    conn = apsw.Connection(str(path))
    stored = {"id": task_id, "status": "draft", "intent": "order", "note": "as v3 wrote it"}
    conn.execute("UPDATE outbox SET payload = ?", (json.dumps(stored),))  # version 3's form
    conn.pragma("user_version", 3)
    conn.close()
    with TaskStore.open(path) as store:
        assert store.schema_version() == SCHEMA_VERSION == 6
        created = store.tasks.create({"status": "draft", "intent": "order"}).data
        with store.read() as conn:
            old, new = outbox.select_sendable(conn, 0, 10)
            payloads = [p for (p,) in conn.execute("SELECT payload FROM outbox ORDER BY seq")]
    assert json.loads(str(old.payload)) == stored  # read as stored
    assert payloads[1] is None  # a new local create shares its history's body
    assert json.loads(str(new.payload)) == encode_task(created)


def test_version_5_keeps_every_outbox_row_and_never_reuses_a_change_sequence_number(
    tmp_path: Path,
) -> None:
    path = tmp_path / "v4.db"
    with TaskStore.open(path) as store:
        ids = [
            str(store.tasks.create({"status": "draft", "intent": "order"}).data.id)
            for _ in range(6)
        ]
    conn = apsw.Connection(str(path))
    # Four changes delivered (removed), one parked as dead: the high-water mark is 6.
    conn.execute("DELETE FROM outbox WHERE seq IN (3, 4, 5, 6)")
    conn.execute("UPDATE outbox SET state = 'dead', attempts = 3 WHERE seq = 2")
    kept = conn.execute("SELECT * FROM outbox ORDER BY seq").fetchall()
    history = conn.execute("SELECT * FROM task_history ORDER BY task_id, version").fetchall()
    conn.pragma("user_version", 4)
    conn.close()
    with TaskStore.open(path) as store:
        assert store.schema_version() == SCHEMA_VERSION
        with store.read() as conn:
            assert conn.execute("SELECT * FROM outbox ORDER BY seq").fetchall() == kept
            assert (
                conn.execute("SELECT * FROM task_history ORDER BY task_id, version").fetchall()
                == history
            )
        store.tasks.update(ids[0], {"status": "ready", "intent": "order"})
        with store.read() as conn:
            newest = conn.execute("SELECT max(seq) FROM outbox").fetchall()[0][0]
    assert newest == 7  # after the delivered 3..6, never one of them again


@pytest.mark.parametrize(
    ("table", "column", "bad"),
    [("task_history", "op", "merge"), ("task_history", "origin", "remote"),
     ("outbox", "op", "patch"), ("outbox", "state", "sent")],
)  # fmt: skip
def test_version_5_checks_refuse_what_the_in_lists_refused(
    tmp_path: Path, table: str, column: str, bad: str
) -> None:
    path = tmp_path / "store.db"
    with TaskStore.open(path) as store:
        store.tasks.create({"status": "draft", "intent": "order"})
    conn = apsw.Connection(str(path))
    try:
        with pytest.raises(apsw.ConstraintError, match="CHECK"):
            conn.execute(f"UPDATE {table} SET {column} = ?", (bad,))
        conn.execute(f"UPDATE {table} SET {column} = {column}")  # a good value passes
    finally:
        conn.close()


def test_no_row_write_evaluates_an_in_list_of_three_or_more_constants() -> None:
    """The rule of versions 5 and 6 (schema.sql): an IN list of 3+ constants in a CHECK
    or a partial index's WHERE costs a throwaway b-tree per row written. None is left."""
    sql = "\n".join(line.split("--")[0] for line in migrations_module.schema_sql().splitlines())
    lists = re.findall(r"\b(NOT )?IN\s*\(([^()]*)\)", sql)  # SQL only, not its comments
    assert lists  # the two-value lists of task_refs.kind and task_io.direction remain
    long_lists = [(neg, items) for neg, items in lists if items.count(",") >= 2]
    assert long_lists == []


_V5_OPEN_BY_DUE = (
    "CREATE INDEX tasks_open_by_due    ON tasks (ifnull(period_end, '~'), id)\n"
    "    WHERE status NOT IN ('cancelled', 'completed', 'failed', 'rejected')"
)


def test_version_6_builds_the_open_work_index_again_without_its_in_list(tmp_path: Path) -> None:
    path = tmp_path / "v5.db"
    due = {"executionPeriod": {"end": "2020-01-01T00:00:00.000Z"}}
    with TaskStore.open(path) as store:
        store.tasks.create({"id": "open", "status": "requested", "intent": "order", **due})
        store.tasks.create({"id": "done", "status": "completed", "intent": "order", **due})
    new_schema = _schema(path)
    (new_text,) = [sql for _, name, _, sql in new_schema if name == "tasks_open_by_due"]
    conn = apsw.Connection(str(path))
    conn.execute("DROP INDEX tasks_open_by_due")
    conn.execute(_V5_OPEN_BY_DUE)
    conn.pragma("user_version", 5)
    conn.close()
    with TaskStore.open(path) as store:
        assert store.schema_version() == SCHEMA_VERSION == 6
        assert _schema(path) == new_schema  # the index spelt as a new file has it
        assert "IN (" not in str(new_text)
        with store.read() as conn:
            rows = conn.execute(
                "SELECT id FROM tasks INDEXED BY tasks_open_by_due"
                " WHERE NOT (status = 'cancelled' OR status = 'completed'"
                " OR status = 'failed' OR status = 'rejected')"
            ).fetchall()
        assert rows == [("open",)]  # the index holds the open work, built again
        assert [t.id for t in store.tasks.search(overdue=True).data] == ["open"]


def test_a_task_row_written_builds_no_throwaway_b_tree() -> None:
    """What the rule is for, seen in the programs SQLite runs: no statement a create, an
    update or a delete runs opens an ephemeral table, except to hold a RETURNING's rows.
    (With version 5's schema, the tasks INSERT and a status UPDATE each opened one, for
    tasks_open_by_due's NOT IN list.)"""
    store = TaskStore.open(":memory:")
    try:
        conn = store._db._conn
        written: list[str] = []

        def trace(_cursor: apsw.Cursor, sql: str, _bindings: object) -> bool:
            written.extend(s.strip() for s in sql.split(";") if s.strip())
            return True

        conn.exec_trace = trace
        task_id = str(
            store.tasks.create(
                {"status": "requested", "intent": "order", "note": "a", "basedOn": ["task_x"]}
            ).data.id
        )
        store.tasks.update(task_id, {"status": "accepted"})
        store.tasks.update(task_id, {"note": "b"})
        store.tasks.delete(task_id)
        conn.exec_trace = None
        writes = {s for s in written if s.split()[0].upper() in ("INSERT", "UPDATE", "DELETE")}
        assert any(s.startswith("INSERT INTO tasks") for s in writes)
        assert any(s.startswith("UPDATE tasks") for s in writes)
        ephemeral = []
        for sql in sorted(writes):
            program = conn.execute("EXPLAIN " + sql, (None,) * sql.count("?")).fetchall()
            if any(op == "OpenEphemeral" for _, op, *_ in program) and "RETURNING" not in sql:
                ephemeral.append(sql)
        assert ephemeral == []
    finally:
        store.close()
