"""FHIR push rate: the outbox drained to Medplum's FHIR engine, beside a bare httpx PUT loop.

Run: ``python benchmarks/bench_fhir.py [--count 2000] [--repeat 3]`` (``--quick``: CI's
smoke run). It starts one Medplum peer (tests/peers/medplum: ``@medplum/fhir-router``
over its ``MemoryRepository``, in its own Node.js process; ``npm ci`` on first use) and
measures, alternating sample by sample so both see the same machine and the same
growing repository:

1. bare loop: one keep-alive ``httpx.Client`` sending ``PUT /Task/<id>`` with the very
   bodies the remote would send (``to_fhir`` + mapped references + the change id),
   one after another (the ceiling for a sequential client);
2. sync drain: ``store.sync.flush()`` of an outbox holding as many creates, through
   ``FhirR4Remote`` with ``SyncConfig``'s default 2 lanes, and with 1 lane;
3. the ratios drain / bare (goal >= 0.7 with the defaults).

Best of ``--repeat`` for each.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.peers

from clinik_local import TaskStore
from clinik_local.codec import encode_task
from clinik_local.demo import generate_requests
from clinik_local.remotes.base import Change
from clinik_local.remotes.fhir import FhirR4Remote
from clinik_local.sync import SyncConfig
from clinik_local.wire import without_server_fields
from tests.peers.medplum import run_medplum_peer

TOKEN = "bench-token"


def dashed(_field: str, our_id: str) -> str:
    """The peer knows our ``pt_1`` as ``pt-1`` (references must be FHIR ids)."""
    return our_id.replace("_", "-")


def requests(count: int, prefix: str) -> list[dict[str, Any]]:
    return [
        {**request, "id": f"task_{prefix}_{n:07d}"}
        for n, request in enumerate(generate_requests(count, seed=3))
    ]


def bare_loop(base_url: str, count: int, prefix: str) -> float:
    """PUT the remote's own bodies with a plain keep-alive client: requests per second."""
    remote = FhirR4Remote(base_url, lambda: TOKEN, reference_map=dashed)
    bodies: list[tuple[str, bytes]] = []
    with TaskStore.open(":memory:") as store:
        for n, task in enumerate(store.tasks.create_many(requests(count, prefix)).data):
            assert task.id is not None
            change = Change(
                change_id=f"chg_{prefix}_{n}",
                task_id=task.id,
                op="create",
                body=without_server_fields(encode_task(task)),
                server_version=None,
            )
            resource = remote.fhir_resource(change)
            raw = json.dumps(resource, ensure_ascii=False, separators=(",", ":")).encode()
            bodies.append((resource["id"], raw))
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/fhir+json"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=30) as client:
        started = time.perf_counter()
        for server_id, raw in bodies:
            answer = client.put(f"/Task/{server_id}", content=raw)
            assert answer.status_code in (200, 201), answer.text
        elapsed = time.perf_counter() - started
    return count / elapsed


def sync_drain(base_url: str, count: int, prefix: str, lanes: int) -> float:
    """Flush an outbox of ``count`` creates through FhirR4Remote: changes per second."""
    with tempfile.TemporaryDirectory() as tmp:
        remote = FhirR4Remote(base_url, lambda: TOKEN, reference_map=dashed, lanes=lanes)
        config = SyncConfig(remote=remote, lanes=lanes, pull=False)  # the push side only
        with TaskStore.open(Path(tmp) / "drain.db", sync=config) as store:
            store.tasks.create_many(requests(count, prefix))
            started = time.perf_counter()
            assert store.sync.flush(timeout=600)
            elapsed = time.perf_counter() - started
            status = store.sync.status()
            assert status.pending == 0, status
            assert status.dead == 0, status
    return count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small smoke run (CI)")
    args = parser.parse_args()
    if args.quick:
        args.count, args.repeat = 100, 1
    with run_medplum_peer(token=TOKEN) as peer:
        print(
            f"Medplum peer: @medplum/fhir-router {peer.medplum_version} (MemoryRepository), "
            f"own Node.js process; {args.count} creates per sample, best of {args.repeat}"
        )
        bares: list[float] = []
        drains: dict[int, list[float]] = {2: [], 1: []}
        for sample in range(args.repeat):  # alternating: the same load and repository size
            bares.append(bare_loop(peer.base_url, args.count, f"b{sample}"))
            for lanes, rates in drains.items():
                rates.append(sync_drain(peer.base_url, args.count, f"s{lanes}x{sample}", lanes))
    bare = max(bares)
    print(f"bare httpx keep-alive PUT loop : {bare:8.0f} requests/s")
    for lanes, rates in drains.items():
        drain = max(rates)
        print(
            f"sync drain, {lanes} lane{'s' if lanes > 1 else ' '}           : {drain:8.0f} "
            f"changes/s  ratio {drain / bare:5.2f}" + ("  (goal >= 0.70)" if lanes == 2 else "")
        )


if __name__ == "__main__":
    main()
