"""The FHIR Task state machine, as data a reader can check against the spec.

See https://hl7.org/fhir/R5/task.html#statemachine. ``TRANSITIONS`` maps each status
to the statuses it may move to; the four terminal statuses map to nothing. Staying in
the same status is always allowed (a no-op for the lifecycle). Creating a task may use
any status, since records arrive from elsewhere mid-life; updates are checked.
Administrative corrections may override the table explicitly (``admin_override=`` on
``TaskStore.tasks.update``), and the override is recorded in the task's history.
"""

from __future__ import annotations

from collections.abc import Mapping

from .model import TaskStatus as S

__all__ = ["TERMINAL", "TERMINAL_STATUSES", "TRANSITIONS", "can_transition", "transition_problem"]

TRANSITIONS: Mapping[S, frozenset[S]] = {
    S.DRAFT: frozenset({S.REQUESTED, S.READY, S.CANCELLED}),
    S.REQUESTED: frozenset({S.RECEIVED, S.ACCEPTED, S.REJECTED, S.CANCELLED}),
    S.RECEIVED: frozenset({S.ACCEPTED, S.REJECTED, S.CANCELLED}),
    S.ACCEPTED: frozenset({S.IN_PROGRESS, S.CANCELLED}),
    S.READY: frozenset({S.IN_PROGRESS, S.CANCELLED}),
    S.IN_PROGRESS: frozenset({S.ON_HOLD, S.COMPLETED, S.FAILED, S.READY, S.CANCELLED}),
    S.ON_HOLD: frozenset({S.IN_PROGRESS, S.CANCELLED}),
    S.REJECTED: frozenset(),
    S.CANCELLED: frozenset(),
    S.COMPLETED: frozenset(),
    S.FAILED: frozenset(),
}

TERMINAL: frozenset[S] = frozenset(s for s, nexts in TRANSITIONS.items() if not nexts)
#: The same statuses as sorted wire strings (for SQL such as search's ``overdue``).
TERMINAL_STATUSES: tuple[str, ...] = tuple(sorted(s.value for s in TERMINAL))


def transition_problem(old: S, new: S) -> str | None:
    """Why ``old -> new`` is not allowed, or ``None`` when it is."""
    if old == new or new in TRANSITIONS[old]:
        return None
    if old in TERMINAL:
        return f"{old.value!r} is a terminal status; a finished task cannot change status"
    allowed = ", ".join(sorted(s.value for s in TRANSITIONS[old]))
    return f"from {old.value!r} a task may move only to: {allowed}"


def can_transition(old: S, new: S) -> bool:
    """Whether the lifecycle allows ``old -> new`` (same status included)."""
    return transition_problem(old, new) is None
