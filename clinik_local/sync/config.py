"""``SyncConfig``: what a store syncs with, and how patiently.

The remote is the seam: by default the config builds a
:class:`~clinik_local.remotes.clinik.ClinikRemote` from ``base_url`` and
``token_provider``; ``remote="fhir-r4"`` builds a
:class:`~clinik_local.remotes.fhir.FhirR4Remote` from the same two instead (a FHIR R4
server, with its default options); ``remote=`` also takes any
:class:`~clinik_local.remotes.base.Remote` object (a ``FhirR4Remote`` with options of
its own, or a test double), and then ``base_url``/``token_provider`` are not needed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import attrs

from ..errors import FieldError, ValidationError
from ..model import TaskPriority, TaskStatus
from ..remotes.base import SCOPE_FILTERS, Remote, Scope, is_pull_remote
from ..remotes.clinik import ClinikRemote
from ..remotes.fhir import FhirR4Remote
from ..remotes.transport import check_base_url, check_flag, check_range, tls_verify
from ..wire import dumps

if TYPE_CHECKING:
    from .conflicts import SyncConflict

__all__ = [
    "REMOTE_KINDS",
    "ConflictPolicy",
    "ConflictPolicyResult",
    "SyncConfig",
    "check_range",
    "normalise_scope",
]

#: The remotes ``SyncConfig(remote=...)`` builds by name from ``base_url``/``token_provider``.
REMOTE_KINDS = ("clinik", "fhir-r4")
RemoteKind = Literal["clinik", "fhir-r4"]

ConflictPolicyResult: TypeAlias = Literal["local", "remote"] | Mapping[str, object] | None
"""What an ``on_conflict`` policy returns: how to resolve (as ``store.sync.resolve``'s
``keep``), or None to leave the conflict to the app."""
ConflictPolicy: TypeAlias = Callable[["SyncConflict"], ConflictPolicyResult]

_MAX_SCOPE_VALUES = 100
_MAX_SCOPE_VALUE = 256
_ENUM_VALUES = {
    "status": tuple(m.value for m in TaskStatus),
    "priority": tuple(m.value for m in TaskPriority),
}


def normalise_scope(scope: object) -> Scope | None:
    """A scope as the engine keeps it (filter -> sorted distinct values), or None.

    ValidationError naming each bad filter or value: names must be the contract's
    (:data:`~clinik_local.remotes.base.SCOPE_FILTERS`), values a non-empty string or a
    non-empty list of them (no commas: a comma means "or" on the wire), ``status`` and
    ``priority`` values the lifecycle's.
    """
    if scope is None:
        return None
    if not isinstance(scope, Mapping):
        raise ValidationError.single(
            "scope", "expected a mapping of filter names to values, or None", type(scope)
        )
    problems: list[FieldError] = []
    out: dict[str, tuple[str, ...]] = {}
    for name, raw in scope.items():
        where = f"scope.{name}"
        if name not in SCOPE_FILTERS:
            problems.append(
                FieldError(where, "is not a filter a scope may use", None, ", ".join(SCOPE_FILTERS))
            )
            continue
        values = [raw] if isinstance(raw, str) else raw
        if not isinstance(values, (list, tuple)) or not values or len(values) > _MAX_SCOPE_VALUES:
            problems.append(
                FieldError(
                    where,
                    "expected a string or a list of strings",
                    repr(raw)[:80],
                    f"1-{_MAX_SCOPE_VALUES} values",
                )
            )
            continue
        good: set[str] = set()
        for index, value in enumerate(values):
            allowed = _ENUM_VALUES.get(name)
            if (
                not isinstance(value, str)
                or not value.strip()
                or "," in value
                or len(value) > _MAX_SCOPE_VALUE
            ):
                problems.append(
                    FieldError(
                        f"{where}[{index}]",
                        "is not a value a scope may use",
                        repr(value)[:80],
                        f"a non-empty string without commas, at most {_MAX_SCOPE_VALUE}",
                    )
                )
            elif allowed is not None and value not in allowed:
                problems.append(
                    FieldError(
                        f"{where}[{index}]", "is not an allowed value", value, ", ".join(allowed)
                    )
                )
            else:
                good.add(value)
        out[str(name)] = tuple(sorted(good))
    if problems:
        raise ValidationError(problems)
    return MappingProxyType(dict(sorted(out.items())))


def scope_text(scope: Scope | None) -> str:
    """The canonical text of a scope (what the store records): ``{}`` for every task."""
    return dumps({k: list(v) for k, v in sorted((scope or {}).items())})


def _check_policy(_instance: Any, _attribute: Any, value: Any) -> None:
    if value is not None and not callable(value):
        raise ValidationError.single(
            "on_conflict", "must be a callable taking a SyncConflict, or None", type(value)
        )


def _positive(
    name: str, low: float, high: float, *, whole: bool = False
) -> Callable[[Any, Any, Any], None]:
    def check(_instance: Any, _attribute: Any, value: Any) -> None:
        check_range(name, value, low, high, whole=whole)

    return check


def _check_flag(_instance: Any, attribute: Any, value: Any) -> None:
    check_flag(attribute.name, value)


def _check_ca_bundle(_instance: Any, _attribute: Any, value: Any) -> None:
    tls_verify(value)  # read now: a missing or unreadable file is refused here


def _path_text(value: object) -> object:
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def _check_seed(_instance: Any, _attribute: Any, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValidationError.single("jitter_seed", "expected a whole number or None", value)


def _check_provider(instance: Any, _attribute: Any, value: Any) -> None:
    if value is None and instance.remote is not None and not isinstance(instance.remote, str):
        return
    if not callable(value):
        raise ValidationError.single(
            "token_provider", "must be a callable returning the bearer token", type(value)
        )


def _check_remote(_instance: Any, _attribute: Any, value: Any) -> None:
    if isinstance(value, str):
        if value not in REMOTE_KINDS:
            raise ValidationError.single(
                "remote", "is not a known remote", value, ", ".join(REMOTE_KINDS)
            )
        return
    if value is not None and not (
        callable(getattr(value, "push", None)) and callable(getattr(value, "close", None))
    ):
        raise ValidationError.single(
            "remote",
            "must be a Remote (with push() and close()) or a remote's name",
            type(value),
            ", ".join(REMOTE_KINDS),
        )


@attrs.frozen(kw_only=True)
class SyncConfig:
    """How a store syncs: where to, with which token, and how patiently.

    ``base_url`` is the service's API root (``https://clinic-host/api/v1``); plain
    ``http`` only to a loopback host unless ``allow_insecure_http``. ``token_provider``
    is called for the bearer token (again after a 401); the token is never stored.
    ``backoff_base``/``backoff_cap`` (seconds) shape the retry delays: a full-jitter
    delay in ``[0, min(cap, base * 2**attempts))``. ``timeout`` bounds each request.
    ``batch_size`` outbox rows are read, marked and recorded per transaction.
    ``lanes`` connections send at once; each task's changes always go through the
    same lane, one after another, so per-task order holds.
    ``ca_bundle``: a CA file to trust instead of the system's (TLS is always verified).
    ``remote``: which service ``base_url`` is: ``"clinik"`` (the default, the clinik
    sync contract) or ``"fhir-r4"`` (a FHIR R4 server, ``base_url`` its FHIR base such as
    ``https://host/fhir/R4``); or a :class:`~clinik_local.remotes.base.Remote` object to
    use instead (then ``base_url``/``token_provider`` may be omitted).

    Two-way sync: ``pull`` (default True) keeps the store a replica of the server's
    tasks in ``scope``: a mapping of the contract's filter names (``patientId``,
    ``ownerId``, ``requesterId``, ``status``, ``priority``, ``code``) to a string or a
    list of strings (any of them; names AND together), e.g. ``{"ownerId":
    ["prac_lab_tech"]}``; ``None`` is every task. ``pull_interval`` (seconds) is how
    often a running engine reads the change log; ``pull_limit`` the page size of
    listings and log reads. ``on_conflict``: a policy called with each
    :class:`~clinik_local.sync.SyncConflict` as it is found (on the sync worker, outside
    any transaction): return a merged request, ``"local"``, ``"remote"``, or None to
    leave it to the app (the default); an exception in it is logged and counts as None.
    Pull needs a remote with the pull methods (:class:`~clinik_local.remotes.base.PullRemote`);
    with a push-only remote the store syncs one way and a ``scope`` is refused.
    """

    remote: Remote | RemoteKind | None = attrs.field(
        default=None, validator=_check_remote, repr=False
    )
    base_url: str | None = None
    token_provider: Callable[[], str] | None = attrs.field(
        default=None, validator=_check_provider, repr=False
    )
    timeout: float = attrs.field(default=10.0, validator=_positive("timeout", 0.001, 3600))
    batch_size: int = attrs.field(
        default=200, validator=_positive("batch_size", 1, 10_000, whole=True)
    )
    lanes: int = attrs.field(default=2, validator=_positive("lanes", 1, 16, whole=True))
    backoff_base: float = attrs.field(default=1.0, validator=_positive("backoff_base", 0, 3600))
    backoff_cap: float = attrs.field(default=300.0, validator=_positive("backoff_cap", 0, 86_400))
    max_retry_after: float = attrs.field(
        default=3600.0, validator=_positive("max_retry_after", 0, 86_400)
    )
    allow_insecure_http: bool = attrs.field(default=False, validator=_check_flag)
    ca_bundle: str | None = attrs.field(
        default=None, converter=_path_text, validator=_check_ca_bundle
    )
    jitter_seed: int | None = attrs.field(default=None, validator=_check_seed)
    pull: bool = attrs.field(default=True, validator=_check_flag)
    scope: Scope | None = attrs.field(default=None, converter=normalise_scope)
    pull_interval: float = attrs.field(
        default=3.0, validator=_positive("pull_interval", 0.01, 86_400)
    )
    pull_limit: int = attrs.field(
        default=1000, validator=_positive("pull_limit", 1, 1000, whole=True)
    )
    on_conflict: ConflictPolicy | None = attrs.field(
        default=None, validator=_check_policy, repr=False
    )

    def __attrs_post_init__(self) -> None:
        if self.remote is None or isinstance(self.remote, str) or self.base_url is not None:
            check_base_url(self.base_url, self.allow_insecure_http)
        if (
            self.scope
            and self.remote is not None
            and not isinstance(self.remote, str)
            and not is_pull_remote(self.remote)
        ):
            raise ValidationError.single(
                "scope",
                "needs a remote that can pull (list_page and changes_page); this one only pushes",
                type(self.remote),
            )

    @property
    def pulls(self) -> bool:
        """Whether this config pulls: ``pull`` and a remote that can."""
        return self.pull and (
            self.remote is None or isinstance(self.remote, str) or is_pull_remote(self.remote)
        )

    def service_id(self) -> str:
        """Which service the sync state belongs to (recorded in the store): the base
        URL, or an injected remote's ``service`` / ``base_url``, or its type's name."""
        if self.remote is None or isinstance(self.remote, str):
            assert self.base_url is not None
            if self.remote == "fhir-r4":
                return FhirR4Remote.service_of(self.base_url)
            return self.base_url
        for name in ("service", "base_url"):
            value = getattr(self.remote, name, None)
            if isinstance(value, str) and value:
                return value
        kind = type(self.remote)
        return f"{kind.__module__}.{kind.__qualname__}"

    def scope_text(self) -> str:
        """The canonical text of the scope, as the store records it."""
        return scope_text(self.scope)

    def make_remote(self) -> Remote:
        """The injected remote, or the named one (clinik by default) at ``base_url``."""
        if self.remote is not None and not isinstance(self.remote, str):
            return self.remote
        assert self.base_url is not None
        assert self.token_provider is not None
        named: type[FhirR4Remote] | type[ClinikRemote]
        named = FhirR4Remote if self.remote == "fhir-r4" else ClinikRemote
        return named(
            self.base_url,
            self.token_provider,
            timeout=self.timeout,
            allow_insecure_http=self.allow_insecure_http,
            ca_bundle=self.ca_bundle,
            lanes=self.lanes,
        )

    def describe(self) -> str:
        """Where this syncs to, for reprs and logs (never the token)."""
        return self.base_url if self.base_url is not None else repr(self.remote)
