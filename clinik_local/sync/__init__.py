"""Sync: delivers the outbox to a remote, exactly once (see :mod:`.engine`).

``from clinik_local.sync import SyncConfig`` (and the other public names) keeps
working; the parts live in :mod:`.config` (what to sync with), :mod:`.engine`
(scheduling, worker, backoff, lanes, status), :mod:`.push` (outbox rows through a
:class:`~clinik_local.remotes.base.Remote`) and :mod:`.conflicts` (dead letters and
conflict resolution).
"""

from __future__ import annotations

from .engine import DeadLetter, SyncConfig, SyncConflict, SyncEngine, SyncStatus

__all__ = ["DeadLetter", "SyncConfig", "SyncConflict", "SyncEngine", "SyncStatus"]
