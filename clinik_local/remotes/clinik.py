"""``ClinikRemote``: the clinik sync contract (``sync-protocol.md``) over the HTTP transport.

How one change goes on the wire:

- every request carries the change's ``change_id`` as ``Idempotency-Key``, on every
  retry, so a retry the server already applied is answered from its idempotency store;
- a change of a task the server never acknowledged goes as ``POST /tasks`` (a create);
  a later one as ``PUT /tasks/{id}`` (or ``DELETE``) with ``If-Match`` = the server's
  version;
- the body is the wire task without ``versionId``/``lastModified``.

What each answer is (the contract's table): 2xx delivered; 404 on DELETE delivered
(already gone); 412 a conflict carrying the server's task (and so is a 409 to an update
sent as ``POST``, the re-creation of a task another client created again meanwhile:
the server's copy is read and the change rebased on it); 408/425/429/5xx transient
(``Retry-After`` honoured, in seconds or as an HTTP date); 401 asks the token provider
once more and retries once, then is :class:`~.base.AuthFailed`; any other status is
refused for good. A network failure is transient; no connection at all is
:class:`~.base.Unreachable`.

The pull side (:class:`~.base.PullRemote`): :meth:`ClinikRemote.list_page` is
``GET /tasks?<scope>&limit=&cursor=`` (the first page's ``meta.changesCursor`` becomes
``changes_cursor``) and :meth:`ClinikRemote.changes_page` is
``GET /tasks/changes?since=&limit=&<scope>``; a scope's values go comma-joined (the
contract's "any of"). ``410`` on the log is :class:`~.base.CursorExpired`; the other
answers are classified as for a push (401 asks for a fresh token once), and a ``200``
whose body is not the contract's page is transient. An item or task without a usable
``id`` cannot be applied and is skipped (logged); every other task is handed on exactly
as the server sent it.
"""

from __future__ import annotations

import email.utils
import logging
import time
from collections.abc import Callable
from datetime import UTC
from typing import Any
from urllib.parse import quote

import httpx

from ..errors import AuthError, TransportError
from ..ids import is_valid_id
from ..wire import dumps, loads_or_none, without_server_fields
from .base import (
    AuthFailed,
    Change,
    ChangesOutcome,
    ChangesPage,
    Conflict,
    CursorExpired,
    Delivered,
    ListedPage,
    ListOutcome,
    LogItem,
    PushOutcome,
    Refused,
    Scope,
    Transient,
    Unreachable,
)
from .transport import LazyTransport, Response, Transport, check_base_url, no_answer

__all__ = ["TRANSIENT_STATUSES", "ClinikRemote", "parse_retry_after"]

_log = logging.getLogger("clinik_local.sync")

