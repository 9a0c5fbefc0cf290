"""``AsyncTaskStore``: the TaskStore API for asyncio programs, never blocking the loop.

Every call runs the synchronous :class:`~clinik_local.store.TaskStore` method in a
worker thread (:func:`asyncio.to_thread`); a TaskStore is safe to share between
threads, so concurrent awaits are fine. Arguments, results and errors are exactly
those of the synchronous API.

Cancellation (``asyncio.wait_for`` timing out, ``task.cancel()``) has a knowable outcome:

- a write cancelled before it *started* (before its worker held the store's write lock,
  e.g. while another thread or process was writing) is never written, not even later;
- a write that had started runs to its commit (or error), and the cancellation is
  raised only once it has finished, so when ``TimeoutError`` reaches you the task is
  either written or never will be. A create's id is fixed before the worker runs:
  give the request an id from :func:`~clinik_local.ids.new_task_id` and, after a
  timeout, ``await astore.tasks.get(that_id)`` tells you which (``NotFoundError``:
  not written; create it again with the same id). A request without an id gets one
  generated before the worker runs; it is named in the ``CancelledError``'s message.

Reads that are cancelled are simply abandoned.

>>> import asyncio
>>> async def main() -> str:
...     async with await AsyncTaskStore.open(":memory:") as astore:
...         task = (await astore.tasks.create({"status": "draft", "intent": "order"})).data
...         return (await astore.tasks.get(task.id)).data.status.value
>>> asyncio.run(main())
'draft'
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from .events import ChangeEvent
from .ids import new_task_id
from .model import ApiResponse, Task, TaskVersion
from .storage.database import writes_only_if

if TYPE_CHECKING:
    from .store import TaskStore

__all__ = ["AsyncTaskStore", "AsyncTasksResource"]

_T = TypeVar("_T")


class _Call:
    """Whether a worker's write has started, or its caller has given up; never both."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started = False
        self._abandoned = False

    def start(self) -> bool:
        """Called by the worker holding the write lock: may it write? (then: started)."""
        with self._lock:
            if not self._abandoned:
                self._started = True
            return self._started

    def abandon(self) -> bool:
        """Called on cancellation: True if the write never started (and now never will)."""
        with self._lock:
            if not self._started:
                self._abandoned = True
            return self._abandoned


