"""FHIR R4/R5 mapping: round trips, id mapping, validation by fhir.resources, NDJSON."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from fhir.resources.R4B.task import Task as R4BTask
from fhir.resources.task import Task as R5Task
from fhirclient.models.task import Task as FhirclientTask  # type: ignore[import-untyped]
from hypothesis import given, settings
from hypothesis import strategies as st

from clinik_local import Task, TaskStore, ValidationError, decode_task
from clinik_local.fhir import (
    BLANK_NOTE_URL,
    ID_SYSTEM,
    export_ndjson,
    fhir_id,
    from_fhir,
    import_ndjson,
    to_fhir,
)
from tests.strategies import instants, valid_requests


@st.composite
def stored_tasks(draw: st.DrawFn) -> Task:
    """A task as a store holds it: id, versionId and lastModified set."""
    request = draw(valid_requests(with_id=True))
    request["versionId"] = str(draw(st.integers(1, 50)))
    request["lastModified"] = max(draw(instants()), request["authoredOn"])
    return decode_task(request)


@settings(max_examples=150, deadline=None)
@given(stored_tasks(), st.sampled_from(["R4", "R5"]))
def test_from_fhir_inverts_to_fhir_for_r4_and_r5(task: Task, version: Any) -> None:
    resource = json.loads(json.dumps(to_fhir(task, version)))
    assert from_fhir(resource) == task


@settings(max_examples=60, deadline=None)
@given(stored_tasks())
def test_r5_export_validates_with_fhir_resources(task: Task) -> None:
    resource = to_fhir(task, "R5")
    R5Task.model_validate(resource)
    assert resource["id"] == fhir_id(task.id or "")


@settings(max_examples=60, deadline=None)
@given(stored_tasks())
def test_r4_export_validates_as_r4b_with_fhir_resources(task: Task) -> None:
    R4BTask.model_validate(to_fhir(task, "R4"))


@settings(max_examples=60, deadline=None)
@given(stored_tasks())
def test_r4_export_parses_strictly_with_fhirclient(task: Task) -> None:
    resource = to_fhir(task, "R4")
    parsed = FhirclientTask(resource, strict=True)
    assert parsed.intent == resource["intent"]
    assert parsed.as_json()["status"] == resource["status"]


@pytest.mark.parametrize("note", ["", "\u00a0", "\u2003\u2003"])
def test_blank_notes_travel_in_an_extension_that_every_validator_accepts(note: str) -> None:
    task = decode_task({"status": "draft", "intent": "order", "id": "t_1", "note": note})
    r4, r5 = to_fhir(task, "R4"), to_fhir(task, "R5")
    assert "note" not in r4  # Annotation.text is required, so no Annotation
    assert r4["extension"][0]["url"] == BLANK_NOTE_URL
    FhirclientTask(r4, strict=True)
    R4BTask.model_validate(r4)
    R5Task.model_validate(r5)
    assert from_fhir(r4) == task
    assert from_fhir(r5) == task


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=5), inner, max_size=2)
    ),
    max_leaves=4,
)


@settings(max_examples=200, deadline=None)
@given(stored_tasks(), st.sampled_from(["R4", "R5"]), st.data())
def test_from_fhir_raises_only_validation_errors_on_corrupted_resources(
    task: Task, version: Any, data: st.DataObject
) -> None:
    resource = to_fhir(task, version)
    key = data.draw(st.sampled_from(sorted(resource)))
    resource[key] = data.draw(_JSON)
    outcome: object
    try:
        outcome = from_fhir(resource)
    except ValidationError as exc:
        outcome = exc.paths
    # a Task, or a ValidationError naming at least one element: nothing else escapes
    assert isinstance(outcome, Task) or (isinstance(outcome, tuple) and len(outcome) > 0)


def test_ids_with_underscores_get_valid_fhir_ids_and_keep_the_exact_id() -> None:
    task = decode_task(
        {"status": "ready", "intent": "order", "id": "task_a_1", "partOf": ["parent_1"]}
    )
    resource = to_fhir(task)
    assert "_" not in resource["id"]
    assert resource["identifier"] == [{"system": ID_SYSTEM, "value": "task_a_1"}]
    assert resource["partOf"][0]["identifier"]["value"] == "parent_1"
    assert resource["partOf"][0]["reference"] == "Task/" + fhir_id("parent_1")
    assert from_fhir(resource).id == "task_a_1"
    assert fhir_id("plain-id.1") == "plain-id.1"


def test_r4_and_r5_differ_in_reason_and_status_reason() -> None:
    task = decode_task(
        {"status": "on-hold", "intent": "order", "reasonCode": "fever", "statusReason": "waiting"}
    )
    r4, r5 = to_fhir(task, "R4"), to_fhir(task, "R5")
    assert r4["reasonCode"] == {"text": "fever"}
    assert "reason" not in r4
    assert r5["reason"] == [{"concept": {"text": "fever"}}]
    assert "reasonCode" not in r5
    assert r4["statusReason"] == {"text": "waiting"}
    assert r5["statusReason"] == {"concept": {"text": "waiting"}}


def test_foreign_references_without_our_identifier_use_the_reference_id() -> None:
    task = from_fhir(
        {
            "resourceType": "Task",
            "status": "requested",
            "intent": "order",
            "authoredOn": "2024-01-02T03:04:05.000Z",
            "for": {"reference": "Patient/abc"},
        }
    )
    assert task.patient_id == "abc"


@pytest.mark.parametrize(
    ("resource", "path"),
    [
        ({"resourceType": "Patient"}, "resourceType"),
        ({"resourceType": "Task", "status": "bogus", "intent": "order"}, "status"),
        ({"resourceType": "Task", "status": "draft", "intent": "order", "for": 3}, "for"),
        (
            {
                "resourceType": "Task",
                "status": "draft",
                "intent": "order",
                "meta": {"versionId": 5},
            },
            "meta.versionId",
        ),
        ({"resourceType": "Task", "status": "draft", "intent": "order", "note": "x"}, "note"),
        (
            {"resourceType": "Task", "status": "draft", "intent": "order", "code": {}},
            "code.text",
        ),
    ],
)
def test_from_fhir_rejects_bad_input_naming_the_fhir_element(
    resource: dict[str, Any], path: str
) -> None:
    with pytest.raises(ValidationError) as info:
        from_fhir(resource)
    assert path in info.value.paths


@pytest.mark.parametrize("fmt", ["wire", "R4", "R5"])
def test_ndjson_export_then_import_into_a_fresh_store_round_trips(fmt: Any) -> None:
    requests = [
        {
            "status": "requested",
            "intent": "order",
            "id": f"t_{n:04d}",
            "patientId": f"pt_{n % 7}",
            "authoredOn": f"2024-01-01T00:{n // 60 % 60:02d}:{n % 60:02d}.000Z",
            "note": "" if n % 5 == 0 else f"note {n}",
            "input": [{"type": "dose", "valueInteger": n}],
        }
        for n in range(1300)
    ]
    with TaskStore.open(":memory:") as source, TaskStore.open(":memory:") as target:
        source.tasks.create_many(requests)
        buffer = io.StringIO()
        exported: list[int] = []
        assert export_ndjson(source, buffer, format=fmt, progress=exported.append) == 1300
        buffer.seek(0)
        imported: list[int] = []
        assert import_ndjson(target, buffer, format=fmt, progress=imported.append) == 1300
        before = {t.id: t for t in _everything(source)}
        after = {t.id: t for t in _everything(target)}
    assert exported == [1000, 300]
    assert imported == [1000, 300]
    assert before.keys() == after.keys()
    for task_id, task in before.items():
        assert _content(after[task_id]) == _content(task)


def test_import_reports_the_line_of_a_bad_record_and_unknown_formats() -> None:
    lines = '{"status":"draft","intent":"order"}\n\n{"status":"nope","intent":"order"}\n'
    with TaskStore.open(":memory:") as store:
        with pytest.raises(ValidationError) as info:
            import_ndjson(store, io.StringIO(lines))
        assert info.value.paths == ("line 3: status",)
        assert store.tasks.count().data == 0
        with pytest.raises(ValidationError) as fmt_info:
            export_ndjson(store, io.StringIO(), format="R6")  # type: ignore[arg-type]
        assert fmt_info.value.paths == ("format",)


def _everything(store: TaskStore) -> list[Task]:
    return (
        store.tasks.search(limit=1000).data
        + store.tasks.search(
            limit=1000, cursor=store.tasks.search(limit=1000).meta["nextCursor"]
        ).data
    )


def _content(task: Task) -> dict[str, Any]:
    from clinik_local import encode_task

    wire = encode_task(task)
    wire.pop("versionId")
    wire.pop("lastModified")
    return wire
