"""The bootstrap's prefetch thread: the next listing page is read while the current one is
applied, never on the writer's thread, and the thread ends cleanly on the last page, on
a failure, on an exception from the remote, when the store closes mid-bootstrap, and on
a 410 that starts a new bootstrap. A large bootstrap into a fresh store loads without
the search indexes and builds them with its last page (or when the store next opens
without pulling)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import apsw
import pytest

from clinik_local import ReferenceServer, TaskStore
from clinik_local.remotes.base import ListOutcome, Scope
from clinik_local.storage import replica
from clinik_local.storage.rows import BOOTSTRAP_BULK_MIN
from tests.derived import derived_problems
from tests.pull_support import REQUEST, Recorder, local_tasks, recorded, server_tasks


@pytest.fixture
def server() -> Iterator[ReferenceServer]:
    with ReferenceServer(token="prefetch-token") as srv:
        yield srv


def seed(server: ReferenceServer, count: int) -> None:
    server.put_tasks([{**REQUEST, "id": f"task_p{n:05d}", "note": f"n{n}"} for n in range(count)])


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "clinik-local-prefetch"]


def wait_until_no_prefetch_thread(timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while prefetch_threads():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


class ThreadRecorder(Recorder):
    """Records which thread asked for each listing page, and can raise or stall."""

    def __init__(self, server: ReferenceServer, **kw: Any) -> None:
        super().__init__(server, **kw)
        self.list_threads: list[str] = []
        self.raise_after: int | None = None
        self.stall: threading.Event | None = None

    def list_page(self, scope: Scope, cursor: str | None, limit: int) -> ListOutcome:
        self.list_threads.append(threading.current_thread().name)
        if self.raise_after is not None and len(self.lists) >= self.raise_after:
            raise RuntimeError("the remote broke")
        if self.stall is not None and self.lists:
            self.stall.wait(timeout=5)
        return super().list_page(scope, cursor, limit)


def test_listing_pages_are_read_on_the_prefetch_thread_and_it_ends_with_the_last_page(
    tmp_path: Path, server: ReferenceServer
) -> None:
    seed(server, 23)  # 5 pages of 5, the last one short
    remote = ThreadRecorder(server)
    with TaskStore.open(tmp_path / "a.db", sync=recorded(server, remote, pull_limit=5)) as a:
        a.sync.pull()
        assert local_tasks(a) == server_tasks(server)
        assert not a.sync.status().bootstrapping
        assert wait_until_no_prefetch_thread()
    # Never on the writer's thread (the caller of pull), never twice the same page.
    assert remote.list_threads == ["clinik-local-prefetch"] * 5
    assert len(set(remote.lists)) == len(remote.lists) == 5


def test_a_listing_failure_applies_every_page_before_it_and_ends_the_thread(
    tmp_path: Path, server: ReferenceServer
) -> None:
    seed(server, 12)
    path = tmp_path / "a.db"
    remote = ThreadRecorder(server)
    remote.fail_lists_after = 2
    with TaskStore.open(path, sync=recorded(server, remote, pull_limit=4)) as a:
        status = a.sync.pull()
        assert status.bootstrapping
        assert len(local_tasks(a)) == 8  # both pages read before the failure
        assert wait_until_no_prefetch_thread()
        with a._db.read() as conn:
            assert replica.read_state(conn).bootstrap_next == "task_p00007"
    again = ThreadRecorder(server)
    with TaskStore.open(path, sync=recorded(server, again, pull_limit=4)) as a:
        a.sync.pull()
        assert local_tasks(a) == server_tasks(server)
    assert again.lists == ["task_p00007"]  # resumed after the committed pages


def test_an_exception_from_the_remote_is_raised_on_the_writers_thread_after_earlier_pages(
    tmp_path: Path, server: ReferenceServer
) -> None:
    seed(server, 9)
    path = tmp_path / "a.db"
    remote = ThreadRecorder(server)
    remote.raise_after = 1
    with TaskStore.open(path, sync=recorded(server, remote, pull_limit=3)) as a:
        with pytest.raises(RuntimeError, match="the remote broke"):
            a.sync.pull()  # raised on the caller's thread, as without the prefetch
        assert len(local_tasks(a)) == 3  # the page before it is committed
        assert wait_until_no_prefetch_thread()
        remote.raise_after = None
        a.sync.pull()
        assert local_tasks(a) == server_tasks(server)


def test_closing_the_store_mid_bootstrap_stops_the_prefetch_thread_and_keeps_pages_whole(
    tmp_path: Path, server: ReferenceServer
) -> None:
    seed(server, 30)
    path = tmp_path / "a.db"
    remote = ThreadRecorder(server)
    remote.stall = threading.Event()  # every page after the first waits for the test
    store = TaskStore.open(path, sync=recorded(server, remote, pull_limit=5))
    store.sync.start()
    deadline = time.monotonic() + 10
    while len(local_tasks(store)) < 5:
        assert time.monotonic() < deadline, "the first page never landed"
        time.sleep(0.01)
    closer = threading.Thread(target=store.close)
    closer.start()
    time.sleep(0.1)
    remote.stall.set()  # the request under way finishes; its page is dropped
    closer.join(timeout=10)
    assert not closer.is_alive()
    assert wait_until_no_prefetch_thread()
    with TaskStore.open(path) as reopened:
        kept = local_tasks(reopened)
    assert len(kept) % 5 == 0  # whole pages only
    assert 5 <= len(kept) < 30
    resumed = ThreadRecorder(server)
    with TaskStore.open(path, sync=recorded(server, resumed, pull_limit=5)) as a:
        a.sync.pull()
        assert local_tasks(a) == server_tasks(server)
    assert resumed.lists[0] is not None  # resumed, not restarted


def test_a_410_bootstraps_again_through_the_prefetch_thread_keeping_pending_changes(
    tmp_path: Path, server: ReferenceServer
) -> None:
    seed(server, 7)
    remote = ThreadRecorder(server)
    with TaskStore.open(tmp_path / "a.db", sync=recorded(server, remote, pull_limit=3)) as a:
        a.sync.pull()
        remote.hold.add("task_p00001")
        a.tasks.update("task_p00001", {"note": "local edit"})
        server.delete_task("task_p00002")
        server.compact_log()  # the store's cursor is now older than the log: 410
        before = len(remote.list_threads)
        a.sync.pull()
        assert remote.list_threads[before:] == ["clinik-local-prefetch"] * 2  # 6 tasks left
        assert wait_until_no_prefetch_thread()
        tasks = local_tasks(a)
        assert "task_p00002" not in tasks
        assert tasks["task_p00001"]["note"] == "local edit"
        assert a.sync.status().pending == 1


# --- a large bootstrap into a fresh store loads without the search indexes ---------------


def index_sql(path: Path) -> dict[str, str]:
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        found = conn.execute(
            "SELECT name, sql FROM sqlite_schema WHERE type = 'index' AND sql IS NOT NULL"
        ).fetchall()
    finally:
        conn.close()
    return {str(n): str(s) for n, s in found}


def test_a_large_bootstrap_cut_midway_keeps_searching_and_builds_the_indexes_at_its_end(
    tmp_path: Path, server: ReferenceServer
) -> None:
    TaskStore.open(tmp_path / "fresh.db").close()
    full = index_sql(tmp_path / "fresh.db")
    seed(server, 2 * BOOTSTRAP_BULK_MIN + 7)  # three pages, the first one full
    path = tmp_path / "a.db"
    first = ThreadRecorder(server)
    first.fail_lists_after = 1
    with TaskStore.open(path, sync=recorded(server, first, pull_limit=BOOTSTRAP_BULK_MIN)) as a:
        assert a.sync.pull().bootstrapping
        dropped = set(full) - set(index_sql(path))
        assert "tasks_by_owner" in dropped  # committed with the first page
        page = a.tasks.search({"code": "lab-order"}, limit=5).data  # still answered
        assert len(page) == 5
        assert {t.code for t in page} == {"lab-order"}
        assert len(local_tasks(a)) == BOOTSTRAP_BULK_MIN
    resumed = ThreadRecorder(server)
    with TaskStore.open(path, sync=recorded(server, resumed, pull_limit=BOOTSTRAP_BULK_MIN)) as a:
        a.sync.pull()
        assert local_tasks(a) == server_tasks(server)
        assert not a.sync.status().bootstrapping
    assert resumed.lists[0] is not None  # resumed after the committed page
    assert index_sql(path) == full  # every index back, as schema.sql made it
    assert derived_problems(path) == []


def test_a_store_opened_without_pull_builds_the_indexes_a_cut_bootstrap_dropped(
    tmp_path: Path, server: ReferenceServer
) -> None:
    TaskStore.open(tmp_path / "fresh.db").close()
    seed(server, BOOTSTRAP_BULK_MIN + 1)
    path = tmp_path / "a.db"
    first = ThreadRecorder(server)
    first.fail_lists_after = 1
    with TaskStore.open(path, sync=recorded(server, first, pull_limit=BOOTSTRAP_BULK_MIN)) as a:
        a.sync.pull()
    assert index_sql(path) != index_sql(tmp_path / "fresh.db")
    with TaskStore.open(path) as store:  # no sync: the bootstrap will not finish now
        assert len(local_tasks(store)) == BOOTSTRAP_BULK_MIN
    assert index_sql(path) == index_sql(tmp_path / "fresh.db")


def test_a_small_bootstrap_or_one_into_a_store_with_tasks_keeps_the_indexes(
    tmp_path: Path, server: ReferenceServer
) -> None:
    seed(server, BOOTSTRAP_BULK_MIN + 1)
    path = tmp_path / "a.db"
    with TaskStore.open(path) as store:
        store.tasks.create({**REQUEST, "id": "task_local"})
    full = index_sql(path)
    first = ThreadRecorder(server)
    first.fail_lists_after = 1
    with TaskStore.open(path, sync=recorded(server, first, pull_limit=BOOTSTRAP_BULK_MIN)) as a:
        a.sync.pull()
        assert index_sql(path) == full  # not a fresh store: written through the indexes
