"""The sync engine: delivers the outbox to a remote, exactly once; scheduling and status.

``sync-protocol.md`` is the contract. How this engine keeps it:

- **One key per change.** Every request of an outbox row carries its ``change_id`` as
  ``Idempotency-Key``, on every retry and after any restart, so a retry of a change
  the server already applied (the answer was lost) is answered from the server's
  idempotency store and applied only once.
- **No network I/O inside a transaction.** A pass reads a batch of rows (a short read),
  marks them ``in_flight`` (a short write), sends them *outside* any transaction over
  ``SyncConfig.lanes`` keep-alive connections (all changes of one task in the same
  lane, one after another), then records every answer of the batch in one short
  write. Local writes never wait for the network. Rows still ``in_flight`` when the
  process died are sent again, with the same key, by the next engine on the file.
- **Per-task order, no head-of-line blocking.** Changes of one task go in the order
  they were made; a task whose change is parked (dead letter, conflict) or backing off
  holds back its own later changes only, never another task's.
- **Retries fire by themselves.** The worker thread sleeps until the earliest retry is
  due (exponential backoff with full jitter, ``Retry-After`` honoured), or until a new
  local change or :meth:`SyncEngine.notify_online` wakes it.
- **Versions.** The server's ``versionId``/``lastModified`` of each delivered change go
  to ``task_sync``; the next change of that task sends ``If-Match`` with it. The first
  change the server has never acknowledged goes as ``POST`` (a create).
  A delete of a task the server never acknowledged is delivered without a request.
- **One engine per file.** A pass (push and pull) runs only while this engine holds the
  file's sync lease (:mod:`.lease`); another engine on the same file (an app's worker
  and ``clinik-local sync run``) waits in state ``standby`` (``SyncStatus.held_by``
  names the holder) and takes over when the lease is released or its holder is gone.
  Answers are recorded, and pulled pages applied, only under the lease, and answers
  only for rows still ``in_flight``, so a late answer never writes an older server
  version back.
- **Callbacks outside every lock.** ``on_status_change`` callbacks run on their own
  thread, where no engine lock is held: a callback may call ``run_once()``,
  ``flush()``, ``stop()`` or ``store.close()``.

The engine owns scheduling (the worker thread, backoff, lanes) and status; the parts are
:mod:`.push` (rows through the remote, outcomes recorded), :mod:`.conflicts` (parked
changes) and the remote itself (:mod:`clinik_local.remotes`), which maps the wire to
typed outcomes. What each answer does follows the contract's table: 2xx delivered; 404
on DELETE delivered; 412 rebases the task's changes on the server's task (what cannot
merge is a conflict: :meth:`SyncEngine.conflicts`, :meth:`SyncEngine.resolve`), and so
does a 404 on PUT (the server deleted the task); 400/403/404/409/413/422 and any other
4xx a dead letter (:meth:`SyncEngine.dead_letters`, :meth:`SyncEngine.retry`,
:meth:`SyncEngine.discard`); 401 asks the token provider again and retries once, then
pauses with state ``auth_required``; 408/425/429/5xx and network failures are retried.
When the service cannot be reached at all, the whole engine backs off (state
``offline``) instead of failing row after row.

Two-way sync (``SyncConfig(pull=True)``, the default with a remote that can pull): each
pass pushes first, then pulls (:mod:`.pull`: a bootstrap of the scope, then the change
log), on the same worker, with the same offline, auth and backoff machinery; a failed
read waits its own backoff (``Retry-After`` honoured) without holding back the push
side. A running engine pulls every ``pull_interval`` seconds, and at once after
:meth:`SyncEngine.pull` or :meth:`SyncEngine.flush`. A long bootstrap yields to the
push side between pages when local changes wait. Conflicts found by a push (``412``)
or a pull go to ``SyncConfig.on_conflict`` (if set) after the pass, outside the pass
lock and any transaction.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import random
import threading
import time
import zlib
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Literal, NoReturn

import attrs

from .. import timestamps
from ..errors import ClinikError, StorageError, ValidationError
from ..remotes.base import (
    AuthFailed,
    Delivered,
    PullRemote,
    Refused,
    Remote,
    Transient,
    Unreachable,
)
from ..storage import outbox, replica
from ..storage.database import Database
from ..storage.outbox import OutboxRow
from . import conflicts as _conflicts
from . import pull as _pull
from . import push, rebase
from .config import SyncConfig, check_range
from .conflicts import DeadLetter, SyncConflict
from .lease import EngineLease

__all__ = ["DeadLetter", "EngineState", "SyncConfig", "SyncConflict", "SyncEngine", "SyncStatus"]

_log = logging.getLogger("clinik_local.sync")

#: The engine's state (not a task's sync state, which is ``storage.outbox.TaskSyncState``).
EngineState = Literal[
    "offline", "idle", "uploading", "downloading", "backoff", "auth_required", "error", "standby"
]
#: How often an engine in ``standby`` looks whether the lease became free (seconds).
STANDBY_POLL = 1.0
#: How long a pull may run while local changes wait to be pushed (seconds).
_PULL_BUDGET = 1.0


@attrs.frozen(kw_only=True)
class SyncStatus:
    """A snapshot of sync: engine state, outbox counts and the pull side.

    ``state``: offline (service unreachable; retrying), idle (nothing to send),
    uploading, downloading (pulling), backoff (waiting for a retry timer),
    auth_required (the token was refused twice; call :meth:`SyncEngine.notify_online`
    once the provider has a good one), error (an unexpected local failure, or a read
    the server refuses; retried), standby (another sync engine on this file holds its
    sync lease, named by ``held_by``; this one sends and pulls nothing and takes over
    when that one stops or is gone). ``next_retry_at`` and ``last_success_at`` (kept in
    the file across reopening) are UTC instants or None; ``last_error`` is the last
    failure since the service last worked (cleared by the next delivered change or
    complete pull).

    Pull side (all False/0/None for a push-only store): ``bootstrapping`` is True until
    the scope's first bootstrap is complete (and again after a ``410`` or a new scope or
    service); ``tasks_pulled`` counts every server task written to this store (listed
    or pulled; kept in the file); ``last_pull_at`` is when the log was last read to its
    end (kept in the file).
    """

    state: EngineState
    pending: int
    in_flight: int
    dead: int
    conflicts: int
    last_success_at: str | None
    next_retry_at: str | None
    last_error: str | None
    bootstrapping: bool = False
    tasks_pulled: int = 0
    last_pull_at: str | None = None
    held_by: str | None = None


class _StopPass(Exception):
    """The pass cannot go on (offline, auth, stopping); unsent rows go back to pending."""


def _instant_in(seconds: float) -> str:
    when = datetime.fromtimestamp(time.time() + max(seconds, 0.0), UTC)
    return timestamps.format_instant(when)


def _seconds_until(instant: str) -> float:
    return datetime.fromisoformat(instant).timestamp() - time.time()


class _Notifier:
    """Runs status callbacks on their own thread, in order, where no engine lock is held."""

    def __init__(self, callbacks: list[Callable[[SyncStatus], None]]) -> None:
        self._callbacks = callbacks
        self._queue: collections.deque[SyncStatus] = collections.deque()
        self._cond = threading.Condition()
        self._busy = False
        self._thread: threading.Thread | None = None

    def on_thread(self) -> bool:
        """Whether the caller is the callback thread (a callback calling back in)."""
        return self._thread is threading.current_thread()

    def put(self, status: SyncStatus) -> None:
        """Queue ``status`` for the callbacks (never blocks on them)."""
        with self._cond:
            self._queue.append(status)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="clinik-local-sync-status", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()

    def drain(self, timeout: float = 2.0) -> None:
        """Wait (up to ``timeout``) until every queued status was delivered; a no-op on
        the callback thread itself."""
        if self.on_thread():
            return
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._queue:
                    self._cond.wait(5.0)
                    if not self._queue:
                        self._thread = None
                        self._cond.notify_all()
                        return
                status = self._queue.popleft()
                self._busy = True
            try:
                for callback in list(self._callbacks):
                    try:
                        callback(status)
                    except Exception:
                        _log.exception("sync status callback failed")
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()


def _check_text(name: str, value: object) -> None:
    """ValidationError naming ``name`` unless ``value`` is text (an id the caller got
    from this library: a dead letter's change id, a conflict's task id)."""
    if not isinstance(value, str):
        raise ValidationError.single(name, "expected the id as text", type(value))


class SyncEngine:
    """``store.sync``: the background worker and the controls of sync for one store."""

    def __init__(self, db: Database, config: SyncConfig) -> None:
        self._db = db
        self._config = config
        self._remote: Remote = config.make_remote()
        self._pool: ThreadPoolExecutor | None = None
        self._rng = random.Random(config.jitter_seed)
        self._wake = threading.Event()
        self._pass_lock = threading.Lock()
        self._progress = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._prepared = False
        self._lease = EngineLease(db)
        self._held_by: str | None = None
        self._state: EngineState = "idle"
        self._auth_paused = False
        self._offline_attempts = 0
        self._offline_until: float | None = None  # time.time() seconds
        self._next_due: float | None = None  # time.time() seconds of the earliest retry
        with db.read() as conn:
            self._last_success_at: str | None = outbox.last_success_at(conn)
        self._last_error: str | None = None
        self._callbacks: list[Callable[[SyncStatus], None]] = []
        self._notifier = _Notifier(self._callbacks)
        self._emit_lock = threading.Lock()
        self._last_emitted: SyncStatus | None = None
        self._puller: _pull.Puller | None = None
        if config.pulls:
            assert isinstance(self._remote, PullRemote)
            self._puller = _pull.Puller(db, self._remote, config, held=self._lease.still_held)
        self._pull_due: float | None = 0.0  # time.time() seconds of the next pull
        self._pull_attempts = 0
        self._round_seq = 0  # pull rounds started
        self._last_end_round = -1  # the last round that read the log to its end
        self._policy_queue: list[str] = []

    def __repr__(self) -> str:
        return f"<SyncEngine {self._config.describe()} {self._state}>"

    # --- control ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the background worker (no-op if running); StorageError on a closed store
        (a worker there could only fail)."""
        if self._db.closed:
            raise StorageError("the store is closed; open it again to sync")
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="clinik-local-sync", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the worker after the request in progress; unsent rows stay queued.

        Releases the file's sync lease. Safe from a status callback.
        """
        self._stopping = True
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self._thread = None
        with self._pass_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
            self._remote.close()
            with contextlib.suppress(StorageError):
                self._lease.release()
        with self._progress:
            self._progress.notify_all()
        self._notifier.drain()

    def close(self) -> None:
        """Stop, and forget this engine's claim on the file for good (the store closes)."""
        self.stop()
        self._lease.close()

    @property
    def running(self) -> bool:
        """Whether the background worker is running."""
        return self._thread is not None and self._thread.is_alive()

    def notify_change(self) -> None:
        """A local change committed: wake the worker (cheap; called after every write)."""
        self._wake.set()

    def notify_online(self) -> None:
        """The network is back (or the token provider has a good token): retry now.

        Cancels every backoff wait, the engine's and each change's, and lifts an
        ``auth_required`` pause.
        """
        self._auth_paused = False
        self._offline_until = None
        self._offline_attempts = 0
        with contextlib.suppress(StorageError), self._db.write() as conn:
            outbox.clear_backoff(conn)
        self._wake.set()

    def run_once(self) -> SyncStatus:
        """One pass now, on this thread: send everything deliverable that is due.

        Lifts an ``auth_required`` pause and an offline wait first (the caller asked).
        """
        self._auth_paused = False
        self._offline_until = None
        self._pull_due = 0.0
        with self._pass_lock:
            try:
                self._pass()
            finally:
                self._release_if_idle()
        self._after_pass()
        self._notifier.drain()
        return self.status()

    def pull(self) -> SyncStatus:
        """Pull now, on this thread: read the change log to its end (bootstrapping first
        if needed). Lifts an offline wait and a pull's backoff; nothing is pushed.
        A push-only store returns its status at once."""
        self._offline_until = None
        self._pull_due = 0.0
        with self._pass_lock:
            try:
                if self._ready():
                    self._pull_part(budget=lambda: False)
            finally:
                self._release_if_idle()
        self._after_pass()
        self._notifier.drain()
        return self.status()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every deliverable change is delivered *and* the change log has
        been read to its end (pulling stores), by a pull that started after this call:
        True, or False at ``timeout``.

        Parked changes (dead letters, conflicts, and later changes of their tasks) do
        not count. Without a running worker the passes run on this thread. Returns
        False at once when sync is paused for ``auth_required``.
        """
        check_range("timeout", timeout, 0, math.inf)
        try:
            return self._flush(timeout)
        finally:
            with self._pass_lock:
                self._release_if_idle()
            self._notifier.drain()

    def _release_if_idle(self) -> None:
        """A foreground pass is over: give the lease back unless the worker runs (the
        caller holds the pass lock), so another engine on the file may go on."""
        if not self.running and not self._db.closed:
            with contextlib.suppress(StorageError):
                self._lease.release()

    def _flush(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        mark = self._round_seq
        self._pull_due = 0.0
        while True:
            if self._deliverable() == 0 and self._pulled_since(mark):
                return True
            if self._auth_paused or time.monotonic() >= deadline:
                return False
            if self.running:
                self._wake.set()
                with self._progress:
                    self._progress.wait(min(0.05, max(deadline - time.monotonic(), 0)))
                continue
            with self._pass_lock:
                self._pass()
            self._after_pass()
            if self._deliverable() == 0 and self._pulled_since(mark):
                return True
            wait = deadline - time.monotonic()
            due = self._wait_seconds()
            if due is not None:
                wait = min(wait, due)
            if wait > 0 and not self._auth_paused:
                self._wake.wait(wait)
                self._wake.clear()

    # --- status ------------------------------------------------------------------------------

    def _pulled_since(self, mark: int) -> bool:
        """Whether a pull round started after ``mark`` read the log to its end."""
        return self._puller is None or self._last_end_round > mark

    def status(self) -> SyncStatus:
        """Where sync stands now (one short read)."""
        with self._db.read() as conn:
            counts = outbox.counts_by_state(conn)
            conflicts = outbox.conflict_count(conn)
            pulled = replica.read_state(conn)
        state = self._state
        if self._auth_paused:
            state = "auth_required"
        next_retry: str | None = None
        due = self._offline_until if self._offline_until is not None else self._next_due
        if due is None and self._pull_attempts:
            due = self._pull_due
        if due is not None and state in ("offline", "backoff"):
            next_retry = timestamps.format_instant(datetime.fromtimestamp(due, UTC))
        return SyncStatus(
            held_by=self._held_by if state == "standby" else None,
            state=state,
            pending=int(counts.get("pending", 0)),
            in_flight=int(counts.get("in_flight", 0)),
            dead=int(counts.get("dead", 0)),
            conflicts=int(conflicts),
            last_success_at=self._last_success_at,
            next_retry_at=next_retry,
            bootstrapping=self._puller is not None
            and (
                pulled.bootstrapping
                or pulled.scope != self._config.scope_text()
                or pulled.service != self._config.service_id()
            ),
            tasks_pulled=pulled.pulled if self._puller is not None else 0,
            last_pull_at=pulled.last_pull_at if self._puller is not None else None,
            last_error=self._last_error,
        )

    def on_status_change(self, callback: Callable[[SyncStatus], None]) -> Callable[[], None]:
        """Call ``callback(status)`` whenever the status changes; returns an unsubscribe.

        Callbacks run in order on the engine's callback thread, where no engine lock is
        held, so one may call ``run_once()``, ``flush()``, ``stop()`` or
        ``store.close()``. ``run_once()``, ``pull()`` and ``flush()`` return only after
        the callbacks have seen the status they end with.
        """
        if not callable(callback):
            raise ValidationError.single(
                "callback", "must be a callable taking a SyncStatus", type(callback)
            )
        self._callbacks.append(callback)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._callbacks.remove(callback)

        return unsubscribe

    def _emit(self) -> None:
        with self._progress:
            self._progress.notify_all()
        if not self._callbacks:
            return
        with self._emit_lock:
            try:
                status = self.status()
            except StorageError:
                return
            if status == self._last_emitted:
                return
            self._last_emitted = status
            self._notifier.put(status)

    def _set_state(self, state: EngineState) -> None:
        if state != self._state:
            self._state = state
            self._emit()

    # --- dead letters and conflicts ----------------------------------------------------------

    def dead_letters(self) -> list[DeadLetter]:
        """Every parked change, oldest first, with the server's status and body."""
        return _conflicts.dead_letters(self._db)

    def retry(self, change_id: str) -> str:
        """Send a dead letter again (e.g. after the server's data was fixed).

        The change goes under a new change id (returned): a server may replay a stored
        refusal for the old key.
        """
        _check_text("change_id", change_id)
        fresh = _conflicts.retry(self._db, change_id)
        self._wake.set()
        return fresh

    def retry_all(self, status: int | None = None) -> int:
        """Send every dead letter again (only those the server answered ``status``, e.g.
        409, if given), each under a new change id; returns how many."""
        count = _conflicts.retry_all(self._db, status)
        self._wake.set()
        return count

    def discard(self, change_id: str) -> None:
        """Drop a dead letter for good (the local task keeps its state)."""
        _check_text("change_id", change_id)
        _conflicts.discard(self._db, change_id)
        self._wake.set()

    def discard_all(self, status: int | None = None) -> int:
        """Drop every dead letter (only those answered ``status``, if given); how many."""
        count = _conflicts.discard_all(self._db, status)
        self._wake.set()
        return count

    def conflicts(self) -> list[SyncConflict]:
        """Every task in conflict: the base, the server's task and the *current* local
        task (every edit made since the conflict was found), with the reasons."""
        return _conflicts.conflicts(self._db)

    def resolve(
        self,
        task_id: str,
        keep: Literal["local", "remote"] | Mapping[str, object],
        *,
        local_version: int | None = None,
    ) -> None:
        """Settle a conflict; the result is based on the server's version in the conflict,
        which becomes the task's base.

        ``keep="local"``: every field this device changed since the base keeps its local
        value, put on the server's task (a field only the server changed stays as the
        server has it) and sent as a new change with ``If-Match`` = the server's version
        (fields this version does not know are the
        server's). ``keep="remote"``: the local task becomes the server's task (stored
        as sent, also with unknown fields or texts over the local limits); nothing is
        sent. A mapping (a merged wire request; ``versionId``/``lastModified`` in it are
        ignored) becomes the local task and is sent as a new change on the server's
        version. Every open change of the task is replaced by that one change.

        ``local_version``: the ``SyncConflict.local_version`` the decision was made on;
        if the local task changed since (an edit the conflict you looked at did not
        show), VersionConflictError and nothing changes.
        """
        _check_text("task_id", task_id)
        _conflicts.resolve(
            self._db, task_id, keep, local_version=local_version, in_scope=self._in_scope()
        )
        self._wake.set()

    def _in_scope(self) -> Callable[[Mapping[str, object]], bool] | None:
        scope = self._config.scope
        if self._puller is None or not scope:
            return None
        return lambda wire: rebase.scope_matches(scope, wire)

    # --- the worker --------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                with self._pass_lock:
                    if not self._stopping:
                        self._pass()
            except Exception as exc:  # a local failure (disk full, locked): retry later
                _log.warning("sync pass failed: %s", type(exc).__name__)
                self._last_error = f"{type(exc).__name__}: {exc}"
                self._offline_attempts += 1
                self._offline_until = time.time() + self._backoff(self._offline_attempts)
                self._set_state("error")
            self._after_pass()
            if self._stopping:
                break
            wait = None if self._auth_paused else self._wait_seconds()
            if wait is None or wait > 0:
                self._wake.wait(wait)

    def _wait_seconds(self) -> float | None:
        if self._state == "standby" and self._next_due is not None:
            return max(self._next_due - time.time(), 0.0)  # nothing else runs meanwhile
        dues = [d for d in (self._offline_until, self._next_due) if d is not None]
        if self._puller is not None and self._pull_due is not None and self._offline_until is None:
            dues.append(self._pull_due)
        if not dues:
            return None
        return max(min(dues) - time.time(), 0.0)

    def _backoff(self, attempts: int) -> float:
        exponent = min(max(attempts - 1, 0), 60)
        ceiling = min(self._config.backoff_cap, self._config.backoff_base * math.pow(2, exponent))
        return self._rng.uniform(0, ceiling)

    def _deliverable(self) -> int:
        with self._db.read() as conn:
            return outbox.deliverable_count(conn)

    def _ready(self) -> bool:
        """Whether a pass may run now: this engine holds the file's sync lease (taking it
        over puts what the previous holder left in flight back to pending), and the
        store is prepared for the config's service and scope."""
        if self._auth_paused:
            self._set_state("auth_required")
            return False
        if self._offline_until is not None and self._offline_until > time.time():
            return False
        self._offline_until = None
        holder = self._lease.acquire(outbox.recover_in_flight)
        if holder is not None:
            self._standby(holder.describe())
            return False
        self._held_by = None
        if not self._prepared:
            _pull.prepare(self._db, self._config)
            self._prepared = True
        return True

    def _standby(self, holder: str) -> None:
        """Another engine holds the lease: send and pull nothing, look again soon."""
        self._held_by = holder
        self._next_due = time.time() + STANDBY_POLL
        self._set_state("standby")

    def _lost_lease(self) -> NoReturn:
        """Another engine took the lease over: stop; it sends (and records) the rest."""
        holder = self._lease.holder_now()
        self._standby(holder.describe() if holder is not None else "another sync engine")
        raise _StopPass()

    def _pass(self) -> None:
        """One pass: the outbox, then the pull side (caller holds the pass lock)."""
        if not self._ready():
            return
        if not self._push_part():
            return
        if self._puller is not None and not self._stopping:
            due = self._pull_due
            if due is not None and due <= time.time():
                self._pull_part(
                    budget=_pull.monotonic_budget(_PULL_BUDGET, lambda: self._deliverable() > 0)
                )

    def _push_part(self) -> bool:
        """Push everything due; False when the pass had to stop (offline, auth)."""
        with self._db.read() as conn:
            blocked = outbox.parked_tasks(conn)
        self._next_due = None
        after = 0
        limit = self._config.batch_size
        try:
            while not self._stopping:
                now = timestamps.now()
                with self._db.read() as conn:
                    chunk = outbox.select_sendable(conn, after, limit)
                if not chunk:
                    break
                after = chunk[-1].seq
                batch = push.sendable(
                    chunk, blocked, now, lambda at: self._note_due(_seconds_until(at) + time.time())
                )
                if batch:
                    self._set_state("uploading")
                    self._send_batch(batch, blocked)
        except _StopPass:
            return False
        self._settle_state()
        return True

    def _settle_state(self) -> None:
        if self._next_due is not None or self._pull_attempts:
            self._set_state("backoff")
        else:
            self._set_state("idle")

    def _pull_part(self, budget: Callable[[], bool]) -> None:
        """Pull until the log's end, a failure, or the budget (caller holds the pass lock)."""
        assert self._puller is not None
        self._round_seq += 1
        round_id = self._round_seq
        self._set_state("downloading")
        result = self._puller.run(lambda: self._stopping, budget)
        self._policy_queue.extend(result.conflicts)
        if result.lost_lease:
            with contextlib.suppress(_StopPass):
                self._lost_lease()
            return
        failure = result.failure
        if failure is None:
            self._offline_attempts = 0
            self._pull_attempts = 0
            if result.at_end:
                if self._next_due is None:
                    self._last_error = None  # the service works again
                self._last_end_round = round_id
                self._pull_due = time.time() + self._config.pull_interval
            else:
                self._pull_due = time.time()  # more to read: go on after the push side
            self._settle_state()
        elif isinstance(failure, (Unreachable, AuthFailed)):
            self._stop_for(failure)
        else:
            self._offline_attempts = 0
            self._pull_attempts += 1
            delay = self._backoff(self._pull_attempts)
            if isinstance(failure, Transient) and failure.retry_after is not None:
                delay = min(float(failure.retry_after), self._config.max_retry_after)
            self._pull_due = time.time() + delay
            self._last_error = failure.error
            if isinstance(failure, Refused):
                self._set_state("error")
            else:
                self._settle_state()

    def _after_pass(self) -> None:
        """After a pass, outside the pass lock: status callbacks, the conflict policy."""
        self._emit()
        policy = self._config.on_conflict
        queued, self._policy_queue = self._policy_queue, []
        if policy is None or not queued:
            return
        for task_id in dict.fromkeys(queued):
            self._apply_policy(policy, task_id)

    def _apply_policy(self, policy: Callable[[SyncConflict], object], task_id: str) -> None:
        try:
            found = _conflicts.conflicts(self._db, task_id)
        except ClinikError:
            return
        if not found:
            return
        conflict = found[0]
        try:
            decision = policy(conflict)
        except Exception:
            _log.exception("the on_conflict policy failed for %s (left to the app)", task_id)
            return
        if decision is None:
            return
        if not (decision in ("local", "remote") or isinstance(decision, Mapping)):
            _log.warning("the on_conflict policy returned %r for %s (ignored)", decision, task_id)
            return
        try:
            _conflicts.resolve(
                self._db,
                task_id,
                decision,
                local_version=conflict.local_version,
                in_scope=self._in_scope(),
            )
        except ClinikError as exc:
            _log.warning("the on_conflict policy's resolution of %s failed: %s", task_id, exc)
            return
        self._wake.set()

    def _note_due(self, when: float) -> None:
        if self._next_due is None or when < self._next_due:
            self._next_due = when

    def _send_batch(self, batch: list[OutboxRow], blocked: set[str]) -> None:
        with self._db.write() as conn:
            held = self._lease.still_held(conn)
            if held:
                outbox.mark_in_flight(conn, (row.seq for row in batch))
        if not held:
            self._lost_lease()
        halt = threading.Event()
        lanes = self._config.lanes

        def lane_of(
            part: list[OutboxRow], lane: int
        ) -> tuple[list[push.Sent], list[AuthFailed | Unreachable]]:
            return push.send_lane(self._remote, part, blocked, halt, lane, lambda: self._stopping)

        if lanes == 1 or len(batch) < 2 * lanes:
            sent, stops = lane_of(batch, 0)
        else:
            # Each task's changes stay in one lane, in order; lanes overlap one
            # request's round trip with another's, over their own connections.
            parts: list[list[OutboxRow]] = [[] for _ in range(lanes)]
            for row in batch:
                parts[zlib.crc32(row.task_id.encode()) % lanes].append(row)
            if self._pool is None:
                self._pool = ThreadPoolExecutor(lanes - 1, thread_name_prefix="clinik-sync-lane")
            futures = [
                self._pool.submit(lane_of, part, lane)
                for lane, part in enumerate(parts[1:], start=1)
            ]
            sent, stops = lane_of(parts[0], 0)
            for future in futures:
                more_sent, more_stops = future.result()
                sent.extend(more_sent)
                stops.extend(more_stops)
        for stop in stops:
            self._stop_for(stop)
        for item in sent:
            if item.outcome is not None and not (
                isinstance(item.outcome, Transient) and item.outcome.status is None
            ):
                self._offline_attempts = 0  # the service answered
        if not self._record(sent):
            self._lost_lease()
        self._emit()
        if halt.is_set():
            raise _StopPass()

    def _stop_for(self, outcome: AuthFailed | Unreachable) -> None:
        """The batch stopped: the service is unreachable (back off) or refused the token."""
        if isinstance(outcome, Unreachable):
            self._last_error = outcome.message
            self._offline_attempts += 1
            self._offline_until = time.time() + self._backoff(self._offline_attempts)
            self._set_state("offline")
        else:
            self._auth_paused = True
            self._last_error = outcome.message
            self._set_state("auth_required")

    def _retry_delay(self, row: OutboxRow, outcome: Transient) -> float:
        if outcome.retry_after is not None:
            delay = min(float(outcome.retry_after), self._config.max_retry_after)
        else:
            delay = self._backoff(row.attempts + 1)
        self._note_due(time.time() + delay)
        if not self._auth_paused:
            self._last_error = outcome.error
        return delay

    def _record(self, sent: list[push.Sent]) -> bool:
        """Write the answers of one batch in one short transaction; False (nothing
        written) when this engine no longer holds the lease."""
        now = timestamps.now()
        if any(isinstance(item.outcome, Delivered) for item in sent):
            self._last_error = None  # the service works again; later failures set it anew
        with self._db.write() as conn:
            if not self._lease.still_held(conn):
                return False
            ctx = rebase.Context(
                scope=self._config.scope,
                generation=replica.read_state(conn).generation,
                pulls=self._puller is not None,
            )
            done = push.record(self._db, conn, ctx, sent, now, self._retry_delay, _instant_in)
            if done.delivered:
                outbox.set_last_success_at(conn, now)
        self._policy_queue.extend(done.conflicts)
        if done.delivered:
            self._last_success_at = now
        return True
