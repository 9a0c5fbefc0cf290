"""Restoring a device from an export, and dead letters retried or dropped in bulk
(issue 15 item 15): nothing is created twice on the server, nothing is lost."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from clinik_local import (
    ReferenceServer,
    SyncConfig,
    TaskStore,
    ValidationError,
    export_ndjson,
    import_ndjson,
)

TOKEN = "restore-token"
REQUEST = {"status": "requested", "intent": "order", "patientId": "pt_1", "note": "first"}


@pytest.fixture
def server() -> Iterator[ReferenceServer]:
    with ReferenceServer(token=TOKEN) as running:
        yield running


def syncing(path: Path | str, server: ReferenceServer) -> TaskStore:
    return TaskStore.open(
        path,
        sync=SyncConfig(base_url=server.url, token_provider=lambda: TOKEN, backoff_base=0.01),
    )


def test_a_retried_dead_letter_goes_under_a_new_key(server: ReferenceServer) -> None:
    with syncing(":memory:", server) as store:
        task = store.tasks.create(REQUEST).data
        assert task.id is not None
        server.faults.reject_ids.add(task.id)
        store.sync.flush(timeout=20)
        (letter,) = store.sync.dead_letters()
        server.faults.reject_ids.clear()
        fresh = store.sync.retry(letter.change_id)
        assert fresh != letter.change_id
        assert store.sync.flush(timeout=20)
        assert fresh in server.applied_counts()
        assert letter.change_id not in server.applied_counts()
        assert server.tasks()[task.id]["note"] == "first"


def test_dead_letters_are_retried_or_dropped_in_bulk_by_status(server: ReferenceServer) -> None:
    with syncing(":memory:", server) as store:
        clash = store.tasks.create(REQUEST).data
        refused = store.tasks.create(REQUEST).data
        assert clash.id is not None
        assert refused.id is not None
        server.put_task({**REQUEST, "id": clash.id, "note": "someone else's task"})
        server.faults.reject_ids.add(refused.id)
        store.sync.flush(timeout=20)
        assert sorted(d.status or 0 for d in store.sync.dead_letters()) == [409, 422]
        with pytest.raises(ValidationError, match="status"):
            store.sync.discard_all(status=7)
        assert store.sync.discard_all(status=409) == 1
        assert [d.status for d in store.sync.dead_letters()] == [422]
        server.faults.reject_ids.clear()
        assert store.sync.retry_all() == 1
        assert store.sync.flush(timeout=20)
        assert store.sync.dead_letters() == []
        assert server.tasks()[clash.id]["note"] == "someone else's task"
        assert refused.id in server.tasks()


def test_a_device_restored_from_an_export_sends_nothing_twice(
    server: ReferenceServer, tmp_path: Path
) -> None:
    with syncing(tmp_path / "a.db", server) as first:
        made = first.tasks.create_many([{**REQUEST, "note": f"n{i}"} for i in range(3)]).data
        assert first.sync.flush(timeout=20)
        export = io.StringIO()
        export_ndjson(first, export)
    ids = [t.id or "" for t in made]
    writes_before = len(server.applied_counts())
    with syncing(tmp_path / "b.db", server) as second:
        assert import_ndjson(second, io.StringIO(export.getvalue()), synced=True) == 3
        assert second.sync.status().pending == 0
        assert second.tasks.get(ids[0]).meta["syncState"] == "synced"
        assert second.sync.flush(timeout=20)
        assert len(server.applied_counts()) == writes_before  # nothing re-created
        second.tasks.update(ids[0], {"note": "edited on the restored device"})
        second.tasks.delete(ids[1])
        assert second.sync.flush(timeout=20)
        assert second.sync.dead_letters() == []
        assert second.sync.conflicts() == []
    on_server = server.tasks()
    assert on_server[ids[0]]["note"] == "edited on the restored device"
    assert ids[1] not in on_server
    assert on_server[ids[2]]["note"] == "n2"


def test_a_restored_task_changed_on_the_server_since_the_export_merges_other_fields(
    server: ReferenceServer,
) -> None:
    # The server reassigned the task, the restored device edited its note: both survive
    # (a field-level three-way merge on the exported copy, tests/test_sync_rebase.py).
    with syncing(":memory:", server) as first:
        task = first.tasks.create(REQUEST).data
        assert first.sync.flush(timeout=20)
        export = io.StringIO()
        export_ndjson(first, export)
    assert task.id is not None
    server.update_task(task.id, {"ownerId": "prac_reassigned"})
    with syncing(":memory:", server) as second:
        import_ndjson(second, io.StringIO(export.getvalue()), synced=True)
        second.tasks.update(task.id, {"note": "edited from the stale export"})
        assert second.sync.flush(timeout=20)
        assert second.sync.conflicts() == []
        local = second.tasks.get(task.id).data
        assert (local.note, local.owner_id) == ("edited from the stale export", "prac_reassigned")
    assert server.tasks()[task.id]["note"] == "edited from the stale export"
    assert server.tasks()[task.id]["ownerId"] == "prac_reassigned"


def test_a_restored_task_whose_field_the_server_changed_too_is_a_conflict(
    server: ReferenceServer,
) -> None:
    with syncing(":memory:", server) as first:
        task = first.tasks.create(REQUEST).data
        assert first.sync.flush(timeout=20)
        export = io.StringIO()
        export_ndjson(first, export)
    assert task.id is not None
    server.update_task(task.id, {"note": "changed at the clinic"})
    with syncing(":memory:", server) as second:
        import_ndjson(second, io.StringIO(export.getvalue()), synced=True)
        second.tasks.update(task.id, {"note": "edited from the stale export"})
        second.sync.flush(timeout=20)
        (conflict,) = second.sync.conflicts()
        assert conflict.server is not None
        assert conflict.server["note"] == "changed at the clinic"
        assert conflict.local is not None
        assert conflict.local["note"] == "edited from the stale export"
        assert [r.field for r in conflict.reasons] == ["note"]
    assert server.tasks()[task.id]["note"] == "changed at the clinic"  # not overwritten


def test_a_restored_task_the_server_no_longer_has_is_created_again(
    server: ReferenceServer,
) -> None:
    with syncing(":memory:", server) as store:
        store.tasks.create_many([{**REQUEST, "id": "task_gone"}], synced=True)
        store.tasks.update("task_gone", {"note": "still wanted"})
        assert store.sync.flush(timeout=20)
        assert server.tasks()["task_gone"]["note"] == "still wanted"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CLINIK_TOKEN"}
    return subprocess.run(
        [sys.executable, "-m", "clinik_local.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_the_cli_restores_as_synced_and_drops_dead_letters_in_bulk(
    server: ReferenceServer, tmp_path: Path
) -> None:
    source = tmp_path / "tasks.ndjson"
    with TaskStore.open(":memory:") as store:
        store.tasks.create_many([{**REQUEST, "id": f"task_cli_{i}"} for i in range(2)])
        with source.open("w", encoding="utf-8") as out:
            export_ndjson(store, out)
    db = tmp_path / "restored.db"
    result = run_cli("import", "--db", str(db), "--synced", str(source))
    assert result.returncode == 0, result.stderr
    status = run_cli("sync", "status", "--db", str(db), "--json")
    assert json.loads(status.stdout)["pending"] == 0
    with syncing(db, server) as store:
        server.put_task({**REQUEST, "id": "task_cli_9"})
        store.tasks.create({**REQUEST, "id": "task_cli_9"})
        store.sync.flush(timeout=20)
        assert [d.status for d in store.sync.dead_letters()] == [409]
    neither = run_cli("sync", "discard", "--db", str(db))
    assert neither.returncode == 2
    assert "--all" in neither.stderr
    dropped = run_cli("sync", "discard", "--all", "--status", "409", "--db", str(db), "--json")
    assert dropped.returncode == 0, dropped.stderr
    assert json.loads(dropped.stdout) == {"discarded": 1}
