"""``FhirR4Remote``: the outbox delivered to a FHIR R4 server (Medplum, HAPI FHIR, ...).

The second remote behind :class:`~.base.Remote`. A FHIR server has no idempotency keys,
answers a stale ``If-Match`` with ``412`` (Medplum) or ``409`` (HAPI-0989), and keeps its
own opaque versions (UUIDs on Medplum, integers on HAPI) in ``ETag: W/"<v>"``. How one
change goes on the wire:

- **create** (a task the server never acknowledged): ``PUT /Task/<server id>``
  (update-as-create with the deterministic id of :func:`server_task_id`); or, with
  ``create="conditional"`` for servers that refuse client ids, ``POST /Task`` with
  ``If-None-Exist: identifier=urn:clinik-local:id|<our id>``;
- **update**: ``PUT /Task/<server id>`` with ``If-Match: W/"<versionId>"``;
- **delete**: ``DELETE /Task/<server id>`` with ``If-Match``; ``404``/``410`` (already
  gone) is delivered.

The body is ``to_fhir(task, "R4")`` with the server id, the references mapped
(``reference_map``, below), and the change id and content hash in extensions.

Exactly once without keys: every version we write carries its change id and the
SHA-256 of its content (:data:`CONTENT_HASH_URL`), so a retry after a lost answer
recognises its own write (:func:`written_by`: our change id, and content that still
hashes to what that change wrote, so that another client's edit keeping our extensions
is not taken for ours). A retried update gets ``412``/``409`` (its ``If-Match`` is now
stale, our own write moved the version on); the remote then reads the server's task:
if it is our write (or our write is in the task's ``_history``) the change is
:class:`~.base.Delivered` with that version, otherwise it is a :class:`~.base.Conflict`
carrying the server's task (as a wire task, through :func:`~clinik_local.fhir.from_fhir`).
A create is never made twice: a ``PUT`` by the deterministic id writes the same resource
again, and ``If-None-Exist`` finds the first one.

Other answers: ``401`` asks the token provider once more, then is
:class:`~.base.AuthFailed`; ``408``/``425``/``429``/``5xx`` and network failures are
:class:`~.base.Transient` (``Retry-After`` honoured); no connection at all is
:class:`~.base.Unreachable`; any other ``4xx`` (and a ``409`` that is not about versions)
is :class:`~.base.Refused` carrying the OperationOutcome's text.

Ids. FHIR ids are ``[A-Za-z0-9.-]{1,64}``; ours may also hold ``_``.
:func:`server_task_id` is injective on our ids: a reversible escape (``_`` -> ``-``,
``-`` -> ``.-``, ``.`` -> ``..``) when the result fits in 64 characters, else ``h.`` and
62 hex digits of the id's SHA-256 (a form the escape never produces: it never writes a
``.`` before a letter or digit). The identifier ``urn:clinik-local:id`` keeps our id on
the server either way, and :func:`task_id_from_server` reverses the escape.

References must name resources that exist on that server, so they are mapped by
``reference_map(field, our_id) -> server id`` (None: the default rule). ``field`` is the
wire field: ``patientId``, ``ownerId``, ``requesterId``, ``encounterId``, ``focusId``,
``basedOn``, ``partOf``, ``restriction.recipient``, ``input.valueReference``,
``output.valueReference``. The default: ``partOf`` names our own tasks, so it goes
through :func:`server_task_id`; any other id is used as it is when it is a valid FHIR
id, and otherwise the change is refused (:class:`~.base.Refused` with ``status`` None,
naming every such field; nothing is sent) rather than pushed as a hash no server knows.
:meth:`FhirR4Remote.check` makes the same refusal a ValidationError before anything is
written. On pull our identifier in a Reference gives our id back, unless another client
re-pointed the literal reference beside it: then the literal reference (the server's
id) wins, and the content hash (over the literal references too) keeps such a version
from being taken for ours.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from urllib.parse import quote

import attrs
import httpx

from ..codec import decode_task, encode_task
from ..errors import AuthError, FieldError, TransportError, ValidationError
from ..fhir import ID_SYSTEM, from_fhir, to_fhir
from ..ids import is_valid_id
from ..model import Task
from ..wire import without_server_fields
from .base import (
    AuthFailed,
    Change,
    ChangesOutcome,
    ChangesPage,
    Conflict,
    CursorExpired,
    Delivered,
    ListedPage,
    ListOutcome,
    LogItem,
    PushOutcome,
    Refused,
    Scope,
    Transient,
    Unreachable,
)
from .clinik import TRANSIENT_STATUSES, parse_retry_after
from .transport import (
    LazyTransport,
    Response,
    Transport,
    check_base_url,
    check_range,
    no_answer,
)

__all__ = [
    "CHANGE_ID_URL",
    "CONTENT_HASH_URL",
    "REFERENCE_FIELDS",
    "FhirR4Remote",
    "ReferenceMap",
    "content_hash",
    "default_reference",
    "server_task_id",
    "task_id_from_server",
    "written_by",
]

#: Extension url (on the Task) carrying the change id of the local change that wrote it.
CHANGE_ID_URL = "urn:clinik-local:change-id"
#: Extension url (on the Task) carrying the SHA-256 of the content that change wrote, so
#: that a later edit by another client keeping our extensions is not taken for ours.
CONTENT_HASH_URL = "urn:clinik-local:content-sha256"
#: The fields ``reference_map`` is asked about.
REFERENCE_FIELDS = (
    "patientId",
    "ownerId",
    "requesterId",
    "encounterId",
    "focusId",
    "basedOn",
    "partOf",
    "restriction.recipient",
    "input.valueReference",
    "output.valueReference",
)

#: ``reference_map(field, our_id)``: the server's id of what ``our_id`` names, or None
#: for the default rule (:func:`default_reference`).
ReferenceMap = Callable[[str, str], str | None]
CreateMode = Literal["put", "conditional"]

_FHIR_ID = re.compile(r"[A-Za-z0-9.\-]{1,64}")
_ESCAPE = str.maketrans({".": "..", "-": ".-", "_": "-"})
_HASHED = re.compile(r"h\.[0-9a-f]{62}")
_FHIR_JSON = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
_ETAG = re.compile(r'\s*(?:W/)?"([^"]*)"\s*')
#: The type and id of a literal reference (relative, versioned, or an absolute URL).
_LITERAL_ID = re.compile(
    r"(?:.*/)?(?P<type>[A-Z][A-Za-z]*)/(?P<id>[A-Za-z0-9.\-]{1,64})(?:/_history/[^/]+)?"
)
# wire field -> FHIR element of the references to_fhir writes (one or a list)
_SINGLE_REFS = {
    "for": "patientId",
    "owner": "ownerId",
    "requester": "requesterId",
    "encounter": "encounterId",
    "focus": "focusId",
}
_LIST_REFS = {"basedOn": "basedOn", "partOf": "partOf"}
#: Words of an OperationOutcome that make a 409 a version conflict (HAPI-0989 and kin).
_VERSION_CONFLICT = re.compile(r"HAPI-0989|version|precondition|stale", re.IGNORECASE)
_HISTORY_COUNT = 100
#: At most this many pages of type-level history per change-log page (else: relist).
_HISTORY_PAGES = 20
#: Scope filters naming references: the FHIR search parameter and the type we write.
_SCOPE_REFERENCES = {
    "patientId": ("patient", "Patient"),
    "ownerId": ("owner", "Practitioner"),
    "requesterId": ("requester", "Practitioner"),
}
_log = logging.getLogger(__name__)

#: At most this many (id, version) pairs are kept in a log cursor's overlap window; past
#: it, the window shrinks to whole ``_lastUpdated`` instants (a floor no read goes under).
_MAX_SEEN = 200
_CURSOR_PREFIX = "fhir1."


class _BadCursor(Exception):
    """A cursor this remote did not make (or from an older version of it)."""


def _b64(data: object) -> str:
    raw = json.dumps(data, separators=(",", ":")).encode()
    return _CURSOR_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> Any:
    if not isinstance(text, str) or not text.startswith(_CURSOR_PREFIX):
        raise _BadCursor("not a cursor of the FHIR remote")
    body = text[len(_CURSOR_PREFIX) :]
    try:
        return json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (ValueError, binascii.Error):
        raise _BadCursor("a damaged cursor of the FHIR remote") from None


def _instant_or_none(data: dict[str, Any], *keys: str) -> bool:
    """Whether each of ``keys`` (default ``at``) of a decoded cursor is text or None."""
    return all(isinstance(data.get(k), (str, type(None))) for k in keys or ("at",))


@attrs.frozen
class _ListCursor:
    """Where a listing goes on: the last ``_lastUpdated`` listed and the ids listed at it."""

    at: str | None = None
    ids: tuple[str, ...] = ()

    def encode(self) -> str:
        return _b64({"k": "list", "at": self.at, "ids": list(self.ids)})

    @classmethod
    def decode(cls, text: str) -> _ListCursor:
        data = _unb64(text)
        if not (isinstance(data, dict) and data.get("k") == "list" and _instant_or_none(data)):
            raise _BadCursor("not a listing cursor of the FHIR remote")
        try:
            return cls(at=data["at"], ids=tuple(str(i) for i in data["ids"]))
        except (KeyError, TypeError):
            raise _BadCursor("not a listing cursor of the FHIR remote") from None


@attrs.frozen
class _LogCursor:
    """The watermark of the log: the newest ``_lastUpdated`` applied (``at``), the
    versions seen in the overlap window before it (``seen``: server id, versionId,
    lastUpdated), the instant no read goes under (``floor``), and when the scope was
    last listed in full (``reconciled``, seconds since the epoch on this device)."""

    at: str | None
    seen: tuple[tuple[str, str, str], ...]
    reconciled: float
    floor: str | None = None

    def encode(self) -> str:
        return _b64(
            {
                "k": "log",
                "at": self.at,
                "seen": [list(s) for s in self.seen],
                "r": self.reconciled,
                "floor": self.floor,
            }
        )

    @classmethod
    def decode(cls, text: str) -> _LogCursor:
        data = _unb64(text)
        if not (
            isinstance(data, dict)
            and data.get("k") == "log"
            and _instant_or_none(data, "at", "floor")
        ):
            raise _BadCursor("not a change-log cursor of the FHIR remote")
        try:
            seen = tuple((str(a), str(b), str(c)) for a, b, c in data["seen"])
            return cls(at=data["at"], seen=seen, reconciled=float(data["r"]), floor=data["floor"])
        except (KeyError, TypeError, ValueError):
            raise _BadCursor("not a change-log cursor of the FHIR remote") from None


def _instant_key(text: str) -> datetime:
    """A FHIR instant as an aware datetime, for ordering (``Z`` and offsets alike)."""
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _minus(text: str, seconds: float) -> str:
    """The instant ``seconds`` before a FHIR instant, as a UTC FHIR instant (ms)."""
    when = _instant_key(text) - timedelta(seconds=seconds)
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def _later(a: str | None, b: str | None) -> str | None:
    """The later of two FHIR instants; an absent or empty one (a Task the server sent
    without ``meta.lastUpdated``) never moves a watermark."""
    if not a or not b:
        return a or b or None
    return a if _instant_key(a) >= _instant_key(b) else b


def _updated(resource: Mapping[str, Any]) -> str:
    """``meta.lastUpdated``, or "" when absent or no instant (it never enters a cursor)."""
    meta = resource.get("meta")
    value = meta.get("lastUpdated") if isinstance(meta, dict) else None
    if not isinstance(value, str):
        return ""
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return ""
    return value


def _version_of(resource: Mapping[str, Any]) -> str:
    meta = resource.get("meta")
    value = meta.get("versionId") if isinstance(meta, dict) else None
    return "" if value is None else str(value)


def server_task_id(our_id: str) -> str:
    """The FHIR id of our task ``our_id`` on the server (deterministic and injective).

    The escape (``_`` -> ``-``, ``-`` -> ``.-``, ``.`` -> ``..``) when it fits in 64
    characters, else ``h.`` + 62 hex digits of SHA-256: ``task_01J9...`` ->
    ``task-01J9...``.
    """
    escaped = our_id.translate(_ESCAPE)
    if len(escaped) <= 64:
        return escaped
    return "h." + hashlib.sha256(our_id.encode()).hexdigest()[:62]


def task_id_from_server(server_id: str) -> str | None:
    """Our id of a server id :func:`server_task_id` escaped; None for a hash or a foreign id.

    A hashed id has no way back: the task's identifier ``urn:clinik-local:id`` has it.
    """
    if _HASHED.fullmatch(server_id):
        return None
    out: list[str] = []
    chars = iter(server_id)
    for char in chars:
        if char == "-":
            out.append("_")
        elif char == ".":
            following = next(chars, "")
            if following not in (".", "-"):
                return None
            out.append(following)
        else:
            out.append(char)
    return "".join(out)


def default_reference(field: str, our_id: str) -> str | None:
    """The default rule: ``partOf`` through :func:`server_task_id`, else a valid FHIR id
    as it is; None when ``our_id`` cannot name anything on a FHIR server."""
    if field == "partOf":
        return server_task_id(our_id)
    return our_id if _FHIR_ID.fullmatch(our_id) else None


def _etag_version(value: str | None) -> str | None:
    match = _ETAG.fullmatch(value) if value else None
    return match.group(1) if match else None


def _not_sent(exc: ValidationError) -> Refused:
    """A request this remote could not even build (nothing was sent), as a refusal."""
    return Refused(status=None, body=None, error="; ".join(str(e) for e in exc.errors))


def _json(text: str) -> Any:
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def _outcome_text(body: str) -> str:
    """The text of an OperationOutcome (diagnostics, details, expression), or the body."""
    data = _json(body)
    if isinstance(data, dict) and data.get("resourceType") == "OperationOutcome":
        parts: list[str] = []
        for issue in data.get("issue") or []:
            if not isinstance(issue, dict):
                continue
            details = issue.get("details")
            text = issue.get("diagnostics") or (
                details.get("text") if isinstance(details, dict) else None
            )
            where = issue.get("expression") or issue.get("location")
            piece = str(text or issue.get("code") or "error")
            if isinstance(where, list) and where:
                piece += f" ({', '.join(str(w) for w in where)})"
            parts.append(piece)
        if parts:
            return "; ".join(parts)[:500]
    return body[:500]


def _extension(resource: Mapping[str, Any], url: str) -> str | None:
    for ext in resource.get("extension") or []:
        if isinstance(ext, dict) and ext.get("url") == url:
            value = ext.get("valueString")
            return value if isinstance(value, str) else None
    return None


def content_hash(wire: Mapping[str, Any], references: tuple[str, ...] = ()) -> str:
    """SHA-256 (hex) of a wire task's content: no server fields, canonical JSON; and the
    literal references the resource carried (``Patient/9001``, in :func:`_references`
    order), so that another client re-pointing a reference is not taken for our write."""
    canonical = json.dumps(
        without_server_fields(wire), sort_keys=True, ensure_ascii=False, separators=(",", ":")
    )
    if references:
        canonical += "\n" + json.dumps(list(references), separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _references(resource: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every Reference of a Task (our mapping's elements), with the wire field it is:
    ``for`` -> ``patientId`` ... in one fixed order."""
    for element, field in _SINGLE_REFS.items():
        ref = resource.get(element)
        if isinstance(ref, dict):
            yield field, ref
    for element, field in _LIST_REFS.items():
        for ref in _dicts(resource.get(element)):
            yield field, ref
    restriction = resource.get("restriction")
    if isinstance(restriction, dict):
        for ref in _dicts(restriction.get("recipient")):
            yield "restriction.recipient", ref
    for key in ("input", "output"):
        for item in _dicts(resource.get(key)):
            ref = item.get("valueReference")
            if isinstance(ref, dict):
                yield f"{key}.valueReference", ref