#: Statuses retried with backoff (with any other 5xx).
TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (seconds or an HTTP date), or None."""
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


def _task_of(answer: Response) -> dict[str, object] | None:
    data = loads_or_none(answer.body)
    task = data.get("data") if isinstance(data, dict) else None
    return task if isinstance(task, dict) else None


class ClinikRemote:
    """The remote clinik service, through a :class:`~.transport.Transport` made on first use.

    ``http_transport`` (an ``httpx.BaseTransport``, e.g. ``httpx.MockTransport``) replaces
    the network, for tests.
    """

    def __init__(
        self,
        base_url: str,
        token_provider: Callable[[], str],
        *,
        timeout: float = 10.0,
        allow_insecure_http: bool = False,
        ca_bundle: str | None = None,
        lanes: int = 1,
        http_transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = check_base_url(base_url, allow_insecure_http)
        self._connections = LazyTransport(
            self.base_url,
            token_provider,
            timeout=timeout,
            allow_insecure_http=allow_insecure_http,
            ca_bundle=ca_bundle,
            lanes=lanes,
            http_transport=http_transport,
        )

    def __repr__(self) -> str:  # no token here, ever
        return f"<ClinikRemote {self.base_url}>"

    def _get_transport(self) -> Transport:
        return self._connections.get()

    def close(self) -> None:
        """Close the connections; the next push opens new ones."""
        self._connections.close()

    def push(self, change: Change, *, lane: int) -> PushOutcome:
        """Send one change (see the module docstring for the mapping of answers)."""
        headers = {"Idempotency-Key": change.change_id}
        body: bytes | None = None
        version = change.server_version
        if version is None and change.known_on_server and change.op != "create":
            # A restored task: the server holds it at a version we don't know. Ask,
            # then write conditionally on that version (never re-create it: 409).
            asked = self._server_copy(change.task_id, lane)
            if not isinstance(asked, tuple | None):
                return asked
            if asked is None:
                if change.op == "delete":
                    return Delivered(gone=True)
            else:
                version, server_task, raw = asked
                if change.base is None or without_server_fields(server_task) != change.base:
                    # Changed on the server since the export: both sides are kept.
                    return Conflict(server_task=server_task, status=412, body=raw)
        if change.op == "delete":
            method, path = "DELETE", f"/tasks/{change.task_id}"
            headers["If-Match"] = f'"{version}"'
        elif change.op == "update" and version is not None:
            method, path = "PUT", f"/tasks/{change.task_id}"
            headers["If-Match"] = f'"{version}"'
            body = self._wire_body(change)
        else:
            method, path = "POST", "/tasks"
            body = self._wire_body(change)
        answer = self._exchange(method, path, body, headers, lane)
        if not isinstance(answer, Response):
            return answer
        if method == "POST" and change.op == "update" and answer.status == 409:
            return self._recreated(change, answer, lane)
        return self._classify(method, answer, self._get_transport())

    def _recreated(self, change: Change, answer: Response, lane: int) -> PushOutcome:
        """A 409 to an update sent as ``POST`` (a task the server had deleted, kept here
        by a resolution): another client created the task again meanwhile. It is the
        same task, not another one with its id, so like a 412 the change is rebased on
        the server's copy; if that cannot be read, the 409 stands (refused)."""
        asked = self._server_copy(change.task_id, lane)
        if isinstance(asked, tuple):
            _, server_task, raw = asked
            return Conflict(server_task=server_task, status=409, body=raw)
        return self._classify("POST", answer, self._get_transport())

    def _exchange(
        self,
        method: str,
        path: str,
        body: bytes | None,
        headers: dict[str, str] | None,
        lane: int,
    ) -> Response | PushOutcome:
        """One request, asking the token provider once more on a 401 and retrying once;
        a failure to get an answer at all is the outcome it means for the change."""
        transport = self._get_transport()
        try:
            answer = transport.request(method, path, body=body, headers=headers, lane=lane)
            if answer.status == 401:
                transport.refresh_token()  # ask the provider once more, then retry once
                answer = transport.request(method, path, body=body, headers=headers, lane=lane)
        except (TransportError, AuthError) as exc:
            return no_answer(exc, transport)
        return answer

    def _server_copy(
        self, task_id: str, lane: int
    ) -> tuple[str, dict[str, Any], str] | PushOutcome | None:
        """The server's (versionId, task, body) of a task (None: it has none), or why it
        can't be had."""
        answer = self._exchange("GET", f"/tasks/{task_id}", None, None, lane)
        if not isinstance(answer, Response):
            return answer
        if answer.status == 404:
            return None
        if answer.status == 200:
            data = loads_or_none(answer.body)
            task = data.get("data") if isinstance(data, dict) else None
            version = task.get("versionId") if isinstance(task, dict) else None
            if isinstance(task, dict) and isinstance(version, str):
                return version, task, answer.body
            return Transient(error="the server's task came without a versionId", status=200)
        return self._classify("GET", answer, self._get_transport())

    # --- the pull side -------------------------------------------------------------------

    @property
    def service(self) -> str:
        """Which service this is (recorded with the store's sync state)."""
        return self.base_url

    def list_page(self, scope: Scope, cursor: str | None, limit: int) -> ListOutcome:
        """One page of ``GET /tasks`` for the scope (see the module docstring)."""
        params = [*_scope_params(scope), ("limit", str(limit))]
        if cursor is not None:
            params.append(("cursor", cursor))
        answer = self._read("/tasks?" + _query(params))
        if isinstance(answer, CursorExpired):  # not on a listing (410 is read as refused)
            return Refused(status=410, body=None, error=answer.message)
        if not isinstance(answer, dict):
            return answer
        data, meta = answer.get("data"), answer.get("meta")
        if not isinstance(data, list) or not isinstance(meta, dict):
            return Transient(error="the task listing is not a page of tasks", status=200)
        tasks = tuple(t for t in data if _has_id(t, "listed task"))
        following = meta.get("nextCursor")
        changes = meta.get("changesCursor")
        if cursor is None and not isinstance(changes, str):
            return Transient(error="the first listing page has no changesCursor", status=200)
        return ListedPage(
            tasks=tasks,
            next_cursor=following if isinstance(following, str) and following else None,
            changes_cursor=changes if isinstance(changes, str) else None,
        )

    def changes_page(self, scope: Scope, since: str, limit: int) -> ChangesOutcome:
        """One page of ``GET /tasks/changes`` after ``since`` (see the module docstring)."""
        params = [("since", since), ("limit", str(limit)), *_scope_params(scope)]
        answer = self._read("/tasks/changes?" + _query(params), log=True)
        if not isinstance(answer, dict):
            return answer
        data, meta = answer.get("data"), answer.get("meta")
        following = meta.get("nextCursor") if isinstance(meta, dict) else None
        if not isinstance(data, list) or not isinstance(following, str) or not following:
            return Transient(error="the change log answer is not a page of changes", status=200)
        items = tuple(item for item in map(_log_item, data) if item is not None)
        more = bool(meta.get("hasMore")) if isinstance(meta, dict) else False
        return ChangesPage(items=items, next_cursor=following, has_more=more)

    def _read(
        self, path: str, *, log: bool = False
    ) -> dict[str, Any] | CursorExpired | Refused | Transient | AuthFailed | Unreachable:
        transport = self._get_transport()
        try:
            answer = transport.request("GET", path)
            if answer.status == 401:
                transport.refresh_token()
                answer = transport.request("GET", path)
        except (TransportError, AuthError) as exc:
            return no_answer(exc, transport)
        if answer.status == 200:
            body = loads_or_none(answer.body)
            if isinstance(body, dict):
                return body
            return Transient(error="the answer is not a JSON envelope", status=200)
        if answer.status == 410 and log:
            return CursorExpired(message="the change log no longer reaches back (410)")
        outcome = self._classify("GET", answer, transport)
        assert not isinstance(outcome, (Delivered, Conflict))
        return outcome

    @staticmethod
    def _wire_body(change: Change) -> bytes:
        body = without_server_fields(change.body or {})
        body["id"] = change.task_id
        return dumps(body).encode()

    @staticmethod
    def _classify(method: str, answer: Response, transport: Transport) -> PushOutcome:
        status = answer.status
        if status == 401:
            transport.forget_token()
            return AuthFailed(message="the service refused the token (401), also a fresh one")
        if 200 <= status < 300 or (status == 404 and method == "DELETE"):
            if method == "DELETE":
                return Delivered(gone=True, applied=True if status != 404 else None)
            task = _task_of(answer)
            if task is None:
                return Delivered()
            version, modified = task.get("versionId"), task.get("lastModified")
            return Delivered(
                version=None if version is None else str(version),
                modified=None if modified is None else str(modified),
                task=task,
            )
        if status == 412:
            return Conflict(server_task=_task_of(answer), status=status, body=answer.body)
        if status in TRANSIENT_STATUSES or status >= 500:
            return Transient(
                error=f"HTTP {status}",
                status=status,
                retry_after=parse_retry_after(answer.header("Retry-After")),
            )
        return Refused(status=status, body=answer.body, error=f"HTTP {status}")


