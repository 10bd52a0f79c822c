"""``WebhookProvider``: a service in any language makes and removes the backend
credential of a lease, over signed HTTP; ``sign_webhook`` and ``verify_webhook``
are both ends of the signature.

The broker POSTs canonical JSON to ``<url>/create``, ``/revoke``, ``/renew`` and
``/managed``, signed with HMAC-SHA256 in the ``Jitbroker-Signature`` header
(``t=<sent_at>,v1=<hex>``, over ``f"{t}."`` and the body). The wire format, and
what a receiver must do, are in ``docs/webhook.md``. The client is httpx
(``pip install 'jitbroker[web]'``), imported when a provider is made.

A receiver must dedupe create and revoke by ``idempotency_key`` (a retry after
a crash sends the same key again), answer a revoke of a lease it does not know
with success (404 or 410 count as success too), and check that the body's
``action`` is the one its path names.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import math
import re
import secrets
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..errors import (
    BadSignature,
    InvalidRequest,
    MalformedToken,
    ProviderError,
    TokenExpired,
    TokenNotYetValid,
)
from ..lease import Lease, Secret
from .base import check_provider_name

if TYPE_CHECKING:
    import httpx

__all__ = ["WebhookProvider", "sign_webhook", "verify_webhook"]

HEADER = "Jitbroker-Signature"
ACTIONS = ("create", "revoke", "renew", "managed")
MIN_KEY = 32  # bytes: an HMAC-SHA256 key shorter than its output is weaker than it
_SIGNATURE = re.compile(r"t=(0|[1-9][0-9]{0,11}),v1=([0-9a-f]{64})")
#: The longest header a genuine signature makes is 82 characters: anything far
#: longer is refused before it is parsed.
_MAX_HEADER = 128
_LEASE_ID = re.compile(r"[0-9a-f]{32}")
#: What a base URL may hold: printable ASCII without the characters that start a
#: query, a fragment or userinfo, or that parsers read differently (``\``).
_URL = re.compile(r"[\x21-\x7e]+")
_URL_REFUSED = frozenset("?#@\\")
_BAD = object()  # a body that is not JSON


class WebhookProvider:
    """A ``Provider`` that is an HTTP service: each call POSTs a signed JSON
    request to ``<url>/<action>`` (see the module docstring).

    ``url`` is https, or http to a loopback host (127.0.0.0/8, ::1, localhost)
    unless ``insecure_http``; no userinfo, query or fragment. ``key`` (bytes, at
    least 32) signs every request. Each network step waits at most ``timeout``
    seconds, and a response body must be complete ``timeout`` seconds after the
    request started; at most ``max_response`` bytes of it are read. Redirects
    are never followed. Proxies and CA bundles come from the environment, as
    httpx does. One httpx client per provider, made at first use and shared by
    threads; ``round_trips`` counts the requests sent. ``check`` does no I/O and
    refuses nothing: the service decides at ``create``."""

    def __init__(
        self,
        name: str = "webhook",
        *,
        url: str,
        key: bytes,
        timeout: float = 5.0,
        insecure_http: bool = False,
        max_response: int = 65536,
    ) -> None:
        self.name = check_provider_name(name)
        self._key = _checked_key(key)
        if not isinstance(insecure_http, bool):
            raise InvalidRequest("insecure_http must be True or False")
        self.url = _checked_url(url, insecure_http)
        self._timeout = _checked_timeout(timeout)
        if isinstance(max_response, bool) or not isinstance(max_response, int):
            raise InvalidRequest("max_response is a whole number of bytes")
        if not 0 < max_response <= 2**30:
            raise InvalidRequest("max_response is above 0 and at most 2**30 bytes")
        self.max_response = max_response
        try:  # here, not at the first issue: a missing extra is a configuration error
            import httpx
        except ImportError:
            raise InvalidRequest(
                "WebhookProvider needs httpx: pip install 'jitbroker[web]'"
            ) from None
        self._endpoints = {action: f"{self.url}/{action}" for action in ACTIONS}
        # Two parsers must agree on the host the credentials go to.
        if httpx.URL(self._endpoints["create"]).host != urlsplit(self.url).hostname:
            raise InvalidRequest("url is read differently by httpx: write it plainly")
        self._client: httpx.Client | None = None
        self._lock = threading.Lock()
        #: Requests sent to the service (a failed attempt counts too).
        self.round_trips = 0

    def __repr__(self) -> str:
        return f"<WebhookProvider {self.name!r} {self.url}>"

    # -- the Provider protocol ------------------------------------------------
    def check(self, lease: Lease) -> None:
        """Nothing (no I/O): the service refuses what it cannot grant at create."""

    def create(self, lease: Lease) -> Secret:
        """POST ``/create``; the service answers 200 with a JSON object of strings,
        the credential (at least one field)."""
        body = self._post("create", lease, lambda status: status == 200, read=True)
        made = _parsed(body)
        if (
            not isinstance(made, dict)
            or not made
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in made.items())
        ):
            raise self._error("create", lease, "got a body that is not a JSON object of strings")
        return Secret(made)

    def revoke(self, lease: Lease) -> None:
        """POST ``/revoke``; any 2xx, and 404 or 410 (not found is success)."""
        self._post("revoke", lease, lambda status: 200 <= status < 300 or status in {404, 410})

    def renew(self, lease: Lease) -> None:
        """POST ``/renew`` with the lease's new ``expires_at``; any 2xx (a 404 is an
        error: the principal is gone)."""
        self._post("renew", lease, lambda status: 200 <= status < 300)

    def managed(self) -> list[str]:
        """POST ``/managed``; the service answers 200 with ``{"leases": [ids]}``,
        each 32 lowercase hex digits."""
        body = self._post("managed", None, lambda status: status == 200, read=True)
        listed = _parsed(body)
        ids = listed.get("leases") if isinstance(listed, dict) else None
        if not isinstance(ids, list) or not all(
            isinstance(i, str) and _LEASE_ID.fullmatch(i) for i in ids
        ):
            raise self._error(
                "managed", None, 'got a body that is not {"leases": [ids of 32 lowercase hex]}'
            )
        return sorted(set(ids))

    def close(self) -> None:
        """Close the HTTP client (the next call makes a new one)."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    # -- at the edge ----------------------------------------------------------
    def _post(
        self, action: str, lease: Lease | None, ok: Callable[[int], bool], read: bool = False
    ) -> bytes:
        """Send the signed request for ``action``; the response body if ``read``
        (else b""). ``ProviderError`` for a status ``ok`` refuses, a transport
        failure, or a body too large or too slow; none echoes the body."""
        import httpx

        at = int(time.time())  # the receiver's wall clock checks it, not the broker's
        body = self._body(action, lease, at)
        headers = {
            "Content-Type": "application/json",
            "Accept-Encoding": "identity",  # a compressed body could inflate past the cap
            HEADER: _signature(self._key, body, at),
        }
        client = self._http()
        with self._lock:
            self.round_trips += 1
        deadline = time.monotonic() + self._timeout
        try:
            with client.stream("POST", self._endpoints[action], content=body, headers=headers) as r:
                if not ok(r.status_code):
                    raise self._error(action, lease, _status(r.status_code))
                return self._read(action, lease, r, deadline) if read else b""
        except httpx.HTTPError as exc:
            raise self._error(action, lease, f"failed ({type(exc).__name__})") from exc

    def _read(self, action: str, lease: Lease | None, r: httpx.Response, deadline: float) -> bytes:
        """The raw body of ``r``, read in chunks and stopped at the cap or the deadline."""
        if r.headers.get("Content-Encoding", "identity").lower() != "identity":
            raise self._error(action, lease, "got a compressed body (refused)")
        declared = r.headers.get("Content-Length", "")
        too_large = f"got more than max_response ({self.max_response}) bytes"
        if declared.isdigit() and int(declared) > self.max_response:
            raise self._error(action, lease, too_large)
        chunks: list[bytes] = []
        size = 0
        for chunk in r.iter_raw():
            size += len(chunk)
            if size > self.max_response:
                raise self._error(action, lease, too_large)
            if time.monotonic() > deadline:
                raise self._error(action, lease, f"took longer than timeout ({self._timeout}s)")
            chunks.append(chunk)
        return b"".join(chunks)

    def _body(self, action: str, lease: Lease | None, at: int) -> bytes:
        """The canonical JSON request sent at ``at``: sorted keys, no spaces, ASCII."""
        request: dict[str, Any] = {"action": action, "provider": self.name, "sent_at": at}
        if lease is None:
            request["idempotency_key"] = f"{secrets.token_hex(16)}/{action}"
        else:
            request["idempotency_key"] = f"{lease.id}/{action}"
            if not math.isfinite(lease.expires_at):
                raise InvalidRequest(f"provider {self.name!r}: a lease's expiry must be finite")
            request["lease"] = {
                "id": lease.id,
                "subject": lease.subject,
                "audience": lease.audience,
                "scopes": list(lease.scopes),
                "expires_at": lease.expires_at,
                "owner": lease.owner,
                "purpose": lease.purpose,
                "task": lease.task,
            }
        return _canonical(request)

    def _http(self) -> httpx.Client:
        with self._lock:  # one client (one pool) however many threads ask first
            if self._client is None:
                import httpx

                self._client = httpx.Client(
                    timeout=self._timeout,
                    follow_redirects=False,
                    headers={"User-Agent": "jitbroker-webhook"},
                )
            return self._client

    def _error(self, action: str, lease: Lease | None, what: str) -> ProviderError:
        about = f" for lease {lease.id}" if lease is not None else ""
        return ProviderError(
            f"provider {self.name!r}: the {action} request{about} {what}",
            provider=self.name,
            lease_id=lease.id if lease is not None else None,
        )


