"""The Remote protocol: what the sync engine needs from a service it syncs with.

The engine (:mod:`clinik_local.sync`) never speaks HTTP: it hands one
:class:`Change` at a time to a :class:`Remote` and gets back one typed outcome, which
it records. Today's remote is :class:`~clinik_local.remotes.clinik.ClinikRemote` (the
clinik contract, ``sync-protocol.md``); a FHIR R4 server is the next, behind the same
protocol; tests inject their own through ``SyncConfig(remote=...)``.

Outcomes of a push, and what the engine does with each:

- :class:`Delivered`: applied (or, for a delete, already gone); the row is done and
  the server's ``version``/``modified`` go to ``task_sync`` for the next ``If-Match``.
- :class:`Conflict`: the server has another version (``server_task``); both are kept
  for :meth:`SyncEngine.resolve`.
- :class:`Refused`: refused for good (a dead letter, with the server's ``body``).
- :class:`Transient`: worth retrying (after ``retry_after`` seconds, if the server said).
- :class:`AuthFailed`: the credentials were refused (also fresh ones): sync pauses.
- :class:`Unreachable`: the service cannot be reached at all: the engine backs off.

Room for the pull side (two-way sync, next): a remote will also list tasks a page at
a time and read a change-log page (``pull_tasks(cursor)``, ``pull_changes(since)``),
returning server copies the engine stores with ``storage.rows.write_server_copy``.
They are deliberately not part of this protocol yet.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

import attrs

__all__ = [
    "AuthFailed",
    "Change",
    "Conflict",
    "Delivered",
    "PushOutcome",
    "Refused",
    "Remote",
    "Transient",
    "Unreachable",
]


@attrs.frozen(kw_only=True)
class Change:
    """One local change to deliver.

    ``change_id`` is the idempotency key every attempt carries. ``body`` is the wire
    task without server-managed fields (None for a delete). ``server_version`` is the
    server's version of the task as last acknowledged (``If-Match``), None if the
    server never acknowledged this task (so an update goes as a create).
    """

    change_id: str
    task_id: str
    op: Literal["create", "update", "delete"]
    body: dict[str, Any] | None
    server_version: str | None
    #: The server is known to hold the task although its version is not known here (a
    #: store restored from an export): ask the server for its version, don't create.
    known_on_server: bool = False
    #: With ``known_on_server``: the task as this device believes the server holds it;
    #: a server task that differs from it is a conflict, never overwritten.
    base: dict[str, Any] | None = None


@attrs.frozen(kw_only=True)
class Delivered:
    """Applied; ``task`` is the server's copy when it sent one; ``gone`` for a delete."""

    version: str | None = None
    modified: str | None = None
    task: dict[str, Any] | None = None
    gone: bool = False


@attrs.frozen(kw_only=True)
class Conflict:
    """The server holds another version (``server_task``; None if it has none)."""

    server_task: dict[str, Any] | None
    status: int
    body: str | None


@attrs.frozen(kw_only=True)
class Refused:
    """Refused for good: the status, the server's body, a short error.

    ``status`` is None when the remote refused the change before sending it (a FHIR
    remote that cannot map a reference to an id the server knows).
    """

    status: int | None
    body: str | None
    error: str


@attrs.frozen(kw_only=True)
class Transient:
    """Failed in a way worth retrying; ``retry_after`` seconds if the server asked."""

    error: str
    status: int | None = None
    retry_after: float | None = None


@attrs.frozen(kw_only=True)
class AuthFailed:
    """The service refused the credentials (after asking for fresh ones once)."""

    message: str


@attrs.frozen(kw_only=True)
class Unreachable:
    """The service could not be reached at all (refused, unreachable, DNS, TLS)."""

    message: str


PushOutcome = Delivered | Conflict | Refused | Transient | AuthFailed | Unreachable


class Remote(Protocol):
    """A service the outbox is delivered to.

    ``push`` may be called from up to ``lanes`` threads at once, each with its own
    ``lane`` index (``0 <= lane < lanes``), one call at a time per lane; it returns an
    outcome and never raises for anything the network or the server did. ``close``
    releases connections; the remote stays usable (it reconnects on the next push).
    """

    def push(self, change: Change, *, lane: int) -> PushOutcome:
        """Deliver one change and classify the answer."""
        ...

    def close(self) -> None:
        """Release connections (idempotent; a later push reconnects)."""
        ...
