"""broker_app under a real uvicorn, called by real httpx, callers proven by a real
OIDC issuer on loopback (tests/oidc_issuer.py): every endpoint, each RFC error
path, hostile forms, token exchange, DPoP, a store that is down, the audit trail."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from jitbroker import AsyncBroker, Broker, KeyRing, MemoryStore, Policy, Rule
from jitbroker.audit import AuditEvent
from jitbroker.errors import InvalidProof, InvalidRequest, PolicyDenied, StoreUnavailable
from jitbroker.jwk import b64url
from jitbroker.keys import Key, generate_key
from jitbroker.lease import Lease
from jitbroker.policy import caller as caller_is
from jitbroker.stores.sqlite import SQLiteStore
from jitbroker.testing import FakeClock
from jitbroker.tokens import json_text
from jitbroker.web import ClientKey, ClientSecret, DPoPNonces, TrustRule, hash_client_secret
from jitbroker.web.service import broker_app
from oidc_issuer import AUDIENCE, Issuer, oidc_issuer
from web_servers import sign_proof

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS = "urn:ietf:params:oauth:token-type:access_token"
JWT = "urn:ietf:params:oauth:token-type:jwt"
ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"
RS_ID, RS_SECRET = "orders-api", "s3cret-for-the-orders-api-0123"
BROKER_ISSUER = "urn:test:broker"


@contextmanager
def serving(build: Any) -> Iterator[str]:
    """Bind a free loopback port first (the app needs its own base URL), then
    serve ``build(base_url)`` on it with a real uvicorn."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    app = build(base)
    config = uvicorn.Config(app, log_level="warning", lifespan="off", proxy_headers=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        app.state.service.close()  # what the lifespan does: the Trust's key sources


class FlakyStore(MemoryStore):
    """A MemoryStore that can be taken down: then every call fails as a store's would."""

    down = False

    def add(self, lease: Lease, *args: Any, **kwargs: Any) -> bool:
        if self.down:
            raise StoreUnavailable("the store at db.internal:5432 is down (test)")
        return super().add(lease, *args, **kwargs)

    def get(self, lease_id: str) -> Lease | None:
        if self.down:
            raise StoreUnavailable("the store at db.internal:5432 is down (test)")
        return super().get(lease_id)


class Service:
    """A running service, its broker, the issuer its callers come from, and helpers."""

    def __init__(self, base: str, broker: Any, issuer: Issuer, clock: FakeClock) -> None:
        self.base = base
        self.broker = broker
        self.issuer = issuer
        self.clock = clock
        self.http = httpx.Client(base_url=base, timeout=10)
        self.events: list[AuditEvent] = []
        self.secrets: list[str] = [RS_SECRET]

    def assertion(self, **claims: Any) -> str:
        token = self.issuer.mint(**claims)
        self.secrets.append(token)
        return token

    def client_auth(self, **claims: Any) -> dict[str, str]:
        return {"client_assertion_type": JWT_BEARER, "client_assertion": self.assertion(**claims)}

    def token(self, *, headers: dict[str, str] | None = None, **form: Any) -> httpx.Response:
        form.setdefault("grant_type", "client_credentials")
        if "client_assertion" not in form:
            form.update(self.client_auth())
        response = self.http.post("/token", data=form, headers=headers)
        if response.status_code == 200:
            self.secrets.append(response.json()["access_token"])
        return response

    def issued(self, **form: Any) -> dict[str, Any]:
        form.setdefault("audience", "api:orders")
        form.setdefault("scope", "orders:read orders:write")
        response = self.token(**form)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def introspect(self, token: str, **extra: Any) -> httpx.Response:
        return self.http.post(
            "/introspect", data={"token": token, **extra}, auth=(RS_ID, RS_SECRET)
        )

    def audit_text(self) -> str:
        return "\n".join(json.dumps(e.to_dict(), default=str) for e in self.events)


def _rules(issuer: Issuer) -> list[Any]:
    return [
        TrustRule(
            issuer=issuer.url,
            audience=AUDIENCE,
            subject="svc:ci:{repository}",
            claims={"repository": "acme/*"},
            owner="{actor}",
            name="ci",
            allow_http=True,
            max_ttl=600,
        ),
        ClientSecret(RS_ID, hash_client_secret(RS_SECRET), "svc:orders-api"),
    ]


@contextmanager
def running(
    store: Any = None, *, policy: Policy | None = None, asynchronous: bool = False, **options: Any
) -> Iterator[Service]:
    clock = FakeClock(time.time())
    events: list[AuditEvent] = []
    with oidc_issuer(clock=clock) as issuer:
        kind = AsyncBroker if asynchronous else Broker
        broker = kind(
            issuer=BROKER_ISSUER,
            keys=KeyRing.generate("EdDSA"),
            store=store if store is not None else FlakyStore(),
            policy=policy,
            clock=clock,
            max_ttl=3600,
            audit=[events.append],
        )
        options.setdefault("resource_servers", [RS_ID])
        options.setdefault("allow_any_access", policy is None)

        def build(base: str) -> Any:
            return broker_app(broker, _rules(issuer), base_url=base, **options)

        with serving(build) as base:
            service = Service(base, broker, issuer, clock)
            service.events = events
            try:
                yield service
            finally:
                service.http.close()


@pytest.fixture
def svc() -> Iterator[Service]:
    with running() as service:
        yield service


def _error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    body: dict[str, Any] = response.json()
    assert set(body) == {"error", "error_description"}
    assert body["error"] == code
    return body


# -- metadata and keys -------------------------------------------------------------------
def test_metadata_is_rfc_8414(svc: Service) -> None:
    response = svc.http.get("/.well-known/oauth-authorization-server")
    assert response.status_code == 200
    meta = response.json()
    assert meta["issuer"] == svc.base
    for name, path in (
        ("token_endpoint", "/token"),
        ("revocation_endpoint", "/revoke"),
        ("introspection_endpoint", "/introspect"),
        ("jwks_uri", "/jwks.json"),
    ):
        assert meta[name] == svc.base + path
    assert meta["grant_types_supported"] == ["client_credentials", EXCHANGE]
    assert meta["token_endpoint_auth_methods_supported"] == [
        "private_key_jwt",
        "client_secret_basic",
        "client_secret_post",
    ]
    assert "EdDSA" in meta["token_endpoint_auth_signing_alg_values_supported"]
    assert meta["dpop_signing_alg_values_supported"] == ["EdDSA", "ES256", "RS256"]
    assert ACCESS in meta["issued_token_types_supported"]
    assert ID_TOKEN in meta["actor_token_types_supported"]


def test_jwks_is_the_brokers(svc: Service) -> None:
    response = svc.http.get("/jwks.json")
    assert response.status_code == 200
    assert response.json() == svc.broker.jwks()
    assert not any("d" in key for key in response.json()["keys"])  # public members only


@pytest.mark.parametrize("path", ["/token", "/revoke", "/introspect", "/renew"])
def test_get_on_a_post_endpoint_is_405(svc: Service, path: str) -> None:
    response = svc.http.get(path)
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"


def test_base_url_must_be_https_off_loopback() -> None:
    broker = Broker(issuer=BROKER_ISSUER, keys=KeyRing.generate("EdDSA"))
    with pytest.raises(ValueError, match="base_url must be an https URL"):
        broker_app(broker, [], base_url="http://broker.example", allow_any_access=True)
    with pytest.raises(ValueError, match="base_url must be an https URL"):
        broker_app(broker, [], base_url="https://broker.example/?a=b", allow_any_access=True)


# -- client credentials --------------------------------------------------------------
def test_client_credentials_issues_for_the_callers_own_subject(svc: Service) -> None:
    response = svc.token(audience="api:orders", scope="orders:read", ttl="120", task="job-1")
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["pragma"] == "no-cache"
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 120
    assert body["scope"] == "orders:read"
    assert body["issued_token_type"] == ACCESS
    claims = svc.broker.verify(body["access_token"], audience="api:orders", scopes="orders:read")
    assert claims.lease_id == body["lease_id"]
    assert claims.subject == "svc:ci:acme/app"
    assert claims.owner == "alice"
    assert claims.task == "job-1"


def test_subject_comes_from_the_caller_never_the_form(svc: Service) -> None:
    body = svc.issued(subject="svc:admin", owner="mallory", client_id="svc:admin")
    lease = svc.broker.lease(body["lease_id"])
    assert (lease.subject, lease.owner) == ("svc:ci:acme/app", "alice")


def test_ttl_is_capped_at_the_callers_max_ttl(svc: Service) -> None:
    body = svc.issued(ttl="5000")
    assert body["expires_in"] == 600  # the trust rule's max_ttl
    lease = svc.broker.lease(body["lease_id"])
    assert lease.max_expires_at - lease.issued_at == 600  # renewals too


def test_default_ttl_and_resource_indicator(svc: Service) -> None:
    body = svc.issued(audience=None, resource="https://orders.example/api")
    assert body["expires_in"] == 300
    lease = svc.broker.lease(body["lease_id"])
    assert lease.audience == "https://orders.example/api"


def test_renewable_false_and_purpose(svc: Service) -> None:
    body = svc.issued(renewable="false", purpose="nightly export")
    lease = svc.broker.lease(body["lease_id"])
    assert lease.renewable is False
    assert lease.purpose == "nightly export"


def test_the_policy_sees_the_caller() -> None:
    policy = Policy(
        [
            Rule(
                "svc:ci:*",
                "api:orders",
                ["orders:read"],
                conditions=[caller_is(rule="ci", repository="acme/app")],
            ),
        ]
    )
    with running(policy=policy) as svc:
        assert svc.token(audience="api:orders", scope="orders:read").status_code == 200
        denied = svc.token(
            audience="api:orders",
            scope="orders:read",
            client_assertion=svc.assertion(repository="acme/other"),
            client_assertion_type=JWT_BEARER,
        )
        _error(denied, 400, "invalid_scope")
        # a direct call (no caller) never matches the caller() condition
        with pytest.raises(PolicyDenied):
            svc.broker.issue("svc:ci:acme/app", "api:orders", ["orders:read"])


def test_renewal_over_http_and_caller_conditions() -> None:
    """/renew runs as the token's holder (rule "access_token"): a caller()
    condition does not match it, so a rule that judges callers says how
    renewals pass (they never widen: the lease's cap was set at issue)."""
    ci = caller_is(rule="ci")
    strict = Policy([Rule("svc:ci:*", "api:orders", ["orders:read"], conditions=[ci])])

    def ci_or_renewal(request: Any) -> bool:
        return request.action == "renew" or bool(ci(request))

    lenient = Policy([Rule("svc:ci:*", "api:orders", ["orders:read"], conditions=[ci_or_renewal])])
    for policy, renewed in ((strict, 400), (lenient, 200)):
        with running(policy=policy) as svc:
            body = svc.issued(scope="orders:read")
            auth = {"Authorization": "Bearer " + body["access_token"]}
            assert svc.http.post("/renew", headers=auth).status_code == renewed
            (event,) = [e for e in svc.events if "endpoint=/renew" in (e.where or "")]
            assert "caller_rule='access_token'" in (event.where or "")  # who renewed
            assert event.actor == "svc:ci:acme/app"


@pytest.mark.parametrize(
    ("form", "status", "code"),
    [
        ({"grant_type": None}, 400, "invalid_request"),
        ({"grant_type": "password"}, 400, "unsupported_grant_type"),
        ({"grant_type": "authorization_code"}, 400, "unsupported_grant_type"),
        ({"audience": None}, 400, "invalid_target"),
        ({"audience": ["a", "b"]}, 400, "invalid_target"),
        ({"resource": "not-absolute"}, 400, "invalid_target"),
        ({"resource": "https://x.example/#frag"}, 400, "invalid_target"),
        ({"scope": 'bad"scope'}, 400, "invalid_scope"),
        ({"ttl": "ten"}, 400, "invalid_request"),
        ({"ttl": "0"}, 400, "invalid_request"),
        ({"renewable": "yes"}, 400, "invalid_request"),
        ({"ttl": "\u0661\u0662"}, 400, "invalid_request"),  # digits, but not ASCII ones
        ({"ttl": "99999999999"}, 400, "invalid_request"),
        ({"task": "job\x00"}, 400, "invalid_request"),
        ({"purpose": "x" * 2000}, 400, "invalid_request"),
        ({"audience": "api\x00orders"}, 400, "invalid_target"),
    ],
)
def test_token_request_errors(svc: Service, form: dict[str, Any], status: int, code: str) -> None:
    data: dict[str, Any] = {"audience": "api:orders", "grant_type": "client_credentials"}
    data.update(svc.client_auth())
    data.update(form)
    data = {k: v for k, v in data.items() if v is not None}
    _error(svc.http.post("/token", data=data), status, code)
    assert not list(svc.broker.leases())


@pytest.mark.parametrize(
    "auth",
    [
        {},
        {"client_assertion_type": JWT_BEARER, "client_assertion": "abc.def.ghi"},
        {"client_assertion_type": "urn:other", "client_assertion": "abc.def.ghi"},
    ],
)
def test_invalid_client_is_401(svc: Service, auth: dict[str, str]) -> None:
    form = {"grant_type": "client_credentials", "audience": "api:orders", **auth}
    response = svc.http.post("/token", data=form)
    _error(response, 401, "invalid_client")
    assert "www-authenticate" not in response.headers  # Basic was not tried


def test_untrusted_claims_are_invalid_client(svc: Service) -> None:
    response = svc.token(
        audience="api:orders",
        client_assertion=svc.assertion(repository="evil/app"),
        client_assertion_type=JWT_BEARER,
    )
    _error(response, 401, "invalid_client")


def test_a_replayed_assertion_is_refused(svc: Service) -> None:
    auth: dict[str, Any] = svc.client_auth()
    assert svc.token(audience="api:orders", **auth).status_code == 200
    _error(svc.token(audience="api:orders", **auth), 401, "invalid_client")


def test_basic_auth_failure_carries_the_basic_challenge(svc: Service) -> None:
    form = {"grant_type": "client_credentials", "audience": "api:orders"}
    response = svc.http.post("/token", data=form, auth=(RS_ID, "wrong-secret-0123456789"))
    _error(response, 401, "invalid_client")
    assert response.headers["www-authenticate"].startswith("Basic realm=")


def test_basic_auth_client_gets_its_subject(svc: Service) -> None:
    form = {"grant_type": "client_credentials", "audience": "api:orders"}
    response = svc.http.post("/token", data=form, auth=(RS_ID, RS_SECRET))
    assert response.status_code == 200, response.text
    lease = svc.broker.lease(response.json()["lease_id"])
    assert lease.subject == "svc:orders-api"


# -- hostile forms ----------------------------------------------------------------------
def _raw_post(
    svc: Service,
    body: bytes,
    content_type: str = "application/x-www-form-urlencoded",
    path: str = "/token",
) -> httpx.Response:
    return svc.http.post(path, content=body, headers={"Content-Type": content_type})


def test_duplicate_parameters_are_invalid_request(svc: Service) -> None:
    auth = svc.client_auth()
    body = (
        "grant_type=client_credentials&audience=api:orders&scope=a&scope=b"
        f"&client_assertion_type={auth['client_assertion_type']}&client_assertion={auth['client_assertion']}"
    )
    error = _error(_raw_post(svc, body.encode()), 400, "invalid_request")
    assert "'scope' is included more than once" in error["error_description"]
    # an unknown name is never echoed
    error = _error(_raw_post(svc, b"x%3Cscript%3E=1&x%3Cscript%3E=2"), 400, "invalid_request")
    assert "script" not in error["error_description"]


def test_duplicate_client_assertion_is_refused(svc: Service) -> None:
    a, b = svc.assertion(), svc.assertion()
    body = f"grant_type=client_credentials&audience=x&client_assertion={a}&client_assertion={b}"
    _error(_raw_post(svc, body.encode()), 400, "invalid_request")


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "text/plain",
        "multipart/form-data; boundary=x",
        "application/x-www-form-urlencoded; charset=latin-1",
    ],
)
def test_wrong_content_type(svc: Service, content_type: str) -> None:
    _error(_raw_post(svc, b"grant_type=client_credentials", content_type), 400, "invalid_request")


