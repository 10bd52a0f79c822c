"""``JWKSource``: the issuer's public keys, fetched from a JWKS URL and cached.

A verifier that only has a URL must not become a fetch amplifier or a file
reader for whoever sends it tokens:

- only ``https`` URLs (``http`` only with ``allow_http=True``, for tests and
  loopback); never ``file:``, ``data:``, ``ftp:`` or anything else, and a
  redirect to another scheme is refused (CVE-2026-48522); a URL (or redirect)
  with credentials (``user:password@``), a bad port or host, or whitespace is
  refused before any fetch: a JWKS is public, and ``http.client`` would quote
  such a URL, password included, in its errors;
- ``timeout`` bounds the whole fetch (connect, headers, body, redirects), not
  each socket read, so a server trickling a byte a second cannot hold the
  fetching thread (the DNS lookup is the system resolver's and not bounded);
- every error of the fetch (``urllib``, ``http.client``, ``socket``, ``ssl``)
  becomes ``KeySourceError``, the original chained as ``__cause__``, with a
  message that never quotes the URL's credentials or query;
- an unknown ``kid`` triggers at most one fetch per ``min_refresh_interval``,
  however many tokens name unknown keys (CVE-2026-48524); the keys are also
  refreshed every ``max_age`` seconds;
- a refresh runs in a background thread (one per source at most, started on
  demand, gone when the fetch ends), so callers keep verifying with the keys
  held while it runs; keys older than ``max_age + max_stale`` are not used any
  more: a caller then waits for the fetch (``Fetch``: bounded by ``timeout``,
  awaitable on an event loop) or gets ``KeySourceError``;
- the response is capped in size and parsed with the same strict JSON rules as
  tokens; it must be a public JWKS (no private keys, no HMAC secrets); keys
  whose ``use`` or ``key_ops`` rule out signatures (RFC 7517 4.2, 4.3) are
  skipped, so an encryption key never verifies a token;
- a failed fetch keeps the keys already held (until ``max_age + max_stale``) and
  is logged; verification stays fail-closed (an unknown ``kid`` is rejected).

For other documents of an issuer (its OpenID discovery document) the same
fetch is public: ``build_opener`` and ``fetch_bytes``; and a ``JWKSource``
subclass whose issuer names its keys otherwise (by its own ``kid``, not an
RFC 7638 thumbprint) overrides ``JWKSource.parse``.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import io
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Generator, Mapping
from concurrent.futures import Future
from contextvars import ContextVar
from http.client import HTTPMessage
from typing import IO, Any
from urllib.parse import urlsplit

from .clock import Clock, Duration, seconds, system_clock
from .errors import InvalidRequest, KeySourceError, MalformedToken
from .jwk import verifies_signatures
from .keyring import KeyRing
from .tokens import strict_json_object

__all__ = ["MAX_JWKS_BYTES", "Fetch", "JWKSource", "build_opener", "fetch_bytes", "parse_jwks"]

log = logging.getLogger("jitbroker")
MAX_JWKS_BYTES = 256 * 1024

# What a fetch can raise besides our own refusals: URLError, HTTPError,
# socket.timeout and ssl.SSLError are OSErrors; a bad chunk size or a port out
# of range is a ValueError; InvalidURL ("nonnumeric port: 'password@host'"),
# BadStatusLine, IncompleteRead and LineTooLong are HTTPExceptions, which
# urllib lets through untranslated.
_FETCH_ERRORS = (OSError, ValueError, http.client.HTTPException)

# The monotonic time by which the current thread's fetch must be done. A
# context variable because http.client builds the connection's response object
# itself, so the deadline cannot be handed down as an argument. Monotonic, not
# the injected clock: this bounds real elapsed time on the wire.
_deadline: ContextVar[float] = ContextVar("jitbroker_jwks_deadline")


def _time_left() -> float:
    """Seconds left for the current fetch; ``TimeoutError`` once they are spent."""
    left = _deadline.get() - time.monotonic()
    if left <= 0:
        raise TimeoutError("the JWKS fetch took longer than its timeout")
    return left


class _DeadlineReader(io.RawIOBase):
    """A socket's reads, each allowed only the time left for the whole fetch.

    ``http.client`` gives every read the full timeout, so a server sending a
    byte just before each one expires could hold the fetch for hours.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        # A file of the socket's own keeps it open after http.client closes
        # the connection's reference, as sock.makefile does for HTTPResponse.
        self._raw = sock.makefile("rb", buffering=0)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        self._sock.settimeout(_time_left())
        return self._raw.readinto(buffer)

    def close(self) -> None:
        self._raw.close()
        super().close()


