"""A HAPI-like FHIR R4 ``Task`` server on loopback: the answers HAPI FHIR gives, for tests.

The Medplum peer (tests/peers/medplum) is a real FHIR engine, but Medplum answers a
stale ``If-Match`` with ``412`` and has UUID versions and no type-level ``_history``.
HAPI FHIR does those differently, and this small server does them the HAPI way, so the
FHIR remote is proven against both behaviours:

- ``versionId`` is an integer counting up per resource (``1``, ``2``, ...), in
  ``meta.versionId`` and ``ETag: W/"<n>"``; ``meta.lastUpdated`` has milliseconds and
  a ``+00:00`` offset, as HAPI writes it;
- a stale ``If-Match`` on ``PUT`` or ``DELETE`` is **409 Conflict** with an
  OperationOutcome whose diagnostics start ``HAPI-0989`` (HAPI's "not the current
  version" message); nothing is changed;
- ``PUT /Task/<id>`` creates with the client's id (**201** + ``Location``) or updates
  (200); the body's ``id`` must match the URL (400, ``HAPI-0420``); ``If-Match`` on an
  id never stored is 404;
- ``client_ids=False`` (HAPI's ``ClientIdStrategy NOT_ALLOWED``): a ``PUT`` to an id
  never stored is 404 ``HAPI-0959`` (client-assigned IDs are not enabled): only
  ``POST`` creates;
- ``POST /Task`` gets a server-assigned numeric id; ``If-None-Exist: identifier=s|v``
  answers 200 with the one existing match (412 for several) and creates nothing;
- ``DELETE`` writes a deletion version: a read is then **410 Gone**, a second ``DELETE``
  is 200 (nothing left to delete), a ``PUT`` without ``If-Match`` brings it back;
- ``GET /Task/<id>/_history`` (newest first) and ``/_history/<n>``;
- ``GET /Task/_history`` at type level (newest first, ``_since`` inclusive, ``_count``),
  deletions as entries with ``request.method: DELETE`` and no resource;
- ``GET /Task?...`` searches: ``identifier``, ``_id``, ``_lastUpdated`` (prefixes
  ``gt``/``ge``/``lt``/``le``/``eq``, repeatable), ``owner``, ``patient``,
  ``requester``, ``status``, ``priority``, ``code`` (comma = OR), ``_sort``
  (``_lastUpdated`` or ``-_lastUpdated``), ``_count`` and ``_offset``; the searchset
  has ``total`` and a ``next`` link while more remain.

What it is not: a FHIR server. It holds Tasks only, in memory, checks only that a Task
has ``resourceType``, a valid ``id``, ``status`` and ``intent``, and speaks JSON only.
A bearer ``token`` is optional (``None``: none checked). ``requests`` and ``writes``
count what it was sent. ``put_task`` and ``delete_task``
are writes by "another client", for tests of server-side edits.
"""

from __future__ import annotations

import copy
import json
import re
import threading
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import attrs

from ..errors import ValidationError
from .server import LoopbackHTTPServer, ServerStoppedError, serve_in_thread

__all__ = ["HapiLikeFhirServer"]

_FHIR_ID = re.compile(r"[A-Za-z0-9.\-]{1,64}")
_ETAG = re.compile(r'\s*(?:W/)?"([^"]*)"\s*')
_PREFIXES = ("gt", "ge", "lt", "le", "eq")
_MAX_BODY = 1 << 20
_SEARCH_PARAMS = frozenset(
    {
        "identifier",
        "_id",
        "_lastUpdated",
        "owner",
        "patient",
        "requester",
        "status",
        "priority",
        "code",
        "_sort",
        "_count",
        "_offset",
        "_elements",
        "_total",
    }
)


class _Answer(Exception):
    """An HTTP answer to send instead of going on (status, OperationOutcome text)."""

    def __init__(self, status: int, text: str, code: str = "processing") -> None:
        super().__init__(text)
        self.status = status
        self.text = text
        self.code = code


