"""pytest plugin (entry point ``pytest11``): fixtures for testing code that uses clinik-local.

The library is imported lazily, inside the fixtures, so merely having clinik-local
installed costs a pytest session nothing.

Fixtures:

* ``task_store``: a fresh, empty in-memory :class:`~clinik_local.TaskStore`, exactly
  what ``TaskStore.open(":memory:")`` gives. Its connection comes from a per-process
  pool (one per pytest-xdist worker) of parsed in-memory connections, and the store
  lives in one transaction on it, rolled back when the fixture closes the store: the
  next test's store holds exactly what a brand-new one does, and no test pays the schema
  parse (see docs/testing.md for what is guaranteed and what it costs).
* ``task_store_file``: the same on a real SQLite file in the test's ``tmp_path``
  (WAL, per-thread readers, checkpointer, no pool), for tests that need a file.
* ``task_factory``: ``task_factory(**overrides)`` returns a valid wire-form create
  request with realistic defaults and an id unique in the session (``task_000001``...);
  overrides use wire names, and ``None`` drops a key. ``task_factory.many(n, **overrides)``
  returns ``n`` of them.
* ``remote_server``: a started :class:`~clinik_local.ReferenceServer` on a free
  127.0.0.1 port, stopped after the test; configure a store with
  ``SyncConfig(base_url=remote_server.url, token_provider=lambda: remote_server.token)``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from clinik_local import ReferenceServer, TaskStore

_ids = itertools.count(1)


class TaskFactory:
    """Builds valid wire-form task requests; see the ``task_factory`` fixture."""

    _PATIENTS = ("pt_0001", "pt_0002", "pt_0003")
    _CODES = ("lab-order", "referral", "imaging")

    def __call__(self, **overrides: Any) -> dict[str, Any]:
        """One request: defaults, then ``overrides`` (``None`` removes a key)."""
        n = next(_ids)
        request: dict[str, Any] = {
            "id": f"task_{n:06d}",
            "status": "requested",
            "intent": "order",
            "priority": "routine",
            "code": self._CODES[n % len(self._CODES)],
            "description": f"Follow-up task {n}",
            "patientId": self._PATIENTS[n % len(self._PATIENTS)],
            "requesterId": "prac_0001",
            "ownerId": "prac_0002",
            "authoredOn": f"2024-03-01T09:{n // 60 % 60:02d}:{n % 60:02d}.000Z",
        }
        for key, value in overrides.items():
            if value is None:
                request.pop(key, None)
            else:
                request[key] = value
        return request

    def many(self, count: int, **overrides: Any) -> list[dict[str, Any]]:
        """``count`` requests, each with its own id."""
        return [self(**overrides) for _ in range(count)]


def _fresh_store() -> TaskStore:
    """What ``task_store`` sets up: a new memory store (on a pooled connection)."""
    from clinik_local import TaskStore

    return TaskStore.open(":memory:")


@pytest.fixture
def task_store() -> Iterator[TaskStore]:
    """A fresh, empty in-memory TaskStore, closed after the test (closing it hands its
    connection, rolled back, to the next test; a test that closed it already is fine)."""
    store = _fresh_store()
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def task_store_file(tmp_path: Any) -> Iterator[TaskStore]:
    """A fresh, empty TaskStore on a file in ``tmp_path``, closed after the test."""
    from clinik_local import TaskStore

    store = TaskStore.open(tmp_path / "tasks.db")
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def task_factory() -> TaskFactory:
    """A callable returning valid wire task requests: ``task_factory(status="draft")``."""
    return TaskFactory()


@pytest.fixture
def remote_server() -> Iterator[ReferenceServer]:
    """The reference sync server on a free 127.0.0.1 port, stopped after the test."""
    from clinik_local.testing.server import ReferenceServer

    server = ReferenceServer(host="127.0.0.1", port=0).start()
    try:
        yield server
    finally:
        server.stop()
