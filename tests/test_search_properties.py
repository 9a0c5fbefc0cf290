"""Search equals a pure-Python reference; paging under concurrent change is exact.

The reference below is written from the documented semantics in
``clinik_local/search.py`` (FHIR date ranges, any-of / not / missing, prefix text
match, clinical priority order, missing due last), independently of the SQL compiler.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clinik_local import TaskStore
from clinik_local.errors import ValidationError
from clinik_local.model import Task
from clinik_local.search import compile_search, normalise_filters

# --- task generation ------------------------------------------------------------------

INSTANTS = [
    "2025-01-31T23:59:59.999Z",
    "2025-02-01T00:00:00.000Z",
    "2025-02-01T08:00:00.000Z",
    "2025-02-01T08:00:30.500Z",
    "2025-02-14T12:00:00.000Z",
    "2025-03-01T00:00:00.000Z",
    "2024-12-31T23:00:00.000Z",
    "2026-06-15T10:10:10.010Z",
]
WORDS = ["cbc", "cmp", "draw", "labs", "npo", "cbx", "urine", "x1", "panel2"]
STATUSES = ["requested", "ready", "in-progress", "completed", "cancelled", "failed", "on-hold"]
PRIORITIES = ["stat", "asap", "urgent", "routine"]
IDS = {
    "ownerId": ["o_a", "o_b"],
    "patientId": ["p_a", "p_b"],
    "requesterId": ["r_a", "r_b"],
    "encounterId": ["e_a", "e_b"],
    "focusId": ["f_a", "f_b"],
}
TEXTS = {"code": ["lab", "ref-cbc"], "businessStatus": ["Collected", "Pending cbc"]}
ENUMS = {"status": STATUSES, "intent": ["order", "plan"], "priority": PRIORITIES}
NULLABLE = [*IDS, *TEXTS, "priority"]
EQUALITY = {**IDS, **TEXTS, **ENUMS}


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), strategy)


words_text = st.lists(st.sampled_from(WORDS), min_size=1, max_size=3).map(" ".join)
io_item = st.one_of(
    st.builds(
        lambda t, v: {"type": t, "valueString": v},
        st.sampled_from(["lab-panel", "note"]),
        st.sampled_from(["CBC", "CMP", "draw x1"]),
    ),
    st.builds(lambda t, v: {"type": t, "valueInteger": v}, st.just("count"), st.integers(0, 3)),
    st.builds(lambda t, v: {"type": t, "valueBoolean": v}, st.just("fasting"), st.booleans()),
)


@st.composite
def task_requests(draw: st.DrawFn) -> dict[str, object]:
    request: dict[str, object] = {
        "status": draw(st.sampled_from(STATUSES)),
        "intent": draw(st.sampled_from(["order", "plan"])),
        "authoredOn": draw(st.sampled_from(INSTANTS)),
    }
    optional: dict[str, object | None] = {
        "priority": draw(maybe(st.sampled_from(PRIORITIES))),
        "description": draw(maybe(words_text)),
        "note": draw(maybe(words_text)),
        "basedOn": draw(maybe(st.lists(st.sampled_from(["sr_1", "sr_2"]), max_size=2))),
        "partOf": draw(maybe(st.lists(st.sampled_from(["t_p1", "t_p2"]), max_size=2))),
        "input": draw(maybe(st.lists(io_item, max_size=2))),
        "output": draw(maybe(st.lists(io_item, max_size=1))),
    }
    for name, values in [*IDS.items(), *TEXTS.items()]:
        optional[name] = draw(maybe(st.sampled_from(values)))
    start, end = draw(maybe(st.sampled_from(INSTANTS))), draw(maybe(st.sampled_from(INSTANTS)))
    if start is not None and end is not None and end < start:
        start, end = end, start
    period = {k: v for k, v in (("start", start), ("end", end)) if v is not None}
    if period:
        optional["executionPeriod"] = period
    request.update({k: v for k, v in optional.items() if v not in (None, [])})
    return request


# --- filter generation ----------------------------------------------------------------

# Date values: (text, precision) where precision names the implied range.
PRECISIONS = ["year", "month", "day", "minute", "second"]


@st.composite
def date_values(draw: st.DrawFn) -> str:
    base = datetime.fromisoformat(draw(st.sampled_from(INSTANTS)))
    base += draw(st.sampled_from([timedelta(0), timedelta(milliseconds=-1), timedelta(hours=9)]))
    precision = draw(st.sampled_from(PRECISIONS))
    formats = {
        "year": "%Y",
        "month": "%Y-%m",
        "day": "%Y-%m-%d",
        "minute": "%Y-%m-%dT%H:%MZ",
        "second": "%Y-%m-%dT%H:%M:%SZ",
    }
    return base.astimezone(UTC).strftime(formats[precision])


PREFIXES = ["eq", "ne", "lt", "gt", "le", "ge", "sa", "eb"]


@st.composite
def equality_filter(draw: st.DrawFn, name: str) -> object:
    values = EQUALITY[name]
    forms = ["one", "list", "comma", "not"]
    if name in NULLABLE:
        forms += ["none", "missing", "list_none"]
    form = draw(st.sampled_from(forms))
    if form == "one":
        return draw(st.sampled_from(values))
    if form == "list":
        return draw(st.lists(st.sampled_from(values), min_size=1, max_size=3, unique=True))
    if form == "comma":
        return ",".join(draw(st.lists(st.sampled_from(values), min_size=1, max_size=3)))
    if form == "not":
        excluded: list[object] = draw(
            st.lists(st.sampled_from(values), min_size=1, max_size=2, unique=True)
        )
        if name in NULLABLE and draw(st.booleans()):
            excluded.append(None)
        return {"not": excluded}
    if form == "none":
        return None
    if form == "missing":
        return {"missing": draw(st.booleans())}
    return [*draw(st.lists(st.sampled_from(values), max_size=2, unique=True)), None]


@st.composite
def date_filter(draw: st.DrawFn) -> object:
    form = draw(st.sampled_from(["one", "any", "range"]))
    if form == "range":
        low, high = draw(date_values()), draw(date_values())
        return {
            draw(st.sampled_from(["ge", "gt", "sa"])): low,
            draw(st.sampled_from(["lt", "le", "eb"])): high,
        }
    items = [
        draw(st.sampled_from(["", *PREFIXES])) + draw(date_values())
        for _ in range(1 if form == "one" else 2)
    ]
    return ",".join(items)


FAMILIES = ["equality", "date", "refs", "io", "text", "due"]


@st.composite
def one_filter(draw: st.DrawFn, family: str) -> tuple[str, object]:
    if family == "equality":
        name = draw(st.sampled_from(sorted(EQUALITY)))
        return name, draw(equality_filter(name))
    if family == "date":
        name = draw(st.sampled_from(["authoredOn", "lastModified", "periodStart", "periodEnd"]))
        return name, draw(date_filter())
    if family == "refs":
        name = draw(st.sampled_from(["basedOn", "partOf"]))
        pool = ["sr_1", "sr_2"] if name == "basedOn" else ["t_p1", "t_p2"]
        return name, draw(st.lists(st.sampled_from(pool), min_size=1, max_size=2))
    if family == "io":
        name = draw(st.sampled_from(["input", "output"]))
        pool = ["lab-panel", "lab-panel|CBC", "note|draw x1", "count|2", "fasting|true", "count"]
        return name, draw(st.lists(st.sampled_from(pool), min_size=1, max_size=2))
    if family == "text":
        pool = ["cb", "CBC", "dra", "x", "panel", "pa", "ur", "coll", '"', "*", "NEAR(", "AND"]
        return "text", draw(st.lists(st.sampled_from(pool), min_size=1, max_size=2).map(" ".join))
    if draw(st.booleans()):
        return "overdue", True
    return "dueBefore", draw(date_values())


@st.composite
def filters(draw: st.DrawFn) -> dict[str, object]:
    chosen: dict[str, object] = {}
    for family in draw(st.lists(st.sampled_from(FAMILIES), max_size=2)):
        name, value = draw(one_filter(family))
        chosen[name] = value
    return chosen


SORT_KEYS = ["authoredOn", "lastModified", "priority", "status", "due"]
sorts = st.one_of(
    st.none(),
    st.lists(
        st.tuples(st.sampled_from(SORT_KEYS), st.booleans()),
        min_size=1,
        max_size=3,
        unique_by=lambda kd: kd[0],
    ),
)


def sort_param(sort: list[tuple[str, bool]], as_list: bool) -> object:
    keys = [("-" if desc else "") + key for key, desc in sort]
    return keys if as_list else ",".join(keys)


# --- the reference --------------------------------------------------------------------

FORMATS = {
    4: "year",
    7: "month",
    10: "day",
}


def ref_range(text: str) -> tuple[datetime, datetime]:
    """The [start, end) range a UTC date value of the generated forms stands for."""
    if len(text) == 4:
        start = datetime(int(text), 1, 1, tzinfo=UTC)
        return start, start.replace(year=start.year + 1)
    if len(text) == 7:
        y, m = int(text[:4]), int(text[5:7])
        start = datetime(y, m, 1, tzinfo=UTC)
        return start, datetime(y + m // 12, m % 12 + 1, 1, tzinfo=UTC)
    if len(text) == 10:
        start = datetime.fromisoformat(text).replace(tzinfo=UTC)
        return start, start + timedelta(days=1)
    start = datetime.fromisoformat(text)
    step = timedelta(minutes=1) if len(text) == 17 else timedelta(seconds=1)
    return start, start + step


def ref_date_match(value: str | None, prefix: str, text: str) -> bool:
    if value is None:
        return False
    t = datetime.fromisoformat(value)
    lo, hi = ref_range(text)
    return {
        "eq": lo <= t < hi,
        "ne": not (lo <= t < hi),
        "lt": t < lo,
        "eb": t < lo,
        "le": t < hi,
        "gt": t >= hi,
        "sa": t >= hi,
        "ge": t >= lo,
    }[prefix]


def wire_value(task: Task, name: str) -> str | None:
    attr = re.sub(r"[A-Z]", lambda m: "_" + m.group().lower(), name)
    value = getattr(task, attr)
    return None if value is None else str(value.value if hasattr(value, "value") else value)


def io_text(item: Any) -> str:
    value = item.value
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def ref_words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def ref_text_match(task: Task, query: str) -> bool:
    fields = [task.description, task.note, task.business_status, task.code]
    fields += [io_text(i) for i in (*task.input, *task.output)]
    words = [w for f in fields if f for w in ref_words(f)]
    return all(any(w.startswith(q) for w in words) for q in ref_words(query))


TERMINAL = {"completed", "cancelled", "failed", "rejected"}


def split_values(raw: object) -> list[Any]:
    if isinstance(raw, str):
        return raw.split(",")
    assert isinstance(raw, list)
    return raw


def ref_match(task: Task, chosen: Mapping[str, object], now: datetime) -> bool:
    period = task.execution_period
    dates = {
        "authoredOn": task.authored_on,
        "lastModified": task.last_modified,
        "periodStart": period.start if period else None,
        "periodEnd": period.end if period else None,
    }
    for name, raw in chosen.items():
        if name in EQUALITY:
            value = wire_value(task, name)
            if isinstance(raw, Mapping):
                if "not" in raw and value in raw["not"]:
                    return False
                if "missing" in raw and (value is None) != raw["missing"]:
                    return False
            elif raw is None:
                if value is not None:
                    return False
            elif value not in split_values(raw):
                return False
        elif name in dates:
            if isinstance(raw, Mapping):
                if not all(ref_date_match(dates[name], p, v) for p, v in raw.items()):
                    return False
            elif not any(
                ref_date_match(dates[name], *((v[:2], v[2:]) if v[:2].isalpha() else ("eq", v)))
                for v in split_values(raw)
            ):
                return False
        elif name in ("basedOn", "partOf"):
            refs = task.based_on if name == "basedOn" else task.part_of
            if not set(refs) & set(split_values(raw)):
                return False
        elif name in ("input", "output"):
            items = task.input if name == "input" else task.output
            have = {(i.type, io_text(i)) for i in items}
            wanted = [v.partition("|") for v in split_values(raw)]
            if not any(
                any(t == kind and (not sep or v == value) for t, v in have)
                for kind, sep, value in wanted
            ):
                return False
        elif name == "text":
            assert isinstance(raw, str)
            if not ref_text_match(task, raw):
                return False
        elif name in ("overdue", "dueBefore"):
            end = dates["periodEnd"]
            if end is None or task.status.value in TERMINAL:
                return False
            limit = now if name == "overdue" else ref_range(str(raw))[0]
            if not datetime.fromisoformat(end) < limit:
                return False
        else:  # pragma: no cover - the strategies only make the names above
            raise AssertionError(name)
    return True


def ref_sort_key(task: Task, key: str) -> Any:
    period = task.execution_period
    if key == "authoredOn":
        return task.authored_on
    if key == "lastModified":
        return task.last_modified
    if key == "priority":
        # Wire ascending = least urgent first; missing is below routine.
        order = {None: 0, "routine": 1, "urgent": 2, "asap": 3, "stat": 4}
        return order[None if task.priority is None else task.priority.value]
    if key == "status":
        return task.status.value
    end = period.end if period else None
    return "~" if end is None else end


def ref_order(tasks: list[Task], sort: list[tuple[str, bool]] | None) -> list[Task]:
    sort = sort or [("authoredOn", True)]
    ordered = sorted(tasks, key=lambda t: str(t.id), reverse=sort[-1][1])
    for key, desc in reversed(sort):
        ordered.sort(key=lambda t, k=key: ref_sort_key(t, k), reverse=desc)  # type: ignore[misc]
    return ordered


def reference(
    tasks: Mapping[str, Task],
    chosen: Mapping[str, object],
    sort: list[tuple[str, bool]] | None,
    now: datetime,
) -> list[str]:
    matching = [t for t in tasks.values() if ref_match(t, chosen, now)]
    return [str(t.id) for t in ref_order(matching, sort)]


def expects_refusal(chosen: Mapping[str, object]) -> bool:
    """Filters the store documents as errors (the strategies make a few on purpose)."""
    text = chosen.get("text")
    if isinstance(text, str) and not ref_words(text):
        return True
    status = chosen.get("status")
    return isinstance(status, Mapping) and set(status["not"]) >= set(ENUMS["status"])


# --- the properties -------------------------------------------------------------------


@pytest.fixture
def store() -> Iterator[TaskStore]:
    s = TaskStore.open(":memory:")
    yield s
    s.close()


def all_pages(
    store: TaskStore, query: dict[str, object], page: Callable[[], int]
) -> Iterator[list[str]]:
    cursor: object = None
    while True:
        args = dict(query, limit=page())
        if cursor is not None:
            args["cursor"] = cursor
        response = store.tasks.search(args)
        yield [str(t.id) for t in response.data]
        cursor = response.meta["nextCursor"]
        if cursor is None:
            return


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    requests=st.lists(task_requests(), max_size=25),
    chosen=filters(),
    sort=sorts,
    sort_as_list=st.booleans(),
    page_sizes=st.lists(st.integers(1, 7), min_size=1, max_size=5),
)
def test_search_pages_equal_the_reference_in_order_and_count_agrees(
    requests: list[dict[str, object]],
    chosen: dict[str, object],
    sort: list[tuple[str, bool]] | None,
    sort_as_list: bool,
    page_sizes: list[int],
) -> None:
    with TaskStore.open(":memory:") as store:
        created = store.tasks.create_many(requests).data
        tasks = {str(t.id): t for t in created}
        query = dict(chosen)
        if sort is not None:
            query["sort"] = sort_param(sort, sort_as_list)
        if expects_refusal(chosen):
            with pytest.raises(ValidationError):
                store.tasks.search(query)
            return
        now = datetime.now(UTC)
        expected = reference(tasks, chosen, sort, now)
        sizes = iter(page_sizes * 50)
        pages = list(all_pages(store, query, lambda: next(sizes)))
        assert [i for p in pages for i in p] == expected
        compiled, _ = compile_search(normalise_filters(dict(query, limit=1000), {}))
        if compiled.dense is not None:  # the membership-probing variant agrees too
            with store.read() as conn:
                rows = conn.execute(compiled.dense[2], compiled.dense[3]).fetchall()
            assert [r[-1] for r in rows] == expected
        assert store.tasks.count(chosen).data == len(expected)
        first = store.tasks.search(dict(query, total=True, limit=3))
        assert first.meta["total"] == len(expected)


@st.composite
def changes(draw: st.DrawFn) -> list[tuple[str, Any]]:
    ops = draw(
        st.lists(st.sampled_from(["insert", "update", "delete", "nothing"]), min_size=1, max_size=4)
    )
    out: list[tuple[str, Any]] = []
    for op in ops:
        if op == "insert":
            out.append((op, draw(task_requests())))
        elif op == "update":
            out.append(
                (
                    op,
                    (
                        draw(st.integers(0, 10_000)),
                        {
                            "authoredOn": draw(st.sampled_from(INSTANTS)),
                            "priority": draw(maybe(st.sampled_from(PRIORITIES))),
                            "ownerId": draw(maybe(st.sampled_from(IDS["ownerId"]))),
                            "executionPeriod": draw(
                                maybe(st.builds(lambda e: {"end": e}, st.sampled_from(INSTANTS)))
                            ),
                        },
                    ),
                )
            )
        elif op == "delete":
            out.append((op, draw(st.integers(0, 10_000))))
    return out


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    requests=st.lists(task_requests(), min_size=1, max_size=30),
    chosen=st.one_of(
        st.just({}),
        st.builds(lambda v: {"ownerId": v}, equality_filter("ownerId")),
        st.builds(lambda v: {"status": v}, equality_filter("status")),
    ),
    sort=sorts,
    page_sizes=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    between=st.lists(changes(), max_size=8),
)
def test_paging_under_concurrent_changes_sees_each_unchanged_task_exactly_once(
    requests: list[dict[str, object]],
    chosen: dict[str, object],
    sort: list[tuple[str, bool]] | None,
    page_sizes: list[int],
    between: list[list[tuple[str, Any]]],
) -> None:
    with TaskStore.open(":memory:") as store:
        created = store.tasks.create_many(requests).data
        tasks = {str(t.id): t for t in created}
        query = dict(chosen)
        if sort is not None:
            query["sort"] = sort_param(sort, False)
        before = set(reference(tasks, chosen, sort, datetime.now(UTC)))
        touched: set[str] = set()
        seen: list[str] = []
        sizes = iter(page_sizes * 100)
        rounds = iter(between)
        for page in all_pages(store, query, lambda: next(sizes)):
            seen.extend(page)
            for op, arg in next(rounds, []):
                live = sorted(tasks)
                if op == "insert":
                    new = store.tasks.create(arg).data
                    tasks[str(new.id)] = new
                    touched.add(str(new.id))
                elif op == "update" and live:
                    index, change = arg
                    task_id = live[index % len(live)]
                    updated = store.tasks.update(task_id, dict(change)).data
                    tasks[task_id] = updated
                    touched.add(task_id)
                elif op == "delete" and live:
                    task_id = live[arg % len(live)]
                    store.tasks.delete(task_id)
                    del tasks[task_id]
                    touched.add(task_id)
        unchanged = before - touched
        for task_id in unchanged:
            assert seen.count(task_id) == 1, task_id
        # Nothing outside the filter leaks in, and no task is repeated unless it moved.
        assert len(seen) - len(set(seen)) <= len(touched)
        assert set(seen) <= before | touched