class _DeadlineResponse(http.client.HTTPResponse):
    """An HTTP response whose status line, headers and body share the deadline."""

    def __init__(
        self,
        sock: socket.socket,
        debuglevel: int = 0,
        method: str | None = None,
        url: str | None = None,
    ) -> None:
        super().__init__(sock, debuglevel, method, url)
        self.fp.close()  # nothing was read from it yet: swap in the bounded reader
        self.fp = io.BufferedReader(_DeadlineReader(sock))


def _connect_in_time(
    address: tuple[str, int], timeout: float | None, source_address: Any = None
) -> socket.socket:
    """``socket.create_connection`` whose addresses share the time left, rather
    than each getting the full timeout (a host with several unreachable
    addresses would multiply it)."""
    error: OSError = OSError(f"no address found for {address[0]}")
    for family, kind, proto, _, addr in socket.getaddrinfo(*address, 0, socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(_time_left())
            if source_address:
                sock.bind(source_address)
            sock.connect(addr)
        except OSError as exc:
            sock.close()
            error = exc
        else:
            return sock
    raise error


def _connect(connection: http.client.HTTPConnection, connect: Callable[[], None]) -> None:
    """Run a connection's ``connect`` within the deadline, then give the socket
    (the request is sent next) only the time left."""
    connection._create_connection = _connect_in_time  # type: ignore[attr-defined]
    connect()
    connection.sock.settimeout(_time_left())


class _DeadlineHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection held to the fetch's deadline (connect and every read)."""

    response_class = _DeadlineResponse

    def connect(self) -> None:
        _connect(self, super().connect)


class _DeadlineHTTPSConnection(http.client.HTTPSConnection):
    """An HTTPS connection held to the fetch's deadline (connect, TLS handshake,
    every read): the handshake runs under the socket timeout, set to the time left."""

    response_class = _DeadlineResponse

    def connect(self) -> None:
        _connect(self, super().connect)


class _DeadlineHTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_DeadlineHTTPConnection, req)


class _DeadlineHTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        # No context argument: HTTPSConnection then makes the default verifying
        # one, exactly as urllib's own HTTPSHandler() does.
        return self.do_open(_DeadlineHTTPSConnection, req)


def _reason(exc: BaseException) -> str:
    """Why a fetch failed, in words that cannot carry the URL: exception texts
    of urllib and http.client may quote it, credentials and query included."""
    if isinstance(exc, urllib.error.HTTPError):
        if 300 <= exc.code < 400:  # urllib's own refusal quotes the target URL
            return (
                f"HTTP status {exc.code}, a redirect that is not allowed "
                "(another scheme, no Location, or a loop)"
            )
        return f"HTTP status {exc.code}"
    if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, BaseException):
        return _reason(exc.reason)
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and isinstance(exc.strerror, str):
        return exc.strerror  # "Connection refused", "Name or service not known", ...
    if isinstance(exc, http.client.HTTPException):
        return f"not a valid HTTP response ({type(exc).__name__})"
    # A bad chunk size, a host name IDNA cannot encode, ...
    return f"not a valid HTTP response or host name ({type(exc).__name__})"


