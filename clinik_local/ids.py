"""Ids as the remote service has them, and generation of new task ids.

An id is 1-64 characters of ``[A-Za-z0-9_.-]`` (wider than FHIR's id alphabet, which
has no ``_``). New task ids are ``task_`` followed by a 26-character ULID: 48 bits of
millisecond time then 80 random bits, Crockford base32. They sort by creation time,
and 80 bits from the OS's CSPRNG make a collision between devices negligible; within
one process ids are strictly increasing even inside one millisecond.
"""

from __future__ import annotations

import os
import re
import threading
import time

__all__ = ["ID_PATTERN", "MAX_ID_LENGTH", "is_valid_id", "new_change_id", "new_task_id"]

MAX_ID_LENGTH = 64
ID_PATTERN = "[A-Za-z0-9_.-]{1,64}"
_ID = re.compile(ID_PATTERN)
_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_RANDOM_MASK = (1 << 80) - 1

_lock = threading.Lock()
_last_ms = -1
_last_random = 0


def is_valid_id(value: str) -> bool:
    """Whether ``value`` is a well-formed remote-service id."""
    return _ID.fullmatch(value) is not None


# Every 10-bit value as its two Crockford characters: 80 random bits are 8 lookups, the
# 48-bit time (10 characters, 50 bits with two leading zeros) 5.
_PAIRS = tuple(a + b for a in _ALPHABET for b in _ALPHABET)
_time_cache: tuple[int, str] = (-1, "")


def _encode_time(ms: int) -> str:
    global _time_cache
    cached_ms, text = _time_cache
    if cached_ms != ms:
        pairs = _PAIRS
        text = (
            pairs[(ms >> 40) & 1023]
            + pairs[(ms >> 30) & 1023]
            + pairs[(ms >> 20) & 1023]
            + pairs[(ms >> 10) & 1023]
            + pairs[ms & 1023]
        )
        _time_cache = (ms, text)  # ids made in the same millisecond share this prefix
    return text


def _encode_slow(number: int, length: int) -> str:
    """``number`` in ``length`` Crockford characters, one 5-bit digit at a time (the
    reference :func:`_encode_time` and :func:`_encode_random` are checked against)."""
    chars = []
    for _ in range(length):
        chars.append(_ALPHABET[number & 31])
        number >>= 5
    return "".join(reversed(chars))


def _encode_random(number: int) -> str:
    pairs = _PAIRS
    return (
        pairs[(number >> 70) & 1023]
        + pairs[(number >> 60) & 1023]
        + pairs[(number >> 50) & 1023]
        + pairs[(number >> 40) & 1023]
        + pairs[(number >> 30) & 1023]
        + pairs[(number >> 20) & 1023]
        + pairs[(number >> 10) & 1023]
        + pairs[number & 1023]
    )


#: Fresh random parts drawn per ``os.urandom`` call: one syscall per this many new
#: milliseconds instead of one per id.
_POOL_SIZE = 256
_pool: list[int] = []
_pool_pid = -1


def _fresh_random() -> int:
    """80 fresh bits from the OS's CSPRNG, served from a per-process pool (lock held).

    The pool belongs to the process that filled it: a forked child (whatever forked
    it: ``os.fork`` runs :func:`_reset_after_fork`, a fork from C code does not, hence
    the pid) refills before it draws, so it never hands out its parent's bytes.
    """
    global _pool, _pool_pid
    pool = _pool
    pid = os.getpid()
    if not pool or _pool_pid != pid:
        raw = os.urandom(10 * _POOL_SIZE)
        pool = _pool = [int.from_bytes(raw[i : i + 10], "big") for i in range(0, len(raw), 10)]
        _pool_pid = pid
    return pool.pop()


def new_task_id() -> str:
    """A new, time-ordered, collision-free task id (``task_`` + ULID)."""
    return "task_" + _ulid()


def new_change_id() -> str:
    """A new idempotency key for one local change (``chg_`` + ULID).

    Time-ordered, so the outbox's unique index on it grows at one end instead of
    touching a random page with every write.
    """
    return "chg_" + _ulid()


def _ulid() -> str:
    global _last_ms, _last_random
    ms = time.time_ns() // 1_000_000
    with _lock:
        if ms <= _last_ms:
            # Same (or a stepped-back) clock: keep order by counting on from the last id.
            ms = _last_ms
            rnd = (_last_random + 1) & _RANDOM_MASK
            if rnd == 0:
                ms += 1
        else:
            rnd = _fresh_random()
        _last_ms, _last_random = ms, rnd
    return _encode_time(ms) + _encode_random(rnd)


def _reset_after_fork() -> None:
    # A forked child must not continue its parent's sequence (it would repeat ids).
    global _last_ms, _last_random, _lock, _pool, _pool_pid
    _lock = threading.Lock()
    _last_ms, _last_random = -1, 0
    _pool, _pool_pid = [], -1  # nor draw the random bytes its parent buffered


os.register_at_fork(after_in_child=_reset_after_fork)
