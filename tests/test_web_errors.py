"""The sans-I/O parts of jitbroker.web: the error mapping, header parsing, proxies,
nonces, auditing, and what importing it costs."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

import jitbroker.web
from jitbroker.audit import AuditEvent
from jitbroker.dpop import _ALGS
from jitbroker.errors import (
    BadSignature,
    InsufficientScope,
    InvalidProof,
    InvalidRequest,
    KeySourceError,
    LeaseNotFound,
    MalformedToken,
    ProofReplayed,
    StoreError,
    StoreUnavailable,
    TokenExpired,
    TokenNotYetValid,
    TokenRevoked,
    UnknownKey,
    UnknownLease,
    WrongAudience,
    WrongIssuer,
)
from jitbroker.testing import FakeClock
from jitbroker.web import (
    DPoPNonces,
    MalformedRequest,
    NoCredentials,
    NonceRequired,
    TrustedProxies,
    WSGIBearer,
    error_response,
)
from jitbroker.web.gate import Gate, Location, RequestView
from jitbroker.web.headers import presented
from jitbroker.web.proxies import Origin, forwarded_origin, parse_public_url
from jitbroker.web.responses import DPOP_ALGS
from web_servers import AUDIENCE, BEARER, DPOP, SCOPE, Setup, bearer_error

SECRETLY = "lease-0123456789abcdef kid-XYZ urn:internal:issuer orders:admin"


# -- error_response: the status table -------------------------------------------------
@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (NoCredentials("x"), 401, None),
        (MalformedRequest("x"), 400, "invalid_request"),
        (MalformedToken(SECRETLY), 401, "invalid_token"),
        (BadSignature(SECRETLY), 401, "invalid_token"),
        (TokenExpired(SECRETLY, expired_at=1.0), 401, "invalid_token"),
        (TokenNotYetValid(SECRETLY), 401, "invalid_token"),
        (WrongIssuer(SECRETLY), 401, "invalid_token"),
        (WrongAudience(SECRETLY), 401, "invalid_token"),
        (
            TokenRevoked(SECRETLY, lease_id="lease-0123456789abcdef", reason="x"),
            401,
            "invalid_token",
        ),
        (UnknownKey(SECRETLY), 401, "invalid_token"),
        (UnknownLease(SECRETLY, lease_id="lease-0123456789abcdef"), 401, "invalid_token"),
        (InsufficientScope(SECRETLY, missing=["orders:read"]), 403, "insufficient_scope"),
        (StoreUnavailable(SECRETLY), 503, "temporarily_unavailable"),
        (StoreError(SECRETLY), 503, "temporarily_unavailable"),
        (KeySourceError(SECRETLY), 503, "temporarily_unavailable"),
        (LeaseNotFound(SECRETLY), 500, "server_error"),
        (RuntimeError(SECRETLY), 500, "server_error"),
    ],
)
def test_the_status_table_and_nothing_internal_leaks(
    error: BaseException, status: int, code: str | None
) -> None:
    response = error_response(error, realm=AUDIENCE)
    assert response.status == status
    body = json.loads(response.body)
    assert body.get("error") == code
    text = response.body.decode() + repr(response.headers)
    for secret in SECRETLY.split():
        assert secret not in text


def test_the_dpop_rows() -> None:
    proof = error_response(InvalidProof("made for another URI"), realm=AUDIENCE, scheme="DPoP")
    assert proof.status == 401
    assert [v for k, v in proof.headers if k == "WWW-Authenticate"] == [
        BEARER,
        f'{DPOP}, error="invalid_dpop_proof", '
        'error_description="the DPoP proof is missing or invalid"',
    ]
    replayed = error_response(ProofReplayed("again"), realm=AUDIENCE, scheme="DPoP")
    assert b"already used" in replayed.body
    nonce = error_response(NonceRequired("x", nonce="n-1"), realm=AUDIENCE, scheme="DPoP")
    assert nonce.status == 401
    assert ("DPoP-Nonce", "n-1") in nonce.headers
    assert json.loads(nonce.body)["error"] == "use_dpop_nonce"
    as_bearer = error_response(InvalidProof("x"), realm=AUDIENCE, scheme="Bearer")
    assert json.loads(as_bearer.body)["error"] == "invalid_token"


def test_insufficient_scope_names_the_required_scopes() -> None:
    response = error_response(
        InsufficientScope("x", missing=["b"]), realm=AUDIENCE, dpop=False, scopes=["b", "a"]
    )
    assert response.headers[0] == (
        "WWW-Authenticate",
        bearer_error(
            "insufficient_scope",
            "the access token lacks a scope this resource requires",
            ', scope="a b"',
        ),
    )
    assert len([h for h in response.headers if h[0] == "WWW-Authenticate"]) == 1


def test_a_503_says_when_to_retry_and_never_challenges() -> None:
    response = error_response(StoreUnavailable("down"), realm=AUDIENCE, retry_after=7)
    assert ("Retry-After", "7") in response.headers
    assert all(k != "WWW-Authenticate" for k, _ in response.headers)


def test_without_a_realm_and_without_dpop() -> None:
    response = error_response(NoCredentials("x"), dpop=False)
    assert response.headers[0] == ("WWW-Authenticate", "Bearer")
    invalid = error_response(BadSignature("x"), dpop=False)
    assert invalid.headers[0][1].startswith('Bearer error="invalid_token"')


def test_the_advertised_algs_are_the_checkers() -> None:
    assert set(DPOP_ALGS) == set(_ALGS)


# -- parsing -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("values", "scheme", "token"),
    [
        (["Bearer abc"], "Bearer", "abc"),
        (["bearer abc"], "Bearer", "abc"),
        (["BEARER   abc== "], "Bearer", "abc=="),
        (["\tBearer a.b-c_d~e+f/g\t"], "Bearer", "a.b-c_d~e+f/g"),
        (["dpop abc"], "DPoP", "abc"),
    ],
)
def test_presented_credentials(values: list[str], scheme: str, token: str) -> None:
    seen = presented(values, [])
    assert (seen.scheme, seen.token) == (scheme, token)


@pytest.mark.parametrize(
    "values",
    [
        ["Bearer"],
        ["Bearer "],
        ["Bearer a b"],
        ["Bearer\ta"],
        ["Bearer a\x00"],
        ["Bearer é"],
        ["Bearer =abc"],
        ["Bearer " + "a" * 10_000],
        ["Bearer a", "Bearer a"],
        [""],
        ["\x00"],
    ],
)
def test_malformed_credentials(values: list[str]) -> None:
    with pytest.raises(MalformedRequest):
        presented(values, [])


def test_no_credentials_and_other_schemes() -> None:
    for values in ([], ["Basic abc"], ["Negotiate abc"]):
        with pytest.raises(NoCredentials):
            presented(values, [])
    with pytest.raises(NoCredentials):
        presented(["DPoP abc"], ["proof"], dpop=False)
    with pytest.raises(InvalidProof):
        presented(["DPoP abc"], ["p1", "p2"])
    assert presented(["DPoP abc"], []).proof is None
    assert presented(["Bearer abc"], ["ignored"]).proof is None


# -- proxies ----------------------------------------------------------------------
ORIGIN = Origin("http", "10.0.0.5:8000")
PROXIES = TrustedProxies(["10.0.0.0/8", "2001:db8::/32"])


def test_trusted_proxies_membership() -> None:
    assert "10.1.2.3" in PROXIES
    assert "10.1.2.3:4711" in PROXIES
    assert "[2001:db8::1]:4711" in PROXIES
    assert "2001:db8::1" in PROXIES
    for peer in ("192.168.1.1", "unknown", "_hidden", "", None, "/run/app.sock"):
        assert peer not in PROXIES
    assert not TrustedProxies()
    with pytest.raises(InvalidRequest):
        TrustedProxies(["not-an-ip"])


@pytest.mark.parametrize(
    ("forwarded", "x_proto", "x_host", "expected"),
    [
        ([], [], [], ORIGIN),
        ([], ["https"], ["api.example.com"], Origin("https", "api.example.com")),
        ([], ["http, https"], ["evil, api.example.com"], Origin("https", "api.example.com")),
        (
            ['for=1.2.3.4;proto=https;host="api.example.com"'],
            ["http"],
            [],
            ("https", "api.example.com"),
        ),
        (["For=1.2.3.4;Proto=HTTPS;Host=api.example.com"], [], [], ("https", "api.example.com")),
        (
            ["for=1.2.3.4;host=evil", "for=5.6.7.8;proto=https;host=api.example.com"],
            [],
            [],
            ("https", "api.example.com"),
        ),
        (
            ["for=5.6.7.8;proto=https;host=api.example.com, for=10.0.0.9;host=inner"],
            [],
            [],
            ("https", "api.example.com"),
        ),
        (
            ['for="[2001:db8::7]:1";proto=https;host=h, for=10.0.0.9;host=inner'],
            [],
            [],
            ("https", "h"),
        ),
        (["for=5.6.7.8"], [], [], ORIGIN),
        (['for=5.6.7.8;host="a,b;c"'], [], [], ("http", "a,b;c")),
    ],
)
def test_forwarded_origin(
    forwarded: list[str], x_proto: list[str], x_host: list[str], expected: tuple[str, str]
) -> None:
    assert forwarded_origin(ORIGIN, PROXIES, forwarded, x_proto, x_host) == expected


def test_a_huge_forwarded_header_builds_no_url() -> None:
    got = forwarded_origin(ORIGIN, PROXIES, ["for=1.2.3.4;host=h," * 1000], [], [])
    assert got.host == ""


def test_public_url_must_be_an_origin() -> None:
    assert parse_public_url("https://API.example.com/") == ("https", "api.example.com")
    assert parse_public_url(None) is None
    for bad in ("api.example.com", "ftp://x", "https://x/api", "https://u@x", "https://x?q"):
        with pytest.raises(InvalidRequest):
            parse_public_url(bad)


# -- nonces ---------------------------------------------------------------------
def test_nonces_rotate_and_the_previous_one_is_accepted() -> None:
    clock = FakeClock(1_000_000)
    nonces = DPoPNonces(secret=b"s" * 32, window=60, clock=clock)
    first = nonces.current()
    assert nonces.accepts(first)
    clock.advance(60)
    assert nonces.current() != first
    assert nonces.accepts(first)
    clock.advance(60)
    assert not nonces.accepts(first)
    for junk in (None, 1, "", "x" * 1000, "\ud800", first.upper()):
        assert not nonces.accepts(junk)
    shared = DPoPNonces(secret=b"s" * 32, window=60, clock=clock)
    assert shared.current() == nonces.current()  # one secret: one nonce in every process
    assert DPoPNonces(window=60, clock=clock).current() != nonces.current()
    assert "s" * 16 not in repr(nonces)
    with pytest.raises(InvalidRequest):
        DPoPNonces(secret=b"short")


# -- the gate's own checks and its audit trail ------------------------------------------
def view(authorization: list[str], **headers: list[str]) -> RequestView:
    values = {"authorization": authorization, **headers}
    return RequestView("GET", values, None, lambda _: Location("http", "/orders", "", None))


def decide(gate: Gate, request: RequestView) -> Any:
    from jitbroker._drive import run

    return run(gate.steps(request), gate.verifier.verify)


def test_each_refusal_is_audited_once() -> None:
    events: list[AuditEvent] = []
    setup = Setup(audit=[events.append])
    gate = Gate(setup.verifier, audience=AUDIENCE, scopes=[SCOPE])
    assert decide(gate, view([])).response.status == 401
    assert events == []  # nothing presented, nothing to audit
    assert decide(gate, view(["Bearer a b"])).response.status == 400
    assert decide(gate, view(["Bearer " + setup.token(scopes=("x",))])).response.status == 403
    setup.store.down = True
    try:
        assert decide(gate, view(["Bearer " + setup.token()])).response.status == 503
    finally:
        setup.store.down = False
    assert [e.error for e in events] == [
        "MalformedRequest",
        "InsufficientScope",
        "StoreUnavailable",
    ]
    assert events[0].reason == "the Bearer credentials are not one b64token"
    assert events[2].reason is None  # a store's message may name hosts; the log has it
    unbound = setup.token()
    assert decide(gate, view(["DPoP " + unbound], dpop=["x.y.z"])).response.status == 401
    assert events[-1].error == "InvalidToken"
    assert all(unbound not in repr(e.to_dict()) for e in events)


def test_gate_arguments_are_checked() -> None:
    setup = Setup()
    with pytest.raises(InvalidRequest, match="audience"):
        Gate(setup.verifier)
    with pytest.raises(InvalidRequest, match="realm"):
        Gate(setup.verifier, audience=AUDIENCE, realm='a"b')
    with pytest.raises(InvalidRequest):
        Gate(setup.verifier, audience=AUDIENCE, dpop_nonces="yes")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest):
        Gate(setup.verifier, audience=AUDIENCE, dpop=False, dpop_nonces=DPoPNonces())
    with pytest.raises(InvalidRequest):
        Gate(setup.verifier, audience=AUDIENCE, retry_after=0)
    gate = Gate(setup.verifier, audience=AUDIENCE, exempt=["/health", "/static/*"])
    assert gate.exempt("/health")
    assert gate.exempt("/static/")
    assert gate.exempt("/static/a.css")
    assert not gate.exempt("/health/x")
    assert not gate.exempt("/orders")
    assert gate.realm == AUDIENCE


def test_wsgi_bearer_needs_no_framework_app() -> None:
    setup = Setup()
    seen: list[Any] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.append(environ["jitbroker.claims"].subject)
        start_response("200 OK", [])
        return [b"ok"]

    wrapped = WSGIBearer(app, verifier=setup.verifier, audience=AUDIENCE)
    statuses: list[str] = []
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/",
        "HTTP_AUTHORIZATION": "Bearer " + setup.token(),
        "wsgi.url_scheme": "http",
    }
    assert wrapped(environ, lambda status, headers: statuses.append(status)) == [b"ok"]
    assert statuses == ["200 OK"]
    assert seen == ["svc:client"]
    del environ["HTTP_AUTHORIZATION"]
    wrapped(environ, lambda status, headers: statuses.append(status))
    assert statuses[-1] == "401 Unauthorized"


# -- the public surface and what importing costs ----------------------------------------------
def test_the_web_surface_is_sorted_and_loads() -> None:
    assert jitbroker.web.__all__ == sorted(jitbroker.web.__all__)
    for name in jitbroker.web.__all__:
        assert getattr(jitbroker.web, name) is not None
    with pytest.raises(AttributeError):
        jitbroker.web.Nope  # noqa: B018
    assert set(jitbroker.web.__all__) <= set(dir(jitbroker.web))


def imported_after(code: str) -> set[str]:
    probe = code + "\nimport sys; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_the_core_never_imports_web_or_its_dependencies() -> None:
    modules = imported_after("import jitbroker; jitbroker.Verifier; jitbroker.Broker")
    for heavy in ("jitbroker.web", "starlette", "httpx", "uvicorn", "fastapi", "flask"):
        assert heavy not in modules


def test_a_wsgi_user_does_not_import_starlette_or_httpx() -> None:
    modules = imported_after("from jitbroker.web import WSGIBearer, error_response, DPoPNonces")
    assert "jitbroker.web.wsgi" in modules
    for heavy in ("starlette", "httpx", "fastapi", "uvicorn"):
        assert heavy not in modules
    asgi = imported_after("from jitbroker.web import BearerAuth, require")
    assert "starlette" not in asgi
    assert "fastapi" not in asgi


def test_no_public_name_of_jitbroker_web_is_shadowed_by_a_submodule() -> None:
    # Importing a submodule sets it as an attribute of the package: a module
    # named like a public function (web/require.py) replaced the function.
    import importlib
    import pkgutil
    import types

    import jitbroker.web as web

    for info in pkgutil.iter_modules(web.__path__):
        importlib.import_module(f"jitbroker.web.{info.name}")
    for name in web.__all__:
        assert not isinstance(getattr(web, name), types.ModuleType), name