def _outcome(text: str, code: str = "processing", severity: str = "error") -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": text}],
    }


@attrs.define
class _Version:
    number: int
    updated: datetime
    resource: dict[str, Any] | None  # None: the deletion


@attrs.define
class _Entry:
    """One write, in commit order, for the type-level history."""

    task_id: str
    version: _Version


def _instant(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}+00:00"


def _parse_instant(text: str) -> datetime:
    value = text.replace("Z", "+00:00")
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise _Answer(400, f'HAPI-1883: Invalid date/time format: "{text}"') from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when


def _ref_ids(value: Any) -> list[str]:
    refs = value if isinstance(value, list) else [value]
    out = []
    for ref in refs:
        if isinstance(ref, dict) and isinstance(ref.get("reference"), str):
            out.append(ref["reference"])
    return out


def _matches_reference(resource: Mapping[str, Any], element: str, wanted: str) -> bool:
    for want in wanted.split(","):
        for ref in _ref_ids(resource.get(element)):
            if ref == want or ref.endswith("/" + want) or ref.split("/_history/")[0] == want:
                return True
    return False


def _matches_code(resource: Mapping[str, Any], wanted: str) -> bool:
    concept = resource.get("code")
    if not isinstance(concept, dict):
        return False
    for want in wanted.split(","):
        system, bar, code = want.rpartition("|")
        if not bar and concept.get("text") == want:
            return True
        for coding in concept.get("coding") or []:
            if not isinstance(coding, dict) or coding.get("code") != code:
                continue
            if not bar or coding.get("system") == system:
                return True
    return False


def _matches_identifier(resource: Mapping[str, Any], wanted: str) -> bool:
    for want in wanted.split(","):
        system, bar, value = want.rpartition("|")
        for ident in resource.get("identifier") or []:
            if not isinstance(ident, dict) or ident.get("value") != value:
                continue
            if not bar or ident.get("system") == system:
                return True
    return False


def _matches_updated(updated: datetime, conditions: list[str]) -> bool:
    for condition in conditions:
        prefix, rest = (
            (condition[:2], condition[2:]) if condition[:2] in _PREFIXES else ("eq", condition)
        )
        when = _parse_instant(rest)
        ok = {
            "gt": updated > when,
            "ge": updated >= when,
            "lt": updated < when,
            "le": updated <= when,
            "eq": abs(updated - when) < timedelta(milliseconds=1),
        }[prefix]
        if not ok:
            return False
    return True


