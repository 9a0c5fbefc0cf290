"""The sync lease: which engine may deliver a store's outbox, kept in the file itself.

Two sync engines on one file (an app's worker and ``clinik-local sync run``, or two
stores in one process) would reset each other's in-flight rows and record each other's
late answers. So one engine at a time holds the lease: one row of ``meta`` (key
``sync_lease``, a small JSON object) naming its holder id, process id, host and the
instant it expires. It is taken, renewed and released in write transactions, so two
engines can never both believe they hold it. The policy (when a holder counts as gone,
how long a lease lasts) is the sync engine's (:mod:`clinik_local.sync.lease`); this
module is its SQL.
"""

from __future__ import annotations

import json

import apsw
import attrs

from .connection import meta_value, set_meta

__all__ = ["Lease", "current", "release", "write"]

_KEY = "sync_lease"


@attrs.frozen(kw_only=True)
class Lease:
    """Who holds the sync lease, until when (UTC instants)."""

    holder: str
    pid: int
    host: str
    acquired_at: str
    expires_at: str

    def describe(self) -> str:
        """One line naming the holder, for status and errors."""
        return (
            f"process {self.pid} on host {self.host} (engine {self.holder}, since "
            f"{self.acquired_at}, lease until {self.expires_at})"
        )


def current(conn: apsw.Connection) -> Lease | None:
    """The lease as stored, or None (no holder, or an unreadable row: free)."""
    found = meta_value(conn, _KEY)
    if found is None:
        return None
    try:
        data = json.loads(found)
        return Lease(
            holder=str(data["holder"]),
            pid=int(data["pid"]),
            host=str(data["host"]),
            acquired_at=str(data["acquired_at"]),
            expires_at=str(data["expires_at"]),
        )
    except (ValueError, TypeError, KeyError):
        return None


def write(conn: apsw.Connection, lease: Lease) -> None:
    """Store ``lease`` as the holder (on the caller's write transaction)."""
    set_meta(conn, _KEY, json.dumps(attrs.asdict(lease), sort_keys=True))


def release(conn: apsw.Connection, holder: str) -> None:
    """Drop the lease if ``holder`` holds it (on the caller's write transaction)."""
    found = current(conn)
    if found is not None and found.holder == holder:
        set_meta(conn, _KEY, None)
