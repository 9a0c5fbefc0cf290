"""Accepting a server version of a task: a server copy, or a rebase of undelivered changes.

Every server version the engine learns goes through :func:`accept` (on the caller's
write transaction; no SQL here, no I/O): a pulled change-log item, a listed task of a
bootstrap, the ``data`` of a ``412`` answer. What happens depends on the task's open
(undelivered) changes:

- none: the server's task is written as a *server copy* (``rows.write_server_copy``:
  no outbox row, history ``origin='server'``), it becomes the task's base
  (``replica.set_base``, the body exactly as sent) and its version the next
  ``If-Match``; a task the server deleted, or that is outside the scope, is removed;
- some: the changes (one patch per outbox row, :func:`local_changes`) are replayed on
  the server's version with :func:`clinik_local.merge.rebase`, from the base they were
  made on. **Merged**: the server's task becomes the base, the merged task the local
  task (history ``origin='merge'``), and the open changes are replaced by one change
  under a NEW change id (a ``PUT`` with ``If-Match`` = the server's version), or none
  when the merge equals the server's task. **Conflict**: the first open change is
  parked (``conflict``), the later ones wait behind it, the base stays, and the server's
  task is kept with the conflict (:mod:`.conflicts` shows base, server and the current
  local task). A newer server version later runs the rebase again from the same base.

:func:`apply_items` and :func:`apply_listed` add what the log and the listing need on top:
own changes coming back, versions already known, and versions learnt outside the log.
A page is applied whole (:func:`apply_page` for the log, :func:`apply_listing` for a
listing): its plain server copies (no open change, no mark, a new version in the scope:
most of a page) are written together, a few statements for the page
(``rows.write_server_copies``, ``replica.set_bases_many``,
``outbox.set_server_versions``), and the other tasks one at a time, as before; the
rows each task ends with are the same either way (tests/test_pull_page.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import apsw
import attrs

from .. import merge, timestamps
from ..errors import ValidationError
from ..remotes.base import LogItem, Scope
from ..storage import outbox, replica, rows
from ..storage.database import Database
from ..storage.outbox import OpenChange
from ..wire import dumps, loads_or_none

__all__ = [
    "Accepted",
    "Context",
    "accept",
    "apply_items",
    "apply_listed",
    "apply_listing",
    "apply_page",
    "local_changes",
]


@attrs.frozen(kw_only=True)
class Context:
    """What accepting needs to know besides the task: the scope (None: every task), the
    bootstrap generation, and whether this store pulls (then versions learnt outside
    the log are marked ``unseen``)."""

    scope: Scope | None
    generation: int
    pulls: bool


@attrs.frozen(kw_only=True)
class Accepted:
    """What accepting did: the local task changed (``changed``); a conflict was
    recorded or its server side replaced (``conflict``)."""

    changed: bool = False
    conflict: bool = False


def scope_matches(scope: Scope | None, wire: Mapping[str, Any]) -> bool:
    """Whether a wire task is in the scope (every filter matches one of its values)."""
    if not scope:
        return True
    for name, values in scope.items():
        value = wire.get(name)
        if not isinstance(value, str) or value not in values:
            return False
    return True


def local_changes(changes: list[OpenChange]) -> list[merge.Change]:
    """One merge change per outbox row, in order: its patch, or DELETE.

    A row without a recorded patch (written before schema version 3) gets one derived
    from the body it was made on (the history row at its base version, or the previous
    row's payload) and its payload.
    """
    out: list[merge.Change] = []
    previous: str | None = None
    for change in changes:
        if change.op == "delete":
            out.append(merge.DELETE)
            continue
        payload = loads_or_none(change.payload)
        patch = loads_or_none(change.patch)
        if isinstance(patch, dict):
            out.append({k: v for k, v in patch.items() if k in merge.MERGE_FIELDS})
        else:
            before = None
            if change.op != "create":
                before = loads_or_none(change.previous_body or previous)
            out.append(
                merge.patch_of(
                    before if isinstance(before, dict) else None,
                    payload if isinstance(payload, dict) else {},
                )
            )
        previous = change.payload
    return out


def _in_step(conn: apsw.Connection, task_id: str, base: replica.Base) -> bool:
    """Whether the local task is what its base says (or has changes of its own to send):
    then a server version equal to the base's has nothing to add."""
    if outbox.has_open_changes(conn, task_id):
        return True
    found = rows.current(conn, task_id)
    local = None if found is None else loads_or_none(found[0])
    server = loads_or_none(base.body)
    if not isinstance(local, dict) or not isinstance(server, dict):
        return False
    return not merge.patch_of(server, local)


def _holds(server: Mapping[str, Any], payload: str | None) -> bool:
    """Whether the server's task is a change's payload (on the fields a patch may set)."""
    sent = loads_or_none(payload)
    return isinstance(sent, dict) and not merge.patch_of(sent, server)


def _base_body(conn: apsw.Connection, task_id: str, changes: list[OpenChange]) -> Any:
    base = replica.base_of(conn, task_id)
    if base is not None:
        return loads_or_none(base.body)
    first = changes[0] if changes else None
    if first is not None and first.op != "create" and first.previous_body is not None:
        # No server copy recorded (a store from before schema 3, or a restore): the
        # changes were made on the local version the device last had from the server.
        return loads_or_none(first.previous_body)
    return None


def _record_server(
    conn: apsw.Connection,
    ctx: Context,
    task_id: str,
    server: Mapping[str, Any] | None,
    raw: str | None,
    version: str | None,
    now: str,
    *,
    unseen: bool,
) -> None:
    """The server's version becomes the base and the next ``If-Match`` (or is forgotten)."""
    if server is None:
        replica.drop_base(conn, task_id)
        outbox.forget_server_version(conn, task_id)
        return
    mark = version if unseen and ctx.pulls and scope_matches(ctx.scope, server) else None
    replica.set_base(
        conn, task_id, version, raw or dumps(server), listed=ctx.generation, unseen=mark
    )
    outbox.set_server_version(conn, task_id, version, server.get("lastModified"), now)


def _remove(db: Database, conn: apsw.Connection, task_id: str, now: str) -> bool:
    removed = rows.delete_server_copy(conn, task_id, now=now)
    replica.drop_base(conn, task_id)
    outbox.forget_server_version(conn, task_id)
    if removed:
        db.note_change(task_id, "pulled")
    return removed


def accept(
    db: Database,
    conn: apsw.Connection,
    ctx: Context,
    task_id: str,
    server: Mapping[str, Any] | None,
    version: str | None,
    now: str,
    *,
    raw: str | None = None,
    unseen: bool = False,
) -> Accepted:
    """Take the server's version of a task (``server`` None: it deleted the task).

    ``raw``: the server's JSON of ``server`` as sent (kept as the base). ``unseen``: the
    version came from outside the change log (a 412 answer). See the module docstring.
    """
    changes = outbox.open_changes(conn, task_id)
    if any(c.state == "dead" for c in changes):
        # A refused change waits for the app (retry or discard): nothing is rebased
        # under it. A retry goes on the old version and a 412 brings this one back.
        return Accepted()
    first = changes[0] if changes else None
    if (
        first is not None
        and server is not None
        and first.state in ("pending", "in_flight")
        and first.op != "delete"
        and _holds(server, first.payload)
    ):
        # The server holds the first open change already (applied; its answer was
        # lost): it is delivered, and the later ones were made on exactly this.
        outbox.record_delivered(
            conn,
            first.seq,
            task_id,
            version=version,
            modified=server.get("lastModified"),
            gone=False,
            now=now,
        )
        _record_server(conn, ctx, task_id, server, raw, version, now, unseen=unseen)
        changes = changes[1:]
        if changes:
            return Accepted()
    if not changes:
        if server is None or not scope_matches(ctx.scope, server):
            return Accepted(changed=_remove(db, conn, task_id, now))
        rows.write_server_copy(conn, task_id, server, now=now)
        _record_server(conn, ctx, task_id, server, raw, version, now, unseen=unseen)
        db.note_change(task_id, "pulled")
        return Accepted(changed=True)
    base = _base_body(conn, task_id, changes)
    try:
        result = merge.rebase(
            base if isinstance(base, dict) else None, server, local_changes(changes)
        )
    except ValidationError:  # a stored change the merge cannot read: keep both sides
        result = None
    if not isinstance(result, merge.Merged):
        outbox.park_conflict(conn, task_id, None if server is None else (raw or dumps(server)), now)
        if unseen and server is not None and ctx.pulls and scope_matches(ctx.scope, server):
            replica.set_unseen(conn, task_id, version)
        return Accepted(conflict=True)
    _record_server(conn, ctx, task_id, server, raw, version, now, unseen=unseen)
    if result.task is None:
        rows.delete_server_copy(conn, task_id, now=now, origin="merge")
    elif result.send is None and server is not None:
        rows.write_server_copy(conn, task_id, server, now=now)
    else:
        rows.write_server_copy(conn, task_id, result.task, now=now, origin="merge")
    found = rows.current(conn, task_id)
    payload = None if found is None or result.op == "delete" else found[0]
    patch = dumps(result.send) if isinstance(result.send, dict) else None
    outbox.replace_open_changes(
        conn,
        task_id,
        result.op,
        payload,
        patch,
        None if found is None else found[1],
        now,
    )
    db.note_change(task_id, "pulled")
    if result.op is None and result.task is not None and not scope_matches(ctx.scope, result.task):
        _remove(db, conn, task_id, now)
    return Accepted(changed=True)


def apply_items(
    db: Database, conn: apsw.Connection, ctx: Context, items: list[LogItem], now: str
) -> Accepted:
    """Apply the change-log items of ONE task from one page, in log order.

    Idempotent: applying them again changes nothing. The rules:

    - a version learnt outside the log (``unseen``) makes the items before it older than
      what this device knows: they are skipped, and the mark is cleared by its own item
      (a page without it is all older); a tombstone (a delete of this device the server
      applied, :func:`record_delivered_delete`) skips every item before the task's
      first delete item, which drops it;
    - an item of one of this store's own open changes (the server applied it; its answer
      was lost) settles that change: it is delivered, the item's task becomes the base
      and its version the next ``If-Match``; the local task, which already holds the
      change, is not rewritten;
    - of the other items, only the last one matters (a later item supersedes it); it is
      skipped when its version is the base's already, else accepted (:func:`accept`).
    """
    if not items:
        return Accepted()
    task_id = items[0].task_id
    base = replica.base_of(conn, task_id)
    if base is not None and base.unseen == replica.DELETED_HERE:
        deletes = [i for i, item in enumerate(items) if item.deleted]
        if not deletes:
            return Accepted()  # older than the delete this device made
        replica.drop_base(conn, task_id)
        items = items[deletes[0] + 1 :]
    elif base is not None and base.unseen is not None:
        seen = [i for i, item in enumerate(items) if item.version == base.unseen]
        if seen:
            items = items[seen[-1] + 1 :]
        else:
            later = _first_later(base.body, items)
            if later is None:
                return Accepted()
            items = items[later:]
        replica.set_unseen(conn, task_id, None)
    changed = conflict = False
    for index, item in enumerate(items):
        task = item.task if not item.deleted else None
        raw = None if task is None else dumps(task)
        if item.change_id is not None and outbox.change_task(conn, item.change_id) == task_id:
            done = _own_change(db, conn, ctx, item, task, raw, now)
        elif index < len(items) - 1:
            continue  # superseded by a later item of the page
        else:
            done = _foreign(db, conn, ctx, item, task, raw, now)
        changed = changed or done.changed
        conflict = conflict or done.conflict
    return Accepted(changed=changed, conflict=conflict)


def _first_later(base_body: str, items: list[LogItem]) -> int | None:
    """The first item stamped strictly later than the unseen base, or None.

    A log that shows only current versions (a FHIR server polled by ``_lastUpdated``)
    never shows a version another write superseded before the poll: when the version
    learnt outside the log is missing, an item whose ``lastModified`` is later than that
    version's is newer than it all the same, so it and what follows are applied (without
    this they would be skipped as older until the scope is listed again).
    """
    base = loads_or_none(base_body)
    known = _instant(base.get("lastModified")) if isinstance(base, dict) else None
    if known is None:
        return None
    for index, item in enumerate(items):
        when = item.task.get("lastModified") if item.task is not None else item.modified
        stamp = _instant(when)
        if stamp is not None and stamp > known:
            return index
    return None


def _instant(value: object) -> str | None:
    """A normalised UTC instant (ordered as text), or None when there is none."""
    try:
        return timestamps.parse_instant(value)
    except timestamps.InstantError:
        return None


def _foreign(
    db: Database,
    conn: apsw.Connection,
    ctx: Context,
    item: LogItem,
    task: dict[str, Any] | None,
    raw: str | None,
    now: str,
) -> Accepted:
    base = replica.base_of(conn, item.task_id)
    if (
        base is not None
        and task is not None
        and item.version is not None
        and base.version_id == item.version
        and _in_step(conn, item.task_id, base)
    ):
        return Accepted()
    if task is None and base is None and rows.current(conn, item.task_id) is None:
        return Accepted()  # a delete of a task this device never had
    return accept(db, conn, ctx, item.task_id, task, item.version, now, raw=raw)


def _own_change(
    db: Database,
    conn: apsw.Connection,
    ctx: Context,
    item: LogItem,
    task: dict[str, Any] | None,
    raw: str | None,
    now: str,
) -> Accepted:
    assert item.change_id is not None
    seq = next(
        c.seq for c in outbox.open_changes(conn, item.task_id) if c.change_id == item.change_id
    )
    outbox.record_delivered(
        conn,
        seq,
        item.task_id,
        version=item.version,
        modified=None if task is None else task.get("lastModified"),
        gone=task is None,
        now=now,
    )
    _record_server(conn, ctx, item.task_id, task, raw, item.version, now, unseen=False)
    if not outbox.has_open_changes(conn, item.task_id) and (
        task is None or not scope_matches(ctx.scope, task)
    ):
        return Accepted(changed=_remove(db, conn, item.task_id, now))
    return Accepted()


def _plain(
    ctx: Context,
    base: tuple[str | None, str | None] | None,
    task: Mapping[str, Any] | None,
    version: str | None,
) -> bool:
    """Whether accepting this server version of a task WITHOUT open changes is a plain
    server copy (:func:`accept`'s first case, written as one): a task in the scope, not
    a deletion, whose base (``(version_id, unseen)``, None: no base) has no unseen mark
    and is not at this version already (that asks whether the local task is in step,
    one task at a time)."""
    if task is None or not scope_matches(ctx.scope, task):
        return False
    if base is None:
        return True
    base_version, unseen = base
    return unseen is None and (version is None or base_version != version)


def _accept_plain(
    db: Database,
    conn: apsw.Connection,
    ctx: Context,
    copies: Sequence[tuple[str, Mapping[str, Any], str | None]],
    now: str,
) -> None:
    """:func:`accept` of many ``(task_id, server task, version)`` for which :func:`_plain`
    holds, in bulk: the server copies (``rows.write_server_copies``), their bases (the
    JSON as sent) and server versions, each one executemany."""
    rows.write_server_copies(conn, [(i, t) for i, t, _ in copies], now=now)
    replica.set_bases_many(conn, [(i, v, dumps(t)) for i, t, v in copies], listed=ctx.generation)
    outbox.set_server_versions(conn, [(i, v, t.get("lastModified")) for i, t, v in copies], now)
    db.note_changes([i for i, _, _ in copies], "pulled")


def apply_page(
    db: Database, conn: apsw.Connection, ctx: Context, items: Sequence[LogItem], now: str
) -> dict[str, Accepted]:
    """Apply one page of the change log: :func:`apply_items` for each task's items, in
    the page's order, what it did per task id (in the order the tasks first appear).

    The bases and open changes of the page's tasks are read in two queries; a task with
    no open change whose last item :func:`_plain` says is a plain server copy (what a
    page mostly holds) is written with the others in bulk (:func:`_accept_plain`),
    exactly as :func:`apply_items` would write it (its earlier items are superseded,
    and none can be an own change: there is none open); the rest take
    :func:`apply_items`. Idempotent like it: a page applied again finds every base at
    its version, and changes nothing."""
    by_task: dict[str, list[LogItem]] = {}
    for item in items:
        by_task.setdefault(item.task_id, []).append(item)
    ids = list(by_task)
    pending = outbox.tasks_with_open_changes(conn, ids)
    bases = replica.versions_among(conn, ids)
    plain: dict[str, tuple[str, Mapping[str, Any], str | None]] = {}
    for task_id, group in by_task.items():
        last = group[-1]
        task = None if last.deleted else last.task
        if (
            task is not None
            and task_id not in pending
            and _plain(ctx, bases.get(task_id), task, last.version)
        ):
            plain[task_id] = (task_id, task, last.version)
    if plain:
        _accept_plain(db, conn, ctx, list(plain.values()), now)
    return {
        task_id: Accepted(changed=True)
        if task_id in plain
        else apply_items(db, conn, ctx, group, now)
        for task_id, group in by_task.items()
    }


def apply_listing(
    db: Database, conn: apsw.Connection, ctx: Context, tasks: Sequence[dict[str, Any]], now: str
) -> list[Accepted]:
    """Apply a whole listing page; :func:`apply_listed` per task, except that the tasks
    with no open change that the page shows once and :func:`_plain` says are plain
    server copies (every task of a bootstrap into an empty store) are written in bulk
    (:func:`_accept_plain`) first."""
    ids = [str(t["id"]) for t in tasks]
    once = {i for i, n in Counter(ids).items() if n == 1}
    pending = outbox.tasks_with_open_changes(conn, ids)
    bases = replica.versions_among(conn, ids)
    plain: dict[str, tuple[str, Mapping[str, Any], str | None]] = {}
    for task_id, task in zip(ids, tasks, strict=True):
        version = _text(task.get("versionId"))
        if (
            task_id in once
            and task_id not in pending
            and _plain(ctx, bases.get(task_id), task, version)
        ):
            plain[task_id] = (task_id, task, version)
    if plain:
        _accept_plain(db, conn, ctx, list(plain.values()), now)
    return [
        Accepted(changed=True) if task_id in plain else apply_listed(db, conn, ctx, task, now)
        for task_id, task in zip(ids, tasks, strict=True)
    ]


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def apply_listed(
    db: Database, conn: apsw.Connection, ctx: Context, task: dict[str, Any], now: str
) -> Accepted:
    """Apply one task of a bootstrap listing (marks it seen by this bootstrap)."""
    task_id = str(task["id"])
    version = task.get("versionId")
    version_text = None if version is None else str(version)
    base = replica.base_of(conn, task_id)
    if base is not None and (
        base.unseen is not None
        or (
            version_text is not None
            and base.version_id == version_text
            and _in_step(conn, task_id, base)
        )
    ):
        # Known already, or learnt after this bootstrap began (the log will bring it).
        replica.set_base(
            conn, task_id, base.version_id, base.body, listed=ctx.generation, unseen=base.unseen
        )
        return Accepted()
    return accept(db, conn, ctx, task_id, task, version_text, now, raw=dumps(task))


def record_delivered_base(
    conn: apsw.Connection,
    ctx: Context,
    task_id: str,
    task: Mapping[str, Any],
    version: str | None,
    now: str,
) -> None:
    """A 2xx answer's task becomes the base, marked ``unseen`` until the log shows it."""
    _record_server(conn, ctx, task_id, task, dumps(task), version, now, unseen=True)


def record_delivered_delete(
    conn: apsw.Connection, ctx: Context, task_id: str, *, applied: bool | None
) -> None:
    """The server took this device's delete (``applied``: see
    :attr:`~clinik_local.remotes.base.Delivered.applied`).

    A pulling store must not take the task's log items older than the delete for new
    server copies (a page ending between the task's create and its delete would bring
    the task back). When the server applied the delete just now and the task was in
    the scope, the log will show it: the base becomes a tombstone, and every item of
    the task before a delete item is skipped (:func:`apply_items`). When the remote
    cannot tell (the task was gone already: another device's delete, which may still
    be ahead in the log), the base stays with its ``unseen`` mark until a delete item
    drops it. Nothing was written, or no pulling: the base goes.
    """
    if not ctx.pulls or applied is False:
        replica.drop_base(conn, task_id)
    elif applied:
        base = replica.base_of(conn, task_id)
        if base is None or _in_scope(ctx, base.body):
            replica.mark_deleted(conn, task_id, listed=ctx.generation)


def _in_scope(ctx: Context, body: str) -> bool:
    """Whether a base's task is in the scope (a filtered log shows its next write)."""
    task = loads_or_none(body)
    return isinstance(task, dict) and scope_matches(ctx.scope, task)


def replica_forget(conn: apsw.Connection, task_id: str) -> None:
    """The task is gone from the server: no base for it any more."""
    replica.drop_base(conn, task_id)
