"""Revocation caches: verifying with no store round trip while the feed is live,
and falling back to the store (fail closed) when it is not."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from uuid import uuid4

import psycopg
import pytest
import redis
from psycopg import sql
from psycopg.rows import dict_row
from redis.backoff import NoBackoff
from redis.retry import Retry

from conftest import server_or_skip
from jitbroker import Broker, KeyRing, Verifier
from jitbroker.errors import (
    InvalidRequest,
    StoreError,
    StoreUnavailable,
    TokenRevoked,
    UnknownLease,
)
from jitbroker.lease import Lease
from jitbroker.revocations import RevocationCache
from jitbroker.stores.postgres import PostgresStore
from jitbroker.stores.redis import FEED_CLIENT_NAME, RedisStore
from jitbroker.testing import TEST_ISSUER, FakeClock
from test_store_redis import PrivateServer, fast_client, private_server  # noqa: F401

FEED_THREAD = "jitbroker-revocations"


class Ticks:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"


def wait_for(condition: Callable[[], bool], limit: float = 5.0) -> bool:
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# -- the cache on its own ----------------------------------------------------------
def test_a_new_cache_is_stale_until_its_first_resync() -> None:
    ticks = Ticks()
    cache = RevocationCache(window=60, max_staleness=5, clock=ticks)
    assert not cache.fresh()
    cache.resync(["a"], epoch=0.0)
    assert cache.fresh()
    assert cache.revoked("a")
    assert not cache.revoked("b")


def test_the_cache_goes_stale_without_news_and_when_down() -> None:
    ticks = Ticks()
    cache = RevocationCache(window=60, max_staleness=5, clock=ticks)
    cache.resync([], epoch=0.0)
    ticks.now += 5
    assert cache.fresh()
    ticks.now += 0.1
    assert not cache.fresh()
    cache.alive()
    assert cache.fresh()
    cache.down()
    assert not cache.fresh()


def test_ids_are_kept_for_the_window_then_forgotten() -> None:
    ticks = Ticks()
    cache = RevocationCache(window=60, clock=ticks)
    cache.resync(["a"], epoch=0.0)
    ticks.now += 59
    cache.alive()
    assert cache.revoked("a")
    ticks.now += 1
    cache.alive()
    assert not cache.revoked("a")


def test_too_many_ids_make_the_cache_stale_never_forgetful() -> None:
    ticks = Ticks()
    cache = RevocationCache(window=60, max_entries=3, clock=ticks)
    cache.resync(["a", "b", "c"], epoch=0.0)
    assert cache.fresh()
    cache.add(["d"])
    assert not cache.fresh()  # the verifier asks the store again
    assert all(cache.revoked(i) for i in "abcd")


def test_the_cache_vouches_only_for_tokens_issued_after_the_epoch() -> None:
    ticks = Ticks()
    cache = RevocationCache(window=60, max_staleness=5, clock=ticks)
    assert not cache.vouches_for(2000.0, 5)  # never synced
    cache.resync([], epoch=None)  # the store has no epoch: nothing stored since it was emptied
    assert cache.fresh()
    assert not cache.vouches_for(2000.0, 5)
    cache.resync([], epoch=1000.0)
    assert cache.vouches_for(1005.0, 5)
    assert not cache.vouches_for(1004.0, 5)  # within the skew allowance: ask the store
    cache.down()
    assert not cache.vouches_for(2000.0, 5)


def test_a_changed_epoch_ends_the_session() -> None:
    cache = RevocationCache(window=60)
    cache.resync([], epoch=1000.0)
    cache.check_epoch(1000.0)
    assert cache.fresh()
    for changed in (None, 1001.0):
        cache.resync([], epoch=1000.0)
        with pytest.raises(StoreError, match="epoch"):
            cache.check_epoch(changed)
        assert not cache.fresh()


def test_close_stops_the_feed_once() -> None:
    stops: list[int] = []
    cache = RevocationCache(window=60)
    cache.attach(lambda: stops.append(1))
    cache.resync([], epoch=0.0)
    cache.close()
    cache.close()
    assert stops == [1]
    assert not cache.fresh()


def test_a_cache_needs_a_store() -> None:
    with pytest.raises(InvalidRequest, match="store"):
        Verifier(
            KeyRing.generate().jwks(),
            issuer=TEST_ISSUER,
            offline=True,
            revocations=RevocationCache(window=60),
        )


# -- fed by Redis pub/sub or PostgreSQL LISTEN ---------------------------------------
class CountingStore(RedisStore):
    """Counts the lease lookups a verifier makes (the round trips a cache saves)."""

    gets = 0

    def get(self, lease_id: str) -> Lease | None:
        self.gets += 1
        return super().get(lease_id)


class CountingPostgresStore(PostgresStore):
    gets = 0

    def get(self, lease_id: str) -> Lease | None:
        self.gets += 1
        return super().get(lease_id)


Counting = CountingStore | CountingPostgresStore


@pytest.fixture(params=["redis", "postgres"])
def store(request: pytest.FixtureRequest) -> Iterator[Counting]:
    made: Counting
    if request.param == "redis":
        server_or_skip("Redis", "127.0.0.1", 6379)
        made = CountingStore(fast_client(), prefix=f"jbtest-{uuid4().hex}")
    else:
        server_or_skip("PostgreSQL", "127.0.0.1", 5432)
        made = CountingPostgresStore(PG_DSN, schema=f"jbtest_{uuid4().hex}")
    age(made)
    yield made
    made.clear()
    made.close()


def epoch_key(store: RedisStore) -> str:
    return f"{{{store.prefix}}}:epoch"


def age(store: Counting) -> None:
    """Move the store's epoch an hour back, as for a store that has been running
    a while: a new store's epoch is now, and a cache vouches only for tokens
    issued (leeway) after it. Redis's first add keeps an epoch already there."""
    if isinstance(store, RedisStore):
        store._client.set(epoch_key(store), time.time() - 3600)
    else:
        meta = sql.SQL("{}.jitbroker_meta").format(sql.Identifier(store.schema))
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(sql.SQL("UPDATE {} SET epoch = epoch - 3600").format(meta))


