"""HL7 FHIR R4 / R5 JSON for tasks, and streaming NDJSON export / import.

:func:`to_fhir` turns a :class:`~clinik_local.model.Task` into a FHIR ``Task`` resource
(a plain ``dict`` ready for ``json.dumps``); :func:`from_fhir` turns one back, so that
``from_fhir(to_fhir(task, v)) == task`` for both versions.

Mapping (documented choices):

* Our ids may hold ``_``, which FHIR ids may not. Every id we export therefore travels
  twice: in an ``identifier`` with system :data:`ID_SYSTEM` (the exact id, which is what
  :func:`from_fhir` reads back) and as a valid FHIR id made by :func:`fhir_id`: the id
  itself when it has no ``_``, else ``h.`` plus 56 hex digits of its SHA-256.
* References: ``patientId`` -> ``for`` ``Patient/…``; ``ownerId``/``requesterId`` ->
  ``Practitioner/…``; ``encounterId`` -> ``Encounter/…``; ``focusId`` -> ``focus``
  ``Basic/…`` (we do not know what the focus is, and ``Basic`` is FHIR's catch-all);
  ``basedOn`` -> ``ServiceRequest/…``; ``partOf`` -> ``Task/…``;
  ``restriction.recipient`` -> ``Practitioner/…``; ``valueReference`` -> ``Basic/…``.
  Each Reference carries ``reference`` and the exact id in ``identifier``. On import a
  Reference without our identifier falls back to the id after the ``/`` of ``reference``.
* Texts -> CodeableConcept ``{"text": …}`` (``code``, ``businessStatus``, input/output
  ``type``; ``statusReason`` and ``reasonCode`` in R4); in R5 ``statusReason`` is a
  CodeableReference and ``reasonCode`` becomes ``reason: [{"concept": {"text": …}}]``.
  ``note`` -> ``[{"text": …}]``. A text FHIR cannot hold as a string (empty, or only
  unusual whitespace) is carried in a primitive extension (``_text``/``_description``...)
  with url :data:`RAW_STRING_URL`: ``valueBase64Binary`` of its UTF-8, or
  ``valueBoolean: true`` for the empty string. Such a ``valueString`` becomes a
  ``valueAttachment`` of type ``text/plain; charset=utf-8`` (``data`` absent when empty).
  Such a ``note`` has no Annotation (its ``text`` is required, and some validators,
  fhirclient among them, do not accept a required primitive carried by an extension
  alone): it goes in a Task ``extension`` with url :data:`BLANK_NOTE_URL`, same value
  encoding.
* ``versionId`` -> ``meta.versionId``; ``lastModified`` -> ``lastModified`` and
  ``meta.lastUpdated``; ``authoredOn``, ``executionPeriod``, ``status``, ``intent``,
  ``priority``, ``restriction.repetitions``/``period``, ``value[x]`` as they are.

NDJSON helpers stream page by page (constant memory): :func:`export_ndjson` writes one
JSON object per line (``format`` ``"wire"``, ``"R4"`` or ``"R5"``); :func:`import_ndjson`
reads them back and creates the tasks in batches of 1,000 (each batch atomic). Import
creates new tasks, so ``versionId``/``lastModified`` are set afresh by the target store.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, TextIO

from .codec import decode_task, encode_task
from .errors import FieldError, ValidationError
from .errors import shorten as _shorten
from .model import Task
from .timestamps import format_instant
from .wire import SERVER_FIELDS as _STORE_MANAGED

if TYPE_CHECKING:
    from .store import TaskStore

__all__ = [
    "BLANK_NOTE_URL",
    "ID_SYSTEM",
    "RAW_STRING_URL",
    "export_ndjson",
    "fhir_id",
    "from_fhir",
    "import_ndjson",
    "to_fhir",
]

FhirVersion = Literal["R4", "R5"]
NdjsonFormat = Literal["wire", "R4", "R5"]

#: Identifier system under which our exact ids travel.
ID_SYSTEM = "urn:clinik-local:id"
#: Extension url of a text that FHIR cannot hold as a plain string.
RAW_STRING_URL = "urn:clinik-local:raw-string"
#: Extension url (on the Task) of a note FHIR cannot hold: Annotation.text is required.
BLANK_NOTE_URL = "urn:clinik-local:blank-note"

_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_FHIR_STRING = re.compile(r"[ \r\n\t\S]")
_BATCH = 1000
#: contentType of the valueAttachment carrying a valueString FHIR cannot hold as a string.
_RAW_TEXT_TYPE = "text/plain; charset=utf-8"

# wire field -> (FHIR element, resource type of its references)
_REFS: dict[str, tuple[str, str]] = {
    "patientId": ("for", "Patient"),
    "ownerId": ("owner", "Practitioner"),
    "requesterId": ("requester", "Practitioner"),
    "encounterId": ("encounter", "Encounter"),
    "focusId": ("focus", "Basic"),
}
_REF_LISTS: dict[str, tuple[str, str]] = {
    "basedOn": ("basedOn", "ServiceRequest"),
    "partOf": ("partOf", "Task"),
}
#: Resource types import accepts per element; None: any type (FHIR's Reference(Any)).
#: owner and requester: every type FHIR R4 or R5 allows there (they are "who": our id
#: of the actor; export writes Practitioner). ``for`` is Reference(Any) in FHIR, but
#: our patientId means a Patient. restriction.recipient as in R4 and R5.
_ACTORS_R4_R5_OWNER = (
    "CareTeam",
    "Device",
    "HealthcareService",
    "Organization",
    "Patient",
    "Practitioner",
    "PractitionerRole",
    "RelatedPerson",
)
_ALLOWED_TYPES: dict[str, tuple[str, ...] | None] = {
    "for": ("Patient",),
    "owner": _ACTORS_R4_R5_OWNER,
    "requester": (
        "Device",
        "Group",
        "Organization",
        "Patient",
        "Practitioner",
        "PractitionerRole",
        "RelatedPerson",
    ),
    "encounter": ("Encounter",),
    "focus": None,
    "basedOn": None,
    "partOf": ("Task",),
    "restriction.recipient": (
        "Group",
        "Organization",
        "Patient",
        "Practitioner",
        "PractitionerRole",
        "RelatedPerson",
    ),
    "valueReference": None,
}
#: A FHIR literal reference: [absolute base URL/]Type/id[/_history/version].
_REFERENCE = re.compile(
    r"(?:https?://[^/?#\s]+(?:/[^/?#\s]+)*?/)?"
    r"(?P<type>[A-Z][A-Za-z]{0,63})/(?P<id>[A-Za-z0-9_.\-]{1,64})"
    r"(?:/_history/[A-Za-z0-9_.\-]{1,64})?",
    re.ASCII,
)
#: A FHIR date without a time: YYYY, YYYY-MM or YYYY-MM-DD.
_FHIR_DATE = re.compile(r"(\d{4})(?:-(\d\d)(?:-(\d\d))?)?", re.ASCII)
_CONCEPTS = ("code", "businessStatus")
_PLAIN = ("status", "intent", "priority", "authoredOn", "lastModified", "executionPeriod")


def fhir_id(our_id: str) -> str:
    """A valid FHIR id for one of our ids: itself when valid, else ``h.`` + SHA-256 hex."""
    if _FHIR_ID.fullmatch(our_id):
        return our_id
    return "h." + hashlib.sha256(our_id.encode()).hexdigest()[:56]


# --- export ----------------------------------------------------------------------------


def _raw_ext(url: str, value: str) -> dict[str, Any]:
    ext: dict[str, Any] = {"url": url}
    if value:
        ext["valueBase64Binary"] = base64.b64encode(value.encode()).decode()
    else:
        ext["valueBoolean"] = True
    return ext


def _put_text(out: dict[str, Any], key: str, value: str) -> None:
    if _FHIR_STRING.search(value):
        out[key] = value
    else:
        out["_" + key] = {"extension": [_raw_ext(RAW_STRING_URL, value)]}


def _concept(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    _put_text(out, "text", text)
    return out


def _ref(resource_type: str, our_id: str) -> dict[str, Any]:
    return {
        "reference": f"{resource_type}/{fhir_id(our_id)}",
        "identifier": {"system": ID_SYSTEM, "value": our_id},
    }


def _io(item: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"type": _concept(item["type"])}
    for key, value in item.items():
        if key == "valueReference":
            out[key] = _ref("Basic", value)
        elif key == "valueString" and not _FHIR_STRING.search(value):
            # fhir.resources requires a value[x] element, so no bare _valueString here
            attachment: dict[str, Any] = {"contentType": _RAW_TEXT_TYPE}
            if value:
                attachment["data"] = base64.b64encode(value.encode()).decode()
            out["valueAttachment"] = attachment
        elif key != "type":
            out[key] = value
    return out


def to_fhir(task: Task, version: FhirVersion = "R4") -> dict[str, Any]:
    """The FHIR ``Task`` resource (JSON-ready dict) of a task, in R4 or R5.

    ``task`` is a :class:`~clinik_local.model.Task` (a wire mapping is refused: decode
    it first with :func:`~clinik_local.codec.decode_task`).
    """
    if not isinstance(task, Task):
        raise ValidationError.single(
            "task",
            f"expected a Task, not {type(task).__name__}",
            task,
            "a clinik_local.Task (decode a wire mapping with decode_task first)",
        )
    if version not in ("R4", "R5"):
        raise ValidationError.single("version", "unknown FHIR version", version, "R4, R5")
    wire = encode_task(task)
    out: dict[str, Any] = {"resourceType": "Task"}
    if task.id is not None:
        out["id"] = fhir_id(task.id)
    meta: dict[str, Any] = {}
    if task.version_id is not None:
        meta["versionId"] = task.version_id
    if task.last_modified is not None:
        meta["lastUpdated"] = task.last_modified
    if meta:
        out["meta"] = meta
    if task.id is not None:
        out["identifier"] = [{"system": ID_SYSTEM, "value": task.id}]
    for key in _PLAIN:
        if key in wire:
            out[key] = wire[key]
    if "description" in wire:
        _put_text(out, "description", wire["description"])
    for key in _CONCEPTS:
        if key in wire:
            out[key] = _concept(wire[key])
    if "statusReason" in wire:
        concept = _concept(wire["statusReason"])
        out["statusReason"] = concept if version == "R4" else {"concept": concept}
    if "reasonCode" in wire:
        concept = _concept(wire["reasonCode"])
        if version == "R4":
            out["reasonCode"] = concept
        else:
            out["reason"] = [{"concept": concept}]
    for key, (element, rtype) in _REFS.items():
        if key in wire:
            out[element] = _ref(rtype, wire[key])
    for key, (element, rtype) in _REF_LISTS.items():
        if key in wire:
            out[element] = [_ref(rtype, v) for v in wire[key]]
    if "note" in wire:
        if _FHIR_STRING.search(wire["note"]):
            out["note"] = [{"text": wire["note"]}]
        else:  # Annotation.text is required (1..1): a blank note has no Annotation
            out["extension"] = [_raw_ext(BLANK_NOTE_URL, wire["note"])]
    for key in ("input", "output"):
        if key in wire:
            out[key] = [_io(i) for i in wire[key]]
    if "restriction" in wire:
        restriction = dict(wire["restriction"])
        if "recipient" in restriction:
            restriction["recipient"] = [_ref("Practitioner", r) for r in restriction["recipient"]]
        out["restriction"] = restriction
    return out


# --- import ----------------------------------------------------------------------------


class _Bad(Exception):
    def __init__(
        self, path: str, message: str, value: object = None, allowed: str | None = None
    ) -> None:
        super().__init__(path)
        shown = None if value is None else _shorten(value)
        self.error = FieldError(path, message, shown, allowed)


def _obj(value: object, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _Bad(path, f"expected an object, not {type(value).__name__}", value)
    return value


def _list(value: object, path: str) -> list[Any]:
    if not isinstance(value, list):
        raise _Bad(path, f"expected a list, not {type(value).__name__}", value)
    return value


def _get_text(obj: Mapping[str, Any], key: str, path: str) -> object:
    """A text element, also when carried in our raw-string extension."""
    if key in obj:
        return obj[key]
    shadow = obj.get("_" + key)
    if shadow is None:
        raise _Bad(f"{path}.{key}", "is required")
    found = _raw_from(shadow, RAW_STRING_URL, f"{path}._{key}")
    if found is None:
        raise _Bad(f"{path}.{key}", "is required")
    return found


def _raw_from(holder: object, url: str, path: str) -> str | None:
    """The text of the first extension with ``url`` in ``holder["extension"]``, if any."""
    where = f"{path}.extension" if path else "extension"
    exts = _list(_obj(holder, path or "$").get("extension", []), where)
    for n, raw in enumerate(exts):
        ext = _obj(raw, f"{where}[{n}]")
        if ext.get("url") != url:
            continue
        if ext.get("valueBoolean") is True:
            return ""
        return _b64_text(ext.get("valueBase64Binary"), f"{where}[{n}].valueBase64Binary")
    return None


def _b64_text(value: object, path: str) -> str:
    try:
        return base64.b64decode(str(value), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise _Bad(path, "is not base64 of UTF-8 text", value) from None


def _has_text(obj: Mapping[str, Any], key: str) -> bool:
    return key in obj or "_" + key in obj


def _concept_text(value: object, path: str) -> object:
    """A CodeableConcept's text; without one, the ``code`` of its first coding that has one.

    Our codes are plain strings, so a coded concept keeps only its code value (its
    system and display are dropped); it exports back as ``{"text": code}``.
    """
    concept = _obj(value, path)
    if _has_text(concept, "text"):
        return _get_text(concept, "text", path)
    for n, coding in enumerate(_list(concept.get("coding", []), f"{path}.coding")):
        code = _obj(coding, f"{path}.coding[{n}]").get("code")
        if code is not None:
            return code
    raise _Bad(
        f"{path}.text",
        "is required: a CodeableConcept needs text, or a coding with a code",
        value,
        "text, or coding[].code",
    )


def _ref_id(value: object, path: str, element: str) -> object:
    """Our id from a Reference: its clinik-local identifier, else its literal reference.

    ``Type/id``, ``Type/id/_history/vid`` and absolute URLs ending in one are read; the
    version is not an id and is dropped. The resource type must be one the element
    allows (:data:`_ALLOWED_TYPES`), in ``reference`` and in ``type`` alike.
    """
    ref = _obj(value, path)
    allowed = _ALLOWED_TYPES[element]
    shown = "any resource type" if allowed is None else ", ".join(allowed)
    declared = ref.get("type")
    if declared is not None and (
        not isinstance(declared, str) or (allowed is not None and declared not in allowed)
    ):
        raise _Bad(f"{path}.type", f"{element} cannot refer to a {declared}", declared, shown)
    reference = ref.get("reference")
    found: str | None = None
    if reference is not None:
        match = _REFERENCE.fullmatch(reference) if isinstance(reference, str) else None
        if match is None:
            raise _Bad(
                f"{path}.reference",
                "is not a FHIR literal reference",
                reference,
                "Type/id, Type/id/_history/version, or an absolute URL ending in one",
            )
        rtype = match.group("type")
        if allowed is not None and rtype not in allowed:
            raise _Bad(
                f"{path}.reference", f"{element} cannot refer to a {rtype}", reference, shown
            )
        if declared is not None and declared != rtype:
            raise _Bad(
                f"{path}.type", f"says {declared}, but the reference is to a {rtype}", declared
            )
        found = match.group("id")
    ident = ref.get("identifier")
    if isinstance(ident, Mapping) and ident.get("system") == ID_SYSTEM:
        return ident.get("value")
    if found is None:
        raise _Bad(
            f"{path}.reference",
            "is required (there is no clinik-local identifier)",
            value,
            "Type/id or an identifier with system " + ID_SYSTEM,
        )
    return found


def _date_time(value: object, path: str, *, end: bool = False) -> object:
    """A FHIR dateTime as our instant input: a date without a time becomes an instant.

    ``YYYY``, ``YYYY-MM`` and ``YYYY-MM-DD`` become the first millisecond of that
    period in UTC, or (``end``: a Period's end, which FHIR says includes the whole end
    date) its last millisecond. UTC because a date has no zone, and one fixed rule
    makes the same file import to the same instants on every device. Anything else is
    left for the codec to check.
    """
    match = _FHIR_DATE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        return value
    year, month, day = (int(g) if g else None for g in match.groups())
    assert year is not None
    try:
        start = datetime(year, month or 1, day or 1, tzinfo=UTC)
    except ValueError:
        raise _Bad(
            path, "is not a real calendar date", value, "YYYY, YYYY-MM or YYYY-MM-DD"
        ) from None
    if not end:
        return format_instant(start)
    try:
        if day is not None:
            after = start + timedelta(days=1)
        elif month is not None:
            after = start.replace(year=year + month // 12, month=month % 12 + 1)
        else:
            after = start.replace(year=year + 1)
    except (OverflowError, ValueError):  # the period ends with the year 9999
        return "9999-12-31T23:59:59.999Z"
    return format_instant(after - timedelta(milliseconds=1))


def _period(value: object, path: str) -> object:
    if not isinstance(value, Mapping):
        return value  # the codec names the problem
    out = dict(value)
    if "start" in out:
        out["start"] = _date_time(out["start"], f"{path}.start")
    if "end" in out:
        out["end"] = _date_time(out["end"], f"{path}.end", end=True)
    return out


def _io_from(value: object, path: str) -> dict[str, Any]:
    item = _obj(value, path)
    out: dict[str, Any] = {"type": _concept_text(item.get("type"), f"{path}.type")}
    for key in item:
        if key == "type" or not (key.startswith("value") or key.startswith("_value")):
            continue
        name = key.lstrip("_")
        if name == "valueReference":
            out[name] = _ref_id(item[key], f"{path}.{name}", "valueReference")
        elif name == "valueDateTime":
            out[name] = _date_time(item[key], f"{path}.{name}")
        elif name == "valueAttachment":
            attachment = _obj(item[key], f"{path}.{name}")
            if attachment.get("contentType") != _RAW_TEXT_TYPE:
                raise _Bad(f"{path}.{name}.contentType", "unsupported", attachment)
            out["valueString"] = _b64_text(attachment.get("data", ""), f"{path}.{name}.data")
        else:
            out[name] = item[key]
    return out


def _wire_from(resource: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The wire request of a FHIR Task, and wire field -> FHIR element for error paths."""
    if resource.get("resourceType") != "Task":
        raise _Bad("resourceType", "expected 'Task'", resource.get("resourceType"))
    names: dict[str, str] = {}
    wire: dict[str, Any] = {}
    for n, raw in enumerate(_list(resource.get("identifier", []), "identifier")):
        ident = _obj(raw, f"identifier[{n}]")
        if ident.get("system") == ID_SYSTEM:
            wire["id"] = ident.get("value")
            names["id"] = f"identifier[{n}].value"
    if "id" not in wire and "id" in resource:
        wire["id"] = resource["id"]
    meta = _obj(resource.get("meta", {}), "meta")
    if "versionId" in meta:
        wire["versionId"] = meta["versionId"]
        names["versionId"] = "meta.versionId"
    for key in _PLAIN:
        if key in resource:
            wire[key] = resource[key]
    for key in ("authoredOn", "lastModified"):
        if key in wire:
            wire[key] = _date_time(wire[key], key)
    if "executionPeriod" in wire:
        wire["executionPeriod"] = _period(wire["executionPeriod"], "executionPeriod")
    if "lastModified" not in wire and "lastUpdated" in meta:
        wire["lastModified"] = meta["lastUpdated"]
        names["lastModified"] = "meta.lastUpdated"
    if _has_text(resource, "description"):
        wire["description"] = _get_text(resource, "description", "")
    for key in _CONCEPTS:
        if key in resource:
            wire[key] = _concept_text(resource[key], key)
    if "statusReason" in resource:
        sr = _obj(resource["statusReason"], "statusReason")
        if "concept" in sr:
            wire["statusReason"] = _concept_text(sr["concept"], "statusReason.concept")
        else:
            wire["statusReason"] = _concept_text(sr, "statusReason")
    if "reasonCode" in resource:
        wire["reasonCode"] = _concept_text(resource["reasonCode"], "reasonCode")
    if "reason" in resource:
        reasons = _list(resource["reason"], "reason")
        if len(reasons) > 1:
            raise _Bad("reason", "at most one reason is supported", reasons)
        if reasons:
            concept = _obj(reasons[0], "reason[0]").get("concept")
            wire["reasonCode"] = _concept_text(concept, "reason[0].concept")
            names["reasonCode"] = "reason[0].concept.text"
    for key, (element, _) in _REFS.items():
        if element in resource:
            wire[key] = _ref_id(resource[element], element, element)
            names[key] = element
    for key, (element, _) in _REF_LISTS.items():
        if element in resource:
            items = _list(resource[element], element)
            wire[key] = [_ref_id(v, f"{element}[{i}]", element) for i, v in enumerate(items)]
            names[key] = element
    blank_note = _raw_from(resource, BLANK_NOTE_URL, "")
    if blank_note is not None:
        wire["note"] = blank_note
        names["note"] = "extension"
    if "note" in resource:
        notes = _list(resource["note"], "note")
        if len(notes) > 1:
            raise _Bad("note", "at most one note is supported", notes)
        if notes:
            wire["note"] = _get_text(_obj(notes[0], "note[0]"), "text", "note[0]")
            names["note"] = "note[0].text"
    for key in ("input", "output"):
        if key in resource:
            items = _list(resource[key], key)
            wire[key] = [_io_from(v, f"{key}[{i}]") for i, v in enumerate(items)]
    if "restriction" in resource:
        restriction = dict(_obj(resource["restriction"], "restriction"))
        if "recipient" in restriction:
            recipients = _list(restriction["recipient"], "restriction.recipient")
            restriction["recipient"] = [
                _ref_id(v, f"restriction.recipient[{i}]", "restriction.recipient")
                for i, v in enumerate(recipients)
            ]
        if "period" in restriction:
            restriction["period"] = _period(restriction["period"], "restriction.period")
        wire["restriction"] = restriction
    return wire, names


