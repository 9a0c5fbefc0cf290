"""Change notifications: which tasks a commit changed, and whether here or by a pull.

:class:`ChangeEvent` is what ``store.tasks.watch(callback)`` callbacks receive (and what
``async for event in astore.tasks.watch()`` yields). :class:`ChangeFeed` is the hub: the
storage layer collects the changed ids inside a write transaction and hands them to
:meth:`ChangeFeed.publish` only after the commit; a single notification thread, started
with the first subscriber, calls the callbacks in commit order. So a callback never runs
while a write lock (or the sync worker's pass) is held, may itself read, write or call
``store.sync``, and an exception in one is logged and stops nothing.

No I/O here but the one daemon thread.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable
from typing import Literal, TypeAlias

import attrs

__all__ = ["ChangeEvent", "ChangeFeed", "ChangeOrigin"]

_log = logging.getLogger("clinik_local.events")

ChangeOrigin: TypeAlias = Literal["local", "pulled"]
"""``"local"``: an edit made through this store (also a conflict resolution keeping
the local side or a merge); ``"pulled"``: the sync engine wrote what the server said
(a pulled or listed task, a rebase onto a newer server version, a task removed because
the server deleted it or it left the scope, a resolution keeping the server's task)."""


@attrs.frozen
class ChangeEvent:
    """The tasks one commit changed (created, updated or deleted), all of one origin.

    ``task_ids`` are sorted and distinct; ``origin`` says who changed them. A commit
    that changed tasks of both origins gives one event per origin, local first.
    """

    task_ids: tuple[str, ...]
    origin: ChangeOrigin

    @property
    def local(self) -> bool:
        """Whether these were local edits (not pulled)."""
        return self.origin == "local"


_Callback: TypeAlias = Callable[[ChangeEvent], None]
_STOP = object()


class ChangeFeed:
    """Subscribers and the notification thread of one store (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: dict[int, _Callback] = {}
        self._next = 0
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False

    def subscribe(self, callback: _Callback) -> Callable[[], None]:
        """Call ``callback(event)`` after every commit that changes tasks; returns the
        unsubscribe callable (idempotent)."""
        with self._lock:
            token = self._next
            self._next += 1
            self._subscribers[token] = callback
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(
                    target=self._run, name="clinik-local-watch", daemon=True
                )
                self._thread.start()

        def unsubscribe() -> None:
            with self._lock:
                self._subscribers.pop(token, None)

        return unsubscribe

    @property
    def watched(self) -> bool:
        """Whether anyone is subscribed (writes skip collecting ids otherwise)."""
        return bool(self._subscribers)

    def publish(self, changes: Iterable[tuple[str, ChangeOrigin]]) -> None:
        """Queue the events of one committed transaction (called after the commit)."""
        if not self._subscribers:
            return
        by_origin: dict[ChangeOrigin, set[str]] = {}
        for task_id, origin in changes:
            by_origin.setdefault(origin, set()).add(task_id)
        order: tuple[ChangeOrigin, ...] = ("local", "pulled")
        for origin in order:
            ids = by_origin.get(origin)
            if ids:
                self._queue.put(ChangeEvent(tuple(sorted(ids)), origin))

    def close(self) -> None:
        """Stop the notification thread after the events already queued."""
        with self._lock:
            self._closed = True
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(_STOP)
            if thread is not threading.current_thread():
                thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            event = self._queue.get()
            if event is _STOP:
                return
            assert isinstance(event, ChangeEvent)
            with self._lock:
                callbacks = list(self._subscribers.values())
            for callback in callbacks:
                try:
                    callback(event)
                except Exception:
                    _log.exception("a watch callback failed (ignored)")
