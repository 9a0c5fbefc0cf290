"""Hostile and unusual input found by trying clinik-local as a hostile user (issue 15).

Each test pins one behaviour that broke before: input that escaped validation as a
builtin exception (deep cursors, huge integers, Unicode digits), equality filters
blind to Unicode normalisation, tasks too large for the service's 1 MiB request cap,
FHIR references read by their last path segment, RFC 3339 forms the timestamp parser
refused, and the history/naming rules of the API.
"""

from __future__ import annotations

import base64
import contextlib
import json
import unicodedata
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clinik_local import (
    ClinikError,
    Task,
    TaskStatus,
    TaskStore,
    TaskVersion,
    ValidationError,
    decode_task,
    encode_task,
    from_fhir,
    to_fhir,
)
from clinik_local.codec import MAX_WIRE_BYTES

PROPERTY = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TaskStore]:
    """One store for the read-only properties (opening one per example costs too much)."""
    path = tmp_path_factory.mktemp("hostile") / "shared.db"
    with TaskStore.open(path) as store:
        store.tasks.create_many(
            [
                {"status": "requested", "intent": "order", "priority": "urgent"},
                {"status": "draft", "intent": "plan"},
                {"status": "ready", "intent": "order", "priority": "stat"},
            ]
        )
        yield store


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _page_two_cursor(store: TaskStore, **search: object) -> dict[str, Any]:
    cursor = store.tasks.search(limit=1, **search).meta["nextCursor"]
    assert isinstance(cursor, str)
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(cursor + "=" * 4))
    return decoded


def _counts_unchanged(store: TaskStore, before: dict[str, int]) -> None:
    assert store.table_counts() == before


# --- 1. hostile input is always the library's own error -----------------------------


def test_a_deeply_nested_cursor_is_refused_as_a_cursor_not_a_recursion_error(
    shared_store: TaskStore,
) -> None:
    cursor = _b64(b"[" * 2900)
    assert len(cursor) <= 4096
    with pytest.raises(ValidationError) as caught:
        shared_store.tasks.search(cursor=cursor)
    assert caught.value.paths == ("cursor",)


@pytest.mark.parametrize(
    "key", [10**30, -(10**30), 5, -1, 10**5000], ids=["1e30", "-1e30", "5", "-1", "1e5000"]
)
def test_a_cursor_with_an_impossible_priority_key_is_refused_as_a_cursor(
    shared_store: TaskStore, key: int
) -> None:
    data = _page_two_cursor(shared_store, sort="priority")
    # json.dumps cannot write 10**5000 (int-string digit limit): build the JSON by hand.
    digits = "9" * 5001 if key == 10**5000 else str(key)
    raw = f'{{"q":{json.dumps(data["q"])},"k":[{digits},{json.dumps(data["k"][1])}]}}'
    cursor = _b64(raw.encode())
    with pytest.raises(ValidationError) as caught:
        shared_store.tasks.search(cursor=cursor, limit=1, sort="priority")
    assert caught.value.paths == ("cursor",)


@pytest.mark.parametrize("bad", ["\ud800", "a\x00b", "x" * 65])
def test_a_cursor_with_an_impossible_id_key_is_refused_as_a_cursor(
    shared_store: TaskStore, bad: str
) -> None:
    data = _page_two_cursor(shared_store)
    data["k"][-1] = bad
    with pytest.raises(ValidationError) as caught:
        shared_store.tasks.search(cursor=_b64(json.dumps(data).encode()), limit=1)
    assert caught.value.paths == ("cursor",)


def test_an_integer_too_long_to_print_is_refused_naming_the_field_and_writes_nothing(
    file_store: TaskStore,
) -> None:
    before = file_store.table_counts()
    huge = 10**5000
    request = {
        "status": "draft",
        "intent": "plan",
        "input": [{"type": "dose", "valueInteger": huge}, {"type": "d", "valueDecimal": huge}],
        "restriction": {"repetitions": huge},
    }
    with pytest.raises(ValidationError) as caught:
        file_store.tasks.create(request)
    assert set(caught.value.paths) == {
        "input[0].valueInteger",
        "input[1].valueDecimal",
        "restriction.repetitions",
    }
    assert "5001 digits" in str(caught.value)
    _counts_unchanged(file_store, before)