def lose_data(store: Counting) -> None:
    """What a Redis restart without persistence or a truncated table does."""
    if isinstance(store, RedisStore):
        store.clear()
    else:
        leases = sql.SQL("{}.leases").format(sql.Identifier(store.schema))
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(sql.SQL("TRUNCATE {}").format(leases))


def live_cache(store: Counting) -> RevocationCache:
    cache = store.revocations(max_staleness=1.0, heartbeat=0.1)
    assert wait_for(cache.fresh), "the revocation feed did not come up"
    return cache


def test_verify_with_a_live_cache_makes_no_round_trip(store: Counting) -> None:
    broker = Broker(issuer=TEST_ISSUER, store=store)
    cache = live_cache(store)
    try:
        verifier = Verifier(
            broker.jwks(), issuer=TEST_ISSUER, audience="api", store=store, revocations=cache
        )
        cred = broker.issue("svc:a", "api", ttl=60)
        for _ in range(20):
            assert verifier.verify(cred.token).lease_id == cred.lease_id
        assert store.gets == 0
        broker.revoke(cred)
        assert wait_for(lambda: cache.revoked(cred.lease_id))
        with pytest.raises(TokenRevoked):
            verifier.verify(cred.token)
        assert store.gets == 0
    finally:
        cache.close()


def test_subtree_and_task_revocations_reach_the_cache(store: Counting) -> None:
    broker = Broker(issuer=TEST_ISSUER, store=store)
    cache = live_cache(store)
    try:
        with broker.task(
            "job-1", subject="svc:a", audience="api", scopes=["read", "write"]
        ) as parent:
            child = broker.attenuate(parent, scopes=["read"])
        assert wait_for(lambda: cache.revoked(parent.lease_id) and cache.revoked(child.lease_id))
    finally:
        cache.close()


