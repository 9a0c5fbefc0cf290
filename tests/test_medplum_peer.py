"""The Medplum FHIR R4 peer and the fault proxy: what a FHIR remote will meet, pinned.

Every test here is a real HTTP request to Medplum's own FHIR engine (``@medplum/fhir-router``
with its ``MemoryRepository``, run by tests/peers/medplum/server.mjs), directly or through
the fault proxy. They pin the behaviours clinik-local's FHIR remote builds on (update as
create, 412 on a stale If-Match, UUID versions, searches by ``_lastUpdated`` and by scope)
and the ones it must work around (no type-level ``_history``, DELETE ignores If-Match,
no paging links, 404 rather than 410 after a delete). tests/peers/README.md has the table.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from fhirclient.models.task import Task as FhirclientTask  # type: ignore[import-untyped]
from hypothesis import given, settings
from hypothesis import strategies as st

from clinik_local import ReferenceServer, TaskStore, to_fhir
from tests.peers import medplum as medplum_module
from tests.peers.fault_proxy import (
    CLINIK_ERROR_BODY,
    FORWARDED,
    REQUESTS,
    Fault,
    FaultProxy,
)
from tests.peers.medplum import CLINIK_ID_SYSTEM, MedplumPeer, MedplumPeerError, run_medplum_peer

FHIR_JSON = {"Content-Type": "application/fhir+json"}
TEST_SYSTEM = "urn:clinik-local:test"


def new_id() -> str:
    """A fresh FHIR id (the session's peer is shared, so every test writes its own ids)."""
    return f"t-{uuid.uuid4().hex}"


def task(task_id: str | None = None, **fields: Any) -> dict[str, Any]:
    """A minimal valid R4 Task (status and intent are its only required elements)."""
    resource: dict[str, Any] = {"resourceType": "Task", "status": "requested", "intent": "order"}
    if task_id is not None:
        resource["id"] = task_id
    resource.update(fields)
    return resource


def coded(code: str) -> dict[str, Any]:
    return {"coding": [{"system": TEST_SYSTEM, "code": code}]}


@pytest.fixture
def fhir(medplum_peer: MedplumPeer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=medplum_peer.base_url, headers=FHIR_JSON, timeout=10) as client:
        yield client


def put(client: httpx.Client, resource: dict[str, Any], **headers: str) -> httpx.Response:
    return client.put(f"/Task/{resource['id']}", content=json.dumps(resource), headers=headers)


def version_of(response: httpx.Response) -> str:
    return str(response.json()["meta"]["versionId"])


def search_ids(client: httpx.Client, query: str) -> list[str]:
    response = client.get(f"/Task?{query}")
    assert response.status_code == 200, response.text
    bundle = response.json()
    assert bundle["resourceType"] == "Bundle"
    assert bundle["type"] == "searchset"
    return [entry["resource"]["id"] for entry in bundle.get("entry", [])]


def assert_outcome(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    outcome: dict[str, Any] = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"], outcome
    return outcome


# --- the peer itself ---------------------------------------------------------------------


def test_peer_reports_the_medplum_4x_engine_it_runs(
    medplum_peer: MedplumPeer, fhir: httpx.Client
) -> None:
    assert medplum_peer.base_url.startswith("http://127.0.0.1:")
    assert medplum_peer.base_url.endswith("/fhir/R4")
    assert medplum_peer.medplum_version == "4.5.2"
    metadata = fhir.get("/metadata").json()
    assert metadata["fhirVersion"] == "4.0.1"
    assert metadata["software"]["version"] == "4.5.2"


def test_a_peer_not_installed_fails_naming_the_npm_ci_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(medplum_module, "PEER_DIR", tmp_path)
    peer = run_medplum_peer()
    with pytest.raises(MedplumPeerError, match=r"run `npm ci --prefix tests/peers/medplum`"):
        peer.__enter__()


def test_put_with_a_client_id_creates_the_task_under_that_id(fhir: httpx.Client) -> None:
    task_id = new_id()
    assert fhir.get(f"/Task/{task_id}").status_code == 404
    created = put(fhir, task(task_id))
    # Update-as-create is answered 200 (not 201) by the engine, with the new version.
    assert created.status_code == 200, created.text
    assert created.json()["id"] == task_id
    read = fhir.get(f"/Task/{task_id}")
    assert read.status_code == 200
    assert read.json()["id"] == task_id
    assert read.headers["ETag"] == f'W/"{version_of(created)}"'


def test_version_ids_are_uuids_new_on_every_write_and_carried_in_etag(fhir: httpx.Client) -> None:
    task_id = new_id()
    versions = []
    response = put(fhir, task(task_id))
    for _ in range(3):
        versions.append(version_of(response))
        assert response.headers["ETag"] == f'W/"{versions[-1]}"'
        response = put(fhir, task(task_id), **{"If-Match": f'W/"{versions[-1]}"'})
        assert response.status_code == 200, response.text
    assert len(set(versions)) == len(versions)
    assert all(uuid.UUID(v).version == 4 for v in versions)
    # Even an identical body makes a new version (the engine keeps no "no-op" check).
    assert version_of(put(fhir, task(task_id))) != versions[-1]


def test_last_modified_and_content_location_follow_meta(fhir: httpx.Client) -> None:
    response = put(fhir, task(new_id()))
    meta = response.json()["meta"]
    last_updated = datetime.fromisoformat(meta["lastUpdated"].replace("Z", "+00:00"))
    assert parsedate_to_datetime(response.headers["Last-Modified"]) == last_updated.replace(
        microsecond=0
    )
    assert response.headers["Content-Location"].endswith(
        f"/Task/{response.json()['id']}/_history/{meta['versionId']}"
    )


def test_stale_if_match_is_412_with_an_operation_outcome_and_changes_nothing(
    fhir: httpx.Client,
) -> None:
    task_id = new_id()
    first = put(fhir, task(task_id, description="first"))
    second = put(
        fhir, task(task_id, description="second"), **{"If-Match": f'W/"{version_of(first)}"'}
    )
    assert second.status_code == 200
    stale = put(
        fhir, task(task_id, description="third"), **{"If-Match": f'W/"{version_of(first)}"'}
    )
    outcome = assert_outcome(stale, 412)
    assert outcome["issue"][0]["details"]["text"] == "Precondition Failed"
    current = fhir.get(f"/Task/{task_id}").json()
    assert current["description"] == "second"
    assert current["meta"]["versionId"] == version_of(second)


def test_if_match_on_a_task_that_does_not_exist_is_404(fhir: httpx.Client) -> None:
    response = put(fhir, task(new_id()), **{"If-Match": f'W/"{uuid.uuid4()}"'})
    assert_outcome(response, 404)


def test_if_none_match_with_the_current_version_is_304(fhir: httpx.Client) -> None:
    task_id = new_id()
    etag = put(fhir, task(task_id)).headers["ETag"]
    assert fhir.get(f"/Task/{task_id}", headers={"If-None-Match": etag}).status_code == 304
    other = fhir.get(f"/Task/{task_id}", headers={"If-None-Match": f'W/"{uuid.uuid4()}"'})
    assert other.status_code == 200


def test_history_exists_per_task_but_not_per_type(fhir: httpx.Client) -> None:
    task_id = new_id()
    first = put(fhir, task(task_id, description="a"))
    second = put(fhir, task(task_id, description="b"))
    history = fhir.get(f"/Task/{task_id}/_history").json()
    assert history["type"] == "history"
    assert [e["resource"]["meta"]["versionId"] for e in history["entry"]] == [
        version_of(second),
        version_of(first),
    ]
    old = fhir.get(f"/Task/{task_id}/_history/{version_of(first)}")
    assert old.json()["description"] == "a"
    # Type-level history (Medplum #2670): routed as a read of a Task whose id is "_history".
    assert_outcome(fhir.get("/Task/_history"), 404)


def test_last_updated_search_sorted_and_counted_pages_forward(fhir: httpx.Client) -> None:
    code = new_id()
    stamps = []
    for i in range(4):
        stamps.append(put(fhir, task(new_id(), code=coded(code), description=str(i))).json())
        time.sleep(0.005)  # lastUpdated has millisecond precision: keep them distinct
    since = stamps[0]["meta"]["lastUpdated"]
    query = f"code={TEST_SYSTEM}|{code}&_lastUpdated=gt{since}&_sort=_lastUpdated&_count=2"
    response = fhir.get(f"/Task?{query}")
    bundle = response.json()
    assert [e["resource"]["id"] for e in bundle["entry"]] == [s["id"] for s in stamps[1:3]]
    assert bundle["total"] == 3  # every match, not the page
    assert "link" not in bundle  # no next link: the client pages on by its own watermark
    descending = search_ids(fhir, f"code={TEST_SYSTEM}|{code}&_sort=-_lastUpdated")
    assert descending == [s["id"] for s in reversed(stamps)]
    offset = search_ids(fhir, f"code={TEST_SYSTEM}|{code}&_sort=_lastUpdated&_count=2&_offset=2")
    assert offset == [s["id"] for s in stamps[2:]]


@pytest.mark.parametrize(
    ("param", "element", "matching", "other"),
    [
        ("owner", "owner", {"reference": "Practitioner/p-a"}, {"reference": "Practitioner/p-b"}),
        (
            "requester",
            "requester",
            {"reference": "Practitioner/r-a"},
            {"reference": "Practitioner/r-b"},
        ),
        ("patient", "for", {"reference": "Patient/pt-a"}, {"reference": "Patient/pt-b"}),
        ("status", "status", "in-progress", "requested"),
        ("priority", "priority", "urgent", "routine"),
    ],
)
def test_scope_search_parameters_select_only_matching_tasks(
    fhir: httpx.Client, param: str, element: str, matching: Any, other: Any
) -> None:
    code = new_id()
    wanted = put(fhir, task(new_id(), code=coded(code), **{element: matching})).json()
    put(fhir, task(new_id(), code=coded(code), **{element: other}))
    value = matching["reference"] if isinstance(matching, dict) else matching
    assert search_ids(fhir, f"code={TEST_SYSTEM}|{code}&{param}={value}") == [wanted["id"]]


def test_code_search_with_a_system_matches_codings_only_a_bare_code_also_text(
    fhir: httpx.Client,
) -> None:
    code = new_id()
    with_coding = put(fhir, task(new_id(), code=coded(code))).json()
    text_only = put(fhir, task(new_id(), code={"text": code})).json()
    assert search_ids(fhir, f"code={TEST_SYSTEM}|{code}") == [with_coding["id"]]
    # A token without a system matches CodeableConcept.text as well as codings.
    assert sorted(search_ids(fhir, f"code={code}")) == sorted([with_coding["id"], text_only["id"]])
    assert search_ids(fhir, f"code=|{code}") == [text_only["id"]]  # "no system"


def test_search_takes_several_values_and_reference_ids_without_type(fhir: httpx.Client) -> None:
    code = new_id()
    done = put(fhir, task(new_id(), code=coded(code), status="completed")).json()
    started = put(fhir, task(new_id(), code=coded(code), status="in-progress")).json()
    put(fhir, task(new_id(), code=coded(code), status="requested"))
    found = search_ids(fhir, f"code={TEST_SYSTEM}|{code}&status=completed,in-progress")
    assert sorted(found) == sorted([done["id"], started["id"]])


def test_identifier_search_finds_the_task_by_our_id(fhir: httpx.Client) -> None:
    ours = f"task_{uuid.uuid4().hex}"  # ours may hold "_": only the FHIR id may not
    task_id = new_id()
    put(fhir, task(task_id, identifier=[{"system": CLINIK_ID_SYSTEM, "value": ours}]))
    assert search_ids(fhir, f"identifier={CLINIK_ID_SYSTEM}|{ours}") == [task_id]
    assert search_ids(fhir, f"identifier={TEST_SYSTEM}|{ours}") == []


def test_conditional_create_with_if_none_exist_creates_once(fhir: httpx.Client) -> None:
    ours = f"task_{uuid.uuid4().hex}"
    body = json.dumps(
        task("client-chosen", identifier=[{"system": CLINIK_ID_SYSTEM, "value": ours}])
    )
    condition = {"If-None-Exist": f"identifier={CLINIK_ID_SYSTEM}|{ours}"}
    first = fhir.post("/Task", content=body, headers=condition)
    assert first.status_code == 201, first.text
    server_id = first.json()["id"]
    assert server_id != "client-chosen"  # POST ignores a client id: the server assigns one
    assert uuid.UUID(server_id)
    assert first.headers["Location"].endswith(f"/Task/{server_id}/_history/{version_of(first)}")
    again = fhir.post("/Task", content=body, headers=condition)
    assert again.status_code == 200  # the existing match, unchanged
    assert again.json()["id"] == server_id
    assert version_of(again) == version_of(first)
    assert search_ids(fhir, f"identifier={CLINIK_ID_SYSTEM}|{ours}") == [server_id]


def test_plain_post_creates_a_new_task_every_time(fhir: httpx.Client) -> None:
    ours = f"task_{uuid.uuid4().hex}"
    body = json.dumps(task(identifier=[{"system": CLINIK_ID_SYSTEM, "value": ours}]))
    ids = {fhir.post("/Task", content=body).json()["id"] for _ in range(2)}
    assert len(ids) == 2  # no idempotency: a retried create without If-None-Exist duplicates
    assert sorted(search_ids(fhir, f"identifier={CLINIK_ID_SYSTEM}|{ours}")) == sorted(ids)


def test_delete_ignores_if_match_and_leaves_404_not_410(fhir: httpx.Client) -> None:
    task_id = new_id()
    put(fhir, task(task_id))
    stale = fhir.delete(f"/Task/{task_id}", headers={"If-Match": f'W/"{uuid.uuid4()}"'})
    assert stale.status_code == 200  # deleted although the If-Match names no version of it
    assert stale.json()["resourceType"] == "OperationOutcome"
    assert_outcome(fhir.get(f"/Task/{task_id}"), 404)
    assert_outcome(fhir.get(f"/Task/{task_id}/_history"), 404)  # history goes with it
    assert_outcome(fhir.delete(f"/Task/{task_id}"), 404)  # a second delete is 404
    assert search_ids(fhir, f"_id={task_id}") == []
    recreated = put(fhir, task(task_id))  # and a PUT brings the id back
    assert recreated.status_code == 200


def test_refuses_a_body_that_is_not_a_valid_r4_task(fhir: httpx.Client) -> None:
    task_id = new_id()
    unknown = put(fhir, task(task_id, colour="blue"))
    assert assert_outcome(unknown, 400)["issue"][0]["expression"] == ["Task.colour"]
    missing = fhir.put(
        f"/Task/{task_id}", content=json.dumps({"resourceType": "Task", "id": task_id})
    )
    assert {issue["expression"][0] for issue in assert_outcome(missing, 400)["issue"]} == {
        "Task.status",
        "Task.intent",
    }
    wrong_id = fhir.put(f"/Task/{task_id}", content=json.dumps(task(new_id())))
    assert assert_outcome(wrong_id, 400)["issue"][0]["details"]["text"] == "Incorrect resource ID"
    wrong_type = fhir.put(
        f"/Task/{task_id}", content=json.dumps({"resourceType": "Patient", "id": task_id})
    )
    assert_outcome(wrong_type, 400)
    assert_outcome(fhir.put(f"/Task/{task_id}", content="{not json"), 400)
    assert fhir.get(f"/Task/{task_id}").status_code == 404  # nothing of it was stored


def test_refuses_ids_that_are_not_fhir_ids(fhir: httpx.Client) -> None:
    for bad in ("task_01HXYZ", "a" * 65):
        outcome = assert_outcome(put(fhir, task(bad)), 400)
        assert outcome["issue"][0]["expression"] == ["Task.id"]
    assert fhir.get("/Task/task_01HXYZ").status_code == 404


def test_medplum_validation_does_not_check_code_bindings(fhir: httpx.Client) -> None:
    # What the peer lets through: a status outside the Task status code system is stored.
    response = put(fhir, task(new_id(), status="not-a-status"))
    assert response.status_code == 200
    assert response.json()["status"] == "not-a-status"


def test_references_to_absent_resources_pass_unless_the_peer_checks_them(
    medplum_peer: MedplumPeer, fhir: httpx.Client
) -> None:
    dangling = {"reference": f"Patient/{new_id()}"}
    assert put(fhir, task(new_id(), **{"for": dangling})).status_code == 200
    with (
        run_medplum_peer(token="peer-token", check_references=True) as strict,
        httpx.Client(base_url=strict.base_url, headers=strict.headers(), timeout=10) as client,
    ):
        assert strict.check_references
        refused = put(client, task(new_id(), **{"for": dangling}))
        details = assert_outcome(refused, 400)["issue"][0]["details"]["text"]
        assert dangling["reference"] in details
        patient_id = dangling["reference"].split("/")[1]
        patient = client.put(
            f"/Patient/{patient_id}",
            content=json.dumps({"resourceType": "Patient", "id": patient_id}),
        )
        assert patient.status_code == 200
        assert put(client, task(new_id(), **{"for": dangling})).status_code == 200
        # ... and it wants its bearer token on every request.
        anonymous = httpx.get(f"{strict.base_url}/Task/{patient_id}")
        assert_outcome(anonymous, 401)
        assert anonymous.headers["WWW-Authenticate"] == "Bearer"
        wrong = httpx.get(f"{strict.base_url}/metadata", headers={"Authorization": "Bearer x"})
        assert wrong.status_code == 401
        # reset() empties this peer only (a second peer is a separate process and port).
        assert client.get(f"/Patient/{patient_id}").status_code == 200
        strict.reset()
        assert client.get(f"/Patient/{patient_id}").status_code == 404
    assert strict.port != medplum_peer.port
    assert put(fhir, task(new_id(), **{"for": dangling})).status_code == 200


def test_seed_lab_order_read_back_parses_strictly_with_fhirclient(fhir: httpx.Client) -> None:
    with TaskStore.open(":memory:") as store:
        lab_order = store.tasks.create(
            {
                "id": new_id(),
                "status": "requested",
                "intent": "order",
                "priority": "urgent",
                "code": "lab-order",
                "description": "Order CBC and CMP for pre-operative assessment",
                "patientId": "pt-abc123",
                "encounterId": "enc-xyz789",
                "requesterId": "prac-def456",
                "ownerId": "prac-lab-tech",
                "executionPeriod": {"start": "2025-02-01T08:00:00Z", "end": "2025-02-01T17:00:00Z"},
                "input": [
                    {"type": "lab-panel", "valueString": "CBC"},
                    {"type": "lab-panel", "valueString": "CMP"},
                ],
                "note": "Patient is NPO after midnight. Draw labs before 10am.",
            }
        ).data
    stored = put(fhir, to_fhir(lab_order, "R4"))
    assert stored.status_code == 200, stored.text  # our R4 export passes Medplum's validator
    read = fhir.get(f"/Task/{lab_order.id}").json()
    parsed = FhirclientTask(read, strict=True)
    assert parsed.for_fhir.reference == "Patient/pt-abc123"
    assert parsed.owner.reference == "Practitioner/prac-lab-tech"
    assert parsed.requester.reference == "Practitioner/prac-def456"
    assert [(i.type.text, i.valueString) for i in parsed.input] == [
        ("lab-panel", "CBC"),
        ("lab-panel", "CMP"),
    ]
    assert parsed.executionPeriod.start.isostring.startswith("2025-02-01T08:00:00")
    assert parsed.executionPeriod.end.isostring.startswith("2025-02-01T17:00:00")
    assert parsed.meta.versionId == stored.json()["meta"]["versionId"]


# --- the fault proxy -----------------------------------------------------------------------


def test_proxy_forwards_untouched_when_no_fault_is_drawn(
    medplum_peer: MedplumPeer, fhir: httpx.Client
) -> None:
    with FaultProxy(medplum_peer.base_url) as proxy:
        assert proxy.base_url.endswith("/fhir/R4")
        assert proxy.port != medplum_peer.port
        task_id = new_id()
        through = httpx.put(
            f"{proxy.base_url}/Task/{task_id}", content=json.dumps(task(task_id)), headers=FHIR_JSON
        )
        assert through.status_code == 200
        direct = fhir.get(f"/Task/{task_id}")
        assert through.headers["ETag"] == direct.headers["ETag"]
        # The Host header is forwarded: the peer's own URLs point back at the proxy.
        assert f":{proxy.port}/fhir/R4/Task/{task_id}" in through.headers["Content-Location"]
        assert proxy.counts[REQUESTS] == proxy.counts[FORWARDED] == 1
        assert proxy.faults_injected == 0


def test_drop_before_forwarding_closes_without_answer_and_applies_nothing(
    medplum_peer: MedplumPeer, fhir: httpx.Client
) -> None:
    with FaultProxy(medplum_peer.base_url, script=[Fault.DROP_BEFORE]) as proxy:
        task_id = new_id()
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.put(f"{proxy.base_url}/Task/{task_id}", content=json.dumps(task(task_id)))
        assert fhir.get(f"/Task/{task_id}").status_code == 404
        assert proxy.counts[Fault.DROP_BEFORE] == 1
        assert proxy.counts[FORWARDED] == 0
        assert proxy.log[0].status is None


def test_drop_after_forwarding_applies_the_write_but_loses_the_answer(
    medplum_peer: MedplumPeer, fhir: httpx.Client
) -> None:
    with FaultProxy(medplum_peer.base_url, script=[Fault.DROP_AFTER]) as proxy:
        task_id = new_id()
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.put(f"{proxy.base_url}/Task/{task_id}", content=json.dumps(task(task_id)))
        assert fhir.get(f"/Task/{task_id}").status_code == 200
        assert proxy.counts[Fault.DROP_AFTER] == 1
        assert proxy.counts[FORWARDED] == 1


def test_injected_5xx_and_429_are_answered_without_forwarding(
    medplum_peer: MedplumPeer, fhir: httpx.Client
) -> None:
    script = [Fault.ERROR_5XX, Fault.TOO_MANY_REQUESTS]
    with FaultProxy(medplum_peer.base_url, script=script, retry_after=7) as proxy:
        task_id = new_id()
        url = f"{proxy.base_url}/Task/{task_id}"
        unavailable = httpx.put(url, content=json.dumps(task(task_id)))
        assert unavailable.status_code == 503
        assert unavailable.json()["resourceType"] == "OperationOutcome"
        limited = httpx.put(url, content=json.dumps(task(task_id)))
        assert limited.status_code == 429
        assert limited.headers["Retry-After"] == "7"
        assert fhir.get(f"/Task/{task_id}").status_code == 404
        assert proxy.counts[FORWARDED] == 0
        assert [entry.status for entry in proxy.log] == [503, 429]


def test_slow_waits_then_forwards(medplum_peer: MedplumPeer) -> None:
    with FaultProxy(medplum_peer.base_url, script=[Fault.SLOW, None], slow_seconds=0.3) as proxy:
        started = time.monotonic()
        assert httpx.get(f"{proxy.base_url}/metadata").status_code == 200
        assert time.monotonic() - started >= 0.3
        assert httpx.get(f"{proxy.base_url}/metadata").status_code == 200
        assert proxy.counts[Fault.SLOW] == 1
        assert proxy.counts[FORWARDED] == 2


def _fault_sequence(target: str, seed: int, requests: int) -> list[Fault | None]:
    rates = {Fault.ERROR_5XX: 0.3, Fault.TOO_MANY_REQUESTS: 0.2}
    with FaultProxy(target, rates=rates, seed=seed) as proxy, httpx.Client() as client:
        for _ in range(requests):
            client.get(f"{proxy.base_url}/metadata")
        return [entry.fault for entry in proxy.log]


def test_same_seed_same_faults_other_seed_other_faults(medplum_peer: MedplumPeer) -> None:
    first = _fault_sequence(medplum_peer.base_url, seed=11, requests=40)
    assert first == _fault_sequence(medplum_peer.base_url, seed=11, requests=40)
    assert first != _fault_sequence(medplum_peer.base_url, seed=12, requests=40)
    assert {Fault.ERROR_5XX, Fault.TOO_MANY_REQUESTS, None} == set(first)


@settings(max_examples=10)
@given(
    script=st.lists(st.sampled_from([None, Fault.ERROR_5XX, Fault.TOO_MANY_REQUESTS]), max_size=6),
    rate=st.floats(min_value=0.0, max_value=1.0),
    max_faults=st.none() | st.integers(min_value=0, max_value=4),
)
def test_counts_and_log_account_for_every_request_and_faults_stay_bounded(
    medplum_peer: MedplumPeer, script: list[Fault | None], rate: float, max_faults: int | None
) -> None:
    requests = 8
    rates = {Fault.ERROR_5XX: rate}
    with (
        FaultProxy(
            medplum_peer.base_url, rates=rates, script=script, max_faults=max_faults
        ) as proxy,
        httpx.Client() as client,
    ):
        statuses = [client.get(f"{proxy.base_url}/metadata").status_code for _ in range(requests)]
    assert proxy.counts[REQUESTS] == len(proxy.log) == requests
    assert [entry.status for entry in proxy.log] == statuses
    faulted = [entry for entry in proxy.log if entry.fault is not None]
    assert proxy.faults_injected == len(faulted)
    assert proxy.counts[FORWARDED] == requests - len(faulted)
    if max_faults is not None:
        assert len(faulted) <= max_faults
    if max_faults is None and rate == 1.0:
        assert len(faulted) == requests - script[:requests].count(None)


def test_heal_and_methods_filter_let_requests_through(medplum_peer: MedplumPeer) -> None:
    with (
        FaultProxy(medplum_peer.base_url, rates={Fault.ERROR_5XX: 1.0}, methods=["PUT"]) as proxy,
        httpx.Client() as client,
    ):
        assert client.get(f"{proxy.base_url}/metadata").status_code == 200  # GET never faulted
        task_id = new_id()
        url = f"{proxy.base_url}/Task/{task_id}"
        assert client.put(url, content=json.dumps(task(task_id))).status_code == 503
        proxy.heal()
        assert client.put(url, content=json.dumps(task(task_id))).status_code == 200
        assert proxy.faults_injected == 1


def test_proxy_stops_by_itself_after_its_lifetime(medplum_peer: MedplumPeer) -> None:
    proxy = FaultProxy(medplum_peer.base_url, lifetime=0.2).start()
    deadline = time.monotonic() + 10
    while not proxy.stopped and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proxy.stopped
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{proxy.base_url}/metadata", timeout=2)
    proxy.stop()  # idempotent


def test_proxy_fronts_the_clinik_reference_server_too() -> None:
    with (
        ReferenceServer(token="tok") as server,
        FaultProxy(
            server.url,
            script=[Fault.ERROR_5XX, Fault.DROP_BEFORE],
            error_body=CLINIK_ERROR_BODY,
            error_content_type="application/json",
        ) as proxy,
        httpx.Client(headers={"Authorization": "Bearer tok"}) as client,
    ):
        assert proxy.base_url.endswith("/api/v1")
        failed = client.get(f"{proxy.base_url}/tasks/nope")
        assert failed.status_code == 503
        assert failed.json()["error"]["code"] == "injected_fault"
        with pytest.raises(httpx.RemoteProtocolError):
            client.get(f"{proxy.base_url}/tasks/nope")
        missing = client.get(f"{proxy.base_url}/tasks/nope")
        assert missing.status_code == 404
        assert "error" in missing.json()
        assert proxy.counts[FORWARDED] == 1


def test_proxy_refuses_rates_that_do_not_add_up(medplum_peer: MedplumPeer) -> None:
    with pytest.raises(ValueError, match="sum to at most 1"):
        FaultProxy(medplum_peer.base_url, rates={Fault.SLOW: 0.6, Fault.DROP_AFTER: 0.6})
    with pytest.raises(ValueError, match="http://"):
        FaultProxy("ftp://127.0.0.1/")


def test_last_updated_is_utc_with_milliseconds(fhir: httpx.Client) -> None:
    stamp = put(fhir, task(new_id())).json()["meta"]["lastUpdated"]
    parsed = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert len(stamp) == len("2025-01-01T00:00:00.000Z")
    assert abs((datetime.now(UTC) - parsed).total_seconds()) < 60