@pytest.mark.parametrize("limit", ["²", "٣", "１０", "1_0", " 5", "99999999999999999999"])
def test_a_limit_that_is_not_plain_ascii_digits_in_range_is_refused_naming_limit(
    shared_store: TaskStore, limit: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        shared_store.tasks.search(limit=limit)
    assert caught.value.paths == ("limit",)


def test_a_limit_of_ascii_digits_is_accepted(shared_store: TaskStore) -> None:
    assert len(shared_store.tasks.search(limit="2").data) == 2


@pytest.mark.parametrize("value", ["٢٠٢٥", "２０２５-01", "2025-0١"])
def test_date_filters_with_non_ascii_digits_are_refused_naming_the_filter(
    shared_store: TaskStore, value: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        shared_store.tasks.search(authoredOn=value)
    assert caught.value.paths == ("authoredOn",)


def test_filter_mappings_with_non_string_or_huge_keys_are_refused_naming_filters(
    shared_store: TaskStore,
) -> None:
    for filters in ({10**5000: "x"}, {("a",): 1}, {None: "x"}):
        with pytest.raises(ValidationError) as caught:
            shared_store.tasks.search(filters)  # type: ignore[arg-type]
        assert caught.value.paths == ("filters",)
    with pytest.raises(ValidationError) as caught:
        shared_store.tasks.search(input={"type": "dose", "value": 10**5000})
    assert caught.value.paths == ("input.value",)


def test_a_request_with_a_huge_integer_key_is_refused_naming_it(file_store: TaskStore) -> None:
    with pytest.raises(ValidationError) as caught:
        file_store.tasks.create({"status": "draft", "intent": "plan", 10**5000: 1})  # type: ignore[dict-item]
    assert len(caught.value.errors) == 1
    assert "digits" in caught.value.paths[0]


#: Drawn as this marker and replaced by 10**5000 inside the test: hypothesis (and pytest)
#: cannot print an integer of more than 4,300 digits in a failure report.
_HUGE = "<10**5000>"


def _unmark(value: object) -> object:
    if value == _HUGE:
        return 10**5000
    if isinstance(value, list):
        return [_unmark(v) for v in value]
    if isinstance(value, dict):
        return {_unmark(k): _unmark(v) for k, v in value.items()}
    return value


_HOSTILE_SCALARS = st.one_of(
    st.text(max_size=40),
    st.binary(max_size=40),
    st.integers(),
    st.sampled_from([10**30, -(10**30), _HUGE, float("nan"), float("inf"), "²", "٣", ""]),
    st.none(),
    st.booleans(),
)
_HOSTILE_VALUES = st.recursive(
    _HOSTILE_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), inner, max_size=3)
    ),
    max_leaves=8,
)
_FILTER_NAMES = st.sampled_from(
    [
        "status",
        "ownerId",
        "owner_id",
        "code",
        "businessStatus",
        "priority",
        "authoredOn",
        "periodEnd",
        "dueBefore",
        "basedOn",
        "input",
        "output",
        "text",
        "sort",
        "overdue",
        "total",
    ]
)


def _cursor_texts(fingerprint: str) -> st.SearchStrategy[object]:
    json_values = st.recursive(
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(),
            st.sampled_from([10**30, -(10**30)]),
            st.floats(),
            st.text(max_size=20),
        ),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
        max_leaves=6,
    )
    shaped = json_values.map(lambda k: json.dumps({"q": fingerprint, "k": k}).encode())
    nested = st.integers(1, 3000).map(lambda n: b"[" * n + b"{" * (n % 7))
    return st.one_of(
        st.text(max_size=60),
        st.binary(max_size=60),
        st.one_of(shaped, nested, st.binary(max_size=200)).map(_b64),
        _HOSTILE_VALUES,
    )


