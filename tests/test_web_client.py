"""BrokerAuth over real TCP: a uvicorn server on 127.0.0.1, real httpx and requests clients.

The server is a tiny Starlette app that verifies every token with the broker's own
``verify`` (method and URL included, for DPoP proofs); it can demand a DPoP nonce
once, or a new one on every request. Time comes from a ``FakeClock`` shared by the
broker, the client and so the server's checks: renewal is forced by moving it,
never by sleeping. Renewals are counted in the broker's audit trail.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import attrs
import httpx
import pytest
import requests
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from jitbroker import AsyncBroker, Broker, Claims, MemoryStore
from jitbroker.audit import AuditEvent, EventType
from jitbroker.errors import InvalidToken
from jitbroker.keys import Key, generate_key
from jitbroker.lease import Lease
from jitbroker.testing import TEST_ISSUER, FakeClock
from jitbroker.web.client import BrokerAuth

AUDIENCE = "api:orders"
SUBJECT = "svc:client"
SCOPES = ["orders:read"]
TTL = 60
CONCURRENCY = 50


# -- the service -------------------------------------------------------------------
@attrs.define
class Hit:
    """One request as the server saw it."""

    ok: bool
    scheme: str
    expires_at: int | None = None
    lease_id: str | None = None
    nonce: str | None = None


@attrs.define
class Service:
    """What the test app does; reset for every test."""

    verify: Callable[..., Claims] | None = None
    nonce: str | None = None  # a proof must carry this nonce
    rotate: bool = False  # demand a new nonce on every request
    hits: list[Hit] = attrs.Factory(list)
    served: Callable[[Hit], None] | None = None
    lock: threading.Lock = attrs.Factory(threading.Lock)

    def record(self, hit: Hit) -> None:
        with self.lock:
            self.hits.append(hit)
        if self.served is not None:
            self.served(hit)

    def handle(self, method: str, url: str, headers: Any) -> Response:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        proof = headers.get("dpop")
        if self.nonce is not None and proof is not None:
            sent = proof_claims(proof).get("nonce")
            if self.rotate or sent != self.nonce:
                if self.rotate:
                    self.nonce = secrets.token_urlsafe(12)
                self.record(Hit(ok=False, scheme=scheme, nonce=sent))
                return Response(
                    status_code=401,
                    headers={
                        "WWW-Authenticate": 'DPoP error="use_dpop_nonce", algs="ES256 EdDSA"',
                        "DPoP-Nonce": self.nonce,
                    },
                )
        assert self.verify is not None
        try:
            claims = self.verify(
                token, audience=AUDIENCE, scopes=SCOPES, proof=proof, method=method, url=url
            )
            if scheme != ("DPoP" if claims.holder else "Bearer"):
                raise InvalidToken("wrong scheme")
        except InvalidToken:
            self.record(Hit(ok=False, scheme=scheme))
            return Response(
                status_code=401, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}
            )
        nonce = None if proof is None else proof_claims(proof).get("nonce")
        self.record(Hit(True, scheme, claims.expires_at, claims.lease_id, nonce))
        return JSONResponse({"lease": claims.lease_id})


def proof_claims(proof: str) -> dict[str, Any]:
    segment = proof.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))))


async def endpoint(request: Request) -> Response:
    await request.body()
    service: Service = request.app.state.service
    return service.handle(request.method, str(request.url), request.headers)


@attrs.define
class Server:
    url: str
    app: Starlette


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """A real uvicorn on 127.0.0.1, on a port the OS picked, for this module."""
    app = Starlette(routes=[Route("/{path:path}", endpoint, methods=["GET", "POST", "PUT"])])
    app.state.service = Service()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan="off", ws="none"
    )
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not uv.started:
        assert thread.is_alive(), "uvicorn did not start"
        assert time.monotonic() < deadline, "uvicorn did not start in time"
        time.sleep(0.01)
    yield Server(f"http://127.0.0.1:{port}", app)
    uv.should_exit = True
    thread.join(10)
    sock.close()


@pytest.fixture
def service(server: Server) -> Service:
    service = Service()
    server.app.state.service = service
    return service


# -- brokers -------------------------------------------------------------------
class GatedStore(MemoryStore):
    """A MemoryStore whose ``extend`` (a renewal) waits until ``gate`` is set, so
    the renewal is surely in flight while other requests run."""

    blocking = True  # an AsyncBroker runs it in a thread: the wait blocks no loop

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()

    def extend(self, lease_id: str, *, expires_at: float, at: float) -> Lease | None:
        assert self.gate.wait(10), "the gate was never opened"
        return super().extend(lease_id, expires_at=expires_at, at=at)


@attrs.define
class Setup:
    broker: Broker
    clock: FakeClock
    store: GatedStore
    events: list[AuditEvent]

    def count(self, action: EventType) -> int:
        return sum(1 for event in self.events if event.action == action)


@pytest.fixture
def setup(service: Service) -> Iterator[Setup]:
    clock, store, events = FakeClock(), GatedStore(), list[AuditEvent]()
    broker = Broker(issuer=TEST_ISSUER, store=store, clock=clock, audit=[events.append])
    service.verify = broker.verify
    yield Setup(broker, clock, store, events)
    broker.close()


def open_gate_after(service: Service, store: GatedStore, old_expiry: int, n: int) -> None:
    """Hold renewals until ``n`` requests were served with the old token."""
    store.gate.clear()
    served = Counter[int]()

    def count(hit: Hit) -> None:
        if hit.ok and hit.expires_at == old_expiry:
            served[old_expiry] += 1
            if served[old_expiry] >= n:
                store.gate.set()

    service.served = count


def make_auth(broker: Broker | AsyncBroker, **kwargs: Any) -> BrokerAuth:
    return BrokerAuth(broker, subject=SUBJECT, audience=AUDIENCE, scopes=SCOPES, ttl=TTL, **kwargs)


# -- rotation under load: sync ------------------------------------------------------
def test_token_rotated_mid_flight_under_50_threads(
    server: Server, service: Service, setup: Setup
) -> None:
    with make_auth(setup.broker) as auth, httpx.Client(auth=auth, base_url=server.url) as client:
        assert client.get("/orders").status_code == 200
        old = service.hits[-1].expires_at
        assert old is not None
        setup.clock.advance(TTL * 2 / 3 + 1)  # due, still usable: renewal in flight meanwhile
        open_gate_after(service, setup.store, old, n=10)
        start = threading.Barrier(CONCURRENCY)

        def call(_: int) -> int:
            start.wait()
            return client.get("/orders", params={"q": "x"}).status_code

        with ThreadPoolExecutor(CONCURRENCY) as pool:
            statuses = list(pool.map(call, range(CONCURRENCY)))
    assert statuses == [200] * CONCURRENCY
    assert all(hit.ok for hit in service.hits)  # no request went without a valid token
    assert setup.count(EventType.RENEWED) == 1
    assert setup.count(EventType.ISSUED) == 1
    expiries = Counter(hit.expires_at for hit in service.hits[1:])
    assert set(expiries) == {old, old + 41}  # both tokens were in use at once
    assert expiries[old] >= 10
    assert not list(setup.broker.leases())  # closing the auth revoked the lease


def test_an_expired_token_makes_every_thread_wait_for_one_fresh_issue(
    server: Server, service: Service, setup: Setup
) -> None:
    with make_auth(setup.broker) as auth, httpx.Client(auth=auth, base_url=server.url) as client:
        assert client.get("/orders").status_code == 200
        first = service.hits[-1].lease_id
        setup.clock.advance(TTL)  # no longer usable: nobody may send it
        start = threading.Barrier(CONCURRENCY)

        def call(_: int) -> int:
            start.wait()
            return client.get("/orders").status_code

        with ThreadPoolExecutor(CONCURRENCY) as pool:
            statuses = list(pool.map(call, range(CONCURRENCY)))
    assert statuses == [200] * CONCURRENCY
    later = {hit.lease_id for hit in service.hits[1:]}
    assert len(later) == 1
    assert first not in later
    assert setup.count(EventType.ISSUED) == 2  # the expired lease cannot renew: one new one
    assert setup.count(EventType.RENEWED) == 0


# -- rotation under load: asyncio ---------------------------------------------------
def test_token_rotated_mid_flight_under_50_tasks(
    server: Server, service: Service, setup: Setup
) -> None:
    # The client's AsyncBroker shares the store and keys of the server's Broker.
    events: list[AuditEvent] = []
    abroker = AsyncBroker(
        issuer=TEST_ISSUER,
        keys=setup.broker.keys,
        store=setup.store,
        clock=setup.clock,
        audit=[events.append],
    )

    async def main() -> list[int]:
        async with (
            make_auth(abroker) as auth,
            httpx.AsyncClient(auth=auth, base_url=server.url) as client,
        ):
            assert (await client.get("/orders")).status_code == 200
            old = service.hits[-1].expires_at
            assert old is not None
            setup.clock.advance(TTL * 2 / 3 + 1)
            open_gate_after(service, setup.store, old, n=10)
            responses = await asyncio.gather(*(client.get("/orders") for _ in range(CONCURRENCY)))
            return [r.status_code for r in responses]

    statuses = asyncio.run(main())
    assert statuses == [200] * CONCURRENCY
    assert all(hit.ok for hit in service.hits)
    assert [e.action for e in events].count(EventType.RENEWED) == 1
    assert [e.action for e in events].count(EventType.ISSUED) == 1
    assert len({hit.expires_at for hit in service.hits[1:]}) == 2
    assert not list(setup.broker.leases())


def test_one_auth_shared_by_threads_and_event_loops_renews_once(
    server: Server, service: Service, setup: Setup
) -> None:
    """A Broker-backed auth used by sync threads and by several event loops at once."""
    with make_auth(setup.broker) as auth:
        with httpx.Client(auth=auth, base_url=server.url) as client:
            assert client.get("/orders").status_code == 200
        setup.clock.advance(TTL)  # unusable: every caller must wait for the one renewal
        start = threading.Barrier(8)

        def sync_worker() -> list[int]:
            with httpx.Client(auth=auth, base_url=server.url) as client:
                start.wait()
                return [client.get("/orders").status_code for _ in range(5)]

        def loop_worker() -> list[int]:
            async def main() -> list[int]:
                async with httpx.AsyncClient(auth=auth, base_url=server.url) as client:
                    start.wait()
                    rs = await asyncio.gather(*(client.get("/orders") for _ in range(5)))
                    return [r.status_code for r in rs]

            return asyncio.run(main())

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(sync_worker if i % 2 else loop_worker) for i in range(8)]
            statuses = [s for f in futures for s in f.result()]
    assert statuses == [200] * 40
    assert setup.count(EventType.ISSUED) == 2  # the first, then one replacement for all
    assert len({hit.lease_id for hit in service.hits[1:]}) == 1


# -- DPoP ----------------------------------------------------------------------------
@pytest.mark.parametrize("alg", ["ES256", "EdDSA", "RS256"])
def test_dpop_proofs_are_verified_by_the_server(
    server: Server, service: Service, setup: Setup, alg: str
) -> None:
    holder = generate_key(alg)
    with (
        make_auth(setup.broker, holder_key=holder) as auth,
        httpx.Client(auth=auth, base_url=server.url) as client,
    ):
        assert client.get("/orders").status_code == 200
        assert client.post("/orders/7", params={"dry": "1"}, json={"n": 1}).status_code == 200
        assert client.put("/orders/7#frag").status_code == 200
    assert [hit.scheme for hit in service.hits] == ["DPoP"] * 3
    assert all(hit.ok for hit in service.hits)
    lease = setup.broker.lease(service.hits[0].lease_id or "")
    assert lease.holder == holder.kid


def test_dpop_nonce_dance_retries_once_then_remembers_the_nonce(
    server: Server, service: Service, setup: Setup
) -> None:
    service.nonce = "n-1"
    with (
        make_auth(setup.broker, holder_key=generate_key("ES256")) as auth,
        httpx.Client(auth=auth, base_url=server.url) as client,
    ):
        response = client.post("/orders", json={"n": 1})
        assert response.status_code == 200
        assert [(h.ok, h.nonce) for h in service.hits] == [(False, None), (True, "n-1")]
        assert [r.status_code for r in response.history] == [401]
        assert client.get("/orders").status_code == 200  # the remembered nonce: one trip
        assert [(h.ok, h.nonce) for h in service.hits[2:]] == [(True, "n-1")]
        service.nonce = "n-2"  # the server rotates: one retry again
        assert client.get("/orders").status_code == 200
        assert [(h.ok, h.nonce) for h in service.hits[3:]] == [(False, "n-1"), (True, "n-2")]


def test_a_server_that_always_wants_a_new_nonce_gets_its_401_after_one_retry(
    server: Server, service: Service, setup: Setup
) -> None:
    service.nonce, service.rotate = "n-0", True
    with (
        make_auth(setup.broker, holder_key=generate_key("EdDSA")) as auth,
        httpx.Client(auth=auth, base_url=server.url) as client,
    ):
        for attempt in range(3):
            response = client.get("/orders")
            assert response.status_code == 401
            assert 'error="use_dpop_nonce"' in response.headers["www-authenticate"]
            assert len(service.hits) == 2 * (attempt + 1)  # one retry per request, no loop


def test_dpop_nonce_dance_with_an_async_client(
    server: Server, service: Service, setup: Setup
) -> None:
    service.nonce = "n-a"

    async def main() -> list[int]:
        async with (
            make_auth(setup.broker, holder_key=generate_key("ES256")) as auth,
            httpx.AsyncClient(auth=auth, base_url=server.url) as client,
        ):
            return [(await client.get("/orders")).status_code for _ in range(2)]

    assert asyncio.run(main()) == [200, 200]
    assert [(h.ok, h.nonce) for h in service.hits] == [(False, None), (True, "n-a"), (True, "n-a")]


def test_a_streamed_body_is_not_sent_twice(server: Server, service: Service, setup: Setup) -> None:
    service.nonce = "n-s"
    with (
        make_auth(setup.broker, holder_key=generate_key("ES256")) as auth,
        httpx.Client(auth=auth, base_url=server.url) as client,
    ):
        response = client.post("/upload", content=iter([b"a", b"b"]))
        assert response.status_code == 401  # the challenge surfaces; the nonce is kept
        assert client.post("/upload", content=iter([b"a", b"b"])).status_code == 200
    assert [h.ok for h in service.hits] == [False, True]


# -- the server refuses the token --------------------------------------------------------
def test_after_invalid_token_the_next_request_gets_a_new_token(
    server: Server, service: Service, setup: Setup
) -> None:
    with make_auth(setup.broker) as auth, httpx.Client(auth=auth, base_url=server.url) as client:
        assert client.get("/orders").status_code == 200
        first = service.hits[-1].lease_id
        setup.broker.revoke(first or "", reason="operator")
        assert client.get("/orders").status_code == 401  # returned as is
        assert client.get("/orders").status_code == 200
        assert service.hits[-1].lease_id != first
    assert setup.count(EventType.ISSUED) == 2


# -- requests ------------------------------------------------------------------------
def test_requests_twin_bearer(server: Server, service: Service, setup: Setup) -> None:
    with make_auth(setup.broker) as auth, requests.Session() as session:
        session.auth = auth.requests()
        assert session.get(server.url + "/orders", timeout=10).status_code == 200
        setup.clock.advance(TTL * 2 / 3 + 1)
        assert session.get(server.url + "/orders", timeout=10).status_code == 200
    assert [hit.scheme for hit in service.hits] == ["Bearer", "Bearer"]
    assert setup.count(EventType.RENEWED) == 1
    assert not list(setup.broker.leases())


def test_requests_twin_dpop_and_nonce_dance(server: Server, service: Service, setup: Setup) -> None:
    service.nonce = "n-r"
    with make_auth(setup.broker, holder_key=generate_key("ES256")) as auth:
        session = requests.Session()
        session.auth = auth.requests()
        response = session.post(server.url + "/orders?x=1", json={"n": 1}, timeout=10)
        assert response.status_code == 200
        assert [r.status_code for r in response.history] == [401]
        assert session.get(server.url + "/orders", timeout=10).status_code == 200
        session.close()
    assert [(h.ok, h.nonce) for h in service.hits] == [(False, None), (True, "n-r"), (True, "n-r")]


def test_requests_twin_always_new_nonce_surfaces_the_401(
    server: Server, service: Service, setup: Setup
) -> None:
    service.nonce, service.rotate = "n-0", True
    with make_auth(setup.broker, holder_key=generate_key("ES256")) as auth:
        session = requests.Session()
        session.auth = auth.requests()
        assert session.get(server.url + "/orders", timeout=10).status_code == 401
        session.close()
    assert len(service.hits) == 2


# -- secrets -------------------------------------------------------------------------
def test_the_token_never_appears_in_reprs_or_logs(
    server: Server, service: Service, setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    service.nonce = "n-l"
    holder: Key = generate_key("ES256")
    tokens: set[str] = set()
    original = setup.broker.renew

    def renew(*args: Any, **kwargs: Any) -> Any:
        cred = original(*args, **kwargs)
        tokens.add(cred.token)
        return cred

    setup.broker.renew = renew  # type: ignore[method-assign]
    with make_auth(setup.broker, holder_key=holder) as auth:
        with httpx.Client(auth=auth, base_url=server.url) as client:
            response = client.get("/orders")
            assert response.status_code == 200
            held = auth._renewal.held
            assert held is not None
            tokens.add(held.grant.token)
            setup.clock.advance(TTL * 2 / 3 + 1)
            assert client.get("/orders").status_code == 200
            texts = [repr(auth), repr(held), repr(response.request), repr(response.request.headers)]
        texts.append(repr(auth.requests()))
    texts.append(repr(auth))
    assert len(tokens) == 2
    assert {"httpx", "jitbroker.web.client"} <= {r.name for r in caplog.records}
    for token in tokens:
        assert token not in caplog.text
        for text in texts:
            assert token not in text
