"""``AsyncRedisStore`` beyond the conformance suite (which runs it through
``SyncOverAsync``): one round trip per call, error translation, an
``AsyncBroker`` on top of it with no thread hop, and a private ``redis-server``
killed and restarted under it.

The behaviour is ``RedisStore``'s (tests/test_store_redis.py covers the layout,
key expiry and the revocation channel once for both): these tests only check
what the asyncio client could change. No pytest-asyncio: each test drives its
own loop with ``asyncio.run``, and builds its client inside that loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, TypeVar, cast
from uuid import uuid4

import pytest
import redis
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from conftest import server_or_skip
from jitbroker import AsyncBroker, KeyRing
from jitbroker.errors import InvalidRequest, StoreError, StoreUnavailable, TokenRevoked
from jitbroker.stores.base import as_async
from jitbroker.stores.redis import RedisStore
from jitbroker.stores.redis_async import AsyncRedisStore
from jitbroker.testing import TEST_ISSUER, FakeClock
from test_store_redis import (
    BALLAST,
    HELD,
    T0,
    URL,
    PrivateServer,
    fill,
    free_port,
    make,
    private_server,  # noqa: F401  # a fixture, used by name
    snapshot,
)
from test_store_redis import CALLS as SYNC_CALLS
from test_store_redis import fast_client as fast_sync_client

T = TypeVar("T")


def revoked_since(store: AsyncRedisStore) -> object:
    """Beyond the protocol, so not among the sync tests' calls."""
    return store.revoked_since(T0)


def fast_client(port: int = 6379, **options: Any) -> redis.asyncio.Redis:
    """An asyncio client that fails fast: short timeouts and no retries."""
    return redis.asyncio.Redis(
        host="127.0.0.1",
        port=port,
        socket_timeout=0.5,
        socket_connect_timeout=0.5,
        retry=Retry(NoBackoff(), 0),
        **options,
    )


def run(
    factory: Callable[[], redis.asyncio.Redis], test: Callable[[AsyncRedisStore], Awaitable[T]]
) -> T:
    """Run ``test`` on a fresh store (random prefix, client built in the loop),
    then clear the store's keys and close its client."""

    async def main() -> T:
        client = factory()
        store = AsyncRedisStore(client, prefix=f"jbtest-{uuid4().hex}")
        try:
            return await test(store)
        finally:
            with contextlib.suppress(StoreError):  # a dead server must not hide the outcome
                await store.clear()
            await client.aclose(close_connection_pool=True)  # a pool we passed in, too

    return asyncio.run(main())


@pytest.fixture
def shared_server() -> None:
    server_or_skip("Redis", "127.0.0.1", 6379)


# -- construction -----------------------------------------------------------
def test_an_owned_client_fails_fast_like_the_sync_one() -> None:
    async def main() -> None:
        store = AsyncRedisStore(f"redis://127.0.0.1:{free_port()}/0")  # no I/O yet
        options = store._client.connection_pool.connection_kwargs
        assert options["socket_timeout"] == options["socket_connect_timeout"] == 5
        assert options["retry"].get_retries() == 0  # a retried script could run twice
        await store.close()
        await store.close()

    asyncio.run(main())


def test_shares_validation_and_repr_with_the_sync_store() -> None:
    with pytest.raises(InvalidRequest):
        AsyncRedisStore(URL, prefix="a{b")
    with pytest.raises(InvalidRequest):
        AsyncRedisStore(URL, retention=float("nan"))
    store = AsyncRedisStore("redis://user:hunter2@127.0.0.1:6379/0", prefix="p")
    assert repr(store) == "<AsyncRedisStore prefix='p'>"


def test_lazy_export() -> None:
    import jitbroker.stores

    assert jitbroker.stores.AsyncRedisStore is AsyncRedisStore
    assert "AsyncRedisStore" not in jitbroker.stores.__all__  # `import *` never needs redis


def test_as_async_takes_it_as_it_is() -> None:
    store = AsyncRedisStore(URL)
    assert as_async(store) is store  # no thread hop: AsyncBroker awaits it directly


@pytest.mark.usefixtures("shared_server")
def test_reads_and_writes_the_same_keys_as_the_sync_store() -> None:
    async def test(store: AsyncRedisStore) -> None:
        client = fast_sync_client()
        sync = RedisStore(client, prefix=store.prefix)
        assert await store.add(make("a", task="t")) is True
        assert sync.add(make("b", at=T0 + 1, parent="a", task="t")) is True
        assert {lease.id for lease in await store.revoke("a", at=T0 + 2, reason="x")} == {"a", "b"}
        assert sorted(sync.revoked_since(T0)) == sorted(await store.revoked_since(T0)) == ["a", "b"]
        client.close()

    run(fast_client, test)