class _SameSchemeRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to a URL the source would accept itself."""

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
        problem = _url_problem(newurl, self.schemes)
        if problem is not None:
            fp.close()  # urllib only closes a redirect's response when it follows it
            raise KeySourceError(f"the JWKS URL redirected to a URL that is not allowed: {problem}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def build_opener(schemes: frozenset[str]) -> urllib.request.OpenerDirector:
    """The ``urllib`` opener ``JWKSource`` fetches with, for ``fetch_bytes``: each
    connection held to the fetch's deadline (connect, TLS, every read), and a
    redirect followed only to a URL of ``schemes`` without credentials (others
    are a ``KeySourceError``). ``schemes``: ``{"https"}``, or ``{"https", "http"}``
    for tests and loopback; nothing else."""
    schemes = frozenset(schemes)
    if "https" not in schemes or not schemes <= {"https", "http"}:
        raise InvalidRequest('schemes must be {"https"} or {"https", "http"}')
    return urllib.request.build_opener(
        _SameSchemeRedirects(schemes), _DeadlineHTTPHandler(), _DeadlineHTTPSHandler()
    )


def fetch_bytes(
    opener: urllib.request.OpenerDirector,
    url: str,
    *,
    name: str,
    where: str,
    timeout: float,
    limit: int,
) -> bytes:
    """The body of a GET of a public JSON document: ``JWKSource``'s fetch, for
    other documents of an issuer too (its OpenID discovery document).

    ``opener`` comes from ``build_opener``; ``url`` must be one its caller has
    checked (``JWKSource`` checks its own: scheme, no credentials, a host).
    ``timeout`` bounds the whole fetch, redirects included; a body longer than
    ``limit`` bytes is refused. Every failure is a ``KeySourceError`` saying
    ``could not fetch {name} from {where}``, or ``{name} at {where} is larger
    than ...``: ``where`` names the URL without its credentials or query, since
    the message is logged.
    """
    request = urllib.request.Request(url, headers={"Accept": "application/json"})  # noqa: S310
    deadline = _deadline.set(time.monotonic() + timeout)
    try:
        with opener.open(request, timeout=timeout) as response:
            body: bytes = response.read(limit + 1)
            # read(n) hands back a body cut short by a hang-up without error.
            if response.length and len(body) <= limit:
                raise http.client.IncompleteRead(body, response.length)
    except KeySourceError:
        raise
    except _FETCH_ERRORS as exc:
        if isinstance(exc, urllib.error.HTTPError):
            exc.close()  # it holds the connection open, and is kept as __cause__
        raise KeySourceError(f"could not fetch {name} from {where}: {_reason(exc)}") from exc
    finally:
        _deadline.reset(deadline)
    if len(body) > limit:
        raise KeySourceError(f"{name} at {where} is larger than {limit} bytes")
    return body


class Fetch:
    """A JWKS fetch running in its source's background thread, for a caller
    that needs its outcome: ``wait()`` for it in a thread, or ``await`` it on an
    event loop (the loop keeps running). Either gives up after the source's
    ``timeout`` and gives True if the fetch loaded new keys (then in
    ``source.keys``), False if it failed or is still running.

    ``started`` is True for the caller whose call started this fetch.
    """

    __slots__ = ("_future", "_timeout", "started")

    def __init__(self, future: Future[bool], timeout: float, *, started: bool) -> None:
        self._future = future
        self._timeout = timeout
        self.started = started

    def __repr__(self) -> str:
        state = "done" if self._future.done() else "running"
        return f"<Fetch {state}>"

    def done(self) -> bool:
        """True once the fetch ended (keys loaded, or the failure logged)."""
        return self._future.done()

    def wait(self) -> bool:
        """Block this thread until the fetch ends, for at most the timeout."""
        try:
            return self._future.result(self._timeout)
        except TimeoutError:
            return False

    def __await__(self) -> Generator[Any, None, bool]:
        return self._wait_async().__await__()

    async def _wait_async(self) -> bool:
        # A future of this loop's own, woken from the fetch thread: a waiter
        # that is cancelled (its client hung up) or times out cancels only it,
        # never the fetch others wait for, and a wake-up that finds the loop
        # closed is dropped (asyncio.wrap_future would raise in the fetch thread).
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()

        def wake(_: Future[bool]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(_set_done, waiter)

        self._future.add_done_callback(wake)
        try:
            await asyncio.wait_for(waiter, self._timeout)
        except TimeoutError:
            return False
        return self._future.result()


def _set_done(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():  # it may have been cancelled, or timed out
        waiter.set_result(None)


class JWKSource:
    """A JWKS URL, fetched on creation and refreshed as described in the module doc.

    Args:
        url: the JWKS document's ``https`` URL, without credentials.
        allow_http: also accept ``http`` (tests, loopback). Never other schemes.
        timeout: seconds for a whole fetch: connect, headers and body together.
        max_age: refresh the keys this often (seconds); the refresh runs in the
            background while the keys held stay in use.
        max_stale: how long past ``max_age`` the keys held may still be used
            while no refresh succeeds (seconds; default ``max_age``, so a set is
            trusted for at most twice its ``max_age``). Past it a caller waits
            for a fetch, and gets ``KeySourceError`` if none succeeds.
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
        max_stale: Duration | None = None,
        min_refresh_interval: Duration = 60,
        clock: Clock = system_clock,
    ) -> None:
        self.schemes = frozenset({"https", "http"} if allow_http is True else {"https"})
        self.url = _check_url(url, self.schemes)
        parts = urlsplit(self.url)  # for messages: no credentials, no query
        self.where = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"
        self.timeout = seconds(timeout, "timeout")
        self.max_age = seconds(max_age, "max_age")
        self.max_stale = (
            self.max_age if max_stale is None else seconds(max_stale, "max_stale", allow_zero=True)
        )
        self.min_refresh_interval = seconds(
            min_refresh_interval, "min_refresh_interval", allow_zero=True
        )
        self.clock = clock
        self._opener = build_opener(self.schemes)
        self._lock = threading.Lock()  # guards _fetching and _last_fetch; never held over I/O
        self._fetching: Future[bool] | None = None  # the background fetch, while it runs
        self._last_fetch = self._fetched_at = clock()
        self.keys = self._fetch()  # fail now, at startup, not at the first token

    def __repr__(self) -> str:
        return f"<JWKSource {self.where!r} keys={len(self.keys)}>"

    def age(self, now: float) -> float:
        """Seconds since the keys held were fetched (counted from the request)."""
        return now - self._fetched_at

    def stale(self, now: float) -> bool:
        """True when the keys are older than ``max_age``: time to refresh them."""
        return now - self._fetched_at >= self.max_age

    def expired(self, now: float) -> bool:
        """True when the keys are older than ``max_age + max_stale``: not to be used."""
        return now - self._fetched_at >= self.max_age + self.max_stale

    @property
    def fetching(self) -> Fetch | None:
        """The background fetch while one runs, else None (tests, shutdown)."""
        future = self._fetching
        return None if future is None else Fetch(future, self.timeout, started=False)

    def refresh_soon(self) -> Fetch | None:
        """Fetch the JWKS again in a background thread; never blocks.

        Returns the fetch that is running (``started`` if this call started it),
        or None if none runs and one started within ``min_refresh_interval``.
        A failed fetch keeps the current keys (and is logged); it still counts
        against the rate limit.
        """
        with self._lock:
            future = self._fetching
            if future is not None:
                return Fetch(future, self.timeout, started=False)
            began = self.clock()
            if began - self._last_fetch < self.min_refresh_interval:
                return None
            self._last_fetch = began
            self._fetching = future = Future()
        future.set_running_or_notify_cancel()  # from now on no waiter can cancel it
        thread = threading.Thread(
            target=self._refresh, args=(future, began), name="jitbroker-jwks", daemon=True
        )
        try:
            thread.start()
        except RuntimeError:  # no thread to be had (interpreter shutdown, limits)
            log.warning("could not start the JWKS refresh for %s", self.where, exc_info=True)
            self._finish(future, loaded=False)
            return None
        return Fetch(future, self.timeout, started=True)

    def refresh(self) -> bool:
        """Fetch the JWKS again (rate-limited as ``refresh_soon``) and wait for it.

        Returns True if new keys were loaded. Waits (at most ``timeout``) only
        for a fetch this call started, never for another thread's: a flood of
        unknown kids must not pile up threads behind a slow JWKS endpoint.
        """
        fetch = self.refresh_soon()
        return fetch is not None and fetch.started and fetch.wait()

    def _refresh(self, future: Future[bool], began: float) -> None:
        """The background thread: fetch, swap the keys in, then end."""
        loaded = False
        try:
            keys = self._fetch()
        except KeySourceError as exc:
            log.warning("JWKS refresh failed, keeping %d keys: %s", len(self.keys), exc)
        except Exception:  # a bug must not leave the source fetching forever
            log.exception("JWKS refresh from %s failed, keeping the keys", self.where)
        else:
            self.keys, self._fetched_at, loaded = keys, began, True
        finally:
            self._finish(future, loaded=loaded)

    def _finish(self, future: Future[bool], *, loaded: bool) -> None:
        # Cleared before waking the waiters: one that asks for a refresh next
        # sees this fetch ended (and the keys it loaded), not still running.
        with self._lock:
            self._fetching = None
        future.set_result(loaded)

    def parse(self, body: bytes) -> KeyRing:
        """The keys of a fetched JWKS document (at most ``MAX_JWKS_BYTES``):
        ``parse_jwks``, keys named by their RFC 7638 thumbprint.

        The hook for a subclass whose issuer names its keys otherwise: it
        returns a ``KeyRing`` (or a subclass) or raises ``KeySourceError`` to
        refuse the document (a refresh then keeps the keys held). Called for
        every fetch, the first from ``__init__``: it must not need attributes a
        subclass sets after ``super().__init__()``.
        """
        return parse_jwks(body, self.where)

    def _fetch(self) -> KeyRing:
        # The scheme was checked in the constructor (https, or http if allowed).
        body = fetch_bytes(
            self._opener,
            self.url,
            name="the JWKS",
            where=self.where,
            timeout=self.timeout,
            limit=MAX_JWKS_BYTES,
        )
        return self.parse(body)


