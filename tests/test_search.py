"""Search forms, errors and derived data kept in step. (Query plans: ``tests/test_plans.py``.)"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from clinik_local import TaskStore
from clinik_local.errors import ClinikError, ValidationError
from clinik_local.search import parse_date_range


@pytest.fixture
def store() -> Iterator[TaskStore]:
    s = TaskStore.open(":memory:")
    yield s
    s.close()


def ids(store: TaskStore, **filters: object) -> list[str]:
    return [str(t.id) for t in store.tasks.search(limit=1000, **filters).data]


def make(store: TaskStore, task_id: str, **fields: object) -> None:
    request: dict[str, object] = {
        "id": task_id,
        "status": "requested",
        "intent": "order",
        "authoredOn": "2025-02-01T08:00:00Z",
    }
    request.update(fields)
    store.tasks.create(request)


# --- forms ------------------------------------------------------------------------------


def test_unassigned_mine_or_unassigned_and_assigned_forms(store: TaskStore) -> None:
    make(store, "t_mine", ownerId="me")
    make(store, "t_other", ownerId="you")
    make(store, "t_none")
    assert ids(store, ownerId=None) == ["t_none"]
    assert ids(store, ownerId={"missing": True}) == ["t_none"]
    assert sorted(ids(store, ownerId={"missing": False})) == ["t_mine", "t_other"]
    assert sorted(ids(store, ownerId=["me", None])) == ["t_mine", "t_none"]
    assert sorted(ids(store, ownerId={"not": ["me"]})) == ["t_none", "t_other"]
    assert ids(store, ownerId={"not": ["me", None]}) == ["t_other"]
    assert sorted(ids(store, owner_id="me,you")) == ["t_mine", "t_other"]


def test_status_not_excludes_and_comma_string_is_any_of(store: TaskStore) -> None:
    make(store, "t_done", status="completed")
    make(store, "t_cxl", status="cancelled")
    make(store, "t_open", status="ready")
    assert ids(store, status={"not": ["completed", "cancelled"]}) == ["t_open"]
    assert ids(store, status={"not": "completed,cancelled"}) == ["t_open"]
    assert sorted(ids(store, status="completed,cancelled")) == ["t_cxl", "t_done"]


def test_more_fields_membership_and_inputs(store: TaskStore) -> None:
    make(
        store,
        "t_child",
        partOf=["t_parent"],
        basedOn=["sr_1"],
        encounterId="enc_1",
        focusId="f_1",
        businessStatus="Specimen collected",
        intent="plan",
        input=[
            {"type": "lab-panel", "valueString": "CBC"},
            {"type": "fasting", "valueBoolean": True},
        ],
        output=[{"type": "count", "valueInteger": 3}],
    )
    make(store, "t_parent")
    assert ids(store, partOf="t_parent") == ["t_child"]
    assert ids(store, basedOn=["sr_1", "sr_9"]) == ["t_child"]
    assert ids(store, encounterId="enc_1", focusId="f_1", intent="plan") == ["t_child"]
    assert ids(store, businessStatus="Specimen collected") == ["t_child"]
    assert ids(store, input="lab-panel") == ["t_child"]
    assert ids(store, input="lab-panel|CBC") == ["t_child"]
    assert ids(store, input="lab-panel|CMP") == []
    assert ids(store, input={"type": "fasting", "value": True}) == ["t_child"]
    assert ids(store, output="count|3") == ["t_child"]
    assert ids(store, output="lab-panel") == []


def test_date_prefixes_follow_fhir_range_semantics(store: TaskStore) -> None:
    make(store, "t_jan_end", executionPeriod={"end": "2025-01-31T23:59:59.999Z"})
    make(store, "t_feb_start", executionPeriod={"end": "2025-02-01T00:00:00Z"})
    make(store, "t_feb_end", executionPeriod={"end": "2025-02-28T23:59:59.999Z"})
    make(store, "t_mar", executionPeriod={"end": "2025-03-01T00:00:00Z"})
    make(store, "t_no_end", executionPeriod={"start": "2025-02-10T00:00:00Z"})
    expected = {
        "eq": {"t_feb_start", "t_feb_end"},
        "ne": {"t_jan_end", "t_mar"},
        "lt": {"t_jan_end"},
        "eb": {"t_jan_end"},
        "le": {"t_jan_end", "t_feb_start", "t_feb_end"},
        "gt": {"t_mar"},
        "sa": {"t_mar"},
        "ge": {"t_feb_start", "t_feb_end", "t_mar"},
    }
    for prefix, want in expected.items():
        assert set(ids(store, periodEnd=f"{prefix}2025-02")) == want, prefix
        assert set(ids(store, periodEnd={prefix: "2025-02"})) == want, prefix
    assert set(ids(store, periodEnd="2025-02")) == expected["eq"]
    # A task without the date never matches, even "ne"/"gt".
    assert "t_no_end" not in ids(store, periodEnd="ne2030")
    assert ids(store, periodStart="2025-02-10") == ["t_no_end"]


def test_date_ranges_mapping_offsets_and_precision(store: TaskStore) -> None:
    make(store, "t_a", authoredOn="2025-01-15T10:00:00Z")
    make(store, "t_b", authoredOn="2025-02-01T00:00:00Z")
    make(store, "t_c", authoredOn="2025-06-30T23:59:59.999Z")
    assert ids(store, authoredOn={"ge": "2025-01-01", "lt": "2025-02-01"}) == ["t_a"]
    assert ids(store, authoredOn="2025-01-15T11:00+01:00") == ["t_a"]
    assert ids(store, authoredOn="2025-01-15T10:00:00Z") == ["t_a"]
    assert ids(store, authoredOn="2025-06-30T23:59:59.999Z") == ["t_c"]
    assert sorted(ids(store, authoredOn="ge2025-06,lt2025-02")) == ["t_a", "t_c"]
    assert ids(store, authored_on="2025") == ["t_c", "t_b", "t_a"]
    assert parse_date_range("d", "2024-02") == (
        "2024-02-01T00:00:00.000Z",
        "2024-03-01T00:00:00.000Z",
    )
    assert parse_date_range("d", "2025-12")[1] == "2026-01-01T00:00:00.000Z"


def test_due_before_and_overdue_skip_terminal_and_undated_tasks(store: TaskStore) -> None:
    make(store, "t_late", executionPeriod={"end": "2025-01-01T00:00:00Z"})
    make(store, "t_late_done", status="completed", executionPeriod={"end": "2025-01-01T00:00:00Z"})
    make(store, "t_future", executionPeriod={"end": "2999-01-01T00:00:00Z"})
    make(store, "t_undated")
    assert ids(store, overdue=True) == ["t_late"]
    assert ids(store, overdue="true") == ["t_late"]
    assert ids(store, dueBefore="2025-01-02") == ["t_late"]
    assert ids(store, dueBefore="2025-01-01") == []
    assert sorted(ids(store, dueBefore="3000")) == ["t_future", "t_late"]


def test_text_finds_prefixes_across_fields_and_stays_filterable(store: TaskStore) -> None:
    make(store, "t_desc", description="Order CBC and CMP", ownerId="me")
    make(store, "t_note", note="Draw before 10am")
    make(store, "t_input", input=[{"type": "lab-panel", "valueString": "Lipid"}])
    make(store, "t_code", code="ref-cbc", businessStatus="Awaiting café")
    assert sorted(ids(store, text="cbc")) == ["t_code", "t_desc"]
    assert sorted(ids(store, text="CB")) == ["t_code", "t_desc"]
    assert ids(store, text="cbc", ownerId="me") == ["t_desc"]
    assert ids(store, text="lip") == ["t_input"]
    assert ids(store, text="draw 10am") == ["t_note"]
    assert ids(store, text="cafe") == ["t_code"]
    page = store.tasks.search(text="cbc", limit=1, total=True)
    assert page.meta["total"] == 2
    assert page.meta["hasMore"] is True
    rest = store.tasks.search(text="cbc", limit=1, cursor=page.meta["nextCursor"])
    assert len(rest.data) == 1
    assert rest.data[0].id != page.data[0].id


HOSTILE = [
    '"',
    '""',
    "cbc*",
    "cbc OR draw",
    "NEAR(cbc draw, 2)",
    "description:cbc",
    "^cbc",
    "cbc -draw",
    "(cbc",
    "' OR 1=1 --",
    "cbc AND NOT",
    "\u202ecbc",
    "+cbc",
    "{description note}: cbc",
    "\u0301",
    "\U000f0000",
    "\u0300\u0301 cbc",
    "_",
]


def safe_ids(store: TaskStore, text: str) -> list[str] | None:
    """The ids found, or None when the text was refused as having no words."""
    try:
        return ids(store, text=text)
    except ValidationError as exc:
        if exc.paths != ("text",):
            raise
        return None


def test_hostile_text_matches_literally_and_never_raises_storage_errors(
    store: TaskStore,
) -> None:
    make(store, "t_desc", description="Order CBC and CMP")
    make(store, "t_near", note="NEAR the OR desk")
    for text in HOSTILE:
        found = safe_ids(store, text)
        if found is not None:
            assert set(found) <= {"t_desc", "t_near"}, text
    assert safe_ids(store, '"') is None
    assert ids(store, text="NEAR(") == ["t_near"]
    assert ids(store, text="or desk") == ["t_near"]
    assert ids(store, text="cbc*") == ["t_desc"]


def test_sort_priority_clinical_rank_missing_last_and_due_missing_last(
    store: TaskStore,
) -> None:
    make(store, "t_routine", priority="routine", executionPeriod={"end": "2025-03-01T00:00:00Z"})
    make(store, "t_stat", priority="stat", executionPeriod={"end": "2025-05-01T00:00:00Z"})
    make(store, "t_none")
    make(store, "t_asap", priority="asap", executionPeriod={"end": "2025-04-01T00:00:00Z"})
    make(store, "t_urgent", priority="urgent")
    assert ids(store, sort="-priority") == ["t_stat", "t_asap", "t_urgent", "t_routine", "t_none"]
    assert ids(store, sort=["priority"]) == ["t_none", "t_routine", "t_urgent", "t_asap", "t_stat"]
    assert ids(store, sort="due")[:3] == ["t_routine", "t_asap", "t_stat"]
    assert ids(store, sort="-due")[-3:] == ["t_stat", "t_asap", "t_routine"]


def test_total_and_count_take_the_same_filters(store: TaskStore) -> None:
    for i in range(5):
        make(store, f"t_{i}", ownerId=None if i % 2 else "me")
    page = store.tasks.search(ownerId=["me", None], total=True, limit=2)
    assert page.meta["total"] == 5
    assert store.tasks.count(ownerId=None).data == 2
    assert store.tasks.count({"ownerId": "me"}, sort="-priority").data == 3
    assert "total" not in store.tasks.search(limit=1).meta


# --- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filters", "path"),
    [
        ({"colour": "red"}, "colour"),
        ({"authoredOn": "xx2025"}, "authoredOn"),
        ({"authoredOn": "2025-13"}, "authoredOn"),
        ({"authoredOn": "2025-02-30"}, "authoredOn"),
        ({"authoredOn": "yesterday"}, "authoredOn"),
        ({"periodEnd": {"after": "2025"}}, "periodEnd"),
        ({"lastModified": {"ge": "2025-1"}}, "lastModified.ge"),
        ({"dueBefore": "soon"}, "dueBefore"),
        ({"overdue": False}, "overdue"),
        ({"overdue": "yes"}, "overdue"),
        ({"status": "done"}, "status"),
        ({"status": None}, "status"),
        ({"status": {"is": "ready"}}, "status"),
        ({"ownerId": {"missing": "maybe"}}, "ownerId.missing"),
        ({"ownerId": "has space"}, "ownerId"),
        ({"partOf": "not an id"}, "partOf"),
        ({"input": {"kind": "x"}}, "input"),
        ({"text": "  !!  "}, "text"),
        ({"text": 5}, "text"),
        ({"sort": "-colour"}, "sort"),
        ({"sort": "priority,priority"}, "sort"),
        ({"total": "sometimes"}, "total"),
        ({"limit": 0}, "limit"),
        ({"cursor": "garbage!"}, "cursor"),
    ],
)
def test_bad_filters_are_validation_errors_naming_them(
    store: TaskStore, filters: dict[str, object], path: str
) -> None:
    with pytest.raises(ValidationError) as info:
        store.tasks.search(filters)
    assert info.value.paths == (path,)


def test_a_cursor_from_another_query_or_sort_is_refused(store: TaskStore) -> None:
    for i in range(3):
        make(store, f"t_{i}", ownerId="me")
    cursor = store.tasks.search(ownerId="me", limit=1).meta["nextCursor"]
    assert isinstance(cursor, str)
    assert len(store.tasks.search(ownerId="me", limit=1, cursor=cursor).data) == 1
    for other in ({"ownerId": "you"}, {"ownerId": "me", "sort": "-priority"}):
        with pytest.raises(ValidationError) as info:
            store.tasks.search(other, cursor=cursor)
        assert info.value.paths == ("cursor",)


# --- derived data -----------------------------------------------------------------------


def test_derived_search_data_follows_updates_deletes_and_rollbacks(store: TaskStore) -> None:
    make(store, "t_1", description="cbc", partOf=["t_p"], input=[{"type": "a", "valueCode": "x"}])
    store.tasks.update("t_1", {"description": "lipid", "partOf": ["t_q"], "input": None})
    assert ids(store, text="cbc") == []
    assert ids(store, text="lipid") == ["t_1"]
    assert ids(store, partOf="t_p") == []
    assert ids(store, partOf="t_q") == ["t_1"]
    assert ids(store, input="a") == []
    with pytest.raises(ClinikError):
        store.tasks.create_many(
            [
                {"id": "t_2", "status": "ready", "intent": "order", "description": "ghost"},
                {"id": "t_1", "status": "ready", "intent": "order"},  # exists: rolls back
            ]
        )
    assert ids(store, text="ghost") == []
    store.tasks.delete("t_1")
    assert ids(store, text="lipid") == []
    assert ids(store, partOf="t_q") == []
    assert store.table_counts()["task_refs"] == 0
    assert store.table_counts()["task_io"] == 0


def test_terminal_statuses_match_the_lifecycle_and_the_partial_index() -> None:
    from clinik_local.lifecycle import TERMINAL
    from clinik_local.search import _NOT_TERMINAL, TERMINAL_STATUSES
    from clinik_local.storage.migrations import schema_sql

    assert set(TERMINAL_STATUSES) == {s.value for s in TERMINAL}
    assert f"WHERE {_NOT_TERMINAL};" in schema_sql()
