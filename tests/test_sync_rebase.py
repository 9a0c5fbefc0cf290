"""Rebase of undelivered changes on newer server versions (pulled, or in a 412 body), and
conflicts that lose nothing, against the reference server on 127.0.0.1."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from clinik_local import ReferenceServer, TaskStore, VersionConflictError
from clinik_local.sync import SyncConflict
from tests.pull_support import REQUEST, Recorder, config, local_tasks, recorded, server_tasks
from tests.test_migrations import build_v1


@pytest.fixture
def server() -> Iterator[ReferenceServer]:
    with ReferenceServer(token="rebase-token") as srv:
        yield srv


@pytest.fixture(params=["pulled", "412"])
def arrival(request: pytest.FixtureRequest) -> str:
    """How the newer server version reaches the device: the pull first, or a 412 answer."""
    return str(request.param)


def synced(tmp_path: Path, server: ReferenceServer, arrival: str, **kw: Any) -> TaskStore:
    return TaskStore.open(tmp_path / "d.db", sync=config(server, pull=arrival == "pulled", **kw))


def deliver(store: TaskStore, arrival: str) -> None:
    if arrival == "pulled":
        store.sync.pull()  # the server's version arrives before the push
    assert store.sync.flush(timeout=10)


def test_a_server_edit_and_a_local_edit_of_other_fields_both_survive(
    tmp_path: Path, server: ReferenceServer, arrival: str
) -> None:
    with synced(tmp_path, server, arrival) as store:
        task_id = str(store.tasks.create({**REQUEST, "note": "base"}).data.id)
        assert store.sync.flush(timeout=10)
        server.update_task(task_id, {"ownerId": "prac_main_office"})  # the server changed the owner
        store.tasks.update(task_id, {"note": "the device changed the note"})
        deliver(store, arrival)
        assert store.sync.conflicts() == []
        local = store.tasks.get(task_id)
        assert (local.data.owner_id, local.data.note) == (
            "prac_main_office",
            "the device changed the note",
        )
        assert local.meta["syncState"] == "synced"
        on_server = server.tasks()[task_id]
        assert (on_server["ownerId"], on_server["note"]) == (
            "prac_main_office",
            "the device changed the note",
        )
        assert set(server.applied_counts().values()) == {1}
        if arrival == "pulled":
            assert "merge" in {h.origin for h in store.tasks.history(task_id).data}


def test_the_same_field_changed_on_both_sides_is_a_conflict_with_all_three_versions(
    tmp_path: Path, server: ReferenceServer, arrival: str
) -> None:
    with synced(tmp_path, server, arrival) as store:
        task_id = str(store.tasks.create({**REQUEST, "note": "base"}).data.id)
        assert store.sync.flush(timeout=10)
        server.update_task(task_id, {"note": "theirs"})
        store.tasks.update(task_id, {"note": "ours"})
        deliver(store, arrival)
        [conflict] = store.sync.conflicts()
        assert conflict.base is not None
        assert conflict.server is not None
        assert conflict.local is not None
        assert (conflict.base["note"], conflict.server["note"], conflict.local["note"]) == (
            "base",
            "theirs",
            "ours",
        )
        assert [(r.kind, r.field) for r in conflict.reasons] == [("field", "note")]
        assert store.tasks.get(task_id).meta["syncState"] == "conflict"
        assert server.tasks()[task_id]["note"] == "theirs"  # neither side overwritten


def test_edits_after_a_conflict_are_shown_and_survive_its_resolution(
    tmp_path: Path, server: ReferenceServer, arrival: str
) -> None:
    with synced(tmp_path, server, arrival) as store:
        task_id = str(store.tasks.create({**REQUEST, "note": "base"}).data.id)
        assert store.sync.flush(timeout=10)
        server.update_task(task_id, {"note": "theirs", "ownerId": "prac_them"})
        store.tasks.update(task_id, {"note": "ours"})
        deliver(store, arrival)
        store.tasks.update(task_id, {"description": "written after the conflict"})
        [conflict] = store.sync.conflicts()
        assert conflict.local is not None
        assert conflict.local["description"] == "written after the conflict"
        stale = conflict.local_version
        assert stale is not None
        store.tasks.update(task_id, {"priority": "urgent"})  # not shown by `conflict`
        with pytest.raises(VersionConflictError):
            store.sync.resolve(task_id, "remote", local_version=stale)
        assert store.tasks.get(task_id).data.priority is not None  # nothing changed
        [conflict] = store.sync.conflicts()
        merged = {**conflict.server, **conflict.local, "note": "ours and theirs"}  # type: ignore[dict-item]
        store.sync.resolve(task_id, merged, local_version=conflict.local_version)
        assert store.sync.flush(timeout=10)
        on_server = server.tasks()[task_id]
        assert on_server["description"] == "written after the conflict"
        assert on_server["priority"] == "urgent"
        assert on_server["note"] == "ours and theirs"
        assert on_server["ownerId"] == "prac_them"
        assert local_tasks(store)[task_id] == {
            k: v for k, v in on_server.items() if k not in ("versionId", "lastModified")
        }


def test_keep_remote_stores_a_server_copy_this_version_cannot_validate(
    tmp_path: Path, server: ReferenceServer, arrival: str
) -> None:
    with synced(tmp_path, server, arrival) as store:
        task_id = str(store.tasks.create({**REQUEST, "note": "base"}).data.id)
        assert store.sync.flush(timeout=10)
        current = server.tasks()[task_id]
        server.put_task(
            {**current, "note": "n" * 20_000, "newerField": True}, validate=False
        )  # a newer server's task: an unknown field, a note over the local limit
        store.tasks.update(task_id, {"note": "ours"})
        deliver(store, arrival)
        [conflict] = store.sync.conflicts()
        store.sync.resolve(task_id, "remote", local_version=conflict.local_version)
        assert store.tasks.get(task_id).data.note == "n" * 20_000
        assert store.tasks.get(task_id).meta["syncState"] == "synced"
        with store.read() as conn:
            [(body,)] = conn.execute("SELECT body FROM tasks WHERE id = ?", (task_id,))
        assert '"newerField":true' in str(body)


def test_a_lifecycle_the_server_status_does_not_allow_is_a_conflict(
    tmp_path: Path, server: ReferenceServer, arrival: str
) -> None:
    with synced(tmp_path, server, arrival) as store:
        task_id = str(store.tasks.create({**REQUEST, "status": "accepted"}).data.id)
        assert store.sync.flush(timeout=10)
        server.update_task(task_id, {"status": "cancelled"})
        store.tasks.update(task_id, {"status": "in-progress"})
        deliver(store, arrival)
        [conflict] = store.sync.conflicts()
        assert {r.kind for r in conflict.reasons} == {"field", "lifecycle"}


def test_an_update_of_a_task_the_server_deleted_is_a_conflict(
    tmp_path: Path, server: ReferenceServer
) -> None:
    with synced(tmp_path, server, "pulled") as store:
        task_id = str(store.tasks.create(REQUEST).data.id)
        assert store.sync.flush(timeout=10)
        server.delete_task(task_id)
        store.tasks.update(task_id, {"note": "still needed"})
        deliver(store, "pulled")
        [conflict] = store.sync.conflicts()
        assert conflict.server is None
        assert [r.kind for r in conflict.reasons] == ["update vs delete"]
        store.sync.resolve(task_id, "local", local_version=conflict.local_version)
        assert store.sync.flush(timeout=10)
        assert server.tasks()[task_id]["note"] == "still needed"  # created again


def test_a_put_answered_404_is_an_update_against_a_delete_not_a_dead_letter(
    tmp_path: Path, server: ReferenceServer
) -> None:
    with synced(tmp_path, server, "412") as store:  # push only: the PUT meets the 404
        task_id = str(store.tasks.create(REQUEST).data.id)
        assert store.sync.flush(timeout=10)
        server.delete_task(task_id)
        store.tasks.update(task_id, {"note": "still needed"})
        assert store.sync.flush(timeout=10)
        assert store.sync.dead_letters() == []
        [conflict] = store.sync.conflicts()
        assert conflict.server is None
        assert conflict.local is not None
        assert conflict.local["note"] == "still needed"
        store.sync.resolve(task_id, "remote", local_version=conflict.local_version)
        assert local_tasks(store) == {}


def test_a_recreation_meeting_another_devices_recreation_is_a_conflict_not_a_dead_letter(
    tmp_path: Path, server: ReferenceServer
) -> None:
    # Both devices keep their update of a task the server deleted, so both re-create it;
    # the second POST meets the first one's re-creation (409). It is the same task, not
    # another one with its id: the server's copy is read and both sides are kept.
    with (
        TaskStore.open(tmp_path / "a.db", sync=config(server)) as a,
        TaskStore.open(tmp_path / "b.db", sync=config(server)) as b,
    ):
        task_id = str(a.tasks.create(REQUEST).data.id)
        assert a.sync.flush(timeout=10)
        assert b.sync.flush(timeout=10)
        server.delete_task(task_id)
        a.tasks.update(task_id, {"note": "from a"})
        b.tasks.update(task_id, {"priority": "stat"})
        conflicts = []
        for store in (a, b):
            assert store.sync.flush(timeout=10)
            [conflict] = store.sync.conflicts()
            assert [r.kind for r in conflict.reasons] == ["update vs delete"]
            conflicts.append(conflict)
        for store, conflict in zip((a, b), conflicts, strict=True):
            store.sync.resolve(task_id, "local", local_version=conflict.local_version)
            assert store.sync.flush(timeout=10)
        assert b.sync.dead_letters() == []
        [conflict] = b.sync.conflicts()
        assert conflict.server is not None
        assert conflict.server["note"] == "from a"
        assert conflict.local is not None
        assert conflict.local["priority"] == "stat"
        b.sync.resolve(task_id, "remote", local_version=conflict.local_version)
        assert b.sync.flush(timeout=10)
        assert a.sync.flush(timeout=10)
        assert local_tasks(a) == local_tasks(b) == server_tasks(server)


def test_keep_local_never_reverts_a_field_only_the_server_changed(
    tmp_path: Path, server: ReferenceServer, arrival: str
) -> None:
    """Found by tests/test_convergence.py: ``resolve("local")`` squashed the whole local
    snapshot onto the server's version, so the owner and note only the server changed
    were reverted, although the conflict's one reason was the priority."""
    with synced(tmp_path, server, arrival) as store:
        task_id = str(store.tasks.create({**REQUEST, "note": "base"}).data.id)
        assert store.sync.flush(timeout=10)
        server.update_task(task_id, {"priority": "urgent", "ownerId": "prac_a", "note": "srv"})
        store.tasks.update(task_id, {"priority": "asap", "status": "received"})
        deliver(store, arrival)
        [conflict] = store.sync.conflicts()
        assert [r.field for r in conflict.reasons] == ["priority"]
        store.sync.resolve(task_id, "local", local_version=conflict.local_version)
        assert store.sync.flush(timeout=10)
        on_server = server.tasks()[task_id]
        assert (on_server["priority"], on_server["status"]) == ("asap", "received")
        assert (on_server["ownerId"], on_server["note"]) == ("prac_a", "srv")
        assert local_tasks(store) == server_tasks(server)


