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

from collections.abc import Callable
from typing import Any, Literal

import attrs

from ..errors import ValidationError
from ..remotes.base import Remote
from ..remotes.clinik import ClinikRemote
from ..remotes.fhir import FhirR4Remote
from ..remotes.transport import check_base_url

__all__ = ["REMOTE_KINDS", "SyncConfig"]

#: The remotes ``SyncConfig(remote=...)`` builds by name from ``base_url``/``token_provider``.
REMOTE_KINDS = ("clinik", "fhir-r4")
RemoteKind = Literal["clinik", "fhir-r4"]


def _positive(name: str, low: float, high: float) -> Callable[[Any, Any, Any], None]:
    def check(_instance: Any, _attribute: Any, value: Any) -> None:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not (low <= value <= high)
        ):
            raise ValidationError.single(name, "is out of range", value, f"{low}..{high}")

    return check


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
    """

    remote: Remote | RemoteKind | None = attrs.field(
        default=None, validator=_check_remote, repr=False
    )
    base_url: str | None = None
    token_provider: Callable[[], str] | None = attrs.field(
        default=None, validator=_check_provider, repr=False
    )
    timeout: float = attrs.field(default=10.0, validator=_positive("timeout", 0.001, 3600))
    batch_size: int = attrs.field(default=200, validator=_positive("batch_size", 1, 10_000))
    lanes: int = attrs.field(default=2, validator=_positive("lanes", 1, 16))
    backoff_base: float = attrs.field(default=1.0, validator=_positive("backoff_base", 0, 3600))
    backoff_cap: float = attrs.field(default=300.0, validator=_positive("backoff_cap", 0, 86_400))
    max_retry_after: float = attrs.field(
        default=3600.0, validator=_positive("max_retry_after", 0, 86_400)
    )
    allow_insecure_http: bool = False
    ca_bundle: str | None = None
    jitter_seed: int | None = None

    def __attrs_post_init__(self) -> None:
        if self.remote is None or isinstance(self.remote, str) or self.base_url is not None:
            check_base_url(self.base_url, self.allow_insecure_http)

    def make_remote(self) -> Remote:
        """The injected remote, or the named one (clinik by default) at ``base_url``."""
        if self.remote is not None and not isinstance(self.remote, str):
            return self.remote
        assert self.base_url is not None
        assert self.token_provider is not None
        if self.remote == "fhir-r4":
            return FhirR4Remote(
                self.base_url,
                self.token_provider,
                timeout=self.timeout,
                allow_insecure_http=self.allow_insecure_http,
                ca_bundle=self.ca_bundle,
                lanes=self.lanes,
            )
        return ClinikRemote(
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
