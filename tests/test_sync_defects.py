"""Defects of the sync engine found by use (issue 12 item 9), pinned.

Each test failed before its fix. Real files (tmp_path), the reference server on
127.0.0.1, a real second process for the lease, and small injected remotes
(``SyncConfig(remote=...)``) where a server behaviour the reference server does not
have (storing refusals, holding an answer back) is the point. The defects item 9 lists
that the two-way sync fixed have their tests beside that work:
``test_sync_rebase.py::test_edits_after_a_conflict_are_shown_and_survive_its_resolution``,
``test_sync_rebase.py::test_keep_remote_stores_a_server_copy_this_version_cannot_validate``,
``test_sync_pull.py::test_a_server_copy_with_unknown_fields_and_long_text_is_stored_and_the_pull_goes_on``,
``test_sync_pull.py::test_another_base_url_never_gets_the_old_servers_if_match`` and
``test_restore.py::test_a_retried_dead_letter_goes_under_a_new_key``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from clinik_local import StorageError, TaskStore, ValidationError
from clinik_local.remotes.base import Change, Delivered, PushOutcome, Refused, Scope
from clinik_local.remotes.clinik import ClinikRemote
from clinik_local.server import ReferenceServer
from clinik_local.storage import lease, outbox
from clinik_local.sync import SyncConfig, SyncStatus
from clinik_local.sync.lease import EngineLease
from tests.pull_support import REQUEST, local_tasks, server_tasks, wait_for
from tests.test_sync import make_config
from tests.test_sync_pull import seed

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def server() -> Iterator[ReferenceServer]:
    with ReferenceServer(token="tok-1") as srv:
        yield srv


def config(server: ReferenceServer, **kw: Any) -> SyncConfig:
    return make_config(server, lambda: server.token, **kw)


@pytest.fixture
def store(tmp_path: Path, server: ReferenceServer) -> Iterator[TaskStore]:
    with TaskStore.open(tmp_path / "s.db", sync=config(server)) as st:
        yield st


class GatedRemote(ClinikRemote):
    """The clinik remote, but the first push waits until the test opens the gate; it
    counts the pull side's reads."""

    def __init__(self, server: ReferenceServer) -> None:
        super().__init__(server.url, lambda: server.token, timeout=5)
        self.gate = threading.Event()
        self.waiting = threading.Event()
        self.first = True
        self.reads = 0

    def push(self, change: Change, *, lane: int) -> PushOutcome:
        if self.first:
            self.first = False
            self.waiting.set()
            self.gate.wait(10)
        return super().push(change, lane=lane)

    def list_page(self, scope: Scope, cursor: str | None, limit: int) -> Any:
        self.reads += 1
        return super().list_page(scope, cursor, limit)

    def changes_page(self, scope: Scope, since: str, limit: int) -> Any:
        self.reads += 1
        return super().changes_page(scope, since, limit)


# --- 1. one engine per file -------------------------------------------------------------------


def test_a_second_engine_on_the_file_stands_by_naming_the_holder_and_resets_nothing(
    tmp_path: Path, server: ReferenceServer
) -> None:
    path = tmp_path / "shared.db"
    gated = GatedRemote(server)
    first = TaskStore.open(path, sync=SyncConfig(remote=gated, backoff_base=0.001))
    task = first.tasks.create(REQUEST).data
    first.sync.start()
    assert gated.waiting.wait(10)  # the create is in flight in the first engine
    second = TaskStore.open(path, sync=config(server))
    try:
        status = second.sync.run_once()
        assert status.state == "standby"
        assert status.held_by is not None
        assert f"process {os.getpid()}" in status.held_by
        assert second.sync.status().in_flight == 1  # the first engine's row, untouched
        second.tasks.update(str(task.id), {"note": "edited while the create was in flight"})
        gated.gate.set()
        assert first.sync.flush(timeout=10)
        second.tasks.update(str(task.id), {"status": "accepted"})
        assert first.sync.flush(timeout=10)
    finally:
        gated.gate.set()
        first.close()
    assert second.sync.flush(timeout=10)  # the lease was released: this one takes over
    assert second.sync.status().conflicts == 0
    assert server.tasks()[str(task.id)]["status"] == "accepted"
    assert server.tasks()[str(task.id)]["note"] == "edited while the create was in flight"
    assert all(n == 1 for n in server.applied_counts().values())
    second.close()