def test_keep_remote_of_a_task_the_server_moved_out_of_the_scope_removes_it(
    tmp_path: Path, server: ReferenceServer
) -> None:
    server.put_task({**REQUEST, "id": "task_mine", "ownerId": "prac_me", "note": "base"})
    with TaskStore.open(
        tmp_path / "d.db", sync=config(server, scope={"ownerId": "prac_me"})
    ) as store:
        assert store.sync.flush(timeout=10)
        server.update_task("task_mine", {"ownerId": "prac_other", "note": "theirs"})
        store.tasks.update("task_mine", {"note": "ours"})
        store.sync.pull()  # out of the scope, but with an undelivered change: kept
        [conflict] = store.sync.conflicts()
        store.sync.resolve("task_mine", "remote", local_version=conflict.local_version)
        assert local_tasks(store) == {}
        assert store.sync.status().conflicts == 0


def test_a_merged_resolution_equal_to_the_servers_task_outside_the_scope_removes_it(
    tmp_path: Path, server: ReferenceServer
) -> None:
    """Found by tests/test_convergence.py: a merged request that is the server's task,
    which left the scope, left the task here for good with nothing to send."""
    server.put_task({**REQUEST, "id": "task_mine", "ownerId": "prac_me", "note": "base"})
    with TaskStore.open(
        tmp_path / "d.db", sync=config(server, scope={"ownerId": "prac_me"})
    ) as store:
        assert store.sync.flush(timeout=10)
        server.update_task("task_mine", {"ownerId": "prac_other", "note": "theirs"})
        store.tasks.update("task_mine", {"note": "ours"})
        store.sync.pull()
        [conflict] = store.sync.conflicts()
        assert conflict.server is not None
        merged = dict(conflict.server)
        store.sync.resolve("task_mine", merged, local_version=conflict.local_version)
        assert store.sync.flush(timeout=10)
        assert local_tasks(store) == {}
        assert store.sync.status().pending == 0


