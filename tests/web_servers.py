"""Shared parts of the jitbroker.web tests: real servers on 127.0.0.1, a broker
and verifier on one fake clock, DPoP proofs made by hand, and the table of
error rows that every adapter must answer exactly alike."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple
from wsgiref.simple_server import WSGIRequestHandler, make_server

import uvicorn
from werkzeug.serving import make_server as werkzeug_server

from jitbroker import Broker, KeyRing, MemoryStore, Verifier
from jitbroker.dpop import normalize_uri, token_hash
from jitbroker.errors import StoreUnavailable
from jitbroker.jwk import b64url
from jitbroker.keys import Key, generate_key
from jitbroker.lease import Credential, Lease
from jitbroker.testing import FakeClock
from jitbroker.tokens import json_text

ISSUER = "urn:test:web"
AUDIENCE = "api:orders"
SCOPE = "orders:read"
BEARER = 'Bearer realm="api:orders"'
DPOP = 'DPoP realm="api:orders", algs="EdDSA ES256 RS256"'
Headers = list[tuple[str, str]]


def bearer_error(code: str, description: str, extra: str = "") -> str:
    return f'{BEARER}, error="{code}", error_description="{description}"{extra}'


def dpop_error(code: str, description: str) -> str:
    return f'{DPOP}, error="{code}", error_description="{description}"'


# -- servers ---------------------------------------------------------------------
@contextmanager
def uvicorn_server(app: Any) -> Iterator[str]:
    """Serve the ASGI ``app`` with a real uvicorn on a free port; yields its base URL."""
    # proxy_headers off: uvicorn's own (on by default for 127.0.0.1) would rewrite
    # the scheme from X-Forwarded-Proto before BearerAuth sees the request.
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_level="warning", lifespan="off", proxy_headers=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def wsgi_server(app: Any, *, werkzeug: bool = True) -> Iterator[str]:
    """Serve the WSGI ``app`` on a free port with werkzeug's server (threaded) or
    the standard library's wsgiref (which keeps no raw request URI)."""
    server: Any
    if werkzeug:
        server = werkzeug_server("127.0.0.1", 0, app, threaded=True)
        port = server.port
    else:
        server = make_server("127.0.0.1", 0, app, handler_class=_QuietHandler)
        port = server.server_port
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def raw_request(base: str, request: bytes) -> int:
    """Send raw bytes (what no client library would send) and return the status."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(request)
        data = b""
        while b"\r\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1])


# -- a broker, a verifier and a holder key ---------------------------------------------
class DownStore(MemoryStore):
    """A MemoryStore that can be taken down: then every read fails as a store's would."""

    down = False

    def get(self, lease_id: str) -> Lease | None:
        if self.down:
            raise StoreUnavailable("the store is down (test)")
        return super().get(lease_id)


class Setup:
    """One issuer's broker, a verifier of its tokens and a client's holder key,
    all on one ``FakeClock`` started at the real time (proofs carry real times)."""

    def __init__(self, store: Any = None, **verifier_options: Any) -> None:
        self.clock = FakeClock(time.time())
        self.keys = KeyRing.generate("EdDSA")
        self.store = DownStore() if store is None else store
        self.broker = Broker(issuer=ISSUER, keys=self.keys, store=self.store, clock=self.clock)
        self.verifier = Verifier(
            self.keys,
            issuer=ISSUER,
            store=self.store,
            clock=self.clock,
            **verifier_options,
        )
        self.holder = generate_key("EdDSA")

    def token(self, *, scopes: tuple[str, ...] = (SCOPE,), audience: str = AUDIENCE) -> str:
        return self.broker.issue("svc:client", audience, scopes=list(scopes), ttl=60).token

    def bound(self, *, scopes: tuple[str, ...] = (SCOPE,)) -> Credential:
        return self.broker.issue(
            "svc:client", AUDIENCE, scopes=list(scopes), ttl=60, holder_key=self.holder.public()
        )

    def proof(
        self,
        method: str,
        url: str,
        token: str | None,
        *,
        nonce: str | None = None,
        key: Key | None = None,
    ) -> str:
        return sign_proof(key or self.holder, method, url, token, now=self.clock(), nonce=nonce)


def sign_proof(
    key: Key,
    method: str,
    url: str,
    token: str | None,
    *,
    now: float,
    nonce: str | None = None,
) -> str:
    """A DPoP proof as a client library makes one (``make_proof`` has no nonce)."""
    public = {k: v for k, v in (key.public_jwk() or {}).items() if k not in ("kid", "use")}
    header = {"typ": "dpop+jwt", "alg": key.alg, "jwk": public}
    claims: dict[str, Any] = {
        "jti": os.urandom(16).hex(),
        "htm": method,
        "htu": normalize_uri(url),
        "iat": int(now),
    }
    if token is not None:
        claims["ath"] = token_hash(token)
    if nonce is not None:
        claims["nonce"] = nonce
    signing_input = b64url(json_text(header).encode()) + "." + b64url(json_text(claims).encode())
    return signing_input + "." + b64url(key.sign(signing_input.encode("ascii")))


