"""Client side: ``BrokerAuth`` carries jitbroker tokens on httpx (and requests) calls.

::

    auth = BrokerAuth(broker, subject="svc:a", audience="api:orders",
                      scopes=["orders:read"], ttl=300)
    with auth, httpx.Client(auth=auth) as client:   # the lease is revoked on exit
        client.get("https://orders.internal/orders")

Tokens come from a token source (``jitbroker.web.sources``): a ``Broker`` or an
``AsyncBroker`` in this process, or any ``TokenSource`` via ``from_source``.
``Renewal`` (``jitbroker.web.renewal``) keeps one token and renews it, one
renewal in flight at a time. This module turns a token into headers (with a
DPoP proof for a key-bound token) and learns from the server's answers: DPoP
nonces, and challenges that say the token was refused.

The token is never logged or shown: ``repr`` names the lease id at most, and
httpx masks the ``Authorization`` header in its own ``repr``.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import AsyncGenerator, Generator, Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

import httpx

from ..broker import AsyncBroker, Broker
from ..clock import Clock, Duration
from ..dpop import PROOF_TYPE, normalize_uri
from ..errors import InvalidRequest
from ..jwk import b64url
from ..keys import Key, key_from_jwk, key_from_material
from ..tokens import json_text
from .renewal import Held, Renewal
from .sources import AsyncTokenSource, IssueArgs, TokenSource, is_async, source_for

if TYPE_CHECKING:
    from .client_requests import RequestsBrokerAuth

__all__ = ["BrokerAuth"]

# A DPoP-Nonce is 1*NQCHAR (RFC 9449 section 8), and bounded: no server can make
# us sign and send an arbitrarily large value on every request.
_NONCE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]{1,512}")
_MAX_ORIGINS = 256  # nonces remembered, one per origin
_ERROR = re.compile(r"""\berror\s*=\s*"?([A-Za-z0-9_]+)""")


class Prover:
    """Signs DPoP proofs (RFC 9449 section 4.2) with the client's private key.

    The protected header (``typ``, ``alg``, the public ``jwk``) is the same for
    every proof, so it is encoded once.
    """

    def __init__(self, key: Key) -> None:
        public = {k: v for k, v in (key.public_jwk() or {}).items() if k not in ("kid", "use")}
        header = {"typ": PROOF_TYPE, "alg": key.alg, "jwk": public}
        self._head = b64url(json_text(header).encode()) + "."
        self._sign = key.sign

    def proof(self, method: str, htu: str, ath: str, now: float, nonce: str | None) -> str:
        """A proof for one request; ``htu`` is already normalized (no query or fragment)."""
        claims: dict[str, Any] = {
            "jti": b64url(os.urandom(16)),
            "htm": method,
            "htu": htu,
            "iat": int(now),
            "ath": ath,
        }
        if nonce is not None:
            claims["nonce"] = nonce
        signing_input = self._head + b64url(json_text(claims).encode())
        return signing_input + "." + b64url(self._sign(signing_input.encode("ascii")))

    def __repr__(self) -> str:
        return "<Prover>"


def private_key(holder_key: object) -> Key:
    """The client's DPoP key, from a private ``Key``, ``cryptography`` key or JWK."""
    if isinstance(holder_key, Mapping):
        key = key_from_jwk(holder_key)
    elif isinstance(holder_key, Key):
        key = holder_key
    else:
        key = key_from_material(holder_key)
    if key.symmetric or not key.private:
        raise InvalidRequest(
            "holder_key must be the client's private EdDSA, ES256 or RS256 key: "
            "it signs the DPoP proof of every request"
        )
    return key


def challenge_errors(www_authenticate: Iterable[str]) -> set[str]:
    """The ``error`` codes of every challenge in these ``WWW-Authenticate`` values."""
    return {code for value in www_authenticate for code in _ERROR.findall(value)}


def _origin(htu: str) -> str:
    return htu[: htu.index("/", htu.index("//") + 2)]


def _values(headers: Mapping[str, str], name: str) -> list[str]:
    """Every value of header ``name`` (httpx keeps repeated headers apart)."""
    if isinstance(headers, httpx.Headers):
        return headers.get_list(name)
    value = headers.get(name)
    return [] if value is None else [value]