def test_revocations_before_the_feed_started_are_resynced(store: Counting) -> None:
    broker = Broker(issuer=TEST_ISSUER, store=store)
    cred = broker.issue("svc:a", "api", ttl=60)
    broker.revoke(cred)
    cache = live_cache(store)
    try:
        assert cache.revoked(cred.lease_id)
    finally:
        cache.close()


def test_the_resync_uses_the_brokers_clock(store: Counting) -> None:
    # Leases judged by a clock far from time.time(): the resync window must be
    # counted on that clock, or it would miss this revocation.
    clock = FakeClock(1_767_225_600.0)  # 2026-01-01, whatever the date today
    broker = Broker(issuer=TEST_ISSUER, store=store, clock=clock)
    cred = broker.issue("svc:a", "api", ttl=60)
    broker.revoke(cred)
    cache = store.revocations(max_staleness=1.0, heartbeat=0.1, clock=clock)
    try:
        assert wait_for(cache.fresh)
        assert cache.revoked(cred.lease_id)
    finally:
        cache.close()


def test_a_broker_can_verify_through_the_cache(store: Counting) -> None:
    cache = live_cache(store)
    try:
        broker = Broker(issuer=TEST_ISSUER, store=store, revocations=cache)
        cred = broker.issue("svc:a", "api", ttl=60)
        broker.verify(cred.token, audience="api")
        assert store.gets == 0
    finally:
        cache.close()


def test_a_dead_feed_falls_back_to_the_store_and_fails_closed(
    private_server: PrivateServer,  # noqa: F811 - the fixture
) -> None:
    store = CountingStore(fast_client(private_server.port), prefix="jbtest")
    age(store)
    broker = Broker(issuer=TEST_ISSUER, store=store)
    cred = broker.issue("svc:a", "api", ttl=60)
    cache = store.revocations(max_staleness=0.5, heartbeat=0.1)
    try:
        assert wait_for(cache.fresh)
        verifier = Verifier(
            broker.jwks(), issuer=TEST_ISSUER, audience="api", store=store, revocations=cache
        )
        verifier.verify(cred.token)
        assert store.gets == 0
        private_server.kill()
        assert wait_for(lambda: not cache.fresh(), limit=3.0)
        with pytest.raises(StoreUnavailable):
            verifier.verify(cred.token)  # stale cache: asks the store, which is down
        private_server.start()
        assert wait_for(cache.fresh, limit=10.0), "the feed did not resync after a restart"
        verifier.verify(cred.token)
    finally:
        cache.close()
        private_server.kill()


def test_a_cache_started_after_the_store_lost_its_data_sends_old_tokens_to_the_store(
    store: Counting,
) -> None:
    # The resync finds no revocation, so only the epoch tells the cache that the
    # token's lease (revoked, then lost with the rest) is gone.
    broker = Broker(issuer=TEST_ISSUER, store=store)
    cred = broker.issue("svc:a", "api", ttl=60)
    broker.revoke(cred)
    lose_data(store)
    cache = live_cache(store)
    try:
        verifier = Verifier(
            broker.jwks(), issuer=TEST_ISSUER, audience="api", store=store, revocations=cache
        )
        assert not cache.revoked(cred.lease_id)
        with pytest.raises(UnknownLease):
            verifier.verify(cred.token)
        assert store.gets == 1
    finally:
        cache.close()


def test_a_live_cache_stops_vouching_once_the_store_lost_its_data(store: Counting) -> None:
    broker = Broker(issuer=TEST_ISSUER, store=store)
    cache = live_cache(store)
    try:
        verifier = Verifier(
            broker.jwks(), issuer=TEST_ISSUER, audience="api", store=store, revocations=cache
        )
        cred = broker.issue("svc:a", "api", ttl=60)
        verifier.verify(cred.token)
        assert store.gets == 0
        epoch = cache.epoch
        lose_data(store)  # the subscription stays connected: only the epoch tells
        assert wait_for(lambda: cache.fresh() and cache.epoch != epoch), "epoch change unseen"
        with pytest.raises(UnknownLease):
            verifier.verify(cred.token)
        assert store.gets == 1
    finally:
        cache.close()