def _lease_holder(store: TaskStore) -> str | None:
    """Who holds the store file's sync lease now (its row in meta), if anyone."""
    with store.read() as conn:
        found = lease.current(conn)
    return None if found is None else found.holder


def test_a_second_engine_on_the_file_pulls_nothing_while_the_first_holds_the_lease(
    tmp_path: Path, server: ReferenceServer
) -> None:
    path = tmp_path / "pulling.db"
    with TaskStore.open(path, sync=config(server)) as holder:
        holder.tasks.create(REQUEST)
        assert holder.sync.flush(timeout=10)
        holder.sync.start()  # a running worker keeps the lease...
        # ...once its first pass has taken it (flush left the state "idle" already).
        assert wait_for(lambda: _lease_holder(holder) == holder.sync._lease.holder)
        assert wait_for(lambda: holder.sync.status().state == "idle")
        seed(server, 12)
        other_remote = GatedRemote(server)
        other_remote.first = False
        with TaskStore.open(path, sync=SyncConfig(remote=other_remote, pull_limit=5)) as other:
            status = other.sync.pull()
            assert status.state == "standby"
            assert status.held_by is not None
            assert f"process {os.getpid()}" in status.held_by
            assert other.sync.flush(timeout=0.3) is False
            assert other_remote.reads == 0  # not one page read (let alone applied) here
            assert holder.sync.flush(timeout=10)
            assert local_tasks(holder) == server_tasks(server)


def test_a_late_answer_under_a_lost_lease_is_dropped_and_writes_no_version_back(
    tmp_path: Path, server: ReferenceServer
) -> None:
    path = tmp_path / "late.db"
    gated = GatedRemote(server)
    with TaskStore.open(path, sync=SyncConfig(remote=gated, backoff_base=0.001)) as store:
        task_id = str(store.tasks.create(REQUEST).data.id)
        worker = threading.Thread(target=store.sync.run_once, daemon=True)
        worker.start()
        assert gated.waiting.wait(10)  # the create is in flight...
        with store._db.write() as conn:  # ...when another engine takes the file over
            lease.write(
                conn,
                lease.Lease(
                    holder="eng_newer",
                    pid=1,
                    host="another-host",
                    acquired_at="2025-01-01T00:00:00.000Z",
                    expires_at="2999-01-01T00:00:00.000Z",
                ),
            )
            outbox.recover_in_flight(conn)
        gated.gate.set()
        worker.join(15)
        assert not worker.is_alive()
        status = store.sync.status()
        assert status.state == "standby"
        assert status.held_by is not None
        assert "another-host" in status.held_by
        assert status.pending == 1  # the answer was not recorded: the new holder resends
        with store.read() as conn:
            assert outbox.server_version_of(conn, task_id) is None
            assert lease.current(conn) is not None


def test_a_late_answer_for_a_row_no_longer_in_flight_changes_nothing(store: TaskStore) -> None:
    task = store.tasks.create(REQUEST).data
    db = store._db  # the storage seam itself: two engines' recordings, interleaved
    with db.read() as conn:
        (row,) = outbox.select_sendable(conn, 0, 10)
    with db.write() as conn:
        outbox.mark_in_flight(conn, [row.seq])
        assert outbox.still_in_flight(conn, [row.seq]) == {row.seq}
        outbox.recover_in_flight(conn)  # another engine took the row over
        assert outbox.still_in_flight(conn, [row.seq]) == set()
    before = store.table_counts()
    from clinik_local.sync import push, rebase

    with db.write() as conn:
        ctx = rebase.Context(scope=None, generation=0, pulls=False)
        done = push.record(
            db,
            conn,
            ctx,
            [push.Sent(row, Delivered(version="2"))],
            "2026-01-01T00:00:00.000Z",
            lambda r, o: 0.0,
            lambda s: "2026-01-01T00:00:00.000Z",
        )
    assert not done.delivered
    assert store.table_counts() == before
    assert store.tasks.get(str(task.id)).meta["syncState"] == "pending"