# -- the receiver's side ---------------------------------------------------------
def sign_webhook(key: bytes, body: bytes, *, at: int | None = None) -> str:
    """The ``Jitbroker-Signature`` header value for ``body`` sent at ``at``
    (Unix seconds, now by default): ``t=<at>,v1=<hex HMAC-SHA256>``."""
    key = _checked_key(key)
    if not isinstance(body, bytes):
        raise InvalidRequest("a webhook body is bytes")
    if at is None:
        at = int(time.time())
    if isinstance(at, bool) or not isinstance(at, int) or not 0 <= at < 10**12:
        raise InvalidRequest("at is whole Unix seconds, from 0 and below 10**12")
    return _signature(key, body, at)


def verify_webhook(
    key: bytes,
    body: bytes,
    header: str,
    *,
    now: float | None = None,
    tolerance: float = 300,
) -> dict[str, Any]:
    """Check a request a ``WebhookProvider`` sent: ``header`` (its
    ``Jitbroker-Signature``) must sign the raw ``body`` under ``key`` and carry a
    timestamp within ``tolerance`` seconds of ``now`` (the wall clock by
    default); the parsed body. Raises ``MalformedToken`` (a header or body not
    in the wire format), ``BadSignature``, ``TokenExpired`` or
    ``TokenNotYetValid`` (a replay, or a skewed clock): every one an
    ``InvalidToken``; the message echoes neither header nor body.

    Passing is not all: the caller still dedupes by ``idempotency_key`` and
    checks that ``action`` is the one its path names (see ``docs/webhook.md``)."""
    key = _checked_key(key)
    if not isinstance(body, bytes):
        raise InvalidRequest("a webhook body is bytes: verify the raw request body")
    if isinstance(tolerance, bool) or not isinstance(tolerance, int | float):
        raise InvalidRequest("tolerance is a number of seconds")
    if not 0 < tolerance < math.inf:
        raise InvalidRequest("tolerance is a number of seconds, above 0 and finite")
    at, signature = _header(header)
    expected = _signature(key, body, at).rpartition("v1=")[2]
    if not hmac.compare_digest(signature, expected):
        raise BadSignature(f"the {HEADER} header does not sign this body with this key")
    _fresh(at, time.time() if now is None else now, tolerance)
    request = _parsed(body)
    if not isinstance(request, dict) or not _is_request(request, at):
        raise MalformedToken(
            "the signed body is not a jitbroker webhook request (an action, an"
            " idempotency_key, and a sent_at equal to the signature's t)"
        )
    return request