def test_feed_thread_stops_on_close(store: Counting) -> None:
    cache = live_cache(store)
    cache.close()
    assert wait_for(
        lambda: not any(t.name == "jitbroker-revocations" for t in threading.enumerate())
    )


class PlainPool:
    """Lends connections the way ``psycopg_pool.ConnectionPool`` does with its
    defaults: not in autocommit mode, committed when handed back in a
    transaction, then kept for the next borrower (here with a dict row factory)."""

    def __init__(self) -> None:
        self.idle: list[psycopg.Connection[Any]] = []
        self.made: list[psycopg.Connection[Any]] = []
        self.lock = threading.Lock()

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        with self.lock:
            conn = self.idle.pop() if self.idle else None
        if conn is None:
            conn = psycopg.connect(PG_DSN, row_factory=dict_row)
            self.made.append(conn)
        try:
            yield conn
            if conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS:
                conn.commit()
        finally:
            if conn.broken or conn.closed:
                conn.close()  # terminated under us: not lent again
            else:
                if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                    conn.rollback()
                with self.lock:
                    self.idle.append(conn)

    def close(self) -> None:
        for conn in self.made:
            conn.close()


def test_the_postgres_feed_listens_on_a_pool_without_autocommit() -> None:
    # A LISTEN in an uncommitted transaction never hears anything, while the
    # heartbeat kept the cache fresh: revoked tokens were accepted.
    server_or_skip("PostgreSQL", "127.0.0.1", 5432)
    pool = PlainPool()
    store = CountingPostgresStore(pool, schema=f"jbtest_{uuid4().hex}")
    try:
        broker = Broker(issuer=TEST_ISSUER, store=store)
        cache = live_cache(store)
        try:
            cred = broker.issue("svc:a", "api", ttl=60)
            broker.revoke(cred)
            assert wait_for(lambda: cache.revoked(cred.lease_id)), "the feed heard nothing"
            verifier = Verifier(
                broker.jwks(), issuer=TEST_ISSUER, audience="api", store=store, revocations=cache
            )
            with pytest.raises(TokenRevoked):
                verifier.verify(cred.token)
        finally:
            cache.close()
        # Handed back as it was lent: not in autocommit mode, and no longer listening.
        for conn in pool.made:
            assert not conn.autocommit
            assert conn.execute("SELECT pg_listening_channels()").fetchall() == []
            conn.rollback()
    finally:
        store.clear()
        store.close()
        pool.close()


# -- revoked while the feed was cut off: the resync must pick it up ------------------
class FeedGate:
    """Holds the feed's reconnection until ``open()``: after the first, each of its
    sessions (the ones the feed thread starts) waits here, so the test can revoke
    while the feed is surely disconnected. ``waiting`` says one is held."""

    def __init__(self) -> None:
        self.sessions = 0
        self.released = threading.Event()

    def enter(self) -> None:
        if threading.current_thread().name != FEED_THREAD:
            return
        self.sessions += 1
        if self.sessions > 1:
            assert self.released.wait(10), "the test never let the feed reconnect"

    def waiting(self) -> bool:
        return self.sessions > 1 and not self.released.is_set()

    def open(self) -> None:
        self.released.set()


class GatedRedisStore(CountingStore):
    gate: FeedGate

    def _feed_client(self) -> redis.Redis:
        self.gate.enter()
        return super()._feed_client()


def kill_feed_connection(killer: redis.Redis) -> None:
    feeds = [c for c in killer.client_list() if c["name"] == FEED_CLIENT_NAME]
    assert feeds, "no feed connection to cut"
    for client in feeds:
        killer.client_kill_filter(_id=client["id"])


