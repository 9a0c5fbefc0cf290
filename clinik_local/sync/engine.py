"""The sync engine: delivers the outbox to the remote clinik service, exactly once.

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

What each answer does follows the contract's table: 2xx delivered; 404 on DELETE
delivered; 412 a conflict (:meth:`SyncEngine.conflicts`, :meth:`SyncEngine.resolve`);
400/403/404/409/413/422 and any other 4xx a dead letter (:meth:`SyncEngine.dead_letters`,
:meth:`SyncEngine.retry`, :meth:`SyncEngine.discard`); 401 asks the token provider again
and retries once, then pauses with state ``auth_required``; 408/425/429/5xx and network
failures are retried. When the service cannot be reached at all, the whole engine
backs off (state ``offline``) instead of failing row after row.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import logging
import math
import random
import threading
import time
import zlib
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import apsw
import attrs

from .. import timestamps
from ..codec import decode_task, encode_task
from ..errors import AuthError, NotFoundError, StorageError, TransportError, ValidationError
from ..storage.outbox import enqueue
from ..store import fetch_all
from ..tasks import _INSERT_HISTORY, _INSERT_TASK, _UPDATE_TASK, _dumps, _row, _stamp
from ..remotes.transport import Response, Transport, _ConnectFailed, check_base_url

if TYPE_CHECKING:
    from ..store import TaskStore

__all__ = ["DeadLetter", "SyncConfig", "SyncConflict", "SyncEngine", "SyncState", "SyncStatus"]

_log = logging.getLogger("clinik_local.sync")

SyncState = Literal["offline", "idle", "uploading", "backoff", "auth_required", "error"]
_TRANSIENT = frozenset({408, 425, 429, 500, 502, 503, 504})
_SERVER_FIELDS = ("versionId", "lastModified")


def _positive(name: str, low: float, high: float) -> Callable[[Any, Any, Any], None]:
    def check(_instance: Any, _attribute: Any, value: Any) -> None:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not (low <= value <= high)
        ):
            raise ValidationError.single(name, "is out of range", value, f"{low}..{high}")

    return check


def _check_provider(_instance: Any, _attribute: Any, value: Any) -> None:
    if not callable(value):
        raise ValidationError.single(
            "token_provider", "must be a callable returning the bearer token", type(value)
        )


@attrs.frozen(kw_only=True)
class SyncConfig:
    """How a store syncs: where to, with which token, and how patiently.

    ``base_url`` is the service's API root (``https://clinic-host/api/v1``); plain
    ``http`` only to a loopback host unless ``allow_insecure_http``. ``token_provider``
    is called for the bearer token (again after a 401); the token is never stored.
    ``backoff_base``/``backoff_cap`` (seconds) shape the retry delays: a full-jitter
    delay in ``[0, min(cap, base * 2**attempts))``. ``timeout`` bounds each request.
    ``batch_size`` outbox rows are read, marked and recorded per transaction.
    ``lanes`` connections send at once; each task's changes always go through the
    same lane, one after another, so per-task order holds.
    ``ca_bundle``: a CA file to trust instead of the system's (TLS is always verified).
    """

    base_url: str
    token_provider: Callable[[], str] = attrs.field(validator=_check_provider, repr=False)
    timeout: float = attrs.field(default=10.0, validator=_positive("timeout", 0.001, 3600))
    batch_size: int = attrs.field(default=200, validator=_positive("batch_size", 1, 10_000))
    lanes: int = attrs.field(default=2, validator=_positive("lanes", 1, 16))
    backoff_base: float = attrs.field(default=1.0, validator=_positive("backoff_base", 0, 3600))
    backoff_cap: float = attrs.field(default=300.0, validator=_positive("backoff_cap", 0, 86_400))
    max_retry_after: float = attrs.field(
        default=3600.0, validator=_positive("max_retry_after", 0, 86_400)
    )
    allow_insecure_http: bool = False
    ca_bundle: str | None = None
    jitter_seed: int | None = None

    def __attrs_post_init__(self) -> None:
        check_base_url(self.base_url, self.allow_insecure_http)


@attrs.frozen(kw_only=True)
class SyncStatus:
    """A snapshot of sync: engine state and outbox counts.

    ``state``: offline (service unreachable; retrying), idle (nothing to send),
    uploading, backoff (waiting for a retry timer), auth_required (the token was
    refused twice; call :meth:`SyncEngine.notify_online` once the provider has a good
    one), error (an unexpected local failure; retried). ``next_retry_at`` and
    ``last_success_at`` are UTC instants or None.
    """

    state: SyncState
    pending: int
    in_flight: int
    dead: int
    conflicts: int
    last_success_at: str | None
    next_retry_at: str | None
    last_error: str | None


@attrs.frozen(kw_only=True)
class DeadLetter:
    """A change the server refused for good, parked until retried or discarded."""

    change_id: str
    task_id: str
    op: str
    payload: dict[str, Any] | None
    status: int | None
    body: str | None
    error: str | None
    attempts: int
    created_at: str
    parked_at: str | None


@attrs.frozen(kw_only=True)
class SyncConflict:
    """A task whose change the server refused with 412: both versions, kept."""

    task_id: str
    change_id: str
    local: dict[str, Any] | None
    server: dict[str, Any] | None
    detected_at: str


@attrs.frozen
class _Row:
    seq: int
    change_id: str
    task_id: str
    op: str
    payload: str | None
    attempts: int
    server_version: str | None


# Outcomes of one row: (kind, row, extra)
_Outcome = tuple[str, _Row, dict[str, Any]]


class _StopPass(Exception):
    """The pass cannot go on (offline, auth, stopping); unsent rows go back to pending."""


def _instant_in(seconds: float) -> str:
    when = datetime.fromtimestamp(time.time() + max(seconds, 0.0), UTC)
    return timestamps.format_instant(when)


def _seconds_until(instant: str) -> float:
    return datetime.fromisoformat(instant).timestamp() - time.time()


def _wire_body(payload: str, task_id: str) -> bytes:
    body = json.loads(payload)
    for name in _SERVER_FIELDS:
        body.pop(name, None)
    body["id"] = task_id
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def _parse_retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(when.timestamp() - time.time(), 0.0)


def _json_or_none(text: str | None) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


_SELECT_CHUNK = """
SELECT o.seq, o.change_id, o.task_id, o.op, o.payload, o.attempts, o.next_attempt_at,
       s.server_version
