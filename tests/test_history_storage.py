"""The history keeps every version while a live task's current body is stored once.

Schema version 2: the current version's history row holds NULL (its body is in
tasks.body) until a later version or the deletion supersedes it; then the writer
moves the old body into it. Every reader sees full bodies: store.tasks.history,
through every write path (local edits, server copies, deletion).
"""

from __future__ import annotations

import json
from pathlib import Path

import apsw

from clinik_local import TaskStore, encode_task
from clinik_local.storage import outbox, rows
from clinik_local.timestamps import now


def _raw_history(path: Path, task_id: str) -> list[tuple[int, str, str | None]]:
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        found = conn.execute(
            "SELECT version, op, body FROM task_history WHERE task_id = ? ORDER BY version",
            (task_id,),
        ).fetchall()
    finally:
        conn.close()
    return [(int(str(v)), str(op), None if b is None else str(b)) for v, op, b in found]


def test_the_current_body_is_stored_once_and_history_reads_every_version_whole(
    tmp_path: Path,
) -> None:
    path = tmp_path / "h.db"
    with TaskStore.open(path) as store:
        created = store.tasks.create({"status": "draft", "intent": "order", "note": "v1"}).data
        task_id = str(created.id)
        assert _raw_history(path, task_id) == [(1, "create", None)]
        updated = store.tasks.update(task_id, {"status": "requested", "note": "v2"}).data
        with store._db.write() as conn:  # a server copy supersedes version 2
            server = {**encode_task(updated), "note": "v3 from the server", "versionId": "9"}
            rows.write_server_copy(conn, task_id, server, now=now(), reason="test")
        raw = _raw_history(path, task_id)
        assert [(v, op) for v, op, _ in raw] == [(1, "create"), (2, "update"), (3, "update")]
        assert [json.loads(b)["note"] for _, _, b in raw[:2] if b] == ["v1", "v2"]
        assert raw[2][2] is None  # current: in tasks.body only
        versions = store.tasks.history(task_id).data
        assert [v.task.note for v in versions] == ["v1", "v2", "v3 from the server"]
        assert [v.task.version_id for v in versions] == ["1", "2", "3"]
        store.tasks.delete(task_id)
        raw = _raw_history(path, task_id)
        assert all(b is not None for _, _, b in raw)
        assert [v.task.note for v in store.tasks.history(task_id).data] == [
            "v1",
            "v2",
            "v3 from the server",
            "v3 from the server",  # the deletion keeps the last body
        ]
        many = store.tasks.create_many([{"status": "draft", "intent": "order"}] * 3).data
        for task in many:
            assert _raw_history(path, str(task.id)) == [(1, "create", None)]
            assert store.tasks.history(str(task.id)).data[0].task == task


def _raw_outbox(path: Path) -> list[tuple[str, str, str | None, int | None]]:
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        found = conn.execute(
            "SELECT task_id, op, payload, base_version FROM outbox ORDER BY seq"
        ).fetchall()
    finally:
        conn.close()
    return [(str(t), str(op), p, b) for t, op, p, b in found]  # type: ignore[misc]


def test_a_local_change_keeps_no_second_copy_and_sends_the_body_of_its_version(
    tmp_path: Path,
) -> None:
    path = tmp_path / "o.db"
    with TaskStore.open(path) as store:
        first = store.tasks.create({"status": "draft", "intent": "order", "note": "v1"}).data
        task_id = str(first.id)
        many = store.tasks.create_many([{"status": "draft", "intent": "order"}] * 3).data
        store.tasks.update(task_id, {"status": "requested", "note": "v2"})
        store.tasks.update(task_id, {"note": "v3"})
        # Every create and update row points at its version: no payload stored.
        assert [(op, p, b) for t, op, p, b in _raw_outbox(path) if t == task_id] == [
            ("create", None, None),
            ("update", None, 1),
            ("update", None, 2),
        ]
        assert all(p is None for _, _, p, _ in _raw_outbox(path))
        store.tasks.delete(task_id)
        with store.read() as conn:
            sent = outbox.select_sendable(conn, 0, 100)
    by_task = [(r.op, r.payload) for r in sent if r.task_id == task_id]
    assert [(op, None if p is None else json.loads(p)["note"]) for op, p in by_task] == [
        ("create", "v1"),
        ("update", "v2"),
        ("update", "v3"),
        ("delete", None),
    ]
    assert [json.loads(str(p))["versionId"] for op, p in by_task if p] == ["1", "2", "3"]
    others = {r.task_id: r.payload for r in sent if r.task_id != task_id}
    assert {json.loads(str(p))["id"] for p in others.values()} == {str(t.id) for t in many}