def test_no_content_type(svc: Service) -> None:
    response = svc.http.post("/token", content=b"grant_type=client_credentials")
    _error(response, 400, "invalid_request")


def test_a_huge_body_is_413_before_parsing(svc: Service) -> None:
    body = b"grant_type=client_credentials&client_assertion=" + b"A" * 10_000_000
    response = _raw_post(svc, body)
    assert response.status_code == 413
    assert response.json()["error"] == "invalid_request"


def test_a_huge_chunked_body_is_413(svc: Service) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"grant_type=client_credentials&x="
        for _ in range(200):
            yield b"A" * 65536

    response = svc.http.post(
        "/token", content=chunks(), headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert response.status_code == 413


@pytest.mark.parametrize(
    "body",
    [
        b"\xff\xfe=1",
        b"grant_type=%FF",
        b"novalue",
        b"a=1&&b=2",
        b"&".join([b"f%d=1" % i for i in range(40)]),
    ],
)
def test_malformed_forms(svc: Service, body: bytes) -> None:
    _error(_raw_post(svc, body), 400, "invalid_request")


def test_parameters_in_the_query_string_are_refused(svc: Service) -> None:
    response = svc.http.post("/token?client_secret=x", data={"grant_type": "client_credentials"})
    _error(response, 400, "invalid_request")


def test_empty_values_are_omitted(svc: Service) -> None:
    body = svc.issued(task="", purpose="")
    lease = svc.broker.lease(body["lease_id"])
    assert lease.task is None
    assert lease.purpose is None


def test_unknown_parameters_are_ignored(svc: Service) -> None:
    assert svc.issued(frobnicate="1")["token_type"] == "Bearer"


# -- token exchange -----------------------------------------------------------------------
def _exchange(svc: Service, subject_token: str, **form: Any) -> httpx.Response:
    data = {
        "grant_type": EXCHANGE,
        "subject_token": subject_token,
        "subject_token_type": ACCESS,
        **svc.client_auth(),
    }
    data.update(form)
    return svc.http.post("/token", data={k: v for k, v in data.items() if v is not None})


def test_an_exchanged_token_stays_under_the_callers_ceiling(svc: Service) -> None:
    """The ci rule's max_ttl is 600 s: a child exchanged from a lease renewable
    for an hour (issued another way) is renewable only to 600 s from its exchange."""
    parent = svc.broker.issue("svc:ci:acme/app", "api:orders", ["orders:read"], ttl=3000)
    assert parent.lease.max_expires_at >= svc.clock() + 3000
    child = _exchange(svc, parent.token, scope="orders:read", ttl="60").json()
    svc.secrets.append(child["access_token"])
    lease = svc.broker.lease(child["lease_id"])
    assert lease.max_expires_at == pytest.approx(svc.clock() + 600, abs=1)
    svc.clock.advance(50)
    renewed = svc.http.post(
        "/renew", headers={"Authorization": "Bearer " + child["access_token"]}, data={"ttl": "3000"}
    )
    assert renewed.status_code == 200, renewed.text
    assert svc.broker.lease(child["lease_id"]).expires_at == lease.max_expires_at


def test_exchange_narrows(svc: Service) -> None:
    parent = svc.issued(ttl="300")
    response = _exchange(svc, parent["access_token"], scope="orders:read", ttl="60")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["scope"] == "orders:read"
    assert body["expires_in"] == 60
    assert body["issued_token_type"] == ACCESS
    child = svc.broker.lease(body["lease_id"])
    assert child.parent == parent["lease_id"]
    svc.broker.revoke(parent["lease_id"])  # dies with its parent
    assert not svc.broker.lease(body["lease_id"]).is_active(svc.clock())


def test_exchange_as_jwt(svc: Service) -> None:
    parent = svc.issued()
    response = _exchange(
        svc, parent["access_token"], requested_token_type=JWT, subject_token_type=JWT
    )
    assert response.status_code == 200, response.text
    assert response.json()["issued_token_type"] == JWT


def test_exchange_cannot_widen(svc: Service) -> None:
    parent = svc.issued(scope="orders:read")
    _error(
        _exchange(svc, parent["access_token"], scope="orders:read orders:admin"),
        400,
        "invalid_scope",
    )
    _error(_exchange(svc, parent["access_token"], audience="api:billing"), 400, "invalid_target")
    assert [lease.id for lease in svc.broker.leases()] == [parent["lease_id"]]


def test_exchange_ttl_never_outlives_the_parent(svc: Service) -> None:
    parent = svc.issued(ttl="100")
    body = _exchange(svc, parent["access_token"], ttl="500").json()
    assert body["expires_in"] <= 100


@pytest.mark.parametrize(
    "form",
    [
        {"subject_token": "not-a-token"},
        {"subject_token_type": None},
        {"subject_token_type": "urn:ietf:params:oauth:token-type:saml2"},
        {"requested_token_type": "urn:ietf:params:oauth:token-type:refresh_token"},
        {"actor_token_type": ACCESS},  # without an actor_token
        {"actor_token": "x.y.z", "actor_token_type": "urn:other"},
        {"actor_token": "x.y.z", "actor_token_type": ACCESS},
        {"actor_token": "x.y.z", "actor_token_type": ID_TOKEN},
    ],
)
def test_exchange_errors_are_invalid_request(svc: Service, form: dict[str, Any]) -> None:
    parent = svc.issued()
    subject_token = form.pop("subject_token", parent["access_token"])
    _error(_exchange(svc, subject_token, **form), 400, "invalid_request")


def test_exchange_of_a_revoked_token(svc: Service) -> None:
    parent = svc.issued()
    svc.broker.revoke(parent["lease_id"])
    _error(_exchange(svc, parent["access_token"]), 400, "invalid_request")


def test_only_the_holder_may_exchange(svc: Service) -> None:
    other = svc.issued(
        client_assertion=svc.assertion(repository="acme/other"), client_assertion_type=JWT_BEARER
    )
    _error(_exchange(svc, other["access_token"]), 400, "invalid_request")


def test_delegation_to_a_workload_identity_actor(svc: Service) -> None:
    parent = svc.issued()
    actor = svc.assertion(repository="acme/worker")
    response = _exchange(
        svc,
        parent["access_token"],
        actor_token=actor,
        actor_token_type=ID_TOKEN,
        scope="orders:read",
    )
    assert response.status_code == 200, response.text
    claims = svc.broker.verify(response.json()["access_token"], audience="api:orders")
    assert claims.subject == "svc:ci:acme/app"  # the principal
    assert claims.actor == "svc:ci:acme/worker"
    assert claims.delegated_by == (parent["lease_id"],)
    # the actor's identity token is spent: the holder cannot name it again
    again = _exchange(
        svc,
        parent["access_token"],
        actor_token=actor,
        actor_token_type=ID_TOKEN,
        scope="orders:read",
    )
    _error(again, 400, "invalid_request")


def test_a_holder_cannot_name_another_workload_by_its_access_token(svc: Service) -> None:
    """Another workload's access token reaches every resource server it was issued
    for: holding one proves nothing about its consent to act."""
    parent = svc.issued()
    worker = svc.issued(
        client_assertion=svc.assertion(repository="acme/worker"), client_assertion_type=JWT_BEARER
    )
    response = _exchange(
        svc, parent["access_token"], actor_token=worker["access_token"], actor_token_type=ACCESS
    )
    _error(response, 400, "invalid_request")
    assert "actor itself asks" in response.json()["error_description"]


def test_delegation_by_the_actor_itself(svc: Service) -> None:
    """The actor authenticates and presents a token handed to it plus its own token."""
    parent = svc.issued()
    worker_auth = {
        "client_assertion": svc.assertion(repository="acme/worker"),
        "client_assertion_type": JWT_BEARER,
    }
    worker = svc.issued(**worker_auth)
    response = _exchange(
        svc,
        parent["access_token"],
        actor_token=worker["access_token"],
        actor_token_type=ACCESS,
        client_assertion=svc.assertion(repository="acme/worker"),
    )
    assert response.status_code == 200, response.text
    intro = svc.introspect(response.json()["access_token"]).json()
    assert intro["sub"] == "svc:ci:acme/app"
    assert intro["client_id"] == "svc:ci:acme/worker"
    assert intro["act"]["sub"] == "svc:ci:acme/worker"


# -- DPoP -----------------------------------------------------------------------------------
def _proof(
    svc: Service, key: Key, path: str, token: str | None = None, method: str = "POST"
) -> str:
    return sign_proof(key, method, svc.base + path, token, now=svc.clock())


def test_dpop_bound_issue_and_use(svc: Service) -> None:
    holder = generate_key("ES256")
    body = svc.issued(headers={"DPoP": _proof(svc, holder, "/token")})
    assert body["token_type"] == "DPoP"
    token = body["access_token"]
    lease = svc.broker.lease(body["lease_id"])
    assert lease.holder == holder.kid
    with pytest.raises(InvalidProof):
        svc.broker.verify(token, audience="api:orders")
    url = "https://api.example/orders"
    svc.broker.verify(
        token,
        audience="api:orders",
        proof=sign_proof(holder, "GET", url, token, now=svc.clock()),
        method="GET",
        url=url,
    )
    intro = svc.introspect(token).json()
    assert intro["token_type"] == "DPoP"
    assert intro["cnf"] == {"jkt": holder.kid}
    # renew: the DPoP scheme with a proof for /renew
    svc.clock.advance(30)
    renewed = svc.http.post(
        "/renew",
        headers={"Authorization": "DPoP " + token, "DPoP": _proof(svc, holder, "/renew", token)},
    )
    assert renewed.status_code == 200, renewed.text
    assert renewed.json()["token_type"] == "DPoP"
    assert renewed.json()["lease_id"] == body["lease_id"]
    # the bound token as a bearer token is refused
    as_bearer = svc.http.post("/renew", headers={"Authorization": "Bearer " + token})
    assert as_bearer.status_code == 401


@pytest.mark.parametrize(
    "problem", ["wrong-url", "wrong-method", "with-ath", "two-proofs", "garbage", "replayed"]
)
def test_bad_dpop_proofs_at_the_token_endpoint(svc: Service, problem: str) -> None:
    holder = generate_key("EdDSA")
    makers: dict[str, Callable[[], str]] = {
        "wrong-url": lambda: _proof(svc, holder, "/elsewhere"),
        "wrong-method": lambda: _proof(svc, holder, "/token", method="GET"),
        "with-ath": lambda: _proof(svc, holder, "/token", token="abc"),
        "two-proofs": lambda: _proof(svc, holder, "/token"),
        "garbage": lambda: "a.b.c",
        "replayed": lambda: _proof(svc, holder, "/token"),
    }
    proof = makers[problem]()
    headers: Any = [("DPoP", proof)]
    if problem == "two-proofs":
        headers.append(("DPoP", _proof(svc, holder, "/token")))
    if problem == "replayed":
        assert svc.token(audience="api:orders", headers={"DPoP": proof}).status_code == 200
    form = {"grant_type": "client_credentials", "audience": "api:orders", **svc.client_auth()}
    response = svc.http.post("/token", data=form, headers=headers)
    _error(response, 400, "invalid_dpop_proof")


def test_exchange_of_a_bound_token_needs_its_key(svc: Service) -> None:
    holder = generate_key("EdDSA")
    parent = svc.issued(headers={"DPoP": _proof(svc, holder, "/token")})
    _error(_exchange(svc, parent["access_token"]), 400, "invalid_request")
    data = {
        "grant_type": EXCHANGE,
        "subject_token": parent["access_token"],
        "subject_token_type": ACCESS,
        "scope": "orders:read",
        **svc.client_auth(),
    }
    response = svc.http.post("/token", data=data, headers={"DPoP": _proof(svc, holder, "/token")})
    assert response.status_code == 200, response.text
    assert response.json()["token_type"] == "DPoP"
    other = generate_key("EdDSA")
    data.update(svc.client_auth())
    response = svc.http.post("/token", data=data, headers={"DPoP": _proof(svc, other, "/token")})
    _error(response, 400, "invalid_request")


def test_exchange_of_a_bearer_token_with_a_proof_binds_the_child(svc: Service) -> None:
    parent = svc.issued()
    holder = generate_key("ES256")
    data = {
        "grant_type": EXCHANGE,
        "subject_token": parent["access_token"],
        "subject_token_type": ACCESS,
        "scope": "orders:read",
        **svc.client_auth(),
    }
    response = svc.http.post("/token", data=data, headers={"DPoP": _proof(svc, holder, "/token")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token_type"] == "DPoP"
    child = svc.broker.lease(body["lease_id"])
    assert child.holder == holder.kid
    assert child.parent == parent["lease_id"]
    assert svc.broker.lease(parent["lease_id"]).holder is None
    with pytest.raises(InvalidProof):  # useless without the key
        svc.broker.verify(body["access_token"], audience="api:orders")
    assert svc.introspect(body["access_token"]).json()["cnf"] == {"jkt": holder.kid}


def test_dpop_nonces_at_the_token_and_renew_endpoints() -> None:
    """RFC 9449 section 8: a proof without the server's current nonce is answered
    with use_dpop_nonce and the nonce to use; every DPoP answer hands out the next."""
    nonces = DPoPNonces(window=300)
    with running(dpop_nonces=nonces) as svc:
        holder = generate_key("EdDSA")
        form = {"grant_type": "client_credentials", "audience": "api:orders"}

        def ask(nonce: str | None) -> httpx.Response:
            proof = sign_proof(
                holder, "POST", svc.base + "/token", None, now=svc.clock(), nonce=nonce
            )
            return svc.http.post(
                "/token", data={**form, **svc.client_auth()}, headers={"DPoP": proof}
            )

        for nonce in (None, "not-the-servers-nonce", nonces.current() + "x"):
            refused = ask(nonce)
            _error(refused, 400, "use_dpop_nonce")
            assert refused.headers["dpop-nonce"] == nonces.current()
        # the retry RFC 9449 section 8 describes: the same (single-use) assertion, a new proof
        assertion = svc.client_auth()
        first = svc.http.post(
            "/token",
            data={**form, **assertion},
            headers={
                "DPoP": sign_proof(holder, "POST", svc.base + "/token", None, now=svc.clock())
            },
        )
        _error(first, 400, "use_dpop_nonce")
        proof = sign_proof(
            holder,
            "POST",
            svc.base + "/token",
            None,
            now=svc.clock(),
            nonce=first.headers["dpop-nonce"],
        )
        again = svc.http.post("/token", data={**form, **assertion}, headers={"DPoP": proof})
        assert again.status_code == 200, again.text
        answer = ask(refused.headers["dpop-nonce"])
        assert answer.status_code == 200, answer.text
        assert answer.json()["token_type"] == "DPoP"
        assert answer.headers["dpop-nonce"] == nonces.current()
        # a bearer request needs no nonce and is handed none
        plain = svc.token(audience="api:orders")
        assert plain.status_code == 200
        assert "dpop-nonce" not in plain.headers
        token = answer.json()["access_token"]

        def renew(nonce: str | None) -> httpx.Response:
            proof = sign_proof(
                holder, "POST", svc.base + "/renew", token, now=svc.clock(), nonce=nonce
            )
            return svc.http.post(
                "/renew", headers={"Authorization": "DPoP " + token, "DPoP": proof}
            )

        refused = renew(None)
        assert refused.status_code == 401
        assert 'error="use_dpop_nonce"' in refused.headers["www-authenticate"]
        assert refused.headers["dpop-nonce"] == nonces.current()
        renewed = renew(nonces.current())
        assert renewed.status_code == 200, renewed.text
        assert renewed.headers["dpop-nonce"] == nonces.current()


def test_base_url_defaults_to_an_https_issuer() -> None:
    secret = ClientSecret(RS_ID, hash_client_secret(RS_SECRET), "svc:orders-api")
    app = broker_app(
        Broker(issuer="https://jitbroker.example/"), trust=[secret], allow_any_access=True
    )
    assert app.state.service.base_url == "https://jitbroker.example"
    assert app.state.service.token_url == "https://jitbroker.example/token"
    with pytest.raises(InvalidRequest, match="base_url is required"):
        broker_app(Broker(issuer=BROKER_ISSUER), trust=[secret], allow_any_access=True)


def test_a_broker_without_a_policy_is_served_only_when_asked() -> None:
    secret = ClientSecret(RS_ID, hash_client_secret(RS_SECRET), "svc:orders-api")
    with pytest.raises(InvalidRequest, match="the broker has no policy"):
        broker_app(Broker(issuer="https://jitbroker.example"), trust=[secret])
    policy = Policy([Rule(subjects=["svc:*"], audiences=["api:*"])])
    app = broker_app(Broker(issuer="https://jitbroker.example", policy=policy), trust=[secret])
    assert app.state.service.base_url == "https://jitbroker.example"


def test_a_broker_that_never_waits_is_called_on_the_event_loop(tmp_path: Path) -> None:
    secret = ClientSecret(RS_ID, hash_client_secret(RS_SECRET), "svc:orders-api")

    def inline(**kwargs: Any) -> bool:
        broker = Broker(issuer="https://jitbroker.example", **kwargs)
        app = broker_app(broker, trust=[secret], allow_any_access=True)
        result: bool = app.state.service.calls.inline
        return result

    assert inline() is True  # a MemoryStore, no hooks: no thread hop
    assert inline(store=SQLiteStore(str(tmp_path / "l.db"))) is False
    assert inline(on_issue=[lambda lease: None]) is False  # a hook may do anything


def test_dpop_nonces_need_dpop() -> None:
    with pytest.raises(InvalidRequest, match="dpop_nonces needs dpop=True"):
        broker_app(
            Broker(issuer=BROKER_ISSUER),
            [],
            base_url="http://127.0.0.1:1",
            dpop=False,
            dpop_nonces=DPoPNonces(),
            allow_any_access=True,
        )


def test_a_key_bound_actor_token_is_refused(svc: Service) -> None:
    parent = svc.issued()
    worker_auth = {
        "client_assertion": svc.assertion(repository="acme/worker"),
        "client_assertion_type": JWT_BEARER,
    }
    bound = svc.issued(
        headers={"DPoP": _proof(svc, generate_key("EdDSA"), "/token")}, **worker_auth
    )
    response = _exchange(
        svc, parent["access_token"], actor_token=bound["access_token"], actor_token_type=ACCESS
    )
    _error(response, 400, "invalid_request")


# -- renew ------------------------------------------------------------------------------
def test_renew_keeps_the_lease_and_caps(svc: Service) -> None:
    body = svc.issued(ttl="100")
    svc.clock.advance(50)
    response = svc.http.post(
        "/renew", headers={"Authorization": "Bearer " + body["access_token"]}, data={"ttl": "100"}
    )
    assert response.status_code == 200, response.text
    renewed = response.json()
    assert renewed["lease_id"] == body["lease_id"]
    assert renewed["access_token"] != body["access_token"]
    assert renewed["expires_in"] == 100
    assert response.headers["cache-control"] == "no-store"
    svc.clock.advance(90)  # asking past the rule's max_ttl of 600: capped
    response = svc.http.post(
        "/renew",
        headers={"Authorization": "Bearer " + renewed["access_token"]},
        data={"ttl": "600"},
    )
    assert response.status_code == 200, response.text
    lease = svc.broker.lease(body["lease_id"])
    assert lease.expires_at == lease.max_expires_at


def test_renew_errors(svc: Service) -> None:
    response = svc.http.post("/renew")
    assert response.status_code == 401
    assert response.headers.get_list("www-authenticate") == [
        f'Bearer realm="{svc.base}"',
        f'DPoP realm="{svc.base}", algs="EdDSA ES256 RS256"',
    ]
    response = svc.http.post("/renew", headers={"Authorization": "Bearer abc.def.ghi"})
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_token"
    fixed = svc.issued(renewable="false")
    response = svc.http.post("/renew", headers={"Authorization": "Bearer " + fixed["access_token"]})
    _error(response, 400, "invalid_grant")
    revoked = svc.issued()
    svc.broker.revoke(revoked["lease_id"])
    response = svc.http.post(
        "/renew", headers={"Authorization": "Bearer " + revoked["access_token"]}
    )
    assert response.status_code == 401


# -- revoke -----------------------------------------------------------------------------
def test_revoke_what_the_caller_holds(svc: Service) -> None:
    body = svc.issued()
    response = svc.http.post(
        "/revoke",
        data={
            "token": body["access_token"],
            "token_type_hint": "access_token",
            **svc.client_auth(),
        },
    )
    assert response.status_code == 200
    lease = svc.broker.lease(body["lease_id"])
    assert lease.revoked_at is not None
    # again, and unknown or garbage tokens: still 200 (RFC 7009 section 2.2)
    for token in (body["access_token"], "garbage", "a.b.c", "jbo_" + "0" * 64):
        response = svc.http.post(
            "/revoke",
            data={"token": token, "token_type_hint": "refresh_token", **svc.client_auth()},
        )
        assert response.status_code == 200, token


def test_revoke_needs_client_authentication(svc: Service) -> None:
    body = svc.issued()
    _error(svc.http.post("/revoke", data={"token": body["access_token"]}), 401, "invalid_client")
    assert svc.broker.lease(body["lease_id"]).revoked_at is None


def test_revoke_someone_elses_token_is_refused(svc: Service) -> None:
    body = svc.issued()
    other = {
        "client_assertion": svc.assertion(repository="acme/other", actor="bob"),
        "client_assertion_type": JWT_BEARER,
    }
    _error(
        svc.http.post("/revoke", data={"token": body["access_token"], **other}),
        400,
        "unauthorized_client",
    )
    assert svc.broker.lease(body["lease_id"]).revoked_at is None


def test_revoke_by_owner_is_for_offboarders_only(svc: Service) -> None:
    """Two workflows alice ran share the owner "alice": neither may revoke the
    other's leases, one by one or by owner."""
    a = svc.issued()
    b = svc.issued(
        client_assertion=svc.assertion(repository="acme/two"), client_assertion_type=JWT_BEARER
    )
    response = svc.http.post("/revoke", data={"owner": "alice", **svc.client_auth()})
    _error(response, 400, "unauthorized_client")
    other = svc.http.post("/revoke", data={"token": b["access_token"], **svc.client_auth()})
    _error(other, 400, "unauthorized_client")
    assert all(svc.broker.lease(x["lease_id"]).revoked_at is None for x in (a, b))
    _error(svc.http.post("/revoke", data={**svc.client_auth()}), 400, "invalid_request")
    both = {"owner": "alice", "token": a["access_token"], **svc.client_auth()}
    _error(svc.http.post("/revoke", data=both), 400, "invalid_request")


def test_revoke_by_the_token_itself(svc: Service) -> None:
    """The holder revokes with the token as its credential: no identity token spent."""
    body, other = svc.issued(), svc.issued()
    token = body["access_token"]
    mismatch = svc.http.post(
        "/revoke",
        data={"token": other["access_token"]},
        headers={"Authorization": "Bearer " + token},
    )
    _error(mismatch, 400, "invalid_request")
    done = svc.http.post(
        "/revoke", data={"token": token}, headers={"Authorization": "Bearer " + token}
    )
    assert done.status_code == 200
    assert svc.broker.lease(body["lease_id"]).revoked_at is not None
    assert svc.broker.lease(other["lease_id"]).revoked_at is None
    again = svc.http.post(
        "/revoke", data={"token": token}, headers={"Authorization": "Bearer " + token}
    )
    assert again.status_code == 200  # nothing left to revoke (RFC 7009 2.2)
    # a key-bound token needs its key to be revoked, as to be used
    holder = generate_key("EdDSA")
    bound = svc.issued(headers={"DPoP": _proof(svc, holder, "/token")})["access_token"]
    as_bearer = svc.http.post(
        "/revoke", data={"token": bound}, headers={"Authorization": "Bearer " + bound}
    )
    assert as_bearer.status_code == 401
    proof = _proof(svc, holder, "/revoke", bound)
    with_key = svc.http.post(
        "/revoke", data={"token": bound}, headers={"Authorization": "DPoP " + bound, "DPoP": proof}
    )
    assert with_key.status_code == 200
    assert not any(lease.holder == holder.kid for lease in svc.broker.leases())


def test_offboarders_may_revoke_any_owner() -> None:
    with running(offboarders=[RS_ID]) as svc:
        svc.issued()
        response = svc.http.post("/revoke", data={"owner": "alice"}, auth=(RS_ID, RS_SECRET))
        assert response.json() == {"revoked": 1}


# -- introspect ----------------------------------------------------------------------------
def test_introspect_active(svc: Service) -> None:
    body = svc.issued(task="job-7")
    response = svc.introspect(body["access_token"])
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    intro = response.json()
    lease = svc.broker.lease(body["lease_id"])
    assert intro == {
        "active": True,
        "scope": "orders:read orders:write",
        "client_id": "svc:ci:acme/app",
        "sub": "svc:ci:acme/app",
        "aud": "api:orders",
        "iss": BROKER_ISSUER,
        "exp": int(lease.expires_at),
        "iat": int(lease.issued_at),
        "nbf": int(lease.issued_at),
        "jti": body["lease_id"],
        "token_type": "Bearer",
        "owner": "alice",
        "task": "job-7",
    }


def test_introspect_inactive_says_nothing_else(svc: Service) -> None:
    body = svc.issued(ttl="60")
    revoked = svc.issued()
    svc.broker.revoke(revoked["lease_id"])
    other_broker = Broker(issuer=BROKER_ISSUER, keys=KeyRing.generate("EdDSA"))
    forged = other_broker.issue("svc:ci:acme/app", "api:orders", ["orders:read"]).token
    for token in (revoked["access_token"], forged, "garbage", "a.b.c", "jbo_" + "1" * 64):
        response = svc.introspect(token)
        assert response.status_code == 200
        assert response.json() == {"active": False}, token
    svc.clock.advance(120)
    assert svc.introspect(body["access_token"]).json() == {"active": False}


def test_introspect_only_for_resource_servers(svc: Service) -> None:
    body = svc.issued()
    response = svc.http.post(
        "/introspect", data={"token": body["access_token"], **svc.client_auth()}
    )
    _error(response, 403, "unauthorized_client")
    _error(
        svc.http.post("/introspect", data={"token": body["access_token"]}), 401, "invalid_client"
    )
    _error(svc.http.post("/introspect", data={}, auth=(RS_ID, RS_SECRET)), 400, "invalid_request")


# -- the store is down ---------------------------------------------------------------------
def test_store_down_is_503_and_no_token(svc: Service) -> None:
    store = svc.broker.store
    assert isinstance(store, FlakyStore)
    store.down = True
    response = svc.token(audience="api:orders", scope="orders:read")
    body = _error(response, 503, "temporarily_unavailable")
    assert response.headers["retry-after"] == "5"
    assert "db.internal" not in json.dumps(body)
    store.down = False
    assert not list(svc.broker.leases())
    token = svc.issued()["access_token"]
    store.down = True
    _error(svc.introspect(token), 503, "temporarily_unavailable")
    _error(
        svc.http.post("/revoke", data={"token": token, **svc.client_auth()}),
        503,
        "temporarily_unavailable",
    )
    renew = svc.http.post("/renew", headers={"Authorization": "Bearer " + token})
    assert renew.status_code == 503
    store.down = False


def test_an_issuer_down_at_start_is_503_for_its_callers_only() -> None:
    clock = FakeClock(time.time())
    with oidc_issuer(clock=clock) as issuer:
        issuer.discovery_issuer = "https://impostor.example"  # its discovery is broken
        broker = Broker(issuer=BROKER_ISSUER, clock=clock, max_ttl=3600)

        def build(base: str) -> Any:
            return broker_app(
                broker,
                _rules(issuer),
                base_url=base,
                resource_servers=[RS_ID],
                allow_any_access=True,
            )

        with serving(build) as base, httpx.Client(base_url=base, timeout=10) as http:
            form = {"grant_type": "client_credentials", "audience": "api:orders"}
            assertion = {"client_assertion_type": JWT_BEARER, "client_assertion": issuer.mint()}
            response = http.post("/token", data={**form, **assertion})
            _error(response, 503, "temporarily_unavailable")
            assert response.headers["retry-after"] == "5"
            assert not list(broker.leases())
            by_secret = http.post("/token", data=form, auth=(RS_ID, RS_SECRET))  # another rule
            assert by_secret.status_code == 200, by_secret.text
            issuer.discovery_issuer = None  # back; retried at most every 10 s
            clock.advance(10)
            assertion["client_assertion"] = issuer.mint()
            response = http.post("/token", data={**form, **assertion})
            assert response.status_code == 200, response.text


# -- audit ----------------------------------------------------------------------------
def test_every_decision_is_audited_with_the_caller_and_no_secret(svc: Service) -> None:
    body = svc.issued()
    child = _exchange(svc, body["access_token"], scope="orders:read").json()
    svc.introspect(child["access_token"])
    svc.http.post("/revoke", data={"token": child["access_token"], **svc.client_auth()})
    svc.token(
        audience="api:orders", client_assertion="abc.def.ghi", client_assertion_type=JWT_BEARER
    )
    svc.http.post("/renew", headers={"Authorization": "Bearer " + body["access_token"]})
    svc.http.post(
        "/token",
        data={"grant_type": "client_credentials", "audience": "api:orders"},
        auth=(RS_ID, "wrong-secret-0123456789"),
    )
    endpoint = [e for e in svc.events if e.action == "token_endpoint"]
    where = [e.where or "" for e in endpoint]
    decisions = [w.split()[1] for w in where]
    assert decisions == [
        "decision=issued",
        "decision=exchanged",
        "decision=introspected",
        "decision=revoked",
        "decision=denied",
        "decision=renewed",
        "decision=denied",
    ]
    assert "caller_rule='ci'" in where[0]
    assert "caller_method=jwt-bearer" in where[0]
    assert f"caller_issuer={svc.issuer.url!r}" in where[0]
    assert "caller_subject='repo:acme/app:ref:refs/heads/main'" in where[0]
    assert endpoint[0].actor == "svc:ci:acme/app"
    assert endpoint[0].lease is not None
    assert endpoint[0].lease.id == body["lease_id"]
    assert endpoint[4].error == "invalid_client"
    assert endpoint[6].error == "invalid_client"
    text = svc.audit_text()
    for secret in [
        *svc.secrets,
        body["access_token"],
        child["access_token"],
        "wrong-secret-0123456789",
    ]:
        assert secret not in text
    # the lease events of the broker are there too
    assert {"issued", "attenuated", "revoked", "renewed"} <= {str(e.action) for e in svc.events}


def test_no_secret_in_any_response_or_repr(svc: Service) -> None:
    body = svc.issued()
    app_service = repr(svc.http)  # the client, for symmetry: nothing to leak
    assert body["access_token"] not in app_service
    error = svc.token(
        audience="api:orders",
        client_assertion=svc.assertion(aud="other"),
        client_assertion_type=JWT_BEARER,
    )
    assert svc.secrets[-1] not in error.text


# -- other brokers and stores ---------------------------------------------------------------
def test_async_broker() -> None:
    with running(MemoryStore(), asynchronous=True) as svc:
        body = svc.issued()
        assert svc.introspect(body["access_token"]).json()["active"] is True
        child = _exchange(svc, body["access_token"], scope="orders:read")
        assert child.status_code == 200, child.text
        renewed = svc.http.post(
            "/renew", headers={"Authorization": "Bearer " + body["access_token"]}
        )
        assert renewed.status_code == 200, renewed.text


def test_sqlite_store(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "leases.db")
    with running(store) as svc:
        body = svc.issued()
        assert svc.introspect(body["access_token"]).json()["active"] is True
        response = svc.http.post(
            "/revoke", data={"token": body["access_token"], **svc.client_auth()}
        )
        assert response.status_code == 200
        assert svc.introspect(body["access_token"]).json() == {"active": False}
    reopened = SQLiteStore(tmp_path / "leases.db")
    lease = reopened.get(body["lease_id"])
    assert lease is not None
    assert lease.revoked_at is not None
    reopened.close()
    store.close()


def test_opaque_tokens() -> None:
    clock = FakeClock(time.time())
    with oidc_issuer(clock=clock) as issuer:
        broker = Broker(
            issuer=BROKER_ISSUER, keys=KeyRing.generate("EdDSA"), clock=clock, token_format="opaque"
        )
        with serving(
            lambda base: broker_app(
                broker,
                _rules(issuer),
                base_url=base,
                resource_servers=[RS_ID],
                allow_any_access=True,
            )
        ) as base:
            svc = Service(base, broker, issuer, clock)
            body = svc.issued()
            assert body["access_token"].startswith("jbo_")
            assert svc.introspect(body["access_token"]).json()["jti"] == body["lease_id"]
            child = _exchange(svc, body["access_token"], scope="orders:read")
            assert child.status_code == 200, child.text
            _error(
                _exchange(svc, body["access_token"], requested_token_type=JWT),
                400,
                "invalid_request",
            )
            svc.http.post("/revoke", data={"token": body["access_token"], **svc.client_auth()})
            assert svc.introspect(body["access_token"]).json() == {"active": False}
            svc.http.close()


def test_basic_credentials_are_form_encoded_per_rfc_6749(svc: Service) -> None:
    # RFC 6749 2.3.1: the id and secret are form-urlencoded before base64
    raw = base64.b64encode(f"{RS_ID}:{RS_SECRET}".encode()).decode()
    form = {"grant_type": "client_credentials", "audience": "api:orders"}
    response = svc.http.post("/token", data=form, headers={"Authorization": "Basic " + raw})
    assert response.status_code == 200, response.text


def test_no_redirect_for_a_trailing_slash(svc: Service) -> None:
    response = svc.http.post("/token/", data={"grant_type": "client_credentials"})
    assert response.status_code == 404


def test_a_proof_is_not_spent_by_a_request_that_fails_authentication(svc: Service) -> None:
    holder = generate_key("EdDSA")
    proof = _proof(svc, holder, "/token")
    form = {
        "grant_type": "client_credentials",
        "audience": "api:orders",
        "client_assertion_type": JWT_BEARER,
        "client_assertion": "abc.def.ghi",
    }
    _error(svc.http.post("/token", data=form, headers={"DPoP": proof}), 401, "invalid_client")
    body = svc.issued(headers={"DPoP": proof})
    assert body["token_type"] == "DPoP"


def test_private_key_jwt_client() -> None:
    key = generate_key("ES256")
    clock = FakeClock(time.time())
    broker = Broker(issuer=BROKER_ISSUER, keys=KeyRing.generate("EdDSA"), clock=clock)
    client = ClientKey("orders-api", KeyRing([key]).public().jwks(), "svc:orders-api")

    def build(base: str) -> Any:
        return broker_app(broker, [client], base_url=base, allow_any_access=True)

    with serving(build) as base, httpx.Client(base_url=base) as http:
        now = int(clock())
        claims = {
            "iss": "orders-api",
            "sub": "orders-api",
            "aud": base + "/token",
            "jti": "one-use-only",
            "iat": now,
            "exp": now + 60,
        }
        header = {"alg": "ES256", "typ": "JWT", "kid": key.kid}
        signing_input = (
            b64url(json_text(header).encode()) + "." + b64url(json_text(claims).encode())
        )
        assertion = signing_input + "." + b64url(key.sign(signing_input.encode("ascii")))
        form = {
            "grant_type": "client_credentials",
            "audience": "api:orders",
            "client_assertion_type": JWT_BEARER,
            "client_assertion": assertion,
        }
        response = http.post("/token", data=form)
        assert response.status_code == 200, response.text
        lease = broker.lease(response.json()["lease_id"])
        assert (lease.subject, lease.owner) == ("svc:orders-api", "svc:orders-api")
        _error(http.post("/token", data=form), 401, "invalid_client")  # replayed
        meta = http.get("/.well-known/oauth-authorization-server").json()
        assert meta["token_endpoint_auth_methods_supported"] == ["private_key_jwt"]
