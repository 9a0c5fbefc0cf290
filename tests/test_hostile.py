"""Hostile strings: SQL metacharacters, LIKE wildcards, quotes and FTS5 query syntax.

Where a field allows them (free text: description, note, statusReason, businessStatus,
reasonCode, code, input/output values) they are stored and returned verbatim and
matched literally by its filter; where the format forbids them (ids) the call is
refused with a ValidationError naming the field. Either way nothing else happens: the
schema, the other tasks and the row counts are as they were.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from clinik_local import TaskStore, ValidationError, encode_task
from clinik_local.storage.connection import fetch_all

HOSTILE = [
    "'",
    "''",
    '"',
    "\\",
    "%",
    "_",
    "%%",
    "a%b",
    "a_b",
    "'; DROP TABLE tasks; --",
    "' OR '1'='1",
    '" OR ""="',
    "1; DELETE FROM outbox",
    "x' UNION SELECT body FROM tasks --",
    "/* comment */",
    "NEAR(cbc cmp)",
    '"cbc" OR "cmp"',
    "cb*",
    "^cbc",
    "description:cbc",
    "-cbc",
    "cbc AND NOT cmp",
    "{description note}:x",
    "(cbc",
    "cbc)",
    "?",
    ":name",
    "$1",
    "@p",
    "[x]",
    "x\ny",
    "tab\there",
    "O'Brien & Søn «ü» 漢字 🧪",
]
TEXT_FIELDS = ["description", "note", "statusReason", "businessStatus", "reasonCode", "code"]
ID_FIELDS = ["id", "patientId", "ownerId", "requesterId", "encounterId", "focusId"]
ID_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")


def _is_valid_id(value: str) -> bool:
    return 1 <= len(value) <= 64 and set(value) <= ID_CHARS


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TaskStore]:
    """A file store holding one task per hostile string (every text field set to it)."""
    path = tmp_path_factory.mktemp("hostile") / "hostile.db"
    with TaskStore.open(path) as opened:
        opened.tasks.create_many([_hostile_task(n, text) for n, text in enumerate(HOSTILE)])
        opened.tasks.create_many(
            [
                {"id": "pt_like_1", "status": "ready", "intent": "order", "patientId": "a_b"},
                {"id": "pt_like_2", "status": "ready", "intent": "order", "patientId": "axb"},
                {"id": "pt_like_3", "status": "ready", "intent": "order", "patientId": "a.b"},
            ]
        )
        yield opened


def _hostile_task(n: int, text: str) -> dict[str, Any]:
    request: dict[str, Any] = {"id": f"h_{n}", "status": "requested", "intent": "order"}
    for field in TEXT_FIELDS:
        request[field] = text
    request["input"] = [{"type": "free", "valueString": text}]
    request["output"] = [{"type": "coded", "valueCode": text}]
    return request


def _fingerprint(store: TaskStore) -> tuple[dict[str, int], list[tuple[Any, ...]]]:
    with store.read() as conn:
        schema = fetch_all(conn, "SELECT type, name, sql FROM sqlite_schema ORDER BY name")
    return store.table_counts(), schema


@pytest.mark.parametrize("n", range(len(HOSTILE)))
def test_hostile_text_is_stored_and_returned_verbatim_in_every_free_text_field(
    store: TaskStore, n: int
) -> None:
    task = encode_task(store.tasks.get(f"h_{n}").data)
    assert task == {**_hostile_task(n, HOSTILE[n]), **_managed(task)}


def _managed(task: dict[str, Any]) -> dict[str, Any]:
    return {k: task[k] for k in ("versionId", "lastModified", "authoredOn")}


@pytest.mark.parametrize("n", range(len(HOSTILE)))
def test_hostile_filter_values_match_literally_and_change_nothing(store: TaskStore, n: int) -> None:
    text = HOSTILE[n]
    before = _fingerprint(store)
    expected = [f"h_{n}"]
    for name in ("code", "businessStatus"):
        if "," in text:
            continue  # a comma means any-of in a filter string; the list form below is exact
        assert [t.id for t in store.tasks.search({name: text}).data] == expected, name
    for name in ("code", "businessStatus"):
        assert [t.id for t in store.tasks.search({name: [text]}).data] == expected, name
        assert store.tasks.count({name: {"not": [text]}}).data == store.tasks.count().data - 1
    assert [t.id for t in store.tasks.search(input={"type": "free", "value": text}).data] == (
        expected
    )
    assert [t.id for t in store.tasks.search(output={"type": "coded", "value": text}).data] == (
        expected
    )
    assert _fingerprint(store) == before


@pytest.mark.parametrize("n", range(len(HOSTILE)))
def test_hostile_full_text_search_is_literal_or_refused_by_name(store: TaskStore, n: int) -> None:
    text = HOSTILE[n]
    before = _fingerprint(store)
    has_word = any(c.isalnum() for c in text)
    if not has_word:
        with pytest.raises(ValidationError) as caught:
            store.tasks.search(text=text)
        assert caught.value.paths == ("text",)
    else:
        found = {t.id for t in store.tasks.search(text=text, limit=1000).data}
        assert f"h_{n}" in found  # each word matched as a word (prefix), never as syntax
        assert "pt_like_1" not in found
    assert _fingerprint(store) == before


@pytest.mark.parametrize("field", ID_FIELDS)
@pytest.mark.parametrize("text", [t for t in HOSTILE if not _is_valid_id(t)])
def test_hostile_ids_are_refused_naming_the_field_and_nothing_is_written(
    store: TaskStore, field: str, text: str
) -> None:
    """("_" and "a_b" are well-formed ids: the LIKE test below covers them.)"""
    before = _fingerprint(store)
    request = {"status": "draft", "intent": "order", field: text}
    with pytest.raises(ValidationError) as caught:
        store.tasks.create(request)
    assert caught.value.paths == (field,)
    with pytest.raises(ValidationError) as caught:
        store.tasks.create({"status": "draft", "intent": "order", "basedOn": ["ok", text]})
    assert caught.value.paths == ("basedOn[1]",)
    with pytest.raises(ValidationError) as caught:
        store.tasks.get(text)
    assert caught.value.paths == ("id",)
    with pytest.raises(ValidationError) as caught:
        store.tasks.update(text, {"note": "x"})
    assert caught.value.paths == ("id",)
    with pytest.raises(ValidationError) as caught:
        store.tasks.delete(text)
    assert caught.value.paths == ("id",)
    if field != "id":
        with pytest.raises(ValidationError) as caught:
            store.tasks.search({field: [text]})
        assert caught.value.paths[0].startswith(field)
    assert _fingerprint(store) == before


def test_underscore_and_dot_in_id_filters_are_not_wildcards(store: TaskStore) -> None:
    assert [t.id for t in store.tasks.search(patientId="a_b").data] == ["pt_like_1"]
    assert [t.id for t in store.tasks.search(patientId="a.b").data] == ["pt_like_3"]
    assert store.tasks.count(patientId="a_").data == 0


def test_hostile_strings_in_sort_limit_and_cursor_are_refused_by_name(store: TaskStore) -> None:
    before = _fingerprint(store)
    for name, value in [
        ("sort", "authoredOn; DROP TABLE tasks"),
        ("sort", "(SELECT 1)"),
        ("limit", "1; --"),
        ("cursor", "' OR 1=1 --"),
        ("status", "requested' OR '1'='1"),
        ("authoredOn", "ge2025' OR 1=1"),
    ]:
        with pytest.raises(ValidationError) as caught:
            store.tasks.search({name: value})
        assert caught.value.paths[0].startswith(name), (name, caught.value.paths)
    assert _fingerprint(store) == before


def test_hostile_updates_keep_text_verbatim_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "reopen.db"
    with TaskStore.open(path) as store:
        store.tasks.create({"id": "t1", "status": "requested", "intent": "order"})
        for text in HOSTILE:
            store.tasks.update("t1", {"note": text, "description": text})
        counts = store.table_counts()
    with TaskStore.open(path) as reopened:
        task = reopened.tasks.get("t1").data
        assert (task.note, task.description) == (HOSTILE[-1], HOSTILE[-1])
        assert reopened.table_counts() == counts
        history = reopened.tasks.history("t1").data
        notes = [item.task.note for item in history]
        assert notes[1:] == HOSTILE
