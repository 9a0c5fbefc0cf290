"""A change-log page applied in bulk (rebase.apply_page) lands exactly as the task-by-task
path (rebase.apply_items per task) lands it, and again changes nothing; the bulk path of
rows.write_server_copies sets only the columns and derived rows a version changed."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import apsw
import pytest

from clinik_local import TaskStore
from clinik_local.remotes.base import LogItem
from clinik_local.storage import replica, rows
from clinik_local.sync import rebase
from tests.derived import derived_problems

NOW = "2026-01-02T03:04:05.000Z"
SCOPE = {"ownerId": ("prac_1", "prac_2")}
CTX = rebase.Context(scope=SCOPE, generation=1, pulls=True)


def server_task(task_id: str, version: int, **fields: Any) -> dict[str, Any]:
    """A task as the server sends it (its own versionId and lastModified)."""
    return {
        "id": task_id,
        "status": "requested",
        "intent": "order",
        "code": "lab-order",
        "ownerId": "prac_1",
        "note": f"{task_id} note",
        "description": f"{task_id} description",
        "input": [{"type": "specimen", "valueString": f"{task_id} blood"}],
        "authoredOn": "2025-06-01T10:00:00.000Z",
        "versionId": str(version),
        "lastModified": f"2025-07-0{version}T10:00:00.000Z",
        **fields,
    }


def item(task: dict[str, Any] | None, task_id: str = "", version: str | None = None) -> LogItem:
    if task is None:
        return LogItem(task_id=task_id, deleted=True, task=None, version=version, change_id=None)
    return LogItem(
        task_id=task["id"], deleted=False, task=task, version=task["versionId"], change_id=None
    )


def one_by_one(store: TaskStore, items: list[LogItem]) -> dict[str, rebase.Accepted]:
    """What Puller._log_page did before pages were applied in bulk: apply_items per task."""
    by_task: dict[str, list[LogItem]] = {}
    for it in items:
        by_task.setdefault(it.task_id, []).append(it)
    with store._db.write() as conn:
        return {
            task_id: rebase.apply_items(store._db, conn, CTX, group, NOW)
            for task_id, group in by_task.items()
        }


def in_bulk(store: TaskStore, items: list[LogItem]) -> dict[str, rebase.Accepted]:
    with store._db.write() as conn:
        return rebase.apply_page(store._db, conn, CTX, items, NOW)


#: The earlier pull every case starts from: tasks a..j at version 3.
FIRST = [server_task(f"task_{c}", 3) for c in "abcdefghij"]


def setup(path: Path) -> None:
    """A store that pulled FIRST, with local edits of task_b and task_d waiting, an
    unseen version of task_e and task_i's local row from a pull of a readable copy."""
    with TaskStore.open(path) as store:
        in_bulk(store, [item(t) for t in FIRST])
        store.tasks.update("task_d", {"businessStatus": "edited here"})
        store.tasks.update("task_b", {"note": "ours"})
        with store._db.write() as conn:
            replica.set_unseen(conn, "task_e", "9")


#: The page: one item of each kind a page holds.
PAGE = [
    item(server_task("task_a", 4, note="the server changed the note")),  # plain update
    item(server_task("task_new", 1)),  # a task never seen here
    item(server_task("task_c", 3)),  # the version the base has already
    item(server_task("task_d", 4, note="theirs")),  # merged with the local edit waiting
    item(server_task("task_b", 4, note="theirs")),  # the same field edited here: a conflict
    # older than the unseen version 9 (stamped before the base: no later item either)
    item(server_task("task_e", 4, lastModified="2025-07-01T10:00:00.000Z")),
    item(None, "task_f", "4"),  # deleted on the server
    item(server_task("task_g", 4, ownerId="prac_elsewhere")),  # out of the scope now
    item(server_task("task_h", 4, note="superseded")),  # two items: the last one counts
    item(server_task("task_i", 4, status="not-a-status")),  # no Task this version reads
    item(server_task("task_h", 5, note="last")),
    item(server_task("task_j", 4, ownerId="prac_2")),  # only the owner changed
    item(None, "task_never", "2"),  # a delete of a task never here
]

_TABLES = {
    "tasks": "SELECT * FROM tasks ORDER BY id",
    "task_history": "SELECT * FROM task_history ORDER BY task_id, version",
    "sync_bases": "SELECT * FROM sync_bases ORDER BY task_id",
    "task_sync": "SELECT * FROM task_sync ORDER BY task_id",
    "outbox": "SELECT task_id, op, payload, patch, base_version, state FROM outbox ORDER BY seq",
    "conflicts": "SELECT task_id, local_body, server_body FROM sync_conflicts ORDER BY task_id",
}