# -- one round trip per call --------------------------------------------------
class CountingConnection(redis.asyncio.Connection):
    """Counts what is sent: one send (then one reply) is one round trip."""

    sent: ClassVar[list[str]] = []

    async def send_command(self, *args: Any, **kwargs: Any) -> None:
        self.sent.append(str(args[0]))
        await super().send_command(*args, **kwargs)


def counting_client() -> redis.asyncio.Redis:
    pool = redis.asyncio.ConnectionPool(
        connection_class=CountingConnection, host="127.0.0.1", port=6379, socket_timeout=2
    )
    return redis.asyncio.Redis(connection_pool=pool)


@pytest.mark.usefixtures("shared_server")
def test_each_call_is_one_round_trip() -> None:
    # The operations are RedisStore's own steps (its test counts every one); what
    # the asyncio client could change is how many commands a script call sends.
    async def test(store: AsyncRedisStore) -> list[list[str]]:
        await store.add(make("warm-up"))  # connect; load the add script (NOSCRIPT once)
        await store.revoke("warm-up", at=T0, reason="x")  # and the revoke script
        await store.claim_jobs(T0, ["create:db"], claim="w", until=T0)  # and the claim's
        trips = []
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: store.add(make("a", task="t")),
            lambda: store.add(make("c", at=T0 + 1, parent="a", task="t", provider="db")),
            lambda: store.revoke("a", at=T0 + 2, reason="x", outbox=HELD),
            lambda: store.get("a"),
            lambda: store.claim_jobs(T0 + 2, ["create:db"], claim="x", until=T0 + 9),
            lambda: store.claim_jobs(T0 + 2, [], claim="x", until=T0 + 9),
            lambda: store.get_job("c/create/db"),
        ]
        for call in calls:
            CountingConnection.sent.clear()
            await call()
            trips.append(list(CountingConnection.sent))
        return trips

    script, read = ["EVALSHA"], ["HGETALL"]
    assert run(counting_client, test) == [script, script, script, read, script, [], script]


# -- errors -----------------------------------------------------------------
@pytest.mark.parametrize(
    "call", [*SYNC_CALLS.values(), revoked_since], ids=[*SYNC_CALLS.keys(), "revoked_since"]
)
def test_no_server_is_store_unavailable(call: Callable[[Any], object]) -> None:
    port = free_port()  # nothing listens there

    async def test(store: AsyncRedisStore) -> None:
        # The sync suite's calls: on this store each returns a coroutine.
        with pytest.raises(StoreUnavailable) as caught:
            await cast("Awaitable[object]", call(store))
        assert isinstance(caught.value.__cause__, redis.ConnectionError)

    run(lambda: fast_client(port), test)


@pytest.mark.usefixtures("shared_server")
def test_a_redis_error_is_a_store_error() -> None:
    async def test(store: AsyncRedisStore) -> None:
        await store._client.set(f"{{{store.prefix}}}:lease:a", "not a hash")
        with pytest.raises(StoreError) as caught:
            await store.get("a")
        assert not isinstance(caught.value, StoreUnavailable)
        assert isinstance(caught.value.__cause__, redis.ResponseError)

    run(fast_client, test)


def test_non_finite_times_are_refused_before_any_io() -> None:
    async def test(store: AsyncRedisStore) -> None:  # no server: any I/O would fail otherwise
        with pytest.raises(InvalidRequest):
            await store.add(make("a", ttl=float("nan")))
        with pytest.raises(InvalidRequest):
            await store.extend("a", expires_at=float("inf"), at=T0)

    port = free_port()
    run(lambda: fast_client(port), test)