def _replayable(request: httpx.Request) -> bool:
    # A streamed body was consumed by the first attempt; bytes, JSON and forms were not.
    return isinstance(request.stream, httpx.ByteStream)


class BrokerAuth(httpx.Auth):
    """An ``httpx.Auth`` that carries a jitbroker token, renewed before it expires.

    Args:
        broker: a ``Broker`` (for ``httpx.Client``; an ``httpx.AsyncClient`` may
            use it too, its calls then run in a thread) or an ``AsyncBroker``
            (for ``httpx.AsyncClient`` only).
        subject, audience, scopes, ttl, owner, purpose, task: what to ask the
            broker for, as ``broker.issue`` takes them; ``ttl`` also for renewals.
        holder_key: the client's *private* key (EdDSA, ES256 or RS256: a ``Key``,
            ``cryptography`` key or JWK). The token is then bound to its public
            half, sent as ``Authorization: DPoP``, and every request carries a
            fresh DPoP proof (RFC 9449).
        renew_at: the fraction of a token's life after which it is renewed
            (0 < renew_at < 1, default 2/3). Renewal is ``broker.renew``; when
            the broker refuses (not renewable, at its maximum lifetime, revoked),
            a fresh credential is issued instead. When the broker fails, the
            current token is used while it is valid, and renewal retried.
        clock: the time source; by default the broker's.

    ``close()`` (or ``with auth:``; ``await auth.aclose()`` or ``async with``
    for an ``AsyncBroker``) revokes every lease this auth obtained: a client's
    credential dies with it. A closed auth refuses to authorize requests.

    A ``401`` with ``error="use_dpop_nonce"`` and a ``DPoP-Nonce`` is answered
    by sending the request once more with that nonce (remembered per origin for
    later requests; a streamed body is not sent twice). A ``401`` with
    ``error="invalid_token"`` is returned as is, and the next request renews
    (or replaces) the token first.
    """

    def __init__(
        self,
        broker: Broker | AsyncBroker,
        *,
        subject: str,
        audience: str,
        scopes: Iterable[str] | str = (),
        ttl: Duration | None = None,
        owner: str | None = None,
        purpose: str | None = None,
        task: str | None = None,
        holder_key: object = None,
        renew_at: float = 2 / 3,
        clock: Clock | None = None,
    ) -> None:
        key = None if holder_key is None else private_key(holder_key)
        args = IssueArgs.of(
            scopes, subject=subject, audience=audience, ttl=ttl, task=task, owner=owner,
            purpose=purpose, holder_key=None if key is None else key.public(),
        )  # fmt: skip
        self._setup(source_for(broker, args), key, renew_at, clock)
        self._label = f"subject={subject!r} audience={audience!r}"

    @classmethod
    def from_source(
        cls,
        source: TokenSource | AsyncTokenSource,
        *,
        holder_key: object = None,
        renew_at: float = 2 / 3,
        clock: Clock | None = None,
    ) -> BrokerAuth:
        """A ``BrokerAuth`` over any token source. With ``holder_key`` (the private
        key), the source must bind its tokens to that key's public half."""
        key = None if holder_key is None else private_key(holder_key)
        auth = cls.__new__(cls)
        auth._setup(source, key, renew_at, clock)
        auth._label = f"source={type(source).__name__}"
        return auth

    def _setup(
        self,
        source: TokenSource | AsyncTokenSource,
        key: Key | None,
        renew_at: float,
        clock: Clock | None,
    ) -> None:
        scheme = "Bearer " if key is None else "DPoP "
        self._renewal = renewal = Renewal(
            source, renew_at=renew_at, clock=clock, scheme=scheme, bound=key is not None
        )
        self._clock = renewal.clock
        self._async_only = is_async(source)
        self._prover = None if key is None else Prover(key)
        self._nonces: dict[str, str] = {}
        self._nonce_lock = threading.Lock()

    def __repr__(self) -> str:
        held = self._renewal.held
        lease = None if held is None else held.grant.lease_id
        extra = (" dpop" if self._prover else "") + (" closed" if self._renewal.closed else "")
        return f"<BrokerAuth {self._label} lease={lease!r}{extra}>"

    # -- the flows -------------------------------------------------------------
    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        """Authorize ``request`` (httpx calls this for ``httpx.Client``)."""
        held = self._renewal.held
        # The hot path: a token held, not due. get() refuses an async source.
        if held is None or self._async_only or self._clock() >= held.renew_after:
            held = self._renewal.get()
        yield from self._send(request, held)

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        """Authorize ``request`` (httpx calls this for ``httpx.AsyncClient``)."""
        held = self._renewal.held
        if held is None or self._clock() >= held.renew_after:
            held = await self._renewal.aget()
        # Only getting the token awaits: the exchange itself is the sync one's.
        flow = self._send(request, held)
        outgoing = next(flow)
        while True:
            response = yield outgoing
            try:
                outgoing = flow.send(response)
            except StopIteration:
                return

    def _send(
        self, request: httpx.Request, held: Held
    ) -> Generator[httpx.Request, httpx.Response, None]:
        """The exchange for one request with token ``held``: the header (and a
        DPoP proof), and one retry with the server's nonce if it asks for one."""
        if self._prover is None:
            request.headers["Authorization"] = held.header
            response = yield request
            if response.status_code == 401:
                self.answered(held, None, response.status_code, response.headers, None)
            return
        origin, sent = self._authorize(request, held, None)
        response = yield request
        retry = self.answered(held, origin, response.status_code, response.headers, sent)
        if retry is not None and _replayable(request):
            self._authorize(request, held, retry)
            response = yield request
            self.answered(held, origin, response.status_code, response.headers, retry, last=True)

    def requests(self) -> RequestsBrokerAuth:
        """This auth for ``requests`` (the same token and renewals):
        ``session.auth = auth.requests()``. Needs a ``Broker``."""
        from .client_requests import RequestsBrokerAuth  # requests stays optional

        return RequestsBrokerAuth(self)

    # -- headers and answers (no I/O; shared with the requests twin) -----------
    def held(self) -> Held:
        """The token to send now (renewed first if due); blocking."""
        held = self._renewal.held
        if held is None or self._async_only or self._clock() >= held.renew_after:
            held = self._renewal.get()
        return held

    def _authorize(
        self, request: httpx.Request, held: Held, nonce: str | None
    ) -> tuple[str, str | None]:
        proof, origin, sent = self.proof(request.method, str(request.url), held, nonce)
        headers = request.headers
        headers["Authorization"] = held.header
        headers["DPoP"] = proof
        return origin, sent

    def proof(
        self, method: str, url: str, held: Held, nonce: str | None
    ) -> tuple[str, str, str | None]:
        """A DPoP proof for this request, the request's origin, and the nonce the
        proof carries (``nonce``, else the one last seen from that origin)."""
        assert self._prover is not None
        assert held.ath is not None
        htu = normalize_uri(url)
        origin = _origin(htu)
        if nonce is None:
            nonce = self._nonces.get(origin)
        return self._prover.proof(method, htu, held.ath, self._clock(), nonce), origin, nonce

    def answered(
        self,
        held: Held,
        origin: str | None,
        status: int,
        headers: Mapping[str, str],
        sent: str | None,
        *,
        last: bool = False,
    ) -> str | None:
        """Learn from a response to ``held``'s token; the nonce to retry with, when
        the server asks for one and this was not the ``last`` attempt."""
        nonce = headers.get("dpop-nonce") if origin is not None else None
        if nonce is not None and _NONCE.fullmatch(nonce):
            self._remember(origin, nonce)  # type: ignore[arg-type]
        else:
            nonce = None
        if status != 401:
            return None
        errors = challenge_errors(_values(headers, "www-authenticate"))
        if "invalid_token" in errors:
            self._renewal.stale(held)
        if "use_dpop_nonce" in errors and nonce is not None and nonce != sent and not last:
            return nonce
        return None

    def _remember(self, origin: str, nonce: str) -> None:
        with self._nonce_lock:
            nonces = self._nonces
            if origin not in nonces and len(nonces) >= _MAX_ORIGINS:
                del nonces[next(iter(nonces))]  # the origin heard from first
            nonces[origin] = nonce

    # -- closing ---------------------------------------------------------------
    def close(self) -> None:
        """Revoke every lease this auth obtained; later requests are refused. If
        the broker fails, its error is raised and ``close()`` may be called again."""
        self._renewal.close()

    async def aclose(self) -> None:
        """``close()`` for asyncio code (over either kind of broker)."""
        await self._renewal.aclose()

    def __enter__(self) -> BrokerAuth:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> BrokerAuth:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