def test_the_push_after_a_rebase_carries_if_match_of_the_new_server_version(
    tmp_path: Path, server: ReferenceServer
) -> None:
    remote = Recorder(server)
    with TaskStore.open(tmp_path / "d.db", sync=recorded(server, remote)) as store:
        task_id = str(store.tasks.create(REQUEST).data.id)
        assert store.sync.flush(timeout=10)
        newer = server.update_task(task_id, {"ownerId": "prac_x"})
        store.tasks.update(task_id, {"note": "mine"})
        store.sync.pull()
        assert store.sync.flush(timeout=10)
        last = [c for c in remote.pushed if c.task_id == task_id][-1]
        assert last.server_version == newer["versionId"]
        assert last.op == "update"
        assert server.tasks()[task_id]["note"] == "mine"


def test_on_conflict_may_resolve_and_a_failing_policy_leaves_it_to_the_app(
    tmp_path: Path, server: ReferenceServer, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[SyncConflict] = []

    def keep_theirs(conflict: SyncConflict) -> str:
        seen.append(conflict)
        return "remote"

    with TaskStore.open(tmp_path / "a.db", sync=config(server, on_conflict=keep_theirs)) as store:
        task_id = str(store.tasks.create({**REQUEST, "note": "base"}).data.id)
        assert store.sync.flush(timeout=10)
        server.update_task(task_id, {"note": "theirs"})
        store.tasks.update(task_id, {"note": "ours"})
        assert store.sync.flush(timeout=10)
        assert [c.task_id for c in seen] == [task_id]
        assert store.sync.conflicts() == []
        assert store.tasks.get(task_id).data.note == "theirs"

    def broken(conflict: SyncConflict) -> None:
        raise RuntimeError("policy bug")

    with TaskStore.open(tmp_path / "b.db", sync=config(server, on_conflict=broken)) as store:
        assert store.sync.flush(timeout=10)
        store.tasks.update(task_id, {"note": "ours again"})
        server.update_task(task_id, {"note": "theirs again"})
        with caplog.at_level(logging.ERROR, logger="clinik_local.sync"):
            assert store.sync.flush(timeout=10)
        assert [c.task_id for c in store.sync.conflicts()] == [task_id]
        assert "on_conflict policy failed" in caplog.text


def test_a_version_1_file_with_undelivered_changes_rebases_on_the_servers_copy(
    tmp_path: Path, server: ReferenceServer
) -> None:
    path = tmp_path / "v1.db"
    live = build_v1(path, count=5)  # pending creates and updates, no patches recorded
    with TaskStore.open(path, sync=config(server, pull=False)) as store:
        assert store.sync.flush(timeout=10)
    target = live[1]["id"]
    with TaskStore.open(path) as store:
        store.tasks.update(target, {"note": "edited on the old file"})
    server.update_task(target, {"ownerId": "prac_elsewhere"})
    with TaskStore.open(path, sync=config(server)) as store:
        store.sync.pull()
        assert store.sync.flush(timeout=10)
        assert store.sync.conflicts() == []
        assert local_tasks(store) == server_tasks(server)
        assert server.tasks()[target]["note"] == "edited on the old file"
        assert server.tasks()[target]["ownerId"] == "prac_elsewhere"
