"""The reference clinik Tasks server: the whole sync contract, on loopback, for demos and tests.

It implements ``sync-protocol.md``: writes (``POST``/``PUT``/``DELETE /tasks``) with
bearer auth, ``Idempotency-Key`` replay, ``If-Match`` / ``412`` and ``409 id_conflict``;
reads (``GET /tasks/{id}``, ``GET /tasks`` with filters and paging); the change log
(``GET /tasks/changes``) and bootstrap (``meta.changesCursor`` on the first ``GET /tasks``
page). It runs on Python's ``ThreadingHTTPServer`` with HTTP/1.1 keep-alive and
``TCP_NODELAY``, and keeps its state in its own SQLite database (a file created 0600, or
memory) through apsw. It never imports the local store: it stands in for a remote service.

Use it in-process::

    with ReferenceServer(token="secret") as server:
        server.url                         # "http://127.0.0.1:<free port>/api/v1"
        server.faults.rate = 0.25          # mixed faults on a quarter of the writes
        server.faults.read_rate = 0.25     # ... and of the reads (log pages, listings)
        server.put_task(task)              # a write by "another client" (changeId null)
        server.applied_counts()            # how often each idempotency key was applied

or as its own process: ``CLINIK_TOKEN=secret python -m clinik_local.server --port 8080``
(which calls :func:`serve_forever`). It listens on loopback addresses only, and never
prints its token: it takes it from an environment variable, or writes a random one to a
0600 ``--token-file``.

The change log. Every accepted write (create, replace, delete; by a client or through
the test API) appends one log entry in the same transaction, so the log is in commit
order, never shows an uncommitted write and has no gaps. An entry keeps the task as the
write left it, the write's ``Idempotency-Key`` (its ``changeId``; null for the test
API's writes), and the filter fields (``status``, ``priority``, ``code``, ``patientId``,
``ownerId``, ``requesterId``) just before and just after the write: a filtered log
includes the entry when either side matched. Entry positions are consecutive integers;
a write's ``versionId`` is the decimal text of its position (unique across the server,
increasing; clients must treat it as opaque). A log cursor is ``<epoch>-<position>``,
where the epoch is random per database, so a cursor from another (reset) server
database is answered ``410`` rather than silently skipping writes. Retention:
``log_retention`` (default 7 days) drops entries older than that when the log is read;
``compact_log(keep_last=n)`` drops all but the newest ``n`` now. A ``since`` before the
oldest kept position, or from another epoch, is ``410 cursor_expired``.

Fault injection, per request, set from a test through :attr:`ReferenceServer.faults`.
Writes draw from ``rate``/``kinds``/``script``; reads (every ``GET``: log pages,
listings, single tasks) draw separately from ``read_rate``/``read_kinds``/``read_script``
(both off by default):

``drop_before``  close the connection without answering; nothing applied;
``drop_after``   apply (a read: compute the page), then close without answering; on the
                 log this is a lost log page;
``error_5xx``    answer 503 without applying;
``rate_limit``   answer 429 with ``Retry-After`` (``faults.retry_after``);
``slow``         wait ``faults.slow_seconds``, then handle normally;
``token_expiry`` the current token stops working (401); ``server.token`` is the new one;
``short_page``   reads only: answer a shorter page than asked (at least one item), with
                 ``hasMore`` true (a legal answer clients must page through).

``faults.reject_ids`` answers 422 to every write of those task ids. The scripts are
lists of fault kinds applied, one per request, before any random ones.

Bad requests get the contract's error envelope and status and the server keeps
serving: unknown routes ``404``, wrong methods ``405``, a malformed ``Content-Length``
``400``, a body over 1 MiB ``413``, unknown or repeated query parameters ``400``.
Request bodies may be sent with ``Transfer-Encoding: chunked``. The id ``changes`` is
refused at create (``422``): ``GET /tasks/changes`` is the log, so such a task could
never be read back. An unexpected error is answered ``500 internal_error`` and kept in
:attr:`ReferenceServer.internal_errors` for tests to check.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import random
import re
import secrets
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import timedelta
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

import apsw
import attrs

from .. import timestamps
from ..codec import decode_task, encode_task
from ..errors import ClinikError, NotFoundError, ValidationError
from ..ids import is_valid_id
from ..wire import SERVER_FIELDS as _SERVER_FIELDS
from ..wire import dumps as _dumps

__all__ = [
    "FAULT_KINDS",
    "READ_FAULT_KINDS",
    "FaultKind",
    "Faults",
    "LoopbackHTTPServer",
    "ReferenceServer",
    "ServerStoppedError",
    "serve_forever",
    "serve_in_thread",
]

FaultKind = Literal[
    "drop_before", "drop_after", "error_5xx", "rate_limit", "slow", "token_expiry", "short_page"
]
FAULT_KINDS: tuple[FaultKind, ...] = (
    "drop_before",
    "drop_after",
    "error_5xx",
    "rate_limit",
    "slow",
    "token_expiry",
)
READ_FAULT_KINDS: tuple[FaultKind, ...] = (
    "drop_before",
    "drop_after",
    "error_5xx",
    "rate_limit",
    "slow",
    "short_page",
)
MAX_BODY_BYTES = 1 << 20
_DRAIN_BYTES = 8 << 20  # an over-long body up to this size is read and discarded (see 413)
_RESERVED_IDS = frozenset({"changes"})
_DEFAULT_RETENTION = timedelta(days=7)
# The contract's filter names and the column each one is kept in.
_FILTERS = {
    "patientId": "patient_id",
    "ownerId": "owner_id",
    "requesterId": "requester_id",
    "status": "status",
    "priority": "priority",
    "code": "code",
}
_COLUMNS = tuple(_FILTERS.values())
_CURSOR = re.compile(r"([0-9a-f]{8})-([0-9]{1,18})")
_LIMIT = re.compile(r"[0-9]{1,4}")
_CONTENT_LENGTH = re.compile(r"[0-9]{1,19}")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,8}")

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY, version_id TEXT NOT NULL, last_modified TEXT NOT NULL,
    status TEXT, priority TEXT, code TEXT, patient_id TEXT, owner_id TEXT,
    requester_id TEXT, body TEXT NOT NULL
) WITHOUT ROWID;
-- log: one entry per accepted write, in commit order; seq is the versionId of the write.
-- existed/b_*: the task just before the write; deleted/a_*: just after it.
CREATE TABLE IF NOT EXISTS log (
    seq INTEGER PRIMARY KEY, task_id TEXT NOT NULL, deleted INTEGER NOT NULL, body TEXT,
    change_id TEXT, committed_at REAL NOT NULL, existed INTEGER NOT NULL,
    {", ".join(f"b_{c} TEXT" for c in _COLUMNS)},
    {", ".join(f"a_{c} TEXT" for c in _COLUMNS)}
);
-- meta: epoch (random per database), head (last position), floor (last dropped position).
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
-- idempotency: the stored first answer of every applied key, replayed on a retry.
CREATE TABLE IF NOT EXISTS idempotency (
    key TEXT PRIMARY KEY, method TEXT NOT NULL, path TEXT NOT NULL,
    status INTEGER NOT NULL, body TEXT NOT NULL, created_at TEXT NOT NULL,
    applied INTEGER NOT NULL DEFAULT 1
) WITHOUT ROWID;
-- applied_log: every application of a write, in order (tests check per-task order).
CREATE TABLE IF NOT EXISTS applied_log (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL, task_id TEXT NOT NULL,
    method TEXT NOT NULL
);
"""