def _write_lease(store: TaskStore, **kw: Any) -> None:
    fields: dict[str, Any] = {
        "holder": "eng_other",
        "pid": 1,
        "host": "another-host",
        "acquired_at": "2025-01-01T00:00:00.000Z",
        "expires_at": "2999-01-01T00:00:00.000Z",
    }
    fields.update(kw)
    with store._db.write() as conn:
        lease.write(conn, lease.Lease(**fields))


def test_a_live_lease_of_another_host_is_respected_and_named(store: TaskStore) -> None:
    _write_lease(store)
    store.tasks.create(REQUEST)
    status = store.sync.run_once()
    assert status.state == "standby"
    assert status.held_by is not None
    assert "another-host" in status.held_by
    assert status.pending == 1
    assert store.sync.flush(timeout=0.3) is False


def test_an_expired_lease_is_taken_over_and_its_in_flight_rows_are_sent_again(
    store: TaskStore, server: ReferenceServer
) -> None:
    task = store.tasks.create(REQUEST).data
    with store._db.write() as conn:
        outbox.mark_in_flight(conn, [r.seq for r in outbox.select_sendable(conn, 0, 10)])
    _write_lease(store, expires_at="2001-01-01T00:00:00.000Z")
    assert store.sync.flush(timeout=10)
    assert str(task.id) in server.tasks()
    with store.read() as conn:
        assert lease.current(conn) is None  # released after the foreground flush


def test_the_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(
    store: TaskStore, server: ReferenceServer
) -> None:
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    dead_pid = int(child.stdout)
    _write_lease(store, pid=dead_pid, host=socket.gethostname())
    store.tasks.create(REQUEST)
    assert store.sync.flush(timeout=10)
    assert len(server.tasks()) == 1


def test_a_lease_left_by_an_unclosed_store_of_this_process_is_taken_over(
    store: TaskStore,
) -> None:
    gone = EngineLease(store._db)
    assert gone.acquire(lambda conn: None) is None
    gone.close()  # as if the engine vanished without releasing: write its lease back
    _write_lease(store, holder=gone.holder, pid=os.getpid(), host=socket.gethostname())
    store.tasks.create(REQUEST)
    assert store.sync.flush(timeout=10)


_CHILD = """
import sys, time
sys.path.insert(0, {root!r})
from clinik_local import TaskStore
from clinik_local.sync import SyncConfig
store = TaskStore.open({path!r}, sync=SyncConfig(base_url={url!r},
    token_provider=lambda: "wrong-token", backoff_base=0.001, backoff_cap=0.01))
store.sync.start()
while True:
    with store.read() as conn:
        if conn.execute("SELECT 1 FROM meta WHERE key = 'sync_lease'").fetchall():
            break
    time.sleep(0.01)
print("ready", flush=True)
time.sleep(120)
"""


def child_holding_the_lease(path: Path, server: ReferenceServer) -> subprocess.Popen[str]:
    """A real second process whose sync worker holds the lease (paused: wrong token)."""
    code = _CHILD.format(root=str(ROOT), path=str(path), url=server.url)
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    return child


def test_another_process_holding_the_lease_is_named_until_it_dies(
    tmp_path: Path, server: ReferenceServer
) -> None:
    path = tmp_path / "two-processes.db"
    with TaskStore.open(path) as plain:
        plain.tasks.create(REQUEST)
    child = child_holding_the_lease(path, server)
    try:
        with TaskStore.open(path, sync=config(server)) as store:
            status = store.sync.run_once()
            assert status.state == "standby"
            assert status.held_by is not None
            assert f"process {child.pid}" in status.held_by
            assert server.tasks() == {}
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=10)
            assert store.sync.flush(timeout=10)
            assert len(server.tasks()) == 1
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)
        for stream in (child.stdout, child.stderr):
            if stream is not None:
                stream.close()


# --- 2. a retried change goes under a new key --------------------------------------------------


