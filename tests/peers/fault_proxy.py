"""An HTTP fault proxy on 127.0.0.1: forwards to any HTTP server, injecting network faults.

Put it between a client and a server (the Medplum FHIR peer, or clinik-local's own
ReferenceServer) to prove a sync engine survives what real networks do::

    with FaultProxy(peer.base_url, rates={Fault.DROP_AFTER: 0.2}, seed=7) as proxy:
        push_everything(base_url=proxy.base_url)      # same path as the target's URL
        assert proxy.counts[Fault.DROP_AFTER] > 0

Per request, one outcome (:class:`Fault`, or ``None`` = forwarded untouched) is taken first
from ``script`` (in order; ``None`` entries pass), then drawn from ``rates`` with a
``random.Random(seed)``: the same seed and the same order of requests give the same faults.
Faults are bounded: after ``max_faults`` of them, or :meth:`FaultProxy.heal`, everything
passes, so a test can always reach a healed network. The proxy stops by itself after
``lifetime`` seconds (and at the end of its ``with`` block).

The faults, each counted in :attr:`FaultProxy.counts` and listed in :attr:`FaultProxy.log`:

- ``DROP_BEFORE``: read the request, forward nothing, close the connection without an answer
  (the server never saw it; the client cannot know that).
- ``DROP_AFTER``: forward it, let the server apply it, then close without an answer
  (the lost-response case: a retry must not apply it twice).
- ``ERROR_5XX``: answer ``status_5xx`` (503) without forwarding.
- ``TOO_MANY_REQUESTS``: answer 429 with ``Retry-After: <retry_after>`` without forwarding.
- ``SLOW``: wait ``slow_seconds``, then forward normally.
"""

from __future__ import annotations

import contextlib
import enum
import json
import random
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import attrs
import httpx


class Fault(enum.StrEnum):
    """What the proxy does to one request instead of forwarding it untouched."""

    DROP_BEFORE = "drop_before"
    DROP_AFTER = "drop_after"
    ERROR_5XX = "error_5xx"
    TOO_MANY_REQUESTS = "too_many_requests"
    SLOW = "slow"


#: Count keys besides the faults: every request seen, every one that reached the target,
#: and every one that could not reach it (answered 502).
REQUESTS = "requests"
FORWARDED = "forwarded"
UPSTREAM_ERROR = "upstream_error"

#: The body of injected 5xx/429 answers by default: a FHIR OperationOutcome.
FHIR_ERROR_BODY = json.dumps(
    {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "transient", "diagnostics": "injected fault"}],
    }
).encode()
FHIR_ERROR_CONTENT_TYPE = "application/fhir+json"
#: The error envelope of sync-protocol.md, for use in front of the clinik ReferenceServer.
CLINIK_ERROR_BODY = json.dumps(
    {"error": {"code": "injected_fault", "message": "injected fault"}}
).encode()

_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "content-encoding",
    }
)


@attrs.frozen
class LogEntry:
    """One request the proxy handled: what it was and what the proxy did with it."""

    method: str
    path: str
    fault: Fault | None
    status: int | None
    """The status the client got (None: the connection was dropped)."""