def _check_url(url: object, schemes: frozenset[str]) -> str:
    if not isinstance(url, str) or not url:
        raise InvalidRequest("the JWKS URL must be a non-empty string")
    problem = _url_problem(url, schemes)
    if problem is not None:
        raise InvalidRequest(f"the JWKS URL {problem}")
    return url


def _url_problem(url: str, schemes: frozenset[str]) -> str | None:
    """Why ``url`` must not be fetched, or None. Never quotes the URL: it may hold secrets."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError unless a number in 0..65535
    except ValueError:
        return "is malformed (check the host and port)"
    if parts.scheme.lower() not in schemes:
        allowed = " or ".join(sorted(schemes))
        hint = "" if "http" in schemes else " (http only with allow_http=True)"
        return f"must use {allowed}{hint}, not {parts.scheme[:16]!r}"
    if "@" in parts.netloc:
        return "must not contain credentials (user:password@): a JWKS is public"
    if not parts.hostname:
        return "has no host"
    if not url.isprintable() or " " in url:
        return "contains whitespace or control characters"
    return None


def parse_jwks(body: bytes, origin: str) -> KeyRing:
    """A verify-only ring from a JWKS document's bytes; ``origin`` names it in errors.

    Keys whose ``use``/``key_ops`` rule out signatures are skipped; a document
    left with no key is accepted (tokens are then refused as ``UnknownKey``)
    and logged, so an issuer's mistake shows up where it is made.
    """
    try:
        document = strict_json_object(body, "JWKS")
    except MalformedToken as exc:
        raise KeySourceError(f"the JWKS at {origin} is not a strict JSON object") from exc
    try:
        ring = KeyRing.from_jwks(document)
    except InvalidRequest as exc:
        raise KeySourceError(f"the JWKS at {origin} was refused: {exc}") from exc
    if not len(ring) and (skipped := _skipped(document)):
        log.warning(
            "the JWKS at %s has no key for verifying signatures: its %d keys are all "
            'for other uses ("use" is not "sig", or "key_ops" lacks "verify")',
            origin,
            skipped,
        )
    return ring


def _skipped(document: Mapping[str, Any]) -> int:
    """How many keys of a (loaded) JWKS were skipped as not for signatures."""
    return sum(1 for k in document["keys"] if not verifies_signatures(k))