@PROPERTY
@given(data=st.data())
def test_any_text_bytes_or_json_as_cursor_limit_or_filter_raises_only_clinik_errors(
    shared_store: TaskStore, data: st.DataObject
) -> None:
    fingerprint = _page_two_cursor(shared_store)["q"]
    filters: dict[str, object] = data.draw(
        st.dictionaries(_FILTER_NAMES, _HOSTILE_VALUES, max_size=3)
    )
    if data.draw(st.booleans()):
        filters["cursor"] = data.draw(_cursor_texts(fingerprint))
    if data.draw(st.booleans()):
        filters["limit"] = data.draw(_HOSTILE_SCALARS)
    unmarked = _unmark(filters)
    assert isinstance(unmarked, dict)
    for call in (shared_store.tasks.search, shared_store.tasks.count):
        with contextlib.suppress(ClinikError):
            call(unmarked)


@PROPERTY
@given(value=_HOSTILE_VALUES, field=st.sampled_from(["note", "code", "input", "restriction"]))
def test_any_hostile_value_in_a_request_raises_only_validation_errors(
    value: object, field: str
) -> None:
    with contextlib.suppress(ValidationError):
        decode_task({"status": "draft", "intent": "plan", field: _unmark(value)})


# --- 3. text is stored in NFC; equality filters compare NFC to NFC --------------------

_NFC = "Café Müller – résultat prêt"
_NFD = unicodedata.normalize("NFD", _NFC)


def test_text_stored_in_nfd_is_found_by_the_same_text_typed_in_nfc(file_store: TaskStore) -> None:
    assert _NFC != _NFD
    created = file_store.tasks.create(
        {
            "status": "requested",
            "intent": "order",
            "businessStatus": _NFD,
            "code": _NFD,
            "input": [{"type": _NFD, "valueString": _NFD}],
        }
    ).data
    for name in ("businessStatus", "code"):
        assert [t.id for t in file_store.tasks.search({name: _NFC}).data] == [created.id], name
        assert [t.id for t in file_store.tasks.search({name: _NFD}).data] == [created.id], name
        assert file_store.tasks.count({name: {"not": [_NFC]}}).data == 0, name
    for value in (_NFC, _NFD):
        found = file_store.tasks.search(input={"type": value, "value": value}).data
        assert [t.id for t in found] == [created.id]


def test_every_text_field_is_stored_in_nfc_and_the_stored_body_round_trips(
    file_store: TaskStore,
) -> None:
    texts = ("statusReason", "businessStatus", "code", "description", "reasonCode", "note")
    request: dict[str, Any] = {"status": "requested", "intent": "order"}
    request.update(dict.fromkeys(texts, _NFD))
    request["output"] = [{"type": _NFD, "valueCode": _NFD}]
    created = file_store.tasks.create(request).data
    wire = encode_task(created)
    assert all(wire[name] == _NFC for name in texts)
    assert wire["output"] == [{"type": _NFC, "valueCode": _NFC}]
    assert file_store.tasks.get(created.id or "").data == created
    updated = file_store.tasks.update(created.id or "", {"note": _NFD})
    assert updated.meta["syncState"] == "pending"
    assert updated.data.version_id == "1", "an NFD spelling of the same note is no change"


@settings(max_examples=200, deadline=None)
@given(
    text=st.lists(
        st.characters(blacklist_categories=("Cs", "Cc"))
        | st.sampled_from(
            ["e\u0301", "\u0301", "\u212b", "\u1100\u1161", "\u2adc", "o\u0308\u0304"]
        ),
        max_size=20,
    ).map("".join)
)
def test_any_text_decodes_to_its_nfc_form(text: str) -> None:
    task = decode_task({"status": "draft", "intent": "plan", "note": text, "code": text})
    assert task.note == task.code == unicodedata.normalize("NFC", text)


def test_a_text_whose_nfc_form_is_over_the_limit_is_refused() -> None:
    # U+2ADC has a composition exclusion: NFC turns one character into two.
    with pytest.raises(ValidationError) as caught:
        decode_task({"status": "draft", "intent": "plan", "code": "\u2adc" * 200})
    assert caught.value.paths == ("code",)
    assert "NFC" in str(caught.value)


# --- 5. a task the service could never take is refused at the local write -------------


