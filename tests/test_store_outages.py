"""A broker over Redis or PostgreSQL whose server stops mid-run: ``issue`` raises
``StoreUnavailable`` and returns no token, online ``verify`` rejects, nothing is
half-written, and the same broker works again once the server is back."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any
from uuid import uuid4

import pytest

from jitbroker import AsyncBroker, Broker
from jitbroker.errors import StoreUnavailable, UnknownLease
from jitbroker.stores.base import LeaseFilter, LeaseStore
from jitbroker.stores.postgres import PostgresStore
from jitbroker.stores.redis import RedisStore
from jitbroker.testing import TEST_ISSUER
from test_store_postgres import PrivateServer as PrivatePostgres
from test_store_postgres import private_server as private_postgres_server  # noqa: F401
from test_store_redis import PrivateServer as PrivateRedis
from test_store_redis import fast_client
from test_store_redis import private_server as private_redis_server  # noqa: F401

Outage = tuple[LeaseStore, Callable[[], None], Callable[[], None]]


@pytest.fixture(params=["redis", "postgres"])
def outage(request: pytest.FixtureRequest) -> Iterator[Outage]:
    """A store on a private server, and the functions that stop and restart it."""
    if request.param == "redis":
        server: Any = request.getfixturevalue("private_redis_server")
        redis_server: PrivateRedis = server
        store: LeaseStore = RedisStore(fast_client(redis_server.port), prefix="jbtest")
        yield store, redis_server.kill, redis_server.start
        return
    pg: PrivatePostgres = request.getfixturevalue("private_postgres_server")
    pg_store = PostgresStore(pg.dsn, schema=f"jbtest_{uuid4().hex}", pool_timeout=2)
    try:
        yield pg_store, pg.stop, pg.start
    finally:
        if not pg.running():
            pg.start()
        pg_store.clear()
        pg_store.close()


def test_an_outage_fails_closed_and_the_broker_recovers(outage: Outage) -> None:
    store, stop, start = outage
    broker = Broker(issuer=TEST_ISSUER, store=store)
    before = broker.issue("svc:a", "api", ["read"], ttl=300, task="job-1")
    stop()
    with pytest.raises(StoreUnavailable) as raised:
        broker.issue("svc:a", "api", ["read"], ttl=300, task="job-1")
    assert raised.value.__cause__ is not None  # the driver's error, chained
    with pytest.raises(StoreUnavailable):
        broker.verify(before.token, audience="api")  # online: never accepted blind
    with pytest.raises(StoreUnavailable):
        broker.revoke(before)
    start()
    # The same broker and store, not rebuilt: everything works again.
    assert broker.verify(before.token, audience="api").lease_id == before.lease_id
    stored = store.find(LeaseFilter(task="job-1"))
    assert [lease.id for lease in stored] == [before.lease_id]  # the failed issue left nothing
    after = broker.issue("svc:a", "api", ["read"], ttl=300, task="job-1")
    assert broker.revoke(before) is True
    assert broker.verify(after.token, audience="api").lease_id == after.lease_id


def test_a_lease_never_stored_is_unknown(outage: Outage) -> None:
    """The token of a failed issue never left; a forged one with its id is unknown."""
    store, stop, start = outage
    broker = Broker(issuer=TEST_ISSUER, store=store)
    stop()
    with pytest.raises(StoreUnavailable):
        broker.issue("svc:a", "api", ttl=60)
    start()
    ghost = broker.issue("svc:a", "api", ttl=60)
    broker.revoke(ghost)
    store.purge(ghost.lease.expires_at + 1)
    with pytest.raises(UnknownLease):
        broker.verify(ghost.token, audience="api")


def test_an_async_broker_fails_closed_too(outage: Outage) -> None:
    import asyncio

    store, stop, start = outage

    async def scenario() -> None:
        broker = AsyncBroker(issuer=TEST_ISSUER, store=store)
        cred = await broker.issue("svc:a", "api", ttl=60)
        stop()
        with pytest.raises(StoreUnavailable):
            await broker.issue("svc:a", "api", ttl=60)
        with pytest.raises(StoreUnavailable):
            await broker.verify(cred.token, audience="api")
        start()
        assert (await broker.verify(cred.token, audience="api")).lease_id == cred.lease_id

    asyncio.run(scenario())