def _canonical(value: object) -> bytes:
    """``value`` as the wire's canonical JSON: sorted keys, no spaces, ASCII only,
    no NaN or infinity (``ValueError``)."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode()


def _is_request(request: dict[str, Any], at: int) -> bool:
    """Whether a signed body has the request's own fields, its ``sent_at`` the
    signature's ``t`` (an integer, never a float or a bool)."""
    sent_at = request.get("sent_at")
    return (
        request.get("action") in ACTIONS
        and isinstance(request.get("idempotency_key"), str)
        and type(sent_at) is int
        and sent_at == at
    )


def _header(header: object) -> tuple[int, str]:
    """``(t, v1)`` of a header in exactly the form ``t=<digits>,v1=<64 hex>``."""
    if not isinstance(header, str) or not header:
        raise MalformedToken(f"the request has no {HEADER} header")
    if len(header) > _MAX_HEADER:
        raise MalformedToken(f"the {HEADER} header is longer than any signature ({_MAX_HEADER})")
    match = _SIGNATURE.fullmatch(header)
    if match is None:
        raise MalformedToken(
            f"the {HEADER} header is not of the form t=<unix seconds>,v1=<64 lowercase hex>"
        )
    return int(match[1]), match[2]


def _fresh(at: int, now: float, tolerance: float) -> None:
    """Refuse a signature time outside ``now`` ± ``tolerance``: an old request
    replayed, or clocks too far apart."""
    if isinstance(now, bool) or not isinstance(now, int | float) or not math.isfinite(now):
        raise InvalidRequest("now is a finite number of Unix seconds")
    if now - at > tolerance:
        raise TokenExpired(
            f"the webhook was signed {now - at:.0f}s ago, more than the tolerance"
            f" ({tolerance:g}s): a replay, or a clock that is off",
            expired_at=at + tolerance,
        )
    if at - now > tolerance:
        raise TokenNotYetValid(
            f"the webhook was signed {at - now:.0f}s in the future, more than the tolerance"
            f" ({tolerance:g}s): a clock that is off"
        )