class ServerStoppedError(ClinikError, RuntimeError):
    """The reference server was stopped; its database is closed."""


@attrs.define
class Faults:
    """What goes wrong, per request (mutable; set it from a test).

    Writes draw from ``rate``/``kinds``/``script``, reads from
    ``read_rate``/``read_kinds``/``read_script``; ``injected`` and ``injected_reads``
    count what was drawn.
    """

    rate: float = 0.0
    kinds: tuple[FaultKind, ...] = FAULT_KINDS
    script: list[FaultKind] = attrs.field(factory=list)
    reject_ids: set[str] = attrs.field(factory=set)
    retry_after: str = "0"
    slow_seconds: float = 0.05
    seed: int = 0
    injected: dict[str, int] = attrs.field(factory=dict)
    read_rate: float = 0.0
    read_kinds: tuple[FaultKind, ...] = READ_FAULT_KINDS
    read_script: list[FaultKind] = attrs.field(factory=list)
    injected_reads: dict[str, int] = attrs.field(factory=dict)
    _rng: random.Random = attrs.field(init=False, factory=random.Random)
    _read_rng: random.Random = attrs.field(init=False, factory=random.Random)

    def __attrs_post_init__(self) -> None:
        self.reseed(self.seed)

    def reseed(self, seed: int) -> None:
        """Restart the random fault sequences (writes and reads) from ``seed``."""
        self.seed = seed
        self._rng.seed(seed)
        self._read_rng.seed(seed + 1)

    def draw(self) -> FaultKind | None:
        """The fault for the next write, if any (scripted first, then random)."""
        return _draw(self.script, self.rate, self.kinds, self._rng, self.injected)

    def draw_read(self) -> FaultKind | None:
        """The fault for the next read, if any (scripted first, then random)."""
        return _draw(
            self.read_script, self.read_rate, self.read_kinds, self._read_rng, self.injected_reads
        )

    def short_length(self, length: int) -> int:
        """How many of ``length`` items a ``short_page`` answer keeps (1 .. length-1)."""
        return self._read_rng.randint(1, length - 1) if length > 1 else length


def _draw(
    script: list[FaultKind],
    rate: float,
    kinds: tuple[FaultKind, ...],
    rng: random.Random,
    counts: dict[str, int],
) -> FaultKind | None:
    if script:
        kind: FaultKind | None = script.pop(0)
    elif rate > 0 and kinds and rng.random() < rate:
        kind = rng.choice(kinds)
    else:
        kind = None
    if kind is not None:
        counts[kind] = counts.get(kind, 0) + 1
    return kind


class _Answer(Exception):
    """Raised inside a handler to answer with a status and an error envelope."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        data: object = None,
        headers: dict[str, str] | None = None,
        close: bool = False,
    ) -> None:
        super().__init__(message)
        error: dict[str, object] = {"code": code, "message": message}
        if field is not None:
            error["field"] = field
        self.status = status
        self.envelope: dict[str, object] = {"error": error}
        if data is not None:
            self.envelope["data"] = data
        self.headers = headers or {}
        self.close = close  # the request's framing is unknown: answer, then close

    def as_validation_error(self) -> ValidationError:
        """The same refusal as the library's own error (for the in-process test API)."""
        error = self.envelope["error"]
        assert isinstance(error, dict)
        return ValidationError.single(str(error.get("field") or "task"), str(error["message"]))


class _Hangup(Exception):
    """The client went away mid-request: close without answering."""


def _fetch_all(
    conn: apsw.Connection, sql: str, params: Sequence[object] = ()
) -> list[tuple[Any, ...]]:
    """Run one statement and drain it (rows typed loosely for callers)."""
    rows: list[tuple[Any, ...]] = conn.execute(sql, tuple(params)).fetchall()
    return rows


