"""The HTTP transport of the remotes: pooled keep-alive httpx clients, one per lane.

Why httpx: a well-kept client with connection pooling, keep-alive, per-phase timeouts
and TLS verification on by default. This module adds the rules of the contract:

- TLS verification is always on (a custom CA bundle may be given, never "off").
- Plain ``http://`` only to a loopback host, unless ``allow_insecure_http=True``.
- The bearer token comes from the user's provider; it is kept in memory only, asked
  again on a 401 (:meth:`Transport.refresh_token`), and never appears in a log line,
  a database row or an exception message.
- Network failures come out as :class:`~clinik_local.errors.TransportError` (the httpx
  exception as ``__cause__``), never as httpx exceptions: :meth:`Transport.request` is
  the one boundary where foreign exceptions are mapped. A service that cannot be
  reached at all is :class:`ConnectFailed` (a TransportError).

The seam for tests and other wires: ``http_transport=`` takes any
``httpx.BaseTransport`` (``httpx.MockTransport(handler)`` in unit tests), so a remote
can be exercised without a live server. :class:`Response` carries the headers
(``ETag``, ``Location``, ``Retry-After``, ...) for remotes that need them.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import ssl
import threading
from collections.abc import Callable, Mapping
from types import MappingProxyType

import attrs
import httpx

from ..errors import AuthError, TransportError, ValidationError
from .base import AuthFailed, Transient, Unreachable

__all__ = [
    "ConnectFailed",
    "LazyTransport",
    "Response",
    "Transport",
    "check_base_url",
    "check_connection",
    "check_flag",
    "check_range",
    "no_answer",
    "tls_verify",
]

_LOOPBACK_NAMES = {"localhost", "localhost.localdomain"}


class ConnectFailed(TransportError):
    """The service could not be reached at all (refused, unreachable, DNS, TLS)."""


def no_answer(
    exc: TransportError | AuthError, transport: Transport
) -> Unreachable | Transient | AuthFailed:
    """What a request that got no usable answer means for a remote's caller: the one
    mapping of the transport's failures, shared by every remote.

    :class:`ConnectFailed` is unreachable (the engine waits for the network), any other
    network failure transient (retried with backoff), an :class:`AuthError` (the token
    provider failed, or its token cannot be sent) an auth failure, and the token is
    forgotten so the next request asks the provider again.
    """
    if isinstance(exc, ConnectFailed):
        return Unreachable(message=str(exc))
    if isinstance(exc, TransportError):
        return Transient(error=str(exc))
    transport.forget_token()
    return AuthFailed(message=str(exc))


def _headers(value: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType({k.lower(): v for k, v in value.items()})


@attrs.frozen
class Response:
    """An HTTP answer: status, headers (names lower-cased), and the body text."""

    status: int
    headers: Mapping[str, str] = attrs.field(converter=_headers)
    body: str

    def header(self, name: str) -> str | None:
        """One header's value (case-insensitive), or None."""
        return self.headers.get(name.lower())


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_base_url(base_url: object, allow_insecure_http: bool) -> str:
    """The base URL without a trailing slash; ValidationError if it is not allowed."""
    if not isinstance(base_url, str) or not base_url:
        raise ValidationError.single("base_url", "expected an http(s) URL", base_url)
    try:
        url = httpx.URL(base_url)
    except (httpx.InvalidURL, TypeError):
        raise ValidationError.single("base_url", "is not a URL", base_url) from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValidationError.single(
            "base_url", "expected an http(s) URL with a host", base_url, "https://host/api/v1"
        )
    if url.scheme == "http" and not allow_insecure_http and not _is_loopback(url.host):
        raise ValidationError.single(
            "base_url",
            "plain http is allowed only to a loopback host; use https, or pass "
            "allow_insecure_http=True if you really mean it",
            base_url,
        )
    return base_url.rstrip("/")


def check_range(name: str, value: object, low: float, high: float, *, whole: bool = False) -> None:
    """ValidationError naming ``name`` unless ``value`` is a number (not a bool, not
    NaN; an ``int`` where ``whole``) from ``low`` to ``high``: the one check of every
    numeric setting of the remotes and of sync, and of the engine's arguments."""
    kinds = int if whole else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not (low <= value <= high):
        allowed = f"a whole number {low:g}..{high:g}" if whole else f"{low}..{high}"
        raise ValidationError.single(name, "is out of range", value, allowed)


def check_flag(name: str, value: object) -> None:
    """ValidationError naming ``name`` unless ``value`` is True or False (a truthy
    string such as ``"no"`` must not switch a security setting on)."""
    if not isinstance(value, bool):
        raise ValidationError.single(name, "expected True or False", value)


def tls_verify(ca_bundle: object) -> ssl.SSLContext | bool:
    """What the clients verify TLS with: the system's CAs (True), or a context trusting
    the PEM file ``ca_bundle``, read now, so a missing or unreadable file is a
    ValidationError naming ``ca_bundle`` when the settings are made, not an OSError on
    the first request."""
    if ca_bundle is None:
        return True
    if not isinstance(ca_bundle, (str, os.PathLike)) or isinstance(ca_bundle, bytes):
        raise ValidationError.single(
            "ca_bundle", "expected the path of a PEM CA file, or None", type(ca_bundle)
        )
    path = os.fspath(ca_bundle)
    try:
        return ssl.create_default_context(cafile=path)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise ValidationError.single(
            "ca_bundle", f"cannot be read as a PEM CA file ({type(exc).__name__})", path
        ) from None


