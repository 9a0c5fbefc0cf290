"""Two-way sync, the pull side, against the reference server on 127.0.0.1: bootstrap (and
its resume after a kill), the change log, 410, scopes, own changes, unusual server copies,
read faults, and a store that changes service."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from clinik_local import ReferenceServer, SyncConfig, TaskStore, ValidationError
from clinik_local.server import Faults
from tests.derived import derived_problems
from tests.pull_support import (
    REQUEST,
    Recorder,
    config,
    local_tasks,
    meta_value,
    recorded,
    server_tasks,
)

HERE = Path(__file__).parent


@pytest.fixture
def server() -> Iterator[ReferenceServer]:
    with ReferenceServer(token="pull-token") as srv:
        yield srv


def seed(server: ReferenceServer, count: int, **fields: Any) -> list[str]:
    """``count`` tasks written on the server by another client; their ids."""
    return [
        str(server.put_task({**REQUEST, "id": f"task_s{n:05d}", "note": f"n{n}", **fields})["id"])
        for n in range(count)
    ]


# --- configuration ------------------------------------------------------------------------


def test_scope_refuses_unknown_filters_and_values_naming_each(server: ReferenceServer) -> None:
    with pytest.raises(ValidationError) as info:
        config(server, scope={"owner": "me", "status": ["requested", "bogus"], "code": ""})
    assert set(info.value.paths) == {"scope.owner", "scope.status[1]", "scope.code[0]"}
    with pytest.raises(ValidationError):
        config(server, scope={"ownerId": ["a,b"]})  # a comma means "or" on the wire
    with pytest.raises(ValidationError):
        config(server, scope=["ownerId"])
    assert config(server, scope={"ownerId": "me"}).scope == {"ownerId": ("me",)}


def test_a_push_only_remote_syncs_one_way_and_refuses_a_scope() -> None:
    class PushOnly:
        def push(self, change: object, *, lane: int) -> object:
            raise AssertionError("not called")

        def close(self) -> None:
            pass

    assert not SyncConfig(remote=PushOnly()).pulls  # type: ignore[arg-type]
    with pytest.raises(ValidationError) as info:
        SyncConfig(remote=PushOnly(), scope={"ownerId": "me"})  # type: ignore[arg-type]
    assert info.value.paths == ("scope",)


# --- bootstrap and the log -------------------------------------------------------------------


def test_two_stores_converge_through_the_server(tmp_path: Path, server: ReferenceServer) -> None:
    seed(server, 5)
    with (
        TaskStore.open(tmp_path / "a.db", sync=config(server)) as a,
        TaskStore.open(tmp_path / "b.db", sync=config(server)) as b,
    ):
        made = a.tasks.create({**REQUEST, "note": "from a"}).data
        assert a.sync.flush(timeout=10)
        assert b.sync.flush(timeout=10)
        assert b.tasks.get(str(made.id)).data.note == "from a"
        b.tasks.update(str(made.id), {"status": "accepted"})
        b.tasks.delete("task_s00001")
        assert b.sync.flush(timeout=10)
        assert a.sync.flush(timeout=10)
        assert a.tasks.get(str(made.id)).data.status.value == "accepted"
        assert local_tasks(a) == local_tasks(b) == server_tasks(server)
        assert "task_s00001" not in local_tasks(a)
        status = a.sync.status()
        assert not status.bootstrapping
        assert status.last_pull_at is not None
        assert status.tasks_pulled >= 6
        history = a.tasks.history(str(made.id)).data
        assert [h.origin for h in history] == ["local", "server"]
    # Server copies keep the derived search rows in step, as local edits do.
    assert derived_problems(tmp_path / "a.db") == []
    assert derived_problems(tmp_path / "b.db") == []


def test_a_running_engine_keeps_current_by_the_pull_interval(
    tmp_path: Path, server: ReferenceServer
) -> None:
    with TaskStore.open(tmp_path / "a.db", sync=config(server, pull_interval=0.05)) as a:
        assert a.sync.flush(timeout=10)
        a.sync.start()
        server.put_task({**REQUEST, "id": "task_later", "note": "written at the clinic"})
        deadline = time.monotonic() + 10
        while "task_later" not in local_tasks(a):
            assert time.monotonic() < deadline
            time.sleep(0.02)


def test_each_log_page_is_applied_with_its_cursor_and_applying_it_twice_changes_nothing(
    tmp_path: Path, server: ReferenceServer
) -> None:
    remote = Recorder(server)
    with TaskStore.open(tmp_path / "a.db", sync=recorded(server, remote, pull_limit=3)) as a:
        assert a.sync.flush(timeout=10)
        ids = seed(server, 7)
        server.update_task(ids[0], {"note": "again"})
        server.delete_task(ids[1])
        a.sync.pull()
        after = local_tasks(a)
        assert after == server_tasks(server)
        with a.read() as conn:
            cursor = conn.execute("SELECT value FROM meta WHERE key = 'sync.cursor'").fetchall()
        # Apply the last page again (as a crash before its commit would): nothing changes.
        last_since = remote.logs[-1]
        with a._db.write() as conn:
            conn.execute("UPDATE meta SET value = ? WHERE key = 'sync.cursor'", (last_since,))
        history_before = sum(len(a.tasks.history(i).data) for i in after)
        a.sync.pull()
        assert local_tasks(a) == after
        assert sum(len(a.tasks.history(i).data) for i in after) == history_before
        with a.read() as conn:
            again = conn.execute("SELECT value FROM meta WHERE key = 'sync.cursor'").fetchall()
        assert again == cursor


@pytest.mark.parametrize("pages_before_the_cut", [0, 1, 2, 3, 4])
def test_a_bootstrap_cut_at_a_page_boundary_resumes_after_the_last_committed_page(
    tmp_path: Path, server: ReferenceServer, pages_before_the_cut: int
) -> None:
    seed(server, 10)  # 4 pages of 3 (the last one short)
    path = tmp_path / "a.db"
    first = Recorder(server)
    first.fail_lists_after = pages_before_the_cut
    with TaskStore.open(path, sync=recorded(server, first, pull_limit=3)) as a:
        a.sync.run_once()  # the network goes after that many pages
        committed = len(local_tasks(a))
    assert committed == min(3 * pages_before_the_cut, 10)
    server.put_task({**REQUEST, "id": "task_s00002", "note": "changed mid-bootstrap"})
    second = Recorder(server)
    with TaskStore.open(path, sync=recorded(server, second, pull_limit=3)) as a:
        assert a.sync.flush(timeout=10)
        assert local_tasks(a) == server_tasks(server)
        assert not a.sync.status().bootstrapping
    if 0 < pages_before_the_cut < 4:
        assert second.lists[0] is not None  # resumed: no first page again
        assert len(second.lists) == 4 - pages_before_the_cut
    elif pages_before_the_cut == 0:
        assert second.lists[0] is None


def test_a_bootstrap_killed_with_sigkill_resumes_after_the_last_committed_page(
    tmp_path: Path, server: ReferenceServer
) -> None:
    seed(server, 60)
    path = tmp_path / "killed.db"
    server.faults.read_rate = 1.0
    server.faults.read_kinds = ("slow",)
    server.faults.slow_seconds = 0.15
    child = subprocess.Popen(
        [sys.executable, str(HERE / "pull_child.py"), str(path), server.url, server.token],
        env={**os.environ, "PYTHONPATH": str(HERE.parent)},
    )
    try:
        deadline = time.monotonic() + 30
        progress: str | None = None
        while progress is None:
            assert time.monotonic() < deadline, "the child never committed a page"
            assert child.poll() is None, "the child ended before it was killed"
            progress = meta_value(path, "sync.bootstrap.next")
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
    server.faults.read_rate = 0.0
    with TaskStore.open(path) as store:
        kept = len(local_tasks(store))
    assert 0 < kept < 60
    resumed = Recorder(server)
    with TaskStore.open(path, sync=recorded(server, resumed, pull_limit=5)) as store:
        assert store.sync.flush(timeout=20)
        assert local_tasks(store) == server_tasks(server)
    assert resumed.lists
    assert resumed.lists[0] is not None  # resumed, not restarted
    assert resumed.lists[0] >= progress  # from the committed cursor or later


def test_410_bootstraps_again_keeping_pending_changes_and_dropping_deleted_tasks(
    tmp_path: Path, server: ReferenceServer
) -> None:
    ids = seed(server, 4)
    remote = Recorder(server)
    with TaskStore.open(tmp_path / "a.db", sync=recorded(server, remote)) as a:
        assert a.sync.flush(timeout=10)
        remote.hold.add(ids[0])  # this device's edit cannot be delivered yet
        a.tasks.update(ids[0], {"note": "edited offline"})
        a.sync.run_once()
        server.delete_task(ids[1])  # ... while the log it would learn that from expires
        server.update_task(ids[2], {"ownerId": "prac_other"})
        server.compact_log(keep_last=0)
        lists_before = remote.lists.count(None)
        a.sync.pull()
        assert remote.lists.count(None) == lists_before + 1  # bootstrapped again
        assert ids[1] not in local_tasks(a)  # deleted on the server: not kept
        assert a.tasks.get(ids[2]).data.owner_id == "prac_other"
        assert a.tasks.get(ids[0]).data.note == "edited offline"
        assert a.tasks.get(ids[0]).meta["syncState"] == "pending"
        remote.hold.clear()
        assert a.sync.flush(timeout=10)
        assert server.tasks()[ids[0]]["note"] == "edited offline"
        assert local_tasks(a) == server_tasks(server)


def test_a_task_handed_out_of_the_scope_is_removed_locally(
    tmp_path: Path, server: ReferenceServer
) -> None:
    seed(server, 2, ownerId="prac_me")
    seed_other = server.put_task({**REQUEST, "id": "task_theirs", "ownerId": "prac_other"})
    scope = {"ownerId": "prac_me"}
    with TaskStore.open(tmp_path / "a.db", sync=config(server, scope=scope)) as a:
        assert a.sync.flush(timeout=10)
        assert sorted(local_tasks(a)) == ["task_s00000", "task_s00001"]
        assert seed_other["id"] not in local_tasks(a)
        server.update_task("task_s00000", {"ownerId": "prac_other"})  # handed off there
        a.tasks.update("task_s00001", {"ownerId": "prac_other"})  # ... and here
        assert a.sync.flush(timeout=10)
        assert local_tasks(a) == {}
        server.update_task("task_theirs", {"ownerId": "prac_me"})  # handed to me
        assert a.sync.flush(timeout=10)
        assert sorted(local_tasks(a)) == ["task_theirs"]


def test_a_task_out_of_the_scope_with_undelivered_changes_stays_until_delivered(
    tmp_path: Path, server: ReferenceServer
) -> None:
    seed(server, 1, ownerId="prac_me")
    remote = Recorder(server)
    cfg = recorded(server, remote, scope={"ownerId": "prac_me"})
    with TaskStore.open(tmp_path / "a.db", sync=cfg) as a:
        assert a.sync.flush(timeout=10)
        remote.hold.add("task_s00000")
        a.tasks.update("task_s00000", {"note": "mine, not delivered"})
        server.update_task("task_s00000", {"ownerId": "prac_other"})
        a.sync.run_once()
        assert a.tasks.get("task_s00000").data.note == "mine, not delivered"
        remote.hold.clear()
        assert a.sync.flush(timeout=10)
        assert server.tasks()["task_s00000"]["note"] == "mine, not delivered"
        assert local_tasks(a) == {}


def test_another_scope_on_reopen_bootstraps_it_and_removes_tasks_outside(
    tmp_path: Path, server: ReferenceServer
) -> None:
    seed(server, 2, ownerId="prac_me")
    server.put_task({**REQUEST, "id": "task_lab", "ownerId": "prac_lab"})
    path = tmp_path / "a.db"
    with TaskStore.open(path, sync=config(server)) as a:
        assert a.sync.flush(timeout=10)
        assert len(local_tasks(a)) == 3
        a.tasks.create({**REQUEST, "id": "task_pending", "ownerId": "prac_lab"})
    remote = Recorder(server)
    remote.hold.add("task_pending")
    with TaskStore.open(path, sync=recorded(server, remote, scope={"ownerId": "prac_me"})) as a:
        assert a.sync.status().bootstrapping
        a.sync.pull()
        assert sorted(local_tasks(a)) == ["task_pending", "task_s00000", "task_s00001"]
        remote.hold.clear()
        assert a.sync.flush(timeout=10)
        assert sorted(local_tasks(a)) == ["task_s00000", "task_s00001"]  # delivered, out
        assert "task_pending" in server.tasks()


def test_own_changes_coming_back_in_the_log_never_flicker(
    tmp_path: Path, server: ReferenceServer
) -> None:
    with TaskStore.open(tmp_path / "a.db", sync=config(server)) as a:
        assert a.sync.flush(timeout=10)
        task_id = str(a.tasks.create({**REQUEST, "note": "v1"}).data.id)
        for n in range(2, 6):
            a.tasks.update(task_id, {"note": f"v{n}"})
            assert a.sync.flush(timeout=10)  # delivered; the log brings each one back
        seen: list[str | None] = []
        a.tasks.watch(lambda event: seen.append(a.tasks.get(task_id).data.note))
        a.sync.pull()
        assert a.tasks.get(task_id).data.note == "v5"
        history = a.tasks.history(task_id).data
        assert {h.origin for h in history} == {"local"}  # no server copy written back
        assert all(note == "v5" for note in seen)
        assert server.tasks()[task_id]["note"] == "v5"


@pytest.mark.parametrize("pull_limit", [1, 2])
def test_a_task_deleted_here_never_comes_back_from_log_pages_older_than_the_delete(
    tmp_path: Path, server: ReferenceServer, pull_limit: int
) -> None:
    # create, update and delete all delivered before the pull reads them back; pages of
    # one or two items end before the delete's item, and must not bring the task back.
    with TaskStore.open(tmp_path / "a.db", sync=config(server, pull_limit=pull_limit)) as a:
        assert a.sync.flush(timeout=10)
        task_id = str(a.tasks.create({**REQUEST, "note": "made"}).data.id)
        a.tasks.update(task_id, {"note": "edited"})
        a.tasks.delete(task_id)
        events: list[tuple[str, ...]] = []
        a.tasks.watch(lambda event: None if event.local else events.append(event.task_ids))
        assert a.sync.flush(timeout=10)
        assert [(h.op, h.origin) for h in a.tasks.history(task_id).data] == [
            ("create", "local"),
            ("update", "local"),
            ("delete", "local"),
        ]
        assert events == []  # no server copy written, so no pulled change announced
        assert a.table_counts()["sync_bases"] == 0  # the log's delete cleared the tombstone
        assert server.tasks() == {}


def delivered_task(store: TaskStore) -> str:
    """A task created on ``store`` and delivered (the log read past it); its id."""
    assert store.sync.flush(timeout=10)
    task_id = str(store.tasks.create({**REQUEST, "note": "made"}).data.id)
    assert store.sync.flush(timeout=10)
    return task_id


def test_a_delete_answered_404_leaves_the_task_to_the_log_which_may_bring_it_back(
    tmp_path: Path, server: ReferenceServer
) -> None:
    # Another device deleted the task first (404: nothing applied here, so no tombstone)
    # and then created it again: the log's items after the foreign delete still apply.
    with TaskStore.open(tmp_path / "a.db", sync=config(server, pull_limit=1)) as a:
        task_id = delivered_task(a)
        server.delete_task(task_id)
        a.tasks.delete(task_id)
        server.faults.read_script = ["error_5xx"]  # the pull after the push fails once
        a.sync.run_once()
        assert a.sync.status().pending == 0  # the DELETE was answered 404: delivered
        server.put_task({**REQUEST, "id": task_id, "note": "again"})
        assert a.sync.flush(timeout=10)
        assert a.tasks.get(task_id).data.note == "again"
        assert local_tasks(a) == server_tasks(server)


def test_a_conflict_resolved_by_keeping_the_local_delete_never_brings_the_task_back(
    tmp_path: Path, server: ReferenceServer
) -> None:
    with TaskStore.open(tmp_path / "a.db", sync=config(server, pull_limit=1)) as a:
        task_id = delivered_task(a)
        server.update_task(task_id, {"note": "theirs"})
        a.tasks.delete(task_id)
        server.faults.read_script = ["error_5xx"]  # the log is not read before the resolve
        a.sync.run_once()  # the DELETE meets the update: 412, a conflict
        (conflict,) = a.sync.conflicts()
        a.sync.resolve(conflict.task_id, keep="local")
        assert a.sync.flush(timeout=10)
        assert server.tasks() == {}
        assert [h.origin for h in a.tasks.history(task_id).data].count("server") == 0
        assert a.table_counts()["sync_bases"] == 0


def test_an_answer_lost_after_the_server_applied_it_is_settled_by_the_log(
    tmp_path: Path, server: ReferenceServer
) -> None:
    with TaskStore.open(tmp_path / "a.db", sync=config(server)) as a:
        assert a.sync.flush(timeout=10)
        made = a.tasks.create({**REQUEST, "note": "once"}).data
        server.faults.script = ["drop_after"]
        assert a.sync.flush(timeout=10)
        assert list(server.applied_counts().values()) == [1]
        assert a.tasks.get(str(made.id)).meta["syncState"] == "synced"
        a.tasks.update(str(made.id), {"note": "twice"})  # If-Match on the applied version
        assert a.sync.flush(timeout=10)
        assert server.tasks()[str(made.id)]["note"] == "twice"
        assert a.sync.status().conflicts == 0


# --- server copies this version cannot validate ---------------------------------------------


def test_a_server_copy_with_unknown_fields_and_long_text_is_stored_and_the_pull_goes_on(
    tmp_path: Path, server: ReferenceServer
) -> None:
    odd = {
        **REQUEST,
        "id": "task_odd",
        "description": "x" * 40_000,  # over the local limit
        "futureField": {"from": "a newer server"},
    }
    server.put_task(odd, validate=False)
    server.put_task({**REQUEST, "id": "task_normal", "note": "after the odd one"})
    with TaskStore.open(tmp_path / "a.db", sync=config(server)) as a:
        assert a.sync.flush(timeout=10)
        assert a.tasks.get("task_normal").data.note == "after the odd one"
        got = a.tasks.get("task_odd").data
        assert got.description == "x" * 40_000
        with a.read() as conn:
            [(body_text,)] = conn.execute("SELECT body FROM tasks WHERE id = 'task_odd'")
            [(base_text,)] = conn.execute("SELECT body FROM sync_bases WHERE task_id = 'task_odd'")
        body, base = json.loads(str(body_text)), json.loads(str(base_text))
        assert body["futureField"] == {"from": "a newer server"}
        assert body["description"] == "x" * 40_000
        assert {k: v for k, v in base.items() if k not in ("versionId", "lastModified")} == {**odd}
        server.update_task("task_odd", {"note": "pulled on top"}, validate=False)
        assert a.sync.flush(timeout=10)
        assert a.tasks.get("task_odd").data.note == "pulled on top"
        assert [t.id for t in a.tasks.search(text="pulled").data] == ["task_odd"]
    assert derived_problems(tmp_path / "a.db") == []


def test_a_local_edit_of_a_task_with_unknown_fields_pushes_them_back(
    tmp_path: Path, server: ReferenceServer
) -> None:
    server.put_task({**REQUEST, "id": "task_new", "futureField": [1, 2]}, validate=False)
    remote = Recorder(server)
    with TaskStore.open(tmp_path / "a.db", sync=recorded(server, remote)) as a:
        assert a.sync.flush(timeout=10)
        a.tasks.update("task_new", {"note": "edited here"})
        a.sync.run_once()  # this reference server refuses the field (422): it is sent
        [change] = [c for c in remote.pushed if c.task_id == "task_new"]
        assert change.body is not None
        assert change.body["futureField"] == [1, 2]
        assert change.body["note"] == "edited here"


# --- faults -----------------------------------------------------------------------------------


def test_read_faults_still_converge(tmp_path: Path, server: ReferenceServer) -> None:
    seed(server, 30)
    server.faults = Faults(
        read_rate=0.35,
        read_kinds=("drop_before", "drop_after", "error_5xx", "rate_limit", "short_page"),
        seed=5,
    )
    with (
        TaskStore.open(tmp_path / "a.db", sync=config(server, pull_limit=4, timeout=1.0)) as a,
        TaskStore.open(tmp_path / "b.db", sync=config(server, pull_limit=7, timeout=1.0)) as b,
    ):
        for n in range(10):
            a.tasks.create({**REQUEST, "note": f"a{n}"})
            server.update_task(f"task_s{n:05d}", {"note": f"s{n}"})
        deadline = time.monotonic() + 30
        while not b.sync.flush(timeout=2):
            assert time.monotonic() < deadline
        b.tasks.update("task_s00020", {"status": "accepted"})
        for store in (a, b, a):
            deadline = time.monotonic() + 30
            while not store.sync.flush(timeout=2):
                assert time.monotonic() < deadline
        assert local_tasks(a) == local_tasks(b) == server_tasks(server)
        assert sum(server.faults.injected_reads.values()) >= 5


# --- another service ------------------------------------------------------------------------


def test_another_base_url_never_gets_the_old_servers_if_match(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    with ReferenceServer(token="old") as old, TaskStore.open(path, sync=config(old)) as a:
        made = a.tasks.create({**REQUEST, "note": "on the old server"}).data
        assert a.sync.flush(timeout=10)
    with ReferenceServer(token="new") as new, TaskStore.open(path) as plain:
        plain.tasks.update(str(made.id), {"note": "edited between servers"})
        plain.close()
        with TaskStore.open(path, sync=config(new)) as a:
            assert a.sync.flush(timeout=10)
            status = a.sync.status()
            assert (status.dead, status.conflicts) == (0, 0)
            assert new.tasks()[str(made.id)]["note"] == "edited between servers"
            assert local_tasks(a) == server_tasks(new)