def _dicts(value: object) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _literal_references(resource: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(str(ref.get("reference", "")) for _, ref in _references(resource))


def _wire_references(wire: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """The ids a wire task (or request) refers to, with their field (``reference_map``'s
    names); values that are not strings are left to the task's own validation."""
    for field in ("patientId", "ownerId", "requesterId", "encounterId", "focusId"):
        value = wire.get(field)
        if isinstance(value, str):
            yield field, value
    for field in ("basedOn", "partOf"):
        values = wire.get(field)
        for value in values if isinstance(values, list) else ():
            if isinstance(value, str):
                yield field, value
    restriction = wire.get("restriction")
    recipients = restriction.get("recipient") if isinstance(restriction, Mapping) else None
    for value in recipients if isinstance(recipients, list) else ():
        if isinstance(value, str):
            yield "restriction.recipient", value
    for key in ("input", "output"):
        items = wire.get(key)
        for item in items if isinstance(items, list) else ():
            value = item.get("valueReference") if isinstance(item, Mapping) else None
            if isinstance(value, str):
                yield f"{key}.valueReference", value


def written_by(resource: Mapping[str, Any]) -> str | None:
    """The change id of the local change that wrote this server version, else None.

    A version is ours when it carries our change id and its content is still what that
    change wrote (the content hash beside it, over the task and its literal
    references): a client that edits the task and keeps our extensions makes a version
    that is not ours.
    """
    change_id = _extension(resource, CHANGE_ID_URL)
    recorded = _extension(resource, CONTENT_HASH_URL)
    if change_id is None or recorded is None:
        return None
    try:
        wire = _wire_of(resource)
    except ValidationError:
        return None
    return change_id if content_hash(wire, _literal_references(resource)) == recorded else None


def _wire_of(resource: Mapping[str, Any]) -> dict[str, Any]:
    """A server Task as our wire task (ValidationError if it does not describe one)."""
    return encode_task(from_fhir(resource))


def _content(wire: Mapping[str, Any]) -> dict[str, Any]:
    return without_server_fields(wire)


class FhirR4Remote:
    """A FHIR R4 server at ``base_url`` (``https://host/fhir/R4``), one Transport per remote.

    ``create``: ``"put"`` (update-as-create with the client's id, the default) or
    ``"conditional"`` (``POST`` + ``If-None-Exist``; the server's id is then looked up
    by identifier and remembered). ``reference_map``: see the module docstring.
    ``lanes``: keep-alive connections, one per sync lane (as ``SyncConfig.lanes``, 2 by
    default; a lane beyond them shares a connection). ``http_transport`` replaces the
    network, for tests.
    """

    def __init__(
        self,
        base_url: str,
        token_provider: Callable[[], str],
        *,
        create: CreateMode = "put",
        reference_map: ReferenceMap | None = None,
        overlap: float = 5.0,
        reconcile_every: float = 300.0,
        timeout: float = 10.0,
        allow_insecure_http: bool = False,
        ca_bundle: str | None = None,
        lanes: int = 2,
        http_transport: httpx.BaseTransport | None = None,
    ) -> None:
        if create not in ("put", "conditional"):
            raise ValidationError.single(
                "create", "unknown create mode", create, "put, conditional"
            )
        if reference_map is not None and not callable(reference_map):
            raise ValidationError.single(
                "reference_map", "must be a callable (field, our_id) -> server id", reference_map
            )
        for name, value in (("overlap", overlap), ("reconcile_every", reconcile_every)):
            check_range(name, value, 0, math.inf)  # inf: never
        self.base_url = check_base_url(base_url, allow_insecure_http)
        self.create = create
        self.overlap = float(overlap)
        self.reconcile_every = float(reconcile_every)
        self._history: bool | None = None  # has the server a type-level _history?
        self._reference_map = reference_map
        self._lanes = lanes
        self._connections = LazyTransport(
            self.base_url,
            token_provider,
            timeout=timeout,
            allow_insecure_http=allow_insecure_http,
            ca_bundle=ca_bundle,
            lanes=lanes,
            http_transport=http_transport,
        )
        self._lock = threading.Lock()  # guards _server_ids
        self._server_ids: dict[str, str] = {}  # conditional creates: our id -> server id

    def __repr__(self) -> str:  # no token here, ever
        return f"<FhirR4Remote {self.base_url}>"

    @staticmethod
    def service_of(base_url: str) -> str:
        """The service id of a FHIR server at ``base_url`` (what a store records)."""
        return f"fhir-r4 {base_url.rstrip('/')}"

    # --- connections -----------------------------------------------------------------

    def _get_transport(self) -> Transport:
        return self._connections.get()

    def close(self) -> None:
        """Close the connections; the next push opens new ones."""
        self._connections.close()

    def _request(
        self,
        method: str,
        path: str,
        lane: int,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """One request, asking the provider for a fresh token once on a 401.

        Raises TransportError / ConnectFailed / AuthError (mapped by :meth:`push`).
        """
        transport = self._get_transport()
        lane %= self._lanes
        all_headers = dict(_FHIR_JSON)
        if headers:
            all_headers.update(headers)
        answer = transport.request(method, path, body=body, headers=all_headers, lane=lane)
        if answer.status == 401:
            transport.refresh_token()
            answer = transport.request(method, path, body=body, headers=all_headers, lane=lane)
            if answer.status == 401:
                transport.forget_token()
        return answer

    # --- the push --------------------------------------------------------------------

    def push(self, change: Change, *, lane: int) -> PushOutcome:
        """Send one change (the module docstring has the mapping of answers)."""
        try:
            return self._push(change, lane)
        except ValidationError as exc:  # from fhir_resource: nothing was sent
            return _not_sent(exc)
        except (TransportError, AuthError) as exc:
            return no_answer(exc, self._get_transport())

    def _push(self, change: Change, lane: int) -> PushOutcome:
        version = change.server_version
        if version is None and change.known_on_server and change.op != "create":
            # A restored task: the server holds it at a version we don't know. Ask, and
            # write on that version only if the server's task is what we believe it is.
            asked = self._server_task(change.task_id, lane)
            if not isinstance(asked, tuple):
                if asked is not None:
                    return asked
                if change.op == "delete":
                    return Delivered(gone=True)
            else:
                resource, answer = asked
                server = self._conflict(resource, answer)
                if not isinstance(server, Conflict):
                    return server
                task = server.server_task or {}
                if change.base is None or without_server_fields(task) != without_server_fields(
                    change.base
                ):
                    return server  # changed on the server since the export: both kept
                version = _version_of(resource) or None
                change = attrs.evolve(change, server_version=version)
        if change.op == "delete":
            server_id = self._known_server_id(change.task_id, lane)
            if isinstance(server_id, Response):
                return self._failure(server_id)
            if server_id is None:
                return Delivered(gone=True)
            return self._delete(change, server_id, version, lane)
        body = self.fhir_resource(change)
        if change.op == "update" and version is not None:
            server_id = self._known_server_id(change.task_id, lane)
            if isinstance(server_id, Response):
                return self._failure(server_id)
            if server_id is None:  # conditional mode, and the server has no such task
                return Conflict(server_task=None, status=404, body=None)
            return self._update(change, server_id, body, version, lane)
        if self.create == "conditional":
            return self._conditional_create(change, body, lane)
        return self._update(change, body["id"], body, None, lane)

    def _update(
        self,
        change: Change,
        server_id: str,
        body: dict[str, Any],
        version: str | None,
        lane: int,
    ) -> PushOutcome:
        body = dict(body, id=server_id)
        headers = {} if version is None else {"If-Match": f'W/"{version}"'}
        answer = self._request(
            "PUT", f"/Task/{server_id}", lane, body=self._dumps(body), headers=headers
        )
        if 200 <= answer.status < 300:
            return self._delivered(answer)
        if self._is_version_conflict(answer) or (answer.status == 404 and version is not None):
            return self._recover(change, server_id, answer, lane)
        return self._failure(answer)

    def _conditional_create(self, change: Change, body: dict[str, Any], lane: int) -> PushOutcome:
        body = {k: v for k, v in body.items() if k != "id"}
        headers = {"If-None-Exist": f"identifier={ID_SYSTEM}|{change.task_id}"}
        answer = self._request("POST", "/Task", lane, body=self._dumps(body), headers=headers)
        if answer.status not in (200, 201):
            return self._failure(answer)
        resource = _json(answer.body)
        if not isinstance(resource, dict) or not isinstance(resource.get("id"), str):
            return Refused(
                status=answer.status, body=answer.body, error="the server sent no Task back"
            )
        with self._lock:
            self._server_ids[change.task_id] = resource["id"]
        if answer.status == 201 or written_by(resource) == change.change_id:
            return self._delivered(answer)
        # 200: a task with our identifier existed before, written by another change
        return self._conflict(resource, answer)

    def _delete(
        self, change: Change, server_id: str, version: str | None, lane: int
    ) -> PushOutcome:
        headers = {} if version is None else {"If-Match": f'W/"{version}"'}
        answer = self._request("DELETE", f"/Task/{server_id}", lane, headers=headers)
        if 200 <= answer.status < 300 or answer.status in (404, 410):
            with self._lock:
                self._server_ids.pop(change.task_id, None)
            return Delivered(gone=True)
        if self._is_version_conflict(answer):
            return self._recover(change, server_id, answer, lane)
        return self._failure(answer)

    def _recover(self, change: Change, server_id: str, refusal: Response, lane: int) -> PushOutcome:
        """After 412/409: our own earlier write (a lost answer), or a real conflict."""
        answer = self._request("GET", f"/Task/{server_id}", lane)
        if answer.status in (404, 410):
            if change.op == "delete":
                return Delivered(gone=True)
            return Conflict(server_task=None, status=refusal.status, body=refusal.body)
        if answer.status != 200:
            return self._failure(answer)
        current = _json(answer.body)
        if not isinstance(current, dict):
            return Transient(error="the server's task could not be read", status=answer.status)
        if change.op != "delete":
            if written_by(current) == change.change_id:
                return self._delivered(answer)
            ours = self._own_version(change, server_id, lane)
            if ours is not None:
                return ours
        return self._conflict(current, refusal)

    def _own_version(self, change: Change, server_id: str, lane: int) -> Delivered | None:
        """The oldest version in the task's ``_history`` that our change wrote, if any."""
        answer = self._request("GET", f"/Task/{server_id}/_history?_count={_HISTORY_COUNT}", lane)
        bundle = _json(answer.body) if answer.status == 200 else None
        if not isinstance(bundle, dict):
            return None
        found: dict[str, Any] | None = None
        for entry in bundle.get("entry") or []:
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if isinstance(resource, dict) and written_by(resource) == change.change_id:
                found = resource  # newest first: the last match is the oldest
        if found is None:
            return None
        return self._delivered_resource(found)

    def _server_task(
        self, task_id: str, lane: int
    ) -> tuple[dict[str, Any], Response] | PushOutcome | None:
        """The server's Task of ours (None: it has none), or why it can't be had."""
        server_id = self._known_server_id(task_id, lane)
        if isinstance(server_id, Response):
            return self._failure(server_id)
        if server_id is None:
            return None
        answer = self._request("GET", f"/Task/{server_id}", lane)
        if answer.status in (404, 410):
            return None
        resource = _json(answer.body) if answer.status == 200 else None
        if answer.status == 200 and not isinstance(resource, dict):
            return Transient(error="the server's task could not be read", status=200)
        if not isinstance(resource, dict):
            return self._failure(answer)
        return resource, answer

    def _known_server_id(self, task_id: str, lane: int) -> str | Response | None:
        """The server's id of our task: deterministic, or (conditional creates) looked up.

        A Response when the lookup failed; None when the server has no such task.
        """
        if self.create == "put":
            return server_task_id(task_id)
        with self._lock:
            known = self._server_ids.get(task_id)
        if known is not None:
            return known
        query = quote(f"{ID_SYSTEM}|{task_id}", safe=":")
        answer = self._request("GET", f"/Task?identifier={query}&_elements=id", lane)
        if answer.status != 200:
            return answer
        bundle = _json(answer.body)
        for entry in (bundle.get("entry") if isinstance(bundle, dict) else None) or []:
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if isinstance(resource, dict) and isinstance(resource.get("id"), str):
                with self._lock:
                    self._server_ids[task_id] = resource["id"]
                return str(resource["id"])
        return None

    # --- bodies ----------------------------------------------------------------------

    def fhir_resource(self, change: Change) -> dict[str, Any]:
        """The FHIR Task this remote sends for a create or update ``change``.

        ``to_fhir(task, "R4")`` with the server id, the references mapped, and the change
        id in an extension. ValidationError naming the field when a reference cannot be
        mapped (``push`` refuses such a change without sending anything).
        """
        task = decode_task(dict(change.body or {}, id=change.task_id))
        resource = to_fhir(task, "R4")
        resource["id"] = server_task_id(change.task_id)
        errors: list[FieldError] = []
        for field, ref in _references(resource):
            try:
                self._map(ref, field)
            except ValidationError as exc:
                errors += exc.errors
        if errors:
            raise ValidationError(errors)
        digest = content_hash(encode_task(task), _literal_references(resource))
        resource.setdefault("extension", []).extend(
            [
                {"url": CHANGE_ID_URL, "valueString": change.change_id},
                {"url": CONTENT_HASH_URL, "valueString": digest},
            ]
        )
        return resource

    def check(self, task: Task | Mapping[str, Any]) -> None:
        """Refuse, before anything is written, a task this server could not be sent.

        ``task`` is a :class:`~clinik_local.Task` or a wire request (what
        ``store.tasks.create`` takes). Raises ValidationError naming every reference
        field whose id is no FHIR id and that ``reference_map`` does not translate; the
        same check a push makes (a push of such a task is a dead letter naming the field,
        nothing sent). For apps that want the refusal at write time::

            remote.check(request)
            store.tasks.create(request)
        """
        wire: Mapping[str, Any] = encode_task(task) if isinstance(task, Task) else task
        if not isinstance(wire, Mapping):
            raise ValidationError.single("task", "expected a Task or a wire mapping", wire)
        errors: list[FieldError] = []
        for field, our_id in _wire_references(wire):
            try:
                self._server_ref(field, our_id)
            except ValidationError as exc:
                errors += exc.errors
        if errors:
            raise ValidationError(errors)

    def _server_ref(self, field: str, our_id: str) -> str:
        """The server's id for ``our_id`` in ``field``: ``reference_map``, else the
        default rule; ValidationError naming the field when neither gives a FHIR id."""
        mapped = None
        if self._reference_map is not None:
            try:
                mapped = self._reference_map(field, our_id)
            except Exception as exc:  # the app's callable: its failure names the field
                raise ValidationError.single(
                    field, f"reference_map failed for it: {type(exc).__name__}: {exc}", our_id
                ) from None
        if mapped is None:
            mapped = default_reference(field, our_id)
        if mapped is None:
            raise ValidationError.single(
                field,
                "is not a FHIR id, and reference_map gave no server id for it (pass "
                "reference_map= to FhirR4Remote to name the server's resource)",
                our_id,
                "[A-Za-z0-9.-]{1,64}",
            )
        if not isinstance(mapped, str) or not _FHIR_ID.fullmatch(mapped):
            raise ValidationError.single(
                field,
                f"reference_map gave {mapped!r} for {our_id!r}, which is not a FHIR id",
                mapped,
                "[A-Za-z0-9.-]{1,64}",
            )
        return mapped

    def _map(self, ref: dict[str, Any], field: str) -> None:
        mapped = self._server_ref(field, ref["identifier"]["value"])
        resource_type = ref["reference"].split("/", 1)[0]
        ref["reference"] = f"{resource_type}/{mapped}"

    @staticmethod
    def _dumps(resource: Mapping[str, Any]) -> bytes:
        return json.dumps(resource, ensure_ascii=False, separators=(",", ":")).encode()

    # --- the pull side ----------------------------------------------------------------

    @property
    def service(self) -> str:
        """Which service this is (recorded with the store's sync state)."""
        return self.service_of(self.base_url)

    def list_page(self, scope: Scope, cursor: str | None, limit: int) -> ListOutcome:
        """One page of the scope's current Tasks, oldest ``_lastUpdated`` first.

        The cursor is the ``_lastUpdated`` of the page's last Task and the ids sharing
        it (the next page asks ``ge`` that instant and skips them). The first page also
        reads the newest ``_lastUpdated`` of the scope: the change log starts there.
        """
        try:
            params = self._scope_params(scope)
            state = _ListCursor.decode(cursor) if cursor is not None else _ListCursor()
            changes_cursor: str | None = None
            if cursor is None:
                newest = self._search([*params, ("_sort", "-_lastUpdated"), ("_count", "1")])
                if not isinstance(newest, tuple):
                    return newest
                watermark = (_updated(newest[0][0]) or None) if newest[0] else None
                changes_cursor = _LogCursor(at=watermark, seen=(), reconciled=time.time()).encode()
            query = [*params, ("_sort", "_lastUpdated"), ("_count", str(limit + len(state.ids)))]
            if state.at is not None:
                query.append(("_lastUpdated", f"ge{state.at}"))
            found = self._search(query)
            if not isinstance(found, tuple):
                return found
        except _BadCursor as exc:
            return Refused(status=None, body=None, error=str(exc))
        except ValidationError as exc:
            return _not_sent(exc)
        except (TransportError, AuthError) as exc:
            return no_answer(exc, self._get_transport())
        resources, linked = found
        fresh = [r for r in resources if not (_updated(r) == state.at and r["id"] in state.ids)]
        tasks = tuple(t for t in (self._pulled(r) for r in fresh) if t is not None)
        more = (linked or len(resources) >= limit + len(state.ids)) and bool(fresh)
        next_cursor = None
        if more:
            last = _updated(fresh[-1])
            ids = [str(r["id"]) for r in fresh if _updated(r) == last]
            if last == state.at:
                ids = [*state.ids, *ids]  # one instant spans pages
            next_cursor = _ListCursor(at=last, ids=tuple(ids)).encode()
        return ListedPage(tasks=tasks, next_cursor=next_cursor, changes_cursor=changes_cursor)

    def changes_page(self, scope: Scope, since: str, limit: int) -> ChangesOutcome:
        """The scope's Tasks changed since the watermark in ``since``, oldest first.

        ``GET /Task?<scope>&_lastUpdated=ge<watermark - overlap>&_sort=_lastUpdated``;
        the versions the cursor lists as seen are dropped (the overlap re-reads them, to
        catch writes that committed late; de-duplication by id and versionId). Deletes
        come from ``GET /Task/_history?_since=`` where the server has a type-level
        history; else, and for tasks that left the scope, every ``reconcile_every``
        seconds the cursor expires and the engine lists the scope again (a bootstrap
        removes what the listing no longer shows).
        """
        try:
            state = _LogCursor.decode(since)
        except _BadCursor as exc:
            return CursorExpired(message=str(exc))
        if time.time() - state.reconciled >= self.reconcile_every:
            return CursorExpired(message="periodic reconciliation of the ids in scope")
        start = _minus(state.at, self.overlap) if state.at else None
        if start is not None and state.floor is not None:
            start = _later(start, state.floor)
        count = limit + len(state.seen)
        try:
            query = [*self._scope_params(scope), ("_sort", "_lastUpdated"), ("_count", str(count))]
            if start is not None:
                query.append(("_lastUpdated", f"ge{start}"))
            found = self._search(query)
            if not isinstance(found, tuple):
                return found
            resources, more = found
            deletes: list[tuple[str, str, str, str]] = []
            if self._has_history():
                gone = self._deletes(start)
                if not isinstance(gone, list):
                    return gone
                deletes = gone
        except ValidationError as exc:
            return _not_sent(exc)
        except (TransportError, AuthError) as exc:
            return no_answer(exc, self._get_transport())
        more = more or len(resources) >= count
        seen = {(s[0], s[1]) for s in state.seen}
        rows: list[tuple[str, str, str, LogItem | None]] = []  # (when, server id, version, item)
        for resource in resources:
            key = (str(resource.get("id")), _version_of(resource))
            if key in seen:
                continue
            task = self._pulled(resource)
            item = None
            if task is not None:
                item = LogItem(
                    task_id=str(task["id"]),
                    deleted=False,
                    task=task,
                    version=key[1] or None,
                    change_id=written_by(resource),
                )
            rows.append((_updated(resource), key[0], key[1], item))
        top = max((_instant_key(_updated(r)) for r in resources), default=None)
        for when, server_id, version, task_id in deletes:
            if (server_id, version) in seen or (
                more and top is not None and _instant_key(when) > top
            ):
                continue  # seen, or after this page's end (the next page brings it)
            item = LogItem(
                task_id=task_id,
                deleted=True,
                task=None,
                version=version,
                change_id=None,
                modified=when or None,
            )
            rows.append((when, server_id, version, item))
        rows.sort(key=lambda row: _instant_key(row[0]))
        watermark = state.at
        for row in rows:
            watermark = _later(watermark, row[0])
        floor = state.floor
        if more and not rows and resources:
            # a page of versions seen already: go past them (more of them share one
            # instant than a page holds, so the overlap cannot re-read them)
            watermark = _later(watermark, _updated(resources[-1]))
            floor = _updated(resources[-1])
        keep_from = _minus(watermark, self.overlap) if watermark else None
        window = [
            s
            for s in state.seen
            if keep_from is None or _instant_key(s[2]) >= _instant_key(keep_from)
        ]
        window += [(row[1], row[2], row[0]) for row in rows]
        if len(window) > _MAX_SEEN:
            window.sort(key=lambda s: _instant_key(s[2]))
            cut = window[-_MAX_SEEN][2]
            window = [s for s in window if _instant_key(s[2]) >= _instant_key(cut)]
            floor = _later(floor, cut)
        cursor = _LogCursor(
            at=watermark, seen=tuple(window), reconciled=state.reconciled, floor=floor
        )
        items = tuple(row[3] for row in rows if row[3] is not None)
        return ChangesPage(items=items, next_cursor=cursor.encode(), has_more=more)

    def _scope_params(self, scope: Scope) -> list[tuple[str, str]]:
        """A scope as FHIR search parameters (references mapped as pushes map them)."""
        params: list[tuple[str, str]] = []
        for name, values in sorted(scope.items()):
            if name in _SCOPE_REFERENCES:
                search, resource_type = _SCOPE_REFERENCES[name]
                mapped: list[str] = []
                for value in values:
                    ref: dict[str, Any] = {
                        "reference": f"{resource_type}/x",
                        "identifier": {"value": value},
                    }
                    self._map(ref, name)
                    mapped.append(str(ref["reference"]))
                params.append((search, ",".join(mapped)))
            else:
                params.append((name, ",".join(values)))
        return params

    def _search(
        self, query: list[tuple[str, str]]
    ) -> tuple[list[dict[str, Any]], bool] | Refused | Transient | AuthFailed | Unreachable:
        """A Task search: its resources in order, and whether the server says more follow.

        Raises TransportError / ConnectFailed / AuthError (mapped by the caller).
        """
        path = "/Task?" + "&".join(
            f"{quote(k, safe='_')}={quote(v, safe=',|/:')}" for k, v in query
        )
        answer = self._request("GET", path, 0)
        bundle = _json(answer.body) if answer.status == 200 else None
        if answer.status == 200 and not isinstance(bundle, dict):
            return Transient(error="the search answer is not a Bundle", status=200)
        if not isinstance(bundle, dict):
            failure = self._failure(answer)
            assert not isinstance(failure, (Delivered, Conflict))
            return failure
        resources = []
        for entry in _dicts(bundle.get("entry")):
            resource, search = entry.get("resource"), entry.get("search")
            mode = search.get("mode", "match") if isinstance(search, dict) else "match"
            if not (isinstance(resource, dict) and resource.get("resourceType") == "Task"):
                continue
            if mode != "match":
                continue
            if not isinstance(resource.get("id"), str):
                _log.warning("skipped a server Task without an id in a search answer")
                continue
            resources.append(resource)
        more = any(link.get("relation") == "next" for link in _dicts(bundle.get("link")))
        return resources, more

    def _pulled(self, resource: Mapping[str, Any]) -> dict[str, Any] | None:
        """A server Task as a wire task with our id, or None (logged) when it cannot be one.

        Our own Tasks carry our id in their identifier; a Task made on the server by
        another client gets the id :func:`task_id_from_server` reads from its server id
        (so that pushing it again goes to the same resource), and, without an
        ``authoredOn``, its ``meta.lastUpdated`` as one.
        """
        server_id = resource.get("id")
        if "authoredOn" not in resource and _updated(resource):
            # Another client's Task may lack authoredOn (0..1 in FHIR, required here):
            # its first known instant is the best there is.
            resource = dict(resource, authoredOn=_updated(resource))
        resource = self._without_stale_identifiers(resource)
        try:
            task = _wire_of(resource)
        except ValidationError as exc:
            _log.warning("skipped server Task %r: %s", server_id, exc)
            return None
        ours = [
            i
            for i in resource.get("identifier") or []
            if isinstance(i, dict) and i.get("system") == ID_SYSTEM
        ]
        if not ours:
            mapped = task_id_from_server(str(server_id)) if isinstance(server_id, str) else None
            if mapped is None or not is_valid_id(mapped):
                _log.warning(
                    "skipped server Task %r: its id does not map to one of ours", server_id
                )
                return None
            task["id"] = mapped
        return task

    def _without_stale_identifiers(self, resource: Mapping[str, Any]) -> Mapping[str, Any]:
        """The resource, with our identifier dropped from every Reference another client
        re-pointed (``owner.reference`` changed, the identifier we wrote kept beside it).

        Such a Reference's ``reference`` no longer names what our id maps to; it is the
        newer of the two, so it is what the pull reads (the server's id: there is no
        inverse of ``reference_map``). An id the map cannot translate keeps its identifier.
        """
        stale: set[int] = set()
        for field, ref in _references(resource):
            ident = ref.get("identifier")
            literal = _LITERAL_ID.fullmatch(str(ref.get("reference", "")))
            if not (isinstance(ident, dict) and ident.get("system") == ID_SYSTEM and literal):
                continue
            probe: dict[str, Any] = {
                "reference": f"{literal.group('type')}/x",
                "identifier": {"value": ident.get("value")},
            }
            try:
                self._map(probe, field)
            except ValidationError:  # no server id for ours: trust the identifier
                continue
            if probe["reference"].split("/", 1)[1] != literal.group("id"):
                stale.add(id(ref))
        if not stale:
            return resource
        copy: dict[str, Any] = json.loads(json.dumps(resource))
        for (_, ref), (_, original) in zip(_references(copy), _references(resource), strict=True):
            if id(original) in stale:
                ref.pop("identifier", None)
        return copy

    def _has_history(self) -> bool:
        """Whether the server has a type-level ``_history`` (asked once; Medplum has not).

        Raises TransportError (the caller's mapping) when it cannot be asked now.
        """
        if self._history is None:
            answer = self._request("GET", "/Task/_history?_count=1", 0)
            if answer.status in TRANSIENT_STATUSES or answer.status >= 500:
                raise TransportError(f"GET /Task/_history: HTTP {answer.status}")
            bundle = _json(answer.body) if answer.status == 200 else None
            self._history = isinstance(bundle, dict) and bundle.get("type") == "history"
        return self._history

    def _deletes(
        self, since: str | None
    ) -> (
        list[tuple[str, str, str, str]]
        | CursorExpired
        | Refused
        | Transient
        | AuthFailed
        | Unreachable
    ):
        """The deletions in the type-level history since ``since``: (when, server id,
        version, our id), oldest first, following the Bundle's ``next`` links. More than
        :data:`_HISTORY_PAGES` pages: CursorExpired (the engine lists the scope again,
        which finds every delete)."""
        query = f"_count={_HISTORY_COUNT}"
        if since is not None:
            query += f"&_since={quote(since, safe=':')}"
        path: str | None = f"/Task/_history?{query}"
        entries: list[dict[str, Any]] = []
        pages = 0
        while path is not None:
            pages += 1
            if pages > _HISTORY_PAGES:
                return CursorExpired(message="more writes than the history pages read: relist")
            answer = self._request("GET", path, 0)
            bundle = _json(answer.body) if answer.status == 200 else None
            if not isinstance(bundle, dict):
                if answer.status == 200:
                    return Transient(error="the history answer is not a Bundle", status=200)
                failure = self._failure(answer)
                assert not isinstance(failure, (Delivered, Conflict))
                return failure
            entries += _dicts(bundle.get("entry"))
            path = None
            for link in _dicts(bundle.get("link")):
                if link.get("relation") == "next":
                    url = str(link.get("url", ""))
                    if not url.startswith(self.base_url + "/"):
                        return CursorExpired(message="a history page link to another base")
                    path = url[len(self.base_url) :]
        out = []
        for entry in entries:
            request, response = entry.get("request"), entry.get("response")
            request = request if isinstance(request, dict) else {}
            response = response if isinstance(response, dict) else {}
            if request.get("method") != "DELETE":
                continue
            parts = str(request.get("url", "")).split("/")
            if len(parts) < 2 or parts[0] != "Task":
                continue
            server_id = parts[1]
            ours = task_id_from_server(server_id)
            if ours is None:
                continue  # a hashed id: periodic reconciliation finds this delete
            version = _etag_version(response.get("etag")) or ""
            when = response.get("lastModified") or ""
            out.append((str(when), server_id, version, ours))
        out.reverse()  # the history is newest first
        return out

    # --- answers ---------------------------------------------------------------------

    @staticmethod
    def _is_version_conflict(answer: Response) -> bool:
        if answer.status == 412:
            return True
        return answer.status == 409 and bool(_VERSION_CONFLICT.search(answer.body))

    def _delivered(self, answer: Response) -> Delivered:
        resource = _json(answer.body)
        if isinstance(resource, dict) and resource.get("resourceType") == "Task":
            return self._delivered_resource(resource, answer)
        return Delivered(version=_etag_version(answer.header("ETag")))

    def _delivered_resource(
        self, resource: Mapping[str, Any], answer: Response | None = None
    ) -> Delivered:
        meta = resource.get("meta")
        meta = meta if isinstance(meta, dict) else {}
        version = meta.get("versionId")
        if version is None and answer is not None:
            version = _etag_version(answer.header("ETag"))
        modified = meta.get("lastUpdated")
        try:
            task: dict[str, Any] | None = _wire_of(self._without_stale_identifiers(resource))
        except ValidationError:
            task = None
        return Delivered(
            version=None if version is None else str(version),
            modified=None if modified is None else str(modified),
            task=task,
        )

    def _conflict(self, resource: Mapping[str, Any], refusal: Response) -> PushOutcome:
        try:
            server = _wire_of(self._without_stale_identifiers(resource))
        except ValidationError as exc:
            return Refused(
                status=refusal.status,
                body=refusal.body,
                error=f"conflict, and the server's task is not one clinik-local can hold: {exc}",
            )
        return Conflict(server_task=server, status=refusal.status, body=refusal.body)

    @staticmethod
    def _failure(answer: Response) -> PushOutcome:
        status = answer.status
        if status == 401:
            return AuthFailed(message="the FHIR server refused the token (401), also a fresh one")
        if status in TRANSIENT_STATUSES or status >= 500:
            return Transient(
                error=f"HTTP {status}",
                status=status,
                retry_after=parse_retry_after(answer.header("Retry-After")),
            )
        return Refused(
            status=status, body=answer.body, error=f"HTTP {status}: {_outcome_text(answer.body)}"
        )