def _create_private(path: str) -> None:
    """Create ``path`` 0600 if it does not exist (SQLite gives its -wal/-shm the same mode)."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))


class _State:
    """The server's data, behind one lock (one SQLite connection).

    Every read and write takes the lock, and a write holds it until its COMMIT: a
    reader never sees an uncommitted write, and log positions follow commit order.
    """

    def __init__(self, db: str) -> None:
        self.lock = threading.Lock()
        self.closed = False
        if db not in ("", ":memory:") and not db.startswith("file:"):
            _create_private(db)
        self.conn = apsw.Connection(db)
        self.conn.set_busy_timeout(5000)
        if db != ":memory:":
            self.conn.pragma("journal_mode", "wal")
            self.conn.pragma("synchronous", "normal")
        with self.transaction("BEGIN IMMEDIATE") as conn:
            old_layout = bool(_fetch_all(conn, "SELECT 1 FROM sqlite_schema WHERE name='changes'"))
            conn.execute(_SCHEMA)
            if not _fetch_all(conn, "SELECT 1 FROM meta WHERE key = 'epoch'"):
                conn.execute(
                    "INSERT INTO meta VALUES ('epoch', ?), ('head', '0'), ('floor', '0')",
                    (secrets.token_hex(4),),
                )
            if old_layout:
                _migrate_changes(conn)
            meta = dict(_fetch_all(conn, "SELECT key, value FROM meta"))
        self.epoch = str(meta["epoch"])

    @contextlib.contextmanager
    def transaction(self, begin: str = "BEGIN") -> Iterator[apsw.Connection]:
        """One transaction under the lock (``BEGIN IMMEDIATE`` for writes)."""
        with self.lock:
            if self.closed:
                raise ServerStoppedError("the reference server is stopped; its database is closed")
            self.conn.execute(begin)
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")

    def write(self) -> contextlib.AbstractContextManager[apsw.Connection]:
        return self.transaction("BEGIN IMMEDIATE")

    def rows(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        with self.transaction() as conn:
            return _fetch_all(conn, sql, params)

    def close(self) -> None:
        with self.lock:
            if not self.closed:
                self.closed = True
                self.conn.close()


def _migrate_changes(conn: apsw.Connection) -> None:
    """Rebuild the log from an older server database's ``changes`` table, then drop it."""
    previous: dict[str, tuple[Any, ...]] = {}
    head = 0
    for seq, task_id, deleted, body in _fetch_all(
        conn, "SELECT seq, task_id, deleted, body FROM changes ORDER BY seq"
    ):
        after = None if deleted or body is None else _filter_values(json.loads(body))
        before = previous.pop(task_id, None)
        _insert_entry(conn, int(seq), task_id, None if after is None else body, None, before, after)
        if after is not None:
            previous[task_id] = after
        head = int(seq)
    conn.execute("UPDATE meta SET value = ? WHERE key = 'head'", (str(head),))
    conn.execute("DROP TABLE changes")


def _filter_values(task: Mapping[str, Any]) -> tuple[Any, ...]:
    """The task's filter fields, in ``_COLUMNS`` order."""
    return tuple(task.get(name) for name in _FILTERS)


def _insert_entry(
    conn: apsw.Connection,
    seq: int,
    task_id: str,
    body: str | None,
    change_id: str | None,
    before: tuple[Any, ...] | None,
    after: tuple[Any, ...] | None,
) -> None:
    empty = (None,) * len(_COLUMNS)
    conn.execute(
        f"INSERT INTO log VALUES ({','.join('?' * (7 + 2 * len(_COLUMNS)))})",
        (
            seq,
            task_id,
            int(after is None),
            body,
            change_id,
            time.time(),
            int(before is not None),
            *(before or empty),
            *(after or empty),
        ),
    )


def _decode_body(raw: bytes, task_id: str | None) -> dict[str, Any]:
    """Validate a task body the way the real service does (400 / 422)."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise _Answer(400, "bad_request", "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise _Answer(400, "bad_request", "the body must be a JSON object")
    for name in _SERVER_FIELDS:
        body.pop(name, None)
    if task_id is not None:
        if body.get("id", task_id) != task_id:
            raise _Answer(422, "validation_error", "id does not match the path", "id")
        body["id"] = task_id
    _check_id(body.get("id"))
    try:
        task = decode_task(body)
    except ValidationError as exc:
        first = exc.errors[0]
        raise _Answer(422, "validation_error", str(exc), first.path) from None
    return encode_task(task)


def _check_id(value: object) -> str:
    if not isinstance(value, str) or not is_valid_id(value):
        raise _Answer(422, "validation_error", "id is missing or malformed", "id")
    if value in _RESERVED_IDS:
        raise _Answer(
            422,
            "validation_error",
            f"the id {value!r} is reserved: GET /tasks/{value} is the change log",
            "id",
        )
    return value


def _parse_query(text: str, allowed: Sequence[str]) -> dict[str, str]:
    """The query string as one value per name; unknown or repeated names are a 400."""
    try:
        pairs = parse_qsl(text, keep_blank_values=True, max_num_fields=64)
    except ValueError:
        raise _Answer(400, "bad_request", "too many query parameters") from None
    query: dict[str, str] = {}
    for name, value in pairs:
        if name not in allowed:
            raise _Answer(
                400,
                "bad_request",
                f"unknown query parameter {name!r}; allowed: {', '.join(allowed)}",
                name,
            )
        if name in query:
            raise _Answer(400, "bad_request", f"{name} is given twice", name)
        query[name] = value
    return query


def _filter_clauses(query: Mapping[str, str], prefix: str) -> tuple[list[str], list[object]]:
    """SQL for the contract's filters on columns named ``prefix + column``."""
    clauses: list[str] = []
    params: list[object] = []
    for name, column in _FILTERS.items():
        if name in query:
            values = [v for v in query[name].split(",") if v]
            if not values:
                raise _Answer(400, "bad_request", f"{name} needs at least one value", name)
            clauses.append(f"{prefix}{column} IN ({','.join('?' * len(values))})")
            params.extend(values)
    return clauses, params