def contents(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every table a pull writes, rows without tasks.seq (an insertion order detail)."""
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        out = {name: [tuple(r) for r in conn.execute(sql)] for name, sql in _TABLES.items()}
    finally:
        conn.close()
    out["tasks"] = [r[1:] for r in out["tasks"]]
    return out


def test_a_page_in_bulk_lands_as_task_by_task_and_again_changes_nothing(tmp_path: Path) -> None:
    setup(tmp_path / "bulk.db")
    shutil.copy(tmp_path / "bulk.db", tmp_path / "each.db")
    before = contents(tmp_path / "bulk.db")
    with TaskStore.open(tmp_path / "bulk.db") as store:
        done = in_bulk(store, PAGE)
    with TaskStore.open(tmp_path / "each.db") as store:
        assert one_by_one(store, PAGE) == done
    bulk, each = contents(tmp_path / "bulk.db"), contents(tmp_path / "each.db")
    assert bulk == each
    assert bulk != before
    assert list(done) == list(dict.fromkeys(i.task_id for i in PAGE))
    assert {k for k, a in done.items() if a.changed} == {
        *("task_a", "task_new", "task_d", "task_f", "task_g", "task_h", "task_i", "task_j")
    }
    assert [k for k, a in done.items() if a.conflict] == ["task_b"]
    assert '"note":"theirs"' in {r[0]: r for r in bulk["tasks"]}["task_d"][-1]
    for path in (tmp_path / "bulk.db", tmp_path / "each.db"):
        assert derived_problems(path) == []
    local = {r[0]: r for r in bulk["tasks"]}
    assert not {"task_f", "task_g", "task_i"} & local.keys()
    assert '"note":"last"' in local["task_h"][-1]
    history = [(r[0], r[1], r[-1]) for r in bulk["task_history"]]
    assert [h for h in history if h[0] in ("task_h", "task_new")] == [
        ("task_h", 1, "server"),
        ("task_h", 2, "server"),
        ("task_new", 1, "server"),
    ]
    with TaskStore.open(tmp_path / "bulk.db") as store:
        again = in_bulk(store, PAGE)
    assert contents(tmp_path / "bulk.db") == bulk
    with TaskStore.open(tmp_path / "each.db") as store:
        assert one_by_one(store, PAGE) == again
    assert contents(tmp_path / "each.db") == each


@pytest.mark.parametrize(
    ("change", "rewritten"),
    [
        ({"ownerId": "prac_2"}, set()),
        ({"note": "a new note"}, {"task_text"}),
        ({"input": [{"type": "specimen", "valueString": "urine"}]}, {"task_io", "task_text"}),
        ({"basedOn": ["task_z"]}, {"task_refs"}),
    ],
)
def test_a_replaced_row_sets_only_what_changed(
    tmp_path: Path, change: dict[str, Any], rewritten: set[str]
) -> None:
    first = server_task("task_a", 3)
    with TaskStore.open(tmp_path / "s.db") as store:
        in_bulk(store, [item(first)])
        conn = store._db._conn
        writes: list[str] = []

        def tracer(cursor: apsw.Cursor, sql: str, bindings: object) -> bool:
            writes.append(sql)
            return True

        conn.exec_trace = tracer
        try:
            with store._db.write() as c:
                rows.write_server_copies(
                    c, [("task_a", server_task("task_a", 4, **change))], now=NOW
                )
        finally:
            conn.exec_trace = None
        [update] = [s for s in writes if s.startswith("UPDATE tasks")]
        columns = {"version", "last_modified", "body"}
        if "ownerId" in change:
            columns.add("owner_id")
        assert (
            set(update.split(" SET ")[1].split(" WHERE ")[0].replace(" = ?", "").split(", "))
            == columns
        )
        touched = {
            table
            for table in ("task_refs", "task_io", "task_text")
            if any(s.startswith(f"DELETE FROM {table}") for s in writes)
        }
        assert touched == rewritten
        found = store.tasks.search(
            {"ownerId": first["ownerId"] if "ownerId" not in change else change["ownerId"]}
        )
        assert [t.id for t in found.data] == ["task_a"]
    assert derived_problems(tmp_path / "s.db") == []