class GatedPool(PlainPool):
    """``PlainPool`` that gates the feed's sessions and knows its server process."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = FeedGate()
        self.feed_pid: int | None = None

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        self.gate.enter()
        with super().connection() as conn:
            if threading.current_thread().name == FEED_THREAD:
                self.feed_pid = conn.info.backend_pid
            yield conn


def revoke_while_cut_off(store: Counting, gate: FeedGate, cut: Callable[[], object]) -> None:
    """Cut the feed's connection, revoke while it waits to reconnect, let it
    reconnect: its resync, not a message, must bring the revocation."""
    broker = Broker(issuer=TEST_ISSUER, store=store)
    cred = broker.issue("svc:a", "api", ttl=60)
    cache = live_cache(store)
    try:
        verifier = Verifier(
            broker.jwks(), issuer=TEST_ISSUER, audience="api", store=store, revocations=cache
        )
        verifier.verify(cred.token)
        cut()
        assert wait_for(gate.waiting), "the feed did not notice the cut"
        assert not cache.fresh()
        broker.revoke(cred)  # announced to nobody: the feed is not connected
        gate.open()
        assert wait_for(cache.fresh), "the feed did not reconnect"
        assert cache.revoked(cred.lease_id)
        with pytest.raises(TokenRevoked):
            verifier.verify(cred.token)
        assert store.gets == 0  # both answered by the cache
    finally:
        gate.open()
        cache.close()


def test_a_revocation_while_the_redis_feed_was_cut_off_is_resynced(
    private_server: PrivateServer,  # noqa: F811 - the fixture
) -> None:
    client = redis.Redis(
        host="127.0.0.1", port=private_server.port, socket_timeout=2, retry=Retry(NoBackoff(), 0)
    )
    store = GatedRedisStore(client, prefix="jbtest")
    store.gate = FeedGate()
    age(store)
    killer = fast_client(private_server.port)
    try:
        revoke_while_cut_off(store, store.gate, lambda: kill_feed_connection(killer))
    finally:
        killer.close()
        client.close()


def test_a_feed_that_reconnects_by_itself_reads_on_from_the_log(
    private_server: PrivateServer,  # noqa: F811 - the fixture
) -> None:
    # redis-py's default retries reconnect under the feed without telling it;
    # the log is in the store, so it reads on from where it was: nothing lost.
    client = redis.Redis(host="127.0.0.1", port=private_server.port, socket_timeout=2)
    store = CountingStore(client, prefix="jbtest")
    age(store)
    killer = fast_client(private_server.port)
    broker = Broker(issuer=TEST_ISSUER, store=store)
    cache = live_cache(store)
    try:
        for _ in range(10):
            cred = broker.issue("svc:a", "api", ttl=60)
            kill_feed_connection(killer)
            broker.revoke(cred)  # strict: returns once the cache has it, or is stale
            assert cache.revoked(cred.lease_id) or not cache.fresh()
            assert wait_for(lambda: cache.revoked(cred.lease_id))  # noqa: B023 - awaited now
    finally:
        cache.close()
        killer.close()
        client.close()


def test_a_revocation_while_the_postgres_feed_was_cut_off_is_resynced() -> None:
    server_or_skip("PostgreSQL", "127.0.0.1", 5432)
    pool = GatedPool()
    store = CountingPostgresStore(pool, schema=f"jbtest_{uuid4().hex}")
    age(store)

    def terminate_listener() -> None:
        with psycopg.connect(PG_DSN, autocommit=True) as admin:
            row = admin.execute("SELECT pg_terminate_backend(%s)", (pool.feed_pid,)).fetchone()
        assert row == (True,)

    try:
        revoke_while_cut_off(store, pool.gate, terminate_listener)
    finally:
        store.clear()
        store.close()
        pool.close()