def _limit(text: str | None, default: int) -> int:
    if text is None:
        return default
    if not _LIMIT.fullmatch(text) or not 1 <= int(text) <= 1000:
        raise _Answer(400, "bad_request", "limit must be a whole number 1-1000", "limit")
    return int(text)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    default_request_version = "HTTP/1.0"  # a garbled request line still gets status + headers
    disable_nagle_algorithm = True  # or every keep-alive answer waits ~40 ms (delayed ACK)
    timeout = 60  # a client that stops sending mid-request frees its thread
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests, no token leaks
        return

    # --- plumbing ------------------------------------------------------------------------

    def _send(self, status: int, envelope: object, headers: dict[str, str] | None = None) -> None:
        payload = (envelope if isinstance(envelope, str) else _dumps(envelope)).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if getattr(self, "command", "") != "HEAD":
            self.wfile.write(payload)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (bad request line, huge headers): as an envelope."""
        self.close_connection = True
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        names = {501: "not_implemented", 414: "uri_too_long", 431: "headers_too_large"}
        error = {"code": names.get(code, "bad_request"), "message": message or phrase}
        self._send(code, {"error": error})

    def _drop(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _read_body(self) -> bytes:
        """The request body, framed by Content-Length or chunked; 400/411/413/501 otherwise."""
        lengths = self.headers.get_all("Content-Length") or []
        codings = [
            c.strip().lower()
            for value in self.headers.get_all("Transfer-Encoding") or []
            for c in value.split(",")
        ]
        if codings:
            if lengths:
                raise _Answer(
                    400,
                    "bad_request",
                    "Content-Length and Transfer-Encoding together are refused",
                    close=True,
                )
            if codings != ["chunked"]:
                raise _Answer(
                    501,
                    "not_implemented",
                    "only Transfer-Encoding: chunked is supported",
                    close=True,
                )
            return self._read_chunked()
        if not lengths:
            return b""
        text = lengths[0].strip()
        if len({v.strip() for v in lengths}) != 1 or not _CONTENT_LENGTH.fullmatch(text):
            raise _Answer(
                400, "bad_request", "Content-Length must be one whole number of bytes", close=True
            )
        length = int(text)
        if length > MAX_BODY_BYTES:
            if length <= _DRAIN_BYTES:  # read it away, so the client reads our answer
                self._discard(length)
            raise _Answer(
                413,
                "too_large",
                f"the body is over {MAX_BODY_BYTES} bytes",
                close=length > _DRAIN_BYTES,
            )
        data = self.rfile.read(length) if length else b""
        if len(data) < length:
            raise _Hangup
        return data

    def _discard(self, length: int) -> None:
        while length > 0:
            chunk = self.rfile.read(min(length, 1 << 16))
            if not chunk:
                raise _Hangup
            length -= len(chunk)

    def _read_chunked(self) -> bytes:
        body = bytearray()
        total = 0
        while True:
            line = self.rfile.readline(1024)
            if not line:
                raise _Hangup
            size_text = line.split(b";", 1)[0].strip()
            if not line.endswith(b"\n") or not _CHUNK_SIZE.fullmatch(size_text):
                raise _Answer(400, "bad_request", "malformed chunked body", close=True)
            size = int(size_text, 16)
            if size == 0:
                break
            total += size
            if total > _DRAIN_BYTES:
                raise _Answer(
                    413, "too_large", f"the body is over {MAX_BODY_BYTES} bytes", close=True
                )
            if total > MAX_BODY_BYTES:
                self._discard(size)
            else:
                chunk = self.rfile.read(size)
                if len(chunk) < size:
                    raise _Hangup
                body += chunk
            if self.rfile.readline(3) not in (b"\r\n", b"\n"):
                raise _Answer(400, "bad_request", "malformed chunked body", close=True)
        for _ in range(64):  # trailer fields, ignored, up to the blank line
            line = self.rfile.readline(8192)
            if not line:
                raise _Hangup
            if line in (b"\r\n", b"\n"):
                break
        else:
            raise _Answer(400, "bad_request", "too many trailer fields", close=True)
        if total > MAX_BODY_BYTES:
            raise _Answer(413, "too_large", f"the body is over {MAX_BODY_BYTES} bytes")
        return bytes(body)

    def _route(self, method: str) -> tuple[str, str | None]:
        """(route, task id): route is "collection", "log" or "item"; 404/405 otherwise."""
        path = urlsplit(self.path).path
        base = self.server.owner.base_path
        if not path.startswith(base + "/"):
            raise _Answer(404, "not_found", "no such endpoint")
        segments = path[len(base) + 1 :].removesuffix("/").split("/")
        allowed: tuple[str, ...]
        if segments == ["tasks"]:
            route, task_id, allowed = "collection", None, ("GET", "POST")
        elif segments == ["tasks", "changes"]:
            route, task_id, allowed = "log", None, ("GET",)
        elif len(segments) == 2 and segments[0] == "tasks" and segments[1]:
            route, task_id, allowed = "item", segments[1], ("GET", "PUT", "DELETE")
        else:
            raise _Answer(404, "not_found", "no such endpoint")
        if method not in allowed:
            raise _Answer(
                405,
                "method_not_allowed",
                f"{method} is not allowed here; allowed: {', '.join(allowed)}",
                headers={"Allow": ", ".join(allowed)},
            )
        return route, task_id

    def _dispatch(self, method: str) -> None:
        owner = self.server.owner
        owner.count_request()
        try:
            raw = self._read_body()
            owner.check_auth(self.headers.get("Authorization"))
            route, task_id = self._route(method)
            if method == "GET":
                self._read(route, task_id)
            else:
                self._write(method, task_id, raw)
        except _Answer as answer:
            if answer.close:
                self.close_connection = True
            self._send(answer.status, answer.envelope, answer.headers)
        except _Hangup:
            self.close_connection = True
        except ServerStoppedError:
            self.close_connection = True
            self._send(503, {"error": {"code": "unavailable", "message": "the server is stopping"}})
        except OSError:  # the client went away or stopped sending (socket timeout)
            self.close_connection = True
        except Exception:
            owner.internal_errors.append(traceback.format_exc())
            self.close_connection = True
            self._send(500, {"error": {"code": "internal_error", "message": "internal error"}})

    def _injected(self, fault: FaultKind | None) -> bool:
        """Act on the faults that happen before handling; True when the request is done."""
        owner = self.server.owner
        if fault == "token_expiry":
            owner.expire_token()
            raise _Answer(401, "unauthorized", "the token has expired")
        if fault == "drop_before":
            self._drop()
            return True
        if fault == "error_5xx":
            raise _Answer(503, "unavailable", "injected server error")
        if fault == "rate_limit":
            raise _Answer(
                429,
                "rate_limited",
                "slow down",
                headers={"Retry-After": owner.faults.retry_after},
            )
        if fault == "slow":
            time.sleep(owner.faults.slow_seconds)
        return False

    def _read(self, route: str, task_id: str | None) -> None:
        owner = self.server.owner
        query = urlsplit(self.path).query
        if route == "collection":
            parsed = _parse_query(query, (*_FILTERS, "limit", "cursor"))
        elif route == "log":
            parsed = _parse_query(query, (*_FILTERS, "limit", "since"))
        else:
            parsed = _parse_query(query, ())
        fault = owner.faults_draw(read=True)
        if self._injected(fault):
            return
        short = fault == "short_page"
        if route == "collection":
            envelope: dict[str, object] = owner.search(parsed, short_page=short)
        elif route == "log":
            envelope = owner.changes(parsed, short_page=short)
        else:
            assert task_id is not None
            envelope = {"data": owner.get(task_id), "meta": {}}
        if fault == "drop_after":
            self._drop()
            return
        self._send(200, envelope)

    def _write(self, method: str, task_id: str | None, raw: bytes) -> None:
        owner = self.server.owner
        key = self.headers.get("Idempotency-Key")
        if not key:
            raise _Answer(400, "missing_idempotency_key", "writes need an Idempotency-Key")
        fault = owner.faults_draw(read=False)
        if self._injected(fault):
            return
        if_match = self.headers.get("If-Match")
        status, envelope = owner.apply(method, task_id, raw, key, if_match)
        if fault == "drop_after":
            self._drop()
            return
        self._send(status, envelope)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")


class LoopbackHTTPServer(ThreadingHTTPServer):
    """The HTTP server under the test servers (this one and the HAPI-like FHIR one):
    a thread per connection, never holding the process open, a deep accept queue for
    many sync lanes, and a client that went away mid-answer (killed, timed out) is not
    an error: it is normal here."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