def _request_of_wire_size(size: int) -> dict[str, Any]:
    """A create request (id given) whose wire form is exactly ``size`` bytes of UTF-8."""
    request: dict[str, Any] = {
        "id": "big_1",
        "status": "requested",
        "intent": "order",
        "authoredOn": "2025-01-01T00:00:00.000Z",
        "input": [{"type": "blob", "valueString": "é" * 8000} for _ in range(65)],
        "note": "",
    }
    base = len(json.dumps(request, ensure_ascii=False, separators=(",", ":")).encode())
    assert 0 <= size - base <= 16384, "the note stays under its own limit"
    request["note"] = "n" * (size - base)
    assert len(json.dumps(request, ensure_ascii=False, separators=(",", ":")).encode()) == size
    return request


def test_create_accepts_a_wire_form_of_exactly_one_mib(file_store: TaskStore) -> None:
    assert MAX_WIRE_BYTES == 1_048_576
    created = file_store.tasks.create(_request_of_wire_size(MAX_WIRE_BYTES)).data
    assert created.id == "big_1"


def test_create_refuses_a_wire_form_one_byte_over_one_mib_and_writes_nothing(
    file_store: TaskStore,
) -> None:
    before = file_store.table_counts()
    with pytest.raises(ValidationError) as caught:
        file_store.tasks.create(_request_of_wire_size(MAX_WIRE_BYTES + 1))
    assert caught.value.paths == ("$",)
    assert "1,048,577 bytes" in str(caught.value)
    assert "1,048,576" in str(caught.value)
    _counts_unchanged(file_store, before)


def test_create_many_and_update_refuse_an_oversized_task_and_write_nothing(
    file_store: TaskStore,
) -> None:
    small = file_store.tasks.create({"status": "requested", "intent": "order"}).data
    before = file_store.table_counts()
    big = _request_of_wire_size(MAX_WIRE_BYTES + 10)
    with pytest.raises(ValidationError) as caught:
        file_store.tasks.create_many([{"status": "draft", "intent": "plan"}, big])
    assert caught.value.paths == ("[1]",)
    changes = {k: big[k] for k in ("input", "note")}
    with pytest.raises(ValidationError) as caught:
        file_store.tasks.update(small.id or "", changes)
    assert caught.value.paths == ("$",)
    _counts_unchanged(file_store, before)


def test_a_task_without_an_id_counts_the_id_the_store_will_give_it() -> None:
    request = _request_of_wire_size(MAX_WIRE_BYTES)
    del request["id"]  # 13 bytes fewer now, but a generated id is longer than "big_1"
    with pytest.raises(ValidationError):
        decode_task(request)


# --- 6. FHIR references, types, dates and codings -----------------------------------


def _fhir_task(**elements: object) -> dict[str, Any]:
    return {"resourceType": "Task", "status": "requested", "intent": "order", **elements}


@pytest.mark.parametrize(
    "reference",
    [
        "{t}/123/_history/7",
        "https://ehr.example.org/fhir/{t}/123/_history/7",
        "http://ehr.example.org:8080/base/r4/{t}/123",
    ],
)
def test_a_versioned_or_absolute_reference_imports_the_resource_id_not_the_version(
    reference: str,
) -> None:
    task = from_fhir(
        _fhir_task(
            **{
                "for": {"reference": reference.format(t="Patient")},
                "owner": {"reference": reference.format(t="PractitionerRole")},
                "requester": {"reference": reference.format(t="Organization")},
                "encounter": {"reference": reference.format(t="Encounter")},
                "basedOn": [{"reference": reference.format(t="ServiceRequest")}],
                "partOf": [{"reference": reference.format(t="Task")}],
            }
        )
    )
    assert (task.patient_id, task.owner_id, task.requester_id, task.encounter_id) == ("123",) * 4
    assert task.based_on == task.part_of == ("123",)


@pytest.mark.parametrize(
    ("element", "reference", "allowed"),
    [
        ("for", "Group/5", "Patient"),
        ("encounter", "Patient/5", "Encounter"),
        ("owner", "Observation/5", "PractitionerRole"),
        ("requester", "Task/5", "Device"),
        ("partOf", "ServiceRequest/5", "Task"),
    ],
)
def test_a_reference_to_the_wrong_resource_type_is_refused_naming_the_element_and_types(
    element: str, reference: str, allowed: str
) -> None:
    value: object = {"reference": reference}
    if element == "partOf":
        value = [value]
    with pytest.raises(ValidationError) as caught:
        from_fhir(_fhir_task(**{element: value}))
    (error,) = caught.value.errors
    assert error.path.startswith(element)
    assert error.allowed is not None
    assert allowed in error.allowed
    assert reference.split("/")[0] in error.message