# -- an AsyncBroker on top ----------------------------------------------------
@pytest.mark.usefixtures("shared_server")
def test_async_broker_end_to_end(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_thread_hop(*args: object, **kwargs: object) -> None:
        raise AssertionError("an async store must be awaited directly, not run in a thread")

    monkeypatch.setattr(asyncio, "to_thread", no_thread_hop)

    async def test(store: AsyncRedisStore) -> None:
        clock = FakeClock()
        broker = AsyncBroker(
            issuer=TEST_ISSUER, keys=KeyRing.generate("EdDSA"), store=store, clock=clock
        )
        cred = await broker.issue("svc:ci", "db:orders", ["orders:read"], ttl=60, owner="alice")
        claims = await broker.verify(cred.token, audience="db:orders", scopes=["orders:read"])
        assert claims.lease_id == cred.lease_id
        assert await broker.revoke(cred) is True
        with pytest.raises(TokenRevoked):
            await broker.verify(cred.token, audience="db:orders")

        async with broker.task("job-1", subject="svc:ci", audience="db:orders", ttl=60) as job:
            child = await broker.attenuate(job, ttl=30)
            assert (await broker.lease(child)).parent == job.lease_id
        assert await broker.leases(task="job-1") == []  # the task scope revoked both

        short = await broker.issue("svc:ci", "db:orders", ttl=5)
        clock.advance(10)
        assert [lease.id for lease in await broker.sweep()] == [short.lease_id]
        assert await broker.sweep() == []  # each expiry claimed once

    run(fast_client, test)


# -- a private server, killed and restarted ---------------------------------
def test_a_killed_server_is_unavailable_then_recovers(
    private_server: PrivateServer,  # noqa: F811 - the fixture imported above
) -> None:
    parent = make("parent", task="t")
    child = make("child", at=T0 + 1, parent="parent", task="t")

    async def main() -> None:
        client = fast_client(private_server.port)
        store = AsyncRedisStore(client, prefix="fault")
        assert await store.add(parent) is True

        private_server.kill()
        with pytest.raises(StoreUnavailable) as caught:
            await store.add(child)
        assert isinstance(caught.value.__cause__, redis.ConnectionError)
        with pytest.raises(StoreUnavailable):
            await store.get("parent")

        private_server.start()  # same port, same append-only file
        # The same store object, not rebuilt: it reconnects on its own.
        assert await store.get("parent") == parent  # acknowledged before the kill: kept
        assert await store.get("child") is None  # refused while down: nothing half-written
        assert await store.add(child) is True
        revoked = await store.revoke("parent", at=T0 + 2, reason="x")
        assert {lease.id for lease in revoked} == {"parent", "child"}
        await client.aclose()

    asyncio.run(main())


# -- a private server past maxmemory (noeviction) ----------------------------------
def test_past_maxmemory_issuing_fails_closed_and_revoking_still_works(
    private_server: PrivateServer,  # noqa: F811 - the fixture imported above
) -> None:
    admin = fast_sync_client(private_server.port)  # fills, frees and inspects

    async def main() -> None:
        client = fast_client(private_server.port)
        store = AsyncRedisStore(client, prefix="oom")
        clock = FakeClock(T0)
        broker = AsyncBroker(
            issuer=TEST_ISSUER, keys=KeyRing.generate("EdDSA"), store=store, clock=clock
        )
        kept = await broker.issue("svc:a", "api", ["read"], ttl=600)
        owned = await broker.issue("svc:a", "api", ["read"], ttl=600, owner="alice")
        short = await broker.issue("svc:a", "api", ["read"], ttl=10)
        fill(admin)
        before = snapshot(admin, "oom")

        with pytest.raises(StoreError, match="out of memory") as caught:
            await broker.issue("svc:a", "api", ["read"], ttl=60)
        assert isinstance(caught.value.__cause__, redis.exceptions.OutOfMemoryError)
        with pytest.raises(StoreError, match="out of memory"):
            await broker.attenuate(kept, ttl=30)
        with pytest.raises(StoreError, match="out of memory"):
            await broker.renew(kept, ttl=900)
        assert snapshot(admin, "oom") == before  # refused whole: nothing written

        admin.script_flush()  # the scripts are loaded again while full
        assert await broker.revoke(kept) is True
        with pytest.raises(TokenRevoked):
            await broker.verify(kept.token, audience="api")
        assert await broker.revoke_where(owner="alice", reason="offboarded") == 1
        assert (await broker.lease(owned)).revoked_at is not None
        clock.advance(11)
        assert [lease.id for lease in await broker.sweep()] == [short.lease_id]
        assert await store.purge(T0 + 10_000) == 3

        admin.delete(BALLAST)  # back below maxmemory: issuing works again
        cred = await broker.issue("svc:a", "api", ["read"], ttl=60)
        assert await store.get(cred.lease_id) == cred.lease
        await client.aclose()

    asyncio.run(main())
    admin.close()


# -- the revocation feed ---------------------------------------------------------
def test_the_async_store_has_a_revocation_feed_and_strict_revoke(shared_server: None) -> None:
    async def test(store: AsyncRedisStore) -> None:
        broker = AsyncBroker(issuer=TEST_ISSUER, store=store)
        cred = await broker.issue("svc:a", "api", ttl=60)
        cache = store.revocations(max_staleness=1.0, heartbeat=0.1)
        try:
            for _ in range(250):
                if cache.fresh():
                    break
                await asyncio.sleep(0.02)
            assert cache.fresh(), "the feed did not come up"
            ticks = 0

            async def tick() -> None:  # the loop must keep running while revoke waits
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0)

            ticker = asyncio.create_task(tick())
            await broker.revoke(cred)
            ticker.cancel()
            assert cache.revoked(cred.lease_id)  # strict: no waiting here
            assert ticks > 0
        finally:
            cache.close()

    run(fast_client, test)