class FaultProxy:
    """A threaded HTTP proxy on 127.0.0.1 forwarding to ``target`` with injected faults.

    ``target`` is a URL (``http://127.0.0.1:8000/fhir/R4``); requests are forwarded with
    their path and query unchanged to the target's scheme, host and port, and
    :attr:`base_url` is the target URL with the proxy's host and port, a drop-in
    replacement. ``rates`` maps faults to probabilities (their sum at most 1). ``methods``
    limits faults to those HTTP methods (others always pass and draw nothing).
    """

    def __init__(
        self,
        target: str,
        *,
        rates: Mapping[Fault, float] | None = None,
        script: Iterable[Fault | None] = (),
        seed: int = 0,
        max_faults: int | None = None,
        methods: Iterable[str] | None = None,
        slow_seconds: float = 0.2,
        retry_after: int = 1,
        status_5xx: int = 503,
        error_body: bytes = FHIR_ERROR_BODY,
        error_content_type: str = FHIR_ERROR_CONTENT_TYPE,
        upstream_timeout: float = 30.0,
        lifetime: float = 600.0,
    ) -> None:
        parts = urlsplit(target)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"target must be an http:// URL, not {target!r}")
        self.target_origin = f"{parts.scheme}://{parts.netloc}"
        self._target_path = parts.path.rstrip("/")
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._rates: dict[Fault, float] = {}
        self.set_rates(rates or {})
        self._script: list[Fault | None] = list(script)
        self._max_faults = max_faults
        self._methods = None if methods is None else frozenset(m.upper() for m in methods)
        self._healed = False
        self.slow_seconds = slow_seconds
        self.retry_after = retry_after
        self.status_5xx = status_5xx
        self.error_body = error_body
        self.error_content_type = error_content_type
        self.lifetime = lifetime
        self.counts: Counter[str] = Counter()
        """How many requests got each outcome: Fault values, REQUESTS, FORWARDED, UPSTREAM_ERROR."""
        self.log: list[LogEntry] = []
        self._client = httpx.Client(timeout=upstream_timeout, follow_redirects=False)
        self._httpd = _ProxyHTTPServer(("127.0.0.1", 0), _ProxyHandler)
        self._httpd.proxy = self
        self.port: int = self._httpd.server_address[1]
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()

    # --- configuration ---------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """The target's URL with the proxy's origin: point the client here."""
        return f"http://127.0.0.1:{self.port}{self._target_path}"

    def set_rates(self, rates: Mapping[Fault, float]) -> None:
        """Replace the fault rates (each in [0, 1], their sum at most 1)."""
        checked = {Fault(kind): float(rate) for kind, rate in rates.items()}
        if any(not 0.0 <= rate <= 1.0 for rate in checked.values()) or sum(checked.values()) > 1:
            raise ValueError(f"fault rates must be in [0, 1] and sum to at most 1: {rates!r}")
        with self._lock:
            self._rates = checked

    def script(self, faults: Iterable[Fault | None]) -> None:
        """Queue outcomes for the next requests, in order (``None``: pass), before any draw."""
        with self._lock:
            self._script.extend(faults)

    def heal(self) -> None:
        """From now on forward everything untouched (the script and the rates are dropped)."""
        with self._lock:
            self._healed = True
            self._script.clear()

    @property
    def faults_injected(self) -> int:
        """How many requests got a fault so far."""
        with self._lock:
            return sum(self.counts[kind] for kind in Fault)

    # --- running ---------------------------------------------------------------------

    def start(self) -> FaultProxy:
        """Serve on a background thread until :meth:`stop` or ``lifetime`` seconds."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
            )
            self._thread.start()
            self._timer = threading.Timer(self.lifetime, self.stop)
            self._timer.daemon = True
            self._timer.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket and the upstream client (idempotent).

        :attr:`stopped` turns True only once the socket is closed: a connection made after
        it is refused, never accepted into the backlog and then reset.
        """
        with self._stop_lock:
            if self._stopped.is_set():
                return
            if self._timer is not None:
                self._timer.cancel()
            if self._thread is not None:
                self._httpd.shutdown()
                if self._thread is not threading.current_thread():
                    self._thread.join(timeout=10)
            self._httpd.server_close()
            self._client.close()
            self._stopped.set()

    @property
    def stopped(self) -> bool:
        """True once the proxy stopped (explicitly, or by its ``lifetime``)."""
        return self._stopped.is_set()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- per request -------------------------------------------------------------------

    def _draw(self, method: str) -> Fault | None:
        """The outcome for the next request (under the lock: one sequence for all threads)."""
        with self._lock:
            self.counts[REQUESTS] += 1
            if self._healed or (self._methods is not None and method not in self._methods):
                return None
            injected = sum(self.counts[kind] for kind in Fault)
            if self._max_faults is not None and injected >= self._max_faults:
                return None
            fault: Fault | None
            if self._script:
                fault = self._script.pop(0)
            else:
                fault = None
                roll = self._rng.random()
                for kind in Fault:  # fixed order: the same seed gives the same faults
                    rate = self._rates.get(kind, 0.0)
                    if roll < rate:
                        fault = kind
                        break
                    roll -= rate
            if fault is not None:
                self.counts[fault] += 1
            return fault

    def _record(self, entry: LogEntry, *keys: str) -> None:
        with self._lock:
            self.log.append(entry)
            for key in keys:
                self.counts[key] += 1

    def _forward(
        self, method: str, path: str, headers: list[tuple[str, str]], body: bytes
    ) -> httpx.Response:
        request = self._client.build_request(
            method,
            self.target_origin + path,
            headers=[(k, v) for k, v in headers if k.lower() not in _HOP_BY_HOP],
            content=body,
        )
        return self._client.send(request)


class _ProxyHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    proxy: FaultProxy

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that went away (timed out, or its connection was one we dropped) is normal.
        if isinstance(sys.exc_info()[1], ConnectionError | OSError):
            return
        super().handle_error(request, client_address)


class _ProxyHandler(BaseHTTPRequestHandler):
    server: _ProxyHTTPServer
    protocol_version = "HTTP/1.1"  # keep-alive, as real clients and servers use

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes: without NODELAY, delayed ACKs add
        # ~40 ms to every keep-alive answer.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the proxy's own log is :attr:`FaultProxy.log`."""

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _drop(self) -> None:
        """Close the connection without a byte of answer."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _handle(self) -> None:
        proxy = self.server.proxy
        method, path = self.command, self.path
        body = self._read_body()
        fault = proxy._draw(method)
        entry = LogEntry
        if fault is Fault.DROP_BEFORE:
            proxy._record(entry(method, path, fault, None))
            self._drop()
            return
        if fault in (Fault.ERROR_5XX, Fault.TOO_MANY_REQUESTS):
            status = proxy.status_5xx if fault is Fault.ERROR_5XX else 429
            headers = [("Content-Type", proxy.error_content_type)]
            if fault is Fault.TOO_MANY_REQUESTS:
                headers.append(("Retry-After", str(proxy.retry_after)))
            proxy._record(entry(method, path, fault, status))
            self._answer(status, headers, proxy.error_body)
            return
        if fault is Fault.SLOW:
            time.sleep(proxy.slow_seconds)
        try:
            response = proxy._forward(method, path, list(self.headers.items()), body)
        except httpx.HTTPError:
            proxy._record(entry(method, path, fault, 502), UPSTREAM_ERROR)
            self._answer(502, [("Content-Type", proxy.error_content_type)], proxy.error_body)
            return
        if fault is Fault.DROP_AFTER:
            proxy._record(entry(method, path, fault, None), FORWARDED)
            self._drop()
            return
        proxy._record(entry(method, path, fault, response.status_code), FORWARDED)
        headers = [(k, v) for k, v in response.headers.multi_items() if k not in _HOP_BY_HOP]
        self._answer(response.status_code, headers, response.content)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _handle
