"""Run the Medplum FHIR R4 peer (tests/peers/medplum/server.mjs) as a child process.

The peer is Medplum's own FHIR engine (``@medplum/fhir-router``'s ``FhirRouter`` over its
``MemoryRepository``, the version pinned in ``tests/peers/medplum/package-lock.json``) behind a
small HTTP wrapper on 127.0.0.1. Tests talk to it over real HTTP, exactly as clinik-local's
FHIR remote talks to a Medplum server::

    with run_medplum_peer() as peer:
        httpx.put(f"{peer.base_url}/Task/abc", json={...})

or, in a test, the session fixture ``medplum_peer`` (tests/conftest.py) which starts one peer
for the whole run. What the peer does and refuses is listed in tests/peers/README.md.

It needs ``node`` (Node.js 20.19+) and its packages: ``npm ci --prefix tests/peers/medplum``
(``.ci/run`` does it). Without them starting it fails with that command in the message:
the project runs no skipped tests, so a missing install is an error, never a skip.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import attrs
import httpx

PEER_DIR = Path(__file__).resolve().parent / "medplum"
INSTALL_COMMAND = "npm ci --prefix tests/peers/medplum"
#: The FHIR identifier system under which clinik-local keeps its own task id.
CLINIK_ID_SYSTEM = "urn:clinik-local:id"


class MedplumPeerError(RuntimeError):
    """The peer could not be started (not installed, no node, or it died before ready)."""


@attrs.frozen
class MedplumPeer:
    """A running peer: where it listens and which Medplum engine answers there."""

    base_url: str
    """``http://127.0.0.1:<port>/fhir/R4``: the FHIR base, no trailing slash."""
    port: int
    medplum_version: str
    """The ``@medplum/fhir-router`` version actually loaded (read from node_modules)."""
    token: str | None
    """The bearer token every request needs, or None when the peer checks none."""
    check_references: bool

    @property
    def origin(self) -> str:
        """``http://127.0.0.1:<port>``, for paths outside the FHIR base."""
        return f"http://127.0.0.1:{self.port}"

    def headers(self) -> dict[str, str]:
        """The Authorization header this peer wants (empty when it checks no token)."""
        return {} if self.token is None else {"Authorization": f"Bearer {self.token}"}

    def reset(self) -> None:
        """Forget every resource (a new, empty MemoryRepository): for tests needing a clean peer."""
        response = httpx.post(f"{self.origin}/__peer/reset", headers=self.headers(), timeout=10)
        response.raise_for_status()


def _check_installed() -> str:
    """The node executable, after checking the peer's packages are there; else a clear error."""
    node = shutil.which("node")
    if node is None:
        raise MedplumPeerError(
            "the Medplum FHIR peer needs Node.js 20.19+ (`node` is not on PATH); "
            f"install it, then run `{INSTALL_COMMAND}`"
        )
    marker = PEER_DIR / "node_modules" / "@medplum" / "fhir-router" / "package.json"
    if not marker.is_file():
        _install_peer()
    if not marker.is_file():
        raise MedplumPeerError(
            f"the Medplum FHIR peer is not installed ({PEER_DIR / 'node_modules'} is missing): "
            f"run `{INSTALL_COMMAND}` from the repository root"
        )
    return node


def _install_peer() -> None:
    """Install the peer from its package-lock.json (``npm ci``), once, on first use.

    So that the README's one test command works on a fresh clone; CI runs the same
    ``npm ci`` up front. A failure is reported by the caller's clear error.
    """
    npm = shutil.which("npm")
    if npm is None:
        return
    subprocess.run(
        [npm, "ci", "--prefix", str(PEER_DIR), "--no-audit", "--no-fund", "--loglevel=error"],
        check=False,
        timeout=600,
    )


def _read_lines(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    """Forward the child's stdout lines to ``lines`` (None at its end), so reads can time out."""
    for line in stream:
        lines.put(line)
    lines.put(None)


@contextlib.contextmanager
def run_medplum_peer(
    *,
    token: str | None = None,
    check_references: bool = False,
    validate: bool = True,
    ready_timeout: float = 60.0,
) -> Iterator[MedplumPeer]:
    """Start ``node server.mjs 0`` on a free 127.0.0.1 port, yield it when ready, then kill it.

    ``token``: require ``Authorization: Bearer <token>``. ``check_references``: refuse
    references to resources the peer does not hold (Medplum's checkReferencesOnWrite).
    ``validate=False``: skip Medplum's structural validation of written resources.
    Raises MedplumPeerError when the peer is not installed or is not ready within
    ``ready_timeout`` seconds (its stderr is in the message).
    """
    node = _check_installed()
    argv = [node, "server.mjs", "0"]
    if check_references:
        argv.append("--check-references")
    if not validate:
        argv.append("--no-validate")
    env = dict(os.environ)
    env.pop("MEDPLUM_PEER_TOKEN", None)
    if token is not None:
        env["MEDPLUM_PEER_TOKEN"] = token
    # stdin stays open as a pipe: the peer exits by itself when it closes (we died).
    process = subprocess.Popen(
        argv,
        cwd=PEER_DIR,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    assert process.stderr is not None
    lines: queue.Queue[str | None] = queue.Queue()
    stdout_reader = threading.Thread(target=_read_lines, args=(process.stdout, lines), daemon=True)
    stdout_reader.start()
    stderr_chunks: list[str] = []
    stderr_reader = threading.Thread(
        target=lambda: stderr_chunks.extend(process.stderr or ()), daemon=True
    )
    stderr_reader.start()
    try:
        deadline = time.monotonic() + ready_timeout
        ready: dict[str, object] | None = None
        while ready is None:
            remaining = deadline - time.monotonic()
            try:
                line = lines.get(timeout=max(remaining, 0.0))
            except queue.Empty:
                raise MedplumPeerError(
                    f"the Medplum FHIR peer was not ready within {ready_timeout} s"
                ) from None
            if line is None:
                process.wait(timeout=10)
                stderr_reader.join(timeout=5)
                raise MedplumPeerError(
                    f"the Medplum FHIR peer exited ({process.returncode}) before it was ready: "
                    + "".join(stderr_chunks).strip()[-2000:]
                )
            with contextlib.suppress(json.JSONDecodeError):
                parsed = json.loads(line)
                if isinstance(parsed, dict) and parsed.get("ready") is True:
                    ready = parsed
        yield MedplumPeer(
            base_url=str(ready["url"]),
            port=int(str(ready["port"])),
            medplum_version=str(ready["medplum"]),
            token=token,
            check_references=check_references,
        )
    finally:
        _stop(process)
        stdout_reader.join(timeout=5)
        stderr_reader.join(timeout=5)
        for stream in (process.stdout, process.stderr):
            with contextlib.suppress(OSError):
                stream.close()


def _stop(process: subprocess.Popen[str]) -> None:
    """Close the peer's stdin (it exits by itself), then terminate, then kill, each bounded."""
    if process.stdin is not None:
        with contextlib.suppress(OSError):
            process.stdin.close()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