def from_fhir(resource: Mapping[str, Any]) -> Task:
    """The task a FHIR R4 or R5 ``Task`` resource describes (inverse of :func:`to_fhir`).

    Raises ValidationError whose paths name the FHIR element (``for``, ``meta.versionId``,
    ``input[0].valueInteger``...).
    """
    if not isinstance(resource, Mapping):
        raise ValidationError.single(
            "$", f"a FHIR resource must be an object, not {type(resource).__name__}", resource
        )
    try:
        wire, names = _wire_from(resource)
    except _Bad as exc:
        raise ValidationError([exc.error]) from None
    try:
        return decode_task(wire)
    except ValidationError as exc:
        raise ValidationError([_fhir_path(e, names) for e in exc.errors]) from None


def _fhir_path(error: FieldError, names: Mapping[str, str]) -> FieldError:
    head, sep, rest = error.path.partition(".")
    head, bracket, index = head.partition("[")
    if head in names:
        return FieldError(
            names[head] + bracket + index + sep + rest, error.message, error.value, error.allowed
        )
    return error


# --- NDJSON ----------------------------------------------------------------------------


def _check_format(fmt: object) -> None:
    if fmt not in ("wire", "R4", "R5"):
        raise ValidationError.single("format", "unknown format", fmt, "wire, R4, R5")


