"""Issue 12, "Show it - Resume": a bootstrap of 5,000 tasks cut at every page boundary.

The reference server (127.0.0.1) holds 5,000 tasks, seeded in one transaction on the
server side (``ReferenceServer.put_tasks``); stores bootstrap them in pages of 500 (10
pages). For every k in 0..10 a real store file is cut after k committed pages (the
network goes), then a new engine on the file resumes: it reads only the pages after the
k-th, and ends equal to the server field by field. A page read again (its progress
rewound, as a crash between the read and the next commit would leave it) is applied
into exactly the same state, byte for byte; after the resume every task has exactly one
history row and one version (no page was applied twice into another state). A variant
SIGKILLs a real child process bootstrapping the same data at a random page.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import apsw
import pytest

from clinik_local import ReferenceServer, TaskStore
from tests.pull_support import REQUEST, Recorder, local_tasks, recorded, server_tasks

HERE = Path(__file__).resolve().parent
COUNT = 5_000
LIMIT = 500
PAGES = COUNT // LIMIT

Snapshot = dict[str, list[tuple[Any, ...]]]


def _task(n: int) -> dict[str, Any]:
    task: dict[str, Any] = {
        **REQUEST,
        "id": f"task_r{n:05d}",
        "note": f"seeded {n}",
        "patientId": f"pt_{n % 97}",
        "ownerId": f"prac_{n % 7}",
    }
    if n % 3 == 0:
        task["priority"] = ("routine", "urgent", "asap", "stat")[n % 4]
    if n % 5 == 0:
        task["description"] = f"task {n} " + "x" * (n % 40)
    return task


@pytest.fixture(scope="module")
def server() -> Iterator[ReferenceServer]:
    with ReferenceServer(token="resume-token") as srv:
        assert srv.put_tasks(_task(n) for n in range(COUNT)) == COUNT
        yield srv


@pytest.fixture(scope="module")
def expected(server: ReferenceServer) -> dict[str, dict[str, Any]]:
    """The server's tasks, field by field (the server does not change in this module)."""
    tasks = server_tasks(server)
    assert len(tasks) == COUNT
    return tasks


def snapshot(store: TaskStore) -> Snapshot:
    """Every row a bootstrap page writes, as stored (bytes compared, not decoded)."""
    with store.read() as conn:
        return {
            "tasks": conn.execute("SELECT id, version, body FROM tasks ORDER BY id").fetchall(),
            "history": conn.execute(
                "SELECT task_id, version, op, body, override_reason FROM task_history "
                "ORDER BY task_id, version"
            ).fetchall(),
            "bases": conn.execute(
                "SELECT task_id, version_id, body, unseen, listed FROM sync_bases ORDER BY task_id"
            ).fetchall(),
            "versions": conn.execute(
                "SELECT task_id, server_version, server_modified FROM task_sync ORDER BY task_id"
            ).fetchall(),
            "outbox": conn.execute("SELECT * FROM outbox").fetchall(),
            "progress": conn.execute(
                "SELECT key, value FROM meta WHERE key IN ('sync.bootstrap.next', "
                "'sync.bootstrap.changes', 'sync.cursor', 'sync.generation') ORDER BY key"
            ).fetchall(),
        }


def history_per_task(store: TaskStore) -> set[tuple[int, int]]:
    """The distinct (history rows, highest version) pairs over all tasks."""
    with store.read() as conn:
        return {
            (int(n), int(top))
            for n, top in conn.execute(
                "SELECT count(*), max(version) FROM task_history GROUP BY task_id"
            )
        }


def task_count(store: TaskStore) -> int:
    with store.read() as conn:
        return int(str(conn.execute("SELECT count(*) FROM tasks").fetchall()[0][0]))


def rewind_one_page(store: TaskStore, read_from: str) -> None:
    """Put the bootstrap's progress back to before its last committed page (read from
    ``read_from``), as if that page's commit had been lost."""
    with store._db.write() as conn:
        found = dict(conn.execute("SELECT key, value FROM meta WHERE key LIKE 'sync.%'"))
        if "sync.bootstrap.changes" not in found:  # the bootstrap was complete
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('sync.bootstrap.changes', ?)",
                (found["sync.cursor"],),
            )
            conn.execute("DELETE FROM meta WHERE key = 'sync.cursor'")
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('sync.bootstrap.next', ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (read_from,),
        )


