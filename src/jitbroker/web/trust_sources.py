"""The key sources of a ``Trust``'s issuers, loaded without holding up the service.

An issuer's keys come from its JWKS, found by OIDC discovery unless the rule
names ``jwks_url``. A ``Trust`` tries every issuer when it is built; an issuer
that cannot be reached then (GitHub is down, the cluster's API server is
restarting) is logged and tried again when a caller presents its token, at
most once per ``retry_interval``, so a broker restarted during one issuer's
outage still serves every other caller. Until its keys load, that issuer's
tokens are answered with ``KeySourceError`` (a 503 with ``Retry-After`` at the
token endpoint: try again), never accepted. Rules that name one JWKS URL, or
one issuer and no URL, share one source.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from contextvars import ContextVar

from ..clock import Clock
from ..errors import KeySourceError
from . import assertions
from .assertions import IssuerSource

__all__ = ["IssuerKeys", "Sources", "WouldBlock", "may_wait", "without_waiting"]

log = logging.getLogger("jitbroker.web")
RETRY_INTERVAL = 10.0
_NO_WAIT: ContextVar[bool] = ContextVar("jitbroker_trust_no_wait", default=False)


class WouldBlock(Exception):
    """Authentication got to a point where it would wait (a JWKS or discovery
    fetch, a client secret's scrypt) while called ``without_waiting``: call it
    again where waiting is fine (a worker thread). Raised before anything is
    spent, so the second call sees the request as the first did."""


def may_wait() -> None:
    """Mark a point that waits: ``WouldBlock`` under ``without_waiting``."""
    if _NO_WAIT.get():
        raise WouldBlock


@contextlib.contextmanager
def without_waiting() -> Iterator[None]:
    """Run authentication on the event loop for as long as it does not wait."""
    token = _NO_WAIT.set(True)
    try:
        yield
    finally:
        _NO_WAIT.reset(token)


class Sources:
    """The ``IssuerSource`` of each JWKS URL, made once and shared."""

    def __init__(self, *, timeout: float, clock: Clock) -> None:
        self.timeout = timeout
        self.clock = clock
        self._by_url: dict[str, IssuerSource] = {}
        self._lock = threading.Lock()

    def of(self, url: str, allow_http: bool) -> IssuerSource:
        with self._lock:
            source = self._by_url.get(url)
        if source is None:  # fetched outside the lock: one slow issuer holds up no other
            made = IssuerSource(url, allow_http=allow_http, timeout=self.timeout, clock=self.clock)
            with self._lock:
                source = self._by_url.setdefault(url, made)
        return source

    def loaded(self) -> tuple[IssuerSource, ...]:
        with self._lock:
            return tuple(self._by_url.values())


class IssuerKeys:
    """One issuer's key source: discovered and fetched now if it can be, else on
    the first token that needs it (``source()``), retried at most once per
    ``retry_interval`` seconds."""

    def __init__(
        self,
        issuer: str,
        jwks_url: str | None,
        *,
        allow_http: bool,
        sources: Sources,
        retry_interval: float = RETRY_INTERVAL,
    ) -> None:
        self.issuer = issuer
        self.jwks_url = jwks_url
        self.allow_http = allow_http
        self._sources = sources
        self._retry_interval = retry_interval
        self._lock = threading.Lock()
        self._source: IssuerSource | None = None
        self._failed_at: float | None = None
        self._failure = ""
        try:
            self.source()
        except KeySourceError as exc:
            log.warning(
                "the keys of issuer %s are not available yet (retried on use): %s", issuer, exc
            )

    @property
    def ready(self) -> bool:
        """True once the keys are loaded."""
        return self._source is not None

    def source(self) -> IssuerSource:
        """The loaded source, or ``KeySourceError`` while it cannot be had."""
        source = self._source
        if source is not None:
            return source
        may_wait()
        with self._lock:  # one attempt at a time; the others wait for its outcome
            if self._source is not None:
                return self._source
            now = self._sources.clock()
            if self._failed_at is not None and now - self._failed_at < self._retry_interval:
                raise KeySourceError(self._failure)
            try:
                url = self.jwks_url or assertions.discover(
                    self.issuer, allow_http=self.allow_http, timeout=self._sources.timeout
                )
                self._source = self._sources.of(url, self.allow_http)
            except KeySourceError as exc:
                self._failed_at, self._failure = now, str(exc)
                raise
            return self._source