async def _run(what: str, func: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
    """``func(*args, **kwargs)`` in a worker thread, with the cancellation rules above."""
    call = _Call()

    def work() -> _T:
        with writes_only_if(call.start):
            return func(*args, **kwargs)

    future = asyncio.ensure_future(asyncio.to_thread(work))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError as cancel:
        if call.abandon():
            future.add_done_callback(_consume)
            raise asyncio.CancelledError(
                f"{what} was cancelled before it started: not written"
            ) from cancel
        # Started: settle the outcome before the cancellation reaches the caller.
        while not future.done():  # a transaction is short: wait it out, cancelled again or not
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({future})
        _consume(future)
        raise asyncio.CancelledError(
            f"{what} was cancelled after it started: it ran to its end"
        ) from cancel


def _consume(future: asyncio.Future[Any]) -> None:
    """Retrieve an abandoned worker's error so asyncio does not log it as never retrieved."""
    if not future.cancelled():
        future.exception()


class AsyncTasksResource:
    """The Tasks resource with coroutine methods, as ``TasksResource`` has them."""

    def __init__(self, store: TaskStore) -> None:
        self._tasks = store.tasks

    async def create(self, request: Mapping[str, object]) -> ApiResponse[Task]:
        """Create a task (see ``TasksResource.create``).

        An id-less request gets its id here, before the worker runs (see the module's
        cancellation rules); pass your own from ``new_task_id()`` to look it up later.
        """
        what = "create"
        if isinstance(request, Mapping) and "id" not in request:
            task_id = new_task_id()
            request = {**request, "id": task_id}
            what = f"create of task {task_id}"
        elif isinstance(request, Mapping) and isinstance(request.get("id"), str):
            what = f"create of task {request['id']}"
        return await _run(what, self._tasks.create, request)

    async def create_many(
        self, requests: Iterable[Mapping[str, object]], *, synced: bool = False
    ) -> ApiResponse[list[Task]]:
        """Create many tasks in one transaction (see ``TasksResource.create_many``)."""
        return await _run("create_many", self._tasks.create_many, requests, synced=synced)

    async def get(self, task_id: str) -> ApiResponse[Task]:
        """Read one task (see ``TasksResource.get``)."""
        return await asyncio.to_thread(self._tasks.get, task_id)

    async def update(
        self,
        task_id: str,
        changes: Mapping[str, object],
        *,
        if_match: str | int | None = None,
        admin_override: str | None = None,
    ) -> ApiResponse[Task]:
        """Partially update a task (see ``TasksResource.update``)."""
        return await _run(
            f"update of task {task_id}",
            self._tasks.update,
            task_id,
            changes,
            if_match=if_match,
            admin_override=admin_override,
        )

    async def delete(
        self, task_id: str, *, if_match: str | int | None = None
    ) -> ApiResponse[dict[str, object]]:
        """Delete a task (see ``TasksResource.delete``)."""
        return await _run(
            f"delete of task {task_id}", self._tasks.delete, task_id, if_match=if_match
        )

    async def search(
        self, filters: Mapping[str, object] | None = None, /, **keywords: object
    ) -> ApiResponse[list[Task]]:
        """One page of matching tasks (see ``TasksResource.search``)."""
        return await asyncio.to_thread(self._tasks.search, filters, **keywords)

    async def count(
        self,
        filters: Mapping[str, object] | None = None,
        /,
        *,
        at_most: int | None = None,
        **keywords: object,
    ) -> ApiResponse[int]:
        """How many tasks match, up to ``at_most`` if given (see ``TasksResource.count``)."""
        return await asyncio.to_thread(self._tasks.count, filters, at_most=at_most, **keywords)

    async def history(self, task_id: str) -> ApiResponse[list[TaskVersion]]:
        """Every recorded version of a task (see ``TasksResource.history``)."""
        return await asyncio.to_thread(self._tasks.history, task_id)

    async def watch(self) -> AsyncIterator[ChangeEvent]:
        """The change notifications of ``TasksResource.watch``, as an async iterator.

        ``async for event in astore.tasks.watch():`` yields a
        :class:`~clinik_local.events.ChangeEvent` per commit that changes tasks, from
        the moment the iteration starts, in commit order; leaving the loop (``break``,
        an exception, or closing the generator) unsubscribes. Events are handed to the
        loop the iteration runs on; they are never dropped.
        """
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[ChangeEvent] = asyncio.Queue()

        def deliver(event: ChangeEvent) -> None:
            # A closed loop: nobody listens any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(events.put_nowait, event)

        unsubscribe = self._tasks.watch(deliver)
        try:
            while True:
                yield await events.get()
        finally:
            unsubscribe()


class AsyncTaskStore:
    """An asyncio facade over a :class:`~clinik_local.store.TaskStore`.

    Open with ``await AsyncTaskStore.open(path, **options)`` (the options of
    ``TaskStore.open``); use as ``async with``; ``await astore.aclose()`` to close.
    The wrapped synchronous store is :attr:`store` (e.g. for ``store.sync``).

    A write that is cancelled or times out is either never written (it had not started:
    it was still waiting for the write lock) or settled before the cancellation reaches
    you (it had started); give creates an id (``new_task_id()``) to look them up after a
    timeout and retry them safely. See the module docstring and docs/embedding.md.
    """

    def __init__(self, store: TaskStore) -> None:
        self.store = store
        self.tasks = AsyncTasksResource(store)

    @classmethod
    async def open(cls, path: str = ":memory:", **options: Any) -> AsyncTaskStore:
        """Open (in a worker thread) the store at ``path``; options as ``TaskStore.open``."""
        from .store import TaskStore

        store = await asyncio.to_thread(TaskStore.open, path, **options)
        return cls(store)

    @property
    def closed(self) -> bool:
        """Whether the store has been closed."""
        return self.store.closed

    async def aclose(self) -> None:
        """Close the store (stops sync, closes connections) in a worker thread."""
        await asyncio.to_thread(self.store.close)

    async def __aenter__(self) -> AsyncTaskStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"AsyncTaskStore({self.store!r})"