def cut_after(path: Path, server: ReferenceServer, pages: int) -> Recorder:
    """Bootstrap into ``path`` until the network goes after ``pages`` listing pages."""
    remote = Recorder(server)
    remote.fail_lists_after = pages
    with TaskStore.open(path, sync=recorded(server, remote, pull_limit=LIMIT)) as store:
        store.sync.run_once()
        assert task_count(store) == min(pages * LIMIT, COUNT)
        assert store.sync.status().bootstrapping == (pages < PAGES)
    assert len(remote.lists) == min(pages, PAGES)
    return remote


@pytest.mark.parametrize("pages", range(PAGES + 1))
def test_a_bootstrap_of_5000_cut_after_each_page_resumes_there_and_ends_equal(
    tmp_path: Path, server: ReferenceServer, expected: dict[str, dict[str, Any]], pages: int
) -> None:
    path = tmp_path / "resume.db"
    first = cut_after(path, server, pages)

    if pages >= 2:
        # The last committed page read again (its progress rewound to the cursor it was
        # read from): applied into exactly the same state.
        with TaskStore.open(path) as store:
            before = snapshot(store)
            rewind_one_page(store, str(first.lists[-1]))
        again = Recorder(server)
        again.fail_lists_after = 1
        with TaskStore.open(path, sync=recorded(server, again, pull_limit=LIMIT)) as store:
            store.sync.run_once()
            assert again.lists == [first.lists[-1]]
            assert snapshot(store) == before

    resumed = Recorder(server)
    with TaskStore.open(path, sync=recorded(server, resumed, pull_limit=LIMIT)) as store:
        assert store.sync.flush(timeout=60)
        assert local_tasks(store) == expected
        assert history_per_task(store) == {(1, 1)}  # one server copy per task, once
        status = store.sync.status()
        assert not status.bootstrapping
        assert (status.pending, status.dead, status.conflicts) == (0, 0, 0)
    if 0 < pages < PAGES:
        assert resumed.lists[0] is not None  # resumed after the k-th page, not from zero
        assert len(resumed.lists) == PAGES - pages
    elif pages == 0:
        assert resumed.lists[0] is None
        assert len(resumed.lists) == PAGES
    else:
        assert resumed.lists == []  # the bootstrap was complete: only the log is read
    assert resumed.logs


def _meta(path: Path, key: str) -> str | None:
    if not path.exists():
        return None
    try:
        conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    except apsw.Error:
        return None
    try:
        rows = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchall()
    except apsw.Error:
        return None
    finally:
        conn.close()
    return str(rows[0][0]) if rows else None


def test_a_bootstrap_of_5000_sigkilled_at_a_random_page_resumes_and_ends_equal(
    tmp_path: Path, server: ReferenceServer, expected: dict[str, dict[str, Any]]
) -> None:
    target = random.Random(os.environ.get("CLINIK_RESUME_SEED", "12")).randrange(1, PAGES)
    path = tmp_path / "killed.db"
    server.faults.read_rate = 1.0  # slow listings: the kill lands between pages
    server.faults.read_kinds = ("slow",)
    server.faults.slow_seconds = 0.1
    child = subprocess.Popen(
        [
            sys.executable,
            str(HERE / "pull_child.py"),
            str(path),
            server.url,
            server.token,
            str(LIMIT),
        ],
        env={**os.environ, "PYTHONPATH": str(HERE.parent)},
    )
    try:
        deadline = time.monotonic() + 60
        while int(_meta(path, "sync.pulled") or 0) < target * LIMIT:
            assert time.monotonic() < deadline, "the child never reached its page"
            assert child.poll() is None, "the child ended before it was killed"
            time.sleep(0.005)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
        server.faults.read_rate = 0.0
    progress = _meta(path, "sync.bootstrap.next")
    with TaskStore.open(path) as store:
        kept = len(local_tasks(store))
    assert kept % LIMIT == 0  # whole pages only
    assert target * LIMIT <= kept < COUNT
    resumed = Recorder(server)
    with TaskStore.open(path, sync=recorded(server, resumed, pull_limit=LIMIT)) as store:
        assert store.sync.flush(timeout=60)
        assert local_tasks(store) == expected
        assert history_per_task(store) == {(1, 1)}
    assert resumed.lists[0] == progress  # from the committed page, not from zero
    assert len(resumed.lists) == PAGES - kept // LIMIT