def serve_in_thread(httpd: ThreadingHTTPServer, name: str) -> threading.Thread:
    """Start ``httpd.serve_forever`` on a daemon thread called ``name`` (stopped by
    ``httpd.shutdown()``); returns the thread, for the caller to join."""
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name=name, daemon=True
    )
    thread.start()
    return thread


class _HTTPServer(LoopbackHTTPServer):
    owner: ReferenceServer


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


def _check_loopback(host: str) -> None:
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValidationError.single(
            "host",
            "the reference server listens on loopback only",
            host,
            allowed="127.0.0.1 (any 127.0.0.0/8 address), ::1 or localhost",
        )


class ReferenceServer:
    """A real HTTP server implementing the sync contract, on a loopback ``host``.

    ``port=0`` picks a free port; :attr:`url` is the base URL to configure a client
    with. ``db`` is a SQLite file (created 0600), or ``":memory:"``. ``token`` is the
    bearer token it accepts (``None``: a random one; read :attr:`token`).
    ``log_retention`` is how long the change log keeps entries (a ``timedelta`` or
    seconds; ``None``: forever). A non-loopback ``host``, or a port out of range or in
    use, is a :class:`~clinik_local.errors.ValidationError` naming it.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        db: str = ":memory:",
        token: str | None = None,
        base_path: str = "/api/v1",
        faults: Faults | None = None,
        log_retention: timedelta | float | None = _DEFAULT_RETENTION,
    ) -> None:
        _check_loopback(host)
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValidationError.single("port", "not a TCP port", port, allowed="0-65535")
        self.host = host
        self.base_path = base_path.rstrip("/")
        self.faults = faults if faults is not None else Faults()
        if isinstance(log_retention, timedelta):
            log_retention = log_retention.total_seconds()
        self.log_retention: float | None = log_retention
        self.internal_errors: list[str] = []
        self._token = token if token is not None else secrets.token_urlsafe(16)
        self._token_lock = threading.Lock()
        self._faults_lock = threading.Lock()
        self._requests = 0
        server_class = _HTTPServer6 if ":" in host else _HTTPServer
        try:
            self._httpd = server_class((host, port), _Handler)
        except OSError as exc:
            raise ValidationError.single(
                "port", f"cannot listen on {host} port {port}: {exc.strerror or exc}"
            ) from None
        self._httpd.owner = self
        self.port: int = self._httpd.server_address[1]
        try:
            self._state = _State(db)
        except BaseException:
            self._httpd.server_close()
            raise
        self._thread: threading.Thread | None = None

    # --- running -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The base URL of the API, e.g. ``http://127.0.0.1:54321/api/v1``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{self.base_path}"

    def start(self) -> ReferenceServer:
        """Serve on a background thread; returns self."""
        if self._state.closed:
            raise ServerStoppedError("a stopped reference server cannot start again")
        if self._thread is None:
            self._thread = serve_in_thread(self._httpd, "clinik-reference-server")
        return self

    def serve_forever(self) -> None:
        """Serve on this thread until interrupted."""
        self._httpd.serve_forever(poll_interval=0.2)

    def stop(self) -> None:
        """Stop serving and close the socket and the database (twice is harmless)."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()
        self._state.close()

    def __enter__(self) -> ReferenceServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- auth and faults ---------------------------------------------------------------------

    @property
    def token(self) -> str:
        """The bearer token accepted right now."""
        with self._token_lock:
            return self._token

    def expire_token(self) -> str:
        """The current token stops working; returns the new one."""
        with self._token_lock:
            self._token = secrets.token_urlsafe(16)
            return self._token

    def check_auth(self, header: str | None) -> None:
        expected = f"Bearer {self.token}"
        if header is None or not secrets.compare_digest(header.encode(), expected.encode()):
            raise _Answer(401, "unauthorized", "missing, expired or revoked token")

    def faults_draw(self, *, read: bool = False) -> FaultKind | None:
        with self._faults_lock:
            kind = self.faults.draw_read() if read else self.faults.draw()
        if kind == "short_page" and not read:
            return None
        return kind

    def count_request(self) -> None:
        with self._faults_lock:
            self._requests += 1

    @property
    def requests(self) -> int:
        """How many requests arrived (any method, any outcome)."""
        return self._requests

    # --- writes ------------------------------------------------------------------------

    def apply(
        self, method: str, task_id: str | None, raw: bytes, key: str, if_match: str | None
    ) -> tuple[int, str]:
        """Apply one write (or replay the stored answer of its key): (status, body)."""
        path = "/tasks" if task_id is None else f"/tasks/{task_id}"
        try:
            body = None if method == "DELETE" else _decode_body(raw, task_id)
        except _Answer as answer:
            return answer.status, _dumps(answer.envelope)
        target = task_id if task_id is not None else str(body["id"] if body else "")
        if target in self.faults.reject_ids:
            return 422, _dumps(
                {"error": {"code": "rejected", "message": "this task is refused", "field": "id"}}
            )
        expected = None if if_match is None else if_match.strip().removeprefix("W/").strip('"')
        with self._state.write() as conn:
            stored = _fetch_all(
                conn, "SELECT method, path, status, body FROM idempotency WHERE key = ?", (key,)
            )
            if stored:
                s_method, s_path, s_status, s_body = stored[0]
                if (s_method, s_path) != (method, path):
                    return 422, _dumps(
                        {
                            "error": {
                                "code": "idempotency_key_reused",
                                "message": "this Idempotency-Key was used for another request",
                            }
                        }
                    )
                return int(s_status), str(s_body)
            try:
                status, envelope = self._apply(conn, method, target, body, expected, key)
            except _Answer as answer:
                return answer.status, _dumps(answer.envelope)
            text = _dumps(envelope)
            conn.execute(
                "INSERT INTO idempotency (key, method, path, status, body, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (key, method, path, status, text, timestamps.now()),
            )
            conn.execute(
                "INSERT INTO applied_log (key, task_id, method) VALUES (?, ?, ?)",
                (key, target, method),
            )
        return status, text

    def _apply(
        self,
        conn: apsw.Connection,
        method: str,
        task_id: str,
        body: dict[str, Any] | None,
        expected: str | None,
        change_id: str | None,
    ) -> tuple[int, dict[str, object]]:
        """One write inside the caller's transaction, with its log entry."""
        rows = _fetch_all(conn, "SELECT body FROM tasks WHERE id = ?", (task_id,))
        current: dict[str, Any] | None = json.loads(rows[0][0]) if rows else None
        if method == "POST":
            if current is not None:
                raise _Answer(409, "id_conflict", f"a task with id {task_id!r} exists", "id")
        elif current is None:
            raise _Answer(404, "not_found", f"no task with id {task_id!r}")
        elif expected is not None and expected != "*" and expected != current["versionId"]:
            raise _Answer(
                412, "version_conflict", "the task changed since that version", data=current
            )
        seq = int(_fetch_all(conn, "SELECT value FROM meta WHERE key = 'head'")[0][0]) + 1
        conn.execute("UPDATE meta SET value = ? WHERE key = 'head'", (str(seq),))
        before = None if current is None else _filter_values(current)
        if method == "DELETE":
            conn.execute("DELETE FROM tasks WHERE id = ?", (task_id,))
            _insert_entry(conn, seq, task_id, None, change_id, before, None)
            return 200, {"data": {"id": task_id, "deleted": True}, "meta": {}}
        assert body is not None
        task = {**body, "versionId": str(seq), "lastModified": timestamps.now()}
        text = _dumps(task)
        after = _filter_values(task)
        _insert_entry(conn, seq, task_id, text, change_id, before, after)
        conn.execute(
            f"INSERT OR REPLACE INTO tasks (id, version_id, last_modified, {', '.join(_COLUMNS)}, "
            "body) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (task_id, task["versionId"], task["lastModified"], *after, text),
        )
        return (201 if method == "POST" else 200), {"data": task, "meta": {}}

    # --- reads -------------------------------------------------------------------------

    def get(self, task_id: str) -> dict[str, Any]:
        rows = self._state.rows("SELECT body FROM tasks WHERE id = ?", (task_id,))
        if not rows:
            raise _Answer(404, "not_found", f"no task with id {task_id!r}")
        result: dict[str, Any] = json.loads(rows[0][0])
        return result

    def search(self, query: Mapping[str, str], *, short_page: bool = False) -> dict[str, object]:
        """One page of ``GET /tasks`` (the first page also carries ``changesCursor``)."""
        clauses, params = _filter_clauses(query, "")
        limit = _limit(query.get("limit"), 20)
        first = not query.get("cursor")
        if not first:
            if not is_valid_id(query["cursor"]):
                raise _Answer(400, "bad_request", "cursor must be a nextCursor of /tasks", "cursor")
            clauses.append("id > ?")
            params.append(query["cursor"])
        where = " AND ".join(clauses) or "1"
        # The page and the log position in one read transaction: writes after this
        # position are exactly those the page may not show.
        with self._state.transaction() as conn:
            head = self._head(conn)
            rows = _fetch_all(
                conn,
                f"SELECT id, body FROM tasks WHERE {where} ORDER BY id LIMIT ?",
                [*params, limit + 1],
            )
        more = len(rows) > limit
        rows = rows[:limit]
        if short_page and len(rows) > 1:
            rows = rows[: self.faults.short_length(len(rows))]
            more = True
        meta: dict[str, object] = {"nextCursor": rows[-1][0] if more else None, "hasMore": more}
        if first:
            meta["changesCursor"] = self._cursor(head)
        return {"data": [json.loads(r[1]) for r in rows], "meta": meta}

    def changes(self, query: Mapping[str, str], *, short_page: bool = False) -> dict[str, object]:
        """One page of ``GET /tasks/changes``: the log after ``since``, oldest first."""
        limit = _limit(query.get("limit"), 100)
        before, params_before = _filter_clauses(query, "b_")
        after, params_after = _filter_clauses(query, "a_")
        since_text = query.get("since") or None
        with self._state.write() as conn:  # a write: it may drop expired entries first
            self._expire(conn)
            floor = int(_fetch_all(conn, "SELECT value FROM meta WHERE key = 'floor'")[0][0])
            since = floor if since_text is None else self._position(since_text, conn, floor)
            sql = "SELECT seq, task_id, deleted, body, change_id FROM log WHERE seq > ?"
            params: list[object] = [since]
            if before:
                sql += (
                    f" AND ((existed AND {' AND '.join(before)})"
                    f" OR (NOT deleted AND {' AND '.join(after)}))"
                )
                params += [*params_before, *params_after]
            rows = _fetch_all(conn, sql + " ORDER BY seq LIMIT ?", [*params, limit + 1])
        more = len(rows) > limit
        rows = rows[:limit]
        if short_page and len(rows) > 1:
            rows = rows[: self.faults.short_length(len(rows))]
            more = True
        items: list[dict[str, object]] = []
        for seq, task_id, deleted, body, change_id in rows:
            item: dict[str, object] = {"id": task_id, "deleted": bool(deleted)}
            if not deleted:
                item["task"] = json.loads(body)
            item["versionId"] = str(seq)
            item["changeId"] = change_id
            items.append(item)
        cursor = self._cursor(rows[-1][0]) if rows else (since_text or self._cursor(since))
        return {"data": items, "meta": {"nextCursor": cursor, "hasMore": more}}

    def _head(self, conn: apsw.Connection) -> int:
        return int(_fetch_all(conn, "SELECT value FROM meta WHERE key = 'head'")[0][0])

    def _cursor(self, position: int) -> str:
        return f"{self._state.epoch}-{position}"

    def _position(self, text: str, conn: apsw.Connection, floor: int) -> int:
        """The log position a ``since`` cursor names: 400 if forged, 410 if expired."""
        match = _CURSOR.fullmatch(text)
        if match is None:
            raise _Answer(
                400, "bad_request", "since must be a nextCursor or changesCursor", "since"
            )
        if match[1] != self._state.epoch:
            raise _Answer(
                410, "cursor_expired", "this cursor is from another server database", "since"
            )
        position = int(match[2])
        if position > self._head(conn):
            raise _Answer(400, "bad_request", "since names a position this log never had", "since")
        if position < floor:
            raise _Answer(410, "cursor_expired", "the log no longer reaches back to since", "since")
        return position

    def _expire(self, conn: apsw.Connection) -> None:
        """Drop the entries older than ``log_retention`` (a prefix of the log)."""
        if self.log_retention is None:
            return
        cutoff = time.time() - self.log_retention
        last = _fetch_all(conn, "SELECT max(seq) FROM log WHERE committed_at < ?", (cutoff,))
        if last[0][0] is not None:
            self._drop_through(conn, int(last[0][0]))

    def _drop_through(self, conn: apsw.Connection, position: int) -> None:
        conn.execute("DELETE FROM log WHERE seq <= ?", (position,))
        conn.execute(
            "UPDATE meta SET value = ? WHERE key = 'floor' AND CAST(value AS INTEGER) < ?",
            (str(position), position),
        )

    # --- what tests look at and do ------------------------------------------------------

    def tasks(self) -> dict[str, dict[str, Any]]:
        """Every live task on the server, by id (wire form, with versionId/lastModified)."""
        return {str(r[0]): json.loads(r[1]) for r in self._state.rows("SELECT id, body FROM tasks")}

    def applied_counts(self) -> dict[str, int]:
        """How many times each idempotency key was applied (1 is the only right answer)."""
        return {
            str(k): int(n)
            for k, n in self._state.rows("SELECT key, count(*) FROM applied_log GROUP BY key")
        }

    def applied_log(self) -> list[tuple[str, str, str]]:
        """Every applied write in order: (idempotency key, task id, method)."""
        return [
            (str(k), str(t), str(m))
            for k, t, m in self._state.rows(
                "SELECT key, task_id, method FROM applied_log ORDER BY seq"
            )
        ]

    def changes_cursor(self) -> str:
        """The log position right now (what a ``changesCursor`` taken now would be)."""
        with self._state.transaction() as conn:
            return self._cursor(self._head(conn))

    def compact_log(self, keep_last: int = 0) -> str:
        """Drop all but the newest ``keep_last`` log entries; returns the oldest valid cursor.

        A ``since`` before the returned cursor is answered ``410 cursor_expired``.
        """
        if keep_last < 0:
            raise ValidationError.single("keep_last", "must be 0 or more", keep_last)
        with self._state.write() as conn:
            head = self._head(conn)
            self._drop_through(conn, max(0, head - keep_last))
            floor = int(_fetch_all(conn, "SELECT value FROM meta WHERE key = 'floor'")[0][0])
        return self._cursor(floor)

    def put_task(self, task: Mapping[str, Any], *, validate: bool = True) -> dict[str, Any]:
        """Create or replace a task as another client would (no key: changeId null).

        ``validate=False`` stores the wire form as given (only the id is checked), e.g. a
        field this clinik-local version does not know, or a text over its limits.
        Returns the task as stored, with its new versionId.
        """
        try:
            if validate:
                body = _decode_body(_dumps(task).encode(), None)
            else:
                body = {k: v for k, v in task.items() if k not in _SERVER_FIELDS}
                _check_id(body.get("id"))
            with self._state.write() as conn:
                exists = _fetch_all(conn, "SELECT 1 FROM tasks WHERE id = ?", (body["id"],))
                method = "PUT" if exists else "POST"
                _, envelope = self._apply(conn, method, body["id"], body, None, None)
        except _Answer as answer:
            raise answer.as_validation_error() from None
        result: dict[str, Any] = envelope["data"]  # type: ignore[assignment]
        return result

    def put_tasks(self, tasks: Iterable[Mapping[str, Any]]) -> int:
        """:meth:`put_task` of many tasks in ONE write transaction (each validated, each its
        own log entry, in order); how many. For seeding large test and benchmark data
        without one HTTP call (or one transaction) per task; all or nothing."""
        try:
            bodies = [_decode_body(_dumps(task).encode(), None) for task in tasks]
            with self._state.write() as conn:
                for body in bodies:
                    exists = _fetch_all(conn, "SELECT 1 FROM tasks WHERE id = ?", (body["id"],))
                    self._apply(conn, "PUT" if exists else "POST", body["id"], body, None, None)
        except _Answer as answer:
            raise answer.as_validation_error() from None
        return len(bodies)

    def update_task(
        self, task_id: str, changes: Mapping[str, Any], *, validate: bool = True
    ) -> dict[str, Any]:
        """Change some fields of a task as another client would (``None`` removes a field).

        Raises :class:`~clinik_local.errors.NotFoundError` when there is no such task.
        """
        rows = self._state.rows("SELECT body FROM tasks WHERE id = ?", (task_id,))
        if not rows:
            raise NotFoundError(f"no task with id {task_id!r} on the server")
        current = json.loads(rows[0][0])
        merged = {**current, **changes, "id": task_id}
        return self.put_task({k: v for k, v in merged.items() if v is not None}, validate=validate)

    def delete_task(self, task_id: str) -> None:
        """Delete a task as another client would (a log entry with changeId null).

        Raises :class:`~clinik_local.errors.NotFoundError` when there is no such task.
        """
        try:
            with self._state.write() as conn:
                self._apply(conn, "DELETE", task_id, None, None, None)
        except _Answer:
            raise NotFoundError(f"no task with id {task_id!r} on the server") from None


