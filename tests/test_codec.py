"""Issue 3: the wire codec: round trips, validation with wire paths, no coercion, dates, ids."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clinik_local import (
    MAX_LIST_ITEMS,
    TEXT_LIMITS,
    TaskStatus,
    ValidationError,
    decode_task,
    encode_task,
)
from clinik_local.codec import converter
from clinik_local.demo import SEED_LAB_ORDER
from tests.strategies import (
    ID_ALPHABET,
    input_outputs,
    instants,
    invalid_requests,
    minimal_request,
    names_path,
    valid_requests,
)

#: Every wire field of a task that carries an id of the remote service.
ID_FIELDS = ["id", "patientId", "ownerId", "requesterId", "focusId", "encounterId"]
ID_LIST_FIELDS = ["basedOn", "partOf"]

# --- round trips ---------------------------------------------------------------------------


@given(valid_requests(with_id=True))
@settings(max_examples=200)
def test_any_valid_request_round_trips_to_the_same_wire_mapping(request: dict[str, Any]) -> None:
    task = decode_task(request)
    assert encode_task(task) == request
    assert decode_task(encode_task(task)) == task


@given(valid_requests())
def test_decode_builds_tuples_and_enums_not_lists_and_strings(request: dict[str, Any]) -> None:
    task = decode_task(request)
    for repeated in (task.based_on, task.part_of, task.input, task.output):
        assert isinstance(repeated, tuple)
    assert isinstance(task.status, TaskStatus)
    assert task.status.value == request["status"]


def test_seed_lab_order_validates_and_round_trips_after_normalisation() -> None:
    task = decode_task(SEED_LAB_ORDER)
    assert task.patient_id == "pt_abc123"
    assert task.owner_id == "prac_lab_tech"
    assert task.execution_period is not None
    assert task.execution_period.start == "2025-02-01T08:00:00.000Z"
    assert task.execution_period.end == "2025-02-01T17:00:00.000Z"
    assert [(i.type, i.value) for i in task.input] == [("lab-panel", "CBC"), ("lab-panel", "CMP")]
    wire = encode_task(task)
    # The documented normalisation: instants gain milliseconds, authoredOn defaults to now.
    expected = {
        **SEED_LAB_ORDER,
        "executionPeriod": {"start": "2025-02-01T08:00:00.000Z", "end": "2025-02-01T17:00:00.000Z"},
        "authoredOn": wire["authoredOn"],
    }
    assert wire == expected
    assert decode_task(wire) == task


def test_nulls_and_empty_lists_are_dropped_on_the_way_back_out() -> None:
    request = minimal_request(
        authoredOn="2025-01-01T00:00:00.000Z", note=None, basedOn=[], input=[], priority=None
    )
    assert encode_task(decode_task(request)) == {
        "status": "requested",
        "intent": "order",
        "authoredOn": "2025-01-01T00:00:00.000Z",
    }


@given(input_outputs())
def test_each_value_kind_keeps_its_wire_key_through_a_round_trip(item: dict[str, Any]) -> None:
    request = minimal_request(authoredOn="2025-01-01T00:00:00.000Z", output=[item])
    assert encode_task(decode_task(request))["output"] == [item]


def test_the_library_converter_is_not_the_cattrs_global_one() -> None:
    import cattrs

    assert converter is not cattrs.global_converter


# --- validation: one bad field, every bad field ----------------------------------------------


@given(invalid_requests())
@settings(max_examples=250)
def test_a_request_with_one_invalid_field_fails_naming_only_that_field(
    case: tuple[dict[str, Any], str],
) -> None:
    request, path = case
    with pytest.raises(ValidationError) as caught:
        decode_task(request)
    paths = caught.value.paths
    assert names_path(paths, path), paths
    assert all(names_path([p], path) for p in paths), paths  # and nothing else


def test_all_problems_of_one_request_are_reported_together() -> None:
    request = {
        "status": "done",
        "priority": 3,
        "executionPeriod": {"start": "2025-02-02T00:00:00Z", "end": "2025-02-01T00:00:00Z"},
        "input": [
            {"type": "a", "valueString": "ok"},
            {"type": "a", "valueString": "x", "valueInteger": 1},
            {"type": "b", "valueString": 5},
        ],
        "basedOn": ["ok", "bad id"],
        "colour": "red",
    }
    with pytest.raises(ValidationError) as caught:
        decode_task(request)
    assert set(caught.value.paths) == {
        "status",
        "intent",
        "priority",
        "executionPeriod.end",
        "input[1]",
        "input[2].valueString",
        "basedOn[1]",
        "colour",
    }
    message = str(caught.value)
    assert message.startswith("8 invalid fields")
    assert "draft, requested" in message  # the allowed values are named
    assert "colour" in message


def test_priority_as_a_number_is_refused_not_coerced() -> None:
    with pytest.raises(ValidationError) as caught:
        decode_task(minimal_request(priority=3))
    (error,) = caught.value.errors
    assert error.path == "priority"
    assert error.value == "3"
    assert error.allowed == "routine, urgent, asap, stat"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("status", 1),
        ("code", 7),
        ("note", b"bytes"),
        ("patientId", 123),
        ("basedOn", "one-id-not-a-list"),
        ("input", {"type": "t", "valueString": "v"}),
    ],
)
def test_values_of_the_wrong_type_are_refused_not_coerced(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as caught:
        decode_task(minimal_request(**{field: value}))
    assert caught.value.paths == (field,)


@pytest.mark.parametrize(
    ("item", "path"),
    [
        ({"type": "t", "valueInteger": True}, "input[0].valueInteger"),
        ({"type": "t", "valueInteger": 1.0}, "input[0].valueInteger"),
        ({"type": "t", "valueBoolean": 1}, "input[0].valueBoolean"),
        ({"type": "t", "valueDecimal": "1.5"}, "input[0].valueDecimal"),
        ({"type": "t", "valueDecimal": True}, "input[0].valueDecimal"),
        ({"type": "t", "valueString": None}, "input[0].valueString"),
    ],
)
def test_typed_values_are_not_coerced_between_json_types(item: dict[str, Any], path: str) -> None:
    with pytest.raises(ValidationError) as caught:
        decode_task(minimal_request(input=[item]))
    assert caught.value.paths == (path,)


def test_unknown_keys_are_named_at_every_level() -> None:
    request = minimal_request(
        patient_id="p",
        Status="x",
        executionPeriod={"start": "2025-01-01T00:00:00Z", "stop": "x"},
        input=[{"type": "t", "valueString": "v", "unit": "mg"}],
        restriction={"repetitions": 1, "count": 2},
    )
    with pytest.raises(ValidationError) as caught:
        decode_task(request)
    assert set(caught.value.paths) == {
        "patient_id",
        "Status",
        "executionPeriod.stop",
        "input[0].unit",
        "restriction.count",
    }
    assert "unknown field" in str(caught.value)


def test_non_mapping_request_is_a_validation_error() -> None:
    bad: object
    for bad in (None, [], "status=draft", 3, {("status",): "draft"}):
        with pytest.raises(ValidationError):
            decode_task(bad)  # type: ignore[arg-type]


# --- date-times ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "naive", ["2025-02-01T08:00:00", "2025-02-01T08:00:00.123", "2025-02-01 08:00"]
)
def test_naive_date_time_strings_are_refused_saying_why(naive: str) -> None:
    with pytest.raises(ValidationError) as caught:
        decode_task(minimal_request(authoredOn=naive))
    (error,) = caught.value.errors
    assert error.path == "authoredOn"
    assert "no timezone" in error.message
    assert "ambiguous" in error.message  # says why, not only what


def test_naive_datetime_objects_are_refused_saying_why() -> None:
    with pytest.raises(ValidationError) as caught:
        decode_task(minimal_request(executionPeriod={"start": datetime(2025, 2, 1, 8)}))
    (error,) = caught.value.errors
    assert error.path == "executionPeriod.start"
    assert "timezone" in error.message


@given(
    st.datetimes(min_value=datetime(1990, 1, 1), max_value=datetime(2100, 1, 1)),
    st.integers(-14 * 60, 14 * 60),
)
def test_aware_date_times_normalise_to_utc_milliseconds(moment: datetime, offset: int) -> None:
    aware = moment.replace(tzinfo=timezone(timedelta(minutes=offset)))
    u = aware.astimezone(UTC)
    expected = u.strftime("%Y-%m-%dT%H:%M:%S.") + f"{u.microsecond // 1000:03d}Z"
    for given_value in (aware, aware.isoformat()):
        task = decode_task(minimal_request(authoredOn=given_value))
        assert task.authored_on == expected


@given(instants(), instants())
def test_normalised_instants_sort_as_text_in_time_order(a: str, b: str) -> None:
    parsed_a = datetime.fromisoformat(a)
    parsed_b = datetime.fromisoformat(b)
    assert (a < b) == (parsed_a < parsed_b)
    assert len(a) == len("2025-02-01T08:00:00.000Z")


@pytest.mark.parametrize("bad", ["2025-02-30T08:00:00Z", "2025-13-01T00:00:00Z", "yesterday", ""])
def test_impossible_or_unparseable_date_times_are_refused(bad: str) -> None:
    with pytest.raises(ValidationError) as caught:
        decode_task(minimal_request(authoredOn=bad))
    assert caught.value.paths == ("authoredOn",)


@pytest.mark.parametrize(
    ("where", "path"),
    [
        ({"authoredOn": "0001-01-01T00:00:00+01:00"}, "authoredOn"),
        ({"executionPeriod": {"start": "0001-01-01T00:00:00+01:00"}}, "executionPeriod.start"),
        (
            {"input": [{"type": "t", "valueDateTime": "9999-12-31T23:59:59-01:00"}]},
            "input[0].valueDateTime",
        ),
    ],
)
def test_instants_out_of_range_in_utc_are_refused_at_their_exact_path(
    where: dict[str, Any], path: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        decode_task(minimal_request(**where))
    (error,) = caught.value.errors
    assert error.path == path
    assert "out of range" in error.message
    assert error.value is not None


def test_authored_on_defaults_to_now() -> None:
    before = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S")
    task = decode_task(minimal_request())
    after = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.999Z")
    assert before <= task.authored_on <= after


def test_execution_period_end_before_start_is_refused() -> None:
    with pytest.raises(ValidationError) as caught:
        decode_task(
            minimal_request(
                executionPeriod={"start": "2025-02-01T09:00:00Z", "end": "2025-02-01T08:59:59Z"}
            )
        )
    (error,) = caught.value.errors
    assert error.path == "executionPeriod.end"
    assert error.allowed is not None
    assert "2025-02-01T09:00:00.000Z" in error.allowed


# --- ids in the request ------------------------------------------------------------------------


@given(
    field=st.sampled_from(ID_FIELDS + ID_LIST_FIELDS),
    value=st.text(ID_ALPHABET, min_size=1, max_size=64),
)
def test_ids_of_1_to_64_characters_of_the_remote_alphabet_are_accepted(
    field: str, value: str
) -> None:
    given_value: object = [value] if field in ID_LIST_FIELDS else value
    task = decode_task(minimal_request(**{field: given_value}))
    assert encode_task(task)[field] == given_value


@given(
    field=st.sampled_from(ID_FIELDS + ID_LIST_FIELDS),
    value=st.one_of(
        st.just(""),
        st.text(ID_ALPHABET, min_size=65, max_size=80),
        st.text(min_size=1, max_size=64).filter(lambda v: any(c not in ID_ALPHABET for c in v)),
    ),
)
def test_ids_outside_the_alphabet_or_length_are_refused(field: str, value: str) -> None:
    in_list = field in ID_LIST_FIELDS
    with pytest.raises(ValidationError) as caught:
        decode_task(minimal_request(**{field: [value] if in_list else value}))
    assert caught.value.paths == ((f"{field}[0]",) if in_list else (field,))


def test_underscore_is_accepted_although_fhir_ids_have_none() -> None:
    assert decode_task(minimal_request(patientId="pt_abc_123")).patient_id == "pt_abc_123"


# --- invariants and limits ----------------------------------------------------------------------


def test_a_task_is_not_part_of_itself_and_last_modified_is_not_before_authored_on() -> None:
    with pytest.raises(ValidationError) as caught:
        decode_task(
            minimal_request(
                id="t1",
                partOf=["p", "t1"],
                authoredOn="2025-02-02T00:00:00Z",
                lastModified="2025-02-01T00:00:00Z",
            )
        )
    assert set(caught.value.paths) == {"partOf[1]", "lastModified"}


@pytest.mark.parametrize("field", sorted(set(TEXT_LIMITS) - {"type", "valueString", "valueCode"}))
def test_text_fields_accept_their_documented_maximum_and_refuse_one_more(field: str) -> None:
    limit = TEXT_LIMITS[field]
    assert decode_task(minimal_request(**{field: "x" * limit})) is not None
    with pytest.raises(ValidationError) as caught:
        decode_task(minimal_request(**{field: "x" * (limit + 1)}))
    (error,) = caught.value.errors
    assert error.path == field
    assert error.allowed == f"at most {limit} characters"


def test_input_text_limits_apply_to_type_and_value() -> None:
    for key in ("type", "valueString"):
        item = {"type": "t", "valueString": "v"}
        item[key] = "x" * (TEXT_LIMITS[key] + 1)
        with pytest.raises(ValidationError) as caught:
            decode_task(minimal_request(input=[item]))
        assert caught.value.paths == (f"input[0].{key}",)


def test_lists_have_a_documented_maximum_length() -> None:
    assert decode_task(minimal_request(basedOn=["a"] * MAX_LIST_ITEMS)) is not None
    with pytest.raises(ValidationError) as caught:
        decode_task(minimal_request(basedOn=["a"] * (MAX_LIST_ITEMS + 1)))
    assert caught.value.paths == ("basedOn",)


def test_each_input_needs_exactly_one_value() -> None:
    for item in ({"type": "t"}, {"type": "t", "valueString": "a", "valueCode": "b"}):
        with pytest.raises(ValidationError) as caught:
            decode_task(minimal_request(input=[item]))
        assert caught.value.paths == ("input[0]",)
        assert "exactly one" in str(caught.value)


def test_restriction_repetitions_must_be_at_least_one() -> None:
    assert decode_task(minimal_request(restriction={"repetitions": 1})).restriction is not None
    for bad in (0, -1):
        with pytest.raises(ValidationError) as caught:
            decode_task(minimal_request(restriction={"repetitions": bad}))
        assert caught.value.paths == ("restriction.repetitions",)


def test_error_values_are_truncated_for_display() -> None:
    with pytest.raises(ValidationError) as caught:
        decode_task(minimal_request(priority="x" * 500))
    (error,) = caught.value.errors
    assert error.value is not None
    assert len(error.value) <= 80
    assert error.value.endswith("...")
