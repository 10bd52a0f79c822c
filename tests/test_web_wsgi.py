"""WSGIBearer with Flask under werkzeug's server and Django under wsgiref, over TCP."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from flask import Flask, request

from jitbroker import Claims
from jitbroker.testing import FakeClock
from jitbroker.web import DPoPNonces, WSGIBearer
from web_servers import (
    AUDIENCE,
    BEARER,
    ERROR_ROWS,
    SCOPE,
    Row,
    Setup,
    bearer_error,
    dpop_error,
    raw_request,
    wsgi_server,
)


def flask_app(setup: Setup, **options: Any) -> Flask:
    app = Flask("orders")

    @app.route("/orders", methods=["GET", "POST"])
    def orders() -> dict[str, Any]:
        claims: Claims = request.environ["jitbroker.claims"]
        return {"sub": claims.subject, "lease": claims.lease_id, "method": request.method}

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"ok": True, "claims": "jitbroker.claims" in request.environ}

    options.setdefault("scopes", [SCOPE])
    app.wsgi_app = WSGIBearer(  # type: ignore[method-assign]
        app.wsgi_app, verifier=setup.verifier, audience=AUDIENCE, exempt=["/health"], **options
    )
    return app


@pytest.fixture(scope="module")
def setup() -> Setup:
    return Setup()


@pytest.fixture(scope="module")
def base(setup: Setup) -> Iterator[str]:
    with wsgi_server(flask_app(setup)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base, timeout=10) as http:
        yield http


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize("row", ERROR_ROWS, ids=[row.id for row in ERROR_ROWS])
def test_error_rows(row: Row, setup: Setup, base: str, client: httpx.Client) -> None:
    response = client.get("/orders", headers=row.build(setup, f"{base}/orders"))
    assert response.status_code == row.status
    assert response.headers.get_list("www-authenticate") == row.challenges
    assert response.headers["content-type"] == "application/json"
    code = re.search(r'error="([a-z_]+)"', " ".join(row.challenges))
    assert response.json().get("error") == (code.group(1) if code else None)


def test_a_valid_token_reaches_the_view(setup: Setup, client: httpx.Client) -> None:
    cred = setup.broker.issue("svc:client", AUDIENCE, [SCOPE], ttl=60)
    response = client.get("/orders", headers={"Authorization": f"bearer {cred.token}"})
    assert response.status_code == 200
    assert response.json() == {"sub": "svc:client", "lease": cred.lease_id, "method": "GET"}


def test_exempt_paths(client: httpx.Client) -> None:
    assert client.get("/health").json() == {"ok": True, "claims": False}


def test_a_revoked_token_is_refused_on_the_next_request(setup: Setup, client: httpx.Client) -> None:
    cred = setup.broker.issue("svc:client", AUDIENCE, [SCOPE], ttl=60)
    assert client.get("/orders", headers=bearer(cred.token)).status_code == 200
    setup.broker.revoke(cred)
    assert client.get("/orders", headers=bearer(cred.token)).status_code == 401


def test_store_down_is_a_503(setup: Setup, client: httpx.Client) -> None:
    token = setup.token()
    setup.store.down = True
    try:
        response = client.get("/orders", headers=bearer(token))
    finally:
        setup.store.down = False
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    assert "www-authenticate" not in response.headers


def test_dpop_happy_path_and_replay(setup: Setup, base: str, client: httpx.Client) -> None:
    cred = setup.bound()
    for method in ("GET", "POST"):
        headers = {
            "Authorization": f"DPoP {cred.token}",
            "DPoP": setup.proof(method, f"{base}/orders?ignored=1", cred.token),
        }
        assert client.request(method, "/orders?q=1", headers=headers).status_code == 200
    replay = client.post("/orders", headers=headers)
    assert replay.status_code == 401
    assert 'error="invalid_dpop_proof"' in replay.headers.get_list("www-authenticate")[1]


def test_the_nonce_dance() -> None:
    setup = Setup()
    clock = FakeClock(setup.clock())
    app = flask_app(setup, dpop_nonces=DPoPNonces(window=30, clock=clock))
    with wsgi_server(app) as base, httpx.Client(base_url=base) as client:
        cred = setup.bound()

        def call(nonce: str | None) -> httpx.Response:
            proof = setup.proof("GET", f"{base}/orders", cred.token, nonce=nonce)
            return client.get(
                "/orders", headers={"Authorization": f"DPoP {cred.token}", "DPoP": proof}
            )

        first = call(None)
        assert first.status_code == 401
        assert 'error="use_dpop_nonce"' in first.headers.get_list("www-authenticate")[1]
        assert call(first.headers["dpop-nonce"]).status_code == 200
        clock.advance(30)
        rotated = call(first.headers["dpop-nonce"])
        assert rotated.status_code == 200
        assert rotated.headers["dpop-nonce"] != first.headers["dpop-nonce"]


def test_trusted_proxies_and_untrusted_ones() -> None:
    setup = Setup()
    public = "https://api.example.com/orders"
    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "api.example.com"}

    def headers() -> dict[str, str]:
        cred = setup.bound()
        return {
            "Authorization": f"DPoP {cred.token}",
            "DPoP": setup.proof("GET", public, cred.token),
            **forwarded,
        }

    with wsgi_server(flask_app(setup)) as base, httpx.Client(base_url=base) as client:
        assert client.get("/orders", headers=headers()).status_code == 401
    trusting = flask_app(setup, trusted_proxies=["127.0.0.0/8"])
    with wsgi_server(trusting) as base, httpx.Client(base_url=base) as client:
        assert client.get("/orders", headers=headers()).status_code == 200


HOSTILE = [
    b"Authorization: Bearer abc\x00def",
    b"Authorization: Bearer \xc3\xa9t\xc3\xa9",
    b"Authorization: Bearer\tabc",
    b"Authorization: Bearer " + b"a" * 60_000,
    b"Authorization: Bearer a\r\nAuthorization: Bearer b",
    b"Authorization: DPoP abc\r\nDPoP: \xff\xfe",
]


@pytest.mark.parametrize("header", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_headers_are_a_4xx_never_a_500(header: bytes, base: str) -> None:
    request = (
        b"GET /orders HTTP/1.1\r\nHost: 127.0.0.1\r\n" + header + b"\r\nConnection: close\r\n\r\n"
    )
    assert raw_request(base, request) in (400, 401)


# -- Django ---------------------------------------------------------------------------
def django_views() -> list[Any]:
    from django.http import HttpRequest, JsonResponse  # type: ignore[import-untyped]
    from django.urls import path  # type: ignore[import-untyped]

    def orders(request: HttpRequest, name: str) -> JsonResponse:
        claims: Claims = request.META["jitbroker.claims"]
        return JsonResponse({"sub": claims.subject, "path": request.path})

    return [path("orders/<str:name>", orders)]


urlpatterns: list[Any] = []


@pytest.fixture(scope="module")
def django_app() -> Any:
    import django  # type: ignore[import-untyped]
    from django.conf import settings  # type: ignore[import-untyped]

    if not settings.configured:
        settings.configure(
            DEBUG=False,
            SECRET_KEY="test-only-not-a-secret",
            ALLOWED_HOSTS=["127.0.0.1"],
            ROOT_URLCONF=__name__,
            MIDDLEWARE=[],
            INSTALLED_APPS=[],
        )
        django.setup()
    urlpatterns[:] = django_views()
    from django.core.wsgi import get_wsgi_application  # type: ignore[import-untyped]

    return get_wsgi_application()


def test_django_under_wsgiref(django_app: Any) -> None:
    setup = Setup()
    application = WSGIBearer(django_app, verifier=setup.verifier, audience=AUDIENCE)
    # wsgiref keeps no raw request URI: the htu path is PATH_INFO quoted again.
    with wsgi_server(application, werkzeug=False) as base, httpx.Client(base_url=base) as client:
        assert client.get("/orders/x").status_code == 401
        assert client.get("/orders/x").headers.get_list("www-authenticate")[0] == BEARER
        ok = client.get("/orders/x", headers=bearer(setup.token()))
        assert ok.json() == {"sub": "svc:client", "path": "/orders/x"}
        cred = setup.bound()
        url = f"{base}/orders/caf%C3%A9%20au%20lait"
        proof = {"Authorization": f"DPoP {cred.token}", "DPoP": setup.proof("GET", url, cred.token)}
        assert client.get(url, headers=proof).json()["path"] == "/orders/café au lait"
        expired_scope = client.get("/orders/x", headers=bearer(setup.token(audience="other")))
        assert expired_scope.headers.get_list("www-authenticate")[0] == bearer_error(
            "invalid_token", "the access token is not meant for this resource"
        )
        no_proof = client.get(url, headers={"Authorization": f"DPoP {cred.token}"})
        assert no_proof.headers.get_list("www-authenticate")[1] == dpop_error(
            "invalid_dpop_proof", "the DPoP proof is missing or invalid"
        )