class RefusalStoringRemote:
    """Stores every answer under its key and replays it, refusals too (the contract allows
    it); refuses each task in ``refuse`` with its status until removed from it."""

    def __init__(self) -> None:
        self.answers: dict[str, PushOutcome] = {}
        self.refuse: dict[str, int] = {}
        self.keys: list[str] = []

    def push(self, change: Change, *, lane: int) -> PushOutcome:
        self.keys.append(change.change_id)
        stored = self.answers.get(change.change_id)
        if stored is not None:
            return stored
        answer: PushOutcome
        if change.task_id in self.refuse:
            code = self.refuse[change.task_id]
            answer = Refused(status=code, body='{"error": {}}', error=f"HTTP {code}")
        else:
            answer = Delivered(version=str(len(self.answers) + 1))
        self.answers[change.change_id] = answer
        return answer

    def close(self) -> None:
        pass


def test_retry_of_a_refusal_the_server_stored_under_its_key_is_delivered(
    tmp_path: Path,
) -> None:
    remote = RefusalStoringRemote()
    remote.refuse["task_a"] = 422
    with TaskStore.open(tmp_path / "r.db", sync=SyncConfig(remote=remote)) as store:
        store.tasks.create({**REQUEST, "id": "task_a"})
        assert store.sync.flush(timeout=5)
        (letter,) = store.sync.dead_letters()
        del remote.refuse["task_a"]  # the server's data was fixed
        new_id = store.sync.retry(letter.change_id)
        assert new_id != letter.change_id
        assert store.sync.flush(timeout=5)
        assert store.sync.dead_letters() == []
        assert store.tasks.get("task_a").meta["syncState"] == "synced"
    assert remote.keys == [letter.change_id, new_id]


def test_retry_all_and_discard_all_filter_by_status(tmp_path: Path) -> None:
    remote = RefusalStoringRemote()
    remote.refuse.update({"task_a": 422, "task_b": 409, "task_c": 409})
    with TaskStore.open(tmp_path / "r.db", sync=SyncConfig(remote=remote)) as store:
        for task_id in remote.refuse:
            store.tasks.create({**REQUEST, "id": task_id})
        assert store.sync.flush(timeout=5)
        assert len(store.sync.dead_letters()) == 3
        remote.refuse.clear()
        assert store.sync.discard_all(status=409) == 2
        assert store.sync.retry_all(status=409) == 0
        assert store.sync.retry_all() == 1
        assert store.sync.flush(timeout=5)
        assert store.sync.dead_letters() == []
        assert store.tasks.get("task_a").meta["syncState"] == "synced"
        assert store.tasks.get("task_b").meta["syncState"] == "local-only"
        with pytest.raises(ValidationError) as info:
            store.sync.discard_all(status=99)
        assert info.value.paths == ("status",)


# --- 3. a discarded create leaves the task local-only --------------------------------------------


def test_a_discarded_create_is_local_only_and_its_next_edit_goes_as_a_create(
    store: TaskStore, server: ReferenceServer
) -> None:
    server.faults.reject_ids = {"task_x"}
    store.tasks.create({**REQUEST, "id": "task_x"})
    assert store.sync.flush(timeout=10)
    (letter,) = store.sync.dead_letters()
    store.sync.discard(letter.change_id)
    assert store.tasks.get("task_x").meta["syncState"] == "local-only"
    server.faults.reject_ids = set()
    store.tasks.update("task_x", {"note": "now it can go"})
    assert store.sync.flush(timeout=10)
    assert store.tasks.get("task_x").meta["syncState"] == "synced"
    assert [m for _, t, m in server.applied_log() if t == "task_x"] == ["POST"]
    assert server.tasks()["task_x"]["note"] == "now it can go"


# --- 4. callbacks may close the store or run a pass ---------------------------------------------


def test_store_close_from_a_status_callback_does_not_deadlock(
    store: TaskStore,
) -> None:
    closed = threading.Event()

    def on_status(status: SyncStatus) -> None:
        if status.state == "idle" and status.pending == 0 and not closed.is_set():
            store.close()
            closed.set()

    store.sync.on_status_change(on_status)
    store.tasks.create(REQUEST)
    store.sync.start()
    assert closed.wait(10)
    assert store.closed
    assert wait_for(lambda: not store.sync.running)