def _write_token_file(path: str, token: str) -> None:
    """Write ``token`` to a new or truncated file readable by its owner only."""
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.write(token + "\n")


def serve_forever(
    host: str = "127.0.0.1",
    port: int = 8080,
    db: str = ":memory:",
    token: str | None = None,
    *,
    token_file: str | None = None,
    announce: bool = True,
) -> None:
    """Run a :class:`ReferenceServer` in this process until interrupted.

    The bearer token is ``token``; without one, a random token is written to
    ``token_file`` (created 0600). The token is never printed. With ``announce``,
    prints one line ``listening on <url>`` to stdout first (a parent process reads it
    to learn the port when ``port=0``).
    """
    if not token:
        if token_file is None:
            raise ValidationError.single(
                "token", "give the bearer token to accept, or a file to write a random one to"
            )
        token = secrets.token_urlsafe(24)
    server = ReferenceServer(host=host, port=port, db=db, token=token)
    try:
        if token_file is not None:
            try:
                _write_token_file(token_file, token)
            except OSError as exc:
                raise ValidationError.single(
                    "token_file", f"cannot write it: {exc.strerror or exc}", token_file
                ) from None
        if announce:
            print(f"listening on {server.url}", flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """``CLINIK_TOKEN=T python -m clinik_local.server --port N [--db FILE]``."""
    parser = argparse.ArgumentParser(prog="python -m clinik_local.server")
    parser.add_argument("--host", default="127.0.0.1", help="a loopback address")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--db", default=":memory:")
    parser.add_argument(
        "--token-env", default="CLINIK_TOKEN", help="variable holding the bearer token"
    )
    parser.add_argument(
        "--token-file", default=None, help="without the variable: write a random token here"
    )
    args = parser.parse_args(argv)
    try:
        serve_forever(
            args.host,
            args.port,
            args.db,
            os.environ.get(args.token_env),
            token_file=args.token_file,
        )
    except ClinikError as exc:
        print(f"clinik-local server: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