def check_connection(
    token_provider: object,
    *,
    timeout: object,
    allow_insecure_http: object,
    lanes: object,
    http_transport: object,
) -> None:
    """The connection settings every remote takes (beside ``base_url`` and
    ``ca_bundle``, checked by :func:`check_base_url` and :func:`tls_verify`): each bad
    one a ValidationError naming it, before anything is sent."""
    if not callable(token_provider):
        raise ValidationError.single(
            "token_provider", "must be a callable returning the bearer token", type(token_provider)
        )
    check_range("timeout", timeout, 0.001, 3600)
    check_flag("allow_insecure_http", allow_insecure_http)
    check_range("lanes", lanes, 1, 16, whole=True)
    if http_transport is not None and not isinstance(http_transport, httpx.BaseTransport):
        raise ValidationError.single(
            "http_transport", "expected an httpx.BaseTransport, or None", type(http_transport)
        )


class Transport:
    """Sends requests to the remote service over keep-alive connections, one per lane.

    Each lane is its own httpx client holding one connection, used by one thread at a
    time; the token is shared by the lanes.
    """

    def __init__(
        self,
        base_url: str,
        token_provider: Callable[[], str],
        *,
        timeout: float,
        allow_insecure_http: bool = False,
        verify: ssl.SSLContext | bool = True,
        lanes: int = 1,
        http_transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._base = check_base_url(base_url, allow_insecure_http)
        self._provider = token_provider
        self._token: str | None = None
        self._token_lock = threading.Lock()
        self._clients = [
            httpx.Client(
                timeout=httpx.Timeout(timeout),
                limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
                verify=verify,
                headers={"Content-Type": "application/json", "Accept": "application/json"},
                follow_redirects=False,
                transport=http_transport,
            )
            for _ in range(lanes)
        ]

    def __repr__(self) -> str:  # no token here, ever
        return f"<Transport {self._base}>"

    def _current_token(self) -> str:
        token = self._token
        if token is None:
            token = self.refresh_token()
        return token

    def refresh_token(self) -> str:
        """Ask the provider for a token (again). AuthError if it fails or gives nothing."""
        with self._token_lock:
            try:
                token = self._provider()
            except Exception as exc:
                self._token = None
                raise AuthError(f"the token provider failed ({type(exc).__name__})") from None
            if not isinstance(token, str) or not token:
                self._token = None
                raise AuthError("the token provider returned no token")
            if not all("\x21" <= c <= "\x7e" for c in token):
                # A trailing newline (a token read from a file) or any other character an
                # HTTP header cannot carry: no request could ever be sent with it, so this
                # is the token's fault, not the network's. The token itself is not shown.
                self._token = None
                raise AuthError(
                    "the token from the token provider has a character an HTTP header "
                    "cannot carry (whitespace such as a trailing newline, a control or a "
                    "non-ASCII character); strip it, e.g. token.strip()"
                )
            self._token = token
            return token

    def forget_token(self) -> None:
        """Drop the in-memory token; the next request asks the provider."""
        self._token = None

    def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        lane: int = 0,
    ) -> Response:
        """Send one request; TransportError on network failure (connect, read, timeout)."""
        all_headers = {"Authorization": f"Bearer {self._current_token()}"}
        if headers:
            all_headers.update(headers)
        try:
            answer = self._clients[lane].request(
                method, self._base + path, content=body, headers=all_headers
            )
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise ConnectFailed(f"cannot connect to {self._base}: {type(exc).__name__}") from exc
        except httpx.TimeoutException as exc:
            raise TransportError(f"{method} {path} timed out ({type(exc).__name__})") from exc
        except (httpx.HTTPError, OSError) as exc:
            raise TransportError(f"{method} {path} failed: {type(exc).__name__}") from exc
        except Exception as exc:
            # httpx maps httpcore's errors, but one raw httpcore.RemoteProtocolError was seen
            # escaping under heavy load; whatever the client raises is a transport failure
            # (retried with the same key), never a crash of the sync worker.
            raise TransportError(f"{method} {path} failed: {type(exc).__name__}") from exc
        return Response(answer.status_code, dict(answer.headers), answer.text)

    def close(self) -> None:
        """Close every lane's connection."""
        for client in self._clients:
            client.close()


class LazyTransport:
    """A remote's :class:`Transport`, made on first use and closed by :meth:`close`
    (the next use makes a new one); safe from the engine's lanes at once.

    What every remote holds of its connections: a remote built in a config opens no
    socket until the engine sends or reads. Its settings are checked here, when the
    remote is made (:func:`check_connection`, :func:`tls_verify`), so a bad one is a
    ValidationError naming it then, never a TypeError or OSError in the sync worker.
    """

    def __init__(
        self,
        base_url: str,
        token_provider: Callable[[], str],
        *,
        timeout: float,
        allow_insecure_http: bool = False,
        ca_bundle: str | None = None,
        lanes: int = 1,
        http_transport: httpx.BaseTransport | None = None,
    ) -> None:
        check_connection(
            token_provider,
            timeout=timeout,
            allow_insecure_http=allow_insecure_http,
            lanes=lanes,
            http_transport=http_transport,
        )
        self._make = functools.partial(
            Transport,
            base_url,  # checked by the remote that holds this, and by Transport
            token_provider,
            timeout=timeout,
            allow_insecure_http=allow_insecure_http,
            verify=tls_verify(ca_bundle),
            lanes=lanes,
            http_transport=http_transport,
        )
        self._transport: Transport | None = None
        self._lock = threading.Lock()

    def get(self) -> Transport:
        """The transport, made now if there is none."""
        with self._lock:
            if self._transport is None:
                self._transport = self._make()
            return self._transport

    def close(self) -> None:
        """Close the connections, if any were made."""
        with self._lock:
            transport, self._transport = self._transport, None
        if transport is not None:
            transport.close()