def test_run_once_from_a_status_callback_does_not_deadlock(store: TaskStore) -> None:
    results: list[SyncStatus] = []

    def on_status(status: SyncStatus) -> None:
        if not results:
            results.append(store.sync.run_once())

    store.sync.on_status_change(on_status)
    store.tasks.create(REQUEST)
    flusher = threading.Thread(target=store.sync.flush, kwargs={"timeout": 10}, daemon=True)
    flusher.start()
    flusher.join(15)
    assert not flusher.is_alive()
    assert len(results) == 1
    assert store.sync.status().pending == 0


def test_callbacks_have_seen_the_final_status_when_run_once_returns(store: TaskStore) -> None:
    seen: list[SyncStatus] = []
    store.sync.on_status_change(seen.append)
    store.tasks.create(REQUEST)
    final = store.sync.run_once()
    assert seen
    assert (seen[-1].pending, seen[-1].state) == (final.pending, final.state)


# --- 5. start() on a closed store ----------------------------------------------------------------


def test_start_on_a_closed_store_raises_the_store_is_closed(store: TaskStore) -> None:
    store.close()
    with pytest.raises(StorageError, match="the store is closed"):
        store.sync.start()
    assert not store.sync.running


# --- 6. a token no HTTP header can carry ---------------------------------------------------------


@pytest.mark.parametrize("bad", ["tok-1\n", " tok-1", "tok\u00e9"])
def test_a_token_with_a_newline_or_other_bad_character_ends_in_auth_required(
    tmp_path: Path, server: ReferenceServer, bad: str
) -> None:
    cfg = make_config(server, lambda: bad)
    with TaskStore.open(tmp_path / "t.db", sync=cfg) as store:
        store.tasks.create(REQUEST)
        assert store.sync.flush(timeout=5) is False
        status = store.sync.status()
        assert status.state == "auth_required"
        assert status.last_error is not None
        assert "token" in status.last_error
        assert "tok-1" not in status.last_error
        assert "tok\u00e9" not in status.last_error
        assert status.pending == 1


# --- 7. last_error cleared on success; last_success_at kept across reopening ------------------


def test_last_error_is_cleared_by_the_next_delivery_and_last_success_survives_reopen(
    tmp_path: Path, server: ReferenceServer
) -> None:
    path = tmp_path / "s.db"
    server.faults.script = ["error_5xx"]
    with TaskStore.open(path, sync=config(server)) as store:
        store.tasks.create(REQUEST)
        first = store.sync.run_once()
        assert first.last_error is not None
        assert first.last_error.startswith("HTTP 5")
        assert store.sync.flush(timeout=10)
        status = store.sync.status()
        assert status.last_error is None
        assert status.last_success_at is not None
    with TaskStore.open(path, sync=config(server)) as again:
        assert again.sync.status().last_success_at == status.last_success_at


def test_last_error_of_a_failed_pull_is_cleared_by_the_next_complete_pull(
    store: TaskStore, server: ReferenceServer
) -> None:
    server.faults.read_script = ["error_5xx"]
    failed = store.sync.pull()
    assert failed.last_error is not None
    assert store.sync.flush(timeout=10)
    assert store.sync.status().last_error is None


@pytest.mark.parametrize("timeout", ["30", None, True, -1, float("nan")])
def test_flush_refuses_a_timeout_that_is_no_number_of_seconds_naming_it(
    store: TaskStore, timeout: Any
) -> None:
    store.tasks.create(REQUEST)
    with store.read() as conn:
        before = conn.execute("SELECT count(*) FROM outbox").fetchall()
    with pytest.raises(ValidationError) as caught:
        store.sync.flush(timeout=timeout)
    assert [e.path for e in caught.value.errors] == ["timeout"]
    with store.read() as conn:
        assert conn.execute("SELECT count(*) FROM outbox").fetchall() == before
