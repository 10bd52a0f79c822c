"""``BearerAuth``: pure ASGI middleware (no framework needed) that verifies every request.

WebSockets are verified on connect: the handshake's ``Authorization`` (and
``DPoP``, for the ``GET`` of the handshake URL with ``ws``/``wss`` read as
``http``/``https``) must pass, as for an HTTP request, before the app sees the
connection. A refused handshake gets the HTTP error response when the server
supports the WebSocket Denial Response extension, else a close (code 1008).
Lifespan (and any other) scopes pass through untouched.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from .._drive import arun
from ..errors import InvalidRequest
from ..verify import Verifier
from .gate import CLAIMS_KEY, GATE_KEY, WANTED, Gate, Location, RequestView
from .nonces import DPoPNonces
from .proxies import Network, quoted_path
from .responses import ErrorResponse

__all__ = ["BearerAuth", "asgi_location", "asgi_view", "route_path", "send_error"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_WANTED = {name.encode(): name for name in WANTED}
_SCHEMES = {"http": "http", "https": "https", "ws": "http", "wss": "https"}


class BearerAuth:
    """Verify the access token of every HTTP request and WebSocket handshake.

    The verified ``Claims`` go in ``scope["jitbroker.claims"]``; a request that
    fails gets the RFC 6750 / RFC 9449 answer (see ``error_response``) and never
    reaches the app. Tokens are checked with ``await verifier.averify(...)``.

    Args:
        app: the ASGI app to protect.
        verifier: the ``Verifier`` (online with a store, or offline from a JWKS).
        audience: the audience tokens must be for (default: the verifier's).
        scopes: scopes every request needs (per-route ones: ``require``).
        realm: the ``realm`` of the challenges (default: the audience).
        exempt: paths that need no token, as the app's routes see them (no
            ``root_path``): exact, or a prefix when ending in ``*``
            (``"/static/*"``). Their requests get no claims.
        trusted_proxies: IP addresses or networks of the proxies whose
            ``Forwarded`` / ``X-Forwarded-Proto`` / ``X-Forwarded-Host``
            headers are believed when rebuilding a DPoP request's URL. None
            by default: those headers are then ignored.
        public_url: the origin clients call (``"https://api.example.com"``);
            fixes the scheme and host of DPoP URLs, whatever the headers say.
        dpop_nonces: a ``DPoPNonces`` to require server nonces in DPoP proofs.
        dpop: accept the DPoP scheme (default True) and advertise it.
        retry_after: the ``Retry-After`` (seconds) of a 503 (store down).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        verifier: Verifier,
        audience: str | None = None,
        scopes: Iterable[str] | str = (),
        realm: str | None = None,
        exempt: Iterable[str] = (),
        trusted_proxies: Iterable[str | Network] = (),
        public_url: str | None = None,
        dpop_nonces: DPoPNonces | None = None,
        dpop: bool = True,
        retry_after: int = 5,
    ) -> None:
        averify = getattr(verifier, "averify", None)
        if averify is None:
            raise InvalidRequest("BearerAuth needs a Verifier with averify()")
        self.app = app
        self.gate = Gate(
            verifier,
            audience=audience,
            scopes=scopes,
            realm=realm,
            exempt=exempt,
            trusted_proxies=trusted_proxies,
            public_url=public_url,
            dpop_nonces=dpop_nonces,
            dpop=dpop,
            retry_after=retry_after,
        )
        self._averify = averify  # bound once: the hot path calls it per request

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            await self.app(scope, receive, send)
            return
        gate = self.gate
        scope[GATE_KEY] = gate
        if gate.exempt(route_path(scope)):
            await self.app(scope, receive, send)
            return
        outcome = await arun(gate.steps(asgi_view(scope)), self._averify)
        if outcome.response is not None:
            if kind == "http":
                await send_error(send, outcome.response)
            else:
                await _deny_websocket(scope, receive, send, outcome.response)
            return
        scope[CLAIMS_KEY] = outcome.claims
        if outcome.headers:
            send = _adding(send, outcome.headers)
        await self.app(scope, receive, send)


def asgi_view(scope: Scope) -> RequestView:
    """The ``RequestView`` of an ASGI HTTP or WebSocket scope."""
    headers: dict[str, list[str]] = {}
    wanted = _WANTED
    for name, value in scope["headers"]:
        # ASGI servers lowercase header names; one that does not fails closed
        # here (its Authorization is not seen: a 401), never open.
        key = wanted.get(name)
        if key is not None:
            headers.setdefault(key, []).append(value.decode("latin-1"))
    return RequestView(scope.get("method", "GET"), headers, scope, asgi_location)


def asgi_location(scope: Scope) -> Location:
    """Where an ASGI request went (a WebSocket handshake is a GET to http(s))."""
    raw = scope.get("raw_path")
    path = raw.decode("latin-1").partition("?")[0] if raw else quoted_path(scope.get("path", "/"))
    server = scope.get("server")
    client = scope.get("client")
    return Location(
        _SCHEMES.get(scope.get("scheme", "http"), "http"),
        path,
        "" if not server else (f"{server[0]}:{server[1]}" if server[1] else str(server[0])),
        client[0] if client else None,
    )


def route_path(scope: Scope) -> str:
    """The path as the app's routes see it: without the ``root_path`` it is mounted at."""
    path: str = scope.get("path", "")
    root = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
        return path[len(root) :] or "/"
    return path


async def send_error(send: Send, response: ErrorResponse) -> None:
    """Send ``response`` as a complete HTTP response."""
    await send(
        {"type": "http.response.start", "status": response.status, "headers": _raw(response)}
    )
    await send({"type": "http.response.body", "body": response.body})


def _raw(response: ErrorResponse) -> list[tuple[bytes, bytes]]:
    headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in response.headers]
    headers.append((b"content-length", str(len(response.body)).encode()))
    return headers


async def _deny_websocket(
    scope: Scope, receive: Receive, send: Send, response: ErrorResponse
) -> None:
    message = await receive()
    if message.get("type") != "websocket.connect":  # the client left already
        return
    if "websocket.http.response" in (scope.get("extensions") or {}):
        start = {"type": "websocket.http.response.start", "status": response.status}
        await send({**start, "headers": _raw(response)})
        await send({"type": "websocket.http.response.body", "body": response.body})
    else:
        await send({"type": "websocket.close", "code": 1008})  # policy violation


def _adding(send: Send, extra: tuple[tuple[str, str], ...]) -> Send:
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in extra]

    async def sending(message: Message) -> None:
        if message["type"] in ("http.response.start", "websocket.accept"):
            message = {**message, "headers": [*message.get("headers", ()), *raw]}
        await send(message)

    return sending