def _signature(key: bytes, body: bytes, at: int) -> str:
    """The header value: HMAC-SHA256 over ``f"{at}."`` and the body."""
    mac = hmac.new(key, f"{at}.".encode() + body, hashlib.sha256)
    return f"t={at},v1={mac.hexdigest()}"


def _parsed(body: bytes) -> object:
    """``body`` as UTF-8 JSON, or ``_BAD``. The decoder's errors hold the body (and
    their messages quote bytes of it), so none is kept or chained."""
    try:
        return json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):
        return _BAD


# -- construction: plain checks ----------------------------------------------------
def _checked_key(key: object) -> bytes:
    """``key`` if it can sign: bytes, at least ``MIN_KEY`` of them; never echoed."""
    if not isinstance(key, bytes):
        raise InvalidRequest("a webhook key is bytes (os.urandom(32), say), not text")
    if len(key) < MIN_KEY:
        raise InvalidRequest(f"a webhook key is at least {MIN_KEY} bytes")
    return key


def _checked_url(url: object, insecure_http: bool) -> str:
    """The base URL without its trailing ``/``; refused: not http(s), userinfo, a
    query or fragment, and plain http to a host that is not loopback."""
    if not isinstance(url, str) or not _URL.fullmatch(url) or _URL_REFUSED & set(url):
        raise InvalidRequest(
            "url is an http(s) URL of printable ASCII, with no user, password, query or fragment"
        )
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 - raises ValueError for a port that is not one
    except ValueError:
        raise InvalidRequest("url has a port that is not a number from 0 to 65535") from None
    scheme, host = parts.scheme.lower(), parts.hostname
    if scheme not in {"http", "https"} or not host:
        raise InvalidRequest("url is an http:// or https:// URL with a host")
    if scheme == "http" and not insecure_http and not _loopback(host):
        raise InvalidRequest(
            "url must be https:// (http:// only to 127.0.0.1, ::1 or localhost, or with"
            " insecure_http=True): the service hands out credentials"
        )
    return url.rstrip("/")


def _loopback(host: str) -> bool:
    """Whether ``host`` is this machine: localhost, 127.0.0.0/8 or ::1 (no lookup)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _checked_timeout(timeout: object) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout < 3600:
        raise InvalidRequest("timeout is a number of seconds, above 0 and below 3600")
    return float(timeout)


def _status(status: int) -> str:
    """What an unexpected status says; never the body or reason phrase the service sent."""
    if 300 <= status < 400:
        return f"was answered HTTP {status}, a redirect (not followed: give the final url)"
    if status in {401, 403}:
        return f"was answered HTTP {status} (does the service verify with the same key?)"
    return f"was answered HTTP {status}"
