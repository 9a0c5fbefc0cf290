"""UTC instants as fixed-width text, the one date-time form stored and sent.

``YYYY-MM-DDTHH:MM:SS.sssZ`` sorts as text in time order, so SQLite indexes on it
work without conversion. Input may carry any offset; it is converted to UTC and cut
to milliseconds. Naive values are refused: a clinic's wall clock without a zone is
ambiguous across daylight-saving changes and devices.

Input follows RFC 3339 (and the ISO 8601 forms ``datetime.fromisoformat`` reads): the
``T`` and ``Z`` may be lower case, as RFC 3339 allows. An offset is ``±HH:MM``; one
with seconds (``+00:00:30``, which ISO 8601 and RFC 3339 do not have) is refused
saying so. Digits are ASCII digits only.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime

__all__ = ["format_instant", "now", "parse_instant"]

_CANONICAL = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", re.ASCII)
_WHOLE_SECONDS_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", re.ASCII)
_HAS_TIME = re.compile(r"\d{4}-\d\d-\d\d[Tt ]\d\d", re.ASCII)
_HAS_ZONE = re.compile(r"(Z|[+-]\d\d(:?\d\d)?)$", re.ASCII)
_OFFSET_WITH_SECONDS = re.compile(r"[+-]\d\d:?\d\d:?\d\d(\.\d+)?$", re.ASCII)


class InstantError(ValueError):
    """Why a value is not an acceptable instant (message meant for a FieldError)."""


def format_instant(value: datetime) -> str:
    """Format an aware datetime as normalised UTC text (milliseconds, ``Z``)."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise InstantError("date-time has no timezone; give an offset such as Z or +01:00")
    try:
        u = value.astimezone(UTC)
    except OverflowError:
        raise InstantError("is out of range once converted to UTC (years 1-9999)") from None
    return (
        f"{u.year:04d}-{u.month:02d}-{u.day:02d}T{u.hour:02d}:{u.minute:02d}:"
        f"{u.second:02d}.{u.microsecond // 1000:03d}Z"
    )


def parse_instant(value: object) -> str:
    """Normalise an ISO-8601 string with a zone, or an aware datetime, to UTC text."""
    if isinstance(value, datetime):
        return format_instant(value)
    if not isinstance(value, str):
        raise InstantError(f"expected an ISO-8601 date-time string, not {type(value).__name__}")
    if _CANONICAL.fullmatch(value):
        try:
            datetime.fromisoformat(value)
        except ValueError:
            raise InstantError("not a real calendar date-time") from None
        return value
    if _WHOLE_SECONDS_UTC.fullmatch(value):
        try:
            datetime.fromisoformat(value)
        except ValueError:
            raise InstantError("not a real calendar date-time") from None
        return value[:-1] + ".000Z"
    if not _HAS_TIME.match(value):
        raise InstantError("needs a date and a time with a timezone, e.g. 2025-02-01T08:00:00Z")
    if value[10] == "t":  # RFC 3339 5.6: "T" and "Z" may be lower case
        value = value[:10] + "T" + value[11:]
    if value.endswith("z"):
        value = value[:-1] + "Z"
    if _OFFSET_WITH_SECONDS.search(value[13:]):
        raise InstantError(
            "has an offset with seconds; RFC 3339 offsets are ±HH:MM (or Z), e.g. +01:00"
        )
    if not _HAS_ZONE.search(value):
        raise InstantError(
            "date-time has no timezone; a naive time is ambiguous across devices and "
            "daylight-saving changes, so give an offset such as Z or +01:00"
        )
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InstantError("not an ISO-8601 date-time") from None
    return format_instant(parsed)


_second_cache: tuple[int, str] = (-1, "")


def now() -> str:
    """The current instant as normalised UTC text."""
    ms_total = time.time_ns() // 1_000_000
    secs, ms = divmod(ms_total, 1000)
    global _second_cache
    cached_secs, text = _second_cache  # one tuple, swapped whole: safe across threads
    if cached_secs != secs:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
        _second_cache = (secs, text)
    return f"{text}.{ms:03d}Z"