@pytest.mark.parametrize(
    "reference", ["urn:uuid:5", "#contained", "Patient/", "Patient/a/b", "patient/5", "Patient/5?x"]
)
def test_a_malformed_reference_is_refused_naming_the_element(reference: str) -> None:
    with pytest.raises(ValidationError) as caught:
        from_fhir(_fhir_task(**{"for": {"reference": reference}}))
    assert caught.value.paths == ("for.reference",)


def test_owner_and_requester_accept_every_actor_type_fhir_r4_and_r5_allow() -> None:
    for rtype in ("Practitioner", "PractitionerRole", "Organization", "CareTeam",
                  "HealthcareService", "Patient", "Device", "RelatedPerson"):  # fmt: skip
        assert from_fhir(_fhir_task(owner={"reference": f"{rtype}/o1"})).owner_id == "o1"
    for rtype in ("Device", "Group", "Organization", "Patient", "Practitioner",
                  "PractitionerRole", "RelatedPerson"):  # fmt: skip
        assert from_fhir(_fhir_task(requester={"reference": f"{rtype}/r1"})).requester_id == "r1"


def test_a_reference_type_element_that_disagrees_is_refused() -> None:
    with pytest.raises(ValidationError) as caught:
        from_fhir(_fhir_task(**{"for": {"reference": "Patient/5", "type": "Group"}}))
    assert caught.value.paths == ("for.type",)


@pytest.mark.parametrize("not_a_task", [{"status": "draft"}, None, "Task", 5])
def test_to_fhir_of_anything_but_a_task_is_a_validation_error(not_a_task: object) -> None:
    with pytest.raises(ValidationError) as caught:
        to_fhir(not_a_task)  # type: ignore[arg-type]
    assert caught.value.paths == ("task",)


@pytest.mark.parametrize(
    ("given", "instant"),
    [
        ("2016-10-31", "2016-10-31T00:00:00.000Z"),
        ("2016-10", "2016-10-01T00:00:00.000Z"),
        ("2016", "2016-01-01T00:00:00.000Z"),
    ],
)
def test_a_date_only_authored_on_imports_as_its_first_instant_in_utc_and_round_trips(
    given: str, instant: str
) -> None:
    task = from_fhir(_fhir_task(authoredOn=given))
    assert task.authored_on == instant
    assert from_fhir(to_fhir(task, "R4")) == task == from_fhir(to_fhir(task, "R5"))


def test_a_date_only_period_covers_its_whole_end_day() -> None:
    task = from_fhir(
        _fhir_task(
            authoredOn="2016-10-30", executionPeriod={"start": "2016-10-31", "end": "2016-11-01"}
        )
    )
    assert task.execution_period is not None
    assert task.execution_period.start == "2016-10-31T00:00:00.000Z"
    assert task.execution_period.end == "2016-11-01T23:59:59.999Z"
    assert from_fhir(to_fhir(task)) == task


def test_an_impossible_date_only_value_is_refused_naming_the_element() -> None:
    with pytest.raises(ValidationError) as caught:
        from_fhir(_fhir_task(authoredOn="2016-02-30"))
    assert caught.value.paths == ("authoredOn",)


def test_a_coding_only_code_imports_as_its_code_value_and_round_trips() -> None:
    coding = {"coding": [{"system": "http://loinc.org", "code": "58410-2", "display": "CBC"}]}
    task = from_fhir(
        _fhir_task(
            code=coding,
            businessStatus={"coding": [{"display": "no code"}, {"code": "waiting"}]},
            input=[{"type": coding, "valueString": "x"}],
        )
    )
    assert task.code == "58410-2"
    assert task.business_status == "waiting"
    assert task.input[0].type == "58410-2"
    assert from_fhir(to_fhir(task)) == task
    assert to_fhir(task)["code"] == {"text": "58410-2"}


