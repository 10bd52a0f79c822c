"""BearerAuth, require and JitbrokerBackend under a real uvicorn, called by httpx over TCP."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from typing import Annotated, Any
from uuid import uuid4

import httpx
import pytest
from fastapi import Depends, FastAPI, Security
from starlette.applications import Starlette
from starlette.authentication import requires
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from conftest import server_or_skip
from jitbroker import Claims
from jitbroker.lease import Lease
from jitbroker.stores.redis import RedisStore
from jitbroker.testing import FakeClock
from jitbroker.web import BearerAuth, DPoPNonces, JitbrokerBackend, require
from jitbroker.web.backend import JitbrokerUser
from web_servers import (
    AUDIENCE,
    BEARER,
    DPOP,
    ERROR_ROWS,
    SCOPE,
    Row,
    Setup,
    bearer_error,
    dpop_error,
    raw_request,
    uvicorn_server,
)

if not hasattr(__import__("jitbroker").Verifier, "averify"):  # pragma: no cover
    pytest.skip("Verifier.averify has not landed yet", allow_module_level=True)


async def orders(request: Request) -> JSONResponse:
    claims: Claims = request.scope["jitbroker.claims"]
    return JSONResponse({"sub": claims.subject, "lease": claims.lease_id, "method": request.method})


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True, "claims": "jitbroker.claims" in request.scope})


async def socket(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text(websocket.scope["jitbroker.claims"].subject)
    await websocket.close()


def orders_app(setup: Setup, **options: Any) -> Starlette:
    app = Starlette(
        routes=[
            Route("/orders", orders, methods=["GET", "POST"]),
            Route("/health", health),
            WebSocketRoute("/ws", socket),
        ]
    )
    options.setdefault("scopes", [SCOPE])
    app.add_middleware(
        BearerAuth, verifier=setup.verifier, audience=AUDIENCE, exempt=["/health"], **options
    )
    return app


@pytest.fixture(scope="module")
def setup() -> Setup:
    return Setup()


@pytest.fixture(scope="module")
def base(setup: Setup) -> Iterator[str]:
    with uvicorn_server(orders_app(setup)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base, timeout=10) as http:
        yield http


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# -- every error row, exactly ---------------------------------------------------------
@pytest.mark.parametrize("row", ERROR_ROWS, ids=[row.id for row in ERROR_ROWS])
def test_error_rows(row: Row, setup: Setup, base: str, client: httpx.Client) -> None:
    response = client.get("/orders", headers=row.build(setup, f"{base}/orders"))
    assert response.status_code == row.status
    assert response.headers.get_list("www-authenticate") == row.challenges
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    code = re.search(r'error="([a-z_]+)"', " ".join(row.challenges))
    body = response.json()
    assert body.get("error") == (code.group(1) if code else None)
    assert set(body) <= {"error", "error_description"}


def test_a_valid_token_reaches_the_app_with_its_claims(setup: Setup, client: httpx.Client) -> None:
    cred = setup.broker.issue("svc:client", AUDIENCE, [SCOPE], ttl=60)
    response = client.get("/orders", headers=bearer(cred.token))
    assert response.status_code == 200
    assert response.json() == {"sub": "svc:client", "lease": cred.lease_id, "method": "GET"}
    assert "www-authenticate" not in response.headers


@pytest.mark.parametrize("template", ["bearer {}", "BEARER {}", "Bearer   {}", "BeArEr {}"])
def test_schemes_are_case_insensitive(template: str, setup: Setup, client: httpx.Client) -> None:
    response = client.get("/orders", headers={"Authorization": template.format(setup.token())})
    assert response.status_code == 200


@pytest.mark.parametrize(
    "template", ["Bearer {}   ", "Bearer {}\t\t", "Bearer {} \t ", " Bearer {}"]
)
def test_whitespace_around_the_credentials_is_not_part_of_them(
    template: str, setup: Setup, base: str
) -> None:
    # httpx refuses to send these; a raw socket does not.
    header = "Authorization: " + template.format(setup.token())
    request = f"GET /orders HTTP/1.1\r\nHost: x\r\n{header}\r\nConnection: close\r\n\r\n"
    assert raw_request(base, request.encode()) == 200


def test_exempt_paths_need_no_token_and_get_no_claims(client: httpx.Client) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"ok": True, "claims": False}


def test_a_revoked_token_is_refused_on_the_next_request(setup: Setup, client: httpx.Client) -> None:
    cred = setup.broker.issue("svc:client", AUDIENCE, [SCOPE], ttl=60)
    assert client.get("/orders", headers=bearer(cred.token)).status_code == 200
    setup.broker.revoke(cred)
    response = client.get("/orders", headers=bearer(cred.token))
    assert response.status_code == 401
    assert response.headers.get_list("www-authenticate")[0] == bearer_error(
        "invalid_token", "the access token has been revoked"
    )


def test_store_down_is_a_503_never_a_401(setup: Setup, client: httpx.Client) -> None:
    token = setup.token()
    setup.store.down = True
    try:
        response = client.get("/orders", headers=bearer(token))
    finally:
        setup.store.down = False
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    assert "www-authenticate" not in response.headers
    assert response.json()["error"] == "temporarily_unavailable"
    assert client.get("/orders", headers=bearer(token)).status_code == 200


# -- DPoP ------------------------------------------------------------------------------
def test_dpop_happy_path_for_each_method(setup: Setup, base: str, client: httpx.Client) -> None:
    cred = setup.bound()
    for method in ("GET", "POST"):
        headers = {
            "Authorization": f"DPoP {cred.token}",
            "DPoP": setup.proof(method, f"{base}/orders", cred.token),
        }
        response = client.request(method, "/orders", headers=headers)
        assert response.status_code == 200, response.text
        assert response.json()["method"] == method


def test_the_query_is_not_part_of_htu(setup: Setup, base: str, client: httpx.Client) -> None:
    cred = setup.bound()
    headers = {
        "Authorization": f"dpop {cred.token}",  # the scheme is case-insensitive too
        "DPoP": setup.proof("GET", f"{base}/orders", cred.token),
    }
    assert client.get("/orders?page=2#frag", headers=headers).status_code == 200


def test_a_replayed_proof_is_refused(setup: Setup, base: str, client: httpx.Client) -> None:
    cred = setup.bound()
    headers = {
        "Authorization": f"DPoP {cred.token}",
        "DPoP": setup.proof("GET", f"{base}/orders", cred.token),
    }
    assert client.get("/orders", headers=headers).status_code == 200
    again = client.get("/orders", headers=headers)
    assert again.status_code == 401
    assert again.headers.get_list("www-authenticate") == [
        BEARER,
        dpop_error(
            "invalid_dpop_proof",
            "the DPoP proof was already used; send a new proof with each request",
        ),
    ]


def test_a_proof_by_another_key_is_refused(setup: Setup, base: str, client: httpx.Client) -> None:
    from jitbroker.keys import generate_key

    cred = setup.bound()
    other = setup.proof("GET", f"{base}/orders", cred.token, key=generate_key("EdDSA"))
    headers = {"Authorization": f"DPoP {cred.token}", "DPoP": other}
    assert client.get("/orders", headers=headers).status_code == 401


def test_the_nonce_dance_and_its_rotation() -> None:
    setup = Setup()
    nonce_clock = FakeClock(setup.clock())
    nonces = DPoPNonces(window=60, clock=nonce_clock)
    with (
        uvicorn_server(orders_app(setup, dpop_nonces=nonces)) as base,
        httpx.Client(base_url=base) as client,
    ):
        cred = setup.bound()

        def call(nonce: str | None) -> httpx.Response:
            proof = setup.proof("GET", f"{base}/orders", cred.token, nonce=nonce)
            return client.get(
                "/orders", headers={"Authorization": f"DPoP {cred.token}", "DPoP": proof}
            )

        first = call(None)
        assert first.status_code == 401
        assert first.headers.get_list("www-authenticate") == [
            BEARER,
            dpop_error(
                "use_dpop_nonce",
                "the resource server requires a DPoP nonce: retry with the one in DPoP-Nonce",
            ),
        ]
        nonce = first.headers["dpop-nonce"]
        ok = call(nonce)
        assert ok.status_code == 200
        assert "dpop-nonce" not in ok.headers  # still current: nothing new to hand out
        assert call("made-up").status_code == 401
        nonce_clock.advance(60)  # one window on: the old nonce works, a new one is handed out
        rotated = call(nonce)
        assert rotated.status_code == 200
        assert rotated.headers["dpop-nonce"] not in ("", nonce)
        nonce_clock.advance(60)  # two windows on: the old one is refused
        stale = call(nonce)
        assert stale.status_code == 401
        assert stale.headers["dpop-nonce"] not in (nonce, rotated.headers["dpop-nonce"])
        assert call(rotated.headers["dpop-nonce"]).status_code == 200  # the previous window's
        assert call(stale.headers["dpop-nonce"]).status_code == 200
        # Bearer tokens are not asked for nonces.
        assert client.get("/orders", headers=bearer(setup.token())).status_code == 200


# -- proxies ---------------------------------------------------------------------------
PUBLIC = "https://api.example.com/orders"
FORWARDED_X = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "api.example.com"}


def dpop_headers(setup: Setup, url: str, **extra: str) -> dict[str, str]:
    cred = setup.bound()
    return {
        "Authorization": f"DPoP {cred.token}",
        "DPoP": setup.proof("GET", url, cred.token),
        **extra,
    }


def test_forwarding_headers_are_ignored_by_default(
    setup: Setup, base: str, client: httpx.Client
) -> None:
    spoofed = {**FORWARDED_X, "Forwarded": "proto=https;host=api.example.com"}
    assert client.get("/orders", headers=dpop_headers(setup, PUBLIC, **spoofed)).status_code == 401
    real = dpop_headers(setup, f"{base}/orders", **spoofed)
    assert client.get("/orders", headers=real).status_code == 200


@pytest.mark.parametrize(
    "forwarding",
    [
        FORWARDED_X,
        {"Forwarded": 'for=203.0.113.9;proto=https;host="api.example.com"'},
        # A client's own Forwarded element (leftmost) is never reached: the walk
        # from the right stops at the first hop that is not a trusted proxy.
        {
            "Forwarded": "for=1.2.3.4;proto=http;host=evil.example, for=203.0.113.9;proto=https;"
            "host=api.example.com"
        },
        # Two trusted proxies: the element the outer one (10.0.0.2) added is used.
        {
            "Forwarded": "for=203.0.113.9;proto=https;host=api.example.com, "
            "for=10.0.0.2;proto=http;host=inner:8080"
        },
    ],
)
def test_trusted_proxies_are_believed(forwarding: dict[str, str]) -> None:
    setup = Setup()
    app = orders_app(setup, trusted_proxies=["127.0.0.1", "10.0.0.0/8"])
    with uvicorn_server(app) as base, httpx.Client(base_url=base) as client:
        response = client.get("/orders", headers=dpop_headers(setup, PUBLIC, **forwarding))
        assert response.status_code == 200, response.headers.get_list("www-authenticate")
        direct = dpop_headers(setup, f"{base}/orders", **forwarding)
        assert client.get("/orders", headers=direct).status_code == 401


def test_public_url_fixes_the_origin() -> None:
    setup = Setup()
    app = orders_app(setup, public_url="https://api.example.com")
    with uvicorn_server(app) as base, httpx.Client(base_url=base) as client:
        assert client.get("/orders", headers=dpop_headers(setup, PUBLIC)).status_code == 200
        local = dpop_headers(setup, f"{base}/orders", **FORWARDED_X)
        assert client.get("/orders", headers=local).status_code == 401


# -- hostile headers -------------------------------------------------------------------
HOSTILE = [
    b"Authorization: Bearer abc\x00def",
    b"Authorization: Bearer \x00",
    b"Authorization: Bearer \xc3\xa9t\xc3\xa9",
    b"Authorization: Bearer\tabc",
    b"Authorization: Bearer " + b"a" * 100_000,
    b"Authorization: " + b"B" * 100_000,
    b"Authorization: Bearer a\r\nAuthorization: Bearer b",
    b"Authorization: DPoP abc\r\nDPoP: \xff\xfe",
    b"Authorization: Bearer a\r\nX-Filler: " + b"x" * 100_000,
]


@pytest.mark.parametrize("header", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_headers_over_tcp_are_a_4xx_never_a_500(header: bytes, base: str) -> None:
    request = (
        b"GET /orders HTTP/1.1\r\nHost: 127.0.0.1\r\n" + header + b"\r\nConnection: close\r\n\r\n"
    )
    assert raw_request(base, request) in (400, 401)


async def call_asgi(app: Any, headers: list[tuple[bytes, bytes]]) -> tuple[int, list[Any]]:
    """Drive the ASGI app in process with headers no server would pass on."""
    scope = {
        "type": "http",
        "method": "GET",
        "scheme": "http",
        "path": "/orders",
        "raw_path": b"/orders",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"test"), *headers],
        "server": ("test", 80),
        "client": ("127.0.0.1", 5000),
    }
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent[0]["status"], sent[0]["headers"]


@pytest.mark.parametrize(
    ("value", "status"),
    [
        (b"Bearer abc\x00def", 400),
        (b"Bearer \x00", 400),
        (b"Bearer \xc3\xa9t\xc3\xa9", 400),
        (b"Bearer\tabc", 400),
        (b"Bearer a b", 400),
        (b"Bearer " + b"a" * 100_000, 400),
        (b"\x00", 400),
        (b"", 400),
        (b"Bearer abc=x", 400),
        (b"Bearer abc==", 401),  # a b64token, just not a token of ours
        (b"Negotiate abc", 401),
        (b"\xff\xfe abc", 400),
    ],
)
def test_hostile_authorization_values_in_process(value: bytes, status: int, setup: Setup) -> None:
    app = orders_app(setup)
    got, headers = asyncio.run(call_asgi(app, [(b"authorization", value)]))
    assert got == status
    assert any(name == b"www-authenticate" for name, _ in headers)


def test_hostile_dpop_headers_in_process(setup: Setup) -> None:
    app = orders_app(setup)
    token = setup.bound().token.encode()
    for proof in (b"\x00", b"\xff" * 5000, b"a.b.c", b"a" * 100_000, b"x.\xc3\xa9.y"):
        got, _ = asyncio.run(
            call_asgi(app, [(b"authorization", b"DPoP " + token), (b"dpop", proof)])
        )
        assert got == 401


def test_a_bad_host_header_fails_the_proof_not_the_server(setup: Setup) -> None:
    app = orders_app(setup)
    cred = setup.bound()
    proof = setup.proof("GET", "http://test/orders", cred.token).encode()
    for host in (b"", b"a b", b"evil@test", b"test:99999", b"\x00"):
        headers = [(b"authorization", b"DPoP " + cred.token.encode()), (b"dpop", proof)]
        scope_headers = [(b"host", host), *headers]
        got, _ = asyncio.run(call_asgi(app, scope_headers))
        assert got == 401


# -- WebSockets and lifespan ------------------------------------------------------------
async def call_ws(
    app: Any, headers: list[tuple[bytes, bytes]], *, denial: bool = True
) -> list[Any]:
    """Drive a WebSocket handshake through the ASGI app; the messages it sent."""
    scope = {
        "type": "websocket",
        "scheme": "ws",
        "path": "/ws",
        "raw_path": b"/ws",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"test"), *headers],
        "server": ("test", 80),
        "client": ("127.0.0.1", 5000),
        "subprotocols": [],
        "extensions": {"websocket.http.response": {}} if denial else {},
    }
    sent: list[Any] = []
    incoming = [{"type": "websocket.connect"}]

    async def receive() -> dict[str, Any]:
        return incoming.pop(0) if incoming else {"type": "websocket.disconnect", "code": 1000}

    async def send(message: Any) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def test_websockets_are_verified_on_connect(setup: Setup) -> None:
    app = orders_app(setup)
    token = setup.token().encode()
    accepted = asyncio.run(call_ws(app, [(b"authorization", b"Bearer " + token)]))
    assert [m["type"] for m in accepted] == [
        "websocket.accept",
        "websocket.send",
        "websocket.close",
    ]
    assert accepted[1]["text"] == "svc:client"
    denied = asyncio.run(call_ws(app, []))
    assert [m["type"] for m in denied] == [
        "websocket.http.response.start",
        "websocket.http.response.body",
    ]
    assert denied[0]["status"] == 401
    challenges = [v for k, v in denied[0]["headers"] if k == b"www-authenticate"]
    assert challenges == [BEARER.encode(), DPOP.encode()]


def test_a_websocket_without_the_denial_extension_is_closed() -> None:
    setup = Setup()
    app = BearerAuth(_never, verifier=setup.verifier, audience=AUDIENCE)
    sent = asyncio.run(call_ws(app, [], denial=False))
    assert sent == [{"type": "websocket.close", "code": 1008}]


async def _never(scope: Any, receive: Any, send: Any) -> None:
    raise AssertionError("the app must not be reached")


def test_lifespan_passes_through() -> None:
    seen: list[str] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    app = BearerAuth(inner, verifier=Setup().verifier, audience=AUDIENCE)

    async def receive() -> dict[str, Any]:
        raise AssertionError("not called")

    async def send(message: Any) -> None:
        raise AssertionError("not called")

    asyncio.run(app({"type": "lifespan"}, receive, send))
    assert seen == ["lifespan"]


# -- FastAPI: require --------------------------------------------------------------------
def fastapi_app(setup: Setup) -> FastAPI:
    app = FastAPI()

    @app.get("/orders")
    async def list_orders(claims: Annotated[Claims, Security(require(scopes=[SCOPE]))]) -> Any:
        return {"sub": claims.subject}

    @app.post("/orders")
    async def add_order(
        claims: Annotated[Claims, Security(require(), scopes=["orders:write"])],
    ) -> Any:
        return {"sub": claims.subject}

    @app.get("/me")
    async def me(claims: Annotated[Claims, Depends(require(audience=AUDIENCE))]) -> Any:
        return {"sub": claims.subject}

    @app.get("/other-audience")
    async def other(claims: Annotated[Claims, Depends(require(audience="api:other"))]) -> Any:
        return {"sub": claims.subject}

    @app.get("/public")
    async def public(claims: Annotated[Claims, Depends(require())]) -> Any:
        return {"sub": claims.subject}

    app.add_middleware(
        BearerAuth,
        verifier=setup.verifier,
        audience=AUDIENCE,
        exempt=["/public", "/openapi.json", "/docs"],
    )
    return app


def test_require_with_fastapi() -> None:
    setup = Setup()
    with uvicorn_server(fastapi_app(setup)) as base, httpx.Client(base_url=base) as client:
        read = bearer(setup.token())
        write = bearer(setup.token(scopes=("orders:write",)))
        assert client.get("/orders", headers=read).json() == {"sub": "svc:client"}
        assert client.get("/me", headers=read).status_code == 200
        assert client.post("/orders", headers=write).status_code == 200

        refused = client.post("/orders", headers=read)
        assert refused.status_code == 403
        assert refused.headers["www-authenticate"] == ", ".join(
            [
                bearer_error(
                    "insufficient_scope",
                    "the access token lacks a scope this resource requires",
                    ', scope="orders:write"',
                ),
                DPOP,
            ]
        )
        assert client.get("/orders", headers=write).status_code == 403
        wrong = client.get("/other-audience", headers=read)
        assert wrong.status_code == 401
        assert 'error="invalid_token"' in wrong.headers["www-authenticate"]
        anonymous = client.get("/public")  # exempt from the middleware, but require() wants claims
        assert anonymous.status_code == 401
        assert anonymous.headers["www-authenticate"] == f"{BEARER}, {DPOP}"

        schema = client.get("/openapi.json").json()
        assert schema["components"]["securitySchemes"]["jitbroker"] == {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
            "description": "A jitbroker access token (Bearer, or DPoP for key-bound tokens).",
        }
        assert schema["paths"]["/orders"]["post"]["security"] == [{"jitbroker": ["orders:write"]}]
        assert schema["paths"]["/me"]["get"]["security"] == [{"jitbroker": []}]


def in_process(app: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=True)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


def test_require_without_the_middleware_is_a_server_error_that_says_why() -> None:
    app = FastAPI()

    @app.get("/x")
    async def x(claims: Annotated[Claims, Depends(require())]) -> Any:
        return {}

    async def call() -> None:
        async with in_process(app) as test:
            await test.get("/x")

    with pytest.raises(ValueError, match="BearerAuth"):
        asyncio.run(call())


def test_require_in_a_plain_starlette_endpoint(setup: Setup) -> None:
    need_write = require(scopes=["orders:write"])

    async def write(request: Request) -> JSONResponse:
        claims = await need_write(request)
        return JSONResponse({"sub": claims.subject})

    app = Starlette(routes=[Route("/write", write)])
    app.add_middleware(BearerAuth, verifier=setup.verifier, audience=AUDIENCE)

    async def calls() -> tuple[httpx.Response, httpx.Response]:
        async with in_process(app) as test:
            ok = await test.get("/write", headers=bearer(setup.token(scopes=("orders:write",))))
            return ok, await test.get("/write", headers=bearer(setup.token()))

    ok, refused = asyncio.run(calls())
    assert ok.json() == {"sub": "svc:client"}
    assert refused.status_code == 403
    assert 'scope="orders:write"' in refused.headers["www-authenticate"]


# -- Starlette: JitbrokerBackend ----------------------------------------------------------
@requires(SCOPE)
async def whoami(request: Request) -> JSONResponse:
    user = request.user
    assert isinstance(user, JitbrokerUser)
    return JSONResponse(
        {
            "lease": user.lease_id,
            "subject": user.subject,
            "owner": user.owner,
            "actor": user.actor,
            "actors": list(user.actors),
            "delegated_by": list(user.delegated_by),
            "scopes": request.auth.scopes,
        }
    )


async def anyone(request: Request) -> JSONResponse:
    return JSONResponse({"authenticated": request.user.is_authenticated})


def test_the_starlette_backend() -> None:
    setup = Setup()
    backend = JitbrokerBackend(setup.verifier, audience=AUDIENCE)
    app = Starlette(routes=[Route("/whoami", whoami), Route("/anyone", anyone)])
    app.add_middleware(AuthenticationMiddleware, backend=backend, on_error=backend.on_error)
    parent = setup.broker.issue(
        "svc:parent", AUDIENCE, [SCOPE, "orders:write"], ttl=60, owner="alice@example.com"
    )
    child = setup.broker.attenuate(parent, scopes=[SCOPE], subject="svc:child")
    with uvicorn_server(app) as base, httpx.Client(base_url=base) as client:
        assert client.get("/anyone").json() == {"authenticated": False}
        assert client.get("/whoami").status_code == 403  # Starlette's @requires
        me = client.get("/whoami", headers=bearer(child.token)).json()
        assert me == {
            "lease": child.lease_id,
            "subject": "svc:parent",
            "owner": "alice@example.com",
            "actor": "svc:child",
            "actors": ["svc:child"],
            "delegated_by": [parent.lease_id],
            "scopes": [SCOPE],
        }
        bad = client.get("/anyone", headers=bearer("abc.def.ghi"))
        assert bad.status_code == 401
        assert bad.headers.get_list("www-authenticate") == [
            bearer_error("invalid_token", "the access token is invalid"),
            DPOP,
        ]
        assert json.loads(bad.text)["error"] == "invalid_token"


# -- the revocation cache (Redis) ------------------------------------------------------------
class CountingStore(RedisStore):
    """Counts lease lookups: the round trips the revocation cache saves."""

    gets = 0

    def get(self, lease_id: str) -> Lease | None:
        self.gets += 1
        return super().get(lease_id)


def test_a_revoked_token_is_refused_through_the_revocation_cache() -> None:
    server_or_skip("Redis", "127.0.0.1", 6379)
    store = CountingStore("redis://127.0.0.1:6379/0", prefix=f"jbtest-web-{uuid4().hex}")
    # An hour-old store, as in production: a cache vouches only for tokens issued
    # after the store's epoch (a new store's is now).
    store._client.set(f"{{{store.prefix}}}:epoch", time.time() - 3600)
    cache = store.revocations(max_staleness=1.0, heartbeat=0.1)
    try:
        deadline = time.monotonic() + 10
        while not cache.fresh() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert cache.fresh(), "the revocation feed did not come up"
        setup = Setup(store=store, revocations=cache)
        with uvicorn_server(orders_app(setup)) as base, httpx.Client(base_url=base) as client:
            cred = setup.broker.issue("svc:client", AUDIENCE, [SCOPE], ttl=60)
            assert client.get("/orders", headers=bearer(cred.token)).status_code == 200
            setup.broker.revoke(cred)  # strict: returns once the cache has it
            response = client.get("/orders", headers=bearer(cred.token))
            assert response.status_code == 401
            assert response.headers.get_list("www-authenticate")[0] == bearer_error(
                "invalid_token", "the access token has been revoked"
            )
            assert store.gets == 0  # the cache answered both times, no store round trip
    finally:
        cache.close()
        store.clear()
        store.close()
