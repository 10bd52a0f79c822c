"""``JWKSource``: the issuer's public keys, fetched from a JWKS URL and cached.

A verifier that only has a URL must not become a fetch amplifier or a file
reader for whoever sends it tokens:

- only ``https`` URLs (``http`` only with ``allow_http=True``, for tests and
  loopback); never ``file:``, ``data:``, ``ftp:`` or anything else, and a
  redirect to another scheme is refused (CVE-2026-48522);
- an unknown ``kid`` triggers at most one fetch per ``min_refresh_interval``,
  however many tokens name unknown keys (CVE-2026-48524); the keys are also
  refreshed every ``max_age`` seconds;
- the response is capped in size and parsed with the same strict JSON rules as
  tokens; it must be a public JWKS (no private keys, no HMAC secrets);
- a failed fetch keeps the keys already held and is logged; verification stays
  fail-closed (an unknown ``kid`` is rejected).
"""

from __future__ import annotations

import logging
import math
import threading
import urllib.error
import urllib.request
from http.client import HTTPMessage
from typing import IO
from urllib.parse import urlsplit

from .clock import Clock, Duration, seconds, system_clock
from .errors import InvalidRequest, KeySourceError, MalformedToken
from .keyring import KeyRing
from .tokens import strict_json_object

__all__ = ["MAX_JWKS_BYTES", "JWKSource", "parse_jwks"]

log = logging.getLogger("jitbroker")
MAX_JWKS_BYTES = 256 * 1024


class _SameSchemeRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to a scheme the source allows."""

    def __init__(self, schemes: frozenset[str]) -> None:
        self.schemes = schemes

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        if urlsplit(newurl).scheme.lower() not in self.schemes:
            raise KeySourceError("the JWKS URL redirected to a scheme that is not allowed")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class JWKSource:
    """A JWKS URL, fetched on creation and refreshed as described in the module doc.

    Args:
        url: the JWKS document's ``https`` URL.
        allow_http: also accept ``http`` (tests, loopback). Never other schemes.
        timeout: seconds per fetch.
        max_age: refresh the keys this often (seconds).
        min_refresh_interval: at most one fetch per this many seconds, whatever
            asks for it (unknown ``kid`` or age).
        clock: the time source.
    """

    def __init__(
        self,
        url: str,
        *,
        allow_http: bool = False,
        timeout: Duration = 5,
        max_age: Duration = 3600,
        min_refresh_interval: Duration = 60,
        clock: Clock = system_clock,
    ) -> None:
        self.schemes = frozenset({"https", "http"} if allow_http is True else {"https"})
        self.url = _check_url(url, self.schemes)
        parts = urlsplit(self.url)  # for messages: no credentials, no query
        self.where = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"
        self.timeout = seconds(timeout, "timeout")
        self.max_age = seconds(max_age, "max_age")
        self.min_refresh_interval = seconds(
            min_refresh_interval, "min_refresh_interval", allow_zero=True
        )
        self.clock = clock
        self._opener = urllib.request.build_opener(_SameSchemeRedirects(self.schemes))
        self._lock = threading.Lock()
        self._last_fetch = -math.inf
        self.keys = self._fetch()  # fail now, at startup, not at the first token
        self._fetched_at = self._last_fetch

    def __repr__(self) -> str:
        return f"<JWKSource {self.where!r} keys={len(self.keys)}>"

    def stale(self, now: float) -> bool:
        """True when the keys are older than ``max_age``."""
        return now - self._fetched_at >= self.max_age

    def refresh(self) -> bool:
        """Fetch the JWKS again unless a fetch happened within ``min_refresh_interval``.

        Returns True if new keys were loaded. A failed fetch keeps the current
        keys (and is logged); it still counts against the rate limit.
        """
        # Never wait for another thread's fetch: a flood of unknown kids must not
        # pile up threads behind a slow JWKS endpoint.
        if not self._lock.acquire(blocking=False):
            return False
        try:
            if self.clock() - self._last_fetch < self.min_refresh_interval:
                return False
            try:
                self.keys = self._fetch()
            except KeySourceError as exc:
                log.warning("JWKS refresh failed, keeping %d keys: %s", len(self.keys), exc)
                return False
            self._fetched_at = self._last_fetch
            return True
        finally:
            self._lock.release()

    def _fetch(self) -> KeyRing:
        self._last_fetch = self.clock()
        # The scheme was checked in the constructor (https, or http if allowed).
        request = urllib.request.Request(self.url, headers={"Accept": "application/json"})  # noqa: S310
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                body = response.read(MAX_JWKS_BYTES + 1)
        except KeySourceError:
            raise
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise KeySourceError(f"could not fetch the JWKS from {self.where}: {exc}") from exc
        if len(body) > MAX_JWKS_BYTES:
            raise KeySourceError(f"the JWKS at {self.where} is larger than {MAX_JWKS_BYTES} bytes")
        return parse_jwks(body, self.where)


def _check_url(url: object, schemes: frozenset[str]) -> str:
    if not isinstance(url, str) or not url:
        raise InvalidRequest("the JWKS URL must be a non-empty string")
    parts = urlsplit(url)
    if parts.scheme.lower() not in schemes:
        allowed = " or ".join(sorted(schemes))
        hint = "" if "http" in schemes else " (http only with allow_http=True)"
        raise InvalidRequest(f"the JWKS URL must use {allowed}{hint}, not {parts.scheme!r}")
    if not parts.hostname:
        raise InvalidRequest("the JWKS URL has no host")
    return url


def parse_jwks(body: bytes, origin: str) -> KeyRing:
    """A verify-only ring from a JWKS document's bytes; ``origin`` names it in errors."""
    try:
        document = strict_json_object(body, "JWKS")
    except MalformedToken as exc:
        raise KeySourceError(f"the JWKS at {origin} is not a strict JSON object") from exc
    try:
        return KeyRing.from_jwks(document)
    except InvalidRequest as exc:
        raise KeySourceError(f"the JWKS at {origin} was refused: {exc}") from exc