def test_a_concept_with_neither_text_nor_a_coded_value_is_refused_saying_what_is_needed() -> None:
    with pytest.raises(ValidationError) as caught:
        from_fhir(_fhir_task(code={"coding": [{"display": "CBC"}]}))
    assert caught.value.paths == ("code.text",)
    assert "coding" in str(caught.value)


# --- 7. RFC 3339 timestamps ----------------------------------------------------------


@pytest.mark.parametrize(
    "given",
    [
        "2025-02-01t08:00:00z",
        "2025-02-01T08:00:00z",
        "2025-02-01t08:00:00.250Z",
        "2025-02-01t09:00:00+01:00",
    ],
)
def test_lower_case_t_and_z_are_accepted_as_rfc_3339_allows(given: str) -> None:
    task = decode_task({"status": "draft", "intent": "plan", "authoredOn": given})
    assert task.authored_on in ("2025-02-01T08:00:00.000Z", "2025-02-01T08:00:00.250Z")


@pytest.mark.parametrize("given", ["2025-02-01T08:00:00+00:00:30", "2025-02-01T08:00:00-0130:15"])
def test_an_offset_with_seconds_is_refused_saying_offsets_are_hours_and_minutes(
    given: str,
) -> None:
    with pytest.raises(ValidationError) as caught:
        decode_task({"status": "draft", "intent": "plan", "authoredOn": given})
    assert caught.value.paths == ("authoredOn",)
    message = str(caught.value)
    assert "no timezone" not in message
    assert "±HH:MM" in message


# --- 8. history is typed; mappings use wire names, keywords may be snake_case ---------


def test_history_returns_task_versions_whose_tasks_are_what_the_calls_returned(
    file_store: TaskStore,
) -> None:
    created = file_store.tasks.create({"status": "requested", "intent": "order"}).data
    assert created.id is not None
    updated = file_store.tasks.update(created.id, {"status": "accepted"}).data
    file_store.tasks.delete(created.id)
    history = file_store.tasks.history(created.id).data
    assert all(isinstance(v, TaskVersion) for v in history)
    assert [(v.version, v.op) for v in history] == [(1, "create"), (2, "update"), (3, "delete")]
    assert [v.task for v in history] == [created, updated, updated]
    assert isinstance(history[1].task, Task)
    assert history[1].task.status is TaskStatus.ACCEPTED
    assert history[1].changed_at == updated.last_modified
    assert history[0].override_reason is None


@pytest.mark.parametrize(
    ("snake", "wire"), [("patient_id", "patientId"), ("due_before", "dueBefore")]
)
def test_a_snake_case_key_in_a_filter_mapping_is_refused_naming_its_wire_name(
    shared_store: TaskStore, snake: str, wire: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        shared_store.tasks.search({snake: "2025-01-01"})
    (error,) = caught.value.errors
    assert error.path == snake
    assert error.allowed == wire


def test_snake_case_keywords_are_the_same_filters_as_their_wire_names(
    shared_store: TaskStore,
) -> None:
    by_wire = shared_store.tasks.search(ownerId=None, businessStatus={"missing": True}).data
    by_snake = shared_store.tasks.search(owner_id=None, business_status={"missing": True}).data
    assert by_wire == by_snake
    assert len(by_wire) == 3
    assert shared_store.tasks.count(due_before="2999").data == 0


def test_a_snake_case_key_in_create_or_update_is_refused_naming_its_wire_name(
    file_store: TaskStore,
) -> None:
    task = file_store.tasks.create({"status": "draft", "intent": "plan"}).data
    before = file_store.table_counts()
    calls: list[Callable[[], object]] = [
        lambda: file_store.tasks.create({"status": "draft", "intent": "plan", "owner_id": "p1"}),
        lambda: file_store.tasks.update(task.id or "", {"owner_id": "p1"}),
    ]
    for call in calls:
        with pytest.raises(ValidationError) as caught:
            call()
        (error,) = caught.value.errors
        assert error.path == "owner_id"
        assert error.allowed == "ownerId"
        assert "wire name" in error.message
    _counts_unchanged(file_store, before)