def _scope_params(scope: Scope) -> list[tuple[str, str]]:
    return [(name, ",".join(values)) for name, values in sorted(scope.items())]


def _query(params: list[tuple[str, str]]) -> str:
    return "&".join(f"{quote(k, safe='')}={quote(v, safe=',')}" for k, v in params)


def _has_id(task: object, what: str) -> bool:
    if isinstance(task, dict) and isinstance(task.get("id"), str) and is_valid_id(task["id"]):
        return True
    _log.warning("skipped a %s without a usable id", what)
    return False


def _log_item(item: object) -> LogItem | None:
    """A change-log item as the engine takes it, or None (logged) if it cannot be used."""
    if not isinstance(item, dict) or not _has_id(item, "change-log item"):
        if isinstance(item, dict):
            return None
        _log.warning("skipped a change-log item that is not an object")
        return None
    deleted = item.get("deleted") is True
    task = item.get("task")
    if not deleted and (not isinstance(task, dict) or task.get("id", item["id"]) != item["id"]):
        _log.warning("skipped change-log item of %s: no task", item["id"])
        return None
    version = item.get("versionId")
    if version is None and isinstance(task, dict):
        version = task.get("versionId")
    change_id = item.get("changeId")
    return LogItem(
        task_id=item["id"],
        deleted=deleted,
        task=None if deleted else task,
        version=None if version is None else str(version),
        change_id=change_id if isinstance(change_id, str) else None,
    )
