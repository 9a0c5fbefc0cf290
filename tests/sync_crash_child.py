"""The syncing child that crash tests SIGKILL, and the check made after the kills.

Shared by ``tests/test_sync_crash.py`` (a few trials in CI) and
``benchmarks/soak_sync.py`` (hundreds), so both kill the same child and check the same
things.

Run as a script (:data:`SCRIPT`), the child opens a file store with sync to the given
server, starts the background worker, prints ``ready`` and then writes tasks forever
(create, update, and every third one deleted) until it is killed::

    python tests/sync_crash_child.py PATH URL TOKEN START [BACKOFF_CAP]

:func:`sync_problems` then flushes a fresh store on the same file with faults off and
lists what is wrong: anything left pending, in flight, dead or in conflict; a server
that does not hold exactly the local tasks; an idempotency key applied other than once;
or a local change never applied.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import apsw

from clinik_local import TaskStore
from clinik_local.codec import encode_task
from clinik_local.sync import SyncConfig

if TYPE_CHECKING:
    from clinik_local.server import ReferenceServer

#: Run this file with the arguments above to start a child.
SCRIPT = Path(__file__).resolve()


def command(
    path: Path, url: str, token: str, start: int, *, backoff_cap: float = 0.01
) -> list[str]:
    """The command line that starts a child (its task notes count up from ``start``)."""
    return [sys.executable, str(SCRIPT), str(path), url, token, str(start), str(backoff_cap)]


def child_main(argv: list[str]) -> None:
    """Write tasks with the sync worker running, until killed."""
    path, url, token, start = argv[0], argv[1], argv[2], int(argv[3])
    backoff_cap = float(argv[4]) if len(argv) > 4 else 0.01
    config = SyncConfig(
        base_url=url,
        token_provider=lambda: token,
        backoff_base=0.001,
        backoff_cap=backoff_cap,
        timeout=0.5,
    )
    store = TaskStore.open(path, sync=config)
    store.sync.start()
    print("ready", flush=True)
    n = start
    while True:
        task = store.tasks.create({"status": "requested", "intent": "order", "note": f"n{n}"})
        store.tasks.update(str(task.data.id), {"status": "accepted"})
        if n % 3 == 0:
            store.tasks.delete(str(task.data.id))
        n += 1


def strip(task: dict[str, Any]) -> dict[str, Any]:
    """A wire task without the fields each side manages itself."""
    return {k: v for k, v in task.items() if k not in ("versionId", "lastModified")}


def local_tasks(store: TaskStore) -> dict[str, dict[str, Any]]:
    """Every local task, by id, stripped."""
    out: dict[str, dict[str, Any]] = {}
    page = store.tasks.search(limit=1000)
    while True:
        for task in page.data:
            out[str(task.id)] = strip(encode_task(task))
        cursor = page.meta["nextCursor"]
        if not cursor:
            return out
        page = store.tasks.search(limit=1000, cursor=cursor)


def sync_problems(
    path: Path, server: ReferenceServer, *, timeout: float = 120
) -> tuple[list[str], int]:
    """Flush a fresh store on ``path`` with the server's faults off; return what is
    wrong (nothing: ``[]``) and how many local tasks there are."""
    rate = server.faults.rate
    server.faults.rate = 0.0
    config = SyncConfig(
        base_url=server.url,
        token_provider=lambda: server.token,
        backoff_base=0.001,
        backoff_cap=0.01,
    )
    problems: list[str] = []
    try:
        with TaskStore.open(path, sync=config) as store:
            if not store.sync.flush(timeout=timeout):
                problems.append(f"flush did not finish: {store.sync.status()}")
            local = local_tasks(store)
            history = store.table_counts()["task_history"]
            status = store.sync.status()
    finally:
        server.faults.rate = rate
    if (status.pending, status.in_flight, status.dead, status.conflicts) != (0, 0, 0, 0):
        problems.append(f"changes left unsent or parked: {status}")
    if {k: strip(v) for k, v in server.tasks().items()} != local:
        problems.append("server tasks differ from local tasks")
    counts = server.applied_counts()
    twice = [k for k, n in counts.items() if n != 1]
    if twice:
        problems.append(f"keys applied other than once: {twice[:5]}")
    if len(counts) != history:
        problems.append(f"{history} local changes but {len(counts)} applied")
        problems.extend(_history_against_log(path, server))
    return problems, len(local)


def _history_against_log(path: Path, server: ReferenceServer) -> list[str]:
    """Per task, where the local history and the server's applied writes part ways:
    each task's (op, origin) history next to the methods applied for it."""
    methods = {"POST": "create", "PUT": "update", "DELETE": "delete"}
    applied: dict[str, list[str]] = {}
    for _, task_id, method in server.applied_log():
        applied.setdefault(task_id, []).append(methods.get(method, method))
    history: dict[str, list[tuple[str, str]]] = {}
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        for task_id, op, origin in conn.execute(
            "SELECT task_id, op, origin FROM task_history ORDER BY task_id, version"
        ):
            history.setdefault(str(task_id), []).append((str(op), str(origin)))
    finally:
        conn.close()
    parted = [
        f"{task_id}: history {history.get(task_id, [])} applied {applied.get(task_id, [])}"
        for task_id in sorted(set(history) | set(applied))
        if [op for op, origin in history.get(task_id, []) if origin == "local"]
        != applied.get(task_id, [])
        or any(origin != "local" for _, origin in history.get(task_id, []))
    ]
    return parted[:10]


if __name__ == "__main__":
    child_main(sys.argv[1:])