def _all_pages(store: TaskStore) -> Iterator[list[Task]]:
    cursor: object = None
    while True:
        paging: dict[str, object] = {"limit": _BATCH}
        if cursor is not None:
            paging["cursor"] = cursor
        page = store.tasks.search(paging)
        yield page.data
        cursor = page.meta.get("nextCursor")
        if cursor is None:
            return


def export_ndjson(
    store: TaskStore,
    stream: TextIO,
    format: NdjsonFormat = "wire",
    progress: Callable[[int], None] | None = None,
) -> int:
    """Write every task of ``store`` to ``stream``, one JSON object per line; the count.

    Reads page by page (1,000 tasks at a time, keyset cursors), so memory stays flat
    whatever the store's size. ``progress(n)``, when given, is called after each page
    with the number of tasks just written (``Progress.advance`` fits).
    """
    _check_format(format)
    count = 0
    for page in _all_pages(store):
        for task in page:
            doc = encode_task(task) if format == "wire" else to_fhir(task, format)
            stream.write(json.dumps(doc, ensure_ascii=False, separators=(",", ":")))
            stream.write("\n")
        count += len(page)
        if progress is not None and page:
            progress(len(page))
    return count


def _requests(stream: TextIO, fmt: NdjsonFormat) -> Iterator[tuple[int, dict[str, Any]]]:
    for line_no, line in enumerate(stream, 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValidationError.single(
                f"line {line_no}", f"is not JSON: {exc.msg}", line[:80]
            ) from None
        try:
            if fmt == "wire":
                if not isinstance(doc, dict):
                    raise ValidationError.single("$", "expected an object", doc)
                request = doc
            else:
                request = encode_task(from_fhir(doc))
        except ValidationError as exc:
            raise ValidationError(
                [
                    FieldError(f"line {line_no}: {e.path}", e.message, e.value, e.allowed)
                    for e in exc.errors
                ]
            ) from None
        for key in _STORE_MANAGED:
            request.pop(key, None)
        yield line_no, request


def import_ndjson(
    store: TaskStore,
    stream: TextIO,
    format: NdjsonFormat = "wire",
    progress: Callable[[int], None] | None = None,
    *,
    synced: bool = False,
) -> int:
    """Create the tasks of an NDJSON stream in batches of 1,000; the count created.

    ``synced=True`` restores an export of a synced store as already synced
    (``create_many(..., synced=True)``): nothing is sent to the server again.

    Reads line by line (memory stays flat). Each batch is one transaction
    (``create_many``); on an error the batches before it stay. Errors name the line
    (``line 7: status``). ``progress(n)``, when given, is called after each committed
    batch with the number of tasks it created.
    """
    _check_format(format)
    count = 0
    batch: list[tuple[int, dict[str, Any]]] = []

    def flush() -> None:
        nonlocal count
        try:
            store.tasks.create_many([r for _, r in batch], synced=synced)
        except ValidationError as exc:
            raise ValidationError([_line_error(e, batch) for e in exc.errors]) from None
        count += len(batch)
        if progress is not None:
            progress(len(batch))
        batch.clear()

    for item in _requests(stream, format):
        batch.append(item)
        if len(batch) >= _BATCH:
            flush()
    if batch:
        flush()
    return count


def _line_error(error: FieldError, batch: list[tuple[int, dict[str, Any]]]) -> FieldError:
    match = re.match(r"\[(\d+)\]\.?(.*)", error.path)
    if match is None:
        return error
    line_no = batch[int(match.group(1))][0]
    return FieldError(
        f"line {line_no}: {match.group(2)}", error.message, error.value, error.allowed
    )
