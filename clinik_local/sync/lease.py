"""One sync engine per store file: taking, renewing and releasing the sync lease.

The lease itself is a row in the file (:mod:`clinik_local.storage.lease`). This module
is the policy:

- An engine takes the lease before its first pass, in a write transaction, and in the
  same transaction puts rows a previous holder left ``in_flight`` back to ``pending``
  (they are sent again with their own keys). While it holds the lease no other engine
  touches the outbox's in-flight rows.
- A holder renews the lease every :data:`LEASE_SECONDS` / 3 from a small keeper thread
  (so a long request never lets it lapse) and releases it when it stops.
- A lease counts as gone, and is taken over, when it has expired, or when its holder
  is a process of this host that no longer exists (a SIGKILLed ``sync run``), or an
  engine of this very process that is no longer open (a store never closed). A lease
  of a live holder is respected: the other engine waits (state ``standby``).
- Every batch of answers is recorded only while the engine still holds the lease
  (checked in the recording transaction): an engine whose lease was taken over (it was
  suspended past the expiry) drops its late answers; the new holder resends those
  changes with the same keys and records what the server says.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from datetime import UTC, datetime

import apsw

from .. import timestamps
from ..storage import lease as _lease
from ..storage.database import Database
from ..storage.lease import Lease

__all__ = ["LEASE_SECONDS", "EngineLease", "Lease"]

_log = logging.getLogger("clinik_local.sync")

#: How long a lease lasts without renewal (seconds); renewed every third of it.
LEASE_SECONDS = 30.0

#: Holder ids of the engines open in this process (a lease of this process whose holder
#: is not here belongs to an engine that was never closed).
_OPEN_HOLDERS: weakref.WeakValueDictionary[str, EngineLease] = weakref.WeakValueDictionary()


def _host() -> str:
    return socket.gethostname() or "unknown-host"


def _process_exists(pid: int) -> bool:
    if os.name != "posix":
        return True  # no cheap, safe probe: rely on the expiry
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists, owned by someone else
    return True


def _instant_in(seconds: float) -> str:
    return timestamps.format_instant(datetime.fromtimestamp(time.time() + seconds, UTC))


class EngineLease:
    """This engine's claim on the sync lease of one store file."""

    def __init__(self, db: Database, seconds: float = LEASE_SECONDS) -> None:
        self.holder = f"eng_{uuid.uuid4().hex[:12]}"
        self.seconds = seconds
        self._db = db
        self._held = False
        self._lock = threading.Lock()
        self._keeper: threading.Thread | None = None
        self._stop_keeper = threading.Event()
        _OPEN_HOLDERS[self.holder] = self

    @property
    def held(self) -> bool:
        """Whether this engine believes it holds the lease (checked again on record)."""
        return self._held

    def _gone(self, other: Lease) -> bool:
        if other.expires_at < timestamps.now():
            return True
        if other.host != _host():
            return False
        if other.pid == os.getpid():
            return other.holder not in _OPEN_HOLDERS
        return not _process_exists(other.pid)

    def acquire(self, on_taken: Callable[[apsw.Connection], None]) -> Lease | None:
        """Take (or renew) the lease: None when this engine holds it, else the holder's.

        ``on_taken(conn)`` runs in the same transaction when the lease changes hands
        (to reset what the previous holder left in flight).
        """
        with self._lock, self._db.write() as conn:
            found = _lease.current(conn)
            mine = found is not None and found.holder == self.holder
            if found is not None and not mine and not self._gone(found):
                self._held = False
                return found
            now = timestamps.now()
            _lease.write(
                conn,
                Lease(
                    holder=self.holder,
                    pid=os.getpid(),
                    host=_host(),
                    acquired_at=found.acquired_at if mine and found is not None else now,
                    expires_at=_instant_in(self.seconds),
                ),
            )
            if not mine:
                on_taken(conn)
            self._held = True
        self._start_keeper()
        return None

    def still_held(self, conn: apsw.Connection) -> bool:
        """Whether the lease is still this engine's (on the caller's transaction)."""
        found = _lease.current(conn)
        held = found is not None and found.holder == self.holder
        if not held:
            self._held = False
        return held

    def holder_now(self) -> Lease | None:
        """Who holds the lease now (one short read), or None."""
        with self._db.read() as conn:
            return _lease.current(conn)

    def release(self) -> None:
        """Give the lease up (if held) and stop renewing it."""
        self._stop_keeper.set()
        keeper = self._keeper
        if keeper is not None and keeper is not threading.current_thread():
            keeper.join()
        self._keeper = None
        with self._lock:
            if self._held and not self._db.closed:
                with self._db.write() as conn:
                    _lease.release(conn, self.holder)
            self._held = False

    def close(self) -> None:
        """Release, and forget this engine as one of the process's open engines."""
        self.release()
        _OPEN_HOLDERS.pop(self.holder, None)

    def _start_keeper(self) -> None:
        if self._keeper is not None and self._keeper.is_alive():
            return
        self._stop_keeper.clear()
        self._keeper = threading.Thread(
            target=self._keep, name="clinik-local-sync-lease", daemon=True
        )
        self._keeper.start()

    def _keep(self) -> None:
        """Renew the lease every third of its length while held."""
        while not self._stop_keeper.wait(self.seconds / 3):
            try:
                with self._lock:
                    if not self._held or self._db.closed:
                        return
                    with self._db.write() as conn:
                        if not self.still_held(conn):
                            return
                        found = _lease.current(conn)
                        assert found is not None
                        _lease.write(
                            conn,
                            Lease(
                                holder=self.holder,
                                pid=found.pid,
                                host=found.host,
                                acquired_at=found.acquired_at,
                                expires_at=_instant_in(self.seconds),
                            ),
                        )
            except Exception as exc:  # a locked or closed file: try again at the next tick
                _log.debug("sync lease renewal failed: %s", type(exc).__name__)
