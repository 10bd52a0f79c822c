"""BrokerAuth without a network: renewal timing, failures, closing, proofs, challenges.

Requests go through ``httpx.MockTransport``; time comes from a ``FakeClock`` (or
freezegun), so no test sleeps. The real-server tests are in test_web_client.py.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import attrs
import httpx
import pytest
from freezegun import freeze_time

from jitbroker import AsyncBroker, Broker, MemoryStore
from jitbroker.audit import AuditEvent, EventType
from jitbroker.dpop import ProofChecker
from jitbroker.errors import InvalidRequest, LeaseNotActive, StoreUnavailable
from jitbroker.keys import generate_key
from jitbroker.lease import Lease
from jitbroker.testing import TEST_ISSUER, FakeClock
from jitbroker.web.client import BrokerAuth, challenge_errors
from jitbroker.web.renewal import RETRY_AFTER
from jitbroker.web.sources import REVOKE_REASON, Grant

URL = "https://api.example.com/orders"
TTL = 60


class FlakyStore(MemoryStore):
    """A MemoryStore whose renewals fail while ``down`` is set, and can be held
    at a gate; counts the attempts."""

    blocking = True

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.attempts = 0
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def extend(self, lease_id: str, *, expires_at: float, at: float) -> Lease | None:
        self.attempts += 1
        self.entered.set()
        assert self.gate.wait(10)
        if self.down:
            raise StoreUnavailable("the store is down")
        return super().extend(lease_id, expires_at=expires_at, at=at)


@attrs.define
class World:
    clock: FakeClock
    store: FlakyStore
    events: list[AuditEvent]
    broker: Broker
    seen: list[httpx.Request] = attrs.Factory(list)
    reply: Callable[[httpx.Request], httpx.Response] = lambda _: httpx.Response(200)

    def count(self, action: EventType) -> int:
        return sum(1 for event in self.events if event.action == action)

    def transport(self) -> httpx.MockTransport:
        def handle(request: httpx.Request) -> httpx.Response:
            self.seen.append(request)
            return self.reply(request)

        return httpx.MockTransport(handle)

    def auth(self, broker: Broker | AsyncBroker | None = None, **kwargs: Any) -> BrokerAuth:
        return BrokerAuth(
            broker or self.broker, subject="svc:a", audience="api", scopes="read", ttl=TTL, **kwargs
        )

    def client(self, auth: BrokerAuth) -> httpx.Client:
        return httpx.Client(auth=auth, transport=self.transport())

    def token(self, request: httpx.Request) -> str:
        return request.headers["authorization"].split(" ", 1)[1]


@pytest.fixture
def world() -> Iterator[World]:
    clock, store, events = FakeClock(), FlakyStore(), list[AuditEvent]()
    broker = Broker(issuer=TEST_ISSUER, store=store, clock=clock, audit=[events.append])
    yield World(clock, store, events, broker)
    broker.close()


def decode(segment: str) -> dict[str, Any]:
    return dict(json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))))


# -- timing ------------------------------------------------------------------------
@pytest.mark.parametrize(("renew_at", "due"), [(2 / 3, 40.0), (0.5, 30.0), (0.9, 54.0)])
def test_renews_at_its_fraction_of_the_token_life(
    world: World, renew_at: float, due: float
) -> None:
    with world.auth(renew_at=renew_at) as auth, world.client(auth) as client:
        client.get(URL)
        world.clock.advance(due - 0.01)
        client.get(URL)
        assert world.count(EventType.RENEWED) == 0
        world.clock.advance(0.01)
        client.get(URL)
        assert world.count(EventType.RENEWED) == 1
        first, before, after = (world.token(r) for r in world.seen)
        assert first == before != after
        world.clock.advance(due - 0.01)  # counted from the renewal, not from the issue
        client.get(URL)
        assert world.count(EventType.RENEWED) == 1


def test_freezegun_moves_an_auth_on_a_broker_without_a_clock() -> None:
    events: list[AuditEvent] = []
    with freeze_time("2026-03-01 12:00:00") as frozen:
        broker = Broker(issuer=TEST_ISSUER, audit=[events.append])
        transport = httpx.MockTransport(lambda r: httpx.Response(200))
        with (
            BrokerAuth(broker, subject="svc:a", audience="api", ttl=90) as auth,
            httpx.Client(auth=auth, transport=transport) as client,
        ):
            client.get(URL)
            frozen.tick(59)
            client.get(URL)
            assert [e.action for e in events].count(EventType.RENEWED) == 0
            frozen.tick(1)
            client.get(URL)
            assert [e.action for e in events].count(EventType.RENEWED) == 1


# -- refusals and failures ---------------------------------------------------------------
def test_a_lease_at_its_maximum_lifetime_is_replaced_and_both_die_on_close() -> None:
    clock, events = FakeClock(), list[AuditEvent]()
    broker = Broker(
        issuer=TEST_ISSUER, clock=clock, default_ttl=TTL, max_ttl=TTL, audit=[events.append]
    )
    transport = httpx.MockTransport(lambda r: httpx.Response(200))
    auth = BrokerAuth(broker, subject="svc:a", audience="api", ttl=TTL)
    with auth, httpx.Client(auth=auth, transport=transport) as client:
        client.get(URL)
        clock.advance(41)
        client.get(URL)  # renew refused (at its cap): a fresh credential instead
        assert [e.action for e in events].count(EventType.ISSUED) == 2
        assert len(list(broker.leases())) == 2  # the old one still runs out its time
    assert list(broker.leases()) == []
    revoked = [e for e in events if e.action == EventType.REVOKED]
    assert len(revoked) == 2
    assert {e.reason for e in revoked} == {REVOKE_REASON}


def test_a_failed_renewal_keeps_the_usable_token_and_retries_later(world: World) -> None:
    with world.auth() as auth, world.client(auth) as client:
        client.get(URL)
        world.clock.advance(41)
        world.store.down = True
        assert client.get(URL).status_code == 200  # the still-valid token, sent
        assert world.store.attempts == 1
        client.get(URL)
        assert world.store.attempts == 1  # not again before RETRY_AFTER
        world.clock.advance(RETRY_AFTER)
        world.store.down = False
        client.get(URL)
        assert world.store.attempts == 2
        assert world.count(EventType.RENEWED) == 1
        assert len({world.token(r) for r in world.seen}) == 2


def test_no_request_leaves_without_a_usable_token(world: World) -> None:
    with world.auth() as auth, world.client(auth) as client:
        client.get(URL)
        world.clock.advance(TTL - 0.5)  # still valid for the broker, but not worth sending
        world.store.down = True
        with pytest.raises(StoreUnavailable):
            client.get(URL)
        assert len(world.seen) == 1
        world.store.down = False


def test_waiters_share_the_one_renewal_and_its_failure(world: World) -> None:
    with world.auth() as auth, world.client(auth) as client:
        client.get(URL)
        world.clock.advance(TTL - 0.5)
        world.store.down = True
        world.store.gate.clear()

        def call(_: int) -> str:
            try:
                client.get(URL)
            except StoreUnavailable:
                return "unavailable"
            return "sent"

        with ThreadPoolExecutor(20) as pool:
            results = [pool.submit(call, i) for i in range(20)]
            assert world.store.entered.wait(10)
            world.store.gate.set()
            outcomes = [f.result() for f in results]
        assert outcomes == ["unavailable"] * 20
        assert world.store.attempts == 1
        assert len(world.seen) == 1
        world.store.down = False


def test_a_revoked_lease_is_replaced_at_renewal(world: World) -> None:
    with world.auth() as auth, world.client(auth) as client:
        client.get(URL)
        world.broker.revoke_where(subject="svc:a")
        world.clock.advance(41)
        client.get(URL)
        assert world.count(EventType.ISSUED) == 2
        assert world.count(EventType.RENEWED) == 0


def test_invalid_token_challenge_renews_before_the_next_request(world: World) -> None:
    world.reply = lambda _: httpx.Response(
        401, headers={"WWW-Authenticate": 'Bearer realm="api", error="invalid_token"'}
    )
    with world.auth() as auth, world.client(auth) as client:
        assert client.get(URL).status_code == 401
        assert len(world.seen) == 1  # not retried
        world.reply = lambda _: httpx.Response(200)
        client.get(URL)
        assert world.count(EventType.RENEWED) == 1
        client.get(URL)
        assert world.count(EventType.RENEWED) == 1


# -- closing -----------------------------------------------------------------------
def test_close_revokes_and_refuses_later_requests(world: World) -> None:
    auth = world.auth()
    with world.client(auth) as client:
        client.get(URL)
        auth.close()
        assert list(world.broker.leases()) == []
        with pytest.raises(InvalidRequest, match="closed"):
            client.get(URL)
    auth.close()  # idempotent
    assert "closed" in repr(auth)


def test_a_close_that_fails_can_be_retried(world: World) -> None:
    auth = world.auth()
    with world.client(auth) as client:
        client.get(URL)
    original = world.store.revoke

    def down(*args: Any, **kwargs: Any) -> Any:
        raise StoreUnavailable("the store is down")

    world.store.revoke = down  # type: ignore[method-assign]
    with pytest.raises(StoreUnavailable):
        auth.close()
    assert len(list(world.broker.leases())) == 1
    world.store.revoke = original  # type: ignore[method-assign]
    auth.close()
    assert list(world.broker.leases()) == []


def test_closing_during_a_renewal_revokes_what_it_brings(world: World) -> None:
    auth = world.auth()
    client = world.client(auth)
    client.get(URL)
    world.clock.advance(TTL - 0.5)  # unusable: the request waits for the renewal
    world.store.gate.clear()
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(client.get, URL)
        assert world.store.entered.wait(10)
        auth.close()
        world.store.gate.set()
        with pytest.raises(InvalidRequest, match="closed"):
            pending.result()
    client.close()
    assert list(world.broker.leases()) == []


# -- asyncio -------------------------------------------------------------------------
def test_async_broker_flow_and_aclose(world: World) -> None:
    abroker = AsyncBroker(issuer=TEST_ISSUER, store=world.store, clock=world.clock)

    async def main() -> None:
        auth = world.auth(abroker)
        transport = world.transport()
        async with auth, httpx.AsyncClient(auth=auth, transport=transport) as client:
            await client.get(URL)
            world.clock.advance(41)
            await client.get(URL)
            assert len(list(world.broker.leases())) == 1
            with (
                pytest.raises(InvalidRequest, match="AsyncClient"),
                httpx.Client(auth=auth) as sync,
            ):
                sync.get(URL)
            with pytest.raises(InvalidRequest, match="aclose"):
                auth.close()

    asyncio.run(main())
    assert world.store.attempts == 1  # one renewal
    assert len({world.token(r) for r in world.seen}) == 2
    assert list(world.broker.leases()) == []


def test_a_cancelled_renewal_is_taken_over_by_a_waiter(world: World) -> None:
    abroker = AsyncBroker(issuer=TEST_ISSUER, store=world.store, clock=world.clock)

    async def main() -> int:
        auth = world.auth(abroker)
        async with auth, httpx.AsyncClient(auth=auth, transport=world.transport()) as client:
            await client.get(URL)
            world.clock.advance(TTL - 0.5)
            world.store.gate.clear()
            owner = asyncio.create_task(client.get(URL))
            await asyncio.to_thread(world.store.entered.wait, 10)
            waiter = asyncio.create_task(client.get(URL))
            await asyncio.sleep(0)
            owner.cancel()
            world.store.gate.set()
            with pytest.raises(asyncio.CancelledError):
                await owner
            return (await waiter).status_code

    assert asyncio.run(main()) == 200
    assert list(world.broker.leases()) == []


# -- DPoP proofs ---------------------------------------------------------------------
def test_each_request_carries_a_fresh_proof_of_the_request(world: World) -> None:
    holder = generate_key("ES256")
    with world.auth(holder_key=holder) as auth, world.client(auth) as client:
        client.post(URL + "?page=2#top", json={"a": 1})
        client.post(URL + "?page=2#top", json={"a": 1})
    checker = ProofChecker(clock=world.clock)
    jtis = set()
    for request in world.seen:
        scheme, token = request.headers["authorization"].split(" ")
        assert scheme == "DPoP"
        proof = request.headers["dpop"]
        header, claims = decode(proof.split(".")[0]), decode(proof.split(".")[1])
        assert header["typ"] == "dpop+jwt"
        assert header["alg"] == "ES256"
        assert "d" not in header["jwk"]
        assert claims["htm"] == "POST"
        assert claims["htu"] == URL  # no query, no fragment
        assert claims["iat"] == int(world.clock())
        digest = hashlib.sha256(token.encode()).digest()
        assert claims["ath"] == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        assert "nonce" not in claims
        jtis.add(claims["jti"])
        checker.check(proof, method="POST", url=str(request.url), token=token, jkt=holder.kid)
    assert len(jtis) == 2


def nonce_reply(nonce: str, header: str = 'DPoP error="use_dpop_nonce"') -> httpx.Response:
    return httpx.Response(401, headers={"WWW-Authenticate": header, "DPoP-Nonce": nonce})


@pytest.mark.parametrize(
    ("nonce", "retried"),
    [
        ("abc-123_~", True),
        ('has"quote', False),
        ("has space", False),
        ("x" * 513, False),
    ],
)
def test_only_a_well_formed_nonce_is_echoed(world: World, nonce: str, retried: bool) -> None:
    world.reply = lambda request: (
        httpx.Response(200) if "nonce" in decode(request.headers["dpop"].split(".")[1])
        else nonce_reply(nonce)
    )  # fmt: skip
    with world.auth(holder_key=generate_key("EdDSA")) as auth, world.client(auth) as client:
        status = client.get(URL).status_code
    assert (status, len(world.seen)) == ((200, 2) if retried else (401, 1))


def test_the_nonce_challenge_is_found_among_several(world: World) -> None:
    world.reply = lambda request: (
        httpx.Response(200) if request.headers["dpop"].count(".") and "nonce" in
        decode(request.headers["dpop"].split(".")[1])
        else nonce_reply("n1", 'Bearer realm="api", DPoP realm="api", error="use_dpop_nonce"')
    )  # fmt: skip
    with world.auth(holder_key=generate_key("EdDSA")) as auth, world.client(auth) as client:
        assert client.get(URL).status_code == 200
    assert challenge_errors(['Bearer error="invalid_token"', "DPoP error=use_dpop_nonce"]) == {
        "invalid_token",
        "use_dpop_nonce",
    }


def test_a_nonce_from_a_successful_response_is_used_next(world: World) -> None:
    world.reply = lambda _: httpx.Response(200, headers={"DPoP-Nonce": "fresh"})
    with world.auth(holder_key=generate_key("EdDSA")) as auth, world.client(auth) as client:
        client.get(URL)
        client.get(URL)
        client.get("https://other.example.com/")  # another origin: its own nonce
    nonces = [decode(r.headers["dpop"].split(".")[1]).get("nonce") for r in world.seen]
    assert nonces == [None, "fresh", None]


# -- arguments and the source seam -------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        {"holder_key": generate_key("ES256").public()},
        {"holder_key": generate_key("HS256")},
        {"holder_key": "not a key"},
        {"renew_at": 0},
        {"renew_at": 1},
        {"renew_at": 1.5},
        {"renew_at": True},
    ],
)
def test_bad_arguments_are_refused(world: World, kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest):
        world.auth(**kwargs)


def test_not_a_broker_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="Broker"):
        BrokerAuth(object(), subject="s", audience="a")  # type: ignore[arg-type]


@attrs.frozen
class RemoteGrant:
    token: str = attrs.field(repr=False)
    lease_id: str
    expires_at: float


class FakeRemote:
    """A token source that is no broker: the seam a broker URL will plug into."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.calls: list[str] = []

    def issue(self) -> Grant:
        self.calls.append("issue")
        return RemoteGrant(f"t{len(self.calls)}", "L1", self.clock() + 30)

    def renew(self, grant: Grant) -> Grant:
        self.calls.append("renew")
        return RemoteGrant(f"t{len(self.calls)}", grant.lease_id, self.clock() + 30)

    def revoke(self, grant: Grant) -> bool:
        self.calls.append(f"revoke {grant.lease_id}")
        return True


def test_any_token_source_plugs_in(world: World) -> None:
    remote = FakeRemote(world.clock)
    with BrokerAuth.from_source(remote) as auth, world.client(auth) as client:
        client.get(URL)
        world.clock.advance(20)
        client.get(URL)
        assert "FakeRemote" in repr(auth)
    assert [r.headers["authorization"] for r in world.seen] == ["Bearer t1", "Bearer t2"]
    assert remote.calls == ["issue", "renew", "revoke L1"]


def test_a_grant_that_is_already_expired_is_refused(world: World) -> None:
    remote = FakeRemote(world.clock)
    remote.issue = lambda: RemoteGrant("t", "L", world.clock() - 1)  # type: ignore[method-assign]
    with BrokerAuth.from_source(remote) as auth, world.client(auth) as client:
        with pytest.raises(LeaseNotActive):
            client.get(URL)
        assert world.seen == []


def test_requests_is_imported_only_for_the_twin() -> None:
    code = (
        "import sys, jitbroker.web.client as c\n"
        "assert 'requests' not in sys.modules\n"
        "import jitbroker\n"
        "b = jitbroker.Broker()\n"
        "c.BrokerAuth(b, subject='s', audience='a').requests()\n"
        "assert 'requests' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
