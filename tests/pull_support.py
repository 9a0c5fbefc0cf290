"""Shared helpers of the two-way sync tests: stores on a reference server, snapshots."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import apsw

from clinik_local import ReferenceServer, SyncConfig, TaskStore
from clinik_local.codec import encode_task
from clinik_local.remotes.base import (
    Change,
    ChangesOutcome,
    ListOutcome,
    PushOutcome,
    Scope,
    Transient,
    Unreachable,
)
from clinik_local.remotes.clinik import ClinikRemote

BOOKKEEPING = ("versionId", "lastModified")
REQUEST: dict[str, Any] = {"status": "requested", "intent": "order", "code": "lab-order"}


def strip(task: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in task.items() if k not in BOOKKEEPING}


def local_tasks(store: TaskStore) -> dict[str, dict[str, Any]]:
    """Every local task in wire form without the bookkeeping fields."""
    out: dict[str, dict[str, Any]] = {}
    cursor = None
    while True:
        page = (
            store.tasks.search(limit=1000, cursor=cursor)
            if cursor
            else store.tasks.search(limit=1000)
        )
        for task in page.data:
            out[str(task.id)] = strip(encode_task(task))
        cursor = page.meta["nextCursor"]
        if not cursor:
            return out


def server_tasks(server: ReferenceServer, **scope: str) -> dict[str, dict[str, Any]]:
    """The server's tasks (those matching ``scope``) without the bookkeeping fields."""
    return {
        k: strip(v)
        for k, v in server.tasks().items()
        if all(v.get(name) in value.split(",") for name, value in scope.items())
    }


def wait_for(condition: Callable[[], object], timeout: float = 10.0) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` seconds pass (no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return bool(condition())


def meta_value(path: Path, key: str) -> str | None:
    """A ``meta`` value of a store file read-only from outside (None: no file, no value,
    or not readable now, as while a child process holds it mid-write)."""
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


def config(server: ReferenceServer, **kw: Any) -> SyncConfig:
    settings: dict[str, Any] = {
        "backoff_base": 0.001,
        "backoff_cap": 0.01,
        "timeout": 2.0,
        "jitter_seed": 1,
        "pull_interval": 0.05,
    }
    settings.update(kw)
    return SyncConfig(base_url=server.url, token_provider=lambda: server.token, **settings)


class Recorder(ClinikRemote):
    """The clinik remote, recording every call; ``fail_lists_after`` pages makes the next
    listings Unreachable (as a network gone mid-bootstrap); ``hold`` task ids get
    Transient on push (their changes stay pending)."""

    def __init__(self, server: ReferenceServer, **kw: Any) -> None:
        super().__init__(server.url, lambda: server.token, timeout=2.0, **kw)
        self.lists: list[str | None] = []
        self.logs: list[str] = []
        self.pushed: list[Change] = []
        self.fail_lists_after: int | None = None
        self.hold: set[str] = set()
        self._count_lock = threading.Lock()

    def push(self, change: Change, *, lane: int) -> PushOutcome:
        if change.task_id in self.hold:
            return Transient(error="held by the test")
        with self._count_lock:
            self.pushed.append(change)
        return super().push(change, lane=lane)

    def list_page(self, scope: Scope, cursor: str | None, limit: int) -> ListOutcome:
        if self.fail_lists_after is not None and len(self.lists) >= self.fail_lists_after:
            return Unreachable(message="the test cut the network")
        self.lists.append(cursor)
        return super().list_page(scope, cursor, limit)

    def changes_page(self, scope: Scope, since: str, limit: int) -> ChangesOutcome:
        self.logs.append(since)
        return super().changes_page(scope, since, limit)


def recorded(server: ReferenceServer, remote: Recorder, **kw: Any) -> SyncConfig:
    """A config on an injected Recorder (the same service id as ``config(server)``)."""
    settings: dict[str, Any] = {
        "backoff_base": 0.001,
        "backoff_cap": 0.01,
        "jitter_seed": 1,
        "pull_interval": 0.05,
    }
    settings.update(kw)
    return SyncConfig(remote=remote, **settings)
