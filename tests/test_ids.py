"""Generated ids: the encoding, the pooled random parts, order and forks.

The random part of an id made in a new millisecond comes from a per-process pool of
CSPRNG bytes (one ``os.urandom`` per 256 such ids); these tests pin what the pool must
not change: every id well formed, strictly increasing in one process (also across
refills and when the clock steps back), and a forked child never serving the random
bytes its parent had buffered, however it was forked.
"""

from __future__ import annotations

import ctypes
import os
import re
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clinik_local import ids
from clinik_local.ids import new_change_id, new_task_id

_GENERATED = re.compile(r"task_[0-9A-HJKMNP-TV-Z]{26}")


@given(st.integers(min_value=0, max_value=2**48 - 1))
def test_time_part_is_the_48_bit_milliseconds_in_ten_crockford_digits(ms: int) -> None:
    assert ids._encode_time(ms) == ids._encode_slow(ms, 10)


@given(st.integers(min_value=0, max_value=2**80 - 1))
def test_random_part_is_the_80_bits_in_sixteen_crockford_digits(number: int) -> None:
    assert ids._encode_random(number) == ids._encode_slow(number, 16)


class _Clock:
    """A stand-in for the ``time`` module: each call one millisecond on, or ``step``."""

    def __init__(self, start_ms: int, step_ms: int = 1) -> None:
        self.ms = start_ms
        self.step = step_ms

    def time_ns(self) -> int:
        self.ms += self.step
        return self.ms * 1_000_000


@pytest.fixture
def fresh_generator(monkeypatch: pytest.MonkeyPatch) -> None:
    """The generator as a new process has it (no last id, an empty pool)."""
    monkeypatch.setattr(ids, "_last_ms", -1)
    monkeypatch.setattr(ids, "_last_random", 0)
    monkeypatch.setattr(ids, "_pool", [])
    monkeypatch.setattr(ids, "_pool_pid", -1)


def test_ids_each_in_a_new_millisecond_are_increasing_and_unique_across_pool_refills(
    monkeypatch: pytest.MonkeyPatch, fresh_generator: None
) -> None:
    urandom_calls: list[int] = []
    real_urandom = os.urandom

    def counting_urandom(n: int) -> bytes:
        urandom_calls.append(n)
        return real_urandom(n)

    monkeypatch.setattr(os, "urandom", counting_urandom)
    monkeypatch.setattr(ids, "time", _Clock(1_750_000_000_000))
    made = [new_task_id() for _ in range(3 * ids._POOL_SIZE + 7)]
    assert all(_GENERATED.fullmatch(i) for i in made)
    assert made == sorted(made)
    assert len(set(made)) == len(made)
    randoms = [i[15:] for i in made]  # every id drew fresh bits: no two share them
    assert len(set(randoms)) == len(randoms)
    assert len(urandom_calls) == 4  # the pool refilled, not one syscall per id


def test_ids_keep_increasing_when_the_clock_steps_back(
    monkeypatch: pytest.MonkeyPatch, fresh_generator: None
) -> None:
    monkeypatch.setattr(ids, "time", _Clock(1_750_000_000_000, step_ms=-3))
    made = [new_change_id() for _ in range(50)]
    assert made == sorted(made)
    assert len(set(made)) == len(made)
    assert len({i[4:14] for i in made}) == 1  # counted on in the last id's millisecond


def _ids_in_child(fork: object) -> tuple[list[str], list[str]]:
    """Ids a forked child makes (each in a new millisecond) and the parent's next ones.

    The parent has made an id first, so its pool holds buffered random bytes.
    """
    new_task_id()
    assert ids._pool, "the parent buffered random bytes before the fork"
    read_end, write_end = os.pipe()
    pid = fork()  # type: ignore[operator]
    if pid == 0:  # the child: made ids go up the pipe, then leave at once
        try:
            made = []
            for _ in range(20):
                time.sleep(0.002)
                made.append(new_task_id())
            os.write(write_end, "\n".join(made).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    parents = []
    for _ in range(20):
        time.sleep(0.002)
        parents.append(new_task_id())
    with os.fdopen(read_end, "rb") as pipe:
        children = pipe.read().decode().split()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return children, parents


def test_a_child_forked_by_os_fork_never_serves_its_parents_buffered_random_bytes() -> None:
    children, parents = _ids_in_child(os.fork)
    assert len(children) == 20
    assert not {i[15:] for i in children} & {i[15:] for i in parents}
    assert len(set(children + parents)) == 40


def test_a_child_forked_without_pythons_fork_hooks_never_serves_the_parents_bytes() -> None:
    # libc's fork() runs none of os.register_at_fork's handlers (as a fork from an
    # extension's C code): only the pid check stands between the child and the pool.
    libc_fork = ctypes.CDLL(None, use_errno=True).fork
    libc_fork.restype = ctypes.c_int
    children, parents = _ids_in_child(libc_fork)
    assert len(children) == 20
    assert not {i[15:] for i in children} & {i[15:] for i in parents}
    assert len(set(children + parents)) == 40