FROM outbox o LEFT JOIN task_sync s ON s.task_id = o.task_id
WHERE o.state IN ('pending', 'in_flight') AND o.seq > ?
ORDER BY o.seq LIMIT ?
"""
_PARKED_TASKS = "SELECT DISTINCT task_id FROM outbox WHERE state IN ('dead', 'conflict')"
_DELIVERABLE = """
SELECT count(*) FROM outbox o WHERE o.state IN ('pending', 'in_flight')
AND NOT EXISTS (SELECT 1 FROM outbox p WHERE p.task_id = o.task_id
                AND p.state IN ('dead', 'conflict') AND p.seq < o.seq)
"""
_UPSERT_SYNC = """
INSERT INTO task_sync (task_id, server_version, server_modified, synced_at) VALUES (?, ?, ?, ?)
ON CONFLICT (task_id) DO UPDATE SET server_version = excluded.server_version,
    server_modified = excluded.server_modified, synced_at = excluded.synced_at
"""


class SyncEngine:
    """``store.sync``: the background worker and the controls of sync for one store."""

    def __init__(self, store: TaskStore, config: SyncConfig) -> None:
        self._store = store
        self._config = config
        self._transport: Transport | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._rng = random.Random(config.jitter_seed)
        self._wake = threading.Event()
        self._pass_lock = threading.Lock()
        self._progress = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._recovered = False
        self._state: SyncState = "idle"
        self._auth_paused = False
        self._offline_attempts = 0
        self._offline_until: float | None = None  # time.time() seconds
        self._next_due: float | None = None  # time.time() seconds of the earliest retry
        self._last_success_at: str | None = None
        self._last_error: str | None = None
        self._callbacks: list[Callable[[SyncStatus], None]] = []
        self._last_emitted: SyncStatus | None = None

    def __repr__(self) -> str:
        return f"<SyncEngine {self._config.base_url} {self._state}>"

    # --- control ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the background worker (no-op if running)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="clinik-local-sync", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the worker after the request in progress; unsent rows stay queued."""
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
            if self._transport is not None:
                self._transport.close()
                self._transport = None
        with self._progress:
            self._progress.notify_all()

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
        self._store_write_quietly(
            "UPDATE outbox SET next_attempt_at = NULL WHERE state = 'pending' "
            "AND next_attempt_at IS NOT NULL"
        )
        self._wake.set()

    def run_once(self) -> SyncStatus:
        """One pass now, on this thread: send everything deliverable that is due.

        Lifts an ``auth_required`` pause and an offline wait first (the caller asked).
        """
        self._auth_paused = False
        self._offline_until = None
        with self._pass_lock:
            self._pass()
        self._emit()
        return self.status()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every deliverable change is delivered: True, or False at ``timeout``.

        Parked changes (dead letters, conflicts, and later changes of their tasks) do
        not count. Without a running worker the passes run on this thread. Returns
        False at once when sync is paused for ``auth_required``.
        """
        deadline = time.monotonic() + timeout
        while True:
            if self._deliverable() == 0:
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
            self._emit()
            if self._deliverable() == 0:
                return True
            wait = deadline - time.monotonic()
            due = self._wait_seconds()
            if due is not None:
                wait = min(wait, due)
            if wait > 0 and not self._auth_paused:
                self._wake.wait(wait)
                self._wake.clear()

    # --- status ------------------------------------------------------------------------------

    def status(self) -> SyncStatus:
        """Where sync stands now (one short read)."""
        with self._store.read() as conn:
            counts = dict(fetch_all(conn, "SELECT state, count(*) FROM outbox GROUP BY state"))
            conflicts = fetch_all(conn, "SELECT count(*) FROM sync_conflicts")[0][0]
        state = self._state
        if self._auth_paused:
            state = "auth_required"
        next_retry: str | None = None
        due = self._offline_until if self._offline_until is not None else self._next_due
        if due is not None and state in ("offline", "backoff"):
            next_retry = timestamps.format_instant(datetime.fromtimestamp(due, UTC))
        return SyncStatus(
            state=state,
            pending=int(counts.get("pending", 0)),
            in_flight=int(counts.get("in_flight", 0)),
            dead=int(counts.get("dead", 0)),
            conflicts=int(conflicts),
            last_success_at=self._last_success_at,
            next_retry_at=next_retry,
            last_error=self._last_error,
        )

    def on_status_change(self, callback: Callable[[SyncStatus], None]) -> Callable[[], None]:
        """Call ``callback(status)`` whenever the status changes; returns an unsubscribe."""
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
        try:
            status = self.status()
        except StorageError:
            return
        if status == self._last_emitted:
            return
        self._last_emitted = status
        for callback in list(self._callbacks):
            try:
                callback(status)
            except Exception:
                _log.exception("sync status callback failed")

    def _set_state(self, state: SyncState) -> None:
        if state != self._state:
            self._state = state
            self._emit()

    # --- dead letters and conflicts ----------------------------------------------------------

    def dead_letters(self) -> list[DeadLetter]:
        """Every parked change, oldest first, with the server's status and body."""
        with self._store.read() as conn:
            rows = fetch_all(
                conn,
                "SELECT change_id, task_id, op, payload, last_status, last_body, last_error, "
                "attempts, created_at, next_attempt_at FROM outbox WHERE state = 'dead' "
                "ORDER BY seq",
            )
        return [
            DeadLetter(
                change_id=str(r[0]),
                task_id=str(r[1]),
                op=str(r[2]),
                payload=_json_or_none(r[3]),
                status=None if r[4] is None else int(r[4]),
                body=r[5],
                error=r[6],
                attempts=int(r[7]),
                created_at=str(r[8]),
                parked_at=r[9],
            )
            for r in rows
        ]

    def retry(self, change_id: str) -> None:
        """Send a dead letter again (e.g. after the server's data was fixed)."""
        with self._store.write() as conn:
            conn.execute(
                "UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = NULL, "
                "last_error = NULL, last_status = NULL, last_body = NULL "
                "WHERE change_id = ? AND state = 'dead'",
                (change_id,),
            )
            if conn.changes() == 0:
                raise NotFoundError(f"no dead letter with change_id {change_id!r}")
        self._wake.set()

    def discard(self, change_id: str) -> None:
        """Drop a dead letter for good (the local task keeps its state)."""
        with self._store.write() as conn:
            conn.execute("DELETE FROM outbox WHERE change_id = ? AND state = 'dead'", (change_id,))
            if conn.changes() == 0:
                raise NotFoundError(f"no dead letter with change_id {change_id!r}")
        self._wake.set()

    def conflicts(self) -> list[SyncConflict]:
        """Every task in conflict, with the local change and the server's current task."""
        with self._store.read() as conn:
            rows = fetch_all(
                conn,
                "SELECT task_id, change_id, local_body, server_body, detected_at "
                "FROM sync_conflicts ORDER BY detected_at, task_id",
            )
        return [
            SyncConflict(
                task_id=str(r[0]),
                change_id=str(r[1]),
                local=_json_or_none(r[2]),
                server=_json_or_none(r[3]),
                detected_at=str(r[4]),
            )
            for r in rows
        ]

    def resolve(
        self, task_id: str, keep: Literal["local", "remote"] | Mapping[str, object]
    ) -> None:
        """Settle a conflict; the result is based on the server's current version.

        ``keep="local"``: the local task (as it is now) goes to the server as a new
        change with ``If-Match`` = the server's version. ``keep="remote"``: the local
        task becomes the server's version; nothing is sent. A mapping (a merged wire
        request; ``versionId``/``lastModified`` in it are ignored) becomes the local
        task and is sent as a new change on the server's version. Every open change
        of the task is replaced by that one change.
        """
        merged: Any = None
        if isinstance(keep, Mapping):
            request = {k: v for k, v in keep.items() if k not in _SERVER_FIELDS}
            if request.get("id", task_id) != task_id:
                raise ValidationError.single("id", "must be the conflicted task's id", keep["id"])
            request["id"] = task_id
            merged = decode_task(request)
        elif keep not in ("local", "remote"):
            raise ValidationError.single(
                "keep", "is not an allowed value", keep, "local, remote, or a merged request"
            )
        with self._store.write() as conn:
            rows = fetch_all(
                conn, "SELECT server_body FROM sync_conflicts WHERE task_id = ?", (task_id,)
            )
            if not rows:
                raise NotFoundError(f"task {task_id!r} has no sync conflict")
            server = _json_or_none(rows[0][0])
            current = fetch_all(conn, "SELECT body, version FROM tasks WHERE id = ?", (task_id,))
            top = fetch_all(
                conn,
                "SELECT coalesce(max(version), 0) FROM task_history WHERE task_id = ?",
                (task_id,),
            )[0][0]
            now = timestamps.now()
            conn.execute(
                "DELETE FROM outbox WHERE task_id = ? "
                "AND state IN ('pending', 'in_flight', 'dead', 'conflict')",
                (task_id,),
            )
            conn.execute("DELETE FROM sync_conflicts WHERE task_id = ?", (task_id,))
            if server is None:
                conn.execute("DELETE FROM task_sync WHERE task_id = ?", (task_id,))
            else:
                conn.execute(
                    _UPSERT_SYNC,
                    (task_id, server.get("versionId"), server.get("lastModified"), now),
                )
            if keep == "local":
                if current:
                    enqueue(conn, task_id, "update", current[0][0], int(current[0][1]), now)
                elif server is not None:
                    enqueue(conn, task_id, "delete", None, int(top), now)
            elif keep == "remote":
                if server is None:
                    if current:
                        conn.execute("DELETE FROM tasks WHERE id = ?", (task_id,))
                        conn.execute(
                            _INSERT_HISTORY,
                            (task_id, int(top) + 1, "delete", current[0][0], now, None),
                        )
                else:
                    remote = {k: v for k, v in server.items() if k not in _SERVER_FIELDS}
                    self._write_local(conn, decode_task(remote), bool(current), int(top) + 1, now)
            else:
                body = self._write_local(conn, merged, bool(current), int(top) + 1, now)
                enqueue(conn, task_id, "update", body, int(top), now)
        self._wake.set()

    @staticmethod
    def _write_local(conn: apsw.Connection, task: Any, exists: bool, version: int, now: str) -> str:
        task = _stamp(task, version, now)
        body = _dumps(encode_task(task))
        row = _row(task, version, body)
        if exists:
            conn.execute(_UPDATE_TASK, (*row[1:], task.id))
        else:
            conn.execute(_INSERT_TASK, row)
        conn.execute(
            _INSERT_HISTORY,
            (task.id, version, "update" if exists else "create", body, now, "sync conflict"),
        )
        return body

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
            self._emit()
            if self._stopping:
                break
            wait = None if self._auth_paused else self._wait_seconds()
            if wait is None or wait > 0:
                self._wake.wait(wait)

    def _wait_seconds(self) -> float | None:
        dues = [d for d in (self._offline_until, self._next_due) if d is not None]
        if not dues:
            return None
        return max(min(dues) - time.time(), 0.0)

    def _backoff(self, attempts: int) -> float:
        exponent = min(max(attempts - 1, 0), 60)
        ceiling = min(self._config.backoff_cap, self._config.backoff_base * math.pow(2, exponent))
        return self._rng.uniform(0, ceiling)

    def _deliverable(self) -> int:
        with self._store.read() as conn:
            return int(fetch_all(conn, _DELIVERABLE)[0][0])

    def _store_write_quietly(self, sql: str) -> None:
        with contextlib.suppress(StorageError), self._store.write() as conn:
            conn.execute(sql)

    def _get_transport(self) -> Transport:
        if self._transport is None:
            config = self._config
            self._transport = Transport(
                config.base_url,
                config.token_provider,
                timeout=config.timeout,
                allow_insecure_http=config.allow_insecure_http,
                ca_bundle=config.ca_bundle,
                lanes=config.lanes,
            )
        return self._transport

    def _pass(self) -> None:
        """One pass over the outbox (caller holds the pass lock)."""
        if self._auth_paused:
            self._set_state("auth_required")
            return
        if self._offline_until is not None and self._offline_until > time.time():
            return
        self._offline_until = None
        if not self._recovered:
            with self._store.write() as conn:
                conn.execute("UPDATE outbox SET state = 'pending' WHERE state = 'in_flight'")
            self._recovered = True
        with self._store.read() as conn:
            blocked = {str(r[0]) for r in fetch_all(conn, _PARKED_TASKS)}
        self._next_due = None
        after = 0
        limit = self._config.batch_size
        try:
            while not self._stopping:
                now = timestamps.now()
                with self._store.read() as conn:
                    rows = fetch_all(conn, _SELECT_CHUNK, (after, limit))
                if not rows:
                    break
                batch: list[_Row] = []
                for seq, change_id, task_id, op, payload, attempts, next_at, version in rows:
                    after = int(seq)
                    if task_id in blocked:
                        continue
                    if next_at is not None and next_at > now:
                        blocked.add(task_id)
                        self._note_due(_seconds_until(next_at) + time.time())
                        continue
                    batch.append(
                        _Row(int(seq), change_id, task_id, op, payload, int(attempts), version)
                    )
                if batch:
                    self._set_state("uploading")
                    self._send_batch(batch, blocked)
        except _StopPass:
            return
        if self._next_due is not None:
            self._set_state("backoff")
        else:
            self._set_state("idle")

    def _note_due(self, when: float) -> None:
        if self._next_due is None or when < self._next_due:
            self._next_due = when

    def _send_batch(self, batch: list[_Row], blocked: set[str]) -> None:
        with self._store.write() as conn:
            conn.executemany(
                "UPDATE outbox SET state = 'in_flight' WHERE seq = ? AND state = 'pending'",
                [(row.seq,) for row in batch],
            )
        halt = threading.Event()
        lanes = self._config.lanes
        self._get_transport()  # made here, once, before any lane thread asks for it
        if lanes == 1 or len(batch) < 2 * lanes:
            outcomes = self._send_lane(batch, blocked, halt, 0)
        else:
            # Each task's changes stay in one lane, in order; lanes overlap one
            # request's round trip with another's, over their own connections.
            parts: list[list[_Row]] = [[] for _ in range(lanes)]
            for row in batch:
                parts[zlib.crc32(row.task_id.encode()) % lanes].append(row)
            if self._pool is None:
                self._pool = ThreadPoolExecutor(lanes - 1, thread_name_prefix="clinik-sync-lane")
            futures = [
                self._pool.submit(self._send_lane, part, blocked, halt, lane)
                for lane, part in enumerate(parts[1:], start=1)
            ]
            outcomes = self._send_lane(parts[0], blocked, halt, 0)
            for future in futures:
                outcomes.extend(future.result())
        stop: _StopPass | None = _StopPass() if halt.is_set() else None
        self._record(outcomes)
        self._emit()
        if stop is not None:
            raise stop

    def _send_lane(
        self, rows: list[_Row], blocked: set[str], halt: threading.Event, lane: int
    ) -> list[_Outcome]:
        """Send rows in order; a task that fails stops its later rows (not others')."""
        outcomes: list[_Outcome] = []
        versions: dict[str, str | None] = {}
        for index, row in enumerate(rows):
            if row.task_id in blocked:
                outcomes.append(("unsent", row, {}))
                continue
            if self._stopping or halt.is_set():
                halt.set()
                outcomes.extend(("unsent", r, {}) for r in rows[index:])
                break
            version = versions.get(row.task_id, row.server_version)
            try:
                outcome = self._deliver(row, version, lane)
            except _StopPass:
                halt.set()
                outcomes.extend(("unsent", r, {}) for r in rows[index:])
                break
            outcomes.append(outcome)
            kind, _, extra = outcome
            if kind == "delivered":
                versions[row.task_id] = extra.get("version")
            else:
                blocked.add(row.task_id)
        return outcomes

    def _deliver(self, row: _Row, version: str | None, lane: int) -> _Outcome:
        """Send one change and classify the answer (raises _StopPass to end the pass)."""
        headers = {"Idempotency-Key": row.change_id}
        body: bytes | None = None
        if row.op == "delete":
            if version is None:
                return ("delivered", row, {"version": None, "gone": True})
            method, path = "DELETE", f"/tasks/{row.task_id}"
            headers["If-Match"] = f'"{version}"'
        elif row.op == "update" and version is not None:
            method, path = "PUT", f"/tasks/{row.task_id}"
            headers["If-Match"] = f'"{version}"'
            body = _wire_body(row.payload or "{}", row.task_id)
        else:
            method, path = "POST", "/tasks"
            body = _wire_body(row.payload or "{}", row.task_id)
        transport = self._get_transport()
        try:
            answer = self._send(transport, method, path, body, headers, lane)
        except _ConnectFailed as exc:
            self._last_error = str(exc)
            self._offline_attempts += 1
            self._offline_until = time.time() + self._backoff(self._offline_attempts)
            self._set_state("offline")
            raise _StopPass() from None
        except TransportError as exc:
            return ("transient", row, {"error": str(exc), "status": None})
        except AuthError as exc:
            return self._pause_for_auth(str(exc))
        self._offline_attempts = 0
        status = answer.status
        if status == 401:
            return self._pause_for_auth("the service refused the token (401), also a fresh one")
        if 200 <= status < 300 or (status == 404 and method == "DELETE"):
            data = _json_or_none(answer.body)
            task = data.get("data") if isinstance(data, dict) else None
            gone = method == "DELETE"
            new_version = None
            modified = None
            if isinstance(task, dict) and not gone:
                new_version = task.get("versionId")
                modified = task.get("lastModified")
            return (
                "delivered",
                row,
                {"version": new_version, "modified": modified, "gone": gone},
            )
        if status == 412:
            data = _json_or_none(answer.body)
            server = data.get("data") if isinstance(data, dict) else None
            return ("conflict", row, {"status": status, "body": answer.body, "server": server})
        if status in _TRANSIENT or status >= 500:
            return (
                "transient",
                row,
                {
                    "status": status,
                    "error": f"HTTP {status}",
                    "retry_after": _parse_retry_after(answer.retry_after),
                },
            )
        return ("dead", row, {"status": status, "body": answer.body, "error": f"HTTP {status}"})

    def _send(
        self,
        transport: Transport,
        method: str,
        path: str,
        body: bytes | None,
        headers: dict[str, str],
        lane: int,
    ) -> Response:
        answer = transport.request(method, path, body=body, headers=headers, lane=lane)
        if answer.status == 401:
            transport.refresh_token()  # ask the provider once more, then retry once
            answer = transport.request(method, path, body=body, headers=headers, lane=lane)
        return answer

    def _pause_for_auth(self, message: str) -> _Outcome:
        self._auth_paused = True
        self._last_error = message
        if self._transport is not None:
            self._transport.forget_token()
        self._set_state("auth_required")
        raise _StopPass()

    def _record(self, outcomes: list[_Outcome]) -> None:
        """Write the answers of one batch in one short transaction."""
        now = timestamps.now()
        delivered = False
        with self._store.write() as conn:
            for kind, row, extra in outcomes:
                if kind == "delivered":
                    delivered = True
                    conn.execute("DELETE FROM outbox WHERE seq = ?", (row.seq,))
                    if extra.get("gone"):
                        conn.execute("DELETE FROM task_sync WHERE task_id = ?", (row.task_id,))
                    else:
                        conn.execute(
                            _UPSERT_SYNC, (row.task_id, extra["version"], extra["modified"], now)
                        )
                elif kind == "unsent":
                    conn.execute(
                        "UPDATE outbox SET state = 'pending' WHERE seq = ? AND state = 'in_flight'",
                        (row.seq,),
                    )
                elif kind == "transient":
                    retry_after = extra.get("retry_after")
                    if retry_after is not None:
                        delay = min(float(retry_after), self._config.max_retry_after)
                    else:
                        delay = self._backoff(row.attempts + 1)
                    self._note_due(time.time() + delay)
                    conn.execute(
                        "UPDATE outbox SET state = 'pending', attempts = attempts + 1, "
                        "next_attempt_at = ?, last_error = ?, last_status = ? WHERE seq = ?",
                        (_instant_in(delay), extra.get("error"), extra.get("status"), row.seq),
                    )
                    if not self._auth_paused:
                        self._last_error = extra.get("error")
                elif kind == "dead":
                    conn.execute(
                        "UPDATE outbox SET state = 'dead', attempts = attempts + 1, "
                        "next_attempt_at = ?, last_error = ?, last_status = ?, last_body = ? "
                        "WHERE seq = ?",
                        (now, extra["error"], extra["status"], extra["body"], row.seq),
                    )
                else:  # conflict
                    server = extra.get("server")
                    conn.execute(
                        "UPDATE outbox SET state = 'conflict', attempts = attempts + 1, "
                        "last_error = 'version conflict (412)', last_status = 412, "
                        "last_body = ? WHERE seq = ?",
                        (extra["body"], row.seq),
                    )
                    conn.execute(
                        "INSERT OR REPLACE INTO sync_conflicts "
                        "(task_id, change_id, local_body, server_body, detected_at) "
                        "VALUES (?, ?, ?, ?, ?)",
                        (
                            row.task_id,
                            row.change_id,
                            row.payload,
                            None if server is None else json.dumps(server),
                            now,
                        ),
                    )
        if delivered:
            self._last_success_at = now
