"""The FHIR R4 remote: the outbox pushed to Medplum's own FHIR engine and to a HAPI-like server.

Real HTTP on 127.0.0.1 throughout: the Medplum peer (tests/peers/medplum, the engine of
Medplum's server), clinik-local's HAPI-like FHIR server (409 on stale versions, integer
versions) and the fault proxy between them and the sync engine. The answers of a FHIR
server are classified by ``FhirR4Remote`` (unit tests with ``httpx.MockTransport`` for the
statuses no real server here produces on demand).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fhirclient.models.task import Task as FhirclientTask  # type: ignore[import-untyped]
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from clinik_local import Task, TaskStore, ValidationError, from_fhir
from clinik_local.codec import encode_task
from clinik_local.demo import SEED_LAB_ORDER, generate_requests
from clinik_local.fhir import ID_SYSTEM
from clinik_local.ids import ID_PATTERN
from clinik_local.remotes.base import (
    Change,
    ChangesPage,
    Conflict,
    CursorExpired,
    Delivered,
    ListedPage,
    Refused,
    Transient,
)
from clinik_local.remotes.fhir import (
    CHANGE_ID_URL,
    CONTENT_HASH_URL,
    FhirR4Remote,
    server_task_id,
    task_id_from_server,
    written_by,
)
from clinik_local.sync import SyncConfig
from clinik_local.testing.fhir_server import HapiLikeFhirServer
from clinik_local.wire import without_server_fields
from tests.peers.fault_proxy import Fault, FaultProxy
from tests.peers.medplum import MedplumPeer, run_medplum_peer

TOKEN = "fhir-test-token"


def token() -> str:
    return TOKEN


def dashed(_field: str, our_id: str) -> str:
    """A reference map for the tests: the server knows our ``pt_1`` as ``pt-1``."""
    return our_id.replace("_", "-")


def fast(remote: FhirR4Remote, **extra: Any) -> SyncConfig:
    """A SyncConfig that retries quickly (the tests' faults are many and short)."""
    return SyncConfig(
        remote=remote,
        backoff_base=0.01,
        backoff_cap=0.1,
        max_retry_after=0.05,
        jitter_seed=1,
        **extra,
    )


def flush_all(store: TaskStore, deadline: float = 120.0) -> None:
    """Flush until every deliverable change is delivered (faults make single flushes short)."""
    end = time.monotonic() + deadline
    while not store.sync.flush(timeout=5):
        assert time.monotonic() < end, store.sync.status()
        store.sync.notify_online()


def tid(task: Task) -> str:
    """A stored task's id (always set once created)."""
    assert task.id is not None
    return task.id


def content(task_wire: dict[str, Any]) -> dict[str, Any]:
    return without_server_fields(task_wire)


def all_server_tasks(client: httpx.Client) -> dict[str, dict[str, Any]]:
    """Every Task on the server, by our id (its clinik-local identifier); duplicates fail."""
    bundle = client.get("/Task", params={"_count": "1000"}).json()
    found: dict[str, dict[str, Any]] = {}
    for entry in bundle.get("entry", []):
        resource = entry["resource"]
        ours = [i["value"] for i in resource.get("identifier", []) if i["system"] == ID_SYSTEM]
        assert len(ours) == 1, resource
        assert ours[0] not in found, f"{ours[0]} is on the server twice"
        found[ours[0]] = resource
    assert bundle.get("total", len(found)) == len(found)
    return found


@pytest.fixture(scope="module")
def own_peer() -> Iterator[MedplumPeer]:
    """A Medplum peer of this module's own, with a token (counts of all Tasks must be ours)."""
    with run_medplum_peer(token=TOKEN) as peer:
        yield peer


@pytest.fixture
def hapi() -> Iterator[HapiLikeFhirServer]:
    with HapiLikeFhirServer(token=TOKEN) as server:
        yield server


# --- ids ---------------------------------------------------------------------------------

our_ids = st.from_regex(f"\\A{ID_PATTERN}\\Z", fullmatch=True)


@settings(max_examples=300, deadline=None)
@given(st.lists(our_ids, min_size=2, max_size=6, unique=True))
def test_server_task_ids_are_fhir_ids_and_never_collide(ids: list[str]) -> None:
    mapped = [server_task_id(i) for i in ids]
    assert len(set(mapped)) == len(ids)
    for ours, theirs in zip(ids, mapped, strict=True):
        assert len(theirs) <= 64
        assert all(c.isascii() and (c.isalnum() or c in ".-") for c in theirs), theirs
        back = task_id_from_server(theirs)
        assert back == ours or (back is None and theirs.startswith("h."))


def test_generated_ids_escape_readably_and_long_ones_hash() -> None:
    assert server_task_id("task_01J9ABCDEF") == "task-01J9ABCDEF"
    assert task_id_from_server("task-01J9ABCDEF") == "task_01J9ABCDEF"
    assert server_task_id("lab-2025.17") == "lab.-2025..17"
    long_one = "a-" * 32  # escapes to 96 characters
    hashed = server_task_id(long_one)
    assert hashed.startswith("h.")
    assert len(hashed) == 64
    assert task_id_from_server(hashed) is None
    assert task_id_from_server("Patient.x") is None  # not something we escaped


# --- classification of answers (no real server produces these on demand) ----------------


def remote_answering(status: int, body: object = None, **headers: str) -> FhirR4Remote:
    def handler(request: httpx.Request) -> httpx.Response:
        text = body if isinstance(body, str) else json.dumps(body or {})
        return httpx.Response(status, text=text, headers=headers)

    return FhirR4Remote(
        "http://127.0.0.1:1/fhir/R4", token, http_transport=httpx.MockTransport(handler)
    )


def a_change(op: str = "update", version: str | None = "1") -> Change:
    return Change(
        change_id="chg_1",
        task_id="task_1",
        op=op,  # type: ignore[arg-type]
        body={"status": "requested", "intent": "order", "authoredOn": "2025-01-01T00:00:00.000Z"},
        server_version=version,
    )


def outcome(code: str, text: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": text}],
    }


def test_429_and_5xx_are_transient_with_retry_after_honoured() -> None:
    limited = remote_answering(429, outcome("throttled", "slow down"), **{"Retry-After": "7"})
    answer = limited.push(a_change(), lane=0)
    assert answer == Transient(error="HTTP 429", status=429, retry_after=7.0)
    for status in (408, 500, 502, 503, 504):
        answer = remote_answering(status, "").push(a_change(), lane=0)
        assert isinstance(answer, Transient)
        assert answer.status == status


def test_other_4xx_is_refused_carrying_the_operation_outcome_text() -> None:
    bad = outcome("invalid", "Invalid additional property")
    bad["issue"][0]["expression"] = ["Task.colour"]
    answer = remote_answering(400, bad).push(a_change(), lane=0)
    assert isinstance(answer, Refused)
    assert answer.status == 400
    assert answer.error == "HTTP 400: Invalid additional property (Task.colour)"
    # a 409 that is not about versions (referential integrity) is refused, not a conflict
    answer = remote_answering(409, outcome("conflict", "HAPI-0550: referenced")).push(
        a_change(), lane=0
    )
    assert isinstance(answer, Refused)
    assert answer.status == 409


def test_a_network_failure_is_transient_and_no_connection_unreachable() -> None:
    def broken(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadError("reset", request=request)

    remote = FhirR4Remote(
        "http://127.0.0.1:1/fhir/R4", token, http_transport=httpx.MockTransport(broken)
    )
    assert isinstance(remote.push(a_change(), lane=0), Transient)
    nowhere = FhirR4Remote("http://127.0.0.1:9/fhir/R4", token, timeout=2)
    assert type(nowhere.push(a_change(), lane=0)).__name__ == "Unreachable"


def test_sync_config_builds_the_fhir_remote_by_name_and_refuses_unknown_names() -> None:
    config = SyncConfig(
        remote="fhir-r4", base_url="http://127.0.0.1:1/fhir/R4", token_provider=token
    )
    remote = config.make_remote()
    assert isinstance(remote, FhirR4Remote)
    assert remote.base_url == "http://127.0.0.1:1/fhir/R4"
    with pytest.raises(ValidationError) as caught:
        SyncConfig(remote="hl7v2", base_url="http://127.0.0.1:1/x", token_provider=token)  # type: ignore[arg-type]
    assert caught.value.paths == ("remote",)
    assert "fhir-r4" in str(caught.value.errors[0].allowed)
    with pytest.raises(ValidationError) as caught:
        SyncConfig(remote="fhir-r4", token_provider=token)
    assert caught.value.paths == ("base_url",)


# --- references ---------------------------------------------------------------------------


def test_an_unmappable_reference_is_refused_naming_the_field_and_nothing_is_sent(
    tmp_path: Path, hapi: HapiLikeFhirServer
) -> None:
    remote = FhirR4Remote(hapi.url, token)
    with TaskStore.open(tmp_path / "t.db", sync=fast(remote)) as store:
        task = store.tasks.create({"status": "requested", "intent": "order", "patientId": "pt_9"})
        flush_all(store)
        [dead] = store.sync.dead_letters()
        assert dead.task_id == task.data.id
        assert dead.status is None
        assert dead.error is not None
        assert dead.error.startswith("patientId: is not a FHIR id, and reference_map gave no")
        assert "(got 'pt_9')" in dead.error
        assert "reference_map" in dead.error
    assert hapi.tasks() == {}
    assert hapi.writes == 0


def test_check_refuses_before_writing_naming_every_unmappable_reference_field(
    tmp_path: Path, hapi: HapiLikeFhirServer
) -> None:
    """The write-time form of the refusal: ``remote.check(request)`` raises the library's
    ValidationError naming each field, so the app writes nothing; a push of such a task
    names them all in its dead letter and sends nothing."""
    remote = FhirR4Remote(hapi.url, token, reference_map=lambda f, i: {"pt_ok": "p1"}.get(i))
    request = {
        "status": "requested",
        "intent": "order",
        "patientId": "pt_ok",  # mapped
        "ownerId": "prac_1",  # neither mapped nor a FHIR id
        "requesterId": "dr.who",  # a FHIR id: as it is
        "basedOn": ["sr_1"],
        "partOf": ["task_parent"],  # our own tasks: always fine
        "restriction": {"recipient": ["org_2"]},
        "input": [{"type": "specimen", "valueReference": "spec_3"}],
    }
    with pytest.raises(ValidationError) as caught:
        remote.check(request)
    assert caught.value.paths == (
        "ownerId",
        "basedOn",
        "restriction.recipient",
        "input.valueReference",
    )
    assert [e.value for e in caught.value.errors] == ["'prac_1'", "'sr_1'", "'org_2'", "'spec_3'"]
    remote.check({k: v for k, v in request.items() if k in ("status", "intent", "patientId")})
    with TaskStore.open(tmp_path / "t.db", sync=fast(remote)) as store:
        task = store.tasks.create(request).data
        with pytest.raises(ValidationError) as again:
            remote.check(task)  # a stored Task works the same
        assert again.value.paths == caught.value.paths
        flush_all(store)
        [dead] = store.sync.dead_letters()
        assert dead.status is None
        assert dead.error is not None
        assert dead.error == "; ".join(str(e) for e in caught.value.errors)
    assert hapi.writes == 0


def test_a_reference_map_that_raises_is_a_refusal_naming_the_field_and_sends_nothing() -> None:
    sent: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(500)

    def lookup(_field: str, our_id: str) -> str | None:
        return {"p-1": "p1"}[our_id]  # KeyError for anything else

    remote = FhirR4Remote(
        "http://127.0.0.1:1/fhir/R4",
        token,
        reference_map=lookup,
        http_transport=httpx.MockTransport(record),
    )
    with pytest.raises(ValidationError) as caught:
        remote.check({"status": "draft", "intent": "plan", "ownerId": "x"})
    assert caught.value.paths == ("ownerId",)
    assert "reference_map failed for it: KeyError" in str(caught.value.errors[0])
    change = a_change(op="create", version=None)
    answer = remote.push(
        Change(
            change_id=change.change_id,
            task_id=change.task_id,
            op="create",
            body={**(change.body or {}), "patientId": "p-1", "ownerId": "x"},
            server_version=None,
        ),
        lane=0,
    )
    assert isinstance(answer, Refused)
    assert answer.status is None
    assert answer.error.startswith("ownerId: reference_map failed for it: KeyError")
    assert sent == []


def test_pulled_foreign_tasks_read_versioned_references_and_wrong_types_are_skipped(
    tmp_path: Path, hapi: HapiLikeFhirServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Tasks written on the server by another client: ``Patient/123/_history/7`` is
    patient ``123``; ``Group/5`` as the patient is refused on import (that Task is
    skipped and logged, the pull goes on)."""
    base = {"resourceType": "Task", "status": "requested", "intent": "order"}
    hapi.put_task({**base, "id": "v1", "for": {"reference": "Patient/123/_history/7"}})
    hapi.put_task({**base, "id": "g1", "for": {"reference": "Group/5"}})
    hapi.put_task({**base, "id": "ok", "owner": {"reference": f"{hapi.url}/Practitioner/p-9"}})
    remote = FhirR4Remote(hapi.url, token)
    with TaskStore.open(tmp_path / "t.db", sync=fast(remote)) as store:
        with caplog.at_level("WARNING", logger="clinik_local.remotes.fhir"):
            store.sync.pull()
        found = {tid(t): t for t in store.tasks.search(limit=10).data}
    assert sorted(found) == ["ok", "v1"]
    assert found["v1"].patient_id == "123"
    assert found["ok"].owner_id == "p-9"
    skipped = {r.getMessage() for r in caplog.records if "'g1'" in r.getMessage()}
    assert skipped == {
        "skipped server Task 'g1': 1 invalid field: for.reference: for cannot refer to a "
        "Group (got 'Group/5'); allowed: Patient"
    }


def test_the_reference_map_names_the_servers_resources(
    tmp_path: Path, hapi: HapiLikeFhirServer
) -> None:
    asked: list[tuple[str, str]] = []

    def mapping(field: str, our_id: str) -> str | None:
        asked.append((field, our_id))
        return {"pt_9": "Pat9", "prac_1": "42"}.get(our_id)  # None: the default rule

    remote = FhirR4Remote(hapi.url, token, reference_map=mapping)
    with TaskStore.open(tmp_path / "t.db", sync=fast(remote)) as store:
        parent = store.tasks.create({"status": "requested", "intent": "plan"}).data
        task = store.tasks.create(
            {
                "status": "requested",
                "intent": "order",
                "patientId": "pt_9",
                "ownerId": "prac_1",
                "requesterId": "dr.who",
                "partOf": [tid(parent)],
            }
        ).data
        flush_all(store)
        assert store.sync.dead_letters() == []
    stored = hapi.tasks()[server_task_id(tid(task))]
    assert stored["for"]["reference"] == "Patient/Pat9"
    assert stored["owner"]["reference"] == "Practitioner/42"
    assert stored["requester"]["reference"] == "Practitioner/dr.who"  # valid FHIR id: as is
    assert stored["partOf"][0]["reference"] == f"Task/{server_task_id(tid(parent))}"
    assert ("patientId", "pt_9") in asked
    assert ("partOf", tid(parent)) in asked
    assert from_fhir(stored).patient_id == "pt_9"  # the identifier keeps ours


def test_a_reference_map_answer_that_is_no_fhir_id_is_refused(
    tmp_path: Path, hapi: HapiLikeFhirServer
) -> None:
    remote = FhirR4Remote(hapi.url, token, reference_map=lambda field, our: "bad_id")
    with TaskStore.open(tmp_path / "t.db", sync=fast(remote)) as store:
        store.tasks.create({"status": "requested", "intent": "order", "encounterId": "e1"})
        flush_all(store)
        [dead] = store.sync.dead_letters()
    assert dead.error == (
        "encounterId: reference_map gave 'bad_id' for 'e1', which is not a FHIR id "
        "(got 'bad_id'); allowed: [A-Za-z0-9.-]{1,64}"
    )
    assert hapi.tasks() == {}


# --- the HAPI-like server: 409 conflicts --------------------------------------------------


def test_hapi_409_on_a_stale_version_is_a_conflict_not_a_dead_letter(
    tmp_path: Path, hapi: HapiLikeFhirServer
) -> None:
    remote = FhirR4Remote(hapi.url, token)
    with TaskStore.open(tmp_path / "t.db", sync=fast(remote)) as store:
        task = store.tasks.create({"status": "requested", "intent": "order", "note": "a"}).data
        flush_all(store)
        server_id = server_task_id(tid(task))
        assert hapi.tasks()[server_id]["meta"]["versionId"] == "1"
        edited = dict(hapi.tasks()[server_id], note=[{"text": "edited on the server"}])
        hapi.put_task(edited)  # version 2, by another client
        store.tasks.update(tid(task), {"note": "edited locally"})
        flush_all(store)
        assert store.sync.dead_letters() == []
        [conflict] = store.sync.conflicts()
        assert conflict.server is not None
        assert conflict.server["versionId"] == "2"
        assert conflict.server["note"] == "edited on the server"
        assert conflict.local is not None
        assert conflict.local["note"] == "edited locally"
        store.sync.resolve(tid(task), "local")
        flush_all(store)
        assert store.sync.conflicts() == []
    assert hapi.tasks()[server_id]["note"] == [{"text": "edited locally"}]
    assert hapi.tasks()[server_id]["meta"]["versionId"] == "3"


def test_hapi_lost_answers_are_recognised_by_the_change_id(
    tmp_path: Path, hapi: HapiLikeFhirServer
) -> None:
    """Every write's answer lost once, push only: the retried PUT gets 409, the server's
    task carries our change id, so it is delivered, not a conflict; the delete's retry
    finds it gone."""
    script = [Fault.DROP_AFTER, None, Fault.DROP_AFTER, None, Fault.DROP_AFTER]
    with FaultProxy(hapi.url, script=script, methods=["PUT", "DELETE"]) as proxy:
        remote = FhirR4Remote(proxy.base_url, token)
        config = fast(remote, lanes=1, pull=False)
        with TaskStore.open(tmp_path / "t.db", sync=config) as store:
            task = store.tasks.create({"status": "requested", "intent": "order"}).data
            flush_all(store)
            store.tasks.update(tid(task), {"note": "second"})
            flush_all(store)
            assert store.sync.conflicts() == []
            assert store.sync.dead_letters() == []
            server_id = server_task_id(tid(task))
            versions = hapi.history(server_id)
            # create applied twice (PUT by id: the same resource again), update once
            assert [v["meta"]["versionId"] for v in versions if v] == ["1", "2", "3"]
            assert versions[-1] is not None
            assert versions[-1]["note"] == [{"text": "second"}]
            store.tasks.delete(tid(task))
            flush_all(store)
            assert store.sync.conflicts() == []
            assert store.sync.dead_letters() == []
        statuses = [(e.method, e.status) for e in proxy.log]
    assert ("PUT", 409) in statuses
    assert hapi.tasks() == {}
    assert (
        httpx.get(
            f"{hapi.url}/Task/{server_id}", headers={"Authorization": f"Bearer {TOKEN}"}
        ).status_code
        == 410
    )


def test_a_server_refusing_client_ids_gets_each_task_once_by_conditional_create(
    tmp_path: Path,
) -> None:
    """HAPI with client-assigned ids disabled: update-as-create is refused (a dead letter
    carrying HAPI-0959, nothing created); ``create="conditional"`` creates with
    ``If-None-Exist`` and, with the answers of the POST lost twice and of the update and
    the delete once each, every write still happens exactly once."""
    with HapiLikeFhirServer(token=TOKEN, client_ids=False) as server:
        by_put = FhirR4Remote(server.url, token)
        with TaskStore.open(tmp_path / "put.db", sync=fast(by_put)) as store:
            store.tasks.create({"status": "requested", "intent": "order"})
            flush_all(store)
            [dead] = store.sync.dead_letters()
            assert dead.status == 404
            assert dead.error is not None
            assert "HAPI-0959" in dead.error
            assert "client-assigned IDs are not enabled" in dead.error
        assert server.tasks() == {}
        drop = Fault.DROP_AFTER
        script = [drop, drop, None, None, drop, None, drop]  # POST POST (again x2) PUT PUT DEL
        with FaultProxy(server.url, script=script, methods=["POST", "PUT", "DELETE"]) as proxy:
            remote = FhirR4Remote(proxy.base_url, token, create="conditional")
            # push only: the retries themselves must recognise the lost writes (a pull
            # would settle them by the change id before any retry)
            config = fast(remote, lanes=1, pull=False)
            with TaskStore.open(tmp_path / "t.db", sync=config) as store:
                task = store.tasks.create({"status": "requested", "intent": "order"}).data
                other = store.tasks.create({"status": "draft", "intent": "plan"}).data
                flush_all(store)
                store.tasks.update(tid(task), {"note": "after the create"})
                flush_all(store)
                store.tasks.delete(tid(other))
                flush_all(store)
                assert store.sync.conflicts() == []
                assert store.sync.dead_letters() == []
                assert store.tasks.get(tid(task)).meta["syncState"] == "synced"
        [(server_id, stored)] = server.tasks().items()
        assert server_id.isdigit()  # the server's own id
        assert from_fhir(stored).id == tid(task)
        assert stored["note"] == [{"text": "after the create"}]
        assert [v["meta"]["versionId"] for v in server.history(server_id) if v] == ["1", "2"]
        assert [len(server.history(i)) for i in ("1", "2", "3")] == [2, 2, 0]  # 2 creates
    sent = [(e.method, e.fault, e.status) for e in proxy.log if e.method != "GET"]
    assert sent == [
        ("POST", drop, None),
        ("POST", drop, None),
        ("POST", None, 200),  # If-None-Exist found the first: our change id, delivered
        ("POST", None, 200),
        ("PUT", drop, None),
        ("PUT", None, 409),  # our own write moved the version on: recognised, delivered
        ("DELETE", drop, None),
        ("DELETE", None, 200),
    ]


# --- the Medplum peer --------------------------------------------------------------------


def edit_on_server(client: httpx.Client, our_id: str, **changes: Any) -> None:
    """Another client's read-modify-write of one of our Tasks (``If-Match``; again on 412)."""
    url = f"/Task/{server_task_id(our_id)}"
    for _ in range(20):
        current = client.get(url).json()
        etag = f'W/"{current["meta"]["versionId"]}"'
        answer = client.put(url, json={**current, **changes}, headers={"If-Match": etag})
        if answer.status_code == 200:
            return
        assert answer.status_code == 412, answer.text  # our engine wrote in between
    raise AssertionError(f"could not edit {our_id} on the server")


def test_300_tasks_through_20_percent_faults_reach_medplum_exactly_once(
    tmp_path: Path, own_peer: MedplumPeer
) -> None:
    """300 tasks created, updated and deleted locally, a few edited and one deleted
    directly on the server, all through >= 20% faults: after healing the server holds
    exactly the local tasks (each once, found by identifier) and the store holds the
    server's edits, merged field by field with the local edits pending at the time."""
    rates = {
        Fault.DROP_BEFORE: 0.06,
        Fault.DROP_AFTER: 0.08,
        Fault.ERROR_5XX: 0.06,
        Fault.TOO_MANY_REQUESTS: 0.02,
        Fault.SLOW: 0.03,
    }
    own_peer.reset()
    with (
        FaultProxy(own_peer.base_url, rates=rates, seed=13, slow_seconds=0.05) as proxy,
        httpx.Client(base_url=own_peer.base_url, headers=own_peer.headers()) as peer,
    ):
        # reconcile_every: Medplum has no type-level _history, its deletes come by relisting
        remote = FhirR4Remote(
            proxy.base_url, token, reference_map=dashed, lanes=2, reconcile_every=1.0
        )
        with TaskStore.open(tmp_path / "t.db", sync=fast(remote, lanes=2)) as store:
            created = store.tasks.create_many(list(generate_requests(300, seed=5))).data
            flush_all(store)
            for n, task in enumerate(created[:200]):
                store.tasks.update(tid(task), {"note": f"first update {n}"})
            # while those notes are pending: other clients edit other fields on the server
            merged = [tid(t) for t in created[:3]]
            for our_id in merged:
                edit_on_server(peer, our_id, description=f"server edit of {our_id}")
            pulled = [tid(t) for t in created[290:293]]
            for our_id in pulled:  # no local edit: a plain pull
                edit_on_server(peer, our_id, priority="stat", description="server only")
            server_deleted = tid(created[299])
            assert peer.delete(f"/Task/{server_task_id(server_deleted)}").status_code == 200
            flush_all(store)
            for n, task in enumerate(created[100:250]):
                store.tasks.update(tid(task), {"description": f"second update {n}"})
            for task in created[200:260]:
                store.tasks.delete(tid(task))
            flush_all(store)
            proxy.heal()
            time.sleep(1.1)  # past reconcile_every: the last pull lists the scope again
            flush_all(store)
            assert store.sync.dead_letters() == []
            assert store.sync.conflicts() == []
            local = {tid(t): encode_task(t) for t in store.tasks.search(limit=1000).data}
            synced = {store.tasks.get(i).meta["syncState"] for i in local}
            origins = {i: {h.origin for h in store.tasks.history(i).data} for i in merged}
        faults = proxy.faults_injected
        requests = len(proxy.log)
        lost_updates_recognised = sum(1 for e in proxy.log if e.method == "PUT" and e.status == 412)
    assert faults >= 0.2 * requests, (faults, requests)
    assert proxy.counts[Fault.DROP_AFTER] > 0
    assert proxy.counts[Fault.DROP_BEFORE] > 0
    # the server's edit met the pending local one: rebased (a merge), not a conflict
    assert all("merge" in o for o in origins.values()), origins
    assert proxy.counts[Fault.ERROR_5XX] > 0
    assert proxy.counts[Fault.SLOW] > 0
    assert lost_updates_recognised > 0
    assert synced == {"synced"}
    assert len(local) == 239  # 300 - 60 deleted here - 1 deleted on the server
    assert server_deleted not in local
    for n, our_id in enumerate(merged):  # both edits, field by field
        assert local[our_id]["description"] == f"server edit of {our_id}"
        assert local[our_id]["note"] == f"first update {n}"
    for our_id in pulled:
        assert (local[our_id]["priority"], local[our_id]["description"]) == ("stat", "server only")
    with httpx.Client(base_url=own_peer.base_url, headers=own_peer.headers()) as client:
        server = all_server_tasks(client)
        assert set(server) == set(local)
        for our_id, resource in server.items():
            assert resource["id"] == server_task_id(our_id)
            assert content(encode_task(from_fhir(resource))) == content(local[our_id])
            found = client.get("/Task", params={"identifier": f"{ID_SYSTEM}|{our_id}"}).json()
            assert [e["resource"]["id"] for e in found["entry"]] == [resource["id"]]  # once
        for task in [*created[200:260], created[299]]:
            assert client.get(f"/Task/{server_task_id(tid(task))}").status_code == 404
            found = client.get("/Task", params={"identifier": f"{ID_SYSTEM}|{tid(task)}"}).json()
            assert found.get("entry", []) == []


def test_the_seed_lab_order_reads_back_from_medplum_with_a_strict_fhir_client(
    tmp_path: Path, medplum_peer: MedplumPeer
) -> None:
    remote = FhirR4Remote(medplum_peer.base_url, token, reference_map=dashed)
    with TaskStore.open(tmp_path / "t.db", sync=fast(remote)) as store:
        task = store.tasks.create(SEED_LAB_ORDER).data
        flush_all(store)
        local = store.tasks.get(tid(task)).data
    read = httpx.get(f"{medplum_peer.base_url}/Task/{server_task_id(tid(task))}")
    assert read.status_code == 200, read.text
    parsed = FhirclientTask(read.json(), strict=True)
    assert parsed.id == server_task_id(tid(task))
    assert [(i.system, i.value) for i in parsed.identifier] == [(ID_SYSTEM, tid(task))]
    assert (parsed.status, parsed.intent, parsed.priority) == ("requested", "order", "urgent")
    assert parsed.code.text == "lab-order"
    assert parsed.description == "Order CBC and CMP for pre-operative assessment"
    assert [n.text for n in parsed.note] == [
        "Patient is NPO after midnight. Draw labs before 10am."
    ]
    assert (parsed.for_fhir.identifier.system, parsed.for_fhir.identifier.value) == (
        ID_SYSTEM,
        "pt_abc123",
    )
    assert parsed.owner.identifier.value == "prac_lab_tech"
    assert parsed.requester.identifier.value == "prac_def456"
    assert parsed.for_fhir.reference == "Patient/pt-abc123"
    assert parsed.owner.reference == "Practitioner/prac-lab-tech"
    assert parsed.requester.reference == "Practitioner/prac-def456"
    assert parsed.encounter.reference == "Encounter/enc-xyz789"
    assert [(i.type.text, i.valueString) for i in parsed.input] == [
        ("lab-panel", "CBC"),
        ("lab-panel", "CMP"),
    ]
    assert parsed.executionPeriod.start.isostring.startswith("2025-02-01T08:00:00")
    assert parsed.executionPeriod.end.isostring.startswith("2025-02-01T17:00:00")
    assert [e.url for e in parsed.extension] == [CHANGE_ID_URL, CONTENT_HASH_URL]
    back = from_fhir(read.json())  # ours again, through the identifiers
    assert content(encode_task(back)) == content(encode_task(local))
    assert (back.patient_id, back.owner_id, back.requester_id) == (
        "pt_abc123",
        "prac_lab_tech",
        "prac_def456",
    )


def test_medplum_412_with_another_clients_edit_is_a_conflict(
    tmp_path: Path, medplum_peer: MedplumPeer
) -> None:
    remote = FhirR4Remote(medplum_peer.base_url, token)
    with TaskStore.open(tmp_path / "t.db", sync=fast(remote)) as store:
        task = store.tasks.create({"status": "requested", "intent": "order", "note": "a"}).data
        flush_all(store)
        url = f"{medplum_peer.base_url}/Task/{server_task_id(tid(task))}"
        theirs = dict(httpx.get(url).json(), note=[{"text": "theirs"}])
        assert httpx.put(url, json=theirs).status_code == 200  # keeps our extension, even
        store.tasks.update(tid(task), {"note": "ours"})
        flush_all(store)
        [conflict] = store.sync.conflicts()
        assert conflict.server is not None
        assert conflict.server["note"] == "theirs"
        assert store.sync.dead_letters() == []
        store.sync.resolve(tid(task), "remote")
        assert store.tasks.get(tid(task)).data.note == "theirs"


def test_medplum_delete_of_a_task_the_server_deleted_is_delivered(
    tmp_path: Path, medplum_peer: MedplumPeer
) -> None:
    remote = FhirR4Remote(medplum_peer.base_url, token)
    with TaskStore.open(tmp_path / "t.db", sync=fast(remote)) as store:
        task = store.tasks.create({"status": "requested", "intent": "order"}).data
        flush_all(store)
        url = f"{medplum_peer.base_url}/Task/{server_task_id(tid(task))}"
        assert httpx.delete(url).status_code == 200
        store.tasks.delete(tid(task))
        flush_all(store)
        assert store.sync.dead_letters() == []
        assert store.sync.conflicts() == []
        assert store.sync.status().pending == 0


@pytest.mark.parametrize("first", ["pull", "push"])
def test_a_server_side_reassignment_merges_with_a_pending_local_edit_field_by_field(
    tmp_path: Path, medplum_peer: MedplumPeer, first: str
) -> None:
    """Another FHIR client re-points ``owner.reference`` (keeping the identifier we wrote
    beside it, as a read-modify-write client does) while a local note edit is pending:
    the newer reference wins on pull, the note survives, nothing is a conflict. Pulled
    first, the rebase happens on the pull; pushed first, on the 412."""
    remote = FhirR4Remote(medplum_peer.base_url, token, reference_map=dashed)
    with TaskStore.open(tmp_path / "t.db", sync=fast(remote)) as store:
        task = store.tasks.create(
            {"status": "requested", "intent": "order", "ownerId": "prac_1", "note": "a"}
        ).data
        flush_all(store)
        store.tasks.update(tid(task), {"note": "local note"})
        url = f"{medplum_peer.base_url}/Task/{server_task_id(tid(task))}"
        theirs = httpx.get(url).json()
        assert theirs["owner"]["identifier"]["value"] == "prac_1"
        theirs["owner"]["reference"] = "Practitioner/prac-2"  # only the literal reference
        etag = f'W/"{theirs["meta"]["versionId"]}"'
        assert httpx.put(url, json=theirs, headers={"If-Match": etag}).status_code == 200
        assert written_by(httpx.get(url).json()) is None  # not our write, though it kept ours
        if first == "pull":
            store.sync.pull()
            rebased = store.tasks.get(tid(task)).data
            assert (rebased.owner_id, rebased.note) == ("prac-2", "local note")
        flush_all(store)
        assert store.sync.conflicts() == []
        assert store.sync.dead_letters() == []
        local = store.tasks.get(tid(task))
        assert (local.data.owner_id, local.data.note) == ("prac-2", "local note")
        assert local.meta["syncState"] == "synced"
        assert "merge" in {h.origin for h in store.tasks.history(tid(task)).data}
    on_server = httpx.get(url).json()
    assert on_server["owner"]["reference"] == "Practitioner/prac-2"
    assert on_server["note"] == [{"text": "local note"}]
    assert content(encode_task(from_fhir(on_server))) == content(encode_task(local.data))


# --- the command line ----------------------------------------------------------------------


def test_cli_sync_run_with_remote_fhir_r4_delivers_to_the_fhir_server(
    tmp_path: Path, hapi: HapiLikeFhirServer
) -> None:
    db = tmp_path / "clinic.db"
    with TaskStore.open(db) as store:
        task = store.tasks.create({"status": "requested", "intent": "order", "code": "x"}).data
    env = {**os.environ, "CLINIK_TOKEN": TOKEN, "PYTHONWARNINGS": "error"}
    argv = [sys.executable, "-m", "clinik_local.cli", "sync", "run", "--db", str(db)]
    result = subprocess.run(
        [*argv, "--remote", "fhir-r4", "--url", hapi.url],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert from_fhir(hapi.tasks()[server_task_id(tid(task))]).code == "x"
    status = subprocess.run(
        [
            sys.executable,
            "-m",
            "clinik_local.cli",
            "sync",
            "status",
            "--db",
            str(db),
            "--remote",
            "fhir-r4",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["pending"] == 0


def clinik_local_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``clinik-local ARGS`` in a child process, with the peers' token in CLINIK_TOKEN."""
    env = {**os.environ, "CLINIK_TOKEN": TOKEN, "PYTHONWARNINGS": "error"}
    return subprocess.run(
        [sys.executable, "-m", "clinik_local.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )


def test_cli_sync_run_fhir_r4_against_medplum_pushes_the_seed_order_and_pulls_edits(
    tmp_path: Path, own_peer: MedplumPeer
) -> None:
    """End to end on the command line: without a reference map the seed's ``pt_abc123``
    is refused naming the field (exit 7, nothing sent); ``sync retry --all`` and a run
    with ``--reference-map`` deliver it; a server-side edit comes back on the next run."""
    own_peer.reset()
    db = tmp_path / "clinic.db"
    with TaskStore.open(db) as store:
        order = store.tasks.create(SEED_LAB_ORDER).data
    run = ["sync", "run", "--db", str(db), "--remote", "fhir-r4", "--url", own_peer.base_url]
    refused = clinik_local_cli(*run)
    assert refused.returncode == 7, refused.stderr
    dead = json.loads(clinik_local_cli("sync", "dead-letters", "--db", str(db)).stdout)
    assert [d["error"].split(":")[0] for d in dead] == ["patientId"]
    with httpx.Client(base_url=own_peer.base_url, headers=own_peer.headers()) as peer:
        assert peer.get("/Task").json().get("entry", []) == []  # nothing was sent
        ids = {i: i.replace("_", "-") for i in ("pt_abc123", "enc_xyz789", "prac_def456")}
        mapping = tmp_path / "ids.json"
        mapping.write_text(json.dumps({**ids, "prac_lab_tech": "lab-tech-7"}), encoding="utf-8")
        assert clinik_local_cli("sync", "retry", "--all", "--db", str(db)).returncode == 0
        delivered = clinik_local_cli(*run, "--reference-map", str(mapping))
        assert delivered.returncode == 0, delivered.stderr
        url = f"/Task/{server_task_id(tid(order))}"
        on_server = peer.get(url).json()
        assert on_server["for"]["reference"] == "Patient/pt-abc123"
        assert on_server["owner"]["reference"] == "Practitioner/lab-tech-7"
        etag = f'W/"{on_server["meta"]["versionId"]}"'
        edited = dict(on_server, businessStatus={"text": "Specimen collected"})
        assert peer.put(url, json=edited, headers={"If-Match": etag}).status_code == 200
    again = clinik_local_cli(*run, "--reference-map", str(mapping))
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["status"]["pending"] == 0
    with TaskStore.open(db) as store:
        pulled = store.tasks.get(tid(order)).data
    assert pulled.business_status == "Specimen collected"
    assert (pulled.patient_id, pulled.owner_id) == ("pt_abc123", "prac_lab_tech")
    wrong = clinik_local_cli(*run[:-4], "--url", "http://127.0.0.1:1/x", "--reference-map", "m")
    assert wrong.returncode == 2, wrong.stderr  # bad input: usage
    assert "--reference-map" in wrong.stderr
    assert "--remote fhir-r4" in wrong.stderr


def test_conditional_create_on_medplum_takes_the_servers_id_and_updates_it(
    tmp_path: Path, medplum_peer: MedplumPeer
) -> None:
    script = [Fault.DROP_AFTER]  # the first POST's answer is lost: If-None-Exist finds it
    with FaultProxy(medplum_peer.base_url, script=script, methods=["POST"]) as proxy:
        remote = FhirR4Remote(proxy.base_url, token, create="conditional")
        with TaskStore.open(tmp_path / "t.db", sync=fast(remote, lanes=1)) as store:
            task = store.tasks.create({"status": "requested", "intent": "order"}).data
            flush_all(store)
            store.tasks.update(tid(task), {"note": "updated"})
            flush_all(store)
            assert store.sync.conflicts() == []
            assert store.sync.dead_letters() == []
    found = httpx.get(
        f"{medplum_peer.base_url}/Task", params={"identifier": f"{ID_SYSTEM}|{tid(task)}"}
    ).json()
    [entry] = found["entry"]
    assert entry["resource"]["id"] != server_task_id(tid(task))  # a server-assigned UUID
    assert entry["resource"]["note"] == [{"text": "updated"}]


def test_a_refused_token_pauses_sync_as_auth_required(
    tmp_path: Path, own_peer: MedplumPeer
) -> None:
    remote = FhirR4Remote(own_peer.base_url, lambda: "not-the-token")
    with TaskStore.open(tmp_path / "t.db", sync=fast(remote)) as store:
        store.tasks.create({"status": "requested", "intent": "order"})
        status = store.sync.run_once()
        assert status.state == "auth_required"
        assert status.pending == 1
        assert store.sync.dead_letters() == []


# --- a model of operation sequences against the HAPI-like server, through faults --------

NOTES = st.text(alphabet="abcxyz ", min_size=1, max_size=8)


class FhirSyncMachine(RuleBasedStateMachine):
    """Creates, updates, deletes and flushes under lost answers and 5xx, and other clients
    editing descriptions and deleting Tasks on the server: after every flush the server's
    Tasks are exactly the model's (each once), so are the local tasks (the server's edits
    pulled, merged with pending local notes), and nothing is parked."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="clinik-fhir-"))
        self.server = HapiLikeFhirServer(token=TOKEN).start()
        rates = {Fault.DROP_AFTER: 0.15, Fault.DROP_BEFORE: 0.1, Fault.ERROR_5XX: 0.1}
        self.proxy = FaultProxy(self.server.url, rates=rates, seed=5).start()
        remote = FhirR4Remote(self.proxy.base_url, token, timeout=2.0)
        self.store = TaskStore.open(self.dir / "m.db", sync=fast(remote))
        self.model: dict[str, dict[str, Any]] = {}
        self.dirty: set[str] = set()  # edited here since the last flush
        self.server_edited: set[str] = set()  # edited on the server since the last flush

    @initialize(notes=st.lists(NOTES, min_size=1, max_size=3))
    def synced_tasks(self, notes: list[str]) -> None:
        """A few tasks on the server from the start: the server-side rules have work."""
        for note in notes:
            self.create(note)
        self.flush()

    @rule(note=NOTES)
    def create(self, note: str) -> None:
        task = self.store.tasks.create({"status": "requested", "intent": "order", "note": note})
        self.model[tid(task.data)] = content(encode_task(task.data))
        self.dirty.add(tid(task.data))

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data(), note=NOTES)
    def update(self, data: st.DataObject, note: str) -> None:
        task_id = data.draw(st.sampled_from(sorted(self.model)))
        self.store.tasks.update(task_id, {"note": note})
        self.model[task_id] = {**self.model[task_id], "note": note}
        self.dirty.add(task_id)

    def _local_deletable(self) -> list[str]:
        """A local delete of a task edited on the server since is a conflict (by design)."""
        return sorted(set(self.model) - self.server_edited)

    @precondition(lambda self: bool(self._local_deletable()))
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        task_id = data.draw(st.sampled_from(self._local_deletable()))
        self.store.tasks.delete(task_id)
        del self.model[task_id]

    def _on_server(self) -> list[str]:
        """Our tasks the server holds now (an edit there needs one)."""
        if not self.model:
            return []
        live = {tid(from_fhir(r)) for r in self.server.tasks().values()}
        return sorted(live & set(self.model))

    @precondition(lambda self: bool(self._on_server()))
    @rule(data=st.data(), text=NOTES)
    def edit_on_server(self, data: st.DataObject, text: str) -> None:
        """Another client sets the description (a field no local edit here touches)."""
        task_id = data.draw(st.sampled_from(self._on_server()))
        current = self.server.tasks()[server_task_id(task_id)]
        self.server.put_task(dict(current, description=f"server {text}"))
        self.server_edited.add(task_id)
        self.model[task_id] = {**self.model[task_id], "description": f"server {text}"}

    def _deletable(self) -> list[str]:
        return [i for i in self._on_server() if i not in self.dirty]

    @precondition(lambda self: bool(self._deletable()))
    @rule(data=st.data())
    def delete_on_server(self, data: st.DataObject) -> None:
        """Another client deletes a Task no local edit is pending on (else: a conflict)."""
        task_id = data.draw(st.sampled_from(self._deletable()))
        self.server.delete_task(server_task_id(task_id))
        del self.model[task_id]

    @rule()
    def flush(self) -> None:
        self.check_after_flush()

    def check_after_flush(self) -> None:
        flush_all(self.store, deadline=60)
        self.dirty.clear()
        self.server_edited.clear()
        assert self.store.sync.dead_letters() == []
        assert self.store.sync.conflicts() == []
        on_server = {}
        for server_id, resource in self.server.tasks().items():
            task = from_fhir(resource)
            assert server_id == server_task_id(tid(task))
            on_server[tid(task)] = content(encode_task(task))
        assert on_server == self.model
        local = {tid(t): content(encode_task(t)) for t in self.store.tasks.search(limit=500).data}
        assert local == self.model

    def teardown(self) -> None:
        try:
            self.check_after_flush()  # every run ends synced, whatever its last step was
        finally:
            self.store.close()
            self.proxy.stop()
            self.server.stop()
            shutil.rmtree(self.dir, ignore_errors=True)


FhirSyncMachine.TestCase.settings = settings(max_examples=12, stateful_step_count=15, deadline=None)
test_fhir_sync_machine = FhirSyncMachine.TestCase


def test_every_lane_of_the_engine_has_a_connection(hapi: HapiLikeFhirServer) -> None:
    remote = FhirR4Remote(hapi.url, token, lanes=1)
    for lane in range(4):  # SyncConfig(lanes=4) with a one-connection remote still sends
        answer = remote.push(
            Change(
                change_id=f"chg_{lane}",
                task_id=f"task_{lane}",
                op="create",
                body={"status": "draft", "intent": "plan", "authoredOn": "2025-01-01T00:00:00Z"},
                server_version=None,
            ),
            lane=lane,
        )
        assert isinstance(answer, Delivered), answer
    remote.close()
    assert sorted(hapi.tasks()) == ["task-0", "task-1", "task-2", "task-3"]


def test_the_hapi_like_server_answers_as_hapi_does(hapi: HapiLikeFhirServer) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=hapi.url, headers=auth) as client:
        body = {"resourceType": "Task", "id": "t1", "status": "draft", "intent": "plan"}
        created = client.put("/Task/t1", json=body)
        assert created.status_code == 201
        assert created.headers["ETag"] == 'W/"1"'
        assert created.headers["Location"].endswith("/Task/t1/_history/1")
        assert client.put("/Task/t1", json=body, headers={"If-Match": 'W/"1"'}).status_code == 200
        stale = client.put("/Task/t1", json=body, headers={"If-Match": 'W/"1"'})
        assert stale.status_code == 409
        assert stale.json()["issue"][0]["diagnostics"].startswith("HAPI-0989: ")
        assert client.put("/Task/t2", json=body).status_code == 400  # id differs from the URL
        first = client.post("/Task", json=dict(body, identifier=[{"system": "s", "value": "v"}]))
        assert first.status_code == 201
        again = client.post("/Task", json=body, headers={"If-None-Exist": "identifier=s|v"})
        assert again.status_code == 200
        assert again.json()["id"] == first.json()["id"]
        since = client.get("/Task/t1").json()["meta"]["lastUpdated"]
        assert client.delete("/Task/t1", headers={"If-Match": 'W/"2"'}).status_code == 200
        assert client.get("/Task/t1").status_code == 410
        assert client.delete("/Task/t1").status_code == 200  # nothing left: still 200
        history = client.get("/Task/_history", params={"_since": since}).json()
        assert [e["request"]["method"] for e in history["entry"]] == ["DELETE", "POST", "PUT"]
        newer = client.get(
            "/Task", params={"_lastUpdated": f"gt{since}", "_sort": "_lastUpdated"}
        ).json()
        assert [e["resource"]["id"] for e in newer["entry"]] == [first.json()["id"]]
        assert client.get("/Task", headers={"Authorization": "Bearer x"}).status_code == 401


def test_a_version_is_ours_only_while_its_content_is_what_our_change_wrote() -> None:
    remote = FhirR4Remote("http://127.0.0.1:1/fhir/R4", token)
    resource = remote.fhir_resource(a_change(op="create", version=None))
    resource["meta"] = {"versionId": "7", "lastUpdated": "2025-01-02T00:00:00.000Z"}
    assert written_by(resource) == "chg_1"  # server fields do not count
    edited = dict(resource, note=[{"text": "another client, keeping our extensions"}])
    assert written_by(edited) is None
    change = a_change(op="create", version=None)
    owned = remote.fhir_resource(
        Change(
            change_id=change.change_id,
            task_id=change.task_id,
            op="create",
            body={**(change.body or {}), "ownerId": "dr.who"},
            server_version=None,
        )
    )
    assert written_by(owned) == "chg_1"
    owned["owner"] = {**owned["owner"], "reference": "Practitioner/someone-else"}
    assert written_by(owned) is None  # the same wire task (identifier), another reference
    assert written_by({k: v for k, v in resource.items() if k != "extension"}) is None


# --- pull: server-side changes into the store ---------------------------------------------


def test_server_side_edits_creates_and_deletes_on_medplum_are_pulled_through_faults(
    tmp_path: Path, own_peer: MedplumPeer
) -> None:
    """Medplum has no type-level _history: its deletes come in by the periodic
    reconciliation (the cursor expires, the scope is listed again)."""
    own_peer.reset()
    rates = {Fault.DROP_BEFORE: 0.1, Fault.DROP_AFTER: 0.1, Fault.ERROR_5XX: 0.1}
    with FaultProxy(own_peer.base_url, rates=rates, seed=21) as proxy:
        remote = FhirR4Remote(proxy.base_url, token, reference_map=dashed, reconcile_every=1.0)
        with TaskStore.open(tmp_path / "t.db", sync=fast(remote)) as store:
            created = store.tasks.create_many(list(generate_requests(30, seed=9))).data
            flush_all(store)
            with httpx.Client(base_url=own_peer.base_url, headers=own_peer.headers()) as peer:
                for task in created[:5]:  # a plain client: read, edit, PUT (keeps extensions)
                    url = f"/Task/{server_task_id(tid(task))}"
                    current = peer.get(url).json()
                    current["description"] = "edited on the server"
                    etag = f'W/"{current["meta"]["versionId"]}"'
                    assert (
                        peer.put(url, json=current, headers={"If-Match": etag}).status_code == 200
                    )
                for task in created[5:7]:
                    assert peer.delete(f"/Task/{server_task_id(tid(task))}").status_code == 200
                foreign = {"resourceType": "Task", "status": "requested", "intent": "order"}
                made = peer.post("/Task", json=dict(foreign, description="made on the server"))
                assert made.status_code == 201
            time.sleep(1.1)  # past reconcile_every: the next pull lists the scope again
            flush_all(store)
            proxy.heal()
            flush_all(store)
            assert store.sync.conflicts() == []
            assert store.sync.dead_letters() == []
            local = {tid(t): encode_task(t) for t in store.tasks.search(limit=1000).data}
        assert proxy.faults_injected > 0
    for task in created[:5]:
        assert local[tid(task)]["description"] == "edited on the server"
    for task in created[5:7]:
        assert tid(task) not in local
    pulled = task_id_from_server(made.json()["id"])
    assert pulled is not None
    assert local[pulled]["description"] == "made on the server"
    with httpx.Client(base_url=own_peer.base_url, headers=own_peer.headers()) as client:
        server = {
            tid(from_fhir(r))
            if any(i["system"] == ID_SYSTEM for i in r.get("identifier", []))
            else str(task_id_from_server(r["id"])): r
            for r in (e["resource"] for e in client.get("/Task?_count=1000").json()["entry"])
        }
    assert set(server) == set(local)
    for our_id, resource in server.items():
        resource.setdefault("authoredOn", resource["meta"]["lastUpdated"])  # as documented
        wire = encode_task(from_fhir(resource))
        wire["id"] = our_id
        assert content(wire) == content(local[our_id])


def test_hapi_deletes_come_through_the_type_level_history_without_relisting(
    tmp_path: Path, hapi: HapiLikeFhirServer
) -> None:
    remote = FhirR4Remote(hapi.url, token, reconcile_every=3600)
    with TaskStore.open(tmp_path / "t.db", sync=fast(remote)) as store:
        keep = store.tasks.create({"status": "requested", "intent": "order"}).data
        gone = store.tasks.create({"status": "requested", "intent": "order"}).data
        flush_all(store)
        hapi.delete_task(server_task_id(tid(gone)))
        edited = dict(hapi.tasks()[server_task_id(tid(keep))], priority="urgent")
        hapi.put_task(edited)
        store.sync.pull()
        assert store.tasks.get(tid(keep)).data.priority == "urgent"
        assert [t.id for t in store.tasks.search(limit=10).data] == [tid(keep)]
        assert store.tasks.get(tid(keep)).data.version_id == "2"  # HAPI's integer version


def test_the_fhir_watermark_is_committed_with_the_pulled_page_and_survives_a_reopen(
    tmp_path: Path, hapi: HapiLikeFhirServer
) -> None:
    """After a pull, the store holds the cursor (watermark and overlap window) in its
    file: reopened, it polls ``_lastUpdated`` from there and does not list the scope
    again; the overlap re-reads the last versions and drops them (nothing re-applied)."""
    writer = FhirR4Remote(hapi.url, token)
    with TaskStore.open(tmp_path / "w.db", sync=fast(writer)) as source:
        made = source.tasks.create_many(
            [{"status": "requested", "intent": "order", "note": f"n{n}"} for n in range(5)]
        ).data
        flush_all(source)
    with FaultProxy(hapi.url) as proxy:  # no faults: a log of the requests
        reader = FhirR4Remote(proxy.base_url, token, reconcile_every=3600)
        with TaskStore.open(tmp_path / "r.db", sync=fast(reader)) as replica:
            replica.sync.pull()
            assert len(replica.tasks.search(limit=10).data) == 5
        first = len(proxy.log)
        edited = dict(hapi.tasks()[server_task_id(tid(made[2]))], priority="stat")
        hapi.put_task(edited)
        reader = FhirR4Remote(proxy.base_url, token, reconcile_every=3600)
        with TaskStore.open(tmp_path / "r.db", sync=fast(reader)) as replica:
            events: list[Any] = []
            replica.tasks.watch(events.append)
            replica.sync.pull()
            assert replica.tasks.get(tid(made[2])).data.priority == "stat"
            for _ in range(50):  # watch callbacks run after the commit, on their own thread
                if events:
                    break
                time.sleep(0.02)
        later = [e.path for e in proxy.log[first:] if e.path.startswith("/fhir/R4/Task?")]
    assert later, proxy.log[first:]
    assert all("_lastUpdated=ge" in p and "_sort=_lastUpdated" in p for p in later), later
    assert not any("-_lastUpdated" in p for p in later)  # no new bootstrap
    changed = {i for event in events for i in event.task_ids}
    assert changed == {tid(made[2])}  # only the edit: the overlap's re-reads are dropped


def test_a_server_edit_superseding_our_delivered_version_before_any_poll_is_pulled(
    tmp_path: Path, hapi: HapiLikeFhirServer
) -> None:
    """Our update is delivered (its version learnt from the answer, not from the log);
    the polls fail; another client edits the Task; the next poll shows only that newer
    version (a search has no superseded versions). It is pulled now, not skipped as
    older until the next relisting of the scope (reconcile_every is an hour here)."""
    with FaultProxy(hapi.url, methods=["GET"]) as proxy:
        remote = FhirR4Remote(proxy.base_url, token, reconcile_every=3600)
        with TaskStore.open(tmp_path / "t.db", sync=fast(remote)) as store:
            task = store.tasks.create({"status": "requested", "intent": "order"}).data
            flush_all(store)
            proxy.set_rates({Fault.ERROR_5XX: 1.0})  # every poll fails from here
            store.tasks.update(tid(task), {"note": "ours"})
            store.sync.run_once()
            assert store.sync.status().pending == 0  # delivered; the pull failed
            server_id = server_task_id(tid(task))
            hapi.put_task(dict(hapi.tasks()[server_id], description="theirs"))
            proxy.heal()
            flush_all(store)
            pulled = store.tasks.get(tid(task)).data
            assert (pulled.note, pulled.description) == ("ours", "theirs")
            assert store.sync.conflicts() == []


def test_a_scope_pulls_only_its_tasks_as_fhir_search_parameters(
    tmp_path: Path, hapi: HapiLikeFhirServer
) -> None:
    writer = FhirR4Remote(hapi.url, token, reference_map=dashed)
    with TaskStore.open(tmp_path / "w.db", sync=fast(writer)) as source:
        for owner, code in (("prac_1", "lab"), ("prac_1", "x-ray"), ("prac_2", "lab")):
            source.tasks.create(
                {"status": "requested", "intent": "order", "ownerId": owner, "code": code}
            )
        flush_all(source)
    reader = FhirR4Remote(hapi.url, token, reference_map=dashed)
    scope = {"ownerId": ["prac_1"], "code": ["lab"]}
    with TaskStore.open(tmp_path / "r.db", sync=fast(reader, scope=scope)) as replica:
        replica.sync.pull()
        found = [(t.owner_id, t.code) for t in replica.tasks.search(limit=10).data]
    assert found == [("prac_1", "lab")]


def test_the_log_cursor_dedups_the_overlap_and_pages_through_ties(
    own_peer: MedplumPeer,
) -> None:
    own_peer.reset()
    remote = FhirR4Remote(own_peer.base_url, token)
    with httpx.Client(base_url=own_peer.base_url, headers=own_peer.headers()) as peer:
        first = remote.list_page({}, None, 10)
        assert isinstance(first, ListedPage)
        assert first.tasks == ()
        assert first.changes_cursor is not None
        for n in range(7):
            body = {"resourceType": "Task", "id": f"t{n}", "status": "draft", "intent": "plan"}
            assert peer.put(f"/Task/t{n}", json=body).status_code == 200
    seen: list[tuple[str, str | None]] = []
    cursor = first.changes_cursor
    for _ in range(10):
        page = remote.changes_page({}, cursor, 3)
        assert isinstance(page, ChangesPage)
        seen += [(i.task_id, i.version) for i in page.items]
        cursor = page.next_cursor
        if not page.has_more:
            break
    assert sorted(i for i, _ in seen) == [f"t{n}" for n in range(7)]  # each once
    again = remote.changes_page({}, cursor, 3)  # the overlap re-reads them: dropped
    assert isinstance(again, ChangesPage)
    assert again.items == ()
    assert again.next_cursor == cursor or not again.has_more
    listed: list[str] = []
    page_cursor: str | None = None
    while True:
        listing = remote.list_page({}, page_cursor, 2)
        assert isinstance(listing, ListedPage)
        listed += [str(t["id"]) for t in listing.tasks]
        page_cursor = listing.next_cursor
        if page_cursor is None:
            break
    assert sorted(listed) == [f"t{n}" for n in range(7)]
    assert remote.changes_page({}, "not-a-cursor", 3) == CursorExpired(
        message="not a cursor of the FHIR remote"
    )
    remote.close()


def test_a_restored_task_asks_the_server_for_its_version_and_never_overwrites_an_edit(
    hapi: HapiLikeFhirServer,
) -> None:
    remote = FhirR4Remote(hapi.url, token)
    body = {"status": "requested", "intent": "order", "authoredOn": "2025-01-01T00:00:00.000Z"}
    created = remote.push(
        Change(change_id="chg_a", task_id="task_r", op="create", body=body, server_version=None),
        lane=0,
    )
    assert isinstance(created, Delivered)
    assert created.task is not None
    base = content(created.task)

    def restored(change_id: str, believed: dict[str, Any]) -> Change:
        return Change(
            change_id=change_id,
            task_id="task_r",
            op="update",
            body=dict(body, note="after the restore"),
            server_version=None,
            known_on_server=True,
            base=believed,
        )

    assert isinstance(remote.push(restored("chg_b", dict(base, note="other")), lane=0), Conflict)
    updated = remote.push(restored("chg_c", base), lane=0)
    assert isinstance(updated, Delivered)
    assert updated.version == "2"  # PUT with If-Match: W/"1", not a second create
    remote.close()
    assert hapi.tasks()["task-r"]["note"] == [{"text": "after the restore"}]
