"""The reference clinik Tasks server: the whole sync contract, on 127.0.0.1, for demos and tests.

It implements ``sync-protocol.md`` (``POST``/``PUT``/``DELETE /tasks``, reads, the
changes feed, bearer auth, ``Idempotency-Key`` replay, ``If-Match`` / ``412``,
``409 id_conflict``) on Python's ``ThreadingHTTPServer`` with HTTP/1.1 keep-alive and
``TCP_NODELAY``. State lives in its own SQLite database (a file, or memory) through apsw.

Use it in-process::

    with ReferenceServer(token="secret") as server:
        server.url            # "http://127.0.0.1:<free port>"
        server.faults.rate = 0.25          # mixed faults on a quarter of the writes
        server.applied_counts()            # how often each idempotency key was applied

or as its own process: ``python -m clinik_local.server --port 8080`` (which calls
:func:`serve_forever`). Fault injection, per test, on writes only:

``drop_before``  close the connection without answering, nothing applied;
``drop_after``   apply, then close the connection without answering;
``error_5xx``    answer 503 without applying;
``rate_limit``   answer 429 with ``Retry-After`` (``faults.retry_after``);
``slow``         wait ``faults.slow_seconds``, then handle normally;
``token_expiry`` the current token stops working (401); ``server.token`` is the new one.

``faults.reject_ids`` answers 422 to every write of those task ids. ``faults.script``
is a list of fault kinds applied, one per write, before any random ones.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import secrets
import socket
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

import apsw
import attrs

from .. import timestamps
from ..codec import decode_task, encode_task
from ..errors import ValidationError
from ..ids import is_valid_id
from ..wire import SERVER_FIELDS as _SERVER_FIELDS
from ..wire import dumps as _dumps

__all__ = ["FAULT_KINDS", "FaultKind", "Faults", "ReferenceServer", "serve_forever"]

FaultKind = Literal["drop_before", "drop_after", "error_5xx", "rate_limit", "slow", "token_expiry"]
FAULT_KINDS: tuple[FaultKind, ...] = (
    "drop_before",
    "drop_after",
    "error_5xx",
    "rate_limit",
    "slow",
    "token_expiry",
)
MAX_BODY_BYTES = 1 << 20
_FILTERS = {
    "patientId": "patient_id",
    "ownerId": "owner_id",
    "requesterId": "requester_id",
    "status": "status",
    "priority": "priority",
    "code": "code",
}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY, version_id TEXT NOT NULL, last_modified TEXT NOT NULL,
    status TEXT, priority TEXT, code TEXT, patient_id TEXT, owner_id TEXT,
    requester_id TEXT, body TEXT NOT NULL
) WITHOUT ROWID;
-- changes: the feed; seq doubles as the versionId of the write (unique, increasing).
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, task_id TEXT NOT NULL,
    deleted INTEGER NOT NULL, body TEXT
);
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


@attrs.define
class Faults:
    """What goes wrong, per write request (mutable; set it from a test)."""

    rate: float = 0.0
    kinds: tuple[FaultKind, ...] = FAULT_KINDS
    script: list[FaultKind] = attrs.field(factory=list)
    reject_ids: set[str] = attrs.field(factory=set)
    retry_after: str = "0"
    slow_seconds: float = 0.05
    seed: int = 0
    injected: dict[str, int] = attrs.field(factory=dict)
    _rng: random.Random = attrs.field(init=False, factory=random.Random)

    def __attrs_post_init__(self) -> None:
        self._rng.seed(self.seed)

    def reseed(self, seed: int) -> None:
        """Restart the random fault sequence from ``seed``."""
        self.seed = seed
        self._rng.seed(seed)

    def draw(self) -> FaultKind | None:
        """The fault for the next write, if any (scripted first, then random)."""
        if self.script:
            kind: FaultKind | None = self.script.pop(0)
        elif self.rate > 0 and self.kinds and self._rng.random() < self.rate:
            kind = self._rng.choice(self.kinds)
        else:
            kind = None
        if kind is not None:
            self.injected[kind] = self.injected.get(kind, 0) + 1
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


def fetch_all(
    conn: apsw.Connection, sql: str, params: tuple[object, ...] = ()
) -> list[tuple[Any, ...]]:
    """Run one statement and drain it. The server's own helper: it stands in for the
    remote service and shares no storage code with the local store."""
    rows: list[tuple[Any, ...]] = conn.execute(sql, params).fetchall()
    return rows


class _State:
    """The server's data, behind one lock (one SQLite connection)."""

    def __init__(self, db: str) -> None:
        self.lock = threading.Lock()
        self.conn = apsw.Connection(db)
        self.conn.set_busy_timeout(5000)
        if db != ":memory:":
            self.conn.pragma("journal_mode", "wal")
            self.conn.pragma("synchronous", "normal")
        self.conn.execute(_SCHEMA)

    @contextlib.contextmanager
    def write(self) -> Iterator[apsw.Connection]:
        with self.lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")

    def rows(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        with self.lock:
            return fetch_all(self.conn, sql, tuple(params))


def _decode_body(raw: bytes, task_id: str | None) -> dict[str, Any]:
    """Validate a task body the way the real service does (400 / 422)."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise _Answer(400, "bad_request", "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise _Answer(400, "bad_request", "the body must be a JSON object")
    for name in _SERVER_FIELDS:
        body.pop(name, None)
    if task_id is not None:
        if body.get("id", task_id) != task_id:
            raise _Answer(422, "validation_error", "id does not match the path", "id")
        body["id"] = task_id
    if not isinstance(body.get("id"), str) or not is_valid_id(body["id"]):
        raise _Answer(422, "validation_error", "id is missing or malformed", "id")
    try:
        task = decode_task(body)
    except ValidationError as exc:
        first = exc.errors[0]
        raise _Answer(422, "validation_error", str(exc), first.path) from None
    return encode_task(task)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    disable_nagle_algorithm = True  # or every keep-alive answer waits ~40 ms (delayed ACK)
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
        self.end_headers()
        self.wfile.write(payload)

    def _drop(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            raise _Answer(413, "too_large", f"the body is over {MAX_BODY_BYTES} bytes")
        return self.rfile.read(length) if length else b""

    def _dispatch(self, method: str) -> None:
        owner = self.server.owner
        owner.count_request()
        try:
            raw = self._read_body()
            owner.check_auth(self.headers.get("Authorization"))
            parts = urlsplit(self.path)
            path = parts.path.rstrip("/")
            base = owner.base_path
            if not path.startswith(base + "/tasks") and path != base + "/tasks":
                raise _Answer(404, "not_found", "no such endpoint")
            rest = path[len(base) + len("/tasks") :]
            query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
            if method == "GET":
                if rest == "":
                    self._send(200, owner.search(query))
                elif rest == "/changes":
                    self._send(200, owner.changes(query))
                else:
                    self._send(200, {"data": owner.get(rest[1:]), "meta": {}})
                return
            task_id = rest[1:] if rest.startswith("/") else None
            if (method == "POST") != (task_id is None):
                raise _Answer(405, "method_not_allowed", f"{method} is not allowed here")
            self._write(method, task_id, raw)
        except _Answer as answer:
            self._send(answer.status, answer.envelope, answer.headers)

    def _write(self, method: str, task_id: str | None, raw: bytes) -> None:
        owner = self.server.owner
        key = self.headers.get("Idempotency-Key")
        if not key:
            raise _Answer(400, "missing_idempotency_key", "writes need an Idempotency-Key")
        fault = owner.faults_draw()
        if fault == "token_expiry":
            owner.expire_token()
            raise _Answer(401, "unauthorized", "the token has expired")
        if fault == "drop_before":
            self._drop()
            return
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


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    owner: ReferenceServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that went away mid-answer (killed, timed out) is normal here.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class ReferenceServer:
    """A real HTTP server implementing the sync contract, on ``host`` (127.0.0.1).

    ``port=0`` picks a free port; :attr:`url` is the base URL to configure a client
    with. ``db`` is a SQLite file, or ``":memory:"``. ``token`` is the bearer token
    it accepts (``None``: a random one; read :attr:`token`).
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
    ) -> None:
        self.host = host
        self.base_path = base_path.rstrip("/")
        self.faults = faults if faults is not None else Faults()
        self._state = _State(db)
        self._token = token if token is not None else secrets.token_urlsafe(16)
        self._token_lock = threading.Lock()
        self._faults_lock = threading.Lock()
        self._requests = 0
        self._httpd = _HTTPServer((host, port), _Handler)
        self._httpd.owner = self
        self.port: int = self._httpd.server_address[1]
        self._thread: threading.Thread | None = None

    # --- running -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The base URL of the API, e.g. ``http://127.0.0.1:54321/api/v1``."""
        return f"http://{self.host}:{self.port}{self.base_path}"

    def start(self) -> ReferenceServer:
        """Serve on a background thread; returns self."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._httpd.serve_forever,
                kwargs={"poll_interval": 0.05},
                name="clinik-reference-server",
                daemon=True,
            )
            self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve on this thread until interrupted."""
        self._httpd.serve_forever(poll_interval=0.2)

    def stop(self) -> None:
        """Stop serving and close the socket and the database."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()
        with self._state.lock:
            self._state.conn.close()

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

    def faults_draw(self) -> FaultKind | None:
        with self._faults_lock:
            return self.faults.draw()

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
            stored = fetch_all(
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
                status, envelope = self._apply(conn, method, target, body, expected)
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
    ) -> tuple[int, dict[str, object]]:
        rows = fetch_all(conn, "SELECT version_id, body FROM tasks WHERE id = ?", (task_id,))
        current = json.loads(rows[0][1]) if rows else None
        if method == "POST":
            if current is not None:
                raise _Answer(409, "id_conflict", f"a task with id {task_id!r} exists", "id")
        elif current is None:
            raise _Answer(404, "not_found", f"no task with id {task_id!r}")
        elif expected is not None and expected != "*" and expected != current["versionId"]:
            raise _Answer(
                412, "version_conflict", "the task changed since that version", data=current
            )
        if method == "DELETE":
            conn.execute("DELETE FROM tasks WHERE id = ?", (task_id,))
            conn.execute("INSERT INTO changes (task_id, deleted) VALUES (?, 1)", (task_id,))
            return 200, {"data": {"id": task_id, "deleted": True}, "meta": {}}
        assert body is not None
        conn.execute("INSERT INTO changes (task_id, deleted) VALUES (?, 0)", (task_id,))
        seq = conn.last_insert_rowid()
        task = {**body, "versionId": str(seq), "lastModified": timestamps.now()}
        text = _dumps(task)
        conn.execute("UPDATE changes SET body = ? WHERE seq = ?", (text, seq))
        conn.execute(
            "INSERT OR REPLACE INTO tasks (id, version_id, last_modified, status, priority, "
            "code, patient_id, owner_id, requester_id, body) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (
                task_id,
                task["versionId"],
                task["lastModified"],
                task.get("status"),
                task.get("priority"),
                task.get("code"),
                task.get("patientId"),
                task.get("ownerId"),
                task.get("requesterId"),
                text,
            ),
        )
        return (201 if method == "POST" else 200), {"data": task, "meta": {}}

    # --- reads -------------------------------------------------------------------------

    def get(self, task_id: str) -> dict[str, Any]:
        rows = self._state.rows("SELECT body FROM tasks WHERE id = ?", (task_id,))
        if not rows:
            raise _Answer(404, "not_found", f"no task with id {task_id!r}")
        result: dict[str, Any] = json.loads(rows[0][0])
        return result

    def search(self, query: dict[str, str]) -> dict[str, object]:
        clauses: list[str] = []
        params: list[object] = []
        for name, column in _FILTERS.items():
            if name in query:
                values = [v for v in query[name].split(",") if v]
                clauses.append(f"{column} IN ({','.join('?' * len(values))})")
                params.extend(values)
        limit = _limit(query.get("limit"), 20)
        if query.get("cursor"):
            clauses.append("id > ?")
            params.append(query["cursor"])
        where = " AND ".join(clauses) or "1"
        rows = self._state.rows(
            f"SELECT id, body FROM tasks WHERE {where} ORDER BY id LIMIT ?", [*params, limit + 1]
        )
        more = len(rows) > limit
        rows = rows[:limit]
        return {
            "data": [json.loads(r[1]) for r in rows],
            "meta": {"nextCursor": rows[-1][0] if more else None, "hasMore": more},
        }

    def changes(self, query: dict[str, str]) -> dict[str, object]:
        since = query.get("since") or "0"
        if not since.isdigit():
            raise _Answer(400, "bad_request", "since must be a cursor from nextCursor", "since")
        limit = _limit(query.get("limit"), 100)
        rows = self._state.rows(
            "SELECT seq, task_id, deleted, body FROM changes WHERE seq > ? ORDER BY seq LIMIT ?",
            (int(since), limit + 1),
        )
        more = len(rows) > limit
        rows = rows[:limit]
        items: list[dict[str, object]] = []
        for _seq, task_id, deleted, body in rows:
            item: dict[str, object] = {"id": task_id, "deleted": bool(deleted)}
            if not deleted:
                item["task"] = json.loads(body)
            items.append(item)
        cursor = str(rows[-1][0]) if rows else since
        return {"data": items, "meta": {"nextCursor": cursor, "hasMore": more}}

    # --- what tests look at ----------------------------------------------------------------

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

    def put_task(self, task: dict[str, Any]) -> dict[str, Any]:
        """Write a task as another client would (no key): for conflict tests."""
        body = _decode_body(_dumps(task).encode(), None)
        with self._state.write() as conn:
            exists = fetch_all(conn, "SELECT 1 FROM tasks WHERE id = ?", (body["id"],))
            _, envelope = self._apply(conn, "PUT" if exists else "POST", body["id"], body, None)
        result: dict[str, Any] = envelope["data"]  # type: ignore[assignment]
        return result


def _limit(text: str | None, default: int) -> int:
    if text is None:
        return default
    if not text.isdigit() or not 1 <= int(text) <= 1000:
        raise _Answer(400, "bad_request", "limit must be 1-1000", "limit")
    return int(text)


def serve_forever(
    host: str = "127.0.0.1",
    port: int = 8080,
    db: str = ":memory:",
    token: str | None = None,
    *,
    announce: bool = True,
) -> None:
    """Run a :class:`ReferenceServer` in this process until interrupted.

    With ``announce``, prints one line ``listening on <url> token <token>`` to stdout
    first (a parent process reads it to learn the port when ``port=0``).
    """
    server = ReferenceServer(host=host, port=port, db=db, token=token)
    if announce:
        print(f"listening on {server.url} token {server.token}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m clinik_local.server --port N [--db FILE] [--token T]``."""
    parser = argparse.ArgumentParser(prog="python -m clinik_local.server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--db", default=":memory:")
    parser.add_argument("--token", default=None)
    args = parser.parse_args(argv)
    serve_forever(args.host, args.port, args.db, args.token)
    return 0


if __name__ == "__main__":
    sys.exit(main())
