"""The Task model: a flattened HL7 FHIR Task, as the remote clinik service has it.

Classes are frozen and slotted attrs classes. Python attributes are snake_case; the
wire form (camelCase) belongs to :mod:`clinik_local.codec`. Date-times are held as
normalised UTC text ``YYYY-MM-DDTHH:MM:SS.sssZ`` (the wire form, which also sorts in
time order); repeated fields are tuples.
"""

from __future__ import annotations

import enum
from typing import Generic, TypeVar

import attrs

from .timestamps import now

__all__ = [
    "NO_PRIORITY_RANK",
    "PRIORITY_RANKS",
    "ApiResponse",
    "Period",
    "Restriction",
    "Task",
    "TaskInputOutput",
    "TaskIntent",
    "TaskPriority",
    "TaskStatus",
    "TaskVersion",
    "ValueKind",
]


class TaskStatus(enum.StrEnum):
    """FHIR Task.status; values are the wire strings."""

    DRAFT = "draft"
    REQUESTED = "requested"
    RECEIVED = "received"
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    READY = "ready"
    CANCELLED = "cancelled"
    IN_PROGRESS = "in-progress"
    ON_HOLD = "on-hold"
    FAILED = "failed"
    COMPLETED = "completed"


class TaskIntent(enum.StrEnum):
    """FHIR Task.intent; values are the wire strings."""

    UNKNOWN = "unknown"
    PROPOSAL = "proposal"
    PLAN = "plan"
    ORDER = "order"
    ORIGINAL_ORDER = "original-order"
    REFLEX_ORDER = "reflex-order"
    FILLER_ORDER = "filler-order"
    INSTANCE_ORDER = "instance-order"
    OPTION = "option"


class TaskPriority(enum.StrEnum):
    """FHIR request priority; values are the wire strings.

    ``rank`` orders them clinically: stat (most urgent) first.
    """

    ROUTINE = "routine"
    URGENT = "urgent"
    ASAP = "asap"
    STAT = "stat"

    @property
    def rank(self) -> int:
        """0 for stat, 1 asap, 2 urgent, 3 routine: lower is more urgent."""
        return _PRIORITY_RANK[self]


_PRIORITY_RANK = {
    TaskPriority.STAT: 0,
    TaskPriority.ASAP: 1,
    TaskPriority.URGENT: 2,
    TaskPriority.ROUTINE: 3,
}
#: The rank stored (and sorted on) for a task without a priority: after every priority.
NO_PRIORITY_RANK = 4
#: Rank by wire value, ``None`` (no priority) included: what the store and search use.
PRIORITY_RANKS: dict[str | None, int] = {
    **{p.value: r for p, r in _PRIORITY_RANK.items()},
    None: NO_PRIORITY_RANK,
}


class ValueKind(enum.StrEnum):
    """Which ``value[x]`` an input or output carries; values are the wire suffixes."""

    STRING = "String"
    BOOLEAN = "Boolean"
    INTEGER = "Integer"
    DECIMAL = "Decimal"
    DATETIME = "DateTime"
    CODE = "Code"
    REFERENCE = "Reference"

    @property
    def wire_key(self) -> str:
        """The wire key, e.g. ``valueString``."""
        return "value" + self.value


@attrs.frozen
class Period:
    """A time window; either end may be open. Both are normalised UTC instants."""

    start: str | None = None
    end: str | None = None


@attrs.frozen
class TaskInputOutput:
    """One input or output of a task: a type code and exactly one typed value.

    ``kind`` says which wire key (``valueString``, ``valueInteger`` ...) the value
    travels under, since several kinds share a Python type.
    """

    type: str
    value: str | bool | int | float
    kind: ValueKind = ValueKind.STRING


@attrs.frozen
class Restriction:
    """Constraints on fulfilment (FHIR Task.restriction)."""

    repetitions: int | None = None
    period: Period | None = None
    recipient: tuple[str, ...] = ()


@attrs.frozen(kw_only=True)
class Task:
    """A clinical workflow task (lab order, referral follow-up, ...).

    ``id``, ``version_id`` and ``last_modified`` are bookkeeping set by the store;
    they are ``None`` only on a task that was decoded but never stored.
    ``authored_on`` defaults to now.
    """

    status: TaskStatus
    intent: TaskIntent
    authored_on: str = attrs.field(factory=now)
    id: str | None = None
    version_id: str | None = None
    last_modified: str | None = None
    status_reason: str | None = None
    business_status: str | None = None
    priority: TaskPriority | None = None
    code: str | None = None
    description: str | None = None
    focus_id: str | None = None
    patient_id: str | None = None
    encounter_id: str | None = None
    execution_period: Period | None = None
    requester_id: str | None = None
    owner_id: str | None = None
    reason_code: str | None = None
    note: str | None = None
    based_on: tuple[str, ...] = ()
    part_of: tuple[str, ...] = ()
    input: tuple[TaskInputOutput, ...] = ()
    output: tuple[TaskInputOutput, ...] = ()
    restriction: Restriction | None = None


@attrs.frozen(kw_only=True)
class TaskVersion:
    """One recorded version of a task, as ``store.tasks.history()`` returns it.

    ``op`` is ``"create"``, ``"update"`` or ``"delete"``; ``version`` counts every
    change of the task from 1; ``changed_at`` is when it was written (UTC instant);
    ``override_reason`` is the ``admin_override`` an update gave, else ``None``;
    ``task`` is the task as that version left it (for a delete: as it was when deleted).
    ``origin``: ``"local"`` (an edit here), ``"server"`` (a server copy: pulled, or a
    resolution keeping the server's task) or ``"merge"`` (local changes replayed on a
    newer server version).
    """

    version: int
    op: str
    changed_at: str
    override_reason: str | None
    task: Task
    origin: str = "local"


T = TypeVar("T")


@attrs.frozen
class ApiResponse(Generic[T]):
    """What every resource call returns, as the remote SDK does: ``data`` and ``meta``.

    ``meta`` is a plain mapping in wire (camelCase) names: ``syncState`` on task
    responses, ``nextCursor``/``hasMore`` on searches.
    """

    data: T
    meta: dict[str, object] = attrs.field(factory=dict)