# -- the error rows ------------------------------------------------------------------
class Row(NamedTuple):
    """One request that must be refused, and exactly how."""

    id: str
    build: Callable[[Setup, str], Headers]  # (setup, URL of /orders) -> request headers
    status: int
    challenges: list[str]


def _expired(setup: Setup, url: str) -> Headers:
    past = Broker(
        issuer=ISSUER, keys=setup.keys, store=setup.store, clock=lambda: setup.clock() - 7200
    )
    return [("Authorization", "Bearer " + past.issue("svc:c", AUDIENCE, [SCOPE], ttl=60).token)]


def _revoked(setup: Setup, url: str) -> Headers:
    cred = setup.broker.issue("svc:client", AUDIENCE, [SCOPE], ttl=60)
    setup.broker.revoke(cred)
    return [("Authorization", "Bearer " + cred.token)]


def _dpop(
    method: str = "GET",
    path: str | None = None,
    *,
    ath: bool = True,
    proofs: int = 1,
    bound: bool = True,
) -> Callable[[Setup, str], Headers]:
    def build(setup: Setup, url: str) -> Headers:
        token = setup.bound().token if bound else setup.token()
        target = url if path is None else url.rsplit("/", 1)[0] + path
        headers = [("Authorization", "DPoP " + token)]
        for _ in range(proofs):
            headers.append(("DPoP", setup.proof(method, target, token if ath else None)))
        return headers

    return build


INVALID_PROOF = "the DPoP proof is missing or invalid"
ERROR_ROWS = [
    Row("no-credentials", lambda s, u: [], 401, [BEARER, DPOP]),
    Row(
        "basic-scheme", lambda s, u: [("Authorization", "Basic dXNlcjpwYXNz")], 401, [BEARER, DPOP]
    ),
    Row(
        "scheme-without-token",
        lambda s, u: [("Authorization", "Bearer")],
        400,
        [bearer_error("invalid_request", "the Authorization or DPoP header is malformed"), DPOP],
    ),
    Row(
        "two-authorization-headers",
        lambda s, u: [("Authorization", "Bearer " + s.token()), ("Authorization", "Bearer x")],
        400,
        [bearer_error("invalid_request", "the Authorization or DPoP header is malformed"), DPOP],
    ),
    Row(
        "not-a-token",
        lambda s, u: [("Authorization", "Bearer abc.def.ghi")],
        401,
        [bearer_error("invalid_token", "the access token is invalid"), DPOP],
    ),
    Row(
        "expired",
        _expired,
        401,
        [bearer_error("invalid_token", "the access token has expired"), DPOP],
    ),
    Row(
        "revoked",
        _revoked,
        401,
        [bearer_error("invalid_token", "the access token has been revoked"), DPOP],
    ),
    Row(
        "other-audience",
        lambda s, u: [("Authorization", "Bearer " + s.token(audience="api:other"))],
        401,
        [bearer_error("invalid_token", "the access token is not meant for this resource"), DPOP],
    ),
    Row(
        "insufficient-scope",
        lambda s, u: [("Authorization", "Bearer " + s.token(scopes=("orders:write",)))],
        403,
        [
            bearer_error(
                "insufficient_scope",
                "the access token lacks a scope this resource requires",
                ', scope="orders:read"',
            ),
            DPOP,
        ],
    ),
    Row(
        "bound-token-as-bearer",
        lambda s, u: [("Authorization", "Bearer " + s.bound().token)],
        401,
        [
            bearer_error(
                "invalid_token",
                "this access token is bound to a key: send it with the DPoP scheme and a proof",
            ),
            DPOP,
        ],
    ),
    Row(
        "dpop-without-proof",
        _dpop(proofs=0),
        401,
        [BEARER, dpop_error("invalid_dpop_proof", INVALID_PROOF)],
    ),
    Row(
        "dpop-two-proofs",
        _dpop(proofs=2),
        401,
        [BEARER, dpop_error("invalid_dpop_proof", INVALID_PROOF)],
    ),
    Row(
        "dpop-wrong-method",
        _dpop("POST"),
        401,
        [BEARER, dpop_error("invalid_dpop_proof", INVALID_PROOF)],
    ),
    Row(
        "dpop-wrong-url",
        _dpop(path="/elsewhere"),
        401,
        [BEARER, dpop_error("invalid_dpop_proof", INVALID_PROOF)],
    ),
    Row(
        "dpop-missing-ath",
        _dpop(ath=False),
        401,
        [BEARER, dpop_error("invalid_dpop_proof", INVALID_PROOF)],
    ),
    Row(
        "dpop-unbound-token",
        _dpop(bound=False),
        401,
        [BEARER, dpop_error("invalid_token", "the access token is invalid")],
    ),
]