class _Store:
    """The resources and their versions, behind one lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tasks: dict[str, list[_Version]] = {}
        self.log: list[_Entry] = []
        self.next_id = 1
        self.last_time = datetime.fromtimestamp(0, UTC)

    def _now(self) -> datetime:
        now = datetime.now(UTC)
        now = now.replace(microsecond=now.microsecond // 1000 * 1000)
        if now <= self.last_time:  # strictly increasing, as one HAPI node writes
            now = self.last_time + timedelta(milliseconds=1)
        self.last_time = now
        return now

    def current(self, task_id: str) -> _Version | None:
        versions = self.tasks.get(task_id)
        return versions[-1] if versions else None

    def write(self, task_id: str, resource: dict[str, Any] | None) -> _Version:
        versions = self.tasks.setdefault(task_id, [])
        number = versions[-1].number + 1 if versions else 1
        now = self._now()
        stored: dict[str, Any] | None = None
        if resource is not None:
            stored = copy.deepcopy(resource)
            stored["id"] = task_id
            meta = dict(stored.get("meta") or {})
            meta["versionId"] = str(number)
            meta["lastUpdated"] = _instant(now)
            stored["meta"] = meta
        version = _Version(number, now, stored)
        versions.append(version)
        self.log.append(_Entry(task_id, version))
        return version

    def live(self) -> list[tuple[str, _Version]]:
        return [
            (task_id, versions[-1])
            for task_id, versions in self.tasks.items()
            if versions[-1].resource is not None
        ]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    timeout = 60
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return

    def _send(self, status: int, body: object, headers: Mapping[str, str] | None = None) -> None:
        payload = json.dumps(body, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/fhir+json;charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def _body(self) -> dict[str, Any]:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise _Answer(400, "bad Content-Length") from None
        if length > _MAX_BODY:
            raise _Answer(413, "body too large")
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw)
        except ValueError:
            raise _Answer(400, "HAPI-0450: Failed to parse request body as JSON resource") from None
        if not isinstance(body, dict) or body.get("resourceType") != "Task":
            raise _Answer(
                400, 'HAPI-0450: Incorrect resource type found, expected "Task"', "invalid"
            )
        for element in ("status", "intent"):
            if element not in body:
                raise _Answer(
                    400, f"Task.{element}: minimum required = 1, but only found 0", "required"
                )
        return body

    def _dispatch(self, method: str) -> None:
        owner = self.server.owner
        try:
            with owner.stats_lock:
                owner.requests += 1
                owner.writes += method in ("PUT", "POST", "DELETE")
            if owner.token is not None and (
                self.headers.get("Authorization") != f"Bearer {owner.token}"
            ):
                raise _Answer(401, "HAPI-0644: Missing or invalid bearer token", "login")
            url = urlsplit(self.path)
            base = owner.base_path
            if not url.path.startswith(base + "/"):
                raise _Answer(404, f"Unknown path {url.path}", "not-found")
            parts = url.path[len(base) + 1 :].split("/")
            query = parse_qsl(url.query, keep_blank_values=True)
            status, body, headers = owner.handle(method, parts, query, self)
        except _Answer as answer:
            status, body, headers = answer.status, _outcome(answer.text, answer.code), {}
        self._send(status, body, headers)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")


class _HTTPServer(LoopbackHTTPServer):
    owner: HapiLikeFhirServer


Answer = tuple[int, object, dict[str, str]]


class HapiLikeFhirServer:
    """A HAPI-like FHIR R4 Task server on 127.0.0.1 (see the module docstring).

    ``with HapiLikeFhirServer() as server: server.url`` is
    ``http://127.0.0.1:<port>/fhir/R4``.
    """

    def __init__(self, *, port: int = 0, token: str | None = None, client_ids: bool = True) -> None:
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValidationError.single("port", "not a TCP port", port, allowed="0-65535")
        if not isinstance(client_ids, bool):
            raise ValidationError.single("client_ids", "expected True or False", client_ids)
        self.base_path = "/fhir/R4"
        self.token = token
        self.client_ids = client_ids
        self.requests = 0
        self.writes = 0
        self.stats_lock = threading.Lock()
        self._store = _Store()
        try:
            self._httpd = _HTTPServer(("127.0.0.1", port), _Handler)
        except OSError as exc:
            raise ValidationError.single(
                "port", f"cannot listen on 127.0.0.1 port {port}: {exc.strerror or exc}"
            ) from None
        self._httpd.owner = self
        self.port: int = self._httpd.server_address[1]
        self._thread: threading.Thread | None = None
        self._stopped = False

    @property
    def url(self) -> str:
        """The FHIR base, ``http://127.0.0.1:<port>/fhir/R4``."""
        return f"http://127.0.0.1:{self.port}{self.base_path}"

    def start(self) -> HapiLikeFhirServer:
        """Serve on a background thread; returns self."""
        if self._stopped:
            raise ServerStoppedError("a stopped FHIR server cannot start again")
        if self._thread is None:
            self._thread = serve_in_thread(self._httpd, "clinik-hapi-like-fhir")
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (twice is harmless)."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()
        self._stopped = True

    def __enter__(self) -> HapiLikeFhirServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- the test API ----------------------------------------------------------------

    def tasks(self) -> dict[str, dict[str, Any]]:
        """Every Task not deleted, by its server id (copies)."""
        with self._store.lock:
            return {
                task_id: copy.deepcopy(version.resource)
                for task_id, version in self._store.live()
                if version.resource is not None
            }

    def history(self, task_id: str) -> list[dict[str, Any] | None]:
        """Every version of one Task, oldest first (None for a deletion)."""
        with self._store.lock:
            return [copy.deepcopy(v.resource) for v in self._store.tasks.get(task_id, [])]

    def put_task(self, resource: Mapping[str, Any]) -> dict[str, Any]:
        """A write by another client (no If-Match): the stored resource."""
        with self._store.lock:
            version = self._store.write(str(resource["id"]), dict(resource))
            assert version.resource is not None
            return copy.deepcopy(version.resource)

    def delete_task(self, task_id: str) -> None:
        """A deletion by another client."""
        with self._store.lock:
            self._store.write(task_id, None)

    # --- requests ----------------------------------------------------------------------

    def handle(
        self, method: str, parts: list[str], query: list[tuple[str, str]], handler: _Handler
    ) -> Answer:
        """Route one request (under the store's lock: HAPI serialises writes per resource)."""
        if parts == ["metadata"] and method == "GET":
            return 200, self._capabilities(), {}
        if not parts or parts[0] != "Task":
            raise _Answer(
                404,
                f"HAPI-0302: Unknown resource type '{parts[0] if parts else ''}'",
                "not-supported",
            )
        rest = parts[1:]
        with self._store.lock:
            if method == "GET" and not rest:
                return 200, self._search(query), {}
            if method == "GET" and rest == ["_history"]:
                return 200, self._type_history(query), {}
            if method == "POST" and not rest:
                return self._create(handler._body(), handler.headers.get("If-None-Exist"))
            if len(rest) == 0 or not _FHIR_ID.fullmatch(rest[0]):
                raise _Answer(400, "HAPI-0521: Invalid resource ID", "invalid")
            task_id = rest[0]
            if method == "GET" and len(rest) == 1:
                return self._read(task_id)
            if method == "GET" and len(rest) in (2, 3) and rest[1] == "_history":
                return self._instance_history(task_id, rest[2] if len(rest) == 3 else None)
            if method == "PUT" and len(rest) == 1:
                return self._update(task_id, handler._body(), handler.headers.get("If-Match"))
            if method == "DELETE" and len(rest) == 1:
                return self._delete(task_id, handler.headers.get("If-Match"))
        raise _Answer(405, f"HAPI-0460: {method} is not supported here", "not-supported")

    def _headers(self, task_id: str, version: _Version, created: bool = False) -> dict[str, str]:
        headers = {
            "ETag": f'W/"{version.number}"',
            "Last-Modified": version.updated.strftime("%a, %d %b %Y %H:%M:%S GMT"),
        }
        if created:
            headers["Location"] = f"{self.url}/Task/{task_id}/_history/{version.number}"
        return headers

    def _read(self, task_id: str) -> Answer:
        version = self._store.current(task_id)
        if version is None:
            raise _Answer(404, f"HAPI-2001: Resource Task/{task_id} is not known", "not-found")
        if version.resource is None:
            raise _Answer(
                410,
                f"HAPI-2244: Resource was deleted at {_instant(version.updated)}",
                "deleted",
            )
        return 200, version.resource, self._headers(task_id, version)

    def _check_match(self, task_id: str, current: _Version, if_match: str) -> None:
        match = _ETAG.fullmatch(if_match)
        wanted = match.group(1) if match else if_match
        if wanted != str(current.number):
            raise _Answer(
                409,
                f"HAPI-0989: Trying to update Task/{task_id}/_history/{wanted} but this is "
                "not the current version",
                "conflict",
            )

    def _update(self, task_id: str, body: dict[str, Any], if_match: str | None) -> Answer:
        if body.get("id") != task_id:
            raise _Answer(
                400,
                "HAPI-0420: Can not update resource, resource body must contain an ID element "
                "which matches the request URL for update (PUT) operation",
                "invalid",
            )
        current = self._store.current(task_id)
        if current is None and not self.client_ids:
            raise _Answer(
                404,
                f"HAPI-0959: No resource exists on this server resource with ID[{task_id}], "
                "and client-assigned IDs are not enabled.",
                "not-found",
            )
        if if_match is not None:
            if current is None:
                raise _Answer(404, f"HAPI-2001: Resource Task/{task_id} is not known", "not-found")
            self._check_match(task_id, current, if_match)
        created = current is None or current.resource is None
        version = self._store.write(task_id, body)
        return (201 if created else 200), version.resource, self._headers(task_id, version, created)

    def _create(self, body: dict[str, Any], if_none_exist: str | None) -> Answer:
        if if_none_exist is not None:
            params = parse_qsl(if_none_exist, keep_blank_values=True)
            found = self._matching(params)
            if len(found) > 1:
                raise _Answer(
                    412,
                    "HAPI-0958: Failed to CREATE resource with match URL because this "
                    "search matched 2 resources",
                    "duplicate",
                )
            if found:
                task_id, version = found[0]
                return 200, version.resource, self._headers(task_id, version)
        task_id = str(self._store.next_id)
        self._store.next_id += 1
        while task_id in self._store.tasks:
            task_id = str(self._store.next_id)
            self._store.next_id += 1
        version = self._store.write(task_id, body)
        return 201, version.resource, self._headers(task_id, version, created=True)

    def _delete(self, task_id: str, if_match: str | None) -> Answer:
        current = self._store.current(task_id)
        if current is None:
            raise _Answer(404, f"HAPI-2001: Resource Task/{task_id} is not known", "not-found")
        if current.resource is None:
            return (
                200,
                _outcome("Successfully deleted 0 resource(s)", "informational", "information"),
                {},
            )
        if if_match is not None:
            self._check_match(task_id, current, if_match)
        version = self._store.write(task_id, None)
        headers = {"ETag": f'W/"{version.number}"'}
        return (
            200,
            _outcome("Successfully deleted 1 resource(s)", "informational", "information"),
            headers,
        )

    def _instance_history(self, task_id: str, number: str | None) -> Answer:
        versions = self._store.tasks.get(task_id)
        if not versions:
            raise _Answer(404, f"HAPI-2001: Resource Task/{task_id} is not known", "not-found")
        if number is not None:
            for version in versions:
                if str(version.number) == number and version.resource is not None:
                    return 200, version.resource, self._headers(task_id, version)
            raise _Answer(
                404, f"HAPI-0979: Version {number} of Task/{task_id} is not known", "not-found"
            )
        entries = [self._history_entry(task_id, v) for v in reversed(versions)]
        return 200, self._bundle("history", entries, len(entries)), {}

    def _history_entry(self, task_id: str, version: _Version) -> dict[str, Any]:
        url = f"Task/{task_id}/_history/{version.number}"
        entry: dict[str, Any] = {"fullUrl": f"{self.url}/Task/{task_id}"}
        if version.resource is None:
            entry["request"] = {"method": "DELETE", "url": url}
            entry["response"] = {
                "status": "204 No Content",
                "etag": f'W/"{version.number}"',
                "lastModified": _instant(version.updated),
            }
        else:
            first = version.number == 1
            entry["resource"] = version.resource
            entry["request"] = {"method": "POST" if first else "PUT", "url": url}
            entry["response"] = {
                "status": "201 Created" if first else "200 OK",
                "etag": f'W/"{version.number}"',
                "lastModified": _instant(version.updated),
            }
        return entry

    def _type_history(self, query: list[tuple[str, str]]) -> dict[str, Any]:
        since: datetime | None = None
        count = 100
        offset = 0
        for key, value in query:
            if key == "_since":
                since = _parse_instant(value)
            elif key == "_count":
                count = self._int(value, "_count")
            elif key == "_offset":
                offset = self._int(value, "_offset")
            else:
                raise _Answer(400, f"HAPI-0524: Unknown parameter '{key}' for _history")
        log = [e for e in self._store.log if since is None or e.version.updated >= since]
        log.reverse()
        page = log[offset : offset + count]
        entries = [self._history_entry(e.task_id, e.version) for e in page]
        bundle = self._bundle("history", entries, len(log))
        if offset + count < len(log):
            rest = [(k, v) for k, v in query if k != "_offset"]
            rest.append(("_offset", str(offset + count)))
            link = "&".join(f"{k}={quote(v, safe=':')}" for k, v in rest)
            bundle["link"] = [{"relation": "next", "url": f"{self.url}/Task/_history?{link}"}]
        return bundle

    @staticmethod
    def _int(value: str, name: str) -> int:
        if not value.isdigit():
            raise _Answer(400, f"HAPI-1935: Invalid {name} value: {value}")
        return int(value)

    def _matching(self, query: list[tuple[str, str]]) -> list[tuple[str, _Version]]:
        updated: list[str] = []
        found = self._store.live()
        for key, value in query:
            if key not in _SEARCH_PARAMS:
                raise _Answer(400, f'HAPI-0524: Unknown search parameter "{key}"')
            if key == "_lastUpdated":
                updated.append(value)
            elif key == "identifier":
                found = [f for f in found if _matches_identifier(f[1].resource or {}, value)]
            elif key == "_id":
                found = [f for f in found if f[0] in value.split(",")]
            elif key in ("owner", "requester"):
                found = [f for f in found if _matches_reference(f[1].resource or {}, key, value)]
            elif key == "patient":
                found = [f for f in found if _matches_reference(f[1].resource or {}, "for", value)]
            elif key in ("status", "priority"):
                found = [f for f in found if (f[1].resource or {}).get(key) in value.split(",")]
            elif key == "code":
                found = [f for f in found if _matches_code(f[1].resource or {}, value)]
        if updated:
            found = [f for f in found if _matches_updated(f[1].updated, updated)]
        return found

    def _search(self, query: list[tuple[str, str]]) -> dict[str, Any]:
        found = self._matching(query)
        params = dict(query)
        sort = params.get("_sort")
        if sort in ("_lastUpdated", "-_lastUpdated"):
            found.sort(key=lambda f: (f[1].updated, f[0]), reverse=sort.startswith("-"))
        elif sort is not None:
            raise _Answer(400, f'HAPI-1437: Unknown _sort parameter value "{sort}"')
        count = self._int(params.get("_count", "20"), "_count")
        offset = self._int(params.get("_offset", "0"), "_offset")
        page = found[offset : offset + count]
        entries = [
            {
                "fullUrl": f"{self.url}/Task/{task_id}",
                "resource": version.resource,
                "search": {"mode": "match"},
            }
            for task_id, version in page
        ]
        bundle = self._bundle("searchset", entries, len(found))
        if offset + count < len(found):
            rest = [(k, v) for k, v in query if k != "_offset"]
            rest.append(("_offset", str(offset + count)))
            link = "&".join(f"{k}={quote(v, safe=':,|/')}" for k, v in rest)
            bundle["link"] = [{"relation": "next", "url": f"{self.url}/Task?{link}"}]
        return bundle

    @staticmethod
    def _bundle(kind: str, entries: list[dict[str, Any]], total: int) -> dict[str, Any]:
        bundle: dict[str, Any] = {"resourceType": "Bundle", "type": kind, "total": total}
        if entries:
            bundle["entry"] = entries
        return bundle

    @staticmethod
    def _capabilities() -> dict[str, Any]:
        return {
            "resourceType": "CapabilityStatement",
            "status": "active",
            "kind": "instance",
            "fhirVersion": "4.0.1",
            "format": ["json"],
            "software": {"name": "clinik-local HAPI-like test server"},
            "rest": [{"mode": "server", "resource": [{"type": "Task", "versioning": "versioned"}]}],
        }
